//! A highly available cloud for end-to-end tests: three etcd members (data on tmpfs), cloudcore
//! replicas sharing them, and the edge nodes of a [`Mesh`] with every replica in their
//! `cloud.url`. Each member and replica has a namespace of its own, so a test can cut one off
//! with iptables or kill it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{bin, wait_for, Host, ProcId};
use crate::mesh::{Mesh, API_PORT, HUB_PORT};

pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
pub const CLUSTER_PORT: u16 = 10003;
pub const ROUTER_PORT: u16 = 9443;
/// The API token every replica accepts.
pub const API_TOKEN: &str = "ha-test-api-token-0123456789";

pub struct Member {
    pub host: Host,
    pub data: PathBuf,
    pub proc: Option<ProcId>,
}

pub struct Replica {
    pub host: Host,
    pub dir: PathBuf,
    pub proc: Option<ProcId>,
}

pub struct Ha {
    pub mesh: Mesh,
    pub members: Vec<Member>,
    pub replicas: Vec<Replica>,
    pub key_file: PathBuf,
}

impl Drop for Ha {
    fn drop(&mut self) {
        // The topology kills the processes; their tmpfs data goes here.
        for m in &self.members {
            if let Some(p) = m.proc {
                self.mesh.topo.kill(p, libc::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(&m.data);
        }
    }
}

impl Ha {
    /// Hosts for `replicas` cloudcores (the first is the mesh's `cloud`), three etcd members
    /// and `nodes` edge nodes; etcd is started, nothing else.
    pub fn new(tag: &str, replicas: usize, nodes: usize) -> Ha {
        for (tool, package) in [("etcd", "etcd-server"), ("etcdctl", "etcd-client")] {
            assert!(
                std::process::Command::new(tool)
                    .arg("version")
                    .output()
                    .is_ok(),
                "{tool} is required (apt-get install {package})"
            );
        }
        let mut mesh = Mesh::new(tag, nodes, Vec::new());
        mesh.api_token = API_TOKEN.to_string();
        let mut hosts = vec![mesh.cloud.clone()];
        for r in 1..replicas {
            hosts.push(mesh.topo.add_host(&format!("r{r}")));
        }
        let shm = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let members: Vec<Member> = (0..3)
            .map(|i| {
                let host = mesh.topo.add_host(&format!("etcd{i}"));
                let data = shm.join(format!("{}-etcd{i}", host.ns));
                let _ = std::fs::remove_dir_all(&data);
                Member {
                    host,
                    data,
                    proc: None,
                }
            })
            .collect();
        let key_file = mesh.topo.write_file(
            "peer.key",
            "c2e1a7f0d3b4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6\n",
        );
        let replicas = hosts
            .into_iter()
            .enumerate()
            .map(|(i, host)| Replica {
                dir: mesh.topo.dir().join(format!("replica-{i}")),
                host,
                proc: None,
            })
            .collect();
        let mut ha = Ha {
            mesh,
            members,
            replicas,
            key_file,
        };
        ha.mesh.cloud_urls = ha.hub_urls();
        for i in 0..3 {
            ha.start_member(i);
        }
        ha
    }

    /// Three etcd members, `replicas` cloudcores, `nodes` nodes: all up, nodes synced and
    /// spread so that node `i` starts on replica `i % replicas`.
    pub fn start(tag: &str, replicas: usize, nodes: usize) -> Ha {
        let mut ha = Ha::new(tag, replicas, nodes);
        for r in 0..replicas {
            ha.spawn_replica(r);
        }
        for r in 0..replicas {
            ha.wait_replica_ready(r);
        }
        ha.mesh.create_tokens();
        for i in 0..nodes {
            ha.spawn_node_on(i, i % replicas);
        }
        for i in 0..nodes {
            ha.mesh.wait_node_alive(i);
            ha.mesh.wait_synced(i);
        }
        ha
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("e{i}=http://{}:{ETCD_PEER_PORT}", m.host.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn start_member(&mut self, i: usize) {
        let host = self.members[i].host.clone();
        let client = format!("http://{}:{ETCD_CLIENT_PORT}", host.ip);
        let peer = format!("http://{}:{ETCD_PEER_PORT}", host.ip);
        let state = if self.members[i].data.exists() {
            "existing"
        } else {
            "new"
        };
        let args: Vec<String> = [
            "--name",
            &format!("e{i}"),
            "--data-dir",
            &self.members[i].data.display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &self.initial_cluster(),
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            &self.mesh.cloud.ns,
            // Short elections: a lost leader is replaced within about a second.
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "1000",
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = self.mesh.topo.spawn(
            &host,
            &format!("etcd{i}"),
            std::path::Path::new("/usr/bin/etcd"),
            &args,
            &[],
        );
        self.members[i].proc = Some(p);
    }

    pub fn stop_member(&mut self, i: usize, sig: i32) {
        if let Some(p) = self.members[i].proc.take() {
            self.mesh.topo.kill(p, sig);
            let _ = self.mesh.topo.wait_exit(p, Duration::from_secs(10));
        }
    }

    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}:{ETCD_CLIENT_PORT}", m.host.ip))
            .collect()
    }

    pub fn hub_urls(&self) -> Vec<String> {
        self.replicas
            .iter()
            .map(|r| format!("ws://{}:{HUB_PORT}", r.host.ip))
            .collect()
    }

    /// The member etcd names leader, asked through `etcdctl` from the first replica's host.
    pub fn etcd_leader(&self) -> Option<usize> {
        let endpoints = self.etcd_endpoints().join(",");
        let out = self.mesh.topo.exec(
            &self.replicas[0].host,
            &[
                "etcdctl",
                "--endpoints",
                &endpoints,
                "endpoint",
                "status",
                "-w",
                "json",
            ],
        );
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let items = v.as_array()?;
        let leader = items.iter().find_map(|e| e["Status"]["leader"].as_u64())?;
        items.iter().find_map(|e| {
            (e["Status"]["header"]["member_id"].as_u64() == Some(leader)).then(|| {
                let ep = e["Endpoint"].as_str().unwrap_or_default();
                self.members
                    .iter()
                    .position(|m| ep.contains(&m.host.ip.to_string()))
            })?
        })
    }

    pub fn spawn_replica(&mut self, r: usize) {
        assert!(self.replicas[r].proc.is_none(), "replica {r} runs");
        let host = self.replicas[r].host.clone();
        let sets = [
            format!("hub.listen=\"{}:{HUB_PORT}\"", host.ip),
            format!("api.listen=\"{}:{API_PORT}\"", host.ip),
            format!("router.listen=\"{}:{ROUTER_PORT}\"", host.ip),
            format!("cluster.listen=\"{}:{CLUSTER_PORT}\"", host.ip),
            format!("cluster.advertise_url=\"ws://{}:{CLUSTER_PORT}\"", host.ip),
            format!("cluster.name=\"r{r}\""),
            format!("cluster.peer_key_file=\"{}\"", self.key_file.display()),
            "store.backend=\"etcd\"".into(),
            format!("store.etcd.endpoints={:?}", self.etcd_endpoints()),
            format!("api.token=\"{API_TOKEN}\""),
            "hub.keepalive_interval=\"1s\"".into(),
            "hub.node_timeout=\"4s\"".into(),
        ];
        let mut args = vec![
            "--data-dir".to_string(),
            self.replicas[r].dir.display().to_string(),
        ];
        for s in sets {
            args.push("--set".into());
            args.push(s);
        }
        let p = self.mesh.topo.spawn(
            &host,
            &format!("cloudcore-r{r}"),
            &bin("cloudcore"),
            &args,
            &[("RUST_LOG", "info")],
        );
        self.replicas[r].proc = Some(p);
    }

    pub fn wait_replica_ready(&self, r: usize) {
        wait_for(
            &format!("replica r{r} ready"),
            Duration::from_secs(30),
            || (self.readyz(r).0 == 200).then_some(()),
        );
    }

    pub fn readyz(&self, r: usize) -> (u16, Value) {
        self.mesh
            .api_at(&self.replicas[r].host, "GET", "/readyz", None)
    }

    pub fn kill_replica(&mut self, r: usize, sig: i32) {
        if let Some(p) = self.replicas[r].proc.take() {
            self.mesh.topo.kill(p, sig);
            let _ = self.mesh.topo.wait_exit(p, Duration::from_secs(15));
        }
    }

    pub fn api(&self, r: usize, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.mesh.api_at(&self.replicas[r].host, method, path, body)
    }

    /// Starts node `i` with the replicas' URLs ordered so that it connects to `r` first.
    pub fn spawn_node_on(&mut self, i: usize, r: usize) {
        let urls = self.hub_urls();
        let n = urls.len();
        let first = edgehub::client::first_url(&self.mesh.nodes[i].name, n);
        // The client starts at index `first`: put replica r there.
        let mut ordered = vec![String::new(); n];
        for k in 0..n {
            ordered[(first + k) % n] = urls[(r + k) % n].clone();
        }
        self.mesh.cloud_urls = ordered;
        self.mesh.spawn_node(i);
        self.mesh.cloud_urls = self.hub_urls();
    }

    /// Which replica holds node `i`, as replica `asked` reports it.
    pub fn holder(&self, asked: usize, i: usize) -> Option<String> {
        let (s, v) = self.api(
            asked,
            "GET",
            &format!("/api/v1/nodes/{}", self.mesh.nodes[i].name),
            None,
        );
        if s != 200 || v["status"]["online"] != true {
            return None;
        }
        v["status"]["replica"].as_str().map(str::to_string)
    }

    /// Waits until every live replica reports node `i` online at a replica; returns it.
    pub fn wait_held(&self, i: usize, timeout: Duration) -> String {
        let live: Vec<usize> = (0..self.replicas.len())
            .filter(|r| self.replicas[*r].proc.is_some())
            .collect();
        wait_for(
            &format!(
                "{} held by one replica, seen by all",
                self.mesh.nodes[i].name
            ),
            timeout,
            || {
                let seen: Vec<Option<String>> = live.iter().map(|r| self.holder(*r, i)).collect();
                let first = seen.first()?.clone()?;
                seen.iter()
                    .all(|s| s.as_deref() == Some(&first))
                    .then_some(first)
            },
        )
    }

    /// The store version a replica reports (`GET /api/v1/services` list metadata).
    pub fn version(&self, r: usize) -> u64 {
        let (s, v) = self.api(r, "GET", "/api/v1/services", None);
        assert_eq!(s, 200, "list on r{r}: {v}");
        v["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Waits until every running node has committed `version`, bounded.
    pub fn wait_nodes_at(&self, version: u64, timeout: Duration) {
        let start = Instant::now();
        for i in 0..self.mesh.nodes.len() {
            if self.mesh.nodes[i].proc.is_some() {
                let left = timeout
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_secs(1));
                self.mesh.wait_version(i, version, left);
            }
        }
    }

    /// Cuts replica `r` off from every etcd member (iptables in its namespace), or heals it.
    pub fn cut_from_etcd(&self, r: usize, cut: bool) {
        let host = &self.replicas[r].host;
        for m in &self.members {
            let ip = m.host.ip.to_string();
            let action = if cut { "-I" } else { "-D" };
            for chain in ["OUTPUT", "INPUT"] {
                let dir = if chain == "OUTPUT" { "-d" } else { "-s" };
                let out = self
                    .mesh
                    .topo
                    .exec(host, &["iptables", action, chain, dir, &ip, "-j", "DROP"]);
                assert!(
                    out.status.success(),
                    "iptables: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    pub fn replica_log(&self, r: usize) -> String {
        self.replicas[r]
            .proc
            .map(|p| self.mesh.topo.log(p))
            .unwrap_or_default()
    }
}

/// What a store holds: version, history chain, and every object as resource → exact JSON.
#[derive(Debug, PartialEq, Eq)]
pub struct StoreState {
    pub version: u64,
    pub chain: String,
    pub objects: std::collections::BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct RawList {
    metadata: Value,
    items: Vec<Box<serde_json::value::RawValue>>,
}

impl Ha {
    /// The cloud's state: the objects as replica `r` lists them (exact stored JSON), and the
    /// version and chain of etcd's head, read with `etcdctl`.
    pub fn cloud_state(&self, r: usize) -> StoreState {
        let mut objects = std::collections::BTreeMap::new();
        for (path, kind) in [
            ("/api/v1/services", "service"),
            ("/api/v1/endpoints", "endpoints"),
        ] {
            let url = format!("http://{}:{API_PORT}{path}", self.replicas[r].host.ip);
            let auth = format!("Authorization: Bearer {API_TOKEN}");
            let (s, text) = self
                .mesh
                .topo
                .curl(&self.replicas[r].host, &["-H", &auth, &url]);
            assert_eq!(s, 200, "{path}: {text}");
            let list: RawList = serde_json::from_str(&text).expect("list");
            let _ = list.metadata;
            for item in list.items {
                let v: Value = serde_json::from_str(item.get()).expect("item");
                let m = &v["metadata"];
                let key = format!(
                    "{}/{kind}/{}",
                    m["namespace"].as_str().unwrap_or_default(),
                    m["name"].as_str().unwrap_or_default()
                );
                objects.insert(key, item.get().to_string());
            }
        }
        let out = self.mesh.topo.exec(
            &self.replicas[r].host,
            &[
                "etcdctl",
                "--endpoints",
                &self.etcd_endpoints().join(","),
                "get",
                "--print-value-only",
                "/edgemesh/meta/head",
            ],
        );
        let head = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let (version, chain) = head.split_once(' ').unwrap_or((&head, ""));
        StoreState {
            version: version.parse().unwrap_or(0),
            chain: chain.to_string(),
            objects,
        }
    }

    /// Node `i`'s committed state (Services and Endpoints; Node objects carry live labels).
    pub fn node_state(&self, i: usize) -> StoreState {
        let db = self.mesh.node_db(i);
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .expect("node db");
        conn.busy_timeout(Duration::from_secs(5)).expect("busy");
        let (version, chain): (i64, String) = conn
            .query_row(
                "SELECT version, chain FROM sync_state WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap_or((0, String::new()));
        let mut stmt = conn
            .prepare("SELECT key, value FROM meta WHERE type IN ('service', 'endpoints')")
            .expect("prepare");
        let objects = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        StoreState {
            version: version as u64,
            chain,
            objects,
        }
    }
}
