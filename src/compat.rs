//! Compatibility of two versions of a catalog item, field by field.
//!
//! A change is *breaking* when a record valid under the old version could be
//! invalid under the new one, when a department's integration stops working
//! (a provider or subject type removed), or when a field's class is lowered
//! (its data would be shared more widely). Breaking changes need
//! `"force": true` and a reason. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::catalog::{FieldClass, ItemDefinition};

/// One classified change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The field (or `*` for the item as a whole).
    pub field: String,
    /// Stable change kind, e.g. `added_optional_field`.
    pub change: &'static str,
    /// Whether it breaks records or integrations valid today.
    pub breaking: bool,
    /// Human explanation.
    pub detail: String,
}

/// The classification of a version change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Diff {
    /// Every change found.
    pub changes: Vec<Change>,
    /// True when any change is breaking.
    pub breaking: bool,
}

impl Diff {
    fn push(
        &mut self,
        field: &str,
        change: &'static str,
        breaking: bool,
        detail: impl Into<String>,
    ) {
        self.breaking |= breaking;
        self.changes.push(Change {
            field: field.to_owned(),
            change,
            breaking,
            detail: detail.into(),
        });
    }
}

fn props(schema: &Value) -> BTreeMap<String, Value> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn required(schema: &Value) -> BTreeSet<String> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn class(p: &Value) -> Option<FieldClass> {
    p.get("x-class")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
}

fn types(p: &Value) -> BTreeSet<String> {
    match p.get("type") {
        Some(Value::String(s)) => BTreeSet::from([s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => BTreeSet::new(),
    }
}

fn enum_values(p: &Value) -> Option<BTreeSet<String>> {
    p.get("enum")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(Value::to_string).collect())
}

fn compare_enum(
    diff: &mut Diff,
    name: &str,
    key: &str,
    old: Option<BTreeSet<String>>,
    new: Option<BTreeSet<String>>,
) {
    match (old, new) {
        (Some(o), Some(n)) => {
            let removed: Vec<_> = o.difference(&n).cloned().collect();
            let added: Vec<_> = n.difference(&o).cloned().collect();
            if !removed.is_empty() {
                diff.push(
                    name,
                    "enum_value_removed",
                    true,
                    format!("{key}enum lost {}", removed.join(", ")),
                );
            }
            if !added.is_empty() {
                diff.push(
                    name,
                    "enum_value_added",
                    false,
                    format!("{key}enum gained {}", added.join(", ")),
                );
            }
        }
        (None, Some(_)) => diff.push(
            name,
            "enum_value_removed",
            true,
            format!("{key}enum introduced"),
        ),
        (Some(_), None) => diff.push(
            name,
            "enum_value_added",
            false,
            format!("{key}enum dropped"),
        ),
        (None, None) => {}
    }
}

/// Compares a numeric limit where a larger value is looser (`max*`) or
/// tighter (`min*`).
fn limit(
    diff: &mut Diff,
    field: &str,
    old: &Value,
    new: &Value,
    key: &str,
    larger_is_looser: bool,
) {
    let (o, n) = (
        old.get(key).and_then(Value::as_f64),
        new.get(key).and_then(Value::as_f64),
    );
    let tighter = match (o, n) {
        (None, None) => return,
        (Some(o), Some(n)) if o == n => return,
        (None, Some(_)) => true,
        (Some(_), None) => false,
        (Some(o), Some(n)) => (n < o) == larger_is_looser,
    };
    let show = |v: Option<f64>| v.map_or("none".to_owned(), |v| v.to_string());
    if tighter {
        diff.push(
            field,
            "constraint_tightened",
            true,
            format!("{key} {} → {}", show(o), show(n)),
        );
    } else {
        diff.push(
            field,
            "constraint_loosened",
            false,
            format!("{key} {} → {}", show(o), show(n)),
        );
    }
}

fn compare_field(diff: &mut Diff, name: &str, old: &Value, new: &Value) {
    let (ot, nt) = (types(old), types(new));
    if ot != nt {
        let widened = nt.is_superset(&ot)
            || (ot == BTreeSet::from(["integer".to_owned()]) && nt.contains("number"));
        if widened && !ot.is_empty() {
            diff.push(name, "type_widened", false, format!("type {ot:?} → {nt:?}"));
        } else {
            diff.push(name, "type_narrowed", true, format!("type {ot:?} → {nt:?}"));
        }
    }
    compare_enum(diff, name, "", enum_values(old), enum_values(new));
    compare_enum(
        diff,
        name,
        "items.",
        old.get("items").and_then(enum_values),
        new.get("items").and_then(enum_values),
    );
    for (key, looser_when_larger) in [
        ("maxLength", true),
        ("maxItems", true),
        ("maximum", true),
        ("exclusiveMaximum", true),
        ("minLength", false),
        ("minItems", false),
        ("minimum", false),
        ("exclusiveMinimum", false),
    ] {
        limit(diff, name, old, new, key, looser_when_larger);
    }
    for key in ["pattern", "format", "const"] {
        match (old.get(key), new.get(key)) {
            (o, n) if o == n => {}
            (_, Some(n)) => diff.push(name, "constraint_tightened", true, format!("{key} now {n}")),
            (Some(_), None) => {
                diff.push(name, "constraint_loosened", false, format!("{key} removed"))
            }
            (None, None) => {}
        }
    }
    match (class(old), class(new)) {
        (Some(o), Some(n)) if n < o => diff.push(
            name,
            "class_lowered",
            true,
            format!("x-class {o:?} → {n:?}: the field would be shared more widely"),
        ),
        (Some(o), Some(n)) if n > o => diff.push(
            name,
            "class_raised",
            false,
            format!("x-class {o:?} → {n:?}"),
        ),
        _ => {}
    }
    if old.get("x-class-by-subject-type") != new.get("x-class-by-subject-type") {
        diff.push(
            name,
            "class_changed",
            true,
            "x-class-by-subject-type changed",
        );
    }
    if old.get("x-zh") != new.get("x-zh") {
        diff.push(name, "name_changed", false, "x-zh changed");
    }
}

/// Classifies the change from `old` to `new`.
pub fn diff(old: &ItemDefinition, new: &ItemDefinition) -> Diff {
    let mut d = Diff::default();
    let (op, np) = (props(&old.schema), props(&new.schema));
    let (or, nr) = (required(&old.schema), required(&new.schema));
    for (name, p) in &np {
        match op.get(name) {
            None if nr.contains(name) => d.push(
                name,
                "added_required_field",
                true,
                "new required field: records without it become invalid",
            ),
            None => d.push(name, "added_optional_field", false, "new optional field"),
            Some(o) => compare_field(&mut d, name, o, p),
        }
    }
    for name in op.keys().filter(|n| !np.contains_key(*n)) {
        d.push(
            name,
            "removed_field",
            true,
            "field removed: records that carry it become invalid",
        );
    }
    for name in nr.difference(&or).filter(|n| op.contains_key(*n)) {
        d.push(
            name,
            "became_required",
            true,
            "optional field is now required",
        );
    }
    for name in or.difference(&nr).filter(|n| np.contains_key(*n)) {
        d.push(
            name,
            "became_optional",
            false,
            "required field is now optional",
        );
    }
    let closed = |s: &Value| s.get("additionalProperties") == Some(&Value::Bool(false));
    if closed(&new.schema) && !closed(&old.schema) {
        d.push(
            "*",
            "constraint_tightened",
            true,
            "additionalProperties is now false",
        );
    }
    if old.schema.get("allOf") != new.schema.get("allOf") {
        d.push(
            "*",
            "conditional_rules_changed",
            true,
            "conditional rules (allOf) changed; review whether they are stricter",
        );
    }
    let old_rules = serde_json::to_value(&old.rules).unwrap_or_default();
    let new_rules = serde_json::to_value(&new.rules).unwrap_or_default();
    if old_rules != new_rules {
        let added = new.rules.len() >= old.rules.len();
        d.push(
            "*",
            if added {
                "rules_tightened"
            } else {
                "rules_loosened"
            },
            added,
            "cross-field rules changed",
        );
    }
    let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
    let (opv, npv) = (set(&old.providers), set(&new.providers));
    for p in opv.difference(&npv) {
        d.push(
            "*",
            "provider_removed",
            true,
            format!("{p} may no longer submit this item"),
        );
    }
    for p in npv.difference(&opv) {
        d.push(
            "*",
            "provider_added",
            false,
            format!("{p} may now submit this item"),
        );
    }
    let st = |v: &[crate::catalog::SubjectType]| {
        v.iter().map(|s| format!("{s:?}")).collect::<BTreeSet<_>>()
    };
    let (ost, nst) = (st(&old.subject_types), st(&new.subject_types));
    for s in ost.difference(&nst) {
        d.push(
            "*",
            "subject_type_removed",
            true,
            format!("{s} records no longer accepted"),
        );
    }
    for s in nst.difference(&ost) {
        d.push(
            "*",
            "subject_type_added",
            false,
            format!("{s} records now accepted"),
        );
    }
    let notice =
        |n: &Option<crate::catalog::NoticeRule>| serde_json::to_value(n).unwrap_or_default();
    if notice(&old.notice) != notice(&new.notice) {
        d.push(
            "*",
            "notice_changed",
            false,
            "notice rule or measures changed",
        );
    }
    if old.name != new.name || old.name_zh != new.name_zh || old.description != new.description {
        d.push("*", "name_changed", false, "names or description changed");
    }
    if old.decision_date_field != new.decision_date_field {
        d.push(
            "*",
            "decision_date_field_changed",
            false,
            "timeliness is measured from another field",
        );
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(props: Value, required: Value) -> ItemDefinition {
        serde_json::from_value(json!({
            "id": "x", "version": 1, "name": "X", "name_zh": "甲", "subject_types": ["legal_entity"],
            "providers": ["dept-a"], "decision_date_field": "d",
            "schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                       "properties": props, "required": required, "additionalProperties": false}
        }))
        .expect("definition")
    }

    fn kinds(d: &Diff) -> Vec<(&str, &str, bool)> {
        d.changes
            .iter()
            .map(|c| (c.field.as_str(), c.change, c.breaking))
            .collect()
    }

    #[test]
    fn classifies_each_kind_of_change() {
        let old = item(
            json!({
                "a": {"type": "string", "maxLength": 10, "x-class": "secret", "x-zh": "甲"},
                "b": {"enum": ["x", "y"], "x-class": "public", "x-zh": "乙"},
                "c": {"type": "integer", "x-class": "public", "x-zh": "丙"},
                "gone": {"type": "string", "maxLength": 5, "x-class": "public", "x-zh": "丁"}
            }),
            json!(["a"]),
        );
        let new = item(
            json!({
                "a": {"type": "string", "maxLength": 5, "x-class": "public", "x-zh": "甲"},
                "b": {"enum": ["x", "z"], "x-class": "public", "x-zh": "乙"},
                "c": {"type": "number", "x-class": "shared", "x-zh": "丙"},
                "opt": {"type": "string", "maxLength": 5, "x-class": "public", "x-zh": "戊"},
                "req": {"type": "string", "maxLength": 5, "x-class": "public", "x-zh": "己"}
            }),
            json!(["a", "req"]),
        );
        let d = diff(&old, &new);
        let k = kinds(&d);
        for expected in [
            ("a", "constraint_tightened", true),
            ("a", "class_lowered", true),
            ("b", "enum_value_removed", true),
            ("b", "enum_value_added", false),
            ("c", "type_widened", false),
            ("c", "class_raised", false),
            ("opt", "added_optional_field", false),
            ("req", "added_required_field", true),
            ("gone", "removed_field", true),
        ] {
            assert!(k.contains(&expected), "missing {expected:?} in {k:?}");
        }
        assert!(d.breaking);
    }

    #[test]
    fn an_added_optional_field_alone_is_compatible() {
        let old = item(
            json!({"a": {"type": "string", "maxLength": 10, "x-class": "public", "x-zh": "甲"}}),
            json!([]),
        );
        let new = item(
            json!({"a": {"type": "string", "maxLength": 20, "x-class": "public", "x-zh": "甲"},
                   "b": {"type": "string", "maxLength": 20, "x-class": "shared", "x-zh": "乙"}}),
            json!([]),
        );
        let d = diff(&old, &new);
        assert!(!d.breaking, "{:?}", d.changes);
        assert_eq!(
            kinds(&d),
            [
                ("a", "constraint_loosened", false),
                ("b", "added_optional_field", false)
            ]
        );
    }

    #[test]
    fn narrowing_a_type_and_lowering_secret_to_public_are_breaking() {
        let old = item(
            json!({"n": {"type": "number", "x-class": "secret", "x-zh": "甲"}}),
            json!([]),
        );
        let new = item(
            json!({"n": {"type": "integer", "x-class": "public", "x-zh": "甲"}}),
            json!([]),
        );
        let d = diff(&old, &new);
        let k = kinds(&d);
        assert!(k.contains(&("n", "type_narrowed", true)));
        assert!(k.contains(&("n", "class_lowered", true)));
    }
}
