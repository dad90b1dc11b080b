//! `POST /v1/records` and `GET /v1/records/{record_id}`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use super::{json_response, parse_json, read_json, AppState, Caller};
use crate::catalog::Finding;
use crate::error::Problem;
use crate::ingest::{request_hash, MAX_IDEMPOTENCY_KEY};
use crate::participants::Kind;
use crate::redact::{self, Audience, RecordView};
use crate::store::IdempotencyClaim;

/// Submits a batch of records of one catalog item.
pub async fn submit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k)
                if !k.is_empty()
                    && k.len() <= MAX_IDEMPOTENCY_KEY
                    && k.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Some(k.to_owned())
            }
            _ => {
                return Err(Problem::caller(
                    StatusCode::BAD_REQUEST,
                    "invalid_idempotency_key",
                    format!(
                        "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                    ),
                ))
            }
        },
    };
    let raw = read_json(&headers, body, &state.limits).await?;
    let claim = key.map(|key| IdempotencyClaim {
        key,
        request_hash: request_hash(&raw),
    });
    let answer = match &claim {
        Some(c) => {
            state
                .ingest
                .replay(&caller, &c.key, &c.request_hash)
                .await?
        }
        None => None,
    };
    let answer = match answer {
        Some(a) => a,
        None => {
            let doc = parse_json(&raw, state.limits.max_json_depth)?;
            state.ingest.submit(&caller, doc, claim).await?
        }
    };
    let mut resp = json_response(answer.status, answer.body);
    if answer.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[derive(Serialize)]
struct RecordDocument {
    record_id: String,
    item: String,
    item_version: u32,
    submitter: String,
    subject_type: String,
    status: String,
    decision_date: Option<String>,
    received_at: String,
    warnings: Vec<Finding>,
    record: RecordView,
    notices: Vec<serde_json::Value>,
    feedback: Vec<serde_json::Value>,
}

/// Reads one record back: the submitter sees it whole, an administrator as
/// far as its clearance allows; for anyone else it does not exist.
pub async fn read(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(record_id): Path<String>,
) -> Result<Response, Problem> {
    let not_found = || {
        Problem::caller(
            StatusCode::NOT_FOUND,
            "record_not_found",
            "no record with this id is visible to the caller",
        )
    };
    if uuid::Uuid::parse_str(&record_id).is_err() {
        return Err(not_found());
    }
    let Some(rec) = state.ingest.store.record(&record_id).await? else {
        return Err(not_found());
    };
    let audience = if rec.submitter == caller.id {
        Audience::Originator
    } else if caller.kind == Kind::Admin {
        Audience::Cleared(caller.clearance)
    } else {
        return Err(not_found());
    };
    let catalog = state.ingest.catalog.load();
    let view = redact::view(
        catalog.get(&rec.item).map(|i| i.as_ref()),
        &rec.body,
        audience,
    );
    let doc = RecordDocument {
        record_id: rec.id,
        item: rec.item,
        item_version: rec.item_version,
        submitter: rec.submitter,
        subject_type: rec.subject_type,
        status: rec.status,
        decision_date: rec.decision_date.map(|d| d.to_string()),
        received_at: rec.received_at.format(&Rfc3339).unwrap_or_default(),
        warnings: rec.warnings,
        record: view,
        notices: Vec::new(),
        feedback: Vec::new(),
    };
    let body = serde_json::to_vec(&doc).map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body).into_response())
}
