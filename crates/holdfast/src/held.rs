//! Reading and writing held channels with exact positions.
//!
//! A held channel ([`Conn::hold`](crate::Conn::hold)) keeps an fd alive
//! across a crash; these types make sure no byte that went through it is
//! lost or repeated. Both follow the rule of client input: nothing is
//! consumed before a commit says it is done with, and the kernel, not the
//! dead worker's memory, says where each stream stands.
//!
//! - [`HeldTcp`]: a TCP connection the service opened (an upstream, an FTP
//!   data connection). Input is peeked and consumed after the commit that
//!   makes it unnecessary; the kernel's counters give how much was consumed
//!   and how much the socket took for sending, exactly, after a crash.
//! - [`PipeSpool`]: a child process's output pipe (a CGI program), moved
//!   with `splice` into a memfd spool held next to it. The spool's size is
//!   what was taken from the pipe, even if the worker dies in the middle of
//!   the call, and the bytes stay readable at their offsets.
//!
//! # Example: an upstream that survives the worker
//!
//! ```no_run
//! use holdfast::held::HeldTcp;
//! # fn f(conn: &mut holdfast::Conn) -> std::io::Result<()> {
//! const UPSTREAM: u32 = 1;
//! let mut up = match conn.take_held(UPSTREAM) {
//!     // After a crash: the same socket, positions from the kernel.
//!     Some(fd) => HeldTcp::new(fd)?,
//!     None => {
//!         let s = std::net::TcpStream::connect("127.0.0.1:8080")?;
//!         let up = HeldTcp::new(s.into())?;
//!         conn.hold(UPSTREAM, up.fd())?;
//!         up
//!     }
//! };
//! // The state blob of the next commit says how far the request went
//! // (`up.written()`) and up to where the answer was relayed; the next
//! // worker sends only the rest and reads on from there.
//! # let _ = &mut up; Ok(()) }
//! ```

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::net::{RecvFlags, SendFlags};

/// A TCP connection the service opened, read with peek/commit; see the
/// [module docs](self).
#[derive(Debug)]
pub struct HeldTcp {
    fd: OwnedFd,
    /// Absolute input offset peeked up to.
    peeked: u64,
    /// Absolute input offset consumed from the kernel.
    consumed: u64,
}

impl HeldTcp {
    /// Wraps a connected socket; positions count from the start of the TCP
    /// connection. The same for a fresh socket and one taken back after a
    /// crash: reading starts at the first byte not yet consumed.
    ///
    /// Urgent data on it is delivered inline from here on
    /// (`SO_OOBINLINE`), so the positions count it like any other byte.
    pub fn new(fd: OwnedFd) -> io::Result<HeldTcp> {
        hf_sys::tcp::set_urgent_inline(&fd)?;
        let pos = hf_sys::tcp::stream_positions(&fd)?;
        hf_sys::tcp::set_peek_off(&fd, 0)?;
        Ok(HeldTcp {
            fd,
            peeked: pos.consumed,
            consumed: pos.consumed,
        })
    }

    /// Input bytes consumed so far: where reading starts after a crash.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Output bytes the socket has taken so far (acknowledged by the peer
    /// or still queued), from the kernel: exact even after a crash in the
    /// middle of a send.
    ///
    /// Counted as the kernel counts: for a connection this side opened
    /// (`connect`), Linux counts the SYN it sent as one acknowledged byte,
    /// so the count starts at 1 there and at 0 on an accepted one. Take
    /// differences: record `written()` before the first byte of a transfer
    /// goes out (in a state blob) and subtract it after a crash.
    pub fn written(&self) -> io::Result<u64> {
        Ok(hf_sys::tcp::stream_positions(&self.fd)?.written)
    }

    /// Peeks input that follows what was already read (blocking unless the
    /// socket is non-blocking); `Ok(0)` at the end of the stream.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, _) = rustix::net::recv(&self.fd, buf, RecvFlags::PEEK)?;
        self.peeked += n as u64;
        Ok(n)
    }

    /// Absolute input offset read up to.
    pub fn read_pos(&self) -> u64 {
        self.peeked
    }

    /// Moves the read position to absolute offset `pos`, which must not be
    /// before [`HeldTcp::consumed`].
    pub fn seek_read(&mut self, pos: u64) -> io::Result<()> {
        let off = pos
            .checked_sub(self.consumed)
            .and_then(|o| i32::try_from(o).ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "read position {pos} outside the queue (consumed {})",
                        self.consumed
                    ),
                )
            })?;
        hf_sys::tcp::set_peek_off(&self.fd, off)?;
        self.peeked = pos;
        Ok(())
    }

    /// Consumes input up to absolute offset `pos` (never past what was
    /// read). Call it after the commit that makes those bytes unnecessary;
    /// a successor calling it again for the same `pos` does nothing.
    pub fn consume_to(&mut self, pos: u64) -> io::Result<()> {
        if pos > self.peeked {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("consume to {pos} past the read position {}", self.peeked),
            ));
        }
        while self.consumed < pos {
            let want = usize::try_from(pos - self.consumed).unwrap_or(usize::MAX);
            match hf_sys::tcp::discard(&self.fd, want) {
                Ok(0) => break,
                Ok(n) => self.consumed += n as u64,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends (`MSG_NOSIGNAL`): a closed peer is an error, not a signal.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(rustix::net::send(&self.fd, buf, SendFlags::NOSIGNAL)?)
    }

    /// Sends all of `buf` (the socket must be blocking).
    pub fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write(buf)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Sends a FIN.
    pub fn shutdown_write(&self) -> io::Result<()> {
        Ok(rustix::net::shutdown(
            &self.fd,
            rustix::net::Shutdown::Write,
        )?)
    }

    /// The socket, to hold it or to wait on it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

/// A child process's output, moved from its pipe into a memfd spool; see
/// the [module docs](self). Hold both [`PipeSpool::pipe_fd`] and
/// [`PipeSpool::spool_fd`].
#[derive(Debug)]
pub struct PipeSpool {
    pipe: OwnedFd,
    spool: OwnedFd,
    len: u64,
    eof: bool,
}

/// Most bytes moved by one `splice` call.
const SPLICE_CHUNK: usize = 1 << 20;

impl PipeSpool {
    /// A new pipe and an empty spool. The pipe's write end is returned for
    /// the child's standard output (it is close-on-exec here; `Command`
    /// makes the child's copy inheritable). Keep no other copy of it: the
    /// spool sees the end of the output when every writer is gone.
    pub fn new() -> io::Result<(PipeSpool, OwnedFd)> {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let spool =
            rustix::fs::memfd_create("holdfast-pipe-spool", rustix::fs::MemfdFlags::CLOEXEC)?;
        Ok((
            PipeSpool {
                pipe: r,
                spool,
                len: 0,
                eof: false,
            },
            w,
        ))
    }

    /// Re-forms one from its two channels, taken back after a crash.
    pub fn resume(pipe: OwnedFd, spool: OwnedFd) -> io::Result<PipeSpool> {
        let st = rustix::fs::fstat(&spool)?;
        Ok(PipeSpool {
            pipe,
            spool,
            len: u64::try_from(st.st_size).unwrap_or(0),
            eof: false,
        })
    }

    /// Moves what the pipe holds now into the spool, never blocking; returns
    /// how many bytes moved (0 with nothing there, or at the end: see
    /// [`PipeSpool::eof`]).
    pub fn fill(&mut self) -> io::Result<usize> {
        let mut total = 0;
        while !self.eof {
            let mut off = self.len;
            match rustix::pipe::splice(
                &self.pipe,
                None,
                &self.spool,
                Some(&mut off),
                SPLICE_CHUNK,
                rustix::pipe::SpliceFlags::NONBLOCK,
            ) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.len += n as u64;
                    total += n;
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(total)
    }

    /// Waits until the pipe has something to move (or its writers are
    /// gone), at most `timeout`.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<()> {
        if self.eof {
            return Ok(());
        }
        let ts = timeout.map(|t| rustix::event::Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = [rustix::event::PollFd::new(
            &self.pipe,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Bytes in the spool: everything ever taken from the pipe.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pipe's writers are all gone and the spool holds everything.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// Reads spooled bytes at absolute offset `pos`.
    pub fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let end = self.len.saturating_sub(pos);
        let n = buf.len().min(usize::try_from(end).unwrap_or(usize::MAX));
        Ok(rustix::io::pread(&self.spool, &mut buf[..n], pos)?)
    }

    /// Frees the spool's memory before `pos` (whole pages; offsets stay).
    pub fn forget_before(&self, pos: u64) -> io::Result<()> {
        const PAGE: u64 = 4096;
        let end = pos.min(self.len) / PAGE * PAGE;
        if end > 0 {
            rustix::fs::fallocate(
                &self.spool,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                0,
                end,
            )?;
        }
        Ok(())
    }

    pub fn pipe_fd(&self) -> BorrowedFd<'_> {
        self.pipe.as_fd()
    }

    pub fn spool_fd(&self) -> BorrowedFd<'_> {
        self.spool.as_fd()
    }
}

/// Makes `cmd` write `marker` to its standard output right before `exec`.
///
/// A program started for a request must run once even if the worker dies
/// while starting it. With its output going through a held [`PipeSpool`],
/// the marker tells the next worker whether the program was started: the
/// first byte of the spool is the marker, or the pipe ends with nothing in
/// it (every writer gone: the program never existed).
pub fn mark_start(cmd: &mut std::process::Command, marker: u8) {
    hf_sys::spawn::mark_start(cmd, marker);
}
