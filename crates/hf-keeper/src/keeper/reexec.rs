//! Keeper self-upgrade: `holdfast upgrade --keeper` re-executes the keeper's
//! binary in place. `execve` keeps the process (its pid, so the workers stay
//! its children) and every descriptor not marked close-on-exec; the state
//! that is not in the kernel — which fd is which connection, journal slot,
//! owner, generation — travels in a memfd named by the environment: JSON in
//! a frame with a magic, the format and a CRC-32C ([`encode`], [`decode`]).
//! Before the exec, the new binary checks that very state
//! (`holdfast state-check`); a state it would refuse leaves the old image
//! running with everything.
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

use super::{Counters, Event, Held, Keeper, Worker};
use crate::status::{Phase, Progress, Role};
use crate::{Config, KeeperError};
use hf_journal::wire::CONN_RECOVERED;

/// Names the memfd with the saved state in the re-executed keeper's environment.
const ENV_RESUME: &str = "HOLDFAST_KEEPER_STATE_FD";
/// Saved-state format; a keeper refuses a format it does not know.
const FORMAT: u32 = crate::SAVED_STATE_FORMAT;
/// The saved state is small (a few hundred bytes per connection); anything
/// larger than this is not ours.
pub(crate) const MAX_STATE: u64 = 256 << 20;

/// The saved state is framed like the journal's records: a magic, the
/// format, the payload's length and a CRC-32C of all that and the payload,
/// then the payload (JSON of [`Saved`]). A state that is not framed so, is
/// cut short or fails its checksum is refused before anything of it is used.
const MAGIC: [u8; 8] = *b"HFKEEPST";
/// Magic (8), format (4), payload length (8), CRC-32C (4); little-endian.
const HEADER: usize = 24;

/// Why a saved state was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("saved state cut short: {have} bytes, the frame says {need}")]
    Truncated { have: usize, need: usize },
    #[error("not a saved keeper state (no holdfast magic)")]
    Magic,
    #[error(
        "saved state format {found}: this keeper reads {FORMAT} (and unframed {})",
        crate::UNFRAMED_STATE_FORMAT
    )]
    Format { found: u32 },
    #[error("saved state of {0} bytes: larger than any keeper saves")]
    TooLarge(u64),
    #[error("saved state corrupt: CRC-32C {found:08x}, expected {expected:08x}")]
    Checksum { found: u32, expected: u32 },
    #[error("saved state unreadable: {0}")]
    Payload(String),
}

/// Frames `saved` for the next image.
pub(crate) fn encode(saved: &Saved) -> Vec<u8> {
    let json = serde_json::to_vec(saved).expect("the saved state serialises");
    let mut out = Vec::with_capacity(HEADER + json.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), &json);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Reads a state framed by [`encode`] — or, unframed, the JSON of format 1
/// that keepers before the frame save, so that `holdfast upgrade --keeper`
/// from such a keeper carries on.
pub(crate) fn decode(buf: &[u8]) -> Result<Saved, StateError> {
    let payload = |json: &[u8]| {
        serde_json::from_slice::<Saved>(json).map_err(|e| StateError::Payload(e.to_string()))
    };
    if buf.first() == Some(&b'{') {
        let saved = payload(buf)?;
        if saved.format != crate::UNFRAMED_STATE_FORMAT {
            return Err(StateError::Format {
                found: saved.format,
            });
        }
        return Ok(saved);
    }
    if buf.len() < HEADER {
        if !MAGIC.starts_with(&buf[..buf.len().min(MAGIC.len())]) {
            return Err(StateError::Magic);
        }
        return Err(StateError::Truncated {
            have: buf.len(),
            need: HEADER,
        });
    }
    let (head, body) = buf.split_at(HEADER);
    if head[..8] != MAGIC {
        return Err(StateError::Magic);
    }
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
    let format = u32_at(8);
    if format != FORMAT {
        return Err(StateError::Format { found: format });
    }
    let len = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
    if len > MAX_STATE {
        return Err(StateError::TooLarge(len));
    }
    let len = len as usize;
    if body.len() < len {
        return Err(StateError::Truncated {
            have: buf.len(),
            need: HEADER + len,
        });
    }
    if body.len() > len {
        return Err(StateError::Payload(format!(
            "{} bytes after the end of the frame",
            body.len() - len
        )));
    }
    let expected = u32_at(20);
    let found = crc32c::crc32c_append(crc32c::crc32c(&head[..20]), body);
    if found != expected {
        return Err(StateError::Checksum { found, expected });
    }
    let saved = payload(body)?;
    if saved.format != FORMAT {
        return Err(StateError::Format {
            found: saved.format,
        });
    }
    Ok(saved)
}
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
    /// The counters, at the top level of the JSON as in format 1.
    #[serde(flatten)]
    count: Counters,
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
    f.take(MAX_STATE + HEADER as u64).read_to_end(&mut buf)?;
    decode(&buf)
        .map(Some)
        .map_err(|e| KeeperError::Resume(e.to_string()))
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
        let t0 = Instant::now();
        let saved = encode(&self.save(client.as_raw_fd()));
        let state = match write_state(&saved) {
            Ok(fd) => fd,
            Err(e) => {
                reply(&client, &self.failed(format!("cannot save the state: {e}")));
                return;
            }
        };
        // The new binary must read what this one saved, as saved: asked
        // before anything is touched, since an image that cannot resume
        // cannot go back either.
        if let Err(reason) = check_binary(&self.exe, &state) {
            reply(&client, &self.failed(reason));
            return;
        }
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
            count: self.count.clone(),
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
        k.count = saved.count;
        k.count.keeper_execs += 1;
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

/// Runs `EXE state-check` on the saved state (its standard input): the
/// new binary decodes it as its resumed image would, and answers the
/// format it reads. Anything but [`FORMAT`] and success is a refusal.
fn check_binary(exe: &std::path::Path, state: &OwnedFd) -> Result<(), String> {
    let input = state
        .try_clone()
        .map(std::fs::File::from)
        .and_then(|mut f| f.rewind().map(|()| f))
        .map_err(|e| format!("cannot read the saved state back: {e}; nothing changed"))?;
    let out = Command::new(exe)
        .arg("state-check")
        .stdin(input)
        .output()
        .map_err(|e| format!("cannot run {}: {e}; nothing changed", exe.display()))?;
    let theirs = String::from_utf8_lossy(&out.stdout);
    if theirs.trim() != FORMAT.to_string() {
        return Err(format!(
            "{} reads saved-state format {:?}, this keeper writes {FORMAT}; nothing changed",
            exe.display(),
            theirs.trim()
        ));
    }
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{} refuses the saved state: {}; nothing changed",
            exe.display(),
            why.trim()
        ));
    }
    Ok(())
}

/// Checks a saved state as a re-executed keeper would read it
/// (`holdfast state-check`).
pub(crate) fn check(buf: &[u8]) -> Result<(), StateError> {
    decode(buf).map(|_| ())
}

/// Writes the saved state into a memfd that survives the exec.
fn write_state(saved: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("holdfast-keeper-state", rustix::fs::MemfdFlags::empty())?;
    let mut f = std::fs::File::from(fd);
    f.write_all(saved)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Saved {
        Saved {
            format: FORMAT,
            saved_at_ns: 1_700_000_000_123_456_789,
            command: vec![b"/srv/app".to_vec(), b"--flag".to_vec()],
            max_conns: 1024,
            journal_fd: 5,
            status_fd: 6,
            client_fd: Some(7),
            listeners: vec![(8, "127.0.0.1:8080".into())],
            conns: vec![SavedConn {
                id: 42,
                fd: 9,
                slot: 3,
                owner: Some(2),
                handed: true,
                spool_fd: Some(10),
                channels: vec![(1, 11)],
                crashed: false,
                moved: true,
                waited_ms: None,
            }],
            waiting: vec![42],
            workers: vec![SavedWorker {
                id: 2,
                pid: 4242,
                generation: 1,
                role: Role::Active,
                control_fd: 12,
                greeted: true,
                owned: 1,
                state_writes: 1,
                state_reads: (1, 1),
                drain_left_ms: None,
                drain_sent: false,
                catcher: false,
                exit_left_ms: Some(250),
            }],
            free_slots: vec![0, 1],
            next_slot: 4,
            next_conn: 43,
            next_worker: 3,
            generation: 1,
            next_generation: 2,
            active: Some(2),
            count: Counters {
                accepted: 43,
                restarts: 1,
                recovered_total: 5,
                last_recovery_us: Some(900),
                last_exits: ["worker 1 (pid 4000) killed by SIGKILL".to_owned()].into(),
                turned_away: 0,
                poisoned: 0,
                start_failures: 0,
                upgrades: 2,
                failed_upgrades: 1,
                keeper_execs: 3,
                rejuvenations: 0,
            },
        }
    }

    /// The state as JSON, to compare two states (`Saved` is not `PartialEq`).
    fn json(s: &Saved) -> serde_json::Value {
        serde_json::to_value(s).unwrap()
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let buf = encode(&s);
        assert_eq!(&buf[..8], b"HFKEEPST");
        assert_eq!(json(&decode(&buf).unwrap()), json(&s));
        check(&buf).unwrap();
    }

    #[test]
    fn every_corrupted_byte_is_refused() {
        let buf = encode(&sample());
        for i in 0..buf.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = buf.clone();
                bad[i] ^= bit;
                let e = decode(&bad)
                    .err()
                    .unwrap_or_else(|| panic!("byte {i} ^ {bit:#x} accepted"));
                match i {
                    0..=7 => assert_eq!(e, StateError::Magic, "byte {i}"),
                    8..=11 => assert!(matches!(e, StateError::Format { .. }), "byte {i}: {e}"),
                    // A length off by a bit: too large, or the frame ends
                    // before or after the buffer does.
                    12..=19 => assert!(
                        matches!(
                            e,
                            StateError::Truncated { .. }
                                | StateError::TooLarge(_)
                                | StateError::Payload(_)
                        ),
                        "byte {i}: {e}"
                    ),
                    _ => assert!(matches!(e, StateError::Checksum { .. }), "byte {i}: {e}"),
                }
            }
        }
        let mut bad = buf.clone();
        bad[HEADER + 10] ^= 4;
        let e = decode(&bad).err().unwrap();
        assert!(
            e.to_string().starts_with("saved state corrupt: CRC-32C"),
            "{e}"
        );
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut buf = encode(&sample());
        buf[..8].copy_from_slice(b"HFJOURNL");
        assert_eq!(decode(&buf).err(), Some(StateError::Magic));
        assert_eq!(
            decode(b"").err(),
            Some(StateError::Truncated {
                have: 0,
                need: HEADER
            })
        );
        assert_eq!(decode(b"\x7fELF\x02\x01").err(), Some(StateError::Magic));
        assert_eq!(
            decode(b"not a state at all, not even close to one").err(),
            Some(StateError::Magic)
        );
    }

    #[test]
    fn truncated_is_refused() {
        let buf = encode(&sample());
        for n in [1, 8, HEADER - 1, HEADER, HEADER + 1, buf.len() - 1] {
            let e = decode(&buf[..n]).err().unwrap();
            assert!(
                matches!(e, StateError::Truncated { have, .. } if have == n),
                "{n} bytes: {e}"
            );
        }
        // Bytes after the frame: not ours either.
        let mut long = buf.clone();
        long.push(b' ');
        assert!(matches!(decode(&long), Err(StateError::Payload(_))));
    }

    #[test]
    fn future_format_is_refused() {
        let mut s = sample();
        s.format = FORMAT + 1;
        let json = serde_json::to_vec(&s).unwrap();
        // Framed as a later build would frame it (same layout, new number).
        let mut buf = Vec::new();
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&(FORMAT + 1).to_le_bytes());
        buf.extend_from_slice(&(json.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf), &json);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf.extend_from_slice(&json);
        let e = decode(&buf).err().unwrap();
        assert_eq!(e, StateError::Format { found: FORMAT + 1 });
        assert!(e.to_string().contains("this keeper reads 2"), "{e}");
        // A frame that says one format and holds another.
        let mut s = sample();
        s.format = 7;
        let mut buf = encode(&s);
        assert_eq!(decode(&buf).err(), Some(StateError::Format { found: 7 }));
        // An unframed state claiming a later format.
        buf = serde_json::to_vec(&s).unwrap();
        assert_eq!(decode(&buf).err(), Some(StateError::Format { found: 7 }));
    }

    /// What a keeper of format 1 (bare JSON, before the frame) saved, as it
    /// saved it: still read, so `holdfast upgrade --keeper` from such a
    /// keeper to this build carries everything on.
    const FORMAT_1: &str = r#"{"format":1,"saved_at_ns":1700000000123456789,"command":[[47,115,114,118,47,97,112,112]],"max_conns":1024,"journal_fd":5,"status_fd":6,"client_fd":7,"listeners":[[8,"127.0.0.1:8080"]],"conns":[{"id":42,"fd":9,"slot":3,"owner":2,"handed":true,"spool_fd":null,"channels":[],"crashed":false,"moved":false,"waited_ms":null}],"waiting":[],"workers":[{"id":2,"pid":4242,"generation":1,"role":"active","control_fd":12,"greeted":true,"owned":1,"state_writes":1,"state_reads":[1,1],"drain_left_ms":null,"drain_sent":false,"catcher":false,"exit_left_ms":null}],"free_slots":[],"next_slot":4,"next_conn":43,"next_worker":3,"generation":1,"next_generation":2,"active":2,"accepted":43,"restarts":1,"recovered_total":5,"last_recovery_us":900,"last_exits":["worker 1 (pid 4000) killed by SIGKILL"],"turned_away":0,"poisoned":0,"start_failures":0,"upgrades":2,"failed_upgrades":1,"keeper_execs":3,"rejuvenations":0}"#;

    #[test]
    fn unframed_format_1_is_still_read() {
        let s = decode(FORMAT_1.as_bytes()).unwrap();
        assert_eq!(s.format, 1);
        assert_eq!((s.conns.len(), s.workers.len(), s.active), (1, 1, Some(2)));
        assert_eq!(s.count.accepted, 43);
        assert_eq!(s.count.keeper_execs, 3);
        assert_eq!(s.count.last_exits.len(), 1);
        assert_eq!(s.listeners, vec![(8, "127.0.0.1:8080".to_owned())]);
        // Cut short, it is refused like any other.
        let e = decode(&FORMAT_1.as_bytes()[..100]).err().unwrap();
        assert!(matches!(e, StateError::Payload(_)), "{e}");
    }

    proptest::proptest! {
        /// Whatever the bytes, the decoder answers; it never panics.
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(&bytes);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed);
        }

        /// A valid frame with any byte changed is refused.
        #[test]
        fn any_flip_is_refused(i in 0usize..4096, bit in 0u8..8) {
            let buf = encode(&sample());
            let i = i % buf.len();
            let mut bad = buf.clone();
            bad[i] ^= 1 << bit;
            proptest::prop_assert!(decode(&bad).is_err());
        }
    }
}
