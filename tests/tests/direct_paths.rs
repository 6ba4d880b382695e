//! Direct node-to-node paths, phase 2, end to end on one LAN: calls between two members of a
//! Community go over a QUIC path between the nodes once it is up (the first call is served
//! at once over the relay, the cloud relays nothing more after), keep working while the cloud
//! is stopped, and a node restarted while the cloud is down forms the path again from its
//! store; non-members get no path, and with `communities.enforce` their relayed calls are
//! refused; 200 MB each way arrive intact and 200 concurrent streams finish with one stalled;
//! UDP flows take the path with their datagrams whole.

use std::time::{Duration, Instant};

use edgemesh_e2e::direct::{path_to, put_community, relayed, status as direct};
use edgemesh_e2e::harness::Host;
use edgemesh_e2e::mesh::{echo_transfer, Mesh};
use edgemesh_e2e::wait_for;
use serde_json::Value;

const TARGET: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);

/// Waits until node `i` holds `peer`'s candidates (the cloud passed them on).
fn wait_peer_known(mesh: &Mesh, i: usize, peer: &str) {
    wait_for(&format!("node {i} knows {peer}'s candidates"), WAIT, || {
        direct(mesh, i)["peers"].get(peer).map(|_| ())
    });
}

/// A mesh of `n` nodes on one LAN; nodes 0 and 1 are members of Community `lan`.
fn lan_mesh(tag: &str, n: usize, cloud_extra: Vec<String>) -> Mesh {
    let mut mesh = Mesh::new(tag, n, cloud_extra);
    mesh.start_cloud();
    mesh.create_tokens();
    for i in 0..n {
        mesh.nodes[i].extra = vec!["proxy.reconcile_interval=\"1s\"".into()];
        mesh.start_node(i);
    }
    for i in 0..n {
        mesh.wait_synced(i);
    }
    put_community(&mesh, "lan", &["edge-0", "edge-1"]);
    wait_peer_known(&mesh, 0, "edge-1");
    wait_peer_known(&mesh, 1, "edge-0");
    mesh
}

fn curl(mesh: &Mesh, client: &Host, url: &str) -> (u16, String) {
    mesh.topo.curl(client, &["--max-time", "10", url])
}

#[test]
fn two_lan_members_call_each_other_over_a_direct_path() {
    let mut mesh = lan_mesh("dp-lan", 2, Vec::new());
    let client = mesh.add_pod(0, "client");
    let server = mesh.add_pod(1, "server");
    mesh.serve(&server, "http", TARGET, "hello from b");
    let ip = mesh.put_service(
        "web",
        80,
        TARGET,
        &[],
        &[(&server.ip.to_string(), "edge-1")],
    );
    let url = format!("http://{ip}/");

    // The first call is served at once, over the relay while the path forms.
    let started = Instant::now();
    let (status, body) = curl(&mesh, &client, &url);
    assert_eq!((status, body.trim()), (200, "hello from b"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the first call waited for the path: {:?}",
        started.elapsed()
    );
    let p = wait_for("a direct path from edge-0 to edge-1", WAIT, || {
        let p = path_to(&mesh, 0, "edge-1");
        (p["path"] == "direct").then_some(p)
    });
    assert_eq!(
        p["candidate"].as_str(),
        Some(format!("{}:10004", mesh.nodes[1].host.ip).as_str()),
        "the LAN candidate: {p}"
    );
    assert!(p["rttMs"].as_f64().is_some(), "{p}");

    // From now on the cloud relays nothing for them.
    let before = relayed(&mesh);
    for _ in 0..20 {
        let (status, body) = curl(&mesh, &client, &url);
        assert_eq!((status, body.trim()), (200, "hello from b"));
    }
    assert_eq!(
        relayed(&mesh),
        before,
        "the cloud relayed bytes of a LAN pair"
    );
    // (The proxy keeps its HTTP connection to the endpoint: one stream carries the requests.)
    let accepted = mesh.metric(
        1,
        "edgemesh_tunnel_streams_accepted_total",
        &["path=\"direct\""],
    );
    assert!(accepted >= 1.0, "edge-1 accepted {accepted} direct streams");
    let p = path_to(&mesh, 0, "edge-1");
    assert!(p["txBytes"].as_u64().unwrap_or(0) > 0, "{p}");
    // `edgemesh status` says so too.
    let out = mesh.topo.exec(
        &mesh.nodes[0].host,
        &[
            edgemesh_e2e::bin("edgemesh").to_str().expect("path"),
            "status",
            "--admin-listen",
            edgemesh_e2e::mesh::ADMIN,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("edge-1"))
        .unwrap_or_else(|| panic!("no edge-1 line in edgemesh status:\n{text}"));
    assert!(line.contains("direct"), "{text}");

    // 200 MB each way over the path arrive intact.
    let echo = mesh.add_pod(1, "echo");
    mesh.serve(&echo, "echo", TARGET, "");
    let eip = mesh.put_service("echo", 7, TARGET, &[], &[(&echo.ip.to_string(), "edge-1")]);
    let addr: std::net::SocketAddr = format!("{eip}:7").parse().expect("addr");
    echo_transfer(&client.ns, addr, 200 << 20);
    assert_eq!(relayed(&mesh), before, "the transfer took the relay");
}

/// A web Service on `server` (a pod of node `node`) and the URL to call it by.
fn web_on(mesh: &mut Mesh, node: usize, role: &str, text: &str) -> String {
    let server = mesh.add_pod(node, role);
    mesh.serve(&server, "http", TARGET, text);
    let host = mesh.nodes[node].name.clone();
    let ip = mesh.put_service(role, 80, TARGET, &[], &[(&server.ip.to_string(), &host)]);
    format!("http://{ip}/")
}

fn call_ok(mesh: &Mesh, client: &Host, url: &str, want: &str) {
    let (status, body) = curl(mesh, client, url);
    assert_eq!((status, body.trim()), (200, want), "GET {url}");
}

fn wait_direct(mesh: &Mesh, i: usize, peer: &str) -> Value {
    wait_for(
        &format!("a direct path from node {i} to {peer}"),
        WAIT,
        || {
            let p = path_to(mesh, i, peer);
            (p["path"] == "direct").then_some(p)
        },
    )
}

#[test]
fn a_lan_pair_keeps_calling_without_the_cloud_and_forms_its_path_again_from_the_store() {
    let mut mesh = lan_mesh("dp-off", 2, Vec::new());
    let client = mesh.add_pod(0, "client");
    let url = web_on(&mut mesh, 1, "web", "hello from b");
    call_ok(&mesh, &client, &url, "hello from b");
    wait_direct(&mesh, 0, "edge-1");

    // The cloud goes away: the pair keeps calling over its path.
    mesh.stop_cloud(libc::SIGKILL);
    wait_for("edge-0 noticed the cloud is gone", WAIT, || {
        (mesh.sync_status(0)["status"]["connected"] == false).then_some(())
    });
    for _ in 0..10 {
        call_ok(&mesh, &client, &url, "hello from b");
    }

    // edge-0 restarts while the cloud is down: its store knows edge-1 (Node, certificate,
    // Community) and its peer book edge-1's LAN address, so the path forms again.
    mesh.stop_node(0, libc::SIGTERM);
    mesh.start_node(0);
    assert_eq!(mesh.sync_status(0)["status"]["connected"], false);
    wait_for("edge-0 serves its routes again", WAIT, || {
        let (s, _) = curl(&mesh, &client, &url);
        (s == 200).then_some(())
    });
    for _ in 0..10 {
        call_ok(&mesh, &client, &url, "hello from b");
    }
    let p = wait_direct(&mesh, 0, "edge-1");
    assert_eq!(
        p["candidate"].as_str(),
        Some(format!("{}:10004", mesh.nodes[1].host.ip).as_str()),
        "{p}"
    );
}

#[test]
fn only_members_get_a_direct_path_and_enforce_refuses_relayed_calls_between_others() {
    let mut mesh = lan_mesh("dp-comm", 3, Vec::new());
    let member = mesh.add_pod(0, "member");
    let outsider = mesh.add_pod(2, "outsider");
    let url = web_on(&mut mesh, 1, "web", "hello from b");
    call_ok(&mesh, &member, &url, "hello from b");
    wait_direct(&mesh, 0, "edge-1");

    // edge-2 shares no Community with edge-1: its calls are relayed, and stay so.
    let before = relayed(&mesh);
    for _ in 0..5 {
        call_ok(&mesh, &outsider, &url, "hello from b");
    }
    assert!(relayed(&mesh) > before, "edge-2's calls were not relayed");
    std::thread::sleep(Duration::from_secs(1));
    let paths = direct(&mesh, 2)["paths"].clone();
    assert!(
        paths
            .as_array()
            .is_some_and(|a| a.iter().all(|p| p["path"] != "direct")),
        "a non-member has a direct path: {paths}"
    );
    assert!(
        direct(&mesh, 1)["paths"]
            .as_array()
            .is_some_and(|a| a.iter().all(|p| p["peer"] != "edge-2")),
        "edge-1 has a path to a non-member"
    );

    // With communities.enforce, edge-1 refuses edge-2's relayed calls; the member's go on.
    mesh.stop_cloud(libc::SIGTERM);
    mesh.cloud_extra.push("communities.enforce=true".into());
    mesh.start_cloud();
    for i in 0..3 {
        wait_for(&format!("node {i} is told to enforce"), WAIT, || {
            (direct(&mesh, i)["enforceCommunities"] == true).then_some(())
        });
    }
    let refused = mesh.metric(
        1,
        "edgemesh_tunnel_refused_total",
        &["reason=\"forbidden\""],
    );
    for _ in 0..3 {
        let (status, body) = curl(&mesh, &outsider, &url);
        assert_ne!(
            status, 200,
            "a non-member's relayed call got through: {body}"
        );
    }
    let now = mesh.metric(
        1,
        "edgemesh_tunnel_refused_total",
        &["reason=\"forbidden\""],
    );
    assert!(
        now >= refused + 1.0,
        "edge-1 refused {} streams",
        now - refused
    );
    call_ok(&mesh, &member, &url, "hello from b");
}

/// 200 streams at once over one direct path, one of them stalled (its client writes and
/// never reads, so the echo fills its windows): the other 199 finish intact.
#[test]
fn two_hundred_streams_over_a_path_finish_with_one_stalled() {
    use std::io::{Read, Write};
    let mut mesh = lan_mesh("dp-many", 2, Vec::new());
    let client = mesh.add_pod(0, "client");
    let echo = mesh.add_pod(1, "echo");
    mesh.serve(&echo, "echo", TARGET, "");
    let ip = mesh.put_service("echo", 7, TARGET, &[], &[(&echo.ip.to_string(), "edge-1")]);
    let addr: std::net::SocketAddr = format!("{ip}:7").parse().expect("addr");
    echo_transfer(&client.ns, addr, 1 << 20);
    wait_direct(&mesh, 0, "edge-1");
    let before = relayed(&mesh);

    let done = edgemesh_e2e::mesh::in_netns(&client.ns, move || {
        // The stalled one: 8 MiB sent, nothing read back.
        let mut stalled =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stalled
            .set_write_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..128 {
            if stalled.write_all(&chunk).is_err() {
                break;
            }
        }
        let workers: Vec<_> = (0..199u32)
            .map(|n| {
                std::thread::spawn(move || -> std::io::Result<bool> {
                    let mut s =
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                    s.set_read_timeout(Some(Duration::from_secs(20)))?;
                    let msg: Vec<u8> = (0..32 * 1024u32).map(|i| (i ^ n) as u8).collect();
                    s.write_all(&msg)?;
                    s.shutdown(std::net::Shutdown::Write)?;
                    let mut back = Vec::new();
                    s.read_to_end(&mut back)?;
                    Ok(back == msg)
                })
            })
            .collect();
        let ok = workers
            .into_iter()
            .map(|w| w.join())
            .filter(|r| matches!(r, Ok(Ok(true))))
            .count();
        // Still open: it was stalled the whole time.
        drop(stalled);
        ok
    });
    assert_eq!(done, 199);
    assert_eq!(relayed(&mesh), before, "streams took the relay");
}

/// UDP Services over a direct path: a flow started once the path is up takes it (a stream of
/// datagrams, none through the cloud), and every datagram comes back whole.
#[test]
fn udp_flows_take_the_direct_path_with_their_boundaries() {
    use edgemesh_e2e::udp::{echo_sizes, put_udp_service, udp_echo};
    let mut mesh = lan_mesh("dp-udp", 2, Vec::new());
    let client = mesh.add_pod(0, "client");
    let echo = mesh.add_pod(1, "echo");
    udp_echo(&mut mesh, &echo, 7000);
    let ip = put_udp_service(&mesh, "echo-udp", 7, 7000, &[(&echo, "edge-1")]);
    let addr: std::net::SocketAddr = format!("{ip}:7").parse().expect("addr");
    // The first flow starts the path (its own stream is relayed while the path forms).
    echo_sizes(&client, addr, &[10]);
    wait_direct(&mesh, 0, "edge-1");
    let before = relayed(&mesh);
    let direct_before = mesh.metric(
        1,
        "edgemesh_tunnel_streams_accepted_total",
        &["path=\"direct\""],
    );
    // A new flow (another source port): over the path.
    echo_sizes(&client, addr, &[1, 1400, 65_000, 3]);
    assert_eq!(
        relayed(&mesh),
        before,
        "a UDP flow took the relay with a path up"
    );
    let direct_after = mesh.metric(
        1,
        "edgemesh_tunnel_streams_accepted_total",
        &["path=\"direct\""],
    );
    assert!(
        direct_after > direct_before,
        "edge-1 accepted no flow over the path ({direct_before} -> {direct_after})"
    );
}
