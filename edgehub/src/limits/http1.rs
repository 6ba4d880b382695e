//! Per-request limits on HTTP/1: hyper parses the client's requests, each one asks the gate,
//! and the allowed ones go to the endpoint over the one upstream connection, streamed both
//! ways. Over the limit, the client gets `429` and the endpoint never sees the request.
//!
//! Headers pass through untouched, hop-by-hop ones included: the client connection and the
//! upstream connection are paired one to one for their whole lives, so `Connection`,
//! `Keep-Alive` and `Upgrade` mean for the pair what they meant for the client, and hyper
//! frames the bodies on each side from those same headers.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::Decision;

#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    /// The client's side failed: malformed HTTP (hyper has answered `400`), a timeout, or the
    /// client went away. Worth a debug line, not an alarm.
    #[error("HTTP/1 connection from the client: {0}")]
    Client(#[source] hyper::Error),
    #[error("HTTP/1 handshake with the endpoint: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("protocol upgrade: {0}")]
    Upgrade(#[source] hyper::Error),
    #[error("upgraded connection: {0}")]
    Upgraded(#[source] std::io::Error),
}

type Body = Either<Incoming, Full<Bytes>>;

/// What the per-request handler shares with the connection driver.
struct Shared<G> {
    gate: G,
    service: String,
    sender: tokio::sync::Mutex<SendRequest<Incoming>>,
    /// A request is waiting for its response head. When the upstream connection ends then,
    /// that request answers for it (a `502`, or the upgrade it was waiting for); when it ends
    /// with nothing waiting, the endpoint closed an idle connection.
    waiting: AtomicBool,
    /// Both halves of a protocol upgrade (WebSocket, CONNECT) the endpoint accepted.
    upgrade: Mutex<Option<(OnUpgrade, OnUpgrade)>>,
}

/// Serves HTTP/1 requests from `client` (the caller's connection: a TCP stream, a tunnelled
/// stream, a [`super::Rewind`] over either) by forwarding them in order over `upstream`, an
/// already dialled connection to the endpoint, asking `gate` before each one.
///
/// `service` (`namespace/name`) names the Service in the `429` body and in logs. The gate is
/// typically `move || limiters.admit(&namespace, &name, Protocol::Http)`, which also counts
/// the rejections.
///
/// - Over the limit: `429 Too Many Requests` with `Retry-After` (whole seconds, at least 1).
/// - The endpoint failed the request: `502` and the client connection ends, since the upstream
///   connection it was paired with is gone. When the endpoint closes an idle keep-alive
///   connection, the client connection is closed too, so the client's next request goes on a
///   new connection instead of failing.
/// - After a `101` (or a `2xx` to `CONNECT`), bytes pass both ways until either side ends.
///
/// Returns when the client connection ends; errors say why it ended early.
pub async fn serve_http1<C, U, G>(
    client: C,
    upstream: U,
    gate: G,
    service: &str,
    upgraded: crate::io::Timeouts,
) -> Result<(), Http1Error>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    G: Fn() -> Decision + Send + Sync + 'static,
{
    let (sender, upstream_conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream))
        .await
        .map_err(Http1Error::Upstream)?;
    let mut upstream_conn = std::pin::pin!(upstream_conn.with_upgrades());
    let shared = Arc::new(Shared {
        gate,
        service: service.to_string(),
        sender: tokio::sync::Mutex::new(sender),
        waiting: AtomicBool::new(false),
        upgrade: Mutex::new(None),
    });
    let handler = {
        let shared = Arc::clone(&shared);
        service_fn(move |req| forward(Arc::clone(&shared), req))
    };
    // The timer arms hyper's default header read timeout, which also bounds how long an idle
    // keep-alive client connection (and so its upstream connection) is kept.
    let mut server = std::pin::pin!(http1::Builder::new()
        .timer(TokioTimer::new())
        // Clients that shut down their write side after the request still get the response.
        .half_close(true)
        .serve_connection(TokioIo::new(client), handler)
        .with_upgrades());

    // Both connections are driven here rather than spawned, so that the caller's task owns
    // the whole exchange (cancelling it ends both connections).
    let mut upstream_open = true;
    let served = loop {
        tokio::select! {
            served = server.as_mut() => break served,
            ended = upstream_conn.as_mut(), if upstream_open => {
                upstream_open = false;
                if let Err(e) = ended {
                    debug!(service, error = %e, "upstream connection failed");
                }
                // Idle close by the endpoint: close the client's side too (after any response
                // still streaming), so its next request is not a 502. Not while a request
                // waits: it answers for the end itself, and a shutdown would add
                // `connection: close` to a 101.
                if !shared.waiting.load(Ordering::Acquire) {
                    server.as_mut().graceful_shutdown();
                }
            }
        }
    };
    served.map_err(Http1Error::Client)?;

    let Some((client_side, upstream_side)) = lock(&shared.upgrade).take() else {
        return Ok(());
    };
    // The upstream connection hands its IO over to the upgrade when its future completes.
    if upstream_open {
        upstream_conn.await.map_err(Http1Error::Upgrade)?;
    }
    let (client_io, upstream_io) =
        tokio::try_join!(client_side, upstream_side).map_err(Http1Error::Upgrade)?;
    crate::io::join(
        &mut crate::io::Whole(TokioIo::new(client_io)),
        &mut crate::io::Whole(TokioIo::new(upstream_io)),
        upgraded,
        crate::io::Counters::default(),
    )
    .await
    .map_err(Http1Error::Upgraded)?;
    Ok(())
}

async fn forward<G: Fn() -> Decision>(
    shared: Arc<Shared<G>>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if let Decision::Limited { retry_after } = (shared.gate)() {
        return Ok(too_many_requests(&shared.service, retry_after));
    }
    let connect = req.method() == Method::CONNECT;
    let client_side = hyper::upgrade::on(&mut req);
    shared.waiting.store(true, Ordering::Release);
    let sent = {
        // Held only until the request is queued: the response future does not borrow the
        // sender. HTTP/1 serves one request at a time, so nothing ever waits on this lock.
        let mut sender = shared.sender.lock().await;
        match sender.ready().await {
            Ok(()) => Ok(sender.send_request(req)),
            Err(e) => Err(e),
        }
    };
    let response = match sent {
        Ok(response) => response.await,
        Err(e) => Err(e),
    };
    shared.waiting.store(false, Ordering::Release);
    match response {
        Ok(mut response) => {
            let status = response.status();
            if status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success()) {
                let upstream_side = hyper::upgrade::on(&mut response);
                *lock(&shared.upgrade) = Some((client_side, upstream_side));
            }
            Ok(response.map(Either::Left))
        }
        Err(e) => {
            debug!(service = %shared.service, error = %e, "request to the endpoint failed");
            Ok(bad_gateway(&shared.service))
        }
    }
}

fn too_many_requests(service: &str, retry_after: Duration) -> Response<Body> {
    // Retry-After has whole seconds; rounding down would invite a retry that is refused again.
    let secs = (retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1);
    let mut response = text(
        StatusCode::TOO_MANY_REQUESTS,
        format!("service {service} is over its rate limit\n"),
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs));
    response
}

fn bad_gateway(service: &str) -> Response<Body> {
    let mut response = text(
        StatusCode::BAD_GATEWAY,
        format!("the endpoint of service {service} closed the connection\n"),
    );
    // The upstream connection is gone and a client connection never gets another one.
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The slot holds a plain value; a panic elsewhere cannot leave it half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::task::JoinHandle;

    type ClientBody = UnsyncBoxBody<Bytes, Infallible>;

    const SERVICE: &str = "default/web";
    const UPGRADED: crate::io::Timeouts = crate::io::Timeouts {
        idle: Duration::from_secs(3600),
        half_closed: Duration::from_secs(60),
    };

    /// A gate that answers from a script, then allows everything.
    fn scripted(decisions: &[Decision]) -> impl Fn() -> Decision + Send + Sync + 'static {
        let script = Mutex::new(decisions.iter().copied().collect::<VecDeque<_>>());
        move || lock(&script).pop_front().unwrap_or(Decision::Allowed)
    }

    /// Starts `serve_http1` between two in-memory pipes: the client's end and the endpoint's.
    fn proxy(
        gate: impl Fn() -> Decision + Send + Sync + 'static,
    ) -> (
        DuplexStream,
        DuplexStream,
        JoinHandle<Result<(), Http1Error>>,
    ) {
        let (client, proxy_client) = tokio::io::duplex(64 * 1024);
        let (proxy_upstream, upstream) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            serve_http1(proxy_client, proxy_upstream, gate, SERVICE, UPGRADED).await
        });
        (client, upstream, task)
    }

    /// An endpoint that echoes the request body, streamed, and counts requests.
    fn echo_endpoint(io: DuplexStream) -> Arc<AtomicUsize> {
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        let handler = service_fn(move |req: Request<Incoming>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let path = req.uri().path().to_string();
            let mut response = Response::new(req.into_body());
            response
                .headers_mut()
                .insert("x-path", HeaderValue::from_str(&path).expect("path"));
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(io), handler));
        requests
    }

    async fn client(io: DuplexStream) -> SendRequest<ClientBody> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        sender
    }

    fn request(method: Method, path: &str, body: ClientBody) -> Request<ClientBody> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web")
            .body(body)
            .expect("request")
    }

    fn full(body: &'static str) -> ClientBody {
        Full::new(Bytes::from_static(body.as_bytes())).boxed_unsync()
    }

    async fn body_of(response: Response<Incoming>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    /// Reads up to and including the blank line that ends a head.
    async fn read_head(io: &mut DuplexStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let b = io.read_u8().await.expect("head");
            head.push(b);
        }
        String::from_utf8(head).expect("utf-8")
    }

    #[tokio::test(start_paused = true)]
    async fn forwards_a_streamed_body_both_ways() {
        let (client_io, upstream, task) = proxy(scripted(&[]));
        let requests = echo_endpoint(upstream);
        let mut sender = client(client_io).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
        });
        let body = StreamBody::new(chunks).boxed_unsync();
        let response = sender.send_request(request(Method::POST, "/echo", body));
        tx.send(Bytes::from_static(b"one")).await.expect("send");
        let mut response = response.await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-path"], "/echo");
        // Each chunk comes back before the next one is sent: nothing waits for a whole body.
        let frame = response
            .body_mut()
            .frame()
            .await
            .expect("frame")
            .expect("ok");
        assert_eq!(frame.into_data().expect("data"), "one");
        tx.send(Bytes::from_static(b"two")).await.expect("send");
        let frame = response
            .body_mut()
            .frame()
            .await
            .expect("frame")
            .expect("ok");
        assert_eq!(frame.into_data().expect("data"), "two");
        drop(tx);
        assert!(response.body_mut().frame().await.is_none(), "body ends");
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        drop(sender);
        task.await.expect("join").expect("served");
    }

    #[tokio::test(start_paused = true)]
    async fn limited_requests_get_429_without_reaching_the_endpoint() {
        let limited = Decision::Limited {
            retry_after: Duration::from_millis(1200),
        };
        let barely = Decision::Limited {
            retry_after: Duration::from_millis(3),
        };
        let (client_io, upstream, task) = proxy(scripted(&[limited, barely]));
        let requests = echo_endpoint(upstream);
        let mut sender = client(client_io).await;

        let response = sender
            .send_request(request(Method::POST, "/a", full("unread body")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert!(body_of(response).await.contains(SERVICE));

        sender.ready().await.expect("connection kept");
        let response = sender
            .send_request(request(Method::GET, "/b", full("")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "1", "at least one second");
        body_of(response).await;
        assert_eq!(
            requests.load(Ordering::SeqCst),
            0,
            "the endpoint saw nothing"
        );

        sender.ready().await.expect("connection kept");
        let response = sender
            .send_request(request(Method::POST, "/c", full("through")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_of(response).await, "through");
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        drop(sender);
        task.await.expect("join").expect("served");
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_alive_over_one_upstream_connection() {
        let (client_io, upstream, task) = proxy(scripted(&[]));
        let requests = echo_endpoint(upstream);
        let mut sender = client(client_io).await;
        for (i, body) in ["first", "", "third", "fourth"].into_iter().enumerate() {
            sender.ready().await.expect("ready");
            let method = if body.is_empty() {
                Method::GET
            } else {
                Method::PUT
            };
            let response = sender
                .send_request(request(method, &format!("/{i}"), full(body)))
                .await
                .expect("response");
            assert_eq!(response.headers()["x-path"], format!("/{i}").as_str());
            assert_eq!(body_of(response).await, body);
        }
        assert_eq!(requests.load(Ordering::SeqCst), 4);
        drop(sender);
        task.await.expect("join").expect("served");
    }

    #[tokio::test(start_paused = true)]
    async fn upgrade_passes_bytes_both_ways() {
        let (mut client_io, mut upstream, task) = proxy(scripted(&[]));
        let endpoint = tokio::spawn(async move {
            let head = read_head(&mut upstream).await;
            assert!(head.starts_with("GET /ws HTTP/1.1\r\n"), "{head}");
            assert!(
                head.to_ascii_lowercase().contains("upgrade: echo"),
                "{head}"
            );
            upstream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nhello from the endpoint")
                .await
                .expect("write");
            let mut ping = [0u8; 4];
            upstream.read_exact(&mut ping).await.expect("read");
            upstream
                .write_all(&ping.to_ascii_uppercase())
                .await
                .expect("write");
            // Ends the upgraded connection from this side.
        });
        client_io
            .write_all(
                b"GET /ws HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
            )
            .await
            .expect("write");
        let head = read_head(&mut client_io).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        // The endpoint's connection ending at the upgrade is not an idle close.
        assert!(!head.to_ascii_lowercase().contains("close"), "{head}");
        let mut hello = [0u8; 23];
        client_io.read_exact(&mut hello).await.expect("read");
        assert_eq!(&hello, b"hello from the endpoint");
        client_io.write_all(b"ping").await.expect("write");
        let mut rest = Vec::new();
        client_io.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b"PING");
        endpoint.await.expect("endpoint");
        drop(client_io);
        task.await.expect("join").expect("served");
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_gets_400_or_close() {
        let (mut client_io, mut upstream, task) = proxy(scripted(&[]));
        client_io
            .write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        client_io.read_to_end(&mut answer).await.expect("read");
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 400 "),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        assert!(matches!(
            task.await.expect("join"),
            Err(Http1Error::Client(_))
        ));
        let mut seen = Vec::new();
        upstream.read_to_end(&mut seen).await.expect("read");
        assert!(seen.is_empty(), "the endpoint saw nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn endpoint_failure_gives_502_and_ends_the_connection() {
        let (mut client_io, mut upstream, task) = proxy(scripted(&[]));
        let endpoint = tokio::spawn(async move {
            read_head(&mut upstream).await;
            // Gone without an answer.
        });
        client_io
            .write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        client_io.read_to_end(&mut answer).await.expect("read");
        let answer = String::from_utf8(answer).expect("utf-8");
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        endpoint.await.expect("endpoint");
        task.await.expect("join").expect("served");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_close_by_the_endpoint_closes_the_client_connection() {
        let (mut client_io, mut upstream, task) = proxy(scripted(&[]));
        let endpoint = tokio::spawn(async move {
            read_head(&mut upstream).await;
            upstream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .expect("write");
            // A keep-alive timeout on the endpoint.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let started = tokio::time::Instant::now();
        client_io
            .write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        client_io.read_to_end(&mut answer).await.expect("read");
        let answer = String::from_utf8(answer).expect("utf-8");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.ends_with("\r\n\r\nok"),
            "one response, no 502: {answer}"
        );
        // Closed when the endpoint closed, not by the proxy's own idle timeout later.
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        endpoint.await.expect("endpoint");
        task.await.expect("join").expect("served");
    }
}
