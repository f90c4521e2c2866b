//! Byte formats shared by the holdfast keeper and its workers.
//!
//! # Model
//!
//! A *keeper* process owns every TCP connection of a service and a memfd,
//! the *journal*, mapped by both the keeper and the *worker* that runs the
//! service. When the worker dies, the keeper hands the connections and the
//! journal to a new worker, which resumes each connection from its journal
//! record. This crate defines the two formats those processes agree on; it
//! does no I/O and touches no shared memory itself.
//!
//! * [`record`]: the per-connection journal record. Each connection owns a
//!   fixed [`RECORD_SIZE`](record::RECORD_SIZE)-byte region made of two slots.
//!   A record says how far the input stream has been consumed
//!   (`in_commit`), how far output has been committed (`out_commit`), which
//!   output was about to be written when the worker last checked in
//!   (`out_rec`, with a CRC of those bytes), plus a small opaque service state
//!   and a log of nondeterministic inputs (clock reads, random numbers) so a
//!   replay reproduces the same output. The worker writes every new version
//!   into the slot *not* holding the newest version, so a write torn by a
//!   crash destroys at most the version being written.
//! * [`wire`]: messages on the keeper/worker control socket (`SOCK_SEQPACKET`,
//!   one message per datagram, file descriptors beside it as `SCM_RIGHTS`).
//!
//! # Guarantees
//!
//! * Decoding is total: [`Record::decode`], [`pick`] and [`Msg::decode`]
//!   return a typed error for any input and never panic, index out of range,
//!   overflow or allocate more than a small bound. The journal is written by
//!   the very process whose crash we are recovering from, so its bytes are
//!   treated as untrusted.
//! * Everything is framed, versioned and checksummed (CRC-32C). Any single
//!   bit flip or truncation of a message, and any single bit flip in a
//!   record's meaningful bytes outside its two length fields, is always
//!   rejected (CRC-32C detects every single-bit error at a fixed length).
//!   Other damage, a flipped record length or a torn write included, gets
//!   through only if it happens to match the CRC: odds of about 2^-32.
//! * Decoders are strict: unknown flags, reserved bits, impossible lengths and
//!   offsets, and trailing bytes are errors, never ignored. An encoding that
//!   decodes has exactly one meaning, and re-encoding reproduces it.
//! * The record writer's hot path allocates nothing: [`Record`] keeps its state
//!   and nondet bytes in fixed arrays and encodes into a caller's slot buffer.
//!
//! # Non-goals
//!
//! * Moving bytes to and from the mapping. Callers copy the 1 KiB record out of
//!   (or a slot into) shared memory with whatever volatile or atomic copy the
//!   mapping owner uses; this crate works on plain arrays and is `unsafe`-free.
//! * Reading a record while a live worker writes it. Double buffering protects
//!   against one torn write at death, not against a reader racing a writer
//!   that may lap it; the keeper reads records only once the worker is gone.
//! * Power loss or kernel crash: the memfd does not outlive the machine.
//! * Authentication: the control socket is a private socketpair, and the
//!   checksums catch corruption and bugs, not adversaries.
//! * Interpreting the records: what `in_commit` & co. imply for a resumed
//!   connection is the business of the runtime crates.
#![forbid(unsafe_code)]

pub mod check;
pub mod record;
pub mod wire;

pub use record::{pick, slot_of, PickError, Record, RecordError, SlotError};
pub use wire::{ConnEntry, Msg, WireError};

/// Environment variable naming the worker's inherited control socket fd.
pub const ENV_CONTROL_FD: &str = "HOLDFAST_CONTROL_FD";
/// Environment variable naming the worker's inherited journal memfd.
pub const ENV_JOURNAL_FD: &str = "HOLDFAST_JOURNAL_FD";
/// Environment variable with the keeper's `--poison-after` (consecutive
/// crashes after which a request in flight is poison; 0: never).
pub const ENV_POISON_AFTER: &str = "HOLDFAST_POISON_AFTER";
/// Environment variable with the keeper's `--request-deadline` in
/// milliseconds (absent: no deadline).
pub const ENV_REQUEST_DEADLINE_MS: &str = "HOLDFAST_REQUEST_DEADLINE_MS";
/// Environment variable set (to `1`) when the keeper watches heartbeats
/// (`--hang-timeout`): only then does a worker's runtime beat, so an idle
/// worker is not woken otherwise.
pub const ENV_HEARTBEAT: &str = "HOLDFAST_HEARTBEAT";

/// An input spool (a memfd the keeper holds for a connection whose request
/// outgrew the socket buffer) keeps at this offset how far the worker that
/// has it read (an absolute input offset, `u64` little-endian): after a
/// crash, whether that worker was running the spooled request.
pub const SPOOL_READ_MARK: usize = 8;

/// The journal starts with one page reserved for its own header and
/// per-worker data; connection records follow, [`record::RECORD_SIZE`]
/// bytes each.
pub const HEADER_SIZE: usize = 4096;

/// Per-worker counters live in the header page: a heartbeat and a count
/// of committed requests, one `u64` each per worker.
const PER_WORKER: usize = (HEADER_SIZE / 8 - 1) / 2;

/// Byte offset of worker `worker_id`'s heartbeat counter in the journal
/// header: 8-aligned, inside the first page. Ids share a counter only when
/// they are 255 apart, and a keeper never runs that many workers at once.
pub fn heartbeat_offset(worker_id: u32) -> usize {
    8 * (1 + worker_id as usize % PER_WORKER)
}

/// Byte offset of worker `worker_id`'s count of committed requests (for
/// `--max-requests`), in the header page's second half.
pub fn requests_offset(worker_id: u32) -> usize {
    8 * (1 + PER_WORKER + worker_id as usize % PER_WORKER)
}

/// Byte offset of record `slot` in the journal (also the journal size
/// needed for `slot` records).
pub fn record_offset(slot: u32) -> usize {
    HEADER_SIZE + slot as usize * record::RECORD_SIZE
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn heartbeats_stay_in_the_header_and_aligned() {
        for id in [0, 1, 254, 255, 256, 510, 511, 512, u32::MAX] {
            for off in [heartbeat_offset(id), requests_offset(id)] {
                assert!(
                    off >= 8 && off + 8 <= HEADER_SIZE && off.is_multiple_of(8),
                    "{id} -> {off}"
                );
            }
        }
        assert_ne!(heartbeat_offset(1), heartbeat_offset(2));
        let hb: Vec<usize> = (0..255).map(heartbeat_offset).collect();
        assert!((0..255).map(requests_offset).all(|r| !hb.contains(&r)));
    }
}
