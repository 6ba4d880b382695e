//! Header rewriting between the client and the endpoint (RFC 9110 §7.6.1): hop-by-hop fields
//! describe one connection and end at the proxy, except those that carry a protocol upgrade
//! through; `X-Forwarded-For` gains the client's address.

use std::net::IpAddr;

use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, TE, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The fields that describe one connection (besides those `Connection` names): they end at
/// the proxy. `TE` is written again with `trailers` alone when the client listed it; the
/// others are the proxy's own to write for the next hop. HTTP/1 as bytes (`h1::head`) and
/// hyper's requests here strip the same list.
pub(crate) const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// What a request asks to switch to after its response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// `Connection: upgrade` with `Upgrade: <protocols>` (WebSocket): after a `101`.
    Protocol(HeaderValue),
    /// `CONNECT`: after a `2xx`.
    Connect,
}

impl Upgrade {
    /// Whether `status` accepts the upgrade: from then on the connection carries bytes.
    pub fn accepted_by(&self, status: StatusCode) -> bool {
        match self {
            Upgrade::Protocol(_) => status == StatusCode::SWITCHING_PROTOCOLS,
            Upgrade::Connect => status.is_success(),
        }
    }
}

/// The client's address as a header value, made once per connection.
pub fn client_value(client: IpAddr) -> HeaderValue {
    HeaderValue::try_from(client.to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Rewrites a client's request for the endpoint: hop-by-hop fields out (an upgrade's own
/// fields put back), the client's address (from [`client_value`]) appended to
/// `X-Forwarded-For`. Returns the upgrade an HTTP/1 request asks for, if any (HTTP/2 has no
/// `Upgrade`, and its `CONNECT` is an ordinary stream).
pub fn prepare_request<B>(
    req: &mut Request<B>,
    client: Option<&HeaderValue>,
    http1: bool,
) -> Option<Upgrade> {
    let upgrade = if !http1 {
        None
    } else if req.method() == Method::CONNECT {
        Some(Upgrade::Connect)
    } else {
        requested_upgrade(req.headers()).map(Upgrade::Protocol)
    };
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    if let Some(Upgrade::Protocol(protocols)) = &upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocols.clone());
    }
    if let Some(client) = client {
        append_forwarded_for(headers, client);
    }
    upgrade
}

/// Rewrites an endpoint's response for the client: hop-by-hop fields out, except the
/// `Upgrade` of a `101` that accepts the client's upgrade.
pub fn prepare_response<B>(response: &mut Response<B>, upgrade: Option<&Upgrade>) {
    let switching = matches!(upgrade, Some(Upgrade::Protocol(_)))
        && response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let protocols = switching
        .then(|| response.headers().get(UPGRADE).cloned())
        .flatten();
    let headers = response.headers_mut();
    strip_hop_by_hop(headers);
    if let Some(protocols) = protocols {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocols);
    }
}

/// The `Upgrade` value of a request whose `Connection` lists `upgrade`.
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let listed = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    listed.then(|| headers.get(UPGRADE).cloned()).flatten()
}

/// Removes the fields that describe one connection: `Connection` and every field it names,
/// `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding` (hyper frames each side's bodies
/// itself), `Upgrade`, and `TE` except `trailers`: the proxy passes trailers through, so a
/// client's `TE: trailers` (which gRPC requires) still holds for the next hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            // A client must not be able to make the proxy drop the request's target.
            if name != HOST {
                headers.remove(name);
            }
        }
    }
    let trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Appends `client` to `X-Forwarded-For`, folding the values of several fields into one.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    if !headers.contains_key(X_FORWARDED_FOR) {
        // The common case costs no allocation: the value is shared.
        headers.insert(X_FORWARDED_FOR, client.clone());
        return;
    }
    let mut value: Vec<u8> = Vec::new();
    for v in headers.get_all(X_FORWARDED_FOR) {
        let v = v.as_bytes().trim_ascii();
        if !v.is_empty() {
            value.extend_from_slice(v);
            value.extend_from_slice(b", ");
        }
    }
    value.extend_from_slice(client.as_bytes());
    // The earlier values were valid field values, and so is the joined list; should that ever
    // fail, the client's address alone is still right.
    let value = HeaderValue::from_bytes(&value).unwrap_or_else(|_| client.clone());
    headers.insert(X_FORWARDED_FOR, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> HeaderValue {
        client_value(s.parse().expect("ip"))
    }

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    fn names(headers: &HeaderMap) -> Vec<String> {
        let mut n: Vec<String> = headers.keys().map(|k| k.to_string()).collect();
        n.sort();
        n
    }

    #[test]
    fn hop_by_hop_fields_stop_here() {
        let mut req = request(&[
            ("host", "web"),
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "close"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("upgrade", "h2c"),
            ("x-user", "alice"),
        ]);
        let upgrade = prepare_request(&mut req, Some(&ip("10.244.1.5")), true);
        assert_eq!(upgrade, None, "Connection does not list upgrade");
        assert_eq!(
            names(req.headers()),
            ["host", "te", "x-forwarded-for", "x-user"]
        );
        assert_eq!(req.headers()["te"], "trailers");
        assert_eq!(req.headers()["host"], "web");

        let mut req = request(&[("te", "gzip"), ("connection", "host")]);
        strip_hop_by_hop(req.headers_mut());
        assert!(req.headers().get("te").is_none());
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut req = request(&[]);
        prepare_request(&mut req, Some(&ip("10.244.1.5")), true);
        assert_eq!(req.headers()["x-forwarded-for"], "10.244.1.5");

        let mut req = request(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.2, 10.0.0.1"),
        ]);
        prepare_request(&mut req, Some(&ip("fd00::5")), false);
        let all: Vec<_> = req.headers().get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["203.0.113.7, 198.51.100.2, 10.0.0.1, fd00::5"]);
    }

    #[test]
    fn upgrades_keep_their_fields() {
        let websocket = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        let upgrade = prepare_request(&mut request(&websocket), Some(&ip("10.0.0.1")), false);
        assert_eq!(upgrade, None, "no upgrades over HTTP/2");
        let mut req = request(&websocket);
        let upgrade = prepare_request(&mut req, Some(&ip("10.0.0.1")), true);
        assert_eq!(
            upgrade,
            Some(Upgrade::Protocol(HeaderValue::from_static("websocket")))
        );
        assert_eq!(req.headers()["connection"], "upgrade");
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert!(req.headers().contains_key("sec-websocket-key"));

        let mut response = Response::builder()
            .status(101)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .body(())
            .expect("response");
        prepare_response(&mut response, upgrade.as_ref());
        assert_eq!(response.headers()["upgrade"], "websocket");
        assert_eq!(response.headers()["connection"], "upgrade");

        // A 200 to an upgrade request, or an Upgrade nobody asked for, is not passed on.
        let mut response = Response::builder()
            .header("upgrade", "websocket")
            .header("connection", "upgrade, keep-alive")
            .header("keep-alive", "timeout=5")
            .body(())
            .expect("response");
        prepare_response(&mut response, upgrade.as_ref());
        assert!(response.headers().is_empty(), "{:?}", response.headers());

        let mut connect = Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:443")
            .body(())
            .expect("request");
        let upgrade = prepare_request(&mut connect, Some(&ip("10.0.0.1")), true);
        assert_eq!(upgrade, Some(Upgrade::Connect));
        assert!(Upgrade::Connect.accepted_by(StatusCode::OK));
        assert!(!Upgrade::Connect.accepted_by(StatusCode::FORBIDDEN));
    }
}
