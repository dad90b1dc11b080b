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
use crate::notice::EndReason;
use crate::participants::Kind;
use crate::redact::{Audience, RecordView};
use crate::store::{EndOutcome, Ending, IdempotencyClaim, NoticeHistory};

/// Bodies up to this size are parsed and validated on the async worker
/// (microseconds); larger ones on the blocking pool.
const INLINE_BODY_BYTES: usize = 64 * 1024;

/// Submits a batch of records of one catalog item.
#[utoipa::path(post, path = "/v1/records", tag = "records",
    request_body(content = ref("#/components/schemas/Submission"), content_type = "application/json",
        description = "Records of one catalog item; each follows `record.<item>`"),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
        description = "1-255 visible ASCII characters; a repeat returns the first answer and stores nothing new")),
    responses(
        (status = 200, description = "The batch was read; per record `accepted`, `duplicate` or `rejected`. Accepted records are durably stored", body = inline(super::openapi::SubmissionResult)),
        (status = 400, description = "`invalid_idempotency_key`, `invalid_document`, `unknown_field`, `empty_batch`: the request is not a submission"),
        (status = 403, description = "`not_a_provider`: the caller is not a listed provider of the item"),
        (status = 404, description = "`unknown_item`: no such catalog item"),
        (status = 409, description = "`concurrent_submission`, `unknown_item`: the same key is being submitted now, or the item changed meanwhile; retry"),
        (status = 413, description = "`too_many_records`: more records than the batch limit"),
        (status = 422, description = "`idempotency_key_reused`: the key was used with another body"),
    ))]
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
        None if raw.len() <= INLINE_BODY_BYTES => {
            let doc = parse_json(&raw, &state.limits)?;
            state.ingest.submit(&caller, doc, claim).await?
        }
        None => {
            // Parsing and validating a large body takes milliseconds of
            // CPU: do it on the blocking pool, a few at a time, within the
            // request's deadline, so the async workers keep serving
            // everyone else.
            let deadline = std::time::Instant::now() + state.request_timeout;
            let _slot = state
                .validation_slots
                .acquire()
                .await
                .map_err(|e| Problem::gateway(&e))?;
            let (st, who) = (state.clone(), caller.0.clone());
            let prepared = tokio::task::spawn_blocking(move || {
                let doc = parse_json(&raw, &st.limits)?;
                st.ingest.prepare(&who, doc, claim, Some(deadline))
            })
            .await
            .map_err(|e| Problem::gateway(&e))??;
            state.ingest.commit(prepared).await?
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
    #[serde(skip_serializing_if = "Option::is_none")]
    end_reason: Option<String>,
    revision: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    removal: Option<RecordView>,
    decision_date: Option<String>,
    effective_until: Option<String>,
    received_at: String,
    warnings: Vec<Finding>,
    record: RecordView,
    notices: Vec<NoticeHistory>,
}

fn record_not_found() -> Problem {
    Problem::caller(
        StatusCode::NOT_FOUND,
        "record_not_found",
        "no record with this id is visible to the caller",
    )
}

/// The record if the caller may see it — its submitter (whole) or an
/// administrator (up to its clearance); for anyone else it does not exist.
async fn visible_record(
    state: &AppState,
    caller: &crate::participants::Participant,
    record_id: &str,
) -> Result<(crate::store::StoredRecord, Audience), Problem> {
    if uuid::Uuid::parse_str(record_id).is_err() {
        return Err(record_not_found());
    }
    let rec = state
        .ingest
        .store
        .record(record_id)
        .await?
        .ok_or_else(record_not_found)?;
    let audience = if rec.submitter == caller.id {
        Audience::Originator
    } else if caller.kind == Kind::Admin {
        Audience::Cleared(caller.clearance)
    } else {
        return Err(record_not_found());
    };
    Ok((rec, audience))
}

/// Reads one record back (see [`visible_record`] for who sees what).
#[utoipa::path(get, path = "/v1/records/{record_id}", tag = "records",
    params(("record_id" = String, Path, description = "Record id (UUID)")),
    responses(
        (status = 200, description = "The record, its notices and their feedback", body = inline(super::openapi::RecordDocument)),
        (status = 404, description = "`record_not_found`: no record with this id is visible to the caller"),
    ))]
pub async fn read(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(record_id): Path<String>,
) -> Result<Response, Problem> {
    let (rec, audience) = visible_record(&state, &caller, &record_id).await?;
    let catalog = state.ingest.catalog.load();
    let item = catalog.get(&rec.item).map(|i| i.as_ref());
    let view = state.redactor.record_view(item, &rec.body, audience);
    let removal = rec
        .removal
        .as_ref()
        .map(|r| state.redactor.removal_view(item, r, audience));
    let notices = state.ingest.store.record_notices(&rec.id).await?;
    let doc = RecordDocument {
        record_id: rec.id,
        item: rec.item,
        item_version: rec.item_version,
        submitter: rec.submitter,
        subject_type: rec.subject_type,
        status: rec.status,
        end_reason: rec.end_reason,
        revision: rec.revision,
        removal,
        decision_date: rec.decision_date.map(|d| d.to_string()),
        effective_until: rec.effective_until.map(|d| d.to_string()),
        received_at: rec.received_at.format(&Rfc3339).unwrap_or_default(),
        warnings: rec.warnings,
        record: view,
        notices,
    };
    let body = serde_json::to_vec(&doc).map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body).into_response())
}

/// A problem builder for a small request document of `kind`: `code`, and
/// one finding at a pointer.
pub(super) fn invalid_document(
    code: &'static str,
    kind: &'static str,
) -> impl Fn(&str, &str) -> Problem {
    move |pointer, msg| {
        Problem::caller(
            StatusCode::BAD_REQUEST,
            code,
            format!("the {kind} document is not valid"),
        )
        .at(pointer, msg)
    }
}

/// Reads a small request document: a JSON object with only the `allowed`
/// members.
pub(super) async fn request_object(
    state: &AppState,
    headers: HeaderMap,
    body: Body,
    allowed: &[&str],
    invalid: &impl Fn(&str, &str) -> Problem,
) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
    let raw = read_json(&headers, body, &state.limits).await?;
    let serde_json::Value::Object(obj) = parse_json(&raw, &state.limits)? else {
        return Err(invalid(
            "",
            &format!("must be an object with the members {}", allowed.join(", ")),
        ));
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(
            &format!("/{}", crate::catalog::escape_pointer(k)),
            "unknown field",
        ));
    }
    Ok(obj)
}

/// Longest revocation note.
const MAX_NOTE: usize = 2000;

/// `POST /v1/records/{record_id}/revocation`: ends the record's effect and
/// sends a lift notice to every agency that received one of its notices.
#[utoipa::path(post, path = "/v1/records/{record_id}/revocation", tag = "records",
    params(("record_id" = String, Path, description = "Record id (UUID)")),
    request_body(content = ref("#/components/schemas/RevocationRequest"), content_type = "application/json"),
    responses(
        (status = 200, description = "Ended; lift notices sent to every agency that got its notices", body = inline(super::openapi::EndAnswer)),
        (status = 400, description = "`invalid_revocation`: the document is not a revocation"),
        (status = 404, description = "`record_not_found`: no record with this id is visible to the caller"),
        (status = 409, description = "`already_ended`: the record's effect has already ended"),
    ))]
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(record_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let invalid = invalid_document("invalid_revocation", "revocation");
    let obj = request_object(&state, headers, body, &["reason", "note"], &invalid).await?;
    let reason = match obj
        .get("reason")
        .and_then(|v| v.as_str())
        .and_then(EndReason::parse)
    {
        Some(r) => r,
        _ => {
            return Err(invalid(
                "/reason",
                "must be repaired, revoked, corrected or expired (removal: POST /v1/records/{record_id}/removal)",
            ))
        }
    };
    let note = match obj.get("note") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(n)) if n.chars().count() <= MAX_NOTE => Some(n.clone()),
        Some(_) => {
            return Err(invalid(
                "/note",
                "must be a string of at most 2000 characters",
            ))
        }
    };
    if reason == EndReason::Removed {
        return Err(invalid(
            "/reason",
            "a removal from a list needs its removal document: POST /v1/records/{record_id}/removal",
        ));
    }
    // Only the submitter or an administrator may end a record's effect.
    let (rec, _) = visible_record(&state, &caller, &record_id).await?;
    end(
        &state,
        &caller,
        &rec,
        Ending {
            note,
            ..Ending::new(reason)
        },
        None,
    )
    .await
}

/// `POST /v1/records/{record_id}/removal`: removes a listing from its list
/// (移出) with the item's removal document, and sends a lift notice with
/// reason `removed` to every agency that received one of its notices.
#[utoipa::path(post, path = "/v1/records/{record_id}/removal", tag = "records",
    params(("record_id" = String, Path, description = "Record id (UUID)")),
    request_body(content = Object, content_type = "application/json",
        description = "The item's removal document (`removal.schema` of the catalog item)"),
    responses(
        (status = 200, description = "Removed from the list; lift notices with reason `removed` sent", body = inline(super::openapi::EndAnswer)),
        (status = 400, description = "`invalid_removal`: the removal document is not valid for this list"),
        (status = 404, description = "`record_not_found`: no record with this id is visible to the caller"),
        (status = 409, description = "`not_a_list`, `already_ended`: the record is not a list entry, or its effect has ended"),
    ))]
pub async fn remove(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(record_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let raw = read_json(&headers, body, &state.limits).await?;
    let doc = parse_json(&raw, &state.limits)?;
    let (rec, _) = visible_record(&state, &caller, &record_id).await?;
    let catalog = state.ingest.catalog.load_full();
    let item = catalog.get(&rec.item).ok_or_else(record_not_found)?;
    let Some(validation) = item.validate_removal(
        &doc,
        rec.decision_date,
        state.limits.max_findings_per_record,
    ) else {
        return Err(Problem::caller(
            StatusCode::CONFLICT,
            "not_a_list",
            format!(
                "records of {} are not list entries and cannot be removed; end their effect with POST /v1/records/{{record_id}}/revocation",
                rec.item
            ),
        ));
    };
    if rec.status != "active" {
        return Err(Problem::already_ended(&rec.status));
    }
    if !validation.errors.is_empty() {
        return Err(Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_removal",
            "the removal document is not valid for this list; nothing was changed",
        )
        .with_errors(validation.errors));
    }
    let date_field = item
        .def
        .removal
        .as_ref()
        .map_or("removal_date", |r| r.date_field.as_str());
    let on = doc
        .get(date_field)
        .and_then(serde_json::Value::as_str)
        .and_then(crate::codes::parse_iso_date);
    let text = serde_json::to_string(&doc).map_err(|e| Problem::gateway(&e))?;
    end(
        &state,
        &caller,
        &rec,
        Ending {
            removal: Some(text),
            on,
            ..Ending::new(EndReason::Removed)
        },
        Some(doc),
    )
    .await
}

/// Ends a record's effect and answers with the lift notices sent.
async fn end(
    state: &AppState,
    caller: &crate::participants::Participant,
    rec: &crate::store::StoredRecord,
    ending: Ending,
    removal: Option<serde_json::Value>,
) -> Result<Response, Problem> {
    let reason = ending.reason;
    let record_id = rec.id.as_str();
    let outcome = state
        .ingest
        .store
        .end_record(record_id, ending, &caller.id)
        .await?;
    if let Some(key) = rec.body.subject_key(&state.redactor) {
        // Ended or not (a concurrent end), the subject's state moved.
        state.ingest.subjects.invalidate(&key);
    }
    match outcome {
        EndOutcome::Ended {
            lift_notices,
            recipients,
        } => {
            tracing::info!(record = %record_id, by = %caller.id, reason = reason.as_str(), lifts = lift_notices.len(), "record effect ended");
            let mut doc = serde_json::json!({
                "record_id": record_id,
                "status": reason.record_status(),
                "reason": reason,
                "lift_notices": lift_notices,
                "recipients": recipients,
            });
            if let Some(removal) = removal {
                doc["removal"] = removal;
            }
            let body = serde_json::to_vec(&doc).map_err(|e| Problem::gateway(&e))?;
            Ok(json_response(StatusCode::OK, body))
        }
        EndOutcome::NotFound => Err(record_not_found()),
        EndOutcome::AlreadyEnded(status) => Err(Problem::already_ended(&status)),
    }
}

/// Longest correction reason.
const MAX_REASON: usize = 2000;

/// `PUT /v1/records/{record_id}`: corrects a record with its whole new
/// content, `{"record": {...}, "reason": "...", "revision": N}` (`revision`
/// optional: the revision corrected, refused if another correction came
/// first).
#[utoipa::path(put, path = "/v1/records/{record_id}", tag = "records",
    params(("record_id" = String, Path, description = "Record id (UUID)")),
    request_body(content = ref("#/components/schemas/CorrectionRequest"), content_type = "application/json"),
    responses(
        (status = 200, description = "Corrected: a new revision; `correction` notices sent", body = Object),
        (status = 400, description = "`invalid_correction`, `invalid_record`: the correction or the corrected record is not valid"),
        (status = 404, description = "`record_not_found`: no record with this id is visible to the caller"),
        (status = 409, description = "`already_ended`, `revision_changed`, `duplicate_key`: the record ended, another correction came first, or the new content is another record's"),
    ))]
pub async fn correct(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(record_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let invalid = invalid_document("invalid_correction", "correction");
    let mut obj = request_object(
        &state,
        headers,
        body,
        &["record", "reason", "revision"],
        &invalid,
    )
    .await?;
    let reason = match obj.get("reason") {
        Some(serde_json::Value::String(r))
            if !r.trim().is_empty() && r.chars().count() <= MAX_REASON =>
        {
            r.clone()
        }
        _ => {
            return Err(invalid(
                "/reason",
                "is required: why the record is corrected (1-2000 characters)",
            ))
        }
    };
    let revision = match obj.get("revision") {
        None | Some(serde_json::Value::Null) => None,
        // 3 and 3.0 are the same JSON number (RFC 8259; JSON Schema
        // counts both as integers).
        Some(v) => match crate::codes::json_whole_number(v).and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n > 0 => Some(n),
            _ => {
                return Err(invalid(
                    "/revision",
                    "must be a revision number (1 or more)",
                ))
            }
        },
    };
    let record = match obj.remove("record") {
        Some(r @ serde_json::Value::Object(_)) => r,
        _ => {
            return Err(invalid(
                "/record",
                "is required: the whole corrected record (an object)",
            ))
        }
    };
    let (current, _) = visible_record(&state, &caller, &record_id).await?;
    let answer = state
        .ingest
        .correct(&caller, &current, record, reason, revision)
        .await?;
    let body = serde_json::to_vec(&answer).map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}

#[derive(Serialize)]
struct RevisionView {
    #[serde(flatten)]
    revision: crate::store::Revision,
    record: RecordView,
}

/// `GET /v1/records/{record_id}/revisions`: the earlier revisions of a
/// record, oldest first, each as its reader may see it.
#[utoipa::path(get, path = "/v1/records/{record_id}/revisions", tag = "records",
    params(("record_id" = String, Path, description = "Record id (UUID)")),
    responses(
        (status = 200, description = "`{\"record_id\", \"revisions\": [...]}`: earlier revisions, oldest first", body = Object),
        (status = 404, description = "`record_not_found`: no record with this id is visible to the caller"),
    ))]
pub async fn revisions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(record_id): Path<String>,
) -> Result<Response, Problem> {
    let (rec, audience) = visible_record(&state, &caller, &record_id).await?;
    let catalog = state.ingest.catalog.load();
    let item = catalog.get(&rec.item).map(|i| i.as_ref());
    let revisions: Vec<RevisionView> = state
        .ingest
        .store
        .revisions(&rec.id)
        .await?
        .into_iter()
        .map(|r| RevisionView {
            record: state.redactor.record_view(item, &r.body, audience),
            revision: r,
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "record_id": rec.id,
        "current_revision": rec.revision,
        "revisions": revisions,
    }))
    .map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}
