//! Jebbit's webhook signature, parsed and verified: pure functions of the header, the raw
//! body, the secrets and the time.
//!
//! `x-jebbit-signature: t=<unix seconds>,v1=<signature>[,v1=<signature>…]`, where a
//! signature is the standard, padded base64 of HMAC-SHA256 (key: the shared secret's
//! bytes; message: `<t>.<raw body>`, `t` exactly as the header spells it). One `v1` that
//! matches one of the source's secrets suffices; the comparison is constant-time (the
//! `hmac` crate's `verify_slice`). Keys other than `t` and `v1` are ignored, so a future
//! scheme (`v2=`) can stand beside `v1`.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries the signature.
pub const HEADER: &str = "x-jebbit-signature";
/// The header of Jebbit's test webhooks.
pub const TEST_HEADER: &str = "x-jebbit-test";
/// How far ahead of this clock a timestamp may be: clocks differ a little, never minutes.
pub const MAX_AHEAD: Duration = Duration::from_secs(60);
/// At most this many `v1` values are tried; the rest are ignored.
pub const MAX_SIGNATURES: usize = 8;

type HmacSha256 = Hmac<Sha256>;

/// A parsed signature header: its timestamp and the candidate signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature<'h> {
    /// `t`, as the header spells it: the signed message starts with these bytes.
    t: &'h str,
    /// `t` in seconds since 1970.
    pub timestamp: i64,
    /// The decoded `v1` values (32 bytes each), in header order.
    signatures: Vec<[u8; 32]>,
}

// A signature is not a secret, but it has no business in a log either.
impl fmt::Debug for Signature<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signature")
            .field("timestamp", &self.timestamp)
            .field("signatures", &self.signatures.len())
            .finish()
    }
}

/// Why a request's signature is refused (401). The text names the reason, never a
/// signature or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no x-jebbit-signature header")]
    Missing,
    #[error("the x-jebbit-signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error("the signature's timestamp is {age_s} s old, more than the {tolerance_s} s allowed")]
    Stale { age_s: i64, tolerance_s: u64 },
    #[error("the signature's timestamp is {ahead_s} s in the future")]
    Future { ahead_s: i64 },
    #[error("no signature matches the body and the source's secret")]
    Mismatch,
}

impl SignatureError {
    /// A short, stable name for log lines.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "missing",
            SignatureError::Malformed(_) => "malformed",
            SignatureError::Stale { .. } => "stale",
            SignatureError::Future { .. } => "future",
            SignatureError::Mismatch => "mismatch",
        }
    }
}

impl<'h> Signature<'h> {
    /// Parses the header's value. White space around the parts is allowed; parts without
    /// `=`, a repeated or missing `t`, a `t` that is not a number of seconds, or no `v1`
    /// that decodes to 32 bytes make it malformed.
    pub fn parse(header: &'h str) -> Result<Signature<'h>, SignatureError> {
        let mut t = None;
        let mut signatures = Vec::new();
        let mut undecodable = false;
        for part in header.split(',') {
            let part = part.trim_matches([' ', '\t']);
            if part.is_empty() {
                continue;
            }
            let Some((key, value)) = part.split_once('=') else {
                return Err(SignatureError::Malformed("a part without `=`"));
            };
            match key.trim_matches([' ', '\t']) {
                "t" => {
                    if t.is_some() {
                        return Err(SignatureError::Malformed("more than one `t`"));
                    }
                    t = Some(value.trim_matches([' ', '\t']));
                }
                "v1" if signatures.len() < MAX_SIGNATURES => {
                    let mut tag = [0u8; 32];
                    // Standard alphabet, padded: 44 characters for 32 bytes.
                    match base64::engine::general_purpose::STANDARD
                        .decode_slice(value.trim_matches([' ', '\t']), &mut tag)
                    {
                        Ok(32) => signatures.push(tag),
                        _ => undecodable = true,
                    }
                }
                _ => {}
            }
        }
        let Some(t) = t else {
            return Err(SignatureError::Malformed("no `t`"));
        };
        if t.is_empty() || t.len() > 18 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SignatureError::Malformed(
                "`t` is not a number of seconds since 1970",
            ));
        }
        let timestamp = t.parse().expect("at most 18 digits fit an i64");
        if signatures.is_empty() {
            return Err(SignatureError::Malformed(if undecodable {
                "no `v1` is the base64 of 32 bytes"
            } else {
                "no `v1`"
            }));
        }
        Ok(Signature {
            t,
            timestamp,
            signatures,
        })
    }

    /// Checks the timestamp against `now` (seconds since 1970): at most `tolerance` old
    /// and at most [`MAX_AHEAD`] ahead.
    pub fn check_time(&self, now: i64, tolerance: Duration) -> Result<(), SignatureError> {
        let age = now.saturating_sub(self.timestamp);
        if age > i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX) {
            return Err(SignatureError::Stale {
                age_s: age,
                tolerance_s: tolerance.as_secs(),
            });
        }
        if -age > MAX_AHEAD.as_secs() as i64 {
            return Err(SignatureError::Future { ahead_s: -age });
        }
        Ok(())
    }

    /// Whether one of the signatures is the HMAC of `<t>.<body>` under one of `secrets`.
    /// Every comparison is constant-time; the HMAC of the body is computed once per secret.
    pub fn verify<'s>(
        &self,
        body: &[u8],
        secrets: impl IntoIterator<Item = &'s [u8]>,
    ) -> Result<(), SignatureError> {
        for secret in secrets {
            let mut mac =
                HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
            mac.update(self.t.as_bytes());
            mac.update(b".");
            mac.update(body);
            for signature in &self.signatures {
                if mac.clone().verify_slice(signature).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(SignatureError::Mismatch)
    }
}

/// The header value for `body` signed with `secret` at `t`: what Jebbit sends. For tests,
/// benchmarks and the README's example.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!(
        "t={t},v1={}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed independently with OpenSSL 3.0, e.g.
    //   { printf '1700000000.'; cat tests/fixtures/jebbit-webhook-test-submission.json; } \
    //     | openssl dgst -sha256 -hmac "$KEY" -binary | base64
    /// The `shared_secret` of the example in Jebbit's Integrations API guide.
    const KEY: &str = "Qq6niUmvrO320lYbBGKha6cdy22Bz8BVBd";
    const FIXTURE: &[u8] =
        include_bytes!("../../tests/fixtures/jebbit-webhook-test-submission.json");
    const FIXTURE_SIG: &str = "8gLAlULNgztAlHKDs/ywtTBIr+nbYGNFuadhzwrAigY=";
    /// The same body and time under the secret `old-secret`.
    const FIXTURE_SIG_OLD: &str = "SlcTVFpqkluVd0KPLJX3pUr4fuTJKkTk0/+Skqy8wI0=";
    /// `1700000000.` alone: the empty body.
    const EMPTY_SIG: &str = "xu5oq4sYb58cfM6oWsUfO58u9cBGOAy4nCo4z1PdTkA=";
    const SMALL: &[u8] = br#"{"data":{"email":"a@b.c"}}"#;
    const SMALL_SIG: &str = "L63JFh/V0n1xG0m9r4IvPAk/aPSSiQXjtiy4dKzO0p8=";
    /// `SMALL` at t=1700000300 under a 100-byte key (`k` × 100), longer than a SHA-256 block.
    const SMALL_LONG_KEY_SIG: &str = "s5jNXLbwKRKd7DPr56zM6Gq9Uz11AQfVQwei2/WJi24=";
    const ARRAY: &[u8] = br#"[{"data":{"email":"a@b.c"}},{"data":{"email":"d@e.f"}}]"#;
    const ARRAY_SIG: &str = "q1XQHLio13c0MOipBuQBc/LUGkY2WUzpVeK3jrEfk8Y=";
    const T: i64 = 1_700_000_000;
    const TOLERANCE: Duration = Duration::from_secs(300);

    fn verify(header: &str, body: &[u8], secrets: &[&str]) -> Result<(), SignatureError> {
        let sig = Signature::parse(header)?;
        sig.check_time(T, TOLERANCE)?;
        sig.verify(body, secrets.iter().map(|s| s.as_bytes()))
    }

    #[test]
    fn openssl_vectors_verify_and_sign_reproduces_them() {
        for (t, key, body, want) in [
            (T, KEY.to_owned(), FIXTURE, FIXTURE_SIG),
            (T, "old-secret".to_owned(), FIXTURE, FIXTURE_SIG_OLD),
            (T, KEY.to_owned(), b"".as_slice(), EMPTY_SIG),
            (T, KEY.to_owned(), SMALL, SMALL_SIG),
            (T + 300, "k".repeat(100), SMALL, SMALL_LONG_KEY_SIG),
            (T, KEY.to_owned(), ARRAY, ARRAY_SIG),
        ] {
            let header = format!("t={t},v1={want}");
            let sig = Signature::parse(&header).unwrap();
            assert_eq!(sig.verify(body, [key.as_bytes()]), Ok(()), "{header}");
            assert_eq!(sign(key.as_bytes(), t, body), header);
        }
    }

    #[test]
    fn a_changed_body_time_or_secret_does_not_verify() {
        let header = format!("t={T},v1={SMALL_SIG}");
        assert_eq!(verify(&header, SMALL, &[KEY]), Ok(()));
        assert_eq!(
            verify(&header, br#"{"data":{"email":"a@b.d"}}"#, &[KEY]),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&header, SMALL, &["Qq6niUmvrO320lYbBGKha6cdy22Bz8BVBe"]),
            Err(SignatureError::Mismatch)
        );
        // The signed message is `<t>.<body>`: another t with the same v1 does not verify.
        let moved = format!("t={},v1={SMALL_SIG}", T + 1);
        assert_eq!(verify(&moved, SMALL, &[KEY]), Err(SignatureError::Mismatch));
        // t is signed as spelt: a leading zero is another message.
        let zero = format!("t=0{T},v1={SMALL_SIG}");
        assert_eq!(verify(&zero, SMALL, &[KEY]), Err(SignatureError::Mismatch));
        // No secret at all verifies nothing.
        assert_eq!(verify(&header, SMALL, &[]), Err(SignatureError::Mismatch));
    }

    #[test]
    fn either_secret_and_any_of_several_v1_verifies() {
        let header = format!("t={T},v1={FIXTURE_SIG_OLD}");
        assert_eq!(verify(&header, FIXTURE, &[KEY, "old-secret"]), Ok(()));
        assert_eq!(verify(&header, FIXTURE, &["old-secret"]), Ok(()));
        assert_eq!(
            verify(&header, FIXTURE, &[KEY]),
            Err(SignatureError::Mismatch)
        );
        // A rotated sender may send several; the matching one may come last.
        let several = format!("t={T},v1={SMALL_SIG},v1={EMPTY_SIG},v1={FIXTURE_SIG}");
        assert_eq!(verify(&several, FIXTURE, &[KEY]), Ok(()));
        assert_eq!(verify(&several, b"", &[KEY]), Ok(()));
    }

    #[test]
    fn spacing_order_and_unknown_schemes_are_tolerated() {
        for header in [
            format!("t={T},v1={SMALL_SIG}"),
            format!("v1={SMALL_SIG},t={T}"),
            format!(" t = {T} , v1 = {SMALL_SIG} "),
            format!("t={T},v0=deadbeef,v1={SMALL_SIG},v2=anything,"),
            format!("t={T},v1=not-base64!,v1={SMALL_SIG}"),
        ] {
            assert_eq!(verify(&header, SMALL, &[KEY]), Ok(()), "{header}");
        }
    }

    #[test]
    fn malformed_headers_are_refused_saying_why() {
        for (header, want) in [
            ("", "no `t`"),
            ("garbage", "a part without `=`"),
            (&format!("v1={SMALL_SIG}"), "no `t`"),
            (&format!("t=,v1={SMALL_SIG}"), "`t` is not a number"),
            (&format!("t=-5,v1={SMALL_SIG}"), "`t` is not a number"),
            (&format!("t=1.5,v1={SMALL_SIG}"), "`t` is not a number"),
            (
                &format!("t=9999999999999999999,v1={SMALL_SIG}"),
                "`t` is not a number",
            ),
            (&format!("t={T},t={T},v1={SMALL_SIG}"), "more than one `t`"),
            (&format!("t={T}"), "no `v1`"),
            (&format!("t={T},v1="), "no `v1` is the base64 of 32 bytes"),
            // Unpadded, or the URL-safe alphabet, or 31 bytes: not the specified encoding.
            (
                &format!("t={T},v1={}", SMALL_SIG.trim_end_matches('=')),
                "base64",
            ),
            (
                &format!("t={T},v1={}", SMALL_SIG.replace('/', "_")),
                "base64",
            ),
            (
                &format!("t={T},v1=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="),
                "base64",
            ),
        ] {
            let err = Signature::parse(header).unwrap_err();
            assert!(matches!(err, SignatureError::Malformed(_)), "{header}");
            assert!(err.to_string().contains(want), "{header}: {err}");
        }
    }

    #[test]
    fn timestamps_older_than_the_tolerance_or_over_60_s_ahead_are_refused() {
        let check = |t: i64| {
            let header = format!("t={t},v1={SMALL_SIG}");
            Signature::parse(&header).unwrap().check_time(T, TOLERANCE)
        };
        assert_eq!(check(T - 300), Ok(()));
        assert_eq!(
            check(T - 301),
            Err(SignatureError::Stale {
                age_s: 301,
                tolerance_s: 300
            })
        );
        assert_eq!(check(T + 60), Ok(()));
        assert_eq!(check(T + 61), Err(SignatureError::Future { ahead_s: 61 }));
        assert!(check(0).is_err());
        assert!(check(999_999_999_999_999_999).is_err());
    }

    #[test]
    fn only_the_first_eight_v1_are_tried() {
        let mut header = format!("t={T}");
        for _ in 0..MAX_SIGNATURES {
            header.push_str(&format!(",v1={EMPTY_SIG}"));
        }
        header.push_str(&format!(",v1={SMALL_SIG}"));
        assert_eq!(
            verify(&header, SMALL, &[KEY]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn debug_output_shows_no_signature() {
        let header = format!("t={T},v1={SMALL_SIG}");
        let debug = format!("{:?}", Signature::parse(&header).unwrap());
        assert!(!debug.contains(&SMALL_SIG[..10]), "{debug}");
    }
}
