//! SQLite store: one file in WAL mode with `synchronous=FULL`.
//!
//! A single writer thread owns the write connection and commits whatever
//! submissions are queued in one transaction (group commit: one fsync for
//! many concurrent requests). Each submission runs inside its own savepoint,
//! so one failing submission never takes the others of its group down; a
//! caller is answered only after the group's commit returned. Reads use a
//! small pool of separate connections, which WAL lets run alongside the
//! writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::{AppendOutcome, NewSubmission, Store, StoreError, StoredRecord, StoredResponse};

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
];

enum WriteOp {
    Append(
        Box<NewSubmission>,
        oneshot::Sender<Result<AppendOutcome, StoreError>>,
    ),
}

/// The embedded SQLite store.
pub struct SqliteStore {
    /// Queue to the writer thread; `None` once closed.
    writer: Mutex<Option<mpsc::Sender<WriteOp>>>,
    /// Joined on close so the last group is committed before exit.
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Idle read connections.
    readers: Arc<Mutex<Vec<Connection>>>,
    /// Database file, for opening more readers.
    path: PathBuf,
    /// How long idempotency keys are kept.
    idempotency_ttl: Duration,
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

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000;",
    )
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
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![i as i64 + 1, now_text()],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
    }
    Ok(())
}

fn now_text() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

impl SqliteStore {
    /// Opens (creating if needed) `path`, runs migrations and starts the
    /// writer thread.
    pub fn open(
        path: &Path,
        group_commit_max: usize,
        read_connections: usize,
        idempotency_ttl: Duration,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Database(format!("{}: {e}", dir.display())))?;
        }
        let mut conn = open_connection(path)?;
        migrate(&mut conn)?;
        let mut readers = Vec::with_capacity(read_connections);
        for _ in 0..read_connections {
            readers.push(open_connection(path)?);
        }
        let (tx, rx) = mpsc::channel(group_commit_max.max(1) * 4);
        let ttl = idempotency_ttl;
        let thread = std::thread::Builder::new()
            .name("credgate-store-writer".into())
            .spawn(move || writer_loop(conn, rx, group_commit_max.max(1), ttl))
            .map_err(|e| StoreError::Database(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            readers: Arc::new(Mutex::new(readers)),
            path: path.to_owned(),
            idempotency_ttl,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<WriteOp>, StoreError> {
        self.writer
            .lock()
            .map_err(|_| StoreError::Unavailable)?
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// Runs `f` on a pooled read connection off the async runtime.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match pool.lock().map_err(|_| StoreError::Unavailable)?.pop() {
                Some(c) => c,
                None => open_connection(&path)?,
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

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<WriteOp>,
    group_max: usize,
    ttl: Duration,
) {
    let mut last_purge = Instant::now() - Duration::from_secs(3600);
    let mut group = Vec::with_capacity(group_max);
    while let Some(op) = rx.blocking_recv() {
        group.push(op);
        while group.len() < group_max {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        commit_group(&mut conn, &mut group);
        if last_purge.elapsed() > Duration::from_secs(600) {
            last_purge = Instant::now();
            let cutoff = unix_now() - ttl.as_secs() as i64;
            if let Err(e) = conn.execute("DELETE FROM idempotency WHERE created_at < ?1", [cutoff])
            {
                tracing::warn!(error = %e, "purging expired idempotency keys failed");
            }
        }
    }
    // Channel closed: every queued op has been committed. Checkpoint the WAL
    // so the database file is complete on its own.
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        tracing::warn!(error = %e, "final WAL checkpoint failed");
    }
}

fn commit_group(conn: &mut Connection, group: &mut Vec<WriteOp>) {
    let mut replies = Vec::with_capacity(group.len());
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let msg = e.to_string();
            for WriteOp::Append(_, reply) in group.drain(..) {
                let _ = reply.send(Err(StoreError::Database(msg.clone())));
            }
            return;
        }
    };
    for WriteOp::Append(sub, reply) in group.drain(..) {
        let result = append_in_savepoint(&mut tx, &sub);
        replies.push((result, reply));
    }
    match tx.commit() {
        Ok(()) => {
            for (result, reply) in replies {
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            tracing::error!(error = %msg, "group commit failed; nothing in the group was acknowledged");
            for (_, reply) in replies {
                let _ = reply.send(Err(StoreError::Database(msg.clone())));
            }
        }
    }
}

fn append_in_savepoint(
    tx: &mut rusqlite::Transaction<'_>,
    sub: &NewSubmission,
) -> Result<AppendOutcome, StoreError> {
    let sp = tx.savepoint().map_err(db_err)?;
    let outcome = append_one(&sp, sub)?;
    sp.commit().map_err(db_err)?;
    Ok(outcome)
}

fn append_one(
    tx: &rusqlite::Savepoint<'_>,
    sub: &NewSubmission,
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
        tx.execute(
            "INSERT INTO idempotency (participant, key, request_hash, status, response, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![sub.participant, claim.key, claim.request_hash, sub.response_status, sub.response_body, unix_now()],
        )
        .map_err(db_err)?;
    }
    let received = sub
        .received_at
        .format(&Rfc3339)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let codes = serde_json::to_string(&sub.rejection_codes)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    tx.execute(
        "INSERT INTO submissions (id, participant, item, item_version, received_at, accepted, rejected, rejection_codes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![sub.id, sub.participant, sub.item, sub.item_version, received, sub.records.len() as i64, sub.rejected as i64, codes],
    )
    .map_err(db_err)?;
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO records (id, submission_id, item, item_version, submitter, subject_type, subject_key, decision_date, received_at, body, warnings) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .map_err(db_err)?;
    for r in &sub.records {
        let body =
            serde_json::to_string(&r.body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let warnings =
            serde_json::to_string(&r.warnings).map_err(|e| StoreError::Corrupt(e.to_string()))?;
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
            body,
            warnings
        ])
        .map_err(db_err)?;
    }
    Ok(AppendOutcome::Stored)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn append_submission(
        &self,
        submission: NewSubmission,
    ) -> Result<AppendOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(WriteOp::Append(Box::new(submission), reply))
            .await
            .map_err(|_| StoreError::Unavailable)?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    async fn idempotent_response(
        &self,
        participant: &str,
        key: &str,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let (participant, key) = (participant.to_owned(), key.to_owned());
        let cutoff = unix_now() - self.idempotency_ttl.as_secs() as i64;
        self.read(move |conn| {
            conn.query_row(
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
            let row = conn
                .query_row(
                    "SELECT id, item, item_version, submitter, subject_type, subject_key, decision_date, received_at, body, warnings, status FROM records WHERE id = ?1",
                    [&id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, u32>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, Option<String>>(5)?,
                            r.get::<_, Option<String>>(6)?,
                            r.get::<_, String>(7)?,
                            r.get::<_, String>(8)?,
                            r.get::<_, String>(9)?,
                            r.get::<_, String>(10)?,
                        ))
                    },
                )
                .optional()
                .map_err(db_err)?;
            let Some((id, item, item_version, submitter, subject_type, subject_key, decision, received, body, warnings, status)) = row else {
                return Ok(None);
            };
            let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("record {id}: {e}"));
            Ok(Some(StoredRecord {
                decision_date: decision.as_deref().and_then(crate::codes::parse_iso_date),
                received_at: OffsetDateTime::parse(&received, &Rfc3339).map_err(|e| corrupt(&e))?,
                body: serde_json::from_str(&body).map_err(|e| corrupt(&e))?,
                warnings: serde_json::from_str(&warnings).map_err(|e| corrupt(&e))?,
                id,
                item,
                item_version,
                submitter,
                subject_type,
                subject_key,
                status,
            }))
        })
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
