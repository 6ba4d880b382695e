//! The beehive-style `Message` of KubeEdge, with its JSON field names, and the sync payloads
//! carried inside it.
//!
//! On the hub websocket, text frames carry Messages as JSON; binary frames are reserved for
//! tunnelled stream data, which must not pay for JSON or base64 per chunk.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Operations (KubeEdge `route.operation`).
pub mod op {
    pub const INSERT: &str = "insert";
    pub const UPDATE: &str = "update";
    pub const DELETE: &str = "delete";
    pub const QUERY: &str = "query";
    pub const RESPONSE: &str = "response";
    pub const KEEPALIVE: &str = "keepalive";
}

/// Message sources and destinations (KubeEdge module names).
pub mod module {
    pub const CLOUDHUB: &str = "cloudhub";
    pub const EDGEHUB: &str = "edgehub";
    pub const METAMANAGER: &str = "metamanager";
}

/// Message groups.
pub mod group {
    pub const META: &str = "meta";
    pub const HUB: &str = "hub";
    /// Tunnelled streams (open and its answer; data travel in binary frames).
    pub const STREAM: &str = "stream";
    /// Node certificates and direct node-to-node paths (settings, candidates).
    pub const DIRECT: &str = "direct";
}

/// Resources of control messages (metadata changes use `<namespace>/<type>/<name>`).
pub mod resource {
    /// Sync request (edge → cloud, `query`) and its answer (cloud → edge, `response`).
    pub const SYNC: &str = "sync";
    /// A chunk of a full snapshot (cloud → edge, `response`).
    pub const SNAPSHOT: &str = "snapshot";
    /// Acknowledgement of a committed version (edge → cloud, `response`).
    pub const ACK: &str = "ack";
    /// A node's certificate request (edge → cloud, `query`) and its answer (`response`).
    pub const CERTIFICATE: &str = "certificate";
    /// What a node needs for direct paths (edge → cloud `query`, cloud → edge `response`).
    pub const DIRECT_SETTINGS: &str = "direct-settings";
    /// Direct-path candidates: a node's own (edge → cloud, `update`), and a peer's it may
    /// connect to (cloud → edge, `update`; `delete` once it may not).
    pub const CANDIDATES: &str = "candidates";
    /// Hole punching: a node asks a peer to dial it now (edge → cloud `query`, naming the
    /// peer), and the cloud passes it on (cloud → edge `update`, naming the asking node).
    pub const PUNCH: &str = "punch";
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    #[serde(rename = "msg_id")]
    pub id: String,
    #[serde(
        rename = "parent_msg_id",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub parent_id: String,
    /// Milliseconds since the Unix epoch.
    #[serde(default)]
    pub timestamp: i64,
    #[serde(
        rename = "resourceversion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub resource_version: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync: bool,
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub message_type: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub destination: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operation: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
}

/// A beehive Message. `content` is kept as raw JSON so that objects travel (and are stored at
/// the edge) byte for byte as the cloud serialised them, and so that a receiver parses only the
/// payloads it cares about.
#[derive(Debug, Serialize, Deserialize)]
pub struct Message {
    pub header: Header,
    pub route: Route,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Box<RawValue>>,
}

/// Errors building or reading a Message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("message {operation} {resource} has no content")]
    MissingContent { operation: String, resource: String },
    #[error("message {operation} {resource} has an invalid resourceversion {value:?}")]
    BadVersion {
        operation: String,
        resource: String,
        value: String,
    },
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A random message id in UUID v4 form, as KubeEdge uses.
pub fn new_message_id() -> String {
    let b: [u8; 16] = rand::random();
    let v = u128::from_be_bytes(b);
    // Set the version (4) and variant (10xx) bits.
    let v = (v & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Message {
    /// A new message with a fresh id and the current time.
    pub fn new(
        source: &str,
        destination: &str,
        group: &str,
        operation: &str,
        resource: &str,
    ) -> Self {
        Message {
            header: Header {
                id: new_message_id(),
                timestamp: now_millis(),
                ..Header::default()
            },
            route: Route {
                source: source.to_string(),
                destination: destination.to_string(),
                group: group.to_string(),
                operation: operation.to_string(),
                resource: resource.to_string(),
            },
            content: None,
        }
    }

    /// Sets the content from a serialisable value.
    pub fn with_content<T: Serialize>(mut self, content: &T) -> Self {
        // Serialising the plain payload types of this crate cannot fail.
        let raw = serde_json::value::to_raw_value(content)
            .unwrap_or_else(|e| unreachable!("payload serialisation failed: {e}"));
        self.content = Some(raw);
        self
    }

    /// Sets the content from JSON text that is already known to be valid (a stored object).
    pub fn with_raw_content(mut self, json: String) -> Result<Self, MessageError> {
        self.content = Some(RawValue::from_string(json)?);
        Ok(self)
    }

    pub fn with_parent(mut self, parent_id: &str) -> Self {
        self.header.parent_id = parent_id.to_string();
        self
    }

    pub fn with_version(mut self, version: u64) -> Self {
        self.header.resource_version = version.to_string();
        self
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| unreachable!("message serialisation failed: {e}"))
    }

    pub fn from_json(text: &str) -> Result<Message, MessageError> {
        Ok(serde_json::from_str(text)?)
    }

    pub fn operation(&self) -> &str {
        &self.route.operation
    }

    pub fn resource(&self) -> &str {
        &self.route.resource
    }

    /// Parses the content as `T`.
    pub fn content_as<'a, T: Deserialize<'a>>(&'a self) -> Result<T, MessageError> {
        let raw = self
            .content
            .as_ref()
            .ok_or_else(|| MessageError::MissingContent {
                operation: self.route.operation.clone(),
                resource: self.route.resource.clone(),
            })?;
        Ok(serde_json::from_str(raw.get())?)
    }

    /// The header's resource version as a number.
    pub fn version(&self) -> Result<u64, MessageError> {
        self.header
            .resource_version
            .parse()
            .map_err(|_| MessageError::BadVersion {
                operation: self.route.operation.clone(),
                resource: self.route.resource.clone(),
                value: self.header.resource_version.clone(),
            })
    }
}

/// Extends the history chain by one change. The chain is a digest of every change up to a
/// version, computed the same way by the cloud (as it commits) and by each node (as it
/// applies), so that a node resuming at "version N" can prove it has the cloud's version N.
/// Without it, a cloud store restored from a backup would reuse version numbers for
/// different changes and resuming nodes would silently keep the lost ones. The empty string
/// is the chain before the first change.
pub fn chain_next(prev: &str, version: u64, operation: &str, resource: &str, body: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        prev.as_bytes(),
        version.to_string().as_bytes(),
        operation.as_bytes(),
        resource.as_bytes(),
        body.as_bytes(),
    ] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    ctx.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How the cloud answers a sync request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// The node is up to date; live changes follow.
    Current,
    /// The changes after the node's version follow as ordinary change messages.
    Delta,
    /// The history the node needs is gone (or the store was replaced): snapshot chunks follow.
    Snapshot,
}

impl SyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Current => "current",
            SyncMode::Delta => "delta",
            SyncMode::Snapshot => "snapshot",
        }
    }
}

/// Edge → cloud, first message on a connection (`query` `sync`).
/// Unknown fields are accepted, so a newer agent can talk to an older cloud.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncRequest {
    /// Identity of the cloud store the node's copy came from; `None` for an empty node.
    #[serde(default)]
    pub store_id: Option<String>,
    /// The last version the node committed.
    pub resource_version: u64,
    /// The history chain at that version (see [`chain_next`]).
    #[serde(default)]
    pub chain: String,
    /// The node's labels, published as its Node object's labels (topology).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub agent_version: String,
}

/// Cloud → edge answer to a [`SyncRequest`] (`response` `sync`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncResponse {
    pub mode: SyncMode,
    pub store_id: String,
    /// The node's version the answer starts from (0 for a snapshot).
    pub from_version: u64,
    /// The version the node has once it applied what follows.
    pub to_version: u64,
    /// Change messages (delta) or objects (snapshot) that follow.
    pub count: u64,
    /// The history chain at `to_version`: a snapshot's chain, or what a delta must end at.
    #[serde(default)]
    pub chain: String,
}

/// One object inside a snapshot chunk.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub resource: String,
    pub object: Box<RawValue>,
}

/// Cloud → edge, one chunk of a snapshot (`response` `snapshot`); the header's resourceversion
/// is the snapshot's version. The node applies the snapshot only when the `last` chunk arrived.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub entries: Vec<SnapshotEntry>,
    pub last: bool,
}

/// Edge → cloud acknowledgement (`response` `ack`): everything up to `resource_version` is
/// committed in the node's store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    pub resource_version: u64,
}

impl Ack {
    /// The ack Message a node sends for `version`.
    pub fn message(version: u64) -> Message {
        Message::new(
            module::EDGEHUB,
            module::CLOUDHUB,
            group::META,
            op::RESPONSE,
            resource::ACK,
        )
        .with_version(version)
        .with_content(&Ack {
            resource_version: version,
        })
    }
}

/// Edge → cloud (`query` `certificate`, group `direct`): a PKCS#10 request for the node's own
/// key. Whatever name it claims, the certificate is for the name the node authenticated as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequest {
    /// PEM.
    pub csr: String,
}

/// A certificate cloudcore issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateIssued {
    /// PEM: the node's certificate (the mesh CA signs it directly).
    pub certificate: String,
    /// PEM: the mesh CA's certificate, which every node trusts for direct paths.
    pub ca: String,
    /// SHA-256 of the certificate (DER), lower-case hex: what the Node's status now says.
    pub fingerprint: String,
    pub not_after_ms: i64,
    /// The store version that published the fingerprint in the Node's status: a node's view
    /// at or past it shows this certificate, unless it was revoked since.
    pub resource_version: u64,
}

/// Cloud → edge answer to a [`CertificateRequest`] (`response` `certificate`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CertificateAnswer {
    Issued(CertificateIssued),
    Refused { error: String },
}

/// Cloud → edge answer to `query` `direct-settings`: how the node learns its reflexive address,
/// and the cloud's policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectSettings {
    /// UDP port of the cloud's reflexive-address service, on the host of the cloud URL the
    /// node is connected to.
    pub reflector_port: u16,
    /// This node's key for authenticating probes (hex); valid while it is connected to this
    /// cloudcore process.
    pub probe_key: String,
    /// The cloud's clock when it answered (ms since the Unix epoch): probes carry a time in the
    /// cloud's clock, so a node whose clock is off still gets answers.
    pub cloud_time_ms: i64,
    /// `communities.enforce`: only members of a common Community may call each other at all.
    pub enforce_communities: bool,
}

/// Where a candidate address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateKind {
    /// An address of one of the node's interfaces (reachable on its LAN).
    Host,
    /// The address the cloud saw the node's probes come from (its NAT's public side).
    Reflexive,
    /// Set by the operator (`direct.advertise`): a port forward, a known public address.
    Advertised,
}

/// One address a peer may try to reach a node's direct-path port at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub address: std::net::SocketAddr,
    pub kind: CandidateKind,
}

/// A node's candidates (`update`/`delete` `candidates`, group `direct`). `node` is empty when a
/// node publishes its own, and names the peer when the cloud passes them on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidates {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default)]
    pub candidates: Vec<Candidate>,
}

/// `punch` (group `direct`): the peer to dial (edge → cloud), or the node asking to be
/// dialled (cloud → edge).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Punch {
    pub node: String,
}

/// The most candidates a node may publish.
pub const MAX_CANDIDATES: usize = 32;

impl SyncRequest {
    /// The sync request Message a node sends first on every connection.
    pub fn message(&self) -> Message {
        Message::new(
            module::EDGEHUB,
            module::CLOUDHUB,
            group::META,
            op::QUERY,
            resource::SYNC,
        )
        .with_content(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeedge_field_names() {
        let msg = Message::new(
            module::CLOUDHUB,
            module::EDGEHUB,
            group::META,
            op::INSERT,
            "default/service/a",
        )
        .with_version(42)
        .with_parent("p")
        .with_raw_content(r#"{"kind":"Service"}"#.to_string())
        .expect("valid json");
        let v: serde_json::Value = serde_json::from_str(&msg.to_json()).expect("json");
        let header = &v["header"];
        assert!(header["msg_id"].as_str().is_some_and(|s| s.len() == 36));
        assert_eq!(header["parent_msg_id"], "p");
        assert_eq!(header["resourceversion"], "42");
        assert!(header["timestamp"].as_i64().is_some());
        assert_eq!(v["route"]["operation"], "insert");
        assert_eq!(v["route"]["resource"], "default/service/a");
        assert_eq!(v["route"]["group"], "meta");
        assert_eq!(v["content"]["kind"], "Service");
    }

    #[test]
    fn content_is_kept_verbatim() {
        let body = r#"{"b":1,"a":[1,2]}"#;
        let msg = Message::new("a", "b", "c", op::UPDATE, "r")
            .with_raw_content(body.to_string())
            .expect("json");
        let back = Message::from_json(&msg.to_json()).expect("parse");
        assert_eq!(back.content.expect("content").get(), body);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for text in [
            "",
            "{",
            "[]",
            r#"{"header":1}"#,
            r#"{"header":{},"route":{}}"#,
        ] {
            let _ = Message::from_json(text);
        }
        let msg =
            Message::from_json(r#"{"header":{"msg_id":"x","resourceversion":"abc"},"route":{}}"#)
                .expect("parses");
        assert!(msg.version().is_err());
        assert!(msg.content_as::<Ack>().is_err());
    }

    #[test]
    fn the_chain_depends_on_every_part_and_on_order() {
        let a = chain_next("", 1, op::INSERT, "default/service/a", "{}");
        assert_eq!(a.len(), 32);
        assert_eq!(a, chain_next("", 1, op::INSERT, "default/service/a", "{}"));
        assert_ne!(a, chain_next("", 1, op::UPDATE, "default/service/a", "{}"));
        assert_ne!(a, chain_next("", 2, op::INSERT, "default/service/a", "{}"));
        assert_ne!(a, chain_next("x", 1, op::INSERT, "default/service/a", "{}"));
        // Length-prefixed parts: moving bytes between fields changes the digest.
        assert_ne!(
            chain_next("", 1, "ab", "c", ""),
            chain_next("", 1, "a", "bc", "")
        );
    }

    #[test]
    fn direct_payloads_keep_their_field_names() {
        let c = Candidates {
            node: "edge-1".into(),
            candidates: vec![Candidate {
                address: "10.1.0.2:10004".parse().expect("addr"),
                kind: CandidateKind::Reflexive,
            }],
        };
        let v = serde_json::to_value(&c).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"node": "edge-1", "candidates": [{"address": "10.1.0.2:10004", "kind": "reflexive"}]})
        );
        let refused: CertificateAnswer =
            serde_json::from_str(r#"{"error":"no"}"#).expect("refused");
        assert_eq!(refused, CertificateAnswer::Refused { error: "no".into() });
        let issued: CertificateAnswer = serde_json::from_str(
            r#"{"certificate":"c","ca":"a","fingerprint":"f","notAfterMs":5,"resourceVersion":9}"#,
        )
        .expect("issued");
        assert!(matches!(issued, CertificateAnswer::Issued(i) if i.resource_version == 9));
    }

    #[test]
    fn message_ids_are_uuid_v4() {
        let id = new_message_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(id, new_message_id());
    }
}
