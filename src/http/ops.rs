//! The operations listener (plain HTTP, loopback by default): liveness and
//! readiness for orchestrators and load balancers, Prometheus metrics. It
//! serves no record data.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::store::Store;

/// What readiness depends on.
#[derive(Clone)]
pub struct OpsState {
    /// The store must accept writes.
    pub store: Arc<dyn Store>,
    /// Cancelled when shutdown starts: not ready any more.
    pub shutdown: CancellationToken,
    /// Served at `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The operations routes, registered from their annotations.
pub fn api_router() -> OpenApiRouter<OpsState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn router(state: OpsState) -> Router {
    api_router().split_for_parts().0.with_state(state)
}

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object)))]
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Prometheus / OpenMetrics text.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Metrics in the OpenMetrics text format",
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
async fn metrics(State(s): State<OpsState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// Readiness: the store accepts writes and shutdown has not begun.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "`{\"status\": \"ready\"}`", body = Object),
        (status = 503, description = "`{\"status\": \"shutting_down\"}` or `{\"status\": \"store_unavailable\"}`", body = Object),
    ))]
async fn ready(State(s): State<OpsState>) -> (StatusCode, Json<serde_json::Value>) {
    if s.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting_down"})),
        );
    }
    if s.store.ready().await {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "store_unavailable"})),
        )
    }
}
