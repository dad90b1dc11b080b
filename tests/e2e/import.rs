//! `credgate import`: a large historical file with bad rows, interrupted by
//! `kill -9` half way and completed by a re-run.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::notices::{pull_all, pull_sub};
use crate::support::{Env, Server};
use credgate::synth;

const BIN: &str = env!("CARGO_BIN_EXE_credgate");
const ROWS: u64 = 100_000;

/// Row `n` of the file: every 10th a serious penalty, every 3rd ended
/// before the import, 1 % broken (an invalid USCC).
fn row(n: u64) -> Value {
    let serious = n % 10 == 0;
    let mut r = synth::record(
        "administrative_penalty",
        n,
        if serious { "serious" } else { "general" },
    );
    if n % 3 == 0 {
        // Ended years ago; dates as the national exchange files write them.
        r["decision_date"] = json!("2019/03/07");
        r["valid_until"] = json!("2020/03/06");
        r["publicity_end"] = json!("2020/03/06");
    }
    if n % 100 == 7 {
        r["uscc"] = json!("913201001234567890");
        r["subject_type"] = json!("legal_entity");
    }
    r
}

fn is_bad(n: u64) -> bool {
    n % 100 == 7
}

/// Rows that notify: serious, still in effect, not broken.
fn notifies(n: u64) -> bool {
    n % 10 == 0 && n % 3 != 0 && !is_bad(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_import_survives_kill_9_and_completes_on_a_rerun() {
    let env = Env::new();
    env.subscribe(&pull_sub("proc-pull", "agency-procurement", ""));
    // The gateway's first start stores the catalog, participants and
    // subscriptions the import reads.
    Server::start(&env).await.stop().await;

    let file = env.root.path().join("penalties.jsonl");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file).expect("file"));
        for n in 0..ROWS {
            serde_json::to_writer(&mut out, &row(n)).expect("row");
            out.write_all(b"\n").expect("newline");
        }
    }
    let config = env.root.path().join("import.toml");
    std::fs::write(&config, toml::to_string(&env.config).expect("toml")).expect("config");
    let import = || {
        let mut cmd = Command::new(BIN);
        cmd.arg("import")
            .arg(&file)
            .args([
                "--item",
                "administrative_penalty",
                "--as",
                "dept-market",
                "--batch",
                "500",
                "--config",
            ])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };

    // Interrupted half way.
    let mut first = import().spawn().expect("spawn import");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let stored = env.count_rows("records");
        if stored >= (ROWS / 3) as i64 {
            break;
        }
        assert!(
            matches!(first.try_wait(), Ok(None)),
            "the import ended before it could be interrupted ({stored} records)"
        );
        assert!(Instant::now() < deadline, "the import made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().expect("kill -9");
    first.wait().expect("wait");
    let at_kill = env.count_rows("records");
    assert!(
        at_kill < (ROWS - ROWS / 100) as i64,
        "killed before the end: {at_kill}"
    );

    // The re-run completes: the rest stored, nothing twice.
    let out = import().output().expect("re-run");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "rows were rejected: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("{ROWS} rows")), "{text}");
    assert!(text.contains("1000 rejected"), "{text}");
    let good = (0..ROWS).filter(|&n| !is_bad(n)).count() as i64;
    assert_eq!(env.count_rows("records"), good, "every good row once");
    let already: u64 = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" already stored")?.parse().ok())
        .expect("already stored count");
    assert!(
        already as i64 >= at_kill,
        "the re-run skipped what was stored: {text}"
    );

    // One notice per serious record in effect; none for ended records.
    let expected = (0..ROWS).filter(|&n| notifies(n)).count() as i64;
    assert_eq!(env.count_rows("notices"), expected);
    assert_eq!(env.count_rows("deliveries"), expected);
    let count = |sql: &str| env.sql_texts(sql)[0].parse::<i64>().expect("count");
    assert_eq!(
        count("SELECT CAST(COUNT(*) AS TEXT) FROM notices n JOIN records r ON r.id = n.record_id WHERE r.status <> 'active'"),
        0
    );
    let ended = (0..ROWS).filter(|&n| n % 3 == 0 && !is_bad(n)).count() as i64;
    assert_eq!(
        count("SELECT CAST(COUNT(*) AS TEXT) FROM records WHERE status = 'expired'"),
        ended
    );
    // The report lists each broken row (by its line in the file) with its
    // findings, and only those rows.
    let report = std::fs::read_to_string(env.root.path().join("penalties.jsonl.rejected.csv"))
        .expect("report");
    let mut listed: Vec<u64> = report
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("row number")
        })
        .collect();
    listed.dedup();
    let bad: Vec<u64> = (0..ROWS).filter(|&n| is_bad(n)).map(|n| n + 1).collect();
    assert_eq!(listed, bad);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("8,/uscc,invalid_uscc,")),
        "{report:.300}"
    );
    assert!(
        !report.contains("913201001234567890"),
        "no value in the report"
    );

    // The notices reach the agency, marked historical.
    let server = Server::start(&env).await;
    let agency = env.client(server.addr, "agency-procurement");
    let (notices, _, _) = pull_all(&agency, "0").await;
    assert!(!notices.is_empty());
    assert!(
        notices.iter().all(|n| n["historical"] == true),
        "{:#}",
        notices[0]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_spreadsheet_layout_imports_with_chinese_headers() {
    let env = Env::new();
    Server::start(&env).await.stop().await;
    let config = env.root.path().join("import.toml");
    std::fs::write(&config, toml::to_string(&env.config).expect("toml")).expect("config");
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/catalogs/examples/administrative_penalty.csv"
    );
    let report = env.root.path().join("report.csv");
    let run = |dry: bool| {
        let mut cmd = Command::new(BIN);
        cmd.arg("import")
            .arg(example)
            .args([
                "--item",
                "administrative_penalty",
                "--as",
                "dept-market",
                "--config",
            ])
            .arg(&config)
            .arg("--report")
            .arg(&report);
        if dry {
            cmd.arg("--dry-run");
        }
        cmd.output().expect("import")
    };
    let dry = run(true);
    assert_eq!(
        dry.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    assert_eq!(env.count_rows("records"), 0, "a dry run stores nothing");
    let out = run(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2 stored (1 already ended, 1 with a notice)"),
        "{text}"
    );
    let report = std::fs::read_to_string(&report).expect("report");
    assert_eq!(
        report
            .lines()
            .nth(1)
            .map(|l| l.split(',').take(3).collect::<Vec<_>>()),
        Some(vec!["3", "/uscc", "invalid_uscc"])
    );
    // Chinese labels became keys: category list, subject type, level.
    let bodies = env.sql_texts("SELECT body FROM records ORDER BY decision_date");
    let first: Value = serde_json::from_str(&bodies[0]).expect("json");
    assert_eq!(first["penalty_categories"], json!(["warning", "fine"]));
    assert_eq!(first["subject_type"], "legal_entity");
    assert_eq!(first["decision_date"], "2019-03-07");
    let second: Value = serde_json::from_str(&bodies[1]).expect("json");
    assert_eq!(second["severity"], "serious");
    assert_eq!(second["fine_amount"], json!(15.0));
}
