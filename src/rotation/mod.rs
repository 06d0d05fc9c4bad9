//! Certificate lifecycle: the expiry monitor and the journaled rotation workflow.
//!
//! A rotation moves one tenant from version N to N+1 (or creates version 1) through steps:
//! `planned` → `key_generated` → (`awaiting_certificate` →) `certificate_received` →
//! `staged` → done (new version active, old one retiring). Each step does an idempotent
//! action (keyed by `CKA_ID` in the token, or a state the registry already has), appends its
//! evidence entry, then persists the new step in the journal store (`state_dir/rotations.json`
//! written atomically, or the `signet_rotations` table). With several replicas each action
//! holds the tenant's lease, so a rotation runs once, and any replica resumes it after a crash.
//! A crash anywhere re-runs at most one step, so there are no duplicate keys and never a
//! tenant without an active key. The monitor also retires versions whose grace has ended
//! (destroys the private key, keeps the certificate) and exports the expiry metrics.
//!
//! An engine that owns its dependencies ([`Deps`]); never touches HTTP or the service layer
//! (the service holds an `Arc<Engine>` and calls it).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use signature::hazmat::PrehashVerifier;

use der::Decode;

use crate::audit::entry::{Actor, Entry, event};
use crate::clock::Clock;
use crate::config::DynamicConfig;
use crate::config::Issuer;
use crate::domain::{JsonText, KeyId, TenantId};
use crate::hsm::{CA_KEY_ID, KeyToken, TokenSigner};
use crate::keys::Registry;
use crate::keys::{KeyState, KeyVersion};
use crate::metrics::Metrics;
use crate::metrics::ROTATION_STATES;
use crate::pki::{self, CertInfo};
use crate::storage::{self, JournalData, JournalStore, Leases};
use arc_swap::ArcSwap;

mod revoke;
pub use revoke::{Revoke, Revoked};

#[cfg(test)]
mod engine_tests;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Conflict(String),
    #[error("certificate refused: {0}")]
    Rejected(pki::Error),
    #[error("cannot persist the rotation journal: {0}")]
    Persist(storage::Error),
    #[error("cannot read the rotation journal {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("rotation step `{step}` failed: {source}")]
    Step {
        step: &'static str,
        #[source]
        source: StepError,
    },
    #[error(transparent)]
    Audit(#[from] crate::audit::Error),
    #[error("key registry: {0}")]
    Keys(#[from] crate::keys::Error),
    /// The shared state (other replicas' changes) could not be read before acting.
    #[error("cannot read the shared key states and rotation journal: {0}")]
    SharedState(String),
}

/// Why a rotation started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The tenant's first key (`signet keys create`).
    Initial,
    /// Started by an operator.
    Manual,
    /// Started by the monitor when the certificate entered `renew_before`.
    Scheduled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Planned,
    KeyGenerated,
    AwaitingCertificate,
    CertificateReceived,
    Staged,
    Completed,
    RolledBack,
    Aborted,
}

impl Step {
    pub fn as_str(&self) -> &'static str {
        match self {
            Step::Planned => "planned",
            Step::KeyGenerated => "key_generated",
            Step::AwaitingCertificate => "awaiting_certificate",
            Step::CertificateReceived => "certificate_received",
            Step::Staged => "staged",
            Step::Completed => "completed",
            Step::RolledBack => "rolled_back",
            Step::Aborted => "aborted",
        }
    }
}

/// Where a rotation is, with what its next action needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationState {
    Planned,
    KeyGenerated,
    /// Manual issuer: the CSR is out; a certificate is awaited (`signet certs import`).
    AwaitingCertificate {
        csr_pem: String,
    },
    /// A certificate to check and stage (issued by the internal CA, or imported).
    CertificateReceived {
        csr_pem: String,
        certificate_pem: String,
    },
    Staged,
    Completed,
    RolledBack,
    Aborted,
}

impl RotationState {
    /// The step's name (journal, API, metrics, logs).
    pub fn step(&self) -> Step {
        match self {
            RotationState::Planned => Step::Planned,
            RotationState::KeyGenerated => Step::KeyGenerated,
            RotationState::AwaitingCertificate { .. } => Step::AwaitingCertificate,
            RotationState::CertificateReceived { .. } => Step::CertificateReceived,
            RotationState::Staged => Step::Staged,
            RotationState::Completed => Step::Completed,
            RotationState::RolledBack => Step::RolledBack,
            RotationState::Aborted => Step::Aborted,
        }
    }

    /// The CSR of the new version, while the rotation holds one.
    pub fn csr_pem(&self) -> Option<&str> {
        match self {
            RotationState::AwaitingCertificate { csr_pem }
            | RotationState::CertificateReceived { csr_pem, .. } => Some(csr_pem),
            _ => None,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            RotationState::Completed | RotationState::RolledBack | RotationState::Aborted
        )
    }
}

/// One rotation, as journaled (flat, as [`RotationRecord`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RotationRecord", into = "RotationRecord")]
pub struct Rotation {
    pub id: String,
    pub tenant: TenantId,
    pub from_version: Option<u32>,
    pub to_version: u32,
    pub trigger: Trigger,
    pub reason: String,
    pub actor: String,
    pub state: RotationState,
    pub started_at: u64,
    pub updated_at: u64,
    /// When the renewal became due; `overdue` is measured from here.
    pub due_at: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<u64>,
    /// No grace for the previous version (suspected key compromise).
    pub emergency: bool,
}

/// A rotation in the journal (`rotations.json`, `signet_rotations`) and the API: the step by
/// name, with the CSR and certificate beside it.
#[derive(Serialize, Deserialize)]
struct RotationRecord {
    id: String,
    tenant: TenantId,
    from_version: Option<u32>,
    to_version: u32,
    trigger: Trigger,
    reason: String,
    actor: String,
    step: Step,
    started_at: u64,
    updated_at: u64,
    due_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    csr_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate_pem: Option<String>,
    #[serde(default)]
    attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    emergency: bool,
}

impl TryFrom<RotationRecord> for Rotation {
    type Error = String;
    fn try_from(r: RotationRecord) -> Result<Self, String> {
        let missing = |what: &str| {
            format!(
                "rotation {} at step {} has no {what}",
                r.id,
                r.step.as_str()
            )
        };
        let state = match r.step {
            Step::Planned => RotationState::Planned,
            Step::KeyGenerated => RotationState::KeyGenerated,
            Step::AwaitingCertificate => RotationState::AwaitingCertificate {
                csr_pem: r.csr_pem.clone().ok_or_else(|| missing("CSR"))?,
            },
            Step::CertificateReceived => RotationState::CertificateReceived {
                csr_pem: r.csr_pem.clone().ok_or_else(|| missing("CSR"))?,
                certificate_pem: r
                    .certificate_pem
                    .clone()
                    .ok_or_else(|| missing("certificate"))?,
            },
            Step::Staged => RotationState::Staged,
            Step::Completed => RotationState::Completed,
            Step::RolledBack => RotationState::RolledBack,
            Step::Aborted => RotationState::Aborted,
        };
        Ok(Rotation {
            id: r.id,
            tenant: r.tenant,
            from_version: r.from_version,
            to_version: r.to_version,
            trigger: r.trigger,
            reason: r.reason,
            actor: r.actor,
            state,
            started_at: r.started_at,
            updated_at: r.updated_at,
            due_at: r.due_at,
            attempts: r.attempts,
            last_error: r.last_error,
            next_attempt_at: r.next_attempt_at,
            emergency: r.emergency,
        })
    }
}

impl From<Rotation> for RotationRecord {
    fn from(r: Rotation) -> Self {
        let (csr_pem, certificate_pem) = match &r.state {
            RotationState::AwaitingCertificate { csr_pem } => (Some(csr_pem.clone()), None),
            RotationState::CertificateReceived {
                csr_pem,
                certificate_pem,
            } => (Some(csr_pem.clone()), Some(certificate_pem.clone())),
            _ => (None, None),
        };
        RotationRecord {
            step: r.state.step(),
            id: r.id,
            tenant: r.tenant,
            from_version: r.from_version,
            to_version: r.to_version,
            trigger: r.trigger,
            reason: r.reason,
            actor: r.actor,
            started_at: r.started_at,
            updated_at: r.updated_at,
            due_at: r.due_at,
            csr_pem,
            certificate_pem,
            attempts: r.attempts,
            last_error: r.last_error,
            next_attempt_at: r.next_attempt_at,
            emergency: r.emergency,
        }
    }
}

impl Rotation {
    pub fn new_key_id(&self) -> KeyId {
        KeyId::new(self.tenant.clone(), self.to_version)
    }

    /// The `signet_rotation_state` value for an in-progress rotation.
    pub fn state_label(&self, now: u64, overdue_after: Duration) -> &'static str {
        if now > self.due_at + overdue_after.as_secs() {
            "overdue"
        } else if self.state.step() == Step::AwaitingCertificate {
            "awaiting_certificate"
        } else if self.last_error.is_some() {
            "retrying"
        } else {
            "in_progress"
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Journal {
    format: u32,
    /// In-progress rotations, by tenant.
    active: BTreeMap<TenantId, Rotation>,
    /// The last finished rotations (most recent last).
    history: Vec<Rotation>,
}

const HISTORY: usize = 200;

/// What a rotation acts on: the token, the registry, the evidence log, the CA, the clock and
/// the reloadable settings (shared with the service, which owns none of the workflow).
pub struct Deps {
    /// The token's keys and certificates.
    pub token: Arc<dyn KeyToken>,
    pub keys: Arc<Registry>,
    pub log: Arc<storage::Log>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    pub dynamic: Arc<ArcSwap<DynamicConfig>>,
    /// The CA tenant certificates must chain to (internal for hsm-ca, a file for manual).
    pub ca: Arc<ArcSwap<Option<Arc<CertInfo>>>>,
    /// One actor per tenant across replicas.
    pub leases: Arc<dyn Leases>,
    /// Several replicas share the state (PostgreSQL): reload it before acting.
    pub shared: bool,
    /// Where the internal CA publishes revocation data (`[pki] base_url`), for the
    /// certificates it issues.
    pub revocation_urls: Option<pki::RevocationUrls>,
}

pub struct Engine {
    token: Arc<dyn KeyToken>,
    keys: Arc<Registry>,
    log: Arc<storage::Log>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    dynamic: Arc<ArcSwap<DynamicConfig>>,
    ca: Arc<ArcSwap<Option<Arc<CertInfo>>>>,
    leases: Arc<dyn Leases>,
    shared: bool,
    revocation_urls: Option<pki::RevocationUrls>,
    store: Arc<dyn JournalStore>,
    /// Guarded by `op` for writers; readers take a clone.
    journal: Mutex<Journal>,
    /// Serialises every workflow action (admin calls and the monitor) in this process; across
    /// replicas, each action also holds the tenant's lease (`rotation:TENANT`).
    op: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
}

impl Engine {
    pub async fn load(store: Arc<dyn JournalStore>, deps: Deps) -> Result<Self, Error> {
        let Deps {
            token,
            keys,
            log,
            metrics,
            clock,
            dynamic,
            ca,
            leases,
            shared,
            revocation_urls,
        } = deps;
        let engine = Self {
            token,
            keys,
            log,
            metrics,
            clock,
            dynamic,
            ca,
            leases,
            shared,
            revocation_urls,
            store,
            journal: Mutex::new(Journal::default()),
            op: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
        };
        engine.reload().await?;
        Ok(engine)
    }

    /// Read the journal from the store again (another replica may have moved a rotation on).
    pub async fn reload(&self) -> Result<(), Error> {
        let data = self.store.load().await.map_err(|e| Error::Load {
            path: "rotation journal".into(),
            reason: e.to_string(),
        })?;
        let parse = |v: Value| {
            serde_json::from_value::<Rotation>(v).map_err(|e| Error::Load {
                path: "rotation journal".into(),
                reason: e.to_string(),
            })
        };
        let mut active = BTreeMap::new();
        for (_, v) in data.active {
            let r = parse(v)?;
            active.insert(r.tenant.clone(), r);
        }
        let history = data
            .history
            .into_iter()
            .map(parse)
            .collect::<Result<Vec<_>, _>>()?;
        *self.journal() = Journal {
            format: 1,
            active,
            history,
        };
        Ok(())
    }

    /// Ask the monitor to run now (after a change).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn in_progress(&self, tenant: &TenantId) -> Option<Rotation> {
        self.journal().active.get(tenant).cloned()
    }

    pub fn all_in_progress(&self) -> Vec<Rotation> {
        self.journal().active.values().cloned().collect()
    }

    pub fn history(&self, tenant: &TenantId) -> Vec<Rotation> {
        self.journal()
            .history
            .iter()
            .filter(|r| &r.tenant == tenant)
            .cloned()
            .collect()
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Persist `rotation` as the tenant's in-progress record (or move it to history when
    /// finished). Commit point: after this returns, a restart (of any replica) resumes from
    /// its step.
    async fn save(&self, rotation: &Rotation) -> Result<(), Error> {
        let finished = rotation.state.is_finished();
        let (whole, value) = {
            let mut j = self.journal();
            if finished {
                j.active.remove(&rotation.tenant);
                j.history.push(rotation.clone());
                let excess = j.history.len().saturating_sub(HISTORY);
                j.history.drain(..excess);
            } else {
                j.active.insert(rotation.tenant.clone(), rotation.clone());
            }
            j.format = 1;
            let to_value = |r: &Rotation| {
                serde_json::to_value(r)
                    .map_err(|e| Error::Persist(storage::Error::Invalid(e.to_string())))
            };
            let whole = JournalData {
                active: j
                    .active
                    .iter()
                    .map(|(t, r)| Ok((t.to_string(), to_value(r)?)))
                    .collect::<Result<_, Error>>()?,
                history: j.history.iter().map(to_value).collect::<Result<_, _>>()?,
            };
            (whole, to_value(rotation)?)
        };
        self.store
            .save(&whole, rotation.tenant.as_str(), &value, finished)
            .await
            .map_err(Error::Persist)?;
        crash_point(rotation.state.step().as_str());
        Ok(())
    }
}

/// Test hook: abort the process right after a step is journaled.
fn crash_point(step: &str) {
    #[cfg(feature = "insecure-test-hooks")]
    if std::env::var("SIGNET_INSECURE_CRASH_AFTER").ok().as_deref() == Some(step) {
        eprintln!("insecure test hook: aborting after step {step}");
        std::process::abort();
    }
    let _ = step;
}

/// The actor recorded for the monitor's own actions.
pub fn scheduler_actor() -> Actor {
    Actor {
        identity: "signet/scheduler".into(),
        subject: String::new(),
        san: vec![],
        fingerprint_sha256: String::new(),
    }
}

/// Who starts a rotation and why.
pub struct Start {
    pub tenant: TenantId,
    pub trigger: Trigger,
    pub actor: Actor,
    pub reason: String,
    pub request_id: Option<String>,
    pub due_at: Option<u64>,
    /// Suspected compromise: the previous version gets no grace period; its private key is
    /// destroyed as soon as the new version is active.
    pub emergency: bool,
}

impl Engine {
    /// Start a rotation (or the first key of a tenant) and run it as far as it goes.
    pub async fn rotation_start(&self, start: Start) -> Result<Rotation, Error> {
        let _op = self.op.lock().await;
        let _lease = self.tenant_lease(&start.tenant).await?;
        let snap = self.keys.snapshot();
        let versions = snap.tenant(&start.tenant);
        if let Some(r) = self.in_progress(&start.tenant) {
            return Err(Error::Conflict(format!(
                "a rotation of tenant {} is already in progress (to v{}, step {})",
                start.tenant,
                r.to_version,
                r.state.step().as_str()
            )));
        }
        let from = snap.active(&start.tenant).map(|v| v.key_id.version());
        // A tenant with versions but none active (its active private key was lost, so it was
        // retired) recovers by an operator's rotation to a new version: evidenced as such.
        let recovery = from.is_none() && !versions.is_empty();
        match start.trigger {
            Trigger::Initial if !versions.is_empty() => {
                return Err(Error::Conflict(format!(
                    "tenant {} already has keys; rotate with `signet rotate start --tenant {}`{}",
                    start.tenant,
                    start.tenant,
                    if recovery {
                        " (none is active: that rotation recovers the tenant)"
                    } else {
                        ""
                    }
                )));
            }
            Trigger::Manual | Trigger::Scheduled if from.is_none() && !recovery => {
                return Err(Error::Conflict(format!(
                    "tenant {} has no keys; create one with `signet keys create --tenant {}`",
                    start.tenant, start.tenant
                )));
            }
            Trigger::Scheduled if recovery => {
                return Err(Error::Conflict(format!(
                    "tenant {} has no active key; an operator recovers it with `signet rotate start --tenant {} --reason ...`",
                    start.tenant, start.tenant
                )));
            }
            _ => {}
        }
        let now = self.clock.unix();
        let rotation = Rotation {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: start.tenant.clone(),
            from_version: from,
            to_version: snap.next_version(&start.tenant),
            trigger: start.trigger,
            reason: start.reason.clone(),
            actor: start.actor.identity.clone(),
            state: RotationState::Planned,
            started_at: now,
            updated_at: now,
            due_at: start.due_at.unwrap_or(now),
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            emergency: start.emergency,
        };
        let mut e = self.rotation_entry(
            event::ROTATION_STARTED,
            &start.actor,
            &rotation,
            start.request_id.clone(),
        );
        e.reason = Some(start.reason.clone());
        if recovery && let Some(serde_json::Value::Object(d)) = e.details.as_mut() {
            d.insert("recovery".into(), serde_json::Value::Bool(true));
            d.insert(
                "versions_without_private_key".into(),
                versions
                    .iter()
                    .map(|v| v.key_id.to_string())
                    .collect::<Vec<_>>()
                    .into(),
            );
            tracing::warn!(tenant = %start.tenant, "recovering a tenant without an active key by a rotation to a new version");
        }
        self.record(e).await?;
        self.save(&rotation).await?;
        self.metrics.rotations.with_label_values(&["started"]).inc();
        tracing::info!(tenant = %rotation.tenant, to_version = rotation.to_version, trigger = ?rotation.trigger, "rotation started");
        let result = self.advance(rotation, &start.actor).await;
        self.refresh_metrics();
        result
    }

    /// Run the steps of `rotation` until it waits (for a certificate), completes, or a step fails
    /// (then it is scheduled for a retry with backoff).
    async fn advance(&self, mut rotation: Rotation, actor: &Actor) -> Result<Rotation, Error> {
        // A failed step is tried once more at once (token hiccups are usually transient);
        // after that it waits for its backoff.
        let mut retried_now = false;
        loop {
            let step = rotation.state.step();
            let mut outcome = match step {
                Step::AwaitingCertificate | Step::Completed | Step::RolledBack | Step::Aborted => {
                    return Ok(rotation);
                }
                _ => self.run_step(&mut rotation, actor).await,
            };
            if outcome.is_err() && !retried_now && rotation.state.step() == step {
                retried_now = true;
                tracing::warn!(tenant = %rotation.tenant, step = step.as_str(), error = ?outcome, "rotation step failed; trying once more now");
                outcome = self.run_step(&mut rotation, actor).await;
            }
            match outcome {
                Ok(()) => {
                    rotation.updated_at = self.clock.unix();
                    rotation.attempts = 0;
                    rotation.last_error = None;
                    rotation.next_attempt_at = None;
                    self.save(&rotation).await?;
                    if rotation.state == RotationState::Completed {
                        self.metrics
                            .rotations
                            .with_label_values(&["completed"])
                            .inc();
                        tracing::info!(tenant = %rotation.tenant, key_id = %rotation.new_key_id(), "rotation completed");
                        // Retire what is due (at once for an emergency rotation).
                        self.wake();
                        return Ok(rotation);
                    }
                }
                Err(reason) => {
                    let now = self.clock.unix();
                    let cfg = &self.dynamic.load().rotation;
                    rotation.attempts += 1;
                    let backoff = cfg
                        .retry_initial
                        .saturating_mul(1u32 << rotation.attempts.min(16).saturating_sub(1))
                        .min(cfg.retry_max);
                    rotation.last_error = Some(reason.to_string());
                    rotation.next_attempt_at = Some(now + backoff.as_secs().max(1));
                    rotation.updated_at = now;
                    self.save(&rotation).await?;
                    self.metrics
                        .rotations
                        .with_label_values(&["failed_attempt"])
                        .inc();
                    tracing::error!(tenant = %rotation.tenant, step = step.as_str(), attempts = rotation.attempts,
                        retry_in_secs = backoff.as_secs(), error = %reason, "rotation step failed; will retry");
                    return Ok(rotation);
                }
            }
        }
    }

    /// Do one step's action and its evidence, and move to the next step ([`next`]); the caller
    /// persists it.
    async fn run_step(&self, r: &mut Rotation, actor: &Actor) -> Result<(), StepError> {
        let cfg = self.dynamic.load().rotation.clone();
        let done = match &r.state {
            RotationState::Planned => self.generate_key(r, actor).await?,
            RotationState::KeyGenerated => self.request_certificate(r, actor, &cfg).await?,
            RotationState::CertificateReceived {
                csr_pem,
                certificate_pem,
            } => self.stage(r, csr_pem, certificate_pem, &cfg).await?,
            RotationState::Staged => self.activate(r, actor, &cfg).await?,
            RotationState::AwaitingCertificate { .. }
            | RotationState::Completed
            | RotationState::RolledBack
            | RotationState::Aborted => Done::Nothing,
        };
        r.state = next(&r.state, done);
        Ok(())
    }

    /// `planned`: the new key pair in the token (idempotent by `CKA_ID`), `key_created`.
    async fn generate_key(&self, r: &Rotation, actor: &Actor) -> Result<Done, StepError> {
        let id = r.new_key_id().to_string();
        let public = self.token.ensure_key_pair(&id, &id).await?;
        let mut e = self.rotation_entry(event::KEY_CREATED, actor, r, None);
        e.key_id = Some(id);
        e.details = Some(serde_json::json!({
            "rotation_id": r.id,
            "public_key_sha256": hex::encode(crate::sha256::sha256(pki::public_key_pem(&public))),
        }));
        self.record(e).await?;
        Ok(Done::Step)
    }

    /// `key_generated`: a CSR signed in the token; with the manual issuer it waits for the
    /// certificate (`csr_created`), with the internal CA the certificate is issued now
    /// (`certificate_issued`).
    async fn request_certificate(
        &self,
        r: &Rotation,
        actor: &Actor,
        cfg: &crate::config::RotationConfig,
    ) -> Result<Done, StepError> {
        let id = r.new_key_id().to_string();
        let public = self.token_public_key(&id).await?;
        let subject = pki::name(
            &format!("{} v{}", r.tenant, r.to_version),
            &cfg.subject_organization,
        )?;
        let signer = TokenSigner::new(Arc::clone(&self.token), id.clone(), public);
        let subj = subject.clone();
        let csr = tokio::task::spawn_blocking(move || pki::csr(subj, &signer)).await??;
        let csr_pem = pki::csr_pem(&csr);
        if cfg.issuer == Issuer::Manual {
            let mut e = self.rotation_entry(event::CSR_CREATED, actor, r, None);
            e.key_id = Some(id);
            self.record(e).await?;
            return Ok(Done::Requested { csr_pem });
        }
        let ca = self.ca.load_full();
        let ca = ca
            .as_ref()
            .as_ref()
            .ok_or(StepError::Missing("the internal CA is not available"))?;
        let issuer = subject_of(&x509_cert::Certificate::from_der(&ca.der)?);
        let ca_public = ca
            .public_key
            .ok_or(StepError::Missing("the internal CA key is not P-256"))?;
        let ca_signer = TokenSigner::new(Arc::clone(&self.token), CA_KEY_ID, ca_public);
        let urls = self.revocation_urls.clone();
        // Backdate a little for clock skew between Signet and relying parties; notAfter stays
        // `validity` from now.
        let skew = Duration::from_secs(60);
        let not_before = self.clock.now() - skew;
        let validity = cfg.validity + skew;
        let der = tokio::task::spawn_blocking(move || {
            pki::issue(
                pki::Profile::DocumentSigning {
                    subject,
                    issuer,
                    urls,
                },
                &public,
                not_before,
                validity,
                &ca_signer,
            )
        })
        .await??;
        let info = CertInfo::parse(&der)?;
        let mut e = self.rotation_entry(event::CERTIFICATE_ISSUED, actor, r, None);
        e.key_id = Some(id);
        e.certificate_serial = Some(info.serial_hex.clone());
        e.details = Some(serde_json::json!({
            "rotation_id": r.id, "issuer": "hsm-ca",
            "not_before": crate::clock::rfc3339(info.not_before), "not_after": crate::clock::rfc3339(info.not_after),
        }));
        self.record(e).await?;
        Ok(Done::Issued {
            csr_pem,
            certificate_pem: info.to_pem(),
        })
    }

    /// `certificate_received`: check the certificate (key, chain, validity), a test signature
    /// in the token verified with it, store it in the token, and stage the version. An
    /// imported certificate that no longer passes (it aged past the minimum while waiting) is
    /// dropped: another one is awaited.
    async fn stage(
        &self,
        r: &Rotation,
        csr_pem: &str,
        certificate_pem: &str,
        cfg: &crate::config::RotationConfig,
    ) -> Result<Done, StepError> {
        let key_id = r.new_key_id();
        let id = key_id.to_string();
        let der = pki::parse_pem_or_der(certificate_pem.as_bytes())?;
        let public = self.token_public_key(&id).await?;
        let info = match self.check_certificate(&der, &public, Some(csr_pem)) {
            Ok(info) => info,
            Err(Error::Rejected(reason)) if cfg.issuer == Issuer::Manual => {
                tracing::error!(tenant = %r.tenant, %reason, "imported certificate refused; awaiting another");
                return Ok(Done::CertificateRefused);
            }
            Err(Error::Rejected(reason)) => return Err(reason.into()),
            Err(e) => return Err(StepError::Rotation(Box::new(e))),
        };
        let probe: [u8; 32] = crate::sha256::sha256(format!("signet rotation self-test {}", r.id));
        // Checked with the token's public key, then with the certificate's below.
        let der_sig = self.token.sign(&id, probe, public).await?;
        let verified = p256::ecdsa::DerSignature::from_bytes(&der_sig)
            .ok()
            .zip(info.public_key)
            .is_some_and(|(sig, key)| key.verify_prehash(&probe, &sig).is_ok());
        if !verified {
            return Err(StepError::Missing(
                "the test signature does not verify with the new certificate",
            ));
        }
        let subject_der = pki::name_der(&subject_of(&x509_cert::Certificate::from_der(&der)?));
        self.token
            .store_certificate(&id, &id, der.clone(), subject_der)
            .await?;
        self.keys
            .upsert(KeyVersion {
                key_id,
                state: KeyState::Staged,
                public_key: public,
                certificate_pem: Some(JsonText::new(info.to_pem())),
                certificate: Some(Arc::new(info)),
                has_private_key: true,
                retiring_until: None,
                revocation: None,
            })
            .await?;
        Ok(Done::Step)
    }

    /// `staged`: `key_activated`, then the new version active and the previous one retiring
    /// (until now + grace, or now for an emergency rotation).
    async fn activate(
        &self,
        r: &Rotation,
        actor: &Actor,
        cfg: &crate::config::RotationConfig,
    ) -> Result<Done, StepError> {
        let key_id = r.new_key_id();
        let now = self.clock.unix();
        let snap = self.keys.snapshot();
        let mut changes = vec![(key_id.clone(), KeyState::Active, None)];
        let old = snap
            .active(&r.tenant)
            .filter(|v| v.key_id != key_id)
            .map(|v| v.key_id.clone());
        let until = if r.emergency {
            now
        } else {
            now + cfg.grace.as_secs()
        };
        if let Some(old) = &old {
            changes.push((old.clone(), KeyState::Retiring, Some(until)));
        }
        let mut e = self.rotation_entry(event::KEY_ACTIVATED, actor, r, None);
        e.key_id = Some(key_id.to_string());
        e.certificate_serial = snap
            .version(&key_id)
            .and_then(|v| v.certificate.as_ref().map(|c| c.serial_hex.clone()));
        e.details = Some(serde_json::json!({
            "rotation_id": r.id,
            "previous_key_id": old.as_ref().map(|k| k.to_string()),
            "previous_retiring_until": old.as_ref().map(|_| crate::clock::rfc3339(until)),
        }));
        self.record(e).await?;
        self.keys.set_states(&changes).await?;
        Ok(Done::Step)
    }

    /// Import a certificate for the rotation awaiting one. Refused with the reason, changing
    /// nothing, if it does not fit the key, the CA or the validity rules.
    pub async fn rotation_import(
        &self,
        tenant: &TenantId,
        pem: &[u8],
        actor: &Actor,
        reason: Option<String>,
        request_id: Option<String>,
    ) -> Result<Rotation, Error> {
        let _op = self.op.lock().await;
        let _lease = self.tenant_lease(tenant).await?;
        if self.dynamic.load().rotation.issuer != Issuer::Manual {
            return Err(Error::Conflict("rotation.issuer is \"hsm-ca\": certificates are issued by the internal CA, not imported".into()));
        }
        let mut r = self.in_progress(tenant).filter(|r| r.state.step() == Step::AwaitingCertificate).ok_or_else(|| {
            Error::Conflict(format!("no rotation of tenant {tenant} is awaiting a certificate; run `signet certs csr --tenant {tenant}` first"))
        })?;
        let der = pki::parse_pem_or_der(pem).map_err(Error::Rejected)?;
        let id = r.new_key_id().to_string();
        let public = self.token_public_key(&id).await.map_err(|e| Error::Step {
            step: "certificate_received",
            source: e,
        })?;
        let csr_pem = r.state.csr_pem().unwrap_or_default().to_owned();
        let info = self.check_certificate(&der, &public, Some(&csr_pem))?;
        let mut e = self.rotation_entry(event::CERTIFICATE_IMPORTED, actor, &r, request_id);
        e.key_id = Some(id);
        e.certificate_serial = Some(info.serial_hex.clone());
        e.reason = reason;
        e.details = Some(serde_json::json!({
            "rotation_id": r.id, "issuer": info.issuer,
            "not_before": crate::clock::rfc3339(info.not_before), "not_after": crate::clock::rfc3339(info.not_after),
        }));
        self.record(e).await.map_err(|e| Error::Step {
            step: "certificate_received",
            source: e.into(),
        })?;
        r.state = RotationState::CertificateReceived {
            csr_pem,
            certificate_pem: info.to_pem(),
        };
        r.updated_at = self.clock.unix();
        self.save(&r).await?;
        let result = self.advance(r, actor).await;
        self.refresh_metrics();
        result
    }

    /// The CSR of the rotation in progress; with the manual issuer and none in progress, start
    /// one (the tenant's first key if it has none).
    pub async fn rotation_csr(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        reason: String,
        request_id: Option<String>,
    ) -> Result<String, Error> {
        if let Some(r) = self.in_progress(tenant) {
            return r.state.csr_pem().map(str::to_owned).ok_or_else(|| {
                Error::Conflict(format!(
                    "the rotation of tenant {tenant} has no CSR yet (step {})",
                    r.state.step().as_str()
                ))
            });
        }
        if self.dynamic.load().rotation.issuer != Issuer::Manual {
            return Err(Error::Conflict(
                "rotation.issuer is \"hsm-ca\": no certificate request is needed".into(),
            ));
        }
        let trigger = if self.keys.snapshot().tenant(tenant).is_empty() {
            Trigger::Initial
        } else {
            Trigger::Manual
        };
        let r = self
            .rotation_start(Start {
                tenant: tenant.clone(),
                trigger,
                actor: actor.clone(),
                reason,
                request_id,
                due_at: None,
                emergency: false,
            })
            .await?;
        r.state.csr_pem().map(str::to_owned).ok_or_else(|| {
            Error::Conflict(format!(
                "the rotation of tenant {tenant} could not create a CSR: {}",
                r.last_error.unwrap_or_default()
            ))
        })
    }

    /// Roll back: during grace, make the previous (retiring) version active again and retire
    /// the current one; or abort a rotation that has not activated yet.
    pub async fn rotation_rollback(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        reason: String,
        request_id: Option<String>,
    ) -> Result<Rotation, Error> {
        let _op = self.op.lock().await;
        let _lease = self.tenant_lease(tenant).await?;
        let now = self.clock.unix();
        if let Some(mut r) = self.in_progress(tenant) {
            // Not active yet: abort, destroying the new private key.
            let id = r.new_key_id().to_string();
            self.token
                .destroy_private_key(&id)
                .await
                .map_err(|e| Error::Step {
                    step: "abort",
                    source: e.into(),
                })?;
            let mut e = self.rotation_entry(event::ROTATION_ROLLED_BACK, actor, &r, request_id);
            e.key_id = Some(id);
            e.reason = Some(reason);
            e.details = Some(
                serde_json::json!({"rotation_id": r.id, "aborted_at_step": r.state.step().as_str()}),
            );
            self.record(e).await.map_err(|e| Error::Step {
                step: "abort",
                source: e.into(),
            })?;
            if self.keys.snapshot().version(&r.new_key_id()).is_some() {
                self.keys
                    .set_states(&[(r.new_key_id(), KeyState::Retired, None)])
                    .await
                    .map_err(|e| Error::Step {
                        step: "abort",
                        source: e.into(),
                    })?;
            }
            r.state = RotationState::Aborted;
            r.updated_at = now;
            self.save(&r).await?;
            self.metrics.rotations.with_label_values(&["aborted"]).inc();
            self.refresh_metrics();
            return Ok(r);
        }
        let snap = self.keys.snapshot();
        let current = snap
            .active(tenant)
            .ok_or_else(|| Error::Conflict(format!("tenant {tenant} has no active key")))?;
        let previous = snap
            .tenant(tenant)
            .iter()
            .filter(|v| v.state == KeyState::Retiring && v.has_private_key && v.key_id.version() < current.key_id.version())
            .max_by_key(|v| v.key_id.version())
            .ok_or_else(|| Error::Conflict(format!("tenant {tenant} has no retiring version to roll back to (its grace period is over)")))?;
        let min = self.dynamic.load().rotation.min_remaining_validity;
        if let Some(c) = &previous.certificate {
            c.check_usable(now, min).map_err(|e| {
                Error::Conflict(format!("cannot roll back to {}: {e}", previous.key_id))
            })?;
        }
        let r = Rotation {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: tenant.clone(),
            from_version: Some(current.key_id.version()),
            to_version: previous.key_id.version(),
            trigger: Trigger::Manual,
            reason: reason.clone(),
            actor: actor.identity.clone(),
            state: RotationState::RolledBack,
            started_at: now,
            updated_at: now,
            due_at: now,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            emergency: false,
        };
        let mut e = self.rotation_entry(event::ROTATION_ROLLED_BACK, actor, &r, request_id);
        e.key_id = Some(previous.key_id.to_string());
        e.reason = Some(reason);
        e.details = Some(
            serde_json::json!({"rolled_back_key_id": current.key_id.to_string(), "restored_key_id": previous.key_id.to_string()}),
        );
        self.record(e).await.map_err(|e| Error::Step {
            step: "rollback",
            source: e.into(),
        })?;
        self.keys
            .set_states(&[
                (previous.key_id.clone(), KeyState::Active, None),
                (current.key_id.clone(), KeyState::Retired, None),
            ])
            .await
            .map_err(|e| Error::Step {
                step: "rollback",
                source: e.into(),
            })?;
        let id = current.key_id.to_string();
        if let Err(e) = self.token.destroy_private_key(&id).await {
            tracing::error!(error = %e, "rolled-back key's private key not destroyed yet; the monitor retries");
        }
        self.save(&r).await?;
        self.metrics
            .rotations
            .with_label_values(&["rolled_back"])
            .inc();
        tracing::warn!(tenant = %tenant, restored = %previous.key_id, retired = %current.key_id, "rotation rolled back");
        self.refresh_metrics();
        Ok(r)
    }

    /// One monitor pass: retire, schedule, resume, refresh metrics.
    pub async fn rotation_tick(&self) {
        self.retire_due().await;
        for start in self.due_renewals() {
            let tenant = start.tenant.clone();
            if let Err(e) = self.rotation_start(start).await {
                tracing::error!(tenant = %tenant, error = %e, "cannot start a scheduled rotation");
            }
        }
        self.resume_rotations().await;
        self.refresh_metrics();
    }

    /// Retire versions whose grace ended; make sure retired and revoked versions hold no
    /// private key.
    async fn retire_due(&self) {
        let _op = self.op.lock().await;
        let now = self.clock.unix();
        let actor = scheduler_actor();
        for v in self.keys.snapshot().all() {
            if v.state == KeyState::Revoked {
                if v.has_private_key {
                    self.destroy_revoked_key(&v.key_id).await;
                }
                continue;
            }
            let due = v.state == KeyState::Retiring && v.retiring_until.is_some_and(|t| t <= now);
            if !(due || (v.state == KeyState::Retired && v.has_private_key)) {
                continue;
            }
            // Another replica may have retired it meanwhile: look again under the lease.
            let Ok(_lease) = self.tenant_lease(v.key_id.tenant()).await else {
                continue;
            };
            let Some(v) = self.keys.snapshot().version(&v.key_id).cloned() else {
                continue;
            };
            let due = v.state == KeyState::Retiring && v.retiring_until.is_some_and(|t| t <= now);
            if !(due || (v.state == KeyState::Retired && v.has_private_key)) {
                continue;
            }
            let id = v.token_id();
            if let Err(err) = self.token.destroy_private_key(&id).await {
                tracing::error!(key_id = %v.key_id, error = %err, "cannot destroy a retired private key; will retry");
                continue;
            }
            if due {
                let mut e = Entry::new(
                    event::KEY_RETIRED,
                    crate::clock::rfc3339_micros(self.clock.now()),
                    actor.clone(),
                );
                e.tenant = Some(v.key_id.tenant().to_string());
                e.key_id = Some(v.key_id.to_string());
                e.certificate_serial = v.certificate.as_ref().map(|c| c.serial_hex.clone());
                e.reason = Some("grace period ended".into());
                if let Err(err) = self.record(e).await {
                    tracing::error!(error = %err, "cannot record a retirement; will retry");
                    continue;
                }
            }
            match self
                .keys
                .set_states(&[(v.key_id.clone(), KeyState::Retired, None)])
                .await
            {
                Ok(()) if due => {
                    self.metrics.rotations.with_label_values(&["retired"]).inc();
                    tracing::info!(key_id = %v.key_id, "key version retired; private key destroyed");
                }
                Ok(()) => {}
                Err(err) => tracing::error!(error = %err, "cannot persist a retirement"),
            }
        }
    }

    /// Hold `tenant`'s rotation lease (one replica at a time) and read the shared state as it
    /// is now, before acting on it.
    async fn tenant_lease(&self, tenant: &TenantId) -> Result<storage::LeaseGuard, Error> {
        let guard = self
            .leases
            .lock(&format!("rotation:{tenant}"))
            .await
            .map_err(Error::Persist)?;
        self.reload_shared_state().await?;
        Ok(guard)
    }

    /// With several replicas: read key states (and the token) and the rotation journal again,
    /// as another replica may have changed them. Nothing to do with the file backend.
    pub async fn reload_shared_state(&self) -> Result<(), Error> {
        if !self.shared {
            return Ok(());
        }
        self.reload().await?;
        let grace = self.dynamic.load().rotation.grace;
        self.keys
            .refresh(self.token.as_ref(), grace, self.clock.unix())
            .await
            .map_err(|e| Error::SharedState(e.to_string()))
    }

    /// Manual issuer: (re)read `rotation.ca_certificate`.
    pub fn reload_manual_ca(&self) {
        if let Some(ca) = load_ca_file(&self.dynamic.load().rotation.ca_certificate) {
            self.ca.store(Arc::new(Some(ca)));
        }
    }

    /// Tenants whose active certificate entered `renew_before` and have no rotation running.
    fn due_renewals(&self) -> Vec<Start> {
        let now = self.clock.unix();
        let renew_before = self.dynamic.load().rotation.renew_before.as_secs();
        let snap = self.keys.snapshot();
        let mut out = Vec::new();
        for (tenant, _) in snap.tenants() {
            if self.in_progress(tenant).is_some() {
                continue;
            }
            let Some(active) = snap.active(tenant) else {
                continue;
            };
            let Some(cert) = &active.certificate else {
                continue;
            };
            let due_at = cert.not_after.saturating_sub(renew_before);
            if now >= due_at {
                out.push(Start {
                    tenant: tenant.clone(),
                    trigger: Trigger::Scheduled,
                    actor: scheduler_actor(),
                    reason: format!(
                        "certificate of {} expires {}; renewal window reached",
                        active.key_id,
                        crate::clock::rfc3339(cert.not_after)
                    ),
                    request_id: None,
                    due_at: Some(due_at),
                    emergency: false,
                });
            }
        }
        out
    }

    /// Resume rotations interrupted by a crash, or whose failed step's backoff elapsed.
    async fn resume_rotations(&self) {
        let _op = self.op.lock().await;
        let now = self.clock.unix();
        for r in self.all_in_progress() {
            if r.state.step() == Step::AwaitingCertificate
                || r.next_attempt_at.is_some_and(|t| t > now)
            {
                continue;
            }
            // Another replica may be running it: look again under the tenant's lease.
            let Ok(_lease) = self.tenant_lease(&r.tenant).await else {
                continue;
            };
            let Some(r) = self.in_progress(&r.tenant) else {
                continue;
            };
            if r.state.step() == Step::AwaitingCertificate
                || r.next_attempt_at.is_some_and(|t| t > now)
            {
                continue;
            }
            if let Err(e) = self.advance(r, &scheduler_actor()).await {
                tracing::error!(error = %e, "cannot advance a rotation");
            }
        }
    }

    /// Export expiry and rotation metrics from the registry and the journal.
    pub fn refresh_metrics(&self) {
        let now = self.clock.unix();
        let cfg = self.dynamic.load().rotation.clone();
        let m = &self.metrics;
        m.certificate_not_after.reset();
        m.certificate_not_before.reset();
        m.certificate_renewal_due.reset();
        m.certificate_unusable.reset();
        let snap = self.keys.snapshot();
        for v in snap.all() {
            let Some(c) = &v.certificate else { continue };
            let labels = [
                v.key_id.tenant().as_str(),
                &v.key_id.to_string(),
                v.state.as_str(),
            ];
            m.certificate_not_after
                .with_label_values(&labels)
                .set(c.not_after as i64);
            m.certificate_not_before
                .with_label_values(&labels)
                .set(c.not_before as i64);
            if v.state == KeyState::Active {
                let due = now + cfg.renew_before.as_secs() >= c.not_after;
                m.certificate_renewal_due
                    .with_label_values(&labels)
                    .set(i64::from(due));
                let unusable = c.check_usable(now, cfg.min_remaining_validity).is_err();
                m.certificate_unusable
                    .with_label_values(&labels)
                    .set(i64::from(unusable));
            }
        }
        m.revoked_versions.reset();
        for v in snap.all().filter(|v| v.state == KeyState::Revoked) {
            m.revoked_versions
                .with_label_values(&[v.key_id.tenant().as_str()])
                .inc();
        }
        m.rotation_state.reset();
        let tenants: std::collections::BTreeSet<TenantId> =
            snap.tenants().map(|(t, _)| t.clone()).collect();
        for t in tenants {
            let current = self
                .in_progress(&t)
                .map(|r| r.state_label(now, cfg.overdue_after))
                .unwrap_or("idle");
            for s in ROTATION_STATES {
                m.rotation_state
                    .with_label_values(&[t.as_str(), s])
                    .set(i64::from(*s == current));
            }
        }
    }

    /// Check a certificate for a new version: key match, CA chain, validity, remaining time.
    fn check_certificate(
        &self,
        der: &[u8],
        public: &p256::ecdsa::VerifyingKey,
        csr_pem: Option<&str>,
    ) -> Result<CertInfo, Error> {
        let mut ca = self.ca.load_full();
        if ca.is_none() && self.dynamic.load().rotation.issuer == Issuer::Manual {
            // The operator may have put the CA file in place after start: look again.
            self.reload_manual_ca();
            ca = self.ca.load_full();
        }
        let ca = ca.as_ref().as_ref().ok_or_else(|| {
            Error::Conflict(format!(
                "no CA certificate to check against: rotation.ca_certificate ({}) is not a readable PEM certificate",
                self.dynamic.load().rotation.ca_certificate.display()
            ))
        })?;
        let now = self.clock.unix();
        // The subject the CSR asked for: a certificate for another subject is refused.
        let subject = csr_pem
            .and_then(|pem| pki::parse_csr_pem(pem).ok())
            .map(|name| name.to_string());
        let dynamic = self.dynamic.load();
        let expected = pki::Expected {
            subject: subject.as_deref(),
            extended_key_usage: dynamic.rotation.required_extended_key_usage.as_deref(),
        };
        let info = pki::check_issued(der, public, ca, now, &expected).map_err(Error::Rejected)?;
        info.check_usable(now, self.dynamic.load().rotation.min_remaining_validity)
            .map_err(Error::Rejected)?;
        Ok(info)
    }

    async fn token_public_key(&self, id: &str) -> Result<p256::ecdsa::VerifyingKey, StepError> {
        self.token.public_key(id).await?.ok_or(StepError::Missing(
            "the new version's public key is missing from the token",
        ))
    }

    fn rotation_entry(
        &self,
        ev: &str,
        actor: &Actor,
        r: &Rotation,
        request_id: Option<String>,
    ) -> Entry {
        let mut e = Entry::new(
            ev,
            crate::clock::rfc3339_micros(self.clock.now()),
            actor.clone(),
        );
        e.tenant = Some(r.tenant.to_string());
        e.request_id = request_id;
        if e.details.is_none() {
            e.details = Some(
                serde_json::json!({"rotation_id": r.id, "trigger": r.trigger, "to_version": r.to_version,
                    "from_version": r.from_version, "emergency": r.emergency}),
            );
        }
        e
    }

    /// Append one admin evidence entry and wait until it is durable.
    pub(crate) async fn record(&self, e: Entry) -> Result<(), crate::audit::Error> {
        self.log.append(vec![e]).await.map(|_| ())
    }
}

/// Read a CA certificate file (PEM or DER); `None` (logged) if it is missing or invalid.
pub fn load_ca_file(path: &std::path::Path) -> Option<Arc<CertInfo>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "rotation.ca_certificate is not readable; certificate imports will be refused");
            return None;
        }
    };
    match pki::parse_pem_or_der(&bytes).and_then(|d| CertInfo::parse(&d)) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "rotation.ca_certificate is not a certificate");
            None
        }
    }
}

fn subject_of(cert: &x509_cert::Certificate) -> x509_cert::name::Name {
    cert.tbs_certificate().subject().clone()
}

/// What a step's action ended with, and what it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Done {
    /// The step's action is done: move on.
    Step,
    /// Manual issuer: the CSR is out; a certificate is awaited.
    Requested { csr_pem: String },
    /// The internal CA issued the certificate for the CSR.
    Issued {
        csr_pem: String,
        certificate_pem: String,
    },
    /// An imported certificate was refused: await another one.
    CertificateRefused,
    /// A waiting or finished rotation: nothing to do.
    Nothing,
}

/// The state after `state` once its action ended with `done`: the rotation's state machine,
/// pure. A result that does not fit the step changes nothing.
fn next(state: &RotationState, done: Done) -> RotationState {
    use RotationState as S;
    match (state, done) {
        (S::Planned, Done::Step) => S::KeyGenerated,
        (S::KeyGenerated, Done::Requested { csr_pem }) => S::AwaitingCertificate { csr_pem },
        (
            S::KeyGenerated,
            Done::Issued {
                csr_pem,
                certificate_pem,
            },
        ) => S::CertificateReceived {
            csr_pem,
            certificate_pem,
        },
        (S::CertificateReceived { .. }, Done::Step) => S::Staged,
        (S::CertificateReceived { csr_pem, .. }, Done::CertificateRefused) => {
            S::AwaitingCertificate {
                csr_pem: csr_pem.clone(),
            }
        }
        (S::Staged, Done::Step) => S::Completed,
        // Nothing else moves: waiting and finished rotations stay where they are.
        (other, _) => other.clone(),
    }
}

/// Why a rotation step failed (recorded as the rotation's `last_error`; the step is retried
/// with backoff).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("token: {0}")]
    Token(#[from] crate::hsm::Error),
    #[error("evidence log: {0}")]
    Log(#[from] crate::audit::Error),
    #[error("key registry: {0}")]
    Keys(#[from] crate::keys::Error),
    #[error("{0}")]
    Certificate(#[from] pki::Error),
    #[error("malformed certificate: {0}")]
    Der(#[from] der::Error),
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Missing(&'static str),
    #[error(transparent)]
    Rotation(Box<Error>),
}

/// The monitor task: a pass at start (resuming interrupted rotations), then every
/// `rotation.check_interval` or when woken.
pub async fn monitor(engine: Arc<Engine>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        engine.rotation_tick().await;
        let interval = engine.dynamic.load().rotation.check_interval;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = engine.wake.notified() => {}
            _ = stop.changed() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_machine_moves_one_step_per_action_and_waits_where_it_must() {
        use RotationState as S;
        let csr = || "CSR".to_owned();
        let cert = || "CERT".to_owned();
        let received = || S::CertificateReceived {
            csr_pem: csr(),
            certificate_pem: cert(),
        };
        let awaiting = || S::AwaitingCertificate { csr_pem: csr() };
        let issued = || Done::Issued {
            csr_pem: csr(),
            certificate_pem: cert(),
        };
        let table = [
            (S::Planned, Done::Step, S::KeyGenerated),
            // The internal CA issues at once; the manual issuer waits with the CSR.
            (S::KeyGenerated, issued(), received()),
            (
                S::KeyGenerated,
                Done::Requested { csr_pem: csr() },
                awaiting(),
            ),
            (received(), Done::Step, S::Staged),
            // A refused import waits for another certificate, keeping the CSR.
            (received(), Done::CertificateRefused, awaiting()),
            (S::Staged, Done::Step, S::Completed),
            // Waiting and finished rotations never move by themselves.
            (awaiting(), Done::Nothing, awaiting()),
            (S::Completed, Done::Nothing, S::Completed),
            (S::RolledBack, Done::Nothing, S::RolledBack),
            (S::Aborted, Done::Nothing, S::Aborted),
            (S::Planned, Done::Nothing, S::Planned),
            // A result that does not fit the step changes nothing.
            (S::Planned, issued(), S::Planned),
            (S::Staged, Done::CertificateRefused, S::Staged),
        ];
        for (state, done, want) in table {
            let label = format!("{state:?} {done:?}");
            assert_eq!(next(&state, done), want, "{label}");
        }
    }

    #[test]
    fn the_journal_format_is_unchanged_and_a_state_without_its_data_is_refused() {
        let flat = serde_json::json!({
            "id": "r1", "tenant": "payroll", "from_version": 1, "to_version": 2,
            "trigger": "manual", "reason": "x", "actor": "a", "step": "awaiting_certificate",
            "started_at": 1, "updated_at": 2, "due_at": 1, "csr_pem": "CSR", "attempts": 0,
        });
        let r: Rotation = serde_json::from_value(flat.clone()).unwrap();
        assert_eq!(
            r.state,
            RotationState::AwaitingCertificate {
                csr_pem: "CSR".into()
            }
        );
        assert_eq!(serde_json::to_value(&r).unwrap(), flat);
        let mut broken = flat;
        broken.as_object_mut().unwrap().remove("csr_pem");
        assert!(serde_json::from_value::<Rotation>(broken).is_err());
    }
}
