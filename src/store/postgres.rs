//! PostgreSQL store: any number of gateway instances on one database.
//!
//! Writes go through one writer task per instance that commits whatever
//! is queued in one transaction (group commit, as on SQLite), with every
//! statement of the group pipelined on one connection. Correctness does
//! not rest on there being one writer:
//!
//! - **Stream positions** of pull deliveries are taken at the end of the
//!   group's transaction under a row lock on each agency's counter
//!   (`agency_streams`, locked in agency order), so an agency's stream is
//!   gap-free and numbered in commit order across instances.
//! - **The audit chain** is appended under a lock on its head row
//!   (`audit_head`), taken last; checkpoints are written by whichever
//!   instance holds an advisory lock.
//! - **Decisions about a subject** (a record refused while its subject is
//!   listed, a warning completed by the subject's earlier record) are made
//!   in the writer's transaction, under a transaction-scoped advisory
//!   lock per subject, so each sees every submission about the subject
//!   committed before it, from any writer of any instance.
//! - **Idempotency** is `INSERT … ON CONFLICT DO NOTHING`: a concurrent
//!   duplicate waits for the first to commit and gets its stored answer.
//! - **Push claims** are single statements with `FOR UPDATE SKIP LOCKED`
//!   and a lease; nothing is reset at start-up, so a restarting instance
//!   never takes another's leases; expired leases are claimed again.
//! - **Changes** are announced with `NOTIFY` in the committing
//!   transaction; every instance `LISTEN`s and wakes its long-polls, its
//!   push dispatcher and its control plane.
//!
//! Times are native (`timestamptz`, `date`) or integers, never text.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use futures_util::future::join_all;
use serde_json::Value;
use time::{Date, OffsetDateTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{NoTls, Row};

use super::shared::{
    self, activation_audit, audit_entries, outcome_audit, rfc3339, submission_audit, AuditItem,
};
use super::SubjectRecord;
use super::{
    parse_kind, ActivateOutcome, AgencyFeedbackStats, AppendOutcome, AuditFilter, ControlState,
    CorrectOutcome, Correction, Decide, Decided, DeliveryInfo, DeliveryResult, DeliveryState,
    DepartmentStats, DocKind, EndOutcome, Ending, EndpointHealth, Feedback, FeedbackOutcome,
    FeedbackStored, Finished, GradeChanged, GradeCount, GradeMark, GradeUpdate, ItemActivation,
    KeyHolder, NewNotice, NewReview, NewSubmission, NoticeHistory, Outbound, PublicQuery,
    PublicRecord, ReviewEntry, Revision, Store, StoreError, StoredNotice, StoredRecord,
    StoredResponse, StoredReview, SubmissionLookups, VersionInfo,
};
use crate::catalog::Severity;
use crate::redact::RecordBody;

/// Channel of delivery changes (new deliveries, retries).
const CHANGES: &str = "credgate_changes";
/// Channel of control-plane changes (catalog, participants, subscriptions).
const CONTROL: &str = "credgate_control";
/// Advisory lock keys: migrations, audit checkpoints, periodic jobs.
const LOCK_MIGRATE: i64 = 0x6372_6564_0001;
const LOCK_CHECKPOINT: i64 = 0x6372_6564_0002;

/// Schema migrations, applied in order at start-up under an advisory lock
/// (instances starting together migrate once). Never edit a shipped entry.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE submissions (
        id              TEXT PRIMARY KEY,
        participant     TEXT NOT NULL,
        item            TEXT NOT NULL,
        item_version    INTEGER NOT NULL,
        received_at     TIMESTAMPTZ NOT NULL,
        accepted        INTEGER NOT NULL,
        rejected        INTEGER NOT NULL,
        rejection_codes TEXT NOT NULL
    );
    CREATE INDEX submissions_received ON submissions(received_at);
    CREATE TABLE records (
        id              TEXT PRIMARY KEY,
        submission_id   TEXT NOT NULL REFERENCES submissions(id),
        item            TEXT NOT NULL,
        item_version    INTEGER NOT NULL,
        submitter       TEXT NOT NULL,
        subject_type    TEXT NOT NULL,
        subject_key     TEXT,
        decision_date   DATE,
        received_at     TIMESTAMPTZ NOT NULL,
        body            TEXT NOT NULL,
        warnings        TEXT NOT NULL,
        status          TEXT NOT NULL DEFAULT 'active',
        effective_until DATE,
        end_reason      TEXT,
        end_note        TEXT
    );
    CREATE INDEX records_received ON records(received_at);
    CREATE INDEX records_expiry ON records(effective_until) WHERE status = 'active' AND effective_until IS NOT NULL;
    CREATE TABLE idempotency (
        participant     TEXT NOT NULL,
        key             TEXT NOT NULL,
        request_hash    TEXT NOT NULL,
        status          INTEGER NOT NULL,
        response        BYTEA NOT NULL,
        created_at      BIGINT NOT NULL,
        PRIMARY KEY (participant, key)
    );
    CREATE INDEX idempotency_created ON idempotency(created_at);
    CREATE TABLE notices (
        id              TEXT PRIMARY KEY,
        kind            TEXT NOT NULL,
        item            TEXT NOT NULL,
        item_version    INTEGER NOT NULL,
        record_id       TEXT NOT NULL REFERENCES records(id),
        source          TEXT NOT NULL,
        severity        TEXT NOT NULL,
        region          TEXT,
        measures        TEXT NOT NULL,
        effective_from  DATE,
        effective_until DATE,
        issued_at       TIMESTAMPTZ NOT NULL,
        lifts           TEXT,
        reason          TEXT
    );
    CREATE INDEX notices_record ON notices(record_id);
    CREATE INDEX notices_issued ON notices(issued_at);
    CREATE TABLE deliveries (
        seq             BIGSERIAL PRIMARY KEY,
        id              TEXT NOT NULL UNIQUE,
        notice_id       TEXT NOT NULL REFERENCES notices(id),
        subscription    TEXT NOT NULL,
        agency          TEXT NOT NULL,
        mode            TEXT NOT NULL,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at BIGINT NOT NULL DEFAULT 0,
        lease_until     BIGINT NOT NULL DEFAULT 0,
        last_error      TEXT,
        created_at      TIMESTAMPTZ NOT NULL,
        delivered_at    TIMESTAMPTZ,
        claims          BIGINT NOT NULL DEFAULT 0,
        pos             BIGINT
    );
    CREATE UNIQUE INDEX deliveries_pull ON deliveries(agency, pos) WHERE mode = 'pull';
    CREATE INDEX deliveries_due ON deliveries(subscription, next_attempt_at) WHERE mode = 'push' AND state IN ('pending', 'inflight');
    CREATE INDEX deliveries_notice ON deliveries(notice_id, agency);
    CREATE INDEX deliveries_state ON deliveries(state, seq);
    CREATE TABLE agency_streams (
        agency          TEXT PRIMARY KEY,
        last_pos        BIGINT NOT NULL
    );
    CREATE TABLE pull_positions (
        agency          TEXT PRIMARY KEY,
        position        BIGINT NOT NULL,
        updated_at      TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE feedback (
        notice_id       TEXT NOT NULL REFERENCES notices(id),
        agency          TEXT NOT NULL,
        measure         TEXT NOT NULL,
        outcome         TEXT NOT NULL,
        date            DATE,
        note            TEXT,
        received_at     TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (notice_id, agency, measure)
    );
    CREATE TABLE catalog_versions (
        item            TEXT NOT NULL,
        version         INTEGER NOT NULL,
        definition      TEXT NOT NULL,
        created_at      TIMESTAMPTZ NOT NULL,
        created_by      TEXT NOT NULL,
        reason          TEXT,
        breaking        BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (item, version)
    );
    CREATE TABLE catalog_active (
        item            TEXT PRIMARY KEY,
        version         INTEGER NOT NULL
    );
    CREATE TABLE registry (
        ord             BIGSERIAL,
        kind            TEXT NOT NULL,
        id              TEXT NOT NULL,
        body            TEXT NOT NULL,
        updated_at      TIMESTAMPTZ NOT NULL,
        updated_by      TEXT NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE TABLE audit (
        seq             BIGINT PRIMARY KEY,
        at              TEXT NOT NULL,
        actor           TEXT NOT NULL,
        action          TEXT NOT NULL,
        subject         TEXT NOT NULL,
        details         TEXT NOT NULL,
        prev_hash       TEXT NOT NULL,
        hash            TEXT NOT NULL
    );
    CREATE TABLE audit_head (
        id              INTEGER PRIMARY KEY CHECK (id = 1),
        seq             BIGINT NOT NULL,
        hash            TEXT NOT NULL
    );
    INSERT INTO audit_head VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
    CREATE TABLE audit_checkpoints (
        seq             BIGINT PRIMARY KEY,
        head_hash       TEXT NOT NULL,
        at              TEXT NOT NULL,
        mac             TEXT NOT NULL
    );
    CREATE TABLE endpoint_health (
        subscription    TEXT PRIMARY KEY,
        failures        INTEGER NOT NULL,
        paused_until    BIGINT NOT NULL
    );
"#,
    // 2: the record's life: natural keys (records stored before have none
    // and are not matched), revisions, removal documents.
    r#"
    ALTER TABLE records ADD COLUMN natural_key TEXT;
    ALTER TABLE records ADD COLUMN content_hash TEXT;
    ALTER TABLE records ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE records ADD COLUMN removal TEXT;
    CREATE UNIQUE INDEX records_natural_key ON records(item, natural_key);
    ALTER TABLE notices ADD COLUMN corrects TEXT;
    ALTER TABLE records ADD COLUMN level TEXT;
    ALTER TABLE submissions ADD COLUMN historical BOOLEAN NOT NULL DEFAULT false;
    ALTER TABLE notices ADD COLUMN historical BOOLEAN NOT NULL DEFAULT false;
    CREATE INDEX records_subject ON records(subject_key, item) WHERE subject_key IS NOT NULL;
    CREATE TABLE record_revisions (
        record_id       TEXT NOT NULL REFERENCES records(id),
        revision        INTEGER NOT NULL,
        item_version    INTEGER NOT NULL,
        body            TEXT NOT NULL,
        warnings        TEXT NOT NULL,
        replaced_at     TIMESTAMPTZ NOT NULL,
        replaced_by     TEXT NOT NULL,
        reason          TEXT,
        PRIMARY KEY (record_id, revision)
    );
"#,
    // 3: issued credit review reports, findable by subject (who looked a
    // subject up).
    r#"
    CREATE TABLE credit_reviews (
        id              TEXT PRIMARY KEY,
        agency          TEXT NOT NULL,
        subject_key     TEXT NOT NULL,
        purpose         TEXT NOT NULL,
        issued_at       TIMESTAMPTZ NOT NULL,
        document        BYTEA NOT NULL
    );
    CREATE INDEX credit_reviews_subject ON credit_reviews(subject_key, issued_at);
"#,
    // 4: credit grades: rule set versions, each subject's grade, and what
    // a grade_change notice says.
    r#"
    CREATE TABLE grade_rules (
        version         INTEGER PRIMARY KEY,
        document        TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        created_by      TEXT NOT NULL,
        reason          TEXT
    );
    CREATE TABLE subject_grades (
        subject_key     TEXT PRIMARY KEY,
        grade           TEXT NOT NULL,
        rule            TEXT NOT NULL,
        rules_version   INTEGER NOT NULL,
        region          TEXT,
        review_after    DATE,
        assessed_at     TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX subject_grades_due ON subject_grades(review_after) WHERE review_after IS NOT NULL;
    ALTER TABLE notices ADD COLUMN grade TEXT;
"#,
    // 5: the public channel: each published record's public id and
    // publicity period, stamped at acceptance.
    r#"
    ALTER TABLE records ADD COLUMN public_id TEXT;
    ALTER TABLE records ADD COLUMN publicity_rule TEXT;
    ALTER TABLE records ADD COLUMN publicity_start DATE;
    ALTER TABLE records ADD COLUMN publicity_end DATE;
    CREATE UNIQUE INDEX records_public_id ON records(public_id) WHERE public_id IS NOT NULL;
    CREATE INDEX records_publicity ON records(publicity_end, decision_date) WHERE public_id IS NOT NULL;
"#,
    // 6: grade marks (see the SQLite store's migration 12), from a
    // sequence: given by the statement that stores a group's records
    // (`insert_submissions`), and by a statement-level trigger on updates
    // of `records` (ends, corrections), in key order.
    r#"
    CREATE TABLE grade_marks (
        subject_key TEXT PRIMARY KEY,
        mark        BIGINT NOT NULL
    );
    CREATE SEQUENCE grade_mark_seq;
    CREATE FUNCTION grade_marks_give() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO grade_marks AS g (subject_key, mark)
            SELECT k, nextval('grade_mark_seq') FROM
                (SELECT subject_key FROM new_rows UNION SELECT subject_key FROM old_rows) AS t(k)
            WHERE k IS NOT NULL ORDER BY 1
            ON CONFLICT (subject_key) DO UPDATE SET mark = EXCLUDED.mark;
        RETURN NULL;
    END $$;
    CREATE TRIGGER records_grade_marks_update AFTER UPDATE ON records
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION grade_marks_give();
"#,
];

fn db_err(e: tokio_postgres::Error) -> StoreError {
    // The server's message and code, never its DETAIL (which can quote a
    // row's values).
    match e.as_db_error() {
        Some(db) if db.constraint() == Some("records_natural_key") => StoreError::KeyTaken,
        Some(db) => StoreError::Database(format!("{} ({})", db.message(), db.code().code())),
        None => StoreError::Database(e.to_string()),
    }
}

/// Why a connection could not be made, naming the server, database and
/// user (never the password) and the cause (refused, unknown database,
/// authentication…).
pub(crate) fn connect_err(cfg: &tokio_postgres::Config, e: &tokio_postgres::Error) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .zip(cfg.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, port)| match h {
            tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let cause = match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => {
            use std::error::Error as _;
            e.source().map_or_else(|| e.to_string(), |s| s.to_string())
        }
    };
    format!(
        "cannot connect to PostgreSQL at {} (database {}, user {}): {cause}",
        hosts.join(","),
        cfg.get_dbname().unwrap_or("?"),
        cfg.get_user().unwrap_or("?"),
    )
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_err(e),
        other => StoreError::Database(other.to_string()),
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn uint(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

/// Most subjects whose grades one write stores ([`Store::set_grades`]):
/// the grader's batch. Two statements whatever the number; writes of 20
/// subjects, at several round trips each, were the most that did not hold
/// submissions back (#14).
const GRADES_PER_WRITE: usize = 200;

/// The columns [`stored_record`] decodes, in its order.
const RECORD_COLUMNS: &str = "id, item, item_version, submitter, subject_type, decision_date, effective_until, received_at, body, warnings, status, end_reason, removal, revision";

/// A record holding a natural key: `natural_key, id, content_hash,
/// submitter`.
fn key_holder(r: &Row) -> KeyHolder {
    KeyHolder {
        natural_key: r.get(0),
        record_id: r.get(1),
        content_hash: r.get::<_, Option<String>>(2).unwrap_or_default(),
        submitter: r.get(3),
    }
}

/// The records of some subjects (`$1`) of some items (`$2`), as
/// [`subject_record`] reads them.
///
/// Records are read one subject at a time: a lateral subquery per key
/// (`OFFSET 0` keeps the planner from flattening it), so each is an index
/// look-up on `records_subject` whatever the planner's statistics say.
/// With `subject_key = ANY($1) AND item = ANY($2)`, a table whose
/// statistics are missing or stale (a new database, a server with
/// autovacuum off) was read through the `item` index instead, and the
/// cost grew with the table: 10 ms per grader batch of 100 subjects at
/// 20,000 records, a quarter of the database's time under `ingest`.
const SUBJECT_RECORDS: &str =
    "SELECT r.* FROM (SELECT DISTINCT unnest($1::text[]) AS key) AS s CROSS JOIN LATERAL \
     (SELECT id, subject_key, item, status, level, decision_date FROM records \
      WHERE subject_key = s.key AND item = ANY($2) OFFSET 0) AS r";

fn subject_record(r: &Row) -> Result<SubjectRecord, StoreError> {
    Ok(SubjectRecord {
        record_id: r.get(0),
        subject_key: r.get(1),
        item: r.get(2),
        status: r.get(3),
        level: r.get::<_, Option<&str>>(4).and_then(Severity::parse),
        decision_date: r.get(5),
    })
}

/// A row that starts with [`RECORD_COLUMNS`].
fn stored_record(r: &Row) -> Result<StoredRecord, StoreError> {
    Ok(StoredRecord {
        id: r.get(0),
        item: r.get(1),
        item_version: uint(r.get(2)),
        submitter: r.get(3),
        subject_type: r.get(4),
        decision_date: r.get(5),
        effective_until: r.get(6),
        received_at: r.get(7),
        body: RecordBody::from_store(serde_json::from_str(r.get::<_, &str>(8)).map_err(corrupt)?),
        warnings: serde_json::from_str(r.get::<_, &str>(9)).map_err(corrupt)?,
        status: r.get(10),
        end_reason: r.get(11),
        removal: r
            .get::<_, Option<&str>>(12)
            .map(serde_json::from_str)
            .transpose()
            .map_err(corrupt)?,
        revision: uint(r.get(13)),
    })
}

/// One write, applied inside the writer's group transaction.
enum Op {
    Append(Box<NewSubmission>),
    /// A submission to look up, decide and store in the write
    /// ([`Store::decide_and_append`]).
    Decide {
        lookups: SubmissionLookups,
        decide: Decide,
    },
    End {
        record_id: String,
        ending: Ending,
        actor: String,
    },
    Correct {
        correction: Box<Correction>,
        actor: String,
    },
    Ack {
        agency: String,
        position: i64,
    },
    Finish(Vec<Finished>),
    Retry {
        delivery_id: String,
        actor: String,
    },
    Feedback(Feedback),
    Review(Box<NewReview>),
    GradeRules {
        document: String,
        actor: String,
        reason: Option<String>,
    },
    /// Grades, and the marks they were assessed at.
    Grades(Vec<GradeUpdate>, Vec<GradeMark>),
    Seed {
        items: Vec<Value>,
        participants: Vec<(String, Value)>,
        subscriptions: Vec<(String, Value)>,
    },
    Activate(Box<ItemActivation>),
    Put {
        kind: DocKind,
        body: Value,
        entry: AuditItem,
    },
}

/// What a write answers.
enum Out {
    Append(AppendOutcome),
    Decided(Decided),
    End(EndOutcome),
    Correct(CorrectOutcome),
    Unit(()),
    Bool(bool),
    Feedback(FeedbackStored),
    Control(ControlState),
    Activate(ActivateOutcome),
    Version(u32),
    Grades(Vec<GradeChanged>),
}

/// What a write leaves for the end of the transaction.
#[derive(Default)]
struct Effects {
    audit: Vec<AuditItem>,
    /// Pull deliveries created, per agency, in creation order: they get
    /// their stream positions at the end, under the agencies' locks.
    pulls: BTreeMap<String, Vec<String>>,
    /// New work for push dispatchers and long-polls.
    wake: bool,
    /// The control plane changed.
    control: bool,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.audit.extend(other.audit);
        for (agency, ids) in other.pulls {
            self.pulls.entry(agency).or_default().extend(ids);
        }
        self.wake |= other.wake;
        self.control |= other.control;
    }
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Out, StoreError>>,
}

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    writer_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    idempotency_ttl: Duration,
    changes: watch::Receiver<u64>,
    control: watch::Receiver<u64>,
    audit_key: Vec<u8>,
    listener: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Connection settings of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgres://` URL.
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Statement timeout.
    pub statement_timeout: Duration,
    /// Most writes committed in one transaction.
    pub group_commit_max: usize,
    /// How long idempotency keys are kept.
    pub idempotency_ttl: Duration,
}

impl PgOptions {
    /// The options of `config.store` (`url` is required).
    pub fn from_config(config: &crate::config::Config) -> Result<PgOptions, String> {
        let store = &config.store;
        Ok(PgOptions {
            url: store
                .url
                .clone()
                .ok_or("store.url: required with store.backend = \"postgres\"")?,
            pool_size: store.pool_size,
            statement_timeout: Duration::from_millis(store.statement_timeout_ms),
            group_commit_max: store.group_commit_max,
            idempotency_ttl: Duration::from_secs(store.idempotency_ttl_hours * 3600),
        })
    }
}

fn pg_config(opts: &PgOptions) -> Result<tokio_postgres::Config, StoreError> {
    let mut cfg: tokio_postgres::Config = opts
        .url
        .parse()
        .map_err(|e| StoreError::Database(format!("store.url: {e}")))?;
    cfg.application_name("credgate");
    cfg.connect_timeout(Duration::from_secs(5));
    // plan_cache_mode: every statement is prepared once per connection,
    // and PostgreSQL's generic plan for it is made from the statistics of
    // the moment, so a plan first made on a new, empty table (a sequential
    // scan) outlived the table's growth until autovacuum's next ANALYZE:
    // the natural-key look-up read thousands of rows a call. Plans made
    // for each call's values use the index from the first row on (ingest
    // on a fresh database: 1,050 -> 3,700-3,960 requests/s).
    cfg.options(format!(
        "-c statement_timeout={} -c lock_timeout={} -c plan_cache_mode=force_custom_plan",
        opts.statement_timeout.as_millis(),
        opts.statement_timeout.as_millis()
    ));
    Ok(cfg)
}

/// Connects, checks the server and migrates the schema.
async fn connect_and_migrate(cfg: &tokio_postgres::Config) -> Result<(), StoreError> {
    let (mut client, conn) = cfg
        .connect(NoTls)
        .await
        .map_err(|e| StoreError::Database(connect_err(cfg, &e)))?;
    let conn = tokio::spawn(conn);
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(db_err)?
        .get(0);
    if version < 150_000 {
        return Err(StoreError::Database(format!(
            "PostgreSQL {} is too old: credgate needs 15 or later",
            version / 10_000
        )));
    }
    let tx = client.transaction().await.map_err(db_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_MIGRATE])
        .await
        .map_err(db_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)",
    )
    .await
    .map_err(db_err)?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(db_err)?
        .get(0);
    if current as usize > MIGRATIONS.len() {
        return Err(StoreError::Database(format!(
            "database schema version {current} is newer than this credgate ({}); refusing to start",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await.map_err(db_err)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())",
            &[&(i as i32 + 1)],
        )
        .await
        .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)?;
    drop(client);
    let _ = conn.await;
    Ok(())
}

impl PgStore {
    /// Connects, migrates, and starts the writer and the listener.
    pub async fn open(
        opts: PgOptions,
        audit_key: Vec<u8>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<PgStore, StoreError> {
        let cfg = pg_config(&opts)?;
        connect_and_migrate(&cfg).await?;
        let manager = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(2))
            .wait_timeout(Some(opts.statement_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Database(e.to_string()))?;
        let (changes_tx, changes) = watch::channel(0u64);
        let (control_tx, control) = watch::channel(0u64);
        let listener = tokio::spawn(listen(cfg, changes_tx, control_tx));
        let (tx, rx) = mpsc::channel(opts.group_commit_max.max(1) * 4);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let writers = (0..WRITERS)
            .map(|_| {
                tokio::spawn(writer_loop(
                    pool.clone(),
                    rx.clone(),
                    opts.group_commit_max.max(1),
                    metrics.clone(),
                ))
            })
            .collect();
        Ok(PgStore {
            pool,
            writer: Mutex::new(Some(tx)),
            writer_tasks: Mutex::new(writers),
            idempotency_ttl: opts.idempotency_ttl,
            changes,
            control,
            audit_key,
            listener,
        })
    }

    async fn write(&self, op: Op) -> Result<Out, StoreError> {
        let (reply, answer) = oneshot::channel();
        let sender = self
            .writer
            .lock()
            .map_err(|_| StoreError::Unavailable)?
            .clone()
            .ok_or(StoreError::Unavailable)?;
        sender
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::Unavailable)?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(db_err)?;
        client.query(&stmt, params).await.map_err(db_err)
    }
}

/// Keeps a connection that `LISTEN`s to both channels, reconnecting when
/// it drops; every notification (and every reconnect, which may have
/// missed some) bumps the receivers.
async fn listen(
    cfg: tokio_postgres::Config,
    changes: watch::Sender<u64>,
    control: watch::Sender<u64>,
) {
    use futures_util::StreamExt;
    let bump = |w: &watch::Sender<u64>| w.send_modify(|v| *v = v.wrapping_add(1));
    loop {
        match cfg.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                let sql = format!("LISTEN {CHANGES}; LISTEN {CONTROL}");
                let listening = client.batch_execute(&sql);
                // The LISTEN completes only while the connection is polled.
                let mut listening = std::pin::pin!(listening);
                let ready = loop {
                    tokio::select! {
                        r = &mut listening => break r.is_ok(),
                        m = messages.next() => if m.is_none() { break false },
                    }
                };
                if ready {
                    bump(&changes);
                    bump(&control);
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                if n.channel() == CONTROL {
                                    bump(&control);
                                } else {
                                    bump(&changes);
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "PostgreSQL notification connection lost");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %connect_err(&cfg, &e), "no notification connection; retrying")
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A query through the connection's statement cache: parsed and planned
/// once per connection, not once per call.
async fn run(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let stmt = tx.prepare_cached(sql).await.map_err(db_err)?;
    tx.query(&stmt, params).await.map_err(db_err)
}

/// [`run`] for a statement whose row count is the answer.
async fn exec(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, StoreError> {
    let stmt = tx.prepare_cached(sql).await.map_err(db_err)?;
    tx.execute(&stmt, params).await.map_err(db_err)
}

/// [`run`] for exactly one row.
async fn run_one(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Row, StoreError> {
    run_opt(tx, sql, params)
        .await?
        .ok_or_else(|| StoreError::Database("a query that returns one row returned none".into()))
}

/// [`run`] for at most one row.
async fn run_opt(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Row>, StoreError> {
    let stmt = tx.prepare_cached(sql).await.map_err(db_err)?;
    tx.query_opt(&stmt, params).await.map_err(db_err)
}

/// Writer tasks per instance: while one group waits for its commit, the
/// next runs its statements (the audit head lock, taken last, keeps the
/// chain in order).
const WRITERS: usize = 2;

async fn writer_loop(
    pool: Pool,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    group_max: usize,
    metrics: Arc<crate::metrics::Metrics>,
) {
    loop {
        let group = {
            let mut rx = rx.lock().await;
            let Some(job) = rx.recv().await else {
                return;
            };
            let mut group = vec![job];
            while group.len() < group_max {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            group
        };
        metrics.store_commits.inc();
        metrics.store_group_size.observe(group.len() as f64);
        commit_group(&pool, group).await;
    }
}

/// Commits one group: all writes pipelined in one transaction; if one
/// fails, the others run again one savepoint each, so a failing write
/// costs only its own caller.
async fn commit_group(pool: &Pool, group: Vec<Job>) {
    let mut client = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            let e = pool_err(e);
            tracing::error!(error = %e, "no database connection for a write group");
            for job in group {
                let _ = job.reply.send(Err(StoreError::Database(e.to_string())));
            }
            return;
        }
    };
    let (ops, replies): (Vec<Op>, Vec<_>) = group.into_iter().map(|j| (j.op, j.reply)).unzip();
    let fast = async {
        let tx = client.transaction().await.map_err(db_err)?;
        // Submissions together, a few multi-row statements for the whole
        // group; the other writes each on their own, all pipelined.
        let (subs, others): (Vec<&Op>, Vec<&Op>) = ops.iter().partition(|op| op.is_submission());
        // The subject locks are the group's first statement; a failure
        // there (a deadlock broken by the server) sends the group to the
        // isolated path like any other.
        let touched: Vec<_> = subs.iter().map(|op| op.touches()).collect();
        let subjects: Vec<&str> = touched
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .collect();
        let (appended, others) = futures_util::future::join(
            async {
                lock_subjects(&tx, &subjects).await?;
                store_submissions(&tx, &subs, &touched).await
            },
            join_all(others.into_iter().map(|op| apply(&tx, op))),
        )
        .await;
        let appended = match appended {
            Ok(a) if others.iter().all(Result::is_ok) => a,
            appended => {
                // Failed only on taken natural keys: see `log_group_retry`.
                let key_race = appended
                    .as_ref()
                    .err()
                    .into_iter()
                    .chain(others.iter().filter_map(|r| r.as_ref().err()))
                    .all(|e| matches!(e, StoreError::KeyTaken));
                let _ = tx.rollback().await;
                return Ok(Err(key_race));
            }
        };
        let (mut appended, mut others) = (appended.into_iter(), others.into_iter().flatten());
        let mut fx = Effects::default();
        let mut outs = Vec::with_capacity(ops.len());
        for op in &ops {
            let next = if op.is_submission() {
                appended.next()
            } else {
                others.next()
            };
            let (out, effects) = next.ok_or_else(|| corrupt("an outcome is missing"))?;
            fx.merge(effects);
            outs.push(Ok(out));
        }
        finish_transaction(&tx, fx).await?;
        tx.commit().await.map_err(db_err)?;
        Ok::<_, StoreError>(Ok(outs))
    }
    .await;
    let outs = match fast {
        Ok(Ok(outs)) => outs,
        Ok(Err(key_race)) => {
            shared::log_group_retry(ops.len(), key_race);
            match isolated(&mut client, &ops).await {
                Ok(outs) => outs,
                Err(e) => ops
                    .iter()
                    .map(|_| Err(StoreError::Database(e.to_string())))
                    .collect(),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "group commit failed; nothing in the group was acknowledged");
            ops.iter()
                .map(|_| Err(StoreError::Database(e.to_string())))
                .collect()
        }
    };
    for (reply, out) in replies.into_iter().zip(outs) {
        let _ = reply.send(out);
    }
}

async fn isolated(
    client: &mut deadpool_postgres::Object,
    ops: &[Op],
) -> Result<Vec<Result<Out, StoreError>>, StoreError> {
    let mut tx = client.transaction().await.map_err(db_err)?;
    // Every subject at once, in order, as in the fast path: taken one
    // write at a time, two groups could wait for each other.
    let subjects: Vec<&str> = ops.iter().flat_map(|op| op.touches().1).collect();
    lock_subjects(&tx, &subjects).await?;
    let mut fx = Effects::default();
    let mut outs = Vec::with_capacity(ops.len());
    for op in ops {
        let sp = tx.savepoint("job").await.map_err(db_err)?;
        match apply(&sp, op).await {
            Ok((out, effects)) => {
                sp.commit().await.map_err(db_err)?;
                fx.merge(effects);
                outs.push(Ok(out));
            }
            Err(e) => {
                sp.rollback().await.map_err(db_err)?;
                outs.push(Err(e));
            }
        }
    }
    finish_transaction(&tx, fx).await?;
    tx.commit().await.map_err(db_err)?;
    Ok(outs)
}

/// The end of every write transaction: stream positions (agencies in
/// order), the audit entries (head row last), the notifications.
async fn finish_transaction(tx: &Transaction<'_>, fx: Effects) -> Result<(), StoreError> {
    if !fx.pulls.is_empty() {
        // One statement takes every agency's block of positions, locking
        // the counters in agency order (the same order in every
        // transaction, so two never wait for each other in a cycle)…
        let agencies: Vec<&str> = fx.pulls.keys().map(String::as_str).collect();
        let counts: Vec<i64> = fx.pulls.values().map(|ids| ids.len() as i64).collect();
        let ends: std::collections::HashMap<String, i64> = run(tx, "INSERT INTO agency_streams (agency, last_pos) \
                 SELECT a, n FROM unnest($1::text[], $2::int8[]) AS t(a, n) ORDER BY a \
                 ON CONFLICT (agency) DO UPDATE SET last_pos = agency_streams.last_pos + EXCLUDED.last_pos \
                 RETURNING agency, last_pos",
                &[&agencies, &counts],).await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // …and one numbers the deliveries, in creation order per agency.
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for (agency, list) in &fx.pulls {
            let end = ends
                .get(agency)
                .copied()
                .ok_or_else(|| corrupt("agency stream not taken"))?;
            let first = end - list.len() as i64 + 1;
            for (i, id) in list.iter().enumerate() {
                ids.push(id.as_str());
                positions.push(first + i as i64);
            }
        }
        exec(tx, "UPDATE deliveries d SET pos = t.p FROM unnest($1::text[], $2::int8[]) AS t(id, p) WHERE d.id = t.id",
            &[&ids, &positions],).await?;
    }
    let entries = audit_entries(fx.audit);
    if !entries.is_empty() {
        let head = run_one(
            tx,
            "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
        let (mut seq, mut prev): (i64, String) = (head.get(0), head.get(1));
        let insert = tx
            .prepare_cached("INSERT INTO audit (seq, at, actor, action, subject, details, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .await
            .map_err(db_err)?;
        for (actor, action, subject, details) in entries {
            seq += 1;
            let at = rfc3339(OffsetDateTime::now_utc());
            let details = serde_json::to_string(&details).map_err(corrupt)?;
            let hash =
                crate::audit::entry_hash(&prev, seq, &at, &actor, &action, &subject, &details);
            tx.execute(
                &insert,
                &[&seq, &at, &actor, &action, &subject, &details, &prev, &hash],
            )
            .await
            .map_err(db_err)?;
            prev = hash;
        }
        exec(
            tx,
            "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
            &[&seq, &prev],
        )
        .await?;
    }
    if fx.wake {
        exec(tx, "SELECT pg_notify($1, '')", &[&CHANGES]).await?;
    }
    if fx.control {
        exec(tx, "SELECT pg_notify($1, '')", &[&CONTROL]).await?;
    }
    Ok(())
}

async fn apply(tx: &Transaction<'_>, op: &Op) -> Result<(Out, Effects), StoreError> {
    let mut fx = Effects::default();
    let out = match op {
        Op::Append(_) | Op::Decide { .. } => {
            let (out, effects) = store_submissions(tx, &[op], &[op.touches()])
                .await?
                .pop()
                .ok_or_else(|| corrupt("no outcome"))?;
            fx = effects;
            out
        }
        Op::End {
            record_id,
            ending,
            actor,
        } => Out::End(end_record(tx, record_id, ending, actor, &mut fx).await?),
        Op::Correct { correction, actor } => {
            Out::Correct(correct_record(tx, correction, actor, &mut fx).await?)
        }
        Op::Ack { agency, position } => {
            ack(tx, agency, *position, &mut fx).await?;
            Out::Unit(())
        }
        Op::Finish(finished) => {
            finish(tx, finished, &mut fx).await?;
            Out::Unit(())
        }
        Op::Retry { delivery_id, actor } => {
            let n = exec(tx, "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = 0, lease_until = 0 WHERE id = $1 AND state = 'dead'",
                    &[delivery_id],).await?;
            if n == 1 {
                fx.audit.push(AuditItem::single(
                    actor,
                    "delivery.retry",
                    delivery_id,
                    serde_json::json!({}),
                ));
                fx.wake = true;
            }
            Out::Bool(n == 1)
        }
        Op::Feedback(f) => Out::Feedback(add_feedback(tx, f, &mut fx).await?),
        Op::Review(r) => {
            exec(tx, "INSERT INTO credit_reviews (id, agency, subject_key, purpose, issued_at, document) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&r.id, &r.agency, &r.subject_key, &r.purpose, &r.issued_at, &r.document]).await?;
            fx.audit.push(shared::review_audit(r));
            Out::Unit(())
        }
        Op::GradeRules {
            document,
            actor,
            reason,
        } => {
            // The table lock orders concurrent versions.
            exec(tx, "LOCK TABLE grade_rules IN EXCLUSIVE MODE", &[]).await?;
            let version: i32 = tx
                .query_one("SELECT COALESCE(MAX(version), 0) + 1 FROM grade_rules", &[])
                .await
                .map_err(db_err)?
                .get(0);
            exec(tx, "INSERT INTO grade_rules (version, document, created_at, created_by, reason) VALUES ($1, $2, $3, $4, $5)",
                &[&version, document, &shared::rfc3339(OffsetDateTime::now_utc()), actor, reason]).await?;
            let version = uint(version);
            fx.audit
                .push(shared::grade_rules_audit(actor, version, reason.as_deref()));
            fx.control = true;
            Out::Version(version)
        }
        Op::Grades(updates, marks) => Out::Grades(set_grades(tx, updates, marks, &mut fx).await?),
        Op::Seed {
            items,
            participants,
            subscriptions,
        } => Out::Control(seed(tx, items, participants, subscriptions, &mut fx).await?),
        Op::Activate(a) => Out::Activate(activate(tx, a, &mut fx).await?),
        Op::Put { kind, body, entry } => {
            exec(tx, "INSERT INTO registry (kind, id, body, updated_at, updated_by) VALUES ($1, $2, $3, now(), $4) \
                 ON CONFLICT (kind, id) DO UPDATE SET body = EXCLUDED.body, updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by",
                &[&kind.as_str(), &entry.subject, &serde_json::to_string(body).map_err(corrupt)?, &entry.actor],).await?;
            fx.audit.push(entry.clone());
            fx.control = true;
            Out::Unit(())
        }
    };
    Ok((out, fx))
}

/// The `(item, natural key)` pairs and subjects of a submission.
type Touches<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>);

impl Op {
    /// A submission, stored with the group's others by
    /// [`store_submissions`].
    fn is_submission(&self) -> bool {
        matches!(self, Op::Append(_) | Op::Decide { .. })
    }

    /// The `(item, natural key)` pairs and subjects a submission's
    /// outcome depends on, or its records take.
    fn touches(&self) -> Touches<'_> {
        match self {
            Op::Append(sub) => (
                sub.records
                    .iter()
                    .map(|r| (sub.item.as_str(), r.natural_key.as_str()))
                    .collect(),
                sub.records
                    .iter()
                    .filter_map(|r| r.subject_key.as_deref())
                    .collect(),
            ),
            Op::Decide { lookups, .. } => (
                lookups
                    .keys
                    .iter()
                    .map(|k| (lookups.item.as_str(), k.as_str()))
                    .collect(),
                lookups.subjects.iter().map(String::as_str).collect(),
            ),
            _ => (Vec::new(), Vec::new()),
        }
    }
}

/// Stores a group's submissions, in order: those decided before
/// (`Append`) and those to decide here (`Decide`). A run of submissions
/// that touch no natural key or subject an earlier one of the run touches
/// is a wave: its look-ups are two statements, its submissions are
/// decided, then stored by [`append_many`]. A submission that touches what
/// an earlier one of its wave touches starts the next wave, so its
/// look-ups see that one stored, as they would one commit later. The
/// look-ups run in the group's transaction, so the rows they find cannot
/// change before the commit: the caller has locked the subjects
/// ([`lock_subjects`]), and a natural key another writer takes in between
/// fails this write with `KeyTaken`. `touched` is what each op
/// [touches](Op::touches).
async fn store_submissions(
    tx: &Transaction<'_>,
    ops: &[&Op],
    touched: &[Touches<'_>],
) -> Result<Vec<(Out, Effects)>, StoreError> {
    let mut outs = Vec::with_capacity(ops.len());
    let mut start = 0;
    while start < ops.len() {
        let mut keys: HashSet<(&str, &str)> = HashSet::new();
        let mut subjects: HashSet<&str> = HashSet::new();
        let mut end = start;
        for (k, s) in &touched[start..] {
            if end > start
                && (k.iter().any(|k| keys.contains(k)) || s.iter().any(|s| subjects.contains(s)))
            {
                break;
            }
            keys.extend(k.iter().copied());
            subjects.extend(s.iter().copied());
            end += 1;
        }
        let wave = &ops[start..end];
        let decided = decide_wave(tx, wave).await?;
        let subs: Vec<&NewSubmission> = wave
            .iter()
            .zip(&decided)
            .map(|(op, d)| match (op, d) {
                (_, Some(sub)) => Ok(sub),
                (Op::Append(sub), None) => Ok(sub.as_ref()),
                _ => Err(corrupt("a submission was not decided")),
            })
            .collect::<Result<_, _>>()?;
        let appended = append_many(tx, &subs).await?;
        for ((sub, decided), (out, fx)) in subs.iter().zip(&decided).zip(appended) {
            let out = match (decided, out) {
                (Some(_), Out::Append(outcome)) => Out::Decided(Decided::of(sub, outcome)),
                (_, out) => out,
            };
            outs.push((out, fx));
        }
        start = end;
    }
    Ok(outs)
}

/// Advisory-lock class of subjects, one lock per subject (keyed by the
/// first four bytes of its key's SHA-256): the two-key form, whose keys
/// never meet the one-key locks of migrations, seeding and checkpoints.
const LOCK_SUBJECTS: i32 = 0x6372_6564;

/// Advisory-lock class of all subjects at once (key 0): taken shared
/// before a write's subject locks, or exclusive instead of them.
const LOCK_ALL_SUBJECTS: i32 = 0x6372_6561;

/// The most subjects a write locks one by one; a write about more takes
/// the exclusive lock on all subjects instead. Advisory locks live in the
/// server's shared lock table (`max_locks_per_transaction` ×
/// `max_connections` entries, 6,400 by default), which one group of a
/// few 500-record submissions would fill: this bounds a write
/// transaction to `SUBJECT_LOCKS_MAX + 1` of them.
pub(crate) const SUBJECT_LOCKS_MAX: usize = 256;

/// Locks `subjects` until the transaction ends, in one statement and in
/// one order (the lock on all subjects first, then each subject's, sorted;
/// so two transactions never wait for each other in a cycle): a decision
/// about a subject, on any writer of any instance, then looks up after the
/// commit of the one before it, and sees its records. A write about more
/// than [`SUBJECT_LOCKS_MAX`] subjects takes the lock on all of them
/// exclusively, and waits for (and holds off) every other write about a
/// subject. Taking a lock held already costs nothing.
async fn lock_subjects(tx: &Transaction<'_>, subjects: &[&str]) -> Result<(), StoreError> {
    let mut keys: Vec<i32> = subjects
        .iter()
        .map(|subject| {
            let d = <sha2::Sha256 as sha2::Digest>::digest(subject.as_bytes());
            i32::from_be_bytes([d[0], d[1], d[2], d[3]])
        })
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    keys.sort_unstable();
    keys.dedup();
    if keys.len() > SUBJECT_LOCKS_MAX {
        exec(
            tx,
            "SELECT pg_advisory_xact_lock($1, 0)",
            &[&LOCK_ALL_SUBJECTS],
        )
        .await?;
        return Ok(());
    }
    // An Append runs its parts in order: the shared lock comes first.
    exec(
        tx,
        "SELECT pg_advisory_xact_lock_shared($1, 0) \
         UNION ALL SELECT pg_advisory_xact_lock($2, k) FROM unnest($3::int4[]) AS k",
        &[&LOCK_ALL_SUBJECTS, &LOCK_SUBJECTS, &keys],
    )
    .await?;
    Ok(())
}

/// Looks up what a wave's `Decide` submissions depend on, in two
/// statements for the whole wave, and decides each on its share of the
/// rows (what [`Store::find_keys`] and [`Store::subject_records`] would
/// answer it). `None` for a submission decided before.
async fn decide_wave(
    tx: &Transaction<'_>,
    wave: &[&Op],
) -> Result<Vec<Option<NewSubmission>>, StoreError> {
    let asks: Vec<&SubmissionLookups> = wave
        .iter()
        .filter_map(|op| match op {
            Op::Decide { lookups, .. } => Some(lookups),
            _ => None,
        })
        .collect();
    if asks.is_empty() {
        return Ok(wave.iter().map(|_| None).collect());
    }
    let (key_items, key_names): (Vec<&str>, Vec<&str>) = asks
        .iter()
        .flat_map(|l| l.keys.iter().map(|k| (l.item.as_str(), k.as_str())))
        .unzip();
    let subjects: Vec<&str> = unique(asks.iter().flat_map(|l| l.subjects.iter()));
    let items: Vec<&str> = unique(asks.iter().flat_map(|l| l.items.iter()));
    let holders = async {
        if key_names.is_empty() {
            return Ok(Vec::new());
        }
        run(tx, "SELECT r.natural_key, r.id, r.content_hash, r.submitter, r.item FROM records r \
             JOIN unnest($1::text[], $2::text[]) AS t(i, k) ON r.item = t.i AND r.natural_key = t.k",
            &[&key_items, &key_names]).await
    };
    let others = async {
        if subjects.is_empty() || items.is_empty() {
            return Ok(Vec::new());
        }
        run(tx, SUBJECT_RECORDS, &[&subjects, &items]).await
    };
    let (holders, others) = futures_util::future::join(holders, others).await;
    let holders = holders?
        .iter()
        .map(|r| (r.get::<_, String>(4), key_holder(r)))
        .collect::<Vec<_>>();
    let others = others?
        .iter()
        .map(subject_record)
        .collect::<Result<Vec<_>, _>>()?;
    wave.iter()
        .map(|op| {
            let Op::Decide { lookups, decide } = op else {
                return Ok(None);
            };
            let keys: HashSet<&str> = lookups.keys.iter().map(String::as_str).collect();
            let subjects: HashSet<&str> = lookups.subjects.iter().map(String::as_str).collect();
            let mine = holders
                .iter()
                .filter(|(item, h)| *item == lookups.item && keys.contains(h.natural_key.as_str()))
                .map(|(_, h)| h.clone())
                .collect();
            let theirs = others
                .iter()
                .filter(|r| {
                    subjects.contains(r.subject_key.as_str()) && lookups.items.contains(&r.item)
                })
                .cloned()
                .collect();
            decide(mine, theirs).map(Some)
        })
        .collect()
}

/// Each string once, in sorted order.
fn unique<'a>(all: impl Iterator<Item = &'a String>) -> Vec<&'a str> {
    let set: std::collections::BTreeSet<&str> = all.map(String::as_str).collect();
    set.into_iter().collect()
}

/// Stores the submissions of a group with one multi-row statement per
/// table, whatever their number: idempotency claims first (a key taken
/// before, or earlier in the same group, answers the stored response and
/// stores nothing), then submissions, records, notices and deliveries.
/// Returns each submission's outcome and effects, in order.
async fn append_many(
    tx: &Transaction<'_>,
    subs: &[&NewSubmission],
) -> Result<Vec<(Out, Effects)>, StoreError> {
    // Idempotency: the first of each (participant, key) in the group
    // claims it; the database says which claims were new.
    let mut first_of: std::collections::HashMap<(&str, &str), usize> =
        std::collections::HashMap::new();
    let mut claims = Vec::new();
    for (i, sub) in subs.iter().enumerate() {
        if let Some(c) = &sub.idempotency {
            if let std::collections::hash_map::Entry::Vacant(e) =
                first_of.entry((sub.participant.as_str(), c.key.as_str()))
            {
                e.insert(i);
                claims.push(i);
            }
        }
    }
    let mut replays: std::collections::HashMap<usize, StoredResponse> =
        std::collections::HashMap::new();
    if !claims.is_empty() {
        let participants: Vec<&str> = claims
            .iter()
            .map(|&i| subs[i].participant.as_str())
            .collect();
        let keys: Vec<&str> = claims
            .iter()
            .filter_map(|&i| subs[i].idempotency.as_ref().map(|c| c.key.as_str()))
            .collect();
        let hashes: Vec<&str> = claims
            .iter()
            .filter_map(|&i| {
                subs[i]
                    .idempotency
                    .as_ref()
                    .map(|c| c.request_hash.as_str())
            })
            .collect();
        let statuses: Vec<i32> = claims
            .iter()
            .map(|&i| i32::from(subs[i].response_status))
            .collect();
        let bodies: Vec<&[u8]> = claims
            .iter()
            .map(|&i| subs[i].response_body.as_slice())
            .collect();
        let claimed: std::collections::HashSet<(String, String)> = run(tx, "INSERT INTO idempotency (participant, key, request_hash, status, response, created_at) \
                 SELECT p, k, h, s, r, $6 FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::bytea[]) AS t(p, k, h, s, r) \
                 ON CONFLICT DO NOTHING RETURNING participant, key",
                &[&participants, &keys, &hashes, &statuses, &bodies, &unix_now()],).await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // Keys taken before (by a commit this statement waited for, if it
        // was concurrent): their stored answers.
        let taken: Vec<usize> = claims
            .iter()
            .copied()
            .filter(|&i| {
                let key = subs[i].idempotency.as_ref().map_or("", |c| c.key.as_str());
                !claimed.contains(&(subs[i].participant.clone(), key.to_owned()))
            })
            .collect();
        if !taken.is_empty() {
            let participants: Vec<&str> = taken
                .iter()
                .map(|&i| subs[i].participant.as_str())
                .collect();
            let keys: Vec<&str> = taken
                .iter()
                .filter_map(|&i| subs[i].idempotency.as_ref().map(|c| c.key.as_str()))
                .collect();
            let rows = run(tx, "SELECT i.participant, i.key, i.request_hash, i.status, i.response FROM idempotency i \
                     JOIN unnest($1::text[], $2::text[]) AS t(p, k) ON i.participant = t.p AND i.key = t.k",
                    &[&participants, &keys],).await?;
            for r in rows {
                let (participant, key): (&str, &str) = (r.get(0), r.get(1));
                if let Some(&i) = first_of.get(&(participant, key)) {
                    replays.insert(
                        i,
                        StoredResponse {
                            request_hash: r.get(2),
                            status: u16::try_from(r.get::<_, i32>(3)).unwrap_or(500),
                            body: r.get(4),
                        },
                    );
                }
            }
        }
    }
    // Later uses of a key in the same group replay its first use.
    for (i, sub) in subs.iter().enumerate() {
        let Some(c) = &sub.idempotency else { continue };
        let first = first_of[&(sub.participant.as_str(), c.key.as_str())];
        if first != i {
            let first_sub = subs[first];
            let earlier = replays
                .get(&first)
                .cloned()
                .unwrap_or_else(|| StoredResponse {
                    request_hash: first_sub
                        .idempotency
                        .as_ref()
                        .map_or_else(String::new, |c| c.request_hash.clone()),
                    status: first_sub.response_status,
                    body: first_sub.response_body.clone(),
                });
            replays.insert(i, earlier);
        }
    }
    let stored: Vec<&NewSubmission> = subs
        .iter()
        .enumerate()
        .filter(|(i, _)| !replays.contains_key(i))
        .map(|(_, s)| *s)
        .collect();
    if !stored.is_empty() {
        insert_submissions(tx, &stored).await?;
    }
    let stored_ids: std::collections::HashSet<&str> =
        stored.iter().map(|s| s.id.as_str()).collect();
    let mut outcomes = subs
        .iter()
        .enumerate()
        .map(|(i, sub)| match replays.remove(&i) {
            Some(r) => (Out::Append(AppendOutcome::Replay(r)), Effects::default()),
            None => {
                let mut fx = Effects::default();
                for n in sub.records.iter().filter_map(|r| r.notice.as_ref()) {
                    note_deliveries(n, &mut fx);
                }
                fx.audit.push(submission_audit(sub));
                (Out::Append(AppendOutcome::Stored), fx)
            }
        })
        .collect::<Vec<_>>();
    // Records that remove their subject from other lists, in this
    // transaction.
    for (sub, (_, fx)) in subs.iter().zip(outcomes.iter_mut()) {
        if stored_ids.contains(sub.id.as_str()) {
            for r in &sub.records {
                if let (Some(removes), Some(subject)) = (&r.removes, &r.subject_key) {
                    let listed = run(tx, "SELECT id FROM records WHERE subject_key = $1 AND item = ANY($2) AND status = 'active' ORDER BY id",
                        &[subject, &removes.items]).await?;
                    for row in listed {
                        let ending = Ending {
                            removal: Some(removes.removal.clone()),
                            on: removes.on,
                            ..Ending::new(crate::notice::EndReason::Removed)
                        };
                        end_record(tx, row.get(0), &ending, &sub.participant, fx).await?;
                    }
                }
            }
        }
    }
    Ok(outcomes)
}

/// The multi-row inserts of stored submissions.
async fn insert_submissions(
    tx: &Transaction<'_>,
    subs: &[&NewSubmission],
) -> Result<(), StoreError> {
    let codes: Vec<String> = subs
        .iter()
        .map(|s| serde_json::to_string(&s.rejection_codes).map_err(corrupt))
        .collect::<Result<_, _>>()?;
    let ids: Vec<&str> = subs.iter().map(|s| s.id.as_str()).collect();
    let participants: Vec<&str> = subs.iter().map(|s| s.participant.as_str()).collect();
    let items: Vec<&str> = subs.iter().map(|s| s.item.as_str()).collect();
    let versions: Vec<i32> = subs.iter().map(|s| int(s.item_version)).collect();
    let received: Vec<OffsetDateTime> = subs.iter().map(|s| s.received_at).collect();
    let accepted: Vec<i32> = subs.iter().map(|s| s.records.len() as i32).collect();
    let rejected: Vec<i32> = subs.iter().map(|s| s.rejected as i32).collect();
    let historical: Vec<bool> = subs.iter().map(|s| s.historical).collect();
    exec(tx, "INSERT INTO submissions (id, participant, item, item_version, received_at, accepted, rejected, rejection_codes, historical) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::timestamptz[], $6::int4[], $7::int4[], $8::text[], $9::bool[])",
        &[&ids, &participants, &items, &versions, &received, &accepted, &rejected, &codes, &historical],).await?;
    // Records of every submission, with their submission's columns.
    let records: Vec<(&NewSubmission, &super::NewRecord)> = subs
        .iter()
        .flat_map(|s| s.records.iter().map(move |r| (*s, r)))
        .collect();
    if records.is_empty() {
        return Ok(());
    }
    let col = |f: for<'a> fn(&'a NewSubmission, &'a super::NewRecord) -> Option<&'a str>| -> Vec<Option<&str>> {
        records.iter().map(|(s, r)| f(s, r)).collect()
    };
    let ids = col(|_, r| Some(&r.id));
    let sub_ids = col(|s, _| Some(&s.id));
    let items = col(|s, _| Some(&s.item));
    let submitters = col(|s, _| Some(&s.participant));
    let types = col(|_, r| Some(&r.subject_type));
    let keys = col(|_, r| r.subject_key.as_deref());
    let bodies = col(|_, r| Some(&r.body));
    let warnings = col(|_, r| Some(&r.warnings));
    let versions: Vec<i32> = records.iter().map(|(s, _)| int(s.item_version)).collect();
    let received: Vec<OffsetDateTime> = records.iter().map(|(s, _)| s.received_at).collect();
    let decisions: Vec<Option<Date>> = records.iter().map(|(_, r)| r.decision_date).collect();
    let untils: Vec<Option<Date>> = records.iter().map(|(_, r)| r.effective_until).collect();
    let natural = col(|_, r| Some(&r.natural_key));
    let contents = col(|_, r| Some(&r.content_hash));
    let levels = col(|_, r| r.level.map(|l| l.as_str()));
    let statuses = col(|_, r| {
        Some(
            r.ended
                .as_ref()
                .map_or("active", |e| e.reason.record_status()),
        )
    });
    let end_reasons = col(|_, r| r.ended.as_ref().map(|e| e.reason.as_str()));
    let removals = col(|_, r| r.ended.as_ref().and_then(|e| e.removal.as_deref()));
    let public_ids = col(|_, r| r.publicity.as_ref().map(|p| p.public_id.as_str()));
    let public_rules = col(|_, r| r.publicity.as_ref().map(|p| p.stamp.rule_set.as_str()));
    let public_starts: Vec<Option<Date>> = records
        .iter()
        .map(|(_, r)| r.publicity.as_ref().map(|p| p.stamp.start))
        .collect();
    let public_ends: Vec<Option<Date>> = records
        .iter()
        .map(|(_, r)| r.publicity.as_ref().map(|p| p.stamp.end))
        .collect();
    exec(tx, "INSERT INTO records (id, submission_id, item, item_version, submitter, subject_type, subject_key, decision_date, received_at, body, warnings, effective_until, natural_key, content_hash, level, status, end_reason, removal, public_id, publicity_rule, publicity_start, publicity_end) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::text[], $8::date[], $9::timestamptz[], $10::text[], $11::text[], $12::date[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::text[], $21::date[], $22::date[])",
        &[&ids, &sub_ids, &items, &versions, &submitters, &types, &keys, &decisions, &received, &bodies, &warnings, &untils, &natural, &contents, &levels, &statuses, &end_reasons, &removals, &public_ids, &public_rules, &public_starts, &public_ends],).await?;
    let notices: Vec<NoticeRow<'_>> = records
        .iter()
        .filter_map(|(s, r)| {
            r.notice.as_ref().map(|n| {
                (
                    n,
                    NoticeOrigin {
                        item: &s.item,
                        item_version: s.item_version,
                        record_id: &r.id,
                        source: &s.participant,
                        issued_at: s.received_at,
                    },
                )
            })
        })
        .collect();
    insert_notices(tx, &notices).await?;
    // Grade marks, in key order (a trigger marks updates; for inserts,
    // this statement costs less than a trigger's transition table).
    let mut subjects: Vec<&str> = records
        .iter()
        .filter_map(|(_, r)| r.subject_key.as_deref())
        .collect();
    subjects.sort_unstable();
    subjects.dedup();
    if !subjects.is_empty() {
        exec(
            tx,
            "INSERT INTO grade_marks AS g (subject_key, mark) \
             SELECT k, nextval('grade_mark_seq') FROM unnest($1::text[]) AS k \
             ON CONFLICT (subject_key) DO UPDATE SET mark = EXCLUDED.mark",
            &[&subjects],
        )
        .await?;
    }
    Ok(())
}

/// Where a notice comes from.
struct NoticeOrigin<'a> {
    item: &'a str,
    item_version: u32,
    record_id: &'a str,
    source: &'a str,
    issued_at: OffsetDateTime,
}

/// Stores assessed grades; see [`Store::set_grades`]. At most two
/// statements for the whole write, whatever its size: one inserts the
/// subjects that have no row yet with their new grade (their grade before
/// is the default), one locks the others' rows (in key order, so
/// instances writing the same subjects at once wait for each other instead
/// of deadlocking), updates them and returns each grade as it was before.
/// A subject whose row another write is inserting waits for that write at
/// the insert and, once it has committed, is updated like any other. The
/// subjects of one write are distinct ([`PgStore::set_grades`] splits at a
/// repeat).
async fn set_grades(
    tx: &Transaction<'_>,
    updates: &[GradeUpdate],
    marks: &[GradeMark],
    fx: &mut Effects,
) -> Result<Vec<GradeChanged>, StoreError> {
    if !marks.is_empty() {
        // A mark row locked by a write still to commit is about to be
        // replaced: it is skipped, not waited for (the writes hold their
        // subjects' locks before they count marks up, and this group may
        // hold those of another: waiting could close a cycle).
        let keys: Vec<&str> = marks.iter().map(|m| m.subject_key.as_str()).collect();
        let seen: Vec<i64> = marks.iter().map(|m| m.mark).collect();
        exec(tx, "DELETE FROM grade_marks g USING unnest($1::text[], $2::int8[]) AS t(k, m) \
             WHERE g.subject_key = t.k AND g.mark = t.m AND g.subject_key IN \
             (SELECT subject_key FROM grade_marks WHERE subject_key = ANY($1) ORDER BY subject_key FOR UPDATE SKIP LOCKED)",
            &[&keys, &seen]).await?;
    }
    if updates.is_empty() {
        return Ok(Vec::new());
    }
    let now = OffsetDateTime::now_utc();
    let new: HashSet<String> = write_grades(
        tx,
        "INSERT INTO subject_grades (subject_key, grade, rule, rules_version, region, review_after, assessed_at) \
         SELECT k, grade, rule, version, region, review, $7 \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::date[]) AS u(k, grade, rule, version, region, review) \
         ORDER BY k ON CONFLICT (subject_key) DO NOTHING RETURNING subject_key",
        updates.iter(),
        now,
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    let mut before: HashMap<String, String> = updates
        .iter()
        .filter(|u| new.contains(&u.subject_key))
        .map(|u| (u.subject_key.clone(), u.default_grade.clone()))
        .collect();
    if before.len() < updates.len() {
        let rows = write_grades(
            tx,
            "UPDATE subject_grades g SET grade = u.grade, rule = u.rule, rules_version = u.version, region = u.region, review_after = u.review, assessed_at = $7 \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::date[]) AS u(k, grade, rule, version, region, review), \
                  (SELECT subject_key, grade FROM subject_grades WHERE subject_key = ANY($1) ORDER BY subject_key FOR UPDATE) AS old \
             WHERE g.subject_key = u.k AND old.subject_key = u.k \
             RETURNING g.subject_key, old.grade",
            updates.iter().filter(|u| !new.contains(&u.subject_key)),
            now,
        )
        .await?;
        before.extend(rows.iter().map(|r| (r.get(0), r.get(1))));
    }
    let mut changed = Vec::new();
    let mut notices = Vec::new();
    for u in updates {
        let from = before
            .get(&u.subject_key)
            .ok_or_else(|| corrupt("no grade row for a subject just written"))?;
        if *from == u.grade {
            continue;
        }
        let notice = u
            .notice
            .as_ref()
            .map(|g| (shared::with_shift(g, from, u), g));
        changed.push(GradeChanged {
            subject_key: u.subject_key.clone(),
            from: from.clone(),
            to: u.grade.clone(),
            notice_id: notice.as_ref().map(|(n, _)| n.id.clone()),
        });
        notices.extend(notice);
    }
    let rows: Vec<NoticeRow<'_>> = notices
        .iter()
        .map(|(n, g)| {
            (
                n,
                NoticeOrigin {
                    item: &g.item,
                    item_version: g.item_version,
                    record_id: &g.record_id,
                    source: &g.source,
                    issued_at: now,
                },
            )
        })
        .collect();
    insert_notices(tx, &rows).await?;
    for (n, _) in &notices {
        note_deliveries(n, fx);
    }
    Ok(changed)
}

/// Runs a grade write taking the updates' columns as arrays `$1`-`$6`
/// (subject, grade, rule, rules version, region, review date) and the
/// assessment time as `$7`.
async fn write_grades<'a>(
    tx: &Transaction<'_>,
    sql: &str,
    updates: impl Iterator<Item = &'a GradeUpdate>,
    now: OffsetDateTime,
) -> Result<Vec<Row>, StoreError> {
    let updates: Vec<&GradeUpdate> = updates.collect();
    let keys: Vec<&str> = updates.iter().map(|u| u.subject_key.as_str()).collect();
    let grades: Vec<&str> = updates.iter().map(|u| u.grade.as_str()).collect();
    let rules: Vec<&str> = updates.iter().map(|u| u.rule.as_str()).collect();
    let versions: Vec<i32> = updates.iter().map(|u| int(u.rules_version)).collect();
    let regions: Vec<Option<&str>> = updates.iter().map(|u| u.region.as_deref()).collect();
    let reviews: Vec<Option<Date>> = updates.iter().map(|u| u.review_after).collect();
    run(
        tx,
        sql,
        &[&keys, &grades, &rules, &versions, &regions, &reviews, &now],
    )
    .await
}

/// A notice to insert and where it comes from.
type NoticeRow<'a> = (&'a NewNotice, NoticeOrigin<'a>);

/// Notes a notice's deliveries for the end of the transaction: pull ones
/// get stream positions; any wakes the dispatchers and long-polls.
fn note_deliveries(n: &NewNotice, fx: &mut Effects) {
    for d in n.deliveries.iter().filter(|d| !d.push) {
        fx.pulls
            .entry(d.agency.clone())
            .or_default()
            .push(d.id.clone());
    }
    fx.wake |= !n.deliveries.is_empty();
}

/// Inserts notices and their deliveries, one statement each.
async fn insert_notices(tx: &Transaction<'_>, notices: &[NoticeRow<'_>]) -> Result<(), StoreError> {
    if notices.is_empty() {
        return Ok(());
    }
    let text = |f: for<'a> fn(&'a NoticeRow<'a>) -> Option<&'a str>| -> Vec<Option<&str>> {
        notices.iter().map(f).collect()
    };
    let ids = text(|(n, _)| Some(&n.id));
    let kinds = text(|(n, _)| Some(n.kind.as_str()));
    let items = text(|(_, o)| Some(o.item));
    let records = text(|(_, o)| Some(o.record_id));
    let sources = text(|(_, o)| Some(o.source));
    let severities = text(|(n, _)| Some(n.severity.as_str()));
    let regions = text(|(n, _)| n.region.as_deref());
    let lifts = text(|(n, _)| n.lifts.as_deref());
    let reasons = text(|(n, _)| n.reason.as_deref());
    let corrects = text(|(n, _)| n.corrects.as_deref());
    let historical: Vec<bool> = notices.iter().map(|(n, _)| n.historical).collect();
    let grades: Vec<Option<String>> = notices
        .iter()
        .map(|(n, _)| n.grade.as_ref().map(serde_json::to_string).transpose())
        .collect::<Result<_, _>>()
        .map_err(corrupt)?;
    let versions: Vec<i32> = notices.iter().map(|(_, o)| int(o.item_version)).collect();
    let measures: Vec<String> = notices
        .iter()
        .map(|(n, _)| serde_json::to_string(&n.measures).map_err(corrupt))
        .collect::<Result<_, _>>()?;
    let froms: Vec<Option<Date>> = notices.iter().map(|(n, _)| n.effective_from).collect();
    let untils: Vec<Option<Date>> = notices.iter().map(|(n, _)| n.effective_until).collect();
    let issued: Vec<OffsetDateTime> = notices.iter().map(|(_, o)| o.issued_at).collect();
    exec(tx, "INSERT INTO notices (id, kind, item, item_version, record_id, source, severity, region, measures, effective_from, effective_until, issued_at, lifts, reason, corrects, historical, grade) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::date[], $11::date[], $12::timestamptz[], $13::text[], $14::text[], $15::text[], $16::bool[], $17::text[])",
        &[&ids, &kinds, &items, &versions, &records, &sources, &severities, &regions, &measures, &froms, &untils, &issued, &lifts, &reasons, &corrects, &historical, &grades],).await?;
    let deliveries: Vec<(&NewNotice, &super::NewDelivery, OffsetDateTime)> = notices
        .iter()
        .flat_map(|(n, o)| n.deliveries.iter().map(move |d| (*n, d, o.issued_at)))
        .collect();
    if deliveries.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = deliveries.iter().map(|(_, d, _)| d.id.as_str()).collect();
    let notice_ids: Vec<&str> = deliveries.iter().map(|(n, _, _)| n.id.as_str()).collect();
    let subs: Vec<&str> = deliveries
        .iter()
        .map(|(_, d, _)| d.subscription.as_str())
        .collect();
    let agencies: Vec<&str> = deliveries
        .iter()
        .map(|(_, d, _)| d.agency.as_str())
        .collect();
    let modes: Vec<&str> = deliveries
        .iter()
        .map(|(_, d, _)| if d.push { "push" } else { "pull" })
        .collect();
    let created: Vec<OffsetDateTime> = deliveries.iter().map(|(_, _, at)| *at).collect();
    exec(tx, "INSERT INTO deliveries (id, notice_id, subscription, agency, mode, state, created_at) \
         SELECT i, n, s, a, m, 'pending', c FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) AS t(i, n, s, a, m, c)",
        &[&ids, &notice_ids, &subs, &agencies, &modes, &created],).await?;
    Ok(())
}

/// Records on the public channel on day `$1`: stamped, in effect, inside
/// their publicity period.
const PUBLIC_SELECT: &str = "SELECT public_id, item, body, publicity_rule, publicity_start, publicity_end, revision FROM records \
     WHERE public_id IS NOT NULL AND status = 'active' AND publicity_start <= $1 AND publicity_end >= $1 \
     AND (effective_until IS NULL OR effective_until >= $1)";

fn public_record(r: &Row) -> Result<PublicRecord, StoreError> {
    Ok(PublicRecord {
        public_id: r.get(0),
        item: r.get(1),
        body: RecordBody::from_store(serde_json::from_str(r.get::<_, &str>(2)).map_err(corrupt)?),
        rule_set: r.get(3),
        start: r.get(4),
        end: r.get(5),
        revision: uint(r.get(6)),
    })
}

const NOTICE_COLUMNS: &str = "n.id, n.kind, n.item, n.item_version, n.record_id, n.source, n.severity, n.measures, n.effective_from, n.effective_until, n.issued_at, n.lifts, n.reason, n.corrects, n.historical, n.grade";

fn notice_at(r: &Row, o: usize) -> Result<StoredNotice, StoreError> {
    let kind: String = r.get(o + 1);
    let severity: String = r.get(o + 6);
    let measures: String = r.get(o + 7);
    Ok(StoredNotice {
        notice_id: r.get(o),
        kind: parse_kind(&kind)?,
        item: r.get(o + 2),
        item_version: uint(r.get(o + 3)),
        record_id: r.get(o + 4),
        source: r.get(o + 5),
        severity: Severity::parse(&severity)
            .ok_or_else(|| corrupt(format!("severity {severity:?}")))?,
        measures: serde_json::from_str(&measures).map_err(corrupt)?,
        effective_from: r.get(o + 8),
        effective_until: r.get(o + 9),
        issued_at: r.get(o + 10),
        lifts: r.get(o + 11),
        reason: r.get(o + 12),
        corrects: r.get(o + 13),
        historical: r.get(o + 14),
        grade: r
            .get::<_, Option<&str>>(o + 15)
            .map(serde_json::from_str)
            .transpose()
            .map_err(corrupt)?,
    })
}

async fn end_record(
    tx: &Transaction<'_>,
    record_id: &str,
    ending: &Ending,
    actor: &str,
    fx: &mut Effects,
) -> Result<EndOutcome, StoreError> {
    let status = run_opt(
        tx,
        "SELECT status FROM records WHERE id = $1 FOR UPDATE",
        &[&record_id],
    )
    .await?;
    match status.map(|r| r.get::<_, String>(0)).as_deref() {
        None => return Ok(EndOutcome::NotFound),
        Some("active") => {}
        Some(other) => return Ok(EndOutcome::AlreadyEnded(other.to_owned())),
    }
    let reason_text = ending.reason.as_str();
    exec(
        tx,
        "UPDATE records SET status = $2, end_reason = $3, end_note = $4, removal = $5 WHERE id = $1",
        &[&record_id, &ending.reason.record_status(), &reason_text, &ending.note, &ending.removal],
    )
    .await?;
    let on = ending.on.unwrap_or_else(crate::codes::today_cst);
    let (lift_notices, mut recipients) = follow_up(tx, record_id, fx, |original, targets| {
        Some(shared::lift_of(original, on, reason_text, targets))
    })
    .await?;
    recipients.sort();
    recipients.dedup();
    fx.audit.push(AuditItem::single(
        actor,
        "record.end",
        record_id,
        serde_json::json!({"reason": reason_text, "lift_notices": lift_notices, "recipients": recipients}),
    ));
    fx.wake = true;
    Ok(EndOutcome::Ended {
        lift_notices,
        recipients,
    })
}

/// Creates, for each of the record's notices in effect, the follow-up
/// notice `make` builds (if any) with one delivery to every subscription
/// that had a delivery of it. Returns the notices and their recipients.
async fn follow_up(
    tx: &Transaction<'_>,
    record_id: &str,
    fx: &mut Effects,
    mut make: impl FnMut(&StoredNotice, &[(String, String, String)]) -> Option<NewNotice>,
) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let notices = run(
        tx,
        &format!("SELECT {NOTICE_COLUMNS} FROM notices n WHERE n.record_id = $1 ORDER BY n.issued_at, n.id"),
        &[&record_id],
    )
    .await?
    .iter()
    .map(|r| notice_at(r, 0))
    .collect::<Result<Vec<_>, _>>()?;
    let lifted = notices.iter().filter_map(|n| n.lifts.clone()).collect();
    let now = OffsetDateTime::now_utc();
    let (mut created, mut recipients) = (Vec::new(), Vec::new());
    for original in shared::in_effect(notices, &lifted) {
        let targets: Vec<(String, String, String)> = run(tx, "SELECT DISTINCT subscription, agency, mode FROM deliveries WHERE notice_id = $1 ORDER BY subscription, agency",
                &[&original.notice_id],).await?
            .iter()
            .map(|t| (t.get(0), t.get(1), t.get(2)))
            .collect();
        let Some(notice) = make(&original, &targets) else {
            continue;
        };
        insert_notices(
            tx,
            &[(
                &notice,
                NoticeOrigin {
                    item: &original.item,
                    item_version: original.item_version,
                    record_id,
                    source: &original.source,
                    issued_at: now,
                },
            )],
        )
        .await?;
        note_deliveries(&notice, fx);
        recipients.extend(targets.into_iter().map(|(_, agency, _)| agency));
        created.push(notice.id);
    }
    recipients.sort();
    recipients.dedup();
    Ok((created, recipients))
}

/// Stores a correction: the earlier revision kept, the new content in
/// place, and the notices the change calls for.
async fn correct_record(
    tx: &Transaction<'_>,
    c: &Correction,
    actor: &str,
    fx: &mut Effects,
) -> Result<CorrectOutcome, StoreError> {
    let Some(row) = run_opt(
        tx,
        "SELECT status, revision, item_version, body, warnings, submitter, item FROM records WHERE id = $1 FOR UPDATE",
        &[&c.record_id],
    )
    .await?
    else {
        return Ok(CorrectOutcome::NotFound);
    };
    let (status, revision): (String, i32) = (row.get(0), row.get(1));
    let revision = uint(revision);
    if status != "active" {
        return Ok(CorrectOutcome::AlreadyEnded(status));
    }
    if revision != c.expected_revision {
        return Ok(CorrectOutcome::RevisionChanged(revision));
    }
    let (submitter, item): (String, String) = (row.get(5), row.get(6));
    exec(tx,
        "INSERT INTO record_revisions (record_id, revision, item_version, body, warnings, replaced_at, replaced_by, reason) VALUES ($1, $2, $3, $4, $5, now(), $6, $7)",
        &[&c.record_id, &int(revision), &row.get::<_, i32>(2), &row.get::<_, &str>(3), &row.get::<_, &str>(4), &actor, &c.reason],
    )
    .await?;
    let r = &c.record;
    exec(tx,
        "UPDATE records SET item_version = $2, subject_type = $3, subject_key = $4, decision_date = $5, effective_until = $6, body = $7, warnings = $8, natural_key = $9, content_hash = $10, revision = $11, level = $12, \
         public_id = COALESCE(public_id, $13), publicity_rule = $14, publicity_start = $15, publicity_end = $16 WHERE id = $1",
        &[&c.record_id, &int(c.item_version), &r.subject_type, &r.subject_key, &r.decision_date, &r.effective_until, &r.body, &r.warnings, &r.natural_key, &r.content_hash, &int(revision + 1), &r.level.map(|l| l.as_str()),
            &r.publicity.as_ref().map(|p| p.public_id.as_str()), &r.publicity.as_ref().map(|p| p.stamp.rule_set.as_str()), &r.publicity.as_ref().map(|p| p.stamp.start), &r.publicity.as_ref().map(|p| p.stamp.end)],
    )
    .await?;
    let today = crate::codes::today_cst();
    let (mut notices, mut recipients) = follow_up(tx, &c.record_id, fx, |original, targets| {
        Some(match &r.notice {
            Some(n) => shared::correction_of(original, n, targets),
            None => shared::lift_of(
                original,
                today,
                crate::notice::EndReason::Corrected.as_str(),
                targets,
            ),
        })
    })
    .await?;
    let effect = shared::correction_effect(r.notice.as_ref(), !notices.is_empty());
    if let (Some(n), "notified") = (&r.notice, effect) {
        let origin = NoticeOrigin {
            item: &item,
            item_version: c.item_version,
            record_id: &c.record_id,
            source: &submitter,
            issued_at: OffsetDateTime::now_utc(),
        };
        insert_notices(tx, &[(n, origin)]).await?;
        note_deliveries(n, fx);
        shared::add_notice(n, &mut notices, &mut recipients);
    }
    fx.audit.push(shared::correction_audit(
        actor,
        c,
        revision + 1,
        effect,
        &notices,
        &recipients,
    ));
    fx.wake |= !notices.is_empty();
    Ok(CorrectOutcome::Corrected {
        revision: revision + 1,
        effect,
        notices,
        recipients,
    })
}

async fn ack(
    tx: &Transaction<'_>,
    agency: &str,
    position: i64,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    // Never past the agency's last delivery, so an ack cannot skip notices
    // that do not exist yet.
    let last: i64 = run_opt(
        tx,
        "SELECT last_pos FROM agency_streams WHERE agency = $1",
        &[&agency],
    )
    .await?
    .map_or(0, |r| r.get(0));
    let position = position.min(last);
    // Locked, so two instances acknowledging at once move it in turn.
    let previous: i64 = run_opt(
        tx,
        "SELECT position FROM pull_positions WHERE agency = $1 FOR UPDATE",
        &[&agency],
    )
    .await?
    .map_or(0, |r| r.get(0));
    if position <= previous {
        return Ok(());
    }
    exec(tx, "INSERT INTO pull_positions (agency, position, updated_at) VALUES ($1, $2, now()) \
         ON CONFLICT (agency) DO UPDATE SET position = GREATEST(pull_positions.position, EXCLUDED.position), updated_at = EXCLUDED.updated_at",
        &[&agency, &position],).await?;
    let delivered = exec(tx, "UPDATE deliveries SET state = 'delivered', delivered_at = now() WHERE agency = $1 AND mode = 'pull' AND pos > $2 AND pos <= $3 AND state = 'pending'",
            &[&agency, &previous, &position],).await?;
    if delivered > 0 {
        fx.audit.push(AuditItem::grouped(
            agency,
            "delivery.acknowledged",
            agency,
            serde_json::json!({"position": position, "deliveries": delivered}),
        ));
    }
    Ok(())
}

/// Stores push results, one statement per kind of result; a result whose
/// claim is no longer the delivery's current one changes nothing.
async fn finish(
    tx: &Transaction<'_>,
    finished: &[Finished],
    fx: &mut Effects,
) -> Result<(), StoreError> {
    // Fenced: only the attempt holding the current claim of an in-flight
    // delivery may set its outcome.
    const FENCE: &str =
        "FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[]) AS t(id, claim, at, error) \
         WHERE d.id = t.id AND d.claims = t.claim AND d.state = 'inflight' RETURNING d.id";
    let statements = [
        format!("UPDATE deliveries d SET state = 'delivered', delivered_at = now(), last_error = NULL {FENCE}"),
        format!("UPDATE deliveries d SET state = 'pending', next_attempt_at = t.at, last_error = t.error {FENCE}"),
        format!("UPDATE deliveries d SET state = 'pending', next_attempt_at = t.at, attempts = GREATEST(d.attempts - 1, 0) {FENCE}"),
        format!("UPDATE deliveries d SET state = 'dead', last_error = t.error {FENCE}"),
    ];
    // Which statement, retry time and error of a result.
    let columns = |r: &DeliveryResult| -> (usize, i64, String) {
        match r {
            DeliveryResult::Delivered => (0, 0, String::new()),
            DeliveryResult::Retry { at, error } => (1, *at, error.clone()),
            DeliveryResult::Deferred { at } => (2, *at, String::new()),
            DeliveryResult::Dead { error } => (3, 0, error.clone()),
        }
    };
    let mut changed = std::collections::HashSet::new();
    for (kind, sql) in statements.iter().enumerate() {
        let (mut ids, mut claims, mut ats, mut errors) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for f in finished {
            let (k, at, error) = columns(&f.result);
            if k == kind {
                ids.push(f.delivery_id.as_str());
                claims.push(f.claim);
                ats.push(at);
                errors.push(error);
            }
        }
        if ids.is_empty() {
            continue;
        }
        for row in run(tx, sql, &[&ids, &claims, &ats, &errors]).await? {
            changed.insert(row.get::<_, String>(0));
        }
    }
    for f in finished {
        if !changed.contains(&f.delivery_id) {
            tracing::debug!(delivery = %f.delivery_id, claim = f.claim, "result of a superseded attempt ignored");
            continue;
        }
        fx.audit.extend(outcome_audit(f));
    }
    Ok(())
}

fn outcome_text(o: FeedbackOutcome) -> &'static str {
    match o {
        FeedbackOutcome::Applied => "applied",
        FeedbackOutcome::NotApplicable => "not_applicable",
        FeedbackOutcome::Pending => "pending",
    }
}

async fn add_feedback(
    tx: &Transaction<'_>,
    f: &Feedback,
    fx: &mut Effects,
) -> Result<FeedbackStored, StoreError> {
    let exists = run_opt(tx, "SELECT 1 FROM notices WHERE id = $1", &[&f.notice_id]).await?;
    if exists.is_none() {
        return Ok(FeedbackStored::UnknownNotice);
    }
    let received = run_opt(
        tx,
        "SELECT 1 FROM deliveries WHERE notice_id = $1 AND agency = $2 LIMIT 1",
        &[&f.notice_id, &f.agency],
    )
    .await?;
    if received.is_none() {
        return Ok(FeedbackStored::NotRecipient);
    }
    let outcome = outcome_text(f.outcome);
    exec(tx, "INSERT INTO feedback (notice_id, agency, measure, outcome, date, note, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (notice_id, agency, measure) DO UPDATE SET outcome = EXCLUDED.outcome, date = EXCLUDED.date, note = EXCLUDED.note, received_at = EXCLUDED.received_at",
        &[&f.notice_id, &f.agency, &f.measure, &outcome, &f.date, &f.note, &f.received_at],).await?;
    fx.audit.push(AuditItem::single(
        &f.agency,
        "feedback",
        &f.notice_id,
        serde_json::json!({"measure": f.measure, "outcome": outcome, "date": f.date.map(|d| d.to_string())}),
    ));
    Ok(FeedbackStored::Stored)
}

async fn control_state(
    tx: &Transaction<'_>,
    seeded: Vec<String>,
) -> Result<ControlState, StoreError> {
    let decode = |rows: Vec<Row>| -> Result<Vec<Value>, StoreError> {
        rows.iter()
            .map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(corrupt))
            .collect()
    };
    let items = run(tx, "SELECT v.definition FROM catalog_active a JOIN catalog_versions v ON v.item = a.item AND v.version = a.version ORDER BY a.item", &[]).await?;
    let registry = "SELECT body FROM registry WHERE kind = $1 ORDER BY ord";
    let participants = run(tx, registry, &[&DocKind::Participant.as_str()]).await?;
    let subscriptions = run(tx, registry, &[&DocKind::Subscription.as_str()]).await?;
    Ok(ControlState {
        items: decode(items)?,
        participants: decode(participants)?,
        subscriptions: decode(subscriptions)?,
        seeded,
    })
}

async fn seed(
    tx: &Transaction<'_>,
    items: &[Value],
    participants: &[(String, Value)],
    subscriptions: &[(String, Value)],
    fx: &mut Effects,
) -> Result<ControlState, StoreError> {
    let mut seeded = Vec::new();
    for def in items {
        let id = def.get("id").and_then(Value::as_str).unwrap_or_default();
        let version = def.get("version").and_then(Value::as_u64).unwrap_or(1) as i32;
        let text = serde_json::to_string(def).map_err(corrupt)?;
        // Instances starting together: the first one's rows win.
        let n = exec(
            tx,
            "INSERT INTO catalog_active (item, version) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&id, &version],
        )
        .await?;
        if n == 1 {
            exec(tx, "INSERT INTO catalog_versions (item, version, definition, created_at, created_by) VALUES ($1, $2, $3, now(), 'seed')",
                &[&id, &version, &text],).await?;
            fx.audit.push(AuditItem::single(
                "gateway",
                "catalog.seed",
                id,
                serde_json::json!({"version": version, "digest": super::sqlite_control::digest(&text)}),
            ));
            seeded.push(format!("catalog item {id} v{version}"));
        }
    }
    for (kind, docs) in [
        (DocKind::Participant, participants),
        (DocKind::Subscription, subscriptions),
    ] {
        if docs.is_empty() {
            continue;
        }
        // Seeded once: serialised by a lock on the kind, so two instances
        // starting on an empty database do not both seed.
        exec(
            tx,
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&kind.as_str()],
        )
        .await?;
        let count: i64 = run_one(
            tx,
            "SELECT COUNT(*) FROM registry WHERE kind = $1",
            &[&kind.as_str()],
        )
        .await?
        .get(0);
        if count > 0 {
            continue;
        }
        for (id, body) in docs {
            exec(tx, "INSERT INTO registry (kind, id, body, updated_at, updated_by) VALUES ($1, $2, $3, now(), 'seed')",
                &[&kind.as_str(), id, &serde_json::to_string(body).map_err(corrupt)?],).await?;
        }
        fx.audit.push(AuditItem::single(
            "gateway",
            &format!("{}.seed", kind.as_str()),
            "*",
            serde_json::json!({"count": docs.len()}),
        ));
        seeded.push(format!("{} {}s", docs.len(), kind.as_str()));
    }
    control_state(tx, seeded).await
}

async fn activate(
    tx: &Transaction<'_>,
    a: &ItemActivation,
    fx: &mut Effects,
) -> Result<ActivateOutcome, StoreError> {
    let version = int(a.version);
    match &a.definition {
        Some(def) => {
            let n = exec(tx, "INSERT INTO catalog_versions (item, version, definition, created_at, created_by, reason, breaking) VALUES ($1, $2, $3, now(), $4, $5, $6) ON CONFLICT DO NOTHING",
                    &[&a.item, &version, &serde_json::to_string(def).map_err(corrupt)?, &a.actor, &a.reason, &a.breaking],).await?;
            if n == 0 {
                let latest: i32 = run_one(
                    tx,
                    "SELECT MAX(version) FROM catalog_versions WHERE item = $1",
                    &[&a.item],
                )
                .await?
                .get(0);
                return Ok(ActivateOutcome::VersionTaken {
                    latest: uint(latest),
                });
            }
        }
        None => {
            let exists = run_opt(
                tx,
                "SELECT 1 FROM catalog_versions WHERE item = $1 AND version = $2",
                &[&a.item, &version],
            )
            .await?;
            if exists.is_none() {
                return Ok(ActivateOutcome::NoSuchVersion);
            }
        }
    }
    exec(tx, "INSERT INTO catalog_active (item, version) VALUES ($1, $2) ON CONFLICT (item) DO UPDATE SET version = EXCLUDED.version",
        &[&a.item, &version],).await?;
    fx.audit.push(activation_audit(a));
    fx.control = true;
    Ok(ActivateOutcome::Activated)
}

const OUTBOUND_SELECT: &str = "SELECT COALESCE(d.pos, 0), d.id, d.subscription, d.agency, d.attempts, \
     n.id, n.kind, n.item, n.item_version, n.record_id, n.source, n.severity, n.measures, n.effective_from, n.effective_until, n.issued_at, n.lifts, n.reason, n.corrects, n.historical, n.grade, \
     r.body, d.claims FROM deliveries d JOIN notices n ON n.id = d.notice_id JOIN records r ON r.id = n.record_id";

fn outbound(r: &Row) -> Result<Outbound, StoreError> {
    outbound_parsed_once(r, &mut std::collections::HashMap::new())
}

/// [`outbound`] parsing each record body once per `parsed`: a claim round
/// takes one notice for many subscriptions.
fn outbound_parsed_once(
    r: &Row,
    parsed: &mut std::collections::HashMap<String, RecordBody>,
) -> Result<Outbound, StoreError> {
    let notice = notice_at(r, 5)?;
    let record = match parsed.get(&notice.record_id) {
        Some(body) => body.clone(),
        None => {
            let body = RecordBody::from_store(
                serde_json::from_str(r.get::<_, &str>(21)).map_err(corrupt)?,
            );
            parsed.insert(notice.record_id.clone(), body.clone());
            body
        }
    };
    Ok(Outbound {
        position: r.get(0),
        delivery_id: r.get(1),
        subscription: r.get(2),
        agency: r.get(3),
        attempts: uint(r.get(4)),
        notice,
        record,
        claim: r.get(22),
    })
}

const DELIVERY_SELECT: &str = "SELECT d.id, d.notice_id, n.kind, n.record_id, d.subscription, d.agency, d.mode, d.state, d.attempts, d.last_error FROM deliveries d JOIN notices n ON n.id = d.notice_id";

fn delivery(r: &Row) -> Result<DeliveryInfo, StoreError> {
    let state: &str = r.get(7);
    Ok(DeliveryInfo {
        id: r.get(0),
        notice_id: r.get(1),
        notice_type: parse_kind(r.get(2))?,
        record_id: r.get(3),
        subscription: r.get(4),
        agency: r.get(5),
        mode: match r.get::<_, &str>(6) {
            "pull" => crate::routing::ModeName::Pull,
            "push" => crate::routing::ModeName::Push,
            other => return Err(corrupt(format!("delivery mode {other:?}"))),
        },
        state: DeliveryState::parse(state)
            .ok_or_else(|| corrupt(format!("delivery state {state:?}")))?,
        attempts: uint(r.get(8)),
        last_error: r.get(9),
    })
}

fn feedback_row(r: &Row) -> Result<Feedback, StoreError> {
    Ok(Feedback {
        notice_id: r.get(0),
        agency: r.get(1),
        measure: r.get(2),
        outcome: match r.get::<_, &str>(3) {
            "applied" => FeedbackOutcome::Applied,
            "not_applicable" => FeedbackOutcome::NotApplicable,
            "pending" => FeedbackOutcome::Pending,
            other => return Err(corrupt(format!("feedback outcome {other:?}"))),
        },
        date: r.get(4),
        note: r.get(5),
        received_at: r.get(6),
    })
}

fn audit_entry(r: &Row) -> Result<crate::audit::Entry, StoreError> {
    Ok(crate::audit::Entry {
        seq: r.get(0),
        at: r.get(1),
        actor: r.get(2),
        action: r.get(3),
        subject: r.get(4),
        details: serde_json::value::RawValue::from_string(r.get(5)).map_err(corrupt)?,
        prev_hash: r.get(6),
        hash: r.get(7),
    })
}

macro_rules! expect_out {
    ($out:expr, $variant:ident) => {
        match $out {
            Out::$variant(v) => Ok(v),
            _ => Err(StoreError::Database(
                "writer answered another operation".into(),
            )),
        }
    };
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn append_submission(
        &self,
        submission: NewSubmission,
    ) -> Result<AppendOutcome, StoreError> {
        expect_out!(self.write(Op::Append(Box::new(submission))).await?, Append)
    }

    /// A submission is looked up, decided and stored in one writer job,
    /// with its group's others: two look-up statements per group instead
    /// of two pool queries per submission (see [`store_submissions`]). A
    /// key another instance took in between is looked up again, three
    /// tries in all ([`super::while_keys_taken`]).
    async fn decide_and_append(
        &self,
        lookups: SubmissionLookups,
        decide: Decide,
    ) -> Result<Decided, StoreError> {
        let (lookups, decide) = (&lookups, &decide);
        super::while_keys_taken(|| async move {
            let op = Op::Decide {
                lookups: lookups.clone(),
                decide: decide.clone(),
            };
            expect_out!(self.write(op).await?, Decided)
        })
        .await
    }

    async fn idempotent_response(
        &self,
        participant: &str,
        key: &str,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let cutoff = unix_now() - self.idempotency_ttl.as_secs() as i64;
        let rows = self
            .query(
                "SELECT request_hash, status, response FROM idempotency WHERE participant = $1 AND key = $2 AND created_at >= $3",
                &[&participant, &key, &cutoff],
            )
            .await?;
        Ok(rows.first().map(|r| StoredResponse {
            request_hash: r.get(0),
            status: u16::try_from(r.get::<_, i32>(1)).unwrap_or(500),
            body: r.get(2),
        }))
    }

    async fn find_keys(&self, item: &str, keys: Vec<String>) -> Result<Vec<KeyHolder>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .query(
                "SELECT natural_key, id, content_hash, submitter FROM records WHERE item = $1 AND natural_key = ANY($2)",
                &[&item, &keys],
            )
            .await?;
        Ok(rows.iter().map(key_holder).collect())
    }

    async fn subject_records(
        &self,
        subjects: Vec<String>,
        items: Vec<String>,
    ) -> Result<Vec<SubjectRecord>, StoreError> {
        if subjects.is_empty() || items.is_empty() {
            return Ok(Vec::new());
        }
        self.query(SUBJECT_RECORDS, &[&subjects, &items])
            .await?
            .iter()
            .map(subject_record)
            .collect()
    }

    async fn lookups(
        &self,
        lookups: SubmissionLookups,
    ) -> Result<(Vec<KeyHolder>, Vec<SubjectRecord>), StoreError> {
        // At once, each on a connection of the pool: one round trip's wait.
        let (holders, others) = futures_util::future::join(
            self.find_keys(&lookups.item, lookups.keys),
            self.subject_records(lookups.subjects, lookups.items),
        )
        .await;
        Ok((holders?, others?))
    }

    async fn record(&self, id: &str) -> Result<Option<StoredRecord>, StoreError> {
        let rows = self
            .query(
                &format!("SELECT {RECORD_COLUMNS} FROM records WHERE id = $1"),
                &[&id],
            )
            .await?;
        rows.first().map(stored_record).transpose()
    }

    async fn subjects_records(
        &self,
        subjects: Vec<String>,
        items: Vec<String>,
    ) -> Result<Vec<(String, StoredRecord)>, StoreError> {
        if subjects.is_empty() || items.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .query(
                &format!("SELECT r.* FROM (SELECT DISTINCT unnest($1::text[]) AS key) AS s CROSS JOIN LATERAL \
                     (SELECT {RECORD_COLUMNS}, subject_key FROM records \
                      WHERE subject_key = s.key AND item = ANY($2) OFFSET 0) AS r \
                     ORDER BY r.received_at, r.id"),
                &[&subjects, &items],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.get(14), stored_record(r)?)))
            .collect()
    }

    async fn record_notices(&self, record_id: &str) -> Result<Vec<NoticeHistory>, StoreError> {
        let notices = self
            .query(
                &format!("SELECT {NOTICE_COLUMNS} FROM notices n WHERE n.record_id = $1 ORDER BY n.issued_at, n.id"),
                &[&record_id],
            )
            .await?;
        let mut out = Vec::with_capacity(notices.len());
        for row in notices {
            let notice = notice_at(&row, 0)?;
            let deliveries = self
                .query(
                    &format!("{DELIVERY_SELECT} WHERE d.notice_id = $1 ORDER BY d.seq"),
                    &[&notice.notice_id],
                )
                .await?
                .iter()
                .map(delivery)
                .collect::<Result<_, _>>()?;
            let feedback = self
                .query(
                    "SELECT notice_id, agency, measure, outcome, date, note, received_at FROM feedback WHERE notice_id = $1 ORDER BY agency, measure",
                    &[&notice.notice_id],
                )
                .await?
                .iter()
                .map(feedback_row)
                .collect::<Result<_, _>>()?;
            out.push(NoticeHistory {
                notice,
                deliveries,
                feedback,
            });
        }
        Ok(out)
    }

    async fn end_record(
        &self,
        record_id: &str,
        ending: Ending,
        actor: &str,
    ) -> Result<EndOutcome, StoreError> {
        expect_out!(
            self.write(Op::End {
                record_id: record_id.to_owned(),
                ending,
                actor: actor.to_owned(),
            })
            .await?,
            End
        )
    }

    async fn correct_record(
        &self,
        correction: Correction,
        actor: &str,
    ) -> Result<CorrectOutcome, StoreError> {
        expect_out!(
            self.write(Op::Correct {
                correction: Box::new(correction),
                actor: actor.to_owned(),
            })
            .await?,
            Correct
        )
    }

    async fn add_review(&self, review: NewReview) -> Result<(), StoreError> {
        expect_out!(self.write(Op::Review(Box::new(review))).await?, Unit)
    }

    async fn grade_rule_versions(&self) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = self
            .query(
                "SELECT version, created_at, created_by, reason FROM grade_rules ORDER BY version",
                &[],
            )
            .await?;
        let last = rows.len().saturating_sub(1);
        Ok(rows
            .iter()
            .enumerate()
            .map(|(i, r)| VersionInfo {
                version: uint(r.get(0)),
                created_at: r.get(1),
                created_by: r.get(2),
                reason: r.get(3),
                breaking: false,
                active: i == last,
            })
            .collect())
    }

    async fn grade_rules(&self, version: Option<u32>) -> Result<Option<(u32, Value)>, StoreError> {
        let version = version.map(int);
        self.query(
            "SELECT version, document FROM grade_rules WHERE version = COALESCE($1, (SELECT MAX(version) FROM grade_rules))",
            &[&version],
        )
        .await?
        .first()
        .map(|r| {
            Ok((
                uint(r.get(0)),
                serde_json::from_str(r.get::<_, &str>(1)).map_err(corrupt)?,
            ))
        })
        .transpose()
    }

    async fn add_grade_rules(
        &self,
        document: Value,
        actor: &str,
        reason: Option<String>,
    ) -> Result<u32, StoreError> {
        let document = serde_json::to_string(&document).map_err(corrupt)?;
        let op = Op::GradeRules {
            document,
            actor: actor.to_owned(),
            reason,
        };
        expect_out!(self.write(op).await?, Version)
    }

    /// Up to [`GRADES_PER_WRITE`] subjects per write, each subject once
    /// (a repeated subject starts the next write, so it compares against
    /// the grade its earlier update stored).
    async fn set_grades(
        &self,
        updates: Vec<GradeUpdate>,
        marks: Vec<GradeMark>,
    ) -> Result<Vec<GradeChanged>, StoreError> {
        let mut changed = Vec::new();
        let mut part: Vec<GradeUpdate> = Vec::new();
        let mut keys = HashSet::new();
        for u in updates {
            if part.len() == GRADES_PER_WRITE || !keys.insert(u.subject_key.clone()) {
                let full = std::mem::take(&mut part);
                let op = Op::Grades(full, Vec::new());
                changed.extend(expect_out!(self.write(op).await?, Grades)?);
                keys = HashSet::from([u.subject_key.clone()]);
            }
            part.push(u);
        }
        // The marks with the last write: a mark is graded only once every
        // grade is stored.
        if !part.is_empty() || !marks.is_empty() {
            changed.extend(expect_out!(
                self.write(Op::Grades(part, marks)).await?,
                Grades
            )?);
        }
        Ok(changed)
    }

    async fn grade_marks(&self, subjects: Vec<String>) -> Result<Vec<GradeMark>, StoreError> {
        if subjects.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .query(
                "SELECT subject_key, mark FROM grade_marks WHERE subject_key = ANY($1)",
                &[&subjects],
            )
            .await?
            .iter()
            .map(|r| GradeMark {
                subject_key: r.get(0),
                mark: r.get(1),
            })
            .collect())
    }

    async fn ungraded_after(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(self
            .query(
                "SELECT subject_key FROM grade_marks WHERE subject_key > $1 ORDER BY subject_key LIMIT $2",
                &[&after, &limit],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn grades_due(&self, today: Date, limit: usize) -> Result<Vec<String>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(self
            .query(
                "SELECT subject_key FROM subject_grades WHERE review_after IS NOT NULL AND review_after <= $1 ORDER BY review_after LIMIT $2",
                &[&today, &limit],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn subjects_after(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(self
            .query(
                "SELECT DISTINCT subject_key FROM records WHERE subject_key IS NOT NULL AND subject_key > $1 ORDER BY subject_key LIMIT $2",
                &[&after, &limit],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn grade_counts(&self) -> Result<Vec<GradeCount>, StoreError> {
        Ok(self
            .query(
                "SELECT grade, region, COUNT(*) FROM subject_grades GROUP BY grade, region ORDER BY grade, region",
                &[],
            )
            .await?
            .iter()
            .map(|r| GradeCount {
                grade: r.get(0),
                region: r.get(1),
                subjects: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
            })
            .collect())
    }

    async fn public_records(&self, q: PublicQuery) -> Result<Vec<PublicRecord>, StoreError> {
        let (limit, offset) = (i64::from(q.limit), i64::from(q.offset));
        self.query(
            &format!(
                "{PUBLIC_SELECT} AND ($2::text IS NULL OR (subject_key = $2 AND subject_type <> 'natural_person')) \
                 AND ($3::text IS NULL OR (subject_type <> 'natural_person' AND strpos(body::jsonb ->> 'subject_name', $3) > 0)) \
                 AND ($4::text IS NULL OR item = $4) \
                 ORDER BY decision_date DESC, public_id LIMIT $5 OFFSET $6"
            ),
            &[&q.today, &q.uscc, &q.name, &q.item, &limit, &offset],
        )
        .await?
        .iter()
        .map(public_record)
        .collect()
    }

    async fn public_record(
        &self,
        public_id: &str,
        today: Date,
    ) -> Result<Option<PublicRecord>, StoreError> {
        self.query(
            &format!("{PUBLIC_SELECT} AND public_id = $2"),
            &[&today, &public_id],
        )
        .await?
        .first()
        .map(public_record)
        .transpose()
    }

    async fn review(&self, id: &str) -> Result<Option<StoredReview>, StoreError> {
        Ok(self
            .query(
                "SELECT agency, document FROM credit_reviews WHERE id = $1",
                &[&id],
            )
            .await?
            .first()
            .map(|r| StoredReview {
                agency: r.get(0),
                document: r.get(1),
            }))
    }

    async fn reviews_about(
        &self,
        subject_key: &str,
        limit: usize,
    ) -> Result<Vec<ReviewEntry>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(self
            .query(
                "SELECT id, agency, purpose, issued_at FROM credit_reviews WHERE subject_key = $1 ORDER BY issued_at DESC, id DESC LIMIT $2",
                &[&subject_key, &limit],
            )
            .await?
            .iter()
            .map(|r| ReviewEntry {
                report_id: r.get(0),
                agency: r.get(1),
                purpose: r.get(2),
                issued_at: rfc3339(r.get(3)),
            })
            .collect())
    }

    async fn revisions(&self, record_id: &str) -> Result<Vec<Revision>, StoreError> {
        self.query(
            "SELECT revision, item_version, replaced_at, replaced_by, reason, body FROM record_revisions WHERE record_id = $1 ORDER BY revision",
            &[&record_id],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(Revision {
                revision: uint(r.get(0)),
                item_version: uint(r.get(1)),
                replaced_at: r.get(2),
                replaced_by: r.get(3),
                reason: r.get(4),
                body: RecordBody::from_store(
                    serde_json::from_str(r.get::<_, &str>(5)).map_err(corrupt)?,
                ),
            })
        })
        .collect()
    }

    async fn expiring(&self, today: Date, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .query(
                "SELECT id FROM records WHERE status = 'active' AND effective_until IS NOT NULL AND effective_until < $1 LIMIT $2",
                &[&today, &(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn pull(
        &self,
        agency: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Outbound>, StoreError> {
        self.query(
            &format!("{OUTBOUND_SELECT} WHERE d.agency = $1 AND d.mode = 'pull' AND d.pos > $2 ORDER BY d.pos LIMIT $3"),
            &[&agency, &after, &(limit as i64)],
        )
        .await?
        .iter()
        .map(outbound)
        .collect()
    }

    async fn ack(&self, agency: &str, position: i64) -> Result<(), StoreError> {
        expect_out!(
            self.write(Op::Ack {
                agency: agency.to_owned(),
                position
            })
            .await?,
            Unit
        )
        .map(|()| ())
    }

    async fn pull_position(&self, agency: &str) -> Result<i64, StoreError> {
        Ok(self
            .query(
                "SELECT position FROM pull_positions WHERE agency = $1",
                &[&agency],
            )
            .await?
            .first()
            .map_or(0, |r| r.get(0)))
    }

    async fn legacy_position(&self, agency: &str, seq: i64) -> Result<i64, StoreError> {
        Ok(self
            .query(
                "SELECT pos FROM deliveries WHERE agency = $1 AND mode = 'pull' AND seq <= $2 AND pos IS NOT NULL ORDER BY pos DESC LIMIT 1",
                &[&agency, &seq],
            )
            .await?
            .first()
            .map_or(0, |r| r.get(0)))
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    fn control_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.control.clone())
    }

    async fn claim_due(
        &self,
        now_ms: i64,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> Result<Vec<Outbound>, StoreError> {
        let client = self.client().await?;
        // One statement per subscription, pipelined: rows another
        // instance holds are skipped, not waited for; in-flight rows whose
        // lease (next_attempt_at) has passed are taken over.
        let claim = client
            .prepare_cached(
                "UPDATE deliveries SET state = 'inflight', lease_until = $4, next_attempt_at = $4, attempts = attempts + 1, claims = claims + 1 \
                 WHERE seq IN (SELECT seq FROM deliveries WHERE subscription = $1 AND mode = 'push' AND state IN ('pending', 'inflight') AND next_attempt_at <= $2 \
                               ORDER BY next_attempt_at, seq LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, claims",
            )
            .await
            .map_err(db_err)?;
        let lease_until = now_ms + lease_ms;
        let claimed = join_all(wants.iter().map(|(sub, limit)| {
            let limit = *limit as i64;
            let claim = &claim;
            let client = &client;
            async move {
                client
                    .query(claim, &[sub, &now_ms, &limit, &lease_until])
                    .await
            }
        }))
        .await;
        let mut ids = Vec::new();
        let mut claims = std::collections::HashMap::new();
        for rows in claimed {
            for r in rows.map_err(db_err)? {
                let id: String = r.get(0);
                claims.insert(id.clone(), r.get::<_, i64>(1));
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let select = client
            .prepare_cached(&format!(
                "{OUTBOUND_SELECT} WHERE d.id = ANY($1) ORDER BY d.next_attempt_at, d.seq"
            ))
            .await
            .map_err(db_err)?;
        let rows = client.query(&select, &[&ids]).await.map_err(db_err)?;
        let mut parsed = std::collections::HashMap::new();
        rows.iter()
            .map(|r| {
                let mut o = outbound_parsed_once(r, &mut parsed)?;
                // Attempts were counted by the claim; its number fences
                // the result.
                o.claim = claims.get(&o.delivery_id).copied().unwrap_or(o.claim);
                o.attempts = o.attempts.saturating_sub(1);
                Ok(o)
            })
            .collect()
    }

    async fn finish_deliveries(&self, finished: Vec<Finished>) -> Result<(), StoreError> {
        expect_out!(self.write(Op::Finish(finished)).await?, Unit)
    }

    async fn endpoint_outcome(
        &self,
        subscription: &str,
        ok: bool,
        threshold: u32,
        now_ms: i64,
        pause_ms: i64,
    ) -> Result<EndpointHealth, StoreError> {
        if ok {
            self.query(super::shared::ENDPOINT_RECOVERED, &[&subscription])
                .await?;
            return Ok(EndpointHealth::default());
        }
        let threshold = i32::try_from(threshold).unwrap_or(i32::MAX);
        let rows = self
            .query(
                super::shared::ENDPOINT_FAILED,
                &[&subscription, &threshold, &now_ms, &pause_ms],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| corrupt("no endpoint health row"))?;
        Ok(super::shared::endpoint_health(
            i64::from(row.get::<_, i32>(0)),
            row.get(1),
            now_ms,
            pause_ms,
        ))
    }

    async fn endpoint_health(&self) -> Result<Vec<(String, EndpointHealth)>, StoreError> {
        Ok(self
            .query(super::shared::ENDPOINT_HEALTH, &[])
            .await?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    super::shared::endpoint_health(i64::from(r.get::<_, i32>(1)), r.get(2), 0, 0),
                )
            })
            .collect())
    }

    async fn purge_idempotency(&self, batch: usize) -> Result<usize, StoreError> {
        let cutoff = unix_now() - self.idempotency_ttl.as_secs() as i64;
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM idempotency WHERE ctid IN (SELECT ctid FROM idempotency WHERE created_at < $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&cutoff, &(batch as i64)],
            )
            .await
            .map_err(db_err)?;
        Ok(n as usize)
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryInfo>, StoreError> {
        self.query(
            &format!("{DELIVERY_SELECT} WHERE d.state = $1 ORDER BY d.seq LIMIT $2"),
            &[&state.as_str(), &(limit as i64)],
        )
        .await?
        .iter()
        .map(delivery)
        .collect()
    }

    async fn retry_delivery(&self, delivery_id: &str, actor: &str) -> Result<bool, StoreError> {
        expect_out!(
            self.write(Op::Retry {
                delivery_id: delivery_id.to_owned(),
                actor: actor.to_owned()
            })
            .await?,
            Bool
        )
    }

    async fn add_feedback(&self, feedback: Feedback) -> Result<FeedbackStored, StoreError> {
        expect_out!(self.write(Op::Feedback(feedback)).await?, Feedback)
    }

    async fn received_notice(
        &self,
        notice_id: &str,
        agency: &str,
    ) -> Result<Option<StoredNotice>, StoreError> {
        self.query(
            &format!("SELECT {NOTICE_COLUMNS} FROM notices n WHERE n.id = $1 AND EXISTS (SELECT 1 FROM deliveries d WHERE d.notice_id = $1 AND d.agency = $2)"),
            &[&notice_id, &agency],
        )
        .await?
        .first()
        .map(|r| notice_at(r, 0))
        .transpose()
    }

    async fn notice(&self, notice_id: &str) -> Result<Option<StoredNotice>, StoreError> {
        self.query(
            &format!("SELECT {NOTICE_COLUMNS} FROM notices n WHERE n.id = $1"),
            &[&notice_id],
        )
        .await?
        .first()
        .map(|r| notice_at(r, 0))
        .transpose()
    }

    async fn feedback_stats(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<AgencyFeedbackStats>, StoreError> {
        let rows = self
            .query(
                "SELECT d.agency, COUNT(DISTINCT n.id), COUNT(DISTINCT f.notice_id) \
                 FROM deliveries d JOIN notices n ON n.id = d.notice_id \
                 LEFT JOIN feedback f ON f.notice_id = n.id AND f.agency = d.agency \
                 WHERE n.kind IN ('punishment', 'incentive') AND n.issued_at >= $1 AND n.issued_at < $2 \
                 GROUP BY d.agency ORDER BY d.agency",
                &[&from, &to],
            )
            .await?;
        let feedback = rows
            .iter()
            .map(|r| {
                let notices = r.get::<_, i64>(1).max(0) as u64;
                let with = r.get::<_, i64>(2).max(0) as u64;
                AgencyFeedbackStats {
                    agency: r.get(0),
                    notices,
                    with_feedback: with,
                    feedback_rate: if notices == 0 {
                        0.0
                    } else {
                        with as f64 / notices as f64
                    },
                    deliveries: Default::default(),
                    reviews: 0,
                }
            })
            .collect();
        let deliveries = self
            .query(
                "SELECT d.agency, d.state, COUNT(*) FROM deliveries d JOIN notices n ON n.id = d.notice_id \
                 WHERE n.issued_at >= $1 AND n.issued_at < $2 GROUP BY d.agency, d.state",
                &[&from, &to],
            )
            .await?;
        let reviews = self
            .query(
                "SELECT agency, COUNT(*) FROM credit_reviews WHERE issued_at >= $1 AND issued_at < $2 GROUP BY agency",
                &[&from, &to],
            )
            .await?;
        Ok(super::shared::agency_stats(
            feedback,
            deliveries.iter().map(|r| (r.get(0), r.get(1), r.get(2))),
            reviews.iter().map(|r| (r.get(0), r.get(1))),
        ))
    }

    async fn seed_control(
        &self,
        items: Vec<Value>,
        participants: Vec<(String, Value)>,
        subscriptions: Vec<(String, Value)>,
    ) -> Result<ControlState, StoreError> {
        expect_out!(
            self.write(Op::Seed {
                items,
                participants,
                subscriptions
            })
            .await?,
            Control
        )
    }

    async fn item_versions(&self, item: &str) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = self
            .query(
                "SELECT v.version, v.created_at, v.created_by, v.reason, v.breaking, a.version IS NOT NULL \
                 FROM catalog_versions v LEFT JOIN catalog_active a ON a.item = v.item AND a.version = v.version \
                 WHERE v.item = $1 ORDER BY v.version",
                &[&item],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| VersionInfo {
                version: uint(r.get(0)),
                created_at: rfc3339(r.get(1)),
                created_by: r.get(2),
                reason: r.get(3),
                breaking: r.get(4),
                active: r.get(5),
            })
            .collect())
    }

    async fn item_version(&self, item: &str, version: u32) -> Result<Option<Value>, StoreError> {
        self.query(
            "SELECT definition FROM catalog_versions WHERE item = $1 AND version = $2",
            &[&item, &int(version)],
        )
        .await?
        .first()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(corrupt))
        .transpose()
    }

    async fn activate_item(
        &self,
        activation: ItemActivation,
    ) -> Result<ActivateOutcome, StoreError> {
        expect_out!(
            self.write(Op::Activate(Box::new(activation))).await?,
            Activate
        )
    }

    async fn put_document(
        &self,
        kind: DocKind,
        id: &str,
        body: Value,
        actor: &str,
        action: &str,
        details: Value,
    ) -> Result<(), StoreError> {
        let entry = AuditItem::single(actor, action, id, details);
        expect_out!(self.write(Op::Put { kind, body, entry }).await?, Unit)
    }

    async fn audit_page(
        &self,
        filter: AuditFilter,
    ) -> Result<Vec<crate::audit::Entry>, StoreError> {
        self.query(
            &filter.sql("::text"),
            &[
                &filter.after,
                &filter.before.unwrap_or(i64::MAX),
                &filter.actor,
                &filter.kind,
                &(filter.limit as i64),
            ],
        )
        .await?
        .iter()
        .map(audit_entry)
        .collect()
    }

    async fn checkpoint(&self) -> Result<Option<crate::audit::Checkpoint>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        // One instance at a time; the others skip this round.
        let mine: bool = run_one(
            &tx,
            "SELECT pg_try_advisory_xact_lock($1)",
            &[&LOCK_CHECKPOINT],
        )
        .await?
        .get(0);
        if !mine {
            return Ok(None);
        }
        let head = run_one(&tx, "SELECT seq, hash FROM audit_head WHERE id = 1", &[]).await?;
        let (seq, head_hash): (i64, String) = (head.get(0), head.get(1));
        let covered: i64 = run_one(
            &tx,
            "SELECT COALESCE(MAX(seq), 0) FROM audit_checkpoints",
            &[],
        )
        .await?
        .get(0);
        if seq == 0 || covered >= seq {
            return Ok(None);
        }
        let at = rfc3339(OffsetDateTime::now_utc());
        let cp = crate::audit::Checkpoint {
            seq,
            mac: crate::audit::checkpoint_mac(&self.audit_key, seq, &head_hash, &at),
            head_hash,
            at,
        };
        exec(
            &tx,
            "INSERT INTO audit_checkpoints (seq, head_hash, at, mac) VALUES ($1, $2, $3, $4)",
            &[&cp.seq, &cp.head_hash, &cp.at, &cp.mac],
        )
        .await?;
        tx.commit().await.map_err(db_err)?;
        Ok(Some(cp))
    }

    async fn department_stats(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<DepartmentStats>, StoreError> {
        let subs = self
            .query(
                "SELECT participant, item, SUM(accepted)::bigint, SUM(rejected)::bigint, rejection_codes, \
                 ((received_at AT TIME ZONE 'UTC') + interval '8 hours')::date \
                 FROM submissions WHERE received_at >= $1 AND received_at < $2 AND NOT historical GROUP BY 1, 2, 5, 6",
                &[&from, &to],
            )
            .await?;
        let records = self
            .query(
                "SELECT r.submitter, r.item, r.decision_date, ((r.received_at AT TIME ZONE 'UTC') + interval '8 hours')::date, COUNT(*) \
                 FROM records r JOIN submissions s ON s.id = r.submission_id \
                 WHERE r.received_at >= $1 AND r.received_at < $2 AND r.decision_date IS NOT NULL AND NOT s.historical GROUP BY 1, 2, 3, 4",
                &[&from, &to],
            )
            .await?;
        super::shared::department_stats(
            subs.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))),
            records
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))),
        )
    }

    async fn ready(&self) -> bool {
        self.writer.lock().map(|w| w.is_some()).unwrap_or(false)
            && self.query("SELECT 1", &[]).await.is_ok()
    }

    async fn close(&self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        let tasks: Vec<_> = self
            .writer_tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
        self.listener.abort();
    }
}

/// The active catalog item definitions, offline.
pub async fn active_items(opts: &PgOptions) -> Result<Vec<Value>, String> {
    let cfg = pg_config(opts).map_err(|e| e.to_string())?;
    let (client, conn) = cfg
        .connect(NoTls)
        .await
        .map_err(|e| connect_err(&cfg, &e))?;
    let conn = tokio::spawn(conn);
    let rows = client
        .query("SELECT v.definition FROM catalog_active a JOIN catalog_versions v ON v.item = a.item AND v.version = a.version ORDER BY a.item", &[])
        .await
        .map_err(|e| db_err(e).to_string())?;
    conn.abort();
    rows.iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(|e| e.to_string()))
        .collect()
}

/// Verifies the audit chain of a PostgreSQL database with its checkpoints.
pub async fn verify_audit(opts: &PgOptions, key: &[u8]) -> Result<crate::audit::Report, String> {
    let cfg = pg_config(opts).map_err(|e| e.to_string())?;
    let (client, conn) = cfg
        .connect(NoTls)
        .await
        .map_err(|e| connect_err(&cfg, &e))?;
    let conn = tokio::spawn(conn);
    let cps = client
        .query(
            "SELECT seq, head_hash, at, mac FROM audit_checkpoints ORDER BY seq",
            &[],
        )
        .await
        .map_err(|e| db_err(e).to_string())?
        .iter()
        .map(|r| crate::audit::Checkpoint {
            seq: r.get(0),
            head_hash: r.get(1),
            at: r.get(2),
            mac: r.get(3),
        })
        .collect::<Vec<_>>();
    // Entries stream to the verifier page by page: a long chain is never
    // held in memory.
    let (feed, entries) = mpsc::channel::<crate::audit::Entry>(10_000);
    let key = key.to_vec();
    let verifier = tokio::task::spawn_blocking(move || {
        let mut entries = entries;
        crate::audit::verify(
            std::iter::from_fn(move || entries.blocking_recv()),
            &cps,
            &key,
        )
    });
    let mut after = 0i64;
    let mut failed = None;
    'pages: loop {
        let page = match client
            .query(
                "SELECT seq, at, actor, action, subject, details, prev_hash, hash FROM audit WHERE seq > $1 ORDER BY seq LIMIT 10000",
                &[&after],
            )
            .await
        {
            Ok(p) => p,
            Err(e) => {
                failed = Some(db_err(e).to_string());
                break;
            }
        };
        if page.is_empty() {
            break;
        }
        for r in &page {
            let e = match audit_entry(r) {
                Ok(e) => e,
                Err(e) => {
                    failed = Some(e.to_string());
                    break 'pages;
                }
            };
            after = e.seq;
            if feed.send(e).await.is_err() {
                // The verifier stopped at a problem: no need to read on.
                break 'pages;
            }
        }
    }
    drop(feed);
    let report = verifier.await.map_err(|e| e.to_string())?;
    drop(client);
    conn.abort();
    match failed {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Throw-away databases for tests: created on the server that
/// `POSTGRES_TEST_URL` names (default
/// `postgres://postgres@127.0.0.1:5432/test`), dropped when the value is
/// dropped.
pub mod scratch {
    use tokio_postgres::NoTls;

    /// The server tests create their databases on.
    pub fn admin_url() -> String {
        std::env::var("POSTGRES_TEST_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    /// A database that exists as long as this value.
    #[derive(Debug)]
    pub struct ScratchDatabase {
        /// Its name.
        pub name: String,
        /// Its URL.
        pub url: String,
        /// The server's administrative URL it was created through.
        server: String,
    }

    async fn admin(server: &str, sql: String) -> Result<(), String> {
        let (client, conn) = tokio_postgres::connect(server, NoTls)
            .await
            .map_err(|e| format!("PostgreSQL at {server} is not reachable: {e}"))?;
        let conn = tokio::spawn(conn);
        let result = client.batch_execute(&sql).await.map_err(|e| e.to_string());
        drop(client);
        let _ = conn.await;
        result
    }

    impl ScratchDatabase {
        /// Creates a new, empty database.
        pub async fn create() -> Result<ScratchDatabase, String> {
            Self::create_on(&admin_url()).await
        }

        /// Creates a new, empty database on the server of `server` (a URL
        /// of an existing database there).
        pub async fn create_on(server: &str) -> Result<ScratchDatabase, String> {
            Self::create_with(server, "").await
        }

        /// Creates a copy of database `template` (nobody may be connected
        /// to it: retried for a few seconds while closed connections go).
        pub async fn copy_of(template: String) -> Result<ScratchDatabase, String> {
            let mut last = String::new();
            for _ in 0..50 {
                match Self::create_with(&admin_url(), &format!(" TEMPLATE {template}")).await {
                    Ok(db) => return Ok(db),
                    Err(e) => last = e,
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(last)
        }

        async fn create_with(server: &str, options: &str) -> Result<ScratchDatabase, String> {
            let name = format!("credgate_test_{}", uuid::Uuid::now_v7().simple());
            admin(server, format!("CREATE DATABASE {name}{options}")).await?;
            let prefix = server.rsplit_once('/').map_or(server, |(p, _)| p);
            Ok(ScratchDatabase {
                url: format!("{prefix}/{name}"),
                name,
                server: server.to_owned(),
            })
        }
    }

    impl Drop for ScratchDatabase {
        fn drop(&mut self) {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            let server = self.server.clone();
            // Dropped inside or outside a runtime: a thread of its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    let _ = rt.block_on(admin(&server, sql));
                }
            })
            .join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::with_notice;

    /// A connection of its own to `url`, as the store's pool makes them.
    async fn connect(url: &str) -> deadpool_postgres::ClientWrapper {
        let opts = PgOptions {
            url: url.to_owned(),
            pool_size: 1,
            statement_timeout: Duration::from_secs(30),
            group_commit_max: 1,
            idempotency_ttl: Duration::from_secs(3600),
        };
        let (client, conn) = pg_config(&opts)
            .expect("cfg")
            .connect(NoTls)
            .await
            .expect("connect");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        deadpool_postgres::ClientWrapper::new(client, conn)
    }

    /// A write holds at most `SUBJECT_LOCKS_MAX + 1` subject locks in the
    /// server's lock table, however many subjects it is about; one about
    /// more holds off every other write about a subject, and waits for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_holds_a_bounded_number_of_subject_locks() {
        let db = scratch::ScratchDatabase::create().await.expect("scratch");
        let (mut writer, mut other) = (connect(&db.url).await, connect(&db.url).await);
        let held = "SELECT classid::int4, objid::int8, mode FROM pg_locks \
                    WHERE locktype = 'advisory' AND pid = pg_backend_pid() \
                    ORDER BY classid, objid";
        let try_all = "SELECT pg_try_advisory_xact_lock($1, 0)";
        let try_all_shared = "SELECT pg_try_advisory_xact_lock_shared($1, 0)";
        for n in [1, 2, SUBJECT_LOCKS_MAX, SUBJECT_LOCKS_MAX + 1, 20_000] {
            let subjects: Vec<String> = (0..n).map(|i| format!("subject-{i}")).collect();
            let tx = writer.transaction().await.expect("begin");
            let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
            lock_subjects(&tx, &subjects).await.expect("locked");
            let locks: Vec<(i32, i64, String)> = tx
                .query(held, &[])
                .await
                .expect("pg_locks")
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            let all = (LOCK_ALL_SUBJECTS, 0, "ShareLock".to_owned());
            let probe = other.transaction().await.expect("begin");
            let (may_all, may_all_shared): (bool, bool) = (
                probe
                    .query_one(try_all, &[&LOCK_ALL_SUBJECTS])
                    .await
                    .expect("try")
                    .get(0),
                probe
                    .query_one(try_all_shared, &[&LOCK_ALL_SUBJECTS])
                    .await
                    .expect("try")
                    .get(0),
            );
            probe.rollback().await.expect("rollback");
            if n <= SUBJECT_LOCKS_MAX {
                assert_eq!(
                    locks.len(),
                    n + 1,
                    "{n} subjects: one lock each, and all shared"
                );
                assert_eq!(locks[0], all, "{n} subjects");
                assert!(
                    locks[1..]
                        .iter()
                        .all(|(class, _, mode)| *class == LOCK_SUBJECTS && mode == "ExclusiveLock"),
                    "{n} subjects: {locks:?}"
                );
                assert_eq!((may_all, may_all_shared), (false, true), "{n} subjects");
            } else {
                let all = (LOCK_ALL_SUBJECTS, 0, "ExclusiveLock".to_owned());
                assert_eq!(locks, [all], "{n} subjects: all at once");
                assert_eq!((may_all, may_all_shared), (false, false), "{n} subjects");
            }
            tx.rollback().await.expect("rollback");
        }
    }

    /// The race that per-agency positions exist for: transaction A
    /// inserts its delivery first (lower sequence number) but commits
    /// after transaction B. A reader between the two commits must not
    /// skip A's notice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_commit_with_an_earlier_sequence_is_not_skipped() {
        let db = scratch::ScratchDatabase::create().await.expect("scratch");
        let opts = PgOptions {
            url: db.url.clone(),
            pool_size: 4,
            statement_timeout: Duration::from_secs(30),
            group_commit_max: 16,
            idempotency_ttl: Duration::from_secs(3600),
        };
        let store = PgStore::open(
            opts.clone(),
            vec![7; 32],
            Arc::new(crate::metrics::Metrics::new()),
        )
        .await
        .expect("open");
        // Transaction A: everything but its end, held open.
        let mut manager_client = connect(&opts.url).await;
        let tx = manager_client.transaction().await.expect("begin");
        let (_, fx_a) = apply(
            &tx,
            &Op::Append(Box::new(with_notice("a", &[("agency-x", false)]))),
        )
        .await
        .expect("A's writes");
        // Transaction B inserts and commits meanwhile: a later sequence
        // number, an earlier commit.
        store
            .append_submission(with_notice("b", &[("agency-x", false)]))
            .await
            .expect("B commits");
        // (A sees its own rows and B's committed ones.)
        let seqs = tx
            .query("SELECT id, seq FROM deliveries ORDER BY seq", &[])
            .await
            .expect("seqs");
        let order: Vec<String> = seqs.iter().map(|r| r.get(0)).collect();
        assert_eq!(
            order,
            ["d-a-agency-x", "d-b-agency-x"],
            "A took the lower sequence number"
        );
        // A reader now sees B only…
        let first = store.pull("agency-x", 0, 10).await.expect("pull");
        assert_eq!(
            first
                .iter()
                .map(|o| o.delivery_id.as_str())
                .collect::<Vec<_>>(),
            ["d-b-agency-x"]
        );
        let cursor = first[0].position;
        // …(with the old global-sequence cursor, `seq > B's` would now skip
        // A for ever)…
        let b_seq: i64 = seqs[1].get(1);
        // …then A commits, and the reader's next page after its cursor has A.
        finish_transaction(&tx, fx_a).await.expect("A's end");
        tx.commit().await.expect("A commits");
        let next = store.pull("agency-x", cursor, 10).await.expect("pull");
        assert_eq!(
            next.iter()
                .map(|o| o.delivery_id.as_str())
                .collect::<Vec<_>>(),
            ["d-a-agency-x"]
        );
        assert_eq!(next[0].position, cursor + 1, "no gap");
        let old_scheme = store
            .query(
                "SELECT id FROM deliveries WHERE agency = 'agency-x' AND seq > $1",
                &[&b_seq],
            )
            .await
            .expect("old scheme");
        assert!(
            old_scheme.is_empty(),
            "the global sequence would have skipped A"
        );
        store.close().await;
        drop(store);
    }
}
