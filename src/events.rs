//! The mapping: a [`Session`] and the mapping options become one Identify and one Track
//! event, serialised once, ready to be placed in a batch.
//!
//! Everything here is a pure function: no I/O, no clock (the caller passes the time to use
//! when a session has no `completed_at`), no randomness. messageIds are derived from the
//! session identity and the Segment source it goes to (see [`MessageIds`]), so a
//! redelivered session produces byte-identical events except for the fallback timestamp,
//! and Segment's messageId deduplication absorbs it, while another source's copy is not
//! mistaken for it.

use std::borrow::Cow;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use serde_json::value::RawValue;

use crate::domain::{Email, Region};
use crate::session::{Session, Shape};

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
    /// The Track event's name for a JotUrl CTA lead.
    pub lead_event: String,
    pub default_region: Region,
    /// How each region's messageIds are derived: `segment.message_id_scheme` and the
    /// regions' namespaces, prepared once.
    pub message_ids: MessageIds,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hash_pii: false,
            require_opt_in: false,
            include_mapped_attributes: true,
            track_event: "Survey Completed".to_owned(),
            lead_event: "Lead Captured".to_owned(),
            default_region: Region::Us,
            message_ids: MessageIds::default(),
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEvents {
    pub region: Region,
    /// Both events as they stand in a batch: the Identify, a comma, the Track.
    json: Vec<u8>,
    identify_len: usize,
}

impl SessionEvents {
    /// Both events from their serialised JSON.
    pub fn new(region: Region, identify: &[u8], track: &[u8]) -> Self {
        let mut json = Vec::with_capacity(identify.len() + 1 + track.len());
        json.extend_from_slice(identify);
        json.push(b',');
        json.extend_from_slice(track);
        SessionEvents {
            region,
            json,
            identify_len: identify.len(),
        }
    }

    pub fn identify(&self) -> &[u8] {
        &self.json[..self.identify_len]
    }

    pub fn track(&self) -> &[u8] {
        &self.json[self.identify_len + 1..]
    }

    /// `identify,track`: what a batch holds of this session.
    pub fn batch_json(&self) -> &[u8] {
        &self.json
    }

    /// Serialised size of both events, without the separators of a batch.
    pub fn len(&self) -> usize {
        self.json.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    NoEmail,
    NoOptIn,
    /// A JotUrl tracking-link message: it carries no lead.
    NotALead,
}

impl SkipReason {
    /// The `outcome` label of `segment_bridge_sessions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NoEmail => "skipped_no_email",
            SkipReason::NoOptIn => "skipped_no_opt_in",
            SkipReason::NotALead => "skipped_not_a_lead",
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
///
/// The events are written straight into their buffers, in the order and with the
/// escaping serde_json would use (the tests hold it to that, byte for byte): the parts
/// both events share (hash, timestamp, context, the attributes) are rendered once.
pub fn map(
    session: &Session,
    fallback_time: OffsetDateTime,
    options: &Options,
) -> Result<Mapped, MapError> {
    if session.shape == Shape::JotUrlLink {
        return Ok(Mapped::Skipped(SkipReason::NotALead));
    }
    let Some(email) = &session.email else {
        return Ok(Mapped::Skipped(SkipReason::NoEmail));
    };
    if options.require_opt_in && !session.opt_in {
        return Ok(Mapped::Skipped(SkipReason::NoOptIn));
    }
    // Only a JotUrl lead can have owned attributes: the other shapes, the hot path, walk
    // their attributes without chaining an empty second list.
    if session.owned_attributes.is_empty() {
        let attributes = session.attributes.iter().map(|(k, v)| (k, *v));
        map_events(session, email, attributes, fallback_time, options)
    } else {
        map_events(
            session,
            email,
            session.all_attributes(),
            fallback_time,
            options,
        )
    }
}

/// [`map`] of a session that has an email and is not skipped, `attributes` being all of
/// the session's.
fn map_events<'s>(
    session: &Session,
    email: &Email,
    attributes: impl Iterator<Item = (&'s Cow<'s, str>, &'s RawValue)> + Clone,
    fallback_time: OffsetDateTime,
    options: &Options,
) -> Result<Mapped, MapError> {
    let hash = sha256_hex(email);
    // The region decides the Segment source, hence the messageIds' namespace.
    let region = session.region.unwrap_or(options.default_region);
    let ids = options.message_ids.region(region);

    // The mapped attributes that travel. With `hash_pii`, an attribute named `email` does
    // not: it would carry the address in plain text. Traits leave out the attributes named
    // like the computed traits, which win; `questions` keeps them.
    let include = options.include_mapped_attributes;
    let mapped = || {
        attributes
            .clone()
            .filter(move |(k, _)| include && !(options.hash_pii && *k == "email"))
    };
    let computed = |k: &str| k == "email" || k == "emailSha256Hash";
    let shadowed = mapped().any(|(k, _)| computed(k));
    let attribute_bytes: usize = mapped().map(|(k, v)| k.len() + v.get().len() + 4).sum();

    // One buffer for both events, `identify,track`, as they stand in a batch: one
    // allocation per session, and one copy into the request body.
    let mut json = Vec::with_capacity(2 * (640 + attribute_bytes) + 3 * email.as_str().len() + 320);
    json.extend_from_slice(br#"{"type":"identify","messageId":""#);
    ids.write(&mut json, &session.identity, EventKind::Identify);
    json.push(b'"');
    // `,"userId":…,"timestamp":…,"context":{…}`, the same in both events.
    let shared_start = json.len();
    json.extend_from_slice(br#","userId":""#);
    json.extend_from_slice(&hash);
    json.extend_from_slice(br#"","timestamp":""#);
    write_timestamp(&mut json, session.completed_at.unwrap_or(fallback_time));
    json.extend_from_slice(
        br#"","context":{"externalIds":[{"collection":"users","encoding":"none","id":""#,
    );
    json.extend_from_slice(&hash);
    json.extend_from_slice(br#"","type":"emailSha256Hash"}],"library":"#);
    json.extend_from_slice(LIBRARY_JSON.as_bytes());
    json.push(b'}');
    let shared = shared_start..json.len();
    json.extend_from_slice(br#","traits":{"#);
    if let (false, Some(plain)) = (options.hash_pii, email.plain()) {
        json.extend_from_slice(br#""email":"#);
        write_str(&mut json, plain);
        json.push(b',');
    }
    json.extend_from_slice(br#""emailSha256Hash":""#);
    json.extend_from_slice(&hash);
    json.push(b'"');
    // `,"key":value…`: unless some are shadowed, also what `questions` holds.
    let traits_start = json.len();
    write_attributes(&mut json, mapped().filter(|(k, _)| !computed(k)));
    let traits = traits_start..json.len();
    json.extend_from_slice(b"}}");
    let identify_len = json.len();
    check_size("identify", identify_len)?;

    json.push(b',');
    let track_start = json.len();
    json.extend_from_slice(br#"{"type":"track","event":"#);
    let event = track_event(session, options);
    write_str(&mut json, event);
    json.extend_from_slice(br#","messageId":""#);
    ids.write(&mut json, &session.identity, EventKind::Track(event));
    json.push(b'"');
    json.extend_from_within(shared);
    json.extend_from_slice(br#","properties":{"#);
    let mut first = true;
    let mut key = |json: &mut Vec<u8>, key: &[u8]| {
        if !std::mem::take(&mut first) {
            json.push(b',');
        }
        json.extend_from_slice(key);
    };
    // Left out, like any other missing property, when there are no answers.
    if include && session.has_attributes() {
        key(&mut json, br#""questions":{"#);
        // Without the leading comma.
        if shadowed {
            let start = json.len();
            write_attributes(&mut json, mapped());
            if json.len() > start {
                json.remove(start);
            }
        } else if !traits.is_empty() {
            json.extend_from_within(traits.start + 1..traits.end);
        }
        json.push(b'}');
    }
    for (name, value) in [
        (&br#""surveyId":"#[..], &session.campaign_id),
        (br#""surveySessionId":"#, &session.session_id),
        (br#""surveyTitle":"#, &session.campaign_name),
        (br#""trafficSource":"#, &session.traffic_source),
    ] {
        if let Some(value) = value {
            key(&mut json, name);
            write_cow(&mut json, value);
        }
    }
    json.extend_from_slice(b"}}");
    check_size("track", json.len() - track_start)?;

    Ok(Mapped::Events(SessionEvents {
        region,
        json,
        identify_len,
    }))
}

/// The Track event's name: `mapping.lead_event` for a JotUrl lead, else `track_event`.
pub fn track_event<'o>(session: &Session, options: &'o Options) -> &'o str {
    match session.shape {
        Shape::JotUrlLead | Shape::JotUrlLink => &options.lead_event,
        Shape::Canonical | Shape::Jebbit => &options.track_event,
    }
}

/// Lowercase hex SHA-256 of the normalised email: the `userId`.
pub fn email_hash(email: &Email) -> String {
    String::from_utf8(sha256_hex(email).to_vec()).expect("hex is ASCII")
}

/// Lowercase hex SHA-256 of the normalised email, or the hash it arrived as (see
/// [`Email`]: 64 hex digits where an email is expected are the hash itself).
fn sha256_hex(email: &Email) -> [u8; 64] {
    match email.prehashed_sha256() {
        Some(hash) => hash.as_bytes().try_into().expect("64 hex digits"),
        None => hex32(&Sha256::digest(email.as_str().as_bytes()).into()),
    }
}

/// The longest `segment.<region>.message_id_namespace`, in bytes (ASCII characters).
pub const NAMESPACE_MAX_LEN: usize = 32;

/// The namespace of a region whose `message_id_namespace` is not set: the first 16 hex
/// digits of SHA-256(`segment-bridge/message-id-namespace/v1` NUL write key). One-way:
/// it names the Segment source without revealing its key. A region without a write key
/// (`preview`, `run --dry-run`) gets the empty key's namespace, [`NO_KEY_NAMESPACE`].
pub fn write_key_namespace(write_key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"segment-bridge/message-id-namespace/v1\0");
    h.update(write_key.as_bytes());
    let hex = hex32(&h.finalize().into());
    String::from_utf8(hex[..16].to_vec()).expect("hex is ASCII")
}

/// [`write_key_namespace`] of the empty key: the namespace of a region without a write key.
pub const NO_KEY_NAMESPACE: &str = "180b5fa28d3a6cc4";

/// The two ways of deriving messageIds: `segment.message_id_scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageIdScheme {
    /// Before v2: `sb-<type>-<hex SHA-256 of the event type and the session identity>`,
    /// the same in every Segment source.
    V1,
    /// `sb2-<type>-<hex SHA-256 of the region's namespace, the event type, a Track's
    /// event name and the session identity>`: different in another Segment source.
    V2,
}

impl MessageIdScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageIdScheme::V1 => "v1",
            MessageIdScheme::V2 => "v2",
        }
    }
}

/// How each region's messageIds are derived, prepared once (per configuration, not per
/// event): a v2 region keeps a SHA-256 state that has already hashed a whole 64-byte
/// block naming the scheme and the namespace, so each id costs about what a v1 id cost:
/// a clone of that state, then one compression for a 20-character `session_id` and the
/// default event names (two for a 64-digit hash identity, as in v1).
///
/// The rule (docs/events.md): the same session sent to the same Segment source always
/// gets the same ids; to another source (another namespace), other ids. A Track's event
/// name is part of its identity: renamed, it is another event, and Segment must not drop
/// it as a repeat of the old one.
#[derive(Debug, Clone)]
pub struct MessageIds {
    us: RegionIds,
    eu: RegionIds,
}

/// One region's messageIds.
#[derive(Debug, Clone)]
pub struct RegionIds(Derivation);

#[derive(Debug, Clone)]
enum Derivation {
    V1,
    V2 { namespace: String, block: Sha256 },
}

/// Which of a session's two events an id is for.
#[derive(Debug, Clone, Copy)]
pub enum EventKind<'a> {
    Identify,
    /// With the Track's event name.
    Track(&'a str),
}

impl Default for MessageIds {
    /// v2, both regions in [`NO_KEY_NAMESPACE`]: what a configuration without write keys
    /// derives.
    fn default() -> Self {
        MessageIds::v2(NO_KEY_NAMESPACE, NO_KEY_NAMESPACE)
    }
}

impl MessageIds {
    /// The v1 derivation in both regions: today's ids of a deployment from before v2.
    pub fn v1() -> Self {
        MessageIds {
            us: RegionIds(Derivation::V1),
            eu: RegionIds(Derivation::V1),
        }
    }

    /// The v2 derivation with each region's namespace: at most [`NAMESPACE_MAX_LEN`]
    /// bytes (the configuration checks it).
    pub fn v2(us: &str, eu: &str) -> Self {
        MessageIds {
            us: RegionIds::v2(us),
            eu: RegionIds::v2(eu),
        }
    }

    pub fn region(&self, region: Region) -> &RegionIds {
        match region {
            Region::Us => &self.us,
            Region::Eu => &self.eu,
        }
    }
}

impl RegionIds {
    const V2_TAG: &[u8] = b"segment-bridge/message-id/v2\0";

    fn v2(namespace: &str) -> Self {
        assert!(
            namespace.len() <= NAMESPACE_MAX_LEN,
            "a messageId namespace is at most {NAMESPACE_MAX_LEN} bytes"
        );
        // The tag, the namespace's length, the namespace, zeros: one whole block.
        let mut block = [0u8; 64];
        block[..Self::V2_TAG.len()].copy_from_slice(Self::V2_TAG);
        block[Self::V2_TAG.len()] = namespace.len() as u8;
        let start = Self::V2_TAG.len() + 1;
        block[start..start + namespace.len()].copy_from_slice(namespace.as_bytes());
        let mut state = Sha256::new();
        state.update(block);
        RegionIds(Derivation::V2 {
            namespace: namespace.to_owned(),
            block: state,
        })
    }

    pub fn scheme(&self) -> MessageIdScheme {
        match self.0 {
            Derivation::V1 => MessageIdScheme::V1,
            Derivation::V2 { .. } => MessageIdScheme::V2,
        }
    }

    /// The namespace of a v2 region.
    pub fn namespace(&self) -> Option<&str> {
        match &self.0 {
            Derivation::V1 => None,
            Derivation::V2 { namespace, .. } => Some(namespace),
        }
    }

    /// The messageId of one event of the session of this identity: at most 77
    /// characters.
    pub fn message_id(&self, identity: &str, event: EventKind<'_>) -> String {
        let mut out = Vec::with_capacity(80);
        self.write(&mut out, identity, event);
        String::from_utf8(out).expect("event types are ASCII")
    }

    /// [`RegionIds::message_id`], appended to `out`.
    fn write(&self, out: &mut Vec<u8>, identity: &str, event: EventKind<'_>) {
        let kind: &[u8] = match event {
            EventKind::Identify => b"identify",
            EventKind::Track(_) => b"track",
        };
        let digest = match &self.0 {
            Derivation::V1 => {
                out.extend_from_slice(b"sb-");
                let mut h = Sha256::new();
                h.update(b"segment-bridge/v1\0");
                h.update(kind);
                h.update(b"\0");
                h.update(identity.as_bytes());
                h.finalize()
            }
            Derivation::V2 { block, .. } => {
                out.extend_from_slice(b"sb2-");
                let mut h = block.clone();
                h.update(kind);
                h.update(b"\0");
                if let EventKind::Track(name) = event {
                    // Length-prefixed: the identity that follows cannot be confused with it.
                    h.update((name.len() as u32).to_be_bytes());
                    h.update(name.as_bytes());
                }
                h.update(identity.as_bytes());
                h.finalize()
            }
        };
        out.extend_from_slice(kind);
        out.push(b'-');
        out.extend_from_slice(&hex32(&digest.into()));
    }
}

/// Lowercase hex of a SHA-256 digest.
fn hex32(bytes: &[u8; 32]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

/// RFC 3339 in UTC with milliseconds, as Segment shows it: `2021-03-12T00:00:00.000Z`.
pub fn format_timestamp(t: OffsetDateTime) -> String {
    let mut out = Vec::with_capacity(24);
    write_timestamp(&mut out, t);
    String::from_utf8(out).expect("digits and separators are ASCII")
}

/// [`format_timestamp`], appended to `out`.
fn write_timestamp(out: &mut Vec<u8>, t: OffsetDateTime) {
    let t = t.to_offset(time::UtcOffset::UTC);
    let year = t.year();
    let fields = [
        (year, 4, b'-'),
        (i32::from(u8::from(t.month())), 2, b'-'),
        (i32::from(t.day()), 2, b'T'),
        (i32::from(t.hour()), 2, b':'),
        (i32::from(t.minute()), 2, b':'),
        (i32::from(t.second()), 2, b'.'),
        (i32::from(t.millisecond()), 3, b'Z'),
    ];
    let odd_year = !(0..=9999).contains(&year);
    if odd_year {
        // Only an absurd AMQP timestamp gets here; keep `{:04}`'s rendering of it.
        out.extend_from_slice(format!("{year:04}").as_bytes());
        out.push(b'-');
    }
    for (i, (value, width, separator)) in fields.into_iter().enumerate() {
        if i == 0 && odd_year {
            continue;
        }
        let mut digits = [b'0'; 4];
        let mut v = value as u32;
        for d in digits[..width].iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out.extend_from_slice(&digits[..width]);
        out.push(separator);
    }
}

/// `context.library`: both parts are constants that need no escaping.
const LIBRARY_JSON: &str = concat!(
    r#"{"name":""#,
    "segment-bridge",
    r#"","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#""}"#
);

/// A string of the session as a JSON string. One borrowed from the message body held no
/// escape sequence there, and serde_json refuses raw control characters in strings: it
/// needs no escaping and is copied as it is.
#[allow(clippy::ptr_arg)] // Whether it is borrowed is the point.
fn write_cow(out: &mut Vec<u8>, s: &Cow<'_, str>) {
    match s {
        Cow::Borrowed(s) => {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(s) => write_str(out, s),
    }
}

/// `s` as a JSON string, escaped as serde_json escapes it.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // No early exit, so that the check vectorises.
    let plain = s.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(out, s).expect("writing to a Vec cannot fail");
    }
}

/// `,"key":value` for each attribute; the values are copied as they came.
fn write_attributes<'s>(
    out: &mut Vec<u8>,
    attributes: impl Iterator<Item = (&'s Cow<'s, str>, &'s RawValue)>,
) {
    for (k, v) in attributes {
        out.push(b',');
        write_cow(out, k);
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
    }
}

fn check_size(name: &'static str, bytes: usize) -> Result<(), MapError> {
    if bytes > MAX_EVENT_BYTES {
        return Err(MapError::TooLarge { event: name, bytes });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// The first implementation, on serde's derive: the oracle that the hand-written
    /// serialisation must equal byte for byte.
    mod reference {
        use serde::Serialize;
        use serde::ser::{SerializeMap, Serializer};
        use serde_json::value::RawValue;
        use sha2::{Digest, Sha256};
        use time::OffsetDateTime;

        use super::super::{
            EventKind, LIBRARY_NAME, LIBRARY_VERSION, MAX_EVENT_BYTES, MapError, Mapped, Options,
            SessionEvents, SkipReason,
        };
        use crate::domain::Email;
        use crate::session::Session;

        /// Maps one session. `fallback_time` is used when the session has no `completed_at`.
        pub(super) fn map(
            session: &Session,
            fallback_time: OffsetDateTime,
            options: &Options,
        ) -> Result<Mapped, MapError> {
            if session.shape == crate::session::Shape::JotUrlLink {
                return Ok(Mapped::Skipped(SkipReason::NotALead));
            }
            let Some(email) = &session.email else {
                return Ok(Mapped::Skipped(SkipReason::NoEmail));
            };
            if options.require_opt_in && !session.opt_in {
                return Ok(Mapped::Skipped(SkipReason::NoOptIn));
            }

            let hash = email_hash(email);
            let region = session.region.unwrap_or(options.default_region);
            let ids = options.message_ids.region(region);
            let event_name = super::super::track_event(session, options);
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
                plain_email: email.plain().filter(|_| !options.hash_pii),
                hash: &hash,
            };

            let identify = serialize_event(
                "identify",
                &Event {
                    kind: "identify",
                    event: None,
                    message_id: &ids.message_id(&session.identity, EventKind::Identify),
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
                    event: Some(event_name),
                    message_id: &ids.message_id(&session.identity, EventKind::Track(event_name)),
                    user_id: &hash,
                    timestamp: &timestamp,
                    context: &context,
                    traits: None,
                    properties: Some(Properties {
                        // Left out, like any other missing property, when there are no answers.
                        questions: (options.include_mapped_attributes && session.has_attributes())
                            .then_some(Questions(&attributes)),
                        survey_id: session.campaign_id.as_deref(),
                        survey_session_id: session.session_id.as_deref(),
                        survey_title: session.campaign_name.as_deref(),
                        traffic_source: session.traffic_source.as_deref(),
                    }),
                },
            )?;

            Ok(Mapped::Events(SessionEvents::new(
                region, &identify, &track,
            )))
        }

        /// Lowercase hex SHA-256 of the normalised email: the `userId`.
        fn email_hash(email: &Email) -> String {
            match email.prehashed_sha256() {
                Some(hash) => hash.to_owned(),
                None => hex::encode(Sha256::digest(email.as_str().as_bytes())),
            }
        }

        /// RFC 3339 in UTC with milliseconds, as Segment shows it: `2021-03-12T00:00:00.000Z`.
        pub(super) fn format_timestamp(t: OffsetDateTime) -> String {
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
            session: &'a Session<'a>,
            options: &'a Options,
            plain_email: Option<&'a str>,
            hash: &'a str,
        }

        impl Attributes<'_> {
            /// The mapped attributes that travel. With `hash_pii`, an attribute named `email` does
            /// not: it would carry the address in plain text.
            fn mapped(&self) -> impl Iterator<Item = (&str, &RawValue)> {
                let include = self.options.include_mapped_attributes;
                let hash_pii = self.options.hash_pii;
                self.session
                    .all_attributes()
                    .filter(move |(k, _)| include && !(hash_pii && *k == "email"))
                    .map(|(k, v)| (&**k, v))
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
                    map.serialize_entry("email", email)?;
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
    }

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
                serde_json::from_slice(e.identify()).unwrap(),
                serde_json::from_slice(e.track()).unwrap(),
                e.region,
            ),
            Mapped::Skipped(r) => panic!("skipped: {r:?}"),
        }
    }

    fn golden(name: &str) -> Value {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
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

    /// The event `ours` is comparable to Jebbit's published example in `file`, each with
    /// its own user id hash.
    fn assert_like_golden(ours: Value, file: &str) {
        let want = golden(file);
        let want_hash = want["userId"].as_str().unwrap().to_owned();
        assert_eq!(comparable(ours, JANE), comparable(want, &want_hash));
    }

    #[test]
    fn the_identify_has_the_keys_nesting_and_values_of_jebbits_published_example() {
        let (identify, _, _) = events(SESSION, &Options::default());
        assert_like_golden(identify, "jebbit-segment-identify.json");
    }

    #[test]
    fn the_track_has_the_keys_nesting_and_values_of_jebbits_published_example() {
        let (_, track, _) = events(SESSION, &Options::default());
        assert_like_golden(track, "jebbit-segment-track.json");
    }

    /// A JotUrl lead's events, mapped as the worker maps a message the intake queued for a
    /// source of region eu, with the golden file's AMQP timestamp.
    fn joturl_events(name: &str, options: &Options) -> (Value, Value, Region, Value) {
        let want = golden(&format!("{name}.events.json"));
        let body = std::fs::read(format!(
            "{}/tests/fixtures/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let hints = crate::session::Hints {
            kind: Some("joturl"),
            region: Some(want["region"].as_str().unwrap()),
        };
        let session = Session::parse_with(&body, hints).unwrap();
        let amqp_timestamp = OffsetDateTime::parse(
            want["amqp_timestamp"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        match map(&session, amqp_timestamp, options).unwrap() {
            Mapped::Events(e) => (
                serde_json::from_slice(e.identify()).unwrap(),
                serde_json::from_slice(e.track()).unwrap(),
                e.region,
                want,
            ),
            Mapped::Skipped(r) => panic!("skipped: {r:?}"),
        }
    }

    #[test]
    fn joturl_leads_map_to_the_golden_identify_and_lead_captured_track() {
        // The golden ids were computed (with Python) by the v1 derivation.
        let v1 = Options {
            message_ids: MessageIds::v1(),
            ..Options::default()
        };
        for name in ["joturl-form-lead", "joturl-social-optin-lead"] {
            let (identify, track, region, mut want) = joturl_events(name, &v1);
            for event in ["identify", "track"] {
                want[event]["context"]["library"]["version"] = json!(LIBRARY_VERSION);
            }
            assert_eq!(identify, want["identify"], "{name}");
            assert_eq!(track, want["track"], "{name}");
            assert_eq!(region, Region::Eu);
        }
    }

    #[test]
    fn lead_event_names_a_joturl_leads_track_and_track_event_does_not() {
        let options = Options {
            track_event: "Quiz Done".into(),
            lead_event: "CTA Lead".into(),
            ..Options::default()
        };
        let (_, track, _, _) = joturl_events("joturl-form-lead", &options);
        assert_eq!(track["event"], "CTA Lead");
        assert_eq!(events(SESSION, &options).1["event"], "Quiz Done");
    }

    #[test]
    fn a_joturl_tracking_link_is_skipped_as_not_a_lead() {
        let body = include_bytes!("../tests/fixtures/joturl-tracking-link.json");
        let session = Session::parse(body).unwrap();
        for options in [
            Options::default(),
            Options {
                require_opt_in: true,
                ..Options::default()
            },
        ] {
            assert!(matches!(
                map(&session, now(), &options),
                Ok(Mapped::Skipped(SkipReason::NotALead))
            ));
        }
        assert_eq!(SkipReason::NotALead.as_str(), "skipped_not_a_lead");
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

    /// The Identify's and the Track's messageId of `body` under the configuration that
    /// these environment variables make (as a fresh start of the worker would).
    fn ids_under(body: &str, env: &[(&str, &str)]) -> [String; 2] {
        ids(body, &config(env).mapping_options())
    }

    fn config(env: &[(&str, &str)]) -> crate::config::Config {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        crate::config::Config::load(None, Some(env.collect())).unwrap()
    }

    fn ids(body: &str, options: &Options) -> [String; 2] {
        let (identify, track, _) = events(body, options);
        [identify, track].map(|e| e["messageId"].as_str().unwrap().to_owned())
    }

    const EU_KEY: &str = "SEGMENT_BRIDGE__SEGMENT__EU__WRITE_KEY";
    const US_KEY: &str = "SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY";

    #[test]
    fn the_same_session_to_two_segment_sources_gets_four_distinct_ids() {
        let staging = ids_under(SESSION, &[(EU_KEY, "eu-staging-Jz8rQ2vX")]);
        let production = ids_under(SESSION, &[(EU_KEY, "eu-production-Wq4")]);
        let all: std::collections::HashSet<_> = staging.iter().chain(&production).collect();
        assert_eq!(all.len(), 4, "{staging:?} {production:?}");
        // The session's own region decides: the US key does not change EU ids.
        let other_us = ids_under(
            SESSION,
            &[(EU_KEY, "eu-staging-Jz8rQ2vX"), (US_KEY, "us-other")],
        );
        assert_eq!(other_us, staging);
        let us_session = SESSION.replace(r#""region": "eu""#, r#""region": "us""#);
        let as_us = ids_under(&us_session, &[(US_KEY, "eu-staging-Jz8rQ2vX")]);
        assert_eq!(
            as_us, staging,
            "the namespace is the key's, whatever its region"
        );
    }

    #[test]
    fn the_same_configuration_gives_the_same_ids_each_time_and_after_a_restart() {
        let env = [(EU_KEY, "eu-key-Jz8rQ2vX")];
        let config = config(&env);
        let options = config.mapping_options();
        let once = ids(SESSION, &options);
        assert_eq!(ids(SESSION, &options), once);
        let restarted = ids_under(SESSION, &env);
        assert_eq!(restarted, once);
        // Pinned (computed with Python's hashlib from the rule in docs/events.md): a
        // release that changes them re-sends as new what is redelivered across it.
        assert_eq!(
            restarted,
            [
                "sb2-identify-e5a029f27f4c45532e3a86d1456da961b452301526a116a8bb38add7eb9ab097",
                "sb2-track-336fe142218ed15de24df091e735f95252264cabb771fa9db95735ac7f45e88c",
            ]
        );
        assert_eq!(config.message_id_namespace(Region::Eu), "639beb88a28f816a");
    }

    #[test]
    fn an_explicit_namespace_names_the_source_whatever_its_write_key() {
        let ns = "SEGMENT_BRIDGE__SEGMENT__EU__MESSAGE_ID_NAMESPACE";
        let before = ids_under(SESSION, &[(EU_KEY, "old-key-123456"), (ns, "prod-eu")]);
        let rotated = ids_under(SESSION, &[(EU_KEY, "new-key-654321"), (ns, "prod-eu")]);
        assert_eq!(before, rotated);
        let staging = ids_under(SESSION, &[(EU_KEY, "old-key-123456"), (ns, "staging-eu")]);
        assert_ne!(before[0], staging[0]);
        assert_ne!(before[1], staging[1]);
    }

    #[test]
    fn scheme_v1_reproduces_the_ids_of_earlier_versions_in_every_source() {
        let v1 = "SEGMENT_BRIDGE__SEGMENT__MESSAGE_ID_SCHEME";
        // What the bridge sent for SESSION before v2, from its `preview` (main at 4f259c8).
        let want = [
            "sb-identify-a2b301b4bcd430bc40652a1cd519dcf23a108e7582a24bf81af76e18c6aea769",
            "sb-track-ccd11985a73864a5c2ccc0517a3fc8e3581c56cca4b1bf3ace2c078e29eaad2f",
        ];
        assert_eq!(ids_under(SESSION, &[(v1, "v1")]), want);
        assert_eq!(
            ids_under(SESSION, &[(v1, "v1"), (EU_KEY, "any-key-42")]),
            want
        );
        let renamed = [
            (v1, "v1"),
            ("SEGMENT_BRIDGE__MAPPING__TRACK_EVENT", "Quiz Done"),
        ];
        assert_eq!(ids_under(SESSION, &renamed), want);
        assert_ne!(ids_under(SESSION, &[])[0], want[0], "v2 is the default");
    }

    #[test]
    fn a_renamed_track_event_gets_a_new_track_id_and_keeps_the_identify_id() {
        let before = ids_under(SESSION, &[(EU_KEY, "k-12345678")]);
        let renamed = ids_under(
            SESSION,
            &[
                (EU_KEY, "k-12345678"),
                ("SEGMENT_BRIDGE__MAPPING__TRACK_EVENT", "Quiz Done"),
            ],
        );
        assert_eq!(before[0], renamed[0]);
        assert_ne!(before[1], renamed[1]);
    }

    #[test]
    fn an_id_never_holds_the_write_key_and_is_at_most_100_characters() {
        let long_key = "wk_live_".to_owned() + &"Ab9".repeat(40);
        let webhook = r#"{"data":{"email":"a@b.c","opt_in":"true"}}"#;
        for key in [
            "abcdef0123456789",
            "0123456789abcdef0123456789abcdef",
            &long_key,
        ] {
            for body in [SESSION, webhook] {
                for region in Region::ALL {
                    let upper = region.as_str().to_uppercase();
                    let ids = ids_under(
                        &body.replace(r#""region": "eu""#, &format!(r#""region": "{region}""#)),
                        &[(&format!("SEGMENT_BRIDGE__SEGMENT__{upper}__WRITE_KEY"), key)],
                    );
                    for id in ids {
                        assert!(id.len() <= 100, "{id}");
                        for window in key.as_bytes().windows(8) {
                            let window = std::str::from_utf8(window).unwrap();
                            assert!(!id.contains(window), "{id} holds {window:?} of the key");
                        }
                    }
                }
            }
            assert!(!write_key_namespace(key).contains(&key[..8]));
        }
        assert_eq!(write_key_namespace(""), NO_KEY_NAMESPACE);
        assert_eq!(
            Options::default()
                .message_ids
                .region(Region::Us)
                .namespace(),
            Some(NO_KEY_NAMESPACE)
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
        let body = include_str!("../tests/fixtures/jebbit-webhook-test-submission.json");
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
    fn a_pre_hashed_email_is_the_user_id_itself_and_no_plain_email_travels() {
        // A Jebbit webhook of an integration with `hash_pii`: `data.email` is the hash.
        let upper = JANE.to_uppercase();
        let body =
            format!(r#"{{"session_id":"s","data":{{"email":" {upper} ","q":1}},"event":{{}}}}"#);
        for hash_pii in [false, true] {
            let options = Options {
                hash_pii,
                ..Options::default()
            };
            let (identify, track, _) = events(&body, &options);
            assert_eq!(identify["userId"], JANE);
            assert_eq!(track["userId"], JANE);
            assert_eq!(identify["traits"]["emailSha256Hash"], JANE);
            assert_eq!(identify["context"]["externalIds"][0]["id"], JANE);
            assert!(identify["traits"].get("email").is_none(), "{identify}");
            assert_eq!(identify["traits"]["q"], 1);
        }
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
            let body = body(n);
            let s = Session::parse(body.as_bytes()).unwrap();
            match map(&s, now(), &Options::default()) {
                Ok(Mapped::Events(e)) => Ok(e.identify().len().max(e.track().len())),
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

    /// Sessions of many shapes: escapes in keys and values, odd whitespace, both input
    /// shapes, attributes named like computed traits, missing fields.
    fn varied_bodies() -> Vec<String> {
        let mut bodies = vec![SESSION.to_owned()];
        let values = [
            r#""plain""#,
            r#""quote \" and \\ backslash""#,
            r#""tab\tnew\nline \u0001 \u00e9 é ✓""#,
            r#"[ "option 1" , "option 4" ]"#,
            r#"{"nested": [1, 2.5, -3e2, null, true]}"#,
            "42",
            "false",
            "null",
        ];
        let keys = [
            "q1",
            "email",
            "emailSha256Hash",
            "k\\\"ey",
            "tab\\tkey",
            "ünï",
            "surveyId",
            "",
        ];
        for i in 0..(values.len() * keys.len()) {
            let mut attrs = Vec::new();
            for j in 0..(i % 6) {
                let k = keys[(i + j) % keys.len()];
                let v = values[(i * 3 + j) % values.len()];
                attrs.push(format!(r#""{k}{j}":{v}"#));
                if j == 2 {
                    attrs.push(format!(r#""{k}":{v}"#));
                }
            }
            let attrs = attrs.join(",");
            let email = [
                "  Jane.Doe@Example.com ",
                "A\\\"b@c.d",
                "ÉLODIE@Exämple.COM",
            ][i % 3];
            let optional = [
                r#""campaign_id":"c\"1","campaign_name":"Q\\uiz","traffic_source":"Owned+Web","#,
                r#""campaign_name":"only a title","#,
                "",
            ][i % 3];
            let completed = [
                r#""completed_at":"2021-03-12T01:00:00.5+01:00","#,
                r#""completed_at":"1999-12-31T23:59:59.999Z","#,
                "",
            ][(i / 3) % 3];
            bodies.push(if i % 5 == 4 {
                // A JotUrl lead: custom parameters at the top level, extended_info inside.
                format!(
                    r#"{{"data":"{email}","type":"email","date":"2020-03-26","name":"n{i}","extended_info":"{{\"k\":[1,\"\u00e9\"]}}"{}{attrs}}}"#,
                    if attrs.is_empty() { "" } else { "," }
                )
            } else if i % 4 == 3 {
                format!(
                    r#"{{{optional}{completed}"data":{{"email":"{email}","opt_in":"true"{}{attrs}}}}}"#,
                    if attrs.is_empty() { "" } else { "," }
                )
            } else {
                format!(
                    r#"{{"session_id":"s-{i}\u00e9",{optional}{completed}"email":"{email}","attributes":{{{attrs}}}}}"#
                )
            });
        }
        bodies
    }

    #[test]
    fn the_events_equal_serdes_serialisation_byte_for_byte() {
        let mut compared = 0;
        for body in varied_bodies() {
            let session = Session::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
            for hash_pii in [false, true] {
                for include_mapped_attributes in [true, false] {
                    for track_event in ["Survey Completed", "Quiz \"Done\"\n"] {
                        let options = Options {
                            hash_pii,
                            include_mapped_attributes,
                            track_event: track_event.into(),
                            ..Options::default()
                        };
                        let got = map(&session, now(), &options).unwrap();
                        let want = reference::map(&session, now(), &options).unwrap();
                        let (got, want) = match (got, want) {
                            (Mapped::Events(got), Mapped::Events(want)) => (got, want),
                            (Mapped::Skipped(got), Mapped::Skipped(want)) => {
                                assert_eq!(got, want, "{body}");
                                continue;
                            }
                            _ => panic!("{body}: skipped by one only"),
                        };
                        assert_eq!(
                            String::from_utf8_lossy(got.identify()),
                            String::from_utf8_lossy(want.identify()),
                            "{body}"
                        );
                        assert_eq!(
                            String::from_utf8_lossy(got.track()),
                            String::from_utf8_lossy(want.track()),
                            "{body}"
                        );
                        assert_eq!(got, want);
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 400, "{compared}");
    }

    #[test]
    fn timestamps_match_the_reference_rendering_even_for_odd_years() {
        for t in [
            time::macros::datetime!(2021-03-12 01:00:00.5 +01:00),
            time::macros::datetime!(0000-01-01 00:00:00 UTC),
            time::macros::datetime!(9999-12-31 23:59:59.999 UTC),
            time::macros::datetime!(-0005-06-07 08:09:10.011 UTC),
            OffsetDateTime::from_unix_timestamp(-62_000_000_000).unwrap(),
        ] {
            assert_eq!(format_timestamp(t), reference::format_timestamp(t), "{t}");
        }
    }
}
