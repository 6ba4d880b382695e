//! Cluster DNS served on every node (SPEC §5).

mod config;

pub use config::DnsConfig;
