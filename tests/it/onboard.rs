//! Onboarding (`segment-bridge jebbit …`, `segment-bridge joturl token`), end to end: the
//! binary against the fake Jebbit API, the intake running in-process with the secret the
//! binary handed over, the worker delivering to the fake Segment. Every run's output is
//! checked for secrets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde_json::Value;

use segment_bridge::config::Config;

use crate::fake_jebbit::{self, FakeJebbit};
use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_segment-bridge");
const WITHIN: Duration = Duration::from_secs(20);
const LEAD: &[u8] = include_bytes!("../fixtures/joturl-form-lead.json");

/// One command's exit status and output.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    fn ok(self) -> Run {
        assert!(self.status.success(), "{:?}: {}", self.status, self.text());
        self
    }

    fn failed(self) -> Run {
        assert!(!self.status.success(), "it succeeded: {}", self.text());
        self
    }

    /// Asserts that standard output holds `want`.
    #[track_caller]
    fn out_has(&self, want: &str) {
        self.expect(self.stdout.contains(want), want);
    }

    /// Asserts that standard output starts with `want`.
    #[track_caller]
    fn out_starts(&self, want: &str) {
        self.expect(self.stdout.starts_with(want), want);
    }

    /// Asserts that standard error holds `want`.
    #[track_caller]
    fn err_has(&self, want: &str) {
        self.expect(self.stderr.contains(want), want);
    }

    #[track_caller]
    fn expect(&self, found: bool, want: &str) {
        assert!(found, "{want:?} not where expected in:\n{}", self.text());
    }
}

/// A working directory with a configuration (the test's queues, a Jebbit source
/// `jebbit_eu` of region eu, a JotUrl source `cta`, the fake's URLs), the fake Jebbit API
/// and the intake's two ports, chosen before the intake starts (connect needs its URL).
struct Onboarding {
    dir: tempfile::TempDir,
    fake: FakeJebbit,
    queues: Queues,
    intake: SocketAddr,
    probes: SocketAddr,
    /// Every output of the binary, for the final secret check.
    outputs: Vec<String>,
    env: Vec<(String, String)>,
}

impl Onboarding {
    async fn new(test: &str, options: fake_jebbit::Options) -> Onboarding {
        let fake = FakeJebbit::start(options).await;
        let queues = Queues::new(test).await;
        let (intake, probes) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            r#"[amqp]
url = "{AMQP_URL}"
queue = "{main}"
dead_letter_queue = "{dead}"

[server]
listen = "{probes}"

[intake]
listen = "{intake}"

[intake.sources.jebbit_eu]
kind = "jebbit"
region = "eu"

[intake.sources.cta]
kind = "joturl"
region = "us"

[jebbit]
api_url = "{url}"
auth_url = "{url}"
"#,
            main = queues.main,
            dead = queues.dead,
            url = fake.url(),
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let o = fake.options();
        let env = vec![
            ("JEBBIT_CLIENT_ID".to_owned(), o.client_id.clone()),
            ("JEBBIT_CLIENT_SECRET".to_owned(), o.client_secret.clone()),
        ];
        Onboarding {
            dir,
            fake,
            queues,
            intake,
            probes,
            outputs: Vec::new(),
            env,
        }
    }

    fn public_url(&self) -> String {
        format!("http://{}", self.intake)
    }

    fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.probes)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Runs the binary in the working directory (which holds `config.toml`), with the
    /// Jebbit credentials in the environment and nothing inherited that could configure it.
    /// `jebbit connect --source jebbit_eu --public-url <the intake's URL>` and `extra`.
    async fn connect(&mut self, extra: &[&str]) -> Run {
        let public = self.public_url();
        let mut args = vec!["jebbit", "connect", "--source", "jebbit_eu", "--public-url"];
        args.push(&public);
        args.extend_from_slice(extra);
        self.run(&args).await
    }

    /// `jebbit test --source jebbit_eu`, reading the intake's metrics, waiting `within`
    /// seconds.
    async fn jebbit_test(&mut self, within: &str) -> Run {
        let metrics = self.metrics_url();
        let args = ["jebbit", "test", "--source", "jebbit_eu", "--metrics-url"];
        self.run(&[&args[..], &[&metrics, "--within", within]].concat())
            .await
    }

    async fn run(&mut self, args: &[&str]) -> Run {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(args).current_dir(self.dir.path());
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("SEGMENT_BRIDGE") || k.starts_with("JEBBIT_") || k == "RUST_LOG" {
                cmd.env_remove(&key);
            }
        }
        // The most verbose logs: a secret must not reach them either.
        cmd.env("RUST_LOG", "debug");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Off the runtime: the fake API and the intake answer it from this process.
        let output = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        let run = Run {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        self.outputs.push(run.text());
        run
    }

    /// The configuration the intake runs with: the file, plus the sources' secrets as the
    /// environment would give them.
    fn config(&self, secrets: &[(&str, &str)]) -> Config {
        let env = secrets
            .iter()
            .map(|(source, secret)| {
                (
                    format!(
                        "SEGMENT_BRIDGE__INTAKE__SOURCES__{}__SECRET",
                        source.to_uppercase()
                    ),
                    secret.to_string(),
                )
            })
            .collect();
        Config::load(Some(&self.path("config.toml")), Some(env)).unwrap()
    }

    /// Starts the intake in this process on the chosen ports.
    async fn spawn_intake(&self, secrets: &[(&str, &str)]) -> Intake {
        let intake = start_intake(self.config(secrets), WITHIN).await;
        assert_eq!(intake.addr, self.intake);
        intake.wait_ready().await;
        intake
    }

    /// No output of the binary holds a secret: a `shared_secret`, a token Jebbit issued,
    /// the client secret, or a JotUrl token (`allowed`: where it was printed on purpose).
    fn assert_no_secret(&self, joturl_tokens: &[&str], allowed: &[usize]) {
        let mut secrets = self.fake.secrets();
        secrets.extend(self.fake.tokens());
        secrets.push(self.fake.options().client_secret.clone());
        for (i, output) in self.outputs.iter().enumerate() {
            for s in &secrets {
                assert!(
                    !output.contains(s.as_str()),
                    "run {i} shows a secret:\n{output}"
                );
            }
            if !allowed.contains(&i) {
                for t in joturl_tokens {
                    assert!(
                        !output.contains(t),
                        "run {i} shows the JotUrl token:\n{output}"
                    );
                }
            }
        }
    }
}

/// A fake Jebbit whose token covers several businesses.
fn multi_business() -> fake_jebbit::Options {
    fake_jebbit::Options {
        multi_business: true,
        ..Default::default()
    }
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn session_ids(events: &[Value]) -> std::collections::BTreeSet<String> {
    events
        .iter()
        .filter(|e| e["type"] == "track")
        .filter_map(|e| e["properties"]["surveySessionId"].as_str())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_test_and_backfill_deliver_every_session_and_print_no_secret() {
    let mut o = Onboarding::new(
        "onboard_e2e",
        // The token covers several businesses: every call must name one.
        multi_business(),
    )
    .await;
    let business = o.fake.options().business_id.clone();
    o.set_env("JEBBIT_BUSINESS_ID", &business);
    let public = o.public_url();

    let whoami = o.run(&["jebbit", "whoami"]).await.ok();
    whoami.out_has(&business);

    // Connect: the integration posts to the source's URL, with its region; the secret is
    // in a 0600 file, and the output says what to do next.
    let connected = o.connect(&[]).await.ok();
    let text = connected.text();
    let endpoint = format!("{public}/webhooks/jebbit_eu");
    for want in [
        "created for intake source `jebbit_eu`",
        "region eu",
        &endpoint,
        "jebbit_eu.secret (mode 0600)",
        "SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__SECRET",
        "jebbit test --source jebbit_eu",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    let integrations = o.fake.integrations();
    assert_eq!(integrations.len(), 1);
    let a = &integrations[0]["attributes"];
    assert_eq!(a["endpoint"], endpoint.as_str());
    assert_eq!(a["region"], "eu");
    assert_eq!(a["service_name"], "webhooks_standard");
    assert_eq!(a["additional_options"]["hash_pii"], false);
    assert_eq!(a["include_mapped_attributes"], true);
    let secret_file = o.path("jebbit_eu.secret");
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert_eq!(vec![secret.clone()], o.fake.secrets());
    assert_eq!(secret.len(), 34);
    assert_eq!(mode(&secret_file), 0o600);

    // Connecting again updates the same integration and keeps the secret.
    let again = o.connect(&[]).await.ok();
    assert!(again.text().contains("updated"), "{}", again.text());
    assert_eq!(o.fake.integrations().len(), 1);
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);

    // JotUrl: a token in a 0600 file, and the URL to paste (which holds it).
    let joturl = o
        .run(&[
            "joturl",
            "token",
            "--source",
            "cta",
            "--public-url",
            &public,
        ])
        .await
        .ok();
    let token_file = o.path("cta.secret");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.len(), 43);
    assert_eq!(mode(&token_file), 0o600);
    let lead_url = format!("{public}/webhooks/cta/{token}");
    assert_eq!(joturl.stdout, format!("{lead_url}\n"), "the URL alone");
    assert!(joturl.text().contains("Set webhook"), "{}", joturl.text());
    let joturl_run = o.outputs.len() - 1;

    // The intake, holding the handed-over secrets: the test submission is verified.
    let intake = o
        .spawn_intake(&[("jebbit_eu", &secret), ("cta", &token)])
        .await;
    let test = o.jebbit_test("15").await.ok();
    test.out_starts("verified");
    let sent = o.fake.sent();
    assert!(
        sent.iter().any(|s| s.test
            && s.status == Some(200)
            && s.endpoint == endpoint
            && !s.body.is_empty()),
        "{sent:?}"
    );

    // Backfill: every past session reaches Segment, and so does a JotUrl lead.
    let us = FakeSegment::ok().await;
    let app = spawn_app(config(&o.queues, Some(&us), Some(&us))).await;
    let backfill = o
        .run(&["jebbit", "backfill", "--source", "jebbit_eu"])
        .await
        .ok();
    let backfill_id = backfill
        .stdout
        .strip_prefix("backfill ")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no backfill id in {}", backfill.text()))
        .to_owned();
    let lead = reqwest::Client::new()
        .post(&lead_url)
        .header("content-type", "application/json")
        .body(LEAD)
        .send()
        .await
        .unwrap();
    assert_eq!(lead.status(), 200);
    let n = o.fake.options().backfill_sessions;
    let events = us.wait_accepted(2 * n + 2, WITHIN).await;
    let want: std::collections::BTreeSet<String> = (0..n)
        .map(|i| format!("backfill-{backfill_id}-{i}"))
        .collect();
    assert_eq!(session_ids(&events), want);
    assert!(
        events.iter().any(|e| e["event"] == "Lead Captured"),
        "no lead among {events:?}"
    );
    let start = Instant::now();
    loop {
        let status = o
            .run(&["jebbit", "backfill-status", "--id", &backfill_id])
            .await
            .ok();
        if status.stdout.contains(": completed") {
            break;
        }
        assert!(start.elapsed() < WITHIN, "{}", status.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One token per process, reused for all its calls (connect makes two).
    assert_eq!(o.fake.token_requests(), o.outputs.len() - 1);
    assert!(o.fake.api_requests() > o.fake.token_requests());
    o.assert_no_secret(&[&token], &[joturl_run]);
    app.stop().await;
    intake.stop().await;
}

#[tokio::test]
async fn a_wrong_client_secret_a_missing_scope_and_a_refused_region_are_each_one_clear_line() {
    let mut o = Onboarding::new(
        "onboard_refusals",
        fake_jebbit::Options {
            scopes: vec!["read:business".into(), "read:integration".into()],
            ..Default::default()
        },
    )
    .await;

    // Missing scope: reading works, creating does not.
    o.run(&["jebbit", "list"]).await.ok();
    let refused = o.connect(&[]).await.failed();
    refused.err_has("lack the scope `write:integration`");

    // A wrong client secret.
    let wrong = format!("wrong-{}", fake_jebbit::random_string(20));
    o.set_env("JEBBIT_CLIENT_SECRET", &wrong);
    let denied = o.run(&["jebbit", "whoami"]).await.failed();
    denied.err_has(
        "refused the client credentials (401): check JEBBIT_CLIENT_ID and JEBBIT_CLIENT_SECRET",
    );
    assert!(!denied.text().contains(&wrong), "{}", denied.text());
    assert_eq!(denied.status.code(), Some(1), "a failure at Jebbit");
    let missing = o.fake.options().client_secret.clone();
    o.set_env("JEBBIT_CLIENT_SECRET", &missing);

    // A token covering several businesses, without the business header.
    let mut multi = Onboarding::new("onboard_business", multi_business()).await;
    let unnamed = multi.run(&["jebbit", "list"]).await.failed();
    unnamed.err_has("JEBBIT_BUSINESS_ID");
    multi.assert_no_secret(&[], &[]);

    // A region Jebbit refuses, with Jebbit's own words; no secret file appears.
    let mut full = Onboarding::new("onboard_region", fake_jebbit::Options::default()).await;
    let region = full.connect(&["--region", "apac"]).await.failed();
    region.err_has("(400): region must be a valid region (us|eu).");
    assert!(!full.path("jebbit_eu.secret").exists());

    // A secret file that cannot be written: refused before Jebbit creates anything.
    let nowhere = full.path("no-such-directory/jebbit_eu.secret");
    let unwritable = full
        .connect(&["--secret-file", nowhere.to_str().unwrap()])
        .await
        .failed();
    unwritable.err_has("cannot write the secret to");
    assert!(full.fake.integrations().is_empty());

    // 5xx answers are retried with backoff.
    full.fake.fail_next(2);
    full.run(&["jebbit", "list"]).await.ok();
    full.assert_no_secret(&[], &[]);
    o.assert_no_secret(&[], &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_submission_that_never_arrives_or_does_not_verify_is_reported_as_such() {
    let mut o = Onboarding::new("onboard_unverified", fake_jebbit::Options::default()).await;
    o.connect(&["--secret-file", "handed-over"]).await.ok();
    assert_eq!(mode(&o.path("handed-over")), 0o600);

    // The intake is down.
    let down = o.jebbit_test("3").await.failed();
    down.out_starts("never arrived");
    down.out_has("not running");

    // The intake holds another secret.
    let other = format!("another-secret-{}", fake_jebbit::random_string(20));
    let intake = o
        .spawn_intake(&[("jebbit_eu", &other), ("cta", "some-joturl-token")])
        .await;
    let wrong = o.jebbit_test("3").await.failed();
    wrong.out_starts("arrived but the signature did not verify");
    wrong.out_has("SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__SECRET");
    intake.stop().await;
    o.assert_no_secret(&[], &[]);
}

#[tokio::test]
async fn a_kubernetes_secret_is_printed_only_when_asked_and_integrations_can_be_switched_off_and_deleted()
 {
    let mut o = Onboarding::new("onboard_k8s", fake_jebbit::Options::default()).await;
    let manifest = o.connect(&["--k8s-secret", "sb-jebbit-eu"]).await.ok();
    let secret = o.fake.secrets().remove(0);
    assert!(
        manifest
            .stdout
            .starts_with("apiVersion: v1\nkind: Secret\n"),
        "the manifest alone on standard output: {}",
        manifest.stdout
    );
    assert!(
        manifest.stdout.contains(&format!(
            "SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__SECRET: \"{secret}\""
        )),
        "{}",
        manifest.stdout
    );
    assert!(!manifest.stderr.contains(&secret));
    assert!(!o.path("jebbit_eu.secret").exists());
    o.outputs.pop(); // It printed the secret because it was asked to.

    let off = o
        .run(&["jebbit", "deactivate", "--source", "jebbit_eu"])
        .await
        .ok();
    off.out_has("active=false");
    let list = o.run(&["jebbit", "list"]).await.ok();
    list.out_has("active=false");
    let id = o.fake.integrations()[0]["id"].as_str().unwrap().to_owned();
    o.run(&["jebbit", "delete", "--id", &id]).await.ok();
    assert!(o.fake.integrations().is_empty());
    let gone = o
        .run(&["jebbit", "test", "--source", "jebbit_eu"])
        .await
        .failed();
    gone.err_has("jebbit connect --source jebbit_eu");
    assert_eq!(gone.status.code(), Some(2), "a usage error");
    o.assert_no_secret(&[], &[]);
}

/// The README's onboarding block, pasted into bash as it stands, with the fake standing in
/// for Jebbit: only the placeholders (credentials, public URL), the ports (free ones
/// instead of the defaults) and `cargo run` (the binary under test) are replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_onboarding_works_when_pasted_against_the_fake_api() {
    let fake = FakeJebbit::start(fake_jebbit::Options::default()).await;
    let queues = Queues::new("onboard_readme").await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("\n## Onboarding\n")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("\n```").next())
        .expect("a sh block in the README's Onboarding section");
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples"),
        dir.path().join("examples"),
    )
    .unwrap();
    let (intake, probes, worker) = (free_port(), free_port(), free_port());
    let o = fake.options();
    // The README's own paths first: the binary's path may itself lie under /tmp.
    let script = block
        .replace("/tmp/", &format!("{}/", dir.path().display()))
        .replace("cargo run --release -q --", BIN)
        .replace("'your client id'", &o.client_id)
        .replace("'your client secret'", &o.client_secret)
        .replace("https://intake.example.com", &format!("http://{intake}"))
        .replace("127.0.0.1:9464", &probes.to_string())
        .replace("127.0.0.1:9465", &worker.to_string());
    // A failing step must not leave the background intake holding the output pipe open.
    let script = format!("trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{script}");
    let mut cmd = std::process::Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path());
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("SEGMENT_BRIDGE") || k.starts_with("JEBBIT_") || k == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    for (k, v) in [
        ("JEBBIT_API_URL", fake.url()),
        ("JEBBIT_AUTH_URL", fake.url()),
        ("SEGMENT_BRIDGE__AMQP__URL", AMQP_URL.to_owned()),
        ("SEGMENT_BRIDGE__AMQP__QUEUE", queues.main.clone()),
        (
            "SEGMENT_BRIDGE__AMQP__DEAD_LETTER_QUEUE",
            queues.dead.clone(),
        ),
        ("SEGMENT_BRIDGE__INTAKE__LISTEN", intake.to_string()),
        ("SEGMENT_BRIDGE__SERVER__LISTEN", probes.to_string()),
    ] {
        cmd.env(k, v);
    }
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("\nverified: "), "{text}");
    let batches = std::fs::read_to_string(dir.path().join("onboarding-batches.jsonl")).unwrap();
    assert!(batches.contains("Lead Captured"), "{batches}");
    let token = std::fs::read_to_string(dir.path().join("cta.secret")).unwrap();
    let mut secrets = fake.secrets();
    secrets.extend(fake.tokens());
    secrets.extend([o.client_secret.clone(), token]);
    assert_eq!(
        secrets.len(),
        5,
        "a shared secret, two Jebbit tokens (connect, test), two more"
    );
    for s in secrets {
        assert!(!text.contains(&s), "a secret on the terminal:\n{text}");
    }
}

#[tokio::test]
async fn a_token_is_reused_until_shortly_before_it_expires() {
    let fake = FakeJebbit::start(fake_jebbit::Options {
        expires_in: 2,
        ..Default::default()
    })
    .await;
    let o = fake.options();
    let config = Config::default();
    let settings = segment_bridge::onboard::settings(&config, |name| match name {
        "JEBBIT_CLIENT_ID" => Some(o.client_id.clone()),
        "JEBBIT_CLIENT_SECRET" => Some(o.client_secret.clone()),
        "JEBBIT_API_URL" | "JEBBIT_AUTH_URL" => Some(fake.url()),
        _ => None,
    })
    .unwrap();
    let client = segment_bridge::onboard::jebbit::Client::new(settings).unwrap();
    for _ in 0..3 {
        client.business().await.unwrap();
    }
    client.integrations().await.unwrap();
    assert_eq!(fake.token_requests(), 1, "one token for four calls");
    // 90% of its 2 s life.
    tokio::time::sleep(Duration::from_millis(1850)).await;
    client.business().await.unwrap();
    assert_eq!(fake.token_requests(), 2, "renewed before it ran out");
    assert_eq!(fake.api_requests(), 5);
}
