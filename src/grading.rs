//! Keeps every subject's stored credit grade current and tells the agencies
//! that subscribe to `grade_change` when it moves.
//!
//! A subject is assessed again, in the background, right after a change
//! about it is durable on this instance (the subject cache's change feed:
//! a record committed, corrected or ended), on the day its grade may move
//! with time (a rule's period closes, a record's effect ends: the stored
//! `review_after`), and for every subject after a new rule set version or
//! when an administrator asks (`POST /admin/v1/grades/reassess`, e.g. after
//! `credgate import`). Changed subjects wait in a bounded [`Backlog`]
//! (`review.grade_backlog_max`). The store also gives a subject a new
//! grade mark in the transaction of every change to its records, and the
//! grader deletes the mark it read before assessing, if it is still the
//! subject's: at start-up, and after the backlog overflowed, every subject
//! with a mark is assessed, so no change is missed, even across a crash.
//! The store compares with the stored grade under the subject's lock, so a
//! change is notified once even when instances assess at once. Reports do
//! not depend on this: they grade the records they list, with the active
//! rules, as they are assembled.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use time::Date;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, NoticeType, Severity};
use crate::grades::{Fact, Grade, RuleSet};
use crate::notice::NoticeKind;
use crate::routing::NoticeFacts;
use crate::store::{GradeNotice, GradeUpdate, NewNotice, Store, StoreError, StoredRecord};
use crate::subjects::SubjectCache;

/// Subjects assessed in one store transaction.
const BATCH: usize = 200;

/// Batches assessed at once: while one batch's grades wait for the
/// writer, the next ones read their marks and records.
const IN_FLIGHT: usize = 4;

/// The rule set in force and its version.
#[derive(Debug)]
pub struct ActiveRules {
    /// Version in the store.
    pub version: u32,
    /// The rules.
    pub set: RuleSet,
}

/// A record's state on `today` (as in reports).
pub fn in_effect(r: &StoredRecord, today: Date) -> bool {
    r.status == "active" && r.effective_until.is_none_or(|u| u >= today)
}

/// What grading needs of a subject's records in effect.
pub fn facts<'a>(catalog: &Catalog, records: &'a [StoredRecord], today: Date) -> Vec<Fact<'a>> {
    records
        .iter()
        .filter(|r| in_effect(r, today))
        .filter_map(|r| {
            let item = catalog.get(&r.item)?;
            let rule = item.def.notice.as_ref()?;
            Some(Fact {
                record_id: &r.id,
                item: &r.item,
                notice_type: rule.notice_type,
                level: r.body.level(item),
                decision_date: r.decision_date,
            })
        })
        .collect()
}

/// The rule set in force: the stored one, or at the first start `file`
/// (already checked), stored as version 1.
pub async fn stored_rules(
    store: &dyn Store,
    file: RuleSet,
    catalog: &Catalog,
) -> Result<ActiveRules, String> {
    match store.grade_rules(None).await {
        Ok(Some((version, doc))) => Ok(ActiveRules {
            version,
            set: RuleSet::from_json(&doc, catalog).map_err(|e| {
                format!(
                    "stored grade rules (version {version}) no longer fit the catalog: {}",
                    e.join("; ")
                )
            })?,
        }),
        Ok(None) => {
            let doc = serde_json::to_value(&file).map_err(|e| e.to_string())?;
            let version = store
                .add_grade_rules(doc, "seed", None)
                .await
                .map_err(|e| format!("store: storing the grade rules failed: {e}"))?;
            tracing::info!(
                version,
                "grade rules stored from the rule file (first start)"
            );
            Ok(ActiveRules { version, set: file })
        }
        Err(e) => Err(format!("store: reading the grade rules failed: {e}")),
    }
}

/// Changed subjects waiting to be assessed: each once however often it
/// changed, oldest first, at most `max`. A subject that changes while the
/// backlog is full is not kept; the backlog remembers that it overflowed,
/// and the grader then assesses every subject again.
#[derive(Debug)]
pub struct Backlog {
    waiting: Mutex<Waiting>,
    ready: Notify,
    max: usize,
    overflows: Counter,
}

#[derive(Debug, Default)]
struct Waiting {
    order: VecDeque<String>,
    keys: HashSet<String>,
    overflowed: bool,
}

/// What the grader takes from the backlog at once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// Subjects, oldest first.
    pub keys: Vec<String>,
    /// Subjects were left out since the last take.
    pub overflowed: bool,
    /// Subjects still waiting.
    pub left: usize,
}

impl Backlog {
    /// An empty backlog of at most `max` subjects (the configuration
    /// refuses 0); each subject left out is counted on `overflows`.
    pub fn new(max: usize, overflows: Counter) -> Backlog {
        Backlog {
            waiting: Mutex::new(Waiting::default()),
            ready: Notify::new(),
            max,
            overflows,
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Nothing panics while holding the lock; a poisoned lock holds
        // consistent data.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a changed subject, unless it waits already; never blocks for
    /// long (a short lock, no allocation when it waits already).
    pub fn push(&self, key: &str) {
        {
            let mut w = self.waiting();
            if w.keys.contains(key) {
                return;
            }
            if w.keys.len() >= self.max {
                w.overflowed = true;
                drop(w);
                self.overflows.inc();
                return;
            }
            w.keys.insert(key.to_owned());
            w.order.push_back(key.to_owned());
        }
        self.ready.notify_one();
    }

    /// Takes up to `n` subjects, oldest first.
    pub fn take(&self, n: usize) -> Taken {
        let mut w = self.waiting();
        let n = n.min(w.order.len());
        let keys: Vec<String> = w.order.drain(..n).collect();
        for k in &keys {
            w.keys.remove(k);
        }
        Taken {
            keys,
            overflowed: std::mem::take(&mut w.overflowed),
            left: w.order.len(),
        }
    }

    /// Whether nothing waits (and nothing was left out).
    pub fn is_empty(&self) -> bool {
        let w = self.waiting();
        w.order.is_empty() && !w.overflowed
    }
}

/// See the module documentation.
pub struct Grader {
    /// The rule set in force.
    pub rules: ArcSwap<ActiveRules>,
    store: Arc<dyn Store>,
    active: crate::active::Active,
    subjects: Arc<SubjectCache>,
    metrics: Arc<crate::metrics::Metrics>,
    backlog: Arc<Backlog>,
}

impl std::fmt::Debug for Grader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grader")
            .field("rules_version", &self.rules.load().version)
            .finish_non_exhaustive()
    }
}

impl Grader {
    /// A grader with the rules in force; it hears of changes through the
    /// subject cache and keeps up to `backlog_max` of them waiting.
    pub fn new(
        rules: ActiveRules,
        store: Arc<dyn Store>,
        active: crate::active::Active,
        subjects: Arc<SubjectCache>,
        metrics: Arc<crate::metrics::Metrics>,
        backlog_max: usize,
    ) -> Arc<Grader> {
        let backlog = Arc::new(Backlog::new(
            backlog_max,
            metrics.grade_backlog_overflows.clone(),
        ));
        let queue = backlog.clone();
        subjects.listen(Box::new(move |key| queue.push(key)));
        Arc::new(Grader {
            rules: ArcSwap::from_pointee(rules),
            store,
            active,
            subjects,
            metrics,
            backlog,
        })
    }

    /// The grade `records` (every record about one subject) give today.
    pub fn grade(&self, catalog: &Catalog, records: &[StoredRecord], today: Date) -> Grade {
        let rules = self.rules.load();
        rules
            .set
            .grade(rules.version, &facts(catalog, records, today), today)
    }

    /// Puts the stored rule set in force if it is not already; assesses
    /// every subject again if `reassess`.
    pub async fn reload(self: &Arc<Self>, catalog: &Catalog, reassess: bool) -> Result<(), String> {
        let Some((version, doc)) = self
            .store
            .grade_rules(None)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        if version == self.rules.load().version {
            return Ok(());
        }
        let set = RuleSet::from_json(&doc, catalog).map_err(|e| e.join("; "))?;
        self.rules.store(Arc::new(ActiveRules { version, set }));
        if reassess {
            self.reassess_all();
        }
        Ok(())
    }

    /// Puts a new rule set in force and assesses every subject again.
    pub fn replace(self: &Arc<Self>, rules: ActiveRules) {
        let changed = rules.version != self.rules.load().version;
        self.rules.store(Arc::new(rules));
        if changed {
            self.reassess_all();
        }
    }

    /// Assesses every subject with records again, in the background.
    pub fn reassess_all(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut after = String::new();
            loop {
                match me.store.subjects_after(&after, 1000).await {
                    Ok(keys) if keys.is_empty() => break,
                    Ok(keys) => {
                        if let Some(last) = keys.last() {
                            after.clone_from(last);
                        }
                        me.assess_in_batches(&keys).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "listing subjects to assess failed");
                        break;
                    }
                }
            }
            tracing::info!("every subject's grade assessed again");
        });
    }

    /// Runs until `shutdown`: assesses subjects as changes arrive and, every
    /// `due_every`, those whose grade may have moved with time. After the
    /// backlog overflowed, it also goes through every subject with records,
    /// a batch at a time beside the changes (again from the start if it
    /// overflows again meanwhile).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, due_every: Duration) {
        let mut due = tokio::time::interval(due_every);
        // Where the sweep of ungraded subjects has got to: from the start,
        // for the changes the last run left (a restart, a crash), and
        // again after an overflow.
        let mut sweep: Option<String> = Some(String::new());
        let mut swept = 0usize;
        loop {
            let mut keys = BTreeSet::new();
            let busy = sweep.is_some() || !self.backlog.is_empty();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = due.tick() => {
                    match self.store.grades_due(crate::codes::today_cst(), 1000).await {
                        Ok(k) => keys.extend(k),
                        Err(e) => tracing::error!(error = %e, "listing grades due failed"),
                    }
                }
                _ = self.backlog.ready.notified(), if !busy => {}
                _ = std::future::ready(()), if busy => {}
            }
            let taken = self.backlog.take(BATCH * IN_FLIGHT);
            keys.extend(taken.keys);
            self.metrics.grade_backlog.set(taken.left as i64);
            if taken.overflowed {
                tracing::warn!(
                    "the grading backlog was full: some changed subjects were not queued; assessing every ungraded subject"
                );
                sweep = Some(String::new());
            }
            if let Some(after) = &sweep {
                match self.store.ungraded_after(after, BATCH * IN_FLIGHT).await {
                    Ok(more) => {
                        sweep = more.last().cloned();
                        swept += more.len();
                        if sweep.is_none() && swept > 0 {
                            tracing::info!(
                                subjects = swept,
                                "every subject with an ungraded change assessed"
                            );
                            swept = 0;
                        }
                        keys.extend(more);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "listing subjects to assess failed; trying again in a second");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
            let keys: Vec<String> = keys.into_iter().collect();
            self.assess_in_batches(&keys).await;
        }
    }

    /// Assesses `keys` (each once), [`IN_FLIGHT`] batches at a time; a
    /// batch that fails is logged, and assessed again at its subjects'
    /// next change or mark sweep.
    async fn assess_in_batches(&self, keys: &[String]) {
        futures_util::stream::iter(keys.chunks(BATCH))
            .for_each_concurrent(IN_FLIGHT, |chunk| async move {
                if let Err(e) = self.assess(chunk).await {
                    tracing::error!(error = %e, subjects = chunk.len(), "assessing grades failed; they are assessed at their next change");
                }
            })
            .await;
    }

    /// Assesses `keys` now and stores their grades (and any change notice).
    pub async fn assess(&self, keys: &[String]) -> Result<usize, StoreError> {
        let catalog = self.active.catalog.load_full();
        let subscriptions = self.active.subscriptions.load_full();
        let registry = self.active.registry.load_full();
        let rules = self.rules.load_full();
        let today = crate::codes::today_cst();
        let items: Vec<String> = catalog.items().map(|i| i.def.id.clone()).collect();
        let default_grade = rules
            .set
            .rules
            .last()
            .map(|r| r.grade.clone())
            .unwrap_or_default();
        // Marks before records: a change committed after this read gives
        // its subject a new mark, which stays (and so does the need).
        let marks = self.store.grade_marks(keys.to_vec()).await?;
        let mut updates = Vec::with_capacity(keys.len());
        let read = self
            .subjects
            .records_read_through(self.store.as_ref(), keys, items)
            .await?;
        for (key, records) in keys.iter().zip(read) {
            let Some(latest) = records.iter().max_by_key(|r| (r.received_at, &r.id)) else {
                continue;
            };
            let facts = facts(&catalog, &records, today);
            let grade = rules.set.grade(rules.version, &facts, today);
            // The grade may move with time: when a rule's period closes,
            // or the effect of a record ends.
            let ends = records
                .iter()
                .filter(|r| in_effect(r, today))
                .filter_map(|r| r.effective_until.and_then(|u| u.next_day()));
            let review_after = rules
                .set
                .next_change(&facts, today)
                .into_iter()
                .chain(ends)
                .min();
            let (region, subject_type) = latest.body.subject_facts();
            let deliveries = crate::ingest::routed_deliveries(
                &subscriptions,
                &registry,
                &NoticeFacts {
                    item: &latest.item,
                    notice_type: NoticeType::GradeChange,
                    severity: Severity::General,
                    subject_type,
                    region: region.as_deref(),
                },
            );
            updates.push(GradeUpdate {
                subject_key: key.clone(),
                grade: grade.code,
                rule: grade.rule,
                rules_version: rules.version,
                region: region.clone(),
                review_after,
                default_grade: default_grade.clone(),
                // A change nobody subscribes to is stored as the grade
                // alone.
                notice: (!deliveries.is_empty()).then(|| GradeNotice {
                    notice: NewNotice {
                        id: uuid::Uuid::now_v7().to_string(),
                        kind: NoticeKind::GradeChange,
                        severity: Severity::General,
                        measures: Vec::new(),
                        effective_from: Some(today),
                        effective_until: None,
                        region,
                        deliveries,
                        lifts: None,
                        corrects: None,
                        reason: None,
                        historical: false,
                        grade: None,
                    },
                    record_id: latest.id.clone(),
                    item: latest.item.clone(),
                    item_version: latest.item_version,
                    source: latest.submitter.clone(),
                }),
            });
        }
        let n = updates.len();
        let changed = self.store.set_grades(updates, marks).await?;
        for c in &changed {
            tracing::info!(from = %c.from, to = %c.to, notice = ?c.notice_id, "credit grade changed");
        }
        self.metrics.grade_assessments.inc_by(n as u64);
        self.metrics.grade_changes.inc_by(changed.len() as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(keys: &[&str], overflowed: bool, left: usize) -> Taken {
        Taken {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            overflowed,
            left,
        }
    }

    #[test]
    fn the_backlog_keeps_each_subject_once_in_order_and_counts_what_it_leaves_out() {
        let overflows = Counter::default();
        let backlog = Backlog::new(3, overflows.clone());
        assert!(backlog.is_empty());
        for k in ["b", "a", "b", "c", "a"] {
            backlog.push(k);
        }
        assert_eq!(overflows.get(), 0);
        // Full: "d" is left out, "a" waits already.
        backlog.push("d");
        backlog.push("a");
        assert_eq!(overflows.get(), 1);
        assert!(!backlog.is_empty());
        assert_eq!(backlog.take(2), taken(&["b", "a"], true, 1));
        // The overflow is reported once; there is room again.
        backlog.push("d");
        backlog.push("b");
        assert_eq!(backlog.take(10), taken(&["c", "d", "b"], false, 0));
        assert!(backlog.is_empty());
        assert_eq!(backlog.take(10), taken(&[], false, 0));
        assert_eq!(overflows.get(), 1);
    }
}
