//! What the clients saw, in one value: counts, the latency histogram and
//! its percentiles, stalls and failures lined up with the events.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::schedule::{EventKind, EventLog};
use crate::{Config, Event, FailKind, Tally};

/// Failed requests by kind (see [`FailKind`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Failures {
    pub reset: u64,
    pub timeout: u64,
    pub eof_mid_response: u64,
    pub eof_before_response: u64,
    pub eof_idle_keepalive: u64,
    pub status: u64,
    pub body_size: u64,
    pub body_checksum: u64,
    pub connect: u64,
    pub no_close: u64,
    pub protocol: u64,
    pub other: u64,
}

impl Failures {
    fn slot(&mut self, k: FailKind) -> &mut u64 {
        match k {
            FailKind::Reset => &mut self.reset,
            FailKind::Timeout => &mut self.timeout,
            FailKind::EofMidResponse => &mut self.eof_mid_response,
            FailKind::EofBeforeResponse => &mut self.eof_before_response,
            FailKind::EofIdleKeepalive => &mut self.eof_idle_keepalive,
            FailKind::Status => &mut self.status,
            FailKind::BodySize => &mut self.body_size,
            FailKind::BodyChecksum => &mut self.body_checksum,
            FailKind::Connect => &mut self.connect,
            FailKind::NoClose => &mut self.no_close,
            FailKind::Protocol => &mut self.protocol,
            FailKind::Other => &mut self.other,
        }
    }

    pub fn add(&mut self, k: FailKind) {
        *self.slot(k) += 1;
    }

    pub fn get(&self, k: FailKind) -> u64 {
        let mut copy = *self;
        *copy.slot(k)
    }

    pub fn total(&self) -> u64 {
        FailKind::ALL.iter().map(|&k| self.get(k)).sum()
    }

    fn merge(&mut self, o: &Failures) {
        for k in FailKind::ALL {
            *self.slot(k) += o.get(k);
        }
    }

    /// "3 resets, 1 timeouts" (the kinds that occurred), or "none".
    pub fn describe(&self) -> String {
        let parts: Vec<String> = FailKind::ALL
            .iter()
            .filter(|&&k| self.get(k) > 0)
            .map(|&k| format!("{} {}", self.get(k), k.describe()))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Latency of the successful requests, in µs: from the start of the
/// request (its connect, when it needed one) to its last body byte.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Latency {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            min_us: h.min(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// A successful request slower than the stall threshold.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stall {
    /// When the request started and ended, µs since the start.
    pub t_us: u64,
    pub end_us: u64,
    pub latency_us: u64,
    pub conn: usize,
    pub path: String,
    /// Index in [`Report::events`] of the last event before the request
    /// ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<usize>,
    /// Whether that event happened while the request was in flight (or is
    /// an upgrade still under way when it ended): the likely cause. (None
    /// only in the events file, written before the run's end.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub during_event: Option<bool>,
}

/// A failed request.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FailureRecord {
    /// When it failed and when it started, µs since the start.
    pub t_us: u64,
    pub start_us: u64,
    pub conn: usize,
    pub path: String,
    pub kind: FailKind,
    /// Whether the request went out on a connection that had already
    /// carried a response.
    pub reused: bool,
    pub detail: String,
    /// Index in [`Report::events`] of the last event before it started...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_before: Option<usize>,
    /// ...and of the first one while it ran (the likely cause).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_event_during: Option<usize>,
}

/// Everything one run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub addr: String,
    pub conns: usize,
    pub keep_alive: bool,
    pub files: usize,
    /// Wall-clock time of the start (ms since the Unix epoch), to line the
    /// `t_us` times up with other logs.
    pub start_unix_ms: u64,
    /// From the start until the last request in flight ended.
    pub elapsed_s: f64,
    /// Requests started: `ok + failed`.
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub failures: Failures,
    pub requests_per_sec: f64,
    /// Body bytes received and verified.
    pub body_bytes: u64,
    pub connections_opened: u64,
    pub latency: Latency,
    pub stall_ms: f64,
    pub stall_count: u64,
    /// Stalls during a kill or upgrade ([`Stall::during_event`]; counted
    /// over the stalls kept in [`Report::stalls`]).
    pub stalls_during_events: u64,
    /// The first stalls (all of them unless there were more than 10,000).
    pub stalls: Vec<Stall>,
    pub kills: u64,
    pub kills_missed: u64,
    pub upgrades: u64,
    pub upgrades_failed: u64,
    pub events: Vec<Event>,
    /// The first failures (at most 1,000), in time order.
    pub failure_records: Vec<FailureRecord>,
    /// All latencies (µs), for merging or other percentiles.
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

/// Index of the last event at or before `t_us`.
fn last_event_before(events: &[Event], t_us: u64) -> Option<usize> {
    events.partition_point(|e| e.t_us <= t_us).checked_sub(1)
}

pub(crate) fn build(
    cfg: &Config,
    log: &EventLog,
    tallies: Vec<Tally>,
    elapsed: Duration,
    start_unix_ms: u64,
) -> Report {
    let events = log.events();
    let mut hist = crate::new_histogram();
    let (mut ok, mut bytes, mut connects, mut stall_count) = (0, 0, 0, 0);
    let mut failures = Failures::default();
    let mut stalls = Vec::new();
    let mut failure_records = Vec::new();
    for t in tallies {
        ok += t.ok;
        bytes += t.body_bytes;
        connects += t.connects;
        stall_count += t.stalls;
        failures.merge(&t.failures);
        // Same bounds on both sides: cannot fail.
        let _ = hist.add(&t.hist);
        stalls.extend(t.stall_list);
        failure_records.extend(t.failure_list);
    }
    stalls.sort_by_key(|s| (s.t_us, s.conn));
    failure_records.sort_by_key(|f| (f.t_us, f.conn));
    for s in &mut stalls {
        s.event = last_event_before(&events, s.end_us);
        s.during_event = Some(s.event.is_some_and(|i| {
            events[i].t_us >= s.t_us || matches!(events[i].kind, EventKind::UpgradeStart { .. })
        }));
    }
    for f in &mut failure_records {
        f.event_before = last_event_before(&events, f.start_us);
        let first_after = f.event_before.map_or(0, |i| i + 1);
        f.first_event_during = events
            .get(first_after)
            .filter(|e| e.t_us <= f.t_us)
            .map(|_| first_after);
    }
    let count = |p: fn(&EventKind) -> bool| events.iter().filter(|e| p(&e.kind)).count() as u64;
    let failed = failures.total();
    Report {
        addr: cfg.addr.to_string(),
        conns: cfg.conns,
        keep_alive: !cfg.close,
        files: cfg.files.files.len(),
        start_unix_ms,
        elapsed_s: elapsed.as_secs_f64(),
        requests: ok + failed,
        ok,
        failed,
        failures,
        requests_per_sec: ok as f64 / elapsed.as_secs_f64().max(1e-9),
        body_bytes: bytes,
        connections_opened: connects,
        latency: Latency::of(&hist),
        stall_ms: cfg.stall.as_secs_f64() * 1e3,
        stall_count,
        stalls_during_events: stalls
            .iter()
            .filter(|s| s.during_event == Some(true))
            .count() as u64,
        stalls,
        kills: count(|k| matches!(k, EventKind::Kill { .. })),
        kills_missed: count(|k| matches!(k, EventKind::KillMissed { .. })),
        upgrades: count(
            |k| matches!(k, EventKind::UpgradeEnd { outcome, .. } if outcome == "done"),
        ),
        upgrades_failed: count(
            |k| matches!(k, EventKind::UpgradeEnd { outcome, .. } if outcome != "done"),
        ),
        events,
        failure_records,
        histogram: hist,
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn secs(us: u64) -> String {
    format!("+{:.3} s", us as f64 / 1e6)
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (n as f64, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Events shown one per line in the text summary; beyond that, only those
/// with stalls or failures.
const TIMELINE_ALL: usize = 24;
const TIMELINE_MAX: usize = 40;

impl Report {
    /// The human-readable summary `hf-load` prints.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "hf-load: {} {} connections to {} for {:.1} s, {} files",
            self.conns,
            if self.keep_alive {
                "keep-alive"
            } else {
                "connection-per-request"
            },
            self.addr,
            self.elapsed_s,
            self.files
        );
        let _ = writeln!(
            o,
            "requests     {} ok, {} failed  ({:.0} req/s, {} of bodies verified, {}/s; {} connections opened)",
            thousands(self.ok),
            thousands(self.failed),
            self.requests_per_sec,
            bytes(self.body_bytes),
            bytes((self.body_bytes as f64 / self.elapsed_s.max(1e-9)) as u64),
            thousands(self.connections_opened)
        );
        let _ = writeln!(o, "failures     {}", self.failures.describe());
        let l = &self.latency;
        let _ = writeln!(
            o,
            "latency      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, n={})",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us),
            ms(l.mean_us as u64),
            thousands(l.count)
        );
        let worst = self.stalls.iter().max_by_key(|s| s.latency_us);
        let _ = writeln!(
            o,
            "stalls       {} over {} ms{}",
            thousands(self.stall_count),
            self.stall_ms,
            match worst {
                Some(w) => format!(
                    ", {} of them during a kill or upgrade; worst {} at {} ({})",
                    self.stalls_during_events,
                    ms(w.latency_us),
                    secs(w.t_us),
                    w.path
                ),
                None => String::new(),
            }
        );
        if !self.events.is_empty() {
            let _ = writeln!(
                o,
                "events       {} kills ({} missed), {} upgrades done, {} failed",
                self.kills, self.kills_missed, self.upgrades, self.upgrades_failed
            );
            self.timeline(&mut o);
        }
        if !self.failure_records.is_empty() {
            let _ = writeln!(o, "first failures:");
            for f in self.failure_records.iter().take(10) {
                let _ = writeln!(
                    o,
                    "  {} conn {} GET {} (started {}): {:?}: {}",
                    secs(f.t_us),
                    f.conn,
                    f.path,
                    secs(f.start_us),
                    f.kind,
                    f.detail,
                );
                if let Some(i) = f.first_event_during {
                    let e = &self.events[i];
                    let _ = writeln!(
                        o,
                        "      during it, at {}: {}",
                        secs(e.t_us),
                        e.kind.label()
                    );
                } else if let Some(i) = f.event_before {
                    let e = &self.events[i];
                    let _ = writeln!(
                        o,
                        "      no event while it ran; the last before it, at {}: {}",
                        secs(e.t_us),
                        e.kind.label()
                    );
                }
            }
        }
        o
    }

    /// One line per event with the stalls and failures it likely caused
    /// (a failure goes with the first event while it ran, else with the
    /// last one before it started).
    fn timeline(&self, o: &mut String) {
        let n = self.events.len();
        let mut stalls = vec![(0u64, 0u64); n];
        for s in &self.stalls {
            if let Some(i) = s.event {
                stalls[i].0 += 1;
                stalls[i].1 = stalls[i].1.max(s.latency_us);
            }
        }
        let mut fails = vec![0u64; n];
        for f in &self.failure_records {
            if let Some(i) = f.first_event_during.or(f.event_before) {
                fails[i] += 1;
            }
        }
        let all = n <= TIMELINE_ALL;
        let mut shown = 0;
        for (i, e) in self.events.iter().enumerate() {
            if !all && stalls[i].0 == 0 && fails[i] == 0 {
                continue;
            }
            if shown == TIMELINE_MAX {
                let _ = writeln!(o, "  ... (all events: --json or --events FILE)");
                break;
            }
            shown += 1;
            let mut tail = String::new();
            if stalls[i].0 > 0 {
                let _ = write!(
                    tail,
                    "  → {} stalls, worst {}",
                    stalls[i].0,
                    ms(stalls[i].1)
                );
            }
            if fails[i] > 0 {
                let _ = write!(tail, "  → {} FAILED", fails[i]);
            }
            let _ = writeln!(o, "  {:>10}  {}{tail}", secs(e.t_us), e.kind.label());
        }
        if !all && shown == 0 {
            let _ = writeln!(o, "  (no stall or failure followed any of the {n} events)");
        }
    }
}
