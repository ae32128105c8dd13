//! Feeds arbitrary bytes to the client-frame decoders in both encodings: the broker's
//! (`decode_client`) and the generic one. Neither may panic, they must accept the same frames
//! and read them alike, and whatever they accept must encode and decode back to the same frame.

#![no_main]

use gavel_protocol::{decode, decode_client, encode, ClientFrame, Format};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    for format in [Format::MsgPack, Format::Json] {
        let direct = decode_client(format, data, MAX);
        let generic = decode::<ClientFrame>(format, data, MAX);
        assert_eq!(direct.is_ok(), generic.is_ok(), "the two decoders disagree");
        if let (Ok(frame), Ok(same)) = (direct, generic) {
            assert_eq!(frame, same);
            let bytes = encode(format, &frame).expect("a decoded frame encodes");
            let again = decode_client(format, &bytes, usize::MAX).expect("and decodes again");
            assert_eq!(again, frame);
        }
    }
});
