//! The mapping: a [`Session`] and the mapping options become one Identify and one Track
//! event, serialised once, ready to be placed in a batch.
//!
//! Everything here is a pure function: no I/O, no clock (the caller passes the time to use
//! when a session has no `completed_at`), no randomness. messageIds are derived from the
//! session identity, so a redelivered session produces byte-identical events except for
//! the fallback timestamp, and Segment's messageId deduplication absorbs it.

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::session::{Email, Region, Session};

/// Segment's per-message limit, counted on the serialised JSON of one event.
pub const MAX_EVENT_BYTES: usize = 32_000;

/// What travels in `context.library`.
pub const LIBRARY_NAME: &str = "segment-bridge";
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `[mapping]` options, plus the region used when a session names none.
#[derive(Debug, Clone)]
pub struct Options {
    /// Leave the plain email out of the traits; only its hash travels.
    pub hash_pii: bool,
    /// Skip sessions whose opt-in is not true.
    pub require_opt_in: bool,
    /// Put the mapped attributes in traits and in `questions`.
    pub include_mapped_attributes: bool,
    /// The Track event's name.
    pub track_event: String,
    pub default_region: Region,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hash_pii: false,
            require_opt_in: false,
            include_mapped_attributes: true,
            track_event: "Survey Completed".to_owned(),
            default_region: Region::Us,
        }
    }
}

/// What a session becomes.
#[derive(Debug)]
pub enum Mapped {
    /// Both events, serialised, and the region whose endpoint must receive them.
    Events(SessionEvents),
    /// Nothing to send, by design; the delivery is acknowledged and counted.
    Skipped(SkipReason),
}

#[derive(Debug, Clone)]
pub struct SessionEvents {
    /// The session's identity, for logs: its `session_id`, else the body's hash.
    pub session: String,
    pub region: Region,
    pub identify: Vec<u8>,
    pub track: Vec<u8>,
}

impl SessionEvents {
    /// Serialised size of both events, without the separators of a batch.
    pub fn len(&self) -> usize {
        self.identify.len() + self.track.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    NoEmail,
    NoOptIn,
}

impl SkipReason {
    /// The `outcome` label of `segment_bridge_sessions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NoEmail => "skipped_no_email",
            SkipReason::NoOptIn => "skipped_no_opt_in",
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MapError {
    #[error(
        "the {event} event is {bytes} bytes of JSON, over Segment's limit of {MAX_EVENT_BYTES} bytes per event"
    )]
    TooLarge { event: &'static str, bytes: usize },
}

/// Maps one session. `fallback_time` is used when the session has no `completed_at`.
pub fn map(
    session: &Session,
    fallback_time: OffsetDateTime,
    options: &Options,
) -> Result<Mapped, MapError> {
    let Some(email) = &session.email else {
        return Ok(Mapped::Skipped(SkipReason::NoEmail));
    };
    if options.require_opt_in && !session.opt_in {
        return Ok(Mapped::Skipped(SkipReason::NoOptIn));
    }

    let hash = email_hash(email);
    let timestamp = format_timestamp(session.completed_at.unwrap_or(fallback_time));
    let context = Context {
        external_ids: [ExternalId {
            collection: "users",
            encoding: "none",
            id: &hash,
            kind: "emailSha256Hash",
        }],
        library: Library {
            name: LIBRARY_NAME,
            version: LIBRARY_VERSION,
        },
    };
    let attributes = Attributes {
        session,
        options,
        plain_email: (!options.hash_pii).then_some(email),
        hash: &hash,
    };

    let identify = serialize_event(
        "identify",
        &Event {
            kind: "identify",
            event: None,
            message_id: &message_id(&session.identity, "identify"),
            user_id: &hash,
            timestamp: &timestamp,
            context: &context,
            traits: Some(Traits(&attributes)),
            properties: None,
        },
    )?;
    let track = serialize_event(
        "track",
        &Event {
            kind: "track",
            event: Some(&options.track_event),
            message_id: &message_id(&session.identity, "track"),
            user_id: &hash,
            timestamp: &timestamp,
            context: &context,
            traits: None,
            properties: Some(Properties {
                // Left out, like any other missing property, when there are no answers.
                questions: (options.include_mapped_attributes && !session.attributes.is_empty())
                    .then_some(Questions(&attributes)),
                survey_id: session.campaign_id.as_deref(),
                survey_session_id: session.session_id.as_deref(),
                survey_title: session.campaign_name.as_deref(),
                traffic_source: session.traffic_source.as_deref(),
            }),
        },
    )?;

    Ok(Mapped::Events(SessionEvents {
        session: session.identity.clone(),
        region: session.region.unwrap_or(options.default_region),
        identify,
        track,
    }))
}

/// Lowercase hex SHA-256 of the normalised email: the `userId`.
pub fn email_hash(email: &Email) -> String {
    hex::encode(Sha256::digest(email.as_str().as_bytes()))
}

/// A messageId for one event of one session, a pure function of both:
/// `sb-<event type>-<hex SHA-256 of both>`, at most 73 characters.
pub fn message_id(identity: &str, event_type: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"segment-bridge/v1\0");
    h.update(event_type.as_bytes());
    h.update(b"\0");
    h.update(identity.as_bytes());
    format!("sb-{event_type}-{}", hex::encode(h.finalize()))
}

/// RFC 3339 in UTC with milliseconds, as Segment shows it: `2021-03-12T00:00:00.000Z`.
pub fn format_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn serialize_event(name: &'static str, event: &Event<'_>) -> Result<Vec<u8>, MapError> {
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, event).expect("serialising to a Vec cannot fail");
    if out.len() > MAX_EVENT_BYTES {
        return Err(MapError::TooLarge {
            event: name,
            bytes: out.len(),
        });
    }
    Ok(out)
}

// ---- the serialised shapes ----

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    message_id: &'a str,
    user_id: &'a str,
    timestamp: &'a str,
    context: &'a Context<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traits: Option<Traits<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<Properties<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Context<'a> {
    external_ids: [ExternalId<'a>; 1],
    library: Library,
}

#[derive(Serialize)]
struct ExternalId<'a> {
    collection: &'static str,
    encoding: &'static str,
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Library {
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Properties<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    questions: Option<Questions<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    survey_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    survey_session_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    survey_title: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traffic_source: Option<&'a str>,
}

/// What traits and questions are built from.
struct Attributes<'a> {
    session: &'a Session,
    options: &'a Options,
    plain_email: Option<&'a Email>,
    hash: &'a str,
}

impl Attributes<'_> {
    /// The mapped attributes that travel. With `hash_pii`, an attribute named `email` does
    /// not: it would carry the address in plain text.
    fn mapped(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        let include = self.options.include_mapped_attributes;
        let hash_pii = self.options.hash_pii;
        self.session
            .attributes
            .iter()
            .filter(move |(k, _)| include && !(hash_pii && k == "email"))
            .map(|(k, v)| (k.as_str(), &**v))
    }
}

/// Identify traits: `email` (unless `hash_pii`), `emailSha256Hash`, then the attributes.
/// The computed keys win over attributes of the same name.
struct Traits<'a>(&'a Attributes<'a>);

impl Serialize for Traits<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let a = self.0;
        let mut map = s.serialize_map(None)?;
        if let Some(email) = a.plain_email {
            map.serialize_entry("email", email.as_str())?;
        }
        map.serialize_entry("emailSha256Hash", a.hash)?;
        for (k, v) in a.mapped() {
            if k != "email" && k != "emailSha256Hash" {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

/// Track `properties.questions`: the attributes as they came.
struct Questions<'a>(&'a Attributes<'a>);

impl Serialize for Questions<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.0.mapped() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const SESSION: &str = r#"{
        "session_id": "y2P5ks05mqzGsdkIGjbQ", "campaign_id": "n3zrik6g",
        "campaign_name": "New Quiz", "traffic_source": "Owned+Web",
        "completed_at": "2021-03-12T00:00:00.000Z", "region": "eu",
        "email": "  Jane.Doe@Example.com ", "opt_in": true,
        "attributes": {"attribute_id_1": "attribute_value_1", "attribute_id_2": "attribute_value_2"}
    }"#;
    // sha256("jane.doe@example.com"), computed independently with `sha256sum`.
    const JANE: &str = "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d";

    fn now() -> OffsetDateTime {
        time::macros::datetime!(2026-11-22 10:00:00.123 UTC)
    }

    fn events(body: &str, options: &Options) -> (Value, Value, Region) {
        let session = Session::parse(body.as_bytes()).unwrap();
        match map(&session, now(), options).unwrap() {
            Mapped::Events(e) => (
                serde_json::from_slice(&e.identify).unwrap(),
                serde_json::from_slice(&e.track).unwrap(),
                e.region,
            ),
            Mapped::Skipped(r) => panic!("skipped: {r:?}"),
        }
    }

    fn golden(name: &str) -> Value {
        let path = format!("{}/../shared/examples/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Replaces what the published example could not show (the obfuscated email and its
    /// hash) and strips what it leaves out (messageId, context.library).
    fn comparable(mut event: Value, hash: &str) -> Value {
        let obj = event.as_object_mut().unwrap();
        obj.remove("messageId");
        obj["context"].as_object_mut().unwrap().remove("library");
        let text = event.to_string().replace(hash, "HASH");
        let mut event: Value = serde_json::from_str(&text).unwrap();
        if let Some(traits) = event.get_mut("traits") {
            traits["email"] = json!("EMAIL");
        }
        event
    }

    #[test]
    fn the_identify_has_the_keys_nesting_and_values_of_jebbits_published_example() {
        let (identify, _, _) = events(SESSION, &Options::default());
        let want = golden("jebbit-segment-identify.json");
        let want_hash = want["userId"].as_str().unwrap().to_owned();
        assert_eq!(comparable(identify, JANE), comparable(want, &want_hash));
    }

    #[test]
    fn the_track_has_the_keys_nesting_and_values_of_jebbits_published_example() {
        let (_, track, _) = events(SESSION, &Options::default());
        let want = golden("jebbit-segment-track.json");
        let want_hash = want["userId"].as_str().unwrap().to_owned();
        assert_eq!(comparable(track, JANE), comparable(want, &want_hash));
    }

    #[test]
    fn user_id_is_the_sha256_of_the_trimmed_lowercased_email() {
        let (identify, track, region) = events(SESSION, &Options::default());
        assert_eq!(identify["userId"], JANE);
        assert_eq!(track["userId"], JANE);
        assert_eq!(identify["traits"]["emailSha256Hash"], JANE);
        assert_eq!(identify["traits"]["email"], "jane.doe@example.com");
        assert_eq!(identify["context"]["externalIds"][0]["id"], JANE);
        assert_eq!(region, Region::Eu);
        // sha256("test@example.com"), from `printf test@example.com | sha256sum`.
        let body = r#"{"session_id":"x","email":"TEST@example.com "}"#;
        assert_eq!(
            events(body, &Options::default()).0["userId"],
            "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
        );
    }

    #[test]
    fn message_ids_are_deterministic_distinct_per_event_and_short_enough() {
        let (i1, t1, _) = events(SESSION, &Options::default());
        let (i2, t2, _) = events(SESSION, &Options::default());
        assert_eq!(i1["messageId"], i2["messageId"]);
        assert_eq!(t1["messageId"], t2["messageId"]);
        assert_ne!(i1["messageId"], t1["messageId"]);
        assert!(i1["messageId"].as_str().unwrap().len() <= 100);
        let other = SESSION.replace("y2P5ks05mqzGsdkIGjbQ", "another");
        assert_ne!(
            events(&other, &Options::default()).0["messageId"],
            i1["messageId"]
        );
    }

    #[test]
    fn context_names_this_library_and_version() {
        let (identify, track, _) = events(SESSION, &Options::default());
        for e in [identify, track] {
            assert_eq!(
                e["context"]["library"],
                json!({"name": "segment-bridge", "version": env!("CARGO_PKG_VERSION")})
            );
        }
    }

    #[test]
    fn traits_and_properties_are_exactly_the_specified_keys() {
        let (identify, track, _) = events(SESSION, &Options::default());
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            keys(&identify["traits"]),
            [
                "attribute_id_1",
                "attribute_id_2",
                "email",
                "emailSha256Hash"
            ]
        );
        assert_eq!(
            keys(&track["properties"]),
            [
                "questions",
                "surveyId",
                "surveySessionId",
                "surveyTitle",
                "trafficSource"
            ]
        );
        let sparse = r#"{"session_id":"s","email":"a@b.c"}"#;
        let (identify, track, _) = events(sparse, &Options::default());
        assert_eq!(keys(&identify["traits"]), ["email", "emailSha256Hash"]);
        assert_eq!(track["properties"], json!({"surveySessionId": "s"}));
    }

    #[test]
    fn the_webhook_body_maps_without_a_survey_session_id() {
        let body = include_str!("../../shared/examples/jebbit-webhook-test-submission.json");
        let (identify, track, region) = events(body, &Options::default());
        assert_eq!(region, Region::Us);
        assert_eq!(
            identify["traits"],
            json!({
                "email": "test@example.com",
                "emailSha256Hash": "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b",
                "test_attribute": "attribute_value",
                "test_sata_attribute": ["option 1", "option 4"],
                "outcome": "example_outcome"
            })
        );
        assert!(track["properties"].get("surveySessionId").is_none());
        assert_eq!(track["timestamp"], "2026-11-22T10:00:00.123Z");
    }

    #[test]
    fn hash_pii_leaves_every_plain_email_out() {
        let body = r#"{"session_id":"s","email":"a@b.c","attributes":{"email":"a@b.c","q":1}}"#;
        let options = Options {
            hash_pii: true,
            ..Options::default()
        };
        let (identify, track, _) = events(body, &options);
        assert!(!identify.to_string().contains("a@b.c"));
        assert!(!track.to_string().contains("a@b.c"));
        assert_eq!(identify["traits"]["q"], 1);
    }

    #[test]
    fn computed_traits_win_over_attributes_of_the_same_name() {
        let body = r#"{"session_id":"s","email":"a@b.c","attributes":{"emailSha256Hash":"x","email":"y"}}"#;
        let (identify, _, _) = events(body, &Options::default());
        assert_eq!(identify["traits"]["email"], "a@b.c");
        assert_ne!(identify["traits"]["emailSha256Hash"], "x");
        assert_eq!(identify["traits"].as_object().unwrap().len(), 2);
    }

    #[test]
    fn include_mapped_attributes_false_sends_no_attributes() {
        let options = Options {
            include_mapped_attributes: false,
            ..Options::default()
        };
        let (identify, track, _) = events(SESSION, &options);
        assert_eq!(identify["traits"].as_object().unwrap().len(), 2);
        assert!(track["properties"].get("questions").is_none());
    }

    #[test]
    fn track_event_names_the_track() {
        let options = Options {
            track_event: "Quiz Done".into(),
            ..Options::default()
        };
        assert_eq!(events(SESSION, &options).1["event"], "Quiz Done");
    }

    #[test]
    fn sessions_without_email_or_required_opt_in_are_skipped() {
        let no_email = Session::parse(br#"{"session_id":"s"}"#).unwrap();
        assert!(matches!(
            map(&no_email, now(), &Options::default()),
            Ok(Mapped::Skipped(SkipReason::NoEmail))
        ));
        let not_opted =
            Session::parse(br#"{"session_id":"s","email":"a@b.c","opt_in":"false"}"#).unwrap();
        let strict = Options {
            require_opt_in: true,
            ..Options::default()
        };
        assert!(matches!(
            map(&not_opted, now(), &strict),
            Ok(Mapped::Skipped(SkipReason::NoOptIn))
        ));
        assert!(matches!(
            map(&not_opted, now(), &Options::default()),
            Ok(Mapped::Events(_))
        ));
    }

    #[test]
    fn the_default_region_applies_when_the_session_names_none() {
        let body = r#"{"session_id":"s","email":"a@b.c"}"#;
        let options = Options {
            default_region: Region::Eu,
            ..Options::default()
        };
        assert_eq!(events(body, &options).2, Region::Eu);
    }

    #[test]
    fn an_event_over_32000_bytes_is_an_error_and_one_just_under_is_not() {
        let body = |n: usize| {
            format!(
                r#"{{"session_id":"s","email":"a@b.c","attributes":{{"big":"{}"}}}}"#,
                "x".repeat(n)
            )
        };
        let size = |n| {
            let s = Session::parse(body(n).as_bytes()).unwrap();
            match map(&s, now(), &Options::default()) {
                Ok(Mapped::Events(e)) => Ok(e.identify.len().max(e.track.len())),
                Ok(Mapped::Skipped(_)) => unreachable!(),
                Err(e) => Err(e),
            }
        };
        let base = size(0).unwrap();
        assert_eq!(size(MAX_EVENT_BYTES - base).unwrap(), MAX_EVENT_BYTES);
        assert!(matches!(
            size(MAX_EVENT_BYTES - base + 1),
            Err(MapError::TooLarge { bytes: 32_001, .. })
        ));
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(
            format_timestamp(time::macros::datetime!(2021-03-12 01:00:00.5 +01:00)),
            "2021-03-12T00:00:00.500Z"
        );
    }
}
