//! High availability on PostgreSQL: several `signet serve` replicas, one token, one database,
//! one evidence log. Each test starts its own PostgreSQL (tests/common/pg.rs).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hyper::Method;
use serde_json::Value;

use common::pg::Postgres;
use common::*;

/// Point a development configuration at a PostgreSQL database.
fn with_postgres(config: String, url: &str) -> String {
    format!("{config}\n[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n")
}

/// A development installation (made with the file backend, as `signet dev init` does), moved
/// into database `db` with `signet storage migrate`.
fn init_postgres(pg: &Postgres, db: &str) -> Signet {
    let url = pg.database(db);
    let s = Signet::init(Init {
        edit: Some(Box::new(move |c| with_postgres(c, &url))),
        ..Default::default()
    });
    let from = s.audit_dir();
    let report = cli_json(
        &s,
        &["storage", "migrate", "--from", from.to_str().unwrap()],
    );
    assert_eq!(report["ok"], true, "{report}");
    s
}

/// `signet --json --config CONFIG ARGS...`, which must succeed; its JSON output.
fn cli_json(s: &Signet, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("--json")
        .arg("--config")
        .arg(s.config())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "signet {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The service logs of several replicas, for a failure message.
fn logs(replicas: &[&Signet]) -> String {
    replicas
        .iter()
        .map(|s| format!("--- {} ---\n{}", s.name, s.log()))
        .collect()
}

/// The latest checkpoint as served by `s`, once it covers `min_size` entries.
async fn checkpoint(s: &Signet, min_size: u64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, v) = s
            .call("auditor", Method::GET, "/v1/audit/checkpoint", None, &[])
            .await;
        if v["tree_size"].as_u64().unwrap_or(0) >= min_size && v["checkpoint"].is_string() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint covering {min_size} entries: {v}\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The whole log, exported through the configured backend into DIR and read back.
fn exported_entries(s: &Signet, dir: &Path) -> Vec<Value> {
    let _ = std::fs::remove_dir_all(dir);
    cli_json(s, &["audit", "export", dir.to_str().unwrap()]);
    std::fs::read_to_string(dir.join("entries.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every acknowledged signature is in the log exactly once, at its receipt's index, and the
/// indexes are contiguous.
fn assert_exactly_once(entries: &[Value], acknowledged: &[Value]) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["index"], i as u64, "indexes are contiguous");
    }
    let mut by_signature: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in entries.iter().filter(|e| e["event"] == "signature") {
        by_signature
            .entry(e["signature"].as_str().unwrap())
            .or_default()
            .push(e["index"].as_u64().unwrap());
    }
    for r in acknowledged {
        let index = r["receipt"]["index"].as_u64().unwrap();
        let at = by_signature
            .get(r["signature"].as_str().unwrap())
            .unwrap_or_else(|| panic!("acknowledged signature missing from the log: {r}"));
        assert_eq!(at, &vec![index], "recorded once, at its receipt's index");
    }
    // No request failed, so nothing but the acknowledged signatures was recorded.
    let signatures = entries.iter().filter(|e| e["event"] == "signature").count();
    assert_eq!(
        signatures,
        acknowledged.len(),
        "no signature recorded twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_log_under_concurrent_load() {
    let pg = Postgres::start();
    let mut a = init_postgres(&pg, "three");
    a.start();
    let mut b = a.replica("b");
    b.start();
    let mut c = a.replica("c");
    c.start();
    let loads = [a.load(3), b.load(3), c.load(3)];
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut acknowledged = Vec::new();
    for l in loads {
        let r = l.finish().await;
        assert!(r.failed.is_empty(), "failures: {:?}", r.failed);
        assert!(!r.ok.is_empty(), "every replica signed");
        acknowledged.extend(r.ok);
    }
    let total = acknowledged.len() as u64;
    assert!(total > 30, "only {total} signatures");

    // One log: every replica serves the same checkpoint, and proofs for entries signed on
    // another replica, which verify offline against it.
    let cp = checkpoint(&c, total).await;
    let size = cp["tree_size"].as_u64().unwrap();
    let work = a.dir.join("ha-receipts");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(
        work.join("log-key.pem"),
        cp["log_public_key"].as_str().unwrap(),
    )
    .unwrap();
    for (n, r) in acknowledged
        .iter()
        .step_by(acknowledged.len() / 5)
        .enumerate()
    {
        let index = r["receipt"]["index"].as_u64().unwrap();
        assert!(index < size);
        let (status, _, e) = b
            .call(
                "auditor",
                Method::GET,
                &format!("/v1/audit/entries/{index}"),
                None,
                &[],
            )
            .await;
        assert_eq!(status, 200, "{e}");
        assert_eq!(e["entry"]["signature"], r["signature"]);
        std::fs::write(work.join(format!("r{n}.json")), r.to_string()).unwrap();
        std::fs::write(
            work.join(format!("p{n}.proof")),
            e["proof"].as_str().unwrap(),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args(["receipt", "verify", "--receipt"])
            .arg(work.join(format!("r{n}.json")))
            .arg("--proof")
            .arg(work.join(format!("p{n}.proof")))
            .arg("--log-key")
            .arg(work.join("log-key.pem"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for s in [&a, &b, &c] {
        let (_, _, v) = s
            .call("auditor", Method::GET, "/v1/audit/checkpoint", None, &[])
            .await;
        assert!(v["tree_size"].as_u64().unwrap() >= size);
    }
    // Exactly one replica signs checkpoints.
    let mut leaders = 0.0;
    for s in [&a, &b, &c] {
        leaders += s.metric("signet_storage_checkpoint_leader").await;
        assert_eq!(s.metric("signet_storage_up").await, 1.0);
    }
    assert_eq!(leaders, 1.0, "exactly one checkpoint leader");

    let entries = exported_entries(&a, &a.dir.join("export"));
    assert_exactly_once(&entries, &acknowledged);
    let report = cli_json(&a, &["audit", "verify"]);
    assert_eq!(report["ok"], true);
    assert_eq!(
        report["report"]["entries"].as_u64().unwrap(),
        entries.len() as u64
    );
    // The offline copy verifies with the file-format verifier too.
    let out = Command::new(BIN)
        .args(["--json", "audit", "verify"])
        .arg(a.dir.join("export"))
        .arg("--key")
        .arg(work.join("log-key.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The sequencing state in the database agrees with the log.
    assert_eq!(
        pg.psql("three", "SELECT next_index FROM signet_log"),
        entries.len().to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_is_signed_once_across_replicas() {
    let pg = Postgres::start();
    let mut a = init_postgres(&pg, "idem");
    a.start();
    let mut b = a.replica("b");
    b.start();
    let mut c = a.replica("c");
    c.start();

    // The same key sent to three replicas at once, 20 times over: one signature each.
    for round in 0..20 {
        let key = format!("idem-{round}");
        let body = sign_body("payroll-esign", format!("doc {round}").as_bytes());
        let mut calls = Vec::new();
        for s in [&a, &b, &c] {
            let (tls, api, body, key) = (s.tls("payroll-app"), s.api, body.clone(), key.clone());
            calls.push(tokio::spawn(async move {
                let mut conn = signet::client::Connection::connect(&tls, api, "localhost")
                    .await
                    .unwrap();
                let (st, _, bytes) = conn
                    .request(
                        Method::POST,
                        "/v1/sign",
                        &[("idempotency-key", key.as_str())],
                        Some(body.to_string().into_bytes()),
                    )
                    .await
                    .unwrap();
                (st.as_u16(), bytes)
            }));
        }
        let mut answers = Vec::new();
        for call in calls {
            let (st, bytes) = call.await.unwrap();
            assert_eq!(
                st,
                200,
                "{}\n{}",
                String::from_utf8_lossy(&bytes),
                logs(&[&a, &b, &c])
            );
            answers.push(bytes);
        }
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "the three replicas answer byte for byte the same"
        );
    }
    // A different request under a used key: 409, on any replica.
    let (st, _, v) = b
        .call(
            "payroll-app",
            Method::POST,
            "/v1/sign",
            Some(sign_body("payroll-esign", b"something else")),
            &[("idempotency-key", "idem-3")],
        )
        .await;
    assert_eq!(st, 409, "{v}");

    // A replica killed; a retry on another one gets the recorded answer.
    let (st, _, first) = a
        .call(
            "payroll-app",
            Method::POST,
            "/v1/sign",
            Some(sign_body("payroll-esign", b"before the crash")),
            &[("idempotency-key", "crash-1")],
        )
        .await;
    assert_eq!(st, 200);
    a.kill9();
    let (st, _, again) = c
        .call(
            "payroll-app",
            Method::POST,
            "/v1/sign",
            Some(sign_body("payroll-esign", b"before the crash")),
            &[("idempotency-key", "crash-1")],
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(first, again);

    let entries = exported_entries(&b, &b.dir.join("export-idem"));
    let signatures = entries.iter().filter(|e| e["event"] == "signature").count();
    assert_eq!(
        signatures, 21,
        "20 rounds and one crash test, each signed once"
    );
}
