//! A strict HTTP/1.1 client for tests: keep-alive, pipelining, bodies by
//! `Content-Length`, and errors that say whether the connection was reset or
//! cut short.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        Ok(Client { s, buf: Vec::new() })
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.s
    }

    pub fn send(&mut self, raw: &[u8]) -> io::Result<()> {
        self.s.write_all(raw)
    }

    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())?;
        self.read_response(false)
    }

    /// Reads one response (`head_only` for answers to HEAD).
    pub fn read_response(&mut self, head_only: bool) -> io::Result<Response> {
        let Client { s, buf } = self;
        parse_one(buf, head_only, |buf| {
            let mut chunk = [0u8; 65536];
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-response",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        })
    }

    /// Wraps an already connected stream.
    pub fn from_stream(s: TcpStream) -> io::Result<Client> {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        Ok(Client { s, buf: Vec::new() })
    }
}

/// Splits a captured byte stream into responses (`head_only[i]` for an
/// answer to HEAD); an error if any is malformed or cut short, or if bytes
/// are left over.
pub fn parse_all(raw: &[u8], head_only: &[bool]) -> io::Result<Vec<Response>> {
    let mut buf = raw.to_vec();
    let mut out = Vec::new();
    for (i, &h) in head_only.iter().enumerate() {
        let r = parse_one(&mut buf, h, |_| {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ends inside response {i}"),
            ))
        })?;
        out.push(r);
    }
    if !buf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes after the last response", buf.len()),
        ));
    }
    Ok(out)
}

/// Takes one response off the front of `buf`, calling `fill` for more.
fn parse_one(
    buf: &mut Vec<u8>,
    head_only: bool,
    mut fill: impl FnMut(&mut Vec<u8>) -> io::Result<()>,
) -> io::Result<Response> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        fill(buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(proto), Some(code)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad status line {status_line:?}"),
        ));
    };
    if !proto.starts_with("HTTP/1.") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad status line {status_line:?}"),
        ));
    }
    let status = code
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad status code"))?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    buf.drain(..end);
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked && !head_only {
        let body = dechunk(buf, &mut fill)?;
        return Ok(Response {
            status,
            headers,
            body,
        });
    }
    let len: usize = if head_only {
        0
    } else {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Content-Length"))?
    };
    while buf.len() < len {
        fill(buf)?;
    }
    let body = buf.drain(..len).collect();
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Takes a chunked body (RFC 9112 7.1, no trailers) off the front of `buf`.
fn dechunk(
    buf: &mut Vec<u8>,
    fill: &mut impl FnMut(&mut Vec<u8>) -> io::Result<()>,
) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if buf.len() > 64 {
                return Err(bad("chunk size line too long"));
            }
            fill(buf)?;
        };
        let size = std::str::from_utf8(&buf[..line_end])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| bad("bad chunk size"))?;
        while buf.len() < line_end + 2 + size + 2 {
            fill(buf)?;
        }
        if &buf[line_end + 2 + size..line_end + 4 + size] != b"\r\n" {
            return Err(bad("chunk not followed by CRLF"));
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..line_end + 4 + size);
        if size == 0 {
            return Ok(body);
        }
    }
}

/// Deterministic content for test files.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes files of varied sizes into `dir`; returns (url path, content).
pub fn make_site(dir: &Path, sizes: &[usize]) -> Vec<(String, Vec<u8>)> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let name = format!("f{i}-{len}.bin");
            let data = content(len, i as u64 + 1);
            std::fs::write(dir.join(&name), &data).expect("write test file");
            (format!("/{name}"), data)
        })
        .collect()
}
