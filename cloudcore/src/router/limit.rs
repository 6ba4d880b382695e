//! Per-rule QPS limits: a GCRA limiter (governor) on tokio's clock, so that tests can run it
//! on a paused clock and the limit follows the same time as the request timeouts.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::model::RateSpec;

/// Time as nanoseconds since the clock was made, read from tokio's clock.
#[derive(Clone, Debug)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.start.elapsed())
    }
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// A rule's limit. With several replicas routing (store on etcd), each enforces its share:
/// `qps / replicas` and `burst / replicas` (at least one request), so the rule admits about
/// its limit in all when callers spread over the replicas (see docs/ha.md).
pub struct Limiter {
    spec: RateSpec,
    share: std::sync::atomic::AtomicU32,
    inner: std::sync::RwLock<Gcra>,
    clock: TokioClock,
}

fn gcra(spec: RateSpec, share: u32, clock: &TokioClock) -> Gcra {
    let share = share.max(1);
    let qps = spec.qps / f64::from(share);
    let period = Duration::from_secs_f64(1.0 / qps).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(spec.burst.div_ceil(share)).unwrap_or(NonZeroU32::MIN);
    // `with_period` is None only for a zero period, which `max` rules out.
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    RateLimiter::direct_with_clock(quota, clock.clone())
}

impl Limiter {
    /// `spec.qps` requests per second on average, `spec.burst` at once.
    pub fn new(spec: RateSpec) -> Self {
        let clock = TokioClock::default();
        Limiter {
            spec,
            share: std::sync::atomic::AtomicU32::new(1),
            inner: std::sync::RwLock::new(gcra(spec, 1, &clock)),
            clock,
        }
    }

    /// Enforces `1 / replicas` of the limit from now on.
    pub fn set_share(&self, replicas: u32) {
        let replicas = replicas.max(1);
        if self
            .share
            .swap(replicas, std::sync::atomic::Ordering::AcqRel)
            != replicas
        {
            *self.inner.write().unwrap_or_else(|p| p.into_inner()) =
                gcra(self.spec, replicas, &self.clock);
        }
    }

    /// Takes one request's worth of capacity, or says how long until there is some.
    pub fn check(&self) -> Result<(), Duration> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.check().map_err(|not_until| {
            let now = self.clock.now();
            Duration::from(not_until.earliest_possible().duration_since(now))
        })
    }
}

/// `Retry-After` in whole seconds, at least 1 (the header has no smaller unit).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_steady_rate() {
        let l = Limiter::new(RateSpec { qps: 2.0, burst: 3 });
        for _ in 0..3 {
            assert!(l.check().is_ok());
        }
        let wait = l.check().expect_err("over the burst");
        assert!(
            wait <= Duration::from_millis(500) && !wait.is_zero(),
            "{wait:?}"
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.check().is_ok());
        assert!(l.check().is_err());
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..3 {
            assert!(l.check().is_ok(), "the burst refills, but not beyond it");
        }
        assert!(l.check().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn slow_rates() {
        let l = Limiter::new(RateSpec { qps: 0.5, burst: 1 });
        assert!(l.check().is_ok());
        let wait = l.check().expect_err("limited");
        assert_eq!(retry_after_secs(wait), 2);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(l.check().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_enforces_its_share() {
        let l = Limiter::new(RateSpec { qps: 6.0, burst: 6 });
        l.set_share(3);
        assert!(l.check().is_ok() && l.check().is_ok());
        assert!(l.check().is_err(), "a third of the burst");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.check().is_ok(), "2 per second");
        l.set_share(1);
        for _ in 0..6 {
            assert!(l.check().is_ok());
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }
}
