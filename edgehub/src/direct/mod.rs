//! The node's side of direct node-to-node paths that travels over the hub link: its
//! certificate (requested, installed, renewed, re-requested after a revocation), its
//! reflexive address (learned from cloudcore's UDP service), its candidates (published to the
//! cloud, which passes them only to peers in a common Community), and its peers' candidates
//! (kept in a [`peers::PeerBook`] on disk).
//!
//! The hub client knows nothing of this beyond three calls: [`DirectAgent::attach`] when a
//! session starts (messages to send come out of the returned queue), [`DirectAgent::on_message`]
//! for every message of group `direct`, and the end of the session (dropping the queue).
//! Everything else runs in [`DirectAgent::run`].

pub mod candidates;
pub mod paths;
pub mod peers;
pub mod quic;
pub mod reflect;
pub mod socket;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::client::SyncStatus;
use crate::identity::{Identity, Need};
use crate::message::{
    group, module, op, resource, Candidate, Candidates, CertificateAnswer, DirectSettings, Message,
    Punch, MAX_CANDIDATES,
};
use crate::model::NodeCertificate;
use crate::view::MeshView;
use peers::PeerBook;

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether nodes `a` and `b` may form a direct path by this view's Communities (both must be
/// known Nodes: a deleted node has no direct paths).
pub fn may_connect(view: &MeshView, a: &str, b: &str) -> bool {
    match (view.nodes.get(a), view.nodes.get(b)) {
        (Some(a), Some(b)) => {
            crate::model::may_connect(view.communities.values().map(|c| c.as_ref()), a, b)
        }
        _ => false,
    }
}

/// `direct.*` of the node's configuration.
#[derive(Clone, Debug)]
pub struct DirectConfig {
    /// Learn a reflexive address, publish candidates and form paths (`direct.enabled`).
    pub enabled: bool,
    /// The node's UDP port for direct paths (`direct.listen`).
    pub listen: SocketAddr,
    /// Operator-given candidates (`direct.advertise`).
    pub advertise: Vec<SocketAddr>,
}

/// What `/debug/direct` shows.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectStatus {
    pub node_name: String,
    pub enabled: bool,
    /// The bound direct-path socket.
    pub listen: Option<SocketAddr>,
    /// The certificate this node holds.
    pub certificate: Option<NodeCertificate>,
    pub certificate_requests: u64,
    pub last_certificate_error: Option<String>,
    pub reflexive: Option<SocketAddr>,
    pub reflexive_at_ms: Option<i64>,
    pub last_probe_error: Option<String>,
    /// Candidates as last published.
    pub candidates: Vec<Candidate>,
    pub enforce_communities: bool,
    /// Peers this node may connect to directly, with their candidates.
    pub peers: std::collections::BTreeMap<String, Vec<Candidate>>,
}

/// Receive and send buffers of the direct-path socket.
const SOCKET_BUFFER: usize = 4 << 20;
/// How often the reflexive address is learned again (a NAT may remap after idling).
const PROBE_EVERY: Duration = Duration::from_secs(300);
/// ... and how soon after a failed attempt.
const PROBE_RETRY: Duration = Duration::from_secs(20);
/// An unanswered certificate request is asked again after this long...
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// ... and a refused one after this long (the cloud takes one request per 10 s).
const REFUSED_RETRY: Duration = Duration::from_secs(15);
/// How often the certificate's state is looked at, besides on every view change.
const CHECK_EVERY: Duration = Duration::from_secs(5);

enum Event {
    LinkUp,
    LinkDown,
    Certificate(CertificateAnswer),
    Settings(DirectSettings),
    Probed(Result<SocketAddr, String>),
}

pub struct DirectAgent {
    node: String,
    identity: Arc<Identity>,
    cfg: DirectConfig,
    /// Where probes for the reflexive address leave from and their answers arrive.
    probe: Option<Arc<socket::ProbePort>>,
    /// The same socket for QUIC (direct paths take it).
    quic: Option<Arc<socket::DirectSocket>>,
    /// Peers that asked through the cloud to be dialled (hole punching).
    punches: mpsc::UnboundedSender<String>,
    punches_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    view: watch::Receiver<Arc<MeshView>>,
    sync: Arc<Mutex<SyncStatus>>,
    link: Mutex<Option<mpsc::UnboundedSender<Message>>>,
    events: mpsc::UnboundedSender<Event>,
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    peers: PeerBook,
    status: Mutex<DirectStatus>,
}

fn message(operation: &str, res: &str) -> Message {
    Message::new(
        module::EDGEHUB,
        module::CLOUDHUB,
        group::DIRECT,
        operation,
        res,
    )
}

impl DirectAgent {
    /// Binds `cfg.listen` (when enabled) and loads the peer book from `data_dir`.
    pub async fn new(
        identity: Arc<Identity>,
        cfg: DirectConfig,
        data_dir: &std::path::Path,
        view: watch::Receiver<Arc<MeshView>>,
        sync: Arc<Mutex<SyncStatus>>,
    ) -> std::io::Result<Arc<DirectAgent>> {
        let (probe, quic) = if cfg.enabled {
            let socket = std::net::UdpSocket::bind(cfg.listen)?;
            // Bursts of QUIC packets at gigabit rates outrun the default buffers.
            let _ = crate::socket::set_receive_buffer(&socket, SOCKET_BUFFER);
            let _ = crate::socket::set_send_buffer(&socket, SOCKET_BUFFER);
            let (quic, probe) = socket::split(socket)?;
            (Some(Arc::new(probe)), Some(quic))
        } else {
            (None, None)
        };
        let (punches, punches_rx) = mpsc::unbounded_channel();
        let (events, inbox) = mpsc::unbounded_channel();
        let peers = PeerBook::open(data_dir);
        let status = DirectStatus {
            node_name: identity.node().to_string(),
            enabled: cfg.enabled,
            listen: probe.as_ref().and_then(|s| s.local_addr().ok()),
            certificate: identity.current().map(|i| NodeCertificate {
                fingerprint: i.fingerprint.clone(),
                not_after_ms: i.info.not_after_ms,
            }),
            ..DirectStatus::default()
        };
        Ok(Arc::new(DirectAgent {
            node: identity.node().to_string(),
            identity,
            cfg,
            probe,
            quic,
            punches,
            punches_rx: Mutex::new(Some(punches_rx)),
            view,
            sync,
            link: Mutex::new(None),
            events,
            inbox: Mutex::new(Some(inbox)),
            peers,
            status: Mutex::new(status),
        }))
    }

    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// The peers' candidates as the cloud sent them (kept across restarts).
    pub fn peers(&self) -> &PeerBook {
        &self.peers
    }

    /// The direct-path socket as QUIC uses it, when `direct.enabled`.
    pub(crate) fn quic_socket(&self) -> Option<Arc<socket::DirectSocket>> {
        self.quic.clone()
    }

    /// Punch requests from peers (taken once, by the direct paths).
    pub(crate) fn take_punches(&self) -> mpsc::UnboundedReceiver<String> {
        self.punches_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| mpsc::unbounded_channel().1)
    }

    /// Asks `peer`, through the cloud, to dial this node now (so that both NATs open a
    /// mapping towards the other). Without a hub link this does nothing.
    pub(crate) fn request_punch(&self, peer: &str) {
        self.send(message(op::QUERY, resource::PUNCH).with_content(&Punch {
            node: peer.to_string(),
        }));
    }

    pub fn status(&self) -> DirectStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let book = self.peers.get();
        s.enforce_communities = book.enforce_communities;
        s.peers = book.peers.clone();
        s
    }

    fn update(&self, f: impl FnOnce(&mut DirectStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A hub session started: what this agent sends comes out of the returned queue until
    /// the queue is dropped (the session ended).
    pub fn attach(&self) -> mpsc::UnboundedReceiver<Message> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let _ = self.events.send(Event::LinkUp);
        rx
    }

    fn send(&self, msg: Message) -> bool {
        let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = link.as_ref() else {
            return false;
        };
        if tx.send(msg).is_ok() {
            return true;
        }
        // The session ended: its queue is gone.
        *link = None;
        let _ = self.events.send(Event::LinkDown);
        false
    }

    /// A message of group `direct` from the cloud.
    pub fn on_message(&self, msg: &Message) {
        let event = match (msg.operation(), msg.resource()) {
            (op::RESPONSE, resource::CERTIFICATE) => msg
                .content_as::<CertificateAnswer>()
                .map(Event::Certificate),
            (op::RESPONSE, resource::DIRECT_SETTINGS) => {
                msg.content_as::<DirectSettings>().map(Event::Settings)
            }
            (op::UPDATE | op::DELETE, resource::CANDIDATES) => {
                match msg.content_as::<Candidates>() {
                    Ok(c) if c.node.is_empty() || c.node == self.node => {
                        debug!("ignoring candidates without a peer");
                    }
                    Ok(mut c) => {
                        let delete = msg.operation() == op::DELETE;
                        c.candidates.truncate(MAX_CANDIDATES);
                        debug!(peer = %c.node, delete, count = c.candidates.len(), "peer candidates");
                        self.peers
                            .set_peer(&c.node, (!delete).then_some(c.candidates));
                    }
                    Err(e) => warn!(error = %e, "malformed peer candidates"),
                }
                return;
            }
            (op::UPDATE, resource::PUNCH) => {
                match msg.content_as::<Punch>() {
                    Ok(p) if !p.node.is_empty() && p.node != self.node => {
                        let _ = self.punches.send(p.node);
                    }
                    Ok(_) => debug!("ignoring a punch request without a peer"),
                    Err(e) => warn!(error = %e, "malformed punch request"),
                }
                return;
            }
            (operation, res) => {
                debug!(
                    operation,
                    resource = res,
                    "ignoring an unknown direct message"
                );
                return;
            }
        };
        match event {
            Ok(e) => {
                let _ = self.events.send(e);
            }
            Err(e) => warn!(error = %e, resource = msg.resource(), "malformed direct message"),
        }
    }

    /// Runs until `shutdown`: certificate upkeep, reflexive address, candidates.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut inbox) = self.inbox.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            warn!("the direct agent runs once");
            return;
        };
        let mut view = self.view.clone();
        let mut st = RunState::default();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = inbox.recv() => match ev {
                    None => return,
                    Some(ev) => self.on_event(&mut st, ev),
                },
                changed = view.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            self.check_certificate(&mut st);
            if st.probe_due.is_some_and(|t| Instant::now() >= t) {
                self.start_probe(&mut st);
            }
        }
    }

    fn on_event(&self, st: &mut RunState, ev: Event) {
        match ev {
            Event::LinkUp => {
                st.link_up = true;
                st.requested = None;
                st.published = None;
                self.send(message(op::QUERY, resource::DIRECT_SETTINGS));
            }
            Event::LinkDown => {
                st.link_up = false;
                st.settings = None;
                st.probe_due = None;
            }
            Event::Certificate(CertificateAnswer::Issued(issued)) => {
                match self.identity.install(&issued) {
                    Ok(i) => {
                        st.requested = None;
                        st.awaiting_version = Some(issued.resource_version);
                        self.update(|s| {
                            s.certificate = Some(NodeCertificate {
                                fingerprint: i.fingerprint.clone(),
                                not_after_ms: i.info.not_after_ms,
                            });
                            s.last_certificate_error = None;
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "refused the issued certificate");
                        self.update(|s| s.last_certificate_error = Some(e.to_string()));
                    }
                }
            }
            Event::Certificate(CertificateAnswer::Refused { error }) => {
                warn!(%error, "the cloud refused a certificate");
                st.requested = Instant::now().checked_sub(REQUEST_TIMEOUT - REFUSED_RETRY);
                self.update(|s| s.last_certificate_error = Some(error));
            }
            Event::Settings(settings) => {
                self.peers.set_enforce(settings.enforce_communities);
                st.cloud_offset_ms = settings.cloud_time_ms - now_ms();
                st.settings = Some(settings);
                st.probe_due = Some(Instant::now());
                if !self.cfg.enabled {
                    st.probe_due = None;
                }
            }
            Event::Probed(result) => {
                st.probing = false;
                match result {
                    Ok(addr) => {
                        info!(reflexive = %addr, "learned the reflexive address");
                        self.update(|s| {
                            s.reflexive = Some(addr);
                            s.reflexive_at_ms = Some(now_ms());
                            s.last_probe_error = None;
                        });
                        st.probe_due = Some(Instant::now() + PROBE_EVERY);
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot learn the reflexive address");
                        self.update(|s| s.last_probe_error = Some(e));
                        st.probe_due = Some(Instant::now() + PROBE_RETRY);
                    }
                }
                if st.settings.is_some() {
                    self.publish(st);
                }
            }
        }
    }

    /// Asks for a certificate when the node has none, it is due for renewal, or the synced
    /// Node status shows it was revoked; one request at a time.
    fn check_certificate(&self, st: &mut RunState) {
        if !st.link_up || st.requested.is_some_and(|t| t.elapsed() < REQUEST_TIMEOUT) {
            return;
        }
        let view = self.view.borrow().clone();
        if st.awaiting_version.is_some_and(|v| view.version >= v) {
            st.awaiting_version = None;
        }
        let synced = self.sync.lock().unwrap_or_else(|p| p.into_inner()).synced;
        let current = synced && st.awaiting_version.is_none();
        let mine = view.nodes.get(&self.node).and_then(|n| n.certificate());
        let Some(need) = self.identity.need(mine.as_ref(), current, now_ms()) else {
            return;
        };
        let request = match self.identity.request() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot make a certificate request");
                return;
            }
        };
        if self.send(message(op::QUERY, resource::CERTIFICATE).with_content(&request)) {
            info!(
                reason = need.as_str(),
                "asked the cloud for a node certificate"
            );
            st.requested = Some(Instant::now());
            self.update(|s| s.certificate_requests += 1);
            if need == Need::Revoked {
                self.update(|s| s.certificate = None);
            }
        }
    }

    fn start_probe(&self, st: &mut RunState) {
        st.probe_due = None;
        let (Some(settings), Some(socket)) = (st.settings.clone(), self.probe.clone()) else {
            return;
        };
        if st.probing {
            return;
        }
        // The reflector is on the host of the cloud URL this link went to.
        let host = {
            let s = self.sync.lock().unwrap_or_else(|p| p.into_inner());
            s.cloud_url
                .as_deref()
                .and_then(|u| u.parse::<tokio_tungstenite::tungstenite::http::Uri>().ok())
                .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_string()))
        };
        let Some(host) = host else {
            warn!("no cloud host to learn the reflexive address from");
            return;
        };
        st.probing = true;
        let events = self.events.clone();
        let node = self.node.clone();
        let offset = st.cloud_offset_ms;
        tokio::spawn(async move {
            let result: Result<SocketAddr, String> = async {
                let key = hex_decode(&settings.probe_key).ok_or("the probe key is not hex")?;
                let local = socket.local_addr().map_err(|e| e.to_string())?;
                let reflector = tokio::net::lookup_host((host.as_str(), settings.reflector_port))
                    .await
                    .map_err(|e| format!("cannot resolve {host}: {e}"))?
                    .find(|a| a.is_ipv4() == local.is_ipv4() || local.is_ipv6())
                    .ok_or_else(|| {
                        format!("{host} has no address of the direct socket's family")
                    })?;
                reflect::learn_reflexive(socket.as_ref(), reflector, &node, &key, offset, 5)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            let _ = events.send(Event::Probed(result));
        });
    }

    /// Sends this node's candidates when they changed or this link has not had them.
    fn publish(&self, st: &mut RunState) {
        let Some(socket) = &self.probe else { return };
        let Ok(local) = socket.local_addr() else {
            return;
        };
        let host = candidates::host_addresses().unwrap_or_else(|e| {
            warn!(error = %e, "cannot list this host's addresses");
            Vec::new()
        });
        let reflexive = self.status().reflexive;
        let list = candidates::gather(local, &host, reflexive, &self.cfg.advertise);
        if st.published.as_ref() == Some(&list) {
            return;
        }
        let msg = message(op::UPDATE, resource::CANDIDATES).with_content(&Candidates {
            node: String::new(),
            candidates: list.clone(),
        });
        if self.send(msg) {
            info!(
                candidates = ?list.iter().map(|c| c.address).collect::<Vec<_>>(),
                "published direct-path candidates"
            );
            self.update(|s| s.candidates = list.clone());
            st.published = Some(list);
        }
    }
}

#[derive(Default)]
struct RunState {
    link_up: bool,
    /// When the last certificate request counts as sent: it is asked again [`REQUEST_TIMEOUT`]
    /// later. Cleared by a certificate; a refusal moves it back so the next try comes
    /// [`REFUSED_RETRY`] after the refusal.
    requested: Option<Instant>,
    /// The store version that publishes the certificate just installed.
    awaiting_version: Option<u64>,
    settings: Option<DirectSettings>,
    cloud_offset_ms: i64,
    probe_due: Option<Instant>,
    probing: bool,
    /// Candidates sent on this link.
    published: Option<Vec<Candidate>>,
}

/// Lower-case or upper-case hex to bytes.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Bytes to lower-case hex.
pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Community, Node};
    use std::collections::BTreeMap;

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        let b = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(hex_decode(&hex_encode(&b)), Some(b));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(hex_decode("é1"), None);
    }

    #[test]
    fn the_view_decides_who_may_connect() {
        let mut view = MeshView::default();
        for (n, site) in [("a", "f1"), ("b", "f1"), ("c", "f2")] {
            let labels = BTreeMap::from([("site".to_string(), site.to_string())]);
            view.nodes.insert(n.into(), Arc::new(Node::new(n, labels)));
        }
        let c: Community = serde_json::from_str(
            r#"{"metadata":{"name":"f1"},"spec":{"nodeSelector":{"matchLabels":{"site":"f1"}},"members":["ghost"]}}"#,
        )
        .expect("community");
        assert!(!may_connect(&view, "a", "b"), "no community yet");
        view.communities.insert("f1".into(), Arc::new(c));
        assert!(may_connect(&view, "a", "b"));
        assert!(!may_connect(&view, "a", "c"));
        assert!(
            !may_connect(&view, "a", "ghost"),
            "a member with no Node is unknown"
        );
    }
}
