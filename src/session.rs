//! Parsing a message body into a validated [`Session`].
//!
//! Two input shapes are accepted (see the README): the canonical one, with the session's
//! fields at the top level and its answers under `attributes`, and the body of a Jebbit
//! webhook, with the email, the opt-in and the answers under `data`. Both are read by one
//! serde pass into loose wire types, then checked once into a [`Session`] that cannot be
//! invalid. Nothing here knows about AMQP, clocks or Segment.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

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
    pub fn parse(raw: &str) -> Result<Option<Email>, InputError> {
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
            Err(InputError::InvalidEmail)
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
    pub attributes: Vec<(Cow<'a, str>, &'a RawValue)>,
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
            InputError::InvalidRegion(_) => "invalid_region",
        }
    }
}

impl Session<'_> {
    /// Parses and validates one message body.
    pub fn parse(body: &[u8]) -> Result<Session<'_>, InputError> {
        // One UTF-8 check for the whole body, rather than one per string.
        let text = std::str::from_utf8(body)
            .map_err(|e| InputError::NotJson(format!("it is not UTF-8 ({e})")))?;
        let wire: Wire = serde_json::from_str(text).map_err(|e| {
            let is_object = body.trim_ascii_start().first() == Some(&b'{');
            match e.classify() {
                serde_json::error::Category::Data if is_object => {
                    InputError::Malformed(e.to_string())
                }
                serde_json::error::Category::Data => InputError::NotAnObject,
                _ => InputError::NotJson(e.to_string()),
            }
        })?;
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
        })
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
fn dedupe<'a>(attributes: &mut Vec<(Cow<'a, str>, &'a RawValue)>) {
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
    let mut kept: Vec<(Cow<'a, str>, &'a RawValue)> = Vec::with_capacity(attributes.len());
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

// ---- wire types: what serde reads, before any rule is checked ----

#[derive(Deserialize)]
struct Wire<'a> {
    /// `null` stays `Some(Loose::Null)` here: a present `session_id` must be a string.
    #[serde(default, borrow, deserialize_with = "present")]
    session_id: Option<Loose<'a>>,
    #[serde(borrow)]
    campaign_id: Option<Loose<'a>>,
    #[serde(borrow)]
    campaign_name: Option<Loose<'a>>,
    #[serde(borrow)]
    traffic_source: Option<Loose<'a>>,
    #[serde(borrow)]
    completed_at: Option<Loose<'a>>,
    #[serde(borrow)]
    region: Option<Loose<'a>>,
    #[serde(borrow)]
    email: Option<Loose<'a>>,
    #[serde(borrow)]
    opt_in: Option<Loose<'a>>,
    #[serde(borrow)]
    attributes: Option<Object<Attributes<'a>>>,
    #[serde(borrow)]
    data: Option<Object<Data<'a>>>,
}

fn present<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Loose<'a>>, D::Error> {
    Loose::deserialize(d).map(Some)
}

/// Any JSON value, keeping strings and booleans and only the kind of anything else, so
/// that a wrong type becomes an error naming the field instead of a serde message.
/// Strings are borrowed from the body unless they hold escapes.
enum Loose<'a> {
    Null,
    Bool(bool),
    Str(Cow<'a, str>),
    Other(&'static str),
}

impl Loose<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Loose::Null => "null",
            Loose::Bool(_) => "a boolean",
            Loose::Str(_) => "a string",
            Loose::Other(kind) => kind,
        }
    }
}

struct LooseVisitor<'a>(PhantomData<&'a ()>);

const LOOSE: LooseVisitor<'static> = LooseVisitor(PhantomData);

impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor(PhantomData))
    }
}

impl<'de: 'a, 'a> Visitor<'de> for LooseVisitor<'a> {
    type Value = Loose<'a>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Loose<'a>, E> {
        Ok(Loose::Null)
    }
    fn visit_none<E>(self) -> Result<Loose<'a>, E> {
        Ok(Loose::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Loose<'a>, D::Error> {
        Loose::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Loose<'a>, E> {
        Ok(Loose::Bool(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Loose<'a>, E> {
        Ok(Loose::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Loose<'a>, E> {
        Ok(Loose::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Loose<'a>, E> {
        Ok(Loose::Str(Cow::Owned(v)))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Loose<'a>, E> {
        Ok(Loose::Other("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Loose<'a>, E> {
        Ok(Loose::Other("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Loose<'a>, E> {
        Ok(Loose::Other("a number"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose<'a>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Loose::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose<'a>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Loose::Other("an object"))
    }
}

/// A field that must be a JSON object: its contents, or the kind of what stood there.
enum Object<T> {
    Map(T),
    Other(&'static str),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object::Map)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Object<T>, A::Error> {
                Ok(Object::Other(LOOSE.visit_seq(seq)?.kind()))
            }
            fn visit_unit<E>(self) -> Result<Object<T>, E> {
                Ok(Object::Other("null"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Object<T>, E> {
                Ok(Object::Other("a boolean"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Object<T>, E> {
                Ok(Object::Other("a string"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Object<T>, E> {
                Ok(Object::Other("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Object<T>, E> {
                Ok(Object::Other("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Object<T>, E> {
                Ok(Object::Other("a number"))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The `attributes` object, in order, duplicates resolved.
struct Attributes<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// A key, borrowed from the body unless it holds escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Key<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Attributes<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Attributes<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Attributes<'a>, A::Error> {
                let mut attributes = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((Key(key), value)) = map.next_entry::<Key, &'a RawValue>()? {
                    attributes.push((key, value));
                }
                dedupe(&mut attributes);
                Ok(Attributes(attributes))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// The webhook's `data` object: email and opt-in taken out, every other key an attribute.
struct Data<'a> {
    email: Option<Loose<'a>>,
    opt_in: Option<Loose<'a>>,
    attributes: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Data<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Data<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Data<'a>, A::Error> {
                let mut data = Data {
                    email: None,
                    opt_in: None,
                    attributes: Vec::with_capacity(map.size_hint().unwrap_or(16)),
                };
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    match &*key {
                        "email" => data.email = Some(map.next_value()?),
                        "opt_in" => data.opt_in = Some(map.next_value()?),
                        _ => data.attributes.push((key, map.next_value()?)),
                    }
                }
                dedupe(&mut data.attributes);
                Ok(data)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Session<'_>, InputError> {
        Session::parse(body.as_bytes())
    }

    fn attrs<'a>(s: &'a Session<'_>) -> Vec<(&'a str, &'a str)> {
        s.attributes.iter().map(|(k, v)| (&**k, v.get())).collect()
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
        let body = include_str!("../tests/fixtures/jebbit-webhook-test-submission.json");
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
}
