//! hf-chat: an axum application served zero-loss by `holdfast-http`, written
//! only against the public adapter — the proof and the example.
//!
//! - `GET /hello?n=N` → `200 text/plain`, `hello N\n`;
//! - `GET /big` → `200 application/octet-stream`, 2,097,152 bytes, byte
//!   `i` = `i mod 251`;
//! - `POST /echo` → `200` with the request body;
//! - `GET /events?n=N[&every_ms=MS]` → Server-Sent Events
//!   (`text/event-stream`): `N` events `id: i\ndata: event i\n\n`, one
//!   every 10 ms (`every_ms`; 0: as fast as the client reads), as a
//!   [`Resumable`] stream with progress `i`: after a crash or an upgrade
//!   the stream goes on after the last event committed, and the client
//!   gets every event once (a client that reconnects by itself may send
//!   `Last-Event-ID` to start after it);
//! - `GET /ws/{room}?name=NAME[&since=S]` → a WebSocket. Each text message
//!   a member sends is appended once to the room's log (a
//!   [`holdfast::shared::Log`] in `--data-dir`) with the next sequence
//!   number and delivered, as `{"seq":N,"from":"NAME","text":"…"}`, to
//!   every member joined at that moment, the sender included; `since`
//!   first delivers the logged messages after `S`. Across crashes and
//!   upgrades: every message logged exactly once, every member receives
//!   every message logged while it is joined exactly once, in order.
//!
//! With `--test-routes`, two more for the tests of the adapter's failure
//! handling: `GET /crash` panics (under a keeper that ends the worker; the
//! request comes back as poison and gets the adapter's `500`), and
//! `GET /once` declares that it must not run twice, then never answers (a
//! test kills the worker; the next one answers `500` instead of running it);
//! `POST /pay` is the same with its policy set by `ReplayPolicyLayer`.
//!
//! With `--tls-cert FILE --tls-key FILE` (PEM, chain allowed) it serves
//! HTTPS and WSS instead (ALPN http/1.1) through holdfast-tls, with the
//! same guarantees: TLS 1.3 sessions, handshakes included, survive the
//! worker.
//!
//! `hf-chat --listen ADDR` runs alone (pass-through); `holdfast run --listen
//! ADDR -- hf-chat` runs it under the keeper.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use holdfast::shared::Log;
use holdfast::ReplayPolicy;
use holdfast_http::stream::{Progress, Resumable};
use holdfast_http::ws::{Event, Message, WebSocket, WebSocketUpgrade};
use holdfast_http::{Handle, ReplayPolicyLayer};
use serde::Deserialize;

/// Length of `/big`.
const BIG_LEN: usize = 2 * 1024 * 1024;

#[derive(Parser)]
#[command(about = "An axum chat service under holdfast")]
struct Args {
    /// Addresses to listen on without a keeper (ignored under one).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Also serve `/crash` and `/once` (for tests).
    #[arg(long)]
    test_routes: bool,
    /// Where the rooms' logs live (one file per room), shared by every
    /// worker and version.
    #[arg(long, default_value = "hf-chat-data")]
    data_dir: PathBuf,
    /// For tests: SIGKILL the process at every N-th passage through a
    /// point where a crash is hardest to survive — `after-append:N` (a
    /// message logged, its input not yet committed) or `after-send:N`
    /// (messages delivered, not yet committed).
    #[arg(long, hide = true, value_parser = parse_fault)]
    fault: Option<(Fault, u64)>,
    /// For tests of upgrades that change a state blob's schema: save
    /// members in format 2 (state version 2), still reading format 1.
    #[arg(long, hide = true)]
    member_v2: bool,
    /// Serve HTTPS and WSS with this PEM certificate chain (ALPN
    /// http/1.1): TLS 1.3 sessions survive the worker like plain
    /// connections (holdfast-tls); TLS 1.2 is served, but closed if its
    /// worker dies.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// The member format this build writes (see `--member-v2`).
static MEMBER_V2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    AfterAppend,
    AfterSend,
}

fn parse_fault(s: &str) -> Result<(Fault, u64), String> {
    let (point, n) = s.split_once(':').ok_or("expected POINT:N")?;
    let n: u64 = n.parse().map_err(|e| format!("{e}"))?;
    let point = match point {
        "after-append" => Fault::AfterAppend,
        "after-send" => Fault::AfterSend,
        _ => return Err(format!("unknown fault point {point}")),
    };
    Ok((point, n.max(1)))
}

static FAULT: OnceLock<Option<(Fault, u64)>> = OnceLock::new();

/// Aborts at every N-th passage through `point` (see `--fault`).
fn fault(point: Fault) {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if let Some(&Some((p, n))) = FAULT.get() {
        if p == point && COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n == n - 1 {
            // As a SIGKILL from outside would, at exactly this point.
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
    }
}

/// The rooms' logs, opened once per process.
struct Rooms {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<Log>>>,
}

impl Rooms {
    fn log(&self, room: &str) -> std::io::Result<Arc<Log>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = open.get(room) {
            return Ok(l.clone());
        }
        let l = Arc::new(Log::open(self.dir.join(format!("room-{room}.log")))?);
        open.insert(room.to_owned(), l.clone());
        Ok(l)
    }
}

#[derive(Deserialize)]
struct Join {
    name: String,
    since: Option<u64>,
}

/// A member's state, committed with each event: who it is in the log, how
/// many messages it has appended, the last seq delivered to it; format 2
/// adds where it joined.
#[derive(Clone, Copy, Debug)]
struct Member {
    key: u64,
    sent: u64,
    delivered: u64,
    joined: u64,
}

impl Member {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.key, self.sent, self.delivered];
        if MEMBER_V2.load(std::sync::atomic::Ordering::Relaxed) {
            v.push(self.joined);
        }
        v.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// A member saved in format `version` (1: 24 bytes, 2: 32 bytes).
    fn decode(version: u16, b: &[u8]) -> Option<Member> {
        let v = |i: usize| {
            Some(u64::from_le_bytes(
                b.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        let m = Member {
            key: v(0)?,
            sent: v(1)?,
            delivered: v(2)?,
            joined: 0,
        };
        match (version, b.len()) {
            (1, 24) => Some(Member {
                joined: m.delivered,
                ..m
            }),
            (2, 32) => Some(Member { joined: v(3)?, ..m }),
            _ => None,
        }
    }
}

fn valid_room(room: &str) -> bool {
    (1..=64).contains(&room.len())
        && !room.starts_with('.')
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The upgrade: who the member is and where its delivery starts are
/// decided here, recorded, and committed with the 101.
async fn ws_room(
    ws: WebSocketUpgrade,
    Path(room): Path<String>,
    Query(join): Query<Join>,
    State(rooms): State<Arc<Rooms>>,
    handle: Handle,
) -> Response {
    if !valid_room(&room) || join.name.is_empty() || join.name.len() > 64 {
        return (StatusCode::BAD_REQUEST, "bad room or name\n").into_response();
    }
    let log = match rooms.log(&room) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(room, error = %e, "cannot open the room's log");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    };
    let recorded = |v: u64| -> Option<u64> {
        let b = handle.record(|| v.to_le_bytes().to_vec()).ok()?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    };
    let key = recorded(
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish(),
    );
    let joined = match join.since {
        Some(s) => Some(s),
        None => recorded(log.last_seq().unwrap_or(0)),
    };
    let (Some(key), Some(delivered)) = (key, joined) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let first = Member {
        key,
        sent: 0,
        delivered,
        joined: delivered,
    };
    let name = join.name;
    ws.state(first.encode())
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| async move {
            if let Err(e) = member(socket, log, name).await {
                tracing::debug!(error = %e, "member left");
            }
        })
}

/// One member: append what it says once, deliver what the room logs.
async fn member(mut socket: WebSocket, log: Arc<Log>, name: String) -> std::io::Result<()> {
    let mut me = Member::decode(socket.state_version(), socket.state()).ok_or_else(|| {
        std::io::Error::other(format!(
            "unreadable member state (version {})",
            socket.state_version()
        ))
    })?;
    loop {
        match socket.next(log.wait_beyond(me.delivered)).await? {
            Event::Message(Message::Text(text)) => {
                let mut entry = Vec::with_capacity(1 + name.len() + text.len());
                entry.push(name.len() as u8);
                entry.extend_from_slice(name.as_bytes());
                entry.extend_from_slice(text.as_bytes());
                log.append(me.key, me.sent + 1, &entry)?;
                fault(Fault::AfterAppend);
                me.sent += 1;
                socket.commit(&me.encode()).await?;
            }
            Event::Message(Message::Binary(_)) => socket.commit(&me.encode()).await?,
            Event::Ready(ready) => {
                ready?;
                for e in log.since(me.delivered)? {
                    socket.send(Message::Text(render(&e))).await?;
                    me.delivered = e.seq;
                }
                fault(Fault::AfterSend);
                socket.commit(&me.encode()).await?;
            }
            Event::Closed | Event::Moved => return Ok(()),
        }
    }
}

/// A logged message as members receive it.
fn render(e: &holdfast::shared::Entry) -> String {
    let n = usize::from(e.data.first().copied().unwrap_or(0));
    let from = e.data.get(1..1 + n).unwrap_or_default();
    let text = e.data.get(1 + n..).unwrap_or_default();
    let json = |b: &[u8]| serde_json::Value::from(String::from_utf8_lossy(b)).to_string();
    format!(
        r#"{{"seq":{},"from":{},"text":{}}}"#,
        e.seq,
        json(from),
        json(text)
    )
}

#[derive(Deserialize)]
struct Hello {
    n: u64,
}

async fn hello(Query(q): Query<Hello>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    ([(CONTENT_TYPE, "text/plain")], format!("hello {}\n", q.n))
}

async fn big() -> ([(axum::http::HeaderName, &'static str); 1], Bytes) {
    static BIG: OnceLock<Bytes> = OnceLock::new();
    let body = BIG.get_or_init(|| (0..BIG_LEN).map(|i| (i % 251) as u8).collect());
    ([(CONTENT_TYPE, "application/octet-stream")], body.clone())
}

async fn echo(body: Bytes) -> Bytes {
    body
}

#[derive(Deserialize)]
struct Events {
    n: u64,
    every_ms: Option<u64>,
}

/// The default pace of `/events`, in milliseconds.
const EVENT_EVERY_MS: u64 = 10;

/// Server-Sent Events, resumable: each event's progress is its id, and a
/// new worker resuming the stream starts after the last one committed.
async fn events(
    Query(q): Query<Events>,
    Progress(progress): Progress,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let resumed = progress.and_then(|p| Some(u64::from_le_bytes(p.try_into().ok()?)));
    if let Some(after) = resumed {
        tracing::info!("resuming /events after event {after}");
    }
    let after = resumed.unwrap_or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok()?.trim().parse().ok())
            .unwrap_or(0)
    });
    let n = q.n;
    let every = std::time::Duration::from_millis(q.every_ms.unwrap_or(EVENT_EVERY_MS));
    let items = futures_util::stream::unfold(after, move |i| async move {
        if i >= n {
            return None;
        }
        if !every.is_zero() {
            tokio::time::sleep(every).await;
        }
        let i = i + 1;
        Some((
            (format!("id: {i}\ndata: event {i}\n\n"), i.to_le_bytes()),
            i,
        ))
    });
    (
        [
            (CONTENT_TYPE, "text/event-stream"),
            (CACHE_CONTROL, "no-cache"),
        ],
        Resumable::new(items),
    )
}

/// Panics: a request that kills its worker every time.
async fn crash() -> &'static str {
    panic!("/crash asked for it");
}

/// Work that must not run twice: declared before it starts, then it never
/// finishes (until the worker is killed).
async fn once(handle: Handle) -> Result<&'static str, StatusCode> {
    handle
        .replay_policy(ReplayPolicy::Error)
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    std::future::pending::<()>().await;
    Ok("done\n")
}

/// Work that must not run twice, declared so by its route's layer; never
/// finishes (until the worker is killed).
async fn pay() -> &'static str {
    std::future::pending::<()>().await;
    "paid\n"
}

/// The application: plain axum.
fn app(test_routes: bool, rooms: Arc<Rooms>) -> Router {
    let router = if test_routes {
        Router::new()
            .route("/crash", get(crash))
            .route("/once", get(once))
            .route(
                "/pay",
                post(pay).layer(ReplayPolicyLayer::new(ReplayPolicy::Error)),
            )
    } else {
        Router::new()
    };
    router
        .route("/hello", get(hello))
        .route("/big", get(big))
        .route("/echo", post(echo))
        .route("/events", get(events))
        .route("/ws/{room}", get(ws_room).with_state(rooms))
        // The adapter's own limit applies (16 MiB); axum's 2 MiB default
        // would refuse the larger bodies it accepts.
        .layer(axum::extract::DefaultBodyLimit::disable())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    FAULT.get_or_init(|| args.fault);
    std::fs::create_dir_all(&args.data_dir)?;
    let rooms = Arc::new(Rooms {
        dir: args.data_dir.clone(),
        open: Mutex::default(),
    });
    let opts = if args.member_v2 {
        MEMBER_V2.store(true, std::sync::atomic::Ordering::Relaxed);
        holdfast::Options::new()
            .state_version(2)
            .reads_state_versions(1..=2)
    } else {
        holdfast::Options::new()
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(
            holdfast_tls::TlsAcceptor::from_pem_files(c, k, holdfast_http::ALPN).with_context(
                || format!("TLS certificate {} / key {}", c.display(), k.display()),
            )?,
        ),
        _ => None,
    };
    let listener = holdfast::tokio::Listener::bind_with(&args.listen, &opts).await?;
    for a in listener.local_addrs() {
        eprintln!("hf-chat listening on {a}");
    }
    let app = app(args.test_routes, rooms);
    match tls {
        Some(tls) => holdfast_http::serve_tls(listener, tls, app).await?,
        None => holdfast_http::serve(listener, app).await?,
    }
    Ok(())
}
