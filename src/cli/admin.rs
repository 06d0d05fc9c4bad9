//! `signet keys`, `signet certs`, `signet rotate`: through the running service's admin API
//! when it holds the evidence log, else in-process on the token.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use signet::client::{ClientTls, Connection};
use signet::config::Config;
use signet::service::{AdminRequest, ImportRequest, RevocationRequest};

use super::{
    Cli, ensure_module_environment, load_config, local_caller, runtime, start_offline, table,
};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a tenant's first key in the token (and its certificate with the internal CA).
    Create {
        #[arg(long)]
        tenant: String,
        /// Why (recorded as evidence).
        #[arg(long, default_value = "tenant onboarding")]
        reason: String,
    },
    /// List key versions with state and certificate validity.
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key version for good: it never signs again, its certificate goes on the
    /// internal CA's CRL and OCSP answers `revoked`, and a `key_revoked` entry records it.
    Revoke {
        /// TENANT/vN
        #[arg(long)]
        key_id: String,
        /// key-compromise, superseded, cessation-of-operation or affiliation-changed.
        #[arg(long)]
        reason: String,
        /// RFC 3339 time the key is known or suspected to have been compromised since
        /// (the CRL's invalidity date; verifiers refuse signatures made after it).
        #[arg(long)]
        compromised_at: Option<String>,
        /// Start an emergency rotation to a new version at once (recommended when revoking
        /// the active version: without it the tenant cannot sign until a rotation completes).
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Write the PEM CSR of the tenant's pending rotation (starting one with the manual issuer).
    Csr {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        reason: Option<String>,
        /// Write the CSR here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Import the certificate issued for the pending CSR; refused with the reason if it does not fit.
    Import {
        #[arg(long)]
        tenant: String,
        /// PEM certificate file.
        file: PathBuf,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Expiry table of every key version.
    Status,
}

#[derive(Subcommand)]
pub enum RotateCommand {
    /// Rotate a tenant's key now: new key, certificate, activation; the old one retires after grace.
    Start {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        reason: String,
        /// Suspected compromise: no grace period; the previous private key is destroyed as soon
        /// as the new version is active.
        #[arg(long)]
        emergency: bool,
    },
    /// Versions, states, notAfter and the workflow step of each tenant.
    Status {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// During grace, make the previous version active again (or abort a rotation in progress).
    Rollback {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        reason: String,
    },
}

/// One admin operation, run online or offline.
pub(super) enum Op {
    /// A transaction's evidence bundle (optionally one tenant's part).
    Bundle {
        transaction: String,
        tenant: Option<String>,
    },
    CreateKey(AdminRequest),
    ListKeys,
    Status,
    Rotate(AdminRequest),
    Rollback(AdminRequest),
    Revoke(RevocationRequest),
    Csr(AdminRequest),
    Import(ImportRequest),
    Erase(signet::service::ErasureRequest),
    Sweep,
    HoldAdd(signet::service::HoldRequest),
    HoldList,
    HoldRelease(String, signet::service::ReleaseRequest),
    VaultRotate(signet::service::VaultRotationRequest),
}

pub fn keys(cli: &Cli, cmd: &KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Create { tenant, reason } => {
            let v = exec(
                cli,
                Op::CreateKey(AdminRequest {
                    tenant: tenant.clone(),
                    reason: Some(reason.clone()),
                    ..Default::default()
                }),
            )?;
            print_rotation(cli, &v, "key creation")
        }
        KeysCommand::Revoke {
            key_id,
            reason,
            compromised_at,
            rotate,
        } => {
            let v = exec(
                cli,
                Op::Revoke(RevocationRequest {
                    key_id: key_id.clone(),
                    reason: reason.clone(),
                    compromised_at: compromised_at.clone(),
                    rotate: *rotate,
                }),
            )?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let r = &v["revocation"];
                println!(
                    "revoked: {} (was {}), reason {}, at {}, certificate serial {}, evidence entry {}",
                    s(&v["key_id"]),
                    s(&v["previous_state"]),
                    s(&r["reason"]),
                    s(&r["revoked_at"]),
                    s(&r["certificate_serial"]),
                    s(&r["log_index"])
                );
                if let Some(t) = r["compromised_at"].as_str() {
                    println!("compromised since: {t}");
                }
                if v["rotation"].is_object() {
                    print_rotation(cli, &v["rotation"], "rotation")?;
                }
                if let Some(e) = v["rotation_error"].as_str() {
                    println!("{e}");
                }
                if v["tenant_can_sign"] == false {
                    println!(
                        "the tenant has no active version and cannot sign: start a rotation with `signet rotate start --tenant {} --reason ...`",
                        key_id.split('/').next().unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        KeysCommand::List { tenant } => {
            let v = exec(cli, Op::ListKeys)?;
            let keys: Vec<&Value> = v["keys"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|k| {
                            tenant.as_ref().is_none_or(|t| {
                                k["key_id"]
                                    .as_str()
                                    .unwrap_or("")
                                    .starts_with(&format!("{t}/"))
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| {
                    vec![
                        s(&k["key_id"]),
                        s(&k["state"]),
                        s(&k["not_before"]),
                        s(&k["not_after"]),
                        s(&k["certificate_serial"]),
                    ]
                })
                .collect();
            table(
                &["KEY ID", "STATE", "NOT BEFORE", "NOT AFTER", "SERIAL"],
                &rows,
            );
            Ok(())
        }
    }
}

pub fn certs(cli: &Cli, cmd: &CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Csr {
            tenant,
            reason,
            out,
        } => {
            let v = exec(
                cli,
                Op::Csr(AdminRequest {
                    tenant: tenant.clone(),
                    reason: reason.clone(),
                    ..Default::default()
                }),
            )?;
            let csr = v["csr"]
                .as_str()
                .ok_or_else(|| anyhow!("no CSR in the answer"))?;
            match out {
                Some(p) => {
                    std::fs::write(p, csr)
                        .with_context(|| format!("cannot write {}", p.display()))?;
                    if cli.json {
                        println!("{}", serde_json::json!({"csr_file": p}));
                    } else {
                        eprintln!("CSR written to {}", p.display());
                    }
                }
                None if cli.json => println!("{v}"),
                None => print!("{csr}"),
            }
            Ok(())
        }
        CertsCommand::Import {
            tenant,
            file,
            reason,
        } => {
            let pem = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let v = exec(
                cli,
                Op::Import(ImportRequest {
                    tenant: tenant.clone(),
                    certificate: pem,
                    reason: reason.clone(),
                }),
            )?;
            print_rotation(cli, &v, "certificate import")
        }
        CertsCommand::Status => {
            let v = exec(cli, Op::Status)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v["tenants"])?);
                return Ok(());
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut rows = Vec::new();
            for t in v["tenants"].as_array().into_iter().flatten() {
                for ver in t["versions"].as_array().into_iter().flatten() {
                    let left = ver["not_after_unix"].as_u64().map(|na| {
                        let d = na as i64 - now as i64;
                        if d < 0 {
                            "EXPIRED".to_owned()
                        } else {
                            format!("{}d {}h", d / 86400, (d % 86400) / 3600)
                        }
                    });
                    rows.push(vec![
                        s(&ver["key_id"]),
                        s(&ver["state"]),
                        s(&ver["not_after"]),
                        left.unwrap_or_else(|| "-".into()),
                        if ver["renewal_due"].as_bool() == Some(true) {
                            "yes".into()
                        } else {
                            "no".into()
                        },
                    ]);
                }
            }
            table(
                &["KEY ID", "STATE", "NOT AFTER", "REMAINING", "RENEWAL DUE"],
                &rows,
            );
            Ok(())
        }
    }
}

pub fn rotate(cli: &Cli, cmd: &RotateCommand) -> Result<()> {
    match cmd {
        RotateCommand::Start {
            tenant,
            reason,
            emergency,
        } => {
            let v = exec(
                cli,
                Op::Rotate(AdminRequest {
                    tenant: tenant.clone(),
                    reason: Some(reason.clone()),
                    emergency: *emergency,
                }),
            )?;
            print_rotation(cli, &v, "rotation")
        }
        RotateCommand::Rollback { tenant, reason } => {
            let v = exec(
                cli,
                Op::Rollback(AdminRequest {
                    tenant: tenant.clone(),
                    reason: Some(reason.clone()),
                    ..Default::default()
                }),
            )?;
            print_rotation(cli, &v, "rollback")
        }
        RotateCommand::Status { tenant } => {
            let v = exec(cli, Op::Status)?;
            let tenants: Vec<&Value> = v["tenants"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|t| {
                            tenant
                                .as_ref()
                                .is_none_or(|x| t["tenant"].as_str() == Some(x.as_str()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&tenants)?);
                return Ok(());
            }
            let mut rows = Vec::new();
            for t in &tenants {
                let step = match &t["rotation"] {
                    Value::Null => "-".to_owned(),
                    r => {
                        let mut s =
                            format!("v{} {}", r["to_version"], r["step"].as_str().unwrap_or(""));
                        if let Some(e) = r["last_error"].as_str() {
                            s.push_str(&format!(" (attempt {}: {e})", r["attempts"]));
                        }
                        s
                    }
                };
                for ver in t["versions"].as_array().into_iter().flatten() {
                    rows.push(vec![
                        s(&t["tenant"]),
                        s(&ver["key_id"]),
                        s(&ver["state"]),
                        s(&ver["not_after"]),
                        s(&t["rotation_state"]),
                        step.clone(),
                    ]);
                }
                if t["versions"].as_array().is_none_or(|a| a.is_empty()) {
                    rows.push(vec![
                        s(&t["tenant"]),
                        "-".into(),
                        "no key".into(),
                        "-".into(),
                        s(&t["rotation_state"]),
                        step.clone(),
                    ]);
                }
            }
            table(
                &["TENANT", "KEY ID", "STATE", "NOT AFTER", "ROTATION", "STEP"],
                &rows,
            );
            Ok(())
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_rotation(cli: &Cli, v: &Value, what: &str) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        let key = format!("{}/v{}", s(&v["tenant"]), s(&v["to_version"]));
        println!("{what}: {key} step {}", s(&v["step"]));
        if let Some(e) = v["last_error"].as_str() {
            println!(
                "last attempt failed (attempt {}): {e}; it is retried with backoff",
                v["attempts"]
            );
        }
        if v["step"] == "awaiting_certificate" {
            println!(
                "next: get the CSR with `signet certs csr --tenant {}`, have it signed, then `signet certs import --tenant {} CERT.pem`",
                s(&v["tenant"]),
                s(&v["tenant"])
            );
        }
    }
    if v["last_error"].is_string() && v["step"] != "awaiting_certificate" {
        bail!("the {what} did not complete yet");
    }
    Ok(())
}

/// Run an admin operation where the evidence log's writer is.
pub(super) fn exec(cli: &Cli, op: Op) -> Result<Value> {
    let config = load_config(cli)?;
    // With PostgreSQL every replica is a writer: use a running one's API when the CLI has a
    // client certificate, otherwise act in-process as one more replica.
    let service_running = signet::storage::transfer::held_by_a_running_service(&config)
        || (config.storage.is_shared() && config.cli.is_some());
    if service_running {
        online(&config, op)
    } else {
        ensure_module_environment(&config)?;
        offline(config, op)
    }
}

fn online(config: &Config, op: Op) -> Result<Value> {
    let cli_cfg = config.cli.as_ref().ok_or_else(|| {
        anyhow!("the service is running and holds the evidence log; add a [cli] section (url, cert, key, ca) with an admin client certificate to use its admin API")
    })?;
    let tls = ClientTls::new(&cli_cfg.ca, Some(&cli_cfg.cert), Some(&cli_cfg.key))?;
    let rt = runtime()?;
    rt.block_on(async move {
        let mut conn = Connection::connect_url(&tls, &cli_cfg.url).await?;
        let bundle_path;
        let release_path;
        let (method, path, body) = match &op {
            Op::Erase(r) => (Method::POST, "/v1/admin/erasures", Some(serde_json::to_value(r)?)),
            Op::Sweep => (Method::POST, "/v1/admin/evidence/sweep", None),
            Op::HoldAdd(r) => (Method::POST, "/v1/admin/holds", Some(serde_json::to_value(r)?)),
            Op::HoldList => (Method::GET, "/v1/admin/holds", None),
            Op::HoldRelease(id, r) => {
                release_path = format!("/v1/admin/holds/{}/release", percent_encode(id));
                (Method::POST, release_path.as_str(), Some(serde_json::to_value(r)?))
            }
            Op::VaultRotate(r) => (Method::POST, "/v1/admin/vault/rotations", Some(serde_json::to_value(r)?)),
            Op::Bundle { transaction, tenant } => {
                bundle_path = format!(
                    "/v1/audit/transactions/{}/bundle{}",
                    percent_encode(transaction),
                    tenant
                        .as_deref()
                        .map(|t| format!("?tenant={}", percent_encode(t)))
                        .unwrap_or_default()
                );
                (Method::GET, bundle_path.as_str(), None)
            }
            Op::CreateKey(r) => (Method::POST, "/v1/admin/keys", Some(admin_body(r))),
            Op::ListKeys => (Method::GET, "/v1/admin/keys", None),
            Op::Status => (Method::GET, "/v1/admin/rotations", None),
            Op::Rotate(r) => (Method::POST, "/v1/admin/rotations", Some(admin_body(r))),
            Op::Rollback(r) => (Method::POST, "/v1/admin/rollback", Some(admin_body(r))),
            Op::Revoke(r) => (Method::POST, "/v1/admin/revocations", Some(serde_json::to_value(r)?)),
            Op::Csr(r) => (Method::POST, "/v1/admin/csr", Some(admin_body(r))),
            Op::Import(r) => (Method::POST, "/v1/admin/certificates", Some(serde_json::json!({"tenant": r.tenant, "certificate": r.certificate, "reason": r.reason}))),
        };
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, _, bytes) = conn.request(method, path, &[], body).await?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{} ({}): {}", v["title"].as_str().unwrap_or("request failed"), status.as_u16(), v["detail"].as_str().unwrap_or(""));
        }
        Ok(v)
    })
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn admin_body(r: &AdminRequest) -> Value {
    serde_json::json!({"tenant": r.tenant, "reason": r.reason, "emergency": r.emergency})
}

fn offline(config: Config, op: Op) -> Result<Value> {
    let rt = runtime()?;
    rt.block_on(async move {
        let app = start_offline(config).await?;
        let caller = local_caller();
        let result: Result<Value> = async {
            Ok(match op {
                Op::Bundle {
                    transaction,
                    tenant,
                } => serde_json::to_value(
                    app.transaction_bundle(&caller, &transaction, tenant.as_deref())
                        .await?,
                )?,
                Op::CreateKey(r) => serde_json::to_value(app.admin_create_key(&caller, r).await?)?,
                Op::ListKeys => serde_json::json!({"keys": app.all_keys(&caller)?}),
                Op::Status => serde_json::json!({"tenants": app.status(&caller)?}),
                Op::Rotate(r) => serde_json::to_value(app.admin_rotate(&caller, r).await?)?,
                Op::Rollback(r) => serde_json::to_value(app.admin_rollback(&caller, r).await?)?,
                Op::Revoke(r) => serde_json::to_value(app.admin_revoke(&caller, r).await?)?,
                Op::Csr(r) => serde_json::json!({"csr": app.admin_csr(&caller, r).await?}),
                Op::Import(r) => serde_json::to_value(app.admin_import(&caller, r).await?)?,
                Op::Erase(r) => serde_json::to_value(app.admin_erase(&caller, r).await?)?,
                Op::Sweep => serde_json::to_value(app.admin_sweep(&caller).await?)?,
                Op::HoldAdd(r) => serde_json::to_value(app.admin_hold(&caller, r).await?)?,
                Op::HoldList => serde_json::json!({"holds": app.holds(&caller).await?}),
                Op::HoldRelease(id, r) => {
                    serde_json::to_value(app.admin_release_hold(&caller, &id, r).await?)?
                }
                Op::VaultRotate(r) => {
                    serde_json::to_value(app.admin_rotate_vault_key(&caller, r).await?)?
                }
            })
        }
        .await;
        app.shutdown().await;
        result
    })
}
