//! metamanager: the node's own copy of the metadata it was sent.
//!
//! Objects live in SQLite in KubeEdge's `meta(key, type, value)` layout, keyed by resource string,
//! with the value stored byte for byte as the cloud sent it. The committed resource version (and
//! the identity of the cloud store it belongs to) is written in the same transaction as the
//! objects, so after a crash the node knows exactly where to resume.
//!
//! The data path (routes, DNS, stream checks, limits) never touches SQLite: it reads a
//! [`MeshView`], compact records of the objects, replaced after every committed batch and
//! published through a `watch` channel, so a change is visible as soon as it is durable. The
//! objects themselves are read from SQLite when asked for ([`MetaManager::objects`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::model::{Kind, Object, ObjectKey};
use crate::view::MeshView;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("node store {path}: {source}{}", fix_for(.source))]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the data directory {path}: {source}; edgemesh needs to create it, or write to it (it runs as root under systemd)")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a usable store (malformed, not a database, an unreadable sync state).
    #[error("node store {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// The corrupt file could not be moved aside.
    #[error("node store {path} is corrupt ({detail}) and cannot be moved aside: {source}; move or delete it (and its -wal and -shm files) and start edgemesh again: the node resyncs from the cloud")]
    CannotSetAside {
        path: PathBuf,
        detail: String,
        #[source]
        source: std::io::Error,
    },
    /// The store was found corrupt while running and replaced by an empty one; the next sync
    /// fills it again.
    #[error("node store {path} turned out corrupt ({detail}); it was moved to {moved_to} and replaced by an empty store, which the next sync fills from the cloud")]
    Replaced {
        path: PathBuf,
        moved_to: PathBuf,
        detail: String,
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
    #[error("node store {path} was written by a newer edgemesh (schema {found}, this one knows {known}); run that version again, or move the file aside to make this one start empty and resync from the cloud")]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

impl MetaError {
    /// Whether the error says the file itself is broken: the one case where the store is set
    /// aside and rebuilt from the cloud. Locks, permissions, a full disk or a newer schema are
    /// not: the file may be fine, so it is never touched for those.
    pub fn is_corruption(&self) -> bool {
        match self {
            MetaError::Corrupt { .. } => true,
            MetaError::Sqlite { source, .. } => sqlite_corruption(source),
            _ => false,
        }
    }
}

fn sqlite_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// What an operator can do about an SQLite error, appended to its message.
fn fix_for(e: &rusqlite::Error) -> &'static str {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::DatabaseBusy | C::DatabaseLocked) => {
            "; another process holds the file: is a second edgemesh running with the same data_dir?"
        }
        Some(C::PermissionDenied | C::ReadOnly | C::CannotOpen) => {
            "; edgemesh needs to read and write the file and its directory"
        }
        Some(C::DiskFull) => "; the disk is full: free space and restart edgemesh",
        Some(C::SystemIoFailure) => "; the disk failed to read or write it: check the disk (dmesg)",
        Some(C::DatabaseCorrupt | C::NotADatabase) => {
            "; the agent moves a corrupt store aside when it starts and resyncs from the cloud"
        }
        _ => "",
    }
}

/// A corrupt store that was moved aside and replaced by an empty one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recovery {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Where the bad file was moved (kept for inspection).
    pub moved_to: PathBuf,
    /// What was wrong with it.
    pub reason: String,
    /// Whether a snapshot from the cloud has been written since.
    pub resynced: bool,
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

/// The node's metadata store.
pub struct MetaManager {
    path: PathBuf,
    conn: Mutex<Connection>,
    view: watch::Sender<Arc<MeshView>>,
    /// The last time a corrupt store was replaced, while this process runs.
    recovery: Mutex<Option<Recovery>>,
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
    /// Opens (or creates) the store under `data_dir` and loads the view from it. A corrupt
    /// file is moved aside (see [`Recovery`]) and the node starts empty: its store is a copy
    /// of the cloud's, so the next sync rebuilds it, and a node that refused to start would
    /// serve nothing at all.
    pub fn open(data_dir: &Path) -> Result<Self, MetaError> {
        std::fs::create_dir_all(data_dir).map_err(|source| MetaError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        match Self::open_file(&path) {
            Err(e) if e.is_corruption() => {
                let detail = corruption_detail(&e);
                let moved_to = set_aside(&path).map_err(|source| MetaError::CannotSetAside {
                    path: path.clone(),
                    detail: detail.clone(),
                    source,
                })?;
                tracing::error!(
                    store = %path.display(),
                    moved_to = %moved_to.display(),
                    reason = %detail,
                    "the node store is corrupt: moved it aside (kept for inspection); starting empty, the next sync from the cloud fills it again"
                );
                let mm = Self::open_file(&path)?;
                mm.recovered(moved_to, detail);
                Ok(mm)
            }
            other => other,
        }
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
        refuse_newer_schema(&conn, path)?;
        check_integrity(&conn, path)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql)?;
        Self::loaded(path, conn)
    }

    /// The store on `conn`, its view loaded.
    fn loaded(path: &Path, conn: Connection) -> Result<Self, MetaError> {
        let mm = MetaManager {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            view: watch::Sender::new(Arc::new(MeshView::default())),
            recovery: Mutex::new(None),
        };
        let view = mm.load_view()?;
        mm.view.send_replace(Arc::new(view));
        Ok(mm)
    }

    /// Opens an existing store read-only, for a look at it while no agent runs
    /// (`edgemesh status`): `None` when there is no store at `path`. Never creates, migrates,
    /// repairs or moves anything.
    pub fn open_existing_read_only(path: &Path) -> Result<Option<Self>, MetaError> {
        if !path.exists() {
            return Ok(None);
        }
        let sql = |source| MetaError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        refuse_newer_schema(&conn, path)?;
        Self::loaded(path, conn).map(Some)
    }

    /// The corrupt store this process replaced, if it replaced one.
    pub fn recovery(&self) -> Option<Recovery> {
        self.recovery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn recovered(&self, moved_to: PathBuf, reason: String) {
        metrics::counter!("edgemesh_meta_store_recoveries_total").increment(1);
        *self.recovery.lock().unwrap_or_else(|p| p.into_inner()) = Some(Recovery {
            at_ms: now_ms(),
            moved_to,
            reason,
            resynced: false,
        });
    }

    /// Runs one store operation; when it finds the file corrupt, the file is set aside and an
    /// empty store takes its place, and the error says so. The view is left as it is: the node
    /// keeps serving what it knew until the next sync (which starts from nothing, so it is a
    /// snapshot) replaces it.
    fn guarded<T>(&self, op: impl FnOnce() -> Result<T, MetaError>) -> Result<T, MetaError> {
        let err = match op() {
            Err(e) if e.is_corruption() => e,
            other => return other,
        };
        let detail = corruption_detail(&err);
        let mut conn = self.conn();
        // Close the broken connection before its files move: closing removes the -wal and
        // -shm files by name, which must not be those of the new store.
        match Connection::open_in_memory() {
            Ok(placeholder) => drop(std::mem::replace(&mut *conn, placeholder)),
            Err(_) => return Err(err),
        }
        let moved_to = match set_aside(&self.path) {
            Ok(p) => p,
            Err(source) => {
                return Err(MetaError::CannotSetAside {
                    path: self.path.clone(),
                    detail,
                    source,
                })
            }
        };
        let fresh = Self::open_file(&self.path)?;
        *conn = fresh.conn.into_inner().unwrap_or_else(|p| p.into_inner());
        drop(conn);
        tracing::error!(
            store = %self.path.display(),
            moved_to = %moved_to.display(),
            reason = %detail,
            "the node store turned out corrupt: moved it aside (kept for inspection) and started an empty one; the node serves what it knew until the next sync from the cloud"
        );
        self.recovered(moved_to.clone(), detail.clone());
        Err(MetaError::Replaced {
            path: self.path.clone(),
            moved_to,
            detail,
        })
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
        self.guarded(|| self.read_point())
    }

    fn read_point(&self) -> Result<SyncPoint, MetaError> {
        let conn = self.conn();
        read_sync_point(&conn).map_err(|e| self.sql_err(e))
    }

    /// Every stored row as `(key, type, value)`, ordered by key.
    pub fn rows(&self) -> Result<Vec<(String, String, String)>, MetaError> {
        self.guarded(|| self.read_rows())
    }

    /// The stored objects of `kind` as the cloud sent them, ordered by key, with the version
    /// they are at (read in one transaction). The view keeps only what the data path reads;
    /// this is where the whole objects are (`/debug/*`).
    pub fn objects(&self, kind: Kind) -> Result<(u64, Vec<Box<RawValue>>), MetaError> {
        self.guarded(|| self.read_objects(kind))
    }

    fn read_objects(&self, kind: Kind) -> Result<(u64, Vec<Box<RawValue>>), MetaError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.sql_err(e))?;
        let point = read_sync_point(&tx).map_err(|e| self.sql_err(e))?;
        let mut stmt = tx
            .prepare("SELECT key, value FROM meta WHERE type = ?1 ORDER BY key")
            .map_err(|e| self.sql_err(e))?;
        let rows = stmt
            .query_map([kind.resource_type()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sql_err(e))?;
        let objects = rows
            .into_iter()
            .filter_map(|(key, value)| match RawValue::from_string(value) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "leaving out a stored object that is not JSON");
                    None
                }
            })
            .collect();
        Ok((point.version, objects))
    }

    fn read_rows(&self) -> Result<Vec<(String, String, String)>, MetaError> {
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
        let point = self.read_point()?;
        let rows = self.read_rows()?;
        let objects = rows.into_iter().filter_map(|(key, _type, value)| {
            let Some(k) = ObjectKey::parse_resource(&key) else {
                tracing::warn!(%key, "ignoring a stored row with an invalid key");
                return None;
            };
            match Object::from_json(k.kind, &value) {
                Ok(obj) => Some((k, obj)),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "ignoring a stored object that does not parse");
                    None
                }
            }
        });
        Ok(MeshView::from_objects(
            point.version,
            point.store_id,
            objects,
        ))
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
        self.guarded(|| self.commit_changes(store_id, changes, expect))
    }

    fn commit_changes(
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
        let written = self.guarded(|| self.write_snapshot(store_id, version, chain, objects))?;
        if let Some(r) = self
            .recovery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            r.resynced = true;
        }
        Ok(written)
    }

    fn write_snapshot(
        &self,
        store_id: &str,
        version: u64,
        chain: &str,
        objects: &[(ObjectKey, String)],
    ) -> Result<usize, MetaError> {
        let mut failed = None;
        let parsed = objects
            .iter()
            .filter_map(|(key, json)| match Self::parse(key, json) {
                Ok(object) => Some((key.clone(), object?)),
                Err(e) => {
                    failed.get_or_insert(e);
                    None
                }
            });
        let view = MeshView::from_objects(version, Some(store_id.to_string()), parsed);
        if let Some(e) = failed {
            return Err(e);
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What made a store count as corrupt, without the file name (said elsewhere).
fn corruption_detail(e: &MetaError) -> String {
    match e {
        MetaError::Corrupt { detail, .. } => detail.clone(),
        MetaError::Sqlite { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// The schema version lets a later edgemesh migrate this file, and an older one refuse a file it
/// would misread (rather than lose the node's offline copy).
fn refuse_newer_schema(conn: &Connection, path: &Path) -> Result<(), MetaError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| MetaError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
    if found > SCHEMA_VERSION {
        return Err(MetaError::NewerSchema {
            path: path.to_path_buf(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// SQLite's own structural check (`quick_check`: pages, b-trees, records; not the indexes'
/// contents), which finds what a truncated or overwritten file has lost before a read trips on
/// it, and the layout this code relies on.
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), MetaError> {
    let corrupt = |detail: String| MetaError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let sql = |source| MetaError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let mut stmt = conn.prepare("PRAGMA quick_check(5)").map_err(sql)?;
    let problems = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(sql)?;
    if problems != ["ok"] {
        return Err(corrupt(format!("integrity check: {}", problems.join("; "))));
    }
    let has_table = |name: &str| -> Result<bool, MetaError> {
        conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .map_err(sql)
    };
    if has_table("sync_state")? {
        read_sync_point(conn).map_err(|e| match e {
            e @ rusqlite::Error::SqliteFailure(..) => sql(e),
            e => corrupt(format!("the sync state cannot be read: {e}")),
        })?;
    }
    Ok(())
}

/// Moves a corrupt store and its -wal and -shm files to `<file>.corrupt-<unix seconds>`
/// (`-N` appended when that exists); returns the new name of the database file.
fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = now_ms() / 1000;
    let mut target = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{}.corrupt-{stamp}-{n}", path.display()));
        n += 1;
    }
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            std::fs::rename(&side, format!("{}{suffix}", target.display()))?;
        }
    }
    std::fs::rename(path, &target)?;
    Ok(target)
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
            view.service("default", "b").expect("b").cluster_ips[0].to_string(),
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

    /// A store with `n` Services at versions 1..=n.
    fn filled(dir: &Path, n: u64) -> MetaManager {
        let mm = MetaManager::open(dir).expect("open");
        let batch: Vec<EdgeChange> = (1..=n)
            .map(|v| {
                let name = format!("svc-{v:04}-{}", "x".repeat(200));
                change(v, &name, Some(svc(&name, "10.96.0.1")))
            })
            .collect();
        mm.apply_changes("s1", &batch, None).expect("apply");
        mm
    }

    fn set_aside_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.to_string_lossy().contains(".corrupt-"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_garbage_or_truncated_store_is_set_aside_and_the_node_starts_empty() {
        // Garbage: not a database at all.
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = vec![0x5au8; 64 * 1024];
        std::fs::write(dir.path().join(DB_FILE), &garbage).expect("write");
        let mm = MetaManager::open(dir.path()).expect("recovers");
        let r = mm.recovery().expect("recovery recorded");
        assert!(!r.resynced);
        assert!(r.reason.contains("not a database"), "{r:?}");
        assert_eq!(set_aside_files(dir.path()), vec![r.moved_to.clone()]);
        assert_eq!(std::fs::read(&r.moved_to).expect("kept"), garbage);
        assert_eq!(mm.sync_point().expect("point"), SyncPoint::default());
        // The next snapshot is the resync.
        let objects = vec![(
            ObjectKey::new(Kind::Service, "default", "a"),
            svc("a", "10.96.0.1"),
        )];
        mm.replace_all("s1", 7, "c7", &objects).expect("snapshot");
        assert!(mm.recovery().expect("still recorded").resynced);
        drop(mm);
        // Reopened, the rebuilt store is good: nothing more is set aside.
        let mm = MetaManager::open(dir.path()).expect("reopen");
        assert!(mm.recovery().is_none());
        assert_eq!(mm.view().version, 7);
        assert_eq!(set_aside_files(dir.path()).len(), 1);

        // Truncated: a real store cut in half, as a disk fault leaves it.
        let dir = tempfile::tempdir().expect("tempdir");
        drop(filled(dir.path(), 200));
        let db = dir.path().join(DB_FILE);
        let len = std::fs::metadata(&db).expect("meta").len();
        assert!(len > 40_000, "the store is {len} bytes");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .expect("open");
        f.set_len(len / 2).expect("truncate");
        drop(f);
        let mm = MetaManager::open(dir.path()).expect("recovers");
        let r = mm.recovery().expect("recovery recorded");
        assert!(
            r.reason.contains("malformed") || r.reason.contains("integrity"),
            "{r:?}"
        );
        assert_eq!(std::fs::metadata(&r.moved_to).expect("kept").len(), len / 2);
        assert!(mm.view().services.is_empty());
    }

    #[test]
    fn a_good_store_is_never_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(filled(dir.path(), 20));
        let mm = MetaManager::open(dir.path()).expect("reopen");
        assert!(mm.recovery().is_none());
        assert_eq!(mm.view().services.len(), 20);

        // Held by another writer (a second agent on the same data_dir): an error that says
        // so, and the file stays.
        drop(mm);
        let other = Connection::open(dir.path().join(DB_FILE)).expect("open");
        other
            .execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE;")
            .expect("lock");
        let err = MetaManager::open_file(&dir.path().join(DB_FILE))
            .err()
            .expect("locked");
        assert!(!err.is_corruption(), "{err}");
        assert!(
            err.to_string().contains("another process holds the file"),
            "{err}"
        );
        drop(other);
        assert!(set_aside_files(dir.path()).is_empty());
        let mm = MetaManager::open(dir.path()).expect("open again");
        assert_eq!(mm.view().services.len(), 20);
    }

    #[test]
    fn corruption_found_while_running_replaces_the_store_and_keeps_the_view() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mm = filled(dir.path(), 200);
        {
            let conn = mm.conn();
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .expect("checkpoint");
            conn.release_memory().expect("drop the page cache");
        }
        // Overwrite every page but the first (the header) with garbage.
        let db = dir.path().join(DB_FILE);
        let len = std::fs::metadata(&db).expect("meta").len() as usize;
        let mut bytes = std::fs::read(&db).expect("read");
        for b in &mut bytes[4096..len] {
            *b = 0xa5;
        }
        std::fs::write(&db, &bytes).expect("write");

        let err = mm.rows().expect_err("corruption found");
        let MetaError::Replaced { moved_to, .. } = &err else {
            panic!("{err}");
        };
        assert!(moved_to.exists());
        let r = mm.recovery().expect("recorded");
        assert_eq!(&r.moved_to, moved_to);
        // The node keeps serving what it knew; the store starts over.
        assert_eq!(mm.view().services.len(), 200);
        assert_eq!(mm.sync_point().expect("point"), SyncPoint::default());
        mm.apply_changes("s2", &[change(1, "a", Some(svc("a", "10.96.0.1")))], None)
            .expect("the new store takes writes");
        drop(mm);
        let mm = MetaManager::open(dir.path()).expect("reopen");
        assert!(mm.recovery().is_none());
        assert_eq!(mm.sync_point().expect("point").version, 1);
    }

    #[test]
    fn read_only_opening_never_creates_a_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data").join(DB_FILE);
        assert!(MetaManager::open_existing_read_only(&path)
            .expect("no error")
            .is_none());
        assert!(!dir.path().join("data").exists());
        drop(filled(&dir.path().join("data"), 3));
        let mm = MetaManager::open_existing_read_only(&path)
            .expect("opens")
            .expect("exists");
        assert_eq!(mm.view().version, 3);
        // Garbage is reported, not moved.
        drop(mm);
        std::fs::write(&path, b"garbage, not a database at all, long enough for a header......................................................................")
            .expect("write");
        let err = MetaManager::open_existing_read_only(&path)
            .err()
            .expect("garbage");
        assert!(err.is_corruption(), "{err}");
        assert!(set_aside_files(&dir.path().join("data")).is_empty());
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
        assert!(!err.is_corruption());
        assert!(set_aside_files(dir.path()).is_empty());
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
