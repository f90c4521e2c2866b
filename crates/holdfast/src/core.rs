//! The connection engine shared by the blocking and the tokio flavours.
//!
//! Input is *peeked*, never read: with `SO_PEEK_OFF` each peek continues
//! where the last stopped, and the bytes stay in the kernel's receive queue
//! until the service commits them. The receive queue is therefore the input
//! log, and a new worker finds every uncommitted byte where the dead one left
//! it. Committed bytes are discarded (`MSG_TRUNC`) in batches, so a fast
//! request/response service pays for that syscall once per
//! [`DISCARD_BATCH`] bytes, not once per request.
//!
//! Output goes straight to the socket. Before each `send`, the journal
//! record is updated to say "bytes up to `out_rec` are about to be written,
//! and this is the CRC-32C of everything since the last commit". After a
//! crash the kernel says exactly how many bytes were written
//! (`bytes_acked + SIOCOUTQ`); the new worker regenerates the response,
//! swallows the bytes the client already has, holds back the rest until the
//! regenerated stream reaches `out_rec`, and releases it only if the CRC
//! matches. A mismatch closes that one connection: two different responses
//! are never spliced together.

// Parts used only by the tokio flavour.
#![cfg_attr(not(feature = "tokio"), allow(dead_code))]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use hf_journal::record::{
    slot_of, Record, FLAG_CLOSING, FLAG_NO_REPLAY_CLOSE, FLAG_NO_REPLAY_ERROR, FLAG_UNCHECKED,
    MAX_NONDET, RECORD_SIZE, SLOT_SIZE,
};
use rustix::net::{RecvFlags, SendFlags, Shutdown};

use crate::worker::{Link, Place};
use hf_journal::wire::{ConnEntry, CONN_CRASHED, CONN_MOVED};
use hf_sys::shm::SharedMem;

/// Committed input is discarded from the kernel once this much has piled up.
pub const DISCARD_BATCH: u64 = 4096;
/// A connection whose service has read this much input without committing
/// it moves its input to a spool, so the client's window stays open.
pub const SPOOL_AT: u64 = 64 * 1024;
/// The most uncommitted input a spool holds (a request larger than this is
/// refused with an error to the service).
pub const SPOOL_MAX: usize = 64 << 20;
/// By default, a request in flight during this many consecutive crashes of
/// its worker is poison: the next worker is told (`Conn::poisoned`) so it
/// answers with an error instead of running it again (the keeper's
/// `--poison-after` overrides it).
pub const POISON_AFTER: u16 = 2;
/// Spool layout: the absolute input offset of its first data byte (`u64`
/// at 0), how far its worker has read (`u64` at [`SPOOL_READ`]), then data
/// from here on.
const SPOOL_DATA: usize = 64;
/// Where a spool says how far its current worker has read (an absolute
/// input offset): after a crash, the keeper reads whether that worker was
/// running the request in the spool. A plain store into the mapping per read.
const SPOOL_READ: usize = hf_journal::SPOOL_READ_MARK;

/// The state of one connection. The fd is held by the flavour's wrapper
/// (a plain `OwnedFd`, or tokio's `AsyncFd`) and lent to every call.
pub(crate) struct Core {
    kept: Option<Box<Kept>>,
    /// Pass-through: the state version this build writes (what `state`
    /// reports, with no state).
    pass_version: u16,
    nonblocking: bool,
    closed: bool,
    /// Handed back to the keeper for a new version (see [`Core::release`]).
    released: bool,
    /// …while part of a request had been read: reads then fail instead of
    /// reporting an end of input the client never sent.
    released_mid_request: bool,
}

/// The blocking flavour's reads wake this often while waiting for input, to
/// see whether the worker is draining (the read itself is one blocking
/// `recv`, as before; the timeout only bounds how long a drain waits).
const BLOCKING_DRAIN_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

struct Kept {
    link: Arc<Link>,
    slot: u32,
    rec: Record,
    recovered: bool,
    /// Recovered state blob: (version, bytes), handed to the service.
    state_version: u16,
    /// Absolute input offset up to which the service has peeked.
    in_read: u64,
    /// Absolute input offset the kernel has consumed (≤ `rec.in_commit`).
    in_discarded: u64,
    /// Bytes of output the service has handed over (logical stream).
    out_pos: u64,
    /// CRC-32C of output `[rec.out_commit, out_pos)`.
    crc_run: u32,
    replay: Option<Replay>,
    /// Verified replayed bytes not yet on the socket.
    pending: Vec<u8>,
    /// Recovered mid-response: push this response's segments out past
    /// Nagle (see [`push`]) until its commit.
    push_until_commit: bool,
    /// `skip_output_check` was called since the last commit.
    unchecked_window: bool,
    /// The output being replayed was left unchecked by a worker of another
    /// generation: it cannot be trusted to match, so the next write closes
    /// the connection instead of splicing.
    foreign_unchecked: bool,
    /// Next unread entry of the recorded nondeterminism.
    nondet_cursor: usize,
    slot_buf: Box<[u8; SLOT_SIZE]>,
    spool: Option<Spool>,
    /// The request in flight is poison (see [`POISON_AFTER`]).
    poisoned: bool,
    /// The request in flight was running when a worker crashed by itself:
    /// it reads only while it holds the worker's suspect gate
    /// ([`crate::worker::SuspectGate`]), until its commit.
    suspect: bool,
    /// Holds the suspect gate.
    gated: bool,
    /// Since when the request in flight runs, for a per-request deadline.
    busy: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Held channels handed back with this connection, not yet taken.
    channels: Vec<(u32, OwnedFd)>,
    /// Its place in the worker's connection budget, given back on drop.
    _place: Place,
}

/// Uncommitted input moved out of the kernel into a memfd the keeper holds.
///
/// Input is received straight into the shared mapping, so the kernel's
/// consumed counter says exactly how many bytes are in the spool even if the
/// worker dies right after a `recv`. Everything from `base` to `end` (absolute
/// input offsets) is in the spool; the input is consumed from the kernel up
/// to `end`.
struct Spool {
    _fd: OwnedFd,
    mem: SharedMem,
    base: u64,
    end: u64,
}

/// Output regeneration after a crash.
struct Replay {
    /// The kernel's written position: bytes before it already went out.
    skip_to: u64,
    /// The dead worker's `out_rec`; the CRC is checked when output reaches it.
    verify_at: u64,
    /// `None`: the dead worker's output was not checksummed
    /// ([`FLAG_UNCHECKED`]), the service vouches for the regenerated bytes.
    crc: Option<u32>,
    /// Regenerated bytes past `skip_to`, held until verified.
    held: Vec<u8>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// What a connection handed to a new version answers to writes and commits.
pub(crate) fn moved() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection moved to a new version of the service",
    )
}

pub(crate) fn divergence() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "replayed output differs from what the client already received",
    )
}

impl Core {
    pub(crate) fn pass_through(nonblocking: bool, state_version: u16) -> Core {
        Core {
            kept: None,
            pass_version: state_version,
            nonblocking,
            closed: false,
            released: false,
            released_mid_request: false,
        }
    }

    /// A connection the keeper handed over. A recovered one (a previous
    /// worker owned it) resumes where its journal record says it stood.
    pub(crate) fn kept(
        fd: BorrowedFd<'_>,
        link: Arc<Link>,
        entry: ConnEntry,
        spool: Option<OwnedFd>,
        place: Place,
        nonblocking: bool,
    ) -> io::Result<Core> {
        // The keeper's listeners hand out sockets that deliver urgent data
        // inline; this also covers connections queued on a listener before
        // it got the flag (socket activation) or accepted by an older
        // keeper. It comes before `recover`, whose positions rely on it.
        hf_sys::tcp::set_urgent_inline(fd)?;
        let (conn_id, slot, recovered) = (entry.conn_id, entry.slot, entry.recovered());
        let crashed = entry.flags & CONN_CRASHED != 0;
        // Handed over at a commit point by a draining worker: resumed the
        // same way, but nothing was lost, so the service is not told.
        let moved = entry.flags & CONN_MOVED != 0;
        let mut kept = Kept {
            link,
            slot,
            rec: Record::new(conn_id),
            recovered: recovered && !moved,
            state_version: 0,
            in_read: 0,
            in_discarded: 0,
            out_pos: 0,
            crc_run: 0,
            replay: None,
            pending: Vec::new(),
            push_until_commit: false,
            unchecked_window: false,
            foreign_unchecked: false,
            nondet_cursor: 0,
            slot_buf: Box::new([0u8; SLOT_SIZE]),
            spool: None,
            poisoned: false,
            suspect: false,
            gated: false,
            busy: None,
            channels: Vec::new(),
            _place: place,
        };
        kept.busy = kept.link.busy_cell();
        // Channels sent ahead of a connection a worker had before; a fresh
        // connection has none (anything stashed for its id is stale).
        let channels = kept.link.take_channels(conn_id);
        if recovered {
            kept.channels = channels;
        }
        if recovered {
            kept.recover(fd, spool, crashed)?;
        } else {
            // The keeper wrote seq 1; continue from there so our first write
            // goes to the other slot.
            kept.rec.seq = 1;
        }
        hf_sys::tcp::set_peek_off(fd, 0)?;
        if !nonblocking {
            rustix::net::sockopt::set_socket_timeout(
                fd,
                rustix::net::sockopt::Timeout::Recv,
                Some(BLOCKING_DRAIN_CHECK),
            )?;
        }
        Ok(Core {
            kept: Some(Box::new(kept)),
            pass_version: 1,
            nonblocking,
            closed: false,
            released: false,
            released_mid_request: false,
        })
    }

    pub(crate) fn recovered(&self) -> bool {
        self.kept.as_ref().is_some_and(|k| k.recovered)
    }

    /// A replay is under way: the output being produced is compared with
    /// what the dead worker already sent, not yet new.
    pub(crate) fn replaying(&self) -> bool {
        self.kept.as_ref().is_some_and(|k| k.replay.is_some())
    }

    /// The request in flight was in flight during [`POISON_AFTER`]
    /// consecutive crashes of its worker: answer it with an error instead of
    /// running it, then commit as usual.
    pub(crate) fn poisoned(&self) -> bool {
        self.kept.as_ref().is_some_and(|k| k.poisoned)
    }

    /// Hands the keeper a copy of `fd` to hold with this connection under
    /// `tag`; a no-op in pass-through mode.
    pub(crate) fn hold(&mut self, tag: u32, fd: BorrowedFd<'_>) -> io::Result<()> {
        if self.released {
            return Err(moved());
        }
        let Some(k) = &mut self.kept else {
            return Ok(());
        };
        k.channels.retain(|(t, _)| *t != tag);
        k.link.hold(k.rec.conn_id, k.slot, tag, fd)
    }

    /// The channel held under `tag` that came back with this connection.
    pub(crate) fn take_held(&mut self, tag: u32) -> Option<OwnedFd> {
        let k = self.kept.as_mut()?;
        let i = k.channels.iter().position(|(t, _)| *t == tag)?;
        Some(k.channels.swap_remove(i).1)
    }

    /// The keeper accepts on held listener `listener` and holds the new
    /// connection under `tag`; `Ok(None)` in pass-through mode.
    pub(crate) fn accept_held(
        &mut self,
        listener: u32,
        tag: u32,
        timeout: std::time::Duration,
    ) -> io::Result<Option<OwnedFd>> {
        if self.released {
            return Err(moved());
        }
        let Some(k) = &mut self.kept else {
            return Ok(None);
        };
        k.channels.retain(|(t, _)| *t != tag);
        k.link
            .accept_on(k.rec.conn_id, k.slot, listener, tag, timeout)
            .map(Some)
    }

    /// The keeper drops its copy of channel `tag`.
    pub(crate) fn unhold(&mut self, tag: u32) -> io::Result<()> {
        if self.released {
            return Err(moved());
        }
        let Some(k) = &mut self.kept else {
            return Ok(());
        };
        k.channels.retain(|(t, _)| *t != tag);
        k.link.send(&hf_journal::wire::Msg::Unhold {
            conn_id: k.rec.conn_id,
            slot: k.slot,
            tag,
        })
    }

    /// The output until the next commit is regenerated byte for byte by
    /// construction: it is not checksummed, and a replay of it is not
    /// checked. Stored with the next write.
    ///
    /// "By construction" holds for one build of the service only: another
    /// version may write other bytes (a different head, say). So the
    /// worker's build identity (its executable and arguments, see
    /// `worker::build_identity`) is recorded with the first call of a
    /// request, and a replay by a worker of another build is refused: its
    /// next write closes the connection cleanly rather than splice two
    /// versions' answers. An upgrade to the same command, or a
    /// rejuvenation, replays as usual. Should the record have no room
    /// left, the output stays checked.
    pub(crate) fn skip_output_check(&mut self) {
        let Some(k) = &mut self.kept else {
            return;
        };
        if k.unchecked_window {
            return;
        }
        k.unchecked_window = true;
        let own = k.link.build.to_le_bytes();
        let recorded = match k.next_recorded() {
            Ok(Some(v)) => Some(v == own),
            Ok(None) => match k.keep_recorded(&own) {
                Ok(()) => None,
                // No room to record it: keep checking this output.
                Err(_) => return,
            },
            Err(_) => Some(false),
        };
        if recorded == Some(false) {
            k.foreign_unchecked = k.replay.is_some();
        }
        k.rec.flags |= FLAG_UNCHECKED;
    }

    /// What a new worker does with the request in flight if this one dies
    /// before the next commit; stored in the journal at once.
    pub(crate) fn set_replay(&mut self, policy: crate::ReplayPolicy) -> io::Result<()> {
        let Some(k) = &mut self.kept else {
            return Ok(());
        };
        k.rec.flags &= !(FLAG_NO_REPLAY_ERROR | FLAG_NO_REPLAY_CLOSE);
        k.rec.flags |= match policy {
            crate::ReplayPolicy::Replay => 0,
            crate::ReplayPolicy::Error => FLAG_NO_REPLAY_ERROR,
            crate::ReplayPolicy::Close => FLAG_NO_REPLAY_CLOSE,
        };
        k.store()
    }

    pub(crate) fn conn_id(&self) -> Option<u64> {
        self.kept.as_ref().map(|k| k.rec.conn_id)
    }

    /// The state blob saved at the last commit (empty for a new connection).
    pub(crate) fn state(&self) -> (u16, &[u8]) {
        match &self.kept {
            Some(k) => (k.state_version, k.rec.state()),
            None => (self.pass_version, &[]),
        }
    }

    fn flags(&self) -> (RecvFlags, SendFlags) {
        if self.nonblocking {
            (
                RecvFlags::DONTWAIT,
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            )
        } else {
            (RecvFlags::empty(), SendFlags::NOSIGNAL)
        }
    }

    /// Reads input. A connection handed to a new version between requests
    /// reads as end of input: the service drops it as if the client had
    /// gone, and the new version carries on with it.
    pub(crate) fn read(&mut self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let (rflags, _) = self.flags();
        if self.kept.is_none() {
            return Ok(rustix::net::recv(fd, buf, rflags)?.0);
        }
        loop {
            if self.released || self.release_if_draining(fd, true) {
                return self.read_after_release();
            }
            let Some(k) = &mut self.kept else {
                return Ok(0);
            };
            if k.suspect && !k.gated {
                let conn = k.rec.conn_id;
                k.gated = if self.nonblocking {
                    k.link.suspects.try_take(conn)
                } else {
                    k.link.suspects.take_within(conn, BLOCKING_DRAIN_CHECK)
                };
                if !k.gated {
                    if self.nonblocking {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    continue;
                }
            }
            if k.spool.is_none() && k.in_read - k.in_discarded >= SPOOL_AT {
                k.start_spool(fd)?;
            }
            let r = if k.spool.is_some() {
                k.read_spooled(fd, &mut *buf, self.nonblocking)
            } else {
                rustix::net::recv(fd, &mut *buf, rflags | RecvFlags::PEEK)
                    .map(|(n, _)| {
                        k.in_read += n as u64;
                        n
                    })
                    .map_err(Into::into)
            };
            match r {
                Ok(n) => {
                    k.mark_busy();
                    return Ok(n);
                }
                // Blocking flavour: the receive timeout expired, so the
                // connection is idle: wait without a timer for input or a
                // drain, then look at the drain flag and read again.
                Err(e) if would_block(&e) && !self.nonblocking => {
                    k.ungate();
                    // Committed input still in the kernel (discarded in
                    // batches) would make the socket look readable: drop
                    // it now. With nothing uncommitted read, readable then
                    // means new input; with a partial request waiting,
                    // wake on the timer as before.
                    if k.spool.is_none() && k.rec.in_commit > k.in_discarded {
                        discard_exact(fd, k.rec.in_commit - k.in_discarded)?;
                        k.in_discarded = k.rec.in_commit;
                    }
                    if k.spool.is_none() && k.in_read == k.in_discarded {
                        k.link.wait_input_or_drain(fd)?;
                    }
                }
                Err(e) => {
                    // Waiting for the client: other suspects may run.
                    k.ungate();
                    return Err(e);
                }
            }
        }
    }

    /// What a read returns once the connection went to a new version: end
    /// of input between requests, an error in the middle of one (a service
    /// must not take a cut request for a complete one).
    pub(crate) fn read_after_release(&self) -> io::Result<usize> {
        if self.released_mid_request {
            Err(moved())
        } else {
            Ok(0)
        }
    }

    /// While draining, a connection at a commit point is handed back to
    /// the keeper (see [`Core::release`]): no output since the commit, and,
    /// before a write, no input read past it either — a request that has
    /// been read runs to its answer here, so it never runs twice. When the
    /// keeper stops, nothing else will serve the connection: it goes back
    /// only once idle, before a read (see [`Kept::idle`]).
    fn release_if_draining(&mut self, fd: BorrowedFd<'_>, reading: bool) -> bool {
        let Some(k) = &self.kept else {
            return false;
        };
        if self.closed
            || !k.link.draining()
            || k.replay.is_some()
            || !k.pending.is_empty()
            || k.out_pos != k.rec.out_commit
            || (!reading && k.in_read != k.rec.in_commit)
            || (k.link.stopping() && !(reading && k.idle(fd)))
        {
            return false;
        }
        self.release();
        true
    }

    /// Lets the keeper hand this connection to a new version of the service.
    /// The record is made to say exactly what the client has (a write that
    /// sent nothing may have announced bytes it never sent), so the new
    /// version resumes at the commit point without replaying anything;
    /// then this worker never touches the connection again.
    fn release(&mut self) {
        let Some(k) = &mut self.kept else {
            return;
        };
        k.ungate();
        if let Some(b) = &k.busy {
            b.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        if k.rec.out_rec != k.out_pos || !k.rec.nondet().is_empty() {
            k.rec.out_rec = k.out_pos;
            k.rec.out_crc = 0;
            k.rec.clear_nondet();
            if let Err(e) = k.store() {
                tracing::warn!(conn = k.rec.conn_id, error = %e, "journal store failed at release");
            }
        }
        self.closed = true;
        self.released = true;
        self.released_mid_request = k.in_read != k.rec.in_commit;
        let msg = hf_journal::wire::Msg::Released {
            conn_id: k.rec.conn_id,
            slot: k.slot,
        };
        if let Err(e) = k.link.send(&msg) {
            tracing::warn!(conn = k.rec.conn_id, error = %e, "could not hand a connection back");
        }
    }

    /// The state blob version `commit` saves when the service names none.
    pub(crate) fn state_version(&self) -> u16 {
        self.kept
            .as_ref()
            .map_or(self.pass_version, |k| k.link.state_version)
    }

    /// Handed back to the keeper for a new version: the service should drop it.
    pub(crate) fn released(&self) -> bool {
        self.released
    }

    /// Tasks of the tokio flavour: whether waiting to read (or to write)
    /// can end because the connection goes to a new version now.
    pub(crate) fn draining_now(&mut self, fd: BorrowedFd<'_>, reading: bool) -> bool {
        self.released || self.release_if_draining(fd, reading)
    }

    pub(crate) fn write(&mut self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        let (_, sflags) = self.flags();
        if self.released || self.release_if_draining(fd, false) {
            return Err(moved());
        }
        self.flush_pending(fd)?;
        let Some(k) = &mut self.kept else {
            return Ok(rustix::net::send(fd, buf, sflags)?);
        };
        if k.foreign_unchecked {
            let e = io::Error::new(
                io::ErrorKind::InvalidData,
                "the answer being replayed was sent unchecked by another version of the service; \
                 its replay cannot be matched with what the client has",
            );
            self.abort(fd, &e);
            return Err(e);
        }
        if k.replay.is_some() {
            return match k.regenerate(buf) {
                Ok(n) => {
                    // Verified bytes go out now if they can; else with the
                    // next write or flush.
                    match self.flush_pending(fd) {
                        Err(e) if !would_block(&e) => Err(e),
                        _ => Ok(n),
                    }
                }
                Err(e) => {
                    self.abort(fd, &e);
                    Err(e)
                }
            };
        }
        // Record first, then write: after a crash the record covers every
        // byte the kernel may hold.
        let unchecked = k.rec.flags & FLAG_UNCHECKED != 0;
        k.rec.out_rec = k.out_pos + buf.len() as u64;
        if !unchecked {
            k.rec.out_crc = crc32c::crc32c_append(k.crc_run, buf);
        }
        k.store()?;
        let n = rustix::net::send(fd, buf, sflags)?;
        if k.push_until_commit {
            push(fd);
        }
        if !unchecked {
            k.crc_run = if n == buf.len() {
                k.rec.out_crc
            } else {
                crc32c::crc32c_append(k.crc_run, &buf[..n])
            };
        }
        k.out_pos += n as u64;
        Ok(n)
    }

    /// Sends verified replayed bytes still held back. `WouldBlock` if the
    /// socket is full (non-blocking mode).
    pub(crate) fn flush_pending(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let (_, sflags) = self.flags();
        let Some(k) = &mut self.kept else {
            return Ok(());
        };
        if k.pending.is_empty() {
            return Ok(());
        }
        while !k.pending.is_empty() {
            let n = rustix::net::send(fd, &k.pending, sflags)?;
            k.pending.drain(..n);
        }
        push(fd);
        Ok(())
    }

    /// Tokio flavour: whether this connection may read now. A suspect (see
    /// [`crate::worker::SuspectGate`]) takes the gate first, or has `waker`
    /// woken when it frees.
    pub(crate) fn poll_gate(&mut self, waker: &std::task::Waker) -> bool {
        match &mut self.kept {
            Some(k) if k.suspect && !k.gated && !self.released => {
                k.gated = k.link.suspects.poll_take(k.rec.conn_id, waker);
                k.gated
            }
            _ => true,
        }
    }

    /// Tokio flavour: the connection waits for its client; a suspect lets
    /// others run meanwhile.
    pub(crate) fn ungate(&mut self) {
        if let Some(k) = &mut self.kept {
            k.ungate();
        }
    }

    /// Input is waiting in the spool: a read returns it without the socket
    /// becoming readable. After a crash the whole uncommitted request may be
    /// in the spool and nothing more may ever arrive on the socket, so a
    /// reader must not wait for readiness first.
    pub(crate) fn spooled_unread(&self) -> bool {
        self.kept
            .as_ref()
            .is_some_and(|k| k.spool.as_ref().is_some_and(|sp| k.in_read < sp.end))
            && !self.released
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.kept.as_ref().is_some_and(|k| !k.pending.is_empty())
    }

    /// Marks a request boundary: `consumed` more input bytes are done with,
    /// all output so far is the response to them, and `state` is what a new
    /// worker needs to carry on from here.
    pub(crate) fn commit(
        &mut self,
        fd: BorrowedFd<'_>,
        consumed: usize,
        state_version: u16,
        state: &[u8],
    ) -> io::Result<()> {
        self.commit_inner(fd, consumed, state_version, state, false)
    }

    /// A commit after which the connection closes: the journal says both
    /// in one store, so a crash between the answer and the close cannot
    /// leave the connection open waiting for a request that will not come.
    pub(crate) fn commit_and_close(
        &mut self,
        fd: BorrowedFd<'_>,
        consumed: usize,
    ) -> io::Result<()> {
        let v = self.state_version();
        let r = self.commit_inner(fd, consumed, v, &[], true);
        self.close(fd);
        r
    }

    fn commit_inner(
        &mut self,
        fd: BorrowedFd<'_>,
        consumed: usize,
        state_version: u16,
        state: &[u8],
        last: bool,
    ) -> io::Result<()> {
        if self.released {
            return Err(moved());
        }
        let Some(k) = &mut self.kept else {
            return Ok(());
        };
        if k.replay.is_some() {
            // The dead worker wrote more than this before its next commit:
            // the regenerated response is shorter, so it differs.
            let e = divergence();
            self.abort(fd, &e);
            return Err(e);
        }
        if !k.pending.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "flush before commit",
            ));
        }
        let in_commit = k.rec.in_commit + consumed as u64;
        if in_commit > k.in_read {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "commit of more input than was read",
            ));
        }
        k.rec
            .set_state(state_version, state)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        k.state_version = state_version;
        k.rec.in_commit = in_commit;
        k.rec.out_commit = k.out_pos;
        k.rec.out_rec = k.out_pos;
        k.rec.out_crc = 0;
        k.crc_run = 0;
        k.rec.clear_nondet();
        k.rec.deaths = 0;
        k.rec.flags &= !(FLAG_NO_REPLAY_ERROR | FLAG_NO_REPLAY_CLOSE | FLAG_UNCHECKED);
        k.poisoned = false;
        k.suspect = false;
        k.ungate();
        k.nondet_cursor = 0;
        k.push_until_commit = false;
        k.unchecked_window = false;
        if last {
            k.rec.flags |= FLAG_CLOSING;
        }
        k.store()?;
        k.link.count_request();
        if let Some(b) = &k.busy {
            // Input read past this commit belongs to the next request, which
            // has started; otherwise nothing is in flight.
            let t = if k.in_read > in_commit {
                k.link.busy_now()
            } else {
                0
            };
            b.store(t, std::sync::atomic::Ordering::Relaxed);
        }
        match &mut k.spool {
            None if in_commit - k.in_discarded >= DISCARD_BATCH => {
                discard_exact(fd, in_commit - k.in_discarded)?;
                k.in_discarded = in_commit;
            }
            // Everything spooled is committed: start the spool over. The
            // journal already says so, so a crash on either side of this
            // store finds nothing it needs before `base`.
            Some(sp) if in_commit == sp.end && sp.base != sp.end => {
                sp.base = sp.end;
                sp.mem
                    .store_u64(0, sp.base)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Recorded nondeterminism: the first execution keeps `make()`'s value
    /// in the journal record; a replay of the same request gets the stored
    /// value back. The record reaches shared memory with the next write or
    /// commit: a value no output depended on need not survive a crash.
    pub(crate) fn record(&mut self, make: impl FnOnce() -> Vec<u8>) -> io::Result<Vec<u8>> {
        let Some(k) = &mut self.kept else {
            return Ok(make());
        };
        if let Some(v) = k.next_recorded()? {
            return Ok(v.to_vec());
        }
        let v = make();
        k.keep_recorded(&v)?;
        Ok(v)
    }

    /// The next value a dead worker recorded in this window, if this is a
    /// replay and one is left; records nothing (see `tokio::Conn::replayed`).
    pub(crate) fn replayed(&mut self) -> io::Result<Option<Vec<u8>>> {
        let Some(k) = &mut self.kept else {
            return Ok(None);
        };
        Ok(k.next_recorded()?.map(<[u8]>::to_vec))
    }

    /// [`Core::record`] for a fixed-size value, without allocating.
    pub(crate) fn record_fixed<const N: usize>(
        &mut self,
        make: impl FnOnce() -> [u8; N],
    ) -> io::Result<[u8; N]> {
        let Some(k) = &mut self.kept else {
            return Ok(make());
        };
        if let Some(v) = k.next_recorded()? {
            return v.try_into().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "recorded value has another size",
                )
            });
        }
        let v = make();
        k.keep_recorded(&v)?;
        Ok(v)
    }

    fn abort(&mut self, fd: BorrowedFd<'_>, why: &io::Error) {
        if let Some(k) = &self.kept {
            tracing::error!(conn = k.rec.conn_id, error = %why, "closing connection");
        }
        self.close(fd);
    }

    /// Closes the connection for good: journal says so first (a crash from
    /// here on must not resurrect it), then unread input is dropped (closing
    /// with unread input would send RST), FIN goes out, and the keeper is told
    /// to drop its dup.
    pub(crate) fn close(&mut self, fd: BorrowedFd<'_>) {
        if self.closed {
            return;
        }
        self.closed = true;
        let _ = self.flush_pending(fd);
        if let Some(k) = &mut self.kept {
            k.ungate();
            if let Some(b) = &k.busy {
                b.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            k.rec.flags |= FLAG_CLOSING;
            let _ = k.store();
            fin(fd);
            let msg = hf_journal::wire::Msg::Closed {
                conn_id: k.rec.conn_id,
                slot: k.slot,
            };
            if let Err(e) = k.link.send(&msg) {
                tracing::warn!(conn = k.rec.conn_id, error = %e, "could not tell the keeper about a close");
            }
        }
    }
}

/// Ends our side of the connection cleanly: unread input is dropped first,
/// so the peer gets a FIN, not an RST.
fn fin(fd: BorrowedFd<'_>) {
    while let Ok(n) = hf_sys::tcp::discard(fd, 1 << 30) {
        if n == 0 {
            break;
        }
    }
    let _ = rustix::net::shutdown(fd, Shutdown::Write);
}

/// Sends what the socket holds now, whatever Nagle's algorithm would wait
/// for. The tail of a response cut by a crash goes out as a separate small
/// segment while the dead worker's last one may still be unacknowledged;
/// with a client that delays its ACKs, Nagle would hold the tail ~40 ms.
/// Setting `TCP_NODELAY` pushes pending segments; the service's own
/// setting is restored at once.
fn push(fd: BorrowedFd<'_>) {
    if let Ok(false) = rustix::net::sockopt::tcp_nodelay(fd) {
        let _ = rustix::net::sockopt::set_tcp_nodelay(fd, true);
        let _ = rustix::net::sockopt::set_tcp_nodelay(fd, false);
    }
}

fn discard_exact(fd: BorrowedFd<'_>, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let got = hf_sys::tcp::discard(fd, n.min(1 << 30) as usize)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "committed input missing from the socket",
            ));
        }
        n -= got as u64;
    }
    Ok(())
}

impl Kept {
    /// Lets go of the suspect gate if this connection holds it.
    fn ungate(&mut self) {
        if self.gated {
            self.gated = false;
            self.link.suspects.release(self.rec.conn_id);
        }
    }

    /// No request in flight or waiting: everything read is committed, and
    /// no unread input waits in the kernel (past what was peeked) or in the
    /// spool. A peer that closed its side with nothing pending is idle too.
    fn idle(&self, fd: BorrowedFd<'_>) -> bool {
        // Unread input is `inq + in_discarded - in_read`: the kernel holds
        // everything from `in_discarded` on (a spool consumed it up to its
        // end, which is then `in_discarded`).
        self.in_read == self.rec.in_commit
            && hf_sys::tcp::inq(fd).is_ok_and(|inq| inq + self.in_discarded <= self.in_read)
    }

    /// A request is in flight once input past the commit has been read.
    fn mark_busy(&self) {
        if let Some(b) = &self.busy {
            if self.in_read > self.rec.in_commit
                && b.load(std::sync::atomic::Ordering::Relaxed) == 0
            {
                b.store(self.link.busy_now(), std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The next value recorded by the dead worker for this request, if any.
    fn next_recorded(&mut self) -> io::Result<Option<&[u8]>> {
        let nd = self.rec.nondet();
        if self.nondet_cursor >= nd.len() {
            return Ok(None);
        }
        let len = usize::from(nd[self.nondet_cursor]);
        let start = self.nondet_cursor + 1;
        let v = nd
            .get(start..start + len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad recorded value"))?;
        self.nondet_cursor = start + len;
        Ok(Some(v))
    }

    fn keep_recorded(&mut self, v: &[u8]) -> io::Result<()> {
        let too_big = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "recorded values exceed the journal's room",
            )
        };
        let len = u8::try_from(v.len()).map_err(|_| too_big())?;
        if self.rec.nondet().len() + 1 + v.len() > MAX_NONDET {
            return Err(too_big());
        }
        self.rec.push_nondet(&[len]).map_err(|_| too_big())?;
        self.rec.push_nondet(v).map_err(|_| too_big())?;
        self.nondet_cursor = self.rec.nondet().len();
        Ok(())
    }

    /// Moves this connection's input to a spool: the keeper gets the memfd
    /// first, then the bytes already peeked are consumed into it.
    fn start_spool(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let (sfd, mem) = SharedMem::create("holdfast-spool", SPOOL_DATA + SPOOL_MAX)?;
        let base = self.in_discarded;
        let oob = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
        mem.store_u64(0, base).map_err(oob)?;
        mem.store_u64(SPOOL_READ, self.in_read).map_err(oob)?;
        self.link
            .send_spool(self.rec.conn_id, self.slot, sfd.as_fd())?;
        let want =
            usize::try_from(self.in_read - base).map_err(|_| io::Error::other("spool offset"))?;
        let mut have = 0;
        while have < want {
            // The bytes were peeked, so they are queued: this does not block.
            let n = mem.recv_into(fd, SPOOL_DATA + have, want - have, false)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peeked input vanished",
                ));
            }
            have += n;
        }
        tracing::debug!(conn = self.rec.conn_id, base, bytes = want, "input spooled");
        self.in_discarded = self.in_read;
        self.spool = Some(Spool {
            _fd: sfd,
            mem,
            base,
            end: self.in_read,
        });
        Ok(())
    }

    fn read_spooled(
        &mut self,
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
        nonblocking: bool,
    ) -> io::Result<usize> {
        let Some(sp) = &mut self.spool else {
            return Ok(0);
        };
        if self.in_read == sp.end {
            let used = (sp.end - sp.base) as usize;
            let room = SPOOL_MAX - used;
            if room == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "uncommitted input exceeds the 64 MiB spool; commit large requests in pieces",
                ));
            }
            let want = room.min(buf.len().max(64 * 1024));
            let n = sp.mem.recv_into(fd, SPOOL_DATA + used, want, nonblocking)?;
            if n == 0 {
                return Ok(0);
            }
            sp.end += n as u64;
            self.in_discarded = sp.end;
        }
        let avail = (sp.end - self.in_read) as usize;
        let n = avail.min(buf.len());
        let off = SPOOL_DATA + (self.in_read - sp.base) as usize;
        sp.mem
            .read(off, &mut buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.in_read += n as u64;
        let _ = sp.mem.store_u64(SPOOL_READ, self.in_read);
        Ok(n)
    }

    fn store(&mut self) -> io::Result<()> {
        self.rec.seq += 1;
        let n = self.rec.encode(&mut self.slot_buf);
        let off = hf_journal::record_offset(self.slot) + slot_of(self.rec.seq) * SLOT_SIZE;
        self.link
            .journal
            .write(off, &self.slot_buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    /// Reads the dead worker's record and lines it up with the kernel's
    /// positions. Any inconsistency is an error: the caller closes the
    /// connection rather than guess.
    fn recover(
        &mut self,
        fd: BorrowedFd<'_>,
        spool: Option<OwnedFd>,
        crashed: bool,
    ) -> io::Result<()> {
        let conn_id = self.rec.conn_id;
        let mut raw = [0u8; RECORD_SIZE];
        self.link
            .journal
            .read(hf_journal::record_offset(self.slot), &mut raw)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let rec = hf_journal::record::pick(&raw, conn_id).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("journal record: {e}"))
        })?;
        if rec.closing() {
            // The service had closed it (or committed its last answer): the
            // dead worker may not have finished the close, so finish it —
            // unread input dropped first, so the peer gets a FIN, not an RST.
            fin(fd);
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection was closed by the service",
            ));
        }
        let pos = hf_sys::tcp::stream_positions(fd)?;
        if pos.closed {
            // The client reset it (or both FINs went through) while no
            // worker had it: nothing can reach the client any more, and
            // after a reset the kernel's counts cannot be told from a FIN's,
            // so they are not compared with the journal.
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection reset or closed while no worker had it",
            ));
        }
        // The service said the request in flight must not run again: close
        // the connection if it asked so, or if part of the answer is out
        // (an error cannot follow it).
        let no_replay = rec.flags & (FLAG_NO_REPLAY_ERROR | FLAG_NO_REPLAY_CLOSE) != 0
            && (pos.received > rec.in_commit || rec.out_rec > rec.out_commit);
        if no_replay && (rec.flags & FLAG_NO_REPLAY_CLOSE != 0 || pos.written > rec.out_commit) {
            tracing::warn!(
                conn = conn_id,
                input_offset = rec.in_commit,
                "request in flight may not run again: closing the connection"
            );
            fin(fd);
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "request not replayable; connection closed",
            ));
        }
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        if let Some(sfd) = spool {
            // Uncommitted input [in_commit, consumed) is in the spool. If the
            // worker died after handing the spool over but before moving the
            // committed-but-undiscarded bytes into it, the kernel still has
            // them: they are committed, so they are dropped here.
            let mem = SharedMem::map(&sfd)?;
            let base = mem.load_u64(0).map_err(|_| bad("spool too small"))?;
            let end = pos.consumed.max(rec.in_commit);
            let held = end.checked_sub(base).and_then(|n| usize::try_from(n).ok());
            let fits = held.is_some_and(|n| n <= SPOOL_MAX && SPOOL_DATA + n <= mem.len());
            if !(base <= rec.in_commit && base <= pos.consumed && fits) {
                return Err(bad("spool does not match the journal and the kernel"));
            }
            discard_exact(fd, end - pos.consumed)?;
            // This worker starts reading from the commit.
            mem.store_u64(SPOOL_READ, rec.in_commit)
                .map_err(|_| bad("spool too small"))?;
            self.spool = Some(Spool {
                _fd: sfd,
                mem,
                base,
                end,
            });
        } else if pos.consumed > rec.in_commit {
            return Err(bad("kernel consumed past the committed input"));
        }
        if pos.written < rec.out_commit || pos.written > rec.out_rec {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "kernel wrote {} bytes, journal says between {} and {} ({pos:?}, seq {}, in_commit {}, nondet {})",
                    pos.written, rec.out_commit, rec.out_rec, rec.seq, rec.in_commit, rec.nondet().len()
                ),
            ));
        }
        self.in_read = rec.in_commit;
        if let Some(sp) = &self.spool {
            self.in_discarded = sp.end;
        } else {
            discard_exact(fd, rec.in_commit - pos.consumed)?;
            self.in_discarded = rec.in_commit;
        }
        self.out_pos = rec.out_commit;
        self.crc_run = 0;
        // Nagle holds a small segment only while earlier data is
        // unacknowledged: push only then.
        self.push_until_commit = pos.written > rec.out_commit && pos.unacked > 0;
        if rec.out_rec > rec.out_commit {
            self.replay = Some(Replay {
                skip_to: pos.written,
                verify_at: rec.out_rec,
                crc: (rec.flags & FLAG_UNCHECKED == 0).then_some(rec.out_crc),
                held: Vec::new(),
            });
        }
        self.state_version = rec.state_version;
        // `crashed` (CONN_CRASHED) says the keeper found that the dead
        // worker, which crashed by itself, was running the request: it had
        // read input past the commit (the socket's peek offset, or the
        // spool's read mark). Input that merely arrived does not count, nor
        // a worker that never took the connection up. That counts against
        // the request; the count is stored before the request runs again,
        // so a crash during the replay counts too.
        let mut rec = rec;
        let count = crashed;
        if count {
            rec.deaths = rec.deaths.saturating_add(1);
        }
        let after = self.link.poison_after;
        if after > 0 && rec.deaths > after {
            // Flagged as poison, and it crashed the worker all the same
            // (the service fails before it looks at the flag): running it
            // again can only crash the next one.
            tracing::warn!(
                conn = conn_id,
                input_offset = rec.in_commit,
                crashes = rec.deaths,
                "request ran during more consecutive crashes than --poison-after allows: closing the connection"
            );
            fin(fd);
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "poison request; connection closed",
            ));
        }
        self.poisoned = after > 0 && rec.deaths >= after;
        if self.poisoned && !no_replay && pos.written > rec.out_commit {
            // Part of its answer is out, so an error cannot follow it. It
            // may also be a bystander that a fresh request's crashes caught
            // twice while it ran: it runs once more, alone (a suspect); a
            // third crash with it running closes it (above).
            tracing::info!(
                conn = conn_id,
                input_offset = rec.in_commit,
                crashes = rec.deaths,
                "request whose answer had begun ran during consecutive crashes: running it once more, alone"
            );
            self.poisoned = false;
        }
        // Still a suspect of an earlier crash: it runs alone.
        self.suspect = rec.deaths > 0 && !self.poisoned;
        if no_replay {
            tracing::warn!(
                conn = conn_id,
                input_offset = rec.in_commit,
                "request in flight may not run again: the service answers it with an error"
            );
            self.poisoned = true;
        } else if self.poisoned {
            tracing::warn!(
                conn = conn_id,
                input_offset = rec.in_commit,
                crashes = rec.deaths,
                "poison request: in flight during consecutive worker crashes; it will be refused"
            );
            let _ = self.link.send(&hf_journal::wire::Msg::Poisoned {
                conn_id,
                slot: self.slot,
            });
        }
        tracing::debug!(
            conn = conn_id,
            in_commit = rec.in_commit,
            out_commit = rec.out_commit,
            written = pos.written,
            out_rec = rec.out_rec,
            "recovered connection"
        );
        self.rec = rec;
        if count {
            self.store()?;
        }
        Ok(())
    }

    /// Takes regenerated output while a replay is under way.
    fn regenerate(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(r) = &mut self.replay else {
            return Ok(0);
        };
        let room = r.verify_at - self.out_pos;
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let chunk = &buf[..take];
        if r.crc.is_some() {
            self.crc_run = crc32c::crc32c_append(self.crc_run, chunk);
        }
        let already_sent = r.skip_to.saturating_sub(self.out_pos).min(take as u64) as usize;
        r.held.extend_from_slice(&chunk[already_sent..]);
        self.out_pos += take as u64;
        if self.out_pos == r.verify_at {
            if r.crc.is_some_and(|crc| crc != self.crc_run) {
                return Err(divergence());
            }
            self.pending = std::mem::take(&mut r.held);
            self.replay = None;
        }
        Ok(take)
    }
}
