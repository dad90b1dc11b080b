//! Credit grades (分类监管): the documented grade for each kind of subject,
//! in reports; one `grade_change` notice per change; counts per grade and
//! region; rule sets changed through the admin API.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use credgate::synth;

use crate::support::{Client, Env, Server};

/// A legal entity numbered `n`, in Nanjing (320100).
fn firm(n: u64) -> (String, Value) {
    let uscc = synth::uscc("91320100", 9_500 + n);
    let subject = json!({
        "subject_name": format!("南京分类监管测试{n}有限公司"),
        "subject_type": "legal_entity",
        "uscc": uscc,
        "legal_representative": "吴分类",
        "legal_representative_id_type": "resident_id",
        "legal_representative_id_number": synth::resident_id(9_500 + n),
    });
    (uscc, subject)
}

async fn submit(client: &Client, item: &str, subject: &Value, n: u64, level: &str) -> String {
    let mut record = synth::record(item, 9_500 + n, level);
    record
        .as_object_mut()
        .expect("object")
        .extend(subject.as_object().expect("object").clone());
    if item == "serious_dishonesty" {
        record["list_kind"] = json!("dishonest_judgment_debtor");
    }
    crate::support::submit_one(client, item, record).await
}

async fn grade_of(client: &Client, uscc: &str) -> Value {
    let resp = client
        .post_json(
            "/v1/credit-reviews",
            &json!({"subject": {"uscc": uscc}, "purpose": "fiscal_funds"}),
        )
        .await;
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    resp.json()["report"]["grade"].clone()
}

/// The grade_change notices the agency has, once there are `want` (or
/// what there is after 15 s).
async fn grade_notices(agency: &Client, want: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let page = agency.get("/v1/notices?after=0&limit=500").await.json();
        let notices: Vec<Value> = page["notices"]
            .as_array()
            .expect("notices")
            .iter()
            .filter(|n| n["type"] == "grade_change")
            .cloned()
            .collect();
        if notices.len() >= want || start.elapsed() > Duration::from_secs(15) {
            return notices;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn shift(n: &Value) -> (String, String, String) {
    (
        n["subject"]["uscc"].as_str().unwrap_or_default().to_owned(),
        n["grade"]["from"].as_str().unwrap_or_default().to_owned(),
        n["grade"]["to"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn stats(admin: &Client) -> Value {
    let resp = admin.get("/admin/v1/stats/grades").await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    resp.json()
}

fn count(stats: &Value, grade: &str) -> u64 {
    stats["grades"]
        .as_array()
        .expect("grades")
        .iter()
        .find(|g| g["grade"] == grade)
        .and_then(|g| g["subjects"].as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grades_follow_the_rules_and_each_change_is_one_notice() {
    let env = Env::new();
    env.subscribe(
        r#"
[[subscription]]
id = "land-grades"
agency = "agency-land"
mode = "pull"
notice_types = ["grade_change"]
"#,
    );
    let server = Server::start(&env).await;
    let market = env.client(server.addr, "dept-market");
    let court = env.client(server.addr, "dept-court");
    let finance = env.client(server.addr, "agency-finance");
    let land = env.client(server.addr, "agency-land");
    let admin = env.client(server.addr, "admin-credit-office");

    let (red, red_subject) = firm(1);
    let (plain, plain_subject) = firm(2);
    let (serious, serious_subject) = firm(3);
    let (listed, listed_subject) = firm(4);
    let (abnormal, abnormal_subject) = firm(5);
    submit(&market, "red_list", &red_subject, 1, "").await;
    submit(
        &market,
        "administrative_penalty",
        &plain_subject,
        2,
        "general",
    )
    .await;
    submit(
        &market,
        "administrative_penalty",
        &serious_subject,
        3,
        "serious",
    )
    .await;
    let listing = submit(&court, "serious_dishonesty", &listed_subject, 4, "").await;
    submit(&market, "abnormal_operations", &abnormal_subject, 5, "").await;

    // The documented grade, and the rule that gave it, for each.
    let (clean, _) = firm(6);
    for (uscc, code, rule) in [
        (&red, "A", "red_list_without_punishment"),
        (&plain, "B", "default"),
        (&serious, "C", "major_penalty_or_abnormal_operations"),
        (&listed, "D", "serious_dishonesty_listed"),
        (&abnormal, "C", "major_penalty_or_abnormal_operations"),
        (&clean, "B", "default"),
    ] {
        let g = grade_of(&finance, uscc).await;
        assert_eq!(
            (g["code"].as_str(), g["rule"].as_str()),
            (Some(code), Some(rule)),
            "{uscc}: {g:#}"
        );
        assert_eq!(g["rules_version"], 1);
    }
    let g = grade_of(&finance, &listed).await;
    assert_eq!(g["records"], json!([listing]));
    assert_eq!(g["name_zh"], "严重失信");

    // One notice per subject whose grade moved from the default B; none
    // for the subject that stayed B. No record content in them.
    let notices = grade_notices(&land, 4).await;
    let mut shifts: Vec<_> = notices.iter().map(shift).collect();
    shifts.sort();
    let mut want = vec![
        (red.clone(), "B".to_owned(), "A".to_owned()),
        (serious.clone(), "B".to_owned(), "C".to_owned()),
        (listed.clone(), "B".to_owned(), "D".to_owned()),
        (abnormal.clone(), "B".to_owned(), "C".to_owned()),
    ];
    want.sort();
    assert_eq!(shifts, want, "{notices:#?}");
    for n in &notices {
        let record = n["record"].as_object().expect("record");
        assert!(record.keys().all(|k| k == "subject_type"), "{n:#}");
    }
    let s = stats(&admin).await;
    assert_eq!(
        ["A", "B", "C", "D"].map(|g| count(&s, g)),
        [1, 1, 2, 1],
        "{s:#}"
    );
    let nanjing = s["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .find(|r| r["region"] == "320100")
        .expect("Nanjing");
    assert_eq!(nanjing["subjects"], 5);
    assert_eq!(nanjing["name_zh"], "南京市");

    // The listing is revoked: D becomes B; one more notice.
    let resp = court
        .post_json(
            &format!("/v1/records/{listing}/revocation"),
            &json!({"reason": "revoked"}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(grade_of(&finance, &listed).await["code"], "B");
    let notices = grade_notices(&land, 5).await;
    assert_eq!(notices.len(), 5, "{notices:#?}");
    assert_eq!(
        shift(&notices[4]),
        (listed.clone(), "D".to_owned(), "B".to_owned())
    );

    // A bad rule set is refused with pointers, and nothing changes.
    let mut rules = admin.get("/admin/v1/grades").await.json()["rules"].clone();
    let mut bad = rules.clone();
    bad["rule"][0]["grade"] = json!("Z");
    bad["rule"][1]["any"][0]["item"] = json!("no_such_item");
    let resp = admin
        .send(
            "PUT",
            "/admin/v1/grades",
            &[("content-type", "application/json")],
            serde_json::to_vec(&json!({"rules": bad})).expect("json"),
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));
    let problem = resp.json();
    assert_eq!(problem["code"], "invalid_grade_rules");
    let pointers: Vec<&str> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["pointer"].as_str())
        .collect();
    assert!(pointers.contains(&"/rules/rule/0/grade"), "{problem:#}");
    assert!(
        pointers.contains(&"/rules/rule/1/any/0/item"),
        "{problem:#}"
    );

    // A general penalty now makes C too: version 2, the plain subject is
    // assessed again and moves B → C; audited.
    rules["rule"][1]["any"][0]["levels"] = json!(["general", "major", "serious"]);
    let resp = admin
        .send(
            "PUT",
            "/admin/v1/grades",
            &[("content-type", "application/json")],
            serde_json::to_vec(&json!({"rules": rules, "reason": "一般处罚亦列为失信"}))
                .expect("json"),
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["version"], 2);
    let g = grade_of(&finance, &plain).await;
    assert_eq!(
        (g["code"].as_str(), g["rules_version"].as_u64()),
        (Some("C"), Some(2))
    );
    let notices = grade_notices(&land, 6).await;
    assert_eq!(notices.len(), 6, "{notices:#?}");
    assert_eq!(
        shift(&notices[5]),
        (plain.clone(), "B".to_owned(), "C".to_owned())
    );
    let versions = admin.get("/admin/v1/grades").await.json();
    assert_eq!(versions["versions"].as_array().map(Vec::len), Some(2));
    let v1 = admin.get("/admin/v1/grades/versions/1").await;
    assert_eq!(
        v1.json()["rules"]["rule"][1]["any"][0]["levels"],
        json!(["major", "serious"])
    );
    let audit = admin.get("/admin/v1/audit?limit=1000").await.json();
    assert!(audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .any(|e| e["action"] == "grade_rules_activated"
            && e["actor"] == "admin-credit-office"
            && e["details"]["version"] == 2));
    // Agencies do not administer grades.
    assert_eq!(land.get("/admin/v1/grades").await.status, 403);
    server.stop().await;
}

/// Changes that arrive while the grading backlog is full are not lost:
/// the grader goes through every ungraded subject and each gets its
/// grade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_grading_backlog_loses_no_subject() {
    let mut env = Env::new();
    env.config.review.grade_backlog_max = 1;
    let server = Server::start(&env).await;
    let market = env.client(server.addr, "dept-market");
    let admin = env.client(server.addr, "admin-credit-office");

    // One request, 30 subjects: all change at the same commit, so all but
    // the first find the backlog full.
    const N: u64 = 30;
    penalise_firms(&market, N).await;
    assert_eq!(graded_c(&admin, N).await, N, "every subject graded C");
    let (_, metrics) = crate::support::ops_get(server.ops, "/metrics")
        .await
        .expect("metrics");
    let overflows: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("credgate_grade_backlog_overflows_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("overflow counter");
    assert!(overflows > 0, "the backlog overflowed: {overflows}");
    server.stop().await;
}

/// A change committed but not graded when the gateway went down (a crash
/// between the commit and the grader) is graded at the next start, with
/// no new change to set it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_left_ungraded_by_a_crash_is_graded_at_the_next_start() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let market = env.client(server.addr, "dept-market");
    let admin = env.client(server.addr, "admin-credit-office");
    const N: u64 = 12;
    penalise_firms(&market, N).await;
    assert_eq!(graded_c(&admin, N).await, N, "every subject graded C");
    let ungraded = || env.sql_texts("SELECT COUNT(*) FROM grade_marks");
    assert_eq!(ungraded(), ["0"], "every change graded");
    server.stop().await;

    // What a crash right after the commit leaves: the records and their
    // subjects' marks, no grade.
    env.sql_execute(
        "DELETE FROM subject_grades; \
         INSERT INTO grade_marks (subject_key, mark) SELECT DISTINCT subject_key, 1 FROM records WHERE subject_key IS NOT NULL;",
    );
    assert_eq!(ungraded(), [N.to_string()]);
    let server = Server::start(&env).await;
    let admin = env.client(server.addr, "admin-credit-office");
    assert_eq!(graded_c(&admin, N).await, N, "graded again after the start");
    assert_eq!(ungraded(), ["0"]);
    server.stop().await;
}

/// One request with a serious administrative penalty about each of `n`
/// firms, all accepted.
async fn penalise_firms(market: &Client, n: u64) {
    let records: Vec<Value> = (100..100 + n)
        .map(|n| {
            let mut record = synth::record("administrative_penalty", 9_500 + n, "serious");
            let (_, subject) = firm(n);
            record
                .as_object_mut()
                .expect("object")
                .extend(subject.as_object().expect("object").clone());
            record
        })
        .collect();
    let resp = market
        .post_json(
            "/v1/records",
            &json!({"item": "administrative_penalty", "records": records}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let accepted = resp.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter(|r| r["status"] == "accepted")
        .count();
    assert_eq!(accepted as u64, n);
}

/// The subjects graded C, once there are `want` or 15 s have passed.
async fn graded_c(admin: &Client, want: u64) -> u64 {
    let start = Instant::now();
    loop {
        let c = count(&stats(admin).await, "C");
        if c >= want || start.elapsed() > Duration::from_secs(15) {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
