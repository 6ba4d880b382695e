//! Per-rule QPS limits: the one bucket of [`edgehub::limits`], with a rule's rate, which may
//! be fractional (one request every few seconds).

use std::num::NonZeroU32;
use std::time::Duration;

use edgehub::limits::{Bucket, Decision};

use super::model::RateSpec;

pub struct Limiter {
    bucket: Option<Bucket>,
}

impl Limiter {
    /// `spec.qps` requests per second on average, `spec.burst` at once.
    pub fn new(spec: RateSpec) -> Self {
        let period = Duration::from_secs_f64(1.0 / spec.qps).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(spec.burst).unwrap_or(NonZeroU32::MIN);
        Limiter {
            bucket: Bucket::new(period, burst),
        }
    }

    /// Takes one request's worth of capacity, or says how long until there is some.
    pub fn check(&self) -> Result<(), Duration> {
        match self.bucket.as_ref().map(Bucket::decide) {
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

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }
}
