//! cloudcore configuration (`/etc/cloudcore/cloudcore.toml`); every key has a default.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use edgehub::config_doc::{self, KeyDoc};
use edgehub::config_file::ConfigError;
use edgehub::logging::LogConfig;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG: &str = "/etc/cloudcore/cloudcore.toml";

/// The operations guide, whose `cloudcore` table says what every key means.
const REFERENCE: &str = include_str!("../../docs/operations.md");

/// Keys whose values `cloudcore config show` does not print.
const SECRETS: &[&str] = &["api.token"];

/// Every key of cloudcore.toml with its documented default and meaning.
pub fn reference() -> Vec<KeyDoc> {
    config_doc::reference(REFERENCE, "cloudcore")
}

/// `cloudcore config defaults`: every key at its default, with its meaning.
pub fn defaults_toml() -> Result<String, String> {
    config_doc::render::<Config>(
        "cloudcore.toml with every key at its default (`cloudcore config defaults`).\n\
         Keys shown as `# key = ... (unset)` have no default value. Every key may be left\n\
         out. See docs/operations.md.",
        &reference(),
    )
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SQLite store and the generated API token live.
    pub data_dir: PathBuf,
    /// Cluster IPs are validated against, and allocated from, this range.
    pub service_cidr: IpNet,
    pub hub: HubConfig,
    pub api: ApiConfig,
    pub router: RouterConfig,
    pub tunnel: crate::tunnel::TunnelConfig,
    pub store: StoreConfig,
    pub cluster: ClusterConfig,
    pub direct: crate::direct::DirectConfig,
    pub communities: crate::direct::CommunitiesConfig,
    pub identity: crate::direct::IdentityConfig,
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
            tunnel: crate::tunnel::TunnelConfig::default(),
            store: StoreConfig::default(),
            cluster: ClusterConfig::default(),
            direct: crate::direct::DirectConfig::default(),
            communities: crate::direct::CommunitiesConfig::default(),
            identity: crate::direct::IdentityConfig::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
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
    /// Connections still in their TLS or websocket handshake (not yet authenticated), in all.
    pub max_handshakes: usize,
    /// The same, from one address (a site's NAT holds many nodes: not too low).
    pub max_handshakes_per_peer: usize,
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
            max_handshakes: 1024,
            max_handshakes_per_peer: 128,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Bearer token of the REST API; generated into `<data_dir>/api-token` when absent.
    pub token: Option<String>,
    /// Largest request body accepted.
    pub max_body_size: usize,
    /// Open connections, in all and from one address.
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// A connection without a complete request head for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time to answer one request, its body read included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 10002)),
            token: None,
            max_body_size: 16 << 20,
            max_connections: 1024,
            max_connections_per_peer: 64,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
        }
    }
}

impl ApiConfig {
    /// The bounds of the REST API's listener (TLS handshakes get `hub.handshake_timeout`).
    pub fn limits(&self, handshake_timeout: Duration) -> edgehub::accept::HttpLimits {
        edgehub::accept::HttpLimits {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            tls_handshake_timeout: handshake_timeout,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// The router's REST ingress (cloud clients calling edge services by rule).
    pub listen: SocketAddr,
    /// Budget of one routed request up to the target's response head (opening the stream or
    /// connection included); the body then streams for as long as it takes. Over it: 504.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The address written into the Endpoints of a `service` → `rest` rule's virtual Service.
    /// Edge nodes never dial it (an address without `nodeName` makes them open a stream to
    /// cloudcore, which hands it to the router), but it must pass endpoint validation, so not
    /// loopback or unspecified. Default: `listen`'s IP when it is such an address, else
    /// 192.0.2.1 (TEST-NET-1, routed nowhere).
    pub advertise_ip: Option<IpAddr>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 9443)),
            request_timeout: Duration::from_secs(30),
            advertise_ip: None,
        }
    }
}

/// The documentation address used when nothing better is known (see `advertise_ip`).
const PLACEHOLDER_ADVERTISE_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

/// Whether edge nodes could be told to reach `ip` (the checks endpoint validation makes).
fn advertisable(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || link_local)
}

impl RouterConfig {
    /// The IP for virtual Endpoints: `advertise_ip`, else `listen`'s IP when usable, else the
    /// placeholder.
    pub fn virtual_endpoint_ip(&self) -> IpAddr {
        self.advertise_ip
            .or_else(|| Some(self.listen.ip()).filter(|ip| advertisable(*ip)))
            .unwrap_or(PLACEHOLDER_ADVERTISE_IP)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded, the default) or `etcd` (cargo feature `etcd`).
    pub backend: String,
    /// Changes kept for resuming nodes; a node further behind gets a snapshot.
    pub history: usize,
    /// Memory the kept changes may use; the oldest go first.
    pub history_bytes: usize,
    pub etcd: EtcdConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: "sqlite".into(),
            history: 10_000,
            history_bytes: 64 << 20,
            etcd: EtcdConfig::default(),
        }
    }
}

/// `[store.etcd]`: the etcd cluster every replica shares.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Every key cloudcore writes starts with this (several meshes can share one etcd).
    pub prefix: String,
    /// CA that signed the members' certificates (https endpoints).
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key, when the members require client certificates.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Budget of one request to etcd (a write, a lease grant).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a starting replica waits for etcd before it gives up.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// etcd's `--max-txn-ops`: a write needing more operations is refused with 413.
    pub max_txn_ops: usize,
    /// etcd's `--max-request-bytes`: a write larger than this is refused with 413.
    pub max_txn_bytes: usize,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/edgemesh/".into(),
            ca_cert: None,
            cert: None,
            key: None,
            request_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(30),
            max_txn_ops: 128,
            max_txn_bytes: 1536 * 1024,
        }
    }
}

/// `[cluster]`: how replicas on one etcd find and trust each other.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Where the replica link listens (streams relayed from other replicas).
    pub listen: SocketAddr,
    /// How the other replicas reach this one's `listen` (`ws://` or `wss://`).
    pub advertise_url: Option<String>,
    /// The replicas' shared secret (a file, at least 32 bytes); never stored in etcd.
    pub peer_key_file: Option<PathBuf>,
    /// This replica's name in `GET /api/v1/nodes`; unset: advertise_url's host and port.
    pub name: Option<String>,
    /// TLS of the replica link (`wss://`): certificate and key it serves, CA it trusts.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
    /// Time to live of this replica's lease in etcd, and how often it is renewed.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 10003)),
            advertise_url: None,
            peer_key_file: None,
            name: None,
            tls_cert: None,
            tls_key: None,
            ca_cert: None,
            lease_ttl: Duration::from_secs(5),
            heartbeat: Duration::from_secs(2),
        }
    }
}

impl ClusterConfig {
    /// The replica's name: `name`, else the authority of `advertise_url`.
    pub fn replica_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let url = self.advertise_url.as_deref().unwrap_or_default();
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        rest.split('/').next().unwrap_or_default().to_string()
    }
}

fn is_url(s: &str, schemes: &[&str]) -> bool {
    schemes.iter().any(|p| {
        s.strip_prefix(p)
            .and_then(|r| r.strip_prefix("://"))
            .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
    })
}

impl Config {
    /// `cloudcore config show`: the effective configuration, the API token left out.
    pub fn to_toml_redacted(&self) -> Result<String, String> {
        config_doc::to_toml_redacted(self, SECRETS)
    }

    /// Whether this cloudcore is one replica of several on etcd.
    pub fn is_ha(&self) -> bool {
        self.store.backend == "etcd"
    }

    /// The keys an etcd replica needs on top of the single-process ones.
    fn validate_ha(&self) -> Result<(), ConfigError> {
        let etcd = &self.store.etcd;
        if etcd.endpoints.is_empty() {
            return Err(ConfigError::key(
                "store.etcd.endpoints",
                "needs at least one etcd client URL",
            ));
        }
        let tls = etcd.ca_cert.is_some() || etcd.cert.is_some();
        for e in &etcd.endpoints {
            if !is_url(e, &["http", "https"]) {
                return Err(ConfigError::key(
                    "store.etcd.endpoints",
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
            if tls && e.starts_with("http://") {
                return Err(ConfigError::key(
                    "store.etcd.endpoints",
                    format!("{e:?} is plain http but store.etcd TLS keys are set: use https://"),
                ));
            }
        }
        if etcd.cert.is_some() != etcd.key.is_some() {
            let missing = if etcd.cert.is_some() { "key" } else { "cert" };
            return Err(ConfigError::key(
                format!("store.etcd.{missing}"),
                "store.etcd.cert and store.etcd.key go together",
            ));
        }
        if etcd.prefix.is_empty() || etcd.prefix.contains(char::is_whitespace) {
            return Err(ConfigError::key(
                "store.etcd.prefix",
                "must be non-empty, without spaces",
            ));
        }
        if etcd.request_timeout.is_zero() || etcd.startup_timeout.is_zero() {
            let key = if etcd.request_timeout.is_zero() {
                "store.etcd.request_timeout"
            } else {
                "store.etcd.startup_timeout"
            };
            return Err(ConfigError::key(key, "must be longer than zero"));
        }
        if etcd.max_txn_ops < 8 {
            return Err(ConfigError::key(
                "store.etcd.max_txn_ops",
                "must be at least 8",
            ));
        }
        if etcd.max_txn_bytes < 64 << 10 {
            return Err(ConfigError::key(
                "store.etcd.max_txn_bytes",
                "must be at least 65536",
            ));
        }
        let cluster = &self.cluster;
        match &cluster.advertise_url {
            None => {
                return Err(ConfigError::key(
                    "cluster.advertise_url",
                    "is required with store.backend = \"etcd\": where the other replicas reach this one",
                ))
            }
            Some(u) if !is_url(u, &["ws", "wss"]) => {
                return Err(ConfigError::key(
                    "cluster.advertise_url",
                    format!("{u:?} is not a ws:// or wss:// URL"),
                ))
            }
            Some(_) => {}
        }
        if cluster.peer_key_file.is_none() {
            return Err(ConfigError::key(
                "cluster.peer_key_file",
                "is required with store.backend = \"etcd\": the replicas' shared secret",
            ));
        }
        if cluster.tls_cert.is_some() != cluster.tls_key.is_some() {
            let missing = if cluster.tls_cert.is_some() {
                "tls_key"
            } else {
                "tls_cert"
            };
            return Err(ConfigError::key(
                format!("cluster.{missing}"),
                "cluster.tls_cert and cluster.tls_key go together",
            ));
        }
        if cluster.replica_name().is_empty() || cluster.replica_name().contains('/') {
            return Err(ConfigError::key(
                "cluster.name",
                "must be non-empty and without '/'",
            ));
        }
        if cluster.lease_ttl < Duration::from_secs(2) {
            return Err(ConfigError::key(
                "cluster.lease_ttl",
                "must be at least 2s (etcd's shortest lease)",
            ));
        }
        if cluster.heartbeat.is_zero() || cluster.heartbeat * 2 > cluster.lease_ttl {
            return Err(ConfigError::key(
                "cluster.heartbeat",
                "must be more than 0s and at most half of cluster.lease_ttl",
            ));
        }
        if self.api.token.is_none() {
            return Err(ConfigError::key(
                "api.token",
                "is required with store.backend = \"etcd\": every replica must accept the same token",
            ));
        }
        Ok(())
    }

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
        match self.store.backend.as_str() {
            "sqlite" => {}
            "etcd" if cfg!(feature = "etcd") => self.validate_ha()?,
            "etcd" => {
                return Err(ConfigError::key(
                    "store.backend",
                    "etcd needs a cloudcore built with `cargo build --features etcd`",
                ))
            }
            other => {
                return Err(ConfigError::key(
                    "store.backend",
                    format!("unsupported backend {other:?}: sqlite or etcd"),
                ))
            }
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
        for (key, value) in [
            ("hub.max_handshakes", self.hub.max_handshakes),
            (
                "hub.max_handshakes_per_peer",
                self.hub.max_handshakes_per_peer,
            ),
            ("api.max_connections", self.api.max_connections),
            (
                "api.max_connections_per_peer",
                self.api.max_connections_per_peer,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "must be at least 1"));
            }
        }
        for (key, value) in [
            ("api.idle_timeout", self.api.idle_timeout),
            ("api.request_timeout", self.api.request_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::key(key, "must be longer than zero"));
            }
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
        if self.router.request_timeout.is_zero() {
            return Err(ConfigError::key(
                "router.request_timeout",
                "must be longer than zero",
            ));
        }
        if let Some(ip) = self.router.advertise_ip {
            if !advertisable(ip) {
                return Err(ConfigError::key(
                    "router.advertise_ip",
                    format!("{ip} cannot be an endpoint address: not loopback, unspecified, multicast or link-local"),
                ));
            }
            if self.service_cidr.contains(&ip) {
                return Err(ConfigError::key(
                    "router.advertise_ip",
                    format!("{ip} is inside service_cidr {}", self.service_cidr),
                ));
            }
        }
        if let Err((key, why)) = self.tunnel.validate() {
            return Err(ConfigError::key(&key, why));
        }
        if let Err((key, why)) = self.identity.validate() {
            return Err(ConfigError::key(&key, why));
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
        assert_eq!(c.router.request_timeout, Duration::from_secs(30));
        assert_eq!(c.router.virtual_endpoint_ip().to_string(), "192.0.2.1");
        assert_eq!(c.direct.listen.to_string(), "0.0.0.0:10004");
        assert!(!c.communities.enforce);
        assert_eq!(c.identity.cert_validity, Duration::from_secs(30 * 86400));
        let c = parse("[router]\nlisten = \"127.0.0.1:9443\"").expect("loopback listen");
        assert_eq!(c.router.virtual_endpoint_ip().to_string(), "192.0.2.1");
        let c = parse("[router]\nlisten = \"172.20.0.2:9443\"").expect("specific listen");
        assert_eq!(c.router.virtual_endpoint_ip().to_string(), "172.20.0.2");
        let c = parse("[router]\nlisten = \"172.20.0.2:9443\"\nadvertise_ip = \"172.20.0.9\"")
            .expect("advertise_ip");
        assert_eq!(c.router.virtual_endpoint_ip().to_string(), "172.20.0.9");
        let c =
            parse("[hub]\nkeepalive_interval = \"2s\"\nnode_timeout = \"5s\"").expect("durations");
        assert_eq!(c.hub.node_timeout, Duration::from_secs(5));
        for (text, key) in [
            ("[hub]\nlisten = \"nope\"", "hub.listen"),
            ("[hub]\ntls_cert = \"/x\"", "hub.tls_key"),
            ("service_cidr = \"10.0.0.0/99\"", "service_cidr"),
            ("[store]\nbackend = \"mysql\"", "store.backend"),
            ("[api]\ntokn = \"x\"", "api.tokn"),
            ("[hub]\nnode_timeout = \"soon\"", "hub.node_timeout"),
            (
                "[router]\nrequest_timeout = \"0s\"",
                "router.request_timeout",
            ),
            (
                "[router]\nrequest_timeout = \"x\"",
                "router.request_timeout",
            ),
            (
                "[router]\nadvertise_ip = \"127.0.0.1\"",
                "router.advertise_ip",
            ),
            (
                "[router]\nadvertise_ip = \"10.96.0.1\"",
                "router.advertise_ip",
            ),
            ("[router]\nadvertise_ip = \"nope\"", "router.advertise_ip"),
            ("[direct]\nlisten = \"udp\"", "direct.listen"),
            ("[communities]\nenforce = \"yes\"", "communities.enforce"),
            (
                "[identity]\ncert_validity = \"10m\"",
                "identity.cert_validity",
            ),
            (
                "[identity]\ncert_validity = \"soon\"",
                "identity.cert_validity",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        }
    }

    #[test]
    fn etcd_keys_are_checked_and_errors_name_them() {
        let ha = "[store]\nbackend = \"etcd\"\n[api]\ntoken = \"0123456789abcdef\"\n[cluster]\nadvertise_url = \"ws://10.0.0.1:10003\"\npeer_key_file = \"/etc/cloudcore/peer.key\"\n";
        if !cfg!(feature = "etcd") {
            let e = parse(ha).unwrap_err().to_string();
            assert!(
                e.contains("`store.backend`") && e.contains("--features etcd"),
                "{e}"
            );
            return;
        }
        let c = parse(ha).expect("a minimal replica");
        assert!(c.is_ha());
        assert_eq!(c.cluster.replica_name(), "10.0.0.1:10003");
        for (extra, key) in [
            ("[store.etcd]\nendpoints = []", "store.etcd.endpoints"),
            (
                "[store.etcd]\nendpoints = [\"10.0.0.1:2379\"]",
                "store.etcd.endpoints",
            ),
            (
                "[store.etcd]\nca_cert = \"/ca.pem\"",
                "store.etcd.endpoints",
            ),
            (
                "[store.etcd]\ncert = \"/c.pem\"\nendpoints = [\"https://e:2379\"]",
                "store.etcd.key",
            ),
            ("[store.etcd]\nprefix = \"\"", "store.etcd.prefix"),
            ("[store.etcd]\nmax_txn_ops = 2", "store.etcd.max_txn_ops"),
            (
                "[store.etcd]\nrequest_timeout = \"0s\"",
                "store.etcd.request_timeout",
            ),
            ("[store.etcd]\nendpoint = []", "store.etcd.endpoint"),
        ] {
            let e = parse(&format!("{ha}{extra}")).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{extra}: {e}");
        }
        for (text, key) in [
            (
                ha.replace("advertise_url = \"ws://10.0.0.1:10003\"\n", ""),
                "cluster.advertise_url",
            ),
            (
                ha.replace("ws://10.0.0.1", "http://10.0.0.1"),
                "cluster.advertise_url",
            ),
            (
                ha.replace("peer_key_file", "name = \"r1\"\n#"),
                "cluster.peer_key_file",
            ),
            (ha.replace("token = \"0123456789abcdef\"", ""), "api.token"),
            (format!("{ha}lease_ttl = \"1s\"\n"), "cluster.lease_ttl"),
            (format!("{ha}heartbeat = \"4s\"\n"), "cluster.heartbeat"),
            (format!("{ha}tls_cert = \"/c.pem\"\n"), "cluster.tls_key"),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        }
    }

    #[test]
    fn the_reference_in_docs_operations_md_matches_the_code() {
        let rows = reference();
        assert!(
            rows.len() > 25,
            "the cloudcore table was not found: {rows:?}"
        );
        let problems = config_doc::check::<Config>(&rows);
        assert!(
            problems.is_empty(),
            "docs/operations.md (cloudcore table) and the code disagree:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn config_defaults_prints_a_file_that_loads_as_the_defaults() {
        let text = defaults_toml().expect("render");
        let c = parse(&text).expect("loads and validates");
        assert_eq!(
            config_doc::to_table(&c).expect("table"),
            config_doc::to_table(&Config::default()).expect("table")
        );
        assert!(text.contains("\n[hub]\n"), "{text}");
        assert!(text.contains("\n# tls_cert = ... (unset"), "{text}");
    }

    #[test]
    fn the_example_config_loads_and_validates() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/config/cloudcore.toml"
        );
        let text = std::fs::read_to_string(path).expect("examples/config/cloudcore.toml");
        let c = parse(&text).expect("examples/config/cloudcore.toml is valid");
        assert_eq!(c.hub.listen.port(), 10000);
    }

    #[test]
    fn config_show_leaves_the_api_token_out() {
        let c = parse("[api]\ntoken = \"0123456789abcdef-secret\"").expect("valid");
        let text = c.to_toml_redacted().expect("toml");
        assert!(!text.contains("0123456789abcdef-secret"), "{text}");
        assert!(text.contains("token = \"<redacted>\""), "{text}");
    }
}
