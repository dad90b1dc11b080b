//! Notices as stored and as they leave: the types shared by `store`
//! (which keeps them) and `redact` (which renders them for a recipient). A
//! leaf module, so neither of those two depends on the other for them.

use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};

use crate::catalog::Severity;

/// Kind of a notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoticeKind {
    /// Joint punishment.
    Punishment,
    /// Joint incentive.
    Incentive,
    /// Ends the effect of an earlier notice.
    Lift,
    /// The record of an earlier notice was corrected: the notice's facts
    /// as they now stand (`corrects` names the notice).
    Correction,
    /// Dishonesty warning (失信预警): the subject's repeated lesser records.
    Warning,
    /// The subject's credit grade changed (`grade` says from what to what).
    #[serde(rename = "grade_change")]
    GradeChange,
}

impl NoticeKind {
    /// API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::Punishment => "punishment",
            NoticeKind::Incentive => "incentive",
            NoticeKind::Lift => "lift",
            NoticeKind::Correction => "correction",
            NoticeKind::Warning => "warning",
            NoticeKind::GradeChange => "grade_change",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<NoticeKind> {
        match s {
            "punishment" => Some(NoticeKind::Punishment),
            "incentive" => Some(NoticeKind::Incentive),
            "lift" => Some(NoticeKind::Lift),
            "correction" => Some(NoticeKind::Correction),
            "warning" => Some(NoticeKind::Warning),
            "grade_change" => Some(NoticeKind::GradeChange),
            _ => None,
        }
    }
}

/// What a `grade_change` notice says: the subject's grade before and
/// after, and the rule (of which rule set version) that gave the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GradeShift {
    /// Grade before (for a subject never assessed, the grade of the rule
    /// set's last rule).
    pub from: String,
    /// Grade now.
    pub to: String,
    /// Rule that gave it.
    pub rule: String,
    /// Version of the rule set.
    pub rules_version: u32,
}

/// A stored notice, without record data.
#[derive(Debug, Clone, Serialize)]
pub struct StoredNotice {
    /// Notice id.
    pub notice_id: String,
    /// Punishment, incentive or lift.
    #[serde(rename = "type")]
    pub kind: NoticeKind,
    /// Catalog item.
    pub item: String,
    /// Item version of the record.
    pub item_version: u32,
    /// Record id.
    pub record_id: String,
    /// Submitting department.
    pub source: String,
    /// Severity.
    pub severity: Severity,
    /// Measure ids.
    pub measures: Vec<String>,
    /// Start of effect.
    #[serde(with = "crate::codes::iso_date_opt")]
    pub effective_from: Option<Date>,
    /// End of effect.
    #[serde(with = "crate::codes::iso_date_opt")]
    pub effective_until: Option<Date>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// For a lift: the notice it lifts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifts: Option<String>,
    /// For a lift: why (`repaired`, `revoked`, `corrected`, `expired`, `removed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a correction: the notice whose facts it corrects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrects: Option<String>,
    /// About a record loaded from history (`credgate import`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub historical: bool,
    /// For a grade change: from what to what.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grade: Option<GradeShift>,
}

/// Why a record's effect ended (the `reason` of its lift notices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// The subject repaired its credit (信用修复).
    Repaired,
    /// The decision was revoked.
    Revoked,
    /// The record was corrected.
    Corrected,
    /// Its effective period passed.
    Expired,
    /// Removed from its list (移出) by a removal decision.
    Removed,
}

impl EndReason {
    /// Every reason.
    pub const ALL: [EndReason; 5] = [
        EndReason::Repaired,
        EndReason::Revoked,
        EndReason::Corrected,
        EndReason::Expired,
        EndReason::Removed,
    ];

    /// Stored and API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Repaired => "repaired",
            EndReason::Revoked => "revoked",
            EndReason::Corrected => "corrected",
            EndReason::Expired => "expired",
            EndReason::Removed => "removed",
        }
    }

    /// Parses [`EndReason::as_str`]'s spelling.
    pub fn parse(s: &str) -> Option<EndReason> {
        EndReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The record's status once ended this way.
    pub fn record_status(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Removed => "removed",
            _ => "revoked",
        }
    }
}
