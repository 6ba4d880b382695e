//! `cloudcore apply`: checks every document first, then applies.
//!
//! Order and guarantees:
//! 1. every document is parsed and checked locally (shape, field types, router fields, the
//!    endpoints each rule names); any error → nothing is sent. Documents of kinds cloudcore
//!    does not serve (a Deployment, a ServiceAccount: real manifests mix them in) are set
//!    aside and listed at the end, and the exit status says so ([`Report`]); with `--strict`
//!    any such document refuses the whole apply, before anything is sent;
//! 2. Nodes, Services, Endpoints (in that order) go in one `POST /api/v1/apply`, which the
//!    server applies all or nothing (it checks values, e.g. cluster IPs, again);
//! 3. then rule endpoints, then rules, one call each. The router has no update: a changed
//!    record is deleted and created again (new id, counters from zero). A failure here (a
//!    clash with a record not in the manifest) stops the apply; what was applied before it
//!    has been printed.

use bytes::Bytes;
use edgehub::model::FieldError;
use hyper::Method;
use serde_json::{Map, Value};

use super::kinds::ResourceKind;
use super::{CallError, Client, Scope};
use crate::manifest::{self, Doc, Manifest, ManifestError, Origin, Skipped};
use crate::router::model::{self, Rule, RuleEndpoint};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{origin} ({label}): {error}")]
    Rejected {
        origin: Origin,
        label: String,
        error: Box<CallError>,
    },
    #[error("{0}")]
    Call(#[from] CallError),
    #[error("{origin} ({label}): {message}")]
    Conflict {
        origin: Origin,
        label: String,
        message: String,
    },
    #[error("reading the router's records: {0}")]
    BadAnswer(String),
    #[error("--strict: nothing applied, because cloudcore does not serve {}:\n{}", plural(.0.len()), .0.iter().map(|(o, s)| format!("  {o}: {}", s.resource)).collect::<Vec<_>>().join("\n"))]
    Strict(Vec<(Origin, Skipped)>),
}

fn plural(n: usize) -> String {
    if n == 1 {
        "1 document".into()
    } else {
        format!("{n} documents")
    }
}

/// What an apply did besides what it printed.
#[derive(Debug, Default)]
pub struct Report {
    /// Documents of kinds cloudcore does not serve, listed and not applied.
    pub skipped: usize,
    pub documents: usize,
}

/// What to do with one router record.
enum Step {
    Unchanged,
    Create,
    /// Delete the record with this id, then create.
    Replace(String),
}

fn step_word(step: &Step) -> &'static str {
    match step {
        Step::Unchanged => "unchanged",
        Step::Create => "created",
        Step::Replace(_) => "configured",
    }
}

pub async fn apply(
    client: &Client,
    files: &[String],
    recursive: bool,
    strict: bool,
) -> anyhow::Result<Report> {
    let docs = manifest::load(files, recursive)?;
    if docs.is_empty() {
        anyhow::bail!("no objects in {}", files.join(", "));
    }
    Ok(apply_docs(client, docs, strict).await?)
}

#[tracing::instrument(level = "debug", skip_all, fields(documents = docs.len()))]
async fn apply_docs(
    client: &Client,
    docs: Vec<Manifest>,
    strict: bool,
) -> Result<Report, ApplyError> {
    let report = Report {
        documents: docs.len(),
        ..Report::default()
    };
    let (skipped, docs): (Vec<Manifest>, Vec<Manifest>) = docs
        .into_iter()
        .partition(|m| matches!(m.doc, Doc::Skipped(_)));
    let skipped: Vec<(Origin, Skipped)> = skipped
        .into_iter()
        .filter_map(|m| match m.doc {
            Doc::Skipped(s) => Some((m.origin, s)),
            _ => None,
        })
        .collect();
    if strict && !skipped.is_empty() {
        return Err(ApplyError::Strict(skipped));
    }
    let mut objects = Vec::new();
    let mut endpoints = Vec::new();
    let mut rules = Vec::new();
    for m in docs {
        match &m.doc {
            Doc::Object { kind, .. } => {
                let rank = match kind {
                    edgehub::model::Kind::Node => 0,
                    edgehub::model::Kind::Service => 1,
                    edgehub::model::Kind::Endpoints => 2,
                    edgehub::model::Kind::Community => 3,
                };
                objects.push((rank, m));
            }
            Doc::RuleEndpoint { .. } => endpoints.push(m),
            Doc::Rule { .. } => rules.push(m),
            Doc::Skipped(_) => {}
        }
    }
    // Stable: documents of one kind keep the order they were written in.
    objects.sort_by_key(|(rank, _)| *rank);
    let objects: Vec<Manifest> = objects.into_iter().map(|(_, m)| m).collect();
    duplicates(&endpoints)?;
    duplicates(&rules)?;

    let plan = if endpoints.is_empty() && rules.is_empty() {
        None
    } else {
        Some(plan_router(client, &endpoints, &rules).await?)
    };

    if !objects.is_empty() {
        apply_objects(client, &objects).await?;
    }
    if let Some((endpoint_steps, rule_steps)) = plan {
        for (m, step) in endpoints.iter().zip(endpoint_steps) {
            let Doc::RuleEndpoint { body, record } = &m.doc else {
                continue;
            };
            run_step(client, m, &step, "router/endpoints", body).await?;
            println!("ruleendpoint/{} {}", record.name, step_word(&step));
        }
        for (m, step) in rules.iter().zip(rule_steps) {
            let Doc::Rule { name, body } = &m.doc else {
                continue;
            };
            run_step(client, m, &step, "router/rules", body).await?;
            println!("rule/{name} {}", step_word(&step));
        }
    }
    for (_, s) in &skipped {
        println!("{s}");
    }
    Ok(Report {
        skipped: skipped.len(),
        ..report
    })
}

/// Two documents for one router name would fight; refuse before anything is sent.
fn duplicates(docs: &[Manifest]) -> Result<(), ApplyError> {
    let name = |m: &Manifest| match &m.doc {
        Doc::RuleEndpoint { record, .. } => record.name.clone(),
        Doc::Rule { name, .. } => name.clone(),
        Doc::Object { .. } | Doc::Skipped(_) => String::new(),
    };
    for (i, m) in docs.iter().enumerate() {
        if let Some(first) = docs[..i].iter().find(|o| name(o) == name(m)) {
            return Err(ApplyError::Conflict {
                origin: m.origin.clone(),
                label: m.label.clone(),
                message: format!("the same name as {} ({})", first.origin, first.label),
            });
        }
    }
    Ok(())
}

async fn apply_objects(client: &Client, objects: &[Manifest]) -> Result<(), ApplyError> {
    let values: Vec<&Value> = objects
        .iter()
        .filter_map(|m| match &m.doc {
            Doc::Object { value, .. } => Some(value),
            _ => None,
        })
        .collect();
    let body = Bytes::from(serde_json::to_vec(&values).unwrap_or_default());
    let result = match client.call(Method::POST, "/api/v1/apply", Some(body)).await {
        Ok(r) => r,
        Err(CallError::Api {
            status,
            message,
            field,
        }) => return Err(blame(objects, status, message, field)),
        Err(e) => return Err(e.into()),
    };
    for r in result["results"].as_array().into_iter().flatten() {
        let kind = r["kind"].as_str().unwrap_or("?").to_lowercase();
        println!(
            "{kind}/{} {}",
            r["name"].as_str().unwrap_or("?"),
            r["action"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// The server names a failing document as `document N (...)`, counting from 1 in the request
/// (a JSON array of the manifests' objects); say which file and document that is.
fn blame(objects: &[Manifest], status: u16, message: String, field: Option<String>) -> ApplyError {
    let index = match message.strip_prefix("document ").and_then(|rest| {
        let (n, tail) = rest.split_once(' ')?;
        let tail = tail.split_once("): ").map(|(_, t)| t).unwrap_or(tail);
        Some((n.parse::<usize>().ok()?.checked_sub(1)?, tail))
    }) {
        Some(found) => Some(found),
        None if objects.len() == 1 => Some((0, message.as_str())),
        None => None,
    };
    match index.and_then(|(i, tail)| Some((objects.get(i)?, tail))) {
        Some((m, tail)) => match field {
            Some(field) => ApplyError::Manifest(ManifestError::field(
                &m.origin,
                &m.label,
                FieldError::new(field, tail),
            )),
            None => ApplyError::Rejected {
                origin: m.origin.clone(),
                label: m.label.clone(),
                error: Box::new(CallError::Api {
                    status,
                    message: tail.to_string(),
                    field: None,
                }),
            },
        },
        None => ApplyError::Call(CallError::Api {
            status,
            message,
            field,
        }),
    }
}

async fn router_list<T: serde::de::DeserializeOwned>(
    client: &Client,
    kind: ResourceKind,
) -> Result<Vec<T>, ApplyError> {
    let items =
        kind.fetch_all(client, &Scope::All)
            .await
            .map_err(|e| match e.downcast::<CallError>() {
                Ok(call) => ApplyError::Call(call),
                Err(e) => ApplyError::BadAnswer(e.to_string()),
            })?;
    items
        .into_iter()
        .map(|v| serde_json::from_value(v).map_err(|e| ApplyError::BadAnswer(e.to_string())))
        .collect()
}

/// Decides create / unchanged / replace for every router document, checking each rule against
/// the endpoints it names (in the manifest, else on the server). Sends nothing.
async fn plan_router(
    client: &Client,
    endpoints: &[Manifest],
    rules: &[Manifest],
) -> Result<(Vec<Step>, Vec<Step>), ApplyError> {
    let stored_endpoints: Vec<RuleEndpoint> =
        router_list(client, ResourceKind::RuleEndpoint).await?;
    let stored_rules: Vec<Rule> = router_list(client, ResourceKind::Rule).await?;

    let mut endpoint_steps = Vec::new();
    for m in endpoints {
        let Doc::RuleEndpoint { record, .. } = &m.doc else {
            continue;
        };
        let step = match stored_endpoints.iter().find(|e| e.name == record.name) {
            None => Step::Create,
            Some(old) if same_endpoint(old, record) => Step::Unchanged,
            Some(old) => {
                let users: Vec<&str> = stored_rules
                    .iter()
                    .filter(|r| r.source == old.name || r.target == old.name)
                    .map(|r| r.name.as_str())
                    .collect();
                if !users.is_empty() {
                    return Err(ApplyError::Conflict {
                        origin: m.origin.clone(),
                        label: m.label.clone(),
                        message: format!(
                            "differs from the stored rule endpoint, which rules {} use; rule \
                             endpoints cannot be changed in place: delete those rules first \
                             (cloudcore delete rule NAME)",
                            users.join(", ")
                        ),
                    });
                }
                Step::Replace(old.id.clone())
            }
        };
        endpoint_steps.push(step);
    }

    let find_endpoint = |name: &str| -> Option<RuleEndpoint> {
        endpoints
            .iter()
            .find_map(|m| match &m.doc {
                Doc::RuleEndpoint { record, .. } if record.name == name => Some(record.clone()),
                _ => None,
            })
            .or_else(|| stored_endpoints.iter().find(|e| e.name == name).cloned())
    };
    let mut rule_steps = Vec::new();
    for m in rules {
        let Doc::Rule { body, .. } = &m.doc else {
            continue;
        };
        let invalid = |e| ApplyError::Manifest(ManifestError::field(&m.origin, &m.label, e));
        let draft = model::rule_draft(body.clone()).map_err(invalid)?;
        let endpoint = |field: &str, name: &str| {
            find_endpoint(name).ok_or_else(|| {
                invalid(FieldError::new(
                    field,
                    format!("no rule endpoint named {name:?} in the manifest or on the server"),
                ))
            })
        };
        let source = endpoint("source", draft.source())?;
        let target = endpoint("target", draft.target())?;
        let (rule, _) = draft
            .finish(&source, &target, String::new(), &model::now())
            .map_err(invalid)?;
        let step = match stored_rules.iter().find(|r| r.name == rule.name) {
            None => Step::Create,
            Some(old) if same_rule(old, &rule) && !replaced(&endpoint_steps, endpoints, old) => {
                Step::Unchanged
            }
            Some(old) => Step::Replace(old.id.clone()),
        };
        rule_steps.push(step);
    }
    Ok((endpoint_steps, rule_steps))
}

/// Whether an endpoint the rule uses is being replaced (then the rule was checked against
/// the new one and must be made again).
fn replaced(steps: &[Step], endpoints: &[Manifest], rule: &Rule) -> bool {
    steps.iter().zip(endpoints).any(|(step, m)| {
        matches!(step, Step::Replace(_))
            && matches!(&m.doc, Doc::RuleEndpoint { record, .. }
                if record.name == rule.source || record.name == rule.target)
    })
}

fn same_endpoint(a: &RuleEndpoint, b: &RuleEndpoint) -> bool {
    a.kind == b.kind
        && a.project_id == b.project_id
        && a.is_shared == b.is_shared
        && a.properties == b.properties
}

fn same_rule(a: &Rule, b: &Rule) -> bool {
    a.project_id == b.project_id
        && a.domain_id == b.domain_id
        && a.source == b.source
        && a.target == b.target
        && a.source_resource == b.source_resource
        && a.target_resource == b.target_resource
}

async fn run_step(
    client: &Client,
    m: &Manifest,
    step: &Step,
    plural: &str,
    body: &Map<String, Value>,
) -> Result<(), ApplyError> {
    let rejected = |error| ApplyError::Rejected {
        origin: m.origin.clone(),
        label: m.label.clone(),
        error: Box::new(error),
    };
    match step {
        Step::Unchanged => return Ok(()),
        Step::Create => {}
        Step::Replace(id) => {
            client
                .call(Method::DELETE, &format!("/api/v1/{plural}/{id}"), None)
                .await
                .map_err(rejected)?;
        }
    }
    let bytes = Bytes::from(Value::Object(body.clone()).to_string());
    client
        .call(Method::POST, &format!("/api/v1/{plural}"), Some(bytes))
        .await
        .map_err(rejected)?;
    Ok(())
}
