//! The worker's link to its keeper: the control socket and the journal.

// Parts used only by the tokio flavour.
#![cfg_attr(not(feature = "tokio"), allow(dead_code))]

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;

use hf_journal::wire::{ConnEntry, Msg, MAX_CHANNELS, MAX_MSG, PROTO_VERSION};
use hf_sys::shm::SharedMem;

use crate::Error;

pub use hf_journal::{ENV_CONTROL_FD, ENV_JOURNAL_FD};

/// What the keeper told this worker in its `Welcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub worker_id: u32,
    pub generation: u32,
    pub slots: u32,
}

/// Shared by the listener and every connection of a worker run by a keeper.
pub(crate) struct Link {
    control: OwnedFd,
    pub(crate) journal: SharedMem,
    pub(crate) id: Identity,
    /// Crashes in a row after which a request in flight is poison (0: never).
    pub(crate) poison_after: u16,
    /// Longest a request may run, from its first byte to its commit.
    pub(crate) deadline: Option<std::time::Duration>,
    /// The keeper watches heartbeats (`--hang-timeout`).
    pub(crate) heartbeat: bool,
    /// When each connection's request in flight started (nanoseconds since
    /// `epoch`, 0 = none); read by the heartbeat to enforce `deadline`.
    busy: std::sync::Mutex<Vec<std::sync::Weak<std::sync::atomic::AtomicU64>>>,
    epoch: std::time::Instant,
    /// The state blob schema version `commit` writes.
    pub(crate) state_version: u16,
    /// Requests committed by this worker.
    requests: std::sync::atomic::AtomicU64,
    /// A new version is taking over: connections let go at commit points.
    draining: AtomicBool,
    /// The keeper stops (set before `draining`): connections let go only
    /// once idle, so every request in flight is answered first.
    stopping: AtomicBool,
    /// Readable once draining starts (an eventfd): the blocking flavour's
    /// reads that found their connection idle wait on it with the socket,
    /// instead of waking on a timer.
    drain_fd: OwnedFd,
    /// Tasks of the tokio flavour waiting on a connection, woken when
    /// draining starts.
    wakers: Mutex<Vec<Weak<WakeCell>>>,
    /// Held channels the keeper sent ahead of their connections (or
    /// accepted for them), by connection id, until taken.
    channels: Mutex<Stash>,
    /// Signalled when a channel or a refused accept arrives.
    arrived: std::sync::Condvar,
    /// Connections this worker may hold at once, from its open-files limit
    /// ([`hf_journal::wire::conn_budget`]): one more would leave the service
    /// without a descriptor to serve it with.
    budget: usize,
    /// Connections it holds now (taken from a `Conns` batch, not dropped).
    held: Arc<AtomicUsize>,
    /// Suspects run one at a time (see [`SuspectGate`]).
    pub(crate) suspects: SuspectGate,
    /// Which build of the service this is (see [`build_identity`]).
    pub(crate) build: u32,
}

/// A digest of what decides the bytes a service writes: its executable
/// (device, inode, size, modification time: a rebuilt binary is another
/// file) and its arguments. Two workers with the same identity regenerate
/// output the service declared unchecked byte for byte; workers of
/// another version (another binary or other arguments) may not.
fn build_identity() -> u32 {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut h = 0u32;
    if let Ok(m) = std::fs::metadata("/proc/self/exe") {
        for v in [
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime() as u64,
            m.mtime_nsec() as u64,
        ] {
            h = crc32c::crc32c_append(h, &v.to_le_bytes());
        }
    }
    for a in std::env::args_os() {
        h = crc32c::crc32c_append(h, a.as_bytes());
        h = crc32c::crc32c_append(h, &[0]);
    }
    h
}

/// Requests that were running when a worker crashed by itself are
/// *suspects*: one of them may be what crashed it. Replayed all at once, a
/// real poison request crashes the next worker while the innocent ones are
/// running beside it, and they are all blamed again. So suspects run one at
/// a time: a suspect reads its input only while it holds this gate, and
/// lets go at its commit, its close, or when it waits for the client. A
/// suspect waiting here has not read its request, so a crash meanwhile is
/// not counted against it.
#[derive(Default)]
pub(crate) struct SuspectGate {
    /// The connection holding the gate.
    holder: Mutex<Option<u64>>,
    /// Blocking-flavour waiters.
    freed: std::sync::Condvar,
    /// Tokio-flavour waiters, woken when the gate frees.
    wakers: Mutex<Vec<std::task::Waker>>,
}

impl SuspectGate {
    /// Takes the gate for `conn`, or says it is held by another.
    pub(crate) fn try_take(&self, conn: u64) -> bool {
        let Ok(mut h) = self.holder.lock() else {
            return true;
        };
        match *h {
            Some(c) if c != conn => false,
            _ => {
                *h = Some(conn);
                true
            }
        }
    }

    /// Waits up to `max` for the gate (blocking flavour); true if taken.
    pub(crate) fn take_within(&self, conn: u64, max: std::time::Duration) -> bool {
        let Ok(mut h) = self.holder.lock() else {
            return true;
        };
        if h.is_some_and(|c| c != conn) {
            h = match self.freed.wait_timeout(h, max) {
                Ok((h, _)) => h,
                Err(_) => return true,
            };
        }
        match *h {
            Some(c) if c != conn => false,
            _ => {
                *h = Some(conn);
                true
            }
        }
    }

    /// Takes the gate for `conn`, or registers `waker` to be woken when it frees.
    pub(crate) fn poll_take(&self, conn: u64, waker: &std::task::Waker) -> bool {
        if self.try_take(conn) {
            return true;
        }
        if let Ok(mut w) = self.wakers.lock() {
            if !w.iter().any(|x| x.will_wake(waker)) {
                w.push(waker.clone());
            }
        }
        // Freed between the first look and the registration?
        self.try_take(conn)
    }

    /// Lets go of the gate if `conn` holds it.
    pub(crate) fn release(&self, conn: u64) {
        let Ok(mut h) = self.holder.lock() else {
            return;
        };
        if *h != Some(conn) {
            return;
        }
        *h = None;
        drop(h);
        self.freed.notify_all();
        let wakers = self.wakers.lock().map(|mut w| std::mem::take(&mut *w));
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }
}

/// A connection's place in its worker's budget: taken when the connection
/// arrives, given back when its last part (the `Core`) is dropped.
pub(crate) struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection the keeper handed over, with its input spool if it has
/// one.
pub(crate) struct Handed {
    pub(crate) entry: ConnEntry,
    pub(crate) fd: OwnedFd,
    pub(crate) spool: Option<OwnedFd>,
    pub(crate) place: Place,
}

#[derive(Default)]
struct Stash {
    channels: HashMap<u64, Vec<(u32, OwnedFd)>>,
    /// `AcceptOn` requests the keeper could not serve: (connection, tag).
    refused: Vec<(u64, u32)>,
    /// Connections whose held channel the kernel dropped on its way here
    /// (no room for the fd): they are refused when they arrive, so that a
    /// worker with room gets them with all their channels.
    lost: std::collections::HashSet<u64>,
}

/// Where tokio tasks waiting on one connection leave their wakers (one
/// for reading, one for writing: two tasks may share a connection).
#[derive(Default)]
pub(crate) struct WakeCell([Mutex<Option<Waker>>; 2]);

impl WakeCell {
    pub(crate) fn register(&self, reading: bool, w: &Waker) {
        if let Ok(mut slot) = self.0[usize::from(reading)].lock() {
            match &*slot {
                Some(old) if old.will_wake(w) => {}
                _ => *slot = Some(w.clone()),
            }
        }
    }

    fn wake(&self) {
        for slot in &self.0 {
            let w = slot.lock().ok().and_then(|mut s| s.take());
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

/// A message from the keeper, with the fds that came with it.
pub(crate) enum Incoming {
    /// Connections this worker took (the others went back to the keeper).
    Conns(Vec<Handed>),
    Activate,
    Shutdown,
    /// Let go of every connection at its next commit point.
    Drain,
    /// Let go of every connection once it is idle.
    Stop,
}

fn env_fd(name: &str) -> Result<Option<RawFd>, Error> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(_) => Err(Error::Environment(format!("{name} is not valid UTF-8"))),
        Ok(v) => v
            .parse::<RawFd>()
            .ok()
            .filter(|fd| *fd > 2)
            .map(Some)
            .ok_or_else(|| {
                Error::Environment(format!("{name}={v} is not a file descriptor number"))
            }),
    }
}

fn take_inherited(fd: RawFd, what: &str) -> Result<OwnedFd, Error> {
    hf_sys::inherited::take(fd).map_err(|e| Error::Environment(format!("{what} fd {fd}: {e}")))
}

fn msg_fds(entries: &[ConnEntry]) -> usize {
    entries.len() + entries.iter().filter(|e| e.spooled()).count()
}

impl Link {
    /// Connects to the keeper named by the environment, or `None` when the
    /// process was not started by a keeper (pass-through mode).
    pub(crate) fn from_env(opts: &crate::Options) -> Result<Option<Arc<Link>>, Error> {
        opts.check()?;
        let (Some(cfd), Some(jfd)) = (env_fd(ENV_CONTROL_FD)?, env_fd(ENV_JOURNAL_FD)?) else {
            return Ok(None);
        };
        let control = take_inherited(cfd, "control socket")?;
        let journal_fd = take_inherited(jfd, "journal")?;
        let journal =
            SharedMem::map(&journal_fd).map_err(|e| Error::Environment(format!("journal: {e}")))?;
        drop(journal_fd);

        let mut out = Vec::new();
        Msg::Hello {
            pid: std::process::id(),
            proto: PROTO_VERSION,
            state_writes: opts.state_version,
            state_reads: opts.reads_state,
        }
        .encode(&mut out);
        hf_sys::fdpass::send(&control, &out, &[], false)?;
        let mut buf = vec![0u8; MAX_MSG];
        let mut fds = Vec::new();
        let n = hf_sys::fdpass::recv(&control, &mut buf, &mut fds, false)?;
        if n == 0 {
            return Err(Error::KeeperGone);
        }
        let id = match Msg::decode(&buf[..n]) {
            Ok(Msg::Welcome {
                worker_id,
                generation,
                slots,
            }) => Identity {
                worker_id,
                generation,
                slots,
            },
            Ok(other) => return Err(Error::Protocol(format!("expected Welcome, got {other:?}"))),
            Err(e) => return Err(Error::Protocol(e.to_string())),
        };
        let need = hf_journal::record_offset(id.slots);
        if journal.len() < need {
            return Err(Error::Protocol(format!(
                "journal of {} bytes cannot hold {} records",
                journal.len(),
                id.slots
            )));
        }
        tracing::debug!(
            worker = id.worker_id,
            generation = id.generation,
            "connected to keeper"
        );
        let poison_after = match std::env::var(hf_journal::ENV_POISON_AFTER) {
            Ok(v) => v.parse().map_err(|_| {
                Error::Environment(format!("{} = {v:?}", hf_journal::ENV_POISON_AFTER))
            })?,
            Err(_) => crate::core::POISON_AFTER,
        };
        let deadline = match std::env::var(hf_journal::ENV_REQUEST_DEADLINE_MS) {
            Ok(v) => Some(std::time::Duration::from_millis(v.parse().map_err(
                |_| Error::Environment(format!("{} = {v:?}", hf_journal::ENV_REQUEST_DEADLINE_MS)),
            )?)),
            Err(_) => None,
        };
        let open_files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let budget =
            usize::try_from(hf_journal::wire::conn_budget(open_files)).unwrap_or(usize::MAX);
        tracing::debug!(open_files, budget, "connections this worker may hold");
        Ok(Some(Arc::new(Link {
            control,
            journal,
            id,
            poison_after,
            deadline,
            heartbeat: std::env::var_os(hf_journal::ENV_HEARTBEAT).is_some_and(|v| v == "1"),
            busy: std::sync::Mutex::new(Vec::new()),
            epoch: std::time::Instant::now(),
            state_version: opts.state_version,
            requests: std::sync::atomic::AtomicU64::new(0),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            drain_fd: rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )?,
            wakers: Mutex::new(Vec::new()),
            channels: Mutex::new(Stash::default()),
            arrived: std::sync::Condvar::new(),
            suspects: SuspectGate::default(),
            build: build_identity(),
            budget,
            held: Arc::new(AtomicUsize::new(0)),
        })))
    }

    pub(crate) fn control(&self) -> BorrowedFd<'_> {
        self.control.as_fd()
    }

    pub(crate) fn send(&self, msg: &Msg) -> io::Result<()> {
        let mut out = Vec::with_capacity(64);
        msg.encode(&mut out);
        hf_sys::fdpass::send(&self.control, &out, &[], false)
    }

    /// Decodes one message received from the keeper. Anything malformed is
    /// a protocol error: the keeper is trusted less than nothing by nobody,
    /// but a garbled control stream means this worker cannot go on safely.
    ///
    /// `fds_dropped`: the kernel delivered only the first of the message's
    /// fds (this process hit its open-files limit). The connections that
    /// did not arrive whole are handed back to the keeper (`Refused`), as
    /// are those beyond this worker's budget: the keeper still holds them
    /// and hands them out again when there is room, so none is lost.
    pub(crate) fn decode(
        &self,
        buf: &[u8],
        fds: Vec<OwnedFd>,
        fds_dropped: bool,
    ) -> Result<Option<Incoming>, Error> {
        if buf.is_empty() {
            return Err(Error::KeeperGone);
        }
        let msg = Msg::decode(buf).map_err(|e| Error::Protocol(e.to_string()))?;
        match msg {
            Msg::Conns(entries) => {
                let want = msg_fds(&entries);
                if fds.len() > want || (fds.len() < want && !fds_dropped) {
                    return Err(Error::Protocol(format!(
                        "{} conns with {} fds",
                        entries.len(),
                        fds.len()
                    )));
                }
                if let Some(e) = entries.iter().find(|e| e.slot >= self.id.slots) {
                    return Err(Error::Protocol(format!("slot {} out of range", e.slot)));
                }
                let mut fds = fds.into_iter();
                let mut out = Vec::with_capacity(entries.len());
                let mut refused = Vec::new();
                for entry in entries {
                    let fd = fds.next();
                    let spool = if entry.spooled() { fds.next() } else { None };
                    let lost = self.lost_channel(entry.conn_id);
                    let whole = entry.spooled() == spool.is_some() && !lost;
                    match (fd, whole.then(|| self.take_place()).flatten()) {
                        (Some(fd), Some(place)) => out.push(Handed {
                            entry,
                            fd,
                            spool,
                            place,
                        }),
                        // Its fds (if any came) are closed here, untouched:
                        // the keeper's copy is the connection.
                        _ => refused.push(entry),
                    }
                }
                if !refused.is_empty() {
                    tracing::info!(
                        refused = refused.len(),
                        taken = out.len(),
                        budget = self.budget,
                        fds_dropped,
                        "no room for more connections (open-files limit): handing them back to the keeper"
                    );
                }
                for e in refused {
                    // Its channels come again with it when it is handed out again.
                    drop(self.take_channels(e.conn_id));
                    self.send(&Msg::Refused {
                        conn_id: e.conn_id,
                        slot: e.slot,
                    })?;
                }
                Ok(Some(Incoming::Conns(out)))
            }
            Msg::Activate => Ok(Some(Incoming::Activate)),
            Msg::Shutdown => Ok(Some(Incoming::Shutdown)),
            Msg::Drain => Ok(Some(Incoming::Drain)),
            Msg::Stop => Ok(Some(Incoming::Stop)),
            Msg::Channel { conn_id, tag } => {
                let Some(fd) = fds.into_iter().next() else {
                    if !fds_dropped {
                        return Err(Error::Protocol("channel without its fd".into()));
                    }
                    tracing::info!(
                        conn = conn_id,
                        tag,
                        "a held channel did not fit (open-files limit); its connection goes back to the keeper"
                    );
                    if let Ok(mut stash) = self.channels.lock() {
                        stash.lost.insert(conn_id);
                    }
                    return Ok(None);
                };
                if let Ok(mut stash) = self.channels.lock() {
                    let v = stash.channels.entry(conn_id).or_default();
                    v.retain(|(t, _)| *t != tag);
                    if v.len() < MAX_CHANNELS {
                        v.push((tag, fd));
                    }
                }
                self.arrived.notify_all();
                Ok(None)
            }
            Msg::AcceptFailed { conn_id, tag } => {
                if let Ok(mut stash) = self.channels.lock() {
                    stash.refused.push((conn_id, tag));
                }
                self.arrived.notify_all();
                Ok(None)
            }
            other => {
                tracing::warn!(?other, "unexpected message from keeper, ignored");
                Ok(None)
            }
        }
    }

    /// A place in this worker's budget for one more connection, if it has
    /// room.
    fn take_place(&self) -> Option<Place> {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.budget).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(self.held.clone()))
    }

    /// True (once) if a held channel of `conn_id` was lost on its way here.
    fn lost_channel(&self, conn_id: u64) -> bool {
        self.channels
            .lock()
            .is_ok_and(|mut stash| stash.lost.remove(&conn_id))
    }

    /// Hands a connection's input spool to the keeper.
    pub(crate) fn send_spool(
        &self,
        conn_id: u64,
        slot: u32,
        spool: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let mut out = Vec::with_capacity(64);
        Msg::Spool { conn_id, slot }.encode(&mut out);
        hf_sys::fdpass::send(&self.control, &out, &[spool], false)
    }

    /// Tells the keeper this worker's event loop is alive: bumps its
    /// heartbeat counter in the journal header.
    /// A per-connection "request in flight since" cell, watched by the
    /// heartbeat; `None` when no deadline is configured.
    /// The held channels that came ahead of connection `conn_id`.
    pub(crate) fn take_channels(&self, conn_id: u64) -> Vec<(u32, OwnedFd)> {
        self.channels
            .lock()
            .ok()
            .and_then(|mut stash| stash.channels.remove(&conn_id))
            .unwrap_or_default()
    }

    /// Asks the keeper to accept on held listener `listener` and hold the
    /// new connection under `tag`, and waits for it: `WouldBlock` when there
    /// was nothing to accept, `TimedOut` without an answer. The thread that
    /// reads the control socket (the listener's `accept`) must be running.
    pub(crate) fn accept_on(
        &self,
        conn_id: u64,
        slot: u32,
        listener: u32,
        tag: u32,
        timeout: std::time::Duration,
    ) -> io::Result<OwnedFd> {
        fn poisoned<T>(_: T) -> io::Error {
            io::Error::other("channel stash lock poisoned")
        }
        {
            // A stale answer for the same tag must not be taken for this one.
            let mut stash = self.channels.lock().map_err(poisoned)?;
            stash.refused.retain(|r| *r != (conn_id, tag));
            if let Some(v) = stash.channels.get_mut(&conn_id) {
                v.retain(|(t, _)| *t != tag);
            }
        }
        let mut out = Vec::with_capacity(64);
        Msg::AcceptOn {
            conn_id,
            slot,
            listener,
            tag,
        }
        .encode(&mut out);
        hf_sys::fdpass::send(&self.control, &out, &[], false)?;
        let deadline = std::time::Instant::now() + timeout;
        let mut stash = self.channels.lock().map_err(poisoned)?;
        loop {
            if let Some(i) = stash.refused.iter().position(|r| *r == (conn_id, tag)) {
                stash.refused.swap_remove(i);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if let Some(v) = stash.channels.get_mut(&conn_id) {
                if let Some(i) = v.iter().position(|(t, _)| *t == tag) {
                    let (_, fd) = v.swap_remove(i);
                    if v.is_empty() {
                        stash.channels.remove(&conn_id);
                    }
                    return Ok(fd);
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the keeper did not answer an accept",
                ));
            }
            stash = self.arrived.wait_timeout(stash, left).map_err(poisoned)?.0;
        }
    }

    pub(crate) fn hold(
        &self,
        conn_id: u64,
        slot: u32,
        tag: u32,
        fd: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let mut out = Vec::with_capacity(64);
        Msg::Hold { conn_id, slot, tag }.encode(&mut out);
        hf_sys::fdpass::send(&self.control, &out, &[fd], false)
    }

    pub(crate) fn busy_cell(&self) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        self.deadline?;
        let cell = Arc::new(std::sync::atomic::AtomicU64::new(0));
        if let Ok(mut v) = self.busy.lock() {
            v.retain(|w| w.strong_count() > 0);
            v.push(Arc::downgrade(&cell));
        }
        Some(cell)
    }

    /// Now, as stored in a busy cell (never 0).
    pub(crate) fn busy_now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    /// How long the oldest request in flight has run, if one is.
    pub(crate) fn oldest_request(&self) -> Option<std::time::Duration> {
        let now = self.busy_now();
        let v = self.busy.lock().ok()?;
        v.iter()
            .filter_map(|w| w.upgrade())
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|&t| t != 0)
            .min()
            .map(|t| std::time::Duration::from_nanos(now.saturating_sub(t)))
    }

    /// Counts one committed request in the journal header, where the
    /// keeper's `--max-requests` reads it.
    pub(crate) fn count_request(&self) {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self
            .journal
            .store_u64(hf_journal::requests_offset(self.id.worker_id), n);
    }

    pub(crate) fn beat(&self, n: u64) {
        let _ = self
            .journal
            .store_u64(hf_journal::heartbeat_offset(self.id.worker_id), n);
    }

    pub(crate) fn ready(&self) -> io::Result<()> {
        self.send(&Msg::Ready)
    }

    /// True once the keeper asked this worker to let its connections go.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// True once the keeper stops: connections are let go only when idle
    /// (see [`Link::start_stop`]).
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The keeper stops: every request in flight runs to its answer, and
    /// each connection is handed back once idle — at a commit point with no
    /// input waiting — for the keeper to close with a FIN.
    pub(crate) fn start_stop(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!("the keeper stops: handing connections back once idle");
        self.start_drain();
    }

    /// Starts letting connections go: every connection waiting to read or
    /// write is woken to find it out.
    pub(crate) fn start_drain(&self) {
        if self.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self.stopping() {
            tracing::info!(
                "a new version takes over: handing connections back at their commit points"
            );
        }
        // Blocking reads waiting with the eventfd wake now and for good.
        let _ = rustix::io::write(&self.drain_fd, &1u64.to_ne_bytes());
        let cells: Vec<Arc<WakeCell>> = match self.wakers.lock() {
            Ok(v) => v.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => Vec::new(),
        };
        for c in cells {
            c.wake();
        }
    }

    /// Blocking flavour: waits until `fd` has input (or an error, or the
    /// peer's close) or this worker drains. No timeout: an idle connection
    /// costs no wake-ups.
    pub(crate) fn wait_input_or_drain(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [
            PollFd::new(&fd, PollFlags::IN),
            PollFd::new(&self.drain_fd, PollFlags::IN),
        ];
        loop {
            match poll(&mut fds, None) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A cell for one connection's waiting task, woken by [`Link::start_drain`].
    pub(crate) fn wake_cell(&self) -> Arc<WakeCell> {
        let cell = Arc::new(WakeCell::default());
        if let Ok(mut v) = self.wakers.lock() {
            if v.len() >= 64 && v.len().is_power_of_two() {
                v.retain(|w| w.strong_count() > 0);
            }
            v.push(Arc::downgrade(&cell));
        }
        cell
    }
}
