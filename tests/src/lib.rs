//! End-to-end test support for edgemesh.
//!
//! The integration tests under `tests/tests/` run as root on Linux and build
//! small throw-away networks out of network namespaces: one "switch" namespace
//! holding a Linux bridge, and one namespace per simulated host, each wired to
//! the bridge with a veth pair and addressed in `10.250.0.0/24`. The real
//! `cloudcore` / `edgemesh` binaries are started inside those hosts.
//!
//! Everything lives in [`harness`] and is re-exported here, so tests just
//! `use edgemesh_e2e::*;`. A typical test:
//!
//! ```no_run
//! use edgemesh_e2e::*;
//! use std::time::Duration;
//!
//! require_root();
//! let mut topo = Topology::new("demo");
//! let server = topo.add_host("srv");
//! let client = topo.add_host("cli");
//! let args = vec!["--listen".to_string(), format!("{}:8080", server.ip)];
//! let p = topo.spawn(&server, "cloudcore", &bin("cloudcore"), &args, &[]);
//! let (status, body) = wait_for("cloudcore healthz", Duration::from_secs(10), || {
//!     let (s, b) = topo.curl(&client, &[&format!("http://{}:8080/healthz", server.ip)]);
//!     (s == 200).then_some((s, b))
//! });
//! assert_eq!(status, 200, "{body}");
//! topo.stop(p);
//! // Dropping `topo` kills what is left and deletes every namespace.
//! ```

pub mod harness;

pub use harness::*;

pub mod direct;
pub mod dns;
pub mod ha;
pub mod mesh;
pub mod prometheus;
pub mod servers;
pub mod udp;
