//! Data connections, held by the keeper so that transfers outlive the
//! worker.
//!
//! Two held channels per control connection:
//!
//! - [`TAG_LISTENER`]: the passive listener made by `PASV`/`EPSV`. It is
//!   held from the moment it is bound, so a client that connects while the
//!   worker is being replaced waits in its accept queue, and a replayed
//!   `PASV` takes the same listener back and answers the same port.
//! - [`TAG_DATA`]: the data connection, held as soon as it exists (an active
//!   one before it even connects). A new worker takes it back and reads the
//!   kernel's counters to continue a transfer where it stands.
//!
//! The order of holds, unholds and commits makes every held channel a new
//! worker finds meaningful: the listener is released before any commit that
//! forgets it, and a data connection is released only after the commit that
//! ends its transfer — a new worker that finds one while the session says
//! no data connection is due drops it ([`DataChannel::recover`]).

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use holdfast::held::HeldTcp;
use holdfast::Conn;
use rustix::event::{PollFd, PollFlags};

use crate::session::{DataMode, Session};

/// Held channel tag of the passive listener.
pub const TAG_LISTENER: u32 = 1;
/// Held channel tag of the data connection.
pub const TAG_DATA: u32 = 2;

/// How long a transfer command waits for the client to connect, or for an
/// active connection to be established.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits until `fd` is ready for `events` or `timeout` passes; true if it
/// is ready (or in error: the next call on it says which).
pub fn wait(fd: impl AsFd, events: PollFlags, timeout: Duration) -> io::Result<bool> {
    let ts = rustix::event::Timespec::try_from(timeout).map_err(io::Error::other)?;
    let mut fds = [PollFd::new(&fd, events)];
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A control connection's data channel: at most one listener and one data
/// connection.
#[derive(Default)]
pub struct DataChannel {
    listener: Option<TcpListener>,
    /// A data connection taken back after a crash, not yet used.
    recovered: Option<OwnedFd>,
    stream: Option<HeldTcp>,
    /// A finished data connection the keeper still holds: released after
    /// the next commit.
    retired: bool,
}

impl DataChannel {
    /// Takes back what a dead worker held for this connection and keeps
    /// what the committed session (or the command that will be replayed)
    /// can still use.
    pub fn recover(conn: &mut Conn, s: &Session) -> DataChannel {
        let mut d = DataChannel {
            listener: conn.take_held(TAG_LISTENER).map(TcpListener::from),
            ..DataChannel::default()
        };
        if let Some(fd) = conn.take_held(TAG_DATA) {
            if s.transfer.is_some() || s.data != DataMode::None {
                d.recovered = Some(fd);
            } else {
                // Its transfer ended and was committed; only the release
                // was missing.
                tracing::debug!("dropping a finished data connection");
                d.retired = true;
            }
        }
        if d.listener.is_some() || d.recovered.is_some() {
            tracing::info!(
                listener = d.listener.is_some(),
                data = d.recovered.is_some(),
                "took back held data channels"
            );
        }
        d
    }

    /// `PASV`/`EPSV`: a new passive listener bound on `ip` and held; it
    /// replaces the one on the `committed` port, if any. A listener on
    /// another port was bound by this very command before a crash: the
    /// command is being replayed and answers with that one again.
    pub fn passive(
        &mut self,
        conn: &mut Conn,
        ip: IpAddr,
        committed: Option<u16>,
    ) -> io::Result<SocketAddr> {
        if let Some(l) = &self.listener {
            let a = l.local_addr()?;
            if Some(a.port()) != committed {
                return Ok(a);
            }
        }
        // Bound while the old one is still open, so its port differs; the
        // hold replaces the keeper's copy of the old one.
        let l = TcpListener::bind((ip, 0))?;
        l.set_nonblocking(true)?;
        conn.hold(TAG_LISTENER, l.as_fd())?;
        let a = l.local_addr()?;
        self.listener = Some(l);
        Ok(a)
    }

    /// Closes the passive listener (`PORT`, `ABOR`, after an accept).
    pub fn drop_listener(&mut self, conn: &mut Conn) {
        if self.listener.take().is_some() {
            if let Err(e) = conn.unhold(TAG_LISTENER) {
                tracing::warn!(error = %e, "could not release the passive listener");
            }
        }
    }

    /// Makes the data connection for a transfer command, unless a dead
    /// worker made it already (the command is being replayed; `open` says
    /// the session knew it established). `peer` is the control
    /// connection's client: a passive connection from any other address is
    /// refused (no data theft), and `PORT` was checked against it.
    pub fn open(
        &mut self,
        conn: &mut Conn,
        mode: DataMode,
        open: bool,
        peer: IpAddr,
    ) -> io::Result<()> {
        if self.stream.is_some() {
            return Ok(());
        }
        if let Some(fd) = self.recovered.take() {
            match mode {
                // Held before it connected: whether it got there is unknown.
                DataMode::Active(_) if !open && !connected(&fd) => {
                    tracing::debug!("held active data connection never connected; again");
                    drop(fd);
                    let _ = conn.unhold(TAG_DATA);
                }
                _ => {
                    self.stream = Some(adopt(fd)?);
                    self.drop_listener(conn);
                    return Ok(());
                }
            }
        }
        let fd = match mode {
            DataMode::None => {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "no PORT or PASV",
                ))
            }
            DataMode::Passive(_) => {
                let Some(l) = &self.listener else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "passive listener gone",
                    ));
                };
                // The keeper accepts and holds it before this process has
                // it: no crash instant loses it.
                let fd = accept(conn, l, peer)?;
                self.drop_listener(conn);
                fd
            }
            DataMode::Active(addr) => {
                let fd = connect(conn, addr).inspect_err(|_| {
                    let _ = conn.unhold(TAG_DATA);
                })?;
                self.drop_listener(conn);
                fd
            }
        };
        self.stream = Some(adopt(fd)?);
        Ok(())
    }

    /// The data connection of a transfer in progress: the open one, or the
    /// one a dead worker held.
    pub fn stream(&mut self) -> io::Result<&mut HeldTcp> {
        if self.stream.is_none() {
            let fd = self.recovered.take().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "data connection lost")
            })?;
            self.stream = Some(adopt(fd)?);
        }
        Ok(self.stream.as_mut().expect("just set"))
    }

    /// Bytes of the transfer the data connection has taken so far (exact,
    /// from the kernel, also for one taken back after a crash). `mode` says
    /// whether this side opened it (`Active`).
    pub fn sent(&mut self, mode: DataMode) -> io::Result<u64> {
        let w = self.stream()?.written()?;
        Ok(match mode {
            DataMode::Active(_) => w.saturating_sub(syn_offset()),
            _ => w,
        })
    }

    /// Ends the data connection: the client sees its end now; the keeper's
    /// copy goes after the next commit ([`DataChannel::after_commit`]).
    pub fn close(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown_write();
            self.retired = true;
        }
        if self.recovered.take().is_some() {
            self.retired = true;
        }
    }

    /// Called after every commit: releases a data connection whose end is
    /// now committed.
    pub fn after_commit(&mut self, conn: &mut Conn) {
        if std::mem::take(&mut self.retired) {
            if let Err(e) = conn.unhold(TAG_DATA) {
                tracing::warn!(error = %e, "could not release a data connection");
            }
        }
    }
}

/// What [`HeldTcp::written`] counts on a socket this side connected before
/// anything is written: the kernel's `tcpi_bytes_acked` includes the SYN of
/// an actively opened connection. Measured once on a loopback connection
/// (call it at start-up), so the answer is right whether or not the
/// library corrects for it.
pub fn syn_offset() -> u64 {
    static OFFSET: OnceLock<u64> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        let probe = || -> io::Result<u64> {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let c = TcpStream::connect(l.local_addr()?)?;
            let _server_side = l.accept()?;
            HeldTcp::new(c.into())?.written()
        };
        probe().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot measure the SYN offset; assuming 1");
            1
        })
    })
}

/// A data connection, new or taken back, ready for the transfer loops
/// (which wait with `poll`, so it does not block).
fn adopt(fd: OwnedFd) -> io::Result<HeldTcp> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    HeldTcp::new(fd)
}

/// Waits for the client's data connection on the passive listener; under
/// the keeper it is accepted and held by the keeper in one step
/// (`Conn::accept_held`), alone it is accepted here.
fn accept(conn: &mut Conn, l: &TcpListener, peer: IpAddr) -> io::Result<OwnedFd> {
    let deadline = Instant::now() + OPEN_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no data connection",
            ));
        }
        wait(l, PollFlags::IN, left)?;
        let fd = match conn.accept_held(TAG_LISTENER, TAG_DATA, Duration::from_secs(5)) {
            Ok(Some(fd)) => fd,
            Ok(None) => match l.accept() {
                Ok((s, _)) => s.into(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let from = rustix::net::getpeername(&fd)?
            .and_then(|a| SocketAddr::try_from(a).ok())
            .map(|a| a.ip().to_canonical());
        if from == Some(peer) {
            return Ok(fd);
        }
        tracing::warn!(?from, %peer, "refused a data connection from another address");
        let _ = conn.unhold(TAG_DATA);
    }
}

/// Connects to the client for an active-mode transfer. The socket is held
/// before it connects, so a new worker finds the connection whatever the
/// instant of the crash.
fn connect(conn: &mut Conn, addr: SocketAddr) -> io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let fam = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        fam,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    conn.hold(TAG_DATA, fd.as_fd())?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    if !connected(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "cannot connect",
        ));
    }
    Ok(fd)
}

/// Waits for a connection attempt on `fd` to end; true if it connected.
fn connected(fd: &OwnedFd) -> bool {
    let _ = wait(fd, PollFlags::OUT, OPEN_TIMEOUT);
    matches!(rustix::net::sockopt::socket_error(fd), Ok(Ok(())))
        && rustix::net::getpeername(fd).is_ok()
}
