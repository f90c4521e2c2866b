//! hf-chat: an axum application served zero-loss by `holdfast-http`, written
//! only against the public adapter — the proof and the example.
//!
//! - `GET /hello?n=N` → `200 text/plain`, `hello N\n`;
//! - `GET /big` → `200 application/octet-stream`, 2,097,152 bytes, byte
//!   `i` = `i mod 251`;
//! - `POST /echo` → `200` with the request body.
//!
//! With `--test-routes`, two more for the tests of the adapter's failure
//! handling: `GET /crash` panics (under a keeper that ends the worker; the
//! request comes back as poison and gets the adapter's `500`), and
//! `GET /once` declares that it must not run twice, then never answers (a
//! test kills the worker; the next one answers `500` instead of running it);
//! `POST /pay` is the same with its policy set by `ReplayPolicyLayer`.
//!
//! `hf-chat --listen ADDR` runs alone (pass-through); `holdfast run --listen
//! ADDR -- hf-chat` runs it under the keeper.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::body::Bytes;
use axum::extract::Query;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use holdfast::ReplayPolicy;
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
fn app(test_routes: bool) -> Router {
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
    let listener = holdfast::tokio::Listener::bind(&args.listen).await?;
    for a in listener.local_addrs() {
        eprintln!("hf-chat listening on {a}");
    }
    holdfast_http::serve(listener, app(args.test_routes)).await?;
    Ok(())
}
