//! Drops of UDP datagrams and flows, by reason. The per-Service flow, datagram and byte
//! counters are resolved once per Service (`ServiceStats::udp`).

use metrics::counter;
use tracing::debug;

pub(super) fn drop_counted(service: &str, reason: &'static str) {
    debug!(service, reason, "UDP datagram dropped");
    counter!("edgemesh_proxy_udp_drops_total", "service" => service.to_string(), "reason" => reason)
        .increment(1);
}
