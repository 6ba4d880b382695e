//! The HTTP path in one process: a client on one end of an in-memory pipe, the proxy's
//! server on the other, real endpoints on loopback sockets.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::limits::{Limit, Limiters};
use crate::model::LbPolicy;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::HttpConfig;
use super::{serve, Http};
use crate::balance::OutlierConfig;
use crate::balance::{Endpoint, HealthRegistry, ServiceBalancer, Tier};
use crate::connect::{Connector, Dialer};
use crate::io::Protocol;
use crate::routes::stats::ServiceStats;
use crate::routes::{Route, ServiceRef};

const NODE: &str = "here";

/// A response body with trailers (what gRPC status travels in).
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// An endpoint on loopback: answers `name`, `/headers` with the request's headers, `/echo`
/// with the request body, `/stall` never; HTTP/2 responses carry a trailer. Counts the
/// connections it accepted.
async fn endpoint(name: &'static str, h2: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let handler = service_fn(move |req: Request<Incoming>| async move {
                let text = match req.uri().path() {
                    "/headers" => {
                        let mut lines: Vec<String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                            .collect();
                        lines.sort();
                        lines.join("\n")
                    }
                    "/echo" => {
                        let body = req.into_body().collect().await.expect("body").to_bytes();
                        String::from_utf8_lossy(&body).into_owned()
                    }
                    "/stall" => std::future::pending().await,
                    _ => name.to_string(),
                };
                let mut trailers = HeaderMap::new();
                trailers.insert("x-served-by", HeaderValue::from_static(name));
                let body = WithTrailers {
                    data: Some(Bytes::from(text)),
                    trailers: h2.then_some(trailers),
                };
                Ok::<_, Infallible>(Response::new(body))
            });
            let io = TokioIo::new(stream);
            if h2 {
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, handler),
                );
            } else {
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, handler)
                        .with_upgrades(),
                );
            }
        }
    });
    (addr, accepted)
}

/// An address nothing listens on.
async fn refusing() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

fn route(addrs: &[SocketAddr], policy: LbPolicy, hash_header: Option<&'static str>) -> Arc<Route> {
    let health = HealthRegistry::new(OutlierConfig::default());
    Arc::new(Route {
        service: ServiceRef {
            namespace: Arc::from("default"),
            name: Arc::from("web"),
            port: 80,
        },
        stats: Arc::new(ServiceStats::new(Arc::from("default/web"))),
        protocol: None,
        hash_header: hash_header.map(hyper::header::HeaderName::from_static),
        endpoints: addrs
            .iter()
            .map(|&addr| Endpoint {
                addr,
                node: Some(Arc::from(NODE)),
                tier: Tier::LOCAL,
                health: health.get(addr),
            })
            .collect(),
        elsewhere: 0,
        balancer: Arc::new(ServiceBalancer::new(policy, None)),
    })
}

fn http(cfg: HttpConfig, limiters: Arc<Limiters>) -> Arc<Http> {
    let dialer = Dialer::new(None, Duration::from_secs(3));
    let connector = Connector::new(Arc::new(dialer), 3, Some(NODE), None);
    Arc::new(Http::new(
        cfg,
        crate::io::Timeouts {
            idle: Duration::from_secs(3600),
            half_closed: Duration::from_secs(60),
        },
        Arc::new(connector),
        limiters,
    ))
}

/// The proxy's HTTP server for one client connection (over loopback); returns the client's
/// end.
async fn proxy(
    http: &Arc<Http>,
    route: &Arc<Route>,
    protocol: Protocol,
    shutdown: &CancellationToken,
) -> (TcpStream, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    let (http, route, shutdown) = (http.clone(), route.clone(), shutdown.clone());
    let peer: SocketAddr = "10.244.1.7:40000".parse().expect("addr");
    let task = tokio::spawn(async move {
        let server = crate::io::Rewind::new(Bytes::new(), server);
        let _ = serve(http, server, protocol, route, Some(peer), &shutdown).await;
    });
    (client, task)
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1_client(io: TcpStream) -> H1 {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn.with_upgrades());
    sender
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", "web")
        .body(Full::default())
        .expect("request")
}

async fn send(client: &mut H1, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, String) {
    client.ready().await.expect("ready");
    let response = client.send_request(req).await.expect("response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn tally(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for n in names {
        *counts.entry(n).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn keep_alive_requests_spread_over_endpoints_on_pooled_connections() {
    let (a, accepted_a) = endpoint("a", false).await;
    let (b, accepted_b) = endpoint("b", false).await;
    let (c, accepted_c) = endpoint("c", false).await;
    let route = route(&[a, b, c], LbPolicy::RoundRobin, None);
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (io, _task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    let mut served = Vec::new();
    for _ in 0..30 {
        let (status, _, body) = send(&mut client, get("/")).await;
        assert_eq!(status, StatusCode::OK);
        served.push(body);
    }
    assert_eq!(
        tally(served),
        BTreeMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)])
    );
    let accepted = [&accepted_a, &accepted_b, &accepted_c].map(|n| n.load(Ordering::SeqCst));
    assert_eq!(accepted, [1, 1, 1], "one pooled connection per endpoint");
    assert_eq!(http.pooled().0, 3);
}

#[tokio::test]
async fn h2_calls_on_one_connection_spread_with_trailers() {
    let (a, accepted_a) = endpoint("a", true).await;
    let (b, accepted_b) = endpoint("b", true).await;
    let (c, _) = endpoint("c", true).await;
    let route = route(&[a, b, c], LbPolicy::RoundRobin, None);
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (io, _task) = proxy(&http, &route, Protocol::H2, &shutdown).await;
    let (client, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    // Concurrent calls, as a gRPC channel makes them.
    let calls = (0..30).map(|_| {
        let mut client = client.clone();
        async move {
            let req = Request::builder()
                .uri("http://web.default/")
                .body(Full::<Bytes>::default())
                .expect("request");
            let response = client.send_request(req).await.expect("response");
            assert_eq!(response.status(), StatusCode::OK);
            let collected = response.into_body().collect().await.expect("body");
            let trailers = collected.trailers().cloned().expect("trailers");
            let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
            assert_eq!(trailers["x-served-by"], body.as_str());
            body
        }
    });
    let served = futures_join_all(calls).await;
    let counts = tally(served);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");
    assert_eq!(
        accepted_a.load(Ordering::SeqCst),
        1,
        "one shared connection"
    );
    assert_eq!(accepted_b.load(Ordering::SeqCst), 1);
}

/// Runs futures concurrently, each as a task (no futures-util in this crate).
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("join"));
    }
    out
}

#[tokio::test]
async fn headers_are_rewritten_for_the_endpoint() {
    let (a, _) = endpoint("a", false).await;
    let route = route(&[a], LbPolicy::RoundRobin, None);
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (io, _task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    let req = Request::builder()
        .uri("/headers")
        .header("host", "web")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-user", "alice")
        .body(Full::default())
        .expect("request");
    let (status, _, body) = send(&mut client, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        "host: web\nx-forwarded-for: 203.0.113.9, 10.244.1.7\nx-user: alice"
    );
}

#[tokio::test]
async fn a_refused_endpoint_is_retried_elsewhere_and_ejected() {
    let (a, _) = endpoint("a", false).await;
    let dead = refusing().await;
    let route = route(&[dead, a], LbPolicy::RoundRobin, None);
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (io, _task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    for _ in 0..6 {
        let (status, _, body) = send(&mut client, get("/")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "a"));
    }
    assert!(route.endpoints[0]
        .health
        .is_ejected(tokio::time::Instant::now()));
}

#[tokio::test]
async fn answers_without_an_endpoint() {
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    // No endpoints: 503 naming the Service.
    let empty = route(&[], LbPolicy::RoundRobin, None);
    let (io, _task) = proxy(&http, &empty, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    let (status, _, body) = send(&mut client, get("/")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "no endpoints for service default/web\n");
    // Every endpoint refuses: 502, and the connection lives on.
    let dead = route(
        &[refusing().await, refusing().await],
        LbPolicy::RoundRobin,
        None,
    );
    let (io, _task) = proxy(&http, &dead, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    for _ in 0..2 {
        let (status, _, body) = send(&mut client, get("/")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            body,
            "no endpoint of service default/web could be reached\n"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_endpoint_gets_504_after_the_request_timeout() {
    let (a, _) = endpoint("a", false).await;
    let route = route(&[a], LbPolicy::RoundRobin, None);
    let cfg = HttpConfig {
        request_timeout: Duration::from_secs(30),
        ..HttpConfig::default()
    };
    let http = http(cfg, Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (io, _task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    let started = tokio::time::Instant::now();
    let (status, _, body) = send(&mut client, get("/stall")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "service default/web sent no response within 30s\n");
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    // The connection is still good for the next request.
    let (status, _, body) = send(&mut client, get("/")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "a"));
}

#[tokio::test(start_paused = true)]
async fn a_limited_service_gets_429_for_this_nodes_endpoints() {
    let (a, _) = endpoint("a", false).await;
    let route = route(&[a], LbPolicy::RoundRobin, None);
    let limiters = Arc::new(Limiters::new());
    let one = NonZeroU32::new(1).expect("1");
    limiters.set("default", "web", Some(Limit::per_second(one)));
    let http = http(HttpConfig::default(), limiters);
    let shutdown = CancellationToken::new();
    let (io, _task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    let (status, _, _) = send(&mut client, get("/")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = send(&mut client, get("/")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(body, "service default/web is over its rate limit\n");
    tokio::time::advance(Duration::from_secs(1)).await;
    let (status, _, _) = send(&mut client, get("/")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn consistent_hash_on_a_header_keeps_a_user_on_one_endpoint() {
    let mut addrs = Vec::new();
    for name in ["a", "b", "c"] {
        addrs.push(endpoint(name, false).await.0);
    }
    let route = route(&addrs, LbPolicy::ConsistentHash, Some("x-user"));
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (io, _task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    let mut by_user: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..60 {
        let user = format!("user-{}", i % 12);
        let req = Request::builder()
            .uri("/")
            .header("host", "web")
            .header("x-user", &user)
            .body(Full::default())
            .expect("request");
        let (_, _, body) = send(&mut client, req).await;
        by_user.entry(user).or_default().push(body);
    }
    for (user, served) in &by_user {
        assert!(served.iter().all(|s| s == &served[0]), "{user}: {served:?}");
    }
    let endpoints = tally(by_user.values().map(|s| s[0].clone()));
    assert!(endpoints.len() > 1, "users spread: {endpoints:?}");
}

#[tokio::test]
async fn an_upgrade_becomes_a_byte_stream() {
    // An endpoint that switches to an echo protocol.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.expect("head"));
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.contains("upgrade: echo"), "{head}");
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .expect("101");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("read");
        s.write_all(&buf.to_ascii_uppercase()).await.expect("echo");
    });
    let route = route(&[addr], LbPolicy::RoundRobin, None);
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (mut io, task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    io.write_all(b"GET /ws HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .expect("request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(io.read_u8().await.expect("head"));
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    io.write_all(b"ping").await.expect("write");
    assert_eq!(read_to_close(&mut io).await, b"PING");
    drop(io);
    task.await.expect("join");
}

#[tokio::test]
async fn malformed_requests_get_400_and_reach_no_endpoint() {
    let (a, accepted) = endpoint("a", false).await;
    let route = route(&[a], LbPolicy::RoundRobin, None);
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    for bad in [
        &b"GET /\x01 HTTP/1.1\r\nhost: web\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: web\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
    ] {
        let (mut io, task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
        io.write_all(bad).await.expect("write");
        let answer = read_to_close(&mut io).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        drop(io);
        task.await.expect("join");
    }
    // Headers larger than the proxy holds: 431.
    let (mut io, task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: web\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    // The proxy answers before the client has sent it all, and reads the rest before it
    // closes: the answer is not lost to a reset.
    io.write_all(huge.as_bytes()).await.expect("written");
    let answer = read_to_close(&mut io).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    drop(io);
    task.await.expect("join");
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections() {
    let (a, _) = endpoint("a", false).await;
    let route = route(&[a], LbPolicy::RoundRobin, None);
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (io, task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    let (status, _, _) = send(&mut client, get("/")).await;
    assert_eq!(status, StatusCode::OK);
    shutdown.cancel();
    task.await.expect("the connection ends");
    // The close reaches the client's connection task over loopback, not at once.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while !client.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "closed by the proxy");
}

/// Reads one response from a raw connection: its head (lowercased) and its body, framed by
/// `content-length`, chunks, or the close. A framing fault that leaves the reader waiting fails
/// the test after a few seconds instead of hanging it.
async fn read_response(io: &mut TcpStream) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(5), read_response_unbounded(io))
        .await
        .expect("a whole response within 5 s")
}

/// Reads until the proxy closes the connection, failing the test if it does not within 5 s.
async fn read_to_close(io: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut all))
        .await
        .expect("closed within 5 s")
        .expect("read");
    all
}

async fn read_response_unbounded(io: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(io.read_u8().await.expect("head"));
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        body.resize(len.trim().parse().expect("length"), 0);
        io.read_exact(&mut body).await.expect("body");
    } else if head.contains("transfer-encoding: chunked") {
        while !body.ends_with(b"0\r\n\r\n") {
            body.push(io.read_u8().await.expect("chunk"));
        }
        // Chunk sizes and line ends out: what the application sent.
        let raw = String::from_utf8_lossy(&body).into_owned();
        let mut data = String::new();
        let mut lines = raw.split("\r\n");
        while let Some(size) = lines.next() {
            let n = usize::from_str_radix(size.split(';').next().unwrap_or("0"), 16).expect("size");
            if n == 0 {
                break;
            }
            data.push_str(lines.next().expect("data"));
        }
        return (head, data);
    } else {
        io.read_to_end(&mut body).await.expect("until close");
    }
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn bodies_pass_in_their_own_framing() {
    let (a, _) = endpoint("a", false).await;
    let route = route(&[a], LbPolicy::RoundRobin, None);
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (mut io, task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;

    // A chunked upload that waits for `100 Continue` before it sends its body.
    io.write_all(
        b"POST /echo HTTP/1.1\r\nhost: web\r\nexpect: 100-continue\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await
    .expect("head");
    let (interim, _) = tokio::time::timeout(Duration::from_secs(5), async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(io.read_u8().await.expect("interim"));
        }
        (String::from_utf8_lossy(&head).into_owned(), ())
    })
    .await
    .expect("100 Continue passed on before the body was sent");
    assert!(interim.starts_with("HTTP/1.1 100 "), "{interim}");
    io.write_all(b"5\r\nhello\r\n6; ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n")
        .await
        .expect("chunks");
    let (head, body) = read_response(&mut io).await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert_eq!(body, "hello world");

    // Two requests in one write: two answers, in order, on the same connection.
    io.write_all(
        b"POST /echo HTTP/1.1\r\nhost: web\r\ncontent-length: 5\r\n\r\nfirstGET /x HTTP/1.1\r\nhost: web\r\n\r\n",
    )
    .await
    .expect("pipelined");
    assert_eq!(read_response(&mut io).await.1, "first");
    assert_eq!(read_response(&mut io).await.1, "a");

    // An HTTP/1.0 client without keep-alive: its answer, then the close.
    io.write_all(b"GET /x HTTP/1.0\r\nhost: web\r\n\r\n")
        .await
        .expect("1.0");
    let (head, body) = read_response(&mut io).await;
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "a");
    assert!(read_to_close(&mut io).await.is_empty());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the connection ends")
        .expect("join");
}

/// An endpoint that keeps no connection for long: after each answer it reads the next
/// request and closes without answering it (its keep-alive timeout racing the request).
async fn forgetful_endpoint() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                for answer in [true, false] {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read_u8().await {
                            Ok(b) => head.push(b),
                            Err(_) => return,
                        }
                    }
                    if answer {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_kept_connection_closed_under_a_request_is_replaced() {
    let (addr, accepted) = forgetful_endpoint().await;
    let route = route(&[addr], LbPolicy::RoundRobin, None);
    let http = http(HttpConfig::default(), Arc::new(Limiters::new()));
    let shutdown = CancellationToken::new();
    let (io, _task) = proxy(&http, &route, Protocol::Http1, &shutdown).await;
    let mut client = h1_client(io).await;
    for i in 0..5 {
        let (status, _, body) = send(&mut client, get("/")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
    }
    // Each request after the first found the kept connection closed and took a new one.
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
    // A request that must not be sent twice is not: the endpoint may have acted on it.
    let post = Request::builder()
        .method("POST")
        .uri("/")
        .header("host", "web")
        .body(Full::new(Bytes::from_static(b"x")))
        .expect("request");
    let (status, _, _) = send(&mut client, post).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
}
