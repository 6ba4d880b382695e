//! The edge side of the sync protocol (`docs/sync-protocol.md`) as a session without sockets,
//! store or clock of its own, so that the hub client and the benchmark's simulated nodes run
//! the same rules.
//!
//! The driver feeds it what the cloud sent (decoded [`Message`]s, the fact that a frame
//! arrived, the time when its timer fires) and carries out what it asks for: messages to send
//! ([`SyncSession::poll_transmit`]), store work (the objects of a snapshot under way and the
//! snapshot to commit from [`SyncSession::handle`]; a batch of changes to commit from
//! [`SyncSession::take_batch`]) and status ([`SyncSession::poll_event`]). The driver reports
//! each finished commit with [`SyncSession::store_committed`]; only then is the version acked.
//!
//! The session checks what is checkable before the store sees it: order of the answer, the
//! snapshot and the changes; redeliveries (skipped and counted); gaps; the history chain at the
//! end of a delta. A driver's store may check again (the hub client's SQLite store does, inside
//! its transaction).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::time::Instant;
use tracing::debug;

use crate::message::{
    chain_next, group, module, op, resource, Ack, Message, MessageError, SnapshotChunk, SyncMode,
    SyncRequest, SyncResponse,
};
use crate::metamanager::{EdgeChange, SyncPoint};
use crate::model::{ObjectKey, CLUSTER_SCOPE};

/// What a session needs to know about the node and its link.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub node_name: String,
    /// Published as the node's labels in the sync request.
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub keepalive_interval: Duration,
    /// The link is given up when nothing arrived from the cloud for this long; `None` never
    /// gives it up.
    pub keepalive_timeout: Option<Duration>,
}

/// Why a session cannot go on; the driver drops the connection (and may reconnect, which
/// resumes from what the store committed).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error("protocol error: {0}")]
    Unexpected(String),
    #[error("protocol error: {what} with invalid resource {resource:?}")]
    BadResource {
        what: &'static str,
        resource: String,
    },
    #[error(
        "change {resource} has version {version}, but the node is at {at}: a change is missing"
    )]
    Gap {
        resource: String,
        version: u64,
        at: u64,
    },
    #[error("the cloud answered {mode} for store {got}, but this copy is of store {stored}")]
    StoreMismatch {
        mode: &'static str,
        stored: String,
        got: String,
    },
    #[error("history mismatch at version {version}: this copy is not the cloud's history")]
    HistoryMismatch { version: u64 },
    #[error("no message from the cloud for {0:?}")]
    KeepaliveTimeout(Duration),
    #[error("the store reported a commit the session did not ask for")]
    NothingInFlight,
}

/// What a received message asks of the driver.
#[derive(Debug)]
pub enum Received {
    /// Nothing now (a sync answer, a keepalive, a redelivered change, an unknown message).
    Nothing,
    /// A new change was buffered for the next [`SyncSession::take_batch`].
    Buffered { version: u64 },
    /// Objects of the snapshot under way: keep them until `complete`, then replace the whole
    /// store with every object kept, at the given version and chain, in one step, and call
    /// [`SyncSession::store_committed`].
    Snapshot {
        objects: Vec<(ObjectKey, Box<RawValue>)>,
        complete: Option<SnapshotCommit>,
    },
}

/// A completed snapshot: the store is to hold exactly its objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotCommit {
    pub store_id: String,
    pub version: u64,
    pub chain: String,
    pub objects: u64,
}

/// Changes to commit in one step, together with the version and chain they end at.
#[derive(Clone, Debug)]
pub struct ChangeBatch {
    pub store_id: String,
    /// New changes only, in order, without gaps.
    pub changes: Vec<EdgeChange>,
    pub version: u64,
    pub chain: String,
    /// The end of a delta inside this batch, for a store that checks the chain there itself.
    pub expect: Option<(u64, String)>,
}

/// What happened, for the driver's status and metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum SessionEvent {
    /// The cloud's answer to the sync request.
    Answered(Box<SyncResponse>),
    /// The node caught up with the cloud on this connection.
    Synced(SyncMode),
    /// A batch was committed (`applied` may be 0 when everything was a redelivery).
    BatchCommitted {
        version: u64,
        applied: usize,
        duplicates: usize,
    },
    SnapshotCommitted {
        version: u64,
        objects: u64,
    },
    /// An ack of this version was queued.
    Acked(u64),
}

/// A version and the history chain at it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Point {
    version: u64,
    chain: String,
}

enum Phase {
    /// The sync request is out; only its answer may come.
    Requested,
    /// Receiving the chunks of a snapshot at `at`.
    Snapshot { at: Point, objects: u64 },
    /// Catching up with a delta that ends at `target`.
    Delta { target: Point },
    /// Up to date with the answer (once what was received is committed); live changes follow.
    Live,
}

/// A commit handed to the driver and not yet reported done.
struct InFlight {
    at: Point,
    applied: usize,
    duplicates: usize,
    snapshot_objects: Option<u64>,
    /// This commit brings the node up to the answer.
    syncs: Option<SyncMode>,
}

/// A message waiting to be sent, built when it is taken: thousands of simulated nodes keep
/// their queues' capacity, so the entries stay small.
enum Outgoing {
    Request(Box<SyncRequest>),
    Ack(u64),
    Keepalive,
}

/// One connection's worth of the sync protocol, from the sync request on.
pub struct SyncSession {
    /// The store id of the node's copy, then the one the cloud answered with.
    store_id: Option<String>,
    /// What the store has committed.
    committed: Point,
    /// Where the node stands with everything received (buffered or being committed).
    tip: Point,
    phase: Phase,
    batch: Vec<EdgeChange>,
    /// Redeliveries skipped since the last batch was taken.
    duplicates: usize,
    /// The delta's end, when the buffered batch reaches it.
    batch_expect: Option<Point>,
    in_flight: Option<InFlight>,
    outbox: VecDeque<Outgoing>,
    events: VecDeque<SessionEvent>,
    keepalive_resource: String,
    keepalive_interval: Duration,
    keepalive_timeout: Option<Duration>,
    next_keepalive: Instant,
    deadline: Option<Instant>,
}

impl SyncSession {
    /// A session for a node whose store committed `point`, with its sync request queued. A
    /// point without a store id asks for a snapshot.
    pub fn new(cfg: &SessionConfig, point: SyncPoint, now: Instant) -> SyncSession {
        let request = SyncRequest {
            store_id: point.store_id.clone(),
            resource_version: point.version,
            chain: point.chain.clone(),
            labels: cfg.labels.clone(),
            agent_version: cfg.agent_version.clone(),
        };
        let committed = Point {
            version: point.version,
            chain: point.chain,
        };
        // A zero interval would be a busy loop.
        let keepalive_interval = cfg.keepalive_interval.max(Duration::from_millis(1));
        SyncSession {
            store_id: point.store_id,
            tip: committed.clone(),
            committed,
            phase: Phase::Requested,
            batch: Vec::new(),
            duplicates: 0,
            batch_expect: None,
            in_flight: None,
            outbox: VecDeque::from([Outgoing::Request(Box::new(request))]),
            events: VecDeque::new(),
            keepalive_resource: format!("{CLUSTER_SCOPE}/node/{}", cfg.node_name),
            keepalive_interval,
            keepalive_timeout: cfg.keepalive_timeout,
            next_keepalive: now + keepalive_interval,
            deadline: cfg.keepalive_timeout.map(|t| now + t),
        }
    }

    /// Sends the first keepalive at `at` instead of one interval after the start (a fleet that
    /// connected together spreads its keepalives this way).
    pub fn schedule_keepalive(&mut self, at: Instant) {
        self.next_keepalive = at;
    }

    /// The version the store committed.
    pub fn version(&self) -> u64 {
        self.committed.version
    }

    /// The history chain at [`SyncSession::version`].
    pub fn chain(&self) -> &str {
        &self.committed.chain
    }

    /// Changes buffered for the next batch.
    pub fn pending(&self) -> usize {
        self.batch.len()
    }

    pub fn poll_transmit(&mut self) -> Option<Message> {
        let Some(next) = self.outbox.pop_front() else {
            // Mostly idle, and there may be thousands of sessions: hold no empty capacity.
            self.outbox.shrink_to_fit();
            return None;
        };
        Some(match next {
            Outgoing::Request(request) => request.message(),
            Outgoing::Ack(version) => Ack::message(version),
            Outgoing::Keepalive => Message::new(
                module::EDGEHUB,
                module::CLOUDHUB,
                group::HUB,
                op::KEEPALIVE,
                &self.keepalive_resource,
            ),
        })
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        let event = self.events.pop_front();
        if event.is_none() {
            self.events.shrink_to_fit();
        }
        event
    }

    /// A frame (of any kind) arrived from the cloud: the link is alive.
    pub fn received(&mut self, now: Instant) {
        self.deadline = self.keepalive_timeout.map(|t| now + t);
    }

    /// When [`SyncSession::on_timer`] is due next.
    pub fn next_timer(&self) -> Instant {
        match self.deadline {
            Some(d) => d.min(self.next_keepalive),
            None => self.next_keepalive,
        }
    }

    /// Queues a keepalive when one is due; fails when the cloud was silent too long.
    pub fn on_timer(&mut self, now: Instant) -> Result<(), SessionError> {
        if let (Some(deadline), Some(timeout)) = (self.deadline, self.keepalive_timeout) {
            if now >= deadline {
                return Err(SessionError::KeepaliveTimeout(timeout));
            }
        }
        if now >= self.next_keepalive {
            self.outbox.push_back(Outgoing::Keepalive);
            self.next_keepalive = now + self.keepalive_interval;
        }
        Ok(())
    }

    /// Takes one message from the cloud (not a stream message: those belong to the tunnel).
    pub fn handle(&mut self, msg: Message) -> Result<Received, SessionError> {
        match (msg.route.operation.as_str(), msg.route.resource.as_str()) {
            (op::RESPONSE, resource::SYNC) => self.on_answer(&msg),
            (op::RESPONSE, resource::SNAPSHOT) => self.on_chunk(&msg),
            (op::INSERT | op::UPDATE | op::DELETE, _) => self.on_change(msg),
            (op::KEEPALIVE, _) => Ok(Received::Nothing),
            (operation, res) => {
                debug!(operation, resource = res, "ignoring an unknown message");
                Ok(Received::Nothing)
            }
        }
    }

    fn on_answer(&mut self, msg: &Message) -> Result<Received, SessionError> {
        if !matches!(self.phase, Phase::Requested) {
            return Err(SessionError::Unexpected(
                "a sync answer the node did not ask for".into(),
            ));
        }
        let resp: SyncResponse = msg.content_as()?;
        if resp.mode != SyncMode::Snapshot {
            if let Some(stored) = self.store_id.as_deref().filter(|s| *s != resp.store_id) {
                return Err(SessionError::StoreMismatch {
                    mode: resp.mode.as_str(),
                    stored: stored.to_string(),
                    got: resp.store_id.clone(),
                });
            }
        }
        self.store_id = Some(resp.store_id.clone());
        let target = Point {
            version: resp.to_version,
            chain: resp.chain.clone(),
        };
        let mode = resp.mode;
        self.events
            .push_back(SessionEvent::Answered(Box::new(resp)));
        match mode {
            SyncMode::Snapshot => {
                self.phase = Phase::Snapshot {
                    at: target,
                    objects: 0,
                }
            }
            SyncMode::Delta if target.version > self.tip.version => {
                self.phase = Phase::Delta { target }
            }
            SyncMode::Delta | SyncMode::Current => {
                if target.version == self.tip.version
                    && !target.chain.is_empty()
                    && target.chain != self.tip.chain
                {
                    return Err(SessionError::HistoryMismatch {
                        version: target.version,
                    });
                }
                // Nothing to apply: confirm the version the node stands at, so the cloud's
                // view of it is right after a reconnect.
                self.phase = Phase::Live;
                self.events.push_back(SessionEvent::Synced(mode));
                self.ack(self.committed.version);
            }
        }
        Ok(Received::Nothing)
    }

    fn on_chunk(&mut self, msg: &Message) -> Result<Received, SessionError> {
        let Phase::Snapshot { at, objects } = &mut self.phase else {
            return Err(SessionError::Unexpected(
                "snapshot chunk without a snapshot answer".into(),
            ));
        };
        if !msg.header.resource_version.is_empty() && msg.version()? != at.version {
            return Err(SessionError::Unexpected(format!(
                "snapshot chunk of version {} in the snapshot of version {}",
                msg.header.resource_version, at.version
            )));
        }
        let chunk: SnapshotChunk = msg.content_as()?;
        let mut keys = Vec::with_capacity(chunk.entries.len());
        for entry in chunk.entries {
            let key = ObjectKey::parse_resource(&entry.resource).ok_or_else(|| {
                SessionError::BadResource {
                    what: "snapshot entry",
                    resource: entry.resource.clone(),
                }
            })?;
            keys.push((key, entry.object));
        }
        *objects += keys.len() as u64;
        if !chunk.last {
            return Ok(Received::Snapshot {
                objects: keys,
                complete: None,
            });
        }
        let (at, count) = (std::mem::take(at), *objects);
        let store_id = self.store_id.clone().unwrap_or_default();
        self.tip = at.clone();
        self.phase = Phase::Live;
        self.in_flight = Some(InFlight {
            at: at.clone(),
            applied: 0,
            duplicates: 0,
            snapshot_objects: Some(count),
            syncs: Some(SyncMode::Snapshot),
        });
        Ok(Received::Snapshot {
            objects: keys,
            complete: Some(SnapshotCommit {
                store_id,
                version: at.version,
                chain: at.chain,
                objects: count,
            }),
        })
    }

    fn on_change(&mut self, msg: Message) -> Result<Received, SessionError> {
        if matches!(self.phase, Phase::Requested | Phase::Snapshot { .. }) {
            return Err(SessionError::Unexpected(format!(
                "change {} before the sync answer completed",
                msg.route.resource
            )));
        }
        let key = ObjectKey::parse_resource(&msg.route.resource).ok_or_else(|| {
            SessionError::BadResource {
                what: "change",
                resource: msg.route.resource.clone(),
            }
        })?;
        let version = msg.version()?;
        if version <= self.tip.version {
            self.duplicates += 1;
            return Ok(Received::Nothing);
        }
        if version != self.tip.version + 1 {
            return Err(SessionError::Gap {
                resource: msg.route.resource,
                version,
                at: self.tip.version,
            });
        }
        let Message { route, content, .. } = msg;
        // A delete carries the object as it was: its bytes are part of the chain.
        let body = content.ok_or_else(|| MessageError::MissingContent {
            operation: route.operation.clone(),
            resource: route.resource.clone(),
        })?;
        let body = String::from(Box::<str>::from(body));
        let chain = chain_next(
            &self.tip.chain,
            version,
            &route.operation,
            &route.resource,
            &body,
        );
        if let Phase::Delta { target } = &mut self.phase {
            if version == target.version {
                if !target.chain.is_empty() && target.chain != chain {
                    return Err(SessionError::HistoryMismatch { version });
                }
                self.batch_expect = Some(std::mem::take(target));
                self.phase = Phase::Live;
            }
        }
        self.tip = Point { version, chain };
        self.batch.push(EdgeChange {
            version,
            key,
            operation: route.operation,
            body,
        });
        Ok(Received::Buffered { version })
    }

    /// The buffered changes to commit, or `None` when there are none or a commit is still in
    /// flight. A burst of redeliveries only is acked again at once: the store has it all.
    pub fn take_batch(&mut self) -> Option<ChangeBatch> {
        if self.in_flight.is_some() {
            return None;
        }
        let duplicates = std::mem::take(&mut self.duplicates);
        if self.batch.is_empty() {
            if duplicates > 0 {
                self.events.push_back(SessionEvent::BatchCommitted {
                    version: self.committed.version,
                    applied: 0,
                    duplicates,
                });
                self.ack(self.committed.version);
            }
            return None;
        }
        let expect = self.batch_expect.take();
        let changes = std::mem::take(&mut self.batch);
        self.in_flight = Some(InFlight {
            at: self.tip.clone(),
            applied: changes.len(),
            duplicates,
            snapshot_objects: None,
            syncs: expect.as_ref().map(|_| SyncMode::Delta),
        });
        Some(ChangeBatch {
            store_id: self.store_id.clone().unwrap_or_default(),
            changes,
            version: self.tip.version,
            chain: self.tip.chain.clone(),
            expect: expect.map(|p| (p.version, p.chain)),
        })
    }

    /// The store committed what it was last handed (a batch or a snapshot): ack it.
    pub fn store_committed(&mut self) -> Result<(), SessionError> {
        let done = self.in_flight.take().ok_or(SessionError::NothingInFlight)?;
        let version = done.at.version;
        self.committed = done.at;
        self.events.push_back(match done.snapshot_objects {
            Some(objects) => SessionEvent::SnapshotCommitted { version, objects },
            None => SessionEvent::BatchCommitted {
                version,
                applied: done.applied,
                duplicates: done.duplicates,
            },
        });
        if let Some(mode) = done.syncs {
            self.events.push_back(SessionEvent::Synced(mode));
        }
        self.ack(version);
        Ok(())
    }

    fn ack(&mut self, version: u64) {
        self.outbox.push_back(Outgoing::Ack(version));
        self.events.push_back(SessionEvent::Acked(version));
    }
}

/// Cloud messages for the tests of the session and of its drivers.
#[cfg(test)]
pub(crate) mod wire {
    use super::*;
    use crate::message::SnapshotEntry;

    pub(crate) fn from_cloud(operation: &str, resource: &str) -> Message {
        Message::new(
            module::CLOUDHUB,
            module::EDGEHUB,
            group::META,
            operation,
            resource,
        )
    }

    pub(crate) fn answer(mode: SyncMode, store: &str, from: u64, to: u64, chain: &str) -> Message {
        from_cloud(op::RESPONSE, resource::SYNC).with_content(&SyncResponse {
            mode,
            store_id: store.into(),
            from_version: from,
            to_version: to,
            count: to.saturating_sub(from),
            chain: chain.into(),
        })
    }

    pub(crate) fn svc(name: &str, port: u16) -> String {
        format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"ports":[{{"port":{port}}}]}}}}"#
        )
    }

    pub(crate) fn resource_of(name: &str) -> String {
        format!("default/service/{name}")
    }

    pub(crate) fn change(version: u64, operation: &str, name: &str) -> Message {
        from_cloud(operation, &resource_of(name))
            .with_version(version)
            .with_raw_content(svc(name, version as u16))
            .expect("valid json")
    }

    /// The chain the cloud has after `changes` (version, operation, name) from `chain`.
    pub(crate) fn chain_after(chain: &str, changes: &[(u64, &str, &str)]) -> String {
        changes.iter().fold(chain.to_string(), |c, (v, o, n)| {
            chain_next(&c, *v, o, &resource_of(n), &svc(n, *v as u16))
        })
    }

    pub(crate) fn chunk(version: u64, names: &[&str], last: bool) -> Message {
        let entries = names
            .iter()
            .map(|n| SnapshotEntry {
                resource: resource_of(n),
                object: RawValue::from_string(svc(n, 80)).expect("json"),
            })
            .collect();
        from_cloud(op::RESPONSE, resource::SNAPSHOT)
            .with_version(version)
            .with_content(&SnapshotChunk { entries, last })
    }
}

#[cfg(test)]
mod tests {
    use super::wire::*;
    use super::*;
    use crate::metamanager::MetaManager;

    const STORE: &str = "store-1";

    fn cfg() -> SessionConfig {
        SessionConfig {
            node_name: "edge-1".into(),
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            agent_version: "1.2.3".into(),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Some(Duration::from_secs(30)),
        }
    }

    fn point(store: Option<&str>, version: u64, chain: &str) -> SyncPoint {
        SyncPoint {
            store_id: store.map(str::to_string),
            version,
            chain: chain.into(),
        }
    }

    /// A session at `point` whose sync request was already sent.
    fn started(point: SyncPoint) -> SyncSession {
        let mut s = SyncSession::new(&cfg(), point, Instant::now());
        let request = s.poll_transmit().expect("the sync request");
        assert_eq!(
            (request.operation(), request.resource()),
            (op::QUERY, resource::SYNC)
        );
        s
    }

    fn sent(s: &mut SyncSession) -> Vec<Message> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    /// Versions acked by the queued messages (which must all be acks).
    fn acks(s: &mut SyncSession) -> Vec<u64> {
        sent(s)
            .iter()
            .map(|m| {
                assert_eq!((m.operation(), m.resource()), (op::RESPONSE, resource::ACK));
                m.content_as::<Ack>().expect("ack").resource_version
            })
            .collect()
    }

    fn events(s: &mut SyncSession) -> Vec<SessionEvent> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    /// A session at `version` of STORE that was answered `current` (events and ack drained).
    fn live(version: u64, chain: &str) -> SyncSession {
        let mut s = started(point(Some(STORE), version, chain));
        s.handle(answer(SyncMode::Current, STORE, version, version, chain))
            .expect("current");
        assert_eq!(acks(&mut s), [version]);
        events(&mut s);
        s
    }

    fn buffered(s: &mut SyncSession, msg: Message) -> u64 {
        match s.handle(msg).expect("a valid change") {
            Received::Buffered { version } => version,
            other => panic!("not buffered: {other:?}"),
        }
    }

    #[test]
    fn the_sync_request_presents_the_resume_point() {
        let mut s = SyncSession::new(&cfg(), point(Some(STORE), 7, "c7"), Instant::now());
        let request = s.poll_transmit().expect("request");
        let body: SyncRequest = request.content_as().expect("a sync request");
        assert_eq!(
            body,
            SyncRequest {
                store_id: Some(STORE.into()),
                resource_version: 7,
                chain: "c7".into(),
                labels: cfg().labels,
                agent_version: "1.2.3".into(),
            }
        );
        assert!(s.poll_transmit().is_none());
        assert!(s.poll_event().is_none());
        assert_eq!((s.version(), s.chain()), (7, "c7"));

        // Without a store id (a fresh node, or one whose history is not the cloud's), the
        // request names none and the cloud answers with a snapshot.
        let mut s = SyncSession::new(&cfg(), point(None, 7, "c7"), Instant::now());
        let body: SyncRequest = s
            .poll_transmit()
            .expect("request")
            .content_as()
            .expect("a sync request");
        assert_eq!(body.store_id, None);
    }

    #[test]
    fn current_acks_the_committed_version_without_store_work() {
        let mut s = started(point(Some(STORE), 7, "c7"));
        let r = s
            .handle(answer(SyncMode::Current, STORE, 7, 7, "c7"))
            .expect("current");
        assert!(matches!(r, Received::Nothing));
        assert_eq!(acks(&mut s), [7]);
        let ev = events(&mut s);
        assert!(matches!(ev[0], SessionEvent::Answered(ref a) if a.mode == SyncMode::Current));
        assert_eq!(
            ev[1..],
            [
                SessionEvent::Synced(SyncMode::Current),
                SessionEvent::Acked(7)
            ]
        );
        assert!(s.take_batch().is_none());
    }

    #[test]
    fn a_delta_from_the_resume_point_is_one_batch_acked_after_its_commit() {
        let c2 = chain_after("", &[(1, op::INSERT, "a"), (2, op::INSERT, "b")]);
        let c4 = chain_after(&c2, &[(3, op::UPDATE, "a"), (4, op::DELETE, "b")]);
        let mut s = started(point(Some(STORE), 2, &c2));
        s.handle(answer(SyncMode::Delta, STORE, 2, 4, &c4))
            .expect("delta");
        assert_eq!(buffered(&mut s, change(3, op::UPDATE, "a")), 3);
        assert_eq!(buffered(&mut s, change(4, op::DELETE, "b")), 4);
        assert_eq!(s.pending(), 2);
        assert!(sent(&mut s).is_empty(), "nothing is acked before a commit");

        let batch = s.take_batch().expect("a batch");
        assert_eq!(batch.store_id, STORE);
        assert_eq!(
            batch
                .changes
                .iter()
                .map(|c| (c.version, c.operation.as_str(), c.key.name.as_str()))
                .collect::<Vec<_>>(),
            [(3, op::UPDATE, "a"), (4, op::DELETE, "b")]
        );
        assert_eq!(
            batch.changes[1].body,
            svc("b", 4),
            "a delete keeps its object"
        );
        assert_eq!((batch.version, batch.chain.as_str()), (4, c4.as_str()));
        assert_eq!(batch.expect, Some((4, c4.clone())));
        assert_eq!(s.pending(), 0);
        assert!(
            sent(&mut s).is_empty(),
            "still nothing acked: the store works"
        );
        assert!(s.take_batch().is_none(), "one commit at a time");
        assert_eq!(s.version(), 2);

        s.store_committed().expect("in flight");
        assert_eq!(acks(&mut s), [4]);
        let ev = events(&mut s);
        assert_eq!(
            ev[1..],
            [
                SessionEvent::BatchCommitted {
                    version: 4,
                    applied: 2,
                    duplicates: 0
                },
                SessionEvent::Synced(SyncMode::Delta),
                SessionEvent::Acked(4),
            ]
        );
        assert_eq!((s.version(), s.chain()), (4, c4.as_str()));
    }

    #[test]
    fn a_delta_over_several_batches_syncs_with_the_batch_that_reaches_its_end() {
        let c3 = chain_after(
            "",
            &[
                (1, op::INSERT, "a"),
                (2, op::INSERT, "b"),
                (3, op::INSERT, "c"),
            ],
        );
        let mut s = started(point(Some(STORE), 0, ""));
        s.handle(answer(SyncMode::Delta, STORE, 0, 3, &c3))
            .expect("delta");
        buffered(&mut s, change(1, op::INSERT, "a"));
        let first = s.take_batch().expect("batch");
        assert_eq!(first.expect, None);
        s.store_committed().expect("commit");
        assert_eq!(acks(&mut s), [1]);
        assert!(!events(&mut s).contains(&SessionEvent::Synced(SyncMode::Delta)));

        // The delta's end and a live change after it, in one burst.
        buffered(&mut s, change(2, op::INSERT, "b"));
        buffered(&mut s, change(3, op::INSERT, "c"));
        buffered(&mut s, change(4, op::INSERT, "d"));
        let second = s.take_batch().expect("batch");
        assert_eq!(second.expect, Some((3, c3.clone())));
        assert_eq!(second.version, 4);
        assert_eq!(second.chain, chain_after(&c3, &[(4, op::INSERT, "d")]));
        s.store_committed().expect("commit");
        assert_eq!(acks(&mut s), [4]);
        assert!(events(&mut s).contains(&SessionEvent::Synced(SyncMode::Delta)));
    }

    #[test]
    fn a_delta_that_ends_on_another_chain_is_a_history_mismatch() {
        let mut s = started(point(Some(STORE), 0, ""));
        s.handle(answer(SyncMode::Delta, STORE, 0, 2, "not-this-history"))
            .expect("delta");
        buffered(&mut s, change(1, op::INSERT, "a"));
        let err = s
            .handle(change(2, op::INSERT, "b"))
            .expect_err("the chain differs at the delta's end");
        assert!(
            matches!(err, SessionError::HistoryMismatch { version: 2 }),
            "{err}"
        );
        assert!(err.to_string().contains("not the cloud's history"), "{err}");
        assert!(sent(&mut s).is_empty(), "nothing of it was acked");

        // `current` at the node's version but on another chain: the same.
        let mut s = started(point(Some(STORE), 5, "mine"));
        let err = s
            .handle(answer(SyncMode::Current, STORE, 5, 5, "theirs"))
            .expect_err("another chain");
        assert!(matches!(err, SessionError::HistoryMismatch { version: 5 }));
        assert!(sent(&mut s).is_empty());
    }

    #[test]
    fn current_or_delta_for_another_store_is_refused_a_snapshot_is_not() {
        for mode in [SyncMode::Current, SyncMode::Delta] {
            let mut s = started(point(Some(STORE), 5, "c5"));
            let err = s
                .handle(answer(mode, "store-2", 5, 6, ""))
                .expect_err("another store");
            assert!(
                err.to_string()
                    .contains("for store store-2, but this copy is of store store-1"),
                "{err}"
            );
            assert!(sent(&mut s).is_empty());
        }
        let mut s = started(point(Some(STORE), 5, "c5"));
        s.handle(answer(SyncMode::Snapshot, "store-2", 0, 9, "c9"))
            .expect("a snapshot replaces the copy, whatever its store");
    }

    #[test]
    fn a_snapshot_is_staged_until_its_last_chunk_then_replaces_the_store() {
        let mut s = started(point(Some(STORE), 5, "old"));
        s.handle(answer(SyncMode::Snapshot, "store-2", 0, 10, "c10"))
            .expect("snapshot");
        let Received::Snapshot { objects, complete } =
            s.handle(chunk(10, &["a", "b"], false)).expect("chunk")
        else {
            panic!("not a snapshot chunk")
        };
        assert_eq!(
            objects
                .iter()
                .map(|(k, o)| (k.resource(), o.get().to_string()))
                .collect::<Vec<_>>(),
            [
                (resource_of("a"), svc("a", 80)),
                (resource_of("b"), svc("b", 80))
            ]
        );
        assert!(complete.is_none());
        let Received::Snapshot { objects, complete } =
            s.handle(chunk(10, &["c"], true)).expect("chunk")
        else {
            panic!("not a snapshot chunk")
        };
        assert_eq!(objects.len(), 1);
        assert_eq!(
            complete,
            Some(SnapshotCommit {
                store_id: "store-2".into(),
                version: 10,
                chain: "c10".into(),
                objects: 3,
            })
        );
        assert!(
            sent(&mut s).is_empty(),
            "acked only once the store replaced"
        );
        assert!(s.take_batch().is_none());
        assert_eq!(s.version(), 5);
        s.store_committed().expect("in flight");
        assert_eq!(acks(&mut s), [10]);
        let ev = events(&mut s);
        assert_eq!(
            ev[1..],
            [
                SessionEvent::SnapshotCommitted {
                    version: 10,
                    objects: 3
                },
                SessionEvent::Synced(SyncMode::Snapshot),
                SessionEvent::Acked(10),
            ]
        );
        assert_eq!((s.version(), s.chain()), (10, "c10"));

        // Live changes continue the snapshot's chain; what it already holds is a redelivery.
        assert!(matches!(
            s.handle(change(10, op::UPDATE, "a")).expect("dup"),
            Received::Nothing
        ));
        buffered(&mut s, change(11, op::UPDATE, "a"));
        let batch = s.take_batch().expect("batch");
        assert_eq!(batch.store_id, "store-2");
        assert_eq!(batch.chain, chain_after("c10", &[(11, op::UPDATE, "a")]));
    }

    #[test]
    fn an_empty_snapshot_is_one_last_chunk() {
        let mut s = started(point(None, 0, ""));
        s.handle(answer(SyncMode::Snapshot, STORE, 0, 0, ""))
            .expect("snapshot");
        let Received::Snapshot { objects, complete } =
            s.handle(chunk(0, &[], true)).expect("chunk")
        else {
            panic!("not a snapshot chunk")
        };
        assert!(objects.is_empty());
        assert_eq!(complete.map(|c| c.objects), Some(0));
        s.store_committed().expect("in flight");
        assert_eq!(acks(&mut s), [0]);
    }

    #[test]
    fn redeliveries_are_skipped_and_counted_once_each() {
        let mut s = live(5, "c5");
        for msg in [
            change(4, op::UPDATE, "a"),
            change(5, op::UPDATE, "a"),
            change(6, op::UPDATE, "a"),
            change(6, op::UPDATE, "a"),
            change(7, op::DELETE, "a"),
        ] {
            s.handle(msg).expect("valid");
        }
        let batch = s.take_batch().expect("batch");
        assert_eq!(
            batch.changes.iter().map(|c| c.version).collect::<Vec<_>>(),
            [6, 7]
        );
        s.store_committed().expect("commit");
        assert_eq!(acks(&mut s), [7]);
        assert_eq!(
            events(&mut s),
            [
                SessionEvent::BatchCommitted {
                    version: 7,
                    applied: 2,
                    duplicates: 3
                },
                SessionEvent::Acked(7)
            ]
        );
        // The same burst delivered again changes nothing.
        for v in [6, 7] {
            assert!(matches!(
                s.handle(change(v, op::UPDATE, "a")).expect("dup"),
                Received::Nothing
            ));
        }
        assert!(s.take_batch().is_none());
        assert_eq!(acks(&mut s), [7], "re-acked: the store has it all");
        assert_eq!(
            events(&mut s)[0],
            SessionEvent::BatchCommitted {
                version: 7,
                applied: 0,
                duplicates: 2
            }
        );
        assert_eq!(s.version(), 7);
    }

    #[test]
    fn a_missing_version_is_a_gap() {
        let mut s = live(5, "c5");
        let err = s
            .handle(change(7, op::UPDATE, "a"))
            .expect_err("6 is missing");
        assert!(
            matches!(
                err,
                SessionError::Gap {
                    version: 7,
                    at: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "change default/service/a has version 7, but the node is at 5: a change is missing"
        );
        // Within a burst too: the tip counts what is buffered.
        let mut s = live(5, "c5");
        buffered(&mut s, change(6, op::UPDATE, "a"));
        assert!(matches!(
            s.handle(change(8, op::UPDATE, "a")),
            Err(SessionError::Gap {
                version: 8,
                at: 6,
                ..
            })
        ));
    }

    #[test]
    fn a_commit_is_reported_once() {
        let mut s = live(5, "c5");
        assert!(matches!(
            s.store_committed(),
            Err(SessionError::NothingInFlight)
        ));
        buffered(&mut s, change(6, op::UPDATE, "a"));
        s.take_batch().expect("batch");
        // More arrives while the store works; it waits for the next batch.
        buffered(&mut s, change(7, op::UPDATE, "a"));
        assert!(s.take_batch().is_none());
        s.store_committed().expect("commit");
        assert!(s.store_committed().is_err());
        assert_eq!(acks(&mut s), [6]);
        let next = s.take_batch().expect("the rest");
        assert_eq!(next.changes.len(), 1);
        assert_eq!(next.version, 7);
    }

    #[test]
    fn messages_out_of_order_are_protocol_errors() {
        let cases: Vec<(SyncSession, Message, &str)> = vec![
            (
                started(point(None, 0, "")),
                chunk(1, &["a"], true),
                "snapshot chunk without a snapshot answer",
            ),
            (
                started(point(None, 0, "")),
                change(1, op::INSERT, "a"),
                "change default/service/a before the sync answer completed",
            ),
            (
                {
                    let mut s = started(point(None, 0, ""));
                    s.handle(answer(SyncMode::Snapshot, STORE, 0, 3, ""))
                        .expect("answer");
                    s
                },
                change(4, op::INSERT, "a"),
                "before the sync answer completed",
            ),
            (
                {
                    let mut s = started(point(None, 0, ""));
                    s.handle(answer(SyncMode::Snapshot, STORE, 0, 3, ""))
                        .expect("answer");
                    s
                },
                chunk(2, &["a"], true),
                "snapshot chunk of version 2 in the snapshot of version 3",
            ),
            (
                live(5, "c5"),
                answer(SyncMode::Current, STORE, 5, 5, "c5"),
                "a sync answer the node did not ask for",
            ),
            (
                live(5, "c5"),
                chunk(5, &["a"], true),
                "snapshot chunk without a snapshot answer",
            ),
        ];
        for (mut s, msg, want) in cases {
            let what = format!("{} {}", msg.operation(), msg.resource());
            let err = s.handle(msg).expect_err(&what);
            assert!(err.to_string().contains(want), "{what}: {err}");
            assert!(sent(&mut s).is_empty(), "{what}: nothing acked");
        }
    }

    fn raw(json: &str) -> Message {
        Message::from_json(json).expect("an envelope")
    }

    #[test]
    fn malformed_messages_are_clear_errors() {
        let in_snapshot = || {
            let mut s = started(point(None, 0, ""));
            s.handle(answer(SyncMode::Snapshot, STORE, 0, 3, ""))
                .expect("answer");
            s
        };
        let cases: Vec<(SyncSession, Message, &str)> = vec![
            (
                started(point(None, 0, "")),
                raw(
                    r#"{"header":{"msg_id":"1"},"route":{"operation":"response","resource":"sync"}}"#,
                ),
                "message response sync has no content",
            ),
            (
                started(point(None, 0, "")),
                raw(
                    r#"{"header":{"msg_id":"1"},"route":{"operation":"response","resource":"sync"},"content":{"mode":"sideways","storeId":"s","fromVersion":0,"toVersion":1,"count":1}}"#,
                ),
                "malformed message: unknown variant `sideways`",
            ),
            (
                started(point(None, 0, "")),
                raw(
                    r#"{"header":{"msg_id":"1"},"route":{"operation":"response","resource":"sync"},"content":[]}"#,
                ),
                "malformed message",
            ),
            (
                live(5, "c5"),
                raw(
                    r#"{"header":{"msg_id":"1"},"route":{"operation":"update","resource":"default/service/a"},"content":{}}"#,
                ),
                "invalid resourceversion \"\"",
            ),
            (
                live(5, "c5"),
                raw(
                    r#"{"header":{"msg_id":"1","resourceversion":"-6"},"route":{"operation":"update","resource":"default/service/a"},"content":{}}"#,
                ),
                "invalid resourceversion \"-6\"",
            ),
            (
                live(5, "c5"),
                raw(
                    r#"{"header":{"msg_id":"1","resourceversion":"6"},"route":{"operation":"update","resource":"default/service/a"}}"#,
                ),
                "message update default/service/a has no content",
            ),
            (
                live(5, "c5"),
                raw(
                    r#"{"header":{"msg_id":"1","resourceversion":"6"},"route":{"operation":"insert","resource":"default/gadget/a"},"content":{}}"#,
                ),
                "change with invalid resource \"default/gadget/a\"",
            ),
            (
                live(5, "c5"),
                raw(
                    r#"{"header":{"msg_id":"1","resourceversion":"6"},"route":{"operation":"delete","resource":"_/service/a"},"content":{}}"#,
                ),
                "change with invalid resource \"_/service/a\"",
            ),
            (
                in_snapshot(),
                raw(
                    r#"{"header":{"msg_id":"1","resourceversion":"3"},"route":{"operation":"response","resource":"snapshot"},"content":{"entries":[{"resource":"default/service"}],"last":true}}"#,
                ),
                "malformed message",
            ),
            (
                in_snapshot(),
                raw(
                    r#"{"header":{"msg_id":"1","resourceversion":"3"},"route":{"operation":"response","resource":"snapshot"},"content":{"entries":[{"resource":"nope","object":{}}],"last":true}}"#,
                ),
                "snapshot entry with invalid resource \"nope\"",
            ),
            (
                in_snapshot(),
                raw(
                    r#"{"header":{"msg_id":"1","resourceversion":"x"},"route":{"operation":"response","resource":"snapshot"},"content":{"entries":[],"last":true}}"#,
                ),
                "invalid resourceversion \"x\"",
            ),
        ];
        for (mut s, msg, want) in cases {
            let what = msg.to_json();
            let err = s.handle(msg).expect_err(&what);
            assert!(err.to_string().contains(want), "{what}: {err}");
            assert!(sent(&mut s).is_empty(), "{what}: nothing acked");
        }
    }

    #[test]
    fn keepalives_and_unknown_messages_are_ignored() {
        let mut s = live(5, "c5");
        for json in [
            r#"{"header":{"msg_id":"1"},"route":{"operation":"keepalive","resource":"_/node/edge-1"}}"#,
            r#"{"header":{"msg_id":"1"},"route":{"operation":"frobnicate","resource":"default/service/a"}}"#,
            r#"{"header":{"msg_id":"1"},"route":{}}"#,
        ] {
            assert!(
                matches!(s.handle(raw(json)), Ok(Received::Nothing)),
                "{json}"
            );
        }
        assert!(sent(&mut s).is_empty());
        assert!(events(&mut s).is_empty());
    }

    #[test]
    fn no_message_in_any_phase_makes_it_panic() {
        let operations = [
            "insert",
            "update",
            "delete",
            "response",
            "keepalive",
            "query",
            "",
        ];
        let resources = [
            "sync",
            "snapshot",
            "ack",
            "default/service/a",
            "_/node/n",
            "default/endpoints/a",
            "a/b/c/d",
            "",
            "//",
        ];
        let versions = [
            "",
            "0",
            "1",
            "5",
            "6",
            "7",
            "18446744073709551615",
            "-1",
            "x",
        ];
        let contents = [
            None,
            Some("null"),
            Some("{}"),
            Some("[]"),
            Some(r#"{"mode":"snapshot","storeId":"s","fromVersion":0,"toVersion":9,"count":1}"#),
            Some(
                r#"{"mode":"delta","storeId":"store-1","fromVersion":5,"toVersion":18446744073709551615,"count":1}"#,
            ),
            Some(r#"{"entries":[{"resource":"default/service/a","object":{}}],"last":true}"#),
            Some(r#"{"entries":[],"last":false}"#),
            Some(r#""text""#),
        ];
        let sessions = || {
            let mut snapshot = started(point(None, 0, ""));
            snapshot
                .handle(answer(SyncMode::Snapshot, STORE, 0, 9, ""))
                .expect("answer");
            let mut delta = started(point(Some(STORE), 5, "c5"));
            delta
                .handle(answer(SyncMode::Delta, STORE, 5, 9, "c9"))
                .expect("answer");
            [
                started(point(Some(STORE), 5, "c5")),
                snapshot,
                delta,
                live(5, "c5"),
                live(u64::MAX, ""),
            ]
        };
        let mut handled = 0;
        for operation in operations {
            for res in resources {
                for version in versions {
                    for content in contents {
                        for mut s in sessions() {
                            let mut msg =
                                Message::new("cloudhub", "edgehub", "meta", operation, res);
                            msg.header.resource_version = version.into();
                            if let Some(c) = content {
                                msg = msg.with_raw_content(c.into()).expect("json");
                            }
                            let _ = s.handle(msg);
                            let _ = s.take_batch();
                            let _ = s.store_committed();
                            handled += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(handled, 7 * 9 * 9 * 9 * 5);
    }

    #[test]
    fn keepalives_go_out_every_interval_and_silence_ends_the_link() {
        let t0 = Instant::now();
        let mut s = SyncSession::new(&cfg(), point(Some(STORE), 0, ""), t0);
        sent(&mut s);
        let s10 = Duration::from_secs(10);
        assert_eq!(s.next_timer(), t0 + s10);
        s.on_timer(t0 + Duration::from_secs(5)).expect("alive");
        assert!(sent(&mut s).is_empty(), "not due yet");
        s.on_timer(t0 + s10).expect("alive");
        let ka = sent(&mut s);
        assert_eq!(ka.len(), 1);
        assert_eq!(
            (
                ka[0].route.group.as_str(),
                ka[0].operation(),
                ka[0].resource()
            ),
            (group::HUB, op::KEEPALIVE, "_/node/edge-1")
        );
        assert_eq!(s.next_timer(), t0 + 2 * s10);
        // The cloud was heard at 15 s: the link lasts until 45 s.
        s.received(t0 + Duration::from_secs(15));
        s.on_timer(t0 + 2 * s10).expect("alive");
        s.on_timer(t0 + 3 * s10).expect("alive");
        s.on_timer(t0 + 4 * s10).expect("alive");
        assert_eq!(sent(&mut s).len(), 3);
        assert_eq!(s.next_timer(), t0 + Duration::from_secs(45));
        let err = s
            .on_timer(t0 + Duration::from_secs(45))
            .expect_err("silent for 30 s");
        assert_eq!(err.to_string(), "no message from the cloud for 30s");
    }

    #[test]
    fn without_a_timeout_a_silent_link_is_kept_and_keepalives_can_be_spread() {
        let t0 = Instant::now();
        let cfg = SessionConfig {
            keepalive_timeout: None,
            ..cfg()
        };
        let mut s = SyncSession::new(&cfg, point(None, 0, ""), t0);
        sent(&mut s);
        s.schedule_keepalive(t0 + Duration::from_secs(3));
        assert_eq!(s.next_timer(), t0 + Duration::from_secs(3));
        s.on_timer(t0 + Duration::from_secs(3600))
            .expect("never gives up");
        assert_eq!(sent(&mut s).len(), 1);
        assert_eq!(s.next_timer(), t0 + Duration::from_secs(3610));
    }

    /// The session as a driver runs it, on tokio's paused clock.
    #[tokio::test(start_paused = true)]
    async fn a_timer_loop_sends_keepalives_until_the_cloud_falls_silent() {
        let start = Instant::now();
        let mut s = SyncSession::new(&cfg(), point(None, 0, ""), start);
        sent(&mut s);
        let mut keepalives = 0;
        let err = loop {
            tokio::time::sleep_until(s.next_timer()).await;
            if let Err(e) = s.on_timer(Instant::now()) {
                break e;
            }
            keepalives += sent(&mut s).len();
        };
        assert!(matches!(err, SessionError::KeepaliveTimeout(_)));
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(keepalives, 2, "at 10 s and 20 s");
    }

    /// The session and the SQLite store compute the same version and chain, so the store's
    /// own checks agree with the session's.
    #[test]
    fn the_session_and_the_store_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mm = MetaManager::open(dir.path()).expect("open");
        let mut s = started(mm.sync_point().expect("point"));
        s.handle(answer(SyncMode::Snapshot, STORE, 0, 2, "c2"))
            .expect("answer");
        let Received::Snapshot { objects, complete } =
            s.handle(chunk(2, &["a", "b"], true)).expect("chunk")
        else {
            panic!("not a snapshot chunk")
        };
        let done = complete.expect("complete");
        let objects: Vec<(ObjectKey, String)> = objects
            .into_iter()
            .map(|(k, o)| (k, o.get().to_string()))
            .collect();
        mm.replace_all(&done.store_id, done.version, &done.chain, &objects)
            .expect("replace");
        s.store_committed().expect("commit");
        for (v, o, n) in [
            (3, op::UPDATE, "a"),
            (4, op::DELETE, "b"),
            (5, op::INSERT, "c"),
        ] {
            buffered(&mut s, change(v, o, n));
        }
        let batch = s.take_batch().expect("batch");
        let expect = batch.expect.as_ref().map(|(v, c)| (*v, c.as_str()));
        let applied = mm
            .apply_changes(&batch.store_id, &batch.changes, expect)
            .expect("apply");
        s.store_committed().expect("commit");
        assert_eq!((applied.version, applied.chain.as_str()), (5, s.chain()));
        assert_eq!((applied.applied, applied.duplicates), (3, 0));
        assert_eq!(
            mm.sync_point().expect("point"),
            point(Some(STORE), 5, s.chain())
        );
        assert_eq!(mm.view().services.len(), 2);
    }
}
