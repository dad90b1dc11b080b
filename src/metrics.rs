//! Prometheus metrics, served on the operations listener at `/metrics`.
//!
//! One registry per gateway, shared by its parts through an `Arc`; the
//! request path only touches atomic counters. Labels never carry record
//! data: routes are matched paths, items and outcomes are from fixed sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Route and status of an answered request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Matched route, e.g. `/v1/records/{record_id}`.
    pub route: String,
    /// HTTP status.
    pub status: u16,
}

/// Route of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Matched route.
    pub route: String,
}

/// Item and outcome of a submitted record.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    /// Catalog item.
    pub item: String,
    /// `accepted` or `rejected`.
    pub outcome: &'static str,
}

/// Outcome of a push attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    /// `delivered`, `retry`, `dead`, `deferred`.
    pub outcome: &'static str,
}

/// Who asked for a credit review, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// The asking participant.
    pub agency: String,
    /// Purpose code.
    pub purpose: &'static str,
}

/// Why a connection ended before HTTP.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `refused` (certificate, protocol) or `timeout`.
    pub reason: &'static str,
}

/// Every metric of the gateway.
pub struct Metrics {
    registry: Registry,
    /// Answered requests by route and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Request duration by route.
    pub http_duration: Family<RouteLabels, Histogram>,
    /// Records by item and outcome.
    pub records: Family<RecordLabels, Counter>,
    /// Push attempts by outcome.
    pub push_attempts: Family<PushLabels, Counter>,
    /// Credit review reports issued, by agency and purpose.
    pub credit_reviews: Family<ReviewLabels, Counter>,
    /// TLS handshakes that did not complete.
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    /// Connections open now.
    pub connections: Gauge,
    /// Store commits (groups) and jobs committed in them.
    pub store_commits: Counter,
    /// Jobs per commit group.
    pub store_group_size: Histogram,
    /// Subjects whose credit grade was assessed (and stored).
    pub grade_assessments: Counter,
    /// Stored grades that changed.
    pub grade_changes: Counter,
    /// Changed subjects waiting for the grader.
    pub grade_backlog: Gauge,
    /// Subject changes not queued for grading (backlog full).
    pub grade_backlog_overflows: Counter,
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Metrics {
        build()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn build() -> Metrics {
    let mut registry = Registry::with_prefix("credgate");
    let http_requests = Family::<HttpLabels, Counter>::default();
    registry.register(
        "http_requests",
        "Requests answered, by route and status",
        http_requests.clone(),
    );
    let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(
        duration_histogram as fn() -> Histogram,
    );
    registry.register(
        "http_request_duration_seconds",
        "Request duration by route",
        http_duration.clone(),
    );
    let records = Family::<RecordLabels, Counter>::default();
    registry.register(
        "records",
        "Submitted records by catalog item and outcome",
        records.clone(),
    );
    let push_attempts = Family::<PushLabels, Counter>::default();
    registry.register(
        "push_attempts",
        "Push delivery attempts by outcome",
        push_attempts.clone(),
    );
    let credit_reviews = Family::<ReviewLabels, Counter>::default();
    registry.register(
        "credit_reviews",
        "Credit review reports issued, by asking agency and purpose",
        credit_reviews.clone(),
    );
    let handshake_failures = Family::<HandshakeLabels, Counter>::default();
    registry.register(
        "tls_handshake_failures",
        "TLS handshakes that did not complete",
        handshake_failures.clone(),
    );
    let connections = Gauge::default();
    registry.register(
        "connections",
        "Client connections open now",
        connections.clone(),
    );
    let store_commits = Counter::default();
    registry.register(
        "store_commits",
        "Store commit groups (one fsync each)",
        store_commits.clone(),
    );
    let grade_assessments = Counter::default();
    registry.register(
        "grade_assessments",
        "Subjects whose credit grade was assessed and stored",
        grade_assessments.clone(),
    );
    let grade_changes = Counter::default();
    registry.register(
        "grade_changes",
        "Stored credit grades that changed",
        grade_changes.clone(),
    );
    let grade_backlog = Gauge::default();
    registry.register(
        "grade_backlog",
        "Subjects changed on this instance whose credit grade waits to be assessed",
        grade_backlog.clone(),
    );
    let grade_backlog_overflows = Counter::default();
    registry.register(
        "grade_backlog_overflows",
        "Subject changes not queued because the grading backlog was full (every subject with an ungraded change is then assessed)",
        grade_backlog_overflows.clone(),
    );
    let store_group_size = Histogram::new(exponential_buckets(1.0, 2.0, 11));
    registry.register(
        "store_group_size",
        "Jobs committed per group",
        store_group_size.clone(),
    );
    Metrics {
        registry,
        http_requests,
        http_duration,
        records,
        push_attempts,
        credit_reviews,
        handshake_failures,
        connections,
        store_commits,
        grade_assessments,
        grade_changes,
        grade_backlog,
        grade_backlog_overflows,
        store_group_size,
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}
