//! Request framing: where one HTTP/1.1 request ends in the input.
//!
//! hyper reads ahead and never says where a request ends, but a commit must
//! cover exactly one request's bytes. So the adapter finds the end itself,
//! with the same rules hyper applies (RFC 9112 §6), and refuses what it
//! cannot frame unambiguously instead of guessing differently from hyper.

use http::StatusCode;

/// Most headers a request may have.
pub(crate) const MAX_HEADERS: usize = 100;

/// What the framer knows about the request at the start of the input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Framed {
    /// More input is needed.
    Partial,
    /// The request is `len` bytes long.
    Complete(Request),
    /// The input cannot be framed: answer with this status and close.
    Reject(StatusCode),
}

/// A framed request: its length and what the adapter needs from its head.
#[derive(Debug, PartialEq, Eq, Clone)]
pub(crate) struct Request {
    /// Bytes of the whole request (head and body).
    pub len: usize,
    /// Bytes of the head (request line, headers, blank line).
    pub head_len: usize,
    /// The connection ends after this request (HTTP/1.0 without
    /// keep-alive, or `Connection: close`).
    pub close: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

/// Body framing announced by the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked,
}

/// Incremental framer of the request at the start of a buffer. Feed it the
/// whole buffer each time more input arrives; a chunked body is scanned
/// only once.
#[derive(Debug)]
pub(crate) struct Framer {
    max_head: usize,
    max_request: usize,
    head: Option<(Request, Body)>,
    chunked: Chunked,
}

impl Framer {
    pub(crate) fn new(max_head: usize, max_request: usize) -> Framer {
        Framer {
            max_head,
            max_request,
            head: None,
            chunked: Chunked::default(),
        }
    }

    /// The head of the request once it is complete (to answer `Expect`).
    pub(crate) fn head(&self) -> Option<&Request> {
        self.head.as_ref().map(|(r, _)| r)
    }

    /// Frames the request at the start of `buf`.
    pub(crate) fn frame(&mut self, buf: &[u8]) -> Framed {
        if self.head.is_none() {
            match parse_head(buf, self.max_head) {
                Ok(Some(h)) => self.head = Some(h),
                Ok(None) => return Framed::Partial,
                Err(status) => return Framed::Reject(status),
            }
        }
        let Some((req, body)) = &self.head else {
            return Framed::Partial;
        };
        let end = match *body {
            Body::Length(n) => {
                let total = req.head_len as u64 + n;
                if total > self.max_request as u64 {
                    return Framed::Reject(StatusCode::PAYLOAD_TOO_LARGE);
                }
                if (buf.len() as u64) < total {
                    return Framed::Partial;
                }
                total as usize
            }
            Body::Chunked => match self.chunked.scan(buf, req.head_len) {
                Ok(Some(end)) => end,
                Ok(None) if buf.len() > self.max_request => {
                    return Framed::Reject(StatusCode::PAYLOAD_TOO_LARGE)
                }
                Ok(None) => return Framed::Partial,
                Err(()) => return Framed::Reject(StatusCode::BAD_REQUEST),
            },
        };
        if end > self.max_request {
            return Framed::Reject(StatusCode::PAYLOAD_TOO_LARGE);
        }
        Framed::Complete(Request {
            len: end,
            ..req.clone()
        })
    }
}

/// Parses the head at the start of `buf`: `Ok(None)` while incomplete.
fn parse_head(buf: &[u8], max_head: usize) -> Result<Option<(Request, Body)>, StatusCode> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(_) => return Err(StatusCode::BAD_REQUEST),
    };
    if head_len > max_head {
        return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    let http10 = req.version == Some(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value).ok_or(StatusCode::BAD_REQUEST)?;
            // Repeated lengths must agree (as hyper requires).
            if length.is_some_and(|m| m != n) {
                return Err(StatusCode::BAD_REQUEST);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only a final `chunked` frames a request body; anything else
            // (or a coding after `chunked`) cannot be framed.
            let v = std::str::from_utf8(h.value).map_err(|_| StatusCode::BAD_REQUEST)?;
            let last = v.rsplit(',').next().unwrap_or("").trim();
            if chunked || !last.eq_ignore_ascii_case("chunked") {
                return Err(StatusCode::BAD_REQUEST);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let t = token.trim_ascii();
                close |= t.eq_ignore_ascii_case(b"close");
                keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    // Both framings at once is how requests are smuggled: refuse it.
    if chunked && (length.is_some() || http10) {
        return Err(StatusCode::BAD_REQUEST);
    }
    let body = if chunked {
        Body::Chunked
    } else {
        Body::Length(length.unwrap_or(0))
    };
    let has_body = body != Body::Length(0);
    Ok(Some((
        Request {
            len: head_len,
            head_len,
            close: close || (http10 && !keep_alive),
            expect_continue: expect_continue && !http10 && has_body,
        },
        body,
    )))
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Scanner of a chunked body; remembers how far it got.
#[derive(Debug, Default)]
struct Chunked {
    /// Offset in the buffer of the next thing to scan (0: not started).
    pos: usize,
    /// Scanning the trailer section (after the last chunk).
    trailers: bool,
}

/// Longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

impl Chunked {
    /// The end offset of the body once it is complete.
    fn scan(&mut self, buf: &[u8], start: usize) -> Result<Option<usize>, ()> {
        if self.pos == 0 {
            self.pos = start;
        }
        loop {
            let rest = &buf[self.pos..];
            let Some(eol) = find_crlf(rest) else {
                if rest.len() > MAX_CHUNK_LINE {
                    return Err(());
                }
                return Ok(None);
            };
            let line = &rest[..eol];
            if self.trailers {
                self.pos += eol + 2;
                if line.is_empty() {
                    return Ok(Some(self.pos));
                }
                continue;
            }
            if eol > MAX_CHUNK_LINE {
                return Err(());
            }
            let size_part = line.split(|&b| b == b';').next().unwrap_or(b"");
            let size_part = size_part.trim_ascii_end();
            if size_part.is_empty()
                || size_part.len() > 15
                || !size_part.iter().all(u8::is_ascii_hexdigit)
            {
                return Err(());
            }
            let size = usize::from_str_radix(std::str::from_utf8(size_part).map_err(|_| ())?, 16)
                .map_err(|_| ())?;
            if size == 0 {
                self.pos += eol + 2;
                self.trailers = true;
                continue;
            }
            // The chunk's data and its CRLF must all be there to move on.
            let need = eol + 2 + size + 2;
            if rest.len() < need {
                return Ok(None);
            }
            if &rest[need - 2..need] != b"\r\n" {
                return Err(());
            }
            self.pos += need;
        }
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(input: &[u8]) -> Framed {
        Framer::new(8192, 1 << 20).frame(input)
    }

    fn len(input: &[u8]) -> usize {
        match frame(input) {
            Framed::Complete(r) => r.len,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_get_ends_at_its_blank_line_even_with_the_next_request_behind_it() {
        let one = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut two = one.to_vec();
        two.extend_from_slice(b"GET /b HTTP/1.1\r\n\r\n");
        assert_eq!(len(one), one.len());
        assert_eq!(len(&two), one.len());
    }

    #[test]
    fn content_length_bodies_and_chunked_bodies_end_where_they_say() {
        let r = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET";
        assert_eq!(len(r), r.len() - 3);
        assert_eq!(frame(&r[..r.len() - 5]), Framed::Partial);
        let c = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\nNEXT";
        assert_eq!(len(c), c.len() - 4);
        for cut in 40..c.len() - 4 {
            assert_eq!(frame(&c[..cut]), Framed::Partial, "cut at {cut}");
        }
    }

    #[test]
    fn what_cannot_be_framed_is_refused() {
        let bad = |s: &[u8], status| assert_eq!(frame(s), Framed::Reject(status));
        bad(
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            StatusCode::BAD_REQUEST,
        );
        bad(
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            StatusCode::BAD_REQUEST,
        );
        bad(
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            StatusCode::BAD_REQUEST,
        );
        bad(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            StatusCode::BAD_REQUEST,
        );
        bad(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            StatusCode::BAD_REQUEST,
        );
        bad(
            b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            StatusCode::PAYLOAD_TOO_LARGE,
        );
        bad(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", StatusCode::BAD_REQUEST);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(9000, b'a');
        bad(&long, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    #[test]
    fn connection_and_expect_are_read_from_the_head() {
        let head = |s: &[u8]| match frame(s) {
            Framed::Complete(r) => r,
            other => panic!("{other:?}"),
        };
        assert!(head(b"GET / HTTP/1.0\r\n\r\n").close);
        assert!(!head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").close);
        assert!(head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").close);
        let mut f = Framer::new(8192, 1 << 20);
        let r = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(f.frame(r), Framed::Partial);
        assert!(f.head().is_some_and(|h| h.expect_continue));
    }
}
