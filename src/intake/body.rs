//! Which messages a webhook body becomes: a JSON object is one message, the body itself,
//! byte for byte; an array of objects is one message per element, each element's bytes as
//! they stood in the body. Anything else is refused (400). The intake judges only this
//! shape; whether a message is a valid session is the worker's judgement.

use std::ops::Range;

use serde::de::IgnoredAny;
use serde_json::value::RawValue;

/// Why a body is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the body is not UTF-8")]
    NotUtf8,
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the body is {0}, not a JSON object or an array of objects")]
    NotAnObject(&'static str),
    #[error("the body is an empty array: no session in it")]
    EmptyArray,
    #[error("element {index} of the array is {found}, not a JSON object")]
    ElementNotAnObject { index: usize, found: &'static str },
}

/// The byte ranges of `body` to queue, one per message.
pub fn split(body: &[u8]) -> Result<Vec<Range<usize>>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    let not_json = |e: serde_json::Error| BodyError::NotJson(e.to_string());
    match text.trim_start().as_bytes().first() {
        Some(b'{') => {
            serde_json::from_str::<IgnoredAny>(text).map_err(not_json)?;
            #[allow(clippy::single_range_in_vec_init)] // One message: the whole body.
            Ok(vec![0..body.len()])
        }
        Some(b'[') => {
            let elements: Vec<&RawValue> = serde_json::from_str(text).map_err(not_json)?;
            if elements.is_empty() {
                return Err(BodyError::EmptyArray);
            }
            elements
                .iter()
                .enumerate()
                .map(|(index, element)| {
                    let raw = element.get();
                    if !raw.starts_with('{') {
                        return Err(BodyError::ElementNotAnObject {
                            index,
                            found: kind(raw),
                        });
                    }
                    // Where the element's text stands in the body.
                    let start = raw.as_ptr() as usize - text.as_ptr() as usize;
                    Ok(start..start + raw.len())
                })
                .collect()
        }
        _ => {
            let value: &RawValue = serde_json::from_str(text).map_err(not_json)?;
            Err(BodyError::NotAnObject(kind(value.get())))
        }
    }
}

/// What kind of JSON value `raw` is, for error messages.
fn kind(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(body: &str) -> Result<Vec<&str>, BodyError> {
        Ok(split(body.as_bytes())?
            .into_iter()
            .map(|r| &body[r])
            .collect())
    }

    #[test]
    fn an_object_is_one_message_the_body_byte_for_byte() {
        let body = " \n{\"data\": {\"email\": \"a@b.c\"} }\n";
        assert_eq!(parts(body).unwrap(), [body]);
    }

    #[test]
    fn an_array_is_one_message_per_element_each_as_it_stood() {
        let body = "[ {\"a\": 1} ,\n{\"b\":[1, 2]},{}]";
        assert_eq!(parts(body).unwrap(), ["{\"a\": 1}", "{\"b\":[1, 2]}", "{}"]);
        let escaped = r#"[{"s":"\u00e9\"]"}]"#;
        assert_eq!(parts(escaped).unwrap(), [r#"{"s":"\u00e9\"]"}"#]);
    }

    #[test]
    fn anything_but_an_object_or_an_array_of_objects_is_refused() {
        for (body, want) in [
            ("", BodyError::NotJson(String::new())),
            ("not json", BodyError::NotJson(String::new())),
            ("{\"a\":1", BodyError::NotJson(String::new())),
            ("{\"a\":1} {}", BodyError::NotJson(String::new())),
            ("[{}", BodyError::NotJson(String::new())),
            ("\"s\"", BodyError::NotAnObject("a string")),
            ("42", BodyError::NotAnObject("a number")),
            ("null", BodyError::NotAnObject("null")),
            ("[]", BodyError::EmptyArray),
            (
                "[{}, 7]",
                BodyError::ElementNotAnObject {
                    index: 1,
                    found: "a number",
                },
            ),
            (
                "[[{}]]",
                BodyError::ElementNotAnObject {
                    index: 0,
                    found: "an array",
                },
            ),
        ] {
            let got = parts(body).unwrap_err();
            match (&got, &want) {
                (BodyError::NotJson(_), BodyError::NotJson(_)) => {}
                _ => assert_eq!(got, want, "{body:?}"),
            }
        }
        assert_eq!(split(b"{\"a\":\"\xff\"}"), Err(BodyError::NotUtf8));
    }

    #[test]
    fn deep_nesting_costs_no_stack() {
        // Valid JSON, however deep, is one message (serde_json skips it without recursing).
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(split(deep.as_bytes()).unwrap(), vec![0..deep.len()]);
        let deep = format!("[{}]", "[".repeat(100_000));
        assert!(matches!(split(deep.as_bytes()), Err(BodyError::NotJson(_))));
        let deep = format!("[{{\"a\":{}{}}}]", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(split(deep.as_bytes()).unwrap().len(), 1);
    }
}
