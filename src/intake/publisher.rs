//! The intake's one broker connection: a channel in confirm mode that every request
//! publishes on, kept up by a supervisor that reconnects with backoff.
//!
//! A request's messages are published (persistent, mandatory) and the request waits, at
//! most `intake.publish_timeout_ms`, for the broker to confirm every one. Only then is it
//! answered 2xx. A message the broker returns (no such queue), refuses (nack), or does not
//! confirm in time is not known to be queued, so the request is answered 503 and its
//! sender retries. While the connection is down, or the broker blocks publishers (a
//! memory or disk alarm), requests are answered 503 at once instead of waiting.
//!
//! A nack does not end a request at once: the first nack on the current channel replaces
//! it with a fresh one on the same connection (as does a publish not confirmed in time;
//! counted in
//! `segment_bridge_amqp_channel_replacements_total`), and the refused messages are sent
//! again until the publish timeout (see [`Publisher::publish`]). RabbitMQ 3.10 keeps
//! nacking on a channel whose first publish to a quorum queue came while the queue's
//! leader's node was down; without a new channel the intake refused every webhook until
//! that node came back.
//!
//! Requests publish concurrently on the one channel. lapin hands a message the broker
//! returned to whichever confirmation completes next on the channel, which may be another
//! request's; as every message goes to the same queue, either all are routed or all are
//! returned, except in the moment that queue is deleted or declared again.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, Unconfirmed, confirmed, publish_mandatory};
use crate::backoff::RetryPolicy;
use crate::config;

use super::IntakeHealth;
use super::metrics::IntakeMetrics;

/// Backoff between attempts to reach the broker.
pub const RECONNECT: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(250),
    max: Duration::from_secs(10),
};

/// After a nack and a fresh channel, refused messages are sent again at once, then after
/// this delay each time until `intake.publish_timeout_ms`: a channel opened before the
/// queue's new leader is elected may refuse too, and the replacements stay this far apart.
pub const RETRY_NACKED_AFTER: Duration = Duration::from_millis(250);

/// How often the supervisor looks at the connection's state besides its events.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Why a request's messages are not known to be queued (503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    NotConnected,
    #[error("RabbitMQ is blocking publishers (a memory or disk alarm)")]
    Blocked,
    #[error("RabbitMQ did not confirm within intake.publish_timeout_ms")]
    Timeout,
    #[error("RabbitMQ did not take the message: {0}")]
    Refused(String),
}

/// One request's messages: the body and the ranges of it that are messages.
pub struct Batch {
    pub body: Bytes,
    pub ranges: Vec<Range<usize>>,
    pub properties: BasicProperties,
}

pub struct Publisher {
    /// The connection and the confirm channel requests publish on.
    channel: RwLock<Option<(Arc<Connection>, Channel)>>,
    /// Held while a nacking channel is replaced.
    replacing: tokio::sync::Mutex<()>,
    /// The channel on which a publish was not confirmed in time, for the supervisor to
    /// replace.
    stuck: std::sync::Mutex<Option<u16>>,
    blocked: AtomicBool,
    /// A publish failed: the supervisor looks at the connection at once.
    failed: Notify,
    queue: ShortString,
    timeout: Duration,
    health: Arc<IntakeHealth>,
    metrics: Arc<IntakeMetrics>,
}

impl Publisher {
    pub fn new(
        queue: &str,
        timeout: Duration,
        health: Arc<IntakeHealth>,
        metrics: Arc<IntakeMetrics>,
    ) -> Publisher {
        Publisher {
            channel: RwLock::new(None),
            replacing: tokio::sync::Mutex::new(()),
            stuck: std::sync::Mutex::new(None),
            blocked: AtomicBool::new(false),
            failed: Notify::new(),
            queue: queue.into(),
            timeout,
            health,
            metrics,
        }
    }

    /// Publishes every message of `batch` and waits for all their confirms, at most the
    /// publish timeout. `Ok` means every message is on the queue.
    ///
    /// A message the broker refuses (nack) is published again on a fresh channel, within
    /// the same timeout: RabbitMQ 3.10 keeps refusing every publish on a channel whose
    /// first publish to a quorum queue came while the queue's leader's node was down,
    /// while a channel opened after the new leader's election is fine. So the first nack
    /// on the current channel replaces it (one request replaces it; the others retry on
    /// the new one), and the refused messages (only those: the confirmed ones are queued)
    /// are sent again at once, then every [`RETRY_NACKED_AFTER`], until the timeout.
    pub async fn publish(&self, batch: Batch) -> Result<(), PublishError> {
        if self.blocked.load(Ordering::Relaxed) {
            return Err(PublishError::Blocked);
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.timeout);
        let mut ranges = batch.ranges;
        let mut attempt = 0u32;
        let result = loop {
            let Some((connection, channel)) = self.current() else {
                break Err(PublishError::NotConnected);
            };
            let nacked = match tokio::time::timeout_at(
                deadline,
                publish_all(
                    channel.clone(),
                    self.queue.clone(),
                    batch.body.clone(),
                    ranges,
                    batch.properties.clone(),
                ),
            )
            .await
            {
                Err(_) => {
                    // A channel stuck the same way (its first publish waiting on the
                    // down node) confirms nothing: the supervisor replaces it, so that
                    // this request is answered now and the next ones get a fresh one.
                    *self.stuck.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel.id());
                    break Err(PublishError::Timeout);
                }
                Ok(Ok(nacked)) if nacked.is_empty() => break Ok(()),
                Ok(Ok(nacked)) => nacked,
                Ok(Err(refused)) => break Err(PublishError::Refused(refused)),
            };
            // Bounded: a broker that does not answer must not hold the request longer.
            let _ = tokio::time::timeout_at(deadline, self.replace(&connection, &channel)).await;
            attempt += 1;
            if attempt > 1 {
                let wake = tokio::time::Instant::now() + RETRY_NACKED_AFTER;
                if wake >= deadline {
                    break Err(PublishError::Refused(Unconfirmed::Nack.to_string()));
                }
                tokio::time::sleep_until(wake).await;
            }
            ranges = nacked;
        };
        self.metrics.publish_took(started.elapsed());
        if result.is_err() {
            self.failed.notify_one();
        }
        result
    }

    /// The connection and its confirm channel, if connected.
    fn current(&self) -> Option<(Arc<Connection>, Channel)> {
        self.channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces `nacking` (a channel that nacked, or did not confirm within the publish
    /// timeout) with a fresh confirm channel on `connection`, unless another
    /// request already replaced it (or the connection was replaced meanwhile). The old
    /// channel is closed once the publishes still under way on it have had their time.
    async fn replace(&self, connection: &Arc<Connection>, nacking: &Channel) {
        let _one_at_a_time = self.replacing.lock().await;
        let still_current = self.current().is_some_and(|(_, channel)| {
            channel.id() == nacking.id() && channel.status().connected()
        });
        if !still_current {
            return;
        }
        match amqp::confirm_channel(connection).await {
            Ok(fresh) => {
                {
                    let mut slot = self.channel.write().unwrap_or_else(|e| e.into_inner());
                    match slot.as_ref() {
                        Some((_, channel)) if channel.id() == nacking.id() => {
                            *slot = Some((connection.clone(), fresh));
                        }
                        // Reconnected meanwhile: the fresh channel is of the old connection.
                        _ => return,
                    }
                }
                self.metrics.channel_replaced();
                tracing::warn!(
                    channel = nacking.id(),
                    "RabbitMQ refused (nack) or did not confirm a publish; publishing on a fresh channel from now on."
                );
                let (old, patience) = (nacking.clone(), self.timeout);
                tokio::spawn(async move {
                    tokio::time::sleep(patience).await;
                    let _ = old.close(200, "OK".into()).await;
                });
            }
            Err(e) => {
                // The supervisor looks at the connection (a failed publish notifies it).
                tracing::warn!(error = %e, "Cannot open a fresh channel after a nack.");
            }
        }
    }

    /// Keeps a confirm channel open until `shutdown`, reconnecting with backoff: the
    /// connection is made anew when it is lost, when its channel closes, or when the
    /// broker refuses it.
    pub async fn run(&self, amqp: config::Amqp, shutdown: CancellationToken) {
        let mut backoff = RECONNECT.backoff();
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                opened = open(&amqp) => opened,
            };
            let (connection, channel) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    let delay = backoff.next_delay(None);
                    tracing::warn!(error = %e, retry_in = ?delay, "Cannot publish to RabbitMQ; retrying.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            backoff = RECONNECT.backoff();
            let connection = Arc::new(connection);
            let mut events = connection.events_listener();
            self.blocked.store(false, Ordering::Relaxed);
            *self.channel.write().unwrap_or_else(|e| e.into_inner()) =
                Some((connection.clone(), channel.clone()));
            self.health.set_connected(true);
            self.metrics.amqp_connected(true);
            tracing::info!(queue = %amqp.queue, "Connected to RabbitMQ; publishing webhooks.");

            let mut watch = tokio::time::interval(WATCH_EVERY);
            let lost = loop {
                // The channel in use: a nacking one may have been replaced.
                let channel = self.current().map(|(_, channel)| channel);
                let alive = connection.status().connected()
                    && channel.is_some_and(|c| c.status().connected());
                if !alive {
                    break "the connection or its channel closed".to_owned();
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        self.disconnected();
                        let _ = connection.close(200, "OK".into()).await;
                        return;
                    }
                    event = events.next() => match event {
                        Some(lapin::Event::ConnectionBlocked(reason)) => {
                            tracing::warn!(reason = %reason, "RabbitMQ blocks publishing; answering 503 until it lifts the block.");
                            self.blocked.store(true, Ordering::Relaxed);
                            self.health.set_blocked(true);
                        }
                        Some(lapin::Event::ConnectionUnblocked) => {
                            tracing::info!("RabbitMQ lifted the block.");
                            self.blocked.store(false, Ordering::Relaxed);
                            self.health.set_blocked(false);
                        }
                        Some(lapin::Event::Error(e)) => break e.to_string(),
                        Some(_) => {}
                        None => break "the connection's events ended".to_owned(),
                    },
                    _ = self.failed.notified() => {
                        let stuck = self.stuck.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let (Some(id), Some((connection, channel))) = (stuck, self.current())
                            && channel.id() == id
                        {
                            let replaced = self.replace(&connection, &channel);
                            let _ = tokio::time::timeout(self.timeout, replaced).await;
                        }
                    }
                    _ = watch.tick() => {}
                }
            };
            self.disconnected();
            tracing::warn!(error = %lost, "Lost the RabbitMQ connection; reconnecting. Webhooks are answered 503 meanwhile.");
            tokio::spawn(async move {
                let _ = connection.close(200, "OK".into()).await;
            });
        }
    }

    fn disconnected(&self) {
        *self.channel.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.blocked.store(false, Ordering::Relaxed);
        self.health.set_blocked(false);
        self.health.set_connected(false);
        self.metrics.amqp_connected(false);
    }
}

/// Publishes the `ranges` of `body` on `channel` and waits for every confirm: the ranges
/// the broker refused (nack), or why the others are not known to be queued. Runs in a
/// task of its own: one that times out goes on to its end, so that no unresolved confirm
/// is dropped (lapin would keep it).
async fn publish_all(
    channel: Channel,
    queue: ShortString,
    body: Bytes,
    ranges: Vec<Range<usize>>,
    properties: BasicProperties,
) -> Result<Vec<Range<usize>>, String> {
    let confirms = tokio::spawn(async move {
        let mut pending = Vec::with_capacity(ranges.len());
        let mut first_error = None;
        for range in ranges {
            match publish_mandatory(&channel, &queue, &body[range.clone()], properties.clone())
                .await
            {
                Ok(confirm) => pending.push((range, confirm)),
                Err(e) => {
                    first_error = Some(e.to_string());
                    break;
                }
            }
        }
        let mut nacked = Vec::new();
        for (range, confirm) in pending {
            match confirmed(confirm).await {
                Ok(()) => {}
                Err(Unconfirmed::Nack) => nacked.push(range),
                Err(e) => {
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        first_error.map_or(Ok(nacked), Err)
    });
    confirms
        .await
        .unwrap_or_else(|panicked| Err(panicked.to_string()))
}

/// Connects, makes sure the queue exists (declaring it when `amqp.declare`), and opens a
/// channel in confirm mode.
async fn open(amqp: &config::Amqp) -> lapin::Result<(Connection, Channel)> {
    let connection = amqp::connect(amqp).await?;
    let channel = async {
        amqp::ensure_queue(&connection, &amqp.queue, amqp.declare).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }
    .await;
    match channel {
        Ok(channel) => Ok((connection, channel)),
        Err(e) => {
            // A queue that is missing (with amqp.declare = false) is retried on a new
            // connection; this one must not stay open meanwhile.
            let _ = connection.close(200, "OK".into()).await;
            Err(e)
        }
    }
}
