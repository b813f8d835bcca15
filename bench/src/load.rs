//! A closed-loop HTTP/1.1 load client on std::net: `connections` threads, each with one keep-alive
//! connection, sending the next request as soon as the last response is read. A warm-up runs first;
//! only requests that start after it and end before the deadline are recorded. Latency is measured
//! from just before the request is written to just after the last body byte is read.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Read and connect timeout: a response slower than this counts as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// How to drive the load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Where to send the requests.
    pub addr: SocketAddr,
    /// Concurrent connections, one thread each (the closed loop's concurrency).
    pub connections: usize,
    /// Requests run but not recorded, before the measurement.
    pub warmup: Duration,
    /// How long requests are recorded.
    pub duration: Duration,
}

/// Makes the bytes of one whole request (head and body) for connection `conn`'s `n`th request.
pub type RequestSource<'a> = dyn Fn(usize, u64) -> Cow<'a, [u8]> + Sync + 'a;

/// What one load run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Recorded latencies, nanoseconds, sorted ascending.
    pub latencies_ns: Vec<u64>,
    /// Requests that failed (connection error, timeout, or a status other than 2xx), warm-up included.
    pub errors: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// The measured span (the configured duration).
    pub measured: Duration,
}

impl LoadResult {
    /// Recorded requests.
    pub fn requests(&self) -> usize {
        self.latencies_ns.len()
    }

    /// Recorded requests per second.
    pub fn rps(&self) -> f64 {
        self.latencies_ns.len() as f64 / self.measured.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The `p`th percentile (0..=100, nearest rank), microseconds; 0 with no requests.
    pub fn percentile_us(&self, p: f64) -> f64 {
        percentile(&self.latencies_ns, p) as f64 / 1_000.0
    }

    /// Adds `other`'s requests (another span of the same load) to these.
    pub fn merge(&mut self, other: LoadResult) {
        self.latencies_ns.extend(other.latencies_ns);
        self.latencies_ns.sort_unstable();
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.measured += other.measured;
    }

    /// The mean latency, microseconds.
    pub fn mean_us(&self) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        self.latencies_ns.iter().sum::<u64>() as f64 / self.latencies_ns.len() as f64 / 1_000.0
    }
}

/// The `p`th percentile of sorted `values` by nearest rank; 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What one connection's thread saw.
#[derive(Default)]
struct ThreadResult {
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs the closed loop; `at_measure_start` runs on the calling thread when the warm-up ends (to
/// snapshot counters). Fails only if no connection could be made at all.
pub fn run(
    config: &LoadConfig,
    source: &RequestSource<'_>,
    at_measure_start: impl FnOnce(),
) -> io::Result<LoadResult> {
    let connections = config.connections.max(1);
    // Connect before the clock starts, so connection set-up is not in the first latencies.
    let streams: Vec<Connection> =
        (0..connections).map(|_| Connection::open(config.addr)).collect::<io::Result<_>>()?;
    let barrier = Barrier::new(connections + 1);
    let stop = AtomicBool::new(false);
    let mut at_measure_start = Some(at_measure_start);
    let results: Vec<ThreadResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(conn, stream)| {
                let (barrier, stop) = (&barrier, &stop);
                scope.spawn(move || drive(conn, stream, config, source, barrier, stop))
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        sleep_until(start + config.warmup);
        if let Some(f) = at_measure_start.take() {
            f();
        }
        sleep_until(start + config.warmup + config.duration);
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut out = LoadResult { measured: config.duration, ..LoadResult::default() };
    for r in results {
        out.latencies_ns.extend(r.latencies_ns);
        out.errors += r.errors;
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
    }
    out.latencies_ns.sort_unstable();
    Ok(out)
}

fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

/// One connection's loop: its clock starts at the shared barrier.
fn drive(
    conn: usize,
    mut connection: Connection,
    config: &LoadConfig,
    source: &RequestSource<'_>,
    barrier: &Barrier,
    stop: &AtomicBool,
) -> ThreadResult {
    let mut result = ThreadResult::default();
    barrier.wait();
    let start = Instant::now();
    let (measure_from, measure_to) = (start + config.warmup, start + config.warmup + config.duration);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let request = source(conn, n);
        n += 1;
        let t0 = Instant::now();
        if t0 >= measure_to {
            break;
        }
        match connection.exchange(&request) {
            Ok(status) if (200..300).contains(&status) => {
                let t1 = Instant::now();
                if t0 >= measure_from && t1 <= measure_to {
                    result.latencies_ns.push((t1 - t0).as_nanos() as u64);
                }
            }
            outcome => {
                result.errors += 1;
                if result.first_error.is_none() {
                    result.first_error = Some(match outcome {
                        Ok(status) => format!("HTTP status {status}"),
                        Err(e) => e.to_string(),
                    });
                }
                // Whatever state the connection is in, start over on a fresh one.
                match Connection::open(config.addr) {
                    Ok(fresh) => connection = fresh,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
    result
}

/// A keep-alive HTTP/1.1 client connection with its read buffer.
pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
}

impl Connection {
    /// Connects to `addr` (Nagle off: requests are written in one piece).
    pub fn open(addr: SocketAddr) -> io::Result<Connection> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Connection { stream, buf: Vec::with_capacity(16 * 1024), pos: 0 })
    }

    /// Writes `request` and reads the whole response; returns its status code.
    pub fn exchange(&mut self, request: &[u8]) -> io::Result<u16> {
        self.stream.write_all(request)?;
        self.read_response()
    }

    /// Reads one response (Content-Length or chunked body), leaving any bytes after it buffered.
    fn read_response(&mut self) -> io::Result<u16> {
        let head_end = loop {
            if let Some(i) = find(&self.buf[self.pos..], b"\r\n\r\n") {
                break self.pos + i + 4;
            }
            if self.buf.len() - self.pos > MAX_HEAD {
                return Err(invalid("response head too long"));
            }
            self.fill()?;
        };
        let head = std::str::from_utf8(&self.buf[self.pos..head_end])
            .map_err(|_| invalid("response head is not UTF-8"))?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("malformed status line"))?;
        let mut length = None;
        let mut chunked = false;
        for line in head.split("\r\n").skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.parse::<usize>().map_err(|_| invalid("bad content-length"))?);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                }
            }
        }
        self.pos = head_end;
        if chunked {
            self.skip_chunked()?;
        } else {
            self.skip(length.unwrap_or(0))?;
        }
        // Keep the buffer from growing: drop what was consumed once nothing is pending.
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        Ok(status)
    }

    /// Consumes `n` body bytes.
    fn skip(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() - self.pos < n {
            self.fill()?;
        }
        self.pos += n;
        Ok(())
    }

    /// Consumes a chunked body and its trailer.
    fn skip_chunked(&mut self) -> io::Result<()> {
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf[self.pos..], b"\r\n") {
                    break self.pos + i;
                }
                self.fill()?;
            };
            let line =
                std::str::from_utf8(&self.buf[self.pos..line_end]).map_err(|_| invalid("chunk size"))?;
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| invalid("bad chunk size"))?;
            self.pos = line_end + 2;
            if size == 0 {
                // Trailer fields (none expected), then the final CRLF.
                loop {
                    let end = loop {
                        if let Some(i) = find(&self.buf[self.pos..], b"\r\n") {
                            break self.pos + i;
                        }
                        self.fill()?;
                    };
                    let empty = end == self.pos;
                    self.pos = end + 2;
                    if empty {
                        return Ok(());
                    }
                }
            }
            self.skip(size + 2)?;
        }
    }

    /// Reads more bytes into the buffer; end of stream is an error (the response is incomplete).
    fn fill(&mut self) -> io::Result<()> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-response"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::post_json;
    use std::net::TcpListener;

    /// A keep-alive server answering every request with `response`, on its own threads; it reads
    /// each request's head and Content-Length body before answering.
    fn serve(response: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || answer_all(stream, response));
            }
        });
        addr
    }

    fn answer_all(mut stream: TcpStream, response: &[u8]) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() < end + 4 + length {
                    break;
                }
                buf.drain(..end + 4 + length);
                if stream.write_all(response).is_err() {
                    return;
                }
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    #[test]
    fn closed_loop_records_every_answered_request() {
        let addr = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello");
        let config = LoadConfig {
            addr,
            connections: 3,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(200),
        };
        let body = post_json("/v1/chat/completions", br#"{"model":"m"}"#);
        let mut snapshots = 0;
        let result = run(&config, &|_, _| Cow::Borrowed(&body[..]), || snapshots += 1).expect("runs");
        assert_eq!(snapshots, 1);
        assert_eq!(result.errors, 0, "{:?}", result.first_error);
        assert!(result.requests() > 0);
        assert!(result.latencies_ns.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert!(result.percentile_us(50.0) <= result.percentile_us(99.0));

        let mut merged = result.clone();
        merged.merge(result.clone());
        assert_eq!(merged.requests(), 2 * result.requests());
        assert_eq!(merged.measured, 2 * config.duration);
        assert!(merged.latencies_ns.windows(2).all(|w| w[0] <= w[1]), "sorted");
    }

    #[test]
    fn chunked_responses_and_error_statuses_are_read_whole() {
        let addr = serve(
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        );
        let mut connection = Connection::open(addr).expect("connects");
        let request = post_json("/", b"{}");
        // Twice on one connection: the first response was consumed exactly.
        assert_eq!(connection.exchange(&request).expect("answered"), 503);
        assert_eq!(connection.exchange(&request).expect("answered"), 503);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), 50);
        assert_eq!(percentile(&values, 99.0), 99);
        assert_eq!(percentile(&values, 100.0), 100);
        assert_eq!(percentile(&values, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
