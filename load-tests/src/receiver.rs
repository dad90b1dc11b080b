//! In-process HTTPS push receivers (mTLS) that note when each notice arrives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Arrival times by notice id, per receiver.
pub type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// A running receiver.
pub struct Receiver {
    /// Listening address.
    pub addr: SocketAddr,
    /// First arrival of each notice id.
    pub arrivals: Arrivals,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Starts a receiver with `server_cert`/`server_key` (PEM) that accepts
    /// clients chaining to `client_ca`.
    pub async fn start(
        client_ca: &Path,
        server_cert: &str,
        server_key: &str,
    ) -> Result<Receiver, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(client_ca).map_err(|e| e.to_string())? {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let chain = CertificateDer::pem_slice_iter(server_cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key =
            PrivateKeyDer::from_pem_slice(server_key.as_bytes()).map_err(|e| e.to_string())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let arrivals: Arrivals = Arc::default();
        let seen = arrivals.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            async move {
                                let now = Instant::now();
                                let id = req
                                    .headers()
                                    .get("webhook-id")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                // A batch (`batch_max`) carries many notices.
                                let ids = if id.starts_with("batch_") {
                                    serde_json::from_slice::<serde_json::Value>(&body)
                                        .ok()
                                        .and_then(|v| v["notices"].as_array().cloned())
                                        .unwrap_or_default()
                                        .iter()
                                        .filter_map(|n| n["notice_id"].as_str().map(str::to_owned))
                                        .collect()
                                } else {
                                    vec![id]
                                };
                                if let Ok(mut m) = seen.lock() {
                                    for id in ids {
                                        m.entry(id).or_insert(now);
                                    }
                                }
                                let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                                *resp.status_mut() = hyper::StatusCode::NO_CONTENT;
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(Receiver {
            addr,
            arrivals,
            task,
        })
    }
}
