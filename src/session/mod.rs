//! Parsing a message body into a validated [`Session`].
//!
//! Three input shapes are accepted (see the README): the canonical one, with the session's
//! fields at the top level and its answers under `attributes`; the body of a Jebbit
//! webhook, with the email, the opt-in and the answers under `data`; and a JotUrl CTA lead,
//! with the email as the string `data` and its answers as top-level keys. The first two are
//! read by one serde pass into loose wire types, the third by one of its own, then checked
//! once into a [`Session`] that cannot be invalid. The shape is the one the message's
//! [`Hints`] (the intake's headers) name, else the one its keys show; the canonical shape,
//! the hot path, is tried first and costs nothing extra. Nothing here knows about AMQP,
//! clocks or Segment.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::domain::{Email, InvalidEmail, Region};

mod wire;

use wire::{JotUrlWire, Loose, Object, Wire};

/// A mapped attribute: its id (borrowed from the message body unless it held escapes) and
/// its raw JSON value, borrowed from the body.
pub type Attribute<'a> = (Cow<'a, str>, &'a RawValue);

/// An attribute that cannot borrow from the body: a key of a JotUrl `extended_info`
/// object, which is a JSON text inside a JSON string. The key is always `Cow::Owned`.
pub type OwnedAttribute = (Cow<'static, str>, Box<RawValue>);

/// Which input shape a body had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The session's fields at the top level.
    Canonical,
    /// A Jebbit webhook body, with a `data` object.
    Jebbit,
    /// A JotUrl CTA lead: `data`, `type`, `date`, `name`, custom parameters.
    JotUrlLead,
    /// A JotUrl tracking-link message (`short_url`/`long_url`, no `data`): not a lead.
    JotUrlLink,
}

/// What a message's headers say about its body: the intake writes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hints<'h> {
    /// `x-segment-bridge-kind` (`jebbit` or `joturl`): decides the shape when present.
    pub kind: Option<&'h str>,
    /// `x-segment-bridge-region`: the region when the body names none.
    pub region: Option<&'h str>,
}

/// One collected session, valid by construction. It borrows from the message body what
/// it can (strings without escapes, the attributes' raw JSON values), so that parsing
/// allocates little.
#[derive(Debug, Clone)]
pub struct Session<'a> {
    /// What makes this session unique: `session_id`, or for a webhook body without one,
    /// the lowercase hex SHA-256 of the raw body. messageIds are derived from it.
    pub identity: Cow<'a, str>,
    /// The `session_id` as sent, if any; becomes `surveySessionId`.
    pub session_id: Option<Cow<'a, str>>,
    pub campaign_id: Option<Cow<'a, str>>,
    pub campaign_name: Option<Cow<'a, str>>,
    pub traffic_source: Option<Cow<'a, str>>,
    pub completed_at: Option<OffsetDateTime>,
    /// `None`: the configured default region applies.
    pub region: Option<Region>,
    /// `None`: the session had no email and produces no events.
    pub email: Option<Email>,
    pub opt_in: bool,
    /// Mapped attribute id → raw JSON value, in the order they came, without duplicates.
    pub attributes: Vec<Attribute<'a>>,
    /// More attributes, that could not borrow from the body (only a JotUrl lead's
    /// `extended_info` has them); none has the name of one in `attributes`. Kept apart so
    /// that the other shapes' attributes stay plain borrows.
    pub owned_attributes: Vec<OwnedAttribute>,
    /// The shape the body had: a JotUrl lead's Track takes `mapping.lead_event`, and a
    /// JotUrl tracking link is no lead at all.
    pub shape: Shape,
    /// A JotUrl lead's `date` (a day, at 00:00:00Z): its time when the message carries no
    /// AMQP timestamp.
    pub lead_date: Option<OffsetDateTime>,
}

/// Why a message body is not a valid session. Every variant is permanent: the same body
/// will fail the same way, so the message is dead-lettered with this text as its reason.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum InputError {
    #[error("the message body is not valid JSON: {0}")]
    NotJson(String),
    #[error("the message body is not a JSON object")]
    NotAnObject,
    #[error("the message body is not a valid session: {0}")]
    Malformed(String),
    #[error("`{field}` must be {expected}, found {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("`session_id` is missing (required unless the body is a Jebbit webhook with `data`)")]
    MissingSessionId,
    #[error("`session_id` is empty")]
    EmptySessionId,
    #[error("`email` is not an email address")]
    InvalidEmail,
    #[error("`completed_at` is not an RFC 3339 time: {0:?}")]
    InvalidCompletedAt(String),
    #[error("`region` must be \"eu\", \"us\" or \"non-eu\", found {0:?}")]
    InvalidRegion(String),
    #[error("`date` is not a day (YYYY-MM-DD) or an RFC 3339 time: {0:?}")]
    InvalidDate(String),
    #[error("the header x-segment-bridge-kind names no known shape (jebbit or joturl): {0:?}")]
    UnknownKind(String),
    #[error("the header x-segment-bridge-region must be \"eu\" or \"us\", found {0:?}")]
    InvalidRegionHeader(String),
}

impl From<InvalidEmail> for InputError {
    fn from(_: InvalidEmail) -> Self {
        InputError::InvalidEmail
    }
}

impl InputError {
    /// A short, stable name for the `reason` label of the dead-letter metric.
    pub fn code(&self) -> &'static str {
        match self {
            InputError::NotJson(_) => "not_json",
            InputError::NotAnObject => "not_an_object",
            InputError::Malformed(_) => "malformed",
            InputError::WrongType { .. } => "wrong_type",
            InputError::MissingSessionId | InputError::EmptySessionId => "invalid_session_id",
            InputError::InvalidEmail => "invalid_email",
            InputError::InvalidCompletedAt(_) => "invalid_completed_at",
            InputError::InvalidRegion(_) | InputError::InvalidRegionHeader(_) => "invalid_region",
            InputError::InvalidDate(_) => "invalid_date",
            InputError::UnknownKind(_) => "unknown_kind",
        }
    }
}

impl<'a> Session<'a> {
    /// Every attribute, `attributes` then `owned_attributes`: its id (a borrowed one is
    /// free of escapes) and its raw value.
    pub fn all_attributes(&self) -> impl Iterator<Item = (&Cow<'_, str>, &RawValue)> + Clone {
        self.attributes
            .iter()
            .map(|(k, v)| (k, *v))
            .chain(self.owned_attributes.iter().map(|(k, v)| (k, &**v)))
    }

    pub fn has_attributes(&self) -> bool {
        !self.attributes.is_empty() || !self.owned_attributes.is_empty()
    }
}

impl Session<'_> {
    /// Parses and validates one message body that comes without headers (`preview`, a
    /// message an upstream queued): its keys tell the shape.
    #[inline]
    pub fn parse(body: &[u8]) -> Result<Session<'_>, InputError> {
        Session::parse_with(body, Hints::default())
    }

    /// Parses and validates one message body, in the shape its headers name, if any; the
    /// region header applies when the body names no region.
    #[inline]
    pub fn parse_with<'a>(body: &'a [u8], hints: Hints<'_>) -> Result<Session<'a>, InputError> {
        let parsed = match hints.kind {
            None => Session::parse_by_keys(body),
            Some("jebbit") => Session::parse_survey(body),
            Some("joturl") => Session::parse_joturl(body),
            Some(other) => Err(InputError::UnknownKind(other.to_owned())),
        };
        match hints.region {
            // The session is returned where it was built: no copy on the hot path.
            None => parsed,
            Some(region) => parsed.and_then(|session| with_region_header(session, region)),
        }
    }

    /// The canonical or the Jebbit shape, else a JotUrl message when its keys say so.
    #[inline]
    fn parse_by_keys(body: &[u8]) -> Result<Session<'_>, InputError> {
        match Session::parse_survey(body) {
            // Only a body that is neither of the first two shapes pays for a second look.
            Err(
                e @ (InputError::MissingSessionId
                | InputError::WrongType {
                    field: "data",
                    found: "a string",
                    ..
                }),
            ) => {
                if looks_like_joturl(body) {
                    Session::parse_joturl(body)
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }

    /// The canonical shape, or the Jebbit webhook shape (a `data` object).
    fn parse_survey(body: &[u8]) -> Result<Session<'_>, InputError> {
        let text = utf8(body)?;
        let wire: Wire = serde_json::from_str(text).map_err(|e| json_error(e, body))?;
        Session::from_wire(wire, body)
    }

    fn from_wire<'a>(wire: Wire<'a>, body: &[u8]) -> Result<Session<'a>, InputError> {
        let (data_email, data_opt_in, data_attributes, is_webhook) = match wire.data {
            None => (None, None, Vec::new(), false),
            Some(Object::Other(found)) => {
                return Err(InputError::WrongType {
                    field: "data",
                    expected: "an object",
                    found,
                });
            }
            Some(Object::Map(data)) => (data.email, data.opt_in, data.attributes, true),
        };

        // Unlike the optional fields, a `session_id` that is present must be a string.
        let session_id = match wire.session_id {
            Some(Loose::Null) => {
                return Err(InputError::WrongType {
                    field: "session_id",
                    expected: "a string",
                    found: "null",
                });
            }
            other => string_field("session_id", other)?,
        };
        let identity = match (&session_id, is_webhook) {
            (Some(id), _) if id.is_empty() => return Err(InputError::EmptySessionId),
            (Some(id), _) => id.clone(),
            (None, true) => Cow::Owned(hex::encode(Sha256::digest(body))),
            (None, false) => return Err(InputError::MissingSessionId),
        };

        // In a webhook body, `data.email` and `data.opt_in` win over top-level keys.
        let email = match data_email.or(wire.email) {
            None | Some(Loose::Null) => None,
            Some(Loose::Str(s)) => Email::parse(&s)?,
            Some(other) => {
                return Err(InputError::WrongType {
                    field: "email",
                    expected: "a string",
                    found: other.kind(),
                });
            }
        };
        let opt_in = match data_opt_in.or(wire.opt_in) {
            Some(Loose::Bool(b)) => b,
            Some(Loose::Str(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        };

        let completed_at = match string_field("completed_at", wire.completed_at)? {
            None => None,
            Some(s) => Some(
                OffsetDateTime::parse(&s, &Rfc3339)
                    .map_err(|_| InputError::InvalidCompletedAt(s.into_owned()))?,
            ),
        };
        let region = match string_field("region", wire.region)? {
            None => None,
            Some(s) => Some(Region::parse(&s).ok_or_else(|| InputError::InvalidRegion(s.into()))?),
        };

        let mut attributes = match wire.attributes {
            None => Vec::new(),
            Some(Object::Map(attrs)) => attrs.0,
            Some(Object::Other(found)) => {
                return Err(InputError::WrongType {
                    field: "attributes",
                    expected: "an object",
                    found,
                });
            }
        };
        if !data_attributes.is_empty() {
            attributes.extend(data_attributes);
            dedupe(&mut attributes);
        }

        Ok(Session {
            identity,
            session_id,
            campaign_id: string_field("campaign_id", wire.campaign_id)?,
            campaign_name: string_field("campaign_name", wire.campaign_name)?,
            traffic_source: string_field("traffic_source", wire.traffic_source)?,
            completed_at,
            region,
            email,
            opt_in,
            attributes,
            owned_attributes: Vec::new(),
            shape: if is_webhook {
                Shape::Jebbit
            } else {
                Shape::Canonical
            },
            lead_date: None,
        })
    }

    /// A JotUrl CTA message: a lead (`data` is the email when `type` is `email`), or a
    /// tracking-link message, which is no lead.
    fn parse_joturl(body: &[u8]) -> Result<Session<'_>, InputError> {
        let text = utf8(body)?;
        let wire: JotUrlWire = serde_json::from_str(text).map_err(|e| json_error(e, body))?;
        let JotUrlWire {
            data,
            kind,
            date,
            link,
            mut attributes,
        } = wire;
        let shape = if data.is_none() && link {
            Shape::JotUrlLink
        } else {
            Shape::JotUrlLead
        };
        let is_email = match string_field("type", kind)? {
            Some(kind) => kind.eq_ignore_ascii_case("email"),
            None => false,
        };
        // Any other `type` (a phone number, a social id) carries no email: skipped.
        let email = match (is_email, data) {
            (false, _) | (true, None | Some(Loose::Null)) => None,
            (true, Some(Loose::Str(s))) => Email::parse(&s)?,
            (true, Some(other)) => {
                return Err(InputError::WrongType {
                    field: "data",
                    expected: "a string",
                    found: other.kind(),
                });
            }
        };
        let lead_date = match string_field("date", date)? {
            None => None,
            Some(d) => Some(parse_day(&d).ok_or_else(|| InputError::InvalidDate(d.into_owned()))?),
        };
        dedupe(&mut attributes);
        // JotUrl has no opt-in of its own; a custom parameter `opt_in` counts as one.
        let opt_in = attributes
            .iter()
            .find(|(k, _)| k == "opt_in")
            .is_some_and(|(_, v)| {
                let v = v.get();
                v == "true" || v.eq_ignore_ascii_case("\"true\"")
            });
        let mut owned_attributes = Vec::new();
        let attributes = attributes
            .into_iter()
            .filter_map(|(key, value)| match value {
                Cow::Borrowed(value) => Some((key, value)),
                Cow::Owned(value) => {
                    owned_attributes.push((Cow::Owned(key.into_owned()), value));
                    None
                }
            })
            .collect();
        Ok(Session {
            identity: Cow::Owned(hex::encode(Sha256::digest(body))),
            session_id: None,
            campaign_id: None,
            campaign_name: None,
            traffic_source: Some(Cow::Borrowed(JOTURL_TRAFFIC_SOURCE)),
            completed_at: None,
            region: None,
            email,
            opt_in,
            attributes,
            owned_attributes,
            shape,
            lead_date,
        })
    }
}

/// The region header's region, for a session whose body names none.
fn with_region_header<'a>(
    mut session: Session<'a>,
    region: &str,
) -> Result<Session<'a>, InputError> {
    let region =
        Region::parse(region).ok_or_else(|| InputError::InvalidRegionHeader(region.to_owned()))?;
    session.region.get_or_insert(region);
    Ok(session)
}

/// The `trafficSource` of every JotUrl lead.
pub const JOTURL_TRAFFIC_SOURCE: &str = "JotUrl";

/// One UTF-8 check for the whole body, rather than one per string.
fn utf8(body: &[u8]) -> Result<&str, InputError> {
    std::str::from_utf8(body).map_err(|e| InputError::NotJson(format!("it is not UTF-8 ({e})")))
}

fn json_error(e: serde_json::Error, body: &[u8]) -> InputError {
    let is_object = body.trim_ascii_start().first() == Some(&b'{');
    match e.classify() {
        serde_json::error::Category::Data if is_object => InputError::Malformed(e.to_string()),
        serde_json::error::Category::Data => InputError::NotAnObject,
        _ => InputError::NotJson(e.to_string()),
    }
}

/// `2020-03-26` (at 00:00:00Z), or an RFC 3339 time.
fn parse_day(s: &str) -> Option<OffsetDateTime> {
    let day = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(date) = time::Date::parse(s, &day) {
        return Some(date.midnight().assume_utc());
    }
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// Whether a body that is no session of the first two shapes has JotUrl's keys: a string
/// `data` beside a `type`, or a tracking link's `short_url`/`long_url` without `data`; and
/// no `session_id`, which only the first two shapes have.
fn looks_like_joturl(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Keys<'a> {
        #[serde(borrow)]
        data: Option<Loose<'a>>,
        #[serde(rename = "type")]
        kind: Option<IgnoredAny>,
        short_url: Option<IgnoredAny>,
        long_url: Option<IgnoredAny>,
        session_id: Option<IgnoredAny>,
    }
    let Ok(keys) = serde_json::from_slice::<Keys>(body) else {
        return false;
    };
    if keys.session_id.is_some() {
        return false;
    }
    match keys.data {
        Some(Loose::Str(_)) => keys.kind.is_some(),
        None => keys.short_url.is_some() || keys.long_url.is_some(),
        Some(_) => false,
    }
}

/// An optional string field: absent and `null` are `None`, any other type is an error.
fn string_field<'a>(
    field: &'static str,
    value: Option<Loose<'a>>,
) -> Result<Option<Cow<'a, str>>, InputError> {
    match value {
        None | Some(Loose::Null) => Ok(None),
        Some(Loose::Str(s)) => Ok(Some(s)),
        Some(other) => Err(InputError::WrongType {
            field,
            expected: "a string",
            found: other.kind(),
        }),
    }
}

/// Removes repeated keys, the later value winning as in most JSON readers, keeping the
/// position of the first. Linear for the usual handful of attributes, hashed for many.
fn dedupe<'a, V>(attributes: &mut Vec<(Cow<'a, str>, V)>) {
    if attributes.len() <= 32 {
        let mut i = 1;
        while i < attributes.len() {
            match attributes[..i]
                .iter()
                .position(|(k, _)| *k == attributes[i].0)
            {
                Some(first) => {
                    let (_, value) = attributes.remove(i);
                    attributes[first].1 = value;
                }
                None => i += 1,
            }
        }
        return;
    }
    let mut first_at: std::collections::HashMap<Cow<'a, str>, usize> =
        std::collections::HashMap::with_capacity(attributes.len());
    let mut kept: Vec<(Cow<'a, str>, V)> = Vec::with_capacity(attributes.len());
    for (key, value) in attributes.drain(..) {
        match first_at.get(&key) {
            Some(&i) => kept[i].1 = value,
            None => {
                first_at.insert(key.clone(), kept.len());
                kept.push((key, value));
            }
        }
    }
    *attributes = kept;
}

/// The `session_id` of a body that failed to parse, if it can be read: for the log line.
pub fn peek_session_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        session_id: Option<String>,
    }
    serde_json::from_slice::<Peek>(body).ok()?.session_id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Session<'_>, InputError> {
        Session::parse(body.as_bytes())
    }

    fn attrs<'a>(s: &'a Session<'_>) -> Vec<(&'a str, &'a str)> {
        s.all_attributes().map(|(k, v)| (&**k, v.get())).collect()
    }

    #[test]
    fn the_canonical_shape_is_read_field_by_field() {
        let s = parse(
            r#"{"session_id":"y2P5ks05mqzGsdkIGjbQ","campaign_id":"n3zrik6g",
                "campaign_name":"New Quiz","traffic_source":"Owned+Web",
                "completed_at":"2021-03-12T00:00:00.000Z","region":"eu",
                "email":"  Jane.Doe@Example.com ","opt_in":true,
                "attributes":{"attribute_id_1":"attribute_value_1","favorite_colors":["option 1","option 4"]}}"#,
        )
        .unwrap();
        assert_eq!(s.identity, "y2P5ks05mqzGsdkIGjbQ");
        assert_eq!(s.session_id.as_deref(), Some("y2P5ks05mqzGsdkIGjbQ"));
        assert_eq!(s.campaign_id.as_deref(), Some("n3zrik6g"));
        assert_eq!(s.campaign_name.as_deref(), Some("New Quiz"));
        assert_eq!(s.traffic_source.as_deref(), Some("Owned+Web"));
        assert_eq!(s.completed_at.unwrap().unix_timestamp(), 1_615_507_200);
        assert_eq!(s.region, Some(Region::Eu));
        assert_eq!(s.email.as_ref().unwrap().as_str(), "jane.doe@example.com");
        assert!(s.opt_in);
        assert_eq!(
            attrs(&parse(r#"{"session_id":"a","attributes":{"x":1,"y":[1,2]}}"#).unwrap()),
            [("x", "1"), ("y", "[1,2]")]
        );
    }

    #[test]
    fn the_jebbit_webhook_body_is_a_session_identified_by_its_hash() {
        let body = include_str!("../../tests/fixtures/jebbit-webhook-test-submission.json");
        let s = Session::parse(body.as_bytes()).unwrap();
        assert_eq!(s.identity, hex::encode(Sha256::digest(body.as_bytes())));
        assert_eq!(s.session_id, None);
        assert_eq!(s.email.as_ref().unwrap().as_str(), "test@example.com");
        assert!(s.opt_in, "the string \"true\" is an opt-in");
        assert_eq!(
            attrs(&s),
            [
                ("test_attribute", "\"attribute_value\""),
                ("test_sata_attribute", "[\"option 1\",\"option 4\"]"),
                ("outcome", "\"example_outcome\""),
            ]
        );
    }

    #[test]
    fn webhook_data_wins_over_top_level_keys_and_session_keys_may_stand_beside_it() {
        let s = parse(
            r#"{"session_id":"s1","region":"non-eu","email":"top@x.io","opt_in":true,
                "attributes":{"a":1,"b":2},
                "data":{"email":"data@x.io","opt_in":"false","b":3}}"#,
        )
        .unwrap();
        assert_eq!(s.identity, "s1");
        assert_eq!(s.region, Some(Region::Us));
        assert_eq!(s.email.as_ref().unwrap().as_str(), "data@x.io");
        assert!(!s.opt_in);
        assert_eq!(attrs(&s), [("a", "1"), ("b", "3")]);
    }

    #[test]
    fn opt_in_is_true_only_for_true_or_the_string_true_in_any_case() {
        for (v, want) in [
            ("true", true),
            ("\"TRUE\"", true),
            ("\"True\"", true),
            ("false", false),
            ("\"false\"", false),
            ("\"yes\"", false),
            ("\" true \"", false),
            ("1", false),
            ("null", false),
        ] {
            let body = format!(r#"{{"session_id":"a","opt_in":{v}}}"#);
            let s = parse(&body).unwrap();
            assert_eq!(s.opt_in, want, "opt_in {v}");
        }
        assert!(!parse(r#"{"session_id":"a"}"#).unwrap().opt_in);
    }

    #[test]
    fn region_is_read_in_any_case_and_non_eu_means_us() {
        for (v, want) in [
            ("eu", Region::Eu),
            ("EU", Region::Eu),
            ("us", Region::Us),
            ("Non-EU", Region::Us),
        ] {
            let body = format!(r#"{{"session_id":"a","region":"{v}"}}"#);
            let s = parse(&body).unwrap();
            assert_eq!(s.region, Some(want));
        }
        assert_eq!(parse(r#"{"session_id":"a"}"#).unwrap().region, None);
        assert_eq!(
            parse(r#"{"session_id":"a","region":"apac"}"#).unwrap_err(),
            InputError::InvalidRegion("apac".into())
        );
    }

    #[test]
    fn a_missing_or_blank_email_is_no_email_and_a_malformed_one_is_an_error() {
        for v in ["null", "\"\"", "\"   \""] {
            let body = format!(r#"{{"session_id":"a","email":{v}}}"#);
            let s = parse(&body).unwrap();
            assert!(s.email.is_none(), "email {v}");
        }
        for v in [
            "\"jane\"",
            "\"@x.io\"",
            "\"jane@\"",
            "\"a@b@c\"",
            "\"ja ne@x.io\"",
        ] {
            assert_eq!(
                parse(&format!(r#"{{"session_id":"a","email":{v}}}"#)).unwrap_err(),
                InputError::InvalidEmail,
                "email {v}"
            );
        }
        assert!(matches!(
            parse(r#"{"session_id":"a","email":42}"#).unwrap_err(),
            InputError::WrongType { field: "email", .. }
        ));
    }

    #[test]
    fn email_normalisation_is_unicode_aware() {
        let s =
            parse("{\"session_id\":\"a\",\"email\":\"\u{2003}ÉLODIE@Exämple.COM\\n\"}").unwrap();
        assert_eq!(s.email.as_ref().unwrap().as_str(), "élodie@exämple.com");
    }

    #[test]
    fn bad_bodies_are_errors_that_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("not json", "not valid JSON"),
            ("[1,2]", "not a JSON object"),
            ("\"s\"", "not a JSON object"),
            (r#"{"email":"a@b.c"}"#, "`session_id` is missing"),
            (r#"{"session_id":""}"#, "`session_id` is empty"),
            (
                r#"{"session_id":7}"#,
                "`session_id` must be a string, found a number",
            ),
            (
                r#"{"session_id":"a","completed_at":"yesterday"}"#,
                "not an RFC 3339 time",
            ),
            (
                r#"{"session_id":"a","attributes":[1]}"#,
                "`attributes` must be an object, found an array",
            ),
            (
                r#"{"data":"x"}"#,
                "`data` must be an object, found a string",
            ),
            (
                r#"{"data":{"email":"a@b.c"},"session_id":null}"#,
                "`session_id` must be a string, found null",
            ),
            (
                r#"{"session_id":"a","session_id":"b"}"#,
                "not a valid session: duplicate field `session_id`",
            ),
            (
                r#"{"session_id":"a","campaign_name":{"x":1}}"#,
                "`campaign_name` must be a string, found an object",
            ),
        ];
        for (body, want) in cases {
            let err = parse(body).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn a_later_duplicate_attribute_wins() {
        let s = parse(r#"{"session_id":"a","attributes":{"x":1,"y":2,"x":3}}"#).unwrap();
        assert_eq!(attrs(&s), [("x", "3"), ("y", "2")]);
        let s = parse(r#"{"data":{"email":"a@b.c","x":1,"x":2,"x":4}}"#).unwrap();
        assert_eq!(attrs(&s), [("x", "4")]);
    }

    #[test]
    fn many_attributes_are_deduplicated_in_linear_time() {
        let mut body = String::from(r#"{"session_id":"a","attributes":{"#);
        for i in 0..50_000 {
            body.push_str(&format!(r#""k{}":{i},"#, i % 25_000));
        }
        body.push_str(r#""last":true}}"#);
        let s = parse(&body).unwrap();
        assert_eq!(s.attributes.len(), 25_001);
        assert_eq!(s.attributes[0].0, "k0");
        assert_eq!(s.attributes[0].1.get(), "25000", "the later value wins");
    }

    #[test]
    fn the_session_id_of_an_invalid_body_can_still_be_logged() {
        assert_eq!(
            peek_session_id(br#"{"session_id":"s9","email":"nope","region":7}"#).as_deref(),
            Some("s9")
        );
        assert_eq!(peek_session_id(b"not json"), None);
    }

    #[test]
    fn completed_at_with_an_offset_is_the_same_instant() {
        let s = parse(r#"{"session_id":"a","completed_at":"2021-03-12T01:00:00+01:00"}"#).unwrap();
        assert_eq!(s.completed_at.unwrap().unix_timestamp(), 1_615_507_200);
    }

    fn joturl(body: &str) -> Result<Session<'_>, InputError> {
        Session::parse_with(
            body.as_bytes(),
            Hints {
                kind: Some("joturl"),
                region: None,
            },
        )
    }

    #[test]
    fn a_joturl_form_lead_is_its_email_name_and_day_identified_by_its_hash() {
        let body = include_str!("../../tests/fixtures/joturl-form-lead.json");
        for s in [joturl(body).unwrap(), parse(body).unwrap()] {
            assert_eq!(s.shape, Shape::JotUrlLead);
            assert_eq!(s.identity, hex::encode(Sha256::digest(body.as_bytes())));
            assert_eq!(s.session_id, None);
            assert_eq!(s.email.as_ref().unwrap().as_str(), "john.smith@example.com");
            assert_eq!(attrs(&s), [("name", "\"John Smith\"")]);
            assert_eq!(s.traffic_source.as_deref(), Some("JotUrl"));
            assert_eq!(
                s.lead_date,
                Some(time::macros::datetime!(2020-03-26 00:00:00 UTC))
            );
            assert_eq!((s.completed_at, s.region, s.opt_in), (None, None, false));
        }
    }

    #[test]
    fn extended_info_holding_an_object_becomes_attributes_else_stays_as_it_came() {
        let body = include_str!("../../tests/fixtures/joturl-social-optin-lead.json");
        let s = joturl(body).unwrap();
        assert_eq!(s.email.as_ref().unwrap().as_str(), "jane.roe@example.com");
        // The keys out of extended_info's string come after the others.
        assert_eq!(
            attrs(&s),
            [
                ("name", "\"Jane Roe\""),
                ("utm_campaign", "\"spring\""),
                ("coupon", "\"SPRING20\""),
                ("first_name", "\"Jane\""),
                ("last_name", "\"Roe\""),
                ("locale", "\"it_IT\""),
                ("picture", "\"https://example.com/jane.png\""),
            ]
        );
        assert_eq!(s.attributes.len(), 3, "borrowed from the body");
        for (info, want) in [
            (r#""not json""#, r#""not json""#),
            (r#""[1,2]""#, r#""[1,2]""#),
            ("7", "7"),
            ("null", "null"),
        ] {
            let body = format!(r#"{{"data":"a@b.c","type":"email","extended_info":{info}}}"#);
            let s = joturl(&body).unwrap();
            assert_eq!(attrs(&s), [("extended_info", want)], "{info}");
        }
        let object = r#"{"data":"a@b.c","type":"email","extended_info":{"k":[1]}}"#;
        assert_eq!(attrs(&joturl(object).unwrap()), [("k", "[1]")]);
        // Later keys win, wherever they came from.
        let clash =
            r#"{"name":"A","data":"a@b.c","type":"email","extended_info":"{\"name\":\"B\"}"}"#;
        assert_eq!(attrs(&joturl(clash).unwrap()), [("name", "\"B\"")]);
    }

    #[test]
    fn a_joturl_lead_of_another_type_has_no_email_and_a_tracking_link_is_no_lead() {
        for body in [
            r#"{"data":"+39 333 1234567","type":"phone","name":"X"}"#,
            r#"{"data":"a@b.c","name":"X"}"#,
            r#"{"type":"email","name":"X"}"#,
            r#"{"data":"  ","type":"email"}"#,
        ] {
            let s = joturl(body).unwrap();
            assert_eq!(
                (s.shape, s.email.is_none()),
                (Shape::JotUrlLead, true),
                "{body}"
            );
        }
        let link = include_str!("../../tests/fixtures/joturl-tracking-link.json");
        assert_eq!(joturl(link).unwrap().shape, Shape::JotUrlLink);
        assert_eq!(parse(link).unwrap().shape, Shape::JotUrlLink, "by its keys");
    }

    #[test]
    fn a_joturl_body_with_wrong_values_is_bad_input() {
        for (body, want) in [
            (r#"{"data":"nope","type":"email"}"#, "not an email address"),
            (
                r#"{"data":7,"type":"email"}"#,
                "`data` must be a string, found a number",
            ),
            (r#"{"data":"a@b.c","type":1}"#, "`type` must be a string"),
            (
                r#"{"data":"a@b.c","type":"email","date":"26/03/2020"}"#,
                "`date` is not a day",
            ),
            (
                r#"{"data":"a@b.c","type":"email","data":"c@d.e"}"#,
                "duplicate field `data`",
            ),
            ("[1]", "not a JSON object"),
            ("nope", "not valid JSON"),
        ] {
            let err = joturl(body).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
        // A date may also be a full RFC 3339 time.
        let s = joturl(r#"{"data":"a@b.c","type":"email","date":"2020-03-26T10:00:00+02:00"}"#);
        assert_eq!(
            s.unwrap().lead_date,
            Some(time::macros::datetime!(2020-03-26 08:00:00 UTC))
        );
    }

    #[test]
    fn a_custom_opt_in_parameter_is_a_joturl_leads_opt_in_and_stays_an_attribute() {
        let s = joturl(r#"{"data":"a@b.c","type":"email","opt_in":"TRUE"}"#).unwrap();
        assert!(s.opt_in);
        assert_eq!(attrs(&s), [("opt_in", "\"TRUE\"")]);
        assert!(
            !joturl(r#"{"data":"a@b.c","type":"email","opt_in":"no"}"#)
                .unwrap()
                .opt_in
        );
    }

    #[test]
    fn the_kind_header_decides_the_shape_and_the_region_header_fills_a_missing_region() {
        let lead = r#"{"data":"a@b.c","type":"email"}"#;
        let jebbit = Hints {
            kind: Some("jebbit"),
            region: Some("eu"),
        };
        // Told it is Jebbit's, a JotUrl body is judged as Jebbit's: `data` must be an object.
        assert!(matches!(
            Session::parse_with(lead.as_bytes(), jebbit),
            Err(InputError::WrongType { field: "data", .. })
        ));
        let body = include_str!("../../tests/fixtures/jebbit-webhook-test-submission.json");
        let s = Session::parse_with(body.as_bytes(), jebbit).unwrap();
        assert_eq!((s.shape, s.region), (Shape::Jebbit, Some(Region::Eu)));
        // The body's own region wins.
        let us = r#"{"session_id":"a","region":"us"}"#;
        assert_eq!(
            Session::parse_with(us.as_bytes(), jebbit).unwrap().region,
            Some(Region::Us)
        );
        let eu = Hints {
            kind: Some("joturl"),
            region: Some("EU"),
        };
        assert_eq!(
            Session::parse_with(lead.as_bytes(), eu).unwrap().region,
            Some(Region::Eu)
        );
        // A canonical body with a `type` key stays canonical without a kind.
        let canonical = r#"{"session_id":"a","type":"email","data":{"email":"a@b.c"}}"#;
        assert_eq!(parse(canonical).unwrap().shape, Shape::Jebbit);
        assert_eq!(
            parse(r#"{"session_id":"a"}"#).unwrap().shape,
            Shape::Canonical
        );
        for (hints, want) in [
            (
                Hints {
                    kind: Some("typeform"),
                    region: None,
                },
                "names no known shape",
            ),
            (
                Hints {
                    kind: Some("joturl"),
                    region: Some("apac"),
                },
                "x-segment-bridge-region",
            ),
        ] {
            let err = Session::parse_with(lead.as_bytes(), hints)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn bodies_that_only_resemble_joturl_keep_their_old_errors() {
        for (body, want) in [
            (
                r#"{"data":"x"}"#,
                "`data` must be an object, found a string",
            ),
            (r#"{"email":"a@b.c"}"#, "`session_id` is missing"),
            (
                r#"{"data":"x","type":"email","session_id":7}"#,
                "`data` must be an object",
            ),
        ] {
            let err = parse(body).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
    }
}
