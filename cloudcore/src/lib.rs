//! cloudcore: the cloud side of edgemesh.
//!
//! - [`store`]: desired state with resource versions and a bounded change log (SQLite);
//! - [`objects`]: the validated write path (cluster IP allocation, atomic apply);
//! - [`api`]: the REST API (served by `edgehub::accept::serve_http`);
//! - [`mirror`]: the store as of its last commit, in memory (what streams and routes read);
//! - [`hub`]: the websocket server that keeps every edge node in sync;
//! - [`auth`]: API and node tokens; [`nodes`]: which nodes are online;
//! - `cluster` (feature `etcd`): leases, presence and links between replicas on etcd;
//! - [`router`]: rules between cloud REST services and edge Services, with QPS limits;
//! - [`manifest`]: reading manifests (YAML or JSON, one or many objects), for `apply` in the
//!   CLI and the REST API alike;
//! - [`cli`]: `cloudcore apply|get|delete|token`;
//! - [`telemetry`]: the metrics `/metrics` shows.

pub mod api;
pub mod app;
pub mod auth;
pub mod ca;
pub mod cli;
#[cfg(feature = "etcd")]
pub mod cluster;
pub mod config;
pub mod direct;
pub mod hub;
pub mod manifest;
pub mod mirror;
pub mod nodes;
pub mod objects;
pub mod router;
pub mod store;
pub mod telemetry;
pub mod tunnel;
