//! The public publicity channel: a general penalty shown during its
//! period and not after it or after its revocation; never a field that is
//! not `public`, never a natural person's ID number or full name; caching
//! validators and per-address limits; the search page in a real browser.

use serde_json::{json, Value};

use credgate::catalog::{Catalog, FieldClass, SubjectType};
use credgate::synth;

use crate::support::{read_until_closed, submit_one as submit, Client, Env, Server};

fn public_client(env: &Env, server: &Server) -> Client {
    Client::new(
        server.public,
        &env.pki.dir,
        None,
        &env.pki.dir.join("ca.pem"),
    )
}

async fn search(public: &Client, query: &str) -> Vec<Value> {
    let resp = public.get(&format!("/public/v1/records?{query}")).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    resp.json()["records"].as_array().expect("records").clone()
}

/// A synthetic record made about the legal entity `uscc`, `name`.
fn about_firm(mut record: Value, uscc: &str, name: &str) -> Value {
    let obj = record.as_object_mut().expect("object");
    obj.retain(|k, _| k != "id_type" && k != "id_number");
    obj.insert("subject_type".into(), json!("legal_entity"));
    obj.insert("uscc".into(), json!(uscc));
    obj.insert("subject_name".into(), json!(name));
    obj.insert("legal_representative".into(), json!("周公示"));
    obj.insert("legal_representative_id_type".into(), json!("resident_id"));
    obj.insert(
        "legal_representative_id_number".into(),
        json!(synth::resident_id(9_999)),
    );
    record
}

fn percent(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Every field of every shown record is `public` for its item and subject
/// type, and no ID number appears anywhere.
fn assert_only_public(catalog: &Catalog, records: &[Value], secrets: &[String]) {
    for r in records {
        let item = catalog
            .get(r["item"].as_str().expect("item"))
            .expect("item");
        let fields = r["record"].as_object().expect("record");
        let subject_type = fields
            .get("subject_type")
            .cloned()
            .and_then(|v| serde_json::from_value::<SubjectType>(v).ok());
        for key in fields.keys() {
            let class = item.class_of(key, subject_type);
            let masked_name =
                key == "subject_name" && subject_type == Some(SubjectType::NaturalPerson);
            assert!(
                class == FieldClass::Public || masked_name,
                "{key} ({class:?}) on the public channel: {r:#}"
            );
        }
        let text = r.to_string();
        for s in secrets {
            assert!(
                !text.contains(s.as_str()),
                "a secret on the public channel: {r:#}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_channel_shows_what_the_rules_publish_and_nothing_else() {
    let mut env = Env::new();
    env.config.public.enabled = true;
    let server = Server::start(&env).await;
    let market = env.client(server.addr, "dept-market");
    let court = env.client(server.addr, "dept-court");
    let public = public_client(&env, &server);
    let catalog = Catalog::load_dir(&env.config.catalog.dir, &|_| true).expect("catalog");

    // A general penalty decided 2026-10-15: published 3-12 months under
    // the 2026-04 rules, until its own publicity end 2027-10-14.
    let uscc = synth::uscc("91320100", 9_800);
    let penalty = about_firm(
        synth::record("administrative_penalty", 9_800, "general"),
        &uscc,
        "南京公示测试餐饮管理有限公司",
    );
    let penalty_id = submit(&market, "administrative_penalty", penalty.clone()).await;
    // A general penalty decided 2022-01-10: its period (at most 12 months
    // under the 2019-07 rules) ended long ago, whatever end it names.
    let mut old = about_firm(
        synth::record("administrative_penalty", 9_801, "general"),
        &uscc,
        "南京公示测试餐饮管理有限公司",
    );
    old["decision_date"] = json!("2022-01-10");
    old["valid_until"] = json!("2030-01-01");
    old["publicity_end"] = json!("2030-01-01");
    submit(&market, "administrative_penalty", old).await;
    // A penalty about a natural person: not published (the catalog says
    // penalties of natural persons are not).
    let person_id = synth::resident_id(9_802);
    let mut person_penalty = synth::record("administrative_penalty", 9_802, "serious");
    let obj = person_penalty.as_object_mut().expect("object");
    obj.retain(|k, _| !k.starts_with("legal_representative") && k != "uscc");
    obj.insert("subject_type".into(), json!("natural_person"));
    obj.insert("subject_name".into(), json!("王小明"));
    obj.insert("id_type".into(), json!("resident_id"));
    obj.insert("id_number".into(), json!(person_id));
    submit(&market, "administrative_penalty", person_penalty).await;
    // A court judgment defaulter who is a natural person: published, the
    // name masked, never the number.
    let debtor_id = synth::resident_id(9_803);
    let mut debtor = synth::record("serious_dishonesty", 9_803, "");
    let obj = debtor.as_object_mut().expect("object");
    obj.retain(|k, _| !k.starts_with("legal_representative") && k != "uscc");
    obj.insert("subject_type".into(), json!("natural_person"));
    obj.insert("subject_name".into(), json!("李大伟"));
    obj.insert("id_type".into(), json!("resident_id"));
    obj.insert("id_number".into(), json!(debtor_id));
    obj.insert("list_kind".into(), json!("dishonest_judgment_debtor"));
    submit(&court, "serious_dishonesty", debtor).await;
    let secrets = vec![
        person_id.clone(),
        debtor_id.clone(),
        person_id[..14].to_owned(),
        debtor_id[..14].to_owned(),
        "王小明".to_owned(),
        "李大伟".to_owned(),
        synth::resident_id(9_999),
        "周公示".to_owned(),
    ];

    // By USCC: the current penalty only, with its public fields.
    let found = search(&public, &format!("q={uscc}")).await;
    assert_eq!(found.len(), 1, "{found:#?}");
    let shown = &found[0];
    assert_eq!(shown["item"], "administrative_penalty");
    assert_eq!(
        shown["record"]["decision_number"],
        penalty["decision_number"]
    );
    assert_eq!(
        shown["record"]["penalty_content"],
        penalty["penalty_content"]
    );
    assert_eq!(shown["publicity"]["rule_set"], "2026-04");
    assert_eq!(shown["publicity"]["from"], "2026-10-15");
    assert_eq!(shown["publicity"]["until"], "2027-10-14");
    for shared in [
        "violation_facts",
        "fine_amount",
        "legal_representative",
        "remark",
    ] {
        assert!(shown["record"].get(shared).is_none(), "{shared}: {shown:#}");
    }
    let public_id = shown["public_id"].as_str().expect("public id").to_owned();
    assert_ne!(public_id, penalty_id, "the public id is not the record id");
    // By part of the name, and by id.
    let by_name = search(&public, &format!("q={}", percent("公示测试餐饮"))).await;
    assert_eq!(by_name.len(), 1);
    let one = public.get(&format!("/public/v1/records/{public_id}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["record"], shown["record"]);

    // The natural person: listed with the item, masked; never found by name.
    let listed = search(&public, "item=serious_dishonesty").await;
    let person: Vec<&Value> = listed
        .iter()
        .filter(|r| r["record"]["subject_type"] == "natural_person")
        .collect();
    assert_eq!(person.len(), 1, "{listed:#?}");
    assert_eq!(person[0]["record"]["subject_name"], "李**");
    assert!(search(&public, &format!("q={}", percent("李大伟")))
        .await
        .is_empty());
    let everything = search(&public, "").await;
    assert_eq!(everything.len(), 2, "{everything:#?}");
    assert_only_public(&catalog, &everything, &secrets);
    assert_only_public(&catalog, &listed, &secrets);
    assert_only_public(&catalog, &[one.json()], &secrets);

    // Validators and caching.
    let first = public.get(&format!("/public/v1/records?q={uscc}")).await;
    let etag = first.header("etag").expect("etag").to_owned();
    assert!(first
        .header("cache-control")
        .is_some_and(|c| c.starts_with("public, max-age=")));
    let again = public
        .send(
            "GET",
            &format!("/public/v1/records?q={uscc}"),
            &[("if-none-match", etag.as_str())],
            Vec::new(),
        )
        .await
        .expect("request");
    assert_eq!(again.status, 304);

    // Bad searches: 400 with a pointer, never the text.
    let bad = public.get("/public/v1/records?q=x").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["errors"][0]["pointer"], "/q");
    let bad = public
        .get("/public/v1/records?item=credit_commitment")
        .await;
    assert_eq!(bad.json()["errors"][0]["pointer"], "/item");
    let page = public.get("/public/?q=x").await;
    assert_eq!(page.status, 400, "a bad search on the page");
    assert!(String::from_utf8_lossy(&page.body).contains("信用信息公示查询"));
    assert_eq!(public.get("/public/v1/records/00ff").await.status, 404);
    assert_eq!(public.get("/v1/catalog").await.status, 404);

    // Revoked: it leaves the channel at once.
    let resp = market
        .post_json(
            &format!("/v1/records/{penalty_id}/revocation"),
            &json!({"reason": "revoked"}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert!(search(&public, &format!("q={uscc}")).await.is_empty());
    assert_eq!(
        public
            .get(&format!("/public/v1/records/{public_id}"))
            .await
            .status,
        404
    );

    // Per-address limits: a burst past the quota gets 429 with Retry-After.
    let mut limited = None;
    for _ in 0..200 {
        let r = public.get("/public/v1/records?item=red_list").await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let limited = limited.expect("rate limited within 200 requests");
    assert_eq!(limited.json()["code"], "rate_limited");
    assert!(limited.header("retry-after").is_some());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_search_page_renders_in_chromium() {
    let mut env = Env::new();
    env.config.public.enabled = true;
    let server = Server::start(&env).await;
    let market = env.client(server.addr, "dept-market");
    let uscc = synth::uscc("91320100", 9_900);
    let penalty = about_firm(
        synth::record("administrative_penalty", 9_900, "general"),
        &uscc,
        "南京页面测试商贸有限公司",
    );
    submit(&market, "administrative_penalty", penalty.clone()).await;
    let public = public_client(&env, &server);
    let found = search(&public, &format!("q={}", percent("页面测试商贸"))).await;
    assert_eq!(found.len(), 1, "{found:#?}");

    let browser = crate::browser::Browser::new(&env, server.public.port(), None);
    let path = format!("/public/?q={}", percent("页面测试商贸"));
    let dom = browser.dom(&path);
    let text = browser.print(&path, "public-search");
    let decision = penalty["decision_number"].as_str().expect("number");
    for want in [
        "信用信息公示查询",
        "南京页面测试商贸有限公司",
        "行政处罚",
        decision,
        uscc.as_str(),
        "公示期：2026-10-15 至 2027-10-14",
        // Coded values by their Chinese names.
        "警告、罚款、没收违法所得",
        "法人及非法人组织",
    ] {
        assert!(dom.contains(want), "{want:?} not in the page:\n{dom}");
        assert!(
            text.replace(char::is_whitespace, "")
                .contains(&want.replace(char::is_whitespace, "")),
            "{want:?} not in the printed page:\n{text}"
        );
    }
    for not_public in ["violation_facts", "经查，当事人"] {
        assert!(!dom.contains(not_public), "{not_public} on the page");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_connections_are_bounded_in_number_and_age() {
    let mut env = Env::new();
    env.config.public.enabled = true;
    env.config.public.max_connection_age_secs = 2;
    env.config.public.max_connections = 2;
    let server = Server::start(&env).await;
    let public = public_client(&env, &server);
    // An old connection is told to go after its age; what it asked before
    // is answered.
    let mut conn = public.connect(false).await.expect("connect");
    let opened = std::time::Instant::now();
    let mut answered = 0;
    while let Ok(r) = conn.send("GET", "/public/v1/records", &[], "").await {
        assert_eq!(r.status, 200);
        answered += 1;
        assert!(
            opened.elapsed() < std::time::Duration::from_secs(8),
            "never closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        opened.elapsed() >= std::time::Duration::from_millis(1900) && answered >= 5,
        "closed after {:?} and {answered} requests",
        opened.elapsed()
    );
    // Two open connections take every slot: a third waits until one goes.
    let mut a = public.connect(false).await.expect("a");
    let _b = public.connect(false).await.expect("b");
    assert_eq!(
        a.send("GET", "/public/v1/records", &[], "")
            .await
            .expect("a")
            .status,
        200
    );
    let third = tokio::time::timeout(std::time::Duration::from_millis(700), async {
        let mut c = public.connect(false).await?;
        c.send("GET", "/public/v1/records", &[], "").await
    })
    .await;
    assert!(third.is_err(), "a third connection was served at once");
    drop(a);
    let mut c = public.connect(false).await.expect("c");
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        c.send("GET", "/public/v1/records", &[], ""),
    )
    .await
    .expect("served once a slot is free")
    .expect("answer");
    assert_eq!(r.status, 200);
    drop(c);
    // One that never asks anything is closed cleanly at the same age.
    let mut unused = public.connect_tls(false).await.expect("unused");
    let opened = std::time::Instant::now();
    let read = read_until_closed(&mut unused, std::time::Duration::from_secs(6)).await;
    assert_eq!(read.expect("a clean TLS close"), 0);
    assert!(
        opened.elapsed() >= std::time::Duration::from_millis(1900),
        "closed after {:?}",
        opened.elapsed()
    );
    server.stop().await;
}
