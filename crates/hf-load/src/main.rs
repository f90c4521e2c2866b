//! `hf-load`: the command line over [`hf_load::run`]. Thin: parses
//! arguments, prints the report, maps the outcome to an exit code (0: no
//! request failed, 1: some did, 2: usage or setup error).

#![forbid(unsafe_code)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

const EXAMPLES: &str = "\
Examples:
  # 64 keep-alive connections for 10 s against the demo (`holdfast demo`):
  hf-load --addr 127.0.0.1:8080 --site /tmp/holdfast-demo-<pid>/site

  # ...while the active worker is SIGKILLed every 200 ms, events logged:
  hf-load --addr 127.0.0.1:8080 --site DIR --kill-every-ms 200 \\
          --control $XDG_RUNTIME_DIR/holdfast/control.sock --events events.jsonl

  # one connection per request, and `holdfast upgrade --settle 0` every 2 s:
  hf-load --addr 127.0.0.1:8080 --site DIR --close --upgrade-every-ms 2000 \\
          --upgrade-arg=--settle --upgrade-arg=0

  # a server remote from its files: list them where they are, load from elsewhere:
  hf-load --site /srv/www --list-files > files.txt
  hf-load --addr 10.0.0.5:80 --files files.txt --conns 256 --secs 60 --json

Every response must be 200 with exactly the file's bytes (size and CRC-32C).
Exit status: 0 if no request failed, 1 if any did, 2 on a usage or setup error.";

#[derive(Parser)]
#[command(
    name = "hf-load",
    version,
    about = "Load an HTTP server and verify every response byte for byte, optionally killing or upgrading it meanwhile",
    long_about = "Load an HTTP server and verify every response byte for byte.\n\n\
        N connections (keep-alive, or one per request with --close) fetch the files of a site in \
        a pseudo-random mix for a fixed time. Every response must be 200 with the file's exact \
        size and CRC-32C; anything else is a failure, counted by kind: reset, timeout, closed \
        mid-response, closed before responding, idle keep-alive connection closed, wrong status, \
        wrong size, wrong checksum, connect error, not closed after `Connection: close` (with \
        --close), malformed response or bytes nobody asked for. Latencies go into an HDR \
        histogram; a request slower than --stall-ms is a stall.\n\n\
        With --kill-every-ms the active worker of the holdfast keeper at --control is SIGKILLed \
        on that schedule; with --upgrade-every-ms `holdfast upgrade` runs on it. Each event is \
        logged with its time since the start (µs), so stalls and failures line up with their \
        cause (--events FILE: events, stalls and failures as JSON lines).",
    after_help = EXAMPLES
)]
struct Cli {
    /// The server (host:port); the only address hf-load connects to.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, required_unless_present = "list_files")]
    addr: Option<SocketAddr>,
    /// The files the server serves: every regular file under DIR is
    /// requested at its relative path.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "files",
        conflicts_with = "files"
    )]
    site: Option<PathBuf>,
    /// Instead of --site: a list of `urlpath size crc32c-hex` lines, for a
    /// server remote from its files (write one with --site DIR --list-files).
    #[arg(long, value_name = "LIST")]
    files: Option<PathBuf>,
    /// Print the --files list of --site DIR and exit.
    #[arg(long, requires = "site")]
    list_files: bool,
    /// Connections (a thread each).
    #[arg(long, default_value_t = 64, value_name = "N")]
    conns: usize,
    /// How long to load, in seconds (fractions allowed).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    secs: f64,
    /// One connection per request (`Connection: close`) instead of keep-alive.
    #[arg(long)]
    close: bool,
    /// A request not completely answered within this is a timeout.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    timeout_ms: u64,
    /// A successful request slower than this is a stall.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    stall_ms: u64,
    /// SIGKILL the keeper's active worker this often.
    #[arg(long, value_name = "MS")]
    kill_every_ms: Option<u64>,
    /// Run `holdfast upgrade --control PATH --json [ARGS]` this often (one
    /// at a time: the next starts when the last has ended, if later).
    #[arg(long, value_name = "MS")]
    upgrade_every_ms: Option<u64>,
    /// The keeper's control socket, for kills and upgrades (default:
    /// holdfast's, `$XDG_RUNTIME_DIR/holdfast/control.sock`). Its keeper
    /// must listen on --addr.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The `holdfast` binary for upgrades (default: next to hf-load, else on PATH).
    #[arg(long, value_name = "PATH")]
    holdfast: Option<PathBuf>,
    /// One more argument for `holdfast upgrade` (repeat; e.g.
    /// `--upgrade-arg=--settle --upgrade-arg=0`, or `--upgrade-arg=--` and a command).
    #[arg(
        long,
        value_name = "ARG",
        allow_hyphen_values = true,
        requires = "upgrade_every_ms"
    )]
    upgrade_arg: Vec<String>,
    /// Write events (kills, upgrades), stalls and failures to FILE as JSON
    /// lines, each with its time since the start in µs.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Seed of the request mix (the same seed, the same order per connection).
    #[arg(long, default_value_t = 1, value_name = "N")]
    seed: u64,
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{s}: {e} (want host:port)"))?
        .next()
        .ok_or_else(|| format!("{s}: no address"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hf-load: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, hf_load::Error> {
    use hf_load::{Error, FileSet};
    let files = match (&cli.site, &cli.files) {
        (Some(dir), _) => FileSet::from_site(dir)?,
        (None, Some(list)) => FileSet::from_list(list)?,
        (None, None) => return Err(Error::Setup("give --site DIR or --files LIST".into())),
    };
    if cli.list_files {
        print!("{}", files.to_list());
        return Ok(ExitCode::SUCCESS);
    }
    let Some(addr) = cli.addr else {
        return Err(Error::Setup("give --addr HOST:PORT".into()));
    };
    if !(cli.secs.is_finite() && cli.secs > 0.0) {
        return Err(Error::Setup(format!(
            "--secs {}: want a positive number",
            cli.secs
        )));
    }
    let scheduled = cli.kill_every_ms.is_some() || cli.upgrade_every_ms.is_some();
    let mut cfg = hf_load::Config::new(addr, files);
    cfg.conns = cli.conns;
    cfg.duration = Duration::from_secs_f64(cli.secs);
    cfg.close = cli.close;
    cfg.timeout = Duration::from_millis(cli.timeout_ms);
    cfg.stall = Duration::from_millis(cli.stall_ms);
    cfg.kill_every = cli.kill_every_ms.map(Duration::from_millis);
    cfg.upgrade_every = cli.upgrade_every_ms.map(Duration::from_millis);
    cfg.control = match cli.control {
        Some(c) => Some(c),
        None if scheduled => Some(hf_keeper::default_control_path()),
        None => None,
    };
    cfg.holdfast = cli.holdfast;
    cfg.upgrade_args = cli.upgrade_arg;
    cfg.events = cli.events;
    cfg.seed = cli.seed;
    if !cli.json {
        eprintln!(
            "hf-load: {} {} connections to {addr}, {} files, for {} s{}{}",
            cfg.conns,
            if cfg.close {
                "connection-per-request"
            } else {
                "keep-alive"
            },
            cfg.files.files.len(),
            cli.secs,
            cli.kill_every_ms
                .map(|ms| format!(", SIGKILL of the active worker every {ms} ms"))
                .unwrap_or_default(),
            cli.upgrade_every_ms
                .map(|ms| format!(", `holdfast upgrade` every {ms} ms"))
                .unwrap_or_default(),
        );
    }
    let report = hf_load::run(&cfg)?;
    if cli.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Setup(format!("encoding the report: {e}")))?;
        println!("{json}");
    } else {
        print!("{}", report.text());
    }
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
