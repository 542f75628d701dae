//! The worker run in-process for a test, started as the binary starts it
//! ([`WorkerApp`]): its configuration for the test's queues and fake Segments, its probes
//! and metrics, and a stop that checks it settled everything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use segment_bridge::app::{AppError, Stopped, WorkerApp};
use segment_bridge::config::Config;
use segment_bridge::health::Health;
use segment_bridge::metrics::Metrics;

use crate::broker::{AMQP_URL, Queues};
use crate::eventually::eventually;
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
