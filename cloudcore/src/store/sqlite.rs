//! The embedded store: one SQLite file under `data_dir`.
//!
//! Writes are serialised by one connection behind a mutex; the recent change log is mirrored in
//! memory so that resuming nodes (possibly thousands at once after a cloud restart) never query
//! SQLite. The in-memory log is appended under the same lock as the commit, so its order is the
//! version order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use edgehub::model::{Kind, ObjectKey};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::watch;

use super::{
    plan, Change, ChangeOp, Recent, Record, RouterKind, Since, Snapshot, Store, StoreError, View,
    Write,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    kind      TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    version   INTEGER NOT NULL,
    body      TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS changelog (
    version   INTEGER PRIMARY KEY,
    op        TEXT NOT NULL,
    kind      TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    body      TEXT NOT NULL,
    chain     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS store_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS node_tokens (
    node       TEXT PRIMARY KEY NOT NULL,
    hash       TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
";

/// Steps that take the layout from one version to the next: `MIGRATIONS[i]` goes from version
/// `i + 1` to `i + 2`. Steps only add tables: data already stored is never rewritten, so a
/// store from an older cloudcore opens with everything it held.
const MIGRATIONS: &[&str] = &[
    // 2: router records (rule endpoints and rules), kept apart from the synced objects.
    "CREATE TABLE IF NOT EXISTS router (
        kind TEXT NOT NULL,
        id   TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (kind, id)
    );",
];

/// Version of the layout (`SCHEMA` plus every migration), kept in SQLite's `user_version`.
pub const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

/// File name of the cloud database inside `data_dir`.
pub const DB_FILE: &str = "cloudcore.db";

pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    store_id: String,
    history: usize,
    history_bytes: usize,
    recent: RwLock<Recent>,
    version: watch::Sender<u64>,
    /// Bumped on every token and router write (this process is the only writer).
    tokens: watch::Sender<u64>,
    router: watch::Sender<u64>,
}

fn key_of(kind: &str, namespace: String, name: String) -> Result<ObjectKey, StoreError> {
    let kind = Kind::from_resource_type(kind).ok_or_else(|| StoreError::Corrupt {
        key: format!("{namespace}/{kind}/{name}"),
        reason: "unknown kind".into(),
    })?;
    Ok(ObjectKey::new(kind, namespace, name))
}

impl SqliteStore {
    /// Opens or creates the store. `history` bounds the change log: a node that fell further
    /// behind than that gets a snapshot.
    pub fn open(path: &Path, history: usize, history_bytes: usize) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        }
        let mut conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL, not NORMAL: the version counter must never go backwards after a power cut, or a
        // node that already saw version N would take a different change N as a duplicate.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn).map_err(|e| match e {
            StoreError::Open { reason, .. } => open_err(reason),
            other => other,
        })?;
        let store_id: String = match conn
            .query_row(
                "SELECT value FROM store_meta WHERE key = 'store_id'",
                [],
                |r| r.get(0),
            )
            .optional()?
        {
            Some(id) => id,
            None => {
                let id = edgehub::message::new_message_id();
                conn.execute(
                    "INSERT INTO store_meta (key, value) VALUES ('store_id', ?1), ('version', '0')",
                    params![id],
                )?;
                id
            }
        };
        let version = read_version(&conn)?;
        let history = history.max(1);
        let mut recent = Recent::default();
        {
            let mut stmt = conn.prepare(
                "SELECT version, op, kind, namespace, name, body, chain FROM changelog
                 WHERE version > ?1 ORDER BY version",
            )?;
            let floor = version.saturating_sub(history as u64);
            let rows = stmt.query_map(params![floor as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })?;
            for row in rows {
                let (v, op, kind, ns, name, body, chain) = row?;
                let op = ChangeOp::parse(&op).ok_or_else(|| StoreError::Corrupt {
                    key: format!("changelog {v}"),
                    reason: format!("unknown op {op:?}"),
                })?;
                let change = Change {
                    version: v,
                    op,
                    key: key_of(&kind, ns, name)?,
                    json: body.into(),
                    chain,
                    wire: Default::default(),
                };
                recent.push(Arc::new(change), history, history_bytes);
            }
        }
        // The log must be contiguous up to the version, or resuming nodes would miss changes.
        let (last, _) = recent.head();
        if version > 0 && last != version {
            return Err(open_err(format!(
                "change log ends at {last} but the store is at version {version}"
            )));
        }
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            store_id,
            history,
            history_bytes,
            recent: RwLock::new(recent),
            version: watch::Sender::new(version),
            tokens: watch::Sender::new(0),
            router: watch::Sender::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // Transactions roll back when dropped, so a lock poisoned by a panic guards a
        // consistent database and can be reused.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The write path of [`Store::write_at`], which counts its failures.
    fn commit(
        &self,
        base: Option<u64>,
        writes: Vec<Write>,
    ) -> Result<Vec<Arc<Change>>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version = read_version(&tx)?;
        if let Some(base) = base.filter(|b| *b != version) {
            return Err(StoreError::Stale {
                base,
                actual: version,
            });
        }
        let chain = self
            .recent
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .head()
            .1
            .to_string();
        let changes = plan(&TxView(&tx), writes, version, &chain)?;
        for c in &changes {
            let key = &c.key;
            if c.op == ChangeOp::Delete {
                tx.execute(
                    "DELETE FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                    params![key.kind.resource_type(), key.namespace, key.name],
                )?;
            } else {
                tx.execute(
                    "INSERT INTO objects (kind, namespace, name, version, body) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(kind, namespace, name) DO UPDATE SET version = excluded.version, body = excluded.body",
                    params![key.kind.resource_type(), key.namespace, key.name, c.version as i64, &*c.json],
                )?;
            }
        }
        let version = changes.last().map_or(version, |c| c.version);
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO changelog (version, op, kind, namespace, name, body, chain) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for c in &changes {
                stmt.execute(params![
                    c.version as i64,
                    c.op.as_str(),
                    c.key.kind.resource_type(),
                    c.key.namespace,
                    c.key.name,
                    &*c.json,
                    c.chain
                ])?;
            }
        }
        let floor = version.saturating_sub(self.history as u64);
        tx.execute(
            "DELETE FROM changelog WHERE version <= ?1",
            params![floor as i64],
        )?;
        tx.execute(
            "UPDATE store_meta SET value = ?1 WHERE key = 'version'",
            params![version.to_string()],
        )?;
        tx.commit()?;
        let changes: Vec<Arc<Change>> = changes.into_iter().map(Arc::new).collect();
        {
            let mut recent = self.recent.write().unwrap_or_else(|p| p.into_inner());
            for c in &changes {
                recent.push(c.clone(), self.history, self.history_bytes);
            }
        }
        // Still under the connection lock: subscribers see versions in commit order.
        self.version.send_replace(version);
        drop(conn);
        Ok(changes)
    }
}

/// Brings the layout to [`SCHEMA_VERSION`] in one transaction: a crash part-way leaves the
/// store at its old version, and the next start runs the same steps again.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    // A store written by a newer cloudcore is refused rather than misread.
    if !(0..=SCHEMA_VERSION).contains(&found) {
        return Err(StoreError::Open {
            path: String::new(),
            reason: format!(
                "written by a newer cloudcore (schema {found}; this one knows {SCHEMA_VERSION})"
            ),
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    // Version 0 is a new file (or one from before versions were kept); the base layout's
    // statements leave existing tables alone, so running it on any older store is safe.
    tx.execute_batch(SCHEMA)?;
    let done = usize::try_from(found.max(1) - 1).unwrap_or(0);
    for step in &MIGRATIONS[done..] {
        tx.execute_batch(step)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

fn read_version(conn: &Connection) -> Result<u64, StoreError> {
    let v: String = conn.query_row(
        "SELECT value FROM store_meta WHERE key = 'version'",
        [],
        |r| r.get(0),
    )?;
    v.parse().map_err(|_| StoreError::Corrupt {
        key: "store_meta.version".into(),
        reason: format!("{v:?} is not a number"),
    })
}

fn get_row(conn: &Connection, key: &ObjectKey) -> Result<Option<Record>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT version, body FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
            params![key.kind.resource_type(), key.namespace, key.name],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)),
        )
        .optional()?
        .map(|(version, body)| Record {
            key: key.clone(),
            version,
            json: body.into(),
        }))
}

/// The objects and tokens as a transaction sees them, for [`plan`].
struct TxView<'a>(&'a Connection);

impl View for TxView<'_> {
    fn get(&self, key: &ObjectKey) -> Result<Option<Record>, StoreError> {
        get_row(self.0, key)
    }

    fn has_token(&self, node: &str) -> Result<bool, StoreError> {
        Ok(self
            .0
            .query_row(
                "SELECT 1 FROM node_tokens WHERE node = ?1",
                params![node],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }
}

impl Store for SqliteStore {
    fn store_id(&self) -> &str {
        &self.store_id
    }

    fn version(&self) -> u64 {
        *self.version.borrow()
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<Record>, StoreError> {
        get_row(&self.conn(), key)
    }

    fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Record>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT namespace, name, version, body FROM objects
             WHERE kind = ?1 AND (?2 IS NULL OR namespace = ?2) ORDER BY namespace, name",
        )?;
        let rows = stmt.query_map(params![kind.resource_type(), namespace], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (ns, name, version, body) = row?;
            out.push(Record {
                key: ObjectKey::new(kind, ns, name),
                version,
                json: body.into(),
            });
        }
        Ok(out)
    }

    fn write_at(
        &self,
        base: Option<u64>,
        writes: Vec<Write>,
    ) -> Result<Vec<Arc<Change>>, StoreError> {
        let result = self.commit(base, writes);
        if let Err(StoreError::Sqlite(_) | StoreError::Corrupt { .. }) = &result {
            metrics::counter!("cloudcore_store_write_errors_total").increment(1);
        }
        result
    }

    fn changes_since(&self, since: u64, chain: Option<&str>) -> Since {
        let recent = self.recent.read().unwrap_or_else(|p| p.into_inner());
        let (current, head) = recent.head();
        recent.since(since, chain, current, head)
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // One lock for objects and version: no commit can fall between them.
        let conn = self.conn();
        let version = read_version(&conn)?;
        let mut stmt = conn.prepare_cached(
            "SELECT kind, namespace, name, version, body FROM objects ORDER BY kind, namespace, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)? as u64,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut records = Vec::new();
        for row in rows {
            let (kind, ns, name, v, body) = row?;
            records.push(Record {
                key: key_of(&kind, ns, name)?,
                version: v,
                json: body.into(),
            });
        }
        // Commits update `recent` under the connection lock held here, so this is the head
        // at `version`.
        let chain = self
            .recent
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .head()
            .1
            .to_string();
        Ok(Snapshot {
            store_id: self.store_id.clone(),
            version,
            chain,
            records,
        })
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn subscribe_tokens(&self) -> watch::Receiver<u64> {
        self.tokens.subscribe()
    }

    /// One process owns the database file.
    fn tokens_change_elsewhere(&self) -> bool {
        false
    }

    fn subscribe_router(&self) -> watch::Receiver<u64> {
        self.router.subscribe()
    }

    fn kept_changes(&self) -> Vec<Arc<Change>> {
        self.recent.read().unwrap_or_else(|p| p.into_inner()).all()
    }

    fn restore(&self, dump: &super::export::Dump) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE store_meta SET value = ?1 WHERE key = 'store_id'",
            params![dump.store_id],
        )?;
        tx.execute(
            "UPDATE store_meta SET value = ?1 WHERE key = 'version'",
            params![dump.version.to_string()],
        )?;
        for r in &dump.records {
            tx.execute(
                "INSERT INTO objects (kind, namespace, name, version, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![r.key.kind.resource_type(), r.key.namespace, r.key.name, r.version as i64, &*r.json],
            )?;
        }
        for c in &dump.changes {
            tx.execute(
                "INSERT INTO changelog (version, op, kind, namespace, name, body, chain) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![c.version as i64, c.op.as_str(), c.key.kind.resource_type(), c.key.namespace, c.key.name, &*c.json, c.chain],
            )?;
        }
        if dump.changes.is_empty() && dump.version > 0 {
            // No history came along: the chain head still has to be kept, as a marker change
            // a node can never ask for (nodes below it get a snapshot).
            return Err(StoreError::Open {
                path: self.path.display().to_string(),
                reason: "the dump has no change history; export it again from a running store"
                    .into(),
            });
        }
        for (node, hash) in &dump.tokens {
            tx.execute(
                "INSERT INTO node_tokens (node, hash, created_ms) VALUES (?1, ?2, 0)",
                params![node, hash],
            )?;
        }
        for (kind, id, json) in &dump.router {
            tx.execute(
                "INSERT INTO router (kind, id, body) VALUES (?1, ?2, ?3)",
                params![kind.as_str(), id, json],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn health(&self) -> Result<String, String> {
        let version = get_row(
            &self.conn(),
            &ObjectKey::new(Kind::Node, "", "readyz.probe"),
        )
        .map(|_| self.version())
        .map_err(|e| format!("read failed: {e}"))?;
        Ok(format!("sqlite, open at version {version}"))
    }

    fn put_token_hash(&self, node: &str, hash: &str) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.conn().execute(
            "INSERT INTO node_tokens (node, hash, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(node) DO UPDATE SET hash = excluded.hash, created_ms = excluded.created_ms",
            params![node, hash, now],
        )?;
        self.tokens.send_modify(|g| *g += 1);
        Ok(())
    }

    fn delete_token_hash(&self, node: &str) -> Result<bool, StoreError> {
        let deleted = self
            .conn()
            .execute("DELETE FROM node_tokens WHERE node = ?1", params![node])?
            > 0;
        self.tokens.send_modify(|g| *g += 1);
        Ok(deleted)
    }

    fn token_hashes(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT node, hash FROM node_tokens ORDER BY node")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn put_router(&self, kind: RouterKind, id: &str, json: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO router (kind, id, body) VALUES (?1, ?2, ?3)
             ON CONFLICT(kind, id) DO UPDATE SET body = excluded.body",
            params![kind.as_str(), id, json],
        )?;
        self.router.send_modify(|g| *g += 1);
        Ok(())
    }

    fn get_router(&self, kind: RouterKind, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT body FROM router WHERE kind = ?1 AND id = ?2",
                params![kind.as_str(), id],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn list_router(&self, kind: RouterKind) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT id, body FROM router WHERE kind = ?1 ORDER BY id")?;
        let rows = stmt.query_map(params![kind.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn update_router(
        &self,
        kind: RouterKind,
        id: &str,
        f: &mut dyn FnMut(Option<&str>) -> Option<String>,
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<String> = tx
            .query_row(
                "SELECT body FROM router WHERE kind = ?1 AND id = ?2",
                params![kind.as_str(), id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(new) = f(current.as_deref()) else {
            return Ok(None);
        };
        tx.execute(
            "INSERT INTO router (kind, id, body) VALUES (?1, ?2, ?3)
             ON CONFLICT(kind, id) DO UPDATE SET body = excluded.body",
            params![kind.as_str(), id, new],
        )?;
        tx.commit()?;
        self.router.send_modify(|g| *g += 1);
        Ok(Some(new))
    }

    fn delete_router(&self, kind: RouterKind, id: &str) -> Result<bool, StoreError> {
        let deleted = self.conn().execute(
            "DELETE FROM router WHERE kind = ?1 AND id = ?2",
            params![kind.as_str(), id],
        )? > 0;
        self.router.send_modify(|g| *g += 1);
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::fixtures::{node, put};
    use edgehub::model::Object;

    #[test]
    fn versions_increase_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("open");
        let id = store.store_id().to_string();
        let mut rx = store.subscribe();
        let c = store
            .write(vec![put(node("a", "1")), put(node("b", "1"))])
            .expect("write");
        assert_eq!(c.iter().map(|c| c.version).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(c[0].op, ChangeOp::Insert);
        assert_eq!(*rx.borrow_and_update(), 2);
        // Identical content: no new version.
        assert!(store
            .write(vec![put(node("a", "1"))])
            .expect("noop")
            .is_empty());
        let c = store.write(vec![put(node("a", "2"))]).expect("update");
        assert_eq!((c[0].version, c[0].op), (3, ChangeOp::Update));
        let rec = store
            .get(&ObjectKey::new(Kind::Node, "", "a"))
            .expect("get")
            .expect("exists");
        assert!(
            rec.json.contains(r#""resourceVersion":"3""#),
            "{}",
            rec.json
        );
        drop(store);

        let store = SqliteStore::open(&path, 100, 1 << 20).expect("reopen");
        assert_eq!(store.store_id(), id);
        assert_eq!(store.version(), 3);
        match store.changes_since(1, None) {
            Since::Changes(c) => {
                assert_eq!(c.iter().map(|c| c.version).collect::<Vec<_>>(), vec![2, 3])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn history_is_bounded_and_old_versions_get_snapshots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join(DB_FILE), 5, 1 << 20).expect("open");
        for i in 0..12 {
            store
                .write(vec![put(node("a", &i.to_string()))])
                .expect("write");
        }
        assert!(matches!(store.changes_since(12, None), Since::Current));
        assert!(matches!(store.changes_since(13, None), Since::Gone));
        assert!(matches!(store.changes_since(6, None), Since::Gone));
        match store.changes_since(7, None) {
            Since::Changes(c) => assert_eq!(c.len(), 5),
            other => panic!("{other:?}"),
        }
        let n: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM changelog", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 5);
        let snap = store.snapshot().expect("snapshot");
        assert_eq!((snap.version, snap.records.len()), (12, 1));
    }

    #[test]
    fn batches_are_atomic_and_preconditions_hold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join(DB_FILE), 100, 1 << 20).expect("open");
        store.write(vec![put(node("a", "1"))]).expect("write");
        let err = store
            .write(vec![
                put(node("b", "1")),
                Write::Delete {
                    key: ObjectKey::new(Kind::Node, "", "missing"),
                },
            ])
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)));
        assert_eq!(store.version(), 1);
        assert!(store
            .get(&ObjectKey::new(Kind::Node, "", "b"))
            .expect("get")
            .is_none());
        let err = store
            .write(vec![Write::Put {
                object: node("a", "2"),
                expect_version: Some(7),
            }])
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { actual: 1, .. }));
        let c = store
            .write(vec![Write::Delete {
                key: ObjectKey::new(Kind::Node, "", "a"),
            }])
            .expect("delete");
        assert_eq!(c[0].op, ChangeOp::Delete);
        assert!(c[0].json.contains("\"a\""));
    }

    #[test]
    fn a_store_restored_from_a_backup_is_detected_by_its_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        let backup = dir.path().join("backup.db");
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("open");
        for zone in ["1", "2", "3"] {
            store.write(vec![put(node("a", zone))]).expect("write");
        }
        let at3 = store.snapshot().expect("snapshot").chain;
        drop(store); // closing checkpoints the WAL into the file
        std::fs::copy(&path, &backup).expect("backup");
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("reopen");
        store
            .write(vec![put(node("a", "4")), put(node("a", "5"))])
            .expect("write");
        let node_at5 = store.snapshot().expect("snapshot").chain;
        assert!(matches!(
            store.changes_since(5, Some(&node_at5)),
            Since::Current
        ));
        assert!(matches!(store.changes_since(3, Some(&at3)), Since::Changes(c) if c.len() == 2));
        assert!(matches!(store.changes_since(3, Some("bogus")), Since::Gone));
        drop(store);

        // Restore the backup: same store id, versions 4 and 5 are reused for other changes.
        std::fs::copy(&backup, &path).expect("restore");
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("restored");
        store
            .write(vec![put(node("a", "x")), put(node("a", "y"))])
            .expect("write");
        assert_eq!(store.version(), 5);
        assert!(
            matches!(store.changes_since(5, Some(&node_at5)), Since::Gone),
            "same version, other history"
        );
        assert!(matches!(store.changes_since(3, Some(&at3)), Since::Changes(c) if c.len() == 2));
    }

    #[test]
    fn history_memory_is_bounded_by_bytes_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join(DB_FILE), 1000, 4096).expect("open");
        for i in 0..50 {
            store
                .write(vec![put(node("a", &i.to_string()))])
                .expect("write");
        }
        let kept = store.recent.read().expect("lock").changes.len();
        assert!((1..50).contains(&kept), "{kept}");
        assert!(matches!(store.changes_since(1, None), Since::Gone));
        assert!(matches!(store.changes_since(49, None), Since::Changes(c) if c.len() == 1));
    }

    #[test]
    fn router_records_round_trip_outside_the_change_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("open");
        store
            .put_router(RouterKind::Rule, "r1", r#"{"id":"r1"}"#)
            .expect("put");
        store
            .put_router(RouterKind::Rule, "r1", r#"{"id":"r1","x":1}"#)
            .expect("replace");
        store
            .put_router(RouterKind::Endpoint, "r1", r#"{"e":1}"#)
            .expect("same id, other kind");
        assert_eq!(store.version(), 0, "router records make no changes");
        assert!(matches!(store.changes_since(0, None), Since::Current));
        drop(store);
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("reopen");
        assert_eq!(
            store.get_router(RouterKind::Rule, "r1").expect("get"),
            Some(r#"{"id":"r1","x":1}"#.to_string())
        );
        assert_eq!(
            store.list_router(RouterKind::Endpoint).expect("list"),
            vec![("r1".to_string(), r#"{"e":1}"#.to_string())]
        );
        assert!(store.delete_router(RouterKind::Rule, "r1").expect("delete"));
        assert!(!store.delete_router(RouterKind::Rule, "r1").expect("again"));
        assert_eq!(store.get_router(RouterKind::Rule, "r1").expect("get"), None);
        assert_eq!(
            store.list_router(RouterKind::Endpoint).expect("list").len(),
            1
        );
    }

    #[test]
    fn a_schema_1_store_is_migrated_with_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("open");
        store.write(vec![put(node("a", "1"))]).expect("write");
        store.put_token_hash("a", "h").expect("token");
        let (id, chain) = (
            store.store_id().to_string(),
            store.snapshot().expect("snap").chain,
        );
        drop(store);
        {
            // Exactly what a cloudcore with schema 1 left behind: no router table.
            let conn = Connection::open(&path).expect("raw open");
            conn.execute_batch("DROP TABLE router; PRAGMA user_version = 1;")
                .expect("downgrade");
        }
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("migrated");
        assert_eq!(store.store_id(), id);
        assert_eq!(store.version(), 1);
        assert_eq!(store.snapshot().expect("snap").chain, chain);
        assert!(store
            .get(&ObjectKey::new(Kind::Node, "", "a"))
            .expect("get")
            .is_some());
        assert_eq!(store.token_hashes().expect("tokens").len(), 1);
        store
            .put_router(RouterKind::Endpoint, "e", "{}")
            .expect("router table exists");
        let v: i64 = store
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version");
        assert_eq!(v, SCHEMA_VERSION);
        drop(store);

        // A store from a newer cloudcore is refused, and left as it was.
        Connection::open(&path)
            .expect("raw open")
            .pragma_update(None, "user_version", 99)
            .expect("bump");
        let err = SqliteStore::open(&path, 100, 1 << 20)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("newer cloudcore"), "{err}");
        let v: i64 = Connection::open(&path)
            .expect("raw open")
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version");
        assert_eq!(v, 99);
    }

    #[test]
    fn tokens_are_kept_apart_from_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join(DB_FILE), 100, 1 << 20).expect("open");
        store.put_token_hash("a", "h1").expect("put");
        store.put_token_hash("a", "h2").expect("rotate");
        assert_eq!(
            store.token_hashes().expect("list"),
            vec![("a".into(), "h2".into())]
        );
        assert_eq!(store.version(), 0);
        assert!(store.delete_token_hash("a").expect("delete"));
        assert!(!store.delete_token_hash("a").expect("delete again"));
    }

    #[test]
    fn communities_are_stored_listed_and_reopened_like_any_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE);
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("open");
        let json = r#"{"metadata":{"name":"lan"},"spec":{"members":["a","b"]}}"#;
        let c = Object::from_json(Kind::Community, json).expect("community");
        let changes = store.write(vec![put(c.clone())]).expect("write");
        assert_eq!(changes[0].key.resource(), "_/community/lan");
        drop(store);
        let store = SqliteStore::open(&path, 100, 1 << 20).expect("reopen");
        let listed = store.list(Kind::Community, None).expect("list");
        assert_eq!(listed.len(), 1);
        let mut stored = Object::from_json(Kind::Community, &listed[0].json).expect("parse");
        assert_eq!(stored.meta().resource_version, "1");
        stored.meta_mut().resource_version.clear();
        assert_eq!(stored, c);
        assert!(store.list(Kind::Node, None).expect("list").is_empty());
        let Since::Changes(log) = store.changes_since(0, None) else {
            panic!("the change is in the log")
        };
        assert_eq!(log[0].key.kind, Kind::Community);
    }
}
