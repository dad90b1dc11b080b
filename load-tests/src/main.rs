//! credgate load generator: drives a running gateway over real mTLS with
//! realistic synthetic records and reports throughput and latency
//! percentiles (HDR histogram), human-readable and as JSON.
//!
//! Scenarios grow with the load-test issue; `ingest` (one or N records per
//! request, HTTP/1.1 keep-alive or HTTP/2) is the first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Load generator for credgate.
#[derive(Parser, Debug, Clone)]
#[command(name = "credgate-load", about)]
struct Args {
    /// Scenario: `ingest`.
    #[arg(default_value = "ingest")]
    scenario: String,
    /// Gateway address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    target: SocketAddr,
    /// Folder with ca.pem and <participant>.pem/.key.
    #[arg(long, default_value = "certs/dev")]
    certs: PathBuf,
    /// Submitting departments (certificates), used round-robin by connection.
    #[arg(long, value_delimiter = ',', default_value = "dept-market")]
    participants: Vec<String>,
    /// Concurrent connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Concurrent requests per connection (HTTP/2 streams).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Use HTTP/2.
    #[arg(long)]
    h2: bool,
    /// Records per request.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Catalog item submitted.
    #[arg(long, default_value = "administrative_penalty")]
    item: String,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Print the JSON report only.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    records: AtomicU64,
    http_errors: AtomicU64,
    io_errors: AtomicU64,
}

fn tls_config(
    args: &Args,
    participant: &str,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = args.certs.join("ca.pem");
    for c in CertificateDer::pem_file_iter(&ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let cert = args.certs.join(format!("{participant}.pem"));
    let chain = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key_path = args.certs.join(format!("{participant}.key"));
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(args: &Args, tls: Arc<rustls::ClientConfig>) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect(args.target)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let io = TokioIo::new(stream);
    if args.h2 {
        let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        Ok(Sender::H2(s))
    } else {
        let (s, c) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        Ok(Sender::H1(s))
    }
}

fn body_for(args: &Args, n: u64) -> Bytes {
    let records: Vec<_> = (0..args.batch as u64)
        .map(|i| credgate::synth::record(&args.item, n * args.batch as u64 + i, "general"))
        .collect();
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"item": args.item, "records": records}))
            .unwrap_or_default(),
    )
}

async fn send(sender: &mut Sender, body: Bytes) -> Result<(u16, Bytes), String> {
    let req = hyper::Request::post("https://localhost/v1/records")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = match sender {
        Sender::H1(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            let mut req = req;
            *req.uri_mut() = hyper::Uri::from_static("/v1/records");
            req.headers_mut()
                .insert("host", hyper::header::HeaderValue::from_static("localhost"));
            s.send_request(req).await.map_err(|e| e.to_string())?
        }
        Sender::H2(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(req).await.map_err(|e| e.to_string())?
        }
    };
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    if args.scenario != "ingest" {
        eprintln!("unknown scenario {:?}; available: ingest", args.scenario);
        return std::process::ExitCode::from(2);
    }
    let alpn: &[u8] = if args.h2 { b"h2" } else { b"http/1.1" };
    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let participant = &args.participants[c % args.participants.len()];
        let tls = match tls_config(&args, participant, alpn) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::from(2);
            }
        };
        let sender = match connect(&args, tls).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot connect to {}: {e}", args.target);
                return std::process::ExitCode::from(1);
            }
        };
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        for _ in 0..args.streams.max(1) {
            let (args, counters, seq, sender) =
                (args.clone(), counters.clone(), seq.clone(), sender.clone());
            let h2_sender = match &*sender.lock().await {
                Sender::H2(s) => Some(s.clone()),
                Sender::H1(_) => None,
            };
            tasks.push(tokio::spawn(async move {
                let mut hist =
                    hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
                let mut own = h2_sender.map(Sender::H2);
                while Instant::now() < deadline {
                    let body = body_for(&args, seq.fetch_add(1, Ordering::Relaxed));
                    let start = Instant::now();
                    let result = match own.as_mut() {
                        Some(s) => send(s, body).await,
                        None => send(&mut *sender.lock().await, body).await,
                    };
                    let micros = start.elapsed().as_micros() as u64;
                    match result {
                        Ok((200, b)) => {
                            counters.ok.fetch_add(1, Ordering::Relaxed);
                            let accepted = serde_json::from_slice::<serde_json::Value>(&b)
                                .ok()
                                .and_then(|v| v["accepted"].as_u64())
                                .unwrap_or(0);
                            counters.records.fetch_add(accepted, Ordering::Relaxed);
                            if let Some(h) = hist.as_mut() {
                                let _ = h.record(micros.max(1));
                            }
                        }
                        Ok(_) => {
                            counters.http_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counters.io_errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                hist
            }));
        }
    }
    let started = Instant::now();
    let mut total = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
    for t in tasks {
        if let (Ok(Some(h)), Some(total)) = (t.await, total.as_mut()) {
            let _ = total.add(&h);
        }
    }
    let secs = started.elapsed().as_secs_f64().max(args.duration as f64);
    let ok = counters.ok.load(Ordering::Relaxed);
    let records = counters.records.load(Ordering::Relaxed);
    let q = |p: f64| {
        total
            .as_ref()
            .map(|h| h.value_at_quantile(p) as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    let report = serde_json::json!({
        "scenario": args.scenario, "target": args.target.to_string(), "http2": args.h2,
        "connections": args.connections, "streams": args.streams, "batch": args.batch, "item": args.item,
        "seconds": secs, "requests_ok": ok, "records_accepted": records,
        "requests_per_s": ok as f64 / secs, "records_per_s": records as f64 / secs,
        "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999)},
        "errors": {"http": counters.http_errors.load(Ordering::Relaxed), "io": counters.io_errors.load(Ordering::Relaxed)},
    });
    if !args.json {
        eprintln!(
            "{} {} conns x {} streams, batch {}: {:.0} req/s, {:.0} records/s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2}; errors http {} io {}",
            args.scenario, args.connections, args.streams, args.batch,
            ok as f64 / secs, records as f64 / secs, q(0.5), q(0.9), q(0.99), q(0.999),
            report["errors"]["http"], report["errors"]["io"]
        );
    }
    println!("{report}");
    std::process::ExitCode::SUCCESS
}
