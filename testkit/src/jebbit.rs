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

/// A realistic Jebbit webhook body, about 700 bytes: a dozen quiz answers and `email`,
/// with the answers of `extra` (an object) after them.
pub fn webhook_body(email: &str, event_number: u64, extra: serde_json::Value) -> String {
    let mut data = serde_json::json!({
        "email": email,
        "opt_in": "true",
        "outcome": "example_outcome",
        "favorite_colors": ["option 1", "option 4"],
        "skin_type": "Dry & sensitive",
        "hair_concern": "Frizz",
        "age_range": "25-34",
        "preferred_scent": "Citrus and green notes",
        "budget": "$25–$50",
        "shopping_frequency": "Weekly",
        "product_interest": ["serum", "mask", "oil"],
        "quiz_score": 42
    });
    if let (Some(data), serde_json::Value::Object(extra)) = (data.as_object_mut(), extra) {
        data.extend(extra);
    }
    serde_json::json!({
        "data": data,
        "event": {"event_number": event_number},
        "campaign_id": "n3zrik6g",
        "campaign_name": "New Quiz",
        "traffic_source": "Owned+Web"
    })
    .to_string()
}

/// What a benchmark's self-check asserts of its webhook: signed with `secret` at a fixed
/// time, the signature parses and verifies, and the body parses as a session.
pub fn check_webhook(secret: &str, body: &str) {
    use segment_bridge::intake::signature::Signature;
    let header = sign(secret.as_bytes(), 1_700_000_000, body.as_bytes());
    let signature = Signature::parse(&header).unwrap();
    assert!(
        signature
            .verify(body.as_bytes(), [secret.as_bytes()])
            .is_ok()
    );
    assert!(segment_bridge::session::Session::parse(body.as_bytes()).is_ok());
}
