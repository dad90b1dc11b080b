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
        .with("changes", diff.changes),
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
pub async fn version(
    State(state): State<Arc<AppState>>,
    Path((item_id, n)): Path<(String, u32)>,
) -> Result<Response, Problem> {
    match state.ingest.store.item_version(&item_id, n).await? {
        Some(def) => ok(&def),
        None => Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "unknown_version",
            "this item has no such version",
        )),
    }
}

/// Query of `PUT …/items/{item_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutQuery {
    #[serde(default)]
    dry_run: bool,
}

/// `PUT /admin/v1/catalog/items/{item_id}[?dry_run=true]` (a whole
/// definition) and `PATCH` (a JSON Merge Patch of the active one): the
/// result is validated, classified and, unless a dry run, activated.
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
    version: u32,
    #[serde(default)]
    force: bool,
    reason: Option<String>,
}

/// `POST /admin/v1/catalog/items/{item_id}/rollback` `{"version": n}`.
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
pub async fn participants(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    ok(&json!({"participants": state.control.registry.load().to_vec()}))
}

/// `GET /admin/v1/participants/{id}`.
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
pub async fn subscriptions(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    let subs = state.control.subscriptions.load();
    let list: Vec<Value> = subs.specs().iter().map(shown).collect();
    ok(&json!({"subscriptions": list, "paused": state.dispatcher.paused()}))
}

/// `GET /admin/v1/subscriptions/{id}`.
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
pub async fn switch_subscription(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, Problem> {
    set_subscription_enabled(&state, &caller.id, &id, enabled_by(&action)?).await
}

// === audit and statistics ===

/// Query of the audit page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    after: Option<i64>,
    limit: Option<usize>,
}

/// `GET /admin/v1/audit?after=&limit=`.
pub async fn audit(
    State(state): State<Arc<AppState>>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let bad = || {
        Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "after is a sequence number, limit 1-1000",
        )
    };
    let Query(q) = query.map_err(|_| bad())?;
    let limit = super::query::page_limit(q.limit).ok_or_else(bad)?;
    let after = q.after.unwrap_or(0);
    let entries = state.ingest.store.audit_page(after, limit).await?;
    let next = entries.last().map_or(after, |e| e.seq);
    ok(&json!({"entries": entries, "next": next}))
}

/// `GET /admin/v1/stats/departments?from&to`: what departments are scored on.
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
