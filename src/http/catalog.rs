//! `GET /v1/catalog` and `GET /v1/catalog/items/{item_id}`: what departments
//! submit against. Both carry an `ETag` so integrators can poll cheaply
//! (`If-None-Match` → 304).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{json_response, AppState};
use crate::catalog::{CatalogItem, Measure, NoticeType, SubjectType};
use crate::error::Problem;

#[derive(Serialize)]
struct Summary<'a> {
    id: &'a str,
    version: u32,
    name: &'a str,
    name_zh: &'a str,
    subject_types: &'a [SubjectType],
    providers: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    notice_type: Option<NoticeType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    measures: Option<&'a [Measure]>,
    href: String,
}

fn summary(item: &CatalogItem) -> Summary<'_> {
    Summary {
        id: &item.def.id,
        version: item.def.version,
        name: &item.def.name,
        name_zh: &item.def.name_zh,
        subject_types: &item.def.subject_types,
        providers: &item.def.providers,
        notice_type: item.def.notice.as_ref().map(|n| n.notice_type),
        measures: item.def.notice.as_ref().map(|n| n.measures.as_slice()),
        href: format!("/v1/catalog/items/{}", item.def.id),
    }
}

fn with_etag(
    headers: &HeaderMap,
    etag: &str,
    body: impl FnOnce() -> Result<Vec<u8>, Problem>,
) -> Result<Response, Problem> {
    let etag_value = HeaderValue::from_str(etag).map_err(|e| Problem::gateway(&e))?;
    let mut resp = if super::if_none_match(headers, etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        json_response(StatusCode::OK, body()?)
    };
    resp.headers_mut().insert(header::ETAG, etag_value);
    Ok(resp)
}

/// Lists the active items.
#[utoipa::path(get, path = "/v1/catalog", tag = "catalog",
    params(("If-None-Match" = Option<String>, Header, description = "ETag of a copy held")),
    responses(
        (status = 200, description = "`{\"items\": [...]}`: the active catalog items, with an `ETag`", body = Object),
        (status = 304, description = "Not modified"),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let catalog = state.ingest.catalog.load_full();
    with_etag(&headers, catalog.etag(), || {
        let items: Vec<_> = catalog.items().map(|i| summary(i)).collect();
        serde_json::to_vec(&serde_json::json!({ "etag": catalog.etag(), "items": items }))
            .map_err(|e| Problem::gateway(&e))
    })
}

/// The full active definition of one item, schema included.
#[utoipa::path(get, path = "/v1/catalog/items/{item_id}", tag = "catalog",
    params(("item_id" = String, Path, description = "Catalog item id"),
        ("If-None-Match" = Option<String>, Header, description = "ETag of a copy held")),
    responses(
        (status = 200, description = "The active definition of the item, with an `ETag`", body = Object),
        (status = 304, description = "Not modified"),
        (status = 404, description = "`unknown_item`: no such catalog item"),
    ))]
pub async fn item(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(item_id): Path<String>,
) -> Result<Response, Problem> {
    let catalog = state.ingest.catalog.load_full();
    let Some(item) = catalog.get(&item_id) else {
        return Err(Problem::caller(
            StatusCode::NOT_FOUND,
            "unknown_item",
            "no catalog item has this id; GET /v1/catalog lists them",
        ));
    };
    let etag = format!("\"{}-v{}\"", item.def.id, item.def.version);
    with_etag(&headers, &etag, || {
        serde_json::to_vec(&item.def).map_err(|e| Problem::gateway(&e))
    })
}
