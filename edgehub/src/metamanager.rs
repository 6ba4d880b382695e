//! metamanager: the node's own copy of the metadata it was sent.
//!
//! Objects live in SQLite in KubeEdge's `meta(key, type, value)` layout, keyed by resource string,
//! with the value stored byte for byte as the cloud sent it. The committed resource version (and
//! the identity of the cloud store it belongs to) is written in the same transaction as the
//! objects, so after a crash the node knows exactly where to resume.
//!
//! Readers (admin API, later DNS and proxy) never touch SQLite: they read a [`MeshView`], an
//! immutable snapshot of the parsed objects that is replaced after every committed batch and
//! published through a `watch` channel, so a change is visible to them as soon as it is durable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::watch;

use crate::model::{Community, Endpoints, Kind, Node, Object, ObjectKey, Service};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("change {resource} has version {version}, but the store is at {committed}: a change is missing")]
    Gap {
        resource: String,
        version: u64,
        committed: u64,
    },
    #[error("change for {resource} is not a valid object: {reason}")]
    BadObject { resource: String, reason: String },
    #[error("invalid resource {0:?}")]
    BadResource(String),
    #[error("changes from cloud store {got} cannot apply to a copy of store {stored}")]
    StoreMismatch { stored: String, got: String },
    #[error("history mismatch at version {version}: this copy is not the cloud's history")]
    HistoryMismatch { version: u64 },
    #[error("metadata store {path} was written by a newer edgemesh (schema {found}, this one knows {known})")]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

/// One change as received from the cloud.
#[derive(Clone, Debug)]
pub struct EdgeChange {
    pub version: u64,
    pub key: ObjectKey,
    /// `insert`, `update` or `delete`.
    pub operation: String,
    /// The object JSON: the new object, or for a delete the object as it was.
    pub body: String,
}

impl EdgeChange {
    pub fn is_delete(&self) -> bool {
        self.operation == crate::message::op::DELETE
    }
}

/// Where the node's copy stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncPoint {
    pub store_id: Option<String>,
    pub version: u64,
    /// History chain at `version` (see [`crate::message::chain_next`]).
    pub chain: String,
}

/// What applying a batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes written.
    pub applied: usize,
    /// Changes skipped because the store already had them (redelivery).
    pub duplicates: usize,
    pub version: u64,
    pub chain: String,
}

/// Parsed, immutable view of the node's metadata at one version.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    pub version: u64,
    pub store_id: Option<String>,
    pub services: BTreeMap<(String, String), Arc<Service>>,
    pub endpoints: BTreeMap<(String, String), Arc<Endpoints>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    pub communities: BTreeMap<String, Arc<Community>>,
}

impl MeshView {
    fn set(&mut self, key: &ObjectKey, object: Option<Object>) {
        let nk = (key.namespace.clone(), key.name.clone());
        match (key.kind, object) {
            (Kind::Service, Some(Object::Service(mut s))) => {
                // The view lives as long as the agent: give back what deserialising left
                // spare (a Vec grows to 4 slots for one port, ~360 bytes per Service).
                s.spec.ports.shrink_to_fit();
                s.spec.topology_keys.shrink_to_fit();
                self.services.insert(nk, Arc::new(s));
            }
            (Kind::Endpoints, Some(Object::Endpoints(mut e))) => {
                e.subsets.shrink_to_fit();
                for subset in &mut e.subsets {
                    subset.addresses.shrink_to_fit();
                    subset.not_ready_addresses.shrink_to_fit();
                    subset.ports.shrink_to_fit();
                }
                self.endpoints.insert(nk, Arc::new(e));
            }
            (Kind::Node, Some(Object::Node(n))) => {
                self.nodes.insert(key.name.clone(), Arc::new(n));
            }
            (Kind::Service, _) => {
                self.services.remove(&nk);
            }
            (Kind::Endpoints, _) => {
                self.endpoints.remove(&nk);
            }
            (Kind::Node, _) => {
                self.nodes.remove(&key.name);
            }
            (Kind::Community, Some(Object::Community(c))) => {
                self.communities.insert(key.name.clone(), Arc::new(c));
            }
            (Kind::Community, _) => {
                self.communities.remove(&key.name);
            }
        }
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.services
            .get(&(namespace.to_string(), name.to_string()))
    }

    pub fn endpoints_of(&self, namespace: &str, name: &str) -> Option<&Arc<Endpoints>> {
        self.endpoints
            .get(&(namespace.to_string(), name.to_string()))
    }
}

/// The node's metadata store.
pub struct MetaManager {
    path: PathBuf,
    conn: Mutex<Connection>,
    view: watch::Sender<Arc<MeshView>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY NOT NULL,
    type  TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sync_state (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    store_id TEXT,
    version  INTEGER NOT NULL,
    chain    TEXT NOT NULL DEFAULT ''
);
";

/// Version of the layout below, kept in SQLite's `user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// File name of the node's database inside `data_dir`.
pub const DB_FILE: &str = "edgemesh.db";

impl MetaManager {
    /// Opens (or creates) the store under `data_dir` and loads the view from it.
    pub fn open(data_dir: &Path) -> Result<Self, MetaError> {
        std::fs::create_dir_all(data_dir).map_err(|source| MetaError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        Self::open_file(&data_dir.join(DB_FILE))
    }

    pub fn open_file(path: &Path) -> Result<Self, MetaError> {
        let sql = |source| MetaError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        // WAL keeps readers (status, tests) from blocking the writer. NORMAL is enough here: the
        // node resumes from the version stored next to the objects, so losing the last commits
        // in a power cut only makes the cloud resend them.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        // The store is read in full once at startup and otherwise only written; SQLite's
        // default 2 MiB page cache would be resident memory that buys nothing on an edge box.
        conn.pragma_update(None, "cache_size", -256).map_err(sql)?;
        // The schema version lets a later edgemesh migrate this file, and an older one refuse
        // a file it would misread (rather than lose the node's offline copy).
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        if found > SCHEMA_VERSION {
            return Err(MetaError::NewerSchema {
                path: path.to_path_buf(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA).map_err(sql)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql)?;
        let mm = MetaManager {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            view: watch::Sender::new(Arc::new(MeshView::default())),
        };
        let view = mm.load_view()?;
        mm.view.send_replace(Arc::new(view));
        Ok(mm)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sql_err(&self, source: rusqlite::Error) -> MetaError {
        MetaError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Subscribe to the view; it changes after every committed batch.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshView>> {
        self.view.subscribe()
    }

    pub fn view(&self) -> Arc<MeshView> {
        self.view.borrow().clone()
    }

    pub fn sync_point(&self) -> Result<SyncPoint, MetaError> {
        let conn = self.conn();
        read_sync_point(&conn).map_err(|e| self.sql_err(e))
    }

    /// Every stored row as `(key, type, value)`, ordered by key.
    pub fn rows(&self) -> Result<Vec<(String, String, String)>, MetaError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT key, type, value FROM meta ORDER BY key")
            .map_err(|e| self.sql_err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sql_err(e));
        rows
    }

    fn load_view(&self) -> Result<MeshView, MetaError> {
        let point = self.sync_point()?;
        let mut view = MeshView {
            version: point.version,
            store_id: point.store_id,
            ..MeshView::default()
        };
        for (key, _type, value) in self.rows()? {
            let Some(k) = ObjectKey::parse_resource(&key) else {
                tracing::warn!(%key, "ignoring a stored row with an invalid key");
                continue;
            };
            match Object::from_json(k.kind, &value) {
                Ok(obj) => view.set(&k, Some(obj)),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "ignoring a stored object that does not parse")
                }
            }
        }
        Ok(view)
    }

    /// Parses one received object. Broken JSON, or an object that is not the one its change
    /// names, is an error (the cloud would be at fault). Valid JSON that this agent's model
    /// does not know — a newer cloud's field — is stored as sent and left out of the view,
    /// with a warning: one such object must not stop a node from receiving every later change.
    fn parse(key: &ObjectKey, json: &str) -> Result<Option<Object>, MetaError> {
        let bad = |reason: String| MetaError::BadObject {
            resource: key.resource(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let meta = &value["metadata"];
        let named = (
            meta["namespace"].as_str().unwrap_or(""),
            meta["name"].as_str().unwrap_or(""),
        );
        if named != (key.namespace.as_str(), key.name.as_str()) {
            return Err(bad(format!("object is named {}/{}", named.0, named.1)));
        }
        match Object::from_value(value) {
            Ok(obj) if obj.key() == *key => Ok(Some(obj)),
            Ok(obj) => Err(bad(format!("object is {}", obj.key()))),
            Err(e) => {
                tracing::warn!(resource = %key, error = %e, "stored an object this agent cannot interpret; it is left out until an upgrade");
                metrics::counter!("edgemesh_meta_uninterpreted_objects_total").increment(1);
                Ok(None)
            }
        }
    }

    /// Applies a batch of live or delta changes in one transaction together with the new
    /// version. Changes at or below the committed version are skipped (at-least-once delivery
    /// makes redelivery normal); a change that skips a version is an error, because the cloud
    /// sends every version in order.
    /// With `expect`, the chain at that version must be the given one (the end of a delta),
    /// or nothing is committed.
    pub fn apply_changes(
        &self,
        store_id: &str,
        changes: &[EdgeChange],
        expect: Option<(u64, &str)>,
    ) -> Result<Applied, MetaError> {
        let parsed = changes
            .iter()
            .map(|c| {
                if c.is_delete() {
                    Ok(None)
                } else {
                    Self::parse(&c.key, &c.body)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sql_err(e))?;
        let point = read_sync_point(&tx).map_err(|e| self.sql_err(e))?;
        if let Some(stored) = point.store_id.as_deref().filter(|s| *s != store_id) {
            return Err(MetaError::StoreMismatch {
                stored: stored.to_string(),
                got: store_id.to_string(),
            });
        }
        let mut version = point.version;
        let mut chain = point.chain;
        let mut applied = Applied::default();
        let mut written = Vec::new();
        for (change, obj) in changes.iter().zip(parsed) {
            if change.version <= version {
                applied.duplicates += 1;
                continue;
            }
            if change.version != version + 1 {
                return Err(MetaError::Gap {
                    resource: change.key.resource(),
                    version: change.version,
                    committed: version,
                });
            }
            let key = change.key.resource();
            if change.is_delete() {
                tx.execute("DELETE FROM meta WHERE key = ?1", params![key])
            } else {
                tx.execute(
                    "INSERT INTO meta (key, type, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT(key) DO UPDATE SET type = excluded.type, value = excluded.value",
                    params![key, change.key.kind.resource_type(), change.body],
                )
            }
            .map_err(|e| self.sql_err(e))?;
            chain = crate::message::chain_next(
                &chain,
                change.version,
                &change.operation,
                &key,
                &change.body,
            );
            version = change.version;
            if let Some((at, expected)) = expect {
                if version == at && !expected.is_empty() && chain != expected {
                    // Dropping the transaction rolls the whole batch back.
                    return Err(MetaError::HistoryMismatch { version });
                }
            }
            applied.applied += 1;
            written.push((change.key.clone(), obj));
        }
        applied.version = version;
        if applied.applied > 0 {
            write_sync_point(&tx, Some(store_id), version, &chain).map_err(|e| self.sql_err(e))?;
        }
        applied.chain = chain;
        tx.commit().map_err(|e| self.sql_err(e))?;
        drop(conn);
        if applied.applied > 0 {
            self.view.send_modify(|view| {
                let v = Arc::make_mut(view);
                for (key, obj) in written {
                    v.set(&key, obj);
                }
                v.version = version;
                v.store_id = Some(store_id.to_string());
            });
        }
        Ok(applied)
    }

    /// Replaces the whole store with a snapshot at `version`, in one transaction.
    pub fn replace_all(
        &self,
        store_id: &str,
        version: u64,
        chain: &str,
        objects: &[(ObjectKey, String)],
    ) -> Result<usize, MetaError> {
        let mut view = MeshView {
            version,
            store_id: Some(store_id.to_string()),
            ..MeshView::default()
        };
        for (key, json) in objects {
            if let Some(obj) = Self::parse(key, json)? {
                view.set(key, Some(obj));
            }
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sql_err(e))?;
        tx.execute("DELETE FROM meta", [])
            .map_err(|e| self.sql_err(e))?;
        {
            let mut stmt = tx
                .prepare("INSERT OR REPLACE INTO meta (key, type, value) VALUES (?1, ?2, ?3)")
                .map_err(|e| self.sql_err(e))?;
            for (key, json) in objects {
                stmt.execute(params![key.resource(), key.kind.resource_type(), json])
                    .map_err(|e| self.sql_err(e))?;
            }
        }
        write_sync_point(&tx, Some(store_id), version, chain).map_err(|e| self.sql_err(e))?;
        tx.commit().map_err(|e| self.sql_err(e))?;
        drop(conn);
        self.view.send_replace(Arc::new(view));
        Ok(objects.len())
    }
}

fn read_sync_point(conn: &Connection) -> rusqlite::Result<SyncPoint> {
    Ok(conn
        .query_row(
            "SELECT store_id, version, chain FROM sync_state WHERE id = 1",
            [],
            |r| {
                Ok(SyncPoint {
                    store_id: r.get(0)?,
                    version: r.get::<_, i64>(1)? as u64,
                    chain: r.get(2)?,
                })
            },
        )
        .optional()?
        .unwrap_or_default())
}

fn write_sync_point(
    conn: &Connection,
    store_id: Option<&str>,
    version: u64,
    chain: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO sync_state (id, store_id, version, chain) VALUES (1, ?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET store_id = excluded.store_id, version = excluded.version,
         chain = excluded.chain",
        params![store_id, version as i64, chain],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> String {
        format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"clusterIP":"{ip}","ports":[{{"port":80}}],"sessionAffinity":"None"}}}}"#
        )
    }

    fn change(version: u64, name: &str, object: Option<String>) -> EdgeChange {
        EdgeChange {
            version,
            key: ObjectKey::new(Kind::Service, "default", name),
            operation: if object.is_some() { "update" } else { "delete" }.to_string(),
            body: object.unwrap_or_else(|| svc(name, "10.96.0.1")),
        }
    }

    #[test]
    fn batches_commit_with_their_version_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mm = MetaManager::open(dir.path()).expect("open");
        let mut rx = mm.subscribe();
        let a = mm
            .apply_changes(
                "s1",
                &[
                    change(1, "a", Some(svc("a", "10.96.0.1"))),
                    change(2, "b", Some(svc("b", "10.96.0.2"))),
                ],
                None,
            )
            .expect("apply");
        assert_eq!((a.applied, a.version), (2, 2));
        assert!(rx.has_changed().expect("sender alive"));
        assert_eq!(rx.borrow_and_update().services.len(), 2);

        // Redelivery of 2 plus a new delete of a.
        let a = mm
            .apply_changes(
                "s1",
                &[
                    change(2, "b", Some(svc("b", "10.96.0.2"))),
                    change(3, "a", None),
                ],
                None,
            )
            .expect("apply");
        assert_eq!((a.applied, a.duplicates, a.version), (1, 1, 3));
        drop(mm);

        let mm = MetaManager::open(dir.path()).expect("reopen");
        let point = mm.sync_point().expect("point");
        assert_eq!((point.store_id.as_deref(), point.version), (Some("s1"), 3));
        assert_eq!(point.chain.len(), 32);
        let view = mm.view();
        assert!(view.service("default", "a").is_none());
        assert_eq!(
            view.service("default", "b").expect("b").spec.cluster_ip,
            "10.96.0.2"
        );
        // Stored byte for byte.
        assert_eq!(mm.rows().expect("rows")[0].2, svc("b", "10.96.0.2"));
    }

    #[test]
    fn a_gap_or_a_bad_object_rejects_the_whole_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mm = MetaManager::open(dir.path()).expect("open");
        let err = mm
            .apply_changes(
                "s1",
                &[
                    change(1, "a", Some(svc("a", "10.96.0.1"))),
                    change(3, "b", None),
                ],
                None,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                MetaError::Gap {
                    version: 3,
                    committed: 1,
                    ..
                }
            ),
            "{err}"
        );
        let err = mm
            .apply_changes("s1", &[change(1, "a", Some("{not json".into()))], None)
            .unwrap_err();
        assert!(matches!(err, MetaError::BadObject { .. }), "{err}");
        let err = mm
            .apply_changes(
                "s1",
                &[change(1, "a", Some(svc("other", "10.96.0.1")))],
                None,
            )
            .unwrap_err();
        assert!(matches!(err, MetaError::BadObject { .. }), "{err}");
        assert_eq!(mm.sync_point().expect("point").version, 0);
        assert!(mm.rows().expect("rows").is_empty());

        // A field this agent does not know: stored as sent, kept out of the view, not fatal.
        let newer = svc("a", "10.96.0.1").replace(
            r#""sessionAffinity""#,
            r#""fromTheFuture":1,"sessionAffinity""#,
        );
        let a = mm
            .apply_changes("s1", &[change(1, "a", Some(newer.clone()))], None)
            .expect("lenient");
        assert_eq!(a.applied, 1);
        assert_eq!(mm.rows().expect("rows")[0].2, newer);
        assert!(mm.view().service("default", "a").is_none());
    }

    #[test]
    fn a_delta_that_ends_on_another_history_commits_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mm = MetaManager::open(dir.path()).expect("open");
        let batch = [
            change(1, "a", Some(svc("a", "10.96.0.1"))),
            change(2, "b", Some(svc("b", "10.96.0.2"))),
        ];
        let err = mm
            .apply_changes("s1", &batch, Some((2, "not-the-chain")))
            .unwrap_err();
        assert!(
            matches!(err, MetaError::HistoryMismatch { version: 2 }),
            "{err}"
        );
        assert_eq!(mm.sync_point().expect("point").version, 0);
        assert!(mm.view().services.is_empty());
        let ok = mm.apply_changes("s1", &batch, None).expect("apply");
        // The same batch with the right expectation passes.
        let dir2 = tempfile::tempdir().expect("tempdir");
        let mm2 = MetaManager::open(dir2.path()).expect("open");
        mm2.apply_changes("s1", &batch, Some((2, &ok.chain)))
            .expect("matching chain");
    }

    #[test]
    fn a_store_from_a_newer_edgemesh_is_refused_not_clobbered() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(MetaManager::open(dir.path()).expect("create"));
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("bump");
        drop(conn);
        let err = MetaManager::open(dir.path()).err().expect("refused");
        assert!(matches!(err, MetaError::NewerSchema { .. }), "{err}");
    }

    #[test]
    fn snapshot_replaces_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mm = MetaManager::open(dir.path()).expect("open");
        mm.apply_changes(
            "s1",
            &[change(1, "old", Some(svc("old", "10.96.0.1")))],
            None,
        )
        .expect("apply");
        let objects = vec![(
            ObjectKey::new(Kind::Service, "default", "new"),
            svc("new", "10.96.0.9"),
        )];
        mm.replace_all("s2", 500, "c500", &objects)
            .expect("snapshot");
        assert_eq!(mm.sync_point().expect("point").chain, "c500");
        // Changes of another store are refused.
        let err = mm
            .apply_changes("s1", &[change(501, "x", None)], None)
            .unwrap_err();
        assert!(matches!(err, MetaError::StoreMismatch { .. }), "{err}");
        let view = mm.view();
        assert_eq!(view.version, 500);
        assert_eq!(view.store_id.as_deref(), Some("s2"));
        assert!(view.service("default", "old").is_none());
        assert!(view.service("default", "new").is_some());
        assert_eq!(mm.rows().expect("rows").len(), 1);
    }
}
