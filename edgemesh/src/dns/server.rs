//! UDP and TCP transports in front of a [`RequestHandler`].
//!
//! hickory's own `Server` is not used: it logs two lines at `info` for every query and routes
//! each UDP answer through a channel to a single sending task. Here every worker receives on
//! the shared socket, parses with hickory (`Request::from_bytes`), lets the handler answer into
//! a [`Captured`] response, and sends the bytes itself.
//!
//! Over UDP an answer larger than the client's EDNS payload size (512 without EDNS, at most
//! 1232) is replaced by an empty one with TC set, and the client asks again over TCP, where
//! answers are complete. Input that is not a query never reaches the handler: shorter than a
//! header or flagged as a response, it is dropped; another opcode gets NOTIMP; anything but
//! one question (and at most OPT and a signature), or unparsable, gets FORMERR.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Header, HeaderCounts, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

use super::forward::UDP_PAYLOAD;
use super::handler::record_rejected;
use super::limits::{record_limit, Limit, Slot, TcpLimits, TcpSlots};

/// DNS header length.
const HEADER: usize = 12;
/// Largest query accepted: a UDP datagram longer than this is cut (and then fails to parse), a
/// TCP connection announcing one is closed.
const MAX_QUERY: usize = 4096;

/// A [`ResponseHandler`] that encodes the response into bytes for the transport to send.
#[derive(Clone)]
pub struct Captured {
    max_size: u16,
    protocol: Protocol,
    /// Length of the question section as the client sent it.
    question_len: usize,
    edns: bool,
    out: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Captured {
    pub fn for_request(request: &Request) -> Captured {
        let protocol = request.protocol();
        let max_size = match protocol {
            Protocol::Udp => request.max_payload().clamp(512, UDP_PAYLOAD),
            _ => u16::MAX,
        };
        Captured {
            max_size,
            protocol,
            question_len: request.queries.as_bytes().len(),
            edns: request.edns.is_some(),
            out: Arc::new(Mutex::new(None)),
        }
    }

    /// The encoded response, once the handler has sent one.
    pub fn take(&self) -> Option<Vec<u8>> {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Cuts a truncated UDP response down to header and question (plus OPT), with TC set.
    fn truncate(&self, buf: &mut Vec<u8>, mut header: Header) -> Header {
        let keep = HEADER + self.question_len;
        if buf.len() < keep {
            return header;
        }
        buf.truncate(keep);
        header.metadata.truncation = true;
        header.counts.answers = 0;
        header.counts.authorities = 0;
        header.counts.additionals = 0;
        if self.edns {
            // OPT: root owner, type 41, class = payload size, TTL = extended rcode / version /
            // flags, no options.
            buf.push(0);
            buf.extend_from_slice(&41u16.to_be_bytes());
            buf.extend_from_slice(&UDP_PAYLOAD.to_be_bytes());
            buf.extend_from_slice(&[header.metadata.response_code.high(), 0, 0, 0]);
            buf.extend_from_slice(&0u16.to_be_bytes());
            header.counts.additionals = 1;
        }
        buf[2] |= 0x02; // TC
        buf[6..12].fill(0);
        buf[10..12].copy_from_slice(&header.counts.additionals.to_be_bytes());
        header
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Captured {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let metadata = *response.metadata();
        let mut buf = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(self.max_size);
        let header = match response.destructive_emit(&mut encoder) {
            Ok(info) => Header {
                metadata: *info,
                counts: info.counts(),
            },
            Err(e) => {
                // Nothing sensible was written: answer SERVFAIL with the bare header.
                debug!(error = %e, "cannot encode a DNS response");
                let mut metadata = metadata;
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                buf.clear();
                let mut encoder = BinEncoder::new(&mut buf);
                hickory_proto::serialize::binary::BinEncodable::emit(&header, &mut encoder)?;
                header
            }
        };
        let header = if header.metadata.truncation && self.protocol == Protocol::Udp {
            self.truncate(&mut buf, header)
        } else {
            header
        };
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(buf);
        Ok(ResponseInfo::from(header))
    }
}

/// What to do with a datagram or TCP message.
enum Incoming {
    Query(Box<Request>),
    /// Not a query this server handles, but the header is readable: answer with these bytes
    /// (a bare header with this code).
    Reject(Vec<u8>, ResponseCode),
    /// Too short, or a response: say nothing.
    Ignore,
}

fn classify(data: &[u8], src: SocketAddr, protocol: Protocol) -> Incoming {
    if data.len() < HEADER || data[2] & 0x80 != 0 {
        return Incoming::Ignore;
    }
    let count = |i: usize| u16::from_be_bytes([data[i], data[i + 1]]);
    let opcode = (data[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Incoming::Reject(bare(data, ResponseCode::NotImp), ResponseCode::NotImp);
    }
    // A query asks one question and carries no records but OPT (and a signature). Checked
    // before parsing, so a header that claims thousands of records costs nothing.
    if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 2 {
        return Incoming::Reject(bare(data, ResponseCode::FormErr), ResponseCode::FormErr);
    }
    match Request::from_bytes(data.to_vec(), src, protocol) {
        Ok(request) => Incoming::Query(Box::new(request)),
        Err(_) => Incoming::Reject(bare(data, ResponseCode::FormErr), ResponseCode::FormErr),
    }
}

/// A bare response header with `code` for the query whose header is `data[..12]`: same ID,
/// opcode and RD.
fn bare(data: &[u8], code: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; HEADER];
    out[0] = data[0];
    out[1] = data[1];
    out[2] = 0x80 | (data[2] & 0x79); // QR, opcode, RD
    out[3] = code.low();
    out
}

/// Runs the handler for one request and returns the bytes to send back.
async fn answer<H: RequestHandler>(handler: &H, request: &Request) -> Option<Vec<u8>> {
    let captured = Captured::for_request(request);
    handler
        .handle_request::<_, TokioTime>(request, captured.clone())
        .await;
    captured.take()
}

/// Binds the UDP socket and the TCP listener of the server.
pub async fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(addr).await?;
    let tcp = TcpListener::bind(addr).await?;
    Ok((udp, tcp))
}

/// Serves `udp` and `tcp` with `handler` until `shutdown`, TCP within `limits`; every task it
/// starts is tracked by `tracker`.
pub fn serve<H: RequestHandler>(
    handler: Arc<H>,
    udp: UdpSocket,
    tcp: TcpListener,
    workers: usize,
    limits: TcpLimits,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let udp = Arc::new(udp);
    for _ in 0..workers.max(1) {
        tracker.spawn(udp_worker(
            udp.clone(),
            handler.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    tracker.spawn(tcp_acceptor(
        tcp,
        handler,
        TcpSlots::new(limits),
        shutdown.clone(),
        tracker.clone(),
    ));
}

async fn udp_worker<H: RequestHandler>(
    socket: Arc<UdpSocket>,
    handler: Arc<H>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (n, src) = match received {
            Ok(r) => r,
            Err(e) => {
                // Errors here are transient (e.g. ICMP reports on some kernels); do not spin.
                debug!(error = %e, "DNS UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if src.port() == 0 || src.ip().is_unspecified() || src.ip().is_multicast() {
            continue;
        }
        let started = Instant::now();
        match classify(&buf[..n], src, Protocol::Udp) {
            Incoming::Ignore => {}
            Incoming::Reject(reply, code) => {
                record_rejected(code, started);
                send(&socket, reply, src, &tracker);
            }
            Incoming::Query(request) => {
                // Most queries (cluster names, cached names) are answered without waiting on
                // anything: poll the answer once here and only hand it to a task of its own
                // when it has to wait (for an upstream). Polling with a no-op waker is fine:
                // whatever it registered with is registered again by the task's first poll.
                let handler = handler.clone();
                let mut reply = Box::pin(async move { answer(&*handler, &request).await });
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match reply.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(Some(bytes)) => send(&socket, bytes, src, &tracker),
                    std::task::Poll::Ready(None) => {}
                    std::task::Poll::Pending => {
                        let (socket, shutdown) = (socket.clone(), shutdown.clone());
                        let spawner = tracker.clone();
                        tracker.spawn(async move {
                            if let Some(Some(bytes)) = shutdown.run_until_cancelled(reply).await {
                                send(&socket, bytes, src, &spawner);
                            }
                        });
                    }
                }
            }
        }
    }
}

/// Sends an answer without waiting when the socket can take it (almost always), else from a
/// task of its own.
fn send(socket: &Arc<UdpSocket>, bytes: Vec<u8>, src: SocketAddr, tracker: &TaskTracker) {
    match socket.try_send_to(&bytes, src) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let socket = socket.clone();
            tracker.spawn(async move {
                if let Err(e) = socket.send_to(&bytes, src).await {
                    debug!(%src, error = %e, "cannot send a DNS answer");
                }
            });
        }
        Err(e) => debug!(%src, error = %e, "cannot send a DNS answer"),
    }
}

async fn tcp_acceptor<H: RequestHandler>(
    listener: TcpListener,
    handler: Arc<H>,
    slots: Arc<TcpSlots>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let Some((stream, src)) =
            edgehub::accept::next_connection(&listener, "dns", &shutdown).await
        else {
            return;
        };
        let slot = match slots.admit(src.ip()) {
            Ok(slot) => slot,
            Err(limit) => {
                debug!(%src, limit = limit.as_str(), "DNS TCP connections at their cap, all busy; closing the new one");
                continue;
            }
        };
        let (handler, shutdown) = (handler.clone(), shutdown.clone());
        let idle = slots.limits().idle;
        tracker.spawn(async move {
            let span = tracing::debug_span!("dns_tcp", %src);
            let served = tcp_connection(stream, src, &*handler, &slot, idle).instrument(span);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = slot.closed() => debug!(%src, "idle DNS TCP connection closed to make room"),
                _ = served => {}
            }
        });
    }
}

/// Waits for the client (a read or a write) at most `idle`, counting a timeout.
async fn client_io<T>(idle: Duration, io: impl Future<Output = io::Result<T>>) -> Option<T> {
    match tokio::time::timeout(idle, io).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(_)) => None,
        Err(_) => {
            record_limit(Limit::TcpIdle);
            None
        }
    }
}

/// Serves length-prefixed queries on one connection, one after the other, until the client
/// closes, sends garbage, or keeps the connection waiting for `idle`.
async fn tcp_connection<H: RequestHandler>(
    mut stream: TcpStream,
    src: SocketAddr,
    handler: &H,
    slot: &Slot,
    idle: Duration,
) {
    let mut buf = Vec::new();
    loop {
        slot.waiting();
        let Some(len) = client_io(idle, stream.read_u16()).await else {
            return;
        };
        // No query is that long; a client announcing more is not speaking DNS.
        if usize::from(len) > MAX_QUERY {
            record_limit(Limit::MessageSize);
            return;
        }
        buf.resize(usize::from(len), 0);
        if client_io(idle, stream.read_exact(&mut buf)).await.is_none() {
            return;
        }
        slot.busy();
        let started = Instant::now();
        let reply = match classify(&buf, src, Protocol::Tcp) {
            Incoming::Ignore => return,
            Incoming::Reject(reply, code) => {
                record_rejected(code, started);
                reply
            }
            Incoming::Query(request) => match answer(handler, &request).await {
                Some(reply) => reply,
                None => return,
            },
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        slot.waiting();
        if client_io(idle, stream.write_all(&framed)).await.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{ClusterIndex, DnsHandler, Forwarder};
    use edgehub::model::{Kind, Object};
    use edgehub::view::MeshView;
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    /// A server on loopback whose zone has `hello` (cluster IP) and `many` (headless, 200
    /// endpoints), and no upstreams.
    async fn server(limits: TcpLimits) -> (SocketAddr, CancellationToken) {
        let mut view = MeshView::default();
        let svc = |name: &str, ip: &str| {
            Object::from_json(Kind::Service, &format!(
                r#"{{"metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"clusterIP":"{ip}","ports":[{{"name":"http","port":80}}]}}}}"#
            ))
            .expect("service")
        };
        view.put(svc("hello", "10.96.0.10"));
        view.put(svc("many", "None"));
        let addrs: Vec<String> = (0..200)
            .map(|i| format!(r#"{{"ip":"10.1.{}.{}"}}"#, i / 250, i % 250 + 1))
            .collect();
        let eps = format!(
            r#"{{"metadata":{{"name":"many","namespace":"default"}},"subsets":[{{"addresses":[{}],"ports":[{{"name":"http","port":8080}}]}}]}}"#,
            addrs.join(",")
        );
        view.put(Object::from_json(Kind::Endpoints, &eps).expect("eps"));
        let index = ClusterIndex::new("cluster.local", "10.96.0.0/12".parse().unwrap(), 5).unwrap();
        index.update(&view);
        let handler = DnsHandler::new(
            Arc::new(index),
            Forwarder::new(Vec::new(), Duration::from_secs(1), 0),
        );
        let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let tcp = {
            // The same port for TCP.
            drop(tcp);
            TcpListener::bind(udp_addr).await.unwrap()
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        serve(Arc::new(handler), udp, tcp, 2, limits, &shutdown, &tracker);
        (udp_addr, shutdown)
    }

    fn query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    async fn udp_exchange(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(bytes, server).await.unwrap();
        let mut buf = vec![0u8; 65535];
        match tokio::time::timeout(Duration::from_millis(500), s.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    async fn tcp_exchange(server: SocketAddr, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(server).await.unwrap();
        s.write_all(&(bytes.len() as u16).to_be_bytes())
            .await
            .unwrap();
        s.write_all(bytes).await.unwrap();
        let len = s.read_u16().await.unwrap();
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn answers_truncates_over_udp_completes_over_tcp_and_survives_garbage() {
        let (addr, shutdown) = server(TcpLimits::default()).await;
        let q = query("HELLO.default.svc.cluster.local.", RecordType::A, true);
        let r = Message::from_vec(&udp_exchange(addr, &q).await.expect("answer")).unwrap();
        assert_eq!(r.answers.len(), 1);
        assert!(r.metadata.authoritative);
        assert!(r.edns.is_some(), "EDNS answered with EDNS");
        // The question comes back as it was asked.
        assert_eq!(
            r.queries[0].name().to_string(),
            "HELLO.default.svc.cluster.local."
        );

        let q = query("many.default.svc.cluster.local.", RecordType::A, true);
        let raw = udp_exchange(addr, &q).await.expect("answer");
        assert!(raw.len() <= usize::from(UDP_PAYLOAD));
        let r = Message::from_vec(&raw).unwrap();
        assert!(r.metadata.truncation);
        assert!(r.answers.is_empty());
        assert_eq!(r.edns.map(|e| e.max_payload()), Some(UDP_PAYLOAD));
        let r = Message::from_vec(&tcp_exchange(addr, &q).await).unwrap();
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 200);
        // Without EDNS the limit is 512 bytes.
        let q = query(
            "_http._tcp.many.default.svc.cluster.local.",
            RecordType::SRV,
            false,
        );
        let raw = udp_exchange(addr, &q).await.expect("answer");
        assert!(raw.len() <= 512);
        assert!(Message::from_vec(&raw).unwrap().metadata.truncation);

        // Garbage: short packets and responses are ignored, the rest gets FORMERR.
        assert!(udp_exchange(addr, &[1, 2, 3]).await.is_none());
        let mut response = q.clone();
        response[2] |= 0x80;
        assert!(udp_exchange(addr, &response).await.is_none());
        for cut in [13, 20, q.len() - 1] {
            let raw = udp_exchange(addr, &q[..cut]).await.expect("formerr");
            assert_eq!(raw.len(), 12);
            assert_eq!(raw[3] & 0x0f, 1, "FORMERR");
            assert_eq!(raw[..2], q[..2], "same id");
        }
        let mut huge_label = q[..12].to_vec();
        huge_label.extend_from_slice(&[0x3f; 300]);
        let raw = udp_exchange(addr, &huge_label).await.expect("formerr");
        assert_eq!(raw[3] & 0x0f, 1);
        // No upstreams: other names are refused.
        let q = query("example.com.", RecordType::A, false);
        let r = Message::from_vec(&udp_exchange(addr, &q).await.expect("answer")).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        // Still serving.
        let q = query("hello.default.svc.cluster.local.", RecordType::A, false);
        assert!(udp_exchange(addr, &q).await.is_some());
        shutdown.cancel();
    }

    /// Whether the server closed `s` (EOF or reset) within a moment.
    async fn is_closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn idle_tcp_connections_make_room_and_are_closed_while_udp_answers() {
        let limits = TcpLimits {
            idle: Duration::from_millis(800),
            per_client: 8,
            total: 12,
        };
        let (addr, shutdown) = server(limits).await;
        let q = query("hello.default.svc.cluster.local.", RecordType::A, false);
        // One client holds far more idle connections than it may.
        let mut idle = Vec::new();
        for _ in 0..30 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // A query over TCP from the same client is still answered, and so is UDP.
        let r = Message::from_vec(&tcp_exchange(addr, &q).await).unwrap();
        assert_eq!(r.answers.len(), 1);
        assert!(udp_exchange(addr, &q).await.is_some());
        let mut closed = 0;
        for s in &mut idle {
            closed += usize::from(is_closed(s).await);
        }
        assert!(closed >= 30 + 1 - 8, "{closed} of 30 closed");
        // Another client (another loopback address) has room of its own.
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = other.connect(addr).await.unwrap();
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let len = s.read_u16().await.unwrap();
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).await.unwrap();
        // Then every connection left waiting is closed after the idle time.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for s in idle.iter_mut().chain(std::iter::once(&mut s)) {
            assert!(is_closed(s).await, "an idle connection stayed open");
        }
        // A message longer than any query closes the connection at once.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&60000u16.to_be_bytes()).await.unwrap();
        assert!(is_closed(&mut s).await);
        shutdown.cancel();
    }
}
