//! Per-Service proxy counters. Looking a labelled counter up in the registry hashes its labels;
//! the handles are looked up once per Service and kept with its routes instead, so a new
//! connection only bumps atomics. They are registered on first use, so Services that never see
//! traffic add no series to `/metrics`.

use std::sync::{Arc, OnceLock};

use metrics::{counter, Counter};

pub struct ServiceStats {
    /// `namespace/name`.
    label: Arc<str>,
    /// Boxed: most Services of a large mesh never see a connection on a given node.
    counters: OnceLock<Box<Counters>>,
}

pub struct Counters {
    pub forwarded: Counter,
    pub no_endpoints: Counter,
    pub connect_failed: Counter,
    /// Failed attempts on single endpoints (a connection may fall over several times).
    pub endpoint_failures: Counter,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
}

impl ServiceStats {
    pub fn new(label: Arc<str>) -> ServiceStats {
        ServiceStats {
            label,
            counters: OnceLock::new(),
        }
    }

    pub fn get(&self) -> &Counters {
        self.counters.get_or_init(|| {
            let service = self.label.to_string();
            let result = |r: &'static str| {
                counter!("edgemesh_proxy_connections_total", "service" => service.clone(), "result" => r)
            };
            let bytes = |d: &'static str| {
                counter!("edgemesh_proxy_bytes_total", "service" => service.clone(), "direction" => d)
            };
            Box::new(Counters {
                forwarded: result("forwarded"),
                no_endpoints: result("no_endpoints"),
                connect_failed: result("connect_failed"),
                endpoint_failures: counter!("edgemesh_proxy_connect_failures_total", "service" => service.clone()),
                bytes_sent: bytes("sent"),
                bytes_received: bytes("received"),
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
