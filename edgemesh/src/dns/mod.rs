//! Cluster DNS served on every node (SPEC §5).
//!
//! - [`index`]: the cluster zone, a compact index of the node's Services and Endpoints that
//!   follows the metamanager's view, and the answers it gives (protocol types only);
//! - [`forward`] and [`cache`]: every other name, sent to the upstreams and cached;
//! - [`handler`]: hickory's `RequestHandler` that puts the two together, with metrics;
//! - [`server`]: the UDP and TCP transports, within the bounds of [`limits`];
//! - [`address`]: adding `dns.listen` to `lo` when the node does not have it.
//!
//! [`start`] binds the sockets (so a bad `dns.listen` stops startup with an error naming the
//! key) and returns the task that serves until shutdown.

pub mod address;
pub mod cache;
mod config;
pub mod forward;
pub mod handler;
pub mod index;
pub mod limits;
pub mod server;

use std::path::Path;
use std::sync::Arc;

use edgehub::config_file::ConfigError;
use edgehub::metamanager::MetaManager;
use edgehub::view::MeshView;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use config::{nameservers, parse_upstream, DnsConfig, DEFAULT_LISTEN, RESOLV_CONF};
pub use forward::Forwarder;
pub use handler::DnsHandler;
pub use index::{ClusterIndex, Lookup};

/// What cluster DNS answers for, from the agent's top-level keys: the cluster domain, the
/// service range (reverse names) and the node it runs on (topology tiers, unit names).
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub cluster_domain: &'a str,
    pub service_cidr: ipnet::IpNet,
    pub node_name: &'a str,
    pub labels: &'a std::collections::BTreeMap<String, String>,
}

/// Starts cluster DNS as `dns` says: `Ok(None)` when `dns.enabled` is off. The sockets are
/// bound when this returns; the task serves until `shutdown`, then removes the address it
/// added (if any) and ends.
pub async fn start(
    dns: &DnsConfig,
    scope: Scope<'_>,
    meta: &MetaManager,
    shutdown: CancellationToken,
) -> Result<Option<JoinHandle<()>>, ConfigError> {
    if !dns.enabled {
        info!("cluster DNS is off (dns.enabled = false)");
        return Ok(None);
    }
    let (upstreams, skipped) = dns.resolve_upstreams(Path::new(RESOLV_CONF));
    for s in skipped {
        warn!(upstream = %s, "not used as a DNS upstream");
    }
    if upstreams.is_empty() {
        warn!(
            domain = %scope.cluster_domain,
            "no DNS upstreams (dns.upstreams, /etc/resolv.conf): names outside the cluster domain are refused"
        );
    }
    let ttl = u32::try_from(dns.ttl.as_secs()).unwrap_or(u32::MAX);
    let index = ClusterIndex::new(scope.cluster_domain, scope.service_cidr, ttl)
        .map_err(|e| ConfigError::key("cluster_domain", e))?
        .for_node(scope.node_name, scope.labels.clone());
    let index = Arc::new(index);
    let mut views = meta.subscribe();
    let view = views.borrow_and_update().clone();
    index.update(&view);
    drop(view);

    let managed = if dns.setup_address {
        let ip = dns.listen.ip();
        tokio::task::spawn_blocking(move || address::ensure(ip))
            .await
            .map_err(|e| ConfigError::key("dns.listen", e.to_string()))?
            .map_err(|e| {
                ConfigError::key(
                    "dns.listen",
                    format!("{e} (set dns.setup_address = false, or dns.listen to an address of this node)"),
                )
            })?
    } else {
        None
    };
    let (udp, tcp) = match server::bind(dns.listen).await {
        Ok(sockets) => sockets,
        Err(e) => {
            if let Some(m) = managed {
                let _ = tokio::task::spawn_blocking(move || m.remove()).await;
            }
            return Err(ConfigError::key(
                "dns.listen",
                format!("cannot listen on {}: {e}", dns.listen),
            ));
        }
    };
    let forwarder = Forwarder::new(upstreams.clone(), dns.upstream_timeout, dns.cache_size);
    let handler = Arc::new(DnsHandler::new(index.clone(), forwarder));
    let tracker = TaskTracker::new();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    server::serve(
        handler,
        udp,
        tcp,
        workers,
        limits::TcpLimits::default(),
        &shutdown,
        &tracker,
    );
    tracker.spawn(follow(index.clone(), views, shutdown.clone()));
    tracker.close();
    info!(
        listen = %dns.listen,
        upstreams = ?upstreams,
        added_address = managed.is_some(),
        services = index.len(),
        "cluster DNS serving"
    );
    Ok(Some(tokio::spawn(async move {
        tracker.wait().await;
        if let Some(m) = managed {
            let ip = m.ip();
            match tokio::task::spawn_blocking(move || m.remove()).await {
                Ok(Ok(())) => info!(%ip, "DNS address removed from lo"),
                Ok(Err(e)) => warn!(%ip, error = %e, "cannot remove the DNS address from lo"),
                Err(e) => warn!(%ip, error = %e, "cannot remove the DNS address from lo"),
            }
        }
    })))
}

/// Keeps the index in step with the metamanager's view.
async fn follow(
    index: Arc<ClusterIndex>,
    mut views: watch::Receiver<Arc<MeshView>>,
    shutdown: CancellationToken,
) {
    loop {
        if !edgehub::process::changed(&mut views, &shutdown).await {
            return;
        }
        // Cloned out so the view is not borrowed while the index is updated.
        let view = views.borrow_and_update().clone();
        let updated = index.update(&view);
        debug!(
            version = view.version,
            changed = updated.changed,
            removed = updated.removed,
            "DNS index updated"
        );
    }
}

/// Removes the address the agent added for `dns.listen`, if it is still there (for
/// `edgemesh cleanup` after a crash). Returns whether there was one.
pub fn cleanup(dns: &DnsConfig) -> Result<bool, String> {
    address::cleanup(dns.listen.ip())
}
