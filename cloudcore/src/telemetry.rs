//! cloudcore's metrics: every `cloudcore_…` series `/metrics` can show, described once here
//! (help text and unit), and the recorder that renders them.
//!
//! Nothing is labelled by node: with thousands of nodes a per-node series would dwarf the rest.
//! Per-node state is in the API (`GET /api/v1/nodes`); metrics carry counts.

use edgehub::telemetry::Metric;
use metrics::Unit;
use metrics_exporter_prometheus::PrometheusHandle;

pub const PROCESS: &str = "cloudcore";

pub const METRICS: &[Metric] = &[
    // Store.
    Metric::gauge(
        "store_version",
        Unit::Count,
        "Resource version of the last committed change.",
    ),
    Metric::counter(
        "store_write_errors_total",
        "Writes the store failed to commit (SQLite errors, not conflicts or bad input).",
    ),
    // Hub.
    Metric::gauge(
        "hub_online_nodes",
        Unit::Count,
        "Nodes connected to the hub now.",
    ),
    Metric::counter(
        "hub_limit_hits_total",
        "Hub connections refused or ended by a limit, by limit (connections, connections_per_peer, handshake_timeout, message_size).",
    ),
    Metric::counter(
        "hub_refused_total",
        "Hub connections refused before the websocket upgrade, by HTTP status.",
    ),
    Metric::counter(
        "hub_syncs_total",
        "Node (re)connections by how they caught up (current, delta or snapshot).",
    ),
    Metric::counter(
        "hub_snapshots_sent_total",
        "Full snapshots sent to nodes.",
    ),
    Metric::counter(
        "hub_changes_sent_total",
        "Changes sent to nodes (one per node per change).",
    ),
    Metric::counter(
        "hub_acks_total",
        "Acknowledgements of committed versions received from nodes.",
    ),
    // API.
    Metric::counter(
        "api_limit_hits_total",
        "REST API connections and requests refused or ended by a limit, by limit (connections, connections_per_peer, idle_timeout, request_timeout, tls_handshake_timeout, body_size).",
    ),
    Metric::counter(
        "api_requests_total",
        "REST API requests by method, matched route and status.",
    ),
    Metric::seconds(
        "api_request_duration_seconds",
        "Time to answer a REST API request, by method and matched route.",
    ),
    // Tunnel relay.
    Metric::counter(
        "tunnel_streams_total",
        "Tunnel streams by kind: relay (node to node), cloud (to the cloud itself), router (to a router rule), opened (by cloudcore to a node).",
    ),
    Metric::bytes(
        "tunnel_bytes_total",
        "Bytes carried by streams cloudcore terminates, by direction (to_endpoint, from_endpoint).",
    ),
    // Router.
    Metric::counter(
        "router_requests_total",
        "Requests through router rules, by rule and outcome.",
    ),
    Metric::seconds(
        "router_request_duration_seconds",
        "Time to answer a request through a router rule, by rule.",
    ),
];

/// Installs the recorder; `None` (logged) when another one is installed already. Called
/// inside the runtime, it also starts the upkeep task.
pub fn install() -> Option<PrometheusHandle> {
    let handle = edgehub::telemetry::install(PROCESS, env!("CARGO_PKG_VERSION"), METRICS)
        .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
        .ok()?;
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(upkeep(handle.clone()));
    }
    Some(handle)
}

/// Folds recorded latencies (API and router requests) into their histogram buckets every
/// second: without it the samples pile up until the next scrape, however long that takes.
/// Runs as long as the runtime: the recorder is global, like the process it measures.
async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_in_docs_observability_md_and_nothing_else_is() {
        let doc = include_str!("../../docs/observability.md");
        assert_eq!(
            edgehub::telemetry::undocumented(PROCESS, METRICS, doc),
            Vec::<String>::new()
        );
    }

    #[test]
    fn metrics_follow_the_naming_rules() {
        assert_eq!(
            edgehub::telemetry::naming_errors(METRICS),
            Vec::<String>::new()
        );
    }
}
