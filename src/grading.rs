//! Keeps every subject's stored credit grade current and tells the agencies
//! that subscribe to `grade_change` when it moves.
//!
//! A subject is assessed again, in the background, right after a change
//! about it is durable on this instance (the subject cache's change feed:
//! a record committed, corrected or ended), on the day its grade may move
//! with time (a rule's period closes, a record's effect ends: the stored
//! `review_after`), and for every subject after a new rule set version or
//! when an administrator asks (`POST /admin/v1/grades/reassess`, e.g. after
//! `credgate import`). The store compares with the stored grade under the
//! subject's lock, so a change is notified once even when instances assess
//! at once. Reports do not depend on this: they grade the records they
//! list, with the active rules, as they are assembled.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use time::Date;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, NoticeType, Severity};
use crate::grades::{Fact, Grade, RuleSet};
use crate::notice::NoticeKind;
use crate::routing::NoticeFacts;
use crate::store::{GradeNotice, GradeUpdate, NewNotice, Store, StoreError, StoredRecord};
use crate::subjects::SubjectCache;

/// Subjects assessed in one store transaction.
const BATCH: usize = 200;

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

/// See the module documentation.
pub struct Grader {
    /// The rule set in force.
    pub rules: ArcSwap<ActiveRules>,
    store: Arc<dyn Store>,
    active: crate::active::Active,
    subjects: Arc<SubjectCache>,
    metrics: Arc<crate::metrics::Metrics>,
    inbox: std::sync::Mutex<Option<mpsc::UnboundedReceiver<String>>>,
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
    /// subject cache.
    pub fn new(
        rules: ActiveRules,
        store: Arc<dyn Store>,
        active: crate::active::Active,
        subjects: Arc<SubjectCache>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Grader> {
        let (queue, inbox) = mpsc::unbounded_channel();
        subjects.listen(queue);
        Arc::new(Grader {
            rules: ArcSwap::from_pointee(rules),
            store,
            active,
            subjects,
            metrics,
            inbox: std::sync::Mutex::new(Some(inbox)),
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
                        for chunk in keys.chunks(BATCH) {
                            if let Err(e) = me.assess(chunk).await {
                                tracing::error!(error = %e, "assessing grades failed");
                            }
                        }
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
    /// `due_every`, those whose grade may have moved with time.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, due_every: Duration) {
        let Some(mut inbox) = self.inbox.lock().ok().and_then(|mut i| i.take()) else {
            return;
        };
        let mut due = tokio::time::interval(due_every);
        loop {
            let mut keys = BTreeSet::new();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                k = inbox.recv() => match k {
                    Some(k) => { keys.insert(k); }
                    None => break,
                },
                _ = due.tick() => {
                    match self.store.grades_due(crate::codes::today_cst(), 1000).await {
                        Ok(k) => keys.extend(k),
                        Err(e) => tracing::error!(error = %e, "listing grades due failed"),
                    }
                }
            }
            while keys.len() < BATCH {
                match inbox.try_recv() {
                    Ok(k) => {
                        keys.insert(k);
                    }
                    Err(_) => break,
                }
            }
            // What is left after this batch; also what grows when the
            // grader does not keep up with the changes.
            self.metrics.grade_backlog.set(inbox.len() as i64);
            let keys: Vec<String> = keys.into_iter().collect();
            for chunk in keys.chunks(BATCH) {
                if let Err(e) = self.assess(chunk).await {
                    tracing::error!(error = %e, subjects = chunk.len(), "assessing grades failed; they are assessed at their next change");
                }
            }
        }
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
        let changed = self.store.set_grades(updates).await?;
        for c in &changed {
            tracing::info!(from = %c.from, to = %c.to, notice = ?c.notice_id, "credit grade changed");
        }
        self.metrics.grade_assessments.inc_by(n as u64);
        self.metrics.grade_changes.inc_by(changed.len() as u64);
        Ok(n)
    }
}
