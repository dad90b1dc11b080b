//! Credit grades for classified supervision (分类监管).
//!
//! A rule set (`catalogs/grades.toml`, then versions changed through the
//! admin API) names the grades (e.g. A 守信, B 基本守信, C 失信, D 严重失信)
//! and the rules that give them. Rules are tried in order over a subject's
//! records in effect; the first that matches gives the grade. A rule
//! matches when one of its `any` conditions matches a record (no `any`:
//! always) and none of its `none` conditions matches any record. The last
//! rule has neither, so every subject gets a grade.
//!
//! Pure: parsing, validation against the catalog and evaluation, no I/O.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::Date;

use crate::catalog::{Catalog, NoticeType, Severity};
use crate::codes::{months_after, months_before};

/// Most grades in a rule set.
const MAX_GRADES: usize = 20;
/// Most rules in a rule set.
const MAX_RULES: usize = 100;
/// Most conditions in one list.
const MAX_CONDITIONS: usize = 50;
/// Longest look-back of a condition, months.
const MAX_WITHIN_MONTHS: u32 = 120;

/// One grade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradeDef {
    /// Short code (`A` … `D`).
    pub code: String,
    /// English name.
    pub name: String,
    /// Official Chinese name (守信, 基本守信, 失信, 严重失信).
    pub name_zh: String,
}

/// What a record in effect must be for a condition to hold; every field
/// given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Catalog item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    /// Punishment or incentive.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub notice_type: Option<NoticeType>,
    /// Levels (general, major, serious); empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<Severity>,
    /// Decided within this many months before the day of assessment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_months: Option<u32>,
}

/// One rule: a grade, and when it applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Stable id, named in reports (`[a-z0-9_]`).
    pub id: String,
    /// The grade it gives.
    pub grade: String,
    /// What it means, in English.
    #[serde(default)]
    pub description: String,
    /// What it means, in Chinese.
    #[serde(default)]
    pub description_zh: String,
    /// One of these must match a record in effect (none given: always).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any: Vec<Condition>,
    /// None of these may match a record in effect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub none: Vec<Condition>,
}

/// A rule set as written (TOML file, JSON through the admin API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    /// The grades, best first.
    #[serde(rename = "grade")]
    pub grades: Vec<GradeDef>,
    /// The rules, tried in order.
    #[serde(rename = "rule")]
    pub rules: Vec<Rule>,
}

/// What grading needs of one record in effect.
#[derive(Debug, Clone)]
pub struct Fact<'a> {
    /// Record id.
    pub record_id: &'a str,
    /// Catalog item.
    pub item: &'a str,
    /// Punishment or incentive.
    pub notice_type: NoticeType,
    /// Level, if the item has one.
    pub level: Option<Severity>,
    /// Decision date.
    pub decision_date: Option<Date>,
}

/// A subject's grade and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grade {
    /// Grade code.
    pub code: String,
    /// English name.
    pub name: String,
    /// Chinese name.
    pub name_zh: String,
    /// The rule that gave it.
    pub rule: String,
    /// The rule's Chinese description.
    pub rule_description_zh: String,
    /// The records that made an `any` condition hold (empty for a rule
    /// without one).
    pub records: Vec<String>,
    /// Version of the rule set.
    pub rules_version: u32,
}

/// Whether `c` holds for `f` on `today`.
fn holds(c: &Condition, f: &Fact<'_>, today: Date) -> bool {
    c.item.as_deref().is_none_or(|i| i == f.item)
        && c.notice_type.is_none_or(|t| t == f.notice_type)
        && (c.levels.is_empty() || f.level.is_some_and(|l| c.levels.contains(&l)))
        && c.within_months.is_none_or(|m| {
            f.decision_date
                .is_some_and(|d| d >= months_before(today, m))
        })
}

impl RuleSet {
    /// Reads and checks a TOML rule file.
    pub fn read_file(path: &Path, catalog: &Catalog) -> Result<RuleSet, Vec<String>> {
        let text =
            std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let set: RuleSet =
            toml::from_str(&text).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        set.check(catalog)?;
        Ok(set)
    }

    /// Parses and checks a rule set given as JSON (admin API, store).
    pub fn from_json(doc: &Value, catalog: &Catalog) -> Result<RuleSet, Vec<String>> {
        let set: RuleSet =
            serde_json::from_value(doc.clone()).map_err(|e| vec![format!("rule set: {e}")])?;
        set.check(catalog)?;
        Ok(set)
    }

    /// Every problem of the rule set, as `pointer: message` (JSON pointers
    /// into the JSON form).
    pub fn check(&self, catalog: &Catalog) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if self.grades.is_empty() || self.grades.len() > MAX_GRADES {
            errors.push(format!("/grade: 1 to {MAX_GRADES} grades"));
        }
        let mut codes = HashSet::new();
        for (i, g) in self.grades.iter().enumerate() {
            let valid = !g.code.is_empty()
                && g.code.len() <= 8
                && g.code
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-');
            if !valid {
                errors.push(format!("/grade/{i}/code: 1 to 8 letters, digits, + or -"));
            }
            if !codes.insert(g.code.as_str()) {
                errors.push(format!("/grade/{i}/code: {} is defined twice", g.code));
            }
            for (field, v) in [("name", &g.name), ("name_zh", &g.name_zh)] {
                if v.trim().is_empty() || v.chars().count() > 50 {
                    errors.push(format!("/grade/{i}/{field}: 1 to 50 characters"));
                }
            }
        }
        if self.rules.is_empty() || self.rules.len() > MAX_RULES {
            errors.push(format!("/rule: 1 to {MAX_RULES} rules"));
        }
        let mut ids = HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let valid = !r.id.is_empty()
                && r.id.len() <= 64
                && r.id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                errors.push(format!("/rule/{i}/id: 1 to 64 of a-z, 0-9 and _"));
            }
            if !ids.insert(r.id.as_str()) {
                errors.push(format!("/rule/{i}/id: {} is used twice", r.id));
            }
            if !codes.contains(r.grade.as_str()) {
                errors.push(format!(
                    "/rule/{i}/grade: {} is no grade of the set",
                    r.grade
                ));
            }
            for (field, v) in [
                ("description", &r.description),
                ("description_zh", &r.description_zh),
            ] {
                if v.chars().count() > 500 {
                    errors.push(format!("/rule/{i}/{field}: at most 500 characters"));
                }
            }
            for (list, conditions) in [("any", &r.any), ("none", &r.none)] {
                if conditions.len() > MAX_CONDITIONS {
                    errors.push(format!("/rule/{i}/{list}: at most {MAX_CONDITIONS}"));
                }
                for (j, c) in conditions.iter().enumerate() {
                    let at = format!("/rule/{i}/{list}/{j}");
                    if c == &Condition::default() {
                        errors.push(format!("{at}: names no item, type, level or period"));
                    }
                    if let Some(item) = &c.item {
                        match catalog.get(item) {
                            None => errors.push(format!("{at}/item: no catalog item {item}")),
                            Some(x) if x.def.notice.is_none() => errors.push(format!(
                                "{at}/item: {item} is no punishment or incentive item"
                            )),
                            Some(_) => {}
                        }
                    }
                    if c.notice_type == Some(NoticeType::Warning)
                        || c.notice_type == Some(NoticeType::GradeChange)
                    {
                        errors.push(format!("{at}/type: punishment or incentive"));
                    }
                    if c.within_months
                        .is_some_and(|m| m == 0 || m > MAX_WITHIN_MONTHS)
                    {
                        errors.push(format!("{at}/within_months: 1 to {MAX_WITHIN_MONTHS}"));
                    }
                }
            }
        }
        // The last rule gives every subject left a grade; a rule after a
        // catch-all could never apply.
        match self.rules.iter().position(|r| r.any.is_empty() && r.none.is_empty()) {
            None => errors.push(format!(
                "/rule/{}: the last rule must have no any and no none, so that every subject gets a grade",
                self.rules.len().saturating_sub(1)
            )),
            Some(p) if p + 1 < self.rules.len() => errors.push(format!(
                "/rule/{}: can never apply: rule {} before it matches every subject",
                p + 1,
                self.rules[p].id
            )),
            Some(_) => {}
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The grade the records in effect `facts` give on `today`.
    pub fn grade(&self, version: u32, facts: &[Fact<'_>], today: Date) -> Grade {
        for rule in &self.rules {
            let matched: Vec<String> = facts
                .iter()
                .filter(|f| rule.any.iter().any(|c| holds(c, f, today)))
                .map(|f| f.record_id.to_owned())
                .collect();
            if (!rule.any.is_empty() && matched.is_empty())
                || facts
                    .iter()
                    .any(|f| rule.none.iter().any(|c| holds(c, f, today)))
            {
                continue;
            }
            return self.named(version, rule, matched);
        }
        // Unreachable for a checked set (its last rule matches); the last
        // rule stands in.
        let last = self.rules.last().cloned().unwrap_or(Rule {
            id: String::new(),
            grade: String::new(),
            description: String::new(),
            description_zh: String::new(),
            any: Vec::new(),
            none: Vec::new(),
        });
        self.named(version, &last, Vec::new())
    }

    fn named(&self, version: u32, rule: &Rule, records: Vec<String>) -> Grade {
        let def = self.grades.iter().find(|g| g.code == rule.grade);
        Grade {
            code: rule.grade.clone(),
            name: def.map(|g| g.name.clone()).unwrap_or_default(),
            name_zh: def.map(|g| g.name_zh.clone()).unwrap_or_default(),
            rule: rule.id.clone(),
            rule_description_zh: rule.description_zh.clone(),
            records,
            rules_version: version,
        }
    }

    /// The earliest day after `today` on which the same records could give
    /// another grade because a `within_months` window closes on one of
    /// them (so the subject is assessed again then), if any.
    pub fn next_change(&self, facts: &[Fact<'_>], today: Date) -> Option<Date> {
        let mut next: Option<Date> = None;
        for rule in &self.rules {
            for c in rule.any.iter().chain(&rule.none) {
                let Some(m) = c.within_months else { continue };
                for f in facts {
                    let Some(d) = f.decision_date else { continue };
                    // Held while d >= months_before(day, m); leaves the
                    // window on the first day whose look-back passes d,
                    // which is about m months after d.
                    if d < months_before(today, m) {
                        continue;
                    }
                    let mut day = months_after(d, m)
                        .saturating_sub(time::Duration::days(3))
                        .max(today);
                    while d >= months_before(day, m) {
                        day = day.next_day().unwrap_or(Date::MAX);
                    }
                    next = Some(next.map_or(day, |n| n.min(day)));
                }
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn catalog() -> Catalog {
        Catalog::load_dir(
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/catalogs/credit")),
            &|_| true,
        )
        .expect("catalog")
    }

    fn shipped() -> RuleSet {
        RuleSet::read_file(
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/catalogs/grades.toml")),
            &catalog(),
        )
        .expect("shipped rules")
    }

    fn fact<'a>(
        id: &'a str,
        item: &'a str,
        t: NoticeType,
        level: Option<Severity>,
        d: Date,
    ) -> Fact<'a> {
        Fact {
            record_id: id,
            item,
            notice_type: t,
            level,
            decision_date: Some(d),
        }
    }

    #[test]
    fn the_shipped_rules_give_the_documented_grades() {
        let rules = shipped();
        let today = date!(2026 - 11 - 28);
        let p = NoticeType::Punishment;
        let listing = fact(
            "l",
            "serious_dishonesty",
            p,
            Some(Severity::Serious),
            date!(2024 - 01 - 05),
        );
        let major = fact(
            "m",
            "administrative_penalty",
            p,
            Some(Severity::Major),
            date!(2026 - 03 - 01),
        );
        let old_major = fact(
            "o",
            "administrative_penalty",
            p,
            Some(Severity::Major),
            date!(2025 - 10 - 01),
        );
        let general = fact(
            "g",
            "administrative_penalty",
            p,
            Some(Severity::General),
            date!(2026 - 10 - 01),
        );
        let abnormal = fact(
            "a",
            "abnormal_operations",
            p,
            Some(Severity::General),
            date!(2026 - 01 - 10),
        );
        let red = fact(
            "r",
            "red_list",
            NoticeType::Incentive,
            None,
            date!(2025 - 06 - 01),
        );
        let cases: Vec<(Vec<Fact<'_>>, &str)> = vec![
            (vec![], "B"),
            (vec![red.clone()], "A"),
            (vec![red.clone(), general.clone()], "B"),
            (vec![general.clone()], "B"),
            (vec![major.clone()], "C"),
            (vec![old_major.clone()], "B"),
            (vec![abnormal.clone(), red.clone()], "C"),
            (vec![listing.clone(), red.clone(), major.clone()], "D"),
        ];
        for (facts, want) in cases {
            let g = rules.grade(1, &facts, today);
            let ids: Vec<&str> = facts.iter().map(|f| f.record_id).collect();
            assert_eq!(g.code, want, "{ids:?}: {g:?}");
        }
        let d = rules.grade(3, &[listing, major], today);
        assert_eq!(
            (d.rule.as_str(), d.records.as_slice(), d.rules_version),
            ("serious_dishonesty_listed", &["l".to_owned()][..], 3)
        );
        assert_eq!(d.name_zh, "严重失信");
    }

    #[test]
    fn a_window_closing_is_the_next_change() {
        let rules = shipped();
        let p = NoticeType::Punishment;
        let major = fact(
            "m",
            "administrative_penalty",
            p,
            Some(Severity::Major),
            date!(2026 - 03 - 01),
        );
        let today = date!(2026 - 11 - 28);
        let next = rules
            .next_change(std::slice::from_ref(&major), today)
            .expect("closes");
        assert_eq!(next, date!(2027 - 03 - 02));
        assert_eq!(
            rules
                .grade(
                    1,
                    std::slice::from_ref(&major),
                    next.previous_day().expect("day")
                )
                .code,
            "C"
        );
        assert_eq!(rules.grade(1, &[major], next).code, "B");
    }

    #[test]
    fn months_before_clamps_the_day() {
        assert_eq!(
            months_before(date!(2026 - 03 - 31), 1),
            date!(2026 - 02 - 28)
        );
        assert_eq!(
            months_before(date!(2026 - 01 - 15), 12),
            date!(2025 - 01 - 15)
        );
        assert_eq!(
            months_before(date!(2026 - 01 - 15), 13),
            date!(2024 - 12 - 15)
        );
    }

    #[test]
    fn bad_rule_sets_are_refused_with_pointers() {
        let catalog = catalog();
        let mut set = shipped();
        set.rules[0].grade = "Z".into();
        set.rules[1].any[0].item = Some("no_such_item".into());
        set.rules[1].any[0].within_months = Some(0);
        set.rules.swap(0, 3);
        set.grades.push(set.grades[0].clone());
        let errors = set.check(&catalog).expect_err("refused");
        let text = errors.join("\n");
        for want in [
            "/rule/3/grade",
            "/rule/1/any/0/item",
            "/rule/1/any/0/within_months",
            "/rule/1: can never apply",
            "/grade/4/code",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        let mut set = shipped();
        set.rules.pop();
        assert!(set
            .check(&catalog)
            .expect_err("no catalog-all")
            .join("")
            .contains("last rule"));
        let mut set = shipped();
        set.rules[0].any.push(Condition::default());
        assert!(set.check(&catalog).is_err());
    }
}
