//! Router tests: REST CRUD and validation, the ingress over a fake opener (streams over
//! `tokio::io::duplex` to a tiny HTTP server), the edge streams to a loopback HTTP server,
//! persistence of counters, and start-up reconciliation.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};
use edgehub::io::Protocol;
use edgehub::model::{Kind, Object, ObjectKey};
use edgehub::tunnel::{OpenError, OpenRequest, RefusalKind};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::api::ApiState;
use crate::auth::NodeTokens;
use crate::config::RouterConfig;
use crate::nodes::NodeRegistry;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;

const TOKEN: &str = "test-token-0123456789";

/// What the fake dialer does for an endpoint IP.
#[derive(Clone)]
enum Behaviour {
    /// A stream to a tiny HTTP server.
    Serve,
    Fail(OpenError),
    /// Never answers.
    Hang,
}

#[derive(Default)]
struct FakeDialer {
    behaviour: Mutex<HashMap<IpAddr, Behaviour>>,
    opened: Mutex<Vec<OpenRequest>>,
}

impl FakeDialer {
    fn set(&self, ip: &str, b: Behaviour) {
        self.behaviour
            .lock()
            .expect("lock")
            .insert(ip.parse().expect("ip"), b);
    }

    fn opened(&self) -> Vec<OpenRequest> {
        std::mem::take(&mut *self.opened.lock().expect("lock"))
    }
}

impl edgehub::connect::Opener for FakeDialer {
    fn open(
        &self,
        req: OpenRequest,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<edgehub::connect::Upstream, OpenError>>
                + Send
                + '_,
        >,
    > {
        Box::pin(self.open_fake(req))
    }
}

impl FakeDialer {
    async fn open_fake(&self, req: OpenRequest) -> Result<edgehub::connect::Upstream, OpenError> {
        let b = self
            .behaviour
            .lock()
            .expect("lock")
            .get(&req.endpoint.ip())
            .cloned()
            .unwrap_or(Behaviour::Serve);
        self.opened.lock().expect("lock").push(req);
        match b {
            Behaviour::Serve => {
                let (near, far) = tokio::io::duplex(64 << 10);
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(far), hyper::service::service_fn(echo))
                        .await;
                });
                Ok(edgehub::connect::Upstream::Other(edgehub::io::Whole(
                    Box::pin(near),
                )))
            }
            Behaviour::Fail(e) => Err(e),
            Behaviour::Hang => std::future::pending().await,
        }
    }
}

/// Answers with what it received; a path ending in `/fail` gets a 500.
async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (host, xff) = (header("host"), header("x-forwarded-for"));
    let chunked = req.headers().contains_key("transfer-encoding");
    let method = req.method().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v = json!({
        "method": method, "path": path, "host": host, "xff": xff, "chunked": chunked,
        "body": String::from_utf8_lossy(&body),
    });
    let mut resp = Response::new(Full::new(Bytes::from(v.to_string())));
    if path.ends_with("/fail") {
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    }
    Ok(resp)
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    objects: Arc<Objects>,
    dialer: Arc<FakeDialer>,
    router: Arc<Router>,
}

fn config() -> RouterConfig {
    RouterConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        request_timeout: Duration::from_secs(2),
        advertise_ip: None,
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("c.db"), 100, 1 << 20).expect("open"));
    let objects = Arc::new(
        Objects::new(store.clone(), "10.96.0.0/16".parse().expect("cidr")).expect("objects"),
    );
    let dialer = Arc::new(FakeDialer::default());
    let data = DataPath::for_tests(store.clone(), dialer.clone());
    let router = Arc::new(Router::new(config(), objects.clone(), data).expect("router"));
    Fixture {
        _dir: dir,
        store,
        objects,
        dialer,
        router,
    }
}

impl Fixture {
    /// A Router over the same store, as after a restart.
    fn restart(&self) -> Arc<Router> {
        let data = DataPath::for_tests(self.store.clone(), self.dialer.clone());
        Arc::new(Router::new(config(), self.objects.clone(), data).expect("router"))
    }

    fn apply(&self, v: Value) {
        let obj = Object::from_value(v).expect("object");
        self.objects.apply(vec![obj], false).expect("apply");
    }

    /// Service `default/<name>` port 80 → 8080 on the given `(ip, node)` endpoints.
    fn service(&self, name: &str, endpoints: &[(&str, Option<&str>)]) {
        self.apply(
            json!({"kind": "Service", "metadata": {"name": name, "namespace": "default"},
                          "spec": {"ports": [{"name": "web", "port": 80, "targetPort": 8080}]}}),
        );
        let addresses: Vec<Value> = endpoints
            .iter()
            .map(|(ip, node)| match node {
                Some(n) => json!({"ip": ip, "nodeName": n}),
                None => json!({"ip": ip}),
            })
            .collect();
        self.apply(json!({"kind": "Endpoints", "metadata": {"name": name, "namespace": "default"},
                          "subsets": [{"addresses": addresses, "ports": [{"name": "web", "port": 8080}]}]}));
    }

    fn endpoint(&self, kind: &str, name: &str, properties: Value) -> RuleEndpoint {
        let body = json!({"type": kind, "name": name, "properties": properties});
        let Value::Object(map) = body else { panic!() };
        self.router.create_endpoint(map).expect("endpoint")
    }

    fn rule(&self, body: Value) -> Result<Rule, RouterError> {
        let Value::Object(map) = body else { panic!() };
        self.router.create_rule(map)
    }

    /// `rest` endpoint `r` (with `properties`), `service` endpoint `s`, and a rule from path
    /// `path` to Service `default/<service>` port 80 at `/v1`.
    fn rest_rule(&self, path: &str, service: &str, properties: Value) -> Rule {
        if self.router.endpoints().iter().all(|e| e.name != "s") {
            self.endpoint("service", "s", json!({}));
        }
        let rest = format!("r{}", self.router.endpoints().len());
        self.endpoint("rest", &rest, properties);
        self.rule(json!({"name": format!("rule{}", self.router.rules().len()), "source": rest,
                         "source_resource": {"path": path}, "target": "s",
                         "target_resource": {"namespace": "default", "name": service, "port": 80, "path": "/v1"}}))
            .expect("rule")
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value, Response<Body>) {
        let req = Request::builder()
            .uri(uri)
            .body(Body::empty())
            .expect("request");
        call(&self.router, req).await
    }

    fn api(&self) -> axum::Router {
        let state = ApiState {
            objects: self.objects.clone(),
            tokens: Arc::new(NodeTokens::load(self.store.clone()).expect("tokens")),
            nodes: Arc::new(NodeRegistry::default()),
            api_token: TOKEN.into(),
            metrics: None,
            ready: Arc::new(AtomicBool::new(true)),
            router: self.router.clone(),
        };
        crate::api::router(state, 1 << 20)
    }
}

/// Sends `req` to the router's ingress as a client at 192.168.7.7 would, over a real HTTP/1
/// connection (the ingress serves hyper's request bodies).
async fn call(router: &Arc<Router>, req: Request<Body>) -> (StatusCode, Value, Response<Body>) {
    // The routes follow the store a moment after each write.
    router
        .data
        .caught_up(router.objects.store().version())
        .await;
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let server_router = router.clone();
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let router = server_router.clone();
            async move {
                Ok::<_, Infallible>(
                    router
                        .handle_ingress(req, Some([192, 168, 7, 7].into()))
                        .await,
                )
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server_io), service)
            .await;
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v, Response::from_parts(parts, Body::empty()))
}

async fn rest(app: &axum::Router, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
    rest_raw(
        app,
        method,
        uri,
        if body.is_null() {
            String::new()
        } else {
            body.to_string()
        },
    )
    .await
}

async fn rest_raw(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: String,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(body))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn rest_crud_and_errors_that_name_the_field() {
    let f = fixture();
    let app = f.api();
    let (s, rest_ep) = rest(
        &app,
        "POST",
        "/api/v1/router/endpoints",
        json!({"type": "rest", "name": "my-rest"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{rest_ep}");
    for key in [
        "id",
        "type",
        "name",
        "project_id",
        "is_shared",
        "properties",
        "created_at",
        "updated_at",
    ] {
        assert!(rest_ep.get(key).is_some(), "{key} in {rest_ep}");
    }
    let id = rest_ep["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 36, "uuid-like: {id}");
    let (s, _) = rest(
        &app,
        "POST",
        "/api/v1/router/endpoints",
        json!({"type": "service", "name": "my-svc"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);

    for (body, status, field) in [
        (
            json!({"type": "rest", "name": "my-rest"}),
            409,
            Some("name"),
        ),
        (json!({"type": "mqtt", "name": "x"}), 422, Some("type")),
        (
            json!({"type": "rest", "name": "x", "colour": "red"}),
            422,
            Some("colour"),
        ),
        (
            json!({"type": "rest", "name": "x", "properties": {"qps": -1}}),
            422,
            Some("properties.qps"),
        ),
        (json!([1]), 400, None),
    ] {
        let (s, v) = rest(&app, "POST", "/api/v1/router/endpoints", body.clone()).await;
        assert_eq!(s.as_u16(), status, "{body}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert_eq!(v["field"].as_str(), field, "{body}: {v}");
    }
    let (s, _) = rest_raw(&app, "POST", "/api/v1/router/endpoints", "{oops".into()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let rule = json!({"name": "to-hello", "source": "my-rest", "source_resource": {"path": "/hello"},
                      "target": "my-svc", "target_resource": {"namespace": "default", "name": "hello", "port": 80}});
    for (patch, status, field) in [
        (json!({"source": "nope"}), 422, "source"),
        (json!({"target": "my-rest"}), 422, "target"),
        (json!({"source": "my-svc"}), 422, "target"),
        (
            json!({"source": "my-svc", "target": "my-rest"}),
            422,
            "source_resource.path",
        ),
        (
            json!({"target_resource": {"namespace": "default", "name": "hello"}}),
            422,
            "target_resource.port",
        ),
        (json!({"in_use": false}), 422, "in_use"),
    ] {
        let mut body = rule.clone();
        for (k, v) in patch.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (s, v) = rest(&app, "POST", "/api/v1/router/rules", body.clone()).await;
        assert_eq!(
            (s.as_u16(), v["field"].as_str()),
            (status, Some(field)),
            "{body}: {v}"
        );
    }
    let (s, created) = rest(&app, "POST", "/api/v1/router/rules", rule.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    for key in [
        "id",
        "name",
        "project_id",
        "domain_id",
        "source",
        "source_resource",
        "target",
        "target_resource",
        "in_use",
        "is_deleted",
        "created_at",
        "updated_at",
        "success_messages",
        "fail_messages",
        "errors",
    ] {
        assert!(created.get(key).is_some(), "{key} in {created}");
    }
    let rule_id = created["id"].as_str().expect("id").to_string();
    let mut again = rule.clone();
    again["name"] = json!("other");
    let (s, v) = rest(&app, "POST", "/api/v1/router/rules", again).await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::CONFLICT, Some("source_resource.path")),
        "{v}"
    );
    let (s, v) = rest(&app, "POST", "/api/v1/router/rules", rule.clone()).await;
    assert_eq!(
        (s, v["field"].as_str()),
        (StatusCode::CONFLICT, Some("name")),
        "{v}"
    );

    let (s, v) = rest(&app, "GET", "/api/v1/router/rules", Value::Null).await;
    assert_eq!(
        (s, v["items"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1))
    );
    let (s, v) = rest(&app, "GET", "/api/v1/router/endpoints", Value::Null).await;
    assert_eq!(
        (s, v["items"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(2))
    );
    let (s, v) = rest(
        &app,
        "GET",
        &format!("/api/v1/router/endpoints/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("my-rest")));

    // An endpoint in use cannot go; after its rule it can.
    let (s, v) = rest(
        &app,
        "DELETE",
        &format!("/api/v1/router/endpoints/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("to-hello")),
        "{v}"
    );
    let (s, _) = rest(
        &app,
        "DELETE",
        &format!("/api/v1/router/rules/{rule_id}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = rest(
        &app,
        "GET",
        &format!("/api/v1/router/rules/{rule_id}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = rest(
        &app,
        "DELETE",
        &format!("/api/v1/router/endpoints/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = rest(
        &app,
        "DELETE",
        &format!("/api/v1/router/endpoints/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");

    // The bearer token applies.
    let req = Request::builder()
        .uri("/api/v1/router/rules")
        .body(Body::empty())
        .expect("request");
    assert_eq!(
        app.clone().oneshot(req).await.expect("response").status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        f.store.version(),
        0,
        "router records are not synced objects"
    );
}

#[tokio::test]
async fn ingress_streams_a_post_to_the_edge_pod_and_back() {
    let f = fixture();
    f.service("hello", &[("10.0.0.1", Some("edge-1"))]);
    let rule = f.rest_rule("/abc", "hello", json!({}));
    let chunks: Vec<Result<Bytes, Infallible>> =
        vec![Ok(Bytes::from("hello ")), Ok(Bytes::from("edge"))];
    let req = Request::builder()
        .method("POST")
        .uri("/abc/x/y?q=1")
        .header("host", "cloud.example:9443")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("request");
    let (s, v, _) = call(&f.router, req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/v1/x/y?q=1");
    assert_eq!(v["body"], "hello edge");
    assert_eq!(v["chunked"], true, "the body streamed through");
    assert_eq!(v["host"], "cloud.example:9443");
    assert_eq!(v["xff"], "192.168.7.7");
    let opened = f.dialer.opened();
    assert_eq!(opened.len(), 1);
    assert_eq!(
        opened[0].endpoint,
        "10.0.0.1:8080".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(opened[0].node.as_deref(), Some("edge-1"));
    assert_eq!(
        (opened[0].namespace.as_str(), opened[0].service.as_str()),
        ("default", "hello")
    );
    assert_eq!(opened[0].protocol, Protocol::Http1);
    assert_eq!(opened[0].source, "");

    // Exactly the prefix: the target path alone.
    let (s, v, _) = f.get("/abc").await;
    assert_eq!((s, v["path"].as_str()), (StatusCode::OK, Some("/v1")));
    // Not on a segment boundary, or no rule at all: 404, counted nowhere.
    let (s, v, _) = f.get("/abcd").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("/abcd")));
    let (s, _, _) = f.get("/abc/../admin").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A 4xx or 5xx from the pod is passed on; 5xx counts as a failure.
    let (s, _, _) = f.get("/abc/fail").await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let r = f.router.rule(&rule.id).expect("rule");
    assert_eq!((r.success_messages, r.fail_messages), (2, 1));
    assert!(r.errors[0].message.contains("500"), "{:?}", r.errors);
}

#[tokio::test]
async fn ingress_balances_and_falls_over_to_the_next_endpoint() {
    let f = fixture();
    f.service(
        "hello",
        &[
            ("10.0.0.1", Some("a")),
            ("10.0.0.2", Some("b")),
            ("10.0.0.3", Some("c")),
        ],
    );
    f.rest_rule("/", "hello", json!({}));
    for _ in 0..3 {
        let (s, v, _) = f.get("/").await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let mut ips: Vec<String> = f
        .dialer
        .opened()
        .iter()
        .map(|o| o.endpoint.ip().to_string())
        .collect();
    ips.sort();
    assert_eq!(ips, ["10.0.0.1", "10.0.0.2", "10.0.0.3"], "round-robin");

    // Endpoints whose opens fail: each request falls over to the one that works.
    f.service(
        "flaky",
        &[
            ("10.0.9.1", Some("a")),
            ("10.0.9.2", Some("b")),
            ("10.0.9.3", Some("c")),
        ],
    );
    let unreachable = OpenError::Refused {
        kind: RefusalKind::Unreachable,
        message: "refused".into(),
    };
    f.dialer
        .set("10.0.9.1", Behaviour::Fail(unreachable.clone()));
    f.dialer
        .set("10.0.9.2", Behaviour::Fail(unreachable.clone()));
    f.rest_rule("/flaky", "flaky", json!({}));
    for _ in 0..3 {
        assert_eq!(
            f.get("/flaky/x").await.0,
            StatusCode::OK,
            "the failed endpoints are skipped"
        );
    }
    let opened = f.dialer.opened();
    assert!(
        opened
            .iter()
            .any(|o| o.endpoint.ip().to_string() != "10.0.9.3"),
        "failed opens were retried elsewhere: {opened:?}"
    );
    assert!(
        opened
            .iter()
            .all(|o| o.endpoint.ip().to_string() != "10.0.9.1" || o.node.as_deref() == Some("a")),
        "a stream goes to the endpoint's node"
    );
}

#[tokio::test]
async fn ingress_failures_answer_and_count() {
    let f = fixture();
    let app = f.api();
    // No such Service: 503.
    let missing = f.rest_rule("/missing", "nothing", json!({}));
    let (s, v, _) = f.get("/missing/x").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("default/nothing not found")),
        "{v}"
    );
    // A Service without endpoints: 503.
    f.apply(json!({"kind": "Service", "metadata": {"name": "empty", "namespace": "default"}, "spec": {"ports": [{"port": 80}]}}));
    f.rest_rule("/empty", "empty", json!({}));
    assert_eq!(f.get("/empty").await.0, StatusCode::SERVICE_UNAVAILABLE);

    // Every endpoint unreachable: 502 after trying each (at most 3).
    f.service(
        "down",
        &[
            ("10.0.1.1", Some("a")),
            ("10.0.1.2", Some("a")),
            ("10.0.1.3", Some("a")),
            ("10.0.1.4", Some("a")),
        ],
    );
    for ip in ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4"] {
        f.dialer.set(
            ip,
            Behaviour::Fail(OpenError::Refused {
                kind: RefusalKind::NodeOffline,
                message: "offline".into(),
            }),
        );
    }
    let down = f.rest_rule("/down", "down", json!({}));
    let (s, v, _) = f.get("/down").await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert_eq!(f.dialer.opened().len(), 3);
    // A link that is down is not the endpoint's fault (it is not ejected); each endpoint is
    // tried at most once.
    f.service(
        "nolink",
        &[("10.0.2.1", Some("a")), ("10.0.2.2", Some("a"))],
    );
    f.dialer
        .set("10.0.2.1", Behaviour::Fail(OpenError::LinkDown));
    f.dialer
        .set("10.0.2.2", Behaviour::Fail(OpenError::LinkDown));
    f.rest_rule("/nolink", "nolink", json!({}));
    assert_eq!(f.get("/nolink").await.0, StatusCode::BAD_GATEWAY);
    assert_eq!(f.dialer.opened().len(), 2);

    // Counters and errors are visible through GET.
    let (s, r) = rest(
        &app,
        "GET",
        &format!("/api/v1/router/rules/{}", missing.id),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (r["success_messages"].as_u64(), r["fail_messages"].as_u64()),
        (Some(0), Some(1)),
        "{r}"
    );
    let errors = r["errors"].as_array().expect("errors");
    assert!(
        errors[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not found")),
        "{r}"
    );
    assert!(
        errors[0]["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{r}"
    );
    let (_, r) = rest(
        &app,
        "GET",
        &format!("/api/v1/router/rules/{}", down.id),
        Value::Null,
    )
    .await;
    assert_eq!(r["fail_messages"], 1);
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("offline")),
        "{r}"
    );
}

#[tokio::test(start_paused = true)]
async fn ingress_timeout_is_a_504() {
    let f = fixture();
    f.service("slow", &[("10.0.3.1", Some("a"))]);
    f.dialer.set("10.0.3.1", Behaviour::Hang);
    let rule = f.rest_rule("/slow", "slow", json!({}));
    let started = tokio::time::Instant::now();
    let (s, v, _) = f.get("/slow").await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{v}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let r = f.router.rule(&rule.id).expect("rule");
    assert_eq!(r.fail_messages, 1);
    assert!(
        r.errors[0].message.contains("router.request_timeout"),
        "{:?}",
        r.errors
    );
}

#[tokio::test(start_paused = true)]
async fn ingress_qps_limit_answers_429_with_retry_after() {
    let f = fixture();
    f.service("hello", &[("10.0.0.1", Some("a"))]);
    let rule = f.rest_rule("/limited", "hello", json!({"qps": 1, "burst": 2}));
    assert_eq!(f.get("/limited").await.0, StatusCode::OK);
    assert_eq!(f.get("/limited").await.0, StatusCode::OK);
    let opened = f.dialer.opened().len();
    assert!(opened >= 1, "pooled: at most one stream a request");
    let (s, v, resp) = f.get("/limited").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(resp.headers()["retry-after"], "1");
    assert!(
        f.dialer.opened().is_empty(),
        "a limited request opens nothing"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(f.get("/limited").await.0, StatusCode::OK);
    let r = f.router.rule(&rule.id).expect("rule");
    assert_eq!((r.success_messages, r.fail_messages), (3, 1));
    assert!(r.errors[0].message.contains("QPS"), "{:?}", r.errors);
    // Another rule has its own limiter.
    let other = f.rest_rule("/other", "hello", json!({"qps": 1}));
    assert_eq!(f.get("/other").await.0, StatusCode::OK);
    assert_eq!(f.router.rule(&other.id).expect("rule").success_messages, 1);
}

#[tokio::test]
async fn the_ingress_listener_serves_and_stops() {
    let f = fixture();
    f.service("hello", &[("10.0.0.1", Some("a"))]);
    let rule = f.rest_rule("/abc", "hello", json!({}));
    f.router.data.caught_up(f.store.version()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(f.router.clone().serve_ingress(listener, shutdown.clone()));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    for _ in 0..2 {
        let req = Request::builder()
            .method("PUT")
            .uri("/abc/k")
            .header("host", "x")
            .body(Full::new(Bytes::from("v")))
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            (v["path"].as_str(), v["body"].as_str()),
            (Some("/v1/k"), Some("v"))
        );
    }
    drop(sender);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stopped")
        .expect("task");
    // The counters were written at shutdown.
    let stored = f
        .store
        .get_router(RouterKind::Rule, &rule.id)
        .expect("get")
        .expect("stored");
    let stored: Rule = serde_json::from_str(&stored).expect("rule");
    assert_eq!(stored.success_messages, 2);
}

#[tokio::test]
async fn counters_survive_a_restart() {
    let f = fixture();
    f.service("hello", &[("10.0.0.1", Some("a"))]);
    let rule = f.rest_rule("/abc", "hello", json!({}));
    f.get("/abc").await;
    f.get("/abc/fail").await;
    assert_eq!(f.router.flush().expect("flush"), 1);
    assert_eq!(f.router.flush().expect("flush"), 0, "nothing new");
    let again = f.restart();
    let r = again.rule(&rule.id).expect("rule");
    assert_eq!(
        (r.success_messages, r.fail_messages, r.errors.len()),
        (1, 1, 1)
    );
    assert_eq!(r.source_resource, rule.source_resource);
}

/// A loopback HTTP server answering with `echo`.
async fn loopback_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(echo))
                    .await;
            });
        }
    });
    addr
}

fn service_rule(
    f: &Fixture,
    service: &str,
    url: &str,
    properties: Value,
) -> Result<Rule, RouterError> {
    if f.router.endpoints().iter().all(|e| e.name != "rest") {
        f.endpoint("rest", "rest", json!({}));
    }
    let source = format!("svc-{service}");
    f.endpoint("service", &source, properties);
    f.rule(json!({"name": format!("to-{service}"), "source": source,
                  "source_resource": {"namespace": "default", "name": service, "port": 8080},
                  "target": "rest", "target_resource": {"url": url}}))
}

fn stored(f: &Fixture, kind: Kind, name: &str) -> Option<Value> {
    f.objects
        .get(&ObjectKey::new(kind, "default", name))
        .expect("get")
        .map(|r| serde_json::from_str(&r.json).expect("json"))
}

#[tokio::test]
async fn service_to_rest_rules_own_a_virtual_service() {
    let f = fixture();
    let rule = service_rule(&f, "cloud-api", "http://127.0.0.1:1/base", json!({})).expect("rule");
    assert!(f.router.virtual_service("default", "cloud-api"));
    assert!(!f.router.virtual_service("default", "other"));
    let svc = stored(&f, Kind::Service, "cloud-api").expect("service");
    assert_eq!(svc["metadata"]["annotations"][ANNOTATION_RULE], rule.id);
    assert_eq!(
        svc["metadata"]["annotations"]["edgemesh.io/protocol"],
        "http"
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    assert!(
        svc["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.96.")),
        "{svc}"
    );
    let ep = stored(&f, Kind::Endpoints, "cloud-api").expect("endpoints");
    let address = &ep["subsets"][0]["addresses"][0];
    assert_eq!(
        address["ip"], "192.0.2.1",
        "listen is loopback: the placeholder"
    );
    assert!(
        address.get("nodeName").is_none(),
        "reachable from cloudcore"
    );
    assert_eq!(ep["subsets"][0]["ports"][0]["port"], 8080);

    // A Service the router did not make is never taken over.
    f.apply(json!({"kind": "Service", "metadata": {"name": "users", "namespace": "default"}, "spec": {"ports": [{"port": 80}]}}));
    let err = service_rule(&f, "users", "http://127.0.0.1:1", json!({})).expect_err("conflict");
    assert!(
        matches!(&err, RouterError::Conflict(e) if e.field == "source_resource.name"),
        "{err}"
    );
    assert!(
        f.router.rules().iter().all(|r| r.name != "to-users"),
        "nothing kept"
    );
    assert_eq!(
        f.store.list_router(RouterKind::Rule).expect("list").len(),
        1
    );
    // Nor does a second rule take the same virtual Service.
    let Value::Object(map) = json!({"name": "dup", "source": "svc-cloud-api",
        "source_resource": {"namespace": "default", "name": "cloud-api", "port": 9000},
        "target": "rest", "target_resource": {"url": "http://127.0.0.1:1"}})
    else {
        panic!()
    };
    assert!(
        matches!(f.router.create_rule(map), Err(RouterError::Conflict(e)) if e.field == "source_resource.name")
    );
    // https is refused with a clear field error.
    let err = service_rule(&f, "secure", "https://127.0.0.1:1", json!({})).expect_err("https");
    assert!(
        matches!(&err, RouterError::Invalid(e) if e.field == "target_resource.url"),
        "{err}"
    );

    // Deleting the rule deletes its objects, and a user's Service survives.
    f.router.delete_rule(&rule.id).expect("delete");
    assert!(!f.router.virtual_service("default", "cloud-api"));
    assert!(stored(&f, Kind::Service, "cloud-api").is_none());
    assert!(stored(&f, Kind::Endpoints, "cloud-api").is_none());
    assert!(stored(&f, Kind::Service, "users").is_some());
}

#[tokio::test]
async fn edge_streams_reach_the_cloud_url() {
    let f = fixture();
    let target = loopback_server().await;
    let rule =
        service_rule(&f, "cloud-api", &format!("http://{target}/base"), json!({})).expect("rule");
    let (near, far) = tokio::io::duplex(64 << 10);
    let serving = tokio::spawn(f.router.clone().serve_edge_stream(
        "edge-1".into(),
        "default".into(),
        "cloud-api".into(),
        far,
    ));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    // Two requests on one stream (keep-alive).
    for (method, path, body) in [("POST", "/items?x=1", "payload"), ("GET", "/", "")] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "cloud-api.default.svc.cluster.local:8080")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v: Value = serde_json::from_slice(&bytes).expect("json");
        let want = if path == "/" {
            "/base/".to_string()
        } else {
            format!("/base{path}")
        };
        assert_eq!(v["path"].as_str(), Some(want.as_str()));
        assert_eq!(v["body"], body);
        assert_eq!(
            v["host"].as_str(),
            Some(target.to_string().as_str()),
            "the URL's host"
        );
    }
    let r = f.router.rule(&rule.id).expect("rule");
    assert_eq!((r.success_messages, r.fail_messages), (2, 0));
    drop(sender);
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("stream served to its end")
        .expect("task");
}

#[tokio::test]
async fn edge_streams_count_failures_and_honour_qps() {
    let f = fixture();
    // A port nothing listens on: bind, note the port, close.
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr")
    };
    let rule = service_rule(
        &f,
        "gone",
        &format!("http://{closed}"),
        json!({"qps": 1, "burst": 1}),
    )
    .expect("rule");
    let send = |path: &'static str| {
        let router = f.router.clone();
        async move {
            let req = Request::builder()
                .uri(path)
                .body(Body::empty())
                .expect("request");
            router
                .handle_edge_request("edge-1", "default", "gone", req)
                .await
        }
    };
    let resp = send("/a").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let resp = send("/a").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let r = f.router.rule(&rule.id).expect("rule");
    assert_eq!((r.success_messages, r.fail_messages), (0, 2));
    assert!(
        r.errors[0].message.contains("cannot connect"),
        "{:?}",
        r.errors
    );
    // After the rule is gone, its Service's streams get 503.
    f.router.delete_rule(&rule.id).expect("delete");
    assert_eq!(send("/a").await.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn start_up_repairs_virtual_services_and_keeps_unreadable_records() {
    let f = fixture();
    let kept = service_rule(&f, "kept", "http://127.0.0.1:1", json!({})).expect("rule");
    let orphan = service_rule(&f, "orphan", "http://127.0.0.1:1", json!({})).expect("rule");
    // A crash between deleting a rule's record and its objects.
    f.store
        .delete_router(RouterKind::Rule, &orphan.id)
        .expect("delete record");
    // And one where the objects of a rule were lost.
    f.objects
        .delete(&ObjectKey::new(Kind::Endpoints, "default", "kept"))
        .expect("delete");
    let ip = stored(&f, Kind::Service, "kept").expect("svc")["spec"]["clusterIP"].clone();
    // A record this version cannot read.
    f.store
        .put_router(RouterKind::Rule, "broken", "{not json")
        .expect("put");

    let router = f.restart();
    assert!(router.virtual_service("default", "kept"));
    assert!(!router.virtual_service("default", "orphan"));
    assert!(stored(&f, Kind::Endpoints, "kept").is_some(), "recreated");
    assert_eq!(
        stored(&f, Kind::Service, "kept").expect("svc")["spec"]["clusterIP"],
        ip,
        "cluster IP kept"
    );
    assert!(
        stored(&f, Kind::Service, "orphan").is_none(),
        "orphan removed"
    );
    assert!(stored(&f, Kind::Endpoints, "orphan").is_none());
    assert_eq!(router.rules().len(), 1);
    assert_eq!(router.rule(&kept.id).expect("kept").name, "to-kept");
    assert_eq!(
        f.store
            .get_router(RouterKind::Rule, "broken")
            .expect("get")
            .as_deref(),
        Some("{not json"),
        "left as it was"
    );
    // Restarting again changes nothing.
    let version = f.store.version();
    f.restart();
    assert_eq!(f.store.version(), version);
}
