//! # holdfast-tls — TLS connections that survive the worker
//!
//! A TLS 1.3 session served by a holdfast worker outlives the worker: after
//! a SIGKILL, a hang or an upgrade the next worker continues the same
//! session, and the client sees nothing but a short stall.
//!
//! The handshake is rustls's. Once it is done, this crate runs the record
//! layer itself (this kernel has no kTLS), with rustls's AEAD
//! (`MessageEncrypter`/`MessageDecrypter`) and HKDF, and keeps the session's
//! state — cipher suite, both traffic secrets, both record sequence numbers,
//! and where inside a record the last commit fell — in the connection's
//! journal record with the service's own state blob. See `docs/tls.md`.
//!
//! - Input: a commit of plaintext up to some point consumes ciphertext up
//!   to the start of the record holding that point and records the offset
//!   in it; the next worker decrypts that record again and skips the offset.
//! - Output: record boundaries depend only on the sequence of plaintext
//!   writes, so a replayed answer encrypts (same key, same sequence numbers)
//!   into the same bytes, and holdfast's replay suppresses what the client
//!   already has and checks the rest.
//! - KeyUpdate both ways: the journal keeps the secret of the generation
//!   in force at each commit's cut; the server answers a request for an
//!   update at the commit that consumes it, a point fixed by the input.
//! - Resumption: stateless tickets keyed by the service (derived from the
//!   certificate's key, [`tickets`]), so a session resumes on any worker
//!   and after an upgrade.
//! - Handshake: every random value rustls draws comes from a DRBG seeded
//!   by a value recorded in the journal before the handshake, and signing
//!   and key exchange are deterministic given it ([`replay`]): a worker
//!   killed mid-handshake is replaced by one that sends the same bytes.
//! - TLS 1.2 is served by rustls alone: it does not survive its worker (a
//!   new worker closes such a connection).
//! - Without a keeper (pass-through), the same code serves plain TLS.
//! - Both flavours: [`TlsConn`] over the tokio `Conn` (the default
//!   [`Transport`]), [`blocking::TlsConn`] over the blocking one.

#![forbid(unsafe_code)]

pub mod blocking;
pub mod keys;
pub mod record;
pub mod replay;
pub mod tickets;
pub mod tokio;

pub use crate::tokio::{TlsAcceptor, TlsConn, Transport, MAX_APP_STATE};

/// The crypto provider the acceptor uses: rustls's *ring* provider for
/// AEADs and HKDF, offering for TLS 1.3 only the suites the record layer
/// runs ([`keys::kept_suites`]), and the ECDHE suites of TLS 1.2; with
/// randomness, key exchange (X25519, P-256) and signatures (ECDSA P-256,
/// RSA) replaced by the deterministic ones of [`replay`], so a handshake
/// replays byte for byte from its recorded seed.
pub fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    // ring's provider is deprecated for want of post-quantum key exchange;
    // it is used for its AEADs, HKDF and signatures and builds without
    // cmake.
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    let mut suites = keys::kept_suites().to_vec();
    suites.extend([
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]);
    p.cipher_suites = suites;
    p.kx_groups = replay::KX_GROUPS.to_vec();
    p.secure_random = &replay::Random;
    p.key_provider = &replay::Keys;
    p
}
