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

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// What every record's decision number ends with before the round is
/// written into it.
const MARK: &[u8] = b"/r0000000000";
const DIGITS: usize = 10;

/// Bodies cycled by the drivers, unique per request.
pub struct Pool {
    bodies: Vec<Bytes>,
    /// Offsets of the round digits in each body.
    marks: Vec<Vec<usize>>,
    next: AtomicU64,
}

impl Pool {
    /// A pool of the given bodies; a body without the mark is sent as is.
    pub fn new(bodies: Vec<Bytes>) -> Pool {
        let marks = bodies
            .iter()
            .map(|b| {
                b.windows(MARK.len())
                    .enumerate()
                    .filter(|(_, w)| *w == MARK)
                    .map(|(i, _)| i + MARK.len() - DIGITS)
                    .collect()
            })
            .collect();
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
        let round = s / n;
        if marks.is_empty() || round == 0 {
            return body.clone();
        }
        let mut out = body.to_vec();
        let digits = format!("{round:0width$}", width = DIGITS);
        for &at in marks {
            out[at..at + DIGITS].copy_from_slice(digits.as_bytes());
        }
        Bytes::from(out)
    }

    /// Every body of the pool as first sent (for clients that pick bodies
    /// themselves, such as oha).
    pub fn bodies(&self) -> &[Bytes] {
        &self.bodies
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
