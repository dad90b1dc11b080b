//! The fault campaign, shortened: cycles of `kill -9` at a random moment
//! under mixed load (dishonesty records submitted from 8 connections, push
//! deliveries to a real HTTPS receiver, pulls, and an administrator
//! switching a subscription off and on), with the invariants checked after
//! every restart:
//!
//! - every acknowledged notice is in the pull agency's stream;
//! - no notice has two deliveries to one subscription;
//! - the audit chain verifies;
//!
//! and at the end every acknowledged notice was pushed. `CHAOS_CYCLES`
//! sets the number of cycles (default 4; the full campaign runs 100).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::process::{assert_pushed_and_pullable, burst_then_kill_after, pull_all, signal, spawn};
use crate::support::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_cycles_under_mixed_load_keep_every_invariant() {
    let cycles: u64 = std::env::var("CHAOS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let env = Env::new();
    let rx =
        crate::receiver::Receiver::start(env.root.path(), "chaos", &env.pki.dir.join("ca.pem"), 0)
            .await;
    env.subscribe(&format!(
        "[[subscription]]\nid = \"land-push\"\nagency = \"agency-land\"\nmode = \"push\"\nendpoint = \"{}\"\nca_file = \"{}\"\nsigning_secret = \"whsec_c2VjcmV0LWZvci1sYW5kLWJ1cmVhdS1yZWNlaXZlcg==\"\nitems = [\"serious_dishonesty\"]\n\n\
         [[subscription]]\nid = \"proc-pull\"\nagency = \"agency-procurement\"\nmode = \"pull\"\nitems = [\"serious_dishonesty\"]\n\n\
         [[subscription]]\nid = \"fin-pull\"\nagency = \"agency-finance\"\nmode = \"pull\"\nitems = [\"serious_dishonesty\"]\n",
        rx.endpoint(),
        rx.ca_file.display()
    ));
    let mut acked = HashSet::new();
    let mut admin_changes = 0u64;
    for cycle in 0..cycles {
        let mut running = spawn(&env).await;
        // An administrator switches a subscription off and on meanwhile.
        let admin = env.client(running.main, "admin-credit-office");
        let stop = Arc::new(AtomicBool::new(false));
        let toggler = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                for action in ["disable", "enable"].iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let path = format!("/admin/v1/subscriptions/fin-pull/{action}");
                    match admin.send("POST", &path, &[], bytes::Bytes::new()).await {
                        Ok(r) if r.status == 200 => done += 1,
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                done
            })
        };
        let millis = rand::rng().random_range(200..1200);
        let got = burst_then_kill_after(
            &env,
            &mut running,
            "dept-court",
            "serious_dishonesty",
            8,
            "notice_id",
            cycle * 10_000_000,
            millis,
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        admin_changes += toggler.await.unwrap_or(0);
        acked.extend(got);

        // Restarted: the invariants hold.
        let running = spawn(&env).await;
        let agency = env.client(running.main, "agency-procurement");
        let pulled = pull_all(&agency).await;
        let missing = acked.difference(&pulled).count();
        assert_eq!(
            missing, 0,
            "cycle {cycle}: acknowledged notices missing from the stream"
        );
        signal(&running.child, "-TERM");
        let mut running = running;
        running.child.wait().expect("wait");
        let twice = env.sql_texts(
            "SELECT notice_id || ' ' || subscription FROM deliveries GROUP BY notice_id, subscription HAVING COUNT(*) > 1",
        );
        assert!(
            twice.is_empty(),
            "cycle {cycle}: delivered twice: {twice:?}"
        );
        let (code, out) = env.audit_verify(&format!("chaos-{cycle}"));
        assert_eq!(code, 0, "cycle {cycle}: audit chain: {out}");
        eprintln!(
            "chaos cycle {cycle}: killed after {millis} ms, {} acknowledged so far, invariants hold",
            acked.len()
        );
    }
    // Every acknowledged notice reaches the push receiver too.
    let running = spawn(&env).await;
    let agency = env.client(running.main, "agency-procurement");
    assert_pushed_and_pullable(&rx, &agency, &acked, 60).await;
    eprintln!(
        "chaos: {cycles} kill -9 cycles, {} acknowledged notices, {admin_changes} admin changes, losses: 0",
        acked.len()
    );
}

/// A TLS endpoint (certificate of its own CA, no client check) that reads
/// the request and answers `200` one byte every 300 ms.
async fn dribbling_endpoint(dir: &std::path::Path) -> (String, std::path::PathBuf) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = credgate::pki::DevCa::generate("dribble receiver CA").expect("ca");
    let cert = ca.issue_server(&["localhost", "127.0.0.1"]).expect("cert");
    let ca_file = dir.join("dribble-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).expect("write ca");
    let chain: Vec<_> = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("config");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 64 * 1024];
                let _ = tls.read(&mut buf).await;
                for b in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" {
                    if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
        }
    });
    (format!("https://127.0.0.1:{}/hook", addr.port()), ca_file)
}

/// Push endpoints that hang, reset every connection, answer byte by byte,
/// or present a certificate of a CA the subscription does not trust cost
/// their own deliveries only: a good endpoint beside them gets every
/// notice, none of theirs is marked delivered, the gateway stays ready and
/// stops promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_push_endpoints_harm_only_their_own_deliveries() {
    use crate::notices::{push_sub, FIN_SECRET};
    let mut env = Env::new();
    env.config.delivery.request_timeout_secs = 2;
    env.config.delivery.retry_schedule_secs = vec![1, 1, 1];
    let ca = env.pki.dir.join("ca.pem");
    let good = crate::receiver::Receiver::start(env.root.path(), "good", &ca, 0).await;
    let other = crate::receiver::Receiver::start(env.root.path(), "other", &ca, 0).await;
    // Hangs: accepts and never reads or answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hang_addr = hang.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = hang.accept().await {
            held.push(tcp);
        }
    });
    // Resets: every connection closed at once with RST.
    let reset = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let reset_addr = reset.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = reset.accept().await {
            let _ = tcp.set_zero_linger();
            drop(tcp);
        }
    });
    let (dribble, dribble_ca) = dribbling_endpoint(env.root.path()).await;
    let hostile = |id: &str, agency: &str, endpoint: &str, ca_file: &std::path::Path| {
        format!(
            "[[subscription]]\nid = \"{id}\"\nagency = \"{agency}\"\nmode = \"push\"\nendpoint = \"{endpoint}\"\nca_file = \"{}\"\nsigning_secret = \"{FIN_SECRET}\"\nitems = [\"serious_dishonesty\"]\n\n",
            ca_file.display()
        )
    };
    let mut subs = push_sub(
        "good",
        "agency-finance",
        &good,
        FIN_SECRET,
        "items = [\"serious_dishonesty\"]",
    );
    subs.push_str(&hostile(
        "hang",
        "agency-land",
        &format!("https://127.0.0.1:{}/hook", hang_addr.port()),
        &good.ca_file,
    ));
    subs.push_str(&hostile(
        "reset",
        "agency-land",
        &format!("https://127.0.0.1:{}/hook", reset_addr.port()),
        &good.ca_file,
    ));
    subs.push_str(&hostile(
        "dribble",
        "agency-procurement",
        &dribble,
        &dribble_ca,
    ));
    // The endpoint is real, its certificate from a CA this subscription
    // does not trust.
    subs.push_str(&hostile(
        "wrong-ca",
        "agency-procurement",
        &other.endpoint(),
        &good.ca_file,
    ));
    env.subscribe(&subs);

    let server = crate::support::Server::start(&env).await;
    let court = env.client(server.addr, "dept-court");
    let mut notices = HashSet::new();
    for n in 0..20 {
        let record = credgate::synth::record("serious_dishonesty", 70_000 + n, "general");
        let resp = court
            .post_json(
                "/v1/records",
                &serde_json::json!({"item": "serious_dishonesty", "records": [record]}),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        notices.extend(
            resp.json()["results"][0]["notice_id"]
                .as_str()
                .map(str::to_owned),
        );
    }
    assert_eq!(notices.len(), 20);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got: HashSet<String> = good.accepted().into_iter().map(|r| r.id).collect();
        if notices.is_subset(&got) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the good endpoint got {} of 20 next to the hostile ones",
            notices.intersection(&got).count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        other.accepted().is_empty(),
        "a push went to an untrusted certificate"
    );
    let (status, _) = crate::support::ops_get(server.ops, "/readyz")
        .await
        .expect("readyz");
    assert_eq!(status, 200);
    let stop = std::time::Instant::now();
    server.stop().await;
    assert!(
        stop.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        stop.elapsed()
    );
    let delivered = env.sql_texts(
        "SELECT subscription FROM deliveries WHERE state = 'delivered' AND subscription IN ('hang', 'reset', 'dribble', 'wrong-ca')",
    );
    assert!(
        delivered.is_empty(),
        "hostile deliveries marked delivered: {delivered:?}"
    );
    let good_delivered = env
        .sql_texts("SELECT id FROM deliveries WHERE state = 'delivered' AND subscription = 'good'");
    assert_eq!(good_delivered.len(), 20);
}
