//! Per-rule QPS limits: the one bucket of [`edgehub::limits`], with a rule's rate, which may
//! be fractional (one request every few seconds).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use edgehub::limits::{Bucket, Decision};

use super::model::RateSpec;

/// A rule's limit. With several replicas routing (store on etcd), each enforces its share:
/// `qps / replicas` and `burst / replicas` (at least one request), so the rule admits about
/// its limit in all when callers spread over the replicas (see docs/ha.md).
pub struct Limiter {
    spec: RateSpec,
    share: AtomicU32,
    bucket: RwLock<Option<Bucket>>,
}

fn bucket(spec: RateSpec, share: u32) -> Option<Bucket> {
    let share = share.max(1);
    let qps = spec.qps / f64::from(share);
    let period = Duration::from_secs_f64(1.0 / qps).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(spec.burst.div_ceil(share)).unwrap_or(NonZeroU32::MIN);
    Bucket::new(period, burst)
}

impl Limiter {
    /// `spec.qps` requests per second on average, `spec.burst` at once.
    pub fn new(spec: RateSpec) -> Self {
        Limiter {
            spec,
            share: AtomicU32::new(1),
            bucket: RwLock::new(bucket(spec, 1)),
        }
    }

    /// Enforces `1 / replicas` of the limit from now on.
    pub fn set_share(&self, replicas: u32) {
        let replicas = replicas.max(1);
        if self.share.swap(replicas, Ordering::AcqRel) != replicas {
            *self.bucket.write().unwrap_or_else(|p| p.into_inner()) = bucket(self.spec, replicas);
        }
    }

    /// Takes one request's worth of capacity, or says how long until there is some.
    pub fn check(&self) -> Result<(), Duration> {
        let bucket = self.bucket.read().unwrap_or_else(|p| p.into_inner());
        match bucket.as_ref().map(Bucket::decide) {
            Some(Decision::Limited { retry_after }) => Err(retry_after),
            _ => Ok(()),
        }
    }
}

pub use edgehub::limits::retry_after_secs;

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
