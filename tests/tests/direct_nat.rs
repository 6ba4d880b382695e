//! Direct node-to-node paths, phase 2, through NATs and failures, end to end: two nodes behind
//! two port-preserving MASQUERADE routers punch a direct path to each other's reflexive address
//! (the first call takes the relay, later ones never do); a node behind a `--random-fully`
//! ("symmetric") NAT gets no path, and every call still succeeds over the relay; a direct path
//! cut by a firewall fails over to the relay with no call failing, and comes back when the
//! firewall lets it.
//!
//! Topology of the NAT tests (every address exists only inside the test's namespaces):
//!
//! ```text
//!   switch ("internet", 10.250.0.0/24)
//!     ├─ cloud 10.250.0.10                 cloudcore: hub, relay, reflexive-address service
//!     ├─ r1    10.250.0.11 │ 10.244.1.1 ── na 10.244.1.2   edge-a
//!     └─ r2    10.250.0.12 │ 10.244.2.1 ── nb 10.244.2.2   edge-b (web and echo servers)
//! ```
//!
//! The routers MASQUERADE their LAN out of `eth0`, forward from `eth0` only established and
//! related traffic, and drop new UDP to themselves (else a peer's early packet leaves a
//! conntrack entry on the router that takes the port; see `shared/reference/nat-lab`). The
//! nodes are namespaces behind the routers, so they cannot have pods of their own in this
//! harness: the client is the node's own process (captured by `EDGEMESH-OUTPUT`) and the
//! servers listen on edge-b's own address (host-network endpoints).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use edgemesh_e2e::direct::{
    iptables, nat_router, path_to, put_community, relayed, status as direct,
};
use edgemesh_e2e::harness::Host;
use edgemesh_e2e::mesh::{in_netns, EdgeNode, Mesh};
use edgemesh_e2e::wait_for;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const WEB_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7007;
/// `direct.listen`'s default port, on the nodes and on the cloud.
const DIRECT_PORT: u16 = 10004;
/// Calls each test makes where it counts streams.
const CALLS: usize = 20;
/// Between calls that keep a path forming (a path forms when a call needs it).
const PACE: Duration = Duration::from_millis(250);

/// Streams node `i` accepted for its endpoints over `path` (`direct` or `relay`).
fn accepted(mesh: &Mesh, i: usize, path: &str) -> f64 {
    mesh.metric(
        i,
        "edgemesh_tunnel_streams_accepted_total",
        &[&format!("path=\"{path}\"")],
    )
}

/// One HTTP call with curl from `client` (at most 10 s); asserts a `200` with `want` and
/// returns how long it took.
fn call(mesh: &Mesh, client: &Host, url: &str, want: &str) -> Duration {
    let started = Instant::now();
    let (status, body) = mesh.topo.curl(client, &["--max-time", "10", url]);
    let took = started.elapsed();
    assert_eq!(
        (status, body.trim()),
        (200, want),
        "GET {url} from {} after {took:?}",
        client.role
    );
    took
}

/// One call on a new TCP connection from namespace `ns` to an echo Service at `addr`: sends a
/// line, half-closes, and asserts the same line comes back (each such call is a new tunnel
/// stream, unlike HTTP calls, whose connections the proxy keeps).
fn echo_call(ns: &str, addr: SocketAddr, n: usize) {
    let line = format!("call {n} through the mesh\n");
    let sent = line.clone();
    let got = in_netns(ns, move || -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(sent.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("half-close: {e}"))?;
        let mut back = String::new();
        s.read_to_string(&mut back)
            .map_err(|e| format!("receive: {e}"))?;
        Ok(back)
    });
    assert_eq!(got.as_deref(), Ok(line.as_str()), "echo call {n} to {addr}");
}

/// Makes calls with `call` every [`PACE`] until `done` holds (checked before each call), for
/// at most `timeout`: paths form when calls need them, as they do for a user. `done` gives
/// what it waits for, or what it saw instead (shown on a timeout). Returns what `done` gave
/// and the calls made.
fn calls_until<T>(
    what: &str,
    timeout: Duration,
    mut call: impl FnMut(),
    mut done: impl FnMut() -> Result<T, String>,
) -> (T, usize) {
    let started = Instant::now();
    let mut calls = 0;
    loop {
        let seen = match done() {
            Ok(v) => return (v, calls),
            Err(seen) => seen,
        };
        assert!(
            started.elapsed() < timeout,
            "{what}: not after {calls} calls in {:?}; last seen: {seen}",
            started.elapsed()
        );
        call();
        calls += 1;
        std::thread::sleep(PACE);
    }
}

/// `Ok(p)` when `p` (a path from `/debug/direct`) is `want`, else the path as seen.
fn path_is(p: Value, want: &str) -> Result<Value, String> {
    if p["path"] == want {
        Ok(p)
    } else {
        Err(p.to_string())
    }
}

/// Two nodes, each behind its own NAT router, members of Community `pair`, with a web and an
/// echo server on edge-b's own address.
struct NatPair {
    mesh: Mesh,
    /// The routers of edge-a and edge-b.
    r1: Host,
    r2: Host,
    /// edge-a's and edge-b's namespaces.
    a: Host,
    b: Host,
    web: String,
    echo: SocketAddr,
}

/// The reflexive address node `i` learned (its router's public side).
fn reflexive(mesh: &Mesh, i: usize) -> SocketAddr {
    wait_for(&format!("node {i}'s reflexive address"), WAIT, || {
        direct(mesh, i)["reflexive"].as_str()?.parse().ok()
    })
}

/// Waits until node `i` holds `peer`'s candidate `want`.
fn wait_candidate(mesh: &Mesh, i: usize, peer: &str, want: SocketAddr) {
    wait_for(
        &format!("node {i} holds {peer}'s candidate {want}"),
        WAIT,
        || {
            direct(mesh, i)["peers"][peer]
                .as_array()?
                .iter()
                .any(|c| c["address"] == want.to_string().as_str())
                .then_some(())
        },
    );
}

/// edge-a behind r1 (plain MASQUERADE), edge-b behind r2 (MASQUERADE, `--random-fully` when
/// `b_random`), both in Community `pair`, both knowing the other's reflexive candidate.
fn nat_pair(tag: &str, b_random: bool) -> NatPair {
    let mut mesh = Mesh::new(tag, 0, Vec::new());
    let (r1, a) = nat_router(&mut mesh, "r1", "na", false);
    let (r2, b) = nat_router(&mut mesh, "r2", "nb", b_random);
    for (name, host) in [("edge-a", &a), ("edge-b", &b)] {
        mesh.nodes.push(EdgeNode {
            name: name.into(),
            data_dir: mesh.topo.dir().join(format!("{name}-data")),
            host: host.clone(),
            token: String::new(),
            labels: format!("{{site=\"{name}\"}}"),
            proc: None,
            extra: vec!["proxy.reconcile_interval=\"1s\"".into()],
            env: Vec::new(),
        });
    }
    mesh.start_cloud();
    mesh.create_tokens();
    for i in 0..2 {
        mesh.start_node(i);
    }
    for i in 0..2 {
        mesh.wait_synced(i);
    }
    put_community(&mesh, "pair", &["edge-a", "edge-b"]);

    // Each learns its router's public side, and the other gets it as a candidate.
    let ra = reflexive(&mesh, 0);
    let rb = reflexive(&mesh, 1);
    assert_eq!(ra.ip(), r1.ip, "edge-a's reflexive address: {ra}");
    assert_eq!(rb.ip(), r2.ip, "edge-b's reflexive address: {rb}");
    wait_candidate(&mesh, 0, "edge-b", rb);
    wait_candidate(&mesh, 1, "edge-a", ra);

    // Servers on edge-b's own address (host-network endpoints of edge-b).
    mesh.serve(&b, "http", WEB_PORT, "hello from b");
    mesh.serve(&b, "echo", ECHO_PORT, "");
    let bip = b.ip.to_string();
    let web = mesh.put_service("web", 80, WEB_PORT, &[], &[(&bip, "edge-b")]);
    let echo = mesh.put_service("echo", 7, ECHO_PORT, &[], &[(&bip, "edge-b")]);
    NatPair {
        mesh,
        r1,
        r2,
        a,
        b,
        web: format!("http://{web}/"),
        echo: format!("{echo}:7").parse().expect("echo address"),
    }
}

#[test]
fn two_nodes_behind_two_port_preserving_nats_punch_a_direct_path() {
    let nat = nat_pair("natpunch", false);
    let (mesh, a) = (&nat.mesh, &nat.a);
    let ra = reflexive(mesh, 0);
    let rb = reflexive(mesh, 1);
    // The routers as built keep the node's port (endpoint-independent mapping).
    assert_eq!(
        (ra.port(), rb.port()),
        (DIRECT_PORT, DIRECT_PORT),
        "port-preserving MASQUERADE"
    );

    // The first call is served at once, over the relay, while the path forms.
    let before = relayed(mesh);
    call(mesh, a, &nat.web, "hello from b");
    assert!(
        relayed(mesh) > before,
        "the first call did not take the relay"
    );

    // Calls go on; a direct path forms between the routers' public addresses.
    let started = Instant::now();
    let (p, calls) = calls_until(
        "a direct path from edge-a to edge-b",
        WAIT,
        || {
            call(mesh, a, &nat.web, "hello from b");
        },
        || path_is(path_to(mesh, 0, "edge-b"), "direct"),
    );
    eprintln!(
        "direct path up {:?} after the first call ({calls} calls more)",
        started.elapsed()
    );
    assert_eq!(
        p["candidate"].as_str(),
        Some(rb.to_string().as_str()),
        "edge-a's path goes to edge-b's router (the reflexive candidate): {p}"
    );
    assert!(p["rttMs"].as_f64().is_some(), "{p}");
    let q = wait_for("edge-b's side of the path", WAIT, || {
        let q = path_to(mesh, 1, "edge-a");
        (q["path"] == "direct").then_some(q)
    });
    assert_eq!(
        q["candidate"].as_str(),
        Some(ra.to_string().as_str()),
        "edge-b's path goes to edge-a's router: {q}"
    );

    // From now on the cloud relays nothing for them: HTTP calls, and new connections, each a
    // new stream, all arrive at edge-b over the path.
    let before = relayed(mesh);
    let direct_before = accepted(mesh, 1, "direct");
    for n in 0..CALLS {
        call(mesh, a, &nat.web, "hello from b");
        echo_call(&a.ns, nat.echo, n);
    }
    assert_eq!(
        relayed(mesh),
        before,
        "the cloud relayed streams of a punched pair"
    );
    let direct_after = accepted(mesh, 1, "direct");
    assert!(
        direct_after - direct_before >= CALLS as f64,
        "edge-b accepted {} direct streams for {CALLS} new connections",
        direct_after - direct_before
    );
    let p = path_to(mesh, 0, "edge-b");
    assert_eq!(p["path"], "direct", "{p}");
    assert_eq!(
        p["candidate"].as_str(),
        Some(rb.to_string().as_str()),
        "{p}"
    );
    assert!(p["txBytes"].as_u64().unwrap_or(0) > 0, "{p}");
    assert_eq!(p["failedRounds"], 0, "{p}");
    // The routers' conntrack holds the punched flow: edge-a's port to edge-b's router.
    let table = mesh.topo.exec(&nat.r1, &["cat", "/proc/net/nf_conntrack"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().any(|l| l.contains(" udp ")
            && l.contains(&format!("src={} dst={}", a.ip, nat.r2.ip))
            && !l.contains("UNREPLIED")),
        "no answered UDP flow from edge-a to r2 in r1's conntrack:\n{table}"
    );
}

#[test]
fn a_node_behind_a_random_fully_nat_gets_every_call_over_the_relay() {
    let nat = nat_pair("natsym", true);
    let (mesh, a) = (&nat.mesh, &nat.a);

    let before = relayed(mesh);
    let direct_before = accepted(mesh, 1, "direct");
    let relay_before = accepted(mesh, 1, "relay");
    let started = Instant::now();
    for n in 0..CALLS {
        call(mesh, a, &nat.web, "hello from b");
        echo_call(&a.ns, nat.echo, n);
        let p = path_to(mesh, 0, "edge-b");
        assert_eq!(p["path"], "relay", "after call {n}: {p}");
        std::thread::sleep(PACE);
    }
    // Paths were tried (a call starts a round, a round fails after its dials time out) and
    // none formed, from either side.
    let p = wait_for("a failed round on edge-a", WAIT, || {
        let p = path_to(mesh, 0, "edge-b");
        assert_eq!(p["path"], "relay", "{p}");
        (p["failedRounds"].as_u64() >= Some(1)).then_some(p)
    });
    eprintln!(
        "{CALLS} calls in {:?}; edge-a's path: {p}",
        started.elapsed()
    );
    assert!(
        p["lastError"].as_str().is_some_and(|e| !e.is_empty()),
        "{p}"
    );
    assert!(p["candidate"].is_null(), "{p}");
    let q = path_to(mesh, 1, "edge-a");
    assert_eq!(q["path"], "relay", "{q}");

    // Every new connection was a stream the cloud relayed; none came over a path.
    let grew = relayed(mesh) - before;
    assert!(
        grew >= CALLS as f64,
        "the cloud relayed {grew} streams for {CALLS} new connections"
    );
    assert_eq!(accepted(mesh, 1, "direct"), direct_before);
    let relay_grew = accepted(mesh, 1, "relay") - relay_before;
    assert!(
        relay_grew >= CALLS as f64,
        "edge-b accepted {relay_grew} relayed streams"
    );
    // The NAT is what stops it: edge-b's router maps edge-b's port anew per destination.
    let rb = reflexive(mesh, 1);
    let table = mesh.topo.exec(&nat.r2, &["cat", "/proc/net/nf_conntrack"]);
    let table = String::from_utf8_lossy(&table.stdout);
    // edge-b dialled edge-a's reflexive address (asked to by the punch), and r2 gave that
    // flow another public port than the one the cloud saw.
    let mapped: Vec<&str> = table
        .lines()
        .filter(|l| {
            l.contains(" udp ")
                && l.contains(&format!("src={} dst={} ", nat.b.ip, nat.r1.ip))
                && l.contains(&format!("sport={DIRECT_PORT} dport={DIRECT_PORT} "))
        })
        .filter_map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.strip_prefix("dport="))
                .nth(1)
        })
        .collect();
    assert!(
        !mapped.is_empty() && !mapped.contains(&rb.port().to_string().as_str()),
        "edge-b's dial to edge-a through r2 (public ports {mapped:?}) is not mapped apart \
         from its reflexive {rb}:\n{table}"
    );
}

/// `iptables ACTION` rules in both nodes that drop the direct-path port between them (UDP
/// `DIRECT_PORT` both ways); the hub's websocket to the cloud is untouched.
fn direct_firewall(mesh: &Mesh, action: &str) {
    for (i, j) in [(0, 1), (1, 0)] {
        let (here, peer) = (&mesh.nodes[i].host, mesh.nodes[j].host.ip.to_string());
        let port = DIRECT_PORT.to_string();
        for (chain, side) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            iptables(
                mesh,
                here,
                &[
                    action, chain, "-p", "udp", side, &peer, "--dport", &port, "-j", "DROP",
                ],
            );
        }
    }
}

#[test]
fn a_cut_direct_path_fails_over_to_the_relay_and_comes_back() {
    let mut mesh = Mesh::new("natcut", 2, Vec::new());
    mesh.start_cloud();
    mesh.create_tokens();
    for i in 0..2 {
        mesh.nodes[i].extra = vec!["proxy.reconcile_interval=\"1s\"".into()];
        mesh.start_node(i);
    }
    for i in 0..2 {
        mesh.wait_synced(i);
    }
    put_community(&mesh, "lan", &["edge-0", "edge-1"]);
    let lan_candidate: SocketAddr = (mesh.nodes[1].host.ip, DIRECT_PORT).into();
    wait_candidate(&mesh, 0, "edge-1", lan_candidate);
    let client = mesh.add_pod(0, "client");
    let server = mesh.add_pod(1, "server");
    mesh.serve(&server, "http", WEB_PORT, "hello from 1");
    let ip = mesh.put_service(
        "web",
        80,
        WEB_PORT,
        &[],
        &[(&server.ip.to_string(), "edge-1")],
    );
    let url = format!("http://{ip}/");
    let get = || call(&mesh, &client, &url, "hello from 1");
    let state = || path_to(&mesh, 0, "edge-1");

    // A direct path is up and carries the calls.
    get();
    calls_until(
        "a direct path",
        WAIT,
        || {
            get();
        },
        || path_is(state(), "direct"),
    );
    let before = relayed(&mesh);
    for _ in 0..5 {
        get();
    }
    assert_eq!(
        relayed(&mesh),
        before,
        "calls took the relay with a path up"
    );

    // Cut it: every call still succeeds (curl gives each 10 s), the path gives way, and stays
    // cut for longer than a round's dials (so a round started meanwhile fails).
    direct_firewall(&mesh, "-A");
    let cut = Instant::now();
    let mut times = Vec::new();
    calls_until(
        "the cut path shown as relay",
        Duration::from_secs(30),
        || times.push(get()),
        || path_is(state(), "relay"),
    );
    let to_relay = cut.elapsed();
    let more = Instant::now();
    while more.elapsed() < Duration::from_secs(5) {
        times.push(get());
        std::thread::sleep(PACE);
    }
    let p = state();
    assert_eq!(p["path"], "relay", "{p}");
    let during = relayed(&mesh) - before;
    eprintln!(
        "cut: relay after {to_relay:?}, then {p}; {} calls, the slowest {:?} (each: \
         {times:?}); the cloud relayed {during} streams",
        times.len(),
        times.iter().max()
    );
    assert!(
        during >= 1.0,
        "no call took the relay while the path was cut"
    );

    // Let it through again: calls go on, and the path comes back once the backoff after any
    // failed round (1, 2, 4 ... at most 30 s) lets a call form it again.
    direct_firewall(&mesh, "-D");
    let healed = Instant::now();
    let relay_at_heal = relayed(&mesh);
    let mut back = Vec::new();
    let (p, calls) = calls_until(
        "the direct path back",
        Duration::from_secs(60),
        || back.push(get()),
        || {
            let p = state();
            if p["path"] == "direct" {
                Ok(p)
            } else {
                Err(format!(
                    "{p}; the cloud relayed {} streams since the firewall opened",
                    relayed(&mesh) - relay_at_heal
                ))
            }
        },
    );
    eprintln!(
        "healed: direct again after {:?} and {calls} calls (the slowest {:?}): {p}",
        healed.elapsed(),
        back.iter().max()
    );
    assert_eq!(
        p["candidate"].as_str(),
        Some(lan_candidate.to_string().as_str()),
        "{p}"
    );
    let before = relayed(&mesh);
    for _ in 0..5 {
        get();
    }
    assert_eq!(
        relayed(&mesh),
        before,
        "calls took the relay after the path came back"
    );
}
