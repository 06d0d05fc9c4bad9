//! `signet evidence` and `signet holds`: erasure of signer evidence, the retention sweep, the
//! vault's key rotation and legal holds, through the running service's admin API (or
//! in-process when no service holds the evidence log).

use anyhow::{Result, bail};
use clap::Subcommand;

use signet::service::{
    ErasureAnswer, ErasureRequest, HoldRequest, ReleaseRequest, SweepAnswer, VaultRotationAnswer,
    VaultRotationRequest,
};
use signet::vault::Hold;

use super::admin::{Op, exec};
use super::{Cli, table};

#[derive(Subcommand)]
pub enum EvidenceCommand {
    /// Erase a data subject's signer evidence (records whose retention has ended; records on
    /// legal hold never). An `evidence_erased` entry records it; receipts and proofs stay valid.
    Erase {
        /// An identifier in one of `[retention] subject_fields` (an email address or ID).
        #[arg(long)]
        subject: String,
        /// Why (recorded as evidence): e.g. the erasure request's reference.
        #[arg(long)]
        reason: String,
        /// Also erase records still within their retention (say in --reason why it is lawful).
        #[arg(long)]
        override_retention: bool,
    },
    /// Run the retention sweep now (it also runs every `[retention] sweep_interval`).
    Sweep,
    /// Rotate the vault's key-encryption key now: live data keys re-wrapped, the old key
    /// destroyed in the token (backups of erased records become unreadable).
    RotateKey {
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum HoldsCommand {
    /// Place a legal hold on a transaction, or on a tenant's records (optionally in a window).
    Add {
        #[arg(long, conflicts_with = "tenant")]
        transaction: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// RFC 3339: records signed at or after (with --tenant).
        #[arg(long, requires = "tenant")]
        since: Option<String>,
        /// RFC 3339: records signed before (with --tenant).
        #[arg(long, requires = "tenant")]
        until: Option<String>,
        #[arg(long)]
        reason: String,
    },
    /// Every hold, active and released.
    List,
    /// Release a hold: its records follow their retention again.
    Release {
        /// The hold's ID (`signet holds list`).
        id: String,
        #[arg(long)]
        reason: String,
    },
}

pub fn evidence(cli: &Cli, cmd: &EvidenceCommand) -> Result<()> {
    match cmd {
        EvidenceCommand::Erase {
            subject,
            reason,
            override_retention,
        } => {
            let v = exec(
                cli,
                Op::Erase(ErasureRequest {
                    subject: subject.clone(),
                    reason: reason.clone(),
                    override_retention: *override_retention,
                }),
            )?;
            let a: ErasureAnswer = serde_json::from_value(v.clone())?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "erased the signer evidence of {} of {} record(s) of this subject; evidence entry {}",
                    a.erased,
                    a.found,
                    a.entry.map_or("-".into(), |e| e.to_string())
                );
                if !a.within_retention.is_empty() {
                    println!(
                        "left {} record(s) within their retention (entries {:?}): repeat with --override-retention if the erasure is lawful",
                        a.within_retention.len(),
                        a.within_retention
                    );
                }
                if !a.on_hold.is_empty() {
                    println!(
                        "left {} record(s) on legal hold (entries {:?})",
                        a.on_hold.len(),
                        a.on_hold
                    );
                }
            }
            if !a.within_retention.is_empty() || !a.on_hold.is_empty() {
                bail!("some of the subject's records were not erased");
            }
            Ok(())
        }
        EvidenceCommand::Sweep => {
            let v = exec(cli, Op::Sweep)?;
            let a: SweepAnswer = serde_json::from_value(v.clone())?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "retention sweep: erased {} record(s) (evidence entries {:?}); {} past retention on legal hold",
                    a.erased, a.entries, a.on_hold
                );
            }
            Ok(())
        }
        EvidenceCommand::RotateKey { reason } => {
            let v = exec(
                cli,
                Op::VaultRotate(VaultRotationRequest {
                    reason: reason.clone(),
                }),
            )?;
            let a: VaultRotationAnswer = serde_json::from_value(v.clone())?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "vault key rotated: generation {} -> {}, {} data key(s) re-wrapped, generation(s) {:?} destroyed in the token; evidence entry {}",
                    a.from_generation, a.to_generation, a.rewrapped, a.destroyed, a.entry
                );
            }
            Ok(())
        }
    }
}

pub fn holds(cli: &Cli, cmd: &HoldsCommand) -> Result<()> {
    match cmd {
        HoldsCommand::Add {
            transaction,
            tenant,
            since,
            until,
            reason,
        } => {
            let v = exec(
                cli,
                Op::HoldAdd(HoldRequest {
                    transaction_id: transaction.clone(),
                    tenant: tenant.clone(),
                    since: since.clone(),
                    until: until.clone(),
                    reason: reason.clone(),
                }),
            )?;
            let h: Hold = serde_json::from_value(v.clone())?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "legal hold {} placed on {}; evidence entry {}",
                    h.id,
                    scope(&h),
                    h.placed_entry
                );
            }
            Ok(())
        }
        HoldsCommand::List => {
            let v = exec(cli, Op::HoldList)?;
            let holds: Vec<Hold> = serde_json::from_value(v["holds"].clone())?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&holds)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = holds
                .iter()
                .map(|h| {
                    vec![
                        h.id.clone(),
                        if h.is_active() { "active" } else { "released" }.into(),
                        scope(h),
                        h.placed_at.clone(),
                        h.reason.clone(),
                    ]
                })
                .collect();
            table(&["ID", "STATE", "COVERS", "PLACED", "REASON"], &rows);
            Ok(())
        }
        HoldsCommand::Release { id, reason } => {
            let v = exec(
                cli,
                Op::HoldRelease(
                    id.clone(),
                    ReleaseRequest {
                        reason: reason.clone(),
                    },
                ),
            )?;
            let h: Hold = serde_json::from_value(v.clone())?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "legal hold {} released; evidence entry {}",
                    h.id,
                    h.released.as_ref().map_or(0, |r| r.entry)
                );
            }
            Ok(())
        }
    }
}

/// What a hold covers, in words.
fn scope(h: &Hold) -> String {
    match (&h.transaction_id, &h.tenant) {
        (Some(t), _) => format!("transaction {t}"),
        (None, Some(t)) => format!(
            "tenant {t}{}{}",
            h.since
                .as_ref()
                .map_or(String::new(), |s| format!(" from {s}")),
            h.until
                .as_ref()
                .map_or(String::new(), |u| format!(" until {u}"))
        ),
        (None, None) => "-".into(),
    }
}
