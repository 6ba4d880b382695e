//! Admitting connections from outside, for every listener that speaks HTTP or a handshake
//! before it knows who is calling (cloudcore's hub and REST API, the agent's admin API): caps
//! on connections in total and per peer address, so one client cannot take every slot, and
//! the bounded HTTP/1 server the APIs run on (idle and header timeouts, a time limit per
//! request, TLS handshakes bounded in time).
//!
//! Every limit that refuses or ends something counts it in `<process>_<listener>_limit_hits_total`
//! with the limit's name as the `limit` label (see `docs/observability.md`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

/// Counts a limit hit of `listener` (`hub`, `api`, `admin`) in the process's metrics.
pub fn limit_hit(listener: &'static str, limit: &'static str) {
    metrics::counter!(
        crate::telemetry::name(&format!("{listener}_limit_hits_total")),
        "limit" => limit
    )
    .increment(1);
}

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken.
    Total,
    /// This peer address holds its share.
    PerPeer,
}

impl Refused {
    /// The `limit` label of the metric.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Total => "connections",
            Refused::PerPeer => "connections_per_peer",
        }
    }
}

/// Connection slots in total and per peer address; a slot is held by a [`Slot`] until dropped.
#[derive(Clone, Debug)]
pub struct Slots {
    inner: Arc<Mutex<SlotsInner>>,
    max_total: usize,
    max_per_peer: usize,
}

#[derive(Debug, Default)]
struct SlotsInner {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One held slot; dropping it frees it.
#[derive(Debug)]
pub struct Slot {
    slots: Slots,
    peer: IpAddr,
}

impl Slots {
    pub fn new(max_total: usize, max_per_peer: usize) -> Slots {
        Slots {
            inner: Arc::default(),
            max_total: max_total.max(1),
            max_per_peer: max_per_peer.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotsInner> {
        // Counters only: a panic cannot leave them half-updated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for `peer`, or which cap is full. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn try_take(&self, peer: IpAddr) -> Result<Slot, Refused> {
        let peer = peer.to_canonical();
        let mut inner = self.lock();
        if inner.total >= self.max_total {
            return Err(Refused::Total);
        }
        let held = inner.per_peer.entry(peer).or_default();
        if *held >= self.max_per_peer {
            return Err(Refused::PerPeer);
        }
        *held += 1;
        inner.total += 1;
        Ok(Slot {
            slots: self.clone(),
            peer,
        })
    }

    /// Slots held now.
    pub fn held(&self) -> usize {
        self.lock().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.lock();
        inner.total = inner.total.saturating_sub(1);
        if let Some(held) = inner.per_peer.get_mut(&self.peer) {
            *held -= 1;
            if *held == 0 {
                inner.per_peer.remove(&self.peer);
            }
        }
    }
}

/// The bounds of an HTTP listener.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// A connection that sends no complete request head for this long is closed: an idle
    /// keep-alive connection as well as a client that trickles its headers.
    pub idle_timeout: Duration,
    /// Time to answer one request, its body read included; then 503.
    pub request_timeout: Duration,
    /// Time a new connection has to finish TLS.
    pub tls_handshake_timeout: Duration,
}

/// Serves `router` over HTTP/1.1 on `listener` (TLS with `tls`) within `limits` until
/// `shutdown`; in-flight requests then get 10 s to finish. `listener_name` names the metric.
/// The next connection on `listener`, or `None` once `shutdown` is cancelled. Accept errors
/// (out of file descriptors and the like) are logged and waited out a little, so a listener
/// never spins on them.
pub async fn next_connection(
    listener: &TcpListener,
    listener_name: &str,
    shutdown: &CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                warn!(error = %e, listener = listener_name, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn serve_http(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: HttpLimits,
    listener_name: &'static str,
    shutdown: CancellationToken,
) {
    let router = router.layer(middleware::from_fn_with_state(
        (limits.request_timeout, listener_name),
        request_timeout,
    ));
    let slots = Slots::new(limits.max_connections, limits.max_connections_per_peer);
    let graceful = GracefulShutdown::new();
    loop {
        let Some((tcp, peer)) = next_connection(&listener, listener_name, &shutdown).await else {
            break;
        };
        let slot = match slots.try_take(peer.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                limit_hit(listener_name, refused.label());
                debug!(%peer, listener = listener_name, limit = refused.label(), "connection refused");
                // Closing at once is the cheapest answer: no bytes, no task.
                drop(tcp);
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let span = tracing::debug_span!("http_conn", listener = listener_name, %peer);
        tokio::spawn(
            async move {
                let _slot = slot;
                match tls {
                    Some(acceptor) => {
                        let stream = match tokio::time::timeout(
                            limits.tls_handshake_timeout,
                            acceptor.accept(tcp),
                        )
                        .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
                            Err(_) => {
                                limit_hit(listener_name, "tls_handshake_timeout");
                                return debug!("TLS handshake timed out");
                            }
                        };
                        serve_conn(stream, service, watcher, limits, listener_name, peer).await
                    }
                    None => serve_conn(tcp, service, watcher, limits, listener_name, peer).await,
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            listener = listener_name,
            "HTTP connections did not finish in time"
        );
    }
}

async fn serve_conn<S>(
    io: S,
    service: TowerToHyperService<Router>,
    watcher: hyper_util::server::graceful::Watcher,
    limits: HttpLimits,
    listener_name: &'static str,
    peer: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(64 << 10)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        if e.is_timeout() {
            limit_hit(listener_name, "idle_timeout");
        }
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Bounds the time to answer a request (its body read included): a client that trickles a
/// body cannot hold a request, and the memory for it, for ever.
async fn request_timeout(
    State((limit, listener_name)): State<(Duration, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            limit_hit(listener_name, "request_timeout");
            let body = format!(
                "{{\"error\":\"the request took longer than {} s\"}}",
                limit.as_secs_f64()
            );
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn slots_cap_in_total_and_per_peer_and_come_back() {
        let slots = Slots::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let a1 = slots.try_take(a).expect("first");
        let _a2 = slots.try_take(a).expect("second");
        assert_eq!(slots.try_take(mapped).err(), Some(Refused::PerPeer));
        let _b1 = slots.try_take(b).expect("other peer");
        assert_eq!(slots.try_take(b).err(), Some(Refused::Total));
        drop(a1);
        assert_eq!(slots.held(), 2);
        let _a3 = slots.try_take(a).expect("freed");
    }

    async fn server(limits: HttpLimits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            );
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_http(
            listener,
            None,
            router,
            limits,
            "test",
            shutdown.clone(),
        ));
        (addr, shutdown)
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // A refused connection may be closed before the request is written.
        if write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .is_err()
        {
            return String::new();
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    const LIMITS: HttpLimits = HttpLimits {
        max_connections: 4,
        max_connections_per_peer: 2,
        idle_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        tls_handshake_timeout: Duration::from_secs(1),
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_slow_clients_are_cut_off_and_a_peer_gets_its_share() {
        let (addr, shutdown) = server(LIMITS).await;
        tokio::task::spawn_blocking(move || {
            assert!(get(addr, "/").ends_with("ok"));
            // A slow handler: 503 once the request time is up.
            let slow = get(addr, "/slow");
            assert!(slow.starts_with("HTTP/1.1 503"), "{slow}");
            // Two idle connections take this peer's share; a third is closed at once.
            let idle: Vec<std::net::TcpStream> = (0..2)
                .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
                .collect();
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(get(addr, "/"), "", "over the per-peer cap");
            // The idle ones are closed after the idle timeout, and the slots come back.
            for mut s in idle {
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut buf = [0u8; 16];
                assert_eq!(s.read(&mut buf).expect("closed, not timed out"), 0);
            }
            std::thread::sleep(Duration::from_millis(50));
            assert!(get(addr, "/").ends_with("ok"));
            // A client that never finishes its headers is closed the same way.
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").expect("send");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
        })
        .await
        .expect("client");
        shutdown.cancel();
    }
}
