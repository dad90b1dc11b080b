//! Hardening: one request, one slow receiver or one run-time change must
//! never hurt the gateway or anyone else. One test per finding of the
//! hardening issue, each against the real gateway over real mTLS.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::admin::send_json;
use crate::notices::{push_sub, submit, verify, FIN_SECRET, LAND_SECRET};
use crate::process::spawn;
use crate::receiver::Receiver;
use crate::support::{ops_get, read_until_closed, Client, Env, Server};
use credgate::synth;

/// A `/proc/<pid>/status` figure in kB (`VmRSS`, `VmHWM`).
fn proc_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("field in /proc status")
}

/// One valid penalty whose `penalty_categories` holds `n` wrong items, as
/// raw JSON bytes of a whole submission.
fn amplification_body(n: usize) -> Vec<u8> {
    let mut record = synth::record("administrative_penalty", 7, "general");
    record["penalty_categories"] = json!("PLACEHOLDER");
    let doc =
        serde_json::to_string(&json!({"item": "administrative_penalty", "records": [record]}))
            .expect("json");
    let items = vec!["1"; n].join(",");
    doc.replace("\"PLACEHOLDER\"", &format!("[{items}]"))
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_invalid_array_gets_a_small_answer_in_bounded_time_and_memory() {
    let env = Env::new();
    let mut running = spawn(&env).await;
    let pid = running.child.id();
    let dept = env.client(running.main, "dept-market");
    // Warm up: one ordinary submission, so start-up allocations are done.
    let warm = dept
        .post_json(
            "/v1/records",
            &json!({"item": "administrative_penalty",
                    "records": [synth::record("administrative_penalty", 1, "general")]}),
        )
        .await;
    assert_eq!(warm.status, 200);
    let body = amplification_body(1_900_000);
    assert!(
        body.len() > 3_700_000 && body.len() < 4_194_304,
        "{}",
        body.len()
    );
    let before = proc_kb(pid, "VmRSS");
    let send = |dept: Client, body: Vec<u8>, key: String| async move {
        let started = Instant::now();
        let resp = dept
            .send(
                "POST",
                "/v1/records",
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", &key),
                ],
                body,
            )
            .await
            .expect("request");
        assert_eq!(resp.status, 413, "{}", String::from_utf8_lossy(&resp.body));
        assert!(
            resp.body.len() < 1_000_000,
            "answer of {} bytes",
            resp.body.len()
        );
        let doc = resp.json();
        assert_eq!(doc["code"], "too_many_items", "{doc}");
        assert_eq!(doc["errors"][0]["pointer"], "/records/0/penalty_categories");
        started.elapsed()
    };
    // One alone: answered in time.
    let took = send(dept.clone(), body.clone(), "amplify-alone".into()).await;
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Eight at once, twice each (the second time with the same key): the
    // memory bound holds for all of them together.
    let mut tasks = Vec::new();
    for n in 0..8 {
        let (dept, body) = (dept.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..2 {
                send(dept.clone(), body.clone(), format!("amplify-{n}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    // Long but not hostile: 5,000 wrong items, under the array limit, get
    // the record rejected with a bounded list of findings.
    let resp = dept
        .send(
            "POST",
            "/v1/records",
            &[("content-type", "application/json")],
            amplification_body(5_000),
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let doc = resp.json();
    assert_eq!(doc["rejected"], 1);
    let errors = doc["results"][0]["errors"].as_array().expect("errors");
    assert!(errors.len() <= 21, "{} findings", errors.len());
    assert!(
        errors
            .iter()
            .any(|e| e["code"] == "max_items" && e["pointer"] == "/records/0/penalty_categories"),
        "the array's length is reported: {errors:?}"
    );
    assert!(resp.body.len() < 16 * 1024, "{} bytes", resp.body.len());
    let peak = proc_kb(pid, "VmHWM");
    let growth_mb = peak.saturating_sub(before) / 1024;
    eprintln!(
        "amplification: RSS before {} MB, peak after {} MB",
        before / 1024,
        peak / 1024
    );
    // Nine 4 MB bodies were in flight at once. Each is held about twice
    // (the connection's receive buffers, then the request's one buffer)
    // plus what the allocator keeps cached between them: up to about five
    // times its size (165 MB), where parsing the arrays unbounded costs
    // far more (350 MB measured with the limit checked only after the whole
    // array was built). Measured here: 68-106 MB, and 136 MB once in CI
    // with the other tests running beside it.
    let bound_mb = (9 * 5 * body.len() / (1024 * 1024)) as u64;
    assert!(
        growth_mb < bound_mb,
        "peak RSS grew by {growth_mb} MB (bound {bound_mb} MB)"
    );
    running.child.kill().expect("kill");
    running.child.wait().expect("wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_invalid_records_do_not_amplify_the_answer() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    // 500 empty records: each misses every required field.
    let body = json!({"item": "administrative_penalty", "records": vec![json!({}); 500]});
    let raw = serde_json::to_vec(&body).expect("json");
    let resp = dept.post_json("/v1/records", &body).await;
    assert_eq!(resp.status, 200);
    let doc = resp.json();
    assert_eq!(doc["rejected"], 500);
    let findings: usize = doc["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["errors"].as_array().map_or(0, Vec::len))
        .sum();
    assert!(findings <= 1_000 + 500, "{findings} findings in one answer");
    eprintln!(
        "amplification: 500 empty records, {} byte request, {} byte answer, {findings} findings",
        raw.len(),
        resp.body.len()
    );
    assert!(
        resp.body.len() < 400 * 1024,
        "a {} byte request got a {} byte answer",
        raw.len(),
        resp.body.len()
    );
    // Every record still says it was rejected, and the last ones say why
    // not in detail.
    let last = &doc["results"][499];
    assert_eq!(last["status"], "rejected");
    assert_eq!(last["errors"][0]["code"], "too_many_errors", "{last}");
    server.stop().await;
}

/// The PUT body of a push subscription to `receiver`.
fn push_body(agency: &str, receiver: &Receiver, secret: &str) -> Value {
    json!({
        "agency": agency, "mode": "push", "items": ["administrative_penalty"],
        "endpoint": receiver.endpoint(), "ca_file": receiver.ca_file, "signing_secret": secret,
    })
}

async fn put(client: &Client, path: &str, body: &Value) -> crate::support::Resp {
    send_json(client, "PUT", path, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_subscription_added_at_run_time_delivers_its_next_notice() {
    let env = Env::new();
    // Started without any push subscription.
    let server = Server::start(&env).await;
    let receiver = Receiver::start(env.root.path(), "late", &env.pki.dir.join("ca.pem"), 0).await;
    let admin = env.client(server.addr, "admin-credit-office");
    let r = put(
        &admin,
        "/admin/v1/subscriptions/finance-late",
        &push_body("agency-finance", &receiver, FIN_SECRET),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let dept = env.client(server.addr, "dept-market");
    let sent = submit(
        &dept,
        "administrative_penalty",
        synth::record("administrative_penalty", 3, "serious"),
    )
    .await;
    let started = Instant::now();
    let got = receiver.wait_for(1, 2).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(got[0].id, sent["notice_id"].as_str().expect("notice id"));
    assert!(verify(FIN_SECRET, &got[0]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_subscription_the_gateway_cannot_serve_is_refused_and_changes_nothing() {
    let mut env = Env::new();
    // No gateway client certificate on disk.
    env.config.delivery.client_cert = env.root.path().join("missing.pem");
    env.config.delivery.client_key = env.root.path().join("missing.key");
    let server = Server::start(&env).await;
    let receiver = Receiver::start(env.root.path(), "nope", &env.pki.dir.join("ca.pem"), 0).await;
    let admin = env.client(server.addr, "admin-credit-office");
    let r = put(
        &admin,
        "/admin/v1/subscriptions/finance-nope",
        &push_body("agency-finance", &receiver, FIN_SECRET),
    )
    .await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let doc = r.json();
    assert_eq!(doc["code"], "push_unavailable", "{doc}");
    assert!(
        doc["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("delivery.client_cert"),
        "{doc}"
    );
    let missing = admin.get("/admin/v1/subscriptions/finance-nope").await;
    assert_eq!(missing.status, 404, "nothing was stored");
    // A CA file that does not exist is refused the same way.
    let mut bad = push_body("agency-finance", &receiver, LAND_SECRET);
    bad["ca_file"] = json!(env.root.path().join("no-such-ca.pem"));
    let r = put(&admin, "/admin/v1/subscriptions/finance-nope", &bad).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    server.stop().await;
}

/// p99 of a list of durations (nearest rank).
fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let rank = ((v.len() as f64) * 0.99).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Submits `batches` batches of `per_batch` serious penalties and returns,
/// for every notice the `fast` receivers got, the time from the batch's
/// acknowledgement to its arrival.
async fn latencies(
    dept: &Client,
    fast: &[Receiver],
    batches: u64,
    per_batch: u64,
    offset: u64,
) -> Vec<Duration> {
    let mut acked = std::collections::HashMap::new();
    let before: Vec<usize> = fast.iter().map(|r| r.accepted().len()).collect();
    for b in 0..batches {
        let records: Vec<Value> = (0..per_batch)
            .map(|i| {
                synth::record(
                    "administrative_penalty",
                    offset + b * per_batch + i,
                    "serious",
                )
            })
            .collect();
        let resp = dept
            .post_json(
                "/v1/records",
                &json!({"item": "administrative_penalty", "records": records}),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let at = Instant::now();
        for r in resp.json()["results"].as_array().expect("results") {
            acked.insert(r["notice_id"].as_str().expect("notice").to_owned(), at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = Vec::new();
    for (r, before) in fast.iter().zip(before) {
        let got = r.wait_for(before + acked.len(), 20).await;
        for g in &got[before..] {
            let at = acked.get(&g.id).expect("a notice of this run");
            out.push(g.arrived.saturating_duration_since(*at));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_endpoint_does_not_delay_the_others_and_nothing_is_sent_twice_at_once() {
    let mut env = Env::new();
    // The slow endpoint's answers must count as answers, not timeouts.
    env.config.delivery.request_timeout_secs = 15;
    let ca = env.pki.dir.join("ca.pem");
    let agencies = ["agency-finance", "agency-land", "agency-procurement"];
    let mut receivers = Vec::new();
    let mut subs = String::new();
    for i in 0..10 {
        let r = Receiver::start(env.root.path(), &format!("r{i}"), &ca, 0).await;
        subs.push_str(&push_sub(
            &format!("push-{i}"),
            agencies[i % 3],
            &r,
            FIN_SECRET,
            "items = [\"administrative_penalty\"]",
        ));
        receivers.push(r);
    }
    env.subscribe(&subs);
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    let (fast, slow) = receivers.split_at(9);
    // Without the slow one: every endpoint answers at once.
    let base = p99(latencies(&dept, fast, 6, 50, 0).await);
    // The tenth endpoint now takes 10 s per request.
    slow[0].set_delay(Duration::from_secs(10));
    let with_slow = p99(latencies(&dept, fast, 6, 50, 10_000).await);
    // Small absolute figures on a loaded 2-core machine jitter by tens of
    // milliseconds; below 100 ms the comparison uses 100 ms.
    let floor = Duration::from_millis(100);
    eprintln!(
        "fairness: nine fast endpoints' p99 {base:?} alone, {with_slow:?} next to a 10 s endpoint"
    );
    assert!(
        with_slow <= 2 * base.max(floor),
        "the nine fast endpoints' p99 went from {base:?} to {with_slow:?}"
    );
    for r in &receivers {
        assert_eq!(r.concurrent_duplicates(), Vec::<String>::new());
    }
    slow[0].set_delay(Duration::ZERO);
    server.stop().await;
    for r in &receivers {
        assert_eq!(r.concurrent_duplicates(), Vec::<String>::new());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_old_connections_are_closed_without_cutting_a_request() {
    let mut env = Env::new();
    env.config.server.idle_timeout_secs = 1;
    env.config.server.max_connection_age_secs = 3;
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    for h2 in [false, true] {
        // Idle: one request, then nothing for longer than the timeout.
        let mut conn = client.connect(h2).await.expect("connect");
        let r = conn
            .send("GET", "/v1/catalog", &[], "")
            .await
            .expect("first");
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert!(
            conn.send("GET", "/v1/catalog", &[], "").await.is_err(),
            "h2={h2}: an idle connection stays open"
        );
        // Busy: never idle, but told to go away at its maximum age; every
        // request before that is answered.
        let mut conn = client.connect(h2).await.expect("connect");
        let opened = Instant::now();
        let mut answered = 0;
        while let Ok(r) = conn.send("GET", "/v1/catalog", &[], "").await {
            assert_eq!(r.status, 200);
            answered += 1;
            assert!(
                opened.elapsed() < Duration::from_secs(8),
                "h2={h2}: never closed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let age = opened.elapsed();
        assert!(
            age >= Duration::from_millis(2900) && answered >= 10,
            "h2={h2}: closed after {age:?} and {answered} requests"
        );
    }
    server.stop().await;
}

/// The `credgate_connections` gauge from the ops listener's metrics.
async fn open_connections(server: &Server) -> u64 {
    let (_, text) = ops_get(server.ops, "/metrics").await.expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("credgate_connections "))
        .and_then(|v| v.trim().parse().ok())
        .expect("credgate_connections in /metrics")
}

/// A connection that has sent nothing since its handshake holds no HTTP
/// state; it must still be counted, served whenever its first request
/// comes, closed cleanly at the idle timeout, and closed at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_request_yet_are_served_late_and_closed_cleanly() {
    let mut env = Env::new();
    env.config.server.idle_timeout_secs = 2;
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    let before = open_connections(&server).await;
    let mut late = client.connect(false).await.expect("connect");
    let mut unused = client.connect_tls(false).await.expect("connect");
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(open_connections(&server).await, before + 2);
    // The first request, a while after the handshake.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = late
        .send("GET", "/v1/catalog", &[], "")
        .await
        .expect("a first request after a pause");
    assert_eq!(r.status, 200);
    // Never used: closed at the idle timeout, with close_notify.
    let read = read_until_closed(&mut unused, Duration::from_secs(8)).await;
    assert_eq!(read.expect("a clean TLS close"), 0);
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "closed after {waited:?}"
    );
    server.stop().await;

    // At shutdown an unused connection is closed at once, not left to
    // its idle timeout or to the end of the shutdown grace.
    env.config.server.idle_timeout_secs = 600;
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    let mut unused = client.connect_tls(false).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(server.stop());
    let read = read_until_closed(&mut unused, Duration::from_secs(4)).await;
    assert_eq!(read.expect("a clean TLS close"), 0);
    stopping.await.expect("stopped");
}

/// A client whose last handshake flight and first request reach the server
/// in one TCP segment: the request is already decrypted inside rustls when
/// the handshake ends and nothing more comes on the socket. It must be
/// answered, not left waiting for bytes that never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_with_the_last_handshake_flight_is_answered() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let config = env.client(server.addr, "dept-market").tls_config(false);
    let addr = server.addr;
    let response = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = rustls::ClientConnection::new(config, name).expect("client");
        // Until the server's Finished: the client's last flight is queued
        // and not yet sent.
        while tls.is_handshaking() {
            while tls.wants_write() {
                tls.write_tls(&mut sock).expect("write");
            }
            if tls.is_handshaking() {
                tls.read_tls(&mut sock).expect("read");
                tls.process_new_packets().expect("handshake");
            }
        }
        tls.writer()
            .write_all(b"GET /v1/catalog HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .expect("request");
        let mut flight = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut flight).expect("encode");
        }
        sock.write_all(&flight).expect("one write");
        let mut response = Vec::new();
        loop {
            match tls.read_tls(&mut sock) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => panic!("no answer to a request sent with the handshake: {e}"),
            }
            let state = tls.process_new_packets().expect("records");
            let mut chunk = vec![0u8; state.plaintext_bytes_to_read()];
            tls.reader().read_exact(&mut chunk).expect("plaintext");
            response.extend_from_slice(&chunk);
            if state.peer_has_closed() {
                break;
            }
        }
        String::from_utf8_lossy(&response).into_owned()
    })
    .await
    .expect("client thread");
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "answer: {}",
        response.lines().next().unwrap_or_default()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_secrets_are_sealed_at_rest_and_still_sign_after_a_restart() {
    let env = Env::new();
    let ca = env.pki.dir.join("ca.pem");
    let seeded = Receiver::start(env.root.path(), "seeded", &ca, 0).await;
    let added = Receiver::start(env.root.path(), "added", &ca, 0).await;
    // One from the file (seeded into the store on first start) …
    env.subscribe(&push_sub(
        "land-push",
        "agency-land",
        &seeded,
        LAND_SECRET,
        "items = [\"administrative_penalty\"]",
    ));
    let server = Server::start(&env).await;
    // … and one added through the admin API.
    let admin = env.client(server.addr, "admin-credit-office");
    let r = put(
        &admin,
        "/admin/v1/subscriptions/finance-push",
        &push_body("agency-finance", &added, FIN_SECRET),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    server.stop().await;
    // Every byte of the database file, or every registry document.
    let db = if env.postgres() {
        env.sql_texts("SELECT body FROM registry")
            .concat()
            .into_bytes()
    } else {
        std::fs::read(env.db()).expect("database file")
    };
    for secret in [FIN_SECRET, LAND_SECRET] {
        let key = secret.trim_start_matches("whsec_");
        assert!(
            !db.windows(key.len()).any(|w| w == key.as_bytes()),
            "a signing secret is stored in clear"
        );
    }
    // After a restart both still sign with the right secret.
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-market");
    submit(
        &dept,
        "administrative_penalty",
        synth::record("administrative_penalty", 9, "serious"),
    )
    .await;
    assert!(verify(LAND_SECRET, &seeded.wait_for(1, 10).await[0]));
    assert!(verify(FIN_SECRET, &added.wait_for(1, 10).await[0]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_refuses_certificates_about_to_expire() {
    let mut env = Env::new();
    let ca = credgate::pki::DevCa::generate("short-lived test CA").expect("ca");
    let now = time::OffsetDateTime::now_utc();
    let soon = ca
        .issue_client_until(
            "credgate-gateway",
            false,
            now - time::Duration::days(1),
            now + time::Duration::days(5),
        )
        .expect("cert");
    let (cert, key) = (
        env.root.path().join("soon.pem"),
        env.root.path().join("soon.key"),
    );
    std::fs::write(&cert, &soon.cert_pem).expect("write");
    std::fs::write(&key, &soon.key_pem).expect("write");
    env.config.tls.cert = cert.clone();
    env.config.tls.key = key.clone();
    env.config.delivery.client_cert = cert;
    env.config.delivery.client_key = key;
    let receiver = Receiver::start(env.root.path(), "r", &env.pki.dir.join("ca.pem"), 0).await;
    env.subscribe(&push_sub(
        "land-push",
        "agency-land",
        &receiver,
        LAND_SECRET,
        "",
    ));
    let err = credgate::Gateway::build(env.config.clone())
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("tls.cert") && err.contains("expires in"),
        "{err}"
    );
    // A lower threshold lets it start (with a warning in the log).
    env.config.tls.min_validity_days = 2;
    assert!(credgate::Gateway::build(env.config.clone()).await.is_ok());
}
