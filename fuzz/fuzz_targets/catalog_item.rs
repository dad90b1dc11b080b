//! Catalog item documents as an administrator PUTs them: parsed, compiled
//! (schema, field classes, rules, notice and removal rules), and, when
//! they compile, used to validate a record. No panic.
#![no_main]

use credgate::catalog::{CatalogItem, ItemDefinition};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(def) = serde_json::from_slice::<ItemDefinition>(data) else {
        return;
    };
    if let Ok(item) = CatalogItem::compile(def, &|_| true) {
        let record = credgate::synth::record("administrative_penalty", 1, "serious");
        let v = item.validate(&record, 20);
        assert!(v.errors.len() <= 21);
        let _ = item.derive_notice(&record);
    }
});
