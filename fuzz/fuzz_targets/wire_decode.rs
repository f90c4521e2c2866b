//! Control messages as the keeper receives them from a worker it does not
//! trust (`hf_journal::check::wire`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hf_journal::check::wire(data);
});
