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
    /// Rounds; each round measures plain then kept, for each file.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32)]
    pub conns: usize,
    /// Load generator threads.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Within a round, plain and kept take turns in slices this long
    /// (plain, kept, kept, plain, ...), so bursts of outside noise hit both.
    #[arg(long, default_value_t = 250)]
    pub slice_ms: u64,
}

const FILES: [(&str, usize); 2] = [("1k.bin", 1024), ("16k.bin", 16 * 1024)];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    Kept,
}

struct Server {
    addr: SocketAddr,
    /// Processes whose CPU time counts for this mode.
    pids: Vec<u32>,
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

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_secs(*p)).sum()
}

fn write_site(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for (name, len) in FILES {
        let body: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(dir.join(name), &body)?;
        out.push((format!("/{name}"), body));
    }
    Ok(out)
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads one full response; checks the status and the body.
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
                let cl: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())
                            .flatten()
                    })
                    .context("no Content-Length")?;
                if self.buf.len() >= h + cl {
                    if cl != body.len() || self.buf[h..h + cl] != *body {
                        bail!("body differs from the file ({cl} bytes)");
                    }
                    self.buf.drain(..h + cl);
                    return Ok(());
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

/// Keep-alive connections to one server, split among load threads, kept
/// open across measurement slices.
struct Pool {
    addr: SocketAddr,
    groups: Vec<Vec<Conn>>,
    req: Vec<u8>,
}

impl Pool {
    fn connect(addr: SocketAddr, path: &str, conns: usize, threads: usize) -> anyhow::Result<Pool> {
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
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: hf-bench\r\n\r\n")
            .into_bytes();
        Ok(Pool { addr, groups, req })
    }

    /// Drives every connection for `dur` (one request in flight on each,
    /// always); returns (responses, seconds). Nothing is left in flight.
    fn run(&mut self, body: &[u8], dur: Duration) -> anyhow::Result<(u64, f64)> {
        let barrier = Barrier::new(self.groups.len() + 1);
        let req = &self.req;
        let addr = self.addr;
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

struct Series {
    file: String,
    tool: &'static str,
    plain: Vec<f64>,
    kept: Vec<f64>,
    /// CPU seconds of the server side per request.
    plain_cpu: Vec<f64>,
    kept_cpu: Vec<f64>,
    /// The keeper's part of `kept_cpu`.
    keeper_cpu: Vec<f64>,
}

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if a.conns == 0 || a.rounds == 0 || a.secs == 0 {
        bail!("--conns, --rounds and --secs must be at least 1");
    }
    println!(
        "== throughput: hf-httpd alone vs under the keeper, {} rounds × {} s per mode (in {} ms slices, alternating), {} keep-alive connections over {} client threads ==",
        a.rounds, a.secs, a.slice_ms, a.conns, a.client_threads
    );
    let httpd = bin("hf-httpd")?;
    let site = TempDir::new("site");
    let files = write_site(site.path())?;

    // Pass-through: the same binary, its own listener.
    let addr = free_port()?;
    let mut c = Command::new(&httpd);
    c.arg("--root")
        .arg(site.path())
        .arg("--listen")
        .arg(addr.to_string())
        .env("HOLDFAST_LOG", LOG_FILTER);
    let plain_log = site.path().join("plain.log");
    let mut plain_proc = Proc::spawn(&mut c, &plain_log)?;
    wait_listening(
        addr,
        &mut plain_proc,
        "hf-httpd (pass-through)",
        Duration::from_secs(10),
    )?;
    let plain = Server {
        addr,
        pids: vec![plain_proc.pid()],
    };

    let keeper = Keeper::start(
        1,
        &[
            httpd.as_os_str(),
            "--root".as_ref(),
            site.path().as_os_str(),
        ],
    )?;
    let snap = keeper.status()?;
    let worker = active_pid(&snap).context("no active worker")?;
    let kept = Server {
        addr: keeper.addr,
        pids: vec![keeper.pid(), worker],
    };
    println!(
        "plain: hf-httpd pid {} on {}   kept: keeper pid {} + worker pid {} on {} (1 standby)",
        plain_proc.pid(),
        plain.addr,
        keeper.pid(),
        worker,
        kept.addr
    );

    // Warm-up (page cache, first connections, lazy allocations).
    for s in [&plain, &kept] {
        for (path, body) in &files {
            Pool::connect(s.addr, path, a.conns, a.client_threads)?
                .run(body, Duration::from_millis(250))?;
        }
    }

    let wrk = find_on_path("wrk");
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
                plain: vec![],
                kept: vec![],
                plain_cpu: vec![],
                kept_cpu: vec![],
                keeper_cpu: vec![],
            });
        }
    }
    let measuring = Instant::now();
    let slice = Duration::from_millis(a.slice_ms.max(50));
    let slices = ((a.secs * 1000) / a.slice_ms.max(50)).max(1);
    for r in 0..a.rounds {
        for s in series.iter_mut() {
            let body = &files.iter().find(|f| f.0 == s.file).expect("file").1;
            // Per mode: responses, seconds, server CPU seconds, keeper CPU seconds.
            let mut acc = [(0u64, 0f64, 0f64, 0f64); 2];
            if s.tool == "wrk" {
                // wrk runs whole seconds: one run per mode, plain first.
                for (mi, srv) in [&plain, &kept].into_iter().enumerate() {
                    let (c0, k0) = (cpu_of(&srv.pids), cpu_of(&srv.pids[..1]));
                    let rps = run_wrk(
                        wrk.as_deref().expect("wrk"),
                        srv.addr,
                        &s.file,
                        a.conns,
                        2,
                        a.secs,
                    )?;
                    let n = (rps * a.secs as f64) as u64;
                    acc[mi] = (
                        n,
                        a.secs as f64,
                        cpu_of(&srv.pids) - c0,
                        cpu_of(&srv.pids[..1]) - k0,
                    );
                }
            } else {
                let mut pools = [
                    Pool::connect(plain.addr, &s.file, a.conns, a.client_threads)?,
                    Pool::connect(kept.addr, &s.file, a.conns, a.client_threads)?,
                ];
                for i in 0..slices {
                    // plain, kept, kept, plain, plain, kept, ...
                    let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
                    for mi in order {
                        let srv = if mi == 0 { &plain } else { &kept };
                        let (c0, k0) = (cpu_of(&srv.pids), cpu_of(&srv.pids[..1]));
                        let (n, t) = pools[mi].run(body, slice).with_context(|| {
                            format!("{:?} round {}", [Mode::Plain, Mode::Kept][mi], r + 1)
                        })?;
                        let e = &mut acc[mi];
                        e.0 += n;
                        e.1 += t;
                        e.2 += cpu_of(&srv.pids) - c0;
                        e.3 += cpu_of(&srv.pids[..1]) - k0;
                    }
                }
            }
            for (mi, (n, t, cpu, kcpu)) in acc.into_iter().enumerate() {
                let n = n.max(1) as f64;
                if mi == 0 {
                    s.plain.push(n / t);
                    s.plain_cpu.push(cpu / n);
                } else {
                    s.kept.push(n / t);
                    s.kept_cpu.push(cpu / n);
                    s.keeper_cpu.push(kcpu / n);
                }
            }
            println!(
                "  round {} {:<8} {:<9} plain {:>9.0} req/s   kept {:>9.0} req/s   kept/plain {:.3}",
                r + 1,
                s.tool,
                s.file,
                s.plain[r],
                s.kept[r],
                s.kept[r] / s.plain[r]
            );
        }
    }
    plain_proc.check_alive("hf-httpd (pass-through)")?;
    let snap = keeper.status()?;
    if snap.restarts != 0 {
        println!(
            "warning: the kept worker restarted {} times during the run",
            snap.restarts
        );
    }
    drop(plain_proc);
    keeper.stop();
    println!(
        "({:.0} s of measurement)",
        measuring.elapsed().as_secs_f64()
    );

    println!();
    println!(
        "{:<9} {:<9} {:>12} {:>12} {:>10} {:>14} {:>26}",
        "tool",
        "file",
        "plain req/s",
        "kept req/s",
        "overhead",
        "paired ratio",
        "server CPU µs/req (keeper)"
    );
    let mut rows = Vec::new();
    for s in &series {
        let mp = median_f(&s.plain);
        let mk = median_f(&s.kept);
        let overhead = (mp - mk) / mp * 100.0;
        let ratios: Vec<f64> = s.plain.iter().zip(&s.kept).map(|(p, k)| k / p).collect();
        let mr = median_f(&ratios);
        let (rmin, rmax) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), r| (a.min(*r), b.max(*r)));
        let cpu = format!(
            "{:.1} → {:.1} ({:.2})",
            median_f(&s.plain_cpu) * 1e6,
            median_f(&s.kept_cpu) * 1e6,
            median_f(&s.keeper_cpu) * 1e6
        );
        println!(
            "{:<9} {:<9} {:>12.0} {:>12.0} {:>9.2}% {:>14.3} {:>26}",
            s.tool, s.file, mp, mk, overhead, mr, cpu
        );
        println!(
            "{:<19} per-round kept/plain: {}  (min {rmin:.3}, max {rmax:.3})",
            "",
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        rows.push(Row::new(
            "throughput",
            format!("{} {} median plain / kept req/s", s.tool, s.file),
            format!("{mp:.0} / {mk:.0}"),
        ));
        rows.push(Row::new(
            "throughput",
            format!(
                "{} {} server CPU µs/req plain → kept (keeper)",
                s.tool, s.file
            ),
            cpu,
        ));
        rows.push(Row::new(
            "throughput",
            format!("{} {} overhead (medians; paired)", s.tool, s.file),
            format!("{overhead:.2} % ; {:.2} %", (1.0 - mr) * 100.0),
        ));
    }
    println!("overhead = (median plain − median kept) / median plain; paired = 1 − median of per-round kept/plain");
    println!("server CPU = CPU time (user+sys) of hf-httpd, resp. keeper + active worker, per request (plain → kept (keeper's part))");
    if wrk.is_none() {
        println!("wrk: not found on PATH, skipped (only the built-in load generator was used)");
        rows.push(Row::new("throughput", "wrk", "not on PATH, skipped"));
    }
    Ok(rows)
}
