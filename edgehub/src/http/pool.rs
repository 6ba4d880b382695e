//! Connections to endpoints kept for the next requests: a few idle HTTP/1 connections per
//! endpoint (one request at a time each), and one HTTP/2 connection per endpoint (many
//! requests at once). Keyed by Service and endpoint: a connection through a tunnel was opened
//! for one Service (the far side checks and limits it as that Service's), so it never carries
//! another Service's requests.
//!
//! Bounded: at most `max_idle` idle HTTP/1 connections per key, and [`Pool::sweep`] (run every
//! few seconds) closes connections unused for `idle_timeout` and forgets keys left empty, so
//! endpoints that went away leave nothing behind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::routes::Route;

/// Which Service's requests to which endpoint a connection carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub endpoint: SocketAddr,
    /// Whether the Service had a QPS limit when the connection was opened. The far side of a
    /// tunnel decides at the open whether it checks requests one by one (a limited Service)
    /// or passes bytes (an unlimited one), so a connection opened before a limit was set must
    /// not carry requests after it.
    pub limited: bool,
    /// 0 for a connection any client connection may use; else the one client connection it
    /// belongs to (see [`PoolKey::new`]).
    pub owner: u64,
}

impl PoolKey {
    /// `owner`: the client connection, for HTTP/2 to a limited Service's endpoint elsewhere.
    /// The far side limits such a connection as a whole (it does not see HTTP/2 requests one
    /// by one), so sharing one among clients would let all of them through on one admission.
    pub fn new(route: &Route, endpoint: SocketAddr, limited: bool, owner: u64) -> PoolKey {
        PoolKey {
            namespace: route.service.namespace.clone(),
            name: route.service.name.clone(),
            endpoint,
            limited,
            owner,
        }
    }
}

/// A connection's sending half, as the pool needs to see it.
pub trait Reusable {
    /// Whether a request could be sent now. A connection that is not is dropped.
    fn is_usable(&self) -> bool;
}

impl<B> Reusable for hyper::client::conn::http1::SendRequest<B> {
    fn is_usable(&self) -> bool {
        self.is_ready() && !self.is_closed()
    }
}

impl<B> Reusable for hyper::client::conn::http2::SendRequest<B> {
    fn is_usable(&self) -> bool {
        !self.is_closed()
    }
}

/// `H1`: idle HTTP/1 connections, `H2`: shared HTTP/2 connections.
pub struct Pool<H1, H2> {
    max_idle: usize,
    idle_timeout: Duration,
    h1: Mutex<HashMap<PoolKey, Vec<(H1, Instant)>>>,
    h2: Mutex<HashMap<PoolKey, H2Slot<H2>>>,
}

struct H2Slot<S> {
    conn: Option<S>,
    last_used: Instant,
    /// Held while a connection to this endpoint is being made, so that a burst of calls makes
    /// one connection rather than one each.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

impl<H1: Reusable, H2: Reusable + Clone> Pool<H1, H2> {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            max_idle,
            idle_timeout,
            h1: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
        }
    }

    /// Whether HTTP/1 connections are kept at all.
    pub fn keeps_h1(&self) -> bool {
        self.max_idle > 0
    }

    /// An idle HTTP/1 connection for `key`, the most recently used first (so that the older
    /// ones go idle long enough to expire when traffic drops).
    pub fn take_h1(&self, key: &PoolKey) -> Option<H1> {
        let mut idle = lock(&self.h1);
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some((conn, since)) = list.pop() {
            if conn.is_usable() && now.saturating_duration_since(since) < self.idle_timeout {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps an HTTP/1 connection that is ready for another request. When `max_idle` are
    /// already kept, the oldest goes.
    pub fn put_h1(&self, key: PoolKey, conn: H1) {
        if self.max_idle == 0 || !conn.is_usable() {
            return;
        }
        let mut idle = lock(&self.h1);
        let list = idle.entry(key).or_default();
        if list.len() >= self.max_idle {
            list.remove(0);
        }
        list.push((conn, Instant::now()));
    }

    /// The HTTP/2 connection to `key`'s endpoint, when there is a usable one.
    pub fn get_h2(&self, key: &PoolKey) -> Option<H2> {
        let mut slots = lock(&self.h2);
        let slot = slots.get_mut(key)?;
        match &slot.conn {
            Some(conn) if conn.is_usable() => {
                slot.last_used = Instant::now();
                Some(conn.clone())
            }
            _ => {
                slot.conn = None;
                None
            }
        }
    }

    /// The lock to hold while making the HTTP/2 connection to `key`'s endpoint.
    pub fn h2_dialing(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut slots = lock(&self.h2);
        let slot = slots.entry(key.clone()).or_insert_with(|| H2Slot {
            conn: None,
            last_used: Instant::now(),
            dialing: Arc::new(tokio::sync::Mutex::new(())),
        });
        slot.dialing.clone()
    }

    /// Makes `conn` the HTTP/2 connection to `key`'s endpoint.
    pub fn set_h2(&self, key: &PoolKey, conn: H2) {
        let mut slots = lock(&self.h2);
        let slot = slots.entry(key.clone()).or_insert_with(|| H2Slot {
            conn: None,
            last_used: Instant::now(),
            dialing: Arc::new(tokio::sync::Mutex::new(())),
        });
        slot.conn = Some(conn);
        slot.last_used = Instant::now();
    }

    /// Forgets the HTTP/2 connection to `key`'s endpoint when it can no longer be used.
    pub fn discard_h2(&self, key: &PoolKey) {
        if let Some(slot) = lock(&self.h2).get_mut(key) {
            if slot.conn.as_ref().is_some_and(|c| !c.is_usable()) {
                slot.conn = None;
            }
        }
    }

    /// Closes connections unused for `idle_timeout` (and those closed by their peer) and
    /// forgets keys that have nothing left.
    pub fn sweep(&self) {
        let now = Instant::now();
        let fresh = |since: Instant| now.saturating_duration_since(since) < self.idle_timeout;
        lock(&self.h1).retain(|_, list| {
            list.retain(|(conn, since)| fresh(*since) && conn.is_usable());
            if list.capacity() > 2 * list.len().max(4) {
                list.shrink_to_fit();
            }
            !list.is_empty()
        });
        lock(&self.h2).retain(|_, slot| {
            if !fresh(slot.last_used) || !slot.conn.as_ref().is_some_and(|c| c.is_usable()) {
                // In-flight calls hold clones of the connection: it closes once they are done.
                slot.conn = None;
            }
            // A dial in progress holds the lock's other handle.
            slot.conn.is_some() || Arc::strong_count(&slot.dialing) > 1
        });
    }

    /// Idle HTTP/1 and shared HTTP/2 connections kept, for `/debug` and tests.
    pub fn len(&self) -> (usize, usize) {
        let h1 = lock(&self.h1).values().map(Vec::len).sum();
        let h2 = lock(&self.h2).values().filter(|s| s.conn.is_some()).count();
        (h1, h2)
    }

    /// How often [`Pool::sweep`] should run: expired connections linger at most this long
    /// past their timeout.
    pub fn sweep_interval(&self) -> Duration {
        (self.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(10))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold plain values; a panic elsewhere cannot leave one half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A connection whose peer can close it.
    #[derive(Clone, Debug)]
    struct Conn(u32, Arc<AtomicBool>);

    impl Conn {
        fn new(id: u32) -> Conn {
            Conn(id, Arc::new(AtomicBool::new(true)))
        }
        fn close(&self) {
            self.1.store(false, Ordering::SeqCst);
        }
    }

    impl Reusable for Conn {
        fn is_usable(&self) -> bool {
            self.1.load(Ordering::SeqCst)
        }
    }

    fn key(port: u16) -> PoolKey {
        PoolKey {
            namespace: Arc::from("default"),
            name: Arc::from("web"),
            endpoint: SocketAddr::from(([10, 244, 0, 2], port)),
            limited: false,
            owner: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_bounded_reused_newest_first_and_expire() {
        let pool: Pool<Conn, Conn> = Pool::new(2, Duration::from_secs(30));
        for id in 1..=3 {
            pool.put_h1(key(1), Conn::new(id));
        }
        assert_eq!(
            pool.len(),
            (2, 0),
            "the oldest went when the third came back"
        );
        assert_eq!(pool.take_h1(&key(1)).map(|c| c.0), Some(3));
        assert_eq!(pool.take_h1(&key(2)).map(|c| c.0), None, "per endpoint");

        // Closed by the endpoint while idle: skipped, not handed out.
        let closed = Conn::new(4);
        pool.put_h1(key(1), closed.clone());
        closed.close();
        assert_eq!(pool.take_h1(&key(1)).map(|c| c.0), Some(2));

        pool.put_h1(key(1), Conn::new(5));
        pool.put_h1(key(3), Conn::new(6));
        tokio::time::advance(Duration::from_secs(29)).await;
        pool.sweep();
        assert_eq!(pool.len(), (2, 0));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(pool.take_h1(&key(3)).map(|c| c.0), None, "expired");
        pool.sweep();
        assert_eq!(pool.len(), (0, 0));
        assert!(lock(&pool.h1).is_empty(), "keys are forgotten too");
    }

    #[tokio::test(start_paused = true)]
    async fn no_reuse_when_max_idle_is_zero() {
        let pool: Pool<Conn, Conn> = Pool::new(0, Duration::from_secs(30));
        pool.put_h1(key(1), Conn::new(1));
        assert!(pool.take_h1(&key(1)).is_none());
        assert!(!pool.keeps_h1());
    }

    #[tokio::test(start_paused = true)]
    async fn one_shared_h2_connection_per_endpoint() {
        let pool: Pool<Conn, Conn> = Pool::new(2, Duration::from_secs(30));
        assert!(pool.get_h2(&key(1)).is_none());
        let dialing = pool.h2_dialing(&key(1));
        let guard = dialing.lock().await;
        pool.sweep();
        assert_eq!(lock(&pool.h2).len(), 1, "a dial in progress keeps its slot");
        let conn = Conn::new(1);
        pool.set_h2(&key(1), conn.clone());
        drop(guard);
        drop(dialing);
        assert_eq!(pool.get_h2(&key(1)).map(|c| c.0), Some(1));
        assert_eq!(pool.get_h2(&key(1)).map(|c| c.0), Some(1), "shared");

        // Used within the timeout: kept; unused for it: closed and forgotten.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(pool.get_h2(&key(1)).is_some());
        tokio::time::advance(Duration::from_secs(20)).await;
        pool.sweep();
        assert_eq!(pool.len(), (0, 1));
        tokio::time::advance(Duration::from_secs(10)).await;
        pool.sweep();
        assert_eq!(pool.len(), (0, 0));
        assert!(lock(&pool.h2).is_empty());

        // A connection the endpoint closed is not handed out again.
        pool.set_h2(&key(1), conn.clone());
        conn.close();
        pool.discard_h2(&key(1));
        assert!(pool.get_h2(&key(1)).is_none());
    }
}
