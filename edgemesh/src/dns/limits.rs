//! The DNS server's bounds, and what happens when one is reached.
//!
//! TCP connections are what a client can pile up: each one holds a task and a descriptor for
//! as long as the client keeps it open. So a connection waiting for its client (for a query, or
//! for the client to read an answer) is closed after [`TCP_IDLE`], as CoreDNS and BIND do; a
//! client holds at most [`MAX_TCP_PER_CLIENT`] and the server [`MAX_TCP_CONNECTIONS`]. At a cap
//! the connection idle longest (of that client, at the per-client cap) is closed to make room,
//! so idle connections never keep a new query out; only when every connection in the way is
//! busy answering is the new one refused. UDP is not affected by any of this. Every hit counts
//! in `edgemesh_dns_limit_hits_total{limit}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use metrics::Counter;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// A TCP connection waiting this long for its client is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(5);
/// TCP connections one client address may hold.
pub const MAX_TCP_PER_CLIENT: usize = 32;
/// TCP connections served at once.
pub const MAX_TCP_CONNECTIONS: usize = 256;

/// A limit of the DNS server that was reached: `edgemesh_dns_limit_hits_total{limit}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// A TCP connection closed after waiting too long for a query or for its client to read.
    TcpIdle,
    /// A client's TCP connections at their cap: its longest-idle one was closed, or the new
    /// one when all were busy.
    TcpPerClient,
    /// All TCP connections in use: the longest-idle one was closed, or the new one.
    TcpTotal,
    /// A TCP message announced as longer than any query: the connection is closed.
    MessageSize,
    /// Too many forwarded queries in flight: SERVFAIL at once.
    ForwardInFlight,
}

impl Limit {
    const ALL: [Limit; 5] = [
        Limit::TcpIdle,
        Limit::TcpPerClient,
        Limit::TcpTotal,
        Limit::MessageSize,
        Limit::ForwardInFlight,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::TcpIdle => "tcp_idle",
            Limit::TcpPerClient => "tcp_per_client",
            Limit::TcpTotal => "tcp_total",
            Limit::MessageSize => "message_size",
            Limit::ForwardInFlight => "forward_in_flight",
        }
    }
}

static LIMIT_HITS: [OnceLock<Counter>; Limit::ALL.len()] =
    [const { OnceLock::new() }; Limit::ALL.len()];

/// Counts one hit of `limit`.
pub fn record_limit(limit: Limit) {
    let i = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
    LIMIT_HITS[i]
        .get_or_init(
            || metrics::counter!("edgemesh_dns_limit_hits_total", "limit" => limit.as_str()),
        )
        .increment(1);
}

/// The TCP bounds of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLimits {
    pub idle: Duration,
    pub per_client: usize,
    pub total: usize,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            idle: TCP_IDLE,
            per_client: MAX_TCP_PER_CLIENT,
            total: MAX_TCP_CONNECTIONS,
        }
    }
}

/// The open TCP connections of a server, by client, and whether each waits for its client.
pub struct TcpSlots {
    limits: TcpLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: u64,
    conns: HashMap<u64, Conn>,
    per_client: HashMap<IpAddr, usize>,
}

struct Conn {
    client: IpAddr,
    /// Since when it waits for its client; `None` while a query is being answered.
    waiting_since: Option<Instant>,
    close: CancellationToken,
}

impl State {
    fn remove(&mut self, id: u64) -> Option<Conn> {
        let conn = self.conns.remove(&id)?;
        if let Some(n) = self.per_client.get_mut(&conn.client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&conn.client);
            }
        }
        Some(conn)
    }

    /// Closes the connection among `which` that has waited longest; false when none waits.
    fn evict(&mut self, which: impl Fn(&Conn) -> bool) -> bool {
        let victim = self
            .conns
            .iter()
            .filter(|(_, c)| which(c))
            .filter_map(|(id, c)| c.waiting_since.map(|t| (t, *id)))
            .min();
        match victim.and_then(|(_, id)| self.remove(id)) {
            Some(conn) => {
                conn.close.cancel();
                true
            }
            None => false,
        }
    }
}

impl TcpSlots {
    pub fn new(limits: TcpLimits) -> Arc<TcpSlots> {
        Arc::new(TcpSlots {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    pub fn limits(&self) -> TcpLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the maps consistent, so a poisoned lock still guards usable state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A slot for a new connection from `client`, made by closing the connection idle longest
    /// when a cap is reached; `Err` names the cap when every connection in the way is busy.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Slot, Limit> {
        let mut state = self.lock();
        if state.per_client.get(&client).copied().unwrap_or(0) >= self.limits.per_client {
            record_limit(Limit::TcpPerClient);
            if !state.evict(|c| c.client == client) {
                return Err(Limit::TcpPerClient);
            }
        }
        if state.conns.len() >= self.limits.total {
            record_limit(Limit::TcpTotal);
            if !state.evict(|_| true) {
                return Err(Limit::TcpTotal);
            }
        }
        let id = state.next;
        state.next += 1;
        let close = CancellationToken::new();
        state.conns.insert(
            id,
            Conn {
                client,
                waiting_since: Some(Instant::now()),
                close: close.clone(),
            },
        );
        *state.per_client.entry(client).or_default() += 1;
        Ok(Slot {
            id,
            slots: self.clone(),
            close,
        })
    }
}

/// One admitted connection; dropping it frees the slot.
pub struct Slot {
    id: u64,
    slots: Arc<TcpSlots>,
    close: CancellationToken,
}

impl Slot {
    /// The connection waits for its client from now on (and may be closed to make room).
    pub fn waiting(&self) {
        self.set_waiting(Some(Instant::now()));
    }

    /// The connection is answering a query (and is not closed to make room).
    pub fn busy(&self) {
        self.set_waiting(None);
    }

    fn set_waiting(&self, since: Option<Instant>) {
        if let Some(c) = self.slots.lock().conns.get_mut(&self.id) {
            c.waiting_since = since;
        }
    }

    /// Resolves when the connection was closed to make room for another.
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    fn closed(slot: &Slot) -> bool {
        let mut f = std::pin::pin!(slot.closed());
        matches!(
            f.as_mut().poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(())
        )
    }

    #[tokio::test(start_paused = true)]
    async fn caps_close_the_longest_idle_connection_and_refuse_only_when_all_are_busy() {
        let slots = TcpSlots::new(TcpLimits {
            idle: Duration::from_secs(5),
            per_client: 2,
            total: 3,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = slots.admit(a).expect("a1");
        tokio::time::advance(Duration::from_secs(1)).await;
        let a2 = slots.admit(a).expect("a2");
        tokio::time::advance(Duration::from_secs(1)).await;
        // a at its cap: its longest-idle connection (a1) makes room.
        let a3 = slots.admit(a).expect("a3");
        assert!(closed(&a1) && !closed(&a2));
        assert_eq!(slots.len(), 2);
        drop(a1);
        assert_eq!(slots.len(), 2, "the evicted slot is already free");
        // Busy connections are never closed: a's new one is refused.
        a2.busy();
        a3.busy();
        assert_eq!(slots.admit(a).err(), Some(Limit::TcpPerClient));
        // Another client fills the server; then the total cap closes the idlest anywhere.
        let b1 = slots.admit(b).expect("b1");
        a3.waiting();
        tokio::time::advance(Duration::from_secs(1)).await;
        b1.waiting();
        let b2 = slots.admit(b).expect("b2");
        assert!(closed(&a3) && !closed(&b1) && !closed(&a2));
        a2.busy();
        b1.busy();
        b2.busy();
        assert_eq!(slots.admit(b).err(), Some(Limit::TcpPerClient));
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert_eq!(slots.admit(c).err(), Some(Limit::TcpTotal));
        drop((a2, a3, b1, b2));
        assert!(slots.is_empty());
    }
}
