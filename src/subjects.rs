//! The per-subject record cache credit review reports are assembled from.
//!
//! A report about a subject reads every record about it; asked again and
//! again about the same bidder, that is the same read. The cache keeps a
//! subject's records (all items, every status) in memory until something
//! about the subject changes: this instance drops the subject at once when
//! it commits, corrects or ends one of its records, and everything when
//! the expiry task ends records. Writes this instance cannot see (another
//! instance on a shared database, `credgate import` beside a running
//! gateway) are bounded by the time to live.
//!
//! A read racing a commit must not put the state before the commit back
//! into the cache after the commit dropped it. Each subject hashes to one
//! of [`SLOTS`] generation counters; a commit bumps the counter before it
//! drops the entry, and a read stores what it read only if the counter did
//! not move while it read.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::store::{Store, StoreError, StoredRecord};

/// Generation counters; a commit about one subject stops concurrent reads
/// of the `1 / SLOTS` of subjects sharing its counter from filling.
const SLOTS: usize = 4096;

/// What one cached record is reckoned to take (the parsed body dominates).
const RECORD_WEIGHT: u32 = 4096;

/// Records about one subject, read together.
pub type SubjectRecords = Arc<Vec<StoredRecord>>;

/// Told the key of a subject that changed; must not block.
pub type Listener = Box<dyn Fn(&str) + Send + Sync>;

/// See the module documentation.
pub struct SubjectCache {
    entries: Option<moka::sync::Cache<String, SubjectRecords>>,
    generations: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    /// Told the key of every subject that changed (the grader).
    listener: std::sync::OnceLock<Listener>,
}

impl std::fmt::Debug for SubjectCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectCache")
            .field("enabled", &self.entries.is_some())
            .finish_non_exhaustive()
    }
}

impl SubjectCache {
    /// A cache of about `mib` MiB whose entries live at most `ttl`;
    /// `mib == 0` or a zero `ttl` disables it (every report reads the
    /// store).
    pub fn new(mib: u64, ttl: Duration) -> SubjectCache {
        let entries = (mib > 0 && !ttl.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(mib.saturating_mul(1 << 20))
                .weigher(|k: &String, v: &SubjectRecords| {
                    let n = u32::try_from(v.len()).unwrap_or(u32::MAX);
                    n.saturating_mul(RECORD_WEIGHT)
                        .saturating_add(u32::try_from(k.len()).unwrap_or(0) + 64)
                })
                .time_to_live(ttl)
                .build()
        });
        SubjectCache {
            entries,
            generations: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            listener: std::sync::OnceLock::new(),
        }
    }

    /// No cache (the import tool, which issues no reports).
    pub fn disabled() -> SubjectCache {
        SubjectCache::new(0, Duration::ZERO)
    }

    fn generation(&self, subject_key: &str) -> &AtomicU64 {
        &self.generations[(self.hasher.hash_one(subject_key) as usize) % SLOTS]
    }

    /// Has `listener` told of every subject that changes from now on.
    pub fn listen(&self, listener: Listener) {
        let _ = self.listener.set(listener);
    }

    /// Forgets a subject, and tells the listener; call after a change
    /// about it is durable.
    pub fn invalidate(&self, subject_key: &str) {
        self.generation(subject_key).fetch_add(1, Ordering::AcqRel);
        if let Some(e) = &self.entries {
            e.invalidate(subject_key);
        }
        if let Some(l) = self.listener.get() {
            l(subject_key);
        }
    }

    /// Forgets every subject (records ended in bulk).
    pub fn invalidate_all(&self) {
        for g in self.generations.iter() {
            g.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(e) = &self.entries {
            e.invalidate_all();
        }
    }

    /// Every record about the subject, from the cache or the store; what
    /// is read from the store is kept (a credit review report: the same
    /// subject is likely to be asked about again).
    pub async fn records(
        &self,
        store: &dyn Store,
        subject_key: &str,
        items: Vec<String>,
    ) -> Result<SubjectRecords, StoreError> {
        let keys = [subject_key.to_owned()];
        let mut read = self.read(store, &keys, items, true).await?;
        Ok(read.pop().unwrap_or_default())
    }

    /// [`SubjectCache::records`] of each of `subject_keys`, in their order,
    /// without keeping what is read from the store: the grader reads every
    /// subject that changed, most of which nobody asks a report about, and
    /// filling the cache with them would push out the subjects reviews do
    /// ask about (and take up to `review.cache_mib` under a bulk load).
    /// The subjects not in the cache are read in one go.
    pub async fn records_read_through(
        &self,
        store: &dyn Store,
        subject_keys: &[String],
        items: Vec<String>,
    ) -> Result<Vec<SubjectRecords>, StoreError> {
        self.read(store, subject_keys, items, false).await
    }

    async fn read(
        &self,
        store: &dyn Store,
        keys: &[String],
        items: Vec<String>,
        keep: bool,
    ) -> Result<Vec<SubjectRecords>, StoreError> {
        // Each subject asked for once: from the cache, or read below.
        let mut answers: HashMap<String, SubjectRecords> = HashMap::with_capacity(keys.len());
        let mut missing = BTreeSet::new();
        for key in keys {
            if answers.contains_key(key) || missing.contains(key) {
                continue;
            }
            match self.entries.as_ref().and_then(|e| e.get(key)) {
                Some(hit) => {
                    answers.insert(key.clone(), hit);
                }
                None => {
                    missing.insert(key.clone());
                }
            }
        }
        if !missing.is_empty() {
            let missing: Vec<String> = missing.into_iter().collect();
            let before: Vec<u64> = missing
                .iter()
                .map(|k| self.generation(k).load(Ordering::Acquire))
                .collect();
            let mut found: HashMap<String, Vec<StoredRecord>> = HashMap::new();
            for (subject, record) in store.subjects_records(missing.clone(), items).await? {
                found.entry(subject).or_default().push(record);
            }
            for (key, before) in missing.into_iter().zip(before) {
                let records = Arc::new(found.remove(&key).unwrap_or_default());
                if let Some(e) = self.entries.as_ref().filter(|_| keep) {
                    if self.generation(&key).load(Ordering::Acquire) == before {
                        e.insert(key.clone(), records.clone());
                    }
                }
                answers.insert(key, records);
            }
        }
        Ok(keys
            .iter()
            .map(|k| answers.get(k).cloned().unwrap_or_default())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_moves_the_subjects_generation() {
        let c = SubjectCache::new(1, Duration::from_secs(60));
        let before = c.generation("a").load(Ordering::Acquire);
        c.invalidate("a");
        assert_eq!(c.generation("a").load(Ordering::Acquire), before + 1);
        c.invalidate_all();
        assert_eq!(c.generation("a").load(Ordering::Acquire), before + 2);
    }

    /// The grader's reads do not fill the cache; a review's do, and the
    /// grader then reads what the review kept.
    #[tokio::test]
    async fn only_reviews_fill_the_cache() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::store::sqlite::SqliteStore::open(
            &dir.path().join("credgate.db"),
            &crate::store::sqlite::SqliteOptions {
                page_cache_mib: 1,
                ..Default::default()
            },
            vec![7; 32],
            Arc::new(crate::metrics::Metrics::new()),
        )
        .expect("store");
        let c = SubjectCache::new(1, Duration::from_secs(60));
        let kept = |c: &SubjectCache| c.entries.as_ref().is_some_and(|e| e.contains_key("s"));
        let one = ["s".to_owned()];
        let graded = c
            .records_read_through(&store, &one, vec![])
            .await
            .expect("read");
        assert!(!kept(&c), "the grader filled the cache");
        let reviewed = c.records(&store, "s", vec![]).await.expect("read");
        assert!(kept(&c), "a review did not fill the cache");
        assert!(!Arc::ptr_eq(&graded[0], &reviewed));
        // Several subjects, one of them kept and one asked twice: each
        // answer in the order asked, the kept one from the cache.
        let keys = ["t".to_owned(), "s".to_owned(), "t".to_owned()];
        let again = c
            .records_read_through(&store, &keys, vec![])
            .await
            .expect("read");
        assert_eq!(again.len(), 3);
        assert!(
            Arc::ptr_eq(&again[1], &reviewed),
            "the grader read past the cache"
        );
        assert!(Arc::ptr_eq(&again[0], &again[2]));
        assert!(!c.entries.as_ref().is_some_and(|e| e.contains_key("t")));
    }

    #[test]
    fn zero_disables() {
        assert!(SubjectCache::new(0, Duration::from_secs(5))
            .entries
            .is_none());
        assert!(SubjectCache::disabled().entries.is_none());
        assert!(SubjectCache::new(1, Duration::from_secs(5))
            .entries
            .is_some());
    }
}
