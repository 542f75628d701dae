//! Which acknowledgements to send, given which deliveries are finished.
//!
//! Deliveries finish out of order (two regions, several requests in flight), but one
//! `basic.ack` with `multiple` can settle every delivery up to a tag. The tracker keeps the
//! lowest unsettled tag (the frontier) and the finished tags above it; each call to
//! [`AckTracker::take_acks`] turns what became contiguous into one multiple ack. Finished
//! tags stuck behind a slow one (a batch retrying for minutes) are acknowledged one by one
//! once they have waited two ticks of the acker's clock, or at once when there are many of
//! them, so that they do not hold the prefetch window shut. Tags that wait less are left
//! to the next multiple ack: in normal flow the frontier soon passes them, and one frame
//! covers them all.
//!
//! It relies on RabbitMQ numbering the deliveries of a channel 1, 2, 3, … and on this
//! worker's channel carrying one consumer and nothing else that is delivered.
//!
//! Once the consumer is cancelled (shutdown, a refused key), [`AckTracker::in_order_only`]
//! stops the one-by-one acks. On RabbitMQ 3.10's quorum queues, single acks sent after
//! `basic.cancel` often do not take effect: of 100 deliveries acked one by one after the
//! cancel, 13 to 67 were redelivered when the channel closed, in 9 of 15 runs (never
//! without the cancel, never on a classic queue), while multiple acks settled everything
//! in every run. After a cancel no new delivery needs the prefetch window, so nothing is
//! lost by acking only at the frontier.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub tag: u64,
    pub multiple: bool,
}

#[derive(Debug)]
pub struct AckTracker {
    /// The lowest tag not yet settled.
    frontier: u64,
    /// Settled tags above the frontier: the tick at which each was settled if it still
    /// needs an ack, `None` if it does not.
    settled: BTreeMap<u64, Option<u64>>,
    /// How many entries of `settled` still need an ack.
    waiting: usize,
    /// Past this many waiting tags, they are acknowledged one by one.
    straggler_limit: usize,
    /// The acker's clock, in ticks.
    now: u64,
    /// No acks one by one any more, only multiple acks at the frontier.
    in_order: bool,
}

impl AckTracker {
    pub fn new(straggler_limit: usize) -> Self {
        AckTracker {
            frontier: 1,
            settled: BTreeMap::new(),
            waiting: 0,
            straggler_limit,
            now: 0,
            in_order: false,
        }
    }

    /// From now on, only multiple acks at the frontier (see the module doc).
    pub fn in_order_only(&mut self) {
        self.in_order = true;
    }

    pub fn is_in_order_only(&self) -> bool {
        self.in_order
    }

    /// Advances the clock by which [`take_stale`](Self::take_stale) judges waiting tags.
    pub fn tick(&mut self) {
        self.now += 1;
    }

    /// Records that `tag` is finished. `needs_ack` is false when it was settled some other
    /// way (rejected back to the queue), so that no ack names it.
    ///
    /// # Panics
    /// In debug builds, when a tag is settled twice: that would be a double ack, which
    /// RabbitMQ answers by closing the channel.
    pub fn settle(&mut self, tag: u64, needs_ack: bool) {
        debug_assert!(tag >= self.frontier, "tag {tag} settled twice");
        let previous = self.settled.insert(tag, needs_ack.then_some(self.now));
        debug_assert!(previous.is_none(), "tag {tag} settled twice");
        if needs_ack {
            self.waiting += 1;
        }
    }

    /// The acks to send now, in order.
    pub fn take_acks(&mut self, out: &mut Vec<Ack>) {
        let mut highest = None;
        while let Some(needs_ack) = self.settled.remove(&self.frontier) {
            if needs_ack.is_some() {
                self.waiting -= 1;
                highest = Some(self.frontier);
            }
            self.frontier += 1;
        }
        if let Some(tag) = highest {
            out.push(Ack {
                tag,
                multiple: true,
            });
        }
        if self.waiting > self.straggler_limit {
            self.take_stragglers(out);
        }
    }

    /// Acks, one by one, every finished tag still waiting behind an unfinished one, when
    /// there are too many of them; nothing once [`in_order_only`](Self::in_order_only).
    pub fn take_stragglers(&mut self, out: &mut Vec<Ack>) {
        if !self.in_order {
            self.take_settled_by(u64::MAX, out);
        }
    }

    /// Acks, one by one, the finished tags that have waited behind an unfinished one for
    /// at least `ticks` ticks; nothing once [`in_order_only`](Self::in_order_only).
    pub fn take_stale(&mut self, ticks: u64, out: &mut Vec<Ack>) {
        if let Some(by) = self.now.checked_sub(ticks)
            && !self.in_order
        {
            self.take_settled_by(by, out);
        }
    }

    /// Acks, one by one, every finished tag still waiting, whatever the mode: for the end
    /// of a channel, when a gap below them will never be filled.
    pub fn take_all_waiting(&mut self, out: &mut Vec<Ack>) {
        self.take_settled_by(u64::MAX, out);
    }

    fn take_settled_by(&mut self, by: u64, out: &mut Vec<Ack>) {
        for (&tag, needs_ack) in self.settled.iter_mut() {
            if needs_ack.is_some_and(|since| since <= by) {
                *needs_ack = None;
                self.waiting -= 1;
                out.push(Ack {
                    tag,
                    multiple: false,
                });
            }
        }
    }

    /// Tags settled but not yet acknowledged.
    pub fn waiting(&self) -> usize {
        self.waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(t: &mut AckTracker) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        t.take_acks(&mut out);
        out.into_iter().map(|a| (a.tag, a.multiple)).collect()
    }

    #[test]
    fn contiguous_finished_tags_become_one_multiple_ack() {
        let mut t = AckTracker::new(100);
        for tag in [3, 1, 2] {
            t.settle(tag, true);
        }
        assert_eq!(acks(&mut t), [(3, true)]);
        assert_eq!(acks(&mut t), []);
    }

    #[test]
    fn a_gap_holds_the_acks_above_it_until_it_is_filled() {
        let mut t = AckTracker::new(100);
        t.settle(1, true);
        t.settle(3, true);
        t.settle(4, true);
        assert_eq!(acks(&mut t), [(1, true)]);
        assert_eq!(t.waiting(), 2);
        t.settle(2, true);
        assert_eq!(acks(&mut t), [(4, true)]);
        assert_eq!(t.waiting(), 0);
    }

    #[test]
    fn a_requeued_tag_is_never_named_in_an_ack_but_lets_the_frontier_pass() {
        let mut t = AckTracker::new(100);
        t.settle(1, false);
        assert_eq!(acks(&mut t), []);
        t.settle(2, true);
        assert_eq!(acks(&mut t), [(2, true)]);
        t.settle(3, false);
        t.settle(4, false);
        assert_eq!(acks(&mut t), []);
    }

    #[test]
    fn many_tags_stuck_behind_a_slow_one_are_acked_one_by_one_and_only_once() {
        let mut t = AckTracker::new(2);
        for tag in 2..=4 {
            t.settle(tag, true);
        }
        assert_eq!(acks(&mut t), [(2, false), (3, false), (4, false)]);
        t.settle(5, true);
        assert_eq!(acks(&mut t), []);
        t.settle(1, true);
        // 2..=4 were acked singly; the multiple ack up to 5 settles 1 and 5 only.
        assert_eq!(acks(&mut t), [(5, true)]);
    }

    #[test]
    fn stragglers_can_be_taken_on_demand_and_the_frontier_then_skips_them() {
        let mut t = AckTracker::new(100);
        t.settle(2, true);
        t.settle(3, false);
        assert_eq!(acks(&mut t), []);
        let mut out = Vec::new();
        t.take_stragglers(&mut out);
        assert_eq!(
            out,
            [Ack {
                tag: 2,
                multiple: false
            }]
        );
        t.settle(1, true);
        assert_eq!(acks(&mut t), [(1, true)]);
    }

    #[test]
    fn only_tags_that_waited_two_ticks_are_acked_as_stale() {
        let mut t = AckTracker::new(100);
        t.settle(2, true);
        t.tick();
        t.settle(3, true);
        let mut out = Vec::new();
        t.take_stale(2, &mut out);
        assert_eq!(out, [], "2 has waited one tick, 3 none");
        t.tick();
        t.take_stale(2, &mut out);
        assert_eq!(
            out,
            [Ack {
                tag: 2,
                multiple: false
            }]
        );
        assert_eq!(t.waiting(), 1);
        t.settle(1, true);
        // 2 was acked singly; the multiple ack up to 3 settles 1 and 3.
        assert_eq!(acks(&mut t), [(3, true)]);
        assert_eq!(t.waiting(), 0);
    }

    #[test]
    fn after_the_consumer_is_cancelled_acks_only_advance_the_frontier() {
        let mut t = AckTracker::new(2);
        t.in_order_only();
        for tag in 2..=10 {
            t.settle(tag, true);
        }
        assert_eq!(acks(&mut t), [], "nothing one by one past the limit");
        let mut out = Vec::new();
        t.take_stragglers(&mut out);
        t.tick();
        t.tick();
        t.take_stale(2, &mut out);
        assert_eq!(out, [], "nor on demand, nor when stale");
        t.settle(1, true);
        assert_eq!(acks(&mut t), [(10, true)]);
        t.settle(12, true);
        t.take_all_waiting(&mut out);
        assert_eq!(
            out,
            [Ack {
                tag: 12,
                multiple: false
            }],
            "a gap that will never fill: one by one after all"
        );
    }

    #[test]
    #[should_panic(expected = "settled twice")]
    fn settling_a_tag_twice_is_a_bug() {
        let mut t = AckTracker::new(10);
        t.settle(1, true);
        t.settle(1, true);
    }
}
