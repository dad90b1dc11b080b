//! A real HTTPS webhook receiver for push tests: its own CA and server
//! certificate, requires the gateway's client certificate (mTLS), records
//! every request, and fails on command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use credgate::pki::DevCa;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::net::TcpListener;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: String,
    /// `webhook-signature`.
    pub signature: String,
    /// Raw body.
    pub body: Bytes,
    /// Status the receiver answered.
    pub status: u16,
    /// When the request arrived (before any configured delay).
    pub arrived: std::time::Instant,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("receiver body is JSON")
    }
}

/// A request being answered: its id leaves the open list when this is
/// dropped.
struct Answering {
    open: Arc<Mutex<(Vec<String>, Vec<String>)>>,
    id: String,
}

impl Drop for Answering {
    fn drop(&mut self) {
        if let Ok(mut o) = self.open.lock() {
            if let Some(at) = o.0.iter().position(|x| *x == self.id) {
                o.0.swap_remove(at);
            }
        }
    }
}

#[derive(Default)]
struct Behaviour {
    /// Answer 503 to this many requests first.
    fail_first: usize,
    /// Answer 500 to everything.
    always_fail: bool,
    /// Take this long before answering.
    delay: Duration,
}

/// A running receiver.
pub struct Receiver {
    /// Listening address.
    pub addr: SocketAddr,
    /// CA the receiver's certificate chains to (the subscription's `ca_file`).
    pub ca_file: PathBuf,
    seen: Arc<Mutex<Vec<Received>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    /// `webhook-id`s of requests being answered now, and every id that
    /// arrived again while an earlier request with it was still open.
    open: Arc<Mutex<(Vec<String>, Vec<String>)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Starts a receiver in `dir` that accepts clients of `client_ca`
    /// (the gateway's CA) and answers 503 to the first `fail_first` requests.
    pub async fn start(dir: &Path, name: &str, client_ca: &Path, fail_first: usize) -> Receiver {
        let ca = DevCa::generate(&format!("{name} receiver CA")).expect("ca");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server cert");
        let ca_file = dir.join(format!("{name}-receiver-ca.pem"));
        std::fs::write(&ca_file, &ca.cert_pem).expect("write ca");

        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(client_ca).expect("client ca") {
            roots.add(c.expect("cert")).expect("root");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let chain: Vec<_> = CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
            .map(|c| c.expect("cert"))
            .collect();
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("key");
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
        let behaviour = Arc::new(Mutex::new(Behaviour {
            fail_first,
            ..Behaviour::default()
        }));
        let open: Arc<Mutex<(Vec<String>, Vec<String>)>> = Arc::default();
        let (seen2, behaviour2, open2) = (seen.clone(), behaviour.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, seen, behaviour, open) = (
                    acceptor.clone(),
                    seen2.clone(),
                    behaviour2.clone(),
                    open2.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (seen, behaviour, open) =
                            (seen.clone(), behaviour.clone(), open.clone());
                        async move {
                            let arrived = std::time::Instant::now();
                            let header = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            let (id, timestamp, signature) = (
                                header("webhook-id"),
                                header("webhook-timestamp"),
                                header("webhook-signature"),
                            );
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            {
                                let mut o = open.lock().expect("lock");
                                if o.0.contains(&id) {
                                    o.1.push(id.clone());
                                }
                                o.0.push(id.clone());
                            }
                            // Closed when the answer is made or when the
                            // sender hangs up (the handler is dropped).
                            let answering = Answering {
                                open: open.clone(),
                                id: id.clone(),
                            };
                            let delay = behaviour.lock().expect("lock").delay;
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let status = {
                                let mut b = behaviour.lock().expect("lock");
                                if b.always_fail {
                                    500
                                } else if b.fail_first > 0 {
                                    b.fail_first -= 1;
                                    503
                                } else {
                                    204
                                }
                            };
                            drop(answering);
                            seen.lock().expect("lock").push(Received {
                                id,
                                timestamp,
                                signature,
                                body,
                                status,
                                arrived,
                            });
                            let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(status).expect("status");
                            if status == 503 {
                                resp.headers_mut().insert(
                                    "retry-after",
                                    hyper::header::HeaderValue::from_static("1"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            ca_file,
            seen,
            behaviour,
            open,
            task,
        }
    }

    /// The endpoint URL for a subscription.
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}/credgate/notices", self.addr.port())
    }

    /// Makes every request fail (500) or stops doing so.
    pub fn set_always_fail(&self, fail: bool) {
        self.behaviour.lock().expect("lock").always_fail = fail;
    }

    /// Makes every answer take `delay` (zero: answer at once).
    pub fn set_delay(&self, delay: Duration) {
        self.behaviour.lock().expect("lock").delay = delay;
    }

    /// Ids that arrived while an earlier request with the same id was
    /// still being answered (a delivery sent twice concurrently).
    pub fn concurrent_duplicates(&self) -> Vec<String> {
        self.open.lock().expect("lock").1.clone()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.seen.lock().expect("lock").clone()
    }

    /// Requests answered 2xx, deduplicated by `webhook-id` as a receiver must.
    pub fn accepted(&self) -> Vec<Received> {
        let mut out: Vec<Received> = Vec::new();
        for r in self.requests().into_iter().filter(|r| r.status < 300) {
            if !out.iter().any(|o| o.id == r.id) {
                out.push(r);
            }
        }
        out
    }

    /// Waits until `n` distinct notices were accepted, or panics after `secs`.
    pub async fn wait_for(&self, n: usize, secs: u64) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.accepted();
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "receiver got {} of {n} notices in {secs} s: {:?}",
                got.len(),
                self.requests()
                    .iter()
                    .map(|r| (&r.id, r.status))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
