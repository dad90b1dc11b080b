//! The tamper-evident audit log: hashing of the chain, keyed checkpoints,
//! and offline verification (`credgate audit verify`).
//!
//! Every entry carries the SHA-256 of the previous entry's hash and its own
//! content, so changing or deleting an entry breaks every later link.
//! Checkpoints (the chain head at a sequence number, keyed with a MAC derived
//! from the gateway secret) are kept in the database and, independently, in
//! `audit-checkpoints.jsonl` beside it, so cutting off the tail is detected
//! too. Entries never hold non-public field values: submissions are logged
//! by record id and counts.

use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash of the (absent) entry before the first one.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// RFC 3339 time.
    pub at: String,
    /// Who: a participant id, or `gateway`.
    pub actor: String,
    /// What, e.g. `submission`, `catalog.activate`, `delivery.delivered`.
    pub action: String,
    /// What it is about (record, item, participant id…).
    pub subject: String,
    /// Details (JSON, exactly as hashed), never non-public field values.
    pub details: Box<serde_json::value::RawValue>,
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// Hash of this entry.
    pub hash: String,
}

/// The hash of an entry's content chained to `prev_hash`.
pub fn entry_hash(
    prev_hash: &str,
    seq: i64,
    at: &str,
    actor: &str,
    action: &str,
    subject: &str,
    details: &str,
) -> String {
    let mut h = Sha256::new();
    for part in [
        prev_hash,
        &seq.to_string(),
        at,
        actor,
        action,
        subject,
        details,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A signed statement of the chain head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// Last entry covered.
    pub seq: i64,
    /// Its hash.
    pub head_hash: String,
    /// When the checkpoint was made.
    pub at: String,
    /// HMAC-SHA256 over seq and head, keyed from the gateway secret.
    pub mac: String,
}

/// The checkpoint key, derived from the gateway secret so the audit key and
/// the pseudonym key are never the same bytes.
pub fn checkpoint_key(gateway_secret: &[u8]) -> Vec<u8> {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(gateway_secret) else {
        return Vec::new();
    };
    mac.update(b"credgate audit checkpoint key v1");
    mac.finalize().into_bytes().to_vec()
}

/// The MAC of a checkpoint.
pub fn checkpoint_mac(key: &[u8], seq: i64, head_hash: &str, at: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(format!("{seq}\n{head_hash}\n{at}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The checkpoint file beside a database.
pub fn checkpoint_file(db: &Path) -> PathBuf {
    db.with_file_name("audit-checkpoints.jsonl")
}

/// Appends a checkpoint to the file (fsync'd).
pub fn append_checkpoint_file(db: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(checkpoint_file(db))?;
    let line = serde_json::to_string(cp).map_err(std::io::Error::other)?;
    f.write_all(line.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// What `audit verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Entries checked.
    pub entries: i64,
    /// Checkpoints checked (database and file).
    pub checkpoints: usize,
    /// The first problem, if any.
    pub problem: Option<String>,
    /// The newest checkpoint (by chain position), if any.
    pub latest_checkpoint: Option<Checkpoint>,
}

impl Report {
    fn of(entries: i64, checkpoints: &[Checkpoint], problem: Option<String>) -> Report {
        Report {
            entries,
            checkpoints: checkpoints.len(),
            problem,
            latest_checkpoint: checkpoints.iter().max_by_key(|c| c.seq).cloned(),
        }
    }
}

/// Checks the whole chain and every checkpoint. `entries` must be in
/// sequence order; `checkpoints` come from the database and the file.
pub fn verify(
    entries: impl IntoIterator<Item = Entry>,
    checkpoints: &[Checkpoint],
    key: &[u8],
) -> Report {
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = 1;
    let mut count = 0;
    let mut hashes = std::collections::HashMap::new();
    for e in entries {
        count += 1;
        let fail = |msg: String| Report::of(count, checkpoints, Some(msg));
        if e.seq != expected_seq {
            return fail(format!(
                "entry {} follows entry {}: entries are missing",
                e.seq,
                expected_seq - 1
            ));
        }
        if e.prev_hash != prev {
            return fail(format!("entry {}: its link to entry {} is broken (an entry before it was changed or removed)", e.seq, e.seq - 1));
        }
        let h = entry_hash(
            &e.prev_hash,
            e.seq,
            &e.at,
            &e.actor,
            &e.action,
            &e.subject,
            e.details.get(),
        );
        if h != e.hash {
            return fail(format!(
                "entry {}: its content does not match its hash (the entry was changed)",
                e.seq
            ));
        }
        hashes.insert(e.seq, e.hash.clone());
        prev = e.hash;
        expected_seq += 1;
    }
    let last = expected_seq - 1;
    for cp in checkpoints {
        let fail = |msg: String| Report::of(count, checkpoints, Some(msg));
        if checkpoint_mac(key, cp.seq, &cp.head_hash, &cp.at) != cp.mac {
            return fail(format!(
                "checkpoint at entry {} ({}) has an invalid signature",
                cp.seq, cp.at
            ));
        }
        match hashes.get(&cp.seq) {
            None if cp.seq > last => {
                return fail(format!(
                    "the log ends at entry {last} but a checkpoint of {} covers entry {}: the tail was cut off",
                    cp.at, cp.seq
                ))
            }
            Some(h) if *h != cp.head_hash => {
                return fail(format!("entry {} does not match the checkpoint of {}", cp.seq, cp.at))
            }
            _ => {}
        }
    }
    Report::of(count, checkpoints, None)
}

/// Reads the checkpoint file (missing = none); malformed lines are errors.
pub fn read_checkpoint_file(db: &Path) -> Result<Vec<Checkpoint>, String> {
    let path = checkpoint_file(db);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: i64) -> Vec<Entry> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let details = serde_json::value::to_raw_value(&json!({"n": seq})).expect("raw");
                let hash = entry_hash(&prev, seq, "t", "a", "act", "s", details.get());
                let e = Entry {
                    seq,
                    at: "t".into(),
                    actor: "a".into(),
                    action: "act".into(),
                    subject: "s".into(),
                    details,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    fn cp(key: &[u8], e: &Entry) -> Checkpoint {
        Checkpoint {
            seq: e.seq,
            head_hash: e.hash.clone(),
            at: "now".into(),
            mac: checkpoint_mac(key, e.seq, &e.hash, "now"),
        }
    }

    #[test]
    fn detects_change_deletion_truncation_and_forgery() {
        let key = checkpoint_key(b"secret-secret-secret-secret-secret");
        let entries = chain(5);
        let cps = vec![cp(&key, &entries[4])];
        assert_eq!(verify(entries.clone(), &cps, &key).problem, None);

        let mut changed = entries.clone();
        changed[2].details = serde_json::value::to_raw_value(&json!({"n": 99})).expect("raw");
        assert!(verify(changed, &cps, &key)
            .problem
            .is_some_and(|p| p.contains("entry 3")));

        let mut deleted = entries.clone();
        deleted.remove(1);
        assert!(verify(deleted, &cps, &key)
            .problem
            .is_some_and(|p| p.contains("missing")));

        let truncated = entries[..3].to_vec();
        assert!(verify(truncated, &cps, &key)
            .problem
            .is_some_and(|p| p.contains("cut off")));

        let forged = vec![cp(
            &checkpoint_key(b"another-secret-another-secret-xx"),
            &entries[2],
        )];
        assert!(verify(entries, &forged, &key)
            .problem
            .is_some_and(|p| p.contains("signature")));
    }
}

/// The audit chain verified by the running gateway: once at start (in the
/// background) and whenever an administrator asks
/// (`POST /admin/v1/audit/verify`); the latest result is kept for the
/// console and `GET /admin/v1/audit/verify`.
pub struct AuditCheck {
    config: crate::config::Config,
    key: Vec<u8>,
    /// The latest verification and when it finished.
    latest: std::sync::Mutex<Option<(std::time::Instant, Verification)>>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// One verification of the whole chain.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// When it finished (RFC 3339).
    pub verified_at: String,
    /// Whether the chain and every checkpoint held.
    pub intact: bool,
    /// How long it took, in seconds.
    pub seconds: f64,
    /// What was checked and found.
    #[serde(flatten)]
    pub report: Report,
}

impl AuditCheck {
    /// A checker of the configured store's chain, with the checkpoint key.
    pub fn new(config: crate::config::Config, key: Vec<u8>) -> AuditCheck {
        AuditCheck {
            config,
            key,
            latest: std::sync::Mutex::new(None),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Verifies the whole chain now (one verification at a time; a caller
    /// arriving while one runs gets that one's result).
    pub async fn run(self: &std::sync::Arc<Self>) -> Result<Verification, String> {
        let asked = std::time::Instant::now();
        let _turn = self.one_at_a_time.lock().await;
        // One that finished while this caller waited for its turn answers.
        if let Some((at, done)) = self.latest.lock().ok().and_then(|l| l.clone()) {
            if at > asked {
                return Ok(done);
            }
        }
        let this = self.clone();
        let started = std::time::Instant::now();
        let report = tokio::task::spawn_blocking(move || {
            crate::store::verify_audit_of(&this.config, &this.key)
        })
        .await
        .map_err(|e| e.to_string())??;
        let v = Verification {
            verified_at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            intact: report.problem.is_none(),
            seconds: started.elapsed().as_secs_f64(),
            report,
        };
        if let Ok(mut latest) = self.latest.lock() {
            *latest = Some((std::time::Instant::now(), v.clone()));
        }
        Ok(v)
    }

    /// The latest verification, if one has finished.
    pub fn latest(&self) -> Option<Verification> {
        self.latest
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|(_, v)| v.clone()))
    }
}
