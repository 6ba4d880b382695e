//! Network-namespace test harness (see the crate docs for an example).
//!
//! - [`Topology`]: a bridge plus hosts in network namespaces, processes
//!   spawned inside them, full cleanup on `Drop` (also on panic).
//! - [`bin`], [`wait_for`], [`require_root`]: small helpers every test needs.
//!
//! Requirements: Linux, root, iproute2 (`ip`); `curl` for
//! [`Topology::curl`]. Only veth and bridge links are used.

mod cmd;
mod netns;
mod topology;
mod util;

pub use topology::{Host, ProcId, Topology, EXEC_TIMEOUT, KEEP_DIRS_ENV};
pub use util::{bin, require_root, wait_for, BIN_DIR_ENV};
