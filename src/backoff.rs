//! Backoff: how long to wait before the next attempt, in one place for every retry loop
//! of the crate (Segment requests, reconnecting to the broker). Exponential with jitter,
//! capped, never running out; a server's `Retry-After` wins when it sends one.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Exponential backoff with jitter, capped; `Retry-After` wins when the server sends one.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub fn backoff(&self) -> Backoff {
        Backoff {
            inner: ExponentialBuilder::new()
                .with_min_delay(self.initial)
                .with_max_delay(self.max)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .build(),
            max: self.max,
        }
    }
}

/// The delays of one batch's retries. It never runs out: transient failures have no
/// retry budget (the hold limit bounds how long a delivery waits instead).
#[derive(Debug)]
pub struct Backoff {
    inner: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// The next delay, or the server's `after` if it sent one.
    pub fn next_delay(&mut self, after: Option<Duration>) -> Duration {
        let computed = self.inner.next().unwrap_or(self.max).min(self.max);
        after.unwrap_or(computed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_is_capped() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut b = policy.backoff();
        let delays: Vec<_> = (0..12).map(|_| b.next_delay(None)).collect();
        // Jitter adds up to 100% of the base delay: 100ms, 200ms, 400ms, … then the cap.
        for (i, d) in delays.iter().take(4).enumerate() {
            let base = Duration::from_millis(100 << i);
            assert!(*d >= base && *d <= base * 2, "attempt {i}: {d:?}");
        }
        assert!(delays.iter().all(|d| *d <= policy.max));
        assert_eq!(delays[11], policy.max, "it never runs out and stays capped");
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(9))),
            Duration::from_secs(9),
            "Retry-After wins over the computed delay"
        );
    }
}
