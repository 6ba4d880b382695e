//! Topology preference: how close an endpoint of a Service is to this node.
//!
//! One definition for everything that prefers close endpoints: the proxy picks among the
//! endpoints of the best tier, and cluster DNS answers a headless Service with the endpoints of
//! the best tier, so the two can never disagree about what "close" means.
//!
//! A Service's topology is its `topologyKeys` (node label keys, `*` for any node), or what
//! Kubernetes' `spec.trafficDistribution` stands for (see [`keys_of`]). An endpoint's tier is
//! 0 on this node, `1 + i` when its node shares this node's value of key `i` (the first such
//! key), and `1 + i` for every endpoint at a `*` in position `i`. An endpoint that no key
//! admits is in no tier: it is not used, as Kubernetes' `topologyKeys` drop traffic that
//! matches no key. Without topology every endpoint is admitted: this node's first, then all.

use std::borrow::Cow;
use std::collections::BTreeMap;

use std::sync::Arc;

use crate::model::{Node, Service, ANNOTATION_UNIT_KEY};

/// The Node objects a view holds, by name.
pub type Nodes = BTreeMap<String, Arc<Node>>;

/// Node labels.
pub type Labels = BTreeMap<String, String>;

/// Where an endpoint is, relative to this node. Lower is preferred; 0 is this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tier(pub u8);

impl Tier {
    pub const LOCAL: Tier = Tier(0);
}

/// The topology key that admits every node.
pub const ANY: &str = "*";
/// Kubernetes' zone label: the unit `trafficDistribution` prefers when the Service names no
/// `edgemesh.io/unit-key`.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub use crate::model::TRAFFIC_DISTRIBUTIONS;

/// The topology keys in effect for `service`: its `topologyKeys`; else for
/// `trafficDistribution: PreferClose` (or `PreferSameZone`) this node, then nodes with this
/// node's value of the unit label (the Service's `edgemesh.io/unit-key`, else
/// `topology.kubernetes.io/zone`), then any node; for `PreferSameNode` this node, then any.
/// Empty when the Service has no topology.
pub fn keys_of(service: &Service) -> Cow<'_, [String]> {
    if !service.spec.topology_keys.is_empty() {
        return Cow::Borrowed(&service.spec.topology_keys);
    }
    match service.spec.kept().traffic_distribution.as_deref() {
        Some("PreferClose" | "PreferSameZone") => {
            let unit = service
                .metadata
                .annotations
                .get(ANNOTATION_UNIT_KEY)
                .map_or(ZONE_LABEL, String::as_str);
            Cow::Owned(vec![unit.to_string(), ANY.to_string()])
        }
        Some("PreferSameNode") => Cow::Owned(vec![ANY.to_string()]),
        _ => Cow::Borrowed(&[]),
    }
}

/// This node, as topology sees it.
#[derive(Clone, Copy, Debug)]
pub struct Local<'a> {
    pub name: &'a str,
    pub labels: &'a Labels,
}

impl<'a> Local<'a> {
    /// Node `name` with the labels of its Node object in `view` (what the cloud holds, so a
    /// relabelling through the API takes effect at once), or `configured` before the view
    /// has it (first start without the cloud).
    pub fn in_view(nodes: &'a Nodes, name: &'a str, configured: &'a Labels) -> Local<'a> {
        let labels = nodes.get(name).map_or(configured, |n| &n.metadata.labels);
        Local { name, labels }
    }
}

/// The tier of an endpoint on `endpoint_node` (with that node's `endpoint_labels`, when
/// known) for `local` under `keys`; `None` when no key admits it. An endpoint without a node
/// (reached through the cloud) or on a node the view does not know matches only `*`.
pub fn tier(
    endpoint_node: Option<&str>,
    endpoint_labels: Option<&Labels>,
    local: &Local<'_>,
    keys: &[Box<str>],
) -> Option<Tier> {
    if endpoint_node == Some(local.name) {
        return Some(Tier::LOCAL);
    }
    if keys.is_empty() {
        return Some(Tier(1));
    }
    // Validation allows 16 keys; the bound only keeps the arithmetic obviously in range.
    for (i, key) in keys.iter().enumerate().take(usize::from(u8::MAX) - 1) {
        let tier = Tier(u8::try_from(i + 1).unwrap_or(u8::MAX));
        if &**key == ANY {
            return Some(tier);
        }
        let (Some(mine), Some(theirs)) = (
            local.labels.get(&**key),
            endpoint_labels.and_then(|l| l.get(&**key)),
        ) else {
            continue;
        };
        if mine == theirs {
            return Some(tier);
        }
    }
    None
}

/// [`tier`], with the endpoint node's labels taken from `view`.
pub fn tier_in(
    nodes: &Nodes,
    endpoint_node: Option<&str>,
    local: &Local<'_>,
    keys: &[Box<str>],
) -> Option<Tier> {
    let labels = endpoint_node
        .and_then(|n| nodes.get(n))
        .map(|n| &n.metadata.labels);
    tier(endpoint_node, labels, local, keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Node, Object};
    use crate::view::MeshView;
    use std::sync::Arc;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn keys(k: &[&str]) -> Vec<Box<str>> {
        k.iter().map(|s| Box::from(*s)).collect()
    }

    fn service(spec: &str, annotations: &str) -> Service {
        let json = format!(
            r#"{{"kind":"Service","metadata":{{"name":"s","namespace":"default","annotations":{{{annotations}}}}},"spec":{spec}}}"#
        );
        match Object::from_json(Kind::Service, &json).expect("service") {
            Object::Service(s) => s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn tiers_follow_the_keys_and_only_star_admits_the_rest() {
        let mine = labels(&[("location", "beijing"), ("zone", "z1")]);
        let local = Local {
            name: "a",
            labels: &mine,
        };
        let beijing = labels(&[("location", "beijing"), ("zone", "z9")]);
        let zone = labels(&[("location", "guangzhou"), ("zone", "z1")]);
        let other = labels(&[("location", "guangzhou")]);
        let k = keys(&["location", "zone"]);
        assert_eq!(tier(Some("a"), None, &local, &k), Some(Tier::LOCAL));
        assert_eq!(tier(Some("b"), Some(&beijing), &local, &k), Some(Tier(1)));
        assert_eq!(tier(Some("c"), Some(&zone), &local, &k), Some(Tier(2)));
        assert_eq!(
            tier(Some("d"), Some(&other), &local, &k),
            None,
            "no key admits it"
        );
        assert_eq!(tier(None, None, &local, &k), None, "a cloud endpoint");
        let k = keys(&["location", "*"]);
        assert_eq!(tier(Some("d"), Some(&other), &local, &k), Some(Tier(2)));
        assert_eq!(
            tier(None, None, &local, &k),
            Some(Tier(2)),
            "`*` admits all"
        );
        assert_eq!(
            tier(Some("x"), None, &local, &k),
            Some(Tier(2)),
            "an unknown node"
        );
        // Without topology: this node first, then everything.
        assert_eq!(tier(Some("d"), Some(&other), &local, &[]), Some(Tier(1)));
        assert_eq!(tier(None, None, &local, &[]), Some(Tier(1)));
        // A label this node lacks matches nothing, not even an endpoint that lacks it too.
        let bare = Labels::new();
        let unlabelled = Local {
            name: "a",
            labels: &bare,
        };
        assert_eq!(
            tier(Some("e"), Some(&bare), &unlabelled, &keys(&["location"])),
            None
        );
    }

    #[test]
    fn traffic_distribution_means_this_node_then_the_unit_then_any() {
        let unit = r#""edgemesh.io/unit-key":"location""#;
        for (spec, annotations, want) in [
            (r#""topologyKeys":["location"]"#, "", &["location"][..]),
            (
                r#""trafficDistribution":"PreferClose""#,
                "",
                &[ZONE_LABEL, "*"],
            ),
            (
                r#""trafficDistribution":"PreferClose""#,
                unit,
                &["location", "*"],
            ),
            (
                r#""trafficDistribution":"PreferSameZone""#,
                "",
                &[ZONE_LABEL, "*"],
            ),
            (r#""trafficDistribution":"PreferSameNode""#, "", &["*"]),
            // A unit key alone is no topology.
            ("", unit, &[]),
        ] {
            let comma = if spec.is_empty() { "" } else { "," };
            let s = service(
                &format!(r#"{{"clusterIP":"None"{comma}{spec}}}"#),
                annotations,
            );
            let keys = keys_of(&s);
            let got: Vec<&str> = keys.iter().map(String::as_str).collect();
            assert_eq!(got, want, "{spec} {annotations}");
        }
    }

    #[test]
    fn this_node_takes_its_labels_from_the_view_when_it_is_there() {
        let configured = labels(&[("location", "beijing")]);
        let mut view = MeshView::default();
        assert_eq!(
            Local::in_view(&view.nodes, "a", &configured).labels,
            &configured
        );
        view.nodes.insert(
            "a".into(),
            Arc::new(Node::new("a", labels(&[("location", "guangzhou")]))),
        );
        view.nodes.insert(
            "b".into(),
            Arc::new(Node::new("b", labels(&[("location", "guangzhou")]))),
        );
        let local = Local::in_view(&view.nodes, "a", &configured);
        assert_eq!(local.labels["location"], "guangzhou");
        assert_eq!(
            tier_in(&view.nodes, Some("b"), &local, &keys(&["location"])),
            Some(Tier(1))
        );
    }
}
