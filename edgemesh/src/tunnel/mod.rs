//! The node's end of tunnelled streams: what the proxy opens through the cloud, and the
//! streams the cloud opens to this node for endpoints it hosts (relayed from another node, or
//! from the router). An incoming stream is checked against this node's own metadata, against
//! the Service's QPS limit, then its endpoint is dialled and joined to the stream.

use std::sync::Arc;
use std::time::Duration;

use edgehub::config_file::ConfigError;
use edgehub::serve::{count_refusal, Served, StreamServer};
use edgehub::tunnel::{Acceptor, Incoming, Mux, MuxConfig, TunnelHandle};
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

/// Accepts the streams the cloud opens to endpoints this node hosts: checked against this
/// node's own copy of the metadata, then served by the one [`StreamServer`].
pub struct EdgeAcceptor {
    view: watch::Receiver<Arc<MeshView>>,
    server: Arc<StreamServer>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl EdgeAcceptor {
    pub fn new(
        view: watch::Receiver<Arc<MeshView>>,
        server: Arc<StreamServer>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> EdgeAcceptor {
        EdgeAcceptor {
            view,
            server,
            tasks,
            shutdown,
        }
    }
}

impl Acceptor for EdgeAcceptor {
    fn incoming(&self, mux: &Mux, incoming: Incoming) {
        let request = &incoming.request;
        let view = self.view.borrow().clone();
        if let Err(refusal) = self.server.authorise(&view, &incoming) {
            count_refusal(refusal.kind);
            debug!(from = %request.source, kind = %refusal.kind, reason = %refusal.message, "stream refused");
            mux.refuse(incoming, refusal.kind, &refusal.message);
            return;
        }
        let span = tracing::debug_span!("stream", from = %request.source, service = %format!("{}/{}", request.namespace, request.service), endpoint = %request.endpoint);
        let (mux, server, shutdown) = (mux.clone(), self.server.clone(), self.shutdown.clone());
        self.tasks.spawn(
            async move {
                let accepted =
                    || metrics::counter!("edgemesh_tunnel_streams_accepted_total").increment(1);
                if let Served::Refused(kind) =
                    server.serve(&mux, incoming, accepted, &shutdown).await
                {
                    count_refusal(kind);
                }
            }
            .instrument(span),
        );
    }
}

/// The tunnel handle the hub client and the proxy share.
pub fn handle(cfg: &TunnelConfig, acceptor: Arc<EdgeAcceptor>) -> TunnelHandle {
    TunnelHandle::new(cfg.mux(), Some(acceptor))
}
