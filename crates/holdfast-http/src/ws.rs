//! WebSockets that survive crashes and upgrades.
//!
//! After the `101 Switching Protocols`, a WebSocket is a connection like any
//! other under holdfast: input is peeked, message boundaries are commit
//! points, and a new worker carries on from the last one. What it needs
//! that a plain request does not:
//!
//! - **Who serves it after a crash.** The upgrade request's head is kept
//!   with the connection (in its state blob, or in a held memfd when it is
//!   large). A new worker runs that request through the application again,
//!   without writing its response: the same route, the same extractors, the
//!   same [`WebSocketUpgrade::on_upgrade`] callback, now given a
//!   [`WebSocket`] whose [`WebSocket::state`] is what the last commit saved
//!   and [`WebSocket::resumed`] says so.
//! - **Exact frames.** The adapter cuts the input into frames itself and
//!   hands them one at a time to tungstenite's protocol engine (masking,
//!   fragmentation, UTF-8, control frames, limits), so it knows the input
//!   offset of every message boundary.
//! - **Output that does not depend on timing.** Between two commits a
//!   worker may receive frames and may send what something else (a shared
//!   log, a timer) asked for. [`WebSocket::next`] races the two and records
//!   which came first after how many frames; a replay of that window makes
//!   the same choices in the same order, so it writes the same bytes.
//!
//! The application commits after each event: [`WebSocket::commit`] with
//! its own small state (at most [`MAX_STATE`] bytes). Pings are answered
//! by the adapter (and committed by it when nothing else is pending);
//! a close frame is answered and the connection closed cleanly.

use std::future::Future;
use std::io::{self, Cursor, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::conn::Io;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tungstenite::error::{CapacityError, Error as WsError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::{CloseFrame, FrameHeader};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

/// The most application state a commit keeps.
pub const MAX_STATE: usize = 112;
/// Request heads up to this size are kept in the state blob when the
/// connection has room for them ([`head_inline`]); larger ones in a held
/// memfd.
const HEAD_INLINE: usize = 256;
/// Marker, version, head kind, two lengths.
const BLOB_OVERHEAD: usize = 4 + 1 + 1 + 2 + 2;
/// The held-channel tag of a large upgrade head.
const HEAD_TAG: u32 = 0x5753_4844;
/// Marks a connection's state blob as a WebSocket's.
const MAGIC: &[u8; 4] = b"HFWS";
const BLOB_VERSION: u8 = 1;
/// Default largest message (and frame).
pub const DEFAULT_MAX_MESSAGE: usize = 16 << 20;

/// A complete message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Bytes),
}

/// What [`WebSocket::next`] saw first.
#[derive(Debug)]
pub enum Event<T> {
    /// A message from the client. Act on it, then commit.
    Message(Message),
    /// The other future finished first: send what it asked for, then commit.
    Ready(T),
    /// The client closed (the close frame was answered), the protocol was
    /// broken (the adapter sent the close code), or the connection ended.
    Closed,
    /// The connection went to a new version of the service (`holdfast
    /// upgrade`): return without doing anything more; it carries on there.
    Moved,
}

pub(crate) type Callback =
    Box<dyn FnOnce(WebSocket) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Where the adapter finds the callback a handler registered.
pub(crate) type UpgradeSlot = Arc<Mutex<Option<Registered>>>;

/// A handler's answer to an upgrade: its callback, limit and first state.
pub(crate) struct Registered {
    pub(crate) callback: Callback,
    pub(crate) max_message: usize,
    pub(crate) state: Vec<u8>,
}

/// What the adapter gets back when a WebSocket is dropped.
pub(crate) struct Returned {
    pub(crate) conn: Io,
    /// Input already read but not consumed (the commit point first).
    pub(crate) uncommitted: usize,
    pub(crate) ended: bool,
    pub(crate) moved: bool,
}

/// The head of the upgrade request, as kept with the connection.
/// The head of the upgrade request, as kept with the connection.
pub(crate) type Head = crate::kept::Kept;

/// A WebSocket connection served zero-loss.
pub struct WebSocket {
    inner: Option<Inner>,
    back: Option<tokio::sync::oneshot::Sender<Returned>>,
}

struct Inner {
    conn: Io,
    ctx: WebSocketContext,
    /// Input peeked since the last commit.
    input: Vec<u8>,
    /// Bytes of `input` handed to the protocol engine.
    fed: usize,
    /// The last frame boundary outside a fragmented message: where a
    /// commit may cut.
    safe: usize,
    /// Frames fed since `safe` and since the last commit.
    frames_since_safe: u32,
    frames: u32,
    /// A fragmented message is being received.
    in_message: bool,
    /// The recorded choice of a replayed window: "the other event came
    /// after this many frames".
    choice: Option<u32>,
    /// Output the engine produced, not yet written.
    out: Vec<u8>,
    head: Head,
    state: Vec<u8>,
    /// The schema version of `state` (see [`holdfast::Options`]).
    state_version: u16,
    /// The application received a message or sent one since the commit.
    dirty: bool,
    resumed: bool,
    ended: bool,
    moved: bool,
    max_message: usize,
}

/// The engine's view of the connection: the frame the adapter exposes,
/// then "would block"; writes are collected.
struct Exposed<'a> {
    input: &'a [u8],
    out: &'a mut Vec<u8>,
}

impl Read for Exposed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.input.len().min(buf.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Exposed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One step of input processing.
enum Step {
    Message(Message),
    Closed,
    Progress,
    NeedInput,
}

impl WebSocket {
    pub(crate) fn new(
        conn: Io,
        input: Vec<u8>,
        head: Head,
        state: Vec<u8>,
        resumed: bool,
        max_message: usize,
        back: tokio::sync::oneshot::Sender<Returned>,
    ) -> WebSocket {
        // Frames come in one at a time and go out at once: small buffers
        // (the defaults, 128 KiB each, would be 2.5 GiB at 10,000 idle
        // WebSockets).
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let state_version = conn.state().0;
        WebSocket {
            inner: Some(Inner {
                state_version,
                conn,
                ctx: WebSocketContext::new(Role::Server, Some(config)),
                input,
                fed: 0,
                safe: 0,
                frames_since_safe: 0,
                frames: 0,
                in_message: false,
                choice: None,
                out: Vec::new(),
                head,
                state,
                dirty: false,
                resumed,
                ended: false,
                moved: false,
                max_message,
            }),
            back: Some(back),
        }
    }

    fn inner(&mut self) -> io::Result<&mut Inner> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("WebSocket already ended"))
    }

    /// The application state saved by the last [`WebSocket::commit`]
    /// (empty on a new connection).
    pub fn state(&self) -> &[u8] {
        self.inner.as_ref().map_or(&[], |i| &i.state)
    }

    /// The schema version of [`WebSocket::state`]: after an upgrade, the
    /// version the previous build wrote (one of those this build declares
    /// it reads, [`holdfast::Options::reads_state_versions`]); after this
    /// build's first commit, its own.
    pub fn state_version(&self) -> u16 {
        self.inner.as_ref().map_or(0, |i| i.state_version)
    }

    /// This WebSocket was served by a worker that is gone (a crash, a hang,
    /// an upgrade), and its state is the one that worker committed.
    pub fn resumed(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.resumed)
    }

    /// The next message from the client, or `other`'s output if it comes
    /// first. Which came first is recorded, so a worker replaying this
    /// stretch after a crash decides the same way; `other` must therefore
    /// be ready again in a replay (a wait for a shared log to pass a
    /// sequence number kept in the state is). Pings are answered here.
    pub async fn next<F: Future>(&mut self, other: F) -> io::Result<Event<F::Output>> {
        let ws = self.inner()?;
        if ws.ended {
            return Ok(Event::Closed);
        }
        if ws.conn.poisoned() {
            // What this WebSocket received last was in flight in two
            // crashes in a row: it is not run a third time, and not
            // silently dropped either.
            tracing::warn!("a WebSocket message crashed the service twice; closing with 1011");
            ws.close_with(CloseCode::Error, "message not processed")
                .await;
            return Ok(Event::Closed);
        }
        tokio::pin!(other);
        if ws.choice.is_none() {
            ws.choice = match ws.conn.replayed()? {
                Some(v) => Some(u32::from_le_bytes(v.as_slice().try_into().map_err(
                    |_| io::Error::new(io::ErrorKind::InvalidData, "bad recorded WebSocket choice"),
                )?)),
                None => None,
            };
        }
        loop {
            if ws.choice == Some(ws.frames) {
                ws.choice = None;
                return Ok(Event::Ready(other.await));
            }
            match ws.step() {
                Step::Message(m) => {
                    ws.write_out().await?;
                    return Ok(Event::Message(m));
                }
                Step::Closed => {
                    ws.end().await;
                    return Ok(Event::Closed);
                }
                Step::Progress => {
                    ws.write_out().await?;
                    ws.commit_control().await?;
                    continue;
                }
                Step::NeedInput => {}
            }
            let got = if ws.choice.is_some() {
                // A replay: the input this window had is all in the kernel.
                Some(ws.read_more().await)
            } else {
                tokio::select! {
                    biased;
                    r = ws.read_more() => Some(r),
                    v = &mut other => {
                        // Before any byte of what it sends goes out.
                        ws.conn.record(Box::new(|| ws.frames.to_le_bytes().to_vec()))?;
                        return Ok(Event::Ready(v));
                    }
                }
            };
            match got {
                Some(Ok(0)) | Some(Err(_)) if ws.conn.moved() => {
                    ws.moved = true;
                    ws.ended = true;
                    return Ok(Event::Moved);
                }
                Some(Ok(0)) => {
                    // The client went away without a close frame.
                    ws.ended = true;
                    ws.end().await;
                    return Ok(Event::Closed);
                }
                Some(Ok(_)) | None => {}
                Some(Err(e)) => return Err(e),
            }
        }
    }

    /// The next message from the client (pings answered on the way).
    pub async fn recv(&mut self) -> io::Result<Event<()>> {
        self.next(std::future::pending::<()>()).await
    }

    /// Sends a message.
    pub async fn send(&mut self, msg: Message) -> io::Result<()> {
        let ws = self.inner()?;
        let msg = match msg {
            Message::Text(t) => tungstenite::Message::text(t),
            Message::Binary(b) => tungstenite::Message::Binary(b),
        };
        let mut io = Exposed {
            input: &[],
            out: &mut ws.out,
        };
        ws.ctx
            .write(&mut io, msg)
            .and_then(|()| ws.ctx.flush(&mut io))
            .map_err(ws_io)?;
        ws.dirty = true;
        ws.write_out().await
    }

    /// A commit point: every message received so far is done with, every
    /// message sent so far is what they and the events before asked for,
    /// and `state` (at most [`MAX_STATE`] bytes) is what a new worker needs
    /// to carry on.
    pub async fn commit(&mut self, state: &[u8]) -> io::Result<()> {
        let ws = self.inner()?;
        if state.len() > MAX_STATE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "WebSocket state of {} bytes; at most {MAX_STATE}",
                    state.len()
                ),
            ));
        }
        ws.state = state.to_vec();
        ws.commit_now().await
    }

    /// Sends a close frame and ends the connection cleanly.
    pub async fn close(mut self, code: u16, reason: &str) -> io::Result<()> {
        let ws = self.inner()?;
        ws.close_with(CloseCode::from(code), reason).await;
        Ok(())
    }
}

impl Drop for WebSocket {
    fn drop(&mut self) {
        if let (Some(ws), Some(back)) = (self.inner.take(), self.back.take()) {
            let _ = back.send(Returned {
                uncommitted: ws.input.len(),
                ended: ws.ended,
                moved: ws.moved,
                conn: ws.conn,
            });
        }
    }
}

impl Inner {
    /// Feeds the next whole frame in `input` to the engine.
    fn step(&mut self) -> Step {
        let avail = &self.input[self.fed..];
        let mut cur = Cursor::new(avail);
        let (header_len, len) = match FrameHeader::parse(&mut cur) {
            Ok(Some((_, len))) => (cur.position() as usize, len),
            Ok(None) => return Step::NeedInput,
            Err(e) => return self.fail(&e),
        };
        if len > self.max_message as u64 {
            return self.fail(&WsError::Capacity(CapacityError::MessageTooLong {
                size: len as usize,
                max_size: self.max_message,
            }));
        }
        let total = header_len + len as usize;
        if avail.len() < total {
            return Step::NeedInput;
        }
        let mut io = Exposed {
            input: &avail[..total],
            out: &mut self.out,
        };
        let r = self.ctx.read(&mut io);
        self.fed += total;
        self.frames += 1;
        self.frames_since_safe += 1;
        let step = match r {
            Ok(tungstenite::Message::Text(t)) => {
                self.in_message = false;
                Step::Message(Message::Text(t.as_str().to_owned()))
            }
            Ok(tungstenite::Message::Binary(b)) => {
                self.in_message = false;
                Step::Message(Message::Binary(b))
            }
            Ok(tungstenite::Message::Close(_)) => {
                // The engine queued the answering close frame.
                let mut io = Exposed {
                    input: &[],
                    out: &mut self.out,
                };
                let _ = self.ctx.flush(&mut io);
                self.ended = true;
                Step::Closed
            }
            Ok(tungstenite::Message::Ping(_)) => {
                let mut io = Exposed {
                    input: &[],
                    out: &mut self.out,
                };
                if let Err(e) = self.ctx.flush(&mut io) {
                    return self.fail(&e);
                }
                Step::Progress
            }
            Ok(_) => Step::Progress,
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // A fragment of a message still incomplete.
                self.in_message = true;
                Step::Progress
            }
            Err(e) => return self.fail(&e),
        };
        if !self.in_message {
            self.safe = self.fed;
            self.frames_since_safe = 0;
        }
        if let Step::Message(_) = step {
            self.dirty = true;
        }
        step
    }

    /// The client broke the protocol: queue the close code RFC 6455 names
    /// and end this connection only.
    fn fail(&mut self, e: &WsError) -> Step {
        let code = match e {
            WsError::Capacity(_) => CloseCode::Size,
            WsError::Utf8(_) => CloseCode::Invalid,
            _ => CloseCode::Protocol,
        };
        tracing::debug!(error = %e, "WebSocket closed: bad input");
        let frame = tungstenite::protocol::frame::Frame::close(Some(CloseFrame {
            code,
            reason: "".into(),
        }));
        let _ = frame.format(&mut self.out);
        self.ended = true;
        Step::Closed
    }

    /// Writes what the engine produced; held back while a fragmented
    /// message arrives (a pong for a ping inside it goes out after it, so a
    /// commit never covers an answer to input it does not consume).
    async fn write_out(&mut self) -> io::Result<()> {
        if self.out.is_empty() || (self.in_message && !self.ended) {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        self.conn.write_all(&out).await?;
        self.conn.flush().await
    }

    /// After control frames only: commit them, so pings never pile up in
    /// a window.
    async fn commit_control(&mut self) -> io::Result<()> {
        if self.dirty || self.in_message || self.choice.is_some() || !self.out.is_empty() {
            return Ok(());
        }
        self.commit_now().await
    }

    async fn commit_now(&mut self) -> io::Result<()> {
        self.write_out().await?;
        let blob = blob(&self.head, &self.state);
        self.conn.commit(self.safe, &blob).await?;
        self.state_version = self.conn.state().0;
        self.input.drain(..self.safe);
        if self.input.is_empty() && self.input.capacity() > 64 * 1024 {
            // An idle WebSocket keeps no large buffer.
            self.input = Vec::new();
        }
        self.fed -= self.safe;
        self.safe = 0;
        self.frames = self.frames_since_safe;
        self.dirty = false;
        Ok(())
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        self.input.reserve(8 * 1024);
        self.conn.read_buf(&mut self.input).await
    }

    async fn close_with(&mut self, code: CloseCode, reason: &str) {
        if self.ended {
            return;
        }
        let mut io = Exposed {
            input: &[],
            out: &mut self.out,
        };
        let _ = self.ctx.close(
            &mut io,
            Some(CloseFrame {
                code,
                reason: reason.to_owned().into(),
            }),
        );
        self.in_message = false;
        self.ended = true;
        self.end().await;
    }

    /// The connection is over: what the engine still has goes out, then
    /// everything read is committed and the connection closes with a FIN.
    async fn end(&mut self) {
        self.in_message = false;
        if let Err(e) = self.write_out().await {
            tracing::debug!(error = %e, "WebSocket close not sent");
        }
        let n = self.input.len();
        self.input.clear();
        self.fed = 0;
        self.safe = 0;
        if let Err(e) = self.conn.commit_and_close(n).await {
            tracing::debug!(error = %e, "WebSocket close");
        }
    }
}

fn ws_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        e => io::Error::other(e),
    }
}

/// The connection's state blob: marker, version, the upgrade head (or a
/// note that it is held), the application's state.
pub(crate) fn blob(head: &Head, state: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOB_OVERHEAD + HEAD_INLINE + state.len());
    b.extend_from_slice(MAGIC);
    b.push(BLOB_VERSION);
    head.put(&mut b);
    b.extend_from_slice(&(state.len() as u16).to_le_bytes());
    b.extend_from_slice(state);
    b
}

/// A WebSocket's blob, parsed: its head and the application state.
pub(crate) fn parse_blob(b: &[u8]) -> Option<(Head, Vec<u8>)> {
    let mut r = holdfast::blob::Reader::new(b);
    if r.take(4)? != MAGIC || r.u8()? != BLOB_VERSION {
        return None;
    }
    let head = Head::take(&mut r, 0..=HEAD_INLINE)?;
    let state_len = usize::from(r.u16()?);
    let state = r.take(state_len)?.to_vec();
    if !r.is_empty() || state_len > MAX_STATE {
        return None;
    }
    Some((head, state))
}

/// Whether a connection's state blob is a WebSocket's.
pub(crate) fn is_ws_blob(b: &[u8]) -> bool {
    b.starts_with(MAGIC)
}

/// Keeps a request head with the connection: in the blob if small, else in
/// a memfd the keeper holds.
pub(crate) fn keep_head(conn: &mut Io, head: &[u8]) -> io::Result<Head> {
    Head::keep(
        conn,
        head,
        head_inline(conn.max_state()),
        HEAD_TAG,
        "hf-ws-head",
    )
}

/// The largest head kept in the blob of a connection whose commits save
/// up to `room` bytes: what the blob's own fields and the application's
/// largest state leave (less over TLS, whose session takes part of it),
/// at most [`HEAD_INLINE`].
fn head_inline(room: usize) -> usize {
    room.saturating_sub(BLOB_OVERHEAD + MAX_STATE)
        .min(HEAD_INLINE)
}

/// The head of a resumed WebSocket.
pub(crate) fn load_head(conn: &mut Io, head: &Head) -> io::Result<Vec<u8>> {
    head.load(conn, HEAD_TAG, "the WebSocket's held head")
}

/// A close frame with `code`, written raw (no engine at hand).
pub(crate) fn close_frame(code: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let frame = tungstenite::protocol::frame::Frame::close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: "".into(),
    }));
    let _ = frame.format(&mut out);
    out
}

/// What the adapter puts in every request's extensions for the
/// [`WebSocketUpgrade`] extractor.
#[derive(Clone)]
pub(crate) struct Upgrades {
    pub(crate) slot: UpgradeSlot,
    pub(crate) resumed: bool,
}

/// The axum extractor for a WebSocket upgrade served zero-loss: use it as
/// axum's own (`ws.on_upgrade(|socket| async move { … })`). The handler
/// also runs again, its response unsent, when a new worker resumes the
/// WebSocket: keep it free of side effects, or look at
/// [`WebSocketUpgrade::resumed`].
pub struct WebSocketUpgrade {
    accept: String,
    upgrades: Upgrades,
    max_message: usize,
    state: Vec<u8>,
}

impl WebSocketUpgrade {
    /// A new worker is resuming this WebSocket; the callback will get its
    /// committed state.
    pub fn resumed(&self) -> bool {
        self.upgrades.resumed
    }

    /// The largest message (and frame) accepted; a larger one closes the
    /// WebSocket with 1009. Default 16 MiB. A message stays uncommitted
    /// until it is whole, so this also bounds what the spool holds.
    pub fn max_message_size(mut self, bytes: usize) -> WebSocketUpgrade {
        self.max_message = bytes;
        self
    }

    /// The application state the WebSocket starts with (see
    /// [`WebSocket::state`]), committed with the upgrade itself: what the
    /// handler decided (a member id, a position in a log) survives a crash
    /// before the callback's first commit. At most [`MAX_STATE`] bytes;
    /// ignored when resuming (the committed state wins).
    pub fn state(mut self, state: Vec<u8>) -> WebSocketUpgrade {
        self.state = state;
        self
    }

    /// Switches protocols: the response is the `101`, and `callback` gets
    /// the WebSocket once it is sent (or, after a crash, in the new worker).
    #[cfg(feature = "axum")]
    pub fn on_upgrade<F, Fut>(self, callback: F) -> axum::response::Response
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let cb: Callback = Box::new(move |ws| Box::pin(callback(ws)));
        let mut state = self.state;
        state.truncate(MAX_STATE);
        *self.upgrades.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Registered {
            callback: cb,
            max_message: self.max_message,
            state,
        });
        let mut r = axum::response::Response::new(axum::body::Body::empty());
        *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("websocket"),
        );
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        if let Ok(v) = http::HeaderValue::from_str(&self.accept) {
            h.insert(http::header::SEC_WEBSOCKET_ACCEPT, v);
        }
        r
    }
}

/// Whether a comma-separated header holds `token` (any case).
fn has_token(headers: &http::HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<WebSocketUpgrade, Self::Rejection> {
        use http::header::{CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
        use http::StatusCode;
        if parts.method != http::Method::GET {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                "WebSocket upgrades use GET\n",
            ));
        }
        if !has_token(&parts.headers, UPGRADE, "websocket")
            || !has_token(&parts.headers, CONNECTION, "upgrade")
        {
            return Err((
                StatusCode::UPGRADE_REQUIRED,
                "a WebSocket upgrade is required here\n",
            ));
        }
        if parts
            .headers
            .get(SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            return Err((
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version must be 13\n",
            ));
        }
        let Some(key) = parts.headers.get(SEC_WEBSOCKET_KEY) else {
            return Err((StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing\n"));
        };
        let Some(upgrades) = parts.extensions.get::<Upgrades>().cloned() else {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "not served by holdfast_http\n",
            ));
        };
        Ok(WebSocketUpgrade {
            accept: tungstenite::handshake::derive_accept_key(key.as_bytes()),
            upgrades,
            max_message: DEFAULT_MAX_MESSAGE,
            state: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_and_garbage_is_refused() {
        let b = blob(&Head::Inline(b"GET / HTTP/1.1\r\n\r\n".to_vec()), b"st");
        let (h, s) = parse_blob(&b).unwrap();
        assert!(matches!(h, Head::Inline(ref x) if x == b"GET / HTTP/1.1\r\n\r\n"));
        assert_eq!(s, b"st");
        let b = blob(&Head::Held, b"");
        assert!(matches!(parse_blob(&b), Some((Head::Held, _))));
        for n in 0..b.len() {
            assert!(parse_blob(&b[..n]).is_none());
        }
        assert!(parse_blob(b"HFWS\x02").is_none());
    }

    /// The largest blob kept inline fits the room of each kind of
    /// connection: all of the state over plain TCP, what TLS leaves.
    #[test]
    fn the_largest_inline_blob_fits_the_connection() {
        let rooms = [
            holdfast::MAX_STATE,
            #[cfg(feature = "tls")]
            holdfast_tls::MAX_APP_STATE,
        ];
        for room in rooms {
            let n = head_inline(room);
            let b = blob(&Head::Inline(vec![b'x'; n]), &[1; MAX_STATE]);
            assert!(b.len() <= room, "{} > {room}", b.len());
            assert!(parse_blob(&b).is_some());
            // One more byte would not fit, unless the cap is reached.
            assert!(n == HEAD_INLINE || b.len() == room);
        }
        assert_eq!(head_inline(holdfast::MAX_STATE), HEAD_INLINE);
    }

    proptest::proptest! {
        /// A state blob is read back from a journal any worker may have
        /// scribbled on: no input panics, and what is written reads back.
        #[test]
        fn blob_decoder_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = parse_blob(&data);
            let mut tagged = MAGIC.to_vec();
            tagged.push(BLOB_VERSION);
            tagged.extend_from_slice(&data);
            let _ = parse_blob(&tagged);
        }

        #[test]
        fn blobs_round_trip(head in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=256),
                            state in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=MAX_STATE)) {
            let (h, s) = parse_blob(&blob(&Head::Inline(head.clone()), &state)).unwrap();
            proptest::prop_assert!(matches!(h, Head::Inline(ref x) if *x == head));
            proptest::prop_assert_eq!(s, state);
        }
    }
}
