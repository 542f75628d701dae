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
