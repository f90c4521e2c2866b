//! Replays the fuzz corpus (fuzz/corpus, kept in the repository and grown
//! by `cargo fuzz`) through the decoders on every test run, with the fuzz
//! targets' own checks (`hf_journal::check`), so a regression on any input
//! the fuzzer ever found interesting fails here without a fuzzer installed.

use std::path::PathBuf;

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

/// Runs `check` on every input of `target`'s corpus; returns how many decoded.
fn replay(target: &str, check: fn(&[u8]) -> bool) -> usize {
    corpus(target)
        .iter()
        .filter(|(path, data)| {
            std::panic::catch_unwind(|| check(data))
                .unwrap_or_else(|_| panic!("{} fails its check", path.display()))
        })
        .count()
}

#[test]
fn wire_corpus_decodes_or_fails_cleanly() {
    // The seeds include one valid message of every kind.
    let ok = replay("wire_decode", hf_journal::check::wire);
    assert!(ok >= 13, "only {ok} corpus inputs decode");
}

#[test]
fn record_corpus_picks_or_fails_cleanly() {
    let ok = replay("record_pick", hf_journal::check::record);
    assert!(ok >= 3, "only {ok} corpus records are valid");
}
