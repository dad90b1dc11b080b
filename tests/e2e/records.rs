//! `POST /v1/records` and `GET /v1/records/{id}` over real mTLS.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::support::{ops_get, Env, Server};
use credgate::synth;

/// The date field each item keys its decision on.
fn date_field(item: &str) -> &'static str {
    match item {
        "abnormal_operations" | "serious_dishonesty" => "listing_date",
        "credit_commitment" => "commitment_date",
        "red_list" => "award_date",
        _ => "decision_date",
    }
}

/// A record about a legal entity (n = 2 gives one in `synth`).
fn legal_entity_record(item: &str) -> Value {
    let r = synth::record(item, 2, "serious");
    assert_eq!(r["subject_type"], "legal_entity", "synth seed changed");
    r
}

fn batch(item: &str, records: Vec<Value>) -> Value {
    json!({"item": item, "records": records})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_item_accepts_realistic_records_and_rejects_typical_faults() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    for item in synth::ITEMS {
        // Many realistic records, all subject types (the red list's about
        // other subjects than the serious dishonesty list's, which would
        // refuse them).
        let first = if item == "red_list" { 100 } else { 0 };
        let good: Vec<Value> = (first..first + 30)
            .map(|n| synth::record(item, n, "general"))
            .collect();
        let resp = client.post_json("/v1/records", &batch(item, good)).await;
        assert_eq!(
            resp.status,
            200,
            "{item}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        let doc = resp.json();
        assert_eq!(doc["accepted"], 30, "{item}: {doc:#}");
        assert_eq!(doc["rejected"], 0);

        // Typical faults, each with the pointer it must produce.
        let base = legal_entity_record(item);
        let mut faults: Vec<(Value, &str, &str)> = Vec::new();
        let mut f = base.clone();
        f["uscc"] = json!("914403001922038217");
        faults.push((f, "/uscc", "invalid_uscc"));
        let mut f = base.clone();
        f[date_field(item)] = json!("2026-02-30");
        faults.push((f, date_field(item), "invalid_date"));
        let mut f = base.clone();
        f[date_field(item)] = json!("2099-01-01");
        faults.push((f, date_field(item), "date_in_future"));
        let mut f = base.clone();
        f["nickname"] = json!("x");
        faults.push((f, "", "unknown_field"));
        let mut f = base.clone();
        f["subject_name"] = json!("名".repeat(201));
        faults.push((f, "/subject_name", "max_length"));
        let mut f = base.clone();
        f.as_object_mut().expect("object").remove("uscc");
        faults.push((f, "/uscc", "required"));
        let mut f = base.clone();
        f["subject_type"] = json!("individual_business");
        faults.push((f, "/uscc", "pattern"));
        if item != "abnormal_operations" {
            let mut f = base.clone();
            f["subject_type"] = json!("natural_person");
            f["id_type"] = json!("resident_id");
            f["id_number"] = json!("11010519491231002Y");
            faults.push((f, "/id_number", "invalid_resident_id"));
            // Right check character, but no province: refused all the same.
            for body in ["00000019900307123", "99000019900307123"] {
                let mut f = base.clone();
                f["subject_type"] = json!("natural_person");
                f["id_type"] = json!("resident_id");
                let check = credgate::codes::resident_id_check_char(body).expect("digits");
                f["id_number"] = json!(format!("{body}{check}"));
                faults.push((f, "/id_number", "invalid_resident_id"));
            }
        }
        let count = faults.len();
        let records: Vec<Value> = faults.iter().map(|(r, _, _)| r.clone()).collect();
        let resp = client.post_json("/v1/records", &batch(item, records)).await;
        assert_eq!(resp.status, 200, "{item}");
        let doc = resp.json();
        assert_eq!(doc["rejected"], count, "{item}: {doc:#}");
        for (i, (_, pointer, code)) in faults.iter().enumerate() {
            let result = &doc["results"][i];
            assert_eq!(result["status"], "rejected");
            let errors = result["errors"].as_array().expect("errors");
            assert!(
                errors.iter().any(|e| e["code"] == *code
                    && e["pointer"].as_str().is_some_and(|p| p
                        .starts_with(&format!("/records/{i}"))
                        && p.ends_with(pointer))),
                "{item} fault {i}: expected {code} at {pointer}, got {errors:#?}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_specific_rules_hold() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    let mut fine_missing = legal_entity_record("administrative_penalty");
    fine_missing
        .as_object_mut()
        .expect("object")
        .remove("fine_amount");
    let mut zero_fine = legal_entity_record("administrative_penalty");
    zero_fine["fine_amount"] = json!(0);
    let mut late = legal_entity_record("administrative_penalty");
    late["valid_until"] = json!("2020-01-01");
    let mut breached = legal_entity_record("credit_commitment");
    breached["fulfilment_status"] = json!("breached");
    let cases = [
        (
            "administrative_penalty",
            fine_missing,
            "/fine_amount",
            "required",
        ),
        (
            "administrative_penalty",
            zero_fine,
            "/fine_amount",
            "exclusive_minimum",
        ),
        ("administrative_penalty", late, "/valid_until", "date_order"),
        ("credit_commitment", breached, "/breach_date", "required"),
    ];
    for (item, record, pointer, code) in cases {
        let doc = client
            .post_json("/v1/records", &batch(item, vec![record]))
            .await
            .json();
        let errors = doc["results"][0]["errors"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            errors
                .iter()
                .any(|e| e["code"] == code && e["pointer"] == format!("/records/0{pointer}")),
            "{item}: expected {code} at {pointer}: {doc:#}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_records_read_back_and_survive_a_restart() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    let records: Vec<Value> = (0..20)
        .map(|n| synth::record("administrative_penalty", n, "serious"))
        .collect();
    let doc = client
        .post_json(
            "/v1/records",
            &batch("administrative_penalty", records.clone()),
        )
        .await
        .json();
    let ids: Vec<String> = doc["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["record_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 20);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        20,
        "ids are unique"
    );
    server.stop().await;

    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    for (id, original) in ids.iter().zip(&records) {
        let resp = client.get(&format!("/v1/records/{id}")).await;
        assert_eq!(resp.status, 200);
        let doc = resp.json();
        assert_eq!(doc["record_id"], *id);
        assert_eq!(doc["item"], "administrative_penalty");
        assert_eq!(doc["item_version"], 1);
        assert_eq!(doc["submitter"], "dept-market");
        assert_eq!(
            &doc["record"], original,
            "the submitter gets the record back whole"
        );
    }
    // Another department cannot see it; an admin sees it without secret fields.
    let other = env
        .client(server.addr, "dept-tax")
        .get(&format!("/v1/records/{}", ids[2]))
        .await;
    assert_eq!(other.status, 404);
    let admin = env
        .client(server.addr, "admin-credit-office")
        .get(&format!("/v1/records/{}", ids[2]))
        .await
        .json();
    let record = admin["record"].as_object().expect("record");
    assert!(record.contains_key("decision_number"));
    // Secret fields reach a restricted-clearance admin only as pseudonyms.
    let pseudonym = record["legal_representative_id_number"]
        .as_str()
        .expect("pseudonym");
    assert!(pseudonym.starts_with("pid:"), "{admin:#}");
    assert!(
        !String::from_utf8_lossy(&serde_json::to_vec(&admin).expect("json"))
            .contains(&synth::resident_id(3))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_provider_gets_403_and_stores_nothing() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let resp = env
        .client(server.addr, "dept-court")
        .post_json(
            "/v1/records",
            &batch("red_list", vec![synth::record("red_list", 1, "")]),
        )
        .await;
    assert_eq!(resp.status, 403);
    let doc = resp.json();
    assert_eq!(doc["code"], "not_a_provider");
    assert_eq!(doc["errors"][0]["pointer"], "/item");
    // An agency is no provider either.
    let resp = env
        .client(server.addr, "agency-finance")
        .post_json(
            "/v1/records",
            &batch("red_list", vec![synth::record("red_list", 1, "")]),
        )
        .await;
    assert_eq!(resp.status, 403);
    server.stop().await;
    assert_eq!(env.count_rows("records"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_problems_and_leaves_nothing() {
    let env = Env::new();
    let mut env = env;
    env.config.limits.max_body_bytes = 64 * 1024;
    env.config.limits.max_batch_records = 10;
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    let json_ct = [("content-type", "application/json")];
    let one = serde_json::to_vec(&batch("red_list", vec![synth::record("red_list", 1, "")]))
        .expect("json");

    let deep = format!(
        "{{\"item\":\"red_list\",\"records\":[{}1{}]}}",
        "[".repeat(100),
        "]".repeat(100)
    );
    let big = format!(
        "{{\"item\":\"red_list\",\"records\":[{{\"remark\":\"{}\"}}]}}",
        "x".repeat(70 * 1024)
    );
    let many = serde_json::to_vec(&batch(
        "red_list",
        (0..11).map(|n| synth::record("red_list", n, "")).collect(),
    ))
    .expect("json");
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed",
            json_ct.to_vec(),
            b"{\"item\": \"red_list\", \"records\": [".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "not an object",
            json_ct.to_vec(),
            b"[1,2]".to_vec(),
            400,
            "invalid_document",
        ),
        (
            "records not array",
            json_ct.to_vec(),
            br#"{"item":"red_list","records":{}}"#.to_vec(),
            400,
            "invalid_document",
        ),
        (
            "empty batch",
            json_ct.to_vec(),
            br#"{"item":"red_list","records":[]}"#.to_vec(),
            400,
            "empty_batch",
        ),
        (
            "unknown item",
            json_ct.to_vec(),
            br#"{"item":"parking_ticket","records":[{}]}"#.to_vec(),
            404,
            "unknown_item",
        ),
        (
            "too deep",
            json_ct.to_vec(),
            deep.into_bytes(),
            400,
            "too_deep",
        ),
        (
            "too large",
            json_ct.to_vec(),
            big.into_bytes(),
            413,
            "body_too_large",
        ),
        (
            "too many records",
            json_ct.to_vec(),
            many,
            413,
            "too_many_records",
        ),
        (
            "wrong media type",
            vec![("content-type", "text/plain")],
            one.clone(),
            415,
            "unsupported_media_type",
        ),
        (
            "no media type",
            vec![],
            one.clone(),
            415,
            "unsupported_media_type",
        ),
        (
            "bad idempotency key",
            vec![
                ("content-type", "application/json"),
                ("idempotency-key", ""),
            ],
            one.clone(),
            400,
            "invalid_idempotency_key",
        ),
    ];
    for (what, headers, body, status, code) in cases {
        let resp = client
            .send("POST", "/v1/records", &headers, body)
            .await
            .expect("request");
        assert_eq!(
            resp.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(
            resp.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
        let doc = resp.json();
        assert_eq!(doc["code"], code, "{what}");
        assert_eq!(doc["status"], status, "{what}");
        assert!(
            doc["type"].as_str().is_some_and(|t| t.ends_with(code)),
            "{what}"
        );
        assert!(
            doc["title"].is_string() && doc["detail"].is_string(),
            "{what}"
        );
    }
    // Unknown routes and methods are problems too.
    let resp = client.get("/v1/nothing-here").await;
    assert_eq!(
        (resp.status, resp.json()["code"].clone()),
        (404, json!("not_found"))
    );
    let resp = client
        .send("DELETE", "/v1/catalog", &[], bytes::Bytes::new())
        .await
        .expect("request");
    assert_eq!(resp.status, 405);
    let resp = client.get("/v1/records/not-a-uuid").await;
    assert_eq!(resp.status, 404);
    // The server is still healthy and nothing was stored.
    assert_eq!(ops_get(server.ops, "/readyz").await.expect("readyz").0, 200);
    server.stop().await;
    assert_eq!(env.count_rows("records"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_replay_returns_the_first_answer_and_stores_nothing_new() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    let body = serde_json::to_vec(&batch(
        "administrative_licence",
        (0..5)
            .map(|n| synth::record("administrative_licence", n, ""))
            .collect(),
    ))
    .expect("json");
    let headers = [
        ("content-type", "application/json"),
        ("idempotency-key", "batch-2026-11-27-001"),
    ];
    let first = client
        .send("POST", "/v1/records", &headers, body.clone())
        .await
        .expect("first");
    assert_eq!(first.status, 200);
    assert_eq!(first.header("idempotent-replayed"), None);
    // Concurrent and sequential repeats all get the same answer.
    let mut repeats = Vec::new();
    for _ in 0..4 {
        let (client, body) = (client.clone(), body.clone());
        repeats.push(tokio::spawn(async move {
            client.send("POST", "/v1/records", &headers, body).await
        }));
    }
    for r in repeats {
        let r = r.await.expect("join").expect("repeat");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, first.body, "a repeat returns the first response");
        assert_eq!(r.header("idempotent-replayed"), Some("true"));
    }
    // The same key with a different body is refused.
    let other = serde_json::to_vec(&batch(
        "administrative_licence",
        vec![synth::record("administrative_licence", 99, "")],
    ))
    .expect("json");
    let r = client
        .send("POST", "/v1/records", &headers, other)
        .await
        .expect("conflict");
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["code"], "idempotency_key_reused");
    // Another department may use the same key independently.
    let red = serde_json::to_vec(&batch("red_list", vec![synth::record("red_list", 1, "")]))
        .expect("json");
    let r = env
        .client(server.addr, "dept-tax")
        .send("POST", "/v1/records", &headers, red)
        .await
        .expect("other dept");
    assert_eq!(r.json()["accepted"], 1);
    server.stop().await;
    assert_eq!(env.count_rows("records"), 6);

    // The key survives a restart (it is stored with the records).
    let server = Server::start(&env).await;
    let r = env
        .client(server.addr, "dept-market")
        .send("POST", "/v1/records", &headers, body)
        .await
        .expect("after restart");
    assert_eq!(r.body, first.body);
    server.stop().await;
    assert_eq!(env.count_rows("records"), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_department_gets_429_while_another_gets_through() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let flood = env.client(server.addr, "dept-flood");
    let good = env.client(server.addr, "dept-market");
    let mut conn = flood.connect(false).await.expect("connect");
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..30 {
        let r = conn
            .send("GET", "/v1/catalog", &[], bytes::Bytes::new())
            .await
            .expect("flood request");
        if r.status == 429 {
            retry_after = r.header("retry-after").map(str::to_owned);
            assert_eq!(r.json()["code"], "rate_limited");
            assert_eq!(r.header("ratelimit-remaining"), Some("0"));
        }
        statuses.push(r.status);
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        limited >= 20,
        "quota 2/s burst 3 must refuse most of 30 quick requests: {statuses:?}"
    );
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1)));
    // Meanwhile the well-behaved department is not affected.
    let body = batch(
        "administrative_penalty",
        vec![synth::record("administrative_penalty", 7, "general")],
    );
    for _ in 0..10 {
        assert_eq!(good.post_json("/v1/records", &body).await.status, 200);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_non_public_value_appears_in_any_error_body() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    // Faulty values in shared and secret fields, each a recognisable marker.
    let mut person = (0..100)
        .map(|n| synth::record("administrative_penalty", n, "general"))
        .find(|r| r["subject_type"] == "natural_person")
        .expect("synth yields natural persons");
    person["id_number"] = json!("35010219800101123Y");
    person["subject_name"] = json!("机密姓名".repeat(60));
    let mut entity = legal_entity_record("administrative_penalty");
    entity["legal_representative_id_number"] = json!("35010219800101987Z");
    entity["legal_representative"] = json!(format!("SECRETREP{}", "代".repeat(60)));
    entity["violation_facts"] = json!(987654321);
    entity["fine_amount"] = json!("SECRETFINE");
    entity["remark"] = json!(["SECRETREMARK"]);
    let body = batch("administrative_penalty", vec![person, entity]);
    let resp = client.post_json("/v1/records", &body).await;
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    assert_eq!(resp.json()["rejected"], 2, "{text}");
    for marker in [
        "35010219800101123Y",
        "35010219800101987Z",
        "机密姓名",
        "SECRETREP",
        "987654321",
        "SECRETFINE",
        "SECRETREMARK",
    ] {
        assert!(!text.contains(marker), "{marker} leaked: {text}");
    }
    // Malformed JSON holding a secret does not echo it either.
    let resp = client
        .send(
            "POST",
            "/v1/records",
            &[("content-type", "application/json")],
            r#"{"item":"administrative_penalty","records":[{"id_number":"35010219800101123Y" "#,
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 400);
    assert!(!String::from_utf8_lossy(&resp.body).contains("35010219800101123Y"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_only_code_findings_are_accepted_with_warnings() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let mut record = legal_entity_record("administrative_licence");
    // Bad embedded organisation-code check (position 17), valid position 18.
    let head = "91350100M000100Y5";
    record["uscc"] = json!(format!(
        "{head}{}",
        credgate::codes::uscc_check_char(head).expect("alphabet")
    ));
    let doc = env
        .client(server.addr, "dept-market")
        .post_json(
            "/v1/records",
            &batch("administrative_licence", vec![record]),
        )
        .await
        .json();
    assert_eq!(doc["accepted"], 1, "{doc:#}");
    let warnings = doc["results"][0]["warnings"].as_array().expect("warnings");
    assert_eq!(warnings[0]["code"], "uscc_org_code_check");
    assert_eq!(warnings[0]["pointer"], "/records/0/uscc");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_endpoints_list_items_with_etag() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "agency-finance");
    let resp = client.get("/v1/catalog").await;
    assert_eq!(resp.status, 200);
    let etag = resp.header("etag").expect("etag").to_owned();
    let ids: HashSet<String> = resp.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, synth::ITEMS.iter().map(|s| s.to_string()).collect());
    let again = client
        .send(
            "GET",
            "/v1/catalog",
            &[("if-none-match", &etag)],
            bytes::Bytes::new(),
        )
        .await
        .expect("request");
    assert_eq!(again.status, 304);
    let item = client
        .get("/v1/catalog/items/administrative_penalty")
        .await
        .json();
    assert_eq!(item["name_zh"], "行政处罚");
    assert_eq!(
        item["schema"]["properties"]["decision_number"]["x-zh"],
        "行政处罚决定书文号"
    );
    assert_eq!(client.get("/v1/catalog/items/nope").await.status, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_records_without_record_data() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    let record = synth::record("red_list", 1, "");
    let mut bad = synth::record("red_list", 2, "");
    bad["award_date"] = json!("2026-02-30");
    client
        .post_json("/v1/records", &batch("red_list", vec![record.clone(), bad]))
        .await;
    client.get("/v1/catalog").await;
    let (status, text) = ops_get(server.ops, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for needle in [
        r#"credgate_http_requests_total{route="/v1/records",status="200"} 1"#,
        r#"credgate_records_total{item="red_list",outcome="accepted"} 1"#,
        r#"credgate_records_total{item="red_list",outcome="rejected"} 1"#,
        "credgate_store_commits_total",
        "credgate_connections",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert!(
        !text.contains(record["subject_name"].as_str().expect("name")),
        "no record data in metrics"
    );
    // The accepted record's subject is graded in the background; the
    // backlog gauge shows what waits and returns to zero.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let graded = loop {
        let (_, text) = ops_get(server.ops, "/metrics").await.expect("metrics");
        let done = text.contains("\ncredgate_grade_assessments_total 1\n");
        if done || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for needle in [
        "\ncredgate_grade_assessments_total 1\n",
        "\ncredgate_grade_backlog 0\n",
    ] {
        assert!(graded.contains(needle), "{needle} missing from:\n{graded}");
    }
    server.stop().await;
}
