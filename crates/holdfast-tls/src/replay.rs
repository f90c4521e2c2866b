//! A replayable handshake: every random value a TLS 1.3 server handshake
//! draws comes from a DRBG seeded per connection with a value recorded in
//! the journal (`Conn::record`) before the handshake starts.
//!
//! rustls's server draws randomness in four places (rustls 0.23, checked
//! in its sources): `CryptoProvider::secure_random` for ServerHello.random
//! (and, in TLS 1.2, the session id; in TLS 1.3, ticket nonces and
//! `age_add`, but tickets are off), `SupportedKxGroup::start` for the key
//! share, and `Signer::sign` for CertificateVerify. The provider here
//! answers all of them from the DRBG of the handshake being driven on this
//! thread:
//!
//! - random bytes: ChaCha20 keyed with the seed;
//! - key shares: X25519 and P-256 secrets drawn from it;
//! - signatures: ECDSA P-256 with RFC 6979 nonces (deterministic by
//!   itself), RSA-PSS with its salt and blinding drawn from it.
//!
//! The handshake's output is then a function of (seed, client input): a
//! worker that dies mid-handshake is replaced by one that reads the same
//! ClientHello from the kernel, records nothing new (the seed comes back
//! from the journal), produces the same bytes, and holdfast sends only what
//! the client lacks. Secrets stay secret: the seed is 32 bytes from the
//! OS, kept in the journal memfd only until the handshake's commit.
//!
//! Outside a handshake (no DRBG installed on the thread) every call draws
//! from the OS.

use std::cell::RefCell;
use std::sync::Arc;

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, OsRng, RngCore, SeedableRng};
use rustls::crypto::{
    ActiveKeyExchange, GetRandomFailed, KeyProvider, SecureRandom, SharedSecret, SupportedKxGroup,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{Error, NamedGroup, PeerMisbehaved, SignatureAlgorithm, SignatureScheme};

thread_local! {
    static DRBG: RefCell<Option<ChaCha20Rng>> = const { RefCell::new(None) };
}

/// A handshake's DRBG, from its recorded seed.
pub struct Drbg(Option<ChaCha20Rng>);

impl Drbg {
    pub fn new(seed: [u8; 32]) -> Drbg {
        Drbg(Some(ChaCha20Rng::from_seed(seed)))
    }

    /// Runs `f` (a call into rustls) with this DRBG answering the
    /// provider's requests for randomness on this thread.
    pub fn enter<R>(&mut self, f: impl FnOnce() -> R) -> R {
        struct Restore<'a>(&'a mut Option<ChaCha20Rng>);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                *self.0 = DRBG.with(|d| d.borrow_mut().take());
            }
        }
        DRBG.with(|d| *d.borrow_mut() = self.0.take());
        let _restore = Restore(&mut self.0);
        f()
    }
}

/// Random bytes: the current handshake's DRBG, or the OS.
pub fn fill(buf: &mut [u8]) -> Result<(), GetRandomFailed> {
    let drawn = DRBG.with(|d| match d.borrow_mut().as_mut() {
        Some(r) => {
            r.fill_bytes(buf);
            true
        }
        None => false,
    });
    if drawn {
        Ok(())
    } else {
        OsRng.try_fill_bytes(buf).map_err(|_| GetRandomFailed)
    }
}

/// A fresh seed from the OS.
pub fn new_seed() -> [u8; 32] {
    let mut s = [0u8; 32];
    OsRng.fill_bytes(&mut s);
    s
}

/// [`fill`] as a `rand_core` generator, for the RustCrypto crates.
struct ThreadRng;

impl RngCore for ThreadRng {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        // The OS failing to give randomness is not recoverable.
        fill(dest).expect("system randomness");
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        fill(dest).map_err(|_| rand_core::Error::new("no randomness"))
    }
}

impl CryptoRng for ThreadRng {}

#[derive(Debug)]
pub struct Random;

impl SecureRandom for Random {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        fill(buf)
    }
}

/// X25519 with a secret drawn from the DRBG.
#[derive(Debug)]
pub struct X25519;

struct X25519Share {
    secret: x25519_dalek::StaticSecret,
    public: [u8; 32],
}

impl SupportedKxGroup for X25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let mut b = zeroize::Zeroizing::new([0u8; 32]);
        fill(&mut b[..])?;
        let secret = x25519_dalek::StaticSecret::from(*b);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Ok(Box::new(X25519Share { secret, public }))
    }
    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

impl ActiveKeyExchange for X25519Share {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        let peer: [u8; 32] = peer
            .try_into()
            .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        if !shared.was_contributory() {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        Ok(SharedSecret::from(&shared.as_bytes()[..]))
    }
    fn pub_key(&self) -> &[u8] {
        &self.public
    }
    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// ECDH on P-256 with a secret drawn from the DRBG.
#[derive(Debug)]
pub struct P256;

struct P256Share {
    secret: p256::SecretKey,
    public: Vec<u8>,
}

impl SupportedKxGroup for P256 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let secret = p256::SecretKey::random(&mut ThreadRng);
        let public = p256::EncodedPoint::from(secret.public_key())
            .as_bytes()
            .to_vec();
        Ok(Box::new(P256Share { secret, public }))
    }
    fn name(&self) -> NamedGroup {
        NamedGroup::secp256r1
    }
}

impl ActiveKeyExchange for P256Share {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        // TLS sends uncompressed points only (RFC 8446 §4.2.8.2).
        if peer.len() != 65 || peer[0] != 4 {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let peer = p256::PublicKey::from_sec1_bytes(peer)
            .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), peer.as_affine());
        Ok(SharedSecret::from(&shared.raw_secret_bytes()[..]))
    }
    fn pub_key(&self) -> &[u8] {
        &self.public
    }
    fn group(&self) -> NamedGroup {
        NamedGroup::secp256r1
    }
}

/// Loads ECDSA P-256 and RSA keys as deterministic signers; other kinds
/// go to *ring* (Ed25519 is deterministic by itself; others make a killed
/// handshake end in a clean close instead of a replay).
#[derive(Debug)]
pub struct Keys;

impl KeyProvider for Keys {
    fn load_private_key(&self, der: PrivateKeyDer<'static>) -> Result<Arc<dyn SigningKey>, Error> {
        use p256::pkcs8::DecodePrivateKey;
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let ecdsa = match &der {
            PrivateKeyDer::Pkcs8(k) => {
                p256::ecdsa::SigningKey::from_pkcs8_der(k.secret_pkcs8_der()).ok()
            }
            PrivateKeyDer::Sec1(k) => p256::SecretKey::from_sec1_der(k.secret_sec1_der())
                .ok()
                .map(p256::ecdsa::SigningKey::from),
            _ => None,
        };
        if let Some(k) = ecdsa {
            return Ok(Arc::new(EcdsaKey(Arc::new(k))));
        }
        let rsa = match &der {
            PrivateKeyDer::Pkcs8(k) => {
                rsa::RsaPrivateKey::from_pkcs8_der(k.secret_pkcs8_der()).ok()
            }
            PrivateKeyDer::Pkcs1(k) => {
                rsa::RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der()).ok()
            }
            _ => None,
        };
        if let Some(k) = rsa {
            return Ok(Arc::new(RsaKey(Arc::new(k))));
        }
        rustls::crypto::ring::sign::any_supported_type(&der)
    }
}

#[derive(Debug)]
struct EcdsaKey(Arc<p256::ecdsa::SigningKey>);

impl SigningKey for EcdsaKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(EcdsaSigner(self.0.clone())) as Box<dyn Signer>)
    }
    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct EcdsaSigner(Arc<p256::ecdsa::SigningKey>);

impl Signer for EcdsaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        use p256::ecdsa::signature::Signer as _;
        // SHA-256 of the message, nonce by RFC 6979: deterministic.
        let sig: p256::ecdsa::Signature = self.0.sign(message);
        Ok(sig.to_der().as_bytes().to_vec())
    }
    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

#[derive(Debug)]
struct RsaKey(Arc<rsa::RsaPrivateKey>);

/// RSA schemes in order of preference: PSS (the only ones TLS 1.3 allows),
/// then PKCS#1 v1.5 for TLS 1.2.
const RSA_SCHEMES: [SignatureScheme; 6] = [
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PKCS1_SHA256,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA512,
];

impl SigningKey for RsaKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        RSA_SCHEMES
            .iter()
            .find(|s| offered.contains(s))
            .map(|s| Box::new(RsaSigner(self.0.clone(), *s)) as Box<dyn Signer>)
    }
    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::RSA
    }
}

#[derive(Debug)]
struct RsaSigner(Arc<rsa::RsaPrivateKey>, SignatureScheme);

impl Signer for RsaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        use rsa::signature::{RandomizedSigner, SignatureEncoding};
        use sha2::{Sha256, Sha384, Sha512};
        let k = (*self.0).clone();
        let rng = &mut ThreadRng;
        // Salt (PSS: as long as the hash, RFC 8446 §4.2.3) and blinding
        // come from the DRBG.
        let sig = match self.1 {
            SignatureScheme::RSA_PSS_SHA256 => rsa::pss::BlindedSigningKey::<Sha256>::new(k)
                .try_sign_with_rng(rng, message)
                .map(|s| s.to_vec()),
            SignatureScheme::RSA_PSS_SHA384 => rsa::pss::BlindedSigningKey::<Sha384>::new(k)
                .try_sign_with_rng(rng, message)
                .map(|s| s.to_vec()),
            SignatureScheme::RSA_PSS_SHA512 => rsa::pss::BlindedSigningKey::<Sha512>::new(k)
                .try_sign_with_rng(rng, message)
                .map(|s| s.to_vec()),
            SignatureScheme::RSA_PKCS1_SHA256 => rsa::pkcs1v15::SigningKey::<Sha256>::new(k)
                .try_sign_with_rng(rng, message)
                .map(|s| s.to_vec()),
            SignatureScheme::RSA_PKCS1_SHA384 => rsa::pkcs1v15::SigningKey::<Sha384>::new(k)
                .try_sign_with_rng(rng, message)
                .map(|s| s.to_vec()),
            _ => rsa::pkcs1v15::SigningKey::<Sha512>::new(k)
                .try_sign_with_rng(rng, message)
                .map(|s| s.to_vec()),
        };
        sig.map_err(|e| Error::General(format!("RSA signature: {e}")))
    }
    fn scheme(&self) -> SignatureScheme {
        self.1
    }
}

pub static KX_GROUPS: [&dyn SupportedKxGroup; 2] = [&X25519, &P256];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_values() {
        let draw = |seed| {
            let mut d = Drbg::new(seed);
            d.enter(|| {
                let mut r = [0u8; 32];
                fill(&mut r).unwrap();
                let x = X25519.start().unwrap().pub_key().to_vec();
                let p = P256.start().unwrap().pub_key().to_vec();
                (r, x, p)
            })
        };
        assert_eq!(draw([7; 32]), draw([7; 32]));
        assert_ne!(draw([7; 32]), draw([8; 32]));
        // Outside a handshake: the OS.
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        fill(&mut a).unwrap();
        fill(&mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn key_exchanges_agree() {
        for g in KX_GROUPS {
            let a = g.start().unwrap();
            let b = g.start().unwrap();
            let pa = a.pub_key().to_vec();
            let sa = a.complete(b.pub_key()).unwrap();
            let sb = b.complete(&pa).unwrap();
            assert_eq!(sa.secret_bytes(), sb.secret_bytes());
        }
        assert!(X25519.start().unwrap().complete(&[0u8; 32]).is_err());
    }
}
