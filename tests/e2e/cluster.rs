//! Several real gateway processes on one PostgreSQL database: one stream
//! per agency whichever instance serves it, deliveries never sent twice at
//! once, control changes everywhere within a second, and a killed
//! instance's work finished by the others.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::admin::{activate_penalty_with_field, penalty_using_field};
use crate::notices::{push_sub, LAND_SECRET};
use crate::process::{assert_pushed_and_pullable, burst_then_kill, signal, spawn, Running};
use crate::receiver::Receiver;
use crate::support::{credgate_cli, Client, Env};
use credgate::synth;

fn subscriptions(rx: &Receiver) -> String {
    push_sub(
        "land-push",
        "agency-land",
        rx,
        LAND_SECRET,
        "items = [\"serious_dishonesty\"]",
    ) + "[[subscription]]\nid = \"proc-pull\"\nagency = \"agency-procurement\"\nmode = \"pull\"\nitems = [\"serious_dishonesty\"]\n"
}

/// The stream position an opaque cursor stands for.
fn position(cursor: &Value) -> i64 {
    match credgate::cursor::parse(cursor.as_str().expect("cursor text")) {
        Some(credgate::cursor::Cursor::Position(p)) => p,
        other => panic!("not a position cursor: {other:?}"),
    }
}

/// Pulls on `reader` (long-polling) and acknowledges on `acker` until
/// `stop` is set and a poll comes back empty; returns the notice ids in
/// stream order, checking that positions run 1, 2, 3… with no gap.
async fn follow_stream(reader: Client, acker: Client, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut seen = Vec::new();
    let mut expected = 1;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        // No `after`: each poll resumes at the acknowledged position,
        // which was stored through another instance.
        let resp = reader.get("/v1/notices?limit=50&wait=1").await;
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let doc = resp.json();
        let page = doc["notices"].as_array().cloned().unwrap_or_default();
        if page.is_empty() && stopping {
            return seen;
        }
        for n in &page {
            assert_eq!(
                position(&n["cursor"]),
                expected,
                "a gap or a repeat in the stream"
            );
            expected += 1;
            seen.push(n["notice_id"].as_str().expect("id").to_owned());
        }
        if !page.is_empty() {
            let ack = acker
                .post_json("/v1/notices/ack", &json!({"cursor": doc["next_cursor"]}))
                .await;
            assert_eq!(ack.status, 200, "{}", String::from_utf8_lossy(&ack.body));
            assert_eq!(ack.json()["acknowledged"], doc["next_cursor"]);
        }
    }
}

/// Submits `per_worker` dishonesty records from each of `workers` tasks,
/// each submission to the next instance in turn; returns the notice ids.
async fn spread_submissions(
    env: &Env,
    instances: &[&Running],
    workers: u64,
    per_worker: u64,
) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<Client> = instances
        .iter()
        .map(|r| env.client(r.main, "dept-court"))
        .collect();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (clients, next) = (clients.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..per_worker {
                let client = &clients[next.fetch_add(1, Ordering::Relaxed) % clients.len()];
                let record = synth::record("serious_dishonesty", w * 10_000 + n, "serious");
                let resp = client
                    .post_json(
                        "/v1/records",
                        &json!({"item": "serious_dishonesty", "records": [record]}),
                    )
                    .await;
                assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
                let doc = resp.json();
                ids.extend(doc["results"][0]["notice_id"].as_str().map(str::to_owned));
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("worker"));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_keep_one_gap_free_stream_and_never_push_a_delivery_twice_at_once() {
    let env = Env::new();
    let rx = Receiver::start(env.root.path(), "cluster", &env.pki.dir.join("ca.pem"), 0).await;
    // Slow answers keep deliveries in flight while three dispatchers
    // compete for them.
    rx.set_delay(Duration::from_millis(30));
    env.subscribe(&subscriptions(&rx));
    let a = spawn(&env).await;
    let b = spawn(&env).await;
    let c = spawn(&env).await;
    // The agency reads from B and acknowledges on C while departments
    // submit to all three.
    let stop = Arc::new(AtomicBool::new(false));
    let follower = tokio::spawn(follow_stream(
        env.client(b.main, "agency-procurement"),
        env.client(c.main, "agency-procurement"),
        stop.clone(),
    ));
    let submitted = spread_submissions(&env, &[&a, &b, &c], 6, 40).await;
    stop.store(true, Ordering::Relaxed);
    let streamed = follower.await.expect("follower");
    assert_eq!(submitted.len(), 240);
    let unique: HashSet<&String> = streamed.iter().collect();
    assert_eq!(
        unique.len(),
        streamed.len(),
        "a notice came twice in the stream"
    );
    assert_eq!(
        unique,
        submitted.iter().collect::<HashSet<_>>(),
        "the stream holds exactly the submitted notices"
    );
    // Push: every notice at least once, no delivery twice at the same time.
    rx.wait_for(submitted.len(), 60).await;
    assert_eq!(rx.concurrent_duplicates(), Vec::<String>::new());
    for r in [a, b, c] {
        signal(&r.child, "-TERM");
    }
    let (code, out) = env.audit_verify("verify");
    assert_eq!(code, 0, "{out}");
    eprintln!(
        "cluster: {} notices over 3 instances, streamed in order with no gap, {} push requests",
        submitted.len(),
        rx.requests().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_activation_on_one_instance_is_in_force_on_another_within_a_second() {
    let env = Env::new();
    let a = spawn(&env).await;
    let b = spawn(&env).await;
    let on_b = env.client(b.main, "dept-market");
    let submit_on_b = |n| {
        let on_b = on_b.clone();
        async move {
            on_b.post_json(
                "/v1/records",
                &json!({"item": "administrative_penalty", "records": [penalty_using_field(n)]}),
            )
            .await
            .json()
        }
    };
    // Before: B rejects the field the new version adds.
    let before = submit_on_b(1).await;
    assert_eq!(before["item_version"], 1);
    assert_eq!(before["results"][0]["status"], "rejected");
    activate_penalty_with_field(&env.client(a.main, "admin-credit-office")).await;
    let activated = Instant::now();
    let mut n = 2;
    let took = loop {
        let r = submit_on_b(n).await;
        n += 1;
        if r["item_version"] == 2 {
            assert_eq!(r["results"][0]["status"], "accepted", "{r:#}");
            break activated.elapsed();
        }
        assert!(
            activated.elapsed() < Duration::from_secs(5),
            "B never took version 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        took < Duration::from_secs(1),
        "B took version 2 after {took:?}"
    );
    // A participant disabled on B is refused on A.
    let admin_b = env.client(b.main, "admin-credit-office");
    let resp = admin_b
        .send(
            "POST",
            "/admin/v1/participants/dept-market/disable",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("disable");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let on_a = env.client(a.main, "dept-market");
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let r = on_a
            .post_json(
                "/v1/records",
                &json!({"item": "administrative_penalty", "records": [penalty_using_field(99)]}),
            )
            .await;
        if r.status == 403 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A still serves the disabled department: {}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("cluster: catalog version 2 in force on the other instance after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_instance_loses_nothing_and_the_survivor_finishes_its_deliveries() {
    let mut env = Env::new();
    // A short lease, so the survivor takes over the dead one's in-flight
    // deliveries soon (lease = request timeout + 30 s).
    env.config.delivery.request_timeout_secs = 1;
    let rx = Receiver::start(env.root.path(), "kill", &env.pki.dir.join("ca.pem"), 0).await;
    // Slow answers: the killed instance surely holds leases when it dies.
    rx.set_delay(Duration::from_millis(300));
    env.subscribe(&subscriptions(&rx));
    let mut a = spawn(&env).await;
    let b = spawn(&env).await;
    let acked: HashSet<String> = burst_then_kill(
        &env,
        &mut a,
        "dept-court",
        "serious_dishonesty",
        8,
        "notice_id",
    )
    .await
    .into_iter()
    .collect();
    assert!(
        acked.len() > 20,
        "too few submissions before the kill: {}",
        acked.len()
    );
    // The survivor pushes every acknowledged notice, including those the
    // dead instance had leased, once their lease expired.
    // The survivor pushes every acknowledged notice, including those the
    // dead instance had leased (once their lease expired), and its pull
    // stream holds them all.
    let agency = env.client(b.main, "agency-procurement");
    assert_pushed_and_pullable(&rx, &agency, &acked, 90).await;
    assert_eq!(rx.concurrent_duplicates(), Vec::<String>::new());
    let taken_over = env.count_rows("deliveries WHERE mode = 'push' AND claims > 1");
    assert!(
        taken_over > 0,
        "no lease of the killed instance was taken over"
    );
    signal(&b.child, "-TERM");
    let (code, out) = env.audit_verify("verify");
    assert_eq!(code, 0, "{out}");
    eprintln!(
        "cluster kill -9: {} acknowledged notices, all pushed by the survivor ({taken_over} taken over after their lease) and pullable",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_missing_database_stops_start_up_with_the_reason_and_no_password() {
    let mut env = Env::new();
    for (url, reason) in [
        (
            "postgres://postgres:hunter2-secret@127.0.0.1:1/credgate",
            "127.0.0.1:1",
        ),
        (
            "postgres://postgres:hunter2-secret@127.0.0.1:5432/credgate_nosuchdb",
            "does not exist",
        ),
    ] {
        env.config.store.url = Some(url.to_owned());
        let path = env.root.path().join("unreachable.toml");
        std::fs::write(&path, toml::to_string(&env.config).expect("toml")).expect("write");
        let (code, out) = credgate_cli(&["serve", "--config", path.to_str().expect("path")]);
        assert_eq!(code, 2, "{out}");
        assert!(out.contains(reason), "{out}");
        assert!(!out.contains("hunter2"), "the password leaked: {out}");
    }
}
