//! The submission use case: authorise the caller for the item, validate
//! every record against the active item version, derive what is stored,
//! and append it durably in one transaction.
//!
//! The caller's answer is built here, before storing, so that exactly that
//! answer is remembered for `Idempotency-Key` replay.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::catalog::{escape_pointer, Catalog, CatalogItem, Finding, NoticeType};
use crate::error::Problem;
use crate::participants::Participant;
use crate::redact::Redactor;
use crate::routing::{NoticeFacts, Subscriptions};
use crate::store::{
    AppendOutcome, Decide, IdempotencyClaim, KeyHolder, NewDelivery, NewNotice, NewRecord,
    NewSubmission, NoticeKind, Store, StoreError, StoredResponse, SubjectRecord, SubmissionLookups,
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
    duplicates: usize,
    rejected: usize,
    results: Vec<RecordResult>,
}

#[derive(Serialize, Clone)]
struct RecordResult {
    index: usize,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    record_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notice_id: Option<String>,
    /// A historical record stored as already ended (`expired`, `removed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    ended: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<Finding>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<Finding>,
}

impl RecordResult {
    /// A refused record with its findings.
    fn rejected(index: usize, errors: Vec<Finding>) -> RecordResult {
        RecordResult {
            index,
            status: "rejected",
            record_id: None,
            notice_id: None,
            ended: None,
            errors,
            warnings: Vec::new(),
        }
    }
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
    /// Records per subject for credit reviews; told of every change here.
    pub subjects: Arc<crate::subjects::SubjectCache>,
    /// Publicity periods stamped on published records.
    publicity: Vec<crate::publicity::RuleSet>,
}

/// One delivery to each enabled agency's subscription that wants the
/// notice.
pub(crate) fn routed_deliveries(
    subscriptions: &Subscriptions,
    registry: &crate::participants::Registry,
    facts: &NoticeFacts<'_>,
) -> Vec<NewDelivery> {
    subscriptions
        .route(facts)
        .into_iter()
        .filter(|r| {
            registry
                .get(&r.subscription.agency)
                .is_some_and(|a| a.enabled)
        })
        .map(|r| NewDelivery {
            id: uuid::Uuid::now_v7().to_string(),
            subscription: r.subscription.id.clone(),
            agency: r.subscription.agency.clone(),
            push: r.subscription.is_push(),
        })
        .collect()
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
        subjects: Arc<crate::subjects::SubjectCache>,
        publicity: Vec<crate::publicity::RuleSet>,
    ) -> Ingest {
        Ingest {
            publicity,
            metrics,
            subjects,
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
        self.prepare_as(who, doc, idempotency, deadline, None)
    }

    /// [`Ingest::prepare`] for records loaded from history on `today`:
    /// 15-digit resident IDs are converted (with a warning); a listing
    /// sent with its removal fields is stored as removed, a record whose
    /// effect ended before `today` as expired, both without a notice;
    /// records still in effect notify once, marked historical; no warnings.
    pub fn prepare_historical(
        &self,
        who: &Participant,
        doc: Value,
        today: time::Date,
    ) -> Result<Prepared, Problem> {
        self.prepare_as(who, doc, None, None, Some(today))
    }

    fn prepare_as(
        &self,
        who: &Participant,
        doc: Value,
        idempotency: Option<IdempotencyClaim>,
        deadline: Option<std::time::Instant>,
        history: Option<time::Date>,
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
        let mut entries = Vec::with_capacity(records.len());
        let mut rejection_codes: BTreeMap<String, usize> = BTreeMap::new();
        // Findings this answer may still list; the answer's size is bounded
        // however many records are wrong and however wrong they are.
        let mut budget = self.limits.max_findings_per_answer;
        for (index, mut record) in records.into_iter().enumerate() {
            if deadline.is_some_and(|d| std::time::Instant::now() > d) {
                return Err(Problem::caller(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the batch took too long to validate; nothing was stored; send smaller batches",
                ));
            }
            let removal = history.and_then(|_| item.take_removal(&mut record));
            let normalised = normalise_codes(&mut record, history.is_some());
            let mut v = item.validate(&record, self.limits.max_findings_per_record);
            v.warnings.splice(0..0, normalised);
            if let Some(r) = &removal {
                let listed = item.decision_date(&record);
                if let Some(rv) =
                    item.validate_removal(r, listed, self.limits.max_findings_per_record)
                {
                    v.errors.extend(rv.errors);
                }
            }
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
                entries.push(Entry::Rejected(RecordResult::rejected(index, errors)));
                continue;
            }
            let mut accepted = self.accepted_record(&item, &record, &subscriptions, &registry)?;
            if let Some(today) = history {
                historical(&mut accepted, removal, today)?;
            }
            accepted.record.warnings =
                serde_json::to_string(&v.warnings).map_err(|e| Problem::gateway(&e))?;
            // Warnings past the budget are still stored with the record.
            let listed = v.warnings.len().min(budget);
            budget -= listed;
            entries.push(Entry::Candidate {
                index,
                warnings: v
                    .warnings
                    .iter()
                    .take(listed)
                    .cloned()
                    .map(prefix)
                    .collect(),
                accepted: Box::new(accepted),
            });
        }
        Ok(Prepared {
            submission: NewSubmission {
                id: uuid::Uuid::now_v7().to_string(),
                participant: who.id.clone(),
                item: item.def.id.clone(),
                item_version: item.def.version,
                received_at,
                records: Vec::new(),
                rejected: 0,
                rejection_codes: Vec::new(),
                idempotency,
                response_status: 200,
                response_body: Vec::new(),
                historical: history.is_some(),
            },
            item,
            entries,
            rejection_codes,
            budget,
        })
    }

    /// What is stored of a valid record: its subject key, natural key and
    /// content digest, and the notice it produces with its routed
    /// deliveries (or the warning it may produce).
    pub(crate) fn accepted_record(
        &self,
        item: &CatalogItem,
        record: &Value,
        subscriptions: &Subscriptions,
        registry: &crate::participants::Registry,
    ) -> Result<Accepted, Problem> {
        let text = |f: &str| record.get(f).and_then(Value::as_str);
        let subject_key = self.redactor.subject_key(record);
        let (region, subject_type) = crate::routing::subject_of_record(record);
        let decision_date = item.decision_date(record);
        let derived = item.derive_notice(record);
        let routed = |notice_type: NoticeType,
                      severity: crate::catalog::Severity,
                      measures: Vec<String>,
                      until: Option<time::Date>| {
            let deliveries = routed_deliveries(
                subscriptions,
                registry,
                &NoticeFacts {
                    item: &item.def.id,
                    notice_type,
                    severity,
                    subject_type,
                    region: region.as_deref(),
                },
            );
            NewNotice {
                id: uuid::Uuid::now_v7().to_string(),
                kind: match notice_type {
                    NoticeType::Punishment => NoticeKind::Punishment,
                    NoticeType::Incentive => NoticeKind::Incentive,
                    NoticeType::Warning => NoticeKind::Warning,
                    NoticeType::GradeChange => NoticeKind::GradeChange,
                },
                severity,
                measures,
                effective_from: decision_date,
                effective_until: until,
                region: region.clone(),
                deliveries,
                lifts: None,
                corrects: None,
                reason: None,
                historical: false,
                grade: None,
            }
        };
        let notice = derived.as_ref().map(|d| {
            routed(
                d.notice_type,
                d.severity,
                d.measures.clone(),
                d.effective_until,
            )
        });
        let level = item.level(record);
        // A record that makes no notice of its own may still make a
        // warning, if the subject's earlier records say so (at commit).
        let warning = match (
            &notice,
            level,
            item.def.notice.as_ref().and_then(|n| n.warning.as_ref()),
        ) {
            (None, Some(l), Some(w)) if w.levels.contains(&l) && subject_key.is_some() => {
                Some(Box::new(routed(NoticeType::Warning, l, Vec::new(), None)))
            }
            _ => None,
        };
        let removes = item.def.removes_from.as_ref().and_then(|r| {
            Some(crate::store::Removes {
                items: r.items.clone(),
                removal: item.removal_by(record)?.to_string(),
                on: decision_date,
            })
        });
        let body = serde_json::to_string(record).map_err(|e| Problem::gateway(&e))?;
        let identity = Identity::of(&self.redactor, item, record, &body);
        let id = uuid::Uuid::now_v7().to_string();
        Ok(Accepted {
            record: NewRecord {
                id: id.clone(),
                subject_type: text("subject_type").unwrap_or_default().to_owned(),
                subject_key,
                decision_date,
                effective_until: item.effective_until(record),
                body,
                warnings: "[]".into(),
                natural_key: identity.natural_key,
                content_hash: identity.content_hash,
                level,
                removes,
                publicity: crate::publicity::stamp(
                    &self.publicity,
                    item,
                    record,
                    decision_date,
                    item.effective_until(record),
                )
                .map(|stamp| crate::store::Publication {
                    public_id: self
                        .redactor
                        .keyed_digest([b"public-id".as_slice(), id.as_bytes()])[..24]
                        .to_owned(),
                    stamp,
                }),
                ended: None,
                notice,
            },
            key_fields: identity.fields,
            subject_pointer: ["uscc", "id_number"]
                .into_iter()
                .find(|f| record.get(*f).is_some_and(Value::is_string))
                .map(|f| format!("/{f}")),
            warning,
        })
    }

    /// The submission to store, given the records that already hold the
    /// natural keys and the subjects' other records: a record whose key is
    /// held with the same content is a duplicate (nothing stored, the
    /// holder's id answered); with other content it is refused
    /// (`duplicate_key`: a change is a correction). The same holds between
    /// the records of one batch. A record of a subject on a list that
    /// excludes it is refused (`conflicts_with_dishonesty`); a record that
    /// completes a warning rule carries the warning notice.
    fn resolve(
        p: &Prepared,
        holders: Vec<KeyHolder>,
        subjects: &[SubjectRecord],
    ) -> Result<NewSubmission, StoreError> {
        let mut held: HashMap<String, KeyHolder> = holders
            .into_iter()
            .map(|h| (h.natural_key.clone(), h))
            .collect();
        let sub = &p.submission;
        let mut codes = p.rejection_codes.clone();
        let mut budget = p.budget;
        let mut results = Vec::with_capacity(p.entries.len());
        let mut stored = Vec::new();
        let warning_rule = p.item.def.notice.as_ref().and_then(|n| n.warning.as_ref());
        for entry in &p.entries {
            let (index, warnings, accepted) = match entry {
                Entry::Rejected(r) => {
                    results.push(r.clone());
                    continue;
                }
                Entry::Candidate {
                    index,
                    warnings,
                    accepted,
                } => (*index, warnings, accepted),
            };
            let (record, key_fields) = (&accepted.record, &accepted.key_fields);
            match held.get(&record.natural_key) {
                Some(h) if h.content_hash == record.content_hash => {
                    results.push(RecordResult {
                        index,
                        status: "duplicate",
                        record_id: Some(h.record_id.clone()),
                        notice_id: None,
                        ended: None,
                        errors: Vec::new(),
                        warnings: Vec::new(),
                    });
                }
                Some(h) => {
                    *codes.entry("duplicate_key".into()).or_default() += 1;
                    let names = key_fields.join(", ");
                    let message = if h.submitter == sub.participant {
                        format!(
                            "record {id} already has this key ({names}) with other content; to change it, send a correction: PUT /v1/records/{id}",
                            id = h.record_id,
                        )
                    } else {
                        format!("a record of another department already has this key ({names}) with other content")
                    };
                    let listed = key_fields.len().min(budget).max(1);
                    budget = budget.saturating_sub(listed);
                    let pointers: Vec<String> = if key_fields.is_empty() {
                        vec![format!("/records/{index}")]
                    } else {
                        key_fields
                            .iter()
                            .map(|f| format!("/records/{index}/{}", escape_pointer(f)))
                            .collect()
                    };
                    results.push(RecordResult::rejected(
                        index,
                        pointers
                            .into_iter()
                            .take(listed)
                            .map(|pointer| Finding {
                                pointer,
                                code: "duplicate_key".into(),
                                message: message.clone(),
                            })
                            .collect(),
                    ));
                }
                None if listed(&p.item, record, subjects) => {
                    *codes.entry("conflicts_with_dishonesty".into()).or_default() += 1;
                    budget = budget.saturating_sub(1);
                    results.push(RecordResult::rejected(index, vec![Finding {
                            pointer: format!(
                                "/records/{index}{}",
                                accepted.subject_pointer.as_deref().unwrap_or("")
                            ),
                            code: "conflicts_with_dishonesty".into(),
                            message: format!(
                                "the subject is on a list that excludes it from {} ({}) while it stands",
                                p.item.def.name, p.item.def.name_zh
                            ),
                        }]));
                }
                None => {
                    let mut record = record.clone();
                    if let (Some(w), Some(rule)) = (&accepted.warning, warning_rule) {
                        if warned(rule, &p.item.def.id, &record, subjects, &stored) {
                            record.notice = Some(w.as_ref().clone());
                        }
                    }
                    held.insert(
                        record.natural_key.clone(),
                        KeyHolder {
                            natural_key: record.natural_key.clone(),
                            record_id: record.id.clone(),
                            content_hash: record.content_hash.clone(),
                            submitter: sub.participant.clone(),
                        },
                    );
                    results.push(RecordResult {
                        index,
                        status: "accepted",
                        record_id: Some(record.id.clone()),
                        notice_id: record.notice.as_ref().map(|n| n.id.clone()),
                        ended: record.ended.as_ref().map(|e| e.reason.record_status()),
                        errors: Vec::new(),
                        warnings: warnings.clone(),
                    });
                    stored.push(record);
                }
            }
        }
        let count = |status: &str| results.iter().filter(|r| r.status == status).count();
        let (duplicates, rejected) = (count("duplicate"), count("rejected"));
        let body = serde_json::to_vec(&BatchResult {
            submission_id: &sub.id,
            item: &sub.item,
            item_version: sub.item_version,
            accepted: stored.len(),
            duplicates,
            rejected,
            results,
        })
        .map_err(|e| StoreError::Database(format!("cannot encode the answer: {e}")))?;
        Ok(NewSubmission {
            records: stored,
            rejected,
            rejection_codes: codes.into_iter().collect(),
            response_body: body,
            ..sub.clone()
        })
    }

    /// What [`Ingest::commit`] would answer, storing nothing (a dry run).
    pub async fn check(&self, prepared: Prepared) -> Result<Vec<u8>, Problem> {
        let (holders, others) = self.store.lookups(Self::lookups_of(&prepared)).await?;
        Ok(Self::resolve(&prepared, holders, &others)?.response_body)
    }

    /// What the prepared records' outcome depends on: the records already
    /// holding their natural keys, and the subjects' records the item's
    /// rules look at.
    fn lookups_of(prepared: &Prepared) -> SubmissionLookups {
        let candidates = || {
            prepared.entries.iter().filter_map(|e| match e {
                Entry::Candidate { accepted, .. } => Some(&accepted.record),
                Entry::Rejected(_) => None,
            })
        };
        let keys: Vec<String> = candidates().map(|r| r.natural_key.clone()).collect();
        let mut subjects: Vec<String> =
            candidates().filter_map(|r| r.subject_key.clone()).collect();
        subjects.sort();
        subjects.dedup();
        let def = &prepared.item.def;
        let mut items = def.refused_while_listed.clone();
        // The subject's records of this item matter only to a record that
        // could complete a warning (none in history, none that notifies).
        let may_warn = prepared.entries.iter().any(|e| match e {
            Entry::Candidate { accepted, .. } => accepted.warning.is_some(),
            Entry::Rejected(_) => false,
        });
        if may_warn {
            items.push(def.id.clone());
        }
        SubmissionLookups {
            item: def.id.clone(),
            keys,
            subjects,
            items,
        }
    }

    /// The I/O half: looks up the records' natural keys and subjects,
    /// decides each record's outcome, stores the submission durably, then
    /// answers.
    pub async fn commit(&self, prepared: Prepared) -> Result<Answer, Problem> {
        let item_id = prepared.submission.item.clone();
        // (participant, key) and the request digest, for the replay cache.
        let replay = prepared.submission.idempotency.as_ref().map(|c| {
            (
                (prepared.submission.participant.clone(), c.key.clone()),
                c.request_hash.clone(),
            )
        });
        let lookups = Self::lookups_of(&prepared);
        let decide: Decide =
            Arc::new(move |holders, others| Self::resolve(&prepared, holders, &others));
        let decided = match self.store.decide_and_append(lookups, decide).await {
            Err(StoreError::KeyTaken) => {
                return Err(Problem::caller(
                    StatusCode::CONFLICT,
                    "concurrent_submission",
                    "other submissions with the same record keys kept arriving at the same moment; nothing was stored; send the batch again",
                ))
            }
            other => other?,
        };
        match decided.outcome {
            AppendOutcome::Stored => {
                for key in &decided.subjects {
                    self.subjects.invalidate(key);
                }
                let m = &self.metrics;
                for (outcome, n) in [
                    ("accepted", decided.accepted),
                    ("rejected", decided.rejected),
                ] {
                    m.records
                        .get_or_create(&crate::metrics::RecordLabels {
                            item: item_id.clone(),
                            outcome,
                        })
                        .inc_by(n as u64);
                }
                let body = decided.response_body;
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

/// What a correction answers.
#[derive(Serialize)]
pub struct Corrected {
    record_id: String,
    /// `corrected` (a new revision) or `unchanged` (same content; nothing
    /// stored).
    status: &'static str,
    revision: u32,
    /// What the change meant for the notices: `corrected`, `lifted`,
    /// `notified` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    effect: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notices: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    recipients: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<Finding>,
}

impl Ingest {
    /// Corrects `current` (an active record the caller may change) with
    /// the whole new content `record`: validated against the active item
    /// version, stored as a new revision, and followed by correction, lift
    /// or new notices as the change calls for.
    pub async fn correct(
        &self,
        who: &Participant,
        current: &crate::store::StoredRecord,
        mut record: Value,
        reason: String,
        revision: Option<u32>,
    ) -> Result<Corrected, Problem> {
        if current.status != "active" {
            return Err(Problem::already_ended(&current.status));
        }
        let catalog = self.catalog.load_full();
        let item = catalog.get(&current.item).cloned().ok_or_else(|| {
            Problem::caller(
                StatusCode::CONFLICT,
                "unknown_item",
                "the record's catalog item is no longer in the catalog",
            )
        })?;
        let prefix = |f: Finding| Finding {
            pointer: format!("/record{}", f.pointer),
            ..f
        };
        let normalised = normalise_codes(&mut record, false);
        let mut v = item.validate(&record, self.limits.max_findings_per_record);
        if !v.errors.is_empty() {
            return Err(Problem::caller(
                StatusCode::BAD_REQUEST,
                "invalid_record",
                "the corrected record is not valid for the active item version; nothing was changed",
            )
            .with_errors(v.errors.into_iter().map(prefix).collect()));
        }
        v.warnings.splice(0..0, normalised);
        let subscriptions = self.subscriptions.load_full();
        let registry = self.registry.load_full();
        let Accepted {
            record: new,
            key_fields,
            ..
        } = self.accepted_record(&item, &record, &subscriptions, &registry)?;
        let holder = self
            .store
            .find_keys(&item.def.id, vec![new.natural_key.clone()])
            .await?
            .pop();
        let key_taken = || {
            let pointers: Vec<String> = key_fields
                .iter()
                .map(|f| format!("/record/{}", escape_pointer(f)))
                .collect();
            Problem::caller(
                StatusCode::CONFLICT,
                "duplicate_key",
                "another record already has the corrected record's key; nothing was changed",
            )
            .with_errors(
                pointers
                    .into_iter()
                    .map(|pointer| Finding {
                        pointer,
                        code: "duplicate_key".into(),
                        message: format!("another record has this key ({})", key_fields.join(", ")),
                    })
                    .collect(),
            )
        };
        let expected = revision.unwrap_or(current.revision);
        match holder {
            Some(h) if h.record_id != current.id => return Err(key_taken()),
            Some(h) if h.content_hash == new.content_hash && expected == current.revision => {
                return Ok(Corrected {
                    record_id: current.id.clone(),
                    status: "unchanged",
                    revision: current.revision,
                    effect: None,
                    notices: Vec::new(),
                    recipients: Vec::new(),
                    warnings: Vec::new(),
                })
            }
            _ => {}
        }
        let warnings = serde_json::to_string(&v.warnings).map_err(|e| Problem::gateway(&e))?;
        let changed_subjects = [
            current.body.subject_key(&self.redactor),
            new.subject_key.clone(),
        ];
        let outcome = self
            .store
            .correct_record(
                crate::store::Correction {
                    record_id: current.id.clone(),
                    expected_revision: expected,
                    item_version: item.def.version,
                    record: NewRecord { warnings, ..new },
                    reason,
                },
                &who.id,
            )
            .await;
        match outcome {
            Ok(crate::store::CorrectOutcome::Corrected {
                revision,
                effect,
                notices,
                recipients,
            }) => {
                for key in changed_subjects.iter().flatten() {
                    self.subjects.invalidate(key);
                }
                Ok(Corrected {
                record_id: current.id.clone(),
                status: "corrected",
                revision,
                effect: Some(effect),
                notices,
                recipients,
                    warnings: v.warnings.into_iter().map(prefix).collect(),
                })
            }
            Ok(crate::store::CorrectOutcome::NotFound) => Err(Problem::caller(
                StatusCode::NOT_FOUND,
                "record_not_found",
                "no record with this id is visible to the caller",
            )),
            Ok(crate::store::CorrectOutcome::AlreadyEnded(status)) => {
                Err(Problem::already_ended(&status))
            }
            Ok(crate::store::CorrectOutcome::RevisionChanged(now)) => Err(Problem::caller(
                StatusCode::CONFLICT,
                "revision_changed",
                format!(
                    "the record is at revision {now}, not {expected}: read it again and send the correction against it"
                ),
            )
            .with("current_revision", now)),
            Err(StoreError::KeyTaken) => Err(key_taken()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether `record`'s subject stands on a list that refuses it (an active
/// record of one of the item's `refused_while_listed` items).
fn listed(item: &CatalogItem, record: &NewRecord, subjects: &[SubjectRecord]) -> bool {
    record.subject_key.as_ref().is_some_and(|key| {
        subjects.iter().any(|s| {
            &s.subject_key == key
                && s.status == "active"
                && item.def.refused_while_listed.contains(&s.item)
        })
    })
}

/// Whether `record` completes the warning rule: with the subject's records
/// of the item at a counted level within the window before its decision
/// (stored ones not revoked or removed, and those of this batch), it makes
/// `rule.count`.
fn warned(
    rule: &crate::catalog::WarningRule,
    item: &str,
    record: &NewRecord,
    subjects: &[SubjectRecord],
    batch: &[NewRecord],
) -> bool {
    let (Some(key), Some(date)) = (&record.subject_key, record.decision_date) else {
        return false;
    };
    let since = crate::codes::months_before(date, rule.within_months);
    let counts = |level: Option<crate::catalog::Severity>, on: Option<time::Date>| {
        level.is_some_and(|l| rule.levels.contains(&l))
            && on.is_some_and(|d| d >= since && d <= date)
    };
    let stored = subjects
        .iter()
        .filter(|s| {
            &s.subject_key == key
                && s.item == item
                && matches!(s.status.as_str(), "active" | "expired")
                && counts(s.level, s.decision_date)
        })
        .count();
    let earlier = batch
        .iter()
        .filter(|r| r.subject_key.as_ref() == Some(key) && counts(r.level, r.decision_date))
        .count();
    stored + earlier + 1 >= rule.count as usize
}

/// What is kept of a valid record until it is stored.
pub(crate) struct Accepted {
    /// The record as stored.
    pub record: NewRecord,
    /// Names of the natural key's fields (pointers of `duplicate_key`).
    pub key_fields: Vec<String>,
    /// Pointer to the subject's identifier (`/uscc`, `/id_number`).
    subject_pointer: Option<String>,
    /// The warning notice the record makes if it completes the item's
    /// warning rule.
    warning: Option<Box<NewNotice>>,
}

/// One record of a prepared submission.
enum Entry {
    /// Refused; its result is final.
    Rejected(RecordResult),
    /// Valid; stored unless its natural key is held already.
    Candidate {
        index: usize,
        warnings: Vec<Finding>,
        accepted: Box<Accepted>,
    },
}

/// A validated submission, ready for [`Ingest::commit`].
pub struct Prepared {
    /// The submission without its records and answer.
    submission: NewSubmission,
    /// The item version validated against.
    item: Arc<CatalogItem>,
    entries: Vec<Entry>,
    rejection_codes: BTreeMap<String, usize>,
    /// Findings the answer may still list.
    budget: usize,
}

impl std::fmt::Debug for Prepared {
    // Never the records' field values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("submission", &self.submission.id)
            .field("records", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// How a record is recognised again.
struct Identity {
    /// Keyed digest of the item and the natural key's values, or of the
    /// content when the record lacks a key part.
    natural_key: String,
    /// Keyed digest of the content (the canonical JSON text: object keys
    /// sorted, as `serde_json` writes them without `preserve_order`).
    content_hash: String,
    /// The key's field names (empty when identified by content).
    fields: Vec<String>,
}

impl Identity {
    fn of(redactor: &Redactor, item: &CatalogItem, record: &Value, body: &str) -> Identity {
        let content_hash = redactor.keyed_digest([
            b"content".as_slice(),
            item.def.id.as_bytes(),
            body.as_bytes(),
        ]);
        match item.natural_key(record) {
            Some(parts) => {
                let mut input: Vec<&[u8]> = vec![b"key", item.def.id.as_bytes()];
                for (field, value) in &parts {
                    input.push(field.as_bytes());
                    input.push(value.trim().as_bytes());
                }
                Identity {
                    natural_key: format!("k:{}", redactor.keyed_digest(input)),
                    content_hash,
                    fields: parts.iter().map(|(f, _)| (*f).to_owned()).collect(),
                }
            }
            None => Identity {
                natural_key: format!("c:{content_hash}"),
                content_hash,
                fields: Vec::new(),
            },
        }
    }
}

/// What history changes in an accepted record: a listing with a removal
/// ends as removed, a record past its effect as expired, both without a
/// notice; one still in effect notifies, marked historical. No warnings.
fn historical(
    accepted: &mut Accepted,
    removal: Option<Value>,
    today: time::Date,
) -> Result<(), Problem> {
    let r = &mut accepted.record;
    accepted.warning = None;
    let ended = match removal {
        Some(doc) => Some(crate::store::Ended {
            reason: crate::notice::EndReason::Removed,
            removal: Some(serde_json::to_string(&doc).map_err(|e| Problem::gateway(&e))?),
        }),
        None if r.effective_until.is_some_and(|d| d < today) => Some(crate::store::Ended {
            reason: crate::notice::EndReason::Expired,
            removal: None,
        }),
        None => None,
    };
    if ended.is_some() {
        r.notice = None;
        r.removes = None;
        r.ended = ended;
    } else if let Some(n) = &mut r.notice {
        n.historical = true;
    }
    Ok(())
}

/// Normalises identifiers as departments send them: a resident ID's
/// lower-case check character `x` becomes `X`; with `legacy` (historical
/// imports only), a 15-digit resident ID (GB 11643-1989) becomes its
/// 18-digit form (`19` before the year, check character computed).
/// Returns a warning per change (pointer, `normalised_check_character`
/// or `converted_legacy_id`); never the value.
pub fn normalise_codes(record: &mut Value, legacy: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let Some(obj) = record.as_object_mut() else {
        return out;
    };
    for (kind, number) in crate::catalog::RESIDENT_ID_FIELDS {
        if obj.get(kind).and_then(Value::as_str) != Some("resident_id") {
            continue;
        }
        if let Some(Value::String(n)) = obj.get_mut(number) {
            if n.len() == 18 && n.ends_with('x') {
                n.replace_range(17.., "X");
                out.push(Finding {
                    pointer: format!("/{number}"),
                    code: "normalised_check_character".into(),
                    message: "the check character x was stored as upper-case X".into(),
                });
            } else if legacy && n.len() == 15 && n.bytes().all(|b| b.is_ascii_digit()) {
                let first17 = format!("{}19{}", &n[..6], &n[6..]);
                if let Some(check) = crate::codes::resident_id_check_char(&first17) {
                    *n = format!("{first17}{check}");
                    out.push(Finding {
                        pointer: format!("/{number}"),
                        code: "converted_legacy_id".into(),
                        message: "a 15-digit resident ID was converted to its 18-digit form".into(),
                    });
                }
            }
        }
    }
    out
}
