//! cloudcore's in-memory view of the store's Services, Endpoints and Nodes, the same
//! [`MeshView`] a node keeps: what stream checks, QPS limits and the router's routes read, so
//! that no stream or request reads the store. It follows the store's change log (one read per
//! commit, of the changes since the last one) and reloads everything when the log no longer
//! reaches back that far.

use std::sync::Arc;

use edgehub::model::{Kind, Object, ObjectKey};
use edgehub::view::MeshView;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::store::{ChangeOp, Since, Store, StoreError};

/// Everything in the store, at its current version.
pub fn load(store: &dyn Store) -> Result<MeshView, StoreError> {
    let version = store.version();
    let mut stored = Vec::new();
    for kind in [Kind::Service, Kind::Endpoints, Kind::Node] {
        stored.push((kind, store.list(kind, None)?));
    }
    // Parsed one at a time as the view takes them: the typed objects are not all held at once.
    let objects = stored
        .into_iter()
        .flat_map(|(kind, records)| records.into_iter().map(move |r| (kind, r)))
        .filter_map(|(kind, record)| match Object::from_json(kind, &record.json) {
            Ok(object) => Some((record.key, object)),
            Err(e) => {
                warn!(object = %record.key, error = %e, "stored object cannot be read; left out");
                None
            }
        });
    let store_id = Some(store.store_id().to_string());
    Ok(MeshView::from_objects(version, store_id, objects))
}

/// What the store committed after some version, ready to apply to a view.
enum Advance {
    Current,
    /// The changes, parsed (`None`: the object is gone), and the version they bring the view to.
    Changes {
        version: u64,
        objects: Vec<(ObjectKey, Option<Object>)>,
    },
    /// The log no longer reaches back that far: everything, loaded again.
    Reloaded(MeshView),
}

/// Reads and parses the changes committed since `version` (on a blocking thread: the store is
/// SQLite or etcd).
fn advance(store: &dyn Store, version: u64) -> Result<Advance, StoreError> {
    match store.changes_since(version, None) {
        Since::Current => Ok(Advance::Current),
        Since::Gone => load(store).map(Advance::Reloaded),
        Since::Changes(changes) => {
            let version = changes.last().map_or(version, |c| c.version);
            let objects = changes
                .iter()
                .filter(|c| matches!(c.key.kind, Kind::Service | Kind::Endpoints | Kind::Node))
                .map(|change| {
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
                    (change.key.clone(), object)
                })
                .collect();
            Ok(Advance::Changes { version, objects })
        }
    }
}

/// Applies `objects` to the view in `views`, in place: the view is copied only if a reader
/// holds it at that moment. Copying it for every commit made a fleet's token issuance (a Node
/// object each) quadratic: 10,500 tokens took 20 s, most of it copying and freeing maps.
fn apply(
    views: &watch::Sender<Arc<MeshView>>,
    version: u64,
    objects: Vec<(ObjectKey, Option<Object>)>,
) {
    views.send_modify(|view| {
        let view = Arc::make_mut(view);
        for (key, object) in objects {
            view.set(&key, object);
        }
        view.version = version;
    });
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
        let from = views.borrow().version;
        let store = store.clone();
        let advanced = tokio::task::spawn_blocking(move || advance(&*store, from)).await;
        match advanced {
            Ok(Ok(Advance::Changes { version, objects })) => {
                debug!(
                    version,
                    changes = objects.len(),
                    "view of the store updated"
                );
                apply(&views, version, objects);
            }
            Ok(Ok(Advance::Reloaded(view))) => {
                debug!(version = view.version, "view of the store reloaded");
                views.send_replace(Arc::new(view));
            }
            Ok(Ok(Advance::Current)) => {}
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

    /// The view `views` holds after following the store once.
    fn follow_once(store: &SqliteStore, views: &watch::Sender<Arc<MeshView>>) -> bool {
        let from = views.borrow().version;
        match advance(store, from).expect("advance") {
            Advance::Current => false,
            Advance::Changes { version, objects } => {
                apply(views, version, objects);
                true
            }
            Advance::Reloaded(view) => {
                views.send_replace(Arc::new(view));
                true
            }
        }
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
        let (views, _rx) = watch::channel(Arc::new(load(&store).expect("load")));
        assert!(views.borrow().service("default", "a").is_some());
        assert!(!follow_once(&store, &views), "nothing new");

        // A reader holding the view keeps what it holds; the next view has the change.
        let held = views.borrow().clone();
        store.write(vec![put(service("b"))]).expect("write");
        assert!(follow_once(&store, &views));
        assert!(views.borrow().service("default", "b").is_some());
        assert_eq!(views.borrow().version, store.version());
        assert!(
            held.service("default", "b").is_none(),
            "the held view is unchanged"
        );

        let key = service("a").key();
        store.write(vec![Write::Delete { key }]).expect("delete");
        store.write(vec![put(service("c"))]).expect("write");
        store.write(vec![put(service("d"))]).expect("write");
        // Three changes on a log that keeps two: the view is loaded again.
        assert!(matches!(
            advance(&store, held.version).expect("advance"),
            Advance::Reloaded(_)
        ));
        assert!(follow_once(&store, &views));
        let view = views.borrow().clone();
        assert!(view.service("default", "a").is_none(), "deleted");
        assert_eq!(view.services.len(), 3);
        assert_eq!(view.version, store.version());
    }
}
