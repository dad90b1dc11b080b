//! Durable storage behind a use-case-level interface.
//!
//! Handlers and use cases speak in submissions, notices and deliveries,
//! never SQL. The embedded default is SQLite (`sqlite.rs`); a PostgreSQL
//! implementation of the same trait will serve several gateway instances.
//! An implementation must only report success once the data is durable
//! (fsync'd): the HTTP layer acknowledges on that basis. Record bodies come
//! back as [`RecordBody`], which only the `redact` module can open.

#[cfg(test)]
mod conformance;
pub mod migrate;
pub mod postgres;
mod shared;
pub mod sqlite;
mod sqlite_control;

pub use sqlite_control::{active_items, verify_audit};

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{Date, OffsetDateTime};

use crate::catalog::{Finding, Severity};
pub use crate::notice::{NoticeKind, StoredNotice};
use crate::redact::RecordBody;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting: a pull delivery not yet read, or a push delivery due at its
    /// next attempt time.
    Pending,
    /// A push attempt holds it under a lease.
    Inflight,
    /// The endpoint answered 2xx.
    Delivered,
    /// No more attempts; an administrator may retry it.
    Dead,
}

impl DeliveryState {
    /// Stored and API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Inflight => "inflight",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    /// Parses the stored and API spelling.
    pub fn parse(s: &str) -> Option<DeliveryState> {
        [
            DeliveryState::Pending,
            DeliveryState::Inflight,
            DeliveryState::Delivered,
            DeliveryState::Dead,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
    }
}

/// A delivery to create with a notice.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// Delivery id.
    pub id: String,
    /// Subscription it serves.
    pub subscription: String,
    /// Receiving agency.
    pub agency: String,
    /// Push (true) or pull.
    pub push: bool,
}

/// A notice to store with its deliveries (outbox).
#[derive(Debug, Clone)]
pub struct NewNotice {
    /// Notice id (`webhook-id` of pushes).
    pub id: String,
    /// Punishment, incentive or lift.
    pub kind: NoticeKind,
    /// Severity.
    pub severity: Severity,
    /// Measure ids expected from recipients.
    pub measures: Vec<String>,
    /// Start of effect (decision date).
    pub effective_from: Option<Date>,
    /// End of effect.
    pub effective_until: Option<Date>,
    /// Division code of the subject.
    pub region: Option<String>,
    /// Deliveries, one per routed subscription.
    pub deliveries: Vec<NewDelivery>,
    /// For a lift: the notice it lifts.
    pub lifts: Option<String>,
    /// For a correction: the notice it corrects.
    pub corrects: Option<String>,
    /// For a lift: why.
    pub reason: Option<String>,
    /// About a record loaded from history (`credgate import`).
    pub historical: bool,
    /// For a grade change: filled in by the store, which knows the grade
    /// before.
    pub grade: Option<crate::notice::GradeShift>,
}

/// A subject's grade as assessed, to be stored (see
/// [`Store::set_grades`]).
#[derive(Debug, Clone)]
pub struct GradeUpdate {
    /// Subject key.
    pub subject_key: String,
    /// Grade code.
    pub grade: String,
    /// Rule that gave it.
    pub rule: String,
    /// Version of the rule set.
    pub rules_version: u32,
    /// 6-digit division code of the subject, when known.
    pub region: Option<String>,
    /// Day on which the same records may give another grade (a rule's
    /// period closes): assess again then.
    pub review_after: Option<Date>,
    /// The grade a subject not assessed before had (the last rule's).
    pub default_grade: String,
    /// The `grade_change` notice to store if the grade changed, routed,
    /// with the record it hangs on (the subject's latest).
    pub notice: Option<GradeNotice>,
}

/// A subject's ungraded change, as the store marked it (see
/// [`Store::grade_marks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradeMark {
    /// Subject key.
    pub subject_key: String,
    /// The mark: a number given once per store.
    pub mark: i64,
}

/// A `grade_change` notice and the record it is filed under.
#[derive(Debug, Clone)]
pub struct GradeNotice {
    /// The notice, routed (its `grade` is filled in by the store).
    pub notice: NewNotice,
    /// Record id.
    pub record_id: String,
    /// The record's item and version.
    pub item: String,
    /// Item version.
    pub item_version: u32,
    /// The record's submitter.
    pub source: String,
}

/// A stored grade that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradeChanged {
    /// Subject key.
    pub subject_key: String,
    /// Grade before.
    pub from: String,
    /// Grade now.
    pub to: String,
    /// The notice stored, if one was given.
    pub notice_id: Option<String>,
}

/// Subjects per grade and region.
#[derive(Debug, Clone, Serialize)]
pub struct GradeCount {
    /// Grade code.
    pub grade: String,
    /// 6-digit division code (none when unknown).
    pub region: Option<String>,
    /// Subjects.
    pub subjects: u64,
}

/// An accepted record ready to be stored. Its `Debug` output never holds
/// the record's fields.
#[derive(Clone)]
pub struct NewRecord {
    /// Gateway-assigned id (UUIDv7, time-ordered).
    pub id: String,
    /// Subject type as submitted.
    pub subject_type: String,
    /// USCC, or a keyed pseudonym of a personal ID number; never an ID in clear.
    pub subject_key: Option<String>,
    /// Decision (or listing) date.
    pub decision_date: Option<Date>,
    /// End of the record's effect (lift notice after it), if the item says.
    pub effective_until: Option<Date>,
    /// The record as submitted (validated), as JSON text: serialized on
    /// the request's task, not on the single writer thread.
    pub body: String,
    /// Warnings reported to the submitter (JSON array).
    pub warnings: String,
    /// Keyed digest of the fields that identify the decision (or of the
    /// whole content when the record lacks one); unique per item.
    pub natural_key: String,
    /// Keyed digest of the record's content: a resend with the same one is
    /// a duplicate.
    pub content_hash: String,
    /// Level (一般/较重/严重) under the item's notice rule, if it has one.
    pub level: Option<Severity>,
    /// Other lists this record removes its subject from, in the same
    /// transaction.
    pub removes: Option<Removes>,
    /// Stored as already ended (a historical record whose effect ended
    /// before it was loaded): no notice.
    pub ended: Option<Ended>,
    /// Notice derived from it, if any.
    pub notice: Option<NewNotice>,
    /// Its public id and publicity period, if it is published.
    pub publicity: Option<Publication>,
}

/// How a record is published on the public channel: stamped at acceptance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The id the public channel shows (not the record id).
    pub public_id: String,
    /// Rule set, start and end of publicity.
    pub stamp: crate::publicity::Stamp,
}

/// A record as the public channel shows it (its fields still to be
/// narrowed to the `public` ones).
#[derive(Debug, Clone)]
pub struct PublicRecord {
    /// Public id.
    pub public_id: String,
    /// Catalog item.
    pub item: String,
    /// The record, to be opened only by `redact`.
    pub body: RecordBody,
    /// Publicity rule set.
    pub rule_set: String,
    /// First day shown.
    pub start: Date,
    /// Last day shown.
    pub end: Date,
    /// Last change (receipt or correction), for `ETag`s and `Last-Modified`.
    pub revision: u32,
}

/// What the public asks for.
#[derive(Debug, Clone)]
pub struct PublicQuery {
    /// A unified social credit code, exactly.
    pub uscc: Option<String>,
    /// Part of a subject name (legal entities only).
    pub name: Option<String>,
    /// One item.
    pub item: Option<String>,
    /// The day that decides what is inside its period.
    pub today: Date,
    /// Skip this many.
    pub offset: u32,
    /// At most this many.
    pub limit: u32,
}

/// How a record loaded from history had ended.
#[derive(Debug, Clone)]
pub struct Ended {
    /// `expired` or `removed`.
    pub reason: crate::notice::EndReason,
    /// The removal document of a removed listing (JSON).
    pub removal: Option<String>,
}

/// A record's removal of its subject from other lists: every active
/// record of `items` with the same subject key is ended as removed.
#[derive(Debug, Clone)]
pub struct Removes {
    /// List items.
    pub items: Vec<String>,
    /// The removal document written on each (JSON).
    pub removal: String,
    /// The removal date.
    pub on: Option<Date>,
}

/// What is known of a subject's record, for rules across records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectRecord {
    /// Record id.
    pub record_id: String,
    /// Subject key.
    pub subject_key: String,
    /// Catalog item.
    pub item: String,
    /// `active`, `revoked`, `expired` or `removed`.
    pub status: String,
    /// Level, if the item grades its records.
    pub level: Option<Severity>,
    /// Decision date.
    pub decision_date: Option<Date>,
}

/// An issued credit review report, to store.
#[derive(Debug, Clone)]
pub struct NewReview {
    /// Report id.
    pub id: String,
    /// The participant that asked.
    pub agency: String,
    /// The subject's key (its USCC, or the pseudonym of its ID number).
    pub subject_key: String,
    /// Purpose code.
    pub purpose: String,
    /// Issue time.
    pub issued_at: OffsetDateTime,
    /// The signed report as issued (JSON).
    pub document: Vec<u8>,
}

/// A stored credit review report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReview {
    /// The participant that asked.
    pub agency: String,
    /// The signed report as issued (JSON).
    pub document: Vec<u8>,
}

/// Who asked about a subject, when and why (the subject's right to know).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReviewEntry {
    /// Report id.
    pub report_id: String,
    /// The participant that asked.
    pub agency: String,
    /// Purpose code.
    pub purpose: String,
    /// Issue time (RFC 3339).
    pub issued_at: String,
}

/// The stored record that holds a natural key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHolder {
    /// The natural key (digest).
    pub natural_key: String,
    /// Record id.
    pub record_id: String,
    /// Digest of its current content.
    pub content_hash: String,
    /// Who submitted it.
    pub submitter: String,
}

impl std::fmt::Debug for NewRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewRecord")
            .field("id", &self.id)
            .field("subject_type", &self.subject_type)
            .field("body", &"<redacted>")
            .field("notice", &self.notice.as_ref().map(|n| &n.id))
            .finish_non_exhaustive()
    }
}

/// One `POST /v1/records` to store, with its response for idempotent replay.
#[derive(Debug, Clone)]
pub struct NewSubmission {
    /// Gateway-assigned submission id.
    pub id: String,
    /// Submitting participant.
    pub participant: String,
    /// Catalog item id.
    pub item: String,
    /// Item version the records were validated against.
    pub item_version: u32,
    /// Receive time.
    pub received_at: OffsetDateTime,
    /// Accepted records.
    pub records: Vec<NewRecord>,
    /// Number of rejected records.
    pub rejected: usize,
    /// Error codes of the rejected records, with counts (for quality stats).
    pub rejection_codes: Vec<(String, usize)>,
    /// `Idempotency-Key` and the digest of the request body.
    pub idempotency: Option<IdempotencyClaim>,
    /// HTTP status sent for this submission.
    pub response_status: u16,
    /// Response body (JSON).
    pub response_body: Vec<u8>,
    /// Loaded from history (`credgate import`): left out of the
    /// timeliness and acceptance statistics.
    pub historical: bool,
}

/// An idempotency key claimed by a submission.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    /// The key as sent.
    pub key: String,
    /// SHA-256 of the request body (hex).
    pub request_hash: String,
}

/// A response remembered for an idempotency key.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    /// Digest of the request that produced it.
    pub request_hash: String,
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

/// What a submission's outcome depends on in the store: the records
/// holding its natural keys, and its subjects' records of the items its
/// rules read.
#[derive(Debug, Clone)]
pub struct SubmissionLookups {
    /// Catalog item of the submission.
    pub item: String,
    /// Natural keys the submission's records would take.
    pub keys: Vec<String>,
    /// Subject keys of the records.
    pub subjects: Vec<String>,
    /// Items whose records about those subjects the rules read.
    pub items: Vec<String>,
}

/// Turns what [`SubmissionLookups`] found into the submission to store.
/// It may run more than once, each time on fresh look-ups, and must not
/// depend on anything else that changes between runs.
pub type Decide = Arc<
    dyn Fn(Vec<KeyHolder>, Vec<SubjectRecord>) -> Result<NewSubmission, StoreError> + Send + Sync,
>;

/// What a caller of [`Store::decide_and_append`] learns about the
/// submission that was decided and stored.
#[derive(Debug)]
pub struct Decided {
    /// Stored, or the answer of an earlier request with the same
    /// idempotency key (then nothing was stored).
    pub outcome: AppendOutcome,
    /// Records accepted.
    pub accepted: usize,
    /// Records rejected.
    pub rejected: usize,
    /// The answer stored with the submission.
    pub response_body: Vec<u8>,
    /// Subject keys of the accepted records.
    pub subjects: Vec<String>,
}

impl Decided {
    fn of(submission: &NewSubmission, outcome: AppendOutcome) -> Decided {
        Decided {
            outcome,
            accepted: submission.records.len(),
            rejected: submission.rejected,
            response_body: submission.response_body.clone(),
            subjects: submission
                .records
                .iter()
                .filter_map(|r| r.subject_key.clone())
                .collect(),
        }
    }
}

impl NewSubmission {
    /// Whether storing this submission gives delivery something to do
    /// (a notice with recipients, or listings it ends).
    pub fn wakes_delivery(&self) -> bool {
        self.records.iter().any(|r| {
            r.removes.is_some() || r.notice.as_ref().is_some_and(|n| !n.deliveries.is_empty())
        })
    }
}

/// [`Store::decide_and_append`] with the look-ups outside the write: a
/// natural key taken by another write between the look-up and the commit
/// is looked up again, three tries in all, then `KeyTaken`.
pub async fn lookup_then_append<S: Store + ?Sized>(
    store: &S,
    lookups: SubmissionLookups,
    decide: Decide,
) -> Result<Decided, StoreError> {
    let (lookups, decide) = (&lookups, &decide);
    while_keys_taken(|| async move {
        let (holders, others) = store.lookups(lookups.clone()).await?;
        let submission = decide(holders, others)?;
        let decided = Decided::of(&submission, AppendOutcome::Stored);
        let outcome = store.append_submission(submission).await?;
        Ok(Decided { outcome, ..decided })
    })
    .await
}

/// Runs `attempt` again while it fails with `KeyTaken` (a natural key it
/// looked up was taken before its commit), three tries in all.
pub(crate) async fn while_keys_taken<T, F, A>(mut attempt: A) -> Result<T, StoreError>
where
    A: FnMut() -> F,
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(StoreError::KeyTaken) if tries < 3 => continue,
            outcome => return outcome,
        }
    }
}

/// Result of appending a submission.
#[derive(Debug)]
pub enum AppendOutcome {
    /// Stored and durable.
    Stored,
    /// The idempotency key was used before; nothing new was stored.
    Replay(StoredResponse),
}

/// A stored record.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    /// Record id.
    pub id: String,
    /// Catalog item id.
    pub item: String,
    /// Item version it was validated against.
    pub item_version: u32,
    /// Submitting department.
    pub submitter: String,
    /// Subject type.
    pub subject_type: String,
    /// Decision date.
    pub decision_date: Option<Date>,
    /// End of effect.
    pub effective_until: Option<Date>,
    /// Receive time.
    pub received_at: OffsetDateTime,
    /// The record, to be opened only by `redact`.
    pub body: RecordBody,
    /// Warnings given at submission.
    pub warnings: Vec<Finding>,
    /// `active`, `revoked`, `expired` or `removed`.
    pub status: String,
    /// Why it stopped being active (`repaired`, `revoked`, `corrected`,
    /// `expired`, `removed`).
    pub end_reason: Option<String>,
    /// The removal document, once removed from its list.
    pub removal: Option<Value>,
    /// Revision number (1 until corrected).
    pub revision: u32,
}

/// A delivery on its way out, with what the egress step needs.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Position in the agency's gap-free, commit-ordered stream (pull
    /// deliveries; 0 for push).
    pub position: i64,
    /// Delivery id.
    pub delivery_id: String,
    /// Subscription.
    pub subscription: String,
    /// Receiving agency.
    pub agency: String,
    /// Attempts so far (push).
    pub attempts: u32,
    /// Claim number (lease token) this delivery was claimed under; a
    /// result is stored only while the delivery still carries it.
    pub claim: i64,
    /// The notice.
    pub notice: StoredNotice,
    /// The record it is about.
    pub record: RecordBody,
}

/// A push endpoint's health, shared by every instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointHealth {
    /// Failed attempts in a row.
    pub failures: u32,
    /// Paused until this time (unix ms; 0 or past: not paused).
    pub paused_until_ms: i64,
    /// This outcome paused it (so one instance reports the pause).
    pub newly_paused: bool,
}

/// How a push attempt ended.
#[derive(Debug, Clone)]
pub enum DeliveryResult {
    /// The endpoint answered 2xx.
    Delivered,
    /// Try again at `at` (unix ms).
    Retry {
        /// Next attempt time, unix milliseconds.
        at: i64,
        /// What went wrong (no record data).
        error: String,
    },
    /// Not attempted (endpoint paused): try at `at`, attempt not counted.
    Deferred {
        /// Next attempt time, unix milliseconds.
        at: i64,
    },
    /// No more attempts.
    Dead {
        /// What went wrong.
        error: String,
    },
}

/// The result of one push attempt, with what the audit entry names.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Delivery id.
    pub delivery_id: String,
    /// Notice id.
    pub notice_id: String,
    /// Receiving agency.
    pub agency: String,
    /// Subscription.
    pub subscription: String,
    /// Attempts including this one.
    pub attempts: u32,
    /// The claim the attempt was made under: a delivery claimed again
    /// since (its lease lapsed) ignores this result.
    pub claim: i64,
    /// How it ended.
    pub result: DeliveryResult,
}

/// A delivery as administrators see it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryInfo {
    /// Delivery id.
    pub id: String,
    /// Notice id.
    pub notice_id: String,
    /// Notice type.
    pub notice_type: NoticeKind,
    /// Record id.
    pub record_id: String,
    /// Subscription.
    pub subscription: String,
    /// Agency.
    pub agency: String,
    /// `pull` or `push`.
    pub mode: crate::routing::ModeName,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made.
    pub attempts: u32,
    /// Last error, if any.
    pub last_error: Option<String>,
}

/// Feedback outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackOutcome {
    /// The measure was applied.
    Applied,
    /// The measure does not apply (a note says why).
    NotApplicable,
    /// Not decided yet.
    Pending,
}

/// One feedback entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Feedback {
    /// Notice id.
    pub notice_id: String,
    /// Reporting agency.
    pub agency: String,
    /// Measure id.
    pub measure: String,
    /// Outcome.
    pub outcome: FeedbackOutcome,
    /// When the measure was applied (or decided).
    #[serde(with = "crate::codes::iso_date_opt")]
    pub date: Option<Date>,
    /// Free-text note.
    pub note: Option<String>,
    /// When credgate received it.
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
}

/// Result of storing feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackStored {
    /// Stored (new or replacing the agency's earlier answer for the measure).
    Stored,
    /// No such notice.
    UnknownNotice,
    /// The agency never received this notice.
    NotRecipient,
}

/// A notice of a record with its deliveries and feedback.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeHistory {
    /// The notice.
    #[serde(flatten)]
    pub notice: StoredNotice,
    /// Deliveries.
    pub deliveries: Vec<DeliveryInfo>,
    /// Feedback received.
    pub feedback: Vec<Feedback>,
}

/// How a record's effect ends.
#[derive(Debug, Clone)]
pub struct Ending {
    /// Why (the lift notices' `reason`).
    pub reason: crate::notice::EndReason,
    /// Free-text note of the submitter or administrator.
    pub note: Option<String>,
    /// The removal document (JSON text) of a removal from a list.
    pub removal: Option<String>,
    /// The day the effect ends (the lifts' `effective_until`); today when
    /// not given.
    pub on: Option<Date>,
}

impl Ending {
    /// An ending for `reason` today, without note or document.
    pub fn new(reason: crate::notice::EndReason) -> Ending {
        Ending {
            reason,
            note: None,
            removal: None,
            on: None,
        }
    }
}

/// A correction of a stored record: its whole new content.
#[derive(Debug, Clone)]
pub struct Correction {
    /// The record corrected.
    pub record_id: String,
    /// The revision the corrector saw; another correction in between
    /// refuses this one.
    pub expected_revision: u32,
    /// Item version the new content was validated against.
    pub item_version: u32,
    /// The new content and what follows from it (its `id` is ignored). Its
    /// `notice`, routed as for a new record, is what the corrected record
    /// calls for: it becomes a correction of each notice in effect, a new
    /// notice when none is, and its absence lifts those in effect.
    pub record: NewRecord,
    /// Why (required; audited).
    pub reason: String,
}

/// Result of a correction.
#[derive(Debug, Clone)]
pub enum CorrectOutcome {
    /// Stored as revision `revision`.
    Corrected {
        /// The new revision number.
        revision: u32,
        /// `corrected` (correction notices sent), `lifted` (the notice
        /// condition ended), `notified` (it started) or `none`.
        effect: &'static str,
        /// Notices created.
        notices: Vec<String>,
        /// Agencies that will be told.
        recipients: Vec<String>,
    },
    /// No such record.
    NotFound,
    /// The record's effect has ended (`revoked`, `expired`, `removed`).
    AlreadyEnded(String),
    /// It was corrected since the corrector read it; now at this revision.
    RevisionChanged(u32),
}

/// An earlier revision of a record.
#[derive(Debug, Clone, Serialize)]
pub struct Revision {
    /// Revision number.
    pub revision: u32,
    /// Item version it was validated against.
    pub item_version: u32,
    /// When it was replaced.
    #[serde(with = "time::serde::rfc3339")]
    pub replaced_at: OffsetDateTime,
    /// Who replaced it.
    pub replaced_by: String,
    /// Why it was replaced.
    pub reason: Option<String>,
    /// Its content, to be opened only by `redact`.
    #[serde(skip)]
    pub body: RecordBody,
}

/// Result of ending a record's effect.
#[derive(Debug, Clone)]
pub enum EndOutcome {
    /// Ended; lift notices created.
    Ended {
        /// The lift notices (one per lifted notice).
        lift_notices: Vec<String>,
        /// Agencies that will be told.
        recipients: Vec<String>,
    },
    /// No such record.
    NotFound,
    /// Already revoked or expired.
    AlreadyEnded(String),
}

/// Which audit entries to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Entries after this chain position, oldest first.
    pub after: i64,
    /// Entries before this chain position, newest first (instead of
    /// `after`'s order).
    pub before: Option<i64>,
    /// Only this actor's entries.
    pub actor: Option<String>,
    /// Only entries of this action (`catalog.activate`) or kind of action
    /// (`catalog`: every `catalog.*`).
    pub kind: Option<String>,
    /// Most entries listed.
    pub limit: usize,
}

impl AuditFilter {
    /// Every entry after `after`, oldest first, at most `limit`.
    pub fn after(after: i64, limit: usize) -> AuditFilter {
        AuditFilter {
            after,
            limit,
            ..AuditFilter::default()
        }
    }

    /// The SQL condition and order over `audit` (columns `seq`, `actor`,
    /// `action`), with `$n`-numbered parameters after, before, actor,
    /// kind (text, NULL when absent) and limit.
    pub(crate) fn sql(&self, cast: &str) -> String {
        let order = if self.before.is_some() { "DESC" } else { "ASC" };
        format!(
            "SELECT seq, at, actor, action, subject, details, prev_hash, hash FROM audit \
             WHERE seq > $1 AND seq < $2 \
             AND ($3{cast} IS NULL OR actor = $3) \
             AND ($4{cast} IS NULL OR action = $4 OR substr(action, 1, length($4) + 1) = $4 || '.') \
             ORDER BY seq {order} LIMIT $5"
        )
    }
}

/// Feedback figures of one agency.
#[derive(Debug, Clone, Serialize)]
pub struct AgencyFeedbackStats {
    /// Agency.
    pub agency: String,
    /// Punishment/incentive notices routed to it in the period.
    pub notices: u64,
    /// Of those, notices with at least one feedback entry.
    pub with_feedback: u64,
    /// `with_feedback / notices` (0 when no notices).
    pub feedback_rate: f64,
    /// Deliveries of every notice issued in the period, by state
    /// (`pending`, `inflight`, `delivered`, `dead`).
    pub deliveries: std::collections::BTreeMap<String, u64>,
    /// Credit review reports the agency was issued in the period.
    pub reviews: u64,
}

/// A catalog item version as administrators see it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: u32,
    /// When it was created.
    pub created_at: String,
    /// Who created it (`seed` for the files).
    pub created_by: String,
    /// Reason given (required for breaking changes).
    pub reason: Option<String>,
    /// Whether it was a forced breaking change.
    pub breaking: bool,
    /// Whether it is the active version.
    pub active: bool,
}

/// Activation of an item version (new, or a rollback to an old one).
#[derive(Debug, Clone)]
pub struct ItemActivation {
    /// Item id.
    pub item: String,
    /// Version to activate.
    pub version: u32,
    /// The definition for a new version; `None` re-activates a stored one.
    pub definition: Option<Value>,
    /// Administrator.
    pub actor: String,
    /// Reason (required when breaking).
    pub reason: Option<String>,
    /// Whether the change is breaking (and was forced).
    pub breaking: bool,
    /// The classified changes, for the audit log.
    pub diff: Value,
    /// SHA-256 of the definition before and after.
    pub digests: (String, String),
}

/// Result of an activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivateOutcome {
    /// Active now.
    Activated,
    /// Another administrator created this version number first.
    VersionTaken {
        /// Latest version now.
        latest: u32,
    },
    /// Rollback to a version that does not exist.
    NoSuchVersion,
}

/// Kinds of registry documents administrators edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    /// A participant.
    Participant,
    /// A subscription.
    Subscription,
}

impl DocKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DocKind::Participant => "participant",
            DocKind::Subscription => "subscription",
        }
    }
}

/// What the control plane runs on: active catalog definitions,
/// participants and subscriptions.
#[derive(Debug, Clone, Default)]
pub struct ControlState {
    /// Active item definitions.
    pub items: Vec<Value>,
    /// Participants.
    pub participants: Vec<Value>,
    /// Subscriptions.
    pub subscriptions: Vec<Value>,
    /// What seeding did (for the log).
    pub seeded: Vec<String>,
}

/// Quality figures of one department and item.
#[derive(Debug, Clone, Serialize)]
pub struct DepartmentStats {
    /// Department.
    pub department: String,
    /// Catalog item.
    pub item: String,
    /// Records submitted.
    pub submitted: u64,
    /// Accepted.
    pub accepted: u64,
    /// Rejected.
    pub rejected: u64,
    /// Rejections by error code (a record with two faults counts twice).
    pub rejected_by_code: std::collections::BTreeMap<String, u64>,
    /// accepted / submitted.
    pub acceptance_rate: f64,
    /// Median days from decision date to receipt.
    pub timeliness_median_days: Option<f64>,
    /// Worst (largest) days from decision date to receipt.
    pub timeliness_worst_days: Option<i64>,
    /// Share of accepted records received within 7 working days (Mon-Fri;
    /// public holidays not counted — confirm with the operator).
    pub within_7_working_days: Option<f64>,
    /// Records received per day (China Standard Time), oldest first.
    pub daily: Vec<DailyCount>,
}

/// Records of one department and item received on one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DailyCount {
    /// The day, `YYYY-MM-DD`, China Standard Time.
    pub date: String,
    /// Records accepted.
    pub accepted: u64,
    /// Records rejected.
    pub rejected: u64,
}

/// Storage failures. Always the gateway's side: the caller gets a 5xx
/// without detail, the log gets the cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("database: {0}")]
    Database(String),
    /// The writer is gone (shutting down or crashed).
    #[error("store writer unavailable")]
    Unavailable,
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A record's natural key was taken by a write committed since it was
    /// looked up; nothing was stored. Look the keys up again and retry.
    #[error("a natural key was taken concurrently")]
    KeyTaken,
}

/// The use cases storage serves.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a submission's accepted records, their notices and deliveries
    /// and its idempotency entry in one durable transaction, or returns the
    /// earlier response when the key was already used.
    async fn append_submission(
        &self,
        submission: NewSubmission,
    ) -> Result<AppendOutcome, StoreError>;

    /// The records of `item` that hold any of the natural keys `keys`.
    async fn find_keys(&self, item: &str, keys: Vec<String>) -> Result<Vec<KeyHolder>, StoreError>;

    /// The records of `items` about any of `subjects` (subject keys).
    async fn subject_records(
        &self,
        subjects: Vec<String>,
        items: Vec<String>,
    ) -> Result<Vec<SubjectRecord>, StoreError>;

    /// Every record of `items` about each of `subjects`, in full, with the
    /// subject it is about: what [`Store::subject_records`] and
    /// [`Store::record`] find for those subjects, in one read. The grader
    /// assesses the subjects that changed this way, a batch at a time.
    async fn subjects_records(
        &self,
        subjects: Vec<String>,
        items: Vec<String>,
    ) -> Result<Vec<(String, StoredRecord)>, StoreError>;

    /// Looks up what a submission's outcome depends on, lets `decide`
    /// turn that into the submission, and stores it as
    /// [`Store::append_submission`] does. `KeyTaken` only when other
    /// writes kept taking the looked-up keys. The default looks up outside
    /// the write ([`lookup_then_append`]); a store may look up inside it.
    async fn decide_and_append(
        &self,
        lookups: SubmissionLookups,
        decide: Decide,
    ) -> Result<Decided, StoreError> {
        lookup_then_append(self, lookups, decide).await
    }

    /// Both look-ups a submission needs before its commit, in one go:
    /// [`Store::find_keys`] and [`Store::subject_records`]. A store may
    /// answer them on one connection (SQLite: one hand-off to the blocking
    /// pool instead of two) or at once (PostgreSQL).
    async fn lookups(
        &self,
        lookups: SubmissionLookups,
    ) -> Result<(Vec<KeyHolder>, Vec<SubjectRecord>), StoreError> {
        let holders = self.find_keys(&lookups.item, lookups.keys).await?;
        let others = self
            .subject_records(lookups.subjects, lookups.items)
            .await?;
        Ok((holders, others))
    }

    /// Stores an issued credit review report, with its audit entry, in
    /// one commit.
    async fn add_review(&self, review: NewReview) -> Result<(), StoreError>;

    /// A stored credit review report.
    async fn review(&self, id: &str) -> Result<Option<StoredReview>, StoreError>;

    /// The reviews made about a subject (its key), newest first, at most
    /// `limit`.
    async fn reviews_about(
        &self,
        subject_key: &str,
        limit: usize,
    ) -> Result<Vec<ReviewEntry>, StoreError>;

    /// The response remembered for `(participant, key)`, if any.
    async fn idempotent_response(
        &self,
        participant: &str,
        key: &str,
    ) -> Result<Option<StoredResponse>, StoreError>;

    /// One record by id.
    async fn record(&self, id: &str) -> Result<Option<StoredRecord>, StoreError>;

    /// Notices of a record, with deliveries and feedback.
    async fn record_notices(&self, record_id: &str) -> Result<Vec<NoticeHistory>, StoreError>;

    /// Ends a record's effect (`reason`), and in the same transaction
    /// creates a lift notice for each of its notices with one delivery to
    /// every subscription that had a delivery of the original.
    async fn end_record(
        &self,
        record_id: &str,
        ending: Ending,
        actor: &str,
    ) -> Result<EndOutcome, StoreError>;

    /// Replaces an active record's content with a new revision (the
    /// earlier one kept), and in the same transaction creates the notices
    /// the change calls for. A natural key held by another record fails
    /// with [`StoreError::KeyTaken`].
    async fn correct_record(
        &self,
        correction: Correction,
        actor: &str,
    ) -> Result<CorrectOutcome, StoreError>;

    /// The earlier revisions of a record, oldest first.
    async fn revisions(&self, record_id: &str) -> Result<Vec<Revision>, StoreError>;

    /// Up to `limit` active records whose effective period ended before
    /// `today`.
    async fn expiring(&self, today: Date, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Ends, with reason `expired`, every active record whose effective
    /// period ended before `today` (up to 1,000 a call); returns how many.
    /// Safe on several instances at once: each end is re-checked under
    /// the record's lock, so a record is ended once.
    async fn expire_due(&self, today: Date) -> Result<usize, StoreError> {
        let mut ended = 0;
        for id in self.expiring(today, 1000).await? {
            if let EndOutcome::Ended { .. } = self
                .end_record(
                    &id,
                    Ending::new(crate::notice::EndReason::Expired),
                    "gateway",
                )
                .await?
            {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// The agency's pull deliveries after stream position `after`, in
    /// stream order, which is commit order with no gaps: a delivery never
    /// becomes visible after one with a higher position.
    async fn pull(
        &self,
        agency: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Outbound>, StoreError>;

    /// Stores the agency's acknowledged stream position (never moves
    /// backwards, never past the agency's last delivery) and marks the
    /// deliveries up to it delivered.
    async fn ack(&self, agency: &str, position: i64) -> Result<(), StoreError>;

    /// The agency's acknowledged position (0 if none).
    async fn pull_position(&self, agency: &str) -> Result<i64, StoreError>;

    /// The stream position of a cursor of the earlier format (the global
    /// delivery sequence): the agency's last pull delivery at or before it.
    async fn legacy_position(&self, agency: &str, seq: i64) -> Result<i64, StoreError>;

    /// A receiver that changes whenever deliveries were committed (by this
    /// instance or, on a shared database, any other).
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// On a database shared by several instances: a receiver that changes
    /// whenever any instance changed the catalog, a participant or a
    /// subscription, so this one reloads them. `None` when this process
    /// is the only writer (it applies its own changes directly).
    fn control_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Claims, for each `(subscription, limit)`, up to `limit` of its push
    /// deliveries due at `now_ms`, for `lease_ms`; each claim takes a new
    /// claim number.
    async fn claim_due(
        &self,
        now_ms: i64,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> Result<Vec<Outbound>, StoreError>;

    /// Records the results of push attempts, many in one transaction; a
    /// result whose claim is no longer the delivery's current one (it was
    /// claimed again after its lease lapsed) is ignored.
    async fn finish_deliveries(&self, finished: Vec<Finished>) -> Result<(), StoreError>;

    /// Counts a push attempt in its endpoint's health: a success clears
    /// the failures in a row and any pause; a failure adds one, and once
    /// there are `threshold` in a row an endpoint not paused already is
    /// paused until `now_ms + pause_ms`. One statement, so instances
    /// counting at once count every failure.
    async fn endpoint_outcome(
        &self,
        subscription: &str,
        ok: bool,
        threshold: u32,
        now_ms: i64,
        pause_ms: i64,
    ) -> Result<EndpointHealth, StoreError>;

    /// Every endpoint with failures or a pause.
    async fn endpoint_health(&self) -> Result<Vec<(String, EndpointHealth)>, StoreError>;

    /// Deletes up to `batch` idempotency entries older than the configured
    /// time to live (oldest first, through an index); returns how many.
    async fn purge_idempotency(&self, batch: usize) -> Result<usize, StoreError>;

    /// Deliveries in a state (`dead`, `pending`, …), oldest first.
    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryInfo>, StoreError>;

    /// Puts a dead delivery back in the queue; false if it is not dead.
    async fn retry_delivery(&self, delivery_id: &str, actor: &str) -> Result<bool, StoreError>;

    /// Stores an agency's feedback on a notice's measure.
    async fn add_feedback(&self, feedback: Feedback) -> Result<FeedbackStored, StoreError>;

    /// The notice if `agency` was sent it (by push or pull); `None` both
    /// when it does not exist and when it went to others, so a caller
    /// cannot tell the two apart.
    async fn received_notice(
        &self,
        notice_id: &str,
        agency: &str,
    ) -> Result<Option<StoredNotice>, StoreError>;

    /// A notice by id.
    async fn notice(&self, notice_id: &str) -> Result<Option<StoredNotice>, StoreError>;

    /// Feedback rate per agency for notices issued in `[from, to)`.
    async fn feedback_stats(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<AgencyFeedbackStats>, StoreError>;

    /// Stores what is missing of the catalog files, participants and
    /// subscriptions (first start) and returns the control state.
    async fn seed_control(
        &self,
        items: Vec<Value>,
        participants: Vec<(String, Value)>,
        subscriptions: Vec<(String, Value)>,
    ) -> Result<ControlState, StoreError>;

    /// Versions of an item, oldest first.
    async fn item_versions(&self, item: &str) -> Result<Vec<VersionInfo>, StoreError>;

    /// One stored version of an item.
    async fn item_version(&self, item: &str, version: u32) -> Result<Option<Value>, StoreError>;

    /// Stores (if new) and activates an item version, with its audit entry.
    async fn activate_item(
        &self,
        activation: ItemActivation,
    ) -> Result<ActivateOutcome, StoreError>;

    /// Creates or replaces a participant or subscription, with its audit
    /// entry (`action`, `details`).
    async fn put_document(
        &self,
        kind: DocKind,
        id: &str,
        body: Value,
        actor: &str,
        action: &str,
        details: Value,
    ) -> Result<(), StoreError>;

    /// Audit entries the filter selects: oldest first after `after`, or
    /// newest first before `before`.
    async fn audit_page(&self, filter: AuditFilter)
        -> Result<Vec<crate::audit::Entry>, StoreError>;

    /// Writes a signed checkpoint of the audit chain head (if it moved).
    async fn checkpoint(&self) -> Result<Option<crate::audit::Checkpoint>, StoreError>;

    /// Quality figures per department and item for submissions received in
    /// `[from, to)`.
    async fn department_stats(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<DepartmentStats>, StoreError>;

    /// Versions of the grade rule set, oldest first; the last is active.
    async fn grade_rule_versions(&self) -> Result<Vec<VersionInfo>, StoreError>;

    /// One version of the grade rule set (`None`: the active one), with
    /// its number.
    async fn grade_rules(&self, version: Option<u32>) -> Result<Option<(u32, Value)>, StoreError>;

    /// Stores a (checked) rule set as the next version and makes it
    /// active, with its audit entry; returns its version.
    async fn add_grade_rules(
        &self,
        document: Value,
        actor: &str,
        reason: Option<String>,
    ) -> Result<u32, StoreError>;

    /// Stores subjects' assessed grades, each subject's atomically (all in
    /// one transaction on SQLite; up to 200 subjects per transaction on
    /// PostgreSQL). Where a grade differs from the one stored (or, for a
    /// subject not assessed before, from its default), stores the
    /// update's notice with the grade before and after. Each subject's row
    /// is locked while it is compared, so instances assessing at once send
    /// one notice. A subject given twice is compared against its first
    /// update the second time.
    ///
    /// In the same transaction, deletes each of `marks` that is still its
    /// subject's (read with [`Store::grade_marks`] before its records
    /// were): the subject is graded with every change up to it. A mark
    /// given since by a later change stays, and so does its subject's
    /// need for grading.
    async fn set_grades(
        &self,
        updates: Vec<GradeUpdate>,
        marks: Vec<GradeMark>,
    ) -> Result<Vec<GradeChanged>, StoreError>;

    /// The grade marks of those of `subjects` that have one. Every write
    /// to a subject's records (stored, ended, corrected, imported) gives
    /// the subject a new mark, a number never given before, in the same
    /// transaction: a change is durable together with the note that its
    /// subject needs grading.
    async fn grade_marks(&self, subjects: Vec<String>) -> Result<Vec<GradeMark>, StoreError>;

    /// Subjects with a grade mark after `after` in key order, at most
    /// `limit`: the changes a restart, a crash or a full grading backlog
    /// left ungraded (and those the grader is about to assess).
    async fn ungraded_after(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Up to `limit` subjects whose grade is due to be assessed again on
    /// or before `today`.
    async fn grades_due(&self, today: Date, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Up to `limit` subject keys of stored records after `after`, in
    /// order (to assess every subject again).
    async fn subjects_after(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Assessed subjects per grade and region.
    async fn grade_counts(&self) -> Result<Vec<GradeCount>, StoreError>;

    /// Records on the public channel on `q.today` (stamped, in effect,
    /// inside their period), newest decision first.
    async fn public_records(&self, q: PublicQuery) -> Result<Vec<PublicRecord>, StoreError>;

    /// One record on the public channel on `today`.
    async fn public_record(
        &self,
        public_id: &str,
        today: Date,
    ) -> Result<Option<PublicRecord>, StoreError>;

    /// Whether the store can take writes now.
    async fn ready(&self) -> bool;

    /// Flushes and stops the writer; later writes fail with `Unavailable`.
    async fn close(&self);
}

/// Opens the configured backend: the SQLite file, or the PostgreSQL
/// database (migrated at start-up). Errors are start-up messages.
pub async fn open(
    config: &crate::config::Config,
    audit_key: Vec<u8>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> Result<std::sync::Arc<dyn Store>, String> {
    match config.store.backend {
        crate::config::StoreBackend::Sqlite => {
            let path = config.database_path();
            sqlite::SqliteStore::open(
                &path,
                &sqlite::SqliteOptions::from_config(&config.store),
                audit_key,
                metrics,
            )
            .map(|s| std::sync::Arc::new(s) as std::sync::Arc<dyn Store>)
            .map_err(|e| format!("store: {}: {e}", path.display()))
        }
        crate::config::StoreBackend::Postgres => {
            let opts = postgres::PgOptions::from_config(config)?;
            postgres::PgStore::open(opts, audit_key, metrics)
                .await
                .map(|s| std::sync::Arc::new(s) as std::sync::Arc<dyn Store>)
                .map_err(|e| format!("store (postgres): {e}"))
        }
    }
}

/// Runs an offline command against a PostgreSQL database.
fn offline_pg<T>(
    config: &crate::config::Config,
    f: impl AsyncFnOnce(postgres::PgOptions) -> Result<T, String>,
) -> Result<T, String> {
    let opts = postgres::PgOptions::from_config(config)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(f(opts))
}

/// Verifies the audit chain of the configured database offline.
pub fn verify_audit_of(
    config: &crate::config::Config,
    key: &[u8],
) -> Result<crate::audit::Report, String> {
    match config.store.backend {
        crate::config::StoreBackend::Sqlite => verify_audit(&config.database_path(), key),
        crate::config::StoreBackend::Postgres => offline_pg(config, async |opts| {
            postgres::verify_audit(&opts, key).await
        }),
    }
}

/// The active catalog item definitions of the configured database.
pub fn active_items_of(config: &crate::config::Config) -> Result<Vec<Value>, String> {
    match config.store.backend {
        crate::config::StoreBackend::Sqlite => active_items(&config.database_path()),
        crate::config::StoreBackend::Postgres => {
            offline_pg(config, async |opts| postgres::active_items(&opts).await)
        }
    }
}

pub(crate) fn parse_kind(s: &str) -> Result<NoticeKind, StoreError> {
    NoticeKind::parse(s).ok_or_else(|| StoreError::Corrupt(format!("notice type {s:?}")))
}
