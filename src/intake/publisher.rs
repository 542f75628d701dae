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

use crate::amqp::{self, confirmed, publish_mandatory};
use crate::backoff::RetryPolicy;
use crate::config;

use super::IntakeHealth;
use super::metrics::IntakeMetrics;

/// Backoff between attempts to reach the broker.
pub const RECONNECT: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(250),
    max: Duration::from_secs(10),
};

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
    channel: RwLock<Option<Channel>>,
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
    pub async fn publish(&self, batch: Batch) -> Result<(), PublishError> {
        let channel = self
            .channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(PublishError::NotConnected)?;
        if self.blocked.load(Ordering::Relaxed) {
            return Err(PublishError::Blocked);
        }
        let started = Instant::now();
        let queue = self.queue.clone();
        // The confirms are awaited in a task of their own: one that times out goes on to
        // its end, so that no unresolved confirm is dropped (lapin would keep it).
        let confirms = tokio::spawn(async move {
            let mut pending = Vec::with_capacity(batch.ranges.len());
            let mut first_error = None;
            for range in batch.ranges {
                match publish_mandatory(
                    &channel,
                    &queue,
                    &batch.body[range],
                    batch.properties.clone(),
                )
                .await
                {
                    Ok(confirm) => pending.push(confirm),
                    Err(e) => {
                        first_error = Some(e.to_string());
                        break;
                    }
                }
            }
            for confirm in pending {
                if let Err(e) = confirmed(confirm).await {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        });
        let result = match tokio::time::timeout(self.timeout, confirms).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(refused))) => Err(PublishError::Refused(refused)),
            Ok(Err(panicked)) => Err(PublishError::Refused(panicked.to_string())),
            Err(_) => Err(PublishError::Timeout),
        };
        self.metrics.publish_took(started.elapsed());
        if result.is_err() {
            self.failed.notify_one();
        }
        result
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
            let mut events = connection.events_listener();
            self.blocked.store(false, Ordering::Relaxed);
            *self.channel.write().unwrap_or_else(|e| e.into_inner()) = Some(channel.clone());
            self.health.set_connected(true);
            self.metrics.amqp_connected(true);
            tracing::info!(queue = %amqp.queue, "Connected to RabbitMQ; publishing webhooks.");

            let mut watch = tokio::time::interval(WATCH_EVERY);
            let lost = loop {
                let alive = connection.status().connected() && channel.status().connected();
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
                    _ = self.failed.notified() => {}
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
