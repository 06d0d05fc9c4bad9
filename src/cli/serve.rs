//! `signet serve` and `signet dev init`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use signet::config::Config;
use signet::dev;
use signet::service::{AdminRequest, App};

use super::{Cli, ensure_module_environment, load_config, local_caller, preflight, runtime};

#[derive(Args)]
pub struct ServeArgs {
    /// Use (and on first run create) the development setup in --data-dir.
    #[arg(long)]
    pub dev: bool,
    /// Development data directory.
    #[arg(long, default_value = dev::DEFAULT_DIR)]
    pub data_dir: PathBuf,
    /// Write {"api": ADDR, "metrics": ADDR} to this file once the service accepts requests.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// With --dev, on first run: API listen address written into the configuration.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// With --dev, on first run: metrics listen address written into the configuration.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
}

#[derive(Subcommand)]
pub enum DevCommand {
    /// Create the development setup (token, PINs, TLS PKI, config, demo keys) if missing.
    Init(DevInitArgs),
}

#[derive(Args)]
pub struct DevInitArgs {
    #[arg(long, default_value = dev::DEFAULT_DIR)]
    pub data_dir: PathBuf,
    /// API listen address written into the configuration.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Metrics listen address written into the configuration.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    /// Use the manual issuer (CSR out, certificate in) instead of the internal CA.
    #[arg(long)]
    pub manual_issuer: bool,
    /// PKCS#11 module (SoftHSM).
    #[arg(long, default_value = dev::SOFTHSM_MODULE)]
    pub module: PathBuf,
    /// Do not create the demo tenants' keys.
    #[arg(long)]
    pub no_keys: bool,
}

pub fn serve(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let (config, dev_dir) = if args.dev {
        let mut opts = dev::Options::new(args.data_dir.clone());
        opts.listen = args.listen;
        opts.metrics_listen = args.metrics_listen;
        let created = dev::prepare(&opts)?;
        if created {
            eprintln!(
                "created the development setup in {}",
                args.data_dir.display()
            );
        }
        let config = Config::load(&dev::config_path(&args.data_dir))?;
        preflight(&config)?;
        ensure_module_environment(&config)?;
        provision(&args.data_dir, &config)?;
        (config, Some(args.data_dir.clone()))
    } else {
        let config = load_config(cli)?;
        preflight(&config)?;
        ensure_module_environment(&config)?;
        (config, None)
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let app = App::start(config).await.context("cannot start")?;
        if dev_dir.is_some() {
            create_demo_keys(&app).await?;
        }
        let ready_file = args.ready_file.clone();
        signet::http::server::run(app, move |bound| {
            if let Some(f) = &ready_file {
                let body = serde_json::json!({"api": bound.api.to_string(), "metrics": bound.metrics.to_string(), "pki": bound.pki.map(|a| a.to_string())});
                if let Err(e) = signet::fsutil::write_atomic_mode(f, body.to_string().as_bytes(), 0o644) {
                    tracing::error!(error = %e, "cannot write the ready file");
                }
            }
            if let Some(d) = &dev_dir {
                println!("{}", dev::banner(d, bound.api, bound.metrics));
            }
        })
        .await?;
        Ok(())
    })
}

pub fn dev(_cli: &Cli, cmd: &DevCommand) -> Result<()> {
    let DevCommand::Init(a) = cmd;
    let mut opts = dev::Options::new(a.data_dir.clone());
    opts.listen = a.listen;
    opts.metrics_listen = a.metrics_listen;
    opts.manual_issuer = a.manual_issuer;
    opts.module = a.module.clone();
    let created = dev::prepare(&opts)?;
    let config = Config::load(&dev::config_path(&a.data_dir))?;
    ensure_module_environment(&config)?;
    provision(&a.data_dir, &config)?;
    let rt = runtime()?;
    let no_keys = a.no_keys;
    rt.block_on(async move {
        let app = App::start(config).await.context("cannot start")?;
        if !no_keys {
            create_demo_keys(&app).await?;
        }
        app.checkpoint().await?;
        app.shutdown().await;
        Ok::<(), anyhow::Error>(())
    })?;
    let _ = created;
    println!(
        "development setup ready in {}; configuration: {}",
        a.data_dir.display(),
        dev::config_path(&a.data_dir).display()
    );
    Ok(())
}

fn provision(dir: &Path, config: &Config) -> Result<()> {
    if dev::provision(dir, &config.hsm.module).context("cannot create the development token")? {
        eprintln!(
            "created {} token `{}` with {}",
            dev::ModuleKind::of(&config.hsm.module).name(),
            config.hsm.token_label,
            config.hsm.module.display()
        );
    }
    Ok(())
}

/// Give each demo tenant a first key (with the internal CA, also its certificate).
async fn create_demo_keys(app: &App) -> Result<()> {
    let caller = local_caller();
    for t in dev::TENANTS {
        let tenant = t.parse()?;
        if app.tenant_has_keys_or_rotation(&tenant) {
            continue;
        }
        let r = app
            .admin_create_key(
                &caller,
                AdminRequest {
                    tenant: (*t).to_owned(),
                    reason: Some("development setup".into()),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("cannot create the key of tenant {t}"))?;
        eprintln!(
            "created key {t}/v{} ({})",
            r.to_version,
            r.state.step().as_str()
        );
    }
    Ok(())
}
