//! The state blob of a client connection: everything a worker taking over
//! after a crash needs that the kernel does not keep.
//!
//! It is saved with every commit (holdfast checksums and versions the blob
//! as a whole; this is schema version [`VERSION`]) and decoded without
//! trusting it: a blob that does not parse closes that one connection.
//!
//! Layout, little-endian:
//!
//! ```text
//! phase tag u8 | client_in u64 | origin_len u8 | [origin | cookie u64 | pos u64 if origin_len > 0] | phase fields
//!   0 idle     —
//!   1 request  req_start u64 | body tag u8 (0 none, 1 length, 2 chunked, 3 close) | body fields
//!                length: left u64;  chunked: dechunk u8 | parser tag u8 | size u64 | digits u8
//!   2 failing  status code u16
//!   3 tunnel   client_base u64 | up_base u64
//! ```

use crate::http::{Authority, Body, Chunked, Status};
use holdfast::blob::Reader;

/// Schema version of the blob.
pub const VERSION: u16 = 1;

/// Where a client connection stands at its last commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// Absolute offset of the client input committed so far: the next
    /// worker reads on from here (the kernel's counters count from the
    /// connection's start, so this lines them up).
    pub client_in: u64,
    /// The upstream connection held with this one, if the worker is to
    /// keep it.
    pub upstream: Option<Upstream>,
    pub phase: Phase,
}

/// The held upstream connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub origin: Authority,
    /// The socket's `SO_COOKIE`, unique while the system runs: the channel
    /// that comes back with the connection is this one only if its cookie
    /// matches (a worker that connected and held a new upstream but died
    /// before committing leaves another socket under the same tag).
    pub cookie: u64,
    /// Absolute offset of its input relayed to the client: reading goes on
    /// from here, and everything before it may be consumed.
    pub pos: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Between requests.
    Idle,
    /// A request (still uncommitted client input) is forwarded and
    /// answered. Its rewritten bytes go to the upstream from output
    /// offset `req_start` on; the answer is relayed from
    /// [`Upstream::pos`]: a response head there if `body` is `None`, else
    /// the body, standing at `body`.
    Request { req_start: u64, body: Option<Body> },
    /// The request is answered with this error and the connection closes.
    Failing(Status),
    /// A `CONNECT` tunnel: client input byte `client_base + k` is upstream
    /// output byte `up_base + k`; upstream input is relayed from
    /// [`Upstream::pos`].
    Tunnel { client_base: u64, up_base: u64 },
}

impl State {
    /// A new connection's state.
    pub fn new() -> State {
        State {
            client_in: 0,
            upstream: None,
            phase: Phase::Idle,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(match self.phase {
            Phase::Idle => 0,
            Phase::Request { .. } => 1,
            Phase::Failing(_) => 2,
            Phase::Tunnel { .. } => 3,
        });
        out.extend_from_slice(&self.client_in.to_le_bytes());
        match &self.upstream {
            None => out.push(0),
            Some(u) => {
                let origin = u.origin.to_string();
                // `Authority::parse` caps it at 255 bytes.
                out.push(origin.len().min(255) as u8);
                out.extend_from_slice(&origin.as_bytes()[..origin.len().min(255)]);
                out.extend_from_slice(&u.cookie.to_le_bytes());
                out.extend_from_slice(&u.pos.to_le_bytes());
            }
        }
        match &self.phase {
            Phase::Idle => {}
            Phase::Request { req_start, body } => {
                out.extend_from_slice(&req_start.to_le_bytes());
                encode_body(&mut out, body.as_ref());
            }
            Phase::Failing(s) => out.extend_from_slice(&s.code().to_le_bytes()),
            Phase::Tunnel {
                client_base,
                up_base,
            } => {
                out.extend_from_slice(&client_base.to_le_bytes());
                out.extend_from_slice(&up_base.to_le_bytes());
            }
        }
        out
    }

    /// The state in a blob (an empty blob: a new connection); `None` if it
    /// is not one this build wrote.
    pub fn decode(b: &[u8]) -> Option<State> {
        if b.is_empty() {
            return Some(State::new());
        }
        let mut r = Reader::new(b);
        let tag = r.u8()?;
        let client_in = r.u64()?;
        let origin_len = usize::from(r.u8()?);
        let upstream = if origin_len == 0 {
            None
        } else {
            let origin = std::str::from_utf8(r.take(origin_len)?).ok()?;
            Some(Upstream {
                origin: Authority::parse(origin, None)?,
                cookie: r.u64()?,
                pos: r.u64()?,
            })
        };
        let phase = match tag {
            0 => Phase::Idle,
            1 => Phase::Request {
                req_start: r.u64()?,
                body: decode_body(&mut r)?,
            },
            2 => Phase::Failing(Status::from_code(r.u16()?)?),
            3 => Phase::Tunnel {
                client_base: r.u64()?,
                up_base: r.u64()?,
            },
            _ => return None,
        };
        let needs_upstream = matches!(phase, Phase::Request { .. } | Phase::Tunnel { .. });
        if !r.is_empty() || (needs_upstream && upstream.is_none()) {
            return None;
        }
        Some(State {
            client_in,
            upstream,
            phase,
        })
    }
}

fn encode_body(out: &mut Vec<u8>, body: Option<&Body>) {
    match body {
        None => out.push(0),
        Some(Body::Length { left }) => {
            out.push(1);
            out.extend_from_slice(&left.to_le_bytes());
        }
        Some(Body::Chunked { state, dechunk }) => {
            out.push(2);
            out.push(u8::from(*dechunk));
            let (tag, size, digits) = match *state {
                Chunked::Size { size, digits } => (0, size, digits),
                Chunked::Ext { size } => (1, size, 0),
                Chunked::SizeLf { size } => (2, size, 0),
                Chunked::Data { left } => (3, left, 0),
                Chunked::DataCr => (4, 0, 0),
                Chunked::DataLf => (5, 0, 0),
                Chunked::TrailerStart => (6, 0, 0),
                Chunked::Trailer => (7, 0, 0),
                Chunked::TrailerLf => (8, 0, 0),
                Chunked::FinalLf => (9, 0, 0),
                Chunked::Done => (10, 0, 0),
            };
            out.push(tag);
            out.extend_from_slice(&size.to_le_bytes());
            out.push(digits);
        }
        Some(Body::Close) => out.push(3),
    }
}

/// `Some(None)`: no body; `None`: not a valid encoding.
fn decode_body(r: &mut Reader<'_>) -> Option<Option<Body>> {
    Some(match r.u8()? {
        0 => None,
        1 => Some(Body::Length { left: r.u64()? }),
        2 => {
            let dechunk = match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            };
            let (tag, size, digits) = (r.u8()?, r.u64()?, r.u8()?);
            let state = match tag {
                0 if digits <= 15 => Chunked::Size { size, digits },
                1 => Chunked::Ext { size },
                2 => Chunked::SizeLf { size },
                3 => Chunked::Data { left: size },
                4 => Chunked::DataCr,
                5 => Chunked::DataLf,
                6 => Chunked::TrailerStart,
                7 => Chunked::Trailer,
                8 => Chunked::TrailerLf,
                9 => Chunked::FinalLf,
                10 => Chunked::Done,
                _ => return None,
            };
            Some(Body::Chunked { state, dechunk })
        }
        3 => Some(Body::Close),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunked() -> impl Strategy<Value = Chunked> {
        prop_oneof![
            (any::<u64>(), 0u8..=15).prop_map(|(size, digits)| Chunked::Size { size, digits }),
            any::<u64>().prop_map(|size| Chunked::Ext { size }),
            any::<u64>().prop_map(|size| Chunked::SizeLf { size }),
            any::<u64>().prop_map(|left| Chunked::Data { left }),
            Just(Chunked::DataCr),
            Just(Chunked::DataLf),
            Just(Chunked::TrailerStart),
            Just(Chunked::Trailer),
            Just(Chunked::TrailerLf),
            Just(Chunked::FinalLf),
            Just(Chunked::Done),
        ]
    }

    fn body() -> impl Strategy<Value = Option<Body>> {
        prop_oneof![
            Just(None),
            any::<u64>().prop_map(|left| Some(Body::Length { left })),
            (chunked(), any::<bool>())
                .prop_map(|(state, dechunk)| Some(Body::Chunked { state, dechunk })),
            Just(Some(Body::Close)),
        ]
    }

    fn state() -> impl Strategy<Value = State> {
        let origin = prop_oneof![
            Just("example.com:80"),
            Just("[::1]:8080"),
            Just("127.0.0.1:1"),
        ]
        .prop_map(|s| Authority::parse(s, None).unwrap());
        let upstream =
            (origin, any::<u64>(), any::<u64>()).prop_map(|(origin, cookie, pos)| Upstream {
                origin,
                cookie,
                pos,
            });
        let phase = prop_oneof![
            Just(Phase::Idle),
            (any::<u64>(), body()).prop_map(|(req_start, body)| Phase::Request { req_start, body }),
            proptest::sample::select(Status::ALL.to_vec()).prop_map(Phase::Failing),
            (any::<u64>(), any::<u64>()).prop_map(|(client_base, up_base)| Phase::Tunnel {
                client_base,
                up_base
            }),
        ];
        (any::<u64>(), proptest::option::of(upstream), phase)
            .prop_map(|(client_in, upstream, phase)| State {
                client_in,
                upstream,
                phase,
            })
            .prop_filter("requests and tunnels hold an upstream", |s| {
                s.upstream.is_some() || matches!(s.phase, Phase::Idle | Phase::Failing(_))
            })
    }

    #[test]
    fn an_empty_blob_is_a_new_connection() {
        assert_eq!(State::decode(&[]), Some(State::new()));
    }

    #[test]
    fn the_largest_state_fits_in_a_blob() {
        let host = "h".repeat(249);
        let s = State {
            client_in: u64::MAX,
            upstream: Some(Upstream {
                origin: Authority::parse(&format!("{host}:65535"), None).unwrap(),
                cookie: u64::MAX,
                pos: u64::MAX,
            }),
            phase: Phase::Request {
                req_start: 1,
                body: Some(Body::Chunked {
                    state: Chunked::Size { size: 1, digits: 1 },
                    dechunk: true,
                }),
            },
        };
        let b = s.encode();
        assert!(b.len() <= holdfast::MAX_STATE, "{} bytes", b.len());
        assert_eq!(State::decode(&b), Some(s));
    }

    proptest! {
        #[test]
        fn roundtrip(s in state()) {
            prop_assert_eq!(State::decode(&s.encode()), Some(s));
        }

        #[test]
        fn decoding_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = State::decode(&b);
        }

        #[test]
        /// (Cut to nothing, a blob is a new connection's.)
        fn truncated_blobs_are_refused(s in state(), cut in 1usize..40) {
            let b = s.encode();
            let cut = cut.min(b.len() - 1);
            prop_assert_eq!(State::decode(&b[..b.len() - cut]), None);
        }
    }
}
