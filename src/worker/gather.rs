//! The batches being gathered, one per region, owned by the consuming task: which batch a
//! session's events join, and when a batch goes to its region's sender (the flush
//! deadlines, the idle rule and their one timer).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

use crate::batch::{Batch, Entry, Limits};
use crate::domain::Region;

use super::Sender;

/// The batches being gathered, one per region, owned by the consuming task. A batch goes
/// to its region's sender when the next session would not fit, when it is full, when its
/// oldest event has waited `flush_interval`, or when no session joined it for
/// `flush_idle` (the end of a burst: nothing is coming to fill it) while the sender has a
/// request slot free. With every slot taken (Segment slow, or retrying), a batch sent
/// early would only wait in line, and the sessions after it would make batches of their
/// own: it keeps gathering until `flush_interval` instead.
pub(super) struct Gather<T> {
    batches: [Batch<T>; 2],
    /// When each region's batch must go, if it holds anything.
    deadlines: [Option<Instant>; 2],
    /// When a session last joined each region's batch.
    last_push: [Instant; 2],
    senders: [Option<Sender<T>>; 2],
    /// Each sender's request slots; `None`: always taken to have one free.
    slots: [Option<Arc<Semaphore>>; 2],
    flush_interval: Duration,
    /// `None`: no idle rule, only `flush_interval`.
    flush_idle: Option<Duration>,
    /// One timer for the flush deadlines. It is set earlier when the earliest deadline
    /// comes earlier, never later: the idle point moves with every session, and a timer
    /// reset per delivery would cost more than the rare wake-up that finds nothing due.
    timer: Pin<Box<Sleep>>,
    /// The deadline the timer is set for, if any.
    armed: Option<Instant>,
}

impl<T> Gather<T> {
    pub(super) fn new(
        senders: [Option<Sender<T>>; 2],
        slots: [Option<Arc<Semaphore>>; 2],
        limits: Limits,
        flush_interval: Duration,
        flush_idle: Option<Duration>,
    ) -> Self {
        let now = Instant::now();
        Gather {
            batches: [Batch::new(limits), Batch::new(limits)],
            deadlines: [None, None],
            last_push: [now, now],
            senders,
            slots,
            flush_interval,
            flush_idle: flush_idle.filter(|idle| !idle.is_zero() && *idle < flush_interval),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
        }
    }

    pub(super) fn has_sender(&self, region: Region) -> bool {
        self.senders[region as usize].is_some()
    }

    pub(super) fn push(&mut self, region: Region, entry: Entry<T>) {
        let i = region as usize;
        if !self.batches[i].is_empty() && !self.batches[i].fits(&entry.events) {
            self.send(i);
        }
        let now = Instant::now();
        if self.batches[i].is_empty() {
            self.deadlines[i] = Some(now + self.flush_interval);
        }
        self.last_push[i] = now;
        self.batches[i].push(entry);
        if self.batches[i].is_full() {
            self.send(i);
        }
    }

    /// When region `i`'s batch must go, if it holds anything: its flush deadline, or
    /// earlier once it has been idle for `flush_idle`, if its sender has a slot free.
    fn due(&self, i: usize) -> Option<Instant> {
        let deadline = self.deadlines[i]?;
        let slot_free = self.slots[i]
            .as_ref()
            .is_none_or(|slots| slots.available_permits() > 0);
        Some(match self.flush_idle {
            Some(idle) if slot_free => deadline.min(self.last_push[i] + idle),
            _ => deadline,
        })
    }

    /// The earliest moment a batch must go.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        (0..2).filter_map(|i| self.due(i)).min()
    }

    /// Waits for the earliest flush deadline, then sends the batches whose deadline has
    /// come. Pending for as long as no batch holds anything; dropped before it completes,
    /// it sends nothing.
    pub(super) async fn flush_when_due(&mut self) {
        loop {
            let Some(due) = self.next_deadline() else {
                self.armed = None;
                return std::future::pending().await;
            };
            if self.armed.is_none_or(|armed| due < armed) {
                self.timer.as_mut().reset(due);
                self.armed = Some(due);
            }
            self.timer.as_mut().await;
            self.armed = None;
            if self.flush_due(Instant::now()) {
                return;
            }
            // Set for an idle point that sessions have since moved on: wait again.
        }
    }

    /// Sends the batches whose deadline has come; false if none had.
    pub(super) fn flush_due(&mut self, now: Instant) -> bool {
        let mut sent = false;
        for i in 0..2 {
            if self.due(i).is_some_and(|d| d <= now) {
                self.send(i);
                sent = true;
            }
        }
        sent
    }

    pub(super) fn flush_all(&mut self) {
        for i in 0..2 {
            if !self.batches[i].is_empty() {
                self.send(i);
            }
        }
    }

    pub(super) fn send(&mut self, i: usize) {
        self.deadlines[i] = None;
        let batch = self.batches[i].take();
        if let Some(sender) = &self.senders[i] {
            // The senders live as long as the batches; one that panicked would drop the
            // batch, and its tickets would be handed back.
            let _ = sender.send(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tokio::time::{Instant, advance, timeout};

    use super::*;
    use crate::worker::fake::{FakeTicket, Ledger, ROOMY, events, ids};

    const INTERVAL: Duration = Duration::from_millis(500);
    const MS: Duration = Duration::from_millis(1);

    type Receivers = [mpsc::UnboundedReceiver<Batch<FakeTicket>>; 2];

    const IDLE: Duration = Duration::from_millis(50);

    /// Batches with `flush_interval` only, no idle rule.
    fn gather(limits: Limits) -> (Gather<FakeTicket>, Receivers) {
        gather_idle(limits, None)
    }

    fn gather_idle(limits: Limits, idle: Option<Duration>) -> (Gather<FakeTicket>, Receivers) {
        let (us, us_rx) = mpsc::unbounded_channel();
        let (eu, eu_rx) = mpsc::unbounded_channel();
        (
            Gather::new([Some(us), Some(eu)], [None, None], limits, INTERVAL, idle),
            [us_rx, eu_rx],
        )
    }

    /// Roomy limits but for a batch of at most `n` events.
    fn at_most_events(n: usize) -> Limits {
        Limits {
            max_events: n,
            ..ROOMY
        }
    }

    /// The batches a region's sender has been given so far, as session ids.
    fn sent(rx: &mut mpsc::UnboundedReceiver<Batch<FakeTicket>>) -> Vec<Vec<u32>> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|b| ids(&b))
            .collect()
    }

    /// Waits, as the consuming task does, for the next flush deadline; returns when it came.
    async fn next_flush(gather: &mut Gather<FakeTicket>) -> Instant {
        timeout(Duration::from_secs(3600), gather.flush_when_due())
            .await
            .expect("a batch is gathering");
        Instant::now()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_when_its_oldest_event_has_waited_the_flush_interval_and_not_before() {
        let link = Ledger::default().link();
        let (mut gather, [mut us, _eu]) = gather(ROOMY);
        let start = Instant::now();
        gather.push(Region::Us, link.entry(1, Region::Us));
        advance(300 * MS).await;
        gather.push(Region::Us, link.entry(2, Region::Us));
        assert!(
            timeout(199 * MS, gather.flush_when_due()).await.is_err(),
            "not before the oldest has waited the interval"
        );
        assert!(sent(&mut us).is_empty());
        assert_eq!(next_flush(&mut gather).await - start, INTERVAL);
        assert_eq!(sent(&mut us), [vec![1, 2]]);

        // The next batch's clock starts with its own first event.
        advance(100 * MS).await;
        let second = Instant::now();
        gather.push(Region::Us, link.entry(3, Region::Us));
        assert_eq!(next_flush(&mut gather).await - second, INTERVAL);
        assert_eq!(sent(&mut us), [vec![3]]);
        assert_eq!(gather.next_deadline(), None, "nothing left to flush");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_full_by_events_goes_at_once() {
        let link = Ledger::default().link();
        let (mut gather, [mut us, _eu]) = gather(at_most_events(5));
        gather.push(Region::Us, link.entry(1, Region::Us));
        assert!(sent(&mut us).is_empty());
        gather.push(Region::Us, link.entry(2, Region::Us));
        assert_eq!(
            sent(&mut us),
            [vec![1, 2]],
            "4 events: a third session would make 6"
        );
        assert_eq!(gather.next_deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_would_pass_the_byte_limit_sends_the_batch_before_it() {
        let link = Ledger::default().link();
        let one =
            Batch::<FakeTicket>::new(ROOMY).body_bytes() + events(1, Region::Us, 100).len() + 1;
        let limits = Limits {
            max_bytes: 2 * one,
            ..ROOMY
        };
        let (mut gather, [mut us, _eu]) = gather(limits);
        let entry = |id| Entry {
            ticket: link.ticket(id),
            events: events(id, Region::Us, 100),
        };
        gather.push(Region::Us, entry(1));
        gather.push(Region::Us, entry(2));
        assert!(sent(&mut us).is_empty(), "two fit");
        advance(100 * MS).await;
        let third = Instant::now();
        gather.push(Region::Us, entry(3));
        assert_eq!(sent(&mut us), [vec![1, 2]], "the third would not fit");
        assert_eq!(
            gather.next_deadline(),
            Some(third + INTERVAL),
            "the third starts a batch of its own, with its own deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_two_regions_batches_are_independent() {
        let link = Ledger::default().link();
        let (mut gather, [mut us, mut eu]) = gather(at_most_events(4));
        let start = Instant::now();
        gather.push(Region::Us, link.entry(1, Region::Us));
        advance(300 * MS).await;
        gather.push(Region::Eu, link.entry(2, Region::Eu));
        gather.push(Region::Eu, link.entry(3, Region::Eu));
        assert_eq!(sent(&mut eu), [vec![2, 3]], "the EU batch is full");
        assert!(sent(&mut us).is_empty(), "the US batch is not");
        gather.push(Region::Eu, link.entry(4, Region::Eu));

        assert_eq!(next_flush(&mut gather).await - start, INTERVAL);
        assert_eq!(sent(&mut us), [vec![1]]);
        assert!(
            sent(&mut eu).is_empty(),
            "the EU batch's deadline is its own"
        );
        assert_eq!(next_flush(&mut gather).await - start, 300 * MS + INTERVAL);
        assert_eq!(sent(&mut eu), [vec![4]]);
        assert!(sent(&mut us).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_no_session_joined_for_the_idle_time_goes_before_its_flush_interval() {
        let link = Ledger::default().link();
        let (mut gather, [mut us, _eu]) = gather_idle(ROOMY, Some(IDLE));
        let start = Instant::now();
        gather.push(Region::Us, link.entry(1, Region::Us));
        advance(30 * MS).await;
        gather.push(Region::Us, link.entry(2, Region::Us));
        assert!(
            timeout(49 * MS, gather.flush_when_due()).await.is_err(),
            "the idle time counts from the last session, not the first"
        );
        assert!(sent(&mut us).is_empty());
        assert_eq!(next_flush(&mut gather).await - start, 30 * MS + IDLE);
        assert_eq!(sent(&mut us), [vec![1, 2]]);
        assert_eq!(gather.next_deadline(), None, "nothing left to flush");
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_that_keep_coming_within_the_idle_time_wait_for_the_flush_interval() {
        let link = Ledger::default().link();
        let (mut gather, [mut us, _eu]) = gather_idle(ROOMY, Some(IDLE));
        let start = Instant::now();
        let mut id = 0;
        let mut flushed = None;
        // A session every 40 ms: never idle for 50 ms.
        while flushed.is_none() && start.elapsed() < 2 * INTERVAL {
            id += 1;
            gather.push(Region::Us, link.entry(id, Region::Us));
            if timeout(40 * MS, gather.flush_when_due()).await.is_ok() {
                flushed = Some(Instant::now());
            }
        }
        assert_eq!(flushed.map(|at| at - start), Some(INTERVAL));
        assert_eq!(sent(&mut us), [(1..=id).collect::<Vec<_>>()]);
    }

    #[tokio::test(start_paused = true)]
    async fn each_region_is_idle_on_its_own() {
        let link = Ledger::default().link();
        let (mut gather, [mut us, mut eu]) = gather_idle(ROOMY, Some(IDLE));
        let start = Instant::now();
        gather.push(Region::Eu, link.entry(100, Region::Eu));
        let mut id = 0;
        while start.elapsed() < 200 * MS {
            id += 1;
            gather.push(Region::Us, link.entry(id, Region::Us));
            let _ = timeout(20 * MS, gather.flush_when_due()).await;
        }
        assert_eq!(sent(&mut eu), [vec![100]], "EU went once it was idle");
        assert!(sent(&mut us).is_empty(), "US sessions keep coming");
    }

    #[tokio::test]
    async fn an_idle_time_not_under_the_flush_interval_changes_nothing() {
        let (gather, _rx) = gather_idle(ROOMY, Some(INTERVAL));
        assert_eq!(gather.flush_idle, None);
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_request_slot_taken_an_idle_batch_waits_for_its_flush_interval() {
        let link = Ledger::default().link();
        let (us, mut us_rx) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(1));
        let mut gather = Gather::new(
            [Some(us), None],
            [Some(slots.clone()), None],
            ROOMY,
            INTERVAL,
            Some(IDLE),
        );
        let taken = slots.clone().try_acquire_owned().unwrap();
        let start = Instant::now();
        gather.push(Region::Us, link.entry(1, Region::Us));
        advance(100 * MS).await;
        gather.push(Region::Us, link.entry(2, Region::Us));
        assert_eq!(
            next_flush(&mut gather).await - start,
            INTERVAL,
            "idle, but no slot to send it on: it keeps gathering"
        );
        assert_eq!(sent(&mut us_rx), [vec![1, 2]]);

        drop(taken);
        let second = Instant::now();
        gather.push(Region::Us, link.entry(3, Region::Us));
        assert_eq!(
            next_flush(&mut gather).await - second,
            IDLE,
            "a slot is free"
        );
        assert_eq!(sent(&mut us_rx), [vec![3]]);
    }
}
