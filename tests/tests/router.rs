//! The cloud router end to end: rules stored in cloudcore, a cloud client reaching an edge pod
//! through `rest` → `service`, an edge pod reaching a cloud HTTP server through `service` →
//! `rest`, counters and errors per rule, and a rule's QPS limit. The edge node is isolated
//! from everything but the cloud; all traffic stays in the test's namespaces.

use std::time::Duration;

use edgemesh_e2e::mesh::Mesh;
use edgemesh_e2e::wait_for;
use serde_json::{json, Value};

const TARGET: u16 = 8080;

fn post(mesh: &Mesh, path: &str, body: Value) -> Value {
    let (status, v) = mesh.api("POST", path, Some(&body.to_string()));
    assert_eq!(status, 201, "POST {path} {body}: {v}");
    v
}

fn rule(mesh: &Mesh, id: &str) -> Value {
    let (status, v) = mesh.api("GET", &format!("/api/v1/router/rules/{id}"), None);
    assert_eq!(status, 200, "GET rule {id}: {v}");
    v
}

#[test]
fn rules_route_between_cloud_clients_and_edge_services_with_counters_and_limits() {
    let mut mesh = Mesh::new("router", 1, Vec::new());
    let node = mesh.nodes[0].host.clone();
    mesh.topo.isolate(&[&node]);
    mesh.start_cloud();
    mesh.create_tokens();
    mesh.start_node(0);
    mesh.wait_synced(0);
    let cloud = mesh.cloud.clone();

    // An edge pod serving HTTP behind the node; a cloud API server in the cloud namespace.
    let pod = mesh.add_pod(0, "web");
    mesh.serve(&pod, "http", TARGET, "hello from the edge pod");
    mesh.put_service("web", 80, TARGET, &[], &[(&pod.ip.to_string(), "edge-0")]);
    mesh.serve(&cloud, "http", 9000, "hello from the cloud api");

    post(
        &mesh,
        "/api/v1/router/endpoints",
        json!({"type": "rest", "name": "cloud-rest"}),
    );
    post(
        &mesh,
        "/api/v1/router/endpoints",
        json!({"type": "rest", "name": "slow-rest", "properties": {"qps": 5, "burst": 5}}),
    );
    post(
        &mesh,
        "/api/v1/router/endpoints",
        json!({"type": "service", "name": "mesh"}),
    );

    // Cloud client → edge Service.
    let to_web = post(
        &mesh,
        "/api/v1/router/rules",
        json!({"name": "to-web", "source": "cloud-rest", "source_resource": {"path": "/web"},
               "target": "mesh", "target_resource": {"namespace": "default", "name": "web", "port": 80}}),
    );
    let to_web_id = to_web["id"].as_str().expect("rule id").to_string();
    let ingress = format!("http://{}:9443", cloud.ip);
    for _ in 0..3 {
        let (status, body) = mesh.topo.curl(
            &cloud,
            &["--max-time", "10", &format!("{ingress}/web/anything?x=1")],
        );
        assert_eq!(status, 200, "router → edge pod: {body}");
        assert_eq!(body.trim(), "hello from the edge pod");
    }
    let r = rule(&mesh, &to_web_id);
    assert_eq!(r["success_messages"], 3, "{r}");
    assert_eq!(r["fail_messages"], 0, "{r}");

    // A path no rule covers, and a rule whose Service has no endpoints.
    let (status, _) = mesh.topo.curl(
        &cloud,
        &["--max-time", "10", &format!("{ingress}/nothing-here")],
    );
    assert_eq!(status, 404);
    post(
        &mesh,
        "/api/v1/router/rules",
        json!({"name": "to-ghost", "source": "cloud-rest", "source_resource": {"path": "/ghost"},
               "target": "mesh", "target_resource": {"namespace": "default", "name": "ghost", "port": 80}}),
    );
    let (status, _) = mesh
        .topo
        .curl(&cloud, &["--max-time", "10", &format!("{ingress}/ghost")]);
    assert_eq!(status, 503, "no such Service");

    // The edge pod goes away: the router answers 502 and the rule keeps the error.
    mesh.put_service("web", 80, TARGET, &[], &[("10.244.1.250", "edge-0")]);
    let (status, _) = mesh
        .topo
        .curl(&cloud, &["--max-time", "15", &format!("{ingress}/web/")]);
    assert_eq!(status, 502, "endpoint unreachable");
    let r = rule(&mesh, &to_web_id);
    assert_eq!(r["fail_messages"], 1, "{r}");
    let errors = r["errors"].as_array().expect("errors");
    assert!(!errors.is_empty(), "{r}");
    mesh.put_service("web", 80, TARGET, &[], &[(&pod.ip.to_string(), "edge-0")]);

    // Edge pod → cloud API through a `service` → `rest` rule's virtual Service.
    let to_api = post(
        &mesh,
        "/api/v1/router/rules",
        json!({"name": "to-api", "source": "mesh",
               "source_resource": {"namespace": "default", "name": "cloud-api", "port": 8000},
               "target": "cloud-rest", "target_resource": {"url": format!("http://{}:9000/api", cloud.ip)}}),
    );
    let to_api_id = to_api["id"].as_str().expect("rule id").to_string();
    let client = mesh.add_pod(0, "client");
    let api_ip = wait_for(
        "the virtual Service reaches the node",
        Duration::from_secs(10),
        || {
            let (s, v) = mesh.api("GET", "/api/v1/namespaces/default/services/cloud-api", None);
            let ip = (s == 200).then(|| v["spec"]["clusterIP"].as_str().map(str::to_string))??;
            mesh.route(0, &format!("{ip}:8000")).map(|_| ip)
        },
    );
    let (status, body) = mesh.topo.curl(
        &client,
        &[
            "--max-time",
            "10",
            &format!("http://{api_ip}:8000/invoices"),
        ],
    );
    assert_eq!(status, 200, "edge pod → cloud api: {body}");
    assert_eq!(body.trim(), "hello from the cloud api");
    let r = rule(&mesh, &to_api_id);
    assert_eq!(r["success_messages"], 1, "{r}");

    // A rule's QPS: 5/s with a burst of 5; 30 requests at once get about 5 through.
    post(
        &mesh,
        "/api/v1/router/rules",
        json!({"name": "limited", "source": "slow-rest", "source_resource": {"path": "/limited"},
               "target": "mesh", "target_resource": {"namespace": "default", "name": "web", "port": 80}}),
    );
    let url = format!("{ingress}/limited/?n=[1-30]");
    let out = mesh.topo.exec(
        &cloud,
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &url,
        ],
    );
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let codes = String::from_utf8_lossy(&out.stdout).to_string();
    let ok = codes.lines().filter(|c| *c == "200").count();
    let limited = codes.lines().filter(|c| *c == "429").count();
    assert_eq!(ok + limited, 30, "{codes}");
    assert!(
        (5..=8).contains(&ok),
        "about the burst of 5 pass: {ok} ({codes})"
    );
}
