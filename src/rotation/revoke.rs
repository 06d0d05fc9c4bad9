//! Revocation: an operator withdraws a key version for good (`signet keys revoke`).
//!
//! Evidence first: the `key_revoked` entry is durable before anything changes, and from that
//! entry on the log itself refuses every signature made with the version (the signing-order
//! rule, [`crate::audit::order`]), on every replica, before the registry of any of them has
//! caught up. Then the registry records state `revoked` with its [`Revocation`] (the internal
//! CA's CRL and OCSP answers are built from it), and the private key is destroyed in the token
//! (the monitor retries if the token refuses). Revoking the active version leaves the tenant
//! without one (`no-active-key`) unless a rotation to a new version is started at once
//! (`rotate`), which is an emergency rotation: the runbook's default.

use super::*;
use crate::keys::{Revocation, RevocationReason};

/// What an operator asks for.
pub struct Revoke {
    pub key_id: KeyId,
    pub reason: RevocationReason,
    /// When the key is known or suspected to have been compromised (Unix time).
    pub compromised_at: Option<u64>,
    pub actor: Actor,
    pub request_id: Option<String>,
    /// Start a rotation to a new version right after the revocation.
    pub rotate: bool,
}

/// What a revocation did.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub key_id: KeyId,
    pub revocation: Revocation,
    /// The state the version was in.
    pub previous_state: KeyState,
    /// The rotation that gives the tenant a new version: started by this revocation or
    /// already running.
    pub rotation: Option<Rotation>,
    /// Why `rotate` started no rotation.
    pub rotation_error: Option<String>,
}

impl Engine {
    /// Revoke `req.key_id` (see the module documentation).
    pub async fn revoke(&self, req: Revoke) -> Result<Revoked, Error> {
        let tenant = req.key_id.tenant().clone();
        let (revocation, previous_state) = {
            let _op = self.op.lock().await;
            let _lease = self.tenant_lease(&tenant).await?;
            // A revocation whose entry is in the log but whose state was not stored (the store
            // failed after the append) is completed first: revoking again is then refused.
            self.restore_revocations().await?;
            let snap = self.keys.snapshot();
            let v = snap.version(&req.key_id).cloned().ok_or_else(|| {
                Error::Conflict(format!("key {} is not in the registry", req.key_id))
            })?;
            if let Some(r) = &v.revocation {
                return Err(Error::Conflict(format!(
                    "key {} was already revoked on {} ({}, entry {})",
                    req.key_id,
                    crate::clock::rfc3339(r.revoked_at),
                    r.reason.as_str(),
                    r.log_index
                )));
            }
            if let Some(r) = self.in_progress(&tenant)
                && r.to_version == req.key_id.version()
            {
                return Err(Error::Conflict(format!(
                    "key {} is the target of the rotation in progress (step {}); roll it back with `signet rotate rollback --tenant {tenant}` instead",
                    req.key_id,
                    r.state.step().as_str()
                )));
            }
            let now = self.clock.unix();
            let serial = v.certificate.as_ref().map(|c| c.serial_hex.clone());
            let mut e = Entry::new(
                event::KEY_REVOKED,
                crate::clock::rfc3339_micros(self.clock.now()),
                req.actor.clone(),
            );
            e.request_id = req.request_id.clone();
            e.tenant = Some(tenant.to_string());
            e.key_id = Some(req.key_id.to_string());
            e.certificate_serial = serial.clone();
            e.reason = Some(req.reason.as_str().to_owned());
            e.details = Some(serde_json::json!({
                "reason": req.reason.as_str(),
                "compromised_at": req.compromised_at.map(crate::clock::rfc3339),
                "previous_state": v.state.as_str(),
                "rotate": req.rotate,
            }));
            let receipts = self.log.append(vec![e]).await?;
            let log_index = receipts.first().map(|r| r.index).ok_or_else(|| {
                Error::Audit(crate::audit::Error::Inconsistent(
                    "no receipt for the key_revoked entry".into(),
                ))
            })?;
            let revocation = Revocation {
                reason: req.reason,
                revoked_at: now,
                compromised_at: req.compromised_at,
                certificate_serial: serial,
                log_index,
            };
            self.keys.revoke(&req.key_id, revocation.clone()).await?;
            self.metrics
                .revocations
                .with_label_values(&[req.reason.as_str()])
                .inc();
            tracing::warn!(key_id = %req.key_id, reason = req.reason.as_str(), index = log_index, "key version revoked");
            self.destroy_revoked_key(&req.key_id).await;
            (revocation, v.state)
        };
        self.refresh_metrics();
        let mut out = Revoked {
            key_id: req.key_id.clone(),
            revocation,
            previous_state,
            rotation: None,
            rotation_error: None,
        };
        if !req.rotate {
            return Ok(out);
        }
        if previous_state != KeyState::Active {
            out.rotation_error = Some(format!(
                "no rotation started: {} was {}, not the active version",
                req.key_id,
                previous_state.as_str()
            ));
            return Ok(out);
        }
        if let Some(r) = self.in_progress(&tenant) {
            out.rotation = Some(r);
            return Ok(out);
        }
        let start = Start {
            tenant,
            trigger: Trigger::Manual,
            actor: req.actor,
            reason: format!("{} revoked ({})", req.key_id, req.reason.as_str()),
            request_id: req.request_id,
            due_at: None,
            emergency: true,
        };
        match self.rotation_start(start).await {
            Ok(r) => out.rotation = Some(r),
            Err(e) => {
                tracing::error!(key_id = %req.key_id, error = %e, "revoked, but the rotation to a new version did not start");
                out.rotation_error = Some(e.to_string());
            }
        }
        Ok(out)
    }

    /// Make the registry agree with the log: a version the log revoked (a `key_revoked` entry)
    /// whose recorded state says otherwise (key states lost or restored from an older backup)
    /// is revoked again from that entry. Revocation is final: the log wins.
    pub async fn restore_revocations(&self) -> Result<usize, Error> {
        let revoked = self.log.revoked_versions().await?;
        let mut restored = 0;
        for (key_id, index) in revoked {
            let Ok(id) = key_id.parse::<KeyId>() else {
                tracing::error!(%key_id, index, "key_revoked entry with a malformed key ID");
                continue;
            };
            let snap = self.keys.snapshot();
            let Some(v) = snap.version(&id) else { continue };
            if v.state == KeyState::Revoked {
                continue;
            }
            let bytes = self.log.entry(index).await?;
            let e: Entry = serde_json::from_slice(&bytes).map_err(|err| {
                Error::Audit(crate::audit::Error::Inconsistent(format!(
                    "entry {index}: {err}"
                )))
            })?;
            let reason = e
                .reason
                .as_deref()
                .and_then(|r| r.parse::<RevocationReason>().ok())
                .unwrap_or(RevocationReason::KeyCompromise);
            let compromised_at = e
                .details
                .as_ref()
                .and_then(|d| d.get("compromised_at"))
                .and_then(|t| t.as_str())
                .and_then(crate::clock::parse_rfc3339);
            let revocation = Revocation {
                reason,
                revoked_at: crate::clock::parse_rfc3339(&e.time)
                    .unwrap_or_else(|| self.clock.unix()),
                compromised_at,
                certificate_serial: e.certificate_serial.clone(),
                log_index: index,
            };
            tracing::error!(%key_id, index, state = v.state.as_str(), "the key states disagree with the log's key_revoked entry; revoking the version again");
            self.keys.revoke(&id, revocation).await?;
            restored += 1;
        }
        Ok(restored)
    }

    /// Destroy a revoked version's private key; on failure the monitor tries again.
    pub(super) async fn destroy_revoked_key(&self, key_id: &KeyId) {
        match self.token.destroy_private_key(&key_id.to_string()).await {
            Ok(_) => {
                if let Err(e) = self.keys.private_key_destroyed(key_id).await {
                    tracing::error!(%key_id, error = %e, "cannot record the destroyed private key of a revoked version");
                }
            }
            Err(e) => {
                tracing::error!(%key_id, error = %e, "cannot destroy the private key of a revoked version; will retry")
            }
        }
    }
}
