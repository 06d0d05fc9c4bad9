//! Key revocation: `signet keys revoke`, `POST /v1/admin/revocations`, the internal CA's CRL
//! and OCSP answers as openssl sees them, and the log's refusal of a revoked version.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::{Value, json};

/// The development installation (keys created) with the CA's revocation listener on, without
/// URLs in certificates; not started.
fn with_pki_listener() -> Signet {
    let port = free_port();
    Signet::init(Init {
        edit: Some(Box::new(move |c| {
            format!("{c}\n[pki]\nlisten = \"127.0.0.1:{port}\"\n")
        })),
        ..Default::default()
    })
}

/// An installation whose internal CA publishes on `[pki]` (keys created after, so their
/// certificates carry the URLs).
fn with_pki() -> (Signet, u16) {
    let port = free_port();
    let mut s = Signet::init(Init {
        keys: false,
        edit: Some(Box::new(move |c| {
            format!(
                "{c}\n[pki]\nlisten = \"127.0.0.1:{port}\"\nbase_url = \"http://127.0.0.1:{port}\"\ncrl_validity = \"1h\"\n"
            )
        })),
        ..Default::default()
    });
    s.start();
    assert_eq!(s.pki.map(|a| a.port()), Some(port));
    s.cli_ok(&["keys", "create", "--tenant", "payroll"]);
    (s, port)
}

/// openssl's stdout and stderr together (it reports `verify OK` on stderr); asserts success.
fn openssl_all(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn fetch(s: &Signet, path: &str) -> Vec<u8> {
    let (status, head, body) = http_bytes(s.pki.unwrap(), "GET", path, None).await;
    assert_eq!(status, 200, "{path}: {head}");
    body
}

/// `signet --json receipt verify` of the sign response `signed`, anchored in `ca.pem` of `dir`
/// and checked against the CRL file `crl`: (exit success, output).
async fn receipt_verify(s: &Signet, signed: &Value, dir: &Path, crl: &str) -> (bool, String) {
    let index = signed["receipt"]["index"].as_u64().unwrap();
    let cp = s.checkpoint_covering(index + 1).await;
    let (_, e) = s.get("admin", &format!("/v1/audit/entries/{index}")).await;
    std::fs::write(dir.join("response.json"), signed.to_string()).unwrap();
    std::fs::write(dir.join("entry.tlog-proof"), e["proof"].as_str().unwrap()).unwrap();
    std::fs::write(
        dir.join("log-key.pem"),
        cp["log_public_key"].as_str().unwrap(),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "--json",
            "receipt",
            "verify",
            "--receipt",
            "response.json",
            "--proof",
        ])
        .args([
            "entry.tlog-proof",
            "--log-key",
            "log-key.pem",
            "--ca",
            "ca.pem",
            "--crl",
            crl,
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    outcome(out)
}

/// The CA certificate as served at `/ca`, written to `ca.pem` in `dir`.
async fn write_ca_pem(s: &Signet, dir: &Path) {
    std::fs::write(dir.join("ca.der"), fetch(s, "/ca").await).unwrap();
    openssl_all(
        dir,
        &["x509", "-inform", "DER", "-in", "ca.der", "-out", "ca.pem"],
    );
}

/// `openssl ocsp` against Signet's responder for `cert.pem`; its whole output.
fn ocsp(dir: &Path, port: u16) -> String {
    openssl_all(
        dir,
        &[
            "ocsp",
            "-issuer",
            "ca.pem",
            "-cert",
            "cert.pem",
            "-CAfile",
            "ca.pem",
            "-url",
            &format!("http://127.0.0.1:{port}/ocsp"),
            "-resp_text",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_on_the_crl_and_ocsp_answers_revoked() {
    let (s, port) = with_pki();
    let dir = s.tmp.path();
    let signed = s.signs("payroll-app", "payroll-esign", b"before").await;
    assert_eq!(signed["key_id"], "payroll/v1");
    std::fs::write(
        dir.join("cert.pem"),
        signed["certificate"].as_str().unwrap(),
    )
    .unwrap();
    write_ca_pem(&s, dir).await;

    // The certificate says where its revocation status is.
    let ext = openssl_all(dir, &["x509", "-in", "cert.pem", "-noout", "-text"]);
    for want in [
        format!("URI:http://127.0.0.1:{port}/crl"),
        format!("OCSP - URI:http://127.0.0.1:{port}/ocsp"),
        format!("CA Issuers - URI:http://127.0.0.1:{port}/ca"),
    ] {
        assert!(ext.contains(&want), "no {want} in\n{ext}");
    }
    let serial = openssl_all(dir, &["x509", "-in", "cert.pem", "-noout", "-serial"])
        .trim()
        .trim_start_matches("serial=")
        .to_owned();

    // Before: a valid CRL without it, OCSP good, signed by the CA.
    std::fs::write(dir.join("crl.der"), fetch(&s, "/crl").await).unwrap();
    let crl = openssl_all(
        dir,
        &[
            "crl", "-inform", "DER", "-in", "crl.der", "-CAfile", "ca.pem", "-noout", "-text",
            "-verify",
        ],
    );
    assert!(crl.contains("verify OK"), "{crl}");
    assert!(crl.contains("No Revoked Certificates"), "{crl}");
    assert!(crl.contains("Next Update:"), "{crl}");
    let before = ocsp(dir, port);
    assert!(before.contains("Response verify OK"), "{before}");
    assert!(before.contains("cert.pem: good"), "{before}");

    // Revoke with a compromise time, rotating at once.
    let out = s.cli_ok(&[
        "--json",
        "keys",
        "revoke",
        "--key-id",
        "payroll/v1",
        "--reason",
        "key-compromise",
        "--compromised-at",
        "2026-01-02T03:04:05Z",
        "--rotate",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "revoked");
    assert_eq!(v["previous_state"], "active");
    assert_eq!(v["revocation"]["reason"], "key-compromise");
    assert_eq!(v["revocation"]["compromised_at"], "2026-01-02T03:04:05Z");
    assert_eq!(v["rotation"]["step"], "completed", "{v}");
    assert_eq!(v["tenant_can_sign"], true);

    // After: OCSP revoked with reason and time; the CRL lists the serial with both dates.
    let after = ocsp(dir, port);
    assert!(after.contains("Response verify OK"), "{after}");
    assert!(after.contains("cert.pem: revoked"), "{after}");
    assert!(after.contains("Reason: keyCompromise"), "{after}");
    assert!(after.contains("Revocation Time:"), "{after}");
    s.eventually(
        "the CRL lists the serial",
        Duration::from_secs(10),
        || async {
            std::fs::write(dir.join("crl.der"), fetch(&s, "/crl").await).unwrap();
            let crl = openssl_all(
                dir,
                &[
                    "crl", "-inform", "DER", "-in", "crl.der", "-CAfile", "ca.pem", "-noout",
                    "-text", "-verify",
                ],
            );
            crl.contains("verify OK")
                && crl.contains(&format!("Serial Number: {serial}"))
                && crl.contains("Key Compromise")
                && crl.contains("Invalidity Date:")
                && crl.contains("Jan  2 03:04:05 2026 GMT")
        },
    )
    .await;
    let crl = openssl_all(
        dir,
        &["crl", "-inform", "DER", "-in", "crl.der", "-noout", "-text"],
    );
    assert!(crl.contains("X509v3 CRL Number"), "{crl}");

    // The tenant signs with the new version; the token no longer holds v1's private key.
    let after_sig = s.signs("payroll-app", "payroll-esign", b"after").await;
    assert_eq!(after_sig["key_id"], "payroll/v2");
    let privkeys = s.pkcs11_tool(&["--list-objects", "--type", "privkey"]);
    assert!(!privkeys.contains("label:      payroll/v1"), "{privkeys}");
    assert!(privkeys.contains("label:      payroll/v2"), "{privkeys}");

    // The evidence: one key_revoked entry with serial and reason; no v1 signature after it.
    let entries = s.entries();
    let revoked: Vec<&Value> = entries
        .iter()
        .filter(|e| e["event"] == "key_revoked")
        .collect();
    assert_eq!(revoked.len(), 1);
    let r = revoked[0];
    assert_eq!(r["key_id"], "payroll/v1");
    assert_eq!(r["reason"], "key-compromise");
    assert_eq!(
        r["certificate_serial"].as_str().unwrap().to_uppercase(),
        serial.to_uppercase()
    );
    assert_eq!(r["actor"]["identity"], "spiffe://signet.dev/admin");
    let at = r["index"].as_u64().unwrap();
    assert!(entries.iter().all(|e| !(e["event"] == "signature"
        && e["key_id"] == "payroll/v1"
        && e["index"].as_u64().unwrap() > at)));
    let report = s.audit_verify(None);
    assert_eq!(report["ok"], true, "{report}");

    // The key list shows it; metrics count it.
    let (_, keys) = s.get("admin", "/v1/keys/payroll").await;
    let v1 = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == "payroll/v1")
        .cloned()
        .unwrap();
    assert_eq!(v1["state"], "revoked", "{keys}");
    assert_eq!(v1["revocation"]["log_index"], at);
    let m = s.metrics_text().await;
    assert_eq!(
        metric_value(&m, "signet_revoked_key_versions{tenant=\"payroll\"}"),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "signet_key_revocations_total{reason=\"key-compromise\"}"
        ),
        1.0
    );
    assert!(metric_value(&m, "signet_ocsp_responses_total{status=\"revoked\"}") >= 1.0);
    assert!(metric_value(&m, "signet_ocsp_responses_total{status=\"good\"}") >= 1.0);
    assert_eq!(metric_value(&m, "signet_crl_revoked_certificates"), 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(metric_value(&m, "signet_crl_next_update_timestamp_seconds") > now + 1800.0);

    // Foreign or malformed questions get unsigned refusals, never a token signature.
    let (status, _, body) = http_bytes(
        s.pki.unwrap(),
        "POST",
        "/ocsp",
        Some(("application/ocsp-request", b"junk")),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, [0x30, 0x03, 0x0a, 0x01, 0x01], "malformedRequest");
    let m = s.metrics_text().await;
    assert!(metric_value(&m, "signet_ocsp_responses_total{status=\"malformed\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_active_version_stops_the_tenant_until_a_rotation() {
    let mut s = with_pki_listener();
    s.start();
    let mut body = sign_body("payroll-esign", b"contract");
    body["transaction_id"] = json!("tx-before-revocation");
    let (status, before) = s.sign("payroll-app", body).await;
    assert_eq!(status, 200, "{before}");
    let revoke = |body: Value| {
        let s = &s;
        async move {
            s.call(
                "admin",
                Method::POST,
                "/v1/admin/revocations",
                Some(body),
                &[],
            )
            .await
        }
    };
    // Refused, changing nothing: bad reason, bad or future time, unknown key, not admin.
    for (body, want) in [
        (json!({"key_id": "payroll/v1", "reason": "lost"}), 400),
        (
            json!({"key_id": "payroll/v1", "reason": "superseded", "compromised_at": "yesterday"}),
            400,
        ),
        (
            json!({"key_id": "payroll/v1", "reason": "superseded", "compromised_at": "2999-01-01T00:00:00Z"}),
            400,
        ),
        (json!({"key_id": "payroll/v9", "reason": "superseded"}), 404),
        (json!({"key_id": "payroll", "reason": "superseded"}), 400),
    ] {
        let (status, _, v) = revoke(body.clone()).await;
        assert_eq!(status, want, "{body}: {v}");
    }
    let (status, _, _) = s
        .call(
            "payroll-app",
            Method::POST,
            "/v1/admin/revocations",
            Some(json!({"key_id": "payroll/v1", "reason": "superseded"})),
            &[],
        )
        .await;
    assert_eq!(status, 403);
    s.signs("payroll-app", "payroll-esign", b"still active")
        .await;

    let (status, _, v) = revoke(json!({"key_id": "payroll/v1", "reason": "superseded"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["tenant_can_sign"], false);
    assert!(v["rotation"].is_null());
    assert!(v["revocation"].get("compromised_at").is_none(), "{v}");

    // A signature made before the revocation still verifies, and the verifiers say the
    // certificate was revoked after it (no compromise time given).
    let dir = s.tmp.path();
    write_ca_pem(&s, dir).await;
    s.eventually("the CRL lists v1", Duration::from_secs(10), || async {
        std::fs::write(dir.join("crl.der"), fetch(&s, "/crl").await).unwrap();
        openssl_all(
            dir,
            &["crl", "-inform", "DER", "-in", "crl.der", "-noout", "-text"],
        )
        .contains("Superseded")
    })
    .await;
    let (ok, out) = receipt_verify(&s, &before, dir, "crl.der").await;
    assert!(ok, "{out}");
    assert!(out.contains("\"verdict\":\"verified\""), "{out}");
    assert!(
        out.contains("this signature was made before the revocation"),
        "{out}"
    );
    let bundle = dir.join("tx.bundle.json");
    s.cli_ok(&[
        "audit",
        "export",
        "--transaction",
        "tx-before-revocation",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    let text = s.cli_ok(&[
        "bundle",
        "verify",
        bundle.to_str().unwrap(),
        "--ca",
        dir.join("ca.pem").to_str().unwrap(),
        "--log-key",
        dir.join("log-key.pem").to_str().unwrap(),
        "--crl",
        dir.join("crl.der").to_str().unwrap(),
    ]);
    assert!(text.contains("VERIFIED"), "{text}");
    assert!(
        text.contains("REVOKED: the certificate was revoked on"),
        "{text}"
    );
    assert!(text.contains("(superseded)"), "{text}");
    // A CRL is only read against the CA: without --ca it is refused.
    let out = s.cli(&[
        "bundle",
        "verify",
        bundle.to_str().unwrap(),
        "--crl",
        "crl.der",
    ]);
    assert!(!out.status.success());
    // Its earlier signatures still verify; the answer says it is revoked.
    let (status, _, v) = s
        .call(
            "payroll-app",
            Method::POST,
            "/v1/verify",
            Some(json!({"key_id": "payroll/v1", "digest": digest_hex(b"contract"), "signature": before["signature"]})),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["key_state"], "revoked", "{v}");
    assert_eq!(v["revocation"]["reason"], "superseded", "{v}");
    let (status, _, again) = revoke(json!({"key_id": "payroll/v1", "reason": "superseded"})).await;
    assert_eq!(status, 409, "{again}");

    // No active key: 503 no-active-key, and no signature entry.
    let before = s.entries().len();
    let (status, v) = s
        .sign("payroll-app", sign_body("payroll-esign", b"refused"))
        .await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["type"], "urn:signet:problem:no-active-key");
    assert_eq!(s.entries().len(), before);
    // The other tenant is untouched.
    s.signs("procurement-app", "procurement-esign", b"other tenant")
        .await;

    // Revocation survives a restart and is final: the version never signs again; even with
    // the key states lost, the log's key_revoked entry revokes it again at start.
    for lose_states in [false, true] {
        s.stop();
        if lose_states {
            std::fs::remove_file(s.dir.join("state/keys.json")).unwrap();
        }
        s.start();
        let (status, _) = s
            .sign("payroll-app", sign_body("payroll-esign", b"after restart"))
            .await;
        assert_eq!(status, 503, "states lost: {lose_states}");
        let (_, keys) = s.get("admin", "/v1/keys/payroll").await;
        assert_eq!(keys["keys"][0]["state"], "revoked", "{lose_states}: {keys}");
    }
    let (_, keys) = s.get("admin", "/v1/keys/payroll").await;
    assert_eq!(
        keys["keys"][0]["revocation"]["reason"], "superseded",
        "{keys}"
    );

    // A rotation recovers the tenant with a new version.
    s.cli_ok(&[
        "rotate",
        "start",
        "--tenant",
        "payroll",
        "--reason",
        "after revocation",
    ]);
    let v = s.signs("payroll-app", "payroll-esign", b"recovered").await;
    assert_eq!(v["key_id"], "payroll/v2");
    let report = s.audit_verify(None);
    assert_eq!(report["ok"], true, "{report}");
}

/// The Python of the PDF tools venv (softhsm/setup.sh --test installs pyHanko there).
fn pdf_python() -> std::path::PathBuf {
    let p = std::env::var_os("SIGNET_PDF_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pdf-tools/bin/python")
        });
    assert!(
        p.exists(),
        "{} missing: run softhsm/setup.sh --test (it installs pyHanko)",
        p.display()
    );
    p
}

fn pades(args: &[&str]) -> String {
    let out = Command::new(pdf_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pdf/pades.py"))
        .args(args)
        .output()
        .expect("run pyHanko");
    assert!(
        out.status.success(),
        "pades.py {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyhanko_checks_a_pades_signature_for_revocation_at_signets_urls() {
    let (s, _) = with_pki();
    let dir = s.tmp.path();
    let signed = s
        .signs("payroll-app", "payroll-esign", b"certificate")
        .await;
    std::fs::write(
        dir.join("cert.pem"),
        signed["certificate"].as_str().unwrap(),
    )
    .unwrap();
    write_ca_pem(&s, dir).await;
    let (pdf, ca) = (dir.join("signed.pdf"), dir.join("ca.pem"));
    let tls = s.dir.join("tls");
    pades(&[
        "sign",
        pdf.to_str().unwrap(),
        "--api",
        &s.api.to_string(),
        "--tls-dir",
        tls.to_str().unwrap(),
        "--client",
        "payroll-app",
        "--policy",
        "payroll-esign",
        "--cert",
        dir.join("cert.pem").to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ]);
    let validate = || -> Value {
        serde_json::from_str(&pades(&[
            "validate",
            pdf.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
        ]))
        .unwrap()
    };
    // Revocation checking on, hard-fail: the status comes from Signet's CRL/OCSP URLs.
    let before = validate();
    assert_eq!(before["intact"], true, "{before}");
    assert_eq!(before["trusted"], true, "{before}");
    assert_eq!(before["revoked"], false, "{before}");
    assert_eq!(before["bottom_line"], true, "{before}");
    let m = s.metrics_text().await;
    assert!(
        metric_value(&m, "signet_ocsp_responses_total{status=\"good\"}") >= 1.0,
        "pyHanko fetched no OCSP answer"
    );

    s.cli_ok(&[
        "keys",
        "revoke",
        "--key-id",
        "payroll/v1",
        "--reason",
        "key-compromise",
        "--rotate",
    ]);
    let after = validate();
    assert_eq!(after["intact"], true, "{after}");
    assert_eq!(after["revoked"], true, "{after}");
    assert_eq!(after["bottom_line"], false, "{after}");
    eprintln!(
        "pyHanko before: {}\npyHanko after: {}",
        before["summary"], after["summary"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_manual_issuer_signet_records_the_revocation_and_stops_signing() {
    let mut s = with_pki_listener();
    // Keys certified first, then an external CA takes over (the same CA file is trusted).
    s.edit_config(|c| c.swap("issuer = \"hsm-ca\"", "issuer = \"manual\""));
    s.start();
    s.signs("payroll-app", "payroll-esign", b"before").await;
    let out = s.cli_ok(&[
        "keys",
        "revoke",
        "--key-id",
        "payroll/v1",
        "--reason",
        "cessation-of-operation",
    ]);
    assert!(out.contains("revoked: payroll/v1 (was active)"), "{out}");
    assert!(out.contains("cannot sign"), "{out}");
    let (status, v) = s
        .sign("payroll-app", sign_body("payroll-esign", b"after"))
        .await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["type"], "urn:signet:problem:no-active-key");
    let r = s
        .entries()
        .into_iter()
        .find(|e| e["event"] == "key_revoked")
        .unwrap();
    assert_eq!(r["reason"], "cessation-of-operation");
    // The external CA publishes revocation: Signet's CA endpoints say so instead.
    let (status, _, body) = http_bytes(s.pki.unwrap(), "GET", "/crl", None).await;
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("external CA"));
}
