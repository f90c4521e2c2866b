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

mod config;
mod units;

/// stdout was closed (`holdfast status | head -1`): not an error worth a
/// word, and never a panic.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// `println!` that returns an error from the enclosing function instead of
/// panicking when stdout is gone.
macro_rules! out {
    () => { out!("") };
    ($($arg:tt)+) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)+).map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                anyhow::Error::new(StdoutClosed)
            } else {
                anyhow::Error::new(e)
            }
        })?
    }};
}

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
    /// Log lines as text, or as one JSON object a line (for a log
    /// collector). `HOLDFAST_LOG` sets the level (e.g. `debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    Run(RunArgs),
    /// Move the service to a new version without dropping a connection.
    #[command(
        long_about = "Move the service to a new version without dropping a connection.\n\n            The new version starts next to the old one. Once it is ready it takes every new \
            connection; the old version hands each of its connections over at the next commit \
            point (an idle one at once), with its state blob, and exits when it holds none. A \
            connection still busy at the drain timeout is recovered on a standby of the old \
            version, as after a crash, so its answer is finished by the version that began it. If the new version exits, is not ready in time, cannot read the state blobs in \
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
        /// How long the new version may take to become ready (a bare
        /// number is milliseconds; units: 500ms, 2s, 1m).
        #[arg(long, default_value_t = status::UpgradeRequest::READY_TIMEOUT_MS, value_name = "MS", value_parser = units::millis)]
        ready_timeout: u64,
        /// How long the old version may take to hand its connections over;
        /// then the rest are recovered on a standby of the old version as
        /// after a crash.
        #[arg(long, default_value_t = status::UpgradeRequest::DRAIN_TIMEOUT_MS, value_name = "MS", value_parser = units::millis)]
        drain_timeout: u64,
        /// How long the new version must run without dying before the old
        /// version's standbys retire; dying before that rolls back.
        #[arg(long, default_value_t = status::UpgradeRequest::SETTLE_MS, value_name = "MS", value_parser = units::millis)]
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
    /// Print a shell completion script (e.g. `holdfast completions bash >
    /// /etc/bash_completion.d/holdfast`, or into `~/.local/share/bash-completion/completions/holdfast`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; e.g. `holdfast man >
    /// /usr/local/share/man/man1/holdfast.1`), or write one per command.
    Man {
        /// Write holdfast.1 and a page per command (holdfast-run.1, ...)
        /// into DIR instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
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
    /// Prove zero loss on a sample site, then serve it under the keeper and
    /// show what to try.
    #[command(
        long_about = "Prove zero loss on a sample site, then serve it under the keeper and show \
            what to try.\n\n\
            First a verifying client fetches the site for a few seconds and checks every byte, \
            while the worker (hf-httpd) is SIGKILLed several times and upgraded once; then the same \
            against the server alone, killed and started again at the same moments. Both tallies \
            are printed. Then the site is served at --listen until Ctrl-C, with a download slow \
            enough to kill the worker by hand during it, and the file's checksum.\n\n\
            The demo runs holdfast-demo, installed next to holdfast."
    )]
    Demo {
        /// Where the demo serves once the proof is done.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR", value_parser = units::listen)]
        listen: Vec<Vec<SocketAddr>>,
        /// Control socket (default: the usual one).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Run only the proof (on ports of its own) and exit: 0 if the
        /// client saw no failure under holdfast, 1 otherwise.
        #[arg(long, conflicts_with = "no_proof")]
        check: bool,
        /// Skip the proof: serve at once.
        #[arg(long)]
        no_proof: bool,
    },
}

/// The options of `holdfast run` (also what `--config` may set).
#[derive(clap::Args)]
pub struct RunArgs {
    /// Address to listen on: IPv4:PORT, [IPv6]:PORT, HOST:PORT (every
    /// address it resolves to) or :PORT (every IPv4 address); repeat for more.
    #[arg(long = "listen", value_name = "ADDR", value_parser = units::listen)]
    pub listen: Vec<Vec<SocketAddr>>,
    /// Hot standby workers kept started and initialised.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub standby: usize,
    /// Control socket for `holdfast status`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Connections held at once (default: as many as the open-files limit
    /// allows, at most 65536); more wait in the kernel's listen backlog.
    /// Lowered to fit the open-files limit (see the README).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_conns: Option<u32>,
    /// Kill and replace a worker whose heartbeat stops for this long
    /// (the tokio flavour beats by itself; 0 = off). Durations take a
    /// unit (500ms, 2s, 1m); a bare number is milliseconds.
    #[arg(long, default_value = "0", value_name = "MS", value_parser = units::millis)]
    pub hang_timeout: u64,
    /// While no worker can serve (crash loop), a connection waits at
    /// most this long for one...
    #[arg(long, default_value = "30000", value_name = "MS", value_parser = units::millis)]
    pub hold_timeout: u64,
    /// ...and at most this many connections wait; the rest are turned
    /// away, oldest first.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub hold_max: usize,
    /// ...and the input they have queued (in the kernel and in spools)
    /// stays under this size; the oldest are turned away first. Sizes
    /// take a unit (512KiB, 64MiB); a bare number is KiB.
    #[arg(long, default_value = "65536", value_name = "KIB", value_parser = units::kib)]
    pub hold_kib: u64,
    /// Replace a worker one of whose requests has run this long from its
    /// first byte without a commit (tokio flavour; implies
    /// --hang-timeout 500ms unless given; 0 = off).
    #[arg(long, default_value = "0", value_name = "MS", value_parser = units::millis)]
    pub request_deadline: u64,
    /// A request in flight during this many crashes of its worker in a
    /// row is poison: the next worker answers it with an error instead
    /// of running it (0: never).
    #[arg(long, default_value_t = 2, value_name = "K")]
    pub poison_after: u16,
    /// File with the bytes a turned-away connection gets before a clean
    /// close (e.g. an HTTP 503 response); without it, just the close.
    #[arg(long, value_name = "FILE")]
    pub unavailable: Option<PathBuf>,
    /// Most versions live at once during back-to-back upgrades (the
    /// serving one and those still handing connections over).
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u16).range(2..=64))]
    pub max_generations: u16,
    /// Replace the active worker with a fresh one (a zero-loss upgrade
    /// to the same command) once its resident memory passes this size
    /// (a bare number is MiB; 0 = off).
    #[arg(long, default_value = "0", value_name = "MIB", value_parser = units::mib)]
    pub max_rss: u64,
    /// Replace the active worker with a fresh one once it has served
    /// this long (a bare number is seconds; 0 = off).
    #[arg(long, default_value = "0", value_name = "SECONDS", value_parser = units::seconds)]
    pub max_uptime: u64,
    /// Replace the active worker with a fresh one once it has committed
    /// this many requests (0 = off).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_requests: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (restarts by
    /// reason, connections held and recovered, recovery times, upgrades,
    /// poison requests, turned-away connections).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// The first worker must report ready within this long, or `run`
    /// ends with an error that says why (0 = wait for ever).
    #[arg(long, default_value = "60s", value_name = "MS", value_parser = units::millis)]
    pub ready_timeout: u64,
    /// After SIGTERM, requests in flight have this long to finish (idle
    /// connections close at once); then every connection is closed. The
    /// default fits systemd's 90 s stop timeout.
    #[arg(long, default_value = "80s", value_name = "MS", value_parser = units::millis)]
    pub stop_timeout: u64,
    /// Options from a TOML file: keys as the long options with `_` for
    /// `-` (`hang_timeout = "500ms"`, `listen = ["127.0.0.1:8080"]`),
    /// and `command = ["./svc", "--flag"]`; the command line wins.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The worker command and its arguments (after `--`).
    #[arg(last = true, required_unless_present = "config", value_name = "CMD")]
    pub command: Vec<OsString>,
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    let configured = match (&mut cli.cmd, matches.subcommand_matches("run")) {
        (Cmd::Run(args), Some(m)) => match args.config.clone() {
            Some(path) => config::apply(&path, m, args),
            None => Ok(()),
        },
        _ => Ok(()),
    };
    if let Err(e) = configured {
        eprintln!("holdfast: {e:#}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Run(RunArgs {
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
            metrics,
            ready_timeout,
            stop_timeout,
            command,
            config: _,
        }) => {
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
                listen: listen.into_iter().flatten().collect(),
                standby,
                control,
                max_conns: max_conns.unwrap_or(hf_keeper::DEFAULT_MAX_CONNS),
                max_conns_explicit: max_conns.is_some(),
                ready_timeout: (ready_timeout > 0).then(|| Duration::from_millis(ready_timeout)),
                metrics,
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
                out!("{}", serde_json::to_string_pretty(&snap)?);
            } else {
                print_status(&snap)?;
            }
            Ok(())
        }
        Cmd::Demo {
            listen,
            control,
            check,
            no_proof,
        } => demo(
            listen.into_iter().flatten().collect(),
            control,
            check,
            no_proof,
        ),
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "holdfast",
                &mut script,
            );
            write_stdout(&script)
        }
        Cmd::Man { dir: None } => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut page)?;
            write_stdout(&page)
        }
        Cmd::Man { dir: Some(dir) } => {
            clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))
        }
        Cmd::StateFormat => {
            out!("{}", hf_keeper::SAVED_STATE_FORMAT);
            Ok(())
        }
    }
}

/// Writes `bytes` to stdout; a closed pipe is [`StdoutClosed`].
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                anyhow::Error::new(StdoutClosed)
            } else {
                anyhow::Error::new(e)
            }
        })
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

/// The text form of `holdfast status`: the state in the first line, then
/// one line per subject, labels in a column, and the workers as a table.
fn print_status(s: &Snapshot) -> anyhow::Result<()> {
    use status::Phase;
    let state = match s.phase {
        Phase::Starting => "starting: no worker ready yet, connections wait",
        Phase::Serving => "serving",
        Phase::Recovering => "recovering: the active worker died, connections wait for the next",
        Phase::ShuttingDown => "stopping: finishing the requests in flight",
    };
    let keeper = if s.keeper_execs > 0 {
        format!(
            "keeper pid {}, re-executed {} times",
            s.keeper_pid, s.keeper_execs
        )
    } else {
        format!("keeper pid {}", s.keeper_pid)
    };
    out!(
        "{state} on {} (generation {}, {keeper})",
        s.listeners.join(", "),
        s.generation
    );
    let waiting = if s.waiting > 0 {
        format!(" ({} waiting for a worker)", s.waiting)
    } else {
        String::new()
    };
    out!(
        "connections  {} held{waiting}, {} accepted since start",
        s.connections,
        s.accepted
    );
    let last = match s.last_recovery_us {
        Some(us) => format!(", last recovery {us} µs (death noticed to connections handed over)"),
        None => String::new(),
    };
    out!(
        "restarts     {}, {} connections recovered{last}",
        s.restarts,
        s.recovered_connections
    );
    let live = if s.generations.len() > 1 {
        let gens: Vec<String> = s.generations.iter().map(u32::to_string).collect();
        format!(", generations live: {}", gens.join(", "))
    } else {
        String::new()
    };
    out!(
        "upgrades     {} done, {} failed{live}",
        s.upgrades,
        s.failed_upgrades
    );
    if let Some(u) = &s.upgrade {
        out!(
            "upgrading    to generation {}: {}, {}/{} connections moved, {} ms so far",
            u.generation,
            format!("{:?}", u.phase).to_lowercase(),
            u.moved,
            u.total,
            u.elapsed_ms
        );
    }
    if s.start_failures > 0 {
        let next = s
            .next_start_in_ms
            .map(|ms| format!(", next start in {ms} ms"))
            .unwrap_or_default();
        out!("start-ups    {} failed in a row{next}", s.start_failures);
    }
    if s.rejuvenations > 0 {
        out!(
            "rejuvenated  {} workers (--max-rss / --max-uptime / --max-requests)",
            s.rejuvenations
        );
    }
    if s.poisoned > 0 {
        out!(
            "poisoned     {} requests refused (in flight during crashes in a row)",
            s.poisoned
        );
    }
    if s.turned_away > 0 {
        out!(
            "turned away  {} connections (no worker could serve them in time)",
            s.turned_away
        );
    }
    out!(
        "workers      {:<5} {:<8} {:<4} {:<10} CONNECTIONS",
        "ID",
        "PID",
        "GEN",
        "ROLE"
    );
    for w in &s.workers {
        out!(
            "             {:<5} {:<8} {:<4} {:<10} {}",
            format!("#{}", w.id),
            w.pid,
            w.generation,
            format!("{:?}", w.role).to_lowercase(),
            w.connections
        );
    }
    if s.workers.is_empty() {
        out!("             (none)");
    }
    for (i, e) in s.last_exits.iter().enumerate() {
        out!("{:<12} {e}", if i == 0 { "last exits" } else { "" });
    }
    Ok(())
}

/// `holdfast demo`: runs `holdfast-demo` from beside this binary (it
/// holds the demo's web server and client, which the keeper has no use for).
fn demo(
    listen: Vec<SocketAddr>,
    control: Option<PathBuf>,
    check: bool,
    no_proof: bool,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("cannot locate the holdfast binary")?;
    let demo = exe.with_file_name("holdfast-demo");
    if !demo.exists() {
        bail!(
            "holdfast-demo not found next to {} (it is built and installed with holdfast: \
             cargo build --release -p holdfast-cli, or cargo install --path crates/holdfast-cli)",
            exe.display()
        );
    }
    let mut cmd = std::process::Command::new(&demo);
    for a in listen {
        cmd.arg("--listen").arg(a.to_string());
    }
    if let Some(c) = control {
        cmd.arg("--control").arg(c);
    }
    if check {
        cmd.arg("--check");
    }
    if no_proof {
        cmd.arg("--no-proof");
    }
    let e = cmd.exec();
    Err(anyhow::Error::new(e).context(format!("running {}", demo.display())))
}
