//! Starting and stopping the agent. The local store is opened first and serves on its own, so
//! a node that restarts while the cloud is unreachable comes up with everything it knew.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use edgehub::client::{HubClient, SyncStatus};
use edgehub::metamanager::MetaManager;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::proxy::connect::Dialer;
use crate::proxy::{LocalNode, ProxyDeps};
use crate::tunnel::EdgeAcceptor;
use edgehub::limits::{EndpointTimeouts, Limiters};
use edgehub::tunnel::bridge::Timeouts;
use tokio_util::task::TaskTracker;

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    run_until(cfg, edgehub::process::shutdown_on_signal()).await
}

pub async fn run_until(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = crate::telemetry::install();
    let hub_cfg = cfg.hub_client()?;

    // The error names the file and what to do about it; a corrupt file is set aside and the
    // node starts empty (see MetaManager::open), so this fails only when the file may be fine.
    let meta = {
        let dir = cfg.data_dir.clone();
        Arc::new(tokio::task::spawn_blocking(move || MetaManager::open(&dir)).await??)
    };
    let view = meta.view();
    info!(
        node = %cfg.node_name,
        store = %meta.path().display(),
        version = view.version,
        services = view.services.len(),
        endpoints = view.endpoints.len(),
        recovered = meta.recovery().is_some(),
        "metadata store loaded"
    );

    let admin_listener = TcpListener::bind(cfg.admin.listen).await.with_context(|| {
        format!(
            "config key `admin.listen`: cannot listen on {}",
            cfg.admin.listen
        )
    })?;

    // Tunnels: the acceptor dials this node's endpoints for streams from the cloud; the proxy
    // opens streams for endpoints elsewhere. Both enforce QPS limits where they dial.
    let limiters = Arc::new(Limiters::new());
    tokio::spawn(follow_limits(
        meta.subscribe(),
        limiters.clone(),
        shutdown.clone(),
    ));
    let dialer = Arc::new(Dialer::new(&cfg.proxy));
    let stream_tasks = TaskTracker::new();
    let acceptor = Arc::new(EdgeAcceptor::new(
        cfg.node_name.clone(),
        meta.subscribe(),
        dialer.clone(),
        limiters.clone(),
        EndpointTimeouts {
            detect: cfg.proxy.detect_timeout,
            bridge: Timeouts {
                idle: cfg.proxy.idle_timeout,
                half_closed: cfg.proxy.half_close_timeout,
            },
        },
        stream_tasks.clone(),
    ));
    let tunnel = crate::tunnel::handle(&cfg.tunnel, acceptor);
    let client = HubClient::new(hub_cfg, meta.clone()).with_tunnel(tunnel.clone());
    let sync = client.status();
    let ready = Arc::new(AtomicBool::new(false));
    if cfg.cloud_urls().is_empty() {
        warn!("{}", crate::config::NO_CLOUD);
    }
    let hub_task = tokio::spawn(client.run(shutdown.clone()));
    if let Some(handle) = metrics.clone() {
        tokio::spawn(metrics_upkeep(handle, shutdown.clone()));
    }
    tokio::spawn(edgehub::process::release_memory_after_bursts(
        meta.subscribe(),
        shutdown.clone(),
    ));
    // Cluster DNS (SPEC §5): its sockets are bound here, before the agent reports ready.
    let dns_task = crate::dns::start(&cfg, &meta, shutdown.clone()).await?;
    let proxy = crate::proxy::start(
        &cfg.proxy,
        cfg.service_cidr,
        LocalNode {
            name: cfg.node_name.clone(),
            labels: cfg.labels.clone(),
        },
        meta.subscribe(),
        ProxyDeps {
            dialer,
            tunnel: Some(tunnel.clone()),
            limiters: limiters.clone(),
        },
        shutdown.clone(),
    )
    .await?;
    let state = AdminState {
        meta: meta.clone(),
        sync: sync.clone(),
        metrics,
        ready: ready.clone(),
        dns: cfg.dns.enabled.then_some(cfg.dns.listen),
        routes: Some(proxy.tables.clone()),
        proxy: Some(admin::ProxySummary {
            listen: std::net::SocketAddr::new(cfg.proxy.listen_address, cfg.proxy.port),
            rules: proxy.rules.clone(),
            health: proxy.health.clone(),
            tunnel: Some(tunnel.clone()),
        }),
    };
    let admin_task = tokio::spawn(edgehub::accept::serve_http(
        admin_listener,
        None,
        admin::router(state),
        cfg.admin.limits(),
        "admin",
        shutdown.clone(),
    ));
    ready.store(true, Ordering::Release);
    info!(admin = %cfg.admin.listen, "edgemesh ready");
    edgehub::systemd::ready(&service_status(&sync, &meta));
    edgehub::systemd::watchdog(shutdown.clone());
    tokio::spawn(report_status(sync.clone(), meta.clone(), shutdown.clone()));

    shutdown.cancelled().await;
    edgehub::systemd::stopping();
    ready.store(false, Ordering::Release);
    let _ = hub_task.await;
    if let Some(dns) = dns_task {
        let _ = dns.await;
    }
    let _ = admin_task.await;
    proxy.join().await;
    // The hub link is closed by now, which reset every stream; their tasks end promptly.
    stream_tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), stream_tasks.wait()).await;
    info!("edgemesh stopped");
    Ok(())
}

/// The one-line state `systemctl status edgemesh` shows.
fn service_status(sync: &Mutex<SyncStatus>, meta: &MetaManager) -> String {
    let view = meta.view();
    let s = sync.lock().unwrap_or_else(|p| p.into_inner());
    let link = match (s.connected, &s.cloud_url) {
        (true, Some(url)) => format!("connected to {url}"),
        (true, None) => "connected".to_string(),
        (false, _) if s.connects == 0 && s.last_error.is_none() => "connecting".to_string(),
        (false, _) => "cloud unreachable, serving from the local store".to_string(),
    };
    format!(
        "{link}; metadata version {}, {} services, {} endpoints",
        view.version,
        view.services.len(),
        view.endpoints.len()
    )
}

/// Keeps the systemd status line current (it changes with the cloud link and the metadata).
async fn report_status(
    sync: Arc<Mutex<SyncStatus>>,
    meta: Arc<MetaManager>,
    shutdown: CancellationToken,
) {
    let mut last = String::new();
    let period = std::time::Duration::from_secs(2);
    while shutdown
        .run_until_cancelled(tokio::time::sleep(period))
        .await
        .is_some()
    {
        let now = service_status(&sync, &meta);
        if now != last {
            edgehub::systemd::status(&now);
            last = now;
        }
    }
}

/// Keeps the QPS limits in step with the Services' annotations.
async fn follow_limits(
    mut views: tokio::sync::watch::Receiver<Arc<edgehub::metamanager::MeshView>>,
    limiters: Arc<Limiters>,
    shutdown: CancellationToken,
) {
    loop {
        let view = views.borrow_and_update().clone();
        limiters.follow(&view);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
    }
}

/// Folds recorded histogram samples (DNS and proxy latencies) into their buckets every
/// second; without it they pile up until the next scrape of `/metrics`, however long that takes
/// (megabytes at tens of thousands of queries per second).
async fn metrics_upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let period = std::time::Duration::from_secs(1);
    while shutdown
        .run_until_cancelled(tokio::time::sleep(period))
        .await
        .is_some()
    {
        handle.run_upkeep();
    }
}
