//! Admission limits, so one runaway client cannot starve the others: a
//! per-principal request rate (token bucket, via `governor`) and a global
//! cap on requests being processed at once. Both rejections are
//! RESOURCE_EXHAUSTED and audited by the app layer.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limit settings (from configuration).
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    /// Sustained requests per second per principal; 0 disables the rate limit.
    pub per_principal_per_sec: u32,
    /// Requests a principal may make in a burst above the sustained rate.
    pub burst: u32,
    /// Requests processed at once across all callers.
    pub max_concurrent: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings { per_principal_per_sec: 2000, burst: 4000, max_concurrent: 1024 }
    }
}

/// Which limit turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// The principal's rate.
    Rate,
    /// The global concurrency cap.
    Concurrency,
}

/// Live limiter state, shared by every handler.
pub struct Limits {
    rate: Option<DefaultKeyedRateLimiter<String>>,
    in_flight: Arc<Semaphore>,
}

/// Keys tracked before idle ones are dropped.
const MAX_TRACKED_KEYS: usize = 10_000;

impl Limits {
    /// Builds limiters from settings.
    pub fn new(s: LimitSettings) -> Limits {
        let rate = NonZeroU32::new(s.per_principal_per_sec).map(|per_sec| {
            let burst = NonZeroU32::new(s.burst).unwrap_or(per_sec).max(per_sec);
            RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst))
        });
        Limits { rate, in_flight: Arc::new(Semaphore::new(s.max_concurrent.max(1))) }
    }

    /// Takes a slot under the global cap, held until the permit is dropped.
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, Limited> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| Limited::Concurrency)
    }

    /// Counts one request against `key` (a principal, or an address for
    /// unauthenticated callers).
    pub fn check_rate(&self, key: &str) -> Result<(), Limited> {
        let Some(rate) = &self.rate else { return Ok(()) };
        if rate.len() > MAX_TRACKED_KEYS {
            rate.retain_recent();
        }
        rate.check_key(&key.to_string()).map_err(|_| Limited::Rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_over_its_burst_is_limited_and_others_are_not() {
        let l = Limits::new(LimitSettings { per_principal_per_sec: 1, burst: 3, max_concurrent: 8 });
        for _ in 0..3 {
            assert_eq!(l.check_rate("a"), Ok(()));
        }
        assert_eq!(l.check_rate("a"), Err(Limited::Rate));
        assert_eq!(l.check_rate("b"), Ok(()));
    }

    #[test]
    fn the_global_cap_frees_slots_when_permits_drop() {
        let l = Limits::new(LimitSettings { per_principal_per_sec: 0, burst: 0, max_concurrent: 2 });
        let a = l.enter().unwrap();
        let _b = l.enter().unwrap();
        assert_eq!(l.enter().err(), Some(Limited::Concurrency));
        drop(a);
        assert!(l.enter().is_ok());
        assert_eq!(l.check_rate("anyone"), Ok(()), "rate limit disabled");
    }
}
