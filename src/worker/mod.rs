//! The pipeline: deliveries → sessions → events → per-region batches → Segment → acks.
//!
//! One task consumes (and reconnects); it parses and maps each delivery as it arrives and
//! adds its events to the region's batch, which it owns: no channel send and no task hop
//! per delivery. A full batch, or one whose oldest event has waited `flush_interval`, goes
//! to the region's sender task as one message, and the sender posts it with at most
//! `max_in_flight` requests under way; a batch's outcome settles every delivery in it. The
//! consumer never waits on Segment: every delivery it holds is a ticket with the time it
//! arrived, so wherever it waits (a batch gathering, a batch waiting for a request slot, a
//! batch being retried) it is handed back once it has been held for `retry.max_hold_s`.
//! What bounds memory is `prefetch`: when Segment is slow or down, the broker stops
//! delivering once that many deliveries are unacknowledged, and nothing is acknowledged
//! that Segment has not taken.
//!
//! Every way a delivery goes back to the queue for a later attempt (the hold limit, a
//! refused write key, shutdown) is a hand-back (`Settle::hand_back`): a copy published
//! with a confirm, then the original acknowledged, so that a quorum queue's delivery limit
//! is not spent on what is not the message's fault. On shutdown the worker stops
//! consuming, reads what the broker had already sent, sends what it holds, and hands back
//! what Segment has not taken shortly before the grace period ends.
//!
//! The batching (`gather`) and the sending (`sender`) see a delivery only through
//! `settle::Settle` and Segment only through [`segment::Post`]: the live [`Ticket`] and
//! [`Sink`] in the program, a fake and a scripted Segment in their tests, which run on
//! paused time.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::RetryPolicy;
use crate::batch::{Batch, Entry};
use crate::config::Config;
use crate::domain::Region;
use crate::events::{self, Mapped};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::segment::{self, HttpSink, Sink};
use crate::session::{Session, peek_session_id};

mod ack;
#[cfg(test)]
mod fake;
mod gather;
pub mod link;
mod sender;
mod settle;

use gather::Gather;
use link::{Link, Ticket};
use sender::{Deliverer, run_sender};
use settle::Settle;

/// Everything a running worker shares.
pub struct Worker {
    config: Arc<Config>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
}

/// Unbounded on purpose: the broker's prefetch bounds how many deliveries are held.
type Sender<T> = mpsc::UnboundedSender<Batch<T>>;

/// Backoff between attempts to reach the broker.
const RECONNECT: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(30),
};

impl Worker {
    pub fn new(
        config: Arc<Config>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        dry_run: bool,
    ) -> Self {
        Worker {
            config,
            health,
            metrics,
            dry_run,
        }
    }

    /// Runs until `shutdown` is cancelled, then stops consuming, sends and acknowledges
    /// what it holds, and returns. The caller bounds that drain with the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let client = segment::http_client(self.config.request_timeout())?;
        let stop_consuming = CancellationToken::new();
        // Cancelled shortly before the grace period ends: what Segment has not taken by then
        // is handed back while the connection is still up.
        let abandon = CancellationToken::new();
        tokio::spawn({
            let (shutdown, abandon) = (shutdown.clone(), abandon.clone());
            let after = self.config.hand_back_after();
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = abandon.cancelled() => return,
                }
                tokio::time::sleep(after).await;
                abandon.cancel();
            }
        });
        let _stop_timer = abandon.clone().drop_guard();
        let mut batchers = JoinSet::new();
        let mut senders: [Option<Sender<Ticket>>; 2] = [None, None];
        let mut slots: [Option<Arc<Semaphore>>; 2] = [None, None];
        let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        for region in Region::ALL {
            let sink = if self.dry_run {
                Sink::DryRun {
                    out: stdout.clone(),
                    region,
                }
            } else if self.config.has_write_key(region) {
                let endpoint = self.config.endpoint(region);
                Sink::Http(HttpSink::new(
                    client.clone(),
                    endpoint.endpoint.parse().expect("validated at start-up"),
                    endpoint.write_key.clone(),
                    self.config.max_retry_after(),
                    self.config.segment.compression,
                ))
            } else {
                tracing::warn!(region = %region, "No write key for this region: its sessions will be dead-lettered.");
                continue;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            senders[region as usize] = Some(tx);
            let deliverer = Arc::new(Deliverer {
                region,
                sink,
                policy: self.config.retry_policy(),
                max_hold: self.config.max_hold(),
                health: self.health.clone(),
                metrics: self.metrics.clone(),
                stop_consuming: stop_consuming.clone(),
                shutdown: shutdown.clone(),
                abandon: abandon.clone(),
            });
            let permits = Arc::new(Semaphore::new(self.config.segment.max_in_flight));
            slots[region as usize] = Some(permits.clone());
            batchers.spawn(run_sender(rx, deliverer, permits));
        }

        let mut gather = Gather::new(
            senders,
            slots,
            self.config.batch_limits(),
            self.config.flush_interval(),
            self.config.flush_idle(),
        );
        // Links given up on (lost, or cancelled by the broker) close once their tickets are
        // settled; shutdown waits for them too, so that their last acks go out.
        let mut closing = JoinSet::new();
        let link = self
            .consume(
                &mut gather,
                &mut closing,
                &shutdown,
                &stop_consuming,
                &abandon,
            )
            .await;
        tracing::info!("Stopped consuming; sending and acknowledging what is held.");
        gather.flush_all();
        drop(gather);
        while batchers.join_next().await.is_some() {}
        if let Some(link) = link {
            link.close().await;
        }
        while closing.join_next().await.is_some() {}
        self.health.set_connected(false);
        self.metrics.amqp_connected(false);
        tracing::info!("Stopped: what was held is sent, handed back or left to the broker.");
        Ok(())
    }

    /// Consumes, reconnecting with backoff, until shutdown. Returns the live link, if any,
    /// so that its acknowledgements can finish before it closes.
    async fn consume(
        &self,
        gather: &mut Gather<Ticket>,
        closing: &mut JoinSet<()>,
        shutdown: &CancellationToken,
        stop_consuming: &CancellationToken,
        abandon: &CancellationToken,
    ) -> Option<Link> {
        let mut backoff = RECONNECT.backoff();
        let options = self.config.mapping_options();
        let max_hold = self.config.max_hold();
        // Made once, not once per delivery: each new one would register with its token.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let refused = stop_consuming.cancelled();
        tokio::pin!(refused);
        let given_up = abandon.cancelled();
        tokio::pin!(given_up);
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return None,
                opened = Link::open(&self.config.amqp, max_hold, self.metrics.clone()) => opened,
            };
            let (link, mut consumer) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    let delay = backoff.next_delay(None);
                    tracing::warn!(error = %e, retry_in = ?delay, "Cannot consume from RabbitMQ; retrying.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            backoff = RECONNECT.backoff();
            self.health.set_connected(true);
            self.health.set_consuming(true);
            self.metrics.amqp_connected(true);
            tracing::info!(queue = %self.config.amqp.queue, prefetch = self.config.amqp.prefetch, "Consuming.");

            // Once the consumer is cancelled (shutdown, or a refused key), the deliveries the
            // broker sent before are still read to the end of the stream and settled: left
            // to the closing connection, each would spend one of its deliveries on a quorum
            // queue.
            let mut stopped = shutdown.is_cancelled() || stop_consuming.is_cancelled();
            if stopped {
                let _ = link.cancel(Some(consumer.tag())).await;
                self.health.set_consuming(false);
            }
            let mut still_ours = false;
            let lost = loop {
                tokio::select! {
                    biased;
                    () = &mut cancelled, if !stopped => {
                        tokio::select! {
                            _ = link.cancel(Some(consumer.tag())) => {}
                            _ = abandon.cancelled() => {}
                        }
                        stopped = true;
                        self.health.set_consuming(false);
                    }
                    () = &mut refused, if !stopped => {
                        // A region's key was refused. Take no more work; the refused region's
                        // deliveries are handed back, the other region's still sent.
                        let _ = link.cancel(Some(consumer.tag())).await;
                        stopped = true;
                        self.health.set_consuming(false);
                    }
                    // A broker that never ends the cancelled stream must not hold up
                    // shutdown: what it has sent so far is taken (and handed back).
                    () = &mut given_up, if stopped => {
                        while let Some(Some(Ok(delivery))) = consumer.next().now_or_never() {
                            self.handle(link.ticket(delivery), gather, &options);
                        }
                        return Some(link);
                    }
                    () = gather.flush_when_due() => {}
                    delivery = consumer.next() => match delivery {
                        Some(Ok(delivery)) => self.handle(link.ticket(delivery), gather, &options),
                        Some(Err(e)) => break e.to_string(),
                        None if stopped => {
                            // Read to the end. What the batches hold goes now rather than
                            // at its flush deadline.
                            gather.flush_all();
                            if shutdown.is_cancelled() {
                                return Some(link);
                            }
                            // A refused key: until shutdown, watch the connection, so that
                            // the probes and metrics tell when it is lost. This worker does
                            // not consume again: it waits to be restarted.
                            loop {
                                tokio::select! {
                                    _ = shutdown.cancelled() => return Some(link),
                                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                }
                                if !link.is_connected() {
                                    link.mark_lost();
                                    self.health.set_connected(false);
                                    self.metrics.amqp_connected(false);
                                    tracing::warn!("Lost the RabbitMQ connection while not consuming; waiting to be restarted or stopped.");
                                    closing.spawn(link.close());
                                    shutdown.cancelled().await;
                                    return None;
                                }
                            }
                        }
                        None if link.is_connected() => {
                            // The broker cancelled the consumer (its queue deleted, or moved)
                            // but the channel is open: what it delivered is still ours to
                            // settle, in order, while a new link consumes.
                            let _ = link.cancel(None).await;
                            still_ours = true;
                            break "the broker cancelled the consumer".to_owned();
                        }
                        None => break "the channel was closed".to_owned(),
                    },
                }
            };
            if !still_ours {
                link.mark_lost();
            }
            // What the batches hold goes to the senders: a lost link's deliveries are let
            // go there, a cancelled consumer's are sent as usual.
            gather.flush_all();
            self.health.set_connected(false);
            self.metrics.amqp_connected(false);
            tracing::warn!(error = %lost, "Lost the RabbitMQ consumer; reconnecting. Deliveries of a lost connection or channel are redelivered by the broker.");
            // Its tickets may still be in flight; the link closes once they are settled.
            closing.spawn(link.close());
        }
    }

    /// Parses and maps one delivery, then settles it or adds it to its region's batch.
    fn handle(&self, ticket: Ticket, gather: &mut Gather<Ticket>, options: &events::Options) {
        self.metrics.delivery_received();
        let message = ticket.message();
        if let Some(count) = crate::amqp::headers::delivery_count(&message.properties) {
            let limit = u64::from(self.config.amqp.delivery_limit);
            if limit > 0 && count * 2 > limit {
                self.metrics.high_delivery_count();
                tracing::warn!(
                    session_id = peek_session_id(&message.body).as_deref().unwrap_or("-"),
                    delivery_count = count,
                    delivery_limit = limit,
                    "This message was delivered {count} times before; the queue drops or dead-letters it after {limit}. Look for workers that crash or lose their connection while holding it."
                );
            }
        }
        let hints = crate::amqp::headers::hints(&message.properties);
        let session = match Session::parse_with(&message.body, hints) {
            Ok(session) => session,
            Err(e) => {
                let id = peek_session_id(&message.body);
                return dead_letter(ticket, id.as_deref(), e.to_string(), e.code());
            }
        };
        // Read only when the session has no `completed_at` (the clock is not free): the AMQP
        // timestamp, else a JotUrl lead's `date`, else now.
        let fallback_time = match session.completed_at {
            Some(at) => at,
            None => message
                .properties
                .timestamp()
                .and_then(|t| OffsetDateTime::from_unix_timestamp(t as i64).ok())
                .or(session.lead_date)
                .unwrap_or_else(OffsetDateTime::now_utc),
        };
        // Borrowed from the delivery, like most of the session.
        let id = &*session.identity;
        let events = match events::map(&session, fallback_time, options) {
            Ok(Mapped::Events(events)) => events,
            Ok(Mapped::Skipped(reason)) => {
                tracing::debug!(session_id = %id, outcome = reason.as_str(), "Session skipped.");
                self.metrics.sessions(reason.as_str(), 1);
                return ticket.ack();
            }
            Err(e) => {
                let id = id.to_owned();
                return dead_letter(ticket, Some(&id), e.to_string(), "too_large");
            }
        };
        let region = events.region;
        if !gather.has_sender(region) {
            let reason = format!(
                "no write key is configured for region {region} (set SEGMENT_BRIDGE__SEGMENT__{}__WRITE_KEY)",
                region.as_str().to_uppercase()
            );
            let id = id.to_owned();
            return dead_letter(ticket, Some(&id), reason, "no_write_key");
        }
        if self.health.is_misconfigured(region) {
            self.metrics.requeued("misconfigured", 1);
            return ticket.hand_back();
        }
        gather.push(region, Entry { ticket, events });
    }
}

/// The identity of a delivery's session, for a log line: read again from the body, which
/// the batch does not keep a copy of (a string per session, for a rare line).
fn session_id(ticket: &Ticket) -> String {
    let message = ticket.message();
    let body = &message.body;
    match Session::parse_with(body, crate::amqp::headers::hints(&message.properties)) {
        Ok(session) => session.identity.into_owned(),
        Err(_) => peek_session_id(body).unwrap_or_else(|| "-".to_owned()),
    }
}

/// Moves a message to the dead-letter queue, with one log line naming it and the reason.
fn dead_letter(ticket: Ticket, session_id: Option<&str>, reason: String, code: &'static str) {
    tracing::warn!(session_id = session_id.unwrap_or("-"), reason = %reason, "Message dead-lettered.");
    ticket.dead_letter(reason, code);
}
