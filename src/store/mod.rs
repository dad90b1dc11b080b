//! Durable storage behind a use-case-level interface.
//!
//! Handlers and use cases speak in submissions and records, never SQL. The
//! embedded default is SQLite (`sqlite.rs`); a PostgreSQL implementation of
//! the same trait will serve several gateway instances. An implementation
//! must only report success once the data is durable (fsync'd): the HTTP
//! layer acknowledges on that basis.

pub mod sqlite;

use serde_json::Value;
use time::{Date, OffsetDateTime};

use crate::catalog::Finding;

/// An accepted record ready to be stored.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Gateway-assigned id (UUIDv7, time-ordered).
    pub id: String,
    /// Subject type as submitted.
    pub subject_type: String,
    /// USCC, or a keyed pseudonym of a personal ID number; never an ID in clear.
    pub subject_key: Option<String>,
    /// Decision (or listing) date.
    pub decision_date: Option<Date>,
    /// The record as submitted (validated).
    pub body: Value,
    /// Warnings reported to the submitter.
    pub warnings: Vec<Finding>,
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
    /// HTTP status and body sent for this submission.
    pub response_status: u16,
    /// Response body (JSON).
    pub response_body: Vec<u8>,
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
    /// USCC or pseudonym.
    pub subject_key: Option<String>,
    /// Decision date.
    pub decision_date: Option<Date>,
    /// Receive time.
    pub received_at: OffsetDateTime,
    /// The record.
    pub body: Value,
    /// Warnings given at submission.
    pub warnings: Vec<Finding>,
    /// `active` until revoked or expired.
    pub status: String,
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
}

/// The use cases storage serves.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a submission's accepted records and its idempotency entry in
    /// one durable transaction, or returns the earlier response when the
    /// key was already used.
    async fn append_submission(
        &self,
        submission: NewSubmission,
    ) -> Result<AppendOutcome, StoreError>;

    /// The response remembered for `(participant, key)`, if any.
    async fn idempotent_response(
        &self,
        participant: &str,
        key: &str,
    ) -> Result<Option<StoredResponse>, StoreError>;

    /// One record by id.
    async fn record(&self, id: &str) -> Result<Option<StoredRecord>, StoreError>;

    /// Whether the store can take writes now.
    async fn ready(&self) -> bool;

    /// Flushes and stops the writer; later writes fail with `Unavailable`.
    async fn close(&self);
}
