//! The API router without TLS: requests go through `tower::ServiceExt::oneshot` with the client
//! identity injected the way the connection layer injects it (the mTLS path itself is tested
//! by every other file). The service runs in-process on a real SoftHSM token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use common::*;
use http_body_util::BodyExt;
use hyper::{Method, Request};
use serde_json::{Value, json};
use tower::ServiceExt;

use signet::http::{ApiState, PeerIdentity, router};
use signet::tls::ClientIdentity;

const INNER: &str = "SIGNET_ROUTER_CONFIG";

/// (client, method, path, body, expected status, expected problem slug)
type Case<'a> = (
    Option<&'a str>,
    Method,
    &'a str,
    Option<Value>,
    u16,
    &'a str,
);

/// The token library reads `SOFTHSM2_CONF` from the process environment when it starts: the
/// body runs in a child process of this test binary with it set (no environment changes here).
#[test]
fn routes_answer_with_an_injected_identity_and_problem_documents() {
    let Some(config) = std::env::var_os(INNER) else {
        let s = Signet::init(Init::default());
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "routes_answer_with_an_injected_identity_and_problem_documents",
                "--nocapture",
            ])
            .env(INNER, s.config())
            .env("SOFTHSM2_CONF", s.dir.join("softhsm2.conf"))
            .env("SIGNET_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(in_process(std::path::PathBuf::from(config)));
}

async fn in_process(config: std::path::PathBuf) {
    let dir = config.parent().unwrap().to_path_buf();
    let app = signet::service::App::start(signet::config::Config::load(&config).unwrap())
        .await
        .unwrap();
    let state = ApiState {
        app: Arc::clone(&app),
        reload: Arc::new(|| {
            Err(signet::http::server::ReloadError::Config(
                signet::config::ConfigError::new("(test)", "no reload here"),
            ))
        }),
        body_budget: Arc::new(tokio::sync::Semaphore::new(1 << 20)),
        client_bodies: Arc::default(),
    };
    let identity = |client: &str| {
        let der = signet::pki::parse_pem_or_der(
            &std::fs::read(dir.join(format!("tls/clients/{client}.pem"))).unwrap(),
        )
        .unwrap();
        ClientIdentity::from_certificate(&der, |i| i.contains(client)).unwrap()
    };
    let call = |client: Option<&str>, method: Method, path: &str, body: Option<Value>| {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        if let Some(c) = client {
            req.extensions_mut()
                .insert(PeerIdentity(Arc::new(identity(c))));
        }
        let r = router(state.clone());
        async move {
            let resp = r.oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let content_type = resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                content_type,
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        }
    };

    // A signature through the router verifies with the certificate it returns.
    let (st, _, v) = call(
        Some("payroll-app"),
        Method::POST,
        "/v1/sign",
        Some(sign_body("payroll-esign", b"routed")),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert!(verifies(
        v["certificate"].as_str().unwrap(),
        b"routed",
        v["signature"].as_str().unwrap()
    ));
    // Every refusal is a problem document with its type.
    let cases: Vec<Case> = vec![
        (
            None,
            Method::GET,
            "/v1/keys/payroll",
            None,
            401,
            "client-certificate-required",
        ),
        (
            Some("payroll-app"),
            Method::POST,
            "/v1/sign",
            Some(sign_body("no-such-policy", b"x")),
            404,
            "unknown-policy",
        ),
        (
            Some("payroll-app"),
            Method::POST,
            "/v1/sign",
            Some(sign_body("procurement-esign", b"x")),
            403,
            "tenant-not-allowed",
        ),
        (
            Some("payroll-app"),
            Method::POST,
            "/v1/sign",
            Some(
                json!({"policy_id": "payroll-esign", "digest": "zz", "digest_algorithm": "sha256"}),
            ),
            400,
            "invalid-request",
        ),
        (
            Some("auditor"),
            Method::GET,
            "/v1/audit/entries?tenant=payroll&tenant=hr",
            None,
            400,
            "invalid-request",
        ),
        (
            Some("payroll-app"),
            Method::GET,
            "/v1/audit/entries/999999",
            None,
            404,
            "no-such-entry",
        ),
    ];
    for (client, method, path, body, status, slug) in cases {
        let (st, ct, p) = call(client, method.clone(), path, body).await;
        assert_eq!(st, status, "{method} {path}: {p}");
        assert_eq!(ct, "application/problem+json", "{method} {path}");
        assert_eq!(
            p["type"],
            format!("urn:signet:problem:{slug}"),
            "{method} {path}: {p}"
        );
        assert!(p["request_id"].is_string());
    }
    app.shutdown().await;
}
