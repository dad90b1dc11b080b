//! Credit review reports: what binds which agency for which purpose,
//! persons matched by ID number without it ever coming back, signatures
//! that verify offline, who looked a subject up.

use serde_json::{json, Value};

use credgate::synth;

use crate::support::{credgate_cli, submit_one as submit, Client, Env, Server};

/// A legal entity of the tests (not produced by the synthetic generator's
/// numbering used elsewhere).
fn firm() -> (String, Value) {
    let uscc = synth::uscc("91320100", 9_001);
    let subject = json!({
        "subject_name": "南京审查测试建设工程有限公司",
        "subject_type": "legal_entity",
        "uscc": uscc,
        "legal_representative": "周审查",
        "legal_representative_id_type": "resident_id",
        "legal_representative_id_number": synth::resident_id(9_001),
    });
    (uscc, subject)
}

fn with(subject: &Value, record: Value) -> Value {
    let mut r = record;
    for key in [
        "subject_name",
        "subject_type",
        "uscc",
        "legal_representative",
        "legal_representative_id_type",
        "legal_representative_id_number",
        "id_type",
        "id_number",
    ] {
        r.as_object_mut().expect("object").remove(key);
    }
    let mut out = subject.clone();
    out.as_object_mut()
        .expect("object")
        .extend(r.as_object().expect("object").clone());
    out
}

async fn review(client: &Client, subject: Value, purpose: &str) -> (Value, Vec<u8>) {
    let resp = client
        .post_json(
            "/v1/credit-reviews",
            &json!({"subject": subject, "purpose": purpose}),
        )
        .await;
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    let body = resp.body.to_vec();
    (resp.json(), body)
}

fn restriction_ids(doc: &Value) -> Vec<String> {
    let mut ids: Vec<String> = doc["report"]["restrictions"]
        .as_array()
        .expect("restrictions")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_lists_what_binds_the_asking_agency_for_its_purpose() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let court = env.client(server.addr, "dept-court");
    let market = env.client(server.addr, "dept-market");
    let procurement = env.client(server.addr, "agency-procurement");
    let finance = env.client(server.addr, "agency-finance");
    let (uscc, subject) = firm();

    // A clean subject: nothing restricts anyone.
    let (doc, _) = review(
        &procurement,
        json!({"uscc": uscc}),
        "government_procurement",
    )
    .await;
    assert_eq!(doc["report"]["restricted"], false, "{doc:#}");
    assert_eq!(doc["report"]["records_in_effect"], json!([]));

    // A court judgment defaulter listing and a general penalty.
    let mut listing = with(&subject, synth::record("serious_dishonesty", 9_001, ""));
    listing["list_kind"] = json!("dishonest_judgment_debtor");
    let listing_id = submit(&court, "serious_dishonesty", listing).await;
    let penalty = with(
        &subject,
        synth::record("administrative_penalty", 9_001, "general"),
    );
    let penalty_id = submit(&market, "administrative_penalty", penalty).await;
    // And an ended one: revoked penalties are listed as ended, without
    // their content.
    let revoked = with(
        &subject,
        synth::record("administrative_penalty", 9_002, "serious"),
    );
    let revoked_id = submit(&market, "administrative_penalty", revoked).await;
    let resp = market
        .post_json(
            &format!("/v1/records/{revoked_id}/revocation"),
            &json!({"reason": "revoked"}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));

    // The procurement centre, for a procurement: exactly the procurement
    // measure, with its legal basis and the listing behind it.
    let (doc, _) = review(
        &procurement,
        json!({"uscc": uscc}),
        "government_procurement",
    )
    .await;
    let procurement_doc = doc.clone();
    let report = &doc["report"];
    assert_eq!(report["restricted"], true, "{doc:#}");
    assert_eq!(restriction_ids(&doc), ["restrict_government_procurement"]);
    let measure = &report["restrictions"][0];
    assert!(measure["legal_basis"]
        .as_str()
        .is_some_and(|b| b.contains("政府采购法")));
    assert_eq!(measure["records"], json!([listing_id]));
    assert_eq!(report["subject"]["uscc"], uscc);
    assert_eq!(
        report["subject"]["subject_name"],
        "南京审查测试建设工程有限公司"
    );
    let in_force: Vec<&str> = report["records_in_effect"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["record_id"].as_str().expect("id"))
        .collect();
    assert!(in_force.contains(&listing_id.as_str()) && in_force.contains(&penalty_id.as_str()));
    // Each record with its own level, a general penalty (no notice) too.
    let level_of = |id: &str| {
        report["records_in_effect"]
            .as_array()
            .expect("records")
            .iter()
            .find(|r| r["record_id"] == id)
            .map(|r| r["level"].clone())
    };
    assert_eq!(level_of(&penalty_id), Some(json!("general")), "{doc:#}");
    assert_eq!(level_of(&listing_id), Some(json!("serious")), "{doc:#}");
    assert!(!in_force.contains(&revoked_id.as_str()));
    let ended = report["ended_records"].as_array().expect("ended");
    assert_eq!(ended.len(), 1, "{doc:#}");
    assert_eq!(ended[0]["record_id"], revoked_id);
    assert_eq!(ended[0]["end_reason"], "revoked");
    assert!(
        ended[0].get("record").is_none(),
        "no content of ended records"
    );
    // The court-only measure is in the listing's measures, but binds no
    // procurement.
    assert!(report["records_in_effect"]
        .as_array()
        .expect("records")
        .iter()
        .any(|r| r["measures"]
            .as_array()
            .is_some_and(|m| m.contains(&json!("restrict_high_consumption")))));

    // The finance department, for fiscal funds: its own measures only.
    let (doc, _) = review(&finance, json!({"uscc": uscc}), "fiscal_funds").await;
    assert_eq!(
        restriction_ids(&doc),
        ["prudent_credit_review", "restrict_public_funding"]
    );
    // The finance department asked about a procurement: nothing of its own.
    let (doc, _) = review(&finance, json!({"uscc": uscc}), "government_procurement").await;
    assert_eq!(doc["report"]["restricted"], false, "{doc:#}");
    // Redacted for each asker: the representative's ID number (secret)
    // never leaves in clear, and shared-clearance finance gets no
    // restricted field.
    for doc in [&doc, &procurement_doc] {
        let text = serde_json::to_string(doc).expect("json");
        assert!(!text.contains(&synth::resident_id(9_001)[..10]), "{text}");
    }
    assert!(doc["report"]["records_in_effect"][0]["record"]
        .get("legal_representative_id_number")
        .is_none_or(|v| v.as_str().is_some_and(|p| p.starts_with("pid:"))));

    // The report is kept for the agency that asked, and no one else.
    let id = doc["report"]["report_id"].as_str().expect("id").to_owned();
    let again = finance.get(&format!("/v1/credit-reviews/{id}")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json(), doc);
    let other = procurement.get(&format!("/v1/credit-reviews/{id}")).await;
    assert_eq!(other.status, 404);
    assert_eq!(other.json()["code"], "review_not_found");

    // Who looked the subject up, newest first; audited.
    let admin = env.client(server.addr, "admin-credit-office");
    let resp = admin
        .post_json(
            "/admin/v1/credit-reviews/lookup",
            &json!({"subject": {"uscc": uscc}}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let reviews = resp.json()["reviews"].as_array().expect("reviews").clone();
    assert_eq!(reviews.len(), 4);
    assert_eq!(reviews[0]["report_id"], id);
    assert_eq!(reviews[0]["agency"], "agency-finance");
    assert_eq!(reviews[0]["purpose"], "government_procurement");
    let audit = admin.get("/admin/v1/audit?limit=1000").await.json();
    let entries: Vec<&Value> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "credit_review")
        .collect();
    assert_eq!(entries.len(), 4);
    assert!(entries
        .iter()
        .any(|e| e["subject"] == id.as_str() && e["actor"] == "agency-finance"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_is_matched_by_id_number_which_never_comes_back() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let market = env.client(server.addr, "dept-market");
    let procurement = env.client(server.addr, "agency-procurement");
    let n = (0..1000)
        .find(|&n| synth::resident_id(n).ends_with('X'))
        .expect("an ID with check character X");
    let number = synth::resident_id(n);
    let person = json!({
        "subject_name": "王审查",
        "subject_type": "natural_person",
        "id_type": "resident_id",
        "id_number": number,
    });
    let penalty = with(
        &person,
        synth::record("administrative_penalty", 9_101, "serious"),
    );
    let record_id = submit(&market, "administrative_penalty", penalty).await;
    // Someone else with a record of their own.
    let other = json!({
        "subject_name": "李其他",
        "subject_type": "natural_person",
        "id_type": "resident_id",
        "id_number": synth::resident_id(n + 1),
    });
    submit(
        &market,
        "administrative_penalty",
        with(
            &other,
            synth::record("administrative_penalty", 9_102, "serious"),
        ),
    )
    .await;

    // Asked with the lower-case x a clerk may type.
    let (doc, body) = review(
        &procurement,
        json!({"id_type": "resident_id", "id_number": number.to_lowercase(), "name": "王审查"}),
        "government_procurement",
    )
    .await;
    let report = &doc["report"];
    let ids: Vec<&Value> = report["records_in_effect"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| &r["record_id"])
        .collect();
    assert_eq!(ids, [&json!(record_id)], "{doc:#}");
    assert_eq!(report["restricted"], true);
    assert_eq!(report["subject"]["matched_by"], "id_number");
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains(&number[..10]) && !text.contains(&number.to_lowercase()[..10]));
    // Records carry the keyed pseudonym, as notices do, never the number.
    let record = &report["records_in_effect"][0]["record"];
    assert!(
        record["id_number"]
            .as_str()
            .is_some_and(|p| p.starts_with("pid:")),
        "{record:#}"
    );

    // A number that is no resident ID: a 400 that names the field, not
    // the value.
    let bad = format!("{}0", &number[..17]);
    let resp = procurement
        .post_json(
            "/v1/credit-reviews",
            &json!({"subject": {"id_type": "resident_id", "id_number": bad}, "purpose": "fiscal_funds"}),
        )
        .await;
    assert_eq!(resp.status, 400);
    let problem = resp.json();
    assert_eq!(problem["code"], "invalid_review_request");
    assert_eq!(problem["errors"][0]["pointer"], "/subject/id_number");
    assert!(!String::from_utf8_lossy(&resp.body).contains(&bad[..10]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signature_verifies_offline_and_fails_after_a_change() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let procurement = env.client(server.addr, "agency-procurement");
    let (uscc, _) = firm();
    let (_, body) = review(&procurement, json!({"uscc": uscc}), "honours_and_awards").await;
    let keys = procurement.get("/v1/credit-reviews/keys").await;
    assert_eq!(keys.status, 200);
    let dir = env.root.path();
    let (report, key_file) = (dir.join("report.json"), dir.join("keys.json"));
    std::fs::write(&report, &body).expect("write");
    std::fs::write(&key_file, &keys.body).expect("write");
    let verify = |file: &std::path::Path| {
        credgate_cli(&[
            "review",
            "verify",
            file.to_str().expect("path"),
            "--keys",
            key_file.to_str().expect("path"),
        ])
    };
    let (code, out) = verify(&report);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("signature valid"), "{out}");
    // One changed byte inside the report: "restricted":false → "restricted":fals0 is
    // no JSON; change a digit of the issue time instead, which stays JSON.
    let text = String::from_utf8(body.clone()).expect("utf-8");
    let at = text.find("\"issued_at\":\"").expect("issued_at") + "\"issued_at\":\"".len() + 3;
    let mut changed = body.clone();
    changed[at] = if changed[at] == b'9' { b'8' } else { b'9' };
    std::fs::write(&report, &changed).expect("write");
    let (code, out) = verify(&report);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("INVALID"), "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_requests_are_checked() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let procurement = env.client(server.addr, "agency-procurement");
    let (uscc, _) = firm();
    let cases = [
        (json!({"subject": {"uscc": uscc}}), "/purpose"),
        (
            json!({"subject": {"uscc": uscc}, "purpose": "bribery"}),
            "/purpose",
        ),
        (
            json!({"subject": {"uscc": uscc}, "purpose": "other"}),
            "/purpose_detail",
        ),
        (
            json!({"subject": {"uscc": "913201000000000000"}, "purpose": "fiscal_funds"}),
            "/subject/uscc",
        ),
        (
            json!({"subject": {"uscc": uscc, "id_number": "x"}, "purpose": "fiscal_funds"}),
            "/subject",
        ),
        (json!({"purpose": "fiscal_funds"}), "/subject"),
        (
            json!({"subject": {"uscc": uscc}, "purpose": "fiscal_funds", "extra": 1}),
            "/extra",
        ),
    ];
    for (body, pointer) in cases {
        let resp = procurement.post_json("/v1/credit-reviews", &body).await;
        assert_eq!(resp.status, 400, "{body}");
        let problem = resp.json();
        assert_eq!(problem["code"], "invalid_review_request", "{problem:#}");
        assert_eq!(problem["errors"][0]["pointer"], pointer, "{problem:#}");
    }
    // Departments submit; they do not review.
    let dept = env.client(server.addr, "dept-market");
    let resp = dept
        .post_json(
            "/v1/credit-reviews",
            &json!({"subject": {"uscc": uscc}, "purpose": "fiscal_funds"}),
        )
        .await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.json()["code"], "reviewers_only");
    // Only administrators look up who asked.
    let resp = procurement
        .post_json(
            "/admin/v1/credit-reviews/lookup",
            &json!({"subject": {"uscc": uscc}}),
        )
        .await;
    assert_eq!(resp.status, 403);
    // Nothing was stored by the refused requests.
    assert_eq!(env.count_rows("credit_reviews"), 0);
    server.stop().await;
}

/// The record of `record_id` in a report's records in effect.
fn in_effect<'a>(doc: &'a Value, record_id: &str) -> Option<&'a Value> {
    doc["report"]["records_in_effect"]
        .as_array()
        .expect("records")
        .iter()
        .find(|r| r["record_id"] == record_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_about_the_subject_reaches_the_next_report_at_once() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let market = env.client(server.addr, "dept-market");
    let admin = env.client(server.addr, "admin-credit-office");
    let (_, subject) = firm();
    let uscc = synth::uscc("91320100", 9_101);
    let mut subject = subject;
    subject["uscc"] = json!(uscc);
    let ask = || review(&admin, json!({"uscc": uscc}), "fiscal_funds");

    // Asked twice: the second answer comes from the subject cache.
    let first = submit(
        &market,
        "administrative_penalty",
        with(
            &subject,
            synth::record("administrative_penalty", 9_101, "general"),
        ),
    )
    .await;
    for _ in 0..2 {
        let (doc, _) = ask().await;
        assert!(in_effect(&doc, &first).is_some(), "{doc:#}");
    }

    // A new penalty is in the very next report.
    let mut record = with(
        &subject,
        synth::record("administrative_penalty", 9_102, "general"),
    );
    let second = submit(&market, "administrative_penalty", record.clone()).await;
    let (doc, _) = ask().await;
    assert!(in_effect(&doc, &second).is_some(), "new record: {doc:#}");

    // A correction: the corrected content.
    record["penalty_content"] = json!("更正后的处罚内容：警告。");
    let resp = market
        .send(
            "PUT",
            &format!("/v1/records/{second}"),
            &[("content-type", "application/json")],
            serde_json::to_vec(&json!({"record": record, "reason": "错字更正"})).expect("json"),
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let (doc, _) = ask().await;
    assert_eq!(
        in_effect(&doc, &second).expect("corrected record")["record"]["penalty_content"],
        "更正后的处罚内容：警告。",
        "{doc:#}"
    );

    // A revocation: out of effect, listed as ended.
    let resp = market
        .post_json(
            &format!("/v1/records/{first}/revocation"),
            &json!({"reason": "revoked"}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let (doc, _) = ask().await;
    assert!(in_effect(&doc, &first).is_none(), "{doc:#}");
    assert_eq!(doc["report"]["ended_records"][0]["record_id"], first);
    server.stop().await;
}
