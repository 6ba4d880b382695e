//! Flows to endpoints on this node, served without a task each.
//!
//! A node may hold tens of thousands of UDP flows, nearly all idle (one DNS question each, a
//! sensor that speaks once a minute). A task per flow costs its future, a timer, a waker and a
//! queue; here a flow is one record and one connected socket. The client's datagrams are sent
//! to that socket straight from the Service socket's receive loop; one poller
//! ([`Upstreams`], an epoll set of its own inside tokio's) takes the endpoint's answers of
//! every flow; idleness is checked on a coarse clock by the flow table (`table::Flows::expire`).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgehub::balance::{Endpoint, InFlight};
use edgehub::io::datagram::Direction;
use mio::net::UdpSocket as FlowSocket;
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;

use edgehub::routes::stats::ServiceStats;

use super::counters::drop_counted;

/// Milliseconds since the proxy started, on tokio's clock (so tests may pause it): coarse
/// enough to be one load per datagram, fine enough for idle timeouts of seconds.
#[derive(Clone, Copy)]
pub(super) struct Clock {
    base: tokio::time::Instant,
}

impl Clock {
    pub(super) fn new() -> Clock {
        Clock {
            base: tokio::time::Instant::now(),
        }
    }

    pub(super) fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }
}

/// What became of a datagram sent to the endpoint.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sent {
    Forwarded,
    /// Dropped (and counted); the flow lives on.
    Dropped,
    /// The endpoint is not there (ICMP unreachable): counted against it; the flow must end.
    Unreachable,
}

/// One flow to an endpoint on this node.
pub(super) struct LocalFlow {
    socket: FlowSocket,
    client: SocketAddr,
    /// The socket on the Service IP:port the client sent to: answers leave from it.
    reply: Arc<UdpSocket>,
    endpoint: Endpoint,
    /// The Service's counters (and its label, for drops).
    stats: Arc<ServiceStats>,
    clock: Clock,
    idle: u64,
    last_active: AtomicU64,
    _in_flight: InFlight,
}

/// What a [`LocalFlow`] is made of, besides its socket.
pub(super) struct FlowParts {
    pub(super) client: SocketAddr,
    pub(super) reply: Arc<UdpSocket>,
    pub(super) endpoint: Endpoint,
    pub(super) in_flight: InFlight,
    pub(super) stats: Arc<ServiceStats>,
    pub(super) clock: Clock,
    pub(super) idle: Duration,
}

fn unreachable(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionRefused
}

impl LocalFlow {
    pub(super) fn new(socket: std::net::UdpSocket, parts: FlowParts) -> LocalFlow {
        let now = parts.clock.now();
        LocalFlow {
            socket: FlowSocket::from_std(socket),
            client: parts.client,
            reply: parts.reply,
            endpoint: parts.endpoint,
            stats: parts.stats,
            clock: parts.clock,
            idle: parts.idle.as_millis() as u64,
            last_active: AtomicU64::new(now),
            _in_flight: parts.in_flight,
        }
    }

    pub(super) fn endpoint(&self) -> SocketAddr {
        self.endpoint.addr
    }

    pub(super) fn service(&self) -> &str {
        self.stats.label()
    }

    /// When the flow is idle if nothing moves before then (the proxy's clock).
    pub(super) fn idle_deadline(&self) -> u64 {
        self.last_active.load(Ordering::Relaxed) + self.idle
    }

    fn touch(&self) {
        self.last_active.store(self.clock.now(), Ordering::Relaxed);
    }

    /// Sends a datagram of the client's to the endpoint, without waiting: when the socket's
    /// buffer is full the datagram is dropped, as the network would. Drops are counted here.
    pub(super) fn send(&self, datagram: &[u8]) -> Sent {
        match self.socket.send(datagram) {
            Ok(_) => {
                self.stats
                    .udp()
                    .datagram(Direction::ToStream, datagram.len());
                self.touch();
                Sent::Forwarded
            }
            Err(e) if unreachable(&e) => {
                self.endpoint.health.record_failure();
                drop_counted(self.stats.label(), "unreachable");
                Sent::Unreachable
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                drop_counted(self.stats.label(), "queue_full");
                Sent::Dropped
            }
            Err(e) => {
                tracing::debug!(error = %e, endpoint = %self.endpoint.addr, "send to the endpoint failed");
                drop_counted(self.stats.label(), "send_failed");
                Sent::Dropped
            }
        }
    }

    /// Forwards the answers waiting on the socket to the client, up to
    /// [`ANSWERS_PER_ROUND`].
    pub(super) fn answers(&self, buf: &mut [u8]) -> Answers {
        for _ in 0..ANSWERS_PER_ROUND {
            match self.socket.recv(buf) {
                Ok(n) => {
                    self.endpoint.health.record_success();
                    self.stats.udp().datagram(Direction::FromStream, n);
                    self.touch();
                    if let Err(e) = self.reply.try_send_to(&buf[..n], self.client) {
                        tracing::debug!(error = %e, client = %self.client, "reply to the client failed");
                        drop_counted(self.stats.label(), "reply_failed");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Answers::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.failed(e);
                    return Answers::Ended;
                }
            }
        }
        Answers::More
    }

    /// The socket's pending error (the poller saw `EPOLLERR`); true when the flow must end.
    pub(super) fn error(&self) -> bool {
        match self.socket.take_error() {
            Ok(None) => false,
            Ok(Some(e)) | Err(e) => {
                self.failed(e);
                true
            }
        }
    }

    /// Counts what failed; whatever it was ends the flow, so that the next datagram picks anew.
    fn failed(&self, e: io::Error) {
        if unreachable(&e) {
            tracing::debug!(endpoint = %self.endpoint.addr, "ICMP unreachable");
            self.endpoint.health.record_failure();
            drop_counted(self.stats.label(), "unreachable");
        } else {
            tracing::debug!(error = %e, endpoint = %self.endpoint.addr, "flow socket failed");
        }
    }
}

/// Registers flow sockets with the poller (from any thread).
pub(super) struct Registry(mio::Registry);

impl Registry {
    /// `flow`'s socket reported to the poller under `id`.
    pub(super) fn add(&self, flow: &mut LocalFlow, id: u64) -> io::Result<()> {
        // The poller's sockets are edge-triggered: `answers` reads until empty. A socket
        // leaves the set when it closes (flows never share a socket's descriptor).
        let token = mio::Token(usize::try_from(id).unwrap_or(usize::MAX));
        self.0
            .register(&mut flow.socket, token, mio::Interest::READABLE)
    }
}

/// The sockets of every socket flow in one epoll set, itself watched by tokio.
pub(super) struct Upstreams {
    poll: mio::Poll,
}

/// Answers one flow forwards in a round of the poller: a busy flow does not hold up the others.
const ANSWERS_PER_ROUND: usize = 64;

/// What a flow's socket had for the poller.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answers {
    /// Read until empty.
    Drained,
    /// [`ANSWERS_PER_ROUND`] forwarded and more waiting.
    More,
    /// The flow must end: the endpoint answered ICMP unreachable (counted against it) or the
    /// socket failed.
    Ended,
}

impl Upstreams {
    pub(super) fn new() -> io::Result<(Upstreams, Registry)> {
        let poll = mio::Poll::new()?;
        let registry = Registry(poll.registry().try_clone()?);
        Ok((Upstreams { poll }, registry))
    }

    /// Waits for flow sockets to become ready, then calls `ready(id, error)` for each, until
    /// the set fails (the caller stops it by dropping it). A socket `ready` left with more to
    /// read ([`Answers::More`]) is called again in the next round without waiting: the set is
    /// edge-triggered and would not report it again. Must run inside tokio.
    pub(super) async fn run(self, mut ready: impl FnMut(u64, bool) -> Answers) -> io::Result<()> {
        // SAFETY: a `mio::Poll` owns its epoll descriptor from creation to drop and always
        // reports that one; the `AsyncFd` owns the `Poll`, so the descriptor outlives it.
        let mut poll =
            unsafe { AsyncFd::register_with_interest(self.poll, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
        let mut events = mio::event::Events::with_capacity(256);
        let mut again: Vec<u64> = Vec::new();
        let mut next: Vec<u64> = Vec::new();
        loop {
            if again.is_empty() {
                let mut guard = poll.readable_mut().await?;
                if !take_events(guard.get_inner_mut(), &mut events)? {
                    // Nothing left: wait for tokio to see the set ready again.
                    guard.clear_ready();
                    continue;
                }
            } else {
                take_events(poll.get_mut(), &mut events)?;
            }
            for event in events.iter() {
                let id = event.token().0 as u64;
                if let Answers::More = ready(id, event.is_error()) {
                    next.push(id);
                }
            }
            for id in again.drain(..) {
                if let Answers::More = ready(id, false) {
                    next.push(id);
                }
            }
            next.sort_unstable();
            next.dedup();
            std::mem::swap(&mut again, &mut next);
            // One round per turn: the Service sockets' receive loops share the worker.
            tokio::task::yield_now().await;
        }
    }
}

/// The readiness waiting in the set, without waiting; whether there was any.
fn take_events(poll: &mut mio::Poll, events: &mut mio::event::Events) -> io::Result<bool> {
    loop {
        match poll.poll(events, Some(Duration::ZERO)) {
            Ok(()) => return Ok(!events.is_empty()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
