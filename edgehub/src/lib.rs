//! edgehub: what the cloud and the edge share.
//!
//! - [`model`]: the Service, Endpoints and Node objects and their validation;
//! - [`message`]: the beehive-style Message and the sync payloads on the hub websocket;
//! - [`metamanager`]: the node's SQLite copy of the metadata and its in-memory view;
//! - [`session`]: the edge side of the sync protocol without sockets or store (resume point,
//!   snapshot/delta/live, redeliveries, gaps, the history chain, acks, keepalive timers);
//! - [`client`]: the hub client: drives a [`session`] over the websocket into the metamanager,
//!   and reconnects;
//! - [`balance`]: endpoint choice (policies, affinity, topology tiers, outlier ejection);
//! - [`identity`]: a node's key and certificate, and the check of peers' certificates;
//! - [`direct`]: the node's side of direct paths over the hub (certificate upkeep, reflexive
//!   address, candidates, Communities);
//! - [`io`]: the byte-moving core of every data path (detection, replay, the copier);
//! - [`topology`]: topology tiers, shared by the proxy and cluster DNS;
//! - [`systemd`]: readiness, status and watchdog pings for `Type=notify` units;
//! - [`telemetry`]: the Prometheus recorder and metric naming;
//! - [`accept`]: connection caps in total and per peer, and the bounded HTTP server of the
//!   APIs;
//! - [`untrusted`]: outside text bounded before an error or a log line quotes it;
//! - [`tls`], [`backoff`], [`http_client`], [`config_file`], [`config_doc`], [`logging`],
//!   [`process`]: small pieces both binaries need.

pub mod accept;
pub mod backoff;
pub mod balance;
pub mod client;
pub mod config_doc;
pub mod config_file;
pub mod connect;
pub mod direct;
pub mod http;
pub mod http_client;
pub mod identity;
pub mod io;
pub mod limits;
pub mod logging;
pub mod message;
pub mod metamanager;
pub mod model;
pub mod process;
pub mod routes;
pub mod serve;
pub mod session;
pub mod socket;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod tunnel;
pub mod untrusted;
pub mod view;
