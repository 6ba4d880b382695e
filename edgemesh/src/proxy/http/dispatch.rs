//! The endpoint for one request: picked by the Service's balancer (per request, so one client
//! connection's requests spread over the endpoints), checked against the Service's QPS limit
//! when the endpoint is this node's (the far side checks its own), and retried on another
//! endpoint while nothing of the request has reached one.

use std::net::SocketAddr;
use std::sync::Arc;

use edgehub::limits::{Decision, Protocol as LimitProtocol};
use hyper::body::Incoming;
use hyper::{Request, Response};

use super::answer::HttpError;
use super::upstream::{Recycle, SendError};
use super::Http;
use crate::balance::{InFlight, PickContext};
use edgehub::io::Protocol;
use crate::proxy::table::Route;

/// A response head from an endpoint, that endpoint's in-flight count and the connection to
/// reuse (both held until the body has been sent).
pub struct Answered {
    pub response: Response<Incoming>,
    pub in_flight: InFlight,
    pub recycle: Option<Recycle>,
}

impl Http {
    /// Forwards `req` to an endpoint of `route`: at most `proxy.connect_attempts` endpoints are
    /// tried, each once, as long as the request has not started on its way to one.
    pub(super) async fn dispatch(
        self: &Arc<Self>,
        route: &Route,
        mut req: Request<Incoming>,
        pick: &PickContext<'_>,
        protocol: Protocol,
        upgrade: bool,
        client: u64,
    ) -> Result<Answered, HttpError> {
        let service = || route.stats.label().to_string();
        if route.endpoints.is_empty() {
            return Err(HttpError::NoEndpoints { service: service() });
        }
        let ns = &route.service.namespace;
        let name = &route.service.name;
        let mut admitted = false;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_error = None;
        while tried.len() < self.attempts as usize {
            let Some(endpoint) = route.balancer.pick(&route.endpoints, pick, &tried) else {
                break;
            };
            tried.push(endpoint.addr);
            // The limit is enforced where the endpoint is dialled: here for this node's
            // endpoints (once per request, however many are tried), by the far side of the
            // tunnel for the others.
            if !admitted && self.connector.is_local(endpoint) {
                admitted = true;
                if let Decision::Limited { retry_after } =
                    self.limiters.admit(ns, name, LimitProtocol::Http)
                {
                    return Err(HttpError::RateLimited {
                        service: service(),
                        retry_after,
                    });
                }
            }
            let in_flight = InFlight::start(&endpoint.health);
            match self
                .send(route, endpoint, req, protocol, upgrade, client)
                .await
            {
                Ok((response, recycle)) => {
                    return Ok(Answered {
                        response,
                        in_flight,
                        recycle,
                    })
                }
                Err(SendError::NotSent { request, error }) => {
                    tracing::debug!(endpoint = %endpoint.addr, %error, "request not sent; next endpoint");
                    req = *request;
                    last_error = Some((endpoint.addr, error));
                }
                Err(SendError::RateLimited) => {
                    return Err(HttpError::RateLimited {
                        service: service(),
                        retry_after: std::time::Duration::from_secs(1),
                    })
                }
                Err(SendError::Failed(source)) if source.is_user() => {
                    // hyper reports the client's own body failing (bad chunking, a client gone
                    // mid-upload) as a user error: not the endpoint's fault.
                    return Err(HttpError::BadRequest(source));
                }
                Err(SendError::Failed(source)) => {
                    return Err(HttpError::Failed {
                        service: service(),
                        endpoint: endpoint.addr,
                        source,
                    })
                }
            }
        }
        match last_error {
            Some((endpoint, source)) => Err(HttpError::Unreachable {
                service: service(),
                tried: tried.len(),
                endpoint,
                source,
            }),
            None => Err(HttpError::NoEndpoints { service: service() }),
        }
    }
}
