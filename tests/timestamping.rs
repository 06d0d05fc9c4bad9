//! RFC 3161 timestamps of checkpoints from a local TSA (`openssl ts -reply` behind a small
//! HTTP server in this test): tokens are stored and verify with `openssl ts -verify`; while the
//! TSA is down signing continues, a metric moves, and tokens are filled in when it returns.
//! And evidence bundles: exported, verified offline (in a network namespace of their own),
//! explained, and every tampering refused with its reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// A TSA: a CA, a timestamping certificate and an `openssl ts` configuration in `dir`.
fn make_tsa(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    openssl_ca(dir, "tsa-ca", "/CN=Test TSA CA");
    openssl_issue(
        dir,
        "tsa",
        "/CN=Test TSA",
        &dir.join("tsa-ca.pem"),
        &dir.join("tsa-ca.key"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=critical,timeStamping\n",
    );
    std::fs::write(dir.join("tsaserial"), "01\n").unwrap();
    std::fs::write(
        dir.join("tsa.cnf"),
        "[tsa]\ndefault_tsa = t\n[t]\ndir = .\nserial = ./tsaserial\ncrypto_device = builtin\n\
         signer_cert = ./tsa.pem\ncerts = ./tsa-ca.pem\nsigner_key = ./tsa.key\nsigner_digest = sha256\n\
         default_policy = 1.2.3.4.1\nother_policies = 1.2.3.4.5\ndigests = sha256\naccuracy = secs:1\n\
         ordering = yes\ntsa_name = no\ness_cert_id_chain = no\ness_cert_id_alg = sha256\n",
    )
    .unwrap();
}

/// Serve the TSA on a free loopback port; answers 503 while `down` is set.
async fn serve_tsa(dir: PathBuf, down: Arc<AtomicBool>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (dir, down) = (dir.clone(), Arc::clone(&down));
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (dir, down) = (dir.clone(), Arc::clone(&down));
                        async move {
                            if down.load(Ordering::SeqCst) {
                                return Ok::<_, hyper::Error>(
                                    hyper::Response::builder()
                                        .status(503)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                );
                            }
                            let body = req.into_body().collect().await?.to_bytes();
                            let name = format!("q{}", rand::random::<u64>());
                            std::fs::write(dir.join(format!("{name}.tsq")), &body).unwrap();
                            run_ok(
                                std::process::Command::new("openssl")
                                    .args(["ts", "-reply", "-config", "tsa.cnf", "-queryfile"])
                                    .arg(format!("{name}.tsq"))
                                    .args(["-out", &format!("{name}.tsr")])
                                    .current_dir(&dir),
                            );
                            let resp = std::fs::read(dir.join(format!("{name}.tsr"))).unwrap();
                            Ok(hyper::Response::builder()
                                .header("content-type", "application/timestamp-reply")
                                .body(Full::new(Bytes::from(resp)))
                                .unwrap())
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    port
}

/// A TSA in `tmp/tsa` (answering 503 while `down`) and a started Signet that uses it, with
/// `extra` lines in `[audit.timestamping]`.
async fn signet_with_tsa(tmp: &Path, down: Arc<AtomicBool>, extra: &str) -> (PathBuf, Signet) {
    let tsa = tmp.join("tsa");
    make_tsa(&tsa);
    let port = serve_tsa(tsa.clone(), down).await;
    let section = format!(
        "[audit.timestamping]\ntsa_url = \"http://127.0.0.1:{port}/tsa\"\nca_file = \"{}\"\n{extra}\n[state]",
        tsa.join("tsa-ca.pem").display()
    );
    let mut s = Signet::init(Init {
        edit: Some(Box::new(move |c: String| c.replace("[state]", &section))),
        ..Init::default()
    });
    s.start();
    (tsa, s)
}

/// The latest checkpoint, if it covers `size` entries and has its timestamp.
async fn stamped(s: &Signet, size: u64) -> Option<serde_json::Value> {
    let (_, cp) = s.get("auditor", "/v1/audit/checkpoint").await;
    (cp["tree_size"].as_u64() >= Some(size) && cp["timestamp"].is_string()).then_some(cp)
}

/// `openssl ts -verify` of the checkpoint's timestamp against the TSA's CA.
fn openssl_verifies(dir: &Path, cp: &serde_json::Value) -> String {
    std::fs::write(dir.join("note.txt"), cp["checkpoint"].as_str().unwrap()).unwrap();
    std::fs::write(
        dir.join("resp.tsr"),
        B64.decode(cp["timestamp"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "ts",
            "-verify",
            "-data",
            "note.txt",
            "-in",
            "resp.tsr",
            "-CAfile",
            "tsa-ca.pem",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_get_rfc3161_timestamps_and_a_tsa_outage_never_blocks_signing() {
    let tmp = tempfile::tempdir().unwrap();
    let down = Arc::new(AtomicBool::new(false));
    let (tsa, mut s) = signet_with_tsa(
        tmp.path(),
        Arc::clone(&down),
        "policy = \"1.2.3.4.1\"\ntimeout = \"5s\"\n",
    )
    .await;
    let (st, _) = s
        .sign("payroll-app", sign_body("payroll-esign", b"stamped"))
        .await;
    assert_eq!(st, 200);
    let n = s.entries().len() as u64;
    s.eventually(
        "a timestamped checkpoint",
        Duration::from_secs(15),
        || async { stamped(&s, n).await.is_some() },
    )
    .await;
    let cp = stamped(&s, n).await.unwrap();
    let out = openssl_verifies(&tsa, &cp);
    assert!(out.contains("Verification: OK"), "{out}");
    assert!(
        std::fs::read_to_string(s.audit_dir().join("timestamps.jsonl"))
            .unwrap()
            .lines()
            .count()
            >= 1
    );
    assert!(s.metric("signet_tsa_requests_total{outcome=\"ok\"}").await >= 1.0);

    // The TSA goes down: signing goes on, failures are counted, checkpoints wait.
    down.store(true, Ordering::SeqCst);
    for i in 0..3 {
        let (st, _) = s
            .sign(
                "payroll-app",
                sign_body("payroll-esign", format!("during outage {i}").as_bytes()),
            )
            .await;
        assert_eq!(st, 200, "a TSA outage never blocks signing");
    }
    s.eventually(
        "failed TSA requests counted",
        Duration::from_secs(15),
        || async {
            s.metric("signet_tsa_requests_total{outcome=\"error\"}")
                .await
                >= 1.0
                && s.metric("signet_audit_timestamps_pending").await >= 1.0
        },
    )
    .await;
    // A restart while the TSA is still down: the checkpoints still waiting are found again
    // (from the end of the files) and queued.
    assert!(s.stop().success());
    s.start();
    s.eventually(
        "waiting checkpoints queued again after the restart",
        Duration::from_secs(15),
        || async { s.metric("signet_audit_timestamps_pending").await >= 1.0 },
    )
    .await;
    // Back up: the waiting checkpoints get their tokens.
    down.store(false, Ordering::SeqCst);
    let n = s.entries().len() as u64;
    s.eventually("tokens filled in", Duration::from_secs(30), || async {
        s.metric("signet_audit_timestamps_pending").await == 0.0 && stamped(&s, n).await.is_some()
    })
    .await;
    let cp = stamped(&s, n).await.unwrap();
    assert!(openssl_verifies(&tsa, &cp).contains("Verification: OK"));
    // Every checkpoint got exactly one token, in order.
    let sizes = |file: &str| -> Vec<u64> {
        std::fs::read_to_string(s.audit_dir().join(file))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["tree_size"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(sizes("timestamps.jsonl"), sizes("checkpoints.jsonl"));
    // Served with transaction trails too.
    let (_, v) = s
        .get("auditor", "/v1/audit/transactions/nothing-here")
        .await;
    assert!(v["checkpoint_timestamp"].is_string(), "{v}");
}

/// `signet bundle verify` in a network namespace of its own (no network at all), if the
/// machine allows one (root); otherwise plainly.
fn bundle_verify(s: &Signet, tsa: &Path, file: &Path, extra: &[&str]) -> (bool, String) {
    let args = |cmd: &mut std::process::Command| {
        cmd.args(["bundle", "verify"])
            .arg(file)
            .arg("--ca")
            .arg(s.dir.join("hsm-ca.pem"))
            .arg("--log-key")
            .arg(s.audit_dir().join("log-key.pem"))
            .arg("--tsa-ca")
            .arg(tsa.join("tsa-ca.pem"))
            .args(extra);
    };
    let isolated = std::process::Command::new("unshare")
        .args(["--net", "true"])
        .status()
        .is_ok_and(|st| st.success());
    let mut cmd = if isolated {
        let mut c = std::process::Command::new("unshare");
        c.args(["--net", "--"]).arg(BIN);
        c
    } else {
        std::process::Command::new(BIN)
    };
    args(&mut cmd);
    outcome(cmd.output().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_bundle_verifies_offline_explains_itself_and_refuses_each_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let (tsa, s) = signet_with_tsa(tmp.path(), Arc::new(AtomicBool::new(false)), "").await;
    let docs = ["employment contract", "annex A", "annex B"];
    for d in docs {
        let mut body = sign_body("payroll-esign", d.as_bytes());
        body["transaction_id"] = serde_json::json!("contract-77");
        body["signer"] = serde_json::json!({"email": "ada@example.com", "method": "otp"});
        assert_eq!(s.sign("payroll-app", body).await.0, 200);
    }
    let mut body = sign_body("procurement-esign", b"purchase order");
    body["transaction_id"] = serde_json::json!("contract-77");
    assert_eq!(s.sign("procurement-app", body).await.0, 200);
    let n = s.entries().len() as u64;
    s.eventually(
        "a timestamped checkpoint over the log",
        Duration::from_secs(15),
        || async { stamped(&s, n).await.is_some() },
    )
    .await;

    let file = s.dir.join("contract-77.bundle.json");
    let out = s.cli_ok(&[
        "audit",
        "export",
        "--transaction",
        "contract-77",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(out.contains("4 entries"), "{out}");
    let (ok, text) = bundle_verify(&s, &tsa, &file, &[]);
    assert!(ok, "{text}");
    // The account names the facts of the entries.
    for fact in [
        "VERIFIED",
        "spiffe://signet.dev/payroll-app",
        "spiffe://signet.dev/procurement-app",
        &digest_hex(b"employment contract"),
        &digest_hex(b"purchase order"),
        "payroll-esign",
        "ESIGN/UETA",
        "payroll/v1",
        "procurement/v1",
        "Test TSA",
        "ada@example.com",
        "chains to the TSA CA you supplied",
        "the key you supplied",
    ] {
        assert!(text.contains(fact), "missing `{fact}` in:\n{text}");
    }
    let page = s.dir.join("account.html");
    let (ok, _) = bundle_verify(&s, &tsa, &file, &["--html", page.to_str().unwrap()]);
    assert!(ok);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains(&digest_hex(b"employment contract")) && html.contains("ada@example.com"));
    let (ok, json) = bundle_verify(&s, &tsa, &file, &["--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(v["account"]["entries"].as_array().unwrap().len(), 4);
    assert!(
        v["account"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["signature_verified"] == true)
    );
    assert!(v["account"]["timestamp"]["time"].is_string());
    // One tenant's part only.
    let part = s.dir.join("payroll-part.json");
    s.cli_ok(&[
        "audit",
        "export",
        "--transaction",
        "contract-77",
        "--tenant",
        "payroll",
        "--out",
        part.to_str().unwrap(),
    ]);
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&part).unwrap()).unwrap();
    assert_eq!(p["entries"].as_array().unwrap().len(), 3);

    // Each tampering is refused with its reason.
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let tamper = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut b = original.clone();
        edit(&mut b);
        let f = s.dir.join(format!("{name}.json"));
        std::fs::write(&f, b.to_string()).unwrap();
        f
    };
    let digest = digest_hex(b"annex A");
    type Edit<'a> = Box<dyn Fn(&mut serde_json::Value) + 'a>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "entry",
            Box::new(|b| {
                // The extra line carries the canonical entry (base64): change its digest.
                let e = &mut b["entries"][1]["proof"];
                let lines: Vec<String> = e
                    .as_str()
                    .unwrap()
                    .lines()
                    .map(|l| match l.strip_prefix("extra ") {
                        Some(x) => {
                            let entry = String::from_utf8(B64.decode(x).unwrap()).unwrap();
                            assert!(entry.contains(&digest));
                            let forged = entry.replace(&digest, &digest_hex(b"forged"));
                            format!("extra {}", B64.encode(forged))
                        }
                        None => l.to_owned(),
                    })
                    .collect();
                *e = serde_json::json!(lines.join("\n") + "\n");
            }),
            "is not in the signed checkpoint",
        ),
        (
            "proof",
            Box::new(|b| {
                let e = &mut b["entries"][0]["proof"];
                let mut lines: Vec<String> =
                    e.as_str().unwrap().lines().map(str::to_owned).collect();
                let h = lines
                    .iter()
                    .position(|l| l.len() == 44 && l.ends_with('='))
                    .unwrap();
                lines[h] = B64.encode([7u8; 32]);
                *e = serde_json::json!(lines.join("\n") + "\n");
            }),
            "is not in the signed checkpoint",
        ),
        (
            "checkpoint",
            Box::new(|b| {
                let note = b["checkpoint"]["note"].as_str().unwrap().to_owned();
                let mut lines: Vec<&str> = note.lines().collect();
                let root = B64.encode([9u8; 32]);
                lines[2] = &root;
                b["checkpoint"]["note"] = serde_json::json!(lines.join("\n") + "\n");
            }),
            "the checkpoint does not verify",
        ),
        (
            "certificate",
            Box::new(|b| {
                b["certificates"] = b["ca_certificates"].clone();
            }),
            "lacks the signing certificate",
        ),
        (
            "timestamp",
            Box::new(|b| {
                let mut der = B64
                    .decode(b["checkpoint"]["timestamp"].as_str().unwrap())
                    .unwrap();
                let last = der.len() - 1;
                der[last] ^= 0x01;
                b["checkpoint"]["timestamp"] = serde_json::json!(B64.encode(der));
            }),
            "the TSA's signature over the timestamp does not verify (altered)",
        ),
    ];
    for (name, edit, reason) in cases {
        let f = tamper(name, edit.as_ref());
        let (ok, text) = bundle_verify(&s, &tsa, &f, &[]);
        assert!(!ok, "tampered {name} accepted:\n{text}");
        assert!(text.contains(reason), "{name}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_replicas_on_postgres_the_leader_timestamps_and_every_replica_serves_the_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let tsa = tmp.path().join("tsa");
    make_tsa(&tsa);
    let port = serve_tsa(tsa.clone(), Arc::new(AtomicBool::new(false))).await;
    let db = common::pg::Postgres::start();
    let mut a = init_postgres(&db, "stamps");
    let section = format!(
        "[audit.timestamping]\ntsa_url = \"http://127.0.0.1:{port}/tsa\"\nca_file = \"{}\"\n\n[state]",
        tsa.join("tsa-ca.pem").display()
    );
    a.edit_config(|c| c.replace("[state]", &section));
    a.start();
    let mut b = a.replica("b");
    b.start();
    for s in [&a, &b] {
        let (st, _) = s
            .sign("payroll-app", sign_body("payroll-esign", s.name.as_bytes()))
            .await;
        assert_eq!(st, 200);
    }
    let n: u64 = db
        .psql("stamps", "SELECT next_index FROM signet_log")
        .parse()
        .unwrap();
    // Both replicas serve a checkpoint covering both signatures, with a token that verifies.
    for s in [&a, &b] {
        s.eventually(
            "a timestamped checkpoint",
            Duration::from_secs(20),
            || async { stamped(s, n).await.is_some() },
        )
        .await;
        let cp = stamped(s, n).await.unwrap();
        let out = openssl_verifies(&tsa, &cp);
        assert!(out.contains("Verification: OK"), "{out}");
    }
    // Stored once per checkpoint in the database, asked for by one replica (the leader).
    let stored: u64 = db
        .psql("stamps", "SELECT count(*) FROM signet_timestamps")
        .parse()
        .unwrap();
    let checkpoints: u64 = db
        .psql("stamps", "SELECT count(*) FROM signet_checkpoints")
        .parse()
        .unwrap();
    assert!(stored >= 1 && stored <= checkpoints);
    let asked = a.metric("signet_tsa_requests_total{outcome=\"ok\"}").await
        + b.metric("signet_tsa_requests_total{outcome=\"ok\"}").await;
    assert_eq!(asked as u64, stored, "each checkpoint timestamped once");
}
