//! Waiting until something holds: one polling loop with a deadline and a message, instead
//! of one written by hand in each test.

use std::time::{Duration, Instant};

/// How often a condition is checked.
pub const POLL: Duration = Duration::from_millis(20);

/// Waits until `cond` returns true, checking every [`POLL`]; panics naming `what` after
/// `within`. The condition is checked once more at the deadline, so that a slow check does
/// not cost the last chance.
pub async fn eventually(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    if let Err(waited) = wait_until(within, &mut cond).await {
        panic!("timed out after {waited:?} waiting until {what}");
    }
}

/// Waits until `cond` returns `Some`, and returns what it holds; panics with the message
/// `fail` builds after `within` (it may describe the last state seen, which `cond` kept).
pub async fn eventually_some<T>(
    within: Duration,
    mut cond: impl AsyncFnMut() -> Option<T>,
    fail: impl FnOnce() -> String,
) -> T {
    let start = Instant::now();
    loop {
        let last = start.elapsed() >= within;
        if let Some(value) = cond().await {
            return value;
        }
        if last {
            panic!("timed out after {within:?}: {}", fail());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `cond` returns true or `within` passes: `Ok` with how long it took, or
/// `Err` with how long it waited. For a caller that has something to do either way.
pub async fn wait_until(
    within: Duration,
    mut cond: impl AsyncFnMut() -> bool,
) -> Result<Duration, Duration> {
    let start = Instant::now();
    loop {
        let last = start.elapsed() >= within;
        if cond().await {
            return Ok(start.elapsed());
        }
        if last {
            return Err(start.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_until`] for a blocking caller (a destructor, a thread without a runtime).
pub fn wait_until_blocking(
    within: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration, Duration> {
    let start = Instant::now();
    loop {
        let last = start.elapsed() >= within;
        if cond() {
            return Ok(start.elapsed());
        }
        if last {
            return Err(start.elapsed());
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let mut n = 0;
        eventually("the third check", Duration::from_secs(5), || {
            n += 1;
            let done = n >= 3;
            async move { done }
        })
        .await;
        assert_eq!(n, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting until never")]
    async fn panics_naming_what_it_waited_for() {
        eventually("never", Duration::from_millis(50), || async { false }).await;
    }

    #[tokio::test]
    async fn wait_until_reports_a_timeout_without_panicking() {
        let waited = wait_until(Duration::from_millis(50), || async { false }).await;
        assert!(waited.is_err_and(|d| d >= Duration::from_millis(50)));
    }
}
