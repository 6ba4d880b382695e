//! edgemesh: the node agent.
//!
//! - [`config`]: the node's configuration;
//! - [`agent`]: startup and shutdown (metadata store, hub client, admin API);
//! - [`admin`]: health, readiness, metrics and debug views;
//! - [`status`]: `edgemesh status`.

pub mod admin;
pub mod agent;
pub mod config;
pub mod status;
