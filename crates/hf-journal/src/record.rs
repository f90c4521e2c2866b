//! The per-connection journal record: two checksummed slots written alternately.
//!
//! Slot layout (little-endian):
//!
//! ```text
//!  0  magic u32 = 0x4846_5243      32  out_commit u64
//!  4  version u16 = 1              40  out_rec u64
//!  6  flags u16                    48  out_crc u32
//!  8  seq u64                      52  state_version u16
//! 16  conn_id u64                  54  state_len u16
//! 24  in_commit u64                56  nondet_len u16
//!                                  58  deaths u16 (worker crashes with this request in flight)
//!                                  60  crc u32 over [0,60) ++ [64, 64+state_len+nondet_len)
//!                                  64  state bytes, then nondet bytes
//! ```
//!
//! The version with sequence number `s` lives in slot [`slot_of`]`(s)`; writers
//! bump `seq` before each write, so consecutive versions alternate slots and
//! the slot being overwritten never holds the newest complete version.

use std::fmt;

use thiserror::Error;

pub const SLOT_SIZE: usize = 512;
pub const RECORD_SIZE: usize = 2 * SLOT_SIZE;
pub const MAX_STATE: usize = 384;
pub const MAX_NONDET: usize = 60;
pub const FLAG_CLOSING: u16 = 1;
/// The request in flight must not run again after a crash: the next worker
/// answers it with the service's error.
pub const FLAG_NO_REPLAY_ERROR: u16 = 2;
/// The request in flight must not run again after a crash: the next worker
/// closes the connection cleanly.
pub const FLAG_NO_REPLAY_CLOSE: u16 = 4;
/// The output since the commit is not covered by `out_crc`: the service
/// regenerates it byte for byte by construction (`skip_output_check`).
pub const FLAG_UNCHECKED: u16 = 8;
/// Every flag a record may carry.
pub const FLAGS: u16 = FLAG_CLOSING | FLAG_NO_REPLAY_ERROR | FLAG_NO_REPLAY_CLOSE | FLAG_UNCHECKED;
/// Largest accepted `out_rec - out_commit`. Far beyond any real output
/// window; a larger value can only come from a writer bug, and acting on it
/// would mean reasoning about terabytes of output that never existed.
pub const MAX_PENDING_OUT: u64 = 1 << 40;
pub const MAGIC: u32 = 0x4846_5243;
pub const VERSION: u16 = 1;

const HEADER: usize = 64;
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_FLAGS: usize = 6;
const OFF_SEQ: usize = 8;
const OFF_CONN_ID: usize = 16;
const OFF_IN_COMMIT: usize = 24;
const OFF_OUT_COMMIT: usize = 32;
const OFF_OUT_REC: usize = 40;
const OFF_OUT_CRC: usize = 48;
const OFF_STATE_VERSION: usize = 52;
const OFF_STATE_LEN: usize = 54;
const OFF_NONDET_LEN: usize = 56;
const OFF_DEATHS: usize = 58;
const OFF_CRC: usize = 60;

// The payload must fit in a slot whatever the lengths, so a length that passes
// the MAX_* checks can never point past the slot.
const _: () = assert!(HEADER + MAX_STATE + MAX_NONDET <= SLOT_SIZE);

#[derive(Clone, Copy, PartialEq, Eq, Debug, Error)]
pub enum RecordError {
    #[error("bad record magic")]
    BadMagic,
    #[error("unsupported record version {0}")]
    BadVersion(u16),
    #[error("unknown record flags {0:#06x}")]
    BadFlags(u16),
    #[error("record lengths out of range (state {state}, nondet {nondet})")]
    Lengths { state: u16, nondet: u16 },
    #[error("record checksum mismatch (torn or corrupt write)")]
    Checksum,
    #[error("record output offsets inconsistent (out_rec before out_commit or too far ahead)")]
    Offsets,
    #[error("data too large for a record")]
    TooLarge,
    #[error("record slot never written")]
    Unwritten,
}

/// Why one slot of a record could not be used by [`pick`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Error)]
pub enum SlotError {
    #[error(transparent)]
    Invalid(#[from] RecordError),
    #[error("slot belongs to connection {found}, not {expected}")]
    WrongConn { expected: u64, found: u64 },
    #[error("seq {seq} found in slot {slot}, but seq s belongs in slot s % 2")]
    Misplaced { seq: u64, slot: usize },
}

/// Neither slot of a record holds a usable version; both reasons are kept for the log.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Error)]
#[error("no usable journal slot (slot 0: {slot0}; slot 1: {slot1})")]
pub struct PickError {
    pub slot0: SlotError,
    pub slot1: SlotError,
}

/// One version of a connection's journal record.
///
/// Invariant: bytes of `state`/`nondet` past their lengths are zero, so the
/// derived equality compares exactly the meaningful content.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// Bit 0 [`FLAG_CLOSING`]: the service closed the connection; bits 1
    /// and 2 [`FLAG_NO_REPLAY_ERROR`], [`FLAG_NO_REPLAY_CLOSE`]: the replay
    /// policy of the request in flight; bit 3 [`FLAG_UNCHECKED`]. Other bits
    /// are rejected.
    pub flags: u16,
    /// Version number, >= 1 once written; decides the slot (see [`slot_of`]).
    pub seq: u64,
    pub conn_id: u64,
    /// Absolute input stream offset consumed by the last commit.
    pub in_commit: u64,
    /// Absolute output stream offset at the last commit.
    pub out_commit: u64,
    /// End of output recorded as about to be written; `out_commit <= out_rec`.
    pub out_rec: u64,
    /// CRC-32C of output bytes `[out_commit, out_rec)`.
    pub out_crc: u32,
    /// Service-defined version of the `state` bytes.
    pub state_version: u16,
    /// Worker crashes the request after `in_commit` was in flight for; a
    /// commit resets it. Poison-request detection counts with it.
    pub deaths: u16,
    state: [u8; MAX_STATE],
    state_len: u16,
    nondet: [u8; MAX_NONDET],
    nondet_len: u16,
}

impl Record {
    /// A blank record for `conn_id`: seq 0 (bump before the first write), all offsets zero.
    pub fn new(conn_id: u64) -> Record {
        Record {
            flags: 0,
            seq: 0,
            conn_id,
            in_commit: 0,
            out_commit: 0,
            out_rec: 0,
            out_crc: 0,
            deaths: 0,
            state_version: 0,
            state: [0; MAX_STATE],
            state_len: 0,
            nondet: [0; MAX_NONDET],
            nondet_len: 0,
        }
    }

    pub fn state(&self) -> &[u8] {
        self.state
            .get(..usize::from(self.state_len))
            .unwrap_or_default()
    }

    /// Replaces the service state; on error the record is unchanged.
    pub fn set_state(&mut self, version: u16, bytes: &[u8]) -> Result<(), RecordError> {
        if bytes.len() > MAX_STATE {
            return Err(RecordError::TooLarge);
        }
        let len = u16::try_from(bytes.len()).map_err(|_| RecordError::TooLarge)?;
        // Wipe first: a shorter state must not leave stale bytes behind (see the invariant).
        self.state = [0; MAX_STATE];
        copy_into(self.state.iter_mut(), bytes);
        self.state_len = len;
        self.state_version = version;
        Ok(())
    }

    pub fn nondet(&self) -> &[u8] {
        self.nondet
            .get(..usize::from(self.nondet_len))
            .unwrap_or_default()
    }

    /// Appends to the nondet log; on error the record is unchanged.
    pub fn push_nondet(&mut self, bytes: &[u8]) -> Result<(), RecordError> {
        let start = usize::from(self.nondet_len);
        let end = start
            .checked_add(bytes.len())
            .filter(|&end| end <= MAX_NONDET)
            .ok_or(RecordError::TooLarge)?;
        let len = u16::try_from(end).map_err(|_| RecordError::TooLarge)?;
        copy_into(self.nondet.iter_mut().skip(start), bytes);
        self.nondet_len = len;
        Ok(())
    }

    pub fn clear_nondet(&mut self) {
        self.nondet = [0; MAX_NONDET];
        self.nondet_len = 0;
    }

    pub fn closing(&self) -> bool {
        self.flags & FLAG_CLOSING != 0
    }

    /// Encodes into a slot buffer; returns how many leading bytes are
    /// meaningful (64 + payload) so the writer copies only those. Bytes past
    /// that are left untouched.
    ///
    /// Encoding does not validate: a record with seq 0, unknown flags or
    /// inconsistent offsets is written faithfully and then refused by
    /// [`Record::decode`], which is the single gatekeeper.
    pub fn encode(&self, slot: &mut [u8; SLOT_SIZE]) -> usize {
        let state = self.state();
        let nondet = self.nondet();
        put::<OFF_MAGIC, 4>(slot, MAGIC.to_le_bytes());
        put::<OFF_VERSION, 2>(slot, VERSION.to_le_bytes());
        put::<OFF_FLAGS, 2>(slot, self.flags.to_le_bytes());
        put::<OFF_SEQ, 8>(slot, self.seq.to_le_bytes());
        put::<OFF_CONN_ID, 8>(slot, self.conn_id.to_le_bytes());
        put::<OFF_IN_COMMIT, 8>(slot, self.in_commit.to_le_bytes());
        put::<OFF_OUT_COMMIT, 8>(slot, self.out_commit.to_le_bytes());
        put::<OFF_OUT_REC, 8>(slot, self.out_rec.to_le_bytes());
        put::<OFF_OUT_CRC, 4>(slot, self.out_crc.to_le_bytes());
        put::<OFF_STATE_VERSION, 2>(slot, self.state_version.to_le_bytes());
        put::<OFF_STATE_LEN, 2>(slot, self.state_len.to_le_bytes());
        put::<OFF_NONDET_LEN, 2>(slot, self.nondet_len.to_le_bytes());
        put::<OFF_DEATHS, 2>(slot, self.deaths.to_le_bytes());
        copy_into(slot.iter_mut().skip(HEADER), state.iter().chain(nondet));
        let crc = crc32c::crc32c(&get::<0, OFF_CRC>(slot));
        let crc = crc32c::crc32c_append(crc32c::crc32c_append(crc, state), nondet);
        put::<OFF_CRC, 4>(slot, crc.to_le_bytes());
        HEADER + state.len() + nondet.len()
    }

    pub fn decode(slot: &[u8; SLOT_SIZE]) -> Result<Record, RecordError> {
        let head = get::<0, OFF_CRC>(slot);
        let crc = u32::from_le_bytes(get::<OFF_CRC, 4>(slot));
        // Journal pages start zeroed; reporting "bad magic" for a slot nobody
        // has written yet would send whoever reads the log on a false trail.
        if crc == 0 && head.iter().all(|&b| b == 0) {
            return Err(RecordError::Unwritten);
        }
        if u32::from_le_bytes(get::<OFF_MAGIC, 4>(slot)) != MAGIC {
            return Err(RecordError::BadMagic);
        }
        let version = u16::from_le_bytes(get::<OFF_VERSION, 2>(slot));
        if version != VERSION {
            return Err(RecordError::BadVersion(version));
        }
        let state_len = u16::from_le_bytes(get::<OFF_STATE_LEN, 2>(slot));
        let nondet_len = u16::from_le_bytes(get::<OFF_NONDET_LEN, 2>(slot));
        let lengths = RecordError::Lengths {
            state: state_len,
            nondet: nondet_len,
        };
        let (state_len, nondet_len) = (usize::from(state_len), usize::from(nondet_len));
        if state_len > MAX_STATE || nondet_len > MAX_NONDET {
            return Err(lengths);
        }
        // Cannot overflow or run past the slot: bounded by the const assert above.
        let payload = slot
            .get(HEADER..HEADER + state_len + nondet_len)
            .ok_or(lengths)?;
        if crc32c::crc32c_append(crc32c::crc32c(&head), payload) != crc {
            return Err(RecordError::Checksum);
        }

        // The bytes are now exactly what some writer meant to write; the
        // remaining checks catch writer bugs and formats we do not understand.
        let flags = u16::from_le_bytes(get::<OFF_FLAGS, 2>(slot));
        if flags & !FLAGS != 0 {
            return Err(RecordError::BadFlags(flags));
        }
        let seq = u64::from_le_bytes(get::<OFF_SEQ, 8>(slot));
        if seq == 0 {
            return Err(RecordError::Unwritten);
        }
        let out_commit = u64::from_le_bytes(get::<OFF_OUT_COMMIT, 8>(slot));
        let out_rec = u64::from_le_bytes(get::<OFF_OUT_REC, 8>(slot));
        match out_rec.checked_sub(out_commit) {
            Some(pending) if pending <= MAX_PENDING_OUT => {}
            _ => return Err(RecordError::Offsets),
        }
        let (state, nondet) = payload.split_at_checked(state_len).ok_or(lengths)?;

        let mut rec = Record::new(u64::from_le_bytes(get::<OFF_CONN_ID, 8>(slot)));
        rec.flags = flags;
        rec.seq = seq;
        rec.in_commit = u64::from_le_bytes(get::<OFF_IN_COMMIT, 8>(slot));
        rec.out_commit = out_commit;
        rec.out_rec = out_rec;
        rec.out_crc = u32::from_le_bytes(get::<OFF_OUT_CRC, 4>(slot));
        rec.deaths = u16::from_le_bytes(get::<OFF_DEATHS, 2>(slot));
        rec.set_state(u16::from_le_bytes(get::<OFF_STATE_VERSION, 2>(slot)), state)?;
        rec.push_nondet(nondet)?;
        Ok(rec)
    }
}

// Hand-written so logs show the meaningful bytes, not 444 bytes of padding.
impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("flags", &self.flags)
            .field("seq", &self.seq)
            .field("conn_id", &self.conn_id)
            .field("in_commit", &self.in_commit)
            .field("out_commit", &self.out_commit)
            .field("out_rec", &self.out_rec)
            .field("out_crc", &self.out_crc)
            .field("state_version", &self.state_version)
            .field("deaths", &self.deaths)
            .field("state", &self.state())
            .field("nondet", &self.nondet())
            .finish()
    }
}

/// Which of the two slots the version with sequence number `seq` lives in.
/// Writers bump seq by 1 before every write, so versions alternate slots.
pub fn slot_of(seq: u64) -> usize {
    usize::from(seq % 2 == 1)
}

/// Reads both slots of a record (a private copy of its 1024 bytes) and returns
/// the valid version with the highest seq that belongs to `conn_id`.
///
/// The conn_id filter matters when a record region is reused for a new
/// connection: the other slot may still hold the previous owner's version,
/// possibly with a higher seq.
pub fn pick(record: &[u8; RECORD_SIZE], conn_id: u64) -> Result<Record, PickError> {
    let mut slots = [[0u8; SLOT_SIZE]; 2];
    copy_into(slots.iter_mut().flatten(), record);
    let [slot0, slot1] = slots;
    let check = |index: usize, slot: &[u8; SLOT_SIZE]| -> Result<Record, SlotError> {
        let rec = Record::decode(slot)?;
        if rec.conn_id != conn_id {
            return Err(SlotError::WrongConn {
                expected: conn_id,
                found: rec.conn_id,
            });
        }
        // A version in the wrong slot means the writer broke the alternation,
        // and then "the other slot is intact" no longer holds: refuse it.
        if slot_of(rec.seq) != index {
            return Err(SlotError::Misplaced {
                seq: rec.seq,
                slot: index,
            });
        }
        Ok(rec)
    };
    match (check(0, &slot0), check(1, &slot1)) {
        // Equal seqs are impossible here: they would share a slot.
        (Ok(a), Ok(b)) => Ok(if a.seq > b.seq { a } else { b }),
        (Ok(rec), Err(_)) | (Err(_), Ok(rec)) => Ok(rec),
        (Err(slot0), Err(slot1)) => Err(PickError { slot0, slot1 }),
    }
}

/// Copies `src` over the front of `dst`, stopping at whichever ends first.
/// Used instead of slice indexing so no length mismatch can ever panic.
fn copy_into<'a, 'b>(dst: impl Iterator<Item = &'a mut u8>, src: impl IntoIterator<Item = &'b u8>) {
    dst.zip(src).for_each(|(d, s)| *d = *s);
}

/// The `N` bytes at offset `OFF`. The inline const makes an out-of-range field
/// a build error, so the copy is always complete.
fn get<const OFF: usize, const N: usize>(slot: &[u8; SLOT_SIZE]) -> [u8; N] {
    const { assert!(OFF + N <= SLOT_SIZE) };
    let mut out = [0; N];
    copy_into(out.iter_mut(), slot.iter().skip(OFF));
    out
}

fn put<const OFF: usize, const N: usize>(slot: &mut [u8; SLOT_SIZE], bytes: [u8; N]) {
    const { assert!(OFF + N <= SLOT_SIZE) };
    copy_into(slot.iter_mut().skip(OFF), &bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Record {
        let mut r = Record::new(7);
        r.seq = seq;
        r.in_commit = 100;
        r.out_commit = 50;
        r.out_rec = 80;
        r.out_crc = 0xdead_beef;
        r.set_state(3, b"state").unwrap();
        r.push_nondet(b"clock").unwrap();
        r
    }

    /// Encodes, lets `edit` corrupt a header field, then re-seals the CRC so
    /// the semantic checks (not the checksum) are what reject it.
    fn resealed(edit: impl FnOnce(&mut [u8; SLOT_SIZE])) -> Result<Record, RecordError> {
        let mut slot = [0; SLOT_SIZE];
        let n = sample(1).encode(&mut slot);
        edit(&mut slot);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&slot[..OFF_CRC]), &slot[HEADER..n]);
        slot[OFF_CRC..HEADER].copy_from_slice(&crc.to_le_bytes());
        Record::decode(&slot)
    }

    #[test]
    fn roundtrip_and_meaningful_length() {
        let mut slot = [0xa5; SLOT_SIZE];
        let n = sample(9).encode(&mut slot);
        assert_eq!(n, HEADER + 10);
        assert!(slot[n..].iter().all(|&b| b == 0xa5));
        assert_eq!(Record::decode(&slot), Ok(sample(9)));
    }

    #[test]
    fn zero_slot_is_unwritten() {
        assert_eq!(Record::decode(&[0; SLOT_SIZE]), Err(RecordError::Unwritten));
        assert_eq!(
            resealed(|s| s[OFF_SEQ..OFF_SEQ + 8].fill(0)),
            Err(RecordError::Unwritten)
        );
    }

    #[test]
    fn semantic_checks_behind_a_valid_crc() {
        assert_eq!(
            resealed(|s| s[OFF_FLAGS] = 16),
            Err(RecordError::BadFlags(16))
        );
        assert_eq!(
            resealed(|s| s[OFF_DEATHS + 1] = 1).map(|r| r.deaths),
            Ok(256)
        );
        assert_eq!(
            resealed(|s| s[OFF_VERSION] = 2),
            Err(RecordError::BadVersion(2))
        );
        assert_eq!(resealed(|s| s[OFF_MAGIC] ^= 1), Err(RecordError::BadMagic));
        // out_rec (80) before out_commit
        assert_eq!(
            resealed(|s| s[OFF_OUT_COMMIT] = 81),
            Err(RecordError::Offsets)
        );
        // out_rec 2^40 + 51 past out_commit 50
        assert_eq!(
            resealed(|s| s[OFF_OUT_REC + 5] = 1),
            Err(RecordError::Offsets)
        );
        assert_eq!(
            resealed(|s| s[OFF_STATE_LEN..OFF_STATE_LEN + 2].copy_from_slice(&385u16.to_le_bytes())),
            Err(RecordError::Lengths {
                state: 385,
                nondet: 5
            })
        );
        assert_eq!(
            resealed(|s| s[OFF_FLAGS] = 1).map(|r| r.closing()),
            Ok(true)
        );
    }

    #[test]
    fn checksum_catches_payload_damage() {
        let mut slot = [0; SLOT_SIZE];
        sample(1).encode(&mut slot);
        slot[HEADER + 2] ^= 0x10;
        assert_eq!(Record::decode(&slot), Err(RecordError::Checksum));
    }

    #[test]
    fn state_and_nondet_limits() {
        let mut r = Record::new(1);
        assert_eq!(
            r.set_state(1, &[1; MAX_STATE + 1]),
            Err(RecordError::TooLarge)
        );
        r.set_state(1, &[1; MAX_STATE]).unwrap();
        r.set_state(2, b"ab").unwrap();
        let mut fresh = Record::new(1);
        fresh.set_state(2, b"ab").unwrap();
        assert_eq!(r, fresh, "a shrunk state must leave no stale bytes behind");

        r.push_nondet(&[1; 40]).unwrap();
        assert_eq!(r.push_nondet(&[2; 21]), Err(RecordError::TooLarge));
        r.push_nondet(&[2; 20]).unwrap();
        assert_eq!(r.nondet().len(), MAX_NONDET);
        assert_eq!(&r.nondet()[38..42], &[1, 1, 2, 2]);
        r.clear_nondet();
        assert_eq!(r, fresh);
    }

    #[test]
    fn pick_rules() {
        let mut rec = [0; RECORD_SIZE];
        let (s0, s1) = rec.split_at_mut(SLOT_SIZE);
        sample(4).encode(s0.try_into().unwrap());
        sample(5).encode(s1.try_into().unwrap());
        assert_eq!(pick(&rec, 7), Ok(sample(5)));
        let wrong = SlotError::WrongConn {
            expected: 8,
            found: 7,
        };
        assert_eq!(
            pick(&rec, 8),
            Err(PickError {
                slot0: wrong,
                slot1: wrong
            })
        );

        // seq 5 written into slot 0: the writer broke alternation.
        let mut rec = [0; RECORD_SIZE];
        sample(5).encode((&mut rec[..SLOT_SIZE]).try_into().unwrap());
        assert_eq!(
            pick(&rec, 7),
            Err(PickError {
                slot0: SlotError::Misplaced { seq: 5, slot: 0 },
                slot1: SlotError::Invalid(RecordError::Unwritten),
            })
        );
        assert_eq!(slot_of(0), 0);
        assert_eq!(slot_of(u64::MAX), 1);
    }
}
