//! Moving a whole log between backends and out of them, for operators and auditors:
//! `signet audit export DIR` (either backend, to the file format), `signet storage migrate`
//! (a file log into PostgreSQL, byte for byte), and the log as a
//! [`LogSource`](crate::audit::verify::LogSource) for `signet audit verify --config` (read in
//! place). The commands above this module do not name a backend.

use std::path::Path;
use std::sync::Arc;

use super::{Error, postgres};
use crate::audit::verify::{DirFailure, DirSource, LogSource};
use crate::audit::{self, timestamp::TIMESTAMPS_FILE};
use crate::config::{Config, StorageConfig};
use crate::metrics::Metrics;

pub use postgres::MigrateReport;

/// What `signet audit export DIR` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub entries: u64,
    pub checkpoints: u64,
}

/// Whether a running service holds the configured log as its one writer (the file backend's
/// `LOCK`). Replicas on a database never hold it alone.
pub fn held_by_a_running_service(config: &Config) -> bool {
    match &config.storage {
        StorageConfig::File => super::file::is_locked(&config.audit.dir),
        StorageConfig::Postgres(_) => false,
    }
}

/// Whether the log in `dir` (the file format) is held by a running service.
pub fn dir_in_use(dir: &Path) -> bool {
    super::file::is_locked(dir)
}

/// Write the configured backend's whole log to `dir` in the file format (`entries.jsonl`,
/// `checkpoints.jsonl`, `log-key.pem`, `timestamps.jsonl`).
pub async fn export(config: &Config, dir: &Path) -> Result<ExportReport, Error> {
    match &config.storage {
        StorageConfig::File => export_files(&config.audit.dir, dir),
        StorageConfig::Postgres(pg) => {
            let db = postgres::Db::connect(pg, Arc::new(Metrics::new())).await?;
            postgres::export(&db, dir).await
        }
    }
}

/// Copy the file backend's log files (the derived ones are rebuilt wherever it is opened).
fn export_files(src: &Path, dir: &Path) -> Result<ExportReport, Error> {
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| Error::Io { path, source }
    };
    crate::fsutil::create_private_dir(dir).map_err(io(dir))?;
    let mut report = ExportReport {
        entries: 0,
        checkpoints: 0,
    };
    for name in [
        audit::ENTRIES_FILE,
        audit::CHECKPOINTS_FILE,
        audit::LOG_KEY_FILE,
        TIMESTAMPS_FILE,
    ] {
        let from = src.join(name);
        if !from.exists() {
            continue;
        }
        let bytes = std::fs::read(&from).map_err(io(&from))?;
        let lines = bytes.iter().filter(|b| **b == b'\n').count() as u64;
        match name {
            audit::ENTRIES_FILE => report.entries = lines,
            audit::CHECKPOINTS_FILE => report.checkpoints = lines,
            _ => {}
        }
        let to = dir.join(name);
        crate::fsutil::write_atomic(&to, &bytes).map_err(io(&to))?;
    }
    Ok(report)
}

/// Whether the configured storage can receive a migrated log (a database).
pub fn check_migration_target(config: &Config) -> Result<(), Error> {
    match &config.storage {
        StorageConfig::Postgres(_) => Ok(()),
        StorageConfig::File => Err(migration_target_error()),
    }
}

fn migration_target_error() -> Error {
    Error::Config(
        "configuration key `storage.backend`: migrate moves a file log into PostgreSQL; set backend = \"postgres\" with url_file in the configuration given with --config".into(),
    )
}

/// Import the file log in `from` (verified by the caller), its key states and rotation journal
/// (`state_from`) into the configured database, which must hold no log yet.
pub async fn migrate(
    config: &Config,
    from: &Path,
    state_from: &Path,
    log_key_pem: &str,
) -> Result<MigrateReport, Error> {
    let StorageConfig::Postgres(pg) = &config.storage else {
        return Err(migration_target_error());
    };
    let db = postgres::Db::connect(pg, Arc::new(Metrics::new())).await?;
    postgres::migrate(&db, from, state_from, &config.audit.origin, log_key_pem).await
}

/// The configured backend's log, read in place, for [`crate::audit::verify::verify_log`].
/// Blocking reads: use the source from a thread that is not one of `rt`'s workers.
pub fn log_source(
    config: &Config,
    rt: &tokio::runtime::Runtime,
) -> Result<Box<dyn LogSource>, DirFailure> {
    match &config.storage {
        StorageConfig::File => Ok(Box::new(DirSource::open(&config.audit.dir)?)),
        StorageConfig::Postgres(pg) => {
            let db = rt
                .block_on(postgres::Db::connect(pg, Arc::new(Metrics::new())))
                .map_err(|e| DirFailure::other(format!("cannot connect to the database: {e}")))?;
            Ok(Box::new(postgres::PgSource::new(rt.handle().clone(), db)))
        }
    }
}
