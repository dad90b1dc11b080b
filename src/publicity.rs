//! Publicity periods (双公示 / 红黑名单公示): how long a record is shown on
//! the public channel, by the rule set in force when it was decided.
//!
//! The rules changed several times (`shared/domain.md` §6), so the periods
//! are configuration (`[[public.rule_set]]`) and every record is stamped at
//! acceptance with the rule set that applied and its publicity start and
//! end. A later change of the rules never changes what a stamped record
//! was promised. Periods run from the decision date. A record whose level
//! the rule set does not publish (minor penalties from 2026-04) gets no
//! stamp and is never shown.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::Date;

use crate::catalog::{CatalogItem, SubjectType};
use crate::codes::months_after;

/// A publicity period, in months from the decision date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Period {
    /// Shortest (repair cannot end publication earlier).
    pub min_months: u32,
    /// Longest; the period when the record names no end of its own.
    pub max_months: u32,
}

/// The periods of one set of rules, in force for decisions from `from`
/// to `until` (inclusive; none = still in force).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    /// Stamped on records (`2026-04`, …).
    pub id: String,
    /// First decision date it applies to (`YYYY-MM-DD`).
    pub from: String,
    /// Last decision date it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Level `minor` (none: not published).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<Period>,
    /// Level `general`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub general: Option<Period>,
    /// Level `major` (较重).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<Period>,
    /// Level `serious`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serious: Option<Period>,
    /// Records without a level and without an end of effect (licences):
    /// months shown.
    pub other_months: u32,
}

/// The rule sets of `shared/domain.md` §6 (confirm the numbers with the
/// operator; they are configuration).
pub fn default_rule_sets() -> Vec<RuleSet> {
    let p = |min_months, max_months| {
        Some(Period {
            min_months,
            max_months,
        })
    };
    vec![
        RuleSet {
            id: "2019-07".into(),
            from: "2019-07-01".into(),
            until: Some("2023-04-30".into()),
            minor: None,
            general: p(3, 12),
            major: p(6, 36),
            serious: p(6, 36),
            other_months: 36,
        },
        RuleSet {
            id: "2023-05".into(),
            from: "2023-05-01".into(),
            until: Some("2026-03-31".into()),
            minor: p(3, 36),
            general: p(3, 36),
            major: p(3, 36),
            serious: p(3, 36),
            other_months: 36,
        },
        RuleSet {
            id: "2026-04".into(),
            from: "2026-04-01".into(),
            until: None,
            minor: None,
            general: p(3, 12),
            major: p(12, 36),
            serious: p(12, 36),
            other_months: 36,
        },
    ]
}

/// What a record is stamped with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// Rule set id.
    pub rule_set: String,
    /// First day shown.
    pub start: Date,
    /// Last day shown.
    pub end: Date,
}

fn parse(s: &str) -> Option<Date> {
    crate::codes::parse_iso_date(s)
}

/// Every problem of the rule sets (configuration check).
pub fn problems(sets: &[RuleSet]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut last_until: Option<Date> = None;
    for (i, s) in sets.iter().enumerate() {
        let at = format!("public.rule_set[{i}] ({})", s.id);
        let from = parse(&s.from);
        let until = s.until.as_deref().map(parse);
        if from.is_none() {
            errors.push(format!("{at}.from: a date YYYY-MM-DD"));
        }
        if until == Some(None) {
            errors.push(format!("{at}.until: a date YYYY-MM-DD"));
        }
        if let (Some(f), Some(Some(u))) = (from, until) {
            if u < f {
                errors.push(format!("{at}: until is before from"));
            }
        }
        if let (Some(f), Some(prev)) = (from, last_until) {
            if f <= prev {
                errors.push(format!("{at}: overlaps the rule set before it"));
            }
        }
        if i + 1 < sets.len() && s.until.is_none() {
            errors.push(format!("{at}: only the last rule set may be open-ended"));
        }
        last_until = until.flatten();
        for (level, p) in [
            ("minor", s.minor),
            ("general", s.general),
            ("major", s.major),
            ("serious", s.serious),
        ] {
            if let Some(p) = p {
                if p.min_months > p.max_months || p.max_months == 0 || p.max_months > 120 {
                    errors.push(format!(
                        "{at}.{level}: 0 ≤ min_months ≤ max_months ≤ 120, max_months > 0"
                    ));
                }
            }
        }
        if s.other_months == 0 || s.other_months > 120 {
            errors.push(format!("{at}.other_months: 1 to 120"));
        }
    }
    errors
}

/// The stamp of a valid record of `item` (none: the item is not
/// published, the record's subject may not be shown, or its level is not
/// published under the rules that applied).
pub fn stamp(
    sets: &[RuleSet],
    item: &CatalogItem,
    record: &Value,
    decision_date: Option<Date>,
    effective_until: Option<Date>,
) -> Option<Stamp> {
    let spec = item.def.publicity.as_ref()?;
    let subject_type = record
        .get("subject_type")
        .cloned()
        .and_then(|v| serde_json::from_value::<SubjectType>(v).ok());
    if subject_type == Some(SubjectType::NaturalPerson) && !spec.natural_persons {
        return None;
    }
    let start = decision_date?;
    let set = sets.iter().find(|s| {
        parse(&s.from).is_some_and(|f| f <= start)
            && s.until
                .as_deref()
                .and_then(parse)
                .is_none_or(|u| start <= u)
    })?;
    let text = |f: &Option<String>| {
        f.as_deref()
            .and_then(|f| record.get(f))
            .and_then(Value::as_str)
    };
    let end = match text(&spec.level_field) {
        Some(level) => {
            let period = match level {
                "minor" => set.minor,
                "general" => set.general,
                "major" => set.major,
                "serious" => set.serious,
                _ => None,
            }?;
            let (shortest, longest) = (
                months_after(start, period.min_months),
                months_after(start, period.max_months),
            );
            // The record's own end of publicity, within the rule's bounds.
            text(&spec.end_field)
                .and_then(parse)
                .map_or(longest, |e| e.clamp(shortest, longest))
        }
        None => effective_until.unwrap_or_else(|| months_after(start, set.other_months)),
    };
    Some(Stamp {
        rule_set: set.id.clone(),
        start,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn the_default_rule_sets_are_consistent() {
        assert_eq!(problems(&default_rule_sets()), Vec::<String>::new());
        let mut bad = default_rule_sets();
        bad[1].from = "2023-04-01".into();
        bad[2].general = Some(Period {
            min_months: 13,
            max_months: 12,
        });
        let p = problems(&bad).join("\n");
        assert!(p.contains("overlaps") && p.contains("general"), "{p}");
    }

    #[test]
    fn months_are_calendar_months() {
        assert_eq!(
            months_after(date!(2026 - 10 - 15), 12),
            date!(2027 - 10 - 15)
        );
        assert_eq!(
            months_after(date!(2026 - 01 - 31), 1),
            date!(2026 - 02 - 28)
        );
    }
}
