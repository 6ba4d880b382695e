//! A running mesh for end-to-end tests: cloudcore in a `cloud` namespace and edgemesh agents
//! in node namespaces, with helpers to call the REST API (real `curl`), read each node's admin
//! API, compare SQLite stores, and run code inside a namespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{bin, wait_for, Host, ProcId, Topology};

pub const HUB_PORT: u16 = 10000;
pub const API_PORT: u16 = 10002;
pub const ADMIN: &str = "127.0.0.1:10550";

/// One edge node of the mesh.
pub struct EdgeNode {
    pub name: String,
    pub host: Host,
    pub data_dir: PathBuf,
    pub token: String,
    pub labels: String,
    pub proc: Option<ProcId>,
    /// Extra `--set` overrides for this node.
    pub extra: Vec<String>,
    /// Extra environment for this node's process.
    pub env: Vec<(String, String)>,
}

pub struct Mesh {
    pub topo: Topology,
    pub cloud: Host,
    pub cloud_dir: PathBuf,
    pub cloud_proc: Option<ProcId>,
    /// Extra `--set` overrides for cloudcore.
    pub cloud_extra: Vec<String>,
    /// Extra environment for cloudcore's process.
    pub cloud_env: Vec<(String, String)>,
    pub api_token: String,
    pub nodes: Vec<EdgeNode>,
    /// `http` or `https`.
    pub api_scheme: &'static str,
    pub ca_cert: Option<PathBuf>,
    /// Hub URLs of every node instead of the one cloud's (a cloud of several replicas).
    pub cloud_urls: Vec<String>,
}

impl Mesh {
    /// A cloud and `nodes` edge nodes (`edge-0`, `edge-1`, ...), all started and synced.
    pub fn start(tag: &str, nodes: usize) -> Mesh {
        let mut mesh = Mesh::new(tag, nodes, Vec::new());
        mesh.start_cloud();
        mesh.create_tokens();
        for i in 0..nodes {
            mesh.start_node(i);
        }
        for i in 0..nodes {
            mesh.wait_synced(i);
        }
        mesh
    }

    /// Hosts and directories only; nothing started.
    pub fn new(tag: &str, nodes: usize, cloud_extra: Vec<String>) -> Mesh {
        crate::harness::require_root();
        let mut topo = Topology::new(tag);
        let cloud = topo.add_host("cloud");
        let cloud_dir = topo.dir().join("cloud-data");
        let mut list = Vec::new();
        for i in 0..nodes {
            let host = topo.add_host(&format!("n{i}"));
            list.push(EdgeNode {
                name: format!("edge-{i}"),
                data_dir: topo.dir().join(format!("edge-{i}-data")),
                host,
                token: String::new(),
                labels: format!("{{zone=\"z{i}\"}}"),
                proc: None,
                extra: Vec::new(),
                env: Vec::new(),
            });
        }
        Mesh {
            topo,
            cloud,
            cloud_dir,
            cloud_proc: None,
            cloud_extra,
            cloud_env: Vec::new(),
            api_token: String::new(),
            nodes: list,
            api_scheme: "http",
            ca_cert: None,
            cloud_urls: Vec::new(),
        }
    }

    pub fn hub_url(&self) -> String {
        let scheme = if self.api_scheme == "https" {
            "wss"
        } else {
            "ws"
        };
        format!("{scheme}://{}:{HUB_PORT}", self.cloud.ip)
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("{}://{}:{API_PORT}{path}", self.api_scheme, self.cloud.ip)
    }

    pub fn start_cloud(&mut self) {
        self.spawn_cloud();
        self.wait_cloud_ready();
    }

    /// Starts cloudcore without waiting for it.
    pub fn spawn_cloud(&mut self) {
        assert!(self.cloud_proc.is_none(), "cloudcore already running");
        let mut args = vec![
            "--data-dir".to_string(),
            self.cloud_dir.display().to_string(),
            "--set".into(),
            format!("hub.listen=\"{}:{HUB_PORT}\"", self.cloud.ip),
            "--set".into(),
            format!("api.listen=\"{}:{API_PORT}\"", self.cloud.ip),
            "--set".into(),
            "hub.keepalive_interval=\"1s\"".into(),
            "--set".into(),
            "hub.node_timeout=\"4s\"".into(),
        ];
        for e in &self.cloud_extra {
            args.push("--set".into());
            args.push(e.clone());
        }
        let mut env = vec![("RUST_LOG", "info")];
        env.extend(self.cloud_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let p = self.topo.spawn(
            &self.cloud.clone(),
            "cloudcore",
            &bin("cloudcore"),
            &args,
            &env,
        );
        self.cloud_proc = Some(p);
    }

    /// Waits until cloudcore's `/readyz` answers 200, then reads the API token it generated.
    pub fn wait_cloud_ready(&mut self) {
        let url = self.api_url("/readyz");
        let cacert = self.ca_cert.clone();
        wait_for("cloudcore ready", Duration::from_secs(20), || {
            let mut a = vec![url.as_str()];
            let ca;
            if let Some(c) = &cacert {
                ca = c.display().to_string();
                a.extend(["--cacert", ca.as_str()]);
            }
            let (s, _) = self.topo.curl(&self.cloud, &a);
            (s == 200).then_some(())
        });
        if self.api_token.is_empty() {
            self.api_token = std::fs::read_to_string(self.cloud_dir.join("api-token"))
                .expect("api-token file")
                .trim()
                .to_string();
        }
    }

    /// Kills cloudcore with `sig` (SIGTERM = clean stop, SIGKILL = crash) and reaps it.
    pub fn stop_cloud(&mut self, sig: i32) {
        if let Some(p) = self.cloud_proc.take() {
            self.topo.kill(p, sig);
            self.topo
                .wait_exit(p, Duration::from_secs(15))
                .expect("cloudcore exits");
        }
    }

    pub fn create_tokens(&mut self) {
        for i in 0..self.nodes.len() {
            let name = self.nodes[i].name.clone();
            self.nodes[i].token = self.create_token(&name);
        }
    }

    pub fn create_token(&self, node: &str) -> String {
        let (s, v) = self.api("POST", &format!("/api/v1/nodes/{node}/token"), None);
        assert_eq!(s, 201, "token for {node}: {v}");
        v["token"].as_str().expect("token").to_string()
    }

    pub fn start_node(&mut self, i: usize) {
        self.spawn_node(i);
        self.wait_node_alive(i);
    }

    /// Starts node `i`'s agent without waiting for it.
    pub fn spawn_node(&mut self, i: usize) {
        assert!(self.nodes[i].proc.is_none(), "node {i} already running");
        let n = &self.nodes[i];
        let mut args = vec![
            "--node-name".to_string(),
            n.name.clone(),
            "--data-dir".into(),
            n.data_dir.display().to_string(),
            "--set".into(),
            if self.cloud_urls.is_empty() {
                format!("cloud.url=\"{}\"", self.hub_url())
            } else {
                format!("cloud.url={:?}", self.cloud_urls)
            },
            "--admin-listen".into(),
            ADMIN.into(),
            "--set".into(),
            format!("labels={}", n.labels),
            "--set".into(),
            "cloud.keepalive_interval=\"1s\"".into(),
            "--set".into(),
            "cloud.keepalive_timeout=\"4s\"".into(),
            "--set".into(),
            "cloud.backoff_max=\"1s\"".into(),
        ];
        // No token: a node that holds a certificate logs in to a TLS hub with it.
        if !n.token.is_empty() {
            args.extend(["--token".into(), n.token.clone()]);
        }
        if let Some(ca) = &self.ca_cert {
            args.push("--set".into());
            args.push(format!("cloud.ca_cert=\"{}\"", ca.display()));
        }
        for e in &n.extra {
            args.push("--set".into());
            args.push(e.clone());
        }
        let host = n.host.clone();
        let name = n.name.clone();
        let mut env = vec![("RUST_LOG", "info")];
        env.extend(n.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let p = self.topo.spawn(&host, &name, &bin("edgemesh"), &args, &env);
        self.nodes[i].proc = Some(p);
    }

    /// Waits until node `i`'s admin API answers `/healthz`.
    pub fn wait_node_alive(&mut self, i: usize) {
        let host = self.nodes[i].host.clone();
        let name = self.nodes[i].name.clone();
        wait_for(
            &format!("{name} admin API"),
            Duration::from_secs(20),
            || {
                let (s, _) = self.topo.curl(&host, &[&format!("http://{ADMIN}/healthz")]);
                (s == 200).then_some(())
            },
        );
    }

    pub fn stop_node(&mut self, i: usize, sig: i32) {
        if let Some(p) = self.nodes[i].proc.take() {
            self.topo.kill(p, sig);
            self.topo
                .wait_exit(p, Duration::from_secs(15))
                .expect("edgemesh exits");
        }
    }

    /// Calls the REST API with curl from the cloud namespace; returns status and JSON body.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.api_at(&self.cloud, method, path, body)
    }

    /// [`Mesh::api`] against the cloudcore on `host` (one replica of several).
    pub fn api_at(
        &self,
        host: &Host,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let url = format!("{}://{}:{API_PORT}{path}", self.api_scheme, host.ip);
        let auth = format!("Authorization: Bearer {}", self.api_token);
        let mut args = vec!["-X", method, "-H", auth.as_str(), url.as_str()];
        if let Some(b) = body {
            args.extend(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let ca;
        if let Some(c) = &self.ca_cert {
            ca = c.display().to_string();
            args.extend(["--cacert", ca.as_str()]);
        }
        let (s, text) = self.topo.curl(host, &args);
        (
            s,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// PUTs an object and asserts success; returns its resource version.
    pub fn put(&self, path: &str, body: &str) -> u64 {
        let (s, v) = self.api("PUT", path, Some(body));
        assert!(s == 200 || s == 201, "PUT {path}: {s} {v}");
        v["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect("resourceVersion")
    }

    /// GET on a node's admin API.
    pub fn admin(&self, i: usize, path: &str) -> (u16, Value) {
        let (s, text) = self
            .topo
            .curl(&self.nodes[i].host, &[&format!("http://{ADMIN}{path}")]);
        (
            s,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn sync_status(&self, i: usize) -> Value {
        let (s, v) = self.admin(i, "/debug/sync");
        assert_eq!(s, 200, "/debug/sync of node {i}: {v}");
        v
    }

    pub fn wait_synced(&self, i: usize) {
        wait_for(
            &format!("{} synced", self.nodes[i].name),
            Duration::from_secs(20),
            || {
                let (s, v) = self.admin(i, "/debug/sync");
                (s == 200 && v["status"]["synced"] == true).then_some(())
            },
        );
    }

    /// Waits until node `i` has committed at least `version`.
    pub fn wait_version(&self, i: usize, version: u64, timeout: Duration) {
        wait_for(
            &format!("{} at version {version}", self.nodes[i].name),
            timeout,
            || {
                let (s, v) = self.admin(i, "/debug/sync");
                (s == 200 && v["store"]["version"].as_u64() >= Some(version)).then_some(())
            },
        );
    }

    pub fn cloud_db(&self) -> PathBuf {
        self.cloud_dir.join("cloudcore.db")
    }

    pub fn node_db(&self, i: usize) -> PathBuf {
        self.nodes[i].data_dir.join("edgemesh.db")
    }

    pub fn cloud_log(&self) -> String {
        self.cloud_proc
            .map(|p| self.topo.log(p))
            .unwrap_or_default()
    }
}

/// Every object in the cloud store: resource string → JSON, and the store version.
pub fn cloud_objects(db: &Path) -> (u64, BTreeMap<String, String>) {
    let conn = open_ro(db);
    let version: String = conn
        .query_row(
            "SELECT value FROM store_meta WHERE key = 'version'",
            [],
            |r| r.get(0),
        )
        .expect("version");
    let mut stmt = conn
        .prepare("SELECT kind, namespace, name, body FROM objects")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| {
            let kind: String = r.get(0)?;
            let ns: String = r.get(1)?;
            let name: String = r.get(2)?;
            let ns = if ns.is_empty() { "_".to_string() } else { ns };
            Ok((format!("{ns}/{kind}/{name}"), r.get::<_, String>(3)?))
        })
        .expect("query");
    let objects = rows.collect::<Result<_, _>>().expect("rows");
    (version.parse().expect("number"), objects)
}

/// Every object in a node's store (KubeEdge `meta` table) and its committed version.
pub fn node_objects(db: &Path) -> (u64, BTreeMap<String, String>) {
    let conn = open_ro(db);
    let version: i64 = conn
        .query_row("SELECT version FROM sync_state WHERE id = 1", [], |r| {
            r.get(0)
        })
        .unwrap_or(0);
    let mut stmt = conn
        .prepare("SELECT key, value FROM meta")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .expect("query");
    let objects = rows.collect::<Result<_, _>>().expect("rows");
    (version as u64, objects)
}

fn open_ro(db: &Path) -> rusqlite::Connection {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    conn
}

/// Runs `f` on a thread that joined the network namespace `ns`: sockets it opens live there.
/// Lets a test speak raw protocols to a process inside the topology without a helper binary.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// A service manifest with one port.
pub fn service_json(name: &str, port: u16, target: u16) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"ports":[{{"name":"http","port":{port},"targetPort":{target},"protocol":"TCP"}}]}}}}"#
    )
}

/// An Endpoints manifest with addresses `(ip, node)`.
pub fn endpoints_json(name: &str, port: u16, addrs: &[(&str, &str)]) -> String {
    let addresses: Vec<String> = addrs
        .iter()
        .map(|(ip, node)| format!(r#"{{"ip":"{ip}","nodeName":"{node}"}}"#))
        .collect();
    format!(
        r#"{{"apiVersion":"v1","kind":"Endpoints","metadata":{{"name":"{name}","namespace":"default"}},"subsets":[{{"addresses":[{}],"ports":[{{"name":"http","port":{port},"protocol":"TCP"}}]}}]}}"#,
        addresses.join(",")
    )
}

/// REST path of a Service in `default`.
pub fn svc_path(name: &str) -> String {
    format!("/api/v1/namespaces/default/services/{name}")
}

/// REST path of an Endpoints object in `default`.
pub fn ep_path(name: &str) -> String {
    format!("/api/v1/namespaces/default/endpoints/{name}")
}

/// Pods, servers and routes: what the data-path tests need on top of the metadata mesh.
impl Mesh {
    /// A pod namespace behind node `i` (see [`Topology::add_pod`]).
    pub fn add_pod(&mut self, i: usize, role: &str) -> Host {
        let node = self.nodes[i].host.clone();
        self.topo.add_pod(&node, role)
    }

    /// Starts `edgemesh-testserver MODE IP:PORT TEXT` in `pod` and waits until it accepts.
    pub fn serve(&mut self, pod: &Host, mode: &str, port: u16, text: &str) -> ProcId {
        let args = vec![
            mode.to_string(),
            format!("{}:{port}", pod.ip),
            text.to_string(),
        ];
        let p = self.topo.spawn(
            pod,
            &format!("{mode}-{}", pod.role),
            &bin("edgemesh-testserver"),
            &args,
            &[],
        );
        let addr = std::net::SocketAddr::from((pod.ip, port));
        let ns = pod.ns.clone();
        wait_for(
            &format!("{mode} server on {addr}"),
            Duration::from_secs(10),
            || {
                let ns = ns.clone();
                in_netns(&ns, move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
                })
                .map(drop)
            },
        );
        p
    }

    /// Creates (or replaces) Service `name` with one TCP port and `annotations`, and its
    /// Endpoints at `(ip, node)` on `target`; returns the cluster IP.
    pub fn put_service(
        &self,
        name: &str,
        port: u16,
        target: u16,
        annotations: &[(&str, &str)],
        addrs: &[(&str, &str)],
    ) -> String {
        let mut svc: Value = serde_json::from_str(&service_json(name, port, target)).expect("json");
        let (s, current) = self.api("GET", &svc_path(name), None);
        if s == 200 {
            svc["spec"]["clusterIP"] = current["spec"]["clusterIP"].clone();
        }
        for (k, v) in annotations {
            svc["metadata"]["annotations"][*k] = Value::String(v.to_string());
        }
        self.put(&svc_path(name), &svc.to_string());
        let v = self.put(&ep_path(name), &endpoints_json(name, target, addrs));
        for i in 0..self.nodes.len() {
            if self.nodes[i].proc.is_some() {
                self.wait_version(i, v, Duration::from_secs(10));
            }
        }
        self.cluster_ip(name)
    }

    pub fn cluster_ip(&self, name: &str) -> String {
        let (s, v) = self.api("GET", &svc_path(name), None);
        assert_eq!(s, 200, "GET service {name}: {v}");
        v["spec"]["clusterIP"]
            .as_str()
            .expect("clusterIP")
            .to_string()
    }

    /// Node `i`'s route for `addr` (`ip:port`) from `/debug/routes`, when it has one.
    pub fn route(&self, i: usize, addr: &str) -> Option<Value> {
        let (s, v) = self.admin(i, "/debug/routes");
        assert_eq!(s, 200, "/debug/routes: {v}");
        v["routes"]
            .as_array()?
            .iter()
            .find(|r| r["address"] == addr)
            .cloned()
    }

    /// Gives node `i` a route for the service range that stays on the node (its pod bridge), so
    /// that the node's own processes can call cluster IPs: a real node's default route covers
    /// the range for the kernel's first route lookup, before edgemesh's rules take the packet;
    /// the test nodes have no default route.
    pub fn route_service_range_on_node(&self, i: usize) {
        let out = self.topo.exec(
            &self.nodes[i].host,
            &["ip", "route", "add", "10.96.0.0/12", "dev", "cbr0"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A counter or gauge from node `i`'s `/metrics`, summed over the series whose labels
    /// contain every `labels` fragment (e.g. `service="default/web"`).
    pub fn metric(&self, i: usize, name: &str, labels: &[&str]) -> f64 {
        let (s, text) = self
            .topo
            .curl(&self.nodes[i].host, &[&format!("http://{ADMIN}/metrics")]);
        assert_eq!(s, 200, "/metrics: {text}");
        crate::dns::metric_sum(&text, name, labels)
    }

    /// [`Mesh::metric`] from cloudcore's `/metrics`.
    pub fn cloud_metric(&self, name: &str, labels: &[&str]) -> f64 {
        let (s, v) = self.api("GET", "/metrics", None);
        assert_eq!(s, 200, "cloudcore /metrics: {v}");
        crate::dns::metric_sum(v.as_str().unwrap_or_default(), name, labels)
    }

    /// `n` requests from `client` to `http://ip/`, each on a new connection; how many each
    /// server answered (the servers answer with their names).
    pub fn spread(&self, client: &Host, ip: &str, n: usize) -> BTreeMap<String, usize> {
        let url = format!("http://{ip}/?n=[1-{n}]");
        let out = self.topo.exec(
            client,
            &[
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "120",
                "-H",
                "Connection: close",
                &url,
            ],
        );
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut counts = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            *counts.entry(line.to_string()).or_default() += 1;
        }
        assert_eq!(counts.values().sum::<usize>(), n, "{counts:?}");
        counts
    }
}

/// Sends `total` pseudo-random bytes through `addr` to an echo server and checks that exactly
/// the same bytes come back, the echo server closing only after our half-close.
pub fn echo_transfer(ns: &str, addr: std::net::SocketAddr, total: usize) {
    use rand::{RngCore, SeedableRng};
    use std::io::{Read, Write};
    in_netns(ns, move || {
        let stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut writer = stream.try_clone().expect("clone");
        let sender = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                rng.fill_bytes(&mut chunk[..n]);
                writer.write_all(&chunk[..n]).expect("send");
                sent += n;
            }
            // Half-close: the echo server sees EOF only now, and answers the rest after it.
            writer
                .shutdown(std::net::Shutdown::Write)
                .expect("half-close");
        });
        let mut reader = stream;
        let mut expect = rand::rngs::StdRng::seed_from_u64(7);
        let mut buf = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        let mut received = 0usize;
        loop {
            let n = reader.read(&mut buf).expect("receive");
            if n == 0 {
                break;
            }
            // Regenerate the same stream in the same chunking as it was sent.
            let mut off = 0;
            while off < n {
                let pos = received % want.len();
                if pos == 0 {
                    let len = want.len().min(total - received);
                    expect.fill_bytes(&mut want[..len]);
                }
                let take = (n - off).min(want.len() - pos);
                assert!(
                    buf[off..off + take] == want[pos..pos + take],
                    "corrupt data at byte {received}"
                );
                off += take;
                received += take;
            }
        }
        sender.join().expect("sender");
        assert_eq!(received, total, "bytes echoed");
    });
}
