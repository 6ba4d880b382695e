//! Starting and stopping the agent. The local store is opened first and serves on its own, so
//! a node that restarts while the cloud is unreachable comes up with everything it knew.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use edgehub::client::{HubClient, SyncStatus};
use edgehub::connect::NodeOpener;
use edgehub::direct::paths::DirectPaths;
use edgehub::direct::DirectAgent;
use edgehub::identity::Identity;
use edgehub::metamanager::MetaManager;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::iptables::Rules;
use crate::proxy::ProxyDeps;
use crate::tunnel::EdgeAcceptor;
use edgehub::connect::Dialer;
use edgehub::io::Timeouts;
use edgehub::limits::Limiters;
use edgehub::routes::LocalNode;
use edgehub::serve::{ServeTimeouts, StreamServer};
use tokio_util::task::TaskTracker;

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    run_until(cfg, edgehub::process::shutdown_on_signal()).await
}

pub async fn run_until(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = crate::telemetry::install();
    let mut hub_cfg = cfg.hub_client()?;

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
    tokio::spawn(edgehub::limits::follow(
        meta.subscribe(),
        limiters.clone(),
        shutdown.clone(),
    ));
    let dialer = Arc::new(Dialer::new(Some(cfg.proxy.mark), cfg.proxy.connect_timeout));
    let stream_tasks = TaskTracker::new();
    let server = Arc::new(StreamServer::new(
        Some(&cfg.node_name),
        dialer.clone(),
        limiters.clone(),
        cfg.proxy.http.clone(),
        ServeTimeouts {
            detect: cfg.proxy.detect_timeout,
            join: Timeouts {
                idle: cfg.proxy.idle_timeout,
                half_closed: cfg.proxy.half_close_timeout,
            },
        },
    ));
    let server_sweeper = tokio::spawn(server.clone().sweep(shutdown.clone()));
    let acceptor = Arc::new(EdgeAcceptor::new(
        &cfg.node_name,
        meta.subscribe(),
        server,
        stream_tasks.clone(),
        shutdown.clone(),
    ));
    let tunnel = crate::tunnel::handle(&cfg.tunnel, acceptor.clone());
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
    acceptor.set_direct(direct.clone());
    // Direct paths to peers, on the direct agent's socket (none with `direct.enabled = false`).
    let paths = DirectPaths::start(
        direct.clone(),
        meta.subscribe(),
        acceptor.clone(),
        u32::try_from(cfg.tunnel.max_streams).unwrap_or(u32::MAX),
        shutdown.clone(),
    )
    .context("direct paths: cannot start the QUIC endpoint")?;
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
    let scope = crate::dns::Scope {
        cluster_domain: &cfg.cluster_domain,
        service_cidr: cfg.service_cidr,
        node_name: &cfg.node_name,
        labels: &cfg.labels,
    };
    let dns_task = crate::dns::start(&cfg.dns, scope, &meta, shutdown.clone()).await?;
    let proxy = crate::proxy::start(
        &cfg.proxy,
        LocalNode {
            name: cfg.node_name.clone(),
            labels: cfg.labels.clone(),
        },
        meta.subscribe(),
        ProxyDeps {
            dialer,
            opener: Some(Arc::new(NodeOpener {
                tunnel: tunnel.clone(),
                direct: paths.clone(),
            })),
            limiters: limiters.clone(),
        },
        shutdown.clone(),
    )
    .await?;
    // Traffic is captured only now that the proxy is there to take it.
    let (rules, rules_task) = match intercept(&cfg, shutdown.clone()).await {
        Ok(installed) => installed,
        Err(e) => {
            shutdown.cancel();
            proxy.join().await;
            return Err(e);
        }
    };
    let state = AdminState {
        meta: meta.clone(),
        sync: sync.clone(),
        metrics,
        ready: ready.clone(),
        dns: cfg.dns.enabled.then_some(cfg.dns.listen),
        routes: Some(proxy.tables.clone()),
        proxy: Some(admin::ProxySummary {
            listen: std::net::SocketAddr::new(cfg.proxy.listen_address, cfg.proxy.port),
            rules: rules.clone(),
            health: proxy.health.clone(),
            tunnel: Some(tunnel.clone()),
        }),
    };
    let admin_task = tokio::spawn(edgehub::accept::serve_http(
        admin_listener,
        None,
        admin::router(state).merge(crate::direct::routes(direct, paths.clone())),
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
    if let Some(paths) = &paths {
        paths.close().await;
    }
    if let Some(dns) = dns_task {
        let _ = dns.await;
    }
    let _ = admin_task.await;
    proxy.join().await;
    if let Some(task) = rules_task {
        let _ = task.await;
    }
    // The hub link is closed by now, which reset every stream; their tasks end promptly.
    stream_tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), stream_tasks.wait()).await;
    let _ = server_sweeper.await;
    info!("edgemesh stopped");
    Ok(())
}

/// With `proxy.intercept`, installs the iptables rules that send the service range to the
/// proxy, and keeps them installed (and removes them) until `shutdown`.
async fn intercept(
    cfg: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<(Option<Rules>, Option<tokio::task::JoinHandle<()>>)> {
    if !cfg.proxy.intercept {
        info!("proxy.intercept is off: iptables left alone");
        return Ok((None, None));
    }
    let rules = Rules::new(
        cfg.service_cidr,
        cfg.proxy.port,
        cfg.proxy.mark,
        cfg.proxy.udp.route_mark,
        cfg.proxy.udp.route_table,
    );
    if let Err(e) = rules.reconcile().await {
        // Part of the rules may be in: take them out rather than leave the service range
        // redirected to a port nobody will serve.
        if let Err(c) = rules.cleanup().await {
            warn!(error = %c, "cannot remove partly installed iptables rules; run `edgemesh cleanup`");
        }
        return Err(anyhow::anyhow!(
            "config key `proxy.intercept`: cannot install iptables rules: {e}"
        ));
    }
    info!(service_cidr = %cfg.service_cidr, port = cfg.proxy.port, "iptables rules installed");
    let task = tokio::spawn(
        rules
            .clone()
            .keep_installed(cfg.proxy.reconcile_interval, shutdown),
    );
    Ok((Some(rules), Some(task)))
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
