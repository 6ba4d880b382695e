//! Tunnelled streams on the cloud side.
//!
//! Every node link has a multiplexer. A stream a node opens is checked against the cloud's
//! own store (the Service exists, the endpoint is one of its ready addresses, and it is hosted
//! where the stream wants to go), then either relayed to the hosting node's link (frames pass
//! through by id) or, for a cloud endpoint, dialled here. The router opens streams to edge
//! endpoints through [`Tunnels::open`] and serves the virtual Services of its `service` →
//! `rest` rules through [`VirtualServices`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use edgehub::limits::{self, serve_endpoint, EndpointTimeouts, Limiters, Served};
use edgehub::message::Message;
use edgehub::model::{Kind, Object, ObjectKey};
use edgehub::tunnel::authorise::{authorise, host_of};
use edgehub::io::Timeouts;
use edgehub::tunnel::{
    Incoming, Mux, MuxConfig, MuxError, OpenError, OpenRefusal, OpenRequest, Outgoing, RefusalKind,
    Side, TunnelStream,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::store::{ChangeOp, Since, Store};

/// How long the first bytes of a stream to a rate-limited Service may take to show whether it
/// is HTTP/1.
const DETECT_TIMEOUT: Duration = Duration::from_millis(300);

/// A byte stream to an endpoint, whichever way it goes.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type BoxedIo = Pin<Box<dyn Io>>;

/// `[tunnel]` keys of cloudcore.toml.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// Bytes a node may send on one stream before the other end grants more. Both ends of a
    /// relayed stream use their own node's window; this one applies to streams cloudcore ends.
    pub window: u32,
    /// Streams open at once on one node's link (relayed ones count on both links).
    pub max_streams_per_node: usize,
    /// How long an open waits for the far side's answer.
    #[serde(with = "humantime_serde")]
    pub open_timeout: Duration,
    /// Dialling a cloud endpoint.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A stream cloudcore ends is closed after this long without a byte either way.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// ... and after this long without a byte once one side has finished sending.
    #[serde(with = "humantime_serde")]
    pub half_close_timeout: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            window: 256 * 1024,
            max_streams_per_node: 1024,
            open_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(3600),
            half_close_timeout: Duration::from_secs(60),
        }
    }
}

impl TunnelConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |key: &str, why: &str| Err((format!("tunnel.{key}"), why.to_string()));
        if self.window < 16 * 1024 {
            return err("window", "must be at least 16384 bytes");
        }
        if self.max_streams_per_node == 0 {
            return err("max_streams_per_node", "must be at least 1");
        }
        for (key, d) in [
            ("open_timeout", self.open_timeout),
            ("connect_timeout", self.connect_timeout),
            ("idle_timeout", self.idle_timeout),
            ("half_close_timeout", self.half_close_timeout),
        ] {
            if d.is_zero() {
                return err(key, "must be more than 0s");
            }
        }
        Ok(())
    }

    fn mux(&self) -> MuxConfig {
        MuxConfig {
            window: self.window,
            max_streams: self.max_streams_per_node,
            open_timeout: self.open_timeout,
            link_budget: 4 << 20,
        }
    }
}

/// Services that cloudcore serves itself (the router's `service` → `rest` rules): a stream to
/// one of their endpoints is handed over instead of dialled.
pub trait VirtualServices: Send + Sync + 'static {
    fn owns(&self, namespace: &str, name: &str) -> bool;
    fn serve(&self, source_node: String, namespace: String, name: String, stream: TunnelStream);
}

pub struct Tunnels {
    cfg: TunnelConfig,
    store: Arc<dyn Store>,
    links: Mutex<HashMap<String, Mux>>,
    virtual_services: OnceLock<Arc<dyn VirtualServices>>,
    /// QPS limits of Services with cloud endpoints, enforced where cloudcore dials them.
    limiters: Arc<Limiters>,
    tasks: TaskTracker,
}

impl Tunnels {
    pub fn new(cfg: TunnelConfig, store: Arc<dyn Store>) -> Tunnels {
        Tunnels {
            cfg,
            store,
            links: Mutex::new(HashMap::new()),
            virtual_services: OnceLock::new(),
            limiters: Arc::new(Limiters::new()),
            tasks: TaskTracker::new(),
        }
    }

    /// The router, once it exists (it needs the tunnels first to open streams).
    pub fn set_virtual_services(&self, v: Arc<dyn VirtualServices>) {
        let _ = self.virtual_services.set(v);
    }

    /// Keeps the QPS limits in step with the Services in the store, until `shutdown`: only
    /// the Services that changed are read again.
    pub async fn follow_limits(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut versions = self.store.subscribe();
        let mut seen = 0u64;
        loop {
            let this = self.clone();
            let from = seen;
            let done = tokio::task::spawn_blocking(move || this.refresh_limits(from)).await;
            match done {
                Ok(Ok(v)) => seen = v,
                Ok(Err(e)) => warn!(error = %e, "reading Services for QPS limits failed"),
                Err(e) => warn!(error = %e, "QPS limit refresh failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = versions.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Applies the limits of Services changed after `from` (all of them when the history does
    /// not reach back that far); returns the version now reflected.
    fn refresh_limits(&self, from: u64) -> Result<u64, crate::store::StoreError> {
        let apply = |json: &str, deleted: bool| {
            let Ok(Object::Service(svc)) = Object::from_json(Kind::Service, json) else {
                return;
            };
            let (ns, name) = (&svc.metadata.namespace, &svc.metadata.name);
            let limit = if deleted {
                None
            } else {
                limits::limit_of(&svc).unwrap_or_else(|e| {
                    warn!(service = %format!("{ns}/{name}"), error = %e, "ignoring a bad QPS limit");
                    None
                })
            };
            self.limiters.set(ns, name, limit);
        };
        let version = self.store.version();
        match (from > 0).then(|| self.store.changes_since(from, None)) {
            Some(Since::Current) => {}
            Some(Since::Changes(changes)) => {
                for c in changes.iter().filter(|c| c.key.kind == Kind::Service) {
                    apply(&c.json, c.op == ChangeOp::Delete);
                }
                return Ok(changes.last().map_or(version, |c| c.version));
            }
            _ => {
                let records = self.store.list(Kind::Service, None)?;
                let live: Vec<(String, String)> = records
                    .iter()
                    .map(|r| (r.key.namespace.clone(), r.key.name.clone()))
                    .collect();
                self.limiters
                    .retain(|ns, name| live.iter().any(|(n, m)| n == ns && m == name));
                for r in &records {
                    apply(&r.json, false);
                }
            }
        }
        Ok(version)
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mux>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A multiplexer for `node`'s new link, and the queue its session must write out.
    pub fn attach(&self, node: &str) -> (Mux, mpsc::UnboundedReceiver<Outgoing>) {
        let (mux, out) = Mux::new(self.cfg.mux(), Side::Cloud);
        if let Some(old) = self.links().insert(node.to_string(), mux.clone()) {
            old.close("the node connected again");
        }
        (mux, out)
    }

    /// The link of `node` ended: its streams end, relayed ones on the other node too.
    pub fn detach(&self, node: &str, mux: &Mux, reason: &str) {
        {
            let mut links = self.links();
            if links.get(node).is_some_and(|m| Mux::same(m, mux)) {
                links.remove(node);
            }
        }
        mux.close(reason);
    }

    /// Open streams on every link (for metrics and the API).
    pub fn open_streams(&self) -> usize {
        self.links().values().map(Mux::open_streams).sum()
    }

    /// Takes a stream message from `node`'s link. Called on the session's reader, so any
    /// waiting (store lookups, the far side's answer, dialling) happens in a task.
    pub fn on_message(
        self: &Arc<Self>,
        node: &str,
        mux: &Mux,
        msg: &Message,
    ) -> Result<(), MuxError> {
        let Some(incoming) = mux.on_message(msg)? else {
            return Ok(());
        };
        let this = self.clone();
        let (node, mux) = (node.to_string(), mux.clone());
        let span = tracing::debug_span!("stream", from = %node, service = %format!("{}/{}", incoming.request.namespace, incoming.request.service), endpoint = %incoming.request.endpoint);
        self.tasks
            .spawn(async move { this.incoming(node, mux, incoming).await }.instrument(span));
        Ok(())
    }

    async fn incoming(self: Arc<Self>, source: String, mux: Mux, mut incoming: Incoming) {
        // The opener's name is the authenticated one, never what it wrote.
        incoming.request.source = source.clone();
        let request = incoming.request.clone();
        let target = request
            .node
            .clone()
            .filter(|n| n != edgehub::model::CLOUD_NODE);
        let checked = self.check(&request, target.as_deref()).await;
        if let Err(refusal) = checked {
            count_refusal(refusal.kind);
            debug!(kind = %refusal.kind, reason = %refusal.message, "stream refused");
            mux.refuse(incoming, refusal.kind, &refusal.message);
            return;
        }
        match target {
            Some(node) => {
                let link = self.links().get(&node).cloned();
                let Some(link) = link else {
                    count_refusal(RefusalKind::NodeOffline);
                    mux.refuse(
                        incoming,
                        RefusalKind::NodeOffline,
                        &format!("node {node} is offline"),
                    );
                    return;
                };
                match mux.relay(incoming, &link, request).await {
                    Ok(()) => {
                        metrics::counter!("cloudcore_tunnel_streams_total", "kind" => "relay")
                            .increment(1);
                        debug!(to = %node, "stream relayed");
                    }
                    Err(e) => debug!(to = %node, error = %e, "relay failed"),
                }
            }
            None => self.terminate(mux, incoming).await,
        }
    }

    /// Checks the request against the store: the endpoint must be a ready address of the
    /// Service, hosted by `target` (a node) or by the cloud.
    async fn check(&self, request: &OpenRequest, target: Option<&str>) -> Result<(), OpenRefusal> {
        let store = self.store.clone();
        let (ns, name) = (request.namespace.clone(), request.service.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            let get = |kind| -> Result<Option<Object>, String> {
                match store.get(&ObjectKey::new(kind, ns.clone(), name.clone())) {
                    Ok(Some(rec)) => Object::from_json(kind, &rec.json)
                        .map(Some)
                        .map_err(|e| e.to_string()),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            };
            Ok::<_, String>((get(Kind::Service)?, get(Kind::Endpoints)?))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let (service, endpoints) = match loaded {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "store lookup for a stream failed");
                return Err(OpenRefusal {
                    kind: RefusalKind::Busy,
                    message: "store unavailable".into(),
                });
            }
        };
        let service = match service {
            Some(Object::Service(s)) => Some(s),
            _ => None,
        };
        let endpoints = match endpoints {
            Some(Object::Endpoints(e)) => Some(e),
            _ => None,
        };
        authorise(service.as_ref(), endpoints.as_ref(), request, target)
    }

    /// A stream to a cloud endpoint: handed to the router for its virtual Services, else
    /// checked against the Service's limit, dialled, and joined to the stream.
    async fn terminate(&self, mux: Mux, incoming: Incoming) {
        let request = incoming.request.clone();
        if let Some(v) = self.virtual_services.get() {
            if v.owns(&request.namespace, &request.service) {
                match mux.accept(incoming) {
                    Ok(stream) => {
                        metrics::counter!("cloudcore_tunnel_streams_total", "kind" => "router")
                            .increment(1);
                        v.serve(request.source, request.namespace, request.service, stream);
                    }
                    Err(refusal) => count_refusal(refusal.kind),
                }
                return;
            }
        }
        let upstream = match self.dial(request.endpoint).await {
            Ok(s) => s,
            Err(e) => {
                count_refusal(RefusalKind::Unreachable);
                let message = format!("dial {}: {e}", request.endpoint);
                debug!(%message, "cloud endpoint unreachable");
                mux.refuse(incoming, RefusalKind::Unreachable, &message);
                return;
            }
        };
        let Ok(stream) = mux.accept(incoming) else {
            count_refusal(RefusalKind::Busy);
            return;
        };
        metrics::counter!("cloudcore_tunnel_streams_total", "kind" => "cloud").increment(1);
        let timeouts = EndpointTimeouts {
            detect: DETECT_TIMEOUT,
            bridge: Timeouts {
                idle: self.cfg.idle_timeout,
                half_closed: self.cfg.half_close_timeout,
            },
        };
        // The Service's limit applies here, where the endpoint is dialled.
        let served = serve_endpoint(
            stream,
            upstream,
            &self.limiters,
            &request.namespace,
            &request.service,
            request.protocol,
            timeouts,
        )
        .await;
        match served {
            Ok(Served::Bridged(moved)) => {
                metrics::counter!("cloudcore_tunnel_bytes_total", "direction" => "to_endpoint")
                    .increment(moved.a_to_b);
                metrics::counter!("cloudcore_tunnel_bytes_total", "direction" => "from_endpoint")
                    .increment(moved.b_to_a);
            }
            Ok(Served::Refused) => debug!("over the Service's limit: stream closed"),
            Ok(Served::Http) => {}
            Err(e) => debug!(error = %e, "cloud stream ended with an error"),
        }
    }

    async fn dial(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let stream = tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.cfg.connect_timeout),
                )
            })??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Opens a stream to `req.endpoint` for cloudcore itself (the router): through the link of
    /// `req.node` when it names an edge node, or dialled here for a cloud endpoint.
    pub async fn open(&self, req: OpenRequest) -> Result<BoxedIo, OpenError> {
        match req
            .node
            .as_deref()
            .filter(|n| *n != edgehub::model::CLOUD_NODE)
        {
            Some(node) => {
                let link = self.links().get(node).cloned();
                let link = link.ok_or_else(|| OpenError::Refused {
                    kind: RefusalKind::NodeOffline,
                    message: format!("node {node} is offline"),
                })?;
                let stream = link.open(req).await?;
                metrics::counter!("cloudcore_tunnel_streams_total", "kind" => "opened")
                    .increment(1);
                Ok(Box::pin(stream))
            }
            None => {
                let stream = self
                    .dial(req.endpoint)
                    .await
                    .map_err(|e| OpenError::Refused {
                        kind: RefusalKind::Unreachable,
                        message: format!("dial {}: {e}", req.endpoint),
                    })?;
                Ok(Box::pin(stream))
            }
        }
    }

    /// Waits (bounded) for streams cloudcore ends to finish after shutdown closed the links.
    pub async fn shutdown(&self) {
        let links: Vec<Mux> = self.links().drain().map(|(_, m)| m).collect();
        for mux in links {
            mux.close("cloudcore is shutting down");
        }
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(2), self.tasks.wait())
            .await
            .is_err()
        {
            info!(
                open = self.tasks.len(),
                "tunnel streams still open at shutdown"
            );
        }
    }
}

fn count_refusal(kind: RefusalKind) {
    metrics::counter!("cloudcore_tunnel_refused_total", "reason" => kind.as_str()).increment(1);
}

/// Whether an address of an Endpoints object is served by cloudcore (used by the router).
pub fn is_cloud_address(address: &edgehub::model::EndpointAddress) -> bool {
    host_of(address).is_none()
}
