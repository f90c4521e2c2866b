//! `CONNECT` tunnels: bytes relayed both ways, each direction committed as
//! it goes, so a tunnel survives the worker like any other exchange.
//!
//! Client → upstream: client input is committed once it is written
//! upstream. After a crash, client input from the last commit is read again;
//! the upstream's output counter says how much of it the origin already has
//! (the state pairs client offset `client_base` with upstream output offset
//! `up_base`), and only the rest is sent.
//!
//! Upstream → client: upstream input is peeked, written to the client, and
//! committed with its new position, then consumed — the same relay as an
//! answer's body.
//!
//! Waiting on both: the client's socket keeps input that holdfast has
//! peeked, and even committed input until a batch of it is discarded, so it
//! can read as "readable" with nothing new in it, and a read would block.
//! The client is therefore watched edge-triggered (a wake-up per arrival),
//! and how much is really new comes from the kernel's byte counters.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use rustix::event::epoll;

use crate::http::{self, Authority, Request};
use crate::session::{Session, Stop};
use crate::state::Phase;
use crate::upstream::readable;

/// What the client connection has beyond what was read.
enum Input {
    Data,
    End,
    Nothing,
}

impl Session {
    /// Answers a `CONNECT` and relays the tunnel until one side closes.
    pub(crate) fn open_tunnel(&mut self, req: &Request, origin: &Authority) -> Result<(), Stop> {
        self.connect(origin)?;
        self.conn.write_all(http::ESTABLISHED)?;
        let up = self
            .upstream
            .as_ref()
            .ok_or_else(|| Stop::Abort("no upstream".into()))?;
        let up_base = up.tcp.written().map_err(crate::session::unanswered)?;
        self.take(req.head_len);
        let client_base = self.client_in + self.used;
        self.commit(
            self.used,
            Phase::Tunnel {
                client_base,
                up_base,
            },
        )?;
        tracing::debug!(%origin, "tunnel open");
        self.tunnel(client_base, up_base)
    }

    /// Relays a tunnel (a new one, or one a dead worker was relaying).
    pub(crate) fn tunnel(&mut self, client_base: u64, up_base: u64) -> Result<(), Stop> {
        let phase = Phase::Tunnel {
            client_base,
            up_base,
        };
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let Some(up) = self.upstream.as_mut() else {
            return Err(Stop::Abort("no upstream".into()));
        };
        use epoll::EventFlags as F;
        epoll::add(
            &ep,
            &self.conn,
            epoll::EventData::new_u64(0),
            F::IN | F::RDHUP | F::ET,
        )?;
        epoll::add(
            &ep,
            up.tcp.fd(),
            epoll::EventData::new_u64(1),
            F::IN | F::RDHUP,
        )?;
        // Client input up to here is upstream already: past the committed
        // input if a worker died between a send and its commit.
        let sent = up.tcp.written().map_err(abort)?;
        let mut forwarded = client_base + sent.saturating_sub(up_base);
        let mut client_done = false;
        let mut events: Vec<epoll::Event> = Vec::with_capacity(4);
        loop {
            let mut busy = false;
            // Upstream → client first: after a crash, the output since the
            // last commit must be regenerated before anything is committed.
            let up = self.upstream.as_mut().ok_or_else(|| abort("no upstream"))?;
            if readable(up.tcp.fd(), Some(Duration::ZERO))? {
                let n = up.read(&mut self.buf).map_err(abort)?;
                if n == 0 {
                    tracing::debug!("tunnel closed by the origin");
                    return Ok(());
                }
                self.conn.write_all(&self.buf[..n])?;
                self.commit(0, phase.clone())?;
                busy = true;
            }
            if !client_done {
                match self.client_input()? {
                    Input::Data => {
                        if self.read_client()? == 0 {
                            // Moved to a new version (data was there).
                            return Ok(());
                        }
                    }
                    Input::End => {
                        client_done = true;
                        let up = self.upstream.as_ref().ok_or_else(|| abort("no upstream"))?;
                        // Again after a crash: harmless.
                        let _ = up.tcp.shutdown_write();
                        epoll::delete(&ep, &self.conn)?;
                        busy = true;
                    }
                    Input::Nothing => {}
                }
            }
            if !self.pending.is_empty() {
                let len = self.pending.len();
                let skip = usize::try_from(forwarded.saturating_sub(self.client_in))
                    .unwrap_or(usize::MAX)
                    .min(len);
                let up = self.upstream.as_mut().ok_or_else(|| abort("no upstream"))?;
                up.send(&self.pending[skip..]).map_err(abort)?;
                forwarded = self.client_in + len as u64;
                self.take(len);
                self.commit(self.used, phase.clone())?;
                busy = true;
            }
            if !busy {
                events.clear();
                match epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), None) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(Stop::Client(e.into())),
                }
            }
        }
    }

    /// Whether the client sent bytes not read yet, from the kernel's count
    /// of bytes received (peeked and committed bytes may still sit in the
    /// socket, so its queue length does not say).
    fn client_input(&self) -> io::Result<Input> {
        let pos = hf_sys::tcp::stream_positions(self.conn.as_fd())?;
        let read = self.client_in + self.used + self.pending.len() as u64;
        Ok(if pos.received > read {
            Input::Data
        } else if pos.fin_received {
            Input::End
        } else {
            Input::Nothing
        })
    }
}

fn abort(e: impl std::fmt::Display) -> Stop {
    Stop::Abort(format!("tunnel: {e}"))
}
