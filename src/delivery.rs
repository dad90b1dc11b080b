//! Push delivery: workers that POST redacted notices to agencies' HTTPS
//! endpoints over mTLS, signed per Standard Webhooks, with retries,
//! back-off, per-endpoint limits, dead letters and endpoint pausing; plus
//! the periodic lift of records whose effective period has passed.
//!
//! At least once: a delivery is claimed with a lease, and a crash before
//! its result is stored means it is sent again; receivers deduplicate by
//! `webhook-id` (the notice id). Bodies come only from `redact`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::DeliveryConfig;
use crate::participants::Registry;
use crate::redact::Redactor;
use crate::routing::{DeliveryMode, Subscription, Subscriptions};
use crate::signing::{sign, signing_key};
use crate::store::{DeliveryResult, EndpointHealth, Finished, Outbound, Store};

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A random back-off factor between 0.8 and 1.2 (±20 % jitter).
fn jitter() -> f64 {
    0.8 + rand::random::<f64>() * 0.4
}

/// Back-off before retry number `attempt` (1-based), scaled by `jitter`
/// (from [`jitter`]; the deliveries of one batch share one, so they come
/// due together and are sent again together); `None` once the schedule is
/// exhausted.
fn backoff(schedule: &[u64], attempt: u32, jitter: f64) -> Option<Duration> {
    let base = *schedule.get(attempt.checked_sub(1)? as usize)?;
    Some(Duration::from_secs_f64(base as f64 * jitter))
}

/// State of one push endpoint (one subscription).
struct Endpoint {
    /// The delivery settings it was built from; a changed subscription
    /// (new endpoint, CA or secret) gets a new `Endpoint`.
    built_from: DeliveryMode,
    /// Generation of the gateway's client identity it was built with; a
    /// reloaded identity (SIGHUP) gets endpoints rebuilt.
    identity_generation: u64,
    client: reqwest::Client,
    key: Vec<u8>,
    url: String,
    /// Free slots = requests this endpoint may still have in flight.
    in_flight: Arc<Semaphore>,
    /// Deliveries claimed to go out next, as soon as one of the endpoint's
    /// slots frees (as many as it has slots): a fast endpoint's pipeline
    /// never waits for a claim round trip, and a slow one holds at most
    /// twice its slots.
    next_in_line: Arc<Semaphore>,
    rate: governor::DefaultDirectRateLimiter,
    /// Rate tokens taken for a claim that found fewer deliveries due; the
    /// next claim uses them first (governor cannot give tokens back).
    prepaid: AtomicU32,
    /// Consecutive failures and the pause: this instance's copy of the
    /// shared health in the store, refreshed every [`HEALTH_REFRESH`].
    health: Mutex<Health>,
}

/// How often an instance reads the endpoint health other instances
/// counted.
const HEALTH_REFRESH: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Health {
    failures: u32,
    paused_until: Option<Instant>,
}

/// Sets an endpoint's health here from the shared one.
fn mirror(endpoint: &Endpoint, shared: EndpointHealth) {
    if let Ok(mut h) = endpoint.health.lock() {
        let now = now_ms();
        h.failures = shared.failures;
        h.paused_until = (shared.paused_until_ms > now)
            .then(|| Instant::now() + Duration::from_millis((shared.paused_until_ms - now) as u64));
    }
}

/// The gateway's client certificate chain and key, presented to push
/// endpoints.
pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Builds the HTTPS client of one push subscription: trusts only the
/// subscription's CA and presents the gateway's client certificate.
fn endpoint_client(
    ca_file: &std::path::Path,
    identity: &Identity,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in
        CertificateDer::pem_file_iter(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?
    {
        roots
            .add(c.map_err(|e| format!("{}: {e}", ca_file.display()))?)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: holds no CA certificate", ca_file.display()));
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.0.clone(), identity.1.clone_key())
        .map_err(|e| format!("delivery.client_cert: {e}"))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("credgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// Loads the gateway's client identity for pushes.
pub fn load_identity(cfg: &DeliveryConfig) -> Result<Identity, String> {
    let chain = CertificateDer::pem_file_iter(&cfg.client_cert)
        .map_err(|e| format!("delivery.client_cert: {}: {e}", cfg.client_cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("delivery.client_cert: {}: {e}", cfg.client_cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "delivery.client_cert: {} holds no certificate",
            cfg.client_cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.client_key)
        .map_err(|e| format!("delivery.client_key: {}: {e}", cfg.client_key.display()))?;
    Ok((chain, key))
}

/// The push side of delivery.
///
/// Fairness: the dispatcher claims, per subscription, only what that
/// endpoint can send now (its free slots and rate budget, and its share of
/// the global `delivery.max_in_flight`), so an attempt starts as soon as it
/// is claimed and holds only its own endpoint's slot. A slow or failing
/// endpoint fills its own slots and nothing else; other agencies' notices
/// are never queued behind it.
///
/// Fencing: every claim takes a new claim number (the lease token); a
/// result is stored only if the delivery still carries the claim it was
/// attempted under, and this gateway never starts a second attempt of a
/// delivery whose first attempt is still open.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    subscriptions: Arc<ArcSwap<Subscriptions>>,
    catalog: Arc<ArcSwap<Catalog>>,
    registry: Arc<ArcSwap<Registry>>,
    redactor: Arc<Redactor>,
    cfg: DeliveryConfig,
    /// The gateway's client identity, loaded at start-up when its files
    /// exist, on demand when a push subscription needs it, and on SIGHUP.
    identity: ArcSwapOption<Identity>,
    /// Bumped whenever `identity` changes; endpoints built with an older
    /// identity are rebuilt.
    identity_generation: AtomicU64,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    /// Endpoints that could not be built, and why: not rebuilt (files
    /// read, CA parsed) on every round, only after [`REBUILD_AFTER`] or when
    /// the subscription or identity changes.
    unusable: Mutex<HashMap<String, Unusable>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Global bound on push attempts in flight (`delivery.max_in_flight`).
    in_flight: Arc<Semaphore>,
    /// Deliveries this gateway is attempting now, with the claim number
    /// their result will be stored under.
    open_attempts: Mutex<HashMap<String, Arc<AtomicI64>>>,
    /// Where the next round of claims starts, so scarce global capacity
    /// goes round the subscriptions instead of to the first ones.
    rotation: AtomicUsize,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// Push bodies made in one claim round, by (notice, item version,
/// clearance): the redacted view of a notice is the same for every
/// subscription whose agency has the same clearance, so ten subscriptions
/// of one clearance cost one redaction and one serialization, not ten.
/// Kept only for the round (one snapshot of the store), so a corrected
/// record or a changed catalog item is never served from here later.
#[derive(Default)]
struct RoundBodies(Mutex<HashMap<BodyKey, bytes::Bytes>>);

type BodyKey = (String, Option<u32>, crate::catalog::FieldClass);

impl RoundBodies {
    fn get_or_make(
        &self,
        key: BodyKey,
        make: impl FnOnce() -> serde_json::Result<bytes::Bytes>,
    ) -> serde_json::Result<bytes::Bytes> {
        if let Some(b) = self.0.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(b);
        }
        let body = make()?;
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, body.clone());
        }
        Ok(body)
    }
}

/// What became of one push request.
enum Outcome {
    Delivered,
    /// Not sent: the agency is disabled; try again at `at`.
    Deferred {
        at: i64,
    },
    /// Not sent and never will be.
    Dead {
        error: String,
    },
    /// Sent (or tried) and failed: retried on each delivery's schedule.
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// The `webhook-id` of a batch: the same for the same notices, so a
/// receiver can recognise a batch sent again whole; receivers deduplicate
/// by each notice's `notice_id` in any case.
fn batch_id(notice_ids: &[&str]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for id in notice_ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    format!("batch_{}", &hex::encode(h.finalize())[..32])
}

/// `{"notices": [...]}` from the notices' serialized views.
fn batch_body(views: &[bytes::Bytes]) -> bytes::Bytes {
    let len = views.iter().map(|v| v.len() + 1).sum::<usize>() + 14;
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(b"{\"notices\":[");
    for (i, v) in views.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(v);
    }
    body.extend_from_slice(b"]}");
    bytes::Bytes::from(body)
}

/// How long an endpoint that could not be built is left alone.
const REBUILD_AFTER: Duration = Duration::from_secs(10);

/// A failed endpoint build.
struct Unusable {
    built_from: DeliveryMode,
    identity_generation: u64,
    at: Instant,
    error: String,
}

/// Where a claimed delivery stands at its endpoint.
enum Slot {
    /// Holds a slot and a rate token: sends at once.
    Now(OwnedSemaphorePermit),
    /// Next in line: takes a slot and a rate token as soon as they free.
    Next(OwnedSemaphorePermit),
    /// The endpoint cannot be built: the attempt records why.
    Unusable,
}

/// What one subscription may claim in one round, with the slots held for it.
struct Grant {
    sub: Arc<Subscription>,
    endpoint: Result<Arc<Endpoint>, String>,
    /// One endpoint slot (or place in line) and one global permit per
    /// delivery to claim; slots first.
    permits: Vec<(Slot, OwnedSemaphorePermit)>,
    /// Rate tokens taken for this round.
    tokens: u32,
}

impl Dispatcher {
    /// A dispatcher; `identity` is required once any push subscription exists.
    pub fn new(
        store: Arc<dyn Store>,
        active: &crate::active::Active,
        redactor: Arc<Redactor>,
        cfg: DeliveryConfig,
        identity: Option<Identity>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Dispatcher {
        let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight));
        Dispatcher {
            store,
            subscriptions: active.subscriptions.clone(),
            catalog: active.catalog.clone(),
            registry: active.registry.clone(),
            redactor,
            cfg,
            identity: ArcSwapOption::new(identity.map(Arc::new)),
            identity_generation: AtomicU64::new(0),
            endpoints: Mutex::new(HashMap::new()),
            unusable: Mutex::new(HashMap::new()),
            in_flight,
            metrics,
            open_attempts: Mutex::new(HashMap::new()),
            rotation: AtomicUsize::new(0),
        }
    }

    /// The client identity, loaded from `delivery.client_cert` /
    /// `.client_key` now if it was not loaded before.
    fn identity(&self) -> Result<Arc<Identity>, String> {
        if let Some(id) = self.identity.load_full() {
            return Ok(id);
        }
        let id = Arc::new(load_identity(&self.cfg)?);
        self.identity.store(Some(id.clone()));
        self.identity_generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!("push client certificate loaded");
        Ok(id)
    }

    /// Replaces the client identity (SIGHUP); every endpoint is rebuilt
    /// with it on its next use.
    pub fn set_identity(&self, identity: Identity) {
        self.identity.store(Some(Arc::new(identity)));
        self.identity_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the gateway can deliver to `sub` now: client identity, CA
    /// bundle and signing secret all usable. The admin API refuses a push
    /// subscription for which this fails. Unlike delivery rounds, it does
    /// not use the cache of failed builds: an operator who fixed a file
    /// and sends the `PUT` again is not told about the old failure.
    pub fn check_push(&self, sub: &Subscription) -> Result<(), String> {
        let generation = self.identity_generation.load(Ordering::Acquire);
        self.build_endpoint(sub, generation).map(|_| ())
    }

    fn endpoint(&self, sub: &Subscription) -> Result<Arc<Endpoint>, String> {
        let generation = self.identity_generation.load(Ordering::Acquire);
        if let Some(u) = self
            .unusable
            .lock()
            .map_err(|_| "endpoint table poisoned".to_owned())?
            .get(&sub.id)
            .filter(|u| {
                u.built_from == sub.delivery
                    && u.identity_generation == generation
                    && u.at.elapsed() < REBUILD_AFTER
            })
        {
            return Err(u.error.clone());
        }
        let built = self.build_endpoint(sub, generation);
        if let Ok(mut unusable) = self.unusable.lock() {
            match &built {
                Ok(_) => {
                    unusable.remove(&sub.id);
                }
                Err(error) => {
                    unusable.insert(
                        sub.id.clone(),
                        Unusable {
                            built_from: sub.delivery.clone(),
                            identity_generation: generation,
                            at: Instant::now(),
                            error: error.clone(),
                        },
                    );
                }
            }
        }
        built
    }

    fn build_endpoint(&self, sub: &Subscription, generation: u64) -> Result<Arc<Endpoint>, String> {
        if let Some(e) = self
            .endpoints
            .lock()
            .map_err(|_| "endpoint table poisoned".to_owned())?
            .get(&sub.id)
            .filter(|e| e.built_from == sub.delivery && e.identity_generation == generation)
        {
            return Ok(e.clone());
        }
        let DeliveryMode::Push {
            endpoint,
            ca_file,
            signing_secret,
            signing_secret_file,
            max_in_flight,
            rate_per_second,
            ..
        } = &sub.delivery
        else {
            return Err("not a push subscription".into());
        };
        let identity = self
            .identity()
            .map_err(|e| format!("no gateway client certificate for push deliveries ({e})"))?;
        let secret = match (signing_secret, signing_secret_file) {
            (Some(s), _) => s.expose().to_owned(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| format!("{}: {e}", f.display()))?
                .trim()
                .to_owned(),
            (None, None) => return Err("no signing secret".into()),
        };
        let rate = NonZeroU32::new(*rate_per_second).unwrap_or(NonZeroU32::MIN);
        let e = Arc::new(Endpoint {
            built_from: sub.delivery.clone(),
            // The generation read before `identity()`: if a reload raced
            // with this build, the next use rebuilds.
            identity_generation: generation,
            client: endpoint_client(
                ca_file,
                &identity,
                Duration::from_secs(self.cfg.request_timeout_secs),
            )?,
            key: signing_key(&secret)?,
            url: endpoint.clone(),
            in_flight: Arc::new(Semaphore::new((*max_in_flight).max(1))),
            next_in_line: Arc::new(Semaphore::new((*max_in_flight).max(1))),
            rate: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            prepaid: AtomicU32::new(0),
            health: Mutex::new(Health::default()),
        });
        // A rebuilt endpoint (changed subscription or identity) starts
        // with fresh slots; attempts still open on the old one finish there.
        self.endpoints
            .lock()
            .map_err(|_| "endpoint table poisoned".to_owned())?
            .insert(sub.id.clone(), e.clone());
        Ok(e)
    }

    /// What each push subscription may claim now: free endpoint slots,
    /// rate tokens and a fair share of the global permits. Paused
    /// endpoints and disabled agencies get nothing (their deliveries wait
    /// in the store, unleased). Also returns how soon a rate-limited or
    /// paused endpoint can take more.
    fn grants(&self) -> (Vec<Grant>, Option<Duration>) {
        let subs = self.subscriptions.load_full();
        let registry = self.registry.load_full();
        let mut push: Vec<Arc<Subscription>> = subs
            .iter()
            .filter(|s| s.is_push())
            .filter(|s| registry.get(&s.agency).is_some_and(|a| a.enabled))
            .cloned()
            .collect();
        let mut wake: Option<Duration> = None;
        let mut soonest = |d: Duration| wake = Some(wake.map_or(d, |w| w.min(d)));
        if push.is_empty() {
            return (Vec::new(), None);
        }
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % push.len();
        push.rotate_left(start);
        let share = (self.in_flight.available_permits() / push.len()).max(1);
        let mut grants = Vec::new();
        for sub in push {
            let endpoint = self.endpoint(&sub);
            let mut permits = Vec::new();
            let mut tokens = 0;
            match &endpoint {
                Ok(e) => {
                    let paused = e.health.lock().ok().and_then(|h| h.paused_until);
                    if let Some(until) = paused.filter(|t| *t > Instant::now()) {
                        soonest(until.duration_since(Instant::now()));
                        continue;
                    }
                    let mut prepaid = e.prepaid.swap(0, Ordering::AcqRel);
                    while permits.len() < share {
                        let Ok(slot) = e.in_flight.clone().try_acquire_owned() else {
                            break;
                        };
                        if prepaid > 0 {
                            prepaid -= 1;
                        } else if let Err(not_until) = e.rate.check() {
                            soonest(not_until.wait_time_from(governor::clock::Clock::now(
                                &governor::clock::DefaultClock::default(),
                            )));
                            break;
                        }
                        let Ok(global) = self.in_flight.clone().try_acquire_owned() else {
                            // Not sent: the token stays for the next round.
                            prepaid += 1;
                            break;
                        };
                        tokens += 1;
                        permits.push((Slot::Now(slot), global));
                    }
                    e.prepaid.fetch_add(prepaid, Ordering::AcqRel);
                    // Every slot busy (not rate-limited): line up the next ones.
                    if e.in_flight.available_permits() == 0 {
                        while permits.len() < share {
                            let Ok(next) = e.next_in_line.clone().try_acquire_owned() else {
                                break;
                            };
                            let Ok(global) = self.in_flight.clone().try_acquire_owned() else {
                                break;
                            };
                            permits.push((Slot::Next(next), global));
                        }
                    }
                }
                // An endpoint that cannot be built: claim a few so they are
                // retried (and finally dead) with the reason on record.
                Err(_) => {
                    while permits.len() < share.min(8) {
                        let Ok(global) = self.in_flight.clone().try_acquire_owned() else {
                            break;
                        };
                        permits.push((Slot::Unusable, global));
                    }
                }
            }
            if !permits.is_empty() {
                grants.push(Grant {
                    sub,
                    endpoint,
                    permits,
                    tokens,
                });
            }
        }
        (grants, wake)
    }

    /// Runs until `shutdown`: claims due push deliveries and sends them.
    pub async fn run_push(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.store.changes();
        let lease_ms = (self.cfg.request_timeout_secs as i64 + 30) * 1000;
        let poll = Duration::from_millis(self.cfg.poll_interval_ms);
        let mut tasks = tokio::task::JoinSet::new();
        let (done, results) = mpsc::channel(4096);
        let finisher = tokio::spawn(Self::run_finisher(self.store.clone(), results));
        let mut health_read = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if health_read.elapsed() >= HEALTH_REFRESH {
                self.refresh_health().await;
                health_read = Instant::now();
            }
            let (grants, wake) = self.grants();
            let wants: Vec<(String, usize)> = grants
                .iter()
                .map(|g| (g.sub.id.clone(), g.permits.len() * g.sub.batch_max()))
                .collect();
            let due = if wants.is_empty() {
                Vec::new()
            } else {
                match self.store.claim_due(now_ms(), &wants, lease_ms).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!(error = %e, "claiming push deliveries failed");
                        Vec::new()
                    }
                }
            };
            let mut more = false;
            // A round claims a notice for many subscriptions at once, all
            // from one snapshot: its body is redacted and serialized once
            // per clearance, shared by the round's attempts.
            let bodies = Arc::new(RoundBodies::default());
            let mut by_sub: HashMap<String, Vec<Outbound>> = HashMap::new();
            for o in due {
                by_sub.entry(o.subscription.clone()).or_default().push(o);
            }
            for grant in grants {
                let claimed = by_sub.remove(&grant.sub.id).unwrap_or_default();
                // One permit (endpoint slot, rate token) is one request,
                // carrying up to `batch_max` deliveries.
                let per_request = grant.sub.batch_max();
                let requests = claimed.len().div_ceil(per_request);
                more |= claimed.len() == grant.permits.len() * per_request;
                let unused_tokens = grant.tokens.saturating_sub(requests as u32);
                if let Ok(e) = &grant.endpoint {
                    e.prepaid.fetch_add(unused_tokens, Ordering::AcqRel);
                }
                let mut permits_left = grant.permits.into_iter();
                let mut claimed = claimed.into_iter().peekable();
                while claimed.peek().is_some() {
                    let Some(permits) = permits_left.next() else {
                        break;
                    };
                    let batch: Vec<(Outbound, Arc<AtomicI64>)> = claimed
                        .by_ref()
                        .take(per_request)
                        // A delivery whose first attempt is still open here
                        // is left to it: that one now stores its result
                        // under the new claim.
                        .filter_map(|o| self.open_attempt(&o).map(|token| (o, token)))
                        .collect();
                    if batch.is_empty() {
                        continue;
                    }
                    let (this, done, endpoint, bodies) = (
                        self.clone(),
                        done.clone(),
                        grant.endpoint.clone(),
                        bodies.clone(),
                    );
                    tasks.spawn(async move {
                        let (slot, _global) = permits;
                        let _slot = match (slot, &endpoint) {
                            (Slot::Next(place), Ok(e)) => {
                                let slot = e.in_flight.clone().acquire_owned().await.ok();
                                drop(place);
                                e.rate.until_ready().await;
                                slot
                            }
                            (Slot::Now(slot), _) => Some(slot),
                            _ => None,
                        };
                        let ids: Vec<String> =
                            batch.iter().map(|(o, _)| o.delivery_id.clone()).collect();
                        this.attempt(batch, per_request > 1, endpoint, &done, &bodies)
                            .await;
                        if let Ok(mut open) = this.open_attempts.lock() {
                            for id in &ids {
                                open.remove(id);
                            }
                        }
                    });
                }
                // Unused permits are released here.
            }
            while tasks.try_join_next().is_some() {}
            if more {
                continue;
            }
            let wait = wake
                .map_or(poll, |w| w.min(poll))
                .max(Duration::from_millis(1));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(wait) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        // Let attempts in flight finish (or time out) so their results are
        // stored; anything cut off is retried after restart.
        let deadline = Duration::from_secs(self.cfg.request_timeout_secs + 1);
        let _ = tokio::time::timeout(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        // The finisher stores the last results once every sender is gone.
        drop(done);
        let _ = finisher.await;
    }

    /// Registers an attempt of `o` under its claim; `None` if this gateway
    /// is still attempting it (then the open attempt takes the new claim).
    fn open_attempt(&self, o: &Outbound) -> Option<Arc<AtomicI64>> {
        let mut open = self.open_attempts.lock().ok()?;
        if let Some(token) = open.get(&o.delivery_id) {
            token.store(o.claim, Ordering::Release);
            tracing::warn!(delivery = %o.delivery_id, "lease lapsed while the attempt was still open; not sent again");
            return None;
        }
        let token = Arc::new(AtomicI64::new(o.claim));
        open.insert(o.delivery_id.clone(), token.clone());
        Some(token)
    }

    /// Hands a result to the finisher, which stores results in batches.
    async fn finish(
        done: &mpsc::Sender<Finished>,
        metrics: &crate::metrics::Metrics,
        o: &Outbound,
        claim: &AtomicI64,
        result: DeliveryResult,
    ) {
        let outcome = match &result {
            DeliveryResult::Delivered => "delivered",
            DeliveryResult::Retry { .. } => "retry",
            DeliveryResult::Deferred { .. } => "deferred",
            DeliveryResult::Dead { .. } => "dead",
        };
        metrics
            .push_attempts
            .get_or_create(&crate::metrics::PushLabels { outcome })
            .inc();
        let finished = Finished {
            delivery_id: o.delivery_id.clone(),
            notice_id: o.notice.notice_id.clone(),
            agency: o.agency.clone(),
            subscription: o.subscription.clone(),
            attempts: o.attempts + 1,
            claim: claim.load(Ordering::Acquire),
            result,
        };
        if done.send(finished).await.is_err() {
            tracing::error!(delivery = %o.delivery_id, "delivery result lost at shutdown; it will be sent again");
        }
    }

    /// Stores results as they come, many per transaction, until every
    /// sender is gone.
    async fn run_finisher(store: Arc<dyn Store>, mut results: mpsc::Receiver<Finished>) {
        let mut batch = Vec::with_capacity(512);
        while results.recv_many(&mut batch, 512).await > 0 {
            let n = batch.len();
            if let Err(e) = store.finish_deliveries(std::mem::take(&mut batch)).await {
                tracing::error!(results = n, error = %e, "storing delivery results failed; those deliveries will be sent again");
            }
        }
    }

    /// One request carrying claimed deliveries of one subscription (one,
    /// or up to its `batch_max` when `batched`); its endpoint slot and rate
    /// token were taken before the claim, so it starts sending at once.
    /// Every delivery of the request gets the request's outcome.
    async fn attempt(
        &self,
        batch: Vec<(Outbound, Arc<AtomicI64>)>,
        batched: bool,
        endpoint: Result<Arc<Endpoint>, String>,
        done: &mpsc::Sender<Finished>,
        bodies: &RoundBodies,
    ) {
        let outcome = self.send(&batch, batched, endpoint, bodies).await;
        let first = batch
            .first()
            .map(|(o, _)| (o.delivery_id.clone(), o.subscription.clone()));
        let mut dead = 0;
        let (jitter, now) = (jitter(), now_ms());
        for (o, claim) in &batch {
            let result = match &outcome {
                Outcome::Delivered => DeliveryResult::Delivered,
                Outcome::Deferred { at } => DeliveryResult::Deferred { at: *at },
                Outcome::Dead { error } => DeliveryResult::Dead {
                    error: error.clone(),
                },
                Outcome::Failed { error, retry_after } => {
                    match backoff(&self.cfg.retry_schedule_secs, o.attempts + 1, jitter) {
                        Some(wait) => DeliveryResult::Retry {
                            at: now + retry_after.map_or(wait, |r| r.max(wait)).as_millis() as i64,
                            error: error.clone(),
                        },
                        None => {
                            dead += 1;
                            DeliveryResult::Dead {
                                error: error.clone(),
                            }
                        }
                    }
                }
            };
            Self::finish(done, &self.metrics, o, claim, result).await;
        }
        if dead > 0 {
            let (delivery, subscription) = first.unwrap_or_default();
            tracing::warn!(%delivery, %subscription, deliveries = dead, "push delivery is dead after its last attempt");
        }
    }

    /// Sends one request; what became of it.
    async fn send(
        &self,
        batch: &[(Outbound, Arc<AtomicI64>)],
        batched: bool,
        endpoint: Result<Arc<Endpoint>, String>,
        bodies: &RoundBodies,
    ) -> Outcome {
        let Some((first, _)) = batch.first() else {
            return Outcome::Delivered;
        };
        let subs = self.subscriptions.load_full();
        let Some(sub) = subs.get(&first.subscription).cloned() else {
            return Outcome::Dead {
                error: "subscription no longer exists".into(),
            };
        };
        let endpoint = match endpoint {
            Ok(e) => e,
            Err(error) => {
                tracing::error!(subscription = %sub.id, %error, "push endpoint unusable");
                return Outcome::Failed {
                    error: format!("push endpoint unusable: {error}"),
                    retry_after: None,
                };
            }
        };
        let agency = self.registry.load().get(&sub.agency).cloned();
        if agency.as_ref().is_some_and(|a| !a.enabled) {
            // Disabled since the claim: its queued notices wait until it is
            // enabled again.
            return Outcome::Deferred {
                at: now_ms() + 60_000,
            };
        }
        let Some(clearance) = agency.map(|a| a.clearance) else {
            return Outcome::Dead {
                error: "agency no longer registered".into(),
            };
        };
        let catalog = self.catalog.load_full();
        let mut views = Vec::with_capacity(batch.len());
        for (o, _) in batch {
            let item = catalog.get(&o.notice.item).map(|i| i.as_ref());
            let view = bodies.get_or_make(
                (
                    o.notice.notice_id.clone(),
                    item.map(|i| i.def.version),
                    clearance,
                ),
                || {
                    let view = self
                        .redactor
                        .notice_view(item, &o.notice, &o.record, clearance, None);
                    serde_json::to_vec(&view).map(bytes::Bytes::from)
                },
            );
            match view {
                Ok(v) => views.push(v),
                Err(e) => {
                    return Outcome::Dead {
                        error: e.to_string(),
                    }
                }
            }
        }
        let (id, body) = if batched {
            let ids: Vec<&str> = batch
                .iter()
                .map(|(o, _)| o.notice.notice_id.as_str())
                .collect();
            (batch_id(&ids), batch_body(&views))
        } else {
            (first.notice.notice_id.clone(), views.swap_remove(0))
        };
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let signature = sign(&endpoint.key, &id, timestamp, &body);
        let sent = endpoint
            .client
            .post(&endpoint.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let (error, retry_after) = match sent {
            Ok(resp) if resp.status().is_success() => {
                let had_failures = endpoint.health.lock().is_ok_and(|mut h| {
                    let had = h.failures > 0 || h.paused_until.is_some();
                    *h = Health::default();
                    had
                });
                if had_failures {
                    self.count_outcome(&sub, &endpoint, true, "").await;
                }
                return Outcome::Delivered;
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = (status == 429 || status == 503)
                    .then(|| {
                        resp.headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                    .flatten()
                    .map(|s| Duration::from_secs(s.min(6 * 3600)));
                (format!("endpoint answered HTTP {status}"), retry_after)
            }
            Err(e) => (format!("request failed: {}", error_chain(&e)), None),
        };
        self.count_outcome(&sub, &endpoint, false, &error).await;
        Outcome::Failed { error, retry_after }
    }

    /// Counts an attempt in the endpoint's health in the store (shared by
    /// every instance) and mirrors the result here; the instance whose
    /// failure paused the endpoint reports it.
    async fn count_outcome(&self, sub: &Subscription, endpoint: &Endpoint, ok: bool, error: &str) {
        let pause_ms = (self.cfg.pause_secs * 1000) as i64;
        let counted = self
            .store
            .endpoint_outcome(
                &sub.id,
                ok,
                self.cfg.pause_after_failures,
                now_ms(),
                pause_ms,
            )
            .await;
        let health = match counted {
            Ok(h) => h,
            Err(e) => {
                // The store is unreachable: count here, as if alone.
                tracing::warn!(error = %e, subscription = %sub.id, "endpoint health not stored; counted in memory");
                if let Ok(mut h) = endpoint.health.lock() {
                    h.failures = if ok { 0 } else { h.failures + 1 };
                    if h.failures >= self.cfg.pause_after_failures
                        && h.paused_until.is_none_or(|t| t <= Instant::now())
                    {
                        h.paused_until =
                            Some(Instant::now() + Duration::from_secs(self.cfg.pause_secs));
                    }
                }
                return;
            }
        };
        mirror(endpoint, health);
        if health.newly_paused {
            tracing::error!(
                event = "push_endpoint_paused",
                subscription = %sub.id,
                agency = %sub.agency,
                consecutive_failures = health.failures,
                pause_secs = self.cfg.pause_secs,
                last_error = %error,
                "push endpoint keeps failing; paused"
            );
        }
    }

    /// Takes the health other instances counted (failures, pauses) into
    /// this one's endpoints.
    async fn refresh_health(&self) {
        let shared: HashMap<String, EndpointHealth> = match self.store.endpoint_health().await {
            Ok(list) => list.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading push endpoint health failed");
                return;
            }
        };
        if let Ok(endpoints) = self.endpoints.lock() {
            for (id, e) in endpoints.iter() {
                mirror(e, shared.get(id).copied().unwrap_or_default());
            }
        }
    }

    /// Subscriptions whose endpoint is paused now.
    pub fn paused(&self) -> Vec<String> {
        let now = Instant::now();
        self.endpoints
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, e)| {
                        e.health
                            .lock()
                            .is_ok_and(|h| h.paused_until.is_some_and(|t| t > now))
                    })
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs until `shutdown`: lifts records whose effective period passed.
    /// Ended records leave the subject cache of credit reviews.
    pub async fn run_expiry(
        self: Arc<Self>,
        shutdown: CancellationToken,
        subjects: Arc<crate::subjects::SubjectCache>,
    ) {
        let every = Duration::from_secs(self.cfg.expiry_check_secs);
        loop {
            match self.store.expire_due(crate::codes::today_cst()).await {
                Ok(0) => {}
                Ok(n) => {
                    subjects.invalidate_all();
                    tracing::info!(records = n, "records past their effective period lifted")
                }
                Err(e) => tracing::error!(error = %e, "expiry check failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_schedule_with_jitter_then_stops() {
        let s = [10, 100];
        let first = backoff(&s, 1, jitter()).expect("first retry");
        assert!(first >= Duration::from_secs(8) && first <= Duration::from_secs(12));
        assert!(backoff(&s, 2, jitter()).is_some_and(|d| d >= Duration::from_secs(80)));
        assert_eq!(backoff(&s, 3, jitter()), None);
        assert_eq!(backoff(&s, 0, jitter()), None);
    }
}
