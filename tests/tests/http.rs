//! The proxy's HTTP path end to end (SPEC §4.2–4.5): real iptables in node namespaces, real
//! servers in pods (`edgemesh-testserver web|grpc|https`), real clients (curl, a WebSocket
//! client, an HTTP/2 client, tonic) calling cluster IPs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgemesh_e2e::mesh::{ep_path, in_netns, service_json, svc_path, Mesh};
use edgemesh_e2e::servers::{RawCodec, ECHO_METHOD};
use edgemesh_e2e::{bin, wait_for, Host};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::{RngCore, SeedableRng};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const TARGET: u16 = 8080;

/// A mesh with one node.
fn mesh(tag: &str) -> Mesh {
    let mut mesh = Mesh::new(tag, 1, Vec::new());
    mesh.nodes[0].extra = vec!["proxy.reconcile_interval=\"1s\"".into()];
    mesh.start_cloud();
    mesh.create_tokens();
    mesh.start_node(0);
    mesh.wait_synced(0);
    mesh
}

/// Pods `s0..sN` behind node `node` running `mode` on [`TARGET`], answering with their name.
fn pods(mesh: &mut Mesh, node: usize, mode: &str, n: usize) -> Vec<Host> {
    (0..n)
        .map(|i| {
            let pod = mesh.add_pod(node, &format!("s{i}"));
            mesh.serve(&pod, mode, TARGET, &format!("s{i}"));
            pod
        })
        .collect()
}

/// Service `name` on `port` with `pods` (on node `node`) as endpoints; returns the cluster IP.
fn service(
    mesh: &Mesh,
    name: &str,
    port: u16,
    pods: &[Host],
    node: usize,
    annotations: &[(&str, &str)],
) -> String {
    let node_name = mesh.nodes[node].name.clone();
    let ips: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    let addrs: Vec<(&str, &str)> = ips
        .iter()
        .map(|ip| (ip.as_str(), node_name.as_str()))
        .collect();
    mesh.put_service(name, port, TARGET, annotations, &addrs)
}

/// Runs `curl ARGS` in `host` and returns stdout; fails the test on a non-zero exit.
fn curl_out(mesh: &Mesh, host: &Host, args: &[&str]) -> String {
    let mut argv = vec!["curl", "-sS", "--noproxy", "*", "--max-time", "120"];
    argv.extend_from_slice(args);
    let out = mesh.topo.exec(host, &argv);
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tally<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for n in names {
        *counts.entry(n.to_string()).or_default() += 1;
    }
    counts
}

/// Within ±10% of an even spread of `total` over `n` endpoints.
fn assert_even(counts: &BTreeMap<String, usize>, n: usize, total: usize) {
    assert_eq!(counts.len(), n, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), total, "{counts:?}");
    let even = total / n;
    let slack = even / 10;
    assert!(
        counts
            .values()
            .all(|&c| (even - slack..=even + slack).contains(&c)),
        "not within ±10% of {even}: {counts:?}"
    );
}

/// `n` requests from `client` over ONE keep-alive connection (curl reuses it for the URLs of
/// one run); returns who answered each and how many connections curl opened in all.
fn keep_alive_run(
    mesh: &Mesh,
    client: &Host,
    url: &str,
    n: usize,
) -> (BTreeMap<String, usize>, usize) {
    let glob = format!("{url}?n=[1-{n}]");
    let out = curl_out(
        mesh,
        client,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{num_connects} %header{x-served-by}\\n",
            &glob,
        ],
    );
    let mut connects = 0;
    let mut served = Vec::new();
    for line in out.lines() {
        let (c, who) = line.split_once(' ').expect("two fields");
        connects += c.parse::<usize>().expect("number");
        served.push(who.to_string());
    }
    (tally(served.iter().map(String::as_str)), connects)
}

/// VmHWM (peak resident memory) of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

#[test]
fn http1_is_balanced_per_request_streamed_and_kept_alive() {
    let mut mesh = mesh("h1");
    let servers = pods(&mut mesh, 0, "web", 3);
    let client = mesh.add_pod(0, "client");
    let ip = service(&mesh, "web", 80, &servers, 0, &[]);
    let url = format!("http://{ip}/");

    let (status, body) = mesh.topo.curl(&client, &[&url]);
    assert_eq!(status, 200, "{body}");
    assert!(["s0\n", "s1\n", "s2\n"].contains(&body.as_str()), "{body}");

    // Keep-alive: 60 requests on one client connection, spread by request.
    let (served, connects) = keep_alive_run(&mesh, &client, &url, 60);
    assert_eq!(connects, 1, "one client connection");
    assert_even(&served, 3, 60);

    // The endpoint sees the client in X-Forwarded-For, and no hop-by-hop field of the client.
    let headers = curl_out(
        &mesh,
        &client,
        &[
            "-H",
            "Connection: keep-alive, X-Hop",
            "-H",
            "X-Hop: 1",
            "-H",
            "X-User: alice",
            &format!("{url}headers"),
        ],
    );
    assert!(
        headers.contains(&format!("x-forwarded-for: {}\n", client.ip)),
        "{headers}"
    );
    assert!(headers.contains("x-user: alice\n"), "{headers}");
    assert!(!headers.contains("x-hop"), "{headers}");
    assert!(!headers.contains("connection:"), "{headers}");

    // 100 MB up and back down, byte for byte, streamed: the agent never holds the body.
    let mut data = vec![0u8; 100 * 1024 * 1024];
    rand::rngs::StdRng::seed_from_u64(11).fill_bytes(&mut data);
    let upload = mesh.topo.write_file("upload.bin", &data);
    let back = mesh.topo.dir().join("back.bin");
    let (up, down) = (upload.display().to_string(), back.display().to_string());
    let echo = format!("{url}echo");
    curl_out(
        &mesh,
        &client,
        &["--data-binary", &format!("@{up}"), "-o", &down, &echo],
    );
    assert!(
        std::fs::read(&back).expect("echoed") == data,
        "the 100 MB came back intact"
    );
    // The same with a chunked upload (no Content-Length).
    curl_out(
        &mesh,
        &client,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{up}"),
            "-o",
            &down,
            &echo,
        ],
    );
    assert!(
        std::fs::read(&back).expect("echoed") == data,
        "chunked upload intact"
    );
    let agent = mesh.topo.pid(mesh.nodes[0].proc.expect("running"));
    let peak = peak_rss_kib(agent);
    assert!(
        peak < 64 * 1024,
        "the agent peaked at {peak} KiB: bodies must stream"
    );

    // A chunked response arrives chunked and whole.
    let out = curl_out(&mesh, &client, &["-D", "-", &format!("{url}chunked?n=200")]);
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{out}");
    assert_eq!(out.matches("chunk ").count(), 200, "{out}");
    assert!(out.ends_with("chunk 199\n"), "{out}");

    // A Service without endpoints: 503 that names it.
    mesh.put(&svc_path("empty"), &service_json("empty", 80, TARGET));
    let v = mesh.put(
        &ep_path("empty"),
        r#"{"apiVersion":"v1","kind":"Endpoints","metadata":{"name":"empty","namespace":"default"},"subsets":[]}"#,
    );
    mesh.wait_version(0, v, Duration::from_secs(10));
    let empty = mesh.cluster_ip("empty");
    let (status, body) = mesh.topo.curl(&client, &[&format!("http://{empty}/")]);
    assert_eq!(
        (status, body.as_str()),
        (503, "no endpoints for service default/empty\n")
    );

    let requests = mesh.metric(
        0,
        "edgemesh_proxy_http_requests_total",
        &[
            "service=\"default/web\"",
            "protocol=\"http1\"",
            "class=\"2xx\"",
        ],
    );
    assert!(requests >= 65.0, "requests counted: {requests}");
    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_http_requests_total",
            &["service=\"default/empty\"", "class=\"5xx\""]
        ) >= 1.0
    );
    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_detected_total",
            &["service=\"default/web\"", "protocol=\"http1\""]
        ) >= 5.0
    );
    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_http_request_duration_seconds_count",
            &["service=\"default/web\""]
        ) >= 65.0
    );
}

#[test]
fn a_websocket_echo_exchanges_a_thousand_messages() {
    let mut mesh = mesh("ws");
    let servers = pods(&mut mesh, 0, "web", 2);
    let client = mesh.add_pod(0, "client");
    let ip = service(&mesh, "web", 80, &servers, 0, &[]);
    let addr: SocketAddr = format!("{ip}:80").parse().expect("addr");
    let echoed = in_netns(&client.ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut ws, response) =
                tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
                    .await
                    .expect("WebSocket handshake through the mesh");
            assert_eq!(response.status(), 101);
            let mut echoed = 0;
            for i in 0..1000 {
                let text = format!("message {i} {}", "x".repeat(i % 200));
                ws.send(WsMessage::text(text.clone())).await.expect("send");
                match ws.next().await {
                    Some(Ok(WsMessage::Text(back))) => {
                        assert_eq!(back.as_str(), text);
                        echoed += 1;
                    }
                    other => panic!("message {i}: {other:?}"),
                }
            }
            ws.close(None).await.expect("close");
            echoed
        })
    });
    assert_eq!(echoed, 1000);
}

/// `calls` HTTP/2 requests over one connection to `addr`, `concurrency` at a time; returns
/// who answered each (response header), checking the trailer says the same.
fn h2_calls(
    ns: &str,
    addr: SocketAddr,
    calls: usize,
    concurrency: usize,
) -> BTreeMap<String, usize> {
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .expect("h2 handshake");
            tokio::spawn(conn);
            let mut served = Vec::new();
            let mut next = 0;
            while next < calls {
                let batch = concurrency.min(calls - next);
                let tasks: Vec<_> = (0..batch)
                    .map(|_| {
                        let mut sender = sender.clone();
                        tokio::spawn(async move {
                            let req = hyper::Request::builder()
                                .uri(format!("http://{addr}/"))
                                .body(Empty::<Bytes>::new())
                                .expect("request");
                            let response = sender.send_request(req).await.expect("call");
                            assert_eq!(response.status(), 200);
                            let who = response.headers()["x-served-by"]
                                .to_str()
                                .expect("ascii")
                                .to_string();
                            let body = response.into_body().collect().await.expect("body");
                            let trailers = body.trailers().cloned().expect("trailers arrive");
                            assert_eq!(trailers["x-served-by"], who.as_str());
                            who
                        })
                    })
                    .collect();
                for t in tasks {
                    served.push(t.await.expect("call task"));
                }
                next += batch;
            }
            tally(served.iter().map(String::as_str))
        })
    })
}

type GrpcClient = tonic::client::Grpc<tonic::transport::Channel>;

/// Runs `calls` on a runtime of its own inside `ns`, with one tonic channel to `addr`.
fn with_grpc<T, F, Fut>(ns: &str, addr: SocketAddr, calls: F) -> T
where
    T: Send + 'static,
    F: FnOnce(GrpcClient) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("gRPC channel through the mesh");
            calls(tonic::client::Grpc::new(channel)).await
        })
    })
}

/// One unary call of the echo method with `message`.
async fn echo(grpc: &mut GrpcClient, message: String) -> Result<String, tonic::Status> {
    grpc.ready().await.expect("ready");
    let response = grpc
        .unary(
            tonic::Request::new(Bytes::from(message)),
            hyper::http::uri::PathAndQuery::from_static(ECHO_METHOD),
            RawCodec,
        )
        .await?;
    Ok(String::from_utf8(response.into_inner().to_vec()).expect("utf-8"))
}

/// `calls` unary gRPC calls over one tonic channel; returns who answered each.
fn grpc_calls(ns: &str, addr: SocketAddr, calls: usize) -> BTreeMap<String, usize> {
    with_grpc(ns, addr, move |mut grpc| async move {
        let mut served = Vec::new();
        for i in 0..calls {
            let message = format!("call-{i}");
            let text = echo(&mut grpc, message.clone())
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            let (who, echoed) = text.split_once(':').expect("NAME:message");
            assert_eq!(echoed, message);
            served.push(who.to_string());
        }
        tally(served.iter().map(String::as_str))
    })
}

/// One unary gRPC call on a new channel; its status when it fails.
fn grpc_call(ns: &str, addr: SocketAddr) -> Result<(), tonic::Status> {
    with_grpc(ns, addr, |mut grpc| async move {
        echo(&mut grpc, "call".into()).await.map(|_| ())
    })
}

#[test]
fn h2c_and_grpc_calls_on_one_connection_spread_over_the_endpoints() {
    let mut mesh = mesh("h2");
    let web = pods(&mut mesh, 0, "web", 3);
    let client = mesh.add_pod(0, "client");
    let ip = service(&mesh, "web", 80, &web, 0, &[]);
    let addr: SocketAddr = format!("{ip}:80").parse().expect("addr");

    // h2c with prior knowledge: 300 calls on one connection, 10 at a time.
    let served = h2_calls(&client.ns, addr, 300, 10);
    assert_even(&served, 3, 300);
    // curl sees the trailer too (it prints trailers after the body).
    let out = curl_out(
        &mesh,
        &client,
        &[
            "--http2-prior-knowledge",
            "-D",
            "-",
            &format!("http://{ip}/"),
        ],
    );
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    let body_and_trailer = out.split("\r\n\r\n").nth(1).expect("body");
    assert!(body_and_trailer.contains("\nx-served-by: s"), "{out}");

    // gRPC (tonic) through a Service whose protocol is sniffed.
    let mut grpc_pods = Vec::new();
    for i in 0..3 {
        let pod = mesh.add_pod(0, &format!("g{i}"));
        mesh.serve(&pod, "grpc", TARGET, &format!("g{i}"));
        grpc_pods.push(pod);
    }
    let gip = service(&mesh, "echo", 50051, &grpc_pods, 0, &[]);
    let gaddr: SocketAddr = format!("{gip}:50051").parse().expect("addr");
    let served = grpc_calls(&client.ns, gaddr, 300);
    assert_even(&served, 3, 300);

    // ... and with the protocol set by annotation: no detection (none counted).
    let gip = service(
        &mesh,
        "echo",
        50051,
        &grpc_pods,
        0,
        &[("edgemesh.io/protocol", "h2")],
    );
    let gaddr: SocketAddr = format!("{gip}:50051").parse().expect("addr");
    wait_for(
        "protocol annotation in the route",
        Duration::from_secs(10),
        || {
            let before = mesh.metric(
                0,
                "edgemesh_proxy_detected_total",
                &["service=\"default/echo\""],
            );
            grpc_calls(&client.ns, gaddr, 3);
            let after = mesh.metric(
                0,
                "edgemesh_proxy_detected_total",
                &["service=\"default/echo\""],
            );
            (after == before).then_some(())
        },
    );
    let served = grpc_calls(&client.ns, gaddr, 30);
    assert_even(&served, 3, 30);

    // What the proxy answers itself reaches gRPC clients as gRPC status codes, not as HTTP
    // errors their library turns into UNKNOWN: no endpoints -> UNAVAILABLE naming the Service,
    // over the QPS limit -> RESOURCE_EXHAUSTED.
    service(
        &mesh,
        "echo",
        50051,
        &[],
        0,
        &[("edgemesh.io/protocol", "h2")],
    );
    let status = wait_for(
        "the Service without endpoints in the route",
        Duration::from_secs(10),
        || {
            grpc_call(&client.ns, gaddr)
                .err()
                .filter(|s| s.code() == tonic::Code::Unavailable)
        },
    );
    assert_eq!(status.message(), "no endpoints for service default/echo");
    service(
        &mesh,
        "echo",
        50051,
        &grpc_pods,
        0,
        &[
            ("edgemesh.io/protocol", "h2"),
            ("edgemesh.io/qps", "1"),
            ("edgemesh.io/burst", "1"),
        ],
    );
    let status = wait_for("the QPS limit in force", Duration::from_secs(10), || {
        // Two calls back to back: the second is over a burst of 1 once the limit is in force.
        let _ = grpc_call(&client.ns, gaddr);
        grpc_call(&client.ns, gaddr)
            .err()
            .filter(|s| s.code() == tonic::Code::ResourceExhausted)
    });
    assert_eq!(
        status.message(),
        "service default/echo is over its rate limit"
    );

    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_http_requests_total",
            &[
                "service=\"default/web\"",
                "protocol=\"h2\"",
                "class=\"2xx\""
            ]
        ) >= 301.0
    );
    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_http_requests_total",
            &[
                "service=\"default/echo\"",
                "protocol=\"h2\"",
                "class=\"2xx\""
            ]
        ) >= 330.0
    );
}

#[test]
fn tls_passes_through_untouched() {
    let mut mesh = mesh("tls");
    let pod = mesh.add_pod(0, "secure");
    let client = mesh.add_pod(0, "client");
    let dir = mesh.topo.dir().to_path_buf();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=secure.test",
            "-addext",
            "subjectAltName=DNS:secure.test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let args: Vec<String> = vec![
        "https".into(),
        format!("{}:{TARGET}", pod.ip),
        "tls-pod".into(),
        cert.display().to_string(),
        key.display().to_string(),
    ];
    mesh.topo.spawn(
        &pod,
        "https-secure",
        &bin("edgemesh-testserver"),
        &args,
        &[],
    );
    let addr = SocketAddr::from((pod.ip, TARGET));
    let ns = pod.ns.clone();
    wait_for("https server", Duration::from_secs(10), || {
        let ns = ns.clone();
        in_netns(&ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
        })
        .map(drop)
    });
    let ip = service(&mesh, "secure", 443, &[pod], 0, &[]);

    // `-k`, by address: the pod answers through the mesh.
    let (status, body) = mesh.topo.curl(&client, &["-k", &format!("https://{ip}/")]);
    assert_eq!((status, body.as_str()), (200, "tls-pod\n"));
    // By name with the pod's certificate as the only trusted one: the handshake is the pod's,
    // end to end (nothing in between terminated or altered it).
    let resolve = format!("secure.test:443:{ip}");
    let cacert = cert.display().to_string();
    let (status, body) = mesh.topo.curl(
        &client,
        &[
            "--cacert",
            &cacert,
            "--resolve",
            &resolve,
            "https://secure.test/",
        ],
    );
    assert_eq!((status, body.as_str()), (200, "tls-pod\n"));

    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_tls_connections_total",
            &["service=\"default/secure\"", "sni=\"secure.test\""]
        ) >= 1.0
    );
    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_detected_total",
            &["service=\"default/secure\"", "protocol=\"tls\""]
        ) >= 2.0
    );
}

#[test]
fn server_first_unknown_and_slow_clients_still_work() {
    let mut mesh = mesh("slow");
    let banner = mesh.add_pod(0, "banner");
    mesh.serve(&banner, "banner", TARGET, "220 edge smtp ready");
    let echo = mesh.add_pod(0, "echo");
    mesh.serve(&echo, "echo", TARGET, "");
    let web = pods(&mut mesh, 0, "web", 2);
    let client = mesh.add_pod(0, "client");
    let bip = service(&mesh, "banner", 25, std::slice::from_ref(&banner), 0, &[]);
    let eip = service(&mesh, "echo", 7, std::slice::from_ref(&echo), 0, &[]);
    let wip = service(&mesh, "web", 80, &web, 0, &[]);

    // The server speaks first: nothing arrives from the client, so detection times out and
    // the connection is forwarded as bytes.
    let addr: SocketAddr = format!("{bip}:25").parse().expect("addr");
    let greeting = in_netns(&client.ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).expect("banner");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert_eq!(greeting, "220 edge smtp ready\n");

    // An unknown binary protocol comes back byte for byte.
    let addr: SocketAddr = format!("{eip}:7").parse().expect("addr");
    in_netns(&client.ns, move || {
        let mut junk = vec![0u8; 64 * 1024];
        rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut junk);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(&junk).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("fin");
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read");
        assert!(back == junk, "garbage echoed intact");
    });

    // Slowloris: clients that send a byte a second, some from the first byte (detection sees
    // too little and forwards them as bytes), some after a request line (hyper waits for
    // their headers). Meanwhile everybody else is served.
    let waddr: SocketAddr = format!("{wip}:80").parse().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..20)
        .map(|i| {
            let (ns, stop) = (client.ns.clone(), stop.clone());
            std::thread::spawn(move || {
                in_netns(&ns, move || {
                    let Ok(mut s) = TcpStream::connect_timeout(&waddr, Duration::from_secs(5))
                    else {
                        return;
                    };
                    let first: &[u8] = if i % 2 == 0 {
                        b"G"
                    } else {
                        b"GET / HTTP/1.1\r\n"
                    };
                    let _ = s.write_all(first);
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_secs(1));
                        if s.write_all(b"X").is_err() {
                            return;
                        }
                    }
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..20 {
        let (status, body) = mesh.topo.curl(&client, &[&format!("http://{wip}/")]);
        assert_eq!(status, 200, "{body}");
    }
    stop.store(true, Ordering::Relaxed);
    for t in slow {
        t.join().expect("slow client");
    }
    assert!(
        mesh.metric(
            0,
            "edgemesh_proxy_detected_total",
            &["service=\"default/banner\"", "protocol=\"tcp\""]
        ) >= 1.0
    );
}

/// Sends `raw` to `addr` from `ns`; returns what came back before the connection ended
/// (a reset counts as nothing).
fn raw_exchange(ns: &str, addr: SocketAddr, raw: Vec<u8>) -> String {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let _ = s.write_all(&raw);
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        String::from_utf8_lossy(&back).into_owned()
    })
}

#[test]
fn malformed_http_gets_400_or_a_closed_connection() {
    let mut mesh = mesh("bad");
    let web = pods(&mut mesh, 0, "web", 1);
    let client = mesh.add_pod(0, "client");
    let ip = service(&mesh, "web", 80, &web, 0, &[]);
    let addr: SocketAddr = format!("{ip}:80").parse().expect("addr");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("bad request line", b"GET /a b c HTTP/1.1\r\nHost: web\r\n\r\n".to_vec(), &["400"]),
        ("bad header line", b"GET / HTTP/1.1\r\nHost: web\r\nno colon here\r\n\r\n".to_vec(), &["400"]),
        ("oversized headers", big.into_bytes(), &["431", "400"]),
        (
            "invalid chunking",
            b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nhello\r\n0\r\n\r\n".to_vec(),
            &["400"],
        ),
        (
            "two content lengths",
            b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
            &["400"],
        ),
    ];
    for (what, raw, statuses) in cases {
        let answer = raw_exchange(&client.ns, addr, raw);
        let ok = answer.is_empty()
            || statuses.iter().any(|s| answer.starts_with(&format!("HTTP/1.1 {s} ")))
            // Invalid chunking may be seen only after the head went on: the response started,
            // then the connection was cut.
            || (what == "invalid chunking" && answer.starts_with("HTTP/1.1 200 ") && !answer.ends_with("0\r\n\r\n"));
        assert!(ok, "{what}: {answer}");
    }
    let p = mesh.nodes[0].proc.expect("running");
    assert!(mesh.topo.is_running(p), "the agent survived");
    let (status, body) = mesh.topo.curl(&client, &[&format!("http://{ip}/")]);
    assert_eq!((status, body.as_str()), (200, "s0\n"));
}

#[test]
fn requests_to_another_node_go_through_the_tunnel_one_by_one() {
    let mut mesh = Mesh::new("h1tun", 2, Vec::new());
    let (a, b) = (mesh.nodes[0].host.clone(), mesh.nodes[1].host.clone());
    mesh.topo.isolate(&[&a, &b]);
    mesh.start_cloud();
    mesh.create_tokens();
    for i in 0..2 {
        mesh.start_node(i);
    }
    for i in 0..2 {
        mesh.wait_synced(i);
    }
    let servers = pods(&mut mesh, 1, "web", 2);
    let client = mesh.add_pod(0, "client");
    let ip = service(&mesh, "web", 80, &servers, 1, &[]);
    let url = format!("http://{ip}/");
    let (served, connects) = keep_alive_run(&mesh, &client, &url, 40);
    assert_eq!(connects, 1);
    assert_eq!(
        served,
        BTreeMap::from([("s0".into(), 20), ("s1".into(), 20)])
    );
    let addr: SocketAddr = format!("{ip}:80").parse().expect("addr");
    let served = h2_calls(&client.ns, addr, 40, 4);
    assert_even(&served, 2, 40);

    // The only endpoint is on a node that is not connected: the cloud refuses the stream at
    // once, and the request gets a 502 rather than a hang.
    let gone = mesh.put_service(
        "gone",
        80,
        TARGET,
        &[],
        &[(&servers[0].ip.to_string(), "edge-9")],
    );
    let (status, body) = mesh.topo.curl(&client, &[&format!("http://{gone}/")]);
    assert_eq!(
        (status, body.as_str()),
        (
            502,
            "no endpoint of service default/gone could be reached\n"
        )
    );
}
