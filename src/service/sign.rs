//! Signing, batch signing and verification.
//!
//! The hot path: validate → authorise (client, policy, tenant) → rate limit → pick the
//! tenant's active key (certificate usable) → sign in the token → append the evidence entry
//! and wait until it is durable → answer. The answer is built from the entry itself, so a
//! replay of an idempotent request is byte-identical to the first answer.

use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::DerSignature;
use serde::{Deserialize, Serialize};
use signature::hazmat::PrehashVerifier;

use super::idempotency::{self, Begin, Fresh, Record};
use super::{App, Caller, Error};
use crate::audit::entry::{self, DigestEvidence, Entry, PolicyEvidence, event};
use crate::audit::{Receipt, merkle};
use crate::domain::TenantId;
use crate::domain::{
    DigestAlgorithm, JsonText, KeyId, PolicyId, SIGNATURE_ALGORITHM, Sha256Digest,
};
use crate::hsm::fair::Share;
use crate::keys::KeyVersion;
use crate::policy::{Policies, Policy};
use crate::storage::Claim;
use crate::vault::Row;

const MAX_TRANSACTION_ID: usize = 256;
const MAX_SIGNER_BYTES: usize = 8 * 1024;
const MAX_SIGNER_DEPTH: usize = 5;
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// How often a signature is made again when the log says a rotation replaced its version.
const MAX_RESIGN: u32 = 3;

/// `POST /v1/sign` body (and one item of a batch).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    pub policy_id: String,
    pub digest: String,
    pub digest_algorithm: String,
    #[serde(default)]
    pub transaction_id: Option<String>,
    #[serde(default)]
    pub signer: Option<serde_json::Value>,
    /// Batch items only; single requests use the `Idempotency-Key` header.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `POST /v1/sign/batch` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub items: Vec<SignRequest>,
}

/// The answer to a signing request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignResponse {
    /// Base64 DER `ECDSA-Sig-Value` over the digest.
    pub signature: String,
    pub algorithm: String,
    pub key_id: String,
    /// PEM of the signing certificate.
    pub certificate: JsonText,
    pub signed_at: String,
    pub receipt: Receipt,
}

/// `POST /v1/verify` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub key_id: String,
    pub digest: String,
    pub signature: String,
    #[serde(default = "default_algorithm")]
    pub digest_algorithm: String,
}

fn default_algorithm() -> String {
    "sha256".to_owned()
}

/// The answer of `POST /v1/verify`: whether the signature verifies with the version's key,
/// and the version's state (a revoked version's earlier signatures still verify; the answer
/// says it was revoked, when and why).
#[derive(Debug, Serialize)]
pub struct VerifyAnswer {
    pub valid: bool,
    pub key_state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation: Option<super::RevocationView>,
}

/// A request that passed the shape checks.
struct Valid {
    policy_id: PolicyId,
    algorithm: DigestAlgorithm,
    digest: Sha256Digest,
    transaction_id: Option<String>,
    signer: Option<serde_json::Value>,
}

impl Valid {
    /// SHA-256 of the canonical request: same request ⇔ same hash. The signer enters as its
    /// keyed hash (`signer_hash`), so the recorded hash cannot test guesses of the signer.
    fn request_sha256(&self, signer_hash: Option<String>) -> String {
        let v = serde_json::json!({
            "policy_id": self.policy_id.as_str(),
            "digest_algorithm": self.algorithm.as_str(),
            "digest": self.digest.to_hex(),
            "transaction_id": self.transaction_id,
            "signer_hmac": signer_hash,
        });
        hex::encode(crate::sha256::sha256(
            serde_json_canonicalizer::to_vec(&v).unwrap_or_default(),
        ))
    }
}

fn validate(req: &SignRequest) -> Result<Valid, Error> {
    let algorithm = req
        .digest_algorithm
        .parse::<DigestAlgorithm>()
        .map_err(|_| {
            Error::invalid(
                "digest_algorithm",
                format!(
                    "unknown digest algorithm `{}` (supported: sha256)",
                    truncate(&req.digest_algorithm)
                ),
            )
        })?;
    let digest = req
        .digest
        .parse::<Sha256Digest>()
        .map_err(|e| Error::invalid("digest", e.to_string()))?;
    let policy_id = req.policy_id.parse::<PolicyId>().map_err(|_| {
        Error::Policy(crate::policy::Error::UnknownPolicy(unknown_policy_id(
            &req.policy_id,
        )))
    })?;
    if let Some(t) = &req.transaction_id
        && (t.is_empty() || t.len() > MAX_TRANSACTION_ID || t.chars().any(char::is_control))
    {
        return Err(Error::invalid(
            "transaction_id",
            format!("must be 1-{MAX_TRANSACTION_ID} characters without control characters"),
        ));
    }
    if let Some(s) = &req.signer {
        if !s.is_object() {
            return Err(Error::invalid("signer", "must be a JSON object"));
        }
        if depth(s) > MAX_SIGNER_DEPTH {
            return Err(Error::invalid(
                "signer",
                format!("nests deeper than {MAX_SIGNER_DEPTH} levels"),
            ));
        }
        let size = serde_json::to_vec(s).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > MAX_SIGNER_BYTES {
            return Err(Error::invalid(
                "signer",
                format!("is {size} bytes; at most {MAX_SIGNER_BYTES} are recorded"),
            ));
        }
        if !entry::is_jcs_stable(s) {
            return Err(Error::invalid(
                "signer",
                "holds numbers that cannot be recorded exactly (use strings for large or precise numbers)",
            ));
        }
    }
    Ok(Valid {
        policy_id,
        algorithm,
        digest,
        transaction_id: req.transaction_id.clone(),
        signer: req.signer.clone(),
    })
}

/// An unparseable policy ID, sanitised and bounded for the error message.
fn unknown_policy_id(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.:".contains(*c))
        .take(64)
        .collect()
}

fn validate_idempotency_key(k: &str) -> Result<(), Error> {
    if k.is_empty()
        || k.len() > MAX_IDEMPOTENCY_KEY
        || !k.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        return Err(Error::invalid(
            "Idempotency-Key",
            format!("must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        ));
    }
    Ok(())
}

fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// A request ready to sign: authorised, with its key chosen.
struct Ready {
    valid: Valid,
    policy: Arc<Policy>,
    key: Arc<KeyVersion>,
    idempotency: Option<Idempotent>,
}

/// The hashes an idempotent request is remembered and recorded by, computed once.
struct Idempotent {
    key_sha256: [u8; 32],
    request_sha256: String,
}

impl App {
    /// `POST /v1/sign`.
    pub async fn sign(
        self: &Arc<Self>,
        caller: &Caller,
        req: SignRequest,
        header_key: Option<&str>,
    ) -> Result<SignResponse, Error> {
        let started = Instant::now();
        if req.idempotency_key.is_some() {
            return Err(Error::invalid(
                "idempotency_key",
                "send the Idempotency-Key header instead of a body field",
            ));
        }
        let policies = self.policies.load_full();
        let mut labels = None;
        let result = async {
            let key = header_key.map(str::to_owned);
            let ready = self.prepare(caller, &policies, req, key, &mut labels)?;
            policies.check_rate(&caller.client, &ready.policy, 1)?;
            self.sign_ready(caller, ready).await
        }
        .await;
        self.count(labels, &result, started);
        result
    }

    /// `POST /v1/sign/batch`: one result per item, in order. Items without an idempotency key
    /// are signed in one token call and recorded in one group commit.
    pub async fn sign_batch(
        self: &Arc<Self>,
        caller: &Caller,
        items: Vec<SignRequest>,
    ) -> Vec<Result<SignResponse, Error>> {
        let started = Instant::now();
        let policies = self.policies.load_full();
        let mut results: Vec<Option<Result<SignResponse, Error>>> = Vec::with_capacity(items.len());
        let mut labels: Vec<Option<(String, String)>> = Vec::with_capacity(items.len());
        let mut plain: Vec<(usize, Ready)> = Vec::new();
        let mut keyed: Vec<(usize, Ready)> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let key = item.idempotency_key.clone();
            let mut item_labels = None;
            let prepared = self.prepare(caller, &policies, item, key, &mut item_labels);
            labels.push(item_labels);
            let ready = prepared.and_then(|r| {
                policies.check_rate(&caller.client, &r.policy, 1)?;
                Ok(r)
            });
            match ready {
                Ok(r) if r.idempotency.is_some() => {
                    keyed.push((i, r));
                    results.push(None);
                }
                Ok(r) => {
                    plain.push((i, r));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let keyed_futures = keyed
            .into_iter()
            .map(|(i, r)| async move { (i, self.sign_ready(caller, r).await) });
        // One token call and one append per tenant: each takes its own tenant's turn.
        let mut per_tenant: std::collections::BTreeMap<TenantId, Vec<(usize, Ready)>> =
            std::collections::BTreeMap::new();
        for (i, r) in plain {
            per_tenant
                .entry(r.policy.config.tenant.clone())
                .or_default()
                .push((i, r));
        }
        let plain_futures = per_tenant
            .into_iter()
            .map(|(tenant, items)| async move { self.sign_many(caller, &tenant, items).await });
        let (keyed_results, plain_results) = tokio::join!(
            futures::future::join_all(keyed_futures),
            futures::future::join_all(plain_futures)
        );
        for (i, r) in keyed_results
            .into_iter()
            .chain(plain_results.into_iter().flatten())
        {
            results[i] = Some(r);
        }
        let out: Vec<Result<SignResponse, Error>> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Internal("batch item lost".into()))))
            .collect();
        for (r, l) in out.iter().zip(labels) {
            self.count(l, r, started);
        }
        out
    }

    /// `POST /v1/verify`: does `signature` verify over `digest` with `key_id`'s public key?
    pub fn verify(&self, caller: &Caller, req: VerifyRequest) -> Result<VerifyAnswer, Error> {
        let key_id: KeyId = req
            .key_id
            .parse()
            .map_err(|e: crate::domain::ParseError| Error::invalid("key_id", e.to_string()))?;
        req.digest_algorithm
            .parse::<DigestAlgorithm>()
            .map_err(|_| {
                Error::invalid(
                    "digest_algorithm",
                    "unknown digest algorithm (supported: sha256)",
                )
            })?;
        let digest: Sha256Digest = req
            .digest
            .parse()
            .map_err(|e: crate::domain::ParseError| Error::invalid("digest", e.to_string()))?;
        let der = B64
            .decode(req.signature.as_bytes())
            .map_err(|_| Error::invalid("signature", "must be base64 (standard alphabet)"))?;
        if !Policies::may_read_tenant(&caller.client, key_id.tenant()) {
            return Err(Error::Forbidden(format!(
                "client `{}` may not use keys of tenant `{}`",
                caller.identity.identity,
                key_id.tenant()
            )));
        }
        let snap = self.keys.snapshot();
        let version = snap
            .version(&key_id)
            .ok_or_else(|| Error::NotFound(format!("key {key_id} not found")))?;
        let valid = DerSignature::from_bytes(&der)
            .is_ok_and(|sig| version.public_key.verify_prehash(&digest.0, &sig).is_ok());
        Ok(VerifyAnswer {
            valid,
            key_state: version.state.as_str(),
            revocation: version
                .revocation
                .as_deref()
                .map(super::RevocationView::from),
        })
    }

    /// Validate, authorise and choose the key. `labels` is set (from configuration) as soon
    /// as the policy is known, so later failures are counted under it.
    fn prepare(
        &self,
        caller: &Caller,
        policies: &Policies,
        req: SignRequest,
        idempotency_key: Option<String>,
        labels: &mut Option<(String, String)>,
    ) -> Result<Ready, Error> {
        // Labels come from configuration only, and as soon as the policy is known, so every
        // later refusal (403, 429, 503...) is counted under its tenant and policy.
        if let Some(p) = req
            .policy_id
            .parse::<PolicyId>()
            .ok()
            .and_then(|id| policies.policy(&id))
        {
            *labels = Some((p.config.tenant.to_string(), p.config.id.to_string()));
        }
        let valid = validate(&req)?;
        let policy = Arc::clone(policies.authorize_sign(
            &caller.client,
            &valid.policy_id,
            valid.algorithm,
        )?);
        let idempotency = match &idempotency_key {
            Some(k) => {
                validate_idempotency_key(k)?;
                let signer_hash = valid
                    .signer
                    .as_ref()
                    .map(|s| self.vault.request_signer_hash(s))
                    .transpose()?;
                Some(Idempotent {
                    key_sha256: idempotency::key_sha256(k),
                    request_sha256: valid.request_sha256(signer_hash),
                })
            }
            None if policy.config.require_idempotency_key => {
                return Err(
                    crate::policy::Error::IdempotencyKeyRequired(valid.policy_id.clone()).into(),
                );
            }
            None => None,
        };
        let rotation = &self.dynamic.load().rotation;
        let key = self.keys.signing_key(
            &policy.config.tenant,
            self.clock.unix(),
            rotation.min_remaining_validity,
        )?;
        Ok(Ready {
            valid,
            policy,
            key,
            idempotency,
        })
    }

    async fn sign_ready(
        self: &Arc<Self>,
        caller: &Caller,
        ready: Ready,
    ) -> Result<SignResponse, Error> {
        let Some(idem) = &ready.idempotency else {
            return self.sign_and_record(caller, &ready).await;
        };
        let request_sha256 = idem.request_sha256.clone();
        let key_sha256 = idem.key_sha256;
        let cache_key = (caller.identity.identity.clone(), key_sha256);
        let begun = self.idempotency.begin(cache_key, || {
            // Runs as its own task: a client that hangs up cannot cancel the signature, the
            // append or the record half-way.
            let (app, caller, request_sha256) =
                (Arc::clone(self), caller.clone(), request_sha256.clone());
            async move {
                // With several replicas the storage decides who signs: one claim per key.
                let client = caller.identity.identity.as_str();
                let claim = app
                    .claims
                    .claim(client, &key_sha256, &request_sha256)
                    .await
                    .map_err(|e| Arc::new(Error::Audit(e)))?;
                match claim {
                    Claim::Owned => {}
                    Claim::Recorded {
                        request_sha256: recorded,
                        index,
                    } => {
                        let response = app.replay_entry(index).await.map_err(Arc::new)?;
                        return Ok(Fresh {
                            request_sha256: recorded,
                            index,
                            response: Arc::new(response),
                        });
                    }
                    Claim::Conflict => return Err(Arc::new(Error::IdempotencyConflict)),
                }
                let signed = app.sign_and_record(&caller, &ready).await;
                if signed.is_err() {
                    app.claims.release(client, &key_sha256).await;
                }
                let response = signed.map_err(Arc::new)?;
                Ok(Fresh {
                    request_sha256,
                    index: response.receipt.index,
                    response: Arc::new(response),
                })
            }
        });
        let fresh = match begun {
            Begin::Recorded(record) => return self.replay(&record, &request_sha256).await,
            Begin::Pending(pending) => pending.await.map_err(Error::Shared)?,
        };
        if fresh.request_sha256 != request_sha256 {
            return Err(Error::IdempotencyConflict);
        }
        Ok((*fresh.response).clone())
    }

    /// Answer a recorded idempotent request from its durable entry, exactly as the first time.
    async fn replay(&self, record: &Record, request_sha256: &str) -> Result<SignResponse, Error> {
        if record.request_sha256 != request_sha256 {
            return Err(Error::IdempotencyConflict);
        }
        self.replay_entry(record.index).await
    }

    /// The response recorded in entry `index`, byte for byte as it was first given.
    async fn replay_entry(&self, index: u64) -> Result<SignResponse, Error> {
        let bytes = self.log.entry(index).await?;
        let entry: Entry =
            serde_json::from_slice(&bytes).map_err(|e| Error::Internal(e.to_string()))?;
        let receipt = Receipt {
            log_origin: self.log.origin().to_owned(),
            index,
            leaf_hash: B64.encode(merkle::leaf_hash(&bytes)),
        };
        let certificate = entry
            .key_id
            .as_deref()
            .and_then(|k| k.parse::<KeyId>().ok())
            .and_then(|k| self.keys.snapshot().version(&k).map(certificate_pem))
            .unwrap_or_default();
        Ok(response(&entry, certificate, receipt))
    }

    /// Sign in the token, then make the evidence durable. The signature leaves only with it.
    /// If the log has meanwhile made another version active (a rotation), the signature is
    /// discarded unrecorded and made again with that version.
    async fn sign_and_record(&self, caller: &Caller, ready: &Ready) -> Result<SignResponse, Error> {
        let mut key = Arc::clone(&ready.key);
        let mut attempt = 0;
        let sealed = self.seal_ready(ready).await?;
        loop {
            let share = Self::share(caller, &ready.policy.config.tenant, 1);
            // The log's group commit may wait for this entry while it is being signed.
            let announced = self.log.expect(1);
            // Checked with the version's public key (off the token worker) before it goes on.
            let der = self
                .hsm
                .sign_as(&share, key.token_id(), ready.valid.digest.0, key.public_key)
                .await?;
            let entry = self.signature_entry(caller, ready, &key, &der, sealed.as_ref());
            let mut response = response(&entry, certificate_pem(&key), Receipt::default());
            drop(announced);
            // Evidence seam: nothing is returned to the client before this append is durable.
            match self.log.append(vec![entry]).await {
                Ok(mut receipts) => {
                    response.receipt = receipts
                        .pop()
                        .ok_or_else(|| Error::Internal("no receipt".into()))?;
                    tracing::info!(request_id = %caller.request_id, key_id = %key.key_id,
                        tenant = %ready.policy.config.tenant, policy_id = %ready.policy.config.id,
                        index = response.receipt.index, "signed");
                    return Ok(response);
                }
                Err(crate::audit::Error::Superseded(v)) if attempt < MAX_RESIGN => {
                    attempt += 1;
                    key = self.superseding_key(&v).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whose turn a signing call of `caller` in `tenant` waits for at the token
    /// ([`crate::hsm::fair`]), for `cost` signatures.
    fn share(caller: &Caller, tenant: &TenantId, cost: usize) -> Share {
        Share {
            tenant: tenant.to_string(),
            client: caller.identity.identity.clone(),
            cost,
        }
    }

    /// The version to sign again with after the log refused a signature: the version the log
    /// made active meanwhile, or, if the version was revoked, the tenant's active version now
    /// (none until a rotation completes: `no-active-key`).
    async fn superseding_key(
        &self,
        v: &crate::audit::order::Violation,
    ) -> Result<Arc<KeyVersion>, Error> {
        use crate::audit::order::Violation;
        let min = self.dynamic.load().rotation.min_remaining_validity;
        match v {
            Violation::Superseded { key_id, active, .. } => {
                tracing::info!(%key_id, active = %active.key_id, "signature made with a replaced version; signing again");
                let key_id: KeyId = active
                    .key_id
                    .parse()
                    .map_err(|e: crate::domain::ParseError| Error::Internal(e.to_string()))?;
                match self.keys.signing_version(&key_id, self.clock.unix(), min) {
                    Err(crate::keys::Error::UnknownKey(_) | crate::keys::Error::NoActiveKey(_))
                        if self.replicas.shared() =>
                    {
                        // Another replica activated a version this one has not loaded (or not
                        // loaded with its certificate) yet.
                        self.reload_shared_state()
                            .await
                            .map_err(|e| Error::Internal(e.to_string()))?;
                        Ok(self.keys.signing_version(&key_id, self.clock.unix(), min)?)
                    }
                    other => Ok(other?),
                }
            }
            Violation::Revoked { tenant, key_id, .. } => {
                tracing::warn!(%key_id, "signature made with a version revoked meanwhile; not returned");
                if self.replicas.shared() {
                    // Another replica revoked it: learn the revocation (and any new version).
                    self.reload_shared_state()
                        .await
                        .map_err(|e| Error::Internal(e.to_string()))?;
                }
                let tenant: TenantId = tenant
                    .parse()
                    .map_err(|e: crate::domain::ParseError| Error::Internal(e.to_string()))?;
                let key = self.keys.signing_key(&tenant, self.clock.unix(), min)?;
                if key.key_id.to_string() == *key_id {
                    // This replica still holds it active: the shared state lags the log.
                    return Err(crate::keys::Error::Revoked(key.key_id.clone()).into());
                }
                Ok(key)
            }
        }
    }

    /// Sign several prepared items of one tenant in one token call and record them in one
    /// append.
    async fn sign_many(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        items: Vec<(usize, Ready)>,
    ) -> Vec<(usize, Result<SignResponse, Error>)> {
        if items.is_empty() {
            return Vec::new();
        }
        let fail_all = |items: Vec<(usize, Ready)>, e: Error| {
            let shared = Arc::new(e);
            items
                .into_iter()
                .map(|(i, _)| (i, Err(Error::Shared(Arc::clone(&shared)))))
                .collect()
        };
        let mut keys: Vec<Arc<KeyVersion>> =
            items.iter().map(|(_, r)| Arc::clone(&r.key)).collect();
        let mut sealed = Vec::with_capacity(items.len());
        for (_, r) in &items {
            match self.seal_ready(r).await {
                Ok(s) => sealed.push(s),
                Err(e) => return fail_all(items, e),
            }
        }
        let mut attempt = 0;
        loop {
            let jobs: Vec<(String, [u8; 32], p256::ecdsa::VerifyingKey)> = items
                .iter()
                .zip(&keys)
                .map(|((_, r), k)| (k.token_id(), r.valid.digest.0, k.public_key))
                .collect();
            let share = Self::share(caller, tenant, jobs.len());
            let announced = self.log.expect(jobs.len());
            let signed = self.hsm.sign_many_as(&share, jobs).await;
            let sigs = match signed {
                Ok(s) => s,
                Err(e) => return fail_all(items, Error::Hsm(e)),
            };

            let entries: Vec<Entry> = items
                .iter()
                .zip(&keys)
                .zip(&sigs)
                .zip(&sealed)
                .map(|((((_, r), k), der), s)| self.signature_entry(caller, r, k, der, s.as_ref()))
                .collect();
            let responses: Vec<SignResponse> = entries
                .iter()
                .zip(&keys)
                .map(|(e, k)| response(e, certificate_pem(k), Receipt::default()))
                .collect();
            drop(announced);
            match self.log.append(entries).await {
                Ok(receipts) => {
                    tracing::info!(request_id = %caller.request_id, items = receipts.len(), "signed batch");
                    return items
                        .into_iter()
                        .zip(responses)
                        .zip(receipts)
                        .map(|(((i, _), mut response), receipt)| {
                            response.receipt = receipt;
                            (i, Ok(response))
                        })
                        .collect();
                }
                Err(crate::audit::Error::Superseded(v)) if attempt < MAX_RESIGN => {
                    attempt += 1;
                    let active = match self.superseding_key(&v).await {
                        Ok(k) => k,
                        Err(e) => return fail_all(items, e),
                    };
                    for k in keys
                        .iter_mut()
                        .filter(|k| k.key_id.tenant().as_str() == v.tenant())
                    {
                        *k = Arc::clone(&active);
                    }
                }
                Err(e) => return fail_all(items, Error::Audit(e)),
            }
        }
    }

    /// The request's signer evidence sealed for the vault (commitment and record), if it
    /// has any.
    async fn seal_ready(
        &self,
        ready: &Ready,
    ) -> Result<Option<(String, Box<Row>, crate::vault::InFlight)>, Error> {
        let Some(signer) = &ready.valid.signer else {
            return Ok(None);
        };
        let now_us = crate::clock::micros(self.clock.now());
        self.seal_signer(
            signer,
            &ready.policy.config,
            ready.valid.transaction_id.clone(),
            now_us,
        )
        .await
        .map(Some)
    }

    fn signature_entry(
        &self,
        caller: &Caller,
        ready: &Ready,
        key: &KeyVersion,
        der: &[u8],
        sealed: Option<&(String, Box<Row>, crate::vault::InFlight)>,
    ) -> Entry {
        let now = self.clock.now();
        let mut e = Entry::new(
            event::SIGNATURE,
            crate::clock::rfc3339_micros(now),
            caller.actor(),
        );
        let p = &ready.policy.config;
        e.request_id = Some(caller.request_id.clone());
        e.tenant = Some(p.tenant.to_string());
        e.policy = Some(PolicyEvidence {
            id: p.id.to_string(),
            hash: ready.policy.hash.clone(),
            legal_standard: p.legal_standard.clone(),
        });
        e.digest = Some(DigestEvidence {
            algorithm: ready.valid.algorithm.as_str().to_owned(),
            value: ready.valid.digest.to_hex(),
        });
        e.key_id = Some(key.key_id.to_string());
        if let Some(c) = &key.certificate {
            e.certificate_serial = Some(c.serial_hex.clone());
            e.certificate_sha256 = Some(c.fingerprint_sha256.clone());
        }
        e.signature = Some(B64.encode(der));
        e.signature_algorithm = Some(SIGNATURE_ALGORITHM.to_owned());
        e.transaction_id = ready.valid.transaction_id.clone();
        // Format 2: the signer evidence goes to the vault; the leaf holds its commitment and
        // the retention it is kept under.
        e.retention_class = Some(p.retention_class.clone());
        let retain_until = match sealed {
            Some((commitment, row, _)) => {
                e.signer_commitment = Some(commitment.clone());
                e.sealed = Some(row.clone());
                row.retain_until_us
            }
            None => super::retention::retain_until_us(p, crate::clock::micros(now)),
        };
        e.retain_until = retain_until.map(crate::clock::rfc3339_from_micros);
        if let Some(idem) = &ready.idempotency {
            e.idempotency_key_sha256 = Some(hex::encode(idem.key_sha256));
            e.request_sha256 = Some(idem.request_sha256.clone());
        }
        e
    }

    fn count(
        &self,
        labels: Option<(String, String)>,
        result: &Result<SignResponse, Error>,
        started: Instant,
    ) {
        let (tenant, policy) = labels.unwrap_or_else(|| ("-".to_owned(), "-".to_owned()));
        let outcome = match result {
            Ok(_) => {
                self.metrics
                    .sign_duration
                    .observe(started.elapsed().as_secs_f64());
                "ok"
            }
            Err(e) => {
                if let Some(limit) = e.tenant_limit() {
                    self.metrics
                        .tenant_refusals
                        .with_label_values(&[&tenant, limit])
                        .inc();
                }
                e.outcome()
            }
        };
        self.metrics
            .sign_requests
            .with_label_values(&[&tenant, &policy, outcome])
            .inc();
    }
}

/// The answer: the entry, its receipt and the PEM of the certificate that signed it.
fn response(entry: &Entry, certificate: JsonText, receipt: Receipt) -> SignResponse {
    SignResponse {
        signature: entry.signature.clone().unwrap_or_default(),
        algorithm: entry
            .signature_algorithm
            .clone()
            .unwrap_or_else(|| SIGNATURE_ALGORITHM.to_owned()),
        key_id: entry.key_id.clone().unwrap_or_default(),
        certificate,
        signed_at: entry.time.clone(),
        receipt,
    }
}

fn certificate_pem(key: &Arc<KeyVersion>) -> JsonText {
    key.certificate_pem.clone().unwrap_or_default()
}
