//! What a node was told about its peers for direct paths: their candidates (only peers it may
//! connect to, the cloud filters by Community) and whether the cloud enforces Communities.
//! Kept in `<data_dir>/direct-peers.json`, so a restarted node knows its LAN peers' addresses
//! while the cloud is unreachable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::identity::write_file_atomic;
use crate::message::Candidate;

/// File of the peer book inside `data_dir`.
pub const PEERS_FILE: &str = "direct-peers.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerState {
    /// `communities.enforce` as the cloud last said.
    #[serde(default)]
    pub enforce_communities: bool,
    /// Candidates of each peer this node may form a direct path with.
    #[serde(default)]
    pub peers: BTreeMap<String, Vec<Candidate>>,
}

pub struct PeerBook {
    path: PathBuf,
    state: watch::Sender<Arc<PeerState>>,
}

impl PeerBook {
    /// Loads the book from `data_dir`; a missing or unreadable file is an empty book (the
    /// cloud sends everything again on the next connection).
    pub fn open(data_dir: &Path) -> PeerBook {
        let path = data_dir.join(PEERS_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable peer book");
                PeerState::default()
            }),
            Err(_) => PeerState::default(),
        };
        PeerBook {
            path,
            state: watch::Sender::new(Arc::new(state)),
        }
    }

    pub fn get(&self) -> Arc<PeerState> {
        self.state.borrow().clone()
    }

    /// Follows the book as the cloud updates it.
    pub fn subscribe(&self) -> watch::Receiver<Arc<PeerState>> {
        self.state.subscribe()
    }

    fn update(&self, f: impl FnOnce(&mut PeerState)) {
        let mut next = (*self.get()).clone();
        f(&mut next);
        if next == *self.get() {
            return;
        }
        match serde_json::to_vec_pretty(&next) {
            Ok(bytes) => {
                if let Err(e) = write_file_atomic(&self.path, &bytes, 0o600) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot save the peer book");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the peer book"),
        }
        self.state.send_replace(Arc::new(next));
    }

    /// Sets a peer's candidates; `None` forgets the peer (it may no longer connect directly).
    pub fn set_peer(&self, node: &str, candidates: Option<Vec<Candidate>>) {
        self.update(|s| match candidates {
            Some(c) => {
                s.peers.insert(node.to_string(), c);
            }
            None => {
                s.peers.remove(node);
            }
        });
    }

    pub fn set_enforce(&self, enforce: bool) {
        self.update(|s| s.enforce_communities = enforce);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::CandidateKind;

    #[test]
    fn the_book_survives_a_restart_and_forgets_peers_on_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let book = PeerBook::open(dir.path());
        let c = vec![Candidate {
            address: "10.1.0.3:10004".parse().expect("addr"),
            kind: CandidateKind::Host,
        }];
        book.set_peer("edge-2", Some(c.clone()));
        book.set_peer("edge-3", Some(c.clone()));
        book.set_enforce(true);
        book.set_peer("edge-3", None);
        let again = PeerBook::open(dir.path()).get();
        assert!(again.enforce_communities);
        assert_eq!(again.peers.len(), 1);
        assert_eq!(again.peers["edge-2"], c);
        std::fs::write(dir.path().join(PEERS_FILE), "{broken").expect("write");
        assert_eq!(*PeerBook::open(dir.path()).get(), PeerState::default());
    }
}
