//! HTTP/1.1 protocol logic for hf-httpd: request-head parsing, target → file
//! resolution and response-head formatting. Pure functions over byte buffers
//! and paths, no sockets, so every edge case is unit-testable and no input can
//! make the server panic.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Largest request head we accept. Heads are tiny for a static-file server;
/// capping them bounds both buffer memory and re-parse work per read.
pub const MAX_HEAD: usize = 16 * 1024;
/// httparse needs a fixed header array; more headers than this gets 431.
const MAX_HEADERS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Only for CGI programs.
    Post,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Origin-form target (`/path?query`), still percent-encoded.
    pub target: String,
    pub keep_alive: bool,
    pub http10: bool,
    /// Request body length (only CGI requests may have one).
    pub content_length: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// Need more bytes (only returned while `buf.len() < MAX_HEAD`).
    Incomplete,
    /// `len` = bytes of this request head in `buf`; bodies are never accepted.
    Complete { req: Request, len: usize },
    /// Answer with `status` after consuming `len` bytes. `close` is set when
    /// the stream cannot be resynchronised (malformed or unread body) or the
    /// client asked to close.
    Error {
        status: Status,
        len: usize,
        close: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    /// The request head did not arrive within the header timeout.
    RequestTimeout,
    PayloadTooLarge,
    LengthRequired,
    BadGateway,
    HeaderTooLarge,
    InternalError,
    /// The server lacks a resource for now (a descriptor to open the file).
    ServiceUnavailable,
    VersionNotSupported,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::PayloadTooLarge => 413,
            Status::LengthRequired => 411,
            Status::BadGateway => 502,
            Status::HeaderTooLarge => 431,
            Status::InternalError => 500,
            Status::ServiceUnavailable => 503,
            Status::VersionNotSupported => 505,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::Forbidden => "Forbidden",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::PayloadTooLarge => "Payload Too Large",
            Status::LengthRequired => "Length Required",
            Status::BadGateway => "Bad Gateway",
            Status::HeaderTooLarge => "Request Header Fields Too Large",
            Status::InternalError => "Internal Server Error",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// Parses one request head from the front of `buf`.
#[cfg(test)]
pub fn parse(buf: &[u8]) -> Parse {
    parse_with(buf, None)
}

/// [`parse`], where requests for targets under `cgi_prefix` (when given)
/// may be POSTs and carry a body of known length; the body is not part of
/// `len`.
pub fn parse_with(buf: &[u8], cgi_prefix: Option<&str>) -> Parse {
    // Never look past MAX_HEAD: a head that is not finished within it is
    // rejected, and a completed one is guaranteed to be <= MAX_HEAD.
    let window = buf.get(..MAX_HEAD).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    let fatal = |status| Parse::Error {
        status,
        len: head_end(window).unwrap_or(buf.len()),
        close: true,
    };
    let len = match r.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return fatal(Status::HeaderTooLarge)
        }
        Ok(httparse::Status::Partial) => return Parse::Incomplete,
        Err(httparse::Error::TooManyHeaders) => return fatal(Status::HeaderTooLarge),
        Err(httparse::Error::Version) if looks_like_http_version(window) => {
            return fatal(Status::VersionNotSupported)
        }
        Err(_) => return fatal(Status::BadRequest),
    };
    // Complete implies method, path and version are all present.
    let (Some(method), Some(path), Some(version)) = (r.method, r.path, r.version) else {
        return fatal(Status::BadRequest);
    };
    let http10 = version == 0;

    let (mut close_hdr, mut keep_hdr, mut body, mut chunked) = (false, false, false, false);
    let mut content_length: Option<u64> = None;
    let mut hosts = 0;
    for h in r.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            for tok in h.value.split(|&b| b == b',') {
                let tok = tok.trim_ascii();
                close_hdr |= tok.eq_ignore_ascii_case(b"close");
                keep_hdr |= tok.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            // Only plain digits; lists or conflicting duplicates are a request
            // smuggling vector, so they are rejected outright.
            let v = h.value.trim_ascii();
            let n = match std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            {
                Some(s) => s.parse::<u64>().ok(),
                None => None,
            };
            match (n, content_length) {
                (None, _) => return fatal(Status::BadRequest),
                (Some(n), Some(prev)) if n != prev => return fatal(Status::BadRequest),
                (Some(n), _) => content_length = Some(n),
            }
            body |= content_length.unwrap_or(0) > 0;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            body = true;
            chunked = true;
        }
    }
    let keep_alive = if http10 {
        keep_hdr && !close_hdr
    } else {
        !close_hdr
    };
    // We never read bodies, so any declared body would be parsed as the next
    // request: the connection must close after answering.
    let error = |status| Parse::Error {
        status,
        len,
        close: body || !keep_alive,
    };

    // RFC 9112 3.2: an HTTP/1.1 request without Host, or any request with
    // more than one, is answered 400.
    if hosts > 1 || (hosts == 0 && !http10) {
        return error(Status::BadRequest);
    }
    let cgi = cgi_prefix.is_some_and(|p| origin_form(path).is_some_and(|t| t.starts_with(p)));
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" if cgi => Method::Post,
        _ => return error(Status::MethodNotAllowed),
    };
    if chunked && cgi {
        // A CGI program is told the body's length up front (RFC 3875 4.2).
        return error(Status::LengthRequired);
    }
    if body && !cgi {
        return error(Status::PayloadTooLarge);
    }
    let Some(target) = origin_form(path) else {
        return fatal(Status::BadRequest);
    };
    Parse::Complete {
        req: Request {
            method,
            target: target.to_owned(),
            keep_alive,
            http10,
            content_length: content_length.unwrap_or(0),
        },
        len,
    }
}

/// End of the head (after the blank line) if `buf` contains one; httparse
/// accepts bare-LF line endings, so both forms count.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        match (buf.get(i + 1), buf.get(i + 2)) {
            (Some(b'\n'), _) => Some(i + 2),
            (Some(b'\r'), Some(b'\n')) => Some(i + 3),
            _ => None,
        }
    })
}

/// Whether the request line ends in something shaped like `HTTP/<digit>...`,
/// i.e. a real but unsupported version (505) rather than garbage (400).
fn looks_like_http_version(buf: &[u8]) -> bool {
    let line = buf
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let tok = line.rsplit(|&b| b == b' ').next().unwrap_or(&[]);
    tok.len() > 5 && tok.starts_with(b"HTTP/") && tok.get(5).is_some_and(u8::is_ascii_digit)
}

/// Accepts origin-form as is and reduces absolute-form (`http://host/p`) to
/// its path, as RFC 9112 requires servers to accept both. `*` and
/// authority-form are meaningless for static files.
fn origin_form(path: &str) -> Option<&str> {
    if path.starts_with('/') {
        return Some(path);
    }
    let lower = path.get(..8).unwrap_or(path).to_ascii_lowercase();
    let skip = if lower.starts_with("http://") {
        7
    } else if lower.starts_with("https://") {
        8
    } else {
        return None;
    };
    let rest = path.get(skip..)?;
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    if auth_end == 0 {
        return None;
    }
    match rest.get(auth_end..)? {
        "" => Some("/"),
        // "http://host?q" has an empty path, which means "/"; we drop the
        // query since it cannot be served differently anyway.
        p if p.starts_with('?') => Some("/"),
        p => Some(p),
    }
}

/// Resolves a request target to a regular file under `root`, returning its
/// canonical path. Never returns a path outside root.
pub fn resolve(root: &Path, target: &str) -> Result<PathBuf, Status> {
    // Re-canonicalize root: cheap, and containment checks are only sound
    // against a canonical prefix.
    let root = root.canonicalize().map_err(|_| Status::InternalError)?;
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(Status::BadRequest);
    }
    let decoded = percent_decode(path.as_bytes()).ok_or(Status::BadRequest)?;
    // Normalise lexically *after* decoding so that %2e%2e and %2f cannot
    // smuggle a `..` segment past the check.
    let mut segs: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segs.pop().ok_or(Status::Forbidden)?;
            }
            s => segs.push(s),
        }
    }
    let mut p = root.clone();
    for s in segs {
        // Each segment is free of '/' and NUL, so it is a single normal
        // component; checked anyway as a belt-and-braces guard.
        let os = OsStr::from_bytes(s);
        if !matches!(
            Path::new(os).components().next(),
            Some(Component::Normal(_))
        ) {
            return Err(Status::BadRequest);
        }
        p.push(os);
    }
    let mut real = contained(&root, &p)?;
    if real.is_dir() {
        real = contained(&root, &real.join("index.html"))?;
    } else if path.ends_with('/') && path != "/" {
        // A file named as if it were a directory (`/file.bin/`): no such
        // directory.
        return Err(Status::NotFound);
    }
    // Only regular files: FIFOs or devices would block or misbehave.
    match std::fs::metadata(&real) {
        Ok(m) if m.is_file() => Ok(real),
        _ => Err(Status::NotFound),
    }
}

/// Canonicalizes `p` (following symlinks) and checks it stays under `root`.
pub(crate) fn contained(root: &Path, p: &Path) -> Result<PathBuf, Status> {
    let real = p.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => Status::Forbidden,
        _ => Status::NotFound,
    })?;
    if real.starts_with(root) {
        Ok(real)
    } else {
        Err(Status::Forbidden)
    }
}

/// Decodes %XX escapes; None for a malformed escape or a decoded NUL (which
/// would truncate the path at the OS boundary).
pub(crate) fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut it = s.iter().copied();
    while let Some(b) = it.next() {
        let b = if b == b'%' {
            hex(it.next()?)? << 4 | hex(it.next()?)?
        } else {
            b
        };
        if b == 0 {
            return None;
        }
        out.push(b);
    }
    Some(out)
}

pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(OsStr::to_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Head<'a> {
    pub status: Status,
    pub date_unix_secs: u64,
    pub content_length: u64,
    pub content_type: Option<&'a str>,
    pub last_modified_unix_secs: Option<u64>,
    pub keep_alive: bool,
    pub http10: bool,
    pub extra: &'a [(&'a str, &'a str)],
}

/// IMF-fixdate; clamped because httpdate panics past year 9999 and
/// `SystemTime + Duration` panics on overflow.
pub(crate) fn http_date(secs: u64) -> String {
    const MAX: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.min(MAX)))
}

/// The `Server` header's value (`--server-name`; default `hf-httpd`).
pub static SERVER_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The `Server` header's value.
pub(crate) fn server_name() -> &'static str {
    SERVER_NAME
        .get()
        .map(String::as_str)
        .filter(|v| safe_field(v))
        .unwrap_or("hf-httpd")
}

/// Appends a complete response head (ending in the blank line) to `out`.
pub fn write_head(head: &Head<'_>, out: &mut Vec<u8>) {
    use std::io::Write;
    let server = server_name();
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nServer: {server}\r\nDate: {}\r\n",
        head.status.code(),
        head.status.reason(),
        http_date(head.date_unix_secs)
    );
    if let Some(ct) = head.content_type.filter(|v| safe_field(v)) {
        let _ = write!(out, "Content-Type: {ct}\r\n");
    }
    let _ = write!(out, "Content-Length: {}\r\n", head.content_length);
    if let Some(lm) = head.last_modified_unix_secs {
        let _ = write!(out, "Last-Modified: {}\r\n", http_date(lm));
    }
    if !head.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if head.http10 {
        // HTTP/1.0 clients close by default; say explicitly that we don't.
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    // A 405 must carry Allow (RFC 9110 15.5.6); add it unless the caller did.
    if head.status == Status::MethodNotAllowed
        && !head
            .extra
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("allow"))
    {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    for (name, value) in head.extra {
        // Drop anything that would split the head (header injection).
        if safe_field(name) && safe_field(value) && !name.is_empty() {
            let _ = write!(out, "{name}: {value}\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn safe_field(s: &str) -> bool {
    !s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

/// A small HTML body for error responses.
pub fn error_body(status: Status) -> Vec<u8> {
    format!(
        "<html><body><h1>{} {}</h1></body></html>\n",
        status.code(),
        status.reason()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Parse::Complete { req, len } => (req, len),
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    fn err(buf: &[u8]) -> (Status, usize, bool) {
        match parse(buf) {
            Parse::Error { status, len, close } => (status, len, close),
            other => panic!("expected Error, got {other:?}"),
        }
    }

    #[test]
    fn simple_get_and_head() {
        let b = b"GET /index.html?x=1 HTTP/1.1\r\nHost: a\r\n\r\n";
        let (r, len) = ok(b);
        assert_eq!(len, b.len());
        assert_eq!(
            r,
            Request {
                method: Method::Get,
                target: "/index.html?x=1".into(),
                keep_alive: true,
                http10: false,
                content_length: 0,
            }
        );
        let (r, _) = ok(b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert_eq!((r.method, r.keep_alive), (Method::Head, false));
        // bare LF line endings are tolerated
        assert_eq!(ok(b"GET / HTTP/1.1\nHost: a\n\n").1, 24);
    }

    #[test]
    fn pipelined() {
        let first = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut buf = first.to_vec();
        buf.extend_from_slice(b"HEAD /b HTTP/1.1\r\nHost: a\r\n\r\n");
        let (r, len) = ok(&buf);
        assert_eq!((r.target.as_str(), len), ("/a", first.len()));
        let (r, len) = ok(&buf[len..]);
        assert_eq!(
            (r.target.as_str(), r.method, len),
            ("/b", Method::Head, buf.len() - first.len())
        );
    }

    #[test]
    fn incomplete_and_oversize() {
        assert_eq!(parse(b""), Parse::Incomplete);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Parse::Incomplete);
        let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(err(&big), (Status::HeaderTooLarge, big.len(), true));
        // complete but too large is rejected too
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(err(&big).0, Status::HeaderTooLarge);
        let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..70 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(err(&many), (Status::HeaderTooLarge, many.len(), true));
    }

    #[test]
    fn methods_and_bodies() {
        let b = b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\nGET";
        assert_eq!(err(b), (Status::MethodNotAllowed, b.len() - 3, false));
        let b = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(err(b), (Status::MethodNotAllowed, b.len() - 5, true));
        let b = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(err(b).2);
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc").0,
            Status::PayloadTooLarge
        );
        assert!(
            ok(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
                .0
                .keep_alive
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n").0,
            Status::BadRequest
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 2\r\n\r\n"),
            (Status::BadRequest, 65, true)
        );
    }

    #[test]
    fn cgi_requests_may_carry_a_body() {
        let cgi = Some("/cgi-bin/");
        let b = b"POST /cgi-bin/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        match parse_with(b, cgi) {
            Parse::Complete { req, len } => {
                assert_eq!((req.method, req.content_length), (Method::Post, 5));
                assert_eq!(len, b.len() - 5);
            }
            other => panic!("{other:?}"),
        }
        let b = b"POST /cgi-bin/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(
            parse_with(b, cgi),
            Parse::Error {
                status: Status::LengthRequired,
                close: true,
                ..
            }
        ));
        // Outside the CGI directory nothing changes.
        let b = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_with(b, cgi), parse(b));
        // Without CGI, a POST to /cgi-bin/ is refused like any other.
        let b = b"POST /cgi-bin/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        assert!(matches!(
            parse(b),
            Parse::Error {
                status: Status::MethodNotAllowed,
                ..
            }
        ));
    }

    #[test]
    fn keep_alive_rules() {
        let (r, _) = ok(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!((r.http10, r.keep_alive), (true, false));
        assert!(
            ok(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !ok(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            ok(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !ok(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, CLOSE\r\n\r\n")
                .0
                .keep_alive
        );
        // an error on a non-keep-alive request closes
        assert!(err(b"PUT / HTTP/1.0\r\n\r\n").2);
    }

    #[test]
    fn malformed_and_versions() {
        for b in [
            &b"\x00\x01garbage\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
            b"GET /\r\n\r\n",
        ] {
            assert_eq!(
                err(b).0,
                Status::BadRequest,
                "{:?}",
                String::from_utf8_lossy(b)
            );
            assert!(err(b).2);
        }
        assert_eq!(
            err(b"GET / HTTP/2.0\r\n\r\n"),
            (Status::VersionNotSupported, 18, true)
        );
        assert_eq!(err(b"GET / HTTP/2").0, Status::VersionNotSupported);
        assert_eq!(
            err(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").0,
            Status::VersionNotSupported
        );
        assert_eq!(err(b"GET / FOO/1.1\r\n\r\n").0, Status::BadRequest);
        assert_eq!(
            err(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").0,
            Status::MethodNotAllowed
        );
        assert_eq!(
            err(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"),
            (Status::BadRequest, 27, true)
        );
        assert_eq!(
            err(b"GET example.com:80 HTTP/1.1\r\nHost: a\r\n\r\n").0,
            Status::BadRequest
        );
    }

    #[test]
    fn absolute_form() {
        assert_eq!(
            ok(b"GET http://h:8/a/b?q HTTP/1.1\r\nHost: a\r\n\r\n")
                .0
                .target,
            "/a/b?q"
        );
        assert_eq!(
            ok(b"GET HTTPS://h HTTP/1.1\r\nHost: a\r\n\r\n").0.target,
            "/"
        );
        assert_eq!(
            ok(b"GET http://h?q HTTP/1.1\r\nHost: a\r\n\r\n").0.target,
            "/"
        );
        assert_eq!(
            err(b"GET http:/// HTTP/1.1\r\nHost: a\r\n\r\n").0,
            Status::BadRequest
        );
    }

    #[test]
    fn never_panics_on_prefixes() {
        let b = b"GET http://h/%zz?\xff HTTP/1.1\r\nHost: a\r\nConnection: ,,\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        for i in 0..=b.len() {
            let _ = parse(&b[..i]);
        }
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn site() -> (TempDir, TempDir, PathBuf) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir().join(format!(
            "hf-http-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let outside = TempDir(base.with_extension("out"));
        let guard = TempDir(base.clone());
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::create_dir_all(&outside.0).unwrap();
        std::fs::write(root.join("index.html"), "i").unwrap();
        std::fs::write(root.join("sub/index.html"), "s").unwrap();
        std::fs::write(root.join("sub/a b.txt"), "ab").unwrap();
        std::fs::write(base.join("secret"), "x").unwrap();
        std::fs::write(outside.0.join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(outside.0.join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside.0, root.join("dirlink")).unwrap();
        std::os::unix::fs::symlink("sub/index.html", root.join("inlink")).unwrap();
        let root = root.canonicalize().unwrap();
        (guard, outside, root)
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        assert_eq!(err(b"GET / HTTP/1.1\r\n\r\n").0, Status::BadRequest);
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").0,
            Status::BadRequest
        );
        assert_eq!(ok(b"GET / HTTP/1.0\r\n\r\n").0.target, "/");
    }

    #[test]
    fn resolve_files_and_dirs() {
        let (_g, _o, root) = site();
        assert_eq!(resolve(&root, "/"), Ok(root.join("index.html")));
        assert_eq!(resolve(&root, "/?x=../../etc"), Ok(root.join("index.html")));
        assert_eq!(resolve(&root, "/sub"), Ok(root.join("sub/index.html")));
        assert_eq!(resolve(&root, "/sub/"), Ok(root.join("sub/index.html")));
        assert_eq!(
            resolve(&root, "/sub/a%20b.txt?q#f"),
            Ok(root.join("sub/a b.txt"))
        );
        assert_eq!(
            resolve(&root, "/a/../sub/./index.html"),
            Ok(root.join("sub/index.html"))
        );
        assert_eq!(resolve(&root, "/inlink"), Ok(root.join("sub/index.html")));
        assert_eq!(resolve(&root, "/empty/"), Err(Status::NotFound));
        assert_eq!(resolve(&root, "/nope"), Err(Status::NotFound));
        assert_eq!(resolve(&root, "/index.html/x"), Err(Status::NotFound));
        assert_eq!(resolve(&root, "/sub/a%20b.txt/"), Err(Status::NotFound));
    }

    #[test]
    fn resolve_rejects_escapes() {
        let (_g, _o, root) = site();
        for t in [
            "/../etc/passwd",
            "/%2e%2e/%2e%2e/etc/passwd",
            "/a/../../x",
            "/..%2f..%2fetc%2fpasswd",
            "/sub/%2E%2E/%2e%2E/secret",
            "/sub/..%2F..%2Fsecret",
            "/link",
            "/dirlink/secret",
        ] {
            assert_eq!(resolve(&root, t), Err(Status::Forbidden), "{t}");
        }
        for t in ["/index.html%00.txt", "/%00", "/%", "/%2", "/%g0", "x", ""] {
            assert_eq!(resolve(&root, t), Err(Status::BadRequest), "{t}");
        }
        // backslashes are ordinary filename bytes on Unix, so this is just a missing file
        assert_eq!(resolve(&root, "/..%5c..%5csecret"), Err(Status::NotFound));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            content_type(Path::new("a/b.HTML")),
            "text/html; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x.jpeg")), "image/jpeg");
        assert_eq!(content_type(Path::new("x.wasm")), "application/wasm");
        assert_eq!(
            content_type(Path::new("big.bin")),
            "application/octet-stream"
        );
        assert_eq!(content_type(Path::new("noext")), "application/octet-stream");
    }

    #[test]
    fn write_head_exact() {
        let mut out = Vec::new();
        write_head(
            &Head {
                status: Status::Ok,
                date_unix_secs: 784111777,
                content_length: 12,
                content_type: Some("text/plain; charset=utf-8"),
                last_modified_unix_secs: Some(0),
                keep_alive: true,
                http10: true,
                extra: &[("X-A", "b"), ("Bad", "x\r\nInjected: 1")],
            },
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nServer: hf-httpd\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Length: 12\r\n\
             Last-Modified: Thu, 01 Jan 1970 00:00:00 GMT\r\nConnection: keep-alive\r\nX-A: b\r\n\r\n"
        );
        let mut out = Vec::new();
        let head = Head {
            status: Status::MethodNotAllowed,
            date_unix_secs: u64::MAX,
            content_length: 0,
            content_type: None,
            last_modified_unix_secs: None,
            keep_alive: false,
            http10: false,
            extra: &[],
        };
        write_head(&head, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 405 Method Not Allowed\r\nServer: hf-httpd\r\nDate: Fri, 31 Dec 9999 23:59:59 GMT\r\n\
             Content-Length: 0\r\nConnection: close\r\nAllow: GET, HEAD\r\n\r\n"
        );
        let mut out = Vec::new();
        write_head(
            &Head {
                extra: &[("allow", "GET, HEAD")],
                ..head
            },
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out)
                .unwrap()
                .to_ascii_lowercase()
                .matches("\r\nallow:")
                .count(),
            1
        );
        assert_eq!(
            error_body(Status::NotFound),
            b"<html><body><h1>404 Not Found</h1></body></html>\n"
        );
    }
}
