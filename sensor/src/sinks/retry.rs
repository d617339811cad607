//! When to try again: exponential backoff after consecutive failures, at least what the
//! receiver asked for. Which answers are failures is each sink's own classification
//! ([`super::sink::Failed`] versus refused items); this only decides the waiting.

use std::time::Duration;

/// Backoff after `failures` consecutive failures: 1 s, 2 s, 4 s ... up to `max`.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    Duration::from_millis(1000u64.saturating_mul(1 << exp)).min(max)
}

/// One sink's retry state.
#[derive(Debug)]
pub struct Retry {
    max: Duration,
    failures: u32,
}

impl Retry {
    pub fn new(max: Duration) -> Self {
        Self { max, failures: 0 }
    }

    /// An attempt made progress without error.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// An attempt failed (or made no progress at all): how long to wait before the next.
    pub fn failed(&mut self, retry_after: Option<Duration>) -> Duration {
        self.failures += 1;
        backoff(self.failures, self.max).max(retry_after.unwrap_or_default())
    }

    /// Log the first failure and then at powers of two, not every retry of an outage.
    pub fn worth_logging(&self) -> bool {
        self.failures == 1 || self.failures.is_power_of_two()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff(1, max), Duration::from_secs(1));
        assert_eq!(backoff(2, max), Duration::from_secs(2));
        assert_eq!(backoff(4, max), Duration::from_secs(8));
        assert_eq!(backoff(30, max), max);
    }

    #[test]
    fn retry_after_is_a_floor() {
        let mut r = Retry::new(Duration::from_secs(60));
        assert_eq!(r.failed(None), Duration::from_secs(1));
        assert_eq!(
            r.failed(Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        r.succeeded();
        assert_eq!(
            r.failed(None),
            Duration::from_secs(1),
            "counting starts again"
        );
    }
}
