//! The three body shapes, and the intake's splitting of a webhook body, on any bytes.
//!
//! `Session::parse` (shape by keys) and `Session::parse_with` under each kind header (and
//! region headers, valid or not), then the mapping of whatever parsed; then
//! `intake::body::split`, whose ranges must lie in the body, in order, each a JSON object
//! that the worker can parse or refuse without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segment_bridge::events::{self, Options};
use segment_bridge::intake::body;
use segment_bridge::session::{Hints, Session};
use time::OffsetDateTime;

fn parse_and_map(message: &[u8], options: &Options) {
    let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    for kind in [None, Some("jebbit"), Some("joturl"), Some("typeform")] {
        for region in [None, Some("eu"), Some("us"), Some("mars")] {
            if let Ok(session) = Session::parse_with(message, Hints { kind, region }) {
                let time = session.lead_date.unwrap_or(now);
                let _ = events::map(&session, time, options);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let options = Options {
        hash_pii: data.first().is_some_and(|b| b & 1 == 1),
        require_opt_in: data.first().is_some_and(|b| b & 2 == 2),
        ..Options::default()
    };
    parse_and_map(data, &options);
    let _ = segment_bridge::session::peek_session_id(data);
    if let Ok(ranges) = body::split(data) {
        let mut end = 0;
        for range in &ranges {
            assert!(range.start >= end && range.end <= data.len() && range.start < range.end);
            end = range.end;
            let message = &data[range.clone()];
            assert!(message.first() == Some(&b'{') || ranges.len() == 1);
            parse_and_map(message, &options);
        }
    }
});
