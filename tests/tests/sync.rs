//! Cloud → edge metadata sync, end to end: real cloudcore and edgemesh processes in network
//! namespaces, the REST API driven with curl, node state read from each node's admin API and
//! SQLite file.

use std::time::{Duration, Instant};

use edgemesh_e2e::mesh::{
    cloud_objects, endpoints_json, ep_path, in_netns, node_objects, service_json, svc_path, Mesh,
};
use edgemesh_e2e::wait_for;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Names of the services a node's admin API lists.
fn node_services(mesh: &Mesh, i: usize) -> Vec<(String, Value)> {
    let (s, v) = mesh.admin(i, "/debug/services");
    assert_eq!(s, 200, "{v}");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|s| {
            (
                s["metadata"]["name"].as_str().unwrap_or("").to_string(),
                s.clone(),
            )
        })
        .collect()
}

/// Waits until every node's SQLite store holds exactly the cloud's objects, byte for byte.
fn assert_converged(mesh: &Mesh, timeout: Duration) {
    let (cloud_version, cloud) = cloud_objects(&mesh.cloud_db());
    for i in 0..mesh.nodes.len() {
        let start = Instant::now();
        loop {
            let (version, objects) = node_objects(&mesh.node_db(i));
            if version == cloud_version && objects == cloud {
                break;
            }
            if start.elapsed() > timeout {
                let missing: Vec<_> = cloud
                    .keys()
                    .filter(|k| objects.get(*k) != cloud.get(*k))
                    .collect();
                let extra: Vec<_> = objects.keys().filter(|k| !cloud.contains_key(*k)).collect();
                panic!(
                    "node {i} did not converge: version {version} vs cloud {cloud_version}; differing {missing:?}; extra {extra:?}\nsync: {}",
                    mesh.sync_status(i)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn services_and_endpoints_reach_every_node_and_follow_updates_and_deletes() {
    let mesh = Mesh::start("crud", 2);
    let v = mesh.put(&svc_path("hello"), &service_json("hello", 80, 8080));
    mesh.put(
        &ep_path("hello"),
        &endpoints_json(
            "hello",
            8080,
            &[("10.1.0.5", "edge-0"), ("10.1.0.6", "edge-1")],
        ),
    );
    for i in 0..2 {
        mesh.wait_version(i, v + 1, Duration::from_secs(5));
        let services = node_services(&mesh, i);
        let (_, hello) = services
            .iter()
            .find(|(n, _)| n == "hello")
            .expect("hello on the node");
        assert_eq!(hello["spec"]["ports"][0]["targetPort"], 8080);
        let (_, eps) = mesh.admin(i, "/debug/endpoints");
        assert_eq!(
            eps["items"][0]["subsets"][0]["addresses"]
                .as_array()
                .map(Vec::len),
            Some(2),
            "{eps}"
        );
    }
    assert_converged(&mesh, Duration::from_secs(5));

    // An update follows (how fast is a benchmark question: scripts/bench/sync).
    let (_, current) = mesh.api("GET", &svc_path("hello"), None);
    let mut updated = current.clone();
    updated["spec"]["ports"][0]["targetPort"] = 9090.into();
    let start = Instant::now();
    let v = mesh.put(&svc_path("hello"), &updated.to_string());
    for i in 0..2 {
        mesh.wait_version(i, v, Duration::from_secs(10));
    }
    let took = start.elapsed();
    for i in 0..2 {
        let services = node_services(&mesh, i);
        assert_eq!(
            services[0].1["spec"]["ports"][0]["targetPort"], 9090,
            "update arrived on node {i}"
        );
    }
    eprintln!("update reached both nodes in {took:?}");

    // Deletes follow.
    let (s, _) = mesh.api("DELETE", &svc_path("hello"), None);
    assert_eq!(s, 200);
    let (s, _) = mesh.api("DELETE", &ep_path("hello"), None);
    assert_eq!(s, 200);
    assert_converged(&mesh, Duration::from_secs(5));
    for i in 0..2 {
        assert!(node_services(&mesh, i).is_empty());
    }
}

#[test]
fn a_reconnecting_node_gets_only_the_changes_it_missed() {
    let mut mesh = Mesh::start("delta", 2);
    mesh.put(&svc_path("base"), &service_json("base", 80, 80));
    assert_converged(&mesh, Duration::from_secs(5));

    mesh.stop_node(1, libc::SIGTERM);
    // 100 changes: 60 new services, then 40 updates.
    for i in 0..60 {
        mesh.put(
            &svc_path(&format!("s{i}")),
            &service_json(&format!("s{i}"), 80, 8000),
        );
    }
    for i in 0..40 {
        let (_, mut cur) = mesh.api("GET", &svc_path(&format!("s{i}")), None);
        cur["spec"]["ports"][0]["targetPort"] = 9000.into();
        mesh.put(&svc_path(&format!("s{i}")), &cur.to_string());
    }
    mesh.start_node(1);
    mesh.wait_synced(1);
    assert_converged(&mesh, Duration::from_secs(10));
    let sync = mesh.sync_status(1);
    let last = &sync["status"]["lastSync"];
    assert_eq!(last["mode"], "delta", "{sync}");
    assert_eq!(last["count"], 100, "{sync}");
    assert_eq!(sync["status"]["changesApplied"], 100, "{sync}");
    assert_eq!(sync["status"]["snapshots"], 0, "{sync}");
    // The node that stayed connected never had to resync.
    let other = mesh.sync_status(0);
    assert_eq!(other["status"]["connects"], 1, "{other}");
}

#[test]
fn nodes_resume_after_a_cloudcore_restart_without_a_snapshot() {
    let mut mesh = Mesh::start("cloudrst", 2);
    mesh.put(&svc_path("a"), &service_json("a", 80, 80));
    assert_converged(&mesh, Duration::from_secs(5));

    mesh.stop_cloud(libc::SIGKILL);
    mesh.start_cloud();
    let v = mesh.put(&svc_path("b"), &service_json("b", 81, 81));
    for i in 0..2 {
        mesh.wait_version(i, v, Duration::from_secs(15));
    }
    assert_converged(&mesh, Duration::from_secs(5));
    for i in 0..2 {
        let s = mesh.sync_status(i);
        assert_eq!(
            s["status"]["snapshots"], 1,
            "only the first connect needed a snapshot: {s}"
        );
        assert!(s["status"]["connects"].as_u64() >= Some(2), "{s}");
        assert_ne!(s["status"]["lastSync"]["mode"], "snapshot", "{s}");
    }
}

#[test]
fn a_node_restarted_while_the_cloud_is_down_serves_its_store() {
    let mut mesh = Mesh::start("offline", 1);
    mesh.put(&svc_path("hello"), &service_json("hello", 80, 8080));
    assert_converged(&mesh, Duration::from_secs(5));

    mesh.stop_cloud(libc::SIGKILL);
    mesh.stop_node(0, libc::SIGKILL);
    mesh.start_node(0);
    let (s, ready) = mesh.admin(0, "/readyz");
    assert_eq!(s, 200, "ready without the cloud: {ready}");
    assert_eq!(ready["connected"], false);
    let services = node_services(&mesh, 0);
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].0, "hello");
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
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("disconnected") && text.contains("1 services"),
        "{text}"
    );

    // When the cloud returns, the node reconnects and catches up.
    mesh.start_cloud();
    mesh.wait_synced(0);
    let v = mesh.put(&svc_path("later"), &service_json("later", 80, 80));
    mesh.wait_version(0, v, Duration::from_secs(5));
}

/// `edgemesh status` in node `i`'s namespace with `args`: (success, stdout, stderr).
fn node_status(mesh: &Mesh, i: usize, args: &[&str]) -> (bool, String, String) {
    let edgemesh = edgemesh_e2e::bin("edgemesh");
    let mut argv = vec![
        edgemesh.to_str().expect("path"),
        "status",
        "--admin-listen",
        edgemesh_e2e::mesh::ADMIN,
    ];
    argv.extend(args);
    let out = mesh.topo.exec(&mesh.nodes[i].host, &argv);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_corrupt_node_store_is_set_aside_and_rebuilt_from_the_cloud() {
    let mut mesh = Mesh::start("corrupt", 1);
    let services: Vec<String> = (0..40)
        .map(|i| service_json(&format!("svc-{i:02}"), 80, 8080))
        .collect();
    let (s, v) = mesh.api(
        "POST",
        "/api/v1/apply",
        Some(&format!("[{}]", services.join(","))),
    );
    assert_eq!(s, 200, "{v}");
    assert_converged(&mesh, Duration::from_secs(10));
    mesh.stop_node(0, libc::SIGTERM);

    // No agent: status reads the store without touching it...
    let data_dir = mesh.nodes[0].data_dir.display().to_string();
    let (ok, out, err) = node_status(&mesh, 0, &["--data-dir", &data_dir]);
    assert!(ok, "{out} {err}");
    assert!(
        out.contains("agent:       not running") && out.contains("40 services"),
        "{out}"
    );
    // ...and where there is none, says so and creates nothing.
    let nowhere = mesh.topo.dir().join("no-agent-here");
    let (ok, out, err) = node_status(&mesh, 0, &["--data-dir", &nowhere.display().to_string()]);
    assert!(!ok, "status without a store must fail: {out}");
    assert!(
        err.contains(&format!(
            "no store at {}",
            nowhere.join("edgemesh.db").display()
        )),
        "{err}"
    );
    assert!(!nowhere.exists(), "status created {}", nowhere.display());

    // A disk fault cuts the file in half.
    let db = mesh.node_db(0);
    let len = std::fs::metadata(&db).expect("node store").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");

    // The agent starts anyway, sets the file aside and takes a snapshot from the cloud.
    mesh.start_node(0);
    mesh.wait_synced(0);
    assert_converged(&mesh, Duration::from_secs(10));
    let aside: Vec<std::path::PathBuf> = std::fs::read_dir(&mesh.nodes[0].data_dir)
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains("edgemesh.db.corrupt-"))
        .filter(|p| {
            !p.to_string_lossy().ends_with("-wal") && !p.to_string_lossy().ends_with("-shm")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::metadata(&aside[0]).expect("kept").len(),
        len / 2,
        "the bad file is kept as it was"
    );
    let log = mesh.topo.log(mesh.nodes[0].proc.expect("running"));
    assert!(
        log.contains("the node store is corrupt") && log.contains(&aside[0].display().to_string()),
        "{log}"
    );
    let (s, ready) = mesh.admin(0, "/readyz");
    assert_eq!(s, 200, "ready once resynced: {ready}");
    assert_eq!(
        mesh.metric(0, "edgemesh_meta_store_recoveries_total", &[]),
        1.0
    );
    let (ok, out, err) = node_status(&mesh, 0, &[]);
    assert!(ok, "{out} {err}");
    assert!(
        out.contains("recovered:")
            && out.contains(&aside[0].display().to_string())
            && out.contains("resynced from the cloud"),
        "{out}"
    );
    assert!(out.contains("40 services"), "{out}");

    // A restart finds a good store: nothing more is set aside, nothing is lost.
    mesh.stop_node(0, libc::SIGTERM);
    mesh.start_node(0);
    mesh.wait_synced(0);
    assert_eq!(
        mesh.metric(0, "edgemesh_meta_store_recoveries_total", &[]),
        0.0
    );
    assert_eq!(node_services(&mesh, 0).len(), 40);
}

#[test]
fn random_crashes_converge_to_the_cloud_state() {
    let seed: u64 = std::env::var("EDGEMESH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set EDGEMESH_TEST_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // A short history makes some reconnects take a snapshot and others a delta.
    let mut mesh = Mesh::new("chaos", 3, vec!["store.history=40".into()]);
    mesh.start_cloud();
    mesh.create_tokens();
    for i in 0..3 {
        mesh.start_node(i);
    }
    let mut down_until: Vec<Option<usize>> = vec![None; 3];
    let mut cloud_kills = 0;
    let mut node_kills = 0;
    let ops = 300;
    for op in 0..ops {
        // Crash and restart things at random points.
        for (i, down) in down_until.iter_mut().enumerate() {
            match *down {
                Some(until) if op >= until => {
                    mesh.start_node(i);
                    *down = None;
                }
                None if rng.random_bool(0.02) => {
                    mesh.stop_node(
                        i,
                        if rng.random_bool(0.7) {
                            libc::SIGKILL
                        } else {
                            libc::SIGTERM
                        },
                    );
                    *down = Some(op + rng.random_range(0..60));
                    node_kills += 1;
                }
                _ => {}
            }
        }
        if rng.random_bool(0.015) {
            mesh.stop_cloud(libc::SIGKILL);
            cloud_kills += 1;
            mesh.start_cloud();
        }
        let name = format!("svc{}", rng.random_range(0..25));
        match rng.random_range(0..10) {
            0..=4 => {
                let port = rng.random_range(1..65535);
                let (s, v) = mesh.api(
                    "PUT",
                    &svc_path(&name),
                    Some(&service_json(&name, port, port)),
                );
                assert!(s == 200 || s == 201, "{s} {v}");
            }
            5..=7 => {
                let (s, v) = mesh.api(
                    "PUT",
                    &ep_path(&name),
                    Some(&endpoints_json(
                        &name,
                        80,
                        &[(&format!("10.2.0.{}", rng.random_range(1..250)), "edge-0")],
                    )),
                );
                assert!(s == 200 || s == 201, "{s} {v}");
            }
            _ => {
                let path = if rng.random_bool(0.5) {
                    svc_path(&name)
                } else {
                    ep_path(&name)
                };
                let (s, v) = mesh.api("DELETE", &path, None);
                assert!(s == 200 || s == 404, "{s} {v}");
            }
        }
    }
    for (i, down) in down_until.iter().enumerate() {
        if down.is_some() {
            mesh.start_node(i);
        }
    }
    eprintln!("{ops} operations, {node_kills} node crashes, {cloud_kills} cloud crashes");
    assert_converged(&mesh, Duration::from_secs(30));
}

/// A websocket client run inside the cloud's network: connects as `node` with `token`, sends
/// `frames` (text unless they start with 0xff, then binary), and reports how the cloud answered.
fn raw_session(
    ns: &str,
    url: String,
    token: String,
    frames: Vec<Vec<u8>>,
) -> Result<String, String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut req = url.as_str().into_client_request().map_err(|e| e.to_string())?;
            req.headers_mut().insert("authorization", format!("Bearer {token}").parse().map_err(|_| "header")?);
            let (mut ws, _) = match tokio_tungstenite::connect_async_with_config(req, None, false).await {
                Ok(pair) => pair,
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    return Err(format!("HTTP {}", resp.status().as_u16()))
                }
                Err(e) => return Err(e.to_string()),
            };
            for f in frames {
                let msg = if f.first() == Some(&0xff) {
                    Message::binary(f)
                } else {
                    Message::text(String::from_utf8_lossy(&f).into_owned())
                };
                if ws.send(msg).await.is_err() {
                    break;
                }
            }
            // Read until the cloud closes the connection (or 10 s pass).
            let mut seen = Vec::new();
            let deadline = tokio::time::sleep(Duration::from_secs(10));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => return Ok(format!("still open after {seen:?}")),
                    m = ws.next() => match m {
                        None => return Ok(format!("closed after {seen:?}")),
                        Some(Err(e)) => return Ok(format!("closed ({e}) after {seen:?}")),
                        Some(Ok(Message::Close(f))) => return Ok(format!("close frame {f:?} after {seen:?}")),
                        Some(Ok(Message::Text(t))) => {
                            let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                            seen.push(format!("{}/{}", v["route"]["operation"].as_str().unwrap_or("?"), v["route"]["resource"].as_str().unwrap_or("?")));
                        }
                        Some(Ok(_)) => {}
                    }
                }
            }
        })
    })
}

#[test]
fn bad_tokens_and_bad_frames_are_refused_without_affecting_other_nodes() {
    let mesh = Mesh::start("auth", 1);
    mesh.put(&svc_path("secret"), &service_json("secret", 80, 80));
    assert_converged(&mesh, Duration::from_secs(5));
    let ns = mesh.cloud.ns.clone();
    let events = |node: &str| format!("ws://{}:10000/v1/nodes/{node}/events", mesh.cloud.ip);
    let rogue_token = mesh.create_token("rogue");

    // Unknown token, no token, another node's token: refused at the handshake.
    assert_eq!(
        raw_session(&ns, events("rogue"), "0".repeat(64), vec![]),
        Err("HTTP 403".into())
    );
    assert_eq!(
        raw_session(&ns, events("nobody"), rogue_token.clone(), vec![]),
        Err("HTTP 401".into())
    );
    assert_eq!(
        raw_session(&ns, events("edge-0"), rogue_token.clone(), vec![]),
        Err("HTTP 403".into())
    );
    assert_eq!(
        raw_session(&ns, events("rogue"), String::new(), vec![]),
        Err("HTTP 401".into())
    );
    let wrong_path = format!("ws://{}:10000/v1/nodes/rogue", mesh.cloud.ip);
    assert_eq!(
        raw_session(&ns, wrong_path, rogue_token.clone(), vec![]),
        Err("HTTP 404".into())
    );

    // Authenticated but malformed: closed, and nothing of the metadata was sent first.
    for frames in [
        vec![b"not json".to_vec()],
        vec![br#"{"header":{"msg_id":"1"},"route":{"operation":"query","resource":"sync"},"content":{"resourceVersion":"x"}}"#.to_vec()],
        vec![vec![0xff; 64]],
        vec![vec![b'x'; 2 << 20]],
    ] {
        let r = raw_session(&ns, events("rogue"), rogue_token.clone(), frames).expect("handshake passes");
        assert!(r.contains("close") || r.starts_with("closed"), "{r}");
        assert!(!r.contains("snapshot") && !r.contains("service"), "no metadata before a valid sync request: {r}");
    }
    // A garbage frame after a valid sync request closes that connection only.
    let sync = br#"{"header":{"msg_id":"1"},"route":{"operation":"query","resource":"sync"},"content":{"resourceVersion":0}}"#.to_vec();
    let r = raw_session(
        &ns,
        events("rogue"),
        rogue_token,
        vec![sync, b"{]".to_vec()],
    )
    .expect("handshake passes");
    assert!(r.contains("close") && r.contains("response/sync"), "{r}");

    // The oversized message was counted as the limit it hit.
    let (_, metrics) = mesh.topo.curl(&mesh.cloud, &[&mesh.api_url("/metrics")]);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cloudcore_hub_limit_hits_total{limit=\"message_size\"} ")),
        "{metrics}"
    );

    // The cloud logged why, keeps serving, and the real node never noticed.
    let log = mesh.cloud_log();
    assert!(log.contains("token does not belong to this node"), "{log}");
    assert!(log.contains("unknown or revoked node"), "{log}");
    let v = mesh.put(&svc_path("after"), &service_json("after", 80, 80));
    mesh.wait_version(0, v, Duration::from_secs(5));
    let s = mesh.sync_status(0);
    assert_eq!(s["status"]["connects"], 1, "{s}");
}

#[test]
fn a_real_node_with_a_wrong_token_gets_nothing_and_says_why() {
    let mut mesh = Mesh::start("wrongtok", 2);
    mesh.put(&svc_path("hello"), &service_json("hello", 80, 80));
    assert_converged(&mesh, Duration::from_secs(5));
    // Node 1 restarts presenting node 0's token.
    mesh.stop_node(1, libc::SIGTERM);
    let borrowed = mesh.nodes[0].token.clone();
    let own = std::mem::replace(&mut mesh.nodes[1].token, borrowed);
    std::fs::remove_dir_all(&mesh.nodes[1].data_dir).expect("wipe node 1");
    mesh.start_node(1);
    let status = wait_for("refusal recorded", Duration::from_secs(10), || {
        let s = mesh.sync_status(1);
        s["status"]["lastError"]
            .as_str()
            .filter(|e| e.contains("403"))
            .map(|_| s.clone())
    });
    assert_eq!(status["store"]["services"], 0, "{status}");
    assert_eq!(
        mesh.sync_status(0)["status"]["connects"],
        1,
        "node 0 was not kicked"
    );
    // With its own token it syncs.
    mesh.stop_node(1, libc::SIGTERM);
    mesh.nodes[1].token = own;
    mesh.start_node(1);
    mesh.wait_synced(1);
    assert_converged(&mesh, Duration::from_secs(5));
}

#[test]
fn invalid_rest_bodies_get_4xx_naming_the_field_and_store_nothing() {
    let mesh = Mesh::start("rest", 1);
    let (base_version, _) = cloud_objects(&mesh.cloud_db());
    let cases: &[(&str, &str, u16, Option<&str>)] = &[
        (
            "services/a",
            r#"{"kind":"Endpoints","metadata":{"name":"a"}}"#,
            400,
            Some("kind"),
        ),
        (
            "services/a",
            r#"{"kind":"Service","metadata":{},"spec":{"ports":[{"port":80}]}}"#,
            201,
            None,
        ),
        (
            "services/b",
            r#"{"spec":{"ports":[{"port":0}]}}"#,
            422,
            Some("spec.ports[0].port"),
        ),
        (
            "services/b",
            r#"{"spec":{"ports":[{"port":80}],"clusterIP":"10.96.0.300"}}"#,
            422,
            Some("spec.clusterIP"),
        ),
        (
            "services/b",
            r#"{"spec":{"ports":[{"port":80}],"clusterIP":"192.168.0.1"}}"#,
            422,
            Some("spec.clusterIP"),
        ),
        (
            "services/b",
            r#"{"spec":{"ports":[{"port":80,"targetPrt":1}]}}"#,
            422,
            Some("spec.ports[0].targetPrt"),
        ),
        (
            "services/Bad_Name",
            r#"{"spec":{"ports":[{"port":80}]}}"#,
            422,
            Some("metadata.name"),
        ),
        (
            "services/b",
            r#"{"metadata":{"name":"c"},"spec":{"ports":[{"port":80}]}}"#,
            400,
            Some("metadata.name"),
        ),
        (
            "services/b",
            r#"{"metadata":{"annotations":{"edgemesh.io/lb-policy":"fastest"}},"spec":{"ports":[{"port":80}]}}"#,
            422,
            Some("metadata.annotations[\"edgemesh.io/lb-policy\"]"),
        ),
        ("services/b", "[1,2", 400, None),
        ("services/b", "\"a string\"", 400, None),
        (
            "endpoints/b",
            r#"{"subsets":[{"addresses":[{"ip":"not-an-ip"}],"ports":[{"port":80}]}]}"#,
            422,
            Some("subsets[0].addresses[0].ip"),
        ),
        (
            "endpoints/b",
            r#"{"subsets":[{"addresses":[{"ip":"10.0.0.1"}],"ports":[{"port":65536}]}]}"#,
            422,
            Some("subsets[0].ports[0].port"),
        ),
    ];
    let mut created = 0;
    for (path, body, status, field) in cases {
        let (s, v) = mesh.api(
            "PUT",
            &format!("/api/v1/namespaces/default/{path}"),
            Some(body),
        );
        assert_eq!(s, *status, "{path} {body}: {v}");
        if s >= 400 {
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            assert_eq!(v["field"].as_str(), *field, "{path} {body}: {v}");
        } else {
            created += 1;
        }
    }
    // Without the token: 401, nothing else happens.
    let (s, text) = mesh.topo.curl(
        &mesh.cloud,
        &[
            "-X",
            "PUT",
            &mesh.api_url(&svc_path("x")),
            "--data-binary",
            &service_json("x", 80, 80),
        ],
    );
    assert_eq!(s, 401, "{text}");
    // A 5 MB name, in a PUT and in an apply: the error names the field and quotes the value
    // bounded, whatever the error path.
    let huge = "n".repeat(5 << 20);
    let auth = format!("Authorization: Bearer {}", mesh.api_token);
    for (method, path, body) in [
        (
            "PUT",
            svc_path("x"),
            format!(r#"{{"metadata":{{"name":"{huge}"}},"spec":{{"ports":[{{"port":80}}]}}}}"#),
        ),
        (
            "POST",
            "/api/v1/apply".to_string(),
            format!(
                r#"[{{"kind":"Service","metadata":{{"name":"{huge}"}},"spec":{{"ports":[{{"port":80}}]}}}}]"#
            ),
        ),
        (
            "POST",
            "/api/v1/apply".to_string(),
            format!(
                r#"{{"kind":"Service","metadata":{{"name":"ok","labels":{{"{huge}":"v"}}}},"spec":{{"ports":[{{"port":80}}]}}}}"#
            ),
        ),
    ] {
        let file = mesh.topo.write_file("huge.json", &body);
        let (s, text) = mesh.topo.curl(
            &mesh.cloud,
            &[
                "-X",
                method,
                "-H",
                &auth,
                &mesh.api_url(&path),
                "--data-binary",
                &format!("@{}", file.display()),
            ],
        );
        assert!(s == 400 || s == 422, "{method} {path}: {s}");
        assert!(
            text.len() < 4096,
            "{method} {path}: a {} byte error",
            text.len()
        );
        let v: Value = serde_json::from_str(&text).expect("a JSON error");
        assert!(v["error"].as_str().is_some(), "{text}");
        assert!(text.contains("bytes]"), "the value is quoted, cut: {text}");
    }
    let (version, objects) = cloud_objects(&mesh.cloud_db());
    assert_eq!(
        version,
        base_version + created,
        "only valid writes were stored"
    );
    assert!(
        objects
            .keys()
            .all(|k| !k.ends_with("/b") && !k.ends_with("/x")),
        "{objects:?}"
    );
}

#[test]
fn a_silent_node_goes_offline_and_a_deleted_node_is_kicked() {
    let mut mesh = Mesh::start("liveness", 2);
    let nodes = |mesh: &Mesh| -> Value { mesh.api("GET", "/api/v1/nodes", None).1 };
    let online = |v: &Value, name: &str| {
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["metadata"]["name"] == name)
            .map(|n| n["status"]["online"] == true)
    };
    let v = nodes(&mesh);
    assert_eq!(online(&v, "edge-0"), Some(true), "{v}");
    let labels = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|n| n["metadata"]["name"] == "edge-1")
        .expect("edge-1")["metadata"]["labels"]
        .clone();
    assert_eq!(
        labels["zone"], "z1",
        "the node's labels were published: {v}"
    );

    // SIGSTOP: the connection stays open but the node falls silent.
    let pid = mesh.topo.pid(mesh.nodes[0].proc.expect("running")) as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let start = Instant::now();
    wait_for("edge-0 marked offline", Duration::from_secs(10), || {
        (online(&nodes(&mesh), "edge-0") == Some(false)).then_some(())
    });
    eprintln!("silent node marked offline after {:?}", start.elapsed());
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_for("edge-0 back online", Duration::from_secs(15), || {
        (online(&nodes(&mesh), "edge-0") == Some(true)).then_some(())
    });

    // Deleting a node closes its connection, revokes its token and removes it everywhere.
    let (s, v) = mesh.api("DELETE", "/api/v1/nodes/edge-1", None);
    assert_eq!(s, 200, "{v}");
    wait_for("edge-1 refused", Duration::from_secs(10), || {
        let s = mesh.sync_status(1);
        (s["status"]["connected"] == false
            && s["status"]["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("401")))
        .then_some(())
    });
    let (s, _) = mesh.api("GET", "/api/v1/nodes/edge-1", None);
    assert_eq!(s, 404);
    wait_for("edge-0 forgot edge-1", Duration::from_secs(5), || {
        let (_, v) = mesh.admin(0, "/debug/nodes");
        v["items"]
            .as_array()
            .is_some_and(|n| n.iter().all(|n| n["metadata"]["name"] != "edge-1"))
            .then_some(())
    });
    mesh.stop_node(1, libc::SIGTERM);
}

#[test]
fn tls_on_the_hub_and_the_api() {
    let mut mesh = Mesh::new("tls", 1, Vec::new());
    let dir = mesh.topo.dir().to_path_buf();
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cloud.pem"),
        dir.join("cloud.key"),
    );
    let ip = mesh.cloud.ip;
    let sh = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=edgemesh-test-ca 2>/dev/null; \
         openssl req -newkey rsa:2048 -nodes -keyout cloud.key -out cloud.csr -subj /CN=cloudcore 2>/dev/null; \
         printf 'subjectAltName=IP:{ip}\\n' > ext.cnf; \
         openssl x509 -req -in cloud.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cloud.pem -days 1 -extfile ext.cnf 2>/dev/null",
        d = dir.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &sh])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    mesh.cloud_extra = vec![
        format!("hub.tls_cert=\"{}\"", cert.display()),
        format!("hub.tls_key=\"{}\"", key.display()),
    ];
    mesh.api_scheme = "https";
    mesh.ca_cert = Some(ca.clone());
    mesh.start_cloud();
    mesh.create_tokens();
    mesh.start_node(0);
    mesh.wait_synced(0);
    let v = mesh.put(&svc_path("hello"), &service_json("hello", 80, 80));
    mesh.wait_version(0, v, Duration::from_secs(5));
    assert!(mesh.sync_status(0)["status"]["cloudUrl"]
        .as_str()
        .is_some_and(|u| u.starts_with("wss://")));
    // Plain HTTP to the TLS port gets nowhere; a client that does not trust the CA is refused.
    let (s, _) = mesh
        .topo
        .curl(&mesh.cloud, &[&format!("http://{ip}:10002/healthz")]);
    assert_eq!(s, 0);
    let (s, _) = mesh
        .topo
        .curl(&mesh.cloud, &[&format!("https://{ip}:10002/healthz")]);
    assert_eq!(s, 0, "curl must not trust an unknown CA");
    assert!(!mesh.cloud_log().contains("serve plain text"));
}

#[test]
fn a_cloud_restored_from_a_backup_takes_back_what_it_lost_from_every_node() {
    let mut mesh = Mesh::start("restore", 2);
    mesh.put(&svc_path("kept"), &service_json("kept", 80, 80));
    assert_converged(&mesh, Duration::from_secs(5));

    // Back up the cloud's store (stopped, so the files are consistent).
    mesh.stop_cloud(libc::SIGTERM);
    let backup = mesh.topo.dir().join("backup");
    std::fs::create_dir_all(&backup).expect("backup dir");
    let files = ["cloudcore.db", "cloudcore.db-wal", "cloudcore.db-shm"];
    for f in files {
        let _ = std::fs::copy(mesh.cloud_dir.join(f), backup.join(f));
    }
    mesh.start_cloud();
    mesh.put(&svc_path("lost-1"), &service_json("lost-1", 80, 80));
    mesh.put(&svc_path("lost-2"), &service_json("lost-2", 80, 80));
    assert_converged(&mesh, Duration::from_secs(5));

    // Restore the backup: the same store, but versions after it will be reused. The nodes
    // stay away until the restored cloud has moved past their version, so that version
    // numbers alone would make their missed changes look like a plain delta.
    mesh.stop_cloud(libc::SIGTERM);
    for i in 0..2 {
        mesh.stop_node(i, libc::SIGTERM);
    }
    for f in files {
        let _ = std::fs::remove_file(mesh.cloud_dir.join(f));
        if backup.join(f).exists() {
            std::fs::copy(backup.join(f), mesh.cloud_dir.join(f)).expect("restore");
        }
    }
    mesh.start_cloud();
    for name in ["new-1", "new-2", "new-3"] {
        mesh.put(&svc_path(name), &service_json(name, 80, 80));
    }
    for i in 0..2 {
        mesh.start_node(i);
    }
    assert_converged(&mesh, Duration::from_secs(15));
    for i in 0..2 {
        let names: Vec<String> = node_services(&mesh, i)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with("lost")),
            "node {i} kept changes the cloud lost: {names:?}"
        );
        let s = mesh.sync_status(i);
        assert_eq!(
            s["status"]["lastSync"]["mode"], "snapshot",
            "the restore forced a snapshot: {s}"
        );
    }
}
