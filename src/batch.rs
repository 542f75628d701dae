//! One region's batch: which sessions' events go into the next request.
//!
//! A plain state machine with no clock, no HTTP and no AMQP. A session's two events always
//! travel in the same batch, so the batch's outcome settles the whole session. The batch
//! tracks the exact size of the request body it will become, envelope included, so that
//! `max_batch_bytes` bounds what is posted.

use crate::events::SessionEvents;

/// Segment drops events past this many in one request without saying so.
pub const SEGMENT_MAX_BATCH_EVENTS: usize = 2_500;
/// Segment refuses request bodies over 500 KB.
pub const SEGMENT_MAX_BATCH_BYTES: usize = 500_000;

const OPEN: &[u8] = br#"{"batch":["#;
const SENT_AT: &[u8] = br#"],"sentAt":""#;
const CLOSE: &[u8] = br#""}"#;
/// `2021-03-12T00:00:00.000Z`
const TIMESTAMP_LEN: usize = 24;
/// The bytes of an empty body: `{"batch":[],"sentAt":"…"}`.
pub const ENVELOPE_BYTES: usize = OPEN.len() + SENT_AT.len() + TIMESTAMP_LEN + CLOSE.len();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// At most this many events in one request (two per session).
    pub max_events: usize,
    /// At most this many bytes in one request body, envelope included.
    pub max_bytes: usize,
}

/// One session's events and what is needed to settle its delivery.
#[derive(Debug)]
pub struct Entry<T> {
    pub ticket: T,
    pub events: SessionEvents,
}

#[derive(Debug)]
pub struct Batch<T> {
    limits: Limits,
    entries: Vec<Entry<T>>,
    /// The size of the body these entries make, envelope included.
    body_bytes: usize,
}

impl<T> Batch<T> {
    pub fn new(limits: Limits) -> Self {
        Batch {
            limits,
            entries: Vec::new(),
            body_bytes: ENVELOPE_BYTES,
        }
    }

    /// Whether the entry can join without breaking either limit.
    pub fn fits(&self, entry: &SessionEvents) -> bool {
        self.events() + 2 <= self.limits.max_events
            && self.body_bytes + Self::added_bytes(self.entries.is_empty(), entry)
                <= self.limits.max_bytes
    }

    /// Adds the entry. The caller checks [`fits`](Self::fits) first; an entry that does
    /// not fit an empty batch (impossible with validated limits) still goes in alone.
    pub fn push(&mut self, entry: Entry<T>) {
        debug_assert!(self.fits(&entry.events) || self.entries.is_empty());
        self.body_bytes += Self::added_bytes(self.entries.is_empty(), &entry.events);
        self.entries.push(entry);
    }

    /// True when no further session could fit by count.
    pub fn is_full(&self) -> bool {
        self.events() + 2 > self.limits.max_events
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Number of events (two per session).
    pub fn events(&self) -> usize {
        self.entries.len() * 2
    }

    pub fn body_bytes(&self) -> usize {
        self.body_bytes
    }

    pub fn entries(&self) -> &[Entry<T>] {
        &self.entries
    }

    /// Empties the batch, returning what it held as a batch of its own.
    pub fn take(&mut self) -> Batch<T> {
        let taken = Batch {
            limits: self.limits,
            entries: std::mem::take(&mut self.entries),
            body_bytes: self.body_bytes,
        };
        self.body_bytes = ENVELOPE_BYTES;
        taken
    }

    /// Splits into two halves by session, to find which one Segment refuses.
    pub fn split(mut self) -> (Batch<T>, Batch<T>) {
        let back = self.entries.split_off(self.entries.len() / 2);
        let limits = self.limits;
        (
            Self::rebuild(limits, self.entries),
            Self::rebuild(limits, back),
        )
    }

    /// Keeps the entries for which `keep` is true; returns the others.
    pub fn retain(&mut self, mut keep: impl FnMut(&Entry<T>) -> bool) -> Vec<Entry<T>> {
        let (kept, dropped) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| keep(e));
        *self = Self::rebuild(self.limits, kept);
        dropped
    }

    fn rebuild(limits: Limits, entries: Vec<Entry<T>>) -> Batch<T> {
        let mut b = Batch::new(limits);
        for e in entries {
            b.push(e);
        }
        b
    }

    pub fn into_entries(self) -> Vec<Entry<T>> {
        self.entries
    }

    /// The request body, `{"batch":[…],"sentAt":"…"}`, exactly [`body_bytes`](Self::body_bytes) long.
    pub fn body(&self, sent_at: &str) -> Vec<u8> {
        debug_assert_eq!(sent_at.len(), TIMESTAMP_LEN);
        let mut body = Vec::with_capacity(self.body_bytes);
        body.extend_from_slice(OPEN);
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(entry.events.batch_json());
        }
        body.extend_from_slice(SENT_AT);
        body.extend_from_slice(sent_at.as_bytes());
        body.extend_from_slice(CLOSE);
        body
    }

    fn added_bytes(first: bool, events: &SessionEvents) -> usize {
        // Two events and the comma between them, and a comma before them unless first.
        events.len() + 1 + usize::from(!first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Region;

    const NOW: &str = "2021-03-12T00:00:00.000Z";

    fn events(n: usize) -> SessionEvents {
        SessionEvents::new(
            Region::Us,
            format!(r#"{{"i":"{}"}}"#, "x".repeat(n)).as_bytes(),
            br#"{"t":1}"#,
        )
    }

    fn entry(ticket: u32, n: usize) -> Entry<u32> {
        Entry {
            ticket,
            events: events(n),
        }
    }

    fn limits(max_events: usize, max_bytes: usize) -> Limits {
        Limits {
            max_events,
            max_bytes,
        }
    }

    #[test]
    fn the_body_is_the_envelope_around_every_event_and_its_size_is_known_in_advance() {
        let mut b = Batch::new(limits(100, 100_000));
        assert_eq!(b.body(NOW).len(), b.body_bytes());
        b.push(entry(1, 3));
        b.push(entry(2, 0));
        let body = b.body(NOW);
        assert_eq!(body.len(), b.body_bytes());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "batch": [{"i":"xxx"},{"t":1},{"i":""},{"t":1}],
                "sentAt": NOW
            })
        );
    }

    #[test]
    fn a_session_that_would_pass_the_byte_limit_does_not_fit() {
        let one = ENVELOPE_BYTES + events(10).len() + 1;
        let mut b = Batch::new(limits(100, 2 * one - ENVELOPE_BYTES + 1));
        assert!(b.fits(&events(10)));
        b.push(entry(1, 10));
        assert_eq!(b.body_bytes(), one);
        assert!(b.fits(&events(10)), "exactly at the limit fits");
        assert!(!b.fits(&events(11)), "one byte over does not");
    }

    #[test]
    fn the_event_limit_counts_two_events_per_session() {
        let mut b = Batch::new(limits(5, 100_000));
        b.push(entry(1, 1));
        assert!(!b.is_full());
        b.push(entry(2, 1));
        assert!(b.is_full(), "4 events; a fifth session would make 6 > 5");
        assert!(!b.fits(&events(1)));
    }

    #[test]
    fn take_leaves_an_empty_batch_with_the_envelope_size() {
        let mut b = Batch::new(limits(10, 100_000));
        b.push(entry(1, 1));
        let taken = b.take();
        assert_eq!(taken.len(), 1);
        assert!(b.is_empty());
        assert_eq!(b.body_bytes(), ENVELOPE_BYTES);
    }

    #[test]
    fn retain_drops_entries_and_keeps_the_size_exact() {
        let mut b = Batch::new(limits(100, 100_000));
        for i in 0..4 {
            b.push(entry(i, i as usize));
        }
        let dropped = b.retain(|e| e.ticket % 2 == 0);
        assert_eq!(dropped.iter().map(|e| e.ticket).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(b.len(), 2);
        assert_eq!(b.body(NOW).len(), b.body_bytes());
    }

    #[test]
    fn split_halves_by_session_and_keeps_sizes_exact() {
        let mut b = Batch::new(limits(100, 100_000));
        for i in 0..5 {
            b.push(entry(i, i as usize));
        }
        let (front, back) = b.split();
        let tickets = |b: &Batch<u32>| b.entries().iter().map(|e| e.ticket).collect::<Vec<_>>();
        assert_eq!(tickets(&front), [0, 1]);
        assert_eq!(tickets(&back), [2, 3, 4]);
        for half in [front, back] {
            assert_eq!(half.body(NOW).len(), half.body_bytes());
        }
    }
}
