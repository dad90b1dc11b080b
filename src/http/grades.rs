//! Credit grade administration: `GET`/`PUT /admin/v1/grades`,
//! `GET /admin/v1/grades/versions/{n}`, `POST /admin/v1/grades/reassess`
//! and `GET /admin/v1/stats/grades` (see [`crate::grading`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::records::{invalid_document, request_object};
use super::{json_response, AppState, Caller};
use crate::error::Problem;
use crate::grades::RuleSet;
use crate::grading::ActiveRules;

/// Longest reason of a change.
const MAX_REASON: usize = 2000;

fn body(doc: &Value) -> Result<Vec<u8>, Problem> {
    serde_json::to_vec(doc).map_err(|e| Problem::gateway(&e))
}

/// `GET /admin/v1/grades`: the rules in force and every version.
#[utoipa::path(get, path = "/admin/v1/grades", tag = "admin",
    responses((status = 200, description = "`{\"version\", \"rules\", \"versions\"}`: the grade rules in force", body = Object)))]
pub async fn rules(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    let active = state.reviews.grader.rules.load_full();
    let versions = state.ingest.store.grade_rule_versions().await?;
    Ok(json_response(
        StatusCode::OK,
        body(&json!({"version": active.version, "rules": active.set, "versions": versions}))?,
    ))
}

/// `GET /admin/v1/grades/versions/{n}`: one stored version.
#[utoipa::path(get, path = "/admin/v1/grades/versions/{n}", tag = "admin",
    params(("n" = String, Path, description = "Version number")),
    responses(
        (status = 200, description = "That version of the rule set", body = Object),
        (status = 404, description = "`version_not_found`: no such version"),
    ))]
pub async fn version(
    State(state): State<Arc<AppState>>,
    Path(n): Path<String>,
) -> Result<Response, Problem> {
    let not_found = || {
        Problem::caller(
            StatusCode::NOT_FOUND,
            "version_not_found",
            "no grade rule set version with this number",
        )
    };
    let n: u32 = n.parse().map_err(|_| not_found())?;
    let (version, rules) = state
        .ingest
        .store
        .grade_rules(Some(n))
        .await?
        .ok_or_else(not_found)?;
    Ok(json_response(
        StatusCode::OK,
        body(&json!({"version": version, "rules": rules}))?,
    ))
}

/// `PUT /admin/v1/grades` with `{"rules": {"grade": [...], "rule": [...]},
/// "reason": "..."}`: checks the rule set against the catalog, stores it as
/// the next version (audited), puts it in force and assesses every subject
/// again.
#[utoipa::path(put, path = "/admin/v1/grades", tag = "admin",
    request_body(content = Object, content_type = "application/json", description = "`{\"rules\": {grades, rules}, \"reason\"}`"),
    responses(
        (status = 200, description = "Activated as a new version; every subject is assessed again", body = Object),
        (status = 400, description = "`invalid_grade_rules`: the rule set has problems, listed with pointers"),
    ))]
pub async fn change(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body_in: Body,
) -> Result<Response, Problem> {
    let invalid = invalid_document("invalid_grade_rules", "grade rule set");
    let obj = request_object(&state, headers, body_in, &["rules", "reason"], &invalid).await?;
    let reason = match obj.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if !r.trim().is_empty() && r.chars().count() <= MAX_REASON => {
            Some(r.clone())
        }
        Some(_) => {
            return Err(invalid(
                "/reason",
                "must be a string of 1 to 2000 characters",
            ))
        }
    };
    let Some(doc) = obj.get("rules") else {
        return Err(invalid(
            "/rules",
            "is required: {\"grade\": [...], \"rule\": [...]}",
        ));
    };
    let catalog = state.ingest.catalog.load_full();
    let set = RuleSet::from_json(doc, &catalog).map_err(|errors| {
        let findings = errors
            .into_iter()
            .map(|e| {
                // "pointer: message", or a serde message about the whole.
                let (pointer, message) = match e.split_once(": ") {
                    Some((p, m)) if p.starts_with('/') => (format!("/rules{p}"), m.to_owned()),
                    _ => ("/rules".to_owned(), e.clone()),
                };
                crate::catalog::Finding {
                    pointer,
                    code: "invalid_grade_rules".into(),
                    message,
                }
            })
            .collect();
        Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_grade_rules",
            "the grade rule set document is not valid; nothing was changed",
        )
        .with_errors(findings)
    })?;
    let stored = serde_json::to_value(&set).map_err(|e| Problem::gateway(&e))?;
    let version = state
        .ingest
        .store
        .add_grade_rules(stored, &caller.id, reason)
        .await?;
    state.reviews.grader.replace(ActiveRules { version, set });
    tracing::info!(version, by = %caller.id, "grade rules changed; every subject is assessed again");
    Ok(json_response(
        StatusCode::OK,
        body(&json!({"version": version, "reassessing": true}))?,
    ))
}

/// `POST /admin/v1/grades/reassess`: assesses every subject again in the
/// background (after `credgate import`, for example).
#[utoipa::path(post, path = "/admin/v1/grades/reassess", tag = "admin",
    responses((status = 202, description = "Every subject will be assessed again in the background", body = Object)))]
pub async fn reassess(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Response, Problem> {
    state.reviews.grader.reassess_all();
    tracing::info!(by = %caller.id, "every subject's grade is assessed again");
    Ok(json_response(
        StatusCode::ACCEPTED,
        body(&json!({"reassessing": true}))?,
    ))
}

/// `GET /admin/v1/stats/grades`: assessed subjects per grade, in total and
/// per prefecture (the first four digits of the division code).
#[utoipa::path(get, path = "/admin/v1/stats/grades", tag = "admin",
    responses((status = 200, description = "Subjects per grade and per prefecture", body = Object)))]
pub async fn stats(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    let counts = state.ingest.store.grade_counts().await?;
    let rules = state.reviews.grader.rules.load_full();
    let mut totals: BTreeMap<String, u64> = rules
        .set
        .grades
        .iter()
        .map(|g| (g.code.clone(), 0))
        .collect();
    // prefecture code → grade → subjects
    let mut regions: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for c in &counts {
        *totals.entry(c.grade.clone()).or_default() += c.subjects;
        let prefecture = c
            .region
            .as_deref()
            .and_then(|r| r.get(..4))
            .map_or_else(|| "unknown".to_owned(), |p| format!("{p}00"));
        *regions
            .entry(prefecture)
            .or_default()
            .entry(c.grade.clone())
            .or_default() += c.subjects;
    }
    let grades: Vec<Value> = totals
        .iter()
        .map(|(code, n)| {
            let def = rules.set.grades.iter().find(|g| &g.code == code);
            json!({"grade": code, "name_zh": def.map(|g| g.name_zh.as_str()), "subjects": n})
        })
        .collect();
    let regions: Vec<Value> = regions
        .into_iter()
        .map(|(code, by_grade)| {
            json!({
                "region": code,
                "name_zh": crate::codes::division_name(&code),
                "subjects": by_grade.values().sum::<u64>(),
                "grades": by_grade,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        body(&json!({
            "rules_version": rules.version,
            "subjects": counts.iter().map(|c| c.subjects).sum::<u64>(),
            "grades": grades,
            "regions": regions,
        }))?,
    ))
}
