//! The wire types: what serde reads from a body before any rule is checked.
//!
//! Written by hand rather than derived where serde's derive cannot do what the hot path
//! needs: keep a wrong type as a value (so that the error names the field instead of
//! quoting serde), borrow keys and strings from the body unless they hold escapes, keep
//! the attributes in order with duplicates resolved, and split a Jebbit `data` object or a
//! JotUrl lead's top-level keys into the known fields and the attributes in one pass.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{Attribute, dedupe};

#[derive(Deserialize)]
pub(super) struct Wire<'a> {
    /// `null` stays `Some(Loose::Null)` here: a present `session_id` must be a string.
    #[serde(default, borrow, deserialize_with = "present")]
    pub(super) session_id: Option<Loose<'a>>,
    #[serde(borrow)]
    pub(super) campaign_id: Option<Loose<'a>>,
    #[serde(borrow)]
    pub(super) campaign_name: Option<Loose<'a>>,
    #[serde(borrow)]
    pub(super) traffic_source: Option<Loose<'a>>,
    #[serde(borrow)]
    pub(super) completed_at: Option<Loose<'a>>,
    #[serde(borrow)]
    pub(super) region: Option<Loose<'a>>,
    #[serde(borrow)]
    pub(super) email: Option<Loose<'a>>,
    #[serde(borrow)]
    pub(super) opt_in: Option<Loose<'a>>,
    #[serde(borrow)]
    pub(super) attributes: Option<Object<Attributes<'a>>>,
    #[serde(borrow)]
    pub(super) data: Option<Object<Data<'a>>>,
}

fn present<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Loose<'a>>, D::Error> {
    Loose::deserialize(d).map(Some)
}

/// Any JSON value, keeping strings and booleans and only the kind of anything else, so
/// that a wrong type becomes an error naming the field instead of a serde message.
/// Strings are borrowed from the body unless they hold escapes.
pub(super) enum Loose<'a> {
    Null,
    Bool(bool),
    Str(Cow<'a, str>),
    Other(&'static str),
}

impl Loose<'_> {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Loose::Null => "null",
            Loose::Bool(_) => "a boolean",
            Loose::Str(_) => "a string",
            Loose::Other(kind) => kind,
        }
    }
}

pub(super) struct LooseVisitor<'a>(PhantomData<&'a ()>);

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
pub(super) enum Object<T> {
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
pub(super) struct Attributes<'a>(pub(super) Vec<Attribute<'a>>);

/// A key, borrowed from the body unless it holds escapes.
pub(super) struct Key<'a>(Cow<'a, str>);

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
pub(super) struct Data<'a> {
    pub(super) email: Option<Loose<'a>>,
    pub(super) opt_in: Option<Loose<'a>>,
    pub(super) attributes: Vec<Attribute<'a>>,
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
                        _ => data
                            .attributes
                            .push((key, map.next_value::<&'a RawValue>()?)),
                    }
                }
                dedupe(&mut data.attributes);
                Ok(data)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// A JotUrl message's top-level keys: `data`, `type` and `date` taken out, every other key
/// an attribute, `extended_info` opened when it holds a JSON object.
pub(super) struct JotUrlWire<'a> {
    pub(super) data: Option<Loose<'a>>,
    pub(super) kind: Option<Loose<'a>>,
    pub(super) date: Option<Loose<'a>>,
    /// A `short_url` or `long_url` was seen.
    pub(super) link: bool,
    /// Borrowed from the body, but for the keys of an `extended_info` string.
    pub(super) attributes: Vec<(Cow<'a, str>, Cow<'a, RawValue>)>,
}

impl<'de: 'a, 'a> Deserialize<'de> for JotUrlWire<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = JotUrlWire<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JotUrlWire<'a>, A::Error> {
                let mut wire = JotUrlWire {
                    data: None,
                    kind: None,
                    date: None,
                    link: false,
                    attributes: Vec::with_capacity(map.size_hint().unwrap_or(8)),
                };
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    let slot = match &*key {
                        "data" => &mut wire.data,
                        "type" => &mut wire.kind,
                        "date" => &mut wire.date,
                        "extended_info" => {
                            let raw: &'a RawValue = map.next_value()?;
                            extended_info(raw, &mut wire.attributes);
                            continue;
                        }
                        other => {
                            wire.link |= other == "short_url" || other == "long_url";
                            let value: &'a RawValue = map.next_value()?;
                            wire.attributes.push((key, Cow::Borrowed(value)));
                            continue;
                        }
                    };
                    if slot.is_some() {
                        return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                    *slot = Some(map.next_value()?);
                }
                Ok(wire)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// `extended_info`'s keys as attributes when it is a JSON object, or a string holding one
/// (as JotUrl sends it); anything else stays as it came, under `extended_info`.
fn extended_info<'a>(raw: &'a RawValue, attributes: &mut Vec<(Cow<'a, str>, Cow<'a, RawValue>)>) {
    let text = raw.get();
    if text.starts_with('{')
        && let Ok(Attributes(inner)) = serde_json::from_str::<Attributes<'a>>(text)
    {
        attributes.extend(inner.into_iter().map(|(k, v)| (k, Cow::Borrowed(v))));
        return;
    }
    if text.starts_with('"')
        && let Ok(inner) = serde_json::from_str::<String>(text)
            .map_err(drop)
            .and_then(|s| serde_json::from_str::<OwnedObject>(&s).map_err(drop))
    {
        attributes.extend(
            inner
                .0
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v))),
        );
        return;
    }
    attributes.push((Cow::Borrowed("extended_info"), Cow::Borrowed(raw)));
}

/// A JSON object read from a text that does not outlive it, in order.
pub(super) struct OwnedObject(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for OwnedObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OwnedObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OwnedObject, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    entries.push(entry);
                }
                Ok(OwnedObject(entries))
            }
        }
        d.deserialize_map(V)
    }
}
