//! The participants registry: certificate identity → participant (kind,
//! names, region, clearance, quota).
//!
//! Identity itself comes only from the verified client certificate (see
//! `tls`); this module maps that id to what the participant may do. The
//! registry sits behind an `ArcSwap` in the server state so it can be
//! replaced at run time; it is read once per request.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::FieldClass;
use crate::config::Quota;

/// What a participant is, which decides the routes it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Submits records of the catalog items it provides.
    Department,
    /// Receives notices and reports feedback.
    Agency,
    /// Credit office: owns catalog, participants, subscriptions.
    Admin,
}

impl Kind {
    /// Lower-case name as used in config and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Department => "department",
            Kind::Agency => "agency",
            Kind::Admin => "admin",
        }
    }
}

/// One registered participant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Participant {
    /// Stable id; equals the certificate's subject CN (or SAN URI suffix).
    pub id: String,
    /// Department, agency or admin.
    pub kind: Kind,
    /// Official English name.
    pub name: String,
    /// Official Chinese name.
    pub name_zh: String,
    /// Administrative division code (GB/T 2260) the participant serves.
    #[serde(default)]
    pub region: Option<String>,
    /// Highest field class this participant may receive.
    #[serde(default = "default_clearance")]
    pub clearance: FieldClass,
    /// The kinds of implementing body an agency is (`procurement`,
    /// `finance`, `land`, …): a catalog measure names the kinds that apply
    /// it (`implementers`), and a credit review lists the measures that
    /// bind the asking agency's kinds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub implements: Vec<String>,
    /// Own request quota; the kind's default from config otherwise.
    #[serde(default)]
    pub quota: Option<Quota>,
    /// A disabled participant's requests are refused with 403.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Optional pins: SHA-256 fingerprints (hex) of the certificates this
    /// participant may connect with. Empty = any certificate from the CA
    /// naming the participant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificate_sha256: Vec<String>,
}

fn default_clearance() -> FieldClass {
    FieldClass::Public
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    participant: Vec<Participant>,
}

/// All participants, by id.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    by_id: HashMap<String, Arc<Participant>>,
    order: Vec<String>,
}

impl Registry {
    /// Reads and validates a registry file; every problem is reported.
    pub fn load(path: &Path) -> Result<Registry, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
        let file: RegistryFile =
            toml::from_str(&text).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        Registry::from_participants(file.participant).map_err(|errs| {
            errs.into_iter()
                .map(|e| format!("{}: {e}", path.display()))
                .collect()
        })
    }

    /// Builds a registry, checking ids and clearances.
    pub fn from_participants(list: Vec<Participant>) -> Result<Registry, Vec<String>> {
        let mut errors = Vec::new();
        let mut reg = Registry::default();
        for (i, p) in list.into_iter().enumerate() {
            if !valid_id(&p.id) {
                errors.push(format!(
                    "participant[{i}].id: {:?} must be 1-64 characters of a-z, 0-9, '-', '_', '.'",
                    p.id
                ));
            }
            if p.clearance == FieldClass::Secret {
                errors.push(format!(
                    "participant[{i}].clearance: secret fields never leave the gateway; use restricted at most"
                ));
            }
            if p.certificate_sha256
                .iter()
                .any(|f| f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                errors.push(format!(
                    "participant[{i}].certificate_sha256: each pin is 64 hex digits"
                ));
            }
            if let Some(q) = p.quota {
                if q.per_second == 0 || q.burst == 0 {
                    errors.push(format!(
                        "participant[{i}].quota: per_second and burst must be greater than 0"
                    ));
                }
            }
            if reg.by_id.contains_key(&p.id) {
                errors.push(format!("participant[{i}].id: duplicate id {:?}", p.id));
                continue;
            }
            reg.order.push(p.id.clone());
            reg.by_id.insert(p.id.clone(), Arc::new(p));
        }
        if errors.is_empty() {
            Ok(reg)
        } else {
            Err(errors)
        }
    }

    /// All participants in order, as values (for storing and listing).
    pub fn to_vec(&self) -> Vec<Participant> {
        self.iter().map(|p| (**p).clone()).collect()
    }

    /// The participant with this id, if registered.
    pub fn get(&self, id: &str) -> Option<&Arc<Participant>> {
        self.by_id.get(id)
    }

    /// All participants in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Participant>> {
        self.order.iter().filter_map(|id| self.by_id.get(id))
    }
}

/// Participant ids double as certificate CNs and file names of dev
/// certificates, so they are kept to a safe alphabet.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && !id.starts_with('.')
        // `ca`, `server` and `gateway` name the dev PKI's own files.
        && id != "ca"
        && id != "server"
        && id != "gateway"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_ids_duplicates_and_secret_clearance() {
        let p = |id: &str, clearance| Participant {
            id: id.into(),
            kind: Kind::Agency,
            name: "x".into(),
            name_zh: "x".into(),
            region: None,
            clearance,
            implements: vec![],
            quota: None,
            enabled: true,
            certificate_sha256: vec![],
        };
        let errs = Registry::from_participants(vec![
            p("ok-1", FieldClass::Shared),
            p("ok-1", FieldClass::Shared),
            p("Bad/Id", FieldClass::Public),
            p("spy", FieldClass::Secret),
        ])
        .expect_err("invalid");
        assert_eq!(errs.len(), 3, "{errs:?}");
    }
}
