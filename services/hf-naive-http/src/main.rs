//! hf-naive-http: hf-chat's `/hello`, `/big` and `/echo` served the way a
//! new user first tries — hyper straight on `holdfast::tokio::Conn`. It
//! compiles and serves, but nothing commits, hyper writes its own `Date` and
//! reads ahead, so a crash replays each connection's whole history and
//! the replay differs. It exists so a test can show that this is not enough
//! and that `holdfast-http` is needed; do not copy it.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::Query;
use axum::routing::{get, post};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

#[derive(serde::Deserialize)]
struct Hello {
    n: u64,
}

fn app() -> Router {
    Router::new()
        .route(
            "/hello",
            get(|Query(q): Query<Hello>| async move { format!("hello {}\n", q.n) }),
        )
        .route(
            "/big",
            get(|| async {
                Bytes::from(
                    (0..2 * 1024 * 1024)
                        .map(|i| (i % 251) as u8)
                        .collect::<Vec<u8>>(),
                )
            }),
        )
        .route("/echo", post(|body: Bytes| async move { body }))
        .layer(axum::extract::DefaultBodyLimit::disable())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let mut listener = holdfast::tokio::Listener::bind(&addrs).await?;
    let service = TowerToHyperService::new(app());
    while let Some(conn) = listener.accept().await? {
        let service = service.clone();
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service)
                .await;
        });
    }
    Ok(())
}
