//! The API contract: `openapi.yaml` is served at `GET /v1/openapi.json`, and an independent
//! tool, schemathesis (PyPI), attacks the live service over mTLS with inputs generated from it:
//! no 5xx, no response outside the document, every error `application/problem+json`.
//!
//! CI runs a short, seeded run. A longer one on demand:
//! `SIGNET_SCHEMATHESIS_EXAMPLES=500 cargo test --features insecure-test-hooks --test openapi`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_contract_violation() {
    let mut s = Signet::init(Init::default());
    s.start();
    // The document served is the one in the repository.
    let (st, served) = s.get("auditor", "/v1/openapi.json").await;
    assert_eq!(st, 200);
    let yaml = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml"))
        .unwrap();
    let doc: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(served, doc);
    let spec = s.dir.join("openapi.json");
    std::fs::write(&spec, served.to_string()).unwrap();

    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/api-tools/bin/schemathesis");
    assert!(
        tool.exists(),
        "schemathesis is not installed: run softhsm/setup.sh --test"
    );
    let examples = std::env::var("SIGNET_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "25".into());
    let tls = s.dir.join("tls");
    let out = Command::new(&tool)
        .arg("run")
        .arg(&spec)
        .args(["--url", &format!("https://localhost:{}", s.api.port())])
        .arg("--request-cert")
        .arg(tls.join("clients/admin.pem"))
        .arg("--request-cert-key")
        .arg(tls.join("clients/admin.key"))
        .arg("--tls-verify")
        .arg(tls.join("ca.pem"))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection",
            "--max-examples",
            &examples,
            "--seed",
            "20261130",
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(&s.dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(!text.contains("Server error"), "{text}");
    // The service is still healthy afterwards.
    let (st, v) = s
        .sign(
            "payroll-app",
            sign_body("payroll-esign", b"after the fuzzing"),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}
