//! The request driver shared by the scenarios: keep-alive or
//! connection-per-request, HTTP/1.1 or HTTP/2 streams, open-loop pacing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::{connect, tls_config, Conn};
use crate::pool::Pool;
use crate::report::{histogram, Errors};

/// What to drive.
#[derive(Clone)]
pub struct Spec {
    /// Gateway (or reference) address.
    /// Addresses to drive; connection `c` goes to `targets[c % n]`.
    pub targets: Vec<SocketAddr>,
    /// Certificates (ca.pem, <participant>.pem|key).
    pub certs: PathBuf,
    /// Client identities, used round-robin by connection.
    pub participants: Vec<String>,
    /// Connections (or, per request, concurrent loops).
    pub connections: usize,
    /// HTTP/2 streams per connection.
    pub streams: usize,
    /// Speak HTTP/2.
    pub h2: bool,
    /// A full TLS handshake for every request.
    pub new_connection_per_request: bool,
    /// The route of every request.
    pub path: &'static str,
    /// `GET` without a body instead of `POST` with one.
    pub get: bool,
    /// Total requests per second; `None` = as fast as answers come.
    pub rate: Option<f64>,
    /// How long.
    pub duration: Duration,
    /// Request bodies, cycled, unique per request.
    pub bodies: Arc<Pool>,
    /// Records each body carries: what a 2xx counts when its answer does
    /// not say how many were accepted (the nginx reference).
    pub records_per_body: u64,
}

/// What came back.
pub struct Outcome {
    /// 2xx answers.
    pub ok: u64,
    /// Records accepted (from `"accepted": n`; the body's records per 2xx
    /// without it).
    pub records: u64,
    /// Latency of 2xx answers, µs.
    pub hist: Histogram<u64>,
    /// Latency of every answer (429s included), µs.
    pub all: Histogram<u64>,
    /// Failures by kind (`http_429`, `io`, `timeout`).
    pub errors: Errors,
    /// Wall time.
    pub secs: f64,
    /// Latency percentiles (ms) as another client reported them, when the
    /// histograms are empty.
    pub quoted_latency_ms: Option<serde_json::Value>,
}

fn accepted_count(body: &[u8], sent: u64) -> u64 {
    let text = std::str::from_utf8(body).unwrap_or("");
    text.split("\"accepted\":")
        .nth(1)
        .and_then(|r| r.trim_start().split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(sent)
}

/// Per-request time limit: a stalled answer counts as a timeout.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `spec` and gathers the outcome of every worker.
pub async fn run(spec: &Spec) -> Result<Outcome, String> {
    let deadline = Instant::now() + spec.duration;
    let workers_per_conn = if spec.h2 { spec.streams.max(1) } else { 1 };
    let workers = spec.connections.max(1) * workers_per_conn;
    let interval = spec
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(workers as f64 / r));
    let mut tasks = Vec::new();
    for c in 0..spec.connections.max(1) {
        let target = spec.targets[c % spec.targets.len()];
        let who = &spec.participants[c % spec.participants.len()];
        let mut tls = tls_config(&spec.certs, who, spec.h2)?;
        if spec.new_connection_per_request {
            // Every request pays a full handshake: no session resumption.
            let mut cfg = (*tls).clone();
            cfg.resumption = rustls::client::Resumption::disabled();
            tls = Arc::new(cfg);
        }
        let shared = if spec.new_connection_per_request {
            None
        } else {
            Some(
                connect(target, tls.clone(), spec.h2)
                    .await
                    .map_err(|e| format!("connect {target}: {e}"))?,
            )
        };
        let mut handles: Vec<Option<Conn>> = Vec::new();
        if let Some(first) = shared {
            for _ in 1..workers_per_conn {
                handles.push(first.stream());
            }
            handles.insert(0, Some(first));
        } else {
            handles.push(None);
        }
        for conn in handles {
            let (spec, tls) = (spec.clone(), tls.clone());
            tasks.push(tokio::spawn(async move {
                let (mut hist, mut all) = (histogram(), histogram());
                let mut errors = Errors::default();
                let (mut ok, mut records) = (0u64, 0u64);
                let mut conn = conn;
                let mut next = Instant::now();
                while Instant::now() < deadline {
                    if let Some(every) = interval {
                        next += every;
                        if next > Instant::now() {
                            tokio::time::sleep_until(next.into()).await;
                        }
                    }
                    let body = spec.bodies.next();
                    let start = Instant::now();
                    let attempt = async {
                        let mut fresh;
                        let c = match conn.as_mut() {
                            Some(c) => c,
                            None => {
                                fresh = connect(target, tls.clone(), spec.h2).await?;
                                &mut fresh
                            }
                        };
                        if spec.get {
                            c.request("GET", spec.path, None).await
                        } else {
                            c.request("POST", spec.path, Some(body)).await
                        }
                    };
                    match tokio::time::timeout(TIMEOUT, attempt).await {
                        Ok(Ok((status, b))) => {
                            let us = start.elapsed().as_micros().max(1) as u64;
                            let _ = all.record(us);
                            if (200..300).contains(&status) {
                                let _ = hist.record(us);
                                ok += 1;
                                if !spec.get {
                                    records += accepted_count(&b, spec.records_per_body);
                                }
                            } else {
                                errors.add(format!("http_{status}"));
                            }
                        }
                        Ok(Err(_)) => {
                            errors.add("io");
                            if conn.is_some() {
                                break;
                            }
                        }
                        Err(_) => {
                            errors.add("timeout");
                            if conn.is_some() {
                                break;
                            }
                        }
                    }
                }
                (ok, records, hist, all, errors)
            }));
        }
    }
    let started = Instant::now();
    let mut out = Outcome {
        ok: 0,
        records: 0,
        hist: histogram(),
        all: histogram(),
        errors: Errors::default(),
        secs: 0.0,
        quoted_latency_ms: None,
    };
    for t in tasks {
        if let Ok((ok, records, hist, all, errors)) = t.await {
            out.ok += ok;
            out.records += records;
            let _ = out.hist.add(&hist);
            let _ = out.all.add(&all);
            out.errors.merge(&errors);
        }
    }
    out.secs = started.elapsed().as_secs_f64().max(0.001);
    Ok(out)
}

/// Opens `n` mTLS connections and keeps them idle until dropped.
pub async fn idle_connections(
    target: SocketAddr,
    certs: &std::path::Path,
    participant: &str,
    n: usize,
) -> Result<Vec<Conn>, String> {
    let tls = tls_config(certs, participant, false)?;
    let mut conns = Vec::with_capacity(n);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let tls = tls.clone();
        set.spawn(async move { connect(target, tls, false).await });
        while set.len() >= 64 {
            if let Some(Ok(Ok(c))) = set.join_next().await {
                conns.push(c);
            }
        }
    }
    while let Some(r) = set.join_next().await {
        if let Ok(Ok(c)) = r {
            conns.push(c);
        }
    }
    Ok(conns)
}

#[cfg(test)]
mod tests {
    use super::accepted_count;

    #[test]
    fn an_answer_counts_what_it_accepted_and_a_silent_one_what_was_sent() {
        assert_eq!(
            accepted_count(br#"{"accepted": 97, "rejected": 3}"#, 100),
            97
        );
        assert_eq!(accepted_count(br#"{"accepted":0}"#, 100), 0);
        // nginx's empty 202.
        assert_eq!(accepted_count(b"", 100), 100);
    }
}
