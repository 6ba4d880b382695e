//! The agent's metrics: every `edgemesh_…` series `/metrics` can show, described once here
//! (help text and unit), and the recorder that renders them.
//!
//! Label values are bounded: Services come from the mesh's metadata, everything else from a
//! fixed set (result, reason, protocol, class), and TLS server names beyond a small set count
//! as `other`.

use edgehub::telemetry::Metric;
use metrics::Unit;
use metrics_exporter_prometheus::PrometheusHandle;

pub const PROCESS: &str = "edgemesh";

pub const METRICS: &[Metric] = &[
    // Sync with the cloud (edgehub's hub client and metamanager, run by the agent only).
    Metric::gauge(
        "hub_connected",
        Unit::Count,
        "1 while the agent holds a connection to cloudcore's hub, else 0.",
    ),
    Metric::counter("hub_connects_total", "Connections to the hub that were accepted."),
    Metric::counter("hub_disconnects_total", "Hub connections that ended."),
    Metric::counter(
        "hub_changes_applied_total",
        "Metadata changes committed to the local store.",
    ),
    Metric::gauge(
        "meta_version",
        Unit::Count,
        "Resource version of the local metadata store.",
    ),
    Metric::gauge("meta_services", Unit::Count, "Services in the local store."),
    Metric::gauge(
        "meta_endpoints",
        Unit::Count,
        "Endpoints objects in the local store.",
    ),
    Metric::gauge("meta_nodes", Unit::Count, "Nodes in the local store."),
    Metric::counter(
        "meta_uninterpreted_objects_total",
        "Stored objects this agent could not interpret (written by a newer cloudcore); kept, not served.",
    ),
    Metric::counter(
        "meta_store_recoveries_total",
        "Corrupt local stores moved aside and replaced by an empty one, which the next sync from the cloud fills.",
    ),
    // Admin API.
    Metric::counter(
        "admin_limit_hits_total",
        "Admin API connections and requests refused or ended by a limit, by limit (connections, idle_timeout, request_timeout).",
    ),
    // Proxy.
    Metric::gauge(
        "proxy_active_connections",
        Unit::Count,
        "Connections the proxy holds open now.",
    ),
    Metric::counter(
        "proxy_tls_connections_total",
        "TLS connections by Service and server name (SNI; names beyond a bounded set count as other).",
    ),
    Metric::counter(
        "proxy_unmatched_connections_total",
        "Intercepted connections to an address with no Service port.",
    ),
    Metric::counter(
        "proxy_refused_connections_total",
        "Connections refused before routing, by reason (max_connections).",
    ),
    Metric::gauge(
        "proxy_udp_flows",
        Unit::Count,
        "UDP flows (client address and Service IP:port) the proxy holds now.",
    ),
    Metric::counter(
        "proxy_udp_flows_total",
        "UDP flows started, by Service.",
    ),
    Metric::counter(
        "proxy_udp_datagrams_total",
        "UDP datagrams proxied, by Service and direction (to_endpoint, from_endpoint).",
    ),
    Metric::bytes(
        "proxy_udp_bytes_total",
        "Bytes of UDP datagrams proxied, by Service and direction.",
    ),
    Metric::counter(
        "proxy_udp_drops_total",
        "UDP datagrams or flows dropped, by Service and reason (evicted, queue_full, unreachable, rate_limited, no_endpoints, ...).",
    ),
    Metric::counter(
        "iptables_repairs_total",
        "iptables rules found missing or changed and put back.",
    ),
    // Tunnel.
    Metric::counter(
        "tunnel_streams_accepted_total",
        "Streams accepted for an endpoint on this node, by path (relay: through the cloud; direct: from a peer over a direct path).",
    ),
    // Direct paths.
    Metric::counter(
        "direct_streams_total",
        "Streams this node opened to endpoints on other nodes, by path (direct, relay).",
    ),
    Metric::counter(
        "direct_fallbacks_total",
        "Stream opens a direct path did not carry (no answer within 1 s, path closed); the relay took them.",
    ),
    Metric::counter(
        "direct_failed_rounds_total",
        "Rounds of dialling a peer that formed no direct path.",
    ),
    Metric::gauge("direct_paths", Unit::Count, "Direct paths up now."),
    Metric::gauge(
        "direct_path_up",
        Unit::Count,
        "1 while calls to the peer take a direct path.",
    ),
    Metric::gauge(
        "direct_path_rtt_seconds",
        Unit::Seconds,
        "Smoothed round-trip time of the direct path to the peer.",
    ),
    Metric::bytes(
        "direct_path_bytes_total",
        "UDP bytes of the direct paths to the peer, by direction (tx, rx).",
    ),
    // DNS.
    Metric::counter(
        "dns_queries_total",
        "DNS queries answered, by query type and result code.",
    ),
    Metric::seconds(
        "dns_query_duration_seconds",
        "Time to answer a DNS query, by where the answer came from (cluster, cache, upstream, local).",
    ),
    Metric::counter(
        "dns_cache_hits_total",
        "Queries outside the cluster domain answered from the cache.",
    ),
    Metric::counter(
        "dns_upstream_failures_total",
        "Forwarded queries that no upstream answered.",
    ),
    Metric::counter(
        "dns_limit_hits_total",
        "Times a bound of the DNS server was reached, by limit (tcp_idle, tcp_per_client, tcp_total, message_size, forward_in_flight).",
    ),
];

/// Installs the recorder; `None` (logged) when another one is installed already.
pub fn install() -> Option<PrometheusHandle> {
    edgehub::telemetry::install(PROCESS, env!("CARGO_PKG_VERSION"), METRICS)
        .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
        .ok()
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
