//! The signature Jebbit puts on a webhook (`x-jebbit-signature`), made with the
//! service's own signing code so that tests and benchmarks sign as Jebbit does.

use segment_bridge::intake::signature::sign;

/// The header that carries the signature.
pub const HEADER: &str = "x-jebbit-signature";

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs() as i64
}

/// The `x-jebbit-signature` value Jebbit would send for `body` now.
pub fn signature(secret: &str, body: &[u8]) -> String {
    sign(secret.as_bytes(), unix_now(), body)
}
