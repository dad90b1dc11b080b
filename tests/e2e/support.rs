//! Test harness: a real gateway on 127.0.0.1:0 with certificates generated
//! by rcgen at test time, a real store (an SQLite file in a temporary
//! folder, or a fresh PostgreSQL database: the test binary says which),
//! and a real mTLS HTTP client (hyper over tokio-rustls).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use credgate::config::{Config, Mode, Quota, StoreBackend};
use credgate::pki::{DevCa, Issued};
use credgate::store::postgres::scratch::ScratchDatabase;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Participants the tests use beyond the shipped sample.
const EXTRA_PARTICIPANTS: &str = r#"
[[participant]]
id = "dept-flood"
kind = "department"
name = "Flooding test department"
name_zh = "压力测试部门"
quota = { per_second = 2, burst = 3 }

[[participant]]
id = "dept-revoked"
kind = "department"
name = "Department whose certificate is revoked"
name_zh = "证书已吊销部门"

[[participant]]
id = "dept-expired"
kind = "department"
name = "Department whose certificate expired"
name_zh = "证书已过期部门"
"#;

/// Certificates of one test PKI, written to a folder.
pub struct Pki {
    /// Folder with `ca.pem`, `server.*`, `<id>.*`, `crl.pem`.
    pub dir: PathBuf,
}

impl Pki {
    /// A new PKI with server and participant certificates; `dept-revoked`
    /// is on the CRL and `dept-expired` expired yesterday.
    pub fn generate(dir: &Path, ids: &[String]) -> Pki {
        let ca = DevCa::generate("credgate test CA").expect("ca");
        let write = |name: &str, issued: &Issued| {
            std::fs::write(dir.join(format!("{name}.pem")), &issued.cert_pem).expect("write cert");
            std::fs::write(dir.join(format!("{name}.key")), &issued.key_pem).expect("write key");
        };
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).expect("write ca");
        write(
            "server",
            &ca.issue_server(&["localhost", "127.0.0.1"])
                .expect("server"),
        );
        let mut revoked = Vec::new();
        for id in ids {
            let issued = if id == "dept-expired" {
                let now = time::OffsetDateTime::now_utc();
                ca.issue_client_until(
                    id,
                    true,
                    now - time::Duration::days(30),
                    now - time::Duration::days(1),
                )
                .expect("expired")
            } else {
                ca.issue_client(id).expect("client")
            };
            if id == "dept-revoked" {
                revoked.push(issued.serial.clone());
            }
            write(id, &issued);
        }
        // The gateway's client certificate for push deliveries.
        write(
            "gateway",
            &ca.issue_client("credgate-gateway").expect("gateway"),
        );
        // A valid certificate for a participant nobody registered.
        write("stranger", &ca.issue_client("stranger").expect("stranger"));
        std::fs::write(dir.join("crl.pem"), ca.crl(&revoked).expect("crl")).expect("write crl");
        Pki {
            dir: dir.to_owned(),
        }
    }
}

/// Everything a gateway instance needs on disk.
pub struct Env {
    /// Temporary root (data, certs, participants).
    pub root: TempDir,
    /// The configuration the gateway runs with.
    pub config: Config,
    /// Test PKI.
    pub pki: Pki,
    /// The PostgreSQL database of this environment (postgres binary).
    pub database: Option<ScratchDatabase>,
}

/// Runs the `credgate` binary; returns its exit code and its output.
pub fn credgate_cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_credgate"))
        .args(args)
        .output()
        .expect("run credgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Waits for a future from sync code inside an async test.
pub fn block_on<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    on_own_runtime(move || Box::pin(f))
}

/// Runs `f` on a runtime of its own, on a thread of its own: usable from
/// sync code inside an async test.
fn on_own_runtime<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
    .join()
    .expect("thread")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

impl Env {
    /// A fresh environment: shipped catalog, shipped participants plus the
    /// test ones, new certificates, empty data folder.
    pub fn new() -> Env {
        let root = tempfile::tempdir().expect("tempdir");
        let certs = root.path().join("certs");
        std::fs::create_dir_all(&certs).expect("certs dir");
        let mut participants =
            std::fs::read_to_string(repo("config/participants.toml")).expect("participants");
        participants.push_str(EXTRA_PARTICIPANTS);
        let participants_file = root.path().join("participants.toml");
        std::fs::write(&participants_file, &participants).expect("write participants");
        let registry =
            credgate::participants::Registry::load(&participants_file).expect("registry");
        let ids: Vec<String> = registry.iter().map(|p| p.id.clone()).collect();
        let pki = Pki::generate(&certs, &ids);
        let secret = root.path().join("gateway.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef-test-secret").expect("secret");
        let mut config = Config {
            mode: Mode::Production,
            ..Config::default()
        };
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        config.server.ops_listen = "127.0.0.1:0".parse().expect("addr");
        config.server.shutdown_grace_secs = 5;
        config.tls.client_ca = certs.join("ca.pem");
        config.tls.cert = certs.join("server.pem");
        config.tls.key = certs.join("server.key");
        config.tls.crls = vec![certs.join("crl.pem")];
        config.catalog.dir = repo("catalogs/credit");
        config.participants.file = participants_file;
        config.store.data_dir = root.path().join("data");
        config.privacy.secret_file = secret;
        config.review.signing_key_file = root.path().join("review-signing.key");
        credgate::review::Signer::generate(&config.review.signing_key_file).expect("signing key");
        config.subscriptions.file = root.path().join("subscriptions.toml");
        std::fs::write(&config.subscriptions.file, "").expect("write subscriptions");
        config.delivery.client_cert = certs.join("gateway.pem");
        config.delivery.client_key = certs.join("gateway.key");
        config.delivery.retry_schedule_secs = vec![1, 1, 1, 1, 1];
        config.delivery.poll_interval_ms = 100;
        config.rate_limit.department = Quota {
            per_second: 10_000,
            burst: 10_000,
        };
        let database = match crate::BACKEND {
            StoreBackend::Sqlite => None,
            StoreBackend::Postgres => {
                let db = on_own_runtime(|| Box::pin(ScratchDatabase::create()))
                    .expect("scratch PostgreSQL database");
                config.store.backend = StoreBackend::Postgres;
                config.store.url = Some(db.url.clone());
                config.store.pool_size = 8;
                Some(db)
            }
        };
        Env {
            root,
            config,
            pki,
            database,
        }
    }

    /// Writes this environment's configuration to `NAME.toml` and runs
    /// `credgate audit verify` on it.
    pub fn audit_verify(&self, name: &str) -> (i32, String) {
        let path = self.root.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(&self.config).expect("toml")).expect("write");
        credgate_cli(&["audit", "verify", "--config", path.to_str().expect("path")])
    }

    /// Whether this environment runs on PostgreSQL.
    pub fn postgres(&self) -> bool {
        self.database.is_some()
    }

    /// The text results of a query on the gateway's database (SQL both
    /// backends understand).
    pub fn sql_texts(&self, query: &str) -> Vec<String> {
        match &self.database {
            None => {
                let conn = rusqlite::Connection::open_with_flags(
                    self.db(),
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .expect("open db");
                let mut stmt = conn.prepare(query).expect("prepare");
                let rows = stmt
                    .query_map([], |r| r.get::<_, rusqlite::types::Value>(0))
                    .expect("query");
                rows.map(|r| match r.expect("row") {
                    rusqlite::types::Value::Integer(n) => n.to_string(),
                    rusqlite::types::Value::Text(t) => t,
                    other => format!("{other:?}"),
                })
                .collect()
            }
            Some(db) => {
                let (url, query) = (db.url.clone(), query.to_owned());
                on_own_runtime(move || {
                    Box::pin(async move {
                        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                            .await
                            .expect("connect");
                        tokio::spawn(conn);
                        // The simple protocol: several statements allowed.
                        let rows = client.simple_query(&query).await.expect("query");
                        rows.into_iter()
                            .filter_map(|m| match m {
                                tokio_postgres::SimpleQueryMessage::Row(r) => {
                                    r.get(0).map(str::to_owned)
                                }
                                _ => None,
                            })
                            .collect()
                    })
                })
            }
        }
    }

    /// Executes statements on the gateway's database.
    pub fn sql_execute(&self, statements: &str) {
        match &self.database {
            None => rusqlite::Connection::open(self.db())
                .expect("open db")
                .execute_batch(statements)
                .expect("execute"),
            Some(_) => {
                self.sql_texts(statements);
            }
        }
    }

    /// Rows in a table of the gateway's database.
    pub fn count_rows(&self, table: &str) -> i64 {
        self.sql_texts(&format!("SELECT COUNT(*) FROM {table}"))[0]
            .parse()
            .expect("count")
    }

    /// Replaces the subscriptions file.
    pub fn subscribe(&self, toml: &str) {
        std::fs::write(&self.config.subscriptions.file, toml).expect("write subscriptions");
    }

    /// Path of the SQLite database.
    pub fn db(&self) -> PathBuf {
        self.config.database_path()
    }

    /// Writes the configuration as a TOML file (for spawning the binary).
    pub fn write_config(&self, main: SocketAddr, ops: SocketAddr) -> PathBuf {
        let mut c = self.config.clone();
        c.server.listen = main;
        c.server.ops_listen = ops;
        let path = self.root.path().join("credgate.toml");
        std::fs::write(&path, toml::to_string(&c).expect("toml")).expect("write config");
        path
    }

    /// A client presenting `participant`'s certificate.
    pub fn client(&self, addr: SocketAddr, participant: &str) -> Client {
        Client::new(
            addr,
            &self.pki.dir,
            Some(participant),
            &self.pki.dir.join("ca.pem"),
        )
    }
}

/// A running in-process gateway.
pub struct Server {
    /// Main listener address.
    pub addr: SocketAddr,
    /// Ops listener address.
    pub ops: SocketAddr,
    /// Public channel address (served when the environment enables it).
    pub public: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), credgate::StartupErrors>>,
}

impl Server {
    /// Starts the gateway of `env` on ephemeral ports.
    pub async fn start(env: &Env) -> Server {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let main = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let ops = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let public = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (addr, ops_addr, public_addr) = (
            main.local_addr().expect("addr"),
            ops.local_addr().expect("addr"),
            public.local_addr().expect("addr"),
        );
        let gateway = credgate::Gateway::build(env.config.clone())
            .await
            .expect("gateway builds");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            Arc::new(gateway)
                .serve(
                    credgate::Listeners {
                        main,
                        ops,
                        public: Some(public),
                    },
                    token,
                )
                .await
        });
        Server {
            addr,
            ops: ops_addr,
            public: public_addr,
            shutdown,
            task,
        }
    }

    /// Graceful shutdown; waits until the store is flushed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("clean shutdown");
    }
}

/// A response.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An mTLS HTTP client for one participant.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    tls_h2: Arc<rustls::ClientConfig>,
}

/// One open connection (HTTP/1.1 or HTTP/2).
pub enum Conn {
    /// HTTP/1.1 keep-alive.
    H1(http1::SendRequest<Full<Bytes>>),
    /// HTTP/2.
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Client {
    /// A client with `cert_dir/<participant>.pem|key` (or none) trusting `ca`.
    pub fn new(addr: SocketAddr, cert_dir: &Path, participant: Option<&str>, ca: &Path) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).expect("ca") {
            roots.add(c.expect("ca cert")).expect("add root");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let build = |alpn: &[u8]| {
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots.clone());
            let mut cfg = match participant {
                Some(id) => {
                    let chain: Vec<_> =
                        CertificateDer::pem_file_iter(cert_dir.join(format!("{id}.pem")))
                            .expect("cert")
                            .map(|c| c.expect("cert"))
                            .collect();
                    let key = PrivateKeyDer::from_pem_file(cert_dir.join(format!("{id}.key")))
                        .expect("key");
                    builder
                        .with_client_auth_cert(chain, key)
                        .expect("client auth")
                }
                None => builder.with_no_client_auth(),
            };
            cfg.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(cfg)
        };
        Client {
            addr,
            tls: build(b"http/1.1"),
            tls_h2: build(b"h2"),
        }
    }

    /// The TLS settings offering HTTP/2 (`h2`) or HTTP/1.1 in ALPN.
    pub fn tls_config(&self, h2: bool) -> Arc<rustls::ClientConfig> {
        if h2 {
            self.tls_h2.clone()
        } else {
            self.tls.clone()
        }
    }

    /// Opens a TLS connection and sends nothing on it.
    pub async fn connect_tls(
        &self,
        h2: bool,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tokio_rustls::TlsConnector::from(self.tls_config(h2))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
    }

    /// Opens a connection (TLS handshake included).
    pub async fn connect(&self, h2: bool) -> std::io::Result<Conn> {
        let io = TokioIo::new(self.connect_tls(h2).await?);
        let other = |e: hyper::Error| std::io::Error::other(e);
        if h2 {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(other)?;
            tokio::spawn(conn);
            Ok(Conn::H2(send))
        } else {
            let (send, conn) = http1::handshake(io).await.map_err(other)?;
            tokio::spawn(conn);
            Ok(Conn::H1(send))
        }
    }

    /// One request on a new connection.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> std::io::Result<Resp> {
        let mut conn = self.connect(false).await?;
        conn.send(method, path, headers, body).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.send(
            "POST",
            path,
            &[("content-type", "application/json")],
            serde_json::to_vec(body).expect("json"),
        )
        .await
        .expect("request")
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Resp {
        self.send("GET", path, &[], Bytes::new())
            .await
            .expect("request")
    }
}

impl Conn {
    /// Sends one request on this connection.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> std::io::Result<Resp> {
        let mut req = hyper::Request::builder().method(method).uri(path);
        if let Conn::H1(_) = self {
            req = req.header("host", "localhost");
        } else {
            req = req.uri(format!("https://localhost{path}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        let other = |e: hyper::Error| std::io::Error::other(e);
        let resp = match self {
            Conn::H1(s) => {
                s.ready().await.map_err(other)?;
                s.send_request(req).await.map_err(other)?
            }
            Conn::H2(s) => {
                s.ready().await.map_err(other)?;
                s.send_request(req).await.map_err(other)?
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.map_err(other)?.to_bytes();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }
}

/// Reads until the server closes; `Ok(0)` only if it closed with TLS
/// close_notify (rustls reports a bare TCP close as an error).
pub async fn read_until_closed(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: std::time::Duration,
) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .expect("the server closed the connection in time")
}

/// Reads a `GET` from the plain-HTTP ops listener.
pub async fn ops_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut send, conn) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = send
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Submits one record of `item` as `client`; panics unless it is
/// accepted; returns its record id.
pub async fn submit_one(client: &Client, item: &str, record: Value) -> String {
    let resp = client
        .post_json(
            "/v1/records",
            &serde_json::json!({"item": item, "records": [record]}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let doc = resp.json();
    assert_eq!(doc["results"][0]["status"], "accepted", "{doc:#}");
    doc["results"][0]["record_id"]
        .as_str()
        .expect("record id")
        .to_owned()
}
