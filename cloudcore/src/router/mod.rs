//! The cloud router (SPEC §6): rules that move HTTP requests between cloud REST services and
//! Services of the mesh, with per-rule QPS limits and counters.
//!
//! - `rest` → `service`: a request to the router ingress (`router.listen`) whose path falls
//!   under a rule's `source_resource.path` is sent to an endpoint of the edge Service in
//!   `target_resource`, through the data path nodes use ([`DataPath`]: route table,
//!   balancer, pooled HTTP connections, retries), over streams on the nodes' links
//!   ([`ingress`]).
//! - `service` → `rest`: the rule owns a virtual Service (with Endpoints that have no
//!   `nodeName`, so edge nodes send its traffic to cloudcore); cloudcore hands each such stream
//!   to [`Router::serve_edge_stream`], which sends the requests to `target_resource.url`
//!   ([`egress`]).
//!
//! Rule endpoints and rules are kept in the store's router table (never synced to nodes) and
//! mirrored in memory; every change goes through one lock so checks and the store agree.

mod datapath;
mod egress;
mod forward;
mod ingress;
mod limit;
pub mod model;
mod paths;
mod stats;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use edgehub::model::{FieldError, Kind, Object, ObjectKey, ANNOTATION_PROTOCOL};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tracing::{error, info, warn};

use crate::config::RouterConfig;
use crate::objects::{ApplyError, Objects};
use crate::store::{RouterKind, StoreError};

pub use datapath::DataPath;

/// An opener with no links, for tests that never route.
#[cfg(test)]
pub(crate) struct NoLinks;

#[cfg(test)]
impl edgehub::connect::Opener for NoLinks {
    fn open(
        &self,
        _request: edgehub::tunnel::OpenRequest,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<edgehub::connect::Upstream, edgehub::tunnel::OpenError>,
                > + Send
                + '_,
        >,
    > {
        Box::pin(async { Err(edgehub::tunnel::OpenError::LinkDown) })
    }
}
use limit::Limiter;
use model::{RateSpec, Route, Rule, RuleEndpoint, ANNOTATION_RULE};
use paths::PathIndex;
use stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Bad input: 422 naming the field.
    #[error("{0}")]
    Invalid(FieldError),
    /// Clashes with what exists: 409 (the field may be empty).
    #[error("{}", .0.message)]
    Conflict(FieldError),
    #[error("{0} not found")]
    NotFound(String),
    /// A configuration problem of this cloudcore, named by its key: 500.
    #[error("{0}")]
    Misconfigured(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// One rule as the data path uses it.
pub(crate) struct LiveRule {
    /// The stored record; its counters are in `stats`.
    record: Rule,
    route: Route,
    limiter: Option<Limiter>,
    stats: Stats,
}

impl LiveRule {
    fn new(mut record: Rule, route: Route, rate: Option<RateSpec>) -> Self {
        let errors = std::mem::take(&mut record.errors);
        let stats = Stats::restore(record.success_messages, record.fail_messages, errors);
        record.success_messages = 0;
        record.fail_messages = 0;
        LiveRule {
            record,
            route,
            limiter: rate.map(Limiter::new),
            stats,
        }
    }

    /// The record with its live counters.
    fn view(&self) -> Rule {
        let mut rule = self.record.clone();
        let (success, fail, errors) = self.stats.snapshot();
        rule.success_messages = success;
        rule.fail_messages = fail;
        rule.errors = errors;
        rule
    }

    fn id(&self) -> &str {
        &self.record.id
    }
}

#[derive(Default)]
struct Table {
    endpoints: BTreeMap<String, RuleEndpoint>,
    rules: BTreeMap<String, Arc<LiveRule>>,
    by_path: PathIndex<Arc<LiveRule>>,
    by_service: HashMap<(String, String), Arc<LiveRule>>,
}

impl Table {
    fn endpoint_by_name(&self, name: &str) -> Option<&RuleEndpoint> {
        self.endpoints.values().find(|e| e.name == name)
    }

    fn add_rule(&mut self, rule: Arc<LiveRule>) {
        match &rule.route {
            Route::RestToService { path, .. } => self.by_path.insert(path.clone(), rule.clone()),
            Route::ServiceToRest {
                namespace, name, ..
            } => {
                self.by_service
                    .insert((namespace.clone(), name.clone()), rule.clone());
            }
        }
        self.rules.insert(rule.id().to_string(), rule);
    }

    fn remove_rule(&mut self, id: &str) -> Option<Arc<LiveRule>> {
        let rule = self.rules.remove(id)?;
        match &rule.route {
            Route::RestToService { path, .. } => self.by_path.remove(path),
            Route::ServiceToRest {
                namespace, name, ..
            } => {
                self.by_service.remove(&(namespace.clone(), name.clone()));
            }
        }
        Some(rule)
    }
}

pub struct Router {
    cfg: RouterConfig,
    objects: Arc<Objects>,
    data: DataPath,
    table: RwLock<Table>,
    /// Serialises changes (REST writes and counter flushes): a check and the write it guards
    /// see the same table.
    writes: Mutex<()>,
    /// Replicas routing for the cluster (1 for a single cloudcore): each rule's limit is
    /// shared among them.
    replicas: std::sync::atomic::AtomicU32,
}

/// Serialising these plain records cannot fail (string keys, no custom serialisers).
fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| unreachable!("router record serialisation: {e}"))
}

/// The rule id a Service or Endpoints object was created for, if any.
fn owner_of(json: &str) -> Option<String> {
    let v: Value = serde_json::from_str(json).ok()?;
    v.get("metadata")?
        .get("annotations")?
        .get(ANNOTATION_RULE)?
        .as_str()
        .map(str::to_string)
}

impl Router {
    /// Loads the router's records from the store and puts the virtual Services of
    /// `service` → `rest` rules in order (creating missing ones, removing those whose rule is
    /// gone). A stored record that cannot be read is logged and left in the store untouched.
    pub fn new(
        cfg: RouterConfig,
        objects: Arc<Objects>,
        data: DataPath,
    ) -> Result<Self, StoreError> {
        let store = objects.store().clone();
        let mut table = Table::default();
        for (id, json) in store.list_router(RouterKind::Endpoint)? {
            match serde_json::from_str::<RuleEndpoint>(&json) {
                Ok(e) => {
                    table.endpoints.insert(id, e);
                }
                Err(e) => {
                    error!(endpoint = %id, error = %e, "stored rule endpoint cannot be read; ignored (kept in the store)")
                }
            }
        }
        let mut stored_rules = HashSet::new();
        for (id, json) in store.list_router(RouterKind::Rule)? {
            stored_rules.insert(id.clone());
            match load_rule(&table, &json) {
                Ok(rule) => table.add_rule(Arc::new(rule)),
                Err(reason) => {
                    error!(rule = %id, %reason, "stored router rule cannot be used; ignored (kept in the store)")
                }
            }
        }
        info!(
            endpoints = table.endpoints.len(),
            rules = table.rules.len(),
            "router rules loaded"
        );
        let router = Router {
            cfg,
            objects,
            data,
            table: RwLock::new(table),
            writes: Mutex::new(()),
            replicas: std::sync::atomic::AtomicU32::new(1),
        };
        router.reconcile(&stored_rules);
        Ok(router)
    }

    /// How many replicas route for the cluster: each enforces that share of every rule's QPS.
    pub fn set_replicas(&self, n: usize) {
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        self.replicas.store(n, std::sync::atomic::Ordering::Release);
        self.share_limits();
    }

    fn share_limits(&self) {
        let n = self.replicas.load(std::sync::atomic::Ordering::Acquire);
        for rule in self.read().rules.values() {
            if let Some(l) = &rule.limiter {
                l.set_share(n);
            }
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        // The table is only changed by whole inserts and removes, so a writer that panicked
        // left it consistent.
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_writes(&self) -> MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn endpoints(&self) -> Vec<RuleEndpoint> {
        self.read().endpoints.values().cloned().collect()
    }

    pub fn endpoint(&self, id: &str) -> Option<RuleEndpoint> {
        self.read().endpoints.get(id).cloned()
    }

    /// Every rule with its live counters.
    pub fn rules(&self) -> Vec<Rule> {
        self.read().rules.values().map(|r| r.view()).collect()
    }

    pub fn rule(&self, id: &str) -> Option<Rule> {
        self.read().rules.get(id).map(|r| r.view())
    }

    /// Whether `namespace/name` is the virtual Service of a `service` → `rest` rule: a stream
    /// an edge node opens to it belongs to [`Router::serve_edge_stream`].
    pub fn virtual_service(&self, namespace: &str, name: &str) -> bool {
        self.read()
            .by_service
            .contains_key(&(namespace.to_string(), name.to_string()))
    }

    fn rule_for_service(&self, namespace: &str, name: &str) -> Option<Arc<LiveRule>> {
        self.read()
            .by_service
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The rule whose path prefix `path` falls under, and the rest of the path.
    fn rule_for_path<'p>(&self, path: &'p str) -> Option<(Arc<LiveRule>, &'p str)> {
        self.read().by_path.lookup(path)
    }

    /// Validates and stores a new rule endpoint (blocking: the store).
    pub fn create_endpoint(&self, body: Map<String, Value>) -> Result<RuleEndpoint, RouterError> {
        let _writes = self.lock_writes();
        let endpoint = model::new_endpoint(body, edgehub::message::new_message_id(), &model::now())
            .map_err(RouterError::Invalid)?;
        if self.read().endpoint_by_name(&endpoint.name).is_some() {
            return Err(RouterError::Conflict(FieldError::new(
                "name",
                format!("a rule endpoint named {:?} exists", endpoint.name),
            )));
        }
        self.objects
            .store()
            .put_router(RouterKind::Endpoint, &endpoint.id, &to_json(&endpoint))?;
        self.write()
            .endpoints
            .insert(endpoint.id.clone(), endpoint.clone());
        info!(id = %endpoint.id, name = %endpoint.name, kind = endpoint.kind.as_str(), "rule endpoint created");
        Ok(endpoint)
    }

    /// Deletes a rule endpoint no rule uses (blocking: the store).
    pub fn delete_endpoint(&self, id: &str) -> Result<RuleEndpoint, RouterError> {
        let _writes = self.lock_writes();
        let (endpoint, users) = {
            let table = self.read();
            let endpoint = table
                .endpoints
                .get(id)
                .cloned()
                .ok_or_else(|| RouterError::NotFound(format!("rule endpoint {id}")))?;
            let users: Vec<String> = table
                .rules
                .values()
                .filter(|r| r.record.source == endpoint.name || r.record.target == endpoint.name)
                .map(|r| format!("{} ({})", r.record.name, r.record.id))
                .collect();
            (endpoint, users)
        };
        if !users.is_empty() {
            return Err(RouterError::Conflict(FieldError::new(
                "",
                format!(
                    "rule endpoint {:?} is used by rule(s) {}; delete them first",
                    endpoint.name,
                    users.join(", ")
                ),
            )));
        }
        self.objects
            .store()
            .delete_router(RouterKind::Endpoint, id)?;
        self.write().endpoints.remove(id);
        info!(id = %id, name = %endpoint.name, "rule endpoint deleted");
        Ok(endpoint)
    }

    /// Validates and stores a new rule; a `service` → `rest` rule also gets its virtual
    /// Service and Endpoints (blocking: the store).
    pub fn create_rule(&self, body: Map<String, Value>) -> Result<Rule, RouterError> {
        let _writes = self.lock_writes();
        let draft = model::rule_draft(body).map_err(RouterError::Invalid)?;
        let (source, target) = {
            let table = self.read();
            if table.rules.values().any(|r| r.record.name == draft.name()) {
                return Err(RouterError::Conflict(FieldError::new(
                    "name",
                    format!("a rule named {:?} exists", draft.name()),
                )));
            }
            let find = |field: &str, name: &str| {
                table.endpoint_by_name(name).cloned().ok_or_else(|| {
                    RouterError::Invalid(FieldError::new(
                        field,
                        format!("no rule endpoint named {name:?}"),
                    ))
                })
            };
            (
                find("source", draft.source())?,
                find("target", draft.target())?,
            )
        };
        let (rule, route) = draft
            .finish(
                &source,
                &target,
                edgehub::message::new_message_id(),
                &model::now(),
            )
            .map_err(RouterError::Invalid)?;
        {
            let table = self.read();
            let clash = match &route {
                Route::RestToService { path, .. } => table
                    .by_path
                    .get(path)
                    .map(|r| ("source_resource.path", format!("path {path}"), r)),
                Route::ServiceToRest {
                    namespace, name, ..
                } => table
                    .by_service
                    .get(&(namespace.clone(), name.clone()))
                    .map(|r| {
                        (
                            "source_resource.name",
                            format!("Service {namespace}/{name}"),
                            r.clone(),
                        )
                    }),
            };
            if let Some((field, what, other)) = clash {
                return Err(RouterError::Conflict(FieldError::new(
                    field,
                    format!(
                        "rule {} ({}) already routes {what}",
                        other.record.name, other.record.id
                    ),
                )));
            }
        }
        let rate = model::rate_spec(&source.properties).map_err(RouterError::Invalid)?;
        let store = self.objects.store();
        store.put_router(RouterKind::Rule, &rule.id, &to_json(&rule))?;
        if let Route::ServiceToRest {
            namespace,
            name,
            port,
            ..
        } = &route
        {
            let known: HashSet<String> = self.read().rules.keys().cloned().collect();
            if let Err(e) = self.ensure_virtual_service(&rule.id, namespace, name, *port, &known) {
                // Nothing of the rule may remain when its Service could not be made.
                if let Err(undo) = store.delete_router(RouterKind::Rule, &rule.id) {
                    error!(rule = %rule.id, error = %undo, "cannot remove the rule whose Service failed; it is dropped at the next start");
                }
                return Err(e);
            }
        }
        let live = Arc::new(LiveRule::new(rule, route, rate));
        self.write().add_rule(live.clone());
        self.share_limits();
        info!(id = %live.id(), name = %live.record.name, source = %live.record.source, target = %live.record.target, "router rule created");
        Ok(live.view())
    }

    /// Deletes a rule (and the virtual Service a `service` → `rest` rule made) (blocking).
    pub fn delete_rule(&self, id: &str) -> Result<Rule, RouterError> {
        let _writes = self.lock_writes();
        let rule = self
            .read()
            .rules
            .get(id)
            .cloned()
            .ok_or_else(|| RouterError::NotFound(format!("rule {id}")))?;
        // The record goes first: a crash before the Service goes leaves an orphan that the
        // next start removes, never a rule the user deleted.
        self.objects.store().delete_router(RouterKind::Rule, id)?;
        self.write().remove_rule(id);
        if let Route::ServiceToRest {
            namespace, name, ..
        } = &rule.route
        {
            self.remove_virtual_service(id, namespace, name);
        }
        info!(id = %id, name = %rule.record.name, "router rule deleted");
        Ok(rule.view())
    }

    /// Creates or refreshes the Service and Endpoints of a `service` → `rest` rule. Existing
    /// objects are taken over only when they carry this rule's annotation or that of a rule
    /// that no longer exists (`known` holds the rule ids that do).
    fn ensure_virtual_service(
        &self,
        rule_id: &str,
        namespace: &str,
        name: &str,
        port: u16,
        known: &HashSet<String>,
    ) -> Result<(), RouterError> {
        let mut versions = [0u64; 2];
        for (i, kind) in [Kind::Service, Kind::Endpoints].into_iter().enumerate() {
            let key = ObjectKey::new(kind, namespace, name);
            let Some(rec) = self.objects.get(&key)? else {
                continue;
            };
            match owner_of(&rec.json) {
                Some(owner) if owner == rule_id || !known.contains(&owner) => {
                    versions[i] = rec.version
                }
                Some(owner) => {
                    return Err(RouterError::Conflict(FieldError::new(
                        "source_resource.name",
                        format!("{kind} {namespace}/{name} belongs to router rule {owner}"),
                    )))
                }
                None => {
                    return Err(RouterError::Conflict(FieldError::new(
                        "source_resource.name",
                        format!(
                            "{kind} {namespace}/{name} exists and was not created by the router"
                        ),
                    )))
                }
            }
        }
        let annotations = json!({ ANNOTATION_RULE: rule_id });
        // `resourceVersion` makes the write conditional on what was checked above ("0": must
        // not exist), so a Service created meanwhile through the API is never overwritten.
        let service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": { ANNOTATION_RULE: rule_id, ANNOTATION_PROTOCOL: "http" },
                "resourceVersion": versions[0].to_string(),
            },
            "spec": { "ports": [{ "name": "http", "port": port, "protocol": "TCP" }] },
        });
        let endpoints = json!({
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": annotations,
                "resourceVersion": versions[1].to_string(),
            },
            // No nodeName: edge nodes reach this address through cloudcore, which hands the
            // stream to the router; the address itself is never dialled.
            "subsets": [{
                "addresses": [{ "ip": self.cfg.virtual_endpoint_ip().to_string() }],
                "ports": [{ "name": "http", "port": port, "protocol": "TCP" }],
            }],
        });
        let objects = [service, endpoints]
            .into_iter()
            .map(Object::from_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(RouterError::Invalid)?;
        match self.objects.apply(objects, true) {
            Ok(_) => Ok(()),
            Err(ApplyError::Invalid { err, .. }) if err.field.starts_with("subsets") => {
                Err(RouterError::Misconfigured(format!(
                    "config key `router.advertise_ip`: the virtual Endpoints' address is refused: {err}"
                )))
            }
            Err(ApplyError::Invalid { err, .. }) => Err(RouterError::Invalid(FieldError::new(
                "source_resource",
                format!("the virtual Service is refused: {err}"),
            ))),
            Err(ApplyError::Store(StoreError::Conflict { key, .. })) => {
                Err(RouterError::Conflict(FieldError::new(
                    "source_resource.name",
                    format!("{key} changed while the rule was being created; try again"),
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the Service and Endpoints of a rule, if they are still the rule's.
    fn remove_virtual_service(&self, rule_id: &str, namespace: &str, name: &str) {
        for kind in [Kind::Service, Kind::Endpoints] {
            let key = ObjectKey::new(kind, namespace, name);
            let result = match self.objects.get(&key) {
                Ok(Some(rec)) if owner_of(&rec.json).as_deref() == Some(rule_id) => {
                    self.objects.delete(&key).map(|_| ())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                warn!(rule = %rule_id, object = %key, error = %e, "cannot delete the rule's virtual object; the next start removes it");
            }
        }
    }

    /// At start: every `service` → `rest` rule has its objects, and objects of rules that are
    /// gone (a crash between the rule's delete and theirs) are removed. `stored` holds every
    /// rule id in the store, also unreadable ones, whose objects are left alone.
    fn reconcile(&self, stored: &HashSet<String>) {
        let rules: Vec<Arc<LiveRule>> = self.read().rules.values().cloned().collect();
        for rule in &rules {
            if let Route::ServiceToRest {
                namespace,
                name,
                port,
                ..
            } = &rule.route
            {
                if let Err(e) =
                    self.ensure_virtual_service(rule.id(), namespace, name, *port, stored)
                {
                    warn!(rule = %rule.id(), service = %format!("{namespace}/{name}"), error = %e, "virtual Service of a router rule not in place");
                }
            }
        }
        for kind in [Kind::Service, Kind::Endpoints] {
            let records = match self.objects.store().list(kind, None) {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "cannot list objects to remove those of deleted router rules");
                    continue;
                }
            };
            for rec in records {
                let Some(owner) = owner_of(&rec.json) else {
                    continue;
                };
                if stored.contains(&owner) {
                    continue;
                }
                match self.objects.delete(&rec.key) {
                    Ok(_) => {
                        info!(object = %rec.key, rule = %owner, "removed the virtual object of a deleted router rule")
                    }
                    Err(e) => {
                        warn!(object = %rec.key, error = %e, "cannot remove the virtual object of a deleted router rule")
                    }
                }
            }
        }
    }

    /// Keeps the table in step with the store's router records until `shutdown`: rules and
    /// endpoints created or deleted through another replica (store on etcd) take effect here.
    pub async fn follow(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut changes = self.objects.store().subscribe_router();
        changes.mark_unchanged();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.reload()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "reading router records failed"),
                Err(e) => warn!(error = %e, "router reload failed"),
            }
        }
    }

    /// Brings the table to the store's records. A rule whose definition did not change keeps
    /// its live counters and limiter; counter-only changes (this replica's or another's
    /// flush) change nothing here.
    fn reload(&self) -> Result<(), StoreError> {
        let _writes = self.lock_writes();
        let store = self.objects.store();
        let mut endpoints = BTreeMap::new();
        for (id, json) in store.list_router(RouterKind::Endpoint)? {
            if let Ok(e) = serde_json::from_str::<RuleEndpoint>(&json) {
                endpoints.insert(id, e);
            }
        }
        let stored: Vec<(String, String)> = store.list_router(RouterKind::Rule)?;
        let mut table = Table {
            endpoints,
            ..Table::default()
        };
        let current: HashMap<String, Arc<LiveRule>> =
            self.read().rules.clone().into_iter().collect();
        let mut changed = 0usize;
        for (id, json) in &stored {
            let Ok(record) = serde_json::from_str::<Rule>(json) else {
                continue;
            };
            match current.get(id) {
                Some(live) if same_definition(&live.record, &record) => {
                    // Counts other replicas flushed.
                    live.stats.rebase(
                        record.success_messages,
                        record.fail_messages,
                        &record.errors,
                    );
                    table.add_rule(live.clone())
                }
                _ => match load_rule(&table, json) {
                    Ok(rule) => {
                        changed += 1;
                        table.add_rule(Arc::new(rule))
                    }
                    Err(reason) => {
                        warn!(rule = %id, %reason, "router rule from the store cannot be used; ignored")
                    }
                },
            }
        }
        let removed = current.len() + changed - table.rules.len();
        *self.write() = table;
        self.share_limits();
        if changed > 0 || removed > 0 {
            info!(changed, removed, "router rules reloaded from the store");
        }
        Ok(())
    }

    /// Adds the counts made here since the last flush to the stored rule (blocking). The
    /// write is a read-modify-write, so counts of several replicas add up; the stored counts,
    /// other replicas' included, then show here too.
    pub fn flush(&self) -> Result<usize, StoreError> {
        let _writes = self.lock_writes();
        let dirty: Vec<Arc<LiveRule>> = self
            .read()
            .rules
            .values()
            .filter(|r| r.stats.take_dirty())
            .cloned()
            .collect();
        for (i, rule) in dirty.iter().enumerate() {
            let (success, fail, errors) = rule.stats.snapshot();
            let (ds, df) = rule.stats.claim(success, fail);
            let written =
                self.objects
                    .store()
                    .update_router(RouterKind::Rule, rule.id(), &mut |stored| {
                        // A rule deleted meanwhile (through another replica) is not brought back.
                        let mut rec: Rule = serde_json::from_str(stored?).ok()?;
                        rec.success_messages += ds;
                        rec.fail_messages += df;
                        rec.errors = stats::merge_errors(&rec.errors, &errors);
                        Some(to_json(&rec))
                    });
            match written {
                Ok(Some(json)) => {
                    if let Ok(rec) = serde_json::from_str::<Rule>(&json) {
                        rule.stats
                            .rebase(rec.success_messages, rec.fail_messages, &rec.errors);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    rule.stats.unclaim(ds, df);
                    for r in &dirty[i + 1..] {
                        r.stats.mark_dirty();
                    }
                    return Err(e);
                }
            }
        }
        Ok(dirty.len())
    }
}

/// Whether two records describe the same rule (counters and times aside).
fn same_definition(a: &Rule, b: &Rule) -> bool {
    let strip = |r: &Rule| Rule {
        success_messages: 0,
        fail_messages: 0,
        errors: Default::default(),
        updated_at: String::new(),
        ..r.clone()
    };
    strip(a) == strip(b)
}

/// A stored rule, ready for the data path.
fn load_rule(table: &Table, json: &str) -> Result<LiveRule, String> {
    let rule: Rule = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let endpoint = |name: &str| {
        table
            .endpoint_by_name(name)
            .ok_or_else(|| format!("rule endpoint {name:?} is missing"))
    };
    let source = endpoint(&rule.source)?;
    let target = endpoint(&rule.target)?;
    let route = model::route_of(source.kind, target.kind, &rule).map_err(|e| e.to_string())?;
    let rate = model::rate_spec(&source.properties).map_err(|e| e.to_string())?;
    Ok(LiveRule::new(rule, route, rate))
}

#[cfg(test)]
mod tests;

/// Hands the streams edge pods open to a `service` → `rest` rule's virtual Service to the
/// router (cloudcore's tunnels call this instead of dialling the placeholder address).
pub struct RouterStreams(pub Arc<Router>);

impl crate::tunnel::VirtualServices for RouterStreams {
    fn owns(&self, namespace: &str, name: &str) -> bool {
        self.0.virtual_service(namespace, name)
    }

    fn serve(
        &self,
        source_node: String,
        namespace: String,
        name: String,
        stream: edgehub::tunnel::TunnelStream,
    ) {
        tokio::spawn(
            self.0
                .clone()
                .serve_edge_stream(source_node, namespace, name, stream),
        );
    }
}
