//! Certificate lifecycle against a real SoftHSM token: scheduled and on-demand rotation
//! (signing never fails meanwhile), retirement after grace, a crash after every step, rollback,
//! manual issuance with an external (openssl) CA and every refusal, expiry metrics equal to the
//! certificates, and refusal to sign below min_remaining_validity.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::{Value, json};

/// Private keys in the token with this label (counted with pkcs11-tool).
fn private_keys_labelled(s: &Signet, label: &str) -> usize {
    s.pkcs11_tool(&["--list-objects", "--type", "privkey"])
        .lines()
        .filter(|l| l.trim() == format!("label:      {label}"))
        .count()
}

fn rotation_config(
    validity: &str,
    renew_before: &str,
    min_remaining: &str,
    grace: &str,
) -> impl Fn(String) -> String {
    let (v, r, m, g) = (
        validity.to_owned(),
        renew_before.to_owned(),
        min_remaining.to_owned(),
        grace.to_owned(),
    );
    move |c: String| {
        c.swap("validity = \"90d\"", &format!("validity = \"{v}\""))
            .swap("renew_before = \"30d\"", &format!("renew_before = \"{r}\""))
            .swap(
                "min_remaining_validity = \"1d\"",
                &format!("min_remaining_validity = \"{m}\""),
            )
            .swap("grace = \"7d\"", &format!("grace = \"{g}\""))
            .swap(
                "check_interval = \"1h\"",
                "check_interval = \"1s\"\nretry_initial = \"1s\"\nretry_max = \"2s\"",
            )
    }
}

async fn status(s: &Signet, tenant: &str) -> Value {
    let (st, v) = s.get("admin", "/v1/admin/rotations").await;
    assert_eq!(st, 200, "{v}");
    v["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == tenant)
        .cloned()
        .unwrap_or(Value::Null)
}

fn state_of(t: &Value, key_id: &str) -> String {
    t["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["key_id"] == key_id)
        .map(|v| v["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rotation_renews_before_expiry_retires_after_grace_and_never_pauses_signing() {
    let mut s = Signet::init(Init {
        keys: false,
        edit: Some(Box::new(rotation_config("20s", "15s", "2s", "3s"))),
        ..Default::default()
    });
    s.cli_ok(&[
        "keys",
        "create",
        "--tenant",
        "payroll",
        "--reason",
        "onboarding",
    ]);
    // Later certificates are long-lived, so exactly one scheduled renewal happens (v1 is due now).
    s.edit_config(|c| {
        c.swap("validity = \"20s\"", "validity = \"2h\"")
            .swap("renew_before = \"15s\"", "renew_before = \"1h\"")
    });
    s.start();
    let load = s.load(3);
    s.eventually(
        "v2 active and v1 retired",
        Duration::from_secs(30),
        || async {
            let t = status(&s, "payroll").await;
            state_of(&t, "payroll/v2") == "active" && state_of(&t, "payroll/v1") == "retired"
        },
    )
    .await;
    let run = load.finish().await;
    assert!(
        run.failed.is_empty(),
        "no request failed during the rotation: {:?}",
        run.failed
    );
    assert!(run.ok.len() > 20);
    assert!(
        run.keys_per_worker
            .iter()
            .all(|k| k.last().map(String::as_str) == Some("payroll/v2"))
    );

    // Retirement destroyed v1's private key and kept its certificate for verification.
    assert_eq!(private_keys_labelled(&s, "payroll/v1"), 0);
    assert_eq!(private_keys_labelled(&s, "payroll/v2"), 1);
    let (_, k) = s.get("payroll-app", "/v1/keys/payroll").await;
    let v1 = k["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == "payroll/v1")
        .unwrap()
        .clone();
    assert_eq!(v1["state"], "retired");
    assert!(v1["certificate"].is_string());

    // Evidence: the scheduler started it, with a reason; activation and retirement recorded.
    let entries = s.entries();
    let started = entries
        .iter()
        .find(|e| e["event"] == "rotation_started" && e["details"]["trigger"] == "scheduled")
        .expect("scheduled start");
    assert_eq!(started["actor"]["identity"], "signet/scheduler");
    assert!(
        started["reason"]
            .as_str()
            .unwrap()
            .contains("renewal window")
    );
    assert!(
        entries
            .iter()
            .any(|e| e["event"] == "key_activated" && e["key_id"] == "payroll/v2")
    );
    assert!(
        entries
            .iter()
            .any(|e| e["event"] == "key_retired" && e["key_id"] == "payroll/v1")
    );
    let m = s.metrics_text().await;
    assert!(metric_value(&m, "signet_rotations_total{outcome=\"completed\"}") >= 1.0);
    assert!(metric_value(&m, "signet_rotations_total{outcome=\"retired\"}") >= 1.0);
    assert_eq!(
        metric_value(
            &m,
            "signet_rotation_state{state=\"idle\",tenant=\"payroll\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_rotation_under_concurrent_signing_fails_no_request() {
    let mut s = Signet::init(Init::default());
    s.start();
    let load = s.load(8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = s.cli_ok(&[
        "--json",
        "rotate",
        "start",
        "--tenant",
        "payroll",
        "--reason",
        "quarterly rotation",
    ]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["step"], "completed");
    assert_eq!(r["to_version"], 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = load.finish().await;
    assert!(run.failed.is_empty(), "{:?}", run.failed);
    for k in run.keys_per_worker {
        assert_eq!(k.first().map(String::as_str), Some("payroll/v1"));
        assert_eq!(
            k.last().map(String::as_str),
            Some("payroll/v2"),
            "each signer switched to v2 and never back"
        );
        assert!(k.len() <= 2);
    }
    let t = status(&s, "payroll").await;
    assert_eq!(
        state_of(&t, "payroll/v1"),
        "retiring",
        "v1 verifies during grace, never signs"
    );
    assert_eq!(state_of(&t, "payroll/v2"), "active");
    let text = s.cli_ok(&["rotate", "status", "--tenant", "payroll"]);
    assert!(
        text.contains("payroll/v1") && text.contains("retiring") && text.contains("payroll/v2"),
        "{text}"
    );
    // A second rotation while none is in progress works; the reason is mandatory.
    let out = s.cli(&["rotate", "start", "--tenant", "payroll", "--reason", ""]);
    assert!(!out.status.success());

    // The log shows that v1 never signed after v2 was made active, and audit verify agrees.
    let entries = s.entries();
    let activated = entries
        .iter()
        .position(|e| e["event"] == "key_activated" && e["key_id"] == "payroll/v2")
        .expect("an activation entry");
    let late: Vec<&Value> = entries[activated..]
        .iter()
        .filter(|e| e["event"] == "signature" && e["key_id"] == "payroll/v1")
        .collect();
    assert!(late.is_empty(), "v1 signed after v2's activation: {late:?}");
    assert!(
        entries[..activated]
            .iter()
            .any(|e| e["event"] == "signature" && e["key_id"] == "payroll/v1"),
        "the load signed with v1 before the rotation"
    );
    assert!(
        entries[activated..]
            .iter()
            .any(|e| e["event"] == "signature" && e["key_id"] == "payroll/v2")
    );
    s.audit_verify(None);
}

#[cfg(feature = "insecure-test-hooks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_rotation_step_resumes_without_duplicates_or_gaps() {
    for step in [
        "planned",
        "key_generated",
        "certificate_received",
        "staged",
        "completed",
    ] {
        let mut s = Signet::init(Init::default());
        s.env
            .push(("SIGNET_INSECURE_CRASH_AFTER".into(), step.into()));
        s.start();
        let mut c = s.connect("admin").await;
        let _ = c
            .request(
                Method::POST,
                "/v1/admin/rotations",
                &[],
                Some(
                    json!({"tenant": "payroll", "reason": format!("crash test {step}")})
                        .to_string()
                        .into_bytes(),
                ),
            )
            .await;
        let exit = s.wait_exit(Duration::from_secs(20));
        assert!(!exit.success(), "{step}: the hook aborted the process");
        s.env.clear();
        s.start();
        // The monitor resumes the journaled rotation at start.
        s.eventually(
            &format!("rotation resumed after a crash at {step}"),
            Duration::from_secs(20),
            || async {
                let t = status(&s, "payroll").await;
                t["rotation"].is_null() && state_of(&t, "payroll/v2") == "active"
            },
        )
        .await;
        let t = status(&s, "payroll").await;
        assert_eq!(state_of(&t, "payroll/v1"), "retiring", "{step}");
        assert_eq!(
            t["versions"].as_array().unwrap().len(),
            2,
            "{step}: no v3, no duplicate"
        );
        assert_eq!(
            private_keys_labelled(&s, "payroll/v2"),
            1,
            "{step}: exactly one v2 key pair"
        );
        let (st, r) = s
            .sign("payroll-app", sign_body("payroll-esign", step.as_bytes()))
            .await;
        assert_eq!(st, 200, "{step}: {r}");
        assert_eq!(r["key_id"], "payroll/v2");
        assert!(s.stop().success());
        s.audit_verify(None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emergency_rotation_destroys_the_previous_key_at_once() {
    let mut s = Signet::init(Init::default());
    s.start();
    let (_, old) = s
        .sign("payroll-app", sign_body("payroll-esign", b"before"))
        .await;
    let out = s.cli_ok(&[
        "--json",
        "rotate",
        "start",
        "--tenant",
        "payroll",
        "--reason",
        "key suspected compromised (INC-7)",
        "--emergency",
    ]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r["step"].as_str(), r["emergency"].as_bool()),
        (Some("completed"), Some(true))
    );
    // No grace: v1 is retired (private key destroyed) without waiting for check_interval (1h).
    s.eventually("v1 retired", Duration::from_secs(10), || async {
        state_of(&status(&s, "payroll").await, "payroll/v1") == "retired"
    })
    .await;
    assert_eq!(private_keys_labelled(&s, "payroll/v1"), 0);
    let (_, new) = s
        .sign("payroll-app", sign_body("payroll-esign", b"after"))
        .await;
    assert_eq!(new["key_id"], "payroll/v2");
    // Old signatures still verify; the evidence says when the old key stopped.
    let v = json!({"key_id": "payroll/v1", "digest": digest_hex(b"before"), "signature": old["signature"]});
    let (_, _, ok) = s
        .call("payroll-app", Method::POST, "/v1/verify", Some(v), &[])
        .await;
    assert_eq!(ok["valid"], true);
    let entries = s.entries();
    let start = entries
        .iter()
        .find(|e| e["event"] == "rotation_started" && e["details"]["emergency"] == true)
        .unwrap();
    assert_eq!(start["reason"], "key suspected compromised (INC-7)");
    assert!(
        entries
            .iter()
            .any(|e| e["event"] == "key_retired" && e["key_id"] == "payroll/v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_during_grace_restores_the_previous_version() {
    let mut s = Signet::init(Init::default());
    s.start();
    let (_, before) = s
        .sign("payroll-app", sign_body("payroll-esign", b"before"))
        .await;
    s.cli_ok(&[
        "rotate", "start", "--tenant", "payroll", "--reason", "routine",
    ]);
    let (_, during) = s
        .sign("payroll-app", sign_body("payroll-esign", b"during"))
        .await;
    assert_eq!(during["key_id"], "payroll/v2");
    let out = s.cli_ok(&[
        "--json",
        "rotate",
        "rollback",
        "--tenant",
        "payroll",
        "--reason",
        "relying party rejects the new certificate",
    ]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["step"], "rolled_back");
    let (st, after) = s
        .sign("payroll-app", sign_body("payroll-esign", b"after"))
        .await;
    assert_eq!(st, 200);
    assert_eq!(after["key_id"], "payroll/v1");
    assert_eq!(after["certificate"], before["certificate"]);
    let t = status(&s, "payroll").await;
    assert_eq!(state_of(&t, "payroll/v1"), "active");
    assert_eq!(state_of(&t, "payroll/v2"), "retired");
    assert_eq!(
        private_keys_labelled(&s, "payroll/v2"),
        0,
        "the rolled-back key is destroyed"
    );
    // Signatures made by v2 still verify.
    let v = json!({"key_id": "payroll/v2", "digest": digest_hex(b"during"), "signature": during["signature"]});
    let (_, _, ok) = s
        .call("payroll-app", Method::POST, "/v1/verify", Some(v), &[])
        .await;
    assert_eq!(ok["valid"], true);
    let e = s
        .entries()
        .into_iter()
        .find(|e| e["event"] == "rotation_rolled_back")
        .unwrap();
    assert_eq!(e["reason"], "relying party rejects the new certificate");
    assert!(e["actor"]["identity"].as_str().unwrap().contains("admin"));
    // Nothing left to roll back to.
    let out = s.cli(&[
        "rotate", "rollback", "--tenant", "payroll", "--reason", "again",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no retiring version"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An external CA made with openssl (EC P-256), as an enterprise CA would be.
fn external_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{name}.key"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-x509",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "365",
            "-subj",
            &format!("/O=Example Corp/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// Import a certificate that must be accepted. The import answers once the version is active,
/// or (if a token call failed on the way) reports the step it will retry; either way the
/// version must become active.
async fn import_accepted(s: &Signet, file: &Path, reason: Option<&str>) {
    let mut args = vec![
        "certs",
        "import",
        "--tenant",
        "payroll",
        file.to_str().unwrap(),
    ];
    if let Some(r) = reason {
        args.extend(["--reason", r]);
    }
    let out = s.cli(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("step completed") || text.contains("retried with backoff"),
        "import refused: {text}"
    );
    s.eventually(
        "the imported version to be active",
        Duration::from_secs(15),
        || async { state_of(&status(s, "payroll").await, "payroll/v1") == "active" },
    )
    .await;
}

fn issue_with_openssl(dir: &Path, ca: &str, csr: &str, out: &str, days: &str) {
    issue_leaf(
        dir,
        ca,
        csr,
        out,
        days,
        "keyUsage=critical,digitalSignature,nonRepudiation\nextendedKeyUsage=1.3.6.1.5.5.7.3.36",
        &[],
    );
}

/// Issue a leaf with the given key usage lines and extra `openssl x509` arguments.
fn issue_leaf(dir: &Path, ca: &str, csr: &str, out: &str, days: &str, usage: &str, extra: &[&str]) {
    std::fs::write(
        dir.join("leaf.ext"),
        format!("basicConstraints=critical,CA:FALSE\n{usage}\n"),
    )
    .unwrap();
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        out,
        "-days",
        days,
        "-extfile",
        "leaf.ext",
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_issuance_accepts_the_right_certificate_and_refuses_each_wrong_one() {
    let mut s = Signet::init(Init {
        manual_issuer: true,
        keys: false,
        ..Default::default()
    });
    let work = s.dir.join("ca");
    std::fs::create_dir_all(&work).unwrap();
    external_ca(&work, "corp-ca");
    external_ca(&work, "other-ca");
    s.edit_config(|c| {
        c.swap(
            "ca_certificate = \"hsm-ca.pem\"",
            "ca_certificate = \"ca/corp-ca.pem\"",
        )
        .swap(
            "min_remaining_validity = \"1d\"",
            "min_remaining_validity = \"2d\"",
        )
    });
    s.start();

    let out = s.cli_ok(&[
        "keys",
        "create",
        "--tenant",
        "payroll",
        "--reason",
        "onboarding with the corporate CA",
    ]);
    assert!(out.contains("awaiting_certificate"), "{out}");
    let csr = work.join("payroll.csr");
    s.cli_ok(&[
        "certs",
        "csr",
        "--tenant",
        "payroll",
        "--out",
        csr.to_str().unwrap(),
    ]);
    openssl(&work, &["req", "-in", "payroll.csr", "-verify", "-noout"]);
    let (st, p) = s
        .sign("payroll-app", sign_body("payroll-esign", b"x"))
        .await;
    assert_eq!(
        (st, p["type"].as_str()),
        (503, Some("urn:signet:problem:no-active-key")),
        "no signing before a certificate"
    );

    // Wrong certificates, each refused with its reason; nothing changes.
    openssl(
        &work,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "stranger.key",
        ],
    );
    openssl(
        &work,
        &[
            "req",
            "-new",
            "-key",
            "stranger.key",
            "-subj",
            "/CN=stranger",
            "-out",
            "stranger.csr",
        ],
    );
    issue_with_openssl(&work, "corp-ca", "stranger.csr", "wrong-key.pem", "90");
    issue_with_openssl(&work, "other-ca", "payroll.csr", "wrong-ca.pem", "90");
    // Valid for a day: below the 2-day minimum remaining validity.
    issue_with_openssl(&work, "corp-ca", "payroll.csr", "too-short.pem", "1");
    std::fs::write(
        work.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n",
    )
    .unwrap();
    openssl(
        &work,
        &[
            "x509",
            "-req",
            "-in",
            "payroll.csr",
            "-CA",
            "corp-ca.pem",
            "-CAkey",
            "corp-ca.key",
            "-CAcreateserial",
            "-out",
            "ca-flagged.pem",
            "-days",
            "90",
            "-extfile",
            "ca.ext",
        ],
    );
    let ds = "keyUsage=critical,digitalSignature";
    issue_leaf(
        &work,
        "corp-ca",
        "payroll.csr",
        "wrong-subject.pem",
        "90",
        ds,
        &["-subj", "/O=Signet/CN=hr v1"],
    );
    issue_leaf(
        &work,
        "corp-ca",
        "payroll.csr",
        "key-encipherment.pem",
        "90",
        "keyUsage=critical,keyEncipherment",
        &[],
    );
    issue_leaf(
        &work,
        "corp-ca",
        "payroll.csr",
        "server-auth.pem",
        "90",
        &format!("{ds}\nextendedKeyUsage=serverAuth"),
        &[],
    );
    std::fs::write(
        work.join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    for (file, reason) in [
        ("wrong-key.pem", "does not match the key version's key"),
        ("wrong-ca.pem", "not issued by the configured CA"),
        ("too-short.pem", "less than the required"),
        ("ca-flagged.pem", "is a CA certificate"),
        ("other-ca.pem", "does not match the key version's key"),
        ("garbage.pem", "not a valid X.509 certificate"),
        ("wrong-subject.pem", "differs from the requested"),
        ("key-encipherment.pem", "does not include digitalSignature"),
        ("server-auth.pem", "does not allow document signing"),
    ] {
        let out = s.cli(&[
            "certs",
            "import",
            "--tenant",
            "payroll",
            work.join(file).to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} must be refused");
        assert!(err.contains(reason), "{file}: {err}");
        let t = status(&s, "payroll").await;
        assert_eq!(
            t["rotation"]["step"], "awaiting_certificate",
            "{file}: unchanged"
        );
    }
    assert!(
        s.entries()
            .iter()
            .all(|e| e["event"] != "certificate_imported")
    );

    // The right one: chains to the corporate CA, key matches, validity fine.
    issue_with_openssl(&work, "corp-ca", "payroll.csr", "payroll.pem", "90");
    import_accepted(
        &s,
        &work.join("payroll.pem"),
        Some("issued by corp CA ticket 42"),
    )
    .await;
    let (st, r) = s
        .sign("payroll-app", sign_body("payroll-esign", b"contract"))
        .await;
    assert_eq!(st, 200, "{r}");
    assert!(verifies(
        r["certificate"].as_str().unwrap(),
        b"contract",
        r["signature"].as_str().unwrap()
    ));
    std::fs::write(
        work.join("returned.pem"),
        r["certificate"].as_str().unwrap(),
    )
    .unwrap();
    openssl(&work, &["verify", "-CAfile", "corp-ca.pem", "returned.pem"]);
    let imported = s
        .entries()
        .into_iter()
        .find(|e| e["event"] == "certificate_imported")
        .unwrap();
    assert_eq!(imported["reason"], "issued by corp CA ticket 42");
    let table = s.cli_ok(&["certs", "status"]);
    assert!(
        table.contains("payroll/v1") && table.contains("active"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_metrics_equal_the_certificates() {
    let mut s = Signet::init(Init::default());
    s.start();
    s.cli_ok(&[
        "rotate",
        "start",
        "--tenant",
        "procurement",
        "--reason",
        "metrics test",
    ]);
    let m = s.metrics_text().await;
    let (_, keys) = s.get("admin", "/v1/admin/keys").await;
    for k in keys["keys"].as_array().unwrap() {
        let pem = k["certificate"].as_str().unwrap();
        let info =
            signet::pki::CertInfo::parse(&signet::pki::parse_pem_or_der(pem.as_bytes()).unwrap())
                .unwrap();
        let key_id = k["key_id"].as_str().unwrap();
        let tenant = key_id.split('/').next().unwrap();
        let state = k["state"].as_str().unwrap();
        let labels = format!("{{key_id=\"{key_id}\",state=\"{state}\",tenant=\"{tenant}\"}}");
        // openssl's reading of notAfter agrees with ours.
        std::fs::write(s.dir.join("m.pem"), pem).unwrap();
        let end = Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-in"])
            .arg(s.dir.join("m.pem"))
            .output()
            .unwrap();
        let end = String::from_utf8_lossy(&end.stdout)
            .trim()
            .trim_start_matches("notAfter=")
            .to_owned();
        let parsed = Command::new("date")
            .args(["-u", "-d", &end, "+%s"])
            .output()
            .unwrap();
        let openssl_not_after: u64 = String::from_utf8_lossy(&parsed.stdout)
            .trim()
            .parse()
            .unwrap();
        assert_eq!(info.not_after, openssl_not_after);
        assert_eq!(
            metric_value(
                &m,
                &format!("signet_certificate_not_after_timestamp_seconds{labels}")
            ),
            info.not_after as f64,
            "{labels}\n{m}"
        );
        assert_eq!(
            metric_value(
                &m,
                &format!("signet_certificate_not_before_timestamp_seconds{labels}")
            ),
            info.not_before as f64
        );
        if state == "active" {
            assert_eq!(
                metric_value(&m, &format!("signet_certificate_renewal_due{labels}")),
                0.0
            );
        }
    }
    assert!(m.contains("signet_certificate_not_after_timestamp_seconds{key_id=\"procurement/v1\",state=\"retiring\",tenant=\"procurement\"}"));
    let json_status: Value =
        serde_json::from_str(&s.cli_ok(&["--json", "certs", "status"])).unwrap();
    assert_eq!(json_status.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_stops_below_min_remaining_validity_with_a_metric() {
    // Manual issuer: no automatic renewal can rescue the tenant during the test.
    let mut s = Signet::init(Init {
        manual_issuer: true,
        keys: false,
        edit: Some(Box::new(rotation_config("1h", "50m", "40m", "1h"))),
        ..Default::default()
    });
    let work = s.dir.join("ca");
    std::fs::create_dir_all(&work).unwrap();
    external_ca(&work, "corp-ca");
    s.edit_config(|c| {
        c.swap(
            "ca_certificate = \"hsm-ca.pem\"",
            "ca_certificate = \"ca/corp-ca.pem\"",
        )
    });
    s.start();
    s.cli_ok(&[
        "keys",
        "create",
        "--tenant",
        "payroll",
        "--reason",
        "onboarding",
    ]);
    s.cli_ok(&[
        "certs",
        "csr",
        "--tenant",
        "payroll",
        "--out",
        work.join("p.csr").to_str().unwrap(),
    ]);
    issue_with_openssl(&work, "corp-ca", "p.csr", "p.pem", "1");
    // Accepted with 40m minimum... then the minimum is raised above what is left.
    import_accepted(&s, &work.join("p.pem"), None).await;
    assert_eq!(
        s.sign("payroll-app", sign_body("payroll-esign", b"ok"))
            .await
            .0,
        200
    );
    s.edit_config(|c| {
        c.swap("validity = \"1h\"", "validity = \"30d\"")
            .swap("renew_before = \"50m\"", "renew_before = \"3d\"")
            .swap(
                "min_remaining_validity = \"40m\"",
                "min_remaining_validity = \"2d\"",
            )
    });
    let (st, _, _) = s
        .call("admin", Method::POST, "/v1/admin/reload", None, &[])
        .await;
    assert_eq!(st, 200);
    let (st, h, p) = s
        .call(
            "payroll-app",
            Method::POST,
            "/v1/sign",
            Some(sign_body("payroll-esign", b"late")),
            &[],
        )
        .await;
    assert_eq!(st, 503, "{p}");
    assert_eq!(p["type"], "urn:signet:problem:certificate-expiring");
    assert!(h.get("retry-after").is_some());
    assert!(p["detail"].as_str().unwrap().contains("payroll/v1"));
    s.eventually("the unusable-certificate metric", Duration::from_secs(10), || async {
        s.metric("signet_certificate_unusable{key_id=\"payroll/v1\",state=\"active\",tenant=\"payroll\"}").await == 1.0
    })
    .await;
    assert_eq!(s.metric("signet_sign_requests_total{outcome=\"certificate_unusable\",policy=\"payroll-esign\",tenant=\"payroll\"}").await, 1.0);
    assert!(
        s.entries()
            .iter()
            .filter(|e| e["event"] == "signature")
            .count()
            == 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_active_private_key_was_lost_recovers_by_an_evidenced_rotation() {
    let mut s = Signet::init(Init::default());
    s.start();
    assert!(s.stop().success());
    // The active private key disappears from the token (an incident, a mistaken cleanup).
    let id = hex::encode("payroll/v1");
    s.pkcs11_tool(&["--delete-object", "--type", "privkey", "--id", &id]);
    s.start();
    let (st, p) = s
        .sign("payroll-app", sign_body("payroll-esign", b"no key"))
        .await;
    assert_eq!(
        (st, p["type"].as_str()),
        (503, Some("urn:signet:problem:no-active-key"))
    );
    // `keys create` refuses (the tenant has keys) and says what recovers it.
    let out = s.cli(&["keys", "create", "--tenant", "payroll", "--reason", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("that rotation recovers the tenant"), "{err}");
    // The way out: an operator's rotation to a new version, recorded as a recovery.
    let out = s.cli_ok(&[
        "--json",
        "rotate",
        "start",
        "--tenant",
        "payroll",
        "--reason",
        "INC-77: active private key lost",
    ]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r["step"].as_str(), r["to_version"].as_u64()),
        (Some("completed"), Some(2))
    );
    let (st, v) = s
        .sign("payroll-app", sign_body("payroll-esign", b"recovered"))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["key_id"], "payroll/v2");
    assert!(verifies(
        v["certificate"].as_str().unwrap(),
        b"recovered",
        v["signature"].as_str().unwrap()
    ));
    let entries = s.entries();
    let started = entries
        .iter()
        .rev()
        .find(|e| e["event"] == "rotation_started")
        .unwrap();
    assert_eq!(started["details"]["recovery"], true);
    assert_eq!(started["reason"], "INC-77: active private key lost");
    assert!(
        entries
            .iter()
            .any(|e| e["event"] == "key_activated" && e["key_id"] == "payroll/v2")
    );
    assert!(s.stop().success());
    s.audit_verify(None);
}
