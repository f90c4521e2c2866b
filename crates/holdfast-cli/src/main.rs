//! `holdfast`: the keeper and its command line. Thin: the keeper lives in
//! `hf-keeper`; this file parses arguments, sets up logging, and maps
//! errors to exit codes.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hf_keeper::status::{self, Snapshot};

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Zero-loss crash recovery for network services",
    long_about = "Zero-loss crash recovery for network services.\n\n\
        The keeper owns the listening sockets and every client connection; the service runs as a \
        worker that can be killed at any instant (or crash) without its clients noticing more \
        than a short stall: a hot standby takes over every connection where the dead worker left it."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD as a worker under the keeper.
    #[command(
        after_help = "Examples:\n  holdfast run --listen 127.0.0.1:8080 -- hf-httpd --root /srv/www\n  \
                      holdfast run --listen [::1]:8080 --standby 2 -- ./my-service --flag\n\n\
                      Without --listen, listeners are taken from systemd socket activation (LISTEN_FDS).\n\n\
                      Signals: SIGTERM stops taking connections, lets the requests in flight finish \
                      (at most --stop-timeout) and closes idle connections with a FIN; SIGTERM again \
                      or SIGINT closes everything at once, still cleanly; SIGHUP upgrades to the same \
                      command."
    )]
    Run {
        /// Address to listen on (IPv4 or [IPv6]:port); repeat for more.
        #[arg(long = "listen", value_name = "ADDR")]
        listen: Vec<SocketAddr>,
        /// Hot standby workers kept started and initialised.
        #[arg(long, default_value_t = 1, value_name = "N")]
        standby: usize,
        /// Control socket for `holdfast status`.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Connections held at once; more wait in the kernel's listen backlog.
        /// Lowered to fit the open-files limit (see the README).
        #[arg(long, default_value_t = 65536, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        max_conns: u32,
        /// Kill and replace a worker whose heartbeat stops for this many
        /// milliseconds (the tokio flavour beats by itself; 0 = off).
        #[arg(long, default_value_t = 0, value_name = "MS")]
        hang_timeout: u64,
        /// While no worker can serve (crash loop), a connection waits at
        /// most this many milliseconds for one...
        #[arg(long, default_value_t = 30_000, value_name = "MS")]
        hold_timeout: u64,
        /// ...and at most this many connections wait; the rest are turned
        /// away, oldest first.
        #[arg(long, default_value_t = 10_000, value_name = "N")]
        hold_max: usize,
        /// ...and the input they have queued (in the kernel and in spools)
        /// stays under this many KiB; the oldest are turned away first.
        #[arg(long, default_value_t = 65_536, value_name = "KIB")]
        hold_kib: u64,
        /// Replace a worker one of whose requests has run this many
        /// milliseconds from its first byte without a commit (tokio flavour;
        /// implies --hang-timeout 500 unless given; 0 = off).
        #[arg(long, default_value_t = 0, value_name = "MS")]
        request_deadline: u64,
        /// A request in flight during this many crashes of its worker in a
        /// row is poison: the next worker answers it with an error instead
        /// of running it (0: never).
        #[arg(long, default_value_t = 2, value_name = "K")]
        poison_after: u16,
        /// File with the bytes a turned-away connection gets before a clean
        /// close (e.g. an HTTP 503 response); without it, just the close.
        #[arg(long, value_name = "FILE")]
        unavailable: Option<PathBuf>,
        /// Most versions live at once during back-to-back upgrades (the
        /// serving one and those still handing connections over).
        #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u16).range(2..=64))]
        max_generations: u16,
        /// Replace the active worker with a fresh one (a zero-loss upgrade
        /// to the same command) once its resident memory passes this many
        /// MiB (0 = off).
        #[arg(long, default_value_t = 0, value_name = "MIB")]
        max_rss: u64,
        /// Replace the active worker with a fresh one once it has served
        /// this many seconds (0 = off).
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        max_uptime: u64,
        /// Replace the active worker with a fresh one once it has committed
        /// this many requests (0 = off).
        #[arg(long, default_value_t = 0, value_name = "N")]
        max_requests: u64,
        /// After SIGTERM, requests in flight have this many milliseconds to
        /// finish (idle connections close at once); then every connection
        /// is closed. The default fits systemd's 90 s stop timeout.
        #[arg(long, default_value_t = 80_000, value_name = "MS")]
        stop_timeout: u64,
        /// The worker command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Move the service to a new version without dropping a connection.
    #[command(
        long_about = "Move the service to a new version without dropping a connection.\n\n            The new version starts next to the old one. Once it is ready it takes every new \
            connection; the old version hands each of its connections over at the next commit \
            point (an idle one at once), with its state blob, and exits when it holds none. A \
            connection still busy at the drain timeout is recovered on the new version as after a \
            crash. If the new version exits, is not ready in time, cannot read the state blobs in \
            use, or dies before the settle time, everything stays on (or returns to) the old \
            version and this command fails with the reason.\n\n\
            Without a command, the same command runs again (a rebuilt binary at the same path); \
            SIGHUP to the keeper does the same with the default timeouts.",
        after_help = "Examples:\n  holdfast upgrade                                   # same command, rebuilt binary\n  \
                      holdfast upgrade -- ./my-service-v2 --flag         # another command\n  \
                      holdfast upgrade --drain-timeout 60000 -- ./svc    # long requests finish first"
    )]
    Upgrade {
        /// Control socket of the keeper.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Milliseconds the new version may take to become ready.
        #[arg(long, default_value_t = status::UpgradeRequest::READY_TIMEOUT_MS, value_name = "MS")]
        ready_timeout: u64,
        /// Milliseconds the old version may take to hand its connections
        /// over; then the rest are recovered on the new version as after a crash.
        #[arg(long, default_value_t = status::UpgradeRequest::DRAIN_TIMEOUT_MS, value_name = "MS")]
        drain_timeout: u64,
        /// Milliseconds the new version must run without dying before the
        /// old version's standbys retire; dying before that rolls back.
        #[arg(long, default_value_t = status::UpgradeRequest::SETTLE_MS, value_name = "MS")]
        settle: u64,
        /// Print progress as JSON lines.
        #[arg(long)]
        json: bool,
        /// Upgrade the keeper itself instead: re-execute its binary (a
        /// rebuilt one at the same path), keeping every connection, worker
        /// and listener; the service does not notice.
        #[arg(long, conflicts_with = "command")]
        keeper: bool,
        /// The new command and its arguments (after `--`); default: the current one.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print the keeper's saved-state format (checked before `upgrade --keeper`).
    #[command(hide = true)]
    StateFormat,
    /// Show the keeper's phase, workers and connections.
    Status {
        /// Control socket of the keeper.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run hf-httpd over a built-in sample site under the keeper, and show what to try.
    Demo {
        /// Where the demo listens.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: SocketAddr,
        /// Control socket (default: the usual one).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Run {
            listen,
            standby,
            control,
            max_conns,
            hang_timeout,
            hold_timeout,
            hold_max,
            hold_kib,
            request_deadline,
            poison_after,
            unavailable,
            max_generations,
            max_rss,
            max_uptime,
            max_requests,
            stop_timeout,
            command,
        } => {
            let control = control.unwrap_or_else(hf_keeper::default_control_path);
            let hang_timeout = (hang_timeout > 0).then(|| Duration::from_millis(hang_timeout));
            let unavailable = match unavailable {
                Some(path) => Some(
                    std::fs::read(&path)
                        .with_context(|| format!("--unavailable {}", path.display()))?,
                ),
                None => None,
            };
            hf_keeper::run(hf_keeper::Config {
                listen,
                standby,
                control,
                max_conns,
                hang_timeout,
                hold_timeout: Duration::from_millis(hold_timeout),
                hold_max,
                hold_bytes: hold_kib << 10,
                request_deadline: (request_deadline > 0)
                    .then(|| Duration::from_millis(request_deadline)),
                poison_after,
                unavailable,
                max_generations: max_generations.into(),
                max_rss: (max_rss > 0).then_some(max_rss << 20),
                max_uptime: (max_uptime > 0).then(|| Duration::from_secs(max_uptime)),
                max_requests: (max_requests > 0).then_some(max_requests),
                stop_timeout: Duration::from_millis(stop_timeout),
                command,
            })?;
            Ok(())
        }
        Cmd::Upgrade {
            control,
            ready_timeout,
            drain_timeout,
            settle,
            json,
            keeper,
            command,
        } => upgrade(
            &control.unwrap_or_else(hf_keeper::default_control_path),
            (!keeper).then_some(status::UpgradeRequest {
                command: (!command.is_empty()).then_some(command),
                ready_timeout_ms: ready_timeout,
                drain_timeout_ms: drain_timeout,
                settle_ms: settle,
            }),
            json,
        ),
        Cmd::Status { control, json } => {
            let path = control.unwrap_or_else(hf_keeper::default_control_path);
            let snap = status::query(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    anyhow::anyhow!(
                        "no keeper answers at {} (is `holdfast run` running?): {e}",
                        path.display()
                    )
                }
                _ => anyhow::anyhow!("status through {}: {e}", path.display()),
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snap)?);
            } else {
                print_status(&snap);
            }
            Ok(())
        }
        Cmd::Demo { listen, control } => demo(listen, control),
        Cmd::StateFormat => {
            println!("{}", hf_keeper::SAVED_STATE_FORMAT);
            Ok(())
        }
    }
}

/// `holdfast upgrade`: the service (`req`) or the keeper itself (`None`).
fn upgrade(
    path: &std::path::Path,
    req: Option<status::UpgradeRequest>,
    json: bool,
) -> anyhow::Result<()> {
    use status::Progress;
    use std::io::Write;
    let mut out = std::io::stdout();
    let show = |p: &Progress| {
        if json {
            let _ = writeln!(out, "{}", serde_json::to_string(p).unwrap_or_default());
            return;
        }
        let line = match p {
            Progress::Started { generation, pid } => {
                format!("starting generation {generation} (pid {pid})")
            }
            Progress::Switched {
                generation,
                ready_ms,
                total,
                rollback,
            } => format!(
                "generation {generation} ready after {ready_ms} ms, serving new connections; \
                 moving {total} connections{}",
                if *rollback {
                    ""
                } else {
                    " (no rollback: the old version cannot read the new state blobs)"
                }
            ),
            Progress::Moving { moved, total } => format!("moved {moved}/{total}"),
            Progress::Done {
                generation,
                from_generation,
                moved,
                recovered,
                move_ms,
                elapsed_ms,
            } => format!(
                "upgraded generation {from_generation} → {generation} in {elapsed_ms} ms: \
                 {moved} connections moved at commit points in {move_ms} ms, \
                 {recovered} still busy at the drain timeout recovered"
            ),
            Progress::Failed { reason, .. } if req.is_none() => {
                format!("keeper upgrade failed: {reason}; the keeper goes on as it was")
            }
            Progress::Failed { reason, generation } => {
                format!("upgrade failed: {reason} (serving: generation {generation})")
            }
            Progress::KeeperReexecuted {
                keeper_pid,
                connections,
                workers,
                us,
            } => format!(
                "keeper re-executed in {us} µs (pid {keeper_pid}): {connections} connections \
                 and {workers} workers carried over"
            ),
        };
        let _ = writeln!(out, "{line}");
    };
    let r = match &req {
        Some(req) => status::upgrade(path, req, show),
        None => status::upgrade_keeper(path, show),
    };
    let last = r.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no keeper answers at {} (is `holdfast run` running?): {e}",
            path.display()
        ),
        _ => anyhow::anyhow!("upgrade through {}: {e}", path.display()),
    })?;
    match last {
        Progress::Failed { .. } => std::process::exit(1),
        _ => Ok(()),
    }
}

fn print_status(s: &Snapshot) {
    println!("phase        {:?}", s.phase);
    let gens: Vec<String> = s.generations.iter().map(u32::to_string).collect();
    println!(
        "generation   {} (live: {}; {} upgrades, {} failed)",
        s.generation,
        gens.join(", "),
        s.upgrades,
        s.failed_upgrades
    );
    if let Some(u) = &s.upgrade {
        println!(
            "upgrade      to generation {}: {:?}, {}/{} connections moved, {} ms",
            u.generation, u.phase, u.moved, u.total, u.elapsed_ms
        );
    }
    if s.keeper_execs > 0 {
        println!(
            "keeper pid   {} (re-executed {} times)",
            s.keeper_pid, s.keeper_execs
        );
    } else {
        println!("keeper pid   {}", s.keeper_pid);
    }
    println!("listening    {}", s.listeners.join(", "));
    println!(
        "connections  {} held, {} waiting for a worker, {} accepted in all",
        s.connections, s.waiting, s.accepted
    );
    println!(
        "restarts     {} ({} connections recovered)",
        s.restarts, s.recovered_connections
    );
    match s.last_recovery_us {
        Some(us) => println!("last recovery {us} µs (death noticed → connections handed over)"),
        None => println!("last recovery -"),
    }
    println!("workers:");
    for w in &s.workers {
        println!(
            "  #{:<4} pid {:<8} gen {:<3} {:<9} {} connections",
            w.id,
            w.pid,
            w.generation,
            format!("{:?}", w.role).to_lowercase(),
            w.connections
        );
    }
    if s.start_failures > 0 {
        let next = s
            .next_start_in_ms
            .map(|ms| format!(", next start in {ms} ms"))
            .unwrap_or_default();
        println!("start-ups    {} failed in a row{next}", s.start_failures);
    }
    if s.rejuvenations > 0 {
        println!(
            "rejuvenated  {} workers (--max-rss / --max-uptime / --max-requests)",
            s.rejuvenations
        );
    }
    if s.poisoned > 0 {
        println!(
            "poisoned     {} requests refused (in flight during crashes in a row)",
            s.poisoned
        );
    }
    if s.turned_away > 0 {
        println!(
            "turned away  {} connections (no worker could serve them in time)",
            s.turned_away
        );
    }
    if !s.last_exits.is_empty() {
        println!("last exits:");
        for e in &s.last_exits {
            println!("  {e}");
        }
    }
}

fn demo(listen: SocketAddr, control: Option<PathBuf>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot locate the holdfast binary")?;
    let httpd = exe.with_file_name("hf-httpd");
    if !httpd.exists() {
        bail!(
            "hf-httpd not found next to {} (build the workspace: cargo build --release)",
            exe.display()
        );
    }
    let site = std::env::temp_dir().join(format!("holdfast-demo-{}", std::process::id()));
    let control = control.unwrap_or_else(hf_keeper::default_control_path);
    println!(
        "holdfast demo: hf-httpd serving a sample site from {} on http://{listen}/",
        site.display()
    );
    println!();
    println!("Try, in another terminal:");
    println!("  curl -i http://{listen}/hello.txt");
    println!("  curl -s http://{listen}/big.bin --limit-rate 2M | sha256sum   # an 8 MiB download, slowly");
    let status = format!("{} status --control {}", exe.display(), control.display());
    println!("  {status}    # the worker pids");
    println!(
        "  kill -9 <pid of the active worker>    # while the download runs: it completes, intact"
    );
    println!("  {status}    # restarts, last recovery time");
    println!();
    println!("Stop with Ctrl-C.");
    let command = vec![
        httpd.into_os_string(),
        "--demo-site".into(),
        site.clone().into_os_string(),
    ];
    let r = hf_keeper::run(hf_keeper::Config {
        listen: vec![listen],
        standby: 1,
        control,
        max_conns: 65536,
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
    let _ = std::fs::remove_dir_all(&site);
    r?;
    Ok(())
}
