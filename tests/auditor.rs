//! Evidence for auditors: a transaction's complete trail with proofs an independent RFC 6962
//! implementation accepts, tenant scoping, and stable pagination of a tenant's entries while
//! the log grows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use hyper::Method;
use serde_json::{Value, json};

async fn sign_tx(s: &Signet, client: &str, policy: &str, tx: &str, doc: &str) {
    let mut body = sign_body(policy, doc.as_bytes());
    body["transaction_id"] = json!(tx);
    let (st, v) = s.sign(client, body).await;
    assert_eq!(st, 200, "{v}");
}

async fn get(s: &Signet, client: &str, path: &str) -> (u16, Value) {
    let (st, v) = s.get(client, path).await;
    (st, v)
}

/// The `index` of every item of `v["entries"]`.
fn entry_indexes(v: &Value) -> Vec<u64> {
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect()
}

/// Wait until a signed checkpoint covers `n` entries.
async fn wait_for_checkpoint(s: &Signet, n: u64) {
    s.eventually(
        "a checkpoint over the log",
        Duration::from_secs(10),
        || async {
            get(s, "auditor", "/v1/audit/checkpoint").await.1["tree_size"].as_u64() == Some(n)
        },
    )
    .await;
}

/// The leaf hashes of the whole log, for the independent proof checks.
fn leaves(s: &Signet) -> Vec<[u8; 32]> {
    std::fs::read_to_string(s.audit_dir().join("entries.jsonl"))
        .unwrap()
        .lines()
        .map(|l| rfc6962::leaf(l.as_bytes()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_trail_is_complete_proved_and_scoped_to_the_callers_tenants() {
    let mut s = Signet::init(Init::default());
    s.start();
    for (i, tx) in ["txn-a", "txn-b", "txn-a", "txn-c", "txn-a"]
        .iter()
        .enumerate()
    {
        sign_tx(
            &s,
            "payroll-app",
            "payroll-esign",
            tx,
            &format!("payroll {i}"),
        )
        .await;
    }
    sign_tx(
        &s,
        "procurement-app",
        "procurement-esign",
        "txn-a",
        "a purchase order",
    )
    .await;
    sign_tx(
        &s,
        "procurement-app",
        "procurement-esign",
        "txn-p",
        "another order",
    )
    .await;
    // Wait for a checkpoint over everything.
    let n = s.entries().len() as u64;
    wait_for_checkpoint(&s, n).await;

    let all = s.entries();
    let expect = |tx: &str, tenant: Option<&str>| -> Vec<u64> {
        all.iter()
            .filter(|e| e["transaction_id"] == tx)
            .filter(|e| tenant.is_none_or(|t| e["tenant"] == t))
            .map(|e| e["index"].as_u64().unwrap())
            .collect()
    };
    let leaves = leaves(&s);
    // The auditor sees every entry of txn-a, both tenants, each proved to one checkpoint.
    let (st, v) = s.get("auditor", "/v1/audit/transactions/txn-a").await;
    assert_eq!(st, 200, "{v}");
    let got = entry_indexes(&v);
    assert_eq!(got, expect("txn-a", None));
    assert_eq!(got.len(), 4);
    assert!(v["pending"].as_array().unwrap().is_empty());
    let size = v["tree_size"].as_u64().unwrap() as usize;
    let root = rfc6962::mth(&leaves[..size]);
    let cp_root = v["checkpoint"]
        .as_str()
        .unwrap()
        .lines()
        .nth(2)
        .unwrap()
        .to_owned();
    assert_eq!(
        cp_root,
        B64.encode(root),
        "the checkpoint's root is the log's"
    );
    for e in v["entries"].as_array().unwrap() {
        let i = e["index"].as_u64().unwrap() as usize;
        assert_eq!(e["entry"]["transaction_id"], "txn-a");
        assert_eq!(e["leaf_hash"], B64.encode(leaves[i]));
        assert_eq!(
            strings(&e["inclusion_proof"]),
            b64_hashes(&rfc6962::path(i, &leaves[..size])),
            "entry {i}: the proof an independent implementation computes"
        );
        assert!(
            e["proof"]
                .as_str()
                .unwrap()
                .starts_with("c2sp.org/tlog-proof@v1")
        );
    }
    // A client sees its own tenant's part only — never another tenant's data.
    let (st, v) = s.get("payroll-app", "/v1/audit/transactions/txn-a").await;
    assert_eq!(st, 200);
    let got = entry_indexes(&v);
    assert_eq!(got, expect("txn-a", Some("payroll")));
    assert!(
        !v.to_string().contains(&digest_hex(b"a purchase order")),
        "another tenant's digest leaked: {v}"
    );
    let (_, v) = s.get("payroll-app", "/v1/audit/transactions/txn-p").await;
    assert!(v["entries"].as_array().unwrap().is_empty(), "{v}");
    let (_, v) = s.get("auditor", "/v1/audit/transactions/txn-b").await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    let (_, v) = s.get("auditor", "/v1/audit/transactions/unknown").await;
    assert!(v["entries"].as_array().unwrap().is_empty());
    // And it survives a restart (the index is rebuilt from the log).
    assert!(s.stop().success());
    s.start();
    let (_, v) = s.get("auditor", "/v1/audit/transactions/txn-a").await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_entries_page_stably_while_the_log_grows() {
    let mut s = Signet::init(Init::default());
    s.start();
    // Entries made before this moment (the development key set-up) fall outside the window.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = time_now();
    for i in 0..7 {
        sign_tx(
            &s,
            "payroll-app",
            "payroll-esign",
            &format!("p{i}"),
            &format!("doc {i}"),
        )
        .await;
        sign_tx(
            &s,
            "procurement-app",
            "procurement-esign",
            &format!("q{i}"),
            &format!("po {i}"),
        )
        .await;
    }
    let payroll: Vec<u64> = s
        .entries()
        .iter()
        .filter(|e| e["tenant"] == "payroll" && e["event"] == "signature")
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    let q = format!("/v1/audit/entries?tenant=payroll&since={start}&limit=3");
    let (st, p1) = s.get("payroll-app", &q).await;
    assert_eq!(st, 200, "{p1}");
    assert_eq!(entry_indexes(&p1), payroll[..3]);
    // The log grows between pages: the next pages continue where the first stopped.
    sign_tx(&s, "payroll-app", "payroll-esign", "late", "late doc").await;
    let mut seen = entry_indexes(&p1);
    let mut cursor = p1["next_cursor"].as_str().unwrap().to_owned();
    loop {
        let (_, p) = s.get("payroll-app", &format!("{q}&cursor={cursor}")).await;
        seen.extend(entry_indexes(&p));
        match p["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    let mut all_payroll = payroll.clone();
    all_payroll.push(s.entries().last().unwrap()["index"].as_u64().unwrap());
    assert_eq!(seen, all_payroll, "every entry once, in log order");
    assert!(
        seen.iter()
            .all(|i| s.entries()[*i as usize]["tenant"] == "payroll")
    );
    // A window that ends before the first signature is empty.
    let (_, p) = s
        .get(
            "payroll-app",
            &format!("/v1/audit/entries?tenant=payroll&since=2000-01-01T00:00:00Z&until={start}"),
        )
        .await;
    assert!(entry_indexes(&p).iter().all(|i| !payroll.contains(i)));
    // Another tenant's entries: 403. Bad input: 400.
    let (st, p) = s
        .get("payroll-app", "/v1/audit/entries?tenant=procurement")
        .await;
    assert_eq!(
        (st, p["type"].as_str()),
        (403, Some("urn:signet:problem:forbidden"))
    );
    for bad in [
        "tenant=payroll&since=yesterday",
        "tenant=payroll&limit=0",
        "tenant=payroll&cursor=x",
        "since=2026-01-01T00:00:00Z",
    ] {
        let (st, p) = s
            .get("payroll-app", &format!("/v1/audit/entries?{bad}"))
            .await;
        assert_eq!(st, 400, "{bad}: {p}");
    }
    // The audit role reads any tenant.
    let (st, p) = s
        .get("auditor", "/v1/audit/entries?tenant=procurement&limit=1000")
        .await;
    assert_eq!(st, 200);
    assert!(entry_indexes(&p).len() >= 7);
}

fn time_now() -> String {
    signet::clock::rfc3339_micros(std::time::SystemTime::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_served_as_tlog_tiles_that_an_independent_implementation_verifies() {
    let mut s = Signet::init(Init::default());
    s.start();
    // More than 256 entries: a full level-0 tile, a partial one, and a level-1 tile.
    for b in 0..2 {
        let items: Vec<Value> = (0..150)
            .map(|i| sign_body("payroll-esign", format!("batch {b} item {i}").as_bytes()))
            .collect();
        let (st, r) = s.sign_batch("payroll-app", items).await;
        assert_eq!(st, 200, "{r}");
    }
    let n = s.entries().len() as u64;
    assert!(n > 300);
    wait_for_checkpoint(&s, n).await;
    let (st, note) = get_bytes(&s, "payroll-app", "/v1/audit/tlog/checkpoint").await;
    assert_eq!(st, 200);
    let note = String::from_utf8(note).unwrap();
    let lines: Vec<&str> = note.lines().collect();
    assert_eq!(lines[1], n.to_string());
    let root = tlog_tiles::Hash(B64.decode(lines[2]).unwrap().try_into().unwrap());

    // Fetch every tile the tree of size n has, by the paths the independent code computes.
    let mut fetched = std::collections::HashMap::new();
    for t in tlog_tiles::Tile::new_tiles(8, 0, n) {
        let path = t.path().replacen("tile/8/", "", 1);
        let (st, body) = get_bytes(&s, "payroll-app", &format!("/v1/audit/tlog/tile/{path}")).await;
        assert_eq!(st, 200, "{path}");
        fetched.insert(path, body);
    }
    assert!(
        fetched.keys().any(|p| p.starts_with("1/")),
        "a level-1 tile: {:?}",
        fetched.keys()
    );
    assert!(fetched.keys().any(|p| p.contains(".p/")), "partial tiles");
    let reader = FetchedTiles(fetched);
    let hashes = tlog_tiles::TileHashReader::new(n, root, &reader);
    assert_eq!(
        tlog_tiles::tree_hash(n, &hashes).unwrap(),
        root,
        "the tiles give the signed root"
    );
    // Inclusion of entries, checked by the independent code against entry bundles.
    let (st, bundle) = get_bytes(&s, "auditor", "/v1/audit/tlog/tile/entries/001.p/").await;
    assert_eq!(st, 404, "not a canonical path");
    let _ = bundle;
    let partial = n - 256;
    let (st, bundle) = get_bytes(
        &s,
        "auditor",
        &format!("/v1/audit/tlog/tile/entries/001.p/{partial}"),
    )
    .await;
    assert_eq!(st, 200);
    let mut rest = bundle.as_slice();
    let mut i = 256u64;
    while !rest.is_empty() {
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let entry = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let leaf = tlog_tiles::record_hash(entry);
        let proof = tlog_tiles::prove_record(n, i, &hashes).unwrap();
        tlog_tiles::check_record(&proof, n, root, i, leaf).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(entry).unwrap()["index"], i);
        i += 1;
    }
    assert_eq!(i, n);
    // A full entry bundle exists for the first 256 entries; the sign role may not read bundles.
    let (st, full) = get_bytes(&s, "auditor", "/v1/audit/tlog/tile/entries/000").await;
    assert_eq!(st, 200);
    assert!(full.len() > 256 * 100);
    let (st, _) = get_bytes(&s, "payroll-app", "/v1/audit/tlog/tile/entries/000").await;
    assert_eq!(st, 403);
    // Tiles beyond the signed tree do not exist.
    let (st, _) = get_bytes(&s, "payroll-app", "/v1/audit/tlog/tile/0/005").await;
    assert_eq!(st, 404);
    // `audit verify --remote` checks the served log (entry bundles up to the latest checkpoint)
    // with the streaming verifier: VERIFIED with the auditor's key, UNVERIFIED with the key the
    // service serves.
    let key = s.dir.join("trusted-log-key.pem");
    std::fs::write(
        &key,
        std::fs::read(s.audit_dir().join("log-key.pem")).unwrap(),
    )
    .unwrap();
    let out = s.cli(&[
        "--json",
        "audit",
        "verify",
        "--remote",
        "--key",
        key.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "{v} {out:?}");
    assert_eq!(v["verdict"], "verified");
    assert!(v["report"]["entries"].as_u64().unwrap() >= 256, "{v}");
    let out = s.cli(&["--json", "audit", "verify", "--remote"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // The full tiles are files at their C2SP paths under the audit directory, and a restart
    // reads the tree from them: only the entries after the last checkpoint are read again,
    // and every tile is served byte for byte as before.
    assert!(s.stop().success());
    let on_disk = std::fs::read(s.audit_dir().join("tile/0/000")).unwrap();
    assert_eq!(on_disk, reader.0["0/000"]);
    s.start();
    let opened = s
        .log()
        .lines()
        .rfind(|l| l.contains("evidence log opened"))
        .unwrap()
        .to_owned();
    let read: u64 = opened
        .split_once("entries_read=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{opened}"));
    assert!(read < 256, "start-up read {read} of {n} entries: {opened}");
    for (path, before) in &reader.0 {
        let (st, body) = get_bytes(&s, "payroll-app", &format!("/v1/audit/tlog/tile/{path}")).await;
        assert_eq!((st, &body), (200, before), "{path}");
    }
    let (st, again) = get_bytes(&s, "auditor", "/v1/audit/tlog/tile/entries/000").await;
    assert_eq!((st, again), (200, full));

    // Entry 10 altered in place on disk (same length, far below the checkpoint): start-up does
    // not read it, but it is never served with a proof, and `audit verify` names it.
    assert!(s.stop().success());
    let path = s.audit_dir().join("entries.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let at = lines[10].find("\"signature\":\"").unwrap() + 13;
    let flipped = if &lines[10][at..=at] == "A" { "B" } else { "A" };
    lines[10].replace_range(at..=at, flipped);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    s.start();
    let (st, p) = s.get("auditor", "/v1/audit/entries/10").await;
    assert_eq!(st, 500, "{p}");
    assert_eq!(p["type"], "urn:signet:problem:evidence-inconsistent", "{p}");
    assert!(p["detail"].as_str().unwrap().contains("entry 10"), "{p}");
    let (st, p) = s.get("auditor", "/v1/audit/entries/290").await;
    assert_eq!(st, 200, "{p}");
    // The served log no longer verifies remotely either.
    let out = s.cli(&[
        "audit",
        "verify",
        "--remote",
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Every other read path refuses it too: the tenant listing and the entry bundle (each
    // entry checked against its leaf, the tile against the signed root).
    let (st, p) = s
        .get("auditor", "/v1/audit/entries?tenant=payroll&limit=50")
        .await;
    assert_eq!(st, 500, "{p}");
    assert_eq!(p["type"], "urn:signet:problem:evidence-inconsistent", "{p}");
    let (st, body) = get_bytes(&s, "auditor", "/v1/audit/tlog/tile/entries/000").await;
    assert_eq!(st, 500, "{}", String::from_utf8_lossy(&body));
    // A page that does not hold entry 10 is served.
    let (st, p) = s
        .get(
            "auditor",
            "/v1/audit/entries?tenant=payroll&cursor=200&limit=5",
        )
        .await;
    assert_eq!(st, 200, "{p}");
    // `audit verify` names it in every form: the directory with a key, the configured log with
    // the token's key and anchor.
    let key = s.dir.join("trusted-log-key.pem");
    std::fs::write(
        &key,
        std::fs::read(s.audit_dir().join("log-key.pem")).unwrap(),
    )
    .unwrap();
    assert!(s.stop().success());
    for args in [
        vec![
            "audit",
            "verify",
            s.audit_dir().to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        vec!["audit", "verify"],
    ] {
        let out = s.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("FAILED at entry 10"),
            "{args:?}: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_rewritten_and_re_signed_with_another_key_never_verifies() {
    use p256::ecdsa::SigningKey;
    use signet::audit::entry::Entry;
    let mut s = Signet::init(Init::default());
    s.start();
    for i in 0..5 {
        sign_tx(
            &s,
            "payroll-app",
            "payroll-esign",
            &format!("tx-{i}"),
            &format!("doc {i}"),
        )
        .await;
    }
    assert!(s.stop().success());
    let key = s.dir.join("trusted-log-key.pem");
    std::fs::write(
        &key,
        std::fs::read(s.audit_dir().join("log-key.pem")).unwrap(),
    )
    .unwrap();
    s.audit_verify(Some(&key));

    // A forger rewrites one entry, relinks the hash chain, and signs a checkpoint over the
    // rewritten log with a key of their own, which they put in log-key.pem.
    let dir = s.audit_dir();
    let text = std::fs::read_to_string(dir.join("entries.jsonl")).unwrap();
    let mut entries: Vec<Entry> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let target = entries.len() - 2;
    entries[target].digest.as_mut().unwrap().value = digest_hex(b"a forged document");
    let mut lines = Vec::new();
    let mut leaves: Vec<[u8; 32]> = Vec::new();
    for e in &mut entries {
        e.previous_leaf_hash = leaves.last().map(|h| B64.encode(h));
        let line = e.canonical().unwrap();
        leaves.push(rfc6962::leaf(&line));
        lines.push(String::from_utf8(line).unwrap());
    }
    std::fs::write(dir.join("entries.jsonl"), lines.join("\n") + "\n").unwrap();
    let forger = SigningKey::from_slice(&[42u8; 32]).unwrap();
    let cp = signet::audit::note::Checkpoint {
        origin: text_origin(&dir),
        size: leaves.len() as u64,
        root: rfc6962::mth(&leaves),
    };
    let sig: p256::ecdsa::Signature = signature::Signer::sign(&forger, cp.body().as_bytes());
    let note = signet::audit::note::signed_checkpoint(
        &cp,
        forger.verifying_key(),
        sig.to_der().as_bytes().to_vec(),
    );
    let stored = json!({"tree_size": cp.size, "signed_at": 1, "note": note});
    std::fs::write(dir.join("checkpoints.jsonl"), format!("{stored}\n")).unwrap();
    std::fs::write(
        dir.join("log-key.pem"),
        signet::pki::public_key_pem(forger.verifying_key()),
    )
    .unwrap();

    // With only the key found beside the data, everything "checks out": never VERIFIED.
    let out = s.cli(&["--json", "audit", "verify", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "unverified", "{v}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("UNVERIFIED: no trust anchor for the log key")
    );
    // With the auditor's key, or the token's (--config), it is refused.
    for args in [
        vec![
            "--json",
            "audit",
            "verify",
            dir.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        vec!["--json", "audit", "verify"],
    ] {
        let out = s.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["verdict"], "refused", "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("checkpoint at size"),
            "{args:?}: {v}"
        );
    }
    // And the service itself refuses to start on it.
    let refused = s.start_refused();
    assert!(refused.contains("signet audit verify"), "{refused}");
}

/// The origin of the log in `dir`, from its last checkpoint.
fn text_origin(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(dir.join("checkpoints.jsonl")).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    last["note"]
        .as_str()
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_parameter_given_twice_is_a_problem_document() {
    let mut s = Signet::init(Init::default());
    s.start();
    let (st, headers, p) = s
        .call(
            "auditor",
            Method::GET,
            "/v1/audit/entries?tenant=payroll&tenant=hr",
            None,
            &[],
        )
        .await;
    assert_eq!(st, 400, "{p}");
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/problem+json",
        "{headers:?}"
    );
    assert_eq!(p["type"], "urn:signet:problem:invalid-request", "{p}");
    assert!(p["detail"].as_str().unwrap().contains("tenant"), "{p}");
}
