//! Observability, end to end: cloudcore and an agent in namespaces, both logging JSON; their
//! `/metrics` parsed with a strict exposition-format parser and checked against the naming
//! rules, before and after real traffic (a sync change, a `dig`, a `curl` through the proxy);
//! `/readyz` when ready and when the iptables rules are gone; `edgemesh status`.

use std::net::Ipv4Addr;

use edgemesh_e2e::mesh::{Mesh, ADMIN};
use edgemesh_e2e::prometheus::{naming_problems, Exposition};
use edgemesh_e2e::{bin, Host};
use serde_json::Value;
use std::time::Duration;

const TARGET: u16 = 8080;

/// Parses a scrape strictly and checks the naming rules of `process`.
fn parse(process: &str, text: &str) -> Exposition {
    let exp = Exposition::parse(text)
        .unwrap_or_else(|e| panic!("{process} /metrics is not valid exposition text: {e}\n{text}"));
    let problems = naming_problems(&exp, process);
    assert!(problems.is_empty(), "{process}: {problems:#?}");
    exp
}

fn cloud_metrics(mesh: &Mesh) -> Exposition {
    let (s, text) = mesh.topo.curl(&mesh.cloud, &[&mesh.api_url("/metrics")]);
    assert_eq!(s, 200, "cloudcore /metrics: {text}");
    parse("cloudcore", &text)
}

fn node_metrics(mesh: &Mesh) -> Exposition {
    let (s, text) = mesh
        .topo
        .curl(&mesh.nodes[0].host, &[&format!("http://{ADMIN}/metrics")]);
    assert_eq!(s, 200, "edgemesh /metrics: {text}");
    parse("edgemesh", &text)
}

/// `edgemesh status [--json]` run in the node's namespace.
fn status(mesh: &Mesh, json: bool) -> String {
    let edgemesh = bin("edgemesh");
    let mut argv = vec![
        edgemesh.to_str().expect("path"),
        "status",
        "--admin-listen",
        ADMIN,
    ];
    if json {
        argv.push("--json");
    }
    let out = mesh.topo.exec(&mesh.nodes[0].host, &argv);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "edgemesh status: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Every line of a process's log is a JSON object with the fields a log pipeline keys on.
fn assert_json_log(process: &str, log: &str) {
    // The harness heads each log with the command line it ran.
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("# harness:"))
        .collect();
    assert!(!lines.is_empty(), "{process} logged nothing");
    for line in lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{process}: a log line that is not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(
                v[field].as_str().is_some_and(|s| !s.is_empty()),
                "{process}: no {field} in {line}"
            );
        }
        assert!(
            !line.contains('\u{1b}'),
            "{process}: colour codes in {line}"
        );
    }
}

fn build_version(exp: &Exposition, process: &str) -> String {
    let name = format!("{process}_build_info");
    let info: Vec<_> = exp.samples(&name, &[]).collect();
    assert_eq!(info.len(), 1, "{name}: {info:?}");
    assert_eq!(info[0].value, 1.0);
    info[0].labels["version"].clone()
}

#[test]
fn metrics_parse_and_move_with_traffic_and_the_node_reports_itself() {
    let mut mesh = Mesh::new("obs", 1, vec!["log.format=\"json\"".into()]);
    mesh.start_cloud();
    mesh.create_tokens();
    let node = mesh.nodes[0].host.clone();
    // The server pod first: its bridge gives the node the address DNS listens on.
    let web = mesh.add_pod(0, "web");
    let o = web.ip.octets();
    let dns = Ipv4Addr::new(o[0], o[1], o[2], 1);
    mesh.nodes[0].extra = vec![
        format!("dns.listen=\"{dns}:53\""),
        // No repair during the test: the rules stay as the test leaves them.
        "proxy.reconcile_interval=\"1h\"".into(),
        "log.format=\"json\"".into(),
    ];
    mesh.start_node(0);
    mesh.wait_synced(0);
    mesh.serve(&web, "http", TARGET, "web");
    let client: Host = mesh.add_pod(0, "client");

    // Both scrapes parse and follow the rules before any traffic.
    let cloud0 = cloud_metrics(&mesh);
    let node0 = node_metrics(&mesh);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(build_version(&cloud0, "cloudcore"), version);
    assert_eq!(build_version(&node0, "edgemesh"), version);
    for (exp, name) in [
        (&cloud0, "cloudcore_process_start_time_seconds"),
        (&node0, "edgemesh_process_start_time_seconds"),
    ] {
        assert!(exp.sum(name, &[]) > 1.6e9, "{name} is a Unix time");
    }
    assert_eq!(cloud0.sum("cloudcore_hub_online_nodes", &[]), 1.0);
    assert_eq!(node0.sum("edgemesh_hub_connected", &[]), 1.0);

    // A sync change: a Service and its Endpoints, PUT through the API.
    let ep = [(web.ip.to_string(), "edge-0".to_string())];
    let refs: Vec<(&str, &str)> = ep.iter().map(|(i, n)| (i.as_str(), n.as_str())).collect();
    let ip = mesh.put_service("web", 80, TARGET, &[], &refs);
    // A DNS query from a pod, answered from the cluster records.
    let out = mesh.topo.exec(
        &client,
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            &format!("@{dns}"),
            "web.default.svc.cluster.local",
            "A",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ip, "dig");
    // An HTTP request through the proxy.
    let (s, body) = mesh.topo.curl(&client, &[&format!("http://{ip}/")]);
    assert_eq!((s, body.trim()), (200, "web"), "curl through the proxy");

    let cloud1 = cloud_metrics(&mesh);
    let node1 = node_metrics(&mesh);
    let moved = |before: &Exposition, after: &Exposition, name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (before.sum(name, labels), after.sum(name, labels));
        assert!(a > b, "{name}{labels:?} did not move: {b} -> {a}");
    };
    let put_service = [
        ("method", "PUT"),
        ("route", "/api/v1/namespaces/{ns}/services/{name}"),
        ("status", "201"),
    ];
    moved(
        &cloud0,
        &cloud1,
        "cloudcore_api_requests_total",
        &put_service,
    );
    let put_route = [put_service[0], put_service[1]];
    moved(
        &cloud0,
        &cloud1,
        "cloudcore_api_request_duration_seconds_count",
        &put_route,
    );
    moved(&cloud0, &cloud1, "cloudcore_hub_changes_sent_total", &[]);
    moved(&cloud0, &cloud1, "cloudcore_store_version", &[]);
    moved(&node0, &node1, "edgemesh_hub_changes_applied_total", &[]);
    moved(&node0, &node1, "edgemesh_meta_version", &[]);
    assert_eq!(
        node1.sum("edgemesh_meta_version", &[]),
        cloud1.sum("cloudcore_store_version", &[]),
        "the node holds the cloud's version"
    );
    moved(
        &node0,
        &node1,
        "edgemesh_dns_queries_total",
        &[("type", "A"), ("result", "NOERROR")],
    );
    moved(
        &node0,
        &node1,
        "edgemesh_dns_query_duration_seconds_count",
        &[("source", "cluster")],
    );
    let web_svc = ("service", "default/web");
    moved(
        &node0,
        &node1,
        "edgemesh_proxy_connections_total",
        &[web_svc, ("result", "forwarded")],
    );
    moved(
        &node0,
        &node1,
        "edgemesh_proxy_http_requests_total",
        &[web_svc, ("protocol", "http1"), ("class", "2xx")],
    );
    moved(
        &node0,
        &node1,
        "edgemesh_proxy_http_request_duration_seconds_count",
        &[web_svc],
    );
    assert_eq!(node1.sum("edgemesh_proxy_routes", &[]), 1.0);
    assert_eq!(node1.sum("edgemesh_meta_services", &[]), 1.0);

    // Alive: both answer /healthz.
    let (s, body) = mesh.topo.curl(&mesh.cloud, &[&mesh.api_url("/healthz")]);
    assert_eq!((s, body.trim()), (200, "ok"), "cloudcore /healthz");
    let (s, body) = mesh.admin(0, "/healthz");
    assert_eq!(s, 200, "edgemesh /healthz: {body}");

    // Ready, with each check named; the cloud's too.
    let (s, ready) = mesh.api("GET", "/readyz", None);
    assert_eq!(s, 200, "cloudcore /readyz: {ready}");
    assert_eq!(ready["ready"], true, "{ready}");
    for check in ["store", "listeners"] {
        assert_eq!(ready["checks"][check]["ok"], true, "{check}: {ready}");
    }
    let (s, ready) = mesh.admin(0, "/readyz");
    assert_eq!(s, 200, "edgemesh /readyz: {ready}");
    assert_eq!(ready["failed"], serde_json::json!([]), "{ready}");
    for check in ["store", "listeners", "iptables"] {
        assert_eq!(ready["checks"][check]["ok"], true, "{check}: {ready}");
    }
    assert_eq!(ready["connected"], true, "{ready}");
    let listeners = ready["checks"]["listeners"]["detail"]
        .as_str()
        .unwrap_or("");
    assert!(listeners.contains(&format!("dns {dns}:53")), "{ready}");

    // `edgemesh status` covers connection, versions, counts, rules, DNS, proxy and tunnel.
    let text = status(&mesh, false);
    let cloud_url = mesh.hub_url();
    for want in [
        format!("agent:       edgemesh {version}, ready"),
        format!("cloud:       connected to {cloud_url}"),
        "objects:     1 services, 1 endpoints".to_string(),
        format!("dns:         listening on {dns}:53"),
        "proxy:       listening on".to_string(),
        "iptables:    installed (".to_string(),
        "tunnel:      up".to_string(),
    ] {
        assert!(text.contains(&want), "`{want}` missing from:\n{text}");
    }
    let v: Value = serde_json::from_str(&status(&mesh, true)).expect("status --json");
    assert_eq!(v["agentVersion"], version, "{v}");
    assert_eq!(v["dns"], format!("{dns}:53"), "{v}");
    assert_eq!(v["status"]["connected"], true, "{v}");
    assert_eq!(
        v["store"]["version"],
        cloud1.sum("cloudcore_store_version", &[]) as u64
    );
    assert!(v["store"]["storeId"].as_str().is_some(), "{v}");
    let rules = &v["proxy"]["iptablesRules"];
    assert_eq!(rules["complete"], true, "{v}");
    assert_eq!(rules["present"], rules["expected"], "{v}");

    // Someone flushes the node's chain: the node is not ready and says why.
    let out = mesh.topo.exec(
        &node,
        &["iptables", "-t", "nat", "-F", "EDGEMESH-PREROUTING"],
    );
    assert!(out.status.success(), "iptables -F: {out:?}");
    let (s, ready) = mesh.admin(0, "/readyz");
    assert_eq!(s, 503, "edgemesh /readyz with the rules gone: {ready}");
    assert_eq!(ready["ready"], false, "{ready}");
    assert_eq!(ready["failed"], serde_json::json!(["iptables"]), "{ready}");
    assert_eq!(ready["checks"]["iptables"]["ok"], false, "{ready}");
    assert_eq!(ready["checks"]["listeners"]["ok"], true, "{ready}");
    let text = status(&mesh, false);
    assert!(text.contains("NOT READY (iptables: "), "{text}");
    assert!(text.contains("iptables:    incomplete"), "{text}");

    // Both processes logged JSON lines only (read once stopped: no half-written line).
    let node_proc = mesh.nodes[0].proc.expect("node running");
    mesh.stop_node(0, libc::SIGTERM);
    assert_json_log("edgemesh", &mesh.topo.log(node_proc));
    let cloud_proc = mesh.cloud_proc.expect("cloudcore running");
    mesh.stop_cloud(libc::SIGTERM);
    assert_json_log("cloudcore", &mesh.topo.log(cloud_proc));
}

/// Opens `n` TCP connections from inside `ns` to `addr` and keeps them silent.
fn silent_connections(ns: &str, addr: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    edgemesh_e2e::mesh::in_netns(ns, move || {
        (0..n)
            .map(|_| {
                let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                s
            })
            .collect()
    })
}

/// How a connection ends: `closed` when the server closed it, `open` while it is still up.
fn ends(mut s: std::net::TcpStream, within: Duration) -> &'static str {
    use std::io::Read;
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => "closed",
        Ok(_) => "data",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "closed",
        Err(_) => "open",
    }
}

#[test]
fn every_listener_bounds_its_peers_and_counts_the_limits_it_hits() {
    let mut mesh = Mesh::new(
        "limits",
        1,
        vec![
            "api.max_connections_per_peer=3".into(),
            "api.idle_timeout=\"2s\"".into(),
            "hub.max_handshakes_per_peer=2".into(),
            "hub.handshake_timeout=\"2s\"".into(),
        ],
    );
    mesh.start_cloud();
    mesh.create_tokens();
    mesh.nodes[0].extra = vec![
        "admin.max_connections=3".into(),
        "admin.idle_timeout=\"2s\"".into(),
    ];
    mesh.start_node(0);
    mesh.wait_synced(0);
    let node = mesh.nodes[0].host.clone();
    let api = std::net::SocketAddr::from((mesh.cloud.ip, edgemesh_e2e::mesh::API_PORT));
    let hub = std::net::SocketAddr::from((mesh.cloud.ip, edgemesh_e2e::mesh::HUB_PORT));
    let admin: std::net::SocketAddr = ADMIN.parse().expect("admin address");

    // Each listener in turn: `cap` silent connections from the node's address take what it may
    // hold, one more is closed at once, and the silent ones are closed after the timeout.
    // The REST API's cap is per address (another one, the cloud's own curl, is still served);
    // the hub's counts handshakes only (the node connected from the same address stays up).
    for (addr, cap, what) in [
        (api, 3, "REST API, api.max_connections_per_peer"),
        (hub, 2, "hub, hub.max_handshakes_per_peer"),
        (admin, 3, "admin API, admin.max_connections"),
    ] {
        let held = silent_connections(&node.ns, addr, cap);
        std::thread::sleep(Duration::from_millis(200));
        let extra = silent_connections(&node.ns, addr, 1).remove(0);
        assert_eq!(
            ends(extra, Duration::from_secs(1)),
            "closed",
            "over the cap: {what}"
        );
        if addr == api {
            let (s, _) = mesh.api("GET", "/api/v1/services", None);
            assert_eq!(s, 200, "other clients are served");
        }
        for c in held {
            assert_eq!(ends(c, Duration::from_secs(8)), "closed", "silent: {what}");
        }
    }
    assert_eq!(mesh.sync_status(0)["status"]["connects"], 1);

    // Every limit hit is counted, by limit.
    let cloud = cloud_metrics(&mesh);
    for (name, limit, at_least) in [
        (
            "cloudcore_api_limit_hits_total",
            "connections_per_peer",
            1.0,
        ),
        ("cloudcore_api_limit_hits_total", "idle_timeout", 3.0),
        (
            "cloudcore_hub_limit_hits_total",
            "connections_per_peer",
            1.0,
        ),
        ("cloudcore_hub_limit_hits_total", "handshake_timeout", 2.0),
    ] {
        let got = cloud.sum(name, &[("limit", limit)]);
        assert!(got >= at_least, "{name}{{limit={limit}}} = {got}");
    }
    let node_exp = node_metrics(&mesh);
    for (limit, at_least) in [("connections", 1.0), ("idle_timeout", 3.0)] {
        let got = node_exp.sum("edgemesh_admin_limit_hits_total", &[("limit", limit)]);
        assert!(
            got >= at_least,
            "edgemesh_admin_limit_hits_total{{limit={limit}}} = {got}"
        );
    }
}
