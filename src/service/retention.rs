//! Retention, legal holds and erasure of signer evidence: sealing a request's `signer` into
//! the vault, showing it (checked against the entry's commitment), the retention sweep, a
//! data subject's erasure, legal holds, and the vault's key rotation. Every erasure, hold and
//! rotation is an evidence entry first.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{App, Caller, Error};
use crate::audit::{Actor, Entry, entry::event};
use crate::config::Role;
use crate::vault::{self, Erasure, Hold, Release, Row, SignerEvidence};

const MAX_REASON: usize = 1024;
const MAX_SUBJECT: usize = 320;
/// Records erased per `evidence_erased` entry by the sweep.
const SWEEP_BATCH: usize = 1000;

/// `POST /v1/admin/erasures`: erase a data subject's signer evidence.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasureRequest {
    /// An identifier in one of `[retention] subject_fields` (e.g. an email address or ID).
    pub subject: String,
    pub reason: String,
    /// Erase records still within their retention too (a lawful erasure request that
    /// outweighs the retention duty; the reason must say why).
    #[serde(default)]
    pub override_retention: bool,
}

/// What an erasure did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErasureAnswer {
    /// Records of the subject found (sealed).
    pub found: usize,
    pub erased: u64,
    /// Erased entry indexes as inclusive ranges.
    pub ranges: Vec<[u64; 2]>,
    /// The `evidence_erased` entry, if anything was erased.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<u64>,
    /// Records left because their retention has not ended (without `override_retention`).
    pub within_retention: Vec<u64>,
    /// Records left because a legal hold covers them.
    pub on_hold: Vec<u64>,
}

/// `POST /v1/admin/holds`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    #[serde(default)]
    pub transaction_id: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    /// RFC 3339; with `tenant` only.
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    pub reason: String,
}

/// `POST /v1/admin/holds/{id}/release`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub reason: String,
}

/// `POST /v1/admin/vault/rotations`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultRotationRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// What a vault key rotation did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaultRotationAnswer {
    pub from_generation: u32,
    pub to_generation: u32,
    /// Live data keys re-wrapped under the new generation.
    pub rewrapped: u64,
    /// Generations destroyed in the token.
    pub destroyed: Vec<u32>,
    /// The `vault_key_rotated` entry.
    pub entry: u64,
}

/// What one sweep did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SweepAnswer {
    pub erased: u64,
    /// The `evidence_erased` entries written.
    pub entries: Vec<u64>,
    /// Records past retention left because a legal hold covers them.
    pub on_hold: u64,
}

/// The actor of the service's own retention actions.
fn retention_actor() -> Actor {
    Actor {
        identity: "signet/retention".into(),
        subject: String::new(),
        san: vec![],
        fingerprint_sha256: String::new(),
    }
}

fn check_reason(reason: &str) -> Result<(), Error> {
    if reason.trim().is_empty() || reason.len() > MAX_REASON || reason.chars().any(char::is_control)
    {
        return Err(Error::invalid(
            "reason",
            format!("must be 1-{MAX_REASON} characters without control characters"),
        ));
    }
    Ok(())
}

/// Sorted indexes as inclusive ranges.
pub fn ranges(indexes: &[u64]) -> Vec<[u64; 2]> {
    let mut sorted = indexes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<[u64; 2]> = Vec::new();
    for i in sorted {
        match out.last_mut() {
            Some(r) if r[1] + 1 == i => r[1] = i,
            _ => out.push([i, i]),
        }
    }
    out
}

impl App {
    /// Seal a request's signer evidence for its entry: the commitment and the vault record,
    /// retained under the policy's rule from `now_us`.
    pub(super) async fn seal_signer(
        &self,
        signer: &serde_json::Value,
        policy: &crate::config::PolicyConfig,
        transaction_id: Option<String>,
        now_us: i64,
    ) -> Result<(String, Box<Row>, vault::InFlight), Error> {
        let ctx = vault::Context {
            tenant: policy.tenant.to_string(),
            transaction_id,
            time_us: now_us,
            retain_until_us: retain_until_us(policy, now_us),
            retention_class: policy.retention_class.clone(),
        };
        Ok(self.vault.seal(signer, &ctx).await?)
    }

    /// The signer evidence of a format-2 entry that commits to some, read from the vault
    /// and checked against the commitment; `None` for entries without.
    pub(super) async fn signer_evidence(
        &self,
        entry: &serde_json::Value,
    ) -> Option<SignerEvidence> {
        let commitment = entry["signer_commitment"].as_str()?;
        let index = entry["index"].as_u64()?;
        Some(match self.vault.read(index, commitment).await {
            Ok(r) => r.into(),
            Err(e) => {
                tracing::warn!(index, error = %e, "cannot read signer evidence from the vault");
                SignerEvidence::Unreadable {
                    detail: "the vault is unavailable; retry later".into(),
                }
            }
        })
    }

    /// `signet evidence erase`: erase a data subject's signer evidence whose retention has
    /// ended (or all of it with `override_retention`), except what a legal hold covers.
    pub async fn admin_erase(
        &self,
        caller: &Caller,
        req: ErasureRequest,
    ) -> Result<ErasureAnswer, Error> {
        caller.require(Role::Admin)?;
        check_reason(&req.reason)?;
        let subject = req.subject.trim();
        if subject.is_empty() || subject.len() > MAX_SUBJECT {
            return Err(Error::invalid(
                "subject",
                format!("must be 1-{MAX_SUBJECT} characters (an email address or ID)"),
            ));
        }
        let rows = self.vault.subject_rows(subject).await?;
        if rows.is_empty() {
            return Err(Error::NotFound(format!(
                "no signer evidence of this subject is held (fields searched: {})",
                self.config.retention.subject_fields.join(", ")
            )));
        }
        let holds = self.vault.active_holds().await?;
        let now_us = now_us(self);
        let (mut eligible, mut within, mut on_hold) = (Vec::new(), Vec::new(), Vec::new());
        let mut latest_until: Option<i64> = None;
        let mut unlimited = false;
        for r in &rows {
            if holds.iter().any(|h| h.covers(r)) {
                on_hold.push(r.index);
            } else if !req.override_retention && r.retain_until_us.is_none_or(|u| u > now_us) {
                within.push(r.index);
                match r.retain_until_us {
                    None => unlimited = true,
                    Some(u) => latest_until = latest_until.max(Some(u)),
                }
            } else {
                eligible.push(r.index);
            }
        }
        if eligible.is_empty() {
            if !within.is_empty() {
                let until = if unlimited {
                    "without limit (the policy sets no retention)".to_owned()
                } else {
                    format!(
                        "until {}",
                        latest_until.map_or_else(String::new, crate::clock::rfc3339_from_micros)
                    )
                };
                return Err(Error::RetentionInForce(format!(
                    "{} record(s) of this subject are within their retention period, {until}{}; \
                     erase them before with --override-retention (override_retention) and a reason that says why the erasure is lawful",
                    within.len(),
                    if on_hold.is_empty() {
                        String::new()
                    } else {
                        format!(", and {} more are on legal hold", on_hold.len())
                    }
                )));
            }
            return Err(Error::LegalHold(format!(
                "all {} record(s) of this subject are on legal hold; release the hold first (signet holds list)",
                on_hold.len()
            )));
        }
        let cause = "subject";
        let reason = if req.override_retention {
            format!("{} (retention overridden)", req.reason.trim())
        } else {
            req.reason.trim().to_owned()
        };
        let (erased, entry) = self
            .erase_records(
                caller.actor(),
                Some(&caller.request_id),
                &eligible,
                cause,
                &reason,
            )
            .await?;
        tracing::info!(request_id = %caller.request_id, erased, entry, "signer evidence of a data subject erased");
        Ok(ErasureAnswer {
            found: rows.len(),
            erased,
            ranges: ranges(&eligible),
            entry: Some(entry),
            within_retention: within,
            on_hold,
        })
    }

    /// Evidence first (`evidence_erased`), then the erasure in the vault.
    async fn erase_records(
        &self,
        actor: Actor,
        request_id: Option<&str>,
        indexes: &[u64],
        cause: &str,
        reason: &str,
    ) -> Result<(u64, u64), Error> {
        let mut e = Entry::new(
            event::EVIDENCE_ERASED,
            crate::clock::rfc3339_micros(self.clock.now()),
            actor,
        );
        e.request_id = request_id.map(str::to_owned);
        e.reason = Some(reason.to_owned());
        e.details = Some(serde_json::json!({
            "cause": cause,
            "records": indexes.len(),
            "ranges": ranges(indexes),
        }));
        let index = self.append_one(e).await?;
        let erasure = Erasure {
            erased_at: crate::clock::rfc3339(self.clock.unix()),
            cause: cause.to_owned(),
            reason: reason.to_owned(),
            entry: index,
        };
        let erased = self
            .vault
            .store()
            .erase(indexes, &erasure)
            .await
            .map_err(vault::Error::from)?;
        self.metrics
            .evidence_erased
            .with_label_values(&[cause])
            .inc_by(erased);
        Ok((erased, index))
    }

    /// One retention sweep: erase the signer evidence of every record past its retention
    /// that no legal hold covers, a batch per `evidence_erased` entry.
    pub async fn sweep(&self) -> Result<SweepAnswer, Error> {
        let now_us = now_us(self);
        let holds = self.vault.active_holds().await?;
        let mut answer = SweepAnswer::default();
        let mut after = None;
        let mut oldest_unheld: Option<i64> = None;
        loop {
            let page = self
                .vault
                .store()
                .due(now_us, after, SWEEP_BATCH)
                .await
                .map_err(vault::Error::from)?;
            let Some(last) = page.last() else { break };
            after = Some(last.index);
            let mut batch = Vec::new();
            for r in &page {
                if holds.iter().any(|h| h.covers(r)) {
                    answer.on_hold += 1;
                } else {
                    batch.push(r.index);
                    oldest_unheld = oldest_unheld.min(r.retain_until_us).or(r.retain_until_us);
                }
            }
            if let Some(oldest) = oldest_unheld {
                self.metrics
                    .retention_sweep_lag
                    .set((now_us - oldest).max(0) / 1_000_000);
            }
            if batch.is_empty() {
                continue;
            }
            let (erased, entry) = self
                .erase_records(
                    retention_actor(),
                    None,
                    &batch,
                    "retention",
                    "retention period ended",
                )
                .await?;
            answer.erased += erased;
            answer.entries.push(entry);
        }
        self.metrics.retention_sweep_lag.set(0);
        self.metrics
            .retention_last_sweep
            .set(self.clock.unix() as i64);
        if answer.erased > 0 {
            tracing::info!(
                erased = answer.erased,
                on_hold = answer.on_hold,
                "retention sweep erased signer evidence"
            );
        }
        self.update_vault_metrics().await;
        Ok(answer)
    }

    /// `POST /v1/admin/evidence/sweep`: run the retention sweep now.
    pub async fn admin_sweep(&self, caller: &Caller) -> Result<SweepAnswer, Error> {
        caller.require(Role::Admin)?;
        self.sweep().await
    }

    /// `signet holds add`: place a legal hold (evidence first).
    pub async fn admin_hold(&self, caller: &Caller, req: HoldRequest) -> Result<Hold, Error> {
        caller.require(Role::Admin)?;
        check_reason(&req.reason)?;
        let time = |field: &'static str, v: &Option<String>| -> Result<Option<String>, Error> {
            v.as_deref()
                .map(|t| {
                    crate::clock::parse_rfc3339_micros(t)
                        .map(crate::clock::rfc3339_from_micros)
                        .ok_or_else(|| Error::invalid(field, "must be an RFC 3339 time"))
                })
                .transpose()
        };
        let (since, until) = (time("since", &req.since)?, time("until", &req.until)?);
        match (&req.transaction_id, &req.tenant) {
            (Some(t), None) => {
                if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) {
                    return Err(Error::invalid(
                        "transaction_id",
                        "must be 1-256 characters without control characters",
                    ));
                }
                if since.is_some() || until.is_some() {
                    return Err(Error::invalid(
                        "since",
                        "since and until go with a tenant hold, not a transaction hold",
                    ));
                }
            }
            (None, Some(t)) => {
                let tenant: crate::domain::TenantId =
                    t.parse().map_err(|e: crate::domain::ParseError| {
                        Error::invalid("tenant", e.to_string())
                    })?;
                if self.keys.snapshot().tenant(&tenant).is_empty()
                    && !self
                        .dynamic
                        .load()
                        .policies
                        .iter()
                        .any(|p| p.tenant == tenant)
                {
                    return Err(Error::NotFound(format!("tenant {tenant} is not known")));
                }
                if let (Some(s), Some(u)) = (&since, &until)
                    && crate::clock::parse_rfc3339_micros(s)
                        >= crate::clock::parse_rfc3339_micros(u)
                {
                    return Err(Error::invalid("until", "must be after since"));
                }
            }
            _ => {
                return Err(Error::invalid(
                    "transaction_id",
                    "give exactly one of transaction_id or tenant",
                ));
            }
        }
        let id = format!("hold-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let now = crate::clock::rfc3339(self.clock.unix());
        let mut e = Entry::new(
            event::LEGAL_HOLD_PLACED,
            crate::clock::rfc3339_micros(self.clock.now()),
            caller.actor(),
        );
        e.request_id = Some(caller.request_id.clone());
        e.tenant = req.tenant.clone();
        e.transaction_id = req.transaction_id.clone();
        e.reason = Some(req.reason.trim().to_owned());
        e.details = Some(serde_json::json!({
            "hold_id": id, "since": since, "until": until,
        }));
        let placed_entry = self.append_one(e).await?;
        let hold = Hold {
            id,
            transaction_id: req.transaction_id,
            tenant: req.tenant,
            since,
            until,
            reason: req.reason.trim().to_owned(),
            placed_by: caller.identity.identity.clone(),
            placed_at: now,
            placed_entry,
            released: None,
        };
        self.vault
            .holds()
            .put(&hold)
            .await
            .map_err(vault::Error::from)?;
        tracing::info!(request_id = %caller.request_id, hold_id = %hold.id, "legal hold placed");
        self.update_vault_metrics().await;
        Ok(hold)
    }

    /// `signet holds list`: every hold, active and released.
    pub async fn holds(&self, caller: &Caller) -> Result<Vec<Hold>, Error> {
        caller.require(Role::Admin)?;
        Ok(self
            .vault
            .holds()
            .list()
            .await
            .map_err(vault::Error::from)?)
    }

    /// `signet holds release`: end a legal hold (evidence first).
    pub async fn admin_release_hold(
        &self,
        caller: &Caller,
        id: &str,
        req: ReleaseRequest,
    ) -> Result<Hold, Error> {
        caller.require(Role::Admin)?;
        check_reason(&req.reason)?;
        let mut hold = self
            .vault
            .holds()
            .list()
            .await
            .map_err(vault::Error::from)?
            .into_iter()
            .find(|h| h.id == id)
            .ok_or_else(|| Error::NotFound(format!("no legal hold {id}")))?;
        if let Some(r) = &hold.released {
            return Err(Error::Conflict(format!(
                "legal hold {id} was released on {} (entry {})",
                r.released_at, r.entry
            )));
        }
        let mut e = Entry::new(
            event::LEGAL_HOLD_RELEASED,
            crate::clock::rfc3339_micros(self.clock.now()),
            caller.actor(),
        );
        e.request_id = Some(caller.request_id.clone());
        e.tenant = hold.tenant.clone();
        e.transaction_id = hold.transaction_id.clone();
        e.reason = Some(req.reason.trim().to_owned());
        e.details = Some(serde_json::json!({
            "hold_id": hold.id, "placed_entry": hold.placed_entry,
        }));
        let entry = self.append_one(e).await?;
        hold.released = Some(Release {
            released_by: caller.identity.identity.clone(),
            released_at: crate::clock::rfc3339(self.clock.unix()),
            reason: req.reason.trim().to_owned(),
            entry,
        });
        self.vault
            .holds()
            .put(&hold)
            .await
            .map_err(vault::Error::from)?;
        tracing::info!(request_id = %caller.request_id, hold_id = %hold.id, "legal hold released");
        self.update_vault_metrics().await;
        Ok(hold)
    }

    /// `signet evidence rotate-key`: rotate the vault's key-encryption key now: a new
    /// generation, every live data key re-wrapped, the old generation destroyed in the token.
    pub async fn admin_rotate_vault_key(
        &self,
        caller: &Caller,
        req: VaultRotationRequest,
    ) -> Result<VaultRotationAnswer, Error> {
        caller.require(Role::Admin)?;
        let reason = req
            .reason
            .unwrap_or_else(|| "vault key rotation on request".into());
        check_reason(&reason)?;
        self.rotate_vault_key(caller.actor(), Some(&caller.request_id), &reason)
            .await
    }

    async fn rotate_vault_key(
        &self,
        actor: Actor,
        request_id: Option<&str>,
        reason: &str,
    ) -> Result<VaultRotationAnswer, Error> {
        let _lease = self.rotation_lease("vault-key").await?;
        let now = crate::clock::rfc3339(self.clock.unix());
        let (from, to) = self.vault.begin_rotation(&now).await?;
        let (destroyed, rewrapped) = self.finish_vault_rotation().await?.unwrap_or_default();
        let entry = self
            .record_vault_rotation(actor, request_id, reason, from, to, &destroyed, rewrapped)
            .await?;
        self.update_vault_metrics().await;
        Ok(VaultRotationAnswer {
            from_generation: from,
            to_generation: to,
            rewrapped,
            destroyed,
            entry,
        })
    }

    /// Re-wrap and destroy, once the records sealed under the old generation are written:
    /// this process's are counted; other replicas' are given [`vault::SETTLE`] to read the new
    /// generation and write what they sealed before.
    async fn finish_vault_rotation(&self) -> Result<Option<(Vec<u32>, u64)>, Error> {
        let settle = if self.replicas.shared() {
            tokio::time::sleep(vault::SETTLE).await;
            vault::SETTLE
        } else {
            Duration::ZERO
        };
        let current = self.vault.meta().await?.generation;
        self.vault.quiesce(current, Duration::from_secs(60)).await;
        Ok(self.vault.finish_rotation(settle).await?)
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_vault_rotation(
        &self,
        actor: Actor,
        request_id: Option<&str>,
        reason: &str,
        from: u32,
        to: u32,
        destroyed: &[u32],
        rewrapped: u64,
    ) -> Result<u64, Error> {
        let mut e = Entry::new(
            event::VAULT_KEY_ROTATED,
            crate::clock::rfc3339_micros(self.clock.now()),
            actor,
        );
        e.request_id = request_id.map(str::to_owned);
        e.reason = Some(reason.to_owned());
        e.details = Some(serde_json::json!({
            "from_generation": from,
            "to_generation": to,
            "destroyed_generations": destroyed,
            "rewrapped": rewrapped,
        }));
        tracing::info!(
            from,
            to,
            rewrapped,
            "vault key-encryption key rotated; old generation destroyed"
        );
        self.append_one(e).await
    }

    async fn append_one(&self, e: Entry) -> Result<u64, Error> {
        self.log
            .append(vec![e])
            .await?
            .pop()
            .map(|r| r.index)
            .ok_or_else(|| Error::Internal("no receipt".into()))
    }

    async fn rotation_lease(&self, name: &str) -> Result<crate::storage::LeaseGuard, Error> {
        self.leases
            .lock(name)
            .await
            .map_err(|e| Error::Vault(vault::Error::Storage(e)))
    }

    /// Gauges of the vault: records by state, holds, the key generation and its age.
    pub(super) async fn update_vault_metrics(&self) {
        if let Ok((sealed, erased)) = self.vault.store().counts().await {
            self.metrics
                .vault_records
                .with_label_values(&["sealed"])
                .set(sealed as i64);
            self.metrics
                .vault_records
                .with_label_values(&["erased"])
                .set(erased as i64);
        }
        if let Ok(holds) = self.vault.active_holds().await {
            self.metrics.legal_holds.set(holds.len() as i64);
        }
        if let Ok(meta) = self.vault.meta().await {
            self.metrics
                .vault_key_generation
                .set(i64::from(meta.generation));
            if let Some(t) = crate::clock::parse_rfc3339(&meta.rotated_at) {
                self.metrics.vault_key_rotated.set(t as i64);
            }
        }
    }

    /// The retention task (the leader only, with several replicas): the sweep every
    /// `sweep_interval`, the vault key rotation when `key_rotation_interval` has passed, and
    /// the completion of a rotation a crash interrupted.
    pub(super) async fn retention_loop(
        self: std::sync::Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let cfg = self.config.retention.clone();
        let mut tick = tokio::time::interval(cfg.sweep_interval.min(Duration::from_secs(60)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep: Option<std::time::Instant> = None;
        self.update_vault_metrics().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if !self.replicas.is_leader() {
                continue;
            }
            if let Err(e) = self.vault_key_schedule().await {
                tracing::warn!(error = %e, "vault key rotation failed; retried at the next tick");
            }
            if last_sweep.is_some_and(|t| t.elapsed() < cfg.sweep_interval) {
                continue;
            }
            last_sweep = Some(std::time::Instant::now());
            if let Err(e) = self.sweep().await {
                self.metrics.retention_sweep_errors.inc();
                tracing::warn!(error = %e, "retention sweep failed; retried at the next interval");
            }
        }
    }

    /// Finish an interrupted rotation, or rotate when the key is older than the schedule.
    async fn vault_key_schedule(&self) -> Result<(), Error> {
        let meta = self.vault.meta().await?;
        if !meta.retiring.is_empty() {
            let _lease = self.rotation_lease("vault-key").await?;
            let meta = self.vault.meta().await?;
            if let Some((destroyed, rewrapped)) = self.finish_vault_rotation().await? {
                let from = meta.retiring.iter().copied().max().unwrap_or(0);
                self.record_vault_rotation(
                    crate::rotation::scheduler_actor(),
                    None,
                    "an interrupted vault key rotation completed",
                    from,
                    meta.generation,
                    &destroyed,
                    rewrapped,
                )
                .await?;
            }
            return Ok(());
        }
        let rotated = crate::clock::parse_rfc3339(&meta.rotated_at).unwrap_or(0);
        let due = rotated.saturating_add(self.config.retention.key_rotation_interval.as_secs());
        if self.clock.unix() >= due {
            self.rotate_vault_key(
                crate::rotation::scheduler_actor(),
                None,
                "scheduled vault key rotation ([retention] key_rotation_interval)",
            )
            .await?;
        }
        Ok(())
    }
}

/// When the policy's retention ends for a signature at `now_us`.
pub(super) fn retain_until_us(policy: &crate::config::PolicyConfig, now_us: i64) -> Option<i64> {
    policy
        .retention
        .map(|r| now_us.saturating_add(i64::try_from(r.as_micros()).unwrap_or(i64::MAX)))
}

fn now_us(app: &App) -> i64 {
    crate::clock::micros(app.clock.now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_fold_into_inclusive_ranges() {
        assert_eq!(ranges(&[]), Vec::<[u64; 2]>::new());
        assert_eq!(
            ranges(&[5, 3, 4, 9, 11, 10, 1]),
            vec![[1, 1], [3, 5], [9, 11]]
        );
    }
}
