//! hf-ftpd: an FTP server on the holdfast library (blocking flavour, a
//! thread per control connection).
//!
//! ```text
//! holdfast run --listen ADDR -- hf-ftpd --root DIR [--anonymous] [--users FILE]
//! hf-ftpd --listen ADDR --root DIR ...      (alone: plain sockets, nothing survives)
//! ```
//!
//! RFC 959 with the RFC 2389/2428/3659 pieces real clients use: `FEAT`,
//! `OPTS UTF8`, `EPSV`/`EPRT`, `MLSD`/`MLST`, `SIZE`, `MDTM`, `REST STREAM`.
//! `TYPE A` is accepted and, like vsftpd's default, transfers bytes
//! unchanged. Paths live under `--root`, which no path escapes (see
//! [`vfs`]).
//!
//! ## Zero loss
//!
//! Under the keeper, a worker can be SIGKILLed at any instant and clients
//! notice no more than a stall: not a login, not a command, not a byte of a
//! transfer is lost or repeated (but see the limits below).
//!
//! - **Commands.** The control connection is a holdfast `Conn`: a command
//!   line is peeked, executed, answered, and committed together with the
//!   session blob ([`session`]: login, directory, type, `REST`, `RNFR`,
//!   data-connection mode, transfer in progress). A command cut off by a
//!   crash runs again in the next worker and must answer the same bytes;
//!   holdfast sends only what the client does not have yet. What could
//!   differ on a rerun is kept from differing: a replayed `PASV` takes back
//!   its held listener and answers the same port, and a file-system change
//!   (`DELE`, `MKD`, `RMD`, `RNTO`) commits a mark before it touches
//!   anything, so its rerun takes "already done" for its own success
//!   ([`control`]).
//! - **Data channels.** The passive listener and the data connection are
//!   *held channels*: the keeper holds a dup of each from the moment it
//!   exists (it accepts a passive data connection itself, with
//!   `Conn::accept_held`, and an active one is held before it connects), and
//!   the next worker takes them back ([`data`]).
//! - **Transfers.** `RETR` commits its `150` with `{RETR, path, start}` in
//!   the session; a new worker continues the file at `start` plus the data
//!   connection's written count, which the kernel keeps exactly. `STOR`
//!   peeks the data connection and consumes input only once it is in the
//!   file; a new worker continues at `start` plus the consumed count. No
//!   commits are needed during a transfer ([`transfer`]).
//!
//! Limits:
//!
//! - `ABOR` during a transfer is noticed on a best-effort basis.
//! - A file changed while a transfer of it is continued after a crash is
//!   sent as it now is; a listing regenerated after a crash likewise.
//! - Paths must fit the 384-byte session blob (a deeper `CWD` or a longer
//!   transfer path is refused).

#![forbid(unsafe_code)]

mod config;
mod control;
mod data;
mod listing;
mod proto;
mod session;
mod transfer;
mod vfs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use holdfast::{Listener, Options};

use config::{Config, Users};

#[derive(Parser)]
#[command(
    name = "hf-ftpd",
    version,
    about = "FTP server on the holdfast library"
)]
struct Args {
    /// Directory to serve; no path leaves it.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Let `anonymous` (or `ftp`) log in with any password, read-only.
    #[arg(long)]
    anonymous: bool,
    /// Let anonymous sessions upload, delete, rename and make directories.
    #[arg(long, requires = "anonymous")]
    anonymous_write: bool,
    /// Accounts: one `name:password` per line, `#` comments.
    #[arg(long, value_name = "FILE")]
    users: Option<PathBuf>,
    /// Address to listen on when run without holdfast (ignored under the keeper).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hf-ftpd: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let users = match &args.users {
        Some(p) => Users::load(p)?,
        None => Users::default(),
    };
    if users.is_empty() && !args.anonymous {
        anyhow::bail!("nobody can log in: pass --anonymous or --users FILE (with accounts)");
    }
    let root = vfs::Root::new(&args.root)
        .with_context(|| format!("root directory {}", args.root.display()))?;
    let cfg = Arc::new(Config {
        root,
        anonymous: args.anonymous,
        anonymous_write: args.anonymous_write,
        users,
    });
    tracing::debug!(syn_offset = data::syn_offset(), "measured");
    // Bound last: under the keeper, this is when the worker counts as ready.
    let opts = Options::new().state_version(session::STATE_VERSION);
    let mut listener = Listener::bind_with(&args.listen, &opts)?;
    match listener.mode() {
        holdfast::Mode::Kept(id) => tracing::info!(
            worker = id.worker_id,
            generation = id.generation,
            root = %args.root.display(),
            "serving under holdfast"
        ),
        holdfast::Mode::PassThrough => {
            for a in listener.local_addrs() {
                tracing::info!(listen = %a, root = %args.root.display(), "serving without holdfast");
            }
        }
    }
    while let Some(conn) = listener.accept()? {
        let cfg = cfg.clone();
        let span = tracing::info_span!("conn", id = conn.id().unwrap_or(0));
        std::thread::spawn(move || {
            let _g = span.enter();
            if let Err(e) = control::serve(conn, &cfg) {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    Ok(())
}
