//! A record's life: duplicates and natural keys, removal from a list,
//! graded measures.

use serde_json::{json, Value};

use credgate::synth;

use crate::notices::{ids, pull_all, pull_sub, push_sub, record_about, submit, FIN_SECRET};
use crate::receiver::Receiver;
use crate::support::{Client, Env, Server};

/// Subscribes the procurement centre (pull, restricted) to everything and
/// the finance department (push, shared) to `item`; returns finance's
/// receiver.
async fn procurement_pulls_finance_pushed(env: &Env, item: &str) -> Receiver {
    let fin = Receiver::start(env.root.path(), "finance", &env.pki.dir.join("ca.pem"), 0).await;
    env.subscribe(
        &[
            pull_sub("proc-pull", "agency-procurement", ""),
            push_sub(
                "fin-push",
                "agency-finance",
                &fin,
                FIN_SECRET,
                &format!("items = [\"{item}\"]"),
            ),
        ]
        .concat(),
    );
    fin
}

/// Posts a batch and returns the answer document (status 200 asserted).
async fn batch(client: &Client, item: &str, records: Vec<Value>) -> Value {
    let resp = client
        .post_json("/v1/records", &json!({"item": item, "records": records}))
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    resp.json()
}

/// The same new record sent on many connections at once: one submission
/// stores it, every other one is answered as its duplicate (same record
/// id), none fails, and one notice goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_record_sent_concurrently_is_stored_once() {
    let env = Env::new();
    env.subscribe(&pull_sub("proc-pull", "agency-procurement", ""));
    let server = Server::start(&env).await;
    let record = record_about("administrative_penalty", "legal_entity", "serious");
    let body = json!({"item": "administrative_penalty", "records": [record]});
    let sends: Vec<_> = (0..24)
        .map(|_| {
            let (client, body) = (env.client(server.addr, "dept-market"), body.clone());
            tokio::spawn(async move { client.post_json("/v1/records", &body).await })
        })
        .collect();
    let mut stored = Vec::new();
    let mut duplicates = Vec::new();
    for send in sends {
        let resp = send.await.expect("task");
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let result = resp.json()["results"][0].clone();
        match result["status"].as_str() {
            Some("duplicate") => duplicates.push(result["record_id"].clone()),
            _ => stored.push(result["record_id"].clone()),
        }
    }
    assert_eq!(stored.len(), 1, "stored once: {stored:?}");
    assert_eq!(duplicates.len(), 23);
    assert!(
        duplicates.iter().all(|id| *id == stored[0]),
        "{duplicates:?}"
    );
    let agency = env.client(server.addr, "agency-procurement");
    let (notices, _, _) = pull_all(&agency, "0").await;
    assert_eq!(notices.len(), 1, "one notice");
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
    fresh["decision_number"] = json!("宁市监罚〔2026〕77777号");
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
    let doc = batch(&dept, "administrative_penalty", vec![person.clone()]).await;
    assert_eq!(doc["results"][0]["status"], "duplicate", "{doc:#}");
    assert_eq!(doc["results"][0]["record_id"], result["record_id"]);

    // A prefecture no GB/T 2260 edition lists (32 99..) is accepted with
    // a warning; one merged away in 1983 (苏州地区 3227..) still names
    // numbers issued then, without one.
    let id = |body: &str| {
        let check = credgate::codes::resident_id_check_char(body).expect("digits");
        json!(format!("{body}{check}"))
    };
    let mut unknown = person.clone();
    unknown["id_number"] = id("32990019850307123");
    unknown["decision_number"] = json!("苏市监罚〔2026〕9901号");
    let mut old = person;
    old["id_number"] = id("32272219620307123");
    old["decision_number"] = json!("苏市监罚〔2026〕9902号");
    let doc = batch(&dept, "administrative_penalty", vec![unknown, old]).await;
    let results = &doc["results"];
    assert_eq!(results[0]["status"], "accepted", "{doc:#}");
    assert_eq!(results[0]["warnings"][0]["code"], "unknown_prefecture");
    assert_eq!(results[0]["warnings"][0]["pointer"], "/records/0/id_number");
    assert_eq!(results[1]["status"], "accepted", "{doc:#}");
    assert!(
        results[1]["warnings"].as_array().is_none_or(Vec::is_empty),
        "{doc:#}"
    );

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
    assert_eq!(env.count_rows("records"), 5);
    server.stop().await;
}

/// A removal document for a listing made on 2026-07-01.
fn removal_doc(date: &str) -> Value {
    json!({
        "removal_date": date,
        "removal_reason": "annual_report_filed",
        "removal_reason_detail": "已补报2025年度报告并公示",
        "removal_authority": "南京市市场监督管理局",
        "removal_authority_uscc": synth::authority().1,
        "removal_decision_number": "宁市监移〔2026〕12号",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_from_a_list_lifts_once_for_every_earlier_recipient() {
    let env = Env::new();
    let fin = procurement_pulls_finance_pushed(&env, "abnormal_operations").await;
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let admin = env.client(server.addr, "admin-credit-office");
    let agency = env.client(server.addr, "agency-procurement");

    // Removal fields in a new record are refused, pointing at each.
    let mut with_removal = synth::record("abnormal_operations", 8, "");
    with_removal["removal_date"] = json!("2026-10-01");
    let doc = batch(&dept, "abnormal_operations", vec![with_removal]).await;
    let errors = &doc["results"][0]["errors"];
    assert_eq!(errors[0]["code"], "use_removal", "{doc:#}");
    assert_eq!(errors[0]["pointer"], "/records/0/removal_date");
    assert_eq!(errors.as_array().map(Vec::len), Some(1), "{doc:#}");

    let listing = submit(
        &dept,
        "abnormal_operations",
        synth::record("abnormal_operations", 9, ""),
    )
    .await;
    let record_id = listing["record_id"].as_str().expect("id").to_owned();
    let notice_id = listing["notice_id"].as_str().expect("notice").to_owned();
    assert_eq!(fin.wait_for(1, 15).await.len(), 1);
    let removal_path = format!("/v1/records/{record_id}/removal");

    // Faults change nothing: before the listing, missing reason, unknown
    // field, another department, a record that is not a listing.
    let early = dept
        .post_json(&removal_path, &removal_doc("2026-06-30"))
        .await;
    assert_eq!(
        early.status,
        400,
        "{}",
        String::from_utf8_lossy(&early.body)
    );
    let problem = early.json();
    assert_eq!(problem["code"], "invalid_removal");
    assert_eq!(problem["errors"][0]["code"], "removal_before_listing");
    assert_eq!(problem["errors"][0]["pointer"], "/removal_date");
    let mut incomplete = removal_doc("2026-10-01");
    incomplete
        .as_object_mut()
        .expect("o")
        .remove("removal_reason");
    incomplete["color"] = json!("red");
    let problem = dept.post_json(&removal_path, &incomplete).await.json();
    assert_eq!(problem["code"], "invalid_removal", "{problem:#}");
    let found: Vec<(&str, &str)> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| Some((e["code"].as_str()?, e["pointer"].as_str()?)))
        .collect();
    assert!(
        found.contains(&("required", "/removal_reason")),
        "{problem:#}"
    );
    assert!(
        found.iter().any(|(code, _)| *code == "unknown_field"),
        "{problem:#}"
    );
    let other = env
        .client(server.addr, "dept-tax")
        .post_json(&removal_path, &removal_doc("2026-10-01"))
        .await;
    assert_eq!(other.status, 404);
    let penalty = submit(
        &dept,
        "administrative_penalty",
        synth::record("administrative_penalty", 9, "general"),
    )
    .await;
    let not_a_list = dept
        .post_json(
            &format!(
                "/v1/records/{}/removal",
                penalty["record_id"].as_str().expect("id")
            ),
            &removal_doc("2026-10-01"),
        )
        .await;
    assert_eq!(not_a_list.status, 409);
    assert_eq!(not_a_list.json()["code"], "not_a_list");
    let revoke_as_removal = dept
        .post_json(
            &format!("/v1/records/{record_id}/revocation"),
            &json!({"reason": "removed"}),
        )
        .await;
    assert_eq!(revoke_as_removal.status, 400);
    let (notices, _, _) = pull_all(&agency, "0").await;
    assert_eq!(ids(&notices), std::slice::from_ref(&notice_id));

    // The removal, by an administrator: one lift to each earlier recipient.
    let resp = admin
        .post_json(&removal_path, &removal_doc("2026-10-01"))
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let done = resp.json();
    assert_eq!(done["status"], "removed");
    assert_eq!(done["reason"], "removed");
    assert_eq!(
        done["recipients"],
        json!(["agency-finance", "agency-procurement"])
    );
    let again = dept
        .post_json(&removal_path, &removal_doc("2026-10-02"))
        .await;
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["code"], "already_ended");

    let (notices, _, _) = pull_all(&agency, "0").await;
    assert_eq!(notices.len(), 2, "{notices:#?}");
    let lift = &notices[1];
    assert_eq!(lift["type"], "lift");
    assert_eq!(lift["reason"], "removed");
    assert_eq!(lift["lifts"], notice_id.as_str());
    assert_eq!(lift["effective_until"], "2026-10-01");
    let pushed = fin.wait_for(2, 15).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(fin.accepted().len(), 2, "exactly one lift pushed");
    assert_eq!(pushed[1].json()["type"], "lift");
    assert_eq!(pushed[1].json()["lifts"], notice_id.as_str());

    let read = dept.get(&format!("/v1/records/{record_id}")).await.json();
    assert_eq!(read["status"], "removed");
    assert_eq!(read["removal"]["removal_reason"], "annual_report_filed");
    assert_eq!(read["removal"]["removal_date"], "2026-10-01");
    // The listing's notice and its one lift; the penalty (general) has none.
    assert_eq!(env.count_rows("notices"), 2);
    server.stop().await;
}

/// The measure ids of a pulled notice.
fn measures(notice: &Value) -> Vec<String> {
    notice["measures"]
        .as_array()
        .expect("measures")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measures_follow_the_level_and_the_list_kind() {
    let env = Env::new();
    env.subscribe(&pull_sub(
        "proc-pull",
        "agency-procurement",
        "min_severity = \"minor\"",
    ));
    let server = Server::start(&env).await;
    let agency = env.client(server.addr, "agency-procurement");
    let listing = |n: u64, kind: &str| {
        let mut r = synth::record("serious_dishonesty", n, "");
        r["list_kind"] = json!(kind);
        r
    };
    let tax = submit(
        &env.client(server.addr, "dept-tax"),
        "serious_dishonesty",
        listing(1, "major_tax_violation"),
    )
    .await;
    let court = submit(
        &env.client(server.addr, "dept-court"),
        "serious_dishonesty",
        listing(2, "dishonest_judgment_debtor"),
    )
    .await;
    let dept = env.client(server.addr, "dept-market");
    let major = submit(
        &dept,
        "administrative_penalty",
        synth::record("administrative_penalty", 3, "major"),
    )
    .await;
    // `minor` is still accepted, as `general`: no notice.
    let minor = submit(
        &dept,
        "administrative_penalty",
        synth::record("administrative_penalty", 4, "minor"),
    )
    .await;
    assert!(minor.get("notice_id").is_none(), "{minor:#}");

    let (notices, _, _) = pull_all(&agency, "0").await;
    assert_eq!(
        ids(&notices),
        [&tax, &court, &major].map(|r| r["notice_id"].as_str().expect("id").to_owned())
    );
    let (tax, court, major) = (&notices[0], &notices[1], &notices[2]);
    let tax_measures = measures(tax);
    assert!(!tax_measures.contains(&"restrict_high_consumption".to_owned()));
    assert!(tax_measures.contains(&"restrict_exit".to_owned()));
    assert!(tax_measures.contains(&"restrict_government_procurement".to_owned()));
    let court_measures = measures(court);
    assert!(court_measures.contains(&"restrict_high_consumption".to_owned()));
    assert!(!court_measures.contains(&"restrict_exit".to_owned()));
    assert_eq!(major["severity"], "major");
    assert_eq!(
        measures(major),
        ["enhanced_supervision", "exclude_from_honours"],
        "a major penalty carries the measures configured for its level"
    );
    server.stop().await;
}

/// `PUT /v1/records/{id}` with `{"record", "reason"}` (and a revision).
async fn correct(
    client: &Client,
    id: &str,
    record: &Value,
    revision: Option<u32>,
) -> crate::support::Resp {
    let mut doc = json!({"record": record, "reason": "更正处罚内容：原决定书录入有误"});
    if let Some(r) = revision {
        doc["revision"] = json!(r);
    }
    let body = serde_json::to_vec(&doc).expect("json");
    client
        .send(
            "PUT",
            &format!("/v1/records/{id}"),
            &[("content-type", "application/json")],
            body,
        )
        .await
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_reaches_every_earlier_recipient_and_a_downgrade_lifts() {
    let env = Env::new();
    let fin = procurement_pulls_finance_pushed(&env, "administrative_penalty").await;
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let agency = env.client(server.addr, "agency-procurement");

    // A serious penalty about a natural person.
    let mut person = synth::record("administrative_penalty", 11, "serious");
    let obj = person.as_object_mut().expect("object");
    obj.retain(|k, _| !k.starts_with("legal_representative") && k != "uscc");
    obj.insert("subject_type".into(), json!("natural_person"));
    obj.insert("subject_name".into(), json!("陈静伟"));
    obj.insert("id_type".into(), json!("resident_id"));
    obj.insert("id_number".into(), json!(synth::resident_id(11)));
    let first = submit(&dept, "administrative_penalty", person.clone()).await;
    let (id, n1) = (
        first["record_id"].as_str().expect("id").to_owned(),
        first["notice_id"].as_str().expect("notice").to_owned(),
    );
    fin.wait_for(1, 15).await;

    // Faults change nothing.
    let no_reason = dept
        .send(
            "PUT",
            &format!("/v1/records/{id}"),
            &[("content-type", "application/json")],
            serde_json::to_vec(&json!({"record": person})).expect("json"),
        )
        .await
        .expect("request");
    assert_eq!(no_reason.status, 400);
    assert_eq!(no_reason.json()["errors"][0]["pointer"], "/reason");
    let mut broken = person.clone();
    broken.as_object_mut().expect("o").remove("legal_basis");
    let resp = correct(&dept, &id, &broken, None).await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["code"], "invalid_record");
    assert_eq!(resp.json()["errors"][0]["pointer"], "/record/legal_basis");
    let resp = correct(&env.client(server.addr, "dept-tax"), &id, &person, None).await;
    assert_eq!(
        resp.status, 404,
        "only the submitter or an administrator corrects"
    );
    let resp = correct(&dept, &id, &person, None).await;
    assert_eq!(resp.json()["status"], "unchanged");

    // A correction: every earlier recipient gets a correction notice,
    // redacted for its clearance.
    let mut corrected = person.clone();
    corrected["penalty_content"] = json!("一、警告；二、罚款人民币叁万元。");
    let resp = correct(&dept, &id, &corrected, Some(1)).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let done = resp.json();
    assert_eq!(done["status"], "corrected");
    assert_eq!(done["revision"], 2);
    assert_eq!(done["effect"], "corrected");
    assert_eq!(
        done["recipients"],
        json!(["agency-finance", "agency-procurement"])
    );
    let stale = correct(&dept, &id, &person, Some(1)).await;
    assert_eq!(stale.status, 409);
    assert_eq!(stale.json()["code"], "revision_changed");
    assert_eq!(stale.json()["current_revision"], 2);

    let (notices, raw, _) = pull_all(&agency, "0").await;
    assert_eq!(notices.len(), 2, "{notices:#?}");
    let c = &notices[1];
    assert_eq!(c["type"], "correction");
    assert_eq!(c["corrects"], n1.as_str());
    assert_eq!(c["record"]["penalty_content"], corrected["penalty_content"]);
    assert_eq!(
        c["subject"]["subject_name"], "陈静伟",
        "restricted sees the name"
    );
    let pushed = fin.wait_for(2, 15).await;
    let pushed_c = pushed[1].json();
    assert_eq!(pushed_c["type"], "correction");
    assert_eq!(pushed_c["corrects"], n1.as_str());
    let mut outgoing = raw;
    for r in fin.requests() {
        outgoing.extend(r.body.iter());
    }
    let pushed_text = String::from_utf8_lossy(&pushed[1].body).into_owned();
    assert!(
        !pushed_text.contains("陈静伟"),
        "a shared agency never sees a person's name"
    );
    assert!(
        !String::from_utf8_lossy(&outgoing).contains(&synth::resident_id(11)),
        "no ID number leaves in clear"
    );

    // The earlier revision is kept and readable.
    let revs = dept
        .get(&format!("/v1/records/{id}/revisions"))
        .await
        .json();
    assert_eq!(revs["current_revision"], 2);
    assert_eq!(revs["revisions"][0]["revision"], 1);
    assert_eq!(revs["revisions"][0]["replaced_by"], "dept-market");
    assert_eq!(
        revs["revisions"][0]["record"]["penalty_content"],
        person["penalty_content"]
    );
    assert!(revs["revisions"][0]["reason"].as_str().is_some());

    // Downgraded to general: the notice condition ends, a lift each.
    let mut general = corrected.clone();
    general["severity"] = json!("general");
    let done = correct(&dept, &id, &general, None).await.json();
    assert_eq!(done["effect"], "lifted", "{done:#}");
    let (notices, _, _) = pull_all(&agency, "0").await;
    assert_eq!(notices.len(), 3);
    assert_eq!(notices[2]["type"], "lift");
    assert_eq!(notices[2]["reason"], "corrected");
    assert_eq!(notices[2]["lifts"], n1.as_str());
    // Back to serious: a new punishment notice, routed afresh.
    let done = correct(&dept, &id, &corrected, None).await.json();
    assert_eq!(done["effect"], "notified", "{done:#}");
    let n2 = done["notices"][0].as_str().expect("notice").to_owned();
    // Revocation lifts what is in effect (the new notice), once.
    let resp = dept
        .post_json(
            &format!("/v1/records/{id}/revocation"),
            &json!({"reason": "revoked"}),
        )
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json()["lift_notices"].as_array().map(Vec::len),
        Some(1)
    );
    let (notices, _, _) = pull_all(&agency, "0").await;
    let kinds: Vec<(&str, Option<&str>)> = notices
        .iter()
        .map(|n| {
            (
                n["type"].as_str().expect("type"),
                n["lifts"].as_str().or(n["corrects"].as_str()),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("punishment", None),
            ("correction", Some(n1.as_str())),
            ("lift", Some(n1.as_str())),
            ("punishment", None),
            ("lift", Some(n2.as_str())),
        ]
    );
    assert_eq!(fin.wait_for(5, 15).await.len(), 5);
    // An ended record is not corrected.
    let resp = correct(&dept, &id, &person, None).await;
    assert_eq!(resp.status, 409);
    assert_eq!(resp.json()["code"], "already_ended");
    let (code, out) = env.audit_verify("verify");
    assert_eq!(code, 0, "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_cannot_take_another_records_key() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let a = synth::record("administrative_penalty", 21, "general");
    let b = synth::record("administrative_penalty", 22, "general");
    let ra = submit(&dept, "administrative_penalty", a).await;
    submit(&dept, "administrative_penalty", b.clone()).await;
    let mut onto_b = b.clone();
    onto_b["penalty_content"] = json!("另一内容");
    let resp = correct(&dept, ra["record_id"].as_str().expect("id"), &onto_b, None).await;
    assert_eq!(resp.status, 409, "{}", String::from_utf8_lossy(&resp.body));
    let problem = resp.json();
    assert_eq!(problem["code"], "duplicate_key");
    assert_eq!(problem["errors"][1]["pointer"], "/record/decision_number");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blacklisted_subject_leaves_the_red_list_and_repeated_penalties_warn() {
    let env = Env::new();
    env.subscribe(
        &[
            pull_sub("cs-pull", "agency-credit-service", "items = [\"red_list\"]"),
            pull_sub(
                "proc-pull",
                "agency-procurement",
                "notice_types = [\"punishment\", \"warning\"]",
            ),
            pull_sub("fin-pull", "agency-finance", ""),
        ]
        .concat(),
    );
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let (cs, proc_client, fin) = (
        env.client(server.addr, "agency-credit-service"),
        env.client(server.addr, "agency-procurement"),
        env.client(server.addr, "agency-finance"),
    );
    let about = |item: &str, n: u64, subject: u64| {
        let mut r = synth::record(item, n, "general");
        let s = synth::record(item, subject, "general");
        for f in [
            "subject_name",
            "subject_type",
            "uscc",
            "legal_representative",
        ] {
            r[f] = s[f].clone();
        }
        r
    };
    // Subject 2 is a legal entity in synth.
    assert_eq!(
        synth::record("red_list", 2, "")["subject_type"],
        "legal_entity"
    );
    let red = submit(&dept, "red_list", about("red_list", 2, 2)).await;
    let red_id = red["record_id"].as_str().expect("id").to_owned();
    let listing = submit(
        &dept,
        "serious_dishonesty",
        about("serious_dishonesty", 3, 2),
    )
    .await;
    assert!(listing["notice_id"].is_string());
    // The red-list entry was removed in the same transaction, with a lift
    // to the red list's recipients.
    let read = dept.get(&format!("/v1/records/{red_id}")).await.json();
    assert_eq!(read["status"], "removed", "{read:#}");
    assert_eq!(read["removal"]["removal_reason"], "dishonesty_found");
    let (cs_notices, _, _) = pull_all(&cs, "0").await;
    assert_eq!(cs_notices.len(), 2);
    assert_eq!(cs_notices[1]["type"], "lift");
    assert_eq!(cs_notices[1]["reason"], "removed");
    assert_eq!(cs_notices[1]["lifts"], red["notice_id"]);
    // While listed, the subject cannot be put on the red list.
    let doc = batch(
        &dept,
        "red_list",
        vec![about("red_list", 4, 2), about("red_list", 5, 6)],
    )
    .await;
    assert_eq!(doc["results"][0]["status"], "rejected", "{doc:#}");
    assert_eq!(
        doc["results"][0]["errors"][0]["code"],
        "conflicts_with_dishonesty"
    );
    assert_eq!(doc["results"][0]["errors"][0]["pointer"], "/records/0/uscc");
    assert_eq!(
        doc["results"][1]["status"], "accepted",
        "another subject is not refused"
    );

    // Warnings: a subject's second general penalty within 12 months.
    let penalty = |n: u64, subject: u64, date: &str| {
        let mut r = about("administrative_penalty", n, subject);
        r["decision_date"] = json!(date);
        r
    };
    let first = submit(
        &dept,
        "administrative_penalty",
        penalty(10, 7, "2026-01-10"),
    )
    .await;
    assert!(first.get("notice_id").is_none());
    let second = submit(
        &dept,
        "administrative_penalty",
        penalty(11, 7, "2026-10-15"),
    )
    .await;
    let warning_id = second["notice_id"].as_str().expect("a warning").to_owned();
    // More than 12 months apart: no warning. Two in one batch: the second warns.
    let old = submit(
        &dept,
        "administrative_penalty",
        penalty(12, 8, "2025-09-01"),
    )
    .await;
    assert!(old.get("notice_id").is_none());
    let late = submit(
        &dept,
        "administrative_penalty",
        penalty(13, 8, "2026-10-15"),
    )
    .await;
    assert!(late.get("notice_id").is_none(), "{late:#}");
    let doc = batch(
        &dept,
        "administrative_penalty",
        vec![penalty(14, 9, "2026-09-01"), penalty(15, 9, "2026-09-02")],
    )
    .await;
    assert!(doc["results"][0].get("notice_id").is_none(), "{doc:#}");
    let batch_warning = doc["results"][1]["notice_id"]
        .as_str()
        .expect("warning")
        .to_owned();

    let (notices, _, _) = pull_all(&proc_client, "0").await;
    let warnings: Vec<&Value> = notices.iter().filter(|n| n["type"] == "warning").collect();
    assert_eq!(
        warnings
            .iter()
            .map(|n| n["notice_id"].as_str().expect("id"))
            .collect::<Vec<_>>(),
        [warning_id.as_str(), batch_warning.as_str()]
    );
    assert_eq!(warnings[0]["severity"], "general");
    let (fin_notices, _, _) = pull_all(&fin, "0").await;
    assert!(
        fin_notices.iter().all(|n| n["type"] != "warning"),
        "warnings go only to subscriptions that name them"
    );
    server.stop().await;
}
