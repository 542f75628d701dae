//! What the delivery state machine needs of a delivery: when it arrived, whether its link
//! still stands, and the ways to settle it. [`Settle`] is that contract; the live
//! [`Ticket`](super::link::Ticket) implements it, and so does the tests' fake, so that the
//! batching and sending (`Gather`, the senders) run without a broker.

use tokio::time::Instant;

/// One delivery held by the pipeline, settled exactly once: acknowledged, handed back or
/// dead-lettered. Dropping it unsettled hands it back.
pub(super) trait Settle: Sized + Send + 'static {
    /// False once the connection it came on is lost: the broker redelivers it on the new
    /// one, so sending it again here would only make a duplicate.
    fn is_live(&self) -> bool;

    /// When the delivery reached this worker; bounds how long it may be held. On tokio's
    /// clock, which is the system's monotonic clock except in tests that pause time.
    fn received(&self) -> Instant;

    /// The identity of the delivery's session, for a log line.
    fn session_id(&self) -> String;

    /// Segment took the session's events, or there was nothing to send.
    fn ack(self);

    /// Acknowledges every delivery, as one message per link rather than one per delivery.
    fn ack_all(tickets: impl IntoIterator<Item = Self>);

    /// Puts the message back on the queue, unchanged and without spending its delivery
    /// count, for a later attempt.
    fn hand_back(self);

    /// Moves the message to the dead-letter queue with `reason`, then acknowledges it.
    fn dead_letter(self, reason: String, code: &'static str);
}
