//! `cloudcore store export` / `import`: everything a store holds, as JSON lines, to move a
//! cloud from SQLite to etcd (and back).
//!
//! The dump keeps the store's identity, version, history chain and the recent changes, so the
//! nodes see the same store after the move and resume by delta, not by snapshot. Exporting
//! reads a consistent snapshot; the source should be stopped first (changes after the export
//! would be lost), and the target must be empty.

use std::io::{BufRead, Write as IoWrite};
use std::sync::Arc;

use edgehub::model::{Kind, ObjectKey};
use serde::{Deserialize, Serialize};

use super::{Change, ChangeOp, Record, RouterKind, Store, StoreError};

/// The first line of a dump names its format.
pub const FORMAT: &str = "edgemesh-store/1";

/// Everything a store holds.
pub struct Dump {
    pub store_id: String,
    pub version: u64,
    pub chain: String,
    pub records: Vec<Record>,
    /// The kept change log, contiguous and ending at `version` (possibly empty).
    pub changes: Vec<Arc<Change>>,
    pub tokens: Vec<(String, String)>,
    pub router: Vec<(RouterKind, String, String)>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
enum Line {
    Meta {
        format: String,
        store_id: String,
        resource_version: u64,
        chain: String,
    },
    Object {
        kind: String,
        namespace: String,
        name: String,
        version: u64,
        json: String,
    },
    Change {
        version: u64,
        op: String,
        kind: String,
        namespace: String,
        name: String,
        chain: String,
        json: String,
    },
    Token {
        node: String,
        hash: String,
    },
    Router {
        kind: String,
        id: String,
        json: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("line {line}: {reason}")]
    Bad { line: usize, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads everything from `store`.
pub fn dump(store: &dyn Store) -> Result<Dump, StoreError> {
    let snap = store.snapshot()?;
    let mut changes = store.kept_changes();
    changes.retain(|c| c.version <= snap.version);
    // Only a contiguous tail ending at the snapshot's version is a usable history.
    let mut keep = changes.len();
    let mut expected = snap.version;
    while keep > 0 && expected > 0 && changes[keep - 1].version == expected {
        keep -= 1;
        expected -= 1;
    }
    let changes = changes.split_off(keep);
    let mut router = Vec::new();
    for kind in [RouterKind::Endpoint, RouterKind::Rule] {
        for (id, json) in store.list_router(kind)? {
            router.push((kind, id, json));
        }
    }
    Ok(Dump {
        store_id: snap.store_id,
        version: snap.version,
        chain: snap.chain,
        records: snap.records,
        changes,
        tokens: store.token_hashes()?,
        router,
    })
}

pub fn write(dump: &Dump, mut out: impl IoWrite) -> std::io::Result<()> {
    let mut line = |l: &Line| -> std::io::Result<()> {
        serde_json::to_writer(&mut out, l)?;
        out.write_all(b"\n")
    };
    line(&Line::Meta {
        format: FORMAT.into(),
        store_id: dump.store_id.clone(),
        resource_version: dump.version,
        chain: dump.chain.clone(),
    })?;
    for r in &dump.records {
        line(&Line::Object {
            kind: r.key.kind.resource_type().into(),
            namespace: r.key.namespace.clone(),
            name: r.key.name.clone(),
            version: r.version,
            json: r.json.to_string(),
        })?;
    }
    for c in &dump.changes {
        line(&Line::Change {
            version: c.version,
            op: c.op.as_str().into(),
            kind: c.key.kind.resource_type().into(),
            namespace: c.key.namespace.clone(),
            name: c.key.name.clone(),
            chain: c.chain.clone(),
            json: c.json.to_string(),
        })?;
    }
    for (node, hash) in &dump.tokens {
        line(&Line::Token {
            node: node.clone(),
            hash: hash.clone(),
        })?;
    }
    for (kind, id, json) in &dump.router {
        line(&Line::Router {
            kind: kind.as_str().into(),
            id: id.clone(),
            json: json.clone(),
        })?;
    }
    out.flush()
}

pub fn read(input: impl BufRead) -> Result<Dump, DumpError> {
    let mut dump: Option<Dump> = None;
    for (i, text) in input.lines().enumerate() {
        let n = i + 1;
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| DumpError::Bad { line: n, reason };
        let line: Line = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let kind_of =
            |k: &str| Kind::from_resource_type(k).ok_or_else(|| bad(format!("unknown kind {k:?}")));
        let Some(d) = dump.as_mut() else {
            match line {
                Line::Meta {
                    format,
                    store_id,
                    resource_version,
                    chain,
                } if format == FORMAT => {
                    dump = Some(Dump {
                        store_id,
                        version: resource_version,
                        chain,
                        records: Vec::new(),
                        changes: Vec::new(),
                        tokens: Vec::new(),
                        router: Vec::new(),
                    });
                    continue;
                }
                _ => {
                    return Err(bad(format!(
                        "not a store dump: the first line must be the {FORMAT} header"
                    )))
                }
            }
        };
        match line {
            Line::Meta { .. } => return Err(bad("a second header".into())),
            Line::Object {
                kind,
                namespace,
                name,
                version,
                json,
            } => d.records.push(Record {
                key: ObjectKey::new(kind_of(&kind)?, namespace, name),
                version,
                json: json.into(),
            }),
            Line::Change {
                version,
                op,
                kind,
                namespace,
                name,
                chain,
                json,
            } => {
                let op = ChangeOp::parse(&op).ok_or_else(|| bad(format!("unknown op {op:?}")))?;
                if d.changes.last().is_some_and(|c| c.version + 1 != version) {
                    return Err(bad(format!(
                        "change {version} does not follow the one before"
                    )));
                }
                d.changes.push(Arc::new(Change {
                    version,
                    op,
                    key: ObjectKey::new(kind_of(&kind)?, namespace, name),
                    json: json.into(),
                    chain,
                    wire: Default::default(),
                }))
            }
            Line::Token { node, hash } => d.tokens.push((node, hash)),
            Line::Router { kind, id, json } => {
                let kind = RouterKind::parse(&kind)
                    .ok_or_else(|| bad(format!("unknown router kind {kind:?}")))?;
                d.router.push((kind, id, json))
            }
        }
    }
    let d = dump.ok_or(DumpError::Bad {
        line: 0,
        reason: "empty dump".into(),
    })?;
    if d.changes
        .last()
        .is_some_and(|c| c.version != d.version || c.chain != d.chain)
    {
        return Err(DumpError::Bad {
            line: 0,
            reason: "the change log does not end at the dump's version and chain".into(),
        });
    }
    Ok(d)
}

/// Why a store cannot take a dump: it must hold nothing yet.
pub fn check_empty(store: &dyn Store) -> Result<(), StoreError> {
    let snap = store.snapshot()?;
    let routers =
        store.list_router(RouterKind::Endpoint)?.len() + store.list_router(RouterKind::Rule)?.len();
    if snap.version > 0
        || !snap.records.is_empty()
        || !store.token_hashes()?.is_empty()
        || routers > 0
    {
        return Err(StoreError::Open {
            path: String::new(),
            reason: format!(
                "the target store is not empty (version {}, {} objects, {} tokens, {routers} router records); import only into a new store",
                snap.version,
                snap.records.len(),
                store.token_hashes()?.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{fixtures, Since, Write};

    fn node(name: &str, zone: &str) -> Write {
        fixtures::put(fixtures::node(name, zone))
    }

    fn filled(dir: &std::path::Path) -> SqliteStore {
        let store = SqliteStore::open(&dir.join("a.db"), 3, 1 << 20).expect("open");
        for i in 0..5 {
            store
                .write(vec![node("a", &i.to_string()), node(&format!("n{i}"), "z")])
                .expect("write");
        }
        store.put_token_hash("a", "hash-a").expect("token");
        store
            .put_router(RouterKind::Rule, "r1", r#"{"id":"r1"}"#)
            .expect("rule");
        store
    }

    #[test]
    fn a_store_moves_with_its_identity_history_tokens_and_router_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = filled(dir.path());
        let mut text = Vec::new();
        write(&dump(&source).expect("dump"), &mut text).expect("write");
        let target = SqliteStore::open(&dir.path().join("b.db"), 100, 1 << 20).expect("open");
        check_empty(&target).expect("empty");
        let d = read(text.as_slice()).expect("read");
        target.restore(&d).expect("restore");
        drop(target);
        let target = SqliteStore::open(&dir.path().join("b.db"), 100, 1 << 20).expect("reopen");
        let (a, b) = (source.snapshot().expect("a"), target.snapshot().expect("b"));
        assert_eq!(
            (a.store_id.as_str(), a.version, &a.chain),
            (b.store_id.as_str(), b.version, &b.chain)
        );
        assert_eq!(a.records, b.records);
        assert_eq!(
            target.token_hashes().expect("t"),
            source.token_hashes().expect("t")
        );
        assert_eq!(target.list_router(RouterKind::Rule).expect("r").len(), 1);
        // A node at version 8 of the source resumes by delta on the target.
        let Since::Changes(kept) = source.changes_since(8, None) else {
            panic!()
        };
        let at8 = match source.changes_since(7, None) {
            Since::Changes(c) => c[0].chain.clone(),
            other => panic!("{other:?}"),
        };
        assert!(
            matches!(target.changes_since(8, Some(&at8)), Since::Changes(c) if c.len() == kept.len())
        );
        // And the store goes on from there.
        let c = target.write(vec![node("z", "z")]).expect("write");
        assert_eq!(c[0].version, 11);
        // A non-empty store takes no dump.
        assert!(check_empty(&target).is_err());
    }

    #[test]
    fn broken_dumps_are_refused_naming_the_line() {
        let err = read("{\"token\":{\"node\":\"a\",\"hash\":\"h\"}}\n".as_bytes())
            .err()
            .expect("no header");
        assert!(err.to_string().starts_with("line 1:"), "{err}");
        let text = format!(
            "{{\"meta\":{{\"format\":\"{FORMAT}\",\"storeId\":\"s\",\"resourceVersion\":2,\"chain\":\"c\"}}}}\nnot json\n"
        );
        let err = read(text.as_bytes()).err().expect("bad line");
        assert!(err.to_string().starts_with("line 2:"), "{err}");
    }
}
