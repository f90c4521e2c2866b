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
use hf_keeper::status::{self, Snapshot};

mod cli;
mod config;
mod units;

use cli::{Cli, Cmd, LogFormat, RunArgs};

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
        Cmd::Completions { shell } => helper(["completions".into(), shell.into()]),
        Cmd::Man { dir } => {
            let mut args: Vec<OsString> = vec!["man".into()];
            if let Some(dir) = dir {
                args.push("--dir".into());
                args.push(dir.into());
            }
            helper(args)
        }
        Cmd::StateFormat => {
            out!("{}", hf_keeper::UNFRAMED_STATE_FORMAT);
            Ok(())
        }
        Cmd::StateCheck => {
            use std::io::Read;
            out!("{}", hf_keeper::SAVED_STATE_FORMAT);
            let mut state = Vec::new();
            std::io::stdin()
                .take(hf_keeper::MAX_SAVED_STATE + 64)
                .read_to_end(&mut state)?;
            hf_keeper::check_saved_state(&state)?;
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

/// `holdfast demo`: the demo's web server and client are in
/// `holdfast-demo` (the keeper has no use for them).
fn demo(
    listen: Vec<SocketAddr>,
    control: Option<PathBuf>,
    check: bool,
    no_proof: bool,
) -> anyhow::Result<()> {
    let mut args: Vec<OsString> = Vec::new();
    for a in listen {
        args.push("--listen".into());
        args.push(a.to_string().into());
    }
    if let Some(c) = control {
        args.push("--control".into());
        args.push(c.into());
    }
    if check {
        args.push("--check".into());
    }
    if no_proof {
        args.push("--no-proof".into());
    }
    helper(args)
}

/// Runs `holdfast-demo ARGS` from beside this binary in this process's
/// place: the demo, and the completion and manual-page generators, which
/// would otherwise add to every keeper's resident code.
fn helper(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("cannot locate the holdfast binary")?;
    let helper = exe.with_file_name("holdfast-demo");
    if !helper.exists() {
        bail!(
            "holdfast-demo not found next to {} (it is built and installed with holdfast: \
             cargo build --release -p holdfast-cli, or cargo install --path crates/holdfast-cli)",
            exe.display()
        );
    }
    let e = std::process::Command::new(&helper).args(args).exec();
    Err(anyhow::Error::new(e).context(format!("running {}", helper.display())))
}
