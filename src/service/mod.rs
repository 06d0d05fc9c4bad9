//! Use cases: sign, verify, read keys and evidence, and the admin actions. Owns the
//! application state (`App`: a bundle of `Arc`s) and its start-up and shutdown.
//!
//! Knows nothing of HTTP: the `http` module turns requests into calls here and errors into
//! problem documents. Never names `cryptoki` (the token is reached through `hsm`).

mod admin;
mod error;
mod evidence;
pub mod idempotency;
mod retention;
mod revocation;
mod sign;
pub mod timestamping;
mod views;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use p256::ecdsa::VerifyingKey;

pub use admin::{
    AdminRequest, ImportRequest, KeyView, RevocationAnswer, RevocationRequest, RevocationView,
    TenantStatus, VersionView,
};
pub use error::{Class, Classified, Error};
pub use evidence::{EntriesPage, EntriesQuery, IndexedEntry, ProvedEntry, TransactionView};
pub use retention::{
    ErasureAnswer, ErasureRequest, HoldRequest, ReleaseRequest, SweepAnswer, VaultRotationAnswer,
    VaultRotationRequest,
};
pub use revocation::{OcspAnswer, PublishedCrl};
pub use sign::{BatchRequest, SignRequest, SignResponse, VerifyRequest};
pub use views::{CheckpointView, ConsistencyView, EntryView, Readiness};

use crate::audit::{self, CheckpointSigner};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, DynamicConfig, Issuer, Role};
use crate::domain::TenantId;
use crate::hsm::{self, CA_KEY_ID, Hsm, LOG_ANCHOR_LABEL, LOG_KEY_ID, LOG_MAC_KEY_ID, TokenSigner};
use crate::keys::{self, Registry};
use crate::metrics::Metrics;
use crate::pki::{self, CertInfo};
use crate::policy::{self, Policies};
use crate::rotation::{self, Engine};
use crate::storage;
use crate::tls::ClientIdentity;

use idempotency::Idempotency;

/// The caller of a use case: the client certificate's identity and its configuration.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Arc<ClientIdentity>,
    pub client: Arc<crate::config::ClientConfig>,
    pub request_id: String,
}

impl Caller {
    pub fn actor(&self) -> audit::Actor {
        audit::Actor {
            identity: self.identity.identity.clone(),
            subject: self.identity.subject.clone(),
            san: self.identity.san.clone(),
            fingerprint_sha256: self.identity.fingerprint_sha256.clone(),
        }
    }

    pub fn require(&self, role: Role) -> Result<(), Error> {
        Ok(Policies::require_role(&self.client, role)?)
    }
}

/// Application state shared by every request and background task.
pub struct App {
    config: Config,
    dynamic: Arc<ArcSwap<DynamicConfig>>,
    policies: Arc<ArcSwap<Policies>>,
    /// Rate limiter state, kept across reloads.
    limiters: policy::Limiters,
    hsm: Hsm,
    keys: Arc<Registry>,
    log: Arc<storage::Log>,
    /// Idempotency claims across replicas (the file backend owns every key).
    claims: Arc<dyn storage::Claims>,
    /// The other replicas sharing the storage, if any.
    replicas: Arc<dyn storage::Replicas>,
    metrics: Arc<Metrics>,
    idempotency: Idempotency<SignResponse, Error>,
    clock: Arc<dyn Clock>,
    /// The rotation workflow; it shares `dynamic`, `ca`, the registry, the log and the token.
    rotation: Arc<Engine>,
    /// RFC 3161 timestamps of checkpoints (stored, and pending with `[audit.timestamping]`).
    timestamps: timestamping::Timestamps,
    /// Where they are stored (beside the file log, or in the database).
    timestamp_store: Arc<dyn storage::TimestampStore>,
    /// The CA tenant certificates must chain to (internal for hsm-ca, a file for manual).
    ca: Arc<ArcSwap<Option<Arc<CertInfo>>>>,
    /// The internal CA's CRL and OCSP answers (`[pki]`).
    pki: revocation::Publisher,
    /// The signer-evidence vault and legal holds.
    vault: Arc<crate::vault::Vault>,
    /// Locks held across replicas (the vault key rotation).
    leases: Arc<dyn storage::Leases>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The fair queue's bounds and weights from `[limits]`.
fn fair_shares(limits: &crate::config::LimitsConfig) -> hsm::fair::Shares {
    hsm::fair::Shares {
        max_queued_per_tenant: limits.max_queued_per_tenant,
        max_queued_per_client: limits.max_queued_per_client,
        weights: limits
            .weights
            .iter()
            .map(|(t, w)| (t.to_string(), *w))
            .collect(),
    }
}

/// The evidence log's keys in the token: the checkpoint key, the tail MAC key and the anchor.
struct TokenLogKeys {
    hsm: Hsm,
    public: VerifyingKey,
}

impl audit::anchor::TokenAnchor for TokenLogKeys {
    fn mac(&self, message: &[u8]) -> Result<[u8; 32], audit::anchor::TokenFailure> {
        let message = message.to_vec();
        Ok(self
            .hsm
            .call_blocking(move |s| s.hmac_sha256(LOG_MAC_KEY_ID, &message))?)
    }
    fn load(&self) -> Result<Vec<Vec<u8>>, audit::anchor::TokenFailure> {
        Ok(self
            .hsm
            .call_blocking(|s| s.data_objects(LOG_ANCHOR_LABEL))?)
    }
    fn store(&self, value: &[u8]) -> Result<(), audit::anchor::TokenFailure> {
        #[cfg(feature = "insecure-test-hooks")]
        if let Some(e) = self.hsm.insecure_test_take_refused_store() {
            return Err(e.into());
        }
        let value = value.to_vec();
        Ok(self
            .hsm
            .call_blocking(move |s| s.store_data_object(LOG_ANCHOR_LABEL, &value))?)
    }
}

impl CheckpointSigner for TokenLogKeys {
    fn public_key(&self) -> VerifyingKey {
        self.public
    }
    /// Checked like every token signature: a signature that does not verify with the log's
    /// public key (a stale handle naming another key of the token) is a `wrong_key` token error
    /// and never becomes a checkpoint.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, audit::anchor::TokenFailure> {
        let digest: [u8; 32] = crate::sha256::sha256(message);
        let public = self.public;
        Ok(self
            .hsm
            .call_blocking(move |s| s.sign_prehashed_checked(LOG_KEY_ID, &digest, &public))?)
    }
}

/// What the token holds about the evidence log, for an auditor's check of the log
/// (`signet audit verify --config`): the log key's public half and the latest anchor (the
/// signed tree head the service kept outside the log). Opens the token, reads, closes; creates
/// nothing.
pub fn token_log_trust(
    config: &Config,
) -> Result<(VerifyingKey, Option<audit::anchor::Anchor>), StartError> {
    let hsm = Hsm::start(&config.hsm, Arc::new(Metrics::new()))?;
    let read = (|| {
        let key = hsm
            .call_blocking(|s| s.public_key(LOG_KEY_ID))?
            .ok_or_else(|| hsm::Error::NotFound(format!("the evidence log key {LOG_KEY_ID}")))?;
        let anchors = hsm.call_blocking(|s| s.data_objects(LOG_ANCHOR_LABEL))?;
        Ok::<_, hsm::Error>((key, anchors))
    })();
    hsm.shutdown();
    let (key, anchors) = read?;
    let anchor = anchors
        .iter()
        .map(|b| audit::anchor::Anchor::decode(b))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StartError::Audit(audit::Error::Token(e.to_string())))?
        .into_iter()
        .max_by_key(|a| a.size);
    Ok((key, anchor))
}

/// Why the service could not start. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("token: {0}")]
    Hsm(#[from] hsm::Error),
    #[error("evidence log: {0}")]
    Audit(#[from] audit::Error),
    #[error("key registry: {0}")]
    Keys(#[from] keys::Error),
    #[error("internal CA: {0}")]
    Ca(String),
    #[error("rotation journal: {0}")]
    Rotation(#[from] rotation::Error),
    #[error("signer-evidence vault: {0}")]
    Vault(crate::vault::Error),
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("storage: {0}")]
    Storage(#[from] storage::Error),
}

impl From<storage::OpenError> for StartError {
    fn from(e: storage::OpenError) -> Self {
        match e {
            storage::OpenError::Log(e) => StartError::Audit(e),
            storage::OpenError::Backend(e) => StartError::Storage(e),
        }
    }
}

/// How the evidence log is opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogOpening {
    /// Refuse a log that differs from its integrity anchors.
    #[default]
    Checked,
    /// Accept it (a deliberate restore from backup); [`App::record_restore`] records it.
    AcceptRestore,
}

impl App {
    /// Start everything except the network listeners: token, evidence log, CA, registry,
    /// idempotency cache, rotation engine. Background tasks start with [`App::spawn_background`].
    pub async fn start(config: Config) -> Result<Arc<Self>, StartError> {
        Self::start_with(config, LogOpening::Checked).await
    }

    /// [`App::start`], choosing how the evidence log is opened.
    pub async fn start_with(config: Config, opening: LogOpening) -> Result<Arc<Self>, StartError> {
        let metrics = Arc::new(Metrics::new());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let hsm = Hsm::start(&config.hsm, Arc::clone(&metrics))?;
        hsm.set_shares(fair_shares(&config.dynamic.limits));

        let log_public = hsm
            .call(|s| s.ensure_p256_key_pair(LOG_KEY_ID, "signet evidence log key"))
            .await?;
        hsm.set_probe_key(LOG_KEY_ID);
        let probe_public = hsm
            .call(|s| s.ensure_p256_key_pair(hsm::PROBE_KEY_ID, "signet health probe key"))
            .await?;
        hsm.set_probe_signer(hsm::PROBE_KEY_ID, probe_public);
        hsm.call(|s| s.ensure_hmac_key(LOG_MAC_KEY_ID, "signet evidence log MAC key"))
            .await?;
        let log_keys = Arc::new(TokenLogKeys {
            hsm: hsm.clone(),
            public: log_public,
        });
        let accept_restore = opening == LogOpening::AcceptRestore;
        let storage::Storage {
            log,
            keys: keys_store,
            journal,
            leases,
            timestamps: timestamp_store,
            claims,
            replicas,
            vault: vault_store,
            holds,
        } = storage::open(
            &config,
            Arc::clone(&log_keys) as _,
            log_keys,
            Arc::clone(&metrics),
            accept_restore,
        )
        .await?;

        let ca = match config.dynamic.rotation.issuer {
            Issuer::HsmCa => Some(Arc::new(
                ensure_internal_ca(&hsm, &config, clock.as_ref()).await?,
            )),
            Issuer::Manual => rotation::load_ca_file(&config.dynamic.rotation.ca_certificate),
        };
        let keys = Arc::new(
            Registry::load(
                &hsm,
                keys_store,
                replicas.shared(),
                config.dynamic.rotation.grace,
                clock.unix(),
            )
            .await?,
        );
        let evictions = metrics.idempotency_evictions.clone();
        let idempotency = Idempotency::new(
            config.audit.idempotency_retention,
            config.audit.idempotency_max_records,
            move || evictions.inc(),
        );
        let limiters = policy::Limiters::default();
        let dynamic = Arc::new(ArcSwap::from_pointee(config.dynamic.clone()));
        let ca = Arc::new(ArcSwap::from_pointee(ca));
        let rotation = Arc::new(
            Engine::load(
                journal,
                rotation::Deps {
                    token: Arc::new(hsm.clone()),
                    keys: Arc::clone(&keys),
                    log: Arc::clone(&log),
                    metrics: Arc::clone(&metrics),
                    clock: Arc::clone(&clock),
                    dynamic: Arc::clone(&dynamic),
                    ca: Arc::clone(&ca),
                    leases: Arc::clone(&leases),
                    shared: replicas.shared(),
                    revocation_urls: config
                        .pki
                        .base_url
                        .as_deref()
                        .map(pki::RevocationUrls::under),
                },
            )
            .await?,
        );
        rotation.restore_revocations().await?;
        // One replica at a time creates the vault's first key (a token object per generation);
        // later starts need no lock (a rotation may hold it for long).
        let vault_error = |e| StartError::Vault(crate::vault::Error::Storage(e));
        let vault_lease = match vault_store.meta().await.map_err(vault_error)? {
            None => Some(leases.lock("vault-key").await.map_err(vault_error)?),
            Some(_) => None,
        };
        let vault = Arc::new(
            crate::vault::Vault::open(
                Arc::new(hsm.clone()),
                vault_store,
                holds,
                config.retention.subject_fields.clone(),
                replicas.shared(),
                &crate::clock::rfc3339(clock.unix()),
            )
            .await
            .map_err(StartError::Vault)?,
        );
        drop(vault_lease);
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let config_pki_ocsp_validity = config.pki.ocsp_validity;
        let app = Arc::new(Self {
            dynamic,
            policies: Arc::new(ArcSwap::from_pointee(Policies::with_limiters(
                &config.dynamic,
                &limiters,
            ))),
            limiters,
            config,
            hsm,
            keys,
            log,
            claims,
            replicas,
            metrics,
            idempotency,
            clock,
            rotation,
            timestamps: timestamping::Timestamps::default(),
            timestamp_store,
            ca,
            pki: revocation::Publisher::new(config_pki_ocsp_validity),
            vault,
            leases,
            shutdown,
            tasks: std::sync::Mutex::new(Vec::new()),
        });
        app.rebuild_idempotency().await?;
        timestamping::restore(&app).await?;
        app.metrics.config_last_reload_success.set(1);
        Ok(app)
    }

    /// A DER ECDSA signature by the log key over SHA-256(`message`), checked with the log's
    /// public key before it is used (statements the log makes besides checkpoints: the
    /// completeness of a bundle; callers domain-separate `message`).
    pub async fn sign_with_log_key(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let digest: [u8; 32] = crate::sha256::sha256(message);
        let public = self.log.public_key();
        Ok(self
            .hsm
            .call(move |s| s.sign_prehashed_checked(LOG_KEY_ID, &digest, &public))
            .await?)
    }

    /// Start the checkpoint signer and the rotation monitor.
    pub fn spawn_background(self: &Arc<Self>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let app = Arc::clone(self);
        let mut stop = self.shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(app.config.audit.checkpoint_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                if let Err(e) = app.checkpoint().await {
                    tracing::warn!(error = %e, "cannot sign a checkpoint; will retry");
                }
            }
        }));
        let app = Arc::clone(self);
        let stop = self.shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            rotation::monitor(Arc::clone(&app.rotation), stop).await
        }));
        let app = Arc::clone(self);
        let stop = self.shutdown.subscribe();
        tasks.push(tokio::spawn(async move { app.keep_crl_signed(stop).await }));
        let app = Arc::clone(self);
        let stop = self.shutdown.subscribe();
        tasks.push(tokio::spawn(async move { app.retention_loop(stop).await }));
        if let Some(cfg) = self.config.audit.timestamping.clone() {
            let app = Arc::clone(self);
            let stop = self.shutdown.subscribe();
            tasks.push(tokio::spawn(timestamping::run(app, cfg, stop)));
        }
        if self.replicas.shared() {
            self.replicas.start(self.shutdown.subscribe());
            let app = Arc::clone(self);
            let stop = self.shutdown.subscribe();
            tasks.push(tokio::spawn(
                async move { app.follow_shared_state(stop).await },
            ));
        }
    }

    /// Sign a checkpoint now if the tree grew (and queue it for an RFC 3161 timestamp).
    pub async fn checkpoint(&self) -> Result<Option<Arc<audit::StoredCheckpoint>>, Error> {
        let now = self.clock.unix();
        let signed = self.log.checkpoint(now).await?;
        if let Some(cp) = &signed
            && self.config.audit.timestamping.is_some()
        {
            self.timestamps.enqueue(cp.tree_size, cp.note.clone());
        }
        Ok(signed)
    }

    /// Readiness: token logged in and evidence log writable.
    pub fn is_ready(&self) -> bool {
        let ready = self.hsm.is_ready() && self.log.is_writable() && !*self.shutdown.borrow();
        self.metrics.ready.set(i64::from(ready));
        ready
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Stop background work, sign a final checkpoint, close the log and the token.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        match self.checkpoint().await {
            Ok(Some(cp)) => tracing::info!(tree_size = cp.tree_size, "final checkpoint signed"),
            Ok(None) => tracing::info!("final checkpoint already current"),
            Err(e) => tracing::error!(error = %e, "cannot sign the final checkpoint"),
        }
        let log = Arc::clone(&self.log);
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        let hsm = self.hsm.clone();
        let _ = tokio::task::spawn_blocking(move || hsm.shutdown()).await;
    }

    /// The configuration the service started with (the reloadable part is [`Self::dynamic`]).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The reloadable part of the configuration, as it is now.
    pub fn dynamic(&self) -> &Arc<ArcSwap<DynamicConfig>> {
        &self.dynamic
    }

    /// The policies and clients in force (shared with the TLS client verifier).
    pub fn policies(&self) -> Arc<ArcSwap<Policies>> {
        Arc::clone(&self.policies)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Read and check the configuration file again. Keys that only take effect after a
    /// restart are reported in the log when they changed.
    pub fn reread_configuration(&self) -> Result<Config, crate::config::ConfigError> {
        let new = self.config.reload_dynamic()?;
        let old = &self.config;
        for (changed, key) in [
            (new.server.listen != old.server.listen, "server.listen"),
            (
                new.server.metrics_listen != old.server.metrics_listen,
                "server.metrics_listen",
            ),
            (
                new.hsm.module != old.hsm.module || new.hsm.token_label != old.hsm.token_label,
                "hsm",
            ),
            (
                new.audit.dir != old.audit.dir || new.audit.origin != old.audit.origin,
                "audit",
            ),
        ] {
            if changed {
                tracing::warn!(
                    key,
                    "changed in the configuration file; takes effect only after a restart"
                );
            }
        }
        Ok(new)
    }

    /// Swap in a checked configuration's reloadable part; a summary for the log.
    pub fn apply_reload(&self, new: Config) -> String {
        let summary = format!(
            "{} clients, {} policies",
            new.dynamic.clients.len(),
            new.dynamic.policies.len()
        );
        self.apply_dynamic(new.dynamic);
        summary
    }

    /// Count a reload by outcome.
    pub fn count_reload(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "rejected" };
        self.metrics
            .config_reloads
            .with_label_values(&[outcome])
            .inc();
        self.metrics.config_last_reload_success.set(i64::from(ok));
    }

    /// Swap in a new configuration's reloadable part (clients, policies, rotation).
    pub fn apply_dynamic(&self, dynamic: DynamicConfig) {
        let manual = dynamic.rotation.issuer == Issuer::Manual;
        self.policies
            .store(Arc::new(Policies::with_limiters(&dynamic, &self.limiters)));
        self.hsm.set_shares(fair_shares(&dynamic.limits));
        self.dynamic.store(Arc::new(dynamic));
        if manual {
            self.reload_manual_ca();
        }
        self.rotation.wake();
    }

    /// Manual issuer: (re)read `rotation.ca_certificate`.
    pub fn reload_manual_ca(&self) {
        self.rotation.reload_manual_ca();
    }

    /// Record a configuration reload as evidence: who, and the policies now in force (their
    /// hashes), so an auditor can tell which policy text applied when.
    pub async fn record_reload(&self, actor: audit::Actor, request_id: Option<String>) {
        let dynamic = self.dynamic.load();
        let mut e = audit::Entry::new(
            audit::entry::event::CONFIGURATION_RELOADED,
            crate::clock::rfc3339_micros(self.clock.now()),
            actor,
        );
        e.request_id = request_id;
        e.details = Some(serde_json::json!({
            "clients": dynamic.clients.iter().map(|c| c.identity.clone()).collect::<Vec<_>>(),
            "policies": dynamic.policies.iter().map(|p| serde_json::json!({
                "id": p.id.as_str(), "tenant": p.tenant.as_str(), "hash": p.hash_hex(),
            })).collect::<Vec<_>>(),
        }));
        if let Err(err) = self.log.append(vec![e]).await {
            tracing::error!(error = %err, "cannot record the configuration reload as evidence");
        }
    }

    /// Record an accepted restore (opened with [`LogOpening::AcceptRestore`]) as evidence and
    /// sign a checkpoint, which re-anchors the log in the token. Returns what differed from the
    /// anchors; nothing is recorded if nothing differed.
    pub async fn record_restore(
        &self,
        actor: audit::Actor,
        reason: String,
    ) -> Result<Vec<String>, Error> {
        let findings = self.log.restore_findings().to_vec();
        if findings.is_empty() {
            return Ok(findings);
        }
        let mut e = audit::Entry::new(
            audit::entry::event::LOG_RESTORED,
            crate::clock::rfc3339_micros(self.clock.now()),
            actor,
        );
        e.reason = Some(reason);
        e.details = Some(serde_json::json!({
            "findings": findings,
            "tree_size_before_this_entry": self.log.tree_size(),
        }));
        self.log.append(vec![e]).await?;
        // Re-anchors the log (with PostgreSQL, whichever replica leads).
        self.log.checkpoint_now(self.clock.unix()).await?;
        Ok(findings)
    }

    /// Fill the idempotency cache from the log's entries inside the retention window (file
    /// backend; with PostgreSQL the records are in the database and read on demand).
    async fn rebuild_idempotency(&self) -> Result<(), StartError> {
        let storage::Log::File(log) = &*self.log else {
            return Ok(());
        };
        let log = Arc::clone(log);
        let now = self.clock.unix();
        let retention = self.config.audit.idempotency_retention.as_secs();
        let cutoff = now.saturating_sub(retention);
        // The cache holds at most this many: older records would only be evicted again.
        let max = usize::try_from(self.config.audit.idempotency_max_records).unwrap_or(usize::MAX);
        let found = tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            log.scan_backwards(|index, e| {
                let t = crate::clock::parse_rfc3339(&e.time).unwrap_or(0);
                if t < cutoff || found.len() >= max {
                    return false;
                }
                if let (Some(k), Some(r)) = (&e.idempotency_key_sha256, &e.request_sha256)
                    && let Ok(kh) = hex::decode(k)
                    && let Ok(kh) = <[u8; 32]>::try_from(kh.as_slice())
                {
                    found.push(((e.actor.identity.clone(), kh), r.clone(), index, t));
                }
                true
            })?;
            Ok::<_, audit::Error>(found)
        })
        .await??;
        let n = found.len();
        for (key, request_sha256, index, t) in found.into_iter().rev() {
            let ttl = Duration::from_secs((t + retention).saturating_sub(now));
            self.idempotency.insert(
                key,
                idempotency::Record {
                    request_sha256,
                    index,
                    ttl,
                },
            );
        }
        if n > 0 {
            tracing::info!(
                records = n,
                "idempotency records restored from the evidence log"
            );
        }
        Ok(())
    }

    /// With PostgreSQL: pick up other replicas' key-state and journal changes (NOTIFY, and the
    /// state version polled every second), and expire old idempotency records (the leader).
    async fn follow_shared_state(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let replicas = &self.replicas;
        let mut changes = replicas.state_changes();
        let mut seen: Option<i64> = None;
        let mut last_expiry = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
            match replicas.state_version().await {
                Ok(v) if seen != Some(v) => match self.reload_shared_state().await {
                    Ok(()) => {
                        seen = Some(v);
                        self.refresh_metrics();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reload the shared state; will retry")
                    }
                },
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cannot read the shared state version"),
            }
            if replicas.is_leader() && last_expiry.elapsed() > Duration::from_secs(60) {
                last_expiry = std::time::Instant::now();
                if let Err(e) = self
                    .claims
                    .expire(self.config.audit.idempotency_retention)
                    .await
                {
                    tracing::warn!(error = %e, "cannot expire idempotency records");
                }
            }
        }
    }

    /// With several replicas: read key states (and the token) and the rotation journal again,
    /// as another replica may have changed them. Nothing to do with the file backend.
    pub async fn reload_shared_state(&self) -> Result<(), rotation::Error> {
        self.rotation.reload_shared_state().await
    }

    /// Export expiry and rotation metrics from the registry and the journal.
    pub fn refresh_metrics(&self) {
        self.rotation.refresh_metrics();
    }

    /// Whether the tenant has a key version or a rotation under way (a first key would be a
    /// second one).
    pub fn tenant_has_keys_or_rotation(&self, tenant: &TenantId) -> bool {
        !self.keys.snapshot().tenant(tenant).is_empty()
            || self.rotation.in_progress(tenant).is_some()
    }

    /// The tenant's configured existence: named by a policy or a client, or holding keys.
    pub fn tenant_exists(&self, tenant: &TenantId) -> bool {
        self.dynamic.load().tenants().contains(tenant)
            || !self.keys.snapshot().tenant(tenant).is_empty()
    }
}

/// Make sure the internal CA key and certificate exist in the token; write the certificate to
/// `rotation.ca_certificate` so clients and `certs import` can use it.
async fn ensure_internal_ca(
    hsm: &Hsm,
    config: &Config,
    clock: &dyn Clock,
) -> Result<CertInfo, StartError> {
    let public = hsm
        .call(|s| s.ensure_p256_key_pair(CA_KEY_ID, "signet internal CA"))
        .await?;
    let existing = hsm.call(|s| s.certificate(CA_KEY_ID)).await?;
    let now = clock.unix();
    let usable = existing
        .as_deref()
        .and_then(|d| CertInfo::parse(d).ok())
        .filter(|c| {
            c.public_key == Some(public)
                && c.check_usable(now, Duration::from_secs(30 * 86400)).is_ok()
        });
    let ca = match usable {
        Some(c) => c,
        None => {
            let org = config.dynamic.rotation.subject_organization.clone();
            let subject = pki::name("Signet internal signing CA", &org)
                .map_err(|e| StartError::Ca(e.to_string()))?;
            let subject_der = pki::name_der(&subject);
            let signer = TokenSigner::new(Arc::new(hsm.clone()), CA_KEY_ID, public);
            let not_before = clock.now() - Duration::from_secs(300);
            let der = tokio::task::spawn_blocking(move || {
                pki::issue(
                    pki::Profile::Ca { subject },
                    &public,
                    not_before,
                    Duration::from_secs(10 * 365 * 86400),
                    &signer,
                )
            })
            .await?
            .map_err(|e| StartError::Ca(e.to_string()))?;
            let d = der.clone();
            hsm.call(move |s| {
                s.store_certificate(CA_KEY_ID, "signet internal CA", &d, &subject_der)
            })
            .await?;
            tracing::info!("internal CA certificate issued");
            CertInfo::parse(&der).map_err(|e| StartError::Ca(e.to_string()))?
        }
    };
    let path = &config.dynamic.rotation.ca_certificate;
    if std::fs::read_to_string(path).ok().as_deref() != Some(ca.to_pem().as_str()) {
        crate::fsutil::write_atomic_mode(path, ca.to_pem().as_bytes(), 0o644).map_err(|e| {
            StartError::Ca(format!(
                "configuration key `rotation.ca_certificate`: cannot write {}: {e}",
                path.display()
            ))
        })?;
    }
    Ok(ca)
}
