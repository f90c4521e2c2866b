//! Journal records as a successor reads them after a crash, written by a
//! worker that may have scribbled anything (`hf_journal::check::record`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hf_journal::check::record(data);
});
