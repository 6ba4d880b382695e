//! cloudcore: the cloud side of edgemesh.
//!
//! - [`store`]: desired state with resource versions and a bounded change log (SQLite);
//! - [`objects`]: the validated write path (cluster IP allocation, atomic apply);
//! - [`api`]: the REST API; [`serve`]: HTTP(S) serving;
//! - [`hub`]: the websocket server that keeps every edge node in sync;
//! - [`auth`]: API and node tokens; [`nodes`]: which nodes are online;
//! - [`router`]: rules between cloud REST services and edge Services, with QPS limits;
//! - [`cli`]: `cloudcore apply|get|delete|token`;
//! - [`telemetry`]: the metrics `/metrics` shows.

pub mod api;
pub mod app;
pub mod auth;
pub mod ca;
pub mod cli;
pub mod config;
pub mod direct;
pub mod hub;
pub mod nodes;
pub mod objects;
pub mod router;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod tunnel;
