//! `credgate store migrate`: an SQLite database of a running exchange
//! moves to PostgreSQL and the exchange carries on there.

use serde_json::json;

use crate::admin::{activate_penalty_with_field, assert_v2_accepts_the_field};
use crate::support::{credgate_cli, Env, Server};
use credgate::config::StoreBackend;
use credgate::synth;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqlite_exchange_moves_to_postgres_with_its_streams_cursors_and_audit_chain() {
    // The environment's PostgreSQL database is the (empty) target; the
    // gateway first runs on SQLite.
    let mut env = Env::new();
    let target = env.config.store.url.take().expect("scratch database");
    env.config.store.backend = StoreBackend::Sqlite;
    env.subscribe("[[subscription]]\nid = \"proc-pull\"\nagency = \"agency-procurement\"\nmode = \"pull\"\nitems = [\"serious_dishonesty\"]\n");
    let server = Server::start(&env).await;
    let dept = env.client(server.addr, "dept-court");
    let mut notices = Vec::new();
    let mut records = Vec::new();
    for n in 0..6 {
        let r = dept
            .post_json("/v1/records", &json!({"item": "serious_dishonesty", "records": [synth::record("serious_dishonesty", n, "serious")]}))
            .await
            .json();
        notices.push(
            r["results"][0]["notice_id"]
                .as_str()
                .expect("notice")
                .to_owned(),
        );
        records.push(
            r["results"][0]["record_id"]
                .as_str()
                .expect("record")
                .to_owned(),
        );
    }
    let agency = env.client(server.addr, "agency-procurement");
    // The agency reads three and acknowledges them.
    let page = agency.get("/v1/notices?limit=3").await.json();
    let ack = agency
        .post_json("/v1/notices/ack", &json!({"cursor": page["next_cursor"]}))
        .await;
    assert_eq!(ack.status, 200);
    let first = page["notices"][0]["notice_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let fb = json!({"measure": "restrict_government_procurement", "outcome": "applied", "date": "2026-11-20"});
    let resp = agency
        .post_json(&format!("/v1/notices/{first}/feedback"), &fb)
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let revoked = dept
        .post_json(
            &format!("/v1/records/{}/revocation", records[5]),
            &json!({"reason": "repaired"}),
        )
        .await;
    assert_eq!(
        revoked.status,
        200,
        "{}",
        String::from_utf8_lossy(&revoked.body)
    );
    activate_penalty_with_field(&env.client(server.addr, "admin-credit-office")).await;
    server.stop().await;

    let config = env.root.path().join("sqlite.toml");
    std::fs::write(&config, toml::to_string(&env.config).expect("toml")).expect("write");
    let from = format!("sqlite:{}", env.db().display());
    let config_arg = config.to_str().expect("path");
    let (code, out) = credgate_cli(&[
        "store", "migrate", "--from", &from, "--to", &target, "--config", config_arg,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit log intact on the target"), "{out}");
    assert!(
        out.contains("deliveries: 7 row(s)"),
        "6 notices and one lift: {out}"
    );
    // Into a database that is no longer empty: refused, nothing changed.
    let (code, out) = credgate_cli(&[
        "store", "migrate", "--from", &from, "--to", &target, "--config", config_arg,
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("empty database"), "{out}");

    // The exchange carries on on PostgreSQL.
    env.config.store.backend = StoreBackend::Postgres;
    env.config.store.url = Some(target);
    let server = Server::start(&env).await;
    let agency = env.client(server.addr, "agency-procurement");
    // Without a cursor: after the acknowledged three, the rest and the lift.
    let rest = agency.get("/v1/notices?limit=100").await.json();
    let rest_ids: Vec<&str> = rest["notices"]
        .as_array()
        .expect("notices")
        .iter()
        .map(|n| n["notice_id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        &rest_ids[..3],
        &notices[3..].iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    assert_eq!(rest["notices"][3]["type"], "lift");
    // An integer cursor of the old format still means the same place.
    let old = agency.get("/v1/notices?after=0&limit=100").await.json();
    assert_eq!(old["notices"].as_array().expect("notices").len(), 7);
    // Records, the new catalog version and the feedback came along.
    let dept = env.client(server.addr, "dept-court");
    let r = dept.get(&format!("/v1/records/{}", records[0])).await;
    assert_eq!(r.status, 200);
    assert_v2_accepts_the_field(&env.client(server.addr, "dept-market"), 1).await;
    let fb = json!({"measure": "restrict_government_procurement", "outcome": "pending"});
    let again = agency
        .post_json(&format!("/v1/notices/{first}/feedback"), &fb)
        .await;
    assert_eq!(again.status, 200, "the agency still received the notice");
    // The stream continues where it ended.
    let r = dept
        .post_json("/v1/records", &json!({"item": "serious_dishonesty", "records": [synth::record("serious_dishonesty", 50, "serious")]}))
        .await
        .json();
    let newest = r["results"][0]["notice_id"]
        .as_str()
        .expect("notice")
        .to_owned();
    let after = agency
        .get(&format!(
            "/v1/notices?after={}",
            rest["next_cursor"].as_str().expect("cursor")
        ))
        .await
        .json();
    assert_eq!(after["notices"][0]["notice_id"], newest.as_str());
    server.stop().await;
    let pg_config = env.root.path().join("pg.toml");
    std::fs::write(&pg_config, toml::to_string(&env.config).expect("toml")).expect("write");
    let (code, out) = credgate_cli(&[
        "audit",
        "verify",
        "--config",
        pg_config.to_str().expect("path"),
    ]);
    assert_eq!(code, 0, "{out}");
}
