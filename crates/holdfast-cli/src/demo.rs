//! `holdfast-demo`: what `holdfast demo` runs (it execs this binary, which
//! is built and installed next to it).
//!
//! First the proof: a verifying client ([`hf_load`]) fetches the sample
//! site over keep-alive connections and checks every byte, while the worker
//! is SIGKILLed several times and upgraded once under the keeper; then the
//! same client against the same server without the keeper, killed and
//! started again at the same moments (a plain restart). Both tallies are
//! printed side by side. Then the site is served under the keeper at
//! `--listen`, with what to try by hand.
//!
//! `holdfast-demo serve ARGS` is the worker: hf-httpd (`ARGS` are its own),
//! linked here so that the demo needs no other binary.
//!
//! `holdfast-demo completions SHELL` and `holdfast-demo man [--dir DIR]`
//! are `holdfast completions` and `holdfast man`: the generators live here
//! because linked into `holdfast` they add some 200 KiB to every idle
//! keeper's resident memory.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hf_keeper::status::{self, Phase, Role};

/// `holdfast`'s command line, for its completions and manual pages.
#[allow(dead_code)]
mod cli;
#[allow(dead_code)]
mod units;

/// How long each half of the proof loads the site.
const PROOF_TIME: Duration = Duration::from_secs(3);
/// A SIGKILL this often during the proof (4 in 3 s)...
const KILL_EVERY: Duration = Duration::from_millis(600);
/// ...and one upgrade (at 1.5 s).
const UPGRADE_EVERY: Duration = Duration::from_millis(1500);
/// Client connections during the proof.
const PROOF_CONNS: usize = 8;
/// The hand-made download's pace: 8 MiB at this rate takes about 40 s.
const SLOW_RATE: &str = "200K";

#[derive(Parser)]
#[command(
    name = "holdfast demo",
    about = "Prove zero loss on a sample site, then serve it under the keeper"
)]
struct Args {
    /// Where the demo serves once the proof is done.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Control socket of the demo's keeper (default: the usual one).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Run only the proof (on ports of its own) and exit: 0 if the client
    /// saw no failure under holdfast, 1 otherwise.
    #[arg(long, conflicts_with = "no_proof")]
    check: bool,
    /// Skip the proof: serve at once.
    #[arg(long)]
    no_proof: bool,
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("serve") => {
            let args = std::iter::once(OsString::from("hf-httpd")).chain(argv.into_iter().skip(2));
            return hf_httpd::main_from(args);
        }
        Some("completions" | "man") => {
            return match generate(&argv[1..]) {
                Ok(()) => ExitCode::SUCCESS,
                // A closed pipe (`holdfast man | head`) is not an error.
                Err(e)
                    if e.downcast_ref::<std::io::Error>()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
                {
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("holdfast: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let args = Args::parse_from(argv);
    // The keeper's log lines, as under `holdfast run` (the proof's keeper
    // logs to a file of its own).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match demo(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("holdfast demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `completions SHELL`, `man`, `man --dir DIR` for the `holdfast` command
/// (its arguments were checked by `holdfast`).
fn generate(args: &[OsString]) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    use std::io::Write as _;
    let cmd = cli::Cli::command();
    let mut text = Vec::new();
    match (args[0].to_str(), args.get(1), args.get(2)) {
        (Some("completions"), Some(shell), None) => {
            let shell: clap_complete::Shell = shell
                .to_str()
                .and_then(|s| <clap_complete::Shell as clap::ValueEnum>::from_str(s, false).ok())
                .with_context(|| format!("no completions for {shell:?}"))?;
            clap_complete::generate(shell, &mut cmd.clone(), "holdfast", &mut text);
        }
        (Some("man"), None, None) => clap_mangen::Man::new(cmd).render(&mut text)?,
        (Some("man"), Some(flag), Some(dir)) if flag == "--dir" => {
            return clap_mangen::generate_to(cmd, dir).with_context(|| {
                format!("writing manual pages into {}", Path::new(dir).display())
            });
        }
        _ => bail!("usage: holdfast completions SHELL | holdfast man [--dir DIR]"),
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&text)?;
    out.flush()?;
    Ok(())
}

/// The demo's scratch directory: the sample site, the proof's control
/// socket and logs. Removed on the way out.
struct Work(PathBuf);

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Prints to stdout; a closed stdout is not worth a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Ok(passed): whether the proof found no failure under holdfast (always
/// true when there was no proof).
fn demo(args: Args) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("cannot locate the holdfast-demo binary")?;
    let holdfast = exe.with_file_name("holdfast");
    if !holdfast.exists() {
        bail!("holdfast not found next to {}", exe.display());
    }
    if !args.check {
        // The address first: a taken port is said at once, not after the proof.
        for a in &args.listen {
            TcpListener::bind(a).with_context(|| {
                format!("cannot listen on {a} (another server there? choose with --listen ADDR)")
            })?;
        }
    }
    let work = Work(std::env::temp_dir().join(format!("holdfast-demo-{}", std::process::id())));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&work.0)
        .with_context(|| format!("creating {}", work.0.display()))?;
    let site = work.0.join("site");
    hf_httpd::site::write_sample_site(&site)
        .with_context(|| format!("writing the sample site to {}", site.display()))?;

    let mut passed = true;
    if !args.no_proof {
        passed = proof(&exe, &holdfast, &work.0, &site)?;
        if args.check {
            return Ok(passed);
        }
    }
    serve(&args, &exe, &holdfast, &site)?;
    Ok(passed)
}

/// Both runs of the proof, and what the client saw in each.
fn proof(exe: &Path, holdfast: &Path, work: &Path, site: &Path) -> anyhow::Result<bool> {
    let files = hf_load::FileSet::from_site(site).map_err(|e| anyhow::anyhow!("{e}"))?;
    say!(
        "holdfast demo: {PROOF_CONNS} clients fetch the sample site for {} s and check every byte,",
        PROOF_TIME.as_secs()
    );
    say!(
        "while the server is SIGKILLed every {} ms and upgraded once; then the same without holdfast.",
        KILL_EVERY.as_millis()
    );
    say!();
    let kept = kept_run(exe, holdfast, work, site, &files)?;
    say!("  under holdfast: {}", tally(&kept, "upgrade"));
    let plain = plain_run(exe, work, site, &files)?;
    say!("  plain restart:  {}", tally(&plain, "restart"));
    say!();
    say!("(plain restart: the same server without the keeper, killed and started again at the");
    say!("same moments, as a supervisor would, one restart standing for the upgrade; its connect");
    say!("errors are requests refused while no server listened.)");
    let passed = kept.failed == 0
        && kept.ok > 0
        && kept.kills >= 3
        && kept.kills_missed == 0
        && kept.upgrades == 1
        && kept.upgrades_failed == 0;
    if passed {
        say!("holdfast: no request failed, every byte verified.");
    } else {
        say!(
            "holdfast: PROOF FAILED (see above; keeper log: {})",
            work.join("proof.log").display()
        );
        for f in kept.failure_records.iter().take(10) {
            say!(
                "  at {} ms on connection {}: {:?} {}",
                f.t_us / 1000,
                f.conn,
                f.kind,
                f.detail
            );
        }
        for e in &kept.events {
            say!("  event at {} ms: {}", e.t_us / 1000, e.kind.label());
        }
    }
    say!();
    Ok(passed)
}

/// "4 SIGKILLs, 1 upgrade -> 5,123 requests, 0 failed, 1.2 GiB verified, slowest answer 12 ms".
fn tally(r: &hf_load::Report, upgrade: &str) -> String {
    let failed = if r.failed == 0 {
        "0 failed".to_owned()
    } else {
        format!("{} failed ({})", group(r.failed), r.failures.describe())
    };
    let mib = r.body_bytes as f64 / (1024.0 * 1024.0);
    let verified = if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    };
    format!(
        "{} SIGKILLs, {} {upgrade} -> {} requests, {failed}, {verified} verified, \
         slowest answer {} ms",
        r.kills,
        r.upgrades,
        group(r.requests),
        r.latency.max_us.div_ceil(1000),
    )
}

/// 12345 → "12,345".
fn group(n: u64) -> String {
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

/// A loopback port nobody listens on now.
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Kills the child (and reaps it) when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The proof under the keeper: `holdfast run` on a port of its own, the
/// client's kill and upgrade schedules aimed at it.
fn kept_run(
    exe: &Path,
    holdfast: &Path,
    work: &Path,
    site: &Path,
    files: &hf_load::FileSet,
) -> anyhow::Result<hf_load::Report> {
    let addr = free_port()?;
    let control = work.join("proof.sock");
    let log = work.join("proof.log");
    let mut keeper = Reaped(
        Command::new(holdfast)
            .arg("run")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--control")
            .arg(&control)
            .args(["--stop-timeout", "2s", "--"])
            .arg(exe)
            .arg("serve")
            .arg("--demo-site")
            .arg(site)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", holdfast.display()))?,
    );
    // Serving, with a standby ready to take over.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = status::query(&control) {
            if s.phase == Phase::Serving && s.workers.iter().any(|w| w.role == Role::Standby) {
                break;
            }
        }
        if let Some(st) = keeper.0.try_wait()? {
            bail!("the proof's keeper ended ({st}); its log:\n{}", tail(&log));
        }
        if Instant::now() > deadline {
            bail!(
                "the proof's keeper did not start in 30 s; its log:\n{}",
                tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cfg = hf_load::Config::new(addr, files.clone());
    cfg.conns = PROOF_CONNS;
    cfg.duration = PROOF_TIME;
    cfg.kill_every = Some(KILL_EVERY);
    cfg.upgrade_every = Some(UPGRADE_EVERY);
    cfg.control = Some(control);
    cfg.holdfast = Some(holdfast.to_owned());
    // The new version may be killed at once (the next SIGKILL is due soon):
    // no settle time that would roll the upgrade back for it.
    cfg.upgrade_args = vec!["--settle".into(), "0".into()];
    let report = hf_load::run(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(pid) = rustix::process::Pid::from_raw(keeper.0.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = keeper.0.wait();
    Ok(report)
}

/// The proof without the keeper: hf-httpd alone, killed with SIGKILL and
/// started again at the moments the kept run was killed, and restarted
/// (SIGTERM, then started) where it was upgraded.
fn plain_run(
    exe: &Path,
    work: &Path,
    site: &Path,
    files: &hf_load::FileSet,
) -> anyhow::Result<hf_load::Report> {
    let addr = free_port()?;
    let log = work.join("plain.log");
    let start = || -> anyhow::Result<Reaped> {
        let child = Command::new(exe)
            .arg("serve")
            .arg("--demo-site")
            .arg(site)
            .arg("--listen")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)?,
            )
            .spawn()
            .context("starting the plain server")?;
        let mut child = Reaped(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if let Some(st) = child.0.try_wait()? {
                bail!("the plain server ended ({st}); its log:\n{}", tail(&log));
            }
            if Instant::now() > deadline {
                bail!(
                    "the plain server did not listen in 20 s; its log:\n{}",
                    tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(child)
    };
    let server = start()?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let start = &start;
        let stop = &stop;
        // The same moments as the kept run's schedules.
        let mut moments: Vec<(Duration, bool)> = (1..)
            .map(|k| KILL_EVERY * k)
            .take_while(|t| *t < PROOF_TIME)
            .map(|t| (t, false))
            .chain(
                (1..)
                    .map(|k| UPGRADE_EVERY * k)
                    .take_while(|t| *t < PROOF_TIME)
                    .map(|t| (t, true)),
            )
            .collect();
        moments.sort();
        let t0 = Instant::now();
        let chaos = scope.spawn(move || -> anyhow::Result<(u64, u64)> {
            let mut server = server;
            let (mut kills, mut restarts) = (0, 0);
            for (at, restart) in moments {
                while t0.elapsed() < at {
                    if stop.load(Ordering::Relaxed) {
                        return Ok((kills, restarts));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                if restart {
                    if let Some(pid) = rustix::process::Pid::from_raw(server.0.id() as i32) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                    }
                    let _ = server.0.wait();
                    restarts += 1;
                } else {
                    let _ = server.0.kill();
                    let _ = server.0.wait();
                    kills += 1;
                }
                server = start()?;
            }
            drop(server);
            Ok((kills, restarts))
        });
        let mut cfg = hf_load::Config::new(addr, files.clone());
        cfg.conns = PROOF_CONNS;
        cfg.duration = PROOF_TIME;
        let report = hf_load::run(&cfg).map_err(|e| anyhow::anyhow!("{e}"));
        stop.store(true, Ordering::Relaxed);
        let (kills, restarts) = chaos
            .join()
            .map_err(|_| anyhow::anyhow!("the plain run's kill thread panicked"))??;
        let mut report = report?;
        report.kills = kills;
        report.upgrades = restarts;
        Ok(report)
    })
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The site under the keeper at `--listen`, until a signal stops it; what
/// to try is printed once it serves.
fn serve(args: &Args, exe: &Path, holdfast: &Path, site: &Path) -> anyhow::Result<()> {
    use sha2::Digest as _;
    let control = args
        .control
        .clone()
        .unwrap_or_else(hf_keeper::default_control_path);
    let big = std::fs::read(site.join("big.bin")).context("reading big.bin")?;
    let sha = format!("{:x}", sha2::Sha256::digest(&big));
    let mib = big.len() >> 20;
    drop(big);
    let first = args.listen[0];
    let done = Arc::new(AtomicBool::new(false));
    let banner = {
        let (done, control, site) = (done.clone(), control.clone(), site.to_owned());
        let holdfast = holdfast.to_owned();
        std::thread::spawn(move || {
            // Printed once the keeper serves: its listeners are bound, so
            // what it says works.
            while !done.load(Ordering::Relaxed) {
                match status::query(&control) {
                    Ok(s) if s.phase == Phase::Serving => break,
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            if done.load(Ordering::Relaxed) {
                return;
            }
            let status = format!(
                "{} status --control {}",
                holdfast.display(),
                control.display()
            );
            say!(
                "holdfast demo: hf-httpd serving a sample site from {} on http://{first}/",
                site.display()
            );
            say!();
            say!("Try, in another terminal:");
            say!("  curl -i http://{first}/hello.txt");
            say!(
                "  curl -o big.bin --limit-rate {SLOW_RATE} http://{first}/big.bin    # {mib} MiB, slowly (about 40 s)"
            );
            say!("  {status}    # the active worker's pid");
            say!("  kill -9 <pid of the active worker>    # while the download runs");
            say!("  sha256sum big.bin    # once it is done: {sha}, the file as served");
            say!("  {status}    # restarts, connections recovered, last recovery time");
            say!(
                "  {} upgrade --control {}    # a new version takes over every connection",
                holdfast.display(),
                control.display()
            );
            say!();
            say!("Stop with Ctrl-C.");
        })
    };
    let command = vec![
        exe.as_os_str().to_owned(),
        "serve".into(),
        "--demo-site".into(),
        site.as_os_str().to_owned(),
    ];
    let r = hf_keeper::run(hf_keeper::Config {
        listen: args.listen.clone(),
        standby: 1,
        control,
        max_conns: hf_keeper::DEFAULT_MAX_CONNS,
        max_conns_explicit: false,
        ready_timeout: Some(Duration::from_secs(60)),
        metrics: None,
        hang_timeout: Some(Duration::from_secs(2)),
        hold_timeout: Duration::from_secs(30),
        hold_max: 10_000,
        hold_bytes: 64 << 20,
        request_deadline: None,
        poison_after: 2,
        max_generations: 3,
        max_rss: None,
        max_uptime: None,
        max_requests: None,
        stop_timeout: Duration::from_secs(10),
        unavailable: Some(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
        ),
        command,
    });
    done.store(true, Ordering::Relaxed);
    let _ = banner.join();
    r?;
    Ok(())
}
