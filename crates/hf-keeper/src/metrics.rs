//! `holdfast run --metrics ADDR`: the keeper's counters as Prometheus text
//! at `/metrics` (the prometheus-client crate's OpenMetrics encoding).
//!
//! Most values are the keeper's own counters, copied into the registry
//! when a scrape comes (a counter only ever moves up, by the difference);
//! recovery times are observed into a histogram as they happen. Nothing
//! runs between scrapes.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::status::Snapshot;

type Labels = Vec<(&'static str, String)>;

/// A counter fed from a monotonic value kept elsewhere.
#[derive(Default)]
struct Fed {
    counter: Counter,
    seen: u64,
}

impl Fed {
    fn set(&mut self, now: u64) {
        self.counter.inc_by(now.saturating_sub(self.seen));
        self.seen = self.seen.max(now);
    }
}

/// Why an active worker was replaced, for `holdfast_worker_restarts_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartReason {
    /// It crashed by itself (a fatal signal of its own, a non-zero exit).
    Crash,
    /// It stopped beating (`--hang-timeout`, `--request-deadline`).
    Hang,
    /// Something outside stopped it (SIGKILL, SIGTERM: an operator, the
    /// OOM killer).
    Killed,
}

impl RestartReason {
    fn label(self) -> &'static str {
        match self {
            RestartReason::Crash => "crash",
            RestartReason::Hang => "hang",
            RestartReason::Killed => "killed",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    restarts: Family<Labels, Counter>,
    recovery: Histogram,
    upgrades: Family<Labels, Counter>,
    upgrades_seen: (u64, u64),
    recovered: Fed,
    poisoned: Fed,
    turned_away: Fed,
    accepted: Fed,
    keeper_execs: Fed,
    held: Gauge,
    waiting: Gauge,
    generation: Gauge,
    workers: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("holdfast");
        let m = Metrics {
            restarts: Family::default(),
            // 50 µs to ~1.6 s.
            recovery: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            upgrades: Family::default(),
            upgrades_seen: (0, 0),
            recovered: Fed::default(),
            poisoned: Fed::default(),
            turned_away: Fed::default(),
            accepted: Fed::default(),
            keeper_execs: Fed::default(),
            held: Gauge::default(),
            waiting: Gauge::default(),
            generation: Gauge::default(),
            workers: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "worker_restarts",
            "Active workers replaced, by why they ended",
            m.restarts.clone(),
        );
        registry.register(
            "recovery_duration_seconds",
            "From noticing a worker's death to its connections handed to the successor",
            m.recovery.clone(),
        );
        registry.register(
            "upgrades",
            "Upgrades of the service, by result",
            m.upgrades.clone(),
        );
        registry.register(
            "connections_recovered",
            "Connections handed to a new worker after their worker died",
            m.recovered.counter.clone(),
        );
        registry.register(
            "poisoned_requests",
            "Requests refused as poison (running during consecutive crashes)",
            m.poisoned.counter.clone(),
        );
        registry.register(
            "turned_away",
            "Connections turned away because no worker could serve them in time",
            m.turned_away.counter.clone(),
        );
        registry.register(
            "connections_accepted",
            "Connections accepted",
            m.accepted.counter.clone(),
        );
        registry.register(
            "keeper_execs",
            "Times the keeper re-executed itself",
            m.keeper_execs.counter.clone(),
        );
        registry.register(
            "connections_held",
            "Connections the keeper holds (with a worker or waiting for one)",
            m.held.clone(),
        );
        registry.register(
            "connections_waiting",
            "Connections waiting for a worker",
            m.waiting.clone(),
        );
        registry.register(
            "generation",
            "The generation new connections go to",
            m.generation.clone(),
        );
        registry.register("workers", "Workers, by role", m.workers.clone());
        registry.register(
            "build",
            "The keeper's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_owned())]),
        );
        Metrics { registry, ..m }
    }

    /// An active worker ended and was replaced.
    pub fn restarted(&self, why: RestartReason) {
        self.restarts
            .get_or_create(&vec![("reason", why.label().to_owned())])
            .inc();
    }

    /// A recovery handed a dead worker's connections over in `secs`.
    pub fn recovered_in(&self, secs: f64) {
        self.recovery.observe(secs);
    }

    /// The registry as Prometheus text, brought up to date with `s`.
    pub fn render(&mut self, s: &Snapshot) -> String {
        self.recovered.set(s.recovered_connections);
        self.poisoned.set(s.poisoned);
        self.turned_away.set(s.turned_away);
        self.accepted.set(s.accepted);
        self.keeper_execs.set(s.keeper_execs);
        let (ok, failed) = self.upgrades_seen;
        self.upgrades
            .get_or_create(&vec![("result", "success".to_owned())])
            .inc_by(s.upgrades.saturating_sub(ok));
        self.upgrades
            .get_or_create(&vec![("result", "failure".to_owned())])
            .inc_by(s.failed_upgrades.saturating_sub(failed));
        self.upgrades_seen = (ok.max(s.upgrades), failed.max(s.failed_upgrades));
        self.held
            .set(i64::try_from(s.connections).unwrap_or(i64::MAX));
        self.waiting
            .set(i64::try_from(s.waiting).unwrap_or(i64::MAX));
        self.generation.set(i64::from(s.generation));
        self.workers.clear();
        for w in &s.workers {
            self.workers
                .get_or_create(&vec![("role", format!("{:?}", w.role).to_lowercase())])
                .inc();
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_the_keepers_values_and_only_go_up() {
        let mut m = Metrics::new();
        let mut s: Snapshot = serde_json::from_value(serde_json::json!({
            "phase": "serving", "keeper_pid": 1, "listeners": [], "workers": [],
            "connections": 3, "waiting": 1, "accepted": 10, "restarts": 0,
            "recovered_connections": 4, "last_recovery_us": null, "last_exits": [],
            "start_failures": 0, "next_start_in_ms": null, "turned_away": 0,
            "poisoned": 0, "generation": 2, "generations": [2], "upgrade": null,
            "upgrades": 1, "failed_upgrades": 0, "keeper_execs": 0, "rejuvenations": 0
        }))
        .unwrap();
        m.restarted(RestartReason::Crash);
        m.recovered_in(0.0002);
        let text = m.render(&s);
        assert!(
            text.contains("holdfast_connections_recovered_total 4"),
            "{text}"
        );
        assert!(
            text.contains("holdfast_worker_restarts_total{reason=\"crash\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("holdfast_upgrades_total{result=\"success\"} 1"),
            "{text}"
        );
        assert!(text.contains("holdfast_generation 2"), "{text}");
        assert!(text.contains("holdfast_build_info{version="), "{text}");
        assert!(
            text.contains("holdfast_recovery_duration_seconds_count 1"),
            "{text}"
        );
        s.recovered_connections = 6;
        let text = m.render(&s);
        assert!(
            text.contains("holdfast_connections_recovered_total 6"),
            "{text}"
        );
        // A value that went down (a re-executed keeper starting over) never
        // makes a counter go down.
        s.recovered_connections = 2;
        let text = m.render(&s);
        assert!(
            text.contains("holdfast_connections_recovered_total 6"),
            "{text}"
        );
    }
}
