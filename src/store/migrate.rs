//! `credgate store migrate`: copies an SQLite database into an empty
//! PostgreSQL database — submissions, records, notices, deliveries, the
//! agencies' streams and acknowledged positions, feedback, the control
//! plane, endpoint health, the audit chain with its checkpoints (those of
//! the file beside the SQLite database included) — in one transaction,
//! then verifies the chain on the target. Every copied record's subject
//! gets a grade mark, so the first start on the target assesses each
//! subject once.

use std::path::Path;
use std::sync::Arc;

use rusqlite::types::Value as Sql;
use tokio_postgres::types::ToSql;

use super::postgres::{PgOptions, PgStore};

/// How a source column becomes a target value.
#[derive(Clone, Copy)]
enum Col {
    Text,
    Int,
    BigInt,
    Bool,
    Bytes,
    /// `YYYY-MM-DD` text → `date`.
    Date,
    /// RFC 3339 text → `timestamptz`.
    Time,
}

use Col::*;

/// A table to copy: name, columns, order of the source rows.
type Table = (&'static str, &'static [(&'static str, Col)], &'static str);

/// Tables in dependency order.
const TABLES: &[Table] = &[
    (
        "submissions",
        &[
            ("id", Text),
            ("participant", Text),
            ("item", Text),
            ("item_version", Int),
            ("received_at", Time),
            ("accepted", Int),
            ("rejected", Int),
            ("rejection_codes", Text),
            ("historical", Bool),
        ],
        "rowid",
    ),
    (
        "records",
        &[
            ("id", Text),
            ("submission_id", Text),
            ("item", Text),
            ("item_version", Int),
            ("submitter", Text),
            ("subject_type", Text),
            ("subject_key", Text),
            ("decision_date", Date),
            ("received_at", Time),
            ("body", Text),
            ("warnings", Text),
            ("status", Text),
            ("effective_until", Date),
            ("end_reason", Text),
            ("end_note", Text),
            ("natural_key", Text),
            ("content_hash", Text),
            ("revision", Int),
            ("removal", Text),
            ("level", Text),
            ("public_id", Text),
            ("publicity_rule", Text),
            ("publicity_start", Date),
            ("publicity_end", Date),
        ],
        "seq",
    ),
    (
        "record_revisions",
        &[
            ("record_id", Text),
            ("revision", Int),
            ("item_version", Int),
            ("body", Text),
            ("warnings", Text),
            ("replaced_at", Time),
            ("replaced_by", Text),
            ("reason", Text),
        ],
        "rowid",
    ),
    (
        "credit_reviews",
        &[
            ("id", Text),
            ("agency", Text),
            ("subject_key", Text),
            ("purpose", Text),
            ("issued_at", Time),
            ("document", Bytes),
        ],
        "rowid",
    ),
    (
        "grade_rules",
        &[
            ("version", Int),
            ("document", Text),
            ("created_at", Text),
            ("created_by", Text),
            ("reason", Text),
        ],
        "version",
    ),
    (
        "subject_grades",
        &[
            ("subject_key", Text),
            ("grade", Text),
            ("rule", Text),
            ("rules_version", Int),
            ("region", Text),
            ("review_after", Date),
            ("assessed_at", Time),
        ],
        "subject_key",
    ),
    (
        "idempotency",
        &[
            ("participant", Text),
            ("key", Text),
            ("request_hash", Text),
            ("status", Int),
            ("response", Bytes),
            ("created_at", BigInt),
        ],
        "rowid",
    ),
    (
        "notices",
        &[
            ("id", Text),
            ("kind", Text),
            ("item", Text),
            ("item_version", Int),
            ("record_id", Text),
            ("source", Text),
            ("severity", Text),
            ("region", Text),
            ("measures", Text),
            ("effective_from", Date),
            ("effective_until", Date),
            ("issued_at", Time),
            ("lifts", Text),
            ("reason", Text),
            ("corrects", Text),
            ("historical", Bool),
            ("grade", Text),
        ],
        "rowid",
    ),
    (
        "deliveries",
        &[
            ("seq", BigInt),
            ("id", Text),
            ("notice_id", Text),
            ("subscription", Text),
            ("agency", Text),
            ("mode", Text),
            ("state", Text),
            ("attempts", Int),
            ("next_attempt_at", BigInt),
            ("lease_until", BigInt),
            ("last_error", Text),
            ("created_at", Time),
            ("delivered_at", Time),
            ("claims", BigInt),
            ("pos", BigInt),
        ],
        "seq",
    ),
    (
        "agency_streams",
        &[("agency", Text), ("last_pos", BigInt)],
        "agency",
    ),
    (
        "pull_positions",
        &[("agency", Text), ("position", BigInt), ("updated_at", Time)],
        "agency",
    ),
    (
        "feedback",
        &[
            ("notice_id", Text),
            ("agency", Text),
            ("measure", Text),
            ("outcome", Text),
            ("date", Date),
            ("note", Text),
            ("received_at", Time),
        ],
        "rowid",
    ),
    (
        "catalog_versions",
        &[
            ("item", Text),
            ("version", Int),
            ("definition", Text),
            ("created_at", Time),
            ("created_by", Text),
            ("reason", Text),
            ("breaking", Bool),
        ],
        "item, version",
    ),
    (
        "catalog_active",
        &[("item", Text), ("version", Int)],
        "item",
    ),
    (
        "registry",
        &[
            ("kind", Text),
            ("id", Text),
            ("body", Text),
            ("updated_at", Time),
            ("updated_by", Text),
        ],
        "rowid",
    ),
    (
        "audit",
        &[
            ("seq", BigInt),
            ("at", Text),
            ("actor", Text),
            ("action", Text),
            ("subject", Text),
            ("details", Text),
            ("prev_hash", Text),
            ("hash", Text),
        ],
        "seq",
    ),
    (
        "audit_checkpoints",
        &[
            ("seq", BigInt),
            ("head_hash", Text),
            ("at", Text),
            ("mac", Text),
        ],
        "seq",
    ),
    (
        "endpoint_health",
        &[
            ("subscription", Text),
            ("failures", Int),
            ("paused_until", BigInt),
        ],
        "subscription",
    ),
];

/// Rows inserted per statement batch.
const CHUNK: usize = 500;

fn convert(
    v: Sql,
    col: Col,
    table: &str,
    name: &str,
) -> Result<Box<dyn ToSql + Sync + Send>, String> {
    let bad = |what: &str| format!("{table}.{name}: {what}");
    Ok(match (col, v) {
        (Text, Sql::Null) => Box::new(None::<String>),
        (Text, Sql::Text(t)) => Box::new(Some(t)),
        (Int, Sql::Integer(n)) => Box::new(i32::try_from(n).map_err(|_| bad("out of range"))?),
        (Int, Sql::Null) => Box::new(None::<i32>),
        (BigInt, Sql::Integer(n)) => Box::new(Some(n)),
        (BigInt, Sql::Null) => Box::new(None::<i64>),
        (Bool, Sql::Integer(n)) => Box::new(n != 0),
        (Bytes, Sql::Blob(b)) => Box::new(b),
        (Bytes, Sql::Text(t)) => Box::new(t.into_bytes()),
        (Date, Sql::Null) => Box::new(None::<time::Date>),
        (Date, Sql::Text(t)) => Box::new(Some(
            crate::codes::parse_iso_date(&t).ok_or_else(|| bad("not a date"))?,
        )),
        (Time, Sql::Null) => Box::new(None::<time::OffsetDateTime>),
        (Time, Sql::Text(t)) => Box::new(Some(
            super::shared::parse_time(&t).map_err(|e| bad(&e.to_string()))?,
        )),
        (_, other) => return Err(bad(&format!("unexpected {:?}", other.data_type()))),
    })
}

/// What a migration copied.
#[derive(Debug)]
pub struct Migrated {
    /// Rows per table.
    pub tables: Vec<(&'static str, usize)>,
    /// The audit chain's verification on the target.
    pub audit: crate::audit::Report,
}

/// Copies the SQLite database at `from` into the empty PostgreSQL database
/// of `to` and verifies the audit chain there with `audit_key`.
pub async fn sqlite_to_postgres(
    from: &Path,
    to: PgOptions,
    audit_key: Vec<u8>,
) -> Result<Migrated, String> {
    if !from.is_file() {
        return Err(format!("{}: no such database", from.display()));
    }
    // Bring the source to the current schema (what this release reads).
    super::sqlite::upgrade(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    // Create the target schema, then copy into it in one transaction.
    let target = PgStore::open(to.clone(), audit_key.clone(), metrics)
        .await
        .map_err(|e| e.to_string())?;
    super::Store::close(&target).await;
    drop(target);
    let cfg: tokio_postgres::Config = to.url.parse().map_err(|e| format!("store url: {e}"))?;
    let (mut client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| super::postgres::connect_err(&cfg, &e))?;
    let conn = tokio::spawn(conn);
    let busy: i64 = client
        .query_one(
            "SELECT (SELECT COUNT(*) FROM records) + (SELECT COUNT(*) FROM audit)",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if busy > 0 {
        return Err("the target database already holds records or audit entries; migrate into an empty database".into());
    }
    let src =
        rusqlite::Connection::open_with_flags(from, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("{}: {e}", from.display()))?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    // The target's own seed rows (none in an empty database but the audit
    // head) make way for the source's.
    tx.batch_execute("DELETE FROM catalog_active; DELETE FROM catalog_versions; DELETE FROM registry; DELETE FROM audit_checkpoints;")
        .await
        .map_err(|e| e.to_string())?;
    let mut tables = Vec::new();
    for (table, cols, order) in TABLES {
        let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
        let select = format!("SELECT {} FROM {table} ORDER BY {order}", names.join(", "));
        let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT DO NOTHING",
                names.join(", "),
                placeholders.join(", ")
            ))
            .await
            .map_err(|e| format!("{table}: {e}"))?;
        let mut stmt = src.prepare(&select).map_err(|e| format!("{table}: {e}"))?;
        let mut rows = stmt.query([]).map_err(|e| format!("{table}: {e}"))?;
        let mut copied = 0;
        let mut chunk: Vec<Vec<Box<dyn ToSql + Sync + Send>>> = Vec::with_capacity(CHUNK);
        loop {
            let row = rows.next().map_err(|e| format!("{table}: {e}"))?;
            if let Some(row) = row {
                let mut values = Vec::with_capacity(cols.len());
                for (i, (name, col)) in cols.iter().enumerate() {
                    let v: Sql = row.get(i).map_err(|e| format!("{table}.{name}: {e}"))?;
                    values.push(convert(v, *col, table, name)?);
                }
                chunk.push(values);
            }
            if chunk.len() == CHUNK || (row_is_last(&chunk, row.is_none())) {
                // Pipelined: the chunk's inserts go out without waiting.
                let results = futures_util::future::join_all(chunk.iter().map(|values| {
                    let params: Vec<&(dyn ToSql + Sync)> = values
                        .iter()
                        .map(|v| v.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    let (tx, insert) = (&tx, &insert);
                    async move { tx.execute(insert, &params).await }
                }))
                .await;
                for r in results {
                    copied += r.map_err(|e| format!("{table}: {e}"))? as usize;
                }
                chunk.clear();
            }
            if row.is_none() {
                break;
            }
        }
        tables.push((*table, copied));
    }
    // Checkpoints kept only in the file beside the SQLite database.
    let mut from_file = 0;
    for cp in crate::audit::read_checkpoint_file(from)? {
        from_file += tx
            .execute(
                "INSERT INTO audit_checkpoints (seq, head_hash, at, mac) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&cp.seq, &cp.head_hash, &cp.at, &cp.mac],
            )
            .await
            .map_err(|e| format!("audit checkpoint file: {e}"))? as usize;
    }
    tables.push(("audit_checkpoints (file)", from_file));
    tx.batch_execute(
        "UPDATE audit_head SET seq = a.seq, hash = a.hash FROM (SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1) a WHERE audit_head.id = 1;
         SELECT setval(pg_get_serial_sequence('deliveries', 'seq'), GREATEST((SELECT MAX(seq) FROM deliveries), 1));
         INSERT INTO grade_marks (subject_key, mark) SELECT k, nextval('grade_mark_seq') FROM
             (SELECT DISTINCT subject_key FROM records WHERE subject_key IS NOT NULL) AS t(k) ON CONFLICT DO NOTHING;",
    )
    .await
    .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    drop(client);
    let _ = conn.await;
    let audit = super::postgres::verify_audit(&to, &audit_key).await?;
    Ok(Migrated { tables, audit })
}

/// Whether a partly filled chunk must be flushed: at the end of the rows.
fn row_is_last<T>(chunk: &[T], ended: bool) -> bool {
    ended && !chunk.is_empty()
}
