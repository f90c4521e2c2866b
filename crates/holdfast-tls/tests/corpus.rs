//! Replays the `tls_record` fuzz corpus (fuzz/corpus/tls_record) through
//! the record and state decoders with the fuzz target's own checks, so a
//! regression on any input the fuzzer found interesting fails here too.

#[test]
fn tls_record_corpus_decodes_or_fails_cleanly() {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/tls_record");
    let mut n = 0;
    let mut decoded = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        let ok = std::panic::catch_unwind(|| holdfast_tls::record::check(&data))
            .unwrap_or_else(|_| panic!("{} fails its check", p.display()));
        n += 1;
        decoded += usize::from(ok);
    }
    assert!(n >= 5, "corpus has {n} inputs");
    assert!(decoded >= 2, "only {decoded} state blobs decode");
}
