//! Control-socket messages between keeper and worker.
//!
//! The socket is `SOCK_SEQPACKET`, so one message is exactly one datagram and
//! framing only has to detect damage, not find boundaries. File descriptors
//! travel beside the bytes as `SCM_RIGHTS`; [`Msg::fd_count`] says how many
//! must accompany a message, in the order of its entries.
//!
//! Frame (little-endian):
//!
//! ```text
//! 0      magic u16 = 0x4846
//! 2      version u8 = 1
//! 3      kind u8
//! 4      len u32            payload length, <= MAX_MSG - 12
//! 8      payload[len]       fixed-size fields in declaration order
//! 8+len  crc u32            CRC-32C of bytes [0, 8+len)
//! ```

use thiserror::Error;

pub const MAX_MSG: usize = 16 * 1024;
/// Linux's `SCM_MAX_FD`: the most descriptors one `sendmsg` may carry.
pub const MAX_FDS_PER_MSG: usize = 253;
/// Held channels one connection may have (see [`Msg::Hold`]).
pub const MAX_CHANNELS: usize = 8;
pub const CONN_RECOVERED: u8 = 1;
/// The connection has an input spool: its memfd travels right after the
/// connection's own fd.
pub const CONN_SPOOL: u8 = 2;
/// The worker that had the connection crashed by itself (a fatal signal, a
/// non-zero exit, a hang), rather than being stopped from outside: a request
/// it had in flight counts towards poison detection.
pub const CONN_CRASHED: u8 = 4;
/// The connection was handed over by a draining worker at a commit point
/// (an upgrade), not taken from a dead one.
pub const CONN_MOVED: u8 = 8;
/// Descriptors a process under a keeper keeps free for everything but
/// connections: listeners, the journal, control sockets, pidfds, spools,
/// its runtime's own (epoll, eventfds, log files).
pub const FD_RESERVE: u64 = 64;

/// How many connections a process with the open-files limit `limit` may
/// hold: what is left after [`FD_RESERVE`], halved, so that every
/// connection a worker serves leaves room for one descriptor the service
/// opens for it (the file it sends, an upstream connection). The keeper
/// holds no more than this (workers inherit its limit), and a worker takes
/// no more than this from its keeper. At least 1.
pub fn conn_budget(limit: u64) -> u32 {
    u32::try_from(limit.saturating_sub(FD_RESERVE) / 2)
        .unwrap_or(u32::MAX)
        .max(1)
}

const CONN_FLAGS: u8 = CONN_RECOVERED | CONN_SPOOL | CONN_CRASHED | CONN_MOVED;
/// Service protocol level a worker announces in [`Msg::Hello`]; the keeper
/// decides what to do with a mismatch, the frame decoder does not.
/// 2: Hello carries state blob versions; Drain, Released, `CONN_MOVED`.
/// 3: Stop; Refused (a worker hands back connections it cannot hold).
pub const PROTO_VERSION: u16 = 3;
pub const MAGIC: u16 = 0x4846;
pub const VERSION: u8 = 1;

const HEADER: usize = 8;
const TRAILER: usize = 4;
pub const MAX_PAYLOAD: usize = MAX_MSG - HEADER - TRAILER;
const CONN_ENTRY_LEN: usize = 8 + 4 + 1;
// A full Conns batch must fit in one message.
const _: () = assert!(2 + MAX_FDS_PER_MSG * CONN_ENTRY_LEN <= MAX_PAYLOAD);

// Keeper-to-worker kinds have the high bit set, so a message sent in the
// wrong direction cannot alias a valid one.
const KIND_HELLO: u8 = 0x01;
const KIND_READY: u8 = 0x02;
const KIND_CLOSED: u8 = 0x03;
const KIND_SPOOL: u8 = 0x04;
const KIND_POISONED: u8 = 0x05;
const KIND_RELEASED: u8 = 0x06;
const KIND_HOLD: u8 = 0x07;
const KIND_UNHOLD: u8 = 0x08;
const KIND_ACCEPT_ON: u8 = 0x09;
const KIND_REFUSED: u8 = 0x0a;
const KIND_WELCOME: u8 = 0x81;
const KIND_ACTIVATE: u8 = 0x82;
const KIND_CONNS: u8 = 0x83;
const KIND_SHUTDOWN: u8 = 0x84;
const KIND_DRAIN: u8 = 0x85;
const KIND_CHANNEL: u8 = 0x86;
const KIND_ACCEPT_FAILED: u8 = 0x87;
const KIND_STOP: u8 = 0x88;

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Msg {
    // worker -> keeper
    /// First message a worker sends: its pid, the protocol level, and the
    /// state blob schema versions it writes and can read (an upgrade to a
    /// version that cannot read the blobs in use is refused).
    Hello {
        pid: u32,
        proto: u16,
        state_writes: u16,
        state_reads: (u16, u16),
    },
    /// Worker initialised, can take connections.
    Ready,
    /// The service closed this connection; the keeper drops its duplicate.
    Closed { conn_id: u64, slot: u32 },
    /// The connection's input spool (a memfd) travels with this message; the
    /// keeper holds it with the connection and hands it to a successor.
    Spool { conn_id: u64, slot: u32 },
    /// A request on this connection was found to be poison (for the count).
    Poisoned { conn_id: u64, slot: u32 },
    /// A draining worker let go of this connection at a commit point: it
    /// will not touch it again, and its journal record says where it stands.
    Released { conn_id: u64, slot: u32 },
    /// The worker did not take this connection from a `Conns` batch: it had
    /// no room for its descriptors (its open-files budget, see
    /// [`conn_budget`], or a hand-over the kernel truncated). It never
    /// touched it; the keeper holds it until the worker has room.
    Refused { conn_id: u64, slot: u32 },
    /// A held channel of this connection travels with this message (one fd):
    /// an fd the service opened that must outlive the worker (an upstream
    /// connection, a CGI program's output pipe, an FTP data connection). It
    /// replaces one with the same tag.
    Hold { conn_id: u64, slot: u32, tag: u32 },
    /// The keeper drops its copy of that channel.
    Unhold { conn_id: u64, slot: u32, tag: u32 },
    /// The keeper accepts a connection on the held listening socket
    /// `listener` and holds it under `tag` before the worker has it, so no
    /// crash can lose it; it answers with `Channel` (or `AcceptFailed`).
    AcceptOn {
        conn_id: u64,
        slot: u32,
        listener: u32,
        tag: u32,
    },
    // keeper -> worker
    /// Answer to Hello; `slots` = number of records in the journal.
    Welcome {
        worker_id: u32,
        generation: u32,
        slots: u32,
    },
    /// Standby promoted to active.
    Activate,
    /// 1..=253 entries; their fds travel with the message in the same order,
    /// each connection's fd followed by its spool's when it has one, at most
    /// 253 fds in all.
    Conns(Vec<ConnEntry>),
    /// Finish and exit.
    Shutdown,
    /// A new version takes over: let go of every connection at its next
    /// commit point (`Released`), take no new ones.
    Drain,
    /// The keeper stops: finish every request in flight, and let go of each
    /// connection (`Released`) once it is idle — at a commit point with no
    /// input waiting — so the keeper can close it with a FIN.
    Stop,
    /// A held channel of a connection (one fd) the next `Conns` hands over,
    /// or the connection an `AcceptOn` accepted.
    Channel { conn_id: u64, tag: u32 },
    /// Nothing to accept (or no such listener) for that `AcceptOn`.
    AcceptFailed { conn_id: u64, tag: u32 },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ConnEntry {
    pub conn_id: u64,
    /// Index of the connection's record in the journal.
    pub slot: u32,
    /// Bit 0 [`CONN_RECOVERED`], bit 1 [`CONN_SPOOL`], bit 2 [`CONN_CRASHED`],
    /// bit 3 [`CONN_MOVED`]; other bits are rejected.
    pub flags: u8,
}

impl ConnEntry {
    /// The connection was held across a worker death; resume it from its journal record.
    pub fn recovered(&self) -> bool {
        self.flags & CONN_RECOVERED != 0
    }

    /// The connection's input spool travels with it.
    pub fn spooled(&self) -> bool {
        self.flags & CONN_SPOOL != 0
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Error)]
pub enum WireError {
    #[error("message of {len} bytes is too short or cut off")]
    Truncated { len: usize },
    #[error("bad frame magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported frame version {0}")]
    BadVersion(u8),
    #[error("declared payload length {len} exceeds the limit of {max}", max = MAX_PAYLOAD)]
    TooLong { len: u32 },
    #[error("declared payload length {declared} but the frame carries {actual} bytes")]
    LenMismatch { declared: u32, actual: usize },
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("{len}-byte payload is malformed for message kind {kind:#04x}")]
    Payload { kind: u8, len: usize },
    #[error("Conns carries {0} entries, must be 1..={max}", max = MAX_FDS_PER_MSG)]
    ConnCount(usize),
    #[error("connection {conn_id}: unknown flag bits {flags:#04x}")]
    ConnFlags { conn_id: u64, flags: u8 },
}

impl Msg {
    /// Encodes into `out`, clearing it first (so one buffer serves every send).
    ///
    /// Never fails: a message breaking the limits (see [`Msg::validate`]) is
    /// encoded as-is and refused by the receiver's [`Msg::decode`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&[0; 4]); // payload length, patched once known
        match self {
            Msg::Hello {
                pid,
                proto,
                state_writes,
                state_reads,
            } => {
                out.extend_from_slice(&pid.to_le_bytes());
                out.extend_from_slice(&proto.to_le_bytes());
                out.extend_from_slice(&state_writes.to_le_bytes());
                out.extend_from_slice(&state_reads.0.to_le_bytes());
                out.extend_from_slice(&state_reads.1.to_le_bytes());
            }
            Msg::Closed { conn_id, slot }
            | Msg::Spool { conn_id, slot }
            | Msg::Poisoned { conn_id, slot }
            | Msg::Released { conn_id, slot }
            | Msg::Refused { conn_id, slot } => {
                out.extend_from_slice(&conn_id.to_le_bytes());
                out.extend_from_slice(&slot.to_le_bytes());
            }
            Msg::Hold { conn_id, slot, tag } | Msg::Unhold { conn_id, slot, tag } => {
                out.extend_from_slice(&conn_id.to_le_bytes());
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&tag.to_le_bytes());
            }
            Msg::Channel { conn_id, tag } | Msg::AcceptFailed { conn_id, tag } => {
                out.extend_from_slice(&conn_id.to_le_bytes());
                out.extend_from_slice(&tag.to_le_bytes());
            }
            Msg::AcceptOn {
                conn_id,
                slot,
                listener,
                tag,
            } => {
                out.extend_from_slice(&conn_id.to_le_bytes());
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&listener.to_le_bytes());
                out.extend_from_slice(&tag.to_le_bytes());
            }
            Msg::Welcome {
                worker_id,
                generation,
                slots,
            } => {
                out.extend_from_slice(&worker_id.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                out.extend_from_slice(&slots.to_le_bytes());
            }
            Msg::Conns(entries) => {
                // An oversized count saturates; decode rejects it either way.
                let count = u16::try_from(entries.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&count.to_le_bytes());
                for e in entries {
                    out.extend_from_slice(&e.conn_id.to_le_bytes());
                    out.extend_from_slice(&e.slot.to_le_bytes());
                    out.push(e.flags);
                }
            }
            Msg::Ready | Msg::Activate | Msg::Shutdown | Msg::Drain | Msg::Stop => {}
        }
        let len = u32::try_from(out.len().saturating_sub(HEADER)).unwrap_or(u32::MAX);
        out.iter_mut()
            .skip(4)
            .zip(len.to_le_bytes())
            .for_each(|(d, s)| *d = s);
        let crc = crc32c::crc32c(out);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one datagram. Total: any input yields a message or an error.
    pub fn decode(buf: &[u8]) -> Result<Msg, WireError> {
        let short = WireError::Truncated { len: buf.len() };
        let (body, crc) = buf.split_last_chunk::<TRAILER>().ok_or(short)?;
        let mut r = Reader {
            rest: body,
            err: short,
        };
        let (magic, version, kind, len) = (r.u16()?, r.u8()?, r.u8()?, r.u32()?);
        // Identity before checksum: a peer speaking another protocol should
        // be told so, not reported as corruption.
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if version != VERSION {
            return Err(WireError::BadVersion(version));
        }
        let want = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or(WireError::TooLong { len })?;
        if r.rest.len() != want {
            return Err(WireError::LenMismatch {
                declared: len,
                actual: r.rest.len(),
            });
        }
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err(WireError::Checksum);
        }
        let payload = r.rest;
        let mut r = Reader {
            rest: payload,
            err: WireError::Payload {
                kind,
                len: payload.len(),
            },
        };
        let msg = match kind {
            KIND_HELLO => Msg::Hello {
                pid: r.u32()?,
                proto: r.u16()?,
                state_writes: r.u16()?,
                state_reads: (r.u16()?, r.u16()?),
            },
            KIND_READY => Msg::Ready,
            KIND_CLOSED => Msg::Closed {
                conn_id: r.u64()?,
                slot: r.u32()?,
            },
            KIND_SPOOL => Msg::Spool {
                conn_id: r.u64()?,
                slot: r.u32()?,
            },
            KIND_POISONED => Msg::Poisoned {
                conn_id: r.u64()?,
                slot: r.u32()?,
            },
            KIND_RELEASED => Msg::Released {
                conn_id: r.u64()?,
                slot: r.u32()?,
            },
            KIND_REFUSED => Msg::Refused {
                conn_id: r.u64()?,
                slot: r.u32()?,
            },
            KIND_HOLD => Msg::Hold {
                conn_id: r.u64()?,
                slot: r.u32()?,
                tag: r.u32()?,
            },
            KIND_UNHOLD => Msg::Unhold {
                conn_id: r.u64()?,
                slot: r.u32()?,
                tag: r.u32()?,
            },
            KIND_CHANNEL => Msg::Channel {
                conn_id: r.u64()?,
                tag: r.u32()?,
            },
            KIND_ACCEPT_FAILED => Msg::AcceptFailed {
                conn_id: r.u64()?,
                tag: r.u32()?,
            },
            KIND_ACCEPT_ON => Msg::AcceptOn {
                conn_id: r.u64()?,
                slot: r.u32()?,
                listener: r.u32()?,
                tag: r.u32()?,
            },
            KIND_WELCOME => Msg::Welcome {
                worker_id: r.u32()?,
                generation: r.u32()?,
                slots: r.u32()?,
            },
            KIND_ACTIVATE => Msg::Activate,
            KIND_SHUTDOWN => Msg::Shutdown,
            KIND_DRAIN => Msg::Drain,
            KIND_STOP => Msg::Stop,
            KIND_CONNS => {
                let count = usize::from(r.u16()?);
                // Checked before allocating, so a hostile count costs nothing.
                if !(1..=MAX_FDS_PER_MSG).contains(&count) {
                    return Err(WireError::ConnCount(count));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(ConnEntry {
                        conn_id: r.u64()?,
                        slot: r.u32()?,
                        flags: r.u8()?,
                    });
                }
                Msg::Conns(entries)
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        if !r.rest.is_empty() {
            return Err(r.err);
        }
        msg.validate()?;
        Ok(msg)
    }

    /// Checks the limits [`Msg::decode`] enforces beyond framing; senders may
    /// call it to catch a bad batch before it reaches the peer.
    pub fn validate(&self) -> Result<(), WireError> {
        if let Msg::Conns(entries) = self {
            if !(1..=MAX_FDS_PER_MSG).contains(&entries.len()) {
                return Err(WireError::ConnCount(entries.len()));
            }
            if let Some(e) = entries.iter().find(|e| e.flags & !CONN_FLAGS != 0) {
                return Err(WireError::ConnFlags {
                    conn_id: e.conn_id,
                    flags: e.flags,
                });
            }
            if self.fd_count() > MAX_FDS_PER_MSG {
                return Err(WireError::ConnCount(self.fd_count()));
            }
        }
        Ok(())
    }

    /// How many file descriptors travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Msg::Conns(entries) => entries.len() + entries.iter().filter(|e| e.spooled()).count(),
            Msg::Spool { .. } | Msg::Hold { .. } | Msg::Channel { .. } => 1,
            _ => 0,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Msg::Hello { .. } => KIND_HELLO,
            Msg::Ready => KIND_READY,
            Msg::Closed { .. } => KIND_CLOSED,
            Msg::Spool { .. } => KIND_SPOOL,
            Msg::Poisoned { .. } => KIND_POISONED,
            Msg::Released { .. } => KIND_RELEASED,
            Msg::Refused { .. } => KIND_REFUSED,
            Msg::Welcome { .. } => KIND_WELCOME,
            Msg::Activate => KIND_ACTIVATE,
            Msg::Conns(_) => KIND_CONNS,
            Msg::Shutdown => KIND_SHUTDOWN,
            Msg::Drain => KIND_DRAIN,
            Msg::Stop => KIND_STOP,
            Msg::Hold { .. } => KIND_HOLD,
            Msg::Unhold { .. } => KIND_UNHOLD,
            Msg::Channel { .. } => KIND_CHANNEL,
            Msg::AcceptOn { .. } => KIND_ACCEPT_ON,
            Msg::AcceptFailed { .. } => KIND_ACCEPT_FAILED,
        }
    }
}

/// Little-endian cursor; running out of bytes yields `err`, never a panic.
struct Reader<'a> {
    rest: &'a [u8],
    err: WireError,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self.rest.split_first_chunk::<N>().ok_or(self.err)?;
        self.rest = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.take().map(u8::from_le_bytes)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.take().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A correctly framed and checksummed message with an arbitrary payload.
    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x46, 0x48, VERSION, kind];
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn conns(n: usize, flags: u8) -> Vec<u8> {
        let mut p = (n as u16).to_le_bytes().to_vec();
        for i in 0..n {
            p.extend_from_slice(&(i as u64).to_le_bytes());
            p.extend_from_slice(&(i as u32).to_le_bytes());
            p.push(flags);
        }
        p
    }

    #[test]
    fn layout_is_as_documented() {
        let mut out = Vec::new();
        Msg::Closed {
            conn_id: 0x0102,
            slot: 3,
        }
        .encode(&mut out);
        assert_eq!(
            out,
            frame(KIND_CLOSED, &[2, 1, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0])
        );
        assert_eq!(
            Msg::decode(&out),
            Ok(Msg::Closed {
                conn_id: 0x0102,
                slot: 3
            })
        );
    }

    #[test]
    fn rejects_malformed_payloads() {
        let hello = [1, 0, 0, 0, 1, 0, 1, 0, 1, 0, 2, 0];
        assert_eq!(
            Msg::decode(&frame(KIND_HELLO, &hello)),
            Ok(Msg::Hello {
                pid: 1,
                proto: 1,
                state_writes: 1,
                state_reads: (1, 2)
            })
        );
        assert_eq!(
            Msg::decode(&frame(KIND_HELLO, &hello[..11])),
            Err(WireError::Payload { kind: 1, len: 11 })
        );
        assert_eq!(
            Msg::decode(&frame(KIND_READY, &[0])),
            Err(WireError::Payload { kind: 2, len: 1 })
        );
        assert_eq!(
            Msg::decode(&frame(0x42, &[])),
            Err(WireError::UnknownKind(0x42))
        );
        assert_eq!(
            Msg::decode(&frame(KIND_CONNS, &conns(0, 0))),
            Err(WireError::ConnCount(0))
        );
        assert_eq!(
            Msg::decode(&frame(KIND_CONNS, &conns(254, 0))),
            Err(WireError::ConnCount(254))
        );
        assert_eq!(
            Msg::decode(&frame(KIND_CONNS, &conns(253, 1))).map(|m| m.fd_count()),
            Ok(253)
        );
        assert_eq!(
            Msg::decode(&frame(KIND_CONNS, &conns(2, 16))),
            Err(WireError::ConnFlags {
                conn_id: 0,
                flags: 16
            })
        );
        let mut extra = conns(1, 0);
        extra.push(0);
        assert_eq!(
            Msg::decode(&frame(KIND_CONNS, &extra)),
            Err(WireError::Payload {
                kind: KIND_CONNS,
                len: 16
            })
        );
    }

    #[test]
    fn rejects_bad_frames() {
        assert_eq!(Msg::decode(&[]), Err(WireError::Truncated { len: 0 }));
        let mut f = frame(KIND_READY, &[]);
        f[0] = 0;
        assert_eq!(Msg::decode(&f), Err(WireError::BadMagic(0x4800)));
        let mut f = frame(KIND_READY, &[]);
        f[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Msg::decode(&f), Err(WireError::TooLong { len: u32::MAX }));
        let big = frame(KIND_READY, &[0; MAX_PAYLOAD + 1]);
        assert_eq!(
            Msg::decode(&big),
            Err(WireError::TooLong {
                len: MAX_PAYLOAD as u32 + 1
            })
        );
        let mut f = frame(KIND_READY, &[]);
        f.push(0);
        assert!(matches!(
            Msg::decode(&f),
            Err(WireError::LenMismatch {
                declared: 0,
                actual: 1
            })
        ));
    }
}
