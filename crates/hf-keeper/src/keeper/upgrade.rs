//! Zero-downtime upgrade: a new version takes every connection over without
//! any of them waiting for the old version to finish.
//!
//! ```text
//!  upgrade ──► start the new version (a candidate, generation N+1)
//!    ├─ exits / not ready in time / cannot read the state blobs in use
//!    │     └─► stop it; nothing moved ("failed", exit 1)
//!    └─ ready ──► switch: it becomes the active worker (new connections go
//!                 to it), the old one drains:
//!          ├─ every connection at a commit point is handed back (Released)
//!          │   and goes to the new version with its state blob
//!          ├─ at the drain timeout, what the old one still holds is taken
//!          │   from it (SIGKILL) and recovered as after a crash, on a
//!          │   standby of the old version kept for this ("catcher")
//!          ├─ the old one holds nothing ──► told to exit
//!          ├─ the new one dies before the settle time ──► the old version's
//!          │   standby takes everything (rollback, "failed", exit 1); an
//!          │   answer it had partly sent is first finished by a standby of
//!          │   the new version, which hands it over at its commit point
//!          └─ settled ──► the old version's standbys retire, new ones start
//! ```
//!
//! Another upgrade may start while an older generation still drains; the
//! number of live generations is bounded (`--max-generations`).

use std::ffi::OsString;
use std::time::{Duration, Instant};

use hf_journal::record::RECORD_SIZE;
use hf_journal::wire::Msg;
use tokio::sync::mpsc;

use super::{journal_offset, send_msg, Keeper};
use crate::status::{Progress, Role, UpgradePhase, UpgradeRequest, UpgradeStatus};

/// A worker told to exit gets this long before it is killed (it holds no
/// connection by then, so nothing is lost either way).
const EXIT_GRACE: Duration = Duration::from_secs(2);

pub(super) struct Upgrade {
    command: Vec<OsString>,
    generation: u32,
    from_generation: u32,
    candidate: u32,
    phase: UpgradePhase,
    requested: Instant,
    ready_by: Instant,
    switched: Option<Instant>,
    drain_timeout: Duration,
    settle: Duration,
    /// The old version can take everything back if the new one dies
    /// before it settles (it reads the state blobs the new one writes).
    rollback: bool,
    total: usize,
    moved: usize,
    /// Connections still busy at the drain timeout, recovered as after a crash.
    pub(super) recovered: usize,
    last_move: Option<Instant>,
    reported: usize,
    progress: Option<mpsc::UnboundedSender<Progress>>,
}

impl Upgrade {
    pub(super) fn status(&self) -> UpgradeStatus {
        UpgradeStatus {
            generation: self.generation,
            phase: self.phase,
            moved: self.moved,
            total: self.total,
            elapsed_ms: self.requested.elapsed().as_millis() as u64,
        }
    }

    fn send(&self, p: Progress) {
        if let Some(tx) = &self.progress {
            let _ = tx.send(p);
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Keeper {
    /// Generations with workers that serve, drain or are about to take over
    /// (a worker that holds nothing and was told to exit does not count).
    pub(super) fn live_generations(&self) -> Vec<u32> {
        let mut g: Vec<u32> = self
            .workers
            .values()
            .filter(|w| match w.role {
                Role::Active | Role::Candidate => true,
                Role::Draining => w.owned > 0 || w.exit_by.is_none(),
                Role::Standby | Role::Starting => false,
            })
            .map(|w| w.generation)
            .collect();
        g.sort_unstable();
        g.dedup();
        g
    }

    /// Hands out what events without a hand-out of their own queued.
    pub(super) fn flush(&mut self) {
        if self.dirty {
            self.dirty = false;
            self.hand_out();
        }
    }

    pub(super) fn start_upgrade(
        &mut self,
        req: UpgradeRequest,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) {
        let refuse = |k: &mut Keeper, reason: String| {
            tracing::warn!("upgrade refused: {reason}");
            k.count.failed_upgrades += 1;
            if let Some(tx) = &progress {
                let _ = tx.send(Progress::Failed {
                    reason,
                    generation: k.generation,
                });
            }
        };
        if self.stopping() {
            return refuse(self, "the keeper is shutting down".into());
        }
        let live = self.live_generations();
        if live.len() >= self.cfg.max_generations {
            let oldest = live[0];
            let held: usize = self
                .workers
                .values()
                .filter(|w| w.generation == oldest)
                .map(|w| w.owned)
                .sum();
            return refuse(
                self,
                format!(
                    "{} generations are live (limit {}, --max-generations): generation {oldest} \
                     still holds {held} connections; try again when it has handed them over",
                    live.len(),
                    self.cfg.max_generations
                ),
            );
        }
        match &self.upgrade {
            Some(up) if up.phase == UpgradePhase::Starting => {
                let g = up.generation;
                return refuse(
                    self,
                    format!("an upgrade to generation {g} is still starting"),
                );
            }
            // Back to back: the previous upgrade has switched over; it is
            // done as far as a new one is concerned (its old generation
            // keeps draining in the background).
            Some(_) => self.finish_upgrade(),
            None => {}
        }
        let command: Vec<OsString> = match req.command {
            Some(c) if !c.is_empty() => c.into_iter().map(OsString::from).collect(),
            _ => self.cfg.command.clone(),
        };
        let generation = self.next_generation;
        let id = match self.spawn_worker(Some(&command), generation, Role::Candidate) {
            Ok(id) => id,
            Err(e) => return refuse(self, format!("cannot start the new version: {e}")),
        };
        self.next_generation += 1;
        let now = Instant::now();
        let pid = self.workers.get(&id).map_or(0, |w| w.pid);
        tracing::info!(
            generation,
            worker = id,
            pid,
            command = ?command,
            "upgrade: new version starting"
        );
        let up = Upgrade {
            command,
            generation,
            from_generation: self.generation,
            candidate: id,
            phase: UpgradePhase::Starting,
            requested: now,
            ready_by: now + Duration::from_millis(req.ready_timeout_ms.max(1)),
            switched: None,
            drain_timeout: Duration::from_millis(req.drain_timeout_ms),
            settle: Duration::from_millis(req.settle_ms),
            rollback: true,
            total: 0,
            moved: 0,
            recovered: 0,
            last_move: None,
            reported: 0,
            progress,
        };
        up.send(Progress::Started { generation, pid });
        self.upgrade = Some(up);
    }

    /// The new version said Ready: check it can read what it is about to
    /// receive, then switch.
    pub(super) fn candidate_ready(&mut self, id: u32) {
        let ours = self
            .upgrade
            .as_ref()
            .is_some_and(|u| u.candidate == id && u.phase == UpgradePhase::Starting);
        if !ours {
            tracing::warn!(worker = id, "a candidate nobody waits for; stopping it");
            self.tell_exit(id);
            return;
        }
        if let Err(reason) = self.check_state_versions(id) {
            self.kill(id);
            self.fail_upgrade(format!("refused before anything moved: {reason}"));
            return;
        }
        self.switch(id);
    }

    /// Every state blob in use, and every version an older worker still
    /// writes, must be readable by the candidate. Records are copied out
    /// and validated; one that does not decode has no blob anyone reads.
    fn check_state_versions(&self, id: u32) -> Result<(), String> {
        let Some(c) = self.workers.get(&id) else {
            return Err("the new version is gone".into());
        };
        let (lo, hi) = c.state_reads;
        let reads = |v: u16| lo <= v && v <= hi;
        for w in self.workers.values() {
            if matches!(w.role, Role::Active | Role::Draining) && !reads(w.state_writes) {
                return Err(format!(
                    "generation {} writes state version {}, the new version reads {lo}..={hi}",
                    w.generation, w.state_writes
                ));
            }
        }
        let mut raw = Box::new([0u8; RECORD_SIZE]);
        let mut unread: std::collections::BTreeMap<u16, usize> = Default::default();
        for (cid, h) in &self.conns {
            if !h.handed
                || self
                    .journal
                    .read(journal_offset(h.slot), &mut raw[..])
                    .is_err()
            {
                continue;
            }
            if let Ok(rec) = hf_journal::record::pick(&raw, *cid) {
                if !rec.state().is_empty() && !reads(rec.state_version) {
                    *unread.entry(rec.state_version).or_default() += 1;
                }
            }
        }
        if let Some((v, n)) = unread.iter().next() {
            return Err(format!(
                "{n} connections hold state version {v}, the new version reads {lo}..={hi}"
            ));
        }
        Ok(())
    }

    fn switch(&mut self, cand: u32) {
        let now = Instant::now();
        let Some((drain_timeout, gen, command)) = self
            .upgrade
            .as_ref()
            .map(|u| (u.drain_timeout, u.generation, u.command.clone()))
        else {
            return;
        };
        // Rolling back hands the new version's connections, with the state
        // blobs it wrote, to the old version's standbys: only if they read them.
        let writes = self.workers.get(&cand).map_or(1, |w| w.state_writes);
        let unreadable = self
            .workers
            .values()
            .filter(|w| w.generation == self.generation && w.role == Role::Standby)
            .find(|w| !(w.state_reads.0..=w.state_reads.1).contains(&writes))
            .map(|w| (w.generation, w.state_reads));
        if let Some(old) = self.active.take() {
            self.start_drain(old, now + drain_timeout);
        }
        let total: usize = self
            .workers
            .values()
            .filter(|w| w.role == Role::Draining)
            .map(|w| w.owned)
            .sum();
        self.promote(cand);
        // The new version's standbys start now, so one is ready when the
        // upgrade is done (or for a crash once it can no longer roll back).
        for _ in 0..self.cfg.standby {
            if let Err(e) = self.spawn_worker(Some(&command), gen, Role::Starting) {
                tracing::warn!(error = %e, "cannot start a standby of the new version");
            }
        }
        if let Some((g, (lo, hi))) = unreadable {
            tracing::warn!(
                "generation {g} reads state versions {lo}..={hi}, the new version writes {writes}: \
                 no rollback for this upgrade"
            );
            if let Some(up) = &mut self.upgrade {
                up.rollback = false;
            }
            self.adopt_version();
        }
        let Some(up) = &mut self.upgrade else {
            return;
        };
        up.phase = UpgradePhase::Moving;
        up.switched = Some(now);
        up.total = total;
        let ready_ms = ms(now - up.requested);
        tracing::info!(
            generation = up.generation,
            ready_ms,
            connections = total,
            rollback = up.rollback,
            "upgrade: new version serves; moving connections"
        );
        up.send(Progress::Switched {
            generation: up.generation,
            ready_ms,
            total,
            rollback: up.rollback,
        });
        self.check_upgrade();
    }

    /// Asks worker `id` to hand its connections back at their commit points,
    /// taking from it at `deadline` what it still holds.
    fn start_drain(&mut self, id: u32, deadline: Instant) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.role = Role::Draining;
        w.drain_deadline = Some(deadline);
        let control = w.control.clone();
        let empty = w.owned == 0;
        w.drain_sent = send_msg(&control, &Msg::Drain);
        if empty {
            self.tell_exit(id);
        }
    }

    /// A worker that is not the active one died (or was stopped at the
    /// drain timeout) holding connections. They are recovered where the
    /// same code still runs if possible — a standby of the dead worker's
    /// version, which replays what was cut with the same bytes and hands
    /// each connection over at its next commit point — and otherwise on
    /// the active worker, as after any crash.
    pub(super) fn stragglers(&mut self, id: u32, w: &super::Worker, crashed: bool) {
        let mine = self.conns.values().filter(|h| h.owner == Some(id)).count();
        if mine == 0 {
            return;
        }
        let catcher = if w.role == Role::Draining && !w.catcher {
            self.workers
                .iter()
                .find(|(_, s)| s.role == Role::Standby && s.generation == w.generation)
                .map(|(sid, _)| *sid)
        } else {
            None
        };
        if let Some(up) = &mut self.upgrade {
            up.recovered += mine;
        }
        let replayer = self
            .active
            .and_then(|a| self.workers.get(&a))
            .map_or(self.generation, |a| a.generation);
        if catcher.is_none() && replayer != w.generation {
            let cut = self.cut_answers(id).len();
            if cut > 0 {
                let why = if w.catcher {
                    "was still busy a drain timeout after it took over"
                } else {
                    "has no standby left to take over"
                };
                self.warn_other_version_replays(w.generation, replayer, cut, why);
            }
        }
        self.recover_from(id, crashed);
        let Some(sid) = catcher else {
            self.hand_out();
            return;
        };
        let timeout = self.upgrade.as_ref().map_or(
            Duration::from_millis(UpgradeRequest::DRAIN_TIMEOUT_MS),
            |u| u.drain_timeout,
        );
        tracing::info!(
            worker = sid,
            generation = w.generation,
            connections = mine,
            "a standby of the same version takes over the connections still busy"
        );
        // Taken back out of the shared queue (recover_from put them in
        // front), and sent to the catcher before it is told to drain.
        let mut queue: std::collections::VecDeque<u64> =
            self.waiting.drain(..mine.min(self.waiting.len())).collect();
        if let Some(s) = self.workers.get_mut(&sid) {
            s.catcher = true;
        }
        self.hand_to(sid, &mut queue);
        self.start_drain(sid, Instant::now() + timeout);
        // Whatever could not be sent goes to the active worker.
        while let Some(c) = queue.pop_back() {
            self.waiting.push_front(c);
        }
        self.hand_out();
    }

    /// A draining worker handed a connection back at a commit point.
    pub(super) fn released(&mut self, id: u32, conn_id: u64, slot: u32) {
        let draining = self
            .workers
            .get(&id)
            .is_some_and(|w| w.role == Role::Draining);
        let owned = self.owns(id, conn_id, slot);
        if !(draining && owned) {
            tracing::warn!(
                worker = id,
                conn = conn_id,
                "worker handed back a connection it does not own, or without draining; ignored"
            );
            return;
        }
        if let Some(h) = self.conns.get_mut(&conn_id) {
            h.owner = None;
            h.handed = true;
            h.crashed = false;
            h.moved = true;
            h.since = Some(Instant::now());
        }
        self.waiting.push_back(conn_id);
        self.dirty = true;
        let left = self.workers.get_mut(&id).map_or(0, |w| {
            w.owned = w.owned.saturating_sub(1);
            w.owned
        });
        if let Some(up) = &mut self.upgrade {
            up.moved += 1;
            up.last_move = Some(Instant::now());
        }
        if left == 0 {
            self.tell_exit(id);
            self.check_upgrade();
        }
    }

    /// Asks a worker that holds nothing to exit; it is killed if it is
    /// still there after [`EXIT_GRACE`].
    pub(super) fn tell_exit(&mut self, id: u32) {
        if let Some(w) = self.workers.get_mut(&id) {
            if w.exit_by.is_none() {
                w.role = Role::Draining;
                w.exit_by = Some(Instant::now() + EXIT_GRACE);
                let control = w.control.clone();
                send_msg(&control, &Msg::Shutdown);
            }
        }
    }

    /// Takes what a draining worker still holds at its drain timeout (it is
    /// killed and its connections recovered as after a crash), kills
    /// workers that were told to exit and did not, and retires standbys
    /// kept for versions that have handed everything over.
    pub(super) fn check_draining(&mut self) {
        let now = Instant::now();
        let (mut late, mut resend, mut idle) = (Vec::new(), Vec::new(), Vec::new());
        for (id, w) in self.workers.iter_mut() {
            if w.role != Role::Draining {
                continue;
            }
            if !w.drain_sent {
                resend.push(*id);
            }
            if w.owned == 0 && w.exit_by.is_none() {
                idle.push(*id);
            } else if w.owned > 0 && w.drain_deadline.is_some_and(|t| now >= t) {
                tracing::warn!(
                    worker = *id,
                    generation = w.generation,
                    connections = w.owned,
                    "drain timeout: recovering the connections it still holds on the new version"
                );
                w.drain_deadline = None;
                late.push(*id);
            } else if w.owned == 0 && w.exit_by.is_some_and(|t| now >= t) {
                tracing::warn!(worker = *id, "did not exit when told to; killing it");
                w.exit_by = None;
                late.push(*id);
            }
        }
        for id in late {
            self.kill(id);
        }
        // A Drain that found the control socket full goes again.
        for id in resend {
            if let Some(w) = self.workers.get_mut(&id) {
                let control = w.control.clone();
                w.drain_sent = send_msg(&control, &Msg::Drain);
            }
        }
        for id in idle {
            self.tell_exit(id);
        }
        self.retire_old_standbys();
    }

    /// Moves the upgrade along: ready timeout, progress, done.
    pub(super) fn check_upgrade(&mut self) {
        let now = Instant::now();
        let Some(up) = &mut self.upgrade else {
            return;
        };
        match up.phase {
            UpgradePhase::Starting => {
                if now >= up.ready_by {
                    let (cand, waited) = (up.candidate, now - up.requested);
                    self.kill(cand);
                    self.fail_upgrade(format!(
                        "the new version was not ready after {} ms; stopped it, nothing moved",
                        ms(waited)
                    ));
                }
            }
            UpgradePhase::Moving | UpgradePhase::Settling => {
                let gen = up.generation;
                let holding = self
                    .workers
                    .values()
                    .any(|w| w.generation < gen && w.role == Role::Draining && w.owned > 0);
                let Some(up) = &mut self.upgrade else {
                    return;
                };
                if up.moved != up.reported {
                    up.reported = up.moved;
                    up.send(Progress::Moving {
                        moved: up.moved,
                        total: up.total,
                    });
                }
                if up.phase == UpgradePhase::Moving && !holding {
                    up.phase = UpgradePhase::Settling;
                    tracing::info!(
                        generation = gen,
                        moved = up.moved,
                        recovered = up.recovered,
                        "upgrade: every connection moved"
                    );
                }
                let settled = up.switched.is_some_and(|t| now >= t + up.settle);
                let old_gone = !self
                    .workers
                    .values()
                    .any(|w| w.generation < gen && w.role == Role::Draining);
                if self
                    .upgrade
                    .as_ref()
                    .is_some_and(|u| u.phase == UpgradePhase::Settling)
                    && settled
                    && old_gone
                {
                    self.finish_upgrade();
                }
            }
        }
    }

    /// The new version is now *the* version: its command starts the
    /// standbys from here on, and the old version's standbys retire.
    pub(super) fn finish_upgrade(&mut self) {
        self.adopt_version();
        let Some(up) = self.upgrade.take() else {
            return;
        };
        self.count.upgrades += 1;
        let move_ms = match (up.switched, up.last_move) {
            (Some(s), Some(l)) if l > s => ms(l - s),
            _ => 0,
        };
        let elapsed_ms = ms(up.requested.elapsed());
        tracing::info!(
            generation = up.generation,
            from = up.from_generation,
            moved = up.moved,
            recovered = up.recovered,
            move_ms,
            elapsed_ms,
            "upgrade done"
        );
        up.send(Progress::Done {
            generation: up.generation,
            from_generation: up.from_generation,
            moved: up.moved,
            recovered: up.recovered,
            move_ms,
            elapsed_ms,
        });
        self.ensure_workers();
    }

    /// From here on the upgrade's version is the one in force: its command
    /// starts new workers, and the older versions' standbys retire.
    fn adopt_version(&mut self) {
        let Some(up) = &self.upgrade else {
            return;
        };
        let gen = up.generation;
        self.cfg.command = up.command.clone();
        self.generation = gen;
        // One ready standby stays for each older version that still holds
        // connections: a request running there past the drain timeout is
        // replayed by its own code, with the bytes its client already has.
        let mut keep: Vec<u32> = Vec::new();
        let old: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, w)| matches!(w.role, Role::Standby | Role::Starting) && w.generation < gen)
            .filter(|(_, w)| {
                let catcher = w.role == Role::Standby
                    && !keep.contains(&w.generation)
                    && self.still_draining(w.generation);
                if catcher {
                    keep.push(w.generation);
                }
                !catcher
            })
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            self.tell_exit(id);
        }
    }

    /// Whether a draining worker of generation `gen` (not a catcher, which
    /// gets no catcher of its own) still holds connections.
    fn still_draining(&self, gen: u32) -> bool {
        self.workers
            .values()
            .any(|w| w.generation == gen && w.role == Role::Draining && !w.catcher && w.owned > 0)
    }

    /// Retires the standbys kept for older versions once those versions
    /// have handed everything over.
    fn retire_old_standbys(&mut self) {
        let done: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                w.role == Role::Standby
                    && w.generation < self.generation
                    && !self.still_draining(w.generation)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.tell_exit(id);
        }
    }

    fn fail_upgrade(&mut self, reason: String) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        self.count.failed_upgrades += 1;
        // The new version's standbys go too, except one finishing the
        // answers the new version had partly sent (it leaves once it has
        // handed them over).
        let new: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == up.generation && w.role != Role::Active && !w.catcher)
            .map(|(id, _)| *id)
            .collect();
        for id in new {
            if self
                .workers
                .get(&id)
                .is_some_and(|w| w.role == Role::Candidate)
            {
                self.kill(id);
            } else {
                self.tell_exit(id);
            }
        }
        tracing::warn!(
            generation = up.generation,
            back_on = self.generation,
            "upgrade failed: {reason}"
        );
        up.send(Progress::Failed {
            reason,
            generation: self.generation,
        });
        self.ensure_workers();
    }

    /// The active worker `id` died. If it is the new version of an upgrade
    /// that rolls back, its connections go back to the old version — but
    /// an answer it had partly sent, replayed by the old version, would
    /// come out differently (and the connection would be closed with the
    /// answer cut). Those connections go to a ready standby of the new
    /// version instead, which finishes each answer with the same bytes and
    /// hands the connection to the old version at its next commit point,
    /// like a draining worker. Connections at a commit point are left to
    /// the usual recovery, on the old version.
    ///
    /// A new version that crashed by itself (or hung) gets no such second
    /// chance: the replay would most likely fail the same way, and going
    /// back to the old version is what the rollback is for.
    pub(super) fn rollback_cut_answers(&mut self, id: u32, crashed: bool) {
        let Some(up) = &self.upgrade else {
            return;
        };
        if up.candidate != id || !up.rollback || up.phase == UpgradePhase::Starting {
            return;
        }
        let (gen, drain_timeout) = (up.generation, up.drain_timeout);
        let mut cut = self.cut_answers(id);
        if cut.is_empty() {
            return;
        }
        let catcher = self
            .workers
            .iter()
            .find(|(_, w)| w.role == Role::Standby && w.generation == gen)
            .map(|(sid, _)| *sid);
        let sid = match (catcher, crashed) {
            (Some(sid), false) => sid,
            (_, true) => {
                let n = cut.len();
                return self.warn_other_version_replays(gen, self.generation, n, "crashed or hung");
            }
            (None, false) => {
                let n = cut.len();
                let why = "has no standby ready";
                return self.warn_other_version_replays(gen, self.generation, n, why);
            }
        };
        tracing::info!(
            worker = sid,
            generation = gen,
            connections = cut.len(),
            "rollback: a standby of the new version finishes the answers it had partly sent, \
             then hands them to generation {}",
            self.generation
        );
        cut.sort_unstable();
        let now = Instant::now();
        for cid in &cut {
            if let Some(h) = self.conns.get_mut(cid) {
                h.owner = None;
                h.crashed = false;
                h.since = Some(now);
            }
        }
        let mut queue: std::collections::VecDeque<u64> = cut.into();
        if let Some(s) = self.workers.get_mut(&sid) {
            s.catcher = true;
        }
        self.hand_to(sid, &mut queue);
        self.start_drain(sid, now + drain_timeout);
        // Whatever could not be sent goes to the old version.
        while let Some(c) = queue.pop_back() {
            self.waiting.push_front(c);
        }
    }

    /// Connections worker `id` holds in the middle of an answer: part of
    /// it may have reached the client, so only the same code can replay it
    /// byte for byte. Records are copied out and validated; one that does
    /// not decode counts as cut.
    fn cut_answers(&self, id: u32) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(cid, h)| h.owner == Some(id) && !self.at_commit_point(**cid, h))
            .map(|(cid, _)| *cid)
            .collect()
    }

    /// Says plainly that answers generation `from` had partly sent are
    /// replayed by generation `by`: if that version answers differently,
    /// those connections end with a clean close instead of their answer.
    fn warn_other_version_replays(&self, from: u32, by: u32, connections: usize, why: &str) {
        tracing::warn!(
            generation = from,
            replayed_by = by,
            connections,
            "generation {from} {why}: generation {by} replays the answers it had partly sent; \
             one that comes out differently is closed cleanly after the bytes already sent"
        );
    }

    /// A worker died: if it was the new version, the upgrade fails (and,
    /// once it had taken over, the old version's standby has taken
    /// everything back — the usual crash path did that).
    pub(super) fn upgrade_worker_died(
        &mut self,
        id: u32,
        w: &super::Worker,
        was_active: bool,
        how: &str,
    ) {
        let Some(up) = &self.upgrade else {
            return;
        };
        if up.candidate != id || (!up.rollback && up.phase != UpgradePhase::Starting) {
            // Not the new version, or it can no longer roll back: an
            // ordinary crash, recovered on a standby of the version in force.
            self.check_upgrade();
            return;
        }
        let reason = match up.phase {
            UpgradePhase::Starting if w.hung.is_none() => {
                format!("the new version {how} before it was ready; nothing moved")
            }
            UpgradePhase::Starting => "the new version was stopped before it was ready".into(),
            _ => format!(
                "the new version {how} while taking over{}; rolled back to generation {}",
                if was_active { "" } else { " (not serving)" },
                self.generation
            ),
        };
        self.fail_upgrade(reason);
    }
}
