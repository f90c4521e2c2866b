//! One client connection: send a GET, read the response by its
//! `Content-Length`, check status, size and CRC-32C as the bytes arrive,
//! and say precisely how it went wrong when it does.
//!
//! Strict on purpose: holdfast promises that a client never sees a reset,
//! a cut-short answer, a lost or a duplicated byte, so every deviation from
//! "exactly one correct response per request" is a failure with its own
//! kind — including bytes after a response (which a duplicated tail would
//! produce) and an idle keep-alive connection closed under the client
//! (which ordinary HTTP clients silently retry, hiding it).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::FileSpec;

/// How a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    /// ECONNRESET / EPIPE / ECONNABORTED while sending or receiving.
    Reset,
    /// No complete response within `--timeout-ms` of the request's start.
    Timeout,
    /// The server closed after sending part of the response.
    EofMidResponse,
    /// A fresh connection closed before any byte of its first response.
    EofBeforeResponse,
    /// A reused keep-alive connection closed before any byte of the
    /// response (a server dropping idle connections, e.g. on reload).
    EofIdleKeepalive,
    /// A status other than 200.
    Status,
    /// A `Content-Length` other than the file's size.
    BodySize,
    /// The right number of bytes, but not the file's (CRC-32C differs).
    BodyChecksum,
    /// The connection could not be opened (refused, timed out, ...).
    Connect,
    /// The complete, correct response arrived, but the server did not
    /// close the connection after it although the request said
    /// `Connection: close` (`--close` only; the latency is not recorded).
    NoClose,
    /// A malformed response head, no `Content-Length`, or bytes after the
    /// response that nobody asked for.
    Protocol,
    /// Any other I/O error.
    Other,
}

impl FailKind {
    pub const ALL: [FailKind; 12] = [
        FailKind::Reset,
        FailKind::Timeout,
        FailKind::EofMidResponse,
        FailKind::EofBeforeResponse,
        FailKind::EofIdleKeepalive,
        FailKind::Status,
        FailKind::BodySize,
        FailKind::BodyChecksum,
        FailKind::Connect,
        FailKind::NoClose,
        FailKind::Protocol,
        FailKind::Other,
    ];

    /// Plural noun phrase for summaries ("3 resets").
    pub fn describe(self) -> &'static str {
        match self {
            FailKind::Reset => "resets",
            FailKind::Timeout => "timeouts",
            FailKind::EofMidResponse => "closed mid-response",
            FailKind::EofBeforeResponse => "closed before responding",
            FailKind::EofIdleKeepalive => "idle keep-alive connections closed",
            FailKind::Status => "wrong status",
            FailKind::BodySize => "wrong body size",
            FailKind::BodyChecksum => "wrong body checksum",
            FailKind::Connect => "connect errors",
            FailKind::NoClose => "not closed after Connection: close",
            FailKind::Protocol => "malformed responses",
            FailKind::Other => "other errors",
        }
    }
}

/// A failed request: its kind and what exactly was seen.
#[derive(Debug)]
pub struct Failure {
    pub kind: FailKind,
    pub detail: String,
}

fn fail(kind: FailKind, detail: impl Into<String>) -> Failure {
    Failure {
        kind,
        detail: detail.into(),
    }
}

fn io_kind(e: &io::Error) -> FailKind {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => FailKind::Reset,
        WouldBlock | TimedOut => FailKind::Timeout,
        _ => FailKind::Other,
    }
}

/// Receive buffer size; also the largest response head accepted.
const BUF: usize = 64 * 1024;

/// An open connection and the bytes received but not yet consumed.
pub struct Conn {
    s: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Responses completed on this connection.
    pub responses: u64,
    /// The receive timeout set on the socket now (a syscall to change it).
    armed: Option<Duration>,
}

/// What a successful request delivered.
pub struct Done {
    /// When its last body byte arrived (the end of its latency).
    pub at: Instant,
    pub body_bytes: u64,
}

impl Conn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Conn {
            s,
            buf: vec![0u8; BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            responses: 0,
            armed: None,
        })
    }

    /// Reads more into the buffer, waiting at most until `deadline`.
    /// Ok(0) at end of stream.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            // Lower the socket's timeout only when the deadline is nearer
            // than it by a whole millisecond: a quick response costs no
            // setsockopt here, a slow one about one per millisecond spent
            // reading.
            let want = Duration::from_millis(left.as_micros().div_ceil(1000) as u64);
            if self.armed.is_none_or(|a| want < a) {
                self.s.set_read_timeout(Some(want))?;
                self.armed = Some(want);
            }
            match self.s.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn rearm(&mut self, timeout: Duration) -> io::Result<()> {
        if self.armed != Some(timeout) {
            self.s.set_read_timeout(Some(timeout))?;
            self.armed = Some(timeout);
        }
        Ok(())
    }
}

/// The request bytes for `file` (`close`: ask the server to close after
/// answering, for connection-per-request load).
pub fn request_bytes(file: &FileSpec, host: &str, close: bool) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: hf-load\r\n{}\r\n",
        file.path,
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// Runs one request on `conn` (opening it first if it is `None`) and checks
/// the response against `file`. On success the connection stays in `conn`
/// if it can carry another request; on failure it is dropped.
pub fn fetch(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    file: &FileSpec,
    request: &[u8],
    close: bool,
    timeout: Duration,
    started: Instant,
) -> Result<Done, Failure> {
    let r = fetch_on(conn, addr, file, request, close, timeout, started);
    if r.is_err() {
        *conn = None;
    }
    r
}

fn fetch_on(
    slot: &mut Option<Conn>,
    addr: SocketAddr,
    file: &FileSpec,
    request: &[u8],
    close: bool,
    timeout: Duration,
    started: Instant,
) -> Result<Done, Failure> {
    let deadline = started + timeout;
    if slot.is_none() {
        let c = Conn::connect(addr, timeout)
            .map_err(|e| fail(FailKind::Connect, format!("connecting to {addr}: {e}")))?;
        *slot = Some(c);
    }
    let c = slot.as_mut().expect("connection just opened");
    let mut rd = Reading {
        received: 0,
        reused: c.responses > 0,
        earlier: c.responses,
        timeout,
    };
    c.rearm(timeout)
        .map_err(|e| fail(FailKind::Other, format!("setting SO_RCVTIMEO: {e}")))?;
    c.s.write_all(request).map_err(|e| {
        fail(
            io_kind(&e),
            format!("sending the request ({}): {e}", rd.which()),
        )
    })?;

    // The head.
    let (head, head_len) = loop {
        if c.end > c.start {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&c.buf[c.start..c.end]) {
                Ok(httparse::Status::Complete(n)) => break (Head::of(&resp)?, n),
                Ok(httparse::Status::Partial) => {}
                Err(e) => {
                    let shown = &c.buf[c.start..c.end.min(c.start + 80)];
                    return Err(fail(
                        FailKind::Protocol,
                        format!(
                            "malformed response head ({e}): {:?}",
                            String::from_utf8_lossy(shown)
                        ),
                    ));
                }
            }
            if c.end - c.start == c.buf.len() {
                return Err(fail(
                    FailKind::Protocol,
                    format!("response head larger than {BUF} bytes"),
                ));
            }
        }
        let r = c.fill(deadline);
        rd.more(r)?;
    };
    c.start += head_len;
    if head.status != 200 {
        return Err(fail(
            FailKind::Status,
            format!("status {} {}", head.status, head.reason),
        ));
    }
    let Some(len) = head.len else {
        return Err(fail(FailKind::Protocol, "200 without Content-Length"));
    };
    if len != file.size {
        return Err(fail(
            FailKind::BodySize,
            format!("Content-Length {len}, want {}", file.size),
        ));
    }

    // The body, checksummed as it arrives.
    let mut left = len;
    let mut crc = 0u32;
    loop {
        let take = (c.end - c.start).min(usize::try_from(left).unwrap_or(usize::MAX));
        crc = crc32c::crc32c_append(crc, &c.buf[c.start..c.start + take]);
        c.start += take;
        left -= take as u64;
        if left == 0 {
            break;
        }
        let r = c.fill(deadline);
        rd.more(r)?;
    }
    let at = Instant::now();
    if crc != file.crc32c {
        return Err(fail(
            FailKind::BodyChecksum,
            format!(
                "{len} bytes with CRC-32C {crc:08x}, want {:08x}",
                file.crc32c
            ),
        ));
    }
    if c.end > c.start {
        return Err(fail(
            FailKind::Protocol,
            format!("{} bytes after the response, unasked for", c.end - c.start),
        ));
    }
    c.responses += 1;
    if close {
        // We asked for a close: the server must close cleanly (FIN) and
        // send nothing more. The latency ends at the last body byte; the
        // close gets a timeout of its own.
        match c.fill(at + timeout) {
            Ok(0) => {}
            Ok(n) => {
                return Err(fail(
                    FailKind::Protocol,
                    format!("{n} bytes after the response, unasked for"),
                ))
            }
            Err(e) if io_kind(&e) == FailKind::Timeout => {
                return Err(fail(
                    FailKind::NoClose,
                    format!(
                        "the complete response arrived {:.3} ms after the start, but the \
                         connection was still open {} ms later (Connection: close was asked)",
                        (at - started).as_secs_f64() * 1e3,
                        timeout.as_millis()
                    ),
                ))
            }
            Err(e) => {
                return Err(fail(
                    io_kind(&e),
                    format!("after the complete response, instead of a clean close: {e}"),
                ))
            }
        }
        *slot = None;
    } else if head.close {
        // The server said it closes: not an error, just a new connection
        // next time.
        *slot = None;
    }
    Ok(Done {
        at,
        body_bytes: len,
    })
}

/// What has arrived of one response, to say how a read ended it.
struct Reading {
    received: u64,
    reused: bool,
    /// Responses completed on the connection before this one.
    earlier: u64,
    timeout: Duration,
}

impl Reading {
    fn which(&self) -> String {
        if self.reused {
            format!("connection reused after {} responses", self.earlier)
        } else {
            "fresh connection".into()
        }
    }

    /// Counts a read's bytes, or classifies its end of stream or error.
    fn more(&mut self, r: io::Result<usize>) -> Result<(), Failure> {
        match r {
            Ok(0) if self.received == 0 && self.reused => Err(fail(
                FailKind::EofIdleKeepalive,
                format!("closed before any byte of the response ({})", self.which()),
            )),
            Ok(0) if self.received == 0 => Err(fail(
                FailKind::EofBeforeResponse,
                "closed before any byte of the response (fresh connection)",
            )),
            Ok(0) => Err(fail(
                FailKind::EofMidResponse,
                format!(
                    "closed after {} bytes of the response ({})",
                    self.received,
                    self.which()
                ),
            )),
            Ok(n) => {
                self.received += n as u64;
                Ok(())
            }
            Err(e) => {
                let k = io_kind(&e);
                let what = if k == FailKind::Timeout {
                    format!(
                        "no complete response within {} ms",
                        self.timeout.as_millis()
                    )
                } else {
                    e.to_string()
                };
                Err(fail(
                    k,
                    format!(
                        "{what}, after {} bytes of the response ({})",
                        self.received,
                        self.which()
                    ),
                ))
            }
        }
    }
}

/// What the checks need from a response head.
struct Head {
    status: u16,
    reason: String,
    len: Option<u64>,
    /// The server closes after this response.
    close: bool,
}

impl Head {
    fn of(resp: &httparse::Response<'_, '_>) -> Result<Head, Failure> {
        let mut h = Head {
            status: resp.code.unwrap_or(0),
            reason: resp.reason.unwrap_or("").to_owned(),
            len: None,
            // HTTP/1.0 closes unless it says otherwise; we never ask for 1.0.
            close: resp.version == Some(0),
        };
        for f in resp.headers.iter() {
            if f.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(f.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        fail(
                            FailKind::Protocol,
                            format!("bad Content-Length {:?}", String::from_utf8_lossy(f.value)),
                        )
                    })?;
                if h.len.is_some_and(|l| l != v) {
                    return Err(fail(
                        FailKind::Protocol,
                        "conflicting Content-Length headers",
                    ));
                }
                h.len = Some(v);
            } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(fail(
                    FailKind::Protocol,
                    "Transfer-Encoding in the response (hf-load reads Content-Length bodies only)",
                ));
            } else if f.name.eq_ignore_ascii_case("connection") {
                let closes = f
                    .value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                let keeps = f
                    .value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"keep-alive"));
                h.close = closes || (h.close && !keeps);
            }
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server for one connection at a time, each run by the next script.
    fn server(scripts: Vec<Box<dyn FnOnce(TcpStream) + Send>>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for script in scripts {
                let (s, _) = l.accept().unwrap();
                script(s);
            }
        });
        addr
    }

    fn read_request(s: &mut TcpStream) {
        let mut got = Vec::new();
        let mut b = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "client closed before its request");
            got.extend_from_slice(&b[..n]);
        }
    }

    fn ok_head(len: usize) -> String {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n")
    }

    const BODY: &[u8] = b"hello, world";

    fn get(conn: &mut Option<Conn>, addr: SocketAddr, close: bool) -> Result<Done, Failure> {
        let f = FileSpec::of_bytes("/x", BODY);
        let req = request_bytes(&f, "t", close);
        fetch(
            conn,
            addr,
            &f,
            &req,
            close,
            Duration::from_millis(300),
            Instant::now(),
        )
    }

    fn kind(r: Result<Done, Failure>) -> FailKind {
        match r {
            Ok(_) => panic!("request succeeded"),
            Err(f) => {
                eprintln!("{:?}: {}", f.kind, f.detail);
                f.kind
            }
        }
    }

    #[test]
    fn keep_alive_then_idle_close() {
        let addr = server(vec![Box::new(|mut s| {
            for _ in 0..2 {
                read_request(&mut s);
                s.write_all(ok_head(BODY.len()).as_bytes()).unwrap();
                // In two pieces, to exercise the body loop.
                s.write_all(&BODY[..3]).unwrap();
                std::thread::sleep(Duration::from_millis(5));
                s.write_all(&BODY[3..]).unwrap();
            }
            read_request(&mut s);
        })]);
        let mut c = None;
        assert_eq!(get(&mut c, addr, false).ok().unwrap().body_bytes, 12);
        assert!(get(&mut c, addr, false).is_ok());
        assert_eq!(c.as_ref().unwrap().responses, 2);
        assert_eq!(kind(get(&mut c, addr, false)), FailKind::EofIdleKeepalive);
        assert!(c.is_none(), "a failed connection is dropped");
    }

    #[test]
    fn wrong_answers_are_classified() {
        let answer = |bytes: Vec<u8>| -> Box<dyn FnOnce(TcpStream) + Send> {
            Box::new(move |mut s| {
                read_request(&mut s);
                s.write_all(&bytes).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            })
        };
        let mut extra = ok_head(BODY.len()).into_bytes();
        extra.extend_from_slice(BODY);
        extra.extend_from_slice(b"world");
        let mut wrong = ok_head(BODY.len()).into_bytes();
        wrong.extend_from_slice(b"hello, World");
        let addr = server(vec![
            answer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec()),
            answer(format!("{}hello", ok_head(5)).into_bytes()),
            answer(wrong),
            answer(extra),
            answer(format!("{}hello", ok_head(BODY.len())).into_bytes()),
            answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
            answer(b"garbage\r\n\r\n".to_vec()),
            answer(Vec::new()),
        ]);
        for want in [
            FailKind::Status,
            FailKind::BodySize,
            FailKind::BodyChecksum,
            FailKind::Protocol,
            FailKind::EofMidResponse,
            FailKind::Protocol,
            FailKind::Protocol,
            FailKind::EofBeforeResponse,
        ] {
            assert_eq!(kind(get(&mut None, addr, false)), want);
        }
    }

    #[test]
    fn reset_timeout_and_connect_errors() {
        let addr = server(vec![
            Box::new(|mut s| {
                read_request(&mut s);
                s.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
                rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).unwrap();
            }),
            Box::new(|mut s| {
                read_request(&mut s);
                std::thread::sleep(Duration::from_millis(600));
            }),
        ]);
        assert_eq!(kind(get(&mut None, addr, false)), FailKind::Reset);
        assert_eq!(kind(get(&mut None, addr, false)), FailKind::Timeout);
        let gone = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(kind(get(&mut None, gone, false)), FailKind::Connect);
    }

    #[test]
    fn close_mode_wants_a_clean_close() {
        let full = || {
            let mut v = ok_head(BODY.len()).into_bytes();
            v.extend_from_slice(BODY);
            v
        };
        let (a, b) = (full(), full());
        let addr = server(vec![
            Box::new(move |mut s| {
                read_request(&mut s);
                s.write_all(&a).unwrap();
            }),
            Box::new(move |mut s| {
                read_request(&mut s);
                s.write_all(&b).unwrap();
                std::thread::sleep(Duration::from_millis(700));
            }),
        ]);
        let mut c = None;
        assert!(get(&mut c, addr, true).is_ok());
        assert!(c.is_none(), "connection per request");
        assert_eq!(kind(get(&mut c, addr, true)), FailKind::NoClose);
    }
}
