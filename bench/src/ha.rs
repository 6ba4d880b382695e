//! `edgemesh-bench ha`: one cloud (one cloudcore, or several replicas on etcd) under simulated
//! nodes spread over its hubs. Prints `metric<TAB>value` lines that `scripts/bench/ha` puts
//! side by side for one SQLite cloudcore and three replicas:
//!
//! - fan-out: REST writes (round-robin over the APIs) until every node received them;
//! - memory: each cloudcore's RSS growth per node it holds;
//! - failover (`--kill-pid`): a replica is killed with SIGKILL, its nodes resume on the others
//!   by delta; the time until each of them is synced again;
//! - relay: two simulated nodes with real tunnel multiplexers, one serving bytes; a stream
//!   between them through one hub, and through two (cross-replica relay).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use edgehub::io::Protocol;
use edgehub::message::{group, Message};
use edgehub::tunnel::{Mux, MuxConfig, OpenRequest, Side};
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::api::Api;
use crate::node::{self, Fleet, NodeOpts, NodeReport, NodeSpec};
use crate::report::{self, percentile};

#[derive(clap::Args, Debug)]
pub struct HaArgs {
    /// Hub addresses, one per cloudcore (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    hubs: Vec<SocketAddr>,
    /// API addresses, in the same order.
    #[arg(long, value_delimiter = ',', required = true)]
    apis: Vec<SocketAddr>,
    /// Process ids, in the same order (for RSS).
    #[arg(long, value_delimiter = ',', required = true)]
    pids: Vec<u32>,
    #[arg(long, env = "EDGEMESH_BENCH_API_TOKEN", hide_env_values = true)]
    api_token: String,
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[arg(long, default_value_t = 50)]
    writes: usize,
    #[arg(long, default_value_t = 100)]
    write_interval_ms: u64,
    /// Kill the cloudcore at this index (of --hubs) and measure its nodes' resync.
    #[arg(long)]
    kill: Option<usize>,
    /// Bytes of the relay throughput stream.
    #[arg(long, default_value_t = 256 << 20)]
    relay_bytes: usize,
    /// 4 MiB fetches per relay path.
    #[arg(long, default_value_t = 20)]
    fetches: usize,
}

fn out(metric: &str, value: impl std::fmt::Display) {
    println!("{metric}\t{value}");
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("ha: {}", msg.as_ref());
}

fn node_name(i: usize) -> String {
    format!("ha-bench-{i:05}")
}

pub async fn run(args: HaArgs) -> Result<()> {
    if args.hubs.len() != args.apis.len() || args.hubs.len() != args.pids.len() {
        bail!("--hubs, --apis and --pids must name the same cloudcores");
    }
    let n = args.nodes;
    let mut api = Api::new(args.apis[0], &args.api_token, Duration::from_secs(60));
    progress(format!("creating {n} node tokens"));
    let mut tokens = Vec::with_capacity(n + 2);
    for i in 0..n + 2 {
        let path = format!("/api/v1/nodes/{}/token", node_name(i));
        let body = api.expect(Method::POST, &path, None, &[201]).await?;
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        tokens.push(v["token"].as_str().context("token")?.to_string());
    }
    let base = Instant::now();
    let rss0: Vec<u64> = args
        .pids
        .iter()
        .map(|p| report::rss_bytes(*p))
        .collect::<Result<_>>()?;

    // Fan-out: node i on hub i % replicas.
    let fleet = Arc::new(Fleet::new(base, n));
    let handles = spawn(&args, &tokens, &fleet, 0..n, &|i| i % args.hubs.len(), None);
    wait_synced(&fleet, n, Duration::from_secs(120)).await?;
    progress(format!("{n} nodes synced"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1: Vec<u64> = args
        .pids
        .iter()
        .map(|p| report::rss_bytes(*p))
        .collect::<Result<_>>()?;
    let per_replica = n as f64 / args.hubs.len() as f64;
    let per_node: Vec<f64> = rss0
        .iter()
        .zip(&rss1)
        .map(|(a, b)| b.saturating_sub(*a) as f64 / per_replica)
        .collect();
    let worst = per_node.iter().cloned().fold(0.0, f64::max);
    out("rss_per_node_kb", format!("{:.1}", worst / 1000.0));

    let mut apis: Vec<Api> = args
        .apis
        .iter()
        .map(|a| Api::new(*a, &args.api_token, Duration::from_secs(30)))
        .collect();
    let nonce = base.elapsed().as_nanos() ^ u128::from(std::process::id());
    let mut puts = Vec::new();
    let start = tokio::time::Instant::now();
    let interval = Duration::from_millis(args.write_interval_ms);
    for i in 0..args.writes {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let name = format!("ha-fanout-{i:04}");
        let body = format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"bench","annotations":{{"bench.edgemesh.io/nonce":"{nonce}"}}}},"spec":{{"ports":[{{"port":80,"protocol":"TCP"}}]}}}}"#
        );
        let t = fleet.now_ns();
        let api = &mut apis[i % args.apis.len()];
        let resp = api
            .expect(
                Method::PUT,
                &format!("/api/v1/namespaces/bench/services/{name}"),
                Some(Bytes::from(body)),
                &[200, 201],
            )
            .await?;
        let put_ns = fleet.now_ns() - t;
        let v: serde_json::Value = serde_json::from_slice(&resp)?;
        let version: u64 = v["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("resourceVersion")?;
        puts.push((t, version, put_ns));
    }
    let last = puts.iter().map(|p| p.1).max().unwrap_or(0);
    let waited = Instant::now();
    while !fleet
        .acked
        .iter()
        .all(|a| a.load(Ordering::Acquire) >= last)
    {
        if waited.elapsed() > Duration::from_secs(60) {
            bail!("not every node acked version {last} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reports = stop(&fleet, handles).await;
    let by_version: std::collections::HashMap<u64, u64> = puts.iter().map(|p| (p.1, p.0)).collect();
    let mut recv: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.samples.iter())
        .filter_map(|s| {
            by_version
                .get(&s.version)
                .map(|t| s.recv_ns.saturating_sub(*t))
        })
        .collect();
    recv.sort_unstable();
    let mut put_lat: Vec<u64> = puts.iter().map(|p| p.2).collect();
    put_lat.sort_unstable();
    let ms = |v: &[u64], q: f64| {
        percentile(v, q)
            .map(report::ms)
            .unwrap_or_else(|| "-".into())
    };
    out("fanout_p50", ms(&recv, 50.0));
    out("fanout_p99", ms(&recv, 99.0));
    out("put_p50", ms(&put_lat, 50.0));
    out("put_p99", ms(&put_lat, 99.0));
    let chains: std::collections::BTreeSet<&str> =
        reports.iter().map(|r| r.chain.as_str()).collect();
    out("history_chains", chains.len());

    // Failover: the nodes resume (current) on their hubs, one replica is killed, its nodes
    // come back on the others with what they had.
    let resume: Vec<(u64, String)> = reports
        .iter()
        .map(|r| (r.version, r.chain.clone()))
        .collect();
    let store_id = store_id(&args, &tokens[0]).await?;
    if let Some(victim) = args.kill {
        let replicas = args.hubs.len();
        let fleet = Arc::new(Fleet::new(base, n));
        let specs = Some((store_id.clone(), resume.clone()));
        let handles = spawn(
            &args,
            &tokens,
            &fleet,
            0..n,
            &|i| i % replicas,
            specs.as_ref(),
        );
        wait_synced(&fleet, n, Duration::from_secs(120)).await?;
        let moved: Vec<usize> = (0..n).filter(|i| i % replicas == victim).collect();
        let killed = Instant::now();
        std::process::Command::new("kill")
            .args(["-KILL", &args.pids[victim].to_string()])
            .status()
            .context("kill the replica")?;
        let again = Arc::new(Fleet::new(base, n));
        // Each node of the killed replica reconnects to another one at once (the agent's
        // failover: a random other URL), resuming with its version and chain.
        let others: Vec<usize> = (0..replicas).filter(|r| *r != victim).collect();
        let pick = move |i: usize| others[i % others.len()];
        let mut handles2 = Vec::new();
        for chunk in moved.chunks(1) {
            let i = chunk[0];
            handles2.extend(spawn(
                &args,
                &tokens,
                &again,
                i..i + 1,
                &pick,
                specs.as_ref(),
            ));
        }
        let mut done = Vec::with_capacity(moved.len());
        let mut seen = 0;
        while seen < moved.len() {
            let now = again.synced.load(Ordering::Acquire);
            for _ in seen..now {
                done.push(killed.elapsed().as_nanos() as u64);
            }
            seen = now;
            if killed.elapsed() > Duration::from_secs(60) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let snapshots = again.modes[2].load(Ordering::Relaxed);
        done.sort_unstable();
        out("failover_nodes", moved.len());
        out("failover_p50", ms(&done, 50.0));
        out("failover_p99", ms(&done, 99.0));
        out("failover_snapshots", snapshots);
        stop(&again, handles2).await;
        stop(&fleet, handles).await;
    }

    // Relay: node A fetches from node B through one hub, then through two.
    let live: Vec<usize> = (0..args.hubs.len())
        .filter(|r| Some(*r) != args.kill)
        .collect();
    let same = (live[0], live[0]);
    let cross = (live[0], *live.get(1).unwrap_or(&live[0]));
    let mut api = Api::new(args.apis[live[0]], &args.api_token, Duration::from_secs(30));
    for (label, (ra, rb)) in [("same", same), ("cross", cross)] {
        if label == "cross" && ra == rb {
            continue;
        }
        let (mbps, fetch) = relay(&args, &mut api, &tokens, n, ra, rb).await?;
        out(&format!("relay_{label}_mbps"), format!("{mbps:.0}"));
        out(&format!("fetch4_{label}_p50"), ms(&fetch, 50.0));
    }
    Ok(())
}

async fn store_id(args: &HaArgs, token: &str) -> Result<String> {
    let ws = node::connect(args.hubs[0], &node_name(0), token, Duration::from_secs(10)).await?;
    let (mut sink, mut stream) = ws.split();
    sink.send(WsMessage::text(sync_request(u64::MAX))).await?;
    while let Some(frame) = stream.next().await {
        if let WsMessage::Text(t) = frame? {
            let m = Message::from_json(t.as_str())?;
            if let Ok(r) = m.content_as::<edgehub::message::SyncResponse>() {
                return Ok(r.store_id);
            }
        }
    }
    bail!("no sync answer")
}

fn spawn(
    args: &HaArgs,
    tokens: &[String],
    fleet: &Arc<Fleet>,
    range: std::ops::Range<usize>,
    hub_of: &dyn Fn(usize) -> usize,
    resume: Option<&(String, Vec<(u64, String)>)>,
) -> Vec<JoinHandle<NodeReport>> {
    let gate = Arc::new(Semaphore::new(64));
    range
        .map(|i| {
            let opts = Arc::new(NodeOpts {
                hub: args.hubs[hub_of(i)],
                record: true,
                keep_objects: false,
                keepalive: Duration::from_secs(20),
                connect_timeout: Duration::from_secs(30),
            });
            let spec = NodeSpec {
                idx: i,
                name: node_name(i),
                token: tokens[i].clone(),
                store_id: resume.map(|r| r.0.clone()),
                version: resume.map_or(0, |r| r.1[i].0),
                chain: resume.map(|r| r.1[i].1.clone()),
            };
            let (fleet, gate) = (fleet.clone(), gate.clone());
            tokio::spawn(async move {
                let permit = gate.acquire_owned().await.ok();
                node::run_node(spec, opts, fleet, permit).await
            })
        })
        .collect()
}

async fn wait_synced(fleet: &Fleet, target: usize, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while fleet.synced.load(Ordering::Acquire) < target {
        if fleet.failed.load(Ordering::Relaxed) > 0 {
            bail!("nodes failed: {}", fleet.first_error().unwrap_or_default());
        }
        if start.elapsed() > timeout {
            bail!(
                "only {} of {target} nodes synced",
                fleet.synced.load(Ordering::Acquire)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn stop(fleet: &Fleet, handles: Vec<JoinHandle<NodeReport>>) -> Vec<NodeReport> {
    fleet.stop.cancel();
    futures_util::future::join_all(handles)
        .await
        .into_iter()
        .map(|j| j.unwrap_or_default())
        .collect()
}

/// A node with a real tunnel multiplexer on its hub link: serves `bytes` on every stream it
/// accepts (server) or opens streams (client). Returns its multiplexer.
async fn tunnel_node(hub: SocketAddr, name: &str, token: &str, serve: usize) -> Result<Mux> {
    let ws = node::connect(hub, name, token, Duration::from_secs(10)).await?;
    let (mut sink, mut stream) = ws.split();
    sink.send(WsMessage::text(sync_request(0))).await?;
    let (mux, mut outgoing) = Mux::new(MuxConfig::default(), Side::Edge);
    let reader = mux.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                o = outgoing.recv() => match o {
                    Some(o) => {
                        let (m, _permit) = o.into_parts();
                        if sink.send(m).await.is_err() { return; }
                    }
                    None => return,
                },
                frame = stream.next() => match frame {
                    Some(Ok(WsMessage::Binary(b))) => { let _ = reader.on_binary(b); }
                    Some(Ok(WsMessage::Text(t))) => {
                        let Ok(m) = Message::from_json(t.as_str()) else { continue };
                        if m.route.group != group::STREAM { continue; }
                        if let Ok(Some(incoming)) = reader.on_message(&m) {
                            if let Ok(mut s) = reader.accept(incoming) {
                                tokio::spawn(async move {
                                    let chunk = vec![7u8; 64 << 10];
                                    let mut left = serve;
                                    while left > 0 {
                                        let k = left.min(chunk.len());
                                        if s.write_all(&chunk[..k]).await.is_err() { return; }
                                        left -= k;
                                    }
                                    let _ = s.shutdown().await;
                                    let mut sink = Vec::new();
                                    let _ = s.read_to_end(&mut sink).await;
                                });
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
            }
        }
    });
    Ok(mux)
}

async fn fetch(mux: &Mux, server: &str, endpoint: SocketAddr) -> Result<(usize, Duration)> {
    let t = Instant::now();
    let mut s = mux
        .open(OpenRequest {
            stream: 0,
            namespace: "bench".into(),
            service: "ha-relay".into(),
            endpoint,
            node: Some(server.to_string()),
            protocol: Protocol::Opaque,
            source: String::new(),
            window: 0,
        })
        .await
        .map_err(|e| anyhow!("open: {e}"))?;
    s.shutdown().await?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        total += k;
    }
    Ok((total, t.elapsed()))
}

/// Throughput (Mbit/s) of one stream of `relay_bytes`, and the 4 MiB fetch times, from a node
/// on hub `ra` to a node on hub `rb`.
async fn relay(
    args: &HaArgs,
    api: &mut Api,
    tokens: &[String],
    n: usize,
    ra: usize,
    rb: usize,
) -> Result<(f64, Vec<u64>)> {
    let (client, server) = (node_name(n), node_name(n + 1));
    let endpoint: SocketAddr = "10.244.200.2:8080".parse()?;
    let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"ha-relay","namespace":"bench"},"spec":{"ports":[{"port":80,"targetPort":8080,"protocol":"TCP"}]}}"#;
    api.expect(
        Method::PUT,
        "/api/v1/namespaces/bench/services/ha-relay",
        Some(Bytes::from(svc)),
        &[200, 201],
    )
    .await?;
    let ep = format!(
        r#"{{"apiVersion":"v1","kind":"Endpoints","metadata":{{"name":"ha-relay","namespace":"bench"}},"subsets":[{{"addresses":[{{"ip":"10.244.200.2","nodeName":"{server}"}}],"ports":[{{"port":8080,"protocol":"TCP"}}]}}]}}"#
    );
    api.expect(
        Method::PUT,
        "/api/v1/namespaces/bench/endpoints/ha-relay",
        Some(Bytes::from(ep)),
        &[200, 201],
    )
    .await?;
    let big = tunnel_node(args.hubs[rb], &server, &tokens[n + 1], args.relay_bytes).await?;
    let a = tunnel_node(args.hubs[ra], &client, &tokens[n], 0).await?;
    // Presence reaches the other replicas through etcd.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (total, took) = fetch(&a, &server, endpoint).await?;
    if total != args.relay_bytes {
        bail!("relay: {total} of {} bytes arrived", args.relay_bytes);
    }
    let mbps = total as f64 * 8.0 / took.as_secs_f64() / 1e6;
    big.close("done");
    let small = tunnel_node(args.hubs[rb], &server, &tokens[n + 1], 4 << 20).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut times = Vec::new();
    for _ in 0..args.fetches {
        let (got, t) = fetch(&a, &server, endpoint).await?;
        if got != 4 << 20 {
            bail!("fetch: {got} bytes");
        }
        times.push(t.as_nanos() as u64);
    }
    times.sort_unstable();
    small.close("done");
    a.close("done");
    Ok((mbps, times))
}

/// A fresh node's sync request at `version`: what a simulated node sends first.
fn sync_request(version: u64) -> String {
    edgehub::message::SyncRequest {
        store_id: None,
        resource_version: version,
        chain: String::new(),
        labels: Default::default(),
        agent_version: concat!("edgemesh-bench/", env!("CARGO_PKG_VERSION")).to_string(),
    }
    .message()
    .to_json()
}
