//! The tokio flavour: connections are `AsyncRead + AsyncWrite`.
//!
//! All socket calls use `MSG_DONTWAIT` instead of `O_NONBLOCK`, because the
//! socket's file status flags are shared with the keeper's dup and with the
//! next worker, which may be a blocking service.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ::tokio::io::unix::AsyncFd;
use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::net::TcpListener;
use hf_journal::wire::MAX_MSG;

use crate::blocking::adopt;
use crate::core::Core;
use crate::worker::{Handed, Incoming, Link, WakeCell};
use crate::{Error, Mode, Options};

/// How often the tokio flavour bumps the worker's heartbeat.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(50);

/// Yields new and recovered connections.
pub struct Listener {
    inner: Inner,
}

enum Inner {
    /// Listeners, and the state version this build writes.
    Pass(Vec<TcpListener>, u16),
    Kept {
        link: Arc<Link>,
        control: AsyncFd<OwnedFd>,
        queue: VecDeque<Handed>,
        buf: Vec<u8>,
        yield_next: bool,
    },
}

impl Listener {
    /// Under a keeper, connects to it (the addresses are ignored); otherwise
    /// binds `addrs` (pass-through). Must be called inside a tokio runtime.
    pub async fn bind(addrs: &[SocketAddr]) -> Result<Listener, Error> {
        Listener::bind_with(addrs, &Options::default()).await
    }

    /// [`Listener::bind`] with what the service declares about itself.
    pub async fn bind_with(addrs: &[SocketAddr], opts: &Options) -> Result<Listener, Error> {
        match Link::from_env(opts)? {
            Some(link) => {
                let control = hf_sys::reactor::register(link.control().try_clone_to_owned()?)?;
                // The heartbeat (see `spawn_heartbeat`), only when the keeper watches heartbeats: otherwise an
                // idle worker has nothing to wake for.
                if link.heartbeat {
                    spawn_heartbeat(link.clone());
                }
                link.ready()?;
                Ok(Listener {
                    inner: Inner::Kept {
                        link,
                        control,
                        queue: VecDeque::new(),
                        buf: vec![0; MAX_MSG],
                        yield_next: false,
                    },
                })
            }
            None => {
                if addrs.is_empty() {
                    return Err(Error::NoAddress);
                }
                let mut ls = Vec::new();
                for a in addrs {
                    let l = TcpListener::bind(a).await?;
                    // Urgent data inline, as under a keeper.
                    hf_sys::tcp::set_urgent_inline(&l)?;
                    ls.push(l);
                }
                Ok(Listener {
                    inner: Inner::Pass(ls, opts.state_version),
                })
            }
        }
    }

    pub fn mode(&self) -> Mode {
        match &self.inner {
            Inner::Pass(..) => Mode::PassThrough,
            Inner::Kept { link, .. } => Mode::Kept(link.id),
        }
    }

    /// Bound addresses in pass-through mode (empty under a keeper).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        match &self.inner {
            Inner::Pass(ls, _) => ls.iter().filter_map(|l| l.local_addr().ok()).collect(),
            Inner::Kept { .. } => Vec::new(),
        }
    }

    /// The next connection; `Ok(None)` when the keeper asks this worker to stop.
    pub async fn accept(&mut self) -> Result<Option<Conn>, Error> {
        match &mut self.inner {
            Inner::Pass(ls, version) => {
                let s = poll_fn(|cx| {
                    for l in ls.iter() {
                        if let Poll::Ready(r) = l.poll_accept(cx) {
                            return Poll::Ready(r.map(|(s, _)| s));
                        }
                    }
                    Poll::Pending
                })
                .await?;
                let fd = OwnedFd::from(s.into_std()?);
                Ok(Some(Conn::new(fd, Core::pass_through(true, *version))?))
            }
            Inner::Kept {
                link,
                control,
                queue,
                buf,
                yield_next,
            } => loop {
                if let Some(handed) = queue.pop_front() {
                    if *yield_next {
                        // Recovered connections come in batches: let the
                        // task of the one handed out before run first, so
                        // the first answers go out while the rest are
                        // still being taken over.
                        ::tokio::task::yield_now().await;
                    }
                    *yield_next = !queue.is_empty();
                    if let Some((fd, core)) = adopt(link, handed, true) {
                        let mut c = Conn::new(fd, core)?;
                        c.wake = Some(link.wake_cell());
                        return Ok(Some(c));
                    }
                    continue;
                }
                let mut guard = control.readable().await?;
                let mut fds = Vec::new();
                let got = match guard
                    .try_io(|c| hf_sys::fdpass::recv_fds_may_drop(c, buf, &mut fds, true))
                {
                    Ok(r) => r?,
                    Err(_would_block) => continue,
                };
                match link.decode(&buf[..got.len], fds, got.fds_dropped)? {
                    Some(Incoming::Conns(list)) => queue.extend(list),
                    Some(Incoming::Activate) => tracing::info!("promoted to active worker"),
                    Some(Incoming::Shutdown) => return Ok(None),
                    Some(Incoming::Drain) => link.start_drain(),
                    Some(Incoming::Stop) => link.start_stop(),
                    None => {}
                }
            },
        }
    }
}

/// A client connection. Reads are tentative until [`Conn::commit`]; writes
/// are journaled. Dropping it closes the connection for good — unless it
/// [`moved`](Conn::moved) to a new version, which then carries on with it.
pub struct Conn {
    io: AsyncFd<OwnedFd>,
    core: Core,
    /// Woken when the worker starts draining (kept connections only).
    wake: Option<Arc<WakeCell>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.core.close(self.io.get_ref().as_fd());
    }
}

impl Conn {
    fn new(fd: OwnedFd, core: Core) -> io::Result<Conn> {
        match hf_sys::reactor::register(fd) {
            Ok(io) => Ok(Conn {
                io,
                core,
                wake: None,
            }),
            Err(e) => Err(e),
        }
    }

    /// True when this connection was served by a worker that died.
    pub fn recovered(&self) -> bool {
        self.core.recovered()
    }

    /// True while the output being written re-creates what a dead worker
    /// had already sent (it is checked, not sent again). A service may use
    /// it to skip work whose only effect is output the client already has.
    pub fn replaying(&self) -> bool {
        self.core.replaying()
    }

    /// The request now in flight was in flight during two consecutive
    /// crashes of this service's workers: it is probably what kills them.
    /// Answer it with an error (HTTP 500, FTP 451, ...) without running it,
    /// and commit as usual; the flag clears at the commit.
    pub fn poisoned(&self) -> bool {
        self.core.poisoned()
    }

    /// The keeper's id of this connection (`None` in pass-through mode).
    pub fn id(&self) -> Option<u64> {
        self.core.conn_id()
    }

    /// The state blob saved by the last commit, with its version.
    pub fn state(&self) -> (u16, &[u8]) {
        self.core.state()
    }

    /// Ends a request; see [`crate::Conn::commit`]. Waits until replayed
    /// output held back for verification is on the socket.
    pub async fn commit(&mut self, consumed: usize, state: &[u8]) -> io::Result<()> {
        let v = self.core.state_version();
        self.commit_versioned(consumed, v, state).await
    }

    /// This connection went to a new version of the service (`holdfast
    /// upgrade`): reads return end of input (or, if part of a request had
    /// been read, fail) and writes fail; drop it. The client does not notice.
    /// When the keeper stops, an idle connection is handed back the same
    /// way (reading as end of input) for the keeper to close with a FIN.
    pub fn moved(&self) -> bool {
        self.core.released()
    }

    /// [`Conn::commit`] with an explicit state schema version.
    pub async fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush_pending(cx)).await?;
        self.core
            .commit(self.io.get_ref().as_fd(), consumed, version, state)
    }

    /// [`Conn::commit`] for code driven by `poll_*` (an adapter's I/O
    /// object): ready once replayed output held back for verification is on
    /// the socket, then commits at once (a store into shared memory). No
    /// lock, no waker of its own: call again with the same arguments after
    /// `Pending`.
    pub fn poll_commit(
        &mut self,
        cx: &mut Context<'_>,
        consumed: usize,
        state: &[u8],
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_flush_pending(cx))?;
        let v = self.core.state_version();
        Poll::Ready(
            self.core
                .commit(self.io.get_ref().as_fd(), consumed, v, state),
        )
    }

    /// Commits the last request of this connection and closes it; see
    /// [`crate::Conn::commit_and_close`].
    pub async fn commit_and_close(&mut self, consumed: usize) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush_pending(cx)).await?;
        self.core
            .commit_and_close(self.io.get_ref().as_fd(), consumed)
    }

    /// See [`crate::Conn::record`].
    pub fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        self.core.record(make)
    }

    /// For adapters that record their own choices: the next value a dead
    /// worker recorded since the last commit, if this window is a replay
    /// and one is left (`None` otherwise). Records nothing; a later
    /// [`Conn::record`] records the value a fresh run chose.
    pub fn replayed(&mut self) -> io::Result<Option<Vec<u8>>> {
        self.core.replayed()
    }

    /// The current time in seconds since the epoch, recorded.
    pub fn now(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.core.record_fixed(crate::now_bytes)?,
        ))
    }

    /// See [`crate::Conn::skip_output_check`].
    pub fn skip_output_check(&mut self) {
        self.core.skip_output_check();
    }

    /// See [`crate::Conn::replay_policy`].
    pub fn replay_policy(&mut self, policy: crate::ReplayPolicy) -> io::Result<()> {
        self.core.set_replay(policy)
    }

    /// Holds `fd` with this connection; see [`crate::Conn::hold`].
    pub fn hold(&mut self, tag: u32, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        self.core.hold(tag, fd)
    }

    /// See [`crate::Conn::take_held`].
    pub fn take_held(&mut self, tag: u32) -> Option<std::os::fd::OwnedFd> {
        self.core.take_held(tag)
    }

    /// See [`crate::Conn::unhold`].
    pub fn unhold(&mut self, tag: u32) -> io::Result<()> {
        self.core.unhold(tag)
    }

    /// Sets `TCP_NODELAY` (the socket is shared with the keeper's copy and
    /// with the next worker, which keep it).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        Ok(rustix::net::sockopt::set_tcp_nodelay(
            self.io.get_ref(),
            on,
        )?)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        crate::blocking::peer_addr(self.io.get_ref().as_fd())
    }

    /// About to wait for the socket: also wait for draining to start, and
    /// end the wait with `moved` if the connection goes to a new version.
    /// The waker is left before the flag is looked at, and draining sets
    /// the flag before it wakes, so no wake-up is lost.
    fn pending_unless_moved(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<()> {
        let Some(cell) = &self.wake else {
            return Poll::Pending;
        };
        cell.register(reading, cx.waker());
        if self.core.draining_now(self.io.get_ref().as_fd(), reading) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    fn poll_flush_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.core.has_pending() {
            let mut guard = ready!(self.io.poll_write_ready(cx))?;
            let core = &mut self.core;
            match guard.try_io(|fd| core.flush_pending(fd.get_ref().as_fd())) {
                Ok(r) => r?,
                Err(_would_block) => continue,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.io.get_ref().as_fd()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.core.poll_gate(cx.waker()) {
            // A suspect waiting its turn; woken when the gate frees.
            return this
                .pending_unless_moved(cx, true)
                .map(|()| this.core.read_after_release().map(|_| ()));
        }
        if this.core.spooled_unread() {
            // Served from the spool: no readiness to wait for.
            let unfilled = buf.initialize_unfilled();
            let n = this.core.read(this.io.get_ref().as_fd(), unfilled)?;
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut guard = match this.io.poll_read_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => {
                    // Waiting for the client: other suspects may run.
                    this.core.ungate();
                    return this
                        .pending_unless_moved(cx, true)
                        .map(|()| this.core.read_after_release().map(|_| ()));
                }
            };
            let unfilled = buf.initialize_unfilled();
            let core = &mut this.core;
            match guard.try_io(|fd| core.read(fd.get_ref().as_fd(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut guard = match this.io.poll_write_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => {
                    return this
                        .pending_unless_moved(cx, false)
                        .map(|()| Err(crate::core::moved()))
                }
            };
            let core = &mut this.core;
            match guard.try_io(|fd| core.write(fd.get_ref().as_fd(), buf)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_pending(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_pending(cx))?;
        this.core.close(this.io.get_ref().as_fd());
        Poll::Ready(Ok(()))
    }
}

/// The heartbeat: a task on the service's own runtime bumps a counter in
/// the journal every [`HEARTBEAT`]; if the runtime stops running tasks (a
/// task blocks its thread, a deadlock), the counter stops and the keeper's
/// `--hang-timeout` replaces the worker. The first beat happens here, not
/// in the task: a runtime blocked before the task was ever polled must
/// still be seen as a worker that beat once and then stopped.
fn spawn_heartbeat(link: Arc<Link>) {
    link.beat(1);
    let beat = link;
    ::tokio::spawn(async move {
        let mut tick = ::tokio::time::interval(HEARTBEAT);
        let mut n = 1u64;
        let mut stuck = false;
        loop {
            tick.tick().await;
            // A request past its deadline stops the heartbeat:
            // the keeper then replaces this worker like a hung
            // one, and the request is replayed (or, after
            // repeated deaths, refused as poison).
            let late = match (beat.deadline, beat.oldest_request()) {
                (Some(limit), Some(age)) => age > limit,
                _ => false,
            };
            if late {
                if !stuck {
                    tracing::warn!("a request ran past --request-deadline; stopping the heartbeat");
                    stuck = true;
                }
                continue;
            }
            stuck = false;
            n += 1;
            beat.beat(n);
        }
    });
}

/// Registers a descriptor the service opened (a held channel's pipe or
/// socket) with the current runtime, to await its readiness.
pub fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    hf_sys::reactor::register(fd)
}
