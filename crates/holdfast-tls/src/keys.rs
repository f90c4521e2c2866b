//! Traffic keys from traffic secrets (RFC 8446 §7.1, §7.3), with rustls's
//! HKDF and AEAD.
//!
//! The journal keeps the traffic *secrets*, not the keys: a secret is what
//! a KeyUpdate derives the next generation from, and it is all a new worker
//! needs (key and IV follow from it). rustls builds a correctly sized
//! `AeadKey` only inside its own key schedule; from outside, an `AeadKey`
//! is 32 bytes. So the suites this record layer runs are the two with
//! 32-byte keys, TLS_AES_256_GCM_SHA384 and TLS_CHACHA20_POLY1305_SHA256,
//! which every TLS 1.3 client offers in practice (see [`kept_suites`]).

use rustls::crypto::cipher::{AeadKey, Iv, MessageDecrypter, MessageEncrypter, NONCE_LEN};
use rustls::crypto::tls13::{HkdfExpander, OkmBlock};
use rustls::{CipherSuite, SupportedCipherSuite, Tls13CipherSuite};
use zeroize::Zeroizing;

/// TLS 1.3 suites the record layer runs (the server offers only these).
pub fn kept_suites() -> [SupportedCipherSuite; 2] {
    [
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ]
}

/// The TLS 1.3 suite with IANA id `id`, if the record layer runs it.
pub fn suite(id: u16) -> Option<&'static Tls13CipherSuite> {
    kept_suites()
        .into_iter()
        .filter_map(|s| s.tls13())
        .find(|s| u16::from(s.common.suite) == id)
}

pub fn suite_id(s: &Tls13CipherSuite) -> u16 {
    u16::from(s.common.suite)
}

/// Whether `s` is one the record layer runs.
pub fn is_kept(s: CipherSuite) -> bool {
    kept_suites().iter().any(|k| k.suite() == s)
}

/// HKDF-Expand-Label(secret, label, context, out.len()).
fn expand_label(exp: &dyn HkdfExpander, label: &[u8], context: &[u8], out: &mut [u8]) {
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let ctx_len = [context.len() as u8];
    let info: [&[u8]; 6] = [&len, &label_len, b"tls13 ", label, &ctx_len, context];
    // Lengths here are at most 48 bytes: far below HKDF's limit.
    exp.expand_slice(&info, out)
        .expect("HKDF output within limit");
}

/// One direction of a session: its secret, the AEAD built from it, and the
/// next record sequence number.
pub struct Direction {
    pub suite: &'static Tls13CipherSuite,
    pub secret: Zeroizing<Vec<u8>>,
    pub seq: u64,
}

impl Direction {
    pub fn new(suite: &'static Tls13CipherSuite, secret: &[u8], seq: u64) -> Direction {
        Direction {
            suite,
            secret: Zeroizing::new(secret.to_vec()),
            seq,
        }
    }

    fn key_iv(&self) -> (AeadKey, Iv) {
        let exp = self
            .suite
            .hkdf_provider
            .expander_for_okm(&OkmBlock::new(&self.secret));
        let mut key = Zeroizing::new([0u8; 32]);
        // Only suites with 32-byte keys are run (see the module doc).
        debug_assert_eq!(self.suite.aead_alg.key_len(), 32);
        expand_label(exp.as_ref(), b"key", &[], &mut key[..]);
        let mut iv = [0u8; NONCE_LEN];
        expand_label(exp.as_ref(), b"iv", &[], &mut iv);
        (AeadKey::from(*key), Iv::new(iv))
    }

    pub fn encrypter(&self) -> Box<dyn MessageEncrypter> {
        let (k, iv) = self.key_iv();
        self.suite.aead_alg.encrypter(k, iv)
    }

    pub fn decrypter(&self) -> Box<dyn MessageDecrypter> {
        let (k, iv) = self.key_iv();
        self.suite.aead_alg.decrypter(k, iv)
    }

    /// The next generation's secret (a KeyUpdate, RFC 8446 §7.2); the
    /// sequence number starts over.
    pub fn update(&mut self) {
        let exp = self
            .suite
            .hkdf_provider
            .expander_for_okm(&OkmBlock::new(&self.secret));
        let mut next = Zeroizing::new(vec![0u8; self.secret.len()]);
        expand_label(exp.as_ref(), b"traffic upd", &[], &mut next);
        self.secret = next;
        self.seq = 0;
    }
}
