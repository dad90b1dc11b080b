//! Agencies: `GET /v1/notices` (long-poll pull), `POST /v1/notices/ack`,
//! `POST /v1/notices/{notice_id}/feedback`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{json_response, parse_json, read_json, AppState, Caller};
use crate::agencies::{self, FeedbackRefused};
use crate::cursor::Cursor;
use crate::error::Problem;
use crate::participants::{Kind, Participant};
use crate::redact::NoticeView;
use crate::store::{Feedback, FeedbackOutcome};

/// Longest long-poll wait, seconds.
pub const MAX_WAIT_SECS: u64 = 30;
/// Most notices per pull.
pub const MAX_LIMIT: usize = 1000;

fn agency_only(caller: &Participant) -> Result<(), Problem> {
    if caller.kind == Kind::Agency {
        Ok(())
    } else {
        Err(Problem::caller(
            StatusCode::FORBIDDEN,
            "agencies_only",
            "only agencies receive notices",
        ))
    }
}

fn bad_query(detail: impl Into<String>) -> Problem {
    Problem::caller(StatusCode::BAD_REQUEST, "invalid_query", detail)
}

fn parse_cursor(s: &str) -> Result<Cursor, Problem> {
    crate::cursor::parse(s)
        .ok_or_else(|| bad_query("cursor must be a value returned as next_cursor"))
}

/// Query of a pull.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PullQuery {
    /// A `next_cursor` (or notice `cursor`) given earlier; without it, the
    /// agency's acknowledged position.
    after: Option<String>,
    /// Most notices in the page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Seconds to wait when none is ready (default 0).
    #[param(minimum = 0, maximum = 30)]
    wait: Option<u64>,
}

#[derive(Serialize)]
struct PullPage {
    notices: Vec<NoticeView>,
    next_cursor: String,
}

/// Notices for the caller after a cursor, redacted for its clearance;
/// waits up to `wait` seconds when none are ready.
#[utoipa::path(get, path = "/v1/notices", tag = "notices",
    params(PullQuery),
    responses(
        (status = 200, description = "Notices after the cursor, in order, redacted for the caller", body = inline(super::openapi::NoticePage)),
        (status = 400, description = "`invalid_query`: a parameter is out of range or the cursor was not given by the gateway"),
        (status = 403, description = "`agencies_only`: notices are for agencies"),
    ))]
pub async fn pull(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<PullQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    agency_only(&caller)?;
    let Query(q) = query.map_err(|_| {
        bad_query("allowed parameters: after (cursor), limit (1-1000), wait (0-30 seconds)")
    })?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(bad_query(format!("limit must be 1-{MAX_LIMIT}")));
    }
    let wait = q.wait.unwrap_or(0);
    if wait > MAX_WAIT_SECS {
        return Err(bad_query(format!("wait must be 0-{MAX_WAIT_SECS} seconds")));
    }
    let store = state.ingest.store.as_ref();
    let cursor = q.after.as_deref().map(parse_cursor).transpose()?;
    let after = agencies::position(store, &caller.id, cursor).await?;
    let batch = agencies::read(
        store,
        &caller.id,
        after,
        limit,
        Duration::from_secs(wait),
        &state.shutdown,
    )
    .await?;
    let catalog = state.ingest.catalog.load_full();
    let next = batch.last().map_or(after, |o| o.position);
    let notices = batch
        .iter()
        .map(|o| {
            state.redactor.notice_view(
                catalog.get(&o.notice.item).map(|i| i.as_ref()),
                &o.notice,
                &o.record,
                caller.clearance,
                Some(crate::cursor::encode(o.position)),
            )
        })
        .collect();
    let body = serde_json::to_vec(&PullPage {
        notices,
        next_cursor: crate::cursor::encode(next),
    })
    .map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}

/// Stores the caller's acknowledged position.
#[utoipa::path(post, path = "/v1/notices/ack", tag = "notices",
    request_body(content = ref("#/components/schemas/AckRequest"), content_type = "application/json"),
    responses(
        (status = 200, description = "The position is stored; a pull without `after` starts there", body = inline(super::openapi::AckAnswer)),
        (status = 400, description = "`invalid_document`, `invalid_query`: not `{\"cursor\": ...}` with a cursor the gateway gave"),
        (status = 403, description = "`agencies_only`: notices are for agencies"),
    ))]
pub async fn ack(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    agency_only(&caller)?;
    let raw = read_json(&headers, body, &state.limits).await?;
    let doc = parse_json(&raw, &state.limits)?;
    // Like every request document, only its own members (a typo such as
    // "cusor" must not pass as a valid acknowledgement of something else).
    if let Some(k) = doc
        .as_object()
        .and_then(|o| o.keys().find(|k| k.as_str() != "cursor"))
    {
        return Err(Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_document",
            "the acknowledgement is {\"cursor\": \"...\"} only",
        )
        .at(
            format!("/{}", crate::catalog::escape_pointer(k)),
            "unknown field",
        ));
    }
    let cursor = match doc.get("cursor") {
        Some(Value::String(c)) => {
            parse_cursor(c).map_err(|p| p.at("/cursor", "must be a next_cursor value"))?
        }
        _ => {
            return Err(Problem::caller(
                StatusCode::BAD_REQUEST,
                "invalid_document",
                "\"cursor\" (string) is required",
            )
            .at("/cursor", "is required"))
        }
    };
    let acknowledged =
        agencies::acknowledge(state.ingest.store.as_ref(), &caller.id, cursor).await?;
    let body = serde_json::to_vec(
        &serde_json::json!({"acknowledged": crate::cursor::encode(acknowledged)}),
    )
    .map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackBody {
    measure: String,
    outcome: FeedbackOutcome,
    date: Option<String>,
    note: Option<String>,
}

/// Longest feedback note.
const MAX_NOTE: usize = 2000;

/// An agency reports what it did about one measure of a notice it received.
#[utoipa::path(post, path = "/v1/notices/{notice_id}/feedback", tag = "notices",
    params(("notice_id" = String, Path, description = "Notice id")),
    request_body(content = ref("#/components/schemas/FeedbackRequest"), content_type = "application/json"),
    responses(
        (status = 200, description = "Feedback stored", body = inline(super::openapi::FeedbackAnswer)),
        (status = 400, description = "`invalid_feedback`: not a feedback document, or the measure is not the notice's"),
        (status = 403, description = "`agencies_only`: feedback comes from agencies"),
        (status = 404, description = "`notice_not_found`: the caller received no notice with this id"),
        (status = 409, description = "`lift_notice`: a lift notice takes no feedback"),
    ))]
pub async fn feedback(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(notice_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    agency_only(&caller)?;
    let raw = read_json(&headers, body, &state.limits).await?;
    let doc = parse_json(&raw, &state.limits)?;
    let invalid = |pointer: &str, msg: &str| {
        Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_feedback",
            "the feedback document is not valid",
        )
        .at(pointer, msg)
    };
    let fb: FeedbackBody = serde_json::from_value(doc).map_err(|_| {
        invalid("", "expected {\"measure\": string, \"outcome\": \"applied\"|\"not_applicable\"|\"pending\", \"date\": \"YYYY-MM-DD\", \"note\": string}")
    })?;
    let date = match fb.date.as_deref() {
        None => None,
        Some(d) => Some(
            crate::codes::parse_iso_date(d)
                .ok_or_else(|| invalid("/date", "must be a real date as YYYY-MM-DD"))?,
        ),
    };
    if fb.outcome == FeedbackOutcome::Applied && date.is_none() {
        return Err(invalid(
            "/date",
            "the date the measure was applied is required",
        ));
    }
    if fb.outcome == FeedbackOutcome::NotApplicable
        && fb.note.as_deref().is_none_or(|n| n.trim().is_empty())
    {
        return Err(invalid("/note", "say why the measure does not apply"));
    }
    if fb
        .note
        .as_deref()
        .is_some_and(|n| n.chars().count() > MAX_NOTE)
    {
        return Err(invalid("/note", "at most 2000 characters"));
    }
    let given = agencies::give_feedback(
        state.ingest.store.as_ref(),
        Feedback {
            notice_id: notice_id.clone(),
            agency: caller.id.clone(),
            measure: fb.measure,
            outcome: fb.outcome,
            date,
            note: fb.note,
            received_at: time::OffsetDateTime::now_utc(),
        },
    )
    .await?;
    match given {
        Ok(()) => {
            let body = serde_json::to_vec(
                &serde_json::json!({"notice_id": notice_id, "status": "stored"}),
            )
            .map_err(|e| Problem::gateway(&e))?;
            Ok(json_response(StatusCode::OK, body))
        }
        // "No such notice" and "not sent to you" get the same answer:
        // nothing about other agencies' notices is revealed.
        Err(FeedbackRefused::NotFound) => Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "notice_not_found",
            "no notice with this id was sent to the caller",
        )),
        Err(FeedbackRefused::Lift) => Err(Problem::caller(
            StatusCode::CONFLICT,
            "lift_notice",
            "feedback is given on punishment and incentive notices, not on lifts",
        )),
        Err(FeedbackRefused::UnknownMeasure) => Err(invalid(
            "/measure",
            "not a measure of this notice; see the notice's measures",
        )),
    }
}
