//! Starting and stopping the agent. The local store is opened first and serves on its own, so
//! a node that restarts while the cloud is unreachable comes up with everything it knew.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use edgehub::client::HubClient;
use edgehub::metamanager::MetaManager;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::proxy::LocalNode;

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    run_until(cfg, edgehub::process::shutdown_on_signal()).await
}

pub async fn run_until(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| warn!(error = %e, "metrics recorder not installed"))
        .ok();
    let hub_cfg = cfg.hub_client()?;

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

    let admin_listener = TcpListener::bind(cfg.admin.listen).await.with_context(|| {
        format!(
            "config key `admin.listen`: cannot listen on {}",
            cfg.admin.listen
        )
    })?;

    let client = HubClient::new(hub_cfg, meta.clone());
    let sync = client.status();
    let ready = Arc::new(AtomicBool::new(false));
    if cfg.cloud_urls().is_empty() {
        warn!("cloud.url is not set: serving from the local store only");
    }
    let hub_task = tokio::spawn(client.run(shutdown.clone()));
    let proxy = crate::proxy::start(
        &cfg.proxy,
        cfg.service_cidr,
        LocalNode {
            name: cfg.node_name.clone(),
            labels: cfg.labels.clone(),
        },
        meta.subscribe(),
        shutdown.clone(),
    )
    .await?;
    let state = AdminState {
        meta: meta.clone(),
        sync,
        metrics,
        ready: ready.clone(),
        routes: Some(proxy.tables.clone()),
    };
    let admin_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if let Err(e) = axum::serve(admin_listener, admin::router(state))
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
            {
                warn!(error = %e, "admin API failed");
            }
        }
    });
    ready.store(true, Ordering::Release);
    info!(admin = %cfg.admin.listen, "edgemesh ready");

    shutdown.cancelled().await;
    ready.store(false, Ordering::Release);
    let _ = hub_task.await;
    let _ = admin_task.await;
    proxy.join().await;
    info!("edgemesh stopped");
    Ok(())
}
