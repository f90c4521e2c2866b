//! hf-chat: an axum application served zero-loss by `holdfast-http`, written
//! only against the public adapter — the proof and the example.
//!
//! - `GET /hello?n=N` → `200 text/plain`, `hello N\n`;
//! - `GET /big` → `200 application/octet-stream`, 2,097,152 bytes, byte
//!   `i` = `i mod 251`;
//! - `POST /echo` → `200` with the request body.
//!
//! `hf-chat --listen ADDR` runs alone (pass-through); `holdfast run --listen
//! ADDR -- hf-chat` runs it under the keeper.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::body::Bytes;
use axum::extract::Query;
use axum::http::header::CONTENT_TYPE;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use serde::Deserialize;

/// Length of `/big`.
const BIG_LEN: usize = 2 * 1024 * 1024;

#[derive(Parser)]
#[command(about = "An axum chat service under holdfast")]
struct Args {
    /// Addresses to listen on without a keeper (ignored under one).
    #[arg(long)]
    listen: Vec<SocketAddr>,
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

/// The application: plain axum.
fn app() -> Router {
    Router::new()
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
    holdfast_http::serve(listener, app()).await?;
    Ok(())
}
