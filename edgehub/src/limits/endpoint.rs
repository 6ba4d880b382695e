//! Serving a connection at the side that dialled the endpoint, under the Service's limit:
//! unlimited Services are joined as bytes; limited ones are told apart (HTTP/1 or not) from
//! the first bytes, then limited per request (HTTP/1) or per connection (anything else).

use std::time::Duration;

use tokio::net::TcpStream;

use super::{serve_http1, Decision, Limiters, Protocol as Admission};
use crate::io::{self, Counters, Duplex, Moved, Protocol, Rewind, Timeouts};

/// How [`serve_endpoint`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// Bytes both ways (no limit, or a connection within it); `b_to_a` is what the endpoint
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
    /// How long a joined connection may go without a byte, and once one side finished.
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
    hint: Protocol,
    timeouts: EndpointTimeouts,
) -> std::io::Result<Served>
where
    C: Duplex + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if limiters.limit(namespace, name).is_none() {
        return io::join(
            &mut client,
            &mut upstream,
            timeouts.bridge,
            Counters::default(),
        )
        .await
        .map(Served::Bridged);
    }
    let (prefix, protocol) = match hint {
        Protocol::Http1 => (bytes::Bytes::new(), Protocol::Http1),
        // HTTP/2 is limited per connection until requests are seen one by one.
        Protocol::H2 => (bytes::Bytes::new(), Protocol::H2),
        Protocol::Tls | Protocol::Opaque => {
            let d = io::detect(&mut client, timeouts.detect).await?;
            (d.prefix, d.protocol)
        }
    };
    let mut client = Rewind::new(prefix, client);
    if protocol == Protocol::Http1 {
        let gate_limiters = limiters.clone();
        let (ns, nm) = (namespace.to_string(), name.to_string());
        let gate = move || gate_limiters.admit(&ns, &nm, Admission::Http);
        return serve_http1(
            client,
            upstream,
            gate,
            &format!("{namespace}/{name}"),
            timeouts.bridge,
        )
        .await
        .map(|()| Served::Http)
        .map_err(|e| std::io::Error::other(e.to_string()));
    }
    if let Decision::Limited { .. } = limiters.admit(namespace, name, Admission::Tcp) {
        return Ok(Served::Refused);
    }
    io::join(
        &mut client,
        &mut upstream,
        timeouts.bridge,
        Counters::default(),
    )
    .await
    .map(Served::Bridged)
}
