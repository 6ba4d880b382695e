//! The node's transparent proxy, end to end: real iptables rules in node namespaces, real
//! servers in pod namespaces behind the node, real `curl` from client pods to cluster IPs.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use edgemesh_e2e::mesh::{echo_transfer, ep_path, svc_path, Mesh};
use edgemesh_e2e::{wait_for, Host, ProcId};
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};

const TARGET: u16 = 8080;

/// A mesh with one node whose proxy checks its rules every second and ejects briefly.
fn mesh(tag: &str, extra: &[&str]) -> Mesh {
    let mut mesh = Mesh::new(tag, 1, Vec::new());
    mesh.nodes[0].extra = ["proxy.reconcile_interval=\"1s\""]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    mesh.start_cloud();
    mesh.create_tokens();
    mesh.start_node(0);
    mesh.wait_synced(0);
    mesh
}

/// Server pods `s0..sN` on node 0 answering HTTP with their own name.
fn http_pods(mesh: &mut Mesh, n: usize) -> (Vec<Host>, Vec<ProcId>) {
    (0..n)
        .map(|i| {
            let pod = mesh.add_pod(0, &format!("s{i}"));
            let p = mesh.serve(&pod, "http", TARGET, &format!("s{i}"));
            (pod, p)
        })
        .unzip()
}

fn addrs(pods: &[Host]) -> Vec<(String, String)> {
    pods.iter()
        .map(|p| (p.ip.to_string(), "edge-0".to_string()))
        .collect()
}

fn put_web(mesh: &Mesh, pods: &[Host], annotations: &[(&str, &str)]) -> String {
    let a = addrs(pods);
    let refs: Vec<(&str, &str)> = a.iter().map(|(i, n)| (i.as_str(), n.as_str())).collect();
    mesh.put_service("web", 80, TARGET, annotations, &refs)
}

/// Waits until node 0's route for `ip:80` shows `policy`.
fn wait_policy(mesh: &Mesh, ip: &str, policy: &str) {
    wait_for(
        &format!("route policy {policy}"),
        Duration::from_secs(10),
        || {
            let r = mesh.route(0, &format!("{ip}:80"))?;
            (r["policy"] == policy).then_some(())
        },
    );
}

#[test]
fn cluster_ip_reaches_pods_with_every_policy() {
    let mut mesh = mesh("pxbal", &[]);
    let (servers, _) = http_pods(&mut mesh, 3);
    let c1 = mesh.add_pod(0, "c1");
    let c2 = mesh.add_pod(0, "c2");
    let ip = put_web(&mesh, &servers, &[]);

    // targetPort: the Service listens on 80, the pods on 8080.
    let (s, body) = mesh.topo.curl(&c1, &[&format!("http://{ip}/")]);
    assert_eq!(s, 200, "{body}");
    assert!(body.starts_with('s'), "{body}");
    // Host processes are captured too (OUTPUT chain).
    mesh.route_service_range_on_node(0);
    let node = mesh.nodes[0].host.clone();
    let (s, body) = mesh.topo.curl(&node, &[&format!("http://{ip}/")]);
    assert_eq!(s, 200, "from the node itself: {body}");

    // Round robin: 600 new connections spread within ±10% of even.
    let rr = mesh.spread(&c1, &ip, 600);
    assert_eq!(rr.len(), 3, "{rr:?}");
    assert!(rr.values().all(|&n| (180..=220).contains(&n)), "{rr:?}");

    // Consistent hash on the source address: one client, one endpoint.
    put_web(
        &mesh,
        &servers,
        &[("edgemesh.io/lb-policy", "consistent-hash")],
    );
    wait_policy(&mesh, &ip, "ConsistentHash");
    for client in [&c1, &c2] {
        let c = mesh.spread(client, &ip, 60);
        assert_eq!(c.len(), 1, "{}: {c:?}", client.role);
    }

    // Random and least-request reach every endpoint.
    for (policy, shown) in [("random", "Random"), ("least-request", "LeastRequest")] {
        put_web(&mesh, &servers, &[("edgemesh.io/lb-policy", policy)]);
        wait_policy(&mesh, &ip, shown);
        let c = mesh.spread(&c1, &ip, 150);
        assert_eq!(c.len(), 3, "{policy}: {c:?}");
    }

    // sessionAffinity: ClientIP keeps each client on one endpoint, even under round robin.
    let (_, mut svc) = mesh.api("GET", &svc_path("web"), None);
    svc["metadata"]["annotations"] = json!({});
    svc["spec"]["sessionAffinity"] = json!("ClientIP");
    mesh.put(&svc_path("web"), &svc.to_string());
    wait_for("affinity on the route", Duration::from_secs(10), || {
        let r = mesh.route(0, &format!("{ip}:80"))?;
        (r["policy"] == "RoundRobin" && r["sessionAffinity"].is_number()).then_some(())
    });
    for client in [&c1, &c2] {
        let c = mesh.spread(client, &ip, 60);
        assert_eq!(c.len(), 1, "affinity for {}: {c:?}", client.role);
    }
    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_connections_total",
            &["service=\"default/web\"", "result=\"forwarded\""]
        ) >= 1_000.0
    );
}

#[test]
fn a_stopped_endpoint_is_ejected_and_used_again_when_back() {
    let mut mesh = mesh("pxout", &["proxy.outlier.base_ejection=\"5s\""]);
    let (servers, procs) = http_pods(&mut mesh, 3);
    let client = mesh.add_pod(0, "c1");
    let ip = put_web(&mesh, &servers, &[]);
    assert_eq!(mesh.spread(&client, &ip, 30).len(), 3);

    // Stop s2's server: connections fall over to the others and s2 is ejected after its
    // first failure, not tried for every connection.
    let s2 = servers[2].clone();
    mesh.topo.stop(procs[2]);
    let failures_before = mesh.metric(0, "edgemesh_proxy_connect_failures_total", &[]);
    let c = mesh.spread(&client, &ip, 60);
    assert_eq!(c.get("s2"), None, "{c:?}");
    assert_eq!(
        c.values().sum::<usize>(),
        60,
        "every request answered: {c:?}"
    );
    let failures = mesh.metric(0, "edgemesh_proxy_connect_failures_total", &[]) - failures_before;
    assert!(
        (1.0..=3.0).contains(&failures),
        "s2 should be tried only until ejected, got {failures} failures"
    );
    let route = mesh.route(0, &format!("{ip}:80")).expect("route");
    let ejected: Vec<&Value> = route["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter(|e| e["ejected"] == true)
        .collect();
    assert_eq!(ejected.len(), 1, "{route}");
    assert_eq!(ejected[0]["address"], format!("{}:{TARGET}", s2.ip));

    // Back: once its ejection ends it takes connections again.
    mesh.serve(&s2, "http", TARGET, "s2");
    wait_for("s2 used again", Duration::from_secs(30), || {
        mesh.spread(&client, &ip, 6)
            .contains_key("s2")
            .then_some(())
    });
}

#[test]
fn server_first_protocols_and_large_transfers() {
    let mut mesh = mesh("pxtcp", &[]);
    let banner = mesh.add_pod(0, "banner");
    mesh.serve(&banner, "banner", TARGET, "220 edge smtp ready");
    let echo = mesh.add_pod(0, "echo");
    mesh.serve(&echo, "echo", TARGET, "");
    let client = mesh.add_pod(0, "c1");
    let bip = mesh.put_service(
        "banner",
        25,
        TARGET,
        &[],
        &[(&banner.ip.to_string(), "edge-0")],
    );
    let eip = mesh.put_service("echo", 7, TARGET, &[], &[(&echo.ip.to_string(), "edge-0")]);

    // The server speaks first: the client reads without having sent a byte.
    let addr: SocketAddr = format!("{bip}:25").parse().expect("addr");
    let greeting = edgemesh_e2e::mesh::in_netns(&client.ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).expect("banner");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert_eq!(greeting, "220 edge smtp ready\n");

    // An established connection survives an update of its Service's endpoints.
    let addr: SocketAddr = format!("{eip}:7").parse().expect("addr");
    let ns = client.ns.clone();
    let held = edgemesh_e2e::mesh::in_netns(&ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"before").expect("write");
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).expect("echo");
        assert_eq!(&buf, b"before");
        s
    });
    mesh.put_service(
        "echo",
        7,
        TARGET,
        &[("edgemesh.io/lb-policy", "random")],
        &[(&echo.ip.to_string(), "edge-0"), ("10.244.9.9", "edge-0")],
    );
    wait_for("echo has two endpoints", Duration::from_secs(10), || {
        let r = mesh.route(0, &format!("{eip}:7"))?;
        (r["endpoints"].as_array()?.len() == 2).then_some(())
    });
    edgemesh_e2e::mesh::in_netns(&ns, move || {
        let mut s = held;
        s.write_all(b"after!").expect("write after the update");
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).expect("echo after the update");
        assert_eq!(&buf, b"after!");
    });
    mesh.put_service("echo", 7, TARGET, &[], &[(&echo.ip.to_string(), "edge-0")]);

    // 200 MB each way, byte for byte, with the half-close passed through.
    let addr: SocketAddr = format!("{eip}:7").parse().expect("addr");
    echo_transfer(&client.ns, addr, 200 * 1024 * 1024);
    let sent = mesh.metric(
        0,
        "edgemesh_proxy_bytes_total",
        &["service=\"default/echo\"", "direction=\"sent\""],
    );
    assert!(sent >= 200.0 * 1024.0 * 1024.0, "bytes counted: {sent}");
}

/// Lines of `iptables-save -t nat` in node 0 that edgemesh wrote.
fn edgemesh_rules(mesh: &Mesh) -> Vec<String> {
    nat_table(mesh)
        .lines()
        .filter(|l| l.contains("EDGEMESH") || l.contains("--comment edgemesh"))
        .map(str::to_string)
        .collect()
}

fn nat_table(mesh: &Mesh) -> String {
    let out = mesh
        .topo
        .exec(&mesh.nodes[0].host, &["iptables-save", "-t", "nat"]);
    assert!(out.status.success(), "iptables-save failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn iptables(mesh: &Mesh, args: &[&str]) {
    let mut argv = vec!["iptables", "-w", "5", "-t", "nat"];
    argv.extend_from_slice(args);
    let out = mesh.topo.exec(&mesh.nodes[0].host, &argv);
    assert!(
        out.status.success(),
        "iptables {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Exactly one copy of each of edgemesh's rules: two chains, two jumps, the mark exemption
/// and a REDIRECT in each chain.
fn assert_one_copy(mesh: &Mesh) {
    let rules = edgemesh_rules(mesh);
    let expected = [
        ":EDGEMESH-OUTPUT - [0:0]",
        ":EDGEMESH-PREROUTING - [0:0]",
        "-A PREROUTING -m comment --comment edgemesh -j EDGEMESH-PREROUTING",
        "-A OUTPUT -m comment --comment edgemesh -j EDGEMESH-OUTPUT",
        "-A EDGEMESH-OUTPUT -m mark --mark 0x1e5/0x1e5 -m comment --comment edgemesh -j RETURN",
        "-A EDGEMESH-OUTPUT -d 10.96.0.0/12 -p tcp -m comment --comment edgemesh -j REDIRECT --to-ports 40001",
        "-A EDGEMESH-PREROUTING -d 10.96.0.0/12 -p tcp -m comment --comment edgemesh -j REDIRECT --to-ports 40001",
    ];
    let mut got: Vec<&str> = rules.iter().map(String::as_str).collect();
    got.sort();
    let mut want: Vec<&str> = expected.to_vec();
    want.sort();
    assert_eq!(got, want, "nat table:\n{}", nat_table(mesh));
}

fn wait_one_copy(mesh: &Mesh) {
    wait_for(
        "one copy of edgemesh's rules",
        Duration::from_secs(15),
        || {
            let n = edgemesh_rules(mesh).len();
            (n == 7).then_some(())
        },
    );
    assert_one_copy(mesh);
}

#[test]
fn rules_are_reconciled_across_restarts_and_cleaned_up() {
    let mut mesh = Mesh::new("pxipt", 1, Vec::new());
    mesh.nodes[0].extra = vec!["proxy.reconcile_interval=\"1s\"".into()];
    // An operator's (or kube-proxy's) rules, there before edgemesh.
    iptables(&mesh, &["-N", "KUBE-SERVICES"]);
    iptables(
        &mesh,
        &[
            "-A",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "foreign",
            "-j",
            "KUBE-SERVICES",
        ],
    );
    iptables(
        &mesh,
        &[
            "-A",
            "POSTROUTING",
            "-s",
            "10.244.0.0/16",
            "-m",
            "comment",
            "--comment",
            "foreign",
            "-j",
            "MASQUERADE",
        ],
    );
    let foreign: Vec<String> = nat_table(&mesh)
        .lines()
        .filter(|l| l.contains("foreign") || l.starts_with(":KUBE"))
        .map(str::to_string)
        .collect();
    assert_eq!(foreign.len(), 3);

    mesh.start_cloud();
    mesh.create_tokens();
    mesh.start_node(0);
    mesh.wait_synced(0);
    wait_one_copy(&mesh);
    let (server, _) = http_pods(&mut mesh, 1);
    let client = mesh.add_pod(0, "c1");
    let ip = put_web(&mesh, &server, &[]);
    assert_eq!(mesh.topo.curl(&client, &[&format!("http://{ip}/")]).0, 200);
    let node = mesh.nodes[0].host.clone();
    let edgemesh = edgemesh_e2e::bin("edgemesh");
    let status = mesh
        .topo
        .exec(&node, &[edgemesh.to_str().expect("path"), "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("iptables:    installed"), "{text}");
    assert!(
        text.contains("listening on 0.0.0.0:40001, 1 routes"),
        "{text}"
    );

    // A clean stop removes everything; a start puts one copy back.
    mesh.stop_node(0, libc::SIGTERM);
    assert_eq!(edgemesh_rules(&mesh), Vec::<String>::new());
    mesh.start_node(0);
    wait_one_copy(&mesh);

    // A crash leaves the rules; the next start does not duplicate them.
    mesh.stop_node(0, libc::SIGKILL);
    assert_one_copy(&mesh);
    mesh.start_node(0);
    wait_one_copy(&mesh);
    assert_eq!(mesh.topo.curl(&client, &[&format!("http://{ip}/")]).0, 200);

    // Rules removed or changed by hand come back.
    iptables(
        &mesh,
        &[
            "-D",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "edgemesh",
            "-j",
            "EDGEMESH-PREROUTING",
        ],
    );
    iptables(&mesh, &["-F", "EDGEMESH-OUTPUT"]);
    iptables(
        &mesh,
        &[
            "-I",
            "OUTPUT",
            "-m",
            "comment",
            "--comment",
            "edgemesh",
            "-j",
            "EDGEMESH-OUTPUT",
        ],
    );
    wait_one_copy(&mesh);
    assert_eq!(mesh.topo.curl(&client, &[&format!("http://{ip}/")]).0, 200);

    // `edgemesh cleanup` after a crash removes all of ours and nothing else.
    mesh.stop_node(0, libc::SIGKILL);
    let node = mesh.nodes[0].host.clone();
    let out = mesh.topo.exec(
        &node,
        &[
            edgemesh_e2e::bin("edgemesh").to_str().expect("path"),
            "cleanup",
        ],
    );
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(edgemesh_rules(&mesh), Vec::<String>::new());
    let after: Vec<String> = nat_table(&mesh)
        .lines()
        .filter(|l| l.contains("foreign") || l.starts_with(":KUBE"))
        .map(str::to_string)
        .collect();
    assert_eq!(after, foreign, "foreign rules untouched");

    // proxy.intercept = false: the agent runs without touching iptables.
    mesh.nodes[0].extra.push("proxy.intercept=false".into());
    mesh.start_node(0);
    mesh.wait_synced(0);
    assert_eq!(edgemesh_rules(&mesh), Vec::<String>::new());
}

#[test]
fn a_thousand_services_need_no_new_rule() {
    let mut mesh = mesh("px1k", &[]);
    let (server, _) = http_pods(&mut mesh, 1);
    let client = mesh.add_pod(0, "c1");
    wait_one_copy(&mesh);
    let items: Vec<Value> = (0..1000)
        .flat_map(|i| {
            let name = format!("bulk-{i}");
            [
                json!({"apiVersion":"v1","kind":"Service","metadata":{"name":name,"namespace":"default"},
                       "spec":{"ports":[{"name":"http","port":80,"targetPort":TARGET}]}}),
                json!({"apiVersion":"v1","kind":"Endpoints","metadata":{"name":name,"namespace":"default"},
                       "subsets":[{"addresses":[{"ip":server[0].ip.to_string(),"nodeName":"edge-0"}],
                                   "ports":[{"name":"http","port":TARGET}]}]}),
            ]
        })
        .collect();
    let body = json!({"apiVersion":"v1","kind":"List","items":items}).to_string();
    let file = mesh.topo.write_file("bulk.json", &body);
    let started = Instant::now();
    let (s, v) = mesh.api(
        "POST",
        "/api/v1/apply",
        Some(&format!("@{}", file.display())),
    );
    assert_eq!(s, 200, "{v}");
    let ip = mesh.cluster_ip("bulk-999");
    let (s, _) = wait_for(
        "the last new service answers",
        Duration::from_secs(10),
        || {
            let r = mesh
                .topo
                .curl(&client, &["--max-time", "1", &format!("http://{ip}/")]);
            (r.0 == 200).then_some(r)
        },
    );
    assert_eq!(s, 200);
    eprintln!(
        "1,000 services: last one reachable {:?} after the apply was sent",
        started.elapsed()
    );
    assert_one_copy(&mesh);
    assert!(mesh.metric(0, "edgemesh_proxy_routes", &[]) >= 1000.0);
}

#[test]
fn garbage_and_half_open_connections_do_not_hurt_others() {
    let mut mesh = mesh("pxbad", &[]);
    let (server, _) = http_pods(&mut mesh, 1);
    let echo = mesh.add_pod(0, "echo");
    mesh.serve(&echo, "echo", TARGET, "");
    let client = mesh.add_pod(0, "c1");
    let ip = put_web(&mesh, &server, &[]);
    let eip = mesh.put_service("echo", 7, TARGET, &[], &[(&echo.ip.to_string(), "edge-0")]);
    // A Service without endpoints, and an address in the service range that is no Service.
    mesh.put(
        &svc_path("empty"),
        &edgemesh_e2e::mesh::service_json("empty", 80, TARGET),
    );
    let v = mesh.put(&ep_path("empty"), r#"{"apiVersion":"v1","kind":"Endpoints","metadata":{"name":"empty","namespace":"default"},"subsets":[]}"#);
    mesh.wait_version(0, v, Duration::from_secs(10));
    let empty_ip = mesh.cluster_ip("empty");
    // A Service whose only endpoint is on a node that is not connected: never dialled from
    // here (that address belongs to another site); the cloud refuses the stream (the node is
    // offline), so the connection is reset at once.
    let remote_ip = mesh.put_service(
        "remote",
        80,
        TARGET,
        &[],
        &[(&server[0].ip.to_string(), "edge-9")],
    );
    let route = mesh.route(0, &format!("{remote_ip}:80")).expect("route");
    assert_eq!(
        route["endpoints"].as_array().map(Vec::len),
        Some(1),
        "{route}"
    );
    assert_eq!(route["endpoints"][0]["node"], "edge-9", "{route}");
    assert_eq!(route["endpointsElsewhere"], 1, "{route}");
    let node_ip = mesh.nodes[0].host.ip;

    let web: SocketAddr = format!("{ip}:80").parse().expect("addr");
    let echo_addr: SocketAddr = format!("{eip}:7").parse().expect("addr");
    let nowhere: SocketAddr = "10.111.222.33:80".parse().expect("addr");
    let empty: SocketAddr = format!("{empty_ip}:80").parse().expect("addr");
    let remote: SocketAddr = format!("{remote_ip}:80").parse().expect("addr");
    let direct: SocketAddr = SocketAddr::from((node_ip, 40001));
    let held = edgemesh_e2e::mesh::in_netns(&client.ns, move || {
        // 200 half-open connections that never send a byte, held while the others run.
        let idle: Vec<TcpStream> = (0..200)
            .filter_map(|_| TcpStream::connect_timeout(&web, Duration::from_secs(5)).ok())
            .collect();
        // Garbage through an opaque TCP service comes back unchanged.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut junk = vec![0u8; 4096];
        rng.fill_bytes(&mut junk);
        let mut s = TcpStream::connect_timeout(&echo_addr, Duration::from_secs(5)).expect("echo");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(&junk).expect("junk");
        s.shutdown(Shutdown::Write).expect("fin");
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("echo back");
        assert!(back == junk, "garbage echoed intact");
        // No Service, no endpoints, or the proxy port itself: reset, never proxied elsewhere.
        for (what, addr) in [
            ("no service", nowhere),
            ("no endpoints", empty),
            ("endpoint on an offline node", remote),
            ("proxy port", direct),
        ] {
            for _ in 0..20 {
                let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => s,
                    Err(e) => {
                        assert!(
                            matches!(
                                e.kind(),
                                ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                            ),
                            "{what}: {e}"
                        );
                        continue;
                    }
                };
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                // Not HTTP: an HTTP request to a Service is answered instead (503 or 502,
                // see tests/http.rs); the TCP path resets.
                let _ = s.write_all(b"\x00\x01 not http\r\n");
                let mut buf = [0u8; 16];
                match s.read(&mut buf) {
                    Ok(0) => {}
                    Ok(n) => panic!("{what}: got {n} bytes, expected a reset"),
                    Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{what}: {e}"),
                }
            }
        }
        idle
    });
    // With the half-open connections still held, others are served.
    for _ in 0..20 {
        let (s, body) = mesh.topo.curl(&client, &[&format!("http://{ip}/")]);
        assert_eq!(s, 200, "{body}");
    }
    assert_eq!(held.len(), 200);
    assert!(mesh.metric(0, "edgemesh_proxy_unmatched_connections_total", &[]) >= 40.0);
    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_connections_total",
            &["result=\"no_endpoints\""]
        ) >= 20.0
    );
    // The offline node's endpoint was tried (the cloud refused the stream).
    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_connections_total",
            &["service=\"default/remote\"", "result=\"connect_failed\""]
        ) >= 20.0
    );
    drop(held);
    let p = mesh.nodes[0].proc.expect("running");
    assert!(mesh.topo.is_running(p), "the agent survived");
}
