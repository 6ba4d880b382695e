//! Authentication: the REST API's bearer token and the per-node hub tokens.
//!
//! Node tokens are random 256-bit secrets bound to one node name. The cloud keeps only their
//! SHA-256 (a slow hash buys nothing for a random secret of that size), so a leaked database
//! does not let anyone connect as a node.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use ring::digest;

use crate::store::{Store, StoreError};

/// File (inside `data_dir`) holding the generated API token.
pub const API_TOKEN_FILE: &str = "api-token";

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(s: &str) -> String {
    digest::digest(&digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The API token: `api.token` when configured, else the one in `<data_dir>/api-token`,
/// generated (mode 0600) at first start.
pub fn load_or_create_api_token(
    configured: Option<&str>,
    data_dir: &Path,
) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(t) = configured {
        return Ok(t.to_string());
    }
    let path = data_dir.join(API_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777),
                    "the API token file is readable by other users; chmod 600 it");
            }
            return Ok(t.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let token = random_secret();
    // Written aside and renamed into place, so a crash never leaves an empty token file
    // (which the next start would silently replace with a new token).
    let tmp = data_dir.join(format!(".{API_TOKEN_FILE}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    if let Ok(dir) = std::fs::File::open(data_dir) {
        let _ = dir.sync_all();
    }
    tracing::info!(path = %path.display(), "generated the API token");
    Ok(token)
}

/// Why a node was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAuthError {
    /// No token was presented.
    Missing,
    /// The node has no token (never created, or revoked).
    UnknownNode,
    /// The token is not this node's (possibly another node's).
    WrongToken,
}

impl NodeAuthError {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeAuthError::Missing => "missing token",
            NodeAuthError::UnknownNode => "unknown or revoked node",
            NodeAuthError::WrongToken => "token does not belong to this node",
        }
    }
}

/// Node tokens, verified from memory on every handshake.
pub struct NodeTokens {
    store: Arc<dyn Store>,
    hashes: RwLock<HashMap<String, String>>,
}

impl NodeTokens {
    pub fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let hashes = store.token_hashes()?.into_iter().collect();
        Ok(NodeTokens {
            store,
            hashes: RwLock::new(hashes),
        })
    }

    /// Creates (or rotates) the node's token and returns it; only its hash is kept.
    pub fn create(&self, node: &str) -> Result<String, StoreError> {
        let token = random_secret();
        let hash = sha256_hex(&token);
        self.store.put_token_hash(node, &hash)?;
        self.hashes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), hash);
        Ok(token)
    }

    /// Revokes the node's token; true if it had one.
    pub fn revoke(&self, node: &str) -> Result<bool, StoreError> {
        let existed = self.store.delete_token_hash(node)?;
        self.hashes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        Ok(existed)
    }

    pub fn verify(&self, node: &str, token: Option<&str>) -> Result<(), NodeAuthError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(NodeAuthError::Missing)?;
        let hashes = self.hashes.read().unwrap_or_else(|p| p.into_inner());
        let expected = hashes.get(node).ok_or(NodeAuthError::UnknownNode)?;
        if constant_time_eq(expected.as_bytes(), sha256_hex(token).as_bytes()) {
            Ok(())
        } else {
            Err(NodeAuthError::WrongToken)
        }
    }

    /// Keeps the hashes in step with the store until `shutdown`: tokens made or revoked
    /// through another replica count here at once, and a node whose token went is
    /// disconnected wherever it is connected. Returns at once when no other process changes
    /// tokens: this one's own changes are in `hashes` already, and reading every hash again
    /// after each of them made a fleet's token issuance quadratic (10,500 tokens: 20 s).
    pub async fn follow(
        self: Arc<Self>,
        nodes: Arc<crate::nodes::NodeRegistry>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        if !self.store.tokens_change_elsewhere() {
            return;
        }
        let mut changes = self.store.subscribe_tokens();
        loop {
            if !edgehub::process::changed(&mut changes, &shutdown).await {
                return;
            }
            let store = self.store.clone();
            let fresh = match tokio::task::spawn_blocking(move || store.token_hashes()).await {
                Ok(Ok(h)) => h.into_iter().collect::<HashMap<_, _>>(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading node tokens failed");
                    continue;
                }
                Err(_) => continue,
            };
            let gone: Vec<String> = {
                let mut hashes = self.hashes.write().unwrap_or_else(|p| p.into_inner());
                let gone = hashes
                    .keys()
                    .filter(|n| !fresh.contains_key(*n))
                    .cloned()
                    .collect();
                *hashes = fresh;
                gone
            };
            for node in gone {
                if nodes.kick(&node) {
                    tracing::info!(%node, "token revoked: node disconnected");
                }
            }
        }
    }

    pub fn has_token(&self, node: &str) -> bool {
        self.hashes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn node_tokens_are_bound_to_their_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("c.db"), 10, 1 << 20).expect("open"));
        let tokens = NodeTokens::load(store.clone()).expect("load");
        let a = tokens.create("a").expect("create");
        let b = tokens.create("b").expect("create");
        assert_eq!(tokens.verify("a", Some(&a)), Ok(()));
        assert_eq!(tokens.verify("b", Some(&a)), Err(NodeAuthError::WrongToken));
        assert_eq!(
            tokens.verify("c", Some(&a)),
            Err(NodeAuthError::UnknownNode)
        );
        assert_eq!(tokens.verify("a", None), Err(NodeAuthError::Missing));
        // Only hashes are stored.
        assert!(store
            .token_hashes()
            .expect("hashes")
            .iter()
            .all(|(_, h)| h != &a && h != &b));
        // A restart keeps them; rotation and revocation take effect at once.
        let tokens = NodeTokens::load(store).expect("reload");
        assert_eq!(tokens.verify("b", Some(&b)), Ok(()));
        let b2 = tokens.create("b").expect("rotate");
        assert_eq!(tokens.verify("b", Some(&b)), Err(NodeAuthError::WrongToken));
        assert!(tokens.revoke("b").expect("revoke"));
        assert_eq!(
            tokens.verify("b", Some(&b2)),
            Err(NodeAuthError::UnknownNode)
        );
    }

    #[test]
    fn api_token_is_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t1 = load_or_create_api_token(None, dir.path()).expect("create");
        let t2 = load_or_create_api_token(None, dir.path()).expect("load");
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 64);
        let mode = std::fs::metadata(dir.path().join(API_TOKEN_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_or_create_api_token(Some("configured-token"), dir.path()).expect("cfg"),
            "configured-token"
        );
    }
}
