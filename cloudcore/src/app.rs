//! Starting and stopping cloudcore: store, API, hub, in that order, and back down on SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use edgehub::connect::Dialer;
use edgehub::http::HttpConfig;
use edgehub::io::Timeouts;
use edgehub::limits::Limiters;
use edgehub::serve::{ServeTimeouts, StreamServer};
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
use crate::router::{DataPath, Router};
use crate::store::sqlite::{SqliteStore, DB_FILE};
use crate::store::Store;
use crate::tunnel::Tunnels;

/// How long the first bytes of a stream to a rate-limited cloud Service may take to show
/// whether it is HTTP.
const DETECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

async fn bind(key: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("config key `{key}`: cannot listen on {addr}"))
}

/// The store `store.backend` names, and on etcd the store itself for the cluster module.
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    #[cfg(feature = "etcd")]
    pub etcd: Option<Arc<crate::store::etcd::EtcdStore>>,
}

/// Opens the store `store.backend` names: the SQLite file in `data_dir`, or etcd.
pub async fn open_store(cfg: &Config) -> anyhow::Result<OpenedStore> {
    let (history, history_bytes) = (cfg.store.history, cfg.store.history_bytes);
    if cfg.is_ha() {
        return open_etcd(cfg, history, history_bytes).await;
    }
    let db = cfg.data_dir.join(DB_FILE);
    let path = db.clone();
    let store =
        tokio::task::spawn_blocking(move || SqliteStore::open(&path, history, history_bytes))
            .await?
            .with_context(|| {
                format!(
                    "config key `data_dir`: cannot open the store {}",
                    db.display()
                )
            })?;
    info!(path = %db.display(), version = store.version(), store_id = store.store_id(), "store open");
    Ok(OpenedStore {
        store: Arc::new(store),
        #[cfg(feature = "etcd")]
        etcd: None,
    })
}

#[cfg(feature = "etcd")]
async fn open_etcd(
    cfg: &Config,
    history: usize,
    history_bytes: usize,
) -> anyhow::Result<OpenedStore> {
    let etcd = cfg.store.etcd.clone();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || {
            crate::store::etcd::EtcdStore::open(&etcd, history, history_bytes)
        })
        .await?
        .context("cannot open the etcd store")?,
    );
    Ok(OpenedStore {
        store: store.clone(),
        etcd: Some(store),
    })
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(_: &Config, _: usize, _: usize) -> anyhow::Result<OpenedStore> {
    anyhow::bail!(
        "config key `store.backend`: etcd needs a cloudcore built with `cargo build --features etcd`"
    )
}

/// Runs cloudcore until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    run_until(cfg, edgehub::process::shutdown_on_signal()).await
}

pub async fn run_until(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = crate::telemetry::install();

    let opened = open_store(&cfg).await?;
    let store = opened.store.clone();
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
    // What every stream check, QPS limit and route reads: the store as of its last commit.
    let view = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || crate::mirror::load(&*store))
            .await?
            .context("cannot read the store")?
    };
    let (views_tx, views) = tokio::sync::watch::channel(Arc::new(view));
    let mut background = vec![tokio::spawn(crate::mirror::follow(
        store.clone(),
        views_tx,
        shutdown.clone(),
    ))];
    let limiters = Arc::new(Limiters::new());
    background.push(tokio::spawn(edgehub::limits::follow(
        views.clone(),
        limiters.clone(),
        shutdown.clone(),
    )));
    let dialer = Arc::new(Dialer::new(None, cfg.tunnel.connect_timeout));
    let join = Timeouts {
        idle: cfg.tunnel.idle_timeout,
        half_closed: cfg.tunnel.half_close_timeout,
    };
    let http = HttpConfig {
        request_timeout: cfg.router.request_timeout,
        ..HttpConfig::default()
    };
    let server = Arc::new(StreamServer::new(
        None,
        dialer,
        limiters.clone(),
        http.clone(),
        ServeTimeouts {
            detect: DETECT_TIMEOUT,
            join,
        },
    ));
    background.push(tokio::spawn(server.clone().sweep(shutdown.clone())));
    let tunnels = Arc::new(Tunnels::new(
        cfg.tunnel.clone(),
        views.clone(),
        server,
        shutdown.clone(),
    ));
    let (data, tasks) = DataPath::start(
        views,
        tunnels.clone(),
        limiters,
        http,
        cfg.tunnel.connect_timeout,
        shutdown.clone(),
    );
    background.extend(tasks);
    let router = Arc::new(
        Router::new(cfg.router.clone(), objects.clone(), data)
            .context("cannot load the router's rules from the store")?,
    );
    tunnels.set_virtual_services(Arc::new(crate::router::RouterStreams(router.clone())));
    #[cfg(feature = "etcd")]
    let cluster = match &opened.etcd {
        Some(etcd) => Some(
            crate::cluster::start(
                &cfg,
                etcd.clone(),
                nodes.clone(),
                tunnels.clone(),
                router.clone(),
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
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
        tokens.clone(),
        nodes.clone(),
        tunnels.clone(),
        direct.clone(),
    ));
    tokio::spawn(edgehub::process::release_memory_after_bursts(
        store.subscribe(),
        shutdown.clone(),
    ));
    tokio::spawn(tokens.clone().follow(nodes.clone(), shutdown.clone()));
    tokio::spawn(router.clone().follow(shutdown.clone()));
    tokio::spawn(direct.clone().follow(shutdown.clone()));
    let reflector_task = tokio::spawn(direct.serve_reflector(reflector, shutdown.clone()));
    tokio::spawn(hub.clone().drop_stale_snapshots(shutdown.clone()));
    let hub_task = tokio::spawn(hub.serve(hub_listener, hub_tls, shutdown.clone()));
    let api_task = tokio::spawn(edgehub::accept::serve_http(
        api_listener,
        tls,
        api::router(state, cfg.api.max_body_size),
        cfg.api.limits(cfg.hub.handshake_timeout),
        "api",
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
    #[cfg(feature = "etcd")]
    if let Some(c) = &cluster {
        c.close();
    }
    let _ = api_task.await;
    let _ = router_task.await;
    for task in background {
        let _ = task.await;
    }
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
