//! What a handler reaches of its connection.

use std::io;
use std::sync::{Arc, Mutex};

use crate::conn::Io;
use holdfast::ReplayPolicy;

/// The connection of the request being handled, as a request extension
/// (`req.extensions().get::<Handle>()`, or the axum extractor).
///
/// A replayed request must produce the same response bytes: values that
/// differ from run to run (the time, a random id) go through
/// [`Handle::now`] / [`Handle::record`], which return on replay what they
/// returned the first time. A handle is good for its own request only:
/// once the response is written its methods fail (`poisoned` and the
/// other flags read `false`). In a WebSocket upgrade run again to resume
/// the WebSocket, `now` and `record` return fresh values, unrecorded: the
/// callback should take what it needs from the WebSocket's state.
#[derive(Clone)]
pub struct Handle {
    conn: Arc<Mutex<Option<Io>>>,
    /// The request is a WebSocket upgrade run again to resume it: nothing
    /// is recorded (its answer is not sent).
    resumed: bool,
    /// The request resumes a stream from this progress.
    progress: Option<Arc<[u8]>>,
}

impl Handle {
    pub(crate) fn new(
        conn: Arc<Mutex<Option<Io>>>,
        resumed: bool,
        progress: Option<Arc<[u8]>>,
    ) -> Handle {
        Handle {
            conn,
            resumed,
            progress,
        }
    }

    /// The request is run again to resume a [`Resumable`] stream after the
    /// item that committed this progress: produce only the items after it.
    /// `None` when the request is new (and always in pass-through mode).
    /// See [`crate::stream`].
    ///
    /// [`Resumable`]: crate::stream::Resumable
    pub fn progress(&self) -> Option<Vec<u8>> {
        self.progress.as_deref().map(<[u8]>::to_vec)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Io) -> io::Result<T>) -> io::Result<T> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(conn) => f(conn),
            None => Err(io::Error::other("the request of this handle is over")),
        }
    }

    fn flag(&self, f: impl FnOnce(&Io) -> bool) -> bool {
        self.with(|c| Ok(f(c))).unwrap_or(false)
    }

    /// The current time in seconds since the epoch, recorded: a replay of
    /// this request gets the same value.
    pub fn now(&self) -> io::Result<u64> {
        if self.resumed {
            return Ok(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()));
        }
        self.with(|c| c.now())
    }

    /// A value recorded for this request: the first run keeps what `make`
    /// returns, a replay gets it back. Call in the same order on every run.
    pub fn record(&self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        if self.resumed {
            return Ok(make());
        }
        self.with(|c| c.record(Box::new(make)))
    }

    /// What a new worker does with this request if this one dies before
    /// answering it; declare it before doing what must not happen twice.
    /// With [`ReplayPolicy::Error`] the next worker answers `500`. On a
    /// run that resumes a stream ([`Handle::progress`] is `Some`) it does
    /// nothing: that request already ran, and a crash resumes its stream
    /// from the next progress rather than running it again.
    pub fn replay_policy(&self, policy: ReplayPolicy) -> io::Result<()> {
        if self.resumed || self.progress.is_some() {
            return Ok(());
        }
        self.with(|c| c.replay_policy(policy))
    }

    /// The request was in flight during two consecutive crashes. The
    /// adapter answers such a request with `500` before it reaches the
    /// service, so a handler sees `false` here.
    pub fn poisoned(&self) -> bool {
        self.flag(|c: &Io| c.poisoned())
    }

    /// The connection was served by a worker that died.
    pub fn recovered(&self) -> bool {
        self.flag(|c: &Io| c.recovered())
    }

    /// The response being written re-creates what a dead worker had
    /// already sent (it is checked, not sent again).
    pub fn replaying(&self) -> bool {
        self.flag(|c: &Io| c.replaying())
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Handle {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Handle, Self::Rejection> {
        parts.extensions.get::<Handle>().cloned().ok_or((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "not served by holdfast_http",
        ))
    }
}
