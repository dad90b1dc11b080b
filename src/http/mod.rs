//! HTTP shell over the use cases: routing, caller identification, quotas,
//! body limits and problem responses. Handlers stay thin; the domain lives
//! in `ingest`, `catalog` and `redact`.

pub mod admin;
pub mod admin_control;
mod bounded;
pub mod catalog;
pub mod console;
pub mod grades;
pub mod notices;
pub mod openapi;
pub mod ops;
pub mod pages;
pub mod public;
pub mod query;
pub mod records;
pub mod reviews;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::LimitsConfig;
use crate::error::Problem;
use crate::ingest::Ingest;
use crate::participants::{Participant, Registry};
use crate::ratelimit::{Decision, RateLimits};

/// The participant id proven by the TLS handshake of the connection a
/// request came on, and the SHA-256 (hex) of its certificate. Inserted by
/// the accept loop only.
#[derive(Debug, Clone)]
pub struct PeerId {
    /// Participant id from the certificate.
    pub id: Arc<str>,
    /// Fingerprint of the leaf certificate, for pinning.
    pub fingerprint: Arc<str>,
}

/// Shared state of the main listener's handlers.
pub struct AppState {
    /// Submission use case (holds catalog and store).
    pub ingest: Ingest,
    /// Participants registry, swappable at run time.
    pub registry: Arc<ArcSwap<Registry>>,
    /// Catalog, participants and subscriptions administration.
    pub control: Arc<crate::control::Control>,
    /// Input limits.
    pub limits: LimitsConfig,
    /// Per-participant quotas.
    pub rate: RateLimits,
    /// Per-request time limit.
    pub request_timeout: Duration,
    /// Large submissions validated at once on the blocking pool; more wait
    /// (within their deadline), so hostile bodies cannot take every core.
    pub validation_slots: tokio::sync::Semaphore,
    /// The egress choke point.
    pub redactor: Arc<crate::redact::Redactor>,
    /// Push delivery (for its operational state).
    pub dispatcher: Arc<crate::delivery::Dispatcher>,
    /// Cancelled at shutdown: long polls return at once.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// This gateway's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Credit review reports: signing key and settings.
    pub reviews: reviews::Reviews,
    /// The audit chain's verification, for the console and the admin API.
    pub audit_check: Arc<crate::audit::AuditCheck>,
    /// The console overview's figures.
    pub console_figures: Arc<console::Figures>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The main listener's routes, each registered from its handler's
/// `#[utoipa::path]` annotation, so the OpenAPI document lists every one.
pub fn api_router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(records::submit))
        .routes(routes!(records::read, records::correct))
        .routes(routes!(records::revisions))
        .routes(routes!(records::revoke))
        .routes(routes!(records::remove))
        .routes(routes!(reviews::issue))
        .routes(routes!(reviews::keys))
        .routes(routes!(reviews::read))
        .routes(routes!(reviews::lookup))
        .routes(routes!(notices::pull))
        .routes(routes!(notices::ack))
        .routes(routes!(notices::feedback))
        .routes(routes!(catalog::list))
        .routes(routes!(catalog::item))
        .routes(routes!(openapi::serve))
        .routes(routes!(admin::deliveries))
        .routes(routes!(admin::retry))
        .routes(routes!(admin::feedback_stats))
        .routes(routes!(admin_control::department_stats))
        .routes(routes!(grades::stats))
        .routes(routes!(grades::rules, grades::change))
        .routes(routes!(grades::version))
        .routes(routes!(grades::reassess))
        .routes(routes!(admin_control::audit))
        .routes(routes!(
            admin_control::audit_verification,
            admin_control::verify_audit
        ))
        .routes(routes!(console::overview))
        .routes(routes!(console::catalog))
        .routes(routes!(console::item))
        .routes(routes!(console::diff))
        .routes(routes!(console::participants))
        .routes(routes!(console::subscriptions))
        .routes(routes!(console::audit))
        .routes(routes!(console::script))
        .routes(routes!(console::style))
        .routes(routes!(admin_control::items))
        .routes(routes!(admin_control::item, admin_control::change_item))
        .routes(routes!(admin_control::versions))
        .routes(routes!(admin_control::version))
        .routes(routes!(admin_control::rollback))
        .routes(routes!(admin_control::participants))
        .routes(routes!(
            admin_control::participant,
            admin_control::put_participant
        ))
        .routes(routes!(admin_control::switch_participant))
        .routes(routes!(admin_control::subscriptions))
        .routes(routes!(
            admin_control::subscription,
            admin_control::put_subscription
        ))
        .routes(routes!(admin_control::switch_subscription))
}

/// The main listener's router.
pub fn router(state: Arc<AppState>) -> Router {
    let (routes, _) = api_router().split_for_parts();
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), identify))
        .layer(middleware::from_fn(console::problem_pages))
        .with_state(state)
}

async fn not_found() -> Problem {
    Problem::caller(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such resource; see the API reference in the README",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::caller(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this resource does not take that method",
    )
}

/// Resolves the connection's certificate identity to a registered,
/// enabled participant, applies its quota, and bounds the request's time.
async fn identify(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    // A body within the limit is read before anything can refuse the
    // request: a refusal answered while the client is still sending would
    // reach it as a connection reset (the socket closes with unread data),
    // not as the problem document. Larger bodies are left to the body
    // reader, which answers 413 after draining a moderate excess.
    // One time limit from arrival, for the body and the handler together.
    let arrived = tokio::time::Instant::now();
    let mut req = match receive_body(&state, req, arrived + state.request_timeout).await {
        Ok(req) => req,
        Err(p) => return p.into_response(),
    };
    let Some(PeerId { id, fingerprint }) = req.extensions().get::<PeerId>().cloned() else {
        return Problem::caller(
            StatusCode::FORBIDDEN,
            "no_identity",
            "the connection carries no verified client certificate",
        )
        .into_response();
    };
    let participant = state.registry.load().get(&id).cloned();
    let Some(participant) = participant else {
        tracing::info!(participant = %id, "certificate valid but participant not registered");
        return Problem::caller(
            StatusCode::FORBIDDEN,
            "unknown_participant",
            format!("the certificate names {id:?}, which is not a registered participant; ask the credit office to register it"),
        )
        .into_response();
    };
    if !participant.enabled {
        return Problem::caller(
            StatusCode::FORBIDDEN,
            "participant_disabled",
            "this participant is disabled; contact the credit office",
        )
        .into_response();
    }
    if !participant.certificate_sha256.is_empty()
        && !participant
            .certificate_sha256
            .iter()
            .any(|f| f.eq_ignore_ascii_case(&fingerprint))
    {
        tracing::warn!(participant = %id, "certificate is not among the participant's pinned certificates");
        return Problem::caller(
            StatusCode::FORBIDDEN,
            "certificate_not_pinned",
            "this certificate is not one the participant is registered with; ask the credit office to update the registration",
        )
        .into_response();
    }
    // A browser holding an administrator's certificate must not be made
    // to change anything from another site's page (cross-site request
    // forgery): changes from a browser come from this origin only. API
    // clients send neither header.
    if !req.method().is_safe()
        && cross_site(req.headers(), req.uri().authority().map(|a| a.as_str()))
    {
        tracing::warn!(participant = %id, "change refused: sent by a browser from another site");
        return Problem::caller(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            "a browser sent this change from another site's page; changes are taken from this origin only",
        )
        .into_response();
    }
    // Every /admin/ route and the console are for administrators only,
    // whatever the handler.
    let path = req.uri().path();
    if (path.starts_with("/admin/") || path == "/console" || path.starts_with("/console/"))
        && participant.kind != crate::participants::Kind::Admin
    {
        return Problem::caller(
            StatusCode::FORBIDDEN,
            "admins_only",
            "this route is for administrators of the credit office",
        )
        .into_response();
    }
    let remaining = match state.rate.check(&participant) {
        Decision::Allow { quota, remaining } => (quota, remaining),
        Decision::Deny { quota, retry_after } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let mut p = Problem::caller(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "request quota of {} per second (burst {}) exceeded; retry after {secs} s",
                    quota.per_second, quota.burst
                ),
            );
            p.retry_after = Some(secs);
            p.headers = vec![
                ("ratelimit-limit", quota.burst.to_string()),
                ("ratelimit-remaining", "0".into()),
                ("ratelimit-reset", secs.to_string()),
            ];
            return p.into_response();
        }
    };
    req.extensions_mut().insert(participant);
    // A long poll may legitimately wait on top of the normal time limit.
    let limit = if req.uri().path() == "/v1/notices" {
        state.request_timeout + Duration::from_secs(notices::MAX_WAIT_SECS)
    } else {
        state.request_timeout
    };
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = std::time::Instant::now();
    let mut resp = match tokio::time::timeout_at(arrived + limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => Problem::caller(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took too long to arrive or complete",
        )
        .into_response(),
    };
    let m = &state.metrics;
    m.http_requests
        .get_or_create(&crate::metrics::HttpLabels {
            route: route.clone(),
            status: resp.status().as_u16(),
        })
        .inc();
    m.http_duration
        .get_or_create(&crate::metrics::RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    let (quota, left) = remaining;
    let h = resp.headers_mut();
    h.insert("ratelimit-limit", quota.burst.into());
    h.insert("ratelimit-remaining", left.into());
    resp
}

/// Whether a browser says the request comes from another site's page:
/// `Sec-Fetch-Site` other than `same-origin` or `none` (typed by the user),
/// or an `Origin` whose host and port are not the request's (`Host`, or
/// the HTTP/2 `:authority`).
fn cross_site(headers: &HeaderMap, authority: Option<&str>) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return true;
        }
    }
    match (text("origin"), text("host").or(authority)) {
        (Some("null"), _) => true,
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_none_or(|(_, authority)| !authority.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// The request with its body read into memory when it declares a length
/// within `limits.max_body_bytes`, by `deadline`.
async fn receive_body(
    state: &AppState,
    req: Request,
    deadline: tokio::time::Instant,
) -> Result<Request, Problem> {
    let max = state.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if !declared.is_some_and(|n| n > 0 && n <= max) {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    let read = collect_body(body, declared.unwrap_or(0), max);
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(_)) => Err(Problem::caller(
            StatusCode::BAD_REQUEST,
            "body_read_failed",
            "the body could not be read to its declared length",
        )),
        Err(_) => Err(Problem::caller(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took too long to arrive or complete",
        )),
    }
}

/// Why a body could not be read whole.
#[derive(Debug)]
enum BodyError {
    /// It grew past the limit.
    TooLarge,
    /// The connection failed or the stream broke off.
    Broken,
}

/// Reads a body into one buffer of the declared size (`expected`), so a
/// large body is held once: collecting its frames and then joining them
/// would hold it twice at the peak. At most `max` bytes.
async fn collect_body(
    mut body: Body,
    expected: usize,
    max: usize,
) -> Result<bytes::Bytes, BodyError> {
    let mut buf = Vec::with_capacity(expected.min(max));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Broken)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(BodyError::TooLarge);
            }
            if expected > 0 && buf.is_empty() && data.len() == expected {
                // One frame holding it all: no copy.
                return Ok(data);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(bytes::Bytes::from(buf))
}

/// How much of an oversized body is read and discarded so the client gets
/// its 413 cleanly.
const DRAIN_LIMIT: u64 = 1024 * 1024;

/// Reads a JSON request body within the limits: media type (415), size
/// (413), nesting depth and syntax (400). Returns the raw bytes too, for
/// the idempotency digest.
pub async fn read_json(
    headers: &HeaderMap,
    body: Body,
    limits: &LimitsConfig,
) -> Result<bytes::Bytes, Problem> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    // Merge patches (admin PATCH) are JSON too.
    if media != "application/json" && media != "application/merge-patch+json" {
        return Err(Problem::caller(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    let too_large = || {
        Problem::caller(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the body exceeds {} bytes; split the batch",
                limits.max_body_bytes
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        // A client that is still sending would see a reset instead of the
        // 413 if the connection closed under it; read and discard a
        // moderate excess first, refuse a huge one at once.
        if declared.is_some_and(|n| n <= limits.max_body_bytes as u64 + DRAIN_LIMIT) {
            let _ =
                http_body_util::Limited::new(body, limits.max_body_bytes + DRAIN_LIMIT as usize)
                    .collect()
                    .await;
        }
        return Err(too_large());
    }
    let expected = declared.map_or(0, |n| n as usize);
    match collect_body(body, expected, limits.max_body_bytes).await {
        Ok(bytes) => Ok(bytes),
        Err(BodyError::TooLarge) => Err(too_large()),
        Err(BodyError::Broken) => Err(Problem::caller(
            StatusCode::BAD_REQUEST,
            "body_read_failed",
            "the request body could not be read completely",
        )),
    }
}

/// Parses JSON within the structural limits, enforced while parsing (so a
/// hostile body never becomes a huge in-memory document): nesting depth
/// (`400 too_deep`) and items per array (`413 too_many_items`, with the
/// pointer to the array). serde_json's own recursion limit (128) keeps the
/// parser's stack safe whatever the configured depth.
pub fn parse_json(raw: &[u8], limits: &LimitsConfig) -> Result<Value, Problem> {
    let max_depth = limits.max_json_depth;
    let too_deep = || {
        Problem::caller(
            StatusCode::BAD_REQUEST,
            "too_deep",
            format!("the document nests deeper than {max_depth} levels"),
        )
    };
    // A batch's own records array may always be as long as a batch.
    let max_items = limits.max_array_items.max(limits.max_batch_records);
    bounded::parse(raw, max_depth, max_items).map_err(|e| match e {
        Ok(bounded::Exceeded::Depth) => too_deep(),
        Ok(bounded::Exceeded::ArrayItems(pointer)) => Problem::caller(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_items",
            format!("an array in the body holds more than {max_items} items"),
        )
        .at(pointer, format!("holds more than {max_items} items")),
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => too_deep(),
        Err(e) => Problem::caller(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!(
                "the body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        ),
    })
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Whether the request's `If-None-Match` names `etag` (or `*`).
pub(crate) fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

/// The caller, as resolved by [`identify`].
pub type Caller = axum::Extension<Arc<Participant>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_limit_ignores_brackets_in_strings() {
        let limits = |depth| LimitsConfig {
            max_json_depth: depth,
            ..LimitsConfig::default()
        };
        assert!(parse_json(br#"{"a":"[[[[[[[[[[[[[[[["}"#, &limits(3)).is_ok());
        assert!(parse_json(br#"{"a":[[[1]]]}"#, &limits(3)).is_err());
        assert!(parse_json(br#"{"a":"\"[[[["}"#, &limits(2)).is_ok());
        let deeper_than_serde = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(
            parse_json(deeper_than_serde.as_bytes(), &limits(32))
                .err()
                .map(|p| p.code),
            Some("too_deep")
        );
        assert_eq!(
            parse_json(b"{", &limits(3)).err().map(|p| p.code),
            Some("malformed_json")
        );
    }

    #[test]
    fn long_arrays_are_refused_with_their_pointer() {
        let limits = LimitsConfig {
            max_array_items: 10,
            max_batch_records: 5,
            ..LimitsConfig::default()
        };
        let doc = format!(r#"{{"records": [{{"tags": [{}]}}]}}"#, ["1"; 11].join(","));
        let p = parse_json(doc.as_bytes(), &limits).expect_err("too long");
        assert_eq!((p.code, p.status.as_u16()), ("too_many_items", 413));
        assert_eq!(p.errors[0].pointer, "/records/0/tags");
        let ok = format!(r#"{{"tags": [{}]}}"#, ["1"; 10].join(","));
        assert!(parse_json(ok.as_bytes(), &limits).is_ok());
    }
}
