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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use hmac::{Hmac, Mac};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Sha256;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::DeliveryConfig;
use crate::participants::Registry;
use crate::redact::Redactor;
use crate::routing::{DeliveryMode, Subscription, Subscriptions};
use crate::store::{DeliveryResult, Finished, Outbound, Store};

/// Decodes a Standard Webhooks secret `whsec_<base64>` into key bytes.
pub fn signing_key(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret
        .strip_prefix("whsec_")
        .ok_or_else(|| "must look like whsec_<base64>".to_owned())?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "the part after whsec_ is not valid base64".to_owned())?;
    if key.len() < 24 {
        return Err("the key must be at least 24 bytes (192 bits)".into());
    }
    Ok(key)
}

/// The `webhook-signature` value: `v1,<base64 HMAC-SHA256(id.timestamp.body)>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Back-off before retry number `attempt` (1-based), with ±20 % jitter;
/// `None` once the schedule is exhausted.
pub fn backoff(schedule: &[u64], attempt: u32) -> Option<Duration> {
    let base = *schedule.get(attempt.checked_sub(1)? as usize)?;
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    Some(Duration::from_secs_f64(base as f64 * jitter))
}

/// State of one push endpoint (one subscription).
struct Endpoint {
    /// The delivery settings it was built from; a changed subscription
    /// (new endpoint, CA or secret) gets a new `Endpoint`.
    built_from: DeliveryMode,
    client: reqwest::Client,
    key: Vec<u8>,
    url: String,
    in_flight: Arc<Semaphore>,
    rate: governor::DefaultDirectRateLimiter,
    /// Consecutive failures and the pause, kept in memory: a restart gives
    /// a paused endpoint a fresh chance.
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    failures: u32,
    paused_until: Option<Instant>,
}

/// Builds the HTTPS client of one push subscription: trusts only the
/// subscription's CA and presents the gateway's client certificate.
fn endpoint_client(
    ca_file: &std::path::Path,
    identity: &(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
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
pub fn load_identity(
    cfg: &DeliveryConfig,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = CertificateDer::pem_file_iter(&cfg.client_cert)
        .map_err(|e| format!("delivery.client_cert: {}: {e}", cfg.client_cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("delivery.client_cert: {}: {e}", cfg.client_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.client_key)
        .map_err(|e| format!("delivery.client_key: {}: {e}", cfg.client_key.display()))?;
    Ok((chain, key))
}

/// The push side of delivery.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    subscriptions: Arc<ArcSwap<Subscriptions>>,
    catalog: Arc<ArcSwap<Catalog>>,
    registry: Arc<ArcSwap<Registry>>,
    redactor: Arc<Redactor>,
    cfg: DeliveryConfig,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    metrics: Arc<crate::metrics::Metrics>,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A dispatcher; `identity` is required once any push subscription exists.
    pub fn new(
        store: Arc<dyn Store>,
        control: &crate::control::Control,
        redactor: Arc<Redactor>,
        cfg: DeliveryConfig,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Dispatcher {
        let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight));
        Dispatcher {
            store,
            subscriptions: control.subscriptions.clone(),
            catalog: control.catalog.clone(),
            registry: control.registry.clone(),
            redactor,
            cfg,
            identity,
            endpoints: Mutex::new(HashMap::new()),
            in_flight,
            metrics,
        }
    }

    fn endpoint(&self, sub: &Subscription) -> Result<Arc<Endpoint>, String> {
        let mut map = self
            .endpoints
            .lock()
            .map_err(|_| "endpoint table poisoned".to_owned())?;
        if let Some(e) = map.get(&sub.id).filter(|e| e.built_from == sub.delivery) {
            return Ok(e.clone());
        }
        let DeliveryMode::Push {
            endpoint,
            ca_file,
            signing_secret,
            signing_secret_file,
            max_in_flight,
            rate_per_second,
        } = &sub.delivery
        else {
            return Err("not a push subscription".into());
        };
        let identity = self
            .identity
            .as_ref()
            .ok_or("no gateway client certificate (delivery.client_cert)")?;
        let secret = match (signing_secret, signing_secret_file) {
            (Some(s), _) => s.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| format!("{}: {e}", f.display()))?
                .trim()
                .to_owned(),
            (None, None) => return Err("no signing secret".into()),
        };
        let rate = NonZeroU32::new(*rate_per_second).unwrap_or(NonZeroU32::MIN);
        let e = Arc::new(Endpoint {
            built_from: sub.delivery.clone(),
            client: endpoint_client(
                ca_file,
                identity,
                Duration::from_secs(self.cfg.request_timeout_secs),
            )?,
            key: signing_key(&secret)?,
            url: endpoint.clone(),
            in_flight: Arc::new(Semaphore::new((*max_in_flight).max(1))),
            rate: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            health: Mutex::new(Health::default()),
        });
        map.insert(sub.id.clone(), e.clone());
        Ok(e)
    }

    /// Runs until `shutdown`: claims due push deliveries and sends them.
    pub async fn run_push(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.store.changes();
        let lease_ms = (self.cfg.request_timeout_secs as i64 + 30) * 1000;
        let poll = Duration::from_millis(self.cfg.poll_interval_ms);
        let mut tasks = tokio::task::JoinSet::new();
        let (done, results) = mpsc::channel(4096);
        let finisher = tokio::spawn(Self::run_finisher(self.store.clone(), results));
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let free = self.in_flight.available_permits().min(512);
            let due = if free == 0 {
                Vec::new()
            } else {
                match self.store.claim_due(now_ms(), free, lease_ms).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!(error = %e, "claiming push deliveries failed");
                        Vec::new()
                    }
                }
            };
            let full = !due.is_empty() && due.len() == free;
            for o in due {
                let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                    break;
                };
                let (this, done) = (self.clone(), done.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    this.attempt(o, &done).await;
                });
            }
            while tasks.try_join_next().is_some() {}
            if full {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(poll) => {}
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

    /// Hands a result to the finisher, which stores results in batches.
    async fn finish(
        done: &mpsc::Sender<Finished>,
        metrics: &crate::metrics::Metrics,
        o: &Outbound,
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

    async fn attempt(&self, o: Outbound, done: &mpsc::Sender<Finished>) {
        let subs = self.subscriptions.load_full();
        let Some(sub) = subs.get(&o.subscription).cloned() else {
            Self::finish(
                done,
                &self.metrics,
                &o,
                DeliveryResult::Dead {
                    error: "subscription no longer exists".into(),
                },
            )
            .await;
            return;
        };
        let endpoint = match self.endpoint(&sub) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(subscription = %sub.id, error = %e, "push endpoint unusable");
                Self::finish(done, &self.metrics, &o, DeliveryResult::Dead { error: e }).await;
                return;
            }
        };
        if let Some(until) = endpoint.health.lock().ok().and_then(|h| h.paused_until) {
            if until > Instant::now() {
                let at = now_ms() + until.duration_since(Instant::now()).as_millis() as i64;
                Self::finish(done, &self.metrics, &o, DeliveryResult::Deferred { at }).await;
                return;
            }
        }
        let agency = self.registry.load().get(&sub.agency).cloned();
        if agency.as_ref().is_some_and(|a| !a.enabled) {
            // A disabled agency's queued notices wait until it is enabled.
            Self::finish(
                done,
                &self.metrics,
                &o,
                DeliveryResult::Deferred {
                    at: now_ms() + 60_000,
                },
            )
            .await;
            return;
        }
        let Some(clearance) = agency.map(|a| a.clearance) else {
            Self::finish(
                done,
                &self.metrics,
                &o,
                DeliveryResult::Dead {
                    error: "agency no longer registered".into(),
                },
            )
            .await;
            return;
        };
        let catalog = self.catalog.load_full();
        let view = self.redactor.notice_view(
            catalog.get(&o.notice.item).map(|i| i.as_ref()),
            &o.notice,
            &o.record,
            clearance,
            None,
        );
        let body = match serde_json::to_vec(&view) {
            Ok(b) => b,
            Err(e) => {
                Self::finish(
                    done,
                    &self.metrics,
                    &o,
                    DeliveryResult::Dead {
                        error: e.to_string(),
                    },
                )
                .await;
                return;
            }
        };
        let Ok(_slot) = endpoint.in_flight.acquire().await else {
            return;
        };
        endpoint.rate.until_ready().await;
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let signature = sign(&endpoint.key, view.id(), timestamp, &body);
        let sent = endpoint
            .client
            .post(&endpoint.url)
            .header("content-type", "application/json")
            .header("webhook-id", view.id())
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let attempt = o.attempts + 1;
        let (ok, error, retry_after) = match sent {
            Ok(resp) if resp.status().is_success() => (true, String::new(), None),
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
                (
                    false,
                    format!("endpoint answered HTTP {status}"),
                    retry_after,
                )
            }
            Err(e) => (false, format!("request failed: {}", error_chain(&e)), None),
        };
        if ok {
            if let Ok(mut h) = endpoint.health.lock() {
                *h = Health::default();
            }
            Self::finish(done, &self.metrics, &o, DeliveryResult::Delivered).await;
            return;
        }
        self.note_failure(&sub, &endpoint, &error);
        let result = match backoff(&self.cfg.retry_schedule_secs, attempt) {
            Some(wait) => DeliveryResult::Retry {
                at: now_ms() + retry_after.map_or(wait, |r| r.max(wait)).as_millis() as i64,
                error,
            },
            None => {
                tracing::warn!(delivery = %o.delivery_id, subscription = %sub.id, attempts = attempt, "push delivery is dead after its last attempt");
                DeliveryResult::Dead { error }
            }
        };
        Self::finish(done, &self.metrics, &o, result).await;
    }

    fn note_failure(&self, sub: &Subscription, endpoint: &Endpoint, error: &str) {
        let Ok(mut h) = endpoint.health.lock() else {
            return;
        };
        h.failures += 1;
        if h.failures >= self.cfg.pause_after_failures
            && h.paused_until.is_none_or(|t| t <= Instant::now())
        {
            h.paused_until = Some(Instant::now() + Duration::from_secs(self.cfg.pause_secs));
            tracing::error!(
                event = "push_endpoint_paused",
                subscription = %sub.id,
                agency = %sub.agency,
                consecutive_failures = h.failures,
                pause_secs = self.cfg.pause_secs,
                last_error = %error,
                "push endpoint keeps failing; paused"
            );
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
    pub async fn run_expiry(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_secs(self.cfg.expiry_check_secs);
        loop {
            match self.store.expire_due(crate::codes::today_cst()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "records past their effective period lifted"),
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
    fn signature_matches_the_standard_webhooks_example() {
        // Example from the Standard Webhooks specification.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn backoff_follows_the_schedule_with_jitter_then_stops() {
        let s = [10, 100];
        let first = backoff(&s, 1).expect("first retry");
        assert!(first >= Duration::from_secs(8) && first <= Duration::from_secs(12));
        assert!(backoff(&s, 2).is_some_and(|d| d >= Duration::from_secs(80)));
        assert_eq!(backoff(&s, 3), None);
        assert_eq!(backoff(&s, 0), None);
    }

    #[test]
    fn rejects_malformed_secrets() {
        assert!(signing_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(signing_key("whsec_!!!").is_err());
        assert!(signing_key("whsec_c2hvcnQ=").is_err());
    }
}
