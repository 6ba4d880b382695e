//! Cluster DNS, end to end: real cloudcore and edgemesh processes in network namespaces, the
//! REST API driven with curl, and real `dig` run from a pod namespace behind the node against
//! the node's DNS. The forwarding tests run their own upstream (dnsmasq) inside the topology.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use edgemesh_e2e::dns::{
    endpoints, metric_sum, service, start_dnsmasq, Dig, DnsMesh, PodResolvConf,
};
use edgemesh_e2e::mesh::in_netns;
use edgemesh_e2e::wait_for;
use rand::{Rng, SeedableRng};

const HELLO: &str = "hello.default.svc.cluster.local";
const DB: &str = "db.default.svc.cluster.local";

/// Polls dig until `ok` holds for its answer; returns the answer and how long it took.
fn until(m: &DnsMesh, what: &str, args: &[&str], ok: impl Fn(&Dig) -> bool) -> (Dig, Duration) {
    let start = Instant::now();
    let d = wait_for(what, Duration::from_secs(10), || {
        let d = m.dig(args);
        ok(&d).then_some(d)
    });
    let took = start.elapsed();
    eprintln!("{what}: answered after {took:?}");
    (d, took)
}

/// Creates `hello` (10.96.0.10) and waits until the node answers it.
fn put_hello(m: &DnsMesh) {
    let v = m.put_service(
        "hello",
        &service("hello", "10.96.0.10", &[("http", "TCP", 80)]),
    );
    m.mesh.wait_version(0, v, Duration::from_secs(10));
    until(m, "hello", &[HELLO], |d| d.data("A") == ["10.96.0.10"]);
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[test]
fn every_record_kind_is_answered_from_a_pod() {
    let mut m = DnsMesh::new("dnsrec");
    m.mesh.nodes[0].extra.push("dns.ttl=\"7s\"".into());
    m.mesh.nodes[0].extra.push("dns.upstreams=[]".into());
    m.start();
    m.put_service(
        "hello",
        &service(
            "hello",
            "10.96.0.10",
            &[("http", "TCP", 80), ("dns", "UDP", 53)],
        ),
    );
    m.put_service("db", &service("db", "None", &[("pg", "TCP", 5432)]));
    let v = m.put_endpoints(
        "db",
        &endpoints(
            "db",
            &[
                ("10.244.1.20", Some("db-0")),
                ("10.244.1.21", Some("db-1")),
                ("10.244.1.22", None),
                ("fd00::20", Some("db-2")),
            ],
            &["10.244.1.23"],
            &[("pg", "TCP", 15432)],
        ),
    );
    m.mesh.wait_version(0, v, Duration::from_secs(10));
    let (_, _) = until(&m, "db endpoints", &[DB], |d| d.answers.len() == 3);
    let d = m.dig(&[DB, "AAAA"]);
    assert_eq!(d.data("AAAA"), ["fd00::20"], "{}", d.output);
    let d = m.dig(&["db-2.db.default.svc.cluster.local", "AAAA"]);
    assert_eq!(d.data("AAAA"), ["fd00::20"], "{}", d.output);
    let d = m.dig(&["db-2.db.default.svc.cluster.local", "A"]);
    assert_eq!(
        (d.status.as_str(), d.answers.len()),
        ("NOERROR", 0),
        "{}",
        d.output
    );

    // A for a cluster IP: authoritative, with the configured TTL and EDNS.
    let d = m.dig(&[HELLO]);
    assert_eq!(d.status, "NOERROR", "{}", d.output);
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
    assert!(d.has_flag("aa") && d.has_flag("qr"), "{}", d.output);
    assert_eq!(d.answers[0].ttl, 7, "{}", d.output);
    assert_eq!(d.edns_udp, Some(1232), "{}", d.output);
    assert_eq!(d.transport, "UDP");
    // Without EDNS there is no OPT record; over TCP the same answer.
    let d = m.dig(&["+noedns", HELLO]);
    assert_eq!(
        (d.data("A"), d.edns_udp),
        (vec!["10.96.0.10".into()], None),
        "{}",
        d.output
    );
    let d = m.dig(&["+tcp", HELLO]);
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
    assert_eq!(d.transport, "TCP");
    // Case does not matter.
    let d = m.dig(&["HeLLo.DEFAULT.Svc.Cluster.LOCAL"]);
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);

    // NODATA: the name exists, the type does not; the SOA says for how long.
    for t in ["AAAA", "TXT", "MX"] {
        let d = m.dig(&[HELLO, t]);
        assert_eq!(d.status, "NOERROR", "{t}: {}", d.output);
        assert!(d.answers.is_empty(), "{t}: {}", d.output);
        assert!(d.has_soa("cluster.local."), "{t}: {}", d.output);
    }
    // NXDOMAIN with the SOA for unknown names under the cluster domain.
    for name in [
        "nope.default.svc.cluster.local",
        "hello.nons.svc.cluster.local",
        "db-9.db.default.svc.cluster.local",
        "x.pod.cluster.local",
    ] {
        let d = m.dig(&[name]);
        assert_eq!(d.status, "NXDOMAIN", "{name}: {}", d.output);
        assert!(d.has_soa("cluster.local."), "{name}: {}", d.output);
        assert!(d.has_flag("aa"), "{name}: {}", d.output);
    }

    // SRV of a cluster-IP service: the service name, its port, its address in additional.
    let d = m.dig(&["_http._tcp.hello.default.svc.cluster.local", "SRV"]);
    assert_eq!(
        d.data("SRV"),
        ["0 100 80 hello.default.svc.cluster.local."],
        "{}",
        d.output
    );
    assert!(
        d.additional
            .iter()
            .any(|r| r.rtype == "A" && r.data == "10.96.0.10"),
        "{}",
        d.output
    );
    let d = m.dig(&["_dns._udp.hello.default.svc.cluster.local", "SRV"]);
    assert_eq!(
        d.data("SRV"),
        ["0 100 53 hello.default.svc.cluster.local."],
        "{}",
        d.output
    );
    let d = m.dig(&["_http._udp.hello.default.svc.cluster.local", "SRV"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.output);

    // Headless: the ready endpoints (not the not-ready one), each by hostname or dashed IP.
    let d = m.dig(&[DB]);
    assert_eq!(
        d.data("A"),
        sorted(&["10.244.1.20", "10.244.1.21", "10.244.1.22"]),
        "{}",
        d.output
    );
    let d = m.dig(&["db-1.db.default.svc.cluster.local"]);
    assert_eq!(d.data("A"), ["10.244.1.21"], "{}", d.output);
    let d = m.dig(&["10-244-1-22.db.default.svc.cluster.local"]);
    assert_eq!(d.data("A"), ["10.244.1.22"], "{}", d.output);
    let d = m.dig(&["_pg._tcp.db.default.svc.cluster.local", "SRV"]);
    assert_eq!(
        d.data("SRV"),
        sorted(&[
            "0 25 15432 10-244-1-22.db.default.svc.cluster.local.",
            "0 25 15432 db-0.db.default.svc.cluster.local.",
            "0 25 15432 db-1.db.default.svc.cluster.local.",
            "0 25 15432 db-2.db.default.svc.cluster.local.",
        ]),
        "{}",
        d.output
    );
    assert_eq!(
        d.additional.iter().filter(|r| r.rtype == "A").count(),
        3,
        "{}",
        d.output
    );
    assert_eq!(
        d.additional.iter().filter(|r| r.rtype == "AAAA").count(),
        1,
        "{}",
        d.output
    );

    // PTR for cluster IPs; the service CIDR's reverse names are the zone's.
    let d = m.dig(&["-x", "10.96.0.10"]);
    assert_eq!(
        d.data("PTR"),
        ["hello.default.svc.cluster.local."],
        "{}",
        d.output
    );
    let d = m.dig(&["-x", "10.96.0.99"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.output);
    assert!(d.has_soa("10.in-addr.arpa."), "{}", d.output);

    // No upstreams configured: other names are refused, not forwarded anywhere.
    let d = m.dig(&["www.example.test"]);
    assert_eq!(d.status, "REFUSED", "{}", d.output);

    // The metrics count what happened.
    let text = m.metrics();
    let a_ok = metric_sum(
        &text,
        "edgemesh_dns_queries_total",
        &["type=\"A\"", "result=\"NOERROR\""],
    );
    let nx = metric_sum(
        &text,
        "edgemesh_dns_queries_total",
        &["result=\"NXDOMAIN\""],
    );
    let srv = metric_sum(&text, "edgemesh_dns_queries_total", &["type=\"SRV\""]);
    assert!(
        a_ok >= 6.0 && nx >= 5.0 && srv >= 4.0,
        "{a_ok} {nx} {srv}\n{text}"
    );
    assert!(
        metric_sum(
            &text,
            "edgemesh_dns_query_duration_seconds_count",
            &["source=\"cluster\""]
        ) >= 20.0,
        "{text}"
    );
}

#[test]
fn a_headless_service_with_200_endpoints_truncates_over_udp_and_is_complete_over_tcp() {
    let mut m = DnsMesh::new("dns200");
    m.mesh.nodes[0].extra.push("dns.upstreams=[]".into());
    m.start();
    m.put_service("big", &service("big", "None", &[("http", "TCP", 80)]));
    let ips: Vec<String> = (1..=200)
        .map(|i| format!("10.1.{}.{}", i / 100, i % 100 + 1))
        .collect();
    let ready: Vec<(&str, Option<&str>)> = ips.iter().map(|ip| (ip.as_str(), None)).collect();
    let v = m.put_endpoints(
        "big",
        &endpoints("big", &ready, &[], &[("http", "TCP", 8080)]),
    );
    m.mesh.wait_version(0, v, Duration::from_secs(10));
    let big = "big.default.svc.cluster.local";
    until(&m, "200 endpoints over TCP", &["+tcp", big], |d| {
        d.answers.len() == 200
    });

    // UDP, EDNS (dig offers 1232 bytes) and without: TC set, and dig told not to retry.
    for extra in ["+edns=0", "+noedns"] {
        let d = m.dig(&["+ignore", "+notcp", extra, big]);
        assert_eq!(d.status, "NOERROR", "{extra}: {}", d.output);
        assert!(d.has_flag("tc"), "{extra}: {}", d.output);
        assert!(d.answers.len() < 200, "{extra}: {}", d.output);
        assert_eq!(d.transport, "UDP");
    }
    // TCP: all 200, no TC.
    let d = m.dig(&["+tcp", big]);
    assert!(!d.has_flag("tc"), "{}", d.output);
    let mut expected = ips.clone();
    expected.sort();
    assert_eq!(d.data("A"), expected);
    // A plain dig sees TC and asks again over TCP by itself.
    let d = m.dig(&[big]);
    assert_eq!(d.answers.len(), 200, "{}", d.output);
    assert_eq!(d.transport, "TCP", "{}", d.output);
    // SRV too: 200 targets with their addresses.
    let d = m.dig(&["+tcp", "_http._tcp.big.default.svc.cluster.local", "SRV"]);
    assert_eq!(d.data("SRV").len(), 200, "{}", d.output);
    assert!(
        d.data("SRV").iter().all(|s| s.contains(" 8080 ")),
        "{}",
        d.output
    );
    assert_eq!(d.additional.iter().filter(|r| r.rtype == "A").count(), 200);
}

#[test]
fn services_created_changed_and_deleted_are_answered_within_a_second() {
    let mut m = DnsMesh::new("dnslive");
    m.mesh.nodes[0].extra.push("dns.upstreams=[]".into());
    m.start();
    let name = "live.default.svc.cluster.local";
    let srv = "_http._tcp.live.default.svc.cluster.local";
    let d = m.dig(&[name]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.output);

    m.put_service(
        "live",
        &service("live", "10.96.0.50", &[("http", "TCP", 80)]),
    );
    let (d, took) = until(&m, "created service", &[name], |d| {
        d.data("A") == ["10.96.0.50"]
    });
    assert!(
        took < Duration::from_secs(1),
        "created: answered after {took:?}\n{}",
        d.output
    );

    m.put_service(
        "live",
        &service("live", "10.96.0.50", &[("http", "TCP", 8080)]),
    );
    let (d, took) = until(&m, "changed service", &[srv, "SRV"], |d| {
        d.data("SRV") == ["0 100 8080 live.default.svc.cluster.local."]
    });
    assert!(
        took < Duration::from_secs(1),
        "changed: answered after {took:?}\n{}",
        d.output
    );

    // A headless service follows its Endpoints.
    m.put_service("pods", &service("pods", "None", &[("http", "TCP", 80)]));
    let pods = "pods.default.svc.cluster.local";
    m.put_endpoints(
        "pods",
        &endpoints("pods", &[("10.1.0.1", None)], &[], &[("http", "TCP", 80)]),
    );
    let (d, took) = until(&m, "endpoints", &[pods], |d| d.data("A") == ["10.1.0.1"]);
    assert!(
        took < Duration::from_secs(1),
        "endpoints: answered after {took:?}\n{}",
        d.output
    );
    m.put_endpoints(
        "pods",
        &endpoints(
            "pods",
            &[("10.1.0.1", None), ("10.1.0.2", None)],
            &[],
            &[("http", "TCP", 80)],
        ),
    );
    let (d, took) = until(&m, "endpoint added", &[pods], |d| d.answers.len() == 2);
    assert!(
        took < Duration::from_secs(1),
        "endpoint added: answered after {took:?}\n{}",
        d.output
    );

    let (s, v) = m
        .mesh
        .api("DELETE", "/api/v1/namespaces/default/services/live", None);
    assert_eq!(s, 200, "{v}");
    let (d, took) = until(&m, "deleted service", &[name], |d| d.status == "NXDOMAIN");
    assert!(
        took < Duration::from_secs(1),
        "deleted: answered after {took:?}\n{}",
        d.output
    );
    let d = m.dig(&["-x", "10.96.0.50"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.output);
}

#[test]
fn other_names_are_forwarded_to_an_upstream_in_the_topology_and_cached() {
    let mut m = DnsMesh::new("dnsfwd");
    let up = m.mesh.topo.add_host("up");
    let upstream = start_dnsmasq(
        &mut m.mesh.topo,
        &up,
        "example.test",
        &[
            ("www.example.test", "192.0.2.10"),
            ("api.example.test", "192.0.2.11"),
        ],
        300,
    );
    m.mesh.nodes[0]
        .extra
        .push(format!("dns.upstreams=[\"{}\"]", up.ip));
    m.mesh.nodes[0]
        .extra
        .push("dns.upstream_timeout=\"1s\"".into());
    m.start();
    m.put_service(
        "hello",
        &service("hello", "10.96.0.10", &[("http", "TCP", 80)]),
    );

    let d = m.dig(&["www.example.test"]);
    assert_eq!(d.status, "NOERROR", "{}", d.output);
    assert_eq!(d.data("A"), ["192.0.2.10"], "{}", d.output);
    assert!(!d.has_flag("aa") && d.has_flag("ra"), "{}", d.output);
    assert!(
        d.answers[0].ttl <= 300 && d.answers[0].ttl > 200,
        "{}",
        d.output
    );
    // Over TCP, and with other case, from the cache.
    let d = m.dig(&["+tcp", "WWW.Example.TEST"]);
    assert_eq!(d.data("A"), ["192.0.2.10"], "{}", d.output);
    // Unknown names in the upstream's zone: its NXDOMAIN, with its SOA.
    let d = m.dig(&["nope.example.test"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.output);
    // Cluster names are still the node's own.
    until(&m, "hello", &[HELLO], |d| d.data("A") == ["10.96.0.10"]);
    let text = m.metrics();
    assert!(
        metric_sum(&text, "edgemesh_dns_cache_hits_total", &[]) >= 1.0,
        "{text}"
    );
    assert!(
        metric_sum(
            &text,
            "edgemesh_dns_query_duration_seconds_count",
            &["source=\"upstream\""]
        ) >= 2.0,
        "{text}"
    );

    // The upstream goes away: cached names still answer (with their TTL counting down), new
    // ones get SERVFAIL within dns.upstream_timeout, not a hang.
    m.mesh.topo.stop(upstream);
    let d = m.dig(&["www.example.test"]);
    assert_eq!(d.data("A"), ["192.0.2.10"], "{}", d.output);
    let d = m.dig(&["+time=5", "api.example.test"]);
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    let took = d.query_time_ms.expect("query time");
    eprintln!("SERVFAIL with the upstream stopped after {took} ms");
    assert!(
        took <= 1000 + 250,
        "SERVFAIL after {took} ms (timeout 1s)\n{}",
        d.output
    );
}

#[test]
fn an_unreachable_upstream_gives_servfail_within_the_timeout() {
    let mut m = DnsMesh::new("dnsdead");
    // On the hosts' subnet, but nobody has it: queries vanish (no ICMP comes back in time).
    m.mesh.nodes[0]
        .extra
        .push("dns.upstreams=[\"10.250.0.250\"]".into());
    m.mesh.nodes[0]
        .extra
        .push("dns.upstream_timeout=\"1500ms\"".into());
    m.start();
    for name in ["www.example.test", "other.example.test"] {
        let started = Instant::now();
        let d = m.dig(&["+time=8", name]);
        assert_eq!(d.status, "SERVFAIL", "{}", d.output);
        let took = d.query_time_ms.expect("query time");
        eprintln!("SERVFAIL with a black-holed upstream after {took} ms");
        assert!(
            took <= 1500 + 250,
            "SERVFAIL after {took} ms (timeout 1.5s)\n{}",
            d.output
        );
        assert!(started.elapsed() < Duration::from_secs(8));
    }
    // Meanwhile cluster names are answered at once.
    m.put_service(
        "hello",
        &service("hello", "10.96.0.10", &[("http", "TCP", 80)]),
    );
    until(&m, "hello", &[HELLO], |d| d.data("A") == ["10.96.0.10"]);
}

/// With the default settings the agent serves on 169.254.96.16, which it adds to `lo` and
/// removes when it stops; a crash leaves it, and the next start takes it over.
#[test]
fn cluster_names_resolve_with_the_cloud_down_after_an_agent_restart() {
    let mut m = DnsMesh::new("dnsoff");
    // Defaults: no dns.listen override.
    m.mesh.nodes[0].extra.clear();
    m.server = "169.254.96.16".into();
    let node_ns = m.mesh.nodes[0].host.ns.clone();
    let lo = |m: &DnsMesh| {
        let out = m.mesh.topo.exec(
            &m.mesh.nodes[0].host,
            &["ip", "-o", "-4", "addr", "show", "dev", "lo"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!lo(&m).contains("169.254.96.16"), "{node_ns}");
    m.start();
    assert!(lo(&m).contains("169.254.96.16/32"), "{}", lo(&m));
    assert!(lo(&m).contains("lo:edgemesh"), "{}", lo(&m));
    let v = m.put_service(
        "hello",
        &service("hello", "10.96.0.10", &[("http", "TCP", 80)]),
    );
    m.put_service("db", &service("db", "None", &[("pg", "TCP", 5432)]));
    m.put_endpoints(
        "db",
        &endpoints(
            "db",
            &[("10.244.1.20", Some("db-0"))],
            &[],
            &[("pg", "TCP", 5432)],
        ),
    );
    m.mesh.wait_version(0, v + 2, Duration::from_secs(10));
    until(&m, "hello", &[HELLO], |d| d.data("A") == ["10.96.0.10"]);

    // Cloud gone, agent restarted: everything still resolves from the node's own copy.
    m.mesh.stop_cloud(libc::SIGKILL);
    m.mesh.stop_node(0, libc::SIGTERM);
    assert!(
        !lo(&m).contains("169.254.96.16"),
        "removed on stop: {}",
        lo(&m)
    );
    m.mesh.start_node(0);
    let check = |m: &DnsMesh| {
        let d = m.dig(&[HELLO]);
        assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
        let d = m.dig(&["db-0.db.default.svc.cluster.local"]);
        assert_eq!(d.data("A"), ["10.244.1.20"], "{}", d.output);
        let d = m.dig(&["+tcp", "_pg._tcp.db.default.svc.cluster.local", "SRV"]);
        assert_eq!(
            d.data("SRV"),
            ["0 100 5432 db-0.db.default.svc.cluster.local."],
            "{}",
            d.output
        );
        let d = m.dig(&["-x", "10.96.0.10"]);
        assert_eq!(
            d.data("PTR"),
            ["hello.default.svc.cluster.local."],
            "{}",
            d.output
        );
    };
    check(&m);

    // A crash leaves the address; the next start adopts it (no error, no duplicate).
    m.mesh.stop_node(0, libc::SIGKILL);
    assert!(lo(&m).contains("lo:edgemesh"), "{}", lo(&m));
    m.mesh.start_node(0);
    check(&m);
    assert_eq!(lo(&m).matches("169.254.96.16").count(), 1, "{}", lo(&m));
    m.mesh.stop_node(0, libc::SIGTERM);
    assert!(!lo(&m).contains("169.254.96.16"), "{}", lo(&m));
}

/// A DNS query for `name`/A with `id`, as bytes.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = vec![
        (id >> 8) as u8,
        id as u8,
        0x01,
        0x00,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// What came back for one datagram, checked: only ever a DNS response to that query, never more
/// than the UDP limit, and a bare header when the query could not be parsed.
fn check_reply(sent: &[u8], reply: &[u8]) {
    assert!(
        reply.len() >= 12 && reply.len() <= 1232,
        "reply of {} bytes",
        reply.len()
    );
    assert_eq!(reply[..2], sent[..2], "reply to another id");
    assert!(reply[2] & 0x80 != 0, "not a response");
    let rcode = reply[3] & 0x0f;
    if rcode == 1 {
        assert_eq!(
            reply.len(),
            12,
            "FORMERR carries nothing but the header: {reply:?}"
        );
    }
}

#[test]
fn garbage_gets_no_crash_no_stray_bytes_and_the_server_keeps_answering() {
    let mut m = DnsMesh::new("dnsjunk");
    m.mesh.nodes[0].extra.push("dns.upstreams=[]".into());
    m.start();
    put_hello(&m);
    let pid = m.mesh.topo.pid(m.node_proc());
    let rss = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    };
    let rss_before = rss();
    let server: SocketAddr = format!("{}:53", m.server).parse().expect("addr");

    let (replies, answered) = in_netns(&m.pod.ns.clone(), move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(2)))
            .expect("timeout");
        let valid = query(0x4242, HELLO);
        let mut sent: Vec<Vec<u8>> = Vec::new();
        // Random bytes of every size, over and over.
        for _ in 0..20_000 {
            let len = rng.random_range(0..600);
            sent.push((0..len).map(|_| rng.random()).collect());
        }
        // Every truncation of a valid query.
        for cut in 0..valid.len() {
            sent.push(valid[..cut].to_vec());
        }
        // Labels longer than 63, a name longer than 255, a compression loop, a pointer past
        // the end, 65535 questions, a response (never answered), EDNS with a bogus option.
        let header = |qd: u16| {
            vec![
                0x13,
                0x37,
                0x01,
                0x00,
                (qd >> 8) as u8,
                qd as u8,
                0,
                0,
                0,
                0,
                0,
                0,
            ]
        };
        let mut p = header(1);
        p.push(0xff);
        p.extend(std::iter::repeat_n(b'a', 255));
        p.extend_from_slice(&[0, 0, 1, 0, 1]);
        sent.push(p);
        let mut p = header(1);
        for _ in 0..5 {
            p.push(63);
            p.extend(std::iter::repeat_n(b'b', 63));
        }
        p.extend_from_slice(&[0, 0, 1, 0, 1]);
        sent.push(p);
        let mut p = header(1);
        p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        sent.push(p);
        let mut p = header(1);
        p.extend_from_slice(&[0xc0, 0xff, 0, 1, 0, 1]);
        sent.push(p);
        let mut p = header(0xffff);
        p.extend_from_slice(&valid[12..]);
        sent.push(p);
        let mut p = valid.clone();
        p[2] |= 0x80;
        sent.push(p);
        let mut p = valid.clone();
        p[11] = 1;
        p.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 8, 0, 10, 0xff, 0xff, 1, 2]);
        sent.push(p);
        sent.push(vec![0xab; 60_000]);

        let mut replies = 0usize;
        let mut buf = [0u8; 65_536];
        for (i, packet) in sent.iter().enumerate() {
            sock.send_to(packet, server).expect("send");
            // Read what came back now and then, and check it belongs to what was sent.
            if i % 50 == 0 || packet.len() >= 12 && i >= 20_000 {
                while let Ok(n) = sock.recv(&mut buf) {
                    replies += 1;
                    let reply = &buf[..n];
                    if let Some(q) = sent[..=i]
                        .iter()
                        .rev()
                        .find(|q| q.len() >= 12 && q[..2] == reply[..2])
                    {
                        check_reply(q, reply);
                    }
                }
            }
        }
        while let Ok(n) = sock.recv(&mut buf) {
            replies += 1;
            assert!((12..=1232).contains(&n), "reply of {n} bytes");
        }
        // TCP: a length with nothing behind it, random bytes, a zero length, a huge length
        // then a close, many idle connections at once.
        for junk in [vec![0u8, 200], vec![0u8, 0], vec![0xff, 0xff, 1, 2, 3]] {
            let mut s = TcpStream::connect(server).expect("tcp connect");
            let _ = s.write_all(&junk);
            drop(s);
        }
        for _ in 0..20 {
            let mut s = TcpStream::connect(server).expect("tcp connect");
            let junk: Vec<u8> = (0..rng.random_range(1..3000))
                .map(|_| rng.random())
                .collect();
            let _ = s.write_all(&junk);
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            assert!(out.len() <= 2 + 65_535);
        }
        let idle: Vec<TcpStream> = (0..300)
            .filter_map(|_| TcpStream::connect(server).ok())
            .collect();
        // With the TCP slots taken, UDP still answers a real query.
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let q = query(0x7777, HELLO);
        sock.send_to(&q, server).expect("send");
        let mut answered = false;
        while let Ok(n) = sock.recv(&mut buf) {
            if buf[..2] == q[..2] {
                check_reply(&q, &buf[..n]);
                answered = buf[3] & 0x0f == 0 && buf[7] == 1;
                break;
            }
        }
        drop(idle);
        (replies, answered)
    });
    assert!(answered, "no answer to a real query after the garbage");
    assert!(replies > 0, "FORMERR answers expected for parsable headers");
    assert!(m.mesh.topo.is_running(m.node_proc()), "edgemesh died");
    // Still serving, over UDP and TCP.
    let d = m.dig(&[HELLO]);
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
    let d = m.dig(&["+tcp", HELLO]);
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
    // Nothing piles up: memory stays where it was, give or take allocator slack.
    let rss_after = rss();
    eprintln!("edgemesh RSS {rss_before} kB before the garbage, {rss_after} kB after");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} kB to {rss_after} kB"
    );
    let text = m.metrics();
    assert!(
        metric_sum(&text, "edgemesh_dns_queries_total", &["result=\"FORMERR\""]) >= 1.0,
        "{text}"
    );
}

#[test]
fn kubernetes_conformance_dns_version_pod_ptr_external_names_and_unready_endpoints() {
    let mut m = DnsMesh::new("dnsk8s");
    // A server pod beside the client, and an upstream that names it api.example.test.
    let node = m.mesh.nodes[0].host.clone();
    let srv = m.mesh.topo.add_pod(&node, "srv");
    let up = m.mesh.topo.add_host("up");
    let srv_ip = srv.ip.to_string();
    start_dnsmasq(
        &mut m.mesh.topo,
        &up,
        "example.test",
        &[("api.example.test", &srv_ip)],
        300,
    );
    m.mesh.nodes[0]
        .extra
        .push(format!("dns.upstreams=[\"{}\"]", up.ip));
    m.start();
    m.mesh.serve(&srv, "http", 8080, "api");
    let _resolv = PodResolvConf::new(&m.pod, &m.server);
    m.put_service(
        "hello",
        &service("hello", "10.96.0.10", &[("http", "TCP", 80)]),
    );

    // dns-version TXT.
    let d = m.dig(&["dns-version.cluster.local", "TXT"]);
    assert_eq!(d.data("TXT"), ["\"1.1.0\""], "{}", d.output);
    assert!(d.has_flag("aa"), "{}", d.output);

    // PTR for headless endpoints with a hostname, IPv4 and IPv6; not for the others.
    let pg = [("pg", "TCP", 5432)];
    m.put_service("db", &service("db", "None", &pg));
    let named = [
        ("10.244.1.21", Some("db-0")),
        ("fd00::21", Some("db-1")),
        ("10.244.1.22", None),
    ];
    let v = m.put_endpoints("db", &endpoints("db", &named, &["10.244.1.23"], &pg));
    m.mesh.wait_version(0, v, Duration::from_secs(10));
    let d = m.dig(&["-x", "10.244.1.21"]);
    assert_eq!(
        d.data("PTR"),
        ["db-0.db.default.svc.cluster.local."],
        "{}",
        d.output
    );
    assert!(d.has_flag("aa"), "{}", d.output);
    let d = m.dig(&["-x", "fd00::21"]);
    assert_eq!(
        d.data("PTR"),
        ["db-1.db.default.svc.cluster.local."],
        "{}",
        d.output
    );

    // The legacy tolerate-unready annotation publishes not-ready addresses, like
    // publishNotReadyAddresses; without either they stay out.
    let d = m.dig(&[DB]);
    assert_eq!(d.answers.len(), 2, "ready only: {}", d.output);
    let mut warm: serde_json::Value =
        serde_json::from_str(&service("db", "None", &pg)).expect("json");
    warm["metadata"]["annotations"]["service.alpha.kubernetes.io/tolerate-unready-endpoints"] =
        "true".into();
    m.put_service("db", &warm.to_string());
    let (d, _) = until(&m, "not-ready published", &[DB], |d| d.answers.len() == 3);
    assert!(
        d.data("A").contains(&"10.244.1.23".to_string()),
        "{}",
        d.output
    );

    // ExternalName: no cluster IP, no route in the proxy; DNS answers a CNAME and the
    // target's address (asked of the upstream), and a real client reaches the target.
    let ext = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"ext","namespace":"default"},"spec":{"type":"ExternalName","externalName":"api.example.test","ports":[{"port":8080}]}}"#;
    m.put_service("ext", ext);
    let (s, v) = m
        .mesh
        .api("GET", "/api/v1/namespaces/default/services/ext", None);
    assert_eq!(s, 200, "{v}");
    assert!(
        v["spec"]["clusterIP"].as_str().unwrap_or("").is_empty(),
        "{v}"
    );
    let ext_name = "ext.default.svc.cluster.local";
    let (d, _) = until(&m, "ExternalName", &[ext_name], |d| !d.answers.is_empty());
    assert_eq!(d.status, "NOERROR", "{}", d.output);
    assert_eq!(d.data("CNAME"), ["api.example.test."], "{}", d.output);
    assert_eq!(d.data("A"), [srv_ip.as_str()], "{}", d.output);
    let d = m.dig(&[ext_name, "CNAME"]);
    assert_eq!(d.data("CNAME"), ["api.example.test."], "{}", d.output);
    assert!(d.data("A").is_empty(), "{}", d.output);
    let (s, routes) = m.mesh.admin(0, "/debug/routes");
    assert_eq!(s, 200);
    assert!(
        routes["routes"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["service"] != "default/ext:8080")),
        "{routes}"
    );
    let (status, body) = m
        .mesh
        .topo
        .curl(&m.pod, &["--max-time", "5", "http://ext:8080/"]);
    assert_eq!((status, body.trim()), (200, "api"), "curl http://ext:8080/");
    // An ExternalName naming a cluster Service is followed inside the zone.
    let alias = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"alias","namespace":"default"},"spec":{"type":"ExternalName","externalName":"hello.default.svc.cluster.local"}}"#;
    m.put_service("alias", alias);
    let (d, _) = until(
        &m,
        "in-cluster alias",
        &["alias.default.svc.cluster.local"],
        |d| !d.answers.is_empty(),
    );
    assert_eq!(
        d.data("CNAME"),
        ["hello.default.svc.cluster.local."],
        "{}",
        d.output
    );
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);

    // A dual-stack manifest on this single-stack cluster is refused, naming the field, through
    // the API and through `apply`; nothing is stored.
    let dual = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"dual","namespace":"default"},"spec":{"ipFamilyPolicy":"RequireDualStack","ipFamilies":["IPv6","IPv4"],"ports":[{"port":80}]}}"#;
    let (s, v) = m.mesh.api(
        "PUT",
        "/api/v1/namespaces/default/services/dual",
        Some(dual),
    );
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["field"], "spec.ipFamilyPolicy", "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("not configured for dual-stack")),
        "{v}"
    );
    let v6 = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"dual","namespace":"default"},"spec":{"ipFamilies":["IPv6"],"ports":[{"port":80}]}}"#;
    let (s, v) = m.mesh.api("POST", "/api/v1/apply", Some(v6));
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["field"], "spec.ipFamilies[0]", "{v}");
    let (s, _) = m
        .mesh
        .api("GET", "/api/v1/namespaces/default/services/dual", None);
    assert_eq!(s, 404);
}

#[test]
fn dns_over_tcp_keeps_answering_while_a_pod_holds_hundreds_of_idle_connections() {
    let mut m = DnsMesh::new("dnsidle");
    m.mesh.nodes[0].extra.push("dns.upstreams=[]".into());
    let node = m.mesh.nodes[0].host.clone();
    let other = m.mesh.topo.add_pod(&node, "other");
    m.start();
    put_hello(&m);
    let server: SocketAddr = format!("{}:53", m.server).parse().expect("addr");

    // A pod opens 300 connections and sends nothing.
    let mut idle: Vec<TcpStream> = in_netns(&m.pod.ns.clone(), move || {
        (0..300)
            .map(|_| TcpStream::connect_timeout(&server, Duration::from_secs(2)).expect("connect"))
            .collect()
    });
    // TCP queries still get answers: from that pod, from another, and UDP is unaffected.
    for (who, pod) in [("the same pod", &m.pod), ("another pod", &other)] {
        for args in [&["+tcp", HELLO][..], &[HELLO][..]] {
            let d = edgemesh_e2e::dns::dig(&m.mesh.topo, pod, &m.server, args);
            assert_eq!(d.data("A"), ["10.96.0.10"], "{who} {args:?}: {}", d.output);
        }
    }
    // Every one of the idle connections is closed by the server (to make room, or idle).
    let start = Instant::now();
    let mut open = idle.len();
    while open > 0 && start.elapsed() < Duration::from_secs(20) {
        open = 0;
        for s in &mut idle {
            s.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
            let mut b = [0u8; 1];
            if let Err(e) = s.read(&mut b) {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    open += 1;
                }
            }
        }
    }
    eprintln!(
        "all idle DNS/TCP connections closed after {:?}",
        start.elapsed()
    );
    assert_eq!(open, 0, "idle connections left open");
    let text = m.metrics();
    let hits = |limit: &str| {
        metric_sum(
            &text,
            "edgemesh_dns_limit_hits_total",
            &[&format!("limit=\"{limit}\"")],
        )
    };
    assert!(hits("tcp_per_client") >= 268.0, "{text}");
    assert!(hits("tcp_idle") >= 1.0, "{text}");
    // And the server is still there for the next one.
    let d = m.dig(&["+tcp", HELLO]);
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
}
