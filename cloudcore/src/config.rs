//! cloudcore configuration (`/etc/cloudcore/cloudcore.toml`); every key has a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use edgehub::config_file::ConfigError;
use edgehub::logging::LogConfig;
use ipnet::IpNet;
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/cloudcore/cloudcore.toml";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SQLite store and the generated API token live.
    pub data_dir: PathBuf,
    /// Cluster IPs are validated against, and allocated from, this range.
    pub service_cidr: IpNet,
    pub hub: HubConfig,
    pub api: ApiConfig,
    pub router: RouterConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/cloudcore"),
            service_cidr: "10.96.0.0/12".parse().unwrap_or_else(|_| unreachable!()),
            hub: HubConfig::default(),
            api: ApiConfig::default(),
            router: RouterConfig::default(),
            store: StoreConfig::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    pub listen: SocketAddr,
    /// With both set, the hub and the REST API serve TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// How often the cloud sends a keepalive to each node.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A node that sent nothing for this long is disconnected and marked offline.
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
    /// Time a new connection has to finish TLS and the websocket handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Largest message a node may send.
    pub max_message_size: usize,
    /// Approximate size of one snapshot message. Each connection keeps a send buffer as large
    /// as the largest message it sent, so this bounds per-node memory after a snapshot.
    pub snapshot_chunk_bytes: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 10000)),
            tls_cert: None,
            tls_key: None,
            keepalive_interval: Duration::from_secs(10),
            node_timeout: Duration::from_secs(40),
            handshake_timeout: Duration::from_secs(10),
            max_message_size: 1 << 20,
            snapshot_chunk_bytes: 8 << 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Bearer token of the REST API; generated into `<data_dir>/api-token` when absent.
    pub token: Option<String>,
    /// Largest request body accepted.
    pub max_body_size: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 10002)),
            token: None,
            max_body_size: 16 << 20,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// The router's REST ingress (cloud clients calling edge services by rule).
    pub listen: SocketAddr,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 9443)),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded, the default).
    pub backend: String,
    /// Changes kept for resuming nodes; a node further behind gets a snapshot.
    pub history: usize,
    /// Memory the kept changes may use; the oldest go first.
    pub history_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: "sqlite".into(),
            history: 10_000,
            history_bytes: 64 << 20,
        }
    }
}

impl Config {
    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.hub.tls_cert, &self.hub.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::key(
                    "hub.tls_key",
                    "is required with hub.tls_cert",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::key(
                    "hub.tls_cert",
                    "is required with hub.tls_key",
                ))
            }
            _ => {}
        }
        if self.store.backend != "sqlite" {
            return Err(ConfigError::key(
                "store.backend",
                format!(
                    "unsupported backend {:?}: this build has sqlite",
                    self.store.backend
                ),
            ));
        }
        if self.store.history == 0 {
            return Err(ConfigError::key("store.history", "must be at least 1"));
        }
        if self.hub.snapshot_chunk_bytes < 1024 {
            return Err(ConfigError::key(
                "hub.snapshot_chunk_bytes",
                "must be at least 1024",
            ));
        }
        if self.hub.max_message_size < 4096 {
            return Err(ConfigError::key(
                "hub.max_message_size",
                "must be at least 4096",
            ));
        }
        if self.hub.node_timeout <= self.hub.keepalive_interval {
            return Err(ConfigError::key(
                "hub.node_timeout",
                "must be longer than hub.keepalive_interval",
            ));
        }
        if self.service_cidr.prefix_len() + 2 > self.service_cidr.max_prefix_len() {
            return Err(ConfigError::key(
                "service_cidr",
                "is too small to hold cluster IPs",
            ));
        }
        if let Some(t) = &self.api.token {
            if t.len() < 16 {
                return Err(ConfigError::key(
                    "api.token",
                    "must be at least 16 characters",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehub::config_file;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().expect("toml");
        let c: Config = config_file::from_table(table)?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_and_errors_that_name_keys() {
        let c = parse("").expect("defaults");
        assert_eq!(c.hub.listen.port(), 10000);
        assert_eq!(c.api.listen.port(), 10002);
        assert_eq!(c.router.listen.port(), 9443);
        let c =
            parse("[hub]\nkeepalive_interval = \"2s\"\nnode_timeout = \"5s\"").expect("durations");
        assert_eq!(c.hub.node_timeout, Duration::from_secs(5));
        for (text, key) in [
            ("[hub]\nlisten = \"nope\"", "hub.listen"),
            ("[hub]\ntls_cert = \"/x\"", "hub.tls_key"),
            ("service_cidr = \"10.0.0.0/99\"", "service_cidr"),
            ("[store]\nbackend = \"etcd\"", "store.backend"),
            ("[api]\ntokn = \"x\"", "api.tokn"),
            ("[hub]\nnode_timeout = \"soon\"", "hub.node_timeout"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        }
    }
}
