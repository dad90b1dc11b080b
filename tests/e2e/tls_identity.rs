//! Identity comes from the TLS handshake: what is refused at the handshake,
//! what is refused with 403, and what a header cannot change.

use std::time::Duration;

use crate::support::{ops_get, Client, Env, Server};
use credgate::synth;
use serde_json::json;

/// A request on a fresh connection must fail without any HTTP response.
async fn assert_refused(client: &Client, what: &str) {
    let result = client
        .send("GET", "/v1/catalog", &[], bytes::Bytes::new())
        .await;
    assert!(
        result.is_err(),
        "{what}: expected the handshake to fail, got {:?}",
        result.map(|r| r.status)
    );
}

/// `credgate_tls_handshake_failures_total` for `reason`, from the ops
/// listener's metrics (0 before the first failure of that kind).
/// The count of failed handshakes with `reason`, once it reaches
/// `expected` or after 5 s. A TLS 1.3 client learns of its refusal from
/// the alert, which the server sends before it counts the failure, so the
/// count may trail the client by a moment.
async fn handshake_failures(server: &Server, reason: &str, expected: u64) -> u64 {
    let series = format!("credgate_tls_handshake_failures_total{{reason=\"{reason}\"}} ");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = ops_get(server.ops, "/metrics").await.expect("metrics");
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or(0, |v| v.trim().parse().expect("a count"));
        if count == expected || tokio::time::Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_missing_unknown_expired_and_revoked_certificates() {
    let mut env = Env::new();
    env.config.server.handshake_timeout_secs = 1;
    let server = Server::start(&env).await;
    let ca = env.pki.dir.join("ca.pem");

    // Baseline: a good certificate gets through.
    let ok = env
        .client(server.addr, "dept-market")
        .get("/v1/catalog")
        .await;
    assert_eq!(ok.status, 200);

    assert_refused(
        &Client::new(server.addr, &env.pki.dir, None, &ca),
        "no certificate",
    )
    .await;
    assert_refused(
        &env.client(server.addr, "dept-expired"),
        "expired certificate",
    )
    .await;
    assert_refused(
        &env.client(server.addr, "dept-revoked"),
        "revoked certificate",
    )
    .await;

    // A certificate from another CA with a registered participant's name.
    let other = tempfile::tempdir().expect("tmp");
    crate::support::Pki::generate(other.path(), &["dept-market".to_string()]);
    assert_refused(
        &Client::new(server.addr, other.path(), Some("dept-market"), &ca),
        "unknown CA",
    )
    .await;

    // Operators see each refusal, and a peer that never finishes its
    // handshake, by reason.
    assert_eq!(handshake_failures(&server, "refused", 4).await, 4);
    assert_eq!(handshake_failures(&server, "timeout", 0).await, 0);
    let silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(handshake_failures(&server, "timeout", 1).await, 1);
    assert_eq!(handshake_failures(&server, "refused", 4).await, 4);
    drop(silent);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificate_of_unregistered_participant_gets_403() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let resp = env.client(server.addr, "stranger").get("/v1/catalog").await;
    assert_eq!(resp.status, 403);
    assert_eq!(
        resp.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(resp.json()["code"], "unknown_participant");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_cannot_change_the_caller() {
    let env = Env::new();
    let server = Server::start(&env).await;
    // dept-court is not a provider of penalties; claiming to be dept-market
    // in headers must not help.
    let body = json!({"item": "administrative_penalty", "records": [synth::record("administrative_penalty", 1, "general")]});
    let resp = env
        .client(server.addr, "dept-court")
        .send(
            "POST",
            "/v1/records",
            &[
                ("content-type", "application/json"),
                ("x-participant", "dept-market"),
                ("x-ssl-client-s-dn", "CN=dept-market"),
                ("forwarded", "for=dept-market"),
            ],
            serde_json::to_vec(&body).expect("json"),
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 403);
    assert_eq!(resp.json()["code"], "not_a_provider");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_http11_both_serve() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let client = env.client(server.addr, "dept-market");
    let mut h2 = client.connect(true).await.expect("h2 connect");
    for n in 0..3 {
        let body = serde_json::to_vec(
            &json!({"item": "red_list", "records": [synth::record("red_list", 5 + n, "")]}),
        )
        .expect("json");
        let r = h2
            .send(
                "POST",
                "/v1/records",
                &[("content-type", "application/json")],
                body.clone(),
            )
            .await
            .expect("h2 request");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["accepted"], 1);
    }
    server.stop().await;
}
