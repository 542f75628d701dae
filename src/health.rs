//! The side port: `/healthz`, `/readyz` and `/metrics`.
//!
//! Readiness is shared state that the pipeline writes and the probes only read: ready means
//! connected to the broker, consuming, and no region's write key refused by Segment.
//! `/healthz` depends on nothing but the process answering. The intake serves the same
//! port with its own readiness and metrics, through [`Probes`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::domain::Region;
use crate::metrics::Metrics;

/// What the probes report, written by the worker.
#[derive(Debug, Default)]
pub struct Health {
    connected: AtomicBool,
    consuming: AtomicBool,
    misconfigured: [AtomicBool; 2],
}

impl Health {
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        if !connected {
            self.consuming.store(false, Ordering::Relaxed);
        }
    }

    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }

    /// Segment refused the region's key or endpoint: the worker stays not ready until it
    /// is restarted with a fixed configuration.
    pub fn set_misconfigured(&self, region: Region) {
        self.misconfigured[region as usize].store(true, Ordering::Relaxed);
    }

    pub fn is_misconfigured(&self, region: Region) -> bool {
        self.misconfigured[region as usize].load(Ordering::Relaxed)
    }

    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    /// `Ok` when ready, else the reasons it is not.
    pub fn readiness(&self) -> Result<(), String> {
        let mut reasons = Vec::new();
        if !self.connected.load(Ordering::Relaxed) {
            reasons.push("not connected to RabbitMQ".to_owned());
        } else if !self.consuming.load(Ordering::Relaxed) {
            reasons.push("not consuming".to_owned());
        }
        for region in Region::ALL {
            if self.is_misconfigured(region) {
                reasons.push(format!(
                    "Segment refused the {region} write key or endpoint; fix it and restart"
                ));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }
}

/// What a side port reports: readiness, and the metrics in Prometheus text.
pub trait Probes: Send + Sync + 'static {
    /// `Ok` when ready, else the reasons it is not.
    fn readiness(&self) -> Result<(), String>;
    fn metrics(&self) -> String;
}

struct WorkerProbes {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl Probes for WorkerProbes {
    fn readiness(&self) -> Result<(), String> {
        self.health.readiness()
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// Serves the worker's side port until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_probes(
        listener,
        Arc::new(WorkerProbes { health, metrics }),
        shutdown,
    )
    .await
}

/// Serves `/healthz`, `/readyz` and `/metrics` from `probes` until `shutdown` is cancelled.
pub async fn serve_probes(
    listener: TcpListener,
    probes: Arc<dyn Probes>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(probes);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn readyz(State(p): State<Arc<dyn Probes>>) -> impl IntoResponse {
    match p.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn render_metrics(State(p): State<Arc<dyn Probes>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        p.metrics(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_a_connection_consumption_and_accepted_keys() {
        let h = Health::default();
        assert!(h.readiness().unwrap_err().contains("not connected"));
        h.set_connected(true);
        assert!(h.readiness().unwrap_err().contains("not consuming"));
        h.set_consuming(true);
        assert_eq!(h.readiness(), Ok(()));
        h.set_misconfigured(Region::Eu);
        assert!(h.readiness().unwrap_err().contains("eu write key"));
        h.set_connected(false);
        h.set_connected(true);
        assert!(
            h.readiness().unwrap_err().contains("not consuming"),
            "a reconnect must consume again"
        );
    }
}
