//! The node's end of tunnelled streams: what the proxy opens through the cloud, and the
//! streams the cloud opens to this node for endpoints it hosts (relayed from another node, or
//! from the router). An incoming stream is checked against this node's own metadata, against
//! the Service's QPS limit, then its endpoint is dialled and joined to the stream.

use std::sync::Arc;
use std::time::Duration;

use edgehub::config_file::ConfigError;
use edgehub::limits::{serve_endpoint, EndpointTimeouts, Limiters, Served};
use edgehub::metamanager::MeshView;
use edgehub::tunnel::authorise::authorise;
use edgehub::tunnel::{Acceptor, Incoming, Mux, MuxConfig, OpenRequest, RefusalKind, TunnelHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

use edgehub::connect::Dialer;

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

/// Accepts the streams the cloud opens to endpoints this node hosts.
pub struct EdgeAcceptor {
    node: String,
    view: watch::Receiver<Arc<MeshView>>,
    dialer: Arc<Dialer>,
    limiters: Arc<Limiters>,
    timeouts: EndpointTimeouts,
    tasks: TaskTracker,
}

impl EdgeAcceptor {
    pub fn new(
        node: String,
        view: watch::Receiver<Arc<MeshView>>,
        dialer: Arc<Dialer>,
        limiters: Arc<Limiters>,
        timeouts: EndpointTimeouts,
        tasks: TaskTracker,
    ) -> EdgeAcceptor {
        EdgeAcceptor {
            node,
            view,
            dialer,
            limiters,
            timeouts,
            tasks,
        }
    }

    fn check(&self, request: &OpenRequest) -> Result<(), edgehub::tunnel::OpenRefusal> {
        let view = self.view.borrow().clone();
        let service = view
            .services
            .get(&(request.namespace.clone(), request.service.clone()));
        let endpoints = view.endpoints_of(&request.namespace, &request.service);
        authorise(
            service.map(|s| s.as_ref()),
            endpoints.map(|e| e.as_ref()),
            request,
            Some(&self.node),
        )
    }
}

fn count_refusal(kind: RefusalKind) {
    metrics::counter!("edgemesh_tunnel_refused_total", "reason" => kind.as_str()).increment(1);
}

impl Acceptor for EdgeAcceptor {
    fn incoming(&self, mux: &Mux, incoming: Incoming) {
        let request = incoming.request.clone();
        if let Err(refusal) = self.check(&request) {
            count_refusal(refusal.kind);
            debug!(from = %request.source, kind = %refusal.kind, reason = %refusal.message, "stream refused");
            mux.refuse(incoming, refusal.kind, &refusal.message);
            return;
        }
        let (ns, name) = (request.namespace.clone(), request.service.clone());
        let mux = mux.clone();
        let dialer = self.dialer.clone();
        let limiters = self.limiters.clone();
        let timeouts = self.timeouts;
        let span = tracing::debug_span!("stream", from = %request.source, service = %format!("{ns}/{name}"), endpoint = %request.endpoint);
        self.tasks.spawn(
            async move {
                let upstream = match dialer.dial(request.endpoint).await {
                    Ok(s) => s,
                    Err(e) => {
                        count_refusal(RefusalKind::Unreachable);
                        let message = format!("dial {}: {e}", request.endpoint);
                        debug!(%message, "endpoint unreachable");
                        mux.refuse(incoming, RefusalKind::Unreachable, &message);
                        return;
                    }
                };
                let Ok(stream) = mux.accept(incoming) else {
                    count_refusal(RefusalKind::Busy);
                    return;
                };
                metrics::counter!("edgemesh_tunnel_streams_accepted_total").increment(1);
                // The Service's limit applies here, where the endpoint is dialled: per request
                // for HTTP/1, per stream otherwise.
                match serve_endpoint(
                    stream,
                    upstream,
                    &limiters,
                    &ns,
                    &name,
                    request.protocol,
                    timeouts,
                )
                .await
                {
                    Ok(Served::Refused) => debug!("over the Service's limit: stream closed"),
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "stream ended with an error"),
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
