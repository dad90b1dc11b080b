//! `POST /v1/credit-reviews`, `GET /v1/credit-reviews/{report_id}`,
//! `GET /v1/credit-reviews/keys` and `POST /admin/v1/credit-reviews/lookup`:
//! signed credit review reports (see [`crate::review`]).
//!
//! Subject identifiers travel only in request bodies, never in a URL, a
//! log line or an error message.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::records::{invalid_document, request_object};
use super::{json_response, AppState, Caller};
use crate::config::ReviewConfig;
use crate::error::Problem;
use crate::participants::Kind;
use crate::review::{Purpose, Signer, Subject};
use crate::store::NewReview;

/// Signing key and settings of credit review reports.
#[derive(Debug)]
pub struct Reviews {
    /// The gateway's report signing key.
    pub signer: Signer,
    /// Look-back window and issuer names.
    pub config: ReviewConfig,
    /// Credit grades: the rules in force, kept current per subject.
    pub grader: Arc<crate::grading::Grader>,
}

/// Longest `purpose_detail`.
const MAX_PURPOSE_DETAIL: usize = 200;

/// Most reviews listed about one subject.
const MAX_LISTED_REVIEWS: usize = 1000;

/// Other identity documents' numbers are at most this long.
const MAX_ID_NUMBER: usize = 64;

fn review_not_found() -> Problem {
    Problem::caller(
        StatusCode::NOT_FOUND,
        "review_not_found",
        "no credit review report with this id was issued to the caller",
    )
}

/// The subject document `{"uscc"}` or `{"id_type", "id_number", "name"?}`
/// as the key its records are stored under. Never echoes a value.
fn subject_of(
    state: &AppState,
    doc: Option<&Value>,
    invalid: &impl Fn(&str, &str) -> Problem,
) -> Result<Subject, Problem> {
    let Some(Value::Object(obj)) = doc else {
        return Err(invalid(
            "/subject",
            "must be an object: {\"uscc\"} or {\"id_type\", \"id_number\"}",
        ));
    };
    let allowed = ["uscc", "id_type", "id_number", "name"];
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(
            &format!("/subject/{}", crate::catalog::escape_pointer(k)),
            "unknown field",
        ));
    }
    let text = |k: &str| obj.get(k).and_then(Value::as_str);
    if let Some(name) = obj.get("name") {
        if name.as_str().is_none_or(|n| n.chars().count() > 50) {
            return Err(invalid(
                "/subject/name",
                "must be a string of at most 50 characters",
            ));
        }
    }
    match (obj.get("uscc"), obj.get("id_number")) {
        (Some(_), Some(_)) => Err(invalid(
            "/subject",
            "give either uscc or id_type and id_number, not both",
        )),
        (Some(_), None) => {
            let Some(uscc) = text("uscc") else {
                return Err(invalid("/subject/uscc", "must be a string"));
            };
            if obj.contains_key("id_type") {
                return Err(invalid(
                    "/subject/id_type",
                    "only with id_number (a natural person)",
                ));
            }
            crate::codes::check_uscc(uscc).map_err(|e| {
                invalid(
                    "/subject/uscc",
                    &format!("is not a valid unified social credit code: {e}"),
                )
            })?;
            Ok(Subject::Uscc(uscc.to_owned()))
        }
        (None, Some(_)) => {
            let Some(id_type) = text("id_type") else {
                return Err(invalid(
                    "/subject/id_type",
                    "is required with id_number (resident_id, passport, hk_macao_permit, taiwan_permit, foreigner_permanent_residence, ...)",
                ));
            };
            let Some(number) = text("id_number") else {
                return Err(invalid("/subject/id_number", "must be a string"));
            };
            if id_type.is_empty() || id_type.chars().count() > 50 {
                return Err(invalid("/subject/id_type", "must be 1 to 50 characters"));
            }
            // Normalised as records are (upper-case X; a 15-digit number
            // in its 18-digit form), so the pseudonyms meet.
            let mut doc = json!({"id_type": id_type, "id_number": number});
            crate::ingest::normalise_codes(&mut doc, true);
            let number = doc["id_number"].as_str().unwrap_or_default().to_owned();
            if id_type == "resident_id" {
                crate::codes::check_resident_id(&number, crate::codes::today_cst()).map_err(
                    |e| {
                        invalid(
                            "/subject/id_number",
                            &format!("is not a valid resident identity number: {e}"),
                        )
                    },
                )?;
            } else if number.is_empty() || number.chars().count() > MAX_ID_NUMBER {
                return Err(invalid("/subject/id_number", "must be 1 to 64 characters"));
            }
            Ok(Subject::Person {
                pseudonym: state.redactor.pseudonym(&number),
                id_type: id_type.to_owned(),
            })
        }
        (None, None) => Err(invalid("/subject", "needs uscc, or id_type and id_number")),
    }
}

/// `POST /v1/credit-reviews`: issues, stores and answers a signed report.
#[utoipa::path(post, path = "/v1/credit-reviews", tag = "credit-reviews",
    request_body(content = ref("#/components/schemas/ReviewRequest"), content_type = "application/json"),
    responses(
        (status = 201, description = "The signed report (JSON; with `Accept: text/html` the printable page)", content(
            (Object = "application/json"), (String = "text/html"))),
        (status = 400, description = "`invalid_review_request`: the request is not valid"),
        (status = 403, description = "`reviewers_only`: reports are issued to agencies and administrators"),
    ))]
pub async fn issue(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    if !matches!(caller.kind, Kind::Agency | Kind::Admin) {
        return Err(Problem::caller(
            StatusCode::FORBIDDEN,
            "reviewers_only",
            "credit reviews are issued to agencies and administrators",
        ));
    }
    let invalid = invalid_document("invalid_review_request", "credit review request");
    let html = super::pages::wants_html(&headers);
    let obj: Map<String, Value> = request_object(
        &state,
        headers,
        body,
        &["subject", "purpose", "purpose_detail"],
        &invalid,
    )
    .await?;
    let subject = subject_of(&state, obj.get("subject"), &invalid)?;
    let codes: Vec<&str> = Purpose::ALL.iter().map(|p| p.as_str()).collect();
    let purpose = obj
        .get("purpose")
        .and_then(Value::as_str)
        .and_then(Purpose::parse)
        .ok_or_else(|| {
            invalid(
                "/purpose",
                &format!("is required: one of {}", codes.join(", ")),
            )
        })?;
    let detail = match obj.get("purpose_detail") {
        None | Some(Value::Null) => None,
        Some(Value::String(d))
            if !d.trim().is_empty() && d.chars().count() <= MAX_PURPOSE_DETAIL =>
        {
            Some(d.as_str())
        }
        Some(_) => {
            return Err(invalid(
                "/purpose_detail",
                "must be a string of 1 to 200 characters",
            ))
        }
    };
    if purpose == Purpose::Other && detail.is_none() {
        return Err(invalid(
            "/purpose_detail",
            "is required with purpose other: say what the review is for",
        ));
    }

    let catalog = state.ingest.catalog.load_full();
    // Every item: the cache holds the subject whole; assembly skips the
    // items without a punishment or incentive rule.
    let items: Vec<String> = catalog.items().map(|i| i.def.id.clone()).collect();
    let store = &state.ingest.store;
    let records = state
        .ingest
        .subjects
        .records(store.as_ref(), subject.key(), items)
        .await?;
    let today = crate::codes::today_cst();
    let grade = state.reviews.grader.grade(&catalog, &records, today);
    let report_id = uuid::Uuid::now_v7().to_string();
    let issued_at = time::OffsetDateTime::now_utc();
    let registry = state.registry.load();
    let config = &state.reviews.config;
    let report = crate::review::assemble(&crate::review::Inputs {
        report_id: &report_id,
        issued_at,
        today,
        look_back_years: config.look_back_years,
        issuer: (&config.issuer, &config.issuer_zh),
        asker: &caller,
        purpose,
        purpose_detail: detail,
        subject: &subject,
        records: records.as_slice(),
        grade: &grade,
        catalog: &catalog,
        registry: &registry,
        redactor: &state.redactor,
    });
    let document = state.reviews.signer.sign(report);
    store
        .add_review(NewReview {
            id: report_id.clone(),
            agency: caller.id.clone(),
            subject_key: subject.key().to_owned(),
            purpose: purpose.as_str().to_owned(),
            issued_at,
            document: document.clone(),
        })
        .await?;
    state
        .metrics
        .credit_reviews
        .get_or_create(&crate::metrics::ReviewLabels {
            agency: caller.id.clone(),
            purpose: purpose.as_str(),
        })
        .inc();
    tracing::info!(report = %report_id, agency = %caller.id, purpose = purpose.as_str(), "credit review report issued");
    let mut resp = if html {
        super::pages::html_response(StatusCode::CREATED, super::pages::report_html(&document)?)
    } else {
        json_response(StatusCode::CREATED, document)
    };
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/credit-reviews/{report_id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// `GET /v1/credit-reviews/{report_id}`: the report as issued, to the
/// participant that asked (or an administrator).
#[utoipa::path(get, path = "/v1/credit-reviews/{report_id}", tag = "credit-reviews",
    params(("report_id" = String, Path, description = "Report id (UUID)")),
    responses(
        (status = 200, description = "The report as issued (JSON; with `Accept: text/html` the printable page)", content(
            (Object = "application/json"), (String = "text/html"))),
        (status = 404, description = "`review_not_found`: no report with this id was issued to the caller"),
    ))]
pub async fn read(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(report_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    if uuid::Uuid::parse_str(&report_id).is_err() {
        return Err(review_not_found());
    }
    let review = state
        .ingest
        .store
        .review(&report_id)
        .await?
        .ok_or_else(review_not_found)?;
    if review.agency != caller.id && caller.kind != Kind::Admin {
        return Err(review_not_found());
    }
    if super::pages::wants_html(&headers) {
        let html = super::pages::report_html(&review.document)?;
        return Ok(super::pages::html_response(StatusCode::OK, html));
    }
    Ok(json_response(StatusCode::OK, review.document))
}

/// `GET /v1/credit-reviews/keys`: the keys reports are signed with.
#[utoipa::path(get, path = "/v1/credit-reviews/keys", tag = "credit-reviews",
    responses((status = 200, description = "`{\"keys\": [JWK]}`: the Ed25519 keys reports are signed with", body = Object)))]
pub async fn keys(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    let set = crate::review::KeySet {
        keys: vec![state.reviews.signer.public_key()],
    };
    let body = serde_json::to_vec(&set).map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}

/// `POST /admin/v1/credit-reviews/lookup` with `{"subject": …}`: who
/// asked about a subject, when and why (the subject's right to know).
#[utoipa::path(post, path = "/admin/v1/credit-reviews/lookup", tag = "admin",
    request_body(content = ref("#/components/schemas/ReviewLookup"), content_type = "application/json"),
    responses(
        (status = 200, description = "`{\"reviews\": [...], \"limit\"}`: who asked about the subject, when and why", body = Object),
        (status = 400, description = "`invalid_review_lookup`: not a subject document"),
    ))]
pub async fn lookup(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let invalid = invalid_document("invalid_review_lookup", "review lookup");
    let obj = request_object(&state, headers, body, &["subject"], &invalid).await?;
    let subject = subject_of(&state, obj.get("subject"), &invalid)?;
    let reviews = state
        .ingest
        .store
        .reviews_about(subject.key(), MAX_LISTED_REVIEWS)
        .await?;
    let body = serde_json::to_vec(&json!({"reviews": reviews, "limit": MAX_LISTED_REVIEWS}))
        .map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}
