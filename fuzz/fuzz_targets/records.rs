//! A request body through the parsing and validation path: the bounded
//! JSON parser, code normalisation and every catalog item's validation.
//! No panic; no answer larger than the documented bound (`max_findings`
//! errors per record, plus one that counts the rest).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use credgate::catalog::Catalog;
use credgate::config::LimitsConfig;
use libfuzzer_sys::fuzz_target;

const MAX_FINDINGS: usize = 20;

fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs/credit");
        Catalog::load_dir(&dir, &|_| true).expect("shipped catalog")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = credgate::http::parse_json(data, &LimitsConfig::default()) else {
        return;
    };
    let records: Vec<serde_json::Value> = match doc.get("records") {
        Some(serde_json::Value::Array(r)) => r.clone(),
        _ => vec![doc],
    };
    for record in records.into_iter().take(4) {
        for item in catalog().items() {
            let mut r = record.clone();
            let _ = credgate::ingest::normalise_codes(&mut r, false);
            let v = item.validate(&r, MAX_FINDINGS);
            assert!(
                v.errors.len() <= MAX_FINDINGS + 1,
                "{} errors",
                v.errors.len()
            );
            let _ = item.derive_notice(&r);
            let _ = item.decision_date(&r);
            let _ = item.effective_until(&r);
        }
    }
});
