//! The client side of hf-testsvc's line protocol, with the service's answer
//! generator copied here so every byte a test receives can be checked.
//!
//! `REQ <id> <len> <delay_ms>\n` is answered with `RESP <id> <len>\n`, `len`
//! bytes of [`pattern`]`(id, len, salt)` and `\n`; the service writes the
//! first [`half`] of that answer, sleeps, and writes the rest. `salt` is 0,
//! or the worker's pid when it runs with `--diverge`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::{bin, Keeper};

/// The answer body for request `id` — a copy of `pattern` in
/// services/hf-testsvc/src/main.rs (kept separate on purpose: if the service
/// changes what it sends, the tests must notice).
pub fn pattern(id: u64, len: usize, salt: u64) -> Vec<u8> {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt ^ 0xDEAD_BEEF;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

/// The whole answer to `REQ id len _` / `HOLD id len`.
pub fn answer(id: u64, len: usize, salt: u64) -> Vec<u8> {
    let mut out = format!("RESP {id} {len}\n").into_bytes();
    out.extend_from_slice(&pattern(id, len, salt));
    out.push(b'\n');
    out
}

/// How many bytes of [`answer`] the service writes before its pause.
pub fn half(id: u64, len: usize) -> usize {
    let total = format!("RESP {id} {len}\n").len() + len + 1;
    total / 2
}

/// Starts a keeper running hf-testsvc with `svc_args`.
pub fn keeper(keeper_args: &[&str], svc_args: &[&str]) -> Keeper {
    let exe = bin("hf-testsvc").display().to_string();
    let mut cmd = vec![exe.as_str()];
    cmd.extend_from_slice(svc_args);
    Keeper::start(keeper_args, &cmd)
}

/// A line-protocol client whose reads say exactly how they ended.
pub struct LineClient {
    s: TcpStream,
    /// For messages: which client this is.
    pub name: String,
}

impl LineClient {
    pub fn connect(addr: SocketAddr, name: impl Into<String>) -> LineClient {
        let name = name.into();
        let s =
            TcpStream::connect(addr).unwrap_or_else(|e| panic!("{name}: connect to {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        LineClient { s, name }
    }

    /// Wraps an already connected stream.
    pub fn from_stream(s: TcpStream, name: impl Into<String>) -> LineClient {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        LineClient {
            s,
            name: name.into(),
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.s
    }

    pub fn into_stream(self) -> TcpStream {
        self.s
    }

    pub fn send(&mut self, raw: &str) {
        self.s
            .write_all(raw.as_bytes())
            .unwrap_or_else(|e| panic!("{}: send {raw:?}: {e}", self.name));
    }

    /// Reads exactly `n` bytes, or says how the stream ended and after how
    /// many bytes (EOF, reset, timeout).
    pub fn read_n(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let mut got = vec![0u8; n];
        let mut at = 0;
        while at < n {
            match self.s.read(&mut got[at..]) {
                Ok(0) => return Err(format!("{}: EOF after {at} of {n} bytes", self.name)),
                Ok(k) => at += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(format!(
                        "{}: {e} ({:?}) after {at} of {n} bytes",
                        self.name,
                        e.kind()
                    ))
                }
            }
        }
        Ok(got)
    }

    /// Reads up to `n` bytes: what arrived, and `None` if all `n` did or how
    /// the stream ended (`Some(Ok(()))` for a clean EOF, `Some(Err(..))` for
    /// an error).
    pub fn read_upto(&mut self, n: usize) -> (Vec<u8>, Option<io::Result<()>>) {
        let mut got = vec![0u8; n];
        let mut at = 0;
        while at < n {
            match self.s.read(&mut got[at..]) {
                Ok(0) => {
                    got.truncate(at);
                    return (got, Some(Ok(())));
                }
                Ok(k) => at += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    got.truncate(at);
                    return (got, Some(Err(e)));
                }
            }
        }
        (got, None)
    }

    /// Reads `want.len()` bytes and checks them byte for byte.
    pub fn expect(&mut self, want: &[u8], what: &str) {
        let got = self
            .read_n(want.len())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "{}: {what}: {} bytes differ from byte {at} on: got {:?}…, want {:?}…",
                self.name,
                want.len(),
                String::from_utf8_lossy(&got[at..(at + 40).min(got.len())]),
                String::from_utf8_lossy(&want[at..(at + 40).min(want.len())]),
            );
        }
    }

    /// Sends `REQ id len 0` and checks the whole answer.
    pub fn request(&mut self, id: u64, len: usize, salt: u64) {
        self.send(&format!("REQ {id} {len} 0\n"));
        self.expect(
            &answer(id, len, salt),
            &format!("answer to REQ {id} {len} 0"),
        );
    }

    /// Waits up to `timeout` for the peer to end the stream: `Ok(())` on a
    /// clean EOF; otherwise what came instead (bytes, a reset, nothing).
    pub fn expect_eof(&mut self, timeout: Duration) -> Result<(), String> {
        self.s.set_read_timeout(Some(timeout)).expect("timeout");
        let mut buf = [0u8; 4096];
        let r = match self.s.read(&mut buf) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!(
                "{}: {n} more bytes instead of EOF: {:?}",
                self.name,
                String::from_utf8_lossy(&buf[..n.min(80)])
            )),
            Err(e) => Err(format!(
                "{}: {e} ({:?}) instead of a clean EOF",
                self.name,
                e.kind()
            )),
        };
        self.s
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        r
    }

    /// True if nothing arrives within `wait` (the peer is still holding
    /// back); panics if bytes or an end of stream arrive.
    pub fn assert_quiet(&mut self, wait: Duration, what: &str) {
        self.s.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 256];
        match self.s.read(&mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Ok(n) => panic!(
                "{}: {what}: expected silence, got {n} bytes {:?}",
                self.name,
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => panic!("{}: {what}: expected silence, got {e}", self.name),
        }
        self.s
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
    }
}
