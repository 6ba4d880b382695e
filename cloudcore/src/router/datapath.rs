//! How the router reaches Services of the mesh: the data path nodes use (edgehub's route
//! table, balancer with outlier ejection and HTTP engine with pooled connections and retries),
//! over cloudcore's view of its store, with the nodes' links as the way to edge endpoints.

use std::sync::Arc;
use std::time::Duration;

use edgehub::balance::{HealthRegistry, OutlierConfig};
use edgehub::connect::{Connector, Dialer, Opener};
use edgehub::http::{Http, HttpConfig};
use edgehub::io::Timeouts;
use edgehub::limits::Limiters;
use edgehub::routes::{self, Index, LocalNode, Route, RouteTable};
use edgehub::view::MeshView;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Endpoints tried for one request before it fails.
const ATTEMPTS: u32 = 3;

pub struct DataPath {
    http: Arc<Http>,
    tables: watch::Receiver<Arc<RouteTable>>,
}

impl DataPath {
    /// Builds the route table for `views` (and keeps it current until `shutdown`) and the
    /// HTTP engine over it. Cloud endpoints are dialled here (`connect_timeout`), edge ones
    /// reached through `opener`; the Services' QPS limits of cloud endpoints apply here.
    pub fn start(
        mut views: watch::Receiver<Arc<MeshView>>,
        opener: Arc<dyn Opener>,
        limiters: Arc<Limiters>,
        http: HttpConfig,
        connect_timeout: Duration,
        shutdown: CancellationToken,
    ) -> (DataPath, Vec<JoinHandle<()>>) {
        let health = Arc::new(HealthRegistry::new(OutlierConfig::default()));
        views.borrow_and_update();
        let first = RouteTable::build(
            &views,
            &LocalNode::cloud(),
            &health,
            &RouteTable::default(),
            Index::AlsoByName,
        );
        let (tx, tables) = watch::channel(Arc::new(first));
        let follow = tokio::spawn(routes::follow_view(
            views,
            LocalNode::cloud(),
            health,
            tx,
            Index::AlsoByName,
            shutdown.clone(),
        ));
        let connector = Connector::new(
            Arc::new(Dialer::new(None, connect_timeout)),
            ATTEMPTS,
            None,
            Some(opener),
        );
        // Only request heads are timed; the router bounds a whole request itself.
        let upgraded = Timeouts {
            idle: Duration::from_secs(3600),
            half_closed: Duration::from_secs(60),
        };
        let http = Arc::new(Http::new(http, upgraded, Arc::new(connector), limiters));
        let sweep = tokio::spawn(http.clone().sweep_pool(shutdown));
        (DataPath { http, tables }, vec![follow, sweep])
    }

    /// The route of Service port `namespace/name:port`, headless Services included.
    pub fn route(&self, namespace: &str, name: &str, port: u16) -> Option<Arc<Route>> {
        self.tables.borrow().by_name(namespace, name, port).cloned()
    }

    pub fn http(&self) -> &Arc<Http> {
        &self.http
    }
}

#[cfg(test)]
impl DataPath {
    /// A data path over `store` for unit tests, following it for as long as the runtime runs;
    /// streams to edge endpoints go to `opener`.
    pub(crate) fn for_tests(
        store: Arc<dyn crate::store::Store>,
        opener: Arc<dyn Opener>,
    ) -> DataPath {
        let view = crate::mirror::load(&*store).expect("load the store");
        let (tx, views) = watch::channel(Arc::new(view));
        let forever = CancellationToken::new();
        tokio::spawn(crate::mirror::follow(store, tx, forever.clone()));
        let http = HttpConfig {
            request_timeout: Duration::from_secs(2),
            ..HttpConfig::default()
        };
        let limiters = Arc::new(Limiters::new());
        tokio::spawn(edgehub::limits::follow(
            views.clone(),
            limiters.clone(),
            forever.clone(),
        ));
        let (data, _) = DataPath::start(
            views,
            opener,
            limiters,
            http,
            Duration::from_secs(1),
            forever,
        );
        data
    }

    /// Waits until the routes reflect the store at `version`.
    pub(crate) async fn caught_up(&self, version: u64) {
        let mut tables = self.tables.clone();
        let _ = tables.wait_for(|t| t.version >= version).await;
    }
}
