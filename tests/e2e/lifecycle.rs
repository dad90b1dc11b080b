//! A record's life: duplicates and natural keys, removal from a list,
//! graded measures.

use serde_json::{json, Value};

use credgate::synth;

use crate::notices::{ids, pull_all, pull_sub, record_about, submit};
use crate::support::{Client, Env, Server};

/// Posts a batch and returns the answer document (status 200 asserted).
async fn batch(client: &Client, item: &str, records: Vec<Value>) -> Value {
    let resp = client
        .post_json("/v1/records", &json!({"item": item, "records": records}))
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    resp.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_is_a_duplicate_and_a_changed_resend_needs_a_correction() {
    let env = Env::new();
    env.subscribe(&pull_sub("proc-pull", "agency-procurement", ""));
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let agency = env.client(server.addr, "agency-procurement");

    let original = record_about("administrative_penalty", "legal_entity", "serious");
    let first = submit(&dept, "administrative_penalty", original.clone()).await;
    let record_id = first["record_id"].as_str().expect("record id").to_owned();
    assert!(first["notice_id"].is_string());

    // The same record again, its fields in another order: a duplicate.
    let mut reordered = String::from("{\"item\":\"administrative_penalty\",\"records\":[{");
    let fields: Vec<String> = original
        .as_object()
        .expect("object")
        .iter()
        .rev()
        .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
        .collect();
    reordered.push_str(&fields.join(","));
    reordered.push_str("}]}");
    let resp = dept
        .send(
            "POST",
            "/v1/records",
            &[("content-type", "application/json")],
            reordered.into_bytes(),
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 200);
    let doc = resp.json();
    assert_eq!(doc["accepted"], 0, "{doc:#}");
    assert_eq!(doc["duplicates"], 1);
    assert_eq!(doc["results"][0]["status"], "duplicate");
    assert_eq!(doc["results"][0]["record_id"], record_id.as_str());
    assert!(doc["results"][0].get("notice_id").is_none());

    // One batch: the duplicate again, the same decision with other facts,
    // a new decision, and that new decision twice.
    let mut changed = original.clone();
    changed["penalty_content"] = json!("一、警告；二、罚款人民币叁万元。");
    let mut fresh = original.clone();
    fresh["decision_number"] = json!("榕市监罚〔2026〕77777号");
    let doc = batch(
        &dept,
        "administrative_penalty",
        vec![original.clone(), changed, fresh.clone(), fresh.clone()],
    )
    .await;
    assert_eq!(
        (&doc["accepted"], &doc["duplicates"], &doc["rejected"]),
        (&json!(1), &json!(2), &json!(1)),
        "{doc:#}"
    );
    let results = doc["results"].as_array().expect("results");
    assert_eq!(results[0]["status"], "duplicate");
    assert_eq!(results[0]["record_id"], record_id.as_str());
    assert_eq!(results[1]["status"], "rejected");
    let pointers: Vec<&str> = results[1]["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            assert_eq!(e["code"], "duplicate_key");
            assert!(e["message"].as_str().expect("message").contains(&record_id));
            e["pointer"].as_str().expect("pointer")
        })
        .collect();
    assert_eq!(
        pointers,
        ["/records/1/authority_uscc", "/records/1/decision_number"]
    );
    assert_eq!(results[2]["status"], "accepted");
    assert_eq!(results[3]["status"], "duplicate");
    assert_eq!(results[3]["record_id"], results[2]["record_id"]);

    // Two records stored, two notices: a resend punishes nobody twice.
    assert_eq!(env.count_rows("records"), 2);
    let (notices, _, _) = pull_all(&agency, "0").await;
    assert_eq!(
        ids(&notices),
        [
            first["notice_id"].as_str().expect("id").to_owned(),
            results[2]["notice_id"].as_str().expect("id").to_owned()
        ]
    );

    // Another provider's record of the same decision: refused without
    // naming a record the caller cannot see.
    let mut other = original.clone();
    other["penalty_content"] = json!("另一内容");
    let doc = batch(
        &env.client(server.addr, "dept-tax"),
        "administrative_penalty",
        vec![other],
    )
    .await;
    let error = &doc["results"][0]["errors"][0];
    assert_eq!(doc["results"][0]["status"], "rejected", "{doc:#}");
    assert_eq!(error["code"], "duplicate_key");
    assert!(!error["message"].as_str().expect("m").contains(&record_id));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_case_x_is_normalised_and_records_without_a_key_match_by_content() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");

    let n = (0..1000)
        .find(|&n| synth::resident_id(n).ends_with('X'))
        .expect("an ID with check character X");
    let mut person = synth::record("administrative_penalty", 5, "general");
    let obj = person.as_object_mut().expect("object");
    obj.retain(|k, _| !k.starts_with("legal_representative") && k != "uscc");
    obj.insert("subject_type".into(), json!("natural_person"));
    obj.insert("id_type".into(), json!("resident_id"));
    obj.insert(
        "id_number".into(),
        json!(synth::resident_id(n).to_lowercase()),
    );
    let doc = batch(&dept, "administrative_penalty", vec![person.clone()]).await;
    let result = &doc["results"][0];
    assert_eq!(result["status"], "accepted", "{doc:#}");
    assert_eq!(result["warnings"][0]["code"], "normalised_check_character");
    assert_eq!(result["warnings"][0]["pointer"], "/records/0/id_number");
    let body = serde_json::to_string(&doc).expect("json");
    assert!(
        !body.contains(&synth::resident_id(n)[..10]),
        "no ID in answers"
    );
    // Sent again with the upper-case X: the same record.
    person["id_number"] = json!(synth::resident_id(n));
    let doc = batch(&dept, "administrative_penalty", vec![person]).await;
    assert_eq!(doc["results"][0]["status"], "duplicate", "{doc:#}");
    assert_eq!(doc["results"][0]["record_id"], result["record_id"]);

    // A commitment without a commitment number has no natural key: an
    // identical resend is a duplicate, a different one a new record.
    let mut commitment = synth::record("credit_commitment", 3, "");
    commitment
        .as_object_mut()
        .expect("object")
        .remove("commitment_number");
    let doc = batch(
        &dept,
        "credit_commitment",
        vec![commitment.clone(), commitment.clone()],
    )
    .await;
    assert_eq!(doc["results"][1]["status"], "duplicate", "{doc:#}");
    commitment["commitment_date"] = json!("2026-08-21");
    let doc = batch(&dept, "credit_commitment", vec![commitment]).await;
    assert_eq!(doc["results"][0]["status"], "accepted", "{doc:#}");
    assert_eq!(env.count_rows("records"), 3);
    server.stop().await;
}
