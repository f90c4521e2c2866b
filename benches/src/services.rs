//! `hf-bench services`: figures for the three services built on the
//! library (hf-httpd's CGI and resumable downloads, hf-proxy, hf-ftpd),
//! side by side in one run.
//!
//! Overheads are measured as in `hf-bench throughput`: the same binary
//! alone (pass-through, its own `--listen`) and under `holdfast run` (one
//! standby), both running for the whole comparison, loaded in turns of
//! `--slice-ms` (A B B A A B ...) for `--secs` per side and round; the
//! ratio kept/plain is taken per round and reported as its median and
//! range. Every answer is checked: HTTP bodies against the file or the CGI
//! program's output, FTP downloads against the file, FTP uploads by reading
//! the stored files back after each round.
//!
//! - **cgi**: keep-alive clients (a thread each) asking hf-httpd for a
//!   tiny CGI program (`/bin/sh` printing `hello`; the server forks it for
//!   every request).
//! - **resume**: hf-httpd under the keeper serves a large file to a client
//!   that reads it at a paced rate (a small receive buffer, so the worker
//!   blocks in its writes). At `--kills` points spread over the download
//!   the client SIGSTOPs the active worker wherever it is, reads everything
//!   it had written (until the server socket's send queue, asked of the
//!   kernel by sock_diag, is empty too), then SIGKILLs it and times kill →
//!   the next byte, which only the successor can send: nothing the dead
//!   worker wrote is in flight to blur it. Default hf-httpd commits after
//!   every 256 KiB piece and its successor resumes at the last commit;
//!   `hf-httpd --no-resume` commits nothing inside the answer, so its
//!   successor regenerates the whole prefix, which holdfast checks and
//!   swallows. Downloads alternate between the two (two keepers); every
//!   byte of every download is checked against the file, and a wrong one
//!   fails the run.
//! - **proxy**: keep-alive clients sending absolute-form `GET`s through
//!   hf-proxy to an hf-httpd origin run alone.
//! - **ftp**: sessions (a thread each, logged in once as `anonymous`, binary
//!   mode) doing `EPSV` + `RETR` of a file, then in a second comparison
//!   `EPSV` + `STOR` of as many bytes, over and over. The client ACKs
//!   control replies at once and resets `RETR` data connections once they
//!   are read to their end (see [`Ftp`]).
//! - **memory**: keeper private dirty memory and journal resident size
//!   (as in `hf-bench memory`) with 0 and `--idle` idle connections, for
//!   hf-httpd (for reference), hf-proxy (each connection after one request,
//!   its upstream held too) and hf-ftpd (sessions logged in).
//!
//! hf-proxy and hf-ftpd parts are skipped, with a line saying so, when
//! their binaries are not built.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rustix::process::Signal;

use crate::common::{
    active_pid, bin, kib, median_f, raise_nofile, signal, standby_ready, us, Dist, Keeper, Row,
    TempDir,
};
use crate::memory::read_mem;
use crate::throughput::{interleave, write_site, Pool, Rounds, Server};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Parts to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "cgi,resume,proxy,ftp,memory"
    )]
    pub only: Vec<Part>,
    /// Rounds of each alone/kept comparison (the ratio's spread is over rounds).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per side and round.
    #[arg(long, default_value_t = 1)]
    pub secs: u64,
    /// Within a round the two sides take turns in slices this long.
    #[arg(long, default_value_t = 250)]
    pub slice_ms: u64,
    /// Keep-alive clients of the CGI program, a thread each.
    #[arg(long, default_value_t = 8)]
    pub cgi_conns: usize,
    /// Downloads per mode (resume, full replay), alternating between them.
    #[arg(long, default_value_t = 10)]
    pub downloads: usize,
    /// SIGKILLs of the active worker per download, spread over it.
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// Size of the downloaded file, MiB.
    #[arg(long, default_value_t = 64)]
    pub file_mib: usize,
    /// The downloading client's read rate, MiB/s.
    #[arg(long, default_value_t = 200)]
    pub rate_mib: u64,
    /// Keep-alive clients through the proxy.
    #[arg(long, default_value_t = 16)]
    pub proxy_conns: usize,
    /// Load threads for the proxy's clients.
    #[arg(long, default_value_t = 2)]
    pub proxy_threads: usize,
    /// Sizes of the files fetched through the proxy, KiB (each on its own).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub proxy_sizes: Vec<usize>,
    /// FTP sessions, a thread each.
    #[arg(long, default_value_t = 4)]
    pub ftp_sessions: usize,
    /// Size of each FTP transfer, KiB.
    #[arg(long, default_value_t = 1024)]
    pub ftp_kib: usize,
    /// Idle connections for the memory figures.
    #[arg(long, default_value_t = 100)]
    pub idle: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Cgi,
    Resume,
    Proxy,
    Ftp,
    Memory,
}

const BENCH: &str = "services";

/// The CGI program: the smallest answer, so what is measured is the
/// server's part (and the fork and exec of `/bin/sh`).
const CGI_SCRIPT: &str = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nhello\\n'\n";
const CGI_BODY: &[u8] = b"hello\n";

pub fn run(a: &Args) -> anyhow::Result<Vec<Row>> {
    if a.rounds == 0
        || a.secs == 0
        || a.cgi_conns == 0
        || a.proxy_conns == 0
        || a.ftp_sessions == 0
        || a.proxy_sizes.is_empty()
        || a.proxy_sizes.contains(&0)
        || a.ftp_kib == 0
        || a.file_mib == 0
        || a.rate_mib == 0
    {
        bail!("--rounds, --secs, the client counts, the sizes and --rate-mib must be at least 1");
    }
    println!(
        "== services: each service alone vs under the keeper, {} rounds × {} s per side (in {} ms slices, alternating); \
         downloads killed mid-answer, resume vs full replay ==",
        a.rounds, a.secs, a.slice_ms
    );
    let httpd = bin("hf-httpd")?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let parts = [
        Part::Cgi,
        Part::Resume,
        Part::Proxy,
        Part::Ftp,
        Part::Memory,
    ];
    for part in parts.into_iter().filter(|p| a.only.contains(p)) {
        println!();
        let t = Instant::now();
        let r = match part {
            Part::Cgi => cgi(a, &httpd),
            Part::Resume => resume(a, &httpd),
            Part::Proxy => proxy(a, &httpd),
            Part::Ftp => ftp(a),
            Part::Memory => memory(a, &httpd),
        };
        match r {
            Ok(v) => rows.extend(v),
            Err(e) => {
                eprintln!("hf-bench services, {part:?}: {e:#}");
                failures.push(format!("{part:?}: {e:#}"));
            }
        }
        println!("({part:?}: {:.1} s)", t.elapsed().as_secs_f64());
    }
    // Any failure (a wrong byte above all) fails the whole run.
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(rows)
}

/// The service binary `name` next to this one, or a row saying the part
/// was skipped.
fn optional_bin(name: &str, part: &str) -> Result<std::path::PathBuf, Vec<Row>> {
    bin(name).map_err(|_| {
        println!("{part}: skipped: target/release/{name} is not built");
        vec![Row::new(
            BENCH,
            format!("{part}: skipped"),
            format!("target/release/{name} not built"),
        )]
    })
}

// ---------------------------------------------------------------------------
// Alone vs kept.

/// Both sides of a comparison, started: the same command alone (`plain`,
/// on `--listen`) and under a keeper (`kept`).
fn pair(cmd: &[&OsStr], logs: &Path) -> anyhow::Result<[Server; 2]> {
    let plain = Server::spawn_alone("plain", cmd, &logs.join("plain.log"))?;
    let kept = Server::spawn_kept("kept", &[], cmd)?;
    println!("  plain: {}   kept: {}", plain.describe(), kept.describe());
    Ok([plain, kept])
}

fn slices(a: &Args) -> (u64, Duration) {
    let ms = a.slice_ms.max(50);
    (((a.secs * 1000) / ms).max(1), Duration::from_millis(ms))
}

/// HTTP load: `conns` keep-alive connections over `threads` threads
/// asking for `target` (a path, or an absolute URL for a proxy), every body
/// checked against `body`.
struct HttpLoad<'a> {
    target: &'a str,
    body: &'a [u8],
    conns: usize,
    threads: usize,
}

impl HttpLoad<'_> {
    fn pool(&self, addr: SocketAddr) -> anyhow::Result<Pool> {
        Pool::connect(addr, self.target, self.conns, self.threads)
    }
}

/// `load` on both sides, interleaved; fresh connections each round.
fn http_ab(
    a: &Args,
    what: &str,
    sides: &mut [Server; 2],
    load: &HttpLoad,
) -> anyhow::Result<Rounds> {
    let (n, slice) = slices(a);
    for s in sides.iter() {
        load.pool(s.addr)?
            .run(load.body, Duration::from_millis(250))
            .with_context(|| format!("{what}, {} warm-up", s.name))?;
    }
    let mut rounds = Rounds::default();
    for r in 0..a.rounds {
        let mut pools = [load.pool(sides[0].addr)?, load.pool(sides[1].addr)?];
        let t = interleave([&sides[0], &sides[1]], n, |i| {
            pools[i]
                .run(load.body, slice)
                .with_context(|| format!("{what}, {} round {}", sides[i].name, r + 1))
        })?;
        rounds.push(t);
        print_round(r, what, "req/s", &rounds);
    }
    for s in sides.iter_mut() {
        s.check()?;
    }
    Ok(rounds)
}

fn print_round(r: usize, what: &str, unit: &str, x: &Rounds) {
    println!(
        "  round {} {what}: plain {:>8.0} {unit}   kept {:>8.0} {unit}   kept/plain {:.3}",
        r + 1,
        x.plain[r],
        x.kept[r],
        x.kept[r] / x.plain[r]
    );
}

/// The rows of one comparison: medians of each side, the per-round ratio
/// with its spread, and CPU per unit. `bytes`: bytes per unit, for MiB/s.
fn ab_rows(what: &str, unit: &str, bytes: Option<usize>, x: &Rounds) -> Vec<Row> {
    let (mp, mk) = (median_f(&x.plain), median_f(&x.kept));
    let ratio = x.ratio();
    let mib = |v: f64| bytes.map(|b| v * b as f64 / 1048576.0);
    let both_mib = match (mib(mp), mib(mk)) {
        (Some(p), Some(k)) => format!(" ({p:.0} / {k:.0} MiB/s)"),
        _ => String::new(),
    };
    let cpu = format!(
        "{:.1} → {:.1} ({:.2})",
        median_f(&x.plain_cpu) * 1e6,
        median_f(&x.kept_cpu) * 1e6,
        median_f(&x.keeper_cpu) * 1e6
    );
    let unit1 = unit.trim_end_matches("/s").trim_end_matches('s');
    println!(
        "  {what}: plain / kept {mp:.0} / {mk:.0} {unit}{both_mib} (medians); kept/plain per round {} [{}]; overhead {:.1} %; server CPU µs/{unit1} {cpu}",
        ratio.text(),
        ratio.rounds_text(),
        (1.0 - ratio.median) * 100.0
    );
    vec![
        Row::new(
            BENCH,
            format!("{what}: median plain / kept {unit}"),
            format!("{mp:.0} / {mk:.0} {unit}{both_mib}"),
        )
        .num("a", mp)
        .num("b", mk),
        ratio.row(
            BENCH,
            format!("{what}: kept/plain per round, median (min–max)"),
        ),
        Row::new(
            BENCH,
            format!("{what}: server CPU µs/{unit1} plain → kept (keeper's part)"),
            cpu,
        ),
    ]
}

// ---------------------------------------------------------------------------
// CGI.

fn cgi(a: &Args, httpd: &Path) -> anyhow::Result<Vec<Row>> {
    let what = format!("hf-httpd CGI, {} keep-alive clients", a.cgi_conns);
    println!(
        "-- {what} (a thread each), GET /cgi-bin/hello (/bin/sh printing hello, chunked answer) --"
    );
    let dir = TempDir::new("cgi");
    let (root, progs) = (dir.path().join("root"), dir.path().join("cgi-bin"));
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&progs)?;
    let script = progs.join("hello");
    std::fs::write(&script, CGI_SCRIPT)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let mut sides = pair(
        &[
            httpd.as_os_str(),
            "--root".as_ref(),
            root.as_os_str(),
            "--cgi-dir".as_ref(),
            progs.as_os_str(),
        ],
        dir.path(),
    )?;
    let load = HttpLoad {
        target: "/cgi-bin/hello",
        body: CGI_BODY,
        conns: a.cgi_conns,
        threads: a.cgi_conns,
    };
    let x = http_ab(a, &what, &mut sides, &load)?;
    Ok(ab_rows(&what, "req/s", None, &x))
}

// ---------------------------------------------------------------------------
// Proxy.

fn proxy(a: &Args, httpd: &Path) -> anyhow::Result<Vec<Row>> {
    let hf_proxy = match optional_bin("hf-proxy", "hf-proxy") {
        Ok(p) => p,
        Err(rows) => return Ok(rows),
    };
    println!(
        "-- hf-proxy, {} keep-alive clients over {} threads, absolute-form GETs to an hf-httpd origin run alone --",
        a.proxy_conns, a.proxy_threads
    );
    let dir = TempDir::new("proxy");
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site)?;
    let files = write_site(&site, &a.proxy_sizes)?;
    let origin = Server::spawn_alone(
        "origin",
        &[httpd.as_os_str(), "--root".as_ref(), site.as_os_str()],
        &dir.path().join("origin.log"),
    )?;
    println!("  origin: {}", origin.describe());
    let mut sides = pair(&[hf_proxy.as_os_str()], dir.path())?;
    let mut rows = Vec::new();
    for (path, body) in &files {
        let what = format!(
            "hf-proxy {}, {} keep-alive clients",
            path.trim_start_matches('/'),
            a.proxy_conns
        );
        let target = format!("http://{}{path}", origin.addr);
        let load = HttpLoad {
            target: &target,
            body,
            conns: a.proxy_conns,
            threads: a.proxy_threads,
        };
        let x = http_ab(a, &what, &mut sides, &load)?;
        rows.extend(ab_rows(&what, "req/s", None, &x));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// FTP.

/// A minimal FTP client: one session, logged in as `anonymous`, binary
/// mode, a passive (`EPSV`) data connection per transfer.
struct Ftp {
    ctrl: TcpStream,
    buf: Vec<u8>,
}

impl Ftp {
    fn login(addr: SocketAddr) -> anyhow::Result<Ftp> {
        let ctrl = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
        ctrl.set_nodelay(true)?;
        ctrl.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut f = Ftp {
            ctrl,
            buf: Vec::new(),
        };
        f.expect(220).context("greeting")?;
        f.cmd("USER anonymous", 331)?;
        f.cmd("PASS x", 230)?;
        f.cmd("TYPE I", 200)?;
        Ok(f)
    }

    /// One reply line, without its CRLF.
    fn line(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..p]).into_owned();
                self.buf.drain(..p + 2);
                return Ok(line);
            }
            let mut chunk = [0u8; 1024];
            let n = self.ctrl.read(&mut chunk).context("control connection")?;
            if n == 0 {
                bail!("the server closed the control connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// One reply (every line of a multi-line one): its code and last line.
    ///
    /// The reply is acknowledged at once (TCP_QUICKACK): hf-ftpd's control
    /// connection has no TCP_NODELAY, so its `226` after a transfer waits
    /// for the ACK of its `150` — up to the delayed-ACK timeout (40 ms on
    /// Linux), which both sides would then measure instead of their work.
    fn reply(&mut self) -> anyhow::Result<(u16, String)> {
        let first = self.line()?;
        let _ = rustix::net::sockopt::set_tcp_quickack(&self.ctrl, true);
        let code: u16 = first
            .get(..3)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad reply {first:?}"))?;
        if first.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, first));
        }
        let end = format!("{code} ");
        loop {
            let l = self.line()?;
            if l.starts_with(&end) {
                return Ok((code, l));
            }
        }
    }

    fn expect(&mut self, want: u16) -> anyhow::Result<String> {
        let (code, text) = self.reply()?;
        if code != want {
            bail!("expected a {want} reply, got {text:?}");
        }
        Ok(text)
    }

    fn cmd(&mut self, line: &str, want: u16) -> anyhow::Result<String> {
        self.ctrl.write_all(format!("{line}\r\n").as_bytes())?;
        self.expect(want).with_context(|| format!("after {line}"))
    }

    /// `EPSV`, and a data connection to the port it names.
    fn passive(&mut self) -> anyhow::Result<TcpStream> {
        let text = self.cmd("EPSV", 229)?;
        let port: u16 = text
            .split_once("(|||")
            .and_then(|(_, r)| r.split_once("|)"))
            .and_then(|(p, _)| p.parse().ok())
            .with_context(|| format!("no port in {text:?}"))?;
        let to = SocketAddr::new(self.ctrl.peer_addr()?.ip(), port);
        let d = TcpStream::connect(to).with_context(|| format!("data connection to {to}"))?;
        d.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(d)
    }

    /// `RETR name`, the file read to its end into `got` and checked.
    fn retr(&mut self, name: &str, want: &[u8], got: &mut Vec<u8>) -> anyhow::Result<()> {
        let mut d = self.passive()?;
        self.cmd(&format!("RETR {name}"), 150)?;
        got.clear();
        d.read_to_end(got).context("RETR data")?;
        // The server closed first: closing with a reset spares its port a
        // minute in TIME_WAIT (a thousand transfers a second would run the
        // loopback out of ports).
        rustix::net::sockopt::set_socket_linger(&d, Some(Duration::ZERO))?;
        drop(d);
        self.expect(226).context("end of RETR")?;
        if got[..] != *want {
            bail!(
                "RETR {name}: {} bytes that differ from the file's {}",
                got.len(),
                want.len()
            );
        }
        Ok(())
    }

    /// `STOR name` with `body`; the end of the data is the end of the file.
    fn stor(&mut self, name: &str, body: &[u8]) -> anyhow::Result<()> {
        let mut d = self.passive()?;
        self.cmd(&format!("STOR {name}"), 150)?;
        d.write_all(body).context("STOR data")?;
        d.shutdown(Shutdown::Write)?;
        self.expect(226).context("end of STOR")?;
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Retr,
    Stor,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Retr => "RETR",
            Op::Stor => "STOR",
        }
    }
}

/// Where session `i` of side `side` uploads.
fn upload_name(side: usize, i: usize) -> String {
    format!("up-{side}-{i}.bin")
}

/// Every session of one side doing `op` over and over for `dur` (a thread
/// each); (transfers, seconds).
fn ftp_slice(
    sessions: &mut [Ftp],
    side: usize,
    op: Op,
    file: &str,
    body: &[u8],
    dur: Duration,
) -> anyhow::Result<(u64, f64)> {
    let barrier = Barrier::new(sessions.len() + 1);
    std::thread::scope(|sc| {
        let hs: Vec<_> = sessions
            .iter_mut()
            .enumerate()
            .map(|(i, f)| {
                let barrier = &barrier;
                sc.spawn(move || -> anyhow::Result<u64> {
                    let up = upload_name(side, i);
                    let mut got = Vec::with_capacity(body.len());
                    barrier.wait();
                    let deadline = Instant::now() + dur;
                    let mut n = 0;
                    while Instant::now() < deadline {
                        match op {
                            Op::Retr => f.retr(file, body, &mut got)?,
                            Op::Stor => f.stor(&up, body)?,
                        }
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut total = 0;
        for h in hs {
            total += h
                .join()
                .map_err(|_| anyhow::anyhow!("FTP client thread panicked"))??;
        }
        Ok((total, t0.elapsed().as_secs_f64()))
    })
}

fn ftp(a: &Args) -> anyhow::Result<Vec<Row>> {
    let ftpd = match optional_bin("hf-ftpd", "hf-ftpd") {
        Ok(p) => p,
        Err(rows) => return Ok(rows),
    };
    let size = a.ftp_kib * 1024;
    println!(
        "-- hf-ftpd, {} sessions (a thread each, anonymous, TYPE I): EPSV + RETR of {} KiB, then EPSV + STOR of as much, over and over --",
        a.ftp_sessions, a.ftp_kib
    );
    let dir = TempDir::new("ftp");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    let files = write_site(&root, &[a.ftp_kib])?;
    let (file, body) = (files[0].0.trim_start_matches('/'), &files[0].1);
    let mut sides = pair(
        &[
            ftpd.as_os_str(),
            "--root".as_ref(),
            root.as_os_str(),
            "--anonymous".as_ref(),
            "--anonymous-write".as_ref(),
        ],
        dir.path(),
    )?;
    let mut sessions = [
        (0..a.ftp_sessions)
            .map(|_| Ftp::login(sides[0].addr))
            .collect::<anyhow::Result<Vec<_>>>()?,
        (0..a.ftp_sessions)
            .map(|_| Ftp::login(sides[1].addr))
            .collect::<anyhow::Result<Vec<_>>>()?,
    ];
    let (n, slice) = slices(a);
    let mut rows = Vec::new();
    for op in [Op::Retr, Op::Stor] {
        let what = format!(
            "hf-ftpd {} {} KiB, {} sessions",
            op.verb(),
            a.ftp_kib,
            a.ftp_sessions
        );
        for (side, s) in sessions.iter_mut().enumerate() {
            ftp_slice(s, side, op, file, body, Duration::from_millis(250))
                .with_context(|| format!("{what}, warm-up"))?;
        }
        let mut x = Rounds::default();
        for r in 0..a.rounds {
            let t = interleave([&sides[0], &sides[1]], n, |i| {
                ftp_slice(&mut sessions[i], i, op, file, body, slice)
                    .with_context(|| format!("{what}, {} round {}", sides[i].name, r + 1))
            })?;
            x.push(t);
            print_round(r, &what, "transfers/s", &x);
            if op == Op::Stor {
                // Every upload, read back from the disk.
                for side in 0..2 {
                    for i in 0..a.ftp_sessions {
                        let p = root.join(upload_name(side, i));
                        if std::fs::read(&p)? != *body {
                            bail!("{what}: {} differs from what was uploaded", p.display());
                        }
                    }
                }
            }
        }
        rows.extend(ab_rows(&what, "transfers/s", Some(size), &x));
    }
    for s in sides.iter_mut() {
        s.check()?;
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// Resume vs full replay.

/// The downloading client's receive buffer, set before the handshake: a
/// small window keeps the worker's writes blocking, and what has to be
/// read again after the kill small.
const RCVBUF: usize = 256 * 1024;

/// One way of serving the download, and what its kills gave.
struct Mode {
    name: &'static str,
    keeper: Keeper,
    /// Per kill: kill → next byte at the client (ns).
    samples: Vec<u64>,
    /// Per kill: body bytes the dead worker had written (what its successor
    /// regenerates without resume).
    at: Vec<u64>,
    /// Per kill: kill → the worker gone (its pidfd readable here), ns: the
    /// kernel's part.
    gone: Vec<u64>,
    /// Per kill: worker gone → next byte (ns): the keeper's, the
    /// successor's and the service's part.
    after_gone: Vec<u64>,
    /// Per kill: the keeper's own figure, death noticed → connections
    /// handed over (ns).
    keeper_us: Vec<u64>,
    /// Kill points where the worker had already written the whole answer.
    skipped: usize,
    downloads: usize,
}

/// The send queue of the TCP socket `local` → `remote`: bytes written to
/// it and not yet acknowledged (`write_seq − snd_una`). Asked of the kernel
/// with one sock_diag lookup by address, which stays fast however many
/// sockets there are (reading /proc/net/tcp takes tens of milliseconds
/// with the thousands of TIME_WAIT sockets other benchmarks leave).
fn send_queue(local: SocketAddr, remote: SocketAddr) -> anyhow::Result<u32> {
    use rustix::net::{
        netlink, recv, sendto, socket, AddressFamily, RecvFlags, SendFlags, SocketType,
    };
    let (SocketAddr::V4(l), SocketAddr::V4(r)) = (local, remote) else {
        bail!("IPv4 only");
    };
    // struct nlmsghdr: SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST.
    let mut m = Vec::with_capacity(72);
    m.extend(72u32.to_ne_bytes());
    m.extend(20u16.to_ne_bytes());
    m.extend(1u16.to_ne_bytes());
    m.extend(1u32.to_ne_bytes());
    m.extend(0u32.to_ne_bytes());
    // struct inet_diag_req_v2: AF_INET, IPPROTO_TCP, no extensions, any
    // state, then struct inet_diag_sockid (ports and addresses in network
    // order, no interface, INET_DIAG_NOCOOKIE).
    m.extend([2u8, 6, 0, 0]);
    m.extend(u32::MAX.to_ne_bytes());
    m.extend(l.port().to_be_bytes());
    m.extend(r.port().to_be_bytes());
    m.extend(l.ip().octets());
    m.extend([0u8; 12]);
    m.extend(r.ip().octets());
    m.extend([0u8; 12]);
    m.extend(0u32.to_ne_bytes());
    m.extend([0xffu8; 8]);
    let fd = socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::SOCK_DIAG),
    )?;
    sendto(
        &fd,
        &m,
        SendFlags::empty(),
        &netlink::SocketAddrNetlink::new(0, 0),
    )?;
    let mut buf = [0u8; 512];
    let (n, _) = recv(&fd, &mut buf, RecvFlags::empty())?;
    let field = |at: usize| -> Option<[u8; 4]> { buf[..n].get(at..at + 4)?.try_into().ok() };
    match u16::from_ne_bytes([buf[4], buf[5]]) {
        // NLMSG_ERROR: a negated errno.
        2 => bail!(
            "sock_diag: {}",
            std::io::Error::from_raw_os_error(-field(16).map_or(0, i32::from_ne_bytes))
        ),
        // struct inet_diag_msg after the header: family, state, timer,
        // retrans, sockid (48), expires, rqueue, wqueue.
        20 => field(16 + 60)
            .map(u32::from_ne_bytes)
            .context("short sock_diag answer"),
        t => bail!("sock_diag: unexpected message type {t}"),
    }
}

/// Reads everything the (stopped) server has written, checking it, until
/// nothing is left in either socket: `pos` is then where its output stands.
fn drain(
    s: &mut TcpStream,
    server: SocketAddr,
    buf: &mut [u8],
    pos: &mut u64,
    h: u64,
    body: &[u8],
) -> anyhow::Result<()> {
    let client = s.local_addr()?;
    // ACK at once, so the server's send queue empties as soon as the
    // client has the bytes.
    rustix::net::sockopt::set_tcp_quickack(&*s, true)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = rustix::io::ioctl_fionread(&*s)?;
        if ready > 0 {
            *pos += read_checked(s, buf, ready, body, *pos - h)? as u64;
            continue;
        }
        if send_queue(server, client)? == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the stopped worker's output does not drain");
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Waits until every thread of `pid` is stopped (state `T` in
/// /proc/PID/task/*/stat): SIGSTOP is delivered asynchronously, and a
/// thread still running could write after the drain.
fn wait_stopped(pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut all = true;
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = std::fs::read_to_string(t?.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
            all &= matches!(state, Some('T' | 't') | None);
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("worker {pid} does not stop");
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The instant `pid` is gone (its pidfd readable), seen from a thread.
fn watch_death(pid: u32) -> Option<std::thread::JoinHandle<Option<Instant>>> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let p = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()?;
    Some(std::thread::spawn(move || {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let limit = Timespec {
            tv_sec: 20,
            tv_nsec: 0,
        };
        (poll(&mut fds, Some(&limit)).ok()? > 0).then(Instant::now)
    }))
}

/// Reads from `s` into `buf` (at most `limit` bytes) and checks what came
/// against the file, `pos` being the body offset; returns the count.
fn read_checked(
    s: &mut TcpStream,
    buf: &mut [u8],
    limit: u64,
    body: &[u8],
    pos: u64,
) -> anyhow::Result<usize> {
    let want = buf.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
    let n = s.read(&mut buf[..want]).context("reading the download")?;
    if n == 0 {
        bail!(
            "the server closed the download after {pos} of {} body bytes",
            body.len()
        );
    }
    let p = pos as usize;
    if buf[..n] != body[p..p + n] {
        let i = buf[..n]
            .iter()
            .zip(&body[p..])
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        bail!(
            "CORRUPT DOWNLOAD: body byte {} differs from the file",
            p + i
        );
    }
    Ok(n)
}

impl Mode {
    /// One download of `path` (contents `body`), with the worker killed at
    /// `kills` points spread over it.
    fn download(&mut self, path: &str, body: &[u8], a: &Args, d: usize) -> anyhow::Result<()> {
        let addr = self.keeper.addr;
        let mut s = hf_tests::connect_small_rcvbuf(addr, RCVBUF)?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut buf = vec![0u8; 64 * 1024];
        // The head.
        let mut head = Vec::new();
        let head_end = loop {
            if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if head.len() > 64 * 1024 {
                bail!("no end of the response head");
            }
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("the server closed the connection before answering");
            }
            head.extend_from_slice(&buf[..n]);
        };
        let text = String::from_utf8_lossy(&head[..head_end]);
        let want_len = format!("content-length: {}\r\n", body.len());
        if !text.starts_with("HTTP/1.1 200") || !text.to_ascii_lowercase().contains(&want_len) {
            bail!("unexpected head: {text:?}");
        }
        let early = &head[head_end..];
        if early[..] != body[..early.len()] {
            bail!("CORRUPT DOWNLOAD: the first body bytes differ from the file");
        }
        let size = body.len() as u64;
        // Stream offsets: the head counts (it is in the sockets' queues too).
        let h = head_end as u64;
        let end = h + size;
        let mut pos = head.len() as u64;
        // Kill points over the first 7/8 (what the sockets can hold at
        // the last one must not be the whole rest), shifted a little each
        // download so they land at different places within the pieces.
        let step = (size - size / 8) / (a.kills as u64 + 1);
        let shift = (d as u64 * 37 * 1024) % step.max(1);
        let points: Vec<u64> = (1..=a.kills as u64).map(|k| h + k * step + shift).collect();
        let mut next = 0;
        let rate = (a.rate_mib << 20) as f64;
        let (mut t_base, mut pos_base) = (Instant::now(), pos);
        while pos < end {
            if next < points.len() && pos >= points[next] {
                next += 1;
                self.kill_here(&mut s, &mut buf, &mut pos, h, body)?;
                (t_base, pos_base) = (Instant::now(), pos);
                continue;
            }
            pos += read_checked(&mut s, &mut buf, end - pos, body, pos - h)? as u64;
            let due = Duration::from_secs_f64((pos - pos_base) as f64 / rate);
            if let Some(wait) = due.checked_sub(t_base.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        self.downloads += 1;
        Ok(())
    }

    /// Stops the active worker (SIGSTOP) wherever it is, reads all it has
    /// written, then SIGKILLs it and times kill → the next byte, which only
    /// its successor can send.
    fn kill_here(
        &mut self,
        s: &mut TcpStream,
        buf: &mut [u8],
        pos: &mut u64,
        h: u64,
        body: &[u8],
    ) -> anyhow::Result<()> {
        let end = h + body.len() as u64;
        let snap = self.keeper.status().context("keeper status")?;
        let pid = active_pid(&snap).context("no active worker")?;
        signal(pid, Signal::STOP);
        let drained =
            wait_stopped(pid).and_then(|()| drain(s, self.keeper.addr, buf, pos, h, body));
        if let Err(e) = drained {
            signal(pid, Signal::CONT);
            return Err(e);
        }
        if *pos >= end {
            // The whole answer was out: nothing left to recover.
            signal(pid, Signal::CONT);
            self.skipped += 1;
            return Ok(());
        }
        let at = *pos - h;
        let death = watch_death(pid);
        let t0 = Instant::now();
        signal(pid, Signal::KILL);
        *pos += read_checked(s, buf, end - *pos, body, at)? as u64;
        let t1 = Instant::now();
        self.samples.push((t1 - t0).as_nanos() as u64);
        self.at.push(at);
        if let Some(gone) = death.and_then(|h| h.join().ok().flatten()) {
            self.gone
                .push(gone.saturating_duration_since(t0).as_nanos() as u64);
            self.after_gone
                .push(t1.saturating_duration_since(gone).as_nanos() as u64);
        }
        // A hot standby again before the next kill.
        let after = self.keeper.wait_for(
            "the restart, a new active worker and a ready standby",
            Duration::from_secs(20),
            |st| {
                st.restarts > snap.restarts
                    && active_pid(st).is_some_and(|p| p != pid)
                    && standby_ready(st)
            },
        )?;
        self.keeper_us
            .extend(after.last_recovery_us.map(|u| u * 1000));
        Ok(())
    }
}

/// Least-squares slope of `y` (ns) over `x` (bytes), in µs per MiB.
fn slope_us_per_mib(x: &[u64], y: &[u64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (
        x.iter().sum::<u64>() as f64 / n,
        y.iter().sum::<u64>() as f64 / n,
    );
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let dx = *a as f64 - mx;
        sxy += dx * (*b as f64 - my);
        sxx += dx * dx;
    }
    sxy / sxx / 1e3 * 1048576.0
}

fn resume(a: &Args, httpd: &Path) -> anyhow::Result<Vec<Row>> {
    if a.downloads == 0 || a.kills == 0 {
        bail!("--downloads and --kills must be at least 1");
    }
    println!(
        "-- hf-httpd under the keeper, {} MiB download read at {} MiB/s, {} SIGKILLs of the active worker per download, \
         {} downloads each way, alternating: resume (a commit every 256 KiB) vs full replay (--no-resume) --",
        a.file_mib, a.rate_mib, a.kills, a.downloads
    );
    let site = TempDir::new("download");
    let files = write_site(site.path(), &[a.file_mib * 1024])?;
    let (path, body) = (&files[0].0, &files[0].1);
    let root = site.path().as_os_str();
    let start = |name, extra: &[&str]| -> anyhow::Result<Mode> {
        let mut cmd: Vec<&OsStr> = vec![httpd.as_os_str(), "--root".as_ref(), root];
        cmd.extend(extra.iter().map(OsStr::new));
        let keeper = Keeper::start(1, &cmd)?;
        println!("  {name}: keeper pid {} on {}", keeper.pid(), keeper.addr);
        Ok(Mode {
            name,
            keeper,
            samples: vec![],
            at: vec![],
            gone: vec![],
            after_gone: vec![],
            keeper_us: vec![],
            skipped: 0,
            downloads: 0,
        })
    };
    let mut modes = [
        start("resume", &[])?,
        start("full replay", &["--no-resume"])?,
    ];
    let t = Instant::now();
    for d in 0..2 * a.downloads {
        // resume, replay, replay, resume, ...
        let m = &mut modes[[[0, 1], [1, 0]][(d / 2) % 2][d % 2]];
        let k0 = m.samples.len();
        m.download(path, body, a, d)
            .with_context(|| format!("{} download {}", m.name, m.downloads + 1))?;
        let got = &m.samples[k0..];
        println!(
            "  download {:>2} {:<11} {} MiB byte-exact, {} kills, kill → next byte p50 {} µs, max {} µs",
            d + 1,
            m.name,
            a.file_mib,
            got.len(),
            Dist::of(got).map_or("-".into(), |x| us(x.p50)),
            Dist::of(got).map_or("-".into(), |x| us(x.max)),
        );
    }
    println!("  ({:.1} s)", t.elapsed().as_secs_f64());
    let mut rows = Vec::new();
    let mut p = [(0.0, 0.0); 2];
    for (i, m) in modes.iter().enumerate() {
        let d = Dist::of(&m.samples).context("no kill landed mid-download")?;
        p[i] = (d.p50 as f64, d.p99 as f64);
        let slope = slope_us_per_mib(&m.at, &m.samples);
        println!("{}", d.row_us(&format!("{}: kill → next byte", m.name)));
        for (what, v) in [
            ("kill → worker gone (pidfd)", &m.gone),
            ("worker gone → next byte", &m.after_gone),
            ("keeper: death → handed over", &m.keeper_us),
        ] {
            if let Some(x) = Dist::of(v) {
                println!("{}", x.row_us(&format!("  of which {what}")));
            }
        }
        println!(
            "  {:<44} + {slope:.0} µs per MiB the dead worker had sent (least-squares slope)",
            ""
        );
        let how = if i == 0 {
            "resume at the last 256 KiB commit (default hf-httpd)"
        } else {
            "full replay of the prefix (hf-httpd --no-resume)"
        };
        rows.push(
            Row::new(
                BENCH,
                format!("download kill → next byte at the client, {how}: p50 / p99 / max"),
                d.short_us(),
            )
            .dist_us(&d)
            .num("us_per_mib", slope),
        );
        if let (Some(g), Some(r)) = (Dist::of(&m.gone), Dist::of(&m.after_gone)) {
            rows.push(
                Row::new(
                    BENCH,
                    format!(
                        "download, {}: of which kill → worker gone (kernel) ; worker gone → next byte (keeper, successor), p50",
                        m.name
                    ),
                    format!("{} ; {} µs", us(g.p50), us(r.p50)),
                )
                .num("gone_p50_us", g.p50 as f64 / 1e3)
                .num("after_gone_p50_us", r.p50 as f64 / 1e3),
            );
        }
    }
    let (r50, r99) = (p[1].0 / p[0].0, p[1].1 / p[0].1);
    println!("  full replay / resume: p50 {r50:.1}×, p99 {r99:.1}×");
    rows.push(
        Row::new(
            BENCH,
            "download kill → next byte, full replay / resume: p50 ; p99",
            format!("{r50:.1}× ; {r99:.1}×"),
        )
        .num("p50_ratio", r50)
        .num("p99_ratio", r99),
    );
    let kills: usize = modes.iter().map(|m| m.samples.len()).sum();
    let skipped: usize = modes.iter().map(|m| m.skipped).sum();
    rows.push(
        Row::new(
            BENCH,
            "downloads killed mid-answer: every byte checked",
            format!(
                "{} × {} MiB byte-exact, {kills} kills{}",
                modes[0].downloads + modes[1].downloads,
                a.file_mib,
                if skipped > 0 {
                    format!(" ({skipped} kill points skipped: the answer was already all written)")
                } else {
                    String::new()
                }
            ),
        )
        .num("kills", kills as f64),
    );
    Ok(rows)
}

// ---------------------------------------------------------------------------
// Memory.

/// Keeper memory with `cmd` under it, at 0 and at `n` idle connections
/// opened by `open`.
fn keeper_memory<T>(
    name: &str,
    cmd: &[&OsStr],
    n: usize,
    mut open: impl FnMut(SocketAddr) -> anyhow::Result<T>,
) -> anyhow::Result<Row> {
    let mut k = Keeper::start(1, cmd)?;
    k.wait_held(0)?;
    std::thread::sleep(Duration::from_millis(200));
    let m0 = read_mem(k.pid())?;
    let held = (0..n)
        .map(|i| open(k.addr).with_context(|| format!("{name}: connection {}", i + 1)))
        .collect::<anyhow::Result<Vec<T>>>()?;
    k.wait_held(n)?;
    std::thread::sleep(Duration::from_millis(200));
    let m1 = read_mem(k.pid())?;
    drop(held);
    k.stop();
    let total = |m: &crate::memory::Mem| m.private_dirty + m.journal_rss;
    let per = (total(&m1) as f64 - total(&m0) as f64) / n as f64;
    println!(
        "  {name:<9} keeper private dirty + journal resident: 0 conns {} + {} = {}; {n} conns {} + {} = {} ({per:.0} B per connection)",
        kib(m0.private_dirty),
        kib(m0.journal_rss),
        kib(total(&m0)),
        kib(m1.private_dirty),
        kib(m1.journal_rss),
        kib(total(&m1)),
    );
    Ok(Row::new(
        BENCH,
        format!("{name}: keeper private dirty + journal @ {n} idle conns (@ 0)"),
        format!(
            "{} + {} = {} ({})",
            kib(m1.private_dirty),
            kib(m1.journal_rss),
            kib(total(&m1)),
            kib(total(&m0))
        ),
    )
    .num("conns", n as f64)
    .num("keeper_private_dirty", m1.private_dirty as f64)
    .num("journal_rss", m1.journal_rss as f64)
    .num("keeper_private_dirty_0", m0.private_dirty as f64)
    .num("journal_rss_0", m0.journal_rss as f64)
    .num("per_conn", per))
}

fn memory(a: &Args, httpd: &Path) -> anyhow::Result<Vec<Row>> {
    let n = a.idle.max(1);
    raise_nofile();
    println!(
        "-- keeper memory, each service under its own keeper (1 standby): 0, then {n} idle connections \
         (hf-httpd and hf-proxy: after one GET each; hf-ftpd: logged in) --"
    );
    let dir = TempDir::new("memory");
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site)?;
    let files = write_site(&site, &[1])?;
    let (path, body) = (&files[0].0, &files[0].1);
    let get = |addr: SocketAddr, target: &str| -> anyhow::Result<hf_tests::http::Client> {
        let mut c = hf_tests::http::Client::connect(addr)?;
        c.send(format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let r = c.read_response(false)?;
        if r.status != 200 || r.body != *body {
            bail!(
                "unexpected answer: status {}, {} bytes",
                r.status,
                r.body.len()
            );
        }
        Ok(c)
    };
    let mut rows = vec![keeper_memory(
        "hf-httpd",
        &[httpd.as_os_str(), "--root".as_ref(), site.as_os_str()],
        n,
        |addr| get(addr, path),
    )?];
    match optional_bin("hf-proxy", "memory, hf-proxy") {
        Ok(p) => {
            let origin = Server::spawn_alone(
                "origin",
                &[httpd.as_os_str(), "--root".as_ref(), site.as_os_str()],
                &dir.path().join("origin.log"),
            )?;
            let target = format!("http://{}{path}", origin.addr);
            rows.push(keeper_memory("hf-proxy", &[p.as_os_str()], n, |addr| {
                get(addr, &target)
            })?);
        }
        Err(r) => rows.extend(r),
    }
    match optional_bin("hf-ftpd", "memory, hf-ftpd") {
        Ok(p) => rows.push(keeper_memory(
            "hf-ftpd",
            &[
                p.as_os_str(),
                "--root".as_ref(),
                site.as_os_str(),
                "--anonymous".as_ref(),
            ],
            n,
            Ftp::login,
        )?),
        Err(r) => rows.extend(r),
    }
    Ok(rows)
}
