//! # holdfast — connections that outlive the process serving them
//!
//! A service built on this library can be killed at any instant (SIGKILL, a
//! panic, an OOM kill) and its clients see only a short stall: no reset, no
//! lost byte, no duplicated byte. The `holdfast run` keeper owns the
//! listening sockets, accepts every connection, keeps a dup of it, and hands
//! it to a worker — this process — over a control socket. When the worker
//! dies, a hot standby already started and initialised receives the same
//! connections and carries on.
//!
//! ## The model
//!
//! A connection is two byte streams and a sequence of *commit points*.
//! Between two commits the service reads some input and writes the output
//! that input produces. [`Conn::commit`] (or
//! [`tokio::Conn::commit`](crate::tokio::Conn::commit)) says: these many
//! input bytes are done with, the output so far is their whole answer, and
//! here is a small *state blob* a new worker needs to carry on (an FTP
//! login, a file offset; nothing for a plain HTTP server).
//!
//! After a crash the new worker gets the connection back with that state
//! blob. Every input byte since the last commit is still in the kernel's
//! receive queue (this library peeks instead of reading), so the service
//! simply reads and answers it again. The output it regenerates is compared
//! with what the client already has — the kernel knows exactly how many bytes
//! went out — and only the missing tail is sent.
//!
//! ## What the service must do
//!
//! - Use [`Listener`] / [`Conn`] (or the [`tokio`] flavour) for its
//!   connections and call `commit` at request boundaries.
//! - Answer the same input with the same bytes. Values that differ from run to
//!   run (the time in a `Date` header, a random id) go through
//!   [`Conn::record`] / [`Conn::now`], which return on replay what they
//!   returned the first time. A response that still comes out different is
//!   detected by checksum, logged, and that one connection is closed cleanly;
//!   two different responses are never spliced.
//! - Create the listener after initialising: that is when the keeper counts
//!   the worker as ready to take over.
//!
//! ## Guarantees and limits
//!
//! - Input: every byte a client sent reaches a worker; a request cut short by
//!   a crash is read again from the last commit.
//! - Output: the client receives exactly one crash-free run's bytes.
//! - Side effects outside the connection (files, databases, upstream
//!   servers) happen **at least once** by default: a request replayed after
//!   a crash runs again. For work that must not run twice, declare a
//!   [`ReplayPolicy`] before doing it, or make it resumable: hold the
//!   channels it uses ([`Conn::hold`], [`held`]) and record its progress in
//!   the state blob, so the next worker continues it instead (exactly once;
//!   `hf-httpd`'s CGI support does this for programs it runs).
//! - Input a service holds uncommitted beyond 64 KiB moves to a spool (a
//!   memfd the keeper holds) so the client's window stays open; up to 64 MiB
//!   may be uncommitted — larger uploads are committed piecewise with their
//!   progress in the state blob.
//! - A request in flight during two consecutive crashes of its worker is
//!   flagged ([`Conn::poisoned`]): answer it with an error, don't run it.
//! - The tokio flavour keeps a heartbeat in the journal, so a keeper run
//!   with `--hang-timeout` replaces a worker whose runtime stops.
//! - No TLS.
//!
//! ## Upgrades
//!
//! `holdfast upgrade` starts a new version of the service next to this one
//! and then asks this worker to *drain*: each connection is handed back to the
//! keeper at its next commit point (an idle one at once) and the new version
//! resumes it from its journal record and state blob. The service sees a
//! handed-back connection read as end of input (a read in the middle of a
//! request, and writes, fail with `ConnectionAborted`), so the code that
//! handles a client leaving handles this too; [`Conn::moved`] tells them
//! apart. A request that has been read is answered here before the
//! connection goes, so it never runs twice. Keep calling `accept`: that is
//! where the keeper's requests arrive, and it returns `None` when this worker
//! holds nothing more and may exit.
//!
//! A state blob carries a schema version. Declare the one this build writes
//! and the ones it reads with [`Options`] (`Listener::bind_with`); the keeper
//! refuses an upgrade to a build that cannot read the versions in use before
//! anything moves.
//!
//! ## Pass-through
//!
//! Started without a keeper (no `HOLDFAST_*` environment), the same API binds
//! its own listeners and uses plain reads and writes: the same binary runs
//! with and without holdfast, which is also how the overhead is measured.

#![forbid(unsafe_code)]

pub mod blob;
mod blocking;
#[doc = include_str!("../../../docs/guide.md")]
pub mod guide {}
mod core;
pub mod held;
pub mod shared;
#[cfg(feature = "tokio")]
pub mod tokio;
mod worker;

pub use blocking::{Conn, Listener};
pub use worker::{Identity, ENV_CONTROL_FD, ENV_JOURNAL_FD};

/// The state blob limit of one connection (bytes).
pub const MAX_STATE: usize = hf_journal::record::MAX_STATE;

/// What a service declares about itself when it binds.
///
/// ```
/// // This build writes version 2 of its state blob and still reads
/// // version 1 (written by the build it replaces).
/// let opts = holdfast::Options::new().state_version(2).reads_state_versions(1..=2);
/// # let _ = opts;
/// ```
#[derive(Clone, Debug)]
pub struct Options {
    pub(crate) state_version: u16,
    pub(crate) reads_state: (u16, u16),
}

impl Default for Options {
    fn default() -> Options {
        Options {
            state_version: 1,
            reads_state: (1, 1),
        }
    }
}

impl Options {
    pub fn new() -> Options {
        Options::default()
    }

    /// The schema version of the state blobs `commit` saves (default 1).
    /// Widens the readable range to include it.
    pub fn state_version(mut self, v: u16) -> Options {
        self.state_version = v;
        self.reads_state = (self.reads_state.0.min(v), self.reads_state.1.max(v));
        self
    }

    /// The state blob versions this build can read ([`Conn::state`] says which
    /// one a connection carries); by default only its own. During
    /// `holdfast upgrade` connections move to the new build with their blobs,
    /// so the keeper refuses an upgrade to a build that cannot read the
    /// versions in use before anything moves.
    pub fn reads_state_versions(mut self, r: std::ops::RangeInclusive<u16>) -> Options {
        self.reads_state = (*r.start(), *r.end());
        self
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        let (lo, hi) = self.reads_state;
        if lo > hi || !(lo..=hi).contains(&self.state_version) {
            return Err(Error::Options(format!(
                "reads state versions {lo}..={hi} but writes version {}",
                self.state_version
            )));
        }
        Ok(())
    }
}

/// What a new worker does with the request in flight when this one dies
/// before the request's commit ([`Conn::replay_policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReplayPolicy {
    /// Run it again (the default): right for requests whose effects are
    /// idempotent or confined to the connection.
    #[default]
    Replay,
    /// Do not run it again: the new worker sees [`Conn::poisoned`] and
    /// answers it with the service's error (an HTTP 503, an FTP 451). If
    /// part of the answer was already out, the connection is closed
    /// instead, as an error cannot follow it.
    Error,
    /// Do not run it again: the new worker closes the connection cleanly
    /// (the client sees the connection end, never a reset).
    Close,
}

/// How the process is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Started by `holdfast run`: connections survive this process.
    Kept(Identity),
    /// Started on its own: plain sockets, nothing survives.
    PassThrough,
}

/// Errors of the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad holdfast environment: {0}")]
    Environment(String),
    #[error("the keeper went away")]
    KeeperGone,
    #[error("control protocol: {0}")]
    Protocol(String),
    #[error("no address to listen on (pass-through mode needs at least one)")]
    NoAddress,
    #[error("bad options: {0}")]
    Options(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<rustix::io::Errno> for Error {
    fn from(e: rustix::io::Errno) -> Error {
        Error::Io(e.into())
    }
}

/// Seconds since the epoch, as an 8-byte little-endian value, for recording.
pub(crate) fn now_bytes() -> [u8; 8] {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_le_bytes()
}
