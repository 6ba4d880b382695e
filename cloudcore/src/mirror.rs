//! cloudcore's in-memory view of the store's Services, Endpoints and Nodes, the same
//! [`MeshView`] a node keeps: what stream checks, QPS limits and the router's routes read, so
//! that no stream or request reads the store. It follows the store's change log (one read per
//! commit, of the changes since the last one) and reloads everything when the log no longer
//! reaches back that far.

use std::sync::Arc;

use edgehub::metamanager::MeshView;
use edgehub::model::{Kind, Object};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::store::{ChangeOp, Since, Store, StoreError};

/// Everything in the store, at its current version.
pub fn load(store: &dyn Store) -> Result<MeshView, StoreError> {
    let version = store.version();
    let mut view = MeshView {
        version,
        store_id: Some(store.store_id().to_string()),
        ..MeshView::default()
    };
    for kind in [Kind::Service, Kind::Endpoints, Kind::Node] {
        for record in store.list(kind, None)? {
            match Object::from_json(kind, &record.json) {
                Ok(object) => view.set(&record.key, Some(object)),
                Err(e) => {
                    warn!(object = %record.key, error = %e, "stored object cannot be read; left out")
                }
            }
        }
    }
    Ok(view)
}

/// The view after the changes committed since `view` was made: `None` when nothing changed.
fn advance(store: &dyn Store, view: &MeshView) -> Result<Option<MeshView>, StoreError> {
    match store.changes_since(view.version, None) {
        Since::Current => Ok(None),
        Since::Gone => load(store).map(Some),
        Since::Changes(changes) => {
            let mut next = view.clone();
            for change in changes.iter() {
                next.version = change.version;
                if !matches!(
                    change.key.kind,
                    Kind::Service | Kind::Endpoints | Kind::Node
                ) {
                    continue;
                }
                let object = match change.op {
                    ChangeOp::Delete => None,
                    ChangeOp::Insert | ChangeOp::Update => {
                        match Object::from_json(change.key.kind, &change.json) {
                            Ok(object) => Some(object),
                            Err(e) => {
                                warn!(object = %change.key, error = %e, "changed object cannot be read; left out");
                                None
                            }
                        }
                    }
                };
                next.set(&change.key, object);
            }
            Ok(Some(next))
        }
    }
}

/// Keeps `views` in step with the store until `shutdown`.
pub async fn follow(
    store: Arc<dyn Store>,
    views: watch::Sender<Arc<MeshView>>,
    shutdown: CancellationToken,
) {
    let mut versions = store.subscribe();
    loop {
        // Commits made before this task subscribed are caught here, on the first round.
        let current = views.borrow().clone();
        let store = store.clone();
        let advanced = tokio::task::spawn_blocking(move || advance(&*store, &current)).await;
        match advanced {
            Ok(Ok(Some(next))) => {
                debug!(version = next.version, "view of the store updated");
                views.send_replace(Arc::new(next));
            }
            Ok(Ok(None)) => {}
            // The next commit tries again from the same version.
            Ok(Err(e)) => warn!(error = %e, "reading the store's changes failed"),
            Err(e) => warn!(error = %e, "reading the store's changes failed"),
        }
        if !edgehub::process::changed(&mut versions, &shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::Write;

    fn service(name: &str) -> Object {
        Object::from_value(serde_json::json!({"kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}}))
        .expect("service")
    }

    #[test]
    fn the_view_follows_writes_deletes_and_a_lost_history() {
        let dir = tempfile::tempdir().expect("dir");
        // A history of 2 changes: the third write makes the first view's version too old.
        let store = SqliteStore::open(&dir.path().join("c.db"), 2, 1 << 20).expect("open");
        let put = |o: Object| Write::Put {
            object: o,
            expect_version: None,
        };
        store.write(vec![put(service("a"))]).expect("write");
        let first = load(&store).expect("load");
        assert!(first.service("default", "a").is_some());
        assert!(advance(&store, &first).expect("advance").is_none());

        store.write(vec![put(service("b"))]).expect("write");
        let second = advance(&store, &first).expect("advance").expect("changed");
        assert!(second.service("default", "b").is_some());
        assert_eq!(second.version, store.version());

        let key = service("a").key();
        store.write(vec![Write::Delete { key }]).expect("delete");
        store.write(vec![put(service("c"))]).expect("write");
        store.write(vec![put(service("d"))]).expect("write");
        let reloaded = advance(&store, &first).expect("advance").expect("changed");
        assert!(reloaded.service("default", "a").is_none(), "deleted");
        assert_eq!(reloaded.services.len(), 3);
        assert_eq!(reloaded.version, store.version());
    }
}
