//! `segment-bridge intake`: the front door. Webhooks from Jebbit (signed) and JotUrl (a
//! token in the URL) are checked and put on `amqp.queue` unchanged, and answered 2xx only
//! once the broker confirmed them.
//!
//! - [`signature`]: Jebbit's `x-jebbit-signature`, parsed and verified (pure).
//! - [`body`]: which messages a body becomes (pure).
//! - [`routes`]: the webhook routes, their answers, and the tower layers around them.
//! - [`publisher`]: the broker connection, publishing with confirms, reconnecting.
//! - [`metrics`]: the intake's Prometheus metrics.
//!
//! This module serves the routes (hyper, with its header read timeout), and shuts down on
//! its token: not ready at once, then `intake.drain_delay_ms` more of answering, then no
//! new connections while requests under way finish, then the broker connection closes.

pub mod body;
pub mod metrics;
pub mod publisher;
pub mod routes;
pub mod signature;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Probes;

use self::metrics::IntakeMetrics;
use self::publisher::Publisher;

/// The intake's readiness, written by the publisher and by shutdown, read by `/readyz`.
#[derive(Debug, Default)]
pub struct IntakeHealth {
    connected: AtomicBool,
    blocked: AtomicBool,
    draining: AtomicBool,
}

impl IntakeHealth {
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Ready: connected to the broker, not blocked by it, not shutting down.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            Err("shutting down".into())
        } else if !self.connected.load(Ordering::Relaxed) {
            Err("not connected to RabbitMQ".into())
        } else if self.blocked.load(Ordering::Relaxed) {
            Err("RabbitMQ is blocking publishers (a memory or disk alarm)".into())
        } else {
            Ok(())
        }
    }
}

/// The side port's view of a running intake.
pub struct IntakeProbes {
    pub health: Arc<IntakeHealth>,
    pub metrics: Arc<IntakeMetrics>,
}

impl Probes for IntakeProbes {
    fn readiness(&self) -> Result<(), String> {
        self.health.readiness()
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// Serves the webhook routes on `listener` until `shutdown` is cancelled, then drains:
/// requests under way get `shutdown.grace_period_s` to finish. Returns once the broker
/// connection is closed, and says whether every request under way was answered in time.
/// The caller has checked the sources ([`crate::app::IntakeApp`]).
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    health: Arc<IntakeHealth>,
    metrics: Arc<IntakeMetrics>,
    shutdown: CancellationToken,
) -> bool {
    let intake = &config.intake;
    let publisher = Arc::new(Publisher::new(
        &config.amqp.queue,
        intake.publish_timeout(),
        health.clone(),
        metrics.clone(),
    ));
    // The connection outlives the listener: requests still draining publish on it.
    let stop_publishing = CancellationToken::new();
    let supervisor = tokio::spawn({
        let publisher = publisher.clone();
        let amqp = config.amqp.clone();
        let stop = stop_publishing.clone();
        async move { publisher.run(amqp, stop).await }
    });
    let app = Arc::new(routes::App::new(intake, publisher, metrics));
    let service = routes::service(app, intake);

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(intake.header_read_timeout())
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    // Stop accepting once the drain delay after the signal is over.
    let stop_accepting = {
        let health = health.clone();
        let delay = intake.drain_delay();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            health.set_draining();
            if !delay.is_zero() {
                tracing::info!(
                    drain_delay_ms = delay.as_millis() as u64,
                    "Not ready; still answering webhooks for the drain delay."
                );
                tokio::time::sleep(delay).await;
            }
        }
    };
    tokio::pin!(stop_accepting);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut stop_accepting => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "Cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(service.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that goes away, or sends garbage, ends only its own connection.
            let _ = connection.await;
        });
    }
    drop(listener);
    let grace = config.grace_period();
    tracing::info!(
        grace_period_s = grace.as_secs(),
        "Shutting down: no new connections; finishing the requests under way."
    );
    let drained = match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => {
            tracing::info!("Every request under way was answered.");
            true
        }
        Err(_) => {
            tracing::warn!(
                "The grace period ran out with requests under way; they end unanswered, and their senders retry."
            );
            false
        }
    };
    stop_publishing.cancel();
    let _ = supervisor.await;
    drained
}
