//! Retention, legal holds and erasure of signer evidence, as an operator sees them: the signer
//! object never at rest in clear (files, database dump), readable through the API while it
//! exists, erased by the sweep or a subject's request, with every proof still valid; holds;
//! and a vault backup that the key rotation makes unreadable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use hyper::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The development installation with `payroll-esign` retaining signer evidence for
/// `retention` (class `short`) and the sweep every `sweep`.
fn with_retention(retention: &str, sweep: &str) -> Signet {
    let (retention, sweep) = (retention.to_owned(), sweep.to_owned());
    Signet::init(Init {
        edit: Some(Box::new(move |c| {
            format!(
                "{}\n[retention]\nsweep_interval = \"{sweep}\"\n",
                c.swap(
                    "id = \"payroll-esign\"\ntenant = \"payroll\"\n",
                    &format!(
                        "id = \"payroll-esign\"\ntenant = \"payroll\"\nretention = \"{retention}\"\nretention_class = \"short\"\n"
                    ),
                )
            )
        })),
        ..Default::default()
    })
}

/// A unique email address for one test's data subject.
fn email(what: &str) -> String {
    format!("{what}-{}@example.com", uuid::Uuid::new_v4().simple())
}

/// Sign `data` for `subject` in `transaction`; the receipt's index.
async fn sign_for(s: &Signet, policy: &str, data: &[u8], subject: &str, transaction: &str) -> u64 {
    signed_for(s, policy, data, subject, transaction).await["receipt"]["index"]
        .as_u64()
        .unwrap()
}

/// Sign `data` for `subject` in `transaction`; the response.
async fn signed_for(
    s: &Signet,
    policy: &str,
    data: &[u8],
    subject: &str,
    transaction: &str,
) -> Value {
    let client = if policy.starts_with("payroll") {
        "payroll-app"
    } else {
        "procurement-app"
    };
    let mut body = sign_body(policy, data);
    body["transaction_id"] = json!(transaction);
    body["signer"] = json!({"email": subject, "name": "Data Subject", "ip": "192.0.2.77"});
    let (st, r) = s.sign(client, body).await;
    assert_eq!(st, 200, "{r}");
    r
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(files_containing(&p, needle));
        } else if let Ok(b) = std::fs::read(&p)
            && b.windows(needle.len()).any(|w| w == needle.as_bytes())
        {
            found.push(p.display().to_string());
        }
    }
    found
}

/// The signer evidence the API shows for entry `index` (waiting for its checkpoint).
async fn evidence_of(s: &Signet, index: u64) -> Value {
    s.checkpoint_covering(index + 1).await;
    let (st, v) = s.get("admin", &format!("/v1/audit/entries/{index}")).await;
    assert_eq!(st, 200, "{v}");
    v
}

/// The commitment recomputed here, independently: SHA-256(domain ‖ salt ‖ JCS(signer)).
fn commitment(salt_b64: &str, signer: &Value) -> String {
    let mut h = Sha256::new();
    h.update(b"signet signer commitment v1\0");
    h.update(B64.decode(salt_b64).unwrap());
    h.update(serde_json_canonicalizer::to_vec(signer).unwrap());
    hex::encode(h.finalize())
}

fn assert_nowhere_in_clear(s: &Signet, needle: &str) {
    let mut found = files_containing(&s.dir.join("audit"), needle);
    found.extend(files_containing(&s.dir.join("state"), needle));
    assert!(found.is_empty(), "`{needle}` found in clear in {found:?}");
    assert!(!s.log().contains(needle), "`{needle}` in the service log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signer_evidence_is_kept_apart_readable_then_erased_by_the_sweep_with_proofs_intact() {
    let mut s = with_retention("4s", "1s");
    s.start();
    let gone = email("gone");
    let kept = email("kept");
    let response = signed_for(&s, "payroll-esign", b"short contract", &gone, "ret-1").await;
    let i = response["receipt"]["index"].as_u64().unwrap();
    let j = sign_for(&s, "procurement-esign", b"long contract", &kept, "ret-2").await;

    // The entry commits to the evidence; the API shows it, and it matches the commitment.
    let v = evidence_of(&s, i).await;
    let e = &v["entry"];
    assert!(e.get("signer").is_none(), "{e}");
    assert_eq!(e["retention_class"], "short");
    let retain_until = signet::clock::parse_rfc3339(e["retain_until"].as_str().unwrap()).unwrap();
    let signed_at = signet::clock::parse_rfc3339(e["time"].as_str().unwrap()).unwrap();
    assert!((3..=5).contains(&(retain_until - signed_at)), "{e}");
    let ev = &v["signer_evidence"];
    assert_eq!(ev["state"], "present", "{v}");
    assert_eq!(ev["signer"]["email"], gone.as_str());
    assert_eq!(
        commitment(ev["salt"].as_str().unwrap(), &ev["signer"]),
        e["signer_commitment"].as_str().unwrap()
    );
    // The policy without retention: kept without limit.
    let w = evidence_of(&s, j).await;
    assert_eq!(w["entry"]["retention_class"], "default");
    assert!(w["entry"].get("retain_until").is_none());
    assert_nowhere_in_clear(&s, &gone);
    assert_nowhere_in_clear(&s, &kept);

    // The sweep erases it once its retention ended; the other stays.
    s.eventually(
        "the sweep erases the short-retention record",
        Duration::from_secs(20),
        || async { evidence_of(&s, i).await["signer_evidence"]["state"] == "erased" },
    )
    .await;
    let v = evidence_of(&s, i).await;
    assert_eq!(v["signer_evidence"]["cause"], "retention");
    let erasure = v["signer_evidence"]["erasure_entry"].as_u64().unwrap();
    assert_eq!(
        evidence_of(&s, j).await["signer_evidence"]["state"],
        "present"
    );
    // The erasure is evidence itself, naming the range.
    let entries = s.entries();
    let er = &entries[erasure as usize];
    assert_eq!(er["event"], "evidence_erased");
    assert_eq!(er["details"]["cause"], "retention");
    assert!(
        er["details"]["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r[0].as_u64().unwrap() <= i && i <= r[1].as_u64().unwrap()),
        "{er}"
    );
    assert!(
        s.metric("signet_evidence_erased_total{cause=\"retention\"}")
            .await
            >= 1.0
    );
    assert_eq!(s.metric("signet_retention_sweep_lag_seconds").await, 0.0);
    assert_nowhere_in_clear(&s, &gone);

    // Proofs, bundles and the whole log still verify; the bundle says what happened.
    let file = s.dir.join("ret-1.bundle.json");
    s.cli_ok(&[
        "audit",
        "export",
        "--transaction",
        "ret-1",
        "--out",
        file.to_str().unwrap(),
    ]);
    let out = run_ok(
        std::process::Command::new(BIN)
            .args(["bundle", "verify"])
            .arg(&file)
            .arg("--ca")
            .arg(s.dir.join("hsm-ca.pem"))
            .arg("--log-key")
            .arg(s.audit_dir().join("log-key.pem")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Signer evidence erased on"), "{text}");
    assert!(text.contains("retention period ended"), "{text}");
    assert!(!text.contains(&gone));
    // The receipt the client kept still verifies offline.
    let work = s.dir.join("receipt");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("response.json"), response.to_string()).unwrap();
    let proof = evidence_of(&s, i).await["proof"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(work.join("entry.tlog-proof"), proof).unwrap();
    let out = run_ok(
        std::process::Command::new(BIN)
            .args(["receipt", "verify", "--receipt"])
            .arg(work.join("response.json"))
            .arg("--proof")
            .arg(work.join("entry.tlog-proof"))
            .arg("--log-key")
            .arg(s.audit_dir().join("log-key.pem"))
            .arg("--ca")
            .arg(s.dir.join("hsm-ca.pem")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("VERIFIED"), "{text}");
    s.stop();
    s.audit_verify(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legal_hold_keeps_records_past_retention_until_it_is_released() {
    let mut s = with_retention("2s", "1s");
    s.start();
    let held = email("held");
    let free = email("free");
    let h = sign_for(&s, "payroll-esign", b"disputed", &held, "dispute-9").await;
    let f = sign_for(&s, "payroll-esign", b"undisputed", &free, "other-9").await;
    let out = s.cli_ok(&[
        "holds",
        "add",
        "--transaction",
        "dispute-9",
        "--reason",
        "litigation hold, case 2026-41",
    ]);
    let id = out.split_whitespace().nth(2).unwrap().to_owned();
    assert!(id.starts_with("hold-"), "{out}");
    s.eventually(
        "the unheld record is erased",
        Duration::from_secs(20),
        || async { evidence_of(&s, f).await["signer_evidence"]["state"] == "erased" },
    )
    .await;
    // Past its retention, swept at least once more since: still there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        evidence_of(&s, h).await["signer_evidence"]["state"],
        "present"
    );
    assert_eq!(s.metric("signet_legal_holds").await, 1.0);
    let list = s.cli_ok(&["--json", "holds", "list"]);
    let holds: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(holds[0]["id"], id.as_str());
    assert_eq!(holds[0]["transaction_id"], "dispute-9");
    assert!(holds[0].get("released").is_none());
    // Subject erasure cannot take it either.
    let (ok, text) = outcome(s.cli(&[
        "evidence",
        "erase",
        "--subject",
        &held,
        "--reason",
        "erasure request 12",
        "--override-retention",
    ]));
    assert!(!ok && text.contains("legal hold"), "{text}");

    s.cli_ok(&["holds", "release", &id, "--reason", "case settled"]);
    s.eventually(
        "the released record is erased",
        Duration::from_secs(20),
        || async { evidence_of(&s, h).await["signer_evidence"]["state"] == "erased" },
    )
    .await;
    let events: Vec<String> = s
        .entries()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    for ev in [
        "legal_hold_placed",
        "legal_hold_released",
        "evidence_erased",
    ] {
        assert!(events.iter().any(|e| e == ev), "no {ev} in {events:?}");
    }
    let placed = s
        .entries()
        .into_iter()
        .find(|e| e["event"] == "legal_hold_placed")
        .unwrap();
    assert_eq!(placed["transaction_id"], "dispute-9");
    assert_eq!(placed["reason"], "litigation hold, case 2026-41");
    assert_eq!(s.metric("signet_legal_holds").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_erasure_is_refused_within_retention_and_done_after_it_or_with_override() {
    // The sweep runs at start and then not for an hour: erasure is the subject request's.
    let mut s = with_retention("5s", "1h");
    s.start();
    let ann = email("ann");
    let bob = email("bob");
    let a1 = sign_for(&s, "payroll-esign", b"a1", &ann, "ann-1").await;
    let a2 = sign_for(&s, "payroll-esign", b"a2", &ann.to_uppercase(), "ann-2").await;
    let b1 = sign_for(&s, "procurement-esign", b"b1", &bob, "bob-1").await;
    let erase = |subject: &str, extra: &[&str]| {
        let mut args = vec![
            "--json",
            "evidence",
            "erase",
            "--subject",
            subject,
            "--reason",
            "GDPR art. 17 request 2026-88",
        ];
        args.extend_from_slice(extra);
        outcome(s.cli(&args))
    };
    let (ok, text) = erase(&ann, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("within their retention period"), "{text}");
    assert_eq!(
        evidence_of(&s, a1).await["signer_evidence"]["state"],
        "present"
    );
    // A policy without retention keeps it without limit, unless overridden.
    let (ok, text) = erase(&bob, &[]);
    assert!(!ok && text.contains("without limit"), "{text}");
    let (ok, text) = erase("nobody@example.com", &[]);
    assert!(!ok && text.contains("no signer evidence"), "{text}");

    tokio::time::sleep(Duration::from_secs(6)).await;
    let (ok, text) = erase(&ann, &[]);
    assert!(ok, "{text}");
    let a: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        a["found"], 2,
        "both records, whatever the case of the address"
    );
    assert_eq!(a["erased"], 2);
    for i in [a1, a2] {
        let ev = evidence_of(&s, i).await;
        assert_eq!(ev["signer_evidence"]["state"], "erased", "{ev}");
        assert_eq!(ev["signer_evidence"]["cause"], "subject");
    }
    let (ok, text) = erase(&bob, &["--override-retention"]);
    assert!(ok, "{text}");
    assert_eq!(
        evidence_of(&s, b1).await["signer_evidence"]["state"],
        "erased"
    );
    let er = s
        .entries()
        .into_iter()
        .rfind(|e| e["event"] == "evidence_erased")
        .unwrap();
    assert_eq!(er["details"]["cause"], "subject");
    assert!(
        er["reason"]
            .as_str()
            .unwrap()
            .contains("retention overridden")
    );
    assert_ne!(
        er["actor"]["identity"], "signet/retention",
        "the operator acted, not the sweep"
    );
    assert!(
        !er.to_string().contains(&bob),
        "the subject is not named in the log"
    );
    assert!(
        s.metric("signet_evidence_erased_total{cause=\"subject\"}")
            .await
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_backup_from_before_an_erasure_is_unreadable_after_the_key_rotation() {
    let mut s = with_retention("1h", "1h");
    s.start();
    let eve = email("eve");
    let i = sign_for(&s, "payroll-esign", b"eve's contract", &eve, "eve-1").await;
    assert_eq!(
        evidence_of(&s, i).await["signer_evidence"]["state"],
        "present"
    );
    let vault = s.audit_dir().join("vault");
    let backup = s.dir.join("vault-backup");
    copy_records(&vault, &backup);

    s.cli_ok(&[
        "evidence",
        "erase",
        "--subject",
        &eve,
        "--reason",
        "erasure request 5",
        "--override-retention",
    ]);
    assert_eq!(
        evidence_of(&s, i).await["signer_evidence"]["state"],
        "erased"
    );
    // Before the rotation the backup still holds a readable copy: this is why it exists.
    s.stop();
    let erased = s.dir.join("vault-erased");
    copy_records(&vault, &erased);
    copy_records(&backup, &vault);
    s.start();
    assert_eq!(
        evidence_of(&s, i).await["signer_evidence"]["state"],
        "present"
    );
    s.stop();
    copy_records(&erased, &vault);
    s.start();

    let out = s.cli_ok(&[
        "--json",
        "evidence",
        "rotate-key",
        "--reason",
        "after erasure 5",
    ]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["from_generation"], 1);
    assert_eq!(r["to_generation"], 2);
    assert_eq!(r["destroyed"], json!([1]));
    let objects = s.pkcs11_tool(&["--list-objects", "--type", "secrkey"]);
    assert!(
        objects.contains("signet-vault-kek-2") || objects.contains("key-encryption key 2"),
        "{objects}"
    );
    assert!(!objects.contains("key-encryption key 1"), "{objects}");
    assert_eq!(s.metric("signet_vault_key_generation").await, 2.0);
    let rotated = s
        .entries()
        .into_iter()
        .find(|e| e["event"] == "vault_key_rotated")
        .unwrap();
    assert_eq!(rotated["details"]["destroyed_generations"], json!([1]));

    // A record signed before the rotation (re-wrapped) and one after are still readable...
    let k = sign_for(
        &s,
        "payroll-esign",
        b"after rotation",
        &email("kim"),
        "kim-1",
    )
    .await;
    assert_eq!(
        evidence_of(&s, k).await["signer_evidence"]["state"],
        "present"
    );
    // ...and the backup of the erased record no longer is.
    s.stop();
    copy_records(&backup, &vault);
    s.start();
    let v = evidence_of(&s, i).await;
    assert_eq!(v["signer_evidence"]["state"], "unreadable", "{v}");
    assert!(
        v["signer_evidence"]["detail"]
            .as_str()
            .unwrap()
            .contains("generation 1"),
        "{v}"
    );
    assert_nowhere_in_clear(&s, &eve);
}

/// Copy the vault's record files (not its key state) from `from` to `to`, replacing them.
fn copy_records(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(to).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("records-") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("records-") {
            std::fs::copy(e.path(), to.join(name)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_no_dump_holds_the_signer_and_the_sweep_erases_on_every_replica() {
    let pg = pg::Postgres::start();
    let mut s = init_postgres(&pg, "retention");
    s.edit_config(|c| {
        format!(
            "{}\n[retention]\nsweep_interval = \"1s\"\n",
            c.swap(
                "id = \"payroll-esign\"\ntenant = \"payroll\"\n",
                "id = \"payroll-esign\"\ntenant = \"payroll\"\nretention = \"4s\"\nretention_class = \"short\"\n",
            )
        )
    });
    s.start();
    let mut b = s.replica("b");
    b.start();
    let zoe = email("zoe");
    let i = sign_for(&s, "payroll-esign", b"zoe's contract", &zoe, "zoe-1").await;
    // The other replica reads it from the shared vault.
    b.checkpoint_covering(i + 1).await;
    let (st, v) = b.get("admin", &format!("/v1/audit/entries/{i}")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["signer_evidence"]["signer"]["email"], zoe.as_str());
    let dump = s.dir.join("before.sql");
    pg.dump("retention", &dump);
    assert!(!std::fs::read_to_string(&dump).unwrap().contains(&zoe));
    assert!(files_containing(&s.dir, &zoe).is_empty());

    s.eventually(
        "the leader's sweep erases it",
        Duration::from_secs(25),
        || async {
            let (_, v) = b.get("admin", &format!("/v1/audit/entries/{i}")).await;
            v["signer_evidence"]["state"] == "erased"
        },
    )
    .await;
    let dump = s.dir.join("after.sql");
    pg.dump("retention", &dump);
    let text = std::fs::read_to_string(&dump).unwrap();
    assert!(!text.contains(&zoe));
    assert!(
        text.contains("retention period ended"),
        "the erasure is recorded"
    );
    b.stop();
    s.stop();
    s.audit_verify(None);
    let _ = Method::GET;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_migrate_moves_the_vault_and_the_holds_into_postgresql() {
    let pg = pg::Postgres::start();
    let mut s = with_retention("1h", "1h");
    s.start();
    let max = email("max");
    let i = sign_for(&s, "payroll-esign", b"max's contract", &max, "max-1").await;
    s.cli_ok(&[
        "holds",
        "add",
        "--tenant",
        "payroll",
        "--reason",
        "audit 2026",
    ]);
    s.checkpoint_covering(i + 1).await;
    s.stop();
    let url = pg.database("migrated");
    s.edit_config(|c| pg::with_postgres(c, &url));
    let out = s.cli_ok(&[
        "storage",
        "migrate",
        "--from",
        s.audit_dir().to_str().unwrap(),
    ]);
    assert!(
        out.contains("1 signer-evidence records and 1 legal holds"),
        "{out}"
    );
    s.start();
    let v = evidence_of(&s, i).await;
    assert_eq!(v["signer_evidence"]["state"], "present", "{v}");
    assert_eq!(v["signer_evidence"]["signer"]["email"], max.as_str());
    let holds: Value = serde_json::from_str(&s.cli_ok(&["--json", "holds", "list"])).unwrap();
    assert_eq!(holds.as_array().unwrap().len(), 1);
    // The tenant hold protects it on PostgreSQL too.
    let (ok, text) = outcome(s.cli(&[
        "evidence",
        "erase",
        "--subject",
        &max,
        "--reason",
        "request 3",
        "--override-retention",
    ]));
    assert!(!ok && text.contains("legal hold"), "{text}");
}
