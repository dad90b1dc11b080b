//! SQLite store: one file in WAL mode with `synchronous=FULL`.
//!
//! A single writer thread owns the write connection and commits whatever
//! jobs are queued in one transaction (group commit: one fsync for many
//! concurrent requests). A job fails only on I/O or corrupt data (caller
//! input is validated before it reaches the store), and then the whole
//! group is rolled back and every caller in it is told that nothing was
//! stored; a caller is answered only after the group's commit returned.
//!
//! Reads run on separate connections, which WAL lets run alongside the
//! writer, in two bounded pools: one for ingest and delivery (look-ups,
//! pulls), one for people and the public (the public channel, the
//! console, administrators' listings), so that the second never delays
//! the first.
//!
//! Ordering: each pull delivery takes the next position of its agency's
//! stream (`agency_streams`) in the transaction that creates it, so every
//! agency's stream is gap-free and in commit order (see `crate::cursor`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde_json::Value;
use time::{Date, OffsetDateTime};
use tokio::sync::{mpsc, oneshot, watch};

use super::shared::{self, outcome_audit, parse_time, rfc3339, submission_audit, AuditItem};
use super::sqlite_control;
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
use crate::notice::EndReason;
use crate::redact::RecordBody;

/// Schema migrations, applied in order at start-up. Never edit a shipped
/// entry; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: submissions, records, idempotency
    r#"
    CREATE TABLE submissions (
        id            TEXT PRIMARY KEY,
        participant   TEXT NOT NULL,
        item          TEXT NOT NULL,
        item_version  INTEGER NOT NULL,
        received_at   TEXT NOT NULL,
        accepted      INTEGER NOT NULL,
        rejected      INTEGER NOT NULL,
        rejection_codes TEXT NOT NULL
    );
    CREATE INDEX submissions_participant ON submissions(participant, received_at);
    CREATE TABLE records (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        id            TEXT NOT NULL UNIQUE,
        submission_id TEXT NOT NULL REFERENCES submissions(id),
        item          TEXT NOT NULL,
        item_version  INTEGER NOT NULL,
        submitter     TEXT NOT NULL,
        subject_type  TEXT NOT NULL,
        subject_key   TEXT,
        decision_date TEXT,
        received_at   TEXT NOT NULL,
        body          TEXT NOT NULL,
        warnings      TEXT NOT NULL,
        status        TEXT NOT NULL DEFAULT 'active'
    );
    CREATE INDEX records_subject ON records(subject_key);
    CREATE TABLE idempotency (
        participant   TEXT NOT NULL,
        key           TEXT NOT NULL,
        request_hash  TEXT NOT NULL,
        status        INTEGER NOT NULL,
        response      BLOB NOT NULL,
        created_at    INTEGER NOT NULL,
        PRIMARY KEY (participant, key)
    );
    "#,
    // 2: notices, deliveries (outbox), pull positions, feedback, record end
    r#"
    ALTER TABLE records ADD COLUMN effective_until TEXT;
    ALTER TABLE records ADD COLUMN end_reason TEXT;
    ALTER TABLE records ADD COLUMN end_note TEXT;
    CREATE INDEX records_expiry ON records(effective_until) WHERE status = 'active' AND effective_until IS NOT NULL;
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
        effective_from  TEXT,
        effective_until TEXT,
        issued_at       TEXT NOT NULL,
        lifts           TEXT,
        reason          TEXT
    );
    CREATE INDEX notices_record ON notices(record_id);
    CREATE TABLE deliveries (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        id              TEXT NOT NULL UNIQUE,
        notice_id       TEXT NOT NULL REFERENCES notices(id),
        subscription    TEXT NOT NULL,
        agency          TEXT NOT NULL,
        mode            TEXT NOT NULL,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL DEFAULT 0,
        lease_until     INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT,
        created_at      TEXT NOT NULL,
        delivered_at    TEXT
    );
    CREATE INDEX deliveries_pull ON deliveries(agency, seq) WHERE mode = 'pull';
    CREATE INDEX deliveries_due ON deliveries(next_attempt_at) WHERE mode = 'push' AND state IN ('pending', 'inflight');
    CREATE INDEX deliveries_notice ON deliveries(notice_id, agency);
    CREATE INDEX deliveries_state ON deliveries(state, seq);
    CREATE TABLE pull_positions (
        agency      TEXT PRIMARY KEY,
        position    INTEGER NOT NULL,
        updated_at  TEXT NOT NULL
    );
    CREATE TABLE feedback (
        notice_id   TEXT NOT NULL REFERENCES notices(id),
        agency      TEXT NOT NULL,
        measure     TEXT NOT NULL,
        outcome     TEXT NOT NULL,
        date        TEXT,
        note        TEXT,
        received_at TEXT NOT NULL,
        PRIMARY KEY (notice_id, agency, measure)
    );
    "#,
    // 3: catalog versions, registry documents, audit chain
    super::sqlite_control::MIGRATION,
    // 4: no subject index until something queries by subject: its random
    // keys dirtied one index page per record on every commit.
    "DROP INDEX IF EXISTS records_subject;",
    // 5: fenced, per-subscription claims; an indexed idempotency purge.
    r#"
    ALTER TABLE deliveries ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
    DROP INDEX IF EXISTS deliveries_due;
    CREATE INDEX deliveries_due ON deliveries(subscription, next_attempt_at) WHERE mode = 'push' AND state IN ('pending', 'inflight');
    CREATE INDEX idempotency_created ON idempotency(created_at);
    "#,
    // 6: per-agency, gap-free stream positions for pull cursors. Existing
    // pull deliveries are numbered in sequence order, which was commit
    // order under the single writer, and acknowledged positions follow.
    r#"
    ALTER TABLE deliveries ADD COLUMN pos INTEGER;
    UPDATE deliveries SET pos = r.pos
      FROM (SELECT seq, ROW_NUMBER() OVER (PARTITION BY agency ORDER BY seq) AS pos FROM deliveries WHERE mode = 'pull') AS r
      WHERE deliveries.seq = r.seq;
    CREATE TABLE agency_streams (
        agency      TEXT PRIMARY KEY,
        last_pos    INTEGER NOT NULL
    );
    INSERT INTO agency_streams (agency, last_pos) SELECT agency, MAX(pos) FROM deliveries WHERE mode = 'pull' GROUP BY agency;
    UPDATE pull_positions SET position = COALESCE(
      (SELECT MAX(d.pos) FROM deliveries d WHERE d.agency = pull_positions.agency AND d.mode = 'pull' AND d.seq <= pull_positions.position), 0);
    DROP INDEX IF EXISTS deliveries_pull;
    CREATE UNIQUE INDEX deliveries_pull ON deliveries(agency, pos) WHERE mode = 'pull';
    "#,
    // 7: push endpoint health, in the database rather than in memory.
    r#"
    CREATE TABLE endpoint_health (
        subscription TEXT PRIMARY KEY,
        failures     INTEGER NOT NULL,
        paused_until INTEGER NOT NULL
    );
    "#,
    // 8: the record's life: natural keys (records stored before have
    // none and are not matched), revisions, removal documents.
    r#"
    ALTER TABLE records ADD COLUMN natural_key TEXT;
    ALTER TABLE records ADD COLUMN content_hash TEXT;
    ALTER TABLE records ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE records ADD COLUMN removal TEXT;
    CREATE UNIQUE INDEX records_natural_key ON records(item, natural_key);
    ALTER TABLE notices ADD COLUMN corrects TEXT;
    ALTER TABLE records ADD COLUMN level TEXT;
    ALTER TABLE submissions ADD COLUMN historical INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE notices ADD COLUMN historical INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX records_subject ON records(subject_key, item) WHERE subject_key IS NOT NULL;
    CREATE TABLE record_revisions (
        record_id     TEXT NOT NULL REFERENCES records(id),
        revision      INTEGER NOT NULL,
        item_version  INTEGER NOT NULL,
        body          TEXT NOT NULL,
        warnings      TEXT NOT NULL,
        replaced_at   TEXT NOT NULL,
        replaced_by   TEXT NOT NULL,
        reason        TEXT,
        PRIMARY KEY (record_id, revision)
    );
    "#,
    // 9: issued credit review reports, findable by subject (who looked a
    // subject up).
    r#"
    CREATE TABLE credit_reviews (
        id            TEXT PRIMARY KEY,
        agency        TEXT NOT NULL,
        subject_key   TEXT NOT NULL,
        purpose       TEXT NOT NULL,
        issued_at     TEXT NOT NULL,
        document      BLOB NOT NULL
    );
    CREATE INDEX credit_reviews_subject ON credit_reviews(subject_key, issued_at);
    "#,
    // 10: credit grades: rule set versions, each subject's grade, and
    // what a grade_change notice says.
    r#"
    CREATE TABLE grade_rules (
        version       INTEGER PRIMARY KEY,
        document      TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        created_by    TEXT NOT NULL,
        reason        TEXT
    );
    CREATE TABLE subject_grades (
        subject_key   TEXT PRIMARY KEY,
        grade         TEXT NOT NULL,
        rule          TEXT NOT NULL,
        rules_version INTEGER NOT NULL,
        region        TEXT,
        review_after  TEXT,
        assessed_at   TEXT NOT NULL
    );
    CREATE INDEX subject_grades_due ON subject_grades(review_after) WHERE review_after IS NOT NULL;
    ALTER TABLE notices ADD COLUMN grade TEXT;
    "#,
    // 11: the public channel: each published record's public id and
    // publicity period, stamped at acceptance.
    r#"
    ALTER TABLE records ADD COLUMN public_id TEXT;
    ALTER TABLE records ADD COLUMN publicity_rule TEXT;
    ALTER TABLE records ADD COLUMN publicity_start TEXT;
    ALTER TABLE records ADD COLUMN publicity_end TEXT;
    CREATE UNIQUE INDEX records_public_id ON records(public_id) WHERE public_id IS NOT NULL;
    CREATE INDEX records_publicity ON records(publicity_end, decision_date) WHERE public_id IS NOT NULL;
    "#,
    // 12: grade marks: every change to a subject's records gives the
    // subject a new mark (a number never given before) in the same
    // transaction; the grader deletes the mark it read before the records
    // it assessed, if it is still the subject's. A subject with a mark is
    // assessed at the next start (or after the grader's backlog
    // overflowed): no change is left ungraded by a restart or a crash.
    // Only ungraded subjects have a row, so the table stays small and its
    // pages stay in the cache.
    r#"
    CREATE TABLE grade_marks (
        subject_key TEXT PRIMARY KEY,
        mark        INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE grade_mark_seq (n INTEGER NOT NULL);
    INSERT INTO grade_mark_seq (n) VALUES (0);
    CREATE TRIGGER records_grade_marks_insert AFTER INSERT ON records WHEN NEW.subject_key IS NOT NULL BEGIN
        UPDATE grade_mark_seq SET n = n + 1;
        INSERT INTO grade_marks (subject_key, mark) VALUES (NEW.subject_key, (SELECT n FROM grade_mark_seq))
            ON CONFLICT (subject_key) DO UPDATE SET mark = excluded.mark;
    END;
    CREATE TRIGGER records_grade_marks_update AFTER UPDATE ON records BEGIN
        UPDATE grade_mark_seq SET n = n + 1;
        INSERT INTO grade_marks (subject_key, mark) SELECT NEW.subject_key, (SELECT n FROM grade_mark_seq) WHERE NEW.subject_key IS NOT NULL
            ON CONFLICT (subject_key) DO UPDATE SET mark = excluded.mark;
        INSERT INTO grade_marks (subject_key, mark) SELECT OLD.subject_key, (SELECT n FROM grade_mark_seq) WHERE OLD.subject_key IS NOT NULL AND OLD.subject_key IS NOT NEW.subject_key
            ON CONFLICT (subject_key) DO UPDATE SET mark = excluded.mark;
    END;
    "#,
];

/// What a job tells the writer besides its result.
struct JobDone {
    /// The job succeeded (otherwise the group is rolled back and its other
    /// jobs run again without it).
    ok: bool,
    /// It failed only because a natural key was taken since its caller's
    /// look-up (a concurrent submission of the same record): an expected
    /// race, answered by a new look-up, not an operator's concern.
    key_race: bool,
    /// The job created deliveries: wake pullers and push workers.
    wake: bool,
    /// Answers the caller once the group's commit is known.
    reply: Reply,
}

/// Answers a job's caller with the outcome of the commit.
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A unit of work for the writer thread. It may run twice: when another
/// job of its group fails, the group is rolled back and the survivors run
/// again, each in its own savepoint.
type Job = Box<dyn FnMut(&Connection, &mut Vec<AuditItem>) -> JobDone + Send>;

/// The embedded SQLite store.
pub struct SqliteStore {
    /// Queue to the writer thread; `None` once closed.
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    /// Joined on close so the last group is committed before exit.
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Reads on the way of ingest and delivery (look-ups, pulls).
    reads: ReadPool,
    /// Reads for people and the public (the public channel, the console,
    /// administrators' listings and statistics): apart, so that a burst
    /// of them or a slow aggregate never delays a look-up.
    queries: ReadPool,
    /// Database file (its audit checkpoint file sits beside it).
    path: PathBuf,
    /// How long idempotency keys are kept.
    idempotency_ttl: Duration,
    /// Bumped after every commit that created deliveries.
    changes: watch::Receiver<u64>,
    /// Key of the audit checkpoints' MACs.
    audit_key: Vec<u8>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// A write's error, telling a natural key taken since it was looked up
/// apart from other failures.
fn key_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, Some(msg))
            if f.code == rusqlite::ErrorCode::ConstraintViolation
                && msg.contains("records.natural_key") =>
        {
            StoreError::KeyTaken
        }
        _ => db_err(e),
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// WAL frames after which the writer checkpoints itself (64 MiB of 4 KiB
/// pages): the background checkpointer keeps the WAL far below this.
const WAL_CAP_PAGES: u32 = 16_384;

/// The columns [`stored_record`] decodes.
const RECORD_SELECT: &str = "SELECT id, item, item_version, submitter, subject_type, decision_date, effective_until, received_at, body, warnings, status, end_reason, removal, revision FROM records";

/// A row of [`RECORD_SELECT`]; the inner error for stored text that does
/// not decode.
fn stored_record(r: &Row<'_>) -> rusqlite::Result<Result<StoredRecord, StoreError>> {
    let decoded = |received: String, body: String, warnings: String, removal: Option<String>| {
        Ok::<_, StoreError>((
            parse_time(&received)?,
            RecordBody::from_store(serde_json::from_str(&body).map_err(corrupt)?),
            serde_json::from_str(&warnings).map_err(corrupt)?,
            removal
                .map(|r| serde_json::from_str(&r))
                .transpose()
                .map_err(corrupt)?,
        ))
    };
    let (received_at, body, warnings, removal) =
        match decoded(r.get(7)?, r.get(8)?, r.get(9)?, r.get(12)?) {
            Ok(fields) => fields,
            Err(e) => return Ok(Err(e)),
        };
    Ok(Ok(StoredRecord {
        id: r.get(0)?,
        item: r.get(1)?,
        item_version: r.get(2)?,
        submitter: r.get(3)?,
        subject_type: r.get(4)?,
        decision_date: parse_date(r.get(5)?),
        effective_until: parse_date(r.get(6)?),
        received_at,
        body,
        warnings,
        status: r.get(10)?,
        end_reason: r.get(11)?,
        removal,
        revision: r.get(13)?,
    }))
}

/// Runs WAL checkpoints on its own connection and thread, so copying WAL
/// pages into the database file never delays the writer's next commit.
/// The connection is opened by the caller: SQLite can deadlock when one
/// thread opens a file while another closes a connection to it.
fn checkpointer(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    loop {
        match stop.recv_timeout(Duration::from_millis(500)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// Executes a statement through the connection's statement cache.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// `query_row` through the connection's statement cache (rusqlite's own
/// `query_row` parses the SQL on every call).
fn cached_row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

/// Page cache of the offline tools' connection (`store migrate`).
const OFFLINE_PAGE_CACHE_MIB: usize = 64;

/// Opens a connection with a page cache of at most `page_cache_mib` MiB.
fn open_connection(path: &Path, page_cache_mib: usize) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    // Plans must not depend on bound values. Otherwise SQLite (3.4x and
    // later) plans `LIMIT ?n` with the bound number and expires the
    // statement whenever it is bound again: every pull, claim and listing
    // was parsed and planned anew on each run (9 % of gateway CPU under
    // `fanout`, #14). No query here relies on a bound value to pick an
    // index (partial indexes are matched by literals).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(db_err)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000; PRAGMA temp_store=MEMORY; PRAGMA cache_size=-{};",
        page_cache_mib.max(1) * 1024
    ))
    .map_err(db_err)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);",
    )
    .map_err(db_err)?;
    let current: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if current > MIGRATIONS.len() as i64 {
        return Err(StoreError::Database(format!(
            "database schema version {current} is newer than this credgate ({}); refusing to start",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction().map_err(db_err)?;
        tx.execute_batch(sql).map_err(db_err)?;
        exec(
            &tx,
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![i as i64 + 1, now_text()],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
    }
    Ok(())
}

fn now_text() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn parse_date(s: Option<String>) -> Option<Date> {
    s.as_deref().and_then(crate::codes::parse_iso_date)
}

/// Brings the database at `path` to this release's schema, on one
/// connection and no threads (offline tools: `store migrate`).
pub fn upgrade(path: &Path) -> Result<(), StoreError> {
    let mut conn = open_connection(path, OFFLINE_PAGE_CACHE_MIB)?;
    migrate(&mut conn)
}

impl SqliteStore {
    /// Opens (creating if needed) `path`, runs migrations and starts the
    /// writer thread. Push deliveries left in flight by a previous process
    /// are put back in the queue. Each connection keeps a page cache of at
    /// most `options.page_cache_mib` MiB.
    pub fn open(
        path: &Path,
        options: &SqliteOptions,
        audit_key: Vec<u8>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<SqliteStore, StoreError> {
        let SqliteOptions {
            group_commit_max,
            read_connections,
            query_connections,
            page_cache_mib,
            idempotency_ttl,
        } = *options;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Database(format!("{}: {e}", dir.display())))?;
        }
        let mut conn = open_connection(path, page_cache_mib)?;
        migrate(&mut conn)?;
        // One process owns an SQLite store, so every lease is from a dead
        // predecessor: its attempts may or may not have arrived, and
        // receivers deduplicate by webhook-id.
        conn.execute(
            "UPDATE deliveries SET state = 'pending', lease_until = 0, next_attempt_at = 0 WHERE state = 'inflight'",
            [],
        )
        .map_err(db_err)?;
        let reads = ReadPool::open(path, read_connections, page_cache_mib)?;
        let queries = ReadPool::open(path, query_connections, page_cache_mib)?;
        let (tx, rx) = mpsc::channel(group_commit_max.max(1) * 4);
        let (changes_tx, changes) = watch::channel(0u64);
        // Checkpoints run on their own thread. Should the writer outpace
        // it (a bulk import), the WAL would never restart and grow without
        // bound, every commit writing to new, zero-filled file pages; past
        // WAL_CAP_PAGES the writer checkpoints itself after a commit.
        conn.execute_batch(&format!("PRAGMA wal_autocheckpoint={WAL_CAP_PAGES};"))
            .map_err(db_err)?;
        let (stop_checkpoints, stopped) = std::sync::mpsc::channel::<()>();
        let checkpoint_conn = open_connection(path, page_cache_mib)?;
        std::thread::Builder::new()
            .name("credgate-store-checkpointer".into())
            .spawn(move || checkpointer(checkpoint_conn, stopped))
            .map_err(|e| StoreError::Database(format!("cannot start checkpointer thread: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("credgate-store-writer".into())
            .spawn(move || {
                writer_loop(conn, rx, group_commit_max.max(1), changes_tx, &metrics);
                drop(stop_checkpoints);
            })
            .map_err(|e| StoreError::Database(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            reads,
            queries,
            path: path.to_owned(),
            idempotency_ttl,
            changes,
            audit_key,
        })
    }

    /// Runs `f` in the writer's next group; answers after the commit.
    /// `wake`: whether a success gives delivery something to do.
    async fn write<T, F>(&self, wake: bool, mut f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &mut Vec<AuditItem>) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_waking(move |sp, audit| f(sp, audit).map(|t| (t, wake)))
            .await
    }

    /// [`SqliteStore::write`] for a job that itself tells whether it gave
    /// delivery something to do.
    async fn write_waking<T, F>(&self, mut f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &mut Vec<AuditItem>) -> Result<(T, bool), StoreError>
            + Send
            + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        // Shared by every run of the job; the run whose outcome is final
        // answers. Dropped unanswered, the caller gets `Unavailable`.
        let reply_tx = Arc::new(Mutex::new(Some(reply_tx)));
        let job: Job = Box::new(move |sp, audit| {
            let (result, wake) = match f(sp, audit) {
                Ok((t, wake)) => (Ok(t), wake),
                Err(e) => (Err(e), false),
            };
            let ok = result.is_ok();
            let key_race = matches!(result, Err(StoreError::KeyTaken));
            let reply_tx = reply_tx.clone();
            JobDone {
                ok,
                key_race,
                wake,
                reply: Box::new(move |commit| {
                    if let Some(tx) = reply_tx.lock().ok().and_then(|mut t| t.take()) {
                        let _ = tx.send(commit.and(result));
                    }
                }),
            }
        });
        let sender = self
            .writer
            .lock()
            .map_err(|_| StoreError::Unavailable)?
            .clone()
            .ok_or(StoreError::Unavailable)?;
        sender
            .send(job)
            .await
            .map_err(|_| StoreError::Unavailable)?;
        reply_rx.await.map_err(|_| StoreError::Unavailable)?
    }

    /// The keys `sql` lists (`?1`: the key to start after, `?2`: how many
    /// at most), on a read connection.
    async fn keys_after(
        &self,
        sql: &'static str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let after = after.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
            let rows = stmt
                .query_map(params![after, limit as i64], |r| r.get(0))
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
        .await
    }

    /// Runs `f` on a read connection of ingest and delivery, off the
    /// async runtime.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.reads.run(f).await
    }

    /// Runs `f` on a read connection for people and the public.
    async fn read_query<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.queries.run(f).await
    }
}

/// How an SQLite store is sized (the `[store]` settings).
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    /// Most jobs committed in one transaction.
    pub group_commit_max: usize,
    /// Read connections of ingest and delivery.
    pub read_connections: usize,
    /// Read connections of the public channel, the console and
    /// administrators' listings.
    pub query_connections: usize,
    /// Page cache of each connection, MiB.
    pub page_cache_mib: usize,
    /// How long idempotency keys are kept.
    pub idempotency_ttl: Duration,
}

impl SqliteOptions {
    /// The options `[store]` sets.
    pub fn from_config(store: &crate::config::StoreConfig) -> SqliteOptions {
        SqliteOptions {
            group_commit_max: store.group_commit_max,
            read_connections: store.read_connections,
            query_connections: store.query_connections,
            page_cache_mib: store.page_cache_mib,
            idempotency_ttl: Duration::from_secs(store.idempotency_ttl_hours * 3600),
        }
    }
}

impl Default for SqliteOptions {
    fn default() -> SqliteOptions {
        SqliteOptions::from_config(&crate::config::StoreConfig::default())
    }
}

/// Read connections and one permit per connection: reads beyond their
/// number wait for one rather than opening more (each has its own cache,
/// statements and blocking thread).
struct ReadPool {
    idle: Arc<Mutex<Vec<Connection>>>,
    slots: Arc<tokio::sync::Semaphore>,
    /// For opening a connection again after one was lost.
    path: Arc<Path>,
    page_cache_mib: usize,
}

impl ReadPool {
    fn open(
        path: &Path,
        connections: usize,
        page_cache_mib: usize,
    ) -> Result<ReadPool, StoreError> {
        let connections = connections.max(1);
        let idle = (0..connections)
            .map(|_| open_connection(path, page_cache_mib))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReadPool {
            idle: Arc::new(Mutex::new(idle)),
            slots: Arc::new(tokio::sync::Semaphore::new(connections)),
            path: path.into(),
            page_cache_mib,
        })
    }

    /// Runs `f` on one of the pool's connections off the async runtime.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (pool, path, page_cache_mib) =
            (self.idle.clone(), self.path.clone(), self.page_cache_mib);
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable)?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let conn = match pool.lock().map_err(|_| StoreError::Unavailable)?.pop() {
                Some(c) => c,
                // Only after a connection was lost (a panic in `f`).
                None => open_connection(&path, page_cache_mib)?,
            };
            let result = f(&conn);
            if let Ok(mut idle) = pool.lock() {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Database(format!("read task failed: {e}")))?
    }
}

/// The records of `item` holding any of the natural keys `keys`.
fn key_holders(
    conn: &Connection,
    item: &str,
    keys: &[String],
) -> Result<Vec<KeyHolder>, StoreError> {
    // One indexed point query per distinct key. `IN (SELECT value FROM
    // json_each(?))` built an ephemeral table on every call, which cost
    // more than the look-ups themselves (#14, callgrind).
    let mut stmt = conn
        .prepare_cached(
            "SELECT natural_key, id, content_hash, submitter FROM records \
             WHERE item = ?1 AND natural_key = ?2",
        )
        .map_err(db_err)?;
    let mut holders = Vec::new();
    for key in distinct(keys) {
        let rows = stmt
            .query_map(params![item, key], |r| {
                Ok(KeyHolder {
                    natural_key: r.get(0)?,
                    record_id: r.get(1)?,
                    content_hash: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    submitter: r.get(3)?,
                })
            })
            .map_err(db_err)?;
        for row in rows {
            holders.push(row.map_err(db_err)?);
        }
    }
    Ok(holders)
}

/// Both look-ups of a submission on `conn`. Empty lists make no queries:
/// both loop over them.
fn look_up(
    conn: &Connection,
    lookups: &SubmissionLookups,
) -> Result<(Vec<KeyHolder>, Vec<SubjectRecord>), StoreError> {
    Ok((
        key_holders(conn, &lookups.item, &lookups.keys)?,
        records_of_subjects(conn, &lookups.subjects, &lookups.items)?,
    ))
}

/// `values` without repeats, in their first order.
fn distinct(values: &[String]) -> impl Iterator<Item = &String> {
    let mut seen = HashSet::with_capacity(values.len());
    values.iter().filter(move |v| seen.insert(v.as_str()))
}

/// The records of `items` about any of `subjects`: one indexed point query
/// per (subject, item) pair, on `records_subject`.
fn records_of_subjects(
    conn: &Connection,
    subjects: &[String],
    items: &[String],
) -> Result<Vec<SubjectRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, subject_key, item, status, level, decision_date FROM records \
             WHERE subject_key = ?1 AND item = ?2",
        )
        .map_err(db_err)?;
    let items: Vec<&String> = distinct(items).collect();
    let mut found = Vec::new();
    for subject in distinct(subjects) {
        for item in &items {
            let rows = stmt
                .query_map(params![subject, item], |r| {
                    Ok(SubjectRecord {
                        record_id: r.get(0)?,
                        subject_key: r.get(1)?,
                        item: r.get(2)?,
                        status: r.get(3)?,
                        level: r
                            .get::<_, Option<String>>(4)?
                            .as_deref()
                            .and_then(Severity::parse),
                        decision_date: parse_date(r.get(5)?),
                    })
                })
                .map_err(db_err)?;
            for row in rows {
                found.push(row.map_err(db_err)?);
            }
        }
    }
    Ok(found)
}

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    group_max: usize,
    changes: watch::Sender<u64>,
    metrics: &crate::metrics::Metrics,
) {
    let mut group: Vec<Job> = Vec::with_capacity(group_max);
    while let Some(job) = rx.blocking_recv() {
        group.push(job);
        while group.len() < group_max {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let jobs = group.len();
        let m = metrics;
        m.store_commits.inc();
        m.store_group_size.observe(jobs as f64);
        if commit_group(&mut conn, &mut group) {
            changes.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
    // Channel closed: every queued job has been committed. Checkpoint the
    // WAL so the database file is complete on its own.
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        tracing::warn!(error = %e, "final WAL checkpoint failed");
    }
}

/// Commits one group; returns whether a job asked to wake delivery.
///
/// The fast path runs every job in one transaction without savepoints
/// (each costs statement parsing and page sub-journaling). If a job fails,
/// the group is rolled back, that job's caller alone is told nothing was
/// stored, and the other jobs run again in a new transaction, each in its
/// own savepoint: one poison job costs only its own caller a 503.
fn commit_group(conn: &mut Connection, group: &mut Vec<Job>) -> bool {
    let mut jobs: Vec<Job> = std::mem::take(group);
    let (failed_at, key_race) = match run_group(conn, &mut jobs) {
        Ok(wake) => return wake,
        Err(None) => return false,
        Err(Some(failed)) => failed,
    };
    // The poison job's reply has been sent; drop it and retry the rest.
    drop(jobs.remove(failed_at));
    if jobs.is_empty() {
        return false;
    }
    shared::log_group_retry(jobs.len(), key_race);
    run_group_isolated(conn, &mut jobs)
}

/// Answers every reply with the commit's outcome.
fn answer(replies: Vec<Reply>, outcome: Result<(), String>) {
    for reply in replies {
        reply(outcome.clone().map_err(StoreError::Database));
    }
}

/// Fast path: `Ok(wake)` when all committed; `Err(Some((i, key_race)))`
/// when job `i` failed, and whether only on a taken natural key (its
/// caller is answered, the rest are not, nothing committed);
/// `Err(None)` when the transaction could not begin or commit (everyone
/// answered).
fn run_group(conn: &mut Connection, jobs: &mut [Job]) -> Result<bool, Option<(usize, bool)>> {
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "cannot begin a write transaction");
            // Dropping the jobs unrun answers their callers `Unavailable`.
            return Err(None);
        }
    };
    let mut replies: Vec<Reply> = Vec::with_capacity(jobs.len());
    let mut wake = false;
    let mut audit = Vec::new();
    for (i, job) in jobs.iter_mut().enumerate() {
        let done = job(&tx, &mut audit);
        if !done.ok {
            drop(tx);
            (done.reply)(Ok(()));
            return Err(Some((i, done.key_race)));
        }
        wake |= done.wake;
        replies.push(done.reply);
    }
    // The group's hot-path audit items (submissions, delivery outcomes)
    // become one chained entry per action, in the same transaction.
    let outcome = sqlite_control::write_audit(&tx, audit)
        .map_err(|e| e.to_string())
        .and_then(|()| tx.commit().map_err(|e| e.to_string()));
    if let Err(msg) = &outcome {
        tracing::error!(error = %msg, "group commit failed; nothing in the group was acknowledged");
        answer(replies, outcome);
        return Err(None);
    }
    answer(replies, Ok(()));
    Ok(wake)
}

/// Slow path after a failure: each job in its own savepoint, so a failing
/// job rolls back only its own changes.
fn run_group_isolated(conn: &mut Connection, jobs: &mut [Job]) -> bool {
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "cannot begin a write transaction");
            return false;
        }
    };
    let mut replies: Vec<Reply> = Vec::with_capacity(jobs.len());
    let mut wake = false;
    let mut audit = Vec::new();
    for job in jobs.iter_mut() {
        let queued = audit.len();
        let mut sp = match tx.savepoint() {
            Ok(sp) => sp,
            Err(e) => {
                tracing::error!(error = %e, "cannot open a savepoint");
                return false;
            }
        };
        let done = job(&sp, &mut audit);
        if done.ok {
            if let Err(e) = sp.commit() {
                tracing::error!(error = %e, "cannot release a savepoint");
                return false;
            }
            wake |= done.wake;
            replies.push(done.reply);
        } else {
            let _ = sp.rollback();
            drop(sp);
            audit.truncate(queued);
            (done.reply)(Ok(()));
        }
    }
    let outcome = sqlite_control::write_audit(&tx, audit)
        .map_err(|e| e.to_string())
        .and_then(|()| tx.commit().map_err(|e| e.to_string()));
    let ok = outcome.is_ok();
    if let Err(msg) = &outcome {
        tracing::error!(error = %msg, "group commit failed; nothing in the group was acknowledged");
    }
    answer(replies, outcome);
    ok && wake
}

// === impl writes ===

fn append_submission(
    tx: &Connection,
    sub: &NewSubmission,
    audit: &mut Vec<AuditItem>,
) -> Result<AppendOutcome, StoreError> {
    if let Some(claim) = &sub.idempotency {
        let earlier = tx
            .query_row(
                "SELECT request_hash, status, response FROM idempotency WHERE participant = ?1 AND key = ?2",
                params![sub.participant, claim.key],
                |r| {
                    Ok(StoredResponse {
                        request_hash: r.get(0)?,
                        status: r.get::<_, u16>(1)?,
                        body: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(db_err)?;
        if let Some(earlier) = earlier {
            return Ok(AppendOutcome::Replay(earlier));
        }
        exec(tx,
            "INSERT INTO idempotency (participant, key, request_hash, status, response, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![sub.participant, claim.key, claim.request_hash, sub.response_status, sub.response_body, unix_now()],
        )
        .map_err(db_err)?;
    }
    let received = rfc3339(sub.received_at);
    let codes = serde_json::to_string(&sub.rejection_codes).map_err(corrupt)?;
    exec(tx,
        "INSERT INTO submissions (id, participant, item, item_version, received_at, accepted, rejected, rejection_codes, historical) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![sub.id, sub.participant, sub.item, sub.item_version, received, sub.records.len() as i64, sub.rejected as i64, codes, sub.historical],
    )
    .map_err(db_err)?;
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO records (id, submission_id, item, item_version, submitter, subject_type, subject_key, decision_date, received_at, body, warnings, effective_until, natural_key, content_hash, level, status, end_reason, removal, public_id, publicity_rule, publicity_start, publicity_end) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
        )
        .map_err(db_err)?;
    for r in &sub.records {
        stmt.execute(params![
            r.id,
            sub.id,
            sub.item,
            sub.item_version,
            sub.participant,
            r.subject_type,
            r.subject_key,
            r.decision_date.map(|d| d.to_string()),
            received,
            r.body,
            r.warnings,
            r.effective_until.map(|d| d.to_string()),
            r.natural_key,
            r.content_hash,
            r.level.map(|l| l.as_str()),
            r.ended
                .as_ref()
                .map_or("active", |e| e.reason.record_status()),
            r.ended.as_ref().map(|e| e.reason.as_str()),
            r.ended.as_ref().and_then(|e| e.removal.as_deref()),
            r.publicity.as_ref().map(|p| p.public_id.as_str()),
            r.publicity.as_ref().map(|p| p.stamp.rule_set.as_str()),
            r.publicity.as_ref().map(|p| p.stamp.start.to_string()),
            r.publicity.as_ref().map(|p| p.stamp.end.to_string()),
        ])
        .map_err(key_err)?;
        if let Some(n) = &r.notice {
            insert_notice(
                tx,
                n,
                &sub.item,
                sub.item_version,
                &r.id,
                &sub.participant,
                &received,
            )?;
        }
    }
    audit.push(submission_audit(sub));
    for r in &sub.records {
        if let (Some(removes), Some(subject)) = (&r.removes, &r.subject_key) {
            for listed in subject_listings(tx, subject, &removes.items)? {
                let ending = Ending {
                    removal: Some(removes.removal.clone()),
                    on: removes.on,
                    ..Ending::new(EndReason::Removed)
                };
                end_record(tx, &listed, &ending, &sub.participant, audit)?;
            }
        }
    }
    Ok(AppendOutcome::Stored)
}

/// The active records of `items` about `subject`.
fn subject_listings(
    tx: &Connection,
    subject: &str,
    items: &[String],
) -> Result<Vec<String>, StoreError> {
    let items = serde_json::to_string(items).map_err(corrupt)?;
    let mut stmt = tx
        .prepare_cached(
            "SELECT id FROM records WHERE subject_key = ?1 AND item IN (SELECT value FROM json_each(?2)) AND status = 'active'",
        )
        .map_err(db_err)?;
    let rows = stmt
        .query_map(params![subject, items], |r| r.get(0))
        .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

/// Takes the next position of an agency's pull stream.
const NEXT_POSITION: &str = "INSERT INTO agency_streams (agency, last_pos) VALUES (?1, 1) \
     ON CONFLICT(agency) DO UPDATE SET last_pos = last_pos + 1 RETURNING last_pos";

fn insert_notice(
    tx: &Connection,
    n: &NewNotice,
    item: &str,
    item_version: u32,
    record_id: &str,
    source: &str,
    issued_at: &str,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO notices (id, kind, item, item_version, record_id, source, severity, region, measures, effective_from, effective_until, issued_at, lifts, reason, corrects, historical, grade) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )
    .map_err(db_err)?
    .execute(params![
        n.id,
        n.kind.as_str(),
        item,
        item_version,
        record_id,
        source,
        n.severity.as_str(),
        n.region,
        serde_json::to_string(&n.measures).map_err(corrupt)?,
        n.effective_from.map(|d| d.to_string()),
        n.effective_until.map(|d| d.to_string()),
        issued_at,
        n.lifts,
        n.reason,
        n.corrects,
        n.historical,
        n.grade
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt)?,
    ])
    .map_err(db_err)?;
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO deliveries (id, notice_id, subscription, agency, mode, state, created_at, pos) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7)",
        )
        .map_err(db_err)?;
    let mut next_pos = tx.prepare_cached(NEXT_POSITION).map_err(db_err)?;
    for d in &n.deliveries {
        let pos: Option<i64> = if d.push {
            None
        } else {
            Some(
                next_pos
                    .query_row([&d.agency], |r| r.get(0))
                    .map_err(db_err)?,
            )
        };
        stmt.execute(params![
            d.id,
            n.id,
            d.subscription,
            d.agency,
            if d.push { "push" } else { "pull" },
            issued_at,
            pos
        ])
        .map_err(db_err)?;
    }
    Ok(())
}

/// Ends a record and creates the lift notices. Returns `None` when the
/// record does not exist.
fn end_record(
    tx: &Connection,
    record_id: &str,
    ending: &Ending,
    actor: &str,
    audit: &mut Vec<AuditItem>,
) -> Result<EndOutcome, StoreError> {
    let status: Option<String> = tx
        .query_row(
            "SELECT status FROM records WHERE id = ?1",
            [record_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?;
    match status.as_deref() {
        None => return Ok(EndOutcome::NotFound),
        Some("active") => {}
        Some(other) => return Ok(EndOutcome::AlreadyEnded(other.to_owned())),
    }
    let status = ending.reason.record_status();
    let reason = ending.reason.as_str();
    exec(
        tx,
        "UPDATE records SET status = ?2, end_reason = ?3, end_note = ?4, removal = ?5 WHERE id = ?1",
        params![record_id, status, reason, ending.note, ending.removal],
    )
    .map_err(db_err)?;
    let on = ending.on.unwrap_or_else(crate::codes::today_cst);
    let (lift_notices, mut recipients) = follow_up(tx, record_id, |original, targets| {
        Some(shared::lift_of(original, on, reason, targets))
    })?;
    recipients.sort();
    recipients.dedup();
    audit.push(AuditItem::single(
        actor,
        "record.end",
        record_id,
        serde_json::json!({"reason": reason, "lift_notices": lift_notices, "recipients": recipients}),
    ));
    Ok(EndOutcome::Ended {
        lift_notices,
        recipients,
    })
}

/// Creates, for each of the record's notices in effect, the follow-up
/// notice `make` builds (if any) with one delivery to every subscription
/// that had a delivery of it. Returns the notices and their recipients.
fn follow_up(
    tx: &Connection,
    record_id: &str,
    mut make: impl FnMut(&StoredNotice, &[(String, String, String)]) -> Option<NewNotice>,
) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let (notices, lifted) = {
        let mut stmt = tx
            .prepare_cached(&format!(
                "{NOTICE_SELECT} WHERE record_id = ?1 ORDER BY issued_at, id"
            ))
            .map_err(db_err)?;
        let rows = stmt
            .query_map([record_id], notice_from_row)
            .map_err(db_err)?;
        let notices = collect(rows)?;
        let lifted = notices.iter().filter_map(|n| n.lifts.clone()).collect();
        (notices, lifted)
    };
    let now = rfc3339(OffsetDateTime::now_utc());
    let (mut created, mut recipients) = (Vec::new(), Vec::new());
    for original in shared::in_effect(notices, &lifted) {
        let targets: Vec<(String, String, String)> = {
            let mut stmt = tx
                .prepare_cached("SELECT DISTINCT subscription, agency, mode FROM deliveries WHERE notice_id = ?1 ORDER BY subscription, agency")
                .map_err(db_err)?;
            let rows = stmt
                .query_map([&original.notice_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)?
        };
        let Some(notice) = make(&original, &targets) else {
            continue;
        };
        insert_notice(
            tx,
            &notice,
            &original.item,
            original.item_version,
            record_id,
            &original.source,
            &now,
        )?;
        recipients.extend(targets.into_iter().map(|(_, agency, _)| agency));
        created.push(notice.id);
    }
    recipients.sort();
    recipients.dedup();
    Ok((created, recipients))
}

/// Stores a correction: the earlier revision kept, the new content in
/// place, and the notices the change calls for.
fn correct_record(
    tx: &Connection,
    c: &Correction,
    actor: &str,
    audit: &mut Vec<AuditItem>,
) -> Result<CorrectOutcome, StoreError> {
    type Current = (String, u32, u32, String, String, String, String);
    let current: Option<Current> = tx
        .query_row(
            "SELECT status, revision, item_version, body, warnings, submitter, item FROM records WHERE id = ?1",
            [&c.record_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .optional()
        .map_err(db_err)?;
    let Some((status, revision, item_version, body, warnings, submitter, item)) = current else {
        return Ok(CorrectOutcome::NotFound);
    };
    if status != "active" {
        return Ok(CorrectOutcome::AlreadyEnded(status));
    }
    if revision != c.expected_revision {
        return Ok(CorrectOutcome::RevisionChanged(revision));
    }
    let now = rfc3339(OffsetDateTime::now_utc());
    exec(tx,
        "INSERT INTO record_revisions (record_id, revision, item_version, body, warnings, replaced_at, replaced_by, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![c.record_id, revision, item_version, body, warnings, now, actor, c.reason],
    )
    .map_err(db_err)?;
    let r = &c.record;
    exec(tx,
        "UPDATE records SET item_version = ?2, subject_type = ?3, subject_key = ?4, decision_date = ?5, effective_until = ?6, body = ?7, warnings = ?8, natural_key = ?9, content_hash = ?10, revision = ?11, level = ?12, \
         public_id = COALESCE(public_id, ?13), publicity_rule = ?14, publicity_start = ?15, publicity_end = ?16 WHERE id = ?1",
        params![c.record_id, c.item_version, r.subject_type, r.subject_key, r.decision_date.map(|d| d.to_string()), r.effective_until.map(|d| d.to_string()), r.body, r.warnings, r.natural_key, r.content_hash, revision + 1, r.level.map(|l| l.as_str()),
            r.publicity.as_ref().map(|p| p.public_id.as_str()), r.publicity.as_ref().map(|p| p.stamp.rule_set.as_str()), r.publicity.as_ref().map(|p| p.stamp.start.to_string()), r.publicity.as_ref().map(|p| p.stamp.end.to_string())],
    )
    .map_err(key_err)?;
    let today = crate::codes::today_cst();
    let (mut notices, mut recipients) = follow_up(tx, &c.record_id, |original, targets| {
        Some(match &r.notice {
            Some(n) => shared::correction_of(original, n, targets),
            None => shared::lift_of(original, today, EndReason::Corrected.as_str(), targets),
        })
    })?;
    let effect = shared::correction_effect(r.notice.as_ref(), !notices.is_empty());
    if let (Some(n), "notified") = (&r.notice, effect) {
        insert_notice(tx, n, &item, c.item_version, &c.record_id, &submitter, &now)?;
        shared::add_notice(n, &mut notices, &mut recipients);
    }
    audit.push(shared::correction_audit(
        actor,
        c,
        revision + 1,
        effect,
        &notices,
        &recipients,
    ));
    Ok(CorrectOutcome::Corrected {
        revision: revision + 1,
        effect,
        notices,
        recipients,
    })
}

// === impl reads ===

const NOTICE_SELECT: &str = "SELECT id, kind, item, item_version, record_id, source, severity, measures, effective_from, effective_until, issued_at, lifts, reason, corrects, historical, grade FROM notices";

/// Decodes a notice row; the outer `Result` is SQLite's, the inner ours.
fn notice_from_row(r: &Row<'_>) -> rusqlite::Result<Result<StoredNotice, StoreError>> {
    notice_at(r, 0)
}

fn notice_at(r: &Row<'_>, o: usize) -> rusqlite::Result<Result<StoredNotice, StoreError>> {
    let kind: String = r.get(o + 1)?;
    let severity: String = r.get(o + 6)?;
    let measures: String = r.get(o + 7)?;
    let issued: String = r.get(o + 10)?;
    let grade: Option<String> = r.get(o + 15)?;
    let decode = move || -> Result<_, StoreError> {
        Ok((
            parse_kind(&kind)?,
            Severity::parse(&severity).ok_or_else(|| corrupt(format!("severity {severity:?}")))?,
            serde_json::from_str::<Vec<String>>(&measures).map_err(corrupt)?,
            parse_time(&issued)?,
            grade
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(corrupt)?,
        ))
    };
    let (kind, severity, measures, issued_at, grade) = match decode() {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(StoredNotice {
        notice_id: r.get(o)?,
        kind,
        item: r.get(o + 2)?,
        item_version: r.get(o + 3)?,
        record_id: r.get(o + 4)?,
        source: r.get(o + 5)?,
        severity,
        measures,
        effective_from: parse_date(r.get(o + 8)?),
        effective_until: parse_date(r.get(o + 9)?),
        issued_at,
        lifts: r.get(o + 11)?,
        reason: r.get(o + 12)?,
        corrects: r.get(o + 13)?,
        historical: r.get(o + 14)?,
        grade,
    }))
}

/// Outbound rows: delivery columns, then the notice, then the record body.
const OUTBOUND_SELECT: &str = "SELECT COALESCE(d.pos, 0), d.id, d.subscription, d.agency, d.attempts, \
     n.id, n.kind, n.item, n.item_version, n.record_id, n.source, n.severity, n.measures, n.effective_from, n.effective_until, n.issued_at, n.lifts, n.reason, n.corrects, n.historical, n.grade, \
     r.body, d.claims FROM deliveries d JOIN notices n ON n.id = d.notice_id JOIN records r ON r.id = n.record_id";

/// An agency's pull deliveries after a stream position (built once: it
/// is the statement cache's key on every pull).
static PULL_SELECT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("{OUTBOUND_SELECT} WHERE d.agency = ?1 AND d.mode = 'pull' AND d.pos > ?2 ORDER BY d.pos LIMIT ?3")
});

/// A push subscription's deliveries due at a time.
static CLAIM_SELECT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{OUTBOUND_SELECT} WHERE d.subscription = ?1 AND d.mode = 'push' AND d.state IN ('pending', 'inflight') AND d.next_attempt_at <= ?2 ORDER BY d.next_attempt_at, d.seq LIMIT ?3"
    )
});

fn outbound_from_row(r: &Row<'_>) -> rusqlite::Result<Result<Outbound, StoreError>> {
    outbound_parsed_once(r, &mut HashMap::new())
}

/// [`outbound_from_row`] parsing each record body once per `parsed`: a
/// claim round takes one notice for many subscriptions.
fn outbound_parsed_once(
    r: &Row<'_>,
    parsed: &mut HashMap<String, RecordBody>,
) -> rusqlite::Result<Result<Outbound, StoreError>> {
    let notice = match notice_at(r, 5)? {
        Ok(n) => n,
        Err(e) => return Ok(Err(e)),
    };
    let record = match parsed.get(&notice.record_id) {
        Some(body) => body.clone(),
        None => {
            let body = r.get_ref(21)?.as_str()?;
            match serde_json::from_str(body) {
                Ok(v) => {
                    let body = RecordBody::from_store(v);
                    parsed.insert(notice.record_id.clone(), body.clone());
                    body
                }
                Err(e) => return Ok(Err(corrupt(e))),
            }
        }
    };
    Ok(Ok(Outbound {
        position: r.get(0)?,
        delivery_id: r.get(1)?,
        subscription: r.get(2)?,
        agency: r.get(3)?,
        attempts: r.get(4)?,
        claim: r.get(22)?,
        notice,
        record,
    }))
}

/// Records on the public channel on day `?1`: stamped, in effect, inside
/// their publicity period.
const PUBLIC_SELECT: &str = "SELECT public_id, item, body, publicity_rule, publicity_start, publicity_end, revision FROM records \
     WHERE public_id IS NOT NULL AND status = 'active' AND publicity_start <= ?1 AND publicity_end >= ?1 \
     AND (effective_until IS NULL OR effective_until >= ?1)";

fn public_from_row(r: &Row<'_>) -> rusqlite::Result<Result<PublicRecord, StoreError>> {
    let body: String = r.get(2)?;
    let (start, end): (String, String) = (r.get(4)?, r.get(5)?);
    let decode = || -> Result<PublicRecord, StoreError> {
        Ok(PublicRecord {
            public_id: r.get(0).map_err(db_err)?,
            item: r.get(1).map_err(db_err)?,
            body: RecordBody::from_store(serde_json::from_str(&body).map_err(corrupt)?),
            rule_set: r.get(3).map_err(db_err)?,
            start: parse_date(Some(start)).ok_or_else(|| corrupt("publicity_start"))?,
            end: parse_date(Some(end)).ok_or_else(|| corrupt("publicity_end"))?,
            revision: r.get(6).map_err(db_err)?,
        })
    };
    Ok(decode())
}

fn collect<T>(
    rows: impl Iterator<Item = rusqlite::Result<Result<T, StoreError>>>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for row in rows {
        out.push(row.map_err(db_err)??);
    }
    Ok(out)
}

const DELIVERY_SELECT: &str = "SELECT d.id, d.notice_id, n.kind, n.record_id, d.subscription, d.agency, d.mode, d.state, d.attempts, d.last_error FROM deliveries d JOIN notices n ON n.id = d.notice_id";

fn delivery_from_row(r: &Row<'_>) -> rusqlite::Result<Result<DeliveryInfo, StoreError>> {
    let kind: String = r.get(2)?;
    let kind = match parse_kind(&kind) {
        Ok(k) => k,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(DeliveryInfo {
        id: r.get(0)?,
        notice_id: r.get(1)?,
        notice_type: kind,
        record_id: r.get(3)?,
        subscription: r.get(4)?,
        agency: r.get(5)?,
        mode: match r.get::<_, String>(6)?.as_str() {
            "pull" => crate::routing::ModeName::Pull,
            "push" => crate::routing::ModeName::Push,
            other => return Ok(Err(corrupt(format!("delivery mode {other:?}")))),
        },
        state: {
            let text: String = r.get(7)?;
            match DeliveryState::parse(&text) {
                Some(s) => s,
                None => return Ok(Err(corrupt(format!("delivery state {text:?}")))),
            }
        },
        attempts: r.get(8)?,
        last_error: r.get(9)?,
    }))
}

fn feedback_from_row(r: &Row<'_>) -> rusqlite::Result<Result<Feedback, StoreError>> {
    let outcome: String = r.get(3)?;
    let received: String = r.get(6)?;
    let outcome = match outcome.as_str() {
        "applied" => FeedbackOutcome::Applied,
        "not_applicable" => FeedbackOutcome::NotApplicable,
        "pending" => FeedbackOutcome::Pending,
        other => return Ok(Err(corrupt(format!("feedback outcome {other:?}")))),
    };
    let received_at = match parse_time(&received) {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(Feedback {
        notice_id: r.get(0)?,
        agency: r.get(1)?,
        measure: r.get(2)?,
        outcome,
        date: parse_date(r.get(4)?),
        note: r.get(5)?,
        received_at,
    }))
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn append_submission(
        &self,
        submission: NewSubmission,
    ) -> Result<AppendOutcome, StoreError> {
        let wake = submission.wakes_delivery();
        self.write(wake, move |sp, audit| {
            append_submission(sp, &submission, audit)
        })
        .await
    }

    /// A submission is looked up, decided and stored in one writer job.
    /// Its look-ups see every write before it, including the earlier jobs
    /// of its own group, so no key can be taken in between; and the
    /// writer's page cache, which holds the pages just written, answers
    /// them. On a read connection, every commit would have invalidated the
    /// cache, and the hand-off there and back cost as much as the look-ups
    /// themselves: with them in the writer, `ingest` needs about 30 % less
    /// CPU per request, and `batch` (100 records per request) is no slower
    /// (#14).
    async fn decide_and_append(
        &self,
        lookups: SubmissionLookups,
        decide: Decide,
    ) -> Result<Decided, StoreError> {
        self.write_waking(move |tx, audit| {
            let (holders, others) = look_up(tx, &lookups)?;
            let submission = decide(holders, others)?;
            let outcome = append_submission(tx, &submission, audit)?;
            Ok((
                Decided::of(&submission, outcome),
                submission.wakes_delivery(),
            ))
        })
        .await
    }

    async fn find_keys(&self, item: &str, keys: Vec<String>) -> Result<Vec<KeyHolder>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let item = item.to_owned();
        self.read(move |conn| key_holders(conn, &item, &keys)).await
    }

    async fn subject_records(
        &self,
        subjects: Vec<String>,
        items: Vec<String>,
    ) -> Result<Vec<SubjectRecord>, StoreError> {
        if subjects.is_empty() || items.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |conn| records_of_subjects(conn, &subjects, &items))
            .await
    }

    async fn lookups(
        &self,
        lookups: SubmissionLookups,
    ) -> Result<(Vec<KeyHolder>, Vec<SubjectRecord>), StoreError> {
        if lookups.keys.is_empty() && (lookups.subjects.is_empty() || lookups.items.is_empty()) {
            return Ok((Vec::new(), Vec::new()));
        }
        self.read(move |conn| look_up(conn, &lookups)).await
    }

    async fn idempotent_response(
        &self,
        participant: &str,
        key: &str,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let (participant, key) = (participant.to_owned(), key.to_owned());
        let cutoff = unix_now() - self.idempotency_ttl.as_secs() as i64;
        self.read(move |conn| {
            cached_row(
                conn,
                "SELECT request_hash, status, response FROM idempotency WHERE participant = ?1 AND key = ?2 AND created_at >= ?3",
                params![participant, key, cutoff],
                |r| {
                    Ok(StoredResponse {
                        request_hash: r.get(0)?,
                        status: r.get::<_, u16>(1)?,
                        body: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn record(&self, id: &str) -> Result<Option<StoredRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!("{RECORD_SELECT} WHERE id = ?1"))
                .map_err(db_err)?
                .query_row([&id], stored_record)
                .optional()
                .map_err(db_err)?
                .transpose()
        })
        .await
    }

    async fn subjects_records(
        &self,
        subjects: Vec<String>,
        items: Vec<String>,
    ) -> Result<Vec<(String, StoredRecord)>, StoreError> {
        if subjects.is_empty() || items.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |conn| {
            let items: HashSet<&str> = items.iter().map(String::as_str).collect();
            // The subject index's prefix: one look-up per subject, whatever
            // the number of items.
            let mut stmt = conn
                .prepare_cached(&format!(
                    "{RECORD_SELECT} WHERE subject_key = ?1 ORDER BY received_at, id"
                ))
                .map_err(db_err)?;
            let mut found = Vec::new();
            for subject in distinct(&subjects) {
                let rows = stmt.query_map([subject], stored_record).map_err(db_err)?;
                for row in rows {
                    let record = row.map_err(db_err)??;
                    if items.contains(record.item.as_str()) {
                        found.push((subject.clone(), record));
                    }
                }
            }
            Ok(found)
        })
        .await
    }

    async fn record_notices(&self, record_id: &str) -> Result<Vec<NoticeHistory>, StoreError> {
        let record_id = record_id.to_owned();
        self.read_query(move |conn| {
            let notices = {
                let mut stmt = conn
                    .prepare_cached(&format!("{NOTICE_SELECT} WHERE record_id = ?1 ORDER BY issued_at, id"))
                    .map_err(db_err)?;
                let rows = stmt.query_map([&record_id], notice_from_row).map_err(db_err)?;
                collect(rows)?
            };
            let mut out = Vec::with_capacity(notices.len());
            for notice in notices {
                let deliveries = {
                    let mut stmt = conn
                        .prepare_cached(&format!("{DELIVERY_SELECT} WHERE d.notice_id = ?1 ORDER BY d.seq"))
                        .map_err(db_err)?;
                    let rows = stmt.query_map([&notice.notice_id], delivery_from_row).map_err(db_err)?;
                    collect(rows)?
                };
                let feedback = {
                    let mut stmt = conn
                        .prepare_cached("SELECT notice_id, agency, measure, outcome, date, note, received_at FROM feedback WHERE notice_id = ?1 ORDER BY agency, measure")
                        .map_err(db_err)?;
                    let rows = stmt.query_map([&notice.notice_id], feedback_from_row).map_err(db_err)?;
                    collect(rows)?
                };
                out.push(NoticeHistory {
                    notice,
                    deliveries,
                    feedback,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn end_record(
        &self,
        record_id: &str,
        ending: Ending,
        actor: &str,
    ) -> Result<EndOutcome, StoreError> {
        let (record_id, actor) = (record_id.to_owned(), actor.to_owned());
        self.write(true, move |sp, audit| {
            end_record(sp, &record_id, &ending, &actor, audit)
        })
        .await
    }

    async fn correct_record(
        &self,
        correction: Correction,
        actor: &str,
    ) -> Result<CorrectOutcome, StoreError> {
        let actor = actor.to_owned();
        self.write(true, move |sp, audit| {
            correct_record(sp, &correction, &actor, audit)
        })
        .await
    }

    async fn revisions(&self, record_id: &str) -> Result<Vec<Revision>, StoreError> {
        let record_id = record_id.to_owned();
        self.read_query(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT revision, item_version, replaced_at, replaced_by, reason, body FROM record_revisions WHERE record_id = ?1 ORDER BY revision",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map([&record_id], |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                })
                .map_err(db_err)?;
            let mut out = Vec::new();
            for row in rows {
                let (revision, item_version, at, by, reason, body) = row.map_err(db_err)?;
                out.push(Revision {
                    revision,
                    item_version,
                    replaced_at: parse_time(&at)?,
                    replaced_by: by,
                    reason,
                    body: RecordBody::from_store(serde_json::from_str(&body).map_err(corrupt)?),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn expiring(&self, today: Date, limit: usize) -> Result<Vec<String>, StoreError> {
        let today = today.to_string();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT id FROM records WHERE status = 'active' AND effective_until IS NOT NULL AND effective_until < ?1 LIMIT ?2")
                .map_err(db_err)?;
            let rows = stmt.query_map(params![today, limit as i64], |r| r.get(0)).map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
        .await
    }

    async fn pull(
        &self,
        agency: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Outbound>, StoreError> {
        let agency = agency.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&PULL_SELECT).map_err(db_err)?;
            let rows = stmt
                .query_map(params![agency, after, limit as i64], outbound_from_row)
                .map_err(db_err)?;
            collect(rows)
        })
        .await
    }

    async fn ack(&self, agency: &str, position: i64) -> Result<(), StoreError> {
        let agency = agency.to_owned();
        self.write(false, move |sp, audit| {
            // Never past the agency's last delivery, so an ack cannot skip
            // notices that do not exist yet.
            let last: i64 = cached_row(
                sp,
                "SELECT COALESCE(MAX(last_pos), 0) FROM agency_streams WHERE agency = ?1",
                [&agency],
                |r| r.get(0),
            )
            .map_err(db_err)?;
            let position = position.min(last);
            let previous: i64 = sp
                .prepare_cached("SELECT position FROM pull_positions WHERE agency = ?1")
                .map_err(db_err)?
                .query_row([&agency], |r| r.get(0))
                .optional()
                .map_err(db_err)?
                .unwrap_or(0);
            if position <= previous {
                return Ok(());
            }
            exec(
                sp,
                "INSERT INTO pull_positions (agency, position, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(agency) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
                params![agency, position, now_text()],
            )
            .map_err(db_err)?;
            // Only the range since the last acknowledgement: the agency's
            // whole history would make every ack slower than the one before.
            let delivered = exec(
                sp,
                "UPDATE deliveries SET state = 'delivered', delivered_at = ?4 WHERE agency = ?1 AND mode = 'pull' AND pos > ?2 AND pos <= ?3 AND state = 'pending'",
                params![agency, previous, position, now_text()],
            )
            .map_err(db_err)?;
            if delivered > 0 {
                audit.push(AuditItem::grouped(
                    &agency,
                    "delivery.acknowledged",
                    &agency,
                    serde_json::json!({"position": position, "deliveries": delivered}),
                ));
            }
            Ok(())
        })
        .await
    }

    async fn pull_position(&self, agency: &str) -> Result<i64, StoreError> {
        let agency = agency.to_owned();
        self.read(move |conn| {
            cached_row(
                conn,
                "SELECT position FROM pull_positions WHERE agency = ?1",
                [agency],
                |r| r.get(0),
            )
            .optional()
            .map(|p| p.unwrap_or(0))
            .map_err(db_err)
        })
        .await
    }

    async fn legacy_position(&self, agency: &str, seq: i64) -> Result<i64, StoreError> {
        let agency = agency.to_owned();
        self.read(move |conn| {
            // Walks the agency's stream down from its end: old cursors in
            // use are recent ones.
            cached_row(
                conn,
                "SELECT pos FROM deliveries WHERE agency = ?1 AND mode = 'pull' AND seq <= ?2 ORDER BY pos DESC LIMIT 1",
                params![agency, seq],
                |r| r.get(0),
            )
            .optional()
            .map(|p| p.unwrap_or(0))
            .map_err(db_err)
        })
        .await
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    async fn claim_due(
        &self,
        now_ms: i64,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> Result<Vec<Outbound>, StoreError> {
        let wants = wants.to_vec();
        self.write(false, move |sp, _| {
            let mut claimed = Vec::new();
            let mut parsed = HashMap::new();
            let mut select = sp
                .prepare_cached(&CLAIM_SELECT)
                .map_err(db_err)?;
            for (sub, limit) in &wants {
                let rows = select
                    .query_map(params![sub, now_ms, *limit as i64], |r| {
                        outbound_parsed_once(r, &mut parsed)
                    })
                    .map_err(db_err)?;
                claimed.extend(collect(rows)?);
            }
            let mut update = sp
                .prepare_cached("UPDATE deliveries SET state = 'inflight', lease_until = ?2, next_attempt_at = ?2, attempts = attempts + 1, claims = claims + 1 WHERE id = ?1 RETURNING claims")
                .map_err(db_err)?;
            for o in &mut claimed {
                o.claim = update
                    .query_row(params![o.delivery_id, now_ms + lease_ms], |r| r.get(0))
                    .map_err(db_err)?;
            }
            Ok(claimed)
        })
        .await
    }

    async fn finish_deliveries(&self, finished: Vec<Finished>) -> Result<(), StoreError> {
        self.write(false, move |sp, audit| {
            let now = now_text();
            for f in &finished {
                let (id, claim) = (&f.delivery_id, f.claim);
                // Fenced: only the attempt holding the current claim of an
                // in-flight delivery may set its outcome.
                let changed = match &f.result {
                    DeliveryResult::Delivered => exec(
                        sp,
                        "UPDATE deliveries SET state = 'delivered', delivered_at = ?2, last_error = NULL WHERE id = ?1 AND claims = ?3 AND state = 'inflight'",
                        params![id, now, claim],
                    ),
                    DeliveryResult::Retry { at, error } => exec(
                        sp,
                        "UPDATE deliveries SET state = 'pending', next_attempt_at = ?2, last_error = ?3 WHERE id = ?1 AND claims = ?4 AND state = 'inflight'",
                        params![id, at, error, claim],
                    ),
                    DeliveryResult::Deferred { at } => exec(
                        sp,
                        "UPDATE deliveries SET state = 'pending', next_attempt_at = ?2, attempts = MAX(attempts - 1, 0) WHERE id = ?1 AND claims = ?3 AND state = 'inflight'",
                        params![id, at, claim],
                    ),
                    DeliveryResult::Dead { error } => exec(sp, "UPDATE deliveries SET state = 'dead', last_error = ?2 WHERE id = ?1 AND claims = ?3 AND state = 'inflight'", params![id, error, claim]),
                }
                .map_err(db_err)?;
                if changed == 0 {
                    tracing::debug!(delivery = %id, claim, "result of a superseded attempt ignored");
                    continue;
                }
                        // Final outcomes go on the audit trail; retries do not.
                audit.extend(outcome_audit(f));
            }
            Ok(())
        })
        .await
    }

    async fn endpoint_outcome(
        &self,
        subscription: &str,
        ok: bool,
        threshold: u32,
        now_ms: i64,
        pause_ms: i64,
    ) -> Result<EndpointHealth, StoreError> {
        let subscription = subscription.to_owned();
        self.write(false, move |sp, _| {
            if ok {
                exec(sp, shared::ENDPOINT_RECOVERED, params![subscription]).map_err(db_err)?;
                return Ok(EndpointHealth::default());
            }
            sp.prepare_cached(shared::ENDPOINT_FAILED)
                .map_err(db_err)?
                .query_row(params![subscription, threshold, now_ms, pause_ms], |r| {
                    Ok(shared::endpoint_health(
                        r.get(0)?,
                        r.get(1)?,
                        now_ms,
                        pause_ms,
                    ))
                })
                .map_err(db_err)
        })
        .await
    }

    async fn endpoint_health(&self) -> Result<Vec<(String, EndpointHealth)>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(shared::ENDPOINT_HEALTH)
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        shared::endpoint_health(r.get(1)?, r.get(2)?, 0, 0),
                    ))
                })
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
        .await
    }

    async fn purge_idempotency(&self, batch: usize) -> Result<usize, StoreError> {
        let cutoff = unix_now() - self.idempotency_ttl.as_secs() as i64;
        self.write(false, move |sp, _| {
            exec(
                sp,
                "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)",
                params![cutoff, batch as i64],
            )
            .map_err(db_err)
        })
        .await
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryInfo>, StoreError> {
        let state = state.as_str();
        self.read_query(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "{DELIVERY_SELECT} WHERE d.state = ?1 ORDER BY d.seq LIMIT ?2"
                ))
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![state, limit as i64], delivery_from_row)
                .map_err(db_err)?;
            collect(rows)
        })
        .await
    }

    async fn add_review(&self, review: NewReview) -> Result<(), StoreError> {
        self.write(false, move |sp, audit| {
            exec(
                sp,
                "INSERT INTO credit_reviews (id, agency, subject_key, purpose, issued_at, document) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![review.id, review.agency, review.subject_key, review.purpose, rfc3339(review.issued_at), review.document],
            )
            .map_err(db_err)?;
            audit.push(shared::review_audit(&review));
            Ok(())
        })
        .await
    }

    async fn grade_rule_versions(&self) -> Result<Vec<VersionInfo>, StoreError> {
        self.read_query(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT version, created_at, created_by, reason FROM grade_rules ORDER BY version")
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(VersionInfo {
                        version: r.get(0)?,
                        created_at: r.get(1)?,
                        created_by: r.get(2)?,
                        reason: r.get(3)?,
                        breaking: false,
                        active: false,
                    })
                })
                .map_err(db_err)?;
            let mut versions: Vec<VersionInfo> = rows.collect::<Result<_, _>>().map_err(db_err)?;
            if let Some(last) = versions.last_mut() {
                last.active = true;
            }
            Ok(versions)
        })
        .await
    }

    async fn grade_rules(&self, version: Option<u32>) -> Result<Option<(u32, Value)>, StoreError> {
        self.read_query(move |conn| {
            let row: Option<(u32, String)> = conn
                .prepare_cached("SELECT version, document FROM grade_rules WHERE version = COALESCE(?1, (SELECT MAX(version) FROM grade_rules))")
                .map_err(db_err)?
                .query_row([version], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(db_err)?;
            row.map(|(v, doc)| Ok((v, serde_json::from_str(&doc).map_err(corrupt)?)))
                .transpose()
        })
        .await
    }

    async fn add_grade_rules(
        &self,
        document: Value,
        actor: &str,
        reason: Option<String>,
    ) -> Result<u32, StoreError> {
        let actor = actor.to_owned();
        let text = serde_json::to_string(&document).map_err(corrupt)?;
        self.write(false, move |sp, audit| {
            let version: u32 = cached_row(
                sp,
                "SELECT COALESCE(MAX(version), 0) + 1 FROM grade_rules",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
            exec(
                sp,
                "INSERT INTO grade_rules (version, document, created_at, created_by, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![version, text, now_text(), actor, reason],
            )
            .map_err(db_err)?;
            audit.push(shared::grade_rules_audit(&actor, version, reason.as_deref()));
            Ok(version)
        })
        .await
    }

    async fn set_grades(
        &self,
        updates: Vec<GradeUpdate>,
        marks: Vec<GradeMark>,
    ) -> Result<Vec<GradeChanged>, StoreError> {
        self.write(false, move |sp, _audit| {
            let now = now_text();
            let mut graded = sp
                .prepare_cached(
                    "DELETE FROM grade_marks WHERE subject_key = ?1 AND mark = ?2",
                )
                .map_err(db_err)?;
            for m in &marks {
                graded
                    .execute(params![m.subject_key, m.mark])
                    .map_err(db_err)?;
            }
            let mut changed = Vec::new();
            for u in &updates {
                let before: String = sp
                    .prepare_cached("SELECT grade FROM subject_grades WHERE subject_key = ?1")
                    .map_err(db_err)?
                    .query_row([&u.subject_key], |r| r.get(0))
                    .optional()
                    .map_err(db_err)?
                    .unwrap_or_else(|| u.default_grade.clone());
                sp.prepare_cached(
                    "INSERT INTO subject_grades (subject_key, grade, rule, rules_version, region, review_after, assessed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                     ON CONFLICT(subject_key) DO UPDATE SET grade = excluded.grade, rule = excluded.rule, rules_version = excluded.rules_version, region = excluded.region, review_after = excluded.review_after, assessed_at = excluded.assessed_at",
                )
                .map_err(db_err)?
                .execute(params![
                    u.subject_key,
                    u.grade,
                    u.rule,
                    u.rules_version,
                    u.region,
                    u.review_after.map(|d| d.to_string()),
                    now
                ])
                .map_err(db_err)?;
                if before == u.grade {
                    continue;
                }
                let notice_id = match &u.notice {
                    Some(g) => {
                        let notice = shared::with_shift(g, &before, u);
                        insert_notice(sp, &notice, &g.item, g.item_version, &g.record_id, &g.source, &now)?;
                        Some(notice.id)
                    }
                    None => None,
                };
                changed.push(GradeChanged {
                    subject_key: u.subject_key.clone(),
                    from: before,
                    to: u.grade.clone(),
                    notice_id,
                });
            }
            Ok(changed)
        })
        .await
    }

    async fn grades_due(&self, today: Date, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT subject_key FROM subject_grades WHERE review_after IS NOT NULL AND review_after <= ?1 ORDER BY review_after LIMIT ?2")
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![today.to_string(), limit as i64], |r| r.get(0))
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
        .await
    }

    async fn grade_marks(&self, subjects: Vec<String>) -> Result<Vec<GradeMark>, StoreError> {
        if subjects.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT mark FROM grade_marks WHERE subject_key = ?1")
                .map_err(db_err)?;
            let mut marks = Vec::new();
            for subject in distinct(&subjects) {
                if let Some(mark) = stmt
                    .query_row([subject], |r| r.get(0))
                    .optional()
                    .map_err(db_err)?
                {
                    marks.push(GradeMark {
                        subject_key: subject.clone(),
                        mark,
                    });
                }
            }
            Ok(marks)
        })
        .await
    }

    async fn ungraded_after(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.keys_after("SELECT subject_key FROM grade_marks WHERE subject_key > ?1 ORDER BY subject_key LIMIT ?2", after, limit).await
    }

    async fn subjects_after(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.keys_after("SELECT DISTINCT subject_key FROM records WHERE subject_key IS NOT NULL AND subject_key > ?1 ORDER BY subject_key LIMIT ?2", after, limit).await
    }

    async fn grade_counts(&self) -> Result<Vec<GradeCount>, StoreError> {
        self.read_query(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT grade, region, COUNT(*) FROM subject_grades GROUP BY grade, region ORDER BY grade, region")
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(GradeCount {
                        grade: r.get(0)?,
                        region: r.get(1)?,
                        subjects: r.get::<_, i64>(2)? as u64,
                    })
                })
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
        .await
    }

    async fn public_records(&self, q: PublicQuery) -> Result<Vec<PublicRecord>, StoreError> {
        self.read_query(move |conn| {
            let today = q.today.to_string();
            let mut stmt = conn
                .prepare_cached(&format!(
                    "{PUBLIC_SELECT} AND (?2 IS NULL OR (subject_key = ?2 AND subject_type <> 'natural_person')) \
                     AND (?3 IS NULL OR (subject_type <> 'natural_person' AND instr(json_extract(body, '$.subject_name'), ?3) > 0)) \
                     AND (?4 IS NULL OR item = ?4) \
                     ORDER BY decision_date DESC, public_id LIMIT ?5 OFFSET ?6"
                ))
                .map_err(db_err)?;
            let rows = stmt
                .query_map(
                    params![today, q.uscc, q.name, q.item, q.limit, q.offset],
                    public_from_row,
                )
                .map_err(db_err)?;
            collect(rows)
        })
        .await
    }

    async fn public_record(
        &self,
        public_id: &str,
        today: Date,
    ) -> Result<Option<PublicRecord>, StoreError> {
        let id = public_id.to_owned();
        self.read_query(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!("{PUBLIC_SELECT} AND public_id = ?2"))
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![today.to_string(), id], public_from_row)
                .map_err(db_err)?;
            Ok(collect(rows)?.pop())
        })
        .await
    }

    async fn review(&self, id: &str) -> Result<Option<StoredReview>, StoreError> {
        let id = id.to_owned();
        self.read_query(move |conn| {
            conn.prepare_cached("SELECT agency, document FROM credit_reviews WHERE id = ?1")
                .map_err(db_err)?
                .query_row([&id], |r| {
                    Ok(StoredReview {
                        agency: r.get(0)?,
                        document: r.get(1)?,
                    })
                })
                .optional()
                .map_err(db_err)
        })
        .await
    }

    async fn reviews_about(
        &self,
        subject_key: &str,
        limit: usize,
    ) -> Result<Vec<ReviewEntry>, StoreError> {
        let key = subject_key.to_owned();
        self.read_query(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, agency, purpose, issued_at FROM credit_reviews WHERE subject_key = ?1 ORDER BY issued_at DESC, id DESC LIMIT ?2",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![key, limit as i64], |r| {
                    Ok(ReviewEntry {
                        report_id: r.get(0)?,
                        agency: r.get(1)?,
                        purpose: r.get(2)?,
                        issued_at: r.get(3)?,
                    })
                })
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
        .await
    }

    async fn retry_delivery(&self, delivery_id: &str, actor: &str) -> Result<bool, StoreError> {
        let (id, actor) = (delivery_id.to_owned(), actor.to_owned());
        self.write(true, move |sp, audit| {
            let n = sp
                .execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = 0, lease_until = 0 WHERE id = ?1 AND state = 'dead'",
                    [&id],
                )
                .map_err(db_err)?;
            if n == 1 {
                audit.push(AuditItem::single(&actor, "delivery.retry", &id, serde_json::json!({})));
            }
            Ok(n == 1)
        })
        .await
    }

    async fn add_feedback(&self, f: Feedback) -> Result<FeedbackStored, StoreError> {
        self.write(false, move |sp, audit| {
            let exists: Option<i64> = cached_row(
                sp,
                "SELECT 1 FROM notices WHERE id = ?1",
                [&f.notice_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
            if exists.is_none() {
                return Ok(FeedbackStored::UnknownNotice);
            }
            let received: Option<i64> = cached_row(
                sp,
                "SELECT 1 FROM deliveries WHERE notice_id = ?1 AND agency = ?2 LIMIT 1",
                params![f.notice_id, f.agency],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
            if received.is_none() {
                return Ok(FeedbackStored::NotRecipient);
            }
            let outcome = match f.outcome {
                FeedbackOutcome::Applied => "applied",
                FeedbackOutcome::NotApplicable => "not_applicable",
                FeedbackOutcome::Pending => "pending",
            };
            exec(sp,
                "INSERT INTO feedback (notice_id, agency, measure, outcome, date, note, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT(notice_id, agency, measure) DO UPDATE SET outcome = excluded.outcome, date = excluded.date, note = excluded.note, received_at = excluded.received_at",
                params![f.notice_id, f.agency, f.measure, outcome, f.date.map(|d| d.to_string()), f.note, rfc3339(f.received_at)],
            )
            .map_err(db_err)?;
            audit.push(AuditItem::single(
                &f.agency,
                "feedback",
                &f.notice_id,
                serde_json::json!({"measure": f.measure, "outcome": outcome, "date": f.date.map(|d| d.to_string())}),
            ));
            Ok(FeedbackStored::Stored)
        })
        .await
    }

    async fn received_notice(
        &self,
        notice_id: &str,
        agency: &str,
    ) -> Result<Option<StoredNotice>, StoreError> {
        let (id, agency) = (notice_id.to_owned(), agency.to_owned());
        self.read(move |conn| {
            cached_row(
                conn,
                &format!("{NOTICE_SELECT} WHERE id = ?1 AND EXISTS (SELECT 1 FROM deliveries d WHERE d.notice_id = ?1 AND d.agency = ?2)"),
                params![id, agency],
                notice_from_row,
            )
            .optional()
            .map_err(db_err)?
            .transpose()
        })
        .await
    }

    async fn notice(&self, notice_id: &str) -> Result<Option<StoredNotice>, StoreError> {
        let id = notice_id.to_owned();
        self.read(move |conn| {
            cached_row(
                conn,
                &format!("{NOTICE_SELECT} WHERE id = ?1"),
                [id],
                notice_from_row,
            )
            .optional()
            .map_err(db_err)?
            .transpose()
        })
        .await
    }

    async fn feedback_stats(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<AgencyFeedbackStats>, StoreError> {
        let (from, to) = (rfc3339(from), rfc3339(to));
        self.read_query(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT d.agency, COUNT(DISTINCT n.id), COUNT(DISTINCT f.notice_id) \
                     FROM deliveries d JOIN notices n ON n.id = d.notice_id \
                     LEFT JOIN feedback f ON f.notice_id = n.id AND f.agency = d.agency \
                     WHERE n.kind IN ('punishment', 'incentive') AND julianday(n.issued_at) >= julianday(?1) AND julianday(n.issued_at) < julianday(?2) \
                     GROUP BY d.agency ORDER BY d.agency",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![from, to], |r| {
                    let notices: u64 = r.get::<_, i64>(1)?.max(0) as u64;
                    let with: u64 = r.get::<_, i64>(2)?.max(0) as u64;
                    Ok(AgencyFeedbackStats {
                        agency: r.get(0)?,
                        notices,
                        with_feedback: with,
                        feedback_rate: if notices == 0 {
                            0.0
                        } else {
                            with as f64 / notices as f64
                        },
                        deliveries: Default::default(),
                        reviews: 0,
                    })
                })
                .map_err(db_err)?;
            let feedback = rows.collect::<Result<_, _>>().map_err(db_err)?;
            let mut stmt = conn
                .prepare_cached(
                    "SELECT d.agency, d.state, COUNT(*) FROM deliveries d JOIN notices n ON n.id = d.notice_id \
                     WHERE julianday(n.issued_at) >= julianday(?1) AND julianday(n.issued_at) < julianday(?2) \
                     GROUP BY d.agency, d.state",
                )
                .map_err(db_err)?;
            let deliveries: Vec<(String, String, i64)> = stmt
                .query_map(params![from, to], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            let mut stmt = conn
                .prepare_cached(
                    "SELECT agency, COUNT(*) FROM credit_reviews \
                     WHERE julianday(issued_at) >= julianday(?1) AND julianday(issued_at) < julianday(?2) GROUP BY agency",
                )
                .map_err(db_err)?;
            let reviews: Vec<(String, i64)> = stmt
                .query_map(params![from, to], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            Ok(shared::agency_stats(feedback, deliveries, reviews))
        })
        .await
    }

    async fn seed_control(
        &self,
        items: Vec<Value>,
        participants: Vec<(String, Value)>,
        subscriptions: Vec<(String, Value)>,
    ) -> Result<ControlState, StoreError> {
        self.write(false, move |sp, audit| {
            sqlite_control::seed(sp, &items, &participants, &subscriptions, audit)
        })
        .await
    }

    async fn item_versions(&self, item: &str) -> Result<Vec<VersionInfo>, StoreError> {
        let item = item.to_owned();
        self.read_query(move |conn| sqlite_control::item_versions(conn, &item))
            .await
    }

    async fn item_version(&self, item: &str, version: u32) -> Result<Option<Value>, StoreError> {
        let item = item.to_owned();
        self.read(move |conn| sqlite_control::item_version(conn, &item, version))
            .await
    }

    async fn activate_item(
        &self,
        activation: ItemActivation,
    ) -> Result<ActivateOutcome, StoreError> {
        self.write(false, move |sp, audit| {
            sqlite_control::activate(sp, &activation, audit)
        })
        .await
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
        self.write(false, move |sp, audit| {
            sqlite_control::put_document(sp, kind, &body, entry.clone(), audit)
        })
        .await
    }

    async fn audit_page(
        &self,
        filter: AuditFilter,
    ) -> Result<Vec<crate::audit::Entry>, StoreError> {
        self.read_query(move |conn| sqlite_control::audit_page(conn, &filter))
            .await
    }

    async fn checkpoint(&self) -> Result<Option<crate::audit::Checkpoint>, StoreError> {
        let key = self.audit_key.clone();
        let cp = self
            .write(false, move |sp, _| sqlite_control::checkpoint(sp, &key))
            .await?;
        if let Some(cp) = &cp {
            // Written after the commit: a checkpoint in the file always
            // covers entries that exist.
            let path = self.path.clone();
            let cp = cp.clone();
            tokio::task::spawn_blocking(move || crate::audit::append_checkpoint_file(&path, &cp))
                .await
                .map_err(|e| StoreError::Database(e.to_string()))?
                .map_err(|e| StoreError::Database(format!("audit checkpoint file: {e}")))?;
        }
        Ok(cp)
    }

    async fn department_stats(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<DepartmentStats>, StoreError> {
        let (from, to) = (rfc3339(from), rfc3339(to));
        self.read_query(move |conn| sqlite_control::department_stats(conn, &from, &to))
            .await
    }

    async fn ready(&self) -> bool {
        self.writer.lock().map(|w| w.is_some()).unwrap_or(false)
            && self
                .read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(db_err))
                .await
                .is_ok()
    }

    async fn close(&self) {
        // Dropping the sender lets the writer drain its queue and stop.
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        let handle = self.writer_thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> SqliteStore {
        SqliteStore::open(
            &dir.join("credgate.db"),
            &SqliteOptions {
                read_connections: 2,
                query_connections: 2,
                page_cache_mib: 8,
                idempotency_ttl: Duration::from_secs(3600),
                ..Default::default()
            },
            vec![7; 32],
            Arc::new(crate::metrics::Metrics::new()),
        )
        .expect("open store")
    }

    /// A bound `LIMIT` must not make SQLite parse and plan a statement
    /// again on every run (it did, for every pull and claim, #14).
    #[test]
    fn bound_limits_do_not_prepare_statements_again() {
        let dir = tempfile::tempdir().expect("tmp");
        drop(open(dir.path()));
        let conn = open_connection(&dir.path().join("credgate.db"), 8).expect("connection");
        // Both take (text, integer, limit).
        for (sql, key) in [(&*PULL_SELECT, "agency-a"), (&*CLAIM_SELECT, "sub-a")] {
            let mut stmt = conn.prepare_cached(sql).expect("prepare");
            for limit in [10, 20, 30] {
                let mut rows = stmt.query(params![key, 0, limit]).expect("query");
                while rows.next().expect("row").is_some() {}
            }
            assert_eq!(
                stmt.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "{sql}"
            );
        }
    }

    /// Reads for people and the public have their own connections: with
    /// all of them busy (a slow aggregate, a burst on the public channel)
    /// and more waiting, ingest's look-ups still run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_never_hold_up_lookups() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(open(dir.path()));
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Arc::new(Mutex::new(held));
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        // Three queries on two query connections: two hold theirs until
        // released, the third waits for one.
        let queries: Vec<_> = (0..3)
            .map(|_| {
                let (store, held, started_tx) = (store.clone(), held.clone(), started_tx.clone());
                tokio::spawn(async move {
                    store
                        .read_query(move |_| {
                            let _ = started_tx.send(());
                            let _ = held.lock().map(|h| h.recv());
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        for _ in 0..2 {
            started.recv().await.expect("a query started");
        }
        let lookup = tokio::time::timeout(
            Duration::from_secs(10),
            store.read(|c| {
                c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                    .map_err(db_err)
            }),
        )
        .await;
        assert!(
            matches!(lookup, Ok(Ok(1))),
            "a look-up waited for the queries"
        );
        for _ in 0..3 {
            let _ = release.send(());
        }
        for q in queries {
            q.await.expect("query task").expect("query");
        }
    }

    /// `store.page_cache_mib` sizes the writer's and every reader's page
    /// cache; `store.read_connections` bounds the reads at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_connections_are_bounded_and_get_the_configured_page_cache() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().expect("tmp");
        let store = open(dir.path());
        let cache = |c: &Connection| -> Result<i64, StoreError> {
            c.query_row("PRAGMA cache_size", [], |r| r.get(0))
                .map_err(db_err)
        };
        let writer = store
            .write(false, move |sp, _| cache(sp))
            .await
            .expect("writer");
        assert_eq!(writer, -8 * 1024, "KiB, as SQLite counts a negative size");
        // More reads at once than read connections (2): they take turns.
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let reads = (0..6).map(|_| {
            let (now, most) = (now.clone(), most.clone());
            store.read(move |c| {
                most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                now.fetch_sub(1, Ordering::SeqCst);
                cache(c)
            })
        });
        for size in futures_util::future::join_all(reads).await {
            assert_eq!(size.expect("reader"), -8 * 1024);
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "at most read_connections at once"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_idempotency_keys_are_purged_in_indexed_batches() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = open(dir.path());
        let old = unix_now() - 7200;
        store
            .write(false, move |c, _| {
                let mut stmt = c
                    .prepare("INSERT INTO idempotency (participant, key, request_hash, status, response, created_at) VALUES ('p', ?1, 'h', 200, x'00', ?2)")
                    .map_err(db_err)?;
                for i in 0..2500 {
                    let at = if i < 2300 { old } else { unix_now() };
                    stmt.execute(params![format!("k{i}"), at]).map_err(db_err)?;
                }
                Ok(())
            })
            .await
            .expect("seed");
        let plan: String = store
            .read(|c| {
                c.query_row(
                    "EXPLAIN QUERY PLAN SELECT rowid FROM idempotency WHERE created_at < 1 ORDER BY created_at LIMIT 10",
                    [],
                    |r| r.get(3),
                )
                .map_err(db_err)
            })
            .await
            .expect("plan");
        assert!(plan.contains("idempotency_created"), "{plan}");
        let batches = [
            store.purge_idempotency(1000).await.expect("purge"),
            store.purge_idempotency(1000).await.expect("purge"),
            store.purge_idempotency(1000).await.expect("purge"),
        ];
        assert_eq!(batches, [1000, 1000, 300]);
        assert_eq!(store.purge_idempotency(1000).await.expect("purge"), 0);
        store.close().await;
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    /// A database as the previous release left it (schema 5, pull cursors
    /// were the global delivery sequence) opens, and its agencies' cursors
    /// and acknowledged positions keep meaning the same deliveries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_schema_5_database_keeps_its_streams_and_cursors() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("credgate.db");
        {
            let mut conn = open_connection(&path, OFFLINE_PAGE_CACHE_MIB).expect("open");
            conn.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);")
                .expect("table");
            let tx = conn.transaction().expect("tx");
            for (i, sql) in MIGRATIONS[..5].iter().enumerate() {
                tx.execute_batch(sql).expect("old migration");
                tx.execute(
                    "INSERT INTO schema_migrations VALUES (?1, '2026-11-01T00:00:00Z')",
                    [i as i64 + 1],
                )
                .expect("version");
            }
            tx.execute_batch(
                "INSERT INTO submissions VALUES ('s1', 'dept', 'administrative_penalty', 1, '2026-11-01T00:00:00Z', 1, 0, '[]');
                 INSERT INTO records (id, submission_id, item, item_version, submitter, subject_type, received_at, body, warnings)
                   VALUES ('r1', 's1', 'administrative_penalty', 1, 'dept', 'legal_entity', '2026-11-01T00:00:00Z', '{}', '[]');
                 INSERT INTO notices (id, kind, item, item_version, record_id, source, severity, measures, issued_at)
                   VALUES ('n1', 'punishment', 'administrative_penalty', 1, 'r1', 'dept', 'serious', '[]', '2026-11-01T00:00:00Z');",
            )
            .expect("rows");
            // Global sequence 1..=9, the two agencies interleaved, and a
            // push delivery in between that belongs to no stream.
            for seq in 1..=9 {
                let (agency, mode) = match seq % 3 {
                    0 => ("agency-b", "pull"),
                    1 => ("agency-a", "pull"),
                    _ => ("agency-a", "push"),
                };
                tx.execute(
                    "INSERT INTO deliveries (seq, id, notice_id, subscription, agency, mode, state, created_at) VALUES (?1, ?2, 'n1', 'sub', ?3, ?4, 'pending', '2026-11-01T00:00:00Z')",
                    params![seq, format!("d{seq}"), agency, mode],
                )
                .expect("delivery");
            }
            // agency-a acknowledged up to sequence 5 (its pulls 1 and 4).
            tx.execute_batch(
                "INSERT INTO pull_positions VALUES ('agency-a', 5, '2026-11-01T00:00:00Z');",
            )
            .expect("position");
            tx.commit().expect("commit");
        }
        let store = SqliteStore::open(
            &path,
            &SqliteOptions {
                group_commit_max: 16,
                read_connections: 1,
                page_cache_mib: 8,
                idempotency_ttl: Duration::from_secs(3600),
                ..Default::default()
            },
            vec![7; 32],
            Arc::new(crate::metrics::Metrics::new()),
        )
        .expect("the old database opens");
        // agency-a's pulls were sequences 1, 4, 7: positions 1, 2, 3.
        assert_eq!(store.pull_position("agency-a").await.expect("position"), 2);
        let rest = store.pull("agency-a", 2, 10).await.expect("pull");
        assert_eq!(
            rest.iter()
                .map(|o| (o.position, o.delivery_id.as_str()))
                .collect::<Vec<_>>(),
            [(3, "d7")]
        );
        // Old cursors: the last pull delivery at or before the sequence.
        for (seq, pos) in [(0, 0), (1, 1), (3, 1), (4, 2), (6, 2), (7, 3), (100, 3)] {
            assert_eq!(
                store
                    .legacy_position("agency-a", seq)
                    .await
                    .expect("legacy"),
                pos,
                "seq {seq}"
            );
        }
        let b = store.pull("agency-b", 0, 10).await.expect("pull b");
        assert_eq!(
            b.iter()
                .map(|o| (o.position, o.delivery_id.as_str()))
                .collect::<Vec<_>>(),
            [(1, "d3"), (2, "d6"), (3, "d9")]
        );
        // New deliveries continue each stream where it ended.
        let mut sub = crate::store::conformance::submission("s2", "r2");
        sub.records[0].notice = Some(NewNotice {
            id: "n2".into(),
            kind: crate::notice::NoticeKind::Punishment,
            severity: Severity::Serious,
            measures: vec![],
            effective_from: None,
            effective_until: None,
            region: None,
            deliveries: ["agency-a", "agency-b"]
                .into_iter()
                .map(|a| super::super::NewDelivery {
                    id: format!("new-{a}"),
                    subscription: "sub".into(),
                    agency: a.into(),
                    push: false,
                })
                .collect(),
            lifts: None,
            corrects: None,
            reason: None,
            historical: false,
            grade: None,
        });
        store.append_submission(sub).await.expect("append");
        let a = store.pull("agency-a", 3, 10).await.expect("pull");
        assert_eq!(a.iter().map(|o| o.position).collect::<Vec<_>>(), [4]);
        store.close().await;
    }
}
