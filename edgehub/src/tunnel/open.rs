//! The Messages that open a stream and answer the open.
//!
//! A stream is opened by a `query` Message with resource `stream/open` whose content is an
//! [`OpenRequest`], and answered by a `response` Message (parent = the open's id) whose content
//! is an [`OpenResponse`]. Data, window updates, close and reset then travel as binary frames
//! ([`super::frame`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::io::Protocol;
use crate::message::{group, module, op, Message};

/// Resource of the stream open request and of its answer.
pub const OPEN: &str = "stream/open";

/// What a stream is for. The receiving side checks every field against its own metadata
/// before it dials anything: the opener's word is never enough.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenRequest {
    /// The opener's stream id on this link (set by the multiplexer).
    #[serde(default)]
    pub stream: u32,
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// The endpoint to dial: a pod address and its (target) port.
    pub endpoint: SocketAddr,
    /// The node that hosts the endpoint; `None` for an endpoint that cloudcore dials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Which application protocol the opener will speak on the stream (what it detected, or
    /// the Service's `edgemesh.io/protocol`): the side that dials the endpoint limits HTTP/1
    /// per request.
    #[serde(default)]
    pub protocol: Protocol,
    /// The node the stream comes from. The cloud fills it in from the authenticated session
    /// (a node cannot claim another's name); empty when cloudcore itself opens the stream.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// How many bytes the opener accepts before it grants more (set by the multiplexer).
    #[serde(default)]
    pub window: u32,
}

/// The answer to an open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenResponse {
    /// The opener's stream id.
    pub stream: u32,
    /// How many bytes the answering side accepts before it grants more.
    #[serde(default)]
    pub window: u32,
    /// Empty when the stream is open; otherwise why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<OpenRefusal>,
}

/// Why the receiving side refused a stream. The kind lets the opener decide whether another
/// endpoint is worth trying.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenRefusal {
    pub kind: RefusalKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefusalKind {
    /// The Service or endpoint does not exist, or the receiver does not host it.
    Forbidden,
    /// The node that hosts the endpoint has no link to the cloud.
    NodeOffline,
    /// The endpoint did not accept the connection.
    Unreachable,
    /// The Service's QPS limit is reached (TCP connections are refused over the limit).
    RateLimited,
    /// The receiver has too many open streams.
    Busy,
    /// The request was malformed.
    Invalid,
}

impl RefusalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::Forbidden => "forbidden",
            RefusalKind::NodeOffline => "node-offline",
            RefusalKind::Unreachable => "unreachable",
            RefusalKind::RateLimited => "rate-limited",
            RefusalKind::Busy => "busy",
            RefusalKind::Invalid => "invalid",
        }
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why opening a stream failed, as the opener sees it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("refused ({kind}): {message}")]
    Refused { kind: RefusalKind, message: String },
    #[error("no answer to the stream open within {0:?}")]
    Timeout(std::time::Duration),
    #[error("no link to the cloud")]
    LinkDown,
    #[error("too many open streams on this link ({0})")]
    TooManyStreams(usize),
}

impl OpenError {
    /// Whether the endpoint itself is at fault (eject it), as opposed to the limit or the link.
    pub fn endpoint_failed(&self) -> bool {
        matches!(
            self,
            OpenError::Refused {
                kind: RefusalKind::Unreachable | RefusalKind::NodeOffline,
                ..
            } | OpenError::Timeout(_)
        )
    }
}

impl OpenRequest {
    pub fn message(&self, source_module: &str) -> Message {
        Message::new(
            source_module,
            if source_module == module::CLOUDHUB {
                module::EDGEHUB
            } else {
                module::CLOUDHUB
            },
            group::STREAM,
            op::QUERY,
            OPEN,
        )
        .with_content(self)
    }
}

impl OpenResponse {
    pub fn message(&self, source_module: &str, parent: &str) -> Message {
        Message::new(
            source_module,
            if source_module == module::CLOUDHUB {
                module::EDGEHUB
            } else {
                module::CLOUDHUB
            },
            group::STREAM,
            op::RESPONSE,
            OPEN,
        )
        .with_parent(parent)
        .with_content(self)
    }
}
