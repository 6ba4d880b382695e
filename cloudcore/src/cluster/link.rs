//! Replica links: websockets between cloudcore replicas that carry the node links' own stream
//! protocol (open Messages as text, frames as binary), so a stream between two nodes held by
//! different replicas is two relays joined by a link, frames passing through by id with
//! the opener's window end to end.
//!
//! A replica dials `GET /v1/replicas/link` on another's `cluster.advertise_url` and opens its
//! streams over that outbound link only; the receiving replica checks each stream against its
//! own store before it relays it to the target node's link. Links authenticate with the
//! shared `cluster.peer_key_file`: the dialer sends its name, the time and a random nonce with
//! an HMAC-SHA256 over them; the receiver accepts a fresh time, a nonce it has not seen, and a
//! valid MAC. The key itself never crosses the network and is never stored in etcd. Use
//! `wss://` (`cluster.tls_*`) where the network between replicas is not trusted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgehub::message::{group, Message};
use edgehub::tunnel::{Mux, MuxConfig, Outgoing, Side};
use futures_util::{SinkExt, StreamExt};
use ring::hmac;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::tunnel::Tunnels;

/// A replica link's byte stream, TLS or not.
type BoxedIo = std::pin::Pin<Box<dyn edgehub::connect::AnyStream>>;

/// Path of the replica link on `cluster.listen`.
pub const LINK_PATH: &str = "/v1/replicas/link";

/// How far a link's timestamp may be from this replica's clock.
const MAX_SKEW_MS: i64 = 30_000;

/// Largest websocket message on a link: one frame or one open Message.
const MAX_MESSAGE: usize = 1 << 20;

/// A link with no frame for this long is dead (pings go every third of it).
const LINK_TIMEOUT: Duration = Duration::from_secs(6);

/// Time a dial (TCP, TLS, websocket) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// The shared secret of the replicas.
pub struct PeerKey(hmac::Key);

impl PeerKey {
    /// Reads `cluster.peer_key_file`: at least 32 bytes (surrounding whitespace ignored).
    pub fn load(path: &std::path::Path) -> anyhow::Result<PeerKey> {
        let raw = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!(
                "config key `cluster.peer_key_file`: cannot read {}: {e}",
                path.display()
            )
        })?;
        let text = String::from_utf8_lossy(&raw);
        let secret = text.trim();
        if secret.len() < 32 {
            anyhow::bail!(
                "config key `cluster.peer_key_file`: {} holds {} bytes; the shared secret needs at least 32 (e.g. `openssl rand -hex 32`)",
                path.display(),
                secret.len()
            );
        }
        Ok(PeerKey::new(secret.as_bytes()))
    }

    pub fn new(secret: &[u8]) -> PeerKey {
        PeerKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    fn payload(name: &str, ts: i64, nonce: &str) -> String {
        format!("edgemesh-replica-link\n{name}\n{ts}\n{nonce}")
    }

    /// The `Authorization` value a dialer named `name` sends.
    pub fn authorization(&self, name: &str) -> String {
        let ts = crate::nodes::now_ms();
        let nonce: [u8; 16] = rand::random();
        let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        let tag = hmac::sign(&self.0, Self::payload(name, ts, &nonce).as_bytes());
        let mac: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("EdgemeshReplica {name}:{ts}:{nonce}:{mac}")
    }
}

/// Checks `Authorization` values: MAC, freshness, and no nonce twice.
pub struct Verifier {
    key: PeerKey,
    seen: Mutex<HashMap<String, i64>>,
}

impl Verifier {
    pub fn new(key: PeerKey) -> Self {
        Verifier {
            key,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// The dialer's name, or why it is refused.
    pub fn verify(&self, value: &str, now_ms: i64) -> Result<String, &'static str> {
        let creds = value
            .strip_prefix("EdgemeshReplica ")
            .ok_or("no replica credentials")?;
        let mut parts = creds.rsplitn(4, ':');
        let (Some(mac), Some(nonce), Some(ts), Some(name)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed replica credentials");
        };
        let ts: i64 = ts.parse().map_err(|_| "malformed replica credentials")?;
        let mac = (0..mac.len())
            .step_by(2)
            .map(|i| {
                mac.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or("malformed replica credentials")?;
        hmac::verify(
            &self.key.0,
            PeerKey::payload(name, ts, nonce).as_bytes(),
            &mac,
        )
        .map_err(|_| "wrong replica key")?;
        if (now_ms - ts).abs() > MAX_SKEW_MS {
            return Err("stale replica credentials (clocks more than 30 s apart?)");
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, t| (now_ms - *t).abs() <= 2 * MAX_SKEW_MS);
        if seen.insert(nonce.to_string(), ts).is_some() {
            return Err("replayed replica credentials");
        }
        Ok(name.to_string())
    }
}

fn mux_config() -> MuxConfig {
    // The link carries many nodes' streams; per-stream windows are the nodes' own.
    MuxConfig {
        max_streams: 1 << 16,
        ..MuxConfig::default()
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Runs one link until either end closes it or it goes silent: frames and stream Messages in
/// go to `mux` (open requests to `tunnels`), what `mux` queues goes out.
async fn run_link<S>(
    ws: WebSocketStream<S>,
    mux: Mux,
    mut out: mpsc::UnboundedReceiver<Outgoing>,
    tunnels: Arc<Tunnels>,
    inbound_opens: bool,
    shutdown: CancellationToken,
) -> &'static str
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let mut ping = tokio::time::interval(LINK_TIMEOUT / 3);
    let mut last_in = tokio::time::Instant::now();
    let reason = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break "cloudcore is shutting down",
            frame = stream.next() => {
                last_in = tokio::time::Instant::now();
                match frame {
                    None => break "closed by the other replica",
                    Some(Err(e)) => {
                        debug!(error = %e, "replica link failed");
                        break "replica link failed";
                    }
                    Some(Ok(WsMessage::Binary(raw))) => {
                        if let Err(e) = mux.on_binary(raw) {
                            warn!(error = %e, "bad frame on a replica link");
                            break "bad frame";
                        }
                    }
                    Some(Ok(WsMessage::Text(t))) => {
                        let handled = match Message::from_json(t.as_str()) {
                            Ok(m) if m.route.group == group::STREAM => {
                                match mux.on_message(&m) {
                                    Ok(Some(incoming)) if inbound_opens => {
                                        tunnels.from_replica(&mux, incoming);
                                        Ok(())
                                    }
                                    Ok(Some(incoming)) => {
                                        mux.refuse(incoming, edgehub::tunnel::RefusalKind::Invalid, "streams are opened by the dialing replica");
                                        Ok(())
                                    }
                                    Ok(None) => Ok(()),
                                    Err(e) => Err(e.to_string()),
                                }
                            }
                            Ok(_) => Ok(()),
                            Err(e) => Err(e.to_string()),
                        };
                        if let Err(e) = handled {
                            warn!(error = %e, "bad message on a replica link");
                            break "bad message";
                        }
                    }
                    Some(Ok(WsMessage::Close(_))) => break "closed by the other replica",
                    Some(Ok(_)) => {}
                }
            }
            Some(first) = out.recv() => {
                let mut permits = Vec::new();
                let mut next = Some(first);
                let mut failed = false;
                while let Some(o) = next.take() {
                    let (message, permit) = o.into_parts();
                    if sink.feed(message).await.is_err() {
                        failed = true;
                        break;
                    }
                    permits.push(permit);
                    if permits.len() < 64 {
                        next = out.try_recv().ok();
                    }
                }
                if failed || sink.flush().await.is_err() {
                    break "replica link write failed";
                }
            }
            _ = ping.tick() => {
                if last_in.elapsed() > LINK_TIMEOUT {
                    break "replica link went silent";
                }
                if sink.send(WsMessage::Ping(Default::default())).await.is_err() {
                    break "replica link write failed";
                }
            }
        }
    };
    mux.close(reason);
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    reason
}

/// Accepts links from other replicas on `cluster.listen` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    verifier: Arc<Verifier>,
    tunnels: Arc<Tunnels>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let Some((tcp, peer)) =
            edgehub::accept::next_connection(&listener, "cluster", &shutdown).await
        else {
            break;
        };
        let (tls, verifier, tunnels, shutdown) = (
            tls.clone(),
            verifier.clone(),
            tunnels.clone(),
            shutdown.clone(),
        );
        let span = tracing::info_span!("replica_link", %peer, from = tracing::field::Empty);
        tracker.spawn(
            async move {
                let _ = tcp.set_nodelay(true);
                let io: BoxedIo = match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(DIAL_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => Box::pin(s),
                            _ => return debug!("replica link TLS handshake failed"),
                        }
                    }
                    None => Box::pin(tcp),
                };
                accept(io, peer, &verifier, tunnels, shutdown).await;
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
}

// The handshake callback's error type is tungstenite's HTTP response; its size is not ours.
#[allow(clippy::result_large_err)]
async fn accept(
    io: BoxedIo,
    peer: SocketAddr,
    verifier: &Verifier,
    tunnels: Arc<Tunnels>,
    shutdown: CancellationToken,
) {
    let mut from = None;
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, why: &str| {
            let mut r = ErrorResponse::new(Some(format!("{why}\n")));
            *r.status_mut() = status;
            r
        };
        if req.uri().path() != LINK_PATH {
            return Err(refuse(StatusCode::NOT_FOUND, "no such endpoint"));
        }
        let creds = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        match verifier.verify(creds, crate::nodes::now_ms()) {
            Ok(name) => {
                from = Some(name);
                Ok(resp)
            }
            Err(why) => {
                warn!(%peer, reason = why, "refused a replica link");
                Err(refuse(StatusCode::UNAUTHORIZED, why))
            }
        }
    };
    let ws = match tokio::time::timeout(
        DIAL_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(ws_config())),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        _ => return,
    };
    let Some(from) = from else { return };
    tracing::Span::current().record("from", from.as_str());
    info!("replica link up (inbound)");
    let (mux, out) = Mux::new(mux_config(), Side::Cloud);
    let reason = run_link(ws, mux, out, tunnels, true, shutdown).await;
    info!(reason, "replica link down (inbound)");
}

/// Outbound links to the other replicas, dialled when first needed and kept while they last.
pub struct Links {
    name: String,
    key: Arc<PeerKey>,
    ca_cert: Option<std::path::PathBuf>,
    tunnels: std::sync::Weak<Tunnels>,
    links: Mutex<HashMap<String, Mux>>,
    /// One dial at a time per replica: many streams at once wait for the same link.
    dialing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shutdown: CancellationToken,
}

impl Links {
    pub fn new(
        name: String,
        key: Arc<PeerKey>,
        ca_cert: Option<std::path::PathBuf>,
        tunnels: &Arc<Tunnels>,
        shutdown: CancellationToken,
    ) -> Self {
        Links {
            name,
            key,
            ca_cert,
            tunnels: Arc::downgrade(tunnels),
            links: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    fn live(&self, replica: &str) -> Option<Mux> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        match links.get(replica) {
            Some(m) if !m.is_closed() => Some(m.clone()),
            Some(_) => {
                links.remove(replica);
                None
            }
            None => None,
        }
    }

    /// The link to `replica` at `url`, dialled if there is none.
    pub async fn get(&self, replica: &str, url: &str) -> Result<Mux, String> {
        if let Some(m) = self.live(replica) {
            return Ok(m);
        }
        let gate = self
            .dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(replica.to_string())
            .or_default()
            .clone();
        let _dialing = gate.lock().await;
        if let Some(m) = self.live(replica) {
            return Ok(m);
        }
        let ws = tokio::time::timeout(DIAL_TIMEOUT, self.dial(url))
            .await
            .map_err(|_| format!("dialling replica {replica} at {url} timed out"))??;
        let tunnels = self
            .tunnels
            .upgrade()
            .ok_or_else(|| "shutting down".to_string())?;
        let (mux, out) = Mux::new(mux_config(), Side::Edge);
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(replica.to_string(), mux.clone());
        let shutdown = self.shutdown.clone();
        let to = replica.to_string();
        let link = mux.clone();
        tokio::spawn(
            async move {
                info!("replica link up (outbound)");
                let reason = run_link(ws, link, out, tunnels, false, shutdown).await;
                info!(reason, "replica link down (outbound)");
            }
            .instrument(tracing::info_span!("replica_link", to = %to)),
        );
        Ok(mux)
    }

    async fn dial(&self, url: &str) -> Result<WebSocketStream<BoxedIo>, String> {
        let cloud = edgehub::client::CloudUrl::parse(url).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect((cloud.host.as_str(), cloud.port))
            .await
            .map_err(|e| format!("dial {url}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let io: BoxedIo = if cloud.tls {
            let ca = self
                .ca_cert
                .as_deref()
                .ok_or("wss:// replica links need cluster.ca_cert")?;
            let config =
                edgehub::tls::client_config("cluster.ca_cert", ca).map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::try_from(cloud.host.clone())
                .map_err(|_| format!("{url}: invalid TLS server name"))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS to {url}: {e}"))?;
            Box::pin(tls)
        } else {
            Box::pin(tcp)
        };
        let scheme = if cloud.tls { "wss" } else { "ws" };
        let host = if cloud.host.contains(':') {
            format!("[{}]", cloud.host)
        } else {
            cloud.host.clone()
        };
        let mut request = format!("{scheme}://{host}:{}{LINK_PATH}", cloud.port)
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let auth = HeaderValue::from_str(&self.key.authorization(&self.name))
            .map_err(|_| "cluster.name has characters a header cannot carry".to_string())?;
        request.headers_mut().insert(header::AUTHORIZATION, auth);
        let (ws, _) = tokio_tungstenite::client_async_with_config(request, io, Some(ws_config()))
            .await
            .map_err(|e| format!("replica link to {url}: {e}"))?;
        Ok(ws)
    }

    /// Closes every outbound link (shutdown).
    pub fn close_all(&self) {
        let links: Vec<Mux> = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, m)| m)
            .collect();
        for m in links {
            m.close("cloudcore is shutting down");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_need_the_key_a_fresh_time_and_a_new_nonce() {
        let key = PeerKey::new(b"0123456789abcdef0123456789abcdef");
        let verifier = Verifier::new(PeerKey::new(b"0123456789abcdef0123456789abcdef"));
        let auth = key.authorization("r1:10003");
        let now = crate::nodes::now_ms();
        assert_eq!(verifier.verify(&auth, now), Ok("r1:10003".to_string()));
        assert_eq!(
            verifier.verify(&auth, now),
            Err("replayed replica credentials")
        );
        let other = PeerKey::new(b"another key, also 32 bytes long!!");
        assert_eq!(
            verifier.verify(&other.authorization("r1"), now),
            Err("wrong replica key")
        );
        let fresh = key.authorization("r2");
        assert!(verifier.verify(&fresh, now + 60_000).is_err(), "too old");
        let tampered = fresh.replace("r2:", "r3:");
        assert_eq!(verifier.verify(&tampered, now), Err("wrong replica key"));
        assert!(verifier.verify("Bearer x", now).is_err());
        assert!(verifier.verify("EdgemeshReplica a:b", now).is_err());
    }

    #[test]
    fn the_key_file_must_hold_a_real_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let short = dir.path().join("short");
        std::fs::write(&short, "too short\n").expect("write");
        let e = PeerKey::load(&short).err().expect("refused").to_string();
        assert!(e.contains("`cluster.peer_key_file`"), "{e}");
        let e = PeerKey::load(&dir.path().join("missing"))
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("`cluster.peer_key_file`"), "{e}");
        let good = dir.path().join("good");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32))).expect("write");
        assert!(PeerKey::load(&good).is_ok());
    }
}
