//! QUIC for direct paths: the TLS settings both ends use (TLS 1.3 only, mutual
//! authentication with node certificates checked by [`PeerVerifier`]), the transport settings
//! (keepalives under conntrack's UDP timeouts, a silent path given up within seconds, as many
//! streams as the hub link allows), the stream type the data path moves bytes over, and the
//! open handshake of a stream: the [`OpenRequest`] and [`OpenResponse`] of the hub tunnel,
//! each as a length-prefixed JSON frame at the start of a bidirectional stream.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{RecvStream, SendStream, VarInt};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::identity::verify::{MeshCertVerifier, PeerVerifier};
use crate::identity::Identity;

/// The application protocol of direct paths (ALPN): both ends must speak it.
pub(crate) const ALPN: &[u8] = b"edgemesh-direct/1";
/// A path sends a keepalive when it has sent nothing for this long: far below conntrack's UDP
/// timeouts (30 s for a flow seen one way, 120 s once answered) and most home routers', and
/// often enough that a silent path is told within [`IDLE_TIMEOUT`].
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(1);
/// A path that has heard nothing for this long is dead (three keepalives lost): requests
/// waiting on it are then retried over the relay.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// QUIC's first guess of a path's round trip, before it has measured one: it sets when a
/// lost first packet is sent again (3 × this), which is what hole punching waits on. Edge
/// links are rarely slower; a guess too low costs a spare packet, one too high whole seconds.
const INITIAL_RTT: Duration = Duration::from_millis(100);
/// Paths being accepted at once (handshakes not yet finished); more are refused.
const MAX_HANDSHAKES: usize = 256;
/// The open request and answer are small; a frame larger than this ends the stream.
const MAX_FRAME: usize = 16 * 1024;
/// Application error codes on streams and connections.
pub(crate) mod code {
    use quinn::VarInt;

    /// A stream ended abnormally (its copier failed).
    pub const ABORTED: VarInt = VarInt::from_u32(1);
    /// The peer may not form a direct path with this node.
    pub const NOT_ALLOWED: VarInt = VarInt::from_u32(2);
    /// This node already has a path to the peer (the other of two simultaneous dials won).
    pub const DUPLICATE: VarInt = VarInt::from_u32(3);
    /// The node is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(4);
    /// The path carried nothing for a long time.
    pub const IDLE: VarInt = VarInt::from_u32(5);
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node's certificate and key, as both TLS roles present them; follows renewals.
#[derive(Debug)]
struct OwnCertificate {
    identity: Arc<Identity>,
    cached: Mutex<Option<(String, Arc<CertifiedKey>)>>,
}

impl OwnCertificate {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let issued = self.identity.current()?;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((fp, key)) = cached.as_ref() {
            if *fp == issued.fingerprint {
                return Some(key.clone());
            }
        }
        let signing = crypto_provider()
            .key_provider
            .load_private_key(self.identity.private_key())
            .ok()?;
        let key = Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(issued.cert.to_vec())],
            signing,
        ));
        *cached = Some((issued.fingerprint.clone(), key.clone()));
        Some(key)
    }
}

impl ResolvesServerCert for OwnCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for OwnCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.identity.current().is_some()
    }
}

/// QUIC's transport settings for direct paths.
fn transport(max_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).unwrap_or(VarInt::from_u32(6_000).into()),
        ))
        .max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .initial_rtt(INITIAL_RTT);
    Arc::new(t)
}

/// The settings of a node's QUIC endpoint: how it accepts paths, and how it dials them.
pub(crate) struct Configs {
    pub server: quinn::ServerConfig,
    pub client: quinn::ClientConfig,
}

/// TLS 1.3 both ways with the node's certificate, peers checked against the mesh CA and the
/// synced Node status. `max_streams`: streams a peer may have open on one path.
pub(crate) fn configs(
    identity: Arc<Identity>,
    verifier: Arc<PeerVerifier>,
    max_streams: u32,
) -> Result<Configs, rustls::Error> {
    let own = Arc::new(OwnCertificate {
        identity,
        cached: Mutex::new(None),
    });
    let mesh = MeshCertVerifier::new(verifier);
    let mut server = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(mesh.clone())
        .with_cert_resolver(own.clone());
    server.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption either way: a resumed session skips the certificate checks, and a peer
    // revoked since must be refused on its next path.
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut client = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(mesh)
        .with_client_cert_resolver(own);
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    let quic_err = |e: quinn::crypto::rustls::NoInitialCipherSuite| {
        rustls::Error::General(format!("no QUIC cipher suite: {e}"))
    };
    let transport = transport(max_streams);
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server).map_err(quic_err)?,
    ));
    server.transport_config(transport.clone());
    // Handshakes in progress at once: each costs a task and a TLS handshake, and only mesh
    // nodes can finish one.
    server.max_incoming(MAX_HANDSHAKES);
    let mut client = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client).map_err(quic_err)?,
    ));
    client.transport_config(transport);
    Ok(Configs { server, client })
}

/// Writes `value` as one frame: its JSON length (u32, big-endian), then the JSON.
pub(crate) async fn write_frame<T: Serialize>(send: &mut SendStream, value: &T) -> io::Result<()> {
    let json = serde_json::to_vec(value).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + json.len());
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    AsyncWriteExt::write_all(send, &frame).await
}

/// Reads one frame written by [`write_frame`].
pub(crate) async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> io::Result<T> {
    let len = AsyncReadExt::read_u32(recv).await? as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut json = vec![0u8; len];
    AsyncReadExt::read_exact(recv, &mut json).await?;
    serde_json::from_slice(&json).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Counts a path's open streams while they live (a duplicate path is closed once it has none).
#[derive(Debug)]
pub(crate) struct StreamCount(Arc<AtomicUsize>);

impl StreamCount {
    pub fn start(count: &Arc<AtomicUsize>) -> StreamCount {
        count.fetch_add(1, Ordering::Relaxed);
        StreamCount(count.clone())
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One stream of a direct path, carrying what one tunnel stream would.
#[derive(Debug)]
pub struct DirectStream {
    send: SendStream,
    recv: RecvStream,
    _count: StreamCount,
    /// The path's "up" flag: once it is down (the path went silent or closed), the stream is
    /// not kept for more requests.
    alive: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl DirectStream {
    pub(crate) fn new(send: SendStream, recv: RecvStream, count: StreamCount) -> DirectStream {
        DirectStream {
            send,
            recv,
            _count: count,
            alive: None,
        }
    }

    pub(crate) fn with_alive(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> DirectStream {
        self.alive = Some(flag);
        self
    }

    /// Whether a kept stream may carry another request: its path is still up.
    pub fn is_usable(&self) -> bool {
        self.alive
            .as_ref()
            .is_none_or(|f| f.load(Ordering::Relaxed))
    }
}

impl AsyncRead for DirectStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for DirectStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_shutdown(cx)
    }
}

/// The reading half of a [`DirectStream`].
pub struct DirectReader<'a>(&'a mut RecvStream);
/// The writing half of a [`DirectStream`].
pub struct DirectWriter<'a>(&'a mut SendStream);

impl AsyncRead for DirectReader<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for DirectWriter<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut *self.get_mut().0), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_shutdown(cx)
    }
}

impl crate::io::Source for DirectReader<'_> {}
impl crate::io::Sink for DirectWriter<'_> {}

impl crate::io::Duplex for DirectStream {
    type Reader<'a> = DirectReader<'a>;
    type Writer<'a> = DirectWriter<'a>;

    fn halves(&mut self) -> (DirectReader<'_>, DirectWriter<'_>) {
        (DirectReader(&mut self.recv), DirectWriter(&mut self.send))
    }

    /// The peer sees the stream reset, not a clean end.
    fn abort(&mut self) {
        let _ = self.send.reset(code::ABORTED);
        let _ = self.recv.stop(code::ABORTED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::{node, TestCa};
    use crate::model::{Node, NodeCertificate};
    use crate::tunnel::{OpenRequest, OpenResponse};
    use crate::view::MeshView;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use tokio::sync::watch;

    fn view(nodes: &[(&str, &NodeCertificate)]) -> Arc<MeshView> {
        let mut v = MeshView::default();
        for (name, cert) in nodes {
            let mut n = Node::new(name, BTreeMap::new());
            n.set_certificate(Some(*cert));
            v.nodes.insert(name.to_string(), Arc::new(n));
        }
        Arc::new(v)
    }

    fn endpoint(id: Arc<Identity>, view: watch::Receiver<Arc<MeshView>>) -> quinn::Endpoint {
        let verifier = Arc::new(PeerVerifier::new(id.clone(), view));
        let c = configs(id, verifier, 16).expect("configs");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut e = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(c.server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .expect("endpoint");
        e.set_default_client_config(c.client);
        e
    }

    /// Completes whatever handshake `e` is offered (its own checks decide), in the background.
    fn accept_any(e: quinn::Endpoint) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if let Some(i) = e.accept().await {
                let _ = i.await;
            }
        })
    }

    /// Both ends authenticate with node certificates over QUIC; a stream carries the open
    /// request and answer as frames, then bytes both ways with half-close; a peer whose
    /// certificate is not the dialled node's, or is revoked, gets no path.
    #[tokio::test]
    async fn mutually_authenticated_paths_carry_framed_opens_and_refuse_wrong_peers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("mesh");
        let (a, a_cert) = node(dir.path(), &ca, "a");
        let (b, b_cert) = node(dir.path(), &ca, "b");
        let (c, c_cert) = node(dir.path(), &ca, "c");
        let all = view(&[("a", &a_cert), ("b", &b_cert), ("c", &c_cert)]);
        let (a_view, ra) = watch::channel(all.clone());
        let (_b_view, rb) = watch::channel(all.clone());
        let (_c_view, rc) = watch::channel(all);
        let ea = endpoint(a, ra);
        let eb = endpoint(b, rb);
        let ec = endpoint(c, rc);
        let b_addr: SocketAddr = eb.local_addr().expect("addr");

        let server = tokio::spawn(async move {
            let conn = eb
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("handshake");
            let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
            let req: OpenRequest = read_frame(&mut recv).await.expect("request");
            write_frame(
                &mut send,
                &OpenResponse {
                    stream: 0,
                    window: 0,
                    error: None,
                },
            )
            .await
            .expect("answer");
            let mut body = Vec::new();
            AsyncReadExt::read_to_end(&mut recv, &mut body)
                .await
                .expect("body");
            AsyncWriteExt::write_all(&mut send, &body)
                .await
                .expect("echo");
            send.finish().expect("finish");
            let _ = send.stopped().await;
            (req.service, eb)
        });
        let conn = ea
            .connect(b_addr, "b")
            .expect("dial")
            .await
            .expect("a reaches b");
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        let request = OpenRequest {
            stream: 0,
            namespace: "default".into(),
            service: "web".into(),
            endpoint: "10.0.0.1:80".parse().expect("addr"),
            node: Some("b".into()),
            protocol: Default::default(),
            source: String::new(),
            window: 0,
        };
        write_frame(&mut send, &request).await.expect("request");
        let answer: OpenResponse = read_frame(&mut recv).await.expect("answer");
        assert_eq!(answer.error, None);
        let mut stream = DirectStream::new(send, recv, StreamCount::start(&Arc::default()));
        AsyncWriteExt::write_all(&mut stream, b"ping")
            .await
            .expect("write");
        AsyncWriteExt::shutdown(&mut stream)
            .await
            .expect("half-close");
        let mut echoed = Vec::new();
        AsyncReadExt::read_to_end(&mut stream, &mut echoed)
            .await
            .expect("read");
        assert_eq!(echoed, b"ping");
        let (service, eb) = server.await.expect("server");
        assert_eq!(service, "web");

        // c answers where a expects b: c's certificate is not b's.
        let c_addr = ec.local_addr().expect("addr");
        let _c_accepts = accept_any(ec);
        assert!(
            ea.connect(c_addr, "b").expect("dial").await.is_err(),
            "a took c's certificate for b's"
        );
        // A "b" with a certificate of another CA (for b's own name and key) is refused too.
        let rogue_ca = TestCa::new("rogue");
        let (rogue, _) = node(&dir.path().join("rogue"), &rogue_ca, "b");
        let (_r_view, rr) = watch::channel(view(&[("b", &b_cert)]));
        let er = endpoint(rogue, rr);
        let r_addr = er.local_addr().expect("addr");
        let _r_accepts = accept_any(er);
        assert!(
            ea.connect(r_addr, "b").expect("dial").await.is_err(),
            "a took a certificate of another CA"
        );
        // b's certificate revoked in a's view (b re-joined): a refuses it.
        a_view.send_replace(view(&[("a", &a_cert), ("c", &c_cert)]));
        let _b_accepts = accept_any(eb);
        assert!(
            ea.connect(b_addr, "b").expect("dial").await.is_err(),
            "a took b's revoked certificate"
        );
    }

    #[tokio::test]
    async fn an_oversized_frame_ends_the_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("mesh");
        let (a, a_cert) = node(dir.path(), &ca, "a");
        let (b, b_cert) = node(dir.path(), &ca, "b");
        let all = view(&[("a", &a_cert), ("b", &b_cert)]);
        let (_ta, ra) = watch::channel(all.clone());
        let (_tb, rb) = watch::channel(all);
        let (ea, eb) = (endpoint(a, ra), endpoint(b, rb));
        let b_addr = eb.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let conn = eb
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("handshake");
            let (_send, mut recv) = conn.accept_bi().await.expect("stream");
            let r: io::Result<OpenRequest> = read_frame(&mut recv).await;
            r.expect_err("oversized").kind()
        });
        let conn = ea.connect(b_addr, "b").expect("dial").await.expect("path");
        let (mut send, _recv) = conn.open_bi().await.expect("open");
        AsyncWriteExt::write_all(&mut send, &(1u32 << 30).to_be_bytes())
            .await
            .expect("write");
        assert_eq!(server.await.expect("server"), io::ErrorKind::InvalidData);
    }
}
