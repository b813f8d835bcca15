//! A tiny HTTP/1.1 client and echo upstream on std::net: enough to drive Envoy in tests, with no
//! async runtime. Malformed input from the network is an `io::Error`, never a panic.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{io_context, localhost};

/// How long the client waits for connect and for each read.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request or response head accepted (a bound on what a broken peer can make us read).
const MAX_HEAD: usize = 64 * 1024;

/// A parsed HTTP/1.1 message head and body (a request's or a response's).
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// The first line without CRLF (`POST /v1/completions HTTP/1.1` or `HTTP/1.1 200 OK`).
    pub start_line: String,
    /// Header fields in arrival order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Message {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 (lossy), for assertions and messages.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A response: its status code and the message.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code (200, 503, ...).
    pub status: u16,
    /// Head and body.
    pub message: Message,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.message.header(name)
    }

    /// The body bytes.
    pub fn body(&self) -> &[u8] {
        &self.message.body
    }
}

/// `GET path` on 127.0.0.1:`port`.
pub fn get(port: u16, path: &str) -> io::Result<Response> {
    request(port, "GET", path, &[], None)
}

/// `POST path` with `body` and extra `headers` on 127.0.0.1:`port`.
pub fn post(port: u16, path: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<Response> {
    request(port, "POST", path, headers, Some(body))
}

/// Sends one request on a fresh connection (`Connection: close`) and reads the whole response.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&localhost(port), CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
    let mut reader = BufReader::new(stream);
    let message = read_message(&mut reader, Role::Response)?
        .ok_or_else(|| invalid("connection closed before a response"))?;
    let status = parse_status(&message.start_line)?;
    Ok(Response { status, message })
}

/// Which side's message is read: a response without a length runs to EOF, a request's is empty.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Request,
    Response,
}

/// The status code of a status line (`HTTP/1.1 200 OK`).
fn parse_status(line: &str) -> io::Result<u16> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => {
            code.parse().map_err(|_| invalid(format!("bad status code in {line:?}")))
        }
        _ => Err(invalid(format!("bad status line {line:?}"))),
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one CRLF-terminated line (at most `budget` bytes), without the line ending.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(invalid("message head too large"));
    }
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err(invalid("connection closed mid-line"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map(Some).map_err(|_| invalid("non-UTF-8 header line"))
}

/// Reads one message; `None` when the peer closed the connection before sending anything.
fn read_message(reader: &mut impl BufRead, role: Role) -> io::Result<Option<Message>> {
    let mut budget = MAX_HEAD;
    let Some(start_line) = read_line(reader, &mut budget)? else { return Ok(None) };
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut budget)?.ok_or_else(|| invalid("connection closed in the head"))?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| invalid(format!("bad header {line:?}")))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut message = Message { start_line, headers, body: Vec::new() };
    let chunked = message.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        message.body = read_chunked(reader)?;
    } else if let Some(len) = message.header("content-length") {
        let len: usize = len.parse().map_err(|_| invalid(format!("bad content-length {len:?}")))?;
        message.body = vec![0; len];
        reader.read_exact(&mut message.body)?;
    } else if role == Role::Response {
        reader.read_to_end(&mut message.body)?;
    }
    Ok(Some(message))
}

/// Reads a chunked body up to and including its trailer section.
fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut budget = MAX_HEAD;
        let line = read_line(reader, &mut budget)?.ok_or_else(|| invalid("connection closed in a chunk"))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_hex, 16).map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailer fields until the empty line.
            while !read_line(reader, &mut budget)?.ok_or_else(|| invalid("closed in trailers"))?.is_empty() {}
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(invalid("chunk not followed by CRLF"));
        }
    }
}

// ---- echo upstream -------------------------------------------------------------------------------

/// A request as the upstream received it.
pub type ReceivedRequest = Message;

/// An HTTP/1.1 server on a free 127.0.0.1 port that records every request and answers 200 with the
/// request body echoed back, plus `x-upstream-port`. Stops on drop.
pub struct EchoUpstream {
    port: u16,
    received: Arc<Mutex<Vec<ReceivedRequest>>>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl EchoUpstream {
    /// Starts the server; it accepts connections as soon as this returns.
    pub fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the echo upstream on 127.0.0.1:0");
        let port = listener.local_addr().expect("local address of a bound listener").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let received = Arc::clone(&received);
                    // Envoy keeps upstream connections alive: one thread per connection.
                    std::thread::spawn(move || {
                        if let Err(err) = serve_connection(conn, port, &received) {
                            eprintln!("echo upstream {port}: {err}");
                        }
                    });
                }
            })
        };
        EchoUpstream { port, received, stop, accept_thread: Some(accept_thread) }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request received so far, in arrival order.
    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&localhost(self.port), Duration::from_secs(1));
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves keep-alive requests on one connection until the peer closes it or goes idle.
fn serve_connection(conn: TcpStream, port: u16, received: &Mutex<Vec<ReceivedRequest>>) -> io::Result<()> {
    // An idle pooled connection from a stopped Envoy must not keep the thread forever.
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = io_context(conn.try_clone(), || "clone upstream connection".to_string())?;
    let mut reader = BufReader::new(conn);
    while let Some(request) = read_message(&mut reader, Role::Request)? {
        let close = request.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let content_type = request.header("content-type").unwrap_or("application/octet-stream").to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nx-upstream-port: {port}\r\n\r\n",
            request.body.len()
        );
        let body = request.body.clone();
        // Recorded before answering: a test that has its response must find the request here.
        received.lock().unwrap_or_else(|e| e.into_inner()).push(request);
        writer.write_all(head.as_bytes())?;
        writer.write_all(&body)?;
        if close {
            let _ = writer.shutdown(Shutdown::Both);
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], role: Role) -> io::Result<Option<Message>> {
        read_message(&mut BufReader::new(raw), role)
    }

    #[test]
    fn content_length_body_is_read_exactly() {
        let msg = parse(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcdef", Role::Request)
            .expect("valid request")
            .expect("one message");
        assert_eq!(msg.body, b"abc");
        assert_eq!(msg.header("content-length"), Some("3"));
    }

    #[test]
    fn chunked_body_is_dechunked() {
        let raw =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n";
        let msg = parse(raw, Role::Response).expect("valid response").expect("one message");
        assert_eq!(msg.body, b"abcde");
        assert_eq!(parse_status(&msg.start_line).expect("status line"), 200);
    }

    #[test]
    fn response_without_length_runs_to_eof() {
        let msg = parse(b"HTTP/1.1 200 OK\r\n\r\nrest", Role::Response).expect("valid").expect("message");
        assert_eq!(msg.body, b"rest");
    }

    #[test]
    fn truncated_body_is_an_error_not_a_panic() {
        assert!(parse(b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc", Role::Request).is_err());
        assert!(
            parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", Role::Response).is_err()
        );
        assert!(parse_status("garbage").is_err());
    }

    #[test]
    fn closed_connection_yields_no_message() {
        assert!(parse(b"", Role::Request).expect("clean close").is_none());
    }
}
