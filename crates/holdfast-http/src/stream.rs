//! Streaming responses that resume after a crash from their last item.
//!
//! A long streaming response — Server-Sent Events, a long download — is,
//! to the library, one request whose answer never ends: after a crash a new
//! worker would have to regenerate it from its first byte (and an endless
//! event stream cannot be regenerated at all). A [`Resumable`] body instead
//! attaches a small *progress* blob to each item it yields — "the client
//! has everything up to event 41" — and the adapter commits at the end of
//! each item it writes, with that progress in the connection's state blob.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use axum::http::header::CONTENT_TYPE;
//! use axum::response::IntoResponse;
//! use holdfast_http::stream::{Progress, Resumable};
//!
//! // One event every second, forever. A new worker resuming the stream
//! // learns where the last one got to, and goes on from there.
//! async fn ticks(Progress(progress): Progress) -> impl IntoResponse {
//!     let after = progress
//!         .and_then(|p| Some(u64::from_le_bytes(p.try_into().ok()?)))
//!         .unwrap_or(0);
//!     let items = futures_util::stream::unfold(after, |i| async move {
//!         tokio::time::sleep(Duration::from_secs(1)).await;
//!         let i = i + 1;
//!         // (the bytes, and the progress once they are out)
//!         Some(((format!("id: {i}\ndata: tick {i}\n\n"), i.to_le_bytes()), i))
//!     });
//!     ([(CONTENT_TYPE, "text/event-stream")], Resumable::new(items))
//! }
//! # let _ = axum::Router::<()>::new().route("/ticks", axum::routing::get(ticks));
//! ```
//!
//! How it works, under a keeper:
//!
//! - The response goes out chunked, one chunk per item (hyper's encoder;
//!   an item with no bytes is skipped). The adapter's I/O layer counts the
//!   response's bytes, finds the end of its head, and follows the chunk
//!   framing; a write never crosses the end of an item's chunk.
//! - At the end of each item's chunk it commits: the first such commit
//!   consumes the request's input (so `holdfast upgrade` may move the
//!   connection at the next item, like one between requests), and the
//!   state blob says "mid-stream", with the request (inline, or in a
//!   memfd the keeper holds when it is large) and the item's progress.
//! - A new worker — after a crash, a hang, or an upgrade's move — runs the
//!   same request through the service again, with the progress in
//!   [`Handle::progress`](crate::Handle::progress) (or the [`Progress`]
//!   extractor), and discards the regenerated response head: the first byte
//!   it sends is the first byte after the committed item. Output the dead
//!   worker wrote after that commit is regenerated and checked by the
//!   library as for any replay, so the client never sees a byte twice.
//! - When the body ends, its terminating chunk is written and the request
//!   commits as usual; keep-alive goes on with the next request.
//!
//! A crash before the first item's commit replays the response from its
//! start, as for any other response.
//!
//! What the handler must keep deterministic: given the same request and
//! progress, the same items, byte for byte, in the same chunks. Keep
//! everything the stream needs to carry on in the progress (at most
//! [`MAX_PROGRESS`] bytes; a larger one ends the response with an error).
//! The handler itself runs again on every resumption: do what must happen
//! once per request only when the progress is `None` (a replay policy it
//! declares on a resumed run is ignored: the request already ran).
//! On a resumed run (`progress` is `Some`), values recorded with
//! [`Handle::record`](crate::Handle::record) / `now` continue those the
//! dead worker recorded after its last commit, in order: record them while
//! producing items, not in the handler's setup.
//!
//! Limits: a stream's bytes must go out as the body produced them (no
//! compression layer between the body and the adapter: if the chunks seen
//! on the wire stop matching the items, the adapter stops committing
//! progress and logs it; the response is then regenerated from its start
//! after a crash, as without this type). A stream whose next item kills
//! every worker that produces it is not refused as poison (its request was
//! consumed at the first commit), as with a WebSocket's sends. In
//! pass-through mode a `Resumable` is a plain streaming body.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use crate::conn::Io;
use bytes::Bytes;
use futures_core::Stream;
use http_body::{Body, Frame};
use tokio::io::AsyncWrite;

use crate::BoxError;

/// The largest progress blob an item may carry.
pub const MAX_PROGRESS: usize = 128;
/// Marks a connection's state blob as a stream's, mid-response.
const MAGIC: &[u8; 4] = b"HFSS";
const BLOB_VERSION: u8 = 1;
/// Magic, version, framing, request kind, two lengths.
const BLOB_OVERHEAD: usize = 4 + 1 + 1 + 1 + 2 + 2;
/// Requests up to this size are kept in the state blob when the connection
/// has room for them ([`request_inline`]); larger ones in a held memfd.
const REQUEST_INLINE: usize = holdfast::MAX_STATE - BLOB_OVERHEAD - MAX_PROGRESS;

/// The largest request kept in the blob of a connection whose commits
/// save up to `room` bytes (less over TLS, whose session takes part of it).
fn request_inline(room: usize) -> usize {
    room.saturating_sub(BLOB_OVERHEAD + MAX_PROGRESS)
        .min(REQUEST_INLINE)
}
/// The held-channel tag of a large request.
pub(crate) const REQUEST_TAG: u32 = 0x4846_5352;
/// The most response head the I/O layer collects to find the framing.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

type Items = Pin<Box<dyn Stream<Item = Result<(Bytes, Vec<u8>), BoxError>> + Send>>;

/// A streaming response body whose items carry progress: under a keeper a
/// crash (or an upgrade) resumes it after the last item written, instead
/// of regenerating it from its start. See the [module docs](self).
///
/// With the `axum` feature it is an `IntoResponse`; otherwise answer with
/// [`Resumable::into_http_response`] (the adapter finds the stream through
/// the response's extensions).
pub struct Resumable {
    items: Items,
    link: Arc<Link>,
}

impl Resumable {
    /// A body from a stream of `(bytes, progress)`: `progress` is what a
    /// new worker needs to produce the items after this one (at most
    /// [`MAX_PROGRESS`] bytes).
    pub fn new<S, D, P>(stream: S) -> Resumable
    where
        S: Stream<Item = (D, P)> + Send + 'static,
        D: Into<Bytes>,
        P: AsRef<[u8]>,
    {
        Resumable::try_new(Infallible(Box::pin(stream)))
    }

    /// [`Resumable::new`] for a stream that may fail: an error ends the
    /// response (and its connection, as the client cannot tell where a cut
    /// chunked body ends otherwise).
    pub fn try_new<S, D, P, E>(stream: S) -> Resumable
    where
        S: Stream<Item = Result<(D, P), E>> + Send + 'static,
        D: Into<Bytes>,
        P: AsRef<[u8]>,
        E: Into<BoxError>,
    {
        Resumable {
            items: Box::pin(Fallible(Box::pin(stream))),
            link: Arc::new(Link::default()),
        }
    }

    /// A `200` response with this body, findable by the adapter.
    pub fn into_http_response(self) -> http::Response<Resumable> {
        let link = StreamLink(self.link.clone());
        let mut r = http::Response::new(self);
        r.extensions_mut().insert(link);
        r
    }
}

struct Infallible<S>(Pin<Box<S>>);

impl<S, D, P> Stream for Infallible<S>
where
    S: Stream<Item = (D, P)>,
{
    type Item = Result<(D, P), std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.as_mut().poll_next(cx).map(|o| o.map(Ok))
    }
}

struct Fallible<S>(Pin<Box<S>>);

impl<S, D, P, E> Stream for Fallible<S>
where
    S: Stream<Item = Result<(D, P), E>>,
    D: Into<Bytes>,
    P: AsRef<[u8]>,
    E: Into<BoxError>,
{
    type Item = Result<(Bytes, Vec<u8>), BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.as_mut().poll_next(cx).map(|o| {
            o.map(|r| {
                r.map(|(d, p)| (d.into(), p.as_ref().to_vec()))
                    .map_err(Into::into)
            })
        })
    }
}

/// An item's progress blob is larger than [`MAX_PROGRESS`].
#[derive(Debug)]
pub struct ProgressTooLarge(pub usize);

impl std::fmt::Display for ProgressTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a resumable stream's progress of {} bytes; at most {MAX_PROGRESS} fit in the connection's state",
            self.0
        )
    }
}

impl std::error::Error for ProgressTooLarge {}

impl Body for Resumable {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match ready!(self.items.as_mut().poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok((data, progress))) => {
                    if progress.len() > MAX_PROGRESS {
                        let e = ProgressTooLarge(progress.len());
                        tracing::error!(error = %e, "ending the response");
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    if data.is_empty() {
                        // No chunk to commit after: the next item's
                        // progress supersedes this one.
                        continue;
                    }
                    self.link.push(data.len(), progress);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
            }
        }
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Resumable {
    fn into_response(self) -> axum::response::Response {
        let link = StreamLink(self.link.clone());
        let mut r = axum::response::Response::new(axum::body::Body::new(self));
        r.extensions_mut().insert(link);
        r
    }
}

/// The progress a resumed stream starts from, as an axum extractor:
/// `None` on a fresh request (and outside `holdfast_http`). The same as
/// [`Handle::progress`](crate::Handle::progress).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress(pub Option<Vec<u8>>);

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Progress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Progress, Self::Rejection> {
        Ok(Progress(
            parts
                .extensions
                .get::<crate::Handle>()
                .and_then(crate::Handle::progress),
        ))
    }
}

/// What a body tells the adapter's I/O layer: the length and progress of
/// each item it handed to hyper, in order. Only queued once the adapter
/// attached it (under a keeper), so a body served elsewhere keeps nothing.
#[derive(Default)]
pub(crate) struct Link {
    attached: AtomicBool,
    items: Mutex<VecDeque<(usize, Vec<u8>)>>,
}

impl Link {
    fn push(&self, len: usize, progress: Vec<u8>) {
        if self.attached.load(Ordering::Acquire) {
            self.lock().push_back((len, progress));
        }
    }

    fn pop(&self) -> Option<(usize, Vec<u8>)> {
        self.lock().pop_front()
    }

    pub(crate) fn attach(&self) {
        self.attached.store(true, Ordering::Release);
    }

    fn detach(&self) {
        self.attached.store(false, Ordering::Release);
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(usize, Vec<u8>)>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A response extension leading the adapter to its body's [`Link`].
#[derive(Clone)]
pub(crate) struct StreamLink(pub(crate) Arc<Link>);

/// Where the service wrapper leaves the link of a resumable response.
pub(crate) type LinkSlot = Arc<Mutex<Option<Arc<Link>>>>;

/// How the response's body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Content-Length` or close-delimited: an item is its bytes.
    Raw,
    /// An item is one chunk.
    Chunked,
}

/// The request of a stream, kept with the connection.
/// The request of a stream, kept with the connection.
pub(crate) type KeptRequest = crate::kept::Kept;

/// A stream's state blob, parsed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Saved {
    pub(crate) framing: Framing,
    pub(crate) request: KeptRequest,
    pub(crate) progress: Vec<u8>,
}

/// Whether a connection's state blob is a stream's.
pub(crate) fn is_blob(b: &[u8]) -> bool {
    b.starts_with(MAGIC)
}

fn blob(framing: Framing, request: &KeptRequest, progress: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOB_OVERHEAD + REQUEST_INLINE + progress.len());
    b.extend_from_slice(MAGIC);
    b.push(BLOB_VERSION);
    b.push(match framing {
        Framing::Raw => 0,
        Framing::Chunked => 1,
    });
    request.put(&mut b);
    b.extend_from_slice(&(progress.len() as u16).to_le_bytes());
    b.extend_from_slice(progress);
    b
}

pub(crate) fn parse_blob(b: &[u8]) -> Option<Saved> {
    let mut r = holdfast::blob::Reader::new(b);
    if r.take(4)? != MAGIC || r.u8()? != BLOB_VERSION {
        return None;
    }
    let framing = match r.u8()? {
        0 => Framing::Raw,
        1 => Framing::Chunked,
        _ => return None,
    };
    let request = KeptRequest::take(&mut r, 1..=REQUEST_INLINE)?;
    let progress_len = usize::from(r.u16()?);
    let progress = r.take(progress_len)?.to_vec();
    if !r.is_empty() || progress_len > MAX_PROGRESS {
        return None;
    }
    Some(Saved {
        framing,
        request,
        progress,
    })
}

/// Keeps a stream's request with the connection: in the blob if small, else
/// in a memfd the keeper holds.
fn keep_request(conn: &mut Io, request: &[u8]) -> io::Result<KeptRequest> {
    let inline = request_inline(conn.max_state());
    KeptRequest::keep(conn, request, inline, REQUEST_TAG, "hf-stream-request")
}

/// The request of a resumed stream.
pub(crate) fn load_request(conn: &mut Io, kept: &KeptRequest) -> io::Result<Vec<u8>> {
    kept.load(conn, REQUEST_TAG, "the stream's held request")
}

/// The I/O layer's side: follows one response's bytes on their way to the
/// connection and commits at the end of each item of a resumable body.
pub(crate) struct Tracker {
    /// Filled by the service wrapper when the response is resumable.
    pub(crate) slot: LinkSlot,
    phase: Phase,
    /// Resuming a stream framed this way: its regenerated head is not sent.
    resuming: Option<Framing>,
    request: Request,
    /// Input the next progress commit consumes: the request's, then none.
    consumed: usize,
    /// A commit reached but not done yet (its blob).
    due: Option<Vec<u8>>,
    /// A progress commit happened: the request's input is consumed.
    committed: bool,
    /// The response head so far.
    head: Vec<u8>,
}

enum Request {
    /// Not kept yet: the bytes hyper was given.
    Fresh(Bytes),
    Kept(KeptRequest),
}

enum Phase {
    /// Before the first write: the service has not answered yet.
    Start,
    /// Writing the response head.
    Head(Option<Arc<Link>>),
    Body(Track),
    /// Not a resumable response (or no longer followed): bytes pass.
    Off,
}

/// Where the body stands.
struct Track {
    link: Arc<Link>,
    framing: Framing,
    /// Body bytes written.
    pos: u64,
    /// The end of the last item.
    base: u64,
    next: Option<Boundary>,
    scan: ChunkScan,
}

/// The end of an item on the wire.
struct Boundary {
    end: u64,
    len: usize,
    progress: Vec<u8>,
}

impl Tracker {
    /// Follows the response to a request read from the connection:
    /// `request` is what hyper is given, `consumed` its length in the input.
    pub(crate) fn new(request: Bytes, consumed: usize) -> Tracker {
        Tracker {
            slot: LinkSlot::default(),
            phase: Phase::Start,
            resuming: None,
            request: Request::Fresh(request),
            consumed,
            due: None,
            committed: false,
            head: Vec::new(),
        }
    }

    /// Follows the response that resumes a stream: its head is discarded.
    pub(crate) fn resuming(saved: &Saved) -> Tracker {
        Tracker {
            resuming: Some(saved.framing),
            request: Request::Kept(saved.request.clone()),
            consumed: 0,
            ..Tracker::new(Bytes::new(), 0)
        }
    }

    /// Follows nothing.
    pub(crate) fn off() -> Tracker {
        Tracker {
            phase: Phase::Off,
            ..Tracker::new(Bytes::new(), 0)
        }
    }

    /// The request's input was consumed by a progress commit.
    pub(crate) fn committed(&self) -> bool {
        self.committed
    }

    /// The keeper holds the request in a memfd: drop it after the last commit.
    pub(crate) fn holds_request(&self) -> bool {
        matches!(self.request, Request::Kept(KeptRequest::Held))
    }

    /// Completes a commit reached earlier.
    pub(crate) fn poll_due(&mut self, conn: &mut Io, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(blob) = &self.due else {
            return Poll::Ready(Ok(()));
        };
        ready!(conn.poll_commit(cx, self.consumed, blob))?;
        self.due = None;
        self.consumed = 0;
        self.committed = true;
        Poll::Ready(Ok(()))
    }

    pub(crate) fn poll_write(
        &mut self,
        conn: &mut Io,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_due(conn, cx))?;
        if let Phase::Start = self.phase {
            let link = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            self.phase = match link {
                None if self.resuming.is_none() => Phase::Off,
                link => Phase::Head(link),
            };
        }
        match &mut self.phase {
            Phase::Start | Phase::Off => Pin::new(conn).poll_write(cx, buf),
            Phase::Head(_) => {
                let end = head_end(&self.head, buf);
                let take = end.unwrap_or(buf.len());
                let n = if self.resuming.is_some() {
                    take
                } else {
                    ready!(Pin::new(&mut *conn).poll_write(cx, &buf[..take]))?
                };
                self.head.extend_from_slice(&buf[..n]);
                if end == Some(n) {
                    self.start_body()?;
                } else if self.head.len() > MAX_RESPONSE_HEAD {
                    if self.resuming.is_some() {
                        return Poll::Ready(Err(not_resumable("its head is too large")));
                    }
                    self.stop("its head is too large");
                }
                Poll::Ready(Ok(n))
            }
            Phase::Body(t) => {
                if t.next.is_none() {
                    t.next = t.link.pop().map(|(len, progress)| Boundary {
                        end: t.base + framed_len(t.framing, len),
                        len,
                        progress,
                    });
                }
                let take = match &t.next {
                    Some(b) => buf
                        .len()
                        .min(usize::try_from(b.end - t.pos).unwrap_or(usize::MAX)),
                    None => buf.len(),
                };
                let n = ready!(Pin::new(&mut *conn).poll_write(cx, &buf[..take]))?;
                if t.framing == Framing::Chunked {
                    t.scan.feed(&buf[..n]);
                }
                t.pos += n as u64;
                let Some(b) = t.next.take_if(|b| b.end == t.pos) else {
                    return Poll::Ready(Ok(n));
                };
                t.base = b.end;
                if t.framing == Framing::Chunked && !t.scan.ended_chunk_of(b.len) {
                    self.stop("its chunks do not match the stream's items");
                    return Poll::Ready(Ok(n));
                }
                if conn.replaying() {
                    // Still re-creating what the dead worker sent: the
                    // next item's end is the commit point.
                    return Poll::Ready(Ok(n));
                }
                let framing = t.framing;
                let kept = match &self.request {
                    Request::Kept(k) => Ok(k.clone()),
                    Request::Fresh(r) => keep_request(conn, r),
                };
                match kept {
                    Ok(k) => {
                        self.due = Some(blob(framing, &k, &b.progress));
                        self.request = Request::Kept(k);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot keep a stream's request");
                        self.stop("its request cannot be kept");
                        return Poll::Ready(Ok(n));
                    }
                }
                // Committed now if it can be; else at the next write or flush.
                if let Poll::Ready(Err(e)) = self.poll_due(conn, cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
        }
    }

    /// The head is complete: what follows it, and whether to follow it.
    fn start_body(&mut self) -> io::Result<()> {
        let Phase::Head(link) = std::mem::replace(&mut self.phase, Phase::Off) else {
            return Ok(());
        };
        let framing = response_framing(&self.head);
        if let Some(want) = self.resuming {
            if link.is_none() || framing != Some(want) {
                if let Some(l) = &link {
                    l.detach();
                }
                return Err(not_resumable(
                    "the service no longer answers its request with the same kind of stream",
                ));
            }
        }
        self.head = Vec::new();
        match (link, framing) {
            (Some(link), Some(framing)) => {
                self.phase = Phase::Body(Track {
                    link,
                    framing,
                    pos: 0,
                    base: 0,
                    next: None,
                    scan: ChunkScan::default(),
                });
            }
            (Some(link), None) => link.detach(),
            (None, _) => {}
        }
        Ok(())
    }

    /// Stops following the response: it is regenerated from its start after
    /// a crash (or, resumed, from the last commit), like any other.
    fn stop(&mut self, why: &str) {
        tracing::warn!("a resumable response is no longer followed: {why}; its progress is not committed any more");
        match std::mem::replace(&mut self.phase, Phase::Off) {
            Phase::Head(Some(link)) => link.detach(),
            Phase::Body(t) => t.link.detach(),
            _ => {}
        }
    }
}

fn not_resumable(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a resumed stream cannot continue: {why}"),
    )
}

/// Bytes of an item of `len` bytes on the wire.
fn framed_len(framing: Framing, len: usize) -> u64 {
    match framing {
        Framing::Raw => len as u64,
        // `{len:X}\r\n{data}\r\n`, as hyper's encoder writes it.
        Framing::Chunked => {
            let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
            u64::from(digits) + 2 + len as u64 + 2
        }
    }
}

/// How many bytes of `buf` complete the head that `head` starts.
fn head_end(head: &[u8], buf: &[u8]) -> Option<usize> {
    let keep = head.len().min(3);
    let mut window = [0u8; 4];
    let mut filled = 0;
    for &b in &head[head.len() - keep..] {
        window[filled] = b;
        filled += 1;
    }
    for (i, &b) in buf.iter().enumerate() {
        if filled == 4 {
            window.copy_within(1.., 0);
            filled = 3;
        }
        window[filled] = b;
        filled += 1;
        if filled == 4 && &window == b"\r\n\r\n" {
            return Some(i + 1);
        }
    }
    None
}

/// The body framing of a complete response head; `None` if it has no body.
fn response_framing(head: &[u8]) -> Option<Framing> {
    let mut headers = [httparse::EMPTY_HEADER; crate::frame::MAX_HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    if matches!(r.code?, 100..=199 | 204 | 304) {
        return None;
    }
    let chunked = r.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && h.value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
    });
    Some(if chunked {
        Framing::Chunked
    } else {
        Framing::Raw
    })
}

/// Follows a chunked body on the wire, to check that each item's end is a
/// chunk's end.
#[derive(Debug, Default)]
struct ChunkScan {
    state: Scan,
    /// The length of the chunk that just ended, if the scan is right after it.
    ended: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Scan {
    #[default]
    SizeStart,
    Size(u64),
    SizeLf(u64),
    Data {
        left: u64,
        len: u64,
    },
    DataCr(u64),
    DataLf(u64),
    /// The last chunk: what follows is not followed.
    End,
    Bad,
}

impl ChunkScan {
    fn feed(&mut self, mut buf: &[u8]) {
        while let Some((&b, rest)) = buf.split_first() {
            self.state = match self.state {
                Scan::End | Scan::Bad => return,
                Scan::Data { left, len } => {
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    buf = &buf[n..];
                    self.state = match left - n as u64 {
                        0 => Scan::DataCr(len),
                        left => Scan::Data { left, len },
                    };
                    continue;
                }
                Scan::SizeStart | Scan::Size(_) => {
                    let so_far = match self.state {
                        Scan::Size(v) => Some(v),
                        _ => None,
                    };
                    self.ended = None;
                    match ((b as char).to_digit(16), so_far) {
                        (Some(d), v) => match v.unwrap_or(0).checked_mul(16) {
                            Some(v) => Scan::Size(v + u64::from(d)),
                            None => Scan::Bad,
                        },
                        (None, Some(v)) if b == b'\r' => Scan::SizeLf(v),
                        _ => Scan::Bad,
                    }
                }
                Scan::SizeLf(0) if b == b'\n' => Scan::End,
                Scan::SizeLf(len) if b == b'\n' => Scan::Data { left: len, len },
                Scan::DataCr(len) if b == b'\r' => Scan::DataLf(len),
                Scan::DataLf(len) if b == b'\n' => {
                    self.ended = Some(len);
                    Scan::SizeStart
                }
                _ => Scan::Bad,
            };
            buf = rest;
        }
    }

    /// The scan is right after a chunk of `len` bytes.
    fn ended_chunk_of(&self, len: usize) -> bool {
        self.state == Scan::SizeStart && self.ended == Some(len as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_and_garbage_is_refused() {
        let req = KeptRequest::Inline(b"GET /events HTTP/1.1\r\n\r\n".to_vec());
        let b = blob(Framing::Chunked, &req, &7u64.to_le_bytes());
        assert_eq!(
            parse_blob(&b),
            Some(Saved {
                framing: Framing::Chunked,
                request: req,
                progress: 7u64.to_le_bytes().to_vec()
            })
        );
        for n in 0..b.len() {
            assert!(parse_blob(&b[..n]).is_none());
        }
        let held = blob(Framing::Raw, &KeptRequest::Held, &[0; MAX_PROGRESS]);
        assert_eq!(parse_blob(&held).unwrap().request, KeptRequest::Held);
        // The largest blob fits in the connection's state.
        let big = blob(
            Framing::Chunked,
            &KeptRequest::Inline(vec![b'x'; REQUEST_INLINE]),
            &[1; MAX_PROGRESS],
        );
        assert_eq!(big.len(), holdfast::MAX_STATE);
        assert!(parse_blob(&big).is_some());
        assert!(!is_blob(b"HFWS\x01"));
        assert!(parse_blob(b"HFSS\x02").is_none());
    }

    /// Over TLS, whose session takes part of the state, the largest inline
    /// request still fits what is left.
    #[cfg(feature = "tls")]
    #[test]
    fn the_largest_inline_request_fits_over_tls() {
        let room = holdfast_tls::MAX_APP_STATE;
        let n = request_inline(room);
        assert!(n < REQUEST_INLINE);
        let b = blob(
            Framing::Chunked,
            &KeptRequest::Inline(vec![b'x'; n]),
            &[1; MAX_PROGRESS],
        );
        assert_eq!(b.len(), room);
        assert!(parse_blob(&b).is_some());
    }

    #[test]
    fn chunk_lengths_are_hypers() {
        for (len, wire) in [(1, "1\r\nx\r\n"), (15, ""), (16, ""), (255, ""), (4096, "")] {
            let data = vec![b'x'; len];
            let framed = format!("{len:X}\r\n{}\r\n", String::from_utf8(data).unwrap());
            if !wire.is_empty() {
                assert_eq!(framed, wire);
            }
            assert_eq!(framed_len(Framing::Chunked, len), framed.len() as u64);
            let mut s = ChunkScan::default();
            s.feed(framed.as_bytes());
            assert!(s.ended_chunk_of(len), "{len}");
        }
        assert_eq!(framed_len(Framing::Raw, 10), 10);
    }

    #[test]
    fn chunk_scan_follows_split_writes_and_refuses_garbage() {
        let wire = b"A\r\n0123456789\r\n3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..=15 {
            let mut s = ChunkScan::default();
            s.feed(&wire[..cut]);
            s.feed(&wire[cut..15]);
            assert!(s.ended_chunk_of(10), "cut at {cut}");
            s.feed(&wire[15..23]);
            assert!(s.ended_chunk_of(3));
            s.feed(&wire[23..]);
            assert_eq!(s.state, Scan::End);
        }
        let mut s = ChunkScan::default();
        s.feed(b"3;ext\r\nabc\r\n");
        assert_eq!(s.state, Scan::Bad);
        let mut s = ChunkScan::default();
        s.feed(b"3\r\nabcd\r\n");
        assert!(!s.ended_chunk_of(3));
    }

    #[test]
    fn head_end_is_found_across_writes() {
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        for cut in 0..head.len() {
            let first = head_end(b"", &head[..cut]);
            assert_eq!(first, None, "cut {cut}");
            let mut body = head[cut..].to_vec();
            body.extend_from_slice(b"5\r\nhello\r\n");
            assert_eq!(head_end(&head[..cut], &body), Some(head.len() - cut));
        }
        assert_eq!(response_framing(head), Some(Framing::Chunked));
        assert_eq!(
            response_framing(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n"),
            Some(Framing::Raw)
        );
        assert_eq!(response_framing(b"HTTP/1.1 204 No Content\r\n\r\n"), None);
    }

    #[test]
    fn a_progress_too_large_ends_the_body_with_a_clear_error() {
        use std::task::Waker;
        struct Once(Option<(Bytes, Vec<u8>)>);
        impl Stream for Once {
            type Item = (Bytes, Vec<u8>);
            fn poll_next(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                Poll::Ready(self.0.take())
            }
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut ok = Resumable::new(Once(Some((
            Bytes::from_static(b"x"),
            vec![0; MAX_PROGRESS],
        ))));
        assert!(matches!(
            Pin::new(&mut ok).poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        let mut big = Resumable::new(Once(Some((
            Bytes::from_static(b"x"),
            vec![0; MAX_PROGRESS + 1],
        ))));
        let Poll::Ready(Some(Err(e))) = Pin::new(&mut big).poll_frame(&mut cx) else {
            panic!("a progress too large passed");
        };
        assert!(e.to_string().contains("at most 128"), "{e}");
    }

    proptest::proptest! {
        /// A stream's state blob comes back from a journal any worker may
        /// have scribbled on: no input panics, and what is written reads back.
        #[test]
        fn blob_decoder_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = parse_blob(&data);
            let mut tagged = MAGIC.to_vec();
            tagged.push(BLOB_VERSION);
            tagged.extend_from_slice(&data);
            let _ = parse_blob(&tagged);
        }

        #[test]
        fn blobs_round_trip(req in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..=REQUEST_INLINE),
                            progress in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=MAX_PROGRESS)) {
            let saved = parse_blob(&blob(Framing::Chunked, &KeptRequest::Inline(req.clone()), &progress)).unwrap();
            proptest::prop_assert_eq!(saved.request, KeptRequest::Inline(req));
            proptest::prop_assert_eq!(saved.progress, progress);
        }
    }
}
