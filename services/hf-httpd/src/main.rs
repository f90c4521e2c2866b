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
//!
//! With `--cgi-dir DIR` it runs the programs in DIR at `/cgi-bin/NAME`
//! (CGI/1.1), each exactly once per request even when a worker dies while
//! the program runs: see the `cgi` module.
//!
//! With `--tls-cert FILE --tls-key FILE` it serves HTTPS (ALPN http/1.1)
//! through holdfast-tls: TLS 1.3 sessions, handshakes included, survive
//! the worker like plain connections (docs/tls.md).

#![forbid(unsafe_code)]

mod cgi;
mod conn;
mod http;
pub mod site;

use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use conn::HfConn;
use holdfast::tokio::Listener;
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
    /// Milliseconds a request head may take from its first byte to its
    /// end; a slower one gets 408 and the connection closes (0 = no limit).
    /// An idle keep-alive connection is not timed.
    #[arg(long = "header-timeout", value_name = "MS", default_value_t = 60_000)]
    header_timeout_ms: u64,
    /// Run the executables in DIR as CGI programs at /cgi-bin/NAME.
    #[arg(long, value_name = "DIR")]
    cgi_dir: Option<PathBuf>,
    /// Largest request body a CGI program is given (bytes; larger: 413).
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20)]
    cgi_max_body: u64,
    /// Fault injection for tests: POINT:FILE aborts the process once at
    /// POINT (cgi-before-spawn, cgi-after-spawn), when FILE does not exist
    /// yet (it is created first).
    #[arg(long, value_name = "POINT:FILE", hide = true)]
    fault: Option<String>,
    /// For measurements: no commits inside a file answer, so a crash
    /// replays it from its first byte instead of resuming it.
    #[arg(long, hide = true)]
    no_resume: bool,
    /// Serve HTTPS with this PEM certificate chain (ALPN http/1.1): TLS 1.3
    /// sessions survive the worker like plain connections (holdfast-tls);
    /// TLS 1.2 is served, but closed if its worker dies.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// `--no-resume` (see [`Args`]).
static NO_RESUME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

static FAULT: std::sync::OnceLock<(String, PathBuf)> = std::sync::OnceLock::new();

/// Aborts here if `--fault` names this point and has not fired yet.
pub(crate) fn fault(point: &str) {
    if let Some((p, file)) = FAULT.get() {
        if p == point
            && std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(file)
                .is_ok()
        {
            tracing::warn!(point, "injected fault: aborting");
            std::process::abort();
        }
    }
}

/// What every connection shares.
struct Ctx {
    root: PathBuf,
    cgi: Option<cgi::Cgi>,
    /// A request head must be complete this long after its first byte.
    header_timeout: Option<std::time::Duration>,
    /// `--tls-cert`: connections speak HTTPS.
    tls: Option<holdfast_tls::TlsAcceptor>,
}

/// The `hf-httpd` command, with `args` as `std::env::args_os()` gives them
/// (the program name first).
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse_from(args);
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
    NO_RESUME.store(args.no_resume, std::sync::atomic::Ordering::Relaxed);
    if let Some(f) = &args.fault {
        let (point, file) = f.split_once(':').context("--fault takes POINT:FILE")?;
        let _ = FAULT.set((point.to_owned(), PathBuf::from(file)));
    }
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
    let cgi = match &args.cgi_dir {
        Some(dir) => {
            let dir = dir
                .canonicalize()
                .with_context(|| format!("CGI directory {}", dir.display()))?;
            if !dir.is_dir() {
                anyhow::bail!("CGI directory {} is not a directory", dir.display());
            }
            Some(cgi::Cgi {
                dir,
                max_body: args.cgi_max_body,
            })
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.into())
        .enable_all()
        .build()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(
            holdfast_tls::TlsAcceptor::from_pem_files(c, k, &[b"http/1.1"]).with_context(|| {
                format!("TLS certificate {} / key {}", c.display(), k.display())
            })?,
        ),
        _ => None,
    };
    let header_timeout = (args.header_timeout_ms > 0)
        .then(|| std::time::Duration::from_millis(args.header_timeout_ms));
    rt.block_on(serve(
        Arc::new(Ctx {
            root,
            cgi,
            header_timeout,
            tls,
        }),
        args.listen,
    ))
}

async fn serve(ctx: Arc<Ctx>, listen: Vec<SocketAddr>) -> anyhow::Result<()> {
    // State blobs: version 1 is a file download in pieces, version 2 a CGI
    // response in progress.
    let opts = holdfast::Options::new().reads_state_versions(STATE_V1..=cgi::STATE_CGI);
    let mut listener = Listener::bind_with(&listen, &opts).await?;
    let root = ctx.root.display();
    let cgi = ctx.cgi.as_ref().map(|c| c.dir.display().to_string());
    match listener.mode() {
        holdfast::Mode::Kept(id) => {
            tracing::info!(worker = id.worker_id, generation = id.generation, %root, ?cgi, "serving under holdfast")
        }
        holdfast::Mode::PassThrough => {
            for a in listener.local_addrs() {
                tracing::info!(listen = %a, %root, ?cgi, "serving without holdfast");
            }
        }
    }
    while let Some(conn) = listener.accept().await? {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let r = match &ctx.tls {
                None => handle(conn, &ctx).await,
                // A handshake gets the time a request head gets: a client
                // that stalls in it is not kept forever.
                Some(tls) => {
                    let accepted = match ctx.header_timeout {
                        Some(limit) => tokio::time::timeout(limit, tls.accept(conn))
                            .await
                            .unwrap_or_else(|_| {
                                Err(std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    "TLS handshake not done within the header timeout",
                                ))
                            }),
                        None => tls.accept(conn).await,
                    };
                    match accepted {
                        Ok(c) => handle(c, &ctx).await,
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = r {
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
        Some(v)
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

async fn handle(mut c: impl HfConn, ctx: &Ctx) -> std::io::Result<()> {
    let root = ctx.root.as_path();
    // The tail of a file sent in pieces is a short segment: without
    // NODELAY it waits for the client's delayed ACK (~40 ms).
    let _ = c.set_nodelay(true);
    let (version, state) = c.state();
    if !state.is_empty() {
        let keep = match version {
            STATE_V1 => match Resume::decode(state) {
                Some(r) => Some(send_pieces(&mut c, 0, r, None).await?),
                None => None,
            },
            cgi::STATE_CGI => match cgi::resumed(state) {
                Some(cgi::Resume::Running) => Some(cgi::continue_running(&mut c).await?),
                // The request is read again below and finds its program.
                Some(cgi::Resume::Launching) => Some(true),
                None => None,
            },
            _ => None,
        };
        match keep {
            Some(true) => {}
            Some(false) => return Ok(()),
            None => {
                tracing::warn!(version, "unreadable state blob; closing connection");
                return Ok(());
            }
        }
    }
    let cgi_prefix = ctx.cgi.as_ref().map(|_| cgi::PREFIX);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    // When the head being received started (slowloris defence).
    let mut head_since: Option<tokio::time::Instant> = None;
    loop {
        match http::parse_with(&buf, cgi_prefix) {
            Parse::Incomplete => {
                buf.reserve(4096);
                let n = match ctx.header_timeout.filter(|_| !buf.is_empty()) {
                    Some(limit) => {
                        let deadline =
                            *head_since.get_or_insert_with(tokio::time::Instant::now) + limit;
                        match tokio::time::timeout_at(deadline, c.read_buf(&mut buf)).await {
                            Ok(r) => r?,
                            Err(_) => {
                                tracing::info!(
                                    ms = limit.as_millis() as u64,
                                    bytes = buf.len(),
                                    "request head incomplete after the header timeout; closing"
                                );
                                let to = ErrorTo {
                                    keep_alive: false,
                                    http10: false,
                                    body: true,
                                };
                                return error_reply(&mut c, Status::RequestTimeout, to, buf.len())
                                    .await;
                            }
                        }
                    }
                    None => c.read_buf(&mut buf).await?,
                };
                if n == 0 {
                    return Ok(());
                }
            }
            Parse::Complete { req, len } => {
                head_since = None;
                let keep = if c.poisoned() {
                    // This request was being served during two crashes in a
                    // row: answer 500 instead of serving it a third time.
                    // An unread body ends the connection after the answer.
                    let r = http::Request {
                        keep_alive: req.keep_alive && req.content_length == 0,
                        ..req.clone()
                    };
                    reply_error(&mut c, Status::InternalError, &r, len).await?;
                    r.keep_alive
                } else if let (Some(cgi), true) = (&ctx.cgi, req.target.starts_with(cgi::PREFIX)) {
                    let Some(keep) = run_cgi(&mut c, cgi, &req, &mut buf, len).await? else {
                        return Ok(());
                    };
                    keep
                } else {
                    respond(&mut c, root, &req, len).await?
                };
                buf.drain(..len);
                if !keep {
                    return Ok(());
                }
            }
            Parse::Error { status, len, close } => {
                head_since = None;
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
async fn error_reply(
    c: &mut impl HfConn,
    status: Status,
    to: ErrorTo,
    len: usize,
) -> std::io::Result<()> {
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

/// Answers `req` with an error page after consuming `consumed` bytes; a
/// request whose body is not consumed closes the connection.
pub(crate) async fn reply_error(
    c: &mut impl HfConn,
    status: Status,
    req: &http::Request,
    consumed: usize,
) -> std::io::Result<()> {
    let to = ErrorTo {
        keep_alive: req.keep_alive,
        http10: req.http10,
        body: req.method != Method::Head,
    };
    error_reply(c, status, to, consumed).await
}

/// A request for a CGI program: reads its body, then runs it (or, after a
/// crash, finds it running). Takes the head and body out of `buf` but for
/// `len` bytes, which the caller drains; `None` when the connection ends.
async fn run_cgi(
    c: &mut impl HfConn,
    cgi: &cgi::Cgi,
    req: &http::Request,
    buf: &mut Vec<u8>,
    len: usize,
) -> std::io::Result<Option<bool>> {
    let body_len = req.content_length;
    let refuse = |status: Status| {
        // The body is not read: the connection cannot go on after it.
        let closing = http::Request {
            keep_alive: req.keep_alive && body_len == 0,
            ..req.clone()
        };
        (status, closing)
    };
    let script = match cgi::locate(&cgi.dir, &req.target) {
        Ok(s) if body_len <= cgi.max_body => s,
        Ok(_) => {
            let (st, r) = refuse(Status::PayloadTooLarge);
            reply_error(c, st, &r, len).await?;
            return Ok(r.keep_alive.then_some(true));
        }
        Err(status) => {
            let (st, r) = refuse(status);
            reply_error(c, st, &r, len).await?;
            return Ok(r.keep_alive.then_some(true));
        }
    };
    let total = len + body_len as usize;
    while buf.len() < total {
        buf.reserve((total - buf.len()).min(1 << 20));
        if c.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
    let keep = cgi::respond(c, cgi, &script, req, &buf[..len], &buf[len..total], total).await?;
    buf.drain(len..total);
    Ok(keep.then_some(true))
}

/// Commits a request's `consumed` bytes; for the last answer on the
/// connection, commits and closes in one step (see `commit_and_close`).
async fn finish(c: &mut impl HfConn, consumed: usize, keep_alive: bool) -> std::io::Result<()> {
    if keep_alive {
        c.commit(consumed, &[]).await
    } else {
        c.commit_and_close(consumed).await
    }
}

/// Answers one request; returns whether the connection stays open.
async fn respond(
    c: &mut impl HfConn,
    root: &Path,
    req: &http::Request,
    len: usize,
) -> std::io::Result<bool> {
    let file = http::resolve(root, &req.target).and_then(|p| {
        let f = std::fs::File::open(&p).map_err(|e| open_failed(&e))?;
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
    // The answer is a function of the recorded date and the file: with the
    // file's identity recorded too, a replay after a crash is the same
    // bytes by construction, so it is not checksummed (the CRC would cost
    // ~0.1 µs per KiB). A file changed since the first run ends the
    // connection instead of splicing two versions.
    let first = c.record(|| [size.to_le_bytes(), mtime.to_le_bytes()].concat())?;
    if first[..] != [size.to_le_bytes(), mtime.to_le_bytes()].concat()[..] {
        tracing::warn!(path = %path.display(), "file changed under a replayed answer; closing connection");
        return Ok(false);
    }
    c.skip_output_check();
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
        Some(f),
    )
    .await
}

/// The answer to a file that resolved but could not be opened: a lack of
/// resources (no free descriptor, no memory) passes, so it is 503 — the
/// file is there, and a 404 would tell the client otherwise — and anything
/// else is 404 as before.
fn open_failed(e: &std::io::Error) -> Status {
    let scarce = [
        rustix::io::Errno::MFILE,
        rustix::io::Errno::NFILE,
        rustix::io::Errno::NOMEM,
    ];
    match rustix::io::Errno::from_io_error(e) {
        Some(errno) if scarce.contains(&errno) => {
            tracing::warn!(error = %e, "cannot open a file for lack of resources; answering 503");
            Status::ServiceUnavailable
        }
        _ => Status::NotFound,
    }
}

/// Sends a file from `r.offset` in pieces, committing after each with the
/// new offset as state; `consumed` request bytes are committed with the
/// first piece. `f` is the file if the caller has it open already (one
/// descriptor per answer, not two). Returns whether the connection stays
/// open.
async fn send_pieces(
    c: &mut impl HfConn,
    mut consumed: usize,
    mut r: Resume,
    f: Option<std::fs::File>,
) -> std::io::Result<bool> {
    let f = match f {
        Some(f) => f,
        None => std::fs::File::open(&r.path)?,
    };
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
        // The file is the one of the state blob (size and mtime checked
        // above): its bytes need no checksum.
        c.skip_output_check();
        c.write_all(&piece[..n]).await?;
        r.offset += n as u64;
        // A path too long for the state blob gets no intermediate commits:
        // a crash then regenerates the file from the start.
        let resume = !NO_RESUME.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(state) = r
            .encode()
            .filter(|s| r.offset < r.size && resume && s.len() <= c.max_state())
        {
            c.commit_versioned(consumed, STATE_V1, &state).await?;
            consumed = 0;
        }
    }
    finish(c, consumed, r.keep_alive).await?;
    Ok(r.keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_cannot_be_opened_for_lack_of_resources_is_503_not_404() {
        let err =
            |errno: rustix::io::Errno| std::io::Error::from_raw_os_error(errno.raw_os_error());
        for scarce in [
            rustix::io::Errno::MFILE,
            rustix::io::Errno::NFILE,
            rustix::io::Errno::NOMEM,
        ] {
            assert_eq!(open_failed(&err(scarce)), Status::ServiceUnavailable);
        }
        assert_eq!(
            open_failed(&err(rustix::io::Errno::NOENT)),
            Status::NotFound
        );
        assert_eq!(Status::ServiceUnavailable.code(), 503);
    }
}
