//! The admin API on 127.0.0.1:10550: health, readiness, metrics and debug views of what the
//! node knows. Loopback only by default: it shows the mesh's metadata.
//!
//! `/healthz` says the process and its runtime answer. `/readyz` says the node serves: its
//! store is loaded, every listener is bound and the iptables rules are in place. Being
//! connected to the cloud is not part of it: a node that lost the cloud keeps serving from its
//! store (offline autonomy), so it stays ready; `connected` in the body says which it is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use edgehub::client::SyncStatus;
use edgehub::metamanager::MetaManager;
use edgehub::model::Kind;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::sync::watch;

use crate::iptables::Rules;
use edgehub::balance::HealthRegistry;
use edgehub::routes::RouteTable;

/// What `/debug/proxy` reports besides the route table.
#[derive(Clone)]
pub struct ProxySummary {
    pub listen: std::net::SocketAddr,
    pub rules: Option<Rules>,
    pub health: Arc<HealthRegistry>,
    /// Streams through the cloud, when the agent tunnels.
    pub tunnel: Option<edgehub::tunnel::TunnelHandle>,
}

#[derive(Clone)]
pub struct AdminState {
    pub meta: Arc<MetaManager>,
    pub sync: Arc<Mutex<SyncStatus>>,
    pub metrics: Option<PrometheusHandle>,
    /// Set once the store is loaded and every listener (admin, proxy, DNS) is up; cleared
    /// when the agent stops.
    pub ready: Arc<AtomicBool>,
    /// The DNS listener, when `dns.enabled`.
    pub dns: Option<std::net::SocketAddr>,
    /// The proxy's route table, once the proxy runs.
    pub routes: Option<watch::Receiver<Arc<RouteTable>>>,
    /// The proxy's settings and endpoint health, once the proxy runs.
    pub proxy: Option<ProxySummary>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/debug/services", get(services))
        .route("/debug/endpoints", get(endpoints))
        .route("/debug/nodes", get(nodes))
        .route("/debug/sync", get(sync))
        .route("/debug/routes", get(routes))
        .route("/debug/proxy", get(proxy))
        .with_state(state)
}

fn sync_status(state: &AdminState) -> SyncStatus {
    state.sync.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// One readiness check and what it found.
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

async fn readiness(state: &AdminState) -> Vec<Check> {
    let view = state.meta.view();
    // The admin API is built on the loaded store: answering at all means it is there. After a
    // corrupt store was replaced, the copy on disk is empty until the cloud's snapshot is in.
    let store = match state.meta.recovery() {
        Some(r) if !r.resynced => Check {
            name: "store",
            ok: false,
            detail: format!(
                "the store was corrupt and was moved to {} ({}); empty until the cloud's snapshot arrives",
                r.moved_to.display(),
                r.reason
            ),
        },
        _ => Check {
            name: "store",
            ok: true,
            detail: format!(
                "loaded at version {} (store {})",
                view.version,
                view.store_id.as_deref().unwrap_or("-")
            ),
        },
    };
    let mut checks = vec![store];
    let up = state.ready.load(Ordering::Acquire);
    let mut listeners = Vec::new();
    if let Some(p) = &state.proxy {
        listeners.push(format!("proxy {}", p.listen));
    }
    if let Some(dns) = state.dns {
        listeners.push(format!("dns {dns}"));
    }
    checks.push(Check {
        name: "listeners",
        ok: up,
        detail: if up {
            format!("admin, {}", listeners.join(", "))
        } else {
            "not all listeners are up (starting or stopping)".into()
        },
    });
    if let Some(rules) = state.proxy.as_ref().and_then(|p| p.rules.as_ref()) {
        let (ok, detail) = match rules.count().await {
            Ok(c) if c.complete => (true, format!("{} of {} rules installed", c.present, c.expected)),
            Ok(c) => (
                false,
                format!(
                    "{} of {} rules installed; incomplete until the next repair (proxy.reconcile_interval)",
                    c.present, c.expected
                ),
            ),
            Err(e) => (false, format!("cannot read the rules: {e}")),
        };
        checks.push(Check {
            name: "iptables",
            ok,
            detail,
        });
    }
    checks
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let s = sync_status(&state);
    let checks = readiness(&state).await;
    let ready = checks.iter().all(|c| c.ok);
    let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    let details: serde_json::Map<String, serde_json::Value> = checks
        .iter()
        .map(|c| {
            (
                c.name.to_string(),
                json!({ "ok": c.ok, "detail": c.detail }),
            )
        })
        .collect();
    let body = json!({
        "ready": ready,
        "failed": failed,
        "checks": details,
        // Not part of readiness: an offline node still serves from its store.
        "connected": s.connected,
        "synced": s.synced,
        "version": state.meta.view().version,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    let view = state.meta.view();
    metrics::gauge!("edgemesh_meta_version").set(view.version as f64);
    metrics::gauge!("edgemesh_meta_services").set(view.services.len() as f64);
    metrics::gauge!("edgemesh_meta_endpoints").set(view.endpoints.len() as f64);
    metrics::gauge!("edgemesh_meta_nodes").set(view.nodes.len() as f64);
    metrics::gauge!("edgemesh_hub_connected").set(if sync_status(&state).connected {
        1.0
    } else {
        0.0
    });
    edgehub::telemetry::scrape(state.metrics.as_ref())
}

async fn services(State(state): State<AdminState>) -> Response {
    stored(state.meta, Kind::Service).await
}

async fn endpoints(State(state): State<AdminState>) -> Response {
    stored(state.meta, Kind::Endpoints).await
}

/// The objects of `kind` as stored, read from SQLite: the view the data path reads keeps only
/// compact records of them.
async fn stored(meta: Arc<MetaManager>, kind: Kind) -> Response {
    match tokio::task::spawn_blocking(move || meta.objects(kind)).await {
        Ok(Ok((version, items))) => {
            Json(json!({ "version": version, "items": items })).into_response()
        }
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

async fn nodes(State(state): State<AdminState>) -> Response {
    let view = state.meta.view();
    let items: Vec<_> = view.nodes.values().map(|n| n.as_ref()).collect();
    Json(json!({ "version": view.version, "items": items })).into_response()
}

async fn sync(State(state): State<AdminState>) -> Response {
    let view = state.meta.view();
    Json(json!({
        "agentVersion": env!("CARGO_PKG_VERSION"),
        "status": sync_status(&state),
        "dns": state.dns.map(|a| a.to_string()),
        "store": {
            "path": state.meta.path().display().to_string(),
            "recovery": state.meta.recovery(),
            "storeId": view.store_id,
            "version": view.version,
            "services": view.services.len(),
            "endpoints": view.endpoints.len(),
            "nodes": view.nodes.len(),
        }
    }))
    .into_response()
}

/// The proxy's routes: cluster address → Service port, policy and endpoints with their state.
async fn routes(State(state): State<AdminState>) -> Response {
    let Some(tables) = &state.routes else {
        return (StatusCode::NOT_FOUND, "the proxy is not running\n").into_response();
    };
    let table = tables.borrow().clone();
    let now = tokio::time::Instant::now();
    let mut list: Vec<serde_json::Value> = table
        .routes()
        .map(|(addr, r)| ("TCP", addr, r))
        .chain(table.udp_routes().map(|(addr, r)| ("UDP", addr, r)))
        .map(|(protocol, addr, r)| {
            json!({
                "address": addr.to_string(),
                "protocol": protocol,
                "service": r.service.to_string(),
                "policy": format!("{:?}", r.balancer.policy()),
                "sessionAffinity": r.balancer.affinity().map(|a| a.timeout.as_secs()),
                "endpoints": r.endpoints.iter().map(|e| json!({
                    "address": e.addr.to_string(),
                    "node": e.node.as_deref(),
                    "tier": e.tier.0,
                    "inFlight": e.health.in_flight(),
                    "ejected": e.health.is_ejected(now),
                })).collect::<Vec<_>>(),
                "endpointsElsewhere": r.elsewhere,
            })
        })
        .collect();
    list.sort_by(|a, b| {
        (a["address"].as_str(), a["protocol"].as_str())
            .cmp(&(b["address"].as_str(), b["protocol"].as_str()))
    });
    Json(json!({ "version": table.version, "routes": list })).into_response()
}

/// The proxy at a glance (for `edgemesh status`): listener, iptables state, route count and
/// ejected endpoints.
async fn proxy(State(state): State<AdminState>) -> Response {
    let (Some(summary), Some(tables)) = (&state.proxy, &state.routes) else {
        return (StatusCode::NOT_FOUND, "the proxy is not running\n").into_response();
    };
    let (iptables, rules) = match &summary.rules {
        None => (json!("off (proxy.intercept = false)"), json!(null)),
        Some(rules) => match rules.count().await {
            Ok(c) if c.complete => (json!("installed"), json!(c)),
            Ok(c) => (json!("incomplete (being repaired)"), json!(c)),
            Err(e) => (json!(format!("unknown: {e}")), json!(null)),
        },
    };
    let table = tables.borrow().clone();
    let ejected: Vec<String> = summary
        .health
        .ejected()
        .iter()
        .map(|a| a.to_string())
        .collect();
    Json(json!({
        "listen": summary.listen.to_string(),
        "iptables": iptables,
        "iptablesRules": rules,
        "routes": table.len(),
        "udpRoutes": table.udp_addrs().count(),
        "routesInUse": table.made(),
        "version": table.version,
        "ejected": ejected,
        "tunnel": summary.tunnel.as_ref().map(|t| json!({
            "linkUp": t.is_up(),
            "openStreams": t.open_streams(),
            "window": t.config().window,
            "maxStreams": t.config().max_streams,
        })),
    }))
    .into_response()
}
