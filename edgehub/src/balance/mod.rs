//! Endpoint choice: which endpoint of a Service gets the next connection (TCP) or request
//! (HTTP, later).
//!
//! A pick narrows the endpoints in three steps:
//! 1. endpoints already tried for this connection are left out;
//! 2. ejected endpoints ([`outlier`]) are left out, unless that leaves none: then all are
//!    tried, since a possibly-bad endpoint beats a certain failure;
//! 3. only the best topology tier remains: this node, then nodes sharing the Service's
//!    `topologyKeys` labels with this node (in the order of the keys), then any when `*` is
//!    listed (the route table leaves out endpoints no key admits; `edgehub::topology`).
//!
//! Then `sessionAffinity: ClientIP` or the Service's policy picks one.
//!
//! State that must survive metadata updates (round-robin position, affinity table, per-endpoint
//! health and in-flight counts) lives in [`ServiceBalancer`] and [`EndpointHealth`], which the
//! route table hands over from one version to the next.

pub mod outlier;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::model::LbPolicy;
use rand::Rng;
use tokio::time::Instant;

pub use outlier::{EndpointHealth, HealthRegistry, OutlierConfig};

/// Where an endpoint is, relative to this node: the one definition the proxy and DNS share.
pub use crate::topology::Tier;

/// One endpoint as the balancer sees it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The node hosting it (`nodeName`); `None` when the Endpoints object named none.
    pub node: Option<Arc<str>>,
    pub tier: Tier,
    pub health: Arc<EndpointHealth>,
}

/// What a pick may depend on besides the endpoints.
#[derive(Clone, Copy, Debug)]
pub struct PickContext<'a> {
    pub client_ip: IpAddr,
    /// The key of `consistent-hash`; the client address when `None`.
    pub hash_key: Option<&'a [u8]>,
}

/// Client-IP affinity settings of a Service (`sessionAffinity: ClientIP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affinity {
    pub timeout: Duration,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
/// Affinity entries kept per Service; the oldest half is dropped beyond it.
const MAX_AFFINITY_ENTRIES: usize = 65_536;

/// Balancing state of one Service port, kept across metadata updates.
#[derive(Debug)]
pub struct ServiceBalancer {
    policy: LbPolicy,
    affinity: Option<Affinity>,
    next: AtomicUsize,
    sticky: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

impl ServiceBalancer {
    pub fn new(policy: LbPolicy, affinity: Option<Affinity>) -> ServiceBalancer {
        ServiceBalancer {
            policy,
            affinity,
            next: AtomicUsize::new(0),
            sticky: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> LbPolicy {
        self.policy
    }

    pub fn affinity(&self) -> Option<Affinity> {
        self.affinity
    }

    /// Chooses an endpoint, or `None` when every endpoint is in `tried`.
    pub fn pick<'e>(
        &self,
        endpoints: &'e [Endpoint],
        ctx: &PickContext<'_>,
        tried: &[SocketAddr],
    ) -> Option<&'e Endpoint> {
        let now = Instant::now();
        let untried: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| !tried.contains(&e.addr))
            .collect();
        if untried.is_empty() {
            return None;
        }
        let mut pool: Vec<&Endpoint> = untried
            .iter()
            .copied()
            .filter(|e| !e.health.is_ejected(now))
            .collect();
        if pool.is_empty() {
            pool = untried;
        }
        let best = pool.iter().map(|e| e.tier).min()?;
        pool.retain(|e| e.tier == best);

        if let Some(affinity) = self.affinity {
            return Some(self.pick_sticky(&pool, ctx, affinity, now));
        }
        Some(self.pick_by_policy(&pool, ctx))
    }

    fn pick_by_policy<'e>(&self, pool: &[&'e Endpoint], ctx: &PickContext<'_>) -> &'e Endpoint {
        match self.policy {
            LbPolicy::RoundRobin => {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                pool[i % pool.len()]
            }
            LbPolicy::Random => pool[rand::rng().random_range(0..pool.len())],
            LbPolicy::LeastRequest => {
                // Power of two choices: nearly as good as scanning all, without herding onto
                // the one endpoint that every picker sees as least loaded.
                let mut rng = rand::rng();
                let a = pool[rng.random_range(0..pool.len())];
                let b = pool[rng.random_range(0..pool.len())];
                if b.health.in_flight() < a.health.in_flight() {
                    b
                } else {
                    a
                }
            }
            LbPolicy::ConsistentHash => {
                let key = match ctx.hash_key {
                    Some(k) => hash_of(k),
                    None => hash_of(ctx.client_ip),
                };
                rendezvous(pool, key)
            }
        }
    }

    fn pick_sticky<'e>(
        &self,
        pool: &[&'e Endpoint],
        ctx: &PickContext<'_>,
        affinity: Affinity,
        now: Instant,
    ) -> &'e Endpoint {
        let mut sticky = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((addr, last)) = sticky.get(&ctx.client_ip) {
            if now.saturating_duration_since(*last) < affinity.timeout {
                if let Some(e) = pool.iter().find(|e| e.addr == *addr) {
                    sticky.insert(ctx.client_ip, (e.addr, now));
                    return e;
                }
            }
        }
        // A new client starts where the hash puts it, so restarts of the agent keep most
        // clients where they were.
        let chosen = rendezvous(pool, hash_of(ctx.client_ip));
        if sticky.len() >= MAX_AFFINITY_ENTRIES {
            let timeout = affinity.timeout;
            sticky.retain(|_, (_, last)| now.saturating_duration_since(*last) < timeout / 2);
            if sticky.len() >= MAX_AFFINITY_ENTRIES {
                sticky.clear();
            }
        }
        sticky.insert(ctx.client_ip, (chosen.addr, now));
        chosen
    }
}

fn hash_of(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Highest-random-weight hashing: each key goes to the endpoint with the highest
/// `hash(key, endpoint)`. Removing an endpoint moves only its own keys, and there is no ring
/// to rebuild when endpoints change.
fn rendezvous<'e>(pool: &[&'e Endpoint], key: u64) -> &'e Endpoint {
    let mut best = pool[0];
    let mut best_weight = 0u64;
    for (i, e) in pool.iter().enumerate() {
        let w = hash_of((key, e.addr));
        if i == 0 || w > best_weight {
            best = e;
            best_weight = w;
        }
    }
    best
}

/// Counts a connection or request against an endpoint while it is open (for `least-request`).
pub struct InFlight(Arc<EndpointHealth>);

impl InFlight {
    pub fn start(health: &Arc<EndpointHealth>) -> InFlight {
        health.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(health.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize, tiers: &[u8]) -> Vec<Endpoint> {
        let reg = HealthRegistry::new(OutlierConfig::default());
        (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("10.244.0.{}:80", i + 2).parse().expect("addr");
                Endpoint {
                    addr,
                    node: None,
                    tier: Tier(tiers.get(i).copied().unwrap_or(0)),
                    health: reg.get(addr),
                }
            })
            .collect()
    }

    fn ctx(ip: &str) -> PickContext<'static> {
        PickContext {
            client_ip: ip.parse().expect("ip"),
            hash_key: None,
        }
    }

    fn counts(
        b: &ServiceBalancer,
        eps: &[Endpoint],
        n: usize,
        client: impl Fn(usize) -> String,
    ) -> Vec<usize> {
        let mut c = vec![0; eps.len()];
        for i in 0..n {
            let e = b.pick(eps, &ctx(&client(i)), &[]).expect("pick");
            c[eps.iter().position(|x| x.addr == e.addr).expect("known")] += 1;
        }
        c
    }

    #[tokio::test]
    async fn round_robin_is_even_and_random_reaches_all() {
        let eps = endpoints(3, &[]);
        let rr = ServiceBalancer::new(LbPolicy::RoundRobin, None);
        assert_eq!(
            counts(&rr, &eps, 300, |_| "10.0.0.1".into()),
            vec![100, 100, 100]
        );
        let random = ServiceBalancer::new(LbPolicy::Random, None);
        assert!(counts(&random, &eps, 300, |_| "10.0.0.1".into())
            .iter()
            .all(|&c| c > 50));
    }

    #[tokio::test]
    async fn least_request_avoids_the_busy_endpoint() {
        let eps = endpoints(3, &[]);
        let _busy: Vec<InFlight> = (0..10).map(|_| InFlight::start(&eps[0].health)).collect();
        let lr = ServiceBalancer::new(LbPolicy::LeastRequest, None);
        let c = counts(&lr, &eps, 300, |_| "10.0.0.1".into());
        // Endpoint 0 is chosen only when both random choices land on it (1 in 9).
        assert!(c[0] < 60 && c[1] > 80 && c[2] > 80, "{c:?}");
    }

    #[tokio::test]
    async fn hashing_and_affinity_keep_a_client_on_one_endpoint() {
        let eps = endpoints(3, &[]);
        for b in [
            ServiceBalancer::new(LbPolicy::ConsistentHash, None),
            ServiceBalancer::new(
                LbPolicy::RoundRobin,
                Some(Affinity {
                    timeout: DEFAULT_AFFINITY_TIMEOUT,
                }),
            ),
        ] {
            let c = counts(&b, &eps, 50, |_| "10.0.0.7".into());
            assert_eq!(c.iter().filter(|&&n| n > 0).count(), 1, "{c:?}");
            let spread = counts(&b, &eps, 300, |i| {
                format!("10.0.{}.{}", i / 200, i % 200 + 1)
            });
            assert!(spread.iter().all(|&n| n > 40), "{spread:?}");
        }
        // Removing an endpoint moves only the clients that were on it.
        let hash = ServiceBalancer::new(LbPolicy::ConsistentHash, None);
        let before: Vec<SocketAddr> = (0..100)
            .map(|i| {
                hash.pick(&eps, &ctx(&format!("10.1.0.{i}")), &[])
                    .expect("p")
                    .addr
            })
            .collect();
        let fewer = &eps[..2];
        for (i, was) in before.iter().enumerate() {
            let now = hash
                .pick(fewer, &ctx(&format!("10.1.0.{i}")), &[])
                .expect("p")
                .addr;
            if *was != eps[2].addr {
                assert_eq!(now, *was);
            }
        }
    }

    #[tokio::test]
    async fn topology_tiers_then_fallback_and_tried_endpoints_are_skipped() {
        let eps = endpoints(3, &[2, 0, 1]);
        let rr = ServiceBalancer::new(LbPolicy::RoundRobin, None);
        assert_eq!(counts(&rr, &eps, 10, |_| "10.0.0.1".into()), vec![0, 10, 0]);
        let c = ctx("10.0.0.1");
        assert_eq!(
            rr.pick(&eps, &c, &[eps[1].addr]).expect("p").addr,
            eps[2].addr
        );
        let all: Vec<SocketAddr> = eps.iter().map(|e| e.addr).collect();
        assert!(rr.pick(&eps, &c, &all).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoints_are_skipped_unless_nothing_else_is_left() {
        let eps = endpoints(2, &[0, 1]);
        let rr = ServiceBalancer::new(LbPolicy::RoundRobin, None);
        eps[0].health.record_failure();
        // The local endpoint is ejected: the remote one takes the traffic.
        assert_eq!(counts(&rr, &eps, 4, |_| "10.0.0.1".into()), vec![0, 4]);
        eps[1].health.record_failure();
        // Both ejected: try them anyway, best tier first.
        assert_eq!(counts(&rr, &eps, 4, |_| "10.0.0.1".into()), vec![4, 0]);
        tokio::time::advance(OutlierConfig::default().base_ejection).await;
        assert_eq!(counts(&rr, &eps, 4, |_| "10.0.0.1".into()), vec![4, 0]);
    }
}
