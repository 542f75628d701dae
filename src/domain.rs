//! The types every part of the crate shares: the two Segment regions and a normalised
//! email address. Nothing here parses a message or talks to anything.

use std::fmt;

/// The two Segment regions a session can be routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    Us,
    Eu,
}

impl Region {
    pub const ALL: [Region; 2] = [Region::Us, Region::Eu];

    /// The lowercase name used in config sections, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Region::Us => "us",
            Region::Eu => "eu",
        }
    }

    /// Reads `eu`, `us` or `non-eu` (meaning `us`), in any case.
    pub fn parse(s: &str) -> Option<Region> {
        if s.eq_ignore_ascii_case("eu") {
            Some(Region::Eu)
        } else if s.eq_ignore_ascii_case("us") || s.eq_ignore_ascii_case("non-eu") {
            Some(Region::Us)
        } else {
            None
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A normalised email address: trimmed, lowercased, with exactly one `@` between two
/// non-empty parts and no white space inside; or an address that arrived already hashed.
///
/// Pre-hashed: a value that is exactly 64 hexadecimal digits (after trimming) is taken as
/// the lowercase hex SHA-256 of the address itself. A Jebbit integration created with
/// `hash_pii = true` may send the email that way. The assumption: whoever hashed it hashed
/// the trimmed, lowercased address, as Segment's `emailSha256Hash` expects; nothing here
/// can check it. No address can be mistaken for a hash, since an address has an `@`.
#[derive(Clone, PartialEq, Eq)]
pub struct Email {
    /// The address, or the lowercase hex SHA-256 when `prehashed`.
    value: String,
    prehashed: bool,
}

impl Email {
    /// Normalises `raw`; `Ok(None)` when nothing is left after trimming.
    pub fn parse(raw: &str) -> Result<Option<Email>, InvalidEmail> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Ok(None);
        }
        if is_sha256_hex(trimmed) {
            return Ok(Some(Email {
                value: trimmed.to_ascii_lowercase(),
                prehashed: true,
            }));
        }
        let email = trimmed.to_lowercase();
        let valid = match email.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !email.chars().any(char::is_whitespace)
            }
            None => false,
        };
        if valid {
            Ok(Some(Email {
                value: email,
                prehashed: false,
            }))
        } else {
            Err(InvalidEmail)
        }
    }

    /// The normalised address, or the hash when it arrived pre-hashed.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// The plain address; `None` when it arrived pre-hashed.
    pub fn plain(&self) -> Option<&str> {
        (!self.prehashed).then_some(self.value.as_str())
    }

    /// The lowercase hex SHA-256 it arrived as; `None` for a plain address.
    pub fn prehashed_sha256(&self) -> Option<&str> {
        self.prehashed.then_some(self.value.as_str())
    }
}

/// Exactly 64 hexadecimal digits, in either case: a SHA-256 in hex.
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

// Emails are personal data: they never reach a log through `{:?}`.
impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Email(<redacted>)")
    }
}

/// A value that is not an email address: no single `@` with text on both sides, or white
/// space inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidEmail;

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d";

    #[test]
    fn sixty_four_hex_digits_are_taken_as_the_hash_itself_lowercased() {
        let e = Email::parse(&format!("  {}\n", HASH.to_uppercase()))
            .unwrap()
            .unwrap();
        assert_eq!(e.prehashed_sha256(), Some(HASH));
        assert_eq!(e.as_str(), HASH);
        assert_eq!(e.plain(), None, "no plain address to put in traits");
    }

    #[test]
    fn anything_else_without_an_at_sign_is_still_not_an_email() {
        for raw in [
            &HASH[..63],
            &format!("{HASH}0"),
            &format!("{}g", &HASH[..63]),
        ] {
            assert_eq!(Email::parse(raw), Err(InvalidEmail), "{raw}");
        }
        let plain = Email::parse(" A@B.c ").unwrap().unwrap();
        assert_eq!(
            (plain.plain(), plain.prehashed_sha256()),
            (Some("a@b.c"), None)
        );
    }
}
