//! Micro-benchmarks of the domain steps on the request path: record
//! validation per catalog item, code checks, redaction per clearance, and
//! routing over 100 subscriptions. `cargo bench -p credgate-load-tests`.

use std::path::Path;
use std::sync::Arc;

use credgate::catalog::{Catalog, FieldClass, NoticeType, Severity, SubjectType};
use credgate::participants::{Kind, Participant, Registry};
use credgate::redact::{Policy, RecordBody, Redactor};
use credgate::routing::{NoticeFacts, SubscriptionSpec, Subscriptions};
use credgate::store::{NoticeKind, StoredNotice};
use credgate::{codes, synth};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde_json::json;

fn catalog() -> Catalog {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs/credit");
    Catalog::load_dir(&dir, &|_| true).expect("shipped catalog compiles")
}

fn validation(c: &mut Criterion) {
    let catalog = catalog();
    let mut g = c.benchmark_group("validate");
    for id in synth::ITEMS {
        let item = catalog.get(id).expect("item").clone();
        let record = synth::record(id, 2, "serious");
        g.bench_with_input(BenchmarkId::from_parameter(id), &record, |b, r| {
            b.iter(|| item.validate(r, 20))
        });
    }
    g.finish();
}

fn code_checks(c: &mut Criterion) {
    let uscc = synth::uscc("91320100", 7);
    let rid = synth::resident_id(7);
    let today = codes::today_cst();
    c.bench_function("codes/uscc", |b| {
        b.iter(|| codes::check_uscc(std::hint::black_box(&uscc)))
    });
    c.bench_function("codes/resident_id", |b| {
        b.iter(|| codes::check_resident_id(std::hint::black_box(&rid), today))
    });
}

fn redaction(c: &mut Criterion) {
    let catalog = catalog();
    let item = catalog.get("serious_dishonesty").expect("item").clone();
    let record = (0..100)
        .map(|n| synth::record("serious_dishonesty", n, ""))
        .find(|r| r["subject_type"] == "natural_person")
        .expect("a natural person");
    let body = RecordBody::from_store(record);
    let notice = StoredNotice {
        notice_id: "01a21d1a-0000-7000-8000-000000000000".into(),
        kind: NoticeKind::Punishment,
        item: "serious_dishonesty".into(),
        item_version: 1,
        record_id: "01a21d1a-0000-7000-8000-000000000001".into(),
        source: "dept-court".into(),
        severity: Severity::Serious,
        measures: vec![
            "restrict_government_procurement".into(),
            "restrict_high_consumption".into(),
        ],
        effective_from: codes::parse_iso_date("2026-11-02"),
        effective_until: codes::parse_iso_date("2029-11-01"),
        issued_at: time::OffsetDateTime::now_utc(),
        lifts: None,
        reason: None,
        corrects: None,
        historical: false,
        grade: None,
    };
    let redactor = Redactor::new(
        Policy::default(),
        Arc::from(&b"bench-secret-bench-secret-bench-secret"[..]),
    );
    let mut g = c.benchmark_group("redact_notice");
    for clearance in [
        FieldClass::Public,
        FieldClass::Shared,
        FieldClass::Restricted,
    ] {
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{clearance:?}")),
            &clearance,
            |b, cl| {
                b.iter(|| {
                    serde_json::to_vec(&redactor.notice_view(
                        Some(&item),
                        &notice,
                        &body,
                        *cl,
                        None,
                    ))
                })
            },
        );
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    let catalog = catalog();
    let agencies: Vec<Participant> = (0..100)
        .map(|i| {
            serde_json::from_value(json!({"id": format!("agency-{i:03}"), "kind": "agency", "name": "a", "name_zh": "机构", "clearance": "shared"}))
                .expect("participant")
        })
        .chain(["dept-market", "dept-tax", "dept-ecology", "dept-court"].map(|d| Participant {
            id: d.into(),
            kind: Kind::Department,
            name: d.into(),
            name_zh: "部门".into(),
            region: None,
            clearance: FieldClass::Public,
            implements: vec![],
            quota: None,
            enabled: true,
            certificate_sha256: vec![],
        }))
        .collect();
    let registry = Registry::from_participants(agencies).expect("registry");
    let specs: Vec<SubscriptionSpec> = (0..100)
        .map(|i| {
            serde_json::from_value(json!({
                "id": format!("sub-{i:03}"), "agency": format!("agency-{i:03}"), "mode": "pull",
                "items": if i % 2 == 0 { json!(["serious_dishonesty"]) } else { json!([]) },
                "min_severity": if i % 3 == 0 { "serious" } else { "minor" },
                "regions": if i % 5 == 0 { json!(["3201"]) } else { json!([]) },
            }))
            .expect("spec")
        })
        .collect();
    let subs = Subscriptions::build(specs, &registry, &catalog).expect("subscriptions");
    let facts = NoticeFacts {
        item: "serious_dishonesty",
        notice_type: NoticeType::Punishment,
        severity: Severity::Serious,
        subject_type: Some(SubjectType::LegalEntity),
        region: Some("320102"),
    };
    c.bench_function("route/100_subscriptions", |b| {
        b.iter(|| subs.route(std::hint::black_box(&facts)).len())
    });
}

criterion_group!(benches, validation, code_checks, redaction, routing);
criterion_main!(benches);
