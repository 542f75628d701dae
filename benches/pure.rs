//! The pure path on one core: message body → `Session::parse` → `events::map` (which
//! serialises both events) → the batch request body. No broker, no network, no clock
//! except the fixed fallback time.
//!
//! `cargo bench --bench pure` (criterion; throughput is reported in sessions/s as
//! "elem/s"). Under `cargo test --benches` each case runs once, as a smoke test.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use segment_bridge::batch::{Batch, Entry, Limits};
use segment_bridge::events::{self, Mapped, Options};
use segment_bridge::session::Session;
use time::OffsetDateTime;

mod common;

/// Sessions per iteration: enough to cycle through the mix, small enough to stay in cache
/// as a realistic prefetch window would (2000 deliveries).
const N: u64 = 2_000;

fn bench(c: &mut Criterion) {
    let bodies: Vec<Vec<u8>> = common::sessions(7, "pure", N)
        .into_iter()
        .map(|g| g.body.into_bytes())
        .collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let options = Options::default();
    let now = OffsetDateTime::from_unix_timestamp(1_773_000_000).unwrap();

    let mut group = c.benchmark_group("pure");
    group.throughput(Throughput::Elements(N));
    group.measurement_time(Duration::from_secs(5));

    // Floors for comparison: serde_json reading the same bodies and keeping nothing, and
    // the three SHA-256 digests every session needs (email hash, two messageIds).
    group.bench_function("floor_json_ignored", |b| {
        b.iter(|| {
            for body in &bodies {
                black_box(
                    serde_json::from_slice::<serde::de::IgnoredAny>(black_box(body)).unwrap(),
                );
            }
        })
    });
    group.bench_function("floor_sha256x3", |b| {
        use sha2::{Digest, Sha256};
        b.iter(|| {
            for body in &bodies {
                for part in [&body[..24], &body[..48], &body[..40]] {
                    black_box(Sha256::digest(black_box(part)));
                }
            }
        })
    });

    group.bench_function("parse", |b| {
        b.iter(|| {
            for body in &bodies {
                black_box(Session::parse(black_box(body)).unwrap());
            }
        })
    });

    group.bench_function("parse+map", |b| {
        b.iter(|| {
            for body in &bodies {
                let session = Session::parse(black_box(body)).unwrap();
                black_box(events::map(&session, now, &options).unwrap());
            }
        })
    });

    // The two messageIds of each session, by each scheme: v2 (the default) hashes the
    // namespace once per configuration, so it should cost what v1 costs.
    let sessions: Vec<Session> = bodies.iter().map(|b| Session::parse(b).unwrap()).collect();
    for (name, ids) in [
        ("message_ids_v1", events::MessageIds::v1()),
        ("message_ids_v2", events::MessageIds::default()),
    ] {
        let ids = ids.region(segment_bridge::domain::Region::Us);
        group.bench_function(name, |b| {
            b.iter(|| {
                for session in &sessions {
                    let identity = black_box(&*session.identity);
                    black_box(ids.message_id(identity, events::EventKind::Identify));
                    let track = events::EventKind::Track(&options.track_event);
                    black_box(ids.message_id(identity, track));
                }
            })
        });
    }

    // What the worker does per delivery, plus the share of the batch body each session
    // takes: the full pure path.
    let limits = Limits {
        max_events: 1000,
        max_bytes: 475_000,
    };
    group.bench_function("parse+map+batch_body", |b| {
        b.iter(|| {
            let mut batch = Batch::new(limits);
            let mut bodies_out = 0usize;
            for body in &bodies {
                let session = Session::parse(black_box(body)).unwrap();
                let Mapped::Events(events) = events::map(&session, now, &options).unwrap() else {
                    continue;
                };
                if !batch.is_empty() && !batch.fits(&events) {
                    bodies_out += batch.take().body("2026-03-12T00:00:00.000Z").len();
                }
                batch.push(Entry { ticket: (), events });
                if batch.is_full() {
                    bodies_out += batch.take().body("2026-03-12T00:00:00.000Z").len();
                }
            }
            if !batch.is_empty() {
                bodies_out += batch.take().body("2026-03-12T00:00:00.000Z").len();
            }
            black_box(bodies_out)
        })
    });

    // segment.compression = "gzip": compressing the request bodies of these sessions (the
    // worker's level, and zlib's default level for comparison), per session.
    let mut requests = Vec::new();
    let mut batch = Batch::new(limits);
    for body in &bodies {
        let session = Session::parse(body).unwrap();
        let Mapped::Events(events) = events::map(&session, now, &options).unwrap() else {
            continue;
        };
        if !batch.is_empty() && !batch.fits(&events) {
            requests.push(batch.take().body("2026-03-12T00:00:00.000Z"));
        }
        batch.push(Entry { ticket: (), events });
    }
    requests.push(batch.take().body("2026-03-12T00:00:00.000Z"));
    group.bench_function("gzip_bodies", |b| {
        b.iter(|| {
            for body in &requests {
                black_box(segment_bridge::segment::gzip(black_box(body)));
            }
        })
    });
    group.bench_function("gzip_bodies_level6", |b| {
        use std::io::Write;
        b.iter(|| {
            for body in &requests {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                e.write_all(black_box(body)).unwrap();
                black_box(e.finish().unwrap());
            }
        })
    });
    group.finish();
    let plain: usize = requests.iter().map(Vec::len).sum();
    let gzipped: usize = requests
        .iter()
        .map(|b| segment_bridge::segment::gzip(b).len())
        .sum();
    eprintln!(
        "pure: {} request bodies, {plain} bytes; gzipped {gzipped} bytes ({:.1}x smaller)",
        requests.len(),
        plain as f64 / gzipped as f64
    );
    eprintln!(
        "pure: {N} sessions per iteration, {:.0} bytes per session on average",
        bytes as f64 / N as f64
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
