//! A self-contained gateway for a load run: its own folder, participants,
//! certificates (rcgen), subscriptions and configuration, and the real
//! `credgate` binary started as a separate process so its CPU and memory
//! can be read from /proc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use credgate::config::{Config, Mode, Quota};

use crate::report::ProcStats;

/// Departments that submit in load runs.
pub const DEPARTMENTS: [&str; 4] = ["dept-market", "dept-tax", "dept-ecology", "dept-court"];

/// Where and how many gateways a run starts (`--postgres`, `--instances`).
#[derive(Debug, Clone, Default)]
pub struct Deployment {
    /// Run on a fresh database on this PostgreSQL server (URL of an
    /// existing database there) instead of SQLite.
    pub postgres: Option<String>,
    /// Gateway instances on the one store (several need PostgreSQL); the
    /// load generator spreads its connections over them round robin.
    pub instances: usize,
}

/// The deployment of this run, set once by `main`.
pub static DEPLOYMENT: std::sync::OnceLock<Deployment> = std::sync::OnceLock::new();

fn deployment() -> Deployment {
    DEPLOYMENT.get().cloned().unwrap_or(Deployment {
        postgres: None,
        instances: 1,
    })
}

/// A prepared folder.
pub struct Workspace {
    /// Root folder (removed on drop).
    pub dir: PathBuf,
    /// Certificates (`ca.pem`, `<participant>.pem|key`).
    pub certs: PathBuf,
    /// Configuration the gateway runs with.
    pub config: Config,
    /// The run's PostgreSQL database (dropped with the workspace).
    _database: Option<credgate::store::postgres::scratch::ScratchDatabase>,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_addr() -> Result<SocketAddr, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Workspace {
    /// Creates a workspace with the four departments (with `quota`, or
    /// unlimited) and `agencies` agencies (`agency-load-00`…, clearance
    /// shared).
    pub async fn create(
        name: &str,
        agencies: usize,
        quota: Option<Quota>,
    ) -> Result<Workspace, String> {
        let dir = std::env::temp_dir().join(format!("credgate-load-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(|e| e.to_string())?;
        let mut participants = String::new();
        let mut ids = Vec::new();
        for d in DEPARTMENTS {
            participants.push_str(&format!("[[participant]]\nid = \"{d}\"\nkind = \"department\"\nname = \"{d}\"\nname_zh = \"部门\"\n"));
            if let Some(q) = quota {
                participants.push_str(&format!(
                    "quota = {{ per_second = {}, burst = {} }}\n",
                    q.per_second, q.burst
                ));
            }
            participants.push('\n');
            ids.push(d.to_owned());
        }
        for i in 0..agencies {
            let id = format!("agency-load-{i:02}");
            participants.push_str(&format!(
                "[[participant]]\nid = \"{id}\"\nkind = \"agency\"\nname = \"{id}\"\nname_zh = \"机构\"\nclearance = \"shared\"\nquota = {{ per_second = 100000, burst = 100000 }}\n\n"
            ));
            ids.push(id);
        }
        let participants_file = dir.join("participants.toml");
        std::fs::write(&participants_file, participants).map_err(|e| e.to_string())?;
        credgate::pki::init_dir(&certs, &ids).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("gateway.secret"),
            "load-test-secret-load-test-secret-0123456789",
        )
        .map_err(|e| e.to_string())?;
        let mut config = Config {
            mode: Mode::Production,
            ..Config::default()
        };
        config.server.listen = free_addr()?;
        config.server.ops_listen = free_addr()?;
        config.server.shutdown_grace_secs = 5;
        config.tls.client_ca = certs.join("ca.pem");
        config.tls.cert = certs.join("server.pem");
        config.tls.key = certs.join("server.key");
        config.catalog.dir = repo().join("catalogs/credit");
        config.participants.file = participants_file;
        config.subscriptions.file = dir.join("subscriptions.toml");
        config.delivery.client_cert = certs.join("gateway.pem");
        config.delivery.client_key = certs.join("gateway.key");
        config.delivery.poll_interval_ms = 50;
        config.store.data_dir = dir.join("data");
        config.privacy.secret_file = dir.join("gateway.secret");
        config.review.signing_key_file = dir.join("review-signing.key");
        credgate::review::Signer::generate(&config.review.signing_key_file)?;
        let unlimited = Quota {
            per_second: 10_000_000,
            burst: 10_000_000,
        };
        config.rate_limit.department = quota.unwrap_or(unlimited);
        config.rate_limit.agency = unlimited;
        let deployment = deployment();
        config.rate_limit.instances = deployment.instances.max(1) as u32;
        let database = match &deployment.postgres {
            Some(server) => {
                let db =
                    credgate::store::postgres::scratch::ScratchDatabase::create_on(server).await?;
                config.store.backend = credgate::config::StoreBackend::Postgres;
                config.store.url = Some(db.url.clone());
                Some(db)
            }
            None if deployment.instances > 1 => {
                return Err("several instances need a shared store: add --postgres URL".into())
            }
            None => None,
        };
        Ok(Workspace {
            dir,
            certs,
            config,
            _database: database,
        })
    }

    /// Writes the subscriptions file.
    pub fn subscriptions(&self, toml: &str) -> Result<(), String> {
        std::fs::write(&self.config.subscriptions.file, toml).map_err(|e| e.to_string())
    }

    /// Starts the gateway binary (as many instances as the deployment
    /// says, one after the other so only one migrates) and waits until
    /// each is ready.
    pub async fn start(&self) -> Result<GatewayProcess, String> {
        let bin = std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("credgate");
        if !bin.is_file() {
            return Err(format!(
                "{} not found: build it with `cargo build --release --workspace`",
                bin.display()
            ));
        }
        let mut process = GatewayProcess {
            children: Vec::new(),
            addrs: Vec::new(),
        };
        for i in 0..deployment().instances.max(1) {
            let mut config = self.config.clone();
            if i > 0 {
                config.server.listen = free_addr()?;
                config.server.ops_listen = free_addr()?;
            }
            let config_file = self.dir.join(format!("credgate-{i}.toml"));
            std::fs::write(
                &config_file,
                toml::to_string(&config).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            let child = Command::new(&bin)
                .args(["serve", "--config"])
                .arg(&config_file)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("{}: {e}", bin.display()))?;
            process.children.push(child);
            process.addrs.push(config.server.listen);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !ops_ready(config.server.ops_listen).await {
                if Instant::now() > deadline {
                    return Err(format!("gateway instance {i} did not become ready in 30 s"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(process)
    }
}

/// The value of counter `name` on the gateway's `/metrics` (ops listener).
pub async fn ops_counter(addr: SocketAddr, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn ops_ready(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}

/// An nginx serving the same certificates as an mTLS static responder:
/// the reference every figure is compared with.
pub struct Nginx {
    child: Child,
    /// Listening address.
    pub addr: SocketAddr,
}

impl Workspace {
    /// Starts nginx (Debian package) on a free port with this workspace's
    /// CA and server certificate, answering every request with a static 202.
    pub async fn start_nginx(&self) -> Result<Nginx, String> {
        let addr = free_addr()?;
        let dir = self.dir.join("nginx");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let conf = format!(
            r#"worker_processes auto;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 40000;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen {addr} ssl http2;
        ssl_certificate {certs}/server.pem;
        ssl_certificate_key {certs}/server.key;
        ssl_client_certificate {certs}/ca.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
        location / {{
            default_type application/json;
            # No count: a client counts the records it sent (a batch's
            # hundred), as it would for a silent 2xx.
            return 202 '{{}}';
        }}
    }}
}}
"#,
            dir = dir.display(),
            certs = self.certs.display(),
        );
        let conf_file = dir.join("nginx.conf");
        std::fs::write(&conf_file, conf).map_err(|e| e.to_string())?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_file)
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start nginx (apt-get install nginx-light): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                return Err("nginx did not start listening in 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Nginx { child, addr })
    }
}

impl Nginx {
    /// CPU and memory of the master and its workers.
    pub fn stats(&self) -> ProcStats {
        ProcStats::read_tree(self.child.id())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// The running gateway process(es).
pub struct GatewayProcess {
    children: Vec<Child>,
    /// Main listeners of every instance.
    pub addrs: Vec<SocketAddr>,
}

impl GatewayProcess {
    /// CPU and memory figures now, summed over the instances.
    pub fn stats(&self) -> ProcStats {
        self.children
            .iter()
            .map(|c| ProcStats::read(c.id()))
            .fold(ProcStats::default(), |a, b| a.plus(&b))
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) {
        for child in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
