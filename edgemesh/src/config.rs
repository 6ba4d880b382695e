//! edgemesh configuration (`/etc/edgemesh/edgemesh.toml`); every key has a default except the
//! node's name and the cloud it talks to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use edgehub::client::{CloudUrl, HubClientConfig};
use edgehub::config_doc::{self, KeyDoc};
use edgehub::config_file::{ConfigError, OneOrMany};
use edgehub::logging::LogConfig;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::dns::DnsConfig;
use crate::proxy::ProxyConfig;

pub const DEFAULT_CONFIG: &str = "/etc/edgemesh/edgemesh.toml";

/// The operations guide, whose `edgemesh` table says what every key means.
const REFERENCE: &str = include_str!("../../docs/operations.md");

/// What `edgemesh config check` and the agent say about a configuration without `cloud.url`.
pub const NO_CLOUD: &str =
    "cloud.url is not set: the agent serves what its store holds and never syncs with a cloud";

/// Keys whose values `edgemesh config show` does not print.
const SECRETS: &[&str] = &["cloud.token"];

/// Every key of edgemesh.toml with its documented default and meaning.
pub fn reference() -> Vec<KeyDoc> {
    config_doc::reference(REFERENCE, "edgemesh")
}

/// `edgemesh config defaults`: every key at its default, with its meaning.
pub fn defaults_toml() -> Result<String, String> {
    config_doc::render::<Config>(
        "edgemesh.toml with every key at its default (`edgemesh config defaults`).\n\
         Keys shown as `# key = ... (unset)` have no default value. node_name must be set.\n\
         To join a cloud, set cloud.url and cloud.token_file (or cloud.token); without\n\
         cloud.url the agent serves what its store holds and never syncs. Everything else\n\
         may be left out. See docs/operations.md.",
        &reference(),
    )
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name; it must match the name its token was issued for.
    pub node_name: String,
    /// The node's SQLite copy of the metadata lives here.
    pub data_dir: PathBuf,
    pub service_cidr: IpNet,
    pub cluster_domain: String,
    /// Published as the Node's labels, for topology-aware routing.
    pub labels: BTreeMap<String, String>,
    pub cloud: CloudConfig,
    pub proxy: ProxyConfig,
    pub dns: DnsConfig,
    pub tunnel: crate::tunnel::TunnelConfig,
    pub direct: DirectSection,
    pub admin: AdminConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: String::new(),
            data_dir: PathBuf::from("/var/lib/edgemesh"),
            service_cidr: "10.96.0.0/12".parse().unwrap_or_else(|_| unreachable!()),
            cluster_domain: "cluster.local".into(),
            labels: BTreeMap::new(),
            cloud: CloudConfig::default(),
            proxy: ProxyConfig::default(),
            dns: DnsConfig::default(),
            tunnel: crate::tunnel::TunnelConfig::default(),
            direct: DirectSection::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// One or more `ws://host:port` / `wss://host:port`, tried in turn.
    pub url: Option<OneOrMany>,
    /// The node's token (`cloudcore token create NODE`).
    pub token: Option<String>,
    /// A file holding the token, instead of `cloud.token`.
    pub token_file: Option<PathBuf>,
    /// CA certificate that signs the cloud's certificate (required for wss://).
    pub ca_cert: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            url: None,
            token: None,
            token_file: None,
            ca_cert: None,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// `[direct]`: direct node-to-node paths.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectSection {
    pub enabled: bool,
    /// UDP address of the node's direct-path port.
    pub listen: SocketAddr,
    /// Extra candidates peers may reach this node at (a port forward, a public address).
    pub advertise: Vec<SocketAddr>,
}

impl Default for DirectSection {
    fn default() -> Self {
        DirectSection {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 10004)),
            advertise: Vec::new(),
        }
    }
}

impl DirectSection {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, a) in self.advertise.iter().enumerate() {
            if a.port() == 0 || !edgehub::direct::candidates::reachable(a.ip()) {
                return Err(ConfigError::key(
                    format!("direct.advertise[{i}]"),
                    format!("{a} cannot be reached by a peer: give an address and a port, not loopback, unspecified, multicast or link-local"),
                ));
            }
        }
        if self.advertise.len() > edgehub::message::MAX_CANDIDATES / 2 {
            return Err(ConfigError::key(
                "direct.advertise",
                format!("at most {} addresses", edgehub::message::MAX_CANDIDATES / 2),
            ));
        }
        Ok(())
    }

    pub fn agent_config(&self) -> edgehub::direct::DirectConfig {
        edgehub::direct::DirectConfig {
            enabled: self.enabled,
            listen: self.listen,
            advertise: self.advertise.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Open connections to the admin API.
    pub max_connections: usize,
    /// A connection without a complete request head for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time to answer one request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 10550)),
            max_connections: 64,
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl AdminConfig {
    /// The bounds of the admin listener. Its clients share one address (loopback), so the
    /// cap per peer is the whole cap.
    pub fn limits(&self) -> edgehub::accept::HttpLimits {
        edgehub::accept::HttpLimits {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            tls_handshake_timeout: self.idle_timeout,
        }
    }
}

fn token_required() -> ConfigError {
    ConfigError::key(
        "cloud.token_file",
        "is required when cloud.url is set: a file holding the node's token (`cloudcore token \
         create NODE` prints it; keep it mode 0600), or the token itself in cloud.token",
    )
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl Config {
    /// Checks what types alone cannot; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            return Err(ConfigError::key("node_name", "is required"));
        }
        if !is_dns_subdomain(&self.node_name) {
            return Err(ConfigError::key(
                "node_name",
                format!(
                    "{:?} is not a valid node name (lower-case DNS name)",
                    self.node_name
                ),
            ));
        }
        // The cloud refuses a node whose labels it could not store; say so at startup.
        edgehub::model::validate_labels("labels", &self.labels)
            .map_err(|e| ConfigError::key(e.field, e.message))?;
        if self.node_name == edgehub::model::CLOUD_NODE {
            return Err(ConfigError::key(
                "node_name",
                "\"cloud\" is reserved for endpoints reached through cloudcore",
            ));
        }
        if !is_dns_subdomain(&self.cluster_domain) {
            return Err(ConfigError::key(
                "cluster_domain",
                format!("{:?} is not a DNS name", self.cluster_domain),
            ));
        }
        for url in self.cloud_urls() {
            CloudUrl::parse(&url).map_err(|e| ConfigError::key("cloud.url", e.to_string()))?;
        }
        if self.cloud.token.is_some() && self.cloud.token_file.is_some() {
            return Err(ConfigError::key(
                "cloud.token_file",
                "set cloud.token or cloud.token_file, not both",
            ));
        }
        if self.admin.max_connections == 0 {
            return Err(ConfigError::key(
                "admin.max_connections",
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("admin.idle_timeout", self.admin.idle_timeout),
            ("admin.request_timeout", self.admin.request_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::key(key, "must be longer than zero"));
            }
        }
        if !self.cloud_urls().is_empty()
            && self.cloud.token.is_none()
            && self.cloud.token_file.is_none()
        {
            return Err(token_required());
        }
        if self.cloud.keepalive_timeout <= self.cloud.keepalive_interval {
            return Err(ConfigError::key(
                "cloud.keepalive_timeout",
                "must be longer than cloud.keepalive_interval",
            ));
        }
        if self.service_cidr != self.service_cidr.trunc() {
            return Err(ConfigError::key(
                "service_cidr",
                format!(
                    "{} has host bits set; did you mean {}?",
                    self.service_cidr,
                    self.service_cidr.trunc()
                ),
            ));
        }
        self.proxy.validate(&self.service_cidr)?;
        self.dns.validate()?;
        self.tunnel.validate()?;
        self.direct.validate()?;
        Ok(())
    }

    /// `edgemesh config show`: the effective configuration, the token left out.
    pub fn to_toml_redacted(&self) -> Result<String, String> {
        config_doc::to_toml_redacted(self, SECRETS)
    }

    pub fn cloud_urls(&self) -> Vec<String> {
        self.cloud
            .url
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
    }

    /// The hub client's settings, reading the token file if one is configured.
    pub fn hub_client(&self) -> Result<HubClientConfig, ConfigError> {
        let token = match (&self.cloud.token, &self.cloud.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    ConfigError::key("cloud.token_file", format!("{}: {e}", path.display()))
                })?,
            (None, None) if self.cloud_urls().is_empty() => String::new(),
            // A node that joined logs in to a TLS hub with its certificate.
            (None, None) if edgehub::identity::has_certificate(&self.data_dir) => String::new(),
            (None, None) => return Err(token_required()),
        };
        let mut hub = HubClientConfig::new(&self.node_name, self.cloud_urls(), &token);
        hub.ca_cert = self.cloud.ca_cert.clone();
        hub.labels = self.labels.clone();
        hub.keepalive_interval = self.cloud.keepalive_interval;
        hub.keepalive_timeout = self.cloud.keepalive_timeout;
        hub.connect_timeout = self.cloud.connect_timeout;
        hub.backoff_max = self.cloud.backoff_max;
        Ok(hub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehub::config_file;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = config_file::from_table(text.parse().expect("toml"))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn a_minimal_config_and_errors_that_name_keys() {
        let c = parse("node_name = \"edge-1\"\n[cloud]\nurl = \"ws://10.0.0.1:10000\"\ntoken = \"t\"\nlabels = {}").unwrap_err();
        assert!(c.to_string().contains("`cloud.labels`"), "{c}");
        let c = parse("node_name = \"edge-1\"\nlabels = { zone = \"a\" }\n[cloud]\nurl = [\"ws://a\", \"wss://b:443\"]\ntoken = \"t\"").expect("valid");
        assert_eq!(c.cloud_urls().len(), 2);
        assert_eq!(c.hub_client().expect("hub").labels["zone"], "a");
        assert!(c.direct.enabled);
        assert_eq!(c.direct.listen.to_string(), "0.0.0.0:10004");
        let c = parse("node_name = \"e\"\n[direct]\nadvertise = [\"203.0.113.1:10004\"]")
            .expect("advertise");
        assert_eq!(c.direct.agent_config().advertise.len(), 1);
        for (text, key) in [
            ("", "node_name"),
            ("node_name = \"Edge_1\"", "node_name"),
            ("node_name = \"e\"\n[cloud]\nurl = \"http//x\"", "cloud.url"),
            (
                "node_name = \"e\"\n[admin]\nlisten = \"localhost\"",
                "admin.listen",
            ),
            (
                "node_name = \"e\"\n[cloud]\nkeepalive_timeout = \"1s\"",
                "cloud.keepalive_timeout",
            ),
            ("node_name = \"e\"\nservice_cidr = \"x\"", "service_cidr"),
            (
                "node_name = \"e\"\nservice_cidr = \"10.96.0.10/12\"",
                "service_cidr",
            ),
            (
                "node_name = \"e\"\nlabels = { \"bad key\" = \"a\" }",
                "labels[\"bad key\"]",
            ),
            ("node_name = \"cloud\"", "node_name"),
            (
                "node_name = \"e\"\n[direct]\nlisten = \"10004\"",
                "direct.listen",
            ),
            (
                "node_name = \"e\"\n[direct]\nadvertise = [\"127.0.0.1:1\"]",
                "direct.advertise[0]",
            ),
            (
                "node_name = \"e\"\n[direct]\nadvertise = [\"203.0.113.1:0\"]",
                "direct.advertise[0]",
            ),
            (
                "node_name = \"e\"\n[direct]\nadvertise = \"203.0.113.1:1\"",
                "direct.advertise",
            ),
            ("node_name = \"e\"\n[direct]\nenabled = 1", "direct.enabled"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        }
        let e = parse("node_name = \"e\"\n[cloud]\nurl = \"ws://x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`cloud.token_file`"), "{e}");
        assert!(e.contains("the token itself in cloud.token"), "{e}");
        // No cloud at all is a valid configuration: the node serves its store.
        parse("node_name = \"e\"").expect("local store only");
    }

    #[test]
    fn the_reference_in_docs_operations_md_matches_the_code() {
        let rows = reference();
        assert!(
            rows.len() > 40,
            "the edgemesh table was not found: {rows:?}"
        );
        let problems = config_doc::check::<Config>(&rows);
        assert!(
            problems.is_empty(),
            "docs/operations.md (edgemesh table) and the code disagree:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn config_defaults_prints_a_file_that_loads_as_the_defaults() {
        let text = defaults_toml().expect("render");
        let c: Config = config_file::from_table(text.parse().expect("toml")).expect("loads");
        assert_eq!(
            config_doc::to_table(&c).expect("table"),
            config_doc::to_table(&Config::default()).expect("table")
        );
        assert!(text.contains("\n[proxy.http]\n"), "{text}");
        assert!(text.contains("\n# token = ... (unset)\n"), "{text}");
    }

    #[test]
    fn the_example_config_loads_and_validates() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/config/edgemesh.toml"
        );
        let c: Config = config_file::load(
            Some(std::path::Path::new(path)),
            std::path::Path::new(""),
            &[],
        )
        .expect("examples/config/edgemesh.toml loads");
        c.validate()
            .expect("examples/config/edgemesh.toml is valid");
        assert_eq!(
            c.cloud.token_file.as_deref(),
            Some(std::path::Path::new("/etc/edgemesh/token"))
        );
    }

    #[test]
    fn config_show_leaves_the_token_out() {
        let c = parse("node_name = \"e\"\n[cloud]\nurl = \"ws://x\"\ntoken = \"s3cret-token\"")
            .expect("valid");
        let text = c.to_toml_redacted().expect("toml");
        assert!(!text.contains("s3cret-token"), "{text}");
        assert!(text.contains("token = \"<redacted>\""), "{text}");
        assert!(text.contains("url = \"ws://x\""), "{text}");
    }
}
