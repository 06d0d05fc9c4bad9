//! The `signet` command line: argument parsing, configuration loading, and the choice between
//! acting through a running service's admin API and acting on the token directly.
//!
//! Admin commands talk to the running service when one holds the evidence log (there is one
//! writer), using the `[cli]` section's client certificate; otherwise they start the
//! application in-process, act, sign a final checkpoint and stop.

mod admin;
mod audit;
mod retention;
mod serve;
mod storage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use signet::config::{Config, Role};
use signet::service::{App, Caller};
use signet::tls::ClientIdentity;

#[derive(Parser)]
#[command(
    name = "signet",
    version,
    about = "HSM-backed document digest signing with a tamper-evident evidence log"
)]
pub struct Cli {
    /// Configuration file (default: $SIGNET_CONFIG, else ./signet-dev/signet.toml if present).
    #[arg(long, global = true, env = "SIGNET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Machine-readable JSON output instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the service (mTLS API + metrics listener) until SIGTERM.
    Serve(serve::ServeArgs),
    /// Development setup: SoftHSM token, PINs, dev TLS PKI, demo clients and policies.
    #[command(subcommand)]
    Dev(serve::DevCommand),
    /// Tenant keys in the token.
    #[command(subcommand)]
    Keys(admin::KeysCommand),
    /// Certificates: manual issuance (CSR out, certificate in) and expiry status.
    #[command(subcommand)]
    Certs(admin::CertsCommand),
    /// Key rotation: start, status, rollback.
    #[command(subcommand)]
    Rotate(admin::RotateCommand),
    /// Offline verification of an evidence log directory.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Offline verification of a signature receipt.
    #[command(subcommand)]
    Receipt(audit::ReceiptCommand),
    /// Offline verification of an evidence bundle (`signet audit export --transaction`).
    #[command(subcommand)]
    Bundle(audit::BundleCommand),
    /// Signer evidence: erase a data subject's, run the retention sweep, rotate the vault key.
    #[command(subcommand)]
    Evidence(retention::EvidenceCommand),
    /// Legal holds: records they cover are never erased.
    #[command(subcommand)]
    Holds(retention::HoldsCommand),
    /// Storage backends: migrate a file log into PostgreSQL.
    #[command(subcommand)]
    Storage(storage::StorageCommand),
    /// Configuration checks.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration file and the files it names; exit non-zero on a problem.
    Check,
}

#[derive(Args, Clone)]
pub struct TenantArg {
    /// Tenant name.
    #[arg(long)]
    pub tenant: String,
}

pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Serve(a) => serve::serve(&cli, a),
        Command::Dev(c) => serve::dev(&cli, c),
        Command::Keys(c) => admin::keys(&cli, c),
        Command::Certs(c) => admin::certs(&cli, c),
        Command::Rotate(c) => admin::rotate(&cli, c),
        Command::Audit(c) => audit::audit(&cli, c),
        Command::Receipt(c) => audit::receipt(&cli, c),
        Command::Bundle(c) => audit::bundle(&cli, c),
        Command::Storage(c) => storage::storage(&cli, c),
        Command::Evidence(c) => retention::evidence(&cli, c),
        Command::Holds(c) => retention::holds(&cli, c),
        Command::Config(ConfigCommand::Check) => {
            let config = load_config(&cli)?;
            preflight(&config)?;
            signet::hsm::read_pin(&config.hsm.pin).context("hsm PIN")?;
            println!(
                "configuration OK: {} clients, {} policies",
                config.dynamic.clients.len(),
                config.dynamic.policies.len()
            );
            Ok(())
        }
    }
}

/// A verifier's verdict short of `verified` (everything checked out, but not all of it
/// against the verifier's own trust anchors): the process exits with status 2, a refusal with
/// 1.
#[derive(Debug)]
pub struct Unverified(pub String);

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unverified {}

/// Check the files the configuration names (TLS certificates, keys and client CAs, the
/// PKCS#11 module, the database URL and CA files) before any state is opened, so a mistake is
/// reported by its configuration key, not as a symptom in the token or the evidence log.
pub fn preflight(config: &Config) -> Result<()> {
    let policies = Arc::new(arc_swap::ArcSwap::from_pointee(
        signet::policy::Policies::new(&config.dynamic),
    ));
    signet::tls::server_config(&config.server, &config.dynamic.clients, policies)?;
    if !config.hsm.module.exists() {
        bail!(
            "configuration key `hsm.module`: {} does not exist",
            config.hsm.module.display()
        );
    }
    if let signet::config::StorageConfig::Postgres(pg) = &config.storage {
        if let signet::config::UrlSource::File(f) = &pg.url {
            std::fs::read_to_string(f).with_context(|| {
                format!(
                    "configuration key `storage.url_file`: cannot read {}",
                    f.display()
                )
            })?;
        }
        if let Some(ca) = &pg.ca_file {
            std::fs::read(ca).with_context(|| {
                format!(
                    "configuration key `storage.ca_file`: cannot read {}",
                    ca.display()
                )
            })?;
        }
    }
    Ok(())
}

/// Which configuration file to use.
pub fn config_path(cli: &Cli) -> Result<PathBuf> {
    if let Some(p) = &cli.config {
        return Ok(p.clone());
    }
    let dev = signet::dev::config_path(Path::new(signet::dev::DEFAULT_DIR));
    if dev.exists() {
        return Ok(dev);
    }
    bail!(
        "no configuration: pass --config FILE (or set SIGNET_CONFIG), or run `signet serve --dev` first"
    )
}

pub fn load_config(cli: &Cli) -> Result<Config> {
    let path = config_path(cli)?;
    Config::load(&path).with_context(|| format!("in {}", path.display()))
}

/// Prepare the process before any thread or token call exists: make it non-dumpable (no core
/// dump, no ptrace or /proc reads by other unprivileged processes), and re-run this same
/// command when needed:
/// - with the values `[hsm.environment]` asks for, if this process lacks them (the PKCS#11
///   module reads its own environment when it is initialised);
/// - without the PIN's environment variable (`hsm.pin_env`), which would otherwise stay in
///   `/proc/PID/environ` for the life of the process: the PIN goes to the new image through
///   an inherited pipe instead, read once.
pub fn ensure_module_environment(config: &Config) -> Result<()> {
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "cannot make the process non-dumpable (PR_SET_DUMPABLE)");
    }
    let missing: Vec<(&String, &String)> = config
        .hsm
        .environment
        .iter()
        .filter(|(k, v)| std::env::var(k).ok().as_deref() != Some(v.as_str()))
        .collect();
    let pin_var = match &config.hsm.pin {
        signet::config::PinSource::Env(var) if std::env::var_os(var).is_some() => Some(var),
        _ => None,
    };
    if missing.is_empty() && pin_var.is_none() {
        return Ok(());
    }
    if std::env::var_os("SIGNET_REEXEC").is_some() {
        bail!(
            "configuration key `hsm.environment`: could not apply {:?}",
            missing.iter().map(|(k, _)| k).collect::<Vec<_>>()
        );
    }
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the signet executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .envs(missing.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("SIGNET_REEXEC", "1");
    // Kept open across the exec (no close-on-exec); the new image reads it once.
    let mut pin_pipe = None;
    if let Some(var) = pin_var {
        let pin = signet::hsm::read_pin(&config.hsm.pin).context("hsm PIN")?;
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::empty())
            .context("cannot create a pipe for the PIN")?;
        {
            use secrecy::ExposeSecret;
            use std::io::Write;
            let mut w = std::fs::File::from(write);
            w.write_all(pin.expose_secret().as_bytes())
                .context("cannot pass the PIN to the re-executed process")?;
        }
        use std::os::fd::AsRawFd;
        cmd.env_remove(var)
            .env(signet::hsm::PIN_FD_ENV, read.as_raw_fd().to_string());
        pin_pipe = Some(read);
    }
    let err = cmd.exec();
    drop(pin_pipe);
    Err(err).context("cannot re-run signet with the module environment")
}

/// A caller for in-process (offline) admin actions: the local operator, admin and audit roles.
pub fn local_caller() -> Caller {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "operator".into());
    Caller {
        identity: Arc::new(ClientIdentity::local_operator(&user)),
        client: Arc::new(signet::config::ClientConfig {
            identity: format!("local:{user}"),
            tenants: Default::default(),
            roles: [Role::Admin, Role::Audit].into_iter().collect(),
            ..Default::default()
        }),
        request_id: format!("cli-{}", uuid::Uuid::new_v4().simple()),
    }
}

/// Start the application in-process for an offline admin command.
pub async fn start_offline(config: Config) -> Result<Arc<App>> {
    let app = App::start(config)
        .await
        .context("cannot start Signet in-process")?;
    app.refresh_metrics();
    Ok(app)
}

/// A tokio runtime for CLI commands.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Print rows as an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}
