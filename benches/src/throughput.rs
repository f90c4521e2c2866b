//! `hf-bench throughput`: the same hf-httpd binary alone (pass-through) and
//! under the keeper, side by side in one run, with a built-in keep-alive
//! load generator, and with `wrk` when it is installed.
//!
//! Each round gives each mode `secs` seconds, in slices of `slice_ms` taken
//! in turns (plain, kept, kept, plain, plain, kept, ...): on a shared,
//! noisy machine a burst of outside load then hits both modes alike. Both
//! servers run for the whole benchmark; only one is loaded at a time.
//!
//! The load generator: `conns` keep-alive connections split over a few
//! threads; each thread sends one `GET` on each of its connections, then
//! reads each full response (Content-Length), and again, until the slice is
//! over — every connection always has one request in flight, none is left
//! in flight between slices. Bodies are checked against the file.
//!
//! Before the load, both sides sit idle for a few seconds and what each
//! process does meanwhile is counted (CPU time and wake-ups, per second): a
//! worker under the keeper wakes for its heartbeat (every 50 ms in the tokio
//! flavour), the same binary alone does not, so the difference bounds what
//! the heartbeat costs.
//!
//! `--hang-timeout MS` compares two keepers instead: A runs hf-httpd without
//! `--hang-timeout`, B with it. The worker beats on both sides (the library
//! always does under a keeper); what differs is the keeper reading the
//! beats, every MS / 4 instead of never. `--hang-timeout 0` gives B the
//! keeper's "off" too: an A/A run, the noise floor of the comparison. Each
//! round starts a fresh pair, in alternating order: two keepers running the
//! same code can differ by a few per cent for as long as they live, which
//! one pair for the whole run would report as an effect.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::common::{
    active_pid, bin, free_port, median_f, wait_listening, Keeper, Proc, Row, TempDir, LOG_FILTER,
};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    pub secs: u64,
    /// Rounds; each round measures both sides (plain and kept, or A and B),
    /// for each file.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32)]
    pub conns: usize,
    /// Load generator threads.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Within a round, the two sides take turns in slices this long
    /// (plain, kept, kept, plain, ...), so bursts of outside noise hit both.
    #[arg(long, default_value_t = 250)]
    pub slice_ms: u64,
    /// Instead of hf-httpd alone against hf-httpd under the keeper, compare
    /// the keeper without `--hang-timeout` (A) against the keeper with
    /// `--hang-timeout MS` (B): what watching the workers' heartbeat costs.
    /// 0 runs B with the timeout off too (A/A: the noise floor). A fresh
    /// pair of keepers each round.
    #[arg(long, value_name = "MS")]
    pub hang_timeout: Option<u64>,
    /// Sizes of the files fetched, in KiB (each measured on its own).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub sizes: Vec<usize>,
    /// A new connection for every request (`Connection: close`), instead of
    /// keep-alive: the accept path, where the keeper is involved, on every
    /// request. wrk is not used then.
    #[arg(long)]
    pub close: bool,
    /// Serve hf-chat's `GET /hello?n=1` (axum on holdfast-http) instead of
    /// hf-httpd's files.
    #[arg(long)]
    pub chat: bool,
    /// Do not use wrk even when it is installed (shorter runs).
    #[arg(long)]
    pub no_wrk: bool,
}

/// How long both sides sit idle before the load, to count their wake-ups.
const IDLE: Duration = Duration::from_secs(2);

/// One side of the comparison.
pub(crate) struct Server {
    /// "plain" / "kept", or "A" / "B" for `--hang-timeout`.
    pub(crate) name: &'static str,
    pub(crate) addr: SocketAddr,
    /// Processes whose CPU time counts for this side; with a keeper, the
    /// keeper first, then its active worker.
    pub(crate) pids: Vec<u32>,
    /// The service's file name, for messages.
    prog: String,
    host: Host,
}

/// What serves one side; stopped on drop.
enum Host {
    /// The service on its own listener (pass-through).
    Alone(Proc),
    Kept(Keeper),
}

impl Server {
    /// The service alone, the same binary, its own listener.
    fn alone(svc: &[&OsStr], root: &Path) -> anyhow::Result<Server> {
        Server::spawn_alone("plain", svc, &root.join("plain.log"))
    }

    /// hf-httpd under a keeper (one standby) with `extra` options.
    fn kept(name: &'static str, svc: &[&OsStr], extra: &[&str]) -> anyhow::Result<Server> {
        Server::spawn_kept(name, extra, svc)
    }

    /// `cmd` (a service on the holdfast library) run alone, in pass-through
    /// mode, with `--listen` on a free loopback port; its output to `log`.
    pub(crate) fn spawn_alone(
        name: &'static str,
        cmd: &[&OsStr],
        log: &Path,
    ) -> anyhow::Result<Server> {
        let (prog, args) = cmd.split_first().context("empty command")?;
        let prog_name = file_name(prog);
        let addr = free_port()?;
        let mut c = Command::new(prog);
        c.args(args)
            .arg("--listen")
            .arg(addr.to_string())
            .env("HOLDFAST_LOG", LOG_FILTER);
        let mut p = Proc::spawn(&mut c, log)?;
        wait_listening(
            addr,
            &mut p,
            &format!("{prog_name} (pass-through)"),
            Duration::from_secs(10),
        )?;
        Ok(Server {
            name,
            addr,
            pids: vec![p.pid()],
            prog: prog_name,
            host: Host::Alone(p),
        })
    }

    /// `cmd` under a keeper (one standby) with `extra` `holdfast run` options.
    pub(crate) fn spawn_kept(
        name: &'static str,
        extra: &[&str],
        cmd: &[&OsStr],
    ) -> anyhow::Result<Server> {
        let prog = cmd.first().map(|p| file_name(p)).context("empty command")?;
        let keeper = Keeper::start_with(1, extra, cmd)?;
        let worker = active_pid(&keeper.status()?).context("no active worker")?;
        Ok(Server {
            name,
            addr: keeper.addr,
            pids: vec![keeper.pid(), worker],
            prog,
            host: Host::Kept(keeper),
        })
    }

    pub(crate) fn describe(&self) -> String {
        match &self.host {
            Host::Alone(p) => format!("{} pid {} on {}", self.prog, p.pid(), self.addr),
            Host::Kept(k) => format!(
                "keeper pid {} + {} worker pid {} on {} (1 standby)",
                k.pid(),
                self.prog,
                self.pids[1],
                self.addr
            ),
        }
    }

    /// Err if the server died; a warning if its worker was replaced (its
    /// CPU time is then no longer counted).
    pub(crate) fn check(&mut self) -> anyhow::Result<()> {
        match &mut self.host {
            Host::Alone(p) => p.check_alive(&format!("{} (pass-through)", self.prog)),
            Host::Kept(k) => {
                let snap = k.status().context("keeper status")?;
                if snap.restarts != 0 {
                    println!(
                        "warning: the {} worker restarted {} times during the run",
                        self.name, snap.restarts
                    );
                }
                Ok(())
            }
        }
    }
}

fn file_name(p: &OsStr) -> String {
    Path::new(p)
        .file_name()
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

/// CPU time and wake-ups of a process, all threads: nanoseconds on a CPU
/// and context switches (voluntary + involuntary), from /proc.
fn sched_of(pid: u32) -> Option<(u64, u64)> {
    let mut cpu = 0;
    let mut switches = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = t.ok()?.path();
        let stat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
        cpu += stat.split_whitespace().next()?.parse::<u64>().ok()?;
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        for l in status.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().ok()?;
            }
        }
    }
    Some((cpu, switches))
}

/// Per second of `IDLE` with no load, for each pid of each side: (CPU µs,
/// wake-ups).
fn idle_cost(servers: &[&Server]) -> Vec<Vec<(f64, f64)>> {
    let before: Vec<Vec<Option<(u64, u64)>>> = servers
        .iter()
        .map(|s| s.pids.iter().map(|p| sched_of(*p)).collect())
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(IDLE);
    let secs = t0.elapsed().as_secs_f64();
    servers
        .iter()
        .zip(before)
        .map(|(s, b)| {
            s.pids
                .iter()
                .zip(b)
                .map(|(p, b)| match (b, sched_of(*p)) {
                    (Some((c0, w0)), Some((c1, w1))) => (
                        c1.saturating_sub(c0) as f64 / 1e3 / secs,
                        w1.saturating_sub(w0) as f64 / secs,
                    ),
                    _ => (f64::NAN, f64::NAN),
                })
                .collect()
        })
        .collect()
}

/// CPU time (user + system, all threads) of `pid`, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime, stime are 14, 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

pub(crate) fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_secs(*p)).sum()
}

/// Files of `sizes_kib` KiB of pseudo-random bytes in `dir`, named `{k}k.bin`:
/// their URL paths and contents.
pub(crate) fn write_site(
    dir: &Path,
    sizes_kib: &[usize],
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for &k in sizes_kib {
        let (name, len) = (format!("{k}k.bin"), k * 1024);
        let body: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(dir.join(&name), &body)?;
        out.push((format!("/{name}"), body));
    }
    Ok(out)
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads one full response; checks the status and the body (framed by
    /// Content-Length, or chunked: a CGI program's answer).
    fn read_response(&mut self, scratch: &mut [u8], body: &[u8]) -> anyhow::Result<()> {
        let mut head_end = None;
        let mut searched = 0;
        loop {
            if head_end.is_none() {
                if let Some(p) = self.buf[searched..]
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                {
                    head_end = Some(searched + p + 4);
                } else {
                    searched = self.buf.len().saturating_sub(3);
                }
            }
            if let Some(h) = head_end {
                let head =
                    std::str::from_utf8(&self.buf[..h]).context("response head is not UTF-8")?;
                if !head.starts_with("HTTP/1.1 200") {
                    bail!("unexpected response: {}", head.lines().next().unwrap_or(""));
                }
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim())
                    })
                };
                if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                    if let Some(end) = dechunk_check(&self.buf[h..], body)? {
                        self.buf.drain(..h + end);
                        return Ok(());
                    }
                } else {
                    let cl: usize = header("content-length")
                        .and_then(|v| v.parse().ok())
                        .context("no Content-Length")?;
                    if self.buf.len() >= h + cl {
                        if cl != body.len() || self.buf[h..h + cl] != *body {
                            bail!("body differs from the file ({cl} bytes)");
                        }
                        self.buf.drain(..h + cl);
                        return Ok(());
                    }
                }
            }
            let n = self.s.read(scratch)?;
            if n == 0 {
                bail!("server closed the connection");
            }
            self.buf.extend_from_slice(&scratch[..n]);
        }
    }
}

/// A complete chunked body (no trailers) at the start of `buf`, checked
/// against `body`: the bytes it takes, or `None` if more must be read.
fn dechunk_check(buf: &[u8], body: &[u8]) -> anyhow::Result<Option<usize>> {
    let (mut at, mut got) = (0, 0);
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size = std::str::from_utf8(&buf[at..at + eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .context("bad chunk size line")?;
        let data = at + eol + 2;
        if buf.len() < data + size + 2 {
            return Ok(None);
        }
        if &buf[data + size..data + size + 2] != b"\r\n" {
            bail!("chunk not followed by CRLF");
        }
        if body.get(got..got + size) != Some(&buf[data..data + size]) {
            bail!("chunked body differs from the expected one");
        }
        got += size;
        at = data + size + 2;
        if size == 0 {
            if got != body.len() {
                bail!("chunked body of {got} bytes, {} expected", body.len());
            }
            return Ok(Some(at));
        }
    }
}

/// Keep-alive connections to one server, split among load threads, kept
/// open across measurement slices.
pub(crate) struct Pool {
    addr: SocketAddr,
    groups: Vec<Vec<Conn>>,
    req: Vec<u8>,
    /// A new connection for each request (`--close`).
    close: bool,
}

impl Pool {
    /// `conns` connections to `addr`, each asking for `path` (an absolute
    /// URL for a proxy), over `threads` threads.
    pub(crate) fn connect(
        addr: SocketAddr,
        path: &str,
        conns: usize,
        threads: usize,
    ) -> anyhow::Result<Pool> {
        Pool::connect_with(addr, path, conns, threads, false)
    }

    /// [`Pool::connect`]; with `close`, every request goes out on a new
    /// connection and asks the server to close it after the answer.
    fn connect_with(
        addr: SocketAddr,
        path: &str,
        conns: usize,
        threads: usize,
        close: bool,
    ) -> anyhow::Result<Pool> {
        let threads = threads.clamp(1, conns.max(1));
        let mut groups = Vec::with_capacity(threads);
        for t in 0..threads {
            let mine = conns / threads + usize::from(t < conns % threads);
            let mut g = Vec::with_capacity(mine);
            for _ in 0..mine {
                let s = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                g.push(Conn {
                    s,
                    buf: Vec::with_capacity(64 * 1024),
                });
            }
            groups.push(g);
        }
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: hf-bench\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        Ok(Pool {
            addr,
            groups,
            req,
            close,
        })
    }

    /// Drives every connection for `dur` (one request in flight on each,
    /// always); returns (responses, seconds). Nothing is left in flight.
    pub(crate) fn run(&mut self, body: &[u8], dur: Duration) -> anyhow::Result<(u64, f64)> {
        let barrier = Barrier::new(self.groups.len() + 1);
        let req = &self.req;
        let addr = self.addr;
        let close = self.close;
        std::thread::scope(|sc| -> anyhow::Result<(u64, f64)> {
            let mut hs = Vec::new();
            for g in self.groups.iter_mut() {
                let barrier = &barrier;
                hs.push(sc.spawn(move || -> anyhow::Result<u64> {
                    barrier.wait();
                    let deadline = Instant::now() + dur;
                    let mut scratch = vec![0u8; 64 * 1024];
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        for c in g.iter_mut() {
                            if close {
                                // The previous answer ended with the server closing.
                                c.s = TcpStream::connect(addr)
                                    .with_context(|| format!("connect to {addr}"))?;
                                c.s.set_nodelay(true)?;
                                c.s.set_read_timeout(Some(Duration::from_secs(10)))?;
                                c.buf.clear();
                            }
                            c.s.write_all(req)
                                .with_context(|| format!("sending to {addr}"))?;
                        }
                        for c in g.iter_mut() {
                            c.read_response(&mut scratch, body)
                                .with_context(|| format!("response from {addr}"))?;
                            n += 1;
                        }
                    }
                    Ok(n)
                }));
            }
            barrier.wait();
            let t0 = Instant::now();
            let mut total = 0;
            for h in hs {
                total += h
                    .join()
                    .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
            }
            Ok((total, t0.elapsed().as_secs_f64()))
        })
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn run_wrk(
    wrk: &Path,
    addr: SocketAddr,
    path: &str,
    conns: usize,
    threads: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let out = Command::new(wrk)
        .args([
            format!("-t{threads}"),
            format!("-c{conns}"),
            format!("-d{secs}s"),
            format!("http://{addr}{path}"),
        ])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        eprintln!("wrk reported errors:\n{text}");
    }
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Requests/sec:")
                .and_then(|v| v.trim().parse().ok())
        })
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))
}

/// The two sides, started (in alternating order, by `round`) and warmed
/// up: hf-httpd alone and under a keeper, or two keepers, without and with
/// `--hang-timeout`.
fn start_pair(
    a: &Args,
    svc: &[&OsStr],
    root: &Path,
    files: &[(String, Vec<u8>)],
    round: usize,
) -> anyhow::Result<(Server, Server)> {
    let pair = match a.hang_timeout {
        None => (Server::alone(svc, root)?, Server::kept("kept", svc, &[])?),
        Some(ms) => {
            let ms = ms.to_string();
            let start_a = || Server::kept("A", svc, &[]);
            let start_b = || Server::kept("B", svc, &["--hang-timeout", &ms]);
            if round.is_multiple_of(2) {
                let sa = start_a()?;
                (sa, start_b()?)
            } else {
                let sb = start_b()?;
                (start_a()?, sb)
            }
        }
    };
    println!(
        "{}{}: {}   {}: {}",
        if a.hang_timeout.is_some() {
            format!("round {}: ", round + 1)
        } else {
            String::new()
        },
        pair.0.name,
        pair.0.describe(),
        pair.1.name,
        pair.1.describe()
    );
    // Warm-up (page cache, first connections, lazy allocations).
    for s in [&pair.0, &pair.1] {
        for (path, body) in files {
            Pool::connect(s.addr, path, a.conns, a.client_threads)?
                .run(body, Duration::from_millis(250))?;
        }
    }
    Ok(pair)
}

struct Series {
    file: String,
    tool: &'static str,
    r: Rounds,
}

/// One side's totals over a round: units done (responses, transfers),
/// seconds, CPU seconds of the side's processes, and of its first process
/// (the keeper, when there is one).
#[derive(Clone, Copy, Default)]
pub(crate) struct Tally {
    pub(crate) n: u64,
    pub(crate) secs: f64,
    pub(crate) cpu: f64,
    pub(crate) keeper_cpu: f64,
}

/// The interleaved A/B method: `slices` turns for each side, in the order
/// A B B A A B ..., so a burst of outside noise hits both alike;
/// `turn(side)` loads side 0 or 1 for one slice and returns (units done,
/// seconds). The sides' CPU time is counted around each turn.
pub(crate) fn interleave(
    sides: [&Server; 2],
    slices: u64,
    mut turn: impl FnMut(usize) -> anyhow::Result<(u64, f64)>,
) -> anyhow::Result<[Tally; 2]> {
    let mut acc = [Tally::default(); 2];
    for i in 0..slices {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let pids = &sides[side].pids;
            let (c0, k0) = (cpu_of(pids), cpu_of(&pids[..1]));
            let (n, t) = turn(side)?;
            let e = &mut acc[side];
            e.n += n;
            e.secs += t;
            e.cpu += cpu_of(pids) - c0;
            e.keeper_cpu += cpu_of(&pids[..1]) - k0;
        }
    }
    Ok(acc)
}

/// Per-round figures of an A/B comparison.
#[derive(Default)]
pub(crate) struct Rounds {
    /// Units per second of side A (plain) and side B (kept), per round.
    pub(crate) plain: Vec<f64>,
    pub(crate) kept: Vec<f64>,
    /// CPU seconds of each side per unit.
    pub(crate) plain_cpu: Vec<f64>,
    pub(crate) kept_cpu: Vec<f64>,
    /// The keepers' part of `plain_cpu` (when side A has one too) and of
    /// `kept_cpu`.
    pub(crate) plain_keeper_cpu: Vec<f64>,
    pub(crate) keeper_cpu: Vec<f64>,
}

impl Rounds {
    pub(crate) fn push(&mut self, t: [Tally; 2]) {
        for (side, x) in t.into_iter().enumerate() {
            let n = x.n.max(1) as f64;
            let (rate, cpu, kcpu) = if side == 0 {
                (
                    &mut self.plain,
                    &mut self.plain_cpu,
                    &mut self.plain_keeper_cpu,
                )
            } else {
                (&mut self.kept, &mut self.kept_cpu, &mut self.keeper_cpu)
            };
            rate.push(n / x.secs);
            cpu.push(x.cpu / n);
            kcpu.push(x.keeper_cpu / n);
        }
    }

    /// B/A per round, with its median and range.
    pub(crate) fn ratio(&self) -> Ratio {
        let per_round: Vec<f64> = self
            .plain
            .iter()
            .zip(&self.kept)
            .map(|(p, k)| k / p)
            .collect();
        let (min, max) = per_round
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), r| (a.min(*r), b.max(*r)));
        Ratio {
            median: median_f(&per_round),
            min,
            max,
            per_round,
        }
    }
}

/// A ratio measured once per round: its median and spread.
pub(crate) struct Ratio {
    pub(crate) per_round: Vec<f64>,
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Ratio {
    /// "median (min–max)".
    pub(crate) fn text(&self) -> String {
        format!("{:.3} ({:.3}–{:.3})", self.median, self.min, self.max)
    }

    /// The per-round values, space separated.
    pub(crate) fn rounds_text(&self) -> String {
        self.per_round
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A summary row with `median`, `min`, `max` and `round1`.. attached.
    pub(crate) fn row(&self, bench: &'static str, metric: String) -> Row {
        Row::new(bench, metric, self.text())
            .num("median", self.median)
            .num("min", self.min)
            .num("max", self.max)
            .nums_list("round", &self.per_round)
    }
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if a.conns == 0 || a.rounds == 0 || a.secs == 0 || a.sizes.contains(&0) || a.sizes.is_empty() {
        bail!("--conns, --rounds, --secs and --sizes must be at least 1");
    }
    let bench = match a.hang_timeout {
        None => "throughput",
        Some(0) => "heartbeat A/A",
        Some(_) => "heartbeat",
    };
    let what = match a.hang_timeout {
        None if a.chat => "hf-chat (axum on holdfast-http) alone vs under the keeper".to_owned(),
        None => "hf-httpd alone vs under the keeper".to_owned(),
        Some(ms) => format!(
            "hf-httpd under the keeper without --hang-timeout (A) vs with --hang-timeout {ms} (B{})",
            if ms == 0 { ": off too, an A/A run" } else { "" }
        ),
    };
    println!(
        "== {bench}: {what}, {} rounds × {} s per side (in {} ms slices, alternating), {} {} over {} client threads ==",
        a.rounds,
        a.secs,
        a.slice_ms,
        a.conns,
        if a.close {
            "connections, a new one per request,"
        } else {
            "keep-alive connections"
        },
        a.client_threads
    );
    let site = TempDir::new("site");
    let (svc_cmd, files): (Vec<std::ffi::OsString>, _) = if a.chat {
        // hf-chat's `/hello` (axum on holdfast-http); its rooms' data dir
        // is unused here.
        (
            vec![
                bin("hf-chat")?.into_os_string(),
                "--data-dir".into(),
                site.path().as_os_str().to_owned(),
            ],
            vec![("/hello?n=1".to_owned(), b"hello 1\n".to_vec())],
        )
    } else {
        (
            vec![
                bin("hf-httpd")?.into_os_string(),
                "--root".into(),
                site.path().as_os_str().to_owned(),
            ],
            write_site(site.path(), &a.sizes)?,
        )
    };
    let httpd: Vec<&OsStr> = svc_cmd.iter().map(|s| s.as_os_str()).collect();

    let mut pair = start_pair(a, &httpd, site.path(), &files, 0)?;
    let (na, nb) = (pair.0.name, pair.1.name);

    // Idle: what each process does with nothing to serve.
    let idle = idle_cost(&[&pair.0, &pair.1]);
    let mut rows = Vec::new();
    println!(
        "idle for {:.0} s, per second: CPU time and wake-ups (context switches), all threads",
        IDLE.as_secs_f64()
    );
    for (srv, v) in [&pair.0, &pair.1].into_iter().zip(&idle) {
        let parts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(i, (cpu, wake))| {
                let who = match (&srv.host, i) {
                    (Host::Alone(_), _) => srv.prog.as_str(),
                    (Host::Kept(_), 0) => "keeper",
                    (Host::Kept(_), _) => "worker",
                };
                format!("{who} {cpu:.0} µs CPU, {wake:.1} wake-ups")
            })
            .collect();
        println!("  {:<6} {}", srv.name, parts.join(";  "));
        rows.push(Row::new(
            bench,
            format!("{} idle, per s: CPU µs, wake-ups", srv.name),
            parts.join("; "),
        ));
    }

    // wrk runs each side for whole seconds, one after the other, not in
    // alternating slices: too coarse for the sub-per-cent effect looked for
    // with --hang-timeout.
    let wrk = find_on_path("wrk").filter(|_| a.hang_timeout.is_none() && !a.close && !a.no_wrk);
    let mut series: Vec<Series> = Vec::new();
    let tools: Vec<&'static str> = if wrk.is_some() {
        vec!["built-in", "wrk"]
    } else {
        vec!["built-in"]
    };
    for tool in &tools {
        // wrk on the small file only: it keeps the whole run under two minutes.
        let n = if *tool == "wrk" { 1 } else { files.len() };
        for (path, _) in &files[..n] {
            series.push(Series {
                file: path.clone(),
                tool,
                r: Rounds::default(),
            });
        }
    }
    let measuring = Instant::now();
    let slice = Duration::from_millis(a.slice_ms.max(50));
    let slices = ((a.secs * 1000) / a.slice_ms.max(50)).max(1);
    for r in 0..a.rounds {
        if a.hang_timeout.is_some() && r > 0 {
            // A fresh pair each round: two keepers running the same code
            // differ by up to a few per cent for as long as they live (an
            // A/A run shows it), far more than what is measured here; new
            // pairs, started in alternating order, put that in the spread.
            pair.0.check()?;
            pair.1.check()?;
            drop(pair);
            pair = start_pair(a, &httpd, site.path(), &files, r)?;
        }
        let (plain, kept) = (&pair.0, &pair.1);
        for s in series.iter_mut() {
            let body = &files.iter().find(|f| f.0 == s.file).expect("file").1;
            let acc = if s.tool == "wrk" {
                // wrk runs whole seconds: one run per side, A first.
                let mut acc = [Tally::default(); 2];
                for (mi, srv) in [plain, kept].into_iter().enumerate() {
                    let (c0, k0) = (cpu_of(&srv.pids), cpu_of(&srv.pids[..1]));
                    let rps = run_wrk(
                        wrk.as_deref().expect("wrk"),
                        srv.addr,
                        &s.file,
                        a.conns,
                        2,
                        a.secs,
                    )?;
                    acc[mi] = Tally {
                        n: (rps * a.secs as f64) as u64,
                        secs: a.secs as f64,
                        cpu: cpu_of(&srv.pids) - c0,
                        keeper_cpu: cpu_of(&srv.pids[..1]) - k0,
                    };
                }
                acc
            } else {
                let mut pools = [
                    Pool::connect_with(plain.addr, &s.file, a.conns, a.client_threads, a.close)?,
                    Pool::connect_with(kept.addr, &s.file, a.conns, a.client_threads, a.close)?,
                ];
                interleave([plain, kept], slices, |mi| {
                    pools[mi]
                        .run(body, slice)
                        .with_context(|| format!("{} round {}", [na, nb][mi], r + 1))
                })?
            };
            s.r.push(acc);
            println!(
                "  round {} {:<8} {:<9} {na} {:>9.0} req/s   {nb} {:>9.0} req/s   {nb}/{na} {:.3}",
                r + 1,
                s.tool,
                s.file,
                s.r.plain[r],
                s.r.kept[r],
                s.r.kept[r] / s.r.plain[r]
            );
        }
    }
    pair.0.check()?;
    pair.1.check()?;
    drop(pair);
    println!(
        "({:.0} s of measurement)",
        measuring.elapsed().as_secs_f64()
    );

    println!();
    let both_kept = a.hang_timeout.is_some();
    println!(
        "{:<9} {:<9} {:>12} {:>12} {:>10} {:>14} {:>26}",
        "tool",
        "file",
        format!("{na} req/s"),
        format!("{nb} req/s"),
        "overhead",
        "paired ratio",
        if both_kept {
            "server CPU µs/req (keepers)"
        } else {
            "server CPU µs/req (keeper)"
        }
    );
    for s in &series {
        let mp = median_f(&s.r.plain);
        let mk = median_f(&s.r.kept);
        let overhead = (mp - mk) / mp * 100.0;
        let ratio = s.r.ratio();
        let keepers = if both_kept {
            format!(
                "{:.2} → {:.2}",
                median_f(&s.r.plain_keeper_cpu) * 1e6,
                median_f(&s.r.keeper_cpu) * 1e6
            )
        } else {
            format!("{:.2}", median_f(&s.r.keeper_cpu) * 1e6)
        };
        let cpu = format!(
            "{:.1} → {:.1} ({keepers})",
            median_f(&s.r.plain_cpu) * 1e6,
            median_f(&s.r.kept_cpu) * 1e6,
        );
        println!(
            "{:<9} {:<9} {:>12.0} {:>12.0} {:>9.2}% {:>14.3} {:>26}",
            s.tool, s.file, mp, mk, overhead, ratio.median, cpu
        );
        println!(
            "{:<19} per-round {nb}/{na}: {}  (min {:.3}, max {:.3})",
            "",
            ratio.rounds_text(),
            ratio.min,
            ratio.max
        );
        rows.push(
            Row::new(
                bench,
                format!("{} {} median {na} / {nb} req/s", s.tool, s.file),
                format!("{mp:.0} / {mk:.0}"),
            )
            .num("a", mp)
            .num("b", mk)
            .num("conns", a.conns as f64),
        );
        rows.push(Row::new(
            bench,
            format!(
                "{} {} server CPU µs/req {na} → {nb} ({})",
                s.tool,
                s.file,
                if both_kept { "keepers" } else { "keeper" }
            ),
            cpu,
        ));
        rows.push(ratio.row(
            bench,
            format!(
                "{} {} {nb}/{na} per round: median (min–max)",
                s.tool, s.file
            ),
        ));
        rows.push(Row::new(
            bench,
            format!("{} {} overhead (medians; paired)", s.tool, s.file),
            format!("{overhead:.2} % ; {:.2} %", (1.0 - ratio.median) * 100.0),
        ));
    }
    println!("overhead = (median {na} − median {nb}) / median {na}; paired = 1 − median of per-round {nb}/{na}");
    if both_kept {
        println!("server CPU = CPU time (user+sys) of keeper + active worker, per request ({na} → {nb} (keepers' part, {na} → {nb}))");
    } else {
        println!("server CPU = CPU time (user+sys) of hf-httpd, resp. keeper + active worker, per request (plain → kept (keeper's part))");
    }
    if a.hang_timeout.is_some() {
        println!("wrk: not used with --hang-timeout (it does not alternate the sides in slices)");
    } else if wrk.is_none() {
        println!("wrk: not found on PATH, skipped (only the built-in load generator was used)");
        rows.push(Row::new(bench, "wrk", "not on PATH, skipped"));
    }
    Ok(rows)
}
