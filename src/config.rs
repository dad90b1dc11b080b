//! Configuration: built-in defaults, then a TOML file, then `CREDGATE_*`
//! environment variables (`CREDGATE_SECTION__KEY`, double underscore between
//! levels, e.g. `CREDGATE_SERVER__LISTEN=0.0.0.0:8443`).
//!
//! Every problem is collected and reported at once, each with the key at
//! fault, so an operator fixes a file in one pass rather than one restart per
//! mistake. Relative paths resolve against the working directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "CREDGATE_";

/// The whole gateway configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `dev` generates missing development certificates at start-up;
    /// `production` never writes key material and refuses to start without it.
    pub mode: Mode,
    /// Listeners and connection handling.
    pub server: ServerConfig,
    /// Certificates, CA bundle and revocation lists of the main listener.
    pub tls: TlsConfig,
    /// Where the collection catalog lives.
    pub catalog: CatalogConfig,
    /// Where the participants registry lives.
    pub participants: ParticipantsConfig,
    /// Where agencies' subscriptions live.
    pub subscriptions: SubscriptionsConfig,
    /// Push delivery, retries and expiry.
    pub delivery: DeliveryConfig,
    /// Durable storage.
    pub store: StoreConfig,
    /// Input limits that protect the gateway from oversized or hostile input.
    pub limits: LimitsConfig,
    /// Default request quotas per participant kind (a participant's own
    /// `quota` in the registry wins).
    pub rate_limit: RateLimitConfig,
    /// Keys used to pseudonymise personal identifiers.
    pub privacy: PrivacyConfig,
    /// Audit log checkpoints.
    pub audit: AuditConfig,
    /// Credit review reports.
    pub review: ReviewConfig,
    /// The public publicity channel (双公示 / 红黑名单公示).
    pub public: PublicConfig,
}

/// The public publicity channel: a third listener, HTTPS with the server
/// certificate and no client certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicConfig {
    /// Serve it (off unless enabled; the development configuration
    /// enables it).
    pub enabled: bool,
    /// Its address.
    pub listen: SocketAddr,
    /// Requests per second per client address.
    pub per_address_per_second: u32,
    /// Burst per client address.
    pub per_address_burst: u32,
    /// Results per page.
    pub page_size: u32,
    /// `Cache-Control: max-age` of answers, seconds.
    pub max_age_secs: u32,
    /// Most connections open at once (more wait to be accepted).
    pub max_connections: usize,
    /// A connection is closed after this many seconds, gracefully (its
    /// requests finish), so idle clients cannot hold connections.
    pub max_connection_age_secs: u64,
    /// Publicity periods by the rules in force at the decision date,
    /// stamped on records at acceptance (whether or not the channel is
    /// served).
    pub rule_set: Vec<crate::publicity::RuleSet>,
}

impl Default for PublicConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8444)),
            per_address_per_second: 20,
            per_address_burst: 40,
            page_size: 20,
            max_age_secs: 60,
            max_connections: 1000,
            max_connection_age_secs: 60,
            rule_set: crate::publicity::default_rule_sets(),
        }
    }
}

/// Credit review reports (信用审查报告).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReviewConfig {
    /// The Ed25519 key reports are signed with (PKCS#8, base64; `credgate
    /// review keygen FILE` writes one). Generated in dev mode if missing;
    /// every instance of a cluster needs the same file.
    pub signing_key_file: PathBuf,
    /// Ended records decided within this many years are listed as ended.
    pub look_back_years: u8,
    /// The issuing centre, as reports name it.
    pub issuer: String,
    /// Its official Chinese name.
    pub issuer_zh: String,
    /// Memory for the per-subject record cache reports are assembled
    /// from, MiB (0: no cache).
    pub cache_mib: u64,
    /// Longest a cached subject is kept, seconds. This instance drops a
    /// subject at once when it commits, corrects or ends one of its
    /// records; the bound is for writes it cannot see (another instance on
    /// a shared PostgreSQL database, `credgate import` running beside it).
    pub cache_ttl_secs: u64,
    /// Most changed subjects waiting for their credit grade to be
    /// assessed. Past it, a change is not queued; the grader assesses
    /// every subject again once it has room, so none is missed.
    pub grade_backlog_max: usize,
}

impl Default for ReviewConfig {
    fn default() -> Self {
        Self {
            signing_key_file: "data/review-signing.key".into(),
            look_back_years: 5,
            issuer: "Jiangsu Public Credit Information Centre".into(),
            issuer_zh: "江苏省公共信用信息中心".into(),
            cache_mib: 64,
            cache_ttl_secs: 10,
            grade_backlog_max: 100_000,
        }
    }
}

/// Audit log settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often the chain head is checkpointed (signed), seconds; also at
    /// shutdown.
    pub checkpoint_secs: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_secs: 300,
        }
    }
}

/// Run mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Development: generate certificates and secrets when missing.
    #[default]
    Dev,
    /// Production: every file must exist; nothing is generated.
    Production,
}

/// Listener settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Main mTLS listener (HTTP/1.1 and HTTP/2).
    pub listen: SocketAddr,
    /// Plain-HTTP operations listener (`/healthz`, `/readyz`); keep it on
    /// loopback or a management network.
    pub ops_listen: SocketAddr,
    /// A client that has not finished the TLS handshake by then is dropped.
    pub handshake_timeout_secs: u64,
    /// Upper bound for reading a request and producing its response.
    pub request_timeout_secs: u64,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_grace_secs: u64,
    /// Connections above this number wait in the accept queue.
    pub max_connections: usize,
    /// A connection with no request in progress for this long is closed
    /// (HTTP/2 with a GOAWAY; HTTP/1.1 keep-alive between requests).
    pub idle_timeout_secs: u64,
    /// A connection older than this is told to go away once its current
    /// requests finish (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`), so no
    /// client holds a connection slot for ever.
    pub max_connection_age_secs: u64,
    /// HTTP/2 keep-alive: a PING is sent after this long without frames …
    pub http2_keepalive_interval_secs: u64,
    /// … and the connection is closed if the PING is not answered in time.
    pub http2_keepalive_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            handshake_timeout_secs: 10,
            request_timeout_secs: 30,
            shutdown_grace_secs: 20,
            max_connections: 20_000,
            idle_timeout_secs: 120,
            max_connection_age_secs: 3600,
            http2_keepalive_interval_secs: 30,
            http2_keepalive_timeout_secs: 10,
        }
    }
}

/// TLS material of the main listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// Certificate revocation lists (PEM or DER) checked for client certificates.
    pub crls: Vec<PathBuf>,
    /// Also accept the participant id from a SAN URI
    /// `urn:credgate:participant:<id>` (it wins over the subject CN).
    pub accept_san_uri: bool,
    /// In production, the gateway refuses to start (or to reload) with a
    /// server or push client certificate that expires within this many
    /// days, and warns 30 days before.
    pub min_validity_days: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            client_ca: "certs/dev/ca.pem".into(),
            cert: "certs/dev/server.pem".into(),
            key: "certs/dev/server.key".into(),
            crls: Vec::new(),
            accept_san_uri: true,
            min_validity_days: 14,
        }
    }
}

/// Catalog location.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// Folder with one JSON file per catalog item.
    pub dir: PathBuf,
    /// Credit grade rules (分类监管); like the items, stored at the first
    /// start and changed through the admin API from then on.
    pub grades_file: PathBuf,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            dir: "catalogs/credit".into(),
            grades_file: "catalogs/grades.toml".into(),
        }
    }
}

/// Participants registry location.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParticipantsConfig {
    /// TOML file with `[[participant]]` entries.
    pub file: PathBuf,
}

impl Default for ParticipantsConfig {
    fn default() -> Self {
        Self {
            file: "config/participants.toml".into(),
        }
    }
}

/// Subscriptions file location.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsConfig {
    /// TOML file with `[[subscription]]` entries; missing = none.
    pub file: PathBuf,
}

impl Default for SubscriptionsConfig {
    fn default() -> Self {
        Self {
            file: "config/subscriptions.toml".into(),
        }
    }
}

/// Push delivery settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Client certificate the gateway presents to push endpoints (PEM).
    pub client_cert: PathBuf,
    /// Its private key.
    pub client_key: PathBuf,
    /// Wait before each retry, in seconds; after the last, a delivery is
    /// dead. Each wait gets ±20 % jitter.
    pub retry_schedule_secs: Vec<u64>,
    /// How long one push attempt may take.
    pub request_timeout_secs: u64,
    /// Consecutive failures after which an endpoint is paused.
    pub pause_after_failures: u32,
    /// How long a paused endpoint rests before the next attempt.
    pub pause_secs: u64,
    /// How often the push worker looks for due deliveries when not woken.
    pub poll_interval_ms: u64,
    /// How often records past their effective period are lifted.
    pub expiry_check_secs: u64,
    /// Most push attempts in flight across all endpoints.
    pub max_in_flight: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            client_cert: "certs/dev/gateway.pem".into(),
            client_key: "certs/dev/gateway.key".into(),
            retry_schedule_secs: vec![5, 30, 120, 600, 1800, 3600, 7200, 21600],
            request_timeout_secs: 10,
            pause_after_failures: 20,
            pause_secs: 300,
            poll_interval_ms: 1000,
            expiry_check_secs: 3600,
            max_in_flight: 256,
        }
    }
}

/// Storage backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded default) or `postgres` (several instances on one
    /// database).
    pub backend: StoreBackend,
    /// PostgreSQL connection URL (`postgres://user@host:5432/db`), for the
    /// `postgres` backend. Not logged: it may hold a password.
    pub url: Option<String>,
    /// PostgreSQL connections per instance (reads, claims and the writer).
    pub pool_size: usize,
    /// Longest a PostgreSQL statement may run before it is cancelled (ms).
    pub statement_timeout_ms: u64,
    /// Folder of the SQLite database (`credgate.db`).
    pub data_dir: PathBuf,
    /// Most submissions committed in one transaction (one fsync).
    pub group_commit_max: usize,
    /// SQLite read connections of ingest and delivery (look-ups, pulls),
    /// and so the most such reads at once.
    pub read_connections: usize,
    /// SQLite read connections of the public channel, the console and
    /// administrators' listings and statistics, apart from
    /// `read_connections` so that these never delay ingest.
    pub query_connections: usize,
    /// Most memory each SQLite connection (the writer, each reader) keeps
    /// as its page cache, MiB. A larger cache keeps more of a large
    /// database's index pages in memory; every commit also scans the
    /// writer's whole cache (see the README's performance notes).
    pub page_cache_mib: usize,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl_hours: u64,
}

/// The largest `store.page_cache_mib`: SQLite takes the size as a 32-bit
/// count of KiB.
const MAX_PAGE_CACHE_MIB: usize = 1 << 20;

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sqlite,
            url: None,
            pool_size: 16,
            statement_timeout_ms: 30_000,
            data_dir: "data".into(),
            group_commit_max: 512,
            read_connections: 4,
            query_connections: 2,
            page_cache_mib: 16,
            idempotency_ttl_hours: 72,
        }
    }
}

/// Storage backend kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Embedded SQLite file in WAL mode, `synchronous=FULL`.
    Sqlite,
    /// PostgreSQL 15 or later, shared by any number of instances.
    Postgres,
}

/// Input limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body accepted (bytes); larger gets 413.
    pub max_body_bytes: usize,
    /// Most records in one `POST /v1/records`.
    pub max_batch_records: usize,
    /// Deepest JSON nesting accepted in a request body.
    pub max_json_depth: usize,
    /// Most items in any one JSON array of a request (the batch's own
    /// `records` array may always hold `max_batch_records`); longer gets
    /// `413 too_many_items` before the array is built in memory.
    pub max_array_items: usize,
    /// Most findings (errors and warnings) listed for one record; past it,
    /// one `too_many_errors` entry gives the count.
    pub max_findings_per_record: usize,
    /// Most findings listed in one answer; records past it carry only a
    /// `too_many_errors` entry. Bounds every answer's size.
    pub max_findings_per_answer: usize,
    /// Memory (bytes) of the in-process cache of recent answers for
    /// `Idempotency-Key` replay; older answers are read from the store.
    pub replay_cache_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_batch_records: 500,
            max_json_depth: 32,
            max_array_items: 10_000,
            max_findings_per_record: 20,
            max_findings_per_answer: 1000,
            replay_cache_bytes: 32 * 1024 * 1024,
        }
    }
}

/// A request quota: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests that may arrive at once after a quiet period.
    pub burst: u32,
}

/// Default quotas by participant kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Departments (submitters).
    pub department: Quota,
    /// Agencies (notice readers).
    pub agency: Quota,
    /// Administrators.
    pub admin: Quota,
    /// Gateway instances sharing the quotas: each enforces its share
    /// (quota / instances, rounded up), so a participant whose connections
    /// are spread over the instances gets its whole quota and never more.
    pub instances: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            department: Quota {
                per_second: 2000,
                burst: 4000,
            },
            agency: Quota {
                per_second: 500,
                burst: 1000,
            },
            admin: Quota {
                per_second: 100,
                burst: 200,
            },
            instances: 1,
        }
    }
}

/// Privacy keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// File holding the gateway secret (at least 32 bytes) used for keyed
    /// pseudonyms of personal identifiers. Generated in dev mode if missing.
    pub secret_file: PathBuf,
    /// What recipients get of fields above their clearance.
    pub redaction: crate::redact::Policy,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            secret_file: "data/gateway.secret".into(),
            redaction: crate::redact::Policy::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Dev,
            server: ServerConfig::default(),
            tls: TlsConfig::default(),
            catalog: CatalogConfig::default(),
            participants: ParticipantsConfig::default(),
            subscriptions: SubscriptionsConfig::default(),
            delivery: DeliveryConfig::default(),
            store: StoreConfig::default(),
            limits: LimitsConfig::default(),
            rate_limit: RateLimitConfig::default(),
            privacy: PrivacyConfig::default(),
            audit: AuditConfig::default(),
            review: ReviewConfig::default(),
            public: PublicConfig::default(),
        }
    }
}

/// All configuration problems found, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration ({} problem(s)):\n  - {}", .0.len(), .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Loads `path` (which may be missing only if `optional`), applies the
    /// environment overrides in `env` and validates the result.
    pub fn load(
        path: &Path,
        optional: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let mut table = match std::fs::read_to_string(path) {
            Ok(text) => match text.parse::<toml::Table>() {
                Ok(t) => t,
                Err(e) => {
                    return Err(ConfigErrors(vec![format!(
                        "{}: not valid TOML: {e}",
                        path.display()
                    )]))
                }
            },
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
            Err(e) => {
                return Err(ConfigErrors(vec![format!(
                    "{}: cannot read: {e}",
                    path.display()
                )]))
            }
        };
        apply_env(&mut table, env, &mut errors);
        let config = deserialize_collecting(table, &mut errors);
        if let Some(c) = &config {
            c.validate(&mut errors);
        }
        match config {
            Some(c) if errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(errors)),
        }
    }

    fn validate(&self, errors: &mut Vec<String>) {
        match (&self.store.backend, &self.store.url) {
            (StoreBackend::Postgres, None) => errors.push(
                "store.url: required with store.backend = \"postgres\" (e.g. postgres://postgres@127.0.0.1:5432/credgate)".into(),
            ),
            (StoreBackend::Postgres, Some(url))
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) =>
            {
                errors.push("store.url: must be a postgres:// URL".into())
            }
            (StoreBackend::Sqlite, Some(_)) => errors.push(
                "store.url: only used with store.backend = \"postgres\"; remove it or set the backend".into(),
            ),
            _ => {}
        }
        let positive = [
            (
                "server.handshake_timeout_secs",
                self.server.handshake_timeout_secs as usize,
            ),
            (
                "server.request_timeout_secs",
                self.server.request_timeout_secs as usize,
            ),
            ("server.max_connections", self.server.max_connections),
            ("store.group_commit_max", self.store.group_commit_max),
            ("store.read_connections", self.store.read_connections),
            ("store.query_connections", self.store.query_connections),
            ("store.page_cache_mib", self.store.page_cache_mib),
            ("store.pool_size", self.store.pool_size),
            ("rate_limit.instances", self.rate_limit.instances as usize),
            (
                "store.statement_timeout_ms",
                self.store.statement_timeout_ms as usize,
            ),
            ("limits.max_body_bytes", self.limits.max_body_bytes),
            ("limits.max_batch_records", self.limits.max_batch_records),
            ("limits.max_json_depth", self.limits.max_json_depth),
            ("limits.max_array_items", self.limits.max_array_items),
            (
                "limits.max_findings_per_record",
                self.limits.max_findings_per_record,
            ),
            (
                "limits.max_findings_per_answer",
                self.limits.max_findings_per_answer,
            ),
            (
                "server.idle_timeout_secs",
                self.server.idle_timeout_secs as usize,
            ),
            (
                "server.max_connection_age_secs",
                self.server.max_connection_age_secs as usize,
            ),
            (
                "server.http2_keepalive_interval_secs",
                self.server.http2_keepalive_interval_secs as usize,
            ),
            (
                "server.http2_keepalive_timeout_secs",
                self.server.http2_keepalive_timeout_secs as usize,
            ),
            (
                "delivery.request_timeout_secs",
                self.delivery.request_timeout_secs as usize,
            ),
            (
                "delivery.poll_interval_ms",
                self.delivery.poll_interval_ms as usize,
            ),
            (
                "delivery.expiry_check_secs",
                self.delivery.expiry_check_secs as usize,
            ),
            ("delivery.max_in_flight", self.delivery.max_in_flight),
            ("review.grade_backlog_max", self.review.grade_backlog_max),
            ("audit.checkpoint_secs", self.audit.checkpoint_secs as usize),
            (
                "delivery.pause_after_failures",
                self.delivery.pause_after_failures as usize,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                errors.push(format!("{key}: must be greater than 0"));
            }
        }
        for (kind, q) in [
            ("department", self.rate_limit.department),
            ("agency", self.rate_limit.agency),
            ("admin", self.rate_limit.admin),
        ] {
            if q.per_second == 0 || q.burst == 0 {
                errors.push(format!(
                    "rate_limit.{kind}: per_second and burst must be greater than 0"
                ));
            }
        }
        errors.extend(self.privacy.redaction.problems());
        if !(1..=30).contains(&self.review.look_back_years) {
            errors.push("review.look_back_years: must be 1 to 30".into());
        }
        errors.extend(crate::publicity::problems(&self.public.rule_set));
        if !(1..=100).contains(&self.public.page_size) {
            errors.push("public.page_size: 1 to 100".into());
        }
        if self.public.max_connections == 0 || self.public.max_connection_age_secs == 0 {
            errors.push("public.max_connections, max_connection_age_secs: at least 1".into());
        }
        if self.public.per_address_per_second == 0 || self.public.per_address_burst == 0 {
            errors.push("public.per_address_per_second, per_address_burst: at least 1".into());
        }
        if self.public.enabled
            && [self.server.listen, self.server.ops_listen].contains(&self.public.listen)
            && self.public.listen.port() != 0
        {
            errors
                .push("public.listen: must differ from server.listen and server.ops_listen".into());
        }
        if self.store.page_cache_mib > MAX_PAGE_CACHE_MIB {
            errors.push(format!(
                "store.page_cache_mib: at most {MAX_PAGE_CACHE_MIB} (1 TiB per connection)"
            ));
        }
        if self.review.cache_ttl_secs > 3600 {
            errors.push("review.cache_ttl_secs: at most 3600 (an hour)".into());
        }
        if self.server.listen == self.server.ops_listen && self.server.listen.port() != 0 {
            errors.push("server.ops_listen: must differ from server.listen".into());
        }
        // In dev mode missing certificates and secrets are generated; in
        // production every file must be there before start-up.
        let must_exist: Vec<(&str, &Path)> = match self.mode {
            Mode::Dev => vec![],
            Mode::Production => vec![
                ("tls.client_ca", &self.tls.client_ca),
                ("tls.cert", &self.tls.cert),
                ("tls.key", &self.tls.key),
                ("privacy.secret_file", &self.privacy.secret_file),
                ("review.signing_key_file", &self.review.signing_key_file),
            ],
        };
        for (key, path) in must_exist {
            if !path.is_file() {
                errors.push(format!("{key}: file {} does not exist", path.display()));
            }
        }
        for (i, crl) in self.tls.crls.iter().enumerate() {
            if !crl.is_file() {
                errors.push(format!(
                    "tls.crls[{i}]: file {} does not exist",
                    crl.display()
                ));
            }
        }
        if !self.catalog.dir.is_dir() {
            errors.push(format!(
                "catalog.dir: folder {} does not exist",
                self.catalog.dir.display()
            ));
        }
        if !self.participants.file.is_file() {
            errors.push(format!(
                "participants.file: file {} does not exist",
                self.participants.file.display()
            ));
        }
    }

    /// Path of the SQLite database.
    pub fn database_path(&self) -> PathBuf {
        self.store.data_dir.join("credgate.db")
    }
}

/// Deserializes each top-level section on its own so one bad section does
/// not hide the problems of the others.
fn deserialize_collecting(table: toml::Table, errors: &mut Vec<String>) -> Option<Config> {
    // The sections are those of the configuration itself (its defaults
    // serialised), so a new section needs no second list.
    let known: BTreeMap<String, ()> = toml::Table::try_from(Config::default())
        .map(|t| t.into_iter().map(|(k, _)| (k, ())).collect())
        .unwrap_or_default();
    let mut good = toml::Table::new();
    for (key, value) in table {
        if !known.contains_key(&key) {
            errors.push(format!("{key}: unknown key"));
            continue;
        }
        let mut single = toml::Table::new();
        single.insert(key.clone(), value.clone());
        match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(single)) {
            Ok(_) => {
                good.insert(key, value);
            }
            Err(e) => errors.push(format!("{}: {}", e.path(), e.inner())),
        }
    }
    match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(good)) {
        Ok(c) => Some(c),
        Err(e) => {
            errors.push(format!("{}: {}", e.path(), e.inner()));
            None
        }
    }
}

/// Applies `CREDGATE_A__B=value` as `a.b = value`. Values are read as TOML
/// (numbers, booleans, arrays) and fall back to plain strings.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<String>,
) {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            errors.push(format!("{name}: malformed override name"));
            continue;
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        if let Err(p) = insert_path(table, &path, value) {
            errors.push(format!("{name}: {p} is not a section"));
        }
    }
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Ok(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => match table
            .entry(first.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => insert_path(t, rest, value),
            _ => Err(first.clone()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    #[test]
    fn reports_every_problem_at_once() {
        let f = write(
            "[server]\nlisten = \"not an address\"\n[limits]\nmax_body_bytes = 0\n[store]\nbogus = 1\n[nonsense]\n",
        );
        let err = Config::load(f.path(), false, vec![]).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("server.listen"), "{text}");
        assert!(text.contains("store"), "{text}");
        assert!(text.contains("nonsense: unknown key"), "{text}");
        let f = write("[store]\npage_cache_mib = 2000000\n");
        let text = Config::load(f.path(), false, vec![])
            .expect_err("too large")
            .to_string();
        assert!(
            text.contains("store.page_cache_mib: at most 1048576"),
            "{text}"
        );
        let f = write("[store]\nquery_connections = 0\n");
        let text = Config::load(f.path(), false, vec![])
            .expect_err("no query connections")
            .to_string();
        assert!(text.contains("store.query_connections"), "{text}");
        let f = write("[review]\ngrade_backlog_max = 0\n");
        let text = Config::load(f.path(), false, vec![])
            .expect_err("no backlog")
            .to_string();
        assert!(
            text.contains("review.grade_backlog_max: must be greater than 0"),
            "{text}"
        );
    }

    #[test]
    fn mask_is_refused_for_secret_fields() {
        let f = write(
            "[privacy.redaction.secret]\npublic = \"drop\"\nshared = \"mask\"\nrestricted = \"mask\"\n",
        );
        let err = Config::load(f.path(), false, vec![]).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("privacy.redaction.secret.shared"), "{text}");
        assert!(
            text.contains("privacy.redaction.secret.restricted"),
            "{text}"
        );
        assert!(!text.contains("privacy.redaction.secret.public"), "{text}");
        // Masking restricted fields (names) stays allowed.
        let f = write("[privacy.redaction.restricted]\npublic = \"drop\"\nshared = \"mask\"\n");
        let text = Config::load(f.path(), false, vec![])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!text.contains("privacy.redaction"), "{text}");
    }

    #[test]
    fn env_overrides_file() {
        let f = write("[server]\nlisten = \"127.0.0.1:1000\"\n");
        let env = vec![
            (
                "CREDGATE_SERVER__LISTEN".to_string(),
                "127.0.0.1:2000".to_string(),
            ),
            (
                "CREDGATE_LIMITS__MAX_BATCH_RECORDS".to_string(),
                "7".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ];
        // Catalog/participants folders do not exist relative to the test's
        // working directory in every layout; only check the overrides.
        let mut errors = Vec::new();
        let mut table: toml::Table = std::fs::read_to_string(f.path())
            .expect("read")
            .parse()
            .expect("toml");
        apply_env(&mut table, env, &mut errors);
        let c = deserialize_collecting(table, &mut errors).expect("config");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.server.listen.port(), 2000);
        assert_eq!(c.limits.max_batch_records, 7);
    }
}
