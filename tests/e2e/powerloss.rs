//! Power loss and a full disk, on the volatile test disk of `volatile`:
//! the operating system loses everything that was not fsynced, not only
//! the process (`kill -9` alone cannot catch a store that never syncs:
//! the page cache survives a killed process).

use std::collections::HashSet;
use std::time::Duration;

use crate::process::{burst_then_kill, spawn};
use crate::support::Env;
use crate::volatile::VolatileMount;

/// The gateway on the volatile disk: records and notices acknowledged
/// under load are all there after the power comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_keeps_every_acknowledged_record_and_notice() {
    let mut env = Env::new();
    let mut disk = VolatileMount::new(&env.root.path().join("disk")).expect(
        "mount the FUSE test disk (needs /dev/fuse and root, as on this project's machines)",
    );
    env.config.store.data_dir = env.root.path().join("disk/data");
    env.subscribe(
        "[[subscription]]\nid = \"proc-pull\"\nagency = \"agency-procurement\"\nmode = \"pull\"\nitems = [\"serious_dishonesty\"]\n",
    );
    let mut running = spawn(&env).await;
    let acked: HashSet<String> = burst_then_kill(
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
    assert!(acked.len() > 20, "too few acknowledged: {}", acked.len());
    let syncs = disk.syncs();
    let lost = disk.pull_the_plug().expect("power cycle");
    // The cut did discard something (at least the never-synced WAL
    // index), so the test can see a store that does not sync.
    assert!(
        lost > 0,
        "nothing unsynced was lost: the cut tested nothing"
    );

    let running = spawn(&env).await;
    let agency = env.client(running.main, "agency-procurement");
    let pulled = crate::process::pull_all(&agency).await;
    let missing = acked.difference(&pulled).count();
    eprintln!(
        "power loss: {} acknowledged notices, {} fsyncs before the cut, {lost} files lost unsynced writes, {missing} missing",
        acked.len(),
        syncs
    );
    assert_eq!(
        missing, 0,
        "acknowledged notices (and their records) lost at power loss"
    );
    drop(running);
}

/// A full disk: submissions are refused with `503` and nothing of them is
/// stored; once space returns the same gateway stores again, no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_503_stores_nothing_half_and_recovers() {
    let mut env = Env::new();
    let disk = VolatileMount::new(&env.root.path().join("disk")).expect("mount the FUSE test disk");
    env.config.store.data_dir = env.root.path().join("disk/data");
    let running = spawn(&env).await;
    let court = env.client(running.main, "dept-court");
    let submit = |n: u64| {
        let court = court.clone();
        async move {
            let record = credgate::synth::record("serious_dishonesty", n, "general");
            court
                .post_json(
                    "/v1/records",
                    &serde_json::json!({"item": "serious_dishonesty", "records": [record]}),
                )
                .await
        }
    };
    for n in 0..5 {
        assert_eq!(submit(n).await.status, 200);
    }
    // Full: every write that needs space fails.
    disk.fill_up(Some(0));
    let mut refused = 0;
    let mut stored: i64 = 5;
    for n in 100..140 {
        let resp = submit(n).await;
        match resp.status {
            503 => {
                refused += 1;
                assert_eq!(resp.json()["code"], "gateway_unavailable");
                assert!(resp.header("retry-after").is_some());
            }
            200 => stored += 1,
            other => panic!(
                "a full disk answered {other}: {}",
                String::from_utf8_lossy(&resp.body)
            ),
        }
    }
    assert!(refused > 0, "the full disk refused nothing");
    // Space returns: stored again without a restart.
    disk.fill_up(None);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut n = 1_000;
    loop {
        n += 1;
        if submit(n).await.status == 200 {
            stored += 1;
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery after space returned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(running);
    // Nothing half-written: each stored record has its notice and its
    // delivery rows, and there are no more records than were acknowledged.
    let records = env.count_rows("records");
    let notices = env.count_rows("notices");
    eprintln!("disk full: {refused} refused with 503, {stored} stored, {records} records, {notices} notices");
    assert_eq!(
        records, stored,
        "records stored that were not acknowledged, or lost"
    );
    assert_eq!(
        notices, records,
        "a record without its notice or the reverse"
    );
}
