//! `cloudcore apply|get|delete|token`: a small kubectl-like client of the REST API.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use edgehub::http_client::{self, Response};
use hyper::Method;
use serde_json::Value;

/// Where the API is and how to authenticate.
pub struct Client {
    pub server: String,
    pub token: String,
    pub ca_cert: Option<PathBuf>,
}

impl Client {
    /// The token comes from the flag or `CLOUDCORE_TOKEN`, else from `<data_dir>/api-token`
    /// (so on the cloud host itself no flag is needed).
    pub fn new(
        server: String,
        token: Option<String>,
        ca_cert: Option<PathBuf>,
        data_dir: &Path,
    ) -> anyhow::Result<Self> {
        let token = match token {
            Some(t) => t,
            None => {
                let path = data_dir.join(crate::auth::API_TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_string())
                    .with_context(|| {
                        format!("no --token given and cannot read {}", path.display())
                    })?
            }
        };
        Ok(Client {
            server: server.trim_end_matches('/').to_string(),
            token,
            ca_cert,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<Response> {
        let url = format!("{}{path}", self.server);
        Ok(http_client::request(
            method,
            &url,
            Some(&self.token),
            body,
            self.ca_cert.as_deref(),
            Duration::from_secs(30),
        )
        .await?)
    }

    async fn json(&self, method: Method, path: &str, body: Option<Bytes>) -> anyhow::Result<Value> {
        let resp = self.call(method, path, body).await?;
        let value: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::String(resp.text()));
        if resp.status >= 300 {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed");
            match value.get("field").and_then(Value::as_str) {
                Some(f) => bail!("HTTP {}: {msg} (field {f})", resp.status),
                None => bail!("HTTP {}: {msg}", resp.status),
            }
        }
        Ok(value)
    }
}

/// Reads a manifest file (or stdin for `-`) and applies it; YAML unless it looks like JSON.
pub async fn apply(client: &Client, file: &str) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = Vec::new();
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        let path = Path::new(file);
        if path.is_dir() {
            for entry in std::fs::read_dir(path).with_context(|| format!("reading {file}"))? {
                let p = entry?.path();
                if matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                ) {
                    files.push(p);
                }
            }
            files.sort();
            String::new()
        } else {
            std::fs::read_to_string(path).with_context(|| format!("reading {file}"))?
        }
    };
    let inputs: Vec<(String, String)> = if files.is_empty() {
        vec![(file.to_string(), text)]
    } else {
        files
            .iter()
            .map(|p| Ok((p.display().to_string(), std::fs::read_to_string(p)?)))
            .collect::<std::io::Result<_>>()?
    };
    // One request with every document: the API applies all of them or none.
    let mut docs = Vec::new();
    for (name, text) in &inputs {
        let trimmed = text.trim_start();
        let parsed = if trimmed.starts_with('{') || trimmed.starts_with('[') {
            crate::api::documents(text.as_bytes(), false)
        } else {
            crate::api::documents(text.as_bytes(), true)
        };
        match parsed {
            Ok(d) => docs.extend(d),
            Err(e) => bail!("{name}: {e}"),
        }
    }
    let body = serde_json::to_vec(&docs)?;
    let result = client
        .json(Method::POST, "/api/v1/apply", Some(body.into()))
        .await?;
    for r in result["results"].as_array().into_iter().flatten() {
        let kind = r["kind"].as_str().unwrap_or("?").to_lowercase();
        let name = match r["namespace"].as_str() {
            Some(ns) => format!("{ns}/{}", r["name"].as_str().unwrap_or("?")),
            None => r["name"].as_str().unwrap_or("?").to_string(),
        };
        println!("{kind}/{name} {}", r["action"].as_str().unwrap_or("?"));
    }
    Ok(())
}

fn kind_path(kind: &str) -> anyhow::Result<(&'static str, bool)> {
    Ok(match kind {
        "services" | "service" | "svc" => ("services", true),
        "endpoints" | "ep" => ("endpoints", true),
        "nodes" | "node" | "no" => ("nodes", false),
        other => bail!("unknown kind {other:?}: expected services, endpoints or nodes"),
    })
}

pub async fn get(
    client: &Client,
    kind: &str,
    name: Option<&str>,
    namespace: &str,
    output: &str,
) -> anyhow::Result<()> {
    let (plural, namespaced) = kind_path(kind)?;
    let path = match (name, namespaced) {
        (Some(n), true) => format!("/api/v1/namespaces/{namespace}/{plural}/{n}"),
        (Some(n), false) => format!("/api/v1/{plural}/{n}"),
        (None, _) => format!("/api/v1/{plural}"),
    };
    let value = client.json(Method::GET, &path, None).await?;
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&value)?),
        "yaml" => print!("{}", serde_yaml_ng::to_string(&value)?),
        "table" | "wide" => {
            let items = match value.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => vec![value],
            };
            print_table(plural, &items, output == "wide");
        }
        other => bail!("unknown output format {other:?}: expected table, wide, json or yaml"),
    }
    Ok(())
}

fn print_table(plural: &str, items: &[Value], wide: bool) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let mut rows: Vec<Vec<String>> = Vec::new();
    match plural {
        "services" => {
            rows.push(
                vec!["NAMESPACE", "NAME", "CLUSTER-IP", "PORTS", "VERSION"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
            );
            for i in items {
                let ports: Vec<String> = i["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
                    .collect();
                rows.push(vec![
                    s(&i["metadata"]["namespace"]),
                    s(&i["metadata"]["name"]),
                    s(&i["spec"]["clusterIP"]),
                    ports.join(","),
                    s(&i["metadata"]["resourceVersion"]),
                ]);
            }
        }
        "endpoints" => {
            rows.push(
                vec!["NAMESPACE", "NAME", "ENDPOINTS", "VERSION"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
            );
            for i in items {
                let mut eps = Vec::new();
                for subset in i["subsets"].as_array().into_iter().flatten() {
                    for a in subset["addresses"].as_array().into_iter().flatten() {
                        for p in subset["ports"].as_array().into_iter().flatten() {
                            let node = a["nodeName"]
                                .as_str()
                                .map(|n| format!("@{n}"))
                                .filter(|_| wide)
                                .unwrap_or_default();
                            eps.push(format!("{}:{}{node}", s(&a["ip"]), p["port"]));
                        }
                    }
                }
                rows.push(vec![
                    s(&i["metadata"]["namespace"]),
                    s(&i["metadata"]["name"]),
                    eps.join(","),
                    s(&i["metadata"]["resourceVersion"]),
                ]);
            }
        }
        _ => {
            let mut head = vec!["NAME", "STATUS", "ACKED", "LAST-SYNC"];
            if wide {
                head.extend(["ADDRESS", "LABELS"]);
            }
            rows.push(head.into_iter().map(String::from).collect());
            for i in items {
                let st = &i["status"];
                let mut row = vec![
                    s(&i["metadata"]["name"]),
                    if st["online"].as_bool() == Some(true) {
                        "Online".into()
                    } else {
                        "Offline".into()
                    },
                    st["ackedVersion"].to_string(),
                    s(&st["lastSync"]),
                ];
                if wide {
                    row.push(s(&st["address"]));
                    let labels: Vec<String> = i["metadata"]["labels"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect();
                    row.push(labels.join(","));
                }
                rows.push(row);
            }
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

pub async fn delete(
    client: &Client,
    kind: &str,
    name: &str,
    namespace: &str,
) -> anyhow::Result<()> {
    let (plural, namespaced) = kind_path(kind)?;
    let path = if namespaced {
        format!("/api/v1/namespaces/{namespace}/{plural}/{name}")
    } else {
        format!("/api/v1/{plural}/{name}")
    };
    client.json(Method::DELETE, &path, None).await?;
    println!("{}/{name} deleted", plural.trim_end_matches('s'));
    Ok(())
}

pub async fn token_create(client: &Client, node: &str) -> anyhow::Result<()> {
    let v = client
        .json(Method::POST, &format!("/api/v1/nodes/{node}/token"), None)
        .await?;
    println!("{}", v["token"].as_str().unwrap_or_default());
    Ok(())
}

pub async fn token_revoke(client: &Client, node: &str) -> anyhow::Result<()> {
    client
        .json(Method::DELETE, &format!("/api/v1/nodes/{node}/token"), None)
        .await?;
    println!("token of node {node} revoked");
    Ok(())
}
