//! The store contract, tested through the `Store` trait alone, once per
//! backend: an embedded SQLite file, and a fresh PostgreSQL database
//! (created and dropped per test on the server `POSTGRES_TEST_URL`
//! names).

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::postgres::scratch::ScratchDatabase;
use super::*;

/// A store under test, with what keeps it alive.
pub(crate) struct Subject {
    pub store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    _db: Option<ScratchDatabase>,
}

pub(crate) const AUDIT_KEY: [u8; 32] = [7; 32];

pub(crate) async fn sqlite() -> Subject {
    let dir = tempfile::tempdir().expect("tmp");
    let store = crate::store::sqlite::SqliteStore::open(
        &dir.path().join("credgate.db"),
        &crate::store::sqlite::SqliteOptions {
            read_connections: 2,
            page_cache_mib: 8,
            idempotency_ttl: Duration::from_secs(3600),
            ..Default::default()
        },
        AUDIT_KEY.to_vec(),
        Arc::new(crate::metrics::Metrics::new()),
    )
    .expect("open sqlite store");
    Subject {
        store: Arc::new(store),
        _dir: Some(dir),
        _db: None,
    }
}

pub(crate) async fn postgres() -> Subject {
    let db = ScratchDatabase::create().await.expect("scratch database");
    let store = open_postgres(&db.url).await;
    Subject {
        store,
        _dir: None,
        _db: Some(db),
    }
}

impl Subject {
    /// Another instance on the same database (PostgreSQL), or the same
    /// store (SQLite: one process owns the file).
    pub(crate) async fn another_instance(&self) -> Arc<dyn Store> {
        match &self._db {
            Some(db) => open_postgres(&db.url).await,
            None => self.store.clone(),
        }
    }
}

async fn open_postgres(url: &str) -> Arc<dyn Store> {
    let store = crate::store::postgres::PgStore::open(
        crate::store::postgres::PgOptions {
            url: url.to_owned(),
            pool_size: 8,
            statement_timeout: Duration::from_secs(30),
            group_commit_max: 512,
            idempotency_ttl: Duration::from_secs(3600),
        },
        AUDIT_KEY.to_vec(),
        Arc::new(crate::metrics::Metrics::new()),
    )
    .await
    .expect("open postgres store");
    Arc::new(store)
}

pub(crate) fn submission(id: &str, record_id: &str) -> NewSubmission {
    NewSubmission {
        id: id.to_owned(),
        participant: "dept-market".into(),
        item: "administrative_penalty".into(),
        item_version: 1,
        received_at: OffsetDateTime::now_utc(),
        records: vec![NewRecord {
            id: record_id.to_owned(),
            subject_type: "legal_entity".into(),
            subject_key: None,
            decision_date: None,
            effective_until: None,
            body: "{\"subject_name\":\"x\"}".into(),
            warnings: "[]".into(),
            natural_key: format!("k:{record_id}"),
            content_hash: format!("h:{record_id}"),
            level: None,
            removes: None,
            publicity: None,
            ended: None,
            notice: None,
        }],
        rejected: 0,
        rejection_codes: vec![],
        idempotency: None,
        response_status: 200,
        response_body: b"{}".to_vec(),
        historical: false,
    }
}

/// A submission whose record carries a notice to `(agency, push)` each.
pub(crate) fn with_notice(id: &str, targets: &[(&str, bool)]) -> NewSubmission {
    let mut sub = submission(&format!("s-{id}"), &format!("r-{id}"));
    sub.records[0].notice = Some(NewNotice {
        id: format!("n-{id}"),
        kind: NoticeKind::Punishment,
        severity: Severity::Serious,
        measures: vec!["m1".into()],
        effective_from: None,
        effective_until: None,
        region: None,
        deliveries: targets
            .iter()
            .map(|(agency, push)| NewDelivery {
                id: format!("d-{id}-{agency}"),
                subscription: format!("sub-{agency}"),
                agency: (*agency).to_owned(),
                push: *push,
            })
            .collect(),
        lifts: None,
        corrects: None,
        reason: None,
        historical: false,
        grade: None,
    });
    sub
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The audit chain as stored verifies.
async fn assert_chain_intact(store: &dyn Store) -> i64 {
    let entries = store
        .audit_page(super::AuditFilter::after(0, 100_000))
        .await
        .expect("audit");
    let n = entries.len() as i64;
    let report = crate::audit::verify(entries, &[], &AUDIT_KEY);
    assert_eq!(report.problem, None);
    n
}

pub(crate) async fn a_failing_write_costs_only_its_own_caller(s: Subject) {
    let store = s.store.clone();
    store
        .append_submission(submission("s-first", "r-taken"))
        .await
        .expect("first");
    for round in 0..3 {
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let store = store.clone();
                let record = if i == 17 {
                    "r-taken".to_owned()
                } else {
                    format!("r-{round}-{i}")
                };
                tokio::spawn(async move {
                    store
                        .append_submission(submission(&format!("s-{round}-{i}"), &record))
                        .await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let result = t.await.expect("task");
            assert_eq!(
                result.is_ok(),
                i != 17,
                "round {round}, job {i}: {result:?}"
            );
        }
    }
    for round in 0..3 {
        for i in [0, 16, 18, 39] {
            assert!(store
                .record(&format!("r-{round}-{i}"))
                .await
                .expect("read")
                .is_some());
        }
        assert!(store
            .record(&format!("r-{round}-17"))
            .await
            .expect("read")
            .is_none());
    }
    // The failed writes left nothing behind, not even an audit item.
    let audited = store
        .audit_page(super::AuditFilter::after(0, 10_000))
        .await
        .expect("audit");
    assert!(audited.iter().all(|e| !e.details.get().contains("s-0-17")));
    assert!(audited.iter().any(|e| e.details.get().contains("s-0-16")));
    assert_chain_intact(store.as_ref()).await;
    store.close().await;
}

pub(crate) async fn a_natural_key_is_held_by_one_record_of_an_item(s: Subject) {
    let store = s.store.clone();
    let keyed = |sub: &str, record: &str, key: &str| {
        let mut s = submission(sub, record);
        s.records[0].natural_key = key.to_owned();
        s
    };
    store
        .append_submission(keyed("s-1", "r-1", "k:one"))
        .await
        .expect("first");
    // Concurrent writers of one key: exactly one stores it; the others are
    // told the key was taken, and store nothing.
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let store = store.clone();
            let sub = keyed(&format!("s-c{i}"), &format!("r-c{i}"), "k:contended");
            tokio::spawn(async move { store.append_submission(sub).await })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(AppendOutcome::Stored) => won += 1,
            Err(StoreError::KeyTaken) => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(won, 1);
    assert!(matches!(
        store.append_submission(keyed("s-2", "r-2", "k:one")).await,
        Err(StoreError::KeyTaken)
    ));
    assert!(store.record("r-2").await.expect("read").is_none());
    // Another item may use the same key.
    let mut other = keyed("s-3", "r-3", "k:one");
    other.item = "red_list".into();
    store.append_submission(other).await.expect("other item");
    let mut found = store
        .find_keys(
            "administrative_penalty",
            vec!["k:one".into(), "k:contended".into(), "k:none".into()],
        )
        .await
        .expect("find");
    found.sort_by(|a, b| a.natural_key.cmp(&b.natural_key));
    assert_eq!(found.len(), 2);
    assert_eq!(found[1].natural_key, "k:one");
    assert_eq!(found[1].record_id, "r-1");
    assert_eq!(found[1].content_hash, "h:r-1");
    assert_eq!(found[1].submitter, "dept-market");
    assert_chain_intact(store.as_ref()).await;
    store.close().await;
}

/// Concurrent submissions of one natural key, each deciding on what its
/// look-ups found: exactly one stores the record, and every other one is
/// decided again until it sees that record as the key's holder. None of
/// them fails, whichever way the store orders look-ups and writes.
pub(crate) async fn a_decision_sees_the_holder_of_its_keys(s: Subject) {
    let store = s.store.clone();
    let lookups = SubmissionLookups {
        item: "administrative_penalty".into(),
        keys: vec!["k:contended".into()],
        subjects: vec!["91350100M000100Y43".into()],
        items: vec!["administrative_penalty".into()],
    };
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (store, lookups) = (store.clone(), lookups.clone());
            // Stores the record when the key is free; otherwise stores
            // nothing and answers with the holder's id.
            let decide: Decide = Arc::new(move |holders, _subjects| {
                let mut sub = submission(&format!("s-d{i}"), &format!("r-d{i}"));
                sub.records[0].natural_key = "k:contended".into();
                sub.records[0].subject_key = Some("91350100M000100Y43".into());
                match holders.as_slice() {
                    [] => sub.response_body = b"stored".to_vec(),
                    [holder] => {
                        sub.records.clear();
                        sub.response_body = holder.record_id.clone().into_bytes();
                    }
                    more => panic!("one key, {} holders", more.len()),
                }
                Ok(sub)
            });
            tokio::spawn(async move { store.decide_and_append(lookups, decide).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        let decided = t.await.expect("task").expect("never an error");
        assert!(matches!(decided.outcome, AppendOutcome::Stored));
        answers.push((
            decided.accepted,
            decided.subjects.len(),
            decided.response_body,
        ));
    }
    let winners: Vec<_> = answers
        .iter()
        .filter(|(accepted, ..)| *accepted == 1)
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    assert_eq!(winners[0].1, 1);
    let holder = store
        .find_keys("administrative_penalty", vec!["k:contended".into()])
        .await
        .expect("find");
    assert_eq!(holder.len(), 1);
    for (accepted, subjects, body) in &answers {
        if *accepted == 0 {
            assert_eq!(*subjects, 0);
            assert_eq!(body, holder[0].record_id.as_bytes());
        }
    }
    assert_chain_intact(store.as_ref()).await;
    store.close().await;
}

/// Submissions decided at the same moment about the same subjects are
/// decided in turn: each sees the records of those stored before it
/// (none of another item, none of another subject), as one commit after
/// the other would, even when they share a write group.
pub(crate) async fn a_decision_sees_the_records_decided_before_it(s: Subject) {
    decisions_about_a_subject_see_each_other(s, 0).await;
}

/// The same when half of the decisions each look up more subjects than a
/// write locks one by one on PostgreSQL (it locks all subjects at once
/// instead), beside decisions that lock theirs one by one.
pub(crate) async fn a_decision_about_many_subjects_sees_the_records_decided_before_it(s: Subject) {
    decisions_about_a_subject_see_each_other(s, super::postgres::SUBJECT_LOCKS_MAX).await;
}

/// 48 concurrent decisions about two subjects, with distinct keys, half of
/// them about each subject also looking up `padding` subjects of their own
/// that have no records: each sees exactly the records of its subject
/// stored before it.
async fn decisions_about_a_subject_see_each_other(s: Subject, padding: usize) {
    const DECISIONS: usize = 48;
    let store = s.store.clone();
    let (a, b) = ("91350100M000100Y43", "91350200MA2Y3F8X4Q");
    // A record of another item about `a`, holding the natural key one of
    // the decisions below takes for its own item.
    let mut other = submission("s-other", "r-other");
    other.item = "abnormal_operation".into();
    other.records[0].subject_key = Some(a.into());
    other.records[0].natural_key = "k:shared".into();
    store.append_submission(other).await.expect("append");
    let tasks: Vec<_> = (0..DECISIONS)
        .map(|i| {
            let store = store.clone();
            let subject = if i % 2 == 0 { a } else { b };
            let key = if i == 0 {
                "k:shared".to_owned()
            } else {
                format!("k:w{i}")
            };
            let lookups = SubmissionLookups {
                item: "administrative_penalty".into(),
                keys: vec![key.clone()],
                subjects: std::iter::once(subject.to_owned())
                    .chain((0..padding * (i / 2 % 2)).map(|n| format!("pad-{i}-{n}")))
                    .collect(),
                items: vec!["administrative_penalty".into()],
            };
            // Answers how many of the subject's records it saw, or what
            // it should not have seen.
            let decide: Decide = Arc::new(move |holders, others| {
                let mut sub = submission(&format!("s-w{i}"), &format!("r-w{i}"));
                sub.records[0].natural_key = key.clone();
                sub.records[0].subject_key = Some(subject.into());
                let foreign = others
                    .iter()
                    .any(|r| r.subject_key != subject || r.item != "administrative_penalty");
                sub.response_body = match (holders.is_empty(), foreign) {
                    (false, _) => b"a holder of another item".to_vec(),
                    (_, true) => b"a record of another subject or item".to_vec(),
                    _ => others.len().to_string().into_bytes(),
                };
                Ok(sub)
            });
            // In waves a millisecond apart, so that the writers make
            // many groups of them, and commit one while deciding another.
            let wave = Duration::from_millis((i % 12) as u64);
            tokio::spawn(async move {
                tokio::time::sleep(wave).await;
                let decided = store.decide_and_append(lookups, decide).await;
                (subject, decided)
            })
        })
        .collect();
    let mut seen: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for t in tasks {
        let (subject, decided) = t.await.expect("task");
        let decided = decided.expect("never an error");
        assert!(matches!(decided.outcome, AppendOutcome::Stored));
        seen.entry(subject)
            .or_default()
            .push(String::from_utf8(decided.response_body).expect("utf-8"));
    }
    for (subject, mut counts) in seen {
        counts.sort_by_key(|c| c.parse::<usize>().unwrap_or(usize::MAX));
        let expected: Vec<String> = (0..DECISIONS / 2).map(|n| n.to_string()).collect();
        assert_eq!(counts, expected, "what the decisions about {subject} saw");
    }
    assert_chain_intact(store.as_ref()).await;
    store.close().await;
}

/// Many concurrent submissions of 500 records about distinct subjects
/// (24,000 in all, more than PostgreSQL's default lock table holds, 6,400)
/// are all decided and stored, whatever groups the writers make of them.
pub(crate) async fn submissions_about_more_subjects_than_the_lock_table_holds_are_stored(
    s: Subject,
) {
    let store = s.store.clone();
    let (requests, records) = (48, 500);
    let tasks: Vec<_> = (0..requests)
        .map(|i| {
            let store = store.clone();
            let subjects: Vec<String> = (0..records).map(|n| format!("big-{i}-{n}")).collect();
            let lookups = SubmissionLookups {
                item: "administrative_penalty".into(),
                keys: (0..records).map(|n| format!("k:big-{i}-{n}")).collect(),
                subjects: subjects.clone(),
                items: vec!["administrative_penalty".into()],
            };
            // Answers how many rows the look-ups found: none is stored.
            let decide: Decide = Arc::new(move |holders, others| {
                let mut sub = submission(&format!("s-big-{i}"), "unused");
                sub.response_body = (holders.len() + others.len()).to_string().into_bytes();
                let template = sub.records.pop().expect("a record");
                sub.records = subjects
                    .iter()
                    .enumerate()
                    .map(|(n, subject)| NewRecord {
                        id: format!("r-big-{i}-{n}"),
                        subject_key: Some(subject.clone()),
                        natural_key: format!("k:big-{i}-{n}"),
                        content_hash: format!("h:big-{i}-{n}"),
                        ..template.clone()
                    })
                    .collect();
                Ok(sub)
            });
            tokio::spawn(async move { store.decide_and_append(lookups, decide).await })
        })
        .collect();
    for t in tasks {
        let decided = t.await.expect("task").expect("stored, never an error");
        assert!(matches!(decided.outcome, AppendOutcome::Stored));
        assert_eq!(decided.response_body, b"0", "rows found before storing");
    }
    let marked = store.ungraded_after("", 100_000).await.expect("marks");
    assert_eq!(marked.len(), requests * records, "every subject stored");
    assert_chain_intact(store.as_ref()).await;
    store.close().await;
}

/// Every write to a subject's records gives it a new grade mark in the
/// same commit; a subject is ungraded until grades are stored with its
/// latest mark, and a mark read before a later change leaves that change
/// ungraded.
pub(crate) async fn grade_marks_follow_every_change_until_graded(s: Subject) {
    let store = s.store.clone();
    let (a, b) = ("subject-a", "subject-b");
    let marks = |subjects: &[&str]| {
        let store = store.clone();
        let subjects = subjects.iter().map(|s| (*s).to_owned()).collect();
        async move {
            let mut m = store.grade_marks(subjects).await.expect("marks");
            m.sort_by(|x, y| x.subject_key.cmp(&y.subject_key));
            m
        }
    };
    let ungraded = |after: &'static str| {
        let store = store.clone();
        async move { store.ungraded_after(after, 10).await.expect("ungraded") }
    };
    let mut given = Vec::new();
    for (i, subject) in [a, b, a].into_iter().enumerate() {
        let mut sub = submission(&format!("s-m{i}"), &format!("r-m{i}"));
        sub.records[0].subject_key = Some(subject.into());
        store.append_submission(sub).await.expect("append");
        given.push(marks(&[subject]).await[0].mark);
    }
    // Each write gives a mark never given before.
    assert!(given[0] < given[1] && given[1] < given[2], "{given:?}");
    // A record without a subject marks nothing.
    store
        .append_submission(submission("s-none", "r-none"))
        .await
        .expect("append");
    let seen = marks(&[a, b, "subject-c"]).await;
    let keys: Vec<&str> = seen.iter().map(|m| m.subject_key.as_str()).collect();
    assert_eq!(keys, [a, b]);
    assert_eq!(seen[0].mark, given[2], "a's latest write");
    assert_eq!(ungraded("").await, [a, b]);
    assert_eq!(ungraded(a).await, [b]);

    // Assessed with what `a` had before its record was revoked: the
    // revocation stays ungraded, `b` is graded.
    let ended = store
        .end_record(
            "r-m0",
            Ending::new(crate::notice::EndReason::Revoked),
            "dept-market",
        )
        .await
        .expect("end");
    assert!(matches!(ended, EndOutcome::Ended { .. }), "{ended:?}");
    let latest = marks(&[a]).await;
    assert!(latest[0].mark > given[2], "the end gave a new mark");
    store
        .set_grades(Vec::new(), seen.clone())
        .await
        .expect("grades");
    assert_eq!(ungraded("").await, [a]);

    // Graded with the latest mark; an older one changes nothing after.
    store.set_grades(Vec::new(), latest).await.expect("grades");
    assert!(ungraded("").await.is_empty());
    assert!(marks(&[a, b]).await.is_empty());
    store.set_grades(Vec::new(), seen).await.expect("grades");
    assert!(ungraded("").await.is_empty());
    store.close().await;
}

/// A set of subjects' records, read together, are those one reads record
/// by record, each with the subject it is about, and only of the items
/// asked for.
pub(crate) async fn subjects_records_are_read_together(s: Subject) {
    let store = s.store.clone();
    let about = |record: &str, subject: Option<&str>, item: &str| {
        let mut sub = submission(&format!("s-{record}"), record);
        sub.records[0].subject_key = subject.map(str::to_owned);
        sub.records[0].body = format!("{{\"subject_name\":\"{record}\"}}");
        sub.item = item.to_owned();
        sub
    };
    for sub in [
        about("r-a1", Some("A"), "administrative_penalty"),
        about("r-b1", Some("B"), "administrative_penalty"),
        about("r-a2", Some("A"), "red_list"),
        about("r-a3", Some("A"), "administrative_license"),
        about("r-n", None, "administrative_penalty"),
    ] {
        store.append_submission(sub).await.expect("append");
    }
    let read = |subjects: &[&str], items: &[&str]| {
        let store = store.clone();
        let subjects = subjects.iter().map(|s| s.to_string()).collect();
        let items = items.iter().map(|s| s.to_string()).collect();
        async move {
            let mut found: Vec<(String, String)> = store
                .subjects_records(subjects, items)
                .await
                .expect("read")
                .into_iter()
                .map(|(subject, r)| (subject, r.id))
                .collect();
            found.sort();
            found
        }
    };
    let pair = |s: &str, r: &str| (s.to_owned(), r.to_owned());
    assert_eq!(
        read(&["A", "B", "Z"], &["administrative_penalty", "red_list"]).await,
        [pair("A", "r-a1"), pair("A", "r-a2"), pair("B", "r-b1")]
    );
    // A subject named twice is read once.
    assert_eq!(
        read(&["B", "A", "B"], &["administrative_penalty"]).await,
        [pair("A", "r-a1"), pair("B", "r-b1")]
    );
    assert_eq!(read(&["B"], &["red_list"]).await, []);
    assert_eq!(read(&[], &["red_list"]).await, []);
    assert_eq!(read(&["A"], &[]).await, []);
    // So it is by the look-up of decisions.
    let looked_up = store
        .subject_records(
            vec!["B".into(), "A".into(), "B".into()],
            vec!["administrative_penalty".into()],
        )
        .await
        .expect("look up");
    let mut ids: Vec<&str> = looked_up.iter().map(|r| r.record_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["r-a1", "r-b1"]);
    // In full, as a record is read by id.
    let one = store
        .subjects_records(vec!["B".into()], vec!["administrative_penalty".into()])
        .await
        .expect("read");
    let by_id = store.record("r-b1").await.expect("read").expect("stored");
    assert_eq!(one.len(), 1);
    assert_eq!(format!("{:?}", one[0].1), format!("{by_id:?}"));
    store.close().await;
}

/// Grades for more subjects than one write takes are all stored, and
/// every change is reported once.
pub(crate) async fn many_grades_are_all_stored(s: Subject) {
    let store = s.store.clone();
    // Every third subject keeps the default grade B; the others get C.
    // More than one PostgreSQL write holds.
    let grades = || -> Vec<GradeUpdate> {
        (0..450)
            .map(|i| GradeUpdate {
                subject_key: format!("subject-{i:03}"),
                grade: if i % 3 == 0 { "B" } else { "C" }.to_owned(),
                rule: "r".into(),
                rules_version: 1,
                region: Some("350100".into()),
                review_after: None,
                default_grade: "B".into(),
                notice: None,
            })
            .collect()
    };
    let first = store
        .set_grades(grades(), Vec::new())
        .await
        .expect("grades");
    let mut moved: Vec<String> = first.iter().map(|c| c.subject_key.clone()).collect();
    moved.sort();
    let expected: Vec<String> = (0..450)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("subject-{i:03}"))
        .collect();
    assert_eq!(moved, expected);
    assert!(first.iter().all(|c| c.from == "B" && c.to == "C"));
    let counts = |grades: Vec<GradeCount>| {
        let mut c: Vec<(String, u64)> = grades.into_iter().map(|g| (g.grade, g.subjects)).collect();
        c.sort();
        c
    };
    assert_eq!(
        counts(store.grade_counts().await.expect("counts")),
        [("B".to_owned(), 150), ("C".to_owned(), 300)]
    );
    // The same grades again change nothing.
    let again = store
        .set_grades(grades(), Vec::new())
        .await
        .expect("grades");
    assert!(again.is_empty(), "{again:?}");
    store.close().await;
}

/// A grade of rule `r` (version 1), default B, with no notice.
fn grade_update(subject: &str, grade: &str) -> GradeUpdate {
    GradeUpdate {
        subject_key: subject.to_owned(),
        grade: grade.to_owned(),
        rule: "r".into(),
        rules_version: 1,
        region: None,
        review_after: None,
        default_grade: "B".into(),
        notice: None,
    }
}

/// Concurrent assessments of the same subjects (the grader's batches, or
/// several instances) each compare against the grade the one before stored:
/// a move is reported once, whoever stores it first. Both when the
/// subjects have no grade yet (the writes race to create their rows) and
/// when they have.
pub(crate) async fn a_grade_move_is_reported_once_however_many_store_it(s: Subject) {
    let stores = [s.store.clone(), s.another_instance().await];
    // The default grade is B: C is a move for subjects never graded, D
    // one for subjects graded C.
    for (from, to) in [("B", "C"), ("C", "D")] {
        // On two instances, in waves a millisecond apart, so that they
        // make many write groups.
        let tasks: Vec<_> = (0..96)
            .map(|i| {
                let store = stores[i as usize % 2].clone();
                // Each write names the subjects in another order: the
                // store, not the caller, must keep the lock order.
                let mut updates: Vec<GradeUpdate> = (0..300)
                    .map(|i| grade_update(&format!("subject-{i:03}"), to))
                    .collect();
                updates.rotate_left(i as usize * 37 % 300);
                if i % 2 == 1 {
                    updates.reverse();
                }
                let wave = Duration::from_millis(i % 24);
                tokio::spawn(async move {
                    tokio::time::sleep(wave).await;
                    store.set_grades(updates, Vec::new()).await
                })
            })
            .collect();
        let mut moved: Vec<String> = Vec::new();
        for t in tasks {
            let changed = t.await.expect("task").expect("stored, never an error");
            assert!(
                changed.iter().all(|c| c.from == from && c.to == to),
                "{changed:?}"
            );
            moved.extend(changed.into_iter().map(|c| c.subject_key));
        }
        moved.sort();
        let expected: Vec<String> = (0..300).map(|i| format!("subject-{i:03}")).collect();
        assert_eq!(moved, expected, "each subject's move {from} → {to}, once");
    }
    for store in stores {
        store.close().await;
    }
}

/// A grade that changes stores its notice with the grade before and
/// after; one that stays puts nothing out; a subject updated twice in one
/// call is compared against its first update.
pub(crate) async fn grade_changes_store_their_notices_in_turn(s: Subject) {
    let store = s.store.clone();
    let stored = store
        .append_submission(submission("s-g", "r-g"))
        .await
        .expect("append");
    assert!(matches!(stored, AppendOutcome::Stored));
    let update = |subject: &str, grade: &str, n: &str| GradeUpdate {
        notice: Some(GradeNotice {
            notice: NewNotice {
                id: n.to_owned(),
                kind: NoticeKind::GradeChange,
                severity: Severity::General,
                measures: vec![],
                effective_from: None,
                effective_until: None,
                region: None,
                deliveries: vec![NewDelivery {
                    id: format!("d-{n}"),
                    subscription: "sub-g".into(),
                    agency: "agency-g".into(),
                    push: false,
                }],
                lifts: None,
                corrects: None,
                reason: None,
                historical: false,
                grade: None,
            },
            record_id: "r-g".into(),
            item: "administrative_penalty".into(),
            item_version: 1,
            source: "dept-market".into(),
        }),
        ..grade_update(subject, grade)
    };
    let changed = store
        .set_grades(
            vec![
                update("subject-a", "C", "n-1"),
                update("subject-b", "B", "n-2"),
                update("subject-a", "A", "n-3"),
            ],
            Vec::new(),
        )
        .await
        .expect("grades");
    let moves: Vec<(&str, &str, &str, Option<&str>)> = changed
        .iter()
        .map(|c| {
            (
                c.subject_key.as_str(),
                c.from.as_str(),
                c.to.as_str(),
                c.notice_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        moves,
        [
            ("subject-a", "B", "C", Some("n-1")),
            ("subject-a", "C", "A", Some("n-3"))
        ]
    );
    let pulled: Vec<String> = store
        .pull("agency-g", 0, 10)
        .await
        .expect("pull")
        .into_iter()
        .map(|d| d.notice.notice_id)
        .collect();
    assert_eq!(pulled, ["n-1", "n-3"]);
    for (id, from, to) in [("n-1", "B", "C"), ("n-3", "C", "A")] {
        let shift = store
            .notice(id)
            .await
            .expect("notice")
            .and_then(|n| n.grade)
            .expect("a grade change");
        assert_eq!((shift.from.as_str(), shift.to.as_str()), (from, to), "{id}");
    }
    assert!(store.notice("n-2").await.expect("notice").is_none());
    store.close().await;
}

pub(crate) async fn concurrent_duplicates_get_the_stored_answer(s: Subject) {
    let store = s.store.clone();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut sub = submission(&format!("s-{i}"), &format!("r-{i}"));
                sub.idempotency = Some(IdempotencyClaim {
                    key: "same-key".into(),
                    request_hash: "h".into(),
                });
                sub.response_body = format!("{{\"n\":{i}}}").into_bytes();
                store.append_submission(sub).await
            })
        })
        .collect();
    let mut stored = 0;
    let mut replayed = Vec::new();
    for t in tasks {
        match t.await.expect("task").expect("never an error") {
            AppendOutcome::Stored => stored += 1,
            AppendOutcome::Replay(r) => replayed.push(r.body),
        }
    }
    assert_eq!(stored, 1);
    let remembered = store
        .idempotent_response("dept-market", "same-key")
        .await
        .expect("read")
        .expect("remembered");
    assert!(replayed.iter().all(|b| *b == remembered.body));
    assert_eq!(replayed.len(), 19);
    store.close().await;
}

pub(crate) async fn streams_are_gap_free_per_agency_and_acks_only_move_forward(s: Subject) {
    let store = s.store.clone();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let targets: &[(&str, bool)] = if i % 2 == 0 {
                    &[("agency-a", false), ("agency-b", false), ("agency-p", true)]
                } else {
                    &[("agency-a", false)]
                };
                store
                    .append_submission(with_notice(&i.to_string(), targets))
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("append");
    }
    let a = store.pull("agency-a", 0, 1000).await.expect("pull");
    assert_eq!(
        a.iter().map(|o| o.position).collect::<Vec<_>>(),
        (1..=60).collect::<Vec<_>>()
    );
    let b = store.pull("agency-b", 0, 1000).await.expect("pull");
    assert_eq!(
        b.iter().map(|o| o.position).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    // A page continues after the cursor.
    let page = store.pull("agency-a", 58, 10).await.expect("pull");
    assert_eq!(
        page.iter().map(|o| o.position).collect::<Vec<_>>(),
        [59, 60]
    );
    // Push deliveries are not in any pull stream.
    assert!(store
        .pull("agency-p", 0, 10)
        .await
        .expect("pull")
        .is_empty());
    store.ack("agency-a", 10).await.expect("ack");
    assert_eq!(store.pull_position("agency-a").await.expect("pos"), 10);
    store.ack("agency-a", 4).await.expect("ack backwards");
    assert_eq!(store.pull_position("agency-a").await.expect("pos"), 10);
    store
        .ack("agency-a", 1_000_000)
        .await
        .expect("ack past the end");
    assert_eq!(store.pull_position("agency-a").await.expect("pos"), 60);
    let history = store
        .record_notices(&a[0].notice.record_id)
        .await
        .expect("history");
    let d = history[0]
        .deliveries
        .iter()
        .find(|d| d.agency == "agency-a")
        .expect("delivery to a");
    assert_eq!(d.state, DeliveryState::Delivered);
    assert_eq!(store.pull_position("agency-b").await.expect("pos"), 0);
    store.close().await;
}

pub(crate) async fn claims_are_leased_and_fenced(s: Subject) {
    let store = s.store.clone();
    store
        .append_submission(with_notice("1", &[("agency-p", true)]))
        .await
        .expect("append");
    let wants = [("sub-agency-p".to_owned(), 10)];
    let first = store
        .claim_due(now_ms(), &wants, 60_000)
        .await
        .expect("claim");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempts, 0);
    // Leased: nobody else gets it before the lease ends.
    assert!(store
        .claim_due(now_ms(), &wants, 60_000)
        .await
        .expect("claim")
        .is_empty());
    // After the lease: claimed again, under a new claim number.
    let later = now_ms() + 120_000;
    let second = store.claim_due(later, &wants, 60_000).await.expect("claim");
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].claim, first[0].claim);
    assert_eq!(second[0].attempts, 1);
    let finished = |o: &Outbound, result| Finished {
        delivery_id: o.delivery_id.clone(),
        notice_id: o.notice.notice_id.clone(),
        agency: o.agency.clone(),
        subscription: o.subscription.clone(),
        attempts: o.attempts + 1,
        claim: o.claim,
        result,
    };
    // The first attempt's late answer is ignored…
    store
        .finish_deliveries(vec![finished(
            &first[0],
            DeliveryResult::Dead {
                error: "late".into(),
            },
        )])
        .await
        .expect("finish");
    assert!(store
        .deliveries(DeliveryState::Dead, 10)
        .await
        .expect("dead")
        .is_empty());
    // …the current one's is kept.
    store
        .finish_deliveries(vec![finished(&second[0], DeliveryResult::Delivered)])
        .await
        .expect("finish");
    let history = store.record_notices("r-1").await.expect("history");
    assert_eq!(history[0].deliveries[0].state, DeliveryState::Delivered);
    assert!(store
        .claim_due(later + 1_000_000, &wants, 60_000)
        .await
        .expect("claim")
        .is_empty());
    store.close().await;
}

pub(crate) async fn ending_a_record_lifts_every_notice_once(s: Subject) {
    let store = s.store.clone();
    store
        .append_submission(with_notice("1", &[("agency-a", false), ("agency-p", true)]))
        .await
        .expect("append");
    let removed_on = time::macros::date!(2026 - 10 - 31);
    let ended = store
        .end_record(
            "r-1",
            Ending {
                removal: Some(r#"{"removal_date":"2026-10-31","removal_reason":"other"}"#.into()),
                on: Some(removed_on),
                ..Ending::new(crate::notice::EndReason::Removed)
            },
            "dept-market",
        )
        .await
        .expect("end");
    let EndOutcome::Ended {
        lift_notices,
        recipients,
    } = ended
    else {
        panic!("not ended: {ended:?}");
    };
    assert_eq!(lift_notices.len(), 1);
    assert_eq!(recipients, ["agency-a", "agency-p"]);
    let revoke = || Ending::new(crate::notice::EndReason::Revoked);
    assert!(matches!(
        store
            .end_record("r-1", revoke(), "dept-market")
            .await
            .expect("again"),
        EndOutcome::AlreadyEnded(status) if status == "removed"
    ));
    assert!(matches!(
        store
            .end_record("nope", revoke(), "x")
            .await
            .expect("unknown"),
        EndOutcome::NotFound
    ));
    let record = store.record("r-1").await.expect("read").expect("record");
    assert_eq!(record.status, "removed");
    assert_eq!(record.end_reason.as_deref(), Some("removed"));
    assert_eq!(
        record
            .removal
            .as_ref()
            .and_then(|r| r.get("removal_reason")),
        Some(&serde_json::json!("other"))
    );
    let pulled = store.pull("agency-a", 1, 10).await.expect("pull");
    assert_eq!(pulled.len(), 1);
    assert_eq!(pulled[0].notice.kind, NoticeKind::Lift);
    assert_eq!(pulled[0].notice.lifts.as_deref(), Some("n-1"));
    assert_eq!(pulled[0].notice.reason.as_deref(), Some("removed"));
    assert_eq!(pulled[0].notice.effective_until, Some(removed_on));
    assert_eq!(pulled[0].position, 2);
    // Feedback: only recipients, only existing notices.
    let fb = |agency: &str, notice: &str| Feedback {
        notice_id: notice.into(),
        agency: agency.into(),
        measure: "m1".into(),
        outcome: FeedbackOutcome::Pending,
        date: None,
        note: None,
        received_at: OffsetDateTime::now_utc(),
    };
    assert_eq!(
        store.add_feedback(fb("agency-a", "n-1")).await.expect("fb"),
        FeedbackStored::Stored
    );
    assert_eq!(
        store.add_feedback(fb("agency-x", "n-1")).await.expect("fb"),
        FeedbackStored::NotRecipient
    );
    assert_eq!(
        store.add_feedback(fb("agency-a", "n-9")).await.expect("fb"),
        FeedbackStored::UnknownNotice
    );
    assert!(store
        .received_notice("n-1", "agency-x")
        .await
        .expect("read")
        .is_none());
    assert!(store
        .received_notice("n-1", "agency-a")
        .await
        .expect("read")
        .is_some());
    assert_chain_intact(store.as_ref()).await;
    store.close().await;
}

pub(crate) async fn the_control_plane_is_versioned_and_audited(s: Subject) {
    let store = s.store.clone();
    let item = serde_json::json!({"id": "administrative_penalty", "version": 1});
    let state = store
        .seed_control(
            vec![item.clone()],
            vec![("dept".into(), serde_json::json!({"id": "dept"}))],
            vec![],
        )
        .await
        .expect("seed");
    assert_eq!(state.items, std::slice::from_ref(&item));
    assert_eq!(state.seeded.len(), 2);
    // Seeding again stores nothing.
    let again = store
        .seed_control(vec![item.clone()], vec![], vec![])
        .await
        .expect("seed");
    assert!(again.seeded.is_empty());
    let activation = |version, definition| ItemActivation {
        item: "administrative_penalty".into(),
        version,
        definition,
        actor: "admin".into(),
        reason: None,
        breaking: false,
        diff: serde_json::json!([]),
        digests: ("a".into(), "b".into()),
    };
    let v2 = serde_json::json!({"id": "administrative_penalty", "version": 2});
    assert_eq!(
        store
            .activate_item(activation(2, Some(v2.clone())))
            .await
            .expect("activate"),
        ActivateOutcome::Activated
    );
    assert_eq!(
        store
            .activate_item(activation(2, Some(v2.clone())))
            .await
            .expect("activate"),
        ActivateOutcome::VersionTaken { latest: 2 }
    );
    assert_eq!(
        store
            .activate_item(activation(7, None))
            .await
            .expect("rollback"),
        ActivateOutcome::NoSuchVersion
    );
    store
        .activate_item(activation(1, None))
        .await
        .expect("rollback");
    let versions = store
        .item_versions("administrative_penalty")
        .await
        .expect("versions");
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.version, v.active))
            .collect::<Vec<_>>(),
        [(1, true), (2, false)]
    );
    assert_eq!(
        store
            .item_version("administrative_penalty", 2)
            .await
            .expect("v2"),
        Some(v2)
    );
    store
        .put_document(
            DocKind::Participant,
            "dept",
            serde_json::json!({"id": "dept", "disabled": true}),
            "admin",
            "participant.update",
            serde_json::json!({}),
        )
        .await
        .expect("put");
    let state = store
        .seed_control(vec![], vec![], vec![])
        .await
        .expect("state");
    assert_eq!(state.items, [item]);
    assert_eq!(state.participants[0]["disabled"], true);
    let entries = assert_chain_intact(store.as_ref()).await;
    assert!(entries >= 5, "{entries}");
    // A checkpoint covers the head, once.
    let cp = store.checkpoint().await.expect("checkpoint").expect("made");
    assert_eq!(cp.seq, entries);
    assert!(store.checkpoint().await.expect("checkpoint").is_none());
    store.close().await;
}

pub(crate) async fn old_cursors_translate_to_positions(s: Subject) {
    let store = s.store.clone();
    for i in 0..3 {
        store
            .append_submission(with_notice(&i.to_string(), &[("agency-a", false)]))
            .await
            .expect("append");
    }
    // Sequence numbers are the store's; a cursor at or past all of them
    // is the end of the stream, 0 is its start.
    assert_eq!(
        store.legacy_position("agency-a", 0).await.expect("legacy"),
        0
    );
    assert_eq!(
        store
            .legacy_position("agency-a", i64::MAX)
            .await
            .expect("legacy"),
        3
    );
    store.close().await;
}

pub(crate) async fn endpoint_health_is_counted_in_the_store(s: Subject) {
    let store = s.store.clone();
    let now = now_ms();
    let fail = |at: i64| {
        let store = store.clone();
        async move {
            store
                .endpoint_outcome("sub-x", false, 3, at, 60_000)
                .await
                .expect("outcome")
        }
    };
    // Failures from "different instances" add up in one counter.
    assert_eq!(fail(now).await.failures, 1);
    let second = fail(now).await;
    assert_eq!((second.failures, second.newly_paused), (2, false));
    assert!(second.paused_until_ms <= now);
    let third = fail(now + 5).await;
    assert_eq!(
        (third.failures, third.paused_until_ms, third.newly_paused),
        (3, now + 5 + 60_000, true)
    );
    // Failing again while paused does not move the pause or report it.
    let fourth = fail(now + 10).await;
    assert_eq!(
        (fourth.paused_until_ms, fourth.newly_paused),
        (third.paused_until_ms, false)
    );
    let listed = store.endpoint_health().await.expect("health");
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].0.as_str(), listed[0].1.failures), ("sub-x", 4));
    // After the pause, the next failure pauses again.
    let after = fail(third.paused_until_ms + 1).await;
    assert!(after.newly_paused);
    // A success clears it all.
    store
        .endpoint_outcome("sub-x", true, 3, now, 60_000)
        .await
        .expect("ok");
    assert!(store.endpoint_health().await.expect("health").is_empty());
    store.close().await;
}

pub(crate) async fn statistics_windows_compare_times_not_text(s: Subject) {
    let store = s.store.clone();
    let from = time::macros::datetime!(2026-11-26 16:00:00 UTC);
    let to = time::macros::datetime!(2026-11-27 16:00:00 UTC);
    let at = |id: &str, received: OffsetDateTime| {
        let mut sub = submission(&format!("s-{id}"), &format!("r-{id}"));
        sub.received_at = received;
        sub
    };
    let ms = time::Duration::milliseconds;
    // Inside: the window's first second (a fraction after a whole
    // second), and just before its end; outside: just before it, and at
    // its end.
    for (id, received) in [
        ("first", from + ms(500)),
        ("last", to - ms(500)),
        ("before", from - ms(500)),
        ("end", to),
    ] {
        store
            .append_submission(at(id, received))
            .await
            .expect("append");
    }
    let stats = store.department_stats(from, to).await.expect("stats");
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].accepted, 2, "{stats:?}");
    store.close().await;
}

/// A published record is on the public channel from the first to the last
/// day of its stamped period and while it is in effect, found by USCC
/// and by part of a legal entity's name, never a natural person by name.
pub(crate) async fn the_public_channel_keeps_to_the_stamped_period(s: Subject) {
    use time::macros::date;
    let store = s.store.clone();
    let stamp = |public_id: &str| Publication {
        public_id: public_id.to_owned(),
        stamp: crate::publicity::Stamp {
            rule_set: "2026-04".into(),
            start: date!(2026 - 10 - 15),
            end: date!(2027 - 10 - 14),
        },
    };
    let mut firm = submission("s-firm", "r-firm");
    firm.records[0].subject_key = Some("91320100M000100Y4N".into());
    firm.records[0].body = "{\"subject_name\":\"南京金陵食品有限公司\"}".into();
    firm.records[0].publicity = Some(stamp("aa01"));
    let mut person = submission("s-person", "r-person");
    person.records[0].subject_type = "natural_person".into();
    person.records[0].subject_key = Some("pid:0123".into());
    person.records[0].body = "{\"subject_name\":\"南京王五\"}".into();
    person.records[0].publicity = Some(stamp("aa02"));
    let unpublished = submission("s-none", "r-none");
    for sub in [firm, person, unpublished] {
        store.append_submission(sub).await.expect("append");
    }
    let ask = |today: Date, uscc: Option<&str>, name: Option<&str>| {
        let store = store.clone();
        let q = PublicQuery {
            uscc: uscc.map(str::to_owned),
            name: name.map(str::to_owned),
            item: None,
            today,
            offset: 0,
            limit: 10,
        };
        async move {
            let mut ids: Vec<String> = store
                .public_records(q)
                .await
                .expect("query")
                .into_iter()
                .map(|r| r.public_id)
                .collect();
            ids.sort();
            ids
        }
    };
    assert!(
        ask(date!(2026 - 10 - 14), None, None).await.is_empty(),
        "before"
    );
    assert_eq!(
        ask(date!(2026 - 10 - 15), None, None).await,
        ["aa01", "aa02"]
    );
    assert_eq!(
        ask(date!(2027 - 10 - 14), None, None).await,
        ["aa01", "aa02"]
    );
    assert!(
        ask(date!(2027 - 10 - 15), None, None).await.is_empty(),
        "after"
    );
    let today = date!(2026 - 12 - 01);
    assert_eq!(ask(today, Some("91320100M000100Y4N"), None).await, ["aa01"]);
    assert_eq!(ask(today, None, Some("金陵食品")).await, ["aa01"]);
    assert!(
        ask(today, None, Some("王五")).await.is_empty(),
        "a person by name"
    );
    let one = store.public_record("aa01", today).await.expect("one");
    assert_eq!(
        one.map(|r| (r.rule_set, r.end)),
        Some(("2026-04".into(), date!(2027 - 10 - 14)))
    );
    assert!(store
        .public_record("aa01", date!(2027 - 10 - 15))
        .await
        .expect("one")
        .is_none());
    // Ended: off the channel at once.
    store
        .end_record(
            "r-firm",
            Ending::new(crate::notice::EndReason::Revoked),
            "dept-market",
        )
        .await
        .expect("end");
    assert_eq!(ask(today, None, None).await, ["aa02"]);
    store.close().await;
}

/// Instantiates every conformance test for one backend.
macro_rules! conformance {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::$backend().await).await;
                }
            )*
        }
    };
}

macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        conformance!(sqlite: $($test),*);
        conformance!(postgres: $($test),*);
    };
}

both_backends!(
    a_failing_write_costs_only_its_own_caller,
    a_natural_key_is_held_by_one_record_of_an_item,
    a_decision_sees_the_holder_of_its_keys,
    a_decision_sees_the_records_decided_before_it,
    a_decision_about_many_subjects_sees_the_records_decided_before_it,
    submissions_about_more_subjects_than_the_lock_table_holds_are_stored,
    subjects_records_are_read_together,
    many_grades_are_all_stored,
    a_grade_move_is_reported_once_however_many_store_it,
    grade_marks_follow_every_change_until_graded,
    grade_changes_store_their_notices_in_turn,
    concurrent_duplicates_get_the_stored_answer,
    streams_are_gap_free_per_agency_and_acks_only_move_forward,
    claims_are_leased_and_fenced,
    ending_a_record_lifts_every_notice_once,
    the_control_plane_is_versioned_and_audited,
    old_cursors_translate_to_positions,
    endpoint_health_is_counted_in_the_store,
    statistics_windows_compare_times_not_text,
    the_public_channel_keeps_to_the_stamped_period,
);
