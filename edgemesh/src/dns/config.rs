//! `[dns]` keys, and where the upstreams come from when none are configured.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use edgehub::config_file::ConfigError;
use serde::{Deserialize, Serialize};

/// The address node-local DNS caches conventionally use (and SPEC §2 names).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 96, 16)), 53);

/// Where the default upstreams are read from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Serve cluster DNS at all.
    pub enabled: bool,
    /// UDP and TCP address of the server.
    pub listen: SocketAddr,
    /// Add the `listen` address to `lo` when the node does not have it (as node-local DNS
    /// caches do), and remove it again on shutdown. Only an address the agent added itself is
    /// ever removed.
    pub setup_address: bool,
    /// Servers for every name outside the cluster domain, as `IP` or `IP:PORT`. Unset: the
    /// `nameserver` lines of /etc/resolv.conf (minus this server itself). Empty: names outside
    /// the cluster domain are refused.
    pub upstreams: Option<Vec<String>>,
    /// TTL of cluster records (and the SOA's negative-caching TTL).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Budget for answering a forwarded name, over all upstreams; past it the client gets
    /// SERVFAIL.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Forwarded answers kept (each for its upstream TTL, at most an hour); 0 disables the cache.
    pub cache_size: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            listen: DEFAULT_LISTEN,
            setup_address: true,
            upstreams: None,
            ttl: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(2),
            cache_size: 4096,
        }
    }
}

/// Largest `dns.cache_size` accepted (about 1 KB per entry).
const MAX_CACHE_SIZE: usize = 1_000_000;

impl DnsConfig {
    /// Checks what types alone cannot; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.port() == 0 {
            return Err(ConfigError::key("dns.listen", "needs a port (53)"));
        }
        let ip = self.listen.ip();
        if ip.is_multicast() || is_broadcast(ip) {
            return Err(ConfigError::key(
                "dns.listen",
                format!("{ip} is not a unicast address"),
            ));
        }
        if let Some(list) = &self.upstreams {
            for s in list {
                let addr = parse_upstream(s).map_err(|e| ConfigError::key("dns.upstreams", e))?;
                if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 {
                    return Err(ConfigError::key(
                        "dns.upstreams",
                        format!("{s:?} is not a server address"),
                    ));
                }
                if points_at_listen(addr, self.listen) {
                    return Err(ConfigError::key(
                        "dns.upstreams",
                        format!(
                            "{s:?} is this server itself (dns.listen); it would forward to itself"
                        ),
                    ));
                }
            }
        }
        if self.ttl > Duration::from_secs(86_400) {
            return Err(ConfigError::key("dns.ttl", "must be at most 24h"));
        }
        if self.upstream_timeout.is_zero() || self.upstream_timeout > Duration::from_secs(60) {
            return Err(ConfigError::key(
                "dns.upstream_timeout",
                "must be more than 0s and at most 60s",
            ));
        }
        if self.cache_size > MAX_CACHE_SIZE {
            return Err(ConfigError::key(
                "dns.cache_size",
                format!("must be at most {MAX_CACHE_SIZE}"),
            ));
        }
        Ok(())
    }

    /// The upstreams to forward to: the configured ones, or those of `resolv_conf` without
    /// this server itself. The second value lists what was left out, and why, for a warning.
    pub fn resolve_upstreams(&self, resolv_conf: &Path) -> (Vec<SocketAddr>, Vec<String>) {
        if let Some(list) = &self.upstreams {
            // Validated already; anything unparsable is skipped rather than trusted.
            let addrs = list.iter().filter_map(|s| parse_upstream(s).ok()).collect();
            return (addrs, Vec::new());
        }
        let text = match std::fs::read_to_string(resolv_conf) {
            Ok(t) => t,
            Err(e) => return (Vec::new(), vec![format!("{}: {e}", resolv_conf.display())]),
        };
        let mut addrs = Vec::new();
        let mut skipped = Vec::new();
        for ns in nameservers(&text) {
            match ns {
                Ok(addr) if is_self(addr, self.listen) => {
                    skipped.push(format!("{addr} (this server itself)"))
                }
                Ok(addr) => {
                    if !addrs.contains(&addr) {
                        addrs.push(addr)
                    }
                }
                Err(e) => skipped.push(e),
            }
        }
        (addrs, skipped)
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// `IP` (port 53) or `IP:PORT`; IPv6 with a port as `[IP]:PORT`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an IP address or IP:PORT"))
}

/// The `nameserver` entries of a resolv.conf text, in order.
pub fn nameservers(text: &str) -> Vec<Result<SocketAddr, String>> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            let value = words.next()?;
            Some(match value.parse::<IpAddr>() {
                Ok(ip) => Ok(SocketAddr::new(ip, 53)),
                // A scoped IPv6 address (fe80::1%eth0) cannot be dialled without the interface.
                Err(_) => Err(format!("nameserver {value} (not a plain IP address)")),
            })
        })
        .collect()
}

/// Whether `upstream` names the `listen` address itself (without asking the kernel).
fn points_at_listen(upstream: SocketAddr, listen: SocketAddr) -> bool {
    upstream.port() == listen.port()
        && (upstream.ip() == listen.ip()
            || (listen.ip().is_unspecified() && upstream.ip().is_loopback()))
}

/// Whether forwarding to `upstream` would reach this server: the same address, or (when the
/// server listens on every address) any address of this node on the same port.
pub fn is_self(upstream: SocketAddr, listen: SocketAddr) -> bool {
    if points_at_listen(upstream, listen) {
        return true;
    }
    upstream.port() == listen.port() && listen.ip().is_unspecified() && is_local(upstream.ip())
}

/// Whether `ip` is an address of this node: only then can a socket be bound to it.
pub fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehub::config_file;

    #[derive(Deserialize)]
    struct Wrapper {
        #[serde(default)]
        dns: DnsConfig,
    }

    fn parse(text: &str) -> Result<DnsConfig, ConfigError> {
        let w: Wrapper = config_file::from_table(text.parse().expect("toml"))?;
        w.dns.validate()?;
        Ok(w.dns)
    }

    #[test]
    fn defaults_and_errors_that_name_keys() {
        let c = parse("").expect("defaults");
        assert!(c.enabled && c.setup_address);
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.ttl, Duration::from_secs(5));
        let c = parse("[dns]\nupstreams = [\"10.0.0.2\", \"[fd00::1]:5353\"]\nttl = \"30s\"")
            .expect("valid");
        assert_eq!(
            c.resolve_upstreams(Path::new("/nonexistent")).0,
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[fd00::1]:5353".parse().unwrap()
            ]
        );
        for (text, key) in [
            ("[dns]\nlisten = \"10.0.0.1\"", "dns.listen"),
            ("[dns]\nlisten = \"10.0.0.1:0\"", "dns.listen"),
            ("[dns]\nlisten = \"224.0.0.1:53\"", "dns.listen"),
            ("[dns]\nupstreams = [\"resolver\"]", "dns.upstreams"),
            ("[dns]\nupstreams = \"10.0.0.2\"", "dns.upstreams"),
            ("[dns]\nupstreams = [\"169.254.96.16\"]", "dns.upstreams"),
            (
                "[dns]\nlisten = \"0.0.0.0:53\"\nupstreams = [\"127.0.0.1\"]",
                "dns.upstreams",
            ),
            ("[dns]\nupstreams = [\"0.0.0.0\"]", "dns.upstreams"),
            ("[dns]\nttl = \"2d\"", "dns.ttl"),
            ("[dns]\nttl = \"soon\"", "dns.ttl"),
            ("[dns]\nupstream_timeout = \"0s\"", "dns.upstream_timeout"),
            ("[dns]\ncache_size = -1", "dns.cache_size"),
            ("[dns]\ncache_size = 100000000", "dns.cache_size"),
            ("[dns]\nport = 53", "dns.port"),
            ("[dns]\nenabled = \"yes\"", "dns.enabled"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        }
    }

    #[test]
    fn resolv_conf_upstreams_leave_out_this_server() {
        let text = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver 169.254.96.16 # us\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\n  nameserver   fd00::53\noptions ndots:5\n";
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, text).expect("write");
        let c = DnsConfig::default();
        let (addrs, skipped) = c.resolve_upstreams(&path);
        assert_eq!(
            addrs,
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[fd00::53]:53".parse().unwrap()
            ]
        );
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        // Listening everywhere, a loopback nameserver on the same port is this server too.
        let any = DnsConfig {
            listen: "0.0.0.0:53".parse().unwrap(),
            ..DnsConfig::default()
        };
        std::fs::write(&path, "nameserver 127.0.0.1\nnameserver 127.0.0.53\n").expect("write");
        let (addrs, _) = any.resolve_upstreams(&path);
        assert!(addrs.is_empty(), "{addrs:?}");
        // ...but not on another port, or when listening on one address only.
        let (addrs, _) = c.resolve_upstreams(&path);
        assert_eq!(addrs.len(), 2);
        let (addrs, skipped) = c.resolve_upstreams(Path::new("/nonexistent/resolv.conf"));
        assert!(addrs.is_empty() && skipped.len() == 1);
    }
}
