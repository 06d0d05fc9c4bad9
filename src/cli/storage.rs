//! `signet storage migrate`: move a file-backend installation into PostgreSQL.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;

use signet::audit::verify::{DirSource, KeySource, LogTrust, verify_log};

use super::{Cli, ensure_module_environment, load_config, runtime};

#[derive(Subcommand)]
pub enum StorageCommand {
    /// Import a file evidence log byte for byte (same leaves, same roots: existing receipts and
    /// checkpoints still verify), with its key states and rotation journal, into the
    /// configured PostgreSQL database (which must hold no log yet). Stop the service first.
    Migrate {
        /// The file backend's evidence log directory (its `[audit].dir`).
        #[arg(long)]
        from: PathBuf,
        /// The file backend's state directory (`[state].dir`: keys.json, rotations.json).
        /// Default: the configured `[state].dir`.
        #[arg(long)]
        state_from: Option<PathBuf>,
    },
}

pub fn storage(cli: &Cli, cmd: &StorageCommand) -> Result<()> {
    let StorageCommand::Migrate { from, state_from } = cmd;
    let config = load_config(cli)?;
    signet::storage::transfer::check_migration_target(&config)?;
    if signet::storage::transfer::dir_in_use(from) {
        bail!(
            "the evidence log in {} is in use: stop the service first",
            from.display()
        );
    }
    // The log must verify with the token's log key (never a key stored beside the data): the
    // key that signed its checkpoints and will sign the database's next ones.
    ensure_module_environment(&config)?;
    let (key, _) = signet::service::token_log_trust(&config)
        .context("cannot read the evidence log key from the token")?;
    let key_pem = signet::pki::public_key_pem(&key);
    // Only a log that verifies is moved.
    let trust = LogTrust::new(key, KeySource::Token);
    let checked = DirSource::open(from)
        .and_then(|mut src| verify_log(&mut src, &trust))
        .map_err(|f| {
            anyhow!(
                "{} does not verify with the token's log key, nothing was migrated: {f}",
                from.display()
            )
        })?;
    if let Some(origin) = &checked.origin
        && origin != &config.audit.origin
    {
        bail!(
            "the log's origin is `{origin}` but `audit.origin` is `{}`: they must be the same",
            config.audit.origin
        );
    }
    let state_dir = state_from.clone().unwrap_or(config.state_dir.clone());
    let rt = runtime()?;
    let report = rt.block_on(signet::storage::transfer::migrate(
        &config,
        from,
        &state_dir,
        key_pem.trim_end(),
    ))?;
    if cli.json {
        println!("{}", serde_json::json!({"ok": true, "report": report}));
    } else {
        println!(
            "migrated {} entries, {} checkpoints, {} key states, {} rotations, {} signer-evidence records and {} legal holds into PostgreSQL; the root at size {} is {} (as in {})",
            report.entries,
            report.checkpoints,
            report.key_states,
            report.rotations,
            report.vault_records,
            report.holds,
            report.tree_size,
            report.root,
            from.display()
        );
        println!(
            "next: start the replicas with this configuration; `signet audit verify --config FILE` checks the migrated log"
        );
    }
    Ok(())
}
