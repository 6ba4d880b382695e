//! Whether a stream may be opened: the side that dials the endpoint checks this against its
//! own copy of the metadata, whatever the opener (or a relay) claims.

use std::net::IpAddr;

use super::open::{OpenRefusal, OpenRequest, RefusalKind};
use crate::view::{EndpointPortRecord, EndpointsRecord, ServiceRecord};

pub use crate::model::CLOUD_NODE;

fn forbidden(message: String) -> OpenRefusal {
    OpenRefusal {
        kind: RefusalKind::Forbidden,
        message,
    }
}

/// [`authorise`] against `view`'s copy of the Service and its Endpoints.
pub fn authorise_in(
    view: &crate::view::MeshView,
    request: &OpenRequest,
    host: Option<&str>,
) -> Result<(), OpenRefusal> {
    let service = view.service(&request.namespace, &request.service);
    let endpoints = view.endpoints_of(&request.namespace, &request.service);
    authorise(
        service.map(|s| s.as_ref()),
        endpoints.map(|e| e.as_ref()),
        request,
        host,
    )
}

/// Checks that `request` names a ready endpoint of an existing Service, on a port that
/// Service exposes, hosted by `host` (a node name, or `None` for cloudcore).
pub fn authorise(
    service: Option<&ServiceRecord>,
    endpoints: Option<&EndpointsRecord>,
    request: &OpenRequest,
    host: Option<&str>,
) -> Result<(), OpenRefusal> {
    let name = format!("{}/{}", request.namespace, request.service);
    let service = service.ok_or_else(|| forbidden(format!("no service {name}")))?;
    let endpoints =
        endpoints.ok_or_else(|| forbidden(format!("service {name} has no endpoints")))?;
    let ip: IpAddr = request.endpoint.ip();
    let port = request.endpoint.port();
    let exposed = |subset_ports: &[EndpointPortRecord]| {
        if subset_ports.is_empty() {
            // No Endpoints ports: the Service's numeric target ports are what gets dialled.
            service.ports.iter().any(|p| p.target == Some(port))
        } else {
            subset_ports.iter().any(|p| p.port == port)
        }
    };
    for subset in endpoints.subsets.iter() {
        if !exposed(&subset.ports) {
            continue;
        }
        for address in subset.addresses.iter() {
            if address.ip != ip {
                continue;
            }
            if address.host() == host {
                return Ok(());
            }
            return Err(forbidden(format!(
                "endpoint {} of {name} is hosted by {}, not {}",
                request.endpoint,
                address.host().unwrap_or("the cloud"),
                host.unwrap_or("the cloud"),
            )));
        }
    }
    Err(forbidden(format!(
        "{} is not a ready endpoint of {name}",
        request.endpoint
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Protocol;
    use crate::model::Object;
    use crate::view::Interner;

    fn objects() -> (ServiceRecord, EndpointsRecord) {
        let svc = serde_json::json!({"apiVersion":"v1","kind":"Service",
            "metadata":{"name":"hello","namespace":"default"},
            "spec":{"clusterIP":"10.96.0.10","ports":[{"name":"http","port":80,"targetPort":8080}]}});
        let eps = serde_json::json!({"apiVersion":"v1","kind":"Endpoints",
            "metadata":{"name":"hello","namespace":"default"},
            "subsets":[{"addresses":[{"ip":"10.244.2.10","nodeName":"node-b"},{"ip":"192.0.2.7"},
                {"ip":"192.0.2.8","nodeName":"cloud"}],
                "notReadyAddresses":[{"ip":"10.244.2.11","nodeName":"node-b"}],
                "ports":[{"name":"http","port":8080}]}]});
        let (Ok(Object::Service(s)), Ok(Object::Endpoints(e))) =
            (Object::from_value(svc), Object::from_value(eps))
        else {
            panic!("fixtures")
        };
        let mut names = Interner::default();
        (
            ServiceRecord::new(&s, &mut names),
            EndpointsRecord::new(&e, &mut names),
        )
    }

    fn req(endpoint: &str) -> OpenRequest {
        OpenRequest {
            stream: 2,
            namespace: "default".into(),
            service: "hello".into(),
            endpoint: endpoint.parse().expect("addr"),
            node: None,
            protocol: Protocol::Opaque,
            source: "node-a".into(),
            window: 0,
        }
    }

    #[test]
    fn only_the_hosting_side_and_exposed_ports_pass() {
        let (s, e) = objects();
        let ok = |ep: &str, host: Option<&str>| authorise(Some(&s), Some(&e), &req(ep), host);
        assert!(ok("10.244.2.10:8080", Some("node-b")).is_ok());
        assert!(ok("192.0.2.7:8080", None).is_ok());
        assert!(
            ok("192.0.2.8:8080", None).is_ok(),
            "nodeName cloud is the cloud"
        );
        let refused = |r: Result<(), OpenRefusal>| r.expect_err("refused").message;
        assert!(refused(ok("10.244.2.10:8080", Some("node-a"))).contains("hosted by node-b"));
        assert!(refused(ok("10.244.2.10:8080", None)).contains("hosted by node-b"));
        assert!(refused(ok("10.244.2.10:22", Some("node-b"))).contains("not a ready endpoint"));
        assert!(refused(ok("10.244.2.11:8080", Some("node-b"))).contains("not a ready endpoint"));
        assert!(refused(ok("10.0.0.1:8080", Some("node-b"))).contains("not a ready endpoint"));
        assert!(
            authorise(None, Some(&e), &req("10.244.2.10:8080"), Some("node-b"))
                .expect_err("no service")
                .message
                .contains("no service default/hello")
        );
        assert!(authorise(Some(&s), None, &req("10.244.2.10:8080"), Some("node-b")).is_err());
    }
}
