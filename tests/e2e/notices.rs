//! The joint punishment cycle over real mTLS: routing to subscribed
//! agencies, pull and push, redaction per clearance, signatures, retries,
//! dead letters, feedback, revocation and expiry lifts.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::receiver::{Received, Receiver};
use crate::support::{Client, Env, Server};
use credgate::synth;

pub(crate) const FIN_SECRET: &str = "whsec_c2VjcmV0LWZvci1maW5hbmNlLXB1c2gtcmVjZWl2ZXI=";
pub(crate) const LAND_SECRET: &str = "whsec_c2VjcmV0LWZvci1sYW5kLWJ1cmVhdS1yZWNlaXZlcg==";

/// Verifies a Standard Webhooks signature independently of credgate.
pub(crate) fn verify(secret: &str, r: &Received) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{}.{}.", r.id, r.timestamp).as_bytes());
    mac.update(&r.body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    r.signature
        .split(' ')
        .any(|s| s == format!("v1,{expected}"))
}

pub(crate) fn push_sub(
    id: &str,
    agency: &str,
    receiver: &Receiver,
    secret: &str,
    filters: &str,
) -> String {
    format!(
        "[[subscription]]\nid = \"{id}\"\nagency = \"{agency}\"\nmode = \"push\"\nendpoint = \"{}\"\nca_file = \"{}\"\nsigning_secret = \"{secret}\"\n{filters}\n\n",
        receiver.endpoint(),
        receiver.ca_file.display()
    )
}

pub(crate) fn pull_sub(id: &str, agency: &str, filters: &str) -> String {
    format!(
        "[[subscription]]\nid = \"{id}\"\nagency = \"{agency}\"\nmode = \"pull\"\n{filters}\n\n"
    )
}

/// A record of `item` about the given subject type.
pub(crate) fn record_about(item: &str, subject_type: &str, severity: &str) -> Value {
    (0..200)
        .map(|n| synth::record(item, n, severity))
        .find(|r| r["subject_type"] == subject_type)
        .expect("synth yields every subject type")
}

pub(crate) async fn submit(client: &Client, item: &str, record: Value) -> Value {
    let resp = client
        .post_json("/v1/records", &json!({"item": item, "records": [record]}))
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let doc = resp.json();
    assert_eq!(doc["accepted"], 1, "{doc:#}");
    doc["results"][0].clone()
}

/// Pulls everything after `after` (no waiting); returns notices and the raw bytes.
pub(crate) async fn pull_all(client: &Client, after: &str) -> (Vec<Value>, Vec<u8>, String) {
    let resp = client
        .get(&format!("/v1/notices?after={after}&limit=1000"))
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let doc = resp.json();
    let next = doc["next_cursor"].as_str().expect("cursor").to_owned();
    (
        doc["notices"].as_array().cloned().unwrap_or_default(),
        resp.body.to_vec(),
        next,
    )
}

pub(crate) fn ids(notices: &[Value]) -> Vec<String> {
    notices
        .iter()
        .map(|n| n["notice_id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cycle_routes_redacts_signs_retries_and_lifts() {
    let env = Env::new();
    let fin = Receiver::start(env.root.path(), "finance", &env.pki.dir.join("ca.pem"), 3).await;
    let land = Receiver::start(env.root.path(), "land", &env.pki.dir.join("ca.pem"), 0).await;
    env.subscribe(&[
        pull_sub("proc-pull", "agency-procurement", "notice_types = [\"punishment\"]"),
        pull_sub("cs-pull", "agency-credit-service", "items = [\"red_list\"]"),
        push_sub("fin-push", "agency-finance", &fin, FIN_SECRET, "items = [\"serious_dishonesty\", \"administrative_penalty\"]\nmin_severity = \"serious\""),
        push_sub("land-push", "agency-land", &land, LAND_SECRET, "items = [\"serious_dishonesty\"]\nregions = [\"3201\"]"),
    ]
    .concat());
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let proc_client = env.client(server.addr, "agency-procurement");
    let cs_client = env.client(server.addr, "agency-credit-service");

    // 1: serious penalty, legal entity in 320100 → procurement, finance.
    let r1_record = record_about("administrative_penalty", "legal_entity", "serious");
    let r1 = submit(&dept, "administrative_penalty", r1_record.clone()).await;
    // 2: general penalty (another decision) → no notice at all.
    let mut r2_record = record_about("administrative_penalty", "legal_entity", "general");
    r2_record["decision_number"] = json!("宁市监罚〔2026〕99999号");
    let r2 = submit(&dept, "administrative_penalty", r2_record).await;
    assert!(r2.get("notice_id").is_none(), "{r2:#}");
    // 3: serious dishonesty about a natural person (ID region 320102) → procurement, finance, land.
    let r3_record = record_about("serious_dishonesty", "natural_person", "");
    let r3 = submit(&dept, "serious_dishonesty", r3_record.clone()).await;
    // 4: serious dishonesty of a Shenzhen company → procurement, finance; not land (region).
    let mut r4_record = record_about("serious_dishonesty", "legal_entity", "");
    r4_record["uscc"] = json!(synth::uscc("91440300", 77));
    let r4 = submit(&dept, "serious_dishonesty", r4_record.clone()).await;
    // 5: red list → credit service.
    let r5_record = record_about("red_list", "legal_entity", "");
    let r5 = submit(&dept, "red_list", r5_record.clone()).await;
    let n = |r: &Value| r["notice_id"].as_str().expect("notice id").to_owned();
    let (n1, n3, n4, n5) = (n(&r1), n(&r3), n(&r4), n(&r5));

    let mut outgoing: Vec<u8> = Vec::new();
    // Pull: procurement (restricted) gets 1, 3, 4 in commit order.
    let (proc_notices, raw, proc_cursor) = pull_all(&proc_client, "0").await;
    outgoing.extend(raw);
    assert_eq!(ids(&proc_notices), [n1.clone(), n3.clone(), n4.clone()]);
    let person = &proc_notices[1];
    assert_eq!(person["type"], "punishment");
    assert_eq!(person["severity"], "serious");
    assert_eq!(person["subject"]["subject_type"], "natural_person");
    assert_eq!(
        person["subject"]["subject_name"], r3_record["subject_name"],
        "restricted clearance sees a person's name"
    );
    let pid = person["subject"]["id_number"].as_str().expect("pseudonym");
    assert!(
        pid.starts_with("pid:"),
        "secret fields arrive as pseudonyms: {pid}"
    );
    assert!(person["measures"]
        .as_array()
        .expect("measures")
        .iter()
        .any(|m| m["id"] == "restrict_government_procurement"));
    assert_eq!(person["record"]["facts"], r3_record["facts"]);
    assert_eq!(
        person["effective_from"], r3_record["listing_date"],
        "dates are YYYY-MM-DD"
    );
    assert_eq!(person["effective_until"], r3_record["planned_removal_date"]);
    // Credit service (public) gets only the red-list notice, public fields only.
    let (cs_notices, raw, _) = pull_all(&cs_client, "0").await;
    outgoing.extend(raw);
    assert_eq!(ids(&cs_notices), std::slice::from_ref(&n5));
    let cs_record = cs_notices[0]["record"].as_object().expect("record");
    assert!(cs_record.contains_key("awarding_department"));
    assert!(
        !cs_record.contains_key("legal_representative"),
        "shared field leaked to a public agency"
    );
    assert!(!cs_record.contains_key("legal_representative_id_number"));

    // Push: finance fails 3 times, then gets 1, 3, 4; land gets 3 only.
    let fin_got = fin.wait_for(3, 30).await;
    let land_got = land.wait_for(1, 15).await;
    assert!(
        fin.requests().iter().filter(|r| r.status == 503).count() >= 3,
        "finance failed first"
    );
    let mut fin_ids: Vec<String> = fin_got.iter().map(|r| r.id.clone()).collect();
    fin_ids.sort();
    let mut expected = vec![n1.clone(), n3.clone(), n4.clone()];
    expected.sort();
    assert_eq!(fin_ids, expected);
    assert_eq!(
        land_got.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        std::slice::from_ref(&n3)
    );
    for r in fin.requests() {
        assert!(verify(FIN_SECRET, &r), "finance signature does not verify");
        assert!(!verify(LAND_SECRET, &r), "signed with the wrong secret");
        assert_eq!(r.json()["notice_id"], r.id, "webhook-id is the notice id");
        outgoing.extend(r.body.iter());
    }
    for r in land.requests() {
        assert!(verify(LAND_SECRET, &r));
        outgoing.extend(r.body.iter());
    }
    // Finance has shared clearance: the person's name and ID are not sent.
    let fin_person = fin_got.iter().find(|r| r.id == n3).expect("n3").json();
    assert!(
        fin_person["subject"].get("subject_name").is_none(),
        "{fin_person:#}"
    );
    assert!(fin_person["subject"].get("id_number").is_none());
    assert_eq!(
        fin_person["record"]["facts"], r3_record["facts"],
        "shared fields reach a shared agency"
    );

    // Feedback: a recipient may, a non-recipient may not.
    let fb = json!({"measure": "restrict_government_procurement", "outcome": "applied", "date": "2026-11-20", "note": "已限制参加本次采购"});
    let resp = proc_client
        .post_json(&format!("/v1/notices/{n1}/feedback"), &fb)
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    // A non-recipient learns nothing: the same answer as for a notice that
    // does not exist, even with a measure the notice does not have.
    let land_client = env.client(server.addr, "agency-land");
    let not_yours = land_client
        .post_json(&format!("/v1/notices/{n1}/feedback"), &fb)
        .await;
    let mut wrong_measure = fb.clone();
    wrong_measure["measure"] = json!("no_such_measure");
    let not_yours_wrong_measure = land_client
        .post_json(&format!("/v1/notices/{n1}/feedback"), &wrong_measure)
        .await;
    let missing = land_client
        .post_json(
            "/v1/notices/01900000-0000-7000-8000-000000000000/feedback",
            &fb,
        )
        .await;
    for resp in [&not_yours, &not_yours_wrong_measure, &missing] {
        assert_eq!(resp.status, 404, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.json()["code"], "notice_not_found");
    }
    assert_eq!(not_yours.body, missing.body, "indistinguishable answers");
    assert_eq!(not_yours_wrong_measure.body, missing.body);
    let bad = json!({"measure": "no_such_measure", "outcome": "applied", "date": "2026-11-20"});
    assert_eq!(
        proc_client
            .post_json(&format!("/v1/notices/{n1}/feedback"), &bad)
            .await
            .status,
        400
    );
    // The submitter sees notices, deliveries and feedback on its record.
    let rec = dept
        .get(&format!(
            "/v1/records/{}",
            r1["record_id"].as_str().expect("id")
        ))
        .await
        .json();
    let notice = &rec["notices"][0];
    assert_eq!(notice["notice_id"], n1);
    assert_eq!(notice["feedback"][0]["agency"], "agency-procurement");
    assert_eq!(notice["feedback"][0]["outcome"], "applied");
    let agencies: HashSet<&str> = notice["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| d["agency"].as_str().expect("agency"))
        .collect();
    assert_eq!(
        agencies,
        HashSet::from(["agency-procurement", "agency-finance"])
    );
    // Feedback rate per agency for administrators.
    let stats = env
        .client(server.addr, "admin-credit-office")
        .get("/admin/v1/stats/feedback")
        .await
        .json();
    let proc_stats = stats["agencies"]
        .as_array()
        .expect("agencies")
        .iter()
        .find(|a| a["agency"] == "agency-procurement")
        .cloned()
        .expect("procurement");
    assert_eq!(proc_stats["notices"], 3);
    assert_eq!(proc_stats["with_feedback"], 1);

    // Revocation of record 3 (repaired) reaches every earlier recipient.
    let other = env
        .client(server.addr, "dept-tax")
        .post_json(
            &format!(
                "/v1/records/{}/revocation",
                r3["record_id"].as_str().expect("id")
            ),
            &json!({"reason": "repaired"}),
        )
        .await;
    assert_eq!(
        other.status, 404,
        "only the submitter or an admin may revoke"
    );
    let resp = dept
        .post_json(
            &format!(
                "/v1/records/{}/revocation",
                r3["record_id"].as_str().expect("id")
            ),
            &json!({"reason": "repaired", "note": "已完成信用修复"}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let revoked = resp.json();
    let recipients: HashSet<&str> = revoked["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .map(|a| a.as_str().expect("agency"))
        .collect();
    assert_eq!(
        recipients,
        HashSet::from(["agency-procurement", "agency-finance", "agency-land"])
    );
    let again = dept
        .post_json(
            &format!(
                "/v1/records/{}/revocation",
                r3["record_id"].as_str().expect("id")
            ),
            &json!({"reason": "repaired"}),
        )
        .await;
    assert_eq!(again.status, 409);
    let (lifts, raw, _) = pull_all(&proc_client, &proc_cursor).await;
    outgoing.extend(raw);
    assert_eq!(lifts.len(), 1);
    assert_eq!(lifts[0]["type"], "lift");
    assert_eq!(lifts[0]["lifts"], n3);
    assert_eq!(lifts[0]["reason"], "repaired");
    let fin_lift = fin
        .wait_for(4, 15)
        .await
        .into_iter()
        .find(|r| r.json()["type"] == "lift")
        .expect("finance lift");
    assert_eq!(fin_lift.json()["lifts"], n3);
    let land_lift = land
        .wait_for(2, 15)
        .await
        .into_iter()
        .find(|r| r.json()["type"] == "lift")
        .expect("land lift");
    assert_eq!(land_lift.json()["lifts"], n3);
    for r in fin.requests().into_iter().chain(land.requests()) {
        outgoing.extend(r.body.iter());
    }

    // Not one ID number left the gateway in clear.
    let text = String::from_utf8_lossy(&outgoing);
    for record in [&r1_record, &r3_record, &r4_record, &r5_record] {
        for field in ["id_number", "legal_representative_id_number"] {
            if let Some(id) = record[field].as_str() {
                assert!(!text.contains(id), "{field} left in clear");
            }
        }
    }
    server.stop().await;
}

/// One notice pushed to agencies of different clearances in the same
/// claim round: each gets the body redacted for its own clearance (the
/// round shares a body only between equal clearances), signed with its
/// own secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_notice_pushed_to_several_clearances_is_redacted_for_each() {
    const PROC_SECRET: &str = "whsec_c2VjcmV0LWZvci1wcm9jdXJlbWVudC1yZWNlaXZlcg==";
    let env = Env::new();
    let ca = env.pki.dir.join("ca.pem");
    let proc = Receiver::start(env.root.path(), "procurement", &ca, 0).await;
    let fin = Receiver::start(env.root.path(), "finance", &ca, 0).await;
    let land = Receiver::start(env.root.path(), "land", &ca, 0).await;
    let items = "items = [\"serious_dishonesty\"]";
    env.subscribe(
        &[
            push_sub("proc-push", "agency-procurement", &proc, PROC_SECRET, items),
            push_sub("fin-push", "agency-finance", &fin, FIN_SECRET, items),
            push_sub("land-push", "agency-land", &land, LAND_SECRET, items),
        ]
        .concat(),
    );
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let mut records = Vec::new();
    for n in 0..3 {
        let mut record = record_about("serious_dishonesty", "natural_person", "");
        record["decision_number"] = json!(format!("苏信惩〔2026〕{}号", 700 + n));
        let answer = submit(&dept, "serious_dishonesty", record.clone()).await;
        records.push((
            answer["notice_id"].as_str().expect("notice").to_owned(),
            record,
        ));
    }
    let (proc_got, fin_got, land_got) = (
        proc.wait_for(3, 20).await,
        fin.wait_for(3, 20).await,
        land.wait_for(3, 20).await,
    );
    for (id, record) in &records {
        let body = |got: &[Received], secret: &str| {
            let r = got.iter().find(|r| &r.id == id).expect("delivered");
            assert!(verify(secret, r), "signature of {id} does not verify");
            r.body.clone()
        };
        let (p, f, l) = (
            body(&proc_got, PROC_SECRET),
            body(&fin_got, FIN_SECRET),
            body(&land_got, LAND_SECRET),
        );
        let restricted: Value = serde_json::from_slice(&p).expect("json");
        let shared: Value = serde_json::from_slice(&f).expect("json");
        assert_eq!(
            restricted["subject"]["subject_name"], record["subject_name"],
            "restricted clearance sees the person's name"
        );
        assert!(
            shared["subject"].get("subject_name").is_none(),
            "a shared agency got a restricted field: {shared:#}"
        );
        assert!(shared["subject"].get("id_number").is_none());
        assert_eq!(shared["record"]["facts"], record["facts"]);
        assert_eq!(f, l, "equal clearances get the same body");
    }
}

/// Submits one serious-dishonesty record about a legal entity per number
/// of `numbers` (its decision number), all in one request; their notice
/// ids, sorted.
async fn submit_dishonesty(dept: &Client, numbers: std::ops::Range<usize>) -> Vec<String> {
    let records: Vec<Value> = numbers
        .map(|n| {
            let mut r = record_about("serious_dishonesty", "legal_entity", "");
            r["decision_number"] = json!(format!("苏信惩〔2026〕{n}号"));
            r
        })
        .collect();
    let resp = dept
        .post_json(
            "/v1/records",
            &json!({"item": "serious_dishonesty", "records": records}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let mut ids: Vec<String> = resp.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["notice_id"].as_str().expect("notice").to_owned())
        .collect();
    ids.sort();
    ids
}

/// `batch_max`: notices committed together reach an opted-in push
/// endpoint as `{"notices": [...]}` batches of at most `batch_max`, each
/// signed once; a failed batch is sent again; every notice arrives. A
/// subscription without it still gets one notice per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_push_sends_signed_batches_and_retries_them_whole() {
    let env = Env::new();
    let ca = env.pki.dir.join("ca.pem");
    let fin = Receiver::start(env.root.path(), "finance", &ca, 1).await;
    let land = Receiver::start(env.root.path(), "land", &ca, 0).await;
    let items = "items = [\"serious_dishonesty\"]";
    env.subscribe(
        &[
            push_sub(
                "fin-push",
                "agency-finance",
                &fin,
                FIN_SECRET,
                &format!("{items}\nbatch_max = 10"),
            ),
            push_sub("land-push", "agency-land", &land, LAND_SECRET, items),
        ]
        .concat(),
    );
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let expected = submit_dishonesty(&dept, 800..825).await;
    assert_eq!(expected.len(), 25);

    let batched = |got: &[Received]| -> Vec<String> {
        let mut ids: Vec<String> = got
            .iter()
            .flat_map(|r| r.json()["notices"].as_array().cloned().unwrap_or_default())
            .map(|n| n["notice_id"].as_str().unwrap_or_default().to_owned())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while batched(&fin.accepted()) != expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        batched(&fin.accepted()),
        expected,
        "every notice arrives in a batch"
    );
    let requests = fin.requests();
    assert_eq!(requests.iter().filter(|r| r.status == 503).count(), 1);
    let sizes: Vec<usize> = requests
        .iter()
        .map(|r| r.json()["notices"].as_array().map_or(0, Vec::len))
        .collect();
    assert!(
        sizes.iter().all(|n| (1..=10).contains(n)),
        "batches hold 1 to batch_max notices: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|n| *n > 1),
        "notices were batched: {sizes:?}"
    );
    for r in &requests {
        assert!(verify(FIN_SECRET, r), "one signature over the whole batch");
        assert!(r.id.starts_with("batch_"), "webhook-id {}", r.id);
        let body = r.json();
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(1),
            "only \"notices\""
        );
        for n in body["notices"].as_array().expect("notices") {
            assert_eq!(n["type"], "punishment");
            assert!(n["record"]["facts"].is_string(), "{n:#}");
        }
    }
    // The failed batch came due again as one and was sent again whole,
    // under the same webhook-id.
    let failed = requests.iter().find(|r| r.status == 503).expect("failed");
    let again = requests
        .iter()
        .find(|r| r.status != 503 && r.id == failed.id)
        .expect("the failed batch sent again whole");
    assert_eq!(again.json()["notices"], failed.json()["notices"]);

    // Without batch_max: one notice per request, the notice at the top.
    let land_got = land.wait_for(25, 20).await;
    assert_eq!(land_got.len(), 25);
    for r in &land_got {
        assert!(verify(LAND_SECRET, r));
        assert_eq!(r.json()["notice_id"], r.id);
    }
}

/// `batch_max` changed by an administrator at run time applies from the
/// next claim round, both ways, without a restart: single notices, then
/// batches, then single notices again, every notice arriving once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_max_changed_at_run_time_applies_to_the_next_notices() {
    let env = Env::new();
    let land = Receiver::start(env.root.path(), "land", &env.pki.dir.join("ca.pem"), 0).await;
    env.subscribe(&push_sub(
        "land-push",
        "agency-land",
        &land,
        LAND_SECRET,
        "items = [\"serious_dishonesty\"]",
    ));
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let admin = env.client(server.addr, "admin-credit-office");
    let (admin, land) = (&admin, &land);
    let set_batch_max = move |batch_max: Option<u32>| {
        let mut sub = json!({"agency": "agency-land", "mode": "push", "items": ["serious_dishonesty"],
            "endpoint": land.endpoint(), "ca_file": land.ca_file, "signing_secret": LAND_SECRET});
        if let Some(b) = batch_max {
            sub["batch_max"] = json!(b);
        }
        async move {
            let r =
                crate::admin::send_json(admin, "PUT", "/admin/v1/subscriptions/land-push", &sub)
                    .await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        }
    };
    // The notices of `expected` as the receiver saw them, from request
    // `from` on: (notice ids, notices per request).
    let arrived =
        move |from: usize, expected: &[String]| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let expected = expected.to_vec();
            async move {
                loop {
                    let requests: Vec<Received> = land.requests().into_iter().skip(from).collect();
                    let mut ids = Vec::new();
                    let mut sizes = Vec::new();
                    for r in &requests {
                        assert!(verify(LAND_SECRET, r), "signature of {}", r.id);
                        let body = r.json();
                        match body["notices"].as_array() {
                            Some(batch) => {
                                assert!(r.id.starts_with("batch_"), "webhook-id {}", r.id);
                                sizes.push(batch.len());
                                ids.extend(batch.iter().map(|n| {
                                    n["notice_id"].as_str().unwrap_or_default().to_owned()
                                }));
                            }
                            None => {
                                assert_eq!(body["notice_id"], r.id.as_str(), "a single notice");
                                sizes.push(0);
                                ids.push(r.id.clone());
                            }
                        }
                    }
                    ids.sort();
                    if ids == expected || std::time::Instant::now() > deadline {
                        assert_eq!(ids, expected, "each notice arrives once");
                        return (requests.len(), sizes);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };

    let first = submit_dishonesty(&dept, 900..904).await;
    let (seen, sizes) = arrived(0, &first).await;
    assert_eq!(
        sizes,
        vec![0; 4],
        "without batch_max, one notice per request"
    );

    set_batch_max(Some(10)).await;
    let second = submit_dishonesty(&dept, 904..919).await;
    let (n, sizes) = arrived(seen, &second).await;
    assert!(
        sizes.iter().all(|s| (1..=10).contains(s)),
        "after the change, batches of 1 to 10: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|s| *s > 1),
        "notices were batched: {sizes:?}"
    );

    set_batch_max(None).await;
    let third = submit_dishonesty(&dept, 919..922).await;
    let (_, sizes) = arrived(seen + n, &third).await;
    assert_eq!(sizes, vec![0; 3], "batch_max removed: single notices again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_delivery_is_listed_and_retried_by_an_admin() {
    let env = Env::new();
    let rx = Receiver::start(env.root.path(), "down", &env.pki.dir.join("ca.pem"), 0).await;
    rx.set_always_fail(true);
    env.subscribe(&push_sub(
        "down-push",
        "agency-finance",
        &rx,
        FIN_SECRET,
        "items = [\"serious_dishonesty\"]",
    ));
    let mut env = env;
    env.config.delivery.retry_schedule_secs = vec![1];
    let server = Server::start(&env).await;
    let result = submit(
        &env.client(server.addr, "dept-court"),
        "serious_dishonesty",
        record_about("serious_dishonesty", "legal_entity", ""),
    )
    .await;
    let notice = result["notice_id"].as_str().expect("notice").to_owned();
    let admin = env.client(server.addr, "admin-credit-office");
    // Two attempts (first + one retry), then dead.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let doc = admin.get("/admin/v1/deliveries?state=dead").await.json();
        if let Some(d) = doc["deliveries"]
            .as_array()
            .and_then(|a| a.first())
            .cloned()
        {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivery never died"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead["notice_id"], notice);
    assert_eq!(dead["attempts"], 2);
    assert!(dead["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("500")));
    assert_eq!(rx.requests().len(), 2);
    // Non-admins may not see or retry deliveries.
    assert_eq!(
        env.client(server.addr, "agency-finance")
            .get("/admin/v1/deliveries?state=dead")
            .await
            .status,
        403
    );
    // The endpoint recovers; the admin retries; the notice arrives.
    rx.set_always_fail(false);
    let id = dead["id"].as_str().expect("id");
    let resp = admin
        .send(
            "POST",
            &format!("/admin/v1/deliveries/{id}/retry"),
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("retry");
    assert_eq!(resp.status, 200);
    let got = rx.wait_for(1, 10).await;
    assert_eq!(got[0].id, notice);
    let resp = admin
        .send(
            "POST",
            &format!("/admin/v1/deliveries/{id}/retry"),
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("retry");
    assert_eq!(resp.status, 404, "a delivered delivery is not dead");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_deliveries_loses_nothing() {
    let env = Env::new();
    let rx = Receiver::start(env.root.path(), "slow", &env.pki.dir.join("ca.pem"), 0).await;
    rx.set_always_fail(true);
    env.subscribe(
        &[
            push_sub(
                "land-push",
                "agency-land",
                &rx,
                LAND_SECRET,
                "items = [\"serious_dishonesty\"]",
            ),
            pull_sub("proc-pull", "agency-procurement", ""),
        ]
        .concat(),
    );
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-court");
    let mut expected = Vec::new();
    for n in 0..20 {
        let result = submit(
            &dept,
            "serious_dishonesty",
            synth::record("serious_dishonesty", n, ""),
        )
        .await;
        expected.push(result["notice_id"].as_str().expect("notice").to_owned());
    }
    // Deliveries are failing and being retried when the gateway stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop().await;
    rx.set_always_fail(false);
    let server = Server::start(&env).await;
    let got = rx.wait_for(20, 30).await;
    let got: HashSet<String> = got.into_iter().map(|r| r.id).collect();
    assert_eq!(got, expected.iter().cloned().collect::<HashSet<_>>());
    // The pulling agency sees all 20 in order, across the restart.
    let (pulled, _, _) = pull_all(&env.client(server.addr, "agency-procurement"), "0").await;
    assert_eq!(ids(&pulled), expected);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_long_polls_acknowledges_and_resumes_from_the_acked_position() {
    let env = Env::new();
    env.subscribe(&pull_sub("proc-pull", "agency-procurement", ""));
    let server = Server::start(&env).await;
    let agency = env.client(server.addr, "agency-procurement");
    // A long poll returns as soon as a notice is committed.
    let waiting = {
        let agency = agency.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let resp = agency.get("/v1/notices?wait=20").await;
            (resp, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dept = env.client(server.addr, "dept-court");
    let first = submit(
        &dept,
        "serious_dishonesty",
        synth::record("serious_dishonesty", 1, ""),
    )
    .await;
    let (resp, waited) = waiting.await.expect("join");
    assert!(
        waited < Duration::from_secs(10),
        "long poll did not wake: {waited:?}"
    );
    let doc = resp.json();
    assert_eq!(doc["notices"][0]["notice_id"], first["notice_id"]);
    let cursor = doc["next_cursor"].as_str().expect("cursor").to_owned();
    // Without `after`, pulling starts at the acknowledged position.
    let second = submit(
        &dept,
        "serious_dishonesty",
        synth::record("serious_dishonesty", 2, ""),
    )
    .await;
    assert_eq!(
        agency.get("/v1/notices").await.json()["notices"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    let ack = agency
        .post_json("/v1/notices/ack", &json!({"cursor": cursor}))
        .await;
    assert_eq!(ack.status, 200);
    server.stop().await;
    let server = Server::start(&env).await;
    let agency = env.client(server.addr, "agency-procurement");
    let doc = agency.get("/v1/notices").await.json();
    assert_eq!(
        ids(doc["notices"].as_array().expect("notices")),
        [second["notice_id"].as_str().expect("id").to_owned()]
    );
    // An empty poll with wait=1 returns an empty page after about a second.
    let doc = agency
        .get(&format!(
            "/v1/notices?after={}&wait=1",
            doc["next_cursor"].as_str().expect("cursor")
        ))
        .await
        .json();
    assert_eq!(doc["notices"].as_array().map(Vec::len), Some(0));
    // Bad parameters and non-agencies are refused clearly.
    assert_eq!(
        agency.get("/v1/notices?wait=31").await.json()["code"],
        "invalid_query"
    );
    assert_eq!(
        agency.get("/v1/notices?after=abc").await.json()["code"],
        "invalid_query"
    );
    assert_eq!(agency.get("/v1/notices?limit=0").await.status, 400);
    assert_eq!(
        env.client(server.addr, "dept-court")
            .get("/v1/notices")
            .await
            .status,
        403
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_past_its_effective_period_is_lifted_once() {
    let mut env = Env::new();
    env.config.delivery.expiry_check_secs = 1;
    env.subscribe(&pull_sub("proc-pull", "agency-procurement", ""));
    let server = Server::start(&env).await;
    let mut record = synth::record("serious_dishonesty", 3, "");
    record["listing_date"] = json!("2020-01-01");
    record["planned_removal_date"] = json!("2021-01-01");
    let current = synth::record("serious_dishonesty", 4, "");
    let dept = env.client(server.addr, "dept-court");
    let expired = submit(&dept, "serious_dishonesty", record).await;
    submit(&dept, "serious_dishonesty", current).await;
    let agency = env.client(server.addr, "agency-procurement");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (notices, _, _) = pull_all(&agency, "0").await;
        if notices.iter().any(|n| n["type"] == "lift") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no lift on expiry");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several more expiry checks pass; still exactly one lift.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (notices, _, _) = pull_all(&agency, "0").await;
    let lifts: Vec<&Value> = notices.iter().filter(|n| n["type"] == "lift").collect();
    assert_eq!(lifts.len(), 1, "{notices:#?}");
    assert_eq!(lifts[0]["lifts"], expired["notice_id"]);
    assert_eq!(lifts[0]["reason"], "expired");
    let rec = dept
        .get(&format!(
            "/v1/records/{}",
            expired["record_id"].as_str().expect("id")
        ))
        .await
        .json();
    assert_eq!(rec["status"], "expired");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_push_subscription_is_used_at_once() {
    let env = Env::new();
    let first = Receiver::start(env.root.path(), "first", &env.pki.dir.join("ca.pem"), 0).await;
    let second = Receiver::start(env.root.path(), "second", &env.pki.dir.join("ca.pem"), 0).await;
    env.subscribe(&push_sub(
        "land-push",
        "agency-land",
        &first,
        LAND_SECRET,
        "items = [\"serious_dishonesty\"]",
    ));
    let server = Server::start(&env).await;
    let court = env.client(server.addr, "dept-court");
    let one = submit(
        &court,
        "serious_dishonesty",
        synth::record("serious_dishonesty", 1, ""),
    )
    .await;
    assert_eq!(
        first.wait_for(1, 10).await[0].id,
        one["notice_id"].as_str().expect("id")
    );
    // The administrator moves the subscription to another endpoint, with
    // another CA and another secret.
    let admin = env.client(server.addr, "admin-credit-office");
    let moved = json!({
        "agency": "agency-land", "mode": "push", "items": ["serious_dishonesty"],
        "endpoint": second.endpoint(), "ca_file": second.ca_file, "signing_secret": FIN_SECRET,
    });
    let r = admin
        .send(
            "PUT",
            "/admin/v1/subscriptions/land-push",
            &[("content-type", "application/json")],
            serde_json::to_vec(&moved).expect("json"),
        )
        .await
        .expect("put");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["signing_secret"],
        "(set)",
        "the secret is never shown"
    );
    let two = submit(
        &court,
        "serious_dishonesty",
        synth::record("serious_dishonesty", 2, ""),
    )
    .await;
    let got = second.wait_for(1, 10).await;
    assert_eq!(got[0].id, two["notice_id"].as_str().expect("id"));
    assert!(verify(FIN_SECRET, &got[0]), "signed with the new secret");
    assert_eq!(
        first.accepted().len(),
        1,
        "nothing more went to the old endpoint"
    );
    server.stop().await;
}
