//! Keeper self-upgrade: `holdfast upgrade --keeper` re-executes the keeper's
//! binary in place. `execve` keeps the process (its pid, so the workers stay
//! its children) and every descriptor not marked close-on-exec; the state
//! that is not in the kernel — which fd is which connection, journal slot,
//! owner, generation — travels as JSON in a memfd named by the environment.
//!
//! Workers never notice: their connections, control sockets and journal are
//! the same objects before and after. Messages they send meanwhile wait in
//! their control sockets; new connections wait in the listen backlog;
//! everything queued inside the old image (accepted connections not yet
//! handled) is handled before the exec.

use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::io::FdFlags;
use rustix::process::{Pid, PidfdFlags};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use super::{Event, Held, Keeper, Worker};
use crate::status::{Phase, Progress, Role};
use crate::{Config, KeeperError};
use hf_journal::wire::CONN_RECOVERED;

/// Names the memfd with the saved state in the re-executed keeper's environment.
const ENV_RESUME: &str = "HOLDFAST_KEEPER_STATE_FD";
/// Saved-state format; a keeper refuses a format it does not know.
const FORMAT: u32 = crate::SAVED_STATE_FORMAT;
/// The saved state is small (a few hundred bytes per connection); anything
/// larger than this is not ours.
const MAX_STATE: u64 = 256 << 20;
/// Longest wait for the control socket's conversations to end before a
/// re-exec. They take microseconds; only a client that connected and says
/// nothing takes longer, and it has asked for nothing the exec could lose.
const QUIET_MAX: Duration = Duration::from_secs(1);

/// The control socket's conversations in progress (a client accepted and
/// not yet answered in full). The exec would close them, and their clients
/// would see the connection cut before their answer — a status query, or
/// the last progress lines of an upgrade that just ended. Before a re-exec
/// the keeper stops accepting control clients (new ones wait in the
/// socket's backlog, which the new image inherits) and waits until none is
/// left.
#[derive(Default)]
pub(super) struct ControlGate {
    busy: AtomicUsize,
    paused: AtomicBool,
    changed: Notify,
}

/// One conversation on the control socket; it ends when this is dropped.
pub(super) struct Conversation(Arc<ControlGate>);

impl Drop for Conversation {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

impl ControlGate {
    /// Counts a client just accepted (before anything else runs, so a
    /// re-exec cannot slip in between).
    pub(super) fn enter(self: &Arc<Self>) -> Conversation {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Conversation(self.clone())
    }

    /// Waits while a re-exec holds the control socket's clients back.
    pub(super) async fn open(&self) {
        loop {
            let changed = self.changed.notified();
            if !self.paused.load(Ordering::Relaxed) {
                return;
            }
            changed.await;
        }
    }

    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
        self.changed.notify_waiters();
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct Saved {
    format: u32,
    saved_at_ns: u128,
    command: Vec<Vec<u8>>,
    max_conns: u32,
    journal_fd: i32,
    status_fd: i32,
    client_fd: Option<i32>,
    listeners: Vec<(i32, String)>,
    conns: Vec<SavedConn>,
    waiting: Vec<u64>,
    workers: Vec<SavedWorker>,
    free_slots: Vec<u32>,
    next_slot: u32,
    next_conn: u64,
    next_worker: u32,
    generation: u32,
    next_generation: u32,
    active: Option<u32>,
    accepted: u64,
    restarts: u64,
    recovered_total: u64,
    last_recovery_us: Option<u64>,
    last_exits: Vec<String>,
    turned_away: u64,
    poisoned: u64,
    start_failures: u32,
    upgrades: u64,
    failed_upgrades: u64,
    keeper_execs: u64,
    rejuvenations: u64,
}

#[derive(Serialize, Deserialize)]
struct SavedConn {
    id: u64,
    fd: i32,
    slot: u32,
    owner: Option<u32>,
    handed: bool,
    spool_fd: Option<i32>,
    /// Held channels: (tag, fd).
    #[serde(default)]
    channels: Vec<(u32, i32)>,
    crashed: bool,
    moved: bool,
    /// Milliseconds it has waited for a worker, if it waits.
    waited_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct SavedWorker {
    id: u32,
    pid: u32,
    generation: u32,
    role: Role,
    control_fd: i32,
    greeted: bool,
    owned: usize,
    state_writes: u16,
    state_reads: (u16, u16),
    drain_left_ms: Option<u64>,
    drain_sent: bool,
    catcher: bool,
    exit_left_ms: Option<u64>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn left_ms(t: Option<Instant>) -> Option<u64> {
    t.map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64)
}

fn inherit(fd: i32, what: &str) -> Result<OwnedFd, KeeperError> {
    hf_sys::inherited::take(fd)
        .map_err(|e| KeeperError::Resume(format!("{what} (fd {fd}) did not survive the exec: {e}")))
}

/// The state a previous image of this keeper left, if this process is a
/// re-executed keeper.
pub(super) fn take_saved() -> Result<Option<Saved>, KeeperError> {
    let Some(v) = std::env::var_os(ENV_RESUME) else {
        return Ok(None);
    };
    // Workers started from here on must not see it.
    std::env::remove_var(ENV_RESUME);
    let fd: i32 = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| KeeperError::Resume(format!("{ENV_RESUME}={v:?}")))?;
    let mut f = std::fs::File::from(inherit(fd, "saved state")?);
    f.rewind()?;
    let mut buf = Vec::new();
    f.take(MAX_STATE).read_to_end(&mut buf)?;
    let saved: Saved = serde_json::from_slice(&buf)
        .map_err(|e| KeeperError::Resume(format!("saved state: {e}")))?;
    if saved.format != FORMAT {
        return Err(KeeperError::Resume(format!(
            "saved state format {} (this keeper reads {FORMAT})",
            saved.format
        )));
    }
    Ok(Some(saved))
}

impl Keeper {
    pub(super) fn reexec_requested(&mut self, client: OwnedFd) {
        if let Some(reason) = self.reexec_refused() {
            reply(&client, &self.failed(reason));
            return;
        }
        if self.reexec_to.is_some() {
            let reason = "another re-exec of the keeper is under way".to_owned();
            reply(&client, &self.failed(reason));
            return;
        }
        self.reexec_to = Some(client);
    }

    /// Before a re-exec: takes no new control-socket client and handles
    /// events until the conversations in progress have ended (or a service
    /// upgrade started, which refuses the re-exec). Returns true when the
    /// keeper is to stop.
    pub(super) async fn quiesce_control(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Event>,
    ) -> bool {
        let gate = self.control_gate.clone();
        gate.pause(true);
        let deadline = tokio::time::Instant::now() + QUIET_MAX;
        while self.upgrade.is_none() {
            let changed = gate.changed.notified();
            let busy = gate.busy.load(Ordering::Relaxed);
            if busy == 0 {
                break;
            }
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        if self.handle(ev) {
                            return true;
                        }
                        self.flush();
                    }
                    None => return true,
                },
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        clients = busy,
                        "control-socket clients still connected after {} ms; re-executing \
                         all the same (they asked for nothing yet)",
                        QUIET_MAX.as_millis()
                    );
                    break;
                }
            }
        }
        false
    }

    /// After a re-exec that did not happen: control clients are taken again.
    pub(super) fn reopen_control(&self) {
        self.control_gate.pause(false);
    }

    /// Why the keeper cannot re-execute now, if it cannot. A service upgrade
    /// is not carried across the exec (its command waits on a stream this
    /// image answers, its timers run here): while one is under way the
    /// re-exec is refused, and its client told to try again.
    fn reexec_refused(&self) -> Option<String> {
        if self.stopping() {
            return Some("the keeper is stopping".into());
        }
        self.upgrade.as_ref().map(|up| {
            format!(
                "an upgrade to generation {} is under way; try again when it ends",
                up.status().generation
            )
        })
    }

    fn failed(&self, reason: String) -> Progress {
        Progress::Failed {
            reason,
            generation: self.generation,
        }
    }

    /// Re-executes the keeper with everything it holds. Returns only if the
    /// exec failed (the keeper then goes on as it was).
    pub(super) fn reexec(&mut self) {
        let Some(client) = self.reexec_to.take() else {
            return;
        };
        // A service upgrade may have started since the request came in
        // (both in one batch of events): it keeps its answer, the re-exec
        // waits for another request.
        if let Some(reason) = self.reexec_refused() {
            reply(&client, &self.failed(reason));
            return;
        }
        // The new binary must read what this one saves: asked before
        // anything is touched, since an image that cannot resume cannot go
        // back either.
        if let Err(reason) = check_binary(&self.exe) {
            reply(&client, &self.failed(reason));
            return;
        }
        let t0 = Instant::now();
        let saved = self.save(client.as_raw_fd());
        let state = match write_state(&saved) {
            Ok(fd) => fd,
            Err(e) => {
                reply(&client, &self.failed(format!("cannot save the state: {e}")));
                return;
            }
        };
        let mut fds: Vec<BorrowedFd<'_>> = vec![
            state.as_fd(),
            client.as_fd(),
            self.journal_fd.as_fd(),
            self.status_fd.as_fd(),
        ];
        fds.extend(self.listener_fds.iter().map(|(fd, _)| fd.as_fd()));
        for h in self.conns.values() {
            fds.push(h.fd.as_fd());
            if let Some(sp) = &h.spool {
                fds.push(sp.as_fd());
            }
            fds.extend(h.channels.iter().map(|(_, ch)| ch.as_fd()));
        }
        fds.extend(self.workers.values().map(|w| w.control.as_fd()));
        let set = |flags: FdFlags| {
            fds.iter()
                .all(|fd| rustix::io::fcntl_setfd(fd, flags).is_ok())
        };
        if !set(FdFlags::empty()) {
            set(FdFlags::CLOEXEC);
            reply(
                &client,
                &self.failed("cannot pass the descriptors on".into()),
            );
            return;
        }
        tracing::info!(
            exe = %self.exe.display(),
            connections = self.conns.len(),
            workers = self.workers.len(),
            us = t0.elapsed().as_micros() as u64,
            "re-executing the keeper"
        );
        let err = Command::new(&self.exe)
            .args(std::env::args_os().skip(1))
            .env(ENV_RESUME, state.as_raw_fd().to_string())
            .exec();
        set(FdFlags::CLOEXEC);
        tracing::error!(exe = %self.exe.display(), error = %err, "keeper re-exec failed; going on as before");
        reply(
            &client,
            &self.failed(format!("cannot execute {}: {err}", self.exe.display())),
        );
    }

    fn save(&self, client_fd: i32) -> Saved {
        let now = Instant::now();
        Saved {
            format: FORMAT,
            saved_at_ns: now_ns(),
            command: self
                .cfg
                .command
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect(),
            max_conns: self.cfg.max_conns,
            journal_fd: self.journal_fd.as_raw_fd(),
            status_fd: self.status_fd.as_raw_fd(),
            client_fd: Some(client_fd),
            listeners: self
                .listener_fds
                .iter()
                .map(|(fd, n)| (fd.as_raw_fd(), n.clone()))
                .collect(),
            conns: self
                .conns
                .iter()
                .map(|(id, h)| SavedConn {
                    id: *id,
                    fd: h.fd.as_raw_fd(),
                    slot: h.slot,
                    owner: h.owner,
                    handed: h.handed,
                    spool_fd: h.spool.as_ref().map(|s| s.as_raw_fd()),
                    channels: h
                        .channels
                        .iter()
                        .map(|(tag, ch)| (*tag, ch.as_raw_fd()))
                        .collect(),
                    crashed: h.crashed,
                    moved: h.moved,
                    waited_ms: h.since.map(|t| (now - t).as_millis() as u64),
                })
                .collect(),
            waiting: self.waiting.iter().copied().collect(),
            workers: self
                .workers
                .iter()
                .map(|(id, w)| SavedWorker {
                    id: *id,
                    pid: w.pid,
                    generation: w.generation,
                    role: w.role,
                    control_fd: w.control.as_raw_fd(),
                    greeted: w.greeted,
                    owned: w.owned,
                    state_writes: w.state_writes,
                    state_reads: w.state_reads,
                    drain_left_ms: left_ms(w.drain_deadline),
                    drain_sent: w.drain_sent,
                    catcher: w.catcher,
                    exit_left_ms: left_ms(w.exit_by),
                })
                .collect(),
            free_slots: self.free_slots.clone(),
            next_slot: self.next_slot,
            next_conn: self.next_conn,
            next_worker: self.next_worker,
            generation: self.generation,
            next_generation: self.next_generation,
            active: self.active,
            accepted: self.accepted,
            restarts: self.restarts,
            recovered_total: self.recovered_total,
            last_recovery_us: self.last_recovery_us,
            last_exits: self.last_exits.iter().cloned().collect(),
            turned_away: self.turned_away,
            poisoned: self.poisoned,
            start_failures: self.start_failures,
            upgrades: self.upgrades,
            failed_upgrades: self.failed_upgrades,
            keeper_execs: self.keeper_execs,
            rejuvenations: self.rejuvenations,
        }
    }

    /// Rebuilds the keeper a previous image saved. Any descriptor that did
    /// not survive is an error: this keeper then stops, and so would the
    /// connections — which is why the exec happens only after every
    /// descriptor was checked to be passable.
    pub(super) fn resume(
        mut cfg: Config,
        saved: Saved,
    ) -> Result<(Keeper, mpsc::UnboundedReceiver<Event>), KeeperError> {
        cfg.max_conns = saved.max_conns;
        cfg.command = saved
            .command
            .iter()
            .map(|a| OsString::from_vec(a.clone()))
            .collect();
        let listeners = saved
            .listeners
            .iter()
            .map(|(fd, name)| Ok((inherit(*fd, "listener")?, name.clone())))
            .collect::<Result<Vec<_>, KeeperError>>()?;
        let status =
            std::os::unix::net::UnixListener::from(inherit(saved.status_fd, "status socket")?);
        let journal_fd = inherit(saved.journal_fd, "journal")?;
        let journal = hf_sys::shm::SharedMem::map(&journal_fd)?;
        if journal.len() < hf_journal::record_offset(saved.max_conns) {
            return Err(KeeperError::Resume("journal smaller than saved".into()));
        }
        let (mut k, rx) = Keeper::assemble(cfg, listeners, status, journal_fd, journal)?;
        let now = Instant::now();
        for c in &saved.conns {
            let fd = inherit(c.fd, "connection")?;
            let spool = c.spool_fd.map(|s| inherit(s, "spool")).transpose()?;
            let channels = c
                .channels
                .iter()
                .map(|(tag, fd)| Ok((*tag, inherit(*fd, "held channel")?)))
                .collect::<Result<Vec<_>, KeeperError>>()?;
            k.conns.insert(
                c.id,
                Held {
                    fd,
                    slot: c.slot,
                    owner: c.owner,
                    handed: c.handed,
                    since: c
                        .waited_ms
                        .map(|ms| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)),
                    spool,
                    channels,
                    crashed: c.crashed,
                    moved: c.moved,
                    // Not carried across a re-exec: a crash loop's hold
                    // time counts afresh from here.
                    lost_since: None,
                    // What a refusal restores: a connection some worker
                    // had resumes (a fresh one resumes from its first record).
                    sent_flags: if c.handed { CONN_RECOVERED } else { 0 },
                },
            );
        }
        k.live.store(k.conns.len(), Ordering::Relaxed);
        k.waiting = saved
            .waiting
            .iter()
            .copied()
            .filter(|c| k.conns.contains_key(c))
            .collect();
        let mut gone = Vec::new();
        for sw in &saved.workers {
            let control = Arc::new(inherit(sw.control_fd, "worker control socket")?);
            let watched = k.watch_worker(sw.id, sw.pid, &control);
            if let Err(e) = &watched {
                tracing::warn!(worker = sw.id, pid = sw.pid, error = %e, "worker not watchable; treating it as dead");
                gone.push(sw.id);
            }
            k.workers.insert(
                sw.id,
                Worker {
                    pid: sw.pid,
                    generation: sw.generation,
                    role: sw.role,
                    control,
                    child: None,
                    greeted: sw.greeted,
                    started: now,
                    beat: 0,
                    beat_changed: now,
                    hung: None,
                    owned: sw.owned,
                    state_writes: sw.state_writes,
                    state_reads: sw.state_reads,
                    drain_deadline: sw.drain_left_ms.map(|ms| now + Duration::from_millis(ms)),
                    drain_sent: sw.drain_sent,
                    catcher: sw.catcher,
                    exit_by: sw.exit_left_ms.map(|ms| now + Duration::from_millis(ms)),
                    room: None,
                    hello_warned: false,
                },
            );
        }
        k.free_slots = saved.free_slots;
        k.next_slot = saved.next_slot;
        k.next_conn = saved.next_conn;
        k.next_worker = saved.next_worker;
        k.generation = saved.generation;
        k.next_generation = saved.next_generation;
        k.active = saved.active.filter(|a| k.workers.contains_key(a));
        k.phase = if k.active.is_some() {
            Phase::Serving
        } else {
            Phase::Recovering
        };
        k.accepted = saved.accepted;
        k.restarts = saved.restarts;
        k.recovered_total = saved.recovered_total;
        k.last_recovery_us = saved.last_recovery_us;
        k.last_exits = saved.last_exits.into_iter().collect();
        k.turned_away = saved.turned_away;
        k.poisoned = saved.poisoned;
        k.start_failures = saved.start_failures;
        k.upgrades = saved.upgrades;
        k.failed_upgrades = saved.failed_upgrades;
        k.keeper_execs = saved.keeper_execs + 1;
        k.rejuvenations = saved.rejuvenations;
        for id in gone {
            let _ = k.tx.send(Event::Died(id));
        }
        let took_us = (now_ns().saturating_sub(saved.saved_at_ns) / 1000) as u64;
        tracing::info!(
            connections = k.conns.len(),
            workers = k.workers.len(),
            us = took_us,
            "keeper re-executed; carrying on"
        );
        if let Some(fd) = saved.client_fd {
            if let Ok(client) = inherit(fd, "upgrade client") {
                reply(
                    &client,
                    &Progress::KeeperReexecuted {
                        keeper_pid: std::process::id(),
                        connections: k.conns.len(),
                        workers: k.workers.len(),
                        us: took_us,
                    },
                );
            }
        }
        k.hand_out();
        k.ensure_workers();
        Ok((k, rx))
    }
}

/// Runs `EXE state-format` and compares its answer with [`FORMAT`].
fn check_binary(exe: &std::path::Path) -> Result<(), String> {
    let out = Command::new(exe)
        .arg("state-format")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}; nothing changed", exe.display()))?;
    let theirs = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || theirs.trim() != FORMAT.to_string() {
        return Err(format!(
            "{} reads saved-state format {:?}, this keeper writes {FORMAT}; nothing changed",
            exe.display(),
            theirs.trim()
        ));
    }
    Ok(())
}

/// Writes the saved state into a memfd that survives the exec.
fn write_state(saved: &Saved) -> std::io::Result<OwnedFd> {
    let json = serde_json::to_vec(saved).map_err(std::io::Error::other)?;
    let fd = rustix::fs::memfd_create("holdfast-keeper-state", rustix::fs::MemfdFlags::empty())?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&json)?;
    Ok(OwnedFd::from(f))
}

/// One progress line to the client of `holdfast upgrade --keeper`.
fn reply(client: &OwnedFd, p: &Progress) {
    let mut line = serde_json::to_vec(p).unwrap_or_default();
    line.push(b'\n');
    let _ = rustix::io::write(client, &line);
}

impl Keeper {
    /// Reads the worker's control socket and watches for its death.
    pub(super) fn watch_worker(
        &self,
        id: u32,
        pid: u32,
        control: &Arc<OwnedFd>,
    ) -> std::io::Result<()> {
        let pid = Pid::from_raw(pid as i32).ok_or_else(|| std::io::Error::other("bad pid"))?;
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty())?;
        let reader = hf_sys::reactor::register(control.as_fd().try_clone_to_owned()?)?;
        tokio::spawn(super::read_control(id, reader, self.tx.clone()));
        let pidfd = hf_sys::reactor::register(pidfd)?;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = pidfd.readable().await;
            let _ = tx.send(Event::Died(id));
        });
        Ok(())
    }
}
