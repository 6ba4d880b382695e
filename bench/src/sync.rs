//! `edgemesh-bench sync`: the metadata-sync benchmark (see `scripts/bench/sync`).
//!
//! Phases, in this order so that each measures only what it is about:
//! 1. **memory** (on a fresh cloudcore, so that no memory freed by earlier phases is reused and
//!    looks free): M node tokens are created, cloudcore's RSS is read, M nodes connect (resuming
//!    from the store's current version, as a fleet does after a cloudcore restart, unless
//!    `--idle-sync fresh`) and stay idle, and the RSS is read again (also at M/2, for the
//!    marginal cost). Afterwards all but the first N nodes are deleted again, so that later
//!    snapshots do not carry M Node objects.
//! 2. **fan-out**: N fresh nodes connect and sync; W Services are written through the REST API
//!    one by one; every node records when each change arrived and when it acked it.
//! 3. **snapshot**: the N nodes are gone; S Services are loaded with `apply`; one fresh node
//!    receives and parses the full snapshot, which is then applied to a real `MetaManager`.
//! 4. **restart** (with `--restart-dir`): S Services and their Endpoints in one `apply` (a
//!    burst), cloudcore's RSS once it is quiet; then the script restarts cloudcore on the same
//!    data and the RSS is read again: memory kept after a burst against a fresh start.
//!
//! Nothing is ever sent anywhere but 127.0.0.1.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::ValueEnum;
use edgehub::metamanager::MetaManager;
use hyper::Method;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::api::Api;
use crate::node::{self, Fleet, NodeOpts, NodeReport, NodeSpec};
use crate::report::{self, ms, percentile, secs, thousands, Table};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IdleSync {
    /// Idle nodes resume from the store's current version (answer `current`): the steady
    /// state of a fleet, e.g. after a cloudcore restart.
    Resume,
    /// Idle nodes connect empty and each receive a full snapshot.
    Fresh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    Fanout,
    Snapshot,
    Memory,
    Restart,
}

#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    /// cloudcore's hub (websocket) address; must be 127.0.0.1.
    #[arg(long, default_value = "127.0.0.1:21000")]
    hub: SocketAddr,
    /// cloudcore's REST API address; must be 127.0.0.1.
    #[arg(long, default_value = "127.0.0.1:21002")]
    api: SocketAddr,
    /// REST API token.
    #[arg(long, env = "EDGEMESH_BENCH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// File holding the REST API token (cloudcore writes DATA_DIR/api-token).
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// cloudcore's process id, to read its RSS and CPU time from /proc.
    #[arg(long)]
    cloud_pid: u32,
    /// Nodes in the fan-out phase.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Nodes in the memory phase.
    #[arg(long, default_value_t = 10_000)]
    idle_nodes: usize,
    /// Writes in the fan-out phase.
    #[arg(long, default_value_t = 50)]
    writes: usize,
    /// Time between the starts of two writes.
    #[arg(long, default_value_t = 100)]
    write_interval_ms: u64,
    /// Services in the snapshot phase.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Services per `POST /api/v1/apply`.
    #[arg(long, default_value_t = 1000)]
    apply_batch: usize,
    /// Node tokens created concurrently.
    #[arg(long, default_value_t = 16)]
    token_concurrency: usize,
    /// Nodes connecting (handshake + initial sync) concurrently.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// How the memory-phase nodes sync.
    #[arg(long, value_enum, default_value = "resume")]
    idle_sync: IdleSync,
    /// With `--idle-sync resume`: this many more nodes then connect empty and each receive a
    /// full snapshot, to measure what a connection costs after a snapshot (0: skip).
    #[arg(long, default_value_t = 500)]
    snapshot_nodes: usize,
    /// Keepalive interval of each simulated node.
    #[arg(long, default_value_t = 30)]
    node_keepalive_secs: u64,
    /// Quiet time before each RSS reading.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// Limit for each wait (tokens, connects, acks, disconnects).
    #[arg(long, default_value_t = 300)]
    phase_timeout_secs: u64,
    /// The whole run is aborted after this long.
    #[arg(long, default_value_t = 1800)]
    max_runtime_secs: u64,
    /// Node names are PREFIX-00000 ...; Services go into namespace PREFIX.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Phases to run (always in the order memory, fanout, snapshot, restart).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fanout,snapshot,memory,restart"
    )]
    phases: Vec<Phase>,
    /// Where the restart phase asks for a restart of cloudcore: it creates `request` here and
    /// waits for `pid` (the new process id), which `scripts/bench/sync` writes once the
    /// restarted cloudcore is healthy. Without it the restart phase is skipped.
    #[arg(long)]
    restart_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
struct TokenBody {
    token: String,
}

#[derive(Deserialize)]
struct ObjectBody {
    metadata: ObjectMeta,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    resource_version: String,
}

/// Where nodes resume from; the default is an empty node.
#[derive(Clone, Default)]
struct Resume {
    store_id: Option<String>,
    version: u64,
    chain: Option<String>,
}

struct Bench {
    args: SyncArgs,
    api_token: String,
    api: Api,
    base: Instant,
    tokens: Vec<String>,
    tokens_created: usize,
    token_time: Duration,
    table: Table,
}

pub async fn run(args: SyncArgs) -> Result<()> {
    for (what, addr) in [("--hub", args.hub), ("--api", args.api)] {
        if addr.ip() != Ipv4Addr::LOCALHOST {
            bail!("{what} {addr}: this benchmark only talks to 127.0.0.1");
        }
    }
    let api_token = match (&args.api_token, &args.api_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("read the API token from {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!("give --api-token or --api-token-file"),
    };
    report::rss_bytes(args.cloud_pid).context("--cloud-pid")?;
    let machine = report::machine();
    let max_runtime = Duration::from_secs(args.max_runtime_secs);
    let mut bench = Bench {
        api: Api::new(args.api, &api_token, Duration::from_secs(60)),
        api_token,
        base: Instant::now(),
        tokens: Vec::new(),
        tokens_created: 0,
        token_time: Duration::ZERO,
        table: Table::default(),
        args,
    };
    let result = match tokio::time::timeout(max_runtime, bench.all()).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!(
            "the run did not finish within --max-runtime-secs {}",
            max_runtime.as_secs()
        )),
    };
    if let Err(e) = &result {
        bench.table.note(format!("RUN FAILED: {e:#}"));
    }
    bench.table.print(&machine);
    result
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

impl Bench {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.args.phase_timeout_secs)
    }

    fn node_name(&self, i: usize) -> String {
        format!("{}-{i:05}", self.args.prefix)
    }

    async fn all(&mut self) -> Result<()> {
        self.api
            .expect(Method::GET, "/healthz", None, &[200])
            .await
            .context("cloudcore is not healthy")?;
        let rss0 = report::rss_bytes(self.args.cloud_pid)?;
        progress(format!("cloudcore RSS at start: {}", report::mib(rss0)));
        let phases = self.args.phases.clone();
        // Memory first, while cloudcore holds no memory freed by earlier phases (the allocator
        // keeps it, and new connections would reuse it and look free).
        if phases.contains(&Phase::Memory) {
            self.memory().await.context("memory phase")?;
            if phases.contains(&Phase::Fanout) || phases.contains(&Phase::Snapshot) {
                let keep = self.args.nodes.max(1);
                self.delete_nodes_from(keep).await?;
            }
        }
        if phases.contains(&Phase::Fanout) {
            self.fanout().await.context("fan-out phase")?;
        }
        if phases.contains(&Phase::Snapshot) {
            self.snapshot().await.context("snapshot phase")?;
        }
        if phases.contains(&Phase::Restart) {
            self.restart().await.context("restart phase")?;
        }
        if self.tokens_created > 0 {
            let n = self.tokens_created;
            self.table.row(
                format!(
                    "create {} node tokens ({} in flight)",
                    thousands(n),
                    self.args.token_concurrency
                ),
                format!(
                    "{} ({:.0}/s)",
                    secs(self.token_time),
                    n as f64 / self.token_time.as_secs_f64().max(1e-9)
                ),
            );
        }
        Ok(())
    }

    /// Sends the requests with `token_concurrency` keep-alive connections in parallel and
    /// returns the answers in request order.
    async fn parallel(&self, what: &str, requests: Vec<(Method, String)>) -> Result<Vec<Bytes>> {
        let count = requests.len();
        let requests = Arc::new(requests);
        let next = Arc::new(AtomicUsize::new(0));
        let results: Arc<Mutex<Vec<Option<Bytes>>>> = Arc::new(Mutex::new(vec![None; count]));
        let mut workers = Vec::new();
        for _ in 0..self.args.token_concurrency.clamp(1, 256) {
            let (next, results, requests) = (next.clone(), results.clone(), requests.clone());
            let mut api = Api::new(self.args.api, &self.api_token, Duration::from_secs(60));
            let what = what.to_string();
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((method, path)) = requests.get(i) else {
                        return anyhow::Ok(());
                    };
                    let body = api.expect(method.clone(), path, None, &[200, 201]).await?;
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(body);
                    if (i + 1).is_multiple_of(2000) {
                        progress(format!(
                            "  {} / {} {what}",
                            thousands(i + 1),
                            thousands(count)
                        ));
                    }
                }
            }));
        }
        let joined = tokio::time::timeout(self.timeout(), futures_util::future::join_all(workers))
            .await
            .map_err(|_| anyhow!("{count} {what} took longer than {:?}", self.timeout()))?;
        for j in joined {
            j.context("request worker panicked")??;
        }
        let results = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
        results
            .into_iter()
            .enumerate()
            .map(|(i, b)| b.ok_or_else(|| anyhow!("no answer to request #{i} ({what})")))
            .collect()
    }

    /// Creates tokens for nodes `tokens.len() .. upto` through the REST API.
    async fn ensure_tokens(&mut self, upto: usize) -> Result<()> {
        let have = self.tokens.len();
        if upto <= have {
            return Ok(());
        }
        let count = upto - have;
        progress(format!("creating {} node tokens", thousands(count)));
        let start = Instant::now();
        let requests = (have..upto)
            .map(|i| {
                let name = self.node_name(i);
                (Method::POST, format!("/api/v1/nodes/{name}/token"))
            })
            .collect();
        let answers = self.parallel("node tokens", requests).await?;
        for (i, body) in answers.iter().enumerate() {
            let t: TokenBody = serde_json::from_slice(body)
                .with_context(|| format!("token answer for node #{}", have + i))?;
            self.tokens.push(t.token);
        }
        let took = start.elapsed();
        self.token_time += took;
        self.tokens_created += count;
        progress(format!(
            "created {} tokens in {} ({:.0}/s)",
            thousands(count),
            secs(took),
            count as f64 / took.as_secs_f64().max(1e-9)
        ));
        Ok(())
    }

    /// Deletes nodes `keep ..` (object, token and runtime state), so that the next phases do not
    /// carry thousands of Node objects in every snapshot.
    async fn delete_nodes_from(&mut self, keep: usize) -> Result<()> {
        let total = self.tokens.len();
        if keep >= total {
            return Ok(());
        }
        progress(format!("deleting {} nodes", thousands(total - keep)));
        let start = Instant::now();
        let requests = (keep..total)
            .map(|i| {
                (
                    Method::DELETE,
                    format!("/api/v1/nodes/{}", self.node_name(i)),
                )
            })
            .collect();
        self.parallel("node deletions", requests).await?;
        self.tokens.truncate(keep);
        self.table.row(
            format!(
                "delete {} nodes ({} in flight)",
                thousands(total - keep),
                self.args.token_concurrency
            ),
            secs(start.elapsed()),
        );
        Ok(())
    }

    /// Spawns nodes `range` of `fleet`, at most `connect_concurrency` connecting at a time.
    fn spawn_nodes(
        &self,
        fleet: &Arc<Fleet>,
        opts: &Arc<NodeOpts>,
        range: std::ops::Range<usize>,
        resume: &Resume,
        gate: &Arc<Semaphore>,
    ) -> Vec<JoinHandle<NodeReport>> {
        range
            .map(|i| {
                let spec = NodeSpec {
                    idx: i,
                    name: self.node_name(i),
                    token: self.tokens[i].clone(),
                    store_id: resume.store_id.clone(),
                    version: resume.version,
                    chain: resume.chain.clone(),
                };
                let (fleet, opts, gate) = (fleet.clone(), opts.clone(), gate.clone());
                tokio::spawn(async move {
                    let permit = tokio::select! {
                        p = gate.acquire_owned() => p.ok(),
                        _ = fleet.stop.cancelled() => return NodeReport::default(),
                    };
                    node::run_node(spec, opts, fleet, permit).await
                })
            })
            .collect()
    }

    /// Waits until `target` nodes of the fleet synced; fails early when nodes fail.
    async fn wait_synced(&self, fleet: &Fleet, target: usize, what: &str) -> Result<Duration> {
        let start = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let synced = fleet.synced.load(Ordering::Acquire);
            let failed = fleet.failed.load(Ordering::Relaxed);
            if failed > 0 {
                bail!(
                    "{failed} {what} failed (synced {synced}/{target}); first error: {}",
                    fleet.first_error().unwrap_or_default()
                );
            }
            if synced >= target {
                return Ok(start.elapsed());
            }
            if start.elapsed() > self.timeout() {
                bail!(
                    "only {synced}/{target} {what} synced within {:?}",
                    self.timeout()
                );
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                progress(format!("  {synced}/{target} {what} synced"));
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the fleet and collects the nodes' reports.
    async fn stop(&self, fleet: &Fleet, handles: Vec<JoinHandle<NodeReport>>) -> Vec<NodeReport> {
        fleet.stop.cancel();
        match tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::future::join_all(handles),
        )
        .await
        {
            Ok(joined) => joined.into_iter().map(|j| j.unwrap_or_default()).collect(),
            Err(_) => {
                progress("some nodes did not stop within 60 s");
                Vec::new()
            }
        }
    }

    /// Nodes cloudcore counts as online (from /metrics).
    async fn online_nodes(&mut self) -> Result<Option<u64>> {
        let (status, body) = self.api.call(Method::GET, "/metrics", None).await?;
        if status != 200 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&body);
        Ok(text.lines().find_map(|l| {
            l.strip_prefix("cloudcore_hub_online_nodes ")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|v| v as u64)
        }))
    }

    /// Waits until cloudcore has no node online.
    async fn wait_no_nodes(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            match self.online_nodes().await? {
                None => {
                    // No metrics: give the disconnects a moment instead.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    return Ok(());
                }
                Some(0) => return Ok(()),
                Some(n) if start.elapsed() > self.timeout() => {
                    bail!(
                        "{n} nodes still online {:?} after disconnecting them",
                        self.timeout()
                    )
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn fanout(&mut self) -> Result<()> {
        let (n, w) = (self.args.nodes, self.args.writes);
        if n == 0 || w == 0 {
            return Ok(());
        }
        self.ensure_tokens(n).await?;
        self.wait_no_nodes().await?;
        progress(format!("fan-out: connecting {} nodes", thousands(n)));
        let fleet = Arc::new(Fleet::new(self.base, n));
        let opts = Arc::new(NodeOpts {
            hub: self.args.hub,
            record: true,
            keep_objects: true,
            keepalive: Duration::from_secs(self.args.node_keepalive_secs),
            connect_timeout: Duration::from_secs(30),
        });
        let gate = Arc::new(Semaphore::new(self.args.connect_concurrency.max(1)));
        let handles = self.spawn_nodes(&fleet, &opts, 0..n, &Resume::default(), &gate);
        let connected = self.wait_synced(&fleet, n, "fan-out nodes").await;
        let connected = match connected {
            Ok(d) => d,
            Err(e) => {
                self.stop(&fleet, handles).await;
                return Err(e);
            }
        };
        progress(format!("fan-out: {n} nodes synced in {}", secs(connected)));
        self.table.row(
            format!("fan-out: connect + snapshot {} nodes", thousands(n)),
            secs(connected),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;

        // The writes: one Service each, spaced by the interval; the nonce makes every PUT a
        // real change even against a store that already has these names.
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let ns = &self.args.prefix;
        let interval = Duration::from_millis(self.args.write_interval_ms);
        let cpu0 = report::cpu_time(self.args.cloud_pid);
        let mut puts: Vec<(u64, u64, u64)> = Vec::with_capacity(w); // (start ns, version, PUT ns)
        let start = tokio::time::Instant::now();
        progress(format!(
            "fan-out: {w} writes, one every {} ms",
            self.args.write_interval_ms
        ));
        let mut write_err = None;
        for i in 0..w {
            tokio::time::sleep_until(start + interval * i as u32).await;
            let name = format!("fanout-{i:04}");
            let body = format!(
                r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}","annotations":{{"bench.edgemesh.io/nonce":"{nonce}"}}}},"spec":{{"ports":[{{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"}}]}}}}"#
            );
            let path = format!("/api/v1/namespaces/{ns}/services/{name}");
            let t = fleet.now_ns();
            let resp = self
                .api
                .expect(Method::PUT, &path, Some(Bytes::from(body)), &[200, 201])
                .await;
            let put_ns = fleet.now_ns() - t;
            let version = resp.and_then(|b| {
                let o: ObjectBody =
                    serde_json::from_slice(&b).context("PUT answer is not an object")?;
                o.metadata
                    .resource_version
                    .parse::<u64>()
                    .map_err(|_| anyhow!("bad resourceVersion {:?}", o.metadata.resource_version))
            });
            match version {
                Ok(v) => puts.push((t, v, put_ns)),
                Err(e) => {
                    write_err = Some(e);
                    break;
                }
            }
        }
        let last = puts.iter().map(|p| p.1).max().unwrap_or(0);
        // Every node must ack the last write.
        let wait_start = Instant::now();
        let all_acked = loop {
            if fleet
                .acked
                .iter()
                .all(|a| a.load(Ordering::Acquire) >= last)
            {
                break true;
            }
            if wait_start.elapsed() > Duration::from_secs(60)
                || fleet.failed.load(Ordering::Relaxed) > 0
            {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let cpu1 = report::cpu_time(self.args.cloud_pid);
        let failed = fleet.failed.load(Ordering::Relaxed);
        let first_error = fleet.first_error();
        let reports = self.stop(&fleet, handles).await;
        if let Some(e) = write_err {
            return Err(e.context("write failed"));
        }
        if !all_acked {
            let behind = fleet
                .acked
                .iter()
                .filter(|a| a.load(Ordering::Acquire) < last)
                .count();
            self.table.note(format!(
                "fan-out: {behind} nodes had not acked version {last} after 60 s ({failed} failed: {})",
                first_error.clone().unwrap_or_default()
            ));
        }

        // Samples: node × write.
        let by_version: HashMap<u64, usize> =
            puts.iter().enumerate().map(|(i, p)| (p.1, i)).collect();
        let mut recv = Vec::with_capacity(n * w);
        let mut all_acked_per_write = vec![0u64; puts.len()];
        let mut received_per_write = vec![0usize; puts.len()];
        for r in &reports {
            for s in &r.samples {
                if let Some(&i) = by_version.get(&s.version) {
                    let t = puts[i].0;
                    recv.push(s.recv_ns.saturating_sub(t));
                    received_per_write[i] += 1;
                    all_acked_per_write[i] = all_acked_per_write[i].max(s.ack_ns.saturating_sub(t));
                }
            }
        }
        recv.sort_unstable();
        let expected = n * puts.len();
        let missing = expected - recv.len().min(expected);
        // A write that did not reach every node has no "all acked" time.
        let mut all_acked_sorted: Vec<u64> = all_acked_per_write
            .iter()
            .zip(&received_per_write)
            .filter(|(_, &c)| c >= n)
            .map(|(&t, _)| t)
            .collect();
        all_acked_sorted.sort_unstable();
        let mut put_lat: Vec<u64> = puts.iter().map(|p| p.2).collect();
        put_lat.sort_unstable();

        let nn = thousands(n);
        let p = |v: &[u64], q: f64| percentile(v, q).map(ms).unwrap_or_else(|| "-".into());
        self.table
            .row(format!("fan-out to {nn} nodes p50"), p(&recv, 50.0));
        let p99 = percentile(&recv, 99.0);
        self.table.goal(
            format!("fan-out to {nn} nodes p99"),
            p(&recv, 99.0),
            "< 500 ms",
            missing == 0 && p99.is_some_and(|v| v < 500_000_000),
        );
        self.table
            .row(format!("fan-out to {nn} nodes max"), p(&recv, 100.0));
        self.table.row(
            format!("fan-out: all {nn} nodes acked, per write p50"),
            p(&all_acked_sorted, 50.0),
        );
        self.table.row(
            format!("fan-out: all {nn} nodes acked, per write p99"),
            p(&all_acked_sorted, 99.0),
        );
        self.table.row(
            "fan-out: REST PUT latency p50 / p99",
            format!("{} / {}", p(&put_lat, 50.0), p(&put_lat, 99.0)),
        );
        self.table.row(
            "fan-out: node x write samples received",
            format!("{}/{}", thousands(recv.len()), thousands(expected)),
        );
        if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
            let cpu = c1.saturating_sub(c0);
            self.table.row(
                "fan-out: cloudcore CPU per change per node",
                format!(
                    "{:.1} us",
                    cpu.as_secs_f64() * 1e6 / (expected.max(1)) as f64
                ),
            );
        }
        if missing > 0 {
            self.table.note(format!(
                "fan-out: {missing} of {expected} node x write deliveries were not seen"
            ));
        }
        // Every node's in-memory copy should have ended at the same version and size.
        let (min_obj, max_obj) = reports.iter().fold((usize::MAX, 0), |(lo, hi), r| {
            (lo.min(r.objects), hi.max(r.objects))
        });
        let at_last = reports.iter().filter(|r| r.version >= last).count();
        let chains: std::collections::BTreeSet<&str> = reports
            .iter()
            .filter(|r| r.version == last)
            .map(|r| r.chain.as_str())
            .collect();
        self.table.note(format!(
            "fan-out: {at_last}/{n} nodes ended at version {last} with {} distinct history chain(s); \
             objects per node copy {}..{}",
            chains.len(),
            if reports.is_empty() { 0 } else { min_obj },
            max_obj
        ));
        self.wait_no_nodes().await?;
        Ok(())
    }

    async fn snapshot(&mut self) -> Result<()> {
        let s = self.args.services;
        if s == 0 {
            return Ok(());
        }
        self.ensure_tokens(1).await?;
        // Connected nodes would each be sent every one of these changes.
        self.wait_no_nodes().await?;
        let ns = self.args.prefix.clone();
        let batch = self.args.apply_batch.max(1);
        progress(format!(
            "snapshot: loading {} services, {batch} per apply",
            thousands(s)
        ));
        let start = Instant::now();
        let mut i = 0;
        while i < s {
            let end = (i + batch).min(s);
            let mut body = String::with_capacity((end - i) * 260 + 2);
            body.push('[');
            for k in i..end {
                if k > i {
                    body.push(',');
                }
                body.push_str(&format!(
                    r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"svc-{k:05}","namespace":"{ns}","labels":{{"app":"svc-{k:05}"}}}},"spec":{{"selector":{{"app":"svc-{k:05}"}},"ports":[{{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"}}]}}}}"#
                ));
            }
            body.push(']');
            self.apply(body).await?;
            i = end;
        }
        let load = start.elapsed();
        self.table.row(
            format!("load {} services ({batch} per apply)", thousands(s)),
            secs(load),
        );
        let (node, token) = (self.node_name(0), self.tokens[0].clone());
        progress("snapshot: one fresh node syncs");
        let cold = node::snapshot_once(self.args.hub, &node, &token, true, self.timeout()).await?;
        self.wait_no_nodes().await?;
        // Another node: cloudcore paces repeated snapshots to the same node.
        let (node, token) = match self.tokens.get(1) {
            Some(t) => (self.node_name(1), t.clone()),
            None => (node, token),
        };
        let warm = node::snapshot_once(self.args.hub, &node, &token, true, self.timeout()).await?;
        self.wait_no_nodes().await?;

        // Apply the cold snapshot into a real MetaManager in a scratch directory.
        let dir = std::env::temp_dir().join(format!(
            "edgemesh-bench-{}-{}",
            std::process::id(),
            self.base.elapsed().as_nanos()
        ));
        let (store_id, version) = (cold.store_id.clone(), cold.version);
        let objects = cold.objects;
        let scratch = dir.clone();
        let applied = tokio::task::spawn_blocking(move || -> Result<(Duration, usize)> {
            let mm = MetaManager::open(&scratch)?;
            let t = Instant::now();
            let count = mm.replace_all(&store_id, version, "", &objects)?;
            Ok((t.elapsed(), count))
        })
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        let (apply, count) = applied.context("MetaManager task panicked")??;

        let label = format!("{}-service snapshot", thousands(cold.services));
        self.table
            .row(format!("{label} (receive+parse)"), secs(cold.sync));
        let total = cold.sync + apply;
        self.table.goal(
            format!("{label} (apply SQLite)"),
            secs(apply),
            "< 2 s total",
            total < Duration::from_secs(2),
        );
        self.table
            .row(format!("{label} (receive+parse, cached)"), secs(warm.sync));
        self.table.note(format!(
            "snapshot: {} objects ({} services, {} nodes, {} other) in {} chunks, {} of JSON \
             (websocket connect {:.1} ms, not included); \
             'cached' is a second fresh node served from cloudcore's encoded-snapshot cache; \
             {} rows written by MetaManager::replace_all",
            thousands(cold.services + cold.nodes + cold.other),
            thousands(cold.services),
            thousands(cold.nodes),
            cold.other,
            cold.chunks,
            report::mib(cold.bytes as u64),
            cold.connect.as_secs_f64() * 1e3,
            thousands(count),
        ));
        Ok(())
    }

    /// One `POST /api/v1/apply` that must succeed.
    async fn apply(&mut self, body: String) -> Result<()> {
        self.api
            .expect(
                Method::POST,
                "/api/v1/apply",
                Some(Bytes::from(body)),
                &[200],
            )
            .await?;
        Ok(())
    }

    /// cloudcore's RSS after a burst (S Services and S Endpoints in one apply) and after a
    /// restart on the same data, in this run.
    async fn restart(&mut self) -> Result<()> {
        let s = self.args.services;
        let Some(dir) = self.args.restart_dir.clone() else {
            self.table
                .note("restart: skipped (no --restart-dir; scripts/bench/sync gives one)");
            return Ok(());
        };
        if s == 0 {
            return Ok(());
        }
        self.wait_no_nodes().await?;
        let ns = format!("{}-burst", self.args.prefix);
        let mut body = String::with_capacity(s * 520 + 2);
        body.push('[');
        for k in 0..s {
            if k > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"svc-{k:05}","namespace":"{ns}","labels":{{"app":"svc-{k:05}"}}}},"spec":{{"selector":{{"app":"svc-{k:05}"}},"ports":[{{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"}}]}}}},{{"apiVersion":"v1","kind":"Endpoints","metadata":{{"name":"svc-{k:05}","namespace":"{ns}"}},"subsets":[{{"addresses":[{{"ip":"10.{}.{}.{}","nodeName":"bench-node"}}],"ports":[{{"name":"http","port":8080,"protocol":"TCP"}}]}}]}}"#,
                1 + k / 62_500,
                (k / 250) % 250,
                1 + k % 250
            ));
        }
        body.push(']');
        let bytes = body.len();
        progress(format!(
            "restart: one apply of {} services and their endpoints ({})",
            thousands(s),
            report::mib(bytes as u64)
        ));
        let start = Instant::now();
        self.apply(body).await?;
        let took = start.elapsed();
        // cloudcore gives freed memory back once changes have been quiet for 2 s.
        let quiet = Duration::from_secs(self.args.settle_secs + 3);
        tokio::time::sleep(quiet).await;
        let burst = report::rss_bytes(self.args.cloud_pid)?;
        progress(format!(
            "restart: cloudcore RSS {} after the burst; asking for a restart",
            report::mib(burst)
        ));
        let pid_file = dir.join("pid");
        let _ = std::fs::remove_file(&pid_file);
        std::fs::write(dir.join("request"), b"")
            .with_context(|| format!("write {}", dir.join("request").display()))?;
        let deadline = Instant::now() + self.timeout();
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
            {
                break pid;
            }
            if Instant::now() > deadline {
                bail!("cloudcore was not restarted within {:?}", self.timeout());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        self.args.cloud_pid = pid;
        tokio::time::sleep(quiet).await;
        let fresh = report::rss_bytes(pid)?;
        let ratio = burst as f64 / fresh.max(1) as f64;
        self.table.row(
            format!(
                "apply {} services + endpoints at once ({})",
                thousands(s),
                report::mib(bytes as u64)
            ),
            secs(took),
        );
        self.table.goal(
            "cloudcore RSS after that burst / after a restart",
            format!(
                "{} / {} ({ratio:.2}x)",
                report::mib(burst),
                report::mib(fresh)
            ),
            "< 1.5x",
            ratio < 1.5,
        );
        Ok(())
    }

    async fn memory(&mut self) -> Result<()> {
        let m = self.args.idle_nodes;
        if m == 0 {
            return Ok(());
        }
        let k = if self.args.idle_sync == IdleSync::Resume {
            self.args.snapshot_nodes
        } else {
            0
        };
        // Tokens (and Node objects) for the extra snapshot nodes too, before anyone connects:
        // created later, each new Node object would be sent to every connected node.
        self.ensure_tokens(m + k).await?;
        self.wait_no_nodes().await?;
        let pid = self.args.cloud_pid;
        let resume = match self.args.idle_sync {
            IdleSync::Resume => {
                // One fresh node learns the store's identity, version and history chain, as
                // every node of a synced fleet knows them.
                let (node, token) = (self.node_name(0), self.tokens[0].clone());
                let probe =
                    node::snapshot_once(self.args.hub, &node, &token, false, self.timeout())
                        .await?;
                self.wait_no_nodes().await?;
                Resume {
                    store_id: Some(probe.store_id),
                    version: probe.version,
                    chain: Some(probe.chain).filter(|c| !c.is_empty()),
                }
            }
            IdleSync::Fresh => Resume::default(),
        };
        let settle = Duration::from_secs(self.args.settle_secs);
        tokio::time::sleep(settle).await;
        let before = report::rss_bytes(pid)?;
        progress(format!(
            "memory: cloudcore RSS {} with 0 nodes; connecting {} nodes ({:?})",
            report::mib(before),
            thousands(m),
            self.args.idle_sync
        ));
        let fleet = Arc::new(Fleet::new(self.base, m + k));
        let opts = Arc::new(NodeOpts {
            hub: self.args.hub,
            record: false,
            keep_objects: false,
            keepalive: Duration::from_secs(self.args.node_keepalive_secs),
            connect_timeout: Duration::from_secs(30),
        });
        let gate = Arc::new(Semaphore::new(self.args.connect_concurrency.max(1)));
        let half = m / 2;
        let mut handles = Vec::with_capacity(m + k);
        let mut synced_after = Vec::new();
        let mut rss = Vec::new();
        // Up to M/2, up to M, then K more nodes that each receive a full snapshot.
        let steps = [
            (0..half, resume.clone()),
            (half..m, resume),
            (m..m + k, Resume::default()),
        ];
        let mut failure = None;
        for (range, resume) in steps {
            if range.is_empty() {
                continue;
            }
            let target = range.end;
            let spawn_at = Instant::now();
            handles.extend(self.spawn_nodes(&fleet, &opts, range, &resume, &gate));
            let step = async {
                self.wait_synced(&fleet, target, "idle nodes").await?;
                let took = spawn_at.elapsed();
                tokio::time::sleep(settle).await;
                // Idle: every node still connected, nothing failed.
                let failed = fleet.failed.load(Ordering::Relaxed);
                if failed > 0 {
                    bail!(
                        "{failed} idle nodes dropped: {}",
                        fleet.first_error().unwrap_or_default()
                    );
                }
                anyhow::Ok((took, report::rss_bytes(pid)?))
            }
            .await;
            match step {
                Ok((took, r)) => {
                    synced_after.push(took);
                    rss.push((target, r));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let online = self.online_nodes().await.ok().flatten();
        let bench_rss = report::rss_bytes(std::process::id()).unwrap_or(0);
        let modes: Vec<usize> = fleet
            .modes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let _ = self.stop(&fleet, handles).await;
        if let Some(e) = failure {
            return Err(e);
        }
        let rss_at = |n: usize| rss.iter().find(|(t, _)| *t == n).map(|(_, r)| *r);
        let after = rss_at(m).ok_or_else(|| anyhow!("no RSS reading with {m} nodes"))?;
        let mm = thousands(m);
        let per_node = after.saturating_sub(before) as f64 / m as f64;
        let connect_time: Duration = synced_after.iter().take(2).sum();
        self.table.row(
            format!(
                "memory: connect + sync {mm} nodes ({:?})",
                self.args.idle_sync
            )
            .to_lowercase(),
            secs(connect_time),
        );
        self.table.row(
            format!("cloudcore RSS before / with {mm} nodes"),
            format!("{} / {}", report::mib(before), report::mib(after)),
        );
        self.table.goal(
            "cloudcore RSS per connected node",
            report::kb(per_node),
            "< 30 KB",
            per_node < 30.0 * 1024.0,
        );
        if let Some(mid) = rss_at(half).filter(|_| half > 0) {
            let marginal = after.saturating_sub(mid) as f64 / (m - half) as f64;
            self.table.row(
                format!(
                    "cloudcore RSS per node, marginal ({}→{})",
                    thousands(half),
                    mm
                ),
                report::kb(marginal),
            );
        }
        if let Some(with_fresh) = rss_at(m + k).filter(|_| k > 0) {
            let per_fresh = with_fresh.saturating_sub(after) as f64 / k as f64;
            self.table.goal(
                format!("cloudcore RSS per node synced by snapshot (+{k})"),
                report::kb(per_fresh),
                "< 30 KB",
                per_fresh < 30.0 * 1024.0,
            );
        }
        self.table.note(format!(
            "memory: sync answers current/delta/snapshot = {}/{}/{}; cloudcore reported {} online; \
             bench client RSS {}",
            modes[0],
            modes[1],
            modes[2],
            online.map(|o| o.to_string()).unwrap_or_else(|| "?".into()),
            report::mib(bench_rss)
        ));
        self.wait_no_nodes().await?;
        Ok(())
    }
}
