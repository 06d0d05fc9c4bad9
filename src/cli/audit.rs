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
use signet::audit::verify::{ReceiptInputs, verify_dir_anchored, verify_receipt};
use signet::audit::{LOG_KEY_FILE, Receipt};
use signet::pki::{self, CertInfo};

use super::{Cli, ensure_module_environment, load_config, local_caller, runtime};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute every entry hash, the hash chain, the tree and every checkpoint signature;
    /// name the first entry that does not match.
    Verify {
        /// The evidence log directory. Without it: the log of the configured storage backend
        /// (`--config`): `[audit].dir`, or the PostgreSQL database (exported to a temporary
        /// directory and verified the same way).
        dir: Option<PathBuf>,
        /// The log's public key (PEM). Default: DIR/log-key.pem (use a copy you trust for audits).
        #[arg(long)]
        key: Option<PathBuf>,
        /// A checkpoint you kept earlier (the signed note, or the JSON of
        /// GET /v1/audit/checkpoint): the log must still have its root at its size.
        #[arg(long)]
        anchor: Option<PathBuf>,
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
        #[arg(long)]
        tsa_ca: Option<PathBuf>,
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
        /// key usage and that it was valid at the entry's time.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The SHA-256 digest (hex) you expect the receipt to cover.
        #[arg(long, conflicts_with = "document")]
        digest: Option<String>,
        /// The document you expect the receipt to cover (hashed here with SHA-256).
        #[arg(long)]
        document: Option<PathBuf>,
        /// Succeed without a certificate, checking only that the entry is in the log.
        #[arg(long)]
        no_certificate: bool,
    },
}

pub fn audit(cli: &Cli, cmd: &AuditCommand) -> Result<()> {
    let (dir, key, anchor) = match cmd {
        AuditCommand::Verify { dir, key, anchor } => (dir, key, anchor),
        AuditCommand::AcceptRestore { reason } => return accept_restore(cli, reason),
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
    let Some(dir) = dir else {
        return verify_configured(cli, key.as_deref(), anchor.as_deref());
    };
    let anchor_text = anchor.as_deref().map(read_checkpoint_note).transpose()?;
    let key_path = key.clone().unwrap_or_else(|| dir.join(LOG_KEY_FILE));
    let log_key = read_public_key(&key_path)?;
    if key.is_none() && !cli.json {
        eprintln!(
            "note: using {}; for an audit, pass --key with a copy of the log key you trust",
            key_path.display()
        );
    }
    report_verification(
        cli,
        verify_dir_anchored(dir, &log_key, anchor_text.as_deref()),
    )
}

/// `signet audit verify` without DIR: the configured backend's log.
fn verify_configured(cli: &Cli, key: Option<&Path>, anchor: Option<&Path>) -> Result<()> {
    let config = load_config(cli)?;
    let pg = match &config.storage {
        signet::config::StorageConfig::File => {
            let dir = config.audit.dir.clone();
            let log_key = read_public_key(
                &key.map(Path::to_path_buf)
                    .unwrap_or_else(|| dir.join(LOG_KEY_FILE)),
            )?;
            let anchor_text = anchor.map(read_checkpoint_note).transpose()?;
            return report_verification(
                cli,
                verify_dir_anchored(&dir, &log_key, anchor_text.as_deref()),
            );
        }
        signet::config::StorageConfig::Postgres(pg) => pg.clone(),
    };
    let tmp = tempdir_in_target()?;
    let rt = runtime()?;
    let exported = rt.block_on(async {
        let db = signet::storage::postgres::Db::connect(
            &pg,
            std::sync::Arc::new(signet::metrics::Metrics::new()),
        )
        .await?;
        signet::storage::postgres::export(&db, &tmp).await
    });
    let result = exported
        .context("cannot read the log from the database")
        .and_then(|_| {
            let log_key = read_public_key(
                &key.map(Path::to_path_buf)
                    .unwrap_or_else(|| tmp.join(LOG_KEY_FILE)),
            )?;
            if key.is_none() && !cli.json {
                eprintln!(
                    "note: using the log key recorded in the database; for an audit, pass --key with a copy you trust"
                );
            }
            let anchor_text = anchor.map(read_checkpoint_note).transpose()?;
            report_verification(
                cli,
                verify_dir_anchored(&tmp, &log_key, anchor_text.as_deref()),
            )
        });
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// A private temporary directory (the export holds signer evidence).
fn tempdir_in_target() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("signet-verify-{}", uuid::Uuid::new_v4()));
    signet::fsutil::create_private_dir(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// `signet audit export DIR`: the configured backend's whole log in the file format.
fn export_log(cli: &Cli, dir: &Path) -> Result<()> {
    let config = load_config(cli)?;
    let report = match &config.storage {
        signet::config::StorageConfig::File => {
            let src = &config.audit.dir;
            signet::fsutil::create_private_dir(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let mut entries = 0u64;
            for name in [
                signet::audit::ENTRIES_FILE,
                signet::audit::CHECKPOINTS_FILE,
                LOG_KEY_FILE,
                signet::audit::timestamp::TIMESTAMPS_FILE,
            ] {
                let from = src.join(name);
                if !from.exists() {
                    continue;
                }
                let bytes = std::fs::read(&from)
                    .with_context(|| format!("cannot read {}", from.display()))?;
                if name == signet::audit::ENTRIES_FILE {
                    entries = bytes.iter().filter(|b| **b == b'\n').count() as u64;
                }
                signet::fsutil::write_atomic(&dir.join(name), &bytes)
                    .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
            }
            serde_json::json!({"entries": entries})
        }
        signet::config::StorageConfig::Postgres(pg) => {
            let rt = runtime()?;
            let r = rt.block_on(async {
                let db = signet::storage::postgres::Db::connect(
                    pg,
                    std::sync::Arc::new(signet::metrics::Metrics::new()),
                )
                .await?;
                signet::storage::postgres::export(&db, dir).await
            })?;
            serde_json::to_value(r)?
        }
    };
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "dir": dir, "report": report})
        );
    } else {
        println!(
            "wrote the evidence log ({} entries) to {}; verify it with `signet audit verify {}`",
            report["entries"],
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

fn report_verification(
    cli: &Cli,
    result: Result<signet::audit::verify::DirReport, signet::audit::verify::DirFailure>,
) -> Result<()> {
    match result {
        Ok(r) => {
            if cli.json {
                println!("{}", serde_json::json!({"ok": true, "report": r}));
            } else {
                println!(
                    "OK: {} entries, {} checkpoints, latest checkpoint covers {} entries ({} newer entries not yet checkpointed)",
                    r.entries, r.checkpoints, r.latest_checkpoint_size, r.unsigned_tail
                );
                if let Some(n) = r.anchor_size {
                    println!(
                        "  the log extends the checkpoint you kept (size {n}): nothing before it was changed"
                    );
                }
                for (ev, n) in &r.events {
                    println!("  {ev}: {n}");
                }
            }
            Ok(())
        }
        Err(f) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "first_bad_entry": f.first_bad_entry, "error": f.message})
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
        digest,
        document,
        no_certificate,
    } = cmd;
    let expected_digest = match (digest, document) {
        (Some(h), _) => Some(
            h.trim()
                .parse::<signet::domain::Sha256Digest>()
                .map_err(|e| anyhow!("--digest: {e}"))?
                .0,
        ),
        (None, Some(p)) => {
            use sha2::Digest;
            let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            Some(sha2::Sha256::digest(&bytes).into())
        }
        (None, None) => None,
    };
    let ca = ca.as_deref().map(read_cert).transpose()?;
    let receipt_json: Value = read_json(receipt)?;
    let r: Receipt = serde_json::from_value(
        receipt_json
            .get("receipt")
            .cloned()
            .unwrap_or_else(|| receipt_json.clone()),
    )
    .context("the receipt file holds neither a sign response nor a receipt")?;
    let proof_text = std::fs::read_to_string(proof)
        .with_context(|| format!("cannot read {}", proof.display()))?;
    let (proof_text, entry) = match serde_json::from_str::<Value>(&proof_text) {
        Ok(v) => {
            let p = v["proof"]
                .as_str()
                .ok_or_else(|| anyhow!("{}: JSON without a `proof` field", proof.display()))?
                .to_owned();
            let entry = v
                .get("entry")
                .filter(|e| e.is_object())
                .map(serde_json_canonicalizer::to_vec)
                .transpose()?;
            (p, entry)
        }
        Err(_) => (proof_text, None),
    };
    let parsed = TlogProof::parse(&proof_text).map_err(|e| anyhow!("{}: {e}", proof.display()))?;
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
    };
    match verify_receipt(&inputs) {
        Ok(rep) => {
            if cli.json {
                println!("{}", serde_json::json!({"ok": true, "report": rep}));
            } else {
                println!(
                    "OK: entry {} of log {} is included in the signed checkpoint of size {}",
                    rep.index, rep.log_origin, rep.checkpoint_size
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
                } else {
                    println!(
                        "  the signature was NOT checked (--no-certificate): this shows only that the entry is in the log"
                    );
                }
                if rep.chain_checked {
                    println!(
                        "  the certificate chains to the CA given, may sign, and was valid at {}",
                        rep.time
                    );
                }
            }
            Ok(())
        }
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({"ok": false, "error": e}));
            }
            bail!("receipt verification FAILED: {e}")
        }
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

/// `signet bundle verify`.
pub fn bundle(cli: &Cli, cmd: &BundleCommand) -> Result<()> {
    use signet::audit::bundle::{self, Bundle, Trust};
    let BundleCommand::Verify {
        file,
        ca,
        log_key,
        tsa_ca,
        html,
    } = cmd;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let b: Bundle = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an evidence bundle", file.display()))?;
    let cas = match ca {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            let chain = x509_chain(&bytes)?;
            if chain.is_empty() {
                bail!("{}: no certificate", p.display());
            }
            chain
        }
        None => Vec::new(),
    };
    let trust = Trust {
        log_key: log_key.as_deref().map(read_public_key).transpose()?,
        cas,
        tsa_ca: tsa_ca.as_deref().map(read_cert).transpose()?,
    };
    match bundle::verify(&b, &trust) {
        Ok(account) => {
            if let Some(path) = html {
                std::fs::write(path, bundle::explain_html(&account))
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if cli.json {
                println!("{}", serde_json::json!({"ok": true, "account": account}));
            } else {
                print!("{}", bundle::explain(&account));
            }
            Ok(())
        }
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({"ok": false, "error": e}));
            }
            bail!("bundle verification FAILED: {e}")
        }
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
    if signet::audit::is_locked(&dir) {
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
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => v["checkpoint"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{}: JSON without `checkpoint`", p.display())),
        Err(_) => Ok(text),
    }
}

fn read_json(p: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
}

fn read_public_key(p: &Path) -> Result<VerifyingKey> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
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

fn read_cert(p: &Path) -> Result<CertInfo> {
    let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(CertInfo::parse(&pki::parse_pem_or_der(&bytes)?)?)
}
