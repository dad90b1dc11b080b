//! The public publicity channel (双公示 / 红黑名单公示): a third listener,
//! HTTPS without a client certificate, serving the `public` fields of
//! published records inside their publicity period.
//!
//! - `GET /public/v1/records?q=&item=&page=`: search by unified social
//!   credit code (exact) or part of a legal entity's name; natural
//!   persons are listed (masked) but never found by name.
//! - `GET /public/v1/records/{public_id}`: one record, by an id that is not
//!   the record id.
//! - `GET /public/`: a small Chinese search page over the same query.
//!
//! Per-client-address rate limits, `ETag` / `If-None-Match` and
//! `Cache-Control` on every answer.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use minijinja::context;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::catalog::Catalog;
use crate::config::PublicConfig;
use crate::error::Problem;
use crate::store::{PublicQuery, PublicRecord};

/// The client address of a public connection (set by the accept loop).
#[derive(Debug, Clone, Copy)]
pub struct PublicPeer(pub IpAddr);

/// What the public channel serves from.
pub struct PublicChannel {
    state: Arc<AppState>,
    cfg: PublicConfig,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Requests seen; every [`PRUNE_EVERY`] the limiter forgets addresses
    /// that are back to a full quota (a scan of every address, so not on
    /// every request).
    requests: std::sync::atomic::AtomicU64,
}

/// How often the per-address limiter is pruned, in requests.
const PRUNE_EVERY: u64 = 4096;

/// Deepest page (results beyond it: narrow the search).
const MAX_PAGE: u32 = 500;

/// Longest search text, characters.
const MAX_QUERY: usize = 50;

/// Query parameters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Search {
    /// A unified social credit code, or 2-50 characters of a legal
    /// entity's name.
    #[param(schema_with = crate::http::openapi::public_search_text)]
    pub q: Option<String>,
    /// One published catalog item.
    pub item: Option<String>,
    /// Page, from 1 to 500.
    #[param(schema_with = crate::http::openapi::public_page)]
    pub page: Option<String>,
}

/// The query, or the `invalid_query` problem when it cannot be read (say,
/// a broken percent-encoding) rather than the framework's plain text.
fn search_query(
    query: Result<Query<Search>, axum::extract::rejection::QueryRejection>,
) -> Result<Search, Problem> {
    query.map(|Query(s)| s).map_err(|_| {
        invalid(
            "",
            "the query string cannot be read: use q, item and page, percent-encoded as UTF-8",
        )
    })
}

/// The public routes, registered from their annotations.
pub fn api_router() -> OpenApiRouter<Arc<PublicChannel>> {
    OpenApiRouter::new()
        .routes(routes!(page))
        .routes(routes!(search))
        .routes(routes!(one))
}

/// Routes of the public listener.
pub fn router(state: Arc<AppState>, cfg: PublicConfig) -> Router {
    let per_second = NonZeroU32::new(cfg.per_address_per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(cfg.per_address_burst).unwrap_or(NonZeroU32::MIN);
    let channel = Arc::new(PublicChannel {
        state,
        limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        requests: std::sync::atomic::AtomicU64::new(0),
        cfg,
    });
    api_router()
        .split_for_parts()
        .0
        .fallback(|| async {
            Problem::caller(
                StatusCode::NOT_FOUND,
                "not_found",
                "the public channel serves /public/ and /public/v1/records",
            )
            .into_response()
        })
        .layer(axum::middleware::from_fn_with_state(
            channel.clone(),
            rate_limit,
        ))
        .with_state(channel)
}

async fn rate_limit(
    State(channel): State<Arc<PublicChannel>>,
    req: Request,
    next: Next,
) -> Response {
    let ip = req
        .extensions()
        .get::<PublicPeer>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0);
    if let Err(not_until) = channel.limiter.check_key(&ip) {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        let mut problem = Problem::caller(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests from this address; try again shortly",
        );
        problem.retry_after = Some(wait.as_secs().max(1));
        return problem.into_response();
    }
    let seen = channel
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if seen % PRUNE_EVERY == PRUNE_EVERY - 1 {
        channel.limiter.retain_recent();
        channel.limiter.shrink_to_fit();
    }
    next.run(req).await
}

fn invalid(pointer: &str, message: &str) -> Problem {
    Problem::caller(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        "the search is not valid",
    )
    .at(pointer, message)
}

/// The checked query for page `page` of the channel.
fn query(
    channel: &PublicChannel,
    s: &Search,
    catalog: &Catalog,
) -> Result<(PublicQuery, u32), Problem> {
    let page = match s.page.as_deref() {
        None | Some("") => 1,
        Some(p) => p
            .parse::<u32>()
            .ok()
            .filter(|p| (1..=MAX_PAGE).contains(p))
            .ok_or_else(|| invalid("/page", "must be a whole number from 1 to 500"))?,
    };
    let item = match s.item.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(i) => match catalog.get(i) {
            Some(x) if x.def.publicity.is_some() => Some(i.to_owned()),
            _ => return Err(invalid("/item", "is no published catalog item")),
        },
    };
    if s.q
        .as_deref()
        .is_some_and(|q| q.chars().count() > MAX_QUERY)
    {
        return Err(invalid("/q", "at most 50 characters"));
    }
    let text = s.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let (mut uscc, mut name) = (None, None);
    if let Some(q) = text {
        let upper = q.to_uppercase();
        if crate::codes::check_uscc(&upper).is_ok() {
            uscc = Some(upper);
        } else if q.chars().count() < 2 {
            return Err(invalid(
                "/q",
                "a unified social credit code, or at least 2 characters of a name",
            ));
        } else {
            name = Some(q.to_owned());
        }
    }
    let size = channel.cfg.page_size;
    Ok((
        PublicQuery {
            uscc,
            name,
            item,
            today: crate::codes::today_cst(),
            offset: (page - 1) * size,
            // One more than shown: whether a next page exists.
            limit: size + 1,
        },
        page,
    ))
}

/// A record as published.
fn view(channel: &PublicChannel, catalog: &Catalog, r: &PublicRecord) -> Value {
    let item = catalog.get(&r.item).map(|i| i.as_ref());
    let fields = channel.state.redactor.public_view(item, &r.body);
    json!({
        "public_id": r.public_id,
        "item": r.item,
        "item_name_zh": item.map(|i| i.def.name_zh.as_str()),
        "publicity": {"rule_set": r.rule_set, "from": r.start.to_string(), "until": r.end.to_string()},
        "record": fields,
    })
}

async fn results(
    channel: &PublicChannel,
    s: &Search,
) -> Result<(Value, Vec<Value>, u32, bool), Problem> {
    let catalog = channel.state.ingest.catalog.load_full();
    let (q, page) = query(channel, s, &catalog)?;
    let mut found = channel.state.ingest.store.public_records(q).await?;
    let more = found.len() > channel.cfg.page_size as usize;
    found.truncate(channel.cfg.page_size as usize);
    let records: Vec<Value> = found.iter().map(|r| view(channel, &catalog, r)).collect();
    Ok((published_items(&catalog), records, page, more))
}

/// The published items, for the page's choice of item.
fn published_items(catalog: &Catalog) -> Value {
    catalog
        .items()
        .filter(|i| i.def.publicity.is_some())
        .map(|i| json!({"id": i.def.id, "name_zh": i.def.name_zh}))
        .collect()
}

/// An answer with a validator and caching: `304` when the client has it.
fn cached(
    channel: &PublicChannel,
    headers: &HeaderMap,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response {
    use sha2::Digest;
    let etag = format!("\"{}\"", &hex::encode(sha2::Sha256::digest(&body))[..32]);
    let max_age = format!("public, max-age={}", channel.cfg.max_age_secs);
    let mut resp = if super::if_none_match(headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = (StatusCode::OK, body).into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&max_age) {
        h.insert(header::CACHE_CONTROL, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    resp
}

/// A field of a published record as the page shows it: its Chinese name,
/// and its value with coded values (`x-enum-zh`) in Chinese.
fn display(item: &crate::catalog::CatalogItem, key: &str, value: &Value) -> (String, String) {
    let label = item
        .fields
        .get(key)
        .map_or_else(|| key.to_owned(), |f| f.name_zh.clone());
    let spec = &item.def.schema["properties"][key];
    let zh = spec
        .get("x-enum-zh")
        .or_else(|| spec["items"].get("x-enum-zh"));
    let one = |v: &Value| match v {
        Value::String(s) => zh
            .and_then(|m| m.get(s))
            .and_then(Value::as_str)
            .unwrap_or(s)
            .to_owned(),
        other => other.to_string(),
    };
    let text = match value {
        Value::Array(values) => values.iter().map(one).collect::<Vec<_>>().join("、"),
        v => one(v),
    };
    (label, text)
}

/// `GET /public/v1/records`.
#[utoipa::path(get, path = "/public/v1/records", tag = "public", params(Search),
    responses(
        (status = 200, description = "`{\"records\": [...], \"page\", \"page_size\", \"more\"}`: records inside their publicity period, `public` fields only; with `ETag` and `Cache-Control`", body = Object),
        (status = 304, description = "Not modified"),
        (status = 400, description = "`invalid_query`: the search is not valid"),
        (status = 429, description = "`rate_limited`: too many requests from this address; see `Retry-After`"),
    ))]
async fn search(
    State(channel): State<Arc<PublicChannel>>,
    headers: HeaderMap,
    query: Result<Query<Search>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let s = search_query(query)?;
    let (_, records, page, more) = results(&channel, &s).await?;
    let body = serde_json::to_vec(&json!({
        "records": records,
        "page": page,
        "page_size": channel.cfg.page_size,
        "next_page": more.then_some(page + 1),
    }))
    .map_err(|e| Problem::gateway(&e))?;
    Ok(cached(&channel, &headers, "application/json", body))
}

/// `GET /public/v1/records/{public_id}`.
#[utoipa::path(get, path = "/public/v1/records/{public_id}", tag = "public",
    params(("public_id" = String, Path, description = "The record's public id (not its record id)")),
    responses(
        (status = 200, description = "The published record", body = Object),
        (status = 304, description = "Not modified"),
        (status = 404, description = "`record_not_found`: no record with this public id is published now"),
        (status = 429, description = "`rate_limited`: too many requests from this address; see `Retry-After`"),
    ))]
async fn one(
    State(channel): State<Arc<PublicChannel>>,
    headers: HeaderMap,
    Path(public_id): Path<String>,
) -> Result<Response, Problem> {
    let not_found = || {
        Problem::caller(
            StatusCode::NOT_FOUND,
            "record_not_found",
            "no published record with this id (it may have left publicity)",
        )
    };
    if public_id.len() > 64 || !public_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let r = channel
        .state
        .ingest
        .store
        .public_record(&public_id, crate::codes::today_cst())
        .await?
        .ok_or_else(not_found)?;
    let catalog = channel.state.ingest.catalog.load_full();
    let body =
        serde_json::to_vec(&view(&channel, &catalog, &r)).map_err(|e| Problem::gateway(&e))?;
    Ok(cached(&channel, &headers, "application/json", body))
}

/// `GET /public/`: the search page.
#[utoipa::path(get, path = "/public/", tag = "public", params(Search),
    responses(
        (status = 200, description = "The search page (Chinese, server-rendered, no script)", content_type = "text/html", body = String),
        (status = 304, description = "Not modified"),
        (status = 400, description = "The search page with the search's fault (`invalid_query`)", content_type = "text/html", body = String),
        (status = 429, description = "`rate_limited`: too many requests from this address; see `Retry-After`"),
    ))]
async fn page(
    State(channel): State<Arc<PublicChannel>>,
    headers: HeaderMap,
    query: Result<Query<Search>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let s = search_query(query);
    let found = match &s {
        Ok(s) => results(&channel, s).await,
        Err(p) => Err(p.clone()),
    };
    let s = s.unwrap_or_default();
    let catalog = channel.state.ingest.catalog.load_full();
    let (items, records, page, more, error) = match found {
        Ok((items, records, page, more)) => (items, records, page, more, None),
        Err(p) => {
            let why = p
                .errors
                .first()
                .map(|e| e.message.as_str())
                .unwrap_or_default();
            let error = (p.status, format!("{} {why}", p.detail));
            (published_items(&catalog), Vec::new(), 1, false, Some(error))
        }
    };
    // Result cards: each field by its Chinese name, coded values by theirs.
    let cards: Vec<Value> = records
        .iter()
        .map(|r| {
            let item = r["item"].as_str().and_then(|i| catalog.get(i));
            let rows: Vec<(String, String)> = r["record"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.as_str() != "subject_name")
                .map(|(k, v)| match item {
                    Some(item) => display(item, k, v),
                    None => (k.clone(), v.to_string()),
                })
                .collect();
            json!({
                "item_name_zh": r["item_name_zh"],
                "subject_name": r["record"]["subject_name"],
                "publicity": r["publicity"],
                "rows": rows,
            })
        })
        .collect();
    let html = super::pages::render(
        "public.html",
        context! {
            q => s.q.as_deref().unwrap_or_default(),
            item => s.item.as_deref().unwrap_or_default(),
            items => items,
            records => cards,
            page => page,
            next_page => more.then_some(page + 1),
            error => error.as_ref().map(|(_, text)| text),
        },
    );
    match html {
        Ok(html) => {
            let mut resp = cached(
                &channel,
                &headers,
                "text/html; charset=utf-8",
                html.into_bytes(),
            );
            // A bad search is the asker's fault: the page says why, with
            // the search's status.
            if let (Some((status, _)), StatusCode::OK) = (error, resp.status()) {
                *resp.status_mut() = status;
            }
            resp.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
                ),
            );
            resp
        }
        Err(p) => p.into_response(),
    }
}
