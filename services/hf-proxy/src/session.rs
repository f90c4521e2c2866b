//! One client connection: reading requests, forwarding them, relaying the
//! answers, and the commits that let a successor finish any of it after a
//! crash (see the crate docs for the protocol).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use holdfast::Conn;

use crate::http::{self, Authority, Body, Framing, Request, Status, Target};
use crate::state::{self, Phase, State};
use crate::upstream::{self, Upstream};

/// Client and upstream input are read this much at a time; an answer is
/// relayed with one commit per read.
const READ: usize = 64 * 1024;
/// Largest request body taken. The whole request stays uncommitted client
/// input until its answer is complete (so a successor can regenerate what
/// the origin did not get yet), and holdfast keeps at most 64 MiB of that.
const MAX_BODY: u64 = 60 << 20;

#[derive(Clone, Debug)]
pub struct Config {
    /// How long an upstream may take to accept a connection, and to take or
    /// send any bytes.
    pub timeout: Duration,
}

/// Serves `conn` until it ends.
pub fn serve(conn: Conn, cfg: Arc<Config>) {
    let (version, blob) = conn.state();
    let state = if blob.is_empty() {
        Some(State::new())
    } else if version == state::VERSION {
        State::decode(blob)
    } else {
        None
    };
    let Some(state) = state else {
        tracing::warn!(version, "unreadable state blob: closing the connection");
        return;
    };
    // Heads and body pieces are written as they come: no Nagle delay.
    if let Err(e) = conn.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let phase = state.phase.clone();
    match Session::resume(conn, cfg, state) {
        Ok(s) => s.run(phase),
        Err(e) => tracing::warn!(error = %e, "cannot resume the connection: closing it"),
    }
}

/// Why an exchange stopped early.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The client went away (or its connection moved to a new version of
    /// the service): there is nobody to answer.
    Client(io::Error),
    /// Answer with this error and close; nothing of an answer went out.
    Answer(Status),
    /// Part of an answer went out and the rest cannot follow: close.
    Abort(String),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        Stop::Client(e)
    }
}

impl From<rustix::io::Errno> for Stop {
    fn from(e: rustix::io::Errno) -> Stop {
        Stop::Client(e.into())
    }
}

/// An upstream failure before any of the answer went to the client.
pub(crate) fn unanswered(e: io::Error) -> Stop {
    tracing::info!(error = %e, "upstream failed before answering");
    Stop::Answer(if e.kind() == io::ErrorKind::TimedOut {
        Status::GatewayTimeout
    } else {
        Status::BadGateway
    })
}

fn no_upstream() -> Stop {
    Stop::Abort("no upstream connection".into())
}

pub(crate) struct Session {
    pub(crate) conn: Conn,
    cfg: Arc<Config>,
    /// Client input read but not used yet (the front may belong to the
    /// request in hand, the rest to the next ones).
    pub(crate) pending: Vec<u8>,
    /// Client input used since the last commit.
    pub(crate) used: u64,
    /// Absolute offset of the client input committed.
    pub(crate) client_in: u64,
    pub(crate) upstream: Option<Upstream>,
    pub(crate) buf: Box<[u8]>,
}

impl Session {
    /// Lines the session up with the state of the last commit: the held
    /// upstream is taken back if the state names it, dropped if not.
    fn resume(mut conn: Conn, cfg: Arc<Config>, st: State) -> io::Result<Session> {
        let held = conn.take_held(upstream::TAG);
        let upstream = match (st.upstream, held) {
            (Some(u), Some(fd)) => {
                let mut up = Upstream::adopt(u.origin, fd, cfg.timeout)?;
                if up.cookie == u.cookie {
                    // Consumed only after the commit: a successor may have
                    // to finish it.
                    up.tcp.seek_read(u.pos)?;
                    up.tcp.consume_to(u.pos)?;
                    tracing::debug!(origin = %up.origin, pos = u.pos, "upstream taken back");
                    Some(up)
                } else {
                    conn.unhold(upstream::TAG)?;
                    None
                }
            }
            (None, Some(_)) => {
                // Connected and held, but no commit named it: it never
                // carried a byte.
                conn.unhold(upstream::TAG)?;
                None
            }
            (_, None) => None,
        };
        let needs_upstream = matches!(st.phase, Phase::Request { .. } | Phase::Tunnel { .. });
        if needs_upstream && upstream.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the upstream of the exchange in flight did not come back",
            ));
        }
        Ok(Session {
            conn,
            cfg,
            pending: Vec::new(),
            used: 0,
            client_in: st.client_in,
            upstream,
            buf: vec![0; READ].into_boxed_slice(),
        })
    }

    fn run(mut self, phase: Phase) {
        let mut resumed = match phase {
            Phase::Idle => None,
            Phase::Failing(status) => return self.answer(status, true),
            Phase::Tunnel {
                client_base,
                up_base,
            } => {
                let r = self.tunnel(client_base, up_base);
                return self.end(r);
            }
            Phase::Request { req_start, body } => Some((req_start, body)),
        };
        loop {
            match self.step(resumed.take()) {
                Ok(true) => {}
                r => return self.end(r.map(|_| ())),
            }
        }
    }

    /// How a connection ends.
    fn end(self, r: Result<(), Stop>) {
        match r {
            Ok(()) => {}
            Err(Stop::Answer(status)) => self.answer(status, false),
            Err(Stop::Abort(why)) => tracing::info!(why, "closing mid-answer"),
            Err(Stop::Client(e)) if self.conn.moved() => {
                tracing::debug!(error = %e, "connection moved to a new version")
            }
            Err(Stop::Client(e)) => tracing::debug!(error = %e, "client connection ended"),
        }
    }

    /// One request and its answer; `Ok(true)` if the connection stays open.
    fn step(&mut self, resumed: Option<(u64, Option<Body>)>) -> Result<bool, Stop> {
        let Some(req) = self.read_request()? else {
            return Ok(false);
        };
        if self.conn.poisoned() {
            tracing::warn!(
                method = req.method,
                "request in flight during repeated crashes: refused"
            );
            return Err(Stop::Answer(Status::Internal));
        }
        match (&req.target, resumed) {
            (Target::Tunnel(origin), None) => {
                self.open_tunnel(&req, origin)?;
                Ok(false)
            }
            (Target::Origin { authority, .. }, resumed) => self.exchange(&req, authority, resumed),
            (Target::Tunnel(_), Some(_)) => Err(Stop::Abort(
                "the state says a request was in flight, the input holds a CONNECT".into(),
            )),
        }
    }

    /// The next request head; `None` if the client closed first.
    fn read_request(&mut self) -> Result<Option<Request>, Stop> {
        loop {
            if !self.pending.is_empty() {
                if let Some(r) = http::parse_request(&self.pending).map_err(Stop::Answer)? {
                    return Ok(Some(r));
                }
            }
            if self.read_client()? == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads more client input into `pending`.
    pub(crate) fn read_client(&mut self) -> io::Result<usize> {
        let n = self.conn.read(&mut self.buf)?;
        self.pending.extend_from_slice(&self.buf[..n]);
        Ok(n)
    }

    /// Marks the first `n` bytes of `pending` as used by the request in hand.
    pub(crate) fn take(&mut self, n: usize) {
        self.pending.drain(..n);
        self.used += n as u64;
    }

    /// Commits `consumed` more client input with `phase`; the state names
    /// the upstream, relayed up to its read position, whose input is then
    /// consumed up to there.
    pub(crate) fn commit(&mut self, consumed: u64, phase: Phase) -> io::Result<()> {
        let st = State {
            client_in: self.client_in + consumed,
            upstream: self.upstream.as_ref().map(|u| state::Upstream {
                origin: u.origin.clone(),
                cookie: u.cookie,
                pos: u.tcp.read_pos(),
            }),
            phase,
        };
        let n = usize::try_from(consumed).map_err(io::Error::other)?;
        self.conn.commit(n, &st.encode())?;
        self.client_in += consumed;
        self.used -= consumed;
        if let Some(u) = &mut self.upstream {
            u.tcp.consume_to(u.tcp.read_pos())?;
        }
        Ok(())
    }

    /// Connects to `origin` and hands the socket to the keeper. The next
    /// commit names it; until then a successor drops it.
    pub(crate) fn connect(&mut self, origin: &Authority) -> Result<(), Stop> {
        if self.upstream.take().is_some() {
            self.conn.unhold(upstream::TAG)?;
        }
        let up = Upstream::connect(origin, self.cfg.timeout).map_err(Stop::Answer)?;
        self.conn.hold(upstream::TAG, up.tcp.fd())?;
        tracing::debug!(%origin, "connected upstream");
        self.upstream = Some(up);
        Ok(())
    }

    /// Forwards a request and relays its answer; `Ok(true)` if the
    /// connection stays open. `resumed`: the request was in flight when a
    /// worker died (where it was sent from, and the body being relayed).
    fn exchange(
        &mut self,
        req: &Request,
        origin: &Authority,
        resumed: Option<(u64, Option<Body>)>,
    ) -> Result<bool, Stop> {
        if matches!(req.body, Framing::Length(n) if n > MAX_BODY) {
            return Err(Stop::Answer(Status::PayloadTooLarge));
        }
        let (req_start, at_body) = match resumed {
            Some(r) => r,
            None => (self.open_request(req, origin)?, None),
        };
        self.forward(req, req_start)?;
        // A resumed answer's head is gone: its upstream is not reused.
        let (body, reusable) = match at_body {
            Some(body) => (Some(body), false),
            None => self.relay_head(req, req_start)?,
        };
        // A body relayed to an HTTP/1.0 client without a length (a chunked
        // answer, dechunked for it) ends with the connection.
        let close = !req.keep_alive
            || matches!(
                body,
                Some(Body::Close) | Some(Body::Chunked { dechunk: true, .. })
            );
        if let Some(body) = body {
            self.relay_body(req_start, body)?;
        }
        tracing::debug!(method = req.method, %origin, close, "answered");
        self.finish(close, reusable)
    }

    /// Readies an upstream for `req` and commits where the request's first
    /// byte goes, before it goes: returns that offset of the upstream's output.
    fn open_request(&mut self, req: &Request, origin: &Authority) -> Result<u64, Stop> {
        if req.expect_continue && Body::start(req.body, false).is_some() {
            // The proxy takes the body now; the origin is not asked.
            self.conn.write_all(http::CONTINUE)?;
        }
        let reuse = self
            .upstream
            .as_ref()
            .is_some_and(|u| u.origin == *origin && !u.stale());
        if !reuse {
            self.connect(origin)?;
        }
        let up = self.upstream.as_ref().ok_or_else(no_upstream)?;
        let req_start = up.tcp.written().map_err(unanswered)?;
        self.commit(
            0,
            Phase::Request {
                req_start,
                body: None,
            },
        )?;
        Ok(req_start)
    }

    /// Sends the rewritten request: the head, then the body as the client
    /// sends it. The origin already has the upstream's output since
    /// `req_start` (all of it but after a crash): those bytes are skipped,
    /// so no byte of a request reaches the origin twice.
    fn forward(&mut self, req: &Request, req_start: u64) -> Result<(), Stop> {
        let up = self.upstream.as_mut().ok_or_else(no_upstream)?;
        let written = up.tcp.written().map_err(unanswered)?;
        let mut skip = written
            .checked_sub(req_start)
            .ok_or_else(|| Stop::Abort("upstream output before the request's start".into()))?;
        if skip > 0 {
            tracing::debug!(origin = %up.origin, bytes = skip, "request bytes the origin has already");
        }
        send_skipping(up, &req.rewrite(), &mut skip)?;
        self.take(req.head_len);
        let Some(mut body) = Body::start(req.body, false) else {
            return Ok(());
        };
        while !body.done() {
            if self.pending.is_empty() && self.read_client()? == 0 {
                return Err(Stop::Client(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed in the middle of a request body",
                )));
            }
            let n = body
                .feed(&self.pending, |_| {})
                .map_err(|_| Stop::Answer(Status::BadRequest))?;
            let up = self.upstream.as_mut().ok_or_else(no_upstream)?;
            send_skipping(up, &self.pending[..n], &mut skip)?;
            self.take(n);
        }
        Ok(())
    }

    /// Relays the answer's head (after any interim ones); returns where the
    /// body stands (`None`: there is none) and whether the upstream may
    /// carry another request.
    fn relay_head(&mut self, req: &Request, req_start: u64) -> Result<(Option<Body>, bool), Stop> {
        loop {
            let up = self.upstream.as_mut().ok_or_else(no_upstream)?;
            let start = up.tcp.read_pos();
            let mut head = Vec::new();
            let resp = loop {
                let n = up.read(&mut self.buf).map_err(unanswered)?;
                if n == 0 {
                    return Err(unanswered(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed without answering",
                    )));
                }
                head.extend_from_slice(&self.buf[..n]);
                match http::parse_response(&head) {
                    Ok(Some(r)) => break r,
                    Ok(None) => {}
                    Err(why) => {
                        return Err(unanswered(io::Error::new(io::ErrorKind::InvalidData, why)))
                    }
                }
            };
            up.tcp.seek_read(start + resp.head_len as u64)?;
            if resp.interim() {
                if !req.http10 {
                    self.conn.write_all(&resp.rewrite(false, false, false))?;
                }
                self.commit(
                    0,
                    Phase::Request {
                        req_start,
                        body: None,
                    },
                )?;
                continue;
            }
            let framing = match (resp.code, resp.framing(req.is_head())) {
                (101, _) => Err("protocol switch nobody asked for".to_owned()),
                (_, f) => f,
            }
            .map_err(|why| unanswered(io::Error::new(io::ErrorKind::InvalidData, why)))?;
            let close = !req.keep_alive
                || framing == Framing::Close
                || (req.http10 && framing == Framing::Chunked);
            let chunked = framing == Framing::Chunked && !req.http10;
            self.conn
                .write_all(&resp.rewrite(chunked, close, req.http10 && !close))?;
            let body = Body::start(framing, req.http10);
            if body.is_some() {
                self.commit(0, Phase::Request { req_start, body })?;
            }
            return Ok((body, resp.reusable(framing)));
        }
    }

    /// Relays the body, one commit per read: a successor goes on from the
    /// last one with the same parser state.
    fn relay_body(&mut self, req_start: u64, mut body: Body) -> Result<(), Stop> {
        let mut out = Vec::new();
        while !body.done() {
            let up = self.upstream.as_mut().ok_or_else(no_upstream)?;
            let want = body.limit(self.buf.len());
            let n = up
                .read(&mut self.buf[..want])
                .map_err(|e| Stop::Abort(format!("upstream failed mid-answer: {e}")))?;
            if n == 0 {
                if body == Body::Close {
                    return Ok(());
                }
                return Err(Stop::Abort("upstream closed mid-answer".into()));
            }
            out.clear();
            let taken = body
                .feed(&self.buf[..n], |r| out.push(r))
                .map_err(|_| Stop::Abort("malformed chunked body from upstream".into()))?;
            if taken < n {
                // Bytes past the answer: not ours to relay (the upstream is
                // not reused, see `finish`).
                let pos = up.tcp.read_pos() - (n - taken) as u64;
                up.tcp.seek_read(pos)?;
            }
            for r in &out {
                self.conn.write_all(&self.buf[r.clone()])?;
            }
            if !body.done() {
                self.commit(
                    0,
                    Phase::Request {
                        req_start,
                        body: Some(body),
                    },
                )?;
            }
        }
        Ok(())
    }

    /// The answer is complete: its request's input is committed with it.
    /// An upstream that cannot carry another request is let go after the
    /// commit that stops naming it.
    fn finish(&mut self, close: bool, reusable: bool) -> Result<bool, Stop> {
        if close {
            let used = usize::try_from(self.used).map_err(io::Error::other)?;
            self.conn.commit_and_close(used)?;
            return Ok(false);
        }
        let stale = (!reusable).then(|| self.upstream.take()).flatten();
        self.commit(self.used, Phase::Idle)?;
        if let Some(mut up) = stale {
            self.conn.unhold(upstream::TAG)?;
            // Nothing left unread: the close is a FIN, not a reset.
            let _ = up.tcp.consume_to(up.tcp.read_pos());
        }
        Ok(true)
    }

    /// Answers with an error and closes. The decision is committed before
    /// the answer goes out, so a successor sends the same answer instead of
    /// trying again and perhaps answering differently (`resumed`: this is
    /// that successor, regenerating it).
    fn answer(mut self, status: Status, resumed: bool) {
        tracing::info!(status = status.code(), "answering with an error");
        let r = (|| {
            if !resumed {
                let up = self.upstream.take();
                self.commit(0, Phase::Failing(status))?;
                if up.is_some() {
                    self.conn.unhold(upstream::TAG)?;
                }
            }
            self.conn.write_all(&status.response())?;
            self.conn.commit_and_close(0)
        })();
        if let Err(e) = r {
            tracing::debug!(error = %e, "error answer not delivered");
        }
    }
}

/// Sends `data` upstream, less its first `skip` bytes (counted down).
fn send_skipping(up: &mut Upstream, data: &[u8], skip: &mut u64) -> Result<(), Stop> {
    let k = usize::try_from(*skip).unwrap_or(usize::MAX).min(data.len());
    *skip -= k as u64;
    up.send(&data[k..]).map_err(unanswered)
}
