//! `signet audit verify` and `signet receipt verify`: offline, no token, no network; and
//! `signet audit accept-restore`: the operator's explicit, evidenced acceptance of a log
//! restored from backup (needs the token, with the service stopped).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use p256::ecdsa::VerifyingKey;
use serde_json::Value;
use spki::DecodePublicKey;

use signet::audit::note::TlogProof;
use signet::audit::verify::{
    DirFailure, DirReport, DirSource, KeySource, LogSource, LogTrust, ReceiptInputs, Verdict,
    verify_log, verify_receipt,
};
use signet::audit::{LOG_KEY_FILE, Receipt};
use signet::pki::{self, CertInfo};

use super::{Cli, Unverified, ensure_module_environment, load_config, local_caller, runtime};

/// Inputs of the verifiers larger than this are refused unread (receipts, proofs, keys and
/// certificates are a few KiB).
const MAX_SMALL_INPUT: u64 = 1 << 20;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute every entry hash, the hash chain, the tree and every checkpoint signature;
    /// name the first entry that does not match. Exit 0 only when verified against a log key
    /// you trust (`--key`, or the token's with `--config`); 2 when everything checked out but
    /// only against the key stored beside the data (UNVERIFIED); 1 when refused.
    Verify {
        /// An evidence log directory (file format). Without it: the log of the configured
        /// storage backend (`--config`: `[audit].dir`, or the PostgreSQL database, read in
        /// place), checked with the token's log key and against the token's anchor.
        dir: Option<PathBuf>,
        /// The log's public key (PEM, or the JSON of GET /v1/audit/checkpoint): a copy you
        /// trust. Without it, DIR/log-key.pem is used and the verdict is at best UNVERIFIED.
        #[arg(long)]
        key: Option<PathBuf>,
        /// A checkpoint you kept earlier (the signed note, or the JSON of
        /// GET /v1/audit/checkpoint): the log must still have its root at its size.
        #[arg(long)]
        anchor: Option<PathBuf>,
        /// Verify the log a running service serves (C2SP tlog-tiles API), through the `[cli]`
        /// section's client certificate (admin or audit role), against the latest checkpoint.
        #[arg(long, conflicts_with = "dir")]
        remote: bool,
    },
    /// Write a transaction's self-contained evidence bundle: its entries with their proofs, the
    /// signed checkpoint and its RFC 3161 timestamp, the signing certificates and their CA, and
    /// the log key (through the running service's API, or in-process when none runs).
    ///
    /// Without `--transaction`: write the whole log of the configured backend to DIR in the
    /// file format (`entries.jsonl`, `checkpoints.jsonl`, `log-key.pem`), for
    /// `signet audit verify DIR` on another machine.
    Export {
        /// Where to write the whole log (without `--transaction`).
        #[arg(
            required_unless_present = "transaction",
            conflicts_with = "transaction"
        )]
        dir: Option<PathBuf>,
        /// The transaction ID (the `transaction_id` clients sent).
        #[arg(long, requires = "out")]
        transaction: Option<String>,
        /// Only this tenant's entries.
        #[arg(long, requires = "transaction")]
        tenant: Option<String>,
        /// Where to write the bundle (JSON).
        #[arg(long, requires = "transaction")]
        out: Option<PathBuf>,
    },
    /// List the signatures a key version made (after a compromise: the documents to sign
    /// again), from the running service (`[cli]` client certificate, admin or audit role), as
    /// JSON lines: index, transaction_id, digest, policy, signed_at, client.
    Affected {
        /// The key version, `TENANT/vN`.
        #[arg(long)]
        key_id: String,
        /// Only signatures at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only signatures before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Where to write the JSON lines (mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Accept a log that differs from its integrity anchors because it was deliberately
    /// restored from backup: records a `log_restored` evidence entry (who, why, what differed)
    /// and re-anchors the log in the token. Run with the service stopped.
    AcceptRestore {
        /// Why (recorded in the evidence entry).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Verify an evidence bundle offline and explain it in plain English (`--json`: as data).
    Verify {
        /// The bundle written by `signet audit export --transaction`.
        file: PathBuf,
        /// The CA (PEM) the signing certificates must chain to. Default: the bundle's copy.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The log's public key (PEM, or the JSON of GET /v1/audit/checkpoint). Default: the
        /// bundle's copy.
        #[arg(long)]
        log_key: Option<PathBuf>,
        /// The CA (PEM) of the time-stamping authority, to check the timestamp's certificate.
        /// Without it a bundle with a timestamp is at best UNVERIFIED.
        #[arg(long)]
        tsa_ca: Option<PathBuf>,
        /// The issuing CA's CRL (DER or PEM, e.g. fetched from `[pki] base_url`/crl), checked
        /// against --ca: revoked signing certificates are reported, and a signature made after
        /// the reported compromise (invalidity date) or the revocation is refused.
        #[arg(long, requires = "ca")]
        crl: Option<PathBuf>,
        /// Also write the account as a standalone HTML page.
        #[arg(long)]
        html: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ReceiptCommand {
    /// Verify that a signature is in the evidence log: receipt + proof + log key (+ certificate).
    Verify {
        /// The sign response (JSON with `receipt`, `signature`, `certificate`) or a bare receipt.
        #[arg(long)]
        receipt: PathBuf,
        /// The tlog-proof (text), or the JSON from GET /v1/audit/entries/{index}.
        #[arg(long)]
        proof: PathBuf,
        /// The log's public key: PEM, or the JSON from GET /v1/audit/checkpoint.
        #[arg(long)]
        log_key: PathBuf,
        /// The signing certificate (PEM). Default: the one in the sign response, if present.
        /// It must be the certificate the entry names (SHA-256 fingerprint).
        #[arg(long)]
        certificate: Option<PathBuf>,
        /// The CA certificate (PEM) the signing certificate must chain to; also checks its
        /// key usage and that it was valid at the entry's time. Without it the verdict is at
        /// best UNVERIFIED.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The issuing CA's CRL (DER or PEM), checked against --ca: a revoked signing
        /// certificate is reported, and a signature made after the reported compromise
        /// (invalidity date) or the revocation is refused.
        #[arg(long, requires = "ca")]
        crl: Option<PathBuf>,
        /// The SHA-256 digest (hex) you expect the receipt to cover.
        #[arg(long, conflicts_with = "document")]
        digest: Option<String>,
        /// The document you expect the receipt to cover (hashed here with SHA-256).
        #[arg(long)]
        document: Option<PathBuf>,
        /// Check only that the entry is in the log, without a certificate (the verdict is then
        /// UNVERIFIED: the signature is not checked).
        #[arg(long)]
        no_certificate: bool,
    },
}

pub fn audit(cli: &Cli, cmd: &AuditCommand) -> Result<()> {
    let (dir, key, anchor, remote) = match cmd {
        AuditCommand::Verify {
            dir,
            key,
            anchor,
            remote,
        } => (dir, key, anchor, *remote),
        AuditCommand::AcceptRestore { reason } => return accept_restore(cli, reason),
        AuditCommand::Affected {
            key_id,
            since,
            until,
            out,
        } => return affected(cli, key_id, since.as_deref(), until.as_deref(), out),
        AuditCommand::Export {
            dir,
            transaction,
            tenant,
            out,
        } => {
            return match (transaction, out, dir) {
                (Some(t), Some(out), _) => export(cli, t, tenant.clone(), out),
                (_, _, Some(dir)) => export_log(cli, dir),
                _ => bail!("give DIR (the whole log) or --transaction ID --out FILE"),
            };
        }
    };
    let kept_checkpoint = anchor.as_deref().map(read_checkpoint_note).transpose()?;
    let given = key.as_deref().map(read_public_key).transpose()?;
    if remote {
        return verify_remote(cli, given, kept_checkpoint);
    }
    let Some(dir) = dir else {
        return verify_configured(cli, given, kept_checkpoint);
    };
    let trust = match given {
        Some(key) => LogTrust::new(key, KeySource::Given),
        None => LogTrust::new(
            read_public_key(&dir.join(LOG_KEY_FILE))?,
            KeySource::BesideTheData,
        ),
    }
    .kept(kept_checkpoint);
    let result = DirSource::open(dir).and_then(|mut src| verify_log(&mut src, &trust));
    report_verification(
        cli,
        result,
        &format!("{}", dir.join(LOG_KEY_FILE).display()),
    )
}

/// `signet audit verify` without DIR: the configured backend's log, read in place, checked
/// with the token's log key (or `--key`) and against the token's anchor.
fn verify_configured(
    cli: &Cli,
    given: Option<VerifyingKey>,
    kept_checkpoint: Option<String>,
) -> Result<()> {
    let config = load_config(cli)?;
    let trust = match given {
        Some(key) => LogTrust::new(key, KeySource::Given),
        None => {
            ensure_module_environment(&config)?;
            let (key, anchor) = signet::service::token_log_trust(&config)
                .context("cannot read the log key and anchor from the token (or pass --key)")?;
            LogTrust {
                token_anchor: anchor,
                ..LogTrust::new(key, KeySource::Token)
            }
        }
    }
    .kept(kept_checkpoint);
    let rt = runtime()?;
    let result = signet::storage::transfer::log_source(&config, &rt)
        .and_then(|mut src| verify_log(src.as_mut(), &trust));
    report_verification(cli, result, "the token")
}

/// `signet audit verify --remote`: the log a running service serves as C2SP tlog-tiles (entry
/// bundles up to its latest checkpoint), through the `[cli]` client certificate.
fn verify_remote(
    cli: &Cli,
    given: Option<VerifyingKey>,
    kept_checkpoint: Option<String>,
) -> Result<()> {
    let (_rt, mut src) = TlogSource::connect(cli, "--remote")?;
    let note = src.get_text("/v1/audit/tlog/checkpoint")?;
    let (key, key_source) = match given {
        Some(k) => (k, KeySource::Given),
        None => {
            let v: Value = serde_json::from_str(&src.get_text("/v1/audit/checkpoint")?)
                .context("GET /v1/audit/checkpoint")?;
            let pem = v["log_public_key"]
                .as_str()
                .ok_or_else(|| anyhow!("GET /v1/audit/checkpoint: no log_public_key"))?;
            (
                VerifyingKey::from_public_key_pem(pem.trim())
                    .map_err(|e| anyhow!("the served log key: {e}"))?,
                KeySource::BesideTheData,
            )
        }
    };
    let size = signet::audit::note::SignedNote::parse(&note)
        .and_then(|n| signet::audit::note::Checkpoint::parse_body(&n.text))
        .map_err(|e| anyhow!("the served checkpoint: {e}"))?
        .size;
    src.size = size;
    src.checkpoint = Some(signet::audit::StoredCheckpoint {
        tree_size: size,
        signed_at: 0,
        note,
    });
    let trust = LogTrust::new(key, key_source).kept(kept_checkpoint);
    let result = verify_log(&mut src, &trust);
    report_verification(cli, result, "the service's answer")
}

/// `signet audit affected`: every signature entry of `key_id` in the window, page by page from
/// `GET /v1/audit/entries?key_id=`, one JSON line each.
fn affected(
    cli: &Cli,
    key_id: &str,
    since: Option<&str>,
    until: Option<&str>,
    out: &Path,
) -> Result<()> {
    let key: signet::domain::KeyId = key_id
        .parse()
        .map_err(|e| anyhow!("--key-id {key_id}: {e}"))?;
    let (_rt, mut src) = TlogSource::connect(cli, "audit affected")?;
    let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    let mut query = format!("key_id={}&limit=1000", enc(&key.to_string()));
    for (name, value) in [("since", since), ("until", until)] {
        if let Some(v) = value {
            query.push_str(&format!("&{name}={}", enc(v)));
        }
    }
    let mut lines = String::new();
    let mut count = 0usize;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/audit/entries?{query}&cursor={}", enc(c)),
            None => format!("/v1/audit/entries?{query}"),
        };
        let page: Value =
            serde_json::from_slice(&src.get(&path)?).context("GET /v1/audit/entries")?;
        for item in page["entries"].as_array().into_iter().flatten() {
            let e = &item["entry"];
            let line = serde_json::json!({
                "index": item["index"],
                "transaction_id": e["transaction_id"],
                "digest": e["digest"],
                "policy": e["policy"]["id"],
                "signed_at": e["time"],
                "client": e["actor"]["identity"],
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
            count += 1;
        }
        match page["next_cursor"].as_str() {
            Some(c) if cursor.as_deref() != Some(c) => cursor = Some(c.to_owned()),
            _ => break,
        }
    }
    signet::fsutil::write_atomic_mode(out, lines.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("{count} signatures by {key} written to {}", out.display());
    Ok(())
}

/// A served log as a [`LogSource`]: entry bundles up to the latest checkpoint's size.
struct TlogSource {
    rt: tokio::runtime::Handle,
    conn: signet::client::Connection,
    size: u64,
    next: u64,
    entries: std::collections::VecDeque<Vec<u8>>,
    checkpoint: Option<signet::audit::StoredCheckpoint>,
}

impl TlogSource {
    /// Connect to the running service through the `[cli]` section (for `what`, in errors).
    /// The runtime must outlive the source.
    fn connect(cli: &Cli, what: &str) -> Result<(tokio::runtime::Runtime, Self)> {
        let config = load_config(cli)?;
        let cli_cfg = config.cli.as_ref().ok_or_else(|| {
            anyhow!("{what} needs a [cli] section (url, cert, key, ca) with an admin or audit client certificate")
        })?;
        let tls =
            signet::client::ClientTls::new(&cli_cfg.ca, Some(&cli_cfg.cert), Some(&cli_cfg.key))?;
        let rt = runtime()?;
        let conn = rt.block_on(signet::client::Connection::connect_url(&tls, &cli_cfg.url))?;
        let src = TlogSource {
            rt: rt.handle().clone(),
            conn,
            size: 0,
            next: 0,
            entries: Default::default(),
            checkpoint: None,
        };
        Ok((rt, src))
    }

    fn get(&mut self, path: &str) -> Result<Vec<u8>> {
        let (status, _, body) =
            self.rt
                .block_on(self.conn.request(hyper::Method::GET, path, &[], None))?;
        if !status.is_success() {
            bail!(
                "GET {path}: {} {}",
                status.as_u16(),
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            );
        }
        Ok(body.to_vec())
    }

    fn get_text(&mut self, path: &str) -> Result<String> {
        String::from_utf8(self.get(path)?).map_err(|_| anyhow!("GET {path}: not UTF-8"))
    }
}

impl LogSource for TlogSource {
    fn next_entry(&mut self) -> Result<Option<Vec<u8>>, DirFailure> {
        use signet::audit::tiles::{TileRef, render};
        if self.entries.is_empty() && self.next < self.size {
            let n = self.next / 256;
            let width = (self.size - n * 256).min(256) as u16;
            let path = format!(
                "/v1/audit/tlog/tile/{}",
                render(TileRef::Entries { n, width })
            );
            let body = self
                .get(&path)
                .map_err(|e| DirFailure::other(format!("{e:#}")))?;
            let mut rest = body.as_slice();
            while rest.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let entry = rest.get(2..2 + len).ok_or_else(|| {
                    DirFailure::other(format!("{path}: an entry runs past the bundle's end"))
                })?;
                self.entries.push_back(entry.to_vec());
                rest = &rest[2 + len..];
            }
            if !rest.is_empty() || self.entries.len() != usize::from(width) {
                return Err(DirFailure::entry(
                    n * 256,
                    format!("{path} does not hold {width} entries"),
                ));
            }
        }
        let e = self.entries.pop_front();
        self.next += e.is_some() as u64;
        Ok(e)
    }

    fn next_checkpoint(
        &mut self,
    ) -> Result<Option<(u64, signet::audit::StoredCheckpoint)>, DirFailure> {
        Ok(self.checkpoint.take().map(|c| (1, c)))
    }
}

/// `signet audit export DIR`: the configured backend's whole log in the file format.
fn export_log(cli: &Cli, dir: &Path) -> Result<()> {
    let config = load_config(cli)?;
    let report = runtime()?.block_on(signet::storage::transfer::export(&config, dir))?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "dir": dir, "report": report})
        );
    } else {
        println!(
            "wrote the evidence log ({} entries) to {}; verify it with `signet audit verify {}`",
            report.entries,
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Print a log verification and end as its verdict says: `verified` exits 0, `unverified` 2,
/// `refused` 1. `key_place` says where the key came from when it was not the auditor's.
fn report_verification(
    cli: &Cli,
    result: Result<DirReport, DirFailure>,
    key_place: &str,
) -> Result<()> {
    match result {
        Ok(r) => {
            let unverified = (r.verdict == Verdict::Unverified).then(|| {
                format!(
                    "UNVERIFIED: no trust anchor for the log key: the log checked out against the key stored beside it ({key_place}), which whoever rewrote the log could have replaced; pass --key with a copy you trust, or --config to use the token's"
                )
            });
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "verdict": r.verdict,
                        "ok": r.verdict == Verdict::Verified,
                        "report": r,
                        "unverified": unverified,
                    })
                );
            } else {
                println!(
                    "{}: {} entries, {} checkpoints, latest checkpoint covers {} entries ({} newer entries not yet checkpointed)",
                    if r.verdict == Verdict::Verified {
                        "VERIFIED"
                    } else {
                        "UNVERIFIED"
                    },
                    r.entries,
                    r.checkpoints,
                    r.latest_checkpoint_size,
                    r.unsigned_tail
                );
                println!(
                    "  checkpoint signatures checked with {}",
                    match r.key_source {
                        KeySource::Given => "the log key you gave (--key)",
                        KeySource::Token => "the log key in the token",
                        KeySource::BesideTheData =>
                            "the key stored beside the log (NOT a trust anchor)",
                    }
                );
                if let Some(n) = r.token_anchor_size {
                    println!(
                        "  the log matches the token's anchor (size {n}): nothing before it was changed or removed"
                    );
                }
                if let Some(n) = r.anchor_size {
                    println!(
                        "  the log extends the checkpoint you kept (size {n}): nothing before it was changed"
                    );
                }
                for (ev, n) in &r.events {
                    println!("  {ev}: {n}");
                }
                if r.signer_in_clear > 0 {
                    println!(
                        "  {} entries of the first format hold signer evidence in clear; it cannot be erased without breaking the tree (runbooks/retention-and-erasure.md)",
                        r.signer_in_clear
                    );
                }
            }
            match unverified {
                Some(u) => Err(Unverified(u).into()),
                None => Ok(()),
            }
        }
        Err(f) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"verdict": Verdict::Refused, "ok": false, "first_bad_entry": f.first_bad_entry, "error": f.message})
                );
            }
            match f.first_bad_entry {
                Some(i) => bail!("verification FAILED at entry {i}: {}", f.message),
                None => bail!("verification FAILED: {}", f.message),
            }
        }
    }
}

pub fn receipt(cli: &Cli, cmd: &ReceiptCommand) -> Result<()> {
    let ReceiptCommand::Verify {
        receipt,
        proof,
        log_key,
        certificate,
        ca,
        crl,
        digest,
        document,
        no_certificate,
    } = cmd;
    let expected_digest = expected_digest(digest.as_deref(), document.as_deref())?;
    let ca = ca.as_deref().map(read_cert).transpose()?;
    let crl = match (crl, &ca) {
        (Some(p), Some(ca)) => Some(read_crl(p, std::slice::from_ref(ca))?),
        _ => None,
    };
    let receipt_json: Value = read_json(receipt)?;
    let r: Receipt = serde_json::from_value(
        receipt_json
            .get("receipt")
            .cloned()
            .unwrap_or_else(|| receipt_json.clone()),
    )
    .context("the receipt file holds neither a sign response nor a receipt")?;
    let (parsed, entry) = read_proof(proof)?;
    let log_key = read_public_key(log_key)?;
    let cert = match certificate {
        Some(p) => Some(read_cert(p)?),
        None => receipt_json["certificate"]
            .as_str()
            .map(|pem| pki::parse_pem_or_der(pem.as_bytes()).and_then(|d| CertInfo::parse(&d)))
            .transpose()?,
    };
    let inputs = ReceiptInputs {
        receipt: r,
        proof: parsed,
        entry,
        log_key,
        certificate: cert,
        allow_no_certificate: *no_certificate,
        ca,
        expected_digest,
        signature: receipt_json["signature"].as_str().map(str::to_owned),
        crl,
    };
    let result = verify_receipt(&inputs);
    let rep = match result {
        Ok(rep) => rep,
        Err(e) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"verdict": Verdict::Refused, "ok": false, "error": e.reason})
                );
            }
            bail!("receipt verification FAILED: {e}")
        }
    };
    report_receipt(cli, &rep)
}

/// The digest the receipt must cover: `--digest HEX`, or SHA-256 of `--document FILE` (hashed
/// as it is read: a document may be large).
fn expected_digest(digest: Option<&str>, document: Option<&Path>) -> Result<Option<[u8; 32]>> {
    use std::io::Read;
    if let Some(h) = digest {
        let d = h
            .trim()
            .parse::<signet::domain::Sha256Digest>()
            .map_err(|e| anyhow!("--digest: {e}"))?;
        return Ok(Some(d.0));
    }
    let Some(p) = document else {
        return Ok(None);
    };
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut h = signet::sha256::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", p.display()))?;
        if n == 0 {
            return Ok(Some(h.finish()));
        }
        h.update(&buf[..n]);
    }
}

/// A `tlog-proof` file (the text, or the JSON of `GET /v1/audit/entries/{index}`), and the
/// canonical entry when the JSON carries it.
fn read_proof(path: &Path) -> Result<(TlogProof, Option<Vec<u8>>)> {
    let text = read_small_text(path)?;
    let (text, entry) = match serde_json::from_str::<Value>(&text) {
        Ok(v) => {
            let p = v["proof"]
                .as_str()
                .ok_or_else(|| anyhow!("{}: JSON without a `proof` field", path.display()))?
                .to_owned();
            let entry = v
                .get("entry")
                .filter(|e| e.is_object())
                .map(serde_json_canonicalizer::to_vec)
                .transpose()?;
            (p, entry)
        }
        Err(_) => (text, None),
    };
    // A proof saved with `jq -r` carries one newline more than the proof: harmless, since
    // everything in it is checked against the signed checkpoint.
    let text = match text.strip_suffix("\n\n") {
        Some(p) => format!("{p}\n"),
        None => text,
    };
    let parsed = TlogProof::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok((parsed, entry))
}

/// Print a receipt's verification and end as its verdict says.
fn report_receipt(cli: &Cli, rep: &signet::audit::verify::ReceiptReport) -> Result<()> {
    let mut unverified = Vec::new();
    if !rep.signature_checked {
        unverified.push(
            "the signature was NOT checked (--no-certificate): this shows only that the entry is in the log"
                .to_owned(),
        );
    } else if !rep.chain_checked {
        unverified.push(
            "no trust anchor for the signing certificate: pass --ca with the issuing CA you trust"
                .to_owned(),
        );
    }
    let verdict = if unverified.is_empty() {
        Verdict::Verified
    } else {
        Verdict::Unverified
    };
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"verdict": verdict, "ok": verdict == Verdict::Verified, "report": rep, "unverified": unverified})
        );
    } else {
        println!(
            "{}: entry {} of log {} is included in the checkpoint of size {} signed by the log key you gave",
            if verdict == Verdict::Verified {
                "VERIFIED"
            } else {
                "UNVERIFIED"
            },
            rep.index,
            rep.log_origin,
            rep.checkpoint_size
        );
        println!(
            "  event {}, time {}, key {}, policy {}",
            rep.event,
            rep.time,
            rep.key_id.as_deref().unwrap_or("-"),
            rep.policy_id.as_deref().unwrap_or("-")
        );
        if rep.digest_checked {
            println!(
                "  it covers the expected digest {}",
                rep.digest.as_deref().unwrap_or("-")
            );
        }
        if rep.signature_checked {
            println!(
                "  the signature verifies with the certificate the entry names (SHA-256 {})",
                rep.certificate_sha256.as_deref().unwrap_or("-")
            );
        }
        if rep.chain_checked {
            println!(
                "  the certificate chains to the CA you gave, may sign, and was valid at {}",
                rep.time
            );
        }
        if let Some(r) = &rep.revocation {
            println!("  REVOKED: {}", r.statement);
        }
    }
    match unverified.is_empty() {
        true => Ok(()),
        false => Err(Unverified(format!("UNVERIFIED: {}", unverified.join("; "))).into()),
    }
}

/// `signet audit export --transaction`.
fn export(cli: &Cli, transaction: &str, tenant: Option<String>, out: &Path) -> Result<()> {
    let bundle = super::admin::exec(
        cli,
        super::admin::Op::Bundle {
            transaction: transaction.to_owned(),
            tenant,
        },
    )?;
    let entries = bundle["entries"].as_array().map_or(0, Vec::len);
    let text = serde_json::to_string_pretty(&bundle)?;
    signet::fsutil::write_atomic_mode(out, text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", out.display()))?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "entries": entries, "out": out})
        );
    } else {
        println!(
            "wrote {} ({entries} entries of transaction {transaction}); check it with `signet bundle verify {}`",
            out.display(),
            out.display()
        );
    }
    Ok(())
}

/// `signet bundle verify`: 0 only when verified against the anchors given; 2 when
/// UNVERIFIED (some facts rest on keys the file supplies itself); 1 when refused.
pub fn bundle(cli: &Cli, cmd: &BundleCommand) -> Result<()> {
    use signet::audit::bundle::{self, Trust};
    let BundleCommand::Verify {
        file,
        ca,
        log_key,
        tsa_ca,
        crl,
        html,
    } = cmd;
    let cas = match ca {
        Some(p) => {
            let bytes = read_small(p)?;
            let chain = x509_chain(&bytes)?;
            if chain.is_empty() {
                bail!("{}: no certificate", p.display());
            }
            chain
        }
        None => Vec::new(),
    };
    let crl = crl.as_deref().map(|p| read_crl(p, &cas)).transpose()?;
    let trust = Trust {
        log_key: log_key.as_deref().map(read_public_key).transpose()?,
        crl,
        cas,
        tsa_ca: tsa_ca
            .as_deref()
            .map(signet::audit::timestamp::TsaAnchors::load)
            .transpose()
            .map_err(|e| anyhow!("--tsa-ca: {e}"))?,
    };
    let result = bundle::read(file).and_then(|b| bundle::verify(&b, &trust));
    let account = match result {
        Ok(a) => a,
        Err(e) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"verdict": Verdict::Refused, "ok": false, "error": e.reason})
                );
            }
            bail!("bundle verification FAILED: {e}")
        }
    };
    if let Some(path) = html {
        std::fs::write(path, bundle::explain_html(&account))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"verdict": account.verdict, "ok": account.verdict == Verdict::Verified, "account": account, "unverified": account.unverified})
        );
    } else {
        print!("{}", bundle::explain(&account));
    }
    match account.verdict {
        Verdict::Verified => Ok(()),
        _ => Err(Unverified(format!("UNVERIFIED: {}", account.unverified.join("; "))).into()),
    }
}

/// Every certificate of a PEM file.
fn x509_chain(bytes: &[u8]) -> Result<Vec<CertInfo>> {
    use der::Encode;
    let chain = x509_cert::Certificate::load_pem_chain(bytes)
        .map_err(|e| anyhow!("not a PEM certificate file: {e}"))?;
    chain
        .iter()
        .map(|c| Ok(CertInfo::parse(&c.to_der()?)?))
        .collect()
}

/// Accept a restored log: open it despite its anchors, record why, re-anchor, stop.
fn accept_restore(cli: &Cli, reason: &str) -> Result<()> {
    if reason.trim().is_empty() {
        bail!("--reason must say why the log was restored");
    }
    let config = load_config(cli)?;
    ensure_module_environment(&config)?;
    let dir = config.audit.dir.clone();
    if signet::storage::transfer::dir_in_use(&dir) {
        bail!(
            "the evidence log in {} is in use: stop the service first",
            dir.display()
        );
    }
    let rt = runtime()?;
    let findings = rt.block_on(async {
        let app =
            signet::service::App::start_with(config, signet::service::LogOpening::AcceptRestore)
                .await
                .context("cannot open the restored log")?;
        let recorded = app
            .record_restore(local_caller().actor(), reason.to_owned())
            .await;
        app.shutdown().await;
        recorded.context("cannot record the restore")
    })?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "restored": !findings.is_empty(), "findings": findings})
        );
    } else if findings.is_empty() {
        println!("the log matches its anchors: nothing to accept, nothing recorded");
    } else {
        println!(
            "restore accepted and recorded as a `log_restored` evidence entry; the log is anchored again. What differed:"
        );
        for f in &findings {
            println!("  - {f}");
        }
    }
    Ok(())
}

/// A checkpoint note from a file: the note itself, or the JSON of GET /v1/audit/checkpoint.
fn read_checkpoint_note(p: &Path) -> Result<String> {
    let text = read_small_text(p)?;
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => v["checkpoint"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{}: JSON without `checkpoint`", p.display())),
        Err(_) => Ok(text),
    }
}

/// A small input file (receipt, proof, key, certificate, kept checkpoint), refused unread when
/// larger than [`MAX_SMALL_INPUT`].
fn read_small(p: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut bytes = Vec::new();
    f.take(MAX_SMALL_INPUT + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", p.display()))?;
    if bytes.len() as u64 > MAX_SMALL_INPUT {
        bail!(
            "{} is larger than {} KiB: not a receipt, proof, key or certificate",
            p.display(),
            MAX_SMALL_INPUT >> 10
        );
    }
    Ok(bytes)
}

fn read_small_text(p: &Path) -> Result<String> {
    String::from_utf8(read_small(p)?).map_err(|_| anyhow!("{} is not UTF-8 text", p.display()))
}

fn read_json(p: &Path) -> Result<Value> {
    let text = read_small_text(p)?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
}

fn read_public_key(p: &Path) -> Result<VerifyingKey> {
    let text = read_small_text(p)?;
    let pem = match serde_json::from_str::<Value>(&text) {
        Ok(v) => v["log_public_key"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{}: JSON without `log_public_key`", p.display()))?,
        Err(_) => text,
    };
    VerifyingKey::from_public_key_pem(pem.trim())
        .map_err(|e| anyhow!("{}: not a P-256 public key in PEM: {e}", p.display()))
}

/// A CRL file, checked against one of `cas` (its issuer and signature).
fn read_crl(p: &Path, cas: &[CertInfo]) -> Result<signet::pki::revocation::CrlView> {
    let bytes = read_small(p)?;
    let mut last = None;
    for ca in cas {
        match signet::pki::revocation::read_crl(&bytes, ca) {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => anyhow!("--crl {}: {e}", p.display()),
        None => anyhow!(
            "--crl {}: no CA to check it against (pass --ca)",
            p.display()
        ),
    })
}

fn read_cert(p: &Path) -> Result<CertInfo> {
    let bytes = read_small(p)?;
    Ok(CertInfo::parse(&pki::parse_pem_or_der(&bytes)?)?)
}
