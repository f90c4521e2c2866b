//! # hf-load — load a server and verify every byte it sends
//!
//! N connections (a thread each, blocking sockets) fetch files for a fixed
//! time, keep-alive or one connection per request. Every response must be
//! `200` with exactly the file's bytes: its size and CRC-32C are known in
//! advance ([`FileSet`]), and the body is checksummed as it arrives, so
//! large files cost no memory. Failures are counted by kind ([`FailKind`]:
//! reset, timeout, closed mid-response, idle keep-alive closed, wrong
//! status, wrong size, wrong checksum, connect error, not closed after
//! `Connection: close`, malformed response or unasked-for bytes),
//! latencies of the good ones go into an HDR histogram, and a request slower
//! than the stall threshold is a **stall**, recorded with its time.
//!
//! Optionally, while the load runs, the active worker of a holdfast keeper
//! is SIGKILLed every X ms and/or `holdfast upgrade` runs every Y ms; each
//! of those events is logged with its time since the start, so stalls and
//! failures can be lined up with what caused them ([`Report::stalls`]
//! carries the event each stall overlapped).
//!
//! The `hf-load` binary is a thin wrapper; integration tests call [`run`]
//! in-process:
//!
//! ```no_run
//! # fn main() -> Result<(), hf_load::Error> {
//! let files = hf_load::FileSet::from_site("/srv/www".as_ref())?;
//! let mut cfg = hf_load::Config::new("127.0.0.1:8080".parse().unwrap(), files);
//! cfg.conns = 16;
//! cfg.duration = std::time::Duration::from_secs(3);
//! let report = hf_load::run(&cfg)?;
//! assert_eq!(report.failed, 0, "{}", report.text());
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod files;
mod http;
mod report;
mod schedule;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub use files::{url_path, FileSet, FileSpec};
pub use http::FailKind;
pub use report::{FailureRecord, Failures, Latency, Report, Stall};
pub use schedule::{Event, EventKind};

/// A setup problem: nothing was loaded (the binary exits 2 on these).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, err: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            err,
        }
    }
}

/// What to load, how, and what to do to the server meanwhile.
#[derive(Clone, Debug)]
pub struct Config {
    /// The server; the only address connected to.
    pub addr: SocketAddr,
    /// The request mix and the expected bodies.
    pub files: FileSet,
    /// Connections, each its own thread.
    pub conns: usize,
    /// How long to send new requests (requests in flight then may take up
    /// to `timeout` more).
    pub duration: Duration,
    /// One connection per request (`Connection: close`) instead of
    /// keep-alive.
    pub close: bool,
    /// A request not answered completely within this is a timeout.
    pub timeout: Duration,
    /// A request slower than this (but successful) is a stall.
    pub stall: Duration,
    /// SIGKILL the keeper's active worker this often.
    pub kill_every: Option<Duration>,
    /// Run `holdfast upgrade` this often (the next starts when the last has
    /// ended, if it took longer).
    pub upgrade_every: Option<Duration>,
    /// The keeper's control socket (needed for kills and upgrades).
    pub control: Option<PathBuf>,
    /// The `holdfast` binary for upgrades (default: next to this executable
    /// or its parent directory, else on PATH).
    pub holdfast: Option<PathBuf>,
    /// More arguments for `holdfast upgrade` (e.g. `--settle 0`, or `--`
    /// and a new command).
    pub upgrade_args: Vec<String>,
    /// Where to write events, stalls and failures as JSON lines.
    pub events: Option<PathBuf>,
    /// Seeds each connection's choice of files, so runs are repeatable.
    pub seed: u64,
}

impl Config {
    /// 64 keep-alive connections for 10 s, 5 s timeout, 100 ms stalls, no
    /// kills or upgrades.
    pub fn new(addr: SocketAddr, files: FileSet) -> Config {
        Config {
            addr,
            files,
            conns: 64,
            duration: Duration::from_secs(10),
            close: false,
            timeout: Duration::from_secs(5),
            stall: Duration::from_millis(100),
            kill_every: None,
            upgrade_every: None,
            control: None,
            holdfast: None,
            upgrade_args: Vec::new(),
            events: None,
            seed: 1,
        }
    }
}

/// Kept per connection and in all; the report keeps at most this many
/// stall and failure records (the counts are always complete, and the
/// events file gets every one).
const MAX_STALL_RECORDS: usize = 10_000;
const MAX_FAILURE_RECORDS: usize = 1_000;

/// What the client threads share.
struct Shared {
    addr: SocketAddr,
    files: Vec<FileSpec>,
    requests: Vec<Vec<u8>>,
    close: bool,
    timeout: Duration,
    stall: Duration,
    seed: u64,
    deadline: Instant,
    stop: AtomicBool,
    log: schedule::EventLog,
    stall_cap: usize,
    failure_cap: usize,
}

/// One connection thread's tally.
struct Tally {
    ok: u64,
    failures: Failures,
    body_bytes: u64,
    connects: u64,
    stalls: u64,
    hist: Histogram<u64>,
    stall_list: Vec<Stall>,
    failure_list: Vec<FailureRecord>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits; longer values saturate.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Runs the load (and the kill/upgrade schedules) for `cfg.duration` and
/// reports what the clients saw. Errors only for setup problems: bad
/// configuration, nothing listening at the address, no keeper at the
/// control socket, no `holdfast` binary.
pub fn run(cfg: &Config) -> Result<Report, Error> {
    if cfg.conns == 0 {
        return Err(Error::Setup("--conns must be at least 1".into()));
    }
    if cfg.duration.is_zero() || cfg.timeout.is_zero() {
        return Err(Error::Setup(
            "--secs and --timeout-ms must be more than 0".into(),
        ));
    }
    if cfg.files.files.is_empty() {
        return Err(Error::Setup("no files to request".into()));
    }
    if cfg.kill_every.is_some_and(|d| d.is_zero()) || cfg.upgrade_every.is_some_and(|d| d.is_zero())
    {
        return Err(Error::Setup(
            "--kill-every-ms and --upgrade-every-ms must be more than 0".into(),
        ));
    }
    let keeper = if cfg.kill_every.is_some() || cfg.upgrade_every.is_some() {
        let Some(control) = &cfg.control else {
            return Err(Error::Setup(
                "a kill or upgrade schedule needs the keeper's control socket (--control PATH)"
                    .into(),
            ));
        };
        schedule::check_keeper(control, cfg.addr)?;
        Some(control.clone())
    } else {
        None
    };
    let holdfast = match cfg.upgrade_every {
        Some(_) => Some(schedule::find_holdfast(cfg.holdfast.as_deref())?),
        None => None,
    };
    TcpStream::connect_timeout(&cfg.addr, cfg.timeout).map_err(|e| {
        Error::Setup(format!(
            "nothing accepts connections on {} ({e}); is the server running?",
            cfg.addr
        ))
    })?;

    let host = cfg.addr.to_string();
    let t0 = Instant::now();
    let start_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let log = schedule::EventLog::open(cfg.events.as_deref(), t0)?;
    log.record_line(
        "start",
        &StartLine {
            t_us: 0,
            unix_ms: start_unix_ms,
            addr: &host,
            conns: cfg.conns,
            keep_alive: !cfg.close,
            secs: cfg.duration.as_secs_f64(),
            files: cfg.files.files.len(),
        },
    );
    let shared = Arc::new(Shared {
        addr: cfg.addr,
        requests: cfg
            .files
            .files
            .iter()
            .map(|f| http::request_bytes(f, &host, cfg.close))
            .collect(),
        files: cfg.files.files.clone(),
        close: cfg.close,
        timeout: cfg.timeout,
        stall: cfg.stall,
        seed: cfg.seed,
        deadline: t0 + cfg.duration,
        stop: AtomicBool::new(false),
        log,
        stall_cap: MAX_STALL_RECORDS.div_ceil(cfg.conns),
        failure_cap: MAX_FAILURE_RECORDS.div_ceil(cfg.conns),
    });

    let mut clients = Vec::with_capacity(cfg.conns);
    for i in 0..cfg.conns {
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("hf-load-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || client(i, &sh));
        match spawned {
            Ok(h) => clients.push(h),
            Err(e) => {
                shared.stop.store(true, Ordering::Relaxed);
                for h in clients {
                    let _ = h.join();
                }
                return Err(Error::io(format!("starting connection thread {i}"), e));
            }
        }
    }
    let killer = match (cfg.kill_every, &keeper) {
        (Some(every), Some(control)) => {
            let (sh, control) = (shared.clone(), control.clone());
            Some(std::thread::spawn(move || {
                schedule::kills(&sh.log, &control, every, sh.deadline, &sh.stop)
            }))
        }
        _ => None,
    };
    let upgrader = match (cfg.upgrade_every, &keeper, holdfast) {
        (Some(every), Some(control), Some(bin)) => {
            let (sh, control, args) = (shared.clone(), control.clone(), cfg.upgrade_args.clone());
            Some(std::thread::spawn(move || {
                schedule::upgrades(&sh.log, &bin, &control, &args, every, sh.deadline, &sh.stop)
            }))
        }
        _ => None,
    };

    let tallies: Vec<Tally> = clients
        .into_iter()
        .map(|h| h.join().expect("connection thread panicked"))
        .collect();
    let load_end = Instant::now();
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(h) = killer {
        h.join().expect("kill schedule thread panicked");
    }
    if let Some(h) = upgrader {
        h.join().expect("upgrade schedule thread panicked");
    }
    let report = report::build(cfg, &shared.log, tallies, load_end - t0, start_unix_ms);
    shared.log.record_line(
        "end",
        &EndLine {
            t_us: shared.log.us(load_end),
            ok: report.ok,
            failed: report.failed,
            stalls: report.stall_count,
            kills: report.kills,
            upgrades: report.upgrades,
        },
    );
    shared.log.finish()?;
    Ok(report)
}

/// The first line of the events file.
#[derive(serde::Serialize)]
struct StartLine<'a> {
    t_us: u64,
    unix_ms: u64,
    addr: &'a str,
    conns: usize,
    keep_alive: bool,
    secs: f64,
    files: usize,
}

/// The last line of the events file.
#[derive(serde::Serialize)]
struct EndLine {
    t_us: u64,
    ok: u64,
    failed: u64,
    stalls: u64,
    kills: u64,
    upgrades: u64,
}

/// xorshift64*: a cheap, seedable choice of the next file.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One connection's loop: requests until the deadline.
fn client(ix: usize, sh: &Shared) -> Tally {
    let mut t = Tally {
        ok: 0,
        failures: Failures::default(),
        body_bytes: 0,
        connects: 0,
        stalls: 0,
        hist: new_histogram(),
        stall_list: Vec::new(),
        failure_list: Vec::new(),
    };
    let mut rng = Rng((sh.seed ^ (ix as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
    let mut conn: Option<http::Conn> = None;
    while !sh.stop.load(Ordering::Relaxed) && Instant::now() < sh.deadline {
        let fi = (rng.next() % sh.files.len() as u64) as usize;
        let file = &sh.files[fi];
        let started = Instant::now();
        if conn.is_none() {
            t.connects += 1;
        }
        let reused = conn.as_ref().is_some_and(|c| c.responses > 0);
        match http::fetch(
            &mut conn,
            sh.addr,
            file,
            &sh.requests[fi],
            sh.close,
            sh.timeout,
            started,
        ) {
            Ok(done) => {
                let lat = done.at - started;
                t.ok += 1;
                t.body_bytes += done.body_bytes;
                t.hist.saturating_record((lat.as_micros() as u64).max(1));
                if lat > sh.stall {
                    t.stalls += 1;
                    let s = Stall {
                        t_us: sh.log.us(started),
                        end_us: sh.log.us(done.at),
                        latency_us: lat.as_micros() as u64,
                        conn: ix,
                        path: file.path.clone(),
                        event: None,
                        during_event: None,
                    };
                    sh.log.record_line("stall", &s);
                    if t.stall_list.len() < sh.stall_cap {
                        t.stall_list.push(s);
                    }
                }
            }
            Err(f) => {
                let now = Instant::now();
                t.failures.add(f.kind);
                let r = FailureRecord {
                    t_us: sh.log.us(now),
                    start_us: sh.log.us(started),
                    conn: ix,
                    path: file.path.clone(),
                    kind: f.kind,
                    reused,
                    detail: f.detail,
                    event_before: None,
                    first_event_during: None,
                };
                sh.log.record_line("failure", &r);
                if t.failure_list.len() < sh.failure_cap {
                    t.failure_list.push(r);
                }
                if f.kind == FailKind::Connect {
                    // Do not spin on a server that is not there; a refused
                    // connection is counted, not retried in a tight loop.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::AtomicU64;

    /// A tiny keep-alive HTTP server over `files`; the first non-empty
    /// response from the `bad`-th on (counting from 1 over all connections;
    /// 0: none) gets a flipped body byte.
    fn serve(files: Vec<(String, Vec<u8>)>, bad: u64) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let files = Arc::new(files);
        let served = Arc::new(AtomicU64::new(0));
        let corrupted = Arc::new(AtomicBool::new(false));
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let (files, served, corrupted) = (files.clone(), served.clone(), corrupted.clone());
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut b = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut b) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&b[..n]),
                            }
                            continue;
                        };
                        let req = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let path = req.split(' ').nth(1).unwrap_or("");
                        let close = req.contains("Connection: close");
                        let body = files.iter().find(|(p, _)| p == path).map(|(_, b)| b);
                        let mut out = match body {
                            Some(b) => {
                                let mut o = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                    b.len()
                                )
                                .into_bytes();
                                o.extend_from_slice(b);
                                let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                                if bad > 0
                                    && n >= bad
                                    && !b.is_empty()
                                    && !corrupted.swap(true, Ordering::Relaxed)
                                {
                                    *o.last_mut().unwrap() ^= 1;
                                }
                                o
                            }
                            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                        };
                        if s.write_all(&out).is_err() || close {
                            return;
                        }
                        out.clear();
                    }
                });
            }
        });
        addr
    }

    fn site() -> (Vec<(String, Vec<u8>)>, FileSet) {
        let files: Vec<(String, Vec<u8>)> = [0usize, 1, 1000, 70_000, 300_000]
            .iter()
            .map(|&n| {
                (
                    format!("/f{n}"),
                    (0..n).map(|i| (i * 7 + n) as u8).collect(),
                )
            })
            .collect();
        let set = FileSet::new(
            files
                .iter()
                .map(|(p, b)| FileSpec::of_bytes(p.clone(), b))
                .collect(),
        );
        (files, set)
    }

    #[test]
    fn clean_server_keep_alive_and_close() {
        let (files, set) = site();
        let addr = serve(files, 0);
        for close in [false, true] {
            let mut cfg = Config::new(addr, set.clone());
            cfg.conns = 4;
            cfg.duration = Duration::from_millis(300);
            cfg.close = close;
            let r = run(&cfg).unwrap();
            assert_eq!(r.failed, 0, "{}", r.text());
            assert!(r.ok > 20, "{}", r.text());
            assert_eq!(r.latency.count, r.ok);
            if close {
                assert_eq!(r.connections_opened, r.ok);
            } else {
                assert_eq!(r.connections_opened, 4);
            }
        }
    }

    #[test]
    fn a_corrupt_body_fails_its_request_only() {
        let (files, set) = site();
        let addr = serve(files, 5);
        let mut cfg = Config::new(addr, set);
        cfg.conns = 2;
        cfg.duration = Duration::from_millis(300);
        let events = std::env::temp_dir().join(format!("hf-load-events-{}", std::process::id()));
        cfg.events = Some(events.clone());
        let r = run(&cfg).unwrap();
        let log = std::fs::read_to_string(&events).unwrap();
        let _ = std::fs::remove_file(&events);
        assert_eq!(r.failed, 1, "{}", r.text());
        assert_eq!(r.failures.body_checksum, r.failed);
        assert_eq!(r.failure_records.len() as u64, r.failed);
        assert!(r.ok > 20);
        assert!(log.starts_with("{\"event\":\"start\""), "{log}");
        assert!(log.trim_end().ends_with('}') && log.contains("\"event\":\"end\""));
        assert_eq!(
            log.matches("\"event\":\"failure\"").count() as u64,
            r.failed
        );
    }

    #[test]
    fn setup_errors() {
        let (_, set) = site();
        let gone = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = Config::new(gone, set.clone());
        let e = run(&cfg).unwrap_err().to_string();
        assert!(e.contains("nothing accepts connections"), "{e}");
        let mut cfg = Config::new(gone, set);
        cfg.kill_every = Some(Duration::from_millis(10));
        let e = run(&cfg).unwrap_err().to_string();
        assert!(e.contains("--control"), "{e}");
    }
}
