//! `signet audit verify` and `signet receipt verify`: offline, no token, no network.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use p256::ecdsa::VerifyingKey;
use serde_json::Value;
use spki::DecodePublicKey;

use signet::audit::note::TlogProof;
use signet::audit::verify::{ReceiptInputs, verify_dir, verify_receipt};
use signet::audit::{LOG_KEY_FILE, Receipt};
use signet::pki::{self, CertInfo};

use super::Cli;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute every entry hash, the hash chain, the tree and every checkpoint signature;
    /// name the first entry that does not match.
    Verify {
        /// The evidence log directory ([audit].dir).
        dir: PathBuf,
        /// The log's public key (PEM). Default: DIR/log-key.pem (use a copy you trust for audits).
        #[arg(long)]
        key: Option<PathBuf>,
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
        #[arg(long)]
        certificate: Option<PathBuf>,
    },
}

pub fn audit(cli: &Cli, cmd: &AuditCommand) -> Result<()> {
    let AuditCommand::Verify { dir, key } = cmd;
    let key_path = key.clone().unwrap_or_else(|| dir.join(LOG_KEY_FILE));
    let log_key = read_public_key(&key_path)?;
    if key.is_none() && !cli.json {
        eprintln!(
            "note: using {}; for an audit, pass --key with a copy of the log key you trust",
            key_path.display()
        );
    }
    match verify_dir(dir, &log_key) {
        Ok(r) => {
            if cli.json {
                println!("{}", serde_json::json!({"ok": true, "report": r}));
            } else {
                println!(
                    "OK: {} entries, {} checkpoints, latest checkpoint covers {} entries ({} newer entries not yet checkpointed)",
                    r.entries, r.checkpoints, r.latest_checkpoint_size, r.unsigned_tail
                );
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
    } = cmd;
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
                if rep.signature_checked {
                    println!("  the signature verifies with the signing certificate");
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
