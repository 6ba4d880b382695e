//! The flow table: which flows there are, in what order they began (the oldest is evicted
//! first), and when the flows served without a task of their own may have fallen idle.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::local::LocalFlow;
use super::queue::FlowSender;

/// Flows that count as a crowd whose end is worth returning memory for (see `crowd_gone`).
const CROWD: usize = 1024;

/// (client address, Service IP:port).
pub(super) type FlowKey = (SocketAddr, SocketAddr);

/// How a flow's datagrams from the client reach its endpoint.
pub(super) enum Forward {
    /// A task of the flow's own takes them from a queue: while its endpoint is picked, and for
    /// its whole life when the endpoint is reached through a tunnel stream.
    Task {
        tx: FlowSender,
        cancel: CancellationToken,
    },
    /// Sent straight from the Service socket's receive loop to a socket connected to an
    /// endpoint on this node, whose answers the poller forwards: no task, no queue.
    Socket(Arc<LocalFlow>),
}

impl Forward {
    /// Stops what forwards the flow: a task is cancelled, a socket closes once the last user
    /// of it lets go.
    fn end(self) {
        if let Forward::Task { cancel, .. } = self {
            cancel.cancel();
        }
    }
}

pub(super) struct FlowEntry {
    pub(super) id: u64,
    pub(super) forward: Forward,
}

#[derive(Default)]
pub(super) struct Flows {
    next_id: u64,
    /// The most flows held since memory was last handed back.
    peak: usize,
    by_key: HashMap<FlowKey, FlowEntry>,
    /// Flow ids in creation order: the first is the oldest.
    order: BTreeMap<u64, FlowKey>,
    /// When each socket flow may next be idle: (milliseconds on the proxy's clock, flow id).
    /// Lazy: a flow is not moved when it forwards a datagram; its deadline is checked when it
    /// comes, and put later if the flow was active meanwhile. One entry per socket flow.
    deadlines: BTreeSet<(u64, u64)>,
}

impl Flows {
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    pub(super) fn get(&self, key: &FlowKey) -> Option<&FlowEntry> {
        self.by_key.get(key)
    }

    /// Adds a flow under `key` (replacing none: the caller removed any before); its id.
    pub(super) fn insert(&mut self, key: FlowKey, forward: Forward) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.by_key.insert(key, FlowEntry { id, forward });
        self.order.insert(id, key);
        self.peak = self.peak.max(self.by_key.len());
        id
    }

    /// Whether flow `id` is still the one under `key` (not ended, evicted or replaced).
    pub(super) fn holds(&self, key: &FlowKey, id: u64) -> bool {
        self.by_key.get(key).is_some_and(|e| e.id == id)
    }

    /// Flow `id` now forwarded by `flow` without a task; it may be idle at `deadline`. The
    /// task's forward is handed back (its queue, to drain). `None` if the flow has gone.
    pub(super) fn hand_to_socket(
        &mut self,
        key: &FlowKey,
        id: u64,
        flow: Arc<LocalFlow>,
        deadline: u64,
    ) -> Option<Forward> {
        let entry = self.by_key.get_mut(key).filter(|e| e.id == id)?;
        self.deadlines.insert((deadline, id));
        Some(std::mem::replace(&mut entry.forward, Forward::Socket(flow)))
    }

    /// The socket flow with id `id`, if it is still there.
    pub(super) fn socket_flow(&self, id: u64) -> Option<(FlowKey, Arc<LocalFlow>)> {
        let key = self.order.get(&id)?;
        match self.by_key.get(key) {
            Some(FlowEntry {
                id: held,
                forward: Forward::Socket(flow),
            }) if *held == id => Some((*key, flow.clone())),
            _ => None,
        }
    }

    /// Removes flow `id` under `key` and stops what forwards it; a newer flow under the same
    /// key is kept.
    pub(super) fn remove(&mut self, key: &FlowKey, id: u64) {
        if self.holds(key, id) {
            if let Some(entry) = self.by_key.remove(key) {
                entry.forward.end();
            }
        }
        self.order.remove(&id);
        // A socket flow's deadline entry stays until it comes due, then finds no flow.
    }

    /// Ends the oldest flow; false when there is none.
    pub(super) fn evict_oldest(&mut self) -> bool {
        let Some((id, key)) = self.order.pop_first() else {
            return false;
        };
        if let Some(entry) = self.by_key.remove(&key) {
            debug_assert_eq!(entry.id, id);
            entry.forward.end();
        }
        true
    }

    /// Ends the socket flows idle at `now` (their last datagram `idle` or more before it, as
    /// each flow tells); those active since their deadline get a later one. The ended flows,
    /// for the caller to count.
    pub(super) fn expire(&mut self, now: u64) -> usize {
        let mut ended = 0;
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some((key, flow)) = self.socket_flow(id) else {
                continue; // ended otherwise already
            };
            let due = flow.idle_deadline();
            if due <= now {
                self.remove(&key, id);
                ended += 1;
            } else {
                self.deadlines.insert((due, id));
            }
        }
        ended
    }

    /// Every flow, ended (at shutdown).
    pub(super) fn clear(&mut self) {
        for (_, entry) in self.by_key.drain() {
            entry.forward.end();
        }
        self.order.clear();
        self.deadlines.clear();
    }

    /// Whether most of a crowd of flows has ended since the last time: then the table's room and
    /// the memory the flows freed are given back (a flood of 20,000 one-shot flows would
    /// otherwise stay in the agent's RSS for good).
    pub(super) fn crowd_gone(&mut self) -> bool {
        if self.peak < CROWD || self.by_key.len() > self.peak / 4 {
            return false;
        }
        self.peak = self.by_key.len();
        self.by_key.shrink_to_fit();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::queue;
    use super::*;

    fn key(i: u32) -> FlowKey {
        (
            SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 1000)),
            "10.96.0.10:53".parse().expect("a"),
        )
    }

    fn task() -> (Forward, CancellationToken) {
        let (tx, _rx) = queue::queue(1);
        let cancel = CancellationToken::new();
        (
            Forward::Task {
                tx,
                cancel: cancel.clone(),
            },
            cancel,
        )
    }

    #[test]
    fn the_oldest_flow_is_evicted_first() {
        let mut flows = Flows::default();
        let mut cancels = Vec::new();
        let mut ids = Vec::new();
        for i in 0..3 {
            let (forward, cancel) = task();
            cancels.push(cancel);
            ids.push(flows.insert(key(i), forward));
        }
        assert!(flows.evict_oldest());
        assert!(cancels[0].is_cancelled() && !cancels[1].is_cancelled());
        assert_eq!(flows.len(), 2);
        // A flow that ended removes itself; a newer flow under the same key is kept.
        flows.remove(&key(1), 99);
        assert!(flows.holds(&key(1), ids[1]), "another flow's id");
        flows.remove(&key(1), ids[1]);
        assert!(cancels[1].is_cancelled());
        assert_eq!(flows.len(), 1);
        assert!(flows.evict_oldest() && !flows.evict_oldest());
        assert_eq!(flows.len(), 0);
    }

    #[test]
    fn memory_is_handed_back_once_when_a_crowd_of_flows_has_gone() {
        let mut flows = Flows::default();
        let ids: Vec<u64> = (0..2000).map(|i| flows.insert(key(i), task().0)).collect();
        let mut handed_back = 0;
        for (i, id) in ids.into_iter().enumerate() {
            flows.remove(&key(i as u32), id);
            handed_back += usize::from(flows.crowd_gone());
        }
        // Once, at a quarter of the crowd; the rest were too few to count as a crowd again.
        assert_eq!(handed_back, 1);
        assert_eq!(flows.len(), 0);
    }
}
