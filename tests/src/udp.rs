//! UDP Services for the tests: a Service with one UDP port, the test server's UDP echo, and
//! datagrams of given sizes echoed whole.

use std::net::UdpSocket;
use std::time::Duration;

use serde_json::json;

use crate::harness::{bin, Host, ProcId};
use crate::mesh::{ep_path, in_netns, svc_path, Mesh};

/// Service `name` with one UDP port `port` → `target` on `(pod, node)` addresses; its cluster IP.
pub fn put_udp_service(
    mesh: &Mesh,
    name: &str,
    port: u16,
    target: u16,
    addrs: &[(&Host, &str)],
) -> String {
    put_udp_service_with(mesh, name, port, target, json!({}), addrs)
}

/// [`put_udp_service`] with more `spec` fields.
pub fn put_udp_service_with(
    mesh: &Mesh,
    name: &str,
    port: u16,
    target: u16,
    spec: serde_json::Value,
    addrs: &[(&Host, &str)],
) -> String {
    let mut svc = json!({"apiVersion":"v1","kind":"Service",
        "metadata":{"name":name,"namespace":"default"},
        "spec":{"ports":[{"name":"udp","port":port,"targetPort":target,"protocol":"UDP"}]}});
    let (status, current) = mesh.api("GET", &svc_path(name), None);
    if status == 200 {
        svc["spec"]["clusterIP"] = current["spec"]["clusterIP"].clone();
    }
    for (k, v) in spec.as_object().into_iter().flatten() {
        svc["spec"][k] = v.clone();
    }
    mesh.put(&svc_path(name), &svc.to_string());
    let addresses: Vec<_> = addrs
        .iter()
        .map(|(pod, node)| json!({"ip": pod.ip.to_string(), "nodeName": node}))
        .collect();
    let eps = json!({"apiVersion":"v1","kind":"Endpoints",
        "metadata":{"name":name,"namespace":"default"},
        "subsets":[{"addresses":addresses,"ports":[{"name":"udp","port":target,"protocol":"UDP"}]}]});
    let v = mesh.put(&ep_path(name), &eps.to_string());
    for i in 0..mesh.nodes.len() {
        mesh.wait_version(i, v, Duration::from_secs(10));
    }
    mesh.cluster_ip(name)
}

/// Starts the test server's UDP echo in `pod` on `port`.
pub fn udp_echo(mesh: &mut Mesh, pod: &Host, port: u16) -> ProcId {
    mesh.topo.spawn(
        pod,
        &format!("udp-echo-{}", pod.role),
        &bin("edgemesh-testserver"),
        &[
            "udp-echo".to_string(),
            format!("{}:{port}", pod.ip),
            pod.role.clone(),
        ],
        &[],
    )
}

/// Sends each datagram from `client` to `addr` (an echo server behind a ClusterIP) and checks
/// that each comes back whole, on its own.
pub fn echo_sizes(client: &Host, addr: std::net::SocketAddr, sizes: &[usize]) {
    let sizes = sizes.to_vec();
    in_netns(&client.ns.clone(), move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = vec![0u8; 70_000];
        for (i, &n) in sizes.iter().enumerate() {
            let sent: Vec<u8> = (0..n).map(|j| (i * 7 + j) as u8).collect();
            // A lost first datagram (the flow being set up over the relay) is sent again.
            let got = (0..5).find_map(|_| {
                socket.send_to(&sent, addr).expect("send");
                socket.recv_from(&mut buf).ok()
            });
            let (len, from) = got.unwrap_or_else(|| panic!("no echo of {n} bytes from {addr}"));
            assert_eq!(from, addr, "the answer comes from the Service address");
            assert_eq!(len, n, "one datagram of {n} bytes, whole");
            assert_eq!(&buf[..len], &sent[..], "{n} bytes intact");
        }
    });
}
