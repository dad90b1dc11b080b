//! Credit review reports (信用审查报告, seed §四(二)): before an
//! administrative body grants funds, a contract, a licence, an honour or a
//! post, it asks the public credit information centre about the applicant
//! and applies the restrictions that bind it.
//!
//! A report lists the subject's records in effect (redacted for the asker,
//! like every other egress), the measures among them that bind the asking
//! agency's kinds (`implements`) for the stated purpose, and the records
//! that ended within the look-back window (that they existed and how they
//! ended, never their content: repair and revocation stop sharing). It is
//! signed with the gateway's Ed25519 key so it can be filed and verified
//! offline (`credgate review verify`).

use std::path::Path;

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use time::Date;

use crate::catalog::{Catalog, NoticeType};
use crate::participants::{Kind, Participant, Registry};
use crate::redact::{Audience, Redactor};
use crate::store::StoredRecord;

/// Why an agency asks (审查用途): the measures that apply depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// 财政性资金 (subsidies, policy loans).
    FiscalFunds,
    /// 政府采购.
    GovernmentProcurement,
    /// 行政许可.
    AdministrativeLicensing,
    /// 评优评先、荣誉表彰.
    HonoursAndAwards,
    /// 公共资源交易 (land, mining rights, public works).
    PublicResourceTrading,
    /// 公职人员录用、任职.
    PublicEmployment,
    /// 其他 (with a stated text).
    Other,
}

impl Purpose {
    /// Every purpose, in the order the API documents them.
    pub const ALL: [Purpose; 7] = [
        Purpose::FiscalFunds,
        Purpose::GovernmentProcurement,
        Purpose::AdministrativeLicensing,
        Purpose::HonoursAndAwards,
        Purpose::PublicResourceTrading,
        Purpose::PublicEmployment,
        Purpose::Other,
    ];

    /// The API code.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::FiscalFunds => "fiscal_funds",
            Purpose::GovernmentProcurement => "government_procurement",
            Purpose::AdministrativeLicensing => "administrative_licensing",
            Purpose::HonoursAndAwards => "honours_and_awards",
            Purpose::PublicResourceTrading => "public_resource_trading",
            Purpose::PublicEmployment => "public_employment",
            Purpose::Other => "other",
        }
    }

    /// The official Chinese name.
    pub fn name_zh(self) -> &'static str {
        match self {
            Purpose::FiscalFunds => "申请财政性资金",
            Purpose::GovernmentProcurement => "参加政府采购",
            Purpose::AdministrativeLicensing => "申请行政许可",
            Purpose::HonoursAndAwards => "评优评先、荣誉表彰",
            Purpose::PublicResourceTrading => "参与公共资源交易",
            Purpose::PublicEmployment => "公职人员录用、任职",
            Purpose::Other => "其他",
        }
    }

    /// Parses an API code.
    pub fn parse(s: &str) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// Who a report is about: the subject's key as records store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A legal entity or individual business, by its USCC.
    Uscc(String),
    /// A natural person, by the keyed pseudonym of an ID number: the
    /// number itself never reaches the report, the store or a log.
    Person {
        /// Keyed pseudonym of the ID number.
        pseudonym: String,
        /// The document type as given.
        id_type: String,
    },
}

impl Subject {
    /// The key records about this subject are stored under.
    pub fn key(&self) -> &str {
        match self {
            Subject::Uscc(u) => u,
            Subject::Person { pseudonym, .. } => pseudonym,
        }
    }
}

/// What a report is assembled from.
pub struct Inputs<'a> {
    /// Report id.
    pub report_id: &'a str,
    /// Issue time.
    pub issued_at: time::OffsetDateTime,
    /// Today in China Standard Time (effect and look-back are by date).
    pub today: Date,
    /// Look-back window for ended records, in years.
    pub look_back_years: u8,
    /// Issuing centre (English, Chinese).
    pub issuer: (&'a str, &'a str),
    /// Who asks.
    pub asker: &'a Participant,
    /// Why.
    pub purpose: Purpose,
    /// The stated text of purpose `other`.
    pub purpose_detail: Option<&'a str>,
    /// About whom.
    pub subject: &'a Subject,
    /// Every stored record about the subject (any status).
    pub records: &'a [StoredRecord],
    /// The subject's credit grade from those records.
    pub grade: &'a crate::grades::Grade,
    /// The catalog in force.
    pub catalog: &'a Catalog,
    /// The participants (issuing departments' names).
    pub registry: &'a Registry,
    /// The egress choke point.
    pub redactor: &'a Redactor,
}

use crate::grading::in_effect;

/// Whether a measure binds `asker` for `purpose`: an administrator sees
/// every measure of the purpose; an agency those its kinds implement (or
/// that every agency implements, `all`). A measure that names no purpose
/// applies to every purpose.
fn binds(m: &crate::catalog::Measure, asker: &Participant, purpose: Purpose) -> bool {
    let kinds = asker.kind == Kind::Admin
        || m.implementers
            .iter()
            .any(|i| i == "all" || asker.implements.contains(i));
    kinds && (m.purposes.is_empty() || m.purposes.contains(&purpose))
}

/// Assembles the (unsigned) report.
pub fn assemble(i: &Inputs<'_>) -> Value {
    let look_back_from = i
        .today
        .replace_year(i.today.year() - i32::from(i.look_back_years))
        .unwrap_or(i.today);
    let audience = Audience::Cleared(i.asker.clearance);
    let mut in_force = Vec::new();
    let mut ended = Vec::new();
    // measure id → (measure, notice type, record ids)
    let mut bound: Vec<(crate::catalog::Measure, NoticeType, Vec<String>)> = Vec::new();
    let mut subject_view: Option<(time::OffsetDateTime, Map<String, Value>)> = None;
    let mut records: Vec<&StoredRecord> = i.records.iter().collect();
    records.sort_by(|a, b| b.decision_date.cmp(&a.decision_date).then(a.id.cmp(&b.id)));
    for r in records {
        let item = i.catalog.get(&r.item).map(|x| x.as_ref());
        let Some(rule) = item.and_then(|x| x.def.notice.as_ref()) else {
            // Items without a punishment or incentive rule (licences) are
            // no credit information of their own.
            continue;
        };
        let source = i.registry.get(&r.submitter);
        let mut entry = json!({
            "record_id": r.id,
            "item": r.item,
            "item_name": item.map(|x| x.def.name.as_str()),
            "item_name_zh": item.map(|x| x.def.name_zh.as_str()),
            "type": rule.notice_type,
            "decision_date": r.decision_date.map(|d| d.to_string()),
            "effective_until": r.effective_until.map(|d| d.to_string()),
            "source": r.submitter,
            "source_name_zh": source.map(|p| p.name_zh.as_str()),
        });
        if !in_effect(r, i.today) {
            if r.decision_date.is_some_and(|d| d >= look_back_from) {
                entry["status"] = json!(if r.status == "active" {
                    "expired"
                } else {
                    r.status.as_str()
                });
                entry["end_reason"] = json!(r.end_reason.as_deref().unwrap_or("expired"));
                ended.push(entry);
            }
            continue;
        }
        let view = i.redactor.record_view(item, &r.body, audience);
        let view = serde_json::to_value(&view).unwrap_or(Value::Null);
        let derived = item.and_then(|x| r.body.derived_notice(x));
        // The record's own level, whether or not it makes a notice.
        entry["level"] = json!(item.and_then(|x| r.body.level(x)));
        let measures: Vec<String> = derived.map(|d| d.measures).unwrap_or_default();
        for id in &measures {
            let Some(m) = rule.measures.iter().find(|m| &m.id == id) else {
                continue;
            };
            if !binds(m, i.asker, i.purpose) {
                continue;
            }
            match bound
                .iter_mut()
                .find(|(b, t, _)| &b.id == id && *t == rule.notice_type)
            {
                Some((_, _, ids)) => ids.push(r.id.clone()),
                None => bound.push((m.clone(), rule.notice_type, vec![r.id.clone()])),
            }
        }
        entry["measures"] = json!(measures);
        if subject_view
            .as_ref()
            .is_none_or(|(at, _)| r.received_at > *at)
        {
            if let Value::Object(v) = &view {
                let keep = ["subject_type", "subject_name", "uscc"];
                let s: Map<String, Value> = v
                    .iter()
                    .filter(|(k, _)| keep.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                subject_view = Some((r.received_at, s));
            }
        }
        entry["record"] = view;
        in_force.push(entry);
    }
    let listed = |t: NoticeType| -> Vec<Value> {
        bound
            .iter()
            .filter(|(_, nt, _)| *nt == t)
            .map(|(m, _, ids)| {
                json!({
                    "id": m.id,
                    "description": m.description,
                    "description_zh": m.description_zh,
                    "legal_basis": m.legal_basis,
                    "implementers": m.implementers,
                    "records": ids,
                })
            })
            .collect()
    };
    let restrictions = listed(NoticeType::Punishment);
    let mut subject = subject_view.map(|(_, s)| s).unwrap_or_default();
    match i.subject {
        Subject::Uscc(u) => {
            subject.insert("uscc".into(), json!(u));
        }
        Subject::Person { id_type, .. } => {
            // Matched by the pseudonym of the number; the number is never
            // returned, and neither is the pseudonym (it would let reports
            // be joined across agencies).
            subject.insert("matched_by".into(), json!("id_number"));
            subject.insert("id_type".into(), json!(id_type));
        }
    }
    json!({
        "report_id": i.report_id,
        "issued_at": i.issued_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "issuer": {"name": i.issuer.0, "name_zh": i.issuer.1},
        "requested_by": {"id": i.asker.id, "name": i.asker.name, "name_zh": i.asker.name_zh},
        "purpose": i.purpose,
        "purpose_zh": i.purpose.name_zh(),
        "purpose_detail": i.purpose_detail,
        "subject": subject,
        "grade": i.grade,
        "restricted": !restrictions.is_empty(),
        "restrictions": restrictions,
        "incentives": listed(NoticeType::Incentive),
        "records_in_effect": in_force,
        "ended_records": ended,
        "look_back": {"years": i.look_back_years, "from": look_back_from.to_string()},
        "as_of": i.today.to_string(),
    })
}

/// The signature algorithm of reports.
pub const ALGORITHM: &str = "Ed25519";

/// The gateway's report signing key.
pub struct Signer {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A published verification key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    /// Key id (first 16 hex digits of the SHA-256 of the public key).
    pub key_id: String,
    /// Always `Ed25519`.
    pub alg: String,
    /// The raw 32-byte public key, base64.
    pub public_key: String,
}

/// The document `GET /v1/credit-reviews/keys` answers, and what
/// `credgate review verify --keys` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySet {
    /// Keys reports may be signed with.
    pub keys: Vec<PublicKey>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn key_id_of(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

impl Signer {
    /// Writes a new key (PKCS#8, base64 text) to `path`, readable by the
    /// owner only. Refuses to overwrite.
    pub fn generate(path: &Path) -> Result<(), String> {
        if path.exists() {
            return Err(format!("{}: exists; not overwritten", path.display()));
        }
        let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|_| "cannot generate an Ed25519 key".to_owned())?;
        crate::pki::write_file(path, &b64().encode(doc.as_ref()), true)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads the key written by [`Signer::generate`].
    pub fn load(path: &Path) -> Result<Signer, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let der = b64()
            .decode(text.trim())
            .map_err(|_| format!("{}: not a base64 PKCS#8 document", path.display()))?;
        let pair = Ed25519KeyPair::from_pkcs8(&der)
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der))
            .map_err(|_| format!("{}: not an Ed25519 PKCS#8 key", path.display()))?;
        let key_id = key_id_of(pair.public_key().as_ref());
        Ok(Signer { pair, key_id })
    }

    /// The key's published form.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            key_id: self.key_id.clone(),
            alg: ALGORITHM.into(),
            public_key: b64().encode(self.pair.public_key().as_ref()),
        }
    }

    /// The signed document: `{"report": …, "signature": {alg, key_id,
    /// value}}`, the signature over the report's compact JSON (keys in
    /// order, as `serde_json` writes them).
    pub fn sign(&self, report: Value) -> Vec<u8> {
        let message = serde_json::to_vec(&report).unwrap_or_default();
        let value = b64().encode(self.pair.sign(&message).as_ref());
        serde_json::to_vec(&json!({
            "report": report,
            "signature": {"alg": ALGORITHM, "key_id": self.key_id, "value": value},
        }))
        .unwrap_or_default()
    }
}

/// Why a report does not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// Not a signed report document.
    #[error("not a signed credit review report: {0}")]
    Malformed(String),
    /// Signed with a key not in the key set.
    #[error("signed with key {0}, which the key set does not hold")]
    UnknownKey(String),
    /// The signature does not match the report.
    #[error("the signature does not match the report: it was changed after signing, or signed by someone else")]
    BadSignature,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Signed {
    report: Value,
    signature: Signature,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Signature {
    alg: String,
    key_id: String,
    value: String,
}

/// Verifies a signed report against `keys`; returns the report.
pub fn verify(document: &[u8], keys: &KeySet) -> Result<Value, VerifyError> {
    let signed: Signed =
        serde_json::from_slice(document).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let sig = signed.signature;
    if sig.alg != ALGORITHM {
        return Err(VerifyError::Malformed(format!(
            "signature algorithm {:?}; only {ALGORITHM} is used",
            sig.alg
        )));
    }
    let key = keys
        .keys
        .iter()
        .find(|k| k.key_id == sig.key_id && k.alg == ALGORITHM)
        .ok_or_else(|| VerifyError::UnknownKey(sig.key_id.clone()))?;
    let public = b64()
        .decode(&key.public_key)
        .map_err(|_| VerifyError::Malformed("the key set's public key is not base64".into()))?;
    let value = b64()
        .decode(&sig.value)
        .map_err(|_| VerifyError::BadSignature)?;
    // The canonical form is the compact JSON of the report as parsed; a
    // report re-indented by a viewer still verifies, a changed value not.
    let message = serde_json::to_vec(&signed.report).unwrap_or_default();
    UnparsedPublicKey::new(&signature::ED25519, &public)
        .verify(&message, &value)
        .map_err(|_| VerifyError::BadSignature)?;
    Ok(signed.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_report_verifies_and_any_changed_byte_fails() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("review.key");
        Signer::generate(&path).expect("generate");
        assert!(Signer::generate(&path).is_err(), "never overwritten");
        let signer = Signer::load(&path).expect("load");
        let keys = KeySet {
            keys: vec![signer.public_key()],
        };
        let doc = signer.sign(json!({"report_id": "r1", "restricted": true, "n": [1, 2]}));
        let report = verify(&doc, &keys).expect("verifies");
        assert_eq!(report["restricted"], true);
        // Re-indented by a viewer: still the same report.
        let pretty =
            serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(&doc).expect("json"))
                .expect("json");
        assert!(verify(&pretty, &keys).is_ok());
        // Every single changed byte is caught.
        for i in 0..doc.len() {
            let mut changed = doc.clone();
            changed[i] = if changed[i] == b'1' { b'2' } else { b'1' };
            assert!(
                verify(&changed, &keys).is_err(),
                "byte {i} changed, still verifies"
            );
        }
        // Another key does not verify it.
        let other = dir.path().join("other.key");
        Signer::generate(&other).expect("generate");
        let other = KeySet {
            keys: vec![PublicKey {
                key_id: signer.public_key().key_id,
                ..Signer::load(&other).expect("load").public_key()
            }],
        };
        assert_eq!(verify(&doc, &other), Err(VerifyError::BadSignature));
    }

    #[test]
    fn purposes_round_trip() {
        for p in Purpose::ALL {
            assert_eq!(Purpose::parse(p.as_str()), Some(p));
            assert_eq!(serde_json::to_value(p).expect("json"), json!(p.as_str()));
        }
        assert_eq!(Purpose::parse("bribery"), None);
    }
}
