//! RabbitMQ: connecting, declaring, consuming, and settling deliveries.
//!
//! A [`Link`] is one connection with two channels: one that consumes (and carries every
//! ack and nack for its deliveries) and one in confirm mode that publishes dead letters.
//! Each delivery becomes a [`Ticket`]; the pipeline settles a ticket exactly once by
//! acknowledging it, requeueing it or dead-lettering it, and a ticket dropped unsettled is
//! requeued. Settlements go to the link's acker task, which owns the consume channel's
//! acknowledgements and coalesces them (see [`crate::ack`]). A ticket only ever settles on
//! the channel it came from: after a reconnect, deliveries of the dead channel are left to
//! the broker, which redelivers them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use lapin::{Confirmation, PublisherConfirm};
use secrecy::ExposeSecret;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ack::{Ack, AckTracker};
use crate::config;
use crate::metrics::Metrics;

/// The header that carries why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-segment-bridge-error";

/// Connects to the broker named by `amqp.url`.
pub async fn connect(amqp: &config::Amqp) -> lapin::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(
        concat!("segment-bridge/", env!("CARGO_PKG_VERSION")),
    ));
    Connection::connect(amqp.url.expose_secret(), properties).await
}

/// Makes sure `queue` exists. An existing queue is used as it is, whatever its arguments
/// (quorum, limits); a missing one is declared durable with no arguments when `declare`
/// is set, and is an error otherwise.
pub async fn ensure_queue(conn: &Connection, queue: &str, declare: bool) -> lapin::Result<()> {
    // A passive declare that fails closes its channel, so it gets one of its own.
    let probe = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let found = probe
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    if found.is_ok() {
        let _ = probe.close(200, "OK".into()).await;
        return Ok(());
    }
    if !declare {
        return found.map(drop);
    }
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "OK".into()).await;
    Ok(())
}

/// A message as it came: what dead-lettering republishes unchanged.
#[derive(Debug, Clone)]
pub struct Message {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// How a ticket is settled.
#[derive(Debug)]
enum Settle {
    Ack(u64),
    /// The deliveries of one batch that Segment accepted: one message, not one per ticket.
    Acks(Vec<u64>),
    Requeue(u64),
    DeadLetter(Box<DeadLetter>),
}

#[derive(Debug)]
struct DeadLetter {
    tag: u64,
    message: Message,
    reason: String,
    code: &'static str,
}

/// One delivery in the pipeline. Settle it once with [`ack`](Self::ack),
/// [`requeue`](Self::requeue) or [`dead_letter`](Self::dead_letter); dropping it unsettled
/// requeues it.
#[derive(Debug)]
pub struct Ticket {
    tag: u64,
    received: Instant,
    message: Option<Message>,
    settle: mpsc::UnboundedSender<Settle>,
    link_alive: Arc<AtomicBool>,
}

impl Ticket {
    /// False once the connection it came on is lost: the broker redelivers it on the new
    /// one, so sending it again here would only make a duplicate.
    pub fn is_live(&self) -> bool {
        self.link_alive.load(Ordering::Relaxed)
    }

    /// When the delivery reached this worker; bounds how long it may be held.
    pub fn received(&self) -> Instant {
        self.received
    }

    pub fn message(&self) -> &Message {
        self.message
            .as_ref()
            .expect("an unsettled ticket holds its message")
    }

    /// Segment took the session's events, or there was nothing to send.
    pub fn ack(mut self) {
        self.send(Settle::Ack(self.tag));
    }

    /// Acknowledges every ticket, sending one message to each link's acker rather than
    /// one per ticket (a batch's tickets normally all come from one link).
    pub fn ack_all(tickets: impl IntoIterator<Item = Ticket>) {
        let mut tags = Vec::new();
        let mut to: Option<mpsc::UnboundedSender<Settle>> = None;
        for mut ticket in tickets {
            match &to {
                Some(settle) if settle.same_channel(&ticket.settle) => {}
                _ => {
                    if let Some(settle) = to.take() {
                        let _ = settle.send(Settle::Acks(std::mem::take(&mut tags)));
                    }
                    to = Some(ticket.settle.clone());
                }
            }
            tags.push(ticket.tag);
            // Settled: its drop must not requeue it.
            ticket.tag = 0;
        }
        if let Some(settle) = to {
            // After a lost connection the acker is gone; the broker redelivers them.
            let _ = settle.send(Settle::Acks(tags));
        }
    }

    /// Hand the delivery back to the broker, unharmed, for a later attempt.
    pub fn requeue(mut self) {
        self.send(Settle::Requeue(self.tag));
    }

    /// Move the message to the dead-letter queue with `reason`, then acknowledge it. If the
    /// dead-letter queue does not confirm, the delivery is requeued instead.
    pub fn dead_letter(mut self, reason: String, code: &'static str) {
        let message = self
            .message
            .take()
            .expect("an unsettled ticket holds its message");
        self.send(Settle::DeadLetter(Box::new(DeadLetter {
            tag: self.tag,
            message,
            reason,
            code,
        })));
    }

    fn send(&mut self, settle: Settle) {
        // After a lost connection the acker is gone; the broker redelivers the message.
        let _ = self.settle.send(settle);
        self.tag = 0;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.tag != 0 {
            let _ = self.settle.send(Settle::Requeue(self.tag));
        }
    }
}

/// One connection to the broker: consuming, settling, dead-lettering.
pub struct Link {
    pub connection: Connection,
    consume: Channel,
    settle: mpsc::UnboundedSender<Settle>,
    acker: JoinHandle<()>,
    alive: Arc<AtomicBool>,
}

impl Link {
    /// Connects, makes sure both queues exist, and starts consuming with `prefetch`.
    pub async fn open(
        amqp: &config::Amqp,
        metrics: Arc<Metrics>,
    ) -> lapin::Result<(Link, lapin::Consumer)> {
        let connection = connect(amqp).await?;
        ensure_queue(&connection, &amqp.queue, amqp.declare).await?;
        ensure_queue(&connection, &amqp.dead_letter_queue, amqp.declare).await?;

        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consume = connection.create_channel().await?;
        consume
            .basic_qos(amqp.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = consume
            .basic_consume(
                amqp.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let (settle, rx) = mpsc::unbounded_channel();
        let acker = tokio::spawn(run_acker(
            consume.clone(),
            publish,
            amqp.dead_letter_queue.as_str().into(),
            rx,
            // Finished deliveries stuck behind a slow one are acknowledged one by one
            // before they take half of the prefetch window. In normal flow, those behind
            // the other region's gathering batch stay well below that.
            usize::from(amqp.prefetch / 2).max(1),
            metrics,
        ));
        Ok((
            Link {
                connection,
                consume,
                settle,
                acker,
                alive: Arc::new(AtomicBool::new(true)),
            },
            consumer,
        ))
    }

    /// Wraps a delivery of this link's consumer.
    pub fn ticket(&self, delivery: lapin::message::Delivery) -> Ticket {
        Ticket {
            tag: delivery.delivery_tag,
            received: Instant::now(),
            message: Some(Message {
                body: delivery.data,
                properties: delivery.properties,
            }),
            settle: self.settle.clone(),
            link_alive: self.alive.clone(),
        }
    }

    /// Marks the connection lost: its tickets are no longer worth sending.
    pub fn mark_lost(&self) {
        self.alive.store(false, Ordering::Relaxed);
    }

    /// Stops the broker from sending more deliveries; held ones stay ours to settle.
    pub async fn cancel(&self, consumer_tag: ShortString) -> lapin::Result<()> {
        self.consume
            .basic_cancel(consumer_tag, lapin::options::BasicCancelOptions::default())
            .await
    }

    /// Waits until every ticket of this link is settled and acknowledged, then closes the
    /// connection. Call it once nothing can hold a ticket any more.
    pub async fn close(self) {
        drop(self.settle);
        let _ = self.acker.await;
        let _ = self.connection.close(200, "OK".into()).await;
    }
}

/// How long a delivery whose dead-letter copy was not confirmed waits before it is
/// requeued: without it, a missing dead-letter queue would loop it at broker speed.
const DEAD_LETTER_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Finished deliveries waiting behind an unfinished one are acknowledged one by one once
/// they have waited two of these (so after 200 to 400 ms), unless a multiple ack covered
/// them first.
const STRAGGLER_TICK: Duration = Duration::from_millis(200);

/// Owns the consume channel's acknowledgements and the dead-letter publishing of a link.
async fn run_acker(
    consume: Channel,
    publish: Channel,
    dead_letter_queue: ShortString,
    mut rx: mpsc::UnboundedReceiver<Settle>,
    straggler_limit: usize,
    metrics: Arc<Metrics>,
) {
    let mut tracker = AckTracker::new(straggler_limit);
    let mut acks = Vec::new();
    let mut confirms = FuturesUnordered::new();
    let mut open = true;
    let mut tick = tokio::time::interval(STRAGGLER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            settle = rx.recv(), if open => match settle {
                Some(settle) => {
                    handle(settle, &consume, &publish, &dead_letter_queue, &mut tracker, &mut confirms).await;
                    // Take what else is ready, so that one ack covers as much as it can.
                    for _ in 0..4096 {
                        let Ok(settle) = rx.try_recv() else { break };
                        handle(settle, &consume, &publish, &dead_letter_queue, &mut tracker, &mut confirms).await;
                    }
                }
                None => open = false,
            },
            Some((tag, code, result)) = confirms.next(), if !confirms.is_empty() => {
                match result {
                    Ok(()) => {
                        metrics.dead_lettered(code);
                        // Acknowledged at once: a redelivery would make a second copy.
                        send_ack(&consume, Ack { tag, multiple: false }).await;
                        tracker.settle(tag, false);
                    }
                    Err(why) => {
                        tracing::error!(queue = %dead_letter_queue, error = %why, "Could not dead-letter a message; it was requeued. Check that the dead-letter queue exists and accepts messages.");
                        requeue(&consume, tag, &mut tracker).await;
                    }
                }
            },
            _ = tick.tick(), if tracker.waiting() > 0 => {
                tracker.tick();
                tracker.take_stale(2, &mut acks);
            },
            else => break,
        }
        tracker.take_acks(&mut acks);
        for ack in acks.drain(..) {
            send_ack(&consume, ack).await;
        }
    }
    // Every ticket is settled: acknowledge whatever still waits before the channel closes.
    tracker.take_stragglers(&mut acks);
    for ack in acks.drain(..) {
        send_ack(&consume, ack).await;
    }
}

async fn send_ack(consume: &Channel, ack: Ack) {
    let options = BasicAckOptions {
        multiple: ack.multiple,
    };
    if let Err(e) = consume.basic_ack(ack.tag, options).await {
        tracing::debug!(error = %e, "Acknowledgement not sent; the broker will redeliver.");
    }
}

type ConfirmFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (u64, &'static str, Result<(), String>)> + Send>,
>;

async fn handle(
    settle: Settle,
    consume: &Channel,
    publish: &Channel,
    dead_letter_queue: &ShortString,
    tracker: &mut AckTracker,
    confirms: &mut FuturesUnordered<ConfirmFuture>,
) {
    match settle {
        Settle::Ack(tag) => tracker.settle(tag, true),
        Settle::Acks(tags) => tags.into_iter().for_each(|tag| tracker.settle(tag, true)),
        Settle::Requeue(tag) => requeue(consume, tag, tracker).await,
        Settle::DeadLetter(dead) => {
            let DeadLetter {
                tag,
                message,
                reason,
                code,
            } = *dead;
            let properties = with_error_header(message.properties, &reason);
            let sent =
                publish_mandatory(publish, dead_letter_queue, &message.body, properties).await;
            confirms.push(Box::pin(async move {
                let result = match sent {
                    Ok(confirm) => confirmed(confirm).await,
                    Err(e) => Err(e.to_string()),
                };
                if result.is_err() {
                    tokio::time::sleep(DEAD_LETTER_RETRY_DELAY).await;
                }
                (tag, code, result)
            }));
        }
    }
}

async fn requeue(consume: &Channel, tag: u64, tracker: &mut AckTracker) {
    let options = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if let Err(e) = consume.basic_nack(tag, options).await {
        tracing::debug!(error = %e, "Requeue not sent; the broker will redeliver.");
    }
    tracker.settle(tag, false);
}

/// Publishes to `queue` through the default exchange, as mandatory: a queue that does not
/// exist makes the confirmation fail instead of the message vanishing.
pub async fn publish_mandatory(
    channel: &Channel,
    queue: &ShortString,
    body: &[u8],
    properties: BasicProperties,
) -> lapin::Result<PublisherConfirm> {
    channel
        .basic_publish(
            "".into(),
            queue.clone(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
}

/// Waits for the broker's confirmation of one publish.
pub async fn confirmed(confirm: PublisherConfirm) -> Result<(), String> {
    match confirm.await {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => {
            Err("the broker returned the message: no such queue".into())
        }
        Ok(Confirmation::Nack(_)) => Err("the broker refused the message (nack)".into()),
        Ok(Confirmation::NotRequested) => Err("the channel is not in confirm mode".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The message's properties with the reason for dead-lettering added as a header.
pub fn with_error_header(properties: BasicProperties, reason: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason.as_bytes().to_vec())),
    );
    properties.with_headers(headers)
}

/// The message's properties without the dead-letter reason, as before it was dead-lettered:
/// a message that had no headers gets none back.
pub fn without_error_header(properties: BasicProperties) -> BasicProperties {
    let Some(headers) = properties.headers() else {
        return properties;
    };
    let rest: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != ERROR_HEADER)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !rest.is_empty() {
        return properties.with_headers(FieldTable::from(rest));
    }
    // The properties type can set a header table but not unset it: copy the rest over.
    let p = &properties;
    let mut out = BasicProperties::default();
    macro_rules! copy {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(v) = p.$get().clone() { out = out.$set(v); })*
        };
    }
    copy!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        expiration => with_expiration,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    out
}

/// The reason header of a dead-lettered message, if any.
pub fn error_header(properties: &BasicProperties) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(ERROR_HEADER)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_header_is_added_beside_existing_headers_and_removed_again() {
        let mut headers = FieldTable::default();
        headers.insert("trace".into(), AMQPValue::LongString("t-1".into()));
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_delivery_mode(2)
            .with_headers(headers);

        let dead = with_error_header(original.clone(), "`email` is not an email address");
        assert_eq!(
            error_header(&dead).as_deref(),
            Some("`email` is not an email address")
        );
        assert!(dead.headers().as_ref().unwrap().contains_key("trace"));
        assert_eq!(dead.message_id(), original.message_id());

        assert_eq!(without_error_header(dead), original);
    }

    #[test]
    fn properties_without_headers_stay_without_the_error_header() {
        let p = BasicProperties::default().with_delivery_mode(2);
        assert_eq!(error_header(&p), None);
        assert_eq!(without_error_header(with_error_header(p.clone(), "x")), p);
        let p = p
            .with_content_type("application/json".into())
            .with_timestamp(1_615_507_200)
            .with_app_id("upstream".into());
        assert_eq!(without_error_header(with_error_header(p.clone(), "x")), p);
    }
}
