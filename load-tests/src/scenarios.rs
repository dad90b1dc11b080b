//! The scenarios: each prepares (or targets) a gateway, drives it, and
//! returns a human summary and a JSON report.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::client::{connect, tls_config, Conn};
use crate::harness::{Workspace, DEPARTMENTS};
use crate::pool::Pool;
use crate::receiver::Receiver;
use crate::report::{histogram, percentiles, Errors};

/// Request bodies prepared before the run so generating them does not
/// compete with the gateway for CPU during it.
pub fn bodies(item: &str, batch: usize, invalid: f64, seed: u64, count: usize) -> Vec<Bytes> {
    let mut n = seed.wrapping_mul(1_000_003);
    (0..count)
        .map(|_| {
            let records: Vec<Value> = (0..batch.max(1))
                .map(|_| {
                    n += 1;
                    let mut r = credgate::synth::record(
                        item,
                        n,
                        if n.is_multiple_of(10) {
                            "serious"
                        } else {
                            "general"
                        },
                    );
                    // Room for the pool to make the record unique per request.
                    if let Some(Value::String(d)) = r.get_mut("decision_number") {
                        d.push_str(crate::pool::Pool::mark());
                    }
                    // Deterministic share of invalid records: a bad check character.
                    if invalid > 0.0 && (n % 1000) < (invalid * 1000.0) as u64 {
                        r["uscc"] = json!("914403001922038217");
                        r["subject_type"] = json!("legal_entity");
                    }
                    r
                })
                .collect();
            Bytes::from(
                serde_json::to_vec(&json!({"item": item, "records": records})).unwrap_or_default(),
            )
        })
        .collect()
}

/// The departments that may submit `item`, from the shipped catalog.
pub fn providers(item: &str) -> Result<Vec<String>, String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../catalogs/credit/{item}.json"));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let def: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let list: Vec<String> = def["providers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .filter(|p| DEPARTMENTS.contains(&p.as_str()))
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        return Err(format!("no load-test department provides {item}"));
    }
    Ok(list)
}

/// `fanout`: dishonesty records to `subs` subscriptions (half push).
pub async fn fanout(
    subs: usize,
    connections: usize,
    rate: u64,
    duration: u64,
    batch_max: usize,
) -> Result<(String, Value), String> {
    let subs = subs.max(2);
    let pushes = subs / 2;
    let ws = Workspace::create("fanout", subs, None).await?;
    // Receivers: their own CA and server certificate; they accept the gateway's CA.
    let rca = credgate::pki::DevCa::generate("load receiver CA").map_err(|e| e.to_string())?;
    let server = rca
        .issue_server(&["localhost", "127.0.0.1"])
        .map_err(|e| e.to_string())?;
    let rca_file = ws.dir.join("receiver-ca.pem");
    std::fs::write(&rca_file, &rca.cert_pem).map_err(|e| e.to_string())?;
    let mut receivers = Vec::new();
    for _ in 0..pushes {
        receivers.push(
            Receiver::start(&ws.certs.join("ca.pem"), &server.cert_pem, &server.key_pem).await?,
        );
    }
    let mut toml = String::new();
    for i in 0..subs {
        let agency = format!("agency-load-{i:02}");
        toml.push_str(&format!("[[subscription]]\nid = \"sub-{i:02}\"\nagency = \"{agency}\"\nitems = [\"serious_dishonesty\"]\n"));
        if let Some(receiver) = receivers.get(i) {
            toml.push_str(&format!(
                "mode = \"push\"\nendpoint = \"https://localhost:{}/hook\"\nca_file = \"{}\"\nsigning_secret = \"whsec_bG9hZC10ZXN0LXNpZ25pbmctc2VjcmV0LTAxMjM0NTY3\"\nmax_in_flight = 32\nrate_per_second = 1000000\nbatch_max = {}\n\n",
                receiver.addr.port(),
                rca_file.display(),
                batch_max.max(1)
            ));
        } else {
            toml.push_str("mode = \"pull\"\n\n");
        }
    }
    ws.subscriptions(&toml)?;
    let gateway = ws.start().await?;
    // Pullers and submitters spread over the instances.
    let addrs = gateway.addrs.clone();
    let target_of = |i: usize| addrs[i % addrs.len()];

    // Pullers: long-poll each pull agency, note arrivals, acknowledge.
    let stop_pull = Arc::new(AtomicBool::new(false));
    let mut pullers = Vec::new();
    for i in pushes..subs {
        let agency = format!("agency-load-{i:02}");
        let tls = tls_config(&ws.certs, &agency, false)?;
        let mut conn = connect(target_of(i), tls, false).await?;
        let stop = stop_pull.clone();
        pullers.push(tokio::spawn(async move {
            let mut arrivals: HashMap<String, Instant> = HashMap::new();
            let mut cursor = "0".to_owned();
            loop {
                let Ok((200, body)) = conn
                    .request(
                        "GET",
                        &format!("/v1/notices?after={cursor}&limit=1000&wait=1"),
                        None,
                    )
                    .await
                else {
                    break;
                };
                let now = Instant::now();
                let page: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let notices = page["notices"].as_array().cloned().unwrap_or_default();
                for n in &notices {
                    if let Some(id) = n["notice_id"].as_str() {
                        arrivals.entry(id.to_owned()).or_insert(now);
                    }
                }
                if let Some(c) = page["next_cursor"].as_str() {
                    if c != cursor {
                        cursor = c.to_owned();
                        let _ = conn
                            .request(
                                "POST",
                                "/v1/notices/ack",
                                Some(Bytes::from(format!("{{\"cursor\":\"{cursor}\"}}"))),
                            )
                            .await;
                    }
                }
                if notices.is_empty() && stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            arrivals
        }));
    }

    // Submitters, paced to `rate` in total when given.
    let pool = Arc::new(Pool::new(bodies("serious_dishonesty", 1, 0.0, 7, 2048)));
    let submitters_of = providers("serious_dishonesty")?;
    let acks: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let before = gateway.stats();
    let deadline = Instant::now() + Duration::from_secs(duration);
    let mut submitters = Vec::new();
    for c in 0..connections.max(1) {
        let tls = tls_config(&ws.certs, &submitters_of[c % submitters_of.len()], false)?;
        let mut conn: Conn = connect(target_of(c), tls, false).await?;
        let (pool, acks) = (pool.clone(), acks.clone());
        let interval =
            (rate > 0).then(|| Duration::from_secs_f64(connections.max(1) as f64 / rate as f64));
        submitters.push(tokio::spawn(async move {
            let mut errors = Errors::default();
            let mut next = Instant::now();
            while Instant::now() < deadline {
                if let Some(every) = interval {
                    next += every;
                    tokio::time::sleep_until(next.into()).await;
                }
                let body = pool.next();
                match conn.request("POST", "/v1/records", Some(body)).await {
                    Ok((200, b)) => {
                        let now = Instant::now();
                        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                        if let Some(id) = v["results"][0]["notice_id"].as_str() {
                            if let Ok(mut m) = acks.lock() {
                                m.insert(id.to_owned(), now);
                            }
                        }
                    }
                    Ok((status, _)) => errors.add(format!("http_{status}")),
                    Err(_) => {
                        errors.add("io");
                        break;
                    }
                }
            }
            errors
        }));
    }
    let mut errors = Errors::default();
    for s in submitters {
        if let Ok(e) = s.await {
            errors.merge(&e);
        }
    }
    let submit_end = Instant::now();
    let acked: HashMap<String, Instant> = acks.lock().map(|m| m.clone()).unwrap_or_default();
    // Wait for pushes to drain (pulls drain as the pullers stop).
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = receivers.iter().all(|r| {
            r.arrivals
                .lock()
                .map(|m| acked.keys().all(|k| m.contains_key(k)))
                .unwrap_or(true)
        });
        if done || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_pull.store(true, Ordering::Relaxed);
    let mut pulled = Vec::new();
    for p in pullers {
        if let Ok(a) = p.await {
            pulled.push(a);
        }
    }
    let after = gateway.stats();
    gateway.stop();

    let (mut push_h, mut pull_h, mut all_h) = (histogram(), histogram(), histogram());
    let (mut delivered, mut last) = (0u64, submit_end);
    let mut record = |arrivals: &HashMap<String, Instant>,
                      h: &mut hdrhistogram::Histogram<u64>,
                      all: &mut hdrhistogram::Histogram<u64>| {
        for (id, at) in arrivals {
            if let Some(acked_at) = acked.get(id) {
                let us = at.saturating_duration_since(*acked_at).as_micros().max(1) as u64;
                let _ = h.record(us);
                let _ = all.record(us);
                delivered += 1;
                last = last.max(*at);
            }
        }
    };
    for r in &receivers {
        let m = r.arrivals.lock().map(|m| m.clone()).unwrap_or_default();
        record(&m, &mut push_h, &mut all_h);
    }
    for m in &pulled {
        record(m, &mut pull_h, &mut all_h);
    }
    let first = acked.values().min().copied().unwrap_or(submit_end);
    let span = last
        .saturating_duration_since(first)
        .as_secs_f64()
        .max(0.001);
    let expected = acked.len() as u64 * subs as u64;
    let json = json!({
        "scenario": "fanout", "subscriptions": subs, "push": pushes, "pull": subs - pushes, "batch_max": batch_max.max(1),
        "target_rate": rate, "seconds": duration,
        "records_acknowledged": acked.len(), "records_per_s": acked.len() as f64 / duration as f64,
        "deliveries_expected": expected, "deliveries_received": delivered,
        "deliveries_per_s": delivered as f64 / span,
        "ack_to_received_ms": {"all": percentiles(&all_h), "push": percentiles(&push_h), "pull": percentiles(&pull_h)},
        "errors": errors.json(),
        "gateway": {"cpu_secs": after.cpu_secs - before.cpu_secs, "peak_rss_mb": after.peak_rss as f64 / 1048576.0},
    });
    let summary = format!(
        "fanout {subs} subscriptions ({pushes} push{}): {} records ({:.0}/s), {delivered}/{expected} deliveries, {:.0} deliveries/s; ack→received ms p50 {} p99 {} (push p99 {}, pull p99 {}); errors {}",
        if batch_max > 1 { format!(", batch_max {batch_max}") } else { String::new() },
        acked.len(),
        acked.len() as f64 / duration as f64,
        delivered as f64 / span,
        json["ack_to_received_ms"]["all"]["p50"],
        json["ack_to_received_ms"]["all"]["p99"],
        json["ack_to_received_ms"]["push"]["p99"],
        json["ack_to_received_ms"]["pull"]["p99"],
        errors.json(),
    );
    Ok((summary, json))
}

/// `import`: `credgate import` of a JSON Lines file of `rows` penalties
/// (every 10th serious, every 3rd ended before the import), against a
/// dry run of the same file (parse and validate, nothing stored) measured
/// in the same run, then a re-run over the stored file (every row a
/// duplicate: what resuming costs).
pub async fn import(rows: u64, batch: usize) -> Result<(String, Value), String> {
    let ws = Workspace::create("import", 2, None).await?;
    ws.subscriptions(
        "[[subscription]]\nid = \"p0\"\nagency = \"agency-load-00\"\nmode = \"pull\"\n\n\
         [[subscription]]\nid = \"p1\"\nagency = \"agency-load-01\"\nmode = \"pull\"\n",
    )?;
    // The gateway's first start stores the catalog the import reads.
    ws.start().await?.stop();
    let file = ws.dir.join("penalties.jsonl");
    {
        use std::io::Write;
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(&file).map_err(|e| e.to_string())?);
        for n in 0..rows {
            let mut r = credgate::synth::record(
                "administrative_penalty",
                n,
                if n.is_multiple_of(10) {
                    "serious"
                } else {
                    "general"
                },
            );
            if n.is_multiple_of(3) {
                r["decision_date"] = json!("2019/03/07");
                r["valid_until"] = json!("2020/03/06");
                r["publicity_end"] = json!("2020/03/06");
            }
            serde_json::to_writer(&mut out, &r).map_err(|e| e.to_string())?;
            out.write_all(b"\n").map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    let config = ws.dir.join("import.toml");
    std::fs::write(
        &config,
        toml::to_string(&ws.config).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let bin = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("credgate");
    let run = |extra: &[&str]| -> Result<(f64, String), String> {
        let started = Instant::now();
        let out = std::process::Command::new(&bin)
            .arg("import")
            .arg(&file)
            .args([
                "--item",
                "administrative_penalty",
                "--as",
                "dept-market",
                "--config",
            ])
            .arg(&config)
            .args(["--batch", &batch.to_string()])
            .args(extra)
            .output()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let secs = started.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.code() != Some(0) {
            return Err(format!(
                "import failed: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok((rows as f64 / secs, text))
    };
    let (dry, _) = run(&["--dry-run"])?;
    let (stored, text) = run(&[])?;
    let (resumed, _) = run(&[])?;
    let summary = format!(
        "import of {rows} rows (JSON Lines, {}, batches of {batch}): {stored:.0} rows/s stored; dry run (parse + validate, same file, same run) {dry:.0} rows/s: {:.2}×; re-run over the stored file {resumed:.0} rows/s\n  {text}",
        if ws.config.store.backend == credgate::config::StoreBackend::Postgres { "PostgreSQL" } else { "SQLite" },
        stored / dry.max(1.0),
    );
    Ok((
        summary,
        json!({"scenario": "import", "rows": rows, "batch": batch, "stored_rows_per_s": stored, "dry_run_rows_per_s": dry,
               "ratio_to_dry_run": stored / dry.max(1.0), "rerun_rows_per_s": resumed}),
    ))
}
