//! High availability on PostgreSQL: several `signet serve` replicas, one token, one database,
//! one evidence log. Each test starts its own PostgreSQL (tests/common/pg.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hyper::Method;
use serde_json::Value;

use common::pg::{Postgres, with_postgres};
use common::*;

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

/// `POST /v1/sign` as `payroll-app` with an `Idempotency-Key`: status and body.
async fn sign_keyed(s: &Signet, data: &[u8], key: &str) -> (u16, Value) {
    let (st, _, v) = s
        .call(
            "payroll-app",
            Method::POST,
            "/v1/sign",
            Some(sign_body("payroll-esign", data)),
            &[("idempotency-key", key)],
        )
        .await;
    (st, v)
}

/// A migrated installation in database `db`, started as three replicas `a`, `b`, `c`.
fn three_replicas(pg: &Postgres, db: &str) -> (Signet, Signet, Signet) {
    let mut a = init_postgres(pg, db);
    a.start();
    let mut b = a.replica("b");
    b.start();
    let mut c = a.replica("c");
    c.start();
    (a, b, c)
}

/// The service logs of several replicas, for a failure message.
fn logs(replicas: &[&Signet]) -> String {
    replicas
        .iter()
        .map(|s| format!("--- {} ---\n{}", s.name, s.log()))
        .collect()
}

/// After a database outage: each replica signs again (within 30 s, without a restart), the
/// load saw only 503 `storage-unavailable`, and nothing acknowledged was lost.
async fn recovered_and_nothing_lost(replicas: &[&Signet], loads: Vec<Load>, what: &str) {
    for s in replicas {
        s.eventually(what, Duration::from_secs(30), || async {
            s.sign("payroll-app", sign_body("payroll-esign", what.as_bytes()))
                .await
                .0
                == 200
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut acknowledged = Vec::new();
    for l in loads {
        let r = l.finish().await;
        assert!(
            r.failed.iter().all(|f| f.contains("storage-unavailable")),
            "only 503 storage-unavailable while the database was away: {:?}",
            r.failed
        );
        acknowledged.extend(r.ok);
    }
    assert!(!acknowledged.is_empty());
    let s = replicas[0];
    let entries = exported_entries(s, &s.dir.join(format!("export-{}", what.replace(' ', "-"))));
    assert_acknowledged_recorded(&entries, &acknowledged);
    assert_eq!(cli_json(s, &["audit", "verify"])["ok"], true);
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

/// The indexes are contiguous, no signature is recorded twice, and every acknowledged
/// signature is in the log at its receipt's index.
fn assert_acknowledged_recorded(entries: &[Value], acknowledged: &[Value]) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["index"], i as u64, "indexes are contiguous");
    }
    let mut recorded: BTreeMap<&str, u64> = BTreeMap::new();
    for e in entries.iter().filter(|e| e["event"] == "signature") {
        let first = recorded.insert(
            e["signature"].as_str().unwrap(),
            e["index"].as_u64().unwrap(),
        );
        assert!(first.is_none(), "recorded twice: {e}");
    }
    for r in acknowledged {
        assert_eq!(
            recorded.get(r["signature"].as_str().unwrap()),
            Some(&r["receipt"]["index"].as_u64().unwrap()),
            "acknowledged signature lost: {r}"
        );
    }
}

/// [`assert_acknowledged_recorded`], and no request failed, so nothing else was signed.
fn assert_exactly_once(entries: &[Value], acknowledged: &[Value]) {
    assert_acknowledged_recorded(entries, acknowledged);
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
    let (a, b, c) = three_replicas(&pg, "three");
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
    let last = acknowledged
        .iter()
        .map(|r| r["receipt"]["index"].as_u64().unwrap())
        .max()
        .unwrap();
    let cp = c.checkpoint_covering(last + 1).await;
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
        let (status, e) = b
            .get("auditor", &format!("/v1/audit/entries/{index}"))
            .await;
        assert_eq!(status, 200, "{e}");
        assert_eq!(e["entry"]["signature"], r["signature"]);
        std::fs::write(work.join(format!("r{n}.json")), r.to_string()).unwrap();
        std::fs::write(
            work.join(format!("p{n}.proof")),
            e["proof"].as_str().unwrap(),
        )
        .unwrap();
        run_ok(
            Command::new(BIN)
                .args(["receipt", "verify", "--receipt"])
                .arg(work.join(format!("r{n}.json")))
                .arg("--proof")
                .arg(work.join(format!("p{n}.proof")))
                .arg("--log-key")
                .arg(work.join("log-key.pem"))
                .arg("--ca")
                .arg(a.dir.join("hsm-ca.pem")),
        );
    }
    for s in [&a, &b, &c] {
        let (_, v) = s.get("auditor", "/v1/audit/checkpoint").await;
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
    audit_verify_dir(&a.dir.join("export"), &work.join("log-key.pem"));
    // The sequencing state in the database agrees with the log.
    assert_eq!(
        pg.psql("three", "SELECT next_index FROM signet_log"),
        entries.len().to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_is_signed_once_across_replicas() {
    let pg = Postgres::start();
    let (mut a, b, c) = three_replicas(&pg, "idem");

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
    let (st, v) = sign_keyed(&b, b"something else", "idem-3").await;
    assert_eq!(st, 409, "{v}");

    // A replica killed; a retry on another one gets the recorded answer.
    let (st, first) = sign_keyed(&a, b"before the crash", "crash-1").await;
    assert_eq!(st, 200);
    a.kill9();
    let (st, again) = sign_keyed(&c, b"before the crash", "crash-1").await;
    assert_eq!(st, 200);
    assert_eq!(first, again);

    let entries = exported_entries(&b, &b.dir.join("export-idem"));
    let signatures = entries.iter().filter(|e| e["event"] == "signature").count();
    assert_eq!(
        signatures, 21,
        "20 rounds and one crash test, each signed once"
    );
}

/// Wait until exactly one of `replicas` leads; its position.
async fn leader(replicas: &[&Signet]) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut found = Vec::new();
        for (i, s) in replicas.iter().enumerate() {
            if s.metric("signet_storage_checkpoint_leader").await == 1.0 {
                found.push(i);
            }
        }
        if found.len() == 1 {
            return found[0];
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leaders: {found:?}\n{}",
            logs(replicas)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_replicas_and_the_leader_under_load_loses_nothing_and_leadership_moves() {
    let pg = Postgres::start();
    let (a, b, c) = three_replicas(&pg, "kill");
    let mut replicas = [a, b, c];
    let first = leader(&replicas.iter().collect::<Vec<_>>()).await;
    let loads: Vec<Load> = replicas.iter().map(|s| s.load(2)).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The leader dies mid-load.
    replicas[first].kill9();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    let second = leader(&survivors.iter().map(|i| &replicas[*i]).collect::<Vec<_>>()).await;
    let new_leader = survivors[second];
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // And a follower too.
    let other = survivors[1 - second];
    replicas[other].kill9();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut acknowledged = Vec::new();
    for (i, l) in loads.into_iter().enumerate() {
        let r = l.finish().await;
        if i == new_leader {
            assert!(
                r.failed.is_empty(),
                "the survivor kept serving: {:?}",
                r.failed
            );
        } else {
            // Only the connection to the killed process broke.
            assert!(
                r.failed.iter().all(|f| f.starts_with("connection")),
                "{:?}",
                r.failed
            );
        }
        acknowledged.extend(r.ok);
    }
    let survivor = &replicas[new_leader];
    // The new leader signs checkpoints covering everything acknowledged.
    let max_index = acknowledged
        .iter()
        .map(|r| r["receipt"]["index"].as_u64().unwrap())
        .max()
        .unwrap();
    survivor.checkpoint_covering(max_index + 1).await;
    let entries = exported_entries(survivor, &survivor.dir.join("export-kill"));
    assert_acknowledged_recorded(&entries, &acknowledged);
    assert_eq!(cli_json(survivor, &["audit", "verify"])["ok"], true);
    // A killed replica comes back and joins.
    replicas[first].start();
    let (st, _) = replicas[first]
        .sign("payroll-app", sign_body("payroll-esign", b"after restart"))
        .await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_crash_under_load_gives_503s_then_recovers_without_restart() {
    let pg = Postgres::start();
    let mut a = init_postgres(&pg, "crash");
    a.start();
    let mut b = a.replica("b");
    b.start();
    let loads = [a.load(2), b.load(2)];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.kill9();
    a.eventually(
        "readyz red while the database is down",
        Duration::from_secs(20),
        || async { a.readyz().await == 503 },
    )
    .await;
    let (st, h, v) = b
        .call(
            "payroll-app",
            Method::POST,
            "/v1/sign",
            Some(sign_body("payroll-esign", b"while down")),
            &[],
        )
        .await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["type"], "urn:signet:problem:storage-unavailable");
    assert!(h.contains_key("retry-after"));
    assert_eq!(a.metric("signet_storage_up").await, 0.0);
    pg.restart();
    recovered_and_nothing_lost(&[&a, &b], loads.into(), "after the database is back").await;
    for s in [&a, &b] {
        s.eventually("readyz green again", Duration::from_secs(10), || async {
            s.readyz().await == 200
        })
        .await;
        assert_eq!(s.metric("signet_storage_up").await, 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_to_a_synchronous_standby_loses_nothing_acknowledged() {
    let primary = Postgres::start();
    let mut a = init_postgres(&primary, "failover");
    let standby = primary.standby();
    primary.psql(
        "postgres",
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
    );
    primary.psql("postgres", "SELECT pg_reload_conf()");
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/failover?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let single = primary.url("failover");
    a.edit_config(|c| c.swap(&single, &url));
    a.start();
    let mut b = a.replica("b");
    b.start();
    let loads = [a.load(2), b.load(2)];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = std::time::Instant::now();
    primary.kill9();
    standby.promote();
    recovered_and_nothing_lost(&[&a, &b], loads.into(), "on the promoted standby").await;
    eprintln!(
        "replicas signed on the promoted standby {:?} after the primary was killed",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_started_on_one_replica_switches_every_replica() {
    let pg = Postgres::start();
    let (a, b, c) = three_replicas(&pg, "rotation");
    let loads = [b.load(2), c.load(2)];
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (st, _, v) = a
        .call(
            "admin",
            Method::POST,
            "/v1/admin/rotations",
            Some(serde_json::json!({"tenant": "payroll", "reason": "ha rotation"})),
            &[],
        )
        .await;
    assert!((200..300).contains(&st), "{st} {v}");
    assert_eq!(v["step"], "completed", "{v}\n{}", logs(&[&a, &b, &c]));
    let activated = std::time::Instant::now();
    for s in [&b, &c] {
        s.eventually(
            "the other replicas sign with v2",
            Duration::from_secs(10),
            || async {
                let (st, v) = s
                    .sign("payroll-app", sign_body("payroll-esign", b"which key"))
                    .await;
                st == 200 && v["key_id"] == "payroll/v2"
            },
        )
        .await;
    }
    let switch = activated.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for l in loads {
        let r = l.finish().await;
        assert!(
            r.failed.is_empty(),
            "{:?}\n{}",
            r.failed,
            logs(&[&a, &b, &c])
        );
        for keys in r.keys_per_worker {
            assert!(
                keys == ["payroll/v1", "payroll/v2"] || keys == ["payroll/v2"],
                "never v1 after v2 on one connection: {keys:?}"
            );
        }
    }
    // In the log: no payroll/v1 signature after the entry that activated v2.
    let entries = exported_entries(&a, &a.dir.join("export-rotation"));
    let activation = entries
        .iter()
        .position(|e| e["event"] == "key_activated" && e["key_id"] == "payroll/v2")
        .expect("activation entry");
    assert!(
        entries[activation..]
            .iter()
            .all(|e| !(e["event"] == "signature" && e["key_id"] == "payroll/v1")),
        "a retired version signed after its retirement entry"
    );
    assert!(
        entries[..activation]
            .iter()
            .any(|e| e["key_id"] == "payroll/v1")
    );
    assert_eq!(cli_json(&a, &["audit", "verify"])["ok"], true);
    // The rotation ran once: one rotation_started, one key_created for v2.
    let started = entries
        .iter()
        .filter(|e| e["event"] == "rotation_started" && e["reason"] == "ha rotation")
        .count();
    let created = entries
        .iter()
        .filter(|e| e["event"] == "key_created" && e["key_id"] == "payroll/v2")
        .count();
    assert_eq!((started, created), (1, 1));
    eprintln!("replicas switched to v2 within {switch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_on_one_replica_stops_the_version_on_every_replica() {
    let pg = Postgres::start();
    let (a, b, c) = three_replicas(&pg, "revocation");
    for s in [&a, &b, &c] {
        s.signs("payroll-app", "payroll-esign", b"v1 everywhere")
            .await;
    }
    // Revoked on a, without a rotation: nobody may sign for payroll any more.
    let (st, _, v) = a
        .call(
            "admin",
            Method::POST,
            "/v1/admin/revocations",
            Some(serde_json::json!({"key_id": "payroll/v1", "reason": "key-compromise"})),
            &[],
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let revoked = std::time::Instant::now();
    // At once on every replica: the shared log refuses a v1 signature even before a replica's
    // registry has caught up, so no answer is ever signed with v1.
    for s in [&a, &b, &c] {
        let (st, v) = s
            .sign("payroll-app", sign_body("payroll-esign", b"right after"))
            .await;
        assert_eq!(st, 503, "{} signed: {v}", s.name);
        assert_eq!(v["type"], "urn:signet:problem:no-active-key", "{v}");
    }
    // Within seconds every replica's registry says revoked.
    for s in [&b, &c] {
        s.eventually(
            "the replica knows the revocation",
            Duration::from_secs(5),
            || async {
                let (_, keys) = s.get("admin", "/v1/keys/payroll").await;
                keys["keys"][0]["state"] == "revoked"
            },
        )
        .await;
    }
    eprintln!(
        "replicas learned the revocation within {:?}",
        revoked.elapsed()
    );
    // A rotation started on b gives every replica the new version.
    cli_json(
        &b,
        &[
            "rotate",
            "start",
            "--tenant",
            "payroll",
            "--reason",
            "after compromise",
        ],
    );
    for s in [&a, &b, &c] {
        s.eventually(
            "the replica signs with v2",
            Duration::from_secs(10),
            || async {
                let (st, v) = s
                    .sign("payroll-app", sign_body("payroll-esign", b"after"))
                    .await;
                st == 200 && v["key_id"] == "payroll/v2"
            },
        )
        .await;
    }
    let entries = exported_entries(&a, &a.dir.join("export-revocation"));
    let at = entries
        .iter()
        .position(|e| e["event"] == "key_revoked" && e["key_id"] == "payroll/v1")
        .expect("key_revoked entry");
    assert!(
        entries[at..]
            .iter()
            .all(|e| !(e["event"] == "signature" && e["key_id"] == "payroll/v1")),
        "a revoked version signed after its key_revoked entry"
    );
    assert_eq!(
        entries[..at]
            .iter()
            .filter(|e| e["event"] == "signature" && e["key_id"] == "payroll/v1")
            .count(),
        3
    );
    assert_eq!(cli_json(&a, &["audit", "verify"])["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_migrate_keeps_the_roots_receipts_and_idempotency_of_a_file_log() {
    // A file-backend installation with history.
    let mut s = Signet::init(Init::default());
    s.start();
    let mut responses = Vec::new();
    for i in 0..10 {
        let (st, r) = s
            .sign(
                "payroll-app",
                sign_body("payroll-esign", format!("old {i}").as_bytes()),
            )
            .await;
        assert_eq!(st, 200);
        responses.push(r);
    }
    let (st, idem) = sign_keyed(&s, b"keyed", "before-migration").await;
    assert_eq!(st, 200);
    let old_cp = s.checkpoint_covering(19).await;
    let old_size = old_cp["tree_size"].as_u64().unwrap();
    let index = responses[4]["receipt"]["index"].as_u64().unwrap();
    let (_, old_proof) = s
        .get("auditor", &format!("/v1/audit/entries/{index}"))
        .await;
    s.stop();

    let pg = Postgres::start();
    let url = pg.database("migrated");
    s.edit_config(|c| with_postgres(c, &url));
    let report = cli_json(
        &s,
        &[
            "storage",
            "migrate",
            "--from",
            s.audit_dir().to_str().unwrap(),
        ],
    );
    assert_eq!(report["report"]["tree_size"], old_size);
    let old_root = old_cp["checkpoint"]
        .as_str()
        .unwrap()
        .lines()
        .nth(2)
        .unwrap();
    assert_eq!(
        report["report"]["root"], old_root,
        "same root as the file log"
    );
    // Refused a second time: the database holds a log now.
    let out = Command::new(BIN)
        .args([
            "--config",
            s.config().to_str().unwrap(),
            "storage",
            "migrate",
            "--from",
        ])
        .arg(s.audit_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds an evidence log"));

    s.start();
    // The old checkpoint is still the log's, the old proof is served identically.
    let (_, proof) = s
        .get("auditor", &format!("/v1/audit/entries/{index}"))
        .await;
    assert_eq!(proof["proof"], old_proof["proof"]);
    // The log grows from where the file log ended, consistent with the old checkpoint.
    let (st, r) = s
        .sign("payroll-app", sign_body("payroll-esign", b"new"))
        .await;
    assert_eq!(st, 200);
    let new_index = r["receipt"]["index"].as_u64().unwrap();
    let new_cp = s.checkpoint_covering(new_index + 1).await;
    let (st, c) = s
        .get(
            "auditor",
            &format!(
                "/v1/audit/consistency?from={old_size}&to={}",
                new_cp["tree_size"].as_u64().unwrap()
            ),
        )
        .await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["root_from"], old_root);
    // An idempotent request from before the migration replays from the database.
    let (st, again) = sign_keyed(&s, b"keyed", "before-migration").await;
    assert_eq!(st, 200);
    assert_eq!(again, idem);
    // Old receipts verify offline against the new log's latest checkpoint.
    let work = s.dir.join("migrated-receipts");
    std::fs::create_dir_all(&work).unwrap();
    let (_, latest_proof) = s
        .get("auditor", &format!("/v1/audit/entries/{index}"))
        .await;
    std::fs::write(work.join("r.json"), responses[4].to_string()).unwrap();
    std::fs::write(
        work.join("p.proof"),
        latest_proof["proof"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(
        work.join("key.pem"),
        new_cp["log_public_key"].as_str().unwrap(),
    )
    .unwrap();
    run_ok(
        Command::new(BIN)
            .args(["receipt", "verify", "--receipt"])
            .arg(work.join("r.json"))
            .arg("--proof")
            .arg(work.join("p.proof"))
            .arg("--log-key")
            .arg(work.join("key.pem"))
            .arg("--ca")
            .arg(s.dir.join("hsm-ca.pem")),
    );
    assert_eq!(cli_json(&s, &["audit", "verify"])["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tree_lives_in_database_tiles_that_an_independent_implementation_verifies() {
    use base64::Engine;
    let pg = Postgres::start();
    let mut a = init_postgres(&pg, "tiles");
    a.start();
    // More than two full tiles of leaves, through batches.
    for b in 0..6 {
        let items: Vec<Value> = (0..100)
            .map(|i| sign_body("payroll-esign", format!("batch {b} item {i}").as_bytes()))
            .collect();
        let (st, r) = a.sign_batch("payroll-app", items).await;
        assert_eq!(st, 200, "{r}");
    }
    let n: u64 = pg
        .psql("tiles", "SELECT next_index FROM signet_log")
        .parse()
        .unwrap();
    assert!(n > 600);
    a.checkpoint_covering(n).await;
    let full_tiles: u64 = pg
        .psql("tiles", "SELECT count(*) FROM signet_tiles WHERE level = 0")
        .parse()
        .unwrap();
    assert_eq!(full_tiles, n / 256, "every full level-0 tile is stored");
    // A replica started now reads only the right edge and the tiles it needs.
    a.stop();
    let mut b = a.replica("b");
    b.start();
    let (st, note) = get_bytes(&b, "payroll-app", "/v1/audit/tlog/checkpoint").await;
    assert_eq!(st, 200);
    let note = String::from_utf8(note).unwrap();
    let lines: Vec<&str> = note.lines().collect();
    let size: u64 = lines[1].parse().unwrap();
    assert_eq!(size, n);
    let root = tlog_tiles::Hash(
        base64::engine::general_purpose::STANDARD
            .decode(lines[2])
            .unwrap()
            .try_into()
            .unwrap(),
    );
    let mut fetched = std::collections::HashMap::new();
    for t in tlog_tiles::Tile::new_tiles(8, 0, size) {
        let path = t.path().replacen("tile/8/", "", 1);
        let (st, body) = get_bytes(&b, "payroll-app", &format!("/v1/audit/tlog/tile/{path}")).await;
        assert_eq!(st, 200, "{path}");
        fetched.insert(path, body);
    }
    assert!(fetched.keys().any(|p| p.starts_with("1/")));
    let reader = FetchedTiles(fetched);
    let hashes = tlog_tiles::TileHashReader::new(size, root, &reader);
    assert_eq!(
        tlog_tiles::tree_hash(size, &hashes).unwrap(),
        root,
        "the stored tiles give the signed root"
    );
    // Inclusion proofs across tile boundaries, checked by the independent code.
    let entries = exported_entries(&b, &b.dir.join("export-tiles"));
    for index in [0u64, 255, 256, 511, 512, n - 1] {
        let (st, e) = b
            .get("auditor", &format!("/v1/audit/entries/{index}"))
            .await;
        assert_eq!(st, 200, "{e}");
        let canonical = serde_json_canonicalizer::to_vec(&entries[index as usize]).unwrap();
        let leaf = tlog_tiles::record_hash(&canonical);
        let proof = tlog_tiles::prove_record(size, index, &hashes).unwrap();
        tlog_tiles::check_record(&proof, size, root, index, leaf).unwrap();
        let served: Vec<String> = strings(&e["inclusion_proof"]);
        let independent: Vec<String> = proof
            .iter()
            .map(|h| base64::engine::general_purpose::STANDARD.encode(h.0))
            .collect();
        assert_eq!(served, independent, "entry {index}");
    }
    // An entry rewritten in the database (by someone able to switch the append-only trigger
    // off) no longer matches its leaf in the tiles: refused, and `audit verify` names it.
    pg.psql(
        "tiles",
        "SET session_replication_role = replica; \
         UPDATE signet_entries SET body = convert_to(replace(convert_from(body, 'UTF8'), 'payroll-esign', 'payroll-esigX'), 'UTF8') WHERE idx = 300",
    );
    let (st, e) = b.get("auditor", "/v1/audit/entries/300").await;
    assert_eq!(st, 500, "{e}");
    assert_eq!(e["type"], "urn:signet:problem:evidence-inconsistent", "{e}");
    // Every read path refuses it: the tenant listing through it, and its entry bundle.
    let (st, p) = b
        .get(
            "auditor",
            "/v1/audit/entries?tenant=payroll&cursor=290&limit=50",
        )
        .await;
    assert_eq!(st, 500, "{p}");
    assert_eq!(p["type"], "urn:signet:problem:evidence-inconsistent", "{p}");
    let (st, _) = get_bytes(&b, "auditor", "/v1/audit/tlog/tile/entries/001").await;
    assert_eq!(st, 500);
    let (st, _) = get_bytes(&b, "auditor", "/v1/audit/tlog/tile/entries/000").await;
    assert_eq!(st, 200, "a bundle without the rewritten entry is served");
    let out = Command::new(BIN)
        .args(["--config", b.config().to_str().unwrap(), "audit", "verify"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("entry 300"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reach_the_database_over_tls_verified_against_ca_file() {
    let pg = Postgres::start();
    let mut a = init_postgres(&pg, "tls");
    let ca = pg.enable_tls();
    // The same database by name, over TLS: sslmode from the URL is raised to "require".
    let plain = pg.url("tls");
    let named = format!("postgresql://postgres@localhost:{}/tls", pg.port);
    a.edit_config(|c| {
        c.swap(&plain, &named).swap(
            "backend = \"postgres\"",
            &format!("backend = \"postgres\"\nca_file = \"{}\"", ca.display()),
        )
    });
    a.start();
    let (st, r) = a
        .sign("payroll-app", sign_body("payroll-esign", b"over tls"))
        .await;
    assert_eq!(st, 200, "{r}");
    let ssl = pg.psql(
        "tls",
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'signet' AND s.ssl",
    );
    assert_ne!(ssl, "0", "Signet's sessions use TLS");
    a.stop();

    // Another CA: the server certificate does not verify, and start-up says so.
    let other = a.dir.join("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    openssl_ca(&other, "ca", "/CN=not the database CA");
    a.edit_config(|c| {
        c.swap(
            &ca.display().to_string(),
            &other.join("ca.pem").display().to_string(),
        )
    });
    let err = a.start_refused();
    assert!(
        err.contains("TLS handshake") && err.contains("UnknownIssuer"),
        "{err}"
    );
    // A URL that asks for TLS without ca_file is a configuration error, not a plaintext fallback.
    a.edit_config(|c| {
        let mut out = String::new();
        for line in c.lines() {
            if line.starts_with("ca_file = ") && line.contains("other-ca") {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        out.swap(&named, &format!("{named}?sslmode=require"))
    });
    let err = a.start_refused();
    assert!(err.contains("storage.ca_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_an_older_backup_is_refused_until_accepted() {
    let pg = Postgres::start();
    let mut a = init_postgres(&pg, "restore");
    a.start();
    let (st, _) = a
        .sign(
            "payroll-app",
            sign_body("payroll-esign", b"before the backup"),
        )
        .await;
    assert_eq!(st, 200);
    let size_then = a.checkpoint_covering(9).await["tree_size"]
        .as_u64()
        .unwrap();
    a.stop();
    // A backup taken now (the append-only triggers come back with it)...
    let dump = a.dir.join("backup.sql");
    pg.dump("restore", &dump);
    // ...then more signatures, checkpointed (the token's anchor moves on)...
    a.start();
    for i in 0..3 {
        let (st, _) = a
            .sign(
                "payroll-app",
                sign_body("payroll-esign", format!("after {i}").as_bytes()),
            )
            .await;
        assert_eq!(st, 200);
    }
    a.checkpoint_covering(size_then + 3).await;
    a.stop();
    // ...and the database is put back from the backup: Signet refuses it.
    pg.psql("postgres", "DROP DATABASE restore");
    pg.psql("postgres", "CREATE DATABASE restore");
    pg.restore("restore", &dump);
    let err = a.start_refused();
    assert!(
        err.contains("token's anchor covers") && err.contains("evidence-log-restore.md"),
        "{err}"
    );
    // The operator accepts it deliberately: evidenced, re-anchored, and Signet starts.
    let report = cli_json(
        &a,
        &[
            "audit",
            "accept-restore",
            "--reason",
            "restored the database from last night's backup",
        ],
    );
    assert_eq!(report["restored"], true, "{report}");
    a.start();
    let entries = exported_entries(&a, &a.dir.join("export-restore"));
    let restored = entries
        .iter()
        .find(|e| e["event"] == "log_restored")
        .expect("a log_restored entry");
    assert_eq!(
        restored["reason"],
        "restored the database from last night's backup"
    );
    let (st, _) = a
        .sign(
            "payroll-app",
            sign_body("payroll-esign", b"after the restore"),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(cli_json(&a, &["audit", "verify"])["ok"], true);
}
