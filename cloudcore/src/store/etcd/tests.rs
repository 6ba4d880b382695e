//! The etcd store against a real etcd: two stores on one prefix are two replicas.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use edgehub::model::{Kind, Node, Object, ObjectKey};

use super::testing::TestEtcd;
use super::*;
use crate::objects::{ApplyError, Objects};

use crate::store::fixtures::{node, put};

fn open(etcd: &TestEtcd, history: usize) -> EtcdStore {
    EtcdStore::open(&etcd.config("/test/"), history, 1 << 20).expect("open")
}

fn svc(name: &str) -> Object {
    let json = format!(
        r#"{{"kind":"Service","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"ports":[{{"port":80}}]}}}}"#
    );
    Object::from_json(Kind::Service, &json).expect("valid")
}

/// Waits (bounded) until `f` holds: the other replica learns through its watch.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_replicas_write_one_dense_history() {
    let etcd = TestEtcd::start();
    let a = Arc::new(open(&etcd, 1000));
    let b = Arc::new(open(&etcd, 1000));
    assert_eq!(a.store_id(), b.store_id(), "one store, whichever replica");
    let writers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(r, store)| {
            std::thread::spawn(move || {
                for i in 0..40 {
                    store
                        .write(vec![put(node(&format!("r{r}-{}", i % 7), &i.to_string()))])
                        .expect("write");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    eventually("both replicas at version 80", || {
        a.version() == 80 && b.version() == 80
    });
    let (sa, sb) = (a.snapshot().expect("a"), b.snapshot().expect("b"));
    assert_eq!(sa.chain, sb.chain);
    assert_eq!(sa.records, sb.records);
    assert_eq!(sa.records.len(), 14);
    // Every version exactly once, in order, and the chain recomputes from the changes.
    let Since::Changes(changes) = b.changes_since(0, None) else {
        panic!("the whole history is kept")
    };
    let mut chain = String::new();
    for (i, c) in changes.iter().enumerate() {
        assert_eq!(c.version, i as u64 + 1);
        chain = edgehub::message::chain_next(
            &chain,
            c.version,
            c.op.as_str(),
            &c.key.resource(),
            &c.json,
        );
        assert_eq!(chain, c.chain);
    }
    assert_eq!(chain, sa.chain);
    // A node resuming at 40 with a's chain there gets the same delta from b.
    let at40 = changes[39].chain.clone();
    assert!(matches!(a.changes_since(40, Some(&at40)), Since::Changes(c) if c.len() == 40));
    assert!(matches!(b.changes_since(40, Some(&at40)), Since::Changes(c) if c.len() == 40));
    assert!(matches!(b.changes_since(40, Some("other")), Since::Gone));

    // A third replica starting now loads the same state and the log from etcd.
    let c = open(&etcd, 1000);
    assert_eq!(c.snapshot().expect("c").chain, sa.chain);
    assert!(matches!(c.changes_since(40, Some(&at40)), Since::Changes(ch) if ch.len() == 40));
}

#[test]
fn preconditions_hold_across_replicas() {
    let etcd = TestEtcd::start();
    let a = Arc::new(open(&etcd, 100));
    let b = Arc::new(open(&etcd, 100));
    a.write(vec![put(node("n", "0"))]).expect("create");
    eventually("b sees n", || b.version() == 1);
    // Both replicas write on top of version 1 at once: exactly one wins.
    let racers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(i, store)| {
            std::thread::spawn(move || {
                store.write(vec![Write::Put {
                    object: node("n", &format!("from-{i}")),
                    expect_version: Some(1),
                }])
            })
        })
        .collect();
    let results: Vec<_> = racers
        .into_iter()
        .map(|r| r.join().expect("racer"))
        .collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(results.iter().any(|r| matches!(
        r,
        Err(StoreError::Conflict {
            expected: 1,
            actual: 2,
            ..
        })
    )));
    // A write decided on an old version is refused as stale.
    assert!(matches!(
        a.write_at(Some(1), vec![put(node("m", "0"))]),
        Err(StoreError::Stale { base: 1, actual: 2 })
    ));
    // Deleting what another replica deleted first is NotFound, not a second change.
    let k = ObjectKey::new(Kind::Node, "", "n");
    b.write(vec![Write::Delete { key: k.clone() }])
        .expect("delete");
    let second = a.write(vec![Write::Delete { key: k }]);
    assert!(matches!(second, Err(StoreError::NotFound(_))), "{second:?}");
    // a learns b's delete through its watch, which may not have delivered it yet: one change
    // (version 3), never a second one of a's own.
    eventually("a saw b's delete", || a.version() >= 3);
    assert_eq!(a.version(), 3);
}

#[test]
fn cluster_ips_stay_unique_across_replicas() {
    let etcd = TestEtcd::start();
    let cidr: ipnet::IpNet = "10.96.0.0/28".parse().expect("cidr");
    let stores: Vec<Arc<dyn Store>> = (0..3)
        .map(|_| Arc::new(open(&etcd, 1000)) as Arc<dyn Store>)
        .collect();
    let objects: Vec<Arc<Objects>> = stores
        .iter()
        .map(|s| Arc::new(Objects::new(s.clone(), cidr).expect("objects")))
        .collect();
    // 14 usable addresses, 12 Services from three replicas at once: all distinct.
    let writers: Vec<_> = objects
        .iter()
        .enumerate()
        .map(|(r, o)| {
            let o = o.clone();
            std::thread::spawn(move || {
                for i in 0..4 {
                    o.apply(vec![svc(&format!("s{r}-{i}"))], false)
                        .expect("apply");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    eventually("all replicas at 12", || {
        stores.iter().all(|s| s.version() == 12)
    });
    let ips: std::collections::HashSet<String> = stores[2]
        .list(Kind::Service, None)
        .expect("list")
        .iter()
        .map(|r| match Object::from_json(Kind::Service, &r.json) {
            Ok(Object::Service(s)) => s.spec.cluster_ip,
            _ => panic!("not a service"),
        })
        .collect();
    assert_eq!(ips.len(), 12, "{ips:?}");
    // Two more fit, the third finds the range full, on any replica.
    objects[0].apply(vec![svc("x1")], false).expect("13");
    objects[1].apply(vec![svc("x2")], false).expect("14");
    assert!(matches!(
        objects[2].apply(vec![svc("x3")], false),
        Err(ApplyError::Conflict { .. })
    ));
}

#[test]
fn admission_fails_once_another_replica_revoked_the_token() {
    let etcd = TestEtcd::start();
    let a: Arc<dyn Store> = Arc::new(open(&etcd, 100));
    let b: Arc<dyn Store> = Arc::new(open(&etcd, 100));
    let oa = Objects::new(a.clone(), "10.96.0.0/24".parse().expect("cidr")).expect("objects");
    a.put_token_hash("edge", "h").expect("token");
    let tokens = b.subscribe_tokens();
    let labels = BTreeMap::new();
    assert!(oa.admit_node("edge", &labels).expect("admitted"));
    b.delete_token_hash("edge").expect("revoke");
    b.write(vec![Write::Delete {
        key: ObjectKey::new(Kind::Node, "", "edge"),
    }])
    .expect("delete");
    assert!(tokens.has_changed().expect("open"));
    // Once a knows the node is gone, its admission would have to create the object again:
    // the token guard refuses that.
    eventually("a saw the delete", || a.version() == b.version());
    assert!(!oa.admit_node("edge", &labels).expect("refused"));
    eventually("the node stays deleted", || {
        a.get(&ObjectKey::new(Kind::Node, "", "edge"))
            .expect("get")
            .is_none()
    });
}

#[test]
fn oversized_writes_are_refused_naming_the_limit() {
    let etcd = TestEtcd::start();
    let mut cfg = etcd.config("/big/");
    cfg.max_txn_ops = 10;
    let store = EtcdStore::open(&cfg, 100, 1 << 20).expect("open");
    let many: Vec<Write> = (0..9).map(|i| put(node(&format!("n{i}"), "z"))).collect();
    let err = store.write(many).unwrap_err();
    assert!(matches!(err, StoreError::TooLarge(_)), "{err}");
    assert!(err.to_string().contains("max-txn-ops"), "{err}");
    assert_eq!(store.version(), 0, "nothing of it is stored");
    // An object and its change record must fit in etcd's request size.
    let big = "x".repeat(900 << 10);
    let mut labels = BTreeMap::new();
    labels.insert("blob".to_string(), big);
    let err = store
        .write(vec![put(Object::Node(Node::new("big", labels)))])
        .unwrap_err();
    assert!(err.to_string().contains("max-request-bytes"), "{err}");
    store
        .write(vec![put(node("ok", "z"))])
        .expect("a small one");
}

#[test]
fn history_is_bounded_in_etcd_and_in_memory() {
    let etcd = TestEtcd::start();
    let store = open(&etcd, 5);
    for i in 0..12 {
        store
            .write(vec![put(node("a", &i.to_string()))])
            .expect("write");
    }
    assert!(matches!(store.changes_since(12, None), Since::Current));
    assert!(matches!(store.changes_since(13, None), Since::Gone));
    assert!(matches!(store.changes_since(6, None), Since::Gone));
    assert!(matches!(store.changes_since(7, None), Since::Changes(c) if c.len() == 5));
    let client = store.client();
    let keys = store
        .spawn(async move {
            let mut kv = client.kv_client();
            kv.get(
                "/test/log/",
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map(|r| r.kvs().len())
        })
        .expect("runtime");
    let n = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt")
        .block_on(keys)
        .expect("join")
        .expect("get");
    assert_eq!(n, 5, "the log in etcd is trimmed with each write");
}

#[test]
fn a_watch_behind_a_compaction_lists_again() {
    let etcd = TestEtcd::start();
    let a = open(&etcd, 100);
    let b = open(&etcd, 100);
    for i in 0..5 {
        a.write(vec![put(node("a", &i.to_string()))])
            .expect("write");
    }
    eventually("b at 5", || b.version() == 5);
    // Compact everything, then make b's next watch start before the compaction point.
    let client = a.client();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let rev = b.inner.mirror().revision;
    rt.block_on(
        a.spawn(async move { client.kv_client().compact(rev, None).await.map(|_| ()) })
            .expect("rt"),
    )
    .expect("join")
    .expect("compact");
    b.inner.mirror_mut().revision = 1;
    let inner = b.inner.clone();
    let end = rt
        .block_on(
            b.spawn(async move { inner.watch_once().await })
                .expect("rt"),
        )
        .expect("join");
    assert!(matches!(end, Err(WatchEnd::Compacted(_))));
    // The relist the watch loop does then brings back the full state.
    let inner = b.inner.clone();
    rt.block_on(b.spawn(async move { inner.relist().await }).expect("rt"))
        .expect("join")
        .expect("relist");
    assert_eq!(
        b.snapshot().expect("b").chain,
        a.snapshot().expect("a").chain
    );
    a.write(vec![put(node("a", "after"))]).expect("write");
    eventually("b follows again", || b.version() == 6);
}

#[test]
fn tokens_and_router_records_reach_every_replica() {
    let etcd = TestEtcd::start();
    let a = open(&etcd, 100);
    let b = open(&etcd, 100);
    let (mut t, mut r) = (b.subscribe_tokens(), b.subscribe_router());
    t.mark_unchanged();
    r.mark_unchanged();
    a.put_token_hash("n1", "h1").expect("token");
    a.put_router(RouterKind::Rule, "r1", "{}").expect("rule");
    eventually("b has both", || {
        b.token_hashes().expect("t").len() == 1
            && b.get_router(RouterKind::Rule, "r1").expect("r").is_some()
    });
    assert!(t.has_changed().expect("t") && r.has_changed().expect("r"));
    assert!(b.delete_token_hash("n1").expect("revoke"));
    assert!(!b.delete_token_hash("n1").expect("again"));
    assert!(b.token_hashes().expect("t").is_empty(), "read-your-writes");
    eventually("a sees the revoke", || {
        a.token_hashes().expect("t").is_empty()
    });
    assert_eq!(a.version(), 0, "none of it is a versioned change");
    assert!(b.health().is_ok());
}

#[test]
fn a_sqlite_store_moves_to_etcd_and_back() {
    use crate::store::export;
    use crate::store::sqlite::SqliteStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = SqliteStore::open(&dir.path().join("a.db"), 100, 1 << 20).expect("open");
    for i in 0..6 {
        sqlite
            .write(vec![put(node(&format!("n{}", i % 4), &i.to_string()))])
            .expect("write");
    }
    sqlite.put_token_hash("n1", "h1").expect("token");
    sqlite
        .put_router(RouterKind::Endpoint, "e1", "{}")
        .expect("router");
    let mut text = Vec::new();
    export::write(&export::dump(&sqlite).expect("dump"), &mut text).expect("write");

    let etcd = TestEtcd::start();
    let target = open(&etcd, 100);
    export::check_empty(&target).expect("a new etcd store is empty");
    target
        .restore(&export::read(text.as_slice()).expect("read"))
        .expect("import");
    drop(target);
    let moved = open(&etcd, 100);
    let (a, b) = (sqlite.snapshot().expect("a"), moved.snapshot().expect("b"));
    assert_eq!(
        (&a.store_id, a.version, &a.chain),
        (&b.store_id, b.version, &b.chain)
    );
    assert_eq!(a.records, b.records);
    assert_eq!(
        moved.token_hashes().expect("t"),
        vec![("n1".to_string(), "h1".to_string())]
    );
    // A node of the SQLite cloud resumes by delta on etcd, which goes on from there.
    let Since::Changes(c) = sqlite.changes_since(3, None) else {
        panic!()
    };
    let at3 = match sqlite.changes_since(2, None) {
        Since::Changes(c) => c[0].chain.clone(),
        other => panic!("{other:?}"),
    };
    assert!(matches!(moved.changes_since(3, Some(&at3)), Since::Changes(m) if m.len() == c.len()));
    assert_eq!(
        moved.write(vec![put(node("new", "z"))]).expect("write")[0].version,
        7
    );
    assert!(export::check_empty(&moved).is_err());

    // And back to a new SQLite file.
    let mut text = Vec::new();
    export::write(&export::dump(&moved).expect("dump"), &mut text).expect("write");
    let back = SqliteStore::open(&dir.path().join("b.db"), 100, 1 << 20).expect("open");
    back.restore(&export::read(text.as_slice()).expect("read"))
        .expect("import");
    drop(back);
    let back = SqliteStore::open(&dir.path().join("b.db"), 100, 1 << 20).expect("reopen");
    assert_eq!(
        back.snapshot().expect("b").chain,
        moved.snapshot().expect("m").chain
    );
    assert_eq!(back.version(), 7);
}
