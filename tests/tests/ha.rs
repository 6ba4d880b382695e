//! A highly available cloud end to end: three etcd members (data on tmpfs), three cloudcore
//! replicas sharing them, four edge nodes spread over the replicas. What an operator relies
//! on: one store and history whatever replica is written to, streams between nodes held by
//! different replicas, takeover when a replica, an etcd member or a replica's link to etcd
//! dies, and cluster-wide admission, revocation and cluster IPs.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use edgemesh_e2e::ha::{Ha, ROUTER_PORT};
use edgemesh_e2e::mesh::{echo_transfer, endpoints_json, ep_path, service_json, svc_path};
use edgemesh_e2e::wait_for;
use serde_json::{json, Value};

const ECHO: u16 = 7000;
const WEB: u16 = 8080;

/// Node `i`'s sync counters: (snapshots, deltas).
fn syncs(ha: &Ha, i: usize) -> (u64, u64) {
    let v = ha.mesh.sync_status(i);
    (
        v["status"]["snapshots"].as_u64().unwrap_or(0),
        v["status"]["deltas"].as_u64().unwrap_or(0),
    )
}

/// Every running node holds exactly what the cloud holds, with its version and chain.
fn assert_converged(ha: &Ha, timeout: Duration) {
    let live = (0..ha.replicas.len())
        .find(|r| ha.replicas[*r].proc.is_some())
        .expect("a replica runs");
    let cloud = wait_for("the cloud's state settles", timeout, || {
        let a = ha.cloud_state(live);
        (a.version > 0 && a == ha.cloud_state(live)).then_some(a)
    });
    ha.wait_nodes_at(cloud.version, timeout);
    for i in 0..ha.mesh.nodes.len() {
        if ha.mesh.nodes[i].proc.is_none() {
            continue;
        }
        let node = wait_for(
            &format!("{} equals the cloud", ha.mesh.nodes[i].name),
            timeout,
            || {
                let n = ha.node_state(i);
                (n.version == cloud.version).then_some(n)
            },
        );
        assert_eq!(
            node.chain, cloud.chain,
            "{}: history chain",
            ha.mesh.nodes[i].name
        );
        assert_eq!(
            node.objects, cloud.objects,
            "{}: objects, byte for byte",
            ha.mesh.nodes[i].name
        );
    }
}

#[test]
fn replicas_share_one_store_relay_between_each_other_and_take_over() {
    let mut ha = Ha::start("ha-main", 3, 4);
    // edge-0 and edge-3 on r0, edge-1 on r1, edge-2 on r2; every replica sees the same.
    for (i, want) in ["r0", "r1", "r2", "r0"].iter().enumerate() {
        assert_eq!(ha.wait_held(i, Duration::from_secs(10)), *want);
    }
    let (s, nodes) = ha.api(2, "GET", "/api/v1/nodes", None);
    assert_eq!(s, 200);
    let items = nodes["items"].as_array().expect("items");
    assert!(
        items.iter().all(|n| n["status"]["online"] == true),
        "{nodes}"
    );

    // 1. Objects written through every replica reach every node, with the store's history.
    for k in 0..12 {
        let r = k % 3;
        let (s, v) = ha.api(
            r,
            "PUT",
            &svc_path(&format!("s{k}")),
            Some(&service_json(&format!("s{k}"), 80, 8080)),
        );
        assert!(s == 200 || s == 201, "PUT through r{r}: {s} {v}");
    }
    assert_converged(&ha, Duration::from_secs(15));

    // 2. A pod on edge-1 (r1) calls an echo Service on edge-2 (r2): relayed r1 → r2, 200 MB
    // each way intact; then a router call through r2's ingress reaches a pod on edge-0 (r0).
    let server = ha.mesh.add_pod(2, "echo");
    ha.mesh.serve(&server, "echo", ECHO, "echo");
    let ip = server.ip.to_string();
    ha.api(
        0,
        "PUT",
        &svc_path("echo"),
        Some(&service_json("echo", 7000, ECHO)),
    );
    let v = ha.mesh.put(
        &ep_path("echo"),
        &endpoints_json("echo", ECHO, &[(&ip, "edge-2")]),
    );
    ha.wait_nodes_at(v, Duration::from_secs(10));
    let cluster_ip = ha.mesh.cluster_ip("echo");
    let client = ha.mesh.add_pod(1, "client");
    let addr: std::net::SocketAddr = format!("{cluster_ip}:7000").parse().expect("addr");
    let started = Instant::now();
    echo_transfer(&client.ns, addr, 200 << 20);
    eprintln!("200 MB each way through r1 → r2 in {:?}", started.elapsed());

    let web = ha.mesh.add_pod(0, "web");
    ha.mesh.serve(&web, "http", WEB, "hello from edge-0");
    ha.api(
        1,
        "PUT",
        &svc_path("web"),
        Some(&service_json("web", 80, WEB)),
    );
    let v = ha.mesh.put(
        &ep_path("web"),
        &endpoints_json("web", WEB, &[(&web.ip.to_string(), "edge-0")]),
    );
    ha.wait_nodes_at(v, Duration::from_secs(10));
    for body in [
        json!({"type": "rest", "name": "cloud-rest"}),
        json!({"type": "service", "name": "mesh"}),
    ] {
        let (s, v) = ha.api(
            1,
            "POST",
            "/api/v1/router/endpoints",
            Some(&body.to_string()),
        );
        assert_eq!(s, 201, "{v}");
    }
    let rule = json!({"name": "to-web", "source": "cloud-rest", "source_resource": {"path": "/web"},
        "target": "mesh", "target_resource": {"namespace": "default", "name": "web", "port": 80}});
    let (s, v) = ha.api(1, "POST", "/api/v1/router/rules", Some(&rule.to_string()));
    assert_eq!(s, 201, "{v}");
    let ingress = format!("http://{}:{ROUTER_PORT}/web/", ha.replicas[2].host.ip);
    let r2 = ha.replicas[2].host.clone();
    wait_for(
        "a router call through r2 reaches edge-0 on r0",
        Duration::from_secs(10),
        || {
            let (s, body) = ha.mesh.topo.curl(&r2, &["--max-time", "5", &ingress]);
            (s == 200 && body.trim() == "hello from edge-0").then_some(())
        },
    );

    // Rule counters add up across the replicas that routed.
    let rule_id = v["id"].as_str().expect("rule id").to_string();
    let count = |r: usize| {
        let (s, rule) = ha.api(r, "GET", &format!("/api/v1/router/rules/{rule_id}"), None);
        assert_eq!(s, 200, "{rule}");
        rule["success_messages"].as_u64().unwrap_or(0)
    };
    let settled = wait_for("counters settle", Duration::from_secs(15), || {
        let c = count(0);
        (c >= 1 && (0..3).all(|r| count(r) == c)).then_some(c)
    });
    for r in [0, 2, 2] {
        let host = ha.replicas[r].host.clone();
        let url = format!("http://{}:{ROUTER_PORT}/web/", host.ip);
        let (s, body) = ha.mesh.topo.curl(&host, &["--max-time", "5", &url]);
        assert_eq!(s, 200, "router through r{r}: {body}");
    }
    wait_for(
        "every replica counts all calls",
        Duration::from_secs(20),
        || (0..3).all(|r| count(r) == settled + 3).then_some(()),
    );

    // 5. Concurrent Services through three replicas get distinct cluster IPs; two PUTs with
    // the same resourceVersion on two replicas: exactly one wins.
    let hosts: Vec<_> = ha.replicas.iter().map(|r| r.host.clone()).collect();
    let per_replica = 100;
    std::thread::scope(|scope| {
        for (r, host) in hosts.iter().enumerate() {
            let ha = &ha;
            scope.spawn(move || {
                for k in 0..per_replica {
                    let name = format!("c{r}-{k}");
                    let (s, v) = ha.mesh.api_at(
                        host,
                        "PUT",
                        &svc_path(&name),
                        Some(&service_json(&name, 80, 80)),
                    );
                    assert!(s == 200 || s == 201, "PUT {name} through r{r}: {s} {v}");
                }
            });
        }
    });
    let (s, list) = ha.api(0, "GET", "/api/v1/services", None);
    assert_eq!(s, 200);
    let ips: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|s| {
            s["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with('c'))
        })
        .filter_map(|s| s["spec"]["clusterIP"].as_str())
        .collect();
    assert_eq!(ips.len(), 3 * per_replica);
    assert_eq!(
        ips.iter().collect::<HashSet<_>>().len(),
        3 * per_replica,
        "distinct cluster IPs"
    );

    let (_, current) = ha.api(0, "GET", &svc_path("s0"), None);
    let rv = current["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let results: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = [0usize, 1]
            .into_iter()
            .map(|r| {
                let ha = &ha;
                let mut body = current.clone();
                body["metadata"]["labels"] = json!({"writer": format!("r{r}")});
                body["metadata"]["resourceVersion"] = Value::String(rv.clone());
                scope.spawn(move || ha.api(r, "PUT", &svc_path("s0"), Some(&body.to_string())).0)
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("put"))
            .collect()
    });
    assert_eq!(
        results.iter().filter(|s| **s == 200).count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|s| **s == 409).count(),
        1,
        "{results:?}"
    );

    // 6. A token revoked on r2 kicks edge-1 (on r1) within 2 s, and it cannot come back.
    let (s, v) = ha.api(2, "DELETE", "/api/v1/nodes/edge-1/token", None);
    assert_eq!(s, 200, "{v}");
    let revoked = Instant::now();
    wait_for("edge-1 disconnected", Duration::from_secs(2), || {
        (ha.mesh.sync_status(1)["status"]["connected"] == false).then_some(())
    });
    eprintln!("revoked on r2, edge-1 off r1 after {:?}", revoked.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ha.mesh.sync_status(1)["status"]["connected"], false);
    for r in 0..3 {
        assert_eq!(ha.holder(r, 1), None, "r{r} shows edge-1 offline");
    }
    // A new token (issued through r0) brings it back.
    ha.mesh.stop_node(1, libc::SIGTERM);
    ha.mesh.nodes[1].token = ha.mesh.create_token("edge-1");
    ha.spawn_node_on(1, 1);
    ha.mesh.wait_synced(1);

    // 3. SIGKILL of r2 while a long stream runs through it (edge-3 on r0 → edge-2 on r2):
    // the stream fails promptly, edge-2 resumes by delta elsewhere within 3 s, new calls work.
    let client3 = ha.mesh.add_pod(3, "client3");
    let ns = client3.ns.clone();
    let long = std::thread::spawn(move || {
        let started = Instant::now();
        let r = std::panic::catch_unwind(|| echo_transfer(&ns, addr, 2 << 30));
        (r.is_ok(), started.elapsed())
    });
    std::thread::sleep(Duration::from_secs(2));
    let before = syncs(&ha, 2);
    let connects = ha.mesh.sync_status(2)["status"]["connects"]
        .as_u64()
        .unwrap_or(0);
    let killed = Instant::now();
    ha.kill_replica(2, libc::SIGKILL);
    // A change while edge-2 is between replicas: it resumes with a delta.
    ha.api(
        0,
        "PUT",
        &svc_path("moved"),
        Some(&service_json("moved", 80, 80)),
    );
    let (completed, _) = long.join().expect("stream thread");
    let failed_after = killed.elapsed();
    assert!(
        !completed,
        "a 2 GiB stream through a killed replica cannot complete"
    );
    assert!(
        failed_after < Duration::from_secs(10),
        "the stream failed after {failed_after:?}"
    );
    wait_for(
        "edge-2 back on another replica",
        Duration::from_secs(3),
        || {
            let s = ha.mesh.sync_status(2);
            (s["status"]["synced"] == true && s["status"]["connects"].as_u64() > Some(connects))
                .then_some(())
        },
    );
    let resumed = killed.elapsed();
    let after = syncs(&ha, 2);
    assert_eq!(after.0, before.0, "no snapshot after the move");
    let mode = ha.mesh.sync_status(2)["status"]["lastSync"]["mode"].clone();
    assert!(
        after.1 > before.1 || mode == "current",
        "resumed by delta (or nothing was missed): {before:?} → {after:?}, {mode}"
    );
    eprintln!(
        "edge-2 resynced {resumed:?} after r2 was killed; the stream failed after {failed_after:?}"
    );
    let held = ha.wait_held(2, Duration::from_secs(10));
    assert_ne!(held, "r2");
    echo_transfer(&client3.ns, addr, 1 << 20);
    assert_converged(&ha, Duration::from_secs(15));
}

/// `curl -X METHOD` against a replica's API from inside its namespace, without borrowing the
/// mesh (the chaos loop kills and restarts processes meanwhile); the status, 0 on no answer.
fn call(ns: &str, ip: &str, method: &str, path: &str, body: &str) -> u16 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--max-time", "5", "-X", method])
        .args([
            "-H",
            &format!("Authorization: Bearer {}", edgemesh_e2e::ha::API_TOKEN),
        ])
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ])
        .arg(format!("http://{ip}:10002{path}"))
        .output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Sets the writer's stop flag when dropped: a failed assertion in the scope that runs a
/// writer must not leave `thread::scope` waiting for a loop that never ends.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// A small xorshift generator: the chaos is replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn etcd_failures_and_chaos_leave_every_node_equal_to_the_store() {
    let mut ha = Ha::start("ha-chaos", 3, 4);
    let hosts: Vec<(String, String)> = ha
        .replicas
        .iter()
        .map(|r| (r.host.ns.clone(), r.host.ip.to_string()))
        .collect();

    // 4. SIGKILL of the etcd leader during a stream of writes: every acknowledged write is
    // kept, and writes resume within 3 s.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (acked, gaps) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut acked = Vec::new();
            let mut last_ok = Instant::now();
            let mut longest = Duration::ZERO;
            let mut k = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let (ns, ip) = &hosts[k % hosts.len()];
                let name = format!("w{k}");
                let s = call(
                    ns,
                    ip,
                    "PUT",
                    &svc_path(&name),
                    &service_json(&name, 80, 80),
                );
                if s == 200 || s == 201 {
                    longest = longest.max(last_ok.elapsed());
                    last_ok = Instant::now();
                    acked.push(name);
                }
                k += 1;
            }
            (acked, longest)
        });
        let stopping = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_secs(2));
        let leader = wait_for("an etcd leader", Duration::from_secs(10), || {
            ha.etcd_leader()
        });
        eprintln!("killing etcd leader e{leader}");
        ha.stop_member(leader, libc::SIGKILL);
        std::thread::sleep(Duration::from_secs(6));
        drop(stopping);
        let result = writer.join().expect("writer");
        ha.start_member(leader);
        result
    });
    eprintln!(
        "{} writes acknowledged; longest gap between two: {gaps:?}",
        acked.len()
    );
    assert!(gaps < Duration::from_secs(3), "writes stalled for {gaps:?}");
    assert!(acked.len() > 20, "{}", acked.len());
    for name in &acked {
        let (s, v) = ha.api(1, "GET", &svc_path(name), None);
        assert_eq!(s, 200, "acknowledged {name} is lost: {v}");
    }
    assert_converged(&ha, Duration::from_secs(20));

    // 7. A replica cut off from etcd closes its sessions, fails /readyz, and its nodes move.
    assert_eq!(ha.wait_held(1, Duration::from_secs(10)), "r1");
    ha.cut_from_etcd(1, true);
    let cut = Instant::now();
    wait_for("r1 not ready", Duration::from_secs(15), || {
        (ha.readyz(1).0 == 503).then_some(())
    });
    let (_, ready) = ha.readyz(1);
    assert!(ready["failed"].to_string().contains("cluster"), "{ready}");
    let (s, v) = ha.api(0, "GET", "/api/v1/nodes/edge-1", None);
    assert_eq!(s, 200);
    let moved = wait_for("edge-1 moved off r1", Duration::from_secs(20), || {
        let held = ha.holder(0, 1)?;
        (held != "r1").then_some(held)
    });
    eprintln!(
        "r1 cut from etcd: edge-1 on {moved} after {:?} ({v})",
        cut.elapsed()
    );
    ha.cut_from_etcd(1, false);
    ha.wait_replica_ready(1);

    // 8. Chaos: replicas, etcd members and nodes killed at random while changes stream in.
    let seed = std::env::var("HA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::random::<u64>() | 1);
    eprintln!("chaos seed {seed} (replay with HA_SEED={seed})");
    let mut rng = Rng(seed);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut writer_rng = Rng(seed.rotate_left(17) | 1);
    let applied = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut ok = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let (ns, ip) = &hosts[writer_rng.below(3) as usize];
                let name = format!("x{}", writer_rng.below(60));
                let s = match writer_rng.below(4) {
                    0 => call(ns, ip, "DELETE", &svc_path(&name), ""),
                    1 => {
                        let addr = format!("10.244.9.{}", 2 + writer_rng.below(200));
                        call(
                            ns,
                            ip,
                            "PUT",
                            &ep_path(&name),
                            &endpoints_json(&name, 80, &[(&addr, "edge-0")]),
                        )
                    }
                    _ => {
                        let mut svc: Value =
                            serde_json::from_str(&service_json(&name, 80, 80)).expect("json");
                        svc["metadata"]["labels"] = json!({"v": writer_rng.next().to_string()});
                        call(ns, ip, "PUT", &svc_path(&name), &svc.to_string())
                    }
                };
                if s == 200 || s == 201 {
                    ok += 1;
                }
            }
            ok
        });
        let stopping = StopOnDrop(&stop);
        let until = Instant::now() + Duration::from_secs(25);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
            match rng.below(3) {
                0 => {
                    let r = rng.below(3) as usize;
                    eprintln!("chaos: SIGKILL replica r{r}");
                    ha.kill_replica(r, libc::SIGKILL);
                    std::thread::sleep(Duration::from_millis(rng.below(2000)));
                    ha.spawn_replica(r);
                }
                1 => {
                    let m = rng.below(3) as usize;
                    eprintln!("chaos: SIGKILL etcd member e{m}");
                    ha.stop_member(m, libc::SIGKILL);
                    std::thread::sleep(Duration::from_millis(rng.below(2000)));
                    ha.start_member(m);
                }
                _ => {
                    let i = rng.below(4) as usize;
                    eprintln!("chaos: SIGKILL node edge-{i}");
                    ha.mesh.stop_node(i, libc::SIGKILL);
                    std::thread::sleep(Duration::from_millis(rng.below(2000)));
                    ha.mesh.spawn_node(i);
                }
            }
        }
        drop(stopping);
        writer.join().expect("writer")
    });
    eprintln!("chaos: {applied} changes applied");
    assert!(applied > 100, "only {applied} changes went through");
    for r in 0..3 {
        ha.wait_replica_ready(r);
    }
    for i in 0..4 {
        ha.mesh.wait_node_alive(i);
    }
    assert_converged(&ha, Duration::from_secs(30));
}
