//! Outlier detection: an endpoint that fails connection attempts is left out of picks for a
//! while, then tried again; each ejection without a success in between doubles the period, up
//! to a limit.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use serde::{Deserialize, Serialize};

/// Outlier detection: an endpoint that fails connections is left out for a while.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive failed connection attempts that eject an endpoint.
    pub consecutive_failures: u32,
    /// First ejection period; each further ejection without a success in between doubles it.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection period.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
        }
    }
}

/// Health and load of one endpoint address, shared by every Service port that uses it.
#[derive(Debug)]
pub struct EndpointHealth {
    addr: SocketAddr,
    cfg: OutlierConfig,
    /// Connections or requests open now (for `least-request`).
    pub(crate) in_flight: AtomicU32,
    /// Reference point of `ejected_until`.
    base: Instant,
    /// Nanoseconds after `base` until which the endpoint is ejected; 0 when it is not. Read on
    /// every pick, so it is an atomic rather than behind the lock.
    ejected_until: AtomicU64,
    failures: Mutex<Failures>,
}

#[derive(Debug, Default)]
struct Failures {
    consecutive: u32,
    ejections: u32,
}

impl EndpointHealth {
    fn new(addr: SocketAddr, cfg: OutlierConfig) -> EndpointHealth {
        EndpointHealth {
            addr,
            cfg,
            in_flight: AtomicU32::new(0),
            base: Instant::now(),
            ejected_until: AtomicU64::new(0),
            failures: Mutex::new(Failures::default()),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && (now.saturating_duration_since(self.base).as_nanos() as u64) < until
    }

    /// Records a failed attempt; returns true when it ejected the endpoint.
    pub fn record_failure(&self) -> bool {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.consecutive += 1;
        if f.consecutive < self.cfg.consecutive_failures || self.is_ejected(now) {
            return false;
        }
        f.consecutive = 0;
        let period = self
            .cfg
            .base_ejection
            .saturating_mul(1u32 << f.ejections.min(16))
            .min(self.cfg.max_ejection);
        f.ejections = f.ejections.saturating_add(1);
        let until = now.saturating_duration_since(self.base) + period;
        // Never store 0, which means "not ejected".
        self.ejected_until
            .store((until.as_nanos() as u64).max(1), Ordering::Relaxed);
        warn!(endpoint = %self.addr, ejected_for = ?period, "endpoint ejected after failed connections");
        metrics::counter!(crate::telemetry::name("proxy_endpoint_ejections_total")).increment(1);
        true
    }

    pub fn record_success(&self) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.consecutive = 0;
        f.ejections = 0;
        self.ejected_until.store(0, Ordering::Relaxed);
    }
}

/// Every endpoint's [`EndpointHealth`], by address, so that state survives metadata updates.
#[derive(Debug)]
pub struct HealthRegistry {
    cfg: OutlierConfig,
    by_addr: Mutex<HashMap<SocketAddr, Arc<EndpointHealth>>>,
}

impl HealthRegistry {
    pub fn new(cfg: OutlierConfig) -> HealthRegistry {
        HealthRegistry {
            cfg,
            by_addr: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, addr: SocketAddr) -> Arc<EndpointHealth> {
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(addr)
            .or_insert_with(|| Arc::new(EndpointHealth::new(addr, self.cfg.clone())))
            .clone()
    }

    /// The endpoint's health if it is registered, else a fresh one that is not: for looking at
    /// endpoints nothing has called.
    pub fn peek(&self, addr: SocketAddr) -> Arc<EndpointHealth> {
        let map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&addr)
            .cloned()
            .unwrap_or_else(|| Arc::new(EndpointHealth::new(addr, self.cfg.clone())))
    }

    /// Forgets endpoints that are no longer in any Service. Connections still open to one keep
    /// their own reference.
    pub fn retain(&self, live: &HashSet<SocketAddr>) {
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|addr, _| live.contains(addr));
    }

    /// Endpoints whose health is kept.
    pub fn len(&self) -> usize {
        self.by_addr.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Endpoints ejected right now (for the debug API).
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<SocketAddr> = map
            .values()
            .filter(|h| h.is_ejected(now))
            .map(|h| h.addr)
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(consecutive: u32) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: consecutive,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_backs_off_and_a_success_forgives() {
        let reg = HealthRegistry::new(cfg(2));
        let addr: SocketAddr = "10.244.0.2:80".parse().expect("addr");
        let h = reg.get(addr);
        assert!(!h.record_failure(), "one failure is not enough");
        assert!(h.record_failure());
        assert!(h.is_ejected(Instant::now()));
        assert_eq!(reg.ejected(), vec![addr]);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!h.is_ejected(Instant::now()));
        // Second ejection: twice as long.
        h.record_failure();
        assert!(h.record_failure());
        tokio::time::advance(Duration::from_millis(3_900)).await;
        assert!(h.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!h.is_ejected(Instant::now()));
        // Third: capped at max_ejection.
        h.record_failure();
        h.record_failure();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!h.is_ejected(Instant::now()));
        h.record_success();
        h.record_failure();
        assert!(h.record_failure());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            !h.is_ejected(Instant::now()),
            "back to the base period after a success"
        );
        assert!(Arc::ptr_eq(&h, &reg.get(addr)));
        reg.retain(&HashSet::new());
        assert!(!Arc::ptr_eq(&h, &reg.get(addr)));
    }
}
