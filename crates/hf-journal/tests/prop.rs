//! Property tests: roundtrips, totality of the decoders, and rejection of
//! damaged encodings (bit flips, truncation, torn writes).

use hf_journal::record::{self, MAX_NONDET, MAX_PENDING_OUT, MAX_STATE, RECORD_SIZE, SLOT_SIZE};
use hf_journal::wire::{self, ConnEntry, Msg, MAX_FDS_PER_MSG, MAX_MSG};
use hf_journal::{pick, slot_of, PickError, Record, SlotError};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

fn arb_record() -> impl Strategy<Value = Record> {
    let fields = (
        any::<u16>(),
        1..=u64::MAX,
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        0..=MAX_PENDING_OUT,
        any::<u32>(),
        any::<u16>(),
    );
    let payload = (
        vec(any::<u8>(), 0..=MAX_STATE),
        vec(any::<u8>(), 0..=MAX_NONDET),
        any::<Index>(),
        any::<u16>(),
    );
    (fields, payload).prop_map(
        |(
            (flags, seq, conn_id, in_commit, out_commit, pending, out_crc, state_version),
            (state, nondet, split, deaths),
        )| {
            let mut r = Record::new(conn_id);
            r.flags = flags & record::FLAGS;
            r.seq = seq;
            r.in_commit = in_commit;
            r.out_commit = out_commit;
            r.out_rec = out_commit.saturating_add(pending);
            r.out_crc = out_crc;
            r.deaths = deaths;
            r.set_state(state_version, &state).unwrap();
            // Two pushes, to exercise appending.
            let (a, b) = nondet.split_at(split.index(nondet.len() + 1));
            r.push_nondet(a).unwrap();
            r.push_nondet(b).unwrap();
            r
        },
    )
}

/// Two consecutive versions of one connection's record: (older, newer).
fn arb_versions() -> impl Strategy<Value = (Record, Record)> {
    (arb_record(), arb_record()).prop_map(|(mut old, mut new)| {
        old.seq = old.seq.min(u64::MAX - 1);
        new.seq = old.seq + 1;
        new.conn_id = old.conn_id;
        (old, new)
    })
}

fn encoded(r: &Record) -> ([u8; SLOT_SIZE], usize) {
    let mut slot = [0; SLOT_SIZE];
    let n = r.encode(&mut slot);
    (slot, n)
}

/// A journal record with each version written into its own slot.
fn journal(versions: &[&Record]) -> [u8; RECORD_SIZE] {
    let mut rec = [0; RECORD_SIZE];
    for r in versions {
        let start = slot_of(r.seq) * SLOT_SIZE;
        r.encode((&mut rec[start..start + SLOT_SIZE]).try_into().unwrap());
    }
    rec
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    let entry = (
        any::<u64>(),
        any::<u32>(),
        0..=(wire::CONN_RECOVERED | wire::CONN_SPOOL | wire::CONN_CRASHED | wire::CONN_MOVED),
    )
        .prop_map(|(conn_id, slot, flags)| ConnEntry {
            conn_id,
            slot,
            flags,
        });
    prop_oneof![
        (
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            any::<(u16, u16)>()
        )
            .prop_map(|(pid, proto, state_writes, state_reads)| Msg::Hello {
                pid,
                proto,
                state_writes,
                state_reads
            }),
        Just(Msg::Ready),
        (any::<u64>(), any::<u32>()).prop_map(|(conn_id, slot)| Msg::Closed { conn_id, slot }),
        (any::<u64>(), any::<u32>()).prop_map(|(conn_id, slot)| Msg::Spool { conn_id, slot }),
        (any::<u64>(), any::<u32>()).prop_map(|(conn_id, slot)| Msg::Poisoned { conn_id, slot }),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(worker_id, generation, slots)| {
            Msg::Welcome {
                worker_id,
                generation,
                slots,
            }
        }),
        Just(Msg::Activate),
        vec(entry, 1..=MAX_FDS_PER_MSG)
            .prop_filter("at most 253 fds", |e| Msg::Conns(e.clone()).fd_count()
                <= MAX_FDS_PER_MSG)
            .prop_map(Msg::Conns),
        Just(Msg::Shutdown),
        Just(Msg::Drain),
        Just(Msg::Stop),
        (any::<u64>(), any::<u32>()).prop_map(|(conn_id, slot)| Msg::Released { conn_id, slot }),
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(conn_id, slot, tag)| Msg::Hold {
            conn_id,
            slot,
            tag
        }),
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(conn_id, slot, tag)| Msg::Unhold {
            conn_id,
            slot,
            tag
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(conn_id, tag)| Msg::Channel { conn_id, tag }),
        (any::<u64>(), any::<u32>()).prop_map(|(conn_id, tag)| Msg::AcceptFailed { conn_id, tag }),
        (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            |(conn_id, slot, listener, tag)| Msg::AcceptOn {
                conn_id,
                slot,
                listener,
                tag
            }
        ),
    ]
}

fn msg_bytes(m: &Msg) -> Vec<u8> {
    let mut out = vec![0xee; 3]; // encode must clear stale contents
    m.encode(&mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn record_roundtrip(r in arb_record(), junk in vec(any::<u8>(), SLOT_SIZE)) {
        let mut slot: [u8; SLOT_SIZE] = junk.clone().try_into().unwrap();
        let n = r.encode(&mut slot);
        prop_assert_eq!(n, 64 + r.state().len() + r.nondet().len());
        prop_assert_eq!(&slot[n..], &junk[n..], "bytes past the meaningful length are untouched");
        prop_assert_eq!(Record::decode(&slot), Ok(r));
    }

    #[test]
    fn record_decode_is_total(bytes in vec(any::<u8>(), SLOT_SIZE)) {
        let _ = Record::decode(&bytes.try_into().unwrap());
    }

    /// Random headers that pass magic, version and CRC, so the semantic checks
    /// are what is exercised. Whatever decodes must re-encode to the same bytes.
    #[test]
    fn record_decode_resealed_is_total_and_canonical(
        bytes in vec(any::<u8>(), SLOT_SIZE),
        flags in 0u16..4, deaths in any::<u16>(),
        state_len in 0u16..400, nondet_len in 0u16..64, offsets_sane in any::<bool>(),
    ) {
        let mut slot: [u8; SLOT_SIZE] = bytes.try_into().unwrap();
        slot[0..4].copy_from_slice(&record::MAGIC.to_le_bytes());
        slot[4..6].copy_from_slice(&record::VERSION.to_le_bytes());
        slot[6..8].copy_from_slice(&flags.to_le_bytes());
        if offsets_sane {
            slot.copy_within(32..40, 40);
        }
        slot[54..56].copy_from_slice(&state_len.to_le_bytes());
        slot[56..58].copy_from_slice(&nondet_len.to_le_bytes());
        slot[58..60].copy_from_slice(&deaths.to_le_bytes());
        let end = (64 + usize::from(state_len) + usize::from(nondet_len)).min(SLOT_SIZE);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&slot[..60]), &slot[64..end]);
        slot[60..64].copy_from_slice(&crc.to_le_bytes());
        if let Ok(r) = Record::decode(&slot) {
            let (again, n) = encoded(&r);
            prop_assert_eq!(n, end);
            prop_assert_eq!(&again[..n], &slot[..n]);
        }
    }

    #[test]
    fn record_bit_flip_is_rejected(r in arb_record(), bit in 0..SLOT_SIZE * 8) {
        let (mut slot, n) = encoded(&r);
        slot[bit / 8] ^= 1 << (bit % 8);
        let got = Record::decode(&slot);
        if bit / 8 < n {
            prop_assert!(got.is_err(), "flip of bit {} decoded to {:?}", bit, got);
        } else {
            prop_assert_eq!(got, Ok(r));
        }
    }

    /// A torn write: a prefix of the slot replaced by garbage, or the tail of
    /// the encoding lost (left as the zeroes it replaced).
    #[test]
    fn record_torn_never_decodes_to_another_value(
        r in arb_record(), garbage in vec(any::<u8>(), 1..SLOT_SIZE), cut in any::<Index>(),
    ) {
        let (slot, n) = encoded(&r);
        let mut torn = slot;
        torn[..garbage.len()].copy_from_slice(&garbage);
        let got = Record::decode(&torn);
        prop_assert!(got.is_err() || torn[..n] == slot[..n], "{:?}", got);

        let mut cut_off = [0; SLOT_SIZE];
        let keep = cut.index(n);
        cut_off[..keep].copy_from_slice(&slot[..keep]);
        let got = Record::decode(&cut_off);
        prop_assert!(got.is_err() || got == Ok(r));
    }

    #[test]
    fn pick_newest_valid_slot_wins((old, new) in arb_versions(), other_conn in any::<u64>()) {
        prop_assert_eq!(pick(&journal(&[&old, &new]), old.conn_id), Ok(new.clone()));
        prop_assert_eq!(pick(&journal(&[&old]), old.conn_id), Ok(old.clone()));

        // The other slot still holds a newer version of a previous owner.
        prop_assume!(other_conn != old.conn_id);
        let mut stranger = new.clone();
        stranger.conn_id = other_conn;
        // Same slot as `new`, and newer still.
        stranger.seq = new.seq.saturating_add(2);
        prop_assume!(slot_of(stranger.seq) == slot_of(new.seq));
        prop_assert_eq!(pick(&journal(&[&old, &stranger]), old.conn_id), Ok(old.clone()));

        let wrong = |r: &Record| SlotError::WrongConn { expected: other_conn, found: r.conn_id };
        let (slot0, slot1) = if slot_of(old.seq) == 0 { (wrong(&old), wrong(&new)) } else { (wrong(&new), wrong(&old)) };
        prop_assert_eq!(pick(&journal(&[&old, &new]), other_conn), Err(PickError { slot0, slot1 }));
    }

    #[test]
    fn pick_falls_back_when_newest_is_torn(
        (old, new) in arb_versions(), garbage in vec(any::<u8>(), 1..SLOT_SIZE), cut in any::<Index>(),
    ) {
        let whole = journal(&[&old, &new]);
        let start = slot_of(new.seq) * SLOT_SIZE;
        let n = encoded(&new).1;

        let mut torn = whole;
        torn[start..start + garbage.len()].copy_from_slice(&garbage);
        let untouched = torn[start..start + n] == whole[start..start + n];
        let want = if untouched { new.clone() } else { old.clone() };
        prop_assert_eq!(pick(&torn, old.conn_id), Ok(want));

        // The realistic tear: a prefix of the new encoding over the version
        // that slot held before (the one preceding `old`).
        let mut before = old.clone();
        before.seq = old.seq.saturating_sub(1).max(1);
        let mut torn = journal(&[&before, &old]);
        let keep = cut.index(n);
        torn[start..start + keep].copy_from_slice(&whole[start..start + keep]);
        let got = pick(&torn, old.conn_id);
        prop_assert!(got == Ok(old.clone()) || got == Ok(new.clone()), "{:?}", got);
    }

    #[test]
    fn msg_roundtrip(m in arb_msg()) {
        let bytes = msg_bytes(&m);
        prop_assert!(bytes.len() <= MAX_MSG);
        prop_assert_eq!(m.validate(), Ok(()));
        let back = Msg::decode(&bytes);
        prop_assert_eq!(back.as_ref().map(Msg::fd_count), Ok(m.fd_count()));
        prop_assert_eq!(back, Ok(m));
    }

    #[test]
    fn msg_decode_is_total(bytes in vec(any::<u8>(), 0..64)) {
        let _ = Msg::decode(&bytes);
    }

    /// Well-framed datagrams with random payloads reach the payload parsers.
    /// Whatever decodes must re-encode to the very same bytes.
    #[test]
    fn msg_framed_garbage_is_total_and_canonical(
        kind in prop_oneof![
            prop::sample::select(vec![0x01u8, 0x02, 0x03, 0x04, 0x05, 0x06, 0x81, 0x82, 0x83, 0x84, 0x85]),
            any::<u8>(),
        ],
        payload in prop_oneof![
            vec(any::<u8>(), 0..20),
            (1u16..4, vec(any::<u8>(), 0..60)).prop_map(|(n, mut p)| {
                // A plausible Conns header, so entry parsing is reached.
                p.splice(0..0, n.to_le_bytes());
                p
            }),
        ],
    ) {
        let mut frame = vec![0x46, 0x48, wire::VERSION, kind];
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&payload);
        let crc = crc32c::crc32c(&frame);
        frame.extend_from_slice(&crc.to_le_bytes());
        if let Ok(m) = Msg::decode(&frame) {
            prop_assert_eq!(msg_bytes(&m), frame);
        }
    }

    #[test]
    fn msg_bit_flip_is_rejected(m in arb_msg(), bit in any::<Index>()) {
        let mut bytes = msg_bytes(&m);
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let got = Msg::decode(&bytes);
        prop_assert!(got.is_err(), "flip of bit {} decoded to {:?}", bit, got);
    }

    #[test]
    fn msg_truncation_or_extension_is_rejected(m in arb_msg(), extra in 1u8..=255) {
        let mut bytes = msg_bytes(&m);
        for len in 0..bytes.len() {
            prop_assert!(Msg::decode(&bytes[..len]).is_err(), "prefix of {} bytes decoded", len);
        }
        bytes.push(extra);
        prop_assert!(Msg::decode(&bytes).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Exhaustive over every bit of the meaningful bytes of one record.
    #[test]
    fn record_every_meaningful_bit_flip_is_rejected(r in arb_record()) {
        let (slot, n) = encoded(&r);
        for bit in 0..n * 8 {
            let mut flipped = slot;
            flipped[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Record::decode(&flipped).is_err(), "flip of bit {}", bit);
        }
    }

    #[test]
    fn msg_decode_is_total_on_large_inputs(bytes in vec(any::<u8>(), 0..MAX_MSG + 16)) {
        let _ = Msg::decode(&bytes);
    }
}
