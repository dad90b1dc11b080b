//! The control plane: the catalog, participants and subscriptions that are
//! in force, and the administrators' changes to them.
//!
//! The store is authoritative: the files in `catalogs/` and `config/` seed
//! it on first start; afterwards changes come through the admin API, are
//! validated against everything that depends on them, stored durably with
//! an audit entry, and only then swapped in (`ArcSwap`). Requests in flight
//! keep the version they loaded. Compilation runs off the async workers.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::catalog::{Catalog, CatalogItem, ItemDefinition};
use crate::compat::{self, Diff};
use crate::participants::{Kind, Participant, Registry};
use crate::routing::{SubscriptionSpec, Subscriptions};
use crate::store::{ActivateOutcome, DocKind, ItemActivation, Store, StoreError};

/// Why an administrator's change was refused.
#[derive(Debug)]
pub enum Refusal {
    /// The document does not parse or does not validate: every problem.
    Invalid(Vec<String>),
    /// The change is breaking and was not forced with a reason.
    Breaking(Diff),
    /// Other configuration would stop being valid.
    Conflicts(Vec<String>),
    /// Someone else changed it first (version numbers).
    VersionConflict {
        /// Latest version now.
        latest: u32,
    },
    /// No such item, version, participant or subscription.
    NotFound(String),
    /// A push subscription the gateway could not deliver to (no client
    /// certificate, unusable CA or secret): refused rather than accepted
    /// and left failing.
    PushUnavailable(String),
    /// The store failed.
    Store(StoreError),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Store(e)
    }
}

/// Result of an item change (or its dry run).
#[derive(Debug, Clone, Serialize)]
pub struct ItemChange {
    /// Item id.
    pub item: String,
    /// Version that is (or would be) active.
    pub version: u32,
    /// Version that was active before.
    pub previous_version: u32,
    /// Whether the change is breaking.
    pub breaking: bool,
    /// Classified changes.
    pub changes: Vec<compat::Change>,
    /// False for a dry run.
    pub activated: bool,
}

/// What is in force, swappable.
pub struct Control {
    /// Active catalog.
    pub catalog: Arc<ArcSwap<Catalog>>,
    /// Participants.
    pub registry: Arc<ArcSwap<Registry>>,
    /// Subscriptions.
    pub subscriptions: Arc<ArcSwap<Subscriptions>>,
    store: Arc<dyn Store>,
    /// One administrative change at a time (per process).
    lock: tokio::sync::Mutex<()>,
    /// Seals subscription signing secrets before they are stored.
    sealer: Arc<crate::sealed::Sealer>,
    /// Subscriptions whose stored secret is still in clear (stored before
    /// sealing existed); [`Control::seal_stored_secrets`] fixes them.
    clear_secrets: std::sync::Mutex<Vec<String>>,
    /// Whether the push side can serve a subscription (set once the
    /// dispatcher exists): checked before a push subscription is stored.
    push_check: std::sync::OnceLock<PushCheck>,
}

/// Checks that a push subscription can be delivered to.
pub type PushCheck = Box<dyn Fn(&crate::routing::Subscription) -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

fn digest(v: &impl Serialize) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(v).unwrap_or_default()))
}

fn departments(reg: &Registry) -> impl Fn(&str) -> bool + '_ {
    move |id| reg.get(id).is_some_and(|p| p.kind == Kind::Department)
}

/// JSON Merge Patch (RFC 7396): objects merge, `null` removes, anything
/// else replaces.
pub fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(serde_json::Map::new());
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(&k);
                    } else {
                        merge_patch(t.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other,
    }
}

/// Compiles on a blocking thread: schema compilation is CPU work that must
/// not stall request handling.
async fn compile(def: ItemDefinition, registry: Arc<Registry>) -> Result<CatalogItem, Vec<String>> {
    tokio::task::spawn_blocking(move || CatalogItem::compile(def, &departments(&registry)))
        .await
        .map_err(|e| vec![format!("compilation task failed: {e}")])?
}

impl Control {
    /// Builds the control state from what the store holds.
    pub fn from_state(
        store: Arc<dyn Store>,
        sealer: Arc<crate::sealed::Sealer>,
        items: Vec<Value>,
        participants: Vec<Value>,
        subscriptions: Vec<Value>,
    ) -> Result<Control, Vec<String>> {
        let mut errors = Vec::new();
        let mut clear_secrets = Vec::new();
        let participants: Vec<Participant> = participants
            .into_iter()
            .filter_map(|v| {
                serde_json::from_value(v)
                    .map_err(|e| errors.push(format!("stored participant: {e}")))
                    .ok()
            })
            .collect();
        let registry = Registry::from_participants(participants)
            .map_err(|e| errors.extend(e))
            .ok();
        let defs: Vec<(String, ItemDefinition)> = items
            .into_iter()
            .filter_map(|v| {
                let id = v
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned();
                serde_json::from_value(v)
                    .map(|d| (format!("stored catalog item {id}"), d))
                    .map_err(|e| errors.push(format!("stored catalog item {id}: {e}")))
                    .ok()
            })
            .collect();
        let specs: Vec<SubscriptionSpec> = subscriptions
            .into_iter()
            .filter_map(|mut v| {
                let id = v
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned();
                match sealer.open_doc(&mut v) {
                    Ok(true) => clear_secrets.push(id.clone()),
                    Ok(false) => {}
                    Err(e) => {
                        errors.push(format!("stored subscription {id}: signing_secret: {e}"));
                        return None;
                    }
                }
                serde_json::from_value(v)
                    .map_err(|e| errors.push(format!("stored subscription {id}: {e}")))
                    .ok()
            })
            .collect();
        let Some(registry) = registry else {
            return Err(errors);
        };
        let catalog = Catalog::compile_all(defs, &departments(&registry))
            .map_err(|e| errors.extend(e))
            .ok();
        let Some(catalog) = catalog else {
            return Err(errors);
        };
        let subscriptions = Subscriptions::build(specs, &registry, &catalog)
            .map_err(|e| errors.extend(e))
            .ok();
        match subscriptions {
            Some(subscriptions) if errors.is_empty() => Ok(Control {
                catalog: Arc::new(ArcSwap::from_pointee(catalog)),
                registry: Arc::new(ArcSwap::from_pointee(registry)),
                subscriptions: Arc::new(ArcSwap::from_pointee(subscriptions)),
                store,
                lock: tokio::sync::Mutex::new(()),
                sealer,
                clear_secrets: std::sync::Mutex::new(clear_secrets),
                push_check: std::sync::OnceLock::new(),
            }),
            _ => Err(errors),
        }
    }

    /// Reloads the catalog, participants and subscriptions from the store
    /// (another instance changed them) and swaps them in.
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        let _guard = self.lock.lock().await;
        let state = self
            .store
            .seed_control(Vec::new(), Vec::new(), Vec::new())
            .await
            .map_err(|e| vec![e.to_string()])?;
        let fresh = Control::from_state(
            self.store.clone(),
            self.sealer.clone(),
            state.items,
            state.participants,
            state.subscriptions,
        )?;
        self.registry.store(fresh.registry.load_full());
        self.catalog.store(fresh.catalog.load_full());
        self.subscriptions.store(fresh.subscriptions.load_full());
        Ok(())
    }

    /// Validates `body` as the next version of `item_id`, classifies it
    /// against the active version and, unless `dry_run`, stores and
    /// activates it. `force` with a non-empty `reason` allows breaking
    /// changes.
    pub async fn put_item(
        &self,
        actor: &str,
        item_id: &str,
        body: Value,
        dry_run: bool,
    ) -> Result<ItemChange, Refusal> {
        let _guard = self.lock.lock().await;
        self.put_item_locked(actor, item_id, body, dry_run).await
    }

    /// Applies a JSON Merge Patch (RFC 7396) to the active definition and
    /// handles the result as the next version, like [`Control::put_item`].
    pub async fn patch_item(
        &self,
        actor: &str,
        item_id: &str,
        patch: Value,
        dry_run: bool,
    ) -> Result<ItemChange, Refusal> {
        let _guard = self.lock.lock().await;
        let catalog = self.catalog.load_full();
        let Some(active) = catalog.get(item_id) else {
            return Err(Refusal::NotFound(format!("no catalog item {item_id}")));
        };
        let mut def =
            serde_json::to_value(&active.def).map_err(|e| Refusal::Invalid(vec![e.to_string()]))?;
        merge_patch(&mut def, patch);
        if let Some(obj) = def.as_object_mut() {
            // The patched document is the next version unless the patch says.
            if obj.get("version").and_then(Value::as_u64) == Some(u64::from(active.def.version)) {
                obj.remove("version");
            }
        }
        self.put_item_locked(actor, item_id, def, dry_run).await
    }

    async fn put_item_locked(
        &self,
        actor: &str,
        item_id: &str,
        mut body: Value,
        dry_run: bool,
    ) -> Result<ItemChange, Refusal> {
        let Some(obj) = body.as_object_mut() else {
            return Err(Refusal::Invalid(vec![
                "the body must be an item definition object".into(),
            ]));
        };
        let force = obj
            .remove("force")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let reason = obj
            .remove("reason")
            .and_then(|v| v.as_str().map(str::to_owned))
            .filter(|r| !r.trim().is_empty());
        obj.entry("id")
            .or_insert_with(|| Value::String(item_id.to_owned()));
        let versions = self.store.item_versions(item_id).await?;
        let latest = versions.iter().map(|v| v.version).max().unwrap_or(0);
        let next = latest + 1;
        match obj.get("version") {
            None => {
                obj.insert("version".into(), Value::from(next));
            }
            Some(v) if v.as_u64() == Some(u64::from(next)) => {}
            Some(_) => return Err(Refusal::VersionConflict { latest }),
        }
        let def: ItemDefinition =
            serde_json::from_value(body).map_err(|e| Refusal::Invalid(vec![e.to_string()]))?;
        if def.id != item_id {
            return Err(Refusal::Invalid(vec![format!(
                "id: {:?} does not match the item in the path ({item_id:?})",
                def.id
            )]));
        }
        let catalog = self.catalog.load_full();
        let old = catalog.get(item_id).cloned();
        let item = Arc::new(
            compile(def, self.registry.load_full())
                .await
                .map_err(Refusal::Invalid)?,
        );
        self.check_and_activate(actor, item, old, force, reason, dry_run, true)
            .await
    }

    /// Re-activates stored version `version` of `item_id`.
    pub async fn rollback(
        &self,
        actor: &str,
        item_id: &str,
        version: u32,
        force: bool,
        reason: Option<String>,
    ) -> Result<ItemChange, Refusal> {
        let _guard = self.lock.lock().await;
        let Some(stored) = self.store.item_version(item_id, version).await? else {
            return Err(Refusal::NotFound(format!(
                "item {item_id} has no version {version}"
            )));
        };
        let def: ItemDefinition =
            serde_json::from_value(stored).map_err(|e| Refusal::Invalid(vec![e.to_string()]))?;
        let old = self.catalog.load_full().get(item_id).cloned();
        let item = Arc::new(
            compile(def, self.registry.load_full())
                .await
                .map_err(Refusal::Invalid)?,
        );
        self.check_and_activate(
            actor,
            item,
            old,
            force,
            reason.filter(|r| !r.trim().is_empty()),
            false,
            false,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn check_and_activate(
        &self,
        actor: &str,
        item: Arc<CatalogItem>,
        old: Option<Arc<CatalogItem>>,
        force: bool,
        reason: Option<String>,
        dry_run: bool,
        new_version: bool,
    ) -> Result<ItemChange, Refusal> {
        let diff = match &old {
            Some(o) => compat::diff(&o.def, &item.def),
            None => Diff::default(),
        };
        // Subscriptions must stay valid with the new definition.
        let catalog = self.catalog.load_full().with_item(item.clone());
        let registry = self.registry.load_full();
        if let Err(errors) = Subscriptions::build(
            self.subscriptions.load().specs().to_vec(),
            &registry,
            &catalog,
        ) {
            return Err(Refusal::Conflicts(errors));
        }
        let change = ItemChange {
            item: item.def.id.clone(),
            version: item.def.version,
            previous_version: old.as_ref().map_or(0, |o| o.def.version),
            breaking: diff.breaking,
            changes: diff.changes.clone(),
            activated: false,
        };
        if dry_run {
            return Ok(change);
        }
        if diff.breaking && !(force && reason.is_some()) {
            return Err(Refusal::Breaking(diff));
        }
        let activation = ItemActivation {
            item: item.def.id.clone(),
            version: item.def.version,
            definition: new_version.then(|| serde_json::to_value(&item.def).unwrap_or_default()),
            actor: actor.to_owned(),
            reason,
            breaking: diff.breaking,
            diff: serde_json::to_value(&diff.changes).unwrap_or_default(),
            digests: (
                old.as_ref().map(|o| digest(&o.def)).unwrap_or_default(),
                digest(&item.def),
            ),
        };
        match self.store.activate_item(activation).await? {
            ActivateOutcome::Activated => {}
            ActivateOutcome::VersionTaken { latest } => {
                return Err(Refusal::VersionConflict { latest })
            }
            ActivateOutcome::NoSuchVersion => {
                return Err(Refusal::NotFound(format!(
                    "no version {}",
                    item.def.version
                )))
            }
        }
        // Durable first, then in force: a crash in between re-reads the
        // store at start-up.
        self.catalog.store(Arc::new(catalog));
        tracing::info!(item = %item.def.id, version = item.def.version, %actor, breaking = diff.breaking, "catalog item version activated");
        Ok(ItemChange {
            activated: true,
            ..change
        })
    }

    /// Creates or replaces a participant.
    pub async fn put_participant(
        &self,
        actor: &str,
        id: &str,
        body: Value,
    ) -> Result<Participant, Refusal> {
        let _guard = self.lock.lock().await;
        let mut p: Participant =
            serde_json::from_value(body).map_err(|e| Refusal::Invalid(vec![e.to_string()]))?;
        if p.id.is_empty() {
            p.id = id.to_owned();
        }
        if p.id != id {
            return Err(Refusal::Invalid(vec![format!(
                "id: {:?} does not match the path ({id:?})",
                p.id
            )]));
        }
        let current = self.registry.load_full();
        let before = current.get(id).cloned();
        let mut list = current.to_vec();
        match list.iter_mut().find(|q| q.id == id) {
            Some(slot) => *slot = p.clone(),
            None => list.push(p.clone()),
        }
        let registry = Registry::from_participants(list).map_err(Refusal::Invalid)?;
        // Catalog providers must stay departments; subscriptions must stay
        // valid (agency kind, clearance).
        let mut conflicts = Vec::new();
        let catalog = self.catalog.load_full();
        for item in catalog.items() {
            if item.def.providers.iter().any(|x| x == id) && p.kind != Kind::Department {
                conflicts.push(format!(
                    "catalog item {} lists {id} as a provider, so it must stay a department",
                    item.def.id
                ));
            }
        }
        if let Err(e) = Subscriptions::build(
            self.subscriptions.load().specs().to_vec(),
            &registry,
            &catalog,
        ) {
            conflicts.extend(e);
        }
        if !conflicts.is_empty() {
            return Err(Refusal::Conflicts(conflicts));
        }
        let identity_changed = before
            .as_ref()
            .is_some_and(|b| b.certificate_sha256 != p.certificate_sha256);
        let action = match (&before, identity_changed) {
            (None, _) => "participant.create",
            (Some(_), true) => "participant.identity_change",
            (Some(b), false) if b.enabled && !p.enabled => "participant.disable",
            (Some(_), false) => "participant.update",
        };
        let details = serde_json::json!({
            "before_digest": before.as_ref().map(|b| digest(b.as_ref())),
            "after_digest": digest(&p),
            "kind": p.kind.as_str(),
            "enabled": p.enabled,
            "certificate_pins": p.certificate_sha256,
            "clearance": p.clearance,
        });
        let body = serde_json::to_value(&p).map_err(|e| Refusal::Invalid(vec![e.to_string()]))?;
        self.store
            .put_document(DocKind::Participant, id, body, actor, action, details)
            .await?;
        self.registry.store(Arc::new(registry));
        tracing::info!(participant = %id, %actor, %action, "participant changed");
        Ok(p)
    }

    /// Creates or replaces a subscription.
    pub async fn put_subscription(
        &self,
        actor: &str,
        id: &str,
        body: Value,
    ) -> Result<SubscriptionSpec, Refusal> {
        let _guard = self.lock.lock().await;
        let mut body = body;
        if let Some(obj) = body.as_object_mut() {
            obj.entry("id")
                .or_insert_with(|| Value::String(id.to_owned()));
        }
        let spec: SubscriptionSpec =
            serde_json::from_value(body).map_err(|e| Refusal::Invalid(vec![e.to_string()]))?;
        if spec.id != id {
            return Err(Refusal::Invalid(vec![format!(
                "id: {:?} does not match the path ({id:?})",
                spec.id
            )]));
        }
        let current = self.subscriptions.load_full();
        let before = current.specs().iter().find(|s| s.id == id).cloned();
        let mut specs = current.specs().to_vec();
        match specs.iter_mut().find(|s| s.id == id) {
            Some(slot) => *slot = spec.clone(),
            None => specs.push(spec.clone()),
        }
        let subscriptions =
            Subscriptions::build(specs, &self.registry.load_full(), &self.catalog.load_full())
                .map_err(Refusal::Invalid)?;
        if let (Some(sub), Some(check)) = (subscriptions.get(id), self.push_check.get()) {
            if sub.is_push() && sub.enabled {
                check(sub).map_err(Refusal::PushUnavailable)?;
            }
        }
        let action = match &before {
            None => "subscription.create",
            Some(b) if b.enabled && !spec.enabled => "subscription.disable",
            Some(_) => "subscription.update",
        };
        let mut stored =
            serde_json::to_value(&spec).map_err(|e| Refusal::Invalid(vec![e.to_string()]))?;
        self.sealer.seal_doc(&mut stored);
        let details = serde_json::json!({
            "agency": spec.agency,
            "mode": spec.mode,
            "before_digest": before.as_ref().map(digest),
            "after_digest": digest(&spec),
            "enabled": spec.enabled,
        });
        self.store
            .put_document(DocKind::Subscription, id, stored, actor, action, details)
            .await?;
        self.subscriptions.store(Arc::new(subscriptions));
        tracing::info!(subscription = %id, %actor, %action, "subscription changed");
        Ok(spec)
    }

    /// Handles to what is in force, for readers (ingest, delivery).
    pub fn active(&self) -> crate::active::Active {
        crate::active::Active {
            catalog: self.catalog.clone(),
            registry: self.registry.clone(),
            subscriptions: self.subscriptions.clone(),
        }
    }

    /// Installs the check that a push subscription can be served; called
    /// once, when the dispatcher exists.
    pub fn set_push_check(&self, check: PushCheck) {
        let _ = self.push_check.set(check);
    }

    /// Stores sealed every subscription secret still stored in clear (by a
    /// version before sealing); audited as `subscription.secret_sealed`.
    pub async fn seal_stored_secrets(&self) -> Result<usize, StoreError> {
        let _guard = self.lock.lock().await;
        let ids = std::mem::take(
            &mut *self
                .clear_secrets
                .lock()
                .map_err(|_| StoreError::Unavailable)?,
        );
        let current = self.subscriptions.load_full();
        let mut n = 0;
        for id in ids {
            let Some(spec) = current.specs().iter().find(|s| s.id == id) else {
                continue;
            };
            let mut stored =
                serde_json::to_value(spec).map_err(|e| StoreError::Database(e.to_string()))?;
            self.sealer.seal_doc(&mut stored);
            let details = serde_json::json!({"agency": spec.agency, "after_digest": digest(spec)});
            self.store
                .put_document(
                    DocKind::Subscription,
                    &id,
                    stored,
                    "gateway",
                    "subscription.secret_sealed",
                    details,
                )
                .await?;
            n += 1;
        }
        Ok(n)
    }
}
