//! The code checks: unified social credit codes and resident identity
//! numbers, as submitted and normalised. No panic; what passes has the
//! shape the check promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &str| {
    let today = time::macros::date!(2026 - 11 - 28);
    if credgate::codes::check_uscc(data).is_ok() {
        assert_eq!(data.len(), 18, "a valid USCC has 18 characters");
        assert!(data.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
    if credgate::codes::check_resident_id(data, today).is_ok() {
        assert_eq!(data.len(), 18, "a valid resident ID has 18 characters");
        assert!(data[..17].bytes().all(|b| b.is_ascii_digit()));
    }
    let _ = credgate::codes::resident_id_warnings(data);
    for legacy in [false, true] {
        let mut record = json!({
            "uscc": data,
            "id_type": "resident_id",
            "id_number": data,
            "legal_representative_id_type": "resident_id",
            "legal_representative_id_number": data,
        });
        let _ = credgate::ingest::normalise_codes(&mut record, legacy);
    }
});
