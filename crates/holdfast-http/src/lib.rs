//! # holdfast-http — hyper, tower and axum services under holdfast, zero-loss
//!
//! ```no_run
//! # async fn demo() -> Result<(), holdfast::Error> {
//! use axum::{routing::get, Router};
//! let app: Router = Router::new().route("/", get(|| async { "hello\n" }));
//! let listener = holdfast::tokio::Listener::bind(&["127.0.0.1:8080".parse().unwrap()]).await?;
//! holdfast_http::serve(listener, app).await
//! # }
//! ```
//!
//! Serving hyper straight on a [`holdfast::tokio::Conn`] compiles but is not
//! zero-loss: nothing commits, hyper writes its own `Date`, and hyper reads
//! ahead, so nobody knows where one request ends. This adapter does, for
//! HTTP/1.1 with keep-alive and pipelining:
//!
//! - it frames each request itself from the (peeked) input — the head, then
//!   a `Content-Length` or chunked body — and refuses what it cannot frame
//!   unambiguously (400, 413, 431, then the connection closes);
//! - it hands hyper exactly one request at a time, so a commit never covers
//!   bytes of the next one, and commits that request's bytes once its whole
//!   response is written and flushed;
//! - hyper's automatic `Date` is off: the adapter adds a `Date` taken from
//!   the library's recorded clock, so a replayed response is byte-identical;
//! - handlers reach the connection through a [`Handle`] (a request
//!   extension; an axum extractor with the `axum` feature) for recorded
//!   values and the replay policy; [`ReplayPolicyLayer`] declares a policy
//!   for whole routes (`POST /pay` → [`holdfast::ReplayPolicy::Error`]);
//! - a streaming response whose body is a [`stream::Resumable`] (Server-Sent
//!   Events, long downloads) commits after each item it writes, with the
//!   item's *progress* in the connection's state: after a crash, or when
//!   `holdfast upgrade` moves the connection, the next worker runs the
//!   request again with that progress ([`Handle::progress`],
//!   [`stream::Progress`]) and sends only what follows (see [`stream`]);
//!   any other response is regenerated from its start after a crash;
//! - a request flagged as poison (in flight during two consecutive crashes)
//!   gets a `500` from the adapter without reaching the service, and a
//!   handler that panics under a keeper crashes the worker, so the request
//!   is replayed (then refused as poison) instead of its connection closing.
//!
//! ## HTTPS and WSS
//!
//! With the `tls` feature, `serve_tls` / `Server::serve_tls` serve the
//! same application over `holdfast_tls` (TLS 1.3 kept across crashes and
//! upgrades, handshakes included; TLS 1.2 served but closed with its
//! worker), with the same guarantees — every point above holds over TLS,
//! WebSockets become `wss://`:
//!
//! ```ignore
//! let tls = holdfast_tls::TlsAcceptor::from_pem_files(&cert, &key, holdfast_http::ALPN)?;
//! holdfast_http::serve_tls(listener, tls, app).await
//! ```
//!
//! The adapter runs on any [`Connection`] (plain [`holdfast::tokio::Conn`],
//! or `holdfast_tls::TlsConn` over it). A TLS session keeps its keys and
//! sequence numbers in the connection's state blob, leaving
//! `holdfast_tls::MAX_APP_STATE` bytes ([`Connection::max_state`]): a
//! WebSocket's upgrade head or a resumable stream's request goes to a held
//! memfd when it does not fit what is left, so over TLS from about 145
//! (head) or 128 (request) bytes instead of 257 and 246.
//!
//! Over TLS a regenerated response must also come out in the same TLS
//! records, which follow the adapter's writes: bodies at hand and
//! [`stream::Resumable`] streams do; a streaming body that is not
//! resumable and is paced by time may be cut otherwise when it is replayed
//! after a crash, and its connection is then closed rather than continued.
//!
//! Limits: HTTP/1.1 (and 1.0) only — HTTP/2 is not served, a client that
//! sends its preface gets a 400; request bodies are held in memory up to
//! [`Server::max_request_size`]; the only protocol upgrade served is
//! WebSocket, through [`ws::WebSocketUpgrade`] (see [`ws`]).

#![forbid(unsafe_code)]

mod conn;
mod frame;
mod handle;
mod kept;
mod policy;
pub mod stream;
pub mod ws;

use std::future::{poll_fn, Future};
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use crate::conn::Io;
use bytes::Bytes;
use holdfast::tokio::Listener;
use holdfast::Mode;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tower_service::Service;

pub use crate::conn::{CommitFuture, Connection};
use crate::frame::{Framed, Framer};
pub use crate::handle::Handle;
pub use crate::policy::{ReplayPolicyLayer, WithReplayPolicy};

/// How much the adapter reads at a time while framing a request.
const READ_SIZE: usize = 64 * 1024;

/// Errors a service or a body may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `service` on every connection of `listener` with the default
/// [`Server`] settings, until the keeper asks this worker to stop.
pub async fn serve<S, B>(listener: Listener, service: S) -> Result<(), holdfast::Error>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Server::new().serve(listener, service).await
}

/// Serves `service` over TLS on every connection of `listener` with the
/// default [`Server`] settings; see [`Server::serve_tls`].
#[cfg(feature = "tls")]
pub async fn serve_tls<S, B>(
    listener: Listener,
    tls: holdfast_tls::TlsAcceptor,
    service: S,
) -> Result<(), holdfast::Error>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Server::new().serve_tls(listener, tls, service).await
}

/// The ALPN protocol list for a TLS acceptor of this adapter: HTTP/1.1
/// only (`holdfast_tls::TlsAcceptor::from_pem_files(cert, key, holdfast_http::ALPN)`).
pub const ALPN: &[&[u8]] = &[b"http/1.1"];

/// The adapter's settings.
#[derive(Clone, Debug)]
pub struct Server {
    max_head: usize,
    max_request: usize,
}

impl Default for Server {
    fn default() -> Server {
        Server {
            max_head: 64 * 1024,
            max_request: 16 * 1024 * 1024,
        }
    }
}

impl Server {
    pub fn new() -> Server {
        Server::default()
    }

    /// Largest request head (request line and headers) accepted; a larger
    /// one gets a 431. Default 64 KiB.
    pub fn max_head_size(mut self, bytes: usize) -> Server {
        self.max_head = bytes;
        self
    }

    /// Largest whole request (head and body) accepted; a larger one gets a
    /// 413. The request stays uncommitted until it is answered, so this
    /// also bounds what the library's spool holds for it (at most 64 MiB).
    /// Default 16 MiB.
    pub fn max_request_size(mut self, bytes: usize) -> Server {
        self.max_request = bytes;
        self
    }

    /// Serves `service` on every connection of `listener` until the keeper
    /// asks this worker to stop (pass-through: until the listener fails).
    pub async fn serve<S, B>(self, listener: Listener, service: S) -> Result<(), holdfast::Error>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        self.run(listener, None, service).await
    }

    /// [`Server::serve`] over TLS (HTTPS, and WebSockets as `wss://`):
    /// every connection goes through `tls` first (build it with ALPN
    /// [`ALPN`]), then is served as a plain one is, with the same
    /// guarantees — a TLS 1.3 session, its handshake included, survives
    /// the worker (see `holdfast_tls`). TLS 1.2 clients are served, but
    /// their connections close if the worker dies.
    #[cfg(feature = "tls")]
    pub async fn serve_tls<S, B>(
        self,
        listener: Listener,
        tls: holdfast_tls::TlsAcceptor,
        service: S,
    ) -> Result<(), holdfast::Error>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        self.run(listener, Some(tls), service).await
    }

    async fn run<S, B>(
        self,
        mut listener: Listener,
        #[cfg(feature = "tls")] tls: Option<holdfast_tls::TlsAcceptor>,
        #[cfg(not(feature = "tls"))] _tls: Option<std::convert::Infallible>,
        service: S,
    ) -> Result<(), holdfast::Error>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let kept = matches!(listener.mode(), Mode::Kept(_));
        let settings = Arc::new(self);
        while let Some(conn) = listener.accept().await? {
            let service = service.clone();
            let settings = settings.clone();
            #[cfg(feature = "tls")]
            let tls = tls.clone();
            tokio::spawn(async move {
                #[cfg(feature = "tls")]
                let conn: Io = match tls {
                    // A new connection's handshake, or a recovered one's
                    // session taken up again from its state.
                    Some(tls) => match tls.accept(conn).await {
                        Ok(t) => Box::new(t),
                        Err(e) => {
                            tracing::debug!(error = %e, "TLS connection ended");
                            return;
                        }
                    },
                    None => Box::new(conn),
                };
                #[cfg(not(feature = "tls"))]
                let conn: Io = Box::new(conn);
                if let Err(e) = settings.serve_connection(conn, service, kept).await {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
            });
        }
        Ok(())
    }

    /// One connection: frame a request, let hyper answer it, commit, repeat.
    async fn serve_connection<S, B>(&self, mut conn: Io, service: S, kept: bool) -> io::Result<()>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        if ws::is_ws_blob(conn.state().1) {
            return resume_websocket(conn, service, kept).await;
        }
        if stream::is_blob(conn.state().1) {
            match resume_stream(conn, service.clone(), kept).await? {
                Some(c) => conn = c,
                None => return Ok(()),
            }
        }
        // Input read but not yet answered: the start of the next request,
        // and any pipelined requests behind it.
        let mut input: Vec<u8> = Vec::new();
        loop {
            let mut framer = Framer::new(self.max_head, self.max_request);
            let mut continued = false;
            let req = loop {
                let framed = framer.frame(&input);
                // `100 Continue` depends only on the head, never on how much
                // of the body had arrived: a replay writes it again.
                if !continued
                    && !matches!(framed, Framed::Reject(_))
                    && framer.head().is_some_and(|h| h.expect_continue)
                {
                    conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                    continued = true;
                }
                match framed {
                    Framed::Complete(req) => break req,
                    Framed::Reject(status) => {
                        let date = http_date(conn.now()?);
                        conn.write_all(&plain_response(status, &date, true)).await?;
                        return conn.commit_and_close(input.len()).await;
                    }
                    Framed::Partial => {}
                }
                input.reserve(READ_SIZE);
                if conn.read_buf(&mut input).await? == 0 {
                    // The client left (or, between requests, the connection
                    // went to a new version): nothing to answer.
                    return Ok(());
                }
            };

            if conn.poisoned() {
                // This request was in flight in two crashes in a row: refuse
                // it without running the service again.
                let date = http_date(conn.now()?);
                let response = plain_response(StatusCode::INTERNAL_SERVER_ERROR, &date, req.close);
                conn.write_all(&response).await?;
                input.drain(..req.len);
                if req.close {
                    return conn.commit_and_close(req.len).await;
                }
                conn.commit(req.len, &[]).await?;
                continue;
            }

            let date = HeaderValue::from_str(&http_date(conn.now()?))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let request_bytes = if req.expect_continue {
                // Answered above: hyper must not send a second one.
                without_expect(&input[..req.head_len], &input[req.head_len..req.len])
            } else {
                Bytes::copy_from_slice(&input[..req.len])
            };
            let slot = Arc::new(Mutex::new(Some(conn)));
            let close = Arc::new(AtomicBool::new(req.close));
            let switched = Arc::new(AtomicBool::new(false));
            let upgrades = ws::Upgrades {
                slot: Arc::default(),
                resumed: false,
            };
            let tracker = stream::Tracker::new(request_bytes.clone(), req.len);
            let adapted = Adapted {
                inner: service.clone(),
                handle: Handle::new(slot.clone(), false, None),
                date,
                close: close.clone(),
                switched: switched.clone(),
                upgrades: upgrades.clone(),
                stream: tracker.slot.clone(),
                kept,
            };
            let io = OneRequest {
                input: request_bytes,
                conn: slot.clone(),
                discard: false,
                tracker,
            };
            let served = serve_one(io, adapted).await;
            // The request is over: handles a handler kept see none from now.
            let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            conn = taken.ok_or_else(|| io::Error::other("connection lost"))?;
            let io = match served {
                Ok(io) => io,
                // Moved to a new version at an item of a resumable stream:
                // it carries on there.
                Err(_) if conn.moved() => return Ok(()),
                // A body or service error cut the response short: the client
                // cannot tell where it ends, so the connection ends here.
                Err(e) => return Err(io::Error::other(e)),
            };
            // A resumable stream's first progress commit consumed the
            // request's input already.
            let consumed = if io.tracker.committed() { 0 } else { req.len };
            let upgrade = upgrades
                .slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let (Some(reg), true) = (upgrade, switched.load(Ordering::Relaxed)) {
                // The 101 is out: from here on the connection is a
                // WebSocket, and its blob says how to resume it.
                let head = ws::keep_head(&mut conn, &input[..req.head_len])?;
                input.drain(..req.len);
                conn.commit(req.len, &ws::blob(&head, &reg.state)).await?;
                return run_websocket(conn, input, head, reg, false, kept).await;
            }
            input.drain(..req.len);
            if close.load(Ordering::Relaxed) {
                return conn.commit_and_close(consumed).await;
            }
            conn.commit(consumed, &[]).await?;
            if io.tracker.holds_request() {
                conn.unhold(stream::REQUEST_TAG)?;
            }
        }
    }
}

/// A new worker carries on with a resumable stream (see [`stream`]): its
/// request runs through the service again with the committed progress, the
/// regenerated head is not sent, and the items after the commit are. Gives
/// the connection back for its next request, if it stays open.
async fn resume_stream<S, B>(mut conn: Io, service: S, kept: bool) -> io::Result<Option<Io>>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Closing is all that is left when the stream cannot go on: the client
    // sees a chunked body end without its last chunk, not a reset.
    let give_up = |why: String| {
        tracing::warn!("a resumable stream cannot continue ({why}); closing its connection");
    };
    let Some(saved) = stream::parse_blob(conn.state().1) else {
        give_up("its saved state is unreadable".into());
        conn.commit_and_close(0).await?;
        return Ok(None);
    };
    let request = match stream::load_request(&mut conn, &saved.request) {
        Ok(r) => r,
        Err(e) => {
            give_up(e.to_string());
            conn.commit_and_close(0).await?;
            return Ok(None);
        }
    };
    let close_after = match Framer::new(usize::MAX, usize::MAX).frame(&request) {
        Framed::Complete(r) if r.len == request.len() => r.close,
        _ => {
            give_up("its saved request is not one request".into());
            conn.commit_and_close(0).await?;
            return Ok(None);
        }
    };
    if conn.poisoned() {
        give_up("it was in flight during consecutive crashes".into());
        conn.commit_and_close(0).await?;
        return Ok(None);
    }
    tracing::debug!(progress = saved.progress.len(), "resuming a stream");
    let slot = Arc::new(Mutex::new(Some(conn)));
    let close = Arc::new(AtomicBool::new(close_after));
    let tracker = stream::Tracker::resuming(&saved);
    let adapted = Adapted {
        inner: service,
        handle: Handle::new(slot.clone(), false, Some(saved.progress.into())),
        // The head is not sent: no `Date` to record.
        date: HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
        close: close.clone(),
        switched: Arc::new(AtomicBool::new(false)),
        upgrades: ws::Upgrades {
            slot: Arc::default(),
            resumed: false,
        },
        stream: tracker.slot.clone(),
        kept,
    };
    let io = OneRequest {
        input: Bytes::from(request),
        conn: slot.clone(),
        discard: false,
        tracker,
    };
    let served = serve_one(io, adapted).await;
    let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    let mut conn = taken.ok_or_else(|| io::Error::other("connection lost"))?;
    let io = match served {
        Ok(io) => io,
        Err(_) if conn.moved() => return Ok(None),
        Err(e) => {
            give_up(e.to_string());
            return Err(io::Error::other(e));
        }
    };
    if close.load(Ordering::Relaxed) {
        conn.commit_and_close(0).await?;
        return Ok(None);
    }
    conn.commit(0, &[]).await?;
    if io.tracker.holds_request() {
        conn.unhold(stream::REQUEST_TAG)?;
    }
    Ok(Some(conn))
}

/// Runs a WebSocket's callback, then closes what the application left open.
async fn run_websocket(
    conn: Io,
    input: Vec<u8>,
    head: ws::Head,
    reg: ws::Registered,
    resumed: bool,
    kept: bool,
) -> io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let socket = ws::WebSocket::new(conn, input, head, reg.state, resumed, reg.max_message, tx);
    CrashOnPanic {
        inner: (reg.callback)(socket),
        kept,
    }
    .await;
    let Ok(back) = rx.await else {
        return Ok(());
    };
    if back.moved || back.ended {
        return Ok(());
    }
    // The application returned without closing: close normally.
    let mut conn = back.conn;
    conn.write_all(&ws::close_frame(1000)).await?;
    conn.commit_and_close(back.uncommitted).await
}

/// A new worker carries on with a WebSocket: the upgrade request runs
/// through the service again (its response unsent) to find the callback,
/// which gets the committed state.
async fn resume_websocket<S, B>(mut conn: Io, service: S, kept: bool) -> io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Some((head_kind, state)) = ws::parse_blob(conn.state().1) else {
        tracing::warn!("a WebSocket's saved state is unreadable; closing it (1011)");
        conn.write_all(&ws::close_frame(1011)).await?;
        return conn.commit_and_close(0).await;
    };
    let head = ws::load_head(&mut conn, &head_kind)?;
    tracing::debug!(head = %String::from_utf8_lossy(&head), "resuming a WebSocket");
    let switched = Arc::new(AtomicBool::new(false));
    let upgrades = ws::Upgrades {
        slot: Arc::default(),
        resumed: true,
    };
    let io = OneRequest {
        input: Bytes::from(head),
        conn: Arc::new(Mutex::new(None)),
        discard: true,
        tracker: stream::Tracker::off(),
    };
    let adapted = Adapted {
        inner: service,
        handle: Handle::new(Arc::new(Mutex::new(None)), true, None),
        date: HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
        close: Arc::new(AtomicBool::new(false)),
        switched: switched.clone(),
        upgrades: upgrades.clone(),
        stream: stream::LinkSlot::default(),
        kept,
    };
    let served = serve_one(io, adapted).await;
    let upgrade = upgrades
        .slot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    match (upgrade, switched.load(Ordering::Relaxed), served) {
        (Some(mut reg), true, Ok(_)) => {
            reg.state = state;
            run_websocket(conn, Vec::new(), head_kind, reg, true, kept).await
        }
        (_, _, served) => {
            // This version no longer upgrades that request (its route
            // changed): the client is told the server is going away.
            tracing::warn!(error = ?served.err(), "a resumed WebSocket's request no longer upgrades; closing it (1001)");
            conn.write_all(&ws::close_frame(1001)).await?;
            conn.commit_and_close(0).await
        }
    }
}

/// hyper answers the one request `io` holds; its own `Date` is off.
async fn serve_one<S, B>(io: OneRequest, adapted: Adapted<S>) -> Result<OneRequest, hyper::Error>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    http1::Builder::new()
        .auto_date_header(false)
        .half_close(true)
        .keep_alive(true)
        .serve_connection(io, adapted)
        .without_shutdown()
        .await
        .map(|parts| parts.io)
}

/// A complete response the adapter writes itself (errors, poison).
fn plain_response(status: StatusCode, date: &str, close: bool) -> Vec<u8> {
    let reason = status.canonical_reason().unwrap_or("");
    let connection = if close { "connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {} {reason}\r\ndate: {date}\r\ncontent-length: 0\r\n{connection}\r\n",
        status.as_u16()
    )
    .into_bytes()
}

/// The request with its `Expect` header lines left out.
fn without_expect(head: &[u8], body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(head.len() + body.len());
    for line in head.split_inclusive(|&b| b == b'\n') {
        let name = line.split(|&b| b == b':').next().unwrap_or(b"");
        if !name.eq_ignore_ascii_case(b"expect") {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// An HTTP date (IMF-fixdate) for seconds since the epoch; clamped because
/// `httpdate` refuses years past 9999.
fn http_date(secs: u64) -> String {
    const MAX: u64 = 253_402_300_799;
    httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.min(MAX)))
}

/// What hyper sees as its connection: one framed request to read, then end
/// of input; writes go to the real connection.
struct OneRequest {
    input: Bytes,
    conn: Arc<Mutex<Option<Io>>>,
    /// Output goes nowhere: a resumed WebSocket's upgrade answer, which
    /// the client already has.
    discard: bool,
    /// Commits at the items of a resumable response.
    tracker: stream::Tracker,
}

impl OneRequest {
    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Io, &mut stream::Tracker) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(conn) => f(conn, &mut self.tracker),
            None => Poll::Ready(Err(io::Error::other("connection lost"))),
        }
    }
}

impl hyper::rt::Read for OneRequest {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this.input.len().min(buf.remaining());
        buf.put_slice(&this.input.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for OneRequest {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.discard {
            return Poll::Ready(Ok(buf.len()));
        }
        self.get_mut()
            .with_conn(|c, tracker| tracker.poll_write(c, cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.discard {
            return Poll::Ready(Ok(()));
        }
        self.get_mut().with_conn(|c, tracker| {
            ready!(tracker.poll_due(c, cx))?;
            Pin::new(c).poll_flush(cx)
        })
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The adapter decides when the connection ends, after the commit.
        Poll::Ready(Ok(()))
    }
}

/// The user's service as hyper sees it: with the [`Handle`] in the
/// request's extensions and a recorded `Date` on the response.
struct Adapted<S> {
    inner: S,
    handle: Handle,
    date: HeaderValue,
    close: Arc<AtomicBool>,
    /// The response switched protocols.
    switched: Arc<AtomicBool>,
    upgrades: ws::Upgrades,
    /// Where a resumable response's link goes, for the I/O layer.
    stream: stream::LinkSlot,
    kept: bool,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Adapted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let mut inner = self.inner.clone();
        let date = self.date.clone();
        let close = self.close.clone();
        let switched = self.switched.clone();
        let stream = self.stream.clone();
        let kept = self.kept;
        req.extensions_mut().insert(self.handle.clone());
        req.extensions_mut().insert(self.upgrades.clone());
        let answer = async move {
            poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let mut response = inner.call(req).await.map_err(Into::into)?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                switched.store(true, Ordering::Relaxed);
            }
            if let Some(stream::StreamLink(link)) = response.extensions_mut().remove() {
                // Under a keeper, the I/O layer commits at its items.
                if kept {
                    link.attach();
                    *stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
                }
            }
            let headers = response.headers_mut();
            headers.entry(http::header::DATE).or_insert(date);
            let closes = headers
                .get_all(http::header::CONNECTION)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            if closes {
                close.store(true, Ordering::Relaxed);
            }
            Ok(response)
        };
        Box::pin(CrashOnPanic {
            inner: Box::pin(answer),
            kept,
        })
    }
}

/// Under a keeper, a handler that panics crashes the worker: its request
/// is then replayed by the next worker (and refused as poison if it kills
/// that one too) instead of its connection closing with the task. Without
/// a keeper the panic unwinds as usual.
struct CrashOnPanic<F: ?Sized> {
    inner: Pin<Box<F>>,
    kept: bool,
}

impl<F: Future + ?Sized> Future for CrashOnPanic<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let kept = self.kept;
        let inner = self.inner.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(p) => p,
            Err(_) if kept => {
                tracing::error!(
                    "a request handler panicked; ending this worker so the request is replayed"
                );
                std::process::abort();
            }
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }
}
