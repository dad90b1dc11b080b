//! Administrators: the catalog (versions, activation, rollback),
//! participants, subscriptions, the audit log and quality statistics.
//! Only admin participants reach these routes (checked centrally for every
//! `/admin/` path).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{json_response, parse_json, read_json, AppState, Caller};
use crate::catalog::Finding;
use crate::control::Refusal;
use crate::error::Problem;

fn ok(body: &impl Serialize) -> Result<Response, Problem> {
    let bytes = serde_json::to_vec(body).map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, bytes))
}

/// "schema.properties.a.x-class: …" → ("/schema/properties/a/x-class", "…").
fn finding(message: &str) -> Finding {
    let (pointer, text) = match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => {
            let path = path.split(" (").next().unwrap_or(path);
            let pointer: String = path
                .split('.')
                .map(|seg| format!("/{}", seg.replace('[', "/").replace(']', "")))
                .collect();
            (pointer, rest.to_owned())
        }
        _ => (String::new(), message.to_owned()),
    };
    Finding {
        pointer,
        code: "invalid".into(),
        message: text,
    }
}

fn refused(r: Refusal) -> Problem {
    match r {
        Refusal::Invalid(errors) => Problem::caller(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_definition",
            format!("the definition has {} problem(s); nothing was changed", errors.len()),
        )
        .with_errors(errors.iter().map(|e| finding(e)).collect()),
        Refusal::Breaking(diff) => Problem::caller(
            StatusCode::CONFLICT,
            "breaking_change",
            "this change would make records valid today invalid, break an integration, or share data more widely; resend with \"force\": true and a \"reason\" to apply it anyway",
        )
        .with("changes", diff.changes)
        .at("/reason", "a breaking change needs \"force\": true and a reason"),
        Refusal::Conflicts(errors) => Problem::caller(
            StatusCode::CONFLICT,
            "conflicts",
            format!("the change would leave {} other setting(s) invalid; nothing was changed", errors.len()),
        )
        .with_errors(errors.iter().map(|e| finding(e)).collect()),
        Refusal::VersionConflict { latest } => Problem::caller(
            StatusCode::CONFLICT,
            "version_conflict",
            format!("the latest version is {latest}; send version {} (or omit it)", latest + 1),
        )
        .with("latest_version", latest),
        Refusal::NotFound(what) => Problem::caller(StatusCode::NOT_FOUND, "not_found", what),
        Refusal::PushUnavailable(why) => Problem::caller(
            StatusCode::UNPROCESSABLE_ENTITY,
            "push_unavailable",
            format!("the gateway cannot deliver to this push subscription, so it was not stored: {why}"),
        ),
        Refusal::Store(e) => Problem::gateway(&e),
    }
}

async fn body_json(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Value, Problem> {
    let raw = read_json(headers, body, &state.limits).await?;
    parse_json(&raw, &state.limits)
}

/// `enable` → true, `disable` → false; anything else is not a route.
fn enabled_by(action: &str) -> Result<bool, Problem> {
    match action {
        "enable" => Ok(true),
        "disable" => Ok(false),
        _ => Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such resource; the actions are enable and disable",
        )),
    }
}

// === catalog ===

/// `GET /admin/v1/catalog/items`.
#[utoipa::path(get, path = "/admin/v1/catalog/items", tag = "admin",
    responses((status = 200, description = "`{\"items\": [...]}`: every item with its active version and version count", body = Object)))]
pub async fn items(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    let catalog = state.control.catalog.load_full();
    let mut out = Vec::new();
    for item in catalog.items() {
        let versions = state.ingest.store.item_versions(&item.def.id).await?;
        out.push(json!({
            "id": item.def.id, "name": item.def.name, "name_zh": item.def.name_zh,
            "active_version": item.def.version, "versions": versions.len(),
            "href": format!("/admin/v1/catalog/items/{}", item.def.id),
        }));
    }
    ok(&json!({"etag": catalog.etag(), "items": out}))
}

/// `GET /admin/v1/catalog/items/{item_id}`: the active definition, in the
/// shape `PUT` takes.
#[utoipa::path(get, path = "/admin/v1/catalog/items/{item_id}", tag = "admin",
    params(("item_id" = String, Path, description = "Catalog item id")),
    responses(
        (status = 200, description = "The active definition, the shape `PUT` takes", body = Object),
        (status = 404, description = "`unknown_item`: no such catalog item"),
    ))]
pub async fn item(
    State(state): State<Arc<AppState>>,
    Path(item_id): Path<String>,
) -> Result<Response, Problem> {
    let catalog = state.control.catalog.load_full();
    let item = catalog.get(&item_id).ok_or_else(|| {
        Problem::caller(
            StatusCode::NOT_FOUND,
            "unknown_item",
            "no catalog item has this id",
        )
    })?;
    ok(&item.def)
}

/// `GET /admin/v1/catalog/items/{item_id}/versions`.
#[utoipa::path(get, path = "/admin/v1/catalog/items/{item_id}/versions", tag = "admin",
    params(("item_id" = String, Path, description = "Catalog item id")),
    responses(
        (status = 200, description = "`{\"item\", \"versions\": [...]}`", body = Object),
        (status = 404, description = "`unknown_item`: no such catalog item"),
    ))]
pub async fn versions(
    State(state): State<Arc<AppState>>,
    Path(item_id): Path<String>,
) -> Result<Response, Problem> {
    let versions = state.ingest.store.item_versions(&item_id).await?;
    if versions.is_empty() {
        return Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "unknown_item",
            "no catalog item has this id",
        ));
    }
    ok(&json!({"item": item_id, "versions": versions}))
}

/// `GET /admin/v1/catalog/items/{item_id}/versions/{n}`.
#[utoipa::path(get, path = "/admin/v1/catalog/items/{item_id}/versions/{n}", tag = "admin",
    params(("item_id" = String, Path, description = "Catalog item id"), ("n" = u32, Path, description = "Version number", minimum = 1)),
    responses(
        (status = 200, description = "The definition of that version", body = Object),
        (status = 404, description = "`unknown_version`: no such version of the item"),
    ))]
pub async fn version(
    State(state): State<Arc<AppState>>,
    Path((item_id, n)): Path<(String, String)>,
) -> Result<Response, Problem> {
    // A version that is not a number is a version the item does not have
    // (a 404 problem, not the framework's plain-text 400).
    let found = match n.parse::<u32>() {
        Ok(n) => state.ingest.store.item_version(&item_id, n).await?,
        Err(_) => None,
    };
    match found {
        Some(def) => ok(&def),
        None => Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "unknown_version",
            "this item has no such version",
        )),
    }
}

/// Query of `PUT …/items/{item_id}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PutQuery {
    /// Validate and classify only; change nothing.
    #[serde(default)]
    dry_run: bool,
}

/// `PUT /admin/v1/catalog/items/{item_id}[?dry_run=true]` (a whole
/// definition) and `PATCH` (a JSON Merge Patch of the active one): the
/// result is validated, classified and, unless a dry run, activated.
#[utoipa::path(method(put, patch), path = "/admin/v1/catalog/items/{item_id}", tag = "admin",
    params(("item_id" = String, Path, description = "Catalog item id"), PutQuery),
    request_body(content = Object, content_type = "application/json",
        description = "PUT: the whole definition; PATCH: a JSON Merge Patch (RFC 7396, `application/merge-patch+json`) of the active one. `force` and `reason` allow a breaking change"),
    responses(
        (status = 200, description = "Validated, classified and (unless `dry_run`) activated: `{\"item\", \"version\", \"classification\", \"changes\": [...]}`", body = Object),
        (status = 400, description = "`invalid_query`, `invalid_document`: the query or the document is not valid"),
        (status = 404, description = "`not_found`: no such item (PATCH)"),
        (status = 409, description = "`breaking_change`, `conflicts`, `version_conflict`: the change needs `force` and a `reason`, would leave other settings invalid, or another version came first"),
        (status = 422, description = "`invalid_definition`: the definition has problems, listed with pointers"),
    ))]
pub async fn change_item(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    method: axum::http::Method,
    Path(item_id): Path<String>,
    query: Result<Query<PutQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|_| {
        Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "the only parameter is dry_run=true|false",
        )
    })?;
    let doc = body_json(&state, &headers, body).await?;
    let control = &state.control;
    let change = if method == axum::http::Method::PATCH {
        control
            .patch_item(&caller.id, &item_id, doc, q.dry_run)
            .await
    } else {
        control.put_item(&caller.id, &item_id, doc, q.dry_run).await
    };
    ok(&change.map_err(refused)?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(deserialize_with = "crate::codes::whole_u32")]
    version: u32,
    #[serde(default)]
    force: bool,
    reason: Option<String>,
}

/// `POST /admin/v1/catalog/items/{item_id}/rollback` `{"version": n}`.
#[utoipa::path(post, path = "/admin/v1/catalog/items/{item_id}/rollback", tag = "admin",
    params(("item_id" = String, Path, description = "Catalog item id")),
    request_body(content = ref("#/components/schemas/RollbackRequest"), content_type = "application/json"),
    responses(
        (status = 200, description = "That version's content is active again, as a new version", body = Object),
        (status = 400, description = "`invalid_document`: not `{\"version\": n}`"),
        (status = 404, description = "`not_found`: no such item or version"),
        (status = 409, description = "`breaking_change`, `conflicts`, `version_conflict`: as for a change"),
        (status = 422, description = "`invalid_definition`: that version is not valid any more"),
    ))]
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(item_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let doc = body_json(&state, &headers, body).await?;
    let b: RollbackBody = serde_json::from_value(doc).map_err(|_| {
        Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_document",
            "expected {\"version\": n, \"force\"?: bool, \"reason\"?: string}",
        )
        .at("/version", "required")
    })?;
    let change = state
        .control
        .rollback(&caller.id, &item_id, b.version, b.force, b.reason)
        .await
        .map_err(refused)?;
    ok(&change)
}

// === participants and subscriptions ===

/// `GET /admin/v1/participants`.
#[utoipa::path(get, path = "/admin/v1/participants", tag = "admin",
    responses((status = 200, description = "`{\"participants\": [...]}`", body = Object)))]
pub async fn participants(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    ok(&json!({"participants": state.control.registry.load().to_vec()}))
}

/// `GET /admin/v1/participants/{id}`.
#[utoipa::path(get, path = "/admin/v1/participants/{id}", tag = "admin",
    params(("id" = String, Path, description = "Participant id")),
    responses(
        (status = 200, description = "The participant", body = Object),
        (status = 404, description = "`unknown_participant`: no such participant"),
    ))]
pub async fn participant(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    match state.control.registry.load().get(&id) {
        Some(p) => ok(p.as_ref()),
        None => Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "unknown_participant",
            "no participant with this id",
        )),
    }
}

/// `PUT /admin/v1/participants/{id}`: create or replace.
#[utoipa::path(put, path = "/admin/v1/participants/{id}", tag = "admin",
    params(("id" = String, Path, description = "Participant id")),
    request_body(content = Object, content_type = "application/json", description = "The participant: `kind`, `name`, `clearance`, `enabled`, `certificate_sha256`, `rate`"),
    responses(
        (status = 200, description = "Stored and in force on every instance", body = Object),
        (status = 400, description = "`invalid_document`: not a participant document"),
        (status = 409, description = "`conflicts`, `version_conflict`: the change would leave other settings invalid"),
        (status = 422, description = "`invalid_definition`: the participant has problems, listed with pointers"),
    ))]
pub async fn put_participant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let doc = body_json(&state, &headers, body).await?;
    let p = state
        .control
        .put_participant(&caller.id, &id, doc)
        .await
        .map_err(refused)?;
    ok(&p)
}

async fn set_participant_enabled(
    state: &AppState,
    caller: &str,
    id: &str,
    enabled: bool,
) -> Result<Response, Problem> {
    let current = state
        .control
        .registry
        .load()
        .get(id)
        .cloned()
        .ok_or_else(|| {
            Problem::caller(
                StatusCode::NOT_FOUND,
                "unknown_participant",
                "no participant with this id",
            )
        })?;
    let mut p = (*current).clone();
    p.enabled = enabled;
    let body = serde_json::to_value(&p).map_err(|e| Problem::gateway(&e))?;
    let p = state
        .control
        .put_participant(caller, id, body)
        .await
        .map_err(refused)?;
    ok(&p)
}

/// `POST /admin/v1/participants/{id}/disable` and `…/enable`.
#[utoipa::path(post, path = "/admin/v1/participants/{id}/{action}", tag = "admin",
    params(("id" = String, Path, description = "Participant id"),
        ("action" = String, Path, description = "`enable` or `disable`", pattern = "^(enable|disable)$")),
    responses(
        (status = 200, description = "The participant as it is now", body = Object),
        (status = 404, description = "`not_found`, `unknown_participant`: no such action or participant"),
        (status = 409, description = "`conflicts`: disabling it would leave other settings invalid"),
    ))]
pub async fn switch_participant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, Problem> {
    set_participant_enabled(&state, &caller.id, &id, enabled_by(&action)?).await
}

/// A subscription as shown to administrators: the signing secret is never
/// shown.
fn shown(spec: &crate::routing::SubscriptionSpec) -> Value {
    let mut v = serde_json::to_value(spec).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        if obj.get("signing_secret").is_some_and(|s| !s.is_null()) {
            obj.insert("signing_secret".into(), Value::String("(set)".into()));
        }
        obj.retain(|_, v| !v.is_null());
    }
    v
}

/// `GET /admin/v1/subscriptions`.
#[utoipa::path(get, path = "/admin/v1/subscriptions", tag = "admin",
    responses((status = 200, description = "`{\"subscriptions\": [...], \"paused\": [...]}`", body = Object)))]
pub async fn subscriptions(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    let subs = state.control.subscriptions.load();
    let list: Vec<Value> = subs.specs().iter().map(shown).collect();
    ok(&json!({"subscriptions": list, "paused": state.dispatcher.paused()}))
}

/// `GET /admin/v1/subscriptions/{id}`.
#[utoipa::path(get, path = "/admin/v1/subscriptions/{id}", tag = "admin",
    params(("id" = String, Path, description = "Subscription id")),
    responses(
        (status = 200, description = "The subscription", body = Object),
        (status = 404, description = "`unknown_subscription`: no such subscription"),
    ))]
pub async fn subscription(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let subs = state.control.subscriptions.load();
    match subs.specs().iter().find(|s| s.id == id) {
        Some(s) => ok(&shown(s)),
        None => Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "unknown_subscription",
            "no subscription with this id",
        )),
    }
}

/// `PUT /admin/v1/subscriptions/{id}`: create or replace.
#[utoipa::path(put, path = "/admin/v1/subscriptions/{id}", tag = "admin",
    params(("id" = String, Path, description = "Subscription id")),
    request_body(content = Object, content_type = "application/json", description = "The subscription: `agency`, `items`, `types`, `levels`, `mode` (`push` with `endpoint` and `secret`, or `pull`)"),
    responses(
        (status = 200, description = "Stored; a push subscription delivers from now on, on every instance", body = Object),
        (status = 400, description = "`invalid_document`: not a subscription document"),
        (status = 409, description = "`conflicts`, `version_conflict`: the subscription does not fit the catalog or participants"),
        (status = 422, description = "`invalid_definition`, `push_unavailable`: the subscription has problems, or its endpoint cannot be delivered to"),
    ))]
pub async fn put_subscription(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let doc = body_json(&state, &headers, body).await?;
    let s = state
        .control
        .put_subscription(&caller.id, &id, doc)
        .await
        .map_err(refused)?;
    ok(&shown(&s))
}

async fn set_subscription_enabled(
    state: &AppState,
    caller: &str,
    id: &str,
    enabled: bool,
) -> Result<Response, Problem> {
    let mut spec = state
        .control
        .subscriptions
        .load()
        .specs()
        .iter()
        .find(|s| s.id == id)
        .cloned()
        .ok_or_else(|| {
            Problem::caller(
                StatusCode::NOT_FOUND,
                "unknown_subscription",
                "no subscription with this id",
            )
        })?;
    spec.enabled = enabled;
    let body = serde_json::to_value(&spec).map_err(|e| Problem::gateway(&e))?;
    let s = state
        .control
        .put_subscription(caller, id, body)
        .await
        .map_err(refused)?;
    ok(&shown(&s))
}

/// `POST /admin/v1/subscriptions/{id}/disable` and `…/enable`.
#[utoipa::path(post, path = "/admin/v1/subscriptions/{id}/{action}", tag = "admin",
    params(("id" = String, Path, description = "Subscription id"),
        ("action" = String, Path, description = "`enable` or `disable`", pattern = "^(enable|disable)$")),
    responses(
        (status = 200, description = "The subscription as it is now", body = Object),
        (status = 404, description = "`not_found`, `unknown_subscription`: no such action or subscription"),
        (status = 409, description = "`conflicts`: the change would leave other settings invalid"),
        (status = 422, description = "`invalid_definition`, `push_unavailable`: the subscription cannot be enabled"),
    ))]
pub async fn switch_subscription(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, Problem> {
    set_subscription_enabled(&state, &caller.id, &id, enabled_by(&action)?).await
}

// === audit and statistics ===

/// Query of the audit page.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Chain position after which to list, oldest first (default: the
    /// beginning).
    pub after: Option<i64>,
    /// Chain position before which to list, newest first (with `after`:
    /// the entries between the two, newest first).
    #[param(minimum = 1)]
    pub before: Option<i64>,
    /// Only this actor's entries (a participant id, or `gateway`).
    #[param(max_length = 100)]
    pub actor: Option<String>,
    /// Only this action (`catalog.activate`) or kind of action (`catalog`).
    #[param(max_length = 100)]
    pub kind: Option<String>,
    /// Most listed (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

impl AuditQuery {
    /// The store filter, or `None` when a parameter is out of range.
    pub fn filter(self) -> Option<crate::store::AuditFilter> {
        let limit = super::query::page_limit(self.limit)?;
        let text = |v: Option<String>| match v.map(|v| v.trim().to_owned()) {
            Some(v) if v.chars().count() > 100 => Err(()),
            Some(v) if v.is_empty() => Ok(None),
            v => Ok(v),
        };
        if self.before.is_some_and(|b| b < 1) {
            return None;
        }
        Some(crate::store::AuditFilter {
            after: self.after.unwrap_or(0),
            before: self.before,
            actor: text(self.actor).ok()?,
            kind: text(self.kind).ok()?,
            limit,
        })
    }
}

/// `GET /admin/v1/audit?after=&limit=`.
#[utoipa::path(get, path = "/admin/v1/audit", tag = "admin",
    params(AuditQuery),
    responses(
        (status = 200, description = "`{\"entries\": [...], \"next\", \"order\"}`: audit entries with their chain position; `next` is the `after` (or, newest first, the `before`) of the following page", body = Object),
        (status = 400, description = "`invalid_query`: a parameter is not valid"),
    ))]
pub async fn audit(
    State(state): State<Arc<AppState>>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let bad = || {
        Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "after and before are chain positions (before at least 1), actor and kind at most 100 characters, limit 1-1000",
        )
    };
    let Query(q) = query.map_err(|_| bad())?;
    let filter = q.filter().ok_or_else(bad)?;
    let newest_first = filter.before.is_some();
    let start = filter.before.unwrap_or(filter.after);
    let entries = state.ingest.store.audit_page(filter).await?;
    let next = entries.last().map_or(start, |e| e.seq);
    // `next` is the `after` (oldest first) or `before` (newest first) of
    // the following page.
    ok(
        &json!({"entries": entries, "next": next, "order": if newest_first { "newest_first" } else { "oldest_first" }}),
    )
}

/// `GET /admin/v1/audit/verify`: the latest verification of the audit
/// chain (the gateway verifies once at start, and on request).
#[utoipa::path(get, path = "/admin/v1/audit/verify", tag = "admin",
    responses(
        (status = 200, description = "`{\"verified_at\", \"intact\", \"seconds\", \"entries\", \"checkpoints\", \"problem\", \"latest_checkpoint\"}`", body = Object),
        (status = 404, description = "`not_verified_yet`: no verification has finished since start"),
    ))]
pub async fn audit_verification(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    match state.audit_check.latest() {
        Some(v) => ok(&v),
        None => Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "not_verified_yet",
            "no verification has finished since the gateway started; POST to verify now",
        )),
    }
}

/// `POST /admin/v1/audit/verify`: verifies the whole audit chain and every
/// checkpoint now (as `credgate audit verify` does) and answers the result.
#[utoipa::path(post, path = "/admin/v1/audit/verify", tag = "admin",
    responses(
        (status = 200, description = "The verification: `intact` false with the first `problem` when the chain does not hold", body = Object),
    ))]
pub async fn verify_audit(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    let v = state
        .audit_check
        .run()
        .await
        .map_err(|e| Problem::gateway(&e))?;
    ok(&v)
}

/// `GET /admin/v1/stats/departments?from&to`: what departments are scored on.
#[utoipa::path(get, path = "/admin/v1/stats/departments", tag = "admin",
    params(super::query::PeriodQuery),
    responses(
        (status = 200, description = "Submissions, acceptance and timeliness per department and item", body = Object),
        (status = 400, description = "`invalid_query`: a parameter is not valid"),
    ))]
pub async fn department_stats(
    State(state): State<Arc<AppState>>,
    query: Result<Query<super::query::PeriodQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|_| {
        Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "allowed parameters: from, to",
        )
    })?;
    let (from, to) = super::query::period(q)?;
    let departments = state.ingest.store.department_stats(from, to).await?;
    let agencies = state.ingest.store.feedback_stats(from, to).await?;
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    ok(&json!({"from": fmt(from), "to": fmt(to), "departments": departments, "agencies": agencies}))
}
