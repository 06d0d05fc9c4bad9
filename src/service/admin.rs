//! Key and certificate administration: create tenant keys, rotate, roll back, CSR and import,
//! and the read-only views (keys, rotation status). Every action needs the `admin` role and a
//! reason, and is recorded in the evidence log with the actor's identity.

use serde::{Deserialize, Serialize};

use super::{App, Caller, Error};
use crate::config::Role;
use crate::domain::TenantId;
use crate::keys::{KeyState, KeyVersion, Revocation, RevocationReason};
use crate::pki;
use crate::policy::Policies;
use crate::rotation::{Revoke, Rotation, Start, Trigger};

const MAX_REASON: usize = 1024;

/// Body of the admin actions that name a tenant.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRequest {
    pub tenant: String,
    #[serde(default)]
    pub reason: Option<String>,
    /// Rotation only: suspected key compromise, no grace for the previous version.
    #[serde(default)]
    pub emergency: bool,
}

/// Body of `POST /v1/admin/certificates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    pub tenant: String,
    /// PEM certificate (a chain is accepted; the first certificate is used).
    pub certificate: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Body of `POST /v1/admin/revocations`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationRequest {
    pub key_id: String,
    /// key-compromise, superseded, cessation-of-operation or affiliation-changed.
    pub reason: String,
    /// RFC 3339: when the key is known or suspected to have been compromised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compromised_at: Option<String>,
    /// Start an emergency rotation to a new version at once (revoking the active version).
    #[serde(default)]
    pub rotate: bool,
}

/// A version's revocation, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevocationView {
    pub reason: String,
    pub revoked_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compromised_at: Option<String>,
    pub certificate_serial: Option<String>,
    /// Index of the `key_revoked` entry in the evidence log.
    pub log_index: u64,
}

impl From<&Revocation> for RevocationView {
    fn from(r: &Revocation) -> Self {
        Self {
            reason: r.reason.as_str().to_owned(),
            revoked_at: crate::clock::rfc3339(r.revoked_at),
            compromised_at: r.compromised_at.map(crate::clock::rfc3339),
            certificate_serial: r.certificate_serial.clone(),
            log_index: r.log_index,
        }
    }
}

/// The answer of `POST /v1/admin/revocations`.
#[derive(Debug, Clone, Serialize)]
pub struct RevocationAnswer {
    pub key_id: String,
    pub state: &'static str,
    pub previous_state: &'static str,
    pub revocation: RevocationView,
    /// The rotation that gives the tenant a new version, if one runs.
    pub rotation: Option<Rotation>,
    /// Why `rotate` started none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_error: Option<String>,
    /// Whether the tenant has an active version now.
    pub tenant_can_sign: bool,
}

/// One key version, as `GET /v1/keys/{tenant}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyView {
    pub key_id: String,
    pub state: String,
    pub public_key: String,
    pub certificate: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub certificate_serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationView>,
}

/// One version in the status table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionView {
    pub key_id: String,
    pub state: String,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub not_after_unix: Option<u64>,
    pub certificate_serial: Option<String>,
    pub renewal_due: bool,
    /// For the active version: may it sign now (validity and min_remaining_validity)?
    pub usable: Option<bool>,
    pub retiring_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationView>,
}

/// A tenant's versions and rotation workflow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantStatus {
    pub tenant: String,
    /// idle, in_progress, awaiting_certificate, retrying or overdue.
    pub rotation_state: String,
    pub versions: Vec<VersionView>,
    pub rotation: Option<Rotation>,
    pub last_rotation: Option<Rotation>,
}

fn reason(r: Option<String>) -> Result<String, Error> {
    let r = r.unwrap_or_default();
    let t = r.trim();
    if t.is_empty() {
        return Err(Error::invalid(
            "reason",
            "every admin action needs a reason (it is recorded as evidence)",
        ));
    }
    if t.len() > MAX_REASON || t.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Error::invalid(
            "reason",
            format!("must be at most {MAX_REASON} characters without control characters"),
        ));
    }
    Ok(t.to_owned())
}

fn tenant(s: &str) -> Result<TenantId, Error> {
    s.parse()
        .map_err(|e: crate::domain::ParseError| Error::invalid("tenant", e.to_string()))
}

fn key_view(v: &KeyVersion) -> KeyView {
    KeyView {
        key_id: v.key_id.to_string(),
        state: v.state.as_str().to_owned(),
        public_key: pki::public_key_pem(&v.public_key),
        certificate: v.certificate_pem.as_ref().map(|p| p.as_str().to_owned()),
        not_before: v
            .certificate
            .as_ref()
            .map(|c| crate::clock::rfc3339(c.not_before)),
        not_after: v
            .certificate
            .as_ref()
            .map(|c| crate::clock::rfc3339(c.not_after)),
        certificate_serial: v.certificate.as_ref().map(|c| c.serial_hex.clone()),
        revocation: v.revocation.as_deref().map(RevocationView::from),
    }
}

impl App {
    /// `GET /v1/keys/{tenant}`: every version with its public key and certificate.
    pub fn keys_of(&self, caller: &Caller, tenant_raw: &str) -> Result<Vec<KeyView>, Error> {
        let t = tenant(tenant_raw).map_err(|_| {
            Error::NotFound(format!(
                "unknown tenant `{}`",
                tenant_raw.chars().take(64).collect::<String>()
            ))
        })?;
        if !Policies::may_read_tenant(&caller.client, &t) {
            return Err(Error::Forbidden(format!(
                "client `{}` may not read keys of tenant `{t}`",
                caller.identity.identity
            )));
        }
        if !self.tenant_exists(&t) {
            return Err(Error::NotFound(format!("unknown tenant `{t}`")));
        }
        Ok(self
            .keys
            .snapshot()
            .tenant(&t)
            .iter()
            .map(|v| key_view(v))
            .collect())
    }

    /// Every tenant's versions (admin and audit roles).
    pub fn all_keys(&self, caller: &Caller) -> Result<Vec<KeyView>, Error> {
        if !Policies::may_read_all_evidence(&caller.client) {
            return Err(Error::Forbidden(format!(
                "client `{}` needs the admin or audit role",
                caller.identity.identity
            )));
        }
        Ok(self.keys.snapshot().all().map(|v| key_view(v)).collect())
    }

    /// Create a tenant's first key (and, with `hsm-ca`, its certificate).
    pub async fn admin_create_key(
        &self,
        caller: &Caller,
        req: AdminRequest,
    ) -> Result<Rotation, Error> {
        self.admin_start(caller, req, Trigger::Initial).await
    }

    /// Start a rotation now (`emergency`: no grace for the previous version).
    pub async fn admin_rotate(
        &self,
        caller: &Caller,
        req: AdminRequest,
    ) -> Result<Rotation, Error> {
        self.admin_start(caller, req, Trigger::Manual).await
    }

    async fn admin_start(
        &self,
        caller: &Caller,
        req: AdminRequest,
        trigger: Trigger,
    ) -> Result<Rotation, Error> {
        caller.require(Role::Admin)?;
        let start = Start {
            tenant: tenant(&req.tenant)?,
            trigger,
            actor: caller.actor(),
            reason: reason(req.reason)?,
            request_id: Some(caller.request_id.clone()),
            due_at: None,
            emergency: req.emergency && trigger == Trigger::Manual,
        };
        Ok(self.rotation.rotation_start(start).await?)
    }

    /// Revoke a key version (`POST /v1/admin/revocations`).
    pub async fn admin_revoke(
        &self,
        caller: &Caller,
        req: RevocationRequest,
    ) -> Result<RevocationAnswer, Error> {
        caller.require(Role::Admin)?;
        let key_id: crate::domain::KeyId = req
            .key_id
            .parse()
            .map_err(|e: crate::domain::ParseError| Error::invalid("key_id", e.to_string()))?;
        let reason: RevocationReason = req
            .reason
            .parse()
            .map_err(|e: String| Error::invalid("reason", e))?;
        let now = self.clock.unix();
        let compromised_at = req
            .compromised_at
            .as_deref()
            .map(|t| {
                let at = crate::clock::parse_rfc3339(t)
                    .ok_or_else(|| Error::invalid("compromised_at", "must be an RFC 3339 time"))?;
                if at > now + 60 {
                    return Err(Error::invalid(
                        "compromised_at",
                        "is in the future; a compromise is reported after it happened",
                    ));
                }
                Ok(at)
            })
            .transpose()?;
        if self.keys.snapshot().version(&key_id).is_none() {
            return Err(Error::NotFound(format!("key {key_id} not found")));
        }
        let done = self
            .rotation
            .revoke(Revoke {
                key_id,
                reason,
                compromised_at,
                actor: caller.actor(),
                request_id: Some(caller.request_id.clone()),
                rotate: req.rotate,
            })
            .await?;
        self.pki.wake();
        let tenant_can_sign = self.keys.snapshot().active(done.key_id.tenant()).is_some();
        Ok(RevocationAnswer {
            key_id: done.key_id.to_string(),
            state: KeyState::Revoked.as_str(),
            previous_state: done.previous_state.as_str(),
            revocation: RevocationView::from(&done.revocation),
            rotation: done.rotation,
            rotation_error: done.rotation_error,
            tenant_can_sign,
        })
    }

    pub async fn admin_rollback(
        &self,
        caller: &Caller,
        req: AdminRequest,
    ) -> Result<Rotation, Error> {
        caller.require(Role::Admin)?;
        let t = tenant(&req.tenant)?;
        let reason = reason(req.reason)?;
        Ok(self
            .rotation
            .rotation_rollback(&t, &caller.actor(), reason, Some(caller.request_id.clone()))
            .await?)
    }

    /// The PEM CSR of the tenant's pending rotation (starting one with the manual issuer).
    pub async fn admin_csr(&self, caller: &Caller, req: AdminRequest) -> Result<String, Error> {
        caller.require(Role::Admin)?;
        let t = tenant(&req.tenant)?;
        let reason = req
            .reason
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| "certificate request".to_owned());
        let reason = self::reason(Some(reason))?;
        Ok(self
            .rotation
            .rotation_csr(&t, &caller.actor(), reason, Some(caller.request_id.clone()))
            .await?)
    }

    pub async fn admin_import(
        &self,
        caller: &Caller,
        req: ImportRequest,
    ) -> Result<Rotation, Error> {
        caller.require(Role::Admin)?;
        let t = tenant(&req.tenant)?;
        let reason = req.reason.map(|r| self::reason(Some(r))).transpose()?;
        Ok(self
            .rotation
            .rotation_import(
                &t,
                req.certificate.as_bytes(),
                &caller.actor(),
                reason,
                Some(caller.request_id.clone()),
            )
            .await?)
    }

    /// Rotation status of every tenant (admin and audit roles).
    pub fn status(&self, caller: &Caller) -> Result<Vec<TenantStatus>, Error> {
        if !Policies::may_read_all_evidence(&caller.client) {
            return Err(Error::Forbidden(format!(
                "client `{}` needs the admin or audit role",
                caller.identity.identity
            )));
        }
        let now = self.clock.unix();
        let cfg = self.dynamic.load().rotation.clone();
        let snap = self.keys.snapshot();
        let mut tenants: std::collections::BTreeSet<TenantId> =
            snap.tenants().map(|(t, _)| t.clone()).collect();
        tenants.extend(self.dynamic.load().tenants());
        Ok(tenants
            .into_iter()
            .map(|t| {
                let rotation = self.rotation.in_progress(&t);
                let rotation_state = rotation
                    .as_ref()
                    .map(|r| r.state_label(now, cfg.overdue_after))
                    .unwrap_or("idle")
                    .to_owned();
                let versions = snap
                    .tenant(&t)
                    .iter()
                    .map(|v| {
                        let c = v.certificate.as_ref();
                        let active = v.state == crate::keys::KeyState::Active;
                        VersionView {
                            key_id: v.key_id.to_string(),
                            state: v.state.as_str().to_owned(),
                            not_before: c.map(|c| crate::clock::rfc3339(c.not_before)),
                            not_after: c.map(|c| crate::clock::rfc3339(c.not_after)),
                            not_after_unix: c.map(|c| c.not_after),
                            certificate_serial: c.map(|c| c.serial_hex.clone()),
                            renewal_due: active
                                && c.is_some_and(|c| {
                                    now + cfg.renew_before.as_secs() >= c.not_after
                                }),
                            usable: active.then(|| {
                                c.is_some_and(|c| {
                                    c.check_usable(now, cfg.min_remaining_validity).is_ok()
                                })
                            }),
                            retiring_until: v.retiring_until.map(crate::clock::rfc3339),
                            revocation: v.revocation.as_deref().map(RevocationView::from),
                        }
                    })
                    .collect();
                let last_rotation = self.rotation.history(&t).pop();
                TenantStatus {
                    tenant: t.to_string(),
                    rotation_state,
                    versions,
                    rotation,
                    last_rotation,
                }
            })
            .collect())
    }
}
