//! Starting and stopping the agent. The local store is opened first and serves on its own, so
//! a node that restarts while the cloud is unreachable comes up with everything it knew.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use edgehub::client::{HubClient, SyncStatus};
use edgehub::direct::DirectAgent;
use edgehub::identity::Identity;
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
use edgehub::io::Timeouts;
use edgehub::limits::{EndpointTimeouts, Limiters};
use tokio_util::task::TaskTracker;

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    run_until(cfg, edgehub::process::shutdown_on_signal()).await
}

pub async fn run_until(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = crate::telemetry::install();
    let mut hub_cfg = cfg.hub_client()?;

    let meta = {
        let dir = cfg.data_dir.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || MetaManager::open(&dir))
                .await?
                .context("config key `data_dir`: cannot open the metadata store")?,
        )
    };
    let view = meta.view();
    info!(
        node = %cfg.node_name,
        version = view.version,
        services = view.services.len(),
        endpoints = view.endpoints.len(),
        "metadata store loaded"
    );

    // The node's key and certificate (mTLS to the hub, direct paths), kept beside its store.
    let identity = {
        let (dir, node) = (cfg.data_dir.clone(), cfg.node_name.clone());
        Arc::new(
            tokio::task::spawn_blocking(move || Identity::open(&dir, &node))
                .await?
                .context("config key `data_dir`: cannot keep the node identity")?,
        )
    };
    hub_cfg.identity = Some(identity.clone());

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
    let direct = DirectAgent::new(
        identity,
        cfg.direct.agent_config(),
        &cfg.data_dir,
        meta.subscribe(),
        sync.clone(),
    )
    .await
    .with_context(|| {
        format!(
            "config key `direct.listen`: cannot listen on UDP {}",
            cfg.direct.listen
        )
    })?;
    let client = client.with_direct(direct.clone());
    tokio::spawn(direct.clone().run(shutdown.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    if cfg.cloud_urls().is_empty() {
        warn!("cloud.url is not set: serving from the local store only");
    }
    let hub_task = tokio::spawn(client.run(shutdown.clone()));
    if let Some(handle) = metrics.clone() {
        tokio::spawn(metrics_upkeep(handle, shutdown.clone()));
    }
    tokio::spawn(trim_after_changes(meta.subscribe(), shutdown.clone()));
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
    let admin_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let app = admin::router(state).merge(crate::direct::routes(direct));
            if let Err(e) = axum::serve(admin_listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
            {
                warn!(error = %e, "admin API failed");
            }
        }
    });
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

/// After a burst of metadata changes (a snapshot above all), once the view, the DNS index and
/// the route table have been rebuilt, hands the memory freed by the old copies back to the
/// system. glibc keeps freed memory in its arenas otherwise: about 1.5 MB after a 10,000-Service
/// snapshot, a twentieth of the agent's footprint.
async fn trim_after_changes(
    mut views: tokio::sync::watch::Receiver<Arc<edgehub::metamanager::MeshView>>,
    shutdown: CancellationToken,
) {
    const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
        // Let the consumers of the view catch up, and let the burst end (or run for a while).
        let burst = tokio::time::Instant::now();
        while burst.elapsed() < SETTLE * 15 {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SETTLE) => break,
                changed = views.changed() => if changed.is_err() { return },
            }
        }
        views.borrow_and_update();
        release_free_memory();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
