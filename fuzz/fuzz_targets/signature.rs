//! The `x-jebbit-signature` parser and verifier, on any header and any body.
//!
//! Input: `<header>\n<body>`. Whatever the header, parsing, the time check and verifying
//! must not panic, and a header that `sign` made for the body must verify (and must not
//! verify a body changed by one byte).
#![no_main]

use libfuzzer_sys::fuzz_target;
use segment_bridge::intake::signature::{Signature, sign};
use std::time::Duration;

const SECRETS: [&[u8]; 2] = [b"Qq6niUmvrO320lYbBGKha6cdy22Bz8BVBd", b"previous"];
const NOW: i64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(header) = std::str::from_utf8(header)
        && let Ok(signature) = Signature::parse(header)
    {
        let _ = signature.check_time(NOW, Duration::from_secs(300));
        let _ = signature.verify(body, SECRETS);
    }
    // The round trip, at a time taken from the input.
    let t = i64::from(u32::from_le_bytes(
        [0, 1, 2, 3].map(|i| data.get(i).copied().unwrap_or(0)),
    ));
    let header = sign(SECRETS[1], t, body);
    let signature = Signature::parse(&header).expect("sign makes a valid header");
    assert!(signature.verify(body, SECRETS).is_ok());
    if let Some(first) = body.first() {
        let mut changed = body.to_vec();
        changed[0] = first.wrapping_add(1);
        assert!(signature.verify(&changed, SECRETS).is_err());
    }
});
