//! PostgreSQL stopped and started again under load: the gateway answers
//! `503` while its database is down (and is not ready), loses no
//! acknowledged record, and stores again once it is back, without a
//! restart. The database is a private cluster made for the test (the
//! shared server serves the other tests meanwhile).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{ops_get, Env, Server};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL cluster of its own, run as the `postgres` user.
struct Cluster {
    dir: PathBuf,
    port: u16,
}

fn as_postgres(cmd: &str) {
    let status = Command::new("su")
        .args(["postgres", "-s", "/bin/sh", "-c", cmd])
        .status()
        .expect("su postgres");
    assert!(status.success(), "as postgres: {cmd}");
}

impl Cluster {
    fn create(dir: &Path) -> Cluster {
        std::fs::create_dir_all(dir).expect("dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status()
            .expect("chown");
        assert!(status.success());
        as_postgres(&format!(
            "{PG_BIN}/initdb -D {0}/data -A trust -U postgres > {0}/initdb.log 2>&1",
            dir.display()
        ));
        let cluster = Cluster {
            dir: dir.to_owned(),
            port,
        };
        cluster.start();
        cluster
    }

    fn start(&self) {
        let log = self.dir.join("server.log");
        let status = Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c"])
            .arg(format!(
            "{PG_BIN}/pg_ctl -D {0}/data -l {0}/server.log -w -o '-p {1} -c unix_socket_directories= -c listen_addresses=127.0.0.1' start > /dev/null",
            self.dir.display(),
            self.port
        ))
            .status()
            .expect("su postgres");
        assert!(
            status.success(),
            "PostgreSQL did not start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    fn stop(&self) {
        self.stop_with("fast");
    }

    /// `immediate`: every server process exits at once, no checkpoint (a
    /// crash, as far as the data directory can tell).
    fn stop_with(&self, mode: &str) {
        as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {}/data -m {mode} -w stop > /dev/null",
            self.dir.display()
        ));
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c"])
            .arg(format!(
                "{PG_BIN}/pg_ctl -D {}/data -m immediate stop > /dev/null 2>&1",
                self.dir.display()
            ))
            .status();
    }
}

/// A temporary directory the `postgres` user can reach (a private
/// cluster's files go below it).
fn reachable_tempdir(prefix: &str) -> tempfile::TempDir {
    let top = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(
        top.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    top
}

/// Four connections submitting dishonesty records one by one until
/// stopped, counting what was acknowledged (record ids), refused with 503,
/// and answered otherwise.
struct Writers {
    acked: Arc<Mutex<Vec<String>>>,
    refused: Arc<AtomicU64>,
    other: Arc<Mutex<Vec<u16>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(env: &Env, addr: std::net::SocketAddr) -> Writers {
        let mut w = Writers {
            acked: Arc::default(),
            refused: Arc::default(),
            other: Arc::default(),
            stop: Arc::default(),
            tasks: Vec::new(),
        };
        for i in 0..4u64 {
            let client = env.client(addr, "dept-court");
            let (acked, refused, other, stop) = (
                w.acked.clone(),
                w.refused.clone(),
                w.other.clone(),
                w.stop.clone(),
            );
            w.tasks.push(tokio::spawn(async move {
                let mut n = 500_000 + i * 100_000;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let record = credgate::synth::record("serious_dishonesty", n, "general");
                    let resp = client
                        .post_json(
                            "/v1/records",
                            &serde_json::json!({"item": "serious_dishonesty", "records": [record]}),
                        )
                        .await;
                    match resp.status {
                        200 => acked.lock().expect("lock").extend(
                            resp.json()["results"][0]["record_id"]
                                .as_str()
                                .map(str::to_owned),
                        ),
                        503 => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        s => other.lock().expect("lock").push(s),
                    }
                }
            }));
        }
        w
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_under_load_costs_503s_and_nothing_else() {
    let top = reachable_tempdir("credgate-pg-outage");
    let cluster = Cluster::create(&top.path().join("pg"));
    let mut env = Env::new();
    env.config.store.url = Some(cluster.url());
    let server = Server::start(&env).await;

    let writers = Writers::start(&env, server.addr);
    let (acked, refused, other) = (
        writers.acked.clone(),
        writers.refused.clone(),
        writers.other.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = acked.lock().expect("lock").len();
    cluster.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ready_while_down, _) = ops_get(server.ops, "/readyz").await.expect("readyz");
    let refused_while_down = refused.load(Ordering::Relaxed);
    cluster.start();
    let downtime = down.elapsed();
    // Back: stored again by the same gateway.
    let deadline = Instant::now() + Duration::from_secs(30);
    let at_restart = acked.lock().expect("lock").len();
    while acked.lock().expect("lock").len() < at_restart + 20 {
        assert!(
            Instant::now() < deadline,
            "no recovery after PostgreSQL came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writers.stop().await;
    let (ready_after, _) = ops_get(server.ops, "/readyz").await.expect("readyz");
    let acked = acked.lock().expect("lock").clone();
    let other = other.lock().expect("lock").clone();
    eprintln!(
        "postgres outage: {before} stored before, down {downtime:?}, {refused_while_down} refused with 503 while down, {} acknowledged in all, other answers {other:?}",
        acked.len()
    );
    assert!(before > 0);
    assert!(refused_while_down > 0, "no 503 while the database was down");
    assert_eq!(ready_while_down, 503, "ready while the database was down");
    assert_eq!(ready_after, 200);
    assert!(other.is_empty(), "answers other than 200/503: {other:?}");
    // Every acknowledged record is there.
    let unique: HashSet<&String> = acked.iter().collect();
    assert_eq!(unique.len(), acked.len(), "a record id acknowledged twice");
    let court = env.client(server.addr, "dept-court");
    crate::process::assert_records_present(&court, &acked).await;
    server.stop().await;
}

/// PostgreSQL's data directory on the volatile FUSE disk (see
/// `powerloss`): records acknowledged under load survive PostgreSQL
/// crashing and the disk losing every write it was not asked to sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_power_loss_keeps_every_acknowledged_record() {
    let top = reachable_tempdir("credgate-pg-power");
    let mut disk = crate::volatile::VolatileMount::new(&top.path().join("disk"))
        .expect("mount the FUSE test disk");
    let cluster = Cluster::create(&top.path().join("disk/pg"));
    let mut env = Env::new();
    env.config.store.url = Some(cluster.url());
    let server = Server::start(&env).await;
    let writers = Writers::start(&env, server.addr);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.stop_with("immediate");
    let acked = writers.acked.clone();
    writers.stop().await;
    let acked = acked.lock().expect("lock").clone();
    let lost = disk.pull_the_plug().expect("power cycle");
    cluster.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ops_get(server.ops, "/readyz")
        .await
        .map(|r| r.0)
        .unwrap_or(0)
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "not ready after PostgreSQL came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "postgres power loss: {} acknowledged, {} fsyncs, {lost} files lost unsynced writes",
        acked.len(),
        disk.syncs()
    );
    assert!(acked.len() > 10, "too few acknowledged: {}", acked.len());
    assert!(
        lost > 0,
        "nothing unsynced was lost: the cut tested nothing"
    );
    let court = env.client(server.addr, "dept-court");
    crate::process::assert_records_present(&court, &acked).await;
    server.stop().await;
}
