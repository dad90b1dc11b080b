//! Request bodies for the load: prepared before the run so generating them
//! does not compete with the gateway for CPU, and made unique per request
//! while it runs.
//!
//! A pool of `n` bodies is cycled, but the gateway answers a record it
//! already holds (same natural key, same content) as a duplicate without
//! storing anything, so a cycled pool would measure duplicate detection
//! after its first `n` requests instead of durable ingest. Every record's
//! `decision_number` (part of the natural key of every keyed item) therefore
//! ends with a fixed-width round number, `/r0000000000`, that the pool
//! overwrites in place for each request: request `s` sends body `s % n`
//! with round `s / n`, so no two requests of a run carry the same record.
//! Items without a `decision_number` are sent as they are.
//!
//! The records' subjects change per request too: every subject's `uscc` or
//! `id_number` is rewritten with a valid code (check characters computed)
//! derived from the request number and the record's place in the batch.
//! A cycled pool would otherwise pile thousands of records on each of its
//! few thousand subjects, and rules that read a subject's earlier records
//! (warnings, red/black exclusion) would measure that pile, not ingest.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// What every record's decision number ends with before the round is
/// written into it.
const MARK: &[u8] = b"/r0000000000";
const DIGITS: usize = 10;

/// What is rewritten where in a body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Patch {
    /// The round digits of a decision number.
    Round,
    /// A subject's USCC (18 characters; its 8-character head is kept) in
    /// record `record` of the batch.
    Uscc { record: usize },
    /// A subject's resident ID number (18 characters) in record `record`.
    ResidentId { record: usize },
}

/// Bodies cycled by the drivers, unique per request.
pub struct Pool {
    bodies: Vec<Bytes>,
    /// Where each body is rewritten.
    marks: Vec<Vec<(usize, Patch)>>,
    next: AtomicU64,
}

/// Offsets of every `"<key>":"` value of 18 characters in `body`, in order.
fn values_of(body: &[u8], key: &str) -> Vec<usize> {
    let pattern = format!("\"{key}\":\"");
    let p = pattern.as_bytes();
    body.windows(p.len())
        .enumerate()
        .filter(|(_, w)| *w == p)
        .map(|(i, _)| i + p.len())
        .filter(|at| body.get(at + 18) == Some(&b'"'))
        .collect()
}

/// Where `body` is rewritten: round marks, and the subject codes of its
/// records in the order the records come.
fn patches(body: &[u8]) -> Vec<(usize, Patch)> {
    let mut marks: Vec<(usize, Patch)> = body
        .windows(MARK.len())
        .enumerate()
        .filter(|(_, w)| *w == MARK)
        .map(|(i, _)| (i + MARK.len() - DIGITS, Patch::Round))
        .collect();
    let mut subjects: Vec<(usize, bool)> = values_of(body, "uscc")
        .into_iter()
        .map(|at| (at, true))
        .chain(
            values_of(body, "id_number")
                .into_iter()
                .map(|at| (at, false)),
        )
        .collect();
    subjects.sort_unstable();
    for (record, (at, uscc)) in subjects.into_iter().enumerate() {
        marks.push((
            at,
            if uscc {
                Patch::Uscc { record }
            } else {
                Patch::ResidentId { record }
            },
        ));
    }
    marks
}

impl Pool {
    /// A pool of the given bodies; a body without the mark is sent as is.
    pub fn new(bodies: Vec<Bytes>) -> Pool {
        let marks = bodies.iter().map(|b| patches(b)).collect();
        Pool {
            bodies,
            marks,
            next: AtomicU64::new(0),
        }
    }

    /// The suffix a record's decision number gets so that the pool can
    /// make it unique.
    pub fn mark() -> &'static str {
        std::str::from_utf8(MARK).unwrap_or_default()
    }

    /// The next request's body: never the same record twice in a run.
    pub fn next(&self) -> Bytes {
        let n = self.bodies.len().max(1) as u64;
        let s = self.next.fetch_add(1, Ordering::Relaxed);
        let i = (s % n) as usize;
        let Some(body) = self.bodies.get(i) else {
            return Bytes::new();
        };
        let marks = &self.marks[i];
        if marks.is_empty() {
            return body.clone();
        }
        let round = s / n;
        let mut out = body.to_vec();
        let digits = format!("{round:0width$}", width = DIGITS);
        // Subject number of record r of request s: distinct for every
        // record of the run (batches hold at most 1,000 records).
        let subject = |record: usize| (s << 10) + record as u64 + (1 << 40);
        for (at, patch) in marks {
            let at = *at;
            match patch {
                Patch::Round => out[at..at + DIGITS].copy_from_slice(digits.as_bytes()),
                Patch::Uscc { record } => {
                    let head = String::from_utf8_lossy(&out[at..at + 8]).into_owned();
                    let code = credgate::synth::uscc(&head, subject(*record));
                    out[at..at + 18].copy_from_slice(code.as_bytes());
                }
                Patch::ResidentId { record } => {
                    let code = credgate::synth::resident_id(subject(*record));
                    out[at..at + 18].copy_from_slice(code.as_bytes());
                }
            }
        }
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_change_per_request_and_stay_valid() -> Result<(), String> {
        let body = |n: u64| {
            let mut r = credgate::synth::record("administrative_penalty", n, "general");
            if let Some(serde_json::Value::String(d)) = r.get_mut("decision_number") {
                d.push_str(Pool::mark());
            }
            r
        };
        // A legal entity (uscc) and a natural person (id_number), in one batch.
        let (a, b) = (
            (0..50).map(body).find(|r| r.get("uscc").is_some()),
            (0..50).map(body).find(|r| r.get("id_number").is_some()),
        );
        let records = vec![a.ok_or("no legal entity")?, b.ok_or("no person")?];
        let doc = serde_json::json!({"item": "administrative_penalty", "records": records});
        let pool = Pool::new(vec![Bytes::from(
            serde_json::to_vec(&doc).map_err(|e| e.to_string())?,
        )]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let sent: serde_json::Value =
                serde_json::from_slice(&pool.next()).map_err(|e| e.to_string())?;
            let uscc = sent["records"][0]["uscc"]
                .as_str()
                .ok_or("uscc")?
                .to_owned();
            let id = sent["records"][1]["id_number"]
                .as_str()
                .ok_or("id_number")?
                .to_owned();
            assert!(
                credgate::codes::uscc_check_char(&uscc[..17]) == uscc.chars().last(),
                "{uscc}"
            );
            assert!(
                credgate::codes::resident_id_check_char(&id[..17]) == id.chars().last(),
                "{id}"
            );
            assert_eq!(&uscc[..8], &records_head(&doc)?, "the head is kept");
            assert!(seen.insert(uscc) && seen.insert(id), "a subject came back");
            // The authority's code is not a subject's: it stays.
            assert_eq!(
                sent["records"][0]["authority_uscc"],
                doc["records"][0]["authority_uscc"]
            );
        }
        Ok(())
    }

    fn records_head(doc: &serde_json::Value) -> Result<String, String> {
        Ok(doc["records"][0]["uscc"].as_str().ok_or("uscc")?[..8].to_owned())
    }

    #[test]
    fn rounds_make_every_request_unique() -> Result<(), std::str::Utf8Error> {
        let body = |k: u32| {
            Bytes::from(format!(
                r#"{{"records":[{{"decision_number":"A{k}{m}"}},{{"decision_number":"B{k}{m}"}}]}}"#,
                m = Pool::mark()
            ))
        };
        let pool = Pool::new(vec![body(1), body(2), Bytes::from_static(b"{}")]);
        let sent: Vec<Bytes> = (0..9).map(|_| pool.next()).collect();
        let keyed: Vec<&Bytes> = sent.iter().filter(|b| b.as_ref() != b"{}").collect();
        assert_eq!(keyed.len(), 6);
        let distinct: std::collections::HashSet<&Bytes> = keyed.iter().copied().collect();
        assert_eq!(distinct.len(), 6, "a keyed body was sent twice");
        let third_round = std::str::from_utf8(&sent[6])?;
        assert!(third_round.contains("A1/r0000000002\""), "{third_round}");
        assert!(third_round.contains("B1/r0000000002\""), "{third_round}");
        assert_eq!(sent[2].as_ref(), b"{}");
        Ok(())
    }
}
