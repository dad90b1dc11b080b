//! Administration at run time: catalog versions and compatibility,
//! participants and subscriptions, the audit log, quality statistics.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::support::{Client, Env, Resp, Server};
use credgate::synth;

pub(crate) async fn send_json(client: &Client, method: &str, path: &str, body: &Value) -> Resp {
    client
        .send(
            method,
            path,
            &[("content-type", "application/json")],
            serde_json::to_vec(body).expect("json"),
        )
        .await
        .expect("request")
}

fn inspection_field() -> Value {
    json!({"type": "string", "maxLength": 40, "x-class": "public", "x-zh": "检查编号"})
}

/// The active penalty definition with one more optional field.
pub(crate) async fn penalty_with_field(admin: &Client) -> Value {
    let mut def = admin
        .get("/admin/v1/catalog/items/administrative_penalty")
        .await
        .json();
    def["schema"]["properties"]["inspection_code"] = inspection_field();
    def.as_object_mut().expect("object").remove("version");
    def
}

/// Activates the penalty item's version with the extra field, through
/// `admin`'s instance.
pub(crate) async fn activate_penalty_with_field(admin: &Client) {
    let v2 = penalty_with_field(admin).await;
    let resp = send_json(
        admin,
        "PUT",
        "/admin/v1/catalog/items/administrative_penalty",
        &v2,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["activated"], true);
    assert_eq!(resp.json()["breaking"], false);
}

/// A record using the extra field is accepted under version 2.
pub(crate) async fn assert_v2_accepts_the_field(dept: &Client, n: u64) {
    let r = dept
        .post_json(
            "/v1/records",
            &json!({"item": "administrative_penalty", "records": [penalty_using_field(n)]}),
        )
        .await
        .json();
    assert_eq!(
        (r["item_version"].clone(), r["accepted"].clone()),
        (json!(2), json!(1))
    );
}

pub(crate) fn penalty_using_field(n: u64) -> Value {
    let mut r = synth::record("administrative_penalty", n, "general");
    r["inspection_code"] = json!("JC-2026-0001");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_during_an_activation_are_each_validated_by_one_version() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let admin = env.client(server.addr, "admin-credit-office");
    let mut workers = Vec::new();
    for w in 0..6u64 {
        let client = env.client(server.addr, "dept-market");
        workers.push(tokio::spawn(async move {
            let mut conn = client.connect(false).await.expect("connect");
            let mut seen = Vec::new();
            let mut after_v2 = 0;
            for n in 0..400 {
                let body = serde_json::to_vec(&json!({"item": "administrative_penalty", "records": [penalty_using_field(w * 1000 + n)]})).expect("json");
                let r = conn.send("POST", "/v1/records", &[("content-type", "application/json")], body).await.expect("request");
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                let doc = r.json();
                let version = doc["item_version"].as_u64().expect("version");
                seen.push((version, doc["results"][0].clone()));
                if version == 2 {
                    after_v2 += 1;
                    if after_v2 > 5 {
                        break;
                    }
                }
            }
            seen
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    activate_penalty_with_field(&admin).await;
    let mut versions = HashSet::new();
    for w in workers {
        for (version, result) in w.await.expect("join") {
            versions.insert(version);
            match version {
                // Under v1 the field is unknown: rejected for its own content.
                1 => {
                    assert_eq!(result["status"], "rejected");
                    assert!(
                        result["errors"]
                            .as_array()
                            .expect("errors")
                            .iter()
                            .all(|e| e["code"] == "unknown_field"),
                        "{result:#}"
                    );
                }
                2 => assert_eq!(result["status"], "accepted", "{result:#}"),
                other => panic!("unexpected version {other}"),
            }
        }
    }
    assert_eq!(
        versions,
        HashSet::from([1, 2]),
        "submissions ran before and after the swap"
    );
    // Departments see the active version and a new ETag.
    let catalog = env
        .client(server.addr, "dept-market")
        .get("/v1/catalog")
        .await
        .json();
    let penalty = catalog["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["id"] == "administrative_penalty")
        .cloned()
        .expect("penalty");
    assert_eq!(penalty["version"], 2);
    server.stop().await;
    // The new version survives a restart (the store is authoritative).
    let server = Server::start(&env).await;
    assert_v2_accepts_the_field(&env.client(server.addr, "dept-market"), 9).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaking_changes_need_force_dry_runs_change_nothing_and_rollback_restores() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let admin = env.client(server.addr, "admin-credit-office");
    let dept = env.client(server.addr, "dept-market");
    let etag_before = dept
        .get("/v1/catalog")
        .await
        .header("etag")
        .expect("etag")
        .to_owned();

    // Dry run: classified, not activated, nothing changes.
    let v2 = penalty_with_field(&admin).await;
    let dry = send_json(
        &admin,
        "PUT",
        "/admin/v1/catalog/items/administrative_penalty?dry_run=true",
        &v2,
    )
    .await;
    assert_eq!(dry.status, 200);
    let dry = dry.json();
    assert_eq!(dry["activated"], false);
    assert!(dry["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .any(|c| c["change"] == "added_optional_field" && c["field"] == "inspection_code"));
    assert_eq!(
        dept.get("/v1/catalog").await.header("etag"),
        Some(etag_before.as_str())
    );
    let versions = admin
        .get("/admin/v1/catalog/items/administrative_penalty/versions")
        .await
        .json();
    assert_eq!(versions["versions"].as_array().map(Vec::len), Some(1));

    // Lowering a secret field to public is breaking: refused without force.
    let mut exposing = admin
        .get("/admin/v1/catalog/items/administrative_penalty")
        .await
        .json();
    exposing.as_object_mut().expect("object").remove("version");
    exposing["schema"]["properties"]["id_number"]["x-class"] = json!("public");
    let refused = send_json(
        &admin,
        "PUT",
        "/admin/v1/catalog/items/administrative_penalty",
        &exposing,
    )
    .await;
    assert_eq!(
        refused.status,
        409,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    let doc = refused.json();
    assert_eq!(doc["code"], "breaking_change");
    assert!(doc["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .any(|c| c["change"] == "class_lowered"
            && c["field"] == "id_number"
            && c["breaking"] == true));
    // Force without a reason is not enough.
    exposing["force"] = json!(true);
    assert_eq!(
        send_json(
            &admin,
            "PUT",
            "/admin/v1/catalog/items/administrative_penalty",
            &exposing
        )
        .await
        .status,
        409
    );
    exposing["reason"] =
        json!("Provincial decree 2026-17 makes natural persons' ID numbers public for this item");
    let forced = send_json(
        &admin,
        "PUT",
        "/admin/v1/catalog/items/administrative_penalty",
        &exposing,
    )
    .await;
    assert_eq!(
        forced.status,
        200,
        "{}",
        String::from_utf8_lossy(&forced.body)
    );
    assert_eq!(forced.json()["version"], 2);
    assert_eq!(forced.json()["breaking"], true);

    // A required field added with a merge patch is breaking too.
    let patch = json!({"schema": {"properties": {"inspection_code": inspection_field()}, "required": ["subject_name", "subject_type", "inspection_code"]}});
    let resp = admin
        .send(
            "PATCH",
            "/admin/v1/catalog/items/administrative_penalty",
            &[("content-type", "application/merge-patch+json")],
            serde_json::to_vec(&patch).expect("json"),
        )
        .await
        .expect("patch");
    assert_eq!(resp.status, 409);
    assert!(resp.json()["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .any(|c| c["change"] == "added_required_field"));

    // Rollback to version 1: raising the class again is compatible, so it
    // applies without force.
    let rb = send_json(
        &admin,
        "POST",
        "/admin/v1/catalog/items/administrative_penalty/rollback",
        &json!({"version": 1}),
    )
    .await;
    assert_eq!(rb.status, 200, "{}", String::from_utf8_lossy(&rb.body));
    assert_eq!(rb.json()["version"], 1);
    assert_eq!(
        dept.get("/v1/catalog").await.header("etag"),
        Some(etag_before.as_str()),
        "back to the same versions"
    );
    let versions = admin
        .get("/admin/v1/catalog/items/administrative_penalty/versions")
        .await
        .json();
    let list = versions["versions"].as_array().expect("versions");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["active"], true);
    assert!(list[1]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("decree")));
    assert_eq!(
        admin
            .get("/admin/v1/catalog/items/administrative_penalty/versions/2")
            .await
            .json()["schema"]["properties"]["id_number"]["x-class"],
        "public"
    );
    assert_eq!(
        send_json(
            &admin,
            "POST",
            "/admin/v1/catalog/items/administrative_penalty/rollback",
            &json!({"version": 9})
        )
        .await
        .status,
        404
    );

    // An invalid definition is refused with every problem listed.
    let mut invalid = admin.get("/admin/v1/catalog/items/red_list").await.json();
    invalid.as_object_mut().expect("object").remove("version");
    invalid["schema"]["properties"]["basis"]
        .as_object_mut()
        .expect("field")
        .remove("x-class");
    invalid["schema"]["properties"]["award_date"]["format"] = json!("lunar-date");
    invalid["providers"] = json!(["dept-market", "dept-nobody"]);
    let resp = send_json(&admin, "PUT", "/admin/v1/catalog/items/red_list", &invalid).await;
    assert_eq!(resp.status, 422);
    let doc = resp.json();
    assert_eq!(doc["code"], "invalid_definition");
    let text = doc["errors"].to_string();
    for needle in ["x-class is missing", "dept-nobody", "does not compile"] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
    // A stale version number is a conflict.
    let mut stale = admin.get("/admin/v1/catalog/items/red_list").await.json();
    stale["version"] = json!(1);
    assert_eq!(
        send_json(&admin, "PUT", "/admin/v1/catalog/items/red_list", &stale)
            .await
            .json()["code"],
        "version_conflict"
    );

    // The audit log holds the forced change with its reason.
    let audit = admin.get("/admin/v1/audit?limit=1000").await.json();
    let forced_entry = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["action"] == "catalog.activate" && e["details"]["breaking"] == true)
        .cloned()
        .expect("audit entry");
    assert_eq!(forced_entry["actor"], "admin-credit-office");
    assert!(forced_entry["details"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("decree")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_refuses_non_admins() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let routes: [(&str, &str); 22] = [
        ("GET", "/admin/v1/catalog/items"),
        ("GET", "/admin/v1/catalog/items/red_list"),
        ("PUT", "/admin/v1/catalog/items/red_list"),
        ("PATCH", "/admin/v1/catalog/items/red_list"),
        ("GET", "/admin/v1/catalog/items/red_list/versions"),
        ("GET", "/admin/v1/catalog/items/red_list/versions/1"),
        ("POST", "/admin/v1/catalog/items/red_list/rollback"),
        ("GET", "/admin/v1/participants"),
        ("GET", "/admin/v1/participants/dept-tax"),
        ("PUT", "/admin/v1/participants/dept-tax"),
        ("POST", "/admin/v1/participants/dept-tax/disable"),
        ("POST", "/admin/v1/participants/dept-tax/enable"),
        ("GET", "/admin/v1/subscriptions"),
        ("GET", "/admin/v1/subscriptions/x"),
        ("PUT", "/admin/v1/subscriptions/x"),
        ("POST", "/admin/v1/subscriptions/x/disable"),
        ("POST", "/admin/v1/subscriptions/x/enable"),
        ("GET", "/admin/v1/deliveries?state=dead"),
        ("POST", "/admin/v1/deliveries/x/retry"),
        ("GET", "/admin/v1/audit"),
        ("GET", "/admin/v1/stats/departments"),
        ("GET", "/admin/v1/stats/feedback"),
    ];
    for who in ["dept-market", "agency-procurement"] {
        let client = env.client(server.addr, who);
        for (method, path) in routes {
            let r = client
                .send(method, path, &[("content-type", "application/json")], "{}")
                .await
                .expect("request");
            assert_eq!(r.status, 403, "{who} {method} {path}");
            assert_eq!(r.json()["code"], "admins_only", "{who} {method} {path}");
        }
    }
    // The admin reaches them (GETs as a sample).
    let admin = env.client(server.addr, "admin-credit-office");
    for (method, path) in routes
        .iter()
        .filter(|(m, p)| *m == "GET" && !p.ends_with("/x"))
    {
        assert_eq!(
            admin
                .send(method, path, &[], bytes::Bytes::new())
                .await
                .expect("request")
                .status,
            200,
            "{path}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_and_subscriptions_change_at_once() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let admin = env.client(server.addr, "admin-credit-office");
    let tax = env.client(server.addr, "dept-tax");
    let red = json!({"item": "red_list", "records": [synth::record("red_list", 3, "")]});
    assert_eq!(tax.post_json("/v1/records", &red).await.status, 200);

    // Disabling takes effect for the next request.
    let r = admin
        .send(
            "POST",
            "/admin/v1/participants/dept-tax/disable",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("disable");
    assert_eq!(r.status, 200);
    let refused = tax.post_json("/v1/records", &red).await;
    assert_eq!(
        (refused.status, refused.json()["code"].clone()),
        (403, json!("participant_disabled"))
    );
    admin
        .send(
            "POST",
            "/admin/v1/participants/dept-tax/enable",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("enable");
    assert_eq!(tax.post_json("/v1/records", &red).await.status, 200);

    // Pinning a certificate: a different fingerprint locks the old one out.
    let mut p = admin.get("/admin/v1/participants/dept-tax").await.json();
    p["certificate_sha256"] = json!(["00".repeat(32)]);
    assert_eq!(
        send_json(&admin, "PUT", "/admin/v1/participants/dept-tax", &p)
            .await
            .status,
        200
    );
    assert_eq!(
        tax.post_json("/v1/records", &red).await.json()["code"],
        "certificate_not_pinned"
    );
    let pem = std::fs::read_to_string(env.pki.dir.join("dept-tax.pem")).expect("cert");
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("der");
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest;
    p["certificate_sha256"] = json!([hex::encode(sha2::Sha256::digest(der.as_ref()))]);
    assert_eq!(
        send_json(&admin, "PUT", "/admin/v1/participants/dept-tax", &p)
            .await
            .status,
        200
    );
    assert_eq!(tax.post_json("/v1/records", &red).await.status, 200);

    // A change that would break other settings is refused: a provider of
    // catalog items cannot become an agency.
    let mut market = admin.get("/admin/v1/participants/dept-market").await.json();
    market["kind"] = json!("agency");
    let r = send_json(&admin, "PUT", "/admin/v1/participants/dept-market", &market).await;
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (409, json!("conflicts"))
    );

    // A new participant can connect at once with a certificate from the CA.
    let newcomer = json!({"id": "agency-newcomer", "kind": "agency", "name": "New agency", "name_zh": "新机构", "clearance": "shared"});
    assert_eq!(
        send_json(
            &admin,
            "PUT",
            "/admin/v1/participants/agency-newcomer",
            &newcomer
        )
        .await
        .status,
        200
    );

    // Subscriptions: a new pull subscription routes the next notice.
    let sub = json!({"agency": "agency-land", "mode": "pull", "items": ["serious_dishonesty"]});
    let r = send_json(&admin, "PUT", "/admin/v1/subscriptions/land-pull", &sub).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // batch_max is a push setting, between 1 and 500; refused otherwise,
    // and nothing changes.
    let mut batched_pull = sub.clone();
    batched_pull["batch_max"] = json!(10);
    let r = send_json(
        &admin,
        "PUT",
        "/admin/v1/subscriptions/land-batch",
        &batched_pull,
    )
    .await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("batch_max"));
    for batch_max in [0, 501] {
        let push = json!({"agency": "agency-land", "mode": "push", "items": ["serious_dishonesty"],
            "endpoint": "https://localhost:9/hook", "ca_file": env.pki.dir.join("ca.pem"),
            "signing_secret": "whsec_c2VjcmV0LWZvci1sYW5kLWJ1cmVhdS1yZWNlaXZlcg==", "batch_max": batch_max});
        let r = send_json(&admin, "PUT", "/admin/v1/subscriptions/land-batch", &push).await;
        assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            String::from_utf8_lossy(&r.body).contains("batch_max: must be between 1 and 500"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let gone = admin.get("/admin/v1/subscriptions/land-batch").await;
    assert_eq!(gone.status, 404, "a refused subscription is not stored");
    let court = env.client(server.addr, "dept-court");
    let first = court.post_json("/v1/records", &json!({"item": "serious_dishonesty", "records": [synth::record("serious_dishonesty", 1, "")]})).await.json();
    let land = env.client(server.addr, "agency-land");
    let pulled = land.get("/v1/notices?after=0").await.json();
    assert_eq!(
        pulled["notices"][0]["notice_id"],
        first["results"][0]["notice_id"]
    );
    // A disabled agency gets no new notices, even after it is enabled again.
    admin
        .send(
            "POST",
            "/admin/v1/participants/agency-land/disable",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("disable");
    court.post_json("/v1/records", &json!({"item": "serious_dishonesty", "records": [synth::record("serious_dishonesty", 5, "")]})).await;
    admin
        .send(
            "POST",
            "/admin/v1/participants/agency-land/enable",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("enable");
    let pulled = land.get("/v1/notices?after=0").await.json();
    assert_eq!(
        pulled["notices"].as_array().map(Vec::len),
        Some(1),
        "{pulled:#}"
    );
    // An invalid subscription is refused with the reason.
    let bad = json!({"agency": "dept-market", "mode": "pull"});
    let r = send_json(&admin, "PUT", "/admin/v1/subscriptions/bad", &bad).await;
    assert_eq!(r.status, 422);
    assert!(r.json()["errors"].to_string().contains("not an agency"));
    // Disabled: the next notice does not reach the agency.
    admin
        .send(
            "POST",
            "/admin/v1/subscriptions/land-pull/disable",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("disable");
    court.post_json("/v1/records", &json!({"item": "serious_dishonesty", "records": [synth::record("serious_dishonesty", 2, "")]})).await;
    let pulled = land.get("/v1/notices?after=0").await.json();
    assert_eq!(pulled["notices"].as_array().map(Vec::len), Some(1));

    // The audit trail records who changed what, identity changes included.
    let audit = admin.get("/admin/v1/audit?limit=1000").await.json();
    let actions: Vec<String> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["action"].as_str().unwrap_or("").to_owned())
        .collect();
    for a in [
        "participant.disable",
        "participant.identity_change",
        "participant.create",
        "subscription.create",
        "subscription.disable",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
    server.stop().await;
    // Changes survive a restart.
    let server = Server::start(&env).await;
    let admin = env.client(server.addr, "admin-credit-office");
    let subs = admin.get("/admin/v1/subscriptions").await.json();
    let land_pull = subs["subscriptions"]
        .as_array()
        .expect("subs")
        .iter()
        .find(|s| s["id"] == "land-pull")
        .cloned()
        .expect("land-pull");
    assert_eq!(land_pull["enabled"], false);
    assert_eq!(
        admin
            .get("/admin/v1/participants/agency-newcomer")
            .await
            .status,
        200
    );
    server.stop().await;
}

use credgate::store::postgres::scratch::ScratchDatabase;

/// Runs `credgate audit verify` on a copy of `env`'s database after
/// running `tamper` (SQL) on the copy.
fn verify_copy(env: &Env, name: &str, tamper: &str) -> (i32, String) {
    let data = env.root.path().join(format!("data-{name}"));
    std::fs::create_dir_all(&data).expect("mkdir");
    // The store's last connections close a moment after the server task
    // ends; SQLite then checkpoints the WAL into the file and removes it.
    // Copying meanwhile could take a half-checkpointed file whose WAL is
    // gone by the time it is copied (seen under load).
    let wal = env.config.store.data_dir.join("credgate.db-wal");
    for _ in 0..200 {
        if !wal.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    // The SQLite file and the checkpoint file beside it (none on
    // PostgreSQL).
    for f in std::fs::read_dir(&env.config.store.data_dir)
        .into_iter()
        .flatten()
    {
        let f = f.expect("entry").path();
        std::fs::copy(&f, data.join(f.file_name().expect("name"))).expect("copy");
    }
    let mut copy = Env {
        config: env.config.clone(),
        ..Env::new()
    };
    copy.config.store.data_dir = data;
    if let Some(db) = &env.database {
        let db = crate::support::block_on(ScratchDatabase::copy_of(db.name.clone()))
            .expect("copy database");
        copy.config.store.url = Some(db.url.clone());
        copy.database = Some(db);
    }
    copy.sql_execute(tamper);
    copy.audit_verify(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_detects_changes_deletions_and_truncation() {
    let env = Env::new();
    env.subscribe(
        "[[subscription]]\nid = \"p\"\nagency = \"agency-procurement\"\nmode = \"pull\"\n",
    );
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    for n in 0..5 {
        dept.post_json("/v1/records", &json!({"item": "serious_dishonesty", "records": [synth::record("serious_dishonesty", n, "")]})).await;
    }
    let agency = env.client(server.addr, "agency-procurement");
    let page = agency.get("/v1/notices?after=0").await.json();
    agency
        .post_json("/v1/notices/ack", &json!({"cursor": page["next_cursor"]}))
        .await;
    server.stop().await; // writes the final checkpoint

    let (code, out) = verify_copy(&env, "intact", "");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact"), "{out}");
    // No audit entry carries a non-public value.
    let details = env.sql_texts("SELECT details FROM audit");
    for n in 0..5 {
        let r = synth::record("serious_dishonesty", n, "");
        for field in [
            "id_number",
            "legal_representative_id_number",
            "facts",
            "legal_representative",
        ] {
            if let Some(v) = r[field].as_str() {
                assert!(
                    !details.iter().any(|d| d.contains(v)),
                    "{field} in the audit log"
                );
            }
        }
    }

    // One byte of one entry: a submitter's name inside the details.
    let (code, out) = verify_copy(
        &env,
        "byte",
        "UPDATE audit SET details = replace(details, 'dept-market', 'dept-markeT') WHERE seq = (SELECT MIN(seq) FROM audit WHERE action = 'submissions')",
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("was changed"), "{out}");
    let (code, out) = verify_copy(&env, "deleted", "DELETE FROM audit WHERE seq = 4");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing"), "{out}");
    // Cutting off the tail: on SQLite even with the database's own
    // checkpoints gone (the file beside it still covers the tail); on a
    // shared PostgreSQL database the checkpoints live in the database.
    let truncate = if env.postgres() {
        "DELETE FROM audit WHERE seq > (SELECT MAX(seq) - 2 FROM audit)"
    } else {
        "DELETE FROM audit WHERE seq > (SELECT MAX(seq) - 2 FROM audit); DELETE FROM audit_checkpoints"
    };
    let (code, out) = verify_copy(&env, "truncated", truncate);
    assert_eq!(code, 1, "a checkpoint still covers the cut tail: {out}");
    assert!(out.contains("cut off"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn department_statistics_match_the_submissions() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let today = credgate::codes::today_cst();
    let three_days_ago = (today - time::Duration::days(3)).to_string();
    let twenty_days_ago = (today - time::Duration::days(20)).to_string();
    let market = env.client(server.addr, "dept-market");
    let mut good: Vec<Value> = (0..4)
        .map(|n| {
            let mut r = synth::record("administrative_licence", n, "");
            r["decision_date"] = json!(three_days_ago);
            r["valid_from"] = json!(three_days_ago);
            r
        })
        .collect();
    good[3]["decision_date"] = json!(twenty_days_ago);
    let mut bad_code = (0..100)
        .map(|n| synth::record("administrative_licence", n, ""))
        .find(|r| r["subject_type"] == "legal_entity")
        .expect("a legal entity");
    bad_code["uscc"] = json!("914403001922038217");
    let mut missing = synth::record("administrative_licence", 11, "");
    missing.as_object_mut().expect("object").remove("content");
    let mut records = good.clone();
    records.push(bad_code);
    records.push(missing);
    let r = market
        .post_json(
            "/v1/records",
            &json!({"item": "administrative_licence", "records": records}),
        )
        .await
        .json();
    assert_eq!(
        (r["accepted"].clone(), r["rejected"].clone()),
        (json!(4), json!(2))
    );
    let tax = env.client(server.addr, "dept-tax");
    tax.post_json(
        "/v1/records",
        &json!({"item": "red_list", "records": [synth::record("red_list", 1, "")]}),
    )
    .await;

    let stats = env
        .client(server.addr, "admin-credit-office")
        .get("/admin/v1/stats/departments")
        .await
        .json();
    let rows = stats["departments"].as_array().expect("rows");
    let lic = rows
        .iter()
        .find(|r| r["department"] == "dept-market" && r["item"] == "administrative_licence")
        .expect("licence row");
    assert_eq!(lic["submitted"], 6);
    assert_eq!(lic["accepted"], 4);
    assert_eq!(lic["rejected"], 2);
    assert!((lic["acceptance_rate"].as_f64().expect("rate") - 4.0 / 6.0).abs() < 1e-9);
    assert_eq!(lic["rejected_by_code"]["invalid_uscc"], 1);
    assert_eq!(lic["rejected_by_code"]["required"], 1);
    assert_eq!(lic["timeliness_median_days"], 3.0);
    assert_eq!(lic["timeliness_worst_days"], 20);
    assert_eq!(lic["within_7_working_days"], 0.75);
    let red = rows
        .iter()
        .find(|r| r["department"] == "dept-tax" && r["item"] == "red_list")
        .expect("red row");
    assert_eq!(
        (red["submitted"].clone(), red["acceptance_rate"].clone()),
        (json!(1), json!(1.0))
    );
    // A period that excludes everything is empty.
    let none = env
        .client(server.addr, "admin-credit-office")
        .get("/admin/v1/stats/departments?from=2020-01-01&to=2020-02-01")
        .await
        .json();
    assert_eq!(none["departments"].as_array().map(Vec::len), Some(0));
    server.stop().await;
}
