//! Several cloudcore replicas on one etcd (cargo feature `etcd`, `store.backend = "etcd"`).
//!
//! The store keeps the replicas consistent ([`crate::store::etcd`]); this module is what they
//! know of each other at run time:
//!
//! - [`presence`]: each replica's lease, and which replica holds which node;
//! - [`link`]: authenticated replica-to-replica links, over which streams between nodes held
//!   by different replicas are relayed (one hop).

pub mod link;
pub mod presence;

use std::sync::Arc;

use anyhow::Context;
use edgehub::tunnel::Mux;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::Config;
use crate::nodes::NodeRegistry;
use crate::store::etcd::EtcdStore;
use crate::tunnel::{RemoteNodes, Tunnels};
use presence::{Health, Lease, PresenceKeeper, ReplicaInfo};

/// This replica's part in the cluster.
pub struct Cluster {
    store: Arc<EtcdStore>,
    nodes: Arc<NodeRegistry>,
    links: link::Links,
}

impl Cluster {
    /// Where the other replicas are: name → advertise URL, from their `replica/` keys.
    pub fn replicas(&self) -> Vec<(String, ReplicaInfo)> {
        self.store
            .cluster_entries("replica/")
            .into_iter()
            .filter_map(|(name, v)| Some((name, serde_json::from_slice(&v).ok()?)))
            .collect()
    }

    /// Closes the outbound replica links (at shutdown, after the hub).
    pub fn close(&self) {
        self.links.close_all();
    }
}

#[async_trait::async_trait]
impl RemoteNodes for Cluster {
    async fn link_to(&self, node: &str) -> Option<Mux> {
        let presence = self.nodes.remote(node)?;
        let url = self
            .replicas()
            .into_iter()
            .find(|(name, _)| *name == presence.replica)
            .map(|(_, info)| info.advertise_url)?;
        match self.links.get(&presence.replica, &url).await {
            Ok(mux) => Some(mux),
            Err(e) => {
                debug!(%node, replica = %presence.replica, error = %e, "no link to the replica holding the node");
                None
            }
        }
    }
}

/// Keeps the router's share of each rule's QPS limit at 1 / (live replicas).
async fn share_rule_limits(
    store: Arc<EtcdStore>,
    router: Arc<crate::router::Router>,
    shutdown: CancellationToken,
) {
    let mut changes = store.subscribe_cluster();
    let mut last = 0;
    loop {
        let n = store.cluster_entries("replica/").len().max(1);
        if n != last {
            router.set_replicas(n);
            info!(replicas = n, "router rule limits shared among the replicas");
            last = n;
        }
        if !edgehub::process::changed(&mut changes, &shutdown).await {
            return;
        }
    }
}

/// Joins the cluster: the replica link listener, the lease, presence, and the hooks that let
/// the hub, the tunnels and `/readyz` see the other replicas. Returns once the listener is
/// bound; the lease is acquired in the background (`/readyz` fails until then).
pub async fn start(
    cfg: &Config,
    store: Arc<EtcdStore>,
    nodes: Arc<NodeRegistry>,
    tunnels: Arc<Tunnels>,
    router: Arc<crate::router::Router>,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Cluster>> {
    let cc = &cfg.cluster;
    let name = cc.replica_name();
    let key_file = cc
        .peer_key_file
        .as_deref()
        .context("config key `cluster.peer_key_file` is required with store.backend = \"etcd\"")?;
    let key = Arc::new(link::PeerKey::load(key_file)?);
    let verifier = Arc::new(link::Verifier::new(link::PeerKey::load(key_file)?));
    let tls = match (&cc.tls_cert, &cc.tls_key) {
        (Some(cert), Some(k)) => Some(tokio_rustls::TlsAcceptor::from(
            edgehub::tls::server_config("cluster.tls_cert", cert, "cluster.tls_key", k)?,
        )),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(cc.listen)
        .await
        .with_context(|| {
            format!(
                "config key `cluster.listen`: cannot listen on {}",
                cc.listen
            )
        })?;
    tokio::spawn(link::serve(
        listener,
        tls,
        verifier,
        tunnels.clone(),
        shutdown.clone(),
    ));

    let lease = Arc::new(Lease::new());
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    nodes.report_to(&name, events_tx);
    // Until the first lease: a node held here would be present nowhere.
    nodes.refuse(true);
    nodes.set_cluster_health(Arc::new(Health {
        lease: lease.clone(),
        store: store.clone(),
        name: name.clone(),
    }));
    let keeper = Arc::new(PresenceKeeper {
        cfg: cc.clone(),
        name: name.clone(),
        store: store.clone(),
        nodes: nodes.clone(),
        lease,
    });
    // etcd's own runtime runs what talks to etcd; it is up as long as the store is.
    let spawned = [
        store.spawn(keeper.clone().keep_lease(shutdown.clone())),
        store.spawn(keeper.clone().write_presence(events_rx, shutdown.clone())),
    ];
    if spawned.iter().any(Option::is_none) {
        anyhow::bail!("the etcd store has stopped");
    }
    tokio::spawn(keeper.follow_presence(shutdown.clone()));
    tokio::spawn(share_rule_limits(store.clone(), router, shutdown.clone()));

    let cluster = Arc::new(Cluster {
        store,
        nodes,
        links: link::Links::new(name.clone(), key, cc.ca_cert.clone(), &tunnels, shutdown),
    });
    tunnels.set_remote_nodes(cluster.clone());
    info!(replica = %name, listen = %cc.listen, advertise = ?cc.advertise_url, "replica link listening");
    Ok(cluster)
}
