//! The `holdfast` command line's definition, shared by both binaries:
//! `holdfast` parses it, and `holdfast-demo` makes the shell completions
//! and manual pages from it (so the keeper's binary carries no generator).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hf_keeper::status;

use crate::units;

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
pub struct Cli {
    /// Log lines as text, or as one JSON object a line (for a log
    /// collector). `HOLDFAST_LOG` sets the level (e.g. `debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
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
        #[arg(value_parser = ["bash", "zsh", "fish", "elvish", "powershell"])]
        shell: String,
    },
    /// Print the manual page (roff; e.g. `holdfast man >
    /// /usr/local/share/man/man1/holdfast.1`), or write one per command.
    Man {
        /// Write holdfast.1 and a page per command (holdfast-run.1, ...)
        /// into DIR instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print the saved-state format a keeper before the framed state checks
    /// for before `upgrade --keeper` (this build still reads it).
    #[command(hide = true)]
    StateFormat,
    /// Check a keeper's saved state on standard input as this build would
    /// resume it; print the format it reads (checked before `upgrade --keeper`).
    #[command(hide = true)]
    StateCheck,
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
