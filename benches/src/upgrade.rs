//! `hf-bench upgrade`: `holdfast upgrade` measured — how fast idle
//! connections move to a new version, and what clients lose when a service
//! is upgraded every second under load, side by side with nginx.
//!
//! 1. **Idle connections.** N idle keep-alive connections to hf-httpd under
//!    `holdfast run`, each after one request (so a worker holds it); then
//!    `holdfast upgrade --json --settle S` to the same program under another
//!    `--server-name`. Reported: the keeper's `move_ms` (switch → last
//!    connection moved) and `elapsed_ms`, and the command's wall time. Then
//!    every connection is checked: not closed or reset while idle (a
//!    non-blocking peek), and one GET on it is answered by the new version
//!    with the right body. N grows through the list (connections stay open);
//!    each N gets `--rounds` upgrades, alternating the two names.
//! 2. **Upgrade storm.** `--conns` keep-alive clients fetch files of several
//!    sizes (the `storm` site), every body checked, for `--before-secs`
//!    (steady state), then for `--secs` with an upgrade every `--every-ms`
//!    (or back to back when one takes longer). Requests count in the phase
//!    they start in; failures by kind, and latency p50/p99 per phase. The
//!    contenders:
//!    - hf-httpd under holdfast, `holdfast upgrade` alternating between two
//!      builds (the binary and a copy of it) with different `--server-name`s;
//!    - nginx (when on PATH), `nginx -s reload` (new workers, the old ones
//!      finish their requests and close their connections);
//!    - nginx binary upgrade: USR2 to the master (it starts a new master
//!      with the listening sockets), then WINCH and QUIT to the old master,
//!      waiting until the old master is gone before the next one.
//!
//! Everything targets 127.0.0.1, is bounded in time and count, and stops by
//! itself; every process started is stopped before this returns.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hf_keeper::status::{Progress, Role};
use rustix::process::Signal;

use crate::common::{
    bin, free_port, median_f, raise_nofile, signal, standby_ready, Dist, Keeper, Row, TempDir,
};
use crate::storm::{children, classify, find_nginx, write_nginx_conf, write_site, SIZES};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Idle keep-alive connection counts to move (ascending; the
    /// connections stay open from one count to the next; 0 skips this part).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub idle: Vec<usize>,
    /// Upgrades per idle count; after each, every connection is checked.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// `holdfast upgrade --settle` (ms): how long the new version must run
    /// before the old version's standbys retire and the upgrade is done.
    #[arg(long, default_value_t = 0)]
    pub settle_ms: u64,
    /// `holdfast upgrade --drain-timeout` (ms; default: holdfast's):
    /// connections still busy then are recovered on the new version as
    /// after a crash.
    #[arg(long)]
    pub drain_timeout_ms: Option<u64>,
    /// Storm: keep-alive client connections.
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Storm: seconds of steady load measured before the upgrades start.
    #[arg(long, default_value_t = 3)]
    pub before_secs: u64,
    /// Storm: seconds of upgrades, per contender (0 skips the storm).
    #[arg(long, default_value_t = 8)]
    pub secs: u64,
    /// Storm: an upgrade (or reload) starts this often, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub every_ms: u64,
}

/// Size of the file each idle connection fetches: once when opened, once
/// after each upgrade.
const IDLE_BODY_LEN: usize = 100;
/// No single read or write of a client waits longer (counted as a timeout).
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// `holdfast upgrade` is killed (and the benchmark fails) if it runs longer:
/// its own ready and drain timeouts are 10 s each.
const UPGRADE_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// A keep-alive HTTP client that says how a request failed.

/// One keep-alive connection: `buf` holds bytes read past the current
/// response's head. Without pipelining it is empty between requests.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    /// The last response's `Server` header (reused: no allocation per request).
    server: String,
    /// The last response said `Connection: close`: a client must not send
    /// another request on this connection.
    closing: bool,
    /// Responses read in full on this connection.
    served: u64,
    /// A byte of the current response has arrived.
    got_any: bool,
}

impl Conn {
    fn connect(addr: SocketAddr) -> Result<Conn, &'static str> {
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| classify(&e))?;
        let setup = || -> std::io::Result<()> {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)
        };
        setup().map_err(|e| classify(&e))?;
        Ok(Conn {
            s,
            buf: Vec::new(),
            server: String::new(),
            closing: false,
            served: 0,
            got_any: false,
        })
    }

    /// A failure before any byte of the answer on a connection that has
    /// already served a request: the server closed it as the request went
    /// out. HTTP clients retry an idempotent request when that happens.
    fn failed_before_answer(&self) -> bool {
        self.served > 0 && !self.got_any
    }

    fn send(&mut self, req: &[u8]) -> Result<(), &'static str> {
        self.got_any = false;
        if !self.buf.is_empty() {
            return Err("bytes nobody asked for");
        }
        self.s.write_all(req).map_err(|e| classify(&e))
    }

    /// Reads one response; Ok if it is a 200 whose body is `want`. An early
    /// end is "closed before answering" when not a byte of the response
    /// came and "cut-short responses" otherwise.
    fn read_checked(&mut self, want: &[u8], scratch: &mut [u8]) -> Result<(), &'static str> {
        let mut searched = 0;
        let head_end = loop {
            if let Some(p) = self.buf[searched..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                break searched + p + 4;
            }
            searched = self.buf.len().saturating_sub(3);
            if self.buf.len() > 64 * 1024 {
                return Err("bad responses");
            }
            self.fill(scratch)?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| "bad responses")?;
        let ok_status = head.starts_with("HTTP/1.1 200 ");
        let mut len = None;
        self.server.clear();
        self.closing = false;
        for l in head.split("\r\n").skip(1) {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("server") {
                self.server.push_str(v.trim());
            } else if k.eq_ignore_ascii_case("connection") {
                self.closing = v.to_ascii_lowercase().contains("close");
            }
        }
        let len = len.ok_or("bad responses")?;
        while self.buf.len() < head_end + len {
            self.fill(scratch)?;
        }
        let right = ok_status && self.buf[head_end..head_end + len] == *want;
        self.buf.drain(..head_end + len);
        self.served += 1;
        if right {
            Ok(())
        } else {
            Err("wrong bytes")
        }
    }

    fn fill(&mut self, scratch: &mut [u8]) -> Result<(), &'static str> {
        match self.s.read(scratch) {
            Ok(0) if self.got_any => Err("cut-short responses"),
            Ok(0) => Err("closed before answering"),
            Ok(n) => {
                self.got_any = true;
                self.buf.extend_from_slice(&scratch[..n]);
                Ok(())
            }
            Err(e) => Err(classify(&e)),
        }
    }

    /// While idle, nothing may have happened to the connection: no FIN, no
    /// reset, no stray bytes. Looked at without waiting.
    fn idle_intact(&mut self) -> Result<(), &'static str> {
        let peek = |s: &TcpStream| -> std::io::Result<usize> {
            s.set_nonblocking(true)?;
            let r = s.peek(&mut [0u8; 1]);
            s.set_nonblocking(false)?;
            r
        };
        match peek(&self.s) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(classify(&e)),
            Ok(0) => Err("closed while idle"),
            Ok(_) => Err("bytes nobody asked for"),
        }
    }
}

fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: hf-bench\r\n\r\n").into_bytes()
}

/// Requests answered right, failures by kind, and the latency of the right ones.
#[derive(Default)]
struct Tally {
    ok: u64,
    failures: BTreeMap<&'static str, u64>,
    /// Failures before any byte of the answer on a connection that had
    /// served requests (see [`Conn::failed_before_answer`]).
    before_answer: u64,
    latency_ns: Vec<u64>,
}

impl Tally {
    fn fail(&mut self, kind: &'static str) {
        *self.failures.entry(kind).or_default() += 1;
    }
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
    fn resets(&self) -> u64 {
        self.failures.get("resets").copied().unwrap_or(0)
    }
    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.before_answer += o.before_answer;
        for (k, v) in o.failures {
            *self.failures.entry(k).or_default() += v;
        }
        self.latency_ns.extend(o.latency_ns);
    }
    /// "0 failed", or "12 failed (10 resets, 2 closed before answering; 12
    /// of them before any byte ...)".
    fn failures_text(&self) -> String {
        let kinds: Vec<String> = self
            .failures
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        if kinds.is_empty() {
            "0 failed".to_owned()
        } else {
            format!(
                "{} failed ({}; {} of them before any byte of the answer on a reused connection)",
                self.failed(),
                kinds.join(", "),
                self.before_answer
            )
        }
    }
    /// "p50 1.23 ms, p99 4.56 ms".
    fn latency_text(&self) -> String {
        match Dist::of(&self.latency_ns) {
            Some(d) => format!("p50 {} ms, p99 {} ms", ms(d.p50), ms(d.p99)),
            None => "no requests".to_owned(),
        }
    }
}

/// Nanoseconds as milliseconds with two decimals.
fn ms(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1e6)
}

// ---------------------------------------------------------------------------
// 1. Idle connections.

/// What one `holdfast upgrade --json` reported, and how long it ran.
struct Upgraded {
    generation: u32,
    ready_ms: u64,
    total: usize,
    moved: usize,
    recovered: usize,
    move_ms: u64,
    elapsed_ms: u64,
    wall: Duration,
}

/// Runs `holdfast upgrade --json --settle S [--drain-timeout D] -- CMD`
/// against the keeper at `control`, through the real command line, and
/// parses its JSON lines. Err on a `failed` event, a non-zero exit, or after
/// `UPGRADE_DEADLINE` (then the command is killed).
fn holdfast_upgrade(control: &Path, a: &Args, cmd: &[OsString]) -> anyhow::Result<Upgraded> {
    let t0 = Instant::now();
    let mut c = Command::new(bin("holdfast")?);
    c.arg("upgrade").arg("--control").arg(control).args([
        "--json",
        "--settle",
        &a.settle_ms.to_string(),
    ]);
    if let Some(d) = a.drain_timeout_ms {
        c.args(["--drain-timeout", &d.to_string()]);
    }
    let mut child = c
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting holdfast upgrade")?;
    // Read both pipes to their end on other threads, so the wait below can
    // give up at the deadline.
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let out = match rx.recv_timeout(UPGRADE_DEADLINE) {
        Ok(out) => out,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("holdfast upgrade still running after {UPGRADE_DEADLINE:?}; killed it");
        }
    };
    let status = child.wait()?;
    let wall = t0.elapsed();
    let err = err_reader.join().unwrap_or_default();
    let (mut ready_ms, mut total) = (None, None);
    for line in out.lines() {
        let p: Progress = serde_json::from_str(line)
            .with_context(|| format!("holdfast upgrade printed {line:?}"))?;
        match p {
            Progress::Switched {
                ready_ms: r,
                total: t,
                ..
            } => {
                ready_ms = Some(r);
                total = Some(t);
            }
            Progress::Done {
                generation,
                moved,
                recovered,
                move_ms,
                elapsed_ms,
                ..
            } => {
                if !status.success() {
                    bail!("holdfast upgrade said done but exited with {status}: {err}");
                }
                return Ok(Upgraded {
                    generation,
                    ready_ms: ready_ms.context("done without switched")?,
                    total: total.context("done without switched")?,
                    moved,
                    recovered,
                    move_ms,
                    elapsed_ms,
                    wall,
                });
            }
            Progress::Failed { reason, .. } => bail!("holdfast upgrade failed: {reason}"),
            _ => {}
        }
    }
    bail!("holdfast upgrade exited with {status} without a done event:\n{out}{err}")
}

/// The two "builds" upgrades alternate between: hf-httpd and a copy of its
/// binary at another path (as a rebuilt binary would be), told apart by
/// their `Server` header.
struct Builds {
    cmds: [Vec<OsString>; 2],
    names: [String; 2],
    _dir: TempDir,
}

impl Builds {
    fn new(site: &Path) -> anyhow::Result<Builds> {
        let dir = TempDir::new("builds");
        let a = bin("hf-httpd")?;
        let b = dir.path().join("hf-httpd-b");
        std::fs::copy(&a, &b).context("copying hf-httpd")?;
        let names = ["hf-httpd/A".to_owned(), "hf-httpd/B".to_owned()];
        let cmd = |exe: &Path, name: &str| -> Vec<OsString> {
            vec![
                exe.into(),
                "--root".into(),
                site.into(),
                "--server-name".into(),
                name.into(),
            ]
        };
        Ok(Builds {
            cmds: [cmd(&a, &names[0]), cmd(&b, &names[1])],
            names,
            _dir: dir,
        })
    }

    /// Build `i % 2`'s command line.
    fn args(&self, i: usize) -> &[OsString] {
        &self.cmds[i % 2]
    }

    fn cmd(&self, i: usize) -> Vec<&OsStr> {
        self.args(i).iter().map(OsString::as_os_str).collect()
    }
}

/// Opens `n` more connections, each after one complete request (so the
/// keeper has handed it to the worker); batches of 250 are connected, then
/// sent to, then read.
fn open_idle(
    addr: SocketAddr,
    n: usize,
    req: &[u8],
    want: &[u8],
    conns: &mut Vec<Conn>,
) -> anyhow::Result<()> {
    const BATCH: usize = 250;
    let mut scratch = vec![0u8; 16 * 1024];
    let mut left = n;
    while left > 0 {
        let b = left.min(BATCH);
        let mut batch = Vec::with_capacity(b);
        for _ in 0..b {
            let c = Conn::connect(addr).map_err(|k| {
                anyhow::anyhow!("connection #{} to {addr}: {k}", conns.len() + batch.len())
            })?;
            batch.push(c);
        }
        for c in batch.iter_mut() {
            c.send(req)
                .map_err(|k| anyhow::anyhow!("first request: {k}"))?;
        }
        for c in batch.iter_mut() {
            c.read_checked(want, &mut scratch)
                .map_err(|k| anyhow::anyhow!("first response: {k}"))?;
        }
        conns.extend(batch);
        left -= b;
    }
    Ok(())
}

/// Checks every idle connection after an upgrade: intact while idle, then
/// one GET answered by `server` with the right body. Connections that
/// failed are dropped from `conns` (and counted).
fn check_idle(conns: &mut Vec<Conn>, req: &[u8], want: &[u8], server: &str) -> Tally {
    const BATCH: usize = 500;
    let mut t = Tally::default();
    let mut scratch = vec![0u8; 16 * 1024];
    let mut dead = vec![false; conns.len()];
    for (bi, batch) in conns.chunks_mut(BATCH).enumerate() {
        let mut sent = vec![false; batch.len()];
        for (i, c) in batch.iter_mut().enumerate() {
            match c.idle_intact().and_then(|()| c.send(req)) {
                Ok(()) => sent[i] = true,
                Err(k) => {
                    t.fail(k);
                    dead[bi * BATCH + i] = true;
                }
            }
        }
        for (i, c) in batch.iter_mut().enumerate() {
            if !sent[i] {
                continue;
            }
            match c.read_checked(want, &mut scratch) {
                Ok(()) if c.server == server => t.ok += 1,
                Ok(()) => t.fail("answered by the old version"),
                Err(k) => {
                    t.fail(k);
                    dead[bi * BATCH + i] = true;
                }
            }
        }
    }
    let mut i = 0;
    conns.retain(|_| {
        i += 1;
        !dead[i - 1]
    });
    t
}

fn idle(a: &Args) -> anyhow::Result<Vec<Row>> {
    let mut targets = a.idle.clone();
    targets.sort_unstable();
    targets.dedup();
    targets.retain(|n| *n > 0);
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let limit = raise_nofile();
    println!(
        "== upgrade, idle: {} idle keep-alive connections moved to a new version by `holdfast upgrade --settle {}`, {} upgrades each, then one GET on each ==",
        targets
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" then "),
        a.settle_ms,
        a.rounds
    );
    // This process holds one socket per connection.
    let room = limit.saturating_sub(200) as usize;
    if targets.last().is_some_and(|&m| m > room) {
        println!("warning: RLIMIT_NOFILE is {limit} here: moving at most {room} connections (raise the hard limit for more)");
        targets.retain(|n| *n < room);
        targets.push(room);
    }
    let site = TempDir::new("upgrade-idle-site");
    let want = hf_tests::http::content(IDLE_BODY_LEN, 99);
    std::fs::write(site.path().join("idle.bin"), &want)?;
    let req = get_request("/idle.bin");
    let builds = Builds::new(site.path())?;
    let mut keeper = Keeper::start(1, &builds.cmd(0))?;
    println!(
        "keeper pid {} on {} (RLIMIT_NOFILE here: {limit})",
        keeper.pid(),
        keeper.addr
    );
    let mut conns: Vec<Conn> = Vec::with_capacity(targets.last().copied().unwrap_or(0));
    let mut next = 1; // the build the next upgrade goes to
    let mut rows = Vec::new();
    for &n in &targets {
        let t = Instant::now();
        open_idle(keeper.addr, n - conns.len(), &req, &want, &mut conns)?;
        keeper.wait_held(n)?;
        println!(
            "  {n} connections open and held by the worker ({:.2} s)",
            t.elapsed().as_secs_f64()
        );
        let mut runs: Vec<Upgraded> = Vec::new();
        let mut checked = Tally::default();
        for r in 0..a.rounds {
            // Each upgrade starts from a quiet keeper: one generation, its
            // standby ready, every connection idle on the active worker (not
            // still being torn down or started after the last one).
            let held = conns.len();
            keeper.wait_for(
                "one generation, a ready standby, every connection on the active worker",
                Duration::from_secs(30),
                |s| {
                    s.upgrade.is_none()
                        && s.generations.len() == 1
                        && standby_ready(s)
                        && s.workers
                            .iter()
                            .any(|w| w.role == Role::Active && w.connections == held)
                },
            )?;
            std::thread::sleep(Duration::from_millis(100));
            let u = holdfast_upgrade(&keeper.control, a, builds.args(next))
                .with_context(|| format!("{n} connections, upgrade {}", r + 1))?;
            let server = &builds.names[next % 2];
            next += 1;
            let c = check_idle(&mut conns, &req, &want, server);
            println!(
                "  {n:>6} conns, upgrade {}: ready {} ms; {} of {} moved ({} recovered) in {} ms (move_ms), done in {} ms (elapsed_ms), command {} ms; checked {held}: {} right, {}",
                r + 1,
                u.ready_ms,
                u.moved,
                u.total,
                u.recovered,
                u.move_ms,
                u.elapsed_ms,
                u.wall.as_millis(),
                c.ok,
                c.failures_text()
            );
            checked.merge(c);
            runs.push(u);
        }
        let st = keeper.status()?;
        if st.restarts != 0 || st.generations.len() != 1 {
            println!(
                "  warning: after the upgrades: {} restarts, generations {:?}",
                st.restarts, st.generations
            );
        }
        if runs.is_empty() {
            continue;
        }
        let stat = |f: fn(&Upgraded) -> u64| -> (f64, u64, u64) {
            let v: Vec<f64> = runs.iter().map(|u| f(u) as f64).collect();
            let min = runs.iter().map(f).min().unwrap_or(0);
            let max = runs.iter().map(f).max().unwrap_or(0);
            (median_f(&v), min, max)
        };
        let (mv, mv_min, mv_max) = stat(|u| u.move_ms);
        let (el, el_min, el_max) = stat(|u| u.elapsed_ms);
        let moved: usize = runs.iter().map(|u| u.moved).sum();
        let total: usize = runs.iter().map(|u| u.total).sum();
        let recovered: usize = runs.iter().map(|u| u.recovered).sum();
        let last_gen = runs.last().map_or(0, |u| u.generation);
        println!(
            "  {n:>6} conns: move_ms median {mv:.0} (min {mv_min}, max {mv_max}); elapsed_ms median {el:.0} (min {el_min}, max {el_max}); {moved}/{total} moved at commit points, {recovered} recovered; now generation {last_gen}; checks: {} right, {}",
            checked.ok,
            checked.failures_text()
        );
        rows.push(
            Row::new(
                "upgrade",
                format!(
                    "{n} idle conns: move_ms; elapsed_ms (median of {})",
                    runs.len()
                ),
                format!("{mv:.0} ms (max {mv_max}); {el:.0} ms (max {el_max})"),
            )
            .num("conns", n as f64)
            .num("move_ms", mv)
            .num("move_ms_min", mv_min as f64)
            .num("move_ms_max", mv_max as f64),
        );
        rows.push(
            Row::new(
                "upgrade",
                format!("{n} idle conns: checked after each upgrade"),
                format!(
                    "{} right, {}; {recovered} recovered",
                    checked.ok,
                    checked.failures_text()
                ),
            )
            .num("ok", checked.ok as f64)
            .num("failed", checked.failed() as f64),
        );
        if n >= 10_000 {
            let verdict = if mv_max < 100 && checked.failed() == 0 {
                "met"
            } else {
                "NOT met"
            };
            println!(
                "  goal, 10,000 connections moved in under 100 ms: {verdict} ({n} moved in {mv_max} ms at worst)"
            );
            rows.push(Row::new(
                "upgrade",
                "goal: 10,000 idle conns moved < 100 ms",
                format!("{verdict} (worst move_ms {mv_max} at {n})"),
            ));
        }
    }
    drop(conns);
    keeper.stop();
    Ok(rows)
}

// ---------------------------------------------------------------------------
// 2. Upgrade storm.

/// Phases of a storm run; a request counts in the phase it starts in.
const WARMUP: u8 = 0;
const BEFORE: u8 = 1;
const DURING: u8 = 2;
const STOP: u8 = 3;

/// What one contender's clients saw, and how its upgrades went.
#[derive(Default)]
struct Storm {
    before: Tally,
    during: Tally,
    /// Responses by `Server` header (during both phases).
    servers: BTreeMap<String, u64>,
    /// Upgrades (reloads) that completed, and those that failed, with why.
    actions: u64,
    action_errors: Vec<String>,
}

/// One GET on `conn`, connecting first if it is `None`; counts the answer's
/// `Server` header in `servers`. The connection is dropped after a failure
/// and after a response that says `Connection: close`. Err: the failure's
/// kind, and whether it came before any byte of the answer on a reused
/// connection.
fn request(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    req: &[u8],
    want: &[u8],
    scratch: &mut [u8],
    servers: &mut BTreeMap<String, u64>,
) -> Result<(), (&'static str, bool)> {
    if conn.is_none() {
        *conn = Some(Conn::connect(addr).map_err(|k| (k, false))?);
    }
    let cl = conn.as_mut().expect("connected");
    if let Err(k) = cl.send(req).and_then(|()| cl.read_checked(want, scratch)) {
        let early = cl.failed_before_answer();
        *conn = None;
        return Err((k, early));
    }
    match servers.get_mut(cl.server.as_str()) {
        Some(n) => *n += 1,
        None => {
            servers.insert(cl.server.clone(), 1);
        }
    }
    if cl.closing {
        *conn = None;
    }
    Ok(())
}

/// Runs the clients: warm-up (not counted), `before`, then `during` with
/// `act` called every `every` (back to back when it takes longer); the
/// clients stop at the end of `during`, or when the last `act` has
/// returned if that is later.
fn storm_load(
    addr: SocketAddr,
    files: &Arc<Vec<(String, Vec<u8>)>>,
    a: &Args,
    mut act: impl FnMut() -> anyhow::Result<()>,
) -> Storm {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let out = Arc::new(Mutex::new(Storm::default()));
    let clients: Vec<_> = (0..a.conns)
        .map(|c| {
            let (files, phase, out) = (files.clone(), phase.clone(), out.clone());
            std::thread::spawn(move || {
                let reqs: Vec<Vec<u8>> = files.iter().map(|(p, _)| get_request(p)).collect();
                let mut scratch = vec![0u8; 64 * 1024];
                let mut tallies = [Tally::default(), Tally::default()];
                let mut servers: BTreeMap<String, u64> = BTreeMap::new();
                let mut conn: Option<Conn> = None;
                let mut i = c;
                loop {
                    let ph = phase.load(Ordering::Relaxed);
                    if ph == STOP {
                        break;
                    }
                    let f = i % files.len();
                    i = i.wrapping_mul(5).wrapping_add(1);
                    let t0 = Instant::now();
                    let r = request(
                        &mut conn,
                        addr,
                        &reqs[f],
                        &files[f].1,
                        &mut scratch,
                        &mut servers,
                    );
                    let dt = t0.elapsed().as_nanos() as u64;
                    let tally = match ph {
                        BEFORE => Some(&mut tallies[0]),
                        DURING => Some(&mut tallies[1]),
                        _ => None,
                    };
                    match r {
                        Ok(()) => {
                            if let Some(t) = tally {
                                t.ok += 1;
                                t.latency_ns.push(dt);
                            }
                        }
                        Err((kind, before_answer)) => {
                            if let Some(t) = tally {
                                t.fail(kind);
                                t.before_answer += u64::from(before_answer);
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                let [b, d] = tallies;
                let mut o = out.lock().expect("storm outcome");
                o.before.merge(b);
                o.during.merge(d);
                for (k, v) in servers {
                    *o.servers.entry(k).or_default() += v;
                }
            })
        })
        .collect();
    let (mut actions, mut errors) = (0u64, Vec::new());
    std::thread::sleep(Duration::from_millis(500));
    phase.store(BEFORE, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(a.before_secs));
    phase.store(DURING, Ordering::Relaxed);
    let t0 = Instant::now();
    let every = Duration::from_millis(a.every_ms);
    let end = Duration::from_secs(a.secs);
    let mut next = Duration::ZERO;
    while next < end {
        if let Some(wait) = next.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        match act() {
            Ok(()) => actions += 1,
            Err(e) => errors.push(format!("{e:#}")),
        }
        // The next tick; right away if this one overran it.
        next = (next + every).max(t0.elapsed());
    }
    // The last upgrade's effects are watched too (a reload returns before
    // its old workers have closed anything).
    if let Some(wait) = end.checked_sub(t0.elapsed()) {
        std::thread::sleep(wait);
    }
    phase.store(STOP, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let mut o = std::mem::take(&mut *out.lock().expect("storm outcome"));
    o.actions = actions;
    o.action_errors = errors;
    o
}

fn storm_holdfast(
    a: &Args,
    site: &Path,
    files: &Arc<Vec<(String, Vec<u8>)>>,
) -> anyhow::Result<(Storm, Vec<Upgraded>)> {
    let builds = Builds::new(site)?;
    let mut k = Keeper::start(1, &builds.cmd(0))?;
    let control = k.control.clone();
    let mut runs = Vec::new();
    let mut next = 1;
    let o = storm_load(k.addr, files, a, || {
        let cmd = builds.args(next);
        next += 1;
        runs.push(holdfast_upgrade(&control, a, cmd)?);
        Ok(())
    });
    let st = k.wait_for("still serving", Duration::from_secs(10), |s| {
        crate::common::active_pid(s).is_some()
    })?;
    if st.restarts != 0 || st.failed_upgrades != 0 {
        println!(
            "  warning: keeper reports {} restarts and {} failed upgrades",
            st.restarts, st.failed_upgrades
        );
    }
    k.stop();
    Ok((o, runs))
}

/// Whether `pid` is a live nginx process (not a zombie, not a reused pid).
fn nginx_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let name_ok = stat.contains("(nginx)");
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    name_ok && !matches!(state, Some("Z" | "X"))
}

/// Polls `cond` every millisecond until it gives a value, or fails after `timeout`.
fn poll<T>(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// nginx run as a daemon. Its binary upgrade needs that: a master ignores
/// USR2 while its parent is still the process that started it, so it cannot
/// be our child. Found through its pid file; every master it ever had is
/// stopped on drop (TERM, then KILL with its workers after 5 s). This
/// process becomes a child subreaper, so the daemonized masters are
/// reparented to it and reaped here instead of being left to an init that
/// may not reap (as in some containers).
struct NginxDaemon {
    exe: PathBuf,
    conf: PathBuf,
    dir: TempDir,
    masters: Vec<u32>,
}

impl NginxDaemon {
    fn start(exe: &Path, site: &Path) -> anyhow::Result<(NginxDaemon, SocketAddr)> {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .context("becoming a child subreaper")?;
        let dir = TempDir::new("nginx-upgrade");
        std::fs::create_dir_all(dir.path().join("logs"))?;
        let addr = free_port()?;
        let conf = write_nginx_conf(dir.path(), addr, site, true)?;
        let mut d = NginxDaemon {
            exe: exe.to_owned(),
            conf,
            dir,
            masters: Vec::new(),
        };
        // Output to a file, not a pipe: the daemon could keep a pipe open.
        let log = d.dir.path().join("stderr.log");
        let st = d
            .nginx_cmd()
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?)
            .status()
            .context("starting nginx")?;
        if !st.success() {
            bail!(
                "nginx exited with {st}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let master = poll(Duration::from_secs(10), "nginx's pid file", || {
            d.master().filter(|&p| nginx_alive(p))
        })?;
        d.masters.push(master);
        poll(Duration::from_secs(10), "nginx accepting", || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })?;
        Ok((d, addr))
    }

    fn nginx_cmd(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("-c")
            .arg(&self.conf)
            .arg("-p")
            .arg(self.dir.path())
            .stdin(Stdio::null());
        c
    }

    /// The master named by the pid file now.
    fn master(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("nginx.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `nginx -s reload`: the master re-reads its configuration, starts new
    /// workers, and tells the old ones to finish and exit.
    fn reload(&mut self) -> anyhow::Result<()> {
        let out = self
            .nginx_cmd()
            .args(["-s", "reload"])
            .output()
            .context("nginx -s reload")?;
        if !out.status.success() {
            bail!(
                "nginx -s reload: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The documented binary upgrade: USR2 to the master (it renames the pid
    /// file to `.oldbin` and starts a new master, which inherits the
    /// listening sockets and writes the pid file), WINCH to the old master
    /// (its workers finish and exit), QUIT to it; done when it is gone.
    fn binary_upgrade(&mut self) -> anyhow::Result<()> {
        let old = self.master().context("no nginx pid file")?;
        signal(old, Signal::USR2);
        let new = poll(Duration::from_secs(10), "the new nginx master", || {
            self.master()
                .filter(|&p| p != old && nginx_alive(p) && !children(p).is_empty())
        })?;
        self.masters.push(new);
        signal(old, Signal::WINCH);
        signal(old, Signal::QUIT);
        poll(
            Duration::from_secs(10),
            "the old nginx master to exit",
            || (!nginx_alive(old)).then_some(()),
        )?;
        reap(old);
        Ok(())
    }
}

/// Collects the exit status of `pid` if it is a child of ours that has
/// exited (a daemonized nginx master, reparented here); no-op otherwise.
fn reap(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
    }
}

impl Drop for NginxDaemon {
    fn drop(&mut self) {
        let mut masters = std::mem::take(&mut self.masters);
        masters.extend(self.master());
        masters.sort_unstable();
        masters.dedup();
        masters.retain(|&p| nginx_alive(p));
        let workers: Vec<u32> = masters
            .iter()
            .flat_map(|&m| children(m))
            .filter(|&p| nginx_alive(p))
            .collect();
        for &m in &masters {
            signal(m, Signal::TERM);
        }
        let all: Vec<u32> = masters.iter().chain(&workers).copied().collect();
        let gone = poll(Duration::from_secs(5), "nginx to stop", || {
            all.iter().all(|&p| !nginx_alive(p)).then_some(())
        });
        if gone.is_err() {
            for &p in &all {
                if nginx_alive(p) {
                    signal(p, Signal::KILL);
                }
            }
            let _ = poll(Duration::from_secs(1), "nginx killed", || {
                all.iter().all(|&p| !nginx_alive(p)).then_some(())
            });
        }
        for &p in &all {
            reap(p);
        }
    }
}

/// The storm against nginx, upgraded with `reload` or `binary_upgrade`.
fn storm_nginx(
    exe: &Path,
    a: &Args,
    site: &Path,
    files: &Arc<Vec<(String, Vec<u8>)>>,
    how: fn(&mut NginxDaemon) -> anyhow::Result<()>,
) -> anyhow::Result<Storm> {
    let (mut d, addr) = NginxDaemon::start(exe, site)?;
    let o = storm_load(addr, files, a, || how(&mut d));
    drop(d);
    Ok(o)
}

fn storm(a: &Args) -> anyhow::Result<Vec<Row>> {
    if a.secs == 0 {
        return Ok(Vec::new());
    }
    if a.conns == 0 || a.every_ms == 0 {
        bail!("--conns and --every-ms must be at least 1");
    }
    println!(
        "== upgrade, storm: {} keep-alive clients, files of {:?} bytes checked byte for byte; {} s steady, then an upgrade every {} ms for {} s ==",
        a.conns, SIZES, a.before_secs, a.every_ms, a.secs
    );
    let site = TempDir::new("upgrade-storm-site");
    let files = Arc::new(write_site(site.path()).context("writing the site")?);
    let mut results: Vec<(String, Storm)> = Vec::new();

    let (h, runs) = storm_holdfast(a, site.path(), &files)?;
    let moves: Vec<f64> = runs.iter().map(|u| u.move_ms as f64).collect();
    let elapsed: Vec<f64> = runs.iter().map(|u| u.elapsed_ms as f64).collect();
    let moved: usize = runs.iter().map(|u| u.moved).sum();
    let recovered: usize = runs.iter().map(|u| u.recovered).sum();
    let servers: Vec<String> = h
        .servers
        .iter()
        .map(|(k, v)| format!("{v} from {k}"))
        .collect();
    let holdfast_detail = format!(
        "{} connections moved at commit points, {recovered} recovered; move_ms median {:.0} (max {:.0}), elapsed_ms median {:.0}; responses: {}",
        moved,
        median_f(&moves),
        moves.iter().copied().fold(0.0, f64::max),
        median_f(&elapsed),
        servers.join(", ")
    );
    results.push((format!("holdfast upgrade ({} upgrades)", h.actions), h));

    let nginx = find_nginx();
    if let Some(exe) = &nginx {
        let r = storm_nginx(exe, a, site.path(), &files, NginxDaemon::reload)?;
        results.push((format!("nginx -s reload ({} reloads)", r.actions), r));
        let b = storm_nginx(exe, a, site.path(), &files, NginxDaemon::binary_upgrade)?;
        results.push((format!("nginx binary upgrade ({} upgrades)", b.actions), b));
    }

    println!();
    println!(
        "{:<38} {:>10} {:>8} {:>26}   {:>10} {:>8} {:>7} {:>26}",
        "",
        "ok before",
        "failed",
        "latency before",
        "ok during",
        "failed",
        "resets",
        "latency during"
    );
    let mut rows = Vec::new();
    for (name, s) in &results {
        println!(
            "{:<38} {:>10} {:>8} {:>26}   {:>10} {:>8} {:>7} {:>26}",
            name,
            s.before.ok,
            s.before.failed(),
            s.before.latency_text(),
            s.during.ok,
            s.during.failed(),
            s.during.resets(),
            s.during.latency_text()
        );
        for (phase, t) in [("before", &s.before), ("during", &s.during)] {
            if t.failed() > 0 {
                println!("{:<38}   {phase}: {}", "", t.failures_text());
            }
        }
        for e in s.action_errors.iter().take(3) {
            println!("{:<38}   an upgrade failed: {e}", "");
        }
        if s.action_errors.len() > 3 {
            println!(
                "{:<38}   ... {} upgrades failed in all",
                "",
                s.action_errors.len()
            );
        }
        rows.push(
            Row::new(
                "upgrade",
                format!("storm: {name}"),
                format!(
                    "during: {} ok, {}; p99 {} → {} ms{}",
                    s.during.ok,
                    s.during.failures_text(),
                    Dist::of(&s.before.latency_ns).map_or("-".into(), |d| ms(d.p99)),
                    Dist::of(&s.during.latency_ns).map_or("-".into(), |d| ms(d.p99)),
                    if s.action_errors.is_empty() {
                        String::new()
                    } else {
                        format!("; {} upgrades failed", s.action_errors.len())
                    }
                ),
            )
            .num("ok", s.during.ok as f64)
            .num("failed", s.during.failed() as f64)
            .num("resets", s.during.resets() as f64)
            .num("actions", s.actions as f64)
            .num("action_errors", s.action_errors.len() as f64),
        );
    }
    println!("holdfast: {holdfast_detail}");
    rows.push(Row::new(
        "upgrade",
        "storm: holdfast moves",
        holdfast_detail,
    ));
    println!("(latency: from sending a GET to its last body byte, of the requests answered right; a failure before any byte of the answer");
    println!(" on a reused connection is the server closing a keep-alive connection as the request went out: clients retry a GET then, not a POST)");
    if nginx.is_none() {
        println!("  nginx: not found on PATH (apt-get install nginx), nginx reload and binary-upgrade rows skipped");
        rows.push(Row::new("upgrade", "storm: nginx", "not on PATH, skipped"));
    }
    Ok(rows)
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let mut rows = idle(a)?;
    if !rows.is_empty() && a.secs > 0 {
        println!();
    }
    rows.extend(storm(a)?);
    Ok(rows)
}
