//! The AMQP headers: the ones the intake writes on each message and the worker reads back
//! (which source sent the body, in which shape, for which region), the dead-letter reason,
//! and a quorum queue's delivery count; and the properties of a message's copies.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::session::Hints;

/// The name of the intake source that received the body.
pub const SOURCE: &str = "x-segment-bridge-source";
/// The source's kind, `jebbit` or `joturl`: the body's shape.
pub const KIND: &str = "x-segment-bridge-kind";
/// The source's region, when it has one: the region of a body that names none.
pub const REGION: &str = "x-segment-bridge-region";

/// The shape and region hints of a message. Headers that are absent, not strings or not
/// UTF-8 give no hint: the body's keys decide.
pub fn hints(properties: &BasicProperties) -> Hints<'_> {
    let Some(headers) = properties.headers() else {
        return Hints::default();
    };
    let text = |name: &str| match headers.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    };
    Hints {
        kind: text(KIND),
        region: text(REGION),
    }
}

/// The header that carries why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-segment-bridge-error";
/// The header in which quorum queues count a message's earlier deliveries.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// The message's properties with the reason for dead-lettering added as a header.
pub fn with_error_header(properties: BasicProperties, reason: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason.as_bytes().to_vec())),
    );
    properties.with_headers(headers)
}

/// The message's properties without the dead-letter reason, as before it was dead-lettered:
/// a message that had no headers gets none back.
pub fn without_error_header(properties: BasicProperties) -> BasicProperties {
    without_header(properties, ERROR_HEADER)
}

/// The properties of a copy (handed back, dead-lettered or replayed): the message's own,
/// unchanged, without the count of deliveries a quorum queue added to this delivery (the
/// copy is a new message).
pub fn for_copy(properties: BasicProperties) -> BasicProperties {
    without_header(properties, DELIVERY_COUNT_HEADER)
}

/// How many times the broker delivered this message before (a quorum queue's
/// `x-delivery-count`), if it says.
pub fn delivery_count(properties: &BasicProperties) -> Option<u64> {
    match properties
        .headers()
        .as_ref()?
        .inner()
        .get(DELIVERY_COUNT_HEADER)?
    {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

/// The properties without the header `name`; without any header table if it was the only one.
fn without_header(properties: BasicProperties, name: &str) -> BasicProperties {
    let Some(headers) = properties.headers() else {
        return properties;
    };
    if !headers.contains_key(name) {
        return properties;
    }
    let rest: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != name)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !rest.is_empty() {
        return properties.with_headers(FieldTable::from(rest));
    }
    // The properties type can set a header table but not unset it: copy the rest over.
    let p = &properties;
    let mut out = BasicProperties::default();
    macro_rules! copy {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(v) = p.$get().clone() { out = out.$set(v); })*
        };
    }
    copy!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        expiration => with_expiration,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    out
}

/// The reason header of a dead-lettered message, if any.
pub fn error_header(properties: &BasicProperties) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(ERROR_HEADER)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldTable, LongString};

    #[test]
    fn the_intakes_headers_become_hints_and_anything_else_gives_none() {
        let mut headers = FieldTable::default();
        headers.insert(
            KIND.into(),
            AMQPValue::LongString(LongString::from("joturl")),
        );
        headers.insert(REGION.into(), AMQPValue::ShortString("eu".into()));
        headers.insert(SOURCE.into(), AMQPValue::LongString("cta_1".into()));
        let p = BasicProperties::default().with_headers(headers);
        assert_eq!(
            hints(&p),
            Hints {
                kind: Some("joturl"),
                region: Some("eu")
            }
        );
        assert_eq!(hints(&BasicProperties::default()), Hints::default());
        let mut odd = FieldTable::default();
        odd.insert(KIND.into(), AMQPValue::LongLongInt(7));
        odd.insert(
            REGION.into(),
            AMQPValue::LongString(vec![0xff, 0xfe].into()),
        );
        let p = BasicProperties::default().with_headers(odd);
        assert_eq!(hints(&p), Hints::default());
    }

    #[test]
    fn the_error_header_is_added_beside_existing_headers_and_removed_again() {
        let mut headers = FieldTable::default();
        headers.insert("trace".into(), AMQPValue::LongString("t-1".into()));
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_delivery_mode(2)
            .with_headers(headers);

        let dead = with_error_header(original.clone(), "`email` is not an email address");
        assert_eq!(
            error_header(&dead).as_deref(),
            Some("`email` is not an email address")
        );
        assert!(dead.headers().as_ref().unwrap().contains_key("trace"));
        assert_eq!(dead.message_id(), original.message_id());

        assert_eq!(without_error_header(dead), original);
    }

    #[test]
    fn a_hand_back_copy_keeps_every_property_and_header_but_the_delivery_count() {
        let mut headers = FieldTable::default();
        headers.insert("trace".into(), AMQPValue::LongString("t-1".into()));
        let published = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_delivery_mode(2)
            .with_timestamp(1_615_507_200)
            .with_headers(headers.clone());
        headers.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(4));
        let delivered = published.clone().with_headers(headers);
        assert_eq!(delivery_count(&delivered), Some(4));
        assert_eq!(for_copy(delivered), published);
        assert_eq!(delivery_count(&published), None);

        // A quorum queue adds the header to a message published without any.
        let bare = BasicProperties::default().with_delivery_mode(2);
        let mut only_count = FieldTable::default();
        only_count.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongUInt(0));
        assert_eq!(for_copy(bare.clone().with_headers(only_count)), bare);
        assert_eq!(for_copy(bare.clone()), bare);
    }

    #[test]
    fn delivery_counts_are_read_from_any_integer_type_and_nothing_else() {
        let with = |v: AMQPValue| {
            let mut h = FieldTable::default();
            h.insert(DELIVERY_COUNT_HEADER.into(), v);
            delivery_count(&BasicProperties::default().with_headers(h))
        };
        assert_eq!(with(AMQPValue::LongLongInt(7)), Some(7));
        assert_eq!(with(AMQPValue::LongInt(7)), Some(7));
        assert_eq!(with(AMQPValue::ShortUInt(7)), Some(7));
        assert_eq!(with(AMQPValue::ShortShortInt(7)), Some(7));
        assert_eq!(with(AMQPValue::LongLongInt(-1)), None);
        assert_eq!(with(AMQPValue::LongString("7".into())), None);
    }

    #[test]
    fn properties_without_headers_stay_without_the_error_header() {
        let p = BasicProperties::default().with_delivery_mode(2);
        assert_eq!(error_header(&p), None);
        assert_eq!(without_error_header(with_error_header(p.clone(), "x")), p);
        let p = p
            .with_content_type("application/json".into())
            .with_timestamp(1_615_507_200)
            .with_app_id("upstream".into());
        assert_eq!(without_error_header(with_error_header(p.clone(), "x")), p);
    }
}
