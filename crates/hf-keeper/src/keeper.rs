//! The keeper's event loop. One thread; every source (listeners, worker
//! control sockets, pidfds, the status socket, signals) is a small task that
//! turns readiness into an [`Event`]; all state lives in [`Keeper`] and is
//! changed only by [`Keeper::handle`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hf_journal::record::{slot_of, Record, RECORD_SIZE, SLOT_SIZE};
use hf_journal::wire::{
    ConnEntry, Msg, CONN_CRASHED, CONN_MOVED, CONN_RECOVERED, CONN_SPOOL, MAX_CHANNELS,
    MAX_FDS_PER_MSG, MAX_MSG, PROTO_VERSION,
};
use hf_sys::fdpass;
use hf_sys::shm::SharedMem;
use rustix::io::Errno;
use rustix::net::SocketFlags;
use rustix::process::{Pid, Signal};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::proto::{ErrorCode, ErrorReply, ProtoError, Request, MAX_REQUEST};
use crate::status::{Phase, Progress, Role, Snapshot, UpgradeRequest, WorkerInfo};
use crate::{listen, Config, KeeperError};

mod reexec;
mod stop;
mod upgrade;
pub use reexec::StateError;
pub(crate) use reexec::{check as check_saved_state, MAX_STATE};
use stop::Stopping;
use upgrade::Upgrade;

/// Longest pause between attempts to start a worker that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// After a hand-over, the replacement standby is started this much later,
/// so that its fork and exec do not compete for the CPU with the worker
/// that is taking the connections over.
const RESPAWN_DELAY: Duration = Duration::from_millis(5);
/// How often the keeper looks at heartbeats and waiting connections.
const TICK: Duration = Duration::from_millis(100);
/// Exits remembered for `holdfast status`.
const EXITS_KEPT: usize = 8;

enum Event {
    Accepted(Vec<OwnedFd>),
    FromWorker(u32, Result<Msg, String>, Vec<OwnedFd>),
    ControlClosed(u32),
    Died(u32),
    Status(oneshot::Sender<Snapshot>),
    /// A scrape of `--metrics`: the text goes back on the channel.
    Metrics(oneshot::Sender<String>),
    /// `holdfast upgrade --keeper`: re-execute the keeper; the outcome goes
    /// to this stream.
    Reexec(OwnedFd),
    /// `holdfast upgrade` (progress goes back on the channel) or SIGHUP.
    Upgrade(UpgradeRequest, Option<mpsc::UnboundedSender<Progress>>),
    Signal(&'static str),
    /// Time to look at heartbeats and at connections waiting for a worker.
    Tick,
    /// Try again what could not be done at once (handing out to a full
    /// control socket, starting a worker after a back-off).
    Retry,
}

struct Held {
    fd: OwnedFd,
    slot: u32,
    owner: Option<u32>,
    /// Some worker had it before: the next one must resume, not start fresh.
    handed: bool,
    /// Since when it waits for a worker (`None` while a worker has it).
    since: Option<Instant>,
    /// The input spool of a request larger than the socket buffer.
    spool: Option<OwnedFd>,
    /// Held channels (fds the service opened for this connection), by tag.
    channels: Vec<(u32, OwnedFd)>,
    /// Its last worker crashed by itself (see `CONN_CRASHED`).
    crashed: bool,
    /// Handed back by a draining worker: its next hand-out is a move to a
    /// new version, not a recovery.
    moved: bool,
    /// Since when it has been waiting for a worker that makes progress: a
    /// crash loop hands it from one dying worker to the next, and the hold
    /// timeout counts from the first of them, not from each.
    lost_since: Option<Instant>,
    /// The flags of its last hand-out, restored if the worker refuses it.
    sent_flags: u8,
}

impl Held {
    /// Holds `fd` as channel `tag` (replacing one with that tag), within
    /// [`MAX_CHANNELS`]; returns whether it did.
    fn hold(&mut self, worker: u32, conn_id: u64, tag: u32, fd: OwnedFd) -> bool {
        self.channels.retain(|(t, _)| *t != tag);
        if self.channels.len() >= MAX_CHANNELS {
            tracing::warn!(
                worker,
                conn = conn_id,
                tag,
                max = MAX_CHANNELS,
                "too many held channels for one connection; refused"
            );
            return false;
        }
        tracing::debug!(worker, conn = conn_id, tag, "channel held");
        self.channels.push((tag, fd));
        true
    }
}

struct Worker {
    pid: u32,
    generation: u32,
    role: Role,
    control: Arc<OwnedFd>,
    /// `None` for workers inherited across a re-exec of the keeper (still
    /// its children, reaped by pid).
    child: Option<Child>,
    greeted: bool,
    started: Instant,
    /// Last heartbeat value seen, and when it last changed.
    beat: u64,
    beat_changed: Instant,
    /// Killed for not beating: why, for its exit line.
    hung: Option<Duration>,
    /// Connections it holds.
    owned: usize,
    /// State blob versions it writes and reads (from its Hello).
    state_writes: u16,
    state_reads: (u16, u16),
    /// Draining: when the connections it still holds are taken from it.
    drain_deadline: Option<Instant>,
    /// Draining: the Drain message reached its control socket.
    drain_sent: bool,
    /// A standby of an older version that took over the connections another
    /// worker of its version still held at the drain timeout.
    catcher: bool,
    /// Told to exit (it holds nothing); killed if still there by then.
    exit_by: Option<Instant>,
    /// The most connections it can hold, learnt when it refused some for
    /// lack of descriptors (`None`: it never did).
    room: Option<usize>,
    /// Warned that it has not said hello (see [`HELLO_WARN`]).
    hello_warned: bool,
}

/// The keeper's counters: what `holdfast status` and `--metrics` report,
/// saved as they are when the keeper re-executes itself.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Counters {
    accepted: u64,
    /// Active workers that died and were replaced.
    restarts: u64,
    /// Connections handed to a new worker after a crash, in all.
    recovered_total: u64,
    last_recovery_us: Option<u64>,
    /// How the last workers ended (newest last, at most [`EXITS_KEPT`]).
    last_exits: VecDeque<String>,
    turned_away: u64,
    poisoned: u64,
    /// Workers in a row that died before becoming ready.
    start_failures: u32,
    upgrades: u64,
    failed_upgrades: u64,
    /// Times this keeper process re-executed itself.
    keeper_execs: u64,
    /// Workers replaced for their memory or age.
    rejuvenations: u64,
}

struct Keeper {
    /// The tick is wanted (see `needs_tick`), and what wakes its task.
    tick_need: Arc<AtomicBool>,
    tick_wake: Arc<tokio::sync::Notify>,
    cfg: Config,
    tx: mpsc::UnboundedSender<Event>,
    journal_fd: OwnedFd,
    journal: SharedMem,
    listeners: Vec<String>,
    /// Dups of the listening sockets and the status socket, passed on when
    /// the keeper re-executes itself.
    listener_fds: Vec<(OwnedFd, String)>,
    status_fd: OwnedFd,
    /// The keeper's own binary, as resolved at start (a rebuilt binary at
    /// the same path is what `holdfast upgrade --keeper` runs).
    exe: std::path::PathBuf,
    /// `holdfast upgrade --keeper` asked for a re-exec; the client waits on
    /// this stream for the outcome.
    reexec_to: Option<OwnedFd>,
    /// Control-socket conversations in progress, held back for a re-exec.
    control_gate: Arc<reexec::ControlGate>,
    conns: HashMap<u64, Held>,
    free_slots: Vec<u32>,
    next_slot: u32,
    next_conn: u64,
    workers: BTreeMap<u32, Worker>,
    next_worker: u32,
    generation: u32,
    active: Option<u32>,
    waiting: VecDeque<u64>,
    phase: Phase,
    /// What `holdfast status` counts, carried across a re-exec as it is.
    count: Counters,
    recovery_started: Option<Instant>,
    live: Arc<AtomicUsize>,
    room: Arc<Notify>,
    spawn_after: Option<Instant>,
    /// Active workers in a row that crashed by themselves before they
    /// committed a single request: a version that fails on every request
    /// after it reported ready. From the second, promotions back off.
    crash_streak: u32,
    /// No standby is promoted before then (a crash loop's back-off).
    promote_after: Option<Instant>,
    retry_armed: bool,
    upgrade: Option<Upgrade>,
    next_generation: u32,
    /// Connections were queued by an event that does not hand them out
    /// itself: hand them out once the events at hand are handled.
    dirty: bool,
    /// Why the keeper gave up (no worker ever became ready): `run` returns
    /// it as an error after the shutdown.
    fatal: Option<String>,
    /// What `--metrics` serves.
    metrics: crate::metrics::Metrics,
    /// When this keeper process started serving (a re-executed one: when
    /// its image took over).
    born: Instant,
    /// The accept loops, stopped when the keeper stops.
    accepting: Vec<tokio::task::AbortHandle>,
    /// A stop under way (`SIGTERM`): requests in flight finish.
    stop: Option<Stopping>,
    /// Connections closed with a FIN, kept until their clients close too.
    closing: tokio::task::JoinSet<()>,
}

/// Runs the keeper until it is stopped: SIGTERM lets requests in flight
/// finish (see [`stop`]), SIGINT closes every connection at once; either
/// way no connection is reset.
pub fn run(cfg: Config) -> Result<(), KeeperError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (mut keeper, mut rx) = Keeper::start(cfg)?;
        'outer: while let Some(ev) = rx.recv().await {
            if keeper.handle(ev) {
                break;
            }
            // Events already queued (a burst of connections handed back by
            // a draining worker) are handled before handing out, so they
            // travel in full batches.
            for _ in 0..4096 {
                match rx.try_recv() {
                    Ok(ev) => {
                        if keeper.handle(ev) {
                            break 'outer;
                        }
                    }
                    Err(_) => break,
                }
            }
            keeper.flush();
            keeper.arm_tick();
            if keeper.reexec_to.is_some() {
                // Control-socket clients get their answers first, then
                // everything queued is handled (no accepted connection may
                // be left in the channel), then the whole state goes to a
                // new image of the keeper.
                if keeper.quiesce_control(&mut rx).await {
                    break 'outer;
                }
                while let Ok(ev) = rx.try_recv() {
                    if keeper.handle(ev) {
                        break 'outer;
                    }
                }
                keeper.flush();
                keeper.reexec();
                keeper.reopen_control();
            }
        }
        // Connections accepted in the instant before the listeners closed,
        // whose events came after the stop ended: closed cleanly with the rest.
        keeper.active = None;
        while let Ok(ev) = rx.try_recv() {
            if let Event::Accepted(fds) = ev {
                keeper.accepted(fds);
            }
        }
        keeper.shutdown().await;
        match keeper.fatal.take() {
            Some(why) => Err(KeeperError::NeverReady(why)),
            None => Ok(()),
        }
    })
}

/// A worker that has not said hello after this long is probably not linked
/// with the holdfast library: worth a warning, once.
const HELLO_WARN: Duration = Duration::from_secs(5);

fn journal_offset(slot: u32) -> usize {
    hf_journal::record_offset(slot)
}

impl Keeper {
    fn start(mut cfg: Config) -> Result<(Keeper, mpsc::UnboundedReceiver<Event>), KeeperError> {
        // A request deadline is enforced through the heartbeat: it needs hang
        // detection.
        if cfg.request_deadline.is_some() && cfg.hang_timeout.is_none() {
            cfg.hang_timeout = Some(Duration::from_millis(500));
        }
        if cfg.command.is_empty() {
            return Err(KeeperError::NoCommand);
        }
        // Every held connection costs an fd here and, with one more for what
        // the service opens to serve it, in the worker (workers inherit the
        // limit): hold no more than fit, and let the rest wait in the listen
        // backlog.
        let limit = raise_fd_limit();
        if let Some(saved) = reexec::take_saved()? {
            return Keeper::resume(cfg, saved);
        }
        let fit = hf_journal::wire::conn_budget(limit);
        if cfg.max_conns > fit {
            if cfg.max_conns_explicit {
                tracing::warn!(
                    max_conns = cfg.max_conns,
                    open_files_limit = limit,
                    "lowering --max-conns to {fit} to fit the open-files limit"
                );
            } else {
                tracing::info!(
                    open_files_limit = limit,
                    "holding at most {fit} connections (what the open-files limit allows)"
                );
            }
            cfg.max_conns = fit;
        }
        let mut ls: Vec<(TcpListener, String)> = listen::inherited()?;
        for a in &cfg.listen {
            let l = listen::bind(*a)?;
            let name = l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| a.to_string());
            ls.push((l, name));
        }
        if ls.is_empty() {
            return Err(KeeperError::NoListeners);
        }
        let (journal_fd, journal) =
            SharedMem::create("holdfast-journal", hf_journal::record_offset(cfg.max_conns))?;
        for (_, name) in &ls {
            tracing::info!(listen = %name, "listening");
        }
        let ls = ls.into_iter().map(|(l, n)| (OwnedFd::from(l), n)).collect();
        let status = bind_status(&cfg.control)?;
        let (mut k, rx) = Keeper::assemble(cfg, ls, status, journal_fd, journal)?;
        // The first worker must at least start: a command that cannot be
        // exec'd is a configuration error, reported before we go on.
        if let Err(e) = k.spawn_worker(None, 1, Role::Starting) {
            let _ = std::fs::remove_file(&k.cfg.control);
            return Err(e);
        }
        k.ensure_workers();
        Ok((k, rx))
    }

    /// What a fresh keeper and a re-executed one share: the event sources
    /// (listeners, the status socket, signals, the tick) and an empty state.
    fn assemble(
        cfg: Config,
        listeners: Vec<(OwnedFd, String)>,
        status: std::os::unix::net::UnixListener,
        journal_fd: OwnedFd,
        journal: SharedMem,
    ) -> Result<(Keeper, mpsc::UnboundedReceiver<Event>), KeeperError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let live = Arc::new(AtomicUsize::new(0));
        let room = Arc::new(Notify::new());
        let names = listeners.iter().map(|(_, n)| n.clone()).collect();
        let mut kept = Vec::new();
        let mut accepting = Vec::new();
        for (l, name) in listeners {
            // Urgent data reaches services inline, as the byte it is in the
            // stream: accepted sockets inherit this from their listener,
            // whether it was bound here, inherited from systemd or from the
            // keeper this one replaced.
            hf_sys::tcp::set_urgent_inline(&l)?;
            kept.push((l.try_clone()?, name));
            let afd = hf_sys::reactor::register(l)?;
            let task = tokio::spawn(accept_loop(
                afd,
                tx.clone(),
                live.clone(),
                cfg.max_conns as usize,
                room.clone(),
            ));
            accepting.push(task.abort_handle());
        }
        let status_fd = OwnedFd::from(status.try_clone()?);
        let control_gate = Arc::new(reexec::ControlGate::default());
        serve_status(status, tx.clone(), control_gate.clone())?;
        if let Some(addr) = cfg.metrics {
            let l = TcpListener::bind(addr).map_err(|e| KeeperError::Bind(addr, e))?;
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            tracing::info!(addr = %l.local_addr()?, "metrics at /metrics");
            tokio::spawn(serve_metrics(l, tx.clone()));
        }
        for (sig, name) in [
            (tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
            (tokio::signal::unix::SignalKind::interrupt(), "SIGINT"),
            (tokio::signal::unix::SignalKind::hangup(), "SIGHUP"),
        ] {
            let mut s = tokio::signal::unix::signal(sig)?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if tx.send(Event::Signal(name)).is_err() {
                        return;
                    }
                }
            });
        }
        // Under systemd with WatchdogSec=, ping from this loop: a keeper that
        // stops running its loop stops pinging and gets restarted.
        if let Some(period) = sd_notify::watchdog_enabled() {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval((period / 2).max(Duration::from_millis(10)));
                loop {
                    tick.tick().await;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            });
        }
        // The tick runs only while something needs a clock (see
        // `needs_tick`): an idle keeper with default options sleeps.
        let tick_need = Arc::new(AtomicBool::new(true));
        let tick_wake = Arc::new(tokio::sync::Notify::new());
        {
            let period = cfg
                .hang_timeout
                .map_or(TICK, |t| (t / 4).min(TICK))
                .max(Duration::from_millis(10));
            let tx = tx.clone();
            let (need, wake) = (tick_need.clone(), tick_wake.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    if !need.load(Ordering::Acquire) {
                        // `notify_one` leaves a permit if it comes first.
                        wake.notified().await;
                        tick.reset();
                        continue;
                    }
                    tick.tick().await;
                    if tx.send(Event::Tick).is_err() {
                        return;
                    }
                }
            });
        }
        let k = Keeper {
            tick_need,
            tick_wake,
            cfg,
            tx,
            journal_fd,
            journal,
            listeners: names,
            listener_fds: kept,
            status_fd,
            exe: std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into()),
            conns: HashMap::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            next_conn: 1,
            workers: BTreeMap::new(),
            next_worker: 1,
            generation: 1,
            active: None,
            waiting: VecDeque::new(),
            phase: Phase::Starting,
            count: Counters::default(),
            recovery_started: None,
            live,
            room,
            spawn_after: None,
            crash_streak: 0,
            promote_after: None,
            retry_armed: false,
            upgrade: None,
            next_generation: 2,
            dirty: false,
            fatal: None,
            metrics: crate::metrics::Metrics::new(),
            born: Instant::now(),
            reexec_to: None,
            accepting,
            stop: None,
            closing: tokio::task::JoinSet::new(),
            control_gate,
        };
        Ok((k, rx))
    }

    /// Handles one event; returns true when the keeper should stop.
    fn handle(&mut self, ev: Event) -> bool {
        match ev {
            Event::Accepted(fds) => self.accepted(fds),
            Event::FromWorker(id, Ok(msg), fds) => self.on_message(id, msg, fds),
            Event::FromWorker(id, Err(e), _) => {
                tracing::warn!(worker = id, error = %e, "malformed control message, stopping that worker");
                self.kill(id);
            }
            Event::ControlClosed(id) => {
                // Its pidfd will report the death; make sure there is one
                // (a worker told to exit gets its grace period).
                if self.workers.get(&id).is_some_and(|w| w.exit_by.is_none()) {
                    self.kill(id);
                }
            }
            Event::Died(id) => self.died(id),
            Event::Status(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Event::Metrics(reply) => {
                let snap = self.snapshot();
                let _ = reply.send(self.metrics.render(&snap));
            }
            Event::Upgrade(req, progress) => self.start_upgrade(req, progress),
            Event::Reexec(client) => self.reexec_requested(client),
            Event::Signal("SIGHUP") => {
                tracing::info!("SIGHUP: upgrading to the same command (a rebuilt binary)");
                self.start_upgrade(UpgradeRequest::with_defaults(), None);
            }
            Event::Signal("SIGTERM") if self.stop.is_none() => self.begin_stop(),
            Event::Signal(name) => {
                tracing::info!(
                    signal = name,
                    connections = self.conns.len(),
                    "stopping now: closing every connection"
                );
                self.phase = Phase::ShuttingDown;
                return true;
            }
            Event::Tick => {
                if self.check_first_start() {
                    return true;
                }
                self.check_heartbeats();
                self.expire_held();
                self.check_draining();
                self.check_upgrade();
                if self.stop.is_some() {
                    if self.check_stop() {
                        self.phase = Phase::ShuttingDown;
                        return true;
                    }
                } else {
                    self.check_rejuvenation();
                }
            }
            Event::Retry => {
                self.retry_armed = false;
                self.promote_after_backoff();
                self.hand_out();
                self.ensure_workers();
            }
        }
        self.stopped()
    }

    /// Whether anything waits on the clock: a first start, timeouts of
    /// waiting connections, heartbeats, drains, an upgrade, a stop,
    /// rejuvenation. With none, the tick stops until the next event.
    fn needs_tick(&self) -> bool {
        let c = &self.cfg;
        self.phase != Phase::Serving
            || c.hang_timeout.is_some()
            || c.max_rss.is_some()
            || c.max_uptime.is_some()
            || c.max_requests.is_some()
            || !self.waiting.is_empty()
            || self.upgrade.is_some()
            || self.stop.is_some()
            || self.workers.values().any(|w| {
                !matches!(w.role, Role::Active | Role::Standby) || w.generation != self.generation
            })
    }

    fn arm_tick(&self) {
        let need = self.needs_tick();
        if self.tick_need.swap(need, Ordering::AcqRel) != need && need {
            self.tick_wake.notify_one();
        }
    }

    fn arm_retry(&mut self, after: Duration) {
        if self.retry_armed {
            return;
        }
        self.retry_armed = true;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Event::Retry);
        });
    }

    fn alloc_slot(&mut self) -> u32 {
        self.free_slots.pop().unwrap_or_else(|| {
            let s = self.next_slot;
            self.next_slot += 1;
            s
        })
    }

    fn accepted(&mut self, fds: Vec<OwnedFd>) {
        for fd in fds {
            let conn_id = self.next_conn;
            self.next_conn += 1;
            let slot = self.alloc_slot();
            // The record is valid before the fd leaves this process (seq 1 in
            // slot 1), so a worker's first torn write falls back to it.
            let off = journal_offset(slot);
            let mut rec = Record::new(conn_id);
            rec.seq = 1;
            let mut buf = [0u8; SLOT_SIZE];
            let n = rec.encode(&mut buf);
            let ok = self.journal.zero(off, RECORD_SIZE).is_ok()
                && self
                    .journal
                    .write(off + slot_of(1) * SLOT_SIZE, &buf[..n])
                    .is_ok();
            if !ok {
                tracing::error!(slot, "journal slot out of range; dropping connection");
                self.release_live(1);
                continue;
            }
            self.conns.insert(
                conn_id,
                Held {
                    fd,
                    slot,
                    owner: None,
                    handed: false,
                    since: Some(Instant::now()),
                    spool: None,
                    channels: Vec::new(),
                    crashed: false,
                    moved: false,
                    lost_since: None,
                    sent_flags: 0,
                },
            );
            self.waiting.push_back(conn_id);
            self.count.accepted += 1;
        }
        self.hand_out();
    }

    fn release_live(&self, n: usize) {
        self.live.fetch_sub(n, Ordering::Relaxed);
        self.room.notify_waiters();
    }

    /// Sends waiting connections to the active worker, in batches.
    fn hand_out(&mut self) {
        let Some(wid) = self.active else { return };
        let mut queue = std::mem::take(&mut self.waiting);
        self.hand_to(wid, &mut queue);
        self.waiting = queue;
    }

    /// Sends the connections in `queue` to worker `wid`, in batches; what
    /// could not be sent stays in `queue`.
    fn hand_to(&mut self, wid: u32, queue: &mut VecDeque<u64>) {
        let Some(w) = self.workers.get(&wid) else {
            return;
        };
        let control = w.control.clone();
        let mut msg = Vec::with_capacity(MAX_MSG);
        while !queue.is_empty() {
            // A worker that refused connections for lack of descriptors gets
            // no more than it showed it can hold; the rest wait here until
            // it closes some (`drop_conn` hands them out then).
            let room = self.workers.get(&wid).map_or(0, |w| {
                w.room.map_or(usize::MAX, |r| r.saturating_sub(w.owned))
            });
            if room == 0 {
                return;
            }
            let mut ids: Vec<u64> = Vec::with_capacity(MAX_FDS_PER_MSG);
            let mut entries = Vec::with_capacity(MAX_FDS_PER_MSG);
            let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(MAX_FDS_PER_MSG);
            for id in queue.iter().take(room) {
                let h = &self.conns[id];
                let need = 1 + usize::from(h.spool.is_some());
                if fds.len() + need > MAX_FDS_PER_MSG {
                    break;
                }
                let mut flags = if h.handed { CONN_RECOVERED } else { 0 };
                if h.crashed {
                    flags |= CONN_CRASHED;
                }
                if h.moved {
                    flags |= CONN_MOVED;
                }
                fds.push(h.fd.as_fd());
                if let Some(sp) = &h.spool {
                    flags |= CONN_SPOOL;
                    fds.push(sp.as_fd());
                }
                entries.push(ConnEntry {
                    conn_id: *id,
                    slot: h.slot,
                    flags,
                });
                ids.push(*id);
            }
            // A connection's held channels go first, so they are there when
            // the worker takes the connection. If the batch is not sent they
            // go again with it; the worker keeps the last copy of each.
            for id in &ids {
                for (tag, ch) in &self.conns[id].channels {
                    Msg::Channel {
                        conn_id: *id,
                        tag: *tag,
                    }
                    .encode(&mut msg);
                    match fdpass::send(&*control, &msg, &[ch.as_fd()], true) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            self.arm_retry(Duration::from_millis(2));
                            return;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                            // Dying: see the connections' batch below.
                            tracing::debug!(
                                worker = wid,
                                "worker gone before a hand-over; connections stay queued"
                            );
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(worker = wid, error = %e, "cannot hand channels to worker");
                            return;
                        }
                    }
                }
            }
            let sent_flags: Vec<u8> = entries.iter().map(|e| e.flags).collect();
            Msg::Conns(entries).encode(&mut msg);
            match fdpass::send(&*control, &msg, &fds, true) {
                Ok(()) => {
                    drop(fds);
                    for (id, flags) in ids.iter().zip(sent_flags) {
                        if let Some(h) = self.conns.get_mut(id) {
                            h.sent_flags = flags;
                            if h.handed && !h.moved {
                                self.count.recovered_total += 1;
                            }
                            h.moved = false;
                            h.owner = Some(wid);
                            h.handed = true;
                            h.crashed = false;
                            h.since = None;
                        }
                    }
                    if let Some(w) = self.workers.get_mut(&wid) {
                        w.owned += ids.len();
                    }
                    queue.drain(..ids.len());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.arm_retry(Duration::from_millis(2));
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    // The worker is dying (killed, crashed) while its
                    // connections were on their way: they stay queued, and
                    // its pidfd's report hands them to its successor.
                    tracing::debug!(
                        worker = wid,
                        "worker gone before a hand-over; connections stay queued"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(worker = wid, error = %e, "cannot hand connections to worker");
                    return;
                }
            }
        }
    }

    /// A message from worker `id`: checked for its descriptors, then handled
    /// by the function for its kind. Anything a worker may not say in its
    /// state is logged and ignored.
    fn on_message(&mut self, id: u32, msg: Msg, mut fds: Vec<OwnedFd>) {
        if fds.len() != msg.fd_count() {
            tracing::warn!(
                worker = id,
                fds = fds.len(),
                ?msg,
                "message with the wrong number of fds, stopping that worker"
            );
            self.kill(id);
            return;
        }
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (greeted, role) = (w.greeted, w.role);
        match msg {
            Msg::Hello {
                pid,
                proto,
                state_writes,
                state_reads,
            } => self.hello(id, pid, proto, state_writes, state_reads),
            Msg::Ready if greeted && role == Role::Starting => self.standby_ready(id),
            Msg::Ready if greeted && role == Role::Candidate => self.candidate_ready(id),
            Msg::Released { conn_id, slot } if self.stop.is_some() => {
                self.released_at_stop(id, conn_id, slot)
            }
            Msg::Released { conn_id, slot } => self.released(id, conn_id, slot),
            Msg::Refused { conn_id, slot } => self.refused(id, conn_id, slot),
            Msg::Spool { conn_id, slot } => self.spooled(id, conn_id, slot, fds.pop()),
            Msg::Hold { conn_id, slot, tag } => {
                self.hold_channel(id, conn_id, slot, tag, fds.pop())
            }
            Msg::AcceptOn {
                conn_id,
                slot,
                listener,
                tag,
            } => self.accept_on(id, conn_id, slot, listener, tag),
            Msg::Unhold { conn_id, slot, tag } => self.unhold(id, conn_id, slot, tag),
            Msg::Poisoned { conn_id, slot } => self.poisoned(id, conn_id, slot),
            Msg::Closed { conn_id, slot } => self.closed(id, conn_id, slot),
            other => {
                tracing::warn!(
                    worker = id,
                    ?other,
                    "unexpected message from worker; ignored"
                );
            }
        }
    }

    /// `Hello`: the worker's protocol, pid and state blob versions. A
    /// worker that speaks another protocol or lies about its pid is stopped;
    /// the others are welcomed.
    fn hello(&mut self, id: u32, pid: u32, proto: u16, state_writes: u16, state_reads: (u16, u16)) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.state_writes = state_writes;
        w.state_reads = state_reads;
        if proto != PROTO_VERSION || pid != w.pid {
            tracing::warn!(
                worker = id,
                proto,
                pid,
                "worker speaks another protocol or lies about its pid"
            );
            self.kill(id);
            return;
        }
        w.greeted = true;
        let welcome = Msg::Welcome {
            worker_id: id,
            generation: w.generation,
            slots: self.cfg.max_conns,
        };
        let control = w.control.clone();
        send_msg(&control, &welcome);
        // Welcomed while the keeper stops: it serves as a stopping worker.
        self.tell_workers_to_stop();
    }

    /// `Ready` from a starting worker: it becomes a standby, and the active
    /// worker if there is none (and no crash loop holds promotions back).
    fn standby_ready(&mut self, id: u32) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        tracing::info!(
            worker = id,
            pid = w.pid,
            ms = w.started.elapsed().as_millis() as u64,
            "worker ready"
        );
        w.role = Role::Standby;
        if self.crash_streak == 0 {
            self.count.start_failures = 0;
        }
        if self.active.is_none() && !self.backing_off() {
            self.promote(id);
            self.ensure_workers();
        }
    }

    /// `Spool`: the input spool of a request larger than the socket buffer,
    /// held with its connection if the worker owns it and it is a sealed
    /// memfd.
    fn spooled(&mut self, id: u32, conn_id: u64, slot: u32, fd: Option<OwnedFd>) {
        let owned = self.owns(id, conn_id, slot);
        let spool = fd.filter(|fd| {
            rustix::fs::fcntl_get_seals(fd).is_ok_and(|s| {
                s.contains(rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW)
            })
        });
        match (owned, spool) {
            (true, Some(fd)) => {
                if let Some(h) = self.conns.get_mut(&conn_id) {
                    tracing::info!(worker = id, conn = conn_id, "input spool held");
                    h.spool = Some(fd);
                }
            }
            (false, _) => tracing::warn!(
                worker = id,
                conn = conn_id,
                "spool for a connection the worker does not own; ignored"
            ),
            (true, None) => tracing::warn!(
                worker = id,
                conn = conn_id,
                "spool that is not a sealed memfd; ignored"
            ),
        }
    }

    /// `Hold`: a channel the service opened for a connection it owns.
    fn hold_channel(&mut self, id: u32, conn_id: u64, slot: u32, tag: u32, fd: Option<OwnedFd>) {
        let owned = self.owns(id, conn_id, slot);
        let (Some(fd), true) = (fd, owned) else {
            tracing::warn!(
                worker = id,
                conn = conn_id,
                "channel for a connection the worker does not own; ignored"
            );
            return;
        };
        if let Some(h) = self.conns.get_mut(&conn_id) {
            h.hold(id, conn_id, tag, fd);
        }
    }

    /// `Unhold`: a held channel the service is done with.
    fn unhold(&mut self, id: u32, conn_id: u64, slot: u32, tag: u32) {
        match self.conns.get_mut(&conn_id) {
            Some(h) if h.owner == Some(id) && h.slot == slot => {
                h.channels.retain(|(t, _)| *t != tag);
                tracing::debug!(worker = id, conn = conn_id, tag, "channel let go");
            }
            _ => tracing::warn!(
                worker = id,
                conn = conn_id,
                "unhold for a connection the worker does not own; ignored"
            ),
        }
    }

    /// `Poisoned`: the worker refused a request as poison.
    fn poisoned(&mut self, id: u32, conn_id: u64, slot: u32) {
        if self.owns(id, conn_id, slot) {
            self.count.poisoned += 1;
            tracing::warn!(worker = id, conn = conn_id, "poison request refused");
        }
    }

    /// `Closed`: the worker closed a connection it owns; the keeper drops
    /// its dup and frees the slot.
    fn closed(&mut self, id: u32, conn_id: u64, slot: u32) {
        if self.owns(id, conn_id, slot) {
            self.drop_conn(conn_id);
        } else {
            tracing::warn!(
                worker = id,
                conn = conn_id,
                "worker closed a connection it does not own; ignored"
            );
        }
    }

    /// Accepts a connection on a held listening socket for a worker and
    /// holds it before the worker has it (`AcceptOn`): a crash of the
    /// worker at any instant cannot lose it. Never blocks: with nothing to
    /// accept, the worker is told so and waits again.
    fn accept_on(&mut self, id: u32, conn_id: u64, slot: u32, listener: u32, tag: u32) {
        let Some(control) = self.workers.get(&id).map(|w| w.control.clone()) else {
            return;
        };
        let h = match self.conns.get_mut(&conn_id) {
            Some(h) if h.owner == Some(id) && h.slot == slot => h,
            _ => {
                tracing::warn!(
                    worker = id,
                    conn = conn_id,
                    "accept for a connection the worker does not own; ignored"
                );
                return;
            }
        };
        let accepted = h
            .channels
            .iter()
            .find(|(t, _)| *t == listener)
            .ok_or(Errno::BADF)
            .and_then(|(_, l)| {
                let mut p = [rustix::event::PollFd::new(l, rustix::event::PollFlags::IN)];
                let zero = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                match rustix::event::poll(&mut p, Some(&zero))? {
                    0 => Err(Errno::AGAIN),
                    _ => rustix::net::accept_with(l, SocketFlags::CLOEXEC),
                }
            })
            .and_then(|fd| {
                // The service's own listener may lack it: urgent data
                // inline, as on the keeper's listeners
                // (`hf_sys::tcp::set_urgent_inline`).
                rustix::net::sockopt::set_socket_oobinline(&fd, true)?;
                Ok(fd)
            });
        let fd = match accepted {
            Ok(fd) => fd,
            Err(e) => {
                if e != Errno::AGAIN {
                    tracing::warn!(worker = id, conn = conn_id, listener, error = %e, "cannot accept on a held channel");
                }
                send_msg(&control, &Msg::AcceptFailed { conn_id, tag });
                return;
            }
        };
        if h.channels.iter().filter(|(t, _)| *t != tag).count() >= MAX_CHANNELS {
            tracing::warn!(
                worker = id,
                conn = conn_id,
                tag,
                max = MAX_CHANNELS,
                "too many held channels for one connection; refused"
            );
            send_msg(&control, &Msg::AcceptFailed { conn_id, tag });
            return;
        }
        let mut msg = Vec::with_capacity(64);
        Msg::Channel { conn_id, tag }.encode(&mut msg);
        if let Err(e) = fdpass::send(&*control, &msg, &[fd.as_fd()], true) {
            // Held all the same: the worker's successor finds it.
            tracing::warn!(worker = id, conn = conn_id, error = %e, "cannot pass an accepted channel to its worker");
        }
        h.hold(id, conn_id, tag, fd);
    }

    /// Whether worker `id` holds connection `conn_id` in journal slot
    /// `slot`: the one check before acting on anything a worker says about
    /// a connection.
    fn owns(&self, id: u32, conn_id: u64, slot: u32) -> bool {
        self.conns
            .get(&conn_id)
            .is_some_and(|h| h.owner == Some(id) && h.slot == slot)
    }

    fn drop_conn(&mut self, conn_id: u64) {
        if let Some(h) = self.conns.remove(&conn_id) {
            if let Some((id, w)) = h.owner.and_then(|o| Some(o).zip(self.workers.get_mut(&o))) {
                w.owned = w.owned.saturating_sub(1);
                if w.owned == 0 && w.role == Role::Draining {
                    // Its last connection ended here rather than moving.
                    self.tell_exit(id);
                    self.check_upgrade();
                }
            }
            let _ = self.journal.zero(journal_offset(h.slot), RECORD_SIZE);
            self.free_slots.push(h.slot);
            self.release_live(1);
            // Room in a worker that had none: what waits goes out now.
            if !self.waiting.is_empty() {
                self.dirty = true;
            }
        }
    }

    /// A worker handed back a connection it had no room for (its
    /// descriptor budget, or fds the kernel dropped on the way): it never
    /// touched it, so it waits again, first in line, exactly as it was
    /// before that hand-out, and that worker gets no more than it holds
    /// now until it closes some.
    fn refused(&mut self, id: u32, conn_id: u64, slot: u32) {
        let owned = self.owns(id, conn_id, slot);
        if !owned {
            tracing::warn!(
                worker = id,
                conn = conn_id,
                "worker refused a connection it does not own; ignored"
            );
            return;
        }
        if let Some(h) = self.conns.get_mut(&conn_id) {
            h.owner = None;
            h.handed = h.sent_flags & CONN_RECOVERED != 0;
            h.crashed = h.sent_flags & CONN_CRASHED != 0;
            h.moved = h.sent_flags & CONN_MOVED != 0;
            h.since = Some(Instant::now());
            if h.handed && !h.moved {
                // Counted when it was handed out; it was not recovered then.
                self.count.recovered_total = self.count.recovered_total.saturating_sub(1);
            }
        }
        self.waiting.push_front(conn_id);
        self.dirty = true;
        if let Some(w) = self.workers.get_mut(&id) {
            w.owned = w.owned.saturating_sub(1);
            if w.room.is_none_or(|r| r > w.owned) {
                tracing::info!(
                    worker = id,
                    holds = w.owned,
                    "worker has no room for more connections (open-files limit); the rest wait"
                );
            }
            w.room = Some(w.owned);
            if w.owned == 0 && w.role == Role::Draining {
                // As in `drop_conn`: its last connection left it here.
                self.tell_exit(id);
                self.check_upgrade();
            }
        }
    }

    fn promote(&mut self, id: u32) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.role = Role::Active;
        let control = w.control.clone();
        let pid = w.pid;
        self.active = Some(id);
        let first = self.phase == Phase::Starting;
        self.phase = Phase::Serving;
        // Connections first, so the standby's first wake-up finds them; the
        // Activate note (for its log) follows.
        self.hand_out();
        let handed = self.recovery_started.take().map(|t0| t0.elapsed());
        send_msg(&control, &Msg::Activate);
        if first {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        if let Some(elapsed) = handed {
            let us = elapsed.as_micros() as u64;
            self.count.last_recovery_us = Some(us);
            self.metrics.recovered_in(elapsed.as_secs_f64());
            let connections = self.workers.get(&id).map_or(0, |w| w.owned);
            tracing::info!(
                worker = id,
                pid,
                us,
                connections,
                "recovered onto standby: {connections} connections handed over in {us} µs"
            );
        } else {
            tracing::info!(worker = id, pid, "worker active");
        }
    }

    /// Rejuvenation: an active worker past `--max-rss` or `--max-uptime` is
    /// replaced by a fresh one of the same command, through the upgrade
    /// path, so no connection notices. A worker younger than a second is
    /// left alone (a service whose baseline is over the limit would
    /// otherwise be replaced forever).
    fn check_rejuvenation(&mut self) {
        let cfg = &self.cfg;
        if self.upgrade.is_some()
            || (cfg.max_rss.is_none() && cfg.max_uptime.is_none() && cfg.max_requests.is_none())
        {
            return;
        }
        let Some((id, w)) = self.active.and_then(|a| Some(a).zip(self.workers.get(&a))) else {
            return;
        };
        let age = w.started.elapsed();
        if age < Duration::from_secs(1) {
            return;
        }
        // Any value the worker wrote is only its own count: at worst it
        // gets itself replaced early, or (RSS and uptime still apply) late.
        let served = self
            .journal
            .load_u64(hf_journal::requests_offset(id))
            .unwrap_or(0);
        let why = match (self.cfg.max_rss, self.cfg.max_uptime) {
            (_, Some(max)) if age >= max => format!("up {} s (--max-uptime)", age.as_secs()),
            _ if self.cfg.max_requests.is_some_and(|m| served >= m) => {
                format!("served {served} requests (--max-requests)")
            }
            (Some(max), _) => match resident_bytes(w.pid) {
                Some(rss) if rss > max => {
                    format!("resident memory {} MiB (--max-rss)", rss >> 20)
                }
                _ => return,
            },
            _ => return,
        };
        tracing::info!(
            worker = self.active,
            pid = w.pid,
            "rejuvenating the worker: {why}"
        );
        self.count.rejuvenations += 1;
        let req = UpgradeRequest {
            settle_ms: 200,
            ..UpgradeRequest::with_defaults()
        };
        self.start_upgrade(req, None);
    }

    /// A worker still starting: warns once if it has not even said hello
    /// (a command not linked with the holdfast library never does), and
    /// gives up when the first start takes longer than `--ready-timeout`.
    /// Returns whether the keeper stops.
    fn check_first_start(&mut self) -> bool {
        let command = self
            .cfg
            .command
            .first()
            .map(|c| c.to_string_lossy().into_owned());
        for (id, w) in self.workers.iter_mut() {
            if w.role == Role::Starting
                && !w.greeted
                && !w.hello_warned
                && w.started.elapsed() >= HELLO_WARN
            {
                w.hello_warned = true;
                tracing::warn!(
                    worker = *id,
                    pid = w.pid,
                    "worker has not said hello after {} s: is {} linked with the holdfast library?",
                    HELLO_WARN.as_secs(),
                    command.as_deref().unwrap_or("the command")
                );
            }
        }
        let Some(limit) = self.cfg.ready_timeout else {
            return false;
        };
        if self.phase != Phase::Starting || self.active.is_some() {
            return false;
        }
        if self.born.elapsed() < limit {
            return false;
        }
        let greeted = self.workers.values().any(|w| w.greeted);
        let why = format!(
            "no worker became ready within {} ms of the start (--ready-timeout): {}",
            limit.as_millis(),
            if greeted {
                "the worker connected but never reported ready (does it accept on its holdfast listener?)"
            } else {
                "the worker never connected to the keeper (is the command linked with the holdfast library?)"
            }
        );
        tracing::error!("{why}");
        self.fatal = Some(why);
        self.phase = Phase::ShuttingDown;
        true
    }

    /// Kills workers whose heartbeat stopped for longer than the hang
    /// timeout. A worker that never beat (a blocking service that does not
    /// call `heartbeat`) is not watched. Reading the counter trusts nothing:
    /// any change counts as a beat.
    fn check_heartbeats(&mut self) {
        let Some(timeout) = self.cfg.hang_timeout else {
            return;
        };
        let now = Instant::now();
        let mut hung = Vec::new();
        for (id, w) in self.workers.iter_mut() {
            let v = self
                .journal
                .load_u64(hf_journal::heartbeat_offset(*id))
                .unwrap_or(0);
            if v != w.beat {
                w.beat = v;
                w.beat_changed = now;
            } else if v != 0 && w.hung.is_none() && now - w.beat_changed > timeout {
                let silent = now - w.beat_changed;
                tracing::warn!(
                    worker = *id,
                    pid = w.pid,
                    ms = silent.as_millis() as u64,
                    "worker hung: no heartbeat; killing it"
                );
                w.hung = Some(silent);
                hung.push(*id);
            }
        }
        for id in hung {
            self.kill(id);
        }
    }

    /// While no worker serves, connections wait at most `hold_timeout`, and
    /// at most `hold_max` of them; the rest are turned away, oldest first.
    fn expire_held(&mut self) {
        if self.active.is_some() || self.waiting.is_empty() {
            return;
        }
        let now = Instant::now();
        let timeout = self.cfg.hold_timeout;
        let excess = self.waiting.len().saturating_sub(self.cfg.hold_max);
        // Input the clients sent meanwhile sits in the kernel (and in
        // spools): bounded too, oldest connections first.
        let bytes: Vec<u64> = self
            .waiting
            .iter()
            .map(|c| self.conns.get(c).map_or(0, queued_bytes))
            .collect();
        let mut over = bytes
            .iter()
            .sum::<u64>()
            .saturating_sub(self.cfg.hold_bytes);
        let mut expired: Vec<u64> = Vec::new();
        for (i, c) in self.waiting.iter().enumerate() {
            let late = self
                .conns
                .get(c)
                .and_then(|h| h.since)
                .is_some_and(|t| now - t >= timeout);
            if i < excess || late || over > 0 {
                over = over.saturating_sub(bytes[i]);
                expired.push(*c);
            }
        }
        if expired.is_empty() {
            return;
        }
        tracing::warn!(
            connections = expired.len(),
            waiting = self.waiting.len(),
            queued_bytes = bytes.iter().sum::<u64>(),
            "no worker could serve in time (or too much is waiting); turning connections away"
        );
        let gone: std::collections::HashSet<u64> = expired.iter().copied().collect();
        self.waiting.retain(|c| !gone.contains(c));
        for cid in expired {
            self.turn_away(cid);
        }
    }

    /// Sends the configured "unavailable" reply if the connection is at a
    /// point where a fresh answer may start, then closes it cleanly: queued
    /// input is dropped first, so the close is a FIN, not an RST.
    fn turn_away(&mut self, cid: u64) {
        let Some(h) = self.conns.get(&cid) else {
            return;
        };
        let fresh = !h.handed || self.at_commit_point(cid, h);
        if let (true, Some(reply)) = (fresh, &self.cfg.unavailable) {
            let _ = rustix::net::send(
                &h.fd,
                reply,
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            );
        }
        while let Ok(n) = hf_sys::tcp::discard(&h.fd, 1 << 30) {
            if n == 0 {
                break;
            }
        }
        let _ = rustix::net::shutdown(&h.fd, rustix::net::Shutdown::Write);
        self.count.turned_away += 1;
        self.drop_conn(cid);
    }

    /// The connection's last worker left it between two answers: its record
    /// (copied out and validated) has no output past the commit, and the
    /// kernel agrees.
    fn at_commit_point(&self, cid: u64, h: &Held) -> bool {
        let mut raw = [0u8; RECORD_SIZE];
        if self.journal.read(journal_offset(h.slot), &mut raw).is_err() {
            return false;
        }
        match hf_journal::record::pick(&raw, cid) {
            Ok(rec) if rec.out_rec == rec.out_commit => {
                hf_sys::tcp::stream_positions(&h.fd).is_ok_and(|p| p.written == rec.out_commit)
            }
            _ => false,
        }
    }

    fn kill(&mut self, id: u32) {
        if let Some(w) = self.workers.get(&id) {
            signal_worker(w.pid, Signal::KILL);
        }
    }

    fn died(&mut self, id: u32) {
        let t0 = Instant::now();
        self.drain_control(id);
        let Some(mut w) = self.workers.remove(&id) else {
            return;
        };
        let was_active = self.active == Some(id);
        // Reaped first (one waitid): how it died decides whether its
        // requests in flight count towards poison detection.
        let status = reap(&mut w);
        let crashed = w.hung.is_some() || matches!(&status, Ok(Some(st)) if crashed_by_itself(*st));
        // Requests it committed (its own count: a lie only changes when a
        // crash loop is declared).
        let served = self
            .journal
            .load_u64(hf_journal::requests_offset(id))
            .unwrap_or(0);
        // Connections next: everything else (logging, starting a new
        // standby) waits until they are on their way to the successor.
        if was_active {
            self.active = None;
            self.count.restarts += 1;
            self.metrics.restarted(if w.hung.is_some() {
                crate::metrics::RestartReason::Hang
            } else if crashed {
                crate::metrics::RestartReason::Crash
            } else {
                crate::metrics::RestartReason::Killed
            });
            if crashed && served == 0 {
                self.crash_streak += 1;
            } else {
                self.crash_streak = 0;
            }
            self.rollback_cut_answers(id, crashed);
            self.recover_from(id, crashed);
            // A worker that served nothing leaves its connections waiting
            // since they were first lost; any other loss starts afresh.
            let loop_death = crashed && served == 0;
            for h in self.conns.values_mut().filter(|h| h.owner.is_none()) {
                if let (Some(first), Some(since)) = (h.lost_since, &mut h.since) {
                    if loop_death {
                        *since = first.min(*since);
                    } else {
                        h.lost_since = Some(*since);
                    }
                }
            }
            self.recovery_started = Some(t0);
            if self.crash_streak >= 2 {
                self.back_off_crash_loop();
            }
            // A standby of the version in force: during an upgrade that can
            // still roll back, that is the old version.
            let standby = self
                .workers
                .iter()
                .find(|(_, w)| w.role == Role::Standby && w.generation == self.generation)
                .map(|(id, _)| *id);
            match standby {
                Some(sid) if !self.backing_off() => {
                    self.promote(sid);
                    let later = Instant::now() + RESPAWN_DELAY;
                    self.spawn_after = Some(self.spawn_after.map_or(later, |t| t.max(later)));
                }
                _ => self.phase = Phase::Recovering,
            }
        } else {
            self.stragglers(id, &w, crashed);
        }
        let how = match status {
            Ok(Some(st)) => describe_exit(st),
            Ok(None) => "still running?".to_owned(),
            Err(e) => format!("unknown ({e})"),
        };
        let how_short = how.clone();
        let exit = match w.hung {
            Some(d) => format!(
                "worker {id} (pid {}, {:?}) hung (no heartbeat for {} ms), {how}",
                w.pid,
                w.role,
                d.as_millis()
            ),
            None => format!("worker {id} (pid {}, {:?}) {how}", w.pid, w.role),
        };
        if was_active || w.role == Role::Standby {
            tracing::warn!(worker = id, pid = w.pid, "{exit}");
        } else {
            tracing::info!(worker = id, pid = w.pid, "{exit}");
        }
        self.upgrade_worker_died(id, &w, was_active, &how_short);
        if w.role == Role::Starting && self.phase != Phase::ShuttingDown {
            self.count.start_failures += 1;
            let backoff = FIRST_BACKOFF
                .saturating_mul(1 << self.count.start_failures.min(10))
                .min(MAX_BACKOFF);
            self.spawn_after = Some(Instant::now() + backoff);
            tracing::warn!(
                worker = id,
                failures = self.count.start_failures,
                next_start_ms = backoff.as_millis() as u64,
                "worker died before it was ready ({how_short}); {} failed start-ups in a row, next try in {} ms",
                self.count.start_failures,
                backoff.as_millis()
            );
        }
        self.count.last_exits.push_back(exit);
        if self.count.last_exits.len() > EXITS_KEPT {
            self.count.last_exits.pop_front();
        }
        self.ensure_workers();
    }

    /// Handles what the dead worker sent but this loop has not read yet: a
    /// `Closed` or `Spool` written just before death must count before its
    /// connections are handed on.
    fn drain_control(&mut self, id: u32) {
        let Some(control) = self.workers.get(&id).map(|w| w.control.clone()) else {
            return;
        };
        let mut buf = vec![0u8; MAX_MSG];
        loop {
            let mut fds = Vec::new();
            match fdpass::recv(&*control, &mut buf, &mut fds, true) {
                Ok(n) if n > 0 => match Msg::decode(&buf[..n]) {
                    Ok(msg) => self.on_message(id, msg, fds),
                    Err(e) => {
                        tracing::warn!(worker = id, error = %e, "malformed control message from a dead worker")
                    }
                },
                _ => return,
            }
        }
    }

    /// Takes back every connection the dead worker owned and queues them,
    /// oldest first, ahead of new arrivals. Their journal records are not
    /// read here: the successor validates each one against the kernel's
    /// stream positions before it resumes the connection, and reports the
    /// ones it cannot resume (or that the service had closed) as `Closed`.
    /// Reading them here too would only delay the hand-over.
    fn recover_from(&mut self, id: u32, crashed: bool) {
        let t0 = Instant::now();
        let mut mine: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, h)| h.owner == Some(id))
            .map(|(c, _)| *c)
            .collect();
        mine.sort_unstable();
        for cid in mine.iter().rev() {
            let ran = crashed
                && self
                    .conns
                    .get(cid)
                    .is_some_and(|h| ran_request(&self.journal, *cid, h));
            if let Some(h) = self.conns.get_mut(cid) {
                h.owner = None;
                h.crashed = ran;
                h.since = Some(t0);
                h.lost_since.get_or_insert(t0);
            }
            self.waiting.push_front(*cid);
        }
    }

    /// True while a crash loop's back-off keeps standbys from taking over.
    fn backing_off(&self) -> bool {
        self.promote_after.is_some_and(|t| Instant::now() < t)
    }

    /// Active workers keep crashing before they serve anything: the next
    /// one takes over only after a pause that doubles each time (up to
    /// [`MAX_BACKOFF`]). Connections wait meanwhile, within the hold limits
    /// (`--hold-timeout` counts from when they were first lost), and a
    /// request that crashes every worker is closed by the library once it
    /// has been flagged as poison and crashed one more.
    fn back_off_crash_loop(&mut self) {
        let pause = FIRST_BACKOFF
            .saturating_mul(1 << (self.crash_streak - 1).min(10))
            .min(MAX_BACKOFF);
        self.count.start_failures += 1;
        let until = Instant::now() + pause;
        self.promote_after = Some(until);
        self.spawn_after = Some(self.spawn_after.map_or(until, |t| t.max(until)));
        tracing::warn!(
            crashes = self.crash_streak,
            pause_ms = pause.as_millis() as u64,
            "workers keep crashing before they serve a request; pausing before the next takes over"
        );
        self.arm_retry(pause);
    }

    /// After a crash loop's pause: a ready standby of the version in force
    /// takes over.
    fn promote_after_backoff(&mut self) {
        if self.active.is_some()
            || self.phase == Phase::ShuttingDown
            || self.promote_after.is_none()
        {
            return;
        }
        if self.backing_off() {
            let left = self
                .promote_after
                .and_then(|t| t.checked_duration_since(Instant::now()))
                .unwrap_or_default();
            self.arm_retry(left);
            return;
        }
        self.promote_after = None;
        let standby = self
            .workers
            .iter()
            .find(|(_, w)| w.role == Role::Standby && w.generation == self.generation)
            .map(|(id, _)| *id);
        if let Some(sid) = standby {
            self.promote(sid);
        }
    }

    /// Keeps one worker to serve and `standby` more ready, starting new ones
    /// (with back-off after failed starts).
    fn ensure_workers(&mut self) {
        if self.phase == Phase::ShuttingDown {
            return;
        }
        let spares = self
            .workers
            .values()
            .filter(|w| {
                matches!(w.role, Role::Standby | Role::Starting) && w.generation == self.generation
            })
            .count();
        let want = self.cfg.standby + usize::from(self.active.is_none());
        if spares >= want {
            return;
        }
        if let Some(t) = self.spawn_after {
            let now = Instant::now();
            if now < t {
                self.arm_retry(t - now);
                return;
            }
        }
        for _ in spares..want {
            if let Err(e) = self.spawn_worker(None, self.generation, Role::Starting) {
                tracing::error!(error = %e, "cannot start worker");
                self.count.start_failures += 1;
                self.spawn_after = Some(Instant::now() + MAX_BACKOFF);
                self.arm_retry(MAX_BACKOFF);
                return;
            }
        }
    }

    /// Starts a worker running `command` (the configured one when `None`).
    fn spawn_worker(
        &mut self,
        command: Option<&[OsString]>,
        generation: u32,
        role: Role,
    ) -> Result<u32, KeeperError> {
        let (mine, theirs) = fdpass::seqpacket_pair()?;
        // A previous worker with the same counters left their values.
        for off in [
            hf_journal::heartbeat_offset(self.next_worker),
            hf_journal::requests_offset(self.next_worker),
        ] {
            let _ = self.journal.store_u64(off, 0);
        }
        let command: Vec<OsString> = command.unwrap_or(&self.cfg.command).to_vec();
        let Some((prog, args)) = command.split_first() else {
            return Err(KeeperError::NoCommand);
        };
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .env(hf_journal::ENV_CONTROL_FD, theirs.as_raw_fd().to_string())
            .env(
                hf_journal::ENV_JOURNAL_FD,
                self.journal_fd.as_raw_fd().to_string(),
            )
            .env(
                hf_journal::ENV_POISON_AFTER,
                self.cfg.poison_after.to_string(),
            )
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            // systemd talks to the keeper, not to its workers.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        if self.cfg.hang_timeout.is_some() {
            cmd.env(hf_journal::ENV_HEARTBEAT, "1");
        }
        if let Some(d) = self.cfg.request_deadline {
            cmd.env(
                hf_journal::ENV_REQUEST_DEADLINE_MS,
                d.as_millis().to_string(),
            );
        }
        hf_sys::spawn::inherit_fds(&mut cmd, &[theirs.as_fd(), self.journal_fd.as_fd()], true);
        // A process group of its own: what the worker's command starts
        // (a `sh -c` wrapper's child) is stopped with it (`signal_worker`).
        // Signals from the terminal (Ctrl-C) then reach only the keeper,
        // which stops its workers itself.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .map_err(|e| KeeperError::Spawn(prog.clone(), e))?;
        drop(theirs);
        let pid = child.id();
        let id = self.next_worker;
        self.next_worker += 1;
        let control = Arc::new(mine);
        if let Err(e) = self.watch_worker(id, pid, &control) {
            let mut child = child;
            signal_worker(pid, Signal::KILL);
            let _ = child.wait();
            return Err(KeeperError::Spawn(prog.clone(), e));
        }
        tracing::info!(worker = id, pid, generation, "worker started");
        self.workers.insert(
            id,
            Worker {
                pid,
                generation,
                role,
                control,
                child: Some(child),
                greeted: false,
                started: Instant::now(),
                beat: 0,
                beat_changed: Instant::now(),
                hung: None,
                owned: 0,
                state_writes: 1,
                state_reads: (1, 1),
                drain_deadline: None,
                drain_sent: false,
                catcher: false,
                exit_by: None,
                room: None,
                hello_warned: false,
            },
        );
        Ok(id)
    }

    fn snapshot(&self) -> Snapshot {
        let mut per: HashMap<u32, usize> = HashMap::new();
        for h in self.conns.values() {
            if let Some(o) = h.owner {
                *per.entry(o).or_default() += 1;
            }
        }
        Snapshot {
            phase: if self.stopping() {
                Phase::ShuttingDown
            } else {
                self.phase
            },
            keeper_pid: std::process::id(),
            listeners: self.listeners.clone(),
            workers: self
                .workers
                .iter()
                .map(|(id, w)| WorkerInfo {
                    id: *id,
                    pid: w.pid,
                    generation: w.generation,
                    role: w.role,
                    connections: per.get(id).copied().unwrap_or(0),
                })
                .collect(),
            connections: self.conns.len(),
            waiting: self.waiting.len(),
            accepted: self.count.accepted,
            restarts: self.count.restarts,
            recovered_connections: self.count.recovered_total,
            last_recovery_us: self.count.last_recovery_us,
            last_exits: self.count.last_exits.iter().cloned().collect(),
            start_failures: self.count.start_failures,
            next_start_in_ms: self
                .spawn_after
                .and_then(|t| t.checked_duration_since(Instant::now()))
                .map(|d| d.as_millis() as u64),
            turned_away: self.count.turned_away,
            poisoned: self.count.poisoned,
            generation: self.generation,
            generations: self.live_generations(),
            upgrade: self.upgrade.as_ref().map(Upgrade::status),
            upgrades: self.count.upgrades,
            failed_upgrades: self.count.failed_upgrades,
            keeper_execs: self.count.keeper_execs,
            rejuvenations: self.count.rejuvenations,
        }
    }

    /// The end of a stop: workers exit first (nothing may write to a
    /// connection being closed), then every connection still held is
    /// closed without a reset.
    async fn shutdown(&mut self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.close_listeners();
        for (id, w) in &self.workers {
            send_msg(&w.control, &Msg::Shutdown);
            signal_worker(w.pid, Signal::TERM);
            tracing::debug!(worker = id, "asked to stop");
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for w in self.workers.values_mut() {
            while Instant::now() < deadline && !exited(w.pid) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Not reaped yet, so its group is still known: what it started
            // and left behind goes too.
            signal_worker(w.pid, Signal::KILL);
            let _ = reap_blocking(w);
        }
        self.workers.clear();
        self.active = None;
        self.close_all_cleanly().await;
        let _ = std::fs::remove_file(&self.cfg.control);
        tracing::info!("stopped");
    }
}

/// True once process `pid` (a child) has exited; it is left to be reaped.
fn exited(pid: u32) -> bool {
    use rustix::process::{waitid, WaitId, WaitIdOptions};
    let Some(pid) = Pid::from_raw(pid as i32) else {
        return true;
    };
    let peek = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    !matches!(waitid(WaitId::Pid(pid), peek), Ok(None))
}

/// Sends `sig` to the worker `pid` and everything in its process group
/// (each worker leads one, see `spawn_worker`), so that what its command
/// started does not outlive it as an orphan. A worker that leads no group
/// (started by an older keeper before a re-exec) gets it alone. The
/// worker's own exit is still seen, and reaped, through its pidfd.
fn signal_worker(pid: u32, sig: Signal) {
    let Some(pid) = Pid::from_raw(pid as i32) else {
        return;
    };
    if rustix::process::getpgid(Some(pid)) == Ok(pid) {
        let _ = rustix::process::kill_process_group(pid, sig);
    } else {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Whether the worker that just died had read the request in flight on `h`
/// (input past its commit): the socket's peek offset, or its spool's read
/// mark, compared with the journal's commit. Only such a request counts a
/// crash towards poison (`CONN_CRASHED`). The evidence is then wiped, so a
/// worker that dies before it even took the connection up cannot count the
/// same reading twice. Anything unreadable counts (as before this check).
fn ran_request(journal: &SharedMem, cid: u64, h: &Held) -> bool {
    let mut raw = [0u8; RECORD_SIZE];
    if journal.read(journal_offset(h.slot), &mut raw).is_err() {
        return true;
    }
    let Ok(rec) = hf_journal::record::pick(&raw, cid) else {
        return true;
    };
    if let Some(sp) = &h.spool {
        let mut mark = [0u8; 8];
        let off = hf_journal::SPOOL_READ_MARK as u64;
        let ran = match rustix::io::pread(sp, &mut mark, off) {
            Ok(8) => u64::from_le_bytes(mark) > rec.in_commit,
            _ => true,
        };
        let _ = rustix::io::pwrite(sp, &rec.in_commit.to_le_bytes(), off);
        return ran;
    }
    let peeked = match hf_sys::tcp::peek_off(&h.fd) {
        Ok(o) => u64::try_from(o).unwrap_or(0),
        Err(_) => return true,
    };
    let ran = match hf_sys::tcp::stream_positions(&h.fd) {
        Ok(p) => p.consumed.saturating_add(peeked) > rec.in_commit,
        Err(_) => true,
    };
    let _ = hf_sys::tcp::set_peek_off(&h.fd, 0);
    ran
}

/// Input a held connection has waiting: in the kernel's receive queue and,
/// for a spooled request, in its spool.
fn queued_bytes(h: &Held) -> u64 {
    let spooled = h
        .spool
        .as_ref()
        .and_then(|s| rustix::fs::fstat(s).ok())
        .map_or(0, |st| st.st_blocks as u64 * 512);
    rustix::io::ioctl_fionread(&h.fd).unwrap_or(0) + spooled
}

/// A process's resident memory, from `/proc/PID/statm`.
fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// Reaps `w` if it has exited.
fn reap(w: &mut Worker) -> std::io::Result<Option<std::process::ExitStatus>> {
    if let Some(c) = &mut w.child {
        return c.try_wait();
    }
    let pid = Pid::from_raw(w.pid as i32).ok_or_else(|| std::io::Error::other("bad pid"))?;
    match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
        Ok(Some((_, st))) => Ok(Some(std::process::ExitStatus::from_raw(st.as_raw()))),
        Ok(None) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn reap_blocking(w: &mut Worker) -> std::io::Result<()> {
    if let Some(c) = &mut w.child {
        return c.wait().map(|_| ());
    }
    if let Some(pid) = Pid::from_raw(w.pid as i32) {
        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())?;
    }
    Ok(())
}

/// The keeper holds one fd per connection (and so do workers, which
/// inherit the limit): raise the soft limit to the hard one.
/// Returns the resulting soft limit.
fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Sends a message without fds; false if it could not go now.
fn send_msg(control: &OwnedFd, msg: &Msg) -> bool {
    let mut out = Vec::with_capacity(64);
    msg.encode(&mut out);
    match fdpass::send(control, &out, &[], true) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, ?msg, "control send failed");
            false
        }
    }
}

/// A worker that died of its own fault (a fatal signal of its own making, a
/// non-zero exit), as opposed to being stopped from outside (SIGKILL,
/// SIGTERM, SIGINT, SIGHUP: an operator, a test, the OOM killer).
fn crashed_by_itself(st: std::process::ExitStatus) -> bool {
    match st.signal() {
        Some(sig) => !matches!(sig, 1 | 2 | 9 | 15),
        None => st.code() != Some(0),
    }
}

fn describe_exit(st: std::process::ExitStatus) -> String {
    if let Some(sig) = st.signal() {
        let name = signal_name(sig);
        if st.core_dumped() {
            format!("killed by {name} (core dumped)")
        } else {
            format!("killed by {name}")
        }
    } else {
        format!("exited with code {}", st.code().unwrap_or(-1))
    }
}

fn signal_name(sig: i32) -> String {
    let known = [
        (1, "SIGHUP"),
        (2, "SIGINT"),
        (3, "SIGQUIT"),
        (4, "SIGILL"),
        (5, "SIGTRAP"),
        (6, "SIGABRT"),
        (7, "SIGBUS"),
        (8, "SIGFPE"),
        (9, "SIGKILL"),
        (10, "SIGUSR1"),
        (11, "SIGSEGV"),
        (12, "SIGUSR2"),
        (13, "SIGPIPE"),
        (14, "SIGALRM"),
        (15, "SIGTERM"),
        (24, "SIGXCPU"),
        (25, "SIGXFSZ"),
        (31, "SIGSYS"),
    ];
    known
        .iter()
        .find(|(n, _)| *n == sig)
        .map(|(_, s)| (*s).to_owned())
        .unwrap_or_else(|| format!("signal {sig}"))
}

async fn read_control(id: u32, fd: AsyncFd<OwnedFd>, tx: mpsc::UnboundedSender<Event>) {
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        let Ok(mut guard) = fd.readable().await else {
            break;
        };
        let mut fds = Vec::new();
        match guard.try_io(|f| fdpass::recv(f.get_ref(), &mut buf, &mut fds, true)) {
            Err(_would_block) => continue,
            Ok(Ok(0)) => {
                let _ = tx.send(Event::ControlClosed(id));
                break;
            }
            Ok(Err(e)) => {
                // The worker is stopped (its connections recovered): say
                // why, or the SIGKILL that follows has no reason in the log.
                // A truncated message (fds the keeper had no room for) is
                // the usual cause: the keeper's open-files limit.
                tracing::warn!(
                    worker = id,
                    error = %e,
                    "cannot read the worker's control socket; stopping that worker"
                );
                let _ = tx.send(Event::ControlClosed(id));
                break;
            }
            Ok(Ok(n)) => {
                let msg = Msg::decode(&buf[..n]).map_err(|e| e.to_string());
                if tx.send(Event::FromWorker(id, msg, fds)).is_err() {
                    break;
                }
            }
        }
    }
}

async fn accept_loop(
    l: AsyncFd<OwnedFd>,
    tx: mpsc::UnboundedSender<Event>,
    live: Arc<AtomicUsize>,
    max: usize,
    room: Arc<Notify>,
) {
    loop {
        // Full: leave new connections in the kernel's backlog until a slot frees.
        while live.load(Ordering::Relaxed) >= max {
            let notified = room.notified();
            if live.load(Ordering::Relaxed) < max {
                break;
            }
            notified.await;
        }
        let Ok(mut guard) = l.readable().await else {
            return;
        };
        let mut batch = Vec::new();
        while batch.len() < MAX_FDS_PER_MSG && live.load(Ordering::Relaxed) + batch.len() < max {
            match guard.try_io(|l| {
                rustix::net::accept_with(l.get_ref(), SocketFlags::CLOEXEC).map_err(Into::into)
            }) {
                Ok(Ok(fd)) => batch.push(fd),
                Ok(Err(e)) => {
                    // EMFILE and friends: keep what we have, pause a little.
                    let errno = Errno::from_io_error(&e);
                    if errno != Some(Errno::CONNABORTED) {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    break;
                }
                Err(_would_block) => break,
            }
        }
        if !batch.is_empty() {
            live.fetch_add(batch.len(), Ordering::Relaxed);
            if tx.send(Event::Accepted(batch)).is_err() {
                return;
            }
        }
    }
}

/// Binds the control socket in an owner-only directory (see [`crate::control`]).
fn bind_status(path: &Path) -> Result<std::os::unix::net::UnixListener, KeeperError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |e: std::io::Error| KeeperError::Control(path.to_owned(), e);
    crate::control::prepare_dir(path).map_err(err)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another keeper is running there (use --control to pick another path)",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Answers `holdfast status` and `holdfast upgrade` on the control socket.
fn serve_status(
    listener: std::os::unix::net::UnixListener,
    tx: mpsc::UnboundedSender<Event>,
    gate: Arc<reexec::ControlGate>,
) -> Result<(), KeeperError> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    tokio::spawn(async move {
        loop {
            gate.open().await;
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // Only this keeper's user and root: whoever else got here (a
            // socket or directory opened up by hand) is told so and dropped.
            let peer = stream.peer_cred();
            if !peer
                .as_ref()
                .is_ok_and(|c| crate::control::trusted_uid(c.uid()))
            {
                let uid = peer.as_ref().ok().map(|c| c.uid());
                let pid = peer.as_ref().ok().and_then(|c| c.pid());
                tracing::warn!(
                    ?uid,
                    ?pid,
                    "control connection refused: not this keeper's user or root"
                );
                let who = uid.map_or("an unknown user".to_owned(), |u| format!("uid {u}"));
                let reply = ErrorReply::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "permission denied: {who} may not control this keeper \
                         (only uid {} and root)",
                        rustix::process::geteuid().as_raw()
                    ),
                );
                tokio::spawn(async move {
                    // The request is read first (briefly), so the client
                    // sees this answer rather than a broken pipe.
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let request = tokio::io::BufReader::new(r).take(4096);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        Box::pin(request).read_line(&mut line),
                    )
                    .await;
                    let _ = w.write_all(reply.to_line().as_bytes()).await;
                });
                continue;
            }
            let conversation = gate.enter();
            let tx = tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = tokio::io::BufReader::new(r);
                let req = match read_request(&mut r).await {
                    None => return,
                    Some(Ok(req)) => req,
                    Some(Err(e)) => {
                        // Told why, and nothing else happens: the keeper
                        // goes on as before.
                        tracing::warn!(error = %e, "control request refused");
                        let _ = w.write_all(ErrorReply::from(&e).to_line().as_bytes()).await;
                        drop(conversation);
                        let _ = w.shutdown().await;
                        // What the client still sends is read (briefly) so
                        // that closing does not reset the answer away.
                        let mut sink = tokio::io::sink();
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            tokio::io::copy(&mut r.take(1 << 20), &mut sink),
                        )
                        .await;
                        return;
                    }
                };
                let _conversation = conversation;
                let reply = match req {
                    Request::UpgradeKeeper => {
                        // The connection itself travels to the keeper: the
                        // re-executed keeper answers on it.
                        let Ok(stream) = r.into_inner().reunite(w) else {
                            return;
                        };
                        if let Ok(std) = stream.into_std() {
                            let _ = std.set_nonblocking(false);
                            let _ = tx.send(Event::Reexec(OwnedFd::from(std)));
                        }
                        return;
                    }
                    Request::Upgrade { upgrade } => {
                        let (ptx, mut prx) = mpsc::unbounded_channel();
                        if tx.send(Event::Upgrade(upgrade, Some(ptx))).is_err() {
                            return;
                        }
                        while let Some(p) = prx.recv().await {
                            let mut line = serde_json::to_string(&p).unwrap_or_default();
                            line.push('\n');
                            if w.write_all(line.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    Request::Status => {
                        let (otx, orx) = oneshot::channel();
                        if tx.send(Event::Status(otx)).is_err() {
                            return;
                        }
                        match orx.await {
                            Ok(s) => serde_json::to_string(&s).unwrap_or_default(),
                            Err(_) => return,
                        }
                    }
                };
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.write_all(b"\n").await;
            });
        }
    });
    Ok(())
}

/// Reads one request line from a control client: `None` if it closed (or
/// failed) before sending anything.
async fn read_request(
    r: &mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Option<Result<Request, ProtoError>> {
    let mut line = Vec::new();
    match r
        .take(MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
    {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REQUEST {
        return Some(Err(ProtoError::TooLong));
    }
    Some(Request::parse(&line))
}

/// Serves `--metrics`: `GET /metrics` gets the keeper's counters as
/// Prometheus text, anything else 404; one request per connection, and a
/// client that takes more than 5 s over its request is dropped.
async fn serve_metrics(listener: tokio::net::TcpListener, tx: mpsc::UnboundedSender<Event>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let read = async {
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            };
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), read).await,
                Ok(true)
            ) {
                return;
            }
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let mut parts = line.split(|b| *b == b' ');
            let (method, path) = (parts.next(), parts.next());
            let wanted = method == Some(b"GET")
                && path.is_some_and(|p| p == b"/metrics" || p.starts_with(b"/metrics?"));
            let (status, kind, body) = if wanted {
                let (otx, orx) = oneshot::channel();
                if tx.send(Event::Metrics(otx)).is_err() {
                    return;
                }
                let Ok(text) = orx.await else { return };
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "metrics are at /metrics\n".to_owned(),
                )
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
