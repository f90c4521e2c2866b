//! `holdfast status`: a snapshot of the keeper over its control socket.
//!
//! The control socket is a Unix stream socket in a directory only the owner
//! can enter, itself mode 0600. A client sends one JSON line
//! (`{"cmd":"status"}`) and reads one JSON line back; the protocol is in
//! [`crate::proto`].

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proto::{parse_reply, Request};

/// The keeper's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No worker has become ready yet; connections wait.
    Starting,
    /// An active worker serves.
    Serving,
    /// The active worker died and no standby was ready: connections are held
    /// until a new worker is.
    Recovering,
    /// Stopping on request.
    ShuttingDown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Exec'd, not yet ready.
    Starting,
    /// Ready, waiting to take over.
    Standby,
    /// Serving connections.
    Active,
    /// A new version being started by `holdfast upgrade`.
    Candidate,
    /// An older version handing its connections over at their commit
    /// points (or a retired standby); it exits once it holds none.
    Draining,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: u32,
    pub pid: u32,
    pub generation: u32,
    pub role: Role,
    pub connections: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub phase: Phase,
    pub keeper_pid: u32,
    pub listeners: Vec<String>,
    pub workers: Vec<WorkerInfo>,
    /// Connections the keeper holds (handed out or waiting).
    pub connections: usize,
    /// Connections waiting for a worker.
    pub waiting: usize,
    pub accepted: u64,
    /// Active workers that died and were replaced.
    pub restarts: u64,
    /// Connections handed to a new worker after a crash, in all.
    pub recovered_connections: u64,
    /// From noticing a worker's death to its connections handed to the
    /// successor, for the last recovery.
    pub last_recovery_us: Option<u64>,
    /// How the last workers ended (newest last).
    pub last_exits: Vec<String>,
    /// Workers in a row that died before becoming ready.
    pub start_failures: u32,
    /// When the next worker start is due, if one is being held back.
    pub next_start_in_ms: Option<u64>,
    /// Connections turned away because no worker could serve them in time.
    pub turned_away: u64,
    /// Requests refused as poison (in flight during consecutive crashes).
    pub poisoned: u64,
    /// The generation new connections go to (each upgrade adds one).
    pub generation: u32,
    /// Generations with live workers, oldest first.
    pub generations: Vec<u32>,
    /// The upgrade under way, if any.
    pub upgrade: Option<UpgradeStatus>,
    /// Upgrades completed, and upgrades rolled back or refused.
    pub upgrades: u64,
    pub failed_upgrades: u64,
    /// Times the keeper re-executed itself (`holdfast upgrade --keeper`).
    pub keeper_execs: u64,
    /// Workers replaced for their memory or age (`--max-rss`, `--max-uptime`).
    pub rejuvenations: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradePhase {
    /// The new version is starting; nothing has moved.
    Starting,
    /// The new version serves; the old one hands its connections over.
    Moving,
    /// Everything moved; the new version is watched a little longer before
    /// the old version's standbys are retired.
    Settling,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpgradeStatus {
    pub generation: u32,
    pub phase: UpgradePhase,
    pub moved: usize,
    pub total: usize,
    pub elapsed_ms: u64,
}

/// What `holdfast upgrade` asks for.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpgradeRequest {
    /// The new command; `None`: the same command again (a rebuilt binary).
    pub command: Option<Vec<String>>,
    /// How long the new version may take to become ready.
    pub ready_timeout_ms: u64,
    /// How long the old version may take to hand over its connections;
    /// after that, the rest are recovered on the new version as after a crash.
    pub drain_timeout_ms: u64,
    /// How long the new version must run without crashing before the old
    /// version's standbys are retired; a crash before that rolls back.
    pub settle_ms: u64,
}

impl UpgradeRequest {
    pub const READY_TIMEOUT_MS: u64 = 10_000;
    pub const DRAIN_TIMEOUT_MS: u64 = 10_000;
    pub const SETTLE_MS: u64 = 1_000;

    pub fn with_defaults() -> UpgradeRequest {
        UpgradeRequest {
            command: None,
            ready_timeout_ms: Self::READY_TIMEOUT_MS,
            drain_timeout_ms: Self::DRAIN_TIMEOUT_MS,
            settle_ms: Self::SETTLE_MS,
        }
    }
}

/// Progress of an upgrade, one JSON line each, streamed to `holdfast upgrade`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// The new version was started.
    Started { generation: u32, pid: u32 },
    /// It is ready and now takes new connections; `total` connections are
    /// to move from the older generations.
    /// `rollback`: whether the old version can still take everything back
    /// (false when it cannot read the state blobs the new one writes).
    Switched {
        generation: u32,
        ready_ms: u64,
        total: usize,
        rollback: bool,
    },
    /// Connections moved so far.
    Moving { moved: usize, total: usize },
    /// Done: the older generation is gone.
    Done {
        generation: u32,
        from_generation: u32,
        /// Connections handed over at a commit point.
        moved: usize,
        /// Connections still busy at the drain timeout, recovered as after a crash.
        recovered: usize,
        /// From the switch to the last connection moved.
        move_ms: u64,
        elapsed_ms: u64,
    },
    /// Nothing changed, or everything went back to `generation`.
    Failed { reason: String, generation: u32 },
    /// `holdfast upgrade --keeper`: the keeper's new image carries on with
    /// everything; `us` from saving the state to resuming it.
    KeeperReexecuted {
        keeper_pid: u32,
        connections: usize,
        workers: usize,
        us: u64,
    },
}

/// Asks the keeper at `path` for an upgrade; `on` sees each progress line.
/// Returns the last one (`Done` or `Failed`).
pub fn upgrade(
    path: &Path,
    req: &UpgradeRequest,
    on: impl FnMut(&Progress),
) -> std::io::Result<Progress> {
    let req = Request::Upgrade {
        upgrade: req.clone(),
    };
    converse(path, &req, on)
}

/// Asks the keeper at `path` to re-execute its binary, keeping everything.
pub fn upgrade_keeper(path: &Path, on: impl FnMut(&Progress)) -> std::io::Result<Progress> {
    converse(path, &Request::UpgradeKeeper, on)
}

fn converse(
    path: &Path,
    req: &Request,
    mut on: impl FnMut(&Progress),
) -> std::io::Result<Progress> {
    let mut s = crate::control::connect(path)?;
    s.write_all(req.to_line().as_bytes())?;
    for line in BufReader::new(s).lines() {
        let p: Progress = parse_reply(&line?)?;
        on(&p);
        if matches!(
            p,
            Progress::Done { .. } | Progress::Failed { .. } | Progress::KeeperReexecuted { .. }
        ) {
            return Ok(p);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the keeper closed the connection before the upgrade ended",
    ))
}

/// Asks the keeper at `path` for a snapshot.
pub fn query(path: &Path) -> std::io::Result<Snapshot> {
    let mut s = crate::control::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(Request::Status.to_line().as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    parse_reply(&line)
}
