//! The datagrams of one UDP flow waiting for its upstream.
//!
//! A node may hold tens of thousands of flows, nearly all idle (one DNS question each, or a
//! sensor that speaks once a minute). A channel allocates a block of slots for every flow up
//! front (about 1 KiB with `Bytes`); this queue holds only what waits, and a flow with nothing
//! waiting costs one small allocation.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use edgehub::io::datagram::DatagramSource;
use tokio::sync::Notify;

/// A new queue holding at most `capacity` datagrams: the sending and the receiving end.
pub(super) fn queue(capacity: usize) -> (FlowSender, FlowReceiver) {
    let shared = Arc::new(Shared {
        waiting: Mutex::new(Waiting {
            datagrams: VecDeque::new(),
            receiver_gone: false,
        }),
        ready: Notify::new(),
        capacity,
    });
    (FlowSender(shared.clone()), FlowReceiver(shared))
}

struct Shared {
    waiting: Mutex<Waiting>,
    /// One receiver: a notification given while it is not waiting is kept for its next wait.
    ready: Notify,
    capacity: usize,
}

struct Waiting {
    datagrams: VecDeque<Bytes>,
    receiver_gone: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What became of a datagram offered to the queue.
#[derive(Debug, PartialEq)]
pub(super) enum Offered {
    Queued,
    /// The queue holds `capacity` datagrams already: this one is dropped.
    Full,
    /// The flow has ended: the datagram is handed back, to start a new one.
    Ended(Bytes),
}

pub(super) struct FlowSender(Arc<Shared>);

impl FlowSender {
    pub(super) fn offer(&self, datagram: Bytes) -> Offered {
        let mut waiting = self.0.lock();
        if waiting.receiver_gone {
            return Offered::Ended(datagram);
        }
        if waiting.datagrams.len() >= self.0.capacity {
            return Offered::Full;
        }
        waiting.datagrams.push_back(datagram);
        drop(waiting);
        self.0.ready.notify_one();
        Offered::Queued
    }
}

pub(super) struct FlowReceiver(Arc<Shared>);

impl FlowReceiver {
    /// The next datagram, when one comes. A flow ends by its own timeout or cancellation, not
    /// by its sender, so this never reports an end.
    pub(super) async fn recv(&mut self) -> Bytes {
        loop {
            if let Some(d) = self.0.lock().datagrams.pop_front() {
                return d;
            }
            self.0.ready.notified().await;
        }
    }
}

impl FlowReceiver {
    /// Every datagram waiting now, without waiting for more.
    pub(super) fn drain(&mut self) -> std::collections::vec_deque::IntoIter<Bytes> {
        std::mem::take(&mut self.0.lock().datagrams).into_iter()
    }
}

impl Drop for FlowReceiver {
    fn drop(&mut self) {
        let mut waiting = self.0.lock();
        waiting.receiver_gone = true;
        waiting.datagrams.clear();
    }
}

impl DatagramSource for FlowReceiver {
    #[allow(clippy::manual_async_fn)] // the trait's signature: the future must be `Send`
    fn recv(&mut self) -> impl std::future::Future<Output = io::Result<Option<Bytes>>> + Send + '_ {
        async move { Ok(Some(FlowReceiver::recv(self).await)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn datagrams_arrive_in_order_up_to_the_capacity() {
        let (tx, mut rx) = queue(2);
        assert_eq!(tx.offer(Bytes::from_static(b"a")), Offered::Queued);
        assert_eq!(tx.offer(Bytes::from_static(b"b")), Offered::Queued);
        assert_eq!(tx.offer(Bytes::from_static(b"c")), Offered::Full);
        assert_eq!(rx.recv().await, Bytes::from_static(b"a"));
        assert_eq!(rx.recv().await, Bytes::from_static(b"b"));
        // Nothing waiting: the receiver waits until a datagram comes.
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.offer(Bytes::from_static(b"d"))
        });
        assert_eq!(rx.recv().await, Bytes::from_static(b"d"));
        assert_eq!(later.await.expect("sender"), Offered::Queued);
    }

    #[test]
    fn a_datagram_for_an_ended_flow_is_handed_back() {
        let (tx, rx) = queue(4);
        assert_eq!(tx.offer(Bytes::from_static(b"a")), Offered::Queued);
        drop(rx);
        assert_eq!(
            tx.offer(Bytes::from_static(b"b")),
            Offered::Ended(Bytes::from_static(b"b"))
        );
    }
}
