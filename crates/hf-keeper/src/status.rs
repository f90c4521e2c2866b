//! `holdfast status`: a snapshot of the keeper over its control socket.
//!
//! The control socket is a Unix stream socket in a directory only the owner
//! can enter, itself mode 0600. A client sends one JSON line
//! (`{"cmd":"status"}`) and reads one JSON line back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    pub cmd: String,
}

/// Asks the keeper at `path` for a snapshot.
pub fn query(path: &Path) -> std::io::Result<Snapshot> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"{\"cmd\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
