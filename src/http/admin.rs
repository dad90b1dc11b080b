//! Administrators: dead deliveries and their retry, feedback statistics.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;

use super::{json_response, AppState, Caller};
use crate::error::Problem;
use crate::store::DeliveryState;

/// Query of the delivery list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveryQuery {
    /// `pending`, `inflight`, `delivered` or `dead` (default).
    #[param(pattern = "^(pending|inflight|delivered|dead)$")]
    state: Option<String>,
    /// Most listed (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// `GET /admin/v1/deliveries?state=dead`.
#[utoipa::path(get, path = "/admin/v1/deliveries", tag = "admin",
    params(DeliveryQuery),
    responses(
        (status = 200, description = "`{\"state\", \"deliveries\": [...], \"paused_subscriptions\"}`", body = Object),
        (status = 400, description = "`invalid_query`: a parameter is not valid"),
    ))]
pub async fn deliveries(
    State(state): State<Arc<AppState>>,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let bad = || {
        Problem::caller(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "state must be pending, inflight, delivered or dead; limit 1-1000",
        )
    };
    let Query(q) = query.map_err(|_| bad())?;
    let wanted = match q.state.as_deref() {
        None => DeliveryState::Dead,
        Some(s) => DeliveryState::parse(s).ok_or_else(bad)?,
    };
    let limit = super::query::page_limit(q.limit).ok_or_else(bad)?;
    let list = state.ingest.store.deliveries(wanted, limit).await?;
    let body = serde_json::to_vec(&serde_json::json!({
        "state": wanted,
        "deliveries": list,
        "paused_subscriptions": state.dispatcher.paused(),
    }))
    .map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}

/// `POST /admin/v1/deliveries/{id}/retry`: a dead delivery back in the queue.
#[utoipa::path(post, path = "/admin/v1/deliveries/{id}/retry", tag = "admin",
    params(("id" = String, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "The delivery is pending again", body = Object),
        (status = 404, description = "`no_dead_delivery`: no dead delivery with this id"),
    ))]
pub async fn retry(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    if !state.ingest.store.retry_delivery(&id, &caller.id).await? {
        return Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "no_dead_delivery",
            "no dead delivery with this id",
        ));
    }
    tracing::info!(delivery = %id, admin = %caller.id, "dead delivery queued again by an administrator");
    let body = serde_json::to_vec(&serde_json::json!({"id": id, "state": DeliveryState::Pending}))
        .map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}

/// `GET /admin/v1/stats/feedback?from&to`: feedback rate per agency.
#[utoipa::path(get, path = "/admin/v1/stats/feedback", tag = "admin",
    params(super::query::PeriodQuery),
    responses(
        (status = 200, description = "`{\"from\", \"to\", \"agencies\": [...]}`: feedback per agency", body = Object),
        (status = 400, description = "`invalid_query`: a parameter is not valid"),
    ))]
pub async fn feedback_stats(
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
    let agencies = state.ingest.store.feedback_stats(from, to).await?;
    let body = serde_json::to_vec(&serde_json::json!({"from": from.format(&Rfc3339).unwrap_or_default(), "to": to.format(&Rfc3339).unwrap_or_default(), "agencies": agencies}))
        .map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}
