//! Communities (FabEdge's object): which edge nodes may form direct paths with each other.
//!
//! A node belongs to a Community when its name is one of `spec.members` or its labels match
//! `spec.nodeSelector.matchLabels` (every label given, as a Kubernetes selector; an empty
//! `matchLabels` selects every node). Two nodes may connect directly when they belong to at
//! least one Community together; with `communities.enforce` in the cloud, only they may call
//! each other at all.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::validate::{check_kind, check_meta, is_dns1123_subdomain};
use super::{FieldError, Node, ObjectMeta, CLOUD_NODE};

/// The `apiVersion` of a Community.
pub const COMMUNITY_API_VERSION: &str = "edgemesh.io/v1alpha1";

fn community_api_version() -> String {
    COMMUNITY_API_VERSION.to_string()
}
fn community_kind() -> String {
    "Community".to_string()
}

/// A Kubernetes label selector restricted to `matchLabels` (`matchExpressions` is refused by
/// name rather than ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl LabelSelector {
    /// Whether `labels` carry every label of the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommunitySpec {
    /// Node names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Community {
    #[serde(default = "community_api_version")]
    pub api_version: String,
    #[serde(default = "community_kind")]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: CommunitySpec,
}

impl Community {
    /// Whether the node named `name` with `labels` belongs to this Community.
    pub fn admits(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.spec.members.iter().any(|m| m == name)
            || self
                .spec
                .node_selector
                .as_ref()
                .is_some_and(|s| s.matches(labels))
    }

    fn admits_node(&self, node: &Node) -> bool {
        self.admits(&node.metadata.name, &node.metadata.labels)
    }
}

/// Whether nodes `a` and `b` may form a direct path: they are two nodes and at least one
/// Community admits both (by name, by labels, or one each way).
pub fn may_connect<'a>(
    communities: impl IntoIterator<Item = &'a Community>,
    a: &Node,
    b: &Node,
) -> bool {
    a.metadata.name != b.metadata.name
        && communities
            .into_iter()
            .any(|c| c.admits_node(a) && c.admits_node(b))
}

/// Validates a Community; errors name the field.
pub fn validate_community(c: &Community) -> Result<(), FieldError> {
    if c.api_version != COMMUNITY_API_VERSION {
        return Err(FieldError::new(
            "apiVersion",
            format!(
                "unsupported apiVersion {:?}: expected {COMMUNITY_API_VERSION}",
                c.api_version
            ),
        ));
    }
    check_kind(&c.kind, "Community")?;
    check_meta(&c.metadata, false, false)?;
    let mut seen = HashSet::new();
    for (i, m) in c.spec.members.iter().enumerate() {
        let at = format!("spec.members[{i}]");
        if !is_dns1123_subdomain(m) || m == CLOUD_NODE {
            return Err(FieldError::new(
                at,
                format!("{m:?} is not a node name: a lower-case DNS name, not {CLOUD_NODE:?}"),
            ));
        }
        if !seen.insert(m.as_str()) {
            return Err(FieldError::new(at, format!("{m:?} is listed twice")));
        }
    }
    if let Some(sel) = &c.spec.node_selector {
        super::validate_labels("spec.nodeSelector.matchLabels", &sel.match_labels)?;
    }
    if c.spec.members.is_empty() && c.spec.node_selector.is_none() {
        return Err(FieldError::new(
            "spec",
            "a Community needs members, a nodeSelector, or both",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Object};

    fn parse(json: &str) -> Result<Community, FieldError> {
        match Object::from_json(Kind::Community, json)? {
            Object::Community(c) => validate_community(&c).map(|()| c),
            other => panic!("not a community: {other:?}"),
        }
    }

    fn node(name: &str, labels: &[(&str, &str)]) -> Node {
        Node::new(
            name,
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_community_parses_round_trips_and_its_bad_fields_are_named() {
        let c = parse(
            r#"{"apiVersion":"edgemesh.io/v1alpha1","kind":"Community","metadata":{"name":"factory"},
                "spec":{"members":["edge-1","edge-2"],"nodeSelector":{"matchLabels":{"site":"f1"}}}}"#,
        )
        .expect("valid");
        let again = Object::from_json(Kind::Community, &Object::Community(c.clone()).to_json())
            .expect("round trip");
        assert_eq!(again, Object::Community(c));
        // Defaults: apiVersion and kind may be left out.
        parse(r#"{"metadata":{"name":"m"},"spec":{"members":["a"]}}"#).expect("defaults");
        for (json, field) in [
            (
                r#"{"apiVersion":"v1","metadata":{"name":"x"},"spec":{"members":["a"]}}"#,
                "apiVersion",
            ),
            (
                r#"{"metadata":{"name":"Bad"},"spec":{"members":["a"]}}"#,
                "metadata.name",
            ),
            (
                r#"{"metadata":{"name":"x","namespace":"default"},"spec":{"members":["a"]}}"#,
                "metadata.namespace",
            ),
            (
                r#"{"metadata":{"name":"x"},"spec":{"members":["a","Not_A_Node"]}}"#,
                "spec.members[1]",
            ),
            (
                r#"{"metadata":{"name":"x"},"spec":{"members":["a","cloud"]}}"#,
                "spec.members[1]",
            ),
            (
                r#"{"metadata":{"name":"x"},"spec":{"members":["a","b","a"]}}"#,
                "spec.members[2]",
            ),
            (
                r#"{"metadata":{"name":"x"},"spec":{"nodeSelector":{"matchLabels":{"bad key":"v"}}}}"#,
                "spec.nodeSelector.matchLabels[\"bad key\"]",
            ),
            (
                r#"{"metadata":{"name":"x"},"spec":{"nodeSelector":{"matchExpressions":[]}}}"#,
                "spec.nodeSelector.matchExpressions",
            ),
            (
                r#"{"metadata":{"name":"x"},"spec":{"member":["a"]}}"#,
                "spec.member",
            ),
            (r#"{"metadata":{"name":"x"},"spec":{}}"#, "spec"),
            (r#"{"metadata":{"name":"x"}}"#, "spec"),
        ] {
            let err = parse(json).expect_err(json);
            assert_eq!(err.field, field, "{json}: {err}");
        }
    }

    #[test]
    fn members_by_name_by_labels_or_both() {
        let by_name =
            parse(r#"{"metadata":{"name":"n"},"spec":{"members":["a","b"]}}"#).expect("valid");
        let by_label =
            parse(r#"{"metadata":{"name":"l"},"spec":{"nodeSelector":{"matchLabels":{"site":"f1","rack":"r"}}}}"#)
                .expect("valid");
        let both = parse(
            r#"{"metadata":{"name":"m"},"spec":{"members":["x"],"nodeSelector":{"matchLabels":{"site":"f2"}}}}"#,
        )
        .expect("valid");
        let everyone =
            parse(r#"{"metadata":{"name":"e"},"spec":{"nodeSelector":{"matchLabels":{}}}}"#)
                .expect("valid");
        let a = node("a", &[]);
        let b = node("b", &[("site", "f2")]);
        let c = node("c", &[("site", "f1"), ("rack", "r")]);
        let d = node("d", &[("site", "f1"), ("rack", "r"), ("extra", "1")]);
        let e = node("e", &[("site", "f1")]);
        let x = node("x", &[]);
        let communities = [by_name.clone(), by_label.clone(), both.clone()];
        let ok = |p: &Node, q: &Node| may_connect(&communities, p, q);
        assert!(ok(&a, &b) && ok(&b, &a), "by name");
        assert!(ok(&c, &d), "by labels, extra labels allowed");
        assert!(!ok(&c, &e), "a partial label match is no match");
        assert!(ok(&x, &b), "one by name, one by label");
        assert!(!ok(&a, &c), "in no common community");
        assert!(!ok(&a, &a), "a node and itself");
        assert!(!may_connect(&[], &a, &b), "no community: no direct path");
        assert!(
            may_connect(&[everyone], &a, &e),
            "an empty selector selects every node"
        );
    }
}
