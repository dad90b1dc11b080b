//! Request-driving scenarios against credgate or the nginx reference, the
//! side-by-side comparison, and the CI smoke mode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use serde_json::{json, Value};

use crate::drive::{self, Spec};
use crate::harness::{GatewayProcess, Nginx, Workspace};
use crate::pool::Pool;
use crate::report::{percentiles, ProcStats};
use crate::scenarios::{bodies, providers};
use crate::Load;

/// What serves the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Against {
    /// The credgate binary next to this one.
    Credgate,
    /// nginx as an mTLS static responder (the reference).
    Nginx,
}

/// What drives the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Client {
    /// The built-in driver (unique records, no TLS resumption per request).
    #[default]
    Builtin,
    /// oha, the independent client (see `oha.rs` for how it differs).
    Oha,
}

/// A started target with its workspace.
pub struct Target {
    /// Address to drive (the first instance).
    pub addr: std::net::SocketAddr,
    /// Every instance.
    pub addrs: Vec<std::net::SocketAddr>,
    /// Certificates.
    pub certs: std::path::PathBuf,
    gateway: Option<GatewayProcess>,
    nginx: Option<Nginx>,
    ws: Option<Workspace>,
}

impl Target {
    /// Starts `against` in a fresh workspace (departments with `quota`).
    pub async fn start(
        against: Against,
        name: &str,
        quota: Option<credgate::config::Quota>,
    ) -> Result<Target, String> {
        let ws = Workspace::create(name, 0, quota).await?;
        let certs = ws.certs.clone();
        let (gateway, nginx, addrs) = match against {
            Against::Credgate => {
                let g = ws.start().await?;
                let a = g.addrs.clone();
                (Some(g), None, a)
            }
            Against::Nginx => {
                let n = ws.start_nginx().await?;
                let a = vec![n.addr];
                (None, Some(n), a)
            }
        };
        Ok(Target {
            addr: addrs[0],
            addrs,
            certs,
            gateway,
            nginx,
            ws: Some(ws),
        })
    }

    /// A gateway someone else runs.
    pub fn external(addr: std::net::SocketAddr, certs: std::path::PathBuf) -> Target {
        Target {
            addr,
            addrs: vec![addr],
            certs,
            gateway: None,
            nginx: None,
            ws: None,
        }
    }

    /// A counter or gauge of the gateway this run started (`None` for
    /// nginx and an external gateway).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let ops = self.ws.as_ref().filter(|_| self.gateway.is_some())?;
        crate::harness::ops_counter(ops.config.server.ops_listen, name).await
    }

    /// CPU and memory of the server side.
    pub fn stats(&self) -> ProcStats {
        match (&self.gateway, &self.nginx) {
            (Some(g), _) => g.stats(),
            (_, Some(n)) => n.stats(),
            _ => ProcStats::default(),
        }
    }

    /// Stops the server.
    pub fn stop(mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop();
        }
    }
}

/// A scenario's result.
pub struct Report {
    /// One line for people.
    pub summary: String,
    /// Everything, for machines.
    pub json: Value,
    /// The figure compared with the reference (requests/s).
    pub rate: f64,
    /// Server CPU per request, µs.
    pub cpu_us: f64,
}

fn spec_for(load: &Load, target: &Target, departments: Vec<String>, per_request: bool) -> Spec {
    Spec {
        targets: target.addrs.clone(),
        certs: target.certs.clone(),
        participants: departments,
        connections: load.connections,
        streams: load.streams,
        h2: load.h2,
        new_connection_per_request: per_request,
        path: "/v1/records",
        get: false,
        rate: None,
        duration: Duration::from_secs(load.duration),
        bodies: Arc::new(Pool::new(bodies(
            &load.item,
            load.batch,
            load.invalid,
            load.seed,
            2048,
        ))),
        records_per_body: load.batch as u64,
    }
}

async fn measured(
    spec: &Spec,
    target: &Target,
    load: &Load,
) -> Result<(drive::Outcome, f64, ProcStats), String> {
    let before = target.stats();
    let out = match load.client {
        Client::Builtin => drive::run(spec).await?,
        Client::Oha => crate::oha::run(spec, load.batch).await?,
    };
    let after = target.stats();
    Ok((out, after.cpu_secs - before.cpu_secs, after))
}

/// The route of `floor`: the cheapest request a participant can make,
/// answered from memory (the report signing keys). nginx answers it as it
/// answers everything.
pub const FLOOR_PATH: &str = "/v1/credit-reviews/keys";

/// `ingest` / `batch` / `h2` / `handshake`: drive `POST /v1/records`;
/// `floor`: `GET` [`FLOOR_PATH`] alike, through the same TLS, HTTP,
/// authentication, rate limit and metrics but no validation or storage.
pub async fn requests(
    name: &str,
    load: &Load,
    against: Against,
    per_request: bool,
) -> Result<Report, String> {
    let target = match load.target {
        Some(addr) => Target::external(addr, load.certs.clone()),
        None => Target::start(against, name, None).await?,
    };
    let mut spec = spec_for(load, &target, providers(&load.item)?, per_request);
    if name == "floor" {
        spec.path = FLOOR_PATH;
        spec.get = true;
    }
    let (out, cpu, after) = measured(&spec, &target, load).await?;
    // Work the run left behind: each stored record's subject is graded in
    // the background, and a backlog means the rate was not sustained.
    let grade_backlog = target.metric("credgate_grade_backlog").await;
    let graded = target.metric("credgate_grade_assessments_total").await;
    target.stop();
    let rate = out.ok as f64 / out.secs;
    let cpu_us = if out.ok > 0 {
        cpu * 1e6 / out.ok as f64
    } else {
        0.0
    };
    let latency = out
        .quoted_latency_ms
        .clone()
        .unwrap_or_else(|| percentiles(&out.hist));
    let json = json!({
        "scenario": name, "against": format!("{against:?}").to_lowercase(),
        "client": format!("{:?}", load.client).to_lowercase(), "http2": load.h2,
        "connections": load.connections, "streams": load.streams, "batch": load.batch, "item": load.item,
        "new_connection_per_request": per_request, "seconds": out.secs,
        "requests_ok": out.ok, "requests_per_s": rate, "records_per_s": out.records as f64 / out.secs,
        "latency_ms": latency, "errors": out.errors.json(),
        "server": {"cpu_secs": cpu, "cpu_us_per_request": cpu_us, "peak_rss_mb": after.peak_rss as f64 / 1048576.0,
            "grade_backlog": grade_backlog, "graded_subjects": graded},
    });
    let summary = format!(
        "{name} [{}, {}] {}x{}{} batch {}: {:.0} req/s, {:.0} records/s; latency ms p50 {} p99 {} p99.9 {}; errors {}; server CPU {:.1} µs/request, peak RSS {:.0} MB",
        json["against"].as_str().unwrap_or(""),
        json["client"].as_str().unwrap_or(""),
        load.connections,
        load.streams,
        if load.h2 { " h2" } else { "" },
        load.batch,
        rate,
        out.records as f64 / out.secs,
        json["latency_ms"]["p50"],
        json["latency_ms"]["p99"],
        json["latency_ms"]["p999"],
        out.errors.json(),
        cpu_us,
        after.peak_rss as f64 / 1048576.0,
    ) + &grade_backlog
        .map(|b| format!("; grading backlog {b:.0} subjects"))
        .unwrap_or_default();
    Ok(Report {
        summary,
        json,
        rate,
        cpu_us,
    })
}

/// `idle`: `idle` mTLS connections held open while `ingest` runs; compared
/// with `ingest` alone in the same run.
pub async fn idle(load: &Load, against: Against, idle: usize) -> Result<Report, String> {
    let target = Target::start(against, "idle", None).await?;
    let spec = spec_for(load, &target, providers(&load.item)?, false);
    let (alone, _, _) = measured(&spec, &target, load).await?;
    let before_idle = target.stats();
    let held = drive::idle_connections(target.addr, &target.certs, "dept-market", idle).await?;
    let opened = held.len();
    let (with_idle, cpu, after) = measured(&spec, &target, load).await?;
    drop(held);
    target.stop();
    let (a, b) = (
        alone.ok as f64 / alone.secs,
        with_idle.ok as f64 / with_idle.secs,
    );
    let json = json!({
        "scenario": "idle", "against": format!("{against:?}").to_lowercase(), "idle_connections": opened,
        "requests_per_s_alone": a, "requests_per_s_with_idle": b, "ratio": if a > 0.0 { b / a } else { 0.0 },
        "latency_ms_with_idle": percentiles(&with_idle.hist), "errors": with_idle.errors.json(),
        "server": {"peak_rss_mb": after.peak_rss as f64 / 1048576.0, "rss_before_idle_mb": before_idle.peak_rss as f64 / 1048576.0, "cpu_secs": cpu},
    });
    let summary = format!(
        "idle [{}] {opened} idle connections: ingest {b:.0} req/s vs {a:.0} alone ({:.0} %); server peak RSS {:.0} MB",
        json["against"].as_str().unwrap_or(""),
        if a > 0.0 { 100.0 * b / a } else { 0.0 },
        after.peak_rss as f64 / 1048576.0
    );
    Ok(Report {
        summary,
        json,
        rate: b,
        cpu_us: if with_idle.ok > 0 {
            cpu * 1e6 / with_idle.ok as f64
        } else {
            0.0
        },
    })
}

/// `fairness`: one department floods at `factor`× its quota while two
/// others submit at a steady rate; their p99 is compared with a run
/// without the flood.
pub async fn fairness(
    duration: u64,
    quota: u32,
    factor: u32,
    steady_rate: f64,
) -> Result<Report, String> {
    let q = credgate::config::Quota {
        per_second: quota,
        burst: quota,
    };
    let target = Target::start(Against::Credgate, "fairness", Some(q)).await?;
    let pool = Arc::new(Pool::new(bodies("red_list", 1, 0.0, 3, 1024)));
    let steady = Spec {
        targets: target.addrs.clone(),
        certs: target.certs.clone(),
        participants: vec!["dept-tax".into(), "dept-ecology".into()],
        connections: 4,
        streams: 1,
        h2: false,
        new_connection_per_request: false,
        path: "/v1/records",
        get: false,
        rate: Some(steady_rate),
        duration: Duration::from_secs(duration),
        bodies: pool.clone(),
        records_per_body: 1,
    };
    let calm = drive::run(&steady).await?;
    let flood = Spec {
        participants: vec!["dept-market".into()],
        connections: 16,
        rate: Some(f64::from(quota) * f64::from(factor)),
        ..steady.clone()
    };
    let (steady_out, flood_out) = tokio::join!(drive::run(&steady), drive::run(&flood));
    let (steady_out, flood_out) = (steady_out?, flood_out?);
    target.stop();
    let p99 = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.99) as f64 / 1000.0;
    let (calm_p99, flood_p99) = (p99(&calm.hist), p99(&steady_out.hist));
    let refused = flood_out.errors.0.get("http_429").copied().unwrap_or(0);
    let timeouts = flood_out.errors.0.get("timeout").copied().unwrap_or(0);
    let json = json!({
        "scenario": "fairness", "quota_per_second": quota, "flood_factor": factor, "steady_rate": steady_rate,
        "steady_p99_ms_alone": calm_p99, "steady_p99_ms_during_flood": flood_p99,
        "p99_ratio": if calm_p99 > 0.0 { flood_p99 / calm_p99 } else { 0.0 },
        "steady_errors_during_flood": steady_out.errors.json(),
        "flood": {"accepted_per_s": flood_out.ok as f64 / flood_out.secs, "http_429": refused, "timeouts": timeouts, "latency_ms_all": percentiles(&flood_out.all), "errors": flood_out.errors.json()},
    });
    let summary = format!(
        "fairness: steady p99 {calm_p99:.2} ms alone, {flood_p99:.2} ms during a {factor}x flood ({:+.0} %); flooder got {refused} × 429, {timeouts} timeouts, {:.0} accepted/s (quota {quota}/s)",
        if calm_p99 > 0.0 { 100.0 * (flood_p99 / calm_p99 - 1.0) } else { 0.0 },
        flood_out.ok as f64 / flood_out.secs,
    );
    Ok(Report {
        summary,
        json,
        rate: flood_p99,
        cpu_us: 0.0,
    })
}

/// Penalty records to a gateway this tool starts, with the given shape.
fn preset(connections: usize, streams: usize, h2: bool, batch: usize, duration: u64) -> Load {
    Load {
        target: None,
        certs: "certs/dev".into(),
        connections,
        streams,
        h2,
        batch,
        item: "administrative_penalty".into(),
        invalid: 0.0,
        duration,
        seed: 1,
        client: Client::Builtin,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `compare`: each scenario against credgate and nginx, alternating,
/// `runs` times; medians and ratios.
pub async fn compare(
    runs: usize,
    duration: u64,
    idle_n: usize,
    only: &[String],
    clients: &[Client],
) -> Result<(String, Value), String> {
    let base = |connections, streams, h2, batch| preset(connections, streams, h2, batch, duration);
    let cases: Vec<(&str, Load, bool)> = vec![
        ("ingest", base(64, 1, false, 1), false),
        ("floor", base(64, 1, false, 1), false),
        ("h2", base(8, 8, true, 1), false),
        ("handshake", base(32, 1, false, 1), true),
        ("batch", base(16, 1, false, 100), false),
        ("idle", base(64, 1, false, 1), false),
    ];
    let clients = if clients.is_empty() {
        &[Client::Builtin][..]
    } else {
        clients
    };
    let mut table = Vec::new();
    let mut lines = vec![format!(
        "{:<10} {:<8} {:>14} {:>14} {:>7} {:>16} {:>16}",
        "scenario", "client", "credgate", "nginx", "ratio", "credgate µs/req", "nginx µs/req"
    )];
    for (name, load, per_request) in cases {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        for &client in clients {
            if name == "idle" && client != Client::Builtin {
                continue;
            }
            let load = Load {
                client,
                ..load.clone()
            };
            let mut samples: Vec<(Against, Report)> = Vec::new();
            for r in 0..runs.max(1) {
                // Alternate which goes first so drift hits both alike.
                let order = if r % 2 == 0 {
                    [Against::Credgate, Against::Nginx]
                } else {
                    [Against::Nginx, Against::Credgate]
                };
                for against in order {
                    let report = if name == "idle" {
                        idle(&load, against, idle_n).await?
                    } else {
                        requests(name, &load, against, per_request).await?
                    };
                    eprintln!("  run {}: {}", r + 1, report.summary);
                    samples.push((against, report));
                }
            }
            let pick = |a: Against, f: &dyn Fn(&Report) -> f64| {
                median(
                    samples
                        .iter()
                        .filter(|(x, _)| *x == a)
                        .map(|(_, r)| f(r))
                        .collect(),
                )
            };
            let metric: &dyn Fn(&Report) -> f64 = if name == "batch" {
                &|r: &Report| r.json["records_per_s"].as_f64().unwrap_or(0.0)
            } else {
                &|r: &Report| r.rate
            };
            let (c, n) = (
                pick(Against::Credgate, metric),
                pick(Against::Nginx, metric),
            );
            let (cc, nc) = (
                pick(Against::Credgate, &|r| r.cpu_us),
                pick(Against::Nginx, &|r| r.cpu_us),
            );
            let unit = if name == "batch" {
                "records/s"
            } else {
                "req/s"
            };
            let who = format!("{client:?}").to_lowercase();
            lines.push(format!(
                "{name:<10} {who:<8} {c:>10.0} {unit:<4} {n:>10.0} {:>7.2} {cc:>16.1} {nc:>16.1}",
                if n > 0.0 { c / n } else { 0.0 }
            ));
            table.push(json!({
                "scenario": name, "client": who, "unit": unit, "credgate": c, "nginx": n, "ratio": if n > 0.0 { c / n } else { 0.0 },
                "credgate_cpu_us_per_request": cc, "nginx_cpu_us_per_request": nc,
                "runs": samples.iter().map(|(a, r)| json!({"against": format!("{a:?}").to_lowercase(), "report": r.json})).collect::<Vec<_>>(),
            }));
        }
    }
    Ok((
        lines.join("\n"),
        json!({"runs": runs, "duration_s": duration, "scenarios": table}),
    ))
}

/// `smoke`: every scenario for a few seconds with small numbers; fails on
/// any error or an empty result. Keeps the harness from rotting in CI.
pub async fn smoke() -> Result<(String, Value), String> {
    let load = |connections, streams, h2, batch| preset(connections, streams, h2, batch, 2);
    let mut lines = Vec::new();
    let mut all = Vec::new();
    let mut failures = Vec::new();
    let mut check = |name: &str, r: Report, ok: bool| {
        lines.push(r.summary.clone());
        if !ok {
            failures.push(format!("{name}: {}", r.summary));
        }
        all.push(r.json);
    };
    let clean =
        |r: &Report| r.rate > 0.0 && r.json["errors"].as_object().is_some_and(|e| e.is_empty());
    let r = requests("ingest", &load(4, 1, false, 1), Against::Credgate, false).await?;
    let ok = clean(&r);
    check("ingest", r, ok);
    let r = requests("floor", &load(4, 1, false, 1), Against::Credgate, false).await?;
    let ok = clean(&r);
    check("floor", r, ok);
    let r = requests("batch", &load(2, 1, false, 20), Against::Credgate, false).await?;
    let ok = clean(&r);
    check("batch", r, ok);
    let r = requests("h2", &load(2, 4, true, 1), Against::Credgate, false).await?;
    let ok = clean(&r);
    check("h2", r, ok);
    let r = requests("handshake", &load(2, 1, false, 1), Against::Credgate, true).await?;
    let ok = clean(&r);
    check("handshake", r, ok);
    let r = idle(&load(2, 1, false, 1), Against::Credgate, 50).await?;
    let ok = r.rate > 0.0 && r.json["idle_connections"] == 50;
    check("idle", r, ok);
    let r = fairness(2, 50, 10, 20.0).await?;
    let ok =
        r.json["flood"]["http_429"].as_u64().unwrap_or(0) > 0 && r.json["flood"]["timeouts"] == 0;
    check("fairness", r, ok);
    let r = review(&load(2, 1, false, 1), 200).await?;
    let ok = ["warm", "spread"].iter().all(|case| {
        r.json[case]["reports_per_s"].as_f64().unwrap_or(0.0) > 0.0
            && r.json[case]["errors"]
                .as_object()
                .is_some_and(|e| e.is_empty())
    });
    check("review", r, ok);
    let (summary, json) = crate::scenarios::fanout(4, 2, 50, 2, 1).await?;
    let ok = json["deliveries_received"] == json["deliveries_expected"]
        && json["deliveries_received"].as_u64().unwrap_or(0) > 0;
    lines.push(summary.clone());
    if !ok {
        failures.push(format!("fanout: {summary}"));
    }
    all.push(json);
    if !failures.is_empty() {
        return Err(format!("smoke failed:\n{}", failures.join("\n")));
    }
    lines.push(format!("smoke: {} passed, 0 failed", all.len()));
    Ok((lines.join("\n"), json!({"smoke": all})))
}

/// The review request about synthetic record `n`'s subject.
fn review_body(n: u64) -> Bytes {
    let r = credgate::synth::record("administrative_penalty", n, "serious");
    let subject = match r.get("uscc") {
        Some(u) => json!({"uscc": u}),
        None => json!({"id_type": r["id_type"], "id_number": r["id_number"]}),
    };
    Bytes::from(
        serde_json::to_vec(&json!({"subject": subject, "purpose": "government_procurement"}))
            .unwrap_or_default(),
    )
}

/// `review`: credit review reports (`POST /v1/credit-reviews`, each one
/// signed and stored). Seeds `subjects` subjects with a serious penalty
/// each (every 10th also a general one), then drives reviews from
/// `load.connections` connections: about one warm subject, then cycling
/// over every subject. nginx's static responder, driven the same way in the
/// same run, is the reference.
pub async fn review(load: &Load, subjects: u64) -> Result<Report, String> {
    let ws = Workspace::create("review", 2, None).await?;
    let certs = ws.certs.clone();
    let gateway = ws.start().await?;
    let addr = gateway.addrs[0];
    // Seed in batches of at most 440 records (the limit is 500).
    let tls = crate::client::tls_config(&certs, "dept-market", false)?;
    let mut conn = crate::client::connect(addr, tls, false).await?;
    let seeded = Instant::now();
    let mut n = 0;
    while n < subjects {
        let end = (n + 400).min(subjects);
        let mut records = Vec::new();
        for i in n..end {
            records.push(credgate::synth::record(
                "administrative_penalty",
                i,
                "serious",
            ));
            if i.is_multiple_of(10) {
                let mut extra = credgate::synth::record("administrative_penalty", i, "general");
                extra["decision_number"] = json!(format!("宁市监罚〔2026〕附{i}号"));
                records.push(extra);
            }
        }
        let body =
            serde_json::to_vec(&json!({"item": "administrative_penalty", "records": records}))
                .map_err(|e| e.to_string())?;
        let (status, answer) = conn
            .request("POST", "/v1/records", Some(Bytes::from(body)))
            .await?;
        if status != 200 {
            return Err(format!(
                "seeding: {status} {}",
                String::from_utf8_lossy(&answer)
            ));
        }
        n = end;
    }
    let seed_secs = seeded.elapsed().as_secs_f64();
    // Every seeded subject is graded in the background; reports are
    // measured once that work is done (it would otherwise share the CPU
    // and the writer with them), and how long it took is a figure too.
    let ops = ws.config.server.ops_listen;
    let mut grading_secs = None;
    while seeded.elapsed() < Duration::from_secs(600) {
        let done = crate::harness::ops_counter(ops, "credgate_grade_assessments_total").await;
        if done.is_some_and(|d| d >= subjects as f64) {
            grading_secs = Some(seeded.elapsed().as_secs_f64() - seed_secs);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agencies = vec!["agency-load-00".to_owned(), "agency-load-01".to_owned()];
    let spec = |bodies: Vec<Bytes>, addrs: Vec<std::net::SocketAddr>, path| Spec {
        targets: addrs,
        certs: certs.clone(),
        participants: agencies.clone(),
        connections: load.connections,
        streams: load.streams,
        h2: load.h2,
        new_connection_per_request: false,
        rate: None,
        duration: Duration::from_secs(load.duration),
        bodies: Arc::new(Pool::new(bodies)),
        records_per_body: 0,
        path,
        get: false,
    };
    let gw = Target {
        addr,
        addrs: vec![addr],
        certs: certs.clone(),
        gateway: Some(gateway),
        nginx: None,
        ws: None,
    };
    let warm_spec = spec(vec![review_body(10)], vec![addr], "/v1/credit-reviews");
    let (warm, warm_cpu, _) = measured(&warm_spec, &gw, load).await?;
    let spread_spec = spec(
        (0..subjects).map(review_body).collect(),
        vec![addr],
        "/v1/credit-reviews",
    );
    let (spread, spread_cpu, after) = measured(&spread_spec, &gw, load).await?;
    gw.stop();
    let nginx = ws.start_nginx().await?;
    let nginx_spec = spec(
        vec![review_body(10)],
        vec![nginx.addr],
        "/v1/credit-reviews",
    );
    let reference = drive::run(&nginx_spec).await?;
    drop(nginx);
    let rate = |o: &drive::Outcome| o.ok as f64 / o.secs;
    let (w, s, r) = (rate(&warm), rate(&spread), rate(&reference));
    let json = json!({
        "scenario": "review", "subjects": subjects, "connections": load.connections, "seed_secs": seed_secs, "grading_secs": grading_secs,
        "warm": {"reports_per_s": w, "latency_ms": percentiles(&warm.hist), "errors": warm.errors.json(),
                 "cpu_us_per_report": warm_cpu * 1e6 / (warm.ok.max(1) as f64), "ratio_to_nginx": w / r.max(1.0)},
        "spread": {"reports_per_s": s, "latency_ms": percentiles(&spread.hist), "errors": spread.errors.json(),
                   "cpu_us_per_report": spread_cpu * 1e6 / (spread.ok.max(1) as f64), "ratio_to_nginx": s / r.max(1.0)},
        "nginx_requests_per_s": r, "server_peak_rss_mb": after.peak_rss as f64 / 1048576.0,
    });
    let summary = format!(
        "review ({subjects} subjects, {} connections, graded in {} s): warm subject {w:.0} reports/s (p99 {} ms, {:.2}× nginx), every subject in turn {s:.0} reports/s (p99 {} ms, {:.2}× nginx); nginx {r:.0} req/s; errors {} / {}",
        load.connections,
        grading_secs.map_or("—".to_owned(), |g| format!("{g:.1}")),
        json["warm"]["latency_ms"]["p99"],
        w / r.max(1.0),
        json["spread"]["latency_ms"]["p99"],
        s / r.max(1.0),
        warm.errors.json(),
        spread.errors.json(),
    );
    Ok(Report {
        summary,
        json,
        rate: w,
        cpu_us: warm_cpu * 1e6 / (warm.ok.max(1) as f64),
    })
}
