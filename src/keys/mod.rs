//! The key registry: every tenant key version, its state and certificate.
//!
//! The token holds the keys and certificates (`CKA_ID` = `TENANT/vN`); the state of each
//! version (staged, active, retiring, retired, revoked) lives in the key-state store: `keys.json` in
//! `state_dir` for the file backend (written atomically: temp file, fsync, rename, fsync dir),
//! the `signet_key_states` table for PostgreSQL. If the states are lost, the token alone
//! rebuilds the registry with a conservative rule (see [`derive_states`]).
//!
//! Readers take a lock-free snapshot (`ArcSwap`); writers serialise on a mutex, persist, then
//! publish a new snapshot. With several replicas, [`Registry::reload`] picks up what another
//! replica changed. Must not touch HTTP or the evidence log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::domain::{JsonText, KeyId, TenantId};
use crate::hsm::{self, KeyToken, TokenKey};

use crate::pki::{self, CertInfo};
use crate::storage::{self, KeyStateStore};

/// Lifecycle of a key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Generated, certificate pending or verified, not yet signing.
    Staged,
    /// The one version that signs for its tenant.
    Active,
    /// Grace period after a rotation: still verifies, never signs.
    Retiring,
    /// Private key destroyed; certificate kept for verification.
    Retired,
    /// Withdrawn by an operator (`signet keys revoke`): never signs again, whatever the log or
    /// the token say; its certificate is on the internal CA's CRL. Carries a [`Revocation`].
    Revoked,
}

impl KeyState {
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyState::Staged => "staged",
            KeyState::Active => "active",
            KeyState::Retiring => "retiring",
            KeyState::Retired => "retired",
            KeyState::Revoked => "revoked",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tenant {0} has no active key")]
    NoActiveKey(TenantId),
    #[error("key {key_id} may not sign: {reason}")]
    CertificateNotUsable { key_id: KeyId, reason: pki::Error },
    #[error("key {0} not found")]
    UnknownKey(KeyId),
    #[error("key {0} is revoked and never signs again")]
    Revoked(KeyId),
    #[error("cannot persist key states: {0}")]
    Persist(storage::Error),
    #[error("cannot read key states: {0}")]
    Load(storage::Error),
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoActiveKey(_) => "no_active_key",
            Error::CertificateNotUsable { .. } => "certificate_not_usable",
            Error::UnknownKey(_) => "unknown_key",
            Error::Revoked(_) => "revoked",
            Error::Persist(_) => "persist",
            Error::Load(_) => "load",
            Error::Hsm(e) => e.kind(),
        }
    }
}

/// One key version as the service sees it.
#[derive(Debug, Clone)]
pub struct KeyVersion {
    pub key_id: KeyId,
    pub state: KeyState,
    pub public_key: VerifyingKey,
    pub certificate: Option<Arc<CertInfo>>,
    pub has_private_key: bool,
    /// Unix time when a retiring version becomes retired.
    pub retiring_until: Option<u64>,
    /// The certificate's PEM, as the signing answers carry it.
    pub certificate_pem: Option<JsonText>,
    /// Set exactly when `state` is [`KeyState::Revoked`].
    pub revocation: Option<Arc<Revocation>>,
}

/// Why a version was revoked: the RFC 5280 reason codes Signet offers (one type with the CRL's).
pub use crate::pki::revocation::Reason as RevocationReason;

/// The revocation of one version, as recorded with its state and in its `key_revoked` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub reason: RevocationReason,
    /// Unix time of the revocation (the CRL's revocationDate).
    pub revoked_at: u64,
    /// When the key is known or suspected to have been compromised (the CRL's
    /// invalidityDate); signatures after it are refused by the verifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compromised_at: Option<u64>,
    /// The revoked certificate's serial (hex), if the version had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// Index of the `key_revoked` entry in the evidence log.
    pub log_index: u64,
}

impl KeyVersion {
    /// The `CKA_ID` / `CKA_LABEL` of this version in the token.
    pub fn token_id(&self) -> String {
        self.key_id.to_string()
    }
}

/// An immutable view of every tenant's versions, sorted by version number.
#[derive(Debug, Default)]
pub struct Snapshot {
    tenants: BTreeMap<TenantId, Vec<Arc<KeyVersion>>>,
}

impl Snapshot {
    pub fn tenant(&self, tenant: &TenantId) -> &[Arc<KeyVersion>] {
        self.tenants.get(tenant).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn active(&self, tenant: &TenantId) -> Option<&Arc<KeyVersion>> {
        self.tenant(tenant)
            .iter()
            .find(|v| v.state == KeyState::Active)
    }

    pub fn version(&self, key_id: &KeyId) -> Option<&Arc<KeyVersion>> {
        self.tenant(key_id.tenant())
            .iter()
            .find(|v| v.key_id == *key_id)
    }

    pub fn tenants(&self) -> impl Iterator<Item = (&TenantId, &Vec<Arc<KeyVersion>>)> {
        self.tenants.iter()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<KeyVersion>> {
        self.tenants.values().flatten()
    }

    /// The next unused version number for `tenant`.
    pub fn next_version(&self, tenant: &TenantId) -> u32 {
        self.tenant(tenant)
            .iter()
            .map(|v| v.key_id.version())
            .max()
            .unwrap_or(0)
            + 1
    }
}

/// What `keys.json` holds per version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VersionRecord {
    state: KeyState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retiring_until: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revocation: Option<Revocation>,
}

impl VersionRecord {
    fn of(state: KeyState, retiring_until: Option<u64>) -> Self {
        Self {
            state,
            retiring_until,
            revocation: None,
        }
    }
}

/// A version may sign: it holds its private key and a certificate usable now.
fn usable_for_signing(
    v: &Arc<KeyVersion>,
    now: u64,
    min_remaining: Duration,
) -> Result<Arc<KeyVersion>, Error> {
    let tenant = v.key_id.tenant();
    if v.state == KeyState::Revoked {
        return Err(Error::Revoked(v.key_id.clone()));
    }
    let cert = v
        .certificate
        .as_ref()
        .ok_or_else(|| Error::NoActiveKey(tenant.clone()))?;
    if !v.has_private_key {
        return Err(Error::NoActiveKey(tenant.clone()));
    }
    cert.check_usable(now, min_remaining)
        .map_err(|reason| Error::CertificateNotUsable {
            key_id: v.key_id.clone(),
            reason,
        })?;
    Ok(Arc::clone(v))
}

pub struct Registry {
    snapshot: ArcSwap<Snapshot>,
    store: Arc<dyn KeyStateStore>,
    /// The records as last persisted or loaded; guarded by the writer lock with mutations.
    write: tokio::sync::Mutex<BTreeMap<String, VersionRecord>>,
    /// Store states derived for versions without a record (one process). With several
    /// replicas only a rotation writes states: a replica deriving from a view taken in the
    /// middle of another replica's rotation step must not overwrite what that step stores.
    persist_derived: bool,
}

impl Registry {
    /// Rebuild the registry from the token and the stored states.
    pub async fn load(
        token: &dyn KeyToken,
        store: Arc<dyn KeyStateStore>,
        shared: bool,
        grace: Duration,
        now: u64,
    ) -> Result<Self, Error> {
        let registry = Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            store,
            write: tokio::sync::Mutex::new(BTreeMap::new()),
            persist_derived: !shared,
        };
        registry.reload(token, grace, now).await?;
        Ok(registry)
    }

    /// Read the token again if the stored states changed since this registry last read or
    /// wrote them (another replica rotated). The token is not scanned otherwise: a scan while
    /// another process is creating a key pair can catch its objects half made (SoftHSM).
    pub async fn refresh(
        &self,
        token: &dyn KeyToken,
        grace: Duration,
        now: u64,
    ) -> Result<(), Error> {
        let stored = read_records(self.store.as_ref()).await?;
        if *self.write.lock().await == stored {
            return Ok(());
        }
        self.reload(token, grace, now).await
    }

    /// Read the token and the stored states again (another replica changed them). With one
    /// process, persists states derived for versions that have none yet.
    pub async fn reload(
        &self,
        token: &dyn KeyToken,
        grace: Duration,
        now: u64,
    ) -> Result<(), Error> {
        let mut persisted = self.write.lock().await;
        let stored = read_records(self.store.as_ref()).await?;
        let found = token.scan().await?;
        let (snapshot, records) = reconcile(found, &stored, grace, now);
        if self.persist_derived && records != stored {
            self.persist(&records, &stored).await?;
            *persisted = records;
        } else {
            *persisted = stored;
        }
        self.snapshot.store(Arc::new(snapshot));
        Ok(())
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The version that signs for `tenant` now, if its certificate allows it.
    pub fn signing_key(
        &self,
        tenant: &TenantId,
        now: u64,
        min_remaining: Duration,
    ) -> Result<Arc<KeyVersion>, Error> {
        let snap = self.snapshot.load();
        let v = snap
            .active(tenant)
            .ok_or_else(|| Error::NoActiveKey(tenant.clone()))?;
        usable_for_signing(v, now, min_remaining)
    }

    /// `key_id` for signing, whatever its state in the registry: the evidence log has made it
    /// the tenant's active version and the registry is about to follow. Its private key and
    /// certificate must still be usable.
    pub fn signing_version(
        &self,
        key_id: &KeyId,
        now: u64,
        min_remaining: Duration,
    ) -> Result<Arc<KeyVersion>, Error> {
        let snap = self.snapshot.load();
        let v = snap
            .version(key_id)
            .ok_or_else(|| Error::UnknownKey(key_id.clone()))?;
        usable_for_signing(v, now, min_remaining)
    }

    /// Insert or replace a version. Persists before publishing.
    pub async fn upsert(&self, version: KeyVersion) -> Result<(), Error> {
        self.mutate(|tenants| {
            let list = tenants.entry(version.key_id.tenant().clone()).or_default();
            list.retain(|v| v.key_id != version.key_id);
            list.push(Arc::new(version));
            list.sort_by_key(|v| v.key_id.version());
        })
        .await
    }

    /// Change states of several versions at once (one atomic write): e.g. activate the new
    /// version and make the old one retiring in the same step.
    pub async fn set_states(
        &self,
        changes: &[(KeyId, KeyState, Option<u64>)],
    ) -> Result<(), Error> {
        for (id, _, _) in changes {
            match self.snapshot.load().version(id) {
                None => return Err(Error::UnknownKey(id.clone())),
                // Revocation is final: nothing brings a revoked version back.
                Some(v) if v.state == KeyState::Revoked => {
                    return Err(Error::Revoked(id.clone()));
                }
                Some(_) => {}
            }
        }
        self.mutate(|tenants| {
            for (id, state, until) in changes {
                if let Some(list) = tenants.get_mut(id.tenant()) {
                    for v in list.iter_mut() {
                        if v.key_id == *id {
                            let mut nv = (**v).clone();
                            nv.state = *state;
                            nv.retiring_until = *until;
                            if *state == KeyState::Retired {
                                nv.has_private_key = false;
                            }
                            *v = Arc::new(nv);
                        }
                    }
                }
            }
        })
        .await
    }

    /// Revoke `key_id` (one atomic write): it never signs again. The caller has recorded the
    /// `key_revoked` entry first.
    pub async fn revoke(&self, key_id: &KeyId, revocation: Revocation) -> Result<(), Error> {
        self.replace(key_id, |v| {
            v.state = KeyState::Revoked;
            v.retiring_until = None;
            v.revocation = Some(Arc::new(revocation));
        })
        .await
    }

    /// The token no longer holds `key_id`'s private key (destroyed after retirement or
    /// revocation).
    pub async fn private_key_destroyed(&self, key_id: &KeyId) -> Result<(), Error> {
        self.replace(key_id, |v| v.has_private_key = false).await
    }

    async fn replace(&self, key_id: &KeyId, f: impl FnOnce(&mut KeyVersion)) -> Result<(), Error> {
        let Some(current) = self.snapshot.load().version(key_id).cloned() else {
            return Err(Error::UnknownKey(key_id.clone()));
        };
        let mut changed = (*current).clone();
        f(&mut changed);
        self.upsert(changed).await
    }

    async fn mutate(
        &self,
        f: impl FnOnce(&mut BTreeMap<TenantId, Vec<Arc<KeyVersion>>>),
    ) -> Result<(), Error> {
        let mut persisted = self.write.lock().await;
        let mut tenants = self.snapshot.load().tenants.clone();
        f(&mut tenants);
        let records = tenants
            .values()
            .flatten()
            .map(|v| {
                (
                    v.key_id.to_string(),
                    VersionRecord {
                        state: v.state,
                        retiring_until: v.retiring_until,
                        revocation: v.revocation.as_deref().cloned(),
                    },
                )
            })
            .collect();
        self.persist(&records, &persisted).await?;
        *persisted = records;
        self.snapshot.store(Arc::new(Snapshot { tenants }));
        Ok(())
    }

    /// Store `records`; `before` is what the store held, to tell which versions changed.
    async fn persist(
        &self,
        records: &BTreeMap<String, VersionRecord>,
        before: &BTreeMap<String, VersionRecord>,
    ) -> Result<(), Error> {
        let changed: Vec<String> = records
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .chain(before.keys().filter(|k| !records.contains_key(*k)).cloned())
            .collect();
        let all = records
            .iter()
            .map(|(k, v)| {
                serde_json::to_value(v)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Error::Persist(storage::Error::Invalid(e.to_string())))
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        self.store
            .save(&all, &changed)
            .await
            .map_err(Error::Persist)
    }
}

async fn read_records(store: &dyn KeyStateStore) -> Result<BTreeMap<String, VersionRecord>, Error> {
    store
        .load()
        .await
        .map_err(Error::Load)?
        .into_iter()
        .map(|(k, v)| {
            serde_json::from_value(v)
                .map(|r| (k.clone(), r))
                .map_err(|e| Error::Load(storage::Error::Invalid(format!("key {k}: {e}"))))
        })
        .collect()
}

/// Combine what the token holds with the recorded states.
fn reconcile(
    found: Vec<TokenKey>,
    records: &BTreeMap<String, VersionRecord>,
    grace: Duration,
    now: u64,
) -> (Snapshot, BTreeMap<String, VersionRecord>) {
    let mut by_tenant: BTreeMap<TenantId, Vec<TokenKey>> = BTreeMap::new();
    for f in found {
        by_tenant
            .entry(f.key_id.tenant().clone())
            .or_default()
            .push(f);
    }
    let mut tenants = BTreeMap::new();
    let mut out_records = BTreeMap::new();
    for (tenant, mut versions) in by_tenant {
        versions.sort_by_key(|f| f.key_id.version());
        let certs: Vec<Option<CertInfo>> = versions
            .iter()
            .map(|f| {
                f.certificate
                    .as_deref()
                    .and_then(|d| CertInfo::parse(d).ok())
            })
            .collect();
        let derived = derive_states(&versions, &certs, records, grace, now);
        let mut list = Vec::new();
        for ((f, cert), rec) in versions.into_iter().zip(certs).zip(derived) {
            let mut rec = rec;
            if !f.has_private_key && !matches!(rec.state, KeyState::Retired | KeyState::Revoked) {
                tracing::warn!(key_id = %f.key_id, state = rec.state.as_str(), "private key missing from token; marking retired");
                rec = VersionRecord::of(KeyState::Retired, None);
            }
            out_records.insert(f.key_id.to_string(), rec.clone());
            let certificate_pem = cert.as_ref().map(|c| JsonText::new(c.to_pem()));
            list.push(Arc::new(KeyVersion {
                key_id: f.key_id,
                state: rec.state,
                public_key: f.public_key,
                certificate: cert.map(Arc::new),
                has_private_key: f.has_private_key,
                retiring_until: rec.retiring_until,
                certificate_pem,
                revocation: rec.revocation.clone().map(Arc::new),
            }));
        }
        tenants.insert(tenant, list);
    }
    for id in records.keys() {
        if !out_records.contains_key(id) {
            tracing::error!(key_id = %id, "key version recorded in keys.json is missing from the token");
        }
    }
    (Snapshot { tenants }, out_records)
}

/// States for one tenant's versions (sorted by version). Recorded states win. Versions with
/// no record are derived: the highest version with a private key and a certificate becomes
/// active if no recorded version is active; other versions with a private key and a
/// certificate become retiring for one grace period; versions without a certificate are
/// staged; versions without a private key are retired. At most one version is active.
fn derive_states(
    versions: &[TokenKey],
    certs: &[Option<CertInfo>],
    records: &BTreeMap<String, VersionRecord>,
    grace: Duration,
    now: u64,
) -> Vec<VersionRecord> {
    let recorded: Vec<Option<&VersionRecord>> = versions
        .iter()
        .map(|f| records.get(&f.key_id.to_string()))
        .collect();
    let mut has_active = recorded
        .iter()
        .any(|r| matches!(r, Some(r) if r.state == KeyState::Active));
    let mut out: Vec<VersionRecord> =
        vec![VersionRecord::of(KeyState::Staged, None); versions.len()];
    for i in (0..versions.len()).rev() {
        out[i] = match recorded[i] {
            Some(r) => r.clone(),
            None if !versions[i].has_private_key => VersionRecord::of(KeyState::Retired, None),
            None if certs[i].is_none() => VersionRecord::of(KeyState::Staged, None),
            None if !has_active => {
                has_active = true;
                VersionRecord::of(KeyState::Active, None)
            }
            None => VersionRecord::of(KeyState::Retiring, Some(now + grace.as_secs())),
        };
    }
    // Two recorded actives (a corrupted file): keep the highest, make the others retiring.
    let mut seen_active = false;
    for r in out.iter_mut().rev() {
        if r.state == KeyState::Active {
            if seen_active {
                tracing::error!(
                    "more than one active version recorded; demoting the older to retiring"
                );
                *r = VersionRecord::of(KeyState::Retiring, Some(now + grace.as_secs()));
            }
            seen_active = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::Generate;

    fn found(v: u32, private: bool, cert: bool) -> (TokenKey, Option<CertInfo>) {
        let key = *p256::ecdsa::SigningKey::generate().verifying_key();
        let f = TokenKey {
            key_id: KeyId::new("payroll".parse().unwrap(), v),
            public_key: key,
            has_private_key: private,
            certificate: None,
        };
        // derive_states only looks at presence of a parsed certificate.
        let c = cert.then(|| CertInfo {
            der: vec![],
            serial_hex: String::new(),
            subject: String::new(),
            issuer: String::new(),
            not_before: 0,
            not_after: u64::MAX,
            public_key: Some(key),
            is_ca: false,
            fingerprint_sha256: String::new(),
            san: vec![],
            common_name: None,
            has_san_extension: false,
            allows_digital_signature: true,
            extended_key_usages: vec![],
        });
        (f, c)
    }

    fn states(spec: &[(u32, bool, bool)], recorded: &[(u32, KeyState)]) -> Vec<KeyState> {
        let (fs, cs): (Vec<_>, Vec<_>) = spec.iter().map(|(v, p, c)| found(*v, *p, *c)).unzip();
        let records = recorded
            .iter()
            .map(|(v, s)| (format!("payroll/v{v}"), VersionRecord::of(*s, None)))
            .collect();
        derive_states(&fs, &cs, &records, Duration::from_secs(60), 1000)
            .into_iter()
            .map(|r| r.state)
            .collect()
    }

    #[test]
    fn state_derivation_table() {
        use KeyState::*;
        // (versions in the token: (version, has private key, has certificate), recorded, want)
        type Case<'a> = (
            &'a [(u32, bool, bool)],
            &'a [(u32, KeyState)],
            &'a [KeyState],
        );
        let cases: &[Case<'_>] = &[
            // Token only, one complete version: it is active.
            (&[(1, true, true)], &[], &[Active]),
            // Two complete versions: highest active, older retiring.
            (
                &[(1, true, true), (2, true, true)],
                &[],
                &[Retiring, Active],
            ),
            // Newest has no certificate yet: staged; the older signs.
            (&[(1, true, true), (2, true, false)], &[], &[Active, Staged]),
            // Private key destroyed: retired.
            (
                &[(1, false, true), (2, true, true)],
                &[],
                &[Retired, Active],
            ),
            // Recorded states win over derivation.
            (
                &[(1, true, true), (2, true, true)],
                &[(1, Active), (2, Staged)],
                &[Active, Staged],
            ),
            // A recorded active elsewhere stops derivation from adding a second one.
            (
                &[(1, true, true), (2, true, true)],
                &[(1, Active)],
                &[Active, Retiring],
            ),
            // Two recorded actives: the older is demoted.
            (
                &[(1, true, true), (2, true, true)],
                &[(1, Active), (2, Active)],
                &[Retiring, Active],
            ),
        ];
        for (spec, recorded, want) in cases {
            assert_eq!(&states(spec, recorded), want, "{spec:?} {recorded:?}");
        }
    }
}
