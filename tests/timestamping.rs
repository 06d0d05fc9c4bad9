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
    let s = start_with_tsa(port, &tsa, extra);
    (tsa, s)
}

/// A started Signet that asks the TSA on `port`, trusting the CA in `tsa`, with `extra` lines in
/// `[audit.timestamping]`.
fn start_with_tsa(port: u16, tsa: &Path, extra: &str) -> Signet {
    let section = format!(
        "[audit.timestamping]\ntsa_url = \"http://127.0.0.1:{port}/tsa\"\nca_file = \"{}\"\n{extra}\n[state]",
        tsa.join("tsa-ca.pem").display()
    );
    let mut s = Signet::init(Init {
        edit: Some(Box::new(move |c: String| c.swap("[state]", &section))),
        ..Init::default()
    });
    s.start();
    s
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
    assert_eq!(
        s.tree_sizes("timestamps.jsonl"),
        s.tree_sizes("checkpoints.jsonl")
    );
    // Served with transaction trails too.
    let (_, v) = s
        .get("auditor", "/v1/audit/transactions/nothing-here")
        .await;
    assert!(v["checkpoint_timestamp"].is_string(), "{v}");
}

/// `signet bundle verify` in a network namespace of its own (no network at all), if the
/// machine allows one (root); otherwise plainly. With the installation's log key, CA and the
/// TSA's CA as trust anchors.
fn bundle_verify(s: &Signet, tsa: &Path, file: &Path, extra: &[&str]) -> (bool, String) {
    let ca = s.dir.join("hsm-ca.pem");
    let key = s.audit_dir().join("log-key.pem");
    let tsa_ca = tsa.join("tsa-ca.pem");
    let mut args = vec![
        "--ca",
        ca.to_str().unwrap(),
        "--log-key",
        key.to_str().unwrap(),
        "--tsa-ca",
        tsa_ca.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, text) = bundle_verify_bare(file, &args);
    (code == Some(0), text)
}

/// `signet bundle verify FILE ARGS` offline: exit code and output.
fn bundle_verify_bare(file: &Path, args: &[&str]) -> (Option<i32>, String) {
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
    cmd.args(["bundle", "verify"]).arg(file).args(args);
    let out = cmd.output().unwrap();
    let code = out.status.code();
    (code, outcome(out).1)
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
        "the log key you supplied",
        "these 4 entries are every entry of this transaction",
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
            "the TSA's signature over the token does not verify",
        ),
        (
            "cut to one entry",
            Box::new(|b| {
                let first = b["entries"][0].clone();
                b["entries"] = serde_json::json!([first]);
            }),
            "the bundle lacks entries",
        ),
        (
            "duplicated entry",
            Box::new(|b| {
                let first = b["entries"][0].clone();
                b["entries"].as_array_mut().unwrap().insert(0, first);
            }),
            "is listed twice",
        ),
        (
            "reordered entries",
            Box::new(|b| b["entries"].as_array_mut().unwrap().swap(0, 1)),
            "not in log order",
        ),
        (
            "a statement shortened with the entries",
            Box::new(|b| {
                b["entries"].as_array_mut().unwrap().pop();
                b["completeness"]["statement"]["entries"]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            }),
            "the completeness statement is not signed by the log key",
        ),
        (
            "signer evidence swapped",
            Box::new(|b| {
                // Another person named as the signer: the entry's commitment says otherwise.
                b["entries"][0]["signer_evidence"]["signer"]["email"] =
                    serde_json::json!("mallory@example.com");
            }),
            "the bundle's signer evidence does not match the entry",
        ),
        (
            "signer salt forged",
            Box::new(|b| {
                b["entries"][0]["signer_evidence"]["salt"] =
                    serde_json::json!(B64.encode([0u8; 32]));
            }),
            "the bundle's signer evidence does not match the entry",
        ),
        (
            "signer evidence added",
            Box::new(|b| {
                // The procurement entry was signed without a signer: none may be slipped in.
                b["entries"][3]["signer_evidence"] = b["entries"][0]["signer_evidence"].clone();
            }),
            "commits to none",
        ),
        (
            "no statement",
            Box::new(|b| {
                b.as_object_mut().unwrap().remove("completeness");
            }),
            "must carry its completeness statement",
        ),
        (
            "too many entries",
            Box::new(|b| {
                let first = b["entries"][0].clone();
                b["entries"] = serde_json::json!(vec![first; 10_001]);
            }),
            "more than the 10000 a bundle may hold",
        ),
    ];
    for (name, edit, reason) in cases {
        let f = tamper(name, edit.as_ref());
        let (ok, text) = bundle_verify(&s, &tsa, &f, &[]);
        assert!(!ok, "tampered {name} accepted:\n{text}");
        assert!(text.contains(reason), "{name}: {text}");
    }
    // A file larger than any bundle is refused unread.
    let huge = s.dir.join("huge.json");
    std::fs::write(&huge, vec![b' '; 33 << 20]).unwrap();
    let (ok, text) = bundle_verify(&s, &tsa, &huge, &[]);
    assert!(!ok && text.contains("larger than 32 MiB"), "{text}");

    // Without trust anchors: everything is checked, but the verdict is UNVERIFIED (exit 2),
    // each missing anchor is named, and the account states nothing as verified.
    let (code, text) = bundle_verify_bare(&file, &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.starts_with("Evidence for transaction \"contract-77\" — UNVERIFIED"),
        "{text}"
    );
    for missing in [
        "UNVERIFIED: no trust anchor for the log key",
        "UNVERIFIED: no trust anchor for the time-stamping authority",
        "UNVERIFIED: no trust anchor for the signing certificates",
        "NOT one you supplied",
        "NOT checked against a TSA CA you trust",
        "The file claims",
    ] {
        assert!(text.contains(missing), "missing `{missing}` in:\n{text}");
    }
    assert!(
        !text.contains("— VERIFIED") && !text.contains("attests that"),
        "{text}"
    );
    let (code, json) = bundle_verify_bare(&file, &["--json"]);
    assert_eq!(code, Some(2));
    let v: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(v["verdict"], "unverified", "{v}");
    // All anchors but the TSA's: still UNVERIFIED, and the time is a claim.
    let ca = s.dir.join("hsm-ca.pem");
    let key = s.audit_dir().join("log-key.pem");
    let (code, text) = bundle_verify_bare(
        &file,
        &[
            "--ca",
            ca.to_str().unwrap(),
            "--log-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("NOT checked against a TSA CA you trust"),
        "{text}"
    );
    assert!(!text.contains("attests that"), "{text}");
    // A bundle of the old format (no completeness statement): never VERIFIED.
    let v1 = tamper("v1", &|b| {
        b["format"] = serde_json::json!("signet-evidence-bundle/v1");
        b.as_object_mut().unwrap().remove("completeness");
    });
    let (ok, text) = bundle_verify(&s, &tsa, &v1, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("does NOT prove that it holds every entry"),
        "{text}"
    );

    // A bundle made entirely by someone else (their own Signet: log key, CA, certificates) for
    // the same transaction ID: refused with our anchors; UNVERIFIED without any.
    let mut other = Signet::init(Init::default());
    other.start();
    let mut body = sign_body("payroll-esign", b"employment contract");
    body["transaction_id"] = serde_json::json!("contract-77");
    assert_eq!(other.sign("payroll-app", body).await.0, 200);
    other
        .checkpoint_covering(other.entries().len() as u64)
        .await;
    let forged = s.dir.join("forged.json");
    other.cli_ok(&[
        "audit",
        "export",
        "--transaction",
        "contract-77",
        "--out",
        forged.to_str().unwrap(),
    ]);
    let (ok, text) = bundle_verify(&s, &tsa, &forged, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("the checkpoint does not verify with the log key"),
        "{text}"
    );
    let (code, text) = bundle_verify_bare(&forged, &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(!text.contains("— VERIFIED"), "{text}");
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
    a.edit_config(|c| c.swap("[state]", &section));
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

/// What the hostile TSA answers to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A real token from a TSA whose CA Signet does not trust (same subject names).
    Untrusted,
    /// Not a token: a granted status and an OCTET STRING holding the digest and nonce bytes.
    UnsignedBlob,
    /// A signed token over another hash, with the requested digest and nonce appended.
    OtherHashAppended,
    /// A signed token over another hash.
    OtherHash,
    /// A signed token over the right hash with another nonce (a replayed answer).
    WrongNonce,
    /// 256 MiB of zeros.
    Huge,
    Garbage,
    /// No answer until long after Signet's timeout.
    Hang,
    Good,
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// `openssl ts -reply` of the TSA in `dir` to the query `tsq`.
fn ts_reply(dir: &Path, tsq: &[u8]) -> Vec<u8> {
    let name = format!("q{}", rand::random::<u64>());
    std::fs::write(dir.join(format!("{name}.tsq")), tsq).unwrap();
    run_ok(
        std::process::Command::new("openssl")
            .args(["ts", "-reply", "-config", "tsa.cnf", "-queryfile"])
            .arg(format!("{name}.tsq"))
            .args(["-out", &format!("{name}.tsr")])
            .current_dir(dir),
    );
    std::fs::read(dir.join(format!("{name}.tsr"))).unwrap()
}

/// A query made by openssl itself (its own nonce) for a SHA-256 digest.
fn ts_query(dir: &Path, digest: &[u8]) -> Vec<u8> {
    let out = run_ok(
        std::process::Command::new("openssl")
            .args(["ts", "-query", "-sha256", "-cert", "-digest"])
            .arg(hex::encode(digest))
            .current_dir(dir),
    );
    out.stdout
}

/// Serve a TSA that answers each request with the next scripted answer, then `Good`.
#[allow(clippy::too_many_lines)]
async fn serve_hostile_tsa(
    good: PathBuf,
    rogue: PathBuf,
    script: Arc<std::sync::Mutex<std::collections::VecDeque<Answer>>>,
) -> u16 {
    use sha2::Digest;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (good, rogue, script) = (good.clone(), rogue.clone(), Arc::clone(&script));
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (good, rogue, script) =
                            (good.clone(), rogue.clone(), Arc::clone(&script));
                        async move {
                            let query = req.into_body().collect().await?.to_bytes();
                            // The requested digest: the first 32-byte OCTET STRING of the query.
                            let at = query.windows(2).position(|w| w == [0x04, 0x20]).unwrap() + 2;
                            let digest = query[at..at + 32].to_vec();
                            let answer = script.lock().unwrap().pop_front().unwrap_or(Answer::Good);
                            let body: Body = match answer {
                                Answer::Good => {
                                    Full::new(Bytes::from(ts_reply(&good, &query))).boxed()
                                }
                                Answer::Untrusted => {
                                    Full::new(Bytes::from(ts_reply(&rogue, &query))).boxed()
                                }
                                Answer::UnsignedBlob => {
                                    let mut inner = vec![0x04, (digest.len() + 8) as u8];
                                    inner.extend_from_slice(&digest);
                                    inner.extend_from_slice(
                                        &query[query.len() - 11..query.len() - 3],
                                    );
                                    let mut resp = vec![
                                        0x30,
                                        (inner.len() + 5) as u8,
                                        0x30,
                                        0x03,
                                        0x02,
                                        0x01,
                                        0x00,
                                    ];
                                    resp.extend(inner);
                                    Full::new(Bytes::from(resp)).boxed()
                                }
                                Answer::OtherHash | Answer::OtherHashAppended => {
                                    let other = sha2::Sha256::digest(b"another checkpoint");
                                    let mut resp = ts_reply(&good, &ts_query(&good, &other));
                                    if answer == Answer::OtherHashAppended {
                                        resp.extend_from_slice(&digest);
                                        resp.extend_from_slice(&query[query.len() - 11..]);
                                    }
                                    Full::new(Bytes::from(resp)).boxed()
                                }
                                Answer::WrongNonce => Full::new(Bytes::from(ts_reply(
                                    &good,
                                    &ts_query(&good, &digest),
                                )))
                                .boxed(),
                                Answer::Huge => {
                                    let chunks = futures::stream::iter((0..256).map(|_| {
                                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                            Bytes::from(vec![0u8; 1 << 20]),
                                        ))
                                    }));
                                    http_body_util::StreamBody::new(chunks).boxed()
                                }
                                Answer::Garbage => {
                                    Full::new(Bytes::from_static(b"this is not DER")).boxed()
                                }
                                Answer::Hang => {
                                    tokio::time::sleep(Duration::from_secs(30)).await;
                                    Full::new(Bytes::new()).boxed()
                                }
                            };
                            Ok::<_, hyper::Error>(
                                hyper::Response::builder()
                                    .header("content-type", "application/timestamp-reply")
                                    .body(body)
                                    .unwrap(),
                            )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_fail_verification_are_never_stored_and_the_checkpoint_waits_for_a_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (good, rogue) = (tmp.path().join("tsa"), tmp.path().join("rogue"));
    make_tsa(&good);
    make_tsa(&rogue);
    let bad = [
        Answer::Untrusted,
        Answer::UnsignedBlob,
        Answer::OtherHashAppended,
        Answer::OtherHash,
        Answer::WrongNonce,
        Answer::Huge,
        Answer::Garbage,
        Answer::Hang,
    ];
    let script = Arc::new(std::sync::Mutex::new(bad.into_iter().collect()));
    let port = serve_hostile_tsa(good.clone(), rogue, Arc::clone(&script)).await;
    let s = start_with_tsa(
        port,
        &good,
        "policy = \"1.2.3.4.1\"\ntimeout = \"2s\"\nretry_max_interval = \"200ms\"\n",
    );
    let (st, _) = s
        .sign("payroll-app", sign_body("payroll-esign", b"first"))
        .await;
    assert_eq!(st, 200);
    // Signing goes on while every bad answer is refused.
    let mut i = 0;
    while !script.lock().unwrap().is_empty() {
        let (st, _) = s
            .sign(
                "payroll-app",
                sign_body("payroll-esign", format!("meanwhile {i}").as_bytes()),
            )
            .await;
        assert_eq!(st, 200, "a hostile TSA never blocks signing");
        i += 1;
        assert!(i < 400, "the TSA was not asked for every scripted answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = s.entries().len() as u64;
    s.eventually("a good token stored", Duration::from_secs(30), || async {
        s.metric("signet_audit_timestamps_pending").await == 0.0 && stamped(&s, n).await.is_some()
    })
    .await;
    for (reason, at_least) in [
        ("untrusted", 1.0),
        ("malformed", 3.0),
        ("wrong_imprint", 1.0),
        ("wrong_nonce", 1.0),
        ("too_large", 1.0),
    ] {
        let got = s
            .metric(&format!(
                "signet_tsa_rejections_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert!(
            got >= at_least,
            "{reason}: {got}\n{}",
            s.metrics_text().await
        );
    }
    assert!(
        s.metric("signet_tsa_requests_total{outcome=\"rejected\"}")
            .await
            >= 7.0
    );
    assert!(
        s.metric("signet_tsa_requests_total{outcome=\"error\"}")
            .await
            >= 1.0,
        "the hang timed out"
    );
    assert!(s.log().contains("TSA answer refused"));
    // The 256 MiB answer was refused after 64 KiB: memory never grew with it.
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kb < 200 * 1024, "peak resident memory {peak_kb} kB");
    // Only good tokens were stored: one per checkpoint, each accepted by `openssl ts -verify`.
    let checkpoints: Vec<serde_json::Value> =
        std::fs::read_to_string(s.audit_dir().join("checkpoints.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let stored: Vec<serde_json::Value> =
        std::fs::read_to_string(s.audit_dir().join("timestamps.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(stored.len(), checkpoints.len(), "one token per checkpoint");
    for (t, cp) in stored.iter().zip(&checkpoints) {
        assert_eq!(t["tree_size"], cp["tree_size"]);
        let cp = serde_json::json!({"checkpoint": cp["note"], "timestamp": t["response"]});
        let out = openssl_verifies(&good, &cp);
        assert!(out.contains("Verification: OK"), "{out}");
    }
}
