//! What each rule counts, and the router's metrics.
//!
//! Counting rule: a request **succeeds** when the target answered with a status below 500 (a
//! 4xx is the target's answer, delivered); it **fails** when the router answered itself (no
//! Service or endpoints 503, unreachable 502, timeout 504, over the rule's QPS 429) or the
//! target answered 5xx. Every failure is also kept, with its time, among the rule's last
//! [`MAX_ERRORS`] errors. Counters live in memory and are written to the store every few
//! seconds and at shutdown, so a crash loses at most that interval of counts.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;

use super::limit::retry_after_secs;
use super::model::{now, RuleErrorEntry, MAX_ERRORS};

/// How a routed request ended, for the rule's counters and `outcome` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The target answered below 500.
    Success,
    /// The target answered 5xx.
    TargetError,
    /// Over the rule's QPS: 429.
    RateLimited,
    /// No such Service, port or ready endpoint: 503.
    NoEndpoints,
    /// The stream or connection could not be opened, or broke before the answer: 502.
    Unreachable,
    /// No answer within `router.request_timeout`: 504.
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::TargetError => "target_error",
            Outcome::RateLimited => "rate_limited",
            Outcome::NoEndpoints => "no_endpoints",
            Outcome::Unreachable => "unreachable",
            Outcome::Timeout => "timeout",
        }
    }
}

/// Why the router answered a request itself instead of passing on the target's answer.
#[derive(Debug)]
pub struct Failure {
    pub outcome: Outcome,
    pub status: StatusCode,
    pub message: String,
    /// `Retry-After` seconds (429).
    pub retry_after: Option<u64>,
}

impl Failure {
    pub fn new(outcome: Outcome, status: StatusCode, message: impl Into<String>) -> Self {
        Failure {
            outcome,
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn rate_limited(rule: &str, wait: Duration) -> Self {
        let secs = retry_after_secs(wait);
        Failure {
            retry_after: Some(secs),
            ..Failure::new(
                Outcome::RateLimited,
                StatusCode::TOO_MANY_REQUESTS,
                format!("rule {rule} is over its QPS limit; retry in {secs} s"),
            )
        }
    }

    pub fn timeout(limit: Duration) -> Self {
        Failure::new(
            Outcome::Timeout,
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within {limit:?} (router.request_timeout)"),
        )
    }

    pub fn unreachable(message: impl Into<String>) -> Self {
        Failure::new(Outcome::Unreachable, StatusCode::BAD_GATEWAY, message)
    }

    pub fn no_endpoints(message: impl Into<String>) -> Self {
        Failure::new(
            Outcome::NoEndpoints,
            StatusCode::SERVICE_UNAVAILABLE,
            message,
        )
    }
}

/// A rule's live counters.
#[derive(Debug, Default)]
pub struct Stats {
    success: AtomicU64,
    fail: AtomicU64,
    errors: Mutex<VecDeque<RuleErrorEntry>>,
    /// Changed since the last write to the store.
    dirty: AtomicBool,
    /// The stored counts these counters include: what this process wrote, and what other
    /// replicas added (several replicas on etcd write to the same rule).
    seen_success: AtomicU64,
    seen_fail: AtomicU64,
}

impl Stats {
    /// Counters as stored (they continue across restarts).
    pub fn restore(success: u64, fail: u64, mut errors: VecDeque<RuleErrorEntry>) -> Self {
        while errors.len() > MAX_ERRORS {
            errors.pop_front();
        }
        Stats {
            success: AtomicU64::new(success),
            fail: AtomicU64::new(fail),
            errors: Mutex::new(errors),
            dirty: AtomicBool::new(false),
            seen_success: AtomicU64::new(success),
            seen_fail: AtomicU64::new(fail),
        }
    }

    pub fn success(&self) {
        self.success.fetch_add(1, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Release);
    }

    pub fn fail(&self, message: String) {
        self.fail.fetch_add(1, Ordering::Relaxed);
        {
            let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            if errors.len() >= MAX_ERRORS {
                errors.pop_front();
            }
            errors.push_back(RuleErrorEntry {
                time: now(),
                message,
            });
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// `(success_messages, fail_messages, errors)`.
    pub fn snapshot(&self) -> (u64, u64, VecDeque<RuleErrorEntry>) {
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (
            self.success.load(Ordering::Relaxed),
            self.fail.load(Ordering::Relaxed),
            errors,
        )
    }

    /// Whether anything changed since the last call.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// What a flush adds to the stored counts (counted here since the store was last seen),
    /// taken as stored from now on.
    pub fn claim(&self, success: u64, fail: u64) -> (u64, u64) {
        let ds = success.saturating_sub(self.seen_success.load(Ordering::Acquire));
        let df = fail.saturating_sub(self.seen_fail.load(Ordering::Acquire));
        self.seen_success.fetch_add(ds, Ordering::AcqRel);
        self.seen_fail.fetch_add(df, Ordering::AcqRel);
        (ds, df)
    }

    /// Gives back a claim whose write failed.
    pub fn unclaim(&self, ds: u64, df: u64) {
        self.seen_success.fetch_sub(ds, Ordering::AcqRel);
        self.seen_fail.fetch_sub(df, Ordering::AcqRel);
        self.mark_dirty();
    }

    /// Takes in the stored counts: what other replicas added since they were last seen is
    /// added here, and their errors are merged with these (the newest kept).
    pub fn rebase(&self, success: u64, fail: u64, errors: &VecDeque<RuleErrorEntry>) {
        let seen = self.seen_success.fetch_max(success, Ordering::AcqRel);
        self.success
            .fetch_add(success.saturating_sub(seen), Ordering::Relaxed);
        let seen = self.seen_fail.fetch_max(fail, Ordering::AcqRel);
        self.fail
            .fetch_add(fail.saturating_sub(seen), Ordering::Relaxed);
        let mut mine = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *mine = merge_errors(&mine, errors);
    }

    /// Marks the counters as unsaved again (a write to the store failed).
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }
}

/// The errors of both lists in time order, each once, the newest [`MAX_ERRORS`] kept.
pub fn merge_errors(
    a: &VecDeque<RuleErrorEntry>,
    b: &VecDeque<RuleErrorEntry>,
) -> VecDeque<RuleErrorEntry> {
    let mut all: Vec<RuleErrorEntry> = a.iter().chain(b.iter()).cloned().collect();
    all.sort_by(|x, y| x.time.cmp(&y.time).then_with(|| x.message.cmp(&y.message)));
    all.dedup();
    let skip = all.len().saturating_sub(MAX_ERRORS);
    all.into_iter().skip(skip).collect()
}

/// Records the request in the metrics: `cloudcore_router_requests_total{rule,outcome}` and
/// `cloudcore_router_request_duration_seconds{rule}`. `rule` is the rule's id (`none` when no
/// rule matched).
pub fn observe(rule: &str, outcome: &'static str, elapsed: Duration) {
    metrics::counter!("cloudcore_router_requests_total", "rule" => rule.to_string(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("cloudcore_router_request_duration_seconds", "rule" => rule.to_string())
        .record(elapsed.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_errors_and_tracks_changes() {
        let s = Stats::default();
        assert!(!s.take_dirty());
        s.success();
        assert!(s.take_dirty());
        assert!(!s.take_dirty());
        for i in 0..(MAX_ERRORS + 3) {
            s.fail(format!("e{i}"));
        }
        let (ok, failed, errors) = s.snapshot();
        assert_eq!((ok, failed as usize), (1, MAX_ERRORS + 3));
        assert_eq!(errors.len(), MAX_ERRORS);
        assert_eq!(errors[0].message, "e3");
        assert_eq!(
            errors[MAX_ERRORS - 1].message,
            format!("e{}", MAX_ERRORS + 2)
        );
        let restored = Stats::restore(
            ok,
            failed,
            errors
                .into_iter()
                .chain([RuleErrorEntry {
                    time: "t".into(),
                    message: "x".into(),
                }])
                .collect(),
        );
        assert_eq!(restored.snapshot().2.len(), MAX_ERRORS);
    }

    #[test]
    fn counts_of_other_replicas_add_up_and_own_flushes_count_once() {
        let a = Stats::restore(10, 1, VecDeque::new());
        for _ in 0..5 {
            a.success();
        }
        // A flush takes 5 new successes; the store had 10 and another replica added 7 since.
        let (ds, df) = a.claim(15, 1);
        assert_eq!((ds, df), (5, 0));
        a.rebase(10 + 7 + 5, 1, &VecDeque::new());
        assert_eq!(
            a.snapshot().0,
            22,
            "10 stored + 5 own + 7 of the other replica"
        );
        // The same stored value seen again (the watch echoing the flush) changes nothing.
        a.rebase(22, 1, &VecDeque::new());
        assert_eq!(a.snapshot().0, 22);
        // A failed write gives its claim back.
        a.success();
        let (ds, _) = a.claim(23, 1);
        a.unclaim(ds, 0);
        assert_eq!(a.claim(23, 1), (1, 0));
    }
}
