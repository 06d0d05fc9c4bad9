//! `signet storage migrate`: move a file-backend installation into PostgreSQL.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;

use signet::audit::verify::verify_dir;
use signet::config::StorageConfig;

use super::{Cli, load_config, runtime};

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
    let StorageConfig::Postgres(pg) = &config.storage else {
        bail!(
            "configuration key `storage.backend`: migrate moves a file log into PostgreSQL; set backend = \"postgres\" with url_file in the configuration given with --config"
        );
    };
    if signet::audit::is_locked(from) {
        bail!(
            "the evidence log in {} is in use: stop the service first",
            from.display()
        );
    }
    let key_path = from.join(signet::audit::LOG_KEY_FILE);
    let key_pem = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let key =
        <p256::ecdsa::VerifyingKey as spki::DecodePublicKey>::from_public_key_pem(key_pem.trim())
            .map_err(|e| anyhow!("{}: {e}", key_path.display()))?;
    // Only a log that verifies is moved.
    let checked = verify_dir(from, &key).map_err(|f| {
        anyhow!(
            "{} does not verify, nothing was migrated: {f}",
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
    let report = rt.block_on(async {
        let db =
            signet::storage::postgres::Db::connect(pg, Arc::new(signet::metrics::Metrics::new()))
                .await?;
        signet::storage::postgres::migrate(
            &db,
            from,
            &state_dir,
            &config.audit.origin,
            key_pem.trim_end(),
        )
        .await
    })?;
    if cli.json {
        println!("{}", serde_json::json!({"ok": true, "report": report}));
    } else {
        println!(
            "migrated {} entries, {} checkpoints, {} key states and {} rotations into PostgreSQL; the root at size {} is {} (as in {})",
            report.entries,
            report.checkpoints,
            report.key_states,
            report.rotations,
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
