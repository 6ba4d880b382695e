//! Dialling an endpoint of a route: pick, connect with a timeout, and on failure record it
//! (outlier detection) and fall over to another endpoint.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

use super::socket;
use super::table::Route;
use super::ProxyConfig;
use crate::balance::{InFlight, PickContext};

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: String },
    #[error("service {service}: {tried} endpoint(s) failed, last {endpoint}: {source}")]
    AllFailed {
        service: String,
        tried: usize,
        endpoint: SocketAddr,
        source: io::Error,
    },
}

pub struct Connector {
    mark: u32,
    timeout: Duration,
    attempts: u32,
    /// Marking needs CAP_NET_ADMIN; without it, say so once rather than on every connection.
    mark_warned: AtomicBool,
}

impl Connector {
    pub fn new(cfg: &ProxyConfig) -> Connector {
        Connector {
            mark: cfg.mark,
            timeout: cfg.connect_timeout,
            attempts: cfg.connect_attempts,
            mark_warned: AtomicBool::new(false),
        }
    }

    /// Connects to an endpoint of `route` for a client at `client_ip`. Returns the stream, the
    /// endpoint and its in-flight guard (held for as long as the connection is open).
    pub async fn connect(
        &self,
        route: &Route,
        client_ip: IpAddr,
    ) -> Result<(TcpStream, SocketAddr, InFlight), ConnectError> {
        let ctx = PickContext {
            client_ip,
            hash_key: None,
        };
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_error = None;
        while tried.len() < self.attempts as usize {
            let Some(endpoint) = route.balancer.pick(&route.endpoints, &ctx, &tried) else {
                break;
            };
            tried.push(endpoint.addr);
            let in_flight = InFlight::start(&endpoint.health);
            match self.dial(endpoint.addr).await {
                Ok(stream) => {
                    endpoint.health.record_success();
                    return Ok((stream, endpoint.addr, in_flight));
                }
                Err(e) => {
                    route.stats.get().endpoint_failures.increment(1);
                    debug!(endpoint = %endpoint.addr, error = %e, "connect failed; trying another endpoint");
                    endpoint.health.record_failure();
                    last_error = Some((endpoint.addr, e));
                }
            }
        }
        match last_error {
            None => Err(ConnectError::NoEndpoints {
                service: route.service.to_string(),
            }),
            Some((endpoint, source)) => Err(ConnectError::AllFailed {
                service: route.service.to_string(),
                tried: tried.len(),
                endpoint,
                source,
            }),
        }
    }

    async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Err(e) = socket::set_mark(&socket, self.mark) {
            if !self.mark_warned.swap(true, Ordering::Relaxed) {
                warn!(error = %e, "cannot mark upstream sockets (CAP_NET_ADMIN missing?); \
                    connections to cluster IPs from this host could loop");
            }
        }
        let stream = tokio::time::timeout(self.timeout, socket.connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.timeout),
                )
            })??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}
