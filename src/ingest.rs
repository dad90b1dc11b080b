//! The submission use case: authorise the caller for the item, validate
//! every record against the active item version, derive what is stored,
//! and append it durably in one transaction.
//!
//! The caller's answer is built here, before storing, so that exactly that
//! answer is remembered for `Idempotency-Key` replay.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::catalog::{Catalog, Finding, NoticeType, SubjectType};
use crate::error::Problem;
use crate::participants::Participant;
use crate::redact::Redactor;
use crate::routing::{region_of, NoticeFacts, Subscriptions};
use crate::store::{
    AppendOutcome, IdempotencyClaim, NewDelivery, NewNotice, NewRecord, NewSubmission, NoticeKind,
    Store, StoredResponse,
};

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// What the caller gets back.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body.
    pub body: Vec<u8>,
    /// True when this is the remembered answer to an earlier request.
    pub replayed: bool,
}

#[derive(Serialize)]
struct BatchResult<'a> {
    submission_id: &'a str,
    item: &'a str,
    item_version: u32,
    accepted: usize,
    rejected: usize,
    results: Vec<RecordResult>,
}

#[derive(Serialize)]
struct RecordResult {
    index: usize,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    record_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notice_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<Finding>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<Finding>,
}

/// The submission use case and what it needs.
pub struct Ingest {
    /// Active catalog; loaded once per request.
    pub catalog: Arc<ArcSwap<Catalog>>,
    /// Durable store.
    pub store: Arc<dyn Store>,
    /// Active subscriptions; loaded once per request.
    pub subscriptions: Arc<ArcSwap<Subscriptions>>,
    /// Participants: a disabled agency gets no new deliveries.
    registry: Arc<ArcSwap<crate::participants::Registry>>,
    /// Keyed pseudonyms of personal IDs (subject keys).
    pub redactor: Arc<Redactor>,
    /// Input limits: batch size and findings per record and per answer.
    limits: crate::config::LimitsConfig,
    /// This gateway's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Recently given answers by (participant, key), in front of the store.
    replays: moka::sync::Cache<(String, String), Arc<StoredResponse>>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("max_batch", &self.limits.max_batch_records)
            .finish_non_exhaustive()
    }
}

/// Hex SHA-256 of a request body, the identity of a request for replay.
pub fn request_hash(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw))
}

impl Ingest {
    /// Builds the use case.
    pub fn new(
        active: &crate::active::Active,
        store: Arc<dyn Store>,
        redactor: Arc<Redactor>,
        limits: crate::config::LimitsConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Ingest {
        Ingest {
            metrics,
            catalog: active.catalog.clone(),
            subscriptions: active.subscriptions.clone(),
            registry: active.registry.clone(),
            store,
            redactor,
            // Bounded in bytes, not entries: one answer can be much larger
            // than another. An answer evicted here is read from the store.
            replays: moka::sync::Cache::builder()
                .max_capacity(limits.replay_cache_bytes)
                .weigher(|k: &(String, String), v: &Arc<StoredResponse>| {
                    let bytes = k.0.len() + k.1.len() + v.request_hash.len() + v.body.len() + 64;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(std::time::Duration::from_secs(600))
                .build(),
            limits,
        }
    }

    /// If `key` was used by `who` before, the earlier answer (or a 422 when
    /// the key came with a different body).
    pub async fn replay(
        &self,
        who: &Participant,
        key: &str,
        hash: &str,
    ) -> Result<Option<Answer>, Problem> {
        let cache_key = (who.id.clone(), key.to_owned());
        let earlier = match self.replays.get(&cache_key) {
            Some(r) => Some(r),
            None => self
                .store
                .idempotent_response(&who.id, key)
                .await?
                .map(Arc::new),
        };
        earlier.map(|r| self.answer_replay(&r, hash)).transpose()
    }

    fn answer_replay(&self, earlier: &StoredResponse, hash: &str) -> Result<Answer, Problem> {
        if earlier.request_hash != hash {
            return Err(Problem::caller(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body; use a new key for a new request",
            ));
        }
        Ok(Answer {
            status: StatusCode::from_u16(earlier.status).unwrap_or(StatusCode::OK),
            body: earlier.body.clone(),
            replayed: true,
        })
    }

    /// Validates and stores a submission document
    /// `{"item": "...", "records": [...]}`.
    pub async fn submit(
        &self,
        who: &Participant,
        doc: Value,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<Answer, Problem> {
        let prepared = self.prepare(who, doc, idempotency, None)?;
        self.commit(prepared).await
    }

    /// The CPU half of a submission: authorise, validate every record,
    /// derive notices and build the answer. No I/O, so a large batch can
    /// run off the async workers; past `deadline` it stops with `408`.
    pub fn prepare(
        &self,
        who: &Participant,
        doc: Value,
        idempotency: Option<IdempotencyClaim>,
        deadline: Option<std::time::Instant>,
    ) -> Result<Prepared, Problem> {
        let Value::Object(mut doc) = doc else {
            return Err(Problem::caller(
                StatusCode::BAD_REQUEST,
                "invalid_document",
                "the body must be a JSON object",
            )
            .at("", "must be an object with \"item\" and \"records\""));
        };
        if let Some(extra) = doc.keys().find(|k| *k != "item" && *k != "records") {
            return Err(Problem::caller(
                StatusCode::BAD_REQUEST,
                "unknown_field",
                "the body has a field this endpoint does not take",
            )
            .at(
                format!("/{}", extra.replace('~', "~0").replace('/', "~1")),
                "unknown field; only \"item\" and \"records\" are allowed",
            ));
        }
        let item_id = match doc.get("item") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(Problem::caller(
                    StatusCode::BAD_REQUEST,
                    "invalid_document",
                    "\"item\" must be a string",
                )
                .at("/item", "must be a catalog item id (string)"))
            }
            None => {
                return Err(Problem::caller(
                    StatusCode::BAD_REQUEST,
                    "invalid_document",
                    "\"item\" is missing",
                )
                .at("/item", "is required"))
            }
        };
        let records = match doc.remove("records") {
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(Problem::caller(
                    StatusCode::BAD_REQUEST,
                    "invalid_document",
                    "\"records\" must be an array",
                )
                .at("/records", "must be an array of records"))
            }
            None => {
                return Err(Problem::caller(
                    StatusCode::BAD_REQUEST,
                    "invalid_document",
                    "\"records\" is missing",
                )
                .at("/records", "is required"))
            }
        };
        let catalog = self.catalog.load_full();
        let subscriptions = self.subscriptions.load_full();
        let registry = self.registry.load_full();
        let Some(item) = catalog.get(&item_id).cloned() else {
            return Err(Problem::caller(
                StatusCode::NOT_FOUND,
                "unknown_item",
                "no catalog item has this id; GET /v1/catalog lists them",
            )
            .at("/item", "unknown catalog item"));
        };
        if !item.def.providers.iter().any(|p| p == &who.id) {
            return Err(Problem::caller(
                StatusCode::FORBIDDEN,
                "not_a_provider",
                format!(
                    "{} is not a listed provider of catalog item {}",
                    who.id, item.def.id
                ),
            )
            .at("/item", "the caller may not submit this item"));
        }
        if records.is_empty() {
            return Err(Problem::caller(
                StatusCode::BAD_REQUEST,
                "empty_batch",
                "\"records\" is empty",
            )
            .at("/records", "must hold at least one record"));
        }
        if records.len() > self.limits.max_batch_records {
            return Err(Problem::caller(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_records",
                format!(
                    "a batch may hold at most {} records; split it",
                    self.limits.max_batch_records
                ),
            )
            .at(
                "/records",
                format!("holds more than {} records", self.limits.max_batch_records),
            ));
        }

        let received_at = OffsetDateTime::now_utc();
        let submission_id = uuid::Uuid::now_v7().to_string();
        let mut results = Vec::with_capacity(records.len());
        let mut stored = Vec::new();
        let mut rejection_codes: BTreeMap<String, usize> = BTreeMap::new();
        // Findings this answer may still list; the answer's size is bounded
        // however many records are wrong and however wrong they are.
        let mut budget = self.limits.max_findings_per_answer;
        for (index, record) in records.into_iter().enumerate() {
            if deadline.is_some_and(|d| std::time::Instant::now() > d) {
                return Err(Problem::caller(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the batch took too long to validate; nothing was stored; send smaller batches",
                ));
            }
            let v = item.validate(&record, self.limits.max_findings_per_record);
            let prefix = |f: Finding| Finding {
                pointer: format!("/records/{index}{}", f.pointer),
                ..f
            };
            if !v.errors.is_empty() {
                for e in &v.errors {
                    *rejection_codes.entry(e.code.clone()).or_default() += 1;
                }
                let listed = v.errors.len().min(budget);
                let mut errors: Vec<Finding> =
                    v.errors.into_iter().take(listed).map(prefix).collect();
                budget -= listed;
                if errors.is_empty() {
                    errors.push(crate::catalog::too_many_errors(
                        &format!("/records/{index}"),
                        format!(
                            "errors not listed: this answer's limit of {} findings is reached",
                            self.limits.max_findings_per_answer
                        ),
                    ));
                }
                results.push(RecordResult {
                    index,
                    status: "rejected",
                    record_id: None,
                    notice_id: None,
                    errors,
                    warnings: Vec::new(),
                });
                continue;
            }
            let id = uuid::Uuid::now_v7().to_string();
            let text = |f: &str| record.get(f).and_then(Value::as_str);
            let subject_key = match (text("uscc"), text("id_number")) {
                (Some(uscc), _) => Some(uscc.to_owned()),
                (None, Some(number)) => Some(self.redactor.pseudonym(number)),
                (None, None) => None,
            };
            let resident_id = (text("id_type") == Some("resident_id"))
                .then(|| text("id_number"))
                .flatten();
            let region = region_of(text("uscc"), resident_id);
            let decision_date = item.decision_date(&record);
            let derived = item.derive_notice(&record);
            let notice = derived.as_ref().map(|d| {
                let subject_type = record
                    .get("subject_type")
                    .cloned()
                    .and_then(|v| serde_json::from_value::<SubjectType>(v).ok());
                let routes = subscriptions
                    .route(&NoticeFacts {
                        item: &item.def.id,
                        notice_type: d.notice_type,
                        severity: d.severity,
                        subject_type,
                        region: region.as_deref(),
                    })
                    .into_iter()
                    .filter(|r| {
                        registry
                            .get(&r.subscription.agency)
                            .is_some_and(|a| a.enabled)
                    });
                NewNotice {
                    id: uuid::Uuid::now_v7().to_string(),
                    kind: match d.notice_type {
                        NoticeType::Punishment => NoticeKind::Punishment,
                        NoticeType::Incentive => NoticeKind::Incentive,
                    },
                    severity: d.severity,
                    measures: d.measures.clone(),
                    effective_from: decision_date,
                    effective_until: d.effective_until,
                    region: region.clone(),
                    deliveries: routes
                        .into_iter()
                        .map(|r| NewDelivery {
                            id: uuid::Uuid::now_v7().to_string(),
                            subscription: r.subscription.id.clone(),
                            agency: r.subscription.agency.clone(),
                            push: r.subscription.is_push(),
                        })
                        .collect(),
                }
            });
            results.push(RecordResult {
                index,
                status: "accepted",
                record_id: Some(id.clone()),
                notice_id: notice.as_ref().map(|n| n.id.clone()),
                errors: Vec::new(),
                // Warnings past the budget are still stored with the record.
                warnings: {
                    let listed = v.warnings.len().min(budget);
                    budget -= listed;
                    v.warnings
                        .iter()
                        .take(listed)
                        .cloned()
                        .map(prefix)
                        .collect()
                },
            });
            stored.push(NewRecord {
                id,
                subject_type: text("subject_type").unwrap_or_default().to_owned(),
                subject_key,
                decision_date,
                effective_until: derived.and_then(|d| d.effective_until),
                body: serde_json::to_string(&record).map_err(|e| Problem::gateway(&e))?,
                warnings: serde_json::to_string(&v.warnings).map_err(|e| Problem::gateway(&e))?,
                notice,
            });
        }
        let accepted = stored.len();
        let rejected = results.len() - accepted;
        let body = serde_json::to_vec(&BatchResult {
            submission_id: &submission_id,
            item: &item.def.id,
            item_version: item.def.version,
            accepted,
            rejected,
            results,
        })
        .map_err(|e| Problem::gateway(&e))?;
        Ok(Prepared(NewSubmission {
            id: submission_id,
            participant: who.id.clone(),
            item: item.def.id.clone(),
            item_version: item.def.version,
            received_at,
            records: stored,
            rejected,
            rejection_codes: rejection_codes.into_iter().collect(),
            idempotency,
            response_status: 200,
            response_body: body,
        }))
    }

    /// The I/O half: stores a prepared submission durably, then answers.
    pub async fn commit(&self, Prepared(submission): Prepared) -> Result<Answer, Problem> {
        let item_id = submission.item.clone();
        let (accepted, rejected) = (submission.records.len(), submission.rejected);
        let body = submission.response_body.clone();
        // (participant, key) and the request digest, for the replay cache.
        let replay = submission.idempotency.as_ref().map(|c| {
            (
                (submission.participant.clone(), c.key.clone()),
                c.request_hash.clone(),
            )
        });
        match self.store.append_submission(submission).await? {
            AppendOutcome::Stored => {
                let m = &self.metrics;
                for (outcome, n) in [("accepted", accepted), ("rejected", rejected)] {
                    m.records
                        .get_or_create(&crate::metrics::RecordLabels {
                            item: item_id.clone(),
                            outcome,
                        })
                        .inc_by(n as u64);
                }
                if let Some((k, request_hash)) = replay {
                    self.replays.insert(
                        k,
                        Arc::new(StoredResponse {
                            request_hash,
                            status: 200,
                            body: body.clone(),
                        }),
                    );
                }
                Ok(Answer {
                    status: StatusCode::OK,
                    body,
                    replayed: false,
                })
            }
            // A concurrent request with the same key won the race.
            AppendOutcome::Replay(earlier) => {
                let hash = replay.map(|(_, h)| h).unwrap_or_default();
                self.answer_replay(&earlier, &hash)
            }
        }
    }
}

/// A validated submission with its answer (`response_body`), ready for
/// [`Ingest::commit`].
pub struct Prepared(NewSubmission);

impl std::fmt::Debug for Prepared {
    // Never the records' field values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("submission", &self.0.id)
            .field("accepted", &self.0.records.len())
            .field("rejected", &self.0.rejected)
            .finish_non_exhaustive()
    }
}
