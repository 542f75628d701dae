//! serde_json (what `session.rs` uses) against sonic-rs and simd-json, on the benchmark's
//! sessions (`segment_bridge_testkit::sessions`), one core.
//!
//! `cargo bench --bench json` (criterion; "elem/s" is sessions/s). Under
//! `cargo test --benches` each case runs once, as a smoke test.
//!
//! Only the JSON reading depends on the crate: the mapping (`events::map`) writes the
//! events itself from what the reading extracted, the attribute values copied as they
//! came. So each crate reads every body into the same [`Extract`] (the session's
//! strings, and each attribute's key and raw JSON text), and before anything is timed the
//! extracts must equal serde_json's byte for byte, which makes the events equal byte for
//! byte. For sonic-rs the extract is also turned into a [`Session`] and mapped, and the
//! events are compared with serde_json's.
//!
//! The cases:
//! - `serde_json/session_parse`: `Session::parse`, the worker's parser (it also validates:
//!   email, time, region).
//! - `serde_json/extract`, `sonic_rs/extract`, `simd_json/extract`: reading into an
//!   [`Extract`] with each crate's borrowing API, no validation.
//! - `serde_json/parse+map`, `sonic_rs/parse+map`: the pure path with each reader.
//!
//! simd-json has no raw-value passthrough: its attribute values are re-serialised from its
//! DOM, which equals the input only when the input is compact and has no escapes (true of
//! these sessions, not of every producer's), and it parses in place, so the body is copied
//! first (the original must stay intact for dead-lettering).

use std::borrow::Cow;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use segment_bridge::domain::{Email, Region};
use segment_bridge::events::{self, Mapped, Options};
use segment_bridge::session::{Session, Shape};
use segment_bridge_testkit::sessions::{self, map_each, parse_each};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const N: u64 = 2_000;

/// What the mapping needs from a body, before validation.
#[derive(Debug, Default, PartialEq, Eq)]
struct Extract<'a> {
    session_id: Option<Cow<'a, str>>,
    campaign_id: Option<Cow<'a, str>>,
    campaign_name: Option<Cow<'a, str>>,
    traffic_source: Option<Cow<'a, str>>,
    completed_at: Option<Cow<'a, str>>,
    region: Option<Cow<'a, str>>,
    email: Option<Cow<'a, str>>,
    opt_in: bool,
    /// `attributes`, then the attribute keys of `data` (the bench sessions repeat none).
    attributes: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl Extract<'_> {
    fn owned(&self) -> Extract<'static> {
        let o = |s: &Option<Cow<str>>| s.as_ref().map(|s| Cow::Owned(s.to_string()));
        Extract {
            session_id: o(&self.session_id),
            campaign_id: o(&self.campaign_id),
            campaign_name: o(&self.campaign_name),
            traffic_source: o(&self.traffic_source),
            completed_at: o(&self.completed_at),
            region: o(&self.region),
            email: o(&self.email),
            opt_in: self.opt_in,
            attributes: self
                .attributes
                .iter()
                .map(|(k, v)| (Cow::Owned(k.to_string()), Cow::Owned(v.to_string())))
                .collect(),
        }
    }
}

/// serde_json, from the worker's own parse.
fn serde_extract(body: &[u8]) -> Extract<'_> {
    let s = Session::parse(body).expect("a valid session");
    // `Session` has already normalised the email and read the time; for the comparison,
    // the raw strings are read again.
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        email: Option<Cow<'a, str>>,
        #[serde(borrow)]
        completed_at: Option<Cow<'a, str>>,
        #[serde(borrow)]
        region: Option<Cow<'a, str>>,
        #[serde(borrow)]
        data: Option<RawData<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct RawData<'a> {
        #[serde(borrow)]
        email: Option<Cow<'a, str>>,
    }
    let raw: Raw = serde_json::from_slice(body).expect("valid");
    Extract {
        session_id: s.session_id,
        campaign_id: s.campaign_id,
        campaign_name: s.campaign_name,
        traffic_source: s.traffic_source,
        completed_at: raw.completed_at,
        region: raw.region,
        email: raw.data.and_then(|d| d.email).or(raw.email),
        opt_in: s.opt_in,
        attributes: s
            .attributes
            .into_iter()
            .map(|(k, v)| (k, Cow::Borrowed(v.get())))
            .collect(),
    }
}

fn opt_in_of(raw: &str) -> bool {
    raw == "true" || raw.eq_ignore_ascii_case("\"true\"")
}

/// `s` borrowed from `text` when it lies inside it (sonic-rs hands out slices of its input
/// through its values' lifetimes), else copied (a string that held escapes).
fn within<'a>(text: &'a str, s: &str) -> Cow<'a, str> {
    let start = (s.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
    match text.get(start..start.wrapping_add(s.len())) {
        Some(inside) if inside.as_ptr() == s.as_ptr() => Cow::Borrowed(inside),
        _ => Cow::Owned(s.to_owned()),
    }
}

/// serde_json without validation: `Session::parse`'s reading, which is what the other
/// crates' extracts replace (the email's normalisation and the time's parsing are the
/// same code whatever the reader, and are left out of every extract).
fn serde_only(body: &[u8]) -> Session<'_> {
    Session::parse(body).expect("valid")
}

/// sonic-rs: lazy iteration over the body's top-level object, attribute values kept raw.
fn sonic_extract(body: &[u8]) -> Extract<'_> {
    use sonic_rs::JsonValueTrait;
    let text = std::str::from_utf8(body).expect("UTF-8");
    let mut out = Extract::default();
    let mut data_email = None;
    let mut data_opt_in = None;
    let mut opt_in = None;
    let string = |v: &sonic_rs::LazyValue<'_>| v.as_str().map(|s| within(text, s));
    let raw = |v: &sonic_rs::LazyValue<'_>| within(text, v.as_raw_str());
    for item in sonic_rs::to_object_iter(text) {
        let (key, value) = item.expect("valid JSON");
        match &*key {
            "session_id" => out.session_id = string(&value),
            "campaign_id" => out.campaign_id = string(&value),
            "campaign_name" => out.campaign_name = string(&value),
            "traffic_source" => out.traffic_source = string(&value),
            "completed_at" => out.completed_at = string(&value),
            "region" => out.region = string(&value),
            "email" => out.email = string(&value),
            "opt_in" => opt_in = Some(opt_in_of(value.as_raw_str())),
            "attributes" => {
                for item in sonic_rs::to_object_iter(value.as_raw_str()) {
                    let (k, v) = item.expect("valid JSON");
                    out.attributes.push((within(text, &k), raw(&v)));
                }
            }
            "data" => {
                for item in sonic_rs::to_object_iter(value.as_raw_str()) {
                    let (k, v) = item.expect("valid JSON");
                    match &*k {
                        "email" => data_email = string(&v),
                        "opt_in" => data_opt_in = Some(opt_in_of(v.as_raw_str())),
                        _ => out.attributes.push((within(text, &k), raw(&v))),
                    }
                }
            }
            _ => {}
        }
    }
    out.email = data_email.or(out.email);
    out.opt_in = data_opt_in.or(opt_in).unwrap_or(false);
    out
}

/// simd-json: its borrowed DOM (it parses in place, so on a copy of the body); attribute
/// values are re-serialised. `f` gets the extract, which borrows from the DOM.
fn simd_with<R>(body: &[u8], scratch: &mut Vec<u8>, f: impl FnOnce(Extract<'_>) -> R) -> R {
    use simd_json::prelude::*;
    scratch.clear();
    scratch.extend_from_slice(body);
    let value = simd_json::to_borrowed_value(scratch).expect("valid JSON");
    let obj = value.as_object().expect("an object");
    let s = |k: &str| obj.get(k).and_then(|v| v.as_str()).map(Cow::Borrowed);
    let opt = |v: &simd_json::BorrowedValue| {
        v.as_bool()
            .unwrap_or_else(|| v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("true")))
    };
    let mut out = Extract {
        session_id: s("session_id"),
        campaign_id: s("campaign_id"),
        campaign_name: s("campaign_name"),
        traffic_source: s("traffic_source"),
        completed_at: s("completed_at"),
        region: s("region"),
        email: s("email"),
        ..Extract::default()
    };
    let mut opt_in = obj.get("opt_in").map(opt);
    if let Some(attrs) = obj.get("attributes").and_then(|v| v.as_object()) {
        for (k, v) in attrs.iter() {
            out.attributes
                .push((Cow::Borrowed(&**k), Cow::Owned(v.encode())));
        }
    }
    if let Some(data) = obj.get("data").and_then(|v| v.as_object()) {
        for (k, v) in data.iter() {
            match &**k {
                "email" => out.email = v.as_str().map(Cow::Borrowed),
                "opt_in" => opt_in = Some(opt(v)),
                _ => out
                    .attributes
                    .push((Cow::Borrowed(&**k), Cow::Owned(v.encode()))),
            }
        }
    }
    out.opt_in = opt_in.unwrap_or(false);
    f(out)
}

/// The attribute text as a `&RawValue`, without serde_json reading it again.
///
/// `RawValue` is `#[repr(transparent)]` over `str`, and serde_json makes its own borrowed
/// ones this way; the text is valid JSON because sonic-rs just read it as a value.
/// Benchmark-only: the crate itself forbids `unsafe`.
fn raw_value(json: &str) -> &RawValue {
    #[allow(unsafe_code)]
    unsafe {
        std::mem::transmute::<&str, &RawValue>(json)
    }
}

/// A `Session` from sonic-rs's reading, validated as `session.rs` does for these bodies
/// (email normalisation, RFC 3339, region), then mapped: the events must equal
/// serde_json's.
fn sonic_map(body: &[u8], now: OffsetDateTime, options: &Options) -> Mapped {
    let e = sonic_extract(body);
    let session = session_from(&e, body);
    events::map(&session, now, options).expect("maps")
}

fn session_from<'a>(e: &'a Extract<'_>, body: &[u8]) -> Session<'a> {
    let b = |s: &'a Option<Cow<'_, str>>| s.as_deref().map(Cow::Borrowed);
    Session {
        // Both shapes map alike; a body without a session_id is a webhook in these sessions.
        shape: if e.session_id.is_some() {
            Shape::Canonical
        } else {
            Shape::Jebbit
        },
        owned_attributes: Vec::new(),
        lead_date: None,
        identity: match &e.session_id {
            Some(id) => Cow::Borrowed(id),
            None => Cow::Owned(hex::encode(Sha256::digest(body))),
        },
        session_id: b(&e.session_id),
        campaign_id: b(&e.campaign_id),
        campaign_name: b(&e.campaign_name),
        traffic_source: b(&e.traffic_source),
        completed_at: e
            .completed_at
            .as_deref()
            .map(|s| OffsetDateTime::parse(s, &Rfc3339).expect("RFC 3339")),
        region: e
            .region
            .as_deref()
            .map(|r| Region::parse(r).expect("a region")),
        email: e
            .email
            .as_deref()
            .and_then(|m| Email::parse(m).expect("an email")),
        opt_in: e.opt_in,
        attributes: e
            .attributes
            .iter()
            .map(|(k, v)| (Cow::Borrowed(&**k), raw_value(v)))
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let bodies = sessions::bodies(7, "json", N);
    let options = Options::default();
    let now = OffsetDateTime::from_unix_timestamp(1_773_000_000).unwrap();

    // Byte for byte, before anything is timed.
    let mut scratch = Vec::new();
    for body in &bodies {
        let want = serde_extract(body).owned();
        assert_eq!(
            sonic_extract(body).owned(),
            want,
            "sonic-rs differs on {}",
            String::from_utf8_lossy(body)
        );
        simd_with(body, &mut scratch, |e| {
            assert_eq!(
                e.owned(),
                want,
                "simd-json differs on {}",
                String::from_utf8_lossy(body)
            )
        });
        let serde_events = events::map(&Session::parse(body).unwrap(), now, &options).unwrap();
        match (serde_events, sonic_map(body, now, &options)) {
            (Mapped::Events(a), Mapped::Events(b)) => assert_eq!(a, b),
            (Mapped::Skipped(a), Mapped::Skipped(b)) => assert_eq!(a, b),
            _ => panic!(
                "serde_json and sonic-rs disagree on {}",
                String::from_utf8_lossy(body)
            ),
        }
    }

    let mut group = c.benchmark_group("json");
    group.throughput(Throughput::Elements(N));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("serde_json/session_parse", |b| {
        b.iter(|| parse_each(&bodies))
    });
    group.bench_function("serde_json/parse+map", |b| {
        b.iter(|| map_each(&bodies, now, &options))
    });
    group.bench_function("serde_json/extract", |b| {
        b.iter(|| {
            for body in &bodies {
                black_box(serde_only(black_box(body)));
            }
        })
    });
    group.bench_function("sonic_rs/extract", |b| {
        b.iter(|| {
            for body in &bodies {
                black_box(sonic_extract(black_box(body)));
            }
        })
    });
    group.bench_function("simd_json/extract", |b| {
        let mut scratch = Vec::new();
        b.iter(|| {
            for body in &bodies {
                simd_with(black_box(body), &mut scratch, |e| {
                    black_box(e);
                });
            }
        })
    });
    group.bench_function("sonic_rs/parse+map", |b| {
        b.iter(|| {
            for body in &bodies {
                black_box(sonic_map(black_box(body), now, &options));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
