//! CGI/1.1 (RFC 3875): programs in `--cgi-dir` answer `/cgi-bin/NAME`.
//!
//! # Exactly once, whatever crashes
//!
//! A CGI program may have side effects (it appends to a file, it charges a
//! card), so it must run exactly once per request even when the web server
//! is killed while it runs. Three things make that so:
//!
//! - The program's output goes through a pipe into a spool
//!   ([`holdfast::held::PipeSpool`]); both are *held channels*, so the
//!   program keeps a reader when the worker dies and the next worker
//!   finds every byte it wrote, at the offset it was written.
//! - The channels are held and the connection's state says `Launching`
//!   before the program starts; the program writes a marker byte right
//!   before `exec` ([`holdfast::held::mark_start`]). A worker that finds
//!   `Launching` after a crash looks at the pipe: the marker means the
//!   program runs (continue with its output), an empty pipe whose writers
//!   are gone means it never started (start it now).
//! - Once it runs, the request is committed with a `Running` state: the
//!   spool offset relayed so far and how the response is framed. Output is
//!   committed after every piece, and the size of each chunk is recorded
//!   ([`holdfast::tokio::Conn::record`]), so a worker taking over regenerates
//!   the uncommitted piece byte for byte and goes on from there.
//!
//! The request body goes to the program's standard input through a memfd,
//! read in full before the program starts (`CONTENT_LENGTH` is exact).

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::conn::HfConn;
use holdfast::held::PipeSpool;
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;

use crate::http::{self, Method, Request, Status};

/// Where `/cgi-bin/NAME` is looked up.
pub const PREFIX: &str = "/cgi-bin/";
/// State blob version of a CGI response in progress (version 1 is a file
/// download in pieces).
pub const STATE_CGI: u16 = 2;
/// Held channel tags.
const TAG_PIPE: u32 = 1;
const TAG_SPOOL: u32 = 2;
/// The byte a program writes right before `exec`.
const MARKER: u8 = b'!';
/// The CGI response head (its header lines) must fit in this.
const MAX_CGI_HEAD: usize = 16 * 1024;
/// Largest piece relayed between two commits.
const PIECE: usize = 64 * 1024;

/// The CGI configuration.
pub struct Cgi {
    /// Canonical directory of the programs.
    pub dir: PathBuf,
    /// Largest request body accepted.
    pub max_body: u64,
}

/// A request's program and the parts of its target CGI names.
#[derive(Debug, PartialEq, Eq)]
pub struct Script {
    pub path: PathBuf,
    /// `/cgi-bin/NAME`.
    pub script_name: String,
    /// Decoded rest of the path after the name (`/a/b`), or empty.
    pub path_info: String,
    /// The raw query string (after `?`), or empty.
    pub query: String,
}

/// Finds the program a `/cgi-bin/...` target names. Only plain names directly
/// in the directory, and only executable regular files, run.
pub fn locate(dir: &Path, target: &str) -> Result<Script, Status> {
    let rest = target.strip_prefix(PREFIX).ok_or(Status::NotFound)?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (name, info) = match path.find('/') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    let name = String::from_utf8(http::percent_decode(name.as_bytes()).ok_or(Status::BadRequest)?)
        .map_err(|_| Status::BadRequest)?;
    if name.is_empty() || name.starts_with('.') || name.contains('/') {
        return Err(Status::NotFound);
    }
    let path_info =
        String::from_utf8(http::percent_decode(info.as_bytes()).ok_or(Status::BadRequest)?)
            .map_err(|_| Status::BadRequest)?;
    let real = http::contained(dir, &dir.join(&name))?;
    let meta = std::fs::metadata(&real).map_err(|_| Status::NotFound)?;
    if !meta.is_file() {
        return Err(Status::NotFound);
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(Status::Forbidden);
    }
    Ok(Script {
        path: real,
        script_name: format!("{PREFIX}{name}"),
        path_info,
        query: query.to_owned(),
    })
}

/// The meta-variables of RFC 3875 section 4.1, and `HTTP_*` for the request
/// headers (credentials excepted).
pub fn environment(
    script: &Script,
    req: &Request,
    head: &[u8],
    peer: Option<SocketAddr>,
) -> Vec<(String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let _ = parsed.parse(head);
    let mut env = vec![
        ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
        ("SERVER_SOFTWARE".into(), "hf-httpd".into()),
        (
            "SERVER_PROTOCOL".into(),
            if req.http10 { "HTTP/1.0" } else { "HTTP/1.1" }.into(),
        ),
        (
            "REQUEST_METHOD".into(),
            match req.method {
                Method::Get => "GET",
                Method::Head => "HEAD",
                Method::Post => "POST",
            }
            .into(),
        ),
        ("SCRIPT_NAME".into(), script.script_name.clone()),
        ("QUERY_STRING".into(), script.query.clone()),
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
    ];
    if !script.path_info.is_empty() {
        env.push(("PATH_INFO".into(), script.path_info.clone()));
    }
    if let Some(p) = peer {
        env.push(("REMOTE_ADDR".into(), p.ip().to_string()));
        env.push(("REMOTE_PORT".into(), p.port().to_string()));
    }
    if req.content_length > 0 || req.method == Method::Post {
        env.push(("CONTENT_LENGTH".into(), req.content_length.to_string()));
    }
    let (mut host, mut port) = ("localhost".to_owned(), "80".to_owned());
    for h in parsed.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            continue;
        };
        let name = h.name.to_ascii_uppercase().replace('-', "_");
        match name.as_str() {
            "CONTENT_TYPE" => env.push(("CONTENT_TYPE".into(), value.into())),
            "CONTENT_LENGTH" | "AUTHORIZATION" | "PROXY_AUTHORIZATION" => {}
            _ => {
                if name == "HOST" {
                    match value.rsplit_once(':') {
                        Some((h, p)) if !h.ends_with(']') || value.starts_with('[') => {
                            (host, port) = (h.to_owned(), p.to_owned())
                        }
                        _ => host = value.to_owned(),
                    }
                }
                if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    env.push((format!("HTTP_{name}"), value.into()));
                }
            }
        }
    }
    env.push(("SERVER_NAME".into(), host));
    env.push(("SERVER_PORT".into(), port));
    env
}

/// A CGI program's response head (RFC 3875 section 6).
#[derive(Debug, PartialEq, Eq)]
pub enum CgiHead {
    Incomplete,
    Invalid(&'static str),
    Complete {
        status: u16,
        reason: String,
        /// Headers to pass on (hop-by-hop ones and `Status` removed).
        headers: Vec<(String, String)>,
        content_length: Option<u64>,
        /// Bytes of the head, blank line included.
        len: usize,
    },
}

/// Parses the header lines a CGI program writes before its body.
pub fn parse_head(buf: &[u8]) -> CgiHead {
    let mut raw = [httparse::EMPTY_HEADER; 64];
    let (len, lines) = match httparse::parse_headers(buf, &mut raw) {
        Ok(httparse::Status::Complete((len, lines))) => (len, lines),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_CGI_HEAD => {
            return CgiHead::Invalid("response head too large")
        }
        Ok(httparse::Status::Partial) => return CgiHead::Incomplete,
        Err(_) => return CgiHead::Invalid("malformed response head"),
    };
    let (mut status, mut reason) = (None, String::new());
    let (mut location, mut typed, mut content_length) = (false, false, None);
    let mut headers = Vec::new();
    for h in lines.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            return CgiHead::Invalid("header value is not text");
        };
        let value = value.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("status") {
            let (code, why) = value.split_once(' ').unwrap_or((value, ""));
            match code.parse::<u16>() {
                Ok(c) if (100..=999).contains(&c) && code.len() == 3 => status = Some(c),
                _ => return CgiHead::Invalid("bad Status header"),
            }
            reason = why.trim().to_owned();
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<u64>() {
                Ok(n) => content_length = Some(n),
                Err(_) => return CgiHead::Invalid("bad Content-Length"),
            }
            continue;
        }
        location |= name.eq_ignore_ascii_case("location");
        typed |= name.eq_ignore_ascii_case("content-type");
        const HOP: [&str; 6] = [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "date",
            "server",
            "upgrade",
        ];
        if HOP.iter().any(|n| name.eq_ignore_ascii_case(n)) {
            continue;
        }
        headers.push((name.to_owned(), value.to_owned()));
    }
    if !location && !typed && status.is_none() {
        return CgiHead::Invalid("no Content-Type, Location or Status");
    }
    // A Location without a Status is a redirect (a local one is answered
    // as a redirect too, not followed).
    let status = status.unwrap_or(if location { 302 } else { 200 });
    if reason.is_empty() {
        reason = default_reason(status).into();
    }
    CgiHead::Complete {
        status,
        reason,
        headers,
        content_length,
        len,
    }
}

fn default_reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// How the body goes to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// The program said how long it is: relayed as is, this much left.
    Length(u64),
    /// HTTP/1.1 without a length: chunked.
    Chunked,
    /// HTTP/1.0 without a length: until the connection closes.
    Close,
}

/// A CGI response in progress: the state blob of each of its commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Channels held, the program may or may not have started; the request
    /// is not committed yet.
    Launching,
    /// The program runs and the request is committed.
    Running(Run),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// Spool offset relayed (or skipped) so far.
    pos: u64,
    /// `None` until the response head went out.
    framing: Option<Framing>,
    keep_alive: bool,
    http10: bool,
    head_only: bool,
}

impl Stage {
    fn encode(&self) -> Vec<u8> {
        match self {
            Stage::Launching => vec![1],
            Stage::Running(r) => {
                let mut v = vec![2];
                v.extend_from_slice(&r.pos.to_le_bytes());
                let (kind, left) = match r.framing {
                    None => (0, 0),
                    Some(Framing::Length(n)) => (1, n),
                    Some(Framing::Chunked) => (2, 0),
                    Some(Framing::Close) => (3, 0),
                };
                v.push(kind);
                v.extend_from_slice(&left.to_le_bytes());
                v.push(
                    u8::from(r.keep_alive) | u8::from(r.http10) << 1 | u8::from(r.head_only) << 2,
                );
                v
            }
        }
    }

    fn decode(b: &[u8]) -> Option<Stage> {
        let u = |i: usize| b.get(i..i + 8)?.try_into().ok().map(u64::from_le_bytes);
        match b.first()? {
            1 if b.len() == 1 => Some(Stage::Launching),
            2 if b.len() == 19 => {
                let framing = match b[9] {
                    0 => None,
                    1 => Some(Framing::Length(u(10)?)),
                    2 => Some(Framing::Chunked),
                    3 => Some(Framing::Close),
                    _ => return None,
                };
                let flags = b[18];
                Some(Stage::Running(Run {
                    pos: u(1)?,
                    framing,
                    keep_alive: flags & 1 != 0,
                    http10: flags & 2 != 0,
                    head_only: flags & 4 != 0,
                }))
            }
            _ => None,
        }
    }
}

/// What a connection's state blob (version [`STATE_CGI`]) says to do first.
pub enum Resume {
    /// Relay the rest of a running program's output.
    Running,
    /// Read the request again: it goes to [`respond`], which finds out
    /// whether its program started.
    Launching,
}

/// Looks at a recovered connection's CGI state; `None` if it is unreadable.
pub fn resumed(state: &[u8]) -> Option<Resume> {
    match Stage::decode(state)? {
        Stage::Launching => Some(Resume::Launching),
        Stage::Running(_) => Some(Resume::Running),
    }
}

/// Carries on with a response a dead worker was relaying. Returns whether the
/// connection stays open.
pub async fn continue_running(c: &mut impl HfConn) -> io::Result<bool> {
    let Some(Stage::Running(run)) = Stage::decode(c.state().1) else {
        return Ok(false);
    };
    let Some(spool) = take_spool(c)? else {
        tracing::warn!("CGI response in progress but its channels are gone; closing");
        return Ok(false);
    };
    relay(c, spool, run).await
}

fn take_spool(c: &mut impl HfConn) -> io::Result<Option<PipeSpool>> {
    match (c.take_held(TAG_PIPE), c.take_held(TAG_SPOOL)) {
        (Some(p), Some(s)) => Ok(Some(PipeSpool::resume(p, s)?)),
        _ => Ok(None),
    }
}

/// Runs the program for `req` (unless a dead worker already started it) and
/// relays its response. `head` is the request head, `body` its body; the
/// request is `consumed` bytes of input. Returns whether the connection
/// stays open.
pub async fn respond(
    c: &mut impl HfConn,
    cgi: &Cgi,
    script: &Script,
    req: &Request,
    head: &[u8],
    body: &[u8],
    consumed: usize,
) -> io::Result<bool> {
    let run = Run {
        pos: 1,
        framing: None,
        keep_alive: req.keep_alive,
        http10: req.http10,
        head_only: req.method == Method::Head,
    };
    // A worker that died here left the channels: did it start the program?
    if let Some(mut spool) = take_spool(c)? {
        let mut pipe = readiness(&spool)?;
        while spool.is_empty() && !spool.eof() {
            wait(&mut pipe, &mut spool).await?;
        }
        if !spool.is_empty() {
            tracing::info!(script = %script.script_name, "CGI program already running; taking over its output");
            c.commit_versioned(consumed, STATE_CGI, &Stage::Running(run).encode())
                .await?;
            return relay(c, spool, run).await;
        }
        tracing::info!(script = %script.script_name, "CGI program was never started; starting it");
    }
    let (spool, out) = PipeSpool::new()?;
    hold(c, &spool)?;
    c.commit_versioned(0, STATE_CGI, &Stage::Launching.encode())
        .await?;
    crate::fault("cgi-before-spawn");
    match start(cgi, script, req, head, body, c.peer_addr().ok(), out) {
        Ok(()) => {}
        Err(e) => {
            tracing::warn!(script = %script.script_name, error = %e, "cannot start CGI program");
            let _ = c.unhold(TAG_PIPE);
            let _ = c.unhold(TAG_SPOOL);
            crate::reply_error(c, Status::InternalError, req, consumed).await?;
            return Ok(req.keep_alive);
        }
    }
    crate::fault("cgi-after-spawn");
    c.commit_versioned(consumed, STATE_CGI, &Stage::Running(run).encode())
        .await?;
    relay(c, spool, run).await
}

fn hold(c: &mut impl HfConn, spool: &PipeSpool) -> io::Result<()> {
    c.hold(TAG_PIPE, spool.pipe_fd())?;
    c.hold(TAG_SPOOL, spool.spool_fd())
}

/// Starts the program with the body on standard input and standard output
/// into the pipe; a thread reaps it when it ends.
fn start(
    cgi: &Cgi,
    script: &Script,
    req: &Request,
    head: &[u8],
    body: &[u8],
    peer: Option<SocketAddr>,
    out: OwnedFd,
) -> io::Result<()> {
    let input = rustix::fs::memfd_create("hf-httpd-cgi-body", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::io::write(&input, body).and_then(|n| {
        if n == body.len() {
            Ok(())
        } else {
            Err(rustix::io::Errno::IO)
        }
    })?;
    rustix::fs::seek(&input, rustix::fs::SeekFrom::Start(0))?;
    let mut cmd = Command::new(&script.path);
    cmd.env_clear()
        .envs(environment(script, req, head, peer))
        .current_dir(&cgi.dir)
        .stdin(Stdio::from(input))
        .stdout(Stdio::from(out))
        .stderr(Stdio::inherit());
    holdfast::held::mark_start(&mut cmd, MARKER);
    // The program outlives this worker if it dies (its output pipe is a
    // held channel): it must not be in the worker's process group, which
    // the keeper kills with the worker.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn()?;
    let name = script.script_name.clone();
    std::thread::spawn(move || match child.wait() {
        Ok(st) if !st.success() => {
            tracing::info!(script = %name, status = %st, "CGI program ended")
        }
        _ => {}
    });
    Ok(())
}

fn readiness(spool: &PipeSpool) -> io::Result<AsyncFd<OwnedFd>> {
    holdfast::tokio::register(spool.pipe_fd().try_clone_to_owned()?)
}

/// Waits until the pipe has more for the spool, and moves it.
async fn wait(pipe: &mut AsyncFd<OwnedFd>, spool: &mut PipeSpool) -> io::Result<()> {
    if spool.fill()? > 0 || spool.eof() {
        return Ok(());
    }
    let mut guard = pipe.readable().await?;
    if spool.fill()? == 0 && !spool.eof() {
        guard.clear_ready();
    }
    Ok(())
}

/// Relays the program's output from `run.pos` on: the response head once
/// complete, then the body in pieces, a commit after each.
async fn relay(c: &mut impl HfConn, mut spool: PipeSpool, mut run: Run) -> io::Result<bool> {
    let mut pipe = readiness(&spool)?;
    spool.fill()?;
    let mut buf = vec![0u8; PIECE.max(MAX_CGI_HEAD)];
    loop {
        let avail = spool.len().saturating_sub(run.pos);
        let Some(framing) = run.framing else {
            let n = spool.read_at(run.pos, &mut buf[..MAX_CGI_HEAD])?;
            match parse_head(&buf[..n]) {
                CgiHead::Incomplete if !spool.eof() => wait(&mut pipe, &mut spool).await?,
                CgiHead::Incomplete => return bad_gateway(c, run, "no response").await,
                CgiHead::Invalid(why) => return bad_gateway(c, run, why).await,
                CgiHead::Complete {
                    status,
                    reason,
                    headers,
                    content_length,
                    len,
                } => {
                    let framing = match content_length {
                        Some(n) => Framing::Length(n),
                        None if run.http10 => Framing::Close,
                        None => Framing::Chunked,
                    };
                    if framing == Framing::Close {
                        run.keep_alive = false;
                    }
                    let date = c.now()?;
                    let mut out = Vec::with_capacity(512);
                    write_head(&mut out, status, &reason, &headers, framing, date, &run);
                    c.write_all(&out).await?;
                    run.pos += len as u64;
                    run.framing = Some(framing);
                    c.commit_versioned(0, STATE_CGI, &Stage::Running(run).encode())
                        .await?;
                }
            }
            continue;
        };
        let left = match framing {
            Framing::Length(n) => n,
            _ => u64::MAX,
        };
        if avail == 0 || left == 0 {
            if !spool.eof() && left > 0 {
                wait(&mut pipe, &mut spool).await?;
                continue;
            }
            return finish(c, run, framing, left).await;
        }
        if run.head_only {
            // Nothing of the body goes out; take it off the pipe anyway.
            run.pos = spool.len();
            c.commit_versioned(0, STATE_CGI, &Stage::Running(run).encode())
                .await?;
            spool.forget_before(run.pos)?;
            continue;
        }
        let want = avail.min(PIECE as u64).min(left);
        // The piece's size depends on how much the program had written by
        // now: recorded, so a replay cuts the same piece.
        let n = c.record(|| want.to_le_bytes().to_vec())?;
        let n = n
            .try_into()
            .map(u64::from_le_bytes)
            .ok()
            .filter(|&n| n > 0 && n <= avail)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "recorded CGI piece size out of range",
                )
            })? as usize;
        let got = spool.read_at(run.pos, &mut buf[..n])?;
        if got != n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "CGI spool shorter than its size",
            ));
        }
        if framing == Framing::Chunked {
            let mut out = Vec::with_capacity(n + 16);
            out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            out.extend_from_slice(&buf[..n]);
            out.extend_from_slice(b"\r\n");
            c.write_all(&out).await?;
        } else {
            c.write_all(&buf[..n]).await?;
        }
        run.pos += n as u64;
        if let Framing::Length(l) = framing {
            run.framing = Some(Framing::Length(l - n as u64));
        }
        c.commit_versioned(0, STATE_CGI, &Stage::Running(run).encode())
            .await?;
        spool.forget_before(run.pos)?;
    }
}

/// The end of the program's output (or of the length it announced).
async fn finish(c: &mut impl HfConn, run: Run, framing: Framing, left: u64) -> io::Result<bool> {
    let keep = match framing {
        Framing::Chunked if !run.head_only => {
            c.write_all(b"0\r\n\r\n").await?;
            run.keep_alive
        }
        // The program wrote less than it announced: the client must not
        // wait for the rest.
        Framing::Length(_) if left > 0 && !run.head_only => {
            tracing::warn!(
                missing = left,
                "CGI program's output ended short of its Content-Length"
            );
            false
        }
        Framing::Close => false,
        _ => run.keep_alive,
    };
    if keep {
        c.commit(0, &[]).await?;
        let _ = c.unhold(TAG_PIPE);
        let _ = c.unhold(TAG_SPOOL);
    } else {
        // The keeper lets go of a closed connection's channels with it.
        c.commit_and_close(0).await?;
    }
    Ok(keep)
}

/// The program's output is not a CGI response: 502, unless part of the
/// response is out already (then only a close can tell the client).
async fn bad_gateway(c: &mut impl HfConn, run: Run, why: &str) -> io::Result<bool> {
    tracing::warn!(why, "CGI program gave no valid response");
    let _ = c.unhold(TAG_PIPE);
    let _ = c.unhold(TAG_SPOOL);
    let req = Request {
        method: if run.head_only {
            Method::Head
        } else {
            Method::Get
        },
        target: String::new(),
        keep_alive: run.keep_alive,
        http10: run.http10,
        content_length: 0,
    };
    crate::reply_error(c, Status::BadGateway, &req, 0).await?;
    Ok(run.keep_alive)
}

fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    headers: &[(String, String)],
    framing: Framing,
    date: u64,
    run: &Run,
) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nServer: {}\r\nDate: {}\r\n",
        http::server_name(),
        http::http_date(date)
    );
    for (n, v) in headers {
        if !n.is_empty() && http::safe_field(n) && http::safe_field(v) {
            let _ = write!(out, "{n}: {v}\r\n");
        }
    }
    match framing {
        Framing::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::Close => {}
    }
    if !run.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if run.http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_heads() {
        match parse_head(b"Content-Type: text/plain\r\nX-A: 1\r\n\r\nbody") {
            CgiHead::Complete {
                status,
                headers,
                len,
                content_length,
                ..
            } => {
                assert_eq!((status, len, content_length), (200, 36, None));
                assert_eq!(headers.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        match parse_head(b"Status: 404 Nope\nContent-Length: 3\n\nabc") {
            CgiHead::Complete {
                status,
                reason,
                content_length,
                len,
                ..
            } => assert_eq!(
                (status, reason.as_str(), content_length, len),
                (404, "Nope", Some(3), 36)
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_head(b"Location: /x\r\n\r\n"),
            CgiHead::Complete { status: 302, .. }
        ));
        assert_eq!(
            parse_head(b"Content-Type: text/plain\r\n"),
            CgiHead::Incomplete
        );
        assert!(matches!(
            parse_head(b"X-Only: 1\r\n\r\n"),
            CgiHead::Invalid(_)
        ));
        assert!(matches!(
            parse_head(b"Status: abc\r\n\r\n"),
            CgiHead::Invalid(_)
        ));
        assert!(matches!(
            parse_head(b"\x00\x01\r\n\r\n"),
            CgiHead::Invalid(_)
        ));
        assert!(matches!(
            parse_head(&vec![b'a'; MAX_CGI_HEAD]),
            CgiHead::Invalid(_)
        ));
    }

    #[test]
    fn parse_head_never_panics_on_prefixes() {
        let full = b"Status: 201 Made\r\nContent-Type: a/b\r\nContent-Length: 10\r\n\r\n0123456789";
        for i in 0..full.len() {
            let _ = parse_head(&full[..i]);
        }
    }

    #[test]
    fn stages_roundtrip_and_reject_garbage() {
        let stages = [
            Stage::Launching,
            Stage::Running(Run {
                pos: 12345,
                framing: Some(Framing::Length(77)),
                keep_alive: true,
                http10: false,
                head_only: true,
            }),
            Stage::Running(Run {
                pos: 1,
                framing: None,
                keep_alive: false,
                http10: true,
                head_only: false,
            }),
        ];
        for s in stages {
            assert_eq!(Stage::decode(&s.encode()), Some(s));
        }
        for b in [&[][..], &[0], &[1, 0], &[2; 18], &[3; 19]] {
            assert_eq!(Stage::decode(b), None);
        }
        let mut bad = stages[1].encode();
        bad[9] = 9;
        assert_eq!(Stage::decode(&bad), None);
    }

    #[test]
    fn locating_programs() {
        let dir = std::env::temp_dir().join(format!("hf-cgi-locate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let exe = dir.join("run.sh");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("plain"), "x").unwrap();
        std::os::unix::fs::symlink("/bin/sh", dir.join("escape")).unwrap();
        let dir = dir.canonicalize().unwrap();
        let s = locate(&dir, "/cgi-bin/run.sh/a%20b/c?x=1&y=2").unwrap();
        assert_eq!(s.script_name, "/cgi-bin/run.sh");
        assert_eq!(s.path_info, "/a b/c");
        assert_eq!(s.query, "x=1&y=2");
        assert_eq!(locate(&dir, "/cgi-bin/plain"), Err(Status::Forbidden));
        assert_eq!(locate(&dir, "/cgi-bin/sub"), Err(Status::NotFound));
        assert_eq!(locate(&dir, "/cgi-bin/nope"), Err(Status::NotFound));
        assert_eq!(locate(&dir, "/cgi-bin/"), Err(Status::NotFound));
        assert_eq!(locate(&dir, "/cgi-bin/..%2Fetc"), Err(Status::NotFound));
        assert_eq!(locate(&dir, "/cgi-bin/.hidden"), Err(Status::NotFound));
        assert_eq!(locate(&dir, "/cgi-bin/escape"), Err(Status::Forbidden));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
