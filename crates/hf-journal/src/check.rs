//! The decoders' properties, asserted on arbitrary bytes. The fuzz targets
//! (`fuzz/`) and the corpus test (`tests/corpus.rs`) run these same checks,
//! so an input the fuzzer once found interesting is checked on every test
//! run, fuzzer or not. Each function panics if a property fails and returns
//! whether the input decoded.

use crate::record::{pick, Record, MAX_NONDET, MAX_STATE, RECORD_SIZE, SLOT_SIZE};
use crate::wire::Msg;

/// A control message as the keeper receives it from a worker it does not
/// trust: any bytes decode or fail cleanly, and what decodes re-encodes to
/// the same bytes and passes `validate`.
pub fn wire(data: &[u8]) -> bool {
    let Ok(m) = Msg::decode(data) else {
        return false;
    };
    let mut again = Vec::new();
    m.encode(&mut again);
    assert_eq!(again, data, "decode then encode changed the bytes");
    assert!(m.validate().is_ok(), "decoded message breaks the limits");
    true
}

/// A journal record as a successor reads it after a crash: the first 1 KiB
/// of `data` is the record (zero-padded), the next 8 bytes the connection
/// id expected (1 if absent). What `pick` returns has that id, sizes within
/// the limits, `out_commit <= out_rec`, and re-encodes to a valid slot.
pub fn record(data: &[u8]) -> bool {
    let mut raw = [0u8; RECORD_SIZE];
    let n = data.len().min(RECORD_SIZE);
    raw[..n].copy_from_slice(&data[..n]);
    let conn_id = data
        .get(RECORD_SIZE..RECORD_SIZE + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(1);
    let Ok(rec) = pick(&raw, conn_id) else {
        return false;
    };
    assert_eq!(rec.conn_id, conn_id);
    assert!(rec.state().len() <= MAX_STATE);
    assert!(rec.nondet().len() <= MAX_NONDET);
    assert!(rec.out_commit <= rec.out_rec);
    let mut slot = [0u8; SLOT_SIZE];
    rec.encode(&mut slot);
    assert!(
        Record::decode(&slot).is_ok(),
        "re-encoded record does not decode"
    );
    true
}
