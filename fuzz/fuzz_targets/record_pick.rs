//! Journal records as a successor reads them after a crash, written by a
//! worker that may have scribbled anything: picking the valid slot never
//! panics, and what it returns passes the record's own limits.
#![no_main]

use hf_journal::record::{pick, Record, RECORD_SIZE, SLOT_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut raw = [0u8; RECORD_SIZE];
    let n = data.len().min(RECORD_SIZE);
    raw[..n].copy_from_slice(&data[..n]);
    // The connection id the keeper expects comes from the input's tail.
    let conn_id = data
        .get(RECORD_SIZE..RECORD_SIZE + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(1);
    if let Ok(rec) = pick(&raw, conn_id) {
        assert_eq!(rec.conn_id, conn_id);
        assert!(rec.state().len() <= hf_journal::record::MAX_STATE);
        assert!(rec.nondet().len() <= hf_journal::record::MAX_NONDET);
        assert!(rec.out_commit <= rec.out_rec);
        let mut slot = [0u8; SLOT_SIZE];
        rec.encode(&mut slot);
        assert!(Record::decode(&slot).is_ok());
    }
});
