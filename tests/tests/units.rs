//! Node units in DNS and the proxy, end to end (issue 17): nodes labelled
//! `location=beijing` and `location=guangzhou` that reach the cloud but not each other, pods
//! behind them asking their own node with real `dig` and calling with real `curl`.
//!
//! - a headless Service with `topologyKeys` answers each unit its own pods, and falls back to
//!   other units only with `*`;
//! - `edgemesh.io/unit-key`: `web-0.web...` is the pod `web-<unit>-0` of the asking node's
//!   unit, and relabelling a node changes its answers within a second;
//! - `trafficDistribution: PreferClose` keeps calls in the unit for the proxy and DNS alike.

use std::time::{Duration, Instant};

use edgemesh_e2e::dns::{Dig, UnitMesh};
use edgemesh_e2e::wait_for;

/// Polls `dig` from `pod` until `ok` holds; returns the answer and how long it took.
fn until(m: &UnitMesh, pod: &str, args: &[&str], ok: impl Fn(&Dig) -> bool) -> (Dig, Duration) {
    let start = Instant::now();
    let d = wait_for(
        &format!("{pod}: dig {args:?}"),
        Duration::from_secs(10),
        || {
            let d = m.dig(pod, args);
            ok(&d).then_some(d)
        },
    );
    let took = start.elapsed();
    eprintln!("{pod}: dig {args:?} answered as expected after {took:?}");
    (d, took)
}

/// A headless Service (`spec` without the braces) with annotations.
fn headless(name: &str, spec: &str, annotations: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"default","annotations":{{{annotations}}}}},"spec":{{"clusterIP":"None","ports":[{{"name":"http","port":8080}}]{spec}}}}}"#
    )
}

/// Endpoints at `(ip, node, hostname)` on port 8080.
fn endpoints(name: &str, addrs: &[(&str, &str, &str)]) -> String {
    let addrs: Vec<String> = addrs
        .iter()
        .map(|(ip, node, host)| {
            let host = if host.is_empty() {
                String::new()
            } else {
                format!(r#","hostname":"{host}""#)
            };
            format!(r#"{{"ip":"{ip}","nodeName":"{node}"{host}}}"#)
        })
        .collect();
    format!(
        r#"{{"apiVersion":"v1","kind":"Endpoints","metadata":{{"name":"{name}","namespace":"default"}},"subsets":[{{"addresses":[{}],"ports":[{{"name":"http","port":8080}}]}}]}}"#,
        addrs.join(",")
    )
}

fn ip(m: &UnitMesh, pod: &str) -> String {
    m.pod(pod).ip.to_string()
}

#[test]
fn headless_services_with_topology_answer_each_unit_its_own_pods() {
    // edge-0 and edge-1 in beijing, edge-2 in guangzhou; a client pod behind each.
    let m = UnitMesh::start(
        "units-topo",
        &["beijing", "beijing", "guangzhou"],
        &[&["bj0"], &["bj1"], &["gz"]],
    );
    let bj_pod = "10.244.1.50"; // a db pod on edge-0
    let gz_pod = "10.244.3.50"; // a db pod on edge-2
    let name = "db.default.svc.cluster.local";
    let any = "db-any.default.svc.cluster.local";
    let both = [(bj_pod, "edge-0", ""), (gz_pod, "edge-2", "")];
    m.apply(&headless("db", r#","topologyKeys":["location"]"#, ""));
    m.apply(&endpoints("db", &both));
    m.apply(&headless(
        "db-any",
        r#","topologyKeys":["location","*"]"#,
        "",
    ));
    m.apply(&endpoints("db-any", &both));

    // Each unit gets only its own pods, also on a node that hosts none of them (edge-1).
    for (pod, want) in [("bj0", bj_pod), ("bj1", bj_pod), ("gz", gz_pod)] {
        for svc in [name, any] {
            let d = m.dig(pod, &[svc]);
            assert_eq!(d.data("A"), [want], "{pod} {svc}: {}", d.output);
        }
        // SRV lists the same endpoints.
        let d = m.dig(pod, &["_http._tcp.db.default.svc.cluster.local", "SRV"]);
        assert_eq!(d.answers.len(), 1, "{pod}: {}", d.output);
        assert!(
            d.additional.iter().any(|r| r.data == want),
            "{pod}: {}",
            d.output
        );
    }

    // The beijing pods go away: without `*` beijing gets no address (NODATA: the name
    // exists), with `*` it falls back to guangzhou's; guangzhou is unaffected.
    let gz_only = [(gz_pod, "edge-2", "")];
    m.apply(&endpoints("db", &gz_only));
    m.apply(&endpoints("db-any", &gz_only));
    for pod in ["bj0", "bj1"] {
        let (d, took) = until(&m, pod, &[name], |d| d.data("A").is_empty());
        assert_eq!(d.status, "NOERROR", "{pod}: {}", d.output);
        assert!(d.has_soa("cluster.local."), "{pod}: {}", d.output);
        assert!(took < Duration::from_secs(1), "{pod}: after {took:?}");
        let d = m.dig(pod, &[any]);
        assert_eq!(d.data("A"), [gz_pod], "{pod}: {}", d.output);
    }
    let d = m.dig("gz", &[name]);
    assert_eq!(d.data("A"), [gz_pod], "{}", d.output);

    // Relabelling edge-1 to guangzhou: its answers follow within a second.
    m.relabel(1, "guangzhou");
    let (d, took) = until(&m, "bj1", &[name], |d| d.data("A") == [gz_pod]);
    assert!(
        took < Duration::from_secs(1),
        "relabelled: after {took:?}\n{}",
        d.output
    );
    let d = m.dig("bj0", &[name]);
    assert!(
        d.data("A").is_empty(),
        "edge-0 is still in beijing: {}",
        d.output
    );
}

#[test]
fn statefulset_names_per_unit_resolve_and_curl_reaches_the_own_units_pod() {
    // One StatefulSet per unit (web-beijing-0 on edge-0, web-guangzhou-0 on edge-1), a client
    // beside each.
    let mut m = UnitMesh::start(
        "units-sts",
        &["beijing", "guangzhou"],
        &[&["web-bj", "cli-bj"], &["web-gz", "cli-gz"]],
    );
    let (web_bj, web_gz) = (m.pod("web-bj"), m.pod("web-gz"));
    m.mesh.serve(&web_bj, "http", 8080, "web-beijing-0");
    m.mesh.serve(&web_gz, "http", 8080, "web-guangzhou-0");
    let (bj, gz) = (ip(&m, "web-bj"), ip(&m, "web-gz"));
    m.apply(&headless("web", "", r#""edgemesh.io/unit-key":"location""#));
    m.apply(&endpoints(
        "web",
        &[
            (&bj, "edge-0", "web-beijing-0"),
            (&gz, "edge-1", "web-guangzhou-0"),
        ],
    ));
    let short = "web-0.web.default.svc.cluster.local";
    let full_gz = "web-guangzhou-0.web.default.svc.cluster.local";
    for (client, own) in [("cli-bj", &bj), ("cli-gz", &gz)] {
        let d = m.dig(client, &[short]);
        assert_eq!(d.data("A"), [own.as_str()], "{client}: {}", d.output);
        assert!(d.has_flag("aa"), "{client}: {}", d.output);
        // The per-unit names resolve from every unit.
        let d = m.dig(client, &[full_gz]);
        assert_eq!(d.data("A"), [gz.as_str()], "{client}: {}", d.output);
        // No such ordinal in any unit: NXDOMAIN, never another unit's pod.
        let d = m.dig(client, &["web-1.web.default.svc.cluster.local"]);
        assert_eq!(d.status, "NXDOMAIN", "{client}: {}", d.output);
        // PTR names the per-unit hostname.
        let d = m.dig(client, &["-x", &gz]);
        assert_eq!(
            d.data("PTR"),
            [format!("{full_gz}.")],
            "{client}: {}",
            d.output
        );
        // A real client, through the pod's resolv.conf and its search path.
        let (status, body) = m.curl(client, "http://web-0.web:8080/");
        assert_eq!(status, 200, "{client}: {body}");
        let unit = if client == "cli-bj" {
            "web-beijing-0"
        } else {
            "web-guangzhou-0"
        };
        assert_eq!(body.trim(), unit, "{client}");
    }

    // edge-0 moves to guangzhou: within a second its web-0 is guangzhou's pod.
    m.relabel(0, "guangzhou");
    let (d, took) = until(&m, "cli-bj", &[short], |d| d.data("A") == [gz.as_str()]);
    assert!(
        took < Duration::from_secs(1),
        "relabelled: after {took:?}\n{}",
        d.output
    );
    // And a node with no value for the label has no unit: NXDOMAIN.
    let node =
        r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"edge-1","labels":{"zone":"a"}}}"#;
    let (s, v) = m.mesh.api("POST", "/api/v1/apply", Some(node));
    assert_eq!(s, 200, "{v}");
    let (d, _) = until(&m, "cli-gz", &[short], |d| d.status == "NXDOMAIN");
    assert!(d.has_soa("cluster.local."), "{}", d.output);
    let d = m.dig("cli-gz", &[full_gz]);
    assert_eq!(d.data("A"), [gz.as_str()], "{}", d.output);
}

#[test]
fn prefer_close_keeps_calls_in_the_unit_for_the_proxy_and_dns_alike() {
    // Servers on edge-0 (beijing) and edge-2 (guangzhou); clients on edge-1 (beijing, no
    // server of its own) and edge-2.
    let mut m = UnitMesh::start(
        "units-close",
        &["beijing", "beijing", "guangzhou"],
        &[&["s-bj"], &["c-bj"], &["s-gz", "c-gz"]],
    );
    let (s_bj, s_gz) = (m.pod("s-bj"), m.pod("s-gz"));
    m.mesh.serve(&s_bj, "http", 8080, "beijing");
    m.mesh.serve(&s_gz, "http", 8080, "guangzhou");
    let (bj, gz) = (ip(&m, "s-bj"), ip(&m, "s-gz"));
    let both = [(bj.as_str(), "edge-0", ""), (gz.as_str(), "edge-2", "")];
    let unit = r#""edgemesh.io/unit-key":"location""#;
    let cluster = |name: &str, topology: &str, annotations: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"default","annotations":{{{annotations}}}}},"spec":{{"ports":[{{"name":"http","port":80,"targetPort":8080}}]{topology}}}}}"#
        )
    };
    let close = r#","trafficDistribution":"PreferClose""#;
    m.apply(&cluster("near", close, unit));
    m.apply(&endpoints("near", &both));
    m.apply(&headless("near-pods", close, unit));
    m.apply(&endpoints("near-pods", &both));
    // The same units without fallback.
    m.apply(&cluster("strict", r#","topologyKeys":["location"]"#, ""));
    m.apply(&endpoints("strict", &both));
    let near_ip = m.mesh.cluster_ip("near");
    let strict_ip = m.mesh.cluster_ip("strict");
    let pods = "near-pods.default.svc.cluster.local";

    let calls = |client: &str, ip: &str| -> Vec<String> {
        (0..6)
            .map(|_| {
                let (status, body) = m.curl(client, &format!("http://{ip}/"));
                if status == 200 {
                    body.trim().to_string()
                } else {
                    format!("failed ({status})")
                }
            })
            .collect()
    };
    // beijing's client reaches beijing's server on the other beijing node, never
    // guangzhou's; DNS answers the same pod. guangzhou stays at home.
    assert_eq!(calls("c-bj", &near_ip), ["beijing"; 6]);
    assert_eq!(calls("c-bj", &strict_ip), ["beijing"; 6]);
    assert_eq!(m.dig("c-bj", &[pods]).data("A"), [bj.as_str()]);
    assert_eq!(calls("c-gz", &near_ip), ["guangzhou"; 6]);
    assert_eq!(m.dig("c-gz", &[pods]).data("A"), [gz.as_str()]);
    // "near.default" by name, through the search path.
    let (status, body) = m.curl("c-bj", "http://near/");
    assert_eq!((status, body.trim()), (200, "beijing"));

    // beijing's server goes: PreferClose falls back to guangzhou in the proxy and in DNS;
    // topologyKeys without `*` leaves beijing without a server.
    let gz_only = [(gz.as_str(), "edge-2", "")];
    m.apply(&endpoints("near", &gz_only));
    m.apply(&endpoints("near-pods", &gz_only));
    m.apply(&endpoints("strict", &gz_only));
    assert_eq!(calls("c-bj", &near_ip), ["guangzhou"; 6]);
    assert_eq!(m.dig("c-bj", &[pods]).data("A"), [gz.as_str()]);
    let strict = calls("c-bj", &strict_ip);
    assert!(
        strict.iter().all(|r| r.starts_with("failed")),
        "strict topology must not leave the unit: {strict:?}"
    );
    assert_eq!(calls("c-gz", &strict_ip), ["guangzhou"; 6]);
}
