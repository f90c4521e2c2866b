//! Transfers on the data connection, and how a new worker continues them.
//!
//! A file transfer starts once its `150` reply and the session holding
//! `{direction, path, start}` are committed. From then on, progress is
//! never written down: the kernel keeps it. For `RETR` the data
//! connection's written count (bytes acked + bytes still queued) is how far
//! the file has gone, so a new worker reopens the file and continues at
//! `start + written` — nothing lost, nothing sent twice, nothing read again
//! from the start. For `STOR`/`APPE` the data connection is *peeked*: bytes
//! stay in its receive queue until they are written to the file, and only
//! then consumed, so a new worker continues at `start + consumed` (bytes
//! written but not yet consumed are written again, to the same place).
//!
//! The end of a transfer is ordered so a crash at any point replays to the
//! same bytes: the data connection is shut (the client sees its end), the
//! final reply written, the session committed without the transfer, and
//! only then the keeper's copy of the data connection released.
//!
//! Listings go the same way on the data connection, without a commit of
//! their own: a listing cut by a crash is regenerated (sorted, so the same)
//! and continues at the data connection's written count.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rustix::event::PollFlags;

use crate::control::Control;
use crate::data::wait;
use crate::proto::{self, MAX_LINE};
use crate::session::{DataMode, Direction, Transfer};

/// Transfers move in pieces of this size.
const PIECE: usize = 64 * 1024;
/// How long a blocked data connection is waited on between looks at the
/// control connection.
const TICK: Duration = Duration::from_millis(100);
/// A data connection that moves nothing for this long is given up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// How a transfer ended.
pub enum Outcome {
    Complete,
    /// `ABOR` came on the control connection; it takes `abor` input bytes
    /// after the transfer command.
    Aborted {
        abor: usize,
    },
    /// The data connection failed (the client went away).
    DataFailed(io::Error),
    /// The file could not be read or written.
    LocalFailed(io::Error),
}

/// The best-effort `ABOR` watch of a transfer in progress.
///
/// The control connection is not read while a transfer runs, except to
/// notice `ABOR`. A holdfast read would block if everything in the socket
/// had already been peeked, so the watch reads only when the socket holds
/// more bytes than it did after the last look (`FIONREAD` grows only when
/// input arrives while nothing is committed).
#[derive(Default)]
pub struct Watch {
    /// Stop looking: the next command is not `ABOR`.
    off: bool,
    /// `FIONREAD` after the last look.
    seen: u64,
}

trait Source {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
}

impl Source for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, off)
    }
}

impl Source for [u8] {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let rest = usize::try_from(off)
            .ok()
            .and_then(|o| self.get(o..))
            .unwrap_or(&[]);
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        Ok(n)
    }
}

impl Control<'_> {
    /// Runs a committed file transfer to its end: its first run, or
    /// (`resumed`) one a dead worker had started, continued by a worker that
    /// has just taken the connection over.
    pub(crate) fn transfer(&mut self, t: &Transfer, resumed: bool) -> io::Result<()> {
        self.start_watch(0, resumed)?;
        let outcome = if self.conn.poisoned() {
            Outcome::LocalFailed(io::Error::other("transfer crashed the server twice"))
        } else {
            match t.dir {
                Direction::Send => match self.cfg.root.open_read(&t.path) {
                    Ok(f) => self.pump_out(&f, t.start, 0)?,
                    Err(e) => Outcome::LocalFailed(e),
                },
                Direction::Receive => match self.cfg.root.open_write(&t.path) {
                    Ok(f) => self.pump_in(&f, t.start)?,
                    Err(e) => Outcome::LocalFailed(e),
                },
            }
        };
        self.end_transfer(outcome, 0)
    }

    /// Sends a listing whose command line (`cmd` bytes) is not committed yet.
    pub(crate) fn send_listing(&mut self, bytes: &[u8], cmd: usize) -> io::Result<Outcome> {
        self.start_watch(cmd, false)?;
        self.pump_out(bytes, 0, cmd)
    }

    /// Closes the data connection, answers, and commits the session without
    /// the transfer (and `consumed` more input bytes: an uncommitted
    /// command line, and an `ABOR` line).
    pub(crate) fn end_transfer(&mut self, outcome: Outcome, consumed: usize) -> io::Result<()> {
        self.data.close();
        let (text, abor) = match outcome {
            Outcome::Complete => (proto::reply(226, "Transfer complete."), 0),
            Outcome::Aborted { abor } => (
                proto::reply(426, "Connection closed; transfer aborted.")
                    + &proto::reply(226, "Abort successful."),
                abor,
            ),
            Outcome::DataFailed(e) => {
                tracing::info!(error = %e, "data connection failed");
                (proto::reply(426, "Connection closed; transfer aborted."), 0)
            }
            Outcome::LocalFailed(e) => {
                tracing::warn!(error = %e, "transfer failed");
                (proto::reply(451, "Local error; transfer aborted."), 0)
            }
        };
        self.send(&text)?;
        self.s.transfer = None;
        self.s.data = DataMode::None;
        self.s.data_open = false;
        self.commit(consumed + abor)
    }

    /// File or listing → data connection, from `start` plus what the data
    /// connection has already taken. `cmd`: uncommitted command bytes
    /// before any `ABOR`.
    fn pump_out(
        &mut self,
        src: &(impl Source + ?Sized),
        start: u64,
        cmd: usize,
    ) -> io::Result<Outcome> {
        let mut off = match self.data.sent(self.s.data) {
            Ok(w) => start + w,
            Err(e) => return Ok(Outcome::DataFailed(e)),
        };
        let mut buf = vec![0u8; PIECE];
        let mut moved = Instant::now();
        loop {
            if let Some(abor) = self.abort_requested(cmd)? {
                return Ok(Outcome::Aborted { abor });
            }
            let n = match src.read_at(&mut buf, off) {
                Ok(0) => return Ok(Outcome::Complete),
                Ok(n) => n,
                Err(e) => return Ok(Outcome::LocalFailed(e)),
            };
            let mut done = 0;
            while done < n {
                let s = match self.data.stream() {
                    Ok(s) => s,
                    Err(e) => return Ok(Outcome::DataFailed(e)),
                };
                match s.write(&buf[done..n]) {
                    Ok(k) => {
                        done += k;
                        moved = Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if moved.elapsed() > IDLE_TIMEOUT {
                            return Ok(Outcome::DataFailed(io::ErrorKind::TimedOut.into()));
                        }
                        wait(s.fd(), PollFlags::OUT, TICK)?;
                        if let Some(abor) = self.abort_requested(cmd)? {
                            return Ok(Outcome::Aborted { abor });
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Ok(Outcome::DataFailed(e)),
                }
            }
            off += n as u64;
        }
    }

    /// Data connection → file at `start` plus the stream position; input is
    /// consumed only once it is in the file.
    fn pump_in(&mut self, file: &File, start: u64) -> io::Result<Outcome> {
        let mut buf = vec![0u8; PIECE];
        let mut moved = Instant::now();
        loop {
            if let Some(abor) = self.abort_requested(0)? {
                return Ok(Outcome::Aborted { abor });
            }
            let s = match self.data.stream() {
                Ok(s) => s,
                Err(e) => return Ok(Outcome::DataFailed(e)),
            };
            match s.read(&mut buf) {
                Ok(0) => return Ok(Outcome::Complete),
                Ok(n) => {
                    let end = s.read_pos();
                    let at = start + end - n as u64;
                    if let Err(e) = file.write_all_at(&buf[..n], at) {
                        return Ok(Outcome::LocalFailed(e));
                    }
                    if let Err(e) = s.consume_to(end) {
                        return Ok(Outcome::DataFailed(e));
                    }
                    moved = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if moved.elapsed() > IDLE_TIMEOUT {
                        return Ok(Outcome::DataFailed(io::ErrorKind::TimedOut.into()));
                    }
                    wait(s.fd(), PollFlags::IN, TICK)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Ok(Outcome::DataFailed(e)),
            }
        }
    }

    /// Arms the `ABOR` watch for a transfer. Input the socket holds now is
    /// taken as seen — except when a worker that has just taken the
    /// connection over and read nothing yet `resumed` the transfer: all
    /// input there is then unread (holdfast drops committed input at the
    /// takeover), and an `ABOR` the dead worker was answering is found
    /// again at once.
    fn start_watch(&mut self, cmd: usize, resumed: bool) -> io::Result<()> {
        self.watch.off = false;
        self.watch.seen = if resumed {
            0
        } else {
            rustix::io::ioctl_fionread(&self.conn)?
        };
        // A command already read after the transfer command decides now.
        self.abort_requested(cmd).map(|_| ())
    }

    /// The bytes of an `ABOR` line if it is the first command after `cmd`
    /// uncommitted input bytes; reads the control connection only if it
    /// cannot block (see [`Watch`]).
    fn abort_requested(&mut self, cmd: usize) -> io::Result<Option<usize>> {
        if self.watch.off {
            return Ok(None);
        }
        if !self.eof && rustix::io::ioctl_fionread(&self.conn)? > self.watch.seen {
            let mut chunk = [0u8; 1024];
            let n = io::Read::read(&mut self.conn, &mut chunk)?;
            if self.conn.moved() {
                // Handed to a new version (`holdfast upgrade`), which
                // continues the transfer: touch nothing more.
                return Err(io::ErrorKind::ConnectionAborted.into());
            }
            self.eof = n == 0;
            self.input.extend_from_slice(&chunk[..n]);
            self.watch.seen = rustix::io::ioctl_fionread(&self.conn)?;
        }
        let pending = self.input.get(cmd..).unwrap_or_default();
        match proto::next_line(pending) {
            Some((line, used)) => {
                let abort = proto::parse(line).is_ok_and(|c| c.verb == "ABOR");
                self.watch.off = !abort;
                Ok(abort.then_some(used))
            }
            None => {
                self.watch.off = self.eof || pending.len() > MAX_LINE;
                Ok(None)
            }
        }
    }
}
