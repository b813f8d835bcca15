//! A small blocking HTTP/1.1 client on std::net: readiness probes, the control plane's admin API and
//! the demo's requests through Envoy (with the body handed over as it arrives, for time to first
//! token). One request per connection (`connection: close`). Malformed answers are errors, never
//! panics.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// A response: status and body (headers are not needed by any caller).
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// `GET path` on 127.0.0.1:`port`.
pub fn get(port: u16, path: &str, timeout: Duration) -> io::Result<Response> {
    request(port, "GET", path, &[], None, timeout, |_| {})
}

/// Sends one request to 127.0.0.1:`port` and reads the whole response, calling `on_body` with each
/// piece of the body as it arrives.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
    mut on_body: impl FnMut(&[u8]),
) -> io::Result<Response> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
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
    let mut budget = MAX_HEAD;
    let status_line = read_line(&mut reader, &mut budget)?.ok_or_else(|| invalid("connection closed"))?;
    let status = match status_line.split(' ').collect::<Vec<_>>().as_slice() {
        [version, code, ..] if version.starts_with("HTTP/1.") => {
            code.parse().map_err(|_| invalid(format!("bad status line {status_line:?}")))?
        }
        _ => return Err(invalid(format!("bad status line {status_line:?}"))),
    };
    let (mut chunked, mut length) = (false, None);
    loop {
        let line = read_line(&mut reader, &mut budget)?.ok_or_else(|| invalid("closed in the head"))?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| invalid(format!("bad header {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length =
                Some(value.parse::<usize>().map_err(|_| invalid(format!("bad content-length {value:?}")))?);
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut budget = MAX_HEAD;
            let line = read_line(&mut reader, &mut budget)?.ok_or_else(|| invalid("closed in a chunk"))?;
            let hex = line.split(';').next().unwrap_or("").trim();
            let size =
                usize::from_str_radix(hex, 16).map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                while !read_line(&mut reader, &mut budget)?
                    .ok_or_else(|| invalid("closed in trailers"))?
                    .is_empty()
                {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            on_body(&body[start..]);
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = length {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
        on_body(&body);
    } else {
        let mut buf = [0u8; 8192];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
            on_body(&buf[..n]);
        }
    }
    Ok(Response { status, body })
}

/// One CRLF-terminated line (at most `budget` bytes) without its line ending; `None` at EOF.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(invalid("response head too large"));
    }
    *budget -= n;
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map(Some).map_err(|_| invalid("non-UTF-8 header line"))
}
