//! SQLite side of the control plane: catalog versions, participants and
//! subscriptions, the audit chain and quality statistics. Free functions
//! called from the `Store` implementation in `sqlite.rs`, inside writer
//! jobs (writes) or on read connections.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use time::OffsetDateTime;

use super::shared::{activation_audit, AuditItem};
use super::{
    ActivateOutcome, AuditFilter, ControlState, DepartmentStats, DocKind, ItemActivation,
    StoreError, VersionInfo,
};
use crate::audit::{self, Checkpoint, Entry};

/// Migration 3: catalog versions, registry documents, audit chain.
pub(super) const MIGRATION: &str = r#"
    CREATE TABLE catalog_versions (
        item        TEXT NOT NULL,
        version     INTEGER NOT NULL,
        definition  TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        created_by  TEXT NOT NULL,
        reason      TEXT,
        breaking    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (item, version)
    );
    CREATE TABLE catalog_active (
        item        TEXT PRIMARY KEY,
        version     INTEGER NOT NULL
    );
    CREATE TABLE registry (
        kind        TEXT NOT NULL,
        id          TEXT NOT NULL,
        body        TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        updated_by  TEXT NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE TABLE audit (
        seq         INTEGER PRIMARY KEY,
        at          TEXT NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        subject     TEXT NOT NULL,
        details     TEXT NOT NULL,
        prev_hash   TEXT NOT NULL,
        hash        TEXT NOT NULL
    );
    CREATE TABLE audit_checkpoints (
        seq         INTEGER PRIMARY KEY,
        head_hash   TEXT NOT NULL,
        at          TEXT NOT NULL,
        mac         TEXT NOT NULL
    );
"#;

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn now() -> String {
    super::shared::rfc3339(OffsetDateTime::now_utc())
}

/// Appends an audit entry chained to the last one.
fn audit(
    conn: &Connection,
    actor: &str,
    action: &str,
    subject: &str,
    details: &Value,
) -> Result<(), StoreError> {
    let last: Option<(i64, String)> = conn
        .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        .map_err(db_err)?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(db_err)?;
    let (seq, prev) = last.map_or((1, audit::GENESIS.to_owned()), |(s, h)| (s + 1, h));
    let at = now();
    let details = serde_json::to_string(details).map_err(corrupt)?;
    let hash = audit::entry_hash(&prev, seq, &at, actor, action, subject, &details);
    conn.prepare_cached("INSERT INTO audit (seq, at, actor, action, subject, details, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")
        .map_err(db_err)?
        .execute(params![seq, at, actor, action, subject, details, prev, hash])
        .map_err(db_err)?;
    Ok(())
}

/// Writes a commit's audit items as chained entries (see
/// [`super::shared::audit_entries`]).
pub(super) fn write_audit(conn: &Connection, items: Vec<AuditItem>) -> Result<(), StoreError> {
    for (actor, action, subject, details) in super::shared::audit_entries(items) {
        audit(conn, &actor, &action, &subject, &details)?;
    }
    Ok(())
}

/// Reads audit entries after `after`.
pub(super) fn audit_page(
    conn: &Connection,
    filter: &AuditFilter,
) -> Result<Vec<Entry>, StoreError> {
    // SQLite takes `$n` parameters as positional ones.
    let mut stmt = conn.prepare_cached(&filter.sql("")).map_err(db_err)?;
    let before = filter.before.unwrap_or(i64::MAX);
    let rows = stmt
        .query_map(
            params![
                filter.after,
                before,
                filter.actor,
                filter.kind,
                filter.limit as i64
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                ))
            },
        )
        .map_err(db_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, at, actor, action, subject, details, prev_hash, hash) = row.map_err(db_err)?;
        out.push(Entry {
            seq,
            at,
            actor,
            action,
            subject,
            // Kept byte for byte: verification hashes exactly this text.
            details: serde_json::value::RawValue::from_string(details).map_err(corrupt)?,
            prev_hash,
            hash,
        });
    }
    Ok(out)
}

/// Stored checkpoints.
pub(super) fn checkpoints(conn: &Connection) -> Result<Vec<Checkpoint>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT seq, head_hash, at, mac FROM audit_checkpoints ORDER BY seq")
        .map_err(db_err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Checkpoint {
                seq: r.get(0)?,
                head_hash: r.get(1)?,
                at: r.get(2)?,
                mac: r.get(3)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

/// Writes a checkpoint of the chain head if it moved since the last one.
pub(super) fn checkpoint(conn: &Connection, key: &[u8]) -> Result<Option<Checkpoint>, StoreError> {
    let head: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(db_err)?;
    let Some((seq, head_hash)) = head else {
        return Ok(None);
    };
    let covered: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM audit_checkpoints",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if covered >= seq {
        return Ok(None);
    }
    let at = now();
    let cp = Checkpoint {
        seq,
        mac: audit::checkpoint_mac(key, seq, &head_hash, &at),
        head_hash,
        at,
    };
    conn.execute(
        "INSERT INTO audit_checkpoints (seq, head_hash, at, mac) VALUES (?1, ?2, ?3, ?4)",
        params![cp.seq, cp.head_hash, cp.at, cp.mac],
    )
    .map_err(db_err)?;
    Ok(Some(cp))
}

fn registry(conn: &Connection, kind: DocKind) -> Result<Vec<Value>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT body FROM registry WHERE kind = ?1 ORDER BY rowid")
        .map_err(db_err)?;
    let rows = stmt
        .query_map([kind.as_str()], |r| r.get::<_, String>(0))
        .map_err(db_err)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(serde_json::from_str(&row.map_err(db_err)?).map_err(corrupt)?);
    }
    Ok(out)
}

/// Seeds what is missing and returns the control state.
pub(super) fn seed(
    conn: &Connection,
    items: &[Value],
    participants: &[(String, Value)],
    subscriptions: &[(String, Value)],
    log: &mut Vec<AuditItem>,
) -> Result<ControlState, StoreError> {
    let mut seeded = Vec::new();
    for def in items {
        let id = def.get("id").and_then(Value::as_str).unwrap_or_default();
        let version = def.get("version").and_then(Value::as_u64).unwrap_or(1);
        let known: Option<i64> = conn
            .query_row(
                "SELECT version FROM catalog_active WHERE item = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        if known.is_none() {
            let text = serde_json::to_string(def).map_err(corrupt)?;
            conn.execute(
                "INSERT INTO catalog_versions (item, version, definition, created_at, created_by) VALUES (?1, ?2, ?3, ?4, 'seed')",
                params![id, version as i64, text, now()],
            )
            .map_err(db_err)?;
            conn.execute(
                "INSERT INTO catalog_active (item, version) VALUES (?1, ?2)",
                params![id, version as i64],
            )
            .map_err(db_err)?;
            log.push(AuditItem::single(
                "gateway",
                "catalog.seed",
                id,
                serde_json::json!({"version": version, "digest": digest(&text)}),
            ));
            seeded.push(format!("catalog item {id} v{version}"));
        }
    }
    for (kind, docs) in [
        (DocKind::Participant, participants),
        (DocKind::Subscription, subscriptions),
    ] {
        let count: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM registry WHERE kind = ?1",
                [kind.as_str()],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if count > 0 || docs.is_empty() {
            continue;
        }
        for (id, body) in docs {
            let text = serde_json::to_string(body).map_err(corrupt)?;
            conn.execute(
                "INSERT INTO registry (kind, id, body, updated_at, updated_by) VALUES (?1, ?2, ?3, ?4, 'seed')",
                params![kind.as_str(), id, text, now()],
            )
            .map_err(db_err)?;
        }
        log.push(AuditItem::single(
            "gateway",
            &format!("{}.seed", kind.as_str()),
            "*",
            serde_json::json!({"count": docs.len()}),
        ));
        seeded.push(format!("{} {}s", docs.len(), kind.as_str()));
    }
    let mut stmt = conn
        .prepare_cached("SELECT v.definition FROM catalog_active a JOIN catalog_versions v ON v.item = a.item AND v.version = a.version ORDER BY a.item")
        .map_err(db_err)?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(db_err)?;
    let mut active = Vec::new();
    for row in rows {
        active.push(serde_json::from_str(&row.map_err(db_err)?).map_err(corrupt)?);
    }
    Ok(ControlState {
        items: active,
        participants: registry(conn, DocKind::Participant)?,
        subscriptions: registry(conn, DocKind::Subscription)?,
        seeded,
    })
}

/// SHA-256 of a document's text.
pub(super) fn digest(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

pub(super) fn item_versions(conn: &Connection, item: &str) -> Result<Vec<VersionInfo>, StoreError> {
    let active: Option<u32> = conn
        .query_row(
            "SELECT version FROM catalog_active WHERE item = ?1",
            [item],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?;
    let mut stmt = conn
        .prepare_cached("SELECT version, created_at, created_by, reason, breaking FROM catalog_versions WHERE item = ?1 ORDER BY version")
        .map_err(db_err)?;
    let rows = stmt
        .query_map([item], |r| {
            let version: u32 = r.get(0)?;
            Ok(VersionInfo {
                version,
                created_at: r.get(1)?,
                created_by: r.get(2)?,
                reason: r.get(3)?,
                breaking: r.get::<_, i64>(4)? != 0,
                active: Some(version) == active,
            })
        })
        .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

pub(super) fn item_version(
    conn: &Connection,
    item: &str,
    version: u32,
) -> Result<Option<Value>, StoreError> {
    let text: Option<String> = conn
        .query_row(
            "SELECT definition FROM catalog_versions WHERE item = ?1 AND version = ?2",
            params![item, version],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?;
    text.map(|t| serde_json::from_str(&t).map_err(corrupt))
        .transpose()
}

pub(super) fn activate(
    conn: &Connection,
    a: &ItemActivation,
    log: &mut Vec<AuditItem>,
) -> Result<ActivateOutcome, StoreError> {
    let exists: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM catalog_versions WHERE item = ?1 AND version = ?2",
            params![a.item, a.version],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?;
    match (&a.definition, exists) {
        (Some(_), Some(_)) => {
            let latest: u32 = conn
                .query_row(
                    "SELECT MAX(version) FROM catalog_versions WHERE item = ?1",
                    [&a.item],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            return Ok(ActivateOutcome::VersionTaken { latest });
        }
        (None, None) => return Ok(ActivateOutcome::NoSuchVersion),
        (Some(def), None) => {
            conn.execute(
                "INSERT INTO catalog_versions (item, version, definition, created_at, created_by, reason, breaking) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![a.item, a.version, serde_json::to_string(def).map_err(corrupt)?, now(), a.actor, a.reason, a.breaking as i64],
            )
            .map_err(db_err)?;
        }
        (None, Some(_)) => {}
    }
    conn.execute(
        "INSERT INTO catalog_active (item, version) VALUES (?1, ?2) ON CONFLICT(item) DO UPDATE SET version = excluded.version",
        params![a.item, a.version],
    )
    .map_err(db_err)?;
    log.push(activation_audit(a));
    Ok(ActivateOutcome::Activated)
}

/// Creates or replaces a document; `entry` (its audit entry) names the
/// administrator.
pub(super) fn put_document(
    conn: &Connection,
    kind: DocKind,
    body: &Value,
    entry: AuditItem,
    log: &mut Vec<AuditItem>,
) -> Result<(), StoreError> {
    let (id, actor) = (&entry.subject, &entry.actor);
    conn.execute(
        "INSERT INTO registry (kind, id, body, updated_at, updated_by) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT(kind, id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        params![kind.as_str(), id, serde_json::to_string(body).map_err(corrupt)?, now(), actor],
    )
    .map_err(db_err)?;
    log.push(entry);
    Ok(())
}

/// Opens a database for offline reading (no writer, no migrations).
fn open_read_only(db: &std::path::Path) -> Result<Connection, String> {
    if !db.is_file() {
        return Err(format!(
            "{}: no database (has the gateway run with this configuration?)",
            db.display()
        ));
    }
    Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{}: {e}", db.display()))
}

/// Verifies the audit chain of a database offline, with its checkpoints
/// (database and file).
pub fn verify_audit(db: &std::path::Path, key: &[u8]) -> Result<audit::Report, String> {
    let conn = open_read_only(db)?;
    let mut cps = checkpoints(&conn).map_err(|e| e.to_string())?;
    cps.extend(audit::read_checkpoint_file(db)?);
    // Stream the chain in pages so a large log is not held in memory.
    let mut error = None;
    let entries = {
        let conn = &conn;
        let error = &mut error;
        let mut after = 0;
        let mut page: std::vec::IntoIter<Entry> = Vec::new().into_iter();
        std::iter::from_fn(move || loop {
            if let Some(e) = page.next() {
                after = e.seq;
                return Some(e);
            }
            match audit_page(conn, &AuditFilter::after(after, 10_000)) {
                Ok(p) if p.is_empty() => return None,
                Ok(p) => page = p.into_iter(),
                Err(e) => {
                    *error = Some(e.to_string());
                    return None;
                }
            }
        })
    };
    let report = audit::verify(entries, &cps, key);
    match error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// The active catalog item definitions of a database, offline.
pub fn active_items(db: &std::path::Path) -> Result<Vec<Value>, String> {
    let conn = open_read_only(db)?;
    let mut stmt = conn
        .prepare("SELECT v.definition FROM catalog_active a JOIN catalog_versions v ON v.item = a.item AND v.version = a.version ORDER BY a.item")
        .map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for row in rows {
        out.push(
            serde_json::from_str(&row.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?,
        );
    }
    Ok(out)
}

pub(super) fn department_stats(
    conn: &Connection,
    from: &str,
    to: &str,
) -> Result<Vec<DepartmentStats>, StoreError> {
    let day = |text: String| {
        crate::codes::parse_iso_date(&text)
            .ok_or_else(|| StoreError::Corrupt(format!("a date in the figures: {text:?}")))
    };
    // Grouped in SQL: rows per department, item and day, not per record.
    let submissions: Vec<super::shared::SubmissionRow> = {
        let mut stmt = conn
            .prepare_cached(
                "SELECT participant, item, SUM(accepted), SUM(rejected), rejection_codes, date(received_at, '+8 hours') \
                 FROM submissions WHERE julianday(received_at) >= julianday(?1) AND julianday(received_at) < julianday(?2) AND NOT historical \
                 GROUP BY participant, item, rejection_codes, date(received_at, '+8 hours')",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![from, to], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(db_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (dept, item, accepted, rejected, codes, received) = row.map_err(db_err)?;
            out.push((dept, item, accepted, rejected, codes, day(received)?));
        }
        out
    };
    let mut records: Vec<super::shared::DelayRow> = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT r.submitter, r.item, r.decision_date, date(r.received_at, '+8 hours'), COUNT(*) \
                 FROM records r JOIN submissions s ON s.id = r.submission_id \
                 WHERE julianday(r.received_at) >= julianday(?1) AND julianday(r.received_at) < julianday(?2) \
                 AND r.decision_date IS NOT NULL AND NOT s.historical \
                 GROUP BY r.submitter, r.item, r.decision_date, date(r.received_at, '+8 hours')",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![from, to], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(db_err)?;
        for row in rows {
            let (dept, item, decision, received, count) = row.map_err(db_err)?;
            // A decision date that is not a date counts in no delay.
            if let Some(decision) = crate::codes::parse_iso_date(&decision) {
                records.push((dept, item, decision, day(received)?, count));
            }
        }
    }
    super::shared::department_stats(submissions, records)
}
