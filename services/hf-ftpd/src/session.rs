//! The session state a control connection commits after every command, and
//! its compact binary encoding.
//!
//! The blob is what a new worker needs to carry on a session after a crash
//! or an upgrade: who is logged in, the working directory, the transfer
//! type, a pending `REST` offset or `RNFR` path, how the next data
//! connection is made, and a transfer in progress. Everything else (open
//! files, sockets) is either re-opened from this or comes back as a held
//! channel. Its schema version is holdfast's state version
//! ([`STATE_VERSION`]), declared when the listener binds, so the keeper
//! refuses an upgrade to a build that cannot read it; the journal frames and
//! checksums the blob.
//!
//! Layout (version 1), integers little-endian, `str8`/`str16` a length of
//! that width followed by UTF-8 bytes:
//!
//! ```text
//! flags u8          bit 0 binary type, bit 1 discarding an overlong line,
//!                   bit 2 the uncommitted command's file-system change started,
//!                   bit 3 the data connection is established
//! login u8 [str8]   0 out, 1 user named (PASS pending), 2 user, 3 anonymous
//! cwd str16
//! rest u64
//! rnfr u8 [str16]   0 none, 1 path
//! data u8 [..]      0 none, 1 passive (port u16), 2 active IPv4 (ip[4] port u16),
//!                   3 active IPv6 (ip[16] port u16)
//! transfer u8 [..]  0 none, 1 RETR, 2 STOR (path str16, start u64)
//! ```
//!
//! Decoding never panics: any input either decodes to a session or is
//! refused.

use holdfast::blob::{put_str16, put_str8, Reader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Schema version of the blob (holdfast's state version).
pub const STATE_VERSION: u16 = 1;

/// Longest user name accepted (it is kept in the blob).
pub const MAX_USER: usize = 64;

/// Who the control connection belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Login {
    #[default]
    Out,
    /// `USER` given, waiting for `PASS`.
    Named(String),
    User(String),
    Anonymous,
}

/// How the next data connection is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataMode {
    #[default]
    None,
    /// `PASV`/`EPSV`: the client connects to our listener (held channel 1)
    /// on this port.
    Passive(u16),
    /// `PORT`/`EPRT`: we connect to the client.
    Active(SocketAddr),
}

/// Direction of a file transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `RETR`: file → client.
    Send,
    /// `STOR`/`APPE`: client → file.
    Receive,
}

/// A file transfer whose `150` reply has been committed: a new worker
/// continues it from the data connection's position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub dir: Direction,
    /// Normalised virtual path of the file.
    pub path: String,
    /// File offset of the data connection's first byte.
    pub start: u64,
}

/// One control connection's committed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub login: Login,
    /// Normalised virtual working directory (`/` is the root).
    pub cwd: String,
    /// `TYPE I` (true) or `TYPE A`. Both transfer bytes unchanged.
    pub binary: bool,
    /// Offset set by `REST` for the next transfer.
    pub rest: u64,
    /// Path named by `RNFR`, waiting for `RNTO`.
    pub rnfr: Option<String>,
    pub data: DataMode,
    pub transfer: Option<Transfer>,
    /// An overlong command line was refused and its rest is being skipped.
    pub discarding: bool,
    /// The uncommitted command (`DELE`, `RMD`, `MKD`, `RNTO`) passed its
    /// checks and may have changed the file system before a crash.
    pub effect_started: bool,
    /// The data connection (held channel 2) is established. Committed
    /// before anything goes over an active one, so a new worker can tell a
    /// connection that is already closed from one that never connected.
    pub data_open: bool,
}

impl Default for Session {
    fn default() -> Session {
        Session {
            login: Login::Out,
            cwd: "/".to_owned(),
            binary: false,
            rest: 0,
            rnfr: None,
            data: DataMode::None,
            transfer: None,
            discarding: false,
            effect_started: false,
            data_open: false,
        }
    }
}

impl Session {
    pub fn logged_in(&self) -> bool {
        matches!(self.login, Login::User(_) | Login::Anonymous)
    }

    /// The blob committed after a command.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.push(
            u8::from(self.binary)
                | u8::from(self.discarding) << 1
                | u8::from(self.effect_started) << 2
                | u8::from(self.data_open) << 3,
        );
        match &self.login {
            Login::Out => b.push(0),
            Login::Named(u) => {
                b.push(1);
                put_str8(&mut b, u);
            }
            Login::User(u) => {
                b.push(2);
                put_str8(&mut b, u);
            }
            Login::Anonymous => b.push(3),
        }
        put_str16(&mut b, &self.cwd);
        b.extend_from_slice(&self.rest.to_le_bytes());
        match &self.rnfr {
            None => b.push(0),
            Some(p) => {
                b.push(1);
                put_str16(&mut b, p);
            }
        }
        match self.data {
            DataMode::None => b.push(0),
            DataMode::Passive(port) => {
                b.push(1);
                b.extend_from_slice(&port.to_le_bytes());
            }
            DataMode::Active(a) => {
                match a.ip() {
                    IpAddr::V4(ip) => {
                        b.push(2);
                        b.extend_from_slice(&ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        b.push(3);
                        b.extend_from_slice(&ip.octets());
                    }
                }
                b.extend_from_slice(&a.port().to_le_bytes());
            }
        }
        match &self.transfer {
            None => b.push(0),
            Some(t) => {
                b.push(match t.dir {
                    Direction::Send => 1,
                    Direction::Receive => 2,
                });
                put_str16(&mut b, &t.path);
                b.extend_from_slice(&t.start.to_le_bytes());
            }
        }
        b
    }

    /// Whether the blob fits holdfast's state limit. Commands that grow it
    /// (a deep `CWD`, a long `RNFR` or transfer path) check this before they
    /// answer, and refuse instead.
    pub fn fits(&self) -> bool {
        self.encode().len() <= holdfast::MAX_STATE
    }

    /// Reads a blob written by [`Session::encode`]; `None` for anything else.
    pub fn decode(version: u16, blob: &[u8]) -> Option<Session> {
        if version != STATE_VERSION {
            return None;
        }
        let mut r = Reader::new(blob);
        let flags = r.u8()?;
        if flags & !0b1111 != 0 {
            return None;
        }
        let login = match r.u8()? {
            0 => Login::Out,
            1 => Login::Named(r.str8()?),
            2 => Login::User(r.str8()?),
            3 => Login::Anonymous,
            _ => return None,
        };
        let cwd = r.str16()?;
        let rest = r.u64()?;
        let rnfr = match r.u8()? {
            0 => None,
            1 => Some(r.str16()?),
            _ => return None,
        };
        let data = match r.u8()? {
            0 => DataMode::None,
            1 => DataMode::Passive(r.u16()?),
            2 => {
                let ip: [u8; 4] = r.take(4)?.try_into().ok()?;
                DataMode::Active(SocketAddr::new(Ipv4Addr::from(ip).into(), r.u16()?))
            }
            3 => {
                let ip: [u8; 16] = r.take(16)?.try_into().ok()?;
                DataMode::Active(SocketAddr::new(Ipv6Addr::from(ip).into(), r.u16()?))
            }
            _ => return None,
        };
        let transfer = match r.u8()? {
            0 => None,
            tag @ (1 | 2) => Some(Transfer {
                dir: if tag == 1 {
                    Direction::Send
                } else {
                    Direction::Receive
                },
                path: r.str16()?,
                start: r.u64()?,
            }),
            _ => return None,
        };
        if !r.is_empty() || !cwd.starts_with('/') {
            return None;
        }
        Some(Session {
            login,
            cwd,
            binary: flags & 1 != 0,
            rest,
            rnfr,
            data,
            transfer,
            discarding: flags & 2 != 0,
            effect_started: flags & 4 != 0,
            data_open: flags & 8 != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn session() -> impl Strategy<Value = Session> {
        let login = prop_oneof![
            Just(Login::Out),
            "[a-z]{0,20}".prop_map(Login::Named),
            "[a-z]{0,20}".prop_map(Login::User),
            Just(Login::Anonymous),
        ];
        let data = prop_oneof![
            Just(DataMode::None),
            any::<u16>().prop_map(DataMode::Passive),
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| DataMode::Active(SocketAddr::from((ip, p)))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| DataMode::Active(SocketAddr::from((ip, p)))),
        ];
        let transfer = proptest::option::of(("/.{0,40}", any::<u64>(), any::<bool>()).prop_map(
            |(path, start, send)| Transfer {
                dir: if send {
                    Direction::Send
                } else {
                    Direction::Receive
                },
                path,
                start,
            },
        ));
        (
            login,
            "/[a-zé/ ]{0,60}",
            any::<bool>(),
            any::<u64>(),
            proptest::option::of("/.{0,30}"),
            data,
            transfer,
            (any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    login,
                    cwd,
                    binary,
                    rest,
                    rnfr,
                    data,
                    transfer,
                    (discarding, effect_started, data_open),
                )| Session {
                    login,
                    cwd,
                    binary,
                    rest,
                    rnfr,
                    data,
                    transfer,
                    discarding,
                    effect_started,
                    data_open,
                },
            )
    }

    proptest! {
        #[test]
        fn roundtrip(s in session()) {
            prop_assert_eq!(Session::decode(STATE_VERSION, &s.encode()), Some(s));
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400), v in 0u16..3) {
            let _ = Session::decode(v, &b);
        }

        #[test]
        fn truncated_blobs_are_refused(s in session(), cut in 0usize..200) {
            let b = s.encode();
            let cut = cut.min(b.len().saturating_sub(1));
            prop_assert_eq!(Session::decode(STATE_VERSION, &b[..cut]), None);
        }
    }

    #[test]
    fn default_session_is_small() {
        assert!(Session::default().encode().len() < 32);
        assert!(Session::default().fits());
    }

    #[test]
    fn other_versions_and_trailing_bytes_are_refused() {
        let b = Session::default().encode();
        assert_eq!(Session::decode(2, &b), None);
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(Session::decode(STATE_VERSION, &longer), None);
    }
}
