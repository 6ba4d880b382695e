//! What the direct-path tests read and write: a node's `/debug/direct`, the path it takes to a
//! peer, Communities, and the streams the cloud relayed.

use serde_json::Value;

use crate::harness::Host;
use crate::mesh::Mesh;

/// `/debug/direct` of node `i`.
pub fn status(mesh: &Mesh, i: usize) -> Value {
    let (s, v) = mesh.admin(i, "/debug/direct");
    assert_eq!(s, 200, "/debug/direct of node {i}: {v}");
    v
}

/// The path node `i` takes to `peer` (`path`: `direct` or `relay`, `candidate`, `rttMs`, …),
/// `Null` when the node has nothing on that peer.
pub fn path_to(mesh: &Mesh, i: usize, peer: &str) -> Value {
    status(mesh, i)["paths"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["peer"] == peer).cloned())
        .unwrap_or(Value::Null)
}

/// Creates or replaces Community `name` with `members`.
pub fn put_community(mesh: &Mesh, name: &str, members: &[&str]) {
    let body = serde_json::json!({
        "apiVersion": "edgemesh.io/v1alpha1",
        "kind": "Community",
        "metadata": {"name": name},
        "spec": {"members": members},
    })
    .to_string();
    let (s, v) = mesh.api("PUT", &format!("/api/v1/communities/{name}"), Some(&body));
    assert!(s == 201 || s == 200, "{v}");
}

/// Node-to-node streams the cloud relayed so far.
pub fn relayed(mesh: &Mesh) -> f64 {
    mesh.cloud_metric("cloudcore_tunnel_streams_total", &["kind=\"relay\""])
}

/// Runs `iptables -w ARGS` in `host` and asserts it worked.
pub fn iptables(mesh: &Mesh, host: &Host, args: &[&str]) {
    let mut argv = vec!["iptables", "-w"];
    argv.extend_from_slice(args);
    let out = mesh.topo.exec(host, &argv);
    assert!(
        out.status.success(),
        "{argv:?} in {}: {}",
        host.role,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A router on the "internet" switch with a node namespace behind it: MASQUERADE out (with
/// `--random-fully` when `random`), only replies in, no new UDP to the router itself.
pub fn nat_router(mesh: &mut Mesh, role: &str, node_role: &str, random: bool) -> (Host, Host) {
    let router = mesh.topo.add_host(role);
    let node = mesh.topo.add_pod(&router, node_role);
    let lan = format!("{}/24", node.ip);
    let mut masquerade = vec![
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        &lan,
        "-o",
        "eth0",
        "-j",
        "MASQUERADE",
    ];
    if random {
        masquerade.push("--random-fully");
    }
    iptables(mesh, &router, &masquerade);
    iptables(
        mesh,
        &router,
        &[
            "-A",
            "FORWARD",
            "-i",
            "eth0",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ],
    );
    iptables(
        mesh,
        &router,
        &["-A", "FORWARD", "-i", "eth0", "-j", "DROP"],
    );
    iptables(
        mesh,
        &router,
        &[
            "-A",
            "INPUT",
            "-i",
            "eth0",
            "-p",
            "udp",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ],
    );
    (router, node)
}
