//! The independent client: the same request scenarios driven by oha
//! (<https://github.com/hatoo/oha>, `cargo install oha --locked`) instead of
//! the built-in driver, so that a figure does not rest on one client alone.
//!
//! oha presents one client certificate (the first participant of the
//! spec), drives one address (the first instance) and picks each request's
//! body at random from a file of bodies, one per line: up to 200,000
//! distinct bodies (256 MB) from the pool. Its records therefore repeat
//! now and then (a 10 s run at 5,700 requests/s over 200,000 lines repeats
//! about one request in eight), and the gateway answers a repeated record as
//! a duplicate (validated and its submission durably committed, but no
//! record row written, and its subject not graded again). The built-in client's
//! records never repeat. With `--disable-keepalive` oha opens a connection
//! per request, but its rustls client keeps a session cache, so it may
//! resume TLS sessions where the server allows it; the built-in client's
//! `handshake` disables resumption.

use std::io::Write;
use std::process::Stdio;

use serde_json::Value;

use crate::drive::{Outcome, Spec};
use crate::report::{histogram, Errors};

/// At most this much of bodies for oha to pick from.
const BODY_FILE_BYTES: usize = 256 * 1024 * 1024;
/// At most this many (oha holds them all in memory).
const MAX_LINES: usize = 200_000;

/// Runs `spec` with oha; the outcome's histograms are empty and its
/// percentiles are oha's own (`quoted_latency_ms`).
pub async fn run(spec: &Spec, batch: usize) -> Result<Outcome, String> {
    let help = tokio::process::Command::new("oha")
        .arg("--help")
        .output()
        .await
        .map_err(|e| format!("oha is not installed ({e}); cargo install oha --locked"))?;
    let help = String::from_utf8_lossy(&help.stdout);
    if !help.contains("--cert") || !help.contains("-Z") {
        return Err("this oha has no client certificates or body lines (--cert, -Z); cargo install oha --locked installs one that has".into());
    }
    let lines = std::env::temp_dir().join(format!("credgate-oha-{}.jsonl", std::process::id()));
    if !spec.get {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&lines).map_err(|e| format!("{}: {e}", lines.display()))?,
        );
        // Distinct bodies from the pool (records and subjects unique), as
        // many as fit in BODY_FILE_BYTES: oha picks a line at random per
        // request, so the more lines, the fewer repeated records.
        let first = spec.bodies.next();
        let count = (BODY_FILE_BYTES / (first.len() + 1)).clamp(1, MAX_LINES);
        let rest = std::iter::repeat_with(|| spec.bodies.next()).take(count - 1);
        for body in std::iter::once(first).chain(rest) {
            f.write_all(&body)
                .and_then(|_| f.write_all(b"\n"))
                .map_err(|e| e.to_string())?;
        }
        f.flush().map_err(|e| e.to_string())?;
    }
    let who = spec.participants.first().ok_or("no participant")?;
    let target = spec.targets.first().ok_or("no target")?;
    let certs = &spec.certs;
    let mut cmd = tokio::process::Command::new("oha");
    cmd.arg("-z")
        .arg(format!("{}ms", spec.duration.as_millis()))
        .arg("-c")
        .arg(spec.connections.max(1).to_string())
        .args(["--no-tui", "--output-format", "json"]);
    if spec.get {
        cmd.args(["-m", "GET"]);
    } else {
        cmd.args(["-m", "POST", "-T", "application/json", "-Z"])
            .arg(&lines);
    }
    cmd.arg("--cacert")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join(format!("{who}.pem")))
        .arg("--key")
        .arg(certs.join(format!("{who}.key")));
    if spec.h2 {
        cmd.args(["--http2", "-p", &spec.streams.max(1).to_string()]);
    }
    if spec.new_connection_per_request {
        cmd.arg("--disable-keepalive");
    }
    if let Some(rate) = spec.rate {
        cmd.args(["-q", &rate.to_string()]);
    }
    cmd.arg(format!("https://{target}{}", spec.path));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("oha: {e}"));
    let _ = std::fs::remove_file(&lines);
    let out = out?;
    if !out.status.success() {
        return Err(format!(
            "oha failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let report: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("oha's JSON report: {e}"))?;
    outcome(&report, batch)
}

/// An outcome from oha's JSON report.
fn outcome(report: &Value, batch: usize) -> Result<Outcome, String> {
    let secs = report["summary"]["total"]
        .as_f64()
        .ok_or("oha's report has no summary.total")?;
    let mut ok = 0;
    let mut errors = Errors::default();
    if let Some(codes) = report["statusCodeDistribution"].as_object() {
        for (code, n) in codes {
            let n = n.as_u64().unwrap_or(0);
            if code.starts_with('2') {
                ok += n;
            } else {
                *errors.0.entry(format!("http_{code}")).or_default() += n;
            }
        }
    }
    if let Some(errs) = report["errorDistribution"].as_object() {
        for (what, n) in errs {
            // Requests cut off when the time is up end the run; they are
            // not failures of the server.
            if what.contains("deadline") {
                continue;
            }
            *errors.0.entry(format!("oha: {what}")).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    let p = &report["latencyPercentiles"];
    // Milliseconds, to the microsecond as the built-in client reports them.
    let ms = |k: &str| p[k].as_f64().map_or(0.0, |s| (s * 1e6).round() / 1e3);
    Ok(Outcome {
        ok,
        records: ok * batch.max(1) as u64,
        hist: histogram(),
        all: histogram(),
        errors,
        secs,
        quoted_latency_ms: Some(serde_json::json!({
            "p50": ms("p50"), "p90": ms("p90"), "p99": ms("p99"), "p999": ms("p99.9"),
            "max": report["summary"]["slowest"].as_f64().unwrap_or(0.0) * 1000.0, "count": ok,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_oha_report() -> Result<(), String> {
        let report = serde_json::json!({
            "summary": {"total": 2.0, "slowest": 0.5},
            "latencyPercentiles": {"p50": 0.001, "p90": 0.002, "p99": 0.004, "p99.9": 0.010},
            "statusCodeDistribution": {"200": 90, "429": 10},
            "errorDistribution": {"aborted due to deadline": 7, "connection reset": 2},
        });
        let o = outcome(&report, 100)?;
        assert_eq!((o.ok, o.records, o.secs), (90, 9000, 2.0));
        assert_eq!(o.errors.0.get("http_429"), Some(&10));
        assert_eq!(o.errors.0.get("oha: connection reset"), Some(&2));
        assert_eq!(o.errors.0.len(), 2, "{:?}", o.errors);
        assert_eq!(o.quoted_latency_ms.ok_or("no latency")?["p99"], 4.0);
        Ok(())
    }
}
