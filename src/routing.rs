//! Subscriptions and notice routing: which agencies receive a notice.
//!
//! An agency subscribes by item, notice type, minimum severity, subject type
//! and region; each subscription is delivered by `pull` (the agency fetches
//! with a cursor) or `push` (credgate POSTs to the agency's HTTPS endpoint).
//! Matching is pure: no I/O, unit-tested without a server.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, FieldClass, NoticeType, Severity, SubjectType};
use crate::participants::{Kind, Registry};
pub use crate::signing::SigningSecret;

/// How a subscription's notices reach the agency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum DeliveryMode {
    /// The agency fetches `GET /v1/notices`.
    Pull,
    /// credgate POSTs each notice to `endpoint` over mTLS.
    Push {
        /// HTTPS URL of the agency's receiver.
        endpoint: String,
        /// CA bundle (PEM) the endpoint's certificate must chain to.
        ca_file: PathBuf,
        /// Standard Webhooks signing secret, `whsec_<base64>` (never shown).
        #[serde(skip_serializing)]
        signing_secret: Option<SigningSecret>,
        /// File holding the signing secret.
        signing_secret_file: Option<PathBuf>,
        /// Most requests in flight to this endpoint.
        max_in_flight: usize,
        /// Most requests per second to this endpoint.
        rate_per_second: u32,
        /// Most notices per request: 1 sends each notice as its own body
        /// (the default); more sends `{"notices": [...]}` batches under
        /// one signature (opt-in, for throughput).
        batch_max: usize,
    },
}

/// The largest `batch_max` a push subscription may ask for.
pub const BATCH_MAX_LIMIT: usize = 500;

/// Delivery modes as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    /// `GET /v1/notices`.
    Pull,
    /// POST to the agency's endpoint.
    Push,
}

/// A subscription as written in `subscriptions.toml` (flat, strict).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// Stable id.
    pub id: String,
    /// Subscribing agency (participant id).
    pub agency: String,
    /// Items to receive; empty = every item that produces notices.
    #[serde(default)]
    pub items: Vec<String>,
    /// Notice types (`punishment`, `incentive`); empty = both.
    #[serde(default)]
    pub notice_types: Vec<NoticeType>,
    /// Lowest severity received.
    #[serde(default = "lowest")]
    pub min_severity: Severity,
    /// Subject types; empty = all.
    #[serde(default)]
    pub subject_types: Vec<SubjectType>,
    /// Division-code prefixes; empty = everywhere.
    #[serde(default)]
    pub regions: Vec<String>,
    /// `pull` or `push`.
    pub mode: ModeName,
    /// Push: HTTPS URL of the receiver.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Push: CA bundle the endpoint's certificate must chain to.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Push: signing secret `whsec_<base64>`.
    #[serde(default)]
    pub signing_secret: Option<SigningSecret>,
    /// Push: file holding the signing secret.
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
    /// Push: most requests in flight (default 8).
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// Push: most requests per second (default 200).
    #[serde(default)]
    pub rate_per_second: Option<u32>,
    /// Push: most notices per request (default 1: one notice per request;
    /// more: `{"notices": [...]}` batches, at most [`BATCH_MAX_LIMIT`]).
    #[serde(default)]
    pub batch_max: Option<usize>,
    /// A disabled subscription gets no new deliveries.
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// One subscription.
#[derive(Debug, Clone, Serialize)]
pub struct Subscription {
    /// Stable id.
    pub id: String,
    /// Subscribing agency (participant id).
    pub agency: String,
    /// Items to receive; empty = every item that produces notices.
    pub items: Vec<String>,
    /// Notice types; empty = both. Lift notices always follow the notices
    /// they lift.
    pub notice_types: Vec<NoticeType>,
    /// Lowest severity received.
    pub min_severity: Severity,
    /// Subject types; empty = all.
    pub subject_types: Vec<SubjectType>,
    /// Division-code prefixes (GB/T 2260, e.g. `35` province, `3501` city);
    /// empty = everywhere. A subject without a known region matches only an
    /// empty list.
    pub regions: Vec<String>,
    /// Pull or push, with push settings.
    #[serde(flatten)]
    pub delivery: DeliveryMode,
    /// A disabled subscription gets no new deliveries.
    pub enabled: bool,
}

fn lowest() -> Severity {
    Severity::General
}

fn yes() -> bool {
    true
}

impl SubscriptionSpec {
    /// Checks the mode-specific fields and builds the subscription.
    fn into_subscription(self, at: &str, errors: &mut Vec<String>) -> Subscription {
        let push_fields = self.endpoint.is_some()
            || self.ca_file.is_some()
            || self.signing_secret.is_some()
            || self.signing_secret_file.is_some()
            || self.max_in_flight.is_some()
            || self.rate_per_second.is_some()
            || self.batch_max.is_some();
        let delivery = match self.mode {
            ModeName::Pull => {
                if push_fields {
                    errors.push(format!("{at}: endpoint, ca_file, signing_secret(_file), max_in_flight, rate_per_second and batch_max are for mode = \"push\""));
                }
                DeliveryMode::Pull
            }
            ModeName::Push => {
                if self.endpoint.is_none() {
                    errors.push(format!("{at}.endpoint: required for mode = \"push\""));
                }
                if self.ca_file.is_none() {
                    errors.push(format!("{at}.ca_file: required for mode = \"push\""));
                }
                DeliveryMode::Push {
                    endpoint: self.endpoint.unwrap_or_default(),
                    ca_file: self.ca_file.unwrap_or_default(),
                    signing_secret: self.signing_secret,
                    signing_secret_file: self.signing_secret_file,
                    max_in_flight: self.max_in_flight.unwrap_or(8),
                    rate_per_second: self.rate_per_second.unwrap_or(200),
                    batch_max: self.batch_max.unwrap_or(1),
                }
            }
        };
        Subscription {
            id: self.id,
            agency: self.agency,
            items: self.items,
            notice_types: self.notice_types,
            min_severity: self.min_severity,
            subject_types: self.subject_types,
            regions: self.regions,
            delivery,
            enabled: self.enabled,
        }
    }
}

/// What routing needs to know about a notice.
#[derive(Debug, Clone)]
pub struct NoticeFacts<'a> {
    /// Catalog item id.
    pub item: &'a str,
    /// Punishment or incentive.
    pub notice_type: NoticeType,
    /// Severity.
    pub severity: Severity,
    /// Subject type of the record.
    pub subject_type: Option<SubjectType>,
    /// 6-digit division code of the subject, when known.
    pub region: Option<&'a str>,
}

impl Subscription {
    /// Whether this subscription wants the notice.
    pub fn matches(&self, n: &NoticeFacts<'_>) -> bool {
        // A grade change is about the subject, not one item or level.
        let about_subject = n.notice_type == NoticeType::GradeChange;
        self.enabled
            && (about_subject || self.items.is_empty() || self.items.iter().any(|i| i == n.item))
            && (if self.notice_types.is_empty() {
                matches!(
                    n.notice_type,
                    NoticeType::Punishment | NoticeType::Incentive
                )
            } else {
                self.notice_types.contains(&n.notice_type)
            })
            && (about_subject || n.severity >= self.min_severity)
            && (self.subject_types.is_empty()
                || n.subject_type
                    .is_some_and(|t| self.subject_types.contains(&t)))
            && (self.regions.is_empty()
                || n.region
                    .is_some_and(|r| self.regions.iter().any(|p| r.starts_with(p.as_str()))))
    }

    /// True for push subscriptions.
    pub fn is_push(&self) -> bool {
        matches!(self.delivery, DeliveryMode::Push { .. })
    }

    /// Notices per push request (1 for pull subscriptions).
    pub fn batch_max(&self) -> usize {
        match self.delivery {
            DeliveryMode::Push { batch_max, .. } => batch_max.max(1),
            DeliveryMode::Pull => 1,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionsFile {
    #[serde(default)]
    subscription: Vec<SubscriptionSpec>,
}

/// All subscriptions, checked against registry and catalog.
#[derive(Debug, Default, Clone)]
pub struct Subscriptions {
    /// As written, for storing, listing and rebuilding.
    specs: Vec<SubscriptionSpec>,
    list: Vec<Arc<Subscription>>,
    by_id: HashMap<String, Arc<Subscription>>,
}

/// A subscription picked for a notice.
#[derive(Debug, Clone)]
pub struct Route {
    /// The subscription.
    pub subscription: Arc<Subscription>,
}

impl Subscriptions {
    /// Reads a subscriptions file; a missing file means none.
    pub fn read_file(path: &Path) -> Result<Vec<SubscriptionSpec>, Vec<String>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(vec![format!("{}: cannot read: {e}", path.display())]),
        };
        toml::from_str::<SubscriptionsFile>(&text)
            .map(|f| f.subscription)
            .map_err(|e| vec![format!("{}: {e}", path.display())])
    }

    /// Checks and indexes subscriptions; every problem is reported.
    pub fn build(
        specs: Vec<SubscriptionSpec>,
        registry: &Registry,
        catalog: &Catalog,
    ) -> Result<Subscriptions, Vec<String>> {
        let mut errors = Vec::new();
        let mut seen = HashSet::new();
        let originals = specs.clone();
        let list: Vec<Subscription> = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let at = format!("subscription[{i}] ({})", spec.id);
                spec.into_subscription(&at, &mut errors)
            })
            .collect();
        for (i, s) in list.iter().enumerate() {
            let at = format!("subscription[{i}] ({})", s.id);
            if !crate::participants::valid_id(&s.id) {
                errors.push(format!(
                    "{at}.id: must be 1-64 characters of a-z, 0-9, '-', '_', '.'"
                ));
            }
            if !seen.insert(s.id.clone()) {
                errors.push(format!("{at}.id: duplicate"));
            }
            let agency = registry.get(&s.agency);
            match agency {
                None => errors.push(format!(
                    "{at}.agency: {:?} is not a registered participant",
                    s.agency
                )),
                Some(a) if a.kind != Kind::Agency => errors.push(format!(
                    "{at}.agency: {:?} is a {}, not an agency",
                    s.agency,
                    a.kind.as_str()
                )),
                Some(_) => {}
            }
            let clearance = agency.map(|a| a.clearance).unwrap_or(FieldClass::Public);
            let items: Vec<&str> = if s.items.is_empty() {
                catalog
                    .items()
                    .filter(|i| i.def.notice.is_some())
                    .map(|i| i.def.id.as_str())
                    .collect()
            } else {
                s.items.iter().map(String::as_str).collect()
            };
            for item_id in items {
                match catalog.get(item_id) {
                    None => errors.push(format!("{at}.items: unknown catalog item {item_id:?}")),
                    Some(item) => match &item.def.notice {
                        None => errors.push(format!("{at}.items: {item_id:?} produces no notices")),
                        Some(n) if agency.is_some() && clearance < n.recipient_clearance => errors.push(format!(
                            "{at}: agency {:?} has clearance {:?} but {item_id:?} notices need at least {:?}",
                            s.agency, clearance, n.recipient_clearance
                        )),
                        Some(_) => {}
                    },
                }
            }
            for r in &s.regions {
                if r.is_empty() || r.len() > 6 || !r.bytes().all(|b| b.is_ascii_digit()) {
                    errors.push(format!(
                        "{at}.regions: {r:?} must be a prefix of a 6-digit division code"
                    ));
                }
            }
            if let DeliveryMode::Push {
                endpoint,
                ca_file,
                signing_secret,
                signing_secret_file,
                max_in_flight,
                rate_per_second,
                batch_max,
            } = &s.delivery
            {
                if !endpoint.starts_with("https://") {
                    errors.push(format!("{at}.endpoint: must be an https:// URL"));
                }
                if !ca_file.is_file() {
                    errors.push(format!(
                        "{at}.ca_file: {} does not exist",
                        ca_file.display()
                    ));
                }
                match (signing_secret, signing_secret_file) {
                    (Some(_), Some(_)) => errors.push(format!(
                        "{at}: set signing_secret or signing_secret_file, not both"
                    )),
                    (None, None) => errors.push(format!(
                        "{at}: a push subscription needs signing_secret or signing_secret_file"
                    )),
                    (Some(s), None) => {
                        if let Err(e) = crate::signing::signing_key(s.expose()) {
                            errors.push(format!("{at}.signing_secret: {e}"));
                        }
                    }
                    (None, Some(f)) => match std::fs::read_to_string(f) {
                        Ok(s) => {
                            if let Err(e) = crate::signing::signing_key(s.trim()) {
                                errors.push(format!("{at}.signing_secret_file: {e}"));
                            }
                        }
                        Err(e) => {
                            errors.push(format!("{at}.signing_secret_file: {}: {e}", f.display()))
                        }
                    },
                }
                if *max_in_flight == 0 || *rate_per_second == 0 {
                    errors.push(format!(
                        "{at}: max_in_flight and rate_per_second must be greater than 0"
                    ));
                }
                if !(1..=BATCH_MAX_LIMIT).contains(batch_max) {
                    errors.push(format!(
                        "{at}.batch_max: must be between 1 and {BATCH_MAX_LIMIT} notices per request"
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let list: Vec<Arc<Subscription>> = list.into_iter().map(Arc::new).collect();
        let by_id = list.iter().map(|s| (s.id.clone(), s.clone())).collect();
        Ok(Subscriptions {
            specs: originals,
            list,
            by_id,
        })
    }

    /// The subscriptions that receive a notice: every matching push
    /// subscription, and one pull subscription per agency (an agency pulls
    /// one ordered stream, so a notice appears in it once).
    pub fn route(&self, facts: &NoticeFacts<'_>) -> Vec<Route> {
        let mut pulled = HashSet::new();
        self.list
            .iter()
            .filter(|s| s.matches(facts))
            .filter(|s| s.is_push() || pulled.insert(s.agency.as_str()))
            .map(|s| Route {
                subscription: s.clone(),
            })
            .collect()
    }

    /// The subscriptions as written.
    pub fn specs(&self) -> &[SubscriptionSpec] {
        &self.specs
    }

    /// One subscription by id.
    pub fn get(&self, id: &str) -> Option<&Arc<Subscription>> {
        self.by_id.get(id)
    }

    /// All subscriptions in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Subscription>> {
        self.list.iter()
    }
}

/// The division code and subject type of the subject of a record (see
/// [`region_of`]).
pub fn subject_of_record(record: &serde_json::Value) -> (Option<String>, Option<SubjectType>) {
    let text = |f: &str| record.get(f).and_then(serde_json::Value::as_str);
    let resident_id = (text("id_type") == Some("resident_id"))
        .then(|| text("id_number"))
        .flatten();
    let subject_type = record
        .get("subject_type")
        .cloned()
        .and_then(|v| serde_json::from_value::<SubjectType>(v).ok());
    (region_of(text("uscc"), resident_id), subject_type)
}

/// The 6-digit division code of a subject: USCC positions 3-8, or the first
/// six digits of a resident ID number.
pub fn region_of(uscc: Option<&str>, resident_id: Option<&str>) -> Option<String> {
    let digits = |s: &str, range: std::ops::Range<usize>| {
        s.get(range)
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_owned)
    };
    uscc.and_then(|u| digits(u, 2..8))
        .or_else(|| resident_id.and_then(|r| digits(r, 0..6)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: &str, agency: &str, f: impl FnOnce(&mut Subscription)) -> Subscription {
        let mut s = Subscription {
            id: id.into(),
            agency: agency.into(),
            items: vec![],
            notice_types: vec![],
            min_severity: Severity::General,
            subject_types: vec![],
            regions: vec![],
            delivery: DeliveryMode::Pull,
            enabled: true,
        };
        f(&mut s);
        s
    }

    fn facts(severity: Severity, region: Option<&str>) -> NoticeFacts<'_> {
        NoticeFacts {
            item: "administrative_penalty",
            notice_type: NoticeType::Punishment,
            severity,
            subject_type: Some(SubjectType::LegalEntity),
            region,
        }
    }

    #[test]
    fn filters_by_every_criterion() {
        let s = sub("a", "x", |s| {
            s.items = vec!["administrative_penalty".into()];
            s.min_severity = Severity::Serious;
            s.regions = vec!["3501".into()];
            s.subject_types = vec![SubjectType::LegalEntity];
            s.notice_types = vec![NoticeType::Punishment];
        });
        assert!(s.matches(&facts(Severity::Serious, Some("350102"))));
        assert!(!s.matches(&facts(Severity::General, Some("350102"))));
        assert!(!s.matches(&facts(Severity::Serious, Some("440300"))));
        assert!(!s.matches(&facts(Severity::Serious, None)));
        let mut f = facts(Severity::Serious, Some("350102"));
        f.item = "red_list";
        assert!(!s.matches(&f));
        let mut f = facts(Severity::Serious, Some("350102"));
        f.subject_type = Some(SubjectType::NaturalPerson);
        assert!(!s.matches(&f));
    }

    #[test]
    fn one_pull_route_per_agency_but_every_push() {
        let push = |id: &str| {
            sub(id, "x", |s| {
                s.delivery = DeliveryMode::Push {
                    endpoint: "https://x".into(),
                    ca_file: "ca.pem".into(),
                    signing_secret: None,
                    signing_secret_file: None,
                    max_in_flight: 1,
                    rate_per_second: 1,
                    batch_max: 1,
                }
            })
        };
        let list: Vec<Arc<Subscription>> = vec![
            sub("p1", "x", |_| {}),
            sub("p2", "x", |_| {}),
            sub("p3", "y", |_| {}),
            push("h1"),
            push("h2"),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let subs = Subscriptions {
            specs: vec![],
            by_id: list.iter().map(|s| (s.id.clone(), s.clone())).collect(),
            list,
        };
        let ids: Vec<_> = subs
            .route(&facts(Severity::General, None))
            .into_iter()
            .map(|r| r.subscription.id.clone())
            .collect();
        assert_eq!(ids, ["p1", "p3", "h1", "h2"]);
    }

    #[test]
    fn region_from_codes() {
        assert_eq!(
            region_of(Some("91350100M000100Y43"), None).as_deref(),
            Some("350100")
        );
        assert_eq!(
            region_of(None, Some("11010519491231002X")).as_deref(),
            Some("110105")
        );
        assert_eq!(region_of(Some("9135A100M000100Y43"), None), None);
    }

    #[test]
    fn signing_secrets_never_appear_in_debug_output() {
        let secret = "whsec_c2VjcmV0LWZvci1maW5hbmNlLXB1c2gtcmVjZWl2ZXI=";
        let spec: SubscriptionSpec = toml::from_str(&format!(
            "id = \"s\"\nagency = \"a\"\nmode = \"push\"\nendpoint = \"https://x\"\nca_file = \"ca.pem\"\nsigning_secret = \"{secret}\"\n"
        ))
        .expect("spec");
        let mut errors = Vec::new();
        let sub = spec.clone().into_subscription("s", &mut errors);
        for text in [
            format!("{spec:?}"),
            format!("{sub:?}"),
            format!("{:#?}", sub.delivery),
        ] {
            assert!(!text.contains("c2VjcmV0"), "{text}");
            assert!(text.contains("redacted"), "{text}");
        }
        assert_eq!(
            spec.signing_secret.as_ref().map(SigningSecret::expose),
            Some(secret)
        );
    }
}
