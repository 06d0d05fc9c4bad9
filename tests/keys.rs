//! Tenant keys in the token: created by the CLI (in-process and through a running service),
//! protected (sensitive, never extractable, token objects, checked with pkcs11-tool), and
//! rebuilt from the token alone after a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// The pkcs11-tool paragraph of the private key labelled `label`.
fn private_key_block(objects: &str, label: &str) -> Option<String> {
    objects
        .split("Private Key Object")
        .skip(1)
        .find(|b| {
            b.lines()
                .any(|l| l.trim() == format!("label:      {label}"))
        })
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_create_in_process_and_online_and_the_token_alone_rebuilds_the_registry() {
    let mut s = Signet::init(Init {
        keys: false,
        ..Default::default()
    });

    // No service running: the CLI acts on the token directly.
    s.cli_ok(&[
        "keys",
        "create",
        "--tenant",
        "payroll",
        "--reason",
        "onboarding payroll",
    ]);
    let objects = s.pkcs11_tool(&["-O"]);
    let block =
        private_key_block(&objects, "payroll/v1").expect("private key payroll/v1 in the token");
    assert!(
        block.contains("sensitive, always sensitive, never extractable"),
        "{block}"
    );
    assert!(
        block
            .lines()
            .find(|l| l.trim_start().starts_with("Usage:"))
            .is_some_and(|l| l.trim() == "Usage:      sign"),
        "sign-only key: {block}"
    );
    assert!(
        objects.contains("label:      payroll/v1") && objects.contains("Certificate Object"),
        "certificate stored next to the key"
    );
    // A second create for the same tenant is refused precisely.
    let again = s.cli(&["keys", "create", "--tenant", "payroll", "--reason", "oops"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already has keys"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    s.start();
    let (status, r) = s
        .sign("payroll-app", sign_body("payroll-esign", b"doc"))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["key_id"], "payroll/v1");
    assert!(verifies(
        r["certificate"].as_str().unwrap(),
        b"doc",
        r["signature"].as_str().unwrap()
    ));
    // procurement has no key yet: 503 with a precise problem.
    let (status, p) = s
        .sign("procurement-app", sign_body("procurement-esign", b"doc"))
        .await;
    assert_eq!(status, 503);
    assert_eq!(p["type"], "urn:signet:problem:no-active-key");

    // With the service running, the CLI goes through the admin API.
    let out = s.cli_ok(&[
        "--json",
        "keys",
        "create",
        "--tenant",
        "procurement",
        "--reason",
        "onboarding procurement",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["step"], "completed");
    let (status, r) = s
        .sign("procurement-app", sign_body("procurement-esign", b"doc"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(r["key_id"], "procurement/v1");
    let listing = s.cli_ok(&["keys", "list"]);
    assert!(
        listing.contains("payroll/v1")
            && listing.contains("procurement/v1")
            && listing.contains("active"),
        "{listing}"
    );

    // Both actions are evidence, with actor and reason.
    let entries = s.entries();
    let created: Vec<_> = entries
        .iter()
        .filter(|e| e["event"] == "rotation_started")
        .collect();
    assert_eq!(created.len(), 2);
    assert!(
        created[0]["actor"]["identity"]
            .as_str()
            .unwrap()
            .starts_with("local:")
    );
    assert_eq!(created[0]["reason"], "onboarding payroll");
    assert_eq!(created[1]["actor"]["identity"], "spiffe://signet.dev/admin");

    // Restart with the state file gone: the token alone rebuilds the registry.
    assert!(s.stop().success());
    std::fs::remove_file(s.dir.join("state/keys.json")).unwrap();
    s.start();
    let (status, r) = s
        .sign("payroll-app", sign_body("payroll-esign", b"after restart"))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["key_id"], "payroll/v1");
    let (_, k) = s.get("admin", "/v1/admin/keys").await;
    let states: Vec<(String, String)> = k["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().to_owned(),
                k["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("payroll/v1".into(), "active".into()),
            ("procurement/v1".into(), "active".into())
        ]
    );
}
