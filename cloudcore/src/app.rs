//! Starting and stopping cloudcore: store, API, hub, in that order, and back down on SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, ApiState};
use crate::auth::{load_or_create_api_token, NodeTokens};
use crate::config::Config;
use crate::direct::Direct;
use crate::hub::Hub;
use crate::nodes::NodeRegistry;
use crate::objects::Objects;
use crate::router::Router;
use crate::store::sqlite::{SqliteStore, DB_FILE};
use crate::store::Store;
use crate::tunnel::Tunnels;

async fn bind(key: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("config key `{key}`: cannot listen on {addr}"))
}

/// Runs cloudcore until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    run_until(cfg, edgehub::process::shutdown_on_signal()).await
}

pub async fn run_until(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = crate::telemetry::install();

    let db = cfg.data_dir.join(DB_FILE);
    let store: Arc<dyn Store> = {
        let (history, history_bytes) = (cfg.store.history, cfg.store.history_bytes);
        let path = db.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || SqliteStore::open(&path, history, history_bytes))
                .await?
                .with_context(|| {
                    format!(
                        "config key `data_dir`: cannot open the store {}",
                        db.display()
                    )
                })?,
        )
    };
    info!(path = %db.display(), version = store.version(), store_id = store.store_id(), "store open");
    let api_token = load_or_create_api_token(cfg.api.token.as_deref(), &cfg.data_dir)
        .with_context(|| {
            format!(
                "config key `data_dir`: cannot keep the API token in {}",
                cfg.data_dir.display()
            )
        })?;
    let tokens = Arc::new(NodeTokens::load(store.clone())?);
    let objects = Arc::new(Objects::new(store.clone(), cfg.service_cidr)?);
    let nodes = Arc::new(NodeRegistry::default());

    let ca = crate::ca::MeshCa::load_or_create(&cfg.data_dir)
        .with_context(|| "config key `data_dir`: cannot keep the mesh CA".to_string())?;
    let reflector = tokio::net::UdpSocket::bind(cfg.direct.listen)
        .await
        .with_context(|| format!("config key `direct.listen`: UDP {}", cfg.direct.listen))?;
    let direct_cfg = crate::direct::DirectConfig {
        listen: reflector.local_addr()?,
    };
    let direct = Direct::new(
        &direct_cfg,
        &cfg.communities,
        &cfg.identity,
        ca,
        objects.clone(),
        tokens.clone(),
    )?;

    // The hub also takes nodes' certificates (mTLS: no token needed once a node has one);
    // the API does not ask for one.
    let (hub_tls, tls) = match (&cfg.hub.tls_cert, &cfg.hub.tls_key) {
        (Some(cert), Some(key)) => {
            let hub = edgehub::tls::server_config_with_clients(
                "hub.tls_cert",
                cert,
                "hub.tls_key",
                key,
                Some(direct.ca().cert_der().clone()),
            )?;
            let api = edgehub::tls::server_config("hub.tls_cert", cert, "hub.tls_key", key)?;
            (
                Some(tokio_rustls::TlsAcceptor::from(hub)),
                Some(tokio_rustls::TlsAcceptor::from(api)),
            )
        }
        _ => {
            warn!("hub.tls_cert and hub.tls_key are not set: the hub and the API serve plain text; tokens cross the network unencrypted");
            (None, None)
        }
    };

    let hub_listener = bind("hub.listen", cfg.hub.listen).await?;
    let api_listener = bind("api.listen", cfg.api.listen).await?;
    let router_listener = bind("router.listen", cfg.router.listen).await?;
    let tunnels = Arc::new(Tunnels::new(cfg.tunnel.clone(), store.clone()));
    let router = Arc::new(
        Router::new(cfg.router.clone(), objects.clone(), tunnels.clone())
            .context("cannot load the router's rules from the store")?,
    );
    tunnels.set_virtual_services(Arc::new(crate::router::RouterStreams(router.clone())));
    let ready = Arc::new(AtomicBool::new(false));
    let state = ApiState {
        objects: objects.clone(),
        tokens: tokens.clone(),
        nodes: nodes.clone(),
        api_token: api_token.into(),
        metrics,
        ready: ready.clone(),
        router: router.clone(),
    };
    let hub = Arc::new(Hub::new(
        cfg.hub.clone(),
        store.clone(),
        objects,
        tokens,
        nodes.clone(),
        tunnels.clone(),
        direct.clone(),
    ));
    tokio::spawn(tunnels.clone().follow_limits(shutdown.clone()));
    tokio::spawn(direct.clone().follow(shutdown.clone()));
    let reflector_task = tokio::spawn(direct.serve_reflector(reflector, shutdown.clone()));
    let hub_task = tokio::spawn(hub.serve(hub_listener, hub_tls, shutdown.clone()));
    let api_task = tokio::spawn(crate::serve::serve(
        api_listener,
        tls,
        api::router(state, cfg.api.max_body_size),
        shutdown.clone(),
    ));
    let router_task = tokio::spawn(router.serve_ingress(router_listener, shutdown.clone()));
    ready.store(true, Ordering::Release);
    info!(hub = %cfg.hub.listen, api = %cfg.api.listen, router = %cfg.router.listen, "cloudcore ready");
    edgehub::systemd::ready(&format!(
        "serving: hub {}, API {}, router {}",
        cfg.hub.listen, cfg.api.listen, cfg.router.listen
    ));
    edgehub::systemd::watchdog(shutdown.clone());
    tokio::spawn(report_status(cfg.clone(), nodes, shutdown.clone()));

    shutdown.cancelled().await;
    edgehub::systemd::stopping();
    ready.store(false, Ordering::Release);
    let _ = hub_task.await;
    tunnels.shutdown().await;
    let _ = api_task.await;
    let _ = router_task.await;
    let _ = reflector_task.await;
    info!("cloudcore stopped");
    Ok(())
}

/// Keeps the systemd status line current: how many nodes are online.
async fn report_status(cfg: Config, nodes: Arc<NodeRegistry>, shutdown: CancellationToken) {
    let mut last = 0usize;
    let period = std::time::Duration::from_secs(5);
    while shutdown
        .run_until_cancelled(tokio::time::sleep(period))
        .await
        .is_some()
    {
        let online = nodes.online_count();
        if online != last {
            edgehub::systemd::status(&format!(
                "serving: hub {}, API {}, router {}; nodes online: {online}",
                cfg.hub.listen, cfg.api.listen, cfg.router.listen
            ));
            last = online;
        }
    }
}
