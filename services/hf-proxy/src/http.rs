//! HTTP/1.1 as a forward proxy sees it: request and response heads (parsed
//! with httparse), their rewriting for the next hop, body framing, and a
//! chunked-body parser whose state fits in a commit's state blob.
//!
//! Everything here is a pure function of the bytes it is given. That is what
//! recovery rests on: a worker taking over after a crash reads the same
//! request and the same upstream bytes again, rewrites them into the same
//! bytes, and holdfast checks the regenerated output against what the client
//! (and, for requests, the origin) already has.

use std::fmt;
use std::net::Ipv6Addr;
use std::ops::Range;

/// Largest request or response head accepted (431 or 502 beyond).
pub const MAX_HEAD: usize = 64 * 1024;
/// httparse fills a fixed header array; more headers than this get 431.
const MAX_HEADERS: usize = 128;
/// Longest `host:port` accepted: it goes into the connection's state blob.
pub const MAX_AUTHORITY: usize = 255;
/// The `Via` entry added to requests and responses.
const VIA: &[u8] = b"Via: 1.1 hf-proxy\r\n";
/// What this proxy answers itself to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// The answer to a `CONNECT` whose tunnel is open.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\nVia: 1.1 hf-proxy\r\n\r\n";

/// Header fields that concern one connection only (RFC 9110 §7.6.1), never
/// forwarded; `Transfer-Encoding` is set again by the proxy where a body is
/// chunked.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The answers the proxy makes up itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    BadRequest,
    PayloadTooLarge,
    HeadersTooLarge,
    Internal,
    NotImplemented,
    BadGateway,
    GatewayTimeout,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::BadRequest,
        Status::PayloadTooLarge,
        Status::HeadersTooLarge,
        Status::Internal,
        Status::NotImplemented,
        Status::BadGateway,
        Status::GatewayTimeout,
    ];

    pub fn code(self) -> u16 {
        match self {
            Status::BadRequest => 400,
            Status::PayloadTooLarge => 413,
            Status::HeadersTooLarge => 431,
            Status::Internal => 500,
            Status::NotImplemented => 501,
            Status::BadGateway => 502,
            Status::GatewayTimeout => 504,
        }
    }

    pub fn from_code(code: u16) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.code() == code)
    }

    fn reason(self) -> &'static str {
        match self {
            Status::BadRequest => "Bad Request",
            Status::PayloadTooLarge => "Payload Too Large",
            Status::HeadersTooLarge => "Request Header Fields Too Large",
            Status::Internal => "Internal Server Error",
            Status::NotImplemented => "Not Implemented",
            Status::BadGateway => "Bad Gateway",
            Status::GatewayTimeout => "Gateway Timeout",
        }
    }

    /// The whole answer; the connection closes after it.
    pub fn response(self) -> Vec<u8> {
        let body = format!("{} {}\n", self.code(), self.reason());
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.code(),
            self.reason(),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(VIA);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
        out
    }
}

/// `host:port` of an origin. The host is kept as written (a name, an IPv4
/// address, or an IPv6 address without its brackets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    host: String,
    port: u16,
}

impl Authority {
    /// Parses `host[:port]` or `[v6]:port`; `default_port` applies when no
    /// port is given (`None`: a port is required, as in `CONNECT`).
    pub fn parse(s: &str, default_port: Option<u16>) -> Option<Authority> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (v6, after) = rest.split_once(']')?;
            v6.parse::<Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                a => Some(a.strip_prefix(':')?),
            };
            (v6, port)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            Some(p) => parse_port(p)?,
            None => default_port?,
        };
        let name_ok = |h: &str| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        };
        if !(host.contains(':') || name_ok(host)) {
            return None;
        }
        let a = Authority {
            host: host.to_owned(),
            port,
        };
        (a.to_string().len() <= MAX_AUTHORITY).then_some(a)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok().filter(|p| *p != 0)
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `GET http://host:port/path`: forwarded as `GET /path` with `Host`
    /// set to the URI's authority, as written.
    Origin {
        authority: Authority,
        host_header: String,
        path: String,
    },
    /// `CONNECT host:port`: a tunnel.
    Tunnel(Authority),
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

/// A request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: Target,
    pub http10: bool,
    headers: Vec<(String, Vec<u8>)>,
    /// Lower-cased names listed in `Connection`.
    connection: Vec<String>,
    /// Bytes of the head, up to and including the empty line.
    pub head_len: usize,
    pub body: Framing,
    /// The client lets the connection stay open after the answer.
    pub keep_alive: bool,
    /// `Expect: 100-continue`, answered by the proxy itself.
    pub expect_continue: bool,
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is
/// incomplete, the status to answer with if it is unacceptable.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, Status> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut hs);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            return Err(Status::HeadersTooLarge)
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Status::HeadersTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Status::BadRequest),
    };
    let (Some(method), Some(path), Some(version)) = (r.method, r.path, r.version) else {
        return Err(Status::BadRequest);
    };
    let http10 = version == 0;
    let headers = owned_headers(r.headers);
    let connection = tokens(&headers, "connection");
    let target = if method == "CONNECT" {
        Target::Tunnel(Authority::parse(path, None).ok_or(Status::BadRequest)?)
    } else {
        parse_absolute(path)?
    };
    let te = tokens(&headers, "transfer-encoding");
    let cl = content_length(&headers).ok_or(Status::BadRequest)?;
    let body = match (te.as_slice(), cl) {
        ([], None) => Framing::None,
        ([], Some(n)) => Framing::Length(n),
        // A length next to a transfer coding smells of request smuggling;
        // HTTP/1.0 has no transfer codings.
        (_, Some(_)) => return Err(Status::BadRequest),
        (_, None) if http10 => return Err(Status::BadRequest),
        ([c], None) if c == "chunked" => Framing::Chunked,
        (cs, None) if cs.last().is_some_and(|c| c == "chunked") => {
            return Err(Status::NotImplemented)
        }
        (_, None) => return Err(Status::BadRequest),
    };
    if matches!(target, Target::Tunnel(_)) && !matches!(body, Framing::None | Framing::Length(0)) {
        return Err(Status::BadRequest);
    }
    let expect_continue = !http10
        && headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case(b"100-continue")
        });
    Ok(Some(Request {
        method: method.to_owned(),
        target,
        http10,
        // HTTP/1.0 keeps the connection only when the client asks
        // (`Connection: keep-alive`), HTTP/1.1 unless it says `close`.
        keep_alive: !connection.iter().any(|t| t == "close")
            && (!http10 || connection.iter().any(|t| t == "keep-alive")),
        headers,
        connection,
        head_len,
        body,
        expect_continue,
    }))
}

/// `http://authority/path?query` → the origin and the origin-form target.
fn parse_absolute(t: &str) -> Result<Target, Status> {
    let rest = match t.get(..7) {
        Some(s) if s.eq_ignore_ascii_case("http://") => &t[7..],
        // Another scheme (https://...): understood, not done here.
        _ if t.contains("://") => return Err(Status::NotImplemented),
        _ => return Err(Status::BadRequest),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (host_header, tail) = rest.split_at(end);
    // No user info: it has no place in a request to an origin.
    let authority = Authority::parse(host_header, Some(80)).ok_or(Status::BadRequest)?;
    let tail = tail.split('#').next().unwrap_or_default();
    let path = if tail.starts_with('/') {
        tail.to_owned()
    } else {
        format!("/{tail}")
    };
    Ok(Target::Origin {
        authority,
        host_header: host_header.to_owned(),
        path,
    })
}

fn owned_headers(hs: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    hs.iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect()
}

/// The comma-separated, lower-cased tokens of every `name` field.
fn tokens(headers: &[(String, Vec<u8>)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// `Some(None)` without `Content-Length`, `Some(Some(n))` with one valid
/// length (repeated identical values allowed), `None` if it is invalid.
fn content_length(headers: &[(String, Vec<u8>)]) -> Option<Option<u64>> {
    let mut len = None;
    for v in tokens(headers, "content-length") {
        if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = v.parse().ok()?;
        if len.is_some_and(|l| l != n) {
            return None;
        }
        len = Some(n);
    }
    Some(len)
}

/// Whether a field goes on to the next hop.
fn forwarded(name: &str, connection: &[String]) -> bool {
    !HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        && !connection.iter().any(|c| name.eq_ignore_ascii_case(c))
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl Request {
    /// The head sent to the origin: origin-form target, `Host` from the
    /// URI, hop-by-hop fields removed, `Via` added.
    pub fn rewrite(&self) -> Vec<u8> {
        let Target::Origin {
            host_header, path, ..
        } = &self.target
        else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(self.head_len + 64);
        out.extend_from_slice(format!("{} {path} HTTP/1.1\r\n", self.method).as_bytes());
        push_header(&mut out, "Host", host_header.as_bytes());
        for (n, v) in &self.headers {
            let expect = self.expect_continue && n.eq_ignore_ascii_case("expect");
            if forwarded(n, &self.connection) && !n.eq_ignore_ascii_case("host") && !expect {
                push_header(&mut out, n, v);
            }
        }
        if self.body == Framing::Chunked {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        out.extend_from_slice(VIA);
        out.extend_from_slice(b"\r\n");
        out
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// A response head from an origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    reason: String,
    http10: bool,
    headers: Vec<(String, Vec<u8>)>,
    connection: Vec<String>,
    pub head_len: usize,
}

/// Parses the response head at the start of `buf`: `Ok(None)` while it is
/// incomplete, `Err` if it is malformed or too large.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, String> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut hs);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(_) => return Err("response head too large".into()),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let (Some(code), Some(version)) = (r.code, r.version) else {
        return Err("malformed response head".into());
    };
    let headers = owned_headers(r.headers);
    Ok(Some(Response {
        code,
        reason: r.reason.unwrap_or_default().to_owned(),
        http10: version == 0,
        connection: tokens(&headers, "connection"),
        headers,
        head_len,
    }))
}

impl Response {
    /// 1xx other than 101: forwarded (to HTTP/1.1 clients), then the real
    /// answer follows.
    pub fn interim(&self) -> bool {
        (100..200).contains(&self.code) && self.code != 101
    }

    /// How the body is delimited (RFC 9112 §6.3), given whether the request
    /// was a `HEAD`.
    pub fn framing(&self, head_request: bool) -> Result<Framing, String> {
        if head_request || self.code < 200 || self.code == 204 || self.code == 304 {
            return Ok(Framing::None);
        }
        let te = tokens(&self.headers, "transfer-encoding");
        if !te.is_empty() {
            let chunked = te.last().is_some_and(|c| c == "chunked") && !self.http10;
            return Ok(if chunked {
                Framing::Chunked
            } else {
                Framing::Close
            });
        }
        match content_length(&self.headers) {
            Some(Some(n)) => Ok(Framing::Length(n)),
            Some(None) => Ok(Framing::Close),
            None => Err("invalid Content-Length in the response".into()),
        }
    }

    /// The origin lets the connection serve another request after this one.
    pub fn reusable(&self, framing: Framing) -> bool {
        !self.http10 && !self.connection.iter().any(|t| t == "close") && framing != Framing::Close
    }

    /// The head sent to the client: hop-by-hop fields removed (and a
    /// `Content-Length` that a transfer coding overrides), `chunked` set
    /// again if the body is relayed chunked, `Connection: close` if the
    /// proxy closes after it — or `Connection: keep-alive` for an HTTP/1.0
    /// client whose connection stays open (`keep_10`) — `Via` added.
    pub fn rewrite(&self, chunked: bool, close: bool, keep_10: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head_len + 64);
        out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", self.code, self.reason).as_bytes());
        let coded = !tokens(&self.headers, "transfer-encoding").is_empty();
        for (n, v) in &self.headers {
            let overridden = coded && n.eq_ignore_ascii_case("content-length");
            if forwarded(n, &self.connection) && !overridden {
                push_header(&mut out, n, v);
            }
        }
        if chunked {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if keep_10 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(VIA);
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Where a chunked-body parser stands (RFC 9112 §7.1). Small and plain, so
/// a checkpoint can save it in the middle of a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunked {
    /// Reading the hex size; `digits` so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// Skipping a chunk extension up to CR.
    Ext {
        size: u64,
    },
    /// CR seen after the size line, LF expected.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

/// A chunked body that breaks the grammar.
#[derive(Debug, PartialEq, Eq)]
pub struct BadChunk;

impl Chunked {
    pub const START: Chunked = Chunked::Size { size: 0, digits: 0 };

    /// Parses `input`, the next bytes of a chunked body; returns how many of
    /// them belong to the body (all, unless it ends inside `input`) and
    /// calls `data` with the ranges that are chunk data.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(Range<usize>),
    ) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < input.len() && *self != Chunked::Done {
            if let Chunked::Data { left } = *self {
                let n = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                data(i..i + n);
                i += n;
                let left = left - n as u64;
                *self = if left == 0 {
                    Chunked::DataCr
                } else {
                    Chunked::Data { left }
                };
                continue;
            }
            *self = self.step(input[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn step(self, b: u8) -> Result<Chunked, BadChunk> {
        use Chunked::*;
        Ok(match (self, b) {
            (Size { size, digits }, _) if (b as char).is_ascii_hexdigit() => {
                if digits >= 15 {
                    return Err(BadChunk);
                }
                let d = (b as char).to_digit(16).unwrap_or(0);
                Size {
                    size: size * 16 + u64::from(d),
                    digits: digits + 1,
                }
            }
            (Size { size, digits }, b';' | b' ' | b'\t') if digits > 0 => Ext { size },
            (Size { size, digits }, b'\r') if digits > 0 => SizeLf { size },
            (Ext { size }, b'\r') => SizeLf { size },
            (Ext { .. }, b'\n') => return Err(BadChunk),
            (Ext { size }, _) => Ext { size },
            (SizeLf { size: 0 }, b'\n') => TrailerStart,
            (SizeLf { size }, b'\n') => Data { left: size },
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Chunked::START,
            (TrailerStart, b'\r') => FinalLf,
            (Trailer, b'\r') => TrailerLf,
            (TrailerStart | Trailer, b'\n') => return Err(BadChunk),
            (TrailerStart | Trailer, _) => Trailer,
            (TrailerLf, b'\n') => TrailerStart,
            (FinalLf, b'\n') => Done,
            _ => return Err(BadChunk),
        })
    }
}

/// Where a body being relayed stands: saved with every checkpoint, so the
/// next worker goes on from the same byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    Length {
        left: u64,
    },
    /// `dechunk`: the client speaks HTTP/1.0 and gets the data only.
    Chunked {
        state: Chunked,
        dechunk: bool,
    },
    Close,
}

impl Body {
    /// The body state at its start; `None` if there is no body.
    pub fn start(framing: Framing, dechunk: bool) -> Option<Body> {
        match framing {
            Framing::None | Framing::Length(0) => None,
            Framing::Length(left) => Some(Body::Length { left }),
            Framing::Chunked => Some(Body::Chunked {
                state: Chunked::START,
                dechunk,
            }),
            Framing::Close => Some(Body::Close),
        }
    }

    /// At most this many of the next bytes can belong to the body.
    pub fn limit(&self, room: usize) -> usize {
        match self {
            Body::Length { left } => usize::try_from(*left).unwrap_or(usize::MAX).min(room),
            _ => room,
        }
    }

    pub fn done(&self) -> bool {
        matches!(
            self,
            Body::Length { left: 0 }
                | Body::Chunked {
                    state: Chunked::Done,
                    ..
                }
        )
    }

    /// Takes `input`, the next bytes of the stream: returns how many belong
    /// to the body and calls `out` with the ranges to pass on.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut out: impl FnMut(Range<usize>),
    ) -> Result<usize, BadChunk> {
        match self {
            Body::Length { left } => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                *left -= n as u64;
                out(0..n);
                Ok(n)
            }
            Body::Chunked { state, dechunk } => {
                let dechunk = *dechunk;
                let mut ranges = Vec::new();
                let n = state.feed(input, |r| ranges.push(r))?;
                if dechunk {
                    ranges.into_iter().filter(|r| !r.is_empty()).for_each(out);
                } else {
                    out(0..n);
                }
                Ok(n)
            }
            Body::Close => {
                out(0..input.len());
                Ok(input.len())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(s: &str) -> Result<Option<Request>, Status> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn absolute_form_is_rewritten_to_origin_form() {
        let r = req("GET http://Example.com:8080/a/b?q=1 HTTP/1.1\r\nHost: wrong\r\n\
                     Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nProxy-Connection: keep-alive\r\n\
                     Proxy-Authorization: Basic x\r\nTE: trailers\r\nUpgrade: h2c\r\nAccept: */*\r\n\r\n")
        .unwrap()
        .unwrap();
        assert!(r.keep_alive);
        let Target::Origin { authority, .. } = &r.target else {
            panic!("not an origin request")
        };
        assert_eq!(authority.to_string(), "Example.com:8080");
        assert_eq!(
            String::from_utf8(r.rewrite()).unwrap(),
            "GET /a/b?q=1 HTTP/1.1\r\nHost: Example.com:8080\r\nAccept: */*\r\nVia: 1.1 hf-proxy\r\n\r\n"
        );
    }

    #[test]
    fn path_defaults_to_slash_and_port_to_80() {
        let r = req("GET http://h?x HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive);
        assert!(String::from_utf8(r.rewrite())
            .unwrap()
            .starts_with("GET /?x HTTP/1.1\r\nHost: h\r\n"));
        let Target::Origin { authority, .. } = r.target else {
            panic!()
        };
        assert_eq!((authority.host(), authority.port()), ("h", 80));
    }

    #[test]
    fn bad_requests_are_refused() {
        for (raw, want) in [
            ("GET /local HTTP/1.1\r\n\r\n", Status::BadRequest),
            ("GET https://h/ HTTP/1.1\r\n\r\n", Status::NotImplemented),
            ("GET http://u@h/ HTTP/1.1\r\n\r\n", Status::BadRequest),
            ("GET http:///x HTTP/1.1\r\n\r\n", Status::BadRequest),
            ("GET http://h:99999/ HTTP/1.1\r\n\r\n", Status::BadRequest),
            ("CONNECT h HTTP/1.1\r\n\r\n", Status::BadRequest),
            ("CONNECT [::1 HTTP/1.1\r\n\r\n", Status::BadRequest),
            ("GARBAGE\r\n\r\n", Status::BadRequest),
            (
                "POST http://h/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                Status::BadRequest,
            ),
            (
                "POST http://h/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                Status::BadRequest,
            ),
            (
                "POST http://h/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",
                Status::BadRequest,
            ),
            (
                "POST http://h/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Status::NotImplemented,
            ),
            (
                "POST http://h/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                Status::BadRequest,
            ),
        ] {
            assert_eq!(req(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn oversized_heads_get_431() {
        let mut raw = b"GET http://h/ HTTP/1.1\r\nX: ".to_vec();
        raw.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse_request(&raw), Err(Status::HeadersTooLarge));
        assert_eq!(parse_request(&raw[..1000]), Ok(None));
    }

    #[test]
    fn connect_and_ipv6_authorities() {
        let r = req("CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            r.target,
            Target::Tunnel(Authority::parse("[::1]:443", None).unwrap())
        );
        let Target::Tunnel(a) = r.target else {
            panic!()
        };
        assert_eq!(
            (a.host(), a.port(), a.to_string().as_str()),
            ("::1", 443, "[::1]:443")
        );
        assert_eq!(Authority::parse("[::1]x", Some(80)), None);
        assert_eq!(
            Authority::parse("[::1]", Some(80)).map(|a| a.to_string()),
            Some("[::1]:80".into())
        );
    }

    #[test]
    fn expect_continue_is_answered_here_not_forwarded() {
        let r = req(
            "PUT http://h/x HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(r.expect_continue);
        assert_eq!(r.body, Framing::Chunked);
        assert_eq!(
            String::from_utf8(r.rewrite()).unwrap(),
            "PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nVia: 1.1 hf-proxy\r\n\r\n"
        );
    }

    fn resp(s: &str) -> Response {
        parse_response(s.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn response_framing() {
        let r = resp("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(r.framing(false), Ok(Framing::Length(5)));
        assert_eq!(r.framing(true), Ok(Framing::None));
        assert!(r.reusable(Framing::Length(5)));
        let r = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(r.framing(false), Ok(Framing::Chunked));
        assert_eq!(
            String::from_utf8(r.rewrite(true, false, false)).unwrap(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nVia: 1.1 hf-proxy\r\n\r\n"
        );
        let r = resp("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        assert_eq!(r.framing(false), Ok(Framing::Close));
        assert!(!r.reusable(Framing::Length(1)));
        assert_eq!(
            resp("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n").framing(false),
            Ok(Framing::None)
        );
        assert!(resp("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
            .framing(false)
            .is_err());
        assert!(resp("HTTP/1.1 100 Continue\r\n\r\n").interim());
        assert!(!resp("HTTP/1.1 101 Switching Protocols\r\n\r\n").interim());
        assert!(parse_response(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies() {
        let raw = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let mut c = Chunked::START;
        let mut data = Vec::new();
        let n = c.feed(raw, |r| data.extend_from_slice(&raw[r])).unwrap();
        assert_eq!(c, Chunked::Done);
        assert_eq!(&raw[n..], b"NEXT");
        assert_eq!(data, b"hello world");
        for bad in [
            &b"x\r\n"[..],
            b"5\n",
            b"3\r\nabcX",
            b"0\r\n\n",
            b"fffffffffffffffff\r\n",
        ] {
            let mut c = Chunked::START;
            assert_eq!(c.feed(bad, |_| {}), Err(BadChunk), "{bad:?}");
        }
    }

    fn chunked_encoding(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts.iter().filter(|p| !p.is_empty()) {
            out.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    proptest! {
        /// Fed in any pieces, with its state saved in between, the parser
        /// finds the same end and the same data as in one go.
        #[test]
        fn chunked_parser_is_resumable(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
            cuts in proptest::collection::vec(1usize..17, 1..40),
        ) {
            let mut raw = chunked_encoding(&parts);
            let body_len = raw.len();
            raw.extend_from_slice(b"GET");
            let mut body = Body::Chunked { state: Chunked::START, dechunk: true };
            let (mut pos, mut data) = (0, Vec::new());
            for c in cuts.iter().cycle() {
                if body.done() || pos == raw.len() {
                    break;
                }
                let end = (pos + c).min(raw.len());
                let piece = &raw[pos..end];
                let n = body.feed(piece, |r| data.extend_from_slice(&piece[r])).unwrap();
                pos += n;
            }
            prop_assert!(body.done());
            prop_assert_eq!(pos, body_len);
            prop_assert_eq!(data, parts.concat());
        }

        /// No input makes the parsers panic.
        #[test]
        fn parsers_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_request(&raw);
            let _ = parse_response(&raw);
            let _ = { Chunked::START }.feed(&raw, |_| {});
            if let Ok(s) = std::str::from_utf8(&raw) {
                let _ = Authority::parse(s, Some(80));
            }
        }
    }
}
