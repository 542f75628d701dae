//! The worker's link to RabbitMQ: consuming, and settling each delivery exactly once.
//!
//! A [`Link`] is a connection that consumes (its channel carries every ack for its
//! deliveries) and a connection that publishes, in confirm mode: dead letters, and the
//! copies of deliveries handed back. Each delivery becomes a [`Ticket`], which the
//! pipeline settles exactly once (through `Settle`):
//! - `Settle::ack`: Segment took its events, or there was nothing to send;
//! - `Settle::dead_letter`: bad input, moved to the dead-letter queue with its reason;
//! - `Settle::hand_back`: it must be tried again later through no fault of its own
//!   (Segment down past the hold limit, a refused write key, shutdown). Dropping an
//!   unsettled ticket hands it back too.
//!
//! Handing back never uses `basic.nack(requeue)`: a quorum queue counts every return
//! against its `x-delivery-limit` and drops or dead-letters the message once it runs out,
//! which would lose sessions to a long Segment outage. A hand-back publishes the message
//! again, unchanged, to the consumed queue, waits for the broker's confirm, and only then
//! acknowledges the original; the copy starts with a fresh delivery count. Should the
//! worker die between the two, both copies exist, and the second delivery of the session
//! carries the same messageIds. Only when the broker refuses the copy three times is the
//! original returned with `nack(requeue)`, logged as an error.
//!
//! A nack replaces the route's channel with a fresh one before the retry (see
//! `Acker::replace_nacking`): RabbitMQ 3.10 can keep nacking on a channel that first
//! published to a quorum queue while its leader's node was down.
//!
//! Settlements go to the link's acker task, which owns the consume channel's
//! acknowledgements and coalesces them (see [`super::ack`]). A ticket only ever settles on
//! the channel it came from: after a lost connection or channel, the broker has already
//! taken that channel's deliveries back, so nothing is published or acknowledged for them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ack::{Ack, AckTracker};
use super::settle::Settle;
use crate::amqp::headers::{for_copy, with_error_header};
use crate::amqp::{
    Unconfirmed, confirm_channel, confirmed, connect, connect_as, ensure_queue, publish_mandatory,
};
use crate::config;
use crate::metrics::Metrics;

/// A message as it came: what dead-lettering and handing back republish unchanged.
#[derive(Debug, Clone)]
pub struct Message {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// How a ticket is settled, and the link's other orders to its acker.
#[derive(Debug)]
enum Order {
    Ack(u64),
    /// The deliveries of one batch that Segment accepted: one message, not one per ticket.
    Acks(Vec<u64>),
    Publish(Box<Job>),
    /// No more deliveries will come: from here on acks go in order only (see
    /// [`super::ack`]). With a consumer tag, the acker then cancels that consumer itself,
    /// so that no single ack it computed before can follow the cancel on the wire.
    Cancel(Option<ShortString>, oneshot::Sender<lapin::Result<()>>),
}

/// A delivery to be published somewhere (with a confirm) and then acknowledged.
#[derive(Debug)]
struct Job {
    tag: u64,
    received: Instant,
    message: Message,
    target: Target,
    /// Attempts that failed so far.
    failures: u32,
}

#[derive(Debug)]
enum Target {
    /// To the dead-letter queue, with the reason in [`ERROR_HEADER`].
    DeadLetter { reason: String, code: &'static str },
    /// Back to the consumed queue, unchanged.
    HandBack,
}

/// One delivery in the pipeline. Settle it once through `Settle`: `ack`, `hand_back`
/// or `dead_letter`; dropping it unsettled hands it back.
#[derive(Debug)]
pub struct Ticket {
    tag: u64,
    received: Instant,
    message: Option<Message>,
    settle: mpsc::UnboundedSender<Order>,
    link_alive: Arc<AtomicBool>,
}

impl Ticket {
    pub fn message(&self) -> &Message {
        self.message
            .as_ref()
            .expect("an unsettled ticket holds its message")
    }

    fn publish(&mut self, target: Target) {
        let tag = std::mem::take(&mut self.tag);
        let message = self
            .message
            .take()
            .expect("an unsettled ticket holds its message");
        // After a lost connection the acker is gone; the broker redelivers the message.
        let _ = self.settle.send(Order::Publish(Box::new(Job {
            tag,
            received: self.received,
            message,
            target,
            failures: 0,
        })));
    }
}

impl Settle for Ticket {
    fn is_live(&self) -> bool {
        self.link_alive.load(Ordering::Relaxed)
    }

    fn received(&self) -> Instant {
        self.received
    }

    fn session_id(&self) -> String {
        super::session_id(self)
    }

    fn ack(mut self) {
        let tag = std::mem::take(&mut self.tag);
        let _ = self.settle.send(Order::Ack(tag));
    }

    /// A batch's tickets normally all come from one link: one message to its acker.
    fn ack_all(tickets: impl IntoIterator<Item = Ticket>) {
        let mut tags = Vec::new();
        let mut to: Option<mpsc::UnboundedSender<Order>> = None;
        for mut ticket in tickets {
            match &to {
                Some(settle) if settle.same_channel(&ticket.settle) => {}
                _ => {
                    if let Some(settle) = to.take() {
                        let _ = settle.send(Order::Acks(std::mem::take(&mut tags)));
                    }
                    to = Some(ticket.settle.clone());
                }
            }
            // Settled: its drop must not hand it back.
            tags.push(std::mem::take(&mut ticket.tag));
        }
        if let Some(settle) = to {
            // After a lost connection the acker is gone; the broker redelivers them.
            let _ = settle.send(Order::Acks(tags));
        }
    }

    /// Published again with a confirm, then acknowledged.
    fn hand_back(mut self) {
        self.publish(Target::HandBack);
    }

    /// If the dead-letter queue does not confirm, it is retried until the delivery has
    /// been held for `retry.max_hold_s` (or the link closes), and then handed back.
    fn dead_letter(mut self, reason: String, code: &'static str) {
        self.publish(Target::DeadLetter { reason, code });
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.tag != 0 {
            self.publish(Target::HandBack);
        }
    }
}

/// One link to the broker: a connection that consumes (and carries the acks), and one
/// that publishes dead letters and hand-back copies. Publishing has a connection of its
/// own because RabbitMQ, under a memory or disk alarm, stops reading from connections
/// that publish: the acks, which free the broker's memory, must still get through.
pub struct Link {
    connection: Connection,
    consume: Channel,
    settle: mpsc::UnboundedSender<Order>,
    acker: JoinHandle<()>,
    alive: Arc<AtomicBool>,
}

impl Link {
    /// Connects, makes sure both queues exist, and starts consuming with `prefetch`.
    /// A dead letter the broker does not confirm is retried until its delivery has been
    /// held for `max_hold`.
    pub async fn open(
        amqp: &config::Amqp,
        max_hold: Duration,
        metrics: Arc<Metrics>,
    ) -> lapin::Result<(Link, lapin::Consumer)> {
        let connection = connect(amqp).await?;
        ensure_queue(&connection, &amqp.queue, amqp.declare).await?;
        ensure_queue(&connection, &amqp.dead_letter_queue, amqp.declare).await?;
        let publisher = connect_as(amqp, PUBLISHER_NAME).await?;
        let back = confirm_channel(&publisher).await?;
        let dead = confirm_channel(&publisher).await?;

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

        let alive = Arc::new(AtomicBool::new(true));
        let (settle, rx) = mpsc::unbounded_channel();
        let acker = Acker {
            amqp: amqp.clone(),
            publisher,
            consume: consume.clone(),
            back: Route::new(back, &amqp.queue, false),
            dead: Route::new(dead, &amqp.dead_letter_queue, true),
            alive: alive.clone(),
            max_hold,
            metrics,
            // Finished deliveries stuck behind a slow one are acknowledged one by one
            // before they take half of the prefetch window. In normal flow, those behind
            // the other region's gathering batch stay well below that.
            tracker: AckTracker::new(usize::from(amqp.prefetch / 2).max(1)),
            acks: Vec::new(),
            pending: FuturesUnordered::new(),
            closing: CancellationToken::new(),
        };
        Ok((
            Link {
                connection,
                consume,
                settle,
                acker: tokio::spawn(acker.run(rx)),
                alive,
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

    /// Marks the connection lost: its tickets are no longer worth sending, and the broker
    /// has taken them back.
    pub fn mark_lost(&self) {
        self.alive.store(false, Ordering::Relaxed);
    }

    /// Whether the consuming channel is still open.
    pub fn is_connected(&self) -> bool {
        self.consume.status().connected()
    }

    /// Stops the broker from sending more deliveries (`consumer_tag`), or notes that the
    /// broker did (`None`); held deliveries stay ours to settle, acknowledged in order.
    pub async fn cancel(&self, consumer_tag: Option<ShortString>) -> lapin::Result<()> {
        let (done, result) = oneshot::channel();
        if self.settle.send(Order::Cancel(consumer_tag, done)).is_err() {
            return Ok(());
        }
        result.await.unwrap_or(Ok(()))
    }

    /// Waits until every ticket of this link is settled and acknowledged, then closes the
    /// connections. Call it once nothing can hold a ticket any more.
    pub async fn close(self) {
        drop(self.settle);
        let _ = self.acker.await;
        let _ = self.connection.close(200, "OK".into()).await;
    }
}

/// The name of the publishing connection, in the broker's connection list.
const PUBLISHER_NAME: &str = concat!(
    "segment-bridge/",
    env!("CARGO_PKG_VERSION"),
    " (publishing)"
);

/// How often the broker may refuse a hand-back's copy before the original is returned
/// with a plain `nack(requeue)`, which spends one of its deliveries on a quorum queue.
const HAND_BACK_ATTEMPTS: u32 = 3;
/// The first delay after a refused publish; it doubles with each failure, up to the cap.
const PUBLISH_RETRY_DELAY: Duration = Duration::from_secs(1);
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(30);
/// Once every ticket is settled (the link is closing), how long publishes still under way
/// may take. Confirms come in milliseconds; one that does not (a broker blocking
/// publishers) must not keep the acks of everything else from going out before the
/// process exits. What is given up on is redelivered by the broker.
const CLOSING_PATIENCE: Duration = Duration::from_secs(1);
/// How long a publishing channel replaced after a nack stays open for the confirms still
/// due on it.
const OLD_CHANNEL_LINGER: Duration = Duration::from_secs(10);
/// How long opening the publishing connection again may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished deliveries waiting behind an unfinished one are acknowledged one by one once
/// they have waited two of these (so after 200 to 400 ms), unless a multiple ack covered
/// them first.
const STRAGGLER_TICK: Duration = Duration::from_millis(200);

fn retry_delay(failures: u32) -> Duration {
    PUBLISH_RETRY_DELAY
        .saturating_mul(1 << failures.saturating_sub(1).min(5))
        .min(PUBLISH_RETRY_MAX)
}

/// What a pending publish came to.
enum Published {
    /// The broker confirmed it, or refused it (with why), on the channel of this id.
    Done(Box<Job>, Result<(), Unconfirmed>, Option<u16>),
    /// Its retry delay is over (or the link is closing): publish it again.
    Due(Box<Job>),
}

/// Where the acker publishes one kind of job, on a confirm channel of its own.
///
/// lapin hands a message the broker returned (unroutable, `mandatory`) to whichever
/// confirmation completes next on that channel, not necessarily the publish it belongs to.
/// So hand-backs and dead letters never share a channel, and dead letters go one at a
/// time: a dead letter taken for confirmed while its queue is missing would be lost.
/// Hand-backs all go to the consumed queue, which exists while it is consumed.
struct Route {
    /// In confirm mode; reopened if the broker closed it.
    channel: Channel,
    queue: ShortString,
    /// One publish under way at a time.
    serial: bool,
    in_flight: usize,
    /// Jobs waiting for their turn (serial routes only).
    waiting: VecDeque<Box<Job>>,
}

impl Route {
    fn new(channel: Channel, queue: &str, serial: bool) -> Route {
        Route {
            channel,
            queue: queue.into(),
            serial,
            in_flight: 0,
            waiting: VecDeque::new(),
        }
    }
}

/// Owns the consume channel's acknowledgements (and its cancel), and the publishing of
/// one link's dead letters and hand-backs.
struct Acker {
    amqp: config::Amqp,
    /// The publishing connection; opened again if it was lost.
    publisher: Connection,
    consume: Channel,
    /// Copies of handed-back deliveries, to the consumed queue.
    back: Route,
    /// Dead letters, to the dead-letter queue.
    dead: Route,
    alive: Arc<AtomicBool>,
    max_hold: Duration,
    metrics: Arc<Metrics>,
    tracker: AckTracker,
    acks: Vec<Ack>,
    pending: FuturesUnordered<BoxFuture<'static, Published>>,
    /// Cancelled when every ticket is settled or in a job: retries stop waiting, and a
    /// dead letter that fails is handed back at once.
    closing: CancellationToken,
}

impl Acker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Order>) {
        let mut open = true;
        let mut tick = tokio::time::interval(STRAGGLER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let patience = tokio::time::sleep(Duration::MAX);
        tokio::pin!(patience);
        loop {
            tokio::select! {
                settle = rx.recv(), if open => match settle {
                    Some(settle) => {
                        self.handle(settle).await;
                        // Take what else is ready, so that one ack covers as much as it can.
                        for _ in 0..4096 {
                            let Ok(settle) = rx.try_recv() else { break };
                            self.handle(settle).await;
                        }
                    }
                    None => {
                        open = false;
                        self.closing.cancel();
                        patience.as_mut().reset(Instant::now() + CLOSING_PATIENCE);
                    }
                },
                () = &mut patience, if !open && !self.pending.is_empty() => {
                    tracing::warn!(
                        publishes = self.pending.len(),
                        "The broker has not confirmed these copies in time; giving up on them before the link closes. Their deliveries go back to the queue with the channel."
                    );
                    self.pending.clear();
                },
                Some(published) = self.pending.next(), if !self.pending.is_empty() => {
                    match published {
                        Published::Due(job) => self.start(job).await,
                        Published::Done(job, result, channel) => {
                            if result == Err(Unconfirmed::Nack) {
                                self.replace_nacking(&job.target, channel).await;
                            }
                            let route = self.route(&job.target);
                            route.in_flight -= 1;
                            let next = route.waiting.pop_front();
                            self.finish(job, result).await;
                            if let Some(next) = next {
                                self.start(next).await;
                            }
                        }
                    }
                },
                _ = tick.tick(), if open && self.tracker.waiting() > 0 && !self.tracker.is_in_order_only() => {
                    self.tracker.tick();
                    self.tracker.take_stale(2, &mut self.acks);
                },
                else => break,
            }
            self.send_acks().await;
        }
        // Every ticket is settled. A tag still waiting stands above one that never became
        // a ticket (a cancelled stream given up on): it can only be acknowledged on its
        // own. Then close the channels and wait for the broker's close-ok, which comes
        // after it processed every ack before it; a connection torn down with acks still
        // on the wire loses them.
        self.tracker.take_all_waiting(&mut self.acks);
        self.send_acks().await;
        let _ = self.consume.close(200, "OK".into()).await;
        let _ = self.back.channel.close(200, "OK".into()).await;
        let _ = self.dead.channel.close(200, "OK".into()).await;
        let _ = self.publisher.close(200, "OK".into()).await;
    }

    async fn handle(&mut self, settle: Order) {
        match settle {
            Order::Ack(tag) => self.tracker.settle(tag, true),
            Order::Acks(tags) => tags
                .into_iter()
                .for_each(|tag| self.tracker.settle(tag, true)),
            Order::Publish(job) => self.start(job).await,
            Order::Cancel(consumer_tag, done) => {
                // What was decided before goes out before the cancel.
                self.send_acks().await;
                self.tracker.in_order_only();
                let result = match consumer_tag {
                    Some(tag) => {
                        self.consume
                            .basic_cancel(tag, lapin::options::BasicCancelOptions::default())
                            .await
                    }
                    None => Ok(()),
                };
                let _ = done.send(result);
            }
        }
    }

    /// Counts a job given up on with its channel. A hand-back was counted as handed back
    /// when it was decided (it goes back to the queue either way); a dead letter is
    /// counted only once confirmed, so one that never was is let go to the broker.
    fn let_go(&self, job: &Job) {
        if matches!(job.target, Target::DeadLetter { .. }) {
            self.metrics.released(1);
        }
    }

    /// False once the consuming channel is gone: the broker took its deliveries back.
    fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed) && self.consume.status().connected()
    }

    fn route(&mut self, target: &Target) -> &mut Route {
        match target {
            Target::DeadLetter { .. } => &mut self.dead,
            Target::HandBack => &mut self.back,
        }
    }

    /// Publishes the job's message; the publish and its confirm are awaited in `pending`,
    /// so that many hand-backs (at shutdown, say) are under way at once.
    async fn start(&mut self, job: Box<Job>) {
        if !self.alive() {
            // The broker took the delivery back with its channel; a copy would be a duplicate.
            self.let_go(&job);
            return self.tracker.settle(job.tag, false);
        }
        let properties = match &job.target {
            Target::DeadLetter { reason, .. } => {
                with_error_header(for_copy(job.message.properties.clone()), reason)
            }
            Target::HandBack => for_copy(job.message.properties.clone()),
        };
        let route = match &job.target {
            Target::DeadLetter { .. } => &self.dead,
            Target::HandBack => &self.back,
        };
        if route.serial && route.in_flight > 0 {
            return self.route(&job.target).waiting.push_back(job);
        }
        let reopened = if route.channel.status().connected() {
            None
        } else {
            Some(self.reopen().await)
        };
        let route = self.route(&job.target);
        route.in_flight += 1;
        match reopened {
            Some(Ok(channel)) => route.channel = channel,
            Some(Err(e)) => {
                let result = Err(Unconfirmed::Failed(format!(
                    "cannot reopen the publishing channel: {e}"
                )));
                return self
                    .pending
                    .push(Box::pin(async move { Published::Done(job, result, None) }));
            }
            None => {}
        }
        let (channel, queue) = (route.channel.clone(), route.queue.clone());
        self.pending.push(Box::pin(async move {
            let sent = publish_mandatory(&channel, &queue, &job.message.body, properties).await;
            let result = match sent {
                Ok(confirm) => confirmed(confirm).await,
                Err(e) => Err(Unconfirmed::Failed(e.to_string())),
            };
            Published::Done(job, result, Some(channel.id()))
        }));
    }

    /// After a nack on the channel `nacked` of `target`'s route, replaces that channel by a
    /// fresh confirm channel (unless it was replaced already): RabbitMQ 3.10 can keep
    /// refusing every publish to a quorum queue on a channel whose first publish came while
    /// the queue's leader's node was down, while a channel opened later is fine. The job is
    /// retried on the fresh channel after its usual delay (see [`finish`](Self::finish)).
    /// Publishes still under way on the old channel get their confirms: it is closed after
    /// [`OLD_CHANNEL_LINGER`].
    async fn replace_nacking(&mut self, target: &Target, nacked: Option<u16>) {
        let route = self.route(target);
        if nacked != Some(route.channel.id()) || !route.channel.status().connected() {
            return;
        }
        match self.reopen().await {
            Ok(fresh) => {
                let route = self.route(target);
                let old = std::mem::replace(&mut route.channel, fresh);
                let queue = route.queue.clone();
                self.metrics.channel_replaced();
                tracing::warn!(queue = %queue, channel = old.id(), "RabbitMQ refused a publish (nack); publishing on a fresh channel from now on.");
                tokio::spawn(async move {
                    tokio::time::sleep(OLD_CHANNEL_LINGER).await;
                    let _ = old.close(200, "OK".into()).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot open a fresh publishing channel after a nack; trying again with the next publish.");
            }
        }
    }

    /// A new confirm channel on the publishing connection, which is opened again first if
    /// it was lost.
    async fn reopen(&mut self) -> lapin::Result<Channel> {
        if !self.publisher.status().connected() {
            // lapin's connect has no timeout of its own.
            self.publisher =
                tokio::time::timeout(RECONNECT_TIMEOUT, connect_as(&self.amqp, PUBLISHER_NAME))
                    .await
                    .map_err(|_| {
                        lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no answer from the broker",
                            ),
                        )))
                    })??;
        }
        confirm_channel(&self.publisher).await
    }

    async fn finish(&mut self, mut job: Box<Job>, result: Result<(), Unconfirmed>) {
        let error = match result {
            Ok(()) => {
                let Target::DeadLetter { code, .. } = job.target else {
                    // A second copy of a handed-back session is harmless (same messageIds):
                    // its ack may be coalesced with others.
                    return self.tracker.settle(job.tag, true);
                };
                self.metrics.dead_lettered(code);
                if self.tracker.is_in_order_only() {
                    return self.tracker.settle(job.tag, true);
                }
                // Acknowledged at once: a redelivery now would make a second dead letter.
                send_ack(
                    &self.consume,
                    Ack {
                        tag: job.tag,
                        multiple: false,
                    },
                )
                .await;
                return self.tracker.settle(job.tag, false);
            }
            Err(_) if !self.alive() => {
                self.let_go(&job);
                return self.tracker.settle(job.tag, false);
            }
            Err(e) => e,
        };
        job.failures += 1;
        let delay = retry_delay(job.failures);
        let closing = self.closing.is_cancelled();
        match job.target {
            Target::DeadLetter { .. }
                if !closing && job.received.elapsed() + delay < self.max_hold =>
            {
                tracing::error!(queue = %self.dead.queue, error = %error, retry_in = ?delay, "Could not dead-letter a message; holding it and trying again. Check that the dead-letter queue exists and accepts messages.");
            }
            Target::DeadLetter { .. } => {
                tracing::error!(queue = %self.dead.queue, error = %error, "Could not dead-letter a message (within retry.max_hold_s, or before shutting down); handing it back to the queue unchanged.");
                self.metrics.requeued("dead_letter_unconfirmed", 1);
                job.target = Target::HandBack;
                job.failures = 0;
                return self.start(job).await;
            }
            Target::HandBack if !closing && job.failures < HAND_BACK_ATTEMPTS => {
                tracing::warn!(queue = %self.back.queue, error = %error, retry_in = ?delay, "The broker did not take back a copy of a held message; trying again.");
            }
            Target::HandBack => {
                tracing::error!(queue = %self.back.queue, error = %error, "The broker refused a copy of a held message; returning the original with nack(requeue), which counts against a quorum queue's x-delivery-limit.");
                self.metrics.requeue_fallback();
                return requeue(&self.consume, job.tag, &mut self.tracker).await;
            }
        }
        let closing = self.closing.clone();
        self.pending.push(Box::pin(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = closing.cancelled() => {}
            }
            Published::Due(job)
        }));
    }

    async fn send_acks(&mut self) {
        self.tracker.take_acks(&mut self.acks);
        for ack in self.acks.drain(..) {
            send_ack(&self.consume, ack).await;
        }
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

/// The last resort of a hand-back: it spends one of the message's deliveries.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_publishes_are_retried_after_doubling_delays_up_to_a_cap() {
        let delays: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
