//! Server-side QPS limits (SPEC §4.5), shared by the edge agent and cloudcore: whichever of them
//! finally dials an endpoint enforces the Service's `edgemesh.io/qps` / `edgemesh.io/burst`.
//!
//! Policy only: where the limits are enforced is [`crate::serve`] (streams that end here) and
//! the HTTP engine ([`crate::http`], per request).
//!
//! - [`limit_of`] reads the annotations of a Service;
//! - [`Bucket`] is the one GCRA bucket, on tokio's clock, that every limit uses (Services'
//!   and, in cloudcore, router rules');
//! - [`Limiters`] keeps one bucket per limited Service and answers [`Decision`]s;
//! - [`retry_after_secs`] is the one `Retry-After` rule.
//!
//! A connection that is not HTTP is limited as a whole: over the limit, the caller refuses
//! (closes) it.
//!
//! Rejections are counted as `edgemesh_limit_rejected_total{namespace,service,protocol}`, by
//! [`Limiters::admit`], under the same name on nodes and in the cloud.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tracing::{info, warn};

use crate::model::{ANNOTATION_BURST, ANNOTATION_QPS};
use crate::view::{MeshView, ServiceRecord};

/// Name of the counter of requests and connections refused by a limit, without the process
/// prefix: `edgemesh_limit_rejected_total` in the agent, `cloudcore_limit_rejected_total` in
/// cloudcore (see [`crate::telemetry::name`]).
pub const REJECTED_TOTAL: &str = "limit_rejected_total";

/// A Service's limit: `qps` requests (or new connections) per second on average, up to `burst`
/// at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub qps: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Limit {
    /// A limit whose burst is one second's worth, the default of `edgemesh.io/burst`.
    pub fn per_second(qps: NonZeroU32) -> Limit {
        Limit { qps, burst: qps }
    }
}

/// A malformed limit annotation. Callers log it once and treat the Service as unlimited:
/// refusing all traffic over a typo would be worse than not limiting it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}={value:?}: {reason}")]
pub struct LimitError {
    pub key: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// The limit a Service asks for; `Ok(None)` when it has no `edgemesh.io/qps`.
///
/// Only whole numbers are accepted, as cloudcore's validation does
/// ([`crate::model::ServiceAnnotations`]): a fraction such as `0.5` is an error rather than
/// being rounded to something the user did not write.
pub fn limit_of(service: &ServiceRecord) -> Result<Option<Limit>, LimitError> {
    let positive = |key: &'static str| -> Result<Option<NonZeroU32>, LimitError> {
        let Some(value) = service.annotation(key) else {
            return Ok(None);
        };
        let error = |reason| LimitError {
            key,
            value: value.to_string(),
            reason,
        };
        let v = value.trim();
        if v.contains('.') && v.parse::<f64>().is_ok() {
            return Err(error(
                "fractions are not supported: expected a whole number of at least 1",
            ));
        }
        match v.parse::<u32>().ok().and_then(NonZeroU32::new) {
            Some(n) => Ok(Some(n)),
            None => Err(error("expected a whole number of at least 1")),
        }
    };
    let qps = positive(ANNOTATION_QPS)?;
    let burst = positive(ANNOTATION_BURST)?;
    match (qps, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(LimitError {
            key: ANNOTATION_BURST,
            value: service
                .annotation(ANNOTATION_BURST)
                .unwrap_or_default()
                .to_string(),
            reason: "needs edgemesh.io/qps",
        }),
        (Some(qps), burst) => Ok(Some(Limit {
            qps,
            burst: burst.unwrap_or(qps),
        })),
    }
}

/// What a limit says about one request or new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The Service has no limit.
    Unlimited,
    Allowed,
    /// Over the limit: refuse, and the caller may try again after `retry_after`.
    Limited {
        retry_after: Duration,
    },
}

/// What was limited, the `protocol` label of [`REJECTED_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP request (answered `429`).
    Http,
    /// A connection that is not HTTP (refused).
    Tcp,
    /// A new UDP flow (its datagrams dropped).
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// governor's clocks cannot be paused, tokio's can: reading `tokio::time::Instant` lets tests
/// run seconds of traffic in no time (`start_paused`), and outside tests it is the monotonic
/// clock. Instants are nanoseconds since the clock was made.
#[derive(Clone, Copy, Debug)]
struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    fn new() -> TokioClock {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

/// One rate limit: a GCRA bucket that admits one request per `period` on average and up to
/// `burst` at once.
pub struct Bucket {
    inner: RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>,
}

impl Bucket {
    /// `None` for a zero period (more than 10⁹ per second: governor works in whole
    /// nanoseconds, and such a limit is no limit in practice).
    pub fn new(period: Duration, burst: NonZeroU32) -> Option<Bucket> {
        let quota = Quota::with_period(period)?.allow_burst(burst);
        Some(Bucket {
            inner: RateLimiter::direct_with_clock(quota, TokioClock::new()),
        })
    }

    /// Takes one request's worth, or says how long until there is some.
    pub fn decide(&self) -> Decision {
        match self.inner.check() {
            Ok(()) => Decision::Allowed,
            Err(not_until) => Decision::Limited {
                retry_after: not_until.wait_time_from(self.inner.clock().now()),
            },
        }
    }
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket").finish_non_exhaustive()
    }
}

/// `Retry-After` in whole seconds for a wait: rounded up (rounding down would invite a retry
/// that is refused again), at least 1 (the header has no smaller unit).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// One limited Service.
struct Entry {
    /// Kept to tell a changed limit (new bucket) from an unchanged one (same bucket).
    limit: Limit,
    bucket: Bucket,
    /// Counter handles, resolved at the first rejection: a flood of rejections is exactly when
    /// building labels and looking up the registry per event would hurt.
    rejected: [OnceLock<metrics::Counter>; 3],
}

impl Entry {
    /// `None` when the limit is too high to express (see [`Bucket::new`]).
    fn new(limit: Limit) -> Option<Entry> {
        Some(Entry {
            limit,
            bucket: Bucket::new(Duration::from_secs(1) / limit.qps.get(), limit.burst)?,
            rejected: Default::default(),
        })
    }

    fn decide(&self) -> Decision {
        self.bucket.decide()
    }
}

// By hand: the bucket's state and the counter handles say nothing useful.
impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("limit", &self.limit).finish()
    }
}

/// Services by namespace, then name: nested so the hot path looks up `&str`s without
/// building an owned key.
type Table = HashMap<String, HashMap<String, Entry>>;

#[derive(Debug)]
struct Inner {
    table: RwLock<Table>,
    /// Malformed annotations already logged by [`Limiters::follow`], with the error, so that a
    /// bad Service is reported once and not on every unrelated metadata change.
    reported: Mutex<HashMap<(String, String), LimitError>>,
}

/// One rate limiter per limited Service. Clones share the limiters.
///
/// The hot path ([`Limiters::check`]) takes a read lock for a map lookup and then one atomic
/// compare-and-swap in the bucket; the write lock is only taken when limits change.
#[derive(Clone, Debug)]
pub struct Limiters {
    inner: Arc<Inner>,
}

impl Default for Limiters {
    fn default() -> Self {
        Limiters::new()
    }
}

impl Limiters {
    pub fn new() -> Self {
        Limiters {
            inner: Arc::new(Inner {
                table: RwLock::new(HashMap::new()),
                reported: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Makes the limiters those of the Services in `view` (the edge calls this on every
    /// metadata change). A Service whose limit is unchanged keeps its bucket, so that a busy
    /// Service does not get a fresh burst whenever anything else in the mesh changes; a
    /// changed limit starts a new bucket; a removed or unlimited Service loses its limiter.
    /// Malformed annotations are logged once and leave the Service unlimited.
    pub fn follow(&self, view: &MeshView) {
        let mut wanted: HashMap<(&str, &str), Limit> = HashMap::new();
        let mut errors = HashMap::new();
        for (key, service) in &view.services {
            let (namespace, name) = (key.namespace(), key.name());
            match limit_of(service) {
                Ok(Some(limit)) => {
                    wanted.insert((namespace, name), limit);
                }
                Ok(None) => {}
                Err(e) => {
                    errors.insert((namespace.to_string(), name.to_string()), e);
                }
            }
        }
        {
            let mut reported = lock(&self.inner.reported);
            for ((namespace, name), e) in &errors {
                if reported.get(&(namespace.clone(), name.clone())) != Some(e) {
                    warn!(%namespace, service = %name, error = %e, "ignoring the limit of a service: it is not valid");
                }
            }
            // Forget fixed and removed Services, so that breaking one again is reported again.
            *reported = errors;
        }
        let mut table = self.write();
        table.retain(|namespace, names| {
            names.retain(
                |name, entry| match wanted.get(&(namespace.as_str(), name.as_str())) {
                    Some(limit) => *limit == entry.limit,
                    None => {
                        info!(%namespace, service = %name, "service limit removed");
                        false
                    }
                },
            );
            !names.is_empty()
        });
        for ((namespace, name), limit) in wanted {
            if table.get(namespace).is_some_and(|n| n.contains_key(name)) {
                continue;
            }
            // None for a limit too high to express: nothing to log, as it is tried again on
            // every change.
            if let Some(entry) = Entry::new(limit) {
                info!(%namespace, service = %name, qps = limit.qps, burst = limit.burst, "service limit set");
                table
                    .entry(namespace.to_string())
                    .or_default()
                    .insert(name.to_string(), entry);
            }
        }
    }

    /// Sets or removes the limit of one Service (cloudcore calls this as Services change).
    /// Setting the limit a Service already has keeps its bucket.
    pub fn set(&self, namespace: &str, name: &str, limit: Option<Limit>) {
        let mut table = self.write();
        let current = table.get(namespace).and_then(|n| n.get(name));
        if limit.is_some() && current.map(|e| e.limit) == limit {
            return;
        }
        match limit.and_then(Entry::new) {
            Some(entry) => {
                table
                    .entry(namespace.to_string())
                    .or_default()
                    .insert(name.to_string(), entry);
            }
            None => {
                if let Some(names) = table.get_mut(namespace) {
                    names.remove(name);
                    if names.is_empty() {
                        table.remove(namespace);
                    }
                }
            }
        }
    }

    /// Takes one request (or connection) from the Service's bucket. Counts nothing: the data
    /// paths use [`Limiters::admit`].
    pub fn check(&self, namespace: &str, name: &str) -> Decision {
        match self.read().get(namespace).and_then(|n| n.get(name)) {
            Some(entry) => entry.decide(),
            None => Decision::Unlimited,
        }
    }

    /// [`Limiters::check`], counting a rejection in [`REJECTED_TOTAL`]. For a connection that
    /// is not HTTP, `Limited` means: close it.
    pub fn admit(&self, namespace: &str, name: &str, protocol: Protocol) -> Decision {
        let table = self.read();
        let Some(entry) = table.get(namespace).and_then(|n| n.get(name)) else {
            return Decision::Unlimited;
        };
        let decision = entry.decide();
        if matches!(decision, Decision::Limited { .. }) {
            entry.rejected[protocol as usize]
                .get_or_init(|| {
                    metrics::counter!(crate::telemetry::name(REJECTED_TOTAL),
                        "namespace" => namespace.to_string(),
                        "service" => name.to_string(),
                        "protocol" => protocol.as_str())
                })
                .increment(1);
        }
        decision
    }

    /// Drops the limits of Services `keep` rejects (cloudcore, after reloading every Service).
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut table = self.write();
        table.retain(|ns, names| {
            names.retain(|name, _| keep(ns, name));
            !names.is_empty()
        });
    }

    /// The limit in force for a Service, for status and debug output.
    pub fn limit(&self, namespace: &str, name: &str) -> Option<Limit> {
        self.read()
            .get(namespace)
            .and_then(|n| n.get(name))
            .map(|e| e.limit)
    }

    // A panic while holding a lock leaves the table whole (every update is a single insert,
    // remove or swap), so a poisoned lock is safe to keep using.
    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.inner.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.inner.table.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps `limiters` in step with the Services' annotations in `views` until `shutdown` (the
/// agent follows its metadata store, cloudcore its view of the store).
pub async fn follow(
    mut views: tokio::sync::watch::Receiver<Arc<MeshView>>,
    limiters: Arc<Limiters>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        // Not held across the wait: a view still referenced here makes the store copy the
        // whole view (every map) on its next change instead of updating it in place.
        limiters.follow(&views.borrow_and_update().clone());
        if !crate::process::changed(&mut views, &shutdown).await {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Object, ObjectMeta, Service, ServiceSpec};
    use crate::view::Interner;

    fn service(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> Service {
        Service {
            api_version: "v1".into(),
            kind: "Service".into(),
            metadata: ObjectMeta {
                name: name.into(),
                namespace: namespace.into(),
                annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..ObjectMeta::default()
            },
            spec: ServiceSpec::default(),
            status: None,
        }
    }

    fn view(services: &[Service]) -> MeshView {
        let mut view = MeshView::default();
        for s in services {
            view.put(Object::Service(s.clone()));
        }
        view
    }

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    #[test]
    fn annotations_parse() {
        let limit = |a: &[(&str, &str)]| {
            limit_of(&ServiceRecord::new(
                &service("default", "web", a),
                &mut Interner::default(),
            ))
        };
        assert_eq!(limit(&[]), Ok(None));
        assert_eq!(
            limit(&[("edgemesh.io/lb-policy", "random")]),
            Ok(None),
            "other annotations do not matter"
        );
        assert_eq!(
            limit(&[(ANNOTATION_QPS, "50")]),
            Ok(Some(Limit {
                qps: nz(50),
                burst: nz(50)
            })),
            "burst defaults to qps"
        );
        assert_eq!(
            limit(&[(ANNOTATION_QPS, " 10 "), (ANNOTATION_BURST, "3")]),
            Ok(Some(Limit {
                qps: nz(10),
                burst: nz(3)
            }))
        );
        for (key, annotations) in [
            (ANNOTATION_QPS, vec![(ANNOTATION_QPS, "lots")]),
            (ANNOTATION_QPS, vec![(ANNOTATION_QPS, "0")]),
            (ANNOTATION_QPS, vec![(ANNOTATION_QPS, "-5")]),
            (ANNOTATION_QPS, vec![(ANNOTATION_QPS, "")]),
            (ANNOTATION_QPS, vec![(ANNOTATION_QPS, "99999999999")]),
            (
                ANNOTATION_BURST,
                vec![(ANNOTATION_QPS, "5"), (ANNOTATION_BURST, "x")],
            ),
            (
                ANNOTATION_BURST,
                vec![(ANNOTATION_QPS, "5"), (ANNOTATION_BURST, "0")],
            ),
            (ANNOTATION_BURST, vec![(ANNOTATION_BURST, "5")]),
        ] {
            let err = limit(&annotations).expect_err("malformed");
            let value = annotations.iter().find(|(k, _)| *k == key).expect("key").1;
            assert_eq!(err.key, key, "{annotations:?}");
            let text = err.to_string();
            assert!(
                text.contains(key) && text.contains(&format!("{value:?}")),
                "{text}"
            );
        }
        let err = limit(&[(ANNOTATION_QPS, "0.5")]).expect_err("fraction");
        assert_eq!(
            err.to_string(),
            "annotation edgemesh.io/qps=\"0.5\": fractions are not supported: expected a whole number of at least 1"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn follow_keeps_buckets_of_unchanged_limits() {
        let limiters = Limiters::new();
        let web = |qps| service("default", "web", &[(ANNOTATION_QPS, qps)]);
        let other = service("default", "other", &[]);
        limiters.follow(&view(&[web("2"), other.clone()]));
        assert_eq!(limiters.check("default", "web"), Decision::Allowed);
        assert_eq!(limiters.check("default", "web"), Decision::Allowed);
        assert!(matches!(
            limiters.check("default", "web"),
            Decision::Limited { .. }
        ));
        assert_eq!(limiters.check("default", "other"), Decision::Unlimited);
        assert_eq!(limiters.check("nowhere", "web"), Decision::Unlimited);

        // An unrelated change, then the same limit again: the empty bucket stays empty.
        let mut other2 = other.clone();
        other2.metadata.labels.insert("x".into(), "y".into());
        limiters.follow(&view(&[web("2"), other2]));
        limiters.follow(&view(&[web("2")]));
        assert!(matches!(
            limiters.check("default", "web"),
            Decision::Limited { .. }
        ));

        // A changed limit starts afresh.
        limiters.follow(&view(&[web("3")]));
        assert_eq!(limiters.check("default", "web"), Decision::Allowed);
        assert_eq!(
            limiters.limit("default", "web"),
            Some(Limit::per_second(nz(3)))
        );

        // A malformed limit leaves the Service unlimited; removal drops the limiter.
        limiters.follow(&view(&[web("fast")]));
        assert_eq!(limiters.check("default", "web"), Decision::Unlimited);
        limiters.follow(&view(&[web("3")]));
        assert!(limiters.limit("default", "web").is_some());
        limiters.follow(&view(&[]));
        assert_eq!(limiters.check("default", "web"), Decision::Unlimited);
    }

    #[tokio::test(start_paused = true)]
    async fn set_replaces_only_changed_limits() {
        let limiters = Limiters::new();
        let one = Limit::per_second(nz(1));
        limiters.set("ns", "a", Some(one));
        assert_eq!(limiters.admit("ns", "a", Protocol::Tcp), Decision::Allowed);
        let Decision::Limited { retry_after } = limiters.admit("ns", "a", Protocol::Tcp) else {
            panic!("second connection in the same instant passes a 1/s limit");
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        limiters.set("ns", "a", Some(one));
        assert!(matches!(
            limiters.check("ns", "a"),
            Decision::Limited { .. }
        ));
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(limiters.check("ns", "a"), Decision::Allowed);
        limiters.set("ns", "a", None);
        assert_eq!(limiters.check("ns", "a"), Decision::Unlimited);
        assert!(limiters.read().is_empty(), "empty namespaces are dropped");
        // More than 10⁹ per second cannot be expressed in nanoseconds: unlimited.
        limiters.set("ns", "a", Some(Limit::per_second(nz(u32::MAX))));
        assert_eq!(limiters.check("ns", "a"), Decision::Unlimited);
        assert!(limiters.read().is_empty());
    }

    /// 200 attempts a second for 10 s against qps=50: the first second's burst plus 50 a
    /// second.
    #[tokio::test(start_paused = true)]
    async fn admits_the_configured_rate() {
        let limiters = Limiters::new();
        limiters.set(
            "ns",
            "strict",
            Some(Limit {
                qps: nz(50),
                burst: nz(1),
            }),
        );
        limiters.set("ns", "bursty", Some(Limit::per_second(nz(50))));
        let (mut strict, mut bursty) = (0, 0);
        for _ in 0..2000 {
            strict += usize::from(limiters.check("ns", "strict") == Decision::Allowed);
            bursty += usize::from(limiters.check("ns", "bursty") == Decision::Allowed);
            tokio::time::advance(Duration::from_millis(5)).await;
        }
        assert!((450..=550).contains(&strict), "admitted {strict}");
        assert!((500..=500 + 50 + 1).contains(&bursty), "admitted {bursty}");
    }
}
