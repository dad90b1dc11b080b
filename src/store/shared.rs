//! What both backends compute the same way: the grouping of hot-path audit
//! items into chained entries, and the quality figures.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use time::{Date, OffsetDateTime};

use super::{DepartmentStats, StoreError};

/// Endpoint health statements, the same SQL on both backends (`$n`
/// placeholders are numbered parameters in SQLite too).
pub(crate) const ENDPOINT_FAILED: &str = "INSERT INTO endpoint_health (subscription, failures, paused_until) \
     VALUES ($1, 1, CASE WHEN 1 >= CAST($2 AS INTEGER) THEN CAST($3 AS BIGINT) + CAST($4 AS BIGINT) ELSE 0 END) \
     ON CONFLICT (subscription) DO UPDATE SET failures = endpoint_health.failures + 1, \
       paused_until = CASE WHEN endpoint_health.failures + 1 >= CAST($2 AS INTEGER) AND endpoint_health.paused_until <= CAST($3 AS BIGINT) \
                           THEN CAST($3 AS BIGINT) + CAST($4 AS BIGINT) ELSE endpoint_health.paused_until END \
     RETURNING failures, paused_until";
pub(crate) const ENDPOINT_RECOVERED: &str =
    "UPDATE endpoint_health SET failures = 0, paused_until = 0 \
     WHERE subscription = $1 AND (failures > 0 OR paused_until > 0)";
pub(crate) const ENDPOINT_HEALTH: &str =
    "SELECT subscription, failures, paused_until FROM endpoint_health WHERE failures > 0 OR paused_until > 0";

/// The health a statement returned.
pub(crate) fn endpoint_health(
    failures: i64,
    paused_until_ms: i64,
    now_ms: i64,
    pause_ms: i64,
) -> super::EndpointHealth {
    super::EndpointHealth {
        failures: u32::try_from(failures).unwrap_or(u32::MAX),
        paused_until_ms,
        newly_paused: paused_until_ms == now_ms + pause_ms,
    }
}

/// RFC 3339 text of a time (audit entries hash this text).
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Parses stored RFC 3339 text.
pub(crate) fn parse_time(s: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// An audit item produced inside a write, written when the write's
/// transaction is about to commit.
#[derive(Debug, Clone)]
pub(crate) struct AuditItem {
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// About what.
    pub subject: String,
    /// Details (never non-public field values).
    pub details: Value,
    /// High-volume items (submissions, delivery outcomes, acks) of one
    /// commit are merged into one entry per action; others stay entries
    /// of their own.
    pub grouped: bool,
}

impl AuditItem {
    /// An item merged with the commit's others of the same action.
    pub fn grouped(actor: &str, action: &str, subject: &str, details: Value) -> AuditItem {
        AuditItem {
            actor: actor.to_owned(),
            action: action.to_owned(),
            subject: subject.to_owned(),
            details,
            grouped: true,
        }
    }

    /// An entry of its own.
    pub fn single(actor: &str, action: &str, subject: &str, details: Value) -> AuditItem {
        AuditItem {
            grouped: false,
            ..AuditItem::grouped(actor, action, subject, details)
        }
    }
}

/// The chained entries `(actor, action, subject, details)` of a commit's
/// items, in order: entries of their own first, then one `gateway` entry
/// per grouped action, holding every item (actor, subject, details).
pub(crate) fn audit_entries(items: Vec<AuditItem>) -> Vec<(String, String, String, Value)> {
    let mut out = Vec::new();
    let mut by_action: Vec<(String, Vec<Value>)> = Vec::new();
    for item in items {
        if !item.grouped {
            out.push((item.actor, item.action, item.subject, item.details));
            continue;
        }
        let entry = serde_json::json!({"actor": item.actor, "subject": item.subject, "details": item.details});
        match by_action.iter_mut().find(|(a, _)| *a == item.action) {
            Some((_, list)) => list.push(entry),
            None => by_action.push((item.action, vec![entry])),
        }
    }
    for (action, list) in by_action {
        let subject = format!("{} item(s)", list.len());
        out.push((
            "gateway".to_owned(),
            action,
            subject,
            serde_json::json!({"items": list}),
        ));
    }
    out
}

/// The audit entry of an issued review: who, about whom, why; never the
/// report itself.
pub(crate) fn grade_rules_audit(actor: &str, version: u32, reason: Option<&str>) -> AuditItem {
    AuditItem::single(
        actor,
        "grade_rules_activated",
        "grades",
        serde_json::json!({"version": version, "reason": reason}),
    )
}

pub(crate) fn review_audit(r: &super::NewReview) -> AuditItem {
    AuditItem::single(
        &r.agency,
        "credit_review",
        &r.id,
        serde_json::json!({"subject": r.subject_key, "purpose": r.purpose}),
    )
}

/// The audit item of a stored submission: counts and ids only, never
/// field values.
pub(crate) fn submission_audit(sub: &super::NewSubmission) -> AuditItem {
    AuditItem::grouped(
        &sub.participant,
        "submissions",
        &sub.id,
        serde_json::json!({
            "item": sub.item,
            "item_version": sub.item_version,
            "accepted": sub.records.len(),
            "rejected": sub.rejected,
            "record_ids": sub.records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            "notice_ids": sub.records.iter().filter_map(|r| r.notice.as_ref().map(|n| n.id.as_str())).collect::<Vec<_>>(),
        }),
    )
}

/// The audit item of a push attempt's final outcome (none for retries).
pub(crate) fn outcome_audit(f: &super::Finished) -> Option<AuditItem> {
    let action = match &f.result {
        super::DeliveryResult::Delivered => "delivery.delivered",
        super::DeliveryResult::Dead { .. } => "delivery.dead",
        _ => return None,
    };
    Some(AuditItem::grouped(
        "gateway",
        action,
        &f.delivery_id,
        serde_json::json!({"notice_id": f.notice_id, "agency": f.agency, "subscription": f.subscription, "attempts": f.attempts}),
    ))
}

/// The audit entry of a catalog activation or rollback.
pub(crate) fn activation_audit(a: &super::ItemActivation) -> AuditItem {
    let action = if a.definition.is_some() {
        "catalog.activate"
    } else {
        "catalog.rollback"
    };
    AuditItem::single(
        &a.actor,
        action,
        &a.item,
        serde_json::json!({
            "version": a.version, "breaking": a.breaking, "forced": a.breaking, "reason": a.reason,
            "before_digest": a.digests.0, "after_digest": a.digests.1, "changes": a.diff,
        }),
    )
}

/// Working days (Mon-Fri) after `from` up to and including `to`.
fn working_days(from: Date, to: Date) -> i64 {
    let mut d = from;
    let mut n = 0;
    while d < to {
        d = d.next_day().unwrap_or(to);
        if !matches!(d.weekday(), time::Weekday::Saturday | time::Weekday::Sunday) {
            n += 1;
        }
    }
    n
}

/// Submissions of the period summed per department, item, rejection codes
/// (JSON `[[code, count], …]`) and day of receipt (China time): records
/// accepted, records rejected.
pub(crate) type SubmissionRow = (String, String, i64, i64, String, Date);

/// Accepted records of the period counted per department, item, decision
/// date and day of receipt (China time). The stores group in SQL, so a
/// large period costs rows per day, not per record.
pub(crate) type DelayRow = (String, String, Date, Date, i64);

/// Quality figures per department and item.
pub(crate) fn department_stats(
    submissions: impl IntoIterator<Item = SubmissionRow>,
    records: impl IntoIterator<Item = DelayRow>,
) -> Result<Vec<DepartmentStats>, StoreError> {
    let mut by_key: BTreeMap<(String, String), DepartmentStats> = BTreeMap::new();
    let mut days: HashMap<(String, String), BTreeMap<Date, (u64, u64)>> = HashMap::new();
    for (dept, item, accepted, rejected, codes, received) in submissions {
        let day = days
            .entry((dept.clone(), item.clone()))
            .or_default()
            .entry(received)
            .or_default();
        day.0 += accepted.max(0) as u64;
        day.1 += rejected.max(0) as u64;
        let s = by_key
            .entry((dept.clone(), item.clone()))
            .or_insert_with(|| DepartmentStats {
                department: dept,
                item,
                submitted: 0,
                accepted: 0,
                rejected: 0,
                rejected_by_code: BTreeMap::new(),
                acceptance_rate: 0.0,
                timeliness_median_days: None,
                timeliness_worst_days: None,
                within_7_working_days: None,
                daily: Vec::new(),
            });
        s.accepted += accepted.max(0) as u64;
        s.rejected += rejected.max(0) as u64;
        let codes: Vec<(String, u64)> =
            serde_json::from_str(&codes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        for (code, n) in codes {
            *s.rejected_by_code.entry(code).or_default() += n;
        }
    }
    let mut delays: HashMap<(String, String), Vec<(i64, i64)>> = HashMap::new();
    for (dept, item, decision, received, count) in records {
        let days = (received - decision).whole_days();
        let working = working_days(decision, received);
        let list = delays.entry((dept, item)).or_default();
        list.extend(std::iter::repeat_n((days, working), count.max(0) as usize));
    }
    let mut out = Vec::with_capacity(by_key.len());
    for (key, mut s) in by_key {
        s.submitted = s.accepted + s.rejected;
        s.acceptance_rate = if s.submitted == 0 {
            0.0
        } else {
            s.accepted as f64 / s.submitted as f64
        };
        if let Some(mut d) = delays.remove(&key) {
            d.sort_unstable();
            let n = d.len();
            s.timeliness_median_days = Some(if n % 2 == 1 {
                d[n / 2].0 as f64
            } else {
                (d[n / 2 - 1].0 + d[n / 2].0) as f64 / 2.0
            });
            s.timeliness_worst_days = d.last().map(|x| x.0);
            s.within_7_working_days = Some(d.iter().filter(|x| x.1 <= 7).count() as f64 / n as f64);
        }
        s.daily = days
            .remove(&key)
            .unwrap_or_default()
            .into_iter()
            .map(|(date, (accepted, rejected))| super::DailyCount {
                date: date.to_string(),
                accepted,
                rejected,
            })
            .collect();
        out.push(s);
    }
    Ok(out)
}

/// Fresh deliveries to the subscriptions `(subscription, agency, mode)`
/// that had a delivery of an earlier notice.
pub(crate) fn deliveries_to(targets: &[(String, String, String)]) -> Vec<super::NewDelivery> {
    targets
        .iter()
        .map(|(subscription, agency, mode)| super::NewDelivery {
            id: uuid::Uuid::now_v7().to_string(),
            subscription: subscription.clone(),
            agency: agency.clone(),
            push: mode == "push",
        })
        .collect()
}

/// A `grade_change` notice with what it says filled in: from `before` to
/// the update's grade.
pub(crate) fn with_shift(
    g: &super::GradeNotice,
    before: &str,
    u: &super::GradeUpdate,
) -> super::NewNotice {
    super::NewNotice {
        grade: Some(crate::notice::GradeShift {
            from: before.to_owned(),
            to: u.grade.clone(),
            rule: u.rule.clone(),
            rules_version: u.rules_version,
        }),
        ..g.notice.clone()
    }
}

/// The lift of `original` (reason `reason`, effect ended on `on`) to the
/// subscriptions that received it.
pub(crate) fn lift_of(
    original: &crate::notice::StoredNotice,
    on: time::Date,
    reason: &str,
    targets: &[(String, String, String)],
) -> super::NewNotice {
    super::NewNotice {
        id: uuid::Uuid::now_v7().to_string(),
        kind: super::NoticeKind::Lift,
        severity: original.severity,
        measures: original.measures.clone(),
        effective_from: original.effective_from,
        effective_until: Some(on),
        region: None,
        deliveries: deliveries_to(targets),
        lifts: Some(original.notice_id.clone()),
        corrects: None,
        reason: Some(reason.to_owned()),
        historical: false,
        grade: None,
    }
}

/// The correction of `original` to the facts of `now` (the notice the
/// corrected record calls for), to the subscriptions that received it.
pub(crate) fn correction_of(
    original: &crate::notice::StoredNotice,
    now: &super::NewNotice,
    targets: &[(String, String, String)],
) -> super::NewNotice {
    super::NewNotice {
        id: uuid::Uuid::now_v7().to_string(),
        kind: super::NoticeKind::Correction,
        deliveries: deliveries_to(targets),
        lifts: None,
        corrects: Some(original.notice_id.clone()),
        reason: None,
        historical: false,
        ..now.clone()
    }
}

/// Notices that are in effect: punishment and incentive notices not
/// lifted since (`lifted`: the ids lift notices name).
pub(crate) fn in_effect(
    notices: Vec<crate::notice::StoredNotice>,
    lifted: &std::collections::HashSet<String>,
) -> Vec<crate::notice::StoredNotice> {
    notices
        .into_iter()
        .filter(|n| {
            matches!(
                n.kind,
                super::NoticeKind::Punishment | super::NoticeKind::Incentive
            ) && !lifted.contains(&n.notice_id)
        })
        .collect()
}

/// The audit item of a correction: who, why, which revision, what followed
/// (never the record's content).
pub(crate) fn correction_audit(
    actor: &str,
    c: &super::Correction,
    revision: u32,
    effect: &str,
    notices: &[String],
    recipients: &[String],
) -> AuditItem {
    AuditItem::single(
        actor,
        "record.correct",
        &c.record_id,
        serde_json::json!({
            "revision": revision,
            "reason": c.reason,
            "item_version": c.item_version,
            "effect": effect,
            "notices": notices,
            "recipients": recipients,
        }),
    )
}

/// What a correction means for the notices: `corrected` (follow-ups of
/// the notices in effect were made), `lifted` (the corrected record calls
/// for no notice, so they were lifted), `notified` (none was in effect and
/// the corrected record calls for `notice`: the caller stores it) or
/// `none`.
pub(crate) fn correction_effect(
    notice: Option<&super::NewNotice>,
    followed_up: bool,
) -> &'static str {
    match (notice, followed_up) {
        (Some(_), true) => "corrected",
        (None, true) => "lifted",
        (Some(_), false) => "notified",
        (None, false) => "none",
    }
}

/// Adds a new notice and its recipients to a correction's lists.
pub(crate) fn add_notice(
    n: &super::NewNotice,
    notices: &mut Vec<String>,
    recipients: &mut Vec<String>,
) {
    notices.push(n.id.clone());
    recipients.extend(n.deliveries.iter().map(|d| d.agency.clone()));
    recipients.sort();
    recipients.dedup();
}

/// Feedback figures per agency (`feedback`) completed with the period's
/// deliveries by state (`(agency, state, count)`) and credit reviews
/// (`(agency, count)`); agencies with only deliveries or reviews appear too.
pub(crate) fn agency_stats(
    feedback: Vec<super::AgencyFeedbackStats>,
    deliveries: impl IntoIterator<Item = (String, String, i64)>,
    reviews: impl IntoIterator<Item = (String, i64)>,
) -> Vec<super::AgencyFeedbackStats> {
    let mut by_agency: BTreeMap<String, super::AgencyFeedbackStats> = feedback
        .into_iter()
        .map(|a| (a.agency.clone(), a))
        .collect();
    for (agency, state, n) in deliveries {
        let a = agency_entry(&mut by_agency, agency);
        *a.deliveries.entry(state).or_default() += n.max(0) as u64;
    }
    for (agency, n) in reviews {
        agency_entry(&mut by_agency, agency).reviews += n.max(0) as u64;
    }
    by_agency.into_values().collect()
}

fn agency_entry(
    by_agency: &mut BTreeMap<String, super::AgencyFeedbackStats>,
    agency: String,
) -> &mut super::AgencyFeedbackStats {
    by_agency
        .entry(agency.clone())
        .or_insert_with(|| super::AgencyFeedbackStats {
            agency,
            notices: 0,
            with_feedback: 0,
            feedback_rate: 0.0,
            deliveries: BTreeMap::new(),
            reviews: 0,
        })
}

/// Logs that a commit group failed and its other changes are committed
/// again one savepoint each. A failure only on a taken natural key (a
/// concurrent submission of the same record, answered by a new look-up)
/// is an expected race, logged at debug; anything else is an operator's
/// concern.
pub(crate) fn log_group_retry(jobs: usize, key_race: bool) {
    if key_race {
        tracing::debug!(
            jobs,
            "a natural key was taken since its look-up; committing the group's changes again, one savepoint each"
        );
    } else {
        tracing::warn!(
            jobs,
            "a change failed and rolled back its commit group; committing the others again, one savepoint each"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn working_days_skip_weekends() {
        // Friday 2026-11-20 → Monday 2026-11-23 is one working day.
        assert_eq!(
            working_days(date!(2026 - 11 - 20), date!(2026 - 11 - 23)),
            1
        );
        assert_eq!(
            working_days(date!(2026 - 11 - 20), date!(2026 - 11 - 20)),
            0
        );
        assert_eq!(
            working_days(date!(2026 - 11 - 16), date!(2026 - 11 - 27)),
            9
        );
    }

    #[test]
    fn grouped_items_become_one_entry_per_action_after_single_ones() {
        let entries = audit_entries(vec![
            AuditItem::grouped("d1", "submissions", "s1", serde_json::json!({})),
            AuditItem::single("admin", "catalog.activate", "item", serde_json::json!({})),
            AuditItem::grouped("d2", "submissions", "s2", serde_json::json!({})),
        ]);
        let summary: Vec<_> = entries
            .iter()
            .map(|(actor, action, subject, _)| (actor.as_str(), action.as_str(), subject.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("admin", "catalog.activate", "item"),
                ("gateway", "submissions", "2 item(s)")
            ]
        );
    }
}
