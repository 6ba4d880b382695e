//! Per-Service proxy counters. Looking a labelled counter up in the registry hashes its labels;
//! the handles are looked up once per Service and kept with its routes instead, so a new
//! connection only bumps atomics. They are registered on first use, so Services that never see
//! traffic add no series to `/metrics`.

use std::sync::{Arc, OnceLock};

use hyper::StatusCode;
use metrics::{counter, histogram, Counter, Histogram};

use crate::io::datagram::Direction;
use crate::io::Protocol;

pub struct ServiceStats {
    /// `namespace/name`.
    label: Arc<str>,
    /// Boxed: most Services of a large mesh never see a connection on a given node.
    counters: OnceLock<Box<Counters>>,
    /// Per protocol (`http1`, `h2`): only Services that see HTTP get these series.
    http: [OnceLock<Box<HttpStats>>; 2],
    /// Only Services that see UDP flows get these series.
    udp: OnceLock<Box<UdpStats>>,
}

/// The UDP flows of one Service: resolved once per Service, so that a new flow and each of its
/// datagrams only bump atomics.
pub struct UdpStats {
    flows: Counter,
    /// By [`Direction`]: to the endpoint, from it.
    datagrams: [Counter; 2],
    bytes: [Counter; 2],
}

impl UdpStats {
    /// A flow that is being forwarded.
    pub fn flow(&self) {
        self.flows.increment(1);
    }

    pub fn datagram(&self, direction: Direction, len: usize) {
        let i = match direction {
            Direction::ToStream => 0,
            Direction::FromStream => 1,
        };
        self.datagrams[i].increment(1);
        self.bytes[i].increment(len as u64);
    }
}

/// Requests of one Service over one HTTP version.
pub struct HttpStats {
    /// By status class: 1xx to 5xx.
    classes: [Counter; 5],
    /// Time from the request to the response head (what the caller waits before anything
    /// comes back; bodies can stream for hours).
    pub duration: Histogram,
}

impl HttpStats {
    pub fn count(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.classes[class].increment(1);
    }
}

pub struct Counters {
    pub forwarded: Counter,
    pub no_endpoints: Counter,
    pub connect_failed: Counter,
    /// Failed attempts on single endpoints (a connection may fall over several times).
    pub endpoint_failures: Counter,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    /// Connections by the protocol detection found (those whose Service's annotation set it
    /// are not counted), in the order of [`Protocol::ALL`].
    detected: [Counter; 4],
}

impl Counters {
    pub fn detected(&self, protocol: Protocol) -> &Counter {
        &self.detected[protocol as usize]
    }
}

impl ServiceStats {
    pub fn new(label: Arc<str>) -> ServiceStats {
        ServiceStats {
            label,
            counters: OnceLock::new(),
            http: Default::default(),
            udp: OnceLock::new(),
        }
    }

    /// The UDP flow metrics (`direction` is `to_endpoint` or `from_endpoint`).
    pub fn udp(&self) -> &UdpStats {
        self.udp.get_or_init(|| {
            let service = self.label.to_string();
            let by = |name: &str, direction: &'static str| {
                counter!(crate::telemetry::name(name), "service" => service.clone(), "direction" => direction)
            };
            Box::new(UdpStats {
                flows: counter!(crate::telemetry::name("proxy_udp_flows_total"), "service" => service.clone()),
                datagrams: [
                    by("proxy_udp_datagrams_total", "to_endpoint"),
                    by("proxy_udp_datagrams_total", "from_endpoint"),
                ],
                bytes: [
                    by("proxy_udp_bytes_total", "to_endpoint"),
                    by("proxy_udp_bytes_total", "from_endpoint"),
                ],
            })
        })
    }

    /// The request metrics of `protocol` ([`Protocol::Http1`] or [`Protocol::H2`]).
    pub fn http(&self, protocol: Protocol) -> &HttpStats {
        let i = usize::from(protocol == Protocol::H2);
        self.http[i].get_or_init(|| {
            let service = self.label.to_string();
            let p = protocol.as_str();
            let class = |c: &'static str| {
                counter!(crate::telemetry::name("proxy_http_requests_total"), "service" => service.clone(), "protocol" => p, "class" => c)
            };
            Box::new(HttpStats {
                classes: [
                    class("1xx"),
                    class("2xx"),
                    class("3xx"),
                    class("4xx"),
                    class("5xx"),
                ],
                duration: histogram!(crate::telemetry::name("proxy_http_request_duration_seconds"), "service" => service.clone(), "protocol" => p),
            })
        })
    }

    /// `namespace/name`, for metrics recorded outside the cached handles.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn get(&self) -> &Counters {
        self.counters.get_or_init(|| {
            let service = self.label.to_string();
            let result = |r: &'static str| {
                counter!(crate::telemetry::name("proxy_connections_total"), "service" => service.clone(), "result" => r)
            };
            let bytes = |d: &'static str| {
                counter!(crate::telemetry::name("proxy_bytes_total"), "service" => service.clone(), "direction" => d)
            };
            Box::new(Counters {
                forwarded: result("forwarded"),
                no_endpoints: result("no_endpoints"),
                connect_failed: result("connect_failed"),
                endpoint_failures: counter!(crate::telemetry::name("proxy_connect_failures_total"), "service" => service.clone()),
                bytes_sent: bytes("sent"),
                bytes_received: bytes("received"),
                detected: Protocol::ALL.map(|p| {
                    counter!(crate::telemetry::name("proxy_detected_total"), "service" => service.clone(), "protocol" => p.as_str())
                }),
            })
        })
    }
}

impl std::fmt::Debug for ServiceStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceStats")
            .field("label", &self.label)
            .finish()
    }
}
