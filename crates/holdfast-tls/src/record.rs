//! The hand-written part of the record layer: the 5-byte record header and
//! the TLS part of a connection's state blob. Both read bytes nobody vouches
//! for (a client's, a dead worker's), so both are small, total and fuzzed
//! (`fuzz/fuzz_targets/tls_record.rs`). Encryption and decryption are
//! rustls's own (`MessageEncrypter` / `MessageDecrypter`).

/// `TLSPlaintext.type` values.
pub const CHANGE_CIPHER_SPEC: u8 = 20;
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Header length of a TLS record.
pub const HEADER_LEN: usize = 5;
/// The largest plaintext a record carries (2^14).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// The largest `TLSCiphertext.length` allowed (RFC 8446 §5.2).
pub const MAX_CIPHERTEXT_13: usize = MAX_PLAINTEXT + 256;
/// The largest record length accepted during a handshake, which may still
/// turn out TLS 1.2 (RFC 5246 §6.2.3 allows 2^14 + 2048).
pub const MAX_RECORD_ANY: usize = MAX_PLAINTEXT + 2048;

/// A record header's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub typ: u8,
    pub version: u16,
    /// Length of the body after the header.
    pub len: usize,
}

impl Header {
    /// The whole record: header and body.
    pub fn total(&self) -> usize {
        HEADER_LEN + self.len
    }
}

/// Why a record header is refused, with the alert it calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadRecord {
    /// Not a content type of TLS (`unexpected_message`).
    Type(u8),
    /// Not a TLS record at all: major version other than 3 (`decode_error`).
    Version(u16),
    /// Longer than allowed (`record_overflow`).
    TooLong(usize),
}

impl BadRecord {
    /// The TLS alert description for it.
    pub fn alert(&self) -> u8 {
        match self {
            BadRecord::Type(_) => alert::UNEXPECTED_MESSAGE,
            BadRecord::Version(_) => alert::DECODE_ERROR,
            BadRecord::TooLong(_) => alert::RECORD_OVERFLOW,
        }
    }
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadRecord::Type(t) => write!(f, "record of unknown content type {t}"),
            BadRecord::Version(v) => write!(f, "record with version {v:#06x}"),
            BadRecord::TooLong(n) => write!(f, "record of {n} bytes is too long"),
        }
    }
}

/// Alert descriptions used here.
pub mod alert {
    pub const CLOSE_NOTIFY: u8 = 0;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const DECODE_ERROR: u8 = 50;
    pub const INTERNAL_ERROR: u8 = 80;
    pub const USER_CANCELED: u8 = 90;
}

/// Reads the header at the front of `buf`: `Ok(None)` if fewer than five
/// bytes are there. `max` is the largest body length accepted. The
/// `legacy_record_version` is otherwise ignored (RFC 8446 §5.1), but a
/// major version other than 3 is not TLS.
pub fn header(buf: &[u8], max: usize) -> Result<Option<Header>, BadRecord> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let typ = h[0];
    if !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&typ) {
        return Err(BadRecord::Type(typ));
    }
    let version = u16::from_be_bytes([h[1], h[2]]);
    if h[1] != 3 {
        return Err(BadRecord::Version(version));
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len > max {
        return Err(BadRecord::TooLong(len));
    }
    Ok(Some(Header { typ, version, len }))
}

/// The next whole record at the front of `buf`: `Ok(None)` until all of
/// it has arrived.
pub fn next_record(buf: &[u8], max: usize) -> Result<Option<Header>, BadRecord> {
    match header(buf, max)? {
        Some(h) if buf.len() >= h.total() => Ok(Some(h)),
        _ => Ok(None),
    }
}

/// The TLS part of a state blob: what a new worker needs to continue a
/// TLS 1.3 session at the last commit point. It lives in the connection's
/// journal record, in the keeper's memfd (never a file).
#[derive(Clone, PartialEq, Eq)]
pub enum Saved {
    /// A TLS 1.3 session whose record layer this library runs.
    Tls13 {
        /// IANA cipher suite id.
        suite: u16,
        /// Sequence number of the first record past the commit point.
        rx_seq: u64,
        /// Plaintext bytes of that record the service had consumed.
        rx_skip: u16,
        /// Sequence number of the next record this side sends.
        tx_seq: u64,
        /// Current traffic secrets (client's = rx, server's = tx).
        rx_secret: Vec<u8>,
        tx_secret: Vec<u8>,
    },
    /// A session rustls runs alone (TLS 1.2): it cannot move to another
    /// process, so a new worker closes it.
    Opaque,
}

impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Saved::Tls13 {
                suite,
                rx_seq,
                rx_skip,
                tx_seq,
                ..
            } => f
                .debug_struct("Tls13")
                .field("suite", suite)
                .field("rx_seq", rx_seq)
                .field("rx_skip", rx_skip)
                .field("tx_seq", tx_seq)
                .finish_non_exhaustive(),
            Saved::Opaque => f.write_str("Opaque"),
        }
    }
}

const TAG_TLS13: u8 = 0x13;
const TAG_OPAQUE: u8 = 0x12;
/// The largest traffic secret (SHA-384).
pub const MAX_SECRET: usize = 48;
/// Bytes the TLS part takes at most; the rest of `holdfast::MAX_STATE` is
/// the service's.
pub const MAX_SAVED: usize = 1 + 2 + 8 + 2 + 8 + 1 + 2 * MAX_SECRET;

impl Saved {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Saved::Tls13 {
                suite,
                rx_seq,
                rx_skip,
                tx_seq,
                rx_secret,
                tx_secret,
            } => {
                out.push(TAG_TLS13);
                out.extend_from_slice(&suite.to_le_bytes());
                out.extend_from_slice(&rx_seq.to_le_bytes());
                out.extend_from_slice(&rx_skip.to_le_bytes());
                out.extend_from_slice(&tx_seq.to_le_bytes());
                debug_assert_eq!(rx_secret.len(), tx_secret.len());
                out.push(rx_secret.len() as u8);
                out.extend_from_slice(rx_secret);
                out.extend_from_slice(tx_secret);
            }
            Saved::Opaque => out.push(TAG_OPAQUE),
        }
    }

    /// Splits a state blob into the TLS part and the service's part.
    /// `None` if the blob holds no valid TLS part.
    pub fn decode(b: &[u8]) -> Option<(Saved, &[u8])> {
        let (&tag, rest) = b.split_first()?;
        match tag {
            TAG_OPAQUE => Some((Saved::Opaque, rest)),
            TAG_TLS13 => {
                let suite = u16::from_le_bytes(rest.get(0..2)?.try_into().ok()?);
                let rx_seq = u64::from_le_bytes(rest.get(2..10)?.try_into().ok()?);
                let rx_skip = u16::from_le_bytes(rest.get(10..12)?.try_into().ok()?);
                let tx_seq = u64::from_le_bytes(rest.get(12..20)?.try_into().ok()?);
                let n = usize::from(*rest.get(20)?);
                if n == 0 || n > MAX_SECRET || usize::from(rx_skip) > MAX_PLAINTEXT {
                    return None;
                }
                let rx_secret = rest.get(21..21 + n)?.to_vec();
                let tx_secret = rest.get(21 + n..21 + 2 * n)?.to_vec();
                let app = &rest[21 + 2 * n..];
                Some((
                    Saved::Tls13 {
                        suite,
                        rx_seq,
                        rx_skip,
                        tx_seq,
                        rx_secret,
                        tx_secret,
                    },
                    app,
                ))
            }
            _ => None,
        }
    }
}

/// The fuzz target's checks (`fuzz/fuzz_targets/tls_record.rs`), also run
/// over the corpus by `cargo test`: `data` as a stream of records and as a
/// state blob. Never panics unless a check fails; returns whether the blob
/// decoded.
pub fn check(data: &[u8]) -> bool {
    for max in [MAX_CIPHERTEXT_13, MAX_RECORD_ANY] {
        let mut rest = data;
        loop {
            match next_record(rest, max) {
                Ok(Some(h)) => {
                    assert!(h.len <= max && h.total() <= rest.len());
                    assert!((CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&h.typ));
                    assert_eq!(h.version >> 8, 3);
                    rest = &rest[h.total()..];
                }
                Ok(None) => {
                    // Incomplete: a header says how much is missing.
                    if let Ok(Some(h)) = header(rest, max) {
                        assert!(h.total() > rest.len());
                    } else {
                        assert!(rest.len() < HEADER_LEN);
                    }
                    break;
                }
                Err(e) => {
                    assert!(rest.len() >= HEADER_LEN);
                    let _ = (e.alert(), e.to_string());
                    break;
                }
            }
        }
    }
    match Saved::decode(data) {
        Some((saved, app)) => {
            let mut again = Vec::new();
            saved.encode(&mut again);
            assert!(again.len() <= MAX_SAVED);
            assert_eq!(again.len() + app.len(), data.len());
            assert_eq!(&data[..again.len()], &again[..]);
            if let Saved::Tls13 { rx_skip, .. } = saved {
                assert!(usize::from(rx_skip) <= MAX_PLAINTEXT);
            }
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(header(&[23, 3, 3, 0], 100), Ok(None));
        assert_eq!(
            header(&[23, 3, 3, 0, 10], 100),
            Ok(Some(Header {
                typ: 23,
                version: 0x0303,
                len: 10
            }))
        );
        assert_eq!(next_record(&[23, 3, 3, 0, 2, 1], 100), Ok(None));
        assert!(next_record(&[23, 3, 3, 0, 2, 1, 2], 100).unwrap().is_some());
        assert_eq!(header(&[24, 3, 3, 0, 0], 100), Err(BadRecord::Type(24)));
        assert_eq!(
            header(&[22, 2, 0, 0, 0], 100),
            Err(BadRecord::Version(0x0200))
        );
        assert_eq!(header(&[23, 3, 3, 1, 0], 100), Err(BadRecord::TooLong(256)));
    }

    #[test]
    fn saved_round_trip() {
        let s = Saved::Tls13 {
            suite: 0x1302,
            rx_seq: 7,
            rx_skip: 300,
            tx_seq: u64::MAX,
            rx_secret: vec![1; 48],
            tx_secret: vec![2; 48],
        };
        let mut b = Vec::new();
        s.encode(&mut b);
        assert_eq!(b.len(), MAX_SAVED);
        b.extend_from_slice(b"app");
        let (d, app) = Saved::decode(&b).unwrap();
        assert_eq!(d, s);
        assert_eq!(app, b"app");
        for cut in 0..MAX_SAVED {
            assert!(Saved::decode(&b[..cut]).is_none(), "{cut}");
        }
        assert_eq!(
            Saved::decode(&[TAG_OPAQUE, 9]),
            Some((Saved::Opaque, &[9u8][..]))
        );
        assert!(Saved::decode(&[]).is_none());
    }
}
