//! The egress choke point: the only way record data becomes something that
//! can leave the gateway.
//!
//! Stored record bodies are [`RecordBody`] values, which have no accessor,
//! no `Serialize` and a `Debug` that prints nothing: only this module can
//! open them, and it only ever hands out [`RecordView`] and [`NoticeView`],
//! which it alone can construct after applying the recipient's clearance.
//! Handlers and the push worker serialize views, never bodies.
//!
//! Per field class and recipient clearance a field is passed, dropped,
//! masked or replaced by a keyed pseudonym (HMAC-SHA256 with the gateway
//! secret). `secret` fields never leave in clear; a field the catalog does
//! not annotate counts as `secret`. Only the department that submitted a
//! record sees it whole.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;
use time::Date;

use crate::catalog::{CatalogItem, FieldClass, Measure, Severity, SubjectType};
use crate::notice::{NoticeKind, StoredNotice};

/// A stored record body. Opaque outside this module. Cloning shares the
/// parsed value: a notice claimed for many subscriptions at once parses
/// its record once.
#[derive(Clone)]
pub struct RecordBody(Arc<Value>);

impl RecordBody {
    /// Wraps a body read from the store.
    pub fn from_store(v: Value) -> RecordBody {
        RecordBody(Arc::new(v))
    }

    /// The record's level of dishonesty (or of its incentive), whether or
    /// not it makes a notice.
    pub fn level(&self, item: &CatalogItem) -> Option<crate::catalog::Severity> {
        item.level(&self.0)
    }

    /// The subject's division code and type (notice routing).
    pub fn subject_facts(&self) -> (Option<String>, Option<crate::catalog::SubjectType>) {
        crate::routing::subject_of_record(&self.0)
    }

    /// The subject key the record is stored under.
    pub fn subject_key(&self, redactor: &Redactor) -> Option<String> {
        redactor.subject_key(&self.0)
    }

    /// What the item's notice rule derives from this body: type, level
    /// and measures (catalog facts, no field value).
    pub fn derived_notice(&self, item: &CatalogItem) -> Option<crate::catalog::DerivedNotice> {
        item.derive_notice(&self.0)
    }
}

impl std::fmt::Debug for RecordBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordBody(<redacted>)")
    }
}

/// What a recipient gets for a field above its clearance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Leave the field out.
    Drop,
    /// Keep the start and end, star the middle.
    Mask,
    /// Keyed pseudonym: the same value gives the same pseudonym, which is
    /// useless without the gateway secret.
    Pseudonym,
}

/// Actions for one field class by recipient clearance (only clearances
/// below the class are asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByClearance {
    /// Recipients with `public` clearance.
    pub public: Action,
    /// Recipients with `shared` clearance.
    #[serde(default = "drop_action")]
    pub shared: Action,
    /// Recipients with `restricted` clearance.
    #[serde(default = "drop_action")]
    pub restricted: Action,
}

fn drop_action() -> Action {
    Action::Drop
}

/// The redaction policy: what each clearance gets of each class above it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// `secret` fields (ID numbers) — never in clear, for anyone.
    pub secret: ByClearance,
    /// `restricted` fields (natural persons' names) for lower clearances.
    pub restricted: ByClearance,
    /// `shared` fields for `public` recipients.
    pub shared: ByClearance,
    /// Characters kept at the start of a masked value.
    pub mask_keep_start: usize,
    /// Characters kept at the end of a masked value.
    pub mask_keep_end: usize,
}

impl Policy {
    /// Problems that make the policy unsafe, with their config keys.
    pub fn problems(&self) -> Vec<String> {
        let secret = &self.secret;
        [
            ("public", secret.public),
            ("shared", secret.shared),
            ("restricted", secret.restricted),
        ]
        .into_iter()
        .filter(|(_, a)| *a == Action::Mask)
        .map(|(clearance, _)| {
            format!(
                "privacy.redaction.secret.{clearance}: \"mask\" is not allowed for secret fields (a masked 18-digit ID keeps its region, birth date and check character); use \"drop\" or \"pseudonym\""
            )
        })
        .collect()
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            secret: ByClearance {
                public: Action::Drop,
                shared: Action::Drop,
                restricted: Action::Pseudonym,
            },
            restricted: ByClearance {
                public: Action::Drop,
                shared: Action::Drop,
                restricted: Action::Drop,
            },
            shared: ByClearance {
                public: Action::Drop,
                shared: Action::Drop,
                restricted: Action::Drop,
            },
            mask_keep_start: 10,
            mask_keep_end: 4,
        }
    }
}

/// Who will receive the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// The department that submitted the record: it already holds every field.
    Originator,
    /// Anyone else, with the highest class they may see.
    Cleared(FieldClass),
}

/// A record body fit for one audience. Constructed only here.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct RecordView(Map<String, Value>);

impl RecordView {
    /// Field names present in the view.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

/// The subject block of a notice, redacted.
#[derive(Debug, Clone, Serialize)]
pub struct SubjectView {
    subject_type: Option<String>,
    #[serde(flatten)]
    fields: Map<String, Value>,
}

/// A measure as sent in a notice.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
enum MeasureView {
    Full(Measure),
    Id { id: String },
}

/// A notice fit for one recipient. Constructed only here.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeView {
    notice_id: String,
    #[serde(rename = "type")]
    kind: NoticeKind,
    item: String,
    item_version: u32,
    record_id: String,
    source: String,
    severity: Severity,
    subject: SubjectView,
    measures: Vec<MeasureView>,
    #[serde(with = "crate::codes::iso_date_opt")]
    effective_from: Option<Date>,
    #[serde(with = "crate::codes::iso_date_opt")]
    effective_until: Option<Date>,
    record: RecordView,
    #[serde(with = "time::serde::rfc3339")]
    issued_at: time::OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    lifts: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrects: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    historical: bool,
    /// A grade change: from what to what, by which rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    grade: Option<crate::notice::GradeShift>,
    /// Position in the recipient's pull stream (pull only).
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
}

/// Fields that form a notice's `subject` block.
const SUBJECT_FIELDS: [&str; 4] = ["subject_name", "uscc", "id_type", "id_number"];

/// Applies the policy with the gateway secret.
pub struct Redactor {
    policy: Policy,
    /// HMAC-SHA-256 keyed with the gateway secret, cloned for each digest
    /// instead of keyed anew (saves the key-block compressions per digest).
    keyed: Option<Hmac<Sha256>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Redactor {
    /// A redactor with `policy`, keyed by `secret`.
    pub fn new(policy: Policy, secret: Arc<[u8]>) -> Redactor {
        let keyed = Hmac::<Sha256>::new_from_slice(&secret).ok();
        Redactor { policy, keyed }
    }

    /// The key a record about a subject is stored and found under: its
    /// unified social credit code, or the keyed pseudonym of its ID number.
    pub fn subject_key(&self, record: &Value) -> Option<String> {
        let text = |f: &str| record.get(f).and_then(Value::as_str);
        match (text("uscc"), text("id_number")) {
            (Some(uscc), _) => Some(uscc.to_owned()),
            (None, Some(number)) => Some(self.pseudonym(number)),
            (None, None) => None,
        }
    }

    /// The keyed pseudonym of a personal identifier (upper-cased first).
    pub fn pseudonym(&self, value: &str) -> String {
        let Some(mut mac) = self.keyed.clone() else {
            return "pid:".into();
        };
        mac.update(value.trim().to_uppercase().as_bytes());
        format!("pid:{}", &hex::encode(mac.finalize().into_bytes())[..32])
    }

    /// A keyed digest (hex HMAC-SHA-256) of `parts`, each length-prefixed
    /// so no two different lists of parts digest alike. Identifies records
    /// (natural keys, content) without storing or revealing their values.
    pub fn keyed_digest<'a>(&self, parts: impl IntoIterator<Item = &'a [u8]>) -> String {
        let Some(mut mac) = self.keyed.clone() else {
            return String::new();
        };
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    fn mask(&self, value: &str) -> String {
        let chars: Vec<char> = value.chars().collect();
        let (start, end) = (self.policy.mask_keep_start, self.policy.mask_keep_end);
        if chars.len() > start + end {
            let stars = "*".repeat(chars.len() - start - end);
            format!(
                "{}{stars}{}",
                chars[..start].iter().collect::<String>(),
                chars[chars.len() - end..].iter().collect::<String>()
            )
        } else if chars.len() >= 2 {
            format!("{}{}", chars[0], "*".repeat(chars.len() - 1))
        } else {
            "*".into()
        }
    }

    fn action(&self, class: FieldClass, clearance: FieldClass) -> Option<Action> {
        let by = match class {
            FieldClass::Secret => &self.policy.secret,
            _ if class <= clearance => return None,
            FieldClass::Restricted => &self.policy.restricted,
            FieldClass::Shared => &self.policy.shared,
            FieldClass::Public => return None,
        };
        Some(match clearance {
            FieldClass::Public => by.public,
            FieldClass::Shared => by.shared,
            // Secret is not a clearance anyone holds; treat as restricted.
            FieldClass::Restricted | FieldClass::Secret => by.restricted,
        })
    }

    /// Redacts every field of `obj` for `clearance`.
    fn fields(
        &self,
        item: Option<&CatalogItem>,
        obj: &Map<String, Value>,
        clearance: FieldClass,
    ) -> Map<String, Value> {
        let Some(item) = item else {
            return Map::new();
        };
        let subject_type = obj
            .get("subject_type")
            .cloned()
            .and_then(|v| serde_json::from_value::<SubjectType>(v).ok());
        let mut out = Map::new();
        for (k, v) in obj {
            let class = item.class_of(k, subject_type);
            let value = match self.action(class, clearance) {
                None => Some(v.clone()),
                Some(Action::Drop) => None,
                Some(Action::Mask) => v.as_str().map(|s| Value::String(self.mask(s))),
                Some(Action::Pseudonym) => v.as_str().map(|s| Value::String(self.pseudonym(s))),
            };
            if let Some(value) = value {
                out.insert(k.clone(), value);
            }
        }
        out
    }

    /// Redacts a record for `audience`. With no catalog item (the item was
    /// removed), nothing is known about the fields, so a non-originator
    /// gets nothing.
    pub fn record_view(
        &self,
        item: Option<&CatalogItem>,
        body: &RecordBody,
        audience: Audience,
    ) -> RecordView {
        let Some(obj) = body.0.as_object() else {
            return RecordView(Map::new());
        };
        match audience {
            Audience::Originator => RecordView(obj.clone()),
            Audience::Cleared(c) => RecordView(self.fields(item, obj, c)),
        }
    }

    /// A record for the public channel: only the fields the item marks
    /// `public` for the record's subject type, nothing masked or
    /// pseudonymised in their place; a natural person's name, which is
    /// not public, shown as its first character and stars (`王*`). With
    /// no catalog item, nothing.
    pub fn public_view(&self, item: Option<&CatalogItem>, body: &RecordBody) -> RecordView {
        let (Some(item), Some(obj)) = (item, body.0.as_object()) else {
            return RecordView(Map::new());
        };
        let subject_type = obj
            .get("subject_type")
            .cloned()
            .and_then(|v| serde_json::from_value::<SubjectType>(v).ok());
        let mut out: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| item.class_of(k, subject_type) == FieldClass::Public)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if subject_type == Some(SubjectType::NaturalPerson) {
            if let Some(name) = obj.get("subject_name").and_then(Value::as_str) {
                let mut chars = name.trim().chars();
                if let Some(first) = chars.next() {
                    let stars = "*".repeat(chars.count().max(1));
                    out.insert(
                        "subject_name".into(),
                        Value::String(format!("{first}{stars}")),
                    );
                }
            }
        }
        RecordView(out)
    }

    /// A list removal document for `audience`: fields above its clearance
    /// (or not annotated in the item's removal schema) are left out.
    pub fn removal_view(
        &self,
        item: Option<&CatalogItem>,
        removal: &Value,
        audience: Audience,
    ) -> RecordView {
        let Some(obj) = removal.as_object() else {
            return RecordView(Map::new());
        };
        match audience {
            Audience::Originator => RecordView(obj.clone()),
            Audience::Cleared(c) => RecordView(
                obj.iter()
                    .filter(|(k, _)| item.is_some_and(|i| i.removal_class_of(k) <= c))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
        }
    }

    /// A notice for a recipient of `clearance`; `cursor` is set for pulls.
    pub fn notice_view(
        &self,
        item: Option<&CatalogItem>,
        notice: &StoredNotice,
        body: &RecordBody,
        clearance: FieldClass,
        cursor: Option<String>,
    ) -> NoticeView {
        let empty = Map::new();
        let obj = body.0.as_object().unwrap_or(&empty);
        let mut record = self.fields(item, obj, clearance);
        let mut subject = Map::new();
        for k in SUBJECT_FIELDS {
            if let Some(v) = record.get(k) {
                subject.insert(k.to_owned(), v.clone());
            }
        }
        let subject_type = record
            .remove("subject_type")
            .and_then(|v| v.as_str().map(str::to_owned));
        if notice.kind == NoticeKind::GradeChange {
            // About the subject: the record it is filed under is no part
            // of it.
            record.clear();
        }
        let catalog_measures = item
            .and_then(|i| i.def.notice.as_ref())
            .map(|n| &n.measures);
        let measures = notice
            .measures
            .iter()
            .map(
                |id| match catalog_measures.and_then(|ms| ms.iter().find(|m| &m.id == id)) {
                    Some(m) => MeasureView::Full(m.clone()),
                    None => MeasureView::Id { id: id.clone() },
                },
            )
            .collect();
        record.insert(
            "subject_type".into(),
            subject_type
                .clone()
                .map(Value::String)
                .unwrap_or(Value::Null),
        );
        NoticeView {
            notice_id: notice.notice_id.clone(),
            kind: notice.kind,
            item: notice.item.clone(),
            item_version: notice.item_version,
            record_id: notice.record_id.clone(),
            source: notice.source.clone(),
            severity: notice.severity,
            subject: SubjectView {
                subject_type,
                fields: subject,
            },
            measures,
            effective_from: notice.effective_from,
            effective_until: notice.effective_until,
            record: RecordView(record),
            issued_at: notice.issued_at,
            lifts: notice.lifts.clone(),
            reason: notice.reason.clone(),
            corrects: notice.corrects.clone(),
            historical: notice.historical,
            grade: notice.grade.clone(),
            cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor() -> Redactor {
        Redactor::new(
            Policy::default(),
            Arc::from(&b"0123456789abcdef0123456789abcdef"[..]),
        )
    }

    #[test]
    fn mask_keeps_ten_and_four() {
        let r = redactor();
        assert_eq!(r.mask("140411198501010854"), "1404111985****0854");
        assert_eq!(r.mask("王伟"), "王*");
        assert_eq!(r.mask("x"), "*");
    }

    #[test]
    fn pseudonym_is_stable_keyed_and_case_insensitive() {
        let r = redactor();
        let other = Redactor::new(
            Policy::default(),
            Arc::from(&b"another-secret-another-secret-32"[..]),
        );
        assert_eq!(
            r.pseudonym("11010519491231002X"),
            r.pseudonym("11010519491231002x")
        );
        assert_ne!(
            r.pseudonym("11010519491231002X"),
            other.pseudonym("11010519491231002X")
        );
        assert!(!r.pseudonym("11010519491231002X").contains("1101051949"));
    }

    #[test]
    fn secret_is_never_passed() {
        let r = redactor();
        for c in [
            FieldClass::Public,
            FieldClass::Shared,
            FieldClass::Restricted,
            FieldClass::Secret,
        ] {
            assert!(r.action(FieldClass::Secret, c).is_some(), "{c:?}");
        }
        assert_eq!(r.action(FieldClass::Shared, FieldClass::Shared), None);
        assert_eq!(
            r.action(FieldClass::Restricted, FieldClass::Shared),
            Some(Action::Drop)
        );
    }
}
