//! The AMQP headers the intake writes on each message and the worker reads back: which
//! source sent the body, in which shape, for which region.

use lapin::BasicProperties;
use lapin::types::AMQPValue;

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
}
