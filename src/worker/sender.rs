//! One region's sender: posts its batches to Segment, `max_in_flight` at a time, and
//! settles each batch's deliveries by the outcome: acknowledged, retried, split to find
//! what Segment rejects, or handed back.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::RetryPolicy;
use crate::batch::Batch;
use crate::domain::Region;
use crate::events;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::segment::{Outcome, Post};

use super::settle::Settle;

/// Sends one region's batches, one per permit of `permits` (`max_in_flight` of them) at a
/// time, until its channel closes; then waits for every request. The gatherer reads the
/// free permits too (see [`super::gather`]).
pub(super) async fn run_sender<T: Settle, S: Post>(
    mut rx: mpsc::UnboundedReceiver<Batch<T>>,
    deliverer: Arc<Deliverer<S>>,
    permits: Arc<Semaphore>,
) {
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
async fn dispatch<T: Settle, S: Post>(
    batch: Batch<T>,
    in_flight: &mut JoinSet<()>,
    permits: &Arc<Semaphore>,
    deliverer: &Arc<Deliverer<S>>,
) {
    let Some(oldest) = batch.entries().iter().map(|e| e.ticket.received()).min() else {
        return;
    };
    let deadline = oldest + deliverer.max_hold;
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
pub(super) struct Deliverer<S> {
    pub(super) region: Region,
    pub(super) sink: S,
    pub(super) policy: RetryPolicy,
    pub(super) max_hold: Duration,
    pub(super) health: Arc<Health>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) stop_consuming: CancellationToken,
    pub(super) shutdown: CancellationToken,
    /// Shutdown's last call: hand back whatever is not yet taken.
    pub(super) abandon: CancellationToken,
}

impl<S: Post> Deliverer<S> {
    /// Posts the batch until Segment takes it, isolating what it rejects; never gives up
    /// on a transient failure, but hands it back rather than hold a delivery past
    /// `max_hold`.
    async fn deliver<T: Settle>(&self, mut batch: Batch<T>) {
        let region = self.region;
        let mut backoff = self.policy.backoff();
        loop {
            if self.health.is_misconfigured(region) {
                return self.hand_back(batch, "misconfigured");
            }
            // Deliveries of a lost connection come again on the new one; let those go.
            let lost = batch.retain(|e| e.ticket.is_live());
            self.metrics.released(lost.len() as u64);
            drop(lost);
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
                response = self.sink.post(body) => response,
            };
            self.metrics.in_flight(-1.0);
            self.metrics
                .request(region, &response.status, batch.events(), started.elapsed());
            match response.outcome {
                Outcome::Accepted => {
                    self.metrics.events_sent(region, batch.events() as u64);
                    // A delivery whose link was lost during the request is not
                    // acknowledged: the broker redelivers it (same messageIds).
                    let live = batch
                        .entries()
                        .iter()
                        .filter(|e| e.ticket.is_live())
                        .count();
                    self.metrics.sessions("delivered", live as u64);
                    self.metrics.released((batch.len() - live) as u64);
                    T::ack_all(batch.into_entries().into_iter().map(|e| e.ticket));
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
                    let session_id = entry.ticket.session_id();
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

    fn hand_back<T: Settle>(&self, batch: Batch<T>, cause: &'static str) {
        // A lost link's deliveries are the broker's again: not counted, not copied.
        let live = batch
            .entries()
            .iter()
            .filter(|e| e.ticket.is_live())
            .count();
        self.metrics.requeued(cause, live as u64);
        self.metrics.released((batch.len() - live) as u64);
        for entry in batch.into_entries() {
            entry.ticket.hand_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::task::JoinHandle;
    use tokio::time::{Instant, sleep};

    use super::*;
    use crate::segment::RetryCause;
    use crate::worker::fake::{Answer, Ledger, Scripted, Settled, batch};

    const SEC: Duration = Duration::from_secs(1);
    const MAX_HOLD: Duration = Duration::from_secs(60);
    const POLICY: RetryPolicy = RetryPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(8),
    };

    fn deliverer(region: Region, sink: Scripted, max_hold: Duration) -> Arc<Deliverer<Scripted>> {
        Arc::new(Deliverer {
            region,
            sink,
            policy: POLICY,
            max_hold,
            health: Arc::new(Health::default()),
            metrics: Arc::new(Metrics::new()),
            stop_consuming: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            abandon: CancellationToken::new(),
        })
    }

    /// A running sender: its channel, and its task, which ends once every batch is settled.
    struct Running {
        tx: mpsc::UnboundedSender<Batch<crate::worker::fake::FakeTicket>>,
        task: JoinHandle<()>,
    }

    fn start(deliverer: &Arc<Deliverer<Scripted>>, max_in_flight: usize) -> Running {
        let (tx, rx) = mpsc::unbounded_channel();
        Running {
            tx,
            task: tokio::spawn(run_sender(
                rx,
                deliverer.clone(),
                Arc::new(Semaphore::new(max_in_flight)),
            )),
        }
    }

    impl Running {
        /// Closes the channel and waits (an hour at most) for every batch to be settled.
        async fn finish(self) {
            drop(self.tx);
            tokio::time::timeout(Duration::from_secs(3600), self.task)
                .await
                .expect("every batch is settled within the hour")
                .unwrap();
        }
    }

    fn retry(after: Option<Duration>) -> Outcome {
        Outcome::Retry {
            after,
            cause: RetryCause::ServerError,
        }
    }

    fn gaps(posted: &[crate::worker::fake::Posted]) -> Vec<Duration> {
        posted.windows(2).map(|w| w[1].at - w[0].at).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_after_exponential_delays_with_jitter_up_to_the_cap() {
        let ledger = Ledger::default();
        let link = ledger.link();
        let answers = (0..6).map(|_| Answer::at_once(retry(None)));
        let d = deliverer(Region::Us, Scripted::answers(answers), MAX_HOLD);
        let sender = start(&d, 4);
        sender.tx.send(batch([link.entry(1, Region::Us)])).unwrap();
        sender.finish().await;

        let posted = d.sink.posted();
        assert_eq!(posted.len(), 7, "six failures, then taken");
        let gaps = gaps(&posted);
        for (i, gap) in gaps.iter().enumerate() {
            // 1 s, 2 s, 4 s, then the 8 s cap; jitter adds up to as much again.
            let base = (SEC * (1 << i)).min(POLICY.max);
            // The timer counts whole milliseconds.
            let most = (base * 2).min(POLICY.max) + Duration::from_millis(1);
            assert!(*gap >= base && *gap <= most, "retry {i} after {gap:?}");
        }
        assert_eq!(ledger.of(1).unwrap(), (Settled::Acked, posted[6].at));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_wins_over_the_backoff() {
        let ledger = Ledger::default();
        let link = ledger.link();
        let answers = [
            Answer::at_once(retry(Some(7 * SEC))),
            Answer::at_once(retry(Some(SEC / 2))),
        ];
        let d = deliverer(Region::Us, Scripted::answers(answers), MAX_HOLD);
        let sender = start(&d, 4);
        sender.tx.send(batch([link.entry(1, Region::Us)])).unwrap();
        sender.finish().await;

        assert_eq!(gaps(&d.sink.posted()), [7 * SEC, SEC / 2]);
        assert_eq!(ledger.ids(&Settled::Acked), [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_being_retried_is_handed_back_once_held_for_max_hold_and_never_later() {
        let ledger = Ledger::default();
        let link = ledger.link();
        let start_at = Instant::now();
        let always = Scripted::new(|_| Answer::at_once(retry(Some(5 * SEC))));
        let d = deliverer(Region::Us, always, 10 * SEC);
        let sender = start(&d, 4);
        sender
            .tx
            .send(batch([
                link.entry(1, Region::Us),
                link.entry(2, Region::Us),
            ]))
            .unwrap();
        sender.finish().await;

        let posted = d.sink.posted();
        assert_eq!(
            posted.iter().map(|p| p.at - start_at).collect::<Vec<_>>(),
            [Duration::ZERO, 5 * SEC],
            "no attempt once the hold limit is reached"
        );
        for id in [1, 2] {
            assert_eq!(
                ledger.of(id).unwrap(),
                (Settled::HandedBack, start_at + 10 * SEC)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_that_would_end_past_max_hold_hands_the_batch_back_at_once() {
        let ledger = Ledger::default();
        let link = ledger.link();
        let start_at = Instant::now();
        let answers = [Answer::after(3 * SEC, retry(Some(8 * SEC)))];
        let d = deliverer(Region::Us, Scripted::answers(answers), 10 * SEC);
        let sender = start(&d, 4);
        sender.tx.send(batch([link.entry(1, Region::Us)])).unwrap();
        sender.finish().await;

        assert_eq!(d.sink.posted().len(), 1);
        assert_eq!(
            ledger.of(1).unwrap(),
            (Settled::HandedBack, start_at + 3 * SEC)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waiting_for_a_request_slot_is_handed_back_once_held_for_max_hold() {
        let ledger = Ledger::default();
        let link = ledger.link();
        let start_at = Instant::now();
        // The one slot is taken by a request Segment answers after 30 s.
        let answers = [Answer::after(30 * SEC, Outcome::Accepted)];
        let d = deliverer(Region::Us, Scripted::answers(answers), 10 * SEC);
        let sender = start(&d, 1);
        sender.tx.send(batch([link.entry(1, Region::Us)])).unwrap();
        sleep(3 * SEC).await;
        sender.tx.send(batch([link.entry(2, Region::Us)])).unwrap();
        sender.finish().await;

        assert_eq!(
            ledger.of(2).unwrap(),
            (Settled::HandedBack, start_at + 13 * SEC)
        );
        assert_eq!(ledger.of(1).unwrap(), (Settled::Acked, start_at + 30 * SEC));
        assert_eq!(
            d.sink.posted().len(),
            1,
            "the second batch was never posted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_batch_is_split_until_the_bad_session_is_dead_lettered_and_the_rest_acknowledged()
     {
        let ledger = Ledger::default();
        let link = ledger.link();
        let segment = Scripted::new(|sessions| {
            Answer::at_once(if sessions.contains(&4) {
                Outcome::Rejected {
                    status: 400,
                    detail: "bad event".into(),
                }
            } else {
                Outcome::Accepted
            })
        });
        let d = deliverer(Region::Us, segment, MAX_HOLD);
        let sender = start(&d, 4);
        sender
            .tx
            .send(batch((1..=5).map(|id| link.entry(id, Region::Us))))
            .unwrap();
        sender.finish().await;

        assert_eq!(
            ledger.ids(&Settled::DeadLettered("rejected_by_segment")),
            [4]
        );
        assert_eq!(ledger.ids(&Settled::Acked), [1, 2, 3, 5]);
        let posted: Vec<_> = d.sink.posted().into_iter().map(|p| p.sessions).collect();
        assert_eq!(
            posted,
            [
                vec![1, 2, 3, 4, 5],
                vec![1, 2],
                vec![3, 4, 5],
                vec![3],
                vec![4, 5],
                vec![4],
                vec![5]
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_key_hands_the_regions_deliveries_back_stops_consuming_and_dead_letters_nothing()
     {
        let ledger = Ledger::default();
        let link = ledger.link();
        let refused = [Answer::at_once(Outcome::Misconfigured { status: 401 })];
        let us = deliverer(Region::Us, Scripted::answers(refused), MAX_HOLD);
        let health = us.health.clone();
        health.set_connected(true);
        health.set_consuming(true);
        assert!(health.readiness().is_ok());
        let eu = Arc::new(Deliverer {
            region: Region::Eu,
            sink: Scripted::answers([]),
            policy: POLICY,
            max_hold: MAX_HOLD,
            health: health.clone(),
            metrics: us.metrics.clone(),
            stop_consuming: us.stop_consuming.clone(),
            shutdown: us.shutdown.clone(),
            abandon: us.abandon.clone(),
        });
        let (us_sender, eu_sender) = (start(&us, 4), start(&eu, 4));
        us_sender
            .tx
            .send(batch([
                link.entry(1, Region::Us),
                link.entry(2, Region::Us),
            ]))
            .unwrap();
        sleep(SEC).await;
        us_sender
            .tx
            .send(batch([link.entry(3, Region::Us)]))
            .unwrap();
        eu_sender
            .tx
            .send(batch([link.entry(4, Region::Eu)]))
            .unwrap();
        us_sender.finish().await;
        eu_sender.finish().await;

        use Settled::{Acked, HandedBack};
        assert_eq!(
            ledger.all(),
            [
                (1, HandedBack),
                (2, HandedBack),
                (3, HandedBack),
                (4, Acked)
            ],
            "the refused region's deliveries go back, the other region's are sent, nothing is dead-lettered"
        );
        assert_eq!(
            us.sink.posted().len(),
            1,
            "nothing more is posted with a refused key"
        );
        assert!(
            us.stop_consuming.is_cancelled(),
            "the worker stops consuming"
        );
        assert!(health.is_misconfigured(Region::Us));
        assert!(
            health
                .readiness()
                .unwrap_err()
                .contains("refused the us write key")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn on_shutdown_a_batch_being_retried_is_handed_back_at_once() {
        let ledger = Ledger::default();
        let link = ledger.link();
        let start_at = Instant::now();
        let answers = [Answer::at_once(retry(Some(30 * SEC)))];
        let d = deliverer(Region::Us, Scripted::answers(answers), MAX_HOLD);
        let sender = start(&d, 4);
        sender.tx.send(batch([link.entry(1, Region::Us)])).unwrap();
        sleep(5 * SEC).await;
        d.shutdown.cancel();
        sender.finish().await;

        assert_eq!(
            ledger.of(1).unwrap(),
            (Settled::HandedBack, start_at + 5 * SEC)
        );
        assert_eq!(d.sink.posted().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn on_shutdown_what_segment_has_not_answered_is_handed_back_when_abandon_fires() {
        let ledger = Ledger::default();
        let link = ledger.link();
        let start_at = Instant::now();
        let d = deliverer(Region::Us, Scripted::new(|_| Answer::never()), MAX_HOLD);
        // One request under way, one batch waiting for the slot.
        let sender = start(&d, 1);
        sender.tx.send(batch([link.entry(1, Region::Us)])).unwrap();
        sender.tx.send(batch([link.entry(2, Region::Us)])).unwrap();
        sleep(5 * SEC).await;
        d.shutdown.cancel();
        sleep(3 * SEC).await;
        assert_eq!(
            ledger.of(1),
            None,
            "shutdown alone waits for Segment's answer"
        );
        assert_eq!(ledger.of(2), None);
        d.abandon.cancel();
        sender.finish().await;

        for id in [1, 2] {
            assert_eq!(
                ledger.of(id).unwrap(),
                (Settled::HandedBack, start_at + 8 * SEC)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_of_a_lost_link_are_dropped_without_ack_or_copy() {
        let ledger = Ledger::default();
        let (lost, live) = (ledger.link(), ledger.link());
        let answers = [Answer::after(SEC, retry(Some(SEC)))];
        let d = deliverer(Region::Us, Scripted::answers(answers), MAX_HOLD);
        let sender = start(&d, 4);
        sender
            .tx
            .send(batch([
                lost.entry(1, Region::Us),
                live.entry(2, Region::Us),
                lost.entry(3, Region::Us),
            ]))
            .unwrap();
        // Lost while Segment is deciding.
        sleep(SEC / 2).await;
        lost.mark_lost();
        sender.finish().await;

        let posted: Vec<_> = d.sink.posted().into_iter().map(|p| p.sessions).collect();
        assert_eq!(posted, [vec![1, 2, 3], vec![2]]);
        assert_eq!(ledger.ids(&Settled::Dropped), [1, 3]);
        assert_eq!(ledger.ids(&Settled::Acked), [2]);
        let totals = d.metrics.totals();
        assert_eq!(
            (totals.delivered, totals.released),
            (1, 2),
            "only the live delivery counts as delivered; the lost ones are let go"
        );
    }
}
