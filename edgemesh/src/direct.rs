//! Direct node-to-node paths on the agent: the node's identity and the direct agent are
//! started with the hub client; `/debug/direct` on the admin API shows their state and the
//! paths to peers.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use edgehub::direct::paths::{DirectPaths, PathStatus};
use edgehub::direct::{DirectAgent, DirectStatus};
use serde::Serialize;

/// What `/debug/direct` answers.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Direct {
    #[serde(flatten)]
    agent: DirectStatus,
    /// Per peer: the path calls take (direct or relay), the candidate in use, RTT, bytes.
    paths: Vec<PathStatus>,
}

type Shared = (Arc<DirectAgent>, Option<Arc<DirectPaths>>);

/// `/debug/direct`: the certificate, the bound direct-path socket, the reflexive address, the
/// candidates this node published, the peers (with their candidates) it may connect to, and
/// the paths to them.
pub fn routes(agent: Arc<DirectAgent>, paths: Option<Arc<DirectPaths>>) -> Router {
    Router::new()
        .route("/debug/direct", get(status))
        .with_state((agent, paths))
}

async fn status(State((agent, paths)): State<Shared>) -> Json<Direct> {
    Json(Direct {
        agent: agent.status(),
        paths: paths.map(|p| p.status()).unwrap_or_default(),
    })
}
