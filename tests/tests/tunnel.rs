//! Tunnels end to end: a cloud namespace and two node namespaces that reach the cloud but not
//! each other (isolated bridge ports), pods behind each node, real servers and real curl.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use edgehub::io::Protocol;
use edgehub::message::{group, module, op, resource, Message, SyncRequest};
use edgehub::tunnel::frame::Frame;
use edgehub::tunnel::{OpenRequest, OpenResponse, RefusalKind, OPEN};
use edgemesh_e2e::mesh::{echo_transfer, in_netns, Mesh, API_PORT, HUB_PORT};
use edgemesh_e2e::{wait_for, Host};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};

const TARGET: u16 = 8080;
const MIB: usize = 1024 * 1024;

/// Cloud + two isolated nodes, started and synced.
fn mesh(tag: &str) -> Mesh {
    mesh_with(tag, &[])
}

/// [`mesh`] with `extra` settings for both nodes.
fn mesh_with(tag: &str, extra: &[&str]) -> Mesh {
    let mut mesh = Mesh::new(tag, 2, Vec::new());
    let (a, b) = (mesh.nodes[0].host.clone(), mesh.nodes[1].host.clone());
    mesh.topo.isolate(&[&a, &b]);
    mesh.start_cloud();
    mesh.create_tokens();
    for i in 0..2 {
        mesh.nodes[i].extra = ["proxy.reconcile_interval=\"1s\""]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        mesh.start_node(i);
    }
    for i in 0..2 {
        mesh.wait_synced(i);
    }
    mesh
}

fn curl_ok(mesh: &Mesh, client: &Host, url: &str) -> String {
    let (status, body) = mesh.topo.curl(client, &["--max-time", "10", url]);
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

#[test]
fn a_pod_on_one_node_reaches_a_service_on_another_through_the_cloud() {
    let mut mesh = mesh("tun-basic");
    let client = mesh.add_pod(0, "client");
    let server = mesh.add_pod(1, "server");
    mesh.serve(&server, "http", TARGET, "hello from b");
    // The nodes cannot reach each other directly.
    let direct = mesh.topo.exec_timeout(
        &mesh.nodes[0].host.clone(),
        &[
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            &mesh.nodes[1].host.ip.to_string(),
        ],
        Duration::from_secs(5),
    );
    assert!(
        !direct.status.success(),
        "nodes must be isolated from each other"
    );
    let ip = mesh.put_service(
        "web",
        80,
        TARGET,
        &[],
        &[(&server.ip.to_string(), "edge-1")],
    );
    let body = curl_ok(&mesh, &client, &format!("http://{ip}/"));
    assert_eq!(body.trim(), "hello from b");
    wait_for("relay counted", Duration::from_secs(5), || {
        (mesh.metric(1, "edgemesh_tunnel_streams_accepted_total", &[]) >= 1.0).then_some(())
    });
}

/// One short echo exchange that reports failure instead of panicking (for `wait_for`). A
/// read that gets nothing for 15 s fails with `WouldBlock`/`TimedOut`: a hang, not a refusal.
/// An echo server pod on node B behind Service `echo` (port 7); the address to call.
fn echo_on_node_b(mesh: &mut Mesh) -> SocketAddr {
    let echo = mesh.add_pod(1, "echo");
    mesh.serve(&echo, "echo", TARGET, "");
    let ip = mesh.put_service("echo", 7, TARGET, &[], &[(&echo.ip.to_string(), "edge-1")]);
    format!("{ip}:7").parse().expect("addr")
}

fn try_echo(ns: &str, addr: SocketAddr) -> std::io::Result<()> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let msg = b"are you there?".repeat(100);
        s.write_all(&msg)?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        if back == msg {
            Ok(())
        } else {
            Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("{} of {} bytes echoed", back.len(), msg.len()),
            ))
        }
    })
}

/// Whether a failed exchange was turned away (reset or closed), as opposed to left hanging.
/// `NotConnected`: the reset came between our write and our half-close.
fn turned_away(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected
            | ErrorKind::UnexpectedEof
            | ErrorKind::InvalidData
    )
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/PID/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for {pid}"))
}

/// Streams node `i` has open over its hub link (`/debug/proxy`).
fn open_streams(mesh: &Mesh, i: usize) -> u64 {
    let (s, v) = mesh.admin(i, "/debug/proxy");
    assert_eq!(s, 200, "/debug/proxy: {v}");
    v["tunnel"]["openStreams"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tunnel.openStreams in {v}"))
}

/// Waits until no stream is open on either node; on timeout says what is left.
fn wait_streams_closed(mesh: &Mesh, what: &str, timeout: Duration) {
    let started = Instant::now();
    loop {
        let open = (open_streams(mesh, 0), open_streams(mesh, 1));
        if open == (0, 0) {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: streams still open on (A, B) after {timeout:?}: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_hundred_megabytes_each_way_cross_the_relay_intact() {
    let mut mesh = mesh("tun-bulk");
    let client = mesh.add_pod(0, "client");
    let addr = echo_on_node_b(&mut mesh);
    // A server that speaks first is heard through the tunnel before the client says anything.
    let banner = mesh.add_pod(1, "banner");
    mesh.serve(&banner, "banner", TARGET, "220 smtp on b");
    let bip = mesh.put_service(
        "banner",
        25,
        TARGET,
        &[],
        &[(&banner.ip.to_string(), "edge-1")],
    );
    let baddr: SocketAddr = format!("{bip}:25").parse().expect("addr");
    let greeting = in_netns(&client.ns, move || {
        let mut s = TcpStream::connect_timeout(&baddr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).expect("banner");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert_eq!(greeting, "220 smtp on b\n");

    let started = Instant::now();
    echo_transfer(&client.ns, addr, 200 * MIB);
    eprintln!(
        "200 MiB each way through the relay in {:.1?}",
        started.elapsed()
    );
    let sent = mesh.metric(
        0,
        "edgemesh_proxy_bytes_total",
        &["service=\"default/echo\"", "direction=\"sent\""],
    );
    assert!(
        sent >= (200 * MIB) as f64,
        "bytes counted on node A: {sent}"
    );
    assert!(
        mesh.cloud_metric("cloudcore_tunnel_streams_total", &["kind=\"relay\""]) >= 1.0,
        "the cloud relayed the stream"
    );
    wait_streams_closed(&mesh, "the transfer ended", Duration::from_secs(10));
}

/// What the stalled-stream load saw, reported while the stalled connections are still held.
struct StallReport {
    /// Bytes each stalled client (reader stalled, endpoint stalled) could write before its
    /// writes blocked, or `None` if they never did (no push-back).
    pushed: [Option<usize>; 2],
    /// Failures of the other streams.
    failures: Vec<String>,
    /// How long the other streams took, all together.
    elapsed: Duration,
    /// Whether each stalled connection was still blocked (neither moving nor reset) after the
    /// others finished.
    still_blocked: [bool; 2],
}

/// One stream: `size` bytes (seeded by `seed`) through the echo server at `addr`, compared.
async fn echo_once(addr: SocketAddr, seed: u64, size: usize) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut data = vec![0u8; size];
        StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut r, mut w) = stream.into_split();
        let write = async {
            w.write_all(&data).await?;
            w.shutdown().await
        };
        let mut back = Vec::with_capacity(size);
        let read = r.read_to_end(&mut back);
        let (wrote, read) = tokio::join!(write, read);
        wrote.map_err(|e| format!("send: {e}"))?;
        read.map_err(|e| format!("receive: {e}"))?;
        if back.len() != size {
            return Err(format!("{} of {size} bytes echoed", back.len()));
        }
        if back != data {
            return Err("the echoed bytes differ from those sent".into());
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(120), work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("stream {seed}: {e}")),
        Err(_) => Err(format!("stream {seed}: not done within 120 s")),
    }
}

/// Writes to `stream` (never reading) until a write makes no progress for 3 s: everything
/// between here and the stalled reader is full. Without push-back it would go on; 256 MiB is
/// far past any buffer, so past that it gives up: `None`.
async fn push_until_blocked(stream: &mut tokio::net::TcpStream) -> Option<usize> {
    use tokio::io::AsyncWriteExt;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut pushed = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), stream.write_all(&chunk)).await {
            Ok(Ok(())) => {
                pushed += chunk.len();
                if pushed >= 256 * MIB {
                    return None;
                }
            }
            Ok(Err(e)) => panic!("a stalled stream failed after {pushed} bytes: {e}"),
            Err(_) => return Some(pushed),
        }
    }
}

/// Runs in the client pod: a connection to the echo server that writes and never reads, one to
/// the stall server (which never reads), each until its writes block; then `n` echo streams of
/// `size` bytes at once. Reports, then holds the stalled connections until `release`.
fn stalled_and_busy(
    echo: SocketAddr,
    stall: SocketAddr,
    n: usize,
    size: usize,
    report: mpsc::Sender<StallReport>,
    release: mpsc::Receiver<()>,
) {
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut stalled = [
            tokio::net::TcpStream::connect(echo)
                .await
                .expect("connect the stalled reader"),
            tokio::net::TcpStream::connect(stall)
                .await
                .expect("connect to the stalled endpoint"),
        ];
        let (first, second) = stalled.split_at_mut(1);
        let (a, b) = tokio::join!(
            push_until_blocked(&mut first[0]),
            push_until_blocked(&mut second[0])
        );
        let pushed = [a, b];
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            set.spawn(echo_once(echo, i as u64, size));
        }
        let mut failures = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(e) => failures.push(format!("task: {e}")),
            }
        }
        let elapsed = started.elapsed();
        let mut still_blocked = [false; 2];
        for (s, still) in stalled.iter_mut().zip(&mut still_blocked) {
            *still = tokio::time::timeout(Duration::from_secs(1), s.write_all(&[0u8; 64 * 1024]))
                .await
                .is_err();
        }
        let _ = report.send(StallReport {
            pushed,
            failures,
            elapsed,
            still_blocked,
        });
        // Held (unread) until the test has looked at the mesh.
        let _ = release.recv();
        drop(stalled);
    });
}

#[test]
fn stalled_streams_hold_back_only_themselves_and_memory_stays_bounded() {
    let mut mesh = mesh("tun-stall");
    let client = mesh.add_pod(0, "client");
    let echo = mesh.add_pod(1, "echo");
    mesh.serve(&echo, "echo", TARGET, "");
    let stall = mesh.add_pod(1, "stall");
    mesh.serve(&stall, "stall", TARGET, "");
    let ip = mesh.put_service("echo", 7, TARGET, &[], &[(&echo.ip.to_string(), "edge-1")]);
    let echo_addr: SocketAddr = format!("{ip}:7").parse().expect("addr");
    let ip = mesh.put_service(
        "stall",
        9,
        TARGET,
        &[],
        &[(&stall.ip.to_string(), "edge-1")],
    );
    let stall_addr: SocketAddr = format!("{ip}:9").parse().expect("addr");
    // Warm up, so the baseline includes what any first stream allocates.
    echo_transfer(&client.ns, echo_addr, MIB);
    let procs: Vec<(&str, u32)> = [
        ("cloudcore", mesh.cloud_proc),
        ("edgemesh on A", mesh.nodes[0].proc),
        ("edgemesh on B", mesh.nodes[1].proc),
    ]
    .into_iter()
    .map(|(name, p)| (name, mesh.topo.pid(p.expect("running"))))
    .collect();
    let before: Vec<u64> = procs.iter().map(|(_, pid)| rss_kib(*pid)).collect();

    // 2 stalled + 198 busy = 200 streams at once.
    let (report_tx, report_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let ns = client.ns.clone();
    let load = std::thread::spawn(move || {
        in_netns(&ns, move || {
            stalled_and_busy(echo_addr, stall_addr, 198, MIB, report_tx, release_rx)
        })
    });
    let mut peak = before.clone();
    let report = loop {
        for (i, (_, pid)) in procs.iter().enumerate() {
            peak[i] = peak[i].max(rss_kib(*pid));
        }
        match report_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(!load.is_finished(), "the load ended without a report");
            }
            Err(e) => panic!("load: {e}"),
        }
    };
    for (i, (_, pid)) in procs.iter().enumerate() {
        peak[i] = peak[i].max(rss_kib(*pid));
    }
    // Measured with the stalled streams still open.
    let streams_a = open_streams(&mesh, 0);
    let streams_b = open_streams(&mesh, 1);
    let _ = release_tx.send(());
    load.join().expect("load thread");

    eprintln!(
        "stalled reader: {:?} KiB written before its writes blocked; stalled endpoint: {:?} KiB; \
         198 x 1 MiB echoed meanwhile in {:.1?}",
        report.pushed[0].map(|b| b / 1024),
        report.pushed[1].map(|b| b / 1024),
        report.elapsed
    );
    for (i, (name, _)) in procs.iter().enumerate() {
        eprintln!(
            "{name}: VmRSS {} KiB before, {} KiB peak (+{} KiB)",
            before[i],
            peak[i],
            peak[i].saturating_sub(before[i])
        );
    }
    for (what, pushed) in [
        "a client that stops reading",
        "an endpoint that stops reading",
    ]
    .iter()
    .zip(report.pushed)
    {
        assert!(
            pushed.is_some(),
            "{what}: its sender wrote 256 MiB without ever being held back"
        );
    }
    assert!(
        report.failures.is_empty(),
        "{} of 198 streams failed: {:?}",
        report.failures.len(),
        &report.failures[..report.failures.len().min(10)]
    );
    assert_eq!(
        report.still_blocked,
        [true, true],
        "stalled streams stay open and held back while their readers stall"
    );
    assert_eq!(
        (streams_a, streams_b),
        (2, 2),
        "only the stalled streams are left open on A and on B"
    );
    for (i, (name, _)) in procs.iter().enumerate() {
        let growth = peak[i].saturating_sub(before[i]);
        assert!(
            growth < 150 * 1024,
            "{name} grew by {growth} KiB under 200 streams (window 256 KiB each)"
        );
    }
    // The mesh still serves. (What becomes of the stalled streams once their clients leave is
    // `a_client_that_gives_up_on_a_stuck_endpoint_releases_its_stream`.)
    echo_transfer(&client.ns, echo_addr, MIB);
}

#[test]
fn local_endpoints_are_preferred_and_remote_ones_take_over() {
    let mut mesh = mesh("tun-pref");
    let pod_a = mesh.add_pod(0, "srv-a");
    let server_a = mesh.serve(&pod_a, "http", TARGET, "a");
    let pod_b = mesh.add_pod(1, "srv-b");
    mesh.serve(&pod_b, "http", TARGET, "b");
    let client_a = mesh.add_pod(0, "client-a");
    let client_b = mesh.add_pod(1, "client-b");
    let ip = mesh.put_service(
        "web",
        80,
        TARGET,
        &[],
        &[
            (&pod_a.ip.to_string(), "edge-0"),
            (&pod_b.ip.to_string(), "edge-1"),
        ],
    );
    let only = |name: &str, n: usize| BTreeMap::from([(name.to_string(), n)]);
    assert_eq!(
        mesh.spread(&client_a, &ip, 60),
        only("a", 60),
        "a pod on A is answered by A's endpoint"
    );
    assert_eq!(
        mesh.spread(&client_b, &ip, 60),
        only("b", 60),
        "a pod on B is answered by B's endpoint"
    );

    // A's server stops: A's pods are answered by B, every request succeeds.
    let accepted = mesh.metric(1, "edgemesh_tunnel_streams_accepted_total", &[]);
    mesh.topo.stop(server_a);
    assert_eq!(
        mesh.spread(&client_a, &ip, 60),
        only("b", 60),
        "with A's endpoint gone, B answers"
    );
    // Through the cloud: HTTP requests share pooled streams, so at least one, not one each.
    let relayed = mesh.metric(1, "edgemesh_tunnel_streams_accepted_total", &[]) - accepted;
    assert!(
        relayed >= 1.0,
        "B accepted {relayed} streams for 60 requests"
    );
}

/// A connection that keeps sending (about 6 MB/s) and reading its echo. One task does both,
/// so the first failure is seen as such: with two threads on one socket, a reset consumed by
/// the writer leaves the reader a clean end of stream.
struct Flow {
    received: Arc<AtomicUsize>,
    ended: mpsc::Receiver<(Instant, std::io::Result<()>)>,
}

impl Flow {
    fn start(ns: &str, addr: SocketAddr) -> Flow {
        let stream = in_netns(ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect")
        });
        stream.set_nonblocking(true).expect("nonblocking");
        let received = Arc::new(AtomicUsize::new(0));
        let (tx, ended) = mpsc::channel();
        let counter = received.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let result = rt.block_on(async move {
                let s = tokio::net::TcpStream::from_std(stream)?;
                let chunk = vec![0x42u8; 64 * 1024];
                let mut buf = vec![0u8; 64 * 1024];
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                loop {
                    tokio::select! {
                        _ = tick.tick() => match s.try_write(&chunk) {
                            Ok(_) => {}
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                            Err(e) => return Err(e),
                        },
                        ready = s.readable() => {
                            ready?;
                            match s.try_read(&mut buf) {
                                Ok(0) => return Ok(()),
                                Ok(n) => {
                                    counter.fetch_add(n, Ordering::Relaxed);
                                }
                                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                                Err(e) => return Err(e),
                            }
                        }
                    }
                }
            });
            let _ = tx.send((Instant::now(), result));
        });
        Flow { received, ended }
    }

    fn wait_moving(&self) {
        wait_for("the transfer under way", Duration::from_secs(20), || {
            (self.received.load(Ordering::Relaxed) >= 2 * MIB).then_some(())
        });
    }

    /// Waits (up to 30 s, far past "prompt") for the connection to end; how long after `since`
    /// it ended, and how.
    fn outcome(&self, since: Instant) -> (Duration, std::io::Result<()>) {
        match self.ended.recv_timeout(Duration::from_secs(30)) {
            Ok((at, result)) => (at.saturating_duration_since(since), result),
            Err(_) => panic!(
                "the client's connection still hangs 30 s after its far end went away ({} bytes received)",
                self.received.load(Ordering::Relaxed)
            ),
        }
    }
}

fn assert_prompt_error(what: &str, ended: (Duration, std::io::Result<()>)) {
    let (after, result) = ended;
    eprintln!("{what}: the client's connection ended {after:.1?} later with {result:?}");
    match result {
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            ),
            "{what}: the client should see a reset, got {e}"
        ),
        Ok(()) => {
            panic!("{what}: the client saw a clean end of stream, as if the transfer had completed")
        }
    }
    assert!(
        after <= Duration::from_secs(10),
        "{what}: the client learned of it only {after:.1?} later"
    );
}

/// A new connection to `addr` from `ns` fails within 10 s, reset or closed rather than hung.
fn assert_turned_away_promptly(what: &str, ns: &str, addr: SocketAddr) {
    let started = Instant::now();
    let result = try_echo(ns, addr);
    let took = started.elapsed();
    eprintln!("{what}: a new connection ended after {took:.1?} with {result:?}");
    match result {
        Ok(()) => panic!("{what}: the echo succeeded"),
        Err(e) => assert!(turned_away(&e), "{what}: a new connection hung: {e}"),
    }
    assert!(
        took <= Duration::from_secs(10),
        "{what}: a new connection took {took:.1?} to fail"
    );
}

#[test]
fn streams_to_a_node_that_goes_away_fail_promptly_and_work_once_it_is_back() {
    let mut mesh = mesh("tun-gone");
    let client = mesh.add_pod(0, "client");
    let addr = echo_on_node_b(&mut mesh);
    try_echo(&client.ns, addr).expect("echo through B");

    // B's agent crashes mid-transfer.
    let flow = Flow::start(&client.ns, addr);
    flow.wait_moving();
    let killed = Instant::now();
    mesh.stop_node(1, libc::SIGKILL);
    assert_prompt_error("B's agent killed", flow.outcome(killed));
    wait_for(
        "A's side of the stream gone",
        Duration::from_secs(10),
        || (open_streams(&mesh, 0) == 0).then_some(()),
    );
    // While B is away, new connections are turned away at once.
    assert_turned_away_promptly("B's agent down", &client.ns, addr);
    // B comes back: new connections are served.
    mesh.start_node(1);
    mesh.wait_synced(1);
    wait_for(
        "echo through B after its restart",
        Duration::from_secs(30),
        || try_echo(&client.ns, addr).ok(),
    );

    // B's uplink is cut mid-transfer: nothing tells anyone, the cloud has to notice.
    let flow = Flow::start(&client.ns, addr);
    flow.wait_moving();
    let node_b = mesh.nodes[1].host.clone();
    let cut = Instant::now();
    let out = mesh
        .topo
        .exec(&node_b, &["ip", "link", "set", "eth0", "down"]);
    assert!(out.status.success(), "link down: {:?}", out);
    // A new connection right after the cut, before anyone knows, must not hang either.
    let ns = client.ns.clone();
    let fresh = std::thread::spawn(move || {
        let started = Instant::now();
        let result = try_echo(&ns, addr);
        (started.elapsed(), result)
    });
    assert_prompt_error("B's link cut", flow.outcome(cut));
    let (took, fresh) = fresh.join().expect("fresh connection");
    eprintln!(
        "B's link cut: a new connection right after the cut ended after {took:.1?} with {fresh:?}"
    );
    match fresh {
        Ok(()) => panic!("an echo through B succeeded while its link was cut"),
        Err(e) => assert!(turned_away(&e), "B's link cut: a new connection hung: {e}"),
    }
    assert!(
        took <= Duration::from_secs(10),
        "B's link cut: a new connection took {took:.1?} to fail"
    );
    assert_turned_away_promptly("B's link cut, the cloud knows", &client.ns, addr);
    let out = mesh
        .topo
        .exec(&node_b, &["ip", "link", "set", "eth0", "up"]);
    assert!(out.status.success(), "link up: {:?}", out);
    wait_for(
        "echo through B after its link is back",
        Duration::from_secs(30),
        || try_echo(&client.ns, addr).ok(),
    );
}

/// What `hammer` saw.
#[derive(Debug, Default)]
struct Load {
    sent: usize,
    ok: usize,
    limited: usize,
    /// 429s without a `Retry-After` of at least one second.
    limited_without_retry_after: usize,
    /// Anything else: other statuses, connection errors.
    other: Vec<String>,
    /// Keep-alive connections that got both a 200 and a 429 (limited per request).
    mixed_connections: usize,
    /// From the first request sent to the last.
    elapsed: Duration,
}

/// One HTTP/1.1 request on a new connection; the status and the `Retry-After` header.
fn get(addr: SocketAddr, i: usize) -> Result<(u16, Option<String>), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /?i={i} HTTP/1.1\r\nHost: limited\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)
        .map_err(|e| format!("receive: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let retry_after = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().to_string())
    });
    Ok((status, retry_after))
}

/// One HTTP/1.1 request on the keep-alive connection `conn` (opened first if there is none);
/// the status and the `Retry-After` header. The connection is dropped when the answer says
/// `Connection: close` or the exchange fails.
fn get_keep_alive(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: SocketAddr,
    i: usize,
) -> Result<(u16, Option<String>), String> {
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        *conn = Some(BufReader::new(s));
    }
    let result = (|| {
        let reader = conn.as_mut().expect("connected");
        write!(
            reader.get_mut(),
            "GET /?i={i} HTTP/1.1\r\nHost: limited\r\n\r\n"
        )
        .map_err(|e| format!("send: {e}"))?;
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("receive: {e}"))?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {line:?}"))?;
        let (mut length, mut retry_after, mut close) = (0usize, None, false);
        loop {
            line.clear();
            reader
                .read_line(&mut line)
                .map_err(|e| format!("receive: {e}"))?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((k, v)) = header.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.parse().map_err(|_| "bad length")?,
                "retry-after" => retry_after = Some(v.to_string()),
                "connection" => close = v.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0u8; length];
        reader
            .read_exact(&mut body)
            .map_err(|e| format!("receive body: {e}"))?;
        Ok((status, retry_after, close))
    })();
    match result {
        Ok((status, retry_after, close)) => {
            if close {
                *conn = None;
            }
            Ok((status, retry_after))
        }
        Err(e) => {
            *conn = None;
            Err(e)
        }
    }
}

/// `rate` requests a second to `addr` for `duration`, from `ns`: each on a new connection, or
/// (`keep_alive`) on a few connections each worker keeps.
fn hammer(ns: &str, addr: SocketAddr, rate: u32, duration: Duration, keep_alive: bool) -> Load {
    in_netns(ns, move || {
        let total = (rate as f64 * duration.as_secs_f64()) as usize;
        let gap = Duration::from_secs(1) / rate;
        let next = Arc::new(AtomicUsize::new(0));
        let load = Arc::new(Mutex::new(Load::default()));
        let last = Arc::new(Mutex::new(Duration::ZERO));
        let start = Instant::now();
        // Threads started here share this thread's network namespace.
        let workers: Vec<_> = (0..32)
            .map(|_| {
                let (next, load, last) = (next.clone(), load.clone(), last.clone());
                std::thread::spawn(move || {
                    let mut conn = None;
                    // Statuses seen on the current keep-alive connection.
                    let mut seen = (false, false);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            return;
                        }
                        let at = start + gap * i as u32;
                        if let Some(wait) = at.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        {
                            let mut last = last.lock().expect("lock");
                            *last = (*last).max(start.elapsed());
                        }
                        let r = if keep_alive {
                            let fresh = conn.is_none();
                            let r = get_keep_alive(&mut conn, addr, i);
                            if fresh {
                                seen = (false, false);
                            }
                            r
                        } else {
                            get(addr, i)
                        };
                        let mut load = load.lock().expect("lock");
                        load.sent += 1;
                        if keep_alive {
                            match r {
                                Ok((200, _)) => seen.0 = true,
                                Ok((429, _)) => seen.1 = true,
                                _ => {}
                            }
                            if seen == (true, true) {
                                load.mixed_connections += 1;
                                seen = (false, false);
                            }
                        }
                        match r {
                            Ok((200, _)) => load.ok += 1,
                            Ok((429, retry_after)) => {
                                load.limited += 1;
                                let valid = retry_after
                                    .and_then(|v| v.parse::<u64>().ok())
                                    .is_some_and(|s| s >= 1);
                                if !valid {
                                    load.limited_without_retry_after += 1;
                                }
                            }
                            Ok((status, _)) => {
                                load.other.push(format!("request {i}: status {status}"))
                            }
                            Err(e) => load.other.push(format!("request {i}: {e}")),
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        let mut load = std::mem::take(&mut *load.lock().expect("lock"));
        load.elapsed = *last.lock().expect("lock");
        load
    })
}

#[test]
fn a_qps_limit_holds_where_the_endpoint_is_dialled_for_local_and_remote_callers() {
    let mut mesh = mesh("tun-qps");
    let server = mesh.add_pod(1, "server");
    mesh.serve(&server, "http", TARGET, "b");
    let local = mesh.add_pod(1, "local");
    let remote = mesh.add_pod(0, "remote");
    let ip = mesh.put_service(
        "limited",
        80,
        TARGET,
        &[("edgemesh.io/qps", "50")],
        &[(&server.ip.to_string(), "edge-1")],
    );
    let addr: SocketAddr = format!("{ip}:80").parse().expect("addr");
    let rejected =
        |mesh: &Mesh| mesh.metric(1, "edgemesh_limit_rejected_total", &["service=\"limited\""]);
    for (who, pod) in [
        ("local (client on B)", &local),
        ("remote (client on A)", &remote),
    ] {
        // The bucket refills its burst (50, the default: one second's worth) in a second.
        std::thread::sleep(Duration::from_secs(2));
        let rejected_before = rejected(&mesh);
        let load = hammer(&pod.ns, addr, 200, Duration::from_secs(10), false);
        // Burst (= qps by default) at once, then qps a second.
        let allowed = 50.0 + 50.0 * load.elapsed.as_secs_f64();
        eprintln!(
            "{who}: {} requests in {:.2?} ({:.0}/s): {} ok (limit allows ~{allowed:.0}), {} limited, {} other",
            load.sent,
            load.elapsed,
            load.sent as f64 / load.elapsed.as_secs_f64(),
            load.ok,
            load.limited,
            load.other.len()
        );
        assert!(
            load.other.is_empty(),
            "{who}: every request gets 200 or 429: {:?}",
            &load.other[..load.other.len().min(10)]
        );
        assert!(
            (load.ok as f64 - allowed).abs() <= allowed * 0.10,
            "{who}: {} successes, the limit allows about {allowed:.0}",
            load.ok
        );
        assert!(load.limited > 0, "{who}: nothing was limited");
        assert_eq!(
            load.limited_without_retry_after, 0,
            "{who}: every 429 carries Retry-After"
        );
        let counted = rejected(&mesh) - rejected_before;
        assert_eq!(
            counted, load.limited as f64,
            "{who}: edgemesh_limit_rejected_total on B counts every 429"
        );
    }
}

/// What a hand-spoken hub link received.
enum Event {
    Msg(Box<Message>),
    Frame(Frame),
}

/// A node's hub link spoken by hand: what a compromised or buggy node could send.
struct Rogue {
    rt: tokio::runtime::Runtime,
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
}

impl Rogue {
    /// Connects as `node` (from the cloud's namespace) and syncs like a node does first.
    fn connect(mesh: &Mesh, node: &str, token: &str) -> Rogue {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let hub = SocketAddr::from((mesh.cloud.ip, HUB_PORT));
        let tcp = in_netns(&mesh.cloud.ns, move || {
            TcpStream::connect_timeout(&hub, Duration::from_secs(5)).expect("connect the hub")
        });
        tcp.set_nonblocking(true).expect("nonblocking");
        let mut req = format!("{}/v1/nodes/{node}/events", mesh.hub_url())
            .into_client_request()
            .expect("request");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let ws = rt.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp).expect("tokio stream");
            tokio_tungstenite::client_async(req, tcp)
                .await
                .expect("websocket handshake")
                .0
        });
        let mut rogue = Rogue { rt, ws };
        let sync = SyncRequest {
            store_id: None,
            resource_version: 0,
            chain: String::new(),
            labels: Default::default(),
            agent_version: "rogue".into(),
        };
        rogue.send(WsMessage::text(sync.message().to_json()));
        loop {
            match rogue.next() {
                Ok(Event::Msg(m))
                    if m.operation() == op::RESPONSE && m.resource() == resource::SYNC =>
                {
                    break
                }
                Ok(_) => {}
                Err(e) => panic!("{node}: no answer to the sync request: {e}"),
            }
        }
        rogue
    }

    fn send(&mut self, m: WsMessage) {
        let ws = &mut self.ws;
        self.rt.block_on(ws.send(m)).expect("send to the hub");
    }

    fn send_frame(&mut self, f: Frame) {
        self.send(WsMessage::Binary(f.encode()));
    }

    fn keepalive(&mut self) {
        let ka = Message::new(
            module::EDGEHUB,
            module::CLOUDHUB,
            group::HUB,
            op::KEEPALIVE,
            "_/node/rogue",
        );
        self.send(WsMessage::text(ka.to_json()));
    }

    /// The next Message or frame from the cloud; `Err` says how the link ended, or that
    /// nothing came within 10 s.
    fn next(&mut self) -> Result<Event, String> {
        let ws = &mut self.ws;
        self.rt.block_on(async move {
            loop {
                let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
                    .await
                    .map_err(|_| "nothing from the cloud within 10 s".to_string())?;
                match next {
                    None => return Err("connection ended".into()),
                    Some(Err(e)) => return Err(format!("connection failed: {e}")),
                    Some(Ok(WsMessage::Close(f))) => {
                        return Err(format!("closed by the cloud: {f:?}"))
                    }
                    Some(Ok(WsMessage::Text(t))) => {
                        return Message::from_json(t.as_str())
                            .map(|m| Event::Msg(Box::new(m)))
                            .map_err(|e| format!("bad message from the cloud: {e}"))
                    }
                    Some(Ok(WsMessage::Binary(raw))) => {
                        return Frame::decode(raw)
                            .map(Event::Frame)
                            .map_err(|e| format!("bad frame from the cloud: {e}"))
                    }
                    Some(Ok(_)) => {}
                }
            }
        })
    }

    /// Sends an open and returns the cloud's answer to it.
    fn open(&mut self, request: OpenRequest) -> OpenResponse {
        let id = request.stream;
        self.send(WsMessage::text(request.message(module::EDGEHUB).to_json()));
        loop {
            match self.next() {
                Ok(Event::Msg(m)) if m.operation() == op::RESPONSE && m.resource() == OPEN => {
                    let answer: OpenResponse = m.content_as().expect("an open answer");
                    if answer.stream == id {
                        return answer;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("no answer to the open of stream {id}: {e}"),
            }
        }
    }

    /// The data of stream `id` until it ends; and how it ended (`fin`, or the reset reason).
    fn read_stream(&mut self, id: u32) -> (Vec<u8>, String) {
        let mut data = Vec::new();
        loop {
            match self.next() {
                Ok(Event::Frame(Frame::Data(i, d))) if i == id => data.extend_from_slice(&d),
                Ok(Event::Frame(Frame::Fin(i))) if i == id => return (data, "fin".into()),
                Ok(Event::Frame(Frame::Reset(i, why))) if i == id => {
                    return (data, format!("reset: {why}"))
                }
                Ok(_) => {}
                Err(e) => panic!("stream {id} did not end ({} bytes so far): {e}", data.len()),
            }
        }
    }

    /// Reads until the cloud ends the link; how it ended.
    fn closed(&mut self) -> String {
        loop {
            match self.next() {
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    }
}

fn open_request(id: u32, service: &str, endpoint: SocketAddr, node: Option<&str>) -> OpenRequest {
    OpenRequest {
        stream: id,
        namespace: "default".into(),
        service: service.into(),
        endpoint,
        node: node.map(str::to_string),
        protocol: Protocol::Opaque,
        source: String::new(),
        window: 256 * 1024,
    }
}

#[test]
fn forged_opens_are_refused_and_bad_frames_cost_only_their_sender() {
    let mut mesh = mesh("tun-forge");
    let server = mesh.add_pod(1, "server");
    mesh.serve(&server, "http", TARGET, "b");
    let echo = mesh.add_pod(1, "echo");
    mesh.serve(&echo, "echo", TARGET, "");
    let client = mesh.add_pod(0, "client");
    let web_ip = mesh.put_service(
        "web",
        80,
        TARGET,
        &[],
        &[(&server.ip.to_string(), "edge-1")],
    );
    let echo_ip = mesh.put_service("echo", 7, TARGET, &[], &[(&echo.ip.to_string(), "edge-1")]);
    let token = mesh.create_token("rogue");
    let mut rogue = Rogue::connect(&mesh, "rogue", &token);

    let pod = SocketAddr::from((server.ip, TARGET));
    let node_b = SocketAddr::from((mesh.nodes[1].host.ip, 22));
    let cloud_api = SocketAddr::from((mesh.cloud.ip, API_PORT));
    let forged = [
        (
            "an endpoint said to be on a node that does not host it",
            open_request(2, "web", pod, Some("edge-0")),
        ),
        (
            "a node's address that is no endpoint",
            open_request(4, "web", node_b, Some("edge-1")),
        ),
        (
            "a port the service does not expose",
            open_request(6, "web", SocketAddr::from((server.ip, 22)), Some("edge-1")),
        ),
        (
            "a pod for the cloud to dial",
            open_request(8, "web", pod, None),
        ),
        (
            "the cloud's own API for the cloud to dial",
            open_request(10, "web", cloud_api, None),
        ),
        (
            "a service that does not exist",
            open_request(12, "nope", pod, Some("edge-1")),
        ),
        (
            "another service's endpoint",
            open_request(14, "echo", pod, Some("edge-1")),
        ),
    ];
    for (what, request) in forged {
        let answer = rogue.open(request);
        let refusal = answer
            .error
            .unwrap_or_else(|| panic!("{what}: the open was accepted"));
        assert_eq!(refusal.kind, RefusalKind::Forbidden, "{what}: {refusal:?}");
    }
    // The namespace is part of the name.
    let mut other_ns = open_request(16, "web", pod, Some("edge-1"));
    other_ns.namespace = "kube-system".into();
    let refusal = rogue.open(other_ns).error.expect("refused");
    assert_eq!(refusal.kind, RefusalKind::Forbidden, "{refusal:?}");
    // Ids of the cloud's parity are not the node's to use.
    let refusal = rogue
        .open(open_request(17, "web", pod, Some("edge-1")))
        .error
        .expect("an odd id is refused");
    assert_eq!(refusal.kind, RefusalKind::Invalid, "{refusal:?}");

    // The same node's genuine open is served, frames and all.
    let answer = rogue.open(open_request(100, "web", pod, Some("edge-1")));
    assert_eq!(answer.error, None, "a genuine open");
    assert!(answer.window > 0, "{answer:?}");
    rogue.send_frame(Frame::Data(
        100,
        Bytes::from_static(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"),
    ));
    let (data, end) = rogue.read_stream(100);
    let text = String::from_utf8_lossy(&data);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nb\n"),
        "{text:?}"
    );
    assert_eq!(end, "fin", "{text:?}");
    rogue.send_frame(Frame::Fin(100));

    // A malformed frame that names a stream: that stream is reset, the link goes on.
    assert_eq!(
        rogue
            .open(open_request(102, "web", pod, Some("edge-1")))
            .error,
        None
    );
    rogue.send(WsMessage::Binary(Bytes::from_static(&[
        1, 0, 0, 0, 102, 0, 0,
    ])));
    let (_, end) = rogue.read_stream(102);
    assert!(end.starts_with("reset"), "stream 102 ended with {end}");
    rogue.keepalive();
    assert_eq!(
        rogue
            .open(open_request(104, "web", pod, Some("edge-1")))
            .error,
        None,
        "the link still opens streams"
    );

    // Frames for streams this node never opened reach nobody else's: a transfer between the
    // real nodes goes on intact meanwhile.
    let echo_addr: SocketAddr = format!("{echo_ip}:7").parse().expect("addr");
    let ns = client.ns.clone();
    let transfer = std::thread::spawn(move || echo_transfer(&ns, echo_addr, 32 * MIB));
    wait_for("the transfer under way", Duration::from_secs(20), || {
        (open_streams(&mesh, 0) >= 1).then_some(())
    });
    for id in 1..=512u32 {
        rogue.send_frame(Frame::Data(id, Bytes::from_static(b"x")));
        rogue.send_frame(Frame::Window(id, 1 << 20));
        rogue.send_frame(Frame::Fin(id));
        rogue.send_frame(Frame::Reset(id, "forged".into()));
    }

    // A frame without a readable header closes that node's link, not the cloud.
    rogue.send(WsMessage::Binary(Bytes::from_static(&[9, 0, 0, 0, 2])));
    let end = rogue.closed();
    assert!(
        !end.contains("nothing from the cloud"),
        "the link stayed open: {end}"
    );
    eprintln!("after [9,0,0,0,2]: {end}");
    transfer
        .join()
        .expect("the transfer between the real nodes");

    // A one-byte frame, and an open that is not an OpenRequest: the link is closed.
    let mut rogue = Rogue::connect(&mesh, "rogue", &token);
    rogue.send(WsMessage::Binary(Bytes::from_static(&[0])));
    let end = rogue.closed();
    assert!(
        !end.contains("nothing from the cloud"),
        "the link stayed open: {end}"
    );
    eprintln!("after a 1-byte frame: {end}");
    let mut rogue = Rogue::connect(&mesh, "rogue", &token);
    let bogus = Message::new(
        module::EDGEHUB,
        module::CLOUDHUB,
        group::STREAM,
        op::QUERY,
        OPEN,
    )
    .with_content(&serde_json::json!({"stream": 2, "service": ["not", "a", "name"]}));
    rogue.send(WsMessage::text(bogus.to_json()));
    let end = rogue.closed();
    assert!(
        !end.contains("nothing from the cloud"),
        "the link stayed open: {end}"
    );
    eprintln!("after a malformed open: {end}");

    // The cloud is up and the real nodes still work through it.
    let cloud = mesh.cloud_proc.expect("cloudcore");
    assert!(mesh.topo.is_running(cloud), "cloudcore is running");
    assert_eq!(mesh.api("GET", "/healthz", None).0, 200);
    let (_, nodes) = mesh.api("GET", "/api/v1/nodes", None);
    for name in ["edge-0", "edge-1"] {
        let online = nodes["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["metadata"]["name"] == name)
            .map(|n| n["status"]["online"] == true);
        assert_eq!(online, Some(true), "{name}: {nodes}");
    }
    let body = curl_ok(&mesh, &client, &format!("http://{web_ip}/"));
    assert_eq!(body.trim(), "b");
}

#[test]
fn a_qps_limit_closes_tcp_connections_over_it() {
    let mut mesh = mesh("tun-qpstcp");
    let echo = mesh.add_pod(1, "echo");
    mesh.serve(&echo, "echo", TARGET, "");
    let local = mesh.add_pod(1, "local");
    let remote = mesh.add_pod(0, "remote");
    let ip = mesh.put_service(
        "tcp-limited",
        7,
        TARGET,
        &[("edgemesh.io/qps", "1"), ("edgemesh.io/burst", "5")],
        &[(&echo.ip.to_string(), "edge-1")],
    );
    let addr: SocketAddr = format!("{ip}:7").parse().expect("addr");
    let rejected = |mesh: &Mesh| {
        mesh.metric(
            1,
            "edgemesh_limit_rejected_total",
            &["service=\"tcp-limited\"", "protocol=\"tcp\""],
        )
    };
    for (who, pod) in [
        ("local (client on B)", &local),
        ("remote (client on A)", &remote),
    ] {
        // The burst of 5 is back after 5 s at 1 a second.
        std::thread::sleep(Duration::from_secs(6));
        let before = rejected(&mesh);
        let started = Instant::now();
        let results: Vec<std::io::Result<()>> = (0..20).map(|_| try_echo(&pod.ns, addr)).collect();
        let elapsed = started.elapsed();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let refused: Vec<&std::io::Error> =
            results.iter().filter_map(|r| r.as_ref().err()).collect();
        eprintln!(
            "{who}: 20 connections in {elapsed:.1?}: {ok} echoed, {} closed ({:?})",
            refused.len(),
            refused.first()
        );
        let most = 5 + elapsed.as_secs() as usize + 1;
        assert!(
            (5..=most).contains(&ok),
            "{who}: {ok} connections served, the limit allows 5 at once and 1 a second"
        );
        for e in &refused {
            assert!(
                turned_away(e),
                "{who}: a connection over the limit hung: {e}"
            );
        }
        let counted = rejected(&mesh) - before;
        assert_eq!(
            counted,
            refused.len() as f64,
            "{who}: edgemesh_limit_rejected_total{{protocol=\"tcp\"}} on B"
        );
    }
}

#[test]
fn a_pod_reaches_a_cloud_endpoint_and_cloudcore_enforces_its_limit() {
    let mut mesh = mesh("tun-cloud");
    let cloud = mesh.cloud.clone();
    mesh.serve(&cloud, "http", TARGET, "from the cloud");
    let client = mesh.add_pod(0, "client");
    let ip = mesh.put_service(
        "cloudsvc",
        80,
        TARGET,
        &[],
        &[(&cloud.ip.to_string(), "cloud")],
    );
    let body = curl_ok(&mesh, &client, &format!("http://{ip}/"));
    assert_eq!(body.trim(), "from the cloud");
    assert!(
        mesh.cloud_metric("cloudcore_tunnel_streams_total", &["kind=\"cloud\""]) >= 1.0,
        "cloudcore dialled the endpoint"
    );

    // The limit is enforced by cloudcore, which dials the endpoint.
    mesh.put_service(
        "cloudsvc",
        80,
        TARGET,
        &[("edgemesh.io/qps", "50")],
        &[(&cloud.ip.to_string(), "cloud")],
    );
    std::thread::sleep(Duration::from_secs(2));
    let rejected = |mesh: &Mesh| {
        mesh.cloud_metric("cloudcore_limit_rejected_total", &["service=\"cloudsvc\""])
    };
    let before = rejected(&mesh);
    let addr: SocketAddr = format!("{ip}:80").parse().expect("addr");
    let load = hammer(&client.ns, addr, 200, Duration::from_secs(5), false);
    let allowed = 50.0 + 50.0 * load.elapsed.as_secs_f64();
    eprintln!(
        "cloud endpoint: {} requests in {:.2?}: {} ok (limit allows ~{allowed:.0}), {} limited, {} other",
        load.sent,
        load.elapsed,
        load.ok,
        load.limited,
        load.other.len()
    );
    assert!(
        load.other.is_empty(),
        "every request gets 200 or 429: {:?}",
        &load.other[..load.other.len().min(10)]
    );
    assert!(
        (load.ok as f64 - allowed).abs() <= allowed * 0.10,
        "{} successes, the limit allows about {allowed:.0}",
        load.ok
    );
    assert_eq!(
        load.limited_without_retry_after, 0,
        "every 429 carries Retry-After"
    );
    assert_eq!(
        rejected(&mesh) - before,
        load.limited as f64,
        "cloudcore_limit_rejected_total counts every 429"
    );
}

#[test]
fn a_node_that_ignores_flow_control_loses_its_stream_and_nothing_else() {
    let mut mesh = mesh("tun-flood");
    let stall = mesh.add_pod(1, "stall");
    mesh.serve(&stall, "stall", TARGET, "");
    mesh.put_service(
        "stall",
        9,
        TARGET,
        &[],
        &[(&stall.ip.to_string(), "edge-1")],
    );
    let server = mesh.add_pod(1, "server");
    mesh.serve(&server, "http", TARGET, "b");
    let web_ip = mesh.put_service(
        "web",
        80,
        TARGET,
        &[],
        &[(&server.ip.to_string(), "edge-1")],
    );
    let client = mesh.add_pod(0, "client");
    let token = mesh.create_token("rogue");
    let mut rogue = Rogue::connect(&mesh, "rogue", &token);
    let pids = [
        mesh.topo.pid(mesh.cloud_proc.expect("cloudcore")),
        mesh.topo.pid(mesh.nodes[1].proc.expect("edge-1")),
    ];
    let before = pids.map(rss_kib);

    let endpoint = SocketAddr::from((stall.ip, TARGET));
    let answer = rogue.open(open_request(2, "stall", endpoint, Some("edge-1")));
    assert_eq!(answer.error, None, "{answer:?}");
    // 64 MiB at once, never waiting for a WINDOW frame, into an endpoint that reads nothing.
    let chunk = Bytes::from(vec![0x33u8; 32 * 1024]);
    for _ in 0..2048 {
        rogue.send_frame(Frame::Data(2, chunk.clone()));
    }
    let (_, end) = rogue.read_stream(2);
    let after = pids.map(rss_kib);
    eprintln!(
        "64 MiB past the window: stream ended with {end:?}; VmRSS cloudcore {} -> {} KiB, B {} -> {} KiB",
        before[0], after[0], before[1], after[1]
    );
    assert!(end.starts_with("reset"), "the stream ended with {end}");
    for (name, (b, a)) in ["cloudcore", "edgemesh on B"]
        .iter()
        .zip(before.iter().zip(&after))
    {
        assert!(
            a.saturating_sub(*b) < 150 * 1024,
            "{name} grew from {b} to {a} KiB"
        );
    }
    wait_for(
        "B's side of the stream closed",
        Duration::from_secs(10),
        || (open_streams(&mesh, 1) == 0).then_some(()),
    );
    // Only that stream: the same link opens and uses another.
    rogue.keepalive();
    let answer = rogue.open(open_request(
        4,
        "web",
        SocketAddr::from((server.ip, TARGET)),
        Some("edge-1"),
    ));
    assert_eq!(answer.error, None, "{answer:?}");
    rogue.send_frame(Frame::Data(
        4,
        Bytes::from_static(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"),
    ));
    let (data, end) = rogue.read_stream(4);
    assert!(
        String::from_utf8_lossy(&data).ends_with("\r\n\r\nb\n"),
        "{end}"
    );
    let body = curl_ok(&mesh, &client, &format!("http://{web_ip}/"));
    assert_eq!(body.trim(), "b");
}

/// Runs in `ns`: connects to `addr`, writes until the writes block (the endpoint reads
/// nothing), then aborts the connection (RST), as a client that gives up does.
fn push_then_abort(ns: &str, addr: SocketAddr) -> Option<usize> {
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let pushed = push_until_blocked(&mut s).await;
            // SO_LINGER 0: close() sends a RST (blocking on drop is not an issue with 0).
            #[allow(deprecated)]
            s.set_linger(Some(Duration::ZERO)).expect("linger");
            drop(s);
            pushed
        })
    })
}

/// Connections from node `i`'s namespace to `pod`'s port `TARGET` (the agent's upstream ones).
fn upstream_connections(mesh: &Mesh, i: usize, pod: &Host) -> usize {
    let out = mesh.topo.exec(
        &mesh.nodes[i].host,
        &["ss", "-tnH", "dst", &format!("{}:{TARGET}", pod.ip)],
    );
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn a_client_that_gives_up_on_a_stuck_endpoint_releases_its_stream() {
    let mut mesh = mesh("tun-abort");
    let stall = mesh.add_pod(1, "stall");
    mesh.serve(&stall, "stall", TARGET, "");
    let ip = mesh.put_service(
        "stall",
        9,
        TARGET,
        &[],
        &[(&stall.ip.to_string(), "edge-1")],
    );
    let addr: SocketAddr = format!("{ip}:9").parse().expect("addr");
    let client = mesh.add_pod(0, "client");
    let pushed = push_then_abort(&client.ns, addr);
    assert!(pushed.is_some(), "the stuck endpoint never pushed back");
    let aborted = Instant::now();
    let mut seen = Vec::new();
    loop {
        let state = (
            open_streams(&mesh, 0),
            open_streams(&mesh, 1),
            upstream_connections(&mesh, 1, &stall),
        );
        if state == (0, 0, 0) {
            break;
        }
        if seen.last() != Some(&state) {
            seen.push(state);
        }
        assert!(
            aborted.elapsed() < Duration::from_secs(10),
            "10 s after the client aborted (RST), (streams on A, streams on B, B's connections \
             to the endpoint) went {seen:?}: the stream and the endpoint connection are held \
             until proxy.idle_timeout"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn half_close_timeout_applies_to_tunnelled_connections() {
    let mut mesh = mesh_with("tun-half", &["proxy.half_close_timeout=\"2s\""]);
    let stall = mesh.add_pod(1, "stall");
    mesh.serve(&stall, "stall", TARGET, "");
    let ip = mesh.put_service(
        "stall",
        9,
        TARGET,
        &[],
        &[(&stall.ip.to_string(), "edge-1")],
    );
    let addr: SocketAddr = format!("{ip}:9").parse().expect("addr");
    let local = mesh.add_pod(1, "local");
    let remote = mesh.add_pod(0, "remote");
    // A request, then the client's FIN; the endpoint never answers. The connection must not
    // outlive the half-close timeout by much, local or tunnelled alike.
    for (who, pod) in [
        ("local (client on B)", &local),
        ("remote (client on A)", &remote),
    ] {
        let (took, result) = in_netns(&pod.ns, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s.write_all(b"QUIT\r\n").expect("send");
            s.shutdown(Shutdown::Write).expect("half-close");
            let started = Instant::now();
            let mut buf = [0u8; 16];
            let result = s.read(&mut buf);
            (started.elapsed(), result)
        });
        eprintln!("{who}: half-closed connection ended after {took:.1?} with {result:?}");
        assert!(
            took < Duration::from_secs(10),
            "{who}: a half-closed connection to a silent endpoint lasted {took:.1?} \
             (proxy.half_close_timeout = 2s)"
        );
    }
    wait_streams_closed(
        &mesh,
        "half-closed connections ended",
        Duration::from_secs(10),
    );
}

#[test]
fn streams_through_a_crashing_cloud_fail_promptly_and_work_once_it_is_back() {
    let mut mesh = mesh("tun-cloudko");
    let client = mesh.add_pod(0, "client");
    let addr = echo_on_node_b(&mut mesh);
    try_echo(&client.ns, addr).expect("echo through the cloud");

    let flow = Flow::start(&client.ns, addr);
    flow.wait_moving();
    let killed = Instant::now();
    mesh.stop_cloud(libc::SIGKILL);
    assert_prompt_error("cloudcore killed", flow.outcome(killed));
    // Without the cloud, the nodes keep their metadata but cannot reach each other.
    assert_turned_away_promptly("cloudcore down", &client.ns, addr);
    mesh.start_cloud();
    for i in 0..2 {
        mesh.wait_synced(i);
    }
    wait_for(
        "echo through the cloud after its restart",
        Duration::from_secs(30),
        || try_echo(&client.ns, addr).ok(),
    );
    echo_transfer(&client.ns, addr, 8 * MIB);
}

#[test]
fn a_full_link_turns_new_streams_away_promptly() {
    let mut mesh = mesh_with("tun-full", &["tunnel.max_streams=8"]);
    let client = mesh.add_pod(0, "client");
    let addr = echo_on_node_b(&mut mesh);
    // Eight open echo connections fill A's link.
    let held = in_netns(&client.ns, move || {
        (0..8)
            .map(|_| {
                let mut s =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                s.write_all(b"ping").expect("send");
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).expect("echo");
                s
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(open_streams(&mesh, 0), 8);
    assert_turned_away_promptly("A's link full", &client.ns, addr);
    // The held ones still work, and once they close there is room again.
    in_netns(&client.ns, move || {
        for mut s in held {
            s.write_all(b"pong").expect("send on a held stream");
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).expect("echo on a held stream");
            assert_eq!(&buf, b"pong");
        }
    });
    wait_streams_closed(&mesh, "held streams closed", Duration::from_secs(10));
    try_echo(&client.ns, addr).expect("echo once the link has room");
}

#[test]
fn a_qps_limit_applies_per_request_on_keep_alive_connections() {
    let mut mesh = mesh("tun-qpska");
    let server = mesh.add_pod(1, "server");
    mesh.serve(&server, "http", TARGET, "b");
    let local = mesh.add_pod(1, "local");
    let remote = mesh.add_pod(0, "remote");
    let ip = mesh.put_service(
        "limited",
        80,
        TARGET,
        &[("edgemesh.io/qps", "50"), ("edgemesh.io/burst", "25")],
        &[(&server.ip.to_string(), "edge-1")],
    );
    let addr: SocketAddr = format!("{ip}:80").parse().expect("addr");
    for (who, pod) in [
        ("local (client on B)", &local),
        ("remote (client on A)", &remote),
    ] {
        std::thread::sleep(Duration::from_secs(2));
        let load = hammer(&pod.ns, addr, 200, Duration::from_secs(5), true);
        let allowed = 25.0 + 50.0 * load.elapsed.as_secs_f64();
        eprintln!(
            "{who}, keep-alive: {} requests in {:.2?}: {} ok (limit allows ~{allowed:.0}), {} limited, {} other, a 200 and a 429 on one connection {} times",
            load.sent,
            load.elapsed,
            load.ok,
            load.limited,
            load.other.len(),
            load.mixed_connections
        );
        assert!(
            load.other.is_empty(),
            "{who}: every request gets 200 or 429: {:?}",
            &load.other[..load.other.len().min(10)]
        );
        assert!(
            (load.ok as f64 - allowed).abs() <= allowed * 0.10,
            "{who}: {} successes, the limit (qps 50, burst 25) allows about {allowed:.0}",
            load.ok
        );
        assert!(
            load.mixed_connections > 0,
            "{who}: no keep-alive connection got both answers: the limit is not per request"
        );
        assert_eq!(load.limited_without_retry_after, 0, "{who}: Retry-After");
    }
}
