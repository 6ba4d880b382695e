//! The node's end of tunnelled streams: what the proxy opens through the cloud, and the
//! streams the cloud opens to this node for endpoints it hosts (relayed from another node, or
//! from the router). An incoming stream is checked against this node's own metadata, against
//! the Service's QPS limit, then its endpoint is dialled and joined to the stream.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgehub::config_file::ConfigError;
use edgehub::direct::paths::{DirectAcceptor, DirectArrival};
use edgehub::direct::DirectAgent;
use edgehub::serve::{count_refusal, Arrival, MuxArrival, Served, StreamServer};
use edgehub::tunnel::{
    Acceptor, Incoming, Mux, MuxConfig, OpenRefusal, OpenRequest, RefusalKind, TunnelHandle,
};
use edgehub::view::MeshView;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

/// `[tunnel]` keys of edgemesh.toml.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// Bytes the far end may send on one stream before this node grants more: with the link's
    /// round-trip time it caps one stream's throughput (window / RTT).
    pub window: u32,
    /// Streams open at once over the hub link, both directions.
    pub max_streams: usize,
    /// How long opening a stream waits for the far side's answer.
    #[serde(with = "humantime_serde")]
    pub open_timeout: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            window: 256 * 1024,
            max_streams: 1024,
            open_timeout: Duration::from_secs(5),
        }
    }
}

impl TunnelConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.window < 16 * 1024 {
            return Err(ConfigError::key(
                "tunnel.window",
                "must be at least 16384 bytes",
            ));
        }
        if self.max_streams == 0 {
            return Err(ConfigError::key("tunnel.max_streams", "must be at least 1"));
        }
        if self.open_timeout.is_zero() {
            return Err(ConfigError::key(
                "tunnel.open_timeout",
                "must be more than 0s",
            ));
        }
        Ok(())
    }

    pub fn mux(&self) -> MuxConfig {
        MuxConfig {
            window: self.window,
            max_streams: self.max_streams,
            open_timeout: self.open_timeout,
            link_budget: 4 << 20,
        }
    }
}

/// Accepts the streams opened to endpoints this node hosts, relayed by the cloud or over a
/// direct path: checked against this node's own copy of the metadata (and, with
/// `communities.enforce`, against the Communities), then served by the one [`StreamServer`].
pub struct EdgeAcceptor {
    here: String,
    view: watch::Receiver<Arc<MeshView>>,
    server: Arc<StreamServer>,
    /// The cloud's `communities.enforce`, as the direct agent keeps it (also offline).
    direct: OnceLock<Arc<DirectAgent>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl EdgeAcceptor {
    pub fn new(
        here: &str,
        view: watch::Receiver<Arc<MeshView>>,
        server: Arc<StreamServer>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> EdgeAcceptor {
        EdgeAcceptor {
            here: here.to_string(),
            view,
            server,
            direct: OnceLock::new(),
            tasks,
            shutdown,
        }
    }

    /// Where `communities.enforce` comes from (set once, when the direct agent starts).
    pub fn set_direct(&self, agent: Arc<DirectAgent>) {
        let _ = self.direct.set(agent);
    }

    /// The checks of every stream, whichever way it came.
    fn check(&self, request: &OpenRequest) -> Result<(), OpenRefusal> {
        let view = self.view.borrow().clone();
        self.server.authorise(&view, request)?;
        let enforce = self
            .direct
            .get()
            .is_some_and(|d| d.peers().get().enforce_communities);
        // Streams the cloud opens itself (the router) have no source node.
        if enforce
            && !request.source.is_empty()
            && !edgehub::direct::may_connect(&view, &self.here, &request.source)
        {
            return Err(OpenRefusal {
                kind: RefusalKind::Forbidden,
                message: format!(
                    "communities.enforce: nodes {} and {} share no Community",
                    request.source, self.here
                ),
            });
        }
        Ok(())
    }

    /// Serves an accepted stream on a task of its own.
    fn spawn<A: Arrival + 'static>(&self, arrival: A, path: &'static str) {
        let request = arrival.request();
        let span = tracing::debug_span!("stream", from = %request.source, path, service = %format!("{}/{}", request.namespace, request.service), endpoint = %request.endpoint);
        let (server, shutdown) = (self.server.clone(), self.shutdown.clone());
        self.tasks.spawn(
            async move {
                let accepted = || {
                    metrics::counter!("edgemesh_tunnel_streams_accepted_total", "path" => path)
                        .increment(1)
                };
                if let Served::Refused(kind) = server.serve(arrival, accepted, &shutdown).await {
                    count_refusal(kind);
                }
            }
            .instrument(span),
        );
    }
}

impl Acceptor for EdgeAcceptor {
    fn incoming(&self, mux: &Mux, incoming: Incoming) {
        if let Err(refusal) = self.check(&incoming.request) {
            count_refusal(refusal.kind);
            debug!(from = %incoming.request.source, kind = %refusal.kind, reason = %refusal.message, "stream refused");
            mux.refuse(incoming, refusal.kind, &refusal.message);
            return;
        }
        let arrival = MuxArrival {
            mux: mux.clone(),
            incoming,
        };
        self.spawn(arrival, "relay");
    }
}

impl DirectAcceptor for EdgeAcceptor {
    fn incoming(&self, arrival: DirectArrival) {
        if let Err(refusal) = self.check(&arrival.request) {
            count_refusal(refusal.kind);
            debug!(from = %arrival.request.source, kind = %refusal.kind, reason = %refusal.message, "direct stream refused");
            self.tasks.spawn(async move {
                arrival.refuse(refusal.kind, &refusal.message).await;
            });
            return;
        }
        self.spawn(arrival, "direct");
    }
}

/// The tunnel handle the hub client and the proxy share.
pub fn handle(cfg: &TunnelConfig, acceptor: Arc<EdgeAcceptor>) -> TunnelHandle {
    TunnelHandle::new(cfg.mux(), Some(acceptor))
}
