//! Tunnelled streams on the cloud side.
//!
//! Every node link has a multiplexer. A stream a node opens is checked against the cloud's
//! view of its store (the Service exists, the endpoint is one of its ready addresses, and it
//! is hosted where the stream wants to go), then either relayed to the hosting node's link
//! (frames pass through by id) or, for a cloud endpoint, served by the one
//! [`StreamServer`] (limit, dial, join) as nodes serve theirs. The router reaches edge
//! endpoints through [`Tunnels`] as an [`Opener`] and serves the virtual Services of its
//! `service` → `rest` rules through [`VirtualServices`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use edgehub::connect::{Opener, Upstream};
use edgehub::message::Message;
use edgehub::serve::{count_refusal, MuxArrival, Served, StreamServer};
use edgehub::tunnel::authorise::authorise_in;
use edgehub::tunnel::{
    Incoming, Mux, MuxConfig, MuxError, OpenError, OpenRefusal, OpenRequest, Outgoing, RefusalKind,
    Side, TunnelStream,
};
use edgehub::view::MeshView;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument};

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

/// Nodes held by other cloudcore replicas (store on etcd): the link to the replica that holds
/// `node`, over which a stream to it is relayed (see `cluster`).
#[async_trait::async_trait]
pub trait RemoteNodes: Send + Sync + 'static {
    async fn link_to(&self, node: &str) -> Option<Mux>;
}

pub struct Tunnels {
    cfg: TunnelConfig,
    /// The store as of its last commit: what streams are checked against.
    views: watch::Receiver<Arc<MeshView>>,
    links: Mutex<HashMap<String, Mux>>,
    virtual_services: OnceLock<Arc<dyn VirtualServices>>,
    /// Set on a replica of several: where nodes not connected here are.
    remote: OnceLock<Arc<dyn RemoteNodes>>,
    /// Streams to cloud endpoints: limited (QPS), dialled and joined here.
    server: Arc<StreamServer>,
    tasks: TaskTracker,
    /// Ends the streams cloudcore serves at shutdown.
    shutdown: CancellationToken,
}

impl Tunnels {
    pub fn new(
        cfg: TunnelConfig,
        views: watch::Receiver<Arc<MeshView>>,
        server: Arc<StreamServer>,
        shutdown: CancellationToken,
    ) -> Tunnels {
        Tunnels {
            cfg,
            views,
            links: Mutex::new(HashMap::new()),
            virtual_services: OnceLock::new(),
            remote: OnceLock::new(),
            server,
            tasks: TaskTracker::new(),
            shutdown,
        }
    }

    /// The router, once it exists (it needs the tunnels first to open streams).
    pub fn set_virtual_services(&self, v: Arc<dyn VirtualServices>) {
        let _ = self.virtual_services.set(v);
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn set_remote_nodes(&self, r: Arc<dyn RemoteNodes>) {
        let _ = self.remote.set(r);
    }

    /// The link `node`'s streams go over: its own link to this cloudcore, else (several
    /// replicas) the link to the replica that holds it.
    async fn link_of(&self, node: &str) -> Option<Mux> {
        if let Some(link) = self.links().get(node).cloned() {
            return Some(link);
        }
        self.remote.get()?.link_to(node).await
    }

    /// Takes a stream another replica opened on its link to this one: checked against this
    /// replica's store like a node's, then relayed to the target node's link here. Never passed
    /// on to a third replica: one hop, and a node that moved meanwhile is offline to the opener.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn from_replica(self: &Arc<Self>, mux: &Mux, incoming: Incoming) {
        let this = self.clone();
        let mux = mux.clone();
        let span = tracing::debug_span!("replica_stream", from = %incoming.request.source, service = %format!("{}/{}", incoming.request.namespace, incoming.request.service), endpoint = %incoming.request.endpoint);
        self.tasks.spawn(
            async move {
                let request = incoming.request.clone();
                let target = request
                    .node
                    .clone()
                    .filter(|n| n != edgehub::model::CLOUD_NODE);
                let Some(node) = target else {
                    mux.refuse(
                        incoming,
                        RefusalKind::Invalid,
                        "replicas relay only to nodes",
                    );
                    return;
                };
                if let Err(refusal) = this.check(&request, Some(&node)) {
                    count_refusal(refusal.kind);
                    mux.refuse(incoming, refusal.kind, &refusal.message);
                    return;
                }
                let link = this.links().get(&node).cloned();
                let Some(link) = link else {
                    count_refusal(RefusalKind::NodeOffline);
                    mux.refuse(
                        incoming,
                        RefusalKind::NodeOffline,
                        &format!("node {node} is not connected to this replica"),
                    );
                    return;
                };
                match mux.relay(incoming, &link, request).await {
                    Ok(()) => {
                        metrics::counter!("cloudcore_tunnel_streams_total", "kind" => "replica_in")
                            .increment(1)
                    }
                    Err(e) => debug!(to = %node, error = %e, "relay from a replica failed"),
                }
            }
            .instrument(span),
        );
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
        let checked = self.check(&request, target.as_deref());
        if let Err(refusal) = checked {
            count_refusal(refusal.kind);
            debug!(kind = %refusal.kind, reason = %refusal.message, "stream refused");
            mux.refuse(incoming, refusal.kind, &refusal.message);
            return;
        }
        match target {
            Some(node) => {
                let link = self.link_of(&node).await;
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

    /// Checks the request against the view of the store: the endpoint must be a ready address
    /// of the Service, hosted by `target` (a node) or by the cloud.
    fn check(&self, request: &OpenRequest, target: Option<&str>) -> Result<(), OpenRefusal> {
        authorise_in(&self.views.borrow(), request, target)
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
        let accepted =
            || metrics::counter!("cloudcore_tunnel_streams_total", "kind" => "cloud").increment(1);
        match self
            .server
            .serve(MuxArrival { mux, incoming }, accepted, &self.shutdown)
            .await
        {
            Served::Refused(kind) => count_refusal(kind),
            Served::Joined(moved) | Served::Datagrams(moved) => {
                metrics::counter!("cloudcore_tunnel_bytes_total", "direction" => "to_endpoint")
                    .increment(moved.a_to_b);
                metrics::counter!("cloudcore_tunnel_bytes_total", "direction" => "from_endpoint")
                    .increment(moved.b_to_a);
            }
            Served::Http | Served::Limited => {}
        }
    }

    /// Opens a stream to `req.endpoint` through the link of `req.node`, for cloudcore itself
    /// (the router). Cloud endpoints are dialled by the router's connector, not opened.
    async fn open_on_link(&self, req: OpenRequest) -> Result<TunnelStream, OpenError> {
        let node = req
            .node
            .clone()
            .filter(|n| n != edgehub::model::CLOUD_NODE)
            .ok_or_else(|| OpenError::Refused {
                kind: RefusalKind::Unreachable,
                message: format!("{} is a cloud endpoint: cloudcore dials it", req.endpoint),
            })?;
        let link = self.link_of(&node).await;
        let link = link.ok_or_else(|| OpenError::Refused {
            kind: RefusalKind::NodeOffline,
            message: format!("node {node} is offline"),
        })?;
        let stream = link.open(req).await?;
        metrics::counter!("cloudcore_tunnel_streams_total", "kind" => "opened").increment(1);
        Ok(stream)
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

impl Opener for Tunnels {
    fn open(
        &self,
        request: OpenRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Upstream, OpenError>> + Send + '_>> {
        Box::pin(async move { self.open_on_link(request).await.map(Upstream::Tunnel) })
    }
}
