//! The operator's commands, run as the real binary: `publish`, `replay-dead`, `check`
//! (and `check --offline`),
//! `preview`, `run --dry-run`, and `run` without a write key.
//!
//! Each run gets an empty working directory (so the repository's `config.toml` is not
//! read) and is configured by the environment, or by a file the test writes. Children are
//! killed when a test fails or times out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use base64::Engine;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::helpers::*;

/// Nothing listens on port 1: a command that needs the broker fails at once.
const UNREACHABLE: &str = "amqp://guest:guest@127.0.0.1:1/%2f";
const WITHIN: Duration = Duration::from_secs(15);
const ERROR_HEADER: &str = "x-segment-bridge-error";

/// One invocation of the binary, configured by the environment, in an empty directory:
/// the local broker, a side port on any free port, a short flush interval.
fn tool(args: &[&str]) -> Bridge {
    let mut bridge = Bridge::new(BIN, args);
    bridge
        .set("AMQP__URL", AMQP_URL)
        .set("SERVER__LISTEN", "127.0.0.1:0")
        .set("SEGMENT__FLUSH_INTERVAL_MS", "50");
    bridge
}

/// Waits until a line of standard error contains `needle`; returns that line.
fn wait_for_stderr(running: &Running, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let stderr = running.stderr();
        if let Some(line) = stderr.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on stderr within {within:?}:\n{stderr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every number written in `text`, e.g. the counts of a report.
fn numbers(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn headers(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert(k.into(), v);
    }
    table
}

/// The properties but the headers (as Debug text), and the headers (none = empty).
fn split_properties(p: &BasicProperties) -> (String, BTreeMap<String, AMQPValue>) {
    let headers = p
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let rest = p.clone().with_headers(FieldTable::default());
    (format!("{rest:?}"), headers)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

// publish ------------------------------------------------------------------------------

#[tokio::test]
async fn publish_puts_every_non_blank_line_on_the_queue_byte_for_byte_as_a_persistent_message() {
    let queues = Queues::new("tools-publish").await;
    let webhook = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/jebbit-webhook-test-submission.json"
    ))
    .unwrap();
    let webhook = webhook.trim_ascii_end().to_vec();
    let lines: Vec<Vec<u8>> = vec![
        session("pub1", "us").into_bytes(),
        b"not json: the worker judges that, not publish".to_vec(),
        "  {\"session_id\":\"pub3\",\"email\":\"Zo\u{eb}@Example.com\"}\t"
            .as_bytes()
            .to_vec(),
        webhook,
    ];
    let mut file = Vec::new();
    file.extend_from_slice(&lines[0]);
    file.extend_from_slice(b"\n\n");
    file.extend_from_slice(&lines[1]);
    file.extend_from_slice(b"\n   \t\n");
    file.extend_from_slice(&lines[2]);
    file.extend_from_slice(b"\n\n");
    file.extend_from_slice(&lines[3]); // the last line has no newline
    // A line that is not JSON is published only when asked for.
    let mut bridge = tool(&["publish", "--allow-invalid", "sessions.jsonl"]);
    bridge.queues(&queues);
    std::fs::write(bridge.path("sessions.jsonl"), &file).unwrap();

    let out = bridge.output(b"", WITHIN).await;

    assert!(out.status.success(), "{out:?}");
    let report = out.stdout.replace(&queues.main, "QUEUE");
    let counts = numbers(&report);
    assert!(
        counts.contains(&4) && counts.iter().all(|&n| n <= 4),
        "stdout reports the 4 published: {report:?}"
    );
    let got = queues.take_main().await;
    let bodies: Vec<&Vec<u8>> = got.iter().map(|(b, _)| b).collect();
    assert_eq!(
        bodies,
        lines.iter().collect::<Vec<_>>(),
        "each non-blank line, unchanged and in order"
    );
    for (body, props) in &got {
        assert_eq!(
            *props.delivery_mode(),
            Some(2),
            "persistent: {}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(queues.ready().await, (0, 0));
}

#[tokio::test]
async fn publish_of_a_missing_file_fails_naming_the_file_and_publishes_nothing() {
    let queues = Queues::new("tools-publish-missing").await;
    let mut bridge = tool(&["publish", "no-such-sessions.jsonl"]);
    bridge.queues(&queues);

    let out = bridge.output(b"", WITHIN).await;

    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("no-such-sessions.jsonl"),
        "the message names the file: {out:?}"
    );
    assert_eq!(queues.ready().await, (0, 0));
}

#[tokio::test]
async fn publish_refuses_a_file_with_a_line_that_is_not_a_json_object_naming_the_line_and_publishes_nothing()
 {
    let queues = Queues::new("tools-publish-invalid").await;
    // A pretty-printed session, as a newcomer might paste it: valid JSON, but not one
    // object per line.
    let file = format!(
        "{}\n\n{{\n  \"session_id\": \"pretty\",\n  \"email\": \"a@b.c\"\n}}\n",
        session("inv-1", "us")
    );
    let mut bridge = tool(&["publish", "sessions.jsonl"]);
    bridge.queues(&queues);
    std::fs::write(bridge.path("sessions.jsonl"), &file).unwrap();

    let out = bridge.output(b"", WITHIN).await;

    assert_eq!(out.status.code(), Some(2), "a usage error: {out:?}");
    assert!(
        out.stderr
            .contains("sessions.jsonl line 3 is not a JSON object"),
        "names the first bad line, counting blank ones: {out:?}"
    );
    assert!(
        out.stderr.contains("3 later lines are not either")
            && out.stderr.contains("--allow-invalid"),
        "{out:?}"
    );
    assert_eq!(queues.ready().await, (0, 0), "not even the good first line");
}

#[tokio::test]
async fn publish_to_an_unreachable_broker_says_host_and_port_once_and_exits_3() {
    let mut bridge = tool(&["publish", "sessions.jsonl"]);
    bridge.set("AMQP__URL", "amqp://guest:pw-3c9e1f@127.0.0.1:1/%2f");
    std::fs::write(bridge.path("sessions.jsonl"), session("unr-1", "us")).unwrap();

    let out = bridge.output(b"", WITHIN).await;

    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        out.stderr.contains("cannot reach RabbitMQ at 127.0.0.1:1"),
        "{out:?}"
    );
    assert_eq!(
        out.stderr.matches("Connection refused").count(),
        1,
        "the cause once, not once per error in its chain: {out:?}"
    );
    assert!(!out.both().contains("pw-3c9e1f"), "{out:?}");
    assert!(
        !out.stderr.contains('\x1b'),
        "no colour codes when standard error is not a terminal: {out:?}"
    );
}

// replay-dead --------------------------------------------------------------------------

#[tokio::test]
async fn replay_dead_moves_dead_letters_back_unchanged_but_for_the_error_header() {
    let queues = Queues::new("tools-replay").await;
    let reason = || AMQPValue::LongString("`email` is not an email address".into());
    let full = BasicProperties::default()
        .with_message_id("m-1".into())
        .with_app_id("jebbit-relay".into())
        .with_content_type("application/json".into())
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_type("session".into())
        .with_delivery_mode(2)
        .with_priority(3)
        .with_timestamp(1_615_507_200)
        .with_headers(headers(vec![
            (ERROR_HEADER, reason()),
            ("trace-id", AMQPValue::LongString("trace-1".into())),
            ("attempt", AMQPValue::LongInt(3)),
        ]));
    // The error header is its only header: none may be left, or an empty table.
    let only_reason = BasicProperties::default()
        .with_message_id("m-2".into())
        .with_delivery_mode(2)
        .with_timestamp(1_615_507_201)
        .with_headers(headers(vec![(ERROR_HEADER, reason())]));
    // Dead-lettered by hand, without a reason: moved as it is.
    let bare = BasicProperties::default().with_message_id("m-3".into());
    let dead = vec![
        (b"{\"session_id\":\"r1\",\"email\":\"nope\"}".to_vec(), full),
        (b"not json \xff\x00 at all".to_vec(), only_reason),
        (b"{\"session_id\":\"r3\"}".to_vec(), bare),
    ];
    put(&queues.dead, &dead).await;
    queues.wait_ready((0, 3), WITHIN).await;
    let mut bridge = tool(&["replay-dead"]);
    bridge.queues(&queues);

    let out = bridge.output(b"", WITHIN).await;

    assert!(out.status.success(), "{out:?}");
    let report = out
        .stdout
        .replace(&queues.dead, "DEAD")
        .replace(&queues.main, "MAIN");
    assert!(
        numbers(&report).contains(&3),
        "stdout reports the 3 moved: {report:?}"
    );
    assert_eq!(
        queues.ready().await,
        (3, 0),
        "the dead-letter queue is empty"
    );
    let moved = queues.take_main().await;
    assert_eq!(moved.len(), 3);
    for ((body, want), (got_body, got)) in dead.iter().zip(&moved) {
        assert_eq!(got_body, body, "body unchanged, order kept");
        let (want_rest, mut want_headers) = split_properties(want);
        want_headers.remove(ERROR_HEADER);
        let (got_rest, got_headers) = split_properties(got);
        assert_eq!(got_rest, want_rest, "properties unchanged");
        assert_eq!(got_headers, want_headers, "only the error header is gone");
        assert!(
            segment_bridge::amqp::headers::error_header(got).is_none(),
            "{got:?}"
        );
    }
}

#[tokio::test]
async fn replay_dead_with_a_limit_moves_exactly_that_many_oldest_first() {
    let queues = Queues::new("tools-replay-limit").await;
    let dead: Vec<(Vec<u8>, BasicProperties)> = (0..5)
        .map(|i| {
            (
                format!("{{\"session_id\":\"d{i}\"}}").into_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers(vec![(
                        ERROR_HEADER,
                        AMQPValue::LongString("a reason".into()),
                    )])),
            )
        })
        .collect();
    put(&queues.dead, &dead).await;
    queues.wait_ready((0, 5), WITHIN).await;
    let mut bridge = tool(&["replay-dead", "--limit", "2"]);
    bridge.queues(&queues);

    let out = bridge.output(b"", WITHIN).await;

    assert!(out.status.success(), "{out:?}");
    assert_eq!(queues.ready().await, (2, 3), "exactly 2 moved: {out:?}");
    let moved: Vec<Vec<u8>> = queues
        .take_main()
        .await
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert_eq!(moved, vec![dead[0].0.clone(), dead[1].0.clone()]);
    let report = out
        .stdout
        .replace(&queues.dead, "DEAD")
        .replace(&queues.main, "MAIN");
    assert!(
        numbers(&report).contains(&2) && !numbers(&report).contains(&5),
        "stdout reports the 2 moved: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_worker_dead_lettered_is_replayed_with_its_original_body_and_dead_lettered_once_again()
 {
    let queues = Queues::new("tools-replay-roundtrip").await;
    let us = FakeSegment::ok().await;
    let body = br#"{"session_id":"rt-1","email":"not-an-address"}"#;
    let props = BasicProperties::default()
        .with_message_id("rt-m".into())
        .with_delivery_mode(2)
        .with_headers(headers(vec![(
            "trace-id",
            AMQPValue::LongString("rt-trace".into()),
        )]));
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    queues.publish_with(body, props.clone()).await;
    queues.wait_ready((0, 1), WITHIN).await;
    app.stop().await;

    let mut bridge = tool(&["replay-dead"]);
    bridge.queues(&queues);
    let out = bridge.output(b"", WITHIN).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(queues.ready().await, (1, 0), "{out:?}");
    let (got_body, got) = queues.take_main().await.pop().unwrap();
    assert_eq!(got_body, body);
    assert_eq!(split_properties(&got), split_properties(&props));

    // Nothing was fixed: the worker dead-letters it again, once, with one reason.
    queues.publish_with(&got_body, got).await;
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    queues.wait_ready((0, 1), WITHIN).await;
    app.stop().await;
    let dead = queues.take_dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, body);
    assert!(error_header(&dead[0].1).contains("email"));
    assert!(us.requests().is_empty(), "nothing of it reached Segment");
}

// check --------------------------------------------------------------------------------

/// The line of `check`'s report about a region, found by the region's name as a word.
fn region_line<'a>(report: &'a str, region: &str) -> &'a str {
    report
        .lines()
        .find(|l| {
            l.split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w.eq_ignore_ascii_case(region))
        })
        .unwrap_or_else(|| panic!("the report names region {region}: {report}"))
}

#[tokio::test]
async fn check_passes_with_a_write_key_and_a_reachable_broker_names_both_regions_and_hides_the_key()
{
    let queues = Queues::new("tools-check").await;
    let key = "wk-check-7f3a9c51d2";
    let mut bridge = tool(&["check", "--config", "bridge.toml"]);
    std::fs::write(
        bridge.path("bridge.toml"),
        format!(
            "[amqp]\nqueue = \"{}\"\ndead_letter_queue = \"{}\"\ndeclare = false\n\n\
             [segment.us]\nendpoint = \"http://127.0.0.1:9/v1/batch\"\n",
            queues.main, queues.dead
        ),
    )
    .unwrap();
    bridge.set("SEGMENT__US__WRITE_KEY", key);

    let out = bridge.output(b"", WITHIN).await;

    assert!(out.status.success(), "{out:?}");
    let report = out
        .stdout
        .replace(&queues.main, "MAIN")
        .replace(&queues.dead, "DEAD");
    let us_line = region_line(&report, "us");
    let eu_line = region_line(&report, "eu");
    assert_ne!(us_line, eu_line, "one line per region: {report}");
    assert!(
        !us_line.contains("no write key") && us_line.contains("key"),
        "us has a key: {us_line}"
    );
    assert!(eu_line.contains("no write key"), "eu has none: {eu_line}");
    assert!(
        !out.both().contains(key),
        "the key is never printed: {out:?}"
    );
    assert!(!out.both().contains("7f3a9c51d2"), "{out:?}");
}

#[tokio::test]
async fn check_fails_on_an_invalid_value_naming_the_key() {
    let queues = Queues::new("tools-check-invalid").await;
    let mut bridge = tool(&["check"]);
    bridge
        .queues(&queues)
        .region("us", "http://127.0.0.1:9/v1/batch", "wk-invalid")
        .set("SEGMENT__MAX_BATCH_EVENTS", "5000");

    let out = bridge.output(b"", WITHIN).await;

    assert_eq!(out.status.code(), Some(2), "a configuration error: {out:?}");
    assert!(
        out.both().contains("segment.max_batch_events"),
        "the message names the key: {out:?}"
    );
    assert!(!out.both().contains("wk-invalid"), "{out:?}");
}

#[tokio::test]
async fn check_fails_when_the_broker_is_unreachable_without_printing_its_password() {
    let mut bridge = tool(&["check"]);
    bridge
        .set("AMQP__URL", "amqp://guest:pw-5e1d0a@127.0.0.1:1/%2f")
        .region("us", "http://127.0.0.1:9/v1/batch", "wk-unreachable");

    let out = bridge.output(b"", WITHIN).await;

    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.took < Duration::from_secs(12), "{out:?}");
    assert!(
        out.stdout.contains("broker: unreachable at 127.0.0.1:1"),
        "says what failed, and where: {out:?}"
    );
    assert!(
        !out.both().contains("pw-5e1d0a") && !out.both().contains("wk-unreachable"),
        "{out:?}"
    );
}

#[tokio::test]
async fn check_tells_a_refused_login_from_an_unreachable_broker() {
    let mut bridge = tool(&["check"]);
    let wrong = AMQP_URL.replacen("guest:guest@", "guest:wrong-pw-8d2b@", 1);
    assert_ne!(wrong, AMQP_URL, "the test broker's URL names guest:guest");
    bridge
        .set("AMQP__URL", &wrong)
        .region("us", "http://127.0.0.1:9/v1/batch", "wk-refused");

    let out = bridge.output(b"", WITHIN).await;

    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        out.stdout
            .contains("broker: login refused at 127.0.0.1:5672"),
        "{out:?}"
    );
    assert!(!out.stdout.contains("unreachable"), "{out:?}");
    assert!(
        out.stderr
            .contains("check the user, password and vhost in amqp.url"),
        "says what to do: {out:?}"
    );
    assert!(
        !out.both().contains("wrong-pw-8d2b") && !out.both().contains("wk-refused"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_write_key_with_a_trailing_newline_is_refused_naming_the_key_not_the_value() {
    let mut bridge = tool(&["check"]);
    bridge.region("eu", "http://127.0.0.1:9/v1/batch", "wk-newline-41ab\n");

    let out = bridge.output(b"", WITHIN).await;

    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains("segment.eu.write_key has white space at its start or end"),
        "{out:?}"
    );
    assert!(!out.both().contains("wk-newline-41ab"), "{out:?}");
}

#[tokio::test]
async fn a_variable_one_underscore_short_of_an_override_is_warned_about_by_name_only() {
    let mut bridge = tool(&["preview"]);
    bridge
        .set("AMQP__URL", UNREACHABLE)
        .env("SEGMENT_BRIDGE_SEGMENT__US__WRITE_KEY", "wk-misspelt-93c1")
        .env("SEGMENT_BRIDGE_SERVICE_HOST", "10.0.0.1");

    let out = bridge.output(b"", WITHIN).await;

    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("SEGMENT_BRIDGE_SEGMENT__US__WRITE_KEY")
            && out.stderr.contains("not read"),
        "{out:?}"
    );
    assert!(
        !out.stderr.contains("SEGMENT_BRIDGE_SERVICE_HOST"),
        "Kubernetes' own variables are left alone: {out:?}"
    );
    assert!(!out.both().contains("wk-misspelt-93c1"), "{out:?}");
}

#[tokio::test]
async fn check_works_with_no_config_file_when_the_environment_holds_the_queues_and_a_write_key() {
    let queues = Queues::new("tools-check-nofile").await;
    let mut bridge = tool(&["check"]);
    // What an operator sets: the broker, the queues, and one region's write key. The
    // endpoint is left at its default.
    bridge
        .queues(&queues)
        .set("AMQP__DECLARE", "false")
        .set("SEGMENT__EU__WRITE_KEY", "wk-env-only");
    assert!(!bridge.path("config.toml").exists());

    let out = bridge.output(b"", WITHIN).await;

    assert!(out.status.success(), "{out:?}");
    let report = out
        .stdout
        .replace(&queues.main, "MAIN")
        .replace(&queues.dead, "DEAD");
    assert!(
        !region_line(&report, "eu").contains("no write key"),
        "{report}"
    );
    assert!(
        region_line(&report, "us").contains("no write key"),
        "{report}"
    );
    assert!(!out.both().contains("wk-env-only"), "{out:?}");
}

// check --offline -----------------------------------------------------------------------

#[tokio::test]
async fn check_offline_refuses_batch_limits_that_run_refuses_naming_the_key() {
    // Both are below what one session (two events) needs; a copy of the rules elsewhere
    // once accepted them.
    for key in ["max_batch_events", "max_batch_bytes"] {
        let mut bridge = tool(&["check", "--offline", "--config", "bridge.toml"]);
        std::fs::write(
            bridge.path("bridge.toml"),
            format!("[segment]\n{key} = 1\n\n[segment.us]\nwrite_key = \"wk-offline-bad\"\n"),
        )
        .unwrap();
        bridge.set("AMQP__URL", UNREACHABLE);

        let out = bridge.output(b"", WITHIN).await;

        assert!(!out.status.success(), "{key} = 1 is refused: {out:?}");
        assert!(
            out.both().contains(&format!("segment.{key}")),
            "the message names the key: {out:?}"
        );
        assert!(!out.both().contains("wk-offline-bad"), "{out:?}");
    }
}

#[tokio::test]
async fn check_offline_passes_a_good_file_without_a_broker_and_reports_regions_and_sources() {
    let mut bridge = tool(&["check", "--offline", "--config", "bridge.toml"]);
    std::fs::write(
        bridge.path("bridge.toml"),
        format!(
            "[amqp]\nurl = \"{UNREACHABLE}\"\n\n[segment.eu]\nwrite_key = \"wk-offline-3c9e\"\n\n\
             [intake.sources.jebbit_eu]\nkind = \"jebbit\"\nregion = \"eu\"\n\n\
             [intake.sources.cta]\nkind = \"joturl\"\n"
        ),
    )
    .unwrap();
    // The file's URL, whose port nothing listens on, not the harness's broker.
    bridge.env_remove("SEGMENT_BRIDGE__AMQP__URL");
    bridge
        .set("INTAKE__SOURCES__JEBBIT_EU__SECRET", "sec-offline-71d2")
        .set("INTAKE__SOURCES__CTA__SECRET", "tok-offline-88a0");

    let out = bridge.output(b"", WITHIN).await;

    assert!(out.status.success(), "{out:?}");
    assert!(out.took < Duration::from_secs(5), "no broker wait: {out:?}");
    assert!(out.stdout.contains("not contacted"), "{out:?}");
    assert!(region_line(&out.stdout, "us").contains("no write key"));
    assert!(!region_line(&out.stdout, "eu").contains("no write key"));
    assert!(
        out.stdout
            .contains("source jebbit_eu: jebbit, region eu, secret set"),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains("source cta: joturl, region us, secret set"),
        "{out:?}"
    );
    for secret in ["wk-offline-3c9e", "sec-offline-71d2", "tok-offline-88a0"] {
        assert!(!out.both().contains(secret), "{out:?}");
    }
}

#[tokio::test]
async fn check_offline_refuses_a_source_without_its_secret_naming_the_source() {
    let mut bridge = tool(&["check", "--offline"]);
    bridge
        .set("AMQP__URL", UNREACHABLE)
        .set("SEGMENT__US__WRITE_KEY", "wk-offline-src")
        .set("INTAKE__SOURCES__JEBBIT_US__KIND", "jebbit");

    let out = bridge.output(b"", WITHIN).await;

    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.both()
            .contains("SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_US__SECRET"),
        "names the missing env: {out:?}"
    );
}

// preview ------------------------------------------------------------------------------

#[tokio::test]
async fn preview_prints_one_line_per_session_with_its_events_skip_or_error_without_a_broker() {
    let webhook = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/jebbit-webhook-test-submission.json"
    ))
    .unwrap();
    let input = format!(
        "{}\n{}\n\nthis is not json\n{}\n",
        webhook.trim(),
        session("pv-1", "eu"),
        r#"{"session_id":"pv-no-email","opt_in":true}"#,
    );
    let mut bridge = tool(&["preview"]);
    bridge.set("AMQP__URL", UNREACHABLE);

    let out = bridge.output(input.as_bytes(), WITHIN).await;

    assert!(out.status.success(), "exit 0 even with a bad line: {out:?}");
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 5, "one line per input line: {out:?}");

    let events = lines[0]["events"].as_array().expect("the webhook's events");
    let hash = "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["type"], "identify");
    assert_eq!(events[0]["userId"], hash);
    assert_eq!(events[0]["traits"]["test_attribute"], "attribute_value");
    assert_eq!(events[1]["type"], "track");
    assert_eq!(events[1]["event"], "Survey Completed");
    assert!(lines[0].get("error").is_none(), "{}", lines[0]);

    let events = lines[1]["events"].as_array().expect("the session's events");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["userId"], sha256_hex("pv-1@example.com"));
    assert_eq!(events[1]["properties"]["surveySessionId"], "pv-1");
    assert_eq!(events[1]["timestamp"], "2021-03-12T00:00:00.000Z");

    assert!(
        lines[2]["error"].is_string() && lines[2].get("events").is_none(),
        "the blank line has nothing to preview: {}",
        lines[2]
    );
    assert!(
        lines[3]["error"]
            .as_str()
            .is_some_and(|e| e.contains("JSON")),
        "the bad line's error: {}",
        lines[3]
    );
    assert!(lines[3].get("events").is_none());
    assert!(
        lines[4]["skipped"]
            .as_str()
            .is_some_and(|s| s.contains("email")),
        "{}",
        lines[4]
    );
    assert!(lines[4].get("events").is_none() && lines[4].get("error").is_none());
}

#[tokio::test]
async fn preview_reports_a_line_that_is_not_utf8_as_an_error_and_goes_on_with_the_next() {
    let mut input = Vec::new();
    input.extend_from_slice(session("u8-1", "us").as_bytes());
    // A Latin-1 export: "café" with é as the single byte 0xE9.
    input.extend_from_slice(b"\n{\"session_id\":\"latin1\",\"email\":\"caf\xe9@example.com\"}\n");
    input.extend_from_slice(session("u8-3", "us").as_bytes());
    input.push(b'\n');
    let mut bridge = tool(&["preview"]);
    bridge.set("AMQP__URL", UNREACHABLE);

    let out = bridge.output(&input, WITHIN).await;

    assert!(out.status.success(), "exit 0 even with a bad line: {out:?}");
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one line per input line: {out:?}");
    assert!(lines[0]["events"].is_array(), "{}", lines[0]);
    assert!(lines[1]["error"].is_string(), "{}", lines[1]);
    assert_eq!(
        lines[2]["events"][1]["properties"]["surveySessionId"],
        "u8-3"
    );
}

// run ----------------------------------------------------------------------------------

/// Reads `run --dry-run` batches until every one of `sessions` has had its track event
/// printed; returns the batches.
fn read_batches(running: &mut Running, sessions: &[&str]) -> Vec<Value> {
    let deadline = Instant::now() + WITHIN;
    let mut batches = Vec::new();
    let mut tracked = BTreeSet::new();
    while !sessions.iter().all(|s| tracked.contains(*s)) {
        let Some(line) = running.next_line(deadline) else {
            panic!(
                "stdout had batches for {tracked:?}, not all of {sessions:?}; stderr:\n{}",
                running.stderr()
            );
        };
        let batch: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("a stdout line that is not a batch ({e}): {line:?}"));
        for e in batch["batch"].as_array().into_iter().flatten() {
            if let Some(id) = e["properties"]["surveySessionId"].as_str() {
                tracked.insert(id.to_owned());
            }
        }
        batches.push(batch);
    }
    batches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_dry_run_prints_each_batch_as_a_json_line_acknowledges_and_exits_0_on_sigterm() {
    let queues = Queues::new("tools-dry-run").await;
    let ids = ["dr-1", "dr-2", "dr-3"];
    queues
        .publish([
            session(ids[0], "us"),
            session(ids[1], "eu"),
            session(ids[2], "non-eu"),
        ])
        .await;
    let mut bridge = tool(&["run", "--dry-run"]);
    bridge
        .queues(&queues)
        .set("SERVER__PROGRESS_INTERVAL_S", "1");
    let mut running = bridge.spawn();

    let batches = tokio::task::block_in_place(|| read_batches(&mut running, &ids));

    let mut events = Vec::new();
    for batch in &batches {
        let keys: BTreeSet<&str> = batch
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["batch", "region", "sentAt"]),
            "{batch}"
        );
        let sent_at = batch["sentAt"].as_str().expect("sentAt");
        assert!(sent_at.ends_with('Z') && sent_at.contains('T'), "{sent_at}");
        // dr-2 is for the EU; dr-1 and dr-3 (no known region) for the US.
        for e in batch["batch"].as_array().unwrap() {
            let want = if e["userId"] == sha256_hex("dr-2@example.com") {
                "eu"
            } else {
                "us"
            };
            assert_eq!(batch["region"], want, "{batch}");
        }
        events.extend(batch["batch"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(
        events.len(),
        6,
        "an identify and a track per session: {events:?}"
    );
    for id in ids {
        let user = sha256_hex(&format!("{id}@example.com"));
        let mine: Vec<&Value> = events.iter().filter(|e| e["userId"] == user).collect();
        let kinds: BTreeSet<&str> = mine.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            BTreeSet::from(["identify", "track"]),
            "{id}: {mine:?}"
        );
        assert!(
            mine.iter()
                .any(|e| e["properties"]["surveySessionId"] == id)
        );
    }

    // A progress line while work flows; then none while idle.
    let progress = wait_for_stderr(&running, "Progress in the last 1 s.", WITHIN);
    assert!(
        progress.contains("delivered=3")
            && progress.contains("events_us=4")
            && progress.contains("events_eu=2")
            && progress.contains("held=0"),
        "{progress}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        running.stderr().matches("Progress in the last").count(),
        1,
        "no line while idle: {}",
        running.stderr()
    );
    running.terminate();
    let status = tokio::task::block_in_place(|| running.wait(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", running.stderr());
    assert!(
        running.stderr().contains(
            "Since start: 3 sessions written out (dry run) and acknowledged, 0 handed back to the queue, 0 left unacknowledged to the broker"
        ),
        "the shutdown line counts: {}",
        running.stderr()
    );
    // Had the deliveries not been acknowledged, closing the connection would have put
    // them back.
    assert_eq!(queues.ready().await, (0, 0), "the queue is drained");
    let stdout = running.stdout_all();
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("only batches on stdout ({e}): {line:?}"));
        assert!(v["batch"].is_array(), "{line}");
    }
    assert!(!running.stderr().trim().is_empty(), "logs go to stderr");
}

#[tokio::test]
async fn run_without_a_write_key_or_dry_run_refuses_to_start_and_says_why() {
    let queues = Queues::new("tools-run-no-key").await;
    queues.publish([session("nk-1", "us")]).await;
    let mut bridge = tool(&["run"]);
    bridge.queues(&queues);

    let out = bridge.output(b"", WITHIN).await;

    assert_eq!(out.status.code(), Some(2), "a configuration error: {out:?}");
    assert!(out.took < Duration::from_secs(5), "quickly: {out:?}");
    assert!(out.stderr.contains("no write key"), "{out:?}");
    assert!(out.stderr.contains("--dry-run"), "{out:?}");
    assert!(out.stdout.trim().is_empty(), "{out:?}");
    assert_eq!(queues.ready().await, (1, 0), "nothing consumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_json_log_format_every_stderr_line_of_run_is_a_json_object() {
    let queues = Queues::new("tools-json-logs").await;
    queues.publish([session("jl-1", "us")]).await;
    let mut bridge = tool(&["run", "--dry-run"]);
    bridge
        .queues(&queues)
        .env("SEGMENT_BRIDGE_LOG_FORMAT", "json");
    let mut running = bridge.spawn();

    tokio::task::block_in_place(|| read_batches(&mut running, &["jl-1"]));
    running.terminate();
    let status = tokio::task::block_in_place(|| running.wait(Duration::from_secs(10)));

    let stderr = running.stderr();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() >= 2,
        "start-up and shut-down are logged: {stderr}"
    );
    for line in lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a stderr line that is not JSON ({e}): {line:?}"));
        assert!(v.is_object(), "{line}");
    }
    assert_eq!(queues.ready().await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_never_prints_or_logs_the_write_key_even_at_debug_level() {
    let queues = Queues::new("tools-run-secret").await;
    let us = FakeSegment::ok().await;
    let key = "wk-run-9b8e77a0c4";
    queues.publish([session("sk-1", "us")]).await;
    let mut bridge = tool(&["run"]);
    bridge
        .queues(&queues)
        .region("us", &us.url(), key)
        .env("RUST_LOG", "debug");
    let mut running = bridge.spawn();

    us.wait_accepted(2, WITHIN).await;
    assert_eq!(
        us.requests()[0].auth.as_deref(),
        Some(format!("{key}:").as_str()),
        "the key was used"
    );
    queues.wait_ready((0, 0), WITHIN).await;
    running.terminate();
    let status = tokio::task::block_in_place(|| running.wait(Duration::from_secs(10)));

    let (stdout, stderr) = (running.stdout_all(), running.stderr());
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(!stderr.trim().is_empty());
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
    for text in [&stdout, &stderr] {
        assert!(!text.contains(key), "the key leaked:\n{text}");
        assert!(!text.contains("9b8e77a0c4"), "the key leaked:\n{text}");
        assert!(
            !text.contains(&basic),
            "the Basic credentials leaked:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_segment_unreachable_the_cause_is_logged_and_the_shutdown_line_says_it_handed_back() {
    let queues = Queues::new("tools-run-unreachable").await;
    queues.publish([session("ur-1", "us")]).await;
    let mut bridge = tool(&["run"]);
    bridge.queues(&queues).region(
        "us",
        "http://127.0.0.1:1/v1/batch",
        "wk-unreachable-segment",
    );
    let mut running = bridge.spawn();

    let retry = tokio::task::block_in_place(|| {
        wait_for_stderr(&running, "Segment did not take the batch", WITHIN)
    });
    assert!(
        retry.contains("status=transport") && retry.contains("Connection refused"),
        "the transport failure's cause, on the same line: {retry}"
    );
    running.terminate();
    let status = tokio::task::block_in_place(|| running.wait(Duration::from_secs(20)));
    let stderr = running.stderr();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains(
            "Since start: 0 sessions sent to Segment and acknowledged, 1 handed back to the queue, 0 left unacknowledged to the broker"
        ),
        "the shutdown line tells what happened: {stderr}"
    );
    assert!(!stderr.contains("every held delivery"), "{stderr}");
    assert_eq!(
        queues.ready().await,
        (1, 0),
        "the session is back on the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_dry_run_keeps_each_batch_on_a_line_of_its_own_while_both_regions_print() {
    let queues = Queues::new("tools-dry-run-both").await;
    let ids: Vec<String> = (0..600).map(|i| format!("both-{i:03}")).collect();
    queues
        .publish(
            ids.iter()
                .enumerate()
                .map(|(i, id)| session(id, ["us", "eu"][i % 2])),
        )
        .await;
    let mut bridge = tool(&["run", "--dry-run"]);
    bridge
        .queues(&queues)
        .set("SEGMENT__MAX_BATCH_EVENTS", "2")
        .set("SEGMENT__MAX_IN_FLIGHT", "8");
    let mut running = bridge.spawn();

    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let batches = tokio::task::block_in_place(|| read_batches(&mut running, &id_refs));

    assert!(
        batches
            .iter()
            .all(|b| b["batch"].as_array().unwrap().len() == 2)
    );
    running.terminate();
    let status = tokio::task::block_in_place(|| running.wait(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", running.stderr());
    for line in running.stdout_all().lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "a line that is not one batch: {line:?}"
        );
    }
    assert_eq!(queues.ready().await, (0, 0));
}
