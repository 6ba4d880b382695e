//! Direct paths to peers: one QUIC connection per peer over the node's direct-path socket,
//! formed when a call first needs one, kept alive while it answers, given up when it goes
//! silent, formed again on the next call.
//!
//! - **Forming.** A call to a peer with no path starts one in the background and takes the
//!   relay ([`DirectPaths::open`] answers `NoPath`), so no call waits for a path. The node asks
//!   the peer through the cloud to dial it at the same time (`query punch`), so both NATs open
//!   a mapping towards the other (hole punching); it dials the peer's host candidates at once
//!   and the others a moment later, so a LAN path wins when there is one. Without the cloud,
//!   LAN peers are dialled from the peer book alone. A round that fails is tried again after
//!   1, 2, 4 ... 30 s, and at once when the peer's candidates change or it dials this node.
//! - **Who may.** Only peers of a common Community, both ways: this node dials only peers its
//!   view allows, and closes paths from others. TLS authenticates both ends with node
//!   certificates ([`super::quic`]).
//! - **Two paths to one peer.** Dialled from both ends at once: both ends keep the one dialled
//!   by the node with the smaller name; the other serves the streams it has and is closed once
//!   they end ([`admit`]). Two of one direction (two candidates answered, or the peer
//!   restarted): both stay, streams take the newer, and the dialler drops the one it does not
//!   use; no end closes one for the other, so they can never both close the one the other
//!   kept.
//! - **Streams.** A stream opens with the tunnel's open request and answer; the receiving
//!   side names the source from the peer's certificate and checks the request like a relayed
//!   one ([`DirectAcceptor`]). An open that gets no answer within [`OPEN_TIMEOUT`] fails over
//!   to the relay, and the path takes no new streams until it has proved alive again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument};

use super::quic::{self, code, DirectStream, StreamCount};
use super::socket::DirectSocket;
use super::DirectAgent;
use crate::identity::verify::PeerVerifier;
use crate::message::{Candidate, CandidateKind};
use crate::tunnel::{OpenError, OpenRefusal, OpenRequest, OpenResponse, RefusalKind};
use crate::view::MeshView;

/// How long a stream open over a direct path may take before the call takes the relay.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one dial of a candidate may take: QUIC sends its first packet again after about
/// 0.3, 0.9 and 2.1 s (initial RTT 100 ms, doubling), and a peer punching from behind its NAT
/// is heard after its own first packet; the handshake then needs a round trip more.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often peers that calls want are looked at for a path to form again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Non-host candidates are dialled this long after the host ones, so a LAN path wins.
const LAN_HEAD_START: Duration = Duration::from_millis(100);
/// Waits between failed rounds, doubling up to the last.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A path closed for being a duplicate is looked at this often until its streams ended.
const RETIRE_CHECK: Duration = Duration::from_secs(1);
/// How often per-peer metrics are refreshed and idle paths looked for.
const METRICS_EVERY: Duration = Duration::from_secs(5);
/// A path that carried no stream for this long is closed (its keepalives cost both ends
/// something every 2 s); the next call forms it again.
const PATH_IDLE: Duration = Duration::from_secs(600);

/// Takes the streams peers open over direct paths (the receiving side's checks, then serving).
pub trait DirectAcceptor: Send + Sync + 'static {
    fn incoming(&self, arrival: DirectArrival);
}

/// A stream a peer opened over a direct path, waiting for this side's answer. `request.source`
/// is the peer the path authenticated, whatever the request said.
pub struct DirectArrival {
    pub request: OpenRequest,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    count: StreamCount,
}

impl DirectArrival {
    /// Accepts the stream: answers the opener and hands over the bytes.
    pub async fn accept(mut self) -> Result<DirectStream, OpenRefusal> {
        let answer = OpenResponse {
            stream: 0,
            window: 0,
            error: None,
        };
        quic::write_frame(&mut self.send, &answer)
            .await
            .map_err(|e| OpenRefusal {
                kind: RefusalKind::Unreachable,
                message: format!("the opener went away: {e}"),
            })?;
        Ok(DirectStream::new(self.send, self.recv, self.count))
    }

    /// Refuses the stream with `kind`, and ends it.
    pub async fn refuse(mut self, kind: RefusalKind, message: &str) {
        let answer = OpenResponse {
            stream: 0,
            window: 0,
            error: Some(OpenRefusal {
                kind,
                message: message.to_string(),
            }),
        };
        if quic::write_frame(&mut self.send, &answer).await.is_ok() {
            let _ = self.send.finish();
            // Let the answer leave before the stream is dropped.
            let _ = tokio::time::timeout(OPEN_TIMEOUT, self.send.stopped()).await;
        }
    }
}

/// What opening a stream over a direct path came to.
pub enum DirectOpen {
    /// The stream is open.
    Opened(DirectStream),
    /// The receiving side answered with a refusal (the same answer the relay would bring).
    Refused(OpenError),
    /// There is no live path (one may be forming): take the relay.
    NoPath,
    /// The path did not carry the open: take the relay.
    Failed(String),
}

/// One connection to a peer.
#[derive(Clone)]
struct Path {
    conn: quinn::Connection,
    /// This node dialled it.
    outgoing: bool,
    streams: Arc<AtomicUsize>,
    /// Order of installation: the newest of a direction takes new streams.
    seq: u64,
    since: std::time::SystemTime,
    /// When a stream last opened or ended on it (milliseconds of [`DirectPaths::clock`]).
    used: Arc<std::sync::atomic::AtomicU64>,
    /// Until then the path takes no new streams (an open over it got no answer).
    suspect_until: Option<Instant>,
}

#[derive(Default)]
struct Peer {
    /// Live connections to the peer (more than one only for a moment: see [`admit`]).
    paths: Vec<Path>,
    forming: bool,
    failures: u32,
    next_try: Option<Instant>,
    last_error: Option<String>,
    /// Whether a path is up: relayed connections to the peer check it to move to the path.
    up: Arc<AtomicBool>,
    /// Bytes of the peer's closed connections (the live one's come from its statistics).
    closed_tx: u64,
    closed_rx: u64,
    /// Streams opened over the path, and calls that failed over to the relay.
    opened: u64,
    fell_back: u64,
    /// When a call last wanted the peer: while that is recent, a lost or failed path is
    /// formed again in the background, also when the calls ride kept connections.
    wanted: Option<Instant>,
}

impl Peer {
    fn live(&self) -> impl Iterator<Item = &Path> {
        self.paths
            .iter()
            .filter(|p| p.conn.close_reason().is_none())
    }

    /// The path new streams take: live and not suspect; the preferred direction first (the
    /// one both ends keep), then the newest.
    fn usable(&self, prefer_outgoing: bool) -> Option<&Path> {
        let now = Instant::now();
        self.live()
            .filter(|p| p.suspect_until.is_none_or(|t| now >= t))
            .max_by_key(|p| (p.outgoing == prefer_outgoing, p.seq))
    }

    fn by_id(&mut self, id: usize) -> Option<&mut Path> {
        self.paths.iter_mut().find(|p| p.conn.stable_id() == id)
    }
}

/// What becomes of a new live path to a peer, given whether the node has one of the preferred
/// direction (dialled by the node with the smaller name) already. Both ends apply it, so
/// both keep the same connection of two dialled at once, whichever came up first on either
/// side. Paths of the same direction all stay (the dialler drops the dials it does not use,
/// and a newer one means the peer lost the older, e.g. it restarted); streams take the
/// newest.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Kept, and the paths of the other direction are retired.
    KeepRetireOthers,
    /// Kept beside the others.
    Keep,
    /// Retired at once (a path of the preferred direction is up).
    Retire,
}

fn admit(prefer_outgoing: bool, have_preferred: bool, new_outgoing: bool) -> Admit {
    if new_outgoing == prefer_outgoing {
        Admit::KeepRetireOthers
    } else if have_preferred {
        Admit::Retire
    } else {
        Admit::Keep
    }
}

/// What `/debug/direct` and `edgemesh status` show of a peer.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathStatus {
    pub peer: String,
    /// `direct` while a path is up, else `relay`.
    pub path: &'static str,
    /// The peer's address the path uses.
    pub candidate: Option<SocketAddr>,
    pub outgoing: Option<bool>,
    pub rtt_ms: Option<f64>,
    pub streams: usize,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub since_unix_ms: Option<i64>,
    pub streams_opened: u64,
    pub fallbacks: u64,
    pub failed_rounds: u32,
    pub last_error: Option<String>,
}

/// The node's direct paths.
pub struct DirectPaths {
    here: String,
    agent: Arc<DirectAgent>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    verifier: Arc<PeerVerifier>,
    view: watch::Receiver<Arc<MeshView>>,
    acceptor: Arc<dyn DirectAcceptor>,
    peers: Mutex<HashMap<String, Peer>>,
    /// Bumped whenever a path comes up (for calls waiting on one while the relay is down).
    installed: watch::Sender<u64>,
    next_seq: std::sync::atomic::AtomicU64,
    started: Instant,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl DirectPaths {
    /// Starts the QUIC endpoint on the agent's direct-path socket. `None` when the agent has
    /// no socket (`direct.enabled = false`).
    pub fn start(
        agent: Arc<DirectAgent>,
        view: watch::Receiver<Arc<MeshView>>,
        acceptor: Arc<dyn DirectAcceptor>,
        max_streams: u32,
        shutdown: CancellationToken,
    ) -> std::io::Result<Option<Arc<DirectPaths>>> {
        let Some(socket) = agent.quic_socket() else {
            return Ok(None);
        };
        let verifier = Arc::new(PeerVerifier::new(agent.identity().clone(), view.clone()));
        let configs = quic::configs(agent.identity().clone(), verifier.clone(), max_streams)
            .map_err(std::io::Error::other)?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(configs.server),
            socket as Arc<DirectSocket>,
            Arc::new(quinn::TokioRuntime),
        )?;
        let paths = Arc::new(DirectPaths {
            here: agent.identity().node().to_string(),
            agent: agent.clone(),
            endpoint,
            client: configs.client,
            verifier,
            view,
            acceptor,
            peers: Mutex::new(HashMap::new()),
            installed: watch::Sender::new(0),
            next_seq: std::sync::atomic::AtomicU64::new(0),
            started: Instant::now(),
            tasks: TaskTracker::new(),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(paths.clone().accept_loop());
        tokio::spawn(paths.clone().follow(agent.take_punches()));
        Ok(Some(paths))
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<String, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node may form a direct path with `peer` now.
    fn allowed(&self, peer: &str) -> bool {
        peer != self.here && super::may_connect(&self.view.borrow(), &self.here, peer)
    }

    /// The flag relayed connections to `peer` watch: set while a direct path is up.
    pub fn path_flag(&self, peer: &str) -> Arc<AtomicBool> {
        self.peers().entry(peer.to_string()).or_default().up.clone()
    }

    /// Opens a stream to `peer` over its direct path; without a live one, starts forming it.
    pub async fn open(self: &Arc<Self>, peer: &str, mut request: OpenRequest) -> DirectOpen {
        let path = {
            let mut peers = self.peers();
            let p = match peers.get_mut(peer) {
                Some(p) => p,
                None => peers.entry(peer.to_string()).or_default(),
            };
            p.wanted = Some(Instant::now());
            p.usable(self.prefer_outgoing(peer)).cloned()
        };
        let Some(path) = path else {
            self.want(peer, false);
            return DirectOpen::NoPath;
        };
        request.stream = 0;
        request.window = 0;
        request.source = String::new();
        let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
            let (mut send, mut recv) = path.conn.open_bi().await.map_err(|e| e.to_string())?;
            let count = StreamCount::start(&path.streams);
            path.used.store(self.clock(), Ordering::Relaxed);
            quic::write_frame(&mut send, &request)
                .await
                .map_err(|e| e.to_string())?;
            let answer: OpenResponse = quic::read_frame(&mut recv)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((send, recv, count, answer))
        })
        .await;
        let mut peers = self.peers();
        let p = peers.entry(peer.to_string()).or_default();
        let mut suspect = false;
        let result = match opened {
            Ok(Ok((send, recv, count, answer))) => {
                if let Some(used) = p.by_id(path.conn.stable_id()) {
                    used.suspect_until = None;
                }
                p.up.store(true, Ordering::Relaxed);
                match answer.error {
                    None => {
                        p.opened += 1;
                        metrics::counter!("edgemesh_direct_streams_total", "path" => "direct")
                            .increment(1);
                        DirectOpen::Opened(
                            DirectStream::new(send, recv, count).with_alive(p.up.clone()),
                        )
                    }
                    Some(r) => DirectOpen::Refused(OpenError::Refused {
                        kind: r.kind,
                        message: r.message,
                    }),
                }
            }
            Ok(Err(e)) => {
                p.fell_back += 1;
                DirectOpen::Failed(e)
            }
            Err(_) => {
                p.fell_back += 1;
                if let Some(failed) = p.by_id(path.conn.stable_id()) {
                    // A cut path is closed by QUIC within its idle timeout; until then, or
                    // until a stream gets through, new calls take the relay at once, kept
                    // streams over it are not reused, and a new path is tried.
                    failed.suspect_until = Some(Instant::now() + quic::IDLE_TIMEOUT);
                    if p.usable(self.prefer_outgoing(peer)).is_none() {
                        p.up.store(false, Ordering::Relaxed);
                        suspect = true;
                    }
                }
                DirectOpen::Failed(format!("no answer within {OPEN_TIMEOUT:?}"))
            }
        };
        drop(peers);
        if suspect {
            self.want(peer, true);
        }
        result
    }

    /// Forms again, in the background, the paths of peers that calls wanted recently and
    /// that have none (lost, cut, or never formed), as their back-off allows.
    fn retry_wanted(self: &Arc<Self>) {
        let now = Instant::now();
        let book = self.agent.peers().get();
        let due: Vec<String> = self
            .peers()
            .iter()
            .filter(|(name, p)| {
                book.peers.contains_key(*name)
                    && p.usable(self.prefer_outgoing(name)).is_none()
                    && !p.forming
                    && p.wanted.is_some_and(|w| now.duration_since(w) < PATH_IDLE)
                    && p.next_try.is_none_or(|t| now >= t)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for peer in due {
            self.want(&peer, false);
        }
    }

    /// Starts forming a path to `peer` unless one is up or forming, it is not allowed, or its
    /// last round failed too recently (`now`: the peer asked, or its candidates changed).
    fn want(self: &Arc<Self>, peer: &str, now: bool) {
        // The peer book holds only peers the cloud said may connect: most calls (to nodes of
        // no common Community) end at this lookup.
        let book = self.agent.peers().get();
        if !book.peers.contains_key(peer) || self.shutdown.is_cancelled() || !self.allowed(peer) {
            return;
        }
        {
            let mut peers = self.peers();
            let p = peers.entry(peer.to_string()).or_default();
            let live = p.live().next().is_some();
            if p.forming || p.usable(self.prefer_outgoing(peer)).is_some() || (live && !now) {
                return;
            }
            if !now && p.next_try.is_some_and(|t| Instant::now() < t) {
                return;
            }
            p.forming = true;
        }
        let candidates = book.peers.get(peer).cloned().unwrap_or_default();
        let paths = self.clone();
        let peer = peer.to_string();
        let span = tracing::debug_span!("direct_path", %peer);
        self.tasks.spawn(
            async move {
                let result = paths.form(&peer, candidates).await;
                paths.formed(&peer, result);
            }
            .instrument(span),
        );
    }

    /// One round: ask the peer (through the cloud) to dial this node, and dial its
    /// candidates, host ones first. The first path up wins.
    async fn form(self: &Arc<Self>, peer: &str, candidates: Vec<Candidate>) -> Result<(), String> {
        let started = Instant::now();
        self.agent.request_punch(peer);
        let local = self.endpoint.local_addr().map_err(|e| e.to_string())?;
        let usable: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| c.address.is_ipv4() == local.is_ipv4() || local.is_ipv6())
            .collect();
        if usable.is_empty() {
            return Err("no candidate of the direct socket's address family".into());
        }
        let mut dials = tokio::task::JoinSet::new();
        for c in usable {
            let connecting = self
                .endpoint
                .connect_with(self.client.clone(), c.address, peer)
                .map_err(|e| format!("dial {}: {e}", c.address))?;
            let delay = if c.kind == CandidateKind::Host {
                Duration::ZERO
            } else {
                LAN_HEAD_START
            };
            let address = c.address;
            dials.spawn(async move {
                tokio::time::sleep(delay).await;
                match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                    Ok(Ok(conn)) => Ok(conn),
                    Ok(Err(e)) => Err(format!("{address}: {e}")),
                    Err(_) => Err(format!("{address}: no answer within {DIAL_TIMEOUT:?}")),
                }
            });
        }
        let mut errors = Vec::new();
        while let Some(joined) = dials.join_next().await {
            match joined {
                Ok(Ok(conn)) => {
                    info!(
                        remote = %conn.remote_address(),
                        ms = started.elapsed().as_millis() as u64,
                        "direct path up (dialled)"
                    );
                    // The others are dropped with the set (their connections close).
                    self.install(peer, conn, true);
                    return Ok(());
                }
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(e.to_string()),
            }
            if self.has_live_path(peer) {
                // The peer's dial won meanwhile.
                return Ok(());
            }
        }
        if self.has_live_path(peer) {
            return Ok(());
        }
        Err(errors.join("; "))
    }

    /// Waits up to `timeout` for a path to `peer` (one forming, or that the peer forms),
    /// starting one if none is: for calls that have no relay to take (the cloud is down).
    pub async fn wait_path(self: &Arc<Self>, peer: &str, timeout: Duration) -> bool {
        let mut installed = self.installed.subscribe();
        self.want(peer, false);
        let deadline = Instant::now() + timeout;
        loop {
            if self.has_live_path(peer) {
                return true;
            }
            let forming = self.peers().get(peer).is_some_and(|p| p.forming);
            if !forming {
                return false;
            }
            match tokio::time::timeout_at(deadline, installed.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.has_live_path(peer),
            }
        }
    }

    fn has_live_path(&self, peer: &str) -> bool {
        self.peers()
            .get(peer)
            .is_some_and(|p| p.usable(self.prefer_outgoing(peer)).is_some())
    }

    /// Whether, of two paths to `peer`, both ends keep the one this node dialled.
    fn prefer_outgoing(&self, peer: &str) -> bool {
        self.here.as_str() < peer
    }

    fn formed(&self, peer: &str, result: Result<(), String>) {
        let mut peers = self.peers();
        let p = peers.entry(peer.to_string()).or_default();
        p.forming = false;
        match result {
            Ok(()) => {
                p.failures = 0;
                p.next_try = None;
                p.last_error = None;
            }
            Err(e) => {
                p.failures = p.failures.saturating_add(1);
                let wait = RETRY_FIRST
                    .saturating_mul(1 << (p.failures - 1).min(5))
                    .min(RETRY_MAX);
                p.next_try = Some(Instant::now() + wait);
                debug!(error = %e, retry_in = ?wait, "no direct path; calls take the relay");
                p.last_error = Some(e);
                metrics::counter!("edgemesh_direct_failed_rounds_total").increment(1);
            }
        }
    }

    /// Makes `conn` the peer's path, or keeps the one it has (see the module's rule on
    /// duplicates), and serves the streams the peer opens on it either way.
    fn install(self: &Arc<Self>, peer: &str, conn: quinn::Connection, outgoing: bool) {
        let path = Path {
            conn: conn.clone(),
            outgoing,
            streams: Arc::new(AtomicUsize::new(0)),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            since: std::time::SystemTime::now(),
            used: Arc::new(std::sync::atomic::AtomicU64::new(self.clock())),
            suspect_until: None,
        };
        let prefer = self.prefer_outgoing(peer);
        let retired: Vec<Path> = {
            let mut peers = self.peers();
            let p = peers.entry(peer.to_string()).or_default();
            p.paths.retain(|old| old.conn.close_reason().is_none());
            let have_preferred = p.paths.iter().any(|old| old.outgoing == prefer);
            let mut retired = Vec::new();
            match admit(prefer, have_preferred, outgoing) {
                Admit::Retire => retired.push(path.clone()),
                verdict => {
                    if verdict == Admit::KeepRetireOthers {
                        let (keep, others) = std::mem::take(&mut p.paths)
                            .into_iter()
                            .partition(|old| old.outgoing == prefer);
                        p.paths = keep;
                        retired = others;
                    }
                    p.paths.push(path.clone());
                    p.failures = 0;
                    p.next_try = None;
                    p.last_error = None;
                    p.up.store(true, Ordering::Relaxed);
                }
            }
            retired
        };
        metrics::gauge!("edgemesh_direct_paths").set(self.live_paths() as f64);
        self.installed.send_modify(|n| *n += 1);
        self.tasks
            .spawn(self.clone().serve_path(peer.to_string(), path));
        for r in retired {
            self.tasks.spawn(retire(r, self.shutdown.clone()));
        }
    }

    fn live_paths(&self) -> usize {
        self.peers()
            .values()
            .filter(|p| p.live().next().is_some())
            .count()
    }

    /// Serves the streams the peer opens on `path` until it closes; then forgets it.
    async fn serve_path(self: Arc<Self>, peer: String, path: Path) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                accepted = path.conn.accept_bi() => accepted,
            };
            let (send, recv) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, reason = %e, "direct path closed");
                    break;
                }
            };
            let count = StreamCount::start(&path.streams);
            path.used.store(self.clock(), Ordering::Relaxed);
            let (acceptor, peer) = (self.acceptor.clone(), peer.clone());
            self.tasks.spawn(async move {
                let mut recv = recv;
                let request: OpenRequest =
                    match tokio::time::timeout(OPEN_TIMEOUT * 5, quic::read_frame(&mut recv)).await
                    {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "malformed open on a direct path");
                            return;
                        }
                        Err(_) => return,
                    };
                let mut request: OpenRequest = request;
                // The path says who opened it; the request does not.
                request.source = peer;
                acceptor.incoming(DirectArrival {
                    request,
                    send,
                    recv,
                    count,
                });
            });
        }
        let mut peers = self.peers();
        if let Some(p) = peers.get_mut(&peer) {
            let stats = path.conn.stats();
            p.closed_tx += stats.udp_tx.bytes;
            p.closed_rx += stats.udp_rx.bytes;
            let id = path.conn.stable_id();
            let listed = p.paths.iter().any(|x| x.conn.stable_id() == id);
            p.paths.retain(|x| x.conn.stable_id() != id);
            if listed && p.live().next().is_none() {
                p.up.store(false, Ordering::Relaxed);
                // Formed again at once if calls still want the peer (see `retry_wanted`).
                p.next_try = None;
                info!(%peer, "direct path lost; calls take the relay");
            }
        }
        drop(peers);
        metrics::gauge!("edgemesh_direct_paths").set(self.live_paths() as f64);
    }

    /// Accepts paths peers dial, keeping those from peers this node may connect to.
    async fn accept_loop(self: Arc<Self>) {
        loop {
            let incoming = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => incoming,
            };
            let Some(incoming) = incoming else { break };
            let paths = self.clone();
            self.tasks.spawn(async move {
                let remote = incoming.remote_address();
                let conn = match tokio::time::timeout(DIAL_TIMEOUT, async { incoming.await }).await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        debug!(%remote, error = %e, "direct handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let Some(peer) = paths.peer_of(&conn) else {
                    conn.close(code::NOT_ALLOWED, b"unknown peer");
                    return;
                };
                if !paths.allowed(&peer) {
                    debug!(%peer, %remote, "refused a direct path: no common community");
                    conn.close(code::NOT_ALLOWED, b"no common community");
                    return;
                }
                info!(%peer, %remote, "direct path up (accepted)");
                paths.install(&peer, conn, false);
            });
        }
        self.endpoint.close(code::SHUTDOWN, b"node shutting down");
    }

    /// The node the path's certificate belongs to (the handshake checked it already).
    fn peer_of(&self, conn: &quinn::Connection) -> Option<String> {
        let certs = conn
            .peer_identity()?
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()?;
        let end_entity = certs.first()?;
        self.verifier
            .verify(
                end_entity,
                &certs[1..],
                None,
                rustls::pki_types::UnixTime::now(),
            )
            .ok()
    }

    /// Closes the paths of peers this node may no longer connect to (a Community changed) or
    /// whose certificate is no longer theirs (re-joined, deleted): revocation reaches live
    /// paths, not only new ones.
    fn recheck(&self) {
        let live: Vec<(String, quinn::Connection)> = self
            .peers()
            .iter()
            .flat_map(|(name, p)| p.live().map(|path| (name.clone(), path.conn.clone())))
            .collect();
        for (peer, conn) in live {
            if !self.allowed(&peer) || self.peer_of(&conn).as_deref() != Some(peer.as_str()) {
                info!(%peer, "closing the direct path: the peer may no longer connect");
                conn.close(code::NOT_ALLOWED, b"no longer allowed");
            }
        }
    }

    /// Milliseconds since this node's paths started: when paths were last used.
    fn clock(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Closes paths that carried no stream for [`PATH_IDLE`] and carry none now.
    fn close_idle(&self) {
        let now = self.clock();
        for (peer, path) in self
            .peers()
            .iter()
            .flat_map(|(peer, p)| p.live().map(move |path| (peer, path)))
        {
            let idle = now.saturating_sub(path.used.load(Ordering::Relaxed));
            if path.streams.load(Ordering::Relaxed) == 0
                && idle >= PATH_IDLE.as_millis() as u64
                && path.conn.close_reason().is_none()
            {
                info!(%peer, "closing an idle direct path");
                path.conn.close(code::IDLE, b"idle");
            }
        }
    }

    /// Punch requests from peers, changes of candidates and of the view, and per-peer
    /// metrics.
    async fn follow(self: Arc<Self>, mut punches: mpsc::UnboundedReceiver<String>) {
        let mut view = self.view.clone();
        let mut book = self.agent.peers().subscribe();
        let mut seen = book.borrow().clone();
        let mut tick = tokio::time::interval(METRICS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(peer) = punches.recv() => {
                    debug!(%peer, "the peer asks for a direct path");
                    self.want(&peer, true);
                }
                changed = book.changed() => {
                    if changed.is_err() { break; }
                    let now = book.borrow_and_update().clone();
                    for (peer, list) in &now.peers {
                        if seen.peers.get(peer) != Some(list) {
                            let mut peers = self.peers();
                            if let Some(p) = peers.get_mut(peer) {
                                // New candidates: the next call tries at once.
                                p.next_try = None;
                            }
                        }
                    }
                    seen = now;
                }
                changed = view.changed() => {
                    if changed.is_err() { break; }
                    self.recheck();
                }
                _ = tick.tick() => {
                    self.export_metrics();
                    self.close_idle();
                }
                _ = retry.tick() => self.retry_wanted(),
            }
        }
        self.tasks.close();
    }

    fn export_metrics(&self) {
        // Only peers this node has had to do with: a large Community adds no series.
        for s in self.status_of(false) {
            let peer = s.peer.clone();
            metrics::gauge!("edgemesh_direct_path_up", "peer" => peer.clone())
                .set(if s.path == "direct" { 1.0 } else { 0.0 });
            if let Some(rtt) = s.rtt_ms {
                metrics::gauge!("edgemesh_direct_path_rtt_seconds", "peer" => peer.clone())
                    .set(rtt / 1000.0);
            }
            metrics::counter!("edgemesh_direct_path_bytes_total", "peer" => peer.clone(), "direction" => "tx")
                .absolute(s.tx_bytes);
            metrics::counter!("edgemesh_direct_path_bytes_total", "peer" => peer, "direction" => "rx")
                .absolute(s.rx_bytes);
        }
    }

    /// Every peer this node has called or been called by over a direct path, or may connect to.
    pub fn status(&self) -> Vec<PathStatus> {
        self.status_of(true)
    }

    /// With `all`, also the peers this node may connect to but has not called.
    fn status_of(&self, all: bool) -> Vec<PathStatus> {
        let book = self.agent.peers().get();
        let never = Peer::default();
        let peers = self.peers();
        let untouched: Vec<&String> = if all {
            book.peers
                .keys()
                .filter(|n| !peers.contains_key(*n) && self.allowed(n))
                .collect()
        } else {
            Vec::new()
        };
        let mut out: Vec<PathStatus> = peers
            .iter()
            .chain(untouched.into_iter().map(|n| (n, &never)))
            .map(|(name, p)| {
                let live = p.usable(self.prefer_outgoing(name));
                // Bytes of every live path (a duplicate's too) and of the closed ones.
                let (tx, rx) = p.live().fold((p.closed_tx, p.closed_rx), |(tx, rx), path| {
                    let s = path.conn.stats();
                    (tx + s.udp_tx.bytes, rx + s.udp_rx.bytes)
                });
                PathStatus {
                    peer: name.clone(),
                    path: if live.is_some() && p.up.load(Ordering::Relaxed) {
                        "direct"
                    } else {
                        "relay"
                    },
                    candidate: live.map(|path| path.conn.remote_address()),
                    outgoing: live.map(|path| path.outgoing),
                    rtt_ms: live.map(|path| path.conn.rtt().as_secs_f64() * 1000.0),
                    streams: live.map_or(0, |path| path.streams.load(Ordering::Relaxed)),
                    tx_bytes: tx,
                    rx_bytes: rx,
                    since_unix_ms: live.and_then(|path| {
                        path.since
                            .duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_millis() as i64)
                    }),
                    streams_opened: p.opened,
                    fallbacks: p.fell_back,
                    failed_rounds: p.failures,
                    last_error: p.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// Closes every path and waits (briefly) for the peers to be told.
    pub async fn close(&self) {
        self.endpoint.close(code::SHUTDOWN, b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Closes a duplicate path once the streams it carries have ended.
async fn retire(path: Path, shutdown: CancellationToken) {
    loop {
        if path.streams.load(Ordering::Relaxed) == 0 || path.conn.close_reason().is_some() {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RETIRE_CHECK) => {}
        }
    }
    path.conn.close(code::DUPLICATE, b"duplicate path");
}

#[cfg(test)]
mod tests {
    use super::{admit, Admit};

    /// The paths a node holds after `arrivals` (each: this node dialled it), in order, as
    /// [`admit`] decides: `true` for a path this node dialled.
    fn kept(prefer_outgoing: bool, arrivals: &[bool]) -> Vec<bool> {
        let mut paths: Vec<bool> = Vec::new();
        for &new in arrivals {
            let have_preferred = paths.contains(&prefer_outgoing);
            match admit(prefer_outgoing, have_preferred, new) {
                Admit::Retire => {}
                Admit::Keep => paths.push(new),
                Admit::KeepRetireOthers => {
                    paths.retain(|&o| o == prefer_outgoing);
                    paths.push(new);
                }
            }
        }
        paths
    }

    /// Two paths dialled at once, one from each end: both ends keep the one "a" (the smaller
    /// name) dialled, whichever came up first on either side.
    #[test]
    fn both_ends_keep_the_path_the_smaller_name_dialled() {
        for a_first in [true, false] {
            // At a, a's dial is outgoing (preferred); at b, a's dial is incoming.
            let at_a = if a_first {
                [true, false]
            } else {
                [false, true]
            };
            assert_eq!(kept(true, &at_a), vec![true], "at a, a's first: {a_first}");
            let at_b = if a_first {
                [false, true]
            } else {
                [true, false]
            };
            assert_eq!(
                kept(false, &at_b),
                vec![false],
                "at b, a's first: {a_first}"
            );
        }
    }

    /// Two dials of one direction (two candidates of the peer answered): neither end closes
    /// one for the other (the dialler drops the one it does not use), so they cannot end up
    /// closing both.
    #[test]
    fn paths_of_one_direction_are_all_kept() {
        assert_eq!(kept(true, &[true, true]), vec![true, true]);
        assert_eq!(kept(false, &[false, false]), vec![false, false]);
        // The preferred direction retires the other, and is not retired by it.
        assert_eq!(kept(false, &[true, true, false]), vec![false]);
    }
}
