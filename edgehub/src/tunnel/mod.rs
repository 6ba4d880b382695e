//! Tunnelled streams over the hub websocket: the open handshake ([`open`]), the binary frames
//! ([`frame`]) and the multiplexer that runs streams with per-stream flow control over one link.

pub mod open;

pub use open::{OpenError, OpenRefusal, OpenRequest, OpenResponse, RefusalKind, OPEN};
pub mod authorise;
pub mod frame;
mod mux;

pub use mux::{
    BudgetPermit, Incoming, Mux, MuxConfig, MuxError, Outgoing, Side, TunnelReader, TunnelStream,
    TunnelWriter,
};

use std::sync::Arc;

use tokio::sync::watch;

/// Takes the streams the cloud opens to this node. Called on the hub's reader: it must decide
/// quickly and move any waiting (dialling the endpoint) to a task of its own.
pub trait Acceptor: Send + Sync + 'static {
    fn incoming(&self, mux: &Mux, incoming: Incoming);
}

/// The node's tunnel to the cloud: the multiplexer of the current hub link, if there is one.
/// The hub client installs a new one on every connect and closes it when the link ends.
#[derive(Clone)]
pub struct TunnelHandle {
    current: Arc<watch::Sender<Option<Mux>>>,
    config: MuxConfig,
    acceptor: Option<Arc<dyn Acceptor>>,
}

impl TunnelHandle {
    pub fn new(config: MuxConfig, acceptor: Option<Arc<dyn Acceptor>>) -> TunnelHandle {
        TunnelHandle {
            current: Arc::new(watch::Sender::new(None)),
            config,
            acceptor,
        }
    }

    /// Opens a stream through the cloud (to a cloud endpoint, or relayed to another node).
    pub async fn open(&self, request: OpenRequest) -> Result<TunnelStream, OpenError> {
        let mux = self.current.borrow().clone();
        match mux {
            Some(mux) => mux.open(request).await,
            None => Err(OpenError::LinkDown),
        }
    }

    /// Whether a hub link is up (streams can be opened).
    pub fn is_up(&self) -> bool {
        self.current
            .borrow()
            .as_ref()
            .is_some_and(|m| !m.is_closed())
    }

    pub fn open_streams(&self) -> usize {
        self.current.borrow().as_ref().map_or(0, Mux::open_streams)
    }

    pub fn config(&self) -> &MuxConfig {
        &self.config
    }

    pub fn acceptor(&self) -> Option<&Arc<dyn Acceptor>> {
        self.acceptor.as_ref()
    }

    /// Installs the multiplexer of a new link (the hub client's business).
    pub fn install(&self, mux: Option<Mux>) {
        let old = self.current.send_replace(mux);
        if let Some(old) = old {
            old.close("hub link closed");
        }
    }
}
