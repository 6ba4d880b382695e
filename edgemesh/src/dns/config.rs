//! `[dns]` keys.

use std::net::SocketAddr;

use edgehub::config_file::ConfigError;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Serve cluster DNS at all.
    pub enabled: bool,
    /// UDP and TCP address of the server.
    pub listen: SocketAddr,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: false,
            listen: SocketAddr::from(([169, 254, 96, 16], 53)),
        }
    }
}

impl DnsConfig {
    /// Checks what types alone cannot; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
