//! The HTTP contract as a document: `/v1/openapi.json` lists every route
//! the gateway answers (and no method it does not), carries the active
//! catalog versions' record schemas, and describes every error answer as a
//! problem with its codes. The rest are the faults Schemathesis found
//! (load-tests/contract/schemathesis.sh), each kept here as a regression.

use serde_json::{json, Value};

use credgate::synth;

use crate::support::{submit_one, Client, Env, Resp, Server};

const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];

/// A concrete path for a documented template (`{x}` → a placeholder).
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|seg| match seg {
            "{action}" => "enable",
            s if s.starts_with('{') => "x1",
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn problem(resp: &Resp) -> Value {
    assert_eq!(
        resp.header("content-type"),
        Some("application/problem+json"),
        "{} {}",
        resp.status,
        String::from_utf8_lossy(&resp.body)
    );
    resp.json()
}

async fn send(client: &Client, method: &str, path: &str, body: &str) -> Resp {
    client
        .send(
            &method.to_uppercase(),
            path,
            &[("content-type", "application/json")],
            body.to_owned(),
        )
        .await
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_and_the_active_record_schemas() {
    let mut env = Env::new();
    env.config.public.enabled = true;
    let server = Server::start(&env).await;
    let admin = env.client(server.addr, "admin-credit-office");
    let market = env.client(server.addr, "dept-market");

    // Any participant reads it.
    let resp = market.get("/v1/openapi.json").await;
    assert_eq!(resp.status, 200);
    let doc = resp.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 40, "{} paths", paths.len());

    // Every documented operation of the mTLS listener is routed (no
    // `not_found` / `method_not_allowed` from the router), and every method
    // the document does not list for a path is refused with 405.
    for (path, item) in paths {
        let client = if path.starts_with("/v1/") || path.starts_with("/admin/") {
            &admin
        } else {
            continue;
        };
        let url = concrete(path);
        for method in METHODS {
            let resp = send(client, method, &url, "{}").await;
            let (code, detail) = if resp.status >= 400 {
                let p = problem(&resp);
                let text = |k: &str| p[k].as_str().unwrap_or("").to_owned();
                (text("code"), text("detail"))
            } else {
                Default::default()
            };
            if item.get(method).is_some() {
                // The router's own 404 names the API reference; a
                // handler's `not_found` names the thing it did not find.
                assert!(
                    !detail.contains("API reference") && code != "method_not_allowed",
                    "{method} {url}: documented but not routed ({})",
                    resp.status
                );
                // Every error answer carries a code the document names.
                if resp.status >= 400 {
                    let listed = &item[method]["responses"][resp.status.to_string()];
                    let codes = listed["x-problem-codes"].as_array();
                    assert!(
                        codes.is_some_and(|c| c.iter().any(|x| x == code.as_str())),
                        "{method} {url}: {} {code} is not in the document",
                        resp.status
                    );
                }
            } else {
                assert_eq!(resp.status, 405, "{method} {url}: routed but undocumented");
            }
        }
    }

    // The record schemas are the active catalog's, item by item.
    let catalog = market.get("/v1/catalog").await.json();
    let items = catalog["items"].as_array().expect("items");
    assert!(!items.is_empty());
    for item in items {
        let id = item["id"].as_str().expect("id");
        let active = market.get(&format!("/v1/catalog/items/{id}")).await.json();
        let mut expected = active["schema"].clone();
        expected.as_object_mut().expect("schema").remove("$schema");
        let mut documented = doc["components"]["schemas"][format!("record.{id}")].clone();
        documented
            .as_object_mut()
            .expect("documented")
            .remove("title");
        assert_eq!(documented, expected, "record.{id}");
    }

    // An activated change is in the next document: an optional field.
    let patch = json!({"schema": {"properties": {"contract_probe": {
        "type": "string", "maxLength": 20, "x-class": "public", "x-zh": "契约探针"}}}});
    let resp = admin
        .send(
            "PATCH",
            "/admin/v1/catalog/items/administrative_penalty",
            &[("content-type", "application/merge-patch+json")],
            serde_json::to_vec(&patch).expect("json"),
        )
        .await
        .expect("patch");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let doc = market.get("/v1/openapi.json").await.json();
    assert_eq!(
        doc["components"]["schemas"]["record.administrative_penalty"]["properties"]
            ["contract_probe"]["x-zh"],
        "契约探针"
    );
    server.stop().await;
}

/// The faults Schemathesis found, each answered as the document says now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_faults_the_contract_tester_found_stay_fixed() {
    let mut env = Env::new();
    env.config.public.enabled = true;
    let server = Server::start(&env).await;
    let admin = env.client(server.addr, "admin-credit-office");
    let market = env.client(server.addr, "dept-market");
    let agency = env.client(server.addr, "agency-procurement");

    // A version that is not a number: a 404 problem, not the framework's
    // plain-text 400.
    let resp = admin
        .get("/admin/v1/catalog/items/administrative_penalty/versions/abc")
        .await;
    assert_eq!(resp.status, 404);
    assert_eq!(problem(&resp)["code"], "unknown_version");

    // 3.0 is the JSON number 3: a correction's revision and a rollback's
    // version written with a fraction part are read as whole numbers.
    let record = synth::record("administrative_penalty", 4_242, "general");
    let id = submit_one(&market, "administrative_penalty", record.clone()).await;
    // The audit log's after and before together are a range (the
    // document allows both), newest first; and the filters apply.
    let resp = admin
        .get(&format!(
            "/admin/v1/audit?after=-9223372036854775808&before=1&actor={0}&kind={0}",
            "0".repeat(100)
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["entries"], json!([]));
    let all = admin.get("/admin/v1/audit?limit=1000").await.json();
    let n = all["entries"].as_array().map_or(0, Vec::len) as i64;
    assert!(n >= 3, "{all}");
    let between = admin
        .get(&format!("/admin/v1/audit?after=1&before={n}"))
        .await
        .json();
    let seqs: Vec<i64> = between["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["seq"].as_i64())
        .collect();
    assert_eq!(
        seqs,
        (2..n).rev().collect::<Vec<_>>(),
        "newest first, strictly between"
    );
    let mine = admin
        .get("/admin/v1/audit?actor=gateway&kind=submissions")
        .await
        .json();
    let entries = mine["entries"].as_array().expect("entries");
    assert!(!entries.is_empty(), "{mine}");
    assert!(entries.iter().all(|e| e["actor"] == "gateway"
        && e["action"]
            .as_str()
            .is_some_and(|a| a == "submissions" || a.starts_with("submissions."))));

    let resp = send(
        &market,
        "put",
        &format!("/v1/records/{id}"),
        &json!({"record": record, "reason": "typo in the facts", "revision": 1.0}).to_string(),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let resp = send(
        &admin,
        "post",
        "/admin/v1/catalog/items/administrative_penalty/rollback",
        r#"{"version": 1.0}"#,
    )
    .await;
    assert_ne!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));

    // An acknowledgement with a member it does not have is refused, as
    // every other request document is.
    let cursor = agency.get("/v1/notices").await.json()["next_cursor"].clone();
    let resp = send(
        &agency,
        "post",
        "/v1/notices/ack",
        &json!({"cursor": cursor, "cusor": cursor}).to_string(),
    )
    .await;
    assert_eq!(resp.status, 400);
    let p = problem(&resp);
    assert_eq!(p["code"], "invalid_document");
    assert_eq!(p["errors"][0]["pointer"], "/cusor");

    // A refusal before the handler reads the body (an agency on an admin
    // route) reaches a client sending 3 MiB as the problem document, not
    // as a connection reset.
    let big = format!(
        r#"{{"agency": "agency-finance", "pad": "{}"}}"#,
        "x".repeat(3 << 20)
    );
    let resp = agency
        .send(
            "PUT",
            "/admin/v1/subscriptions/s1",
            &[("content-type", "application/json")],
            big,
        )
        .await
        .expect("the 403 arrives, not a reset");
    assert_eq!(resp.status, 403);
    assert_eq!(problem(&resp)["code"], "admins_only");

    // The public channel: a query that cannot be read (a parameter given
    // twice) is an `invalid_query` problem, not the framework's plain text, and a text over 50 characters is refused
    // even when spaces pad it.
    let public = Client::new(
        server.public,
        &env.pki.dir,
        None,
        &env.pki.dir.join("ca.pem"),
    );
    let resp = public.get("/public/v1/records?q=ab&q=cd").await;
    assert_eq!(resp.status, 400);
    assert_eq!(problem(&resp)["code"], "invalid_query");
    let padded = format!("{}{}", "南京".repeat(10), "%20".repeat(40));
    let resp = public.get(&format!("/public/v1/records?q={padded}")).await;
    assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(problem(&resp)["errors"][0]["pointer"], "/q");
    server.stop().await;
}
