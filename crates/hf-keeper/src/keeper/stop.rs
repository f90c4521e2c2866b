//! Stopping without a reset: what `SIGTERM` (`systemctl stop`) does.
//!
//! ```text
//!  SIGTERM ──► take what the listen backlog holds, close the listeners
//!    │          (new connections are refused; under socket activation
//!    │          systemd keeps the sockets, and they queue for the next start)
//!    ├─ every worker is told to Stop: requests in flight run to their
//!    │   answer; each connection is handed back once idle (at a commit
//!    │   point, no input waiting)
//!    ├─ handed back idle ──► committed input dropped, FIN, then the keeper
//!    │   lingers (dropping what still arrives) until the client closes too
//!    ├─ handed back with a request that arrived meanwhile ──► back to the
//!    │   worker, which answers it
//!    ├─ no connection left ──► workers exit, the keeper exits 0
//!    └─ --stop-timeout, a second SIGTERM, or SIGINT ──► workers stop, every
//!        connection still held is closed the same clean way, exit 0
//! ```
//!
//! Closing a socket whose receive queue is not empty sends an RST, and so
//! does a socket closed before data the client sent reaches it: both are
//! avoided by dropping the input first and closing only after the client's
//! own FIN (or [`LINGER`]).

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hf_journal::record::RECORD_SIZE;
use hf_journal::wire::Msg;
use rustix::net::SocketFlags;

use super::{journal_offset, send_msg, Keeper};
use crate::status::Role;

/// How long a closed connection is kept after its FIN while the client has
/// not closed its side: a request it sent before the FIN reached it is
/// dropped quietly meanwhile, instead of drawing an RST.
const LINGER: Duration = Duration::from_secs(2);

/// A stop under way (the first `SIGTERM`).
pub(super) struct Stopping {
    /// When the connections still busy are closed anyway.
    deadline: Instant,
    /// Workers told to stop (a `Stop` that found a control socket full
    /// goes again with the next tick).
    told: BTreeSet<u32>,
}

impl Keeper {
    /// True from the first `SIGTERM` (or another stop) on: no upgrade, no
    /// re-exec, no new connection.
    pub(super) fn stopping(&self) -> bool {
        self.stop.is_some() || self.phase == crate::status::Phase::ShuttingDown
    }

    /// The first `SIGTERM`: stop taking connections, let the requests in
    /// flight finish, close idle connections cleanly.
    pub(super) fn begin_stop(&mut self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let timeout = self.cfg.stop_timeout;
        tracing::info!(
            connections = self.conns.len(),
            stop_timeout_ms = timeout.as_millis() as u64,
            "SIGTERM: stopping; requests in flight finish, idle connections are closed \
             (SIGTERM again or SIGINT: close everything now)"
        );
        self.stop = Some(Stopping {
            deadline: Instant::now() + timeout,
            told: BTreeSet::new(),
        });
        self.take_backlog();
        self.close_listeners();
        // Standbys stay: a worker that dies while stopping is recovered as
        // ever, and its requests in flight still finish.
        self.tell_workers_to_stop();
    }

    /// Accepts what the kernel already completed in the listen backlog, so
    /// those clients are served rather than reset when the listeners close
    /// — within `--max-conns`: beyond it, they are reset, as with nginx.
    fn take_backlog(&mut self) {
        let max = self.cfg.max_conns as usize;
        let mut taken = Vec::new();
        for (l, _) in &self.listener_fds {
            while self.live.load(Ordering::Relaxed) + taken.len() < max {
                // The listeners are non-blocking: this ends at an empty backlog.
                match rustix::net::accept_with(l, SocketFlags::CLOEXEC) {
                    Ok(fd) => taken.push(fd),
                    Err(_) => break,
                }
            }
        }
        if taken.is_empty() {
            return;
        }
        tracing::info!(
            connections = taken.len(),
            "taking the connections waiting in the listen backlog"
        );
        self.live.fetch_add(taken.len(), Ordering::Relaxed);
        self.accepted(taken);
    }

    /// Stops accepting and closes the keeper's listening sockets.
    pub(super) fn close_listeners(&mut self) {
        for task in self.accepting.drain(..) {
            task.abort();
        }
        self.listener_fds.clear();
    }

    /// Sends `Stop` to every worker that has been welcomed and not told yet.
    pub(super) fn tell_workers_to_stop(&mut self) {
        let Some(stop) = &mut self.stop else {
            return;
        };
        for (id, w) in &self.workers {
            if w.greeted && !stop.told.contains(id) && send_msg(&w.control, &Msg::Stop) {
                stop.told.insert(*id);
            }
        }
    }

    /// On each tick while stopping: `Stop` messages that could not go,
    /// and the stop timeout. True when it is time to close everything.
    pub(super) fn check_stop(&mut self) -> bool {
        self.tell_workers_to_stop();
        match &self.stop {
            Some(stop) if Instant::now() >= stop.deadline => {
                tracing::warn!(
                    connections = self.conns.len(),
                    "stop timeout: closing the connections still busy"
                );
                true
            }
            _ => false,
        }
    }

    /// The stop is done: nothing is held any more.
    pub(super) fn stopped(&self) -> bool {
        self.stop.is_some() && self.conns.is_empty()
    }

    /// A worker told to stop handed a connection back. Idle, it is closed
    /// with a FIN; if a request arrived since the worker let it go, it goes
    /// back to a worker to be answered.
    pub(super) fn released_at_stop(&mut self, id: u32, conn_id: u64, slot: u32) {
        let owned = self.owns(id, conn_id, slot);
        if !owned {
            tracing::warn!(
                worker = id,
                conn = conn_id,
                "worker handed back a connection it does not own; ignored"
            );
            return;
        }
        if self.unanswered_input(conn_id) == 0 {
            tracing::debug!(worker = id, conn = conn_id, "idle at the stop: closed");
            self.close_cleanly(conn_id);
            return;
        }
        tracing::debug!(
            worker = id,
            conn = conn_id,
            "a request arrived as the worker let go: back to a worker"
        );
        if let Some(h) = self.conns.get_mut(&conn_id) {
            h.owner = None;
            h.handed = true;
            h.crashed = false;
            h.moved = true;
            h.since = Some(Instant::now());
        }
        self.waiting.push_back(conn_id);
        self.dirty = true;
        let retire = self.workers.get_mut(&id).is_some_and(|w| {
            w.owned = w.owned.saturating_sub(1);
            w.owned == 0 && w.role == Role::Draining
        });
        if retire {
            self.tell_exit(id);
        }
    }

    /// Input the client sent past the connection's last commit, as far as
    /// the kernel's counter and the journal record tell (0 when the record
    /// cannot be read: the connection is closed either way).
    fn unanswered_input(&self, conn_id: u64) -> u64 {
        let Some(h) = self.conns.get(&conn_id) else {
            return 0;
        };
        let mut raw = [0u8; RECORD_SIZE];
        if self.journal.read(journal_offset(h.slot), &mut raw).is_err() {
            return 0;
        }
        match (
            hf_journal::record::pick(&raw, conn_id),
            hf_sys::tcp::stream_positions(&h.fd),
        ) {
            (Ok(rec), Ok(pos)) => pos.received.saturating_sub(rec.in_commit),
            _ => 0,
        }
    }

    /// Closes a held connection without a reset: its queued input is
    /// dropped, FIN goes out, and the socket lingers until the client
    /// closes its side (at most [`LINGER`]).
    pub(super) fn close_cleanly(&mut self, conn_id: u64) {
        let Some(h) = self.conns.get(&conn_id) else {
            return;
        };
        while let Ok(n) = hf_sys::tcp::discard(&h.fd, 1 << 30) {
            if n == 0 {
                break;
            }
        }
        let _ = rustix::net::shutdown(&h.fd, rustix::net::Shutdown::Write);
        match h.fd.try_clone() {
            Ok(fd) => {
                self.closing.spawn(linger(fd, Instant::now() + LINGER));
            }
            Err(e) => {
                tracing::warn!(conn = conn_id, error = %e, "cannot keep the connection open after its FIN");
            }
        }
        self.drop_conn(conn_id);
    }

    /// Closes every connection still held (the workers are gone by now),
    /// then waits for the clients' FINs, at most [`LINGER`].
    pub(super) async fn close_all_cleanly(&mut self) {
        let held: Vec<u64> = self.conns.keys().copied().collect();
        if !held.is_empty() {
            tracing::info!(
                connections = held.len(),
                "closing the connections still held"
            );
        }
        for conn_id in held {
            self.close_cleanly(conn_id);
        }
        while self.closing.join_next().await.is_some() {}
    }
}

/// Keeps a connection whose FIN went out until the client closes its side
/// or `until`, dropping whatever it still sends: the final close then sends
/// no RST.
async fn linger(fd: OwnedFd, until: Instant) {
    let Ok(fd) = hf_sys::reactor::register(fd) else {
        return;
    };
    let until = tokio::time::Instant::from_std(until);
    loop {
        let Ok(Ok(mut ready)) = tokio::time::timeout_at(until, fd.readable()).await else {
            return;
        };
        match ready.try_io(|fd| hf_sys::tcp::discard(fd.get_ref(), 1 << 30)) {
            // The client's FIN (0), or the connection is gone.
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) | Err(_) => {}
        }
    }
}
