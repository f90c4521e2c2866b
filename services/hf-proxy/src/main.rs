//! hf-proxy: an HTTP/1.1 forward proxy on the holdfast library (blocking
//! flavour, a thread per client connection).
//!
//! Clients send absolute-form requests (`GET http://host:port/path`), which
//! go to the origin in origin form over one upstream connection per client
//! connection, kept alive while the origin stays the same; `CONNECT
//! host:port` opens a tunnel. Run alone (`--listen ADDR`) it is an ordinary
//! proxy; under `holdfast run` its worker can be killed at any instant and
//! neither the clients nor the origins notice.
//!
//! # Zero loss across a crash
//!
//! Three streams are at stake for each client connection, and the kernel
//! keeps all three while the keeper holds the sockets:
//!
//! - **client input** is peeked, not read: a request stays in the client
//!   socket until the commit that ends its answer, so a successor reads the
//!   whole request again;
//! - **upstream output** is counted by the kernel (`HeldTcp::written`): the
//!   successor knows exactly how many bytes of a request the origin has;
//! - **upstream input** is peeked too, and consumed only after the commit
//!   that records it as relayed: the successor reads the answer on from the
//!   last commit.
//!
//! The upstream socket is a *held channel* (`Conn::hold`): the keeper keeps
//! a copy, and a successor takes it back (`Conn::take_held`). What the
//! successor needs beyond the kernel's queues is in the connection's state
//! blob ([`state`]), saved with every commit.
//!
//! An exchange goes through these commit points (each `commit(0, ..)`
//! keeps the request uncommitted, and makes the client output so far final):
//!
//! 1. A connection is opened (or reused) and handed to the keeper, then
//!    committed: *request in flight, its bytes go upstream from output
//!    offset `req_start`, its answer starts at input offset `pos`* — before
//!    the first byte of the request goes out. A crash before that commit
//!    leaves a connection that carried nothing; the successor drops it (the
//!    state names the upstream socket by its `SO_COOKIE`) and starts over.
//! 2. The request is rewritten (a pure function of the client's bytes) and
//!    sent. A successor rewrites it again and skips the `written() -
//!    req_start` bytes the origin already has: **a request never reaches
//!    the origin twice**, however often the worker dies while sending it.
//! 3. The answer's head is read, rewritten, sent to the client, and
//!    committed with the body's start position and framing state; then each
//!    read of the body is relayed and committed with its new position and
//!    parser state (remaining length, or where the chunked parser stands),
//!    and consumed upstream. A successor seeks to the last position and
//!    regenerates the client output from there; holdfast compares it with
//!    what the client has and sends only the missing tail.
//! 4. The end of the answer commits the request's input with a state that
//!    says nothing is in flight (and still names the upstream if it may
//!    carry the next request).
//!
//! One commit per read keeps replays byte-identical: a successor's first
//! read at a commit point returns at least what the dead worker read there
//! (those bytes are still queued), so it regenerates at least the dead
//! worker's output before its own next commit.
//!
//! Error answers that depend on timing (502, 504) are committed as a
//! decision before they are sent, so a successor repeats the answer rather
//! than trying again and answering differently. After part of an answer
//! went out, an upstream failure closes the client connection.
//!
//! A `CONNECT` tunnel is committed the same way in both directions (see
//! [`tunnel`]).
//!
//! # Limits
//!
//! - A request is committed only with its answer, so its body is held as
//!   uncommitted input: at most 60 MiB with `Content-Length` (413 beyond),
//!   and holdfast's 64 MiB spool for chunked bodies.
//! - `Expect: 100-continue` is answered by the proxy, which then forwards
//!   the request without it.
//! - A resumed answer's upstream is not reused afterwards (its head, which
//!   says whether it could be, is gone).
//! - A tunnel closes both ways when the origin closes (holdfast connections
//!   have no half-close); an idle tunnel moves to a new version
//!   (`holdfast upgrade`) only when it next carries bytes.
//! - No TLS; `https://` targets get 501 (use `CONNECT`).

#![forbid(unsafe_code)]

mod http;
mod session;
mod state;
mod tunnel;
mod upstream;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use holdfast::Listener;

#[derive(Parser)]
#[command(
    name = "hf-proxy",
    version,
    about = "HTTP/1.1 forward proxy on the holdfast library"
)]
struct Args {
    /// Address to listen on when run without holdfast (ignored under the keeper).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// How long an origin may take to accept a connection, to answer, and
    /// between any two reads or writes.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    upstream_timeout_ms: u64,
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
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hf-proxy: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<(), holdfast::Error> {
    let cfg = Arc::new(session::Config {
        timeout: Duration::from_millis(args.upstream_timeout_ms.max(1)),
    });
    let opts = holdfast::Options::new().state_version(state::VERSION);
    let mut listener = Listener::bind_with(&args.listen, &opts)?;
    match listener.mode() {
        holdfast::Mode::Kept(id) => {
            tracing::info!(
                worker = id.worker_id,
                generation = id.generation,
                "serving under holdfast"
            )
        }
        holdfast::Mode::PassThrough => {
            for a in listener.local_addrs() {
                tracing::info!(listen = %a, "serving without holdfast");
            }
        }
    }
    let mut next_id = 0u64;
    while let Some(conn) = listener.accept()? {
        next_id += 1;
        let id = conn.id().unwrap_or(next_id);
        let cfg = cfg.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{id}"))
            .spawn(move || {
                let _span = tracing::info_span!("conn", id).entered();
                session::serve(conn, cfg);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a connection thread");
        }
    }
    Ok(())
}
