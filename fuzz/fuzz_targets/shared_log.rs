//! Entries of a shared log (`holdfast::shared::Log`) as a process reads them
//! from a file any worker may have written half of, or anything at all.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Entry after entry, as `Log` reads a file, until one does not parse.
    let mut at = 0;
    while let Some((e, len)) = holdfast::shared::parse(&data[at..]) {
        assert!(len >= 32, "an entry shorter than its header");
        assert!(at + len <= data.len(), "an entry past the end");
        assert!(e.data.len() <= holdfast::shared::MAX_ENTRY);
        assert_eq!(len, 32 + e.data.len());
        at += len;
    }
});
