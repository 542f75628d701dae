//! One region's sender: posts its batches to Segment, `max_in_flight` at a time, and
//! settles each batch's deliveries by the outcome: acknowledged, retried, split to find
//! what Segment rejects, or handed back.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::RetryPolicy;
use crate::batch::Batch;
use crate::domain::Region;
use crate::events;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::segment::{Outcome, Sink};

use super::link::Ticket;
use super::session_id;

/// Sends one region's batches, `max_in_flight` at a time, until its channel closes; then
/// waits for every request.
pub(super) async fn run_sender(
    mut rx: mpsc::UnboundedReceiver<Batch<Ticket>>,
    deliverer: Arc<Deliverer>,
    max_in_flight: usize,
) {
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let mut in_flight = JoinSet::new();
    while let Some(batch) = rx.recv().await {
        dispatch(batch, &mut in_flight, &permits, &deliverer).await;
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

/// Starts sending a batch once a request slot is free. A batch that waits for a slot
/// until its oldest delivery has been held for `max_hold`, or until shutdown gives up on
/// it, is handed back instead.
async fn dispatch(
    batch: Batch<Ticket>,
    in_flight: &mut JoinSet<()>,
    permits: &Arc<Semaphore>,
    deliverer: &Arc<Deliverer>,
) {
    let Some(oldest) = batch.entries().iter().map(|e| e.ticket.received()).min() else {
        return;
    };
    let deadline = Instant::from_std(oldest) + deliverer.max_hold;
    let acquired = tokio::select! {
        biased;
        _ = deliverer.abandon.cancelled() => return deliverer.hand_back(batch, "shutdown"),
        acquired = tokio::time::timeout_at(deadline, permits.clone().acquire_owned()) => acquired,
    };
    let Ok(permit) = acquired else {
        tracing::warn!(region = %deliverer.region, sessions = batch.len(), "No request slot came free within retry.max_hold_s; handing the batch back to the queue.");
        return deliverer.hand_back(batch, "max_hold");
    };
    let permit = permit.expect("never closed");
    let deliverer = deliverer.clone();
    in_flight.spawn(async move {
        deliverer.deliver(batch).await;
        drop(permit);
    });
}

/// Sends one region's batches and settles their deliveries by the outcome.
pub(super) struct Deliverer {
    pub(super) region: Region,
    pub(super) sink: Sink,
    pub(super) policy: RetryPolicy,
    pub(super) max_hold: Duration,
    pub(super) health: Arc<Health>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) stop_consuming: CancellationToken,
    pub(super) shutdown: CancellationToken,
    /// Shutdown's last call: hand back whatever is not yet taken.
    pub(super) abandon: CancellationToken,
}

impl Deliverer {
    /// Posts the batch until Segment takes it, isolating what it rejects; never gives up
    /// on a transient failure, but hands it back rather than hold a delivery past
    /// `max_hold`.
    async fn deliver(&self, mut batch: Batch<Ticket>) {
        let region = self.region;
        let mut backoff = self.policy.backoff();
        loop {
            if self.health.is_misconfigured(region) {
                return self.hand_back(batch, "misconfigured");
            }
            // Deliveries of a lost connection come again on the new one; let those go.
            drop(batch.retain(|e| e.ticket.is_live()));
            // Deliveries that waited for this attempt until their hold limit go back.
            let expired = batch.retain(|e| e.ticket.received().elapsed() < self.max_hold);
            if !expired.is_empty() {
                self.metrics.requeued("max_hold", expired.len() as u64);
                expired.into_iter().for_each(|e| e.ticket.hand_back());
            }
            if batch.is_empty() {
                return;
            }
            let body = batch.body(&events::format_timestamp(OffsetDateTime::now_utc()));
            self.metrics.in_flight(1.0);
            let started = std::time::Instant::now();
            let response = tokio::select! {
                biased;
                _ = self.abandon.cancelled() => {
                    self.metrics.in_flight(-1.0);
                    tracing::warn!(region = %region, sessions = batch.len(), "The grace period is nearly over and Segment has not answered; handing the batch back to the queue.");
                    return self.hand_back(batch, "shutdown");
                }
                response = self.sink.send(body) => response,
            };
            self.metrics.in_flight(-1.0);
            self.metrics
                .request(region, &response.status, batch.events(), started.elapsed());
            match response.outcome {
                Outcome::Accepted => {
                    self.metrics.events_sent(region, batch.events() as u64);
                    self.metrics.sessions("delivered", batch.len() as u64);
                    Ticket::ack_all(batch.into_entries().into_iter().map(|e| e.ticket));
                    return;
                }
                Outcome::Retry { after, cause } => {
                    self.metrics.retry(region, cause.as_str());
                    let delay = backoff.next_delay(after);
                    let oldest = batch
                        .entries()
                        .iter()
                        .map(|e| e.ticket.received())
                        .min()
                        .expect("a batch is never empty");
                    if oldest.elapsed() + delay > self.max_hold {
                        tracing::warn!(region = %region, sessions = batch.len(), "Segment has not taken this batch within retry.max_hold_s; handing it back to the queue for a later attempt.");
                        return self.hand_back(batch, "max_hold");
                    }
                    if self.shutdown.is_cancelled() {
                        return self.hand_back(batch, "shutdown");
                    }
                    tracing::warn!(region = %region, status = %response.status, error = response.error.as_deref(), retry_in = ?delay, sessions = batch.len(), "Segment did not take the batch; retrying.");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // Shutting down: hand the batch back now rather than at the end
                        // of the grace period.
                        _ = self.shutdown.cancelled() => return self.hand_back(batch, "shutdown"),
                    }
                }
                Outcome::Rejected { status, detail } => {
                    if batch.len() > 1 {
                        let (front, back) = batch.split();
                        Box::pin(self.deliver(front)).await;
                        return Box::pin(self.deliver(back)).await;
                    }
                    let entry = batch.into_entries().pop().expect("one entry");
                    let reason = format!(
                        "Segment rejected the session's events with HTTP {status}: {detail}"
                    );
                    let session_id = session_id(&entry.ticket);
                    tracing::warn!(session_id = %session_id, region = %region, reason = %reason, "Message dead-lettered.");
                    return entry.ticket.dead_letter(reason, "rejected_by_segment");
                }
                Outcome::Misconfigured { status } => {
                    if !self.health.is_misconfigured(region) {
                        tracing::error!(
                            region = %region, status,
                            "Segment refused the {region} write key or endpoint. This worker stops consuming and is not ready; its {region} deliveries go back to the queue, nothing is dead-lettered. Fix segment.{region}.write_key / segment.{region}.endpoint and restart it."
                        );
                    }
                    self.health.set_misconfigured(region);
                    self.metrics.set_misconfigured(region, true);
                    self.stop_consuming.cancel();
                    return self.hand_back(batch, "misconfigured");
                }
            }
        }
    }

    fn hand_back(&self, batch: Batch<Ticket>, cause: &'static str) {
        // A lost link's deliveries are the broker's again: not counted, not copied.
        let live = batch
            .entries()
            .iter()
            .filter(|e| e.ticket.is_live())
            .count();
        self.metrics.requeued(cause, live as u64);
        for entry in batch.into_entries() {
            entry.ticket.hand_back();
        }
    }
}
