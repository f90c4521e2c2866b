//! The demo site's big file, regenerated here to check downloads byte for
//! byte: a copy of `sample_bytes` and its constants from
//! services/hf-httpd/src/site.rs (kept separate on purpose: if the served
//! file changes, the tests must notice).

/// Size of the demo's `big.bin`.
pub const BIG_BIN_LEN: usize = 8 * 1024 * 1024;
/// Seed of the demo's `big.bin`.
pub const BIG_BIN_SEED: u64 = 0x686f_6c64_6661_7374;
/// The demo's `hello.txt`.
pub const HELLO_TXT: &[u8] = b"hello from hf-httpd\n";

/// Deterministic pseudo-random bytes (xorshift64*, little-endian words).
pub fn sample_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = if seed == 0 { BIG_BIN_SEED } else { seed };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
