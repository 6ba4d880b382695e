//! The kinds `get` and `delete` know, their aliases (as kubectl's) and their API paths. Router
//! records are addressed by id in the API; the CLI finds them by name (or id).

use hyper::Method;
use serde_json::Value;

use super::{Client, Scope};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceKind {
    Service,
    Endpoints,
    Node,
    Community,
    Rule,
    RuleEndpoint,
}

#[derive(Debug, thiserror::Error)]
pub enum KindError {
    #[error(
        "unknown kind {0:?}: expected services (svc), endpoints (ep), nodes (no), communities \
         (comm), rules (rule) or ruleendpoints (re)"
    )]
    Unknown(String),
    #[error("an object cannot be fetched by name across all namespaces: give -n NAMESPACE")]
    AllNamespacesByName,
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
}

impl ResourceKind {
    pub fn parse(s: &str) -> Result<ResourceKind, KindError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "services" | "service" | "svc" => ResourceKind::Service,
            "endpoints" | "endpoint" | "ep" => ResourceKind::Endpoints,
            "nodes" | "node" | "no" => ResourceKind::Node,
            "communities" | "community" | "comm" => ResourceKind::Community,
            "rules" | "rule" => ResourceKind::Rule,
            "ruleendpoints" | "ruleendpoint" | "re" | "rule-endpoints" | "rule-endpoint" => {
                ResourceKind::RuleEndpoint
            }
            _ => return Err(KindError::Unknown(s.to_string())),
        })
    }

    /// As in `kind/name` lines (`service/hello created`).
    pub fn singular(self) -> &'static str {
        match self {
            ResourceKind::Service => "service",
            ResourceKind::Endpoints => "endpoints",
            ResourceKind::Node => "node",
            ResourceKind::Community => "community",
            ResourceKind::Rule => "rule",
            ResourceKind::RuleEndpoint => "ruleendpoint",
        }
    }

    pub fn list_kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "ServiceList",
            ResourceKind::Endpoints => "EndpointsList",
            ResourceKind::Node => "NodeList",
            ResourceKind::Community => "CommunityList",
            ResourceKind::Rule => "RuleList",
            ResourceKind::RuleEndpoint => "RuleEndpointList",
        }
    }

    pub fn namespaced(self) -> bool {
        matches!(self, ResourceKind::Service | ResourceKind::Endpoints)
    }

    fn plural(self) -> &'static str {
        match self {
            ResourceKind::Service => "services",
            ResourceKind::Endpoints => "endpoints",
            ResourceKind::Node => "nodes",
            ResourceKind::Community => "communities",
            ResourceKind::Rule => "router/rules",
            ResourceKind::RuleEndpoint => "router/endpoints",
        }
    }

    fn router(self) -> bool {
        matches!(self, ResourceKind::Rule | ResourceKind::RuleEndpoint)
    }

    pub async fn fetch_all(self, client: &Client, scope: &Scope<'_>) -> anyhow::Result<Vec<Value>> {
        let path = match (self.namespaced(), scope) {
            (true, Scope::Namespace(ns)) => format!("/api/v1/namespaces/{ns}/{}", self.plural()),
            _ => format!("/api/v1/{}", self.plural()),
        };
        let mut v = client.call(Method::GET, &path, None).await?;
        let mut items = match v.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => items,
            _ => anyhow::bail!("GET {path}: the answer has no items list"),
        };
        if self.router() {
            items.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        }
        Ok(items)
    }

    /// One object by name (router records: by name, else by id).
    pub async fn fetch_one(
        self,
        client: &Client,
        name: &str,
        scope: &Scope<'_>,
    ) -> anyhow::Result<Value> {
        if self.router() {
            return self.find_router(client, name).await;
        }
        let ns = match scope {
            Scope::Namespace(ns) => ns,
            Scope::All if self.namespaced() => return Err(KindError::AllNamespacesByName.into()),
            Scope::All => "",
        };
        let path = self.object_path(client, name, ns).await?;
        Ok(client.call(Method::GET, &path, None).await?)
    }

    async fn find_router(self, client: &Client, name: &str) -> anyhow::Result<Value> {
        let items = self.fetch_all(client, &Scope::All).await?;
        let by = |key: &str| {
            items
                .iter()
                .find(|i| i[key].as_str() == Some(name))
                .cloned()
        };
        Ok(by("name").or_else(|| by("id")).ok_or(KindError::NotFound {
            kind: self.singular(),
            name: name.to_string(),
        })?)
    }

    /// The API path of one object.
    pub async fn object_path(
        self,
        client: &Client,
        name: &str,
        namespace: &str,
    ) -> anyhow::Result<String> {
        Ok(match self {
            ResourceKind::Service | ResourceKind::Endpoints => {
                format!("/api/v1/namespaces/{namespace}/{}/{name}", self.plural())
            }
            ResourceKind::Node | ResourceKind::Community => {
                format!("/api/v1/{}/{name}", self.plural())
            }
            ResourceKind::Rule | ResourceKind::RuleEndpoint => {
                let record = self.find_router(client, name).await?;
                let id = record["id"].as_str().unwrap_or_default();
                format!("/api/v1/{}/{id}", self.plural())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_unknown_kinds() {
        for (s, k) in [
            ("svc", ResourceKind::Service),
            ("Services", ResourceKind::Service),
            ("ep", ResourceKind::Endpoints),
            ("no", ResourceKind::Node),
            ("comm", ResourceKind::Community),
            ("Communities", ResourceKind::Community),
            ("rule", ResourceKind::Rule),
            ("re", ResourceKind::RuleEndpoint),
            ("ruleendpoints", ResourceKind::RuleEndpoint),
        ] {
            assert_eq!(ResourceKind::parse(s).expect(s), k);
        }
        let e = ResourceKind::parse("pods")
            .expect_err("unknown")
            .to_string();
        assert!(
            e.contains("\"pods\"") && e.contains("ruleendpoints (re)"),
            "{e}"
        );
    }
}
