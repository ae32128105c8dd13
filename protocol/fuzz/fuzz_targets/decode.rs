//! Feeds arbitrary bytes to the client-frame decoder in both encodings. It must never panic,
//! and whatever it accepts must encode and decode back to the same frame.

#![no_main]

use gavel_protocol::{decode, encode, ClientFrame, Format};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    for format in [Format::MsgPack, Format::Json] {
        if let Ok(frame) = decode::<ClientFrame>(format, data, MAX) {
            let bytes = encode(format, &frame).expect("a decoded frame encodes");
            let again: ClientFrame = decode(format, &bytes, usize::MAX).expect("and decodes again");
            assert_eq!(again, frame);
        }
    }
});
