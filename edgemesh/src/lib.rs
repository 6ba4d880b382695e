//! edgemesh: the node agent.
//!
//! - [`config`]: the node's configuration;
//! - [`agent`]: startup and shutdown (metadata store, hub client, proxy, DNS, admin API);
//! - [`iptables`]: the nat rules that send the service CIDR to the proxy;
//! - [`proxy`]: the transparent listener and forwarding;
//! - [`dns`]: cluster DNS;
//! - [`direct`]: the node's identity and direct-path state (`/debug/direct`);
//! - [`admin`]: health, readiness, metrics and debug views;
//! - [`status`]: `edgemesh status`;
//! - [`telemetry`]: the metrics `/metrics` shows.

pub mod admin;
pub mod agent;

pub mod config;
pub mod direct;
pub mod dns;
pub mod iptables;
pub mod proxy;
pub mod status;
pub mod telemetry;
pub mod tunnel;
