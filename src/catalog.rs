//! The credit information collection catalog (信用信息归集目录): item model,
//! loading from a folder, compiled validators, and record validation.
//!
//! An item is a JSON document with a draft 2020-12 JSON Schema inside; every
//! top-level field carries `x-class` (its privacy class) and `x-zh` (its
//! official Chinese name). Validators are compiled once when a catalog is
//! loaded and reused for every record. No I/O happens here apart from
//! `load_dir`; validation messages never contain a submitted value.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::Date;

use crate::codes::{self, CodeError};

/// Privacy class of a field, and — used as a clearance — the highest class
/// a recipient may see. Ordered from least to most sensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldClass {
    /// Published to everyone while within its publicity period.
    Public,
    /// Government agencies.
    Shared,
    /// Agencies with a stated need (joint punishment implementers).
    Restricted,
    /// Never leaves in clear.
    Secret,
}

/// Kinds of subject a record can be about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectType {
    /// 法人及非法人组织
    LegalEntity,
    /// 自然人
    NaturalPerson,
    /// 个体工商户
    IndividualBusiness,
}

/// Level of a dishonesty record (失信程度), ordered: the three levels of
/// the Jiangsu rules for legal and natural persons. `minor` (the earlier
/// lowest level) is read as `general`, so existing data and subscriptions
/// keep working; it is never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// 一般
    General,
    /// 较重
    Major,
    /// 严重
    Serious,
}

impl Severity {
    /// Every level, lowest first.
    pub const ALL: [Severity; 3] = [Severity::General, Severity::Major, Severity::Serious];

    /// The one spelling: API, catalog and store.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::General => "general",
            Severity::Major => "major",
            Severity::Serious => "serious",
        }
    }

    /// Parses [`Severity::as_str`]'s spelling, and `minor` as `general`.
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "minor" => Some(Severity::General),
            _ => Severity::ALL.into_iter().find(|v| v.as_str() == s),
        }
    }
}

impl Serialize for Severity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Severity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Severity, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Severity::parse(&s).ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&s),
                &"general, major or serious (minor is read as general)",
            )
        })
    }
}

/// What kind of notice a record produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoticeType {
    /// Joint punishment (联合惩戒).
    Punishment,
    /// Joint incentive (联合激励).
    Incentive,
    /// Dishonesty warning (失信预警): a subject's repeated lesser records.
    /// Only subscriptions that name it receive it.
    Warning,
    /// A subject's credit grade changed (分类监管). Only subscriptions that
    /// name it receive it.
    #[serde(rename = "grade_change")]
    GradeChange,
}

/// A catalog item as written in `catalogs/<catalog>/<id>.json` and as the
/// admin API will take it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemDefinition {
    /// Stable snake_case id used in the API.
    pub id: String,
    /// Version number, from 1.
    pub version: u32,
    /// English name.
    pub name: String,
    /// Official Chinese name.
    pub name_zh: String,
    /// What the item records, for integrators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Subject types a record of this item may be about.
    pub subject_types: Vec<SubjectType>,
    /// Participant ids of the departments allowed to submit this item.
    pub providers: Vec<String>,
    /// Field holding the decision (or listing) date; timeliness is measured
    /// from it.
    pub decision_date_field: String,
    /// Draft 2020-12 JSON Schema of one record.
    pub schema: Value,
    /// Cross-field checks JSON Schema cannot express.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// When a record of this item produces a notice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<NoticeRule>,
    /// The fields that identify one decision (the record's natural key), in
    /// order. Each part is a field, or a list of fields of which the first
    /// present one counts (`["uscc", "id_number"]`: the subject). A record
    /// missing a part is identified by its whole content instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub natural_key: Vec<KeyPart>,
    /// For a list item (名单): how a subject is removed from the list (移出).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal: Option<RemovalRule>,
    /// Items whose active records about the same subject refuse a new
    /// record of this item (`conflicts_with_dishonesty`): a red list
    /// refuses a subject on the serious dishonesty list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_while_listed: Vec<String>,
    /// List items a record of this item removes its subject from, in the
    /// same transaction (a serious dishonesty listing ends a red-list
    /// entry, with a lift to the red list's recipients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removes_from: Option<RemovesFrom>,
    /// Published on the public channel (双公示, red and black lists): its
    /// `public` fields, for the publicity period of its rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publicity: Option<PublicitySpec>,
}

/// How an item is published on the public channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicitySpec {
    /// Records about natural persons are published too (only where the
    /// rules say so, e.g. court judgment defaulters); their names masked,
    /// never an identity number.
    #[serde(default)]
    pub natural_persons: bool,
    /// Field holding the record's level (`minor`, `general`, `major`,
    /// `serious`), which chooses the period; none: the record's effect
    /// (lists) or the rule set's `other_months` (licences).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level_field: Option<String>,
    /// Field holding the end of publicity the deciding department set,
    /// kept within the period's bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_field: Option<String>,
}

/// How a record removes its subject from other lists.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovesFrom {
    /// List items (each with a removal document).
    pub items: Vec<String>,
    /// The removal reason written in their removal documents.
    pub reason: String,
    /// This item's fields that fill the removal document: deciding
    /// authority, its USCC and the decision number.
    pub authority_field: String,
    /// See `authority_field`.
    pub authority_uscc_field: String,
    /// See `authority_field`.
    pub decision_number_field: String,
}

/// When a subject's repeated records produce a warning notice (失信预警).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarningRule {
    /// Levels that count.
    pub levels: Vec<Severity>,
    /// Records (this one included) that make a warning.
    pub count: u32,
    /// Window, in months before this record's decision date.
    pub within_months: u32,
}

/// One part of a natural key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeyPart {
    /// This field.
    Field(String),
    /// The first of these fields the record has.
    FirstOf(Vec<String>),
}

impl KeyPart {
    /// The fields this part may take its value from.
    pub fn fields(&self) -> &[String] {
        match self {
            KeyPart::Field(f) => std::slice::from_ref(f),
            KeyPart::FirstOf(fs) => fs,
        }
    }
}

/// The removal document of a list item (移出名单).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovalRule {
    /// Field of the removal document holding the removal date; it may not
    /// be before the listing (decision) date nor in the future.
    pub date_field: String,
    /// Draft 2020-12 JSON Schema of the removal document, annotated like
    /// the record schema (`x-class`, `x-zh`). Its fields may not appear in
    /// a new record (`use_removal`).
    pub schema: Value,
}

/// A cross-field rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// `earlier` must not be after `later` (both dates, when present).
    DateOrder {
        /// Date field that comes first.
        earlier: String,
        /// Date field that comes on or after it.
        later: String,
    },
    /// The date in `field` must not be in the future.
    NotFuture {
        /// Date field.
        field: String,
    },
}

/// When and how a record produces a notice.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoticeRule {
    /// Punishment or incentive.
    #[serde(rename = "type")]
    pub notice_type: NoticeType,
    /// Only records whose field has one of these values produce a notice;
    /// absent = every accepted record does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<NoticeCondition>,
    /// Severity: a fixed value, or taken from a record field.
    pub severity: SeveritySource,
    /// Lowest clearance an agency needs to subscribe to these notices.
    #[serde(default = "public_class")]
    pub recipient_clearance: FieldClass,
    /// Date field that ends the record's effect (a lift notice follows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_until_field: Option<String>,
    /// A warning notice for a subject's repeated records of a level that
    /// makes no notice of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<WarningRule>,
    /// Field holding the list kind (名单类别) that measures select on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_kind_field: Option<String>,
    /// Measures agencies are expected to apply; a notice carries those
    /// whose `when` the record meets.
    pub measures: Vec<Measure>,
}

fn public_class() -> FieldClass {
    FieldClass::Public
}

/// A condition on one field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoticeCondition {
    /// Field name.
    pub field: String,
    /// Values that trigger the notice.
    #[serde(rename = "in")]
    pub values: Vec<Value>,
}

/// Where a notice's severity comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SeveritySource {
    /// Always this severity.
    Fixed(Severity),
    /// The value of a record field (`minor` / `general` / `serious`).
    Field {
        /// Field name.
        field: String,
    },
}

/// A punishment or incentive measure (惩戒/激励措施).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measure {
    /// Stable id, referenced by feedback.
    pub id: String,
    /// English description.
    pub description: String,
    /// Official Chinese description.
    pub description_zh: String,
    /// The law or policy that creates the measure.
    pub legal_basis: String,
    /// Kinds of implementing departments.
    #[serde(default)]
    pub implementers: Vec<String>,
    /// The credit review purposes (`review::Purpose`) the measure restricts
    /// or favours; empty = every purpose.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<crate::review::Purpose>,
    /// Which records call for this measure; absent = every record that
    /// produces a notice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<MeasureWhen>,
}

/// Which records a measure applies to: both lists must match when set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureWhen {
    /// Levels (一般/较重/严重); empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<Severity>,
    /// List kinds (values of the rule's `list_kind_field`, e.g.
    /// `court_judgment_defaulter` 失信被执行人); empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub list_kinds: Vec<String>,
}

impl MeasureWhen {
    /// Whether a record of `level` and `list_kind` calls for the measure.
    pub fn matches(&self, level: Severity, list_kind: Option<&str>) -> bool {
        (self.levels.is_empty() || self.levels.contains(&level))
            && (self.list_kinds.is_empty()
                || list_kind.is_some_and(|k| self.list_kinds.iter().any(|l| l == k)))
    }
}

/// Per-field facts taken from the schema annotations.
#[derive(Debug, Clone, Serialize)]
pub struct FieldSpec {
    /// Privacy class.
    pub class: FieldClass,
    /// Class overrides by subject type (e.g. natural persons' names are
    /// restricted).
    pub class_by_subject_type: HashMap<SubjectType, FieldClass>,
    /// Official Chinese name.
    pub name_zh: String,
    /// JSON Schema `format`, if any.
    pub format: Option<String>,
}

/// A compiled catalog item.
pub struct CatalogItem {
    /// The definition as loaded.
    pub def: ItemDefinition,
    /// Field annotations by field name.
    pub fields: BTreeMap<String, FieldSpec>,
    validator: jsonschema::Validator,
    /// Fields with a code format, and the warn-only check of that format.
    coded_fields: Vec<(String, CodeCheck)>,
    removal: Option<Removal>,
}

/// The warn-only check of a code format: a valid value's warnings.
type CodeCheck = fn(&str) -> Vec<codes::CodeWarning>;

/// A list item's compiled removal document.
struct Removal {
    /// Field annotations of the removal document.
    fields: BTreeMap<String, FieldSpec>,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for CatalogItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogItem")
            .field("id", &self.def.id)
            .field("version", &self.def.version)
            .finish_non_exhaustive()
    }
}

/// A finding about one field of one record: an error or a warning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// JSON pointer into the record (`/uscc`); the HTTP layer prefixes it
    /// with the record's position in the batch.
    pub pointer: String,
    /// Stable machine code.
    pub code: String,
    /// Human explanation. Never contains the submitted value.
    pub message: String,
}

/// The result of validating one record.
#[derive(Debug, Default, Clone)]
pub struct Validation {
    /// Problems that reject the record.
    pub errors: Vec<Finding>,
    /// Findings that do not reject it.
    pub warnings: Vec<Finding>,
}

/// What the notice rule says about one accepted record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedNotice {
    /// Punishment or incentive.
    pub notice_type: NoticeType,
    /// Severity.
    pub severity: Severity,
    /// End of the record's effect, if the rule names a field and it is set.
    pub effective_until: Option<Date>,
    /// Measure ids.
    pub measures: Vec<String>,
}

/// Reads every `*.json` item definition of a folder (not compiled).
pub fn read_dir(dir: &Path) -> Result<Vec<(String, ItemDefinition)>, Vec<String>> {
    match read_dir_lenient(dir) {
        (defs, errors) if errors.is_empty() => Ok(defs),
        (_, errors) => Err(errors),
    }
}

/// Reads what parses, and lists the problems of the rest.
fn read_dir_lenient(dir: &Path) -> (Vec<(String, ItemDefinition)>, Vec<String>) {
    let mut errors = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            return (
                Vec::new(),
                vec![format!("{}: cannot read folder: {e}", dir.display())],
            )
        }
    };
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut defs = Vec::new();
    for path in &paths {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{}: cannot read: {e}", path.display()));
                continue;
            }
        };
        match serde_json::from_str::<ItemDefinition>(&text) {
            Ok(def) => {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                if stem != def.id {
                    errors.push(format!(
                        "{}: file name must be the item id ({}.json)",
                        path.display(),
                        def.id
                    ));
                }
                defs.push((path.display().to_string(), def));
            }
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    if paths.is_empty() {
        errors.push(format!(
            "{}: no catalog items (*.json) found",
            dir.display()
        ));
    }
    (defs, errors)
}

/// A set of compiled items: the active catalog.
#[derive(Debug, Default)]
pub struct Catalog {
    items: BTreeMap<String, Arc<CatalogItem>>,
    etag: String,
}

impl Catalog {
    /// Loads every `*.json` file of `dir` and compiles it. `providers` checks
    /// that listed providers exist; every problem of every file is reported.
    pub fn load_dir(dir: &Path, providers: &dyn Fn(&str) -> bool) -> Result<Catalog, Vec<String>> {
        let (defs, mut errors) = read_dir_lenient(dir);
        match Catalog::compile_all(defs, providers) {
            Ok(c) if errors.is_empty() => Ok(c),
            Ok(_) => Err(errors),
            Err(e) => {
                errors.extend(e);
                Err(errors)
            }
        }
    }

    /// Compiles definitions (each with where it came from, for messages).
    pub fn compile_all(
        defs: Vec<(String, ItemDefinition)>,
        providers: &dyn Fn(&str) -> bool,
    ) -> Result<Catalog, Vec<String>> {
        let mut errors = Vec::new();
        let mut items = Vec::new();
        for (origin, def) in defs {
            match CatalogItem::compile(def, providers) {
                Ok(item) => items.push(Arc::new(item)),
                Err(errs) => errors.extend(errs.into_iter().map(|e| format!("{origin}: {e}"))),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Catalog::from_items(items).map_err(|e| vec![e])
    }

    /// The same catalog with `item` added or replaced.
    pub fn with_item(&self, item: Arc<CatalogItem>) -> Catalog {
        let mut items: Vec<Arc<CatalogItem>> = self
            .items
            .values()
            .filter(|i| i.def.id != item.def.id)
            .cloned()
            .collect();
        items.push(item);
        Catalog::from_items(items).unwrap_or_default()
    }

    /// Builds a catalog from compiled items (ids must be unique).
    pub fn from_items(list: Vec<Arc<CatalogItem>>) -> Result<Catalog, String> {
        let mut items = BTreeMap::new();
        for item in list {
            let id = item.def.id.clone();
            if items.insert(id.clone(), item).is_some() {
                return Err(format!("item {id:?} is defined twice"));
            }
        }
        let mut h = Sha256::new();
        for item in items.values() {
            h.update(item.def.id.as_bytes());
            h.update(b"@");
            h.update(item.def.version.to_be_bytes());
            h.update(b";");
        }
        let etag = format!("\"{}\"", &hex::encode(h.finalize())[..16]);
        Ok(Catalog { items, etag })
    }

    /// The item with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<CatalogItem>> {
        self.items.get(id)
    }

    /// All items, by id.
    pub fn items(&self) -> impl Iterator<Item = &Arc<CatalogItem>> {
        self.items.values()
    }

    /// Entity tag over the active item versions.
    pub fn etag(&self) -> &str {
        &self.etag
    }
}

fn is_snake_case(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl CatalogItem {
    /// Checks and compiles a definition. Every problem is reported.
    pub fn compile(
        def: ItemDefinition,
        providers: &dyn Fn(&str) -> bool,
    ) -> Result<CatalogItem, Vec<String>> {
        let mut errors = Vec::new();
        if !is_snake_case(&def.id) {
            errors.push(format!("id: {:?} must be snake_case", def.id));
        }
        if def.version == 0 {
            errors.push("version: must be 1 or more".into());
        }
        if def.name.trim().is_empty() || def.name_zh.trim().is_empty() {
            errors.push("name, name_zh: both are required".into());
        }
        if def.subject_types.is_empty() {
            errors.push("subject_types: at least one subject type is required".into());
        }
        if def.providers.is_empty() {
            errors.push("providers: at least one provider is required".into());
        }
        for p in &def.providers {
            if !providers(p) {
                errors.push(format!("providers: {p:?} is not a registered department"));
            }
        }
        let fields = match field_specs(&def.schema) {
            Ok(f) => f,
            Err(errs) => {
                errors.extend(errs);
                BTreeMap::new()
            }
        };
        let is_date = |name: &str| {
            fields
                .get(name)
                .is_some_and(|f| f.format.as_deref() == Some("date"))
        };
        for required in ["subject_name", "subject_type"] {
            if !fields.is_empty() && !fields.contains_key(required) {
                errors.push(format!(
                    "schema: the subject block field {required:?} is missing"
                ));
            }
        }
        if !fields.is_empty() && !is_date(&def.decision_date_field) {
            errors.push(format!(
                "decision_date_field: {:?} is not a field with format \"date\"",
                def.decision_date_field
            ));
        }
        if let Some(p) = &def.publicity {
            if let Some(f) = p.level_field.as_ref().filter(|f| !fields.contains_key(*f)) {
                errors.push(format!("publicity.level_field: {f:?} is not a field"));
            }
            if let Some(f) = p.end_field.as_ref().filter(|f| !is_date(f)) {
                errors.push(format!(
                    "publicity.end_field: {f:?} is not a field with format \"date\""
                ));
            }
        }
        for (i, rule) in def.rules.iter().enumerate() {
            let names: Vec<&String> = match rule {
                Rule::DateOrder { earlier, later } => vec![earlier, later],
                Rule::NotFuture { field } => vec![field],
            };
            for n in names {
                if !is_date(n) {
                    errors.push(format!(
                        "rules[{i}]: {n:?} is not a field with format \"date\""
                    ));
                }
            }
        }
        if let Some(n) = &def.notice {
            if let Some(w) = &n.when {
                if !fields.contains_key(&w.field) {
                    errors.push(format!("notice.when.field: unknown field {:?}", w.field));
                }
                if w.values.is_empty() {
                    errors.push("notice.when.in: at least one value is required".into());
                }
            }
            if let SeveritySource::Field { field } = &n.severity {
                if !fields.contains_key(field) {
                    errors.push(format!("notice.severity.field: unknown field {field:?}"));
                }
            }
            if let Some(f) = &n.effective_until_field {
                if !is_date(f) {
                    errors.push(format!(
                        "notice.effective_until_field: {f:?} is not a field with format \"date\""
                    ));
                }
            }
            if n.measures.is_empty() {
                errors.push("notice.measures: at least one measure is required".into());
            }
            let mut seen = HashSet::new();
            for (i, m) in n.measures.iter().enumerate() {
                if !is_snake_case(&m.id) {
                    errors.push(format!(
                        "notice.measures[{i}].id: {:?} must be snake_case",
                        m.id
                    ));
                }
                if !seen.insert(&m.id) {
                    errors.push(format!("notice.measures[{i}].id: duplicate {:?}", m.id));
                }
            }
        }
        for (i, part) in def.natural_key.iter().enumerate() {
            if part.fields().is_empty() {
                errors.push(format!("natural_key[{i}]: names no field"));
            }
            for f in part.fields() {
                if !fields.is_empty() && !fields.contains_key(f) {
                    errors.push(format!("natural_key[{i}]: unknown field {f:?}"));
                }
            }
        }
        if let Some(n) = &def.notice {
            if let Some(f) = &n.list_kind_field {
                if !fields.is_empty() && !fields.contains_key(f) {
                    errors.push(format!("notice.list_kind_field: unknown field {f:?}"));
                }
            }
            for (i, m) in n.measures.iter().enumerate() {
                let kinds = m.when.as_ref().is_some_and(|w| !w.list_kinds.is_empty());
                if kinds && n.list_kind_field.is_none() {
                    errors.push(format!(
                        "notice.measures[{i}].when.list_kinds: needs notice.list_kind_field"
                    ));
                }
            }
        }
        if let Some(r) = &def.removes_from {
            for f in [
                &r.authority_field,
                &r.authority_uscc_field,
                &r.decision_number_field,
            ] {
                if !fields.is_empty() && !fields.contains_key(f) {
                    errors.push(format!("removes_from: unknown field {f:?}"));
                }
            }
            if r.items.is_empty() {
                errors.push("removes_from.items: at least one list item is required".into());
            }
        }
        if let Some(n) = &def.notice {
            if n.notice_type == NoticeType::Warning {
                errors.push("notice.type: warning notices follow a warning rule; use punishment or incentive".into());
            }
            if let Some(w) = &n.warning {
                if w.count < 2 || w.within_months == 0 || w.levels.is_empty() {
                    errors.push("notice.warning: count 2 or more, within_months 1 or more and at least one level are required".into());
                }
            }
        }
        let removal = def.removal.as_ref().map(|r| {
            let specs = field_specs(&r.schema).unwrap_or_else(|errs| {
                errors.extend(errs.into_iter().map(|e| format!("removal.{e}")));
                BTreeMap::new()
            });
            if !specs.is_empty()
                && specs.get(&r.date_field).and_then(|f| f.format.as_deref()) != Some("date")
            {
                errors.push(format!(
                    "removal.date_field: {:?} is not a removal field with format \"date\"",
                    r.date_field
                ));
            }
            for name in specs.keys() {
                if fields.contains_key(name) {
                    errors.push(format!(
                        "removal.schema: {name:?} is also a record field; removal fields belong to the removal document only"
                    ));
                }
            }
            let validator = build_validator(&r.schema)
                .map_err(|e| errors.push(format!("removal.schema: does not compile: {e}")))
                .ok();
            (specs, validator)
        });
        let validator = match build_validator(&def.schema) {
            Ok(v) => Some(v),
            Err(e) => {
                errors.push(format!("schema: does not compile: {e}"));
                None
            }
        };
        match validator {
            Some(validator) if errors.is_empty() => {
                let coded_fields = fields
                    .iter()
                    .filter_map(|(k, f)| {
                        let check: CodeCheck = match f.format.as_deref()? {
                            "uscc" => |s| codes::check_uscc(s).unwrap_or_default(),
                            "cn-resident-id" => codes::resident_id_warnings,
                            _ => return None,
                        };
                        Some((k.clone(), check))
                    })
                    .collect();
                let removal = match removal {
                    Some((specs, Some(v))) => Some(Removal {
                        fields: specs,
                        validator: v,
                    }),
                    _ => None,
                };
                Ok(CatalogItem {
                    def,
                    fields,
                    validator,
                    coded_fields,
                    removal,
                })
            }
            _ => Err(errors),
        }
    }

    /// Validates one record against this item version, listing at most
    /// `max_findings` errors (then one `too_many_errors` with the count).
    ///
    /// The work is bounded by the record's size, not by how wrong it is:
    /// a valid record costs one pass; an invalid one is explained from a
    /// copy whose arrays are cut just past their `maxItems`, so a
    /// million-item array yields one `max_items` finding and a handful of
    /// item findings, never a million.
    pub fn validate(&self, record: &Value, max_findings: usize) -> Validation {
        // Removal fields in a new record: say where they belong, and judge
        // the rest of the record without them.
        let misplaced: Vec<&String> = match (&self.removal, record.as_object()) {
            (Some(r), Some(obj)) => r.fields.keys().filter(|k| obj.contains_key(*k)).collect(),
            _ => Vec::new(),
        };
        if !misplaced.is_empty() {
            let mut rest = record.clone();
            if let Some(obj) = rest.as_object_mut() {
                for k in &misplaced {
                    obj.remove(*k);
                }
            }
            let mut out = self.validate(&rest, max_findings);
            for k in misplaced.into_iter().rev() {
                out.errors.insert(
                    0,
                    Finding {
                        pointer: format!("/{}", escape_pointer(k)),
                        code: "use_removal".into(),
                        message: "a removal field; a listing is ended with POST /v1/records/{record_id}/removal, not in a new record".into(),
                    },
                );
            }
            return out;
        }
        let mut out = Validation::default();
        // Schema errors past the limit, and whether arrays were cut to
        // explain them (then the count is a lower bound).
        let (mut more, mut cut_any) = (0, false);
        if !self.validator.is_valid(record) {
            let cut = cut_arrays(record, &self.def.schema);
            cut_any = cut.is_some();
            let mut errors = self.validator.iter_errors(cut.as_ref().unwrap_or(record));
            out.errors
                .extend(errors.by_ref().take(max_findings).map(|e| finding_from(&e)));
            more = errors.count();
            if out.errors.is_empty() {
                // Only possible if cutting an array hid the fault.
                out.errors.push(Finding {
                    pointer: String::new(),
                    code: "invalid".into(),
                    message: "does not match the catalog item's schema".into(),
                });
            }
        }
        self.check_rules(record, &mut out);
        more += out.errors.len().saturating_sub(max_findings);
        if more > 0 {
            out.errors.truncate(max_findings);
            out.errors.push(too_many_errors(
                "",
                format!(
                    "{}{more} more error(s) not listed",
                    if cut_any { "at least " } else { "" }
                ),
            ));
        }
        out
    }

    /// Cross-field rules and, for an otherwise valid record, warnings.
    fn check_rules(&self, record: &Value, out: &mut Validation) {
        let Some(obj) = record.as_object() else {
            return;
        };
        // Domain rules run only on fields that are valid dates; the schema
        // has already reported the others.
        let date = |f: &str| {
            obj.get(f)
                .and_then(Value::as_str)
                .and_then(codes::parse_iso_date)
        };
        for rule in &self.def.rules {
            match rule {
                Rule::DateOrder { earlier, later } => {
                    if let (Some(a), Some(b)) = (date(earlier), date(later)) {
                        if a > b {
                            out.errors.push(Finding {
                                pointer: format!("/{later}"),
                                code: "date_order".into(),
                                message: format!("must not be before {earlier}"),
                            });
                        }
                    }
                }
                Rule::NotFuture { field } => {
                    if let Some(d) = date(field) {
                        if d > codes::today_cst() {
                            out.errors.push(Finding {
                                pointer: format!("/{field}"),
                                code: "date_in_future".into(),
                                message: "must not be in the future".into(),
                            });
                        }
                    }
                }
            }
        }
        if out.errors.is_empty() {
            // Code fields by format, and ID numbers whose type field says
            // they are resident IDs (the schema's conditional format).
            let resident_ids = RESIDENT_ID_FIELDS.iter().filter_map(|(kind, number)| {
                let covered = self.coded_fields.iter().any(|(f, _)| f == number);
                (!covered && obj.get(*kind).and_then(Value::as_str) == Some("resident_id")).then(
                    || {
                        let check: CodeCheck = codes::resident_id_warnings;
                        ((*number).to_owned(), check)
                    },
                )
            });
            let coded: Vec<_> = self
                .coded_fields
                .iter()
                .cloned()
                .chain(resident_ids)
                .collect();
            for (f, check) in &coded {
                if let Some(warnings) = obj.get(f).and_then(Value::as_str).map(check) {
                    for w in warnings {
                        out.warnings.push(Finding {
                            pointer: format!("/{f}"),
                            code: w.code().into(),
                            message: w.message().into(),
                        });
                    }
                }
            }
        }
    }

    /// The notice an accepted record produces under this item's rule, if any.
    pub fn derive_notice(&self, record: &Value) -> Option<DerivedNotice> {
        let rule = self.def.notice.as_ref()?;
        if let Some(when) = &rule.when {
            let value = record.get(&when.field)?;
            if !when.values.iter().any(|v| v == value) {
                return None;
            }
        }
        let severity = match &rule.severity {
            SeveritySource::Fixed(s) => *s,
            SeveritySource::Field { field } => record
                .get(field)
                .and_then(Value::as_str)
                .and_then(Severity::parse)?,
        };
        let effective_until = rule
            .effective_until_field
            .as_ref()
            .and_then(|f| record.get(f))
            .and_then(Value::as_str)
            .and_then(codes::parse_iso_date);
        let list_kind = rule
            .list_kind_field
            .as_ref()
            .and_then(|f| record.get(f))
            .and_then(Value::as_str);
        Some(DerivedNotice {
            notice_type: rule.notice_type,
            severity,
            effective_until,
            measures: rule
                .measures
                .iter()
                .filter(|m| {
                    m.when
                        .as_ref()
                        .is_none_or(|w| w.matches(severity, list_kind))
                })
                .map(|m| m.id.clone())
                .collect(),
        })
    }

    /// The values that identify the record's decision, as `(field, value)`
    /// in key order; `None` when the item declares no key or the record
    /// lacks a part (it is then identified by its content).
    pub fn natural_key<'r>(&self, record: &'r Value) -> Option<Vec<(&str, &'r str)>> {
        if self.def.natural_key.is_empty() {
            return None;
        }
        self.def
            .natural_key
            .iter()
            .map(|part| {
                part.fields().iter().find_map(|f| {
                    record
                        .get(f)
                        .and_then(Value::as_str)
                        .map(|v| (f.as_str(), v))
                })
            })
            .collect()
    }

    /// The level the record would have under this item's notice rule,
    /// whether or not it produces a notice (`None`: no rule, or no level).
    pub fn level(&self, record: &Value) -> Option<Severity> {
        match &self.def.notice.as_ref()?.severity {
            SeveritySource::Fixed(s) => Some(*s),
            SeveritySource::Field { field } => record
                .get(field)
                .and_then(Value::as_str)
                .and_then(Severity::parse),
        }
    }

    /// The removal document a record of this item writes when it removes
    /// its subject from another list (`removes_from`).
    pub fn removal_by(&self, record: &Value) -> Option<Value> {
        let r = self.def.removes_from.as_ref()?;
        let text = |f: &str| record.get(f).cloned().unwrap_or(Value::Null);
        Some(serde_json::json!({
            "removal_date": text(&self.def.decision_date_field),
            "removal_reason": r.reason,
            "removal_reason_detail": format!("listed in {} ({})", self.def.name, self.def.name_zh),
            "removal_authority": text(&r.authority_field),
            "removal_authority_uscc": text(&r.authority_uscc_field),
            "removal_decision_number": text(&r.decision_number_field),
        }))
    }

    /// Takes a list item's removal fields out of `record` (a historical
    /// listing sent with its removal), as a removal document; `None` when
    /// there are none or the item is not a list.
    pub fn take_removal(&self, record: &mut Value) -> Option<Value> {
        let removal = self.removal.as_ref()?;
        let obj = record.as_object_mut()?;
        let doc: serde_json::Map<String, Value> = removal
            .fields
            .keys()
            .filter_map(|k| obj.remove(k).map(|v| (k.clone(), v)))
            .collect();
        (!doc.is_empty()).then_some(Value::Object(doc))
    }

    /// Whether records of this item can be removed from their list.
    pub fn is_list(&self) -> bool {
        self.removal.is_some()
    }

    /// Validates a removal document for a listing made on `listed_on`:
    /// its schema, then the removal date (not before the listing, not in
    /// the future). `None` when the item is not a list.
    pub fn validate_removal(
        &self,
        doc: &Value,
        listed_on: Option<Date>,
        max_findings: usize,
    ) -> Option<Validation> {
        let (removal, rule) = (self.removal.as_ref()?, self.def.removal.as_ref()?);
        let mut out = Validation::default();
        out.errors.extend(
            removal
                .validator
                .iter_errors(doc)
                .take(max_findings)
                .map(|e| finding_from(&e)),
        );
        let date = doc
            .get(&rule.date_field)
            .and_then(Value::as_str)
            .and_then(codes::parse_iso_date);
        if let Some(d) = date {
            let pointer = format!("/{}", escape_pointer(&rule.date_field));
            if listed_on.is_some_and(|l| d < l) {
                out.errors.push(Finding {
                    pointer,
                    code: "removal_before_listing".into(),
                    message: format!(
                        "must not be before the listing date ({})",
                        self.def.decision_date_field
                    ),
                });
            } else if d > codes::today_cst() {
                out.errors.push(Finding {
                    pointer,
                    code: "date_in_future".into(),
                    message: "must not be in the future".into(),
                });
            }
        }
        Some(out)
    }

    /// The class of a removal document's field (secret when unknown).
    pub fn removal_class_of(&self, field: &str) -> FieldClass {
        self.removal
            .as_ref()
            .and_then(|r| r.fields.get(field))
            .map_or(FieldClass::Secret, |f| f.class)
    }

    /// The end of the record's effect: the date in the notice rule's
    /// `effective_until_field`, whether or not the record makes a notice.
    pub fn effective_until(&self, record: &Value) -> Option<Date> {
        self.def
            .notice
            .as_ref()?
            .effective_until_field
            .as_ref()
            .and_then(|f| record.get(f))
            .and_then(Value::as_str)
            .and_then(codes::parse_iso_date)
    }

    /// The record's decision date, if it has a valid one.
    pub fn decision_date(&self, record: &Value) -> Option<Date> {
        record
            .get(&self.def.decision_date_field)
            .and_then(Value::as_str)
            .and_then(codes::parse_iso_date)
    }

    /// The class of `field` for a record about `subject_type`; unknown
    /// fields are treated as secret so nothing unannotated ever leaks.
    pub fn class_of(&self, field: &str, subject_type: Option<SubjectType>) -> FieldClass {
        match self.fields.get(field) {
            Some(spec) => subject_type
                .and_then(|t| spec.class_by_subject_type.get(&t).copied())
                .unwrap_or(spec.class),
            None => FieldClass::Secret,
        }
    }
}

/// Reads `x-class`, `x-zh` and `format` of every top-level property.
fn field_specs(schema: &Value) -> Result<BTreeMap<String, FieldSpec>, Vec<String>> {
    let mut errors = Vec::new();
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        errors.push("schema.type: must be \"object\"".into());
    }
    match schema.get("$schema").and_then(Value::as_str) {
        Some("https://json-schema.org/draft/2020-12/schema") => {}
        _ => errors.push(
            "schema.$schema: must be \"https://json-schema.org/draft/2020-12/schema\"".into(),
        ),
    }
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        errors.push("schema.properties: must be an object listing the fields".into());
        return Err(errors);
    };
    let mut fields = BTreeMap::new();
    for (name, p) in props {
        let at = format!("schema.properties.{name}");
        let class = match p
            .get("x-class")
            .map(|v| serde_json::from_value::<FieldClass>(v.clone()))
        {
            Some(Ok(c)) => Some(c),
            Some(Err(_)) => {
                errors.push(format!(
                    "{at}.x-class: must be public, shared, restricted or secret"
                ));
                None
            }
            None => {
                errors.push(format!(
                    "{at}: x-class is missing (every field needs a privacy class)"
                ));
                None
            }
        };
        let name_zh = p.get("x-zh").and_then(Value::as_str).unwrap_or_default();
        if name_zh.trim().is_empty() {
            errors.push(format!(
                "{at}: x-zh is missing (the official Chinese field name)"
            ));
        }
        let class_by_subject_type = match p.get("x-class-by-subject-type") {
            None => HashMap::new(),
            Some(v) => {
                match serde_json::from_value::<HashMap<SubjectType, FieldClass>>(v.clone()) {
                    Ok(m) => m,
                    Err(e) => {
                        errors.push(format!("{at}.x-class-by-subject-type: {e}"));
                        HashMap::new()
                    }
                }
            }
        };
        let format = p.get("format").and_then(Value::as_str).map(str::to_owned);
        let ty = p.get("type").and_then(Value::as_str);
        if ty == Some("string")
            && format.is_none()
            && p.get("enum").is_none()
            && p.get("maxLength").is_none()
        {
            errors.push(format!("{at}: a free-text field needs maxLength"));
        }
        if ty == Some("array") && p.get("maxItems").is_none() {
            errors.push(format!("{at}: an array field needs maxItems"));
        }
        if let Some(class) = class {
            fields.insert(
                name.clone(),
                FieldSpec {
                    class,
                    class_by_subject_type,
                    name_zh: name_zh.to_owned(),
                    format,
                },
            );
        }
    }
    if errors.is_empty() {
        Ok(fields)
    } else {
        Err(errors)
    }
}

/// Compiles a schema with the gateway's formats; unknown formats fail.
pub fn build_validator(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .with_format("uscc", |s: &str| codes::check_uscc(s).is_ok())
        .with_format("cn-resident-id", |s: &str| {
            codes::check_resident_id(s, codes::today_cst()).is_ok()
        })
        .with_format("date", |s: &str| codes::parse_iso_date(s).is_some())
        .build(schema)
        .map_err(|e| e.masked().to_string())
}

/// The summary finding that replaces findings past a limit.
pub fn too_many_errors(pointer: &str, message: String) -> Finding {
    Finding {
        pointer: pointer.to_owned(),
        code: "too_many_errors".into(),
        message,
    }
}

/// Items of an array without `maxItems` in its schema that are examined
/// to explain a rejection.
const ARRAY_SCAN_LIMIT: usize = 1000;

/// A copy of `value` with every array longer than its schema's `maxItems`
/// (or [`ARRAY_SCAN_LIMIT`]) cut to one item past it, so the limit still
/// fails; `None` when no array is that long. The schema guides the walk
/// through `properties`, `additionalProperties` and `items`.
fn cut_arrays(value: &Value, schema: &Value) -> Option<Value> {
    match value {
        Value::Array(items) => {
            let limit = schema
                .get("maxItems")
                .and_then(Value::as_u64)
                .map_or(ARRAY_SCAN_LIMIT, |m| {
                    usize::try_from(m).unwrap_or(usize::MAX)
                })
                .saturating_add(1);
            let item_schema = schema.get("items").unwrap_or(&Value::Null);
            let kept = &items[..items.len().min(limit)];
            let cut: Vec<Option<Value>> = kept.iter().map(|v| cut_arrays(v, item_schema)).collect();
            if kept.len() == items.len() && cut.iter().all(Option::is_none) {
                return None;
            }
            Some(Value::Array(
                kept.iter()
                    .zip(cut)
                    .map(|(v, c)| c.unwrap_or_else(|| v.clone()))
                    .collect(),
            ))
        }
        Value::Object(fields) => {
            let props = schema.get("properties");
            let other = schema.get("additionalProperties").unwrap_or(&Value::Null);
            let mut changed = None::<serde_json::Map<String, Value>>;
            for (k, v) in fields {
                let sub = props.and_then(|p| p.get(k)).unwrap_or(other);
                if let Some(c) = cut_arrays(v, sub) {
                    changed
                        .get_or_insert_with(|| fields.clone())
                        .insert(k.clone(), c);
                }
            }
            changed.map(Value::Object)
        }
        _ => None,
    }
}

/// Field names listed in an `unknown_field` message, each cut to
/// [`NAME_CHARS`] characters: the message stays small whatever was sent.
const LISTED_NAMES: usize = 10;
const NAME_CHARS: usize = 64;

fn list_names(names: &[String]) -> String {
    let mut out: Vec<String> = names
        .iter()
        .take(LISTED_NAMES)
        .map(|n| match n.char_indices().nth(NAME_CHARS) {
            Some((at, _)) => format!("{}…", &n[..at]),
            None => n.clone(),
        })
        .collect();
    if names.len() > LISTED_NAMES {
        out.push(format!("and {} more", names.len() - LISTED_NAMES));
    }
    out.join(", ")
}

/// The (type, number) field pairs of identity documents: the number is a
/// resident ID number when the type is `resident_id`.
pub const RESIDENT_ID_FIELDS: [(&str, &str); 2] = [
    ("id_type", "id_number"),
    (
        "legal_representative_id_type",
        "legal_representative_id_number",
    ),
];

/// Turns a schema error into a finding without echoing the value.
fn finding_from(e: &jsonschema::ValidationError<'_>) -> Finding {
    use jsonschema::error::ValidationErrorKind as K;
    let mut pointer = e.instance_path().as_str().to_owned();
    let kind = e.kind();
    let (code, message): (String, String) = match kind {
        K::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            pointer = format!("{pointer}/{}", escape_pointer(name));
            ("required".into(), "is required".into())
        }
        K::Format { format } => {
            let reason = e.instance().as_str().and_then(|s| match format.as_str() {
                "uscc" => codes::check_uscc(s).err(),
                "cn-resident-id" => codes::check_resident_id(s, codes::today_cst()).err(),
                _ => None,
            });
            match format.as_str() {
                "uscc" => (
                    "invalid_uscc".into(),
                    format!(
                        "is not a valid unified social credit code: {}",
                        reason.map_or_else(|| "invalid".to_owned(), |r: CodeError| r.to_string())
                    ),
                ),
                "cn-resident-id" => (
                    "invalid_resident_id".into(),
                    format!(
                        "is not a valid resident identity number: {}",
                        reason.map_or_else(|| "invalid".to_owned(), |r: CodeError| r.to_string())
                    ),
                ),
                "date" => (
                    "invalid_date".into(),
                    "must be a real date as YYYY-MM-DD".into(),
                ),
                other => (
                    "invalid_format".into(),
                    format!("does not match format {other:?}"),
                ),
            }
        }
        K::AdditionalProperties { unexpected } | K::UnevaluatedProperties { unexpected } => (
            "unknown_field".into(),
            format!("unknown field(s): {}", list_names(unexpected)),
        ),
        _ => (
            camel_to_snake(kind.keyword()),
            e.masked_with("value").to_string(),
        ),
    };
    Finding {
        pointer,
        code,
        message,
    }
}

/// A field name as one JSON Pointer token (RFC 6901: `~` → `~0`, `/` → `~1`).
pub fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn camel_to_snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(schema: Value) -> Result<CatalogItem, Vec<String>> {
        let def = ItemDefinition {
            id: "test_item".into(),
            version: 1,
            name: "Test".into(),
            name_zh: "测试".into(),
            description: None,
            subject_types: vec![SubjectType::LegalEntity],
            providers: vec!["dept-a".into()],
            decision_date_field: "decision_date".into(),
            schema,
            rules: vec![],
            notice: None,
            natural_key: vec![],
            removal: None,
            refused_while_listed: vec![],
            removes_from: None,
            publicity: None,
        };
        CatalogItem::compile(def, &|p| p == "dept-a")
    }

    fn schema(extra: Value) -> Value {
        let mut s = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "subject_name": {"type": "string", "maxLength": 200, "x-class": "public", "x-zh": "行政相对人名称"},
                "subject_type": {"enum": ["legal_entity"], "x-class": "public", "x-zh": "行政相对人类别"},
                "uscc": {"type": "string", "format": "uscc", "x-class": "public", "x-zh": "统一社会信用代码"},
                "decision_date": {"type": "string", "format": "date", "x-class": "public", "x-zh": "决定日期"}
            },
            "required": ["subject_name", "subject_type", "uscc"],
            "additionalProperties": false
        });
        if let (Some(props), Some(extra)) = (s["properties"].as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                props.insert(k.clone(), v.clone());
            }
        }
        s
    }

    #[test]
    fn missing_annotations_and_unknown_format_are_all_reported() {
        let errs = item(schema(json!({
            "a": {"type": "string", "maxLength": 3},
            "b": {"type": "string", "format": "no-such-format", "x-class": "public", "x-zh": "乙"},
            "c": {"type": "string", "x-class": "top", "x-zh": "丙"}
        })))
        .expect_err("invalid");
        let text = errs.join("\n");
        assert!(text.contains("properties.a: x-class is missing"), "{text}");
        assert!(text.contains("properties.a: x-zh is missing"), "{text}");
        assert!(text.contains("properties.c.x-class"), "{text}");
        assert!(text.contains("does not compile"), "{text}");
    }

    #[test]
    fn lifecycle_declarations_are_checked_together() {
        let mut def: ItemDefinition = serde_json::from_value(json!({
            "id": "test_item", "version": 1, "name": "Test", "name_zh": "测试",
            "subject_types": ["legal_entity"], "providers": ["dept-a"],
            "decision_date_field": "decision_date",
            "schema": schema(json!({})),
            "natural_key": [["uscc", "nope"], "decision_date"],
            "notice": {"type": "punishment", "severity": "major", "measures": [
                {"id": "m", "description": "d", "description_zh": "措施", "legal_basis": "b",
                 "when": {"levels": ["serious"], "list_kinds": ["court"]}}
            ]},
            "removal": {"date_field": "removal_date", "schema": schema(json!({
                "removal_date": {"type": "string", "format": "date", "x-class": "public", "x-zh": "移出日期"}
            }))}
        }))
        .expect("definition parses");
        let errs = CatalogItem::compile(def.clone(), &|p| p == "dept-a").expect_err("invalid");
        let text = errs.join("\n");
        assert!(
            text.contains("natural_key[0]: unknown field \"nope\""),
            "{text}"
        );
        assert!(text.contains("needs notice.list_kind_field"), "{text}");
        // The shared subject block fields appear in both schemas.
        assert!(
            text.contains("removal.schema: \"subject_name\" is also a record field"),
            "{text}"
        );
        def.natural_key = vec![KeyPart::FirstOf(vec!["uscc".into()])];
        def.removal = None;
        if let Some(n) = def.notice.as_mut() {
            n.measures[0].when = Some(MeasureWhen {
                levels: vec![Severity::Serious],
                list_kinds: vec![],
            });
        }
        let item = CatalogItem::compile(def, &|p| p == "dept-a").expect("valid");
        assert_eq!(item.def.notice.as_ref().map(|n| n.measures.len()), Some(1));
        assert!(!item.is_list());
        // Severity: three levels; `minor` reads as `general`.
        assert_eq!(
            serde_json::from_value::<Severity>(json!("minor")).ok(),
            Some(Severity::General)
        );
        assert_eq!(
            serde_json::to_value(Severity::Major).ok(),
            Some(json!("major"))
        );
        assert!(serde_json::from_value::<Severity>(json!("grave")).is_err());
        assert!(Severity::General < Severity::Major && Severity::Major < Severity::Serious);
    }

    #[test]
    fn findings_point_at_fields_and_never_echo_values() {
        let item = item(schema(json!({}))).expect("valid");
        let v = item.validate(
            &json!({
                "subject_name": "SECRETVALUE",
                "subject_type": "SECRETVALUE2",
                "uscc": "914403001922038217",
                "decision_date": "2024-02-30",
                "extra": "SECRETVALUE3"
            }),
            20,
        );
        let pointers: HashSet<_> = v.errors.iter().map(|f| f.pointer.as_str()).collect();
        assert!(pointers.contains("/uscc"), "{v:?}");
        assert!(pointers.contains("/decision_date"), "{v:?}");
        assert!(pointers.contains("/subject_type"), "{v:?}");
        let all = format!("{v:?}");
        assert!(!all.contains("SECRETVALUE"), "{all}");
        assert!(!all.contains("914403001922038217"), "{all}");
        let codes: HashSet<_> = v.errors.iter().map(|f| f.code.as_str()).collect();
        assert!(
            codes.contains("invalid_uscc")
                && codes.contains("invalid_date")
                && codes.contains("unknown_field"),
            "{codes:?}"
        );
    }

    #[test]
    fn required_points_at_the_missing_field() {
        let item = item(schema(json!({}))).expect("valid");
        let v = item.validate(
            &json!({"subject_name": "x", "subject_type": "legal_entity"}),
            20,
        );
        assert_eq!(v.errors.len(), 1);
        assert_eq!(v.errors[0].pointer, "/uscc");
        assert_eq!(v.errors[0].code, "required");
    }

    #[test]
    fn warn_only_uscc_is_accepted_with_warning() {
        let item = item(schema(json!({}))).expect("valid");
        let body = "91350100M000100Y5";
        let code = format!("{body}{}", codes::uscc_check_char(body).expect("alphabet"));
        let v = item.validate(
            &json!({"subject_name": "x", "subject_type": "legal_entity", "uscc": code}),
            20,
        );
        assert!(v.errors.is_empty(), "{v:?}");
        assert_eq!(v.warnings.len(), 1);
        assert_eq!(v.warnings[0].code, "uscc_org_code_check");
    }

    #[test]
    fn findings_are_bounded_however_wrong_the_record_is() {
        let item = item(schema(json!({
            "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b"]},
                     "x-class": "public", "x-zh": "标签"}
        })))
        .expect("valid");
        let many: Vec<u32> = vec![1; 200_000];
        let v = item.validate(
            &json!({"subject_name": "x", "subject_type": "legal_entity", "tags": many}),
            5,
        );
        // 5 listed, then one summary; the array's length is among the listed.
        assert_eq!(v.errors.len(), 6, "{v:?}");
        assert_eq!(v.errors[5].code, "too_many_errors");
        assert!(v.errors[5].message.starts_with("at least"), "{v:?}");
        assert!(v.errors.iter().any(|e| e.code == "max_items"), "{v:?}");
        // Under the limit, everything is listed and nothing summarised.
        let v = item.validate(
            &json!({"subject_name": "x", "subject_type": "legal_entity", "tags": [1, 2]}),
            5,
        );
        assert!(
            v.errors.iter().all(|e| e.code != "too_many_errors"),
            "{v:?}"
        );
        assert!(
            v.errors
                .iter()
                .filter(|e| e.pointer.starts_with("/tags/"))
                .count()
                == 2,
            "{v:?}"
        );
    }

    #[test]
    fn unknown_field_messages_stay_small() {
        let item = item(schema(json!({}))).expect("valid");
        let mut record = json!({"subject_name": "x", "subject_type": "legal_entity", "uscc": "91350100M000100Y43"});
        for i in 0..5000 {
            record[format!("{}{i}", "k".repeat(300))] = json!(1);
        }
        let v = item.validate(&record, 20);
        let total: usize = v.errors.iter().map(|e| e.message.len()).sum();
        assert!(total < 2000, "{total} bytes of messages");
        assert!(
            v.errors.iter().any(|e| e.message.contains("and 4990 more")),
            "{v:?}"
        );
    }
}
