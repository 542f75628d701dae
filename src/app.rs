//! Building and running each program: [`WorkerApp`] (`segment-bridge run`) and
//! [`IntakeApp`] (`segment-bridge intake`).
//!
//! This is the one start-up path. `main.rs`, the integration tests and the benchmarks all
//! build a program here and run it with a shutdown token, so that what they test and
//! measure is wired exactly as what runs in production. `build` does every check that
//! must pass before anything is served (a write key, the intake's sources, the ports), so
//! that a program that cannot work refuses to start instead of running half-way; `run`
//! serves until the token is cancelled, then drains within the grace period and says how
//! that ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::domain::Region;
use crate::health::{self, Health};
use crate::intake::metrics::{IntakeMetrics, IntakeTotals};
use crate::intake::{self, IntakeHealth, IntakeProbes};
use crate::metrics::{Metrics, WorkerTotals};
use crate::worker::{Worker, WorkerError};

/// The process's exit codes: one per class of failure, so that a script or an init
/// system can tell "fix what you gave it" from "try again later" (docs/operating.md).
pub mod exit {
    /// Done; for `run` and `intake`, stopped by a signal (whether or not the grace
    /// period was enough).
    pub const OK: u8 = 0;
    /// Something failed while running: messages the broker did not confirm, an error
    /// from the broker after connecting, a program that stopped by itself.
    pub const FAILED: u8 = 1;
    /// What the program was given is wrong: the command line, the configuration (an
    /// invalid value, no write key, no intake source, a port it cannot listen on), or the
    /// input file of `publish`; `check` when it finds such a problem.
    pub const USAGE: u8 = 2;
    /// RabbitMQ cannot be reached, or refused the login (`publish`, `replay-dead`,
    /// `check`).
    pub const BROKER: u8 = 3;
}

/// Why a program could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "no write key is configured for either region: set SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY and/or SEGMENT_BRIDGE__SEGMENT__EU__WRITE_KEY (or segment.us/eu.write_key in the config file), or try the mapping with `run --dry-run`"
    )]
    NoWriteKey,
    #[error("cannot listen on {key} = {addr}: {source}")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("the program's task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl AppError {
    /// The process's exit code for this failure (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) | AppError::NoWriteKey | AppError::Listen { .. } => exit::USAGE,
            AppError::Worker(_) | AppError::Task(_) => exit::FAILED,
        }
    }
}

/// How a program's shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Everything under way finished within the grace period.
    Drained,
    /// The grace period ran out first; what was not finished is left to the broker (the
    /// worker's unacknowledged deliveries are redelivered) or to the senders (a webhook
    /// not answered 2xx is sent again).
    GraceRanOut,
}

/// The tokio runtime of the worker and of the operator commands: one thread (tokio's
/// current-thread scheduler).
///
/// Measured on the 2-core development machine with the broker beside it (docs,
/// Performance): lapin reads and parses frames on an I/O thread of its own whatever the
/// runtime, and the pipeline's own work is one consuming task (parse, map, batch) with a
/// sender task per region and the acker, all of it short. With worker threads, each
/// hand-over between those tasks was a cross-thread wake-up (futex, epoll), and the worker
/// spent a sixth of its CPU parking and unparking threads; on one thread the hops are
/// local, parking fell from 2.8 to 1.1 µs per session, and the CPU per session by about
/// 15% at the same throughput. A pod that has more cores runs more replicas (KEDA scales
/// on the queue length) rather than more threads in one.
pub fn worker_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The tokio runtime of the intake: one thread (tokio's current-thread scheduler), like
/// the worker's.
///
/// Measured on the 2-core development machine (docs, Performance, "The intake's runtime"),
/// current-thread, multi-thread with one worker and multi-thread with two (the former
/// default here) alternating: current-thread used the least CPU per request at 100 and
/// at 1,000 requests/s, two threads the most (cross-thread wake-ups for every request at
/// a low rate). Under CPU quotas of 250m, 500m and 1 CPU (docs, "In a pod of 250m, 500m
/// and 1 CPU"), two worker threads cost 20–25% more CPU per request at 1,000/s in every
/// size, and served fewer requests at saturation under 250m and 500m; more load is met
/// with more replicas.
///
/// `SEGMENT_BRIDGE_INTAKE_THREADS` overrides the flavour: `current` (or `0`) for the
/// current-thread scheduler, a number N for the multi-thread one with N worker threads.
pub fn intake_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    intake_runtime_for(
        std::env::var("SEGMENT_BRIDGE_INTAKE_THREADS")
            .ok()
            .as_deref(),
    )
}

/// [`intake_runtime`] for a given value of `SEGMENT_BRIDGE_INTAKE_THREADS`.
fn intake_runtime_for(threads: Option<&str>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads.map(str::trim) {
        None | Some("" | "current" | "0") => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let n: usize = n.parse().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "SEGMENT_BRIDGE_INTAKE_THREADS must be `current` or a number of threads, not {n:?}"
                    ),
                )
            })?;
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Listen { key, addr, source })
}

/// The worker, built and checked, with its side port bound.
pub struct WorkerApp {
    config: Arc<Config>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    probes: TcpListener,
    dry_run: bool,
}

impl WorkerApp {
    /// Checks that the worker can do its job (a write key for at least one region, unless
    /// `dry_run`) and binds `server.listen`.
    pub async fn build(config: Config, dry_run: bool) -> Result<WorkerApp, AppError> {
        if !dry_run && !Region::ALL.iter().any(|r| config.has_write_key(*r)) {
            return Err(AppError::NoWriteKey);
        }
        let probes = bind("server.listen", config.server.listen).await?;
        Ok(WorkerApp {
            config: Arc::new(config),
            health: Arc::new(Health::default()),
            metrics: Arc::new(Metrics::new()),
            probes,
            dry_run,
        })
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served (the bound port, when
    /// `server.listen` asked for port 0).
    pub fn probes_addr(&self) -> SocketAddr {
        self.probes
            .local_addr()
            .unwrap_or(self.config.server.listen)
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves the side port and runs the worker until `shutdown` is cancelled, then stops
    /// consuming, sends and acknowledges what it holds within the grace period, and
    /// returns how that ended. Returns early with an error if the worker stops by itself.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Stopped, AppError> {
        let WorkerApp {
            config,
            health,
            metrics,
            probes,
            dry_run,
        } = self;
        tracing::info!(
            listen = %probes.local_addr().unwrap_or(config.server.listen),
            dry_run,
            "Serving /healthz, /readyz and /metrics."
        );
        let server = tokio::spawn(health::serve(
            probes,
            health.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let grace = config.grace_period();
        let m = metrics.clone();
        let read = move || m.totals();
        spawn_progress(&config, read, log_worker_progress, &shutdown);
        // Spawned rather than awaited here, so that it runs as the runtime's own task.
        let mut worker = tokio::spawn(
            Worker::new(config, health, metrics.clone(), dry_run).run(shutdown.clone()),
        );
        tokio::select! {
            _ = shutdown.cancelled() => {}
            ended = &mut worker => {
                shutdown.cancel();
                let _ = server.await;
                ended??;
                return Ok(Stopped::Drained);
            }
        }
        let started = Instant::now();
        let sent = if dry_run {
            "written out (dry run)"
        } else {
            "sent to Segment"
        };
        let stopped = match tokio::time::timeout(grace, worker).await {
            Ok(ended) => {
                ended??;
                let t = metrics.totals();
                tracing::info!(
                    took_ms = started.elapsed().as_millis() as u64,
                    delivered = t.delivered,
                    handed_back = t.handed_back,
                    left_to_broker = t.unsettled(),
                    released = t.released,
                    skipped = t.skipped,
                    dead_lettered = t.dead_lettered,
                    "Shut down. Since start: {} {sent} and acknowledged, {} handed back to the queue, {} left unacknowledged to the broker, which redelivers them; {} skipped, {} dead-lettered; {} let go with a lost connection and redelivered by the broker.",
                    counted(t.delivered, "session", "sessions"),
                    t.handed_back,
                    t.unsettled(),
                    t.skipped,
                    t.dead_lettered,
                    t.released,
                );
                Stopped::Drained
            }
            Err(_) => {
                let t = metrics.totals();
                tracing::warn!(
                    delivered = t.delivered,
                    handed_back = t.handed_back,
                    left_to_broker = t.unsettled(),
                    "The grace period ran out. Since start: {} {sent} and acknowledged, {} handed back to the queue; {} not acknowledged stay with the broker and will be redelivered.",
                    counted(t.delivered, "session", "sessions"),
                    t.handed_back,
                    counted(t.unsettled(), "delivery", "deliveries"),
                );
                Stopped::GraceRanOut
            }
        };
        let _ = server.await;
        Ok(stopped)
    }
}

/// The intake, built and checked, with its two ports bound.
pub struct IntakeApp {
    config: Arc<Config>,
    health: Arc<IntakeHealth>,
    metrics: Arc<IntakeMetrics>,
    probes: TcpListener,
    webhooks: TcpListener,
}

impl IntakeApp {
    /// Checks the intake's sources (at least one, each with a secret) and binds
    /// `server.listen` and `intake.listen`.
    pub async fn build(config: Config) -> Result<IntakeApp, AppError> {
        config.check_intake_sources()?;
        let probes = bind("server.listen", config.server.listen).await?;
        let webhooks = bind("intake.listen", config.intake.listen).await?;
        let metrics = Arc::new(IntakeMetrics::new(
            config.intake.sources.keys().map(String::as_str),
        ));
        Ok(IntakeApp {
            config: Arc::new(config),
            health: Arc::new(IntakeHealth::default()),
            metrics,
            probes,
            webhooks,
        })
    }

    /// Where the webhook routes are served.
    pub fn addr(&self) -> SocketAddr {
        self.webhooks
            .local_addr()
            .unwrap_or(self.config.intake.listen)
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn probes_addr(&self) -> SocketAddr {
        self.probes
            .local_addr()
            .unwrap_or(self.config.server.listen)
    }

    pub fn metrics(&self) -> Arc<IntakeMetrics> {
        self.metrics.clone()
    }

    /// Serves the webhook routes and the side port until `shutdown` is cancelled; then
    /// the intake is not ready at once, answers for the drain delay, and lets the requests
    /// under way finish within the grace period. A request cut off was never answered
    /// 2xx, so its sender retries it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Stopped, AppError> {
        let IntakeApp {
            config,
            health,
            metrics,
            probes,
            webhooks,
        } = self;
        let sources: Vec<&str> = config.intake.sources.keys().map(String::as_str).collect();
        tracing::info!(
            listen = %webhooks.local_addr().unwrap_or(config.intake.listen),
            probes = %probes.local_addr().unwrap_or(config.server.listen),
            sources = ?sources,
            "Serving webhooks."
        );
        // The probes outlive the webhook routes: `/readyz` says 503 while draining.
        let probes_stop = CancellationToken::new();
        let server = tokio::spawn(health::serve_probes(
            probes,
            Arc::new(IntakeProbes {
                health: health.clone(),
                metrics: metrics.clone(),
            }),
            probes_stop.clone(),
        ));
        let m = metrics.clone();
        let read = move || m.totals();
        spawn_progress(&config, read, log_intake_progress, &shutdown);
        let bound = config.intake.drain_delay() + config.grace_period() + Duration::from_secs(5);
        let mut intake = tokio::spawn(intake::run(
            config,
            webhooks,
            health,
            metrics.clone(),
            shutdown.clone(),
        ));
        tokio::select! {
            _ = shutdown.cancelled() => {}
            ended = &mut intake => {
                probes_stop.cancel();
                let _ = server.await;
                ended?;
                return Ok(Stopped::Drained);
            }
        }
        let started = Instant::now();
        let stopped = match tokio::time::timeout(bound, intake).await {
            Ok(ended) => {
                let drained = ended?;
                let t = metrics.totals();
                tracing::info!(
                    took_ms = started.elapsed().as_millis() as u64,
                    requests = %t.summary(),
                    messages_queued = t.messages,
                    "Intake shut down. Since start: {} answered; {} queued.",
                    counted(t.requests.iter().sum::<u64>(), "request", "requests"),
                    counted(t.messages, "message", "messages"),
                );
                if drained {
                    Stopped::Drained
                } else {
                    Stopped::GraceRanOut
                }
            }
            Err(_) => {
                tracing::warn!("The intake did not stop in time; exiting anyway.");
                Stopped::GraceRanOut
            }
        };
        probes_stop.cancel();
        let _ = server.await;
        Ok(stopped)
    }
}

/// Every `every` until `shutdown`, reads the totals and, if they changed since the last
/// line, logs one with `log(now, last)`: nothing while idle.
async fn report_progress<T: PartialEq>(
    read: impl Fn() -> T,
    log: impl Fn(&T, &T),
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut last = read();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = read();
        if now != last {
            log(&now, &last);
            last = now;
        }
    }
}

/// Starts [`report_progress`] when the configuration asks for progress lines (its
/// `progress_interval`),
/// with `log` writing the line of each interval in which something changed.
fn spawn_progress<T: PartialEq + Send + 'static>(
    config: &Config,
    read: impl Fn() -> T + Send + 'static,
    log: fn(&T, &T, Duration),
    shutdown: &CancellationToken,
) {
    if let Some(every) = config.progress_interval() {
        let log = move |now: &T, last: &T| log(now, last, every);
        tokio::spawn(report_progress(read, log, every, shutdown.clone()));
    }
}

/// The worker's progress line: sessions by outcome, events sent per region, retries, and
/// how many deliveries are held now.
fn log_worker_progress(now: &WorkerTotals, last: &WorkerTotals, every: Duration) {
    let d = now.since(last);
    tracing::info!(
        delivered = d.delivered,
        skipped = d.skipped,
        dead_lettered = d.dead_lettered,
        handed_back = d.handed_back,
        events_us = d.events_sent[Region::Us as usize],
        events_eu = d.events_sent[Region::Eu as usize],
        retries = d.retries,
        held = now.unsettled(),
        "Progress in the last {} s.",
        every.as_secs()
    );
}

/// "1 session", "2 sessions": a count with its noun for a log line.
fn counted(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The intake's progress line: requests by outcome, and messages queued.
fn log_intake_progress(now: &IntakeTotals, last: &IntakeTotals, every: Duration) {
    let d = now.since(last);
    tracing::info!(
        requests = %d.summary(),
        messages_queued = d.messages,
        "Progress in the last {} s.",
        every.as_secs()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn a_count_of_one_takes_the_singular() {
        assert_eq!(counted(1, "request", "requests"), "1 request");
        assert_eq!(counted(0, "request", "requests"), "0 requests");
        assert_eq!(counted(3, "delivery", "deliveries"), "3 deliveries");
    }

    #[tokio::test(start_paused = true)]
    async fn a_progress_line_comes_only_for_an_interval_in_which_something_changed() {
        let count = Arc::new(AtomicU64::new(0));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let reporter = tokio::spawn({
            let (count, lines) = (count.clone(), lines.clone());
            report_progress(
                move || count.load(Ordering::Relaxed),
                move |now: &u64, last: &u64| lines.lock().unwrap().push(now - last),
                Duration::from_secs(30),
                shutdown.clone(),
            )
        });
        let second = Duration::from_secs(1);
        tokio::time::sleep(61 * second).await;
        assert!(lines.lock().unwrap().is_empty(), "idle: no line");
        count.fetch_add(5, Ordering::Relaxed);
        tokio::time::sleep(30 * second).await;
        count.fetch_add(2, Ordering::Relaxed);
        tokio::time::sleep(90 * second).await;
        assert_eq!(*lines.lock().unwrap(), [5, 2], "one line per busy interval");
        shutdown.cancel();
        reporter.await.unwrap();
    }

    #[test]
    fn intake_threads_choose_the_flavour() {
        use tokio::runtime::RuntimeFlavor;
        let flavour = |v: Option<&str>| intake_runtime_for(v).unwrap().handle().runtime_flavor();
        assert_eq!(flavour(Some("current")), RuntimeFlavor::CurrentThread);
        assert_eq!(flavour(Some("0")), RuntimeFlavor::CurrentThread);
        assert_eq!(flavour(None), RuntimeFlavor::CurrentThread);
        assert_eq!(flavour(Some("2")), RuntimeFlavor::MultiThread);
        assert!(intake_runtime_for(Some("two")).is_err());
    }
}
