//! Configuration: TOML in, checked types out.
//!
//! Owns parsing, defaults, path resolution (relative paths are relative to the config file)
//! and validation. Every error names the key at fault. It never opens the token, the network
//! or the evidence log; other modules read the checked types.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::{DigestAlgorithm, PolicyId, TenantId};

/// A configuration problem, naming the key (`section.key`, or `policies[2].tenant`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration key `{key}`: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Roles a client certificate may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Request signatures for the client's tenants.
    Sign,
    /// Create keys, import certificates, rotate, roll back, reload.
    Admin,
    /// Read-only: keys, evidence log, rotation status.
    Audit,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Sign => "sign",
            Role::Admin => "admin",
            Role::Audit => "audit",
        }
    }
}

/// Who issues tenant certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Issuer {
    /// An internal CA whose key lives in the same token.
    #[serde(rename = "hsm-ca")]
    HsmCa,
    /// CSR out, certificate in (`signet certs csr` / `signet certs import`).
    #[serde(rename = "manual")]
    Manual,
}

/// Evidence log durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Default: an entry is on disk (fdatasync, group commit) before a signature is returned.
    Always,
    /// Insecure: acknowledged entries can be lost on power failure. For throwaway dev setups.
    Never,
}

/// The whole, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from; `None` for configurations built in code.
    pub path: Option<PathBuf>,
    pub server: ServerConfig,
    pub hsm: HsmConfig,
    pub audit: AuditConfig,
    pub state_dir: PathBuf,
    /// Where the evidence log, idempotency records, key states and rotation journal live.
    pub storage: StorageConfig,
    /// The part that SIGHUP reloads.
    pub dynamic: DynamicConfig,
    pub cli: Option<CliConfig>,
    /// Where the internal CA publishes revocation data.
    pub pki: PkiConfig,
    /// The retention sweep and the signer-evidence vault's key schedule.
    pub retention: RetentionConfig,
}

/// `[retention]`: when signer evidence past its retention is erased, and how often the vault's
/// key-encryption key in the token is replaced (which makes erased records unreadable in
/// backups too). Retention periods themselves are per policy (`[[policies]] retention`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    /// How often the sweep looks for records past `retain_until`.
    pub sweep_interval: Duration,
    /// How often the vault's key-encryption key is rotated (the old one destroyed).
    pub key_rotation_interval: Duration,
    /// The `signer` fields that identify a data subject (`signet evidence erase --subject`):
    /// their values are indexed by a keyed hash, never in clear.
    pub subject_fields: Vec<String>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_secs(3600),
            key_rotation_interval: Duration::from_secs(30 * 86400),
            subject_fields: vec!["email".into(), "id".into()],
        }
    }
}

/// `[pki]`: the internal CA's public revocation service (plain HTTP: CRLs and OCSP answers are
/// signed objects, and relying parties fetch them without TLS, RFC 5280 §4.2.1.13).
#[derive(Debug, Clone, Default)]
pub struct PkiConfig {
    /// Address of the plain-HTTP listener serving `/crl`, `/ocsp` and `/ca`; off if unset.
    pub listen: Option<SocketAddr>,
    /// Public URL of that listener as relying parties reach it; written into every certificate
    /// the internal CA issues (CRL distribution point and authority information access).
    pub base_url: Option<String>,
    /// Validity of a CRL (nextUpdate − thisUpdate); it is re-signed at half of it and after
    /// every revocation.
    pub crl_validity: Duration,
    /// Validity of an OCSP answer (nextUpdate − thisUpdate); answers are cached for half of it
    /// and dropped at once when a revocation changes the status.
    pub ocsp_validity: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Vec<PathBuf>,
    pub metrics_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub max_batch_items: usize,
    pub max_connections: usize,
    /// TLS handshakes in progress at once (unauthenticated peers), apart from connections.
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one source network (see `ipv4_prefix`).
    pub max_handshakes_per_ip: usize,
    /// Connections at once from one source network, counted before the client is known.
    pub max_connections_per_ip: usize,
    /// Source addresses are grouped into networks of this prefix length for the per-address
    /// limits (IPv4, and IPv6).
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Connections at once of one client (certificate identity).
    pub max_connections_per_client: usize,
    /// Requests (HTTP/1.1 requests and HTTP/2 streams) in flight at once for one client, over
    /// all its connections.
    pub max_requests_per_client: usize,
    /// Request bodies of one client being read at once, in bytes.
    pub max_buffered_body_bytes_per_client: usize,
    /// Concurrent HTTP/2 streams on one connection.
    pub max_streams_per_connection: u32,
    /// Request bodies being read at once, in bytes, over all connections.
    pub max_buffered_body_bytes: usize,
    /// Connections to the metrics listener at once.
    pub metrics_max_connections: usize,
    pub handshake_timeout: Duration,
    /// Time allowed to send a request's head, and then its whole body.
    pub request_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct HsmConfig {
    pub module: PathBuf,
    pub token_label: String,
    pub pin: PinSource,
    pub sessions: usize,
    pub queue_depth: usize,
    pub call_timeout: Duration,
    pub health_interval: Duration,
    /// Environment variables the PKCS#11 module reads (e.g. `SOFTHSM2_CONF`).
    pub environment: BTreeMap<String, String>,
}

/// Where the token user PIN comes from. The PIN itself is never in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub origin: String,
    pub checkpoint_interval: Duration,
    pub fsync: FsyncPolicy,
    pub idempotency_retention: Duration,
    /// Most idempotency records kept in memory; past it the least recently used go first.
    pub idempotency_max_records: u64,
    pub max_group_entries: usize,
    /// RFC 3161 timestamps of checkpoints, if configured.
    pub timestamping: Option<TimestampingConfig>,
}

/// `[storage]`: the backend of the evidence log and the service state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StorageConfig {
    /// One process; the log in `[audit].dir`, state in `[state].dir` (the default).
    #[default]
    File,
    /// Any number of replicas sharing one PostgreSQL database.
    Postgres(PostgresConfig),
}

impl StorageConfig {
    /// Whether several replicas may share this storage.
    pub fn is_shared(&self) -> bool {
        matches!(self, StorageConfig::Postgres(_))
    }
}

/// `[storage] backend = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Where the libpq URL comes from (it may hold a password: never logged).
    pub url: UrlSource,
    /// CA (PEM) of the database server's certificate: TLS through rustls, verify-full.
    /// Without it, connections are in plaintext (loopback or a Unix socket only).
    pub ca_file: Option<PathBuf>,
    /// Connections per replica.
    pub pool_size: usize,
    /// How long an idempotency claim of a replica lasts before another may take it over.
    pub claim_lease: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlSource {
    /// Inline (passwordless set-ups: peer or certificate authentication).
    Inline(String),
    /// A file holding the URL (a Kubernetes Secret, a credentials file).
    File(PathBuf),
}

/// `[audit.timestamping]`: a TSA that timestamps every signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampingConfig {
    /// `http://host[:port]/path` (RFC 3161 answers are signed: no transport security needed).
    pub tsa_url: String,
    /// The CA (PEM) that issued the TSA's certificate: what auditors verify tokens against.
    pub ca_file: PathBuf,
    /// Its certificates, read when the configuration is checked: every answer must chain to
    /// one of them before it is stored.
    pub anchors: crate::audit::timestamp::TsaAnchors,
    /// The TSA policy to ask for, if any; answers must name it.
    pub policy: Option<der::oid::ObjectIdentifier>,
    /// Deadline of one request.
    pub timeout: Duration,
    /// Longest wait between attempts for a checkpoint the TSA did not stamp (failures back off
    /// from 1 s, doubling, up to this).
    pub retry_max_interval: Duration,
}

/// Clients, policies, limits and rotation settings: reloaded on SIGHUP.
#[derive(Debug, Clone)]
pub struct DynamicConfig {
    pub clients: Vec<ClientConfig>,
    pub policies: Vec<PolicyConfig>,
    pub limits: LimitsConfig,
    pub rotation: RotationConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientConfig {
    pub identity: String,
    pub tenants: BTreeSet<TenantId>,
    pub roles: BTreeSet<Role>,
    /// Only certificates issued under this CA (PEM) may act as this client.
    pub ca: Option<PathBuf>,
    /// This client's signing rate, over all its tenants and policies (overrides
    /// `limits.per_client`).
    pub rate_limit: Option<RateLimit>,
}

/// `[limits]`: signing rates per client and per tenant, on top of each policy's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Every client's rate unless its `[[clients]]` entry sets `rate_limit`.
    pub per_client: Option<RateLimit>,
    /// Every tenant's rate (over all its policies and clients) unless `tenants` names it.
    pub per_tenant: Option<RateLimit>,
    /// Per-tenant overrides.
    pub tenants: BTreeMap<TenantId, RateLimit>,
    /// Each tenant's share of the token when it is contended (weighted fair queuing); 1 unless
    /// `tenants.NAME.weight` says otherwise.
    pub weights: BTreeMap<TenantId, u32>,
    /// Signing requests of one tenant waiting for the token at once; beyond, 429 at once.
    pub max_queued_per_tenant: usize,
    /// The same for one client (within its tenant's queue).
    pub max_queued_per_client: usize,
}

impl LimitsConfig {
    /// Default of `limits.max_queued_per_tenant`.
    pub const DEFAULT_MAX_QUEUED_PER_TENANT: usize = 256;
    /// Default of `limits.max_queued_per_client`.
    pub const DEFAULT_MAX_QUEUED_PER_CLIENT: usize = 128;

    pub fn tenant(&self, tenant: &TenantId) -> Option<RateLimit> {
        self.tenants.get(tenant).copied().or(self.per_tenant)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_client: None,
            per_tenant: None,
            tenants: BTreeMap::new(),
            weights: BTreeMap::new(),
            max_queued_per_tenant: Self::DEFAULT_MAX_QUEUED_PER_TENANT,
            max_queued_per_client: Self::DEFAULT_MAX_QUEUED_PER_CLIENT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    pub id: PolicyId,
    pub tenant: TenantId,
    pub digest_algorithms: Vec<DigestAlgorithm>,
    pub legal_standard: String,
    pub require_idempotency_key: bool,
    pub rate_limit: Option<RateLimit>,
    /// How long the signer evidence of signatures under this policy is kept; `None`: without
    /// limit (until a subject erasure with `--override-retention`).
    pub retention: Option<Duration>,
    /// A label for the retention rule (recorded in every entry), e.g. `contracts-7y`.
    pub retention_class: String,
}

impl PolicyConfig {
    /// The class recorded when a policy names none.
    pub const DEFAULT_RETENTION_CLASS: &str = "default";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained signatures per second for this tenant under this policy.
    pub per_second: u32,
    /// Short bursts above the sustained rate; defaults to `per_second`.
    pub burst: Option<u32>,
}

impl RateLimit {
    /// The bucket's size: `burst`, else `per_second` (at least 1).
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.per_second).max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationConfig {
    pub validity: Duration,
    pub renew_before: Duration,
    pub grace: Duration,
    pub issuer: Issuer,
    pub check_interval: Duration,
    pub min_remaining_validity: Duration,
    pub overdue_after: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// CA certificate that tenant certificates must chain to. For `hsm-ca` Signet writes
    /// its internal CA certificate here at start.
    pub ca_certificate: PathBuf,
    pub subject_organization: String,
    /// An extended key usage (dotted OID) every tenant certificate must carry, if set.
    pub required_extended_key_usage: Option<String>,
}

/// How the CLI reaches a running service's admin API.
#[derive(Debug, Clone)]
pub struct CliConfig {
    pub url: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Config {
    /// Read and check a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("(file)", format!("cannot read {}: {e}", path.display()))
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = Self::parse(&text, &base)?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parse TOML text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: raw::File = toml::from_str(text).map_err(|e| toml_error(&e, text))?;
        raw.check(base)
    }

    /// Re-read the reloadable part of the file this configuration came from.
    pub fn reload_dynamic(&self) -> Result<Config, ConfigError> {
        let path = self.path.as_ref().ok_or_else(|| {
            ConfigError::new("(file)", "this configuration was not loaded from a file")
        })?;
        Self::load(path)
    }
}

impl DynamicConfig {
    pub fn policy(&self, id: &PolicyId) -> Option<&PolicyConfig> {
        self.policies.iter().find(|p| &p.id == id)
    }

    /// Every tenant named by a policy or a client.
    pub fn tenants(&self) -> BTreeSet<TenantId> {
        let mut out: BTreeSet<TenantId> = self.policies.iter().map(|p| p.tenant.clone()).collect();
        for c in &self.clients {
            out.extend(c.tenants.iter().cloned());
        }
        out
    }
}

impl PolicyConfig {
    /// SHA-256 over the canonical JSON of the policy as configured: recorded in every entry so
    /// an auditor can tell which version of a policy a signature was made under.
    pub fn hash_hex(&self) -> String {
        let value = serde_json::json!({
            "id": self.id.as_str(),
            "tenant": self.tenant.as_str(),
            "digest_algorithms": self.digest_algorithms.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
            "legal_standard": self.legal_standard,
            "require_idempotency_key": self.require_idempotency_key,
            "rate_limit": self.rate_limit.map(|r| serde_json::json!({
                "per_second": r.per_second, "burst": r.burst.unwrap_or(r.per_second)
            })),
        });
        // Retention joins the hash only when configured, so a policy without it keeps the
        // hash it had before retention existed.
        let mut value = value;
        if let Some(r) = self.retention {
            value["retention_seconds"] = r.as_secs().into();
        }
        if self.retention_class != Self::DEFAULT_RETENTION_CLASS {
            value["retention_class"] = self.retention_class.clone().into();
        }
        // Serialising a json! value of strings, bools and integers cannot fail.
        let bytes = serde_json_canonicalizer::to_vec(&value).unwrap_or_default();
        hex::encode(crate::sha256::sha256(bytes))
    }
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::Env(v) => write!(f, "environment variable {v}"),
            PinSource::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

fn toml_error(e: &toml::de::Error, text: &str) -> ConfigError {
    // Name the key from where the error points: "section.key" on that line (unknown or
    // invalid values), else the field toml names ("missing field `listen`").
    let msg = e.message().trim().to_owned();
    let located = e.span().and_then(|span| {
        if span.start == 0 && span.end >= text.trim_end().len() {
            return None; // the whole document: a top-level problem
        }
        let before = text.get(..span.start)?;
        let line_no = before.matches('\n').count() + 1;
        let line = text.lines().nth(line_no - 1)?.trim();
        let key = line.split('=').next()?.trim().trim_matches('"');
        let section = before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
        let key = if line.starts_with('[') || key.is_empty() {
            line.trim_matches(|c| c == '[' || c == ']').to_owned()
        } else {
            match section {
                Some(sec) if !line.starts_with('[') => format!("{sec}.{key}"),
                _ => key.to_owned(),
            }
        };
        Some((key, line_no))
    });
    let field = extract_backticked(&msg);
    match (located, field) {
        // A missing section is named alone; a missing field with its table: "server.listen".
        (_, Some(field))
            if msg.starts_with("missing field")
                && ["server", "hsm", "audit"].contains(&field.as_str()) =>
        {
            ConfigError::new(
                field,
                format!(
                    "the [{}] section is required",
                    msg.trim_start_matches("missing field ").trim_matches('`')
                ),
            )
        }
        (Some((table, _)), Some(field))
            if msg.starts_with("missing field") && !table.is_empty() =>
        {
            ConfigError::new(format!("{table}.{field}"), msg)
        }
        (Some((key, line)), _) => ConfigError::new(key, format!("{msg} (line {line})")),
        (None, field) => ConfigError::new(field.unwrap_or_else(|| "(syntax)".to_owned()), msg),
    }
}

fn extract_backticked(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let end = start + msg[start..].find('`')?;
    Some(msg[start..end].to_owned())
}

/// Parse "90d", "12h", "30s" (humantime syntax).
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| {
        ConfigError::new(
            key,
            format!("`{s}` is not a duration like \"30s\", \"12h\" or \"90d\": {e}"),
        )
    })
}

mod raw {
    //! The file as written; `check` turns it into `Config`.
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        server: Server,
        hsm: Hsm,
        audit: Audit,
        #[serde(default)]
        state: State,
        #[serde(default)]
        storage: Storage,
        #[serde(default)]
        clients: Vec<Client>,
        #[serde(default)]
        policies: Vec<Policy>,
        #[serde(default)]
        limits: Limits,
        #[serde(default)]
        rotation: Rotation,
        cli: Option<Cli>,
        #[serde(default)]
        pki: Pki,
        #[serde(default)]
        retention: Retention,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Retention {
        sweep_interval: Option<String>,
        key_rotation_interval: Option<String>,
        subject_fields: Option<Vec<String>>,
    }

    fn check_retention(raw: &Retention) -> Result<RetentionConfig, ConfigError> {
        let sweep_interval = dur("retention.sweep_interval", &raw.sweep_interval, "1h")?;
        if sweep_interval < Duration::from_secs(1)
            || sweep_interval > Duration::from_secs(7 * 86400)
        {
            return Err(ConfigError::new(
                "retention.sweep_interval",
                "must be between 1s and 7d",
            ));
        }
        let key_rotation_interval = dur(
            "retention.key_rotation_interval",
            &raw.key_rotation_interval,
            "30d",
        )?;
        if key_rotation_interval < Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "retention.key_rotation_interval",
                "must be at least 1h (`signet evidence rotate-key` rotates at once)",
            ));
        }
        let subject_fields = raw
            .subject_fields
            .clone()
            .unwrap_or_else(|| RetentionConfig::default().subject_fields);
        if subject_fields.is_empty()
            || subject_fields
                .iter()
                .any(|f| f.is_empty() || f.len() > 64 || f.chars().any(char::is_control))
        {
            return Err(ConfigError::new(
                "retention.subject_fields",
                "must list 1 or more `signer` field names (1-64 characters each)",
            ));
        }
        Ok(RetentionConfig {
            sweep_interval,
            key_rotation_interval,
            subject_fields,
        })
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Pki {
        listen: Option<String>,
        base_url: Option<String>,
        crl_validity: Option<String>,
        ocsp_validity: Option<String>,
    }

    fn check_pki(raw: &Pki, server: &ServerConfig) -> Result<PkiConfig, ConfigError> {
        let listen = raw
            .listen
            .as_deref()
            .map(|l| addr("pki.listen", l))
            .transpose()?;
        if let Some(l) = listen
            && l.port() != 0
            && (l == server.listen || l == server.metrics_listen)
        {
            return Err(ConfigError::new(
                "pki.listen",
                "must differ from server.listen and server.metrics_listen",
            ));
        }
        let base_url = match raw.base_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(u) => {
                let rest = u.strip_prefix("http://").ok_or_else(|| {
                    ConfigError::new(
                        "pki.base_url",
                        "must start with http:// (relying parties fetch CRLs and OCSP answers over plain HTTP; they are signed)",
                    )
                })?;
                if rest.is_empty()
                    || u.contains(['?', '#'])
                    || !u.is_ascii()
                    || u.chars()
                        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
                {
                    return Err(ConfigError::new(
                        "pki.base_url",
                        "must be an http:// URL without query, fragment or spaces, e.g. http://pki.example.internal:8090",
                    ));
                }
                Some(u.trim_end_matches('/').to_owned())
            }
        };
        if base_url.is_some() && listen.is_none() {
            return Err(ConfigError::new(
                "pki.listen",
                "is needed with pki.base_url: certificates would point at URLs nothing serves",
            ));
        }
        let crl_validity = dur("pki.crl_validity", &raw.crl_validity, "24h")?;
        let ocsp_validity = dur("pki.ocsp_validity", &raw.ocsp_validity, "4h")?;
        for (key, d) in [
            ("pki.crl_validity", crl_validity),
            ("pki.ocsp_validity", ocsp_validity),
        ] {
            if d < Duration::from_secs(60) || d > Duration::from_secs(31 * 86400) {
                return Err(ConfigError::new(key, "must be between 1m and 31d"));
            }
        }
        Ok(PkiConfig {
            listen,
            base_url,
            crl_validity,
            ocsp_validity,
        })
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Server {
        listen: String,
        cert: PathBuf,
        key: PathBuf,
        client_ca: OneOrMany,
        metrics_listen: String,
        max_body_bytes: Option<usize>,
        max_header_bytes: Option<usize>,
        max_batch_items: Option<usize>,
        max_connections: Option<usize>,
        max_handshakes: Option<usize>,
        max_handshakes_per_ip: Option<usize>,
        max_connections_per_ip: Option<usize>,
        ipv4_prefix: Option<u8>,
        ipv6_prefix: Option<u8>,
        max_connections_per_client: Option<usize>,
        max_requests_per_client: Option<usize>,
        max_buffered_body_bytes_per_client: Option<usize>,
        max_streams_per_connection: Option<u32>,
        max_buffered_body_bytes: Option<usize>,
        metrics_max_connections: Option<usize>,
        handshake_timeout: Option<String>,
        request_timeout: Option<String>,
        idle_timeout: Option<String>,
        shutdown_timeout: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Hsm {
        module: PathBuf,
        token_label: String,
        pin_env: Option<String>,
        pin_file: Option<PathBuf>,
        pin: Option<toml::Value>,
        sessions: Option<usize>,
        queue_depth: Option<usize>,
        call_timeout: Option<String>,
        health_interval: Option<String>,
        #[serde(default)]
        environment: BTreeMap<String, String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Audit {
        dir: PathBuf,
        origin: Option<String>,
        checkpoint_interval: Option<String>,
        fsync: Option<FsyncSetting>,
        idempotency_retention: Option<String>,
        idempotency_max_records: Option<usize>,
        max_group_entries: Option<usize>,
        timestamping: Option<Timestamping>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Timestamping {
        tsa_url: String,
        ca_file: PathBuf,
        policy: Option<String>,
        timeout: Option<String>,
        retry_max_interval: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct State {
        dir: Option<PathBuf>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Storage {
        backend: Option<String>,
        url: Option<String>,
        url_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
        pool_size: Option<usize>,
        claim_lease: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Client {
        identity: String,
        #[serde(default)]
        tenants: Vec<String>,
        roles: Vec<String>,
        ca: Option<PathBuf>,
        rate_limit: Option<RateLimit>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        per_client: Option<RateLimit>,
        per_tenant: Option<RateLimit>,
        #[serde(default)]
        tenants: BTreeMap<String, TenantLimits>,
        max_queued_per_tenant: Option<usize>,
        max_queued_per_client: Option<usize>,
    }

    /// `[limits] tenants.NAME`: a rate (`per_second`, `burst`) and/or a `weight`.
    #[derive(Deserialize, Clone, Copy)]
    #[serde(deny_unknown_fields)]
    struct TenantLimits {
        per_second: Option<u32>,
        burst: Option<u32>,
        weight: Option<u32>,
    }

    /// A dotted OID, normalised.
    /// `[server]` checked: the typed configuration, or the first problem, naming its key.
    fn check_server(
        raw: &Server,
        path: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<ServerConfig, ConfigError> {
        let s = raw;
        let client_ca = match &s.client_ca {
            OneOrMany::One(p) => vec![path(p)],
            OneOrMany::Many(v) => v.iter().map(|p| path(p)).collect(),
        };
        if client_ca.is_empty() {
            return Err(ConfigError::new(
                "server.client_ca",
                "at least one CA file is required",
            ));
        }
        let mut server = ServerConfig {
            listen: addr("server.listen", &s.listen)?,
            cert: path(&s.cert),
            key: path(&s.key),
            client_ca,
            metrics_listen: addr("server.metrics_listen", &s.metrics_listen)?,
            max_body_bytes: in_range(
                "server.max_body_bytes",
                s.max_body_bytes.unwrap_or(1 << 20),
                1024,
                64 << 20,
            )?,
            max_header_bytes: in_range(
                "server.max_header_bytes",
                s.max_header_bytes.unwrap_or(16 << 10),
                8192,
                1 << 20,
            )?,
            max_batch_items: in_range(
                "server.max_batch_items",
                s.max_batch_items.unwrap_or(256),
                1,
                10_000,
            )?,
            max_connections: in_range(
                "server.max_connections",
                s.max_connections.unwrap_or(4096),
                1,
                1 << 20,
            )?,
            max_handshakes: in_range(
                "server.max_handshakes",
                s.max_handshakes.unwrap_or(256),
                1,
                1 << 16,
            )?,
            max_handshakes_per_ip: in_range(
                "server.max_handshakes_per_ip",
                s.max_handshakes_per_ip.unwrap_or(32),
                1,
                1 << 16,
            )?,
            max_streams_per_connection: in_range(
                "server.max_streams_per_connection",
                s.max_streams_per_connection.unwrap_or(64) as usize,
                1,
                1024,
            )? as u32,
            max_buffered_body_bytes: in_range(
                "server.max_buffered_body_bytes",
                s.max_buffered_body_bytes.unwrap_or(64 << 20),
                1 << 20,
                4 << 30,
            )?,
            max_connections_per_ip: 0,
            // In range, so they fit a u8.
            ipv4_prefix: in_range(
                "server.ipv4_prefix",
                usize::from(s.ipv4_prefix.unwrap_or(24)),
                8,
                32,
            )? as u8,
            ipv6_prefix: in_range(
                "server.ipv6_prefix",
                usize::from(s.ipv6_prefix.unwrap_or(64)),
                16,
                128,
            )? as u8,
            max_connections_per_client: 0,
            max_requests_per_client: 0,
            max_buffered_body_bytes_per_client: 0,
            metrics_max_connections: in_range(
                "server.metrics_max_connections",
                s.metrics_max_connections.unwrap_or(64),
                1,
                1 << 16,
            )?,
            handshake_timeout: dur("server.handshake_timeout", &s.handshake_timeout, "10s")?,
            request_timeout: dur("server.request_timeout", &s.request_timeout, "10s")?,
            idle_timeout: dur("server.idle_timeout", &s.idle_timeout, "120s")?,
            shutdown_timeout: dur("server.shutdown_timeout", &s.shutdown_timeout, "30s")?,
        };
        check_client_shares(&mut server, raw)?;
        if server.listen == server.metrics_listen && server.listen.port() != 0 {
            return Err(ConfigError::new(
                "server.metrics_listen",
                "must differ from server.listen",
            ));
        }
        Ok(server)
    }

    /// `[hsm]` checked: the typed configuration, or the first problem, naming its key.
    fn check_hsm(raw: &Hsm, path: &dyn Fn(&Path) -> PathBuf) -> Result<HsmConfig, ConfigError> {
        let h = raw;
        if h.pin.is_some() {
            return Err(ConfigError::new(
                "hsm.pin",
                "PINs are never written in the configuration; use hsm.pin_env or hsm.pin_file",
            ));
        }
        let pin = match (&h.pin_env, &h.pin_file) {
            (Some(v), None) if !v.is_empty() => PinSource::Env(v.clone()),
            (None, Some(p)) => PinSource::File(path(p)),
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "hsm.pin_env",
                    "set either hsm.pin_env or hsm.pin_file, not both",
                ));
            }
            _ => {
                return Err(ConfigError::new(
                    "hsm.pin_file",
                    "one of hsm.pin_env or hsm.pin_file is required",
                ));
            }
        };
        let token_label = h.token_label.trim().to_owned();
        if token_label.is_empty() || token_label.len() > 32 {
            return Err(ConfigError::new(
                "hsm.token_label",
                "must be 1-32 characters",
            ));
        }
        let environment = h
            .environment
            .iter()
            .map(|(k, v)| {
                // Paths for the module (SOFTHSM2_CONF...) are relative to the config file too.
                let v = if v.starts_with("./") || v.starts_with("../") {
                    path(Path::new(v)).display().to_string()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect();
        let hsm = HsmConfig {
            module: path(&h.module),
            token_label,
            pin,
            sessions: in_range("hsm.sessions", h.sessions.unwrap_or(2), 1, 64)?,
            queue_depth: in_range("hsm.queue_depth", h.queue_depth.unwrap_or(1024), 1, 1 << 20)?,
            call_timeout: dur("hsm.call_timeout", &h.call_timeout, "5s")?,
            health_interval: dur("hsm.health_interval", &h.health_interval, "2s")?,
            environment,
        };
        if hsm.call_timeout.is_zero() {
            return Err(ConfigError::new(
                "hsm.call_timeout",
                "must be greater than zero",
            ));
        }
        Ok(hsm)
    }

    /// `[audit]` checked: the typed configuration, or the first problem, naming its key.
    fn check_audit(
        raw: &Audit,
        path: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<AuditConfig, ConfigError> {
        let a = raw;
        let origin = a
            .origin
            .clone()
            .unwrap_or_else(|| "signet.local/evidence".to_owned());
        if origin.is_empty()
            || origin
                .chars()
                .any(|c| c.is_whitespace() || c == '+' || c.is_control())
        {
            return Err(ConfigError::new(
                "audit.origin",
                "must be non-empty, without spaces or '+' (e.g. signet.example.com/evidence)",
            ));
        }
        let audit = AuditConfig {
            dir: path(&a.dir),
            origin,
            checkpoint_interval: dur("audit.checkpoint_interval", &a.checkpoint_interval, "10s")?,
            fsync: match a.fsync {
                None | Some(FsyncSetting::Bool(true)) => FsyncPolicy::Always,
                Some(FsyncSetting::Bool(false)) => FsyncPolicy::Never,
                Some(FsyncSetting::Policy(p)) => p,
            },
            idempotency_retention: dur(
                "audit.idempotency_retention",
                &a.idempotency_retention,
                "24h",
            )?,
            idempotency_max_records: in_range(
                "audit.idempotency_max_records",
                a.idempotency_max_records.unwrap_or(1_000_000),
                1000,
                100_000_000,
            )? as u64,
            max_group_entries: in_range(
                "audit.max_group_entries",
                a.max_group_entries.unwrap_or(4096),
                1,
                1 << 20,
            )?,
            timestamping: match &a.timestamping {
                None => None,
                Some(t) => Some(TimestampingConfig {
                    tsa_url: {
                        let ok = t.tsa_url.strip_prefix("http://").is_some_and(|r| {
                            !r.is_empty() && t.tsa_url.parse::<hyper::Uri>().is_ok()
                        });
                        if !ok {
                            return Err(ConfigError::new(
                                "audit.timestamping.tsa_url",
                                "must be an http:// URL (RFC 3161 answers are signed)",
                            ));
                        }
                        t.tsa_url.clone()
                    },
                    anchors: crate::audit::timestamp::TsaAnchors::load(&path(&t.ca_file)).map_err(
                        |e| ConfigError::new("audit.timestamping.ca_file", e.to_string()),
                    )?,
                    ca_file: path(&t.ca_file),
                    policy: oid("audit.timestamping.policy", &t.policy)?,
                    timeout: dur("audit.timestamping.timeout", &t.timeout, "10s")?,
                    retry_max_interval: dur(
                        "audit.timestamping.retry_max_interval",
                        &t.retry_max_interval,
                        "5m",
                    )?,
                }),
            },
        };
        if audit
            .timestamping
            .as_ref()
            .is_some_and(|t| t.retry_max_interval < Duration::from_millis(100))
        {
            return Err(ConfigError::new(
                "audit.timestamping.retry_max_interval",
                "must be at least 100ms",
            ));
        }
        if audit.checkpoint_interval < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "audit.checkpoint_interval",
                "must be at least 100ms",
            ));
        }
        Ok(audit)
    }

    /// The per-address and per-client shares of the global budgets: by default a quarter of
    /// each (an eighth of the connections per source network), never more than the whole.
    fn check_client_shares(server: &mut ServerConfig, raw: &Server) -> Result<(), ConfigError> {
        let share = |key: &str, v: Option<usize>, whole: usize, default: usize| {
            let v = v.unwrap_or(default.max(1));
            if v == 0 || v > whole {
                return Err(ConfigError::new(
                    key.to_owned(),
                    format!("must be 1..={whole} (the global budget)"),
                ));
            }
            Ok(v)
        };
        server.max_connections_per_ip = share(
            "server.max_connections_per_ip",
            raw.max_connections_per_ip,
            server.max_connections,
            server.max_connections / 8,
        )?;
        server.max_connections_per_client = share(
            "server.max_connections_per_client",
            raw.max_connections_per_client,
            server.max_connections,
            server.max_connections / 4,
        )?;
        server.max_requests_per_client = share(
            "server.max_requests_per_client",
            raw.max_requests_per_client,
            server.max_connections * server.max_streams_per_connection as usize,
            256,
        )?;
        server.max_buffered_body_bytes_per_client = share(
            "server.max_buffered_body_bytes_per_client",
            raw.max_buffered_body_bytes_per_client,
            server.max_buffered_body_bytes,
            (server.max_buffered_body_bytes / 4).max(server.max_body_bytes),
        )?;
        if server.max_buffered_body_bytes_per_client < server.max_body_bytes {
            return Err(ConfigError::new(
                "server.max_buffered_body_bytes_per_client",
                "must be at least server.max_body_bytes (one body of the largest size)",
            ));
        }
        Ok(())
    }

    /// `[clients]` checked: the typed configuration, or the first problem, naming its key.
    fn check_clients(
        raw: &[Client],
        path: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<Vec<ClientConfig>, ConfigError> {
        let mut clients = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, c) in raw.iter().enumerate() {
            let key = |k: &str| format!("clients[{i}].{k}");
            if c.identity.trim().is_empty() {
                return Err(ConfigError::new(key("identity"), "must not be empty"));
            }
            if !seen.insert(c.identity.clone()) {
                return Err(ConfigError::new(
                    key("identity"),
                    format!("`{}` is listed twice", c.identity),
                ));
            }
            let tenants = c
                .tenants
                .iter()
                .map(|t| {
                    t.parse::<TenantId>()
                        .map_err(|e| ConfigError::new(key("tenants"), format!("`{t}`: {e}")))
                })
                .collect::<Result<BTreeSet<_>, _>>()?;
            let mut roles = BTreeSet::new();
            for r in &c.roles {
                let role = match r.as_str() {
                    "sign" => Role::Sign,
                    "admin" => Role::Admin,
                    "audit" => Role::Audit,
                    other => {
                        return Err(ConfigError::new(
                            key("roles"),
                            format!("unknown role `{other}` (expected sign, admin or audit)"),
                        ));
                    }
                };
                roles.insert(role);
            }
            if roles.is_empty() {
                return Err(ConfigError::new(
                    key("roles"),
                    "at least one role is required",
                ));
            }
            if roles.contains(&Role::Sign) && tenants.is_empty() {
                return Err(ConfigError::new(
                    key("tenants"),
                    "a client with the sign role needs at least one tenant",
                ));
            }
            let ca =
                c.ca.as_deref()
                    .map(|p| certificate_file(&key("ca"), path(p)))
                    .transpose()?;
            check_rate(c.rate_limit, &key("rate_limit"))?;
            clients.push(ClientConfig {
                identity: c.identity.clone(),
                tenants,
                roles,
                ca,
                rate_limit: c.rate_limit,
            });
        }
        Ok(clients)
    }

    /// `[policies]` checked: the typed configuration, or the first problem, naming its key.
    fn check_policies(raw: &[Policy]) -> Result<Vec<PolicyConfig>, ConfigError> {
        let mut policies = Vec::new();
        let mut ids = BTreeSet::new();
        for (i, p) in raw.iter().enumerate() {
            let key = |k: &str| format!("policies[{i}].{k}");
            let id: PolicyId =
                p.id.parse()
                    .map_err(|e| ConfigError::new(key("id"), format!("`{}`: {e}", p.id)))?;
            if !ids.insert(id.clone()) {
                return Err(ConfigError::new(
                    key("id"),
                    format!("`{id}` is defined twice"),
                ));
            }
            let tenant: TenantId = p
                .tenant
                .parse()
                .map_err(|e| ConfigError::new(key("tenant"), format!("`{}`: {e}", p.tenant)))?;
            let mut algs = Vec::new();
            for a in p.digest_algorithms.as_slice() {
                let alg = a.parse::<DigestAlgorithm>().map_err(|_| {
                    ConfigError::new(
                        key("digest_algorithms"),
                        format!("unknown digest algorithm `{a}` (supported: sha256)"),
                    )
                })?;
                if !algs.contains(&alg) {
                    algs.push(alg);
                }
            }
            if algs.is_empty() {
                return Err(ConfigError::new(
                    key("digest_algorithms"),
                    "at least one algorithm is required",
                ));
            }
            if p.legal_standard.trim().is_empty() {
                return Err(ConfigError::new(
                    key("legal_standard"),
                    "must describe the legal standard (free text)",
                ));
            }
            check_rate(p.rate_limit, &key("rate_limit"))?;
            let retention = p
                .retention
                .as_deref()
                .map(|r| parse_duration(&key("retention"), r))
                .transpose()?;
            if retention.is_some_and(|r| r.is_zero()) {
                return Err(ConfigError::new(
                    key("retention"),
                    "must be longer than zero (leave it out to keep signer evidence without limit)",
                ));
            }
            let retention_class = match p.retention_class.as_deref() {
                None => PolicyConfig::DEFAULT_RETENTION_CLASS.to_owned(),
                Some(c)
                    if !c.is_empty()
                        && c.len() <= 64
                        && c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
                {
                    c.to_owned()
                }
                Some(_) => {
                    return Err(ConfigError::new(
                        key("retention_class"),
                        "must be 1-64 characters of letters, digits, `-`, `_` or `.`",
                    ));
                }
            };
            policies.push(PolicyConfig {
                id,
                tenant,
                digest_algorithms: algs,
                legal_standard: p.legal_standard.clone(),
                require_idempotency_key: p.require_idempotency_key,
                rate_limit: p.rate_limit,
                retention,
                retention_class,
            });
        }
        Ok(policies)
    }

    /// `[limits]` checked: the typed configuration, or the first problem, naming its key.
    fn check_limits(raw: &Limits) -> Result<LimitsConfig, ConfigError> {
        check_rate(raw.per_client, "limits.per_client")?;
        check_rate(raw.per_tenant, "limits.per_tenant")?;
        let mut tenant_limits = BTreeMap::new();
        let mut weights = BTreeMap::new();
        for (t, e) in &raw.tenants {
            let k = format!("limits.tenants.{t}");
            let tenant = t
                .parse::<TenantId>()
                .map_err(|err| ConfigError::new(k.clone(), err.to_string()))?;
            match (e.per_second, e.burst) {
                (Some(per_second), burst) => {
                    let r = RateLimit { per_second, burst };
                    check_rate(Some(r), &k)?;
                    tenant_limits.insert(tenant.clone(), r);
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new(k, "burst needs per_second"));
                }
                (None, None) => {}
            }
            if let Some(w) = e.weight {
                weights.insert(
                    tenant,
                    in_range(&format!("{k}.weight"), w as usize, 1, 1000)? as u32,
                );
            }
        }
        let max_queued_per_tenant = in_range(
            "limits.max_queued_per_tenant",
            raw.max_queued_per_tenant
                .unwrap_or(LimitsConfig::DEFAULT_MAX_QUEUED_PER_TENANT),
            1,
            1 << 20,
        )?;
        let max_queued_per_client = in_range(
            "limits.max_queued_per_client",
            raw.max_queued_per_client
                .unwrap_or(LimitsConfig::DEFAULT_MAX_QUEUED_PER_CLIENT),
            1,
            max_queued_per_tenant,
        )?;
        Ok(LimitsConfig {
            per_client: raw.per_client,
            per_tenant: raw.per_tenant,
            tenants: tenant_limits,
            weights,
            max_queued_per_tenant,
            max_queued_per_client,
        })
    }

    /// `[rotation]` checked: the typed configuration, or the first problem, naming its key.
    fn check_rotation(
        raw: &Rotation,
        path: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<RotationConfig, ConfigError> {
        let r = raw;
        let rotation = RotationConfig {
            validity: dur("rotation.validity", &r.validity, "90d")?,
            renew_before: dur("rotation.renew_before", &r.renew_before, "30d")?,
            grace: dur("rotation.grace", &r.grace, "7d")?,
            issuer: r.issuer.unwrap_or(Issuer::HsmCa),
            check_interval: dur("rotation.check_interval", &r.check_interval, "1h")?,
            min_remaining_validity: dur(
                "rotation.min_remaining_validity",
                &r.min_remaining_validity,
                "1d",
            )?,
            overdue_after: dur("rotation.overdue_after", &r.overdue_after, "3d")?,
            retry_initial: dur("rotation.retry_initial", &r.retry_initial, "30s")?,
            retry_max: dur("rotation.retry_max", &r.retry_max, "1h")?,
            ca_certificate: path(
                r.ca_certificate
                    .as_deref()
                    .unwrap_or(Path::new("hsm-ca.pem")),
            ),
            subject_organization: r
                .subject_organization
                .clone()
                .unwrap_or_else(|| "Signet".to_owned()),
            required_extended_key_usage: oid(
                "rotation.required_extended_key_usage",
                &r.required_extended_key_usage,
            )?
            .map(|o| o.to_string()),
        };
        if rotation.renew_before >= rotation.validity {
            return Err(ConfigError::new(
                "rotation.renew_before",
                "must be shorter than rotation.validity",
            ));
        }
        if rotation.min_remaining_validity >= rotation.renew_before {
            return Err(ConfigError::new(
                "rotation.min_remaining_validity",
                "must be shorter than rotation.renew_before, or keys stop signing before they are renewed",
            ));
        }
        if rotation.check_interval < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "rotation.check_interval",
                "must be at least 1s",
            ));
        }
        if rotation.retry_initial.is_zero() || rotation.retry_max < rotation.retry_initial {
            return Err(ConfigError::new(
                "rotation.retry_max",
                "must be at least rotation.retry_initial, which must be above zero",
            ));
        }
        if rotation.subject_organization.trim().is_empty() {
            return Err(ConfigError::new(
                "rotation.subject_organization",
                "must not be empty",
            ));
        }
        Ok(rotation)
    }

    fn oid(
        key: &str,
        value: &Option<String>,
    ) -> Result<Option<der::oid::ObjectIdentifier>, ConfigError> {
        value
            .as_deref()
            .map(|v| {
                der::oid::ObjectIdentifier::new(v).map_err(|e| {
                    ConfigError::new(key.to_owned(), format!("`{v}` is not a dotted OID: {e}"))
                })
            })
            .transpose()
    }

    /// A readable PEM (or DER) certificate file.
    fn certificate_file(key: &str, p: PathBuf) -> Result<PathBuf, ConfigError> {
        let bytes = std::fs::read(&p).map_err(|e| {
            ConfigError::new(key.to_owned(), format!("cannot read {}: {e}", p.display()))
        })?;
        crate::pki::parse_pem_or_der(&bytes)
            .and_then(|d| crate::pki::CertInfo::parse(&d))
            .map_err(|e| ConfigError::new(key.to_owned(), format!("{}: {e}", p.display())))?;
        Ok(p)
    }

    fn check_rate(r: Option<RateLimit>, key: &str) -> Result<(), ConfigError> {
        match r {
            Some(r) if r.per_second == 0 || r.burst == Some(0) => Err(ConfigError::new(
                key.to_owned(),
                "per_second and burst must be at least 1",
            )),
            _ => Ok(()),
        }
    }

    /// `fsync = "always"` / `"never"`, or `true` / `false`.
    enum FsyncSetting {
        Policy(FsyncPolicy),
        Bool(bool),
    }

    impl<'de> Deserialize<'de> for FsyncSetting {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = FsyncSetting;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("\"always\", \"never\", true or false")
                }
                fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<FsyncSetting, E> {
                    Ok(FsyncSetting::Bool(v))
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FsyncSetting, E> {
                    match v {
                        "always" => Ok(FsyncSetting::Policy(FsyncPolicy::Always)),
                        "never" => Ok(FsyncSetting::Policy(FsyncPolicy::Never)),
                        other => Err(E::custom(format!(
                            "unknown fsync policy `{other}` (expected \"always\" or \"never\")"
                        ))),
                    }
                }
            }
            d.deserialize_any(V)
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Policy {
        id: String,
        tenant: String,
        // `digest_algorithm = "sha256"` is accepted too.
        #[serde(default = "default_digest_algorithms", alias = "digest_algorithm")]
        digest_algorithms: Strings,
        legal_standard: String,
        #[serde(default, alias = "idempotency_key_required")]
        require_idempotency_key: bool,
        rate_limit: Option<RateLimit>,
        /// e.g. "7y", "90d", "30s".
        retention: Option<String>,
        retention_class: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Strings {
        One(String),
        Many(Vec<String>),
    }

    impl Strings {
        fn as_slice(&self) -> &[String] {
            match self {
                Strings::One(s) => std::slice::from_ref(s),
                Strings::Many(v) => v,
            }
        }
    }

    fn default_digest_algorithms() -> Strings {
        Strings::Many(vec!["sha256".to_owned()])
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Rotation {
        validity: Option<String>,
        renew_before: Option<String>,
        grace: Option<String>,
        issuer: Option<Issuer>,
        check_interval: Option<String>,
        min_remaining_validity: Option<String>,
        overdue_after: Option<String>,
        retry_initial: Option<String>,
        retry_max: Option<String>,
        ca_certificate: Option<PathBuf>,
        subject_organization: Option<String>,
        required_extended_key_usage: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cli {
        url: String,
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    }

    fn check_storage(
        s: &Storage,
        path: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<StorageConfig, ConfigError> {
        match s.backend.as_deref().unwrap_or("file") {
            "file" => {
                for (k, set) in [
                    ("url", s.url.is_some()),
                    ("url_file", s.url_file.is_some()),
                    ("ca_file", s.ca_file.is_some()),
                    ("pool_size", s.pool_size.is_some()),
                    ("claim_lease", s.claim_lease.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::new(
                            format!("storage.{k}"),
                            "only applies with backend = \"postgres\"",
                        ));
                    }
                }
                Ok(StorageConfig::File)
            }
            "postgres" => {
                let url = match (&s.url, &s.url_file) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::new(
                            "storage.url",
                            "set either url or url_file, not both",
                        ));
                    }
                    (Some(u), None) => {
                        if url_has_password(u) {
                            return Err(ConfigError::new(
                                "storage.url",
                                "holds a password: put the URL in a file and name it with url_file",
                            ));
                        }
                        UrlSource::Inline(u.clone())
                    }
                    (None, Some(f)) => UrlSource::File(path(f)),
                    (None, None) => {
                        return Err(ConfigError::new(
                            "storage.url_file",
                            "backend = \"postgres\" needs url_file (or url)",
                        ));
                    }
                };
                Ok(StorageConfig::Postgres(PostgresConfig {
                    url,
                    ca_file: s.ca_file.as_deref().map(path),
                    pool_size: in_range("storage.pool_size", s.pool_size.unwrap_or(8), 2, 256)?,
                    claim_lease: dur("storage.claim_lease", &s.claim_lease, "10s")?,
                }))
            }
            other => Err(ConfigError::new(
                "storage.backend",
                format!("`{other}` is not a backend: use \"file\" or \"postgres\""),
            )),
        }
    }

    /// A libpq URL (`postgresql://user:secret@host/db`) or key/value string with a password.
    fn url_has_password(url: &str) -> bool {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let userinfo_has_password = authority
            .rsplit_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'));
        userinfo_has_password || url.contains("password=")
    }

    fn dur(key: &str, v: &Option<String>, default: &str) -> Result<Duration, ConfigError> {
        parse_duration(key, v.as_deref().unwrap_or(default))
    }

    fn addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
        v.parse().map_err(|_| {
            ConfigError::new(
                key,
                format!("`{v}` is not an IP address and port like 127.0.0.1:8443"),
            )
        })
    }

    fn in_range(key: &str, v: usize, lo: usize, hi: usize) -> Result<usize, ConfigError> {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(ConfigError::new(
                key,
                format!("{v} is out of range {lo}..={hi}"),
            ))
        }
    }

    impl File {
        pub fn check(self, base: &Path) -> Result<Config, ConfigError> {
            let path = |p: &Path| {
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    base.join(p)
                }
            };

            let server = check_server(&self.server, &path)?;
            let hsm = check_hsm(&self.hsm, &path)?;
            let audit = check_audit(&self.audit, &path)?;
            let state_dir = path(self.state.dir.as_deref().unwrap_or(Path::new("state")));
            let storage = check_storage(&self.storage, &path)?;
            let clients = check_clients(&self.clients, &path)?;
            let policies = check_policies(&self.policies)?;
            let limits = check_limits(&self.limits)?;
            let rotation = check_rotation(&self.rotation, &path)?;
            let pki = check_pki(&self.pki, &server)?;
            let retention = check_retention(&self.retention)?;
            let cli = self.cli.map(|c| CliConfig {
                url: c.url,
                cert: path(&c.cert),
                key: path(&c.key),
                ca: path(&c.ca),
            });

            Ok(Config {
                path: None,
                server,
                hsm,
                audit,
                state_dir,
                storage,
                dynamic: DynamicConfig {
                    clients,
                    policies,
                    limits,
                    rotation,
                },
                cli,
                pki,
                retention,
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:0"
cert = "tls/server.pem"
key = "tls/server.key"
client_ca = "tls/ca.pem"
metrics_listen = "127.0.0.1:0"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "signet"
pin_file = "secrets/user.pin"

[audit]
dir = "audit"

[[clients]]
identity = "spiffe://signet.dev/payroll-app"
tenants = ["payroll"]
roles = ["sign"]

[[policies]]
id = "payroll-esign"
tenant = "payroll"
legal_standard = "ESIGN/UETA simple electronic signature"
"#;

    #[test]
    fn minimal_file_gets_defaults_and_resolved_paths() {
        let c = Config::parse(MINIMAL, Path::new("/etc/signet")).unwrap();
        assert_eq!(c.server.cert, PathBuf::from("/etc/signet/tls/server.pem"));
        assert_eq!(
            c.hsm.pin,
            PinSource::File("/etc/signet/secrets/user.pin".into())
        );
        assert_eq!(c.hsm.sessions, 2);
        assert_eq!(c.audit.fsync, FsyncPolicy::Always);
        assert_eq!(c.dynamic.rotation.issuer, Issuer::HsmCa);
        assert_eq!(
            c.dynamic.policies[0].digest_algorithms,
            vec![DigestAlgorithm::Sha256]
        );
        assert_eq!(c.state_dir, PathBuf::from("/etc/signet/state"));
    }

    fn err(text: &str) -> ConfigError {
        Config::parse(text, Path::new("/x")).unwrap_err()
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("sessions = 0", "[hsm]\n", "hsm.sessions"),
            ("pin = \"1234\"", "[hsm]\n", "hsm.pin"),
            ("bogus = 1", "[hsm]\n", "hsm.bogus"),
            ("fsync = \"sometimes\"", "[audit]\n", "audit.fsync"),
            ("sessions = \"two\"", "[hsm]\n", "hsm.sessions"),
            (
                "checkpoint_interval = \"soon\"",
                "[audit]\n",
                "audit.checkpoint_interval",
            ),
            ("origin = \"has space\"", "[audit]\n", "audit.origin"),
        ];
        for (line, section, key) in cases {
            let text = MINIMAL.replacen(section, &format!("{section}{line}\n"), 1);
            let e = err(&text);
            assert!(e.to_string().contains(key), "{line}: {e}");
        }
        let e = err(&MINIMAL.replace(
            "tenant = \"payroll\"\nlegal",
            "tenant = \"Pay Roll\"\nlegal",
        ));
        assert_eq!(e.key, "policies[0].tenant");
        let e = err(&MINIMAL.replace("roles = [\"sign\"]", "roles = [\"root\"]"));
        assert_eq!(e.key, "clients[0].roles");
        let e = err(&format!(
            "{MINIMAL}\n[rotation]\nvalidity = \"10d\"\nrenew_before = \"20d\"\n"
        ));
        assert_eq!(e.key, "rotation.renew_before");
        let e = err(&MINIMAL.replace("pin_file = \"secrets/user.pin\"", ""));
        assert_eq!(e.key, "hsm.pin_file");
        let e = err(&MINIMAL.replace(
            "listen = \"127.0.0.1:0\"\ncert",
            "listen = \"localhost\"\ncert",
        ));
        assert_eq!(e.key, "server.listen");
    }

    #[test]
    fn shipped_example_configuration_is_valid() {
        let c = Config::parse(
            include_str!("../../deploy/signet.example.toml"),
            Path::new("/etc/signet"),
        )
        .unwrap();
        assert_eq!(
            c.dynamic.policies[0].rate_limit,
            Some(RateLimit {
                per_second: 200,
                burst: Some(400)
            })
        );
        assert_eq!(
            c.hsm.pin,
            PinSource::File("/run/credentials/signet.service/hsm-pin".into())
        );
        assert!(c.cli.is_some());
    }

    #[test]
    fn retention_per_policy_and_the_sweep_settings_are_checked() {
        let policy = |extra: &str| {
            format!(
                "{MINIMAL}\n[[policies]]\nid = \"p\"\ntenant = \"payroll\"\nlegal_standard = \"x\"\n{extra}"
            )
        };
        let c = Config::parse(
            &policy("retention = \"7y\"\nretention_class = \"contracts-7y\"\n"),
            Path::new("/x"),
        )
        .unwrap();
        let p = &c.dynamic.policies[1];
        assert_eq!(p.retention, Some(Duration::from_secs(7 * 31_557_600)));
        assert_eq!(p.retention_class, "contracts-7y");
        let plain = Config::parse(&policy(""), Path::new("/x")).unwrap();
        let q = &plain.dynamic.policies[1];
        assert_eq!((q.retention, q.retention_class.as_str()), (None, "default"));
        assert_ne!(
            p.hash_hex(),
            q.hash_hex(),
            "retention is part of the policy"
        );
        assert_eq!(plain.retention, RetentionConfig::default());
        for (extra, key) in [
            ("retention = \"0s\"\n", "retention"),
            ("retention = \"soon\"\n", "retention"),
            ("retention_class = \"a b\"\n", "retention_class"),
        ] {
            let e = Config::parse(&policy(extra), Path::new("/x")).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = Config::parse(
            &format!("{MINIMAL}\n[retention]\nkey_rotation_interval = \"5m\"\n"),
            Path::new("/x"),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("retention.key_rotation_interval"),
            "{e}"
        );
        let r = Config::parse(
            &format!(
                "{MINIMAL}\n[retention]\nsweep_interval = \"10s\"\nsubject_fields = [\"email\", \"customer_id\"]\n"
            ),
            Path::new("/x"),
        )
        .unwrap()
        .retention;
        assert_eq!(r.sweep_interval, Duration::from_secs(10));
        assert_eq!(r.subject_fields, ["email", "customer_id"]);
    }

    #[test]
    fn tenant_limits_carry_rates_and_weights() {
        let c = Config::parse(
            &format!(
                "{MINIMAL}\n[limits]\nmax_queued_per_tenant = 64\nmax_queued_per_client = 16\n\
                 tenants.payroll = {{ per_second = 50, burst = 100, weight = 3 }}\n\
                 tenants.hr = {{ weight = 2 }}\n"
            ),
            Path::new("/x"),
        )
        .unwrap();
        let l = &c.dynamic.limits;
        let payroll: TenantId = "payroll".parse().unwrap();
        let hr: TenantId = "hr".parse().unwrap();
        assert_eq!(
            l.tenant(&payroll),
            Some(RateLimit {
                per_second: 50,
                burst: Some(100)
            })
        );
        assert_eq!(l.tenant(&hr), None, "a weight alone sets no rate");
        assert_eq!(l.weights.get(&payroll), Some(&3));
        assert_eq!(l.weights.get(&hr), Some(&2));
        assert_eq!((l.max_queued_per_tenant, l.max_queued_per_client), (64, 16));
        let d = Config::parse(MINIMAL, Path::new("/x"))
            .unwrap()
            .dynamic
            .limits;
        assert_eq!(
            (d.max_queued_per_tenant, d.max_queued_per_client),
            (256, 128)
        );
        for (line, key) in [
            ("tenants.hr = { weight = 0 }", "limits.tenants.hr.weight"),
            ("tenants.hr = { burst = 5 }", "limits.tenants.hr"),
            ("tenants.hr = { speed = 5 }", "limits"),
            (
                "max_queued_per_tenant = 8\nmax_queued_per_client = 9",
                "limits.max_queued_per_client",
            ),
        ] {
            let e = err(&format!("{MINIMAL}\n[limits]\n{line}\n"));
            assert!(e.key.starts_with(key), "{line}: {e}");
        }
    }

    #[test]
    fn missing_sections_and_fields_are_named() {
        let no_hsm = MINIMAL.replace("[hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"signet\"\npin_file = \"secrets/user.pin\"\n", "");
        let e = err(&no_hsm);
        assert_eq!(e.key, "hsm", "{e}");
        let e = err(&MINIMAL.replace("cert = \"tls/server.pem\"\n", ""));
        assert_eq!(e.key, "server.cert", "{e}");
    }

    #[test]
    fn duplicate_policy_is_rejected() {
        let text = format!(
            "{MINIMAL}\n[[policies]]\nid = \"payroll-esign\"\ntenant = \"payroll\"\nlegal_standard = \"x\"\n"
        );
        assert_eq!(err(&text).key, "policies[1].id");
    }

    #[test]
    fn policy_hash_changes_with_content() {
        let c = Config::parse(MINIMAL, Path::new("/x")).unwrap();
        let mut p = c.dynamic.policies[0].clone();
        let h1 = p.hash_hex();
        p.legal_standard.push('!');
        assert_ne!(h1, p.hash_hex());
        assert_eq!(h1.len(), 64);
    }
}
