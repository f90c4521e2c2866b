//! # hf-keeper — the process that holds on
//!
//! The keeper owns everything a crash must not take away: the listening
//! sockets, a dup of every accepted connection, the journal memfd, and the
//! workers' control sockets. It has no application logic and does no work
//! per request: in steady state it sleeps in `epoll` while workers serve.
//!
//! ```text
//!  accept ──► hand to active worker (SCM_RIGHTS, ≤253 fds a message)
//!  worker dies (pidfd readable) or hangs (heartbeat stops: kill it)
//!    ├─ read what it sent last (Closed, Spool), reap it (crash or kill?)
//!    ├─ take back its connections (the successor validates their records)
//!    ├─ hand them all to a ready standby (RECOVERED, CRASHED, + spools)
//!    └─ start a new standby 5 ms later (back-off if start-ups keep failing)
//!  no worker for too long ──► "unavailable" reply and a FIN to waiting ones
//!  worker says Closed ──► drop the dup, free the journal slot
//! ```
//!
//! Ordering constraints, and why:
//! - A connection's journal record is initialised *before* its fd leaves
//!   the keeper, so any record a worker later tears is still backed by an
//!   older valid one.
//! - The keeper keeps its dup until the worker reports `Closed` (or its
//!   successor does): if the last holder of a socket closes it with unread
//!   input, the peer gets an RST. When the keeper closes one itself, it
//!   drops the queued input first.
//! - Nothing a worker writes is trusted: the keeper reads shared memory only
//!   by copying values out (a heartbeat counter, where any change counts; a
//!   record, validated, before turning a connection away); control messages
//!   are framed and checksummed, their fd counts checked; a worker naming a
//!   connection it does not own is ignored; a malformed message gets the
//!   worker killed (and its connections recovered).
//!
//! Non-goals here: application protocols, TLS, anything per request.

#![forbid(unsafe_code)]

pub mod control;
mod keeper;
mod listen;
pub mod metrics;
pub mod proto;
pub mod status;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use keeper::run;

/// The format of the state a keeper hands to its re-executed image
/// (`holdfast upgrade --keeper`): framed, with a magic and a CRC-32C.
/// Before it execs a new binary, the keeper has it check the state it
/// saved (`holdfast state-check`), which answers this number.
pub const SAVED_STATE_FORMAT: u32 = 2;

/// The format keepers before the frame save (bare JSON), which this one
/// still reads. Such a keeper asks the new binary `holdfast state-format`
/// and execs it only if the answer is this number.
pub const UNFRAMED_STATE_FORMAT: u32 = 1;

pub use keeper::StateError;

/// Checks a saved state (the bytes of the memfd a keeper hands to its
/// re-executed image) as this build's keeper would read it on resuming.
pub fn check_saved_state(state: &[u8]) -> Result<(), StateError> {
    keeper::check_saved_state(state)
}

/// The largest saved state a keeper reads.
pub const MAX_SAVED_STATE: u64 = keeper::MAX_STATE;

/// `--max-conns` when none is given (lowered to what the open-files limit
/// allows).
pub const DEFAULT_MAX_CONNS: u32 = 65536;

/// What `holdfast run` was asked to do.
#[derive(Clone, Debug)]
pub struct Config {
    /// Addresses to bind; empty means "inherit from systemd".
    pub listen: Vec<SocketAddr>,
    /// Hot standby workers to keep ready.
    pub standby: usize,
    /// Path of the control socket (`holdfast status`).
    pub control: PathBuf,
    /// Maximum connections held at once; more wait in the listen backlog.
    pub max_conns: u32,
    /// The user asked for `max_conns` (rather than the default): lowering
    /// it to fit the open-files limit is then worth a warning.
    pub max_conns_explicit: bool,
    /// Where to serve Prometheus metrics at `/metrics` (`None`: nowhere).
    pub metrics: Option<SocketAddr>,
    /// The first worker must be ready within this long, or `holdfast run`
    /// ends with an error (`None`: wait for ever).
    pub ready_timeout: Option<std::time::Duration>,
    /// A worker whose heartbeat stops for this long is killed and recovered
    /// like a crash (`None`: no hang detection).
    pub hang_timeout: Option<std::time::Duration>,
    /// While no worker can serve, a connection waits this long for one…
    pub hold_timeout: std::time::Duration,
    /// …and at most this many wait; then they are turned away.
    pub hold_max: usize,
    /// …and the input they have queued (kernel buffers and spools) stays
    /// under this many bytes; the oldest are turned away first.
    pub hold_bytes: u64,
    /// Longest a request may run (first byte to commit) before its worker
    /// stops its heartbeat and is replaced (`None`: no deadline).
    pub request_deadline: Option<std::time::Duration>,
    /// Consecutive crashes with a request in flight after which it is
    /// poison (0: never).
    pub poison_after: u16,
    /// What a turned-away connection that has seen no answer yet receives
    /// before a clean close (the service's "unavailable" reply); `None`:
    /// just the close.
    pub unavailable: Option<Vec<u8>>,
    /// Most generations (versions) live at once during back-to-back
    /// upgrades; an upgrade beyond it is refused until the oldest finishes.
    pub max_generations: usize,
    /// Replace the active worker (a zero-loss upgrade to the same command)
    /// once its resident memory passes this many bytes…
    pub max_rss: Option<u64>,
    /// …or once it has served this long…
    pub max_uptime: Option<std::time::Duration>,
    /// …or committed this many requests.
    pub max_requests: Option<u64>,
    /// After SIGTERM, requests in flight have this long to finish; then
    /// every connection still held is closed (cleanly, with a FIN).
    pub stop_timeout: std::time::Duration,
    /// The worker command and its arguments.
    pub command: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("inherited listeners: {0}")]
    Inherit(String),
    #[error("nothing to listen on: give --listen ADDR or start under systemd socket activation")]
    NoListeners,
    #[error("no worker command given")]
    NoCommand,
    #[error("control socket {0}: {1}")]
    Control(PathBuf, std::io::Error),
    #[error("cannot resume after re-exec: {0}")]
    Resume(String),
    #[error("cannot start worker {0:?}: {1}")]
    Spawn(OsString, std::io::Error),
    #[error("{0}")]
    NeverReady(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The default control socket: `$XDG_RUNTIME_DIR/holdfast/control.sock`, or
/// `$TMPDIR/holdfast-UID/control.sock` (`/tmp` without `TMPDIR`). The keeper
/// creates that directory owner-only, and both the keeper and the client
/// refuse one that another user could change (see [`control`]).
pub fn default_control_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("holdfast").join("control.sock"),
        _ => std::env::temp_dir()
            .join(format!("holdfast-{}", rustix::process::geteuid().as_raw()))
            .join("control.sock"),
    }
}
