//! Signing core against a real SoftHSM token and real mTLS: signatures verify (p256 and
//! openssl), tenants are isolated, unknown clients are refused in the handshake, bad input
//! gets precise problems and changes nothing, HTTP/2 streams on one connection, keys/verify
//! endpoints, metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;
use hyper::Method;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_returns_a_signature_that_verifies_with_the_returned_certificate() {
    let mut s = Signet::init(Init::default());
    s.start();
    let data = b"employment contract #4711";
    let mut body = sign_body("payroll-esign", data);
    body["transaction_id"] = json!("wf-2026-0001");
    body["signer"] = json!({"email": "ada@example.com", "name": "Ada", "ip": "192.0.2.10", "verification": "email-otp"});
    let (status, headers, r) = s
        .call("payroll-app", Method::POST, "/v1/sign", Some(body), &[])
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(headers["x-request-id"].len(), 32);
    assert_eq!(r["algorithm"], "ecdsa-p256-sha256");
    assert_eq!(r["key_id"], "payroll/v1");
    let cert = r["certificate"].as_str().unwrap();
    let sig = r["signature"].as_str().unwrap();
    assert!(verifies(cert, data, sig), "p256 verification");
    assert!(
        !verifies(cert, b"another document", sig),
        "a different document must not verify"
    );
    assert!(
        openssl_verifies(&s.dir, cert, data, sig),
        "openssl dgst -verify"
    );
    assert!(signet::clock::parse_rfc3339(r["signed_at"].as_str().unwrap()).is_some());
    assert_eq!(r["receipt"]["log_origin"], "signet.dev/evidence");

    // The certificate chains to the internal CA (checked by openssl).
    std::fs::write(s.dir.join("leaf.pem"), cert).unwrap();
    run_ok(
        Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(s.dir.join("hsm-ca.pem"))
            .arg(s.dir.join("leaf.pem")),
    );

    // The evidence entry records who, what, when, how.
    let entries = s.entries();
    let e = entries
        .iter()
        .find(|e| e["event"] == "signature")
        .expect("signature entry");
    assert_eq!(e["digest"]["value"], digest_hex(data));
    assert_eq!(e["signature"], sig);
    assert_eq!(e["transaction_id"], "wf-2026-0001");
    // Format 2: the signer evidence is kept apart (the vault); the leaf commits to it.
    assert_eq!(e["format"], 2);
    assert!(e.get("signer").is_none(), "{e}");
    assert_eq!(e["signer_commitment"].as_str().unwrap().len(), 64);
    assert_eq!(e["retention_class"], "default");
    assert_eq!(e["actor"]["identity"], "spiffe://signet.dev/payroll-app");
    assert_eq!(
        e["policy"]["legal_standard"],
        "ESIGN/UETA simple electronic signature"
    );
    assert_eq!(
        e["request_id"].as_str().unwrap(),
        headers["x-request-id"].to_str().unwrap()
    );
    // ... and operational logs never carry content.
    let log = s.log();
    assert!(
        !log.contains(&digest_hex(data)) && !log.contains("ada@example.com") && !log.contains(sig)
    );
    assert!(
        !log.contains(
            std::fs::read_to_string(s.dir.join("secrets/user.pin"))
                .unwrap()
                .trim()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_on_one_connection_each_get_their_own_signature() {
    let mut s = Signet::init(Init::default());
    s.start();
    let h2 = signet::client::Connection::connect_h2(&s.tls("payroll-app"), s.api, "localhost")
        .await
        .unwrap();
    let mut streams = Vec::new();
    for i in 0..8 {
        let mut c = h2
            .share()
            .expect("HTTP/2 was negotiated, so the connection is shared");
        let data = format!("h2 document {i}").into_bytes();
        streams.push(tokio::spawn(async move {
            let body = sign_body("payroll-esign", &data).to_string().into_bytes();
            let (st, _, b) = c
                .request(Method::POST, "/v1/sign", &[], Some(body))
                .await
                .unwrap();
            (
                st.as_u16(),
                serde_json::from_slice::<Value>(&b).unwrap(),
                data,
            )
        }));
    }
    let mut indexes = Vec::new();
    for t in streams {
        let (st, r, data) = t.await.unwrap();
        assert_eq!(st, 200, "{r}");
        assert!(verifies(
            r["certificate"].as_str().unwrap(),
            &data,
            r["signature"].as_str().unwrap()
        ));
        indexes.push(r["receipt"]["index"].as_u64().unwrap());
    }
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(indexes.len(), 8, "eight distinct evidence entries");
    let signed = s
        .entries()
        .iter()
        .filter(|e| e["event"] == "signature")
        .count();
    assert_eq!(signed, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_may_sign_only_for_their_tenants() {
    let mut s = Signet::init(Init::default());
    s.start();
    let before = s.entries().len();
    let (status, p) = s
        .sign("payroll-app", sign_body("procurement-esign", b"x"))
        .await;
    assert_eq!(status, 403, "{p}");
    assert_eq!(p["type"], "urn:signet:problem:tenant-not-allowed");
    assert!(p.get("signature").is_none());
    let (status, r) = s
        .sign("procurement-app", sign_body("procurement-esign", b"x"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(r["key_id"], "procurement/v1");
    // An audit-only client may not sign at all.
    let (status, _) = s.sign("auditor", sign_body("payroll-esign", b"x")).await;
    assert_eq!(status, 403);
    // Keys of another tenant are not visible, nor usable for verification.
    let (status, _) = s.get("payroll-app", "/v1/keys/procurement").await;
    assert_eq!(status, 403);
    let v = json!({"key_id": "procurement/v1", "digest": digest_hex(b"x"), "signature": r["signature"]});
    let (status, _, _) = s
        .call("payroll-app", Method::POST, "/v1/verify", Some(v), &[])
        .await;
    assert_eq!(status, 403);
    let signatures = s
        .entries()
        .iter()
        .filter(|e| e["event"] == "signature")
        .count();
    assert_eq!(
        s.entries().len(),
        before + 1,
        "only the allowed request left evidence"
    );
    assert_eq!(signatures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_untrusted_and_missing_client_certificates_are_refused_in_the_handshake() {
    let mut s = Signet::init(Init::default());
    // A certificate from the right CA whose identity is not in [[clients]].
    signet::dev::issue_client_from_dir(&s.dir, "stranger").unwrap();
    // A certificate from another CA that happens to carry a configured identity.
    let other = Signet::init(Init {
        keys: false,
        ..Default::default()
    });
    s.start();
    let ca = s.dir.join("tls/ca.pem");

    let attempts: Vec<(&str, signet::client::ClientTls)> = vec![
        (
            "no client certificate",
            signet::client::ClientTls::new(&ca, None, None).unwrap(),
        ),
        ("identity not configured", s.tls("stranger")),
        (
            "untrusted CA",
            signet::client::ClientTls::new(
                &ca,
                Some(&other.dir.join("tls/clients/payroll-app.pem")),
                Some(&other.dir.join("tls/clients/payroll-app.key")),
            )
            .unwrap(),
        ),
    ];
    for (what, tls) in attempts {
        // TLS 1.3 reports a client-certificate refusal on the first read: connect, then request.
        let refused = match signet::client::Connection::connect(&tls, s.api, "localhost").await {
            Err(_) => true,
            Ok(mut c) => c
                .request(
                    Method::POST,
                    "/v1/sign",
                    &[],
                    Some(sign_body("payroll-esign", b"x").to_string().into_bytes()),
                )
                .await
                .is_err(),
        };
        assert!(refused, "{what}: must be refused");
    }
    // Also with curl, as an operator would check.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&ca)
        .arg(format!(
            "https://localhost:{}/v1/keys/payroll",
            s.api.port()
        ))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "curl without a client certificate must fail"
    );
    assert!(s.entries().iter().all(|e| e["event"] != "signature"));
    // The refusals are logged with the reason, without content.
    assert!(s.log().contains("TLS handshake refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_problem_and_changes_nothing() {
    let mut s = Signet::init(Init {
        edit: Some(Box::new(|c| {
            c.swap("metrics_listen", "max_body_bytes = 65536\nmetrics_listen")
        })),
        ..Default::default()
    });
    s.start();
    let good = digest_hex(b"doc");
    let deep = json!({"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}});
    let big_signer = json!({"note": "x".repeat(9000)});
    let raw = |text: &str| text.as_bytes().to_vec();
    let j = |v: Value| v.to_string().into_bytes();
    // (what, method, path, headers, body, status, problem type)
    type Case<'a> = (
        &'a str,
        Method,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Option<Vec<u8>>,
        u16,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "malformed JSON",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(raw("{")),
            400,
            "malformed-json",
        ),
        (
            "JSON array",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(raw("[]")),
            400,
            "malformed-json",
        ),
        (
            "empty body",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(vec![]),
            400,
            "malformed-json",
        ),
        (
            "missing digest",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest_algorithm": "sha256"}),
            )),
            400,
            "malformed-json",
        ),
        (
            "missing policy",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(json!({"digest": good, "digest_algorithm": "sha256"}))),
            400,
            "malformed-json",
        ),
        (
            "missing algorithm",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(json!({"policy_id": "payroll-esign", "digest": good}))),
            400,
            "malformed-json",
        ),
        (
            "digest null",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": null, "digest_algorithm": "sha256"}),
            )),
            400,
            "malformed-json",
        ),
        (
            "digest a number",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": 42, "digest_algorithm": "sha256"}),
            )),
            400,
            "malformed-json",
        ),
        (
            "digest too short",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": "abcd", "digest_algorithm": "sha256"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "digest too long",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": format!("{good}00"), "digest_algorithm": "sha256"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "digest of a SHA-512",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": "ab".repeat(64), "digest_algorithm": "sha256"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "digest uppercase",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good.to_uppercase(), "digest_algorithm": "sha256"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "digest not hex",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": "zz".repeat(32), "digest_algorithm": "sha256"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "digest with non-ASCII",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": format!("é{}", &good[2..]), "digest_algorithm": "sha256"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "unknown algorithm",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha512"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "algorithm in caps",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "SHA256"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "document content",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha256", "document": "the whole contract"}),
            )),
            400,
            "malformed-json",
        ),
        (
            "unknown policy",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "nope", "digest": good, "digest_algorithm": "sha256"}),
            )),
            404,
            "unknown-policy",
        ),
        (
            "policy ID with odd characters",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "../../etc/passwd", "digest": good, "digest_algorithm": "sha256"}),
            )),
            404,
            "unknown-policy",
        ),
        (
            "other tenant's policy",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "procurement-esign", "digest": good, "digest_algorithm": "sha256"}),
            )),
            403,
            "tenant-not-allowed",
        ),
        (
            "signer not an object",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha256", "signer": "ada"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "signer too deep",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha256", "signer": deep}),
            )),
            400,
            "invalid-request",
        ),
        (
            "signer too large",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha256", "signer": big_signer}),
            )),
            400,
            "invalid-request",
        ),
        (
            "signer with a huge integer",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(raw(&format!(
                "{{\"policy_id\":\"payroll-esign\",\"digest\":\"{good}\",\"digest_algorithm\":\"sha256\",\"signer\":{{\"n\":123456789012345678901}}}}"
            ))),
            400,
            "invalid-request",
        ),
        (
            "empty transaction ID",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha256", "transaction_id": ""}),
            )),
            400,
            "invalid-request",
        ),
        (
            "transaction ID too long",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha256", "transaction_id": "t".repeat(300)}),
            )),
            400,
            "invalid-request",
        ),
        (
            "idempotency key in the body",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha256", "idempotency_key": "k"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "idempotency key with spaces",
            Method::POST,
            "/v1/sign",
            vec![("idempotency-key", "a b")],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha256"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "policy needs an idempotency key",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(j(
                json!({"policy_id": "payroll-bulk", "digest": good, "digest_algorithm": "sha256"}),
            )),
            400,
            "idempotency-key-required",
        ),
        (
            "text/plain body",
            Method::POST,
            "/v1/sign",
            vec![("content-type", "text/plain")],
            Some(j(
                json!({"policy_id": "payroll-esign", "digest": good, "digest_algorithm": "sha256"}),
            )),
            415,
            "unsupported-media-type",
        ),
        (
            "body over the limit",
            Method::POST,
            "/v1/sign",
            vec![],
            Some(vec![b' '; 70_000]),
            413,
            "body-too-large",
        ),
        (
            "GET on sign",
            Method::GET,
            "/v1/sign",
            vec![],
            None,
            405,
            "method-not-allowed",
        ),
        (
            "unknown endpoint",
            Method::GET,
            "/v1/nothing",
            vec![],
            None,
            404,
            "not-found",
        ),
        (
            "empty batch",
            Method::POST,
            "/v1/sign/batch",
            vec![],
            Some(j(json!({"items": []}))),
            400,
            "invalid-request",
        ),
        (
            "verify: signature not base64",
            Method::POST,
            "/v1/verify",
            vec![],
            Some(j(
                json!({"key_id": "payroll/v1", "digest": good, "signature": "***"}),
            )),
            400,
            "invalid-request",
        ),
        (
            "verify: bad key ID",
            Method::POST,
            "/v1/verify",
            vec![],
            Some(j(
                json!({"key_id": "payroll", "digest": good, "signature": "MEQ="}),
            )),
            400,
            "invalid-request",
        ),
        (
            "verify: unknown version",
            Method::POST,
            "/v1/verify",
            vec![],
            Some(j(
                json!({"key_id": "payroll/v9", "digest": good, "signature": "MEQ="}),
            )),
            404,
            "not-found",
        ),
        (
            "keys: a tenant not its own (existence not revealed)",
            Method::GET,
            "/v1/keys/nosuchtenant",
            vec![],
            None,
            403,
            "forbidden",
        ),
        (
            "entry: not a number",
            Method::GET,
            "/v1/audit/entries/abc",
            vec![],
            None,
            400,
            "invalid-request",
        ),
        (
            "entry: beyond the log",
            Method::GET,
            "/v1/audit/entries/999999",
            vec![],
            None,
            404,
            "no-such-entry",
        ),
        (
            "consistency: from 0",
            Method::GET,
            "/v1/audit/consistency?from=0&to=1",
            vec![],
            None,
            400,
            "invalid-range",
        ),
        (
            "admin action without the role",
            Method::POST,
            "/v1/admin/rotations",
            vec![],
            Some(j(json!({"tenant": "payroll", "reason": "x"}))),
            403,
            "role-required",
        ),
    ];
    assert!(cases.len() >= 20);
    let entries_before = s.entries().len();
    for (what, method, path, headers, body, want, slug) in cases {
        let mut c = s.connect("payroll-app").await;
        let (status, h, bytes) = c
            .request(method, path, &headers, body)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let p: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert_eq!(status.as_u16(), want, "{what}: {p}");
        assert_eq!(h["content-type"], "application/problem+json", "{what}");
        assert_eq!(
            p["type"],
            format!("urn:signet:problem:{slug}"),
            "{what}: {p}"
        );
        assert_eq!(p["status"], want, "{what}");
        assert!(p["title"].is_string() && p["detail"].is_string(), "{what}");
        assert_eq!(
            p["request_id"].as_str(),
            h["x-request-id"].to_str().ok(),
            "{what}"
        );
        assert!(p.get("signature").is_none(), "{what}");
    }
    // Nothing was recorded, and the service is still healthy.
    let sigs = s.entries()[entries_before..]
        .iter()
        .filter(|e| e["event"] == "signature")
        .count();
    assert_eq!(sigs, 0);
    let (status, _) = s
        .sign(
            "payroll-app",
            sign_body("payroll-esign", b"after the storm"),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(s.readyz().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_verify_endpoints() {
    let mut s = Signet::init(Init::default());
    s.start();
    let (status, k) = s.get("payroll-app", "/v1/keys/payroll").await;
    assert_eq!(status, 200, "{k}");
    let v1 = &k["keys"][0];
    assert_eq!(v1["key_id"], "payroll/v1");
    assert_eq!(v1["state"], "active");
    assert!(
        v1["public_key"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    assert!(
        v1["certificate"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(v1["not_before"].is_string() && v1["not_after"].is_string());

    let (_, r) = s
        .sign("payroll-app", sign_body("payroll-esign", b"doc"))
        .await;
    let check = |digest: String, sig: &str| json!({"key_id": "payroll/v1", "digest": digest, "signature": sig});
    let (status, _, v) = s
        .call(
            "payroll-app",
            Method::POST,
            "/v1/verify",
            Some(check(digest_hex(b"doc"), r["signature"].as_str().unwrap())),
            &[],
        )
        .await;
    assert_eq!((status, v["valid"].as_bool()), (200, Some(true)));
    let (_, _, v) = s
        .call(
            "payroll-app",
            Method::POST,
            "/v1/verify",
            Some(check(
                digest_hex(b"other"),
                r["signature"].as_str().unwrap(),
            )),
            &[],
        )
        .await;
    assert_eq!(v["valid"], false);
    let (_, _, v) = s
        .call(
            "payroll-app",
            Method::POST,
            "/v1/verify",
            Some(check(digest_hex(b"doc"), "MAYCAQECAQE=")),
            &[],
        )
        .await;
    assert_eq!(
        v["valid"], false,
        "a well-formed but wrong signature is simply invalid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_reflect_signing() {
    let mut s = Signet::init(Init::default());
    s.start();
    for i in 0..3 {
        let (status, _) = s
            .sign(
                "payroll-app",
                sign_body("payroll-esign", format!("d{i}").as_bytes()),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (status, _) = s
        .sign("payroll-app", sign_body("procurement-esign", b"x"))
        .await;
    assert_eq!(status, 403);
    let m = s.metrics_text().await;
    assert_eq!(
        metric_value(
            &m,
            "signet_sign_requests_total{outcome=\"ok\",policy=\"payroll-esign\",tenant=\"payroll\"}"
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "signet_sign_requests_total{outcome=\"forbidden\",policy=\"procurement-esign\",tenant=\"procurement\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, "signet_sign_duration_seconds_count"), 3.0);
    assert_eq!(metric_value(&m, "signet_hsm_sessions"), 2.0);
    assert_eq!(metric_value(&m, "signet_hsm_sessions_in_use"), 0.0);
    assert_eq!(metric_value(&m, "signet_hsm_ready"), 1.0);
    assert!(m.contains("signet_build_info{version="));
    assert!(m.contains("# TYPE signet_hsm_errors_total counter"));
    assert!(
        !m.contains("ada@") && !m.contains(&digest_hex(b"d0")),
        "no content in labels"
    );
    assert_eq!(http_get(s.metrics, "/healthz").await.0, 200);
    assert_eq!(s.readyz().await, 200);
    // promtool agrees the exposition is well-formed.
    if let Ok(out) = Command::new("promtool")
        .arg("check")
        .arg("metrics")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        let mut child = out;
        child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        let errors = String::from_utf8_lossy(&o.stderr);
        assert!(!errors.contains("error"), "promtool: {errors}");
    }
}
