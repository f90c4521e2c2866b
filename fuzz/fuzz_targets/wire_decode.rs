//! Control messages as the keeper receives them from a worker it does not
//! trust: any bytes decode to a message or an error, never a panic, and a
//! message that decodes re-encodes to the same bytes.
#![no_main]

use hf_journal::wire::Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Msg::decode(data) {
        let mut again = Vec::new();
        m.encode(&mut again);
        assert_eq!(again, data, "decode then encode changed the bytes");
        assert!(m.validate().is_ok());
    }
});
