//! Tests that run the real `credgate` binary: crash safety (`kill -9`),
//! graceful shutdown on SIGTERM, and operator-facing command-line errors.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{ops_get, Env};
use credgate::synth;

const BIN: &str = env!("CARGO_BIN_EXE_credgate");

/// Two distinct free local addresses. Both are bound at once: one taken
/// and released after the other could be the same port, and the gateway
/// then refuses its configuration (`ops_listen` must differ from `listen`).
fn free_addrs() -> (SocketAddr, SocketAddr) {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (a, b) = (bind(), bind());
    (a.local_addr().expect("addr"), b.local_addr().expect("addr"))
}

pub(crate) struct Running {
    pub(crate) child: Child,
    pub(crate) main: SocketAddr,
    pub(crate) ops: SocketAddr,
}

impl Drop for Running {
    // A failed test must not leave a gateway running (it would also hold
    // the test harness's output pipe open).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) async fn spawn(env: &Env) -> Running {
    spawn_with(env, &[]).await
}

/// Like [`spawn`], with these environment variables set (an empty value
/// removes the variable).
pub(crate) async fn spawn_with(env: &Env, vars: &[(&str, &str)]) -> Running {
    let (main, ops) = free_addrs();
    let config = env.write_config(main, ops);
    let mut command = Command::new(BIN);
    for (name, value) in vars {
        match value {
            &"" => command.env_remove(name),
            value => command.env(name, value),
        };
    }
    let mut child = command
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn credgate");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = ops_get(ops, "/readyz").await {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("credgate exited before it became ready: {status}");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("credgate did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Running { child, main, ops }
}

/// Waits up to `secs` until the receiver accepted every notice in `acked`
/// (at least once), then checks that all are in `agency`'s pull stream.
pub(crate) async fn assert_pushed_and_pullable(
    rx: &crate::receiver::Receiver,
    agency: &crate::support::Client,
    acked: &std::collections::HashSet<String>,
    secs: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got: std::collections::HashSet<String> =
            rx.accepted().into_iter().map(|r| r.id).collect();
        let missing = acked.difference(&got).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acknowledged notices never pushed",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pulled = pull_all(agency).await;
    assert!(
        acked.is_subset(&pulled),
        "{} acknowledged notices missing from the pull stream",
        acked.difference(&pulled).count()
    );
}

/// The ids of `agency`'s whole pull stream, from the start.
pub(crate) async fn pull_all(agency: &crate::support::Client) -> std::collections::HashSet<String> {
    let mut pulled = std::collections::HashSet::new();
    let mut after = "0".to_owned();
    loop {
        let doc = agency
            .get(&format!("/v1/notices?after={after}&limit=1000"))
            .await
            .json();
        let page = doc["notices"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return pulled;
        }
        pulled.extend(
            page.iter()
                .filter_map(|n| n["notice_id"].as_str().map(str::to_owned)),
        );
        after = doc["next_cursor"].as_str().expect("cursor").to_owned();
    }
}

/// Reads every record in `ids` back as `client` (their submitter): each
/// must be there.
pub(crate) async fn assert_records_present(client: &crate::support::Client, ids: &[String]) {
    let mut conn = client.connect(false).await.expect("connect");
    for id in ids {
        let r = conn
            .send(
                "GET",
                &format!("/v1/records/{id}"),
                &[],
                bytes::Bytes::new(),
            )
            .await
            .expect("get");
        assert_eq!(r.status, 200, "acknowledged record {id} lost");
    }
}

pub(crate) fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Submits single records of `item` from `workers` connections of `dept`
/// for 1.5 s, then kills the gateway with SIGKILL; returns the `field`
/// (record_id or notice_id) of every acknowledged record.
pub(crate) async fn burst_then_kill(
    env: &Env,
    running: &mut Running,
    dept: &str,
    item: &'static str,
    workers: u64,
    field: &'static str,
) -> Vec<String> {
    burst_then_kill_after(env, running, dept, item, workers, field, 0, 1500).await
}

/// [`burst_then_kill`] with record numbers from `first` and the kill after
/// `millis`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn burst_then_kill_after(
    env: &Env,
    running: &mut Running,
    dept: &str,
    item: &'static str,
    workers: u64,
    field: &'static str,
    first: u64,
    millis: u64,
) -> Vec<String> {
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = env.client(running.main, dept);
        let (acked, stop) = (acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut conn) = client.connect(false).await else {
                return;
            };
            let mut n = first + w * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = serde_json::to_vec(
                    &json!({"item": item, "records": [synth::record(item, n, "general")]}),
                )
                .expect("json");
                match conn
                    .send(
                        "POST",
                        "/v1/records",
                        &[("content-type", "application/json")],
                        body,
                    )
                    .await
                {
                    Ok(r) if r.status == 200 => {
                        let id = r.json()["results"][0][field].as_str().map(str::to_owned);
                        acked.lock().expect("lock").extend(id);
                    }
                    // The connection died with the process: stop this worker.
                    _ => return,
                }
            }
        }));
    }
    // Let submissions flow, then kill the process without warning.
    tokio::time::sleep(Duration::from_millis(millis)).await;
    running.child.kill().expect("kill -9");
    running.child.wait().expect("wait");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().expect("lock").clone();
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_record() {
    let env = Env::new();
    let mut running = spawn(&env).await;
    let acked = burst_then_kill(
        &env,
        &mut running,
        "dept-market",
        "administrative_penalty",
        16,
        "record_id",
    )
    .await;
    assert!(
        acked.len() > 50,
        "too few submissions before the kill: {}",
        acked.len()
    );

    // Restart on the same data: every acknowledged record is there.
    let mut running = spawn(&env).await;
    let client = env.client(running.main, "dept-market");
    assert_records_present(&client, &acked).await;
    signal(&running.child, "-TERM");
    running.child.wait().expect("wait");
    assert!(env.count_rows("records") >= acked.len() as i64);
    eprintln!(
        "kill -9: {} acknowledged records, all present after restart",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_dishonesty_burst_loses_no_notice() {
    let env = Env::new();
    let rx =
        crate::receiver::Receiver::start(env.root.path(), "burst", &env.pki.dir.join("ca.pem"), 0)
            .await;
    env.subscribe(&format!(
        "[[subscription]]\nid = \"land-push\"\nagency = \"agency-land\"\nmode = \"push\"\nendpoint = \"{}\"\nca_file = \"{}\"\nsigning_secret = \"whsec_c2VjcmV0LWZvci1sYW5kLWJ1cmVhdS1yZWNlaXZlcg==\"\nitems = [\"serious_dishonesty\"]\n\n\
         [[subscription]]\nid = \"proc-pull\"\nagency = \"agency-procurement\"\nmode = \"pull\"\n",
        rx.endpoint(),
        rx.ca_file.display()
    ));
    let mut running = spawn(&env).await;
    let acked: std::collections::HashSet<String> = burst_then_kill(
        &env,
        &mut running,
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

    let mut running = spawn(&env).await;
    assert_pushed_and_pullable(
        &rx,
        &env.client(running.main, "agency-procurement"),
        &acked,
        60,
    )
    .await;
    signal(&running.child, "-TERM");
    running.child.wait().expect("wait");
    eprintln!(
        "kill -9 burst: {} acknowledged dishonesty notices, all pushed and pullable after restart",
        acked.len()
    );
}

/// mimalloc asks for transparent huge pages, which keep whole 2 MiB pages
/// resident for a few live objects; the gateway turns them off for itself
/// unless the operator sets `MIMALLOC_ALLOW_THP=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_huge_pages_are_off_unless_asked_for() {
    let env = Env::new();
    for (allow, enabled) in [("", "0"), ("0", "0"), ("1", "1")] {
        let running = spawn_with(&env, &[("MIMALLOC_ALLOW_THP", allow)]).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", running.child.id()))
            .expect("proc status");
        let field = status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(str::trim);
        assert_eq!(field, Some(enabled), "MIMALLOC_ALLOW_THP={allow:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let env = Env::new();
    let mut running = spawn(&env).await;
    let client = env.client(running.main, "dept-market");
    let mut inflight = Vec::new();
    for k in 0..8 {
        let body = json!({"item": "red_list", "records": (0..50).map(|n| synth::record("red_list", k * 50 + n, "")).collect::<Vec<_>>()});
        let client = client.clone();
        inflight.push(tokio::spawn(async move {
            client.post_json("/v1/records", &body).await.status
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    signal(&running.child, "-TERM");
    let status = running.child.wait().expect("wait");
    assert!(status.success(), "exit status {status:?}");
    let mut accepted = 0;
    for r in inflight {
        // A request either completed (and then it is stored) or never got
        // in: nothing in between.
        if let Ok(200) = r.await {
            accepted += 50;
        }
    }
    assert_eq!(env.count_rows("records"), accepted);
    assert!(
        ops_get(running.ops, "/healthz").await.is_err(),
        "the process is gone"
    );
}

#[test]
fn config_errors_are_reported_all_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "mode = \"production\"\n[server]\nlisten = \"nowhere\"\n[limits]\nmax_body_bytes = 0\n[tls]\nclient_ca = \"/nonexistent/ca.pem\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("CREDGATE_STORE__READ_CONNECTIONS", "zero")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["server.listen", "store.read_connections"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

#[test]
fn semantic_config_errors_are_reported_all_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "mode = \"production\"\n[limits]\nmax_body_bytes = 0\nmax_batch_records = 0\n[tls]\nclient_ca = \"/nonexistent/ca.pem\"\n[catalog]\ndir = \"/nonexistent/catalog\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "limits.max_body_bytes",
        "limits.max_batch_records",
        "tls.client_ca",
        "catalog.dir",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

#[test]
fn catalog_check_lists_every_problem() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/catalogs/credit/red_list.json"
    ))
    .expect("read");
    let mut item: serde_json::Value = serde_json::from_str(&good).expect("json");
    item["schema"]["properties"]["basis"]
        .as_object_mut()
        .expect("field")
        .remove("x-class");
    item["schema"]["properties"]["award_date"]["format"] = json!("lunar-date");
    item["providers"] = json!(["dept-nobody"]);
    std::fs::write(
        dir.path().join("red_list.json"),
        serde_json::to_string(&item).expect("json"),
    )
    .expect("write");
    std::fs::write(dir.path().join("broken.json"), "{ not json").expect("write");
    let out = Command::new(BIN)
        .args(["catalog", "check"])
        .arg(dir.path())
        .args([
            "--participants",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/participants.toml"),
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "broken.json",
        "x-class is missing",
        "dept-nobody",
        "does not compile",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    // The shipped catalog passes.
    let out = Command::new(BIN)
        .args([
            "catalog",
            "check",
            concat!(env!("CARGO_MANIFEST_DIR"), "/catalogs/credit"),
        ])
        .args([
            "--participants",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/participants.toml"),
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
