//! `[proxy]` keys.

use std::net::IpAddr;
use std::time::Duration;

use edgehub::balance::OutlierConfig;
use edgehub::config_file::ConfigError;
use edgehub::http::HttpConfig;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Port of the transparent listener that iptables redirects the service CIDR to.
    pub port: u16,
    /// Address the listener binds. `REDIRECT` rewrites the destination to the address of the
    /// interface a packet came in on, so the listener must accept on all of them.
    pub listen_address: IpAddr,
    /// Install the iptables rules. Off, the listener still serves what reaches it (for
    /// operators who steer traffic themselves).
    pub intercept: bool,
    /// Firewall mark set on the agent's own upstream sockets; the `OUTPUT` chain lets marked
    /// packets pass so the agent's connections are never captured again.
    pub mark: u32,
    /// How often the iptables rules are checked and repaired.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Time allowed for one connection attempt to an endpoint.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Endpoints tried for one connection before it is given up.
    pub connect_attempts: u32,
    /// A proxied connection with no byte in either direction for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Once one side has sent its FIN, the connection is closed after this long without a
    /// byte (a peer that vanished must not hold a slot for the whole idle timeout).
    #[serde(with = "humantime_serde")]
    pub half_close_timeout: Duration,
    /// How long the first bytes of a connection may take to show its protocol (HTTP/2,
    /// HTTP/1, TLS or other); server-speaks-first protocols wait this long before their
    /// connection is forwarded as opaque TCP. A Service's `edgemesh.io/protocol` skips the wait.
    #[serde(with = "humantime_serde")]
    pub detect_timeout: Duration,
    /// Proxied connections open at once; more are refused (reset) until some close.
    pub max_connections: usize,
    pub outlier: OutlierConfig,
    pub http: HttpConfig,
    pub udp: UdpConfig,
}

/// `[proxy.udp]` keys: UDP Service ports, delivered locally by a mark and a policy route.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UdpConfig {
    /// A flow with no datagram either way for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Service ports whose flows are one request and its answer (DNS): they expire after
    /// `one_shot_idle_timeout` instead, so a resolver's many source ports do not fill the table.
    pub one_shot_ports: Vec<u16>,
    #[serde(with = "humantime_serde")]
    pub one_shot_idle_timeout: Duration,
    /// Flows kept at once; a new flow beyond it evicts the oldest.
    pub max_flows: usize,
    /// Firewall mark (bits) that the `mangle` rules give intercepted UDP packets; a policy
    /// routing rule delivers packets with it to the local host, where the proxy's socket on
    /// the Service IP:port takes them. Must share no bit with `proxy.mark`.
    pub route_mark: u32,
    /// Routing table of that policy rule (one `local` default route to `lo`).
    pub route_table: u32,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            idle_timeout: Duration::from_secs(60),
            one_shot_ports: vec![53],
            one_shot_idle_timeout: Duration::from_secs(5),
            max_flows: 10_000,
            route_mark: 0x10000,
            route_table: 485,
        }
    }
}

impl UdpConfig {
    /// How long a flow to Service port `port` may stay silent.
    pub fn idle_for(&self, port: u16) -> Duration {
        if self.one_shot_ports.contains(&port) {
            self.one_shot_idle_timeout
        } else {
            self.idle_timeout
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            port: 40001,
            listen_address: IpAddr::from([0, 0, 0, 0]),
            intercept: true,
            mark: 0x1e5,
            reconcile_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            connect_attempts: 3,
            idle_timeout: Duration::from_secs(3600),
            half_close_timeout: Duration::from_secs(60),
            detect_timeout: Duration::from_millis(300),
            max_connections: 16_384,
            outlier: OutlierConfig::default(),
            http: HttpConfig::default(),
            udp: UdpConfig::default(),
        }
    }
}

impl ProxyConfig {
    /// Checks what types alone cannot; errors name the key.
    pub fn validate(&self, service_cidr: &IpNet) -> Result<(), ConfigError> {
        if self.port == 0 {
            return Err(ConfigError::key("proxy.port", "must not be 0"));
        }
        if self.mark == 0 {
            return Err(ConfigError::key(
                "proxy.mark",
                "must not be 0 (unmarked packets are the ones to capture)",
            ));
        }
        if service_cidr.contains(&self.listen_address) {
            return Err(ConfigError::key(
                "proxy.listen_address",
                format!(
                    "{} is inside service_cidr {service_cidr}",
                    self.listen_address
                ),
            ));
        }
        if service_cidr.addr().is_ipv6() && self.listen_address.is_ipv4() {
            return Err(ConfigError::key(
                "proxy.listen_address",
                format!(
                    "{} cannot take connections to the IPv6 service_cidr {service_cidr}; use \"::\"",
                    self.listen_address
                ),
            ));
        }
        if self.reconcile_interval < Duration::from_millis(100) {
            return Err(ConfigError::key(
                "proxy.reconcile_interval",
                "must be at least 100ms",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::key("proxy.connect_timeout", "must not be 0"));
        }
        if self.connect_attempts == 0 {
            return Err(ConfigError::key(
                "proxy.connect_attempts",
                "must be at least 1",
            ));
        }
        if self.idle_timeout.is_zero() {
            return Err(ConfigError::key("proxy.idle_timeout", "must not be 0"));
        }
        if self.detect_timeout.is_zero() {
            return Err(ConfigError::key("proxy.detect_timeout", "must not be 0"));
        }
        if self.half_close_timeout.is_zero() {
            return Err(ConfigError::key(
                "proxy.half_close_timeout",
                "must not be 0",
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::key(
                "proxy.max_connections",
                "must be at least 1",
            ));
        }
        if self.outlier.consecutive_failures == 0 {
            return Err(ConfigError::key(
                "proxy.outlier.consecutive_failures",
                "must be at least 1",
            ));
        }
        if self.outlier.base_ejection.is_zero() {
            return Err(ConfigError::key(
                "proxy.outlier.base_ejection",
                "must not be 0",
            ));
        }
        if self.http.request_timeout.is_zero() {
            return Err(ConfigError::key(
                "proxy.http.request_timeout",
                "must not be 0",
            ));
        }
        if self.http.header_read_timeout.is_zero() {
            return Err(ConfigError::key(
                "proxy.http.header_read_timeout",
                "must not be 0",
            ));
        }
        if self.http.pool_idle_timeout < Duration::from_millis(100) {
            return Err(ConfigError::key(
                "proxy.http.pool_idle_timeout",
                "must be at least 100ms",
            ));
        }
        if self.udp.idle_timeout.is_zero() {
            return Err(ConfigError::key("proxy.udp.idle_timeout", "must not be 0"));
        }
        if self.udp.one_shot_idle_timeout.is_zero() {
            return Err(ConfigError::key(
                "proxy.udp.one_shot_idle_timeout",
                "must not be 0",
            ));
        }
        if self.udp.max_flows == 0 {
            return Err(ConfigError::key(
                "proxy.udp.max_flows",
                "must be at least 1",
            ));
        }
        if self.udp.route_mark == 0 || self.udp.route_mark & self.mark != 0 {
            return Err(ConfigError::key(
                "proxy.udp.route_mark",
                format!(
                    "must not be 0 and must share no bit with proxy.mark ({:#x})",
                    self.mark
                ),
            ));
        }
        if matches!(self.udp.route_table, 0 | 253..=255) {
            return Err(ConfigError::key(
                "proxy.udp.route_table",
                "must not be 0 or a reserved table (253 default, 254 main, 255 local)",
            ));
        }
        if self.outlier.max_ejection < self.outlier.base_ejection {
            return Err(ConfigError::key(
                "proxy.outlier.max_ejection",
                "must not be shorter than proxy.outlier.base_ejection",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let cidr: IpNet = "10.96.0.0/12".parse().expect("cidr");
        assert!(ProxyConfig::default().validate(&cidr).is_ok());
        let cases: Vec<(ProxyConfig, &str)> = vec![
            (
                ProxyConfig {
                    port: 0,
                    ..Default::default()
                },
                "proxy.port",
            ),
            (
                ProxyConfig {
                    mark: 0,
                    ..Default::default()
                },
                "proxy.mark",
            ),
            (
                ProxyConfig {
                    listen_address: "10.96.0.1".parse().expect("ip"),
                    ..Default::default()
                },
                "proxy.listen_address",
            ),
            (
                ProxyConfig {
                    connect_attempts: 0,
                    ..Default::default()
                },
                "proxy.connect_attempts",
            ),
            (
                ProxyConfig {
                    outlier: OutlierConfig {
                        max_ejection: Duration::from_secs(1),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "proxy.outlier.max_ejection",
            ),
            (
                ProxyConfig {
                    http: HttpConfig {
                        request_timeout: Duration::ZERO,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "proxy.http.request_timeout",
            ),
            (
                ProxyConfig {
                    http: HttpConfig {
                        pool_idle_timeout: Duration::from_millis(10),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "proxy.http.pool_idle_timeout",
            ),
            (
                ProxyConfig {
                    udp: UdpConfig {
                        route_mark: 0x1,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "proxy.udp.route_mark",
            ),
            (
                ProxyConfig {
                    udp: UdpConfig {
                        max_flows: 0,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "proxy.udp.max_flows",
            ),
        ];
        for (cfg, key) in cases {
            let e = cfg.validate(&cidr).expect_err(key).to_string();
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
        let v6: IpNet = "fd00::/108".parse().expect("cidr");
        let e = ProxyConfig::default()
            .validate(&v6)
            .expect_err("v4 listener")
            .to_string();
        assert!(e.contains("`proxy.listen_address`"), "{e}");
    }
}
