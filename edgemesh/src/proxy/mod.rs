//! The transparent proxy (SPEC §4).

mod config;

pub use config::{OutlierConfig, ProxyConfig};
