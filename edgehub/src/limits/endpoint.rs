//! Serving a connection at the side that dialled the endpoint, under the Service's limit:
//! unlimited Services are bridged as bytes; limited ones are told apart (HTTP/1 or not) from
//! the first bytes, then limited per request (HTTP/1) or per connection (anything else).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{peek_http1, serve_http1, Decision, Detection, Limiters, Protocol, Rewind};
use crate::tunnel::bridge::{bridge, AbortSignal, Moved, Timeouts};
use crate::tunnel::StreamProtocol;

/// Longest prefix read to recognise an HTTP/1 request line.
const DETECT_BYTES: usize = 1024;

/// How [`serve_endpoint`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// Bytes both ways (no limit, or a connection within it); `from_tcp` is what the endpoint
    /// sent.
    Bridged(Moved),
    /// HTTP/1 requests, each checked against the limit.
    Http,
    /// A connection that is not HTTP arrived over the limit and was closed.
    Refused,
}

#[derive(Clone, Copy, Debug)]
pub struct EndpointTimeouts {
    /// How long the first bytes may take to show whether a connection is HTTP/1.
    pub detect: Duration,
    /// How long a bridged connection may go without a byte, and once one side finished.
    pub bridge: Timeouts,
}

/// Serves `client` over `upstream` (the endpoint's socket, already dialled) for Service
/// `namespace/name`.
/// `hint` is what the caller knows of the protocol (a Service's `edgemesh.io/protocol`, or
/// what the opener of a stream said).
pub async fn serve_endpoint<C>(
    mut client: C,
    mut upstream: TcpStream,
    limiters: &Limiters,
    namespace: &str,
    name: &str,
    hint: StreamProtocol,
    timeouts: EndpointTimeouts,
) -> io::Result<Served>
where
    C: AsyncRead + AsyncWrite + AbortSignal + Unpin + Send + 'static,
{
    if limiters.limit(namespace, name).is_none() {
        return bridge(&mut upstream, &mut client, timeouts.bridge)
            .await
            .map(Served::Bridged);
    }
    let (prefix, detection) = match hint {
        StreamProtocol::Http => (bytes::Bytes::new(), Detection::Http1),
        // HTTP/2 is limited per connection until requests are seen one by one.
        StreamProtocol::H2 => (bytes::Bytes::new(), Detection::NotHttp),
        StreamProtocol::Tcp => peek_http1(&mut client, timeouts.detect, DETECT_BYTES).await?,
    };
    let mut client = Rewind::new(prefix, client);
    if detection == Detection::Http1 {
        let gate_limiters = limiters.clone();
        let (ns, nm) = (namespace.to_string(), name.to_string());
        let gate = move || gate_limiters.admit(&ns, &nm, Protocol::Http);
        return serve_http1(client, upstream, gate, &format!("{namespace}/{name}"))
            .await
            .map(|()| Served::Http)
            .map_err(|e| io::Error::other(e.to_string()));
    }
    if let Decision::Limited { .. } = limiters.admit(namespace, name, Protocol::Tcp) {
        return Ok(Served::Refused);
    }
    bridge(&mut upstream, &mut client, timeouts.bridge)
        .await
        .map(Served::Bridged)
}
