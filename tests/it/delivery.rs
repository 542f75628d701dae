//! The worker end to end against the local RabbitMQ and a fake Segment.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;

use segment_bridge::config::Config;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(20);

fn ids(events: &[Value], kind: &str) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| {
            e["properties"]["surveySessionId"]
                .as_str()
                .map_or_else(|| e["userId"].as_str().unwrap().to_owned(), str::to_owned)
        })
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn each_region_receives_only_its_sessions_with_its_own_write_key() {
    let queues = Queues::new("regions").await;
    let (us, eu) = (FakeSegment::ok().await, FakeSegment::ok().await);
    let app = spawn_app(config(&queues, Some(&us), Some(&eu))).await;
    let mut bodies = Vec::new();
    for i in 0..30 {
        let region = ["us", "EU", "non-eu"][i % 3];
        bodies.push(session(&format!("s{i:02}"), region));
    }
    queues.publish(&bodies).await;

    let us_events = us.wait_accepted(40, WITHIN).await;
    let eu_events = eu.wait_accepted(20, WITHIN).await;
    queues.wait_ready((0, 0), WITHIN).await;
    app.stop().await;

    for (sink, key, n) in [(&us, US_KEY, 40), (&eu, EU_KEY, 20)] {
        for r in sink.requests() {
            assert_eq!(
                r.auth.as_deref(),
                Some(format!("{key}:").as_str()),
                "Basic auth, key as user, empty password"
            );
            assert_eq!(r.content_type.as_deref(), Some("application/json"));
            assert_eq!(r.content_encoding, None, "uncompressed by default");
            assert!(r.body["sentAt"].as_str().unwrap().ends_with('Z'));
        }
        assert_eq!(sink.accepted().len(), n);
    }
    let eu_ids: Vec<String> = (0..30)
        .filter(|i| i % 3 == 1)
        .map(|i| format!("s{i:02}"))
        .collect();
    assert_eq!(ids(&eu_events, "track"), eu_ids);
    assert_eq!(ids(&us_events, "track").len(), 20);
    assert!(
        ids(&us_events, "track")
            .iter()
            .all(|id| !eu_ids.contains(id))
    );
    assert_eq!(
        ids(&us_events, "identify").len(),
        20,
        "identify and track travel together"
    );
}

#[tokio::test]
async fn good_sessions_are_delivered_skips_acknowledged_and_bad_input_dead_lettered_with_reasons() {
    let queues = Queues::new("mixed").await;
    let us = FakeSegment::ok().await;
    // No EU key: EU sessions are bad input for this worker.
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let bad: &[(&str, &str)] = &[
        ("not json at all", "not valid JSON"),
        ("[1,2,3]", "not a JSON object"),
        (
            r#"{"session_id":"b1","email":"no-at-sign"}"#,
            "`email` is not an email address",
        ),
        (
            r#"{"session_id":"b2","email":"a@b.c","region":"mars"}"#,
            "`region`",
        ),
        (
            r#"{"session_id":"b3","email":"a@b.c","completed_at":"tuesday"}"#,
            "RFC 3339",
        ),
        (
            r#"{"session_id":"b4","email":"a@b.c","region":"eu"}"#,
            "no write key is configured for region eu",
        ),
    ];
    let huge = format!(
        r#"{{"session_id":"b5","email":"a@b.c","attributes":{{"essay":"{}"}}}}"#,
        "x".repeat(40_000)
    );
    let mut bodies: Vec<String> = Vec::new();
    for i in 0..10 {
        bodies.push(session(&format!("good{i}"), "us"));
    }
    bodies.extend(bad.iter().map(|(b, _)| b.to_string()));
    bodies.push(huge);
    bodies.push(r#"{"session_id":"skip1"}"#.into());
    bodies.push(r#"{"session_id":"skip2","email":"   "}"#.into());
    queues.publish(&bodies).await;

    us.wait_accepted(20, WITHIN).await;
    queues.wait_ready((0, 7), WITHIN).await;
    app.wait_until("dead letters are counted", WITHIN, |a| {
        a.metric(r#"segment_bridge_sessions_total{outcome="dead_lettered"}"#) == 7.0
    })
    .await;
    for (series, want) in [
        (
            r#"segment_bridge_sessions_total{outcome="delivered"}"#,
            10.0,
        ),
        (
            r#"segment_bridge_sessions_total{outcome="skipped_no_email"}"#,
            2.0,
        ),
        (
            r#"segment_bridge_dead_letters_total{reason="no_write_key"}"#,
            1.0,
        ),
        (
            r#"segment_bridge_dead_letters_total{reason="too_large"}"#,
            1.0,
        ),
    ] {
        assert_eq!(app.metric(series), want, "{series}");
    }
    app.stop().await;

    assert_eq!(us.accepted().len(), 20);
    let dead = queues.take_dead().await;
    assert_eq!(dead.len(), 7, "exactly one copy of each bad message");
    let by_body: BTreeMap<String, String> = dead
        .iter()
        .map(|(body, props)| {
            (
                String::from_utf8_lossy(body).into_owned(),
                error_header(props),
            )
        })
        .collect();
    for (body, reason) in bad {
        let got = by_body
            .get(*body)
            .unwrap_or_else(|| panic!("{body} not dead-lettered"));
        assert!(
            got.contains(reason),
            "{body}: reason {got:?} should say {reason:?}"
        );
    }
    assert!(
        by_body
            .values()
            .any(|r| r.contains("over Segment's limit of 32000 bytes"))
    );
}

#[tokio::test]
async fn a_dead_letter_keeps_the_original_body_and_properties() {
    let queues = Queues::new("dl-props").await;
    let us = FakeSegment::ok().await;
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let mut headers = FieldTable::default();
    headers.insert("trace-id".into(), AMQPValue::LongString("abc".into()));
    let props = BasicProperties::default()
        .with_message_id("m-42".into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_app_id("jebbit-relay".into())
        .with_headers(headers);
    queues
        .publish_with(b"{\"session_id\": 5}", props.clone())
        .await;
    queues.wait_ready((0, 1), WITHIN).await;
    app.stop().await;

    let (body, got) = queues.take_dead().await.pop().unwrap();
    assert_eq!(body, b"{\"session_id\": 5}");
    assert_eq!(got.message_id(), props.message_id());
    assert_eq!(got.app_id(), props.app_id());
    assert_eq!(got.delivery_mode(), props.delivery_mode());
    assert_eq!(got.content_type(), props.content_type());
    let headers = got.headers().as_ref().unwrap();
    assert!(headers.contains_key("trace-id"));
    assert_eq!(
        error_header(&got),
        "`session_id` must be a string, found a number"
    );
}

#[tokio::test]
async fn server_errors_and_throttling_are_retried_until_everything_is_delivered_once() {
    let queues = Queues::new("retry").await;
    let us = FakeSegment::start(|_, i| match i {
        0 | 1 => Reply::status(500),
        2 => Reply::status(503),
        3 => Reply {
            status: 429,
            headers: vec![("retry-after", "1".into())],
            delay: Duration::ZERO,
        },
        _ => Reply::ok(),
    })
    .await;
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let bodies: Vec<String> = (0..50).map(|i| session(&format!("r{i}"), "us")).collect();
    queues.publish(&bodies).await;

    let accepted = us.wait_accepted(100, WITHIN).await;
    queues.wait_ready((0, 0), WITHIN).await;
    assert_eq!(
        app.metric(r#"segment_bridge_retries_total{region="us",cause="server_error"}"#),
        3.0
    );
    assert_eq!(
        app.metric(r#"segment_bridge_retries_total{region="us",cause="throttled"}"#),
        1.0
    );
    app.stop().await;

    let track_ids: HashSet<_> = accepted
        .iter()
        .filter(|e| e["type"] == "track")
        .map(|e| e["messageId"].clone())
        .collect();
    assert_eq!(track_ids.len(), 50, "every session delivered");
    assert_eq!(accepted.len(), 100, "nothing delivered twice once accepted");
    // Retry-After: 1 was honoured before the next attempt.
    let reqs = us.requests();
    let throttled = reqs.iter().position(|r| r.status == 429).unwrap();
    let after = reqs[throttled + 1..].iter().map(|r| r.at).min().unwrap();
    assert!(after - reqs[throttled].at >= Duration::from_millis(950));
    // sentAt is set afresh on each attempt.
    let sent_at: HashSet<_> = reqs.iter().map(|r| r.body["sentAt"].clone()).collect();
    assert!(sent_at.len() > 1);
}

#[tokio::test]
async fn a_poison_session_rejected_with_400_is_isolated_and_the_rest_delivered() {
    let queues = Queues::new("poison").await;
    let us = FakeSegment::start(|r, _| {
        let poisoned = r
            .events()
            .iter()
            .any(|e| e["properties"]["surveySessionId"] == "p13");
        Reply::status(if poisoned { 400 } else { 200 })
    })
    .await;
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let bodies: Vec<String> = (0..40).map(|i| session(&format!("p{i}"), "us")).collect();
    queues.publish(&bodies).await;

    queues.wait_ready((0, 1), WITHIN).await;
    let accepted = us.wait_accepted(78, WITHIN).await;
    app.stop().await;

    assert_eq!(accepted.len(), 78, "the 39 good sessions, each once");
    assert!(!ids(&accepted, "track").contains(&"p13".to_owned()));
    let (body, props) = queues.take_dead().await.pop().unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["session_id"],
        "p13"
    );
    assert!(error_header(&props).contains("Segment rejected the session's events with HTTP 400"));
}

#[tokio::test]
async fn a_refused_write_key_leaves_every_message_in_the_queue_and_the_worker_not_ready() {
    let queues = Queues::new("unauthorized").await;
    let us = FakeSegment::start(|_, _| Reply::status(401)).await;
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let bodies: Vec<String> = (0..25).map(|i| session(&format!("u{i}"), "us")).collect();
    queues.publish(&bodies).await;

    app.wait_until("the key is refused", WITHIN, |a| {
        a.metric(r#"segment_bridge_region_misconfigured{region="us"}"#) == 1.0
    })
    .await;
    // The worker stops consuming and hands everything back: all 25 are ready again.
    queues.wait_ready((25, 0), WITHIN).await;
    let (status, why) = app.probe("/readyz").await;
    assert_eq!(status, 503);
    assert!(why.contains("us write key"), "{why}");
    assert_eq!(app.probe("/healthz").await.0, 200);
    assert_eq!(
        app.metric(r#"segment_bridge_region_misconfigured{region="us"}"#),
        1.0
    );
    assert!(!app.health.is_consuming());
    let requests = us.requests().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        us.requests().len(),
        requests,
        "no more attempts once the key is refused"
    );
    assert_eq!(
        queues.ready().await,
        (25, 0),
        "nothing dead-lettered, nothing taken again"
    );
    app.stop().await;
}

#[tokio::test]
async fn redelivered_sessions_carry_the_same_message_ids() {
    let queues = Queues::new("dedup").await;
    let us = FakeSegment::ok().await;
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let body = session("same", "us");
    queues.publish([&body]).await;
    let first = us.wait_accepted(2, WITHIN).await;
    queues.publish([&body]).await;
    let both = us.wait_accepted(4, WITHIN).await;
    app.stop().await;

    let id = |events: &[Value], kind: &str| {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .map(|e| e["messageId"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        id(&both, "identify"),
        [
            id(&first, "identify")[0].clone(),
            id(&first, "identify")[0].clone()
        ]
    );
    assert_eq!(
        id(&both, "track"),
        [
            id(&first, "track")[0].clone(),
            id(&first, "track")[0].clone()
        ]
    );
    assert_ne!(id(&first, "identify"), id(&first, "track"));
}

#[tokio::test]
async fn the_same_session_to_two_segment_sources_gets_other_ids_in_each_and_the_same_after_a_restart()
 {
    // A staging and a production deployment fed the same session: two queues, two
    // workers with different write keys, two Segment sources.
    let (staging_q, production_q) = (
        Queues::new("ids-staging").await,
        Queues::new("ids-prod").await,
    );
    let (staging, production) = (FakeSegment::ok().await, FakeSegment::ok().await);
    let mut production_config = config(&production_q, Some(&production), None);
    production_config.segment.us.write_key = secrecy::SecretString::from("us-production-key");
    let body = session("both-sources", "us");
    let mut ids = Vec::new();
    for (queues, sink, config) in [
        (
            &staging_q,
            &staging,
            config(&staging_q, Some(&staging), None),
        ),
        (&production_q, &production, production_config),
    ] {
        let app = spawn_app(config).await;
        queues.publish([&body]).await;
        let events = sink.wait_accepted(2, WITHIN).await;
        app.stop().await;
        ids.push(
            [
                message_ids_of(&events, "identify"),
                message_ids_of(&events, "track"),
            ]
            .concat(),
        );
    }
    let distinct: HashSet<&String> = ids.iter().flatten().collect();
    assert_eq!(distinct.len(), 4, "{ids:?}");
    assert!(
        ids.iter()
            .flatten()
            .all(|id| !id.contains("production") && !id.contains(US_KEY)),
        "no id holds a write key: {ids:?}"
    );

    // The staging worker restarted: the same session gets the same ids.
    let app = spawn_app(config(&staging_q, Some(&staging), None)).await;
    staging_q.publish([&body]).await;
    let events = staging.wait_accepted(4, WITHIN).await;
    app.stop().await;
    assert_eq!(
        [
            message_ids_of(&events[2..], "identify"),
            message_ids_of(&events[2..], "track")
        ]
        .concat(),
        ids[0]
    );
}

/// The worker's configuration for `queues` and `us`, with batches of at most `events`
/// events.
fn batching(queues: &Queues, us: &FakeSegment, events: usize) -> Config {
    let mut config = config(queues, Some(us), None);
    config.segment.max_batch_events = events;
    config
}

/// Publishes `n` sessions of region us, with ids `<prefix>0`, `<prefix>1`, ….
async fn publish_us_sessions(queues: &Queues, prefix: &str, n: usize) {
    let bodies: Vec<String> = (0..n)
        .map(|i| session(&format!("{prefix}{i}"), "us"))
        .collect();
    queues.publish(&bodies).await;
}

#[tokio::test]
async fn batches_respect_the_event_limit_and_the_flush_interval() {
    let queues = Queues::new("batching").await;
    let us = FakeSegment::ok().await;
    let mut config = batching(&queues, &us, 10);
    config.segment.flush_interval_ms = 300;
    let app = spawn_app(config).await;
    publish_us_sessions(&queues, "b", 23).await;
    us.wait_accepted(46, WITHIN).await;
    app.stop().await;

    let sizes: Vec<usize> = us.requests().iter().map(|r| r.events().len()).collect();
    assert!(sizes.iter().all(|&n| n <= 10 && n % 2 == 0), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 46);
    assert!(
        sizes.iter().filter(|&&n| n == 10).count() >= 4,
        "full batches go at once: {sizes:?}"
    );
}

#[tokio::test]
async fn a_slow_segment_gets_several_requests_in_flight_per_region() {
    let queues = Queues::new("inflight").await;
    let concurrent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen_parallel = Arc::new(AtomicBool::new(false));
    let us = {
        let (concurrent, seen) = (concurrent.clone(), seen_parallel.clone());
        FakeSegment::start(move |_, _| {
            let now = concurrent.fetch_add(1, Ordering::SeqCst) + 1;
            if now > 1 {
                seen.store(true, Ordering::SeqCst);
            }
            // Decremented lazily: each reply is delayed, so overlapping calls see > 1.
            let c = concurrent.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                c.fetch_sub(1, Ordering::SeqCst);
            });
            Reply {
                status: 200,
                headers: Vec::new(),
                delay: Duration::from_millis(200),
            }
        })
        .await
    };
    let mut config = batching(&queues, &us, 4);
    config.segment.max_in_flight = 3;
    let app = spawn_app(config).await;
    publish_us_sessions(&queues, "f", 30).await;
    us.wait_accepted(60, WITHIN).await;
    queues.wait_ready((0, 0), WITHIN).await;
    app.stop().await;
    assert!(seen_parallel.load(Ordering::SeqCst), "requests overlapped");
}

#[tokio::test]
async fn the_webhook_body_is_delivered_as_published_in_the_integration_docs() {
    let queues = Queues::new("webhook").await;
    let us = FakeSegment::ok().await;
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/jebbit-webhook-test-submission.json"
    ))
    .unwrap();
    queues.publish([&body]).await;
    let events = us.wait_accepted(2, WITHIN).await;
    app.stop().await;
    let identify = events.iter().find(|e| e["type"] == "identify").unwrap();
    assert_eq!(
        identify["userId"],
        "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
    );
    assert_eq!(
        identify["traits"]["test_sata_attribute"],
        serde_json::json!(["option 1", "option 4"])
    );
}

#[tokio::test]
async fn with_gzip_each_request_is_gzipped_and_carries_the_same_batch() {
    let queues = Queues::new("gzip").await;
    let (plain, gzipped) = (FakeSegment::ok().await, FakeSegment::ok().await);
    let bodies: Vec<String> = (0..20)
        .map(|i| session(&format!("g{i:02}"), "us"))
        .collect();

    let app = spawn_app(config(&queues, Some(&plain), None)).await;
    queues.publish(&bodies).await;
    plain.wait_accepted(40, WITHIN).await;
    queues.wait_ready((0, 0), WITHIN).await;
    app.stop().await;

    let mut config = config(&queues, Some(&gzipped), None);
    config.segment.compression = segment_bridge::config::Compression::Gzip;
    let app = spawn_app(config).await;
    queues.publish(&bodies).await;
    gzipped.wait_accepted(40, WITHIN).await;
    queues.wait_ready((0, 0), WITHIN).await;
    app.stop().await;

    let mut wire = 0;
    for r in gzipped.requests() {
        assert_eq!(r.content_encoding.as_deref(), Some("gzip"));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert!(r.body["sentAt"].is_string(), "decompresses to a batch");
        wire += r.wire_bytes;
    }
    let plain_wire: usize = plain.requests().iter().map(|r| r.wire_bytes).sum();
    assert!(
        wire * 3 < plain_wire,
        "{wire} gzipped bytes against {plain_wire}"
    );
    // The same events, but for sentAt: the two runs sent byte-identical sessions.
    let strip = |mut events: Vec<Value>| {
        events.sort_by_key(|e| e["messageId"].as_str().unwrap().to_owned());
        events
    };
    assert_eq!(strip(gzipped.accepted()), strip(plain.accepted()));
}

#[tokio::test]
async fn a_joturl_lead_without_an_amqp_timestamp_is_timed_at_midnight_utc_of_its_date() {
    let queues = Queues::new("joturl-date").await;
    let us = FakeSegment::ok().await;
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/joturl-form-lead.json"
    ))
    .unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "x-segment-bridge-kind".into(),
        AMQPValue::LongString("joturl".into()),
    );
    // Queued by some other producer: no AMQP timestamp.
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    queues.publish_with(&body, properties).await;
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let events = us.wait_accepted(2, WITHIN).await;
    app.stop().await;
    for event in &events {
        assert_eq!(
            event["timestamp"], "2020-03-26T00:00:00.000Z",
            "the lead's date at midnight UTC, not the time it was consumed: {event}"
        );
    }
    assert_eq!(events[1]["event"], "Lead Captured");
}
