//! Cluster-DNS test support: a mesh whose node serves DNS to a pod behind it, real `dig` run
//! from the pod with its output parsed, a real upstream DNS server (dnsmasq) in a namespace of
//! the topology, and manifest builders.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{wait_for, Host, ProcId, Topology};
use crate::mesh::Mesh;

/// One resource record of dig's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rr {
    pub name: String,
    pub ttl: u32,
    pub rtype: String,
    pub data: String,
}

/// What `dig` printed, parsed.
#[derive(Clone, Debug, Default)]
pub struct Dig {
    /// `NOERROR`, `NXDOMAIN`, ...; empty when no answer came back.
    pub status: String,
    /// Header flags: `qr`, `aa`, `tc`, `rd`, `ra`.
    pub flags: Vec<String>,
    pub answers: Vec<Rr>,
    pub authority: Vec<Rr>,
    pub additional: Vec<Rr>,
    /// The EDNS UDP payload size of the response, when it had an OPT record.
    pub edns_udp: Option<u16>,
    /// dig's own measure of the round trip.
    pub query_time_ms: Option<u64>,
    /// `UDP` or `TCP`, from the `;; SERVER:` line.
    pub transport: String,
    pub output: String,
}

impl Dig {
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// The data of the answers of one type, sorted.
    pub fn data(&self, rtype: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .answers
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.data.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether the authority section holds the SOA of `zone` (as a negative answer must).
    pub fn has_soa(&self, zone: &str) -> bool {
        self.authority
            .iter()
            .any(|r| r.rtype == "SOA" && r.name == zone)
    }
}

/// Parses dig's default output (one query).
pub fn parse_dig(output: &str) -> Dig {
    let mut d = Dig {
        output: output.to_string(),
        ..Dig::default()
    };
    let mut section = "";
    for line in output.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix(";; ->>HEADER<<-") {
            if let Some(s) = rest.split("status: ").nth(1) {
                d.status = s.split(',').next().unwrap_or("").trim().to_string();
            }
        } else if let Some(rest) = line.strip_prefix(";; flags:") {
            let flags = rest.split(';').next().unwrap_or("");
            d.flags = flags.split_whitespace().map(str::to_string).collect();
        } else if let Some(rest) = line.strip_prefix("; EDNS:") {
            d.edns_udp = rest
                .split("udp: ")
                .nth(1)
                .and_then(|s| s.trim().parse().ok());
        } else if let Some(rest) = line.strip_prefix(";; Query time: ") {
            d.query_time_ms = rest.split_whitespace().next().and_then(|s| s.parse().ok());
        } else if let Some(rest) = line.strip_prefix(";; SERVER: ") {
            d.transport = rest
                .rsplit('(')
                .next()
                .unwrap_or("")
                .trim_end_matches(')')
                .to_string();
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if line.is_empty() || line.starts_with(';') {
            section = "";
        } else if !section.is_empty() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 5 {
                continue;
            }
            let rr = Rr {
                name: f[0].to_string(),
                ttl: f[1].parse().unwrap_or(0),
                rtype: f[3].to_string(),
                data: f[4..].join(" "),
            };
            match section {
                "answer" => d.answers.push(rr),
                "authority" => d.authority.push(rr),
                _ => d.additional.push(rr),
            }
        }
    }
    d
}

/// Runs `dig @server ARGS` inside `from` (one try, `+time=3` unless ARGS say otherwise).
pub fn dig(topo: &Topology, from: &Host, server: &str, args: &[&str]) -> Dig {
    let at = format!("@{server}");
    let mut argv = vec!["dig", at.as_str(), "+time=3", "+tries=1"];
    argv.extend_from_slice(args);
    let out = topo.exec_timeout(from, &argv, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut d = parse_dig(&text);
    if d.status.is_empty() {
        d.output.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    d
}

/// One edge node whose DNS listens on the gateway of a pod behind it (`dns.listen`), the
/// cloud already running. [`DnsMesh::start`] starts the node.
pub struct DnsMesh {
    pub mesh: Mesh,
    pub pod: Host,
    /// The node's address on the pod bridge: where the pod sends its queries.
    pub server: String,
}

impl DnsMesh {
    pub fn new(tag: &str) -> DnsMesh {
        let mut mesh = Mesh::new(tag, 1, Vec::new());
        mesh.start_cloud();
        mesh.create_tokens();
        let node = mesh.nodes[0].host.clone();
        // The pod first: its bridge gives the node the address DNS listens on.
        let pod = mesh.topo.add_pod(&node, "pod");
        let o = pod.ip.octets();
        let gateway = Ipv4Addr::new(o[0], o[1], o[2], 1);
        mesh.nodes[0]
            .extra
            .push(format!("dns.listen=\"{gateway}:53\""));
        DnsMesh {
            mesh,
            pod,
            server: gateway.to_string(),
        }
    }

    /// Starts the node and waits until it is synced.
    pub fn start(&mut self) {
        self.mesh.start_node(0);
        self.mesh.wait_synced(0);
    }

    /// `dig` from the pod to the node's DNS.
    pub fn dig(&self, args: &[&str]) -> Dig {
        dig(&self.mesh.topo, &self.pod, &self.server, args)
    }

    /// PUTs a Service or Endpoints manifest; returns the resource version.
    pub fn put_service(&self, name: &str, body: &str) -> u64 {
        self.mesh
            .put(&format!("/api/v1/namespaces/default/services/{name}"), body)
    }

    pub fn put_endpoints(&self, name: &str, body: &str) -> u64 {
        self.mesh.put(
            &format!("/api/v1/namespaces/default/endpoints/{name}"),
            body,
        )
    }

    /// The node's admin `/metrics` text.
    pub fn metrics(&self) -> String {
        let (s, v) = self.mesh.admin(0, "/metrics");
        assert_eq!(s, 200, "/metrics: {v}");
        v.as_str().unwrap_or_default().to_string()
    }

    /// The edgemesh process of the node.
    pub fn node_proc(&self) -> ProcId {
        self.mesh.nodes[0].proc.expect("node running")
    }
}

/// The pod's `/etc/resolv.conf` as `ip netns exec` shows it to programs in the pod
/// (`/etc/netns/<ns>/resolv.conf`): the node's DNS and Kubernetes' search path, as kubelet
/// writes it. Removed on drop (`ip netns del` leaves it behind).
pub struct PodResolvConf {
    dir: PathBuf,
}

impl PodResolvConf {
    pub fn new(pod: &Host, server: &str) -> PodResolvConf {
        let dir = Path::new("/etc/netns").join(&pod.ns);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let text = format!(
            "nameserver {server}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        std::fs::write(dir.join("resolv.conf"), text).expect("resolv.conf");
        PodResolvConf { dir }
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A mesh of nodes in units: node `i` is `edge-i` labelled `location=<locations[i]>`, the
/// nodes reach the cloud but not each other, pods sit behind each node, and each node's DNS
/// listens on its pod bridge, where its pods send their queries (also through resolv.conf).
pub struct UnitMesh {
    pub mesh: Mesh,
    /// Every pod with the index of its node.
    pods: Vec<(Host, usize)>,
    _resolv: Vec<PodResolvConf>,
}

impl UnitMesh {
    /// Starts the cloud and the nodes, `pods[i]` (roles) behind node `i`, and waits until
    /// every node is synced.
    pub fn start(tag: &str, locations: &[&str], pods: &[&[&str]]) -> UnitMesh {
        assert_eq!(locations.len(), pods.len(), "pods for every node");
        let mut mesh = Mesh::new(tag, locations.len(), Vec::new());
        let hosts: Vec<Host> = mesh.nodes.iter().map(|n| n.host.clone()).collect();
        mesh.topo.isolate(&hosts.iter().collect::<Vec<_>>());
        mesh.start_cloud();
        mesh.create_tokens();
        let mut all = Vec::new();
        let mut resolv = Vec::new();
        for (i, roles) in pods.iter().enumerate() {
            assert!(
                !roles.is_empty(),
                "node {i} needs a pod for its DNS address"
            );
            mesh.nodes[i].labels = format!("{{location=\"{}\"}}", locations[i]);
            for role in roles.iter() {
                let pod = mesh.add_pod(i, role);
                all.push((pod, i));
            }
            let server = gateway(&all.last().expect("a pod").0);
            mesh.nodes[i]
                .extra
                .push(format!("dns.listen=\"{server}:53\""));
        }
        for (pod, _) in &all {
            resolv.push(PodResolvConf::new(pod, &gateway(pod).to_string()));
        }
        for i in 0..locations.len() {
            mesh.start_node(i);
        }
        for i in 0..locations.len() {
            mesh.wait_synced(i);
        }
        UnitMesh {
            mesh,
            pods: all,
            _resolv: resolv,
        }
    }

    fn find(&self, role: &str) -> &(Host, usize) {
        self.pods
            .iter()
            .find(|(p, _)| p.role == role)
            .unwrap_or_else(|| panic!("no pod {role}"))
    }

    pub fn pod(&self, role: &str) -> Host {
        self.find(role).0.clone()
    }

    pub fn node_of(&self, role: &str) -> usize {
        self.find(role).1
    }

    /// `dig` from pod `role` to its node's DNS.
    pub fn dig(&self, role: &str, args: &[&str]) -> Dig {
        let pod = &self.find(role).0;
        dig(&self.mesh.topo, pod, &gateway(pod).to_string(), args)
    }

    /// `curl URL` from pod `role`: status (0 when it failed) and body.
    pub fn curl(&self, role: &str, url: &str) -> (u16, String) {
        self.mesh
            .topo
            .curl(&self.find(role).0, &["--max-time", "5", url])
    }

    /// Applies a Service or Endpoints manifest (JSON) and waits until every node has it.
    pub fn apply(&self, json: &str) -> u64 {
        let (s, v) = self.mesh.api("POST", "/api/v1/apply", Some(json));
        assert_eq!(s, 200, "apply: {v}");
        let version = v["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["resourceVersion"].as_str()?.parse::<u64>().ok())
            .max()
            .expect("a version");
        for i in 0..self.mesh.nodes.len() {
            self.mesh.wait_version(i, version, Duration::from_secs(10));
        }
        version
    }

    /// Gives node `i` the label `location=<location>` through the API (as an operator would);
    /// returns the version, without waiting for the nodes.
    pub fn relabel(&self, i: usize, location: &str) -> u64 {
        let node = format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{}","labels":{{"location":"{location}"}}}}}}"#,
            self.mesh.nodes[i].name
        );
        let (s, v) = self.mesh.api("POST", "/api/v1/apply", Some(&node));
        assert_eq!(s, 200, "relabel: {v}");
        v["results"][0]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect("version")
    }
}

/// The node's address on a pod's bridge (`10.244.I.1`): its gateway and DNS server.
fn gateway(pod: &Host) -> Ipv4Addr {
    let o = pod.ip.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 1)
}

/// Sum of a metric's samples whose labels include every `key="value"` in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|kv| l.contains(kv)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A Service with an explicit cluster IP (`None` = headless) and `(name, protocol, port)`s.
pub fn service(name: &str, cluster_ip: &str, ports: &[(&str, &str, u16)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, port)| format!(r#"{{"name":"{n}","protocol":"{p}","port":{port}}}"#))
        .collect();
    format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"clusterIP":"{cluster_ip}","ports":[{}]}}}}"#,
        ports.join(",")
    )
}

/// Endpoints with ready `(ip, hostname)`s, not-ready IPs and `(name, protocol, port)`s.
pub fn endpoints(
    name: &str,
    ready: &[(&str, Option<&str>)],
    not_ready: &[&str],
    ports: &[(&str, &str, u16)],
) -> String {
    let addr = |ip: &str, host: Option<&str>| match host {
        Some(h) => format!(r#"{{"ip":"{ip}","hostname":"{h}","nodeName":"edge-0"}}"#),
        None => format!(r#"{{"ip":"{ip}","nodeName":"edge-0"}}"#),
    };
    let ready: Vec<String> = ready.iter().map(|(ip, h)| addr(ip, *h)).collect();
    let not_ready: Vec<String> = not_ready.iter().map(|ip| addr(ip, None)).collect();
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, port)| format!(r#"{{"name":"{n}","protocol":"{p}","port":{port}}}"#))
        .collect();
    format!(
        r#"{{"apiVersion":"v1","kind":"Endpoints","metadata":{{"name":"{name}","namespace":"default"}},"subsets":[{{"addresses":[{}],"notReadyAddresses":[{}],"ports":[{}]}}]}}"#,
        ready.join(","),
        not_ready.join(","),
        ports.join(",")
    )
}

/// Starts dnsmasq in `host` as an upstream for the zone `domain`: it serves `records`
/// (`(name, ipv4)`, TTL `ttl`) from a hosts file and answers NXDOMAIN for any other name in
/// `domain`. Waits until it answers.
pub fn start_dnsmasq(
    topo: &mut Topology,
    host: &Host,
    domain: &str,
    records: &[(&str, &str)],
    ttl: u32,
) -> ProcId {
    let hosts: String = records
        .iter()
        .map(|(name, ip)| format!("{ip} {name}\n"))
        .collect();
    let file = topo.write_file("upstream.hosts", hosts);
    let args = vec![
        "--keep-in-foreground".to_string(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        format!("--addn-hosts={}", file.display()),
        format!("--listen-address={}", host.ip),
        "--bind-interfaces".into(),
        "--port=53".into(),
        format!("--local=/{domain}/"),
        format!("--local-ttl={ttl}"),
        "--user=root".into(),
        "--group=root".into(),
        "--pid-file=".into(),
        "--log-facility=-".into(),
    ];
    let p = topo.spawn(host, "dnsmasq", Path::new("dnsmasq"), &args, &[]);
    let probe = records.first().map_or("nothing", |r| r.0).to_string();
    let at = host.ip.to_string();
    wait_for("dnsmasq answers", Duration::from_secs(10), || {
        let d = dig(topo, host, &at, &["+time=1", &probe]);
        (d.status == "NOERROR" || d.status == "NXDOMAIN").then_some(())
    });
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dig_output() {
        let text = "\n; <<>> DiG 9.18.49 <<>> @10.244.1.1 hello.default.svc.cluster.local\n;; global options: +cmd\n;; Got answer:\n;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 41517\n;; flags: qr aa rd ra; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 1\n\n;; OPT PSEUDOSECTION:\n; EDNS: version: 0, flags:; udp: 1232\n;; QUESTION SECTION:\n;hello.default.svc.cluster.local. IN\tA\n\n;; ANSWER SECTION:\nhello.default.svc.cluster.local. 5 IN\tA\t10.96.0.10\n\n;; AUTHORITY SECTION:\ncluster.local.\t\t5\tIN\tSOA\tns.dns.cluster.local. hostmaster.cluster.local. 3 7200 1800 86400 5\n\n;; Query time: 3 msec\n;; SERVER: 10.244.1.1#53(10.244.1.1) (UDP)\n";
        let d = parse_dig(text);
        assert_eq!(d.status, "NOERROR");
        assert!(d.has_flag("aa") && !d.has_flag("tc"));
        assert_eq!(d.data("A"), ["10.96.0.10"]);
        assert_eq!(d.answers[0].ttl, 5);
        assert!(d.has_soa("cluster.local."));
        assert_eq!(d.edns_udp, Some(1232));
        assert_eq!(d.query_time_ms, Some(3));
        assert_eq!(d.transport, "UDP");
    }
}
