//! The intake (`segment-bridge intake`): webhooks in, messages on the real queue.
//!
//! Most tests run the intake in-process on random ports and look at what reached the
//! test's own queue; those about signals, start-up and log lines run the binary. Raw TCP
//! stands in for clients that misbehave (slow bodies, half-sent headers, chunked bodies).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use segment_bridge::config::{Config, Source, SourceKind};
use segment_bridge::domain::Region;
use segment_bridge::intake::signature::sign;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(15);
const JEBBIT_SECRET: &str = "jebbit-shared-secret-Qq6niUmvrO32";
const JEBBIT_PREVIOUS: &str = "jebbit-previous-secret-0lYbBGKha6";
const JOTURL_TOKEN: &str = "joturl-token-8d1c5a0f3b7e4e21";
const JOTURL_PREVIOUS: &str = "joturl-old-token-77aa01";
/// Nothing listens on port 1.
const UNREACHABLE: &str = "amqp://guest:guest@127.0.0.1:1/%2f";
const FIXTURE: &[u8] = include_bytes!("../fixtures/jebbit-webhook-test-submission.json");
const LEAD: &[u8] = include_bytes!("../fixtures/joturl-form-lead.json");

fn source(kind: SourceKind, region: Option<Region>, secret: &str, previous: &str) -> Source {
    Source {
        kind,
        region,
        secret: SecretString::from(secret),
        previous_secret: SecretString::from(previous),
        forward_tests: false,
    }
}

/// The test's queues, three sources (`jebbit_eu` with a previous secret, `jebbit_us`
/// without a region and forwarding tests, `cta` a JotUrl source of region us), short
/// timeouts.
fn intake_config(queues: &Queues) -> Config {
    let mut config = config(queues, None, None);
    let i = &mut config.intake;
    i.listen = "127.0.0.1:0".parse().unwrap();
    i.publish_timeout_ms = 1000;
    i.retry_after_s = 7;
    let sources = [
        (
            "jebbit_eu",
            source(
                SourceKind::Jebbit,
                Some(Region::Eu),
                JEBBIT_SECRET,
                JEBBIT_PREVIOUS,
            ),
        ),
        ("jebbit_us", {
            let mut s = source(SourceKind::Jebbit, None, JEBBIT_SECRET, "");
            s.forward_tests = true;
            s
        }),
        (
            "cta",
            source(
                SourceKind::Joturl,
                Some(Region::Us),
                JOTURL_TOKEN,
                JOTURL_PREVIOUS,
            ),
        ),
    ];
    i.sources = sources
        .into_iter()
        .map(|(name, s)| (name.to_owned(), s))
        .collect();
    config.shutdown.grace_period_s = 5;
    config
}

/// An HTTP client (rustls needs its crypto provider installed first).
fn http() -> reqwest::Client {
    segment_bridge::segment::http_client(Duration::from_secs(20)).unwrap()
}

use segment_bridge_testkit::broker::declare_durable;
use segment_bridge_testkit::jebbit::{signature as signed, unix_now as now};

/// The intake with its listen addresses on free ports.
async fn spawn_intake(mut config: Config) -> Intake {
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.intake.listen = "127.0.0.1:0".parse().unwrap();
    start_intake(config, WITHIN).await
}

/// What only these tests send.
trait Jebbit {
    /// POSTs a correctly signed Jebbit webhook to `source`.
    async fn jebbit(&self, source: &str, body: &[u8]) -> Answer;
}

impl Jebbit for Intake {
    async fn jebbit(&self, source: &str, body: &[u8]) -> Answer {
        let signature = signed(JEBBIT_SECRET, body);
        self.post(
            &format!("/webhooks/{source}"),
            body,
            &[("x-jebbit-signature", &signature)],
        )
        .await
    }
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        _ => None,
    }
}

/// Waits until the main queue holds `n` ready messages, then takes them all.
async fn take_queued(queues: &Queues, n: u32) -> Vec<(Vec<u8>, BasicProperties)> {
    queues.wait_ready((n, 0), WITHIN).await;
    queues.take_main().await
}

// ---- Jebbit ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_jebbit_body_is_queued_byte_for_byte_with_its_headers_and_receive_time() {
    let queues = Queues::new("intake-jebbit").await;
    let intake = spawn_intake(intake_config(&queues)).await;
    intake.wait_ready().await;
    // White space and key order as the sender had them: the message is the body as it came.
    let body = b" {\"data\": {\"email\":\"Jane@Example.com\" , \"opt_in\":\"true\"},\n \"event\":{\"event_number\":3}}\n";
    let before = now() as u64;
    let answer = intake.jebbit("jebbit_eu", body).await;
    let after = now() as u64;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, json!({"queued": 1}));

    let queued = take_queued(&queues, 1).await;
    let (got, p) = &queued[0];
    assert_eq!(got, body);
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        p.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    let t = p.timestamp().expect("an AMQP timestamp");
    assert!(
        (before..=after).contains(&t),
        "{t} not in {before}..={after}"
    );
    assert_eq!(header(p, "x-segment-bridge-source"), Some("jebbit_eu"));
    assert_eq!(header(p, "x-segment-bridge-kind"), Some("jebbit"));
    assert_eq!(header(p, "x-segment-bridge-region"), Some("eu"));

    // A source without a region writes no region header.
    assert_eq!(intake.jebbit("jebbit_us", FIXTURE).await.status, 200);
    let queued = take_queued(&queues, 1).await;
    assert_eq!(queued[0].0, FIXTURE);
    assert_eq!(
        header(&queued[0].1, "x-segment-bridge-source"),
        Some("jebbit_us")
    );
    assert_eq!(header(&queued[0].1, "x-segment-bridge-region"), None);

    assert_eq!(intake.requests("jebbit_eu", "queued"), 1.0);
    assert_eq!(
        intake.metric(r#"segment_bridge_intake_messages_queued_total{source="jebbit_eu"}"#),
        1.0
    );
    assert!(intake.metric("segment_bridge_intake_publish_seconds_count") >= 2.0);
    intake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_stale_future_missing_or_malformed_signatures_are_401_and_nothing_is_queued() {
    let queues = Queues::new("intake-unsigned").await;
    let intake = spawn_intake(intake_config(&queues)).await;
    intake.wait_ready().await;
    let body = FIXTURE;
    let t = now();
    let other_body = sign(JEBBIT_SECRET.as_bytes(), t, b"{\"data\":{}}");
    let wrong_secret = sign(b"not-the-secret", t, body);
    let stale = sign(JEBBIT_SECRET.as_bytes(), t - 301, body);
    let future = sign(JEBBIT_SECRET.as_bytes(), t + 120, body);
    let v1 = sign(JEBBIT_SECRET.as_bytes(), t, body);
    let v1 = v1.split_once(",v1=").unwrap().1;
    let no_t = format!("v1={v1}");
    let bad_t = format!("t=yesterday,v1={v1}");
    let unpadded = format!("t={t},v1={}", v1.trim_end_matches('='));
    let cases: &[(&str, Option<&str>, &str)] = &[
        (
            "another body's signature",
            Some(&other_body),
            "no signature matches",
        ),
        (
            "another secret",
            Some(&wrong_secret),
            "no signature matches",
        ),
        ("a stale timestamp", Some(&stale), "s old"),
        (
            "a timestamp from the future",
            Some(&future),
            "in the future",
        ),
        ("no header", None, "no x-jebbit-signature"),
        ("no t", Some(&no_t), "malformed"),
        ("a t that is no number", Some(&bad_t), "malformed"),
        ("an unpadded signature", Some(&unpadded), "malformed"),
        ("garbage", Some("sha256=abcdef"), "malformed"),
    ];
    for (what, signature, says) in cases {
        let headers: Vec<(&str, &str)> = signature
            .iter()
            .map(|s| ("x-jebbit-signature", *s))
            .collect();
        let answer = intake.post("/webhooks/jebbit_eu", body, &headers).await;
        assert_eq!(answer.status, 401, "{what}: {answer:?}");
        let error = answer.body["error"].as_str().unwrap();
        assert!(error.contains(says), "{what}: {error}");
        assert!(
            !error.contains(v1),
            "{what}: the answer repeats the signature"
        );
    }
    assert_eq!(
        intake.requests("jebbit_eu", "unauthorized"),
        cases.len() as f64
    );
    // Then one that holds: it is the only message on the queue.
    assert_eq!(
        intake.jebbit("jebbit_eu", b"{\"data\":{}}").await.status,
        200
    );
    let queued = take_queued(&queues, 1).await;
    assert_eq!(queued[0].0, b"{\"data\":{}}");
    intake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_secret_is_accepted_while_a_secret_is_rotated() {
    let queues = Queues::new("intake-rotation").await;
    let intake = spawn_intake(intake_config(&queues)).await;
    intake.wait_ready().await;
    let t = now();
    let old = sign(JEBBIT_PREVIOUS.as_bytes(), t, FIXTURE);
    let answer = intake
        .post(
            "/webhooks/jebbit_eu",
            FIXTURE,
            &[("x-jebbit-signature", &old)],
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // Several v1 at once (Jebbit rotating): one that matches is enough.
    let wrong = sign(b"nope", t, FIXTURE);
    let both = format!("{wrong},{}", old.split_once(',').unwrap().1);
    let answer = intake
        .post(
            "/webhooks/jebbit_eu",
            FIXTURE,
            &[("x-jebbit-signature", &both)],
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // jebbit_us has no previous secret: the old one is refused there.
    let answer = intake
        .post(
            "/webhooks/jebbit_us",
            FIXTURE,
            &[("x-jebbit-signature", &old)],
        )
        .await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(take_queued(&queues, 2).await.len(), 2);
    intake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jebbit_test_webhook_is_verified_answered_200_and_not_queued_unless_forwarded() {
    let queues = Queues::new("intake-test-webhook").await;
    let intake = spawn_intake(intake_config(&queues)).await;
    intake.wait_ready().await;
    let good = signed(JEBBIT_SECRET, FIXTURE);
    let test = [
        ("x-jebbit-signature", good.as_str()),
        ("x-jebbit-test", "true"),
    ];
    let answer = intake.post("/webhooks/jebbit_eu", FIXTURE, &test).await;
    assert_eq!((answer.status, answer.body), (200, json!({"test": true})));
    assert_eq!(intake.requests("jebbit_eu", "test"), 1.0);
    // Verified like any other webhook.
    let bad = sign(b"nope", now(), FIXTURE);
    let answer = intake
        .post(
            "/webhooks/jebbit_eu",
            FIXTURE,
            &[("x-jebbit-signature", &bad), ("x-jebbit-test", "true")],
        )
        .await;
    assert_eq!(answer.status, 401);
    // jebbit_us sets forward_tests: its test webhook is queued.
    let answer = intake.post("/webhooks/jebbit_us", FIXTURE, &test).await;
    assert_eq!((answer.status, answer.body), (200, json!({"queued": 1})));
    let queued = take_queued(&queues, 1).await;
    assert_eq!(
        header(&queued[0].1, "x-segment-bridge-source"),
        Some("jebbit_us")
    );
    intake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_body_becomes_one_message_per_element_each_byte_for_byte() {
    let queues = Queues::new("intake-array").await;
    let intake = spawn_intake(intake_config(&queues)).await;
    intake.wait_ready().await;
    let elements = [
        r#"{"data":{"email":"a@example.com"},"event":{"event_number":0}}"#,
        "{ \"data\" : { \"email\" : \"b@example.com\" } }",
        r#"{"session_id":"s-3","email":"c@example.com"}"#,
    ];
    let body = format!("[{} ,\n{},{}]", elements[0], elements[1], elements[2]);
    let answer = intake.jebbit("jebbit_eu", body.as_bytes()).await;
    assert_eq!((answer.status, answer.body), (200, json!({"queued": 3})));
    let queued = take_queued(&queues, 3).await;
    let got: Vec<&[u8]> = queued.iter().map(|(b, _)| b.as_slice()).collect();
    let want: Vec<&[u8]> = elements.iter().map(|e| e.as_bytes()).collect();
    assert_eq!(got, want);
    assert!(
        queued
            .iter()
            .all(|(_, p)| header(p, "x-segment-bridge-source") == Some("jebbit_eu"))
    );
    assert_eq!(
        intake.metric(r#"segment_bridge_intake_messages_queued_total{source="jebbit_eu"}"#),
        3.0
    );
    // An array with one element that is not an object is refused whole.
    let answer = intake.jebbit("jebbit_eu", b"[{\"data\":{}}, 7]").await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(queues.ready().await, (0, 0));
    intake.stop().await;
}

// ---- JotUrl ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joturl_lead_on_its_token_route_is_queued_and_any_wrong_route_is_404() {
    let queues = Queues::new("intake-joturl").await;
    let intake = spawn_intake(intake_config(&queues)).await;
    intake.wait_ready().await;
    for path in [
        "/webhooks/cta/wrong-token".to_owned(),
        format!("/webhooks/cta/{}", &JOTURL_TOKEN[..JOTURL_TOKEN.len() - 1]),
        format!("/webhooks/cta/{JOTURL_TOKEN}x"),
        "/webhooks/cta".to_owned(),
        format!("/webhooks/nope/{JOTURL_TOKEN}"),
        // A Jebbit source has no token route, a JotUrl source no signed one.
        format!("/webhooks/jebbit_eu/{JOTURL_TOKEN}"),
        format!("/webhooks/cta/{JOTURL_TOKEN}/more"),
        "/".to_owned(),
    ] {
        let answer = intake.post(&path, LEAD, &[]).await;
        assert_eq!(answer.status, 404, "{path}: {answer:?}");
    }
    assert_eq!(intake.requests("cta", "not_found"), 3.0, "wrong tokens");
    let answer = intake
        .post(&format!("/webhooks/cta/{JOTURL_TOKEN}"), LEAD, &[])
        .await;
    assert_eq!((answer.status, answer.body), (200, json!({"queued": 1})));
    let answer = intake
        .post(&format!("/webhooks/cta/{JOTURL_PREVIOUS}"), LEAD, &[])
        .await;
    assert_eq!(answer.status, 200, "the previous token");
    let queued = take_queued(&queues, 2).await;
    for (body, p) in &queued {
        assert_eq!(body, LEAD);
        assert_eq!(header(p, "x-segment-bridge-source"), Some("cta"));
        assert_eq!(header(p, "x-segment-bridge-kind"), Some("joturl"));
        assert_eq!(header(p, "x-segment-bridge-region"), Some("us"));
    }
    // The token is no label.
    assert!(!intake.metrics.render().contains(JOTURL_TOKEN));
    intake.stop().await;
}

// ---- Bodies ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_a_json_object_or_array_of_objects_is_400_and_not_queued() {
    let queues = Queues::new("intake-bad-body").await;
    let intake = spawn_intake(intake_config(&queues)).await;
    intake.wait_ready().await;
    let cta = format!("/webhooks/cta/{JOTURL_TOKEN}");
    for body in [
        b"not json".as_slice(),
        b"",
        b"{\"data\":",
        b"\"a string\"",
        b"[]",
        b"[1,2]",
        b"{\"a\":\"\xff\"}",
        b"data=a%40b.c&type=email",
    ] {
        let answer = intake.jebbit("jebbit_eu", body).await;
        assert_eq!(answer.status, 400, "{body:?}: {answer:?}");
        let answer = intake.post(&cta, body, &[]).await;
        assert_eq!(answer.status, 400, "{body:?}: {answer:?}");
    }
    assert_eq!(intake.requests("jebbit_eu", "bad_request"), 8.0);
    assert_eq!(intake.requests("cta", "bad_request"), 8.0);
    // A signature is checked before the body's shape: a bad body unsigned is a 401.
    let answer = intake.post("/webhooks/jebbit_eu", b"not json", &[]).await;
    assert_eq!(answer.status, 401);
    assert_eq!(intake.post(&cta, LEAD, &[]).await.status, 200);
    assert_eq!(take_queued(&queues, 1).await[0].0, LEAD);
    intake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413_whether_its_length_is_declared_or_chunked() {
    let queues = Queues::new("intake-too-large").await;
    let mut config = intake_config(&queues);
    config.intake.max_body_bytes = 1000;
    let intake = spawn_intake(config).await;
    intake.wait_ready().await;
    let big = format!(
        r#"{{"data":{{"email":"a@b.c","pad":"{}"}}}}"#,
        "x".repeat(1000)
    );
    let answer = intake.jebbit("jebbit_eu", big.as_bytes()).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    // Chunked, without a length: cut off at the limit.
    let signature = signed(JEBBIT_SECRET, big.as_bytes());
    let mut chunked = Vec::new();
    for part in big.as_bytes().chunks(300) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = format!(
        "POST /webhooks/jebbit_eu HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nx-jebbit-signature: {signature}\r\n\r\n"
    );
    let mut stream = TcpStream::connect(intake.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&chunked).await.unwrap();
    let (status, _) = read_response(&mut stream).await.unwrap();
    assert_eq!(status, 413);
    // Just at the limit is fine.
    let fits = format!(r#"{{"data":{{"pad":"{}"}}}}"#, "x".repeat(1000 - 19));
    assert_eq!(fits.len(), 1000);
    assert_eq!(
        intake.jebbit("jebbit_eu", fits.as_bytes()).await.status,
        200
    );
    assert_eq!(intake.requests("jebbit_eu", "too_large"), 2.0);
    assert_eq!(take_queued(&queues, 1).await[0].0, fits.as_bytes());
    intake.stop().await;
}

// ---- The broker ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_unreachable_every_webhook_is_503_with_retry_after_and_not_ready() {
    let queues = Queues::new("intake-no-broker").await;
    let mut config = intake_config(&queues);
    config.amqp.url = SecretString::from(UNREACHABLE);
    let intake = spawn_intake(config).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, why) = intake.probe("/readyz").await;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("not connected"), "{why}");
    assert_eq!(intake.probe("/healthz").await.0, 200);
    for _ in 0..3 {
        let answer = intake.jebbit("jebbit_eu", FIXTURE).await;
        assert_eq!(answer.status, 503, "{answer:?}");
        assert_eq!(answer.retry_after.as_deref(), Some("7"));
        let answer = intake
            .post(&format!("/webhooks/cta/{JOTURL_TOKEN}"), LEAD, &[])
            .await;
        assert_eq!(answer.status, 503, "{answer:?}");
    }
    assert_eq!(intake.requests("jebbit_eu", "unavailable"), 3.0);
    assert_eq!(intake.metric("segment_bridge_amqp_connected"), 0.0);
    intake.stop().await;
    assert_eq!(queues.ready().await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_does_not_confirm_within_the_publish_timeout_gets_a_503_answered() {
    let queues = Queues::new("intake-slow-broker").await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let mut config = intake_config(&queues);
    config.amqp.url = SecretString::from(format!("amqp://guest:guest@{}/%2f", proxy.addr));
    config.intake.publish_timeout_ms = 400;
    let intake = spawn_intake(config).await;
    intake.wait_ready().await;
    assert_eq!(intake.jebbit("jebbit_eu", FIXTURE).await.status, 200);

    // The broker's answers stop reaching the intake: no confirm comes.
    proxy.pause();
    let started = Instant::now();
    let answer = intake.jebbit("jebbit_eu", FIXTURE).await;
    let took = started.elapsed();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.retry_after.as_deref(), Some("7"));
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "answered after {took:?}, the publish timeout is 400 ms"
    );
    assert!(answer.body["error"].as_str().unwrap().contains("confirm"));
    proxy.resume();
    assert_eq!(intake.jebbit("jebbit_eu", FIXTURE).await.status, 200);
    intake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_returns_or_nacks_is_answered_503() {
    let queues = Queues::new("intake-refused").await;
    // A queue that takes one message and refuses the next (reject-publish: a nack).
    let limited = format!("{}.limited", queues.main);
    let _cleanup = DeleteOnDrop(limited.clone());
    let (conn, channel) = declare_limited(&limited, 1).await;
    let mut config = intake_config(&queues);
    config.amqp.queue = limited.clone();
    // A nack is retried on a fresh channel until the publish timeout.
    config.intake.publish_timeout_ms = 700;
    let intake = spawn_intake(config).await;
    intake.wait_ready().await;
    assert_eq!(intake.jebbit("jebbit_eu", FIXTURE).await.status, 200);
    let answer = intake.jebbit("jebbit_eu", FIXTURE).await;
    assert_eq!(answer.status, 503, "nacked: {answer:?}");
    assert!(
        intake.metric("segment_bridge_amqp_channel_replacements_total") >= 1.0,
        "a nack replaces the channel"
    );
    assert!(
        answer.body["error"].as_str().unwrap().contains("nack"),
        "{answer:?}"
    );
    // An array of which one element is refused is not answered 2xx either.
    let answer = intake.jebbit("jebbit_eu", b"[{\"a\":1},{\"b\":2}]").await;
    assert_eq!(answer.status, 503, "{answer:?}");

    // The queue is gone: the broker returns the (mandatory) message.
    channel
        .queue_delete(limited.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let answer = intake.jebbit("jebbit_eu", FIXTURE).await;
    assert_eq!(answer.status, 503, "returned: {answer:?}");
    assert!(
        answer.body["error"].as_str().unwrap().contains("returned"),
        "{answer:?}"
    );
    intake.stop().await;
    let _ = conn.close(200, "OK".into()).await;
}

/// A nacked message is published again on a fresh channel within the publish timeout:
/// once the broker takes it, the request is answered 200. Only the refused messages are
/// sent again (no duplicate of an element the broker had confirmed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_message_is_retried_on_a_fresh_channel_and_answered_200_once_taken() {
    let queues = Queues::new("intake-nack-retry").await;
    // Room for two messages, one taken: of a two-element body, the second is refused.
    let limited = format!("{}.limited", queues.main);
    let _cleanup = DeleteOnDrop(limited.clone());
    let (conn, channel) = declare_limited(&limited, 2).await;
    let mut config = intake_config(&queues);
    config.amqp.queue = limited.clone();
    config.intake.publish_timeout_ms = 3000;
    let intake = Arc::new(spawn_intake(config).await);
    intake.wait_ready().await;
    assert_eq!(
        intake.jebbit("jebbit_eu", b"{\"first\":0}").await.status,
        200
    );

    let started = Instant::now();
    let request = {
        let intake = intake.clone();
        tokio::spawn(async move { intake.jebbit("jebbit_eu", b"[{\"a\":1},{\"b\":2}]").await })
    };
    // Refused for a while; then there is room again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!request.is_finished(), "answered before there was room");
    let first = channel
        .basic_get(
            limited.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the first message");
    assert_eq!(first.delivery.data, b"{\"first\":0}");
    let answer = request.await.unwrap();
    assert_eq!(answer.status, 200, "retried until taken: {answer:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(intake.metric("segment_bridge_amqp_channel_replacements_total") >= 1.0);
    let mut bodies = Vec::new();
    while let Some(m) = channel
        .basic_get(
            limited.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        bodies.push(String::from_utf8(m.delivery.data).unwrap());
    }
    assert_eq!(bodies, [r#"{"a":1}"#, r#"{"b":2}"#], "each element once");
    Arc::into_inner(intake).unwrap().stop().await;
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_drops_and_refuses_it_the_intake_reconnects_and_queues_again() {
    let queues = Queues::new("intake-reconnect").await;
    let user = BrokerUser::new().await;
    let mut config = intake_config(&queues);
    config.amqp.url = SecretString::from(user.url());
    let intake = spawn_intake(config).await;
    intake.wait_ready().await;
    assert_eq!(intake.jebbit("jebbit_eu", FIXTURE).await.status, 200);

    user.deny().await;
    assert_eq!(user.close_connections().await, 1, "one connection");
    let done = wait_until(WITHIN, async || intake.probe("/readyz").await.0 == 503).await;
    assert!(done.is_ok(), "it never noticed");
    let answer = intake.jebbit("jebbit_eu", FIXTURE).await;
    assert_eq!(answer.status, 503, "{answer:?}");

    user.allow().await;
    intake.wait_ready().await;
    assert!(intake.metric("segment_bridge_amqp_connections_total") >= 2.0);
    assert_eq!(intake.jebbit("jebbit_eu", FIXTURE).await.status, 200);
    assert_eq!(take_queued(&queues, 2).await.len(), 2);
    intake.stop().await;
}

/// `amqp.url` as a list whose first node is down: the intake connects (to the second) at
/// start-up and again after its connection is closed, whatever order the shuffle picks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_first_of_two_nodes_down_the_intake_connects_and_reconnects_to_the_other() {
    let queues = Queues::new("intake-host-list").await;
    let user = BrokerUser::new().await;
    let mut config = intake_config(&queues);
    config.amqp.url = SecretString::from(format!("{UNREACHABLE},{}", user.url()));
    let intake = spawn_intake(config).await;
    intake.wait_ready().await;
    assert_eq!(intake.jebbit("jebbit_eu", FIXTURE).await.status, 200);

    for round in 0..3 {
        assert_eq!(
            user.close_connections().await,
            1,
            "round {round}: one connection"
        );
        let start = Instant::now();
        while intake.metric("segment_bridge_amqp_connections_total") < f64::from(round + 2) {
            assert!(start.elapsed() < WITHIN, "round {round}: no reconnect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        intake.wait_ready().await;
        assert_eq!(intake.jebbit("jebbit_eu", FIXTURE).await.status, 200);
    }
    assert_eq!(take_queued(&queues, 4).await.len(), 4);
    intake.stop().await;
}

// ---- Hardening -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_limit_are_503_at_once() {
    let queues = Queues::new("intake-concurrency").await;
    let mut config = intake_config(&queues);
    config.intake.max_concurrent_requests = 2;
    let intake = spawn_intake(config).await;
    intake.wait_ready().await;
    // Two requests whose bodies have not all arrived hold both places.
    let mut slow = Vec::new();
    for _ in 0..2 {
        slow.push(start_slow_request(intake.addr, FIXTURE).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let answer = intake.jebbit("jebbit_eu", FIXTURE).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.retry_after.as_deref(), Some("7"));
    assert!(started.elapsed() < Duration::from_millis(500), "at once");
    assert_eq!(intake.requests("-", "unavailable"), 1.0);
    for request in slow {
        let (status, _) = request.finish().await;
        assert_eq!(status, 200);
    }
    assert_eq!(intake.jebbit("jebbit_eu", FIXTURE).await.status, 200);
    assert_eq!(take_queued(&queues, 3).await.len(), 3);
    intake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_with_its_headers_or_its_body_is_cut_off() {
    let queues = Queues::new("intake-slow-client").await;
    let mut config = intake_config(&queues);
    config.intake.header_read_timeout_ms = 300;
    config.intake.body_read_timeout_ms = 300;
    let intake = spawn_intake(config).await;
    intake.wait_ready().await;

    // Half the headers, then nothing: the connection is closed.
    let mut stream = TcpStream::connect(intake.addr).await.unwrap();
    stream
        .write_all(b"POST /webhooks/cta/x HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408, if hyper sends one, then the close
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(250));

    // Headers and part of the body, then nothing: 408.
    let request = start_slow_request(intake.addr, FIXTURE).await;
    let started = Instant::now();
    let (status, _) = request.abandon().await;
    assert_eq!(status, 408);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(intake.requests("jebbit_eu", "timeout"), 1.0);
    assert_eq!(queues.ready().await, (0, 0));
    intake.stop().await;
}

// ---- The whole path --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_reach_segment_as_identify_and_track_through_the_queue_and_the_worker() {
    let queues = Queues::new("intake-e2e").await;
    let us = FakeSegment::ok().await;
    let eu = FakeSegment::ok().await;
    let mut config = intake_config(&queues);
    let worker_config = crate::helpers::config(&queues, Some(&us), Some(&eu));
    config.segment = worker_config.segment.clone();
    let intake = spawn_intake(config.clone()).await;
    let app = spawn_app(config).await;
    intake.wait_ready().await;

    let received = now();
    let answer = intake.jebbit("jebbit_eu", FIXTURE).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = intake
        .post(&format!("/webhooks/cta/{JOTURL_TOKEN}"), LEAD, &[])
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let link = include_bytes!("../fixtures/joturl-tracking-link.json");
    let answer = intake
        .post(&format!("/webhooks/cta/{JOTURL_TOKEN}"), link, &[])
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");

    // The Jebbit source is eu: its session goes to the EU endpoint only.
    let events = eu.wait_accepted(2, WITHIN).await;
    let identify = events.iter().find(|e| e["type"] == "identify").unwrap();
    let track = events.iter().find(|e| e["type"] == "track").unwrap();
    assert_eq!(identify["traits"]["email"], "test@example.com");
    assert_eq!(
        identify["userId"],
        "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
    );
    assert_eq!(track["event"], "Survey Completed");
    assert_eq!(
        track["properties"]["questions"],
        json!({"test_attribute": "attribute_value", "test_sata_attribute": ["option 1", "option 4"], "outcome": "example_outcome"})
    );
    // No completed_at in the body: the time is the intake's receive time.
    let at = time::OffsetDateTime::parse(
        track["timestamp"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    assert!(
        (received..=received + 2).contains(&at),
        "{at} vs {received}"
    );

    // The JotUrl source is us: a Lead Captured there.
    let events = us.wait_accepted(2, WITHIN).await;
    let track = events.iter().find(|e| e["type"] == "track").unwrap();
    assert_eq!(track["event"], "Lead Captured");
    assert_eq!(
        track["properties"],
        json!({"questions": {"name": "John Smith"}, "trafficSource": "JotUrl"})
    );
    assert_eq!(
        track["userId"],
        "8e621e3d0368631d263d07a351fa8d34fba0d17c15fbcdec11a5f58008d022a0"
    );
    app.wait_until("the tracking link is skipped", WITHIN, |a| {
        a.metric(r#"segment_bridge_sessions_total{outcome="skipped_not_a_lead"}"#) == 1.0
    })
    .await;
    assert_eq!(eu.accepted().len(), 2);
    assert_eq!(us.accepted().len(), 2);
    intake.stop().await;
    app.stop().await;
    assert_eq!(queues.ready().await, (0, 0));
}

// ---- The binary: signals, start-up, log lines -------------------------------------------

/// `segment-bridge intake` as a child process, configured by the environment only, with
/// the sources `jebbit_eu` and `cta`; returns it and the address it takes webhooks on.
fn intake_daemon(queues: &Queues, settings: &[(&str, &str)]) -> (Running, SocketAddr) {
    let addr = free_port();
    let base = [
        ("AMQP__URL", AMQP_URL.to_owned()),
        ("AMQP__QUEUE", queues.main.clone()),
        ("AMQP__DEAD_LETTER_QUEUE", queues.dead.clone()),
        ("INTAKE__LISTEN", addr.to_string()),
        ("INTAKE__SOURCES__JEBBIT_EU__KIND", "jebbit".into()),
        ("INTAKE__SOURCES__JEBBIT_EU__REGION", "eu".into()),
        ("INTAKE__SOURCES__JEBBIT_EU__SECRET", JEBBIT_SECRET.into()),
        ("INTAKE__SOURCES__CTA__KIND", "joturl".into()),
        ("INTAKE__SOURCES__CTA__SECRET", JOTURL_TOKEN.into()),
        ("SHUTDOWN__GRACE_PERIOD_S", "5".into()),
    ];
    let mut bridge = bridge("intake", base);
    bridge.probes();
    for (key, value) in settings {
        bridge.set(key, value);
    }
    (bridge.spawn(), addr)
}

/// Waits until the daemon's log has a line containing `needle`; returns that line.
async fn wait_for_log_line(daemon: &Running, needle: &str) -> String {
    eventually_some(
        WITHIN,
        async || {
            let log = daemon.stderr();
            log.lines().find(|l| l.contains(needle)).map(str::to_owned)
        },
        || format!("no {needle:?} in the log:\n{}", daemon.stderr()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intake_logs_its_requests_by_outcome_while_they_come_and_a_total_when_it_stops() {
    let queues = Queues::new("intake-progress").await;
    let (mut daemon, addr) = intake_daemon(&queues, &[("SERVER__PROGRESS_INTERVAL_S", "1")]);
    daemon.wait_ready(WITHIN).await;
    let url = format!("http://{addr}/webhooks/jebbit_eu");
    for (i, secret) in [JEBBIT_SECRET, JEBBIT_SECRET, "not-the-secret"]
        .iter()
        .enumerate()
    {
        let body = format!(r#"{{"session_id":"pr-{i}","data":{{"email":"pr{i}@example.com"}}}}"#);
        http()
            .post(&url)
            .header("x-jebbit-signature", signed(secret, body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
    }

    let progress = wait_for_log_line(&daemon, "Progress in the last 1 s.").await;
    assert!(
        progress.contains("requests=2 queued, 1 unauthorized")
            && progress.contains("messages_queued=2"),
        "{progress}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        daemon.stderr().matches("Progress in the last").count(),
        1,
        "no line while idle:\n{}",
        daemon.stderr()
    );
    daemon.terminate();
    assert!(daemon.wait_exit(WITHIN).await.0.success());
    let stopped = wait_for_log_line(&daemon, "Intake shut down.").await;
    assert!(
        stopped.contains("Since start: 3 requests answered; 2 messages queued."),
        "{stopped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_requests_in_flight_leaves_each_either_2xx_and_queued_or_not_2xx_and_exits_0()
{
    let queues = Queues::new("intake-sigterm").await;
    // The drain delay is long enough for the steps below on a busy machine; each step
    // waits on what it needs (answers, not ready, refused) instead of a fixed time.
    let drain = Duration::from_millis(2000);
    let (mut daemon, addr) = intake_daemon(
        &queues,
        &[("INTAKE__DRAIN_DELAY_MS", &drain.as_millis().to_string())],
    );
    daemon.wait_ready(WITHIN).await;
    // Eight senders, each posting numbered webhooks as fast as it is answered.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for sender in 0..8 {
        let (stop, answered) = (stop.clone(), answered.clone());
        senders.push(tokio::spawn(async move {
            let http = http();
            let mut answers: Vec<(String, Option<u16>)> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("{sender}-{i}");
                let body =
                    format!(r#"{{"session_id":"{id}","data":{{"email":"{id}@example.com"}}}}"#);
                let signature = signed(JEBBIT_SECRET, body.as_bytes());
                let status = http
                    .post(format!("http://{addr}/webhooks/jebbit_eu"))
                    .header("x-jebbit-signature", signature)
                    .body(body)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status().as_u16());
                answers.push((id, status));
                answered.fetch_add(1, Ordering::Relaxed);
                i += 1;
                if status.is_none() {
                    // Refused: the listener is closed. Stop sending.
                    break;
                }
            }
            answers
        }));
    }
    // Enough requests answered that the signal lands among requests in flight.
    eventually("the senders are under way", WITHIN, async || {
        answered.load(Ordering::Relaxed) > 20
    })
    .await;
    // And one whose body is still arriving when the signal comes.
    let slow_body = br#"{"session_id":"slow","data":{"email":"slow@example.com"}}"#;
    let slow = start_slow_request(addr, slow_body).await;

    let signalled = daemon.terminate();
    // Not ready, yet still answering during the drain delay.
    eventually("not ready after SIGTERM", WITHIN, async || {
        daemon.get("/readyz").await.is_some_and(|r| r.0 == 503)
    })
    .await;
    let late = r#"{"session_id":"late","data":{"email":"late@example.com"}}"#;
    let answer = http()
        .post(format!("http://{addr}/webhooks/jebbit_eu"))
        .header("x-jebbit-signature", signed(JEBBIT_SECRET, late.as_bytes()))
        .body(late)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "not answered during the drain delay ({:?} after the signal): {e}",
                signalled.elapsed()
            )
        });
    assert_eq!(answer.status(), 200, "answered during the drain delay");
    // The drain delay is over once new connections are refused.
    eventually("the listener is closed", WITHIN, async || {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    let (slow_status, _) = slow.finish().await;
    assert_eq!(slow_status, 200, "the request under way was finished");
    stop.store(true, Ordering::Relaxed);

    let (status, _) = daemon.wait_exit(Duration::from_secs(10)).await;
    let log = daemon.stderr();
    assert_eq!(status.code(), Some(0), "exit code 0 after SIGTERM:\n{log}");
    assert!(signalled.elapsed() < Duration::from_secs(7), "{log}");

    let mut answers: Vec<(String, Option<u16>)> = Vec::new();
    for sender in senders {
        answers.extend(sender.await.unwrap());
    }
    answers.push(("slow".into(), Some(slow_status)));
    answers.push(("late".into(), Some(200)));
    let queued: BTreeMap<String, usize> = queues
        .take_main()
        .await
        .iter()
        .map(|(body, _)| {
            let v: Value = serde_json::from_slice(body).unwrap();
            v["session_id"].as_str().unwrap().to_owned()
        })
        .fold(BTreeMap::new(), |mut m, id| {
            *m.entry(id).or_default() += 1;
            m
        });
    let ok: BTreeSet<&str> = answers
        .iter()
        .filter(|(_, s)| s.is_some_and(|s| (200..300).contains(&s)))
        .map(|(id, _)| id.as_str())
        .collect();
    assert!(ok.len() > 20, "only {} requests answered 2xx", ok.len());
    let lost: Vec<&&str> = ok.iter().filter(|id| !queued.contains_key(**id)).collect();
    assert!(
        lost.is_empty(),
        "answered 2xx but not queued: {lost:?}\n{log}"
    );
    assert!(
        answers.iter().all(|(_, s)| s.is_none_or(|s| s == 200)),
        "only 200s or no answer: {:?}",
        answers
            .iter()
            .filter(|(_, s)| *s != Some(200))
            .collect::<Vec<_>>()
    );
    assert!(
        log.contains("Every request under way was answered"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_webhooks_are_logged_with_source_and_reason_never_a_signature_secret_or_token() {
    let queues = Queues::new("intake-log").await;
    let (mut daemon, addr) = intake_daemon(&queues, &[]);
    daemon.wait_ready(WITHIN).await;
    let http = http();
    let url = |path: &str| format!("http://{addr}{path}");
    let stale = sign(JEBBIT_SECRET.as_bytes(), now() - 1000, FIXTURE);
    let wrong = sign(b"guessed", now(), FIXTURE);
    for signature in [&stale, &wrong] {
        let r = http
            .post(url("/webhooks/jebbit_eu"))
            .header("x-jebbit-signature", signature.as_str())
            .body(FIXTURE.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = http
        .post(url("/webhooks/cta/guessed-token"))
        .body(LEAD.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(url(&format!("/webhooks/cta/{JOTURL_TOKEN}")))
        .body(LEAD.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, metrics) = daemon.get("/metrics").await.unwrap();
    daemon.terminate();
    assert_eq!(daemon.wait_exit(WITHIN).await.0.code(), Some(0));
    let log = daemon.stderr();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Webhook refused"))
        .collect();
    assert_eq!(refused.len(), 3, "one line per refusal:\n{log}");
    assert!(
        refused[0].contains("jebbit_eu") && refused[0].contains("stale"),
        "{log}"
    );
    assert!(
        refused[1].contains("jebbit_eu") && refused[1].contains("mismatch"),
        "{log}"
    );
    assert!(
        refused[2].contains("cta") && refused[2].contains("token"),
        "{log}"
    );
    for secret in [
        JEBBIT_SECRET,
        JOTURL_TOKEN,
        "guessed-token",
        stale.split_once("v1=").unwrap().1,
        wrong.split_once("v1=").unwrap().1,
    ] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
        assert!(!metrics.contains(secret), "{secret:?} in the metrics");
    }
    assert!(
        metrics
            .contains(r#"segment_bridge_intake_requests_total{source="cta",outcome="queued"} 1"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intake_refuses_to_start_with_a_source_without_secret_and_names_it() {
    let queues = Queues::new("intake-no-secret").await;
    let (mut daemon, addr) = intake_daemon(
        &queues,
        &[
            ("INTAKE__SOURCES__JEBBIT_US__KIND", "jebbit"),
            ("INTAKE__SOURCES__CTA__SECRET", ""),
        ],
    );
    let (status, _) = daemon.wait_exit(WITHIN).await;
    let log = daemon.stderr();
    assert_ne!(status.code(), Some(0), "{log}");
    assert!(log.contains("jebbit_us") || log.contains("cta"), "{log}");
    assert!(log.contains("SECRET"), "{log}");
    assert!(!log.contains(JEBBIT_SECRET), "{log}");
    // Nothing was served.
    assert!(TcpStream::connect(addr).await.is_err());
}

// ---- Clients that misbehave, and a broker that stops answering ------------------------

/// A signed request to `jebbit_eu` whose headers and first half of the body were sent.
struct SlowRequest {
    stream: TcpStream,
    rest: Vec<u8>,
}

async fn start_slow_request(addr: SocketAddr, body: &[u8]) -> SlowRequest {
    let signature = signed(JEBBIT_SECRET, body);
    let head = format!(
        "POST /webhooks/jebbit_eu HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-jebbit-signature: {signature}\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let half = body.len() / 2;
    stream.write_all(&body[..half]).await.unwrap();
    SlowRequest {
        stream,
        rest: body[half..].to_vec(),
    }
}

impl SlowRequest {
    /// Sends the rest of the body and reads the answer.
    async fn finish(mut self) -> (u16, String) {
        self.stream.write_all(&self.rest).await.unwrap();
        read_response(&mut self.stream)
            .await
            .expect("an answer to the slow request")
    }

    /// Sends nothing more and reads the answer.
    async fn abandon(mut self) -> (u16, String) {
        read_response(&mut self.stream)
            .await
            .expect("an answer to the abandoned request")
    }
}

/// Reads one HTTP/1.1 response with a `content-length`; `None` if the connection closed
/// first.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(WITHIN, stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((
        status,
        String::from_utf8_lossy(&buf[header_end..]).into_owned(),
    ))
}

/// Deletes a queue of the test's own when dropped, even when the test panicked (as
/// `Queues` does for its two).
/// Declares `queue` (durable) to hold at most `max_length` messages and to refuse (nack)
/// publishes beyond; the connection and channel that declared it.
async fn declare_limited(queue: &str, max_length: i32) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(max_length));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    declare_durable(&channel, queue, args).await.unwrap();
    (conn, channel)
}

struct DeleteOnDrop(String);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        delete_queues(vec![self.0.clone()]);
    }
}

/// A TCP proxy to the broker whose broker-to-client direction can be paused: publishes
/// still reach the broker, its confirms do not come back.
struct Proxy {
    addr: SocketAddr,
    paused: Arc<AtomicBool>,
    _task: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let paused = Arc::new(AtomicBool::new(false));
        let flag = paused.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = TcpStream::connect(target).await else {
                    continue;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut broker_rx, mut broker_tx) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut broker_tx).await;
                });
                let flag = flag.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        if flag.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                        let n = match broker_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        // What arrived while paused waits too.
                        while flag.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Proxy {
            addr,
            paused,
            _task: task,
        }
    }

    fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }
}
