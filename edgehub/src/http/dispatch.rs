//! The endpoint for one request: picked by the Service's balancer (per request, so one client
//! connection's requests spread over the endpoints), checked against the Service's QPS limit
//! when the endpoint is this node's (the far side checks its own), and retried on another
//! endpoint while nothing of the request has reached one. [`Attempts`] is that policy; both
//! HTTP/1 (bytes, [`super::h1`]) and hyper's requests (HTTP/2, the router's ingress) follow it.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::limits::{Decision, Protocol as LimitProtocol};
use hyper::body::Incoming;
use hyper::{Request, Response};

use super::answer::HttpError;
use super::upstream::SendError;
use super::BoxError;
use super::Http;
use crate::balance::{Endpoint, InFlight, PickContext};
use crate::routes::Route;

/// A response head from an endpoint, and that endpoint's in-flight count (held until the body
/// has been sent).
pub struct Answered {
    pub response: Response<Incoming>,
    pub in_flight: InFlight,
}

/// The endpoints one request may be tried on: at most the connector's attempts
/// (`proxy.connect_attempts`), each once, and only while nothing of the request has reached
/// one. The Service's limit is checked once, before the first endpoint of this node.
pub(super) struct Attempts<'r> {
    route: &'r Route,
    tried: Vec<SocketAddr>,
    admitted: bool,
    last_error: Option<(SocketAddr, BoxError)>,
}

impl<'r> Attempts<'r> {
    pub(super) fn new(route: &'r Route) -> Result<Attempts<'r>, HttpError> {
        if route.endpoints.is_empty() {
            return Err(HttpError::NoEndpoints {
                service: route.stats.label().to_string(),
            });
        }
        Ok(Attempts {
            route,
            tried: Vec::new(),
            admitted: false,
            last_error: None,
        })
    }

    /// The next endpoint to try, or the error that ends the request: no (other) endpoint, or
    /// the Service over its limit.
    pub(super) fn next(
        &mut self,
        http: &Http,
        pick: &PickContext<'_>,
    ) -> Result<&'r Endpoint, HttpError> {
        let route = self.route;
        let picked = (self.tried.len() < http.connector.attempts() as usize)
            .then(|| route.balancer.pick(&route.endpoints, pick, &self.tried))
            .flatten();
        let Some(endpoint) = picked else {
            return Err(self.exhausted());
        };
        self.tried.push(endpoint.addr);
        // The limit is enforced where the endpoint is dialled: here for this node's endpoints
        // (once per request, however many are tried), by the far side of the tunnel for the
        // others.
        if !self.admitted && http.connector.is_local(endpoint) {
            self.admitted = true;
            let service = &route.service;
            if let Decision::Limited { retry_after } =
                http.limiters
                    .admit(&service.namespace, &service.name, LimitProtocol::Http)
            {
                return Err(HttpError::RateLimited {
                    service: route.stats.label().to_string(),
                    retry_after,
                });
            }
        }
        Ok(endpoint)
    }

    /// Nothing of the request reached `endpoint`: the next one may be tried.
    pub(super) fn not_sent(&mut self, endpoint: SocketAddr, error: BoxError) {
        tracing::debug!(%endpoint, %error, "request not sent; next endpoint");
        self.last_error = Some((endpoint, error));
    }

    fn exhausted(&mut self) -> HttpError {
        let service = self.route.stats.label().to_string();
        match self.last_error.take() {
            Some((endpoint, source)) => HttpError::Unreachable {
                service,
                tried: self.tried.len(),
                endpoint,
                source,
            },
            None => HttpError::NoEndpoints { service },
        }
    }
}

impl Http {
    /// Forwards an HTTP/2 request to an endpoint of `route`, following [`Attempts`].
    /// `client`: the client connection's id.
    pub(super) async fn dispatch(
        self: &Arc<Self>,
        route: &Route,
        mut req: Request<Incoming>,
        pick: &PickContext<'_>,
        client: u64,
    ) -> Result<Answered, HttpError> {
        let mut attempts = Attempts::new(route)?;
        loop {
            let endpoint = attempts.next(self, pick)?;
            let in_flight = InFlight::start(&endpoint.health);
            match self.send_h2(route, endpoint, req, client).await {
                Ok(response) => {
                    return Ok(Answered {
                        response,
                        in_flight,
                    })
                }
                Err(SendError::NotSent { request, error }) => {
                    req = *request;
                    attempts.not_sent(endpoint.addr, error);
                }
                Err(SendError::RateLimited) => {
                    return Err(HttpError::RateLimited {
                        service: route.stats.label().to_string(),
                        retry_after: std::time::Duration::from_secs(1),
                    })
                }
                Err(SendError::Failed(source)) if source.is_user() => {
                    // hyper reports the client's own body failing (bad chunking, a client gone
                    // mid-upload) as a user error: not the endpoint's fault.
                    return Err(HttpError::BadRequest(Box::new(source)));
                }
                Err(SendError::Failed(source)) => {
                    return Err(HttpError::Failed {
                        service: route.stats.label().to_string(),
                        endpoint: endpoint.addr,
                        source: Box::new(source),
                    })
                }
            }
        }
    }
}
