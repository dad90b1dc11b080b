//! The administration console in a real headless Chromium, driven over
//! WebDriver (chromedriver, fantoccini), with the administrator's client
//! certificate in the browser's own certificate store: the forms call the
//! admin API, the API's answers show on the page, and what the page did is
//! checked through the API and the audit log. Screenshots of the main pages
//! are kept in `target/browser/console-*.png`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::browser::Browser;
use crate::notices::{push_sub, record_about, submit, FIN_SECRET};
use crate::receiver::Receiver;
use crate::support::{Env, Server};

const ITEM: &str = "administrative_penalty";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_runs_the_exchange_from_the_console() {
    let mut env = Env::new();
    // A push endpoint that is down, so a delivery dies (two attempts).
    let rx = Receiver::start(env.root.path(), "down", &env.pki.dir.join("ca.pem"), 0).await;
    rx.set_always_fail(true);
    env.subscribe(&push_sub(
        "finance-push",
        "agency-finance",
        &rx,
        FIN_SECRET,
        "items = [\"serious_dishonesty\"]",
    ));
    env.config.delivery.retry_schedule_secs = vec![1];
    let server = Server::start(&env).await;
    let admin = env.client(server.addr, "admin-credit-office");
    let market = env.client(server.addr, "dept-market");
    let tax = env.client(server.addr, "dept-tax");

    // Some exchange to look at: market submits well, tax mostly badly.
    // Decided today: submitted within the 7 working days.
    let today = time::OffsetDateTime::now_utc()
        .to_offset(time::UtcOffset::from_hms(8, 0, 0).expect("offset"))
        .date()
        .to_string();
    let good = |i: u64| {
        let mut r = credgate::synth::record(ITEM, i, "general");
        r["decision_date"] = json!(today);
        r
    };
    let resp = market
        .post_json(
            "/v1/records",
            &json!({"item": ITEM, "records": (0..20).map(good).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let mut bad = good(100);
    bad["uscc"] = json!("91320100MA1XXXXXX0");
    let resp = tax
        .post_json(
            "/v1/records",
            &json!({"item": ITEM, "records": [good(101), bad.clone(), bad]}),
        )
        .await;
    assert!(resp.status < 500, "{}", String::from_utf8_lossy(&resp.body));
    let notice = submit(
        &env.client(server.addr, "dept-court"),
        "serious_dishonesty",
        record_about("serious_dishonesty", "legal_entity", ""),
    )
    .await["notice_id"]
        .as_str()
        .expect("notice")
        .to_owned();

    let browser = Browser::new(&env, server.addr.port(), Some("admin-credit-office"));
    let page = browser.webdriver().await;

    // --- the overview: per department and item, red where a target is missed.
    page.open("/console/").await;
    let market_row = page
        .find("tr[data-department=\"dept-market\"][data-item=\"administrative_penalty\"]")
        .await;
    let text = market_row.text().await.expect("text");
    assert!(text.contains("100.0 %"), "market's row: {text}");
    assert_eq!(market_row.attr("class").await.expect("class"), None);
    let tax_row = page
        .find("tr[data-department=\"dept-tax\"][data-item=\"administrative_penalty\"]")
        .await;
    assert_eq!(
        tax_row.attr("class").await.expect("class").as_deref(),
        Some("missed"),
        "tax accepted 1 of 3 and is not marked: {}",
        tax_row.text().await.unwrap_or_default()
    );
    assert!(tax_row.text().await.expect("text").contains("33.3 %"));
    // One bar per day with records, drawn inline.
    assert!(tax_row
        .find(fantoccini::Locator::Css("svg rect"))
        .await
        .is_ok());
    page.text_with("#audit-result", "审计链完整").await;
    page.screenshot("console-overview").await;

    // --- the catalog: add an optional field through the form.
    page.open("/console/catalog").await;
    page.find("tr[data-item=\"administrative_penalty\"] a")
        .await;
    page.screenshot("console-catalog").await;
    let before = admin
        .get(&format!("/admin/v1/catalog/items/{ITEM}"))
        .await
        .json();
    let version = before["version"].as_u64().expect("version");
    page.open(&format!("/console/catalog/{ITEM}")).await;
    page.type_into("#field-name", "inspection_plan_no").await;
    page.type_into("#field-zh", "检查计划编号").await;
    page.type_into("#field-max-length", "64").await;
    page.click("#field-check").await;
    let changes = page.text_with("#changes", "added_optional_field").await;
    assert!(changes.contains("inspection_plan_no"), "{changes}");
    page.text_with("#classification-verdict", "兼容").await;
    // The dry run changed nothing.
    let now = admin
        .get(&format!("/admin/v1/catalog/items/{ITEM}"))
        .await
        .json();
    assert_eq!(now["version"], version);
    page.scroll_to("#field-form").await;
    page.screenshot("console-item").await;
    page.click("#field-activate").await;
    page.text_with("#field-outcome", "已完成").await;
    let after = admin
        .get(&format!("/admin/v1/catalog/items/{ITEM}"))
        .await
        .json();
    assert_eq!(after["version"], version + 1);
    assert_eq!(
        after["schema"]["properties"]["inspection_plan_no"]["x-zh"],
        "检查计划编号"
    );
    // A department's record using the field is accepted at once.
    let mut with_field = good(200);
    with_field["inspection_plan_no"] = json!("JC-2026-0042");
    let resp = market
        .post_json(
            "/v1/records",
            &json!({"item": ITEM, "records": [with_field]}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["accepted"], 1, "{}", resp.json());

    // --- a breaking change without a reason: refused, shown at the reason.
    tokio::time::sleep(Duration::from_millis(1000)).await; // the page reloads
    page.open(&format!("/console/catalog/{ITEM}")).await;
    page.click("button[data-edit-field=\"inspection_plan_no\"]")
        .await;
    // Made required: records valid today would be refused.
    page.click("#field-required").await;
    page.click("#field-check").await;
    page.text_with("#classification-verdict", "不兼容").await;
    page.click("#field-activate").await;
    let outcome = page.text_with("#field-outcome", "breaking_change").await;
    assert!(outcome.contains("409"), "{outcome}");
    let note = page
        .find("#field-reason + .field-error")
        .await
        .text()
        .await
        .expect("note");
    assert!(
        note.contains("reason"),
        "the message next to the reason: {note}"
    );
    let unchanged = admin
        .get(&format!("/admin/v1/catalog/items/{ITEM}"))
        .await
        .json();
    assert_eq!(
        unchanged["version"],
        version + 1,
        "a refused change was applied"
    );
    page.scroll_to("#field-form").await;
    page.screenshot("console-item-refused").await;

    // --- the diff of the two versions, side by side.
    page.open(&format!(
        "/console/catalog/{ITEM}/diff?from={version}&to={}",
        version + 1
    ))
    .await;
    page.text_with("#diff-classification", "added_optional_field")
        .await;
    let added = page.find("#diff tr.added td:last-child").await;
    assert!(added
        .text()
        .await
        .expect("text")
        .contains("inspection_plan_no"));
    page.screenshot("console-diff").await;

    // --- a dead delivery retried from the page.
    let admin_api = admin.clone();
    let dead = wait_for(20, || {
        let admin = admin_api.clone();
        async move {
            let doc = admin.get("/admin/v1/deliveries?state=dead").await.json();
            doc["deliveries"]
                .as_array()
                .and_then(|a| a.first())
                .cloned()
        }
    })
    .await;
    assert_eq!(dead["notice_id"], notice.as_str());
    let id = dead["id"].as_str().expect("id").to_owned();
    rx.set_always_fail(false);
    page.open("/console/subscriptions").await;
    page.text_with("tr[data-subscription=\"finance-push\"]", "1")
        .await;
    page.screenshot("console-subscriptions").await;
    page.click(&format!("tr[data-delivery=\"{id}\"] button"))
        .await;
    let got = rx.wait_for(1, 15).await;
    assert_eq!(got[0].id, notice);
    let doc = admin.get("/admin/v1/deliveries?state=dead").await.json();
    assert_eq!(doc["deliveries"].as_array().map(Vec::len), Some(0));

    // --- a subscription added from the page; a push one without an
    // endpoint is refused with the API's problem shown.
    page.open("/console/subscriptions").await;
    page.type_into("#subscription-id", "land-pull-console")
        .await;
    page.run(
        "document.getElementById('subscription-agency').value = 'agency-land'; \
             document.getElementById('subscription-mode').value = 'push';",
    )
    .await;
    page.click("#subscription-save").await;
    let refused = page.text_with("#subscription-form .outcome", "422").await;
    assert!(
        refused.contains("invalid_definition") || refused.contains("push_unavailable"),
        "{refused}"
    );
    assert_eq!(
        admin
            .get("/admin/v1/subscriptions/land-pull-console")
            .await
            .status,
        404
    );
    page.run("document.getElementById('subscription-mode').value = 'pull';")
        .await;
    page.click("#subscription-save").await;
    page.text_with("#subscription-form .outcome", "已完成")
        .await;
    let sub = admin.get("/admin/v1/subscriptions/land-pull-console").await;
    assert_eq!(sub.status, 200);
    assert_eq!(sub.json()["agency"], "agency-land");
    assert_eq!(sub.json()["mode"], "pull");

    // --- participants: a department disabled from the page.
    page.open("/console/participants").await;
    page.click("tr[data-participant=\"dept-ecology\"] button[data-api]")
        .await;
    page.text_with("tr[data-participant=\"dept-ecology\"]", "停用")
        .await;
    let ecology = admin
        .get("/admin/v1/participants/dept-ecology")
        .await
        .json();
    assert_eq!(ecology["enabled"], false);
    page.screenshot("console-participants").await;

    // --- the audit log: every change with the administrator's identity.
    page.open("/console/audit?actor=admin-credit-office").await;
    let log = page.text_with("#audit", "catalog.activate").await;
    for action in ["delivery.retry", "participant.disable", "subscription"] {
        assert!(
            log.contains(action),
            "{action} not in the audit page: {log}"
        );
    }
    assert!(
        !log.contains("dept-market "),
        "the filter let others through"
    );
    page.screenshot("console-audit").await;

    // --- English on request, remembered.
    page.open("/console/?lang=en").await;
    page.text_with("h1", "The exchange at a glance").await;
    page.open("/console/catalog").await;
    page.text_with("h1", "Credit information collection catalog")
        .await;
    page.quit().await;
    drop(browser);

    // --- a department's certificate: the API's 403, as a page.
    let dept = Browser::new(&env, server.addr.port(), Some("dept-market"));
    let dom = dept.dom("/console/");
    assert!(dom.contains("admins_only"), "{dom}");
    assert!(dom.contains("403"), "{dom}");
    assert!(!dom.contains("inspection_plan_no"));
    server.stop().await;
}

/// Polls `probe` every 200 ms for up to `secs` seconds until it gives a
/// value.
async fn wait_for<F, Fut>(secs: u64, mut probe: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing after {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_changes_from_another_site_are_refused() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let admin = env.client(server.addr, "admin-credit-office");
    // What a hostile page's form would send with the administrator's
    // certificate: the browser marks it cross-site.
    for headers in [
        vec![("sec-fetch-site", "cross-site")],
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
    ] {
        let resp = admin
            .send(
                "POST",
                "/admin/v1/participants/dept-ecology/disable",
                &headers,
                bytes::Bytes::new(),
            )
            .await
            .expect("request");
        assert_eq!(resp.status, 403, "{headers:?}");
        assert_eq!(resp.json()["code"], "cross_site_request");
    }
    let p = admin
        .get("/admin/v1/participants/dept-ecology")
        .await
        .json();
    assert_eq!(p["enabled"], true, "a cross-site request changed something");
    // The console's own calls (same origin) and API clients pass.
    let resp = admin
        .send(
            "POST",
            "/admin/v1/participants/dept-ecology/disable",
            &[("sec-fetch-site", "same-origin")],
            bytes::Bytes::new(),
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    // Reading is never refused for it (a link from elsewhere may open a page).
    let resp = admin
        .send(
            "GET",
            "/console/",
            &[("sec-fetch-site", "cross-site")],
            bytes::Bytes::new(),
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 200);
    server.stop().await;
}
