//! Start-up and the accept loop: [`Gateway::build`] loads and checks
//! everything (all problems reported at once), [`Gateway::serve`] runs the
//! listeners until the shutdown token fires, then drains in-flight requests
//! and flushes the store.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::catalog::Catalog;
use crate::config::{Config, Mode};
use crate::control::Control;
use crate::delivery::Dispatcher;
use crate::http::{self, AppState, PeerId};
use crate::ingest::Ingest;
use crate::participants::{Kind, Registry};
use crate::ratelimit::RateLimits;
use crate::redact::Redactor;
use crate::routing::Subscriptions;
use crate::store::Store;
use crate::tls::TlsState;

/// Everything that stopped the gateway from starting.
#[derive(Debug, thiserror::Error)]
#[error("credgate cannot start ({} problem(s)):\n  - {}", .0.len(), .0.join("\n  - "))]
pub struct StartupErrors(pub Vec<String>);

/// The bound listeners the gateway serves on.
#[derive(Debug)]
pub struct Listeners {
    /// Main mTLS listener.
    pub main: TcpListener,
    /// Operations listener (plain HTTP).
    pub ops: TcpListener,
    /// The public channel's listener (HTTPS, no client certificate), when
    /// `public.enabled`.
    pub public: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses from the configuration.
    pub async fn bind(config: &Config) -> Result<Listeners, StartupErrors> {
        let bind = |addr: SocketAddr, key: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))
        };
        let (main, ops) = tokio::join!(
            bind(config.server.listen, "server.listen"),
            bind(config.server.ops_listen, "server.ops_listen")
        );
        let public = match config.public.enabled {
            true => Some(bind(config.public.listen, "public.listen").await),
            false => None,
        };
        match (main, ops, public.transpose()) {
            (Ok(main), Ok(ops), Ok(public)) => Ok(Listeners { main, ops, public }),
            (main, ops, public) => Err(StartupErrors(
                [main.err(), ops.err(), public.err()]
                    .into_iter()
                    .flatten()
                    .collect(),
            )),
        }
    }
}

/// A gateway ready to serve.
pub struct Gateway {
    config: Config,
    state: Arc<AppState>,
    store: Arc<dyn Store>,
    tls: Arc<TlsState>,
    dispatcher: Arc<Dispatcher>,
    /// Internal token: cancelled when the caller's shutdown fires.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// In dev mode, creates missing dev certificates and the gateway secret.
fn prepare_dev(config: &Config, registry: Option<&Registry>) -> Result<(), String> {
    if config.mode != Mode::Dev {
        return Ok(());
    }
    let tls = &config.tls;
    let dir = tls.client_ca.parent().unwrap_or(Path::new("."));
    // A development PKI (its CA key beside the CA) is completed on every
    // start: certificates and browser bundles of participants added since.
    if !(tls.client_ca.is_file() && tls.cert.is_file() && tls.key.is_file())
        || dir.join("ca.key").is_file()
    {
        let ids: Vec<String> = registry
            .map(|r| r.iter().map(|p| p.id.clone()).collect())
            .unwrap_or_default();
        let written =
            crate::pki::init_dir(dir, &ids).map_err(|e| format!("dev certificates: {e}"))?;
        if !written.is_empty() {
            tracing::warn!(
                dir = %dir.display(),
                files = written.len(),
                "generated DEVELOPMENT certificates (dev CA, server, one per participant): for development only, never for production"
            );
        }
    }
    if !config.privacy.secret_file.is_file() {
        let secret: [u8; 32] = rand::random();
        crate::pki::write_file(&config.privacy.secret_file, &hex::encode(secret), true)
            .map_err(|e| format!("privacy.secret_file: {e}"))?;
        tracing::warn!(path = %config.privacy.secret_file.display(), "generated a development gateway secret");
    }
    if !config.review.signing_key_file.is_file() {
        crate::review::Signer::generate(&config.review.signing_key_file)
            .map_err(|e| format!("review.signing_key_file: {e}"))?;
        tracing::warn!(path = %config.review.signing_key_file.display(), "generated a development credit review signing key");
    }
    Ok(())
}

/// The push client identity, refused in production when it is about to
/// expire (start-up and SIGHUP alike).
fn load_push_identity(config: &Config) -> Result<crate::delivery::Identity, String> {
    let id = crate::delivery::load_identity(&config.delivery)?;
    crate::tls::check_validity(
        config.mode == Mode::Production,
        config.tls.min_validity_days,
        "delivery.client_cert",
        &id.0,
    )?;
    Ok(id)
}

/// The gateway secret (at least 32 bytes) from its file.
pub(crate) fn load_secret(path: &Path) -> Result<Arc<[u8]>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("privacy.secret_file: {}: {e}", path.display()))?;
    let secret = text.trim().as_bytes().to_vec();
    if secret.len() < 32 {
        return Err(format!(
            "privacy.secret_file: {} must hold at least 32 bytes",
            path.display()
        ));
    }
    Ok(secret.into())
}

impl Gateway {
    /// Loads registry, catalog, TLS material, secret and store.
    pub async fn build(config: Config) -> Result<Gateway, StartupErrors> {
        let mut errors = Vec::new();
        let registry = match Registry::load(&config.participants.file) {
            Ok(r) => Some(r),
            Err(e) => {
                errors.extend(e);
                None
            }
        };
        if let Err(e) = prepare_dev(&config, registry.as_ref()) {
            errors.push(e);
        }
        let catalog = registry.as_ref().map(|reg| {
            Catalog::load_dir(&config.catalog.dir, &|id| {
                reg.get(id).is_some_and(|p| p.kind == Kind::Department)
            })
        });
        let catalog = match catalog {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                errors.extend(e);
                None
            }
            None => None,
        };
        let grade_rules = catalog.as_ref().and_then(|cat| {
            crate::grades::RuleSet::read_file(&config.catalog.grades_file, cat)
                .map_err(|e| errors.extend(e))
                .ok()
        });
        let subscriptions = match (&registry, &catalog) {
            (Some(reg), Some(cat)) => Subscriptions::read_file(&config.subscriptions.file)
                .and_then(|specs| Subscriptions::build(specs, reg, cat))
                .map_err(|e| {
                    let file = config.subscriptions.file.display();
                    errors.extend(e.into_iter().map(|e| format!("{file}: {e}")))
                })
                .ok(),
            _ => None,
        };
        let tls = TlsState::new(config.tls.clone(), config.mode == Mode::Production)
            .map_err(|e| errors.extend(e))
            .ok();
        let secret = load_secret(&config.privacy.secret_file)
            .map_err(|e| errors.push(e))
            .ok();
        let signer = crate::review::Signer::load(&config.review.signing_key_file)
            .map_err(|e| errors.push(format!("review.signing_key_file: {e}")))
            .ok();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let store = match &secret {
            Some(secret) if errors.is_empty() => crate::store::open(
                &config,
                crate::audit::checkpoint_key(secret),
                metrics.clone(),
            )
            .await
            .map_err(|e| errors.push(e))
            .ok(),
            _ => None,
        };
        let (
            Some(registry),
            Some(catalog),
            Some(subscriptions),
            Some(tls),
            Some(secret),
            Some(store),
            Some(signer),
            Some(grade_rules),
        ) = (
            registry,
            catalog,
            subscriptions,
            tls,
            secret,
            store,
            signer,
            grade_rules,
        )
        else {
            return Err(StartupErrors(errors));
        };
        let sealer = Arc::new(crate::sealed::Sealer::new(&secret));
        // The files seed the store on first start; from then on the store
        // is authoritative and administrators change it through the API.
        let state = store
            .seed_control(
                catalog
                    .items()
                    .map(|i| serde_json::to_value(&i.def).unwrap_or_default())
                    .collect(),
                registry
                    .iter()
                    .map(|p| {
                        (
                            p.id.clone(),
                            serde_json::to_value(p.as_ref()).unwrap_or_default(),
                        )
                    })
                    .collect(),
                subscriptions
                    .specs()
                    .iter()
                    .map(|s| {
                        let mut doc = serde_json::to_value(s).unwrap_or_default();
                        sealer.seal_doc(&mut doc);
                        (s.id.clone(), doc)
                    })
                    .collect(),
            )
            .await
            .map_err(|e| {
                StartupErrors(vec![format!(
                    "store: seeding the control plane failed: {e}"
                )])
            })?;
        for s in &state.seeded {
            tracing::info!(seeded = %s, "stored from the configuration files (first start)");
        }
        let control = Arc::new(
            Control::from_state(
                store.clone(),
                sealer,
                state.items,
                state.participants,
                state.subscriptions,
            )
            .map_err(StartupErrors)?,
        );
        match control.seal_stored_secrets().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(subscriptions = n, "stored signing secrets sealed"),
            Err(e) => {
                return Err(StartupErrors(vec![format!(
                    "store: sealing stored signing secrets failed: {e}"
                )]))
            }
        }
        // The push client identity is loaded whenever its files exist, so
        // a push subscription added at run time can be served; it is
        // required only once a push subscription exists.
        let identity = match load_push_identity(&config) {
            Ok(id) => Some(id),
            Err(e) if control.subscriptions.load().iter().any(|s| s.is_push()) => {
                return Err(StartupErrors(vec![e]))
            }
            Err(e) => {
                tracing::info!(reason = %e, "no push client certificate loaded; push subscriptions will be refused until it is there (SIGHUP reloads it)");
                None
            }
        };
        let audit_check = Arc::new(crate::audit::AuditCheck::new(
            config.clone(),
            crate::audit::checkpoint_key(&secret),
        ));
        let redactor = Arc::new(Redactor::new(config.privacy.redaction.clone(), secret));
        let dispatcher = Arc::new(Dispatcher::new(
            store.clone(),
            &control.active(),
            redactor.clone(),
            config.delivery.clone(),
            identity,
            metrics.clone(),
        ));
        {
            let d = dispatcher.clone();
            control.set_push_check(Box::new(move |sub| d.check_push(sub)));
        }
        let subjects = Arc::new(crate::subjects::SubjectCache::new(
            config.review.cache_mib,
            Duration::from_secs(config.review.cache_ttl_secs),
        ));
        let rules =
            crate::grading::stored_rules(store.as_ref(), grade_rules, &control.catalog.load())
                .await
                .map_err(|e| StartupErrors(vec![e]))?;
        let grader = crate::grading::Grader::new(
            rules,
            store.clone(),
            control.active(),
            subjects.clone(),
            metrics.clone(),
            config.review.grade_backlog_max,
        );
        let ingest = Ingest::new(
            &control.active(),
            store.clone(),
            redactor.clone(),
            config.limits.clone(),
            metrics.clone(),
            subjects,
            config.public.rule_set.clone(),
        );
        let shutdown = CancellationToken::new();
        let state = Arc::new(AppState {
            ingest,
            registry: control.registry.clone(),
            control,
            limits: config.limits.clone(),
            rate: RateLimits::new(config.rate_limit.clone()),
            request_timeout: Duration::from_secs(config.server.request_timeout_secs),
            validation_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            redactor,
            dispatcher: dispatcher.clone(),
            shutdown: shutdown.clone(),
            metrics,
            reviews: crate::http::reviews::Reviews {
                signer,
                config: config.review.clone(),
                grader,
            },
            audit_check,
            console_figures: Arc::default(),
        });
        Ok(Gateway {
            config,
            state,
            store,
            tls: Arc::new(tls),
            dispatcher,
            shutdown,
        })
    }

    /// Re-reads TLS material: certificates, key, CA bundle, CRLs (SIGHUP).
    /// Participants, subscriptions and the catalog change through the
    /// admin API.
    pub fn reload(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if let Err(e) = self.tls.reload() {
            errors.extend(e);
        }
        // The push client identity is reloaded with the rest; a failure
        // keeps the old one in force (and is an error only if a push
        // subscription needs it).
        let push_needed = self
            .state
            .control
            .subscriptions
            .load()
            .iter()
            .any(|s| s.is_push());
        match load_push_identity(&self.config) {
            Ok(id) => self.dispatcher.set_identity(id),
            Err(e) if push_needed => errors.push(e),
            Err(_) => {}
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Serves until `shutdown` is cancelled, then drains and flushes.
    pub async fn serve(
        self: Arc<Self>,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> Result<(), StartupErrors> {
        let ops_state = http::ops::OpsState {
            store: self.store.clone(),
            shutdown: shutdown.clone(),
            metrics: self.state.metrics.clone(),
        };
        let ops_shutdown = shutdown.clone();
        let ops = tokio::spawn(async move {
            let app = http::ops::router(ops_state);
            let _ = axum::serve(listeners.ops, app)
                .with_graceful_shutdown(async move { ops_shutdown.cancelled().await })
                .await;
        });
        let public = match (self.config.public.enabled, listeners.public) {
            (true, Some(listener)) => {
                tracing::info!(listen = ?listener.local_addr().ok(), "public publicity channel serving (HTTPS, no client certificate)");
                Some(tokio::spawn(serve_public(
                    listener,
                    self.tls.clone(),
                    http::public::router(self.state.clone(), self.config.public.clone()),
                    shutdown.clone(),
                    PublicLimits {
                        handshake: Duration::from_secs(self.config.server.handshake_timeout_secs),
                        request: Duration::from_secs(self.config.server.request_timeout_secs),
                        max_age: Duration::from_secs(self.config.public.max_connection_age_secs),
                        connections: self.config.public.max_connections,
                    },
                )))
            }
            _ => None,
        };
        // Background work stops on the internal token, after HTTP drained.
        let push = tokio::spawn(self.dispatcher.clone().run_push(self.shutdown.clone()));
        let expiry = tokio::spawn(
            self.dispatcher
                .clone()
                .run_expiry(self.shutdown.clone(), self.state.ingest.subjects.clone()),
        );
        // The console overview's default figures, computed in the
        // background so the first page does not wait on a large store.
        let (figures, store) = (self.state.console_figures.clone(), self.store.clone());
        tokio::spawn(async move {
            if let Err(e) = figures.compute(&store, 30).await {
                tracing::warn!(error = %e.detail, "console figures not computed at start");
            }
        });
        // The chain is verified once at start, in the background, so the
        // console shows its state without an administrator asking first.
        let check = self.state.audit_check.clone();
        tokio::spawn(async move {
            match check.run().await {
                Ok(v) if v.intact => {
                    tracing::info!(
                        entries = v.report.entries,
                        seconds = v.seconds,
                        "audit chain verified"
                    )
                }
                Ok(v) => {
                    tracing::error!(problem = ?v.report.problem, "the audit chain does not verify")
                }
                Err(e) => tracing::warn!(error = %e, "the audit chain could not be verified"),
            }
        });
        let checkpoints = tokio::spawn(run_checkpoints(
            self.store.clone(),
            Duration::from_secs(self.config.audit.checkpoint_secs),
            self.shutdown.clone(),
        ));
        let purge = tokio::spawn(run_idempotency_purge(
            self.store.clone(),
            self.shutdown.clone(),
        ));
        let grading = tokio::spawn(self.state.reviews.grader.clone().run(
            self.shutdown.clone(),
            Duration::from_secs(self.config.delivery.expiry_check_secs),
        ));
        if let Some(changes) = self.store.control_changes() {
            tokio::spawn(follow_control_changes(
                self.state.control.clone(),
                self.state.reviews.grader.clone(),
                changes,
                self.shutdown.clone(),
            ));
        }
        let main_addr = listeners.main.local_addr().ok();
        tracing::info!(listen = ?main_addr, "credgate serving (mTLS, HTTP/1.1 and HTTP/2)");

        let router = http::router(self.state.clone());
        let connections = tokio_util::task::TaskTracker::new();
        let lifetime = ConnectionLifetime {
            idle: Duration::from_secs(self.config.server.idle_timeout_secs),
            max_age: Duration::from_secs(self.config.server.max_connection_age_secs),
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(
            self.config.server.max_connections,
        ));
        let handshake_timeout = Duration::from_secs(self.config.server.handshake_timeout_secs);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(self.config.server.request_timeout_secs));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(
                self.config.server.http2_keepalive_interval_secs,
            )))
            .keep_alive_timeout(Duration::from_secs(
                self.config.server.http2_keepalive_timeout_secs,
            ));
        let builder = Arc::new(builder);

        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = accept(&listeners.main) => match r { Some(x) => x, None => continue },
            };
            let _ = tcp.set_nodelay(true);
            let tls_config = self.tls.current();
            let accept_san = self.tls.accept_san_uri();
            let router = router.clone();
            let builder = builder.clone();
            let stop = shutdown.clone();
            let metrics = self.state.metrics.clone();
            connections.spawn(async move {
                let _permit = permit;
                let opened = tokio::time::Instant::now();
                // The handshake, the TLS stream and the served connection
                // each live in their own allocation, only while in use: held
                // inline, the task would be as large as all of them for the
                // connection's whole life.
                let mut stream = match handshake(tls_config, tcp, peer, handshake_timeout).await {
                    Ok(s) => s,
                    Err(reason) => {
                        handshake_failed(&metrics, reason);
                        return;
                    }
                };
                let Some(peer_id) = peer_of(&stream, accept_san) else {
                    tracing::debug!(%peer, "client certificate names no participant");
                    return;
                };
                let _open = OpenConnection::count(&metrics);
                if let Err(reason) = lifetime.first_bytes(&mut stream, opened, &stop).await {
                    tracing::trace!(%peer, reason, "connection closed before its first request");
                    return;
                }
                let served =
                    Box::pin(lifetime.serve_http(stream, peer_id, router, &builder, opened, &stop))
                        .await;
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }

        tracing::info!("shutting down: no new connections; draining in-flight requests");
        drop(listeners.main);
        // Long polls return now rather than at the end of their wait.
        self.shutdown.cancel();
        let grace = Duration::from_secs(self.config.server.shutdown_grace_secs);
        connections.close();
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "some connections did not finish in time"
            );
        }
        let _ = ops.await;
        if let Some(public) = public {
            let _ = public.await;
        }
        let _ = push.await;
        let _ = expiry.await;
        let _ = grading.await;
        let _ = checkpoints.await;
        let _ = purge.await;
        // The last checkpoint covers everything written before exit.
        if let Err(e) = self.store.checkpoint().await {
            tracing::error!(error = %e, "final audit checkpoint failed");
        }
        self.store.close().await;
        tracing::info!("store flushed; bye");
        Ok(())
    }
}

/// Requests in progress on one connection, and when the last one ended.
struct Activity {
    opened: std::time::Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds after `opened` when the last request ended.
    last_ms: std::sync::atomic::AtomicU64,
}

/// Held while a request is being answered.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let a = &self.0;
        a.last_ms
            .store(a.opened.elapsed().as_millis() as u64, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: std::time::Instant::now(),
            in_flight: Default::default(),
            last_ms: Default::default(),
        }
    }

    fn begin(this: &Arc<Activity>) -> Busy {
        this.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Busy(this.clone())
    }

    /// How long no request has been in progress (`None` while one is).
    fn idle_for(&self) -> Option<Duration> {
        use std::sync::atomic::Ordering;
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        Some(self.opened.elapsed().saturating_sub(last))
    }
}

/// A TLS stream of one client (the main or the public listener).
type ClientStream = crate::tls_io::TlsStream<tokio::net::TcpStream>;

/// The server side of a TLS handshake on `tcp`, within `timeout`; `Err`
/// names why it failed (`refused`, `timeout`), as the metrics count it.
async fn handshake(
    config: Arc<rustls::ServerConfig>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<Box<ClientStream>, &'static str> {
    match tokio::time::timeout(timeout, Box::pin(crate::tls_io::accept(config, tcp))).await {
        Ok(Ok(s)) => Ok(Box::new(s)),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake refused");
            Err("refused")
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            Err("timeout")
        }
    }
}

/// The participant a client certificate names, and its fingerprint.
fn peer_of(stream: &ClientStream, accept_san: bool) -> Option<PeerId> {
    let leaf = stream.peer_certificates()?.first()?;
    let id = crate::tls::participant_id(leaf, accept_san)?;
    let fingerprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(leaf.as_ref()));
    Some(PeerId {
        id: Arc::from(id.as_str()),
        fingerprint: Arc::from(fingerprint.as_str()),
    })
}

/// Counts a connection in the `connections` gauge while it lives.
struct OpenConnection<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> OpenConnection<'a> {
    fn count(metrics: &'a crate::metrics::Metrics) -> OpenConnection<'a> {
        metrics.connections.inc();
        OpenConnection(&metrics.connections)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How long closing an unused connection (TLS close_notify, then FIN) may
/// take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// When a connection is told to go away: after `idle` without a request in
/// progress, at `max_age` after its handshake, and at shutdown. Going away
/// is graceful (HTTP/2 GOAWAY, HTTP/1.1 close after the current response),
/// so no request in progress is cut.
#[derive(Clone, Copy)]
struct ConnectionLifetime {
    idle: Duration,
    max_age: Duration,
}

impl ConnectionLifetime {
    /// Waits until the client sends its first bytes after the handshake;
    /// `Err` names why the connection was closed first.
    ///
    /// HTTP's connection state (about 1.5 KiB, and an HTTP/1.1 read buffer
    /// once reading) is made only then, so a connection opened ahead of use
    /// (a client's pool, a pre-connected agency) costs its TLS session and
    /// little more. Bytes the handshake's last read already carried are in
    /// the TLS stream, not the socket: they count as arrived.
    async fn first_bytes(
        self,
        stream: &mut ClientStream,
        opened: tokio::time::Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), &'static str> {
        use tokio::io::AsyncWriteExt;
        if stream.has_buffered_input() {
            // Data or close_notify: HTTP reads and handles it.
            return Ok(());
        }
        let (limit, reason) = if self.idle <= self.max_age {
            (self.idle, "idle")
        } else {
            (self.max_age, "max_age")
        };
        let reason = tokio::select! {
            // Also ready at end of stream or on a socket error, which the
            // HTTP connection then reads and reports.
            _ = stream.get_ref().readable() => return Ok(()),
            _ = shutdown.cancelled() => "shutdown",
            _ = tokio::time::sleep_until(opened + limit) => reason,
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
        Err(reason)
    }

    /// Serves HTTP/1.1 or HTTP/2 on `stream` for the participant `peer`
    /// until the client closes or the connection is told to go away.
    async fn serve_http(
        self,
        stream: Box<ClientStream>,
        peer: PeerId,
        router: axum::Router,
        builder: &auto::Builder<TokioExecutor>,
        opened: tokio::time::Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let activity = Arc::new(Activity::new());
        let tracked = activity.clone();
        let svc = router
            .map_request(
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req
                },
            )
            .map_future(move |response| {
                let busy = Activity::begin(&tracked);
                async move {
                    let r = response.await;
                    drop(busy);
                    r
                }
            });
        let conn = std::pin::pin!(
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
        );
        self.serve(conn, &activity, opened, shutdown).await
    }

    async fn serve<C>(
        self,
        mut conn: std::pin::Pin<&mut C>,
        activity: &Activity,
        opened: tokio::time::Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        C: std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>
            + GracefulConnection,
    {
        let idle = async {
            loop {
                match activity.idle_for() {
                    Some(d) if d >= self.idle => return "idle",
                    Some(d) => tokio::time::sleep(self.idle - d).await,
                    None => tokio::time::sleep(self.idle).await,
                }
            }
        };
        let reason = tokio::select! {
            r = conn.as_mut() => return r,
            _ = shutdown.cancelled() => "shutdown",
            r = idle => r,
            _ = tokio::time::sleep_until(opened + self.max_age) => "max_age",
        };
        tracing::trace!(reason, "connection told to go away");
        conn.as_mut().go_away();
        conn.await
    }
}

/// A served connection that can be closed gracefully.
trait GracefulConnection {
    fn go_away(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E> GracefulConnection for hyper_util::server::conn::auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: hyper::body::Body + Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn go_away(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

fn handshake_failed(metrics: &crate::metrics::Metrics, reason: &'static str) {
    metrics
        .handshake_failures
        .get_or_create(&crate::metrics::HandshakeLabels { reason })
        .inc();
}

/// How often expired idempotency keys are purged, and how many one write
/// job deletes: small batches, so submissions queued behind a purge wait
/// for one short job, never for a scan of the whole table.
const PURGE_EVERY: Duration = Duration::from_secs(600);
const PURGE_BATCH: usize = 1000;

/// Deletes expired idempotency keys in batches until shutdown.
async fn run_idempotency_purge(store: Arc<dyn Store>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PURGE_EVERY) => {}
        }
        let mut total = 0;
        loop {
            match store.purge_idempotency(PURGE_BATCH).await {
                Ok(n) => {
                    total += n;
                    if n < PURGE_BATCH || shutdown.is_cancelled() {
                        break;
                    }
                    // Let submissions have the writer between batches.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "purging expired idempotency keys failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(keys = total, "expired idempotency keys purged");
        }
    }
}

/// The next connection; on an error (usually EMFILE) none, after a short
/// back-off instead of spinning.
async fn accept(listener: &TcpListener) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// Bounds of the public listener's connections.
struct PublicLimits {
    handshake: Duration,
    request: Duration,
    max_age: Duration,
    connections: usize,
}

/// Serves the public channel until `shutdown`: TLS without client
/// certificates, each connection told its client address (rate limits),
/// at most `limits.connections` at once, each closed gracefully after
/// `limits.max_age`.
async fn serve_public(
    listener: TcpListener,
    tls: Arc<TlsState>,
    router: axum::Router,
    shutdown: CancellationToken,
    limits: PublicLimits,
) {
    let (handshake_timeout, request_timeout) = (limits.handshake, limits.request);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(request_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64);
    let builder = Arc::new(builder);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = accept(&listener) => match r { Some(x) => x, None => continue },
        };
        let _ = tcp.set_nodelay(true);
        let tls_config = tls.public();
        let (router, builder, stop) = (router.clone(), builder.clone(), shutdown.clone());
        let max_age = limits.max_age;
        connections.spawn(async move {
            let _permit = permit;
            let opened = tokio::time::Instant::now();
            // Boxed, and HTTP built only once used, as on the main listener.
            let Ok(mut stream) = handshake(tls_config, tcp, peer, handshake_timeout).await else {
                return;
            };
            // No idle timeout here: an unused connection waits until its age.
            let lifetime = ConnectionLifetime {
                idle: max_age,
                max_age,
            };
            if lifetime
                .first_bytes(&mut stream, opened, &stop)
                .await
                .is_err()
            {
                return;
            }
            let ip = http::public::PublicPeer(peer.ip());
            Box::pin(serve_public_http(
                stream,
                ip,
                router,
                &builder,
                opened + max_age,
                request_timeout,
                &stop,
            ))
            .await;
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), connections.wait()).await;
}

/// Serves HTTP on one public connection until the client closes, or
/// gracefully until `shutdown` or the connection's `deadline`.
async fn serve_public_http(
    stream: Box<ClientStream>,
    ip: http::public::PublicPeer,
    router: axum::Router,
    builder: &auto::Builder<TokioExecutor>,
    deadline: tokio::time::Instant,
    request_timeout: Duration,
    shutdown: &CancellationToken,
) {
    let svc = router.map_request(
        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ip);
            req
        },
    );
    let mut conn = std::pin::pin!(
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
    );
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
        _ = tokio::time::sleep_until(deadline) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(request_timeout, conn).await;
        }
    }
}

/// On a shared database: reloads the catalog, participants and
/// subscriptions whenever any instance changed them (and after the
/// notification connection reconnects, which may have missed some).
async fn follow_control_changes(
    control: Arc<crate::control::Control>,
    grader: Arc<crate::grading::Grader>,
    mut changes: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        if let Err(e) = control.reload().await {
            tracing::error!(errors = ?e, "reloading the control plane from the database failed; keeping the previous one");
        }
        // The instance that changed the rules assesses every subject.
        if let Err(e) = grader.reload(&control.catalog.load(), false).await {
            tracing::error!(error = %e, "reloading the grade rules failed; keeping the previous ones");
        }
    }
}

/// Writes a signed audit checkpoint every `every` until shutdown.
async fn run_checkpoints(store: Arc<dyn Store>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = store.checkpoint().await {
            tracing::error!(error = %e, "audit checkpoint failed");
        }
    }
}

/// Builds and serves: the one entry point (`credgate serve` and the tests).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), StartupErrors> {
    Arc::new(Gateway::build(config).await?)
        .serve(listeners, shutdown)
        .await
}
