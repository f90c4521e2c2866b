//! hf-testsvc: a small request/response service on the *blocking* holdfast
//! flavour, built for tests that need control over timing and output.
//!
//! Protocol: one request per line, `REQ <id> <len> <delay_ms>\n`. The answer
//! is `RESP <id> <len>\n` followed by `len` bytes of a pattern derived from
//! `id`, then `\n`. The first half of the answer is written, the service
//! sleeps `delay_ms`, then writes the rest — so a test can kill the worker
//! between the halves. `--diverge` mixes the worker's pid into the pattern:
//! a replay then differs from what the client already has, which holdfast
//! must detect. A malformed line gets `ERR\n`.
//!
//! `HOLD <id> <len>\n` answers like `REQ` but, on its first execution, stops
//! after the first half and waits until the worker is killed; replayed by a
//! new worker (the first half is then being re-created, see
//! `Conn::replaying`), it completes at once. Benchmarks use it to time crash →
//! first replayed byte.
//!
//! `BODY <id> <len>\n` followed by `len` bytes is answered, once the whole
//! body has been read, with `SUM <id> <len> <fnv1a-64 of the body>\n`: a
//! request body larger than the socket buffers, for the input spool.
//!
//! `CRASH <id>\n` aborts the worker (SIGABRT), every time, until holdfast
//! flags it as poison; then it is answered `ERR POISON <id>\n`.
//!
//! `STALL <id> <len>\n` is a HOLD that blocks the whole thread instead of
//! one task: with `--tokio` the runtime, and so the heartbeat, stops.
//!
//! `LEAK <id> <mib>\n` allocates `mib` MiB that are never freed and
//! answers `LEAKED <id> <mib>\n`: a worker whose memory grows without bound.
//!
//! `QUIT <id>\n` is answered `BYE <id>\n` and the service closes the
//! connection.
//!
//! `COUNT <id>\n` is answered `COUNT <id> <n>\n`, `n` being the requests
//! this connection completed before it. With `--state-version V` the count
//! is the connection's state blob (version 1: 8 bytes little-endian, version
//! 2: decimal text), so it survives crashes and upgrades; `--reads-state L`
//! lets a build read versions `L..=V` (an upgrade from version 1 to 2).
//! `--abort-on-request` aborts at the first request: a bad new version.
//!
//! `ONCE <id> <error|close> <hold|done>\n` is work that must not run twice:
//! it declares that replay policy, appends `<id>` to the `--ledger` file
//! (the side effect), then either answers `DONE <id>\n` or, with `hold`,
//! waits until the worker is killed. The next worker does not run it
//! again: it answers `ERR NOREPLAY <id>\n` (`error`) or the connection is
//! closed (`close`).
//!
//! `--tokio` serves the same protocol on the tokio flavour (one thread), so
//! tests and benchmarks can run both flavours.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use holdfast::{Conn, Listener};

#[derive(Parser)]
#[command(name = "hf-testsvc", about = "Line-protocol test service for holdfast")]
struct Args {
    /// Address to listen on without a keeper.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Mix the worker pid into the answers, so replays differ.
    #[arg(long)]
    diverge: bool,
    /// Serve with the tokio flavour on one thread instead of a thread per connection.
    #[arg(long)]
    tokio: bool,
    /// Sleep this long before becoming ready (a slow-starting service).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    init_ms: u64,
    /// Keep each connection's request count as a state blob of this version (1 or 2).
    #[arg(long, value_name = "V", value_parser = clap::value_parser!(u16).range(1..=2))]
    state_version: Option<u16>,
    /// Oldest state version this build reads (default: only its own).
    #[arg(long, value_name = "V", requires = "state_version")]
    reads_state: Option<u16>,
    /// Abort at the first request (a broken build).
    #[arg(long)]
    abort_on_request: bool,
    /// The file `ONCE` appends its ids to.
    #[arg(long, value_name = "FILE")]
    ledger: Option<std::path::PathBuf>,
}

static LEDGER: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// `ONCE <id> <error|close> <hold|done>`: (id, policy, hold).
fn once(line: &str) -> Option<(&str, holdfast::ReplayPolicy, bool)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        ["ONCE", id, policy, then] => Some((
            id,
            match *policy {
                "error" => holdfast::ReplayPolicy::Error,
                "close" => holdfast::ReplayPolicy::Close,
                _ => return None,
            },
            match *then {
                "hold" => true,
                "done" => false,
                _ => return None,
            },
        )),
        _ => None,
    }
}

/// `ONCE`'s side effect: its id, appended to the ledger.
fn side_effect(id: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let Some(path) = LEDGER.get() else {
        return Ok(());
    };
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?
        .write_all(format!("{id}\n").as_bytes())
}

/// How the service keeps its per-connection state, and whether it is broken.
#[derive(Clone, Copy)]
struct Behaviour {
    state_version: Option<u16>,
    abort_on_request: bool,
}

static BEHAVIOUR: std::sync::OnceLock<Behaviour> = std::sync::OnceLock::new();

fn behaviour() -> Behaviour {
    BEHAVIOUR.get().copied().unwrap_or(Behaviour {
        state_version: None,
        abort_on_request: false,
    })
}

fn options(args: &Args) -> holdfast::Options {
    match args.state_version {
        Some(v) => holdfast::Options::new()
            .state_version(v)
            .reads_state_versions(args.reads_state.unwrap_or(v).min(v)..=v),
        None => holdfast::Options::new(),
    }
}

/// The request count in a state blob of version `v` (an empty blob: 0).
fn decode_count(v: u16, b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return Some(0);
    }
    match v {
        1 => b.try_into().ok().map(u64::from_le_bytes),
        2 => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn encode_count(v: u16, n: u64) -> Vec<u8> {
    match v {
        1 => n.to_le_bytes().to_vec(),
        _ => n.to_string().into_bytes(),
    }
}

/// The answer body for request `id`: what a client checks byte for byte.
pub fn pattern(id: u64, len: usize, salt: u64) -> Vec<u8> {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt ^ 0xDEAD_BEEF;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let _ = BEHAVIOUR.set(Behaviour {
        state_version: args.state_version,
        abort_on_request: args.abort_on_request,
    });
    if let Some(l) = &args.ledger {
        let _ = LEDGER.set(l.clone());
    }
    std::thread::sleep(Duration::from_millis(args.init_ms));
    let salt = if args.diverge {
        u64::from(std::process::id())
    } else {
        0
    };
    if args.tokio {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        return match rt.block_on(asynch::run(&args.listen, &options(&args), salt)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hf-testsvc: {e}");
                ExitCode::from(1)
            }
        };
    }
    let mut listener = match Listener::bind_with(&args.listen, &options(&args)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hf-testsvc: {e}");
            return ExitCode::from(1);
        }
    };
    for a in listener.local_addrs() {
        eprintln!("hf-testsvc listening on {a}");
    }
    loop {
        match listener.accept() {
            Ok(Some(conn)) => {
                std::thread::spawn(move || serve(conn, salt));
            }
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hf-testsvc: {e}");
                return ExitCode::from(1);
            }
        }
    }
}

/// The next complete request in `buf`: (its line, its body, its length).
fn next_request(buf: &[u8]) -> Option<(String, &[u8], usize)> {
    let nl = buf.iter().position(|b| *b == b'\n')?;
    let line = String::from_utf8_lossy(&buf[..nl]).into_owned();
    let body = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["BODY", _, len] => len
            .parse::<usize>()
            .ok()
            .filter(|l| *l <= 256 << 20)
            .unwrap_or(0),
        _ => 0,
    };
    let total = nl + 1 + body;
    let body = buf.get(nl + 1..total)?;
    Some((line, body, total))
}

/// The answer to `BODY <id> <len>`.
pub fn body_answer(id: &str, body: &[u8]) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("SUM {id} {} {h:016x}\n", body.len()).into_bytes()
}

/// The connection's request count from its state blob; `None` if this
/// build cannot read it.
fn count_of(state: (u16, &[u8])) -> Option<u64> {
    match behaviour().state_version {
        Some(_) => decode_count(state.0, state.1),
        None => Some(0),
    }
}

/// The answer to `COUNT <id>`.
fn count_answer(id: &str, n: u64) -> Vec<u8> {
    format!("COUNT {id} {n}\n").into_bytes()
}

/// The state blob to commit after `n` requests: (version, bytes).
fn state_after(n: u64) -> (u16, Vec<u8>) {
    match behaviour().state_version {
        Some(v) => (v, encode_count(v, n)),
        None => (1, Vec::new()),
    }
}

fn serve(mut c: Conn, salt: u64) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let Some(mut count) = count_of(c.state()) else {
        return c.write_all(b"ERR STATE\n");
    };
    loop {
        while let Some((line, body, total)) = next_request(&buf) {
            if let Some(id) = line
                .strip_prefix("BODY ")
                .and_then(|r| r.split_whitespace().next())
            {
                c.write_all(&body_answer(id, body))?;
            } else if let Some(id) = line.strip_prefix("COUNT ") {
                c.write_all(&count_answer(id, count))?;
            } else if let Some(id) = line.strip_prefix("QUIT ") {
                c.write_all(format!("BYE {id}\n").as_bytes())?;
                return c.commit_and_close(total);
            } else {
                answer(&mut c, &line, salt)?;
            }
            count += 1;
            let (v, state) = state_after(count);
            c.commit_versioned(total, v, &state)?;
            buf.drain(..total);
        }
        let n = c.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What a request does between the two halves of its answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pause {
    /// `REQ`: sleep this many milliseconds (the task only, in the tokio flavour).
    Sleep(u64),
    /// `HOLD`: on first execution, wait until the worker is killed.
    Hold,
    /// `STALL`: on first execution, block the whole thread — in the tokio
    /// flavour the runtime stops, and with it the worker's heartbeat.
    Stall,
}

/// A parsed request: id, answer length, pause.
type Request = (u64, usize, Pause);

fn parse(line: &str) -> Option<Request> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        ["REQ", id, len, delay] => match (
            id.parse::<u64>(),
            len.parse::<usize>(),
            delay.parse::<u64>(),
        ) {
            (Ok(i), Ok(l), Ok(d)) if l <= 64 << 20 => Some((i, l, Pause::Sleep(d))),
            _ => None,
        },
        [verb @ ("HOLD" | "STALL"), id, len] => match (id.parse::<u64>(), len.parse::<usize>()) {
            (Ok(i), Ok(l)) if l <= 64 << 20 => Some((
                i,
                l,
                if *verb == "HOLD" {
                    Pause::Hold
                } else {
                    Pause::Stall
                },
            )),
            _ => None,
        },
        _ => None,
    }
}

fn answer_bytes(id: u64, len: usize, salt: u64) -> Vec<u8> {
    let mut out = format!("RESP {id} {len}\n").into_bytes();
    out.extend_from_slice(&pattern(id, len, salt));
    out.push(b'\n');
    out
}

/// `LEAK <id> <mib>`: memory that is never given back.
fn leak(line: &str) -> Option<Vec<u8>> {
    let rest = line.strip_prefix("LEAK ")?;
    let (id, mib) = rest.split_once(' ')?;
    let mib: usize = mib.trim().parse().ok().filter(|m| *m <= 1024)?;
    static HOARD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    // Written, so the pages are resident.
    let block = vec![0x5a_u8; mib << 20];
    if let Ok(mut h) = HOARD.lock() {
        h.push(block);
    }
    Some(format!("LEAKED {id} {mib}\n").into_bytes())
}

fn answer(c: &mut Conn, line: &str, salt: u64) -> std::io::Result<()> {
    if behaviour().abort_on_request {
        std::process::abort();
    }
    if let Some(out) = leak(line) {
        return c.write_all(&out);
    }
    if let Some(id) = line.strip_prefix("CRASH ") {
        if c.poisoned() {
            return c.write_all(format!("ERR POISON {id}\n").as_bytes());
        }
        std::process::abort();
    }
    if let Some((id, policy, hold)) = once(line) {
        if c.poisoned() {
            return c.write_all(format!("ERR NOREPLAY {id}\n").as_bytes());
        }
        c.replay_policy(policy)?;
        side_effect(id)?;
        if hold {
            // Until the worker is killed.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        return c.write_all(format!("DONE {id}\n").as_bytes());
    }
    let Some((id, len, delay)) = parse(line) else {
        return c.write_all(b"ERR\n");
    };
    let replaying = c.replaying();
    let out = answer_bytes(id, len, salt);
    let half = out.len() / 2;
    c.write_all(&out[..half])?;
    c.flush()?;
    match delay {
        Pause::Sleep(ms) => std::thread::sleep(Duration::from_millis(ms)),
        // First execution of a HOLD or STALL: wait here until the worker is killed.
        Pause::Hold | Pause::Stall if !replaying => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Pause::Hold | Pause::Stall => {}
    }
    c.write_all(&out[half..])
}

mod asynch {
    use std::net::SocketAddr;
    use std::time::Duration;

    use holdfast::tokio::{Conn, Listener};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub async fn run(
        listen: &[SocketAddr],
        opts: &holdfast::Options,
        salt: u64,
    ) -> Result<(), holdfast::Error> {
        let mut listener = Listener::bind_with(listen, opts).await?;
        for a in listener.local_addrs() {
            eprintln!("hf-testsvc listening on {a}");
        }
        while let Some(conn) = listener.accept().await? {
            tokio::spawn(serve(conn, salt));
        }
        Ok(())
    }

    async fn serve(mut c: Conn, salt: u64) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(4096);
        let Some(mut count) = super::count_of(c.state()) else {
            return c.write_all(b"ERR STATE\n").await;
        };
        loop {
            while let Some((line, body, total)) = super::next_request(&buf) {
                if let Some(id) = line
                    .strip_prefix("BODY ")
                    .and_then(|r| r.split_whitespace().next())
                {
                    c.write_all(&super::body_answer(id, body)).await?;
                } else if let Some(id) = line.strip_prefix("COUNT ") {
                    c.write_all(&super::count_answer(id, count)).await?;
                } else if let Some(id) = line.strip_prefix("QUIT ") {
                    c.write_all(format!("BYE {id}\n").as_bytes()).await?;
                    return c.commit_and_close(total).await;
                } else {
                    answer(&mut c, &line, salt).await?;
                }
                count += 1;
                let (v, state) = super::state_after(count);
                c.commit_versioned(total, v, &state).await?;
                buf.drain(..total);
            }
            if c.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
    }

    async fn answer(c: &mut Conn, line: &str, salt: u64) -> std::io::Result<()> {
        if super::behaviour().abort_on_request {
            std::process::abort();
        }
        if let Some(out) = super::leak(line) {
            return c.write_all(&out).await;
        }
        if let Some(id) = line.strip_prefix("CRASH ") {
            if c.poisoned() {
                return c.write_all(format!("ERR POISON {id}\n").as_bytes()).await;
            }
            std::process::abort();
        }
        if let Some((id, policy, hold)) = super::once(line) {
            if c.poisoned() {
                return c.write_all(format!("ERR NOREPLAY {id}\n").as_bytes()).await;
            }
            c.replay_policy(policy)?;
            super::side_effect(id)?;
            if hold {
                std::future::pending::<()>().await;
            }
            return c.write_all(format!("DONE {id}\n").as_bytes()).await;
        }
        let Some((id, len, delay)) = super::parse(line) else {
            return c.write_all(b"ERR\n").await;
        };
        let replaying = c.replaying();
        let out = super::answer_bytes(id, len, salt);
        let half = out.len() / 2;
        c.write_all(&out[..half]).await?;
        c.flush().await?;
        match delay {
            super::Pause::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            super::Pause::Hold if !replaying => std::future::pending::<()>().await,
            // Blocks the runtime's only thread: nothing else runs, the
            // heartbeat included, until the keeper's hang timeout.
            super::Pause::Stall if !replaying => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            super::Pause::Hold | super::Pause::Stall => {}
        }
        c.write_all(&out[half..]).await
    }
}
