//! Direct node-to-node paths on the agent: the node's identity and the direct agent are
//! started with the hub client; `/debug/direct` on the admin API shows their state.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use edgehub::direct::{DirectAgent, DirectStatus};

/// `/debug/direct`: the certificate, the bound direct-path socket, the reflexive address, the
/// candidates this node published and the peers (with their candidates) it may connect to.
pub fn routes(agent: Arc<DirectAgent>) -> Router {
    Router::new()
        .route("/debug/direct", get(status))
        .with_state(agent)
}

async fn status(State(agent): State<Arc<DirectAgent>>) -> Json<DirectStatus> {
    Json(agent.status())
}
