//! Rate-limited warnings for what a guest can trigger at will (a malformed IOAPIC entry, an MSI
//! KVM refuses): the first one of each site is logged, then at most one per interval with the
//! number suppressed since, so a hostile guest cannot flood the host's log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// At most one message per site in this interval.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// One call site's state: when it last logged (ns since the process's first use) and how many
/// messages it dropped since.
#[derive(Debug, Default)]
pub struct RateLimit {
    /// Nanoseconds since [`epoch`] of the last message, plus one (0: never logged).
    last: AtomicU64,
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl RateLimit {
    pub const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed)` if the caller may log now (with the count dropped since the last
    /// message), `None` if it must stay quiet.
    pub fn check(&self) -> Option<u64> {
        self.check_at(epoch().elapsed())
    }

    fn check_at(&self, now: Duration) -> Option<u64> {
        let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= INTERVAL.as_nanos() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// `tracing::warn!` at most once per [`INTERVAL`] per call site, saying how many were dropped.
#[macro_export]
macro_rules! warn_ratelimited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.check() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_per_interval_and_the_dropped_ones_are_counted() {
        let limit = RateLimit::new();
        let t0 = Duration::from_secs(100);
        assert_eq!(limit.check_at(t0), Some(0));
        for ms in [1, 10, 4000] {
            assert_eq!(limit.check_at(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(limit.check_at(t0 + INTERVAL), Some(3));
        assert_eq!(limit.check_at(t0 + INTERVAL), None);
    }

    #[test]
    fn the_very_first_message_passes_at_time_zero() {
        assert_eq!(RateLimit::new().check_at(Duration::ZERO), Some(0));
    }
}
