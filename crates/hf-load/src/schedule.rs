//! What is done to the server while the load runs — SIGKILL its active
//! worker, `holdfast upgrade` it — and the log that puts those events,
//! stalls and failures on one time line (µs since the start).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hf_keeper::status::{self, Role};

use crate::Error;

/// Something done to the server, at `t_us` µs since the start.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Event {
    pub t_us: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// SIGKILL sent to the active worker (`t_us`: just before the signal).
    Kill { pid: u32, generation: u32 },
    /// A kill was due but there was nothing to kill (no active worker, the
    /// keeper did not answer, the worker was already gone).
    KillMissed { reason: String },
    /// `holdfast upgrade` number `n` started.
    UpgradeStart { n: u32 },
    /// It ended: `outcome` is `done` (exit 0 with a `done` progress line),
    /// `failed` (the keeper refused or rolled back: `reason`), `error` (the
    /// command failed otherwise) or `abandoned` (still running long after
    /// the load ended; killed).
    UpgradeEnd {
        n: u32,
        outcome: String,
        ms: u64,
        exit_code: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The command's last progress line (`holdfast upgrade --json`).
        #[serde(skip_serializing_if = "Option::is_none")]
        progress: Option<serde_json::Value>,
    },
}

impl EventKind {
    pub fn label(&self) -> String {
        match self {
            EventKind::Kill { pid, generation } => {
                format!("kill pid {pid} (generation {generation})")
            }
            EventKind::KillMissed { reason } => format!("kill missed: {reason}"),
            EventKind::UpgradeStart { n } => format!("upgrade {n} starts"),
            EventKind::UpgradeEnd {
                n,
                outcome,
                ms,
                reason,
                ..
            } => match reason {
                Some(r) => format!("upgrade {n} {outcome} after {ms} ms: {r}"),
                None => format!("upgrade {n} {outcome} after {ms} ms"),
            },
        }
    }
}

/// The time line: events kept for the report, and every line (events,
/// stalls, failures) written to the events file if there is one.
pub(crate) struct EventLog {
    t0: Instant,
    file: Mutex<Option<(PathBuf, BufWriter<File>)>>,
    write_error: Mutex<Option<String>>,
    events: Mutex<Vec<Event>>,
}

impl EventLog {
    pub fn open(path: Option<&Path>, t0: Instant) -> Result<EventLog, Error> {
        let file = match path {
            Some(p) => {
                let f = File::create(p)
                    .map_err(|e| Error::io(format!("--events {}", p.display()), e))?;
                Some((p.to_owned(), BufWriter::new(f)))
            }
            None => None,
        };
        Ok(EventLog {
            t0,
            file: Mutex::new(file),
            write_error: Mutex::new(None),
            events: Mutex::new(Vec::new()),
        })
    }

    /// µs from the start to `t`.
    pub fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_micros() as u64
    }

    /// Writes one JSON line to the file (if any). Schedule events are
    /// flushed at once, so `tail -f` shows them as they happen.
    fn write(&self, line: &str, flush: bool) {
        let mut g = self.file.lock().expect("events file");
        let Some((path, w)) = g.as_mut() else { return };
        let r = w
            .write_all(line.as_bytes())
            .and_then(|()| w.write_all(b"\n"))
            .and_then(|()| if flush { w.flush() } else { Ok(()) });
        if let Err(e) = r {
            let msg = format!("writing {}: {e}", path.display());
            *g = None;
            *self.write_error.lock().expect("events error") = Some(msg);
        }
    }

    /// Writes `rec` (a struct) as `{"event": kind, ...its fields}`: the
    /// kind first, so the file reads well line by line.
    pub fn record_line(&self, kind: &str, rec: &impl serde::Serialize) {
        if self.file.lock().expect("events file").is_none() {
            return;
        }
        let Ok(body) = serde_json::to_string(rec) else {
            return;
        };
        let fields = body.strip_prefix('{').unwrap_or("}");
        let sep = if fields == "}" { "" } else { "," };
        self.write(
            &format!("{{\"event\":{}{sep}{fields}", serde_json::Value::from(kind)),
            kind != "stall" && kind != "failure",
        );
    }

    /// Records a schedule event that happened at `at`.
    pub fn event(&self, at: Instant, kind: EventKind) {
        let ev = Event {
            t_us: self.us(at),
            kind,
        };
        if let Ok(line) = serde_json::to_string(&ev) {
            self.write(&line, true);
        }
        self.events.lock().expect("events").push(ev);
    }

    /// The events so far, in time order.
    pub fn events(&self) -> Vec<Event> {
        let mut v = self.events.lock().expect("events").clone();
        v.sort_by_key(|e| e.t_us);
        v
    }

    /// Flushes the file; an error if any write to it failed.
    pub fn finish(&self) -> Result<(), Error> {
        if let Some((path, w)) = self.file.lock().expect("events file").as_mut() {
            w.flush()
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        match self.write_error.lock().expect("events error").take() {
            Some(e) => Err(Error::Setup(e)),
            None => Ok(()),
        }
    }
}

/// Whether the keeper at `control` answers and serves `addr` — so a kill
/// schedule cannot hit the workers of some other service than the one
/// being loaded.
pub(crate) fn check_keeper(control: &Path, addr: SocketAddr) -> Result<(), Error> {
    let snap = status::query(control).map_err(|e| {
        Error::Setup(format!(
            "no keeper answers at {} ({e}); is `holdfast run` running, with this --control?",
            control.display()
        ))
    })?;
    let serves = snap
        .listeners
        .iter()
        .any(|l| match l.parse::<SocketAddr>() {
            Ok(l) => l.port() == addr.port() && (l.ip() == addr.ip() || l.ip().is_unspecified()),
            Err(_) => false,
        });
    if !serves {
        return Err(Error::Setup(format!(
            "the keeper at {} listens on {}, not on {addr}: refusing to kill or upgrade the \
             workers of a service this load does not target",
            control.display(),
            if snap.listeners.is_empty() {
                "nothing".to_owned()
            } else {
                snap.listeners.join(", ")
            }
        )));
    }
    Ok(())
}

/// The `holdfast` binary: `explicit` if given; else the one next to this
/// executable, or in its parent directory (a test binary in
/// `target/<profile>/deps`); else `holdfast` on PATH.
pub(crate) fn find_holdfast(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let on_path = |name: &Path| -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    if let Some(p) = explicit {
        if p.components().count() == 1 && !p.is_file() {
            if let Some(found) = on_path(p) {
                return Ok(found);
            }
        }
        if p.is_file() {
            return Ok(p.to_owned());
        }
        return Err(Error::Setup(format!(
            "--holdfast {}: no such file",
            p.display()
        )));
    }
    let exe = std::env::current_exe().ok();
    let near = exe.iter().flat_map(|e| {
        let dir = e.parent();
        [
            dir.map(|d| d.join("holdfast")),
            dir.and_then(Path::parent).map(|d| d.join("holdfast")),
        ]
    });
    for p in near.flatten() {
        if p.is_file() {
            return Ok(p);
        }
    }
    on_path(Path::new("holdfast")).ok_or_else(|| {
        Error::Setup(
            "no `holdfast` binary next to hf-load or on PATH for the upgrade schedule; \
             give --holdfast PATH"
                .into(),
        )
    })
}

/// Sleeps until `due`, waking early if `stop` is set.
fn sleep_until(due: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= due || stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep((due - now).min(Duration::from_millis(50)));
    }
}

/// SIGKILLs the active worker at every multiple of `every` before the
/// deadline (drift-free: a slow status query does not push the next kill).
pub(crate) fn kills(
    log: &EventLog,
    control: &Path,
    every: Duration,
    deadline: Instant,
    stop: &AtomicBool,
) {
    let t0 = log.t0;
    for k in 1u32.. {
        let due = t0 + every * k;
        if due >= deadline {
            return;
        }
        sleep_until(due, stop);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let snap = match status::query(control) {
            Ok(s) => s,
            Err(e) => {
                log.event(
                    Instant::now(),
                    EventKind::KillMissed {
                        reason: format!("no status from {}: {e}", control.display()),
                    },
                );
                continue;
            }
        };
        let Some(w) = snap.workers.iter().find(|w| w.role == Role::Active) else {
            log.event(
                Instant::now(),
                EventKind::KillMissed {
                    reason: format!("no active worker (phase {:?})", snap.phase),
                },
            );
            continue;
        };
        let Some(pid) = rustix::process::Pid::from_raw(w.pid as i32) else {
            continue;
        };
        let at = Instant::now();
        match rustix::process::kill_process(pid, rustix::process::Signal::KILL) {
            Ok(()) => log.event(
                at,
                EventKind::Kill {
                    pid: w.pid,
                    generation: w.generation,
                },
            ),
            Err(e) => log.event(
                at,
                EventKind::KillMissed {
                    reason: format!("kill {}: {e}", w.pid),
                },
            ),
        }
    }
}

/// How long an upgrade still running at the end of the load is waited for
/// before it is killed (`holdfast upgrade` has its own ready, drain and
/// settle timeouts; this is only a bound on them).
const UPGRADE_GRACE: Duration = Duration::from_secs(30);

/// Runs `holdfast upgrade` at every multiple of `every` before the
/// deadline, one at a time.
pub(crate) fn upgrades(
    log: &EventLog,
    holdfast: &Path,
    control: &Path,
    args: &[String],
    every: Duration,
    deadline: Instant,
    stop: &AtomicBool,
) {
    let t0 = log.t0;
    for n in 1u32.. {
        let due = t0 + every * n;
        if due >= deadline {
            return;
        }
        sleep_until(due, stop);
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            return;
        }
        let started = Instant::now();
        log.event(started, EventKind::UpgradeStart { n });
        let end = upgrade_once(
            holdfast,
            control,
            args,
            n,
            started,
            deadline + UPGRADE_GRACE,
        );
        log.event(Instant::now(), end);
    }
}

fn upgrade_once(
    holdfast: &Path,
    control: &Path,
    args: &[String],
    n: u32,
    started: Instant,
    kill_at: Instant,
) -> EventKind {
    let ms = || started.elapsed().as_millis() as u64;
    let error = |reason: String, exit_code: Option<i32>| EventKind::UpgradeEnd {
        n,
        outcome: "error".into(),
        ms: ms(),
        exit_code,
        reason: Some(reason),
        progress: None,
    };
    let mut child = match Command::new(holdfast)
        .arg("upgrade")
        .arg("--control")
        .arg(control)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return error(format!("starting {}: {e}", holdfast.display()), None),
    };
    // Drain both pipes while it runs: progress lines can be many.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= kill_at => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return error(format!("waiting for holdfast upgrade: {e}"), None),
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    let progress: Option<serde_json::Value> = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok());
    let Some(status) = status else {
        return EventKind::UpgradeEnd {
            n,
            outcome: "abandoned".into(),
            ms: ms(),
            exit_code: None,
            reason: Some(format!(
                "still running {} s after the load ended; killed",
                UPGRADE_GRACE.as_secs()
            )),
            progress,
        };
    };
    let last = progress
        .as_ref()
        .and_then(|p| p.get("event"))
        .and_then(|e| e.as_str())
        .map(str::to_owned);
    let (outcome, reason) = match (status.code(), last.as_deref()) {
        (Some(0), Some("done" | "keeper_reexecuted")) => ("done", None),
        (_, Some("failed")) => (
            "failed",
            progress
                .as_ref()
                .and_then(|p| p.get("reason"))
                .and_then(|r| r.as_str())
                .map(str::to_owned),
        ),
        _ => {
            let tail = err.trim();
            let tail = if tail.is_empty() {
                format!("exit {status} without a done line")
            } else {
                tail.lines().last().unwrap_or(tail).to_owned()
            };
            ("error", Some(tail))
        }
    };
    EventKind::UpgradeEnd {
        n,
        outcome: outcome.into(),
        ms: ms(),
        exit_code: status.code(),
        reason,
        progress,
    }
}
