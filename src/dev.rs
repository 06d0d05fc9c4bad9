//! The embedded development setup: a data directory with its own SoftHSM token, random PINs,
//! a development TLS PKI (software keys: for development only), demo clients and policies,
//! and a configuration file. Created on first use, reused afterwards.
//!
//! Nothing here is for production: production tokens, PINs and TLS material come from the
//! operator (see runbooks/first-deployment.md).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use p256::ecdsa::SigningKey;
use p256::elliptic_curve::Generate;
use p256::pkcs8::EncodePrivateKey;
use secrecy::SecretString;

use crate::fsutil;
use crate::pki::{self, Profile};

pub const DEFAULT_DIR: &str = "signet-dev";
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN_LABEL: &str = "signet-dev";

/// The demo clients: (name, tenants, roles).
pub const CLIENTS: &[(&str, &[&str], &[&str])] = &[
    ("payroll-app", &["payroll"], &["sign"]),
    ("procurement-app", &["procurement"], &["sign"]),
    ("admin", &[], &["admin", "audit"]),
    ("auditor", &[], &["audit"]),
];
pub const TENANTS: &[&str] = &["payroll", "procurement"];
pub const IDENTITY_PREFIX: &str = "spiffe://signet.dev/";

/// Options for `signet dev init`.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub manual_issuer: bool,
    pub module: PathBuf,
}

impl Options {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            listen: "127.0.0.1:8443"
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8443))),
            metrics_listen: "127.0.0.1:9464"
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9464))),
            manual_issuer: false,
            module: PathBuf::from(SOFTHSM_MODULE),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot build the development PKI: {0}")]
    Pki(String),
    #[error(
        "the PKCS#11 module {0} is missing: install SoftHSM (Debian: `sudo apt-get install softhsm2 opensc`) or pass --module with your token's module"
    )]
    NoModule(String),
}

/// The PKCS#11 modules `dev init` knows how to give a token of the directory's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// SoftHSM 2: `SOFTHSM2_CONF` names a configuration whose token directory is `tokens/`.
    SoftHsm,
    /// kryoptic: `KRYOPTIC_CONF` names the SQLite database `tokens/kryoptic.sql`.
    Kryoptic,
    /// Any other module: it keeps its tokens where its own configuration says (set its
    /// variables in `[hsm.environment]`); `dev init` creates the token in its first free slot.
    Other,
}

impl ModuleKind {
    /// By the module's file name.
    pub fn of(module: &Path) -> Self {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if name.contains("softhsm") {
            ModuleKind::SoftHsm
        } else if name.contains("kryoptic") {
            ModuleKind::Kryoptic
        } else {
            ModuleKind::Other
        }
    }

    /// How messages name the module.
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::SoftHsm => "SoftHSM",
            ModuleKind::Kryoptic => "kryoptic",
            ModuleKind::Other => "PKCS#11",
        }
    }

    /// The `[hsm.environment]` table of the development configuration.
    fn environment(self) -> &'static str {
        match self {
            ModuleKind::SoftHsm => "[hsm.environment]\nSOFTHSM2_CONF = \"./softhsm2.conf\"\n",
            ModuleKind::Kryoptic => {
                "[hsm.environment]\nKRYOPTIC_CONF = \"./tokens/kryoptic.sql\"\n"
            }
            ModuleKind::Other => {
                "# The module's own variables (its configuration file, ...), if it needs any:\n\
                 [hsm.environment]\n"
            }
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The configuration file of a development directory.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("signet.toml")
}

/// Create the directory's files if the configuration does not exist yet. Returns true if it
/// created them. The token itself is created by [`provision`] (in a process with the
/// module's environment).
pub fn prepare(opts: &Options) -> Result<bool, Error> {
    if config_path(&opts.dir).exists() {
        return Ok(false);
    }
    if !opts.module.exists() {
        return Err(Error::NoModule(opts.module.display().to_string()));
    }
    let dir = &opts.dir;
    for sub in [
        "",
        "tokens",
        "secrets",
        "tls",
        "tls/clients",
        "audit",
        "state",
    ] {
        let d = dir.join(sub);
        fsutil::create_private_dir(&d).map_err(io(&d))?;
    }
    if ModuleKind::of(&opts.module) == ModuleKind::SoftHsm {
        let abs = std::fs::canonicalize(dir).map_err(io(dir))?;
        let softhsm_conf = format!(
            "# SoftHSM configuration of this development directory only.\ndirectories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            abs.join("tokens").display()
        );
        write(&dir.join("softhsm2.conf"), softhsm_conf.as_bytes(), 0o600)?;
    }
    write(
        &dir.join("secrets/user.pin"),
        random_pin().as_bytes(),
        0o600,
    )?;
    write(&dir.join("secrets/so.pin"), random_pin().as_bytes(), 0o600)?;
    dev_pki(dir)?;
    write(&config_path(dir), config_text(opts).as_bytes(), 0o600)?;
    Ok(true)
}

/// Create the token of a prepared directory, if it does not exist. Must run in a process with
/// the configuration's `[hsm.environment]` (SoftHSM's `SOFTHSM2_CONF`, kryoptic's
/// `KRYOPTIC_CONF`).
pub fn provision(dir: &Path, module: &Path) -> Result<bool, crate::hsm::Error> {
    let read = |name: &str| -> Result<SecretString, crate::hsm::Error> {
        crate::hsm::read_pin(&crate::config::PinSource::File(
            dir.join("secrets").join(name),
        ))
    };
    crate::hsm::provision_token(module, TOKEN_LABEL, &read("so.pin")?, &read("user.pin")?)
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    fsutil::write_atomic_mode(path, bytes, mode).map_err(io(path))
}

fn random_pin() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A software signer for the development TLS PKI (never for tenant keys).
struct DevSigner(SigningKey);

impl signature::Keypair for DevSigner {
    type VerifyingKey = p256::ecdsa::VerifyingKey;
    fn verifying_key(&self) -> Self::VerifyingKey {
        *self.0.verifying_key()
    }
}

impl signature::Signer<p256::ecdsa::DerSignature> for DevSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<p256::ecdsa::DerSignature, signature::Error> {
        let s: p256::ecdsa::Signature = self.0.try_sign(msg)?;
        Ok(s.to_der())
    }
}

impl spki::DynSignatureAlgorithmIdentifier for DevSigner {
    fn signature_algorithm_identifier(&self) -> spki::Result<spki::AlgorithmIdentifierOwned> {
        Ok(spki::AlgorithmIdentifierOwned {
            oid: crate::hsm::ECDSA_WITH_SHA256,
            parameters: None,
        })
    }
}

fn dev_pki(dir: &Path) -> Result<(), Error> {
    let e = |x: pki::Error| Error::Pki(x.to_string());
    let now = SystemTime::now() - Duration::from_secs(300);
    let year = Duration::from_secs(365 * 86400);
    let ca_key = DevSigner(SigningKey::generate());
    let ca_name = pki::name("Signet development TLS CA", "Signet development").map_err(e)?;
    let ca = pki::issue(
        Profile::Ca {
            subject: ca_name.clone(),
        },
        &ca_key.0.verifying_key().clone(),
        now,
        5 * year,
        &ca_key,
    )
    .map_err(e)?;
    write(
        &dir.join("tls/ca.pem"),
        pki::der_to_pem(&ca, "CERTIFICATE").as_bytes(),
        0o644,
    )?;
    write_key(&dir.join("tls/ca.key"), &ca_key.0)?;

    let server_key = SigningKey::generate();
    let server = pki::issue(
        Profile::TlsServer {
            subject: pki::name("localhost", "Signet development").map_err(e)?,
            issuer: ca_name.clone(),
            dns: vec!["localhost".into()],
            ips: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ],
        },
        server_key.verifying_key(),
        now,
        year,
        &ca_key,
    )
    .map_err(e)?;
    write(
        &dir.join("tls/server.pem"),
        pki::der_to_pem(&server, "CERTIFICATE").as_bytes(),
        0o644,
    )?;
    write_key(&dir.join("tls/server.key"), &server_key)?;

    for (name, _, _) in CLIENTS {
        issue_client(dir, &ca_key, &ca_name, name, year)?;
    }
    Ok(())
}

/// Issue a development client certificate `tls/clients/NAME.{pem,key}` with the URI SAN
/// `spiffe://signet.dev/NAME`, signed by the development TLS CA of `dir`.
pub fn issue_client_from_dir(dir: &Path, name: &str) -> Result<(), Error> {
    issue_client_with_validity(dir, name, Duration::from_secs(365 * 86400))
}

/// [`issue_client_from_dir`] with a chosen validity, counted from five minutes ago (so
/// `validity` of 303 s gives a certificate that expires 3 s from now).
pub fn issue_client_with_validity(dir: &Path, name: &str, validity: Duration) -> Result<(), Error> {
    let key_pem =
        std::fs::read_to_string(dir.join("tls/ca.key")).map_err(io(&dir.join("tls/ca.key")))?;
    let ca_key = <SigningKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&key_pem)
        .map_err(|e| Error::Pki(e.to_string()))?;
    let ca_name = pki::name("Signet development TLS CA", "Signet development")
        .map_err(|x| Error::Pki(x.to_string()))?;
    issue_client(dir, &DevSigner(ca_key), &ca_name, name, validity)
}

fn issue_client(
    dir: &Path,
    ca_key: &DevSigner,
    ca_name: &x509_cert::name::Name,
    name: &str,
    validity: Duration,
) -> Result<(), Error> {
    let key = SigningKey::generate();
    let der = pki::issue(
        Profile::TlsClient {
            subject: pki::name(name, "Signet development")
                .map_err(|x| Error::Pki(x.to_string()))?,
            issuer: ca_name.clone(),
            uri: Some(format!("{IDENTITY_PREFIX}{name}")),
        },
        key.verifying_key(),
        SystemTime::now() - Duration::from_secs(300),
        validity,
        ca_key,
    )
    .map_err(|x| Error::Pki(x.to_string()))?;
    write(
        &dir.join(format!("tls/clients/{name}.pem")),
        pki::der_to_pem(&der, "CERTIFICATE").as_bytes(),
        0o644,
    )?;
    write_key(&dir.join(format!("tls/clients/{name}.key")), &key)
}

fn write_key(path: &Path, key: &SigningKey) -> Result<(), Error> {
    let pem = key
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .map_err(|e| Error::Pki(e.to_string()))?;
    write(path, pem.as_bytes(), 0o600)
}

fn config_text(opts: &Options) -> String {
    let mut clients = String::new();
    for (name, tenants, roles) in CLIENTS {
        let list = |xs: &[&str]| {
            xs.iter()
                .map(|x| format!("\"{x}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        clients.push_str(&format!(
            "\n[[clients]]\nidentity = \"{IDENTITY_PREFIX}{name}\"\ntenants = [{}]\nroles = [{}]\n",
            list(tenants),
            list(roles)
        ));
    }
    let issuer = if opts.manual_issuer {
        "manual"
    } else {
        "hsm-ca"
    };
    format!(
        r#"# Signet development configuration, created by `signet dev init`.
# Relative paths are relative to this file. Every key is documented in deploy/signet.example.toml.

[server]
listen = "{listen}"
cert = "tls/server.pem"
key = "tls/server.key"
client_ca = ["tls/ca.pem"]
metrics_listen = "{metrics}"

[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "secrets/user.pin"
sessions = 2

{environment}
[audit]
dir = "audit"
origin = "signet.dev/evidence"
checkpoint_interval = "5s"

[state]
dir = "state"

[rotation]
issuer = "{issuer}"
validity = "90d"
renew_before = "30d"
grace = "7d"
min_remaining_validity = "1d"
check_interval = "1h"
ca_certificate = "hsm-ca.pem"
{clients}
[[policies]]
id = "payroll-esign"
tenant = "payroll"
legal_standard = "ESIGN/UETA simple electronic signature"

[[policies]]
id = "payroll-bulk"
tenant = "payroll"
legal_standard = "ESIGN/UETA simple electronic signature"
require_idempotency_key = true

[[policies]]
id = "procurement-esign"
tenant = "procurement"
legal_standard = "eIDAS simple electronic signature"

[cli]
url = "https://localhost:{port}"
cert = "tls/clients/admin.pem"
key = "tls/clients/admin.key"
ca = "tls/ca.pem"
"#,
        listen = opts.listen,
        metrics = opts.metrics_listen,
        module = opts.module.display(),
        environment = ModuleKind::of(&opts.module).environment(),
        label = TOKEN_LABEL,
        port = opts.listen.port(),
    )
}

/// How to call the running development service.
pub fn banner(dir: &Path, api: SocketAddr, metrics: SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"
Signet is running (development setup in {d}).

Sign a digest as the payroll application:

  curl --cacert {d}/tls/ca.pem \
       --cert {d}/tls/clients/payroll-app.pem --key {d}/tls/clients/payroll-app.key \
       -H 'content-type: application/json' \
       -d "{{\"policy_id\":\"payroll-esign\",\"digest_algorithm\":\"sha256\",\"digest\":\"$(printf 'hello' | sha256sum | cut -d' ' -f1)\"}}" \
       https://localhost:{port}/v1/sign

Metrics and health: http://{metrics}/metrics  http://{metrics}/readyz
Admin CLI:          signet --config {d}/signet.toml keys list
Stop with Ctrl-C (a final checkpoint is signed).
"#,
        port = api.port(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_kind_comes_from_the_file_name_and_sets_the_environment() {
        let kind = |p: &str| ModuleKind::of(Path::new(p));
        assert_eq!(kind("/usr/lib/softhsm/libsofthsm2.so"), ModuleKind::SoftHsm);
        assert_eq!(
            kind("target/kryoptic/libkryoptic_pkcs11.so"),
            ModuleKind::Kryoptic
        );
        assert_eq!(
            kind("/usr/lib/x86_64-linux-gnu/libtpm2_pkcs11.so"),
            ModuleKind::Other
        );
        let mut opts = Options::new(PathBuf::from("/tmp/x"));
        let config = |o: &Options| config_text(o);
        assert!(config(&opts).contains("SOFTHSM2_CONF = \"./softhsm2.conf\""));
        opts.module = PathBuf::from("/opt/kryoptic/libkryoptic_pkcs11.so");
        assert!(config(&opts).contains("KRYOPTIC_CONF = \"./tokens/kryoptic.sql\""));
        opts.module = PathBuf::from("/opt/hsm/libvendor.so");
        let text = config(&opts);
        assert!(!text.contains("SOFTHSM2_CONF") && !text.contains("KRYOPTIC_CONF"));
        // Still a valid configuration with an empty [hsm.environment].
        assert!(text.contains("[hsm.environment]\n"));
    }
}
