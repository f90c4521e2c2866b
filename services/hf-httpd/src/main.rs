//! hf-httpd: an HTTP/1.1 static-file server on the holdfast library.
//!
//! Under `holdfast run` every connection survives a crash of this process:
//! requests in flight are answered again by the next worker, and a large
//! file is sent in pieces with a commit after each, so a download cut by a
//! crash resumes from the last piece instead of starting over. Run alone
//! (`--listen ADDR`) it is an ordinary web server: the same binary, used to
//! measure what holdfast costs.
//!
//! What makes its output replayable: the `Date` header comes from a recorded
//! clock value, everything else from the request and the file.

#![forbid(unsafe_code)]

mod http;
mod site;

use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use holdfast::tokio::{Conn, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use http::{Head, Method, Parse, Status};

/// Files up to this size go out in one write with one commit; larger ones in
/// pieces of this size, each followed by a commit that records the offset.
const PIECE: usize = 256 * 1024;
/// Version of the state blob below.
const STATE_V1: u16 = 1;

#[derive(Parser)]
#[command(
    name = "hf-httpd",
    version,
    about = "HTTP/1.1 static-file server on the holdfast library"
)]
struct Args {
    /// Directory to serve.
    #[arg(long, value_name = "DIR", required_unless_present = "demo_site")]
    root: Option<PathBuf>,
    /// Write the built-in sample site into DIR (if not there yet) and serve it.
    #[arg(long, value_name = "DIR", conflicts_with = "root")]
    demo_site: Option<PathBuf>,
    /// Address to listen on when run without holdfast (ignored under the keeper).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// The `Server` header's value (e.g. to tell versions apart during an upgrade).
    #[arg(long, default_value = "hf-httpd", value_name = "NAME")]
    server_name: String,
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
            eprintln!("hf-httpd: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let _ = http::SERVER_NAME.set(args.server_name.clone());
    let root = match (&args.root, &args.demo_site) {
        (_, Some(dir)) => {
            if !dir.join("big.bin").exists() {
                site::write_sample_site(dir)
                    .with_context(|| format!("writing the sample site to {}", dir.display()))?;
            }
            dir.clone()
        }
        (Some(r), None) => r.clone(),
        (None, None) => anyhow::bail!("--root DIR is required"),
    };
    let root = root
        .canonicalize()
        .with_context(|| format!("document root {}", root.display()))?;
    if !root.is_dir() {
        anyhow::bail!("document root {} is not a directory", root.display());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.into())
        .enable_all()
        .build()?;
    rt.block_on(serve(Arc::new(root), args.listen))
}

async fn serve(root: Arc<PathBuf>, listen: Vec<SocketAddr>) -> anyhow::Result<()> {
    let mut listener = Listener::bind(&listen).await?;
    match listener.mode() {
        holdfast::Mode::Kept(id) => {
            tracing::info!(worker = id.worker_id, generation = id.generation, root = %root.display(), "serving under holdfast")
        }
        holdfast::Mode::PassThrough => {
            for a in listener.local_addrs() {
                tracing::info!(listen = %a, root = %root.display(), "serving without holdfast");
            }
        }
    }
    while let Some(conn) = listener.accept().await? {
        let root = root.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, &root).await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    Ok(())
}

/// A file response in progress, saved at each commit so a new worker
/// continues it.
struct Resume {
    offset: u64,
    size: u64,
    mtime: u64,
    keep_alive: bool,
    path: PathBuf,
}

impl Resume {
    fn encode(&self) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let p = self.path.as_os_str().as_bytes();
        let mut v = Vec::with_capacity(25 + p.len());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.mtime.to_le_bytes());
        v.push(u8::from(self.keep_alive));
        v.extend_from_slice(p);
        (v.len() <= holdfast::MAX_STATE).then_some(v)
    }

    fn decode(b: &[u8]) -> Option<Resume> {
        use std::os::unix::ffi::OsStrExt;
        let u = |i: usize| {
            b.get(i..i + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
        };
        Some(Resume {
            offset: u(0)?,
            size: u(8)?,
            mtime: u(16)?,
            keep_alive: *b.get(24)? != 0,
            path: PathBuf::from(std::ffi::OsStr::from_bytes(b.get(25..)?)),
        })
    }
}

async fn handle(mut c: Conn, root: &Path) -> std::io::Result<()> {
    // The tail of a file sent in pieces is a short segment: without
    // NODELAY it waits for the client's delayed ACK (~40 ms).
    let _ = c.set_nodelay(true);
    let (version, state) = c.state();
    if !state.is_empty() {
        let r = (version == STATE_V1)
            .then(|| Resume::decode(state))
            .flatten();
        let Some(r) = r else {
            tracing::warn!(version, "unreadable state blob; closing connection");
            return Ok(());
        };
        if !send_pieces(&mut c, 0, r).await? {
            return Ok(());
        }
    }
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        match http::parse(&buf) {
            Parse::Incomplete => {
                buf.reserve(4096);
                if c.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
            }
            Parse::Complete { req, len } => {
                let keep = if c.poisoned() {
                    // This request was being served during two crashes in a
                    // row: answer 500 instead of serving it a third time.
                    let to = ErrorTo {
                        keep_alive: req.keep_alive,
                        http10: req.http10,
                        body: req.method == Method::Get,
                    };
                    error_reply(&mut c, Status::InternalError, to, len).await?;
                    req.keep_alive
                } else {
                    respond(&mut c, root, &req, len).await?
                };
                buf.drain(..len);
                if !keep {
                    return Ok(());
                }
            }
            Parse::Error { status, len, close } => {
                let len = len.min(buf.len());
                let to = ErrorTo {
                    keep_alive: !close,
                    http10: false,
                    body: true,
                };
                error_reply(&mut c, status, to, len).await?;
                buf.drain(..len);
                if close {
                    return Ok(());
                }
            }
        }
    }
}

/// How an error page answers: whether the connection stays open, the
/// request's HTTP version, and whether a body goes with it (not for HEAD).
struct ErrorTo {
    keep_alive: bool,
    http10: bool,
    body: bool,
}

/// Answers with an error page for `status` and commits `len` request bytes.
async fn error_reply(c: &mut Conn, status: Status, to: ErrorTo, len: usize) -> std::io::Result<()> {
    let date = c.now()?;
    let body = http::error_body(status);
    let mut out = Vec::with_capacity(256 + body.len());
    http::write_head(
        &Head {
            status,
            date_unix_secs: date,
            content_length: body.len() as u64,
            content_type: Some("text/html; charset=utf-8"),
            last_modified_unix_secs: None,
            keep_alive: to.keep_alive,
            http10: to.http10,
            extra: &[],
        },
        &mut out,
    );
    if to.body {
        out.extend_from_slice(&body);
    }
    c.write_all(&out).await?;
    finish(c, len, to.keep_alive).await
}

/// Commits a request's `consumed` bytes; for the last answer on the
/// connection, commits and closes in one step (see `commit_and_close`).
async fn finish(c: &mut Conn, consumed: usize, keep_alive: bool) -> std::io::Result<()> {
    if keep_alive {
        c.commit(consumed, &[]).await
    } else {
        c.commit_and_close(consumed).await
    }
}

/// Answers one request; returns whether the connection stays open.
async fn respond(
    c: &mut Conn,
    root: &Path,
    req: &http::Request,
    len: usize,
) -> std::io::Result<bool> {
    let file = http::resolve(root, &req.target).and_then(|p| {
        let f = std::fs::File::open(&p).map_err(|_| Status::NotFound)?;
        let m = f.metadata().map_err(|_| Status::NotFound)?;
        Ok((p, f, m))
    });
    let to = ErrorTo {
        keep_alive: req.keep_alive,
        http10: req.http10,
        body: req.method == Method::Get,
    };
    let (path, f, meta) = match file {
        Ok(x) => x,
        Err(status) => {
            error_reply(c, status, to, len).await?;
            return Ok(req.keep_alive);
        }
    };
    let date = c.now()?;
    let size = meta.len();
    let mtime = u64::try_from(meta.mtime()).unwrap_or(0);
    let mut out = Vec::with_capacity(256 + size.min(PIECE as u64) as usize);
    http::write_head(
        &Head {
            status: Status::Ok,
            date_unix_secs: date,
            content_length: size,
            content_type: Some(http::content_type(&path)),
            last_modified_unix_secs: Some(mtime),
            keep_alive: req.keep_alive,
            http10: req.http10,
            extra: &[],
        },
        &mut out,
    );
    if req.method == Method::Head || size == 0 {
        c.write_all(&out).await?;
        finish(c, len, req.keep_alive).await?;
        return Ok(req.keep_alive);
    }
    if size <= PIECE as u64 {
        let head_len = out.len();
        out.resize(head_len + size as usize, 0);
        f.read_exact_at(&mut out[head_len..], 0)?;
        c.write_all(&out).await?;
        finish(c, len, req.keep_alive).await?;
        return Ok(req.keep_alive);
    }
    c.write_all(&out).await?;
    send_pieces(
        c,
        len,
        Resume {
            offset: 0,
            size,
            mtime,
            keep_alive: req.keep_alive,
            path,
        },
    )
    .await
}

/// Sends a file from `r.offset` in pieces, committing after each with the
/// new offset as state; `consumed` request bytes are committed with the
/// first piece. Returns whether the connection stays open.
async fn send_pieces(c: &mut Conn, mut consumed: usize, mut r: Resume) -> std::io::Result<bool> {
    let f = std::fs::File::open(&r.path)?;
    let meta = f.metadata()?;
    if meta.len() != r.size || u64::try_from(meta.mtime()).unwrap_or(0) != r.mtime {
        // The file changed under an interrupted download: the bytes the
        // client has and the rest would not belong together.
        tracing::warn!(path = %r.path.display(), "file changed during an interrupted download; closing connection");
        return Ok(false);
    }
    let mut piece = vec![0u8; PIECE];
    while r.offset < r.size {
        let n = (r.size - r.offset).min(PIECE as u64) as usize;
        f.read_exact_at(&mut piece[..n], r.offset)?;
        c.write_all(&piece[..n]).await?;
        r.offset += n as u64;
        // A path too long for the state blob gets no intermediate commits:
        // a crash then regenerates the file from the start.
        if let Some(state) = r.encode().filter(|_| r.offset < r.size) {
            c.commit_versioned(consumed, STATE_V1, &state).await?;
            consumed = 0;
        }
    }
    finish(c, consumed, r.keep_alive).await?;
    Ok(r.keep_alive)
}
