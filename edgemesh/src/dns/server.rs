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
//! header or flagged as a response, it is dropped; otherwise unparsable, it gets FORMERR.

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
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::forward::UDP_PAYLOAD;
use super::handler::record_malformed;

/// DNS header length.
const HEADER: usize = 12;
/// Largest UDP query read; anything longer is cut and then fails to parse.
const UDP_BUFFER: usize = 4096;
/// TCP connections served at once; more are closed at once.
const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP connection with no complete query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

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
    /// Not parsable, but the header is: answer FORMERR with these bytes.
    Malformed(Vec<u8>),
    /// Too short, or a response: say nothing.
    Ignore,
}

fn classify(data: &[u8], src: SocketAddr, protocol: Protocol) -> Incoming {
    if data.len() < HEADER || data[2] & 0x80 != 0 {
        return Incoming::Ignore;
    }
    match Request::from_bytes(data.to_vec(), src, protocol) {
        Ok(request) => Incoming::Query(Box::new(request)),
        Err(_) => Incoming::Malformed(formerr(data)),
    }
}

/// A bare FORMERR for the query whose header is `data[..12]`: same ID, opcode and RD.
fn formerr(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER];
    out[0] = data[0];
    out[1] = data[1];
    out[2] = 0x80 | (data[2] & 0x79); // QR, opcode, RD
    out[3] = 0x01; // FORMERR
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

/// Serves `udp` and `tcp` with `handler` until `shutdown`; every task it starts is tracked by
/// `tracker`.
pub fn serve<H: RequestHandler>(
    handler: Arc<H>,
    udp: UdpSocket,
    tcp: TcpListener,
    workers: usize,
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
    let mut buf = vec![0u8; UDP_BUFFER];
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
            Incoming::Malformed(reply) => {
                record_malformed(started);
                let _ = socket.send_to(&reply, src).await;
            }
            Incoming::Query(request) => {
                let (socket, handler) = (socket.clone(), handler.clone());
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    let reply = shutdown
                        .run_until_cancelled(answer(&*handler, &request))
                        .await;
                    if let Some(Some(bytes)) = reply {
                        if let Err(e) = socket.send_to(&bytes, src).await {
                            debug!(%src, error = %e, "cannot send a DNS answer");
                        }
                    }
                });
            }
        }
    }
}

async fn tcp_acceptor<H: RequestHandler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, src) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait a little instead of spinning.
                warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%src, "too many DNS TCP connections; closing");
            continue;
        };
        let (handler, shutdown) = (handler.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _slot = slot;
            shutdown
                .run_until_cancelled(tcp_connection(stream, src, &*handler))
                .await;
        });
    }
}

/// Serves length-prefixed queries on one connection, one after the other, until the client
/// closes, sends garbage, or stays idle for [`TCP_IDLE`].
async fn tcp_connection<H: RequestHandler>(mut stream: TcpStream, src: SocketAddr, handler: &H) {
    let mut buf = Vec::new();
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return,
        };
        buf.resize(len, 0);
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let started = Instant::now();
        let reply = match classify(&buf, src, Protocol::Tcp) {
            Incoming::Ignore => return,
            Incoming::Malformed(reply) => {
                record_malformed(started);
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
        match tokio::time::timeout(TCP_IDLE, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}
