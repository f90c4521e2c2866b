//! Replays the fuzz corpus (fuzz/corpus, kept in the repository and grown
//! by `cargo fuzz`) through the decoders on every test run, with the same
//! checks as the fuzz targets, so a regression on any input the fuzzer
//! ever found interesting fails here without a fuzzer installed.

use std::path::PathBuf;

use hf_journal::record::{pick, Record, MAX_NONDET, MAX_STATE, RECORD_SIZE, SLOT_SIZE};
use hf_journal::wire::Msg;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("corpus entry").path();
            let data = std::fs::read(&p).expect("corpus file");
            (p, data)
        })
        .collect();
    out.sort();
    assert!(out.len() >= 10, "corpus {target} has {} inputs", out.len());
    out
}

#[test]
fn wire_corpus_decodes_or_fails_cleanly() {
    let mut ok = 0;
    for (path, data) in corpus("wire_decode") {
        if let Ok(m) = Msg::decode(&data) {
            let mut again = Vec::new();
            m.encode(&mut again);
            assert_eq!(again, data, "{}: re-encoding differs", path.display());
            ok += 1;
        }
    }
    // The seeds: one valid message of every kind.
    assert!(ok >= 13, "only {ok} corpus inputs decode");
}

#[test]
fn record_corpus_picks_or_fails_cleanly() {
    let mut ok = 0;
    for (path, data) in corpus("record_pick") {
        let mut raw = [0u8; RECORD_SIZE];
        let n = data.len().min(RECORD_SIZE);
        raw[..n].copy_from_slice(&data[..n]);
        let conn_id = data
            .get(RECORD_SIZE..RECORD_SIZE + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(1);
        if let Ok(rec) = pick(&raw, conn_id) {
            let what = path.display();
            assert_eq!(rec.conn_id, conn_id, "{what}");
            assert!(rec.state().len() <= MAX_STATE, "{what}");
            assert!(rec.nondet().len() <= MAX_NONDET, "{what}");
            assert!(rec.out_commit <= rec.out_rec, "{what}");
            let mut slot = [0u8; SLOT_SIZE];
            rec.encode(&mut slot);
            assert!(Record::decode(&slot).is_ok(), "{what}");
            ok += 1;
        }
    }
    assert!(ok >= 3, "only {ok} corpus records are valid");
}
