//! The blocking flavour: `std::io::Read`/`Write` connections, one thread
//! (or one loop) per connection.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use hf_journal::wire::MAX_MSG;

use crate::core::Core;
use crate::worker::{Handed, Incoming, Link};
use crate::{Error, Mode, Options};

/// Yields new and recovered connections.
pub struct Listener {
    inner: Inner,
}

enum Inner {
    /// Listeners, and the state version this build writes.
    Pass(Vec<TcpListener>, u16),
    Kept {
        link: Arc<Link>,
        queue: VecDeque<Handed>,
        buf: Vec<u8>,
    },
}

/// Turns a handed-over connection into a [`Core`] (its fd stays with the
/// caller), or logs why it cannot be.
pub(crate) fn adopt(
    link: &Arc<Link>,
    handed: Handed,
    nonblocking: bool,
) -> Option<(OwnedFd, Core)> {
    let Handed {
        entry,
        fd,
        spool,
        place,
    } = handed;
    match Core::kept(fd.as_fd(), link.clone(), entry, spool, place, nonblocking) {
        Ok(core) => Some((fd, core)),
        Err(e) => {
            if e.kind() == std::io::ErrorKind::NotConnected {
                // Closed by the service, or by the client (a reset
                // included) while no worker had it: nothing is lost.
                tracing::debug!(conn = entry.conn_id, error = %e, "connection already over; dropped");
            } else {
                tracing::warn!(conn = entry.conn_id, error = %e, "cannot resume connection, closing it");
            }
            // Dropping a `Core` that never came to be: tell the keeper.
            let _ = link.send(&hf_journal::wire::Msg::Closed {
                conn_id: entry.conn_id,
                slot: entry.slot,
            });
            None
        }
    }
}

impl Listener {
    /// Under a keeper, connects to it (the addresses are the keeper's
    /// business and are ignored); otherwise binds `addrs` (pass-through).
    pub fn bind(addrs: &[SocketAddr]) -> Result<Listener, Error> {
        Listener::bind_with(addrs, &Options::default())
    }

    /// [`Listener::bind`] with what the service declares about itself.
    pub fn bind_with(addrs: &[SocketAddr], opts: &Options) -> Result<Listener, Error> {
        match Link::from_env(opts)? {
            Some(link) => {
                link.ready()?;
                Ok(Listener {
                    inner: Inner::Kept {
                        link,
                        queue: VecDeque::new(),
                        buf: vec![0; MAX_MSG],
                    },
                })
            }
            None => {
                if addrs.is_empty() {
                    return Err(Error::NoAddress);
                }
                let ls = addrs
                    .iter()
                    .map(|a| {
                        let l = TcpListener::bind(a)?;
                        // Urgent data inline, as under a keeper.
                        hf_sys::tcp::set_urgent_inline(&l)?;
                        Ok(l)
                    })
                    .collect::<io::Result<Vec<_>>>()?;
                Ok(Listener {
                    inner: Inner::Pass(ls, opts.state_version),
                })
            }
        }
    }

    /// Tells the keeper this worker is alive. The blocking flavour cannot
    /// tell a service that is waiting from one that is stuck, so hang
    /// detection is opt-in here: a service that calls this from its main
    /// loop (at least every `--hang-timeout / 4`) is replaced when it stops.
    /// The tokio flavour does it by itself.
    pub fn heartbeat(&self) {
        if let Inner::Kept { link, .. } = &self.inner {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            link.beat(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
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

    /// The next connection; `Ok(None)` when the keeper asks this worker to
    /// stop.
    pub fn accept(&mut self) -> Result<Option<Conn>, Error> {
        match &mut self.inner {
            Inner::Pass(ls, version) => {
                let idx = if ls.len() == 1 { 0 } else { wait_any(ls)? };
                let (s, _) = ls[idx].accept()?;
                Ok(Some(Conn {
                    fd: OwnedFd::from(s),
                    core: Core::pass_through(false, *version),
                }))
            }
            Inner::Kept { link, queue, buf } => loop {
                if let Some(handed) = queue.pop_front() {
                    if let Some((fd, core)) = adopt(link, handed, false) {
                        return Ok(Some(Conn { fd, core }));
                    }
                    continue;
                }
                let mut fds = Vec::new();
                let got = hf_sys::fdpass::recv_fds_may_drop(link.control(), buf, &mut fds, false)?;
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

fn wait_any(ls: &[TcpListener]) -> io::Result<usize> {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        let mut fds: Vec<PollFd<'_>> = ls.iter().map(|l| PollFd::new(l, PollFlags::IN)).collect();
        poll(&mut fds, None)?;
        if let Some(i) = fds.iter().position(|f| f.revents().contains(PollFlags::IN)) {
            return Ok(i);
        }
    }
}

/// A client connection. Reads are tentative until [`Conn::commit`]; writes
/// are journaled. Dropping it closes the connection for good — unless it
/// [`moved`](Conn::moved) to a new version, which then carries on with it.
pub struct Conn {
    fd: OwnedFd,
    core: Core,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.core.close(self.fd.as_fd());
    }
}

impl Conn {
    /// True when this connection was served by a worker that died; the
    /// state blob says where it stood.
    pub fn recovered(&self) -> bool {
        self.core.recovered()
    }

    /// True while the output being written re-creates what a dead worker
    /// had already sent (it is checked, not sent again). A service may use
    /// it to skip work whose only effect is output the client already has.
    pub fn replaying(&self) -> bool {
        self.core.replaying()
    }

    /// The request now in flight must not run again: it was in flight
    /// during two consecutive crashes of this service's workers (it is
    /// probably what kills them), or a worker that died running it had set
    /// [`ReplayPolicy::Error`](crate::ReplayPolicy::Error). Answer it with
    /// an error (HTTP 500, FTP 451, ...) without running it, and commit as
    /// usual; the flag clears at the commit.
    pub fn poisoned(&self) -> bool {
        self.core.poisoned()
    }

    /// The keeper's id of this connection (`None` in pass-through mode).
    pub fn id(&self) -> Option<u64> {
        self.core.conn_id()
    }

    /// The state blob saved by the last commit, with its version (empty for a
    /// new connection).
    pub fn state(&self) -> (u16, &[u8]) {
        self.core.state()
    }

    /// Ends a request: `consumed` more input bytes are done with, and `state`
    /// (at most [`crate::MAX_STATE`] bytes) is what a new worker needs to go
    /// on from here.
    pub fn commit(&mut self, consumed: usize, state: &[u8]) -> io::Result<()> {
        let v = self.core.state_version();
        self.commit_versioned(consumed, v, state)
    }

    /// [`Conn::commit`] with an explicit state schema version.
    pub fn commit_versioned(
        &mut self,
        consumed: usize,
        version: u16,
        state: &[u8],
    ) -> io::Result<()> {
        self.core.flush_pending(self.fd.as_fd())?;
        self.core.commit(self.fd.as_fd(), consumed, version, state)
    }

    /// Commits the last request of this connection and closes it: use it
    /// instead of `commit` and drop when an answer ends the connection
    /// (HTTP `Connection: close`, FTP `QUIT`). The journal records the
    /// commit and the close together, so a crash between the two cannot
    /// leave the client waiting for a close that never comes.
    pub fn commit_and_close(&mut self, consumed: usize) -> io::Result<()> {
        self.core.flush_pending(self.fd.as_fd())?;
        self.core.commit_and_close(self.fd.as_fd(), consumed)
    }

    /// Returns `make()` the first time a request runs and the same bytes
    /// when it is replayed after a crash (at most 59 bytes per request in all).
    pub fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        self.core.record(make)
    }

    /// The current time in seconds since the epoch, recorded (see [`Conn::record`]).
    pub fn now(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.core.record_fixed(crate::now_bytes)?,
        ))
    }

    /// This connection went to a new version of the service (`holdfast
    /// upgrade`): reads return end of input (or, if part of a request had
    /// been read, fail) and writes fail; drop it. The client does not notice.
    /// When the keeper stops, an idle connection is handed back the same
    /// way (reading as end of input) for the keeper to close with a FIN.
    pub fn moved(&self) -> bool {
        self.core.released()
    }

    /// Declares that the output until the next commit is regenerated byte
    /// for byte by construction — a file's bytes at known offsets, whose
    /// identity (size, modification time) the service records and checks —
    /// so it need not be checksummed: writes skip the CRC-32C (about
    /// 0.1 µs per KiB), and a replay of this output after a crash is not
    /// checked against what the client already has. Only for output the
    /// service can vouch for: a replay that differs would reach the client
    /// spliced onto the first run's bytes.
    ///
    /// The vouching holds within one build of the service: a digest of the
    /// worker's executable and arguments is recorded with the output (one
    /// recorded value, 5 bytes of the record's room), and a replay by a
    /// worker of another build — a rollback, or a new version taking over a
    /// request an old one left half-answered — closes the connection cleanly
    /// instead of sending bytes it cannot check. The same command upgraded
    /// or rejuvenated replays as usual.
    pub fn skip_output_check(&mut self) {
        self.core.skip_output_check();
    }

    /// Declares what happens to the request in flight if this worker dies
    /// before its commit (until that commit; the default is to run it
    /// again). Call it before the work that must not be repeated: it is in
    /// the journal when this returns.
    ///
    /// ```no_run
    /// # fn f(conn: &mut holdfast::Conn) -> std::io::Result<()> {
    /// use std::io::Write;
    /// if conn.poisoned() {
    ///     // A previous worker died while charging: don't charge twice.
    ///     conn.write_all(b"ERR not charged twice; check your statement\n")?;
    /// } else {
    ///     conn.replay_policy(holdfast::ReplayPolicy::Error)?;
    ///     // charge_card()?;
    ///     conn.write_all(b"OK charged\n")?;
    /// }
    /// conn.commit(16, &[])?;
    /// # Ok(()) }
    /// ```
    pub fn replay_policy(&mut self, policy: crate::ReplayPolicy) -> io::Result<()> {
        self.core.set_replay(policy)
    }

    /// Hands the keeper a copy of `fd` to hold with this connection under
    /// `tag` (replacing one with the same tag): a *held channel*, an fd the
    /// service opened that must outlive this worker (an upstream connection,
    /// a CGI program's output pipe, an FTP data connection). After a crash,
    /// or a move to a new version, the next worker gets it back with the
    /// connection ([`Conn::take_held`]). At most 8 per connection; closing
    /// the connection drops them. A no-op in pass-through mode.
    ///
    /// Hold a channel before anything depends on it surviving (before the
    /// first byte goes to an upstream, before a child process starts), and
    /// say in the state blob of a commit that it exists: the next worker
    /// learns from the state blob what to do with it. [`crate::held`] reads
    /// such channels with exact positions.
    pub fn hold(&mut self, tag: u32, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        self.core.hold(tag, fd)
    }

    /// Takes the channel held under `tag` that came back with this
    /// connection (`None` for a new connection, in pass-through mode, or
    /// once taken).
    pub fn take_held(&mut self, tag: u32) -> Option<OwnedFd> {
        self.core.take_held(tag)
    }

    /// Accepts a connection on the held listening socket `listener` and
    /// holds it under `tag` in one step: the keeper accepts it and holds it
    /// before this worker has it, so a crash at any instant cannot lose it
    /// (an `accept` followed by [`Conn::hold`] leaves a window between the
    /// two). Wait until the listener is readable first: with nothing to
    /// accept this fails with `WouldBlock`. `Ok(None)` in pass-through mode:
    /// accept on the listener yourself.
    ///
    /// The keeper's answer arrives on the control socket, which
    /// [`Listener::accept`] reads: call this from a connection's thread
    /// while the main thread is in `accept`.
    pub fn accept_held(
        &mut self,
        listener: u32,
        tag: u32,
        timeout: std::time::Duration,
    ) -> io::Result<Option<OwnedFd>> {
        self.core.accept_held(listener, tag, timeout)
    }

    /// The keeper drops its copy of channel `tag`: call it when done with
    /// the channel.
    pub fn unhold(&mut self, tag: u32) -> io::Result<()> {
        self.core.unhold(tag)
    }

    /// Closes the connection now (dropping it does the same).
    pub fn close(self) {
        drop(self);
    }

    /// Sets `TCP_NODELAY` (the socket is shared with the keeper's copy and
    /// with the next worker, which keep it).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        Ok(rustix::net::sockopt::set_tcp_nodelay(&self.fd, on)?)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        peer_addr(self.fd.as_fd())
    }
}

pub(crate) fn peer_addr(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let a = rustix::net::getpeername(fd)?.ok_or_else(|| io::Error::other("no peer address"))?;
    SocketAddr::try_from(a).map_err(|_| io::Error::other("not an IP peer"))
}

impl AsFd for Conn {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.core.read(self.fd.as_fd(), buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.core.write(self.fd.as_fd(), buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.core.flush_pending(self.fd.as_fd())
    }
}
