//! The cloud's side of node identity and direct paths: certificates for nodes (signed by the
//! mesh CA for the name a node authenticated as, published in its Node status), certificate
//! logins to the hub, the reflexive-address service on `direct.listen` (UDP), and the
//! rendezvous of candidates: a node's candidates go only to the online nodes it may form a
//! direct path with (a common Community), and are taken back when that stops being so.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use edgehub::direct::hex_encode;
use edgehub::direct::reflect::Responder;
use edgehub::message::{
    group, module, op, resource, Candidate, Candidates, CertificateAnswer, CertificateIssued,
    CertificateRequest, DirectSettings, Message, Punch, MAX_CANDIDATES,
};
use edgehub::model::{may_connect, Community, Kind, Node, NodeCertificate, Object, ObjectKey};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::auth::NodeTokens;
use crate::ca::MeshCa;
use crate::nodes::Session;
use crate::objects::Objects;
use crate::store::{Change, ChangeOp, Since};

/// `[direct]` of cloudcore.toml.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectConfig {
    /// UDP address of the reflexive-address service.
    pub listen: SocketAddr,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 10004)),
        }
    }
}

/// `[communities]` of cloudcore.toml.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommunitiesConfig {
    /// Only members of a common Community may call each other at all (nodes refuse relayed
    /// streams from others); without it, Communities only decide direct paths.
    pub enforce: bool,
}

/// `[identity]` of cloudcore.toml.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// How long a node certificate is valid; nodes renew after two thirds of it.
    #[serde(with = "humantime_serde")]
    pub cert_validity: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            cert_validity: Duration::from_secs(30 * 86400),
        }
    }
}

impl IdentityConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let (min, max) = (
            Duration::from_secs(3600),
            Duration::from_secs(10 * 365 * 86400),
        );
        if !(min..=max).contains(&self.cert_validity) {
            return Err((
                "identity.cert_validity".into(),
                "must be between 1h and 10 years".into(),
            ));
        }
        Ok(())
    }
}

/// How a node's hub connection was authenticated; a certificate is issued only while that is
/// still valid (a link opened with a token that was since replaced gets none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    Token(String),
    /// The fingerprint of the certificate presented in the TLS handshake.
    Certificate(String),
}

/// A node asks for a certificate at most this often.
const REQUEST_PACE: Duration = Duration::from_secs(10);

/// What the direct-path service has for one node's link. Boxed: a channel allocates its first
/// block of 32 slots when it is made, and with a 248-byte `Message` that block was 7.9 KB of
/// every connected node's memory, for a queue that is nearly always empty.
pub(crate) type ToNode = mpsc::UnboundedReceiver<Box<Message>>;

struct Link {
    conn_id: u64,
    credential: Credential,
    tx: mpsc::UnboundedSender<Box<Message>>,
    /// The peer candidates this node was sent and has not had taken back.
    told: HashMap<String, Vec<Candidate>>,
    last_request: Option<Instant>,
    /// Punch requests passed on in the current second, and when that second began.
    punches: (Instant, u32),
}

/// Punch requests a node may have passed on per second (a node forms paths on demand, a few
/// at a time; more is a node misbehaving, and each costs its peer a round of dials).
const PUNCHES_PER_SECOND: u32 = 20;

/// Nodes and Communities: who may form direct paths, and which certificate each node holds.
/// Kept up to date change by change: a fleet's certificate issuances must not each cost a
/// reload of every Node.
#[derive(Default)]
struct PeerView {
    nodes: HashMap<String, Node>,
    communities: HashMap<String, Community>,
}

impl PeerView {
    fn allowed(&self, a: &str, b: &str) -> bool {
        match (self.nodes.get(a), self.nodes.get(b)) {
            (Some(a), Some(b)) => may_connect(self.communities.values(), a, b),
            _ => false,
        }
    }

    /// Applies one committed change; true when it may change who may connect to whom (not
    /// when only a Node's status, its certificate, changed).
    fn apply(&mut self, change: &Change) -> bool {
        let deleted = change.op == ChangeOp::Delete;
        let name = &change.key.name;
        match change.key.kind {
            Kind::Node => {
                let node = match Object::from_json(Kind::Node, &change.json) {
                    Ok(Object::Node(n)) if !deleted => Some(n),
                    _ => None,
                };
                let before = self.nodes.get(name).map(|n| n.metadata.labels.clone());
                let after = node.as_ref().map(|n| n.metadata.labels.clone());
                match node {
                    Some(n) => self.nodes.insert(name.clone(), n),
                    None => self.nodes.remove(name),
                };
                before != after
            }
            Kind::Community => {
                match Object::from_json(Kind::Community, &change.json) {
                    Ok(Object::Community(c)) if !deleted => {
                        self.communities.insert(name.clone(), c);
                    }
                    _ => {
                        self.communities.remove(name);
                    }
                }
                true
            }
            Kind::Service | Kind::Endpoints => false,
        }
    }

    fn fingerprint(&self, node: &str) -> Option<String> {
        self.nodes
            .get(node)
            .and_then(|n| n.certificate())
            .map(|c| c.fingerprint)
    }
}

pub struct Direct {
    listen: SocketAddr,
    enforce: bool,
    cert_validity: Duration,
    ca: MeshCa,
    objects: Arc<Objects>,
    tokens: Arc<NodeTokens>,
    responder: Mutex<Responder>,
    links: Mutex<HashMap<String, Link>>,
    /// The latest candidates of each node (in memory: nodes publish them on every connect).
    candidates: Mutex<HashMap<String, Vec<Candidate>>>,
    view: RwLock<PeerView>,
    /// The store version the view was last brought up to.
    followed: AtomicU64,
}

fn to_node(operation: &str, res: &str) -> Message {
    Message::new(
        module::CLOUDHUB,
        module::EDGEHUB,
        group::DIRECT,
        operation,
        res,
    )
}

fn now_ms() -> i64 {
    crate::nodes::now_ms()
}

impl Direct {
    pub fn new(
        direct: &DirectConfig,
        communities: &CommunitiesConfig,
        identity: &IdentityConfig,
        ca: MeshCa,
        objects: Arc<Objects>,
        tokens: Arc<NodeTokens>,
    ) -> Result<Arc<Direct>, crate::store::StoreError> {
        let d = Direct {
            listen: direct.listen,
            enforce: communities.enforce,
            cert_validity: identity.cert_validity,
            ca,
            objects,
            tokens,
            responder: Mutex::new(Responder::new()),
            links: Mutex::new(HashMap::new()),
            candidates: Mutex::new(HashMap::new()),
            view: RwLock::new(PeerView::default()),
            followed: AtomicU64::new(0),
        };
        d.reload()?;
        Ok(Arc::new(d))
    }

    /// The mesh CA's certificate: what the hub asks nodes' certificates to chain to.
    pub fn ca(&self) -> &MeshCa {
        &self.ca
    }

    /// Reads Nodes and Communities from the store into the view.
    fn reload(&self) -> Result<(), crate::store::StoreError> {
        let store = self.objects.store();
        let version = store.version();
        let mut view = PeerView::default();
        for rec in store.list(Kind::Node, None)? {
            if let Ok(Object::Node(n)) = Object::from_json(Kind::Node, &rec.json) {
                view.nodes.insert(n.metadata.name.clone(), n);
            }
        }
        for rec in store.list(Kind::Community, None)? {
            if let Ok(Object::Community(c)) = Object::from_json(Kind::Community, &rec.json) {
                view.communities.insert(c.metadata.name.clone(), c);
            }
        }
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
        self.followed.store(version, Ordering::Release);
        Ok(())
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, PeerView> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the view up to the store; true when who may connect to whom may have changed.
    fn catch_up(&self) -> Result<bool, crate::store::StoreError> {
        let from = self.followed.load(Ordering::Acquire);
        match self.objects.store().changes_since(from, None) {
            Since::Current => Ok(false),
            Since::Changes(changes) => {
                let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
                let mut membership = false;
                for c in &changes {
                    membership |= view.apply(c);
                }
                if let Some(last) = changes.last() {
                    self.followed.fetch_max(last.version, Ordering::AcqRel);
                }
                Ok(membership)
            }
            Since::Gone => self.reload().map(|()| true),
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<String, Link>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `fingerprint` is the certificate `node` holds now (a certificate login).
    pub fn certificate_login(&self, node: &str, fingerprint: &str) -> bool {
        self.view().fingerprint(node).as_deref() == Some(fingerprint)
    }

    /// A node's session started: what the cloud sends it for direct paths comes out of the
    /// returned queue. The node is sent the candidates of every peer it may connect to.
    pub fn attach(&self, session: &Session, credential: Credential) -> ToNode {
        let (tx, rx) = mpsc::unbounded_channel();
        let view = self.view();
        let mut told = HashMap::new();
        for (peer, list) in self
            .candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if peer != &session.node && view.allowed(&session.node, peer) {
                let _ = tx.send(Box::new(candidates_message(op::UPDATE, peer, list)));
                told.insert(peer.clone(), list.clone());
            }
        }
        self.links().insert(
            session.node.clone(),
            Link {
                conn_id: session.conn_id,
                credential,
                tx,
                told,
                last_request: None,
                punches: (Instant::now(), 0),
            },
        );
        rx
    }

    /// The session ended (unless a newer one of the node took over).
    pub fn detach(&self, session: &Session) {
        let mut links = self.links();
        if links
            .get(&session.node)
            .is_some_and(|l| l.conn_id == session.conn_id)
        {
            links.remove(&session.node);
        }
    }

    fn send_to(&self, session: &Session, msg: Message) {
        if let Some(l) = self
            .links()
            .get(&session.node)
            .filter(|l| l.conn_id == session.conn_id)
        {
            let _ = l.tx.send(Box::new(msg));
        }
    }

    /// A message of group `direct` from a node.
    pub fn on_message(self: &Arc<Self>, session: &Session, msg: Message) {
        match (msg.operation(), msg.resource()) {
            (op::QUERY, resource::CERTIFICATE) => self.certificate_request(session, msg),
            (op::QUERY, resource::DIRECT_SETTINGS) => {
                let key = self
                    .responder
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .key_for(&session.node);
                let settings = DirectSettings {
                    reflector_port: self.listen.port(),
                    probe_key: hex_encode(&key),
                    cloud_time_ms: now_ms(),
                    enforce_communities: self.enforce,
                };
                let answer = to_node(op::RESPONSE, resource::DIRECT_SETTINGS)
                    .with_parent(&msg.header.id)
                    .with_content(&settings);
                self.send_to(session, answer);
            }
            (op::UPDATE, resource::CANDIDATES) => match msg.content_as::<Candidates>() {
                Ok(c) => self.publish(session, c.candidates),
                Err(e) => warn!(node = %session.node, error = %e, "malformed candidates"),
            },
            (op::QUERY, resource::PUNCH) => match msg.content_as::<Punch>() {
                Ok(p) => self.punch(session, &p.node),
                Err(e) => warn!(node = %session.node, error = %e, "malformed punch request"),
            },
            (operation, res) => {
                debug!(
                    operation,
                    resource = res,
                    "ignoring an unknown direct message"
                )
            }
        }
    }

    fn certificate_request(self: &Arc<Self>, session: &Session, msg: Message) {
        let credential = {
            let mut links = self.links();
            let Some(link) = links
                .get_mut(&session.node)
                .filter(|l| l.conn_id == session.conn_id)
            else {
                return;
            };
            if link
                .last_request
                .is_some_and(|t| t.elapsed() < REQUEST_PACE)
            {
                let refused = CertificateAnswer::Refused {
                    error: format!("asked again within {REQUEST_PACE:?}"),
                };
                let _ = link.tx.send(Box::new(
                    to_node(op::RESPONSE, resource::CERTIFICATE)
                        .with_parent(&msg.header.id)
                        .with_content(&refused),
                ));
                return;
            }
            link.last_request = Some(Instant::now());
            link.credential.clone()
        };
        let this = self.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let csr = msg.content_as::<CertificateRequest>().map(|r| r.csr);
            let worker = this.clone();
            let node = session.node.clone();
            let answer = match csr {
                Ok(csr) => {
                    tokio::task::spawn_blocking(move || worker.issue(&node, &credential, &csr))
                        .await
                        .unwrap_or_else(|e| CertificateAnswer::Refused {
                            error: format!("internal error: {e}"),
                        })
                }
                Err(e) => CertificateAnswer::Refused {
                    error: format!("malformed request: {e}"),
                },
            };
            match &answer {
                CertificateAnswer::Issued(i) => {
                    info!(node = %session.node, fingerprint = %i.fingerprint, "issued a node certificate")
                }
                CertificateAnswer::Refused { error } => {
                    warn!(node = %session.node, %error, "refused a certificate request")
                }
            }
            this.send_to(
                &session,
                to_node(op::RESPONSE, resource::CERTIFICATE)
                    .with_parent(&msg.header.id)
                    .with_content(&answer),
            );
        });
    }

    /// Signs a certificate for `node` (never for the name the request claims) and publishes
    /// its fingerprint, if the link's credential is still the node's.
    fn issue(&self, node: &str, credential: &Credential, csr: &str) -> CertificateAnswer {
        let refused = |error: String| CertificateAnswer::Refused { error };
        // Against node deletion, which takes the same lock: a deleted node gets nothing.
        let _admission = self.objects.admission();
        let current = match credential {
            Credential::Token(t) => self.tokens.verify(node, Some(t)).is_ok(),
            Credential::Certificate(fp) => {
                self.tokens.has_token(node) && self.stored_fingerprint(node).as_deref() == Some(fp)
            }
        };
        if !current {
            return refused(
                "the credential this connection was opened with is no longer this node's".into(),
            );
        }
        let cert = match self
            .ca
            .issue(csr, node, self.cert_validity, SystemTime::now())
        {
            Ok(c) => c,
            Err(e) => return refused(e.to_string()),
        };
        let status = NodeCertificate {
            fingerprint: cert.fingerprint.clone(),
            not_after_ms: cert.not_after_ms,
        };
        match self.objects.set_node_certificate(node, Some(&status)) {
            Ok(true) => {}
            Ok(false) => return refused(format!("node {node} does not exist")),
            Err(e) => {
                warn!(%node, error = %e, "cannot publish a node certificate");
                return refused("cannot store the certificate; try again".into());
            }
        }
        CertificateAnswer::Issued(CertificateIssued {
            certificate: cert.pem,
            ca: self.ca.cert_pem().to_string(),
            fingerprint: cert.fingerprint,
            not_after_ms: cert.not_after_ms,
            resource_version: self.objects.store().version(),
        })
    }

    fn stored_fingerprint(&self, node: &str) -> Option<String> {
        let rec = self
            .objects
            .get(&ObjectKey::new(Kind::Node, "", node))
            .ok()??;
        match Object::from_json(Kind::Node, &rec.json) {
            Ok(Object::Node(n)) => n.certificate().map(|c| c.fingerprint),
            _ => None,
        }
    }

    /// Passes a node's request to be dialled to `peer`, when the two may form a direct path and
    /// the peer is online here (hole punching: both ends dial at once).
    fn punch(&self, session: &Session, peer: &str) {
        if peer == session.node || !self.view().allowed(&session.node, peer) {
            debug!(node = %session.node, %peer, "punch request refused: no common community");
            return;
        }
        let mut links = self.links();
        let Some(from) = links
            .get_mut(&session.node)
            .filter(|l| l.conn_id == session.conn_id)
        else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(from.punches.0) >= Duration::from_secs(1) {
            from.punches = (now, 0);
        }
        if from.punches.1 >= PUNCHES_PER_SECOND {
            debug!(node = %session.node, "punch requests over the rate: dropped");
            return;
        }
        from.punches.1 += 1;
        if let Some(to) = links.get(peer) {
            let msg = to_node(op::UPDATE, resource::PUNCH).with_content(&Punch {
                node: session.node.clone(),
            });
            let _ = to.tx.send(Box::new(msg));
        }
    }

    /// Takes a node's candidates and passes them to the online peers it may connect to.
    fn publish(&self, session: &Session, mut list: Vec<Candidate>) {
        list.retain(|c| {
            c.address.port() != 0 && edgehub::direct::candidates::reachable(c.address.ip())
        });
        list.truncate(MAX_CANDIDATES);
        debug!(node = %session.node, count = list.len(), "candidates published");
        self.candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.node.clone(), list.clone());
        let view = self.view();
        for (peer, link) in self.links().iter_mut() {
            if peer != &session.node && view.allowed(&session.node, peer) {
                let _ = link.tx.send(Box::new(candidates_message(
                    op::UPDATE,
                    &session.node,
                    &list,
                )));
                link.told.insert(session.node.clone(), list.clone());
            }
        }
    }

    /// Brings every online node's peer candidates in line with the current Nodes and
    /// Communities: peers no longer allowed are taken back, newly allowed ones are sent.
    fn reconcile(&self) {
        let view = self.view();
        let mut candidates = self.candidates.lock().unwrap_or_else(|p| p.into_inner());
        candidates.retain(|node, _| view.nodes.contains_key(node));
        for (node, link) in self.links().iter_mut() {
            link.told.retain(|peer, _| {
                let keep = candidates.contains_key(peer) && view.allowed(node, peer);
                if !keep {
                    let _ = link
                        .tx
                        .send(Box::new(candidates_message(op::DELETE, peer, &[])));
                }
                keep
            });
            for (peer, list) in candidates.iter() {
                if peer != node && view.allowed(node, peer) && link.told.get(peer) != Some(list) {
                    let _ = link
                        .tx
                        .send(Box::new(candidates_message(op::UPDATE, peer, list)));
                    link.told.insert(peer.clone(), list.clone());
                }
            }
        }
    }

    /// Follows the store's changes to Nodes and Communities, and reconciles what nodes were
    /// told when membership may have changed.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut versions = self.objects.store().subscribe();
        loop {
            if !edgehub::process::changed(&mut versions, &shutdown).await {
                return;
            }
            let this = self.clone();
            let reloaded = tokio::task::spawn_blocking(move || this.catch_up()).await;
            match reloaded {
                Ok(Ok(true)) => self.reconcile(),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot reload nodes and communities"),
                Err(e) => warn!(error = %e, "reload task failed"),
            }
        }
    }

    /// Answers probes on `socket` until `shutdown`.
    pub async fn serve_reflector(self: Arc<Self>, socket: UdpSocket, shutdown: CancellationToken) {
        let mut buf = vec![0u8; 2048];
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = socket.recv_from(&mut buf) => r,
            };
            let (n, from) = match received {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "reflexive-address service: receive failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let answer = self
                .responder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .respond(&buf[..n], from, now_ms(), |node| {
                    self.tokens.has_token(node)
                });
            match answer {
                Ok(a) => {
                    if let Err(e) = socket.send_to(&a, from).await {
                        debug!(%from, error = %e, "cannot answer a probe");
                    }
                }
                Err(why) => debug!(%from, reason = why.as_str(), "probe not answered"),
            }
        }
    }
}

fn candidates_message(operation: &str, node: &str, list: &[Candidate]) -> Message {
    to_node(operation, resource::CANDIDATES).with_content(&Candidates {
        node: node.to_string(),
        candidates: list.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodes::NodeRegistry;
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;
    use edgehub::identity::Identity;
    use edgehub::message::CandidateKind;
    use std::collections::BTreeMap;

    struct Cloud {
        _dir: tempfile::TempDir,
        direct: Arc<Direct>,
        objects: Arc<Objects>,
        tokens: Arc<NodeTokens>,
        registry: NodeRegistry,
    }

    fn cloud() -> Cloud {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("c.db"), 100, 1 << 20).expect("store"));
        let objects = Arc::new(
            Objects::new(store.clone(), "10.96.0.0/12".parse().expect("cidr")).expect("objects"),
        );
        let tokens = Arc::new(NodeTokens::load(store).expect("tokens"));
        let ca = MeshCa::load_or_create(dir.path()).expect("ca");
        let direct = Direct::new(
            &DirectConfig::default(),
            &CommunitiesConfig { enforce: true },
            &IdentityConfig::default(),
            ca,
            objects.clone(),
            tokens.clone(),
        )
        .expect("direct");
        Cloud {
            _dir: dir,
            direct,
            objects,
            tokens,
            registry: NodeRegistry::default(),
        }
    }

    impl Cloud {
        fn join(&self, node: &str, site: &str) -> String {
            let labels = BTreeMap::from([("site".to_string(), site.to_string())]);
            self.objects.ensure_node(node, Some(&labels)).expect("node");
            self.tokens.create(node).expect("token")
        }

        fn connect(&self, node: &str, token: &str) -> (Session, ToNode) {
            let session = self
                .registry
                .connect(node, "10.0.0.1:1".parse().expect("addr"));
            let rx = self
                .direct
                .attach(&session, Credential::Token(token.to_string()));
            (session, rx)
        }

        fn apply(&self, json: &str) {
            let obj = Object::from_value(serde_json::from_str(json).expect("json")).expect("obj");
            self.objects.apply(vec![obj], false).expect("apply");
            assert!(
                self.direct.catch_up().expect("catch up"),
                "membership changed"
            );
            self.direct.reconcile();
        }
    }

    fn cands(ip: &str) -> Vec<Candidate> {
        vec![Candidate {
            address: format!("{ip}:10004").parse().expect("addr"),
            kind: CandidateKind::Host,
        }]
    }

    /// (operation, peer, addresses) of every message waiting in `rx`.
    fn drain(rx: &mut ToNode) -> Vec<(String, String, usize)> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            let c: Candidates = m.content_as().expect("candidates");
            out.push((m.operation().to_string(), c.node, c.candidates.len()));
        }
        out
    }

    #[test]
    fn candidates_reach_only_peers_of_a_common_community_and_are_taken_back() {
        let c = cloud();
        let (ta, tb, tc) = (c.join("a", "f1"), c.join("b", "f1"), c.join("c", "f2"));
        let (sa, mut ra) = c.connect("a", &ta);
        let (sb, mut rb) = c.connect("b", &tb);
        let (_sc, mut rc) = c.connect("c", &tc);
        c.direct.publish(&sa, cands("10.1.0.2"));
        c.direct.publish(&sb, cands("10.1.0.3"));
        assert!(drain(&mut rb).is_empty(), "no community: nobody is told");

        c.apply(r#"{"kind":"Community","apiVersion":"edgemesh.io/v1alpha1","metadata":{"name":"f1"},"spec":{"nodeSelector":{"matchLabels":{"site":"f1"}}}}"#);
        assert_eq!(drain(&mut ra), vec![("update".into(), "b".into(), 1)]);
        assert_eq!(drain(&mut rb), vec![("update".into(), "a".into(), 1)]);
        assert!(drain(&mut rc).is_empty(), "c is in no common community");

        // A node that connects later is told at once; a new publication goes to peers.
        let (_sb2, mut rb2) = c.connect("b", &tb);
        assert_eq!(drain(&mut rb2), vec![("update".into(), "a".into(), 1)]);
        c.direct.publish(&sa, cands("10.1.0.9"));
        assert_eq!(drain(&mut rb2), vec![("update".into(), "a".into(), 1)]);
        assert!(drain(&mut rc).is_empty());

        // b moves to another site: a and b are taken back from each other.
        c.objects
            .ensure_node("b", Some(&BTreeMap::from([("site".into(), "f2".into())])))
            .expect("relabel");
        assert!(c.direct.catch_up().expect("catch up"), "a label changed");
        c.direct.reconcile();
        assert_eq!(drain(&mut ra), vec![("delete".into(), "b".into(), 0)]);
        assert_eq!(drain(&mut rb2), vec![("delete".into(), "a".into(), 0)]);
    }

    #[test]
    fn a_certificate_is_issued_for_the_authenticated_name_while_the_credential_holds() {
        let c = cloud();
        let token = c.join("edge-1", "f1");
        assert!(c.direct.catch_up().expect("catch up"), "a new node");
        // The request claims another name.
        let dir = tempfile::tempdir().expect("tempdir");
        let claimer = Identity::open(dir.path(), "edge-2").expect("identity");
        let csr = claimer.request().expect("csr").csr;
        let CertificateAnswer::Issued(issued) =
            c.direct
                .issue("edge-1", &Credential::Token(token.clone()), &csr)
        else {
            panic!("refused")
        };
        let der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(issued.certificate.as_bytes())
                .expect("pem")
        };
        assert_eq!(
            edgehub::identity::cert_info(&der).expect("info").names,
            vec!["edge-1".to_string()]
        );
        assert_eq!(
            c.direct.stored_fingerprint("edge-1"),
            Some(issued.fingerprint.clone())
        );
        assert!(issued.resource_version >= 1);
        assert!(
            !c.direct.catch_up().expect("catch up"),
            "a new certificate changes no membership"
        );
        assert!(c.direct.certificate_login("edge-1", &issued.fingerprint));
        // The certificate as credential works for a renewal...
        let cert = Credential::Certificate(issued.fingerprint.clone());
        assert!(matches!(
            c.direct.issue("edge-1", &cert, &csr),
            CertificateAnswer::Issued(_)
        ));
        // ... but not once it was replaced, and a replaced token gets nothing either.
        assert!(matches!(
            c.direct.issue("edge-1", &cert, &csr),
            CertificateAnswer::Refused { .. }
        ));
        c.tokens.create("edge-1").expect("re-join");
        assert!(matches!(
            c.direct.issue("edge-1", &Credential::Token(token), &csr),
            CertificateAnswer::Refused { .. }
        ));
        // A broken request is refused, not answered with a certificate.
        let fresh = c.tokens.create("edge-1").expect("token");
        assert!(matches!(
            c.direct
                .issue("edge-1", &Credential::Token(fresh), "nonsense"),
            CertificateAnswer::Refused { .. }
        ));
    }
}
