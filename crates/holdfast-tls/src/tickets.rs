//! Session tickets whose key belongs to the service, not to one worker:
//! a ticket issued by a worker that then died, or by the version before an
//! upgrade, resumes a session on the next one.
//!
//! The key is derived (HKDF-SHA256) from the certificate's private key,
//! which every worker of the service reads: no extra file, no state to
//! hand over, and a new key whenever the certificate's key changes. A
//! ticket is `key id (4) || nonce (12) || ChaCha20-Poly1305(session)`; its
//! nonce comes from the handshake's DRBG (`replay`), so issuing tickets
//! keeps the handshake replayable.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use rustls::server::ProducesTickets;

/// How long a ticket is good for (seconds): the same as rustls's own.
const LIFETIME: u32 = 6 * 60 * 60;

pub struct Tickets {
    key: LessSafeKey,
    id: [u8; 4],
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets").field("id", &self.id).finish()
    }
}

struct Len(usize);

impl ring::hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl Tickets {
    /// Tickets keyed by `secret` (the certificate's private key, DER).
    pub fn derived_from(secret: &[u8]) -> Tickets {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"holdfast-tls ticket key v1");
        let prk = salt.extract(secret);
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        let mut id = [0u8; 4];
        for (info, out) in [(&b"key"[..], &mut key[..]), (&b"id"[..], &mut id[..])] {
            prk.expand(&[info], Len(out.len()))
                .and_then(|okm| okm.fill(out))
                .expect("HKDF output within limit");
        }
        Tickets {
            key: LessSafeKey::new(
                UnboundKey::new(&CHACHA20_POLY1305, &key[..]).expect("ChaCha20 key length"),
            ),
            id,
        }
    }
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::replay::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(4 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&self.id),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (id, rest) = cipher.split_at_checked(4)?;
        if id != self.id {
            return None;
        }
        let (nonce, body) = rest.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(&self.id), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_open_with_the_same_service_key_only() {
        let a = Tickets::derived_from(b"key one");
        let b = Tickets::derived_from(b"key one");
        let c = Tickets::derived_from(b"key two");
        let t = a.encrypt(b"session").unwrap();
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"session"[..]));
        assert_eq!(c.decrypt(&t), None);
        let mut bad = t.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(b.decrypt(&bad), None);
        assert_eq!(b.decrypt(&t[..10]), None);
    }
}
