//! The OpenAPI 3.1 document of every route the gateway serves, generated
//! from the handlers' `#[utoipa::path]` annotations (the routers are built
//! from the same annotations, so a route cannot exist undocumented) and
//! completed at serve time with what only the running gateway knows:
//!
//! - the record schemas: each active catalog item's own JSON Schema, as
//!   `record.<item>`, and the submission body as one alternative per item;
//! - the problem responses: every 4xx/5xx answer is
//!   `application/problem+json`, and its `code` is limited to the codes
//!   the annotation names (in backquotes in its description), so a client
//!   and a contract tester see the same list as the code;
//! - the answers every request on the mTLS listener may get from the
//!   middleware (identity, quota, time limit, store unavailable) and every
//!   request with a body from the body reader (media type, size, syntax).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::openapi::schema::{
    AnyOfBuilder, KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type,
};
use utoipa::openapi::security::SecurityScheme;
use utoipa::{Modify, OpenApi, ToSchema};

use super::{json_response, AppState};
use crate::catalog::Catalog;
use crate::config::LimitsConfig;
use crate::error::Problem;

/// Media type of every error answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The static part of the document: info, tags, security, shared schemas.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "credgate",
        description = "Gateway of the provincial public credit information system \
            (公共信用信息归集共享网关): departments submit records against the credit \
            information collection catalog, agencies receive dishonesty notices, \
            administrators run the catalog. The main listener requires a client \
            certificate (mutual TLS) that names a registered participant; the public \
            listener needs none; the operations listener is plain HTTP on loopback.",
        license(name = "Proprietary")
    ),
    components(schemas(
        ProblemDoc,
        FindingDoc,
        SubmissionDoc,
        SubmissionResult,
        RecordResult,
        RecordDocument,
        NoticeDoc,
        NoticePage,
        AckAnswer,
        FeedbackAnswer,
        EndAnswer
    )),
    tags(
        (name = "records", description = "Departments: submit, read, correct and end records (归集)"),
        (name = "notices", description = "Agencies: joint punishment notices and feedback (联合奖惩)"),
        (name = "catalog", description = "Anyone registered: the collection catalog (归集目录)"),
        (name = "credit-reviews", description = "Agencies: signed credit review reports (信用审查)"),
        (name = "admin", description = "Administrators of the credit office"),
        (name = "public", description = "Public publicity channel (信用公示), no client certificate"),
        (name = "ops", description = "Operations listener: liveness, readiness, metrics")
    ),
    modifiers(&MutualTls)
)]
pub struct ApiDoc;

struct MutualTls;

impl Modify for MutualTls {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "mutualTLS",
            SecurityScheme::MutualTls {
                description: Some(
                    "The client certificate (issued by the credit office's CA) names the \
                     participant; see the README's participant list."
                        .into(),
                ),
                extensions: None,
                deprecated: None,
            },
        );
    }
}

/// An RFC 9457 problem, as every error answer carries it.
#[derive(Serialize, ToSchema)]
#[schema(as = Problem)]
#[allow(dead_code)]
pub struct ProblemDoc {
    /// `urn:credgate:problem:<code>`.
    #[serde(rename = "type")]
    kind: String,
    /// The HTTP reason phrase.
    title: String,
    /// The HTTP status.
    status: u16,
    /// What went wrong and what to do, in English; never a submitted value.
    detail: String,
    /// Stable machine code; the codes each answer may carry are listed with it.
    code: String,
    /// Field-level findings, with JSON pointers into the request.
    #[schema(nullable = false)]
    errors: Option<Vec<FindingDoc>>,
}

/// A finding about one place of a request.
#[derive(Serialize, ToSchema)]
#[schema(as = Finding)]
#[allow(dead_code)]
pub struct FindingDoc {
    /// JSON pointer (RFC 6901) into the request document.
    pointer: String,
    /// Stable machine code.
    code: String,
    /// Explanation; never the submitted value.
    message: String,
}

/// `POST /v1/records`: records of one catalog item. Served with one
/// alternative per active item, whose records follow `record.<item>`.
#[derive(Serialize, ToSchema)]
#[schema(as = Submission)]
#[allow(dead_code)]
pub struct SubmissionDoc {
    /// Catalog item id (see `GET /v1/catalog`).
    item: String,
    /// The records, each validated on its own.
    records: Vec<Map<String, Value>>,
}

/// The answer to a submission: one result per record, in order.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct SubmissionResult {
    /// Id of this submission.
    submission_id: String,
    /// The item submitted.
    item: String,
    /// The item version the records were validated against.
    item_version: u32,
    /// Records stored.
    accepted: u64,
    /// Records already stored by an earlier submission (natural key).
    duplicates: u64,
    /// Records refused.
    rejected: u64,
    /// Per record.
    results: Vec<RecordResult>,
}

/// The outcome for one record of a submission.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct RecordResult {
    /// Position in `records`.
    index: u64,
    /// `accepted`, `duplicate` or `rejected`.
    status: String,
    /// Id of the stored record.
    #[schema(nullable = false)]
    record_id: Option<String>,
    /// Id of the notice the record caused.
    #[schema(nullable = false)]
    notice_id: Option<String>,
    /// A historical record stored as already ended (`expired`, `removed`).
    #[schema(nullable = false)]
    ended: Option<String>,
    /// Why it was refused.
    #[schema(nullable = false)]
    errors: Option<Vec<FindingDoc>>,
    /// What should be looked at though it was accepted.
    #[schema(nullable = false)]
    warnings: Option<Vec<FindingDoc>>,
}

/// A stored record as its submitter (or an administrator) reads it.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct RecordDocument {
    record_id: String,
    item: String,
    item_version: u32,
    /// The submitting department.
    submitter: String,
    subject_type: String,
    /// `active`, `revoked`, `repaired`, `removed`, `expired`, ...
    status: String,
    #[schema(nullable = false)]
    end_reason: Option<String>,
    revision: u32,
    /// The removal document of a removal from a list.
    #[schema(nullable = false)]
    removal: Option<Map<String, Value>>,
    #[schema(format = Date)]
    decision_date: Option<String>,
    #[schema(format = Date)]
    effective_until: Option<String>,
    #[schema(format = DateTime)]
    received_at: String,
    warnings: Vec<FindingDoc>,
    /// The record's fields.
    record: Map<String, Value>,
    /// Its notices with their deliveries and feedback.
    notices: Vec<Map<String, Value>>,
}

/// A notice, redacted for its recipient (`record` and `subject` hold only
/// the fields its clearance allows).
#[derive(Serialize, ToSchema)]
#[schema(as = Notice)]
#[allow(dead_code)]
pub struct NoticeDoc {
    notice_id: String,
    /// `punishment`, `incentive`, `lift`, `correction`, `warning`, `grade_change`.
    #[serde(rename = "type")]
    kind: String,
    item: String,
    item_version: u32,
    record_id: String,
    /// The department that submitted the record.
    source: String,
    /// `general`, `major` or `serious`.
    severity: String,
    subject: Map<String, Value>,
    measures: Vec<Map<String, Value>>,
    #[schema(format = Date)]
    effective_from: Option<String>,
    #[schema(format = Date)]
    effective_until: Option<String>,
    record: Map<String, Value>,
    #[schema(format = DateTime)]
    issued_at: String,
    /// Position in the pull stream (pull only).
    #[schema(nullable = false)]
    cursor: Option<String>,
}

/// A page of the caller's notice stream.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct NoticePage {
    notices: Vec<NoticeDoc>,
    /// Pass as `after` for the next page; acknowledge it once processed.
    next_cursor: String,
}

/// The stored position.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct AckAnswer {
    acknowledged: String,
}

/// Feedback stored.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct FeedbackAnswer {
    notice_id: String,
    status: String,
}

/// A record's effect ended.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct EndAnswer {
    record_id: String,
    status: String,
    /// The lift notices sent.
    lift_notices: Vec<String>,
}

/// `GET /v1/openapi.json`: this document, with the record schemas of the
/// catalog versions active now.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "catalog",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
pub async fn serve(State(state): State<Arc<AppState>>) -> Result<Response, Problem> {
    let catalog = state.ingest.catalog.load_full();
    let doc = document(&catalog, &state.limits);
    let body = serde_json::to_vec(&doc).map_err(|e| Problem::gateway(&e))?;
    Ok(json_response(StatusCode::OK, body))
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

/// A `from`/`to` query parameter: a day or an RFC 3339 time.
pub fn date_or_time() -> Schema {
    AnyOfBuilder::new()
        .item(string().format(Some(SchemaFormat::KnownFormat(KnownFormat::Date))))
        .item(string().format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))))
        .build()
        .into()
}

/// The public search text: empty or spaces only (no search), or 2-50
/// characters once the spaces around them are dropped (a USCC is 18).
/// "Space" is Unicode White_Space, as the gateway trims it.
pub fn public_search_text() -> Schema {
    const W: &str = r"[\t\n\x0B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]";
    const NOT_W: &str =
        r"[^\t\n\x0B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]";
    AnyOfBuilder::new()
        .item(
            string()
                .max_length(Some(50))
                .pattern(Some(format!("^{W}*$"))),
        )
        .item(
            string()
                .max_length(Some(50))
                .pattern(Some(format!("^{W}*{NOT_W}[\\s\\S]*{NOT_W}{W}*$"))),
        )
        .build()
        .into()
}

/// The public page number: 1-500, or empty (the first), as a form sends it.
pub fn public_page() -> Schema {
    AnyOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
                .maximum(Some(500)),
        )
        .item(string().max_length(Some(0)))
        .build()
        .into()
}

/// Every route's annotations, main, public and operations listeners, with
/// no catalog yet: the same for the life of the process, built once.
fn annotated() -> &'static Value {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let mut api = ApiDoc::openapi();
        api.merge(super::api_router().into_openapi());
        api.merge(super::public::api_router().into_openapi());
        api.merge(super::ops::api_router().into_openapi());
        serde_json::to_value(&api).unwrap_or_default()
    })
}

/// Middleware answers every route of the mTLS listener may give.
const MTLS_ANSWERS: [(&str, &str); 4] = [
    (
        "403",
        "`no_identity`, `unknown_participant`, `participant_disabled`, `certificate_not_pinned`: \
         the certificate does not name an enabled, registered participant; `cross_site_request`: \
         a browser sent a change from another site's page",
    ),
    (
        "408",
        "`request_timeout`: the request took too long to arrive or complete",
    ),
    (
        "429",
        "`rate_limited`: the caller's quota is spent; see `Retry-After`",
    ),
    (
        "503",
        "`gateway_unavailable`: the store could not complete the request; nothing was stored",
    ),
];

/// Body reader answers of every route that takes a body.
const BODY_ANSWERS: [(&str, &str); 3] = [
    (
        "400",
        "`malformed_json`, `too_deep`, `body_read_failed`: the body is not JSON within the limits",
    ),
    (
        "413",
        "`body_too_large`, `too_many_items`: the body or an array in it is over the limit",
    ),
    (
        "415",
        "`unsupported_media_type`: send `Content-Type: application/json`",
    ),
];

/// Request documents whose rules a derive cannot say (alternatives,
/// conditions, enumerations from the code): written as JSON Schema here,
/// beside the handlers' own checks they describe.
fn request_schemas() -> Value {
    let purposes: Vec<&str> = crate::review::Purpose::ALL
        .iter()
        .map(|p| p.as_str())
        .collect();
    let uscc = json!({"type": "string", "pattern": "^[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}$",
        "description": "Unified social credit code (GB 32100), check character verified"});
    let subject = json!({
        "description": "A legal entity by its USCC, or a person by identity document (never in a URL or a log)",
        "oneOf": [
            {"type": "object", "required": ["uscc"], "additionalProperties": false,
             "properties": {"uscc": uscc}},
            {"type": "object", "required": ["id_type", "id_number"], "additionalProperties": false,
             "properties": {
                "id_type": {"type": "string", "minLength": 1, "maxLength": 50,
                    "description": "`resident_id` (check character verified), `passport`, `hk_macao_permit`, ..."},
                "id_number": {"type": "string", "minLength": 1, "maxLength": 64},
                "name": {"type": "string", "maxLength": 50}}}
        ]
    });
    let detail = json!({"type": "string", "minLength": 1, "maxLength": 2000, "pattern": "\\S"});
    json!({
        "RevocationRequest": {
            "type": "object", "required": ["reason"], "additionalProperties": false,
            "properties": {
                "reason": {"enum": ["repaired", "revoked", "corrected", "expired"]},
                "note": {"type": ["string", "null"], "maxLength": 2000},
            },
        },
        "CorrectionRequest": {
            "type": "object", "required": ["record", "reason"], "additionalProperties": false,
            "properties": {
                "record": {"type": "object", "description": "The whole corrected record, as `record.<item>` of its item"},
                "reason": detail,
                "revision": {"type": ["integer", "null"], "minimum": 1, "maximum": 4294967295u64,
                    "description": "The revision corrected; refused with `revision_changed` if another came first"},
            },
        },
        "AckRequest": {
            "type": "object", "required": ["cursor"], "additionalProperties": false,
            "properties": {"cursor": {"type": "string", "minLength": 1, "maxLength": 200,
                "description": "A `next_cursor` or notice `cursor` this agency was given"}},
        },
        "FeedbackRequest": {
            "type": "object", "required": ["measure", "outcome"], "additionalProperties": false,
            "properties": {
                "measure": {"type": "string", "minLength": 1, "maxLength": 100,
                    "description": "One of the notice's measure ids"},
                "outcome": {"enum": ["applied", "not_applicable", "pending"]},
                "date": {"type": ["string", "null"], "format": "date"},
                "note": {"type": ["string", "null"], "maxLength": 2000},
            },
            "allOf": [
                {"if": {"properties": {"outcome": {"const": "applied"}}},
                 "then": {"required": ["date"], "properties": {"date": {"type": "string"}}}},
                {"if": {"properties": {"outcome": {"const": "not_applicable"}}},
                 "then": {"required": ["note"], "properties": {"note": {"type": "string", "minLength": 1, "pattern": "\\S"}}}},
            ],
        },
        "ReviewRequest": {
            "type": "object", "required": ["subject", "purpose"], "additionalProperties": false,
            "properties": {
                "subject": subject,
                "purpose": {"enum": purposes},
                "purpose_detail": {"type": ["string", "null"], "minLength": 1, "maxLength": 200, "pattern": "\\S"},
            },
        },
        "ReviewLookup": {
            "type": "object", "required": ["subject"], "additionalProperties": false,
            "properties": {"subject": subject},
        },
        "RollbackRequest": {
            "type": "object", "required": ["version"], "additionalProperties": false,
            "properties": {
                "version": {"type": "integer", "minimum": 1, "maximum": 4294967295u64},
                "force": {"type": "boolean"},
                "reason": {"type": "string", "maxLength": 2000},
            },
        },
    })
}

/// The document as served: annotations, then the catalog's schemas and the
/// problem responses.
pub fn document(catalog: &Catalog, limits: &LimitsConfig) -> Value {
    let mut doc = annotated().clone();
    doc["openapi"] = json!("3.1.0");
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    let schemas = &mut doc["components"]["schemas"];
    if let (Some(to), Value::Object(from)) = (schemas.as_object_mut(), request_schemas()) {
        to.extend(from);
    }
    let mut alternatives = Vec::new();
    for item in catalog.items() {
        let mut schema = item.def.schema.clone();
        strip_dialect(&mut schema);
        if let Value::Object(s) = &mut schema {
            s.insert(
                "title".into(),
                json!(format!("{} ({})", item.def.name, item.def.name_zh)),
            );
        }
        let name = format!("record.{}", item.def.id);
        alternatives.push(json!({
            "type": "object",
            "title": item.def.id,
            "required": ["item", "records"],
            "properties": {
                "item": {"const": item.def.id},
                "records": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": limits.max_batch_records,
                    // Each record is checked on its own against its
                    // item's schema and refused in the 200 answer when it
                    // does not follow it: any value is a well-formed
                    // element of the batch.
                    "items": {
                        "description": format!("A record: an object validated against `#/components/schemas/{name}` and the item's domain rules; anything else is rejected in the answer"),
                    },
                },
            },
        }));
        schemas[name] = schema;
    }
    if !alternatives.is_empty() {
        let generic = schemas["Submission"].take();
        schemas["Submission"] = json!({
            "description": generic.get("description").cloned().unwrap_or_default(),
            "oneOf": alternatives,
        });
    }
    let mut published: Vec<&str> = catalog
        .items()
        .filter(|i| i.def.publicity.is_some())
        .map(|i| i.def.id.as_str())
        .collect();
    published.push("");
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            if path.starts_with("/public/") {
                for param in item["get"]["parameters"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                {
                    if param["name"] == "item" {
                        param["schema"] = json!({"enum": published});
                    }
                }
            }
            let mtls = path.starts_with("/v1/")
                || path.starts_with("/admin/")
                || path.starts_with("/console/");
            let Some(ops) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in ops.iter_mut() {
                if !matches!(method.as_str(), "get" | "put" | "post" | "patch" | "delete") {
                    continue;
                }
                complete(op, path, mtls);
            }
        }
    }
    doc
}

/// Adds the shared answers to one operation and gives every error answer
/// the problem schema with its codes.
fn complete(op: &mut Value, path: &str, mtls: bool) {
    let has_body = op.get("requestBody").is_some();
    if has_body {
        // Every body the gateway takes is required.
        op["requestBody"]["required"] = json!(true);
    }
    if mtls {
        op["security"] = json!([{"mutualTLS": []}]);
    }
    let responses = op["responses"].as_object_mut();
    let Some(responses) = responses else {
        return;
    };
    let mut add = |status: &str, text: &str| {
        let entry = responses
            .entry(status.to_owned())
            .or_insert_with(|| json!({"description": ""}));
        let old = entry["description"].as_str().unwrap_or("").to_owned();
        entry["description"] = json!(if old.is_empty() {
            text.to_owned()
        } else {
            format!("{old}; {text}")
        });
    };
    if mtls {
        for (status, text) in MTLS_ANSWERS {
            add(status, text);
        }
        if path.starts_with("/admin/") || path.starts_with("/console/") {
            add("403", "`admins_only`: the route is for administrators");
        }
    }
    if has_body {
        for (status, text) in BODY_ANSWERS {
            add(status, text);
        }
    }
    for (status, entry) in responses.iter_mut() {
        // Error answers are problems, but for those documented with their
        // own content (the public page's HTML, readiness).
        if !(status.starts_with('4') || status.starts_with('5')) || entry.get("content").is_some() {
            continue;
        }
        let text = entry["description"].as_str().unwrap_or("");
        let codes = codes_in(text);
        if path.starts_with("/console/") {
            // The console shows every problem as a page.
            entry["content"] = json!({"text/html": {"schema": {"type": "string"}}});
            entry["x-problem-codes"] = json!(codes);
            continue;
        }
        let schema = if codes.is_empty() {
            json!({"$ref": "#/components/schemas/Problem"})
        } else {
            json!({"allOf": [
                {"$ref": "#/components/schemas/Problem"},
                {"properties": {"code": {"enum": codes}}},
            ]})
        };
        entry["content"] = json!({ PROBLEM_JSON: {"schema": schema} });
        entry["x-problem-codes"] = json!(codes);
    }
}

/// The `code`s named in backquotes in a description, in order, once each.
fn codes_in(text: &str) -> Vec<String> {
    let mut codes: Vec<String> = Vec::new();
    for (i, part) in text.split('`').enumerate() {
        let is_code = i % 2 == 1
            && !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if is_code && !codes.iter().any(|c| c == part) {
            codes.push(part.to_owned());
        }
    }
    codes
}

/// Removes `$schema` members: in an OpenAPI 3.1 document the dialect is
/// the document's own (2020-12), which the catalog's schemas use anyway.
fn strip_dialect(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            map.remove("$schema");
            map.values_mut().for_each(strip_dialect);
        }
        Value::Array(list) => list.iter_mut().for_each(strip_dialect),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_backquoted_snake_case_words() {
        assert_eq!(
            codes_in("`record_not_found`: no such record; see `Retry-After` and `a_b`, `a_b`"),
            vec!["record_not_found", "a_b"]
        );
        assert!(codes_in("no codes here").is_empty());
    }

    /// Routes are registered only from their `#[utoipa::path]` annotations
    /// (`routes!`), so none can exist that the document lacks: a plain
    /// `.route(...)` anywhere in the HTTP layer fails this test.
    #[test]
    fn no_route_is_registered_past_the_document() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![dir.join("server.rs")];
        for entry in std::fs::read_dir(dir.join("http")).expect("src/http") {
            let path = entry.expect("entry").path();
            // This file merges the routers' documents (and names the
            // needles below).
            if !path.ends_with("openapi.rs") {
                files.push(path);
            }
        }
        for file in files {
            let text = std::fs::read_to_string(&file).expect("source");
            for needle in [
                ".route(",
                ".route_service(",
                ".nest(",
                ".nest_service(",
                ".merge(",
            ] {
                assert!(
                    !text.contains(needle),
                    "{} registers a route with {needle}: use routes!() with a #[utoipa::path] annotation",
                    file.display()
                );
            }
        }
    }

    /// The document has every path of the three listeners, each error
    /// answer a problem with its codes.
    #[test]
    fn every_error_answer_is_a_problem_with_its_codes() {
        let catalog = Catalog::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("catalogs/credit"),
            &|_| true,
        )
        .expect("catalog");
        let doc = document(&catalog, &LimitsConfig::default());
        let paths = doc["paths"].as_object().expect("paths");
        for p in [
            "/v1/records",
            "/admin/v1/audit",
            "/public/v1/records",
            "/readyz",
        ] {
            assert!(paths.contains_key(p), "{p}");
        }
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("item") {
                for (status, answer) in op["responses"].as_object().expect("responses") {
                    if !status.starts_with('4') || answer["content"].get("text/html").is_some() {
                        continue;
                    }
                    assert!(
                        answer["content"].get(PROBLEM_JSON).is_some(),
                        "{method} {path} {status}"
                    );
                    assert!(
                        !answer["x-problem-codes"]
                            .as_array()
                            .expect("codes")
                            .is_empty(),
                        "{method} {path} {status}: no code named"
                    );
                }
            }
        }
        assert!(doc["components"]["schemas"]["record.administrative_penalty"].is_object());
    }
}
