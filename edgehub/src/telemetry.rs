//! Prometheus metrics for both binaries: the recorder, the catalogue of described metrics, and
//! the name prefix of code both sides run.
//!
//! Every metric is named after the process that exports it (`edgemesh_…` or `cloudcore_…`),
//! carries its base unit in the name (`_seconds`, `_bytes`) and, for a counter, ends in
//! `_total`. Code in this crate that runs on both sides (the QPS limits, the data-plane core) names its metrics with
//! [`name`], which uses the prefix [`install`] was given.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use metrics::Unit;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// What kind of metric a [`Metric`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's description: what `/metrics` says in its `# HELP` line and what
/// `docs/observability.md` lists.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub kind: Kind,
    /// The name without the process prefix: `limit_rejected_total`.
    pub name: &'static str,
    pub unit: Unit,
    pub help: &'static str,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Metric {
        Metric {
            kind: Kind::Counter,
            name,
            unit: Unit::Count,
            help,
        }
    }

    pub const fn gauge(name: &'static str, unit: Unit, help: &'static str) -> Metric {
        Metric {
            kind: Kind::Gauge,
            name,
            unit,
            help,
        }
    }

    pub const fn bytes(name: &'static str, help: &'static str) -> Metric {
        Metric {
            kind: Kind::Counter,
            name,
            unit: Unit::Bytes,
            help,
        }
    }

    pub const fn seconds(name: &'static str, help: &'static str) -> Metric {
        Metric {
            kind: Kind::Histogram,
            name,
            unit: Unit::Seconds,
            help,
        }
    }
}

/// Metrics of this crate's code, exported by both processes under their own prefix.
pub const SHARED: &[Metric] = &[
    Metric::counter(
        "limit_rejected_total",
        "Requests (HTTP) and connections (other protocols) refused by a Service's QPS limit, by namespace, service and protocol.",
    ),
    Metric::gauge(
        "build_info",
        Unit::Count,
        "Always 1; the version label is the running build.",
    ),
    Metric::gauge(
        "process_start_time_seconds",
        Unit::Seconds,
        "When the process started, in seconds since the Unix epoch.",
    ),
    // The data-plane core: the proxy on nodes, the router ingress in cloudcore.
    Metric::gauge(
        "proxy_routes",
        Unit::Count,
        "Service ports in the proxy's route table.",
    ),
    Metric::counter(
        "proxy_connections_total",
        "Intercepted connections by Service and result (forwarded, no_endpoints, connect_failed).",
    ),
    Metric::counter(
        "proxy_connect_failures_total",
        "Failed attempts to connect to an endpoint, by Service (a connection may retry another endpoint).",
    ),
    Metric::bytes(
        "proxy_bytes_total",
        "Bytes proxied by Service and direction (sent to the endpoint, received from it).",
    ),
    Metric::counter(
        "proxy_detected_total",
        "Connections by Service and the protocol sniffed from their first bytes.",
    ),
    Metric::counter(
        "proxy_endpoint_ejections_total",
        "Endpoints taken out of balancing by outlier detection.",
    ),
    Metric::gauge(
        "proxy_http_active_connections",
        Unit::Count,
        "HTTP connections (by protocol http1, h2) the L7 proxy holds open now.",
    ),
    Metric::counter(
        "proxy_http_requests_total",
        "HTTP requests by Service, protocol and status class (1xx to 5xx).",
    ),
    Metric::seconds(
        "proxy_http_request_duration_seconds",
        "Time from a request's arrival to its response headers, by Service and protocol.",
    ),
    // Streams refused by this side ([`crate::serve`], cloudcore's relay).
    Metric::counter(
        "tunnel_refused_total",
        "Streams refused, by reason (on a node: streams the cloud opened to it; in cloudcore: streams nodes opened, relayed or for cloud endpoints).",
    ),
];

/// Histogram buckets (seconds) for every latency: from a DNS cache hit (tens of microseconds)
/// to a slow proxied request (tens of seconds).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

static PREFIX: OnceLock<&'static str> = OnceLock::new();

/// The process prefix of metric names: `edgemesh` until [`install`] says otherwise.
pub fn prefix() -> &'static str {
    PREFIX.get().copied().unwrap_or("edgemesh")
}

/// `name` with the process prefix: `name("limit_rejected_total")` is
/// `cloudcore_limit_rejected_total` in cloudcore.
pub fn name(name: &str) -> String {
    format!("{}_{name}", prefix())
}

/// Installs the global Prometheus recorder for `process` (`edgemesh` or `cloudcore`), describes
/// [`SHARED`] and `own` (names without the prefix), and sets the build and start-time gauges.
/// Fails when a recorder is already installed (several agents in one test process): metrics
/// then go to the first one.
pub fn install(
    process: &'static str,
    version: &'static str,
    own: &[Metric],
) -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let _ = PREFIX.set(process);
    let handle = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)?
        .install_recorder()?;
    for m in SHARED.iter().chain(own) {
        describe(process, m);
    }
    metrics::gauge!(format!("{process}_build_info"), "version" => version).set(1.0);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::gauge!(format!("{process}_process_start_time_seconds")).set(started.floor());
    Ok(handle)
}

/// `GET /metrics` of both processes: the scrape in the Prometheus text format, or 404 where no
/// recorder is installed (several agents in one test process).
pub fn scrape(handle: Option<&PrometheusHandle>) -> axum::response::Response {
    use axum::http::{header, HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    match handle {
        Some(h) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

fn describe(process: &str, m: &Metric) {
    let full = format!("{process}_{}", m.name);
    match m.kind {
        Kind::Counter => metrics::describe_counter!(full, m.unit, m.help),
        Kind::Gauge => metrics::describe_gauge!(full, m.unit, m.help),
        Kind::Histogram => metrics::describe_histogram!(full, m.unit, m.help),
    }
}

/// Checks a catalogue against the naming rules; the unit tests of both binaries run it.
pub fn naming_errors(metrics: &[Metric]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for m in SHARED.iter().chain(metrics) {
        if !seen.insert(m.name) {
            errors.push(format!("{}: described twice", m.name));
        }
        let valid = m
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid || m.name.is_empty() {
            errors.push(format!("{}: not a lowercase snake_case name", m.name));
        }
        if m.help.is_empty() {
            errors.push(format!("{}: no help text", m.name));
        }
        if (m.kind == Kind::Counter) != m.name.ends_with("_total") {
            errors.push(format!(
                "{}: counters, and only counters, end in _total",
                m.name
            ));
        }
        for bad in [
            "_ms",
            "_millis",
            "_milliseconds",
            "_kb",
            "_mb",
            "_microseconds",
        ] {
            if m.name.contains(&format!("{bad}_")) || m.name.ends_with(bad) {
                errors.push(format!("{}: use base units (seconds, bytes)", m.name));
            }
        }
        let unit_suffix = match m.unit {
            Unit::Seconds => Some("seconds"),
            Unit::Bytes => Some("bytes"),
            _ => None,
        };
        if let Some(u) = unit_suffix {
            let base = m.name.strip_suffix("_total").unwrap_or(m.name);
            if !base.ends_with(u) {
                errors.push(format!("{}: the unit {u} belongs in the name", m.name));
            }
        }
    }
    errors
}

/// Differences between a process's catalogue (with [`SHARED`]) and the metric tables of
/// `docs/observability.md` (`doc`): a metric nobody documented, or a documented one that no
/// longer exists. Both binaries' unit tests run it.
pub fn undocumented(process: &str, metrics: &[Metric], doc: &str) -> Vec<String> {
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name))
        .filter_map(|name| {
            name.strip_prefix(&format!("{process}_"))
                .or_else(|| name.strip_prefix("P_"))
                .map(String::from)
        })
        .collect();
    let known: std::collections::BTreeSet<String> = SHARED
        .iter()
        .chain(metrics)
        .map(|m| m.name.to_string())
        .collect();
    let mut problems: Vec<String> = known
        .difference(&documented)
        .map(|m| format!("{process}_{m} is not in docs/observability.md"))
        .collect();
    problems.extend(
        documented
            .difference(&known)
            .map(|m| format!("{process}_{m} is documented but not described in the code")),
    );
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_metrics_follow_the_naming_rules() {
        assert_eq!(naming_errors(&[]), Vec::<String>::new());
    }

    #[test]
    fn the_rules_catch_bad_names() {
        let bad = [
            Metric::counter("hub_connects", "no _total"),
            Metric::gauge("latency_ms", Unit::Milliseconds, "milliseconds"),
            Metric::bytes("tunnel_sent_total", "bytes not in the name"),
        ];
        let errors = naming_errors(&bad);
        assert!(
            errors.iter().any(|e| e.starts_with("hub_connects:")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("latency_ms:")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("tunnel_sent_total:")),
            "{errors:?}"
        );
    }

    #[test]
    fn names_take_the_process_prefix() {
        // Nothing installed a recorder in this test binary: the default prefix.
        assert_eq!(
            name("limit_rejected_total"),
            "edgemesh_limit_rejected_total"
        );
    }
}
