//! Redaction of arbitrary record bodies for every item and clearance, and
//! for the public channel: never a field above the clearance in clear
//! (a field above it is dropped, masked or pseudonymised, so its value
//! differs), never a non-public field on the public channel.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use credgate::catalog::{Catalog, FieldClass, SubjectType};
use credgate::redact::{Audience, Policy, RecordBody, Redactor};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn fixtures() -> &'static (Catalog, Redactor) {
    static F: OnceLock<(Catalog, Redactor)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs/credit");
        (
            Catalog::load_dir(&dir, &|_| true).expect("shipped catalog"),
            Redactor::new(Policy::default(), Arc::from(&[7u8; 32][..])),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Some(original) = body.as_object() else {
        return;
    };
    let (catalog, redactor) = fixtures();
    let subject_type = original
        .get("subject_type")
        .cloned()
        .and_then(|v| serde_json::from_value::<SubjectType>(v).ok());
    let stored = RecordBody::from_store(body.clone());
    for item in catalog.items() {
        for clearance in [
            FieldClass::Public,
            FieldClass::Shared,
            FieldClass::Restricted,
        ] {
            let view = redactor.record_view(Some(item), &stored, Audience::Cleared(clearance));
            let view = serde_json::to_value(&view).expect("view");
            for (k, v) in view.as_object().into_iter().flatten() {
                if item.class_of(k, subject_type) > clearance {
                    assert_ne!(Some(v), original.get(k), "{k} above {clearance:?} in clear");
                }
            }
        }
        let public = serde_json::to_value(redactor.public_view(Some(item), &stored)).expect("view");
        for k in public.as_object().into_iter().flatten().map(|(k, _)| k) {
            let masked_name =
                k == "subject_name" && subject_type == Some(SubjectType::NaturalPerson);
            assert!(
                item.class_of(k, subject_type) == FieldClass::Public || masked_name,
                "{k} on the public channel"
            );
        }
    }
});
