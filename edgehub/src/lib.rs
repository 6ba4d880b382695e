//! edgehub: what the cloud and the edge share.
//!
//! - [`model`]: the Service, Endpoints and Node objects and their validation;
//! - [`message`]: the beehive-style Message and the sync payloads on the hub websocket;
//! - [`metamanager`]: the node's SQLite copy of the metadata and its in-memory view;
//! - [`client`]: the edge side of the hub (connect, authenticate, resume, keepalive, reconnect);
//! - [`systemd`]: readiness, status and watchdog pings for `Type=notify` units;
//! - [`telemetry`]: the Prometheus recorder and metric naming;
//! - [`accept`]: connection caps in total and per peer, and the bounded HTTP server of the
//!   APIs;
//! - [`untrusted`]: outside text bounded before an error or a log line quotes it;
//! - [`tls`], [`backoff`], [`http_client`], [`config_file`], [`config_doc`], [`logging`],
//!   [`process`]: small pieces both binaries need.

pub mod accept;
pub mod backoff;
pub mod client;
pub mod config_doc;
pub mod config_file;
pub mod http_client;
pub mod limits;
pub mod logging;
pub mod message;
pub mod metamanager;
pub mod model;
pub mod process;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod untrusted;
