//! The operations listener (plain HTTP, loopback by default): liveness and
//! readiness for orchestrators and load balancers, Prometheus metrics. It
//! serves no record data.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

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

/// `/healthz` and `/readyz`.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route(
            "/metrics",
            get(|State(s): State<OpsState>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    s.metrics.render(),
                )
            }),
        )
        .with_state(state)
}

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
