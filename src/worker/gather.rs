//! The batches being gathered, one per region, owned by the consuming task: which batch a
//! session's events join, and when a batch goes to its region's sender (the flush
//! deadlines and their timer).

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::batch::{Batch, Entry, Limits};
use crate::domain::Region;

use super::Sender;

/// The batches being gathered, one per region, owned by the consuming task. A batch goes
/// to its region's sender when the next session would not fit, when it is full, or when
/// its oldest event has waited `flush_interval`.
pub(super) struct Gather<T> {
    batches: [Batch<T>; 2],
    /// When each region's batch must go, if it holds anything.
    deadlines: [Option<Instant>; 2],
    senders: [Option<Sender<T>>; 2],
    flush_interval: Duration,
    /// One timer for the flush deadlines, reset only when the earliest changes.
    timer: Pin<Box<Sleep>>,
    /// The deadline the timer is set for, if any.
    armed: Option<Instant>,
}

impl<T> Gather<T> {
    pub(super) fn new(
        senders: [Option<Sender<T>>; 2],
        limits: Limits,
        flush_interval: Duration,
    ) -> Self {
        Gather {
            batches: [Batch::new(limits), Batch::new(limits)],
            deadlines: [None, None],
            senders,
            flush_interval,
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
        if self.batches[i].is_empty() {
            self.deadlines[i] = Some(Instant::now() + self.flush_interval);
        }
        self.batches[i].push(entry);
        if self.batches[i].is_full() {
            self.send(i);
        }
    }

    /// The earliest flush deadline.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// Waits for the earliest flush deadline, then sends the batches whose deadline has
    /// come. Pending for as long as no batch holds anything; dropped before it completes,
    /// it sends nothing.
    pub(super) async fn flush_when_due(&mut self) {
        let due = self.next_deadline();
        if due != self.armed {
            if let Some(at) = due {
                self.timer.as_mut().reset(at);
            }
            self.armed = due;
        }
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        self.timer.as_mut().await;
        self.armed = None;
        self.flush_due(Instant::now());
    }

    /// Sends the batches whose deadline has come.
    pub(super) fn flush_due(&mut self, now: Instant) {
        for i in 0..2 {
            if self.deadlines[i].is_some_and(|d| d <= now) {
                self.send(i);
            }
        }
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

    fn gather(limits: Limits) -> (Gather<FakeTicket>, Receivers) {
        let (us, us_rx) = mpsc::unbounded_channel();
        let (eu, eu_rx) = mpsc::unbounded_channel();
        (
            Gather::new([Some(us), Some(eu)], limits, INTERVAL),
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
}
