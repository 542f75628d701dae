//! The worker and the intake run in-process for a test, started as the binary starts them
//! ([`WorkerApp`], [`IntakeApp`]): the worker's configuration for the test's queues and
//! fake Segments, their probes and metrics, the intake's requests, and stops that check
//! they settled everything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use lapin::BasicProperties;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use segment_bridge::app::{AppError, IntakeApp, Stopped, WorkerApp};
use segment_bridge::config::Config;
use segment_bridge::health::Health;
use segment_bridge::intake::metrics::IntakeMetrics;
use segment_bridge::metrics::Metrics;

use crate::broker::{AMQP_URL, Queues};
use crate::eventually::{eventually, wait_until};
use crate::segment::{EU_KEY, FakeSegment, US_KEY};

/// A configuration for the test's queues and fake Segments, with short timers.
pub fn config(queues: &Queues, us: Option<&FakeSegment>, eu: Option<&FakeSegment>) -> Config {
    let mut env: HashMap<String, String> = HashMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(format!("SEGMENT_BRIDGE__{k}"), v);
    };
    set("AMQP__URL", AMQP_URL.into());
    set("AMQP__QUEUE", queues.main.clone());
    set("AMQP__DEAD_LETTER_QUEUE", queues.dead.clone());
    set("AMQP__PREFETCH", "200".into());
    set("SEGMENT__FLUSH_INTERVAL_MS", "50".into());
    set("RETRY__INITIAL_BACKOFF_MS", "10".into());
    set("RETRY__MAX_BACKOFF_MS", "200".into());
    set("SERVER__LISTEN", "127.0.0.1:0".into());
    if let Some(us) = us {
        set("SEGMENT__US__ENDPOINT", us.url());
        set("SEGMENT__US__WRITE_KEY", US_KEY.into());
    }
    if let Some(eu) = eu {
        set("SEGMENT__EU__ENDPOINT", eu.url());
        set("SEGMENT__EU__WRITE_KEY", EU_KEY.into());
    }
    let dir = tempfile::tempdir().unwrap();
    Config::load(Some(&write_empty(&dir)), Some(env)).unwrap()
}

fn write_empty(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "").unwrap();
    path
}

/// A worker running in this process, with its side port, built and run as the binary
/// does ([`WorkerApp`]).
pub struct App {
    /// `shutdown.grace_period_s`: `stop` fails if the worker takes longer, as the binary
    /// would exit then, leaving its deliveries to the broker.
    pub grace: Duration,
    pub shutdown: CancellationToken,
    pub worker: JoinHandle<Result<Stopped, AppError>>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub probes: String,
}

pub async fn spawn_app(config: Config) -> App {
    let grace = config.grace_period();
    let app = WorkerApp::build(config, false).await.unwrap();
    let probes = format!("http://{}", app.probes_addr());
    let (health, metrics) = (app.health(), app.metrics());
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(app.run(shutdown.clone()));
    App {
        grace,
        shutdown,
        worker,
        health,
        metrics,
        probes,
    }
}

/// A worker for `queues` whose Segment (us) is down until the returned switch is set;
/// it holds each delivery at most `max_hold_s` before handing it back.
pub async fn spawn_app_segment_down(
    queues: &Queues,
    max_hold_s: u64,
) -> (App, FakeSegment, Arc<AtomicBool>) {
    let (us, up) = FakeSegment::down_until_up().await;
    let mut config = config(queues, Some(&us), None);
    config.retry.max_hold_s = max_hold_s;
    (spawn_app(config).await, us, up)
}

impl App {
    /// Shuts the worker down as SIGTERM would, and waits for it: it must have settled
    /// everything within the grace period.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let within = self.grace + Duration::from_millis(500);
        let stopped = tokio::time::timeout(within, self.worker)
            .await
            .unwrap_or_else(|_| panic!("the worker did not stop within {within:?}"))
            .unwrap()
            .unwrap();
        assert_eq!(
            stopped,
            Stopped::Drained,
            "the worker did not settle everything within its grace period ({:?})",
            self.grace
        );
    }

    /// GETs a probe path; returns the status and body.
    pub async fn probe(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("{}{path}", self.probes))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The value of one metric series, e.g. `segment_bridge_sessions_total{outcome="delivered"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics.render(), series)
    }

    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        mut cond: impl FnMut(&App) -> bool,
    ) {
        eventually(what, within, async || cond(self)).await;
    }
}

/// An intake running in this process, with its side port.
pub struct Intake {
    pub addr: SocketAddr,
    pub probes: String,
    pub metrics: Arc<IntakeMetrics>,
    /// How long `wait_ready` and `stop` wait.
    within: Duration,
    shutdown: CancellationToken,
    task: JoinHandle<Result<Stopped, AppError>>,
    http: reqwest::Client,
}

/// What the intake answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Value,
}

/// Starts the intake with `config` as it is (its listen addresses too); `within` bounds
/// the waits for it to be ready and to stop.
pub async fn start_intake(config: Config, within: Duration) -> Intake {
    let app = IntakeApp::build(config).await.unwrap();
    let shutdown = CancellationToken::new();
    Intake {
        addr: app.addr(),
        probes: format!("http://{}", app.probes_addr()),
        metrics: app.metrics(),
        within,
        shutdown: shutdown.clone(),
        task: tokio::spawn(app.run(shutdown)),
        // rustls needs its crypto provider installed first: the service's client does.
        http: segment_bridge::segment::http_client(Duration::from_secs(20)).unwrap(),
    }
}

impl Intake {
    /// POSTs a JSON `body` to `path` with `headers`.
    pub async fn post(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Answer {
        let mut request = self
            .http
            .post(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = response.text().await.unwrap();
        Answer {
            status,
            retry_after,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    /// GETs a probe path; returns the status and body.
    pub async fn probe(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.probes))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn wait_ready(&self) {
        let done = wait_until(self.within, async || self.probe("/readyz").await.0 == 200).await;
        assert!(done.is_ok(), "the intake did not become ready");
    }

    /// The value of one metric series of the intake's.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics.render(), series)
    }

    /// The requests `source` answered with `outcome`, as the intake counts them.
    pub fn requests(&self, source: &str, outcome: &str) -> f64 {
        self.metric(&format!(
            r#"segment_bridge_intake_requests_total{{source="{source}",outcome="{outcome}"}}"#
        ))
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(self.within, self.task)
            .await
            .expect("the intake stops")
            .unwrap()
            .unwrap();
    }
}

/// Reads one series out of a Prometheus text exposition; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The `x-segment-bridge-error` header of a dead-lettered message.
pub fn error_header(properties: &BasicProperties) -> String {
    segment_bridge::amqp::headers::error_header(properties)
        .expect("an x-segment-bridge-error header")
}
