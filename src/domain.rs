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
/// non-empty parts and no white space inside.
#[derive(Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Normalises `raw`; `Ok(None)` when nothing is left after trimming.
    pub fn parse(raw: &str) -> Result<Option<Email>, InvalidEmail> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Ok(None);
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
            Ok(Some(Email(email)))
        } else {
            Err(InvalidEmail)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
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
