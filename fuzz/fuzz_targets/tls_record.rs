//! TLS records as a client may send them, and TLS state blobs as a dying
//! worker may have left them (`holdfast_tls::record::check`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_tls::record::check(data);
});
