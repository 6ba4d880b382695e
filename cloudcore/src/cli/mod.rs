//! `cloudcore apply|get|delete|token`: a kubectl-like client of the REST API.
//!
//! - [`config`]: where server, token and CA certificate come from;
//! - [`manifest`]: reading and checking manifests; [`apply`]: applying them;
//! - [`kinds`]: kind names and aliases; [`table`]: `get`'s tables.

pub mod apply;
pub mod config;
pub mod kinds;
pub mod table;

use std::time::Duration;

use bytes::Bytes;
use edgehub::http_client::{self, HttpClientError};
use hyper::Method;
use serde_json::Value;

pub use apply::apply;
use config::Settings;
use kinds::ResourceKind;

/// An API call that failed, said so that the user knows what to change.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(
        "cannot reach cloudcore at {server} (from {from}): {reason}; set the address with \
         --server, {} or `server` in the client config{hint}",
        config::ENV_SERVER
    )]
    Unreachable {
        server: String,
        from: config::Source,
        reason: String,
        hint: String,
    },
    #[error(
        "the API token was refused by {server} (HTTP 401: {message}); the token came from {from}"
    )]
    Unauthorized {
        server: String,
        message: String,
        from: config::Source,
    },
    #[error("{message}{}", .field.as_ref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Api {
        status: u16,
        message: String,
        field: Option<String>,
    },
    #[error(
        "{server} is https:// and no CA certificate is set: give --ca-cert, {} or `ca_cert` in \
         the client config",
        config::ENV_CA_CERT
    )]
    NeedCa { server: String },
    #[error("{error}{ca_cert}")]
    Client {
        error: HttpClientError,
        ca_cert: String,
    },
}

/// Where the API is and how to authenticate.
pub struct Client {
    settings: Settings,
}

impl Client {
    pub fn new(settings: Settings) -> Client {
        Client { settings }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    #[tracing::instrument(level = "debug", skip(self, body), fields(server = %self.settings.server))]
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Value, CallError> {
        let s = &self.settings;
        let url = format!("{}{path}", s.server);
        let resp = http_client::request(
            method,
            &url,
            Some(&s.token),
            body,
            s.ca_cert.as_deref(),
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| match e {
            HttpClientError::Connect { .. } | HttpClientError::Timeout { .. } => {
                CallError::Unreachable {
                    server: s.server.clone(),
                    from: s.server_source.clone(),
                    reason: e.to_string(),
                    hint: match (&s.config_file, &s.config_path) {
                        (Some(p), _) => format!(" ({} was read)", p.display()),
                        (None, Some(p)) => format!(" ({}, not present)", p.display()),
                        (None, None) => String::new(),
                    },
                }
            }
            HttpClientError::NeedCa => CallError::NeedCa {
                server: s.server.clone(),
            },
            e => CallError::Client {
                error: e,
                ca_cert: match (&s.ca_cert, &s.ca_cert_source) {
                    (Some(p), Some(from)) => {
                        format!(" (CA certificate {} from {from})", p.display())
                    }
                    _ => String::new(),
                },
            },
        })?;
        let value: Value =
            serde_json::from_slice(&resp.body).unwrap_or_else(|_| Value::String(resp.text()));
        if resp.status < 300 {
            return Ok(value);
        }
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| format!("HTTP {}: {}", resp.status, resp.text().trim()));
        if resp.status == 401 {
            return Err(CallError::Unauthorized {
                server: s.server.clone(),
                message,
                from: s.token_source.clone(),
            });
        }
        Err(CallError::Api {
            status: resp.status,
            message,
            field: value.get("field").and_then(Value::as_str).map(String::from),
        })
    }
}

/// How `get` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

/// Which namespaces `get` lists.
pub enum Scope<'a> {
    Namespace(&'a str),
    All,
}

/// `kind`, `kind NAME` or `kind/NAME`.
pub fn kind_and_name(
    kind: &str,
    name: Option<&str>,
) -> anyhow::Result<(ResourceKind, Option<String>)> {
    match kind.split_once('/') {
        Some((k, n)) if name.is_none() && !n.is_empty() => {
            Ok((ResourceKind::parse(k)?, Some(n.to_string())))
        }
        Some(_) => anyhow::bail!("give either KIND/NAME or KIND NAME, not both"),
        None => Ok((ResourceKind::parse(kind)?, name.map(String::from))),
    }
}

pub async fn get(
    client: &Client,
    kind: ResourceKind,
    name: Option<&str>,
    scope: Scope<'_>,
    output: Output,
) -> anyhow::Result<()> {
    let (items, single) = match name {
        Some(n) => (vec![kind.fetch_one(client, n, &scope).await?], true),
        None => (kind.fetch_all(client, &scope).await?, false),
    };
    let shown = if single {
        items.into_iter().next().unwrap_or(Value::Null)
    } else {
        serde_json::json!({"apiVersion": "v1", "kind": kind.list_kind(), "items": items})
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&shown)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(&shown)?),
        Output::Table | Output::Wide => {
            let items = match &shown {
                Value::Object(o) if !single => o
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                v => vec![v.clone()],
            };
            if items.is_empty() {
                match (&scope, kind.namespaced()) {
                    (Scope::Namespace(ns), true) => {
                        eprintln!("No resources found in {ns} namespace.")
                    }
                    _ => eprintln!("No resources found."),
                }
                return Ok(());
            }
            let all = matches!(scope, Scope::All) && kind.namespaced();
            print!(
                "{}",
                table::render(kind, &items, output == Output::Wide, all)
            );
        }
    }
    Ok(())
}

pub async fn delete(
    client: &Client,
    kind: ResourceKind,
    name: &str,
    namespace: &str,
) -> anyhow::Result<()> {
    let path = kind.object_path(client, name, namespace).await?;
    client.call(Method::DELETE, &path, None).await?;
    println!("{}/{name} deleted", kind.singular());
    Ok(())
}

pub async fn token_create(client: &Client, node: &str) -> anyhow::Result<()> {
    let v = client
        .call(Method::POST, &format!("/api/v1/nodes/{node}/token"), None)
        .await?;
    match v["token"].as_str() {
        Some(t) => println!("{t}"),
        None => anyhow::bail!("the answer has no token: {v}"),
    }
    Ok(())
}

pub async fn token_revoke(client: &Client, node: &str) -> anyhow::Result<()> {
    client
        .call(Method::DELETE, &format!("/api/v1/nodes/{node}/token"), None)
        .await?;
    println!("token of node {node} revoked");
    Ok(())
}
