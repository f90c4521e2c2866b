//! Upstream connections: opened, configured and waited on the same way for
//! a fresh socket and for one taken back from the keeper after a crash.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use holdfast::held::HeldTcp;
use rustix::event::{PollFd, PollFlags};

use crate::http::{Authority, Status};

/// The tag of the upstream connection among a client connection's held
/// channels.
pub const TAG: u32 = 1;

/// A connection to an origin, held with the client connection it serves.
#[derive(Debug)]
pub struct Upstream {
    pub origin: Authority,
    /// `SO_COOKIE`: which socket this is (see [`crate::state::Upstream::cookie`]).
    pub cookie: u64,
    pub tcp: HeldTcp,
}

impl Upstream {
    /// Connects to `origin`, trying each of its addresses, each within
    /// `timeout`: 502 if it cannot be reached, 504 if it does not answer.
    pub fn connect(origin: &Authority, timeout: Duration) -> Result<Upstream, Status> {
        let addrs = (origin.host(), origin.port())
            .to_socket_addrs()
            .map_err(|e| {
                tracing::info!(%origin, error = %e, "cannot resolve origin");
                Status::BadGateway
            })?;
        let mut status = Status::BadGateway;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Upstream::adopt(origin.clone(), OwnedFd::from(s), timeout)
                        .map_err(|_| Status::BadGateway);
                }
                Err(e) => {
                    tracing::info!(%origin, %addr, error = %e, "cannot connect to origin");
                    if e.kind() == io::ErrorKind::TimedOut {
                        status = Status::GatewayTimeout;
                    }
                }
            }
        }
        Err(status)
    }

    /// Wraps a connected socket (fresh, or taken back after a crash).
    ///
    /// The socket stays blocking, with `timeout` on every receive and send:
    /// a peek then waits for bytes past what was already peeked, which
    /// `poll` cannot do while peeked bytes wait in the queue.
    pub fn adopt(origin: Authority, fd: OwnedFd, timeout: Duration) -> io::Result<Upstream> {
        use rustix::net::sockopt::{set_socket_timeout, Timeout};
        set_socket_timeout(&fd, Timeout::Recv, Some(timeout))?;
        set_socket_timeout(&fd, Timeout::Send, Some(timeout))?;
        Ok(Upstream {
            origin,
            cookie: rustix::net::sockopt::socket_cookie(&fd)?,
            tcp: HeldTcp::new(fd)?,
        })
    }

    /// Sends all of `data`; `TimedOut` if the origin stops taking it.
    pub fn send(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match self.tcp.write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timed_out(e)),
            }
        }
        Ok(())
    }

    /// Peeks the next input; `TimedOut` if none comes within the timeout.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tcp.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r.map_err(timed_out),
            }
        }
    }

    /// The origin closed the connection or sent something unasked: an
    /// idle connection that must not carry another request.
    pub fn stale(&self) -> bool {
        // Everything received was consumed, so readable means news.
        readable(self.tcp.fd(), Some(Duration::ZERO)).unwrap_or(true)
    }
}

/// A timed-out socket call says `WouldBlock`; call it what it is.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "upstream timed out")
    } else {
        e
    }
}

/// Whether `fd` has input (or an end or error) within `timeout` (`None`:
/// wait as long as it takes).
pub fn readable(fd: impl AsFd, timeout: Option<Duration>) -> io::Result<bool> {
    let ts = timeout.map(|t| rustix::event::Timespec {
        tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: t.subsec_nanos().into(),
    });
    let mut fds = [PollFd::new(&fd, PollFlags::IN | PollFlags::RDHUP)];
    match rustix::event::poll(&mut fds, ts.as_ref()) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
