//! Direct node-to-node paths, phase 1, end to end: node certificates (issued for the node's own
//! name whatever its request claims, published in the Node's status and synced to every node,
//! revoked everywhere by a re-join or a deletion), certificate login to a TLS hub without the
//! token, Communities through REST, `cloudcore apply/get/delete` and sync (candidates reach
//! exactly the peers of a common Community), and the reflexive address a node learns through
//! a NAT built with iptables MASQUERADE.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgehub::identity::{cert_info, Identity};
use edgehub::message::{
    group, module, op, resource, CertificateIssued, CertificateRequest, SyncRequest,
};
use edgemesh_e2e::mesh::{in_netns, node_objects, EdgeNode, Mesh};
use edgemesh_e2e::{bin, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// `/debug/direct` of node `i`.
fn direct(mesh: &Mesh, i: usize) -> Value {
    let (s, v) = mesh.admin(i, "/debug/direct");
    assert_eq!(s, 200, "/debug/direct of node {i}: {v}");
    v
}

/// The fingerprint of the certificate node `i` holds.
fn held(mesh: &Mesh, i: usize) -> Option<String> {
    direct(mesh, i)["certificate"]["fingerprint"]
        .as_str()
        .map(String::from)
}

/// Each node's published fingerprint as `GET /api/v1/nodes` shows it.
fn published(mesh: &Mesh) -> BTreeMap<String, Option<String>> {
    let (s, v) = mesh.api("GET", "/api/v1/nodes", None);
    assert_eq!(s, 200, "{v}");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| {
            (
                n["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                n["status"]["certificate"]["fingerprint"]
                    .as_str()
                    .map(String::from),
            )
        })
        .collect()
}

/// Node `i`'s copy of `of`'s fingerprint: `None` when the Node has none, `Some(None)` when
/// the Node is not in node `i`'s store at all.
fn synced(mesh: &Mesh, i: usize, of: &str) -> Option<Option<String>> {
    let (_, v) = mesh.admin(i, "/debug/nodes");
    v["items"]
        .as_array()?
        .iter()
        .find(|n| n["metadata"]["name"] == of)
        .map(|n| {
            n["status"]["certificate"]["fingerprint"]
                .as_str()
                .map(String::from)
        })
}

/// Waits until every running node's copy of `of`'s fingerprint is `want` (`None`: no
/// certificate; the Node may also be gone when `gone_ok`).
fn wait_everywhere(mesh: &Mesh, nodes: &[usize], of: &str, want: Option<&str>, gone_ok: bool) {
    for &i in nodes {
        wait_for(
            &format!("node {i} sees {of} with certificate {want:?}"),
            WAIT,
            || match synced(mesh, i, of) {
                Some(fp) if fp.as_deref() == want => Some(()),
                None if gone_ok => Some(()),
                _ => None,
            },
        );
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Connects to the hub as `node` with `token`, sends the sync request and `request`, and
/// returns the cloud's answer to the request (its content).
fn certificate_session(
    ns: &str,
    url: String,
    token: String,
    request: CertificateRequest,
) -> Result<Value, String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message as Ws;
    run_in(ns, async move {
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().map_err(|_| "header")?,
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| e.to_string())?;
        let sync = SyncRequest {
            store_id: None,
            resource_version: 0,
            chain: String::new(),
            labels: BTreeMap::new(),
            agent_version: "test".into(),
        };
        let csr = edgehub::message::Message::new(
            module::EDGEHUB,
            module::CLOUDHUB,
            group::DIRECT,
            op::QUERY,
            resource::CERTIFICATE,
        )
        .with_content(&request);
        for m in [sync.message(), csr] {
            ws.send(Ws::text(m.to_json()))
                .await
                .map_err(|e| e.to_string())?;
        }
        let answer = async {
            while let Some(m) = ws.next().await {
                if let Ok(Ws::Text(t)) = m {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if v["route"]["resource"] == resource::CERTIFICATE {
                        return Ok(v["content"].clone());
                    }
                }
            }
            Err("closed before an answer".to_string())
        };
        tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .map_err(|_| "no answer in 10 s".to_string())?
    })
}

#[test]
fn node_certificates_are_issued_published_synced_and_revoked_everywhere() {
    let mut mesh = Mesh::start("dcert", 3);
    let names: Vec<String> = mesh.nodes.iter().map(|n| n.name.clone()).collect();
    let fps: Vec<String> = (0..3)
        .map(|i| wait_for(&format!("{} certified", names[i]), WAIT, || held(&mesh, i)))
        .collect();
    // Published by the cloud, and in every node's own store.
    wait_for("fingerprints in GET /api/v1/nodes", WAIT, || {
        let p = published(&mesh);
        (0..3)
            .all(|i| p.get(&names[i]) == Some(&Some(fps[i].clone())))
            .then_some(())
    });
    for (j, name) in names.iter().enumerate() {
        wait_everywhere(&mesh, &[0, 1, 2], name, Some(&fps[j]), false);
    }
    // Keys stay private: the node's (generated on the node) and the mesh CA's.
    for n in &mesh.nodes {
        assert_eq!(mode(&n.data_dir.join("identity/node.key")), 0o600);
    }
    assert_eq!(mode(&mesh.cloud_dir.join("mesh-ca.key")), 0o600);

    // A request that claims another node's name gets a certificate for the authenticated
    // node, and the named node's certificate stays as it was.
    let rogue_token = mesh.create_token("rogue");
    let claimer = Identity::open(&mesh.topo.dir().join("rogue"), &names[1]).expect("identity");
    let url = format!("ws://{}:10000/v1/nodes/rogue/events", mesh.cloud.ip);
    let answer = certificate_session(
        &mesh.cloud.ns,
        url,
        rogue_token,
        claimer.request().expect("csr"),
    )
    .expect("answered");
    let issued: CertificateIssued =
        serde_json::from_value(answer.clone()).unwrap_or_else(|e| panic!("{e}: {answer}"));
    let der = CertificateDer::from_pem_slice(issued.certificate.as_bytes()).expect("pem");
    assert_eq!(
        cert_info(&der).expect("parse").names,
        vec!["rogue".to_string()]
    );
    assert!(
        claimer.install(&issued).is_err(),
        "not a certificate for {}",
        names[1]
    );
    let p = published(&mesh);
    assert_eq!(p["rogue"], Some(issued.fingerprint.clone()));
    assert_eq!(p[&names[1]], Some(fps[1].clone()));

    // Re-joining edge-1 (its token created again) revokes its certificate everywhere at once;
    // its old connection may not get a new one.
    let token = mesh.create_token(&names[1]);
    assert_eq!(published(&mesh)[&names[1]], None);
    wait_everywhere(&mesh, &[0, 1, 2], &names[1], None, false);
    // (The cloud takes one request per 10 s from a node, the node retries 15 s after a refusal.)
    wait_for(
        "the old link is refused a new certificate",
        WAIT * 2,
        || {
            let d = direct(&mesh, 1);
            d["lastCertificateError"]
                .as_str()
                .is_some_and(|e| e.contains("no longer this node's"))
                .then_some(())
        },
    );
    // The re-joined node (new token) gets a new certificate, and every node learns it.
    mesh.stop_node(1, libc::SIGTERM);
    mesh.nodes[1].token = token;
    mesh.start_node(1);
    let renewed = wait_for("edge-1 certified again", WAIT, || {
        held(&mesh, 1).filter(|fp| fp != &fps[1])
    });
    wait_everywhere(&mesh, &[0, 1, 2], &names[1], Some(&renewed), false);

    // Deleting edge-2 removes its Node, certificate and all, from every other node.
    let (s, v) = mesh.api("DELETE", &format!("/api/v1/nodes/{}", names[2]), None);
    assert_eq!(s, 200, "{v}");
    assert!(!published(&mesh).contains_key(&names[2]));
    for i in [0, 1] {
        wait_for(&format!("node {i} forgot edge-2"), WAIT, || {
            synced(&mesh, i, &names[2]).is_none().then_some(())
        });
    }
}

/// Makes the mesh's cloudcore serve TLS with a certificate for its address from a CA of its
/// own, which the nodes and the API client trust; returns the CA file.
fn serve_hub_tls(mesh: &mut Mesh) -> PathBuf {
    let (ca, cert, key) = hub_tls(mesh.topo.dir(), mesh.cloud.ip);
    mesh.cloud_extra = ["hub.tls_cert", "hub.tls_key"]
        .iter()
        .zip([cert, key])
        .map(|(k, f)| format!("{k}=\"{}\"", f.display()))
        .collect();
    mesh.api_scheme = "https";
    mesh.ca_cert = Some(ca.clone());
    ca
}

/// A CA and a certificate for the hub's address, written as PEM files: (CA, cert, key).
fn hub_tls(dir: &Path, ip: std::net::Ipv4Addr) -> (PathBuf, PathBuf, PathBuf) {
    let named = |sans: Vec<String>, cn: &str| {
        let mut p = rcgen::CertificateParams::new(sans).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p
    };
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = named(Vec::new(), "edgemesh-test-hub-ca");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = named(vec![ip.to_string()], "cloudcore")
        .signed_by(&key, &rcgen::Issuer::from_params(&ca, &ca_key))
        .expect("hub certificate");
    let files = [
        ("hub-ca.pem", ca_cert.pem()),
        ("hub.pem", cert.pem()),
        ("hub.key", key.serialize_pem()),
    ];
    for (name, pem) in &files {
        std::fs::write(dir.join(name), pem).expect("write");
    }
    (
        dir.join("hub-ca.pem"),
        dir.join("hub.pem"),
        dir.join("hub.key"),
    )
}

/// Runs `fut` on a runtime of its own in network namespace `ns`.
fn run_in<T: Send + 'static>(
    ns: &str,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    in_netns(ns, move || {
        let mut rt = tokio::runtime::Builder::new_current_thread();
        rt.enable_all().build().expect("runtime").block_on(fut)
    })
}

/// Opens a websocket to the TLS hub as `node`, presenting `auth` and no token: `Ok` once the
/// upgrade succeeded, else the HTTP status (0: the TLS handshake failed).
fn tls_login(
    ns: &str,
    ip: std::net::Ipv4Addr,
    ca: &Path,
    node: &str,
    auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<(), u16> {
    let roots = edgehub::tls::client_config_with_auth("ca", ca, auth).expect("tls config");
    let url = format!("wss://{ip}:10000/v1/nodes/{node}/events");
    run_in(ns, async move {
        let tcp = tokio::net::TcpStream::connect((ip, 10000))
            .await
            .map_err(|_| 0u16)?;
        let name = rustls::pki_types::ServerName::IpAddress(ip.into());
        let tls = tokio_rustls::TlsConnector::from(roots)
            .connect(name, tcp)
            .await
            .map_err(|_| 0u16)?;
        match tokio_tungstenite::client_async(url.as_str(), tls).await {
            Ok(_) => Ok(()),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(_) => Err(0),
        }
    })
}

fn node_auth(data_dir: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let dir = data_dir.join("identity");
    let cert = CertificateDer::from_pem_file(dir.join("node.crt")).expect("node.crt");
    let key = PrivateKeyDer::from_pem_file(dir.join("node.key")).expect("node.key");
    (vec![cert], key)
}

#[test]
fn a_node_with_a_certificate_logs_in_to_a_tls_hub_without_its_token() {
    let mut mesh = Mesh::new("dtls", 2, Vec::new());
    let ca = serve_hub_tls(&mut mesh);
    mesh.start_cloud();
    mesh.create_tokens();
    mesh.start_node(0);
    mesh.wait_synced(0);
    let fp = wait_for("edge-0 certified", WAIT, || held(&mesh, 0));
    wait_everywhere(&mesh, &[0], "edge-0", Some(&fp), false);

    // Restarted with no token at all: the certificate logs it in.
    mesh.stop_node(0, libc::SIGTERM);
    mesh.nodes[0].token.clear();
    mesh.start_node(0);
    mesh.wait_synced(0);
    let v = mesh.put(
        "/api/v1/namespaces/default/services/hello",
        &edgemesh_e2e::mesh::service_json("hello", 80, 80),
    );
    mesh.wait_version(0, v, WAIT);
    assert_eq!(held(&mesh, 0), Some(fp.clone()), "the same certificate");

    // Only for its own name, only while it has a token, never from another CA.
    let (ns, ip) = (mesh.cloud.ns.clone(), mesh.cloud.ip);
    let data_dir = mesh.nodes[0].data_dir.clone();
    let auth = || Some(node_auth(&data_dir));
    assert_eq!(tls_login(&ns, ip, &ca, "edge-0", auth()), Ok(()));
    assert_eq!(tls_login(&ns, ip, &ca, "edge-1", auth()), Err(401));
    assert_eq!(tls_login(&ns, ip, &ca, "edge-0", None), Err(401));
    let stranger_dir = mesh.topo.dir().join("stranger");
    let stranger = Identity::open(&stranger_dir, "edge-0").expect("id");
    assert_eq!(
        tls_login(
            &ns,
            ip,
            &ca,
            "edge-0",
            Some(self_signed(&stranger_dir, &stranger))
        ),
        Err(0),
        "a certificate of another CA fails the TLS handshake"
    );
    // The agent may have been replaced by these logins; it comes back.
    mesh.wait_synced(0);
    let (s, _) = mesh.api("DELETE", "/api/v1/nodes/edge-0/token", None);
    assert_eq!(s, 200);
    assert_eq!(tls_login(&ns, ip, &ca, "edge-0", auth()), Err(401));
    wait_for("edge-0 refused without a token", WAIT, || {
        mesh.sync_status(0)["status"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("401"))
            .then_some(())
    });
}

/// A self-signed certificate for the node name and key of an identity kept under `data_dir`:
/// what a node would present if it made its own certificate instead of asking the mesh CA.
fn self_signed(
    data_dir: &Path,
    id: &Identity,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let pem = std::fs::read_to_string(data_dir.join("identity/node.key")).expect("node.key");
    let key = rcgen::KeyPair::from_pem(&pem).expect("key");
    let cert = rcgen::CertificateParams::new(vec![id.node().to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    (vec![cert.der().clone()], id.private_key())
}

/// Runs the `cloudcore` CLI in the cloud namespace against the test's cloudcore.
fn cli(mesh: &Mesh, args: &[&str]) -> String {
    let server = format!("CLOUDCORE_SERVER={}", mesh.api_url(""));
    let out = mesh.topo.exec(
        &mesh.cloud,
        &[
            "env",
            &server,
            &bin("cloudcore").display().to_string(),
            "--data-dir",
            &mesh.cloud_dir.display().to_string(),
        ]
        .into_iter()
        .chain(args.iter().copied())
        .collect::<Vec<_>>(),
    );
    assert!(
        out.status.success(),
        "cloudcore {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The peers node `i` may connect to directly, with their candidates' addresses.
fn peers(mesh: &Mesh, i: usize) -> BTreeMap<String, Vec<String>> {
    direct(mesh, i)["peers"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let addrs = v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c["address"].as_str().map(String::from))
                        .collect();
                    (k.clone(), addrs)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn wait_peers(mesh: &Mesh, i: usize, want: &[&str]) -> BTreeMap<String, Vec<String>> {
    wait_for(&format!("node {i} has peers {want:?}"), WAIT, || {
        let p = peers(mesh, i);
        (p.keys().map(String::as_str).collect::<Vec<_>>() == want).then_some(p)
    })
}

fn community_on_node(mesh: &Mesh, i: usize, name: &str) -> Option<String> {
    node_objects(&mesh.node_db(i))
        .1
        .get(&format!("_/community/{name}"))
        .cloned()
}

#[test]
fn communities_through_rest_apply_get_delete_and_sync_decide_who_gets_candidates() {
    let mesh = Mesh::start("dcomm", 3);
    let lan = r#"{"apiVersion":"edgemesh.io/v1alpha1","kind":"Community","metadata":{"name":"lan"},"spec":{"members":["edge-0","edge-1"]}}"#;
    let (s, v) = mesh.api("PUT", "/api/v1/communities/lan", Some(lan));
    assert_eq!(s, 201, "{v}");
    let (s, v) = mesh.api("GET", "/api/v1/communities/lan", None);
    assert_eq!(
        (s, &v["spec"]["members"][1]),
        (200, &Value::from("edge-1")),
        "{v}"
    );
    let (s, v) = mesh.api("GET", "/api/v1/communities", None);
    assert_eq!(s, 200);
    assert_eq!(v["kind"], "CommunityList");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(1), "{v}");
    // Bad input is refused naming the field, and stores nothing.
    for (body, status, field) in [
        (
            r#"{"metadata":{"name":"x"},"spec":{"members":["Bad_Name"]}}"#,
            422,
            "spec.members[0]",
        ),
        (r#"{"metadata":{"name":"x"},"spec":{}}"#, 422, "spec"),
        (
            r#"{"metadata":{"name":"x"},"spec":{"nodeSelector":{"matchExpressions":[]}}}"#,
            422,
            "spec.nodeSelector.matchExpressions",
        ),
        (
            r#"{"metadata":{"name":"y"},"spec":{"members":["a"]}}"#,
            400,
            "metadata.name",
        ),
    ] {
        let (s, v) = mesh.api("PUT", "/api/v1/communities/x", Some(body));
        assert_eq!(
            (s, v["field"].as_str()),
            (status, Some(field)),
            "{body}: {v}"
        );
    }
    assert_eq!(mesh.api("GET", "/api/v1/communities/x", None).0, 404);

    // Synced to every node; the two members get each other's candidates, the third nothing.
    for i in 0..3 {
        wait_for(&format!("node {i} has the community"), WAIT, || {
            community_on_node(&mesh, i, "lan")
        });
    }
    let p0 = wait_peers(&mesh, 0, &["edge-1"]);
    assert!(
        p0["edge-1"].contains(&format!("{}:10004", mesh.nodes[1].host.ip)),
        "edge-1's LAN address is a candidate: {p0:?}"
    );
    wait_peers(&mesh, 1, &["edge-0"]);
    assert!(peers(&mesh, 2).is_empty());
    // The peer book is on disk for offline use.
    let book = std::fs::read_to_string(mesh.nodes[0].data_dir.join("direct-peers.json"))
        .expect("peer book");
    assert!(book.contains("edge-1"), "{book}");

    // Deleted: gone from every node, and the candidates are taken back.
    let (s, _) = mesh.api("DELETE", "/api/v1/communities/lan", None);
    assert_eq!(s, 200);
    for i in 0..3 {
        wait_for(&format!("node {i} dropped the community"), WAIT, || {
            community_on_node(&mesh, i, "lan").is_none().then_some(())
        });
    }
    wait_peers(&mesh, 0, &[]);
    wait_peers(&mesh, 1, &[]);

    // Through the CLI: a whole site by label plus one node by name.
    let manifest = mesh.topo.write_file(
        "site.yaml",
        "apiVersion: edgemesh.io/v1alpha1\nkind: Community\nmetadata:\n  name: site\nspec:\n  members: [edge-2]\n  nodeSelector:\n    matchLabels:\n      zone: z0\n",
    );
    let out = cli(&mesh, &["apply", "-f", &manifest.display().to_string()]);
    assert!(out.contains("community/site created"), "{out}");
    let table = cli(&mesh, &["get", "communities"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("site "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("edge-2") && row.contains("zone=z0"), "{table}");
    wait_peers(&mesh, 0, &["edge-2"]);
    wait_peers(&mesh, 2, &["edge-0"]);
    assert!(peers(&mesh, 1).is_empty());
    let out = cli(&mesh, &["delete", "community", "site"]);
    assert!(out.contains("site"), "{out}");
    assert_eq!(mesh.api("GET", "/api/v1/communities/site", None).0, 404);
    wait_peers(&mesh, 0, &[]);
    wait_peers(&mesh, 2, &[]);
}

#[test]
fn a_node_behind_a_nat_learns_the_address_its_nat_maps_it_to() {
    let mut mesh = Mesh::new("dnat", 1, Vec::new());
    // A router on the "internet" switch with a node behind it: MASQUERADE out, only replies
    // in, and no new UDP to the router itself (a peer's early probe must not take the port).
    let (router, behind) = edgemesh_e2e::direct::nat_router(&mut mesh, "r1", "natnode", false);
    mesh.nodes.push(EdgeNode {
        name: "edge-nat".into(),
        data_dir: mesh.topo.dir().join("edge-nat-data"),
        host: behind.clone(),
        token: String::new(),
        labels: "{zone=\"behind\"}".into(),
        proc: None,
        extra: Vec::new(),
        env: Vec::new(),
    });
    mesh.start_cloud();
    mesh.create_tokens();
    for i in 0..2 {
        mesh.start_node(i);
        mesh.wait_synced(i);
    }
    let community = r#"{"metadata":{"name":"pair"},"spec":{"members":["edge-0","edge-nat"]}}"#;
    assert_eq!(
        mesh.api("PUT", "/api/v1/communities/pair", Some(community))
            .0,
        201
    );

    let reflexive: std::net::SocketAddr = wait_for("edge-nat's reflexive address", WAIT, || {
        direct(&mesh, 1)["reflexive"].as_str()?.parse().ok()
    });
    assert_eq!(
        reflexive.ip(),
        router.ip,
        "the cloud saw the router's address"
    );
    // The port is the one the router's conntrack maps the node's direct socket to.
    let table = mesh.topo.exec(&router, &["cat", "/proc/net/nf_conntrack"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let entry = table
        .lines()
        .find(|l| {
            l.contains(" udp ")
                && l.contains(&format!("src={} dst={}", behind.ip, mesh.cloud.ip))
                && l.contains("sport=10004 dport=10004")
        })
        .unwrap_or_else(|| panic!("no conntrack entry for the probe:\n{table}"));
    let mapped = entry
        .split_whitespace()
        .filter_map(|f| f.strip_prefix("dport="))
        .nth(1)
        .expect("reply dport");
    assert_eq!(mapped, reflexive.port().to_string(), "{entry}");

    // The peer gets both: the LAN address (no use from outside) and the NAT's.
    let p = wait_for("edge-0 has edge-nat's reflexive candidate", WAIT, || {
        let p = peers(&mesh, 0);
        p.get("edge-nat")
            .filter(|c| c.contains(&reflexive.to_string()))
            .cloned()
    });
    assert!(p.contains(&format!("{}:10004", behind.ip)), "{p:?}");

    // Not an open reflector: probes that are not a node's get nothing back.
    let cloud = std::net::SocketAddr::from((mesh.cloud.ip, 10004));
    let silent = in_netns(&mesh.nodes[0].host.ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut forged = vec![0u8; 320];
        forged[..4].copy_from_slice(b"EMP1");
        forged[4] = 6;
        forged[5..11].copy_from_slice(b"edge-0");
        for probe in [&b"hello"[..], &forged, &[0u8; 1400]] {
            sock.send_to(probe, cloud).expect("send");
        }
        let mut buf = [0u8; 2048];
        sock.recv_from(&mut buf).is_err()
    });
    assert!(
        silent,
        "the reflexive-address service answered a forged probe"
    );
}
