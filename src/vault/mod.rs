//! The signer-evidence vault: personal data kept out of the append-only tree.
//!
//! A format-2 signature entry holds only a salted commitment to the `signer` object
//! ([`format::Evidence::commitment`]). The evidence itself is sealed here: encrypted with a
//! data key of its own (AES-256-GCM, in software), whose copy is kept only encrypted inside
//! the token under the vault's key-encryption key (KEK, AES-256, never extractable; see
//! [`crate::hsm::VaultKeys`]). The storage keeps the sealed record beside the entry, written in
//! the same commit ([`crate::storage::VaultStore`]).
//!
//! Erasure removes a record's wrapped data key and ciphertext (crypto-shredding). Copies in
//! backups stay encrypted under the KEK generation of their time; a KEK rotation re-wraps the
//! live data keys under a new generation and destroys the old one in the token, after which
//! no backup of an erased record can be read. Receipts and proofs never depend on the vault.
//!
//! Owns the key schedule (which generation seals, the rotation) and the subject index key
//! (for keyed subject tags). Must not name a storage backend or cryptoki.

pub mod format;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

pub use format::{Content, Context, Erasure, Evidence, Key, Row, Sealed, SignerEvidence};

use crate::hsm::VaultKeys;
use crate::storage::{HoldStore, VaultStore};

/// A vault failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the token refused a vault operation: {0}")]
    Token(#[from] crate::hsm::Error),
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error("the vault's key state is invalid: {0}")]
    Meta(String),
}

/// The vault's key state, stored beside the records (no secret in clear).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The KEK generation new records are sealed under.
    pub generation: u32,
    /// Base64: the subject index key, wrapped in the token under `generation`.
    pub index_key: String,
    /// Generations being replaced: destroyed once no live record is wrapped under them.
    #[serde(default)]
    pub retiring: Vec<u32>,
    /// RFC 3339 UTC of the last rotation (or of the vault's creation).
    pub rotated_at: String,
}

/// A legal hold: records it covers are never erased while it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// RFC 3339 UTC window of signing times (with `tenant`): `since` inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// `until` exclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub reason: String,
    pub placed_by: String,
    pub placed_at: String,
    /// The `legal_hold_placed` entry.
    pub placed_entry: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Release>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub released_by: String,
    pub released_at: String,
    pub reason: String,
    /// The `legal_hold_released` entry.
    pub entry: u64,
}

impl Hold {
    pub fn is_active(&self) -> bool {
        self.released.is_none()
    }

    /// Whether this hold (if active) covers a record.
    pub fn covers(&self, row: &Row) -> bool {
        if !self.is_active() {
            return false;
        }
        if let Some(t) = &self.transaction_id {
            return row.transaction_id.as_deref() == Some(t.as_str());
        }
        let Some(tenant) = &self.tenant else {
            return false;
        };
        let bound = |b: &Option<String>| b.as_deref().and_then(crate::clock::parse_rfc3339_micros);
        row.tenant == *tenant
            && bound(&self.since).is_none_or(|s| row.time_us >= s)
            && bound(&self.until).is_none_or(|u| row.time_us < u)
    }
}

/// What the vault holds for an entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// The evidence, checked against the entry's commitment.
    Present(Evidence),
    Erased(Erasure),
    /// Not readable: its key-encryption key no longer exists (a record restored from a backup
    /// after the rotation that followed its erasure), or the record is damaged.
    Unreadable(String),
    /// The vault has no record for the entry.
    Missing,
}

/// The subject index key and the generation sealing with it, as last read.
struct Unlocked {
    generation: u32,
    index_key: Key,
    read_at: Instant,
}

/// With several replicas, how long a replica seals under the generation it last read.
const SHARED_REFRESH: Duration = Duration::from_secs(1);
/// How long a rotation waits after switching generations before re-wrapping, and between its
/// last two passes, so that records sealed under the old generation just before the switch
/// are written (and other replicas have read the new generation) by then.
pub const SETTLE: Duration = Duration::from_secs(3);

/// The vault: seals, opens, finds and erases signer evidence; rotates its KEK.
pub struct Vault {
    keys: Arc<dyn VaultKeys>,
    store: Arc<dyn VaultStore>,
    holds: Arc<dyn HoldStore>,
    subject_fields: Vec<String>,
    /// Whether other replicas share the store (their rotations must be read back).
    shared: bool,
    unlocked: RwLock<Option<Arc<Unlocked>>>,
    /// Records sealed in this process and not yet written (or given up), by KEK generation:
    /// a rotation waits until none of the retiring generations is left before it re-wraps.
    in_flight: InFlightCounts,
}

type InFlightCounts = Arc<std::sync::Mutex<std::collections::BTreeMap<u32, usize>>>;

/// A sealed record not yet written: held by the caller until its append returned.
pub struct InFlight {
    counts: InFlightCounts,
    generation: u32,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.generation) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.generation);
            }
        }
    }
}

impl Vault {
    /// Open the vault, creating its first KEK generation and index key if it has none.
    pub async fn open(
        keys: Arc<dyn VaultKeys>,
        store: Arc<dyn VaultStore>,
        holds: Arc<dyn HoldStore>,
        subject_fields: Vec<String>,
        shared: bool,
        now: &str,
    ) -> Result<Self, Error> {
        let vault = Self {
            keys,
            store,
            holds,
            subject_fields,
            shared,
            unlocked: RwLock::new(None),
            in_flight: InFlightCounts::default(),
        };
        if vault.store.meta().await?.is_none() {
            let generation = 1;
            vault.keys.ensure_kek(generation).await?;
            let index_key = format::random_key();
            let wrapped = vault
                .keys
                .wrap(generation, index_key, format::INDEX_KEY_DOMAIN.to_vec())
                .await?;
            let meta = Meta {
                generation,
                index_key: B64.encode(wrapped),
                retiring: Vec::new(),
                rotated_at: now.to_owned(),
            };
            // With several replicas starting at once, one creation wins; all use it.
            vault.store.init_meta(&meta).await?;
        }
        vault.unlock().await?;
        Ok(vault)
    }

    pub fn holds(&self) -> &Arc<dyn HoldStore> {
        &self.holds
    }

    pub fn store(&self) -> &Arc<dyn VaultStore> {
        &self.store
    }

    /// The stored key state.
    pub async fn meta(&self) -> Result<Meta, Error> {
        self.store
            .meta()
            .await?
            .ok_or_else(|| Error::Meta("the vault has no key state".into()))
    }

    /// Read the key state and unwrap the index key.
    async fn unlock(&self) -> Result<Arc<Unlocked>, Error> {
        let meta = self.meta().await?;
        let wrapped = B64
            .decode(&meta.index_key)
            .map_err(|_| Error::Meta("index_key is not base64".into()))?;
        let index_key = self
            .keys
            .unwrap(meta.generation, wrapped, format::INDEX_KEY_DOMAIN.to_vec())
            .await?;
        let u = Arc::new(Unlocked {
            generation: meta.generation,
            index_key,
            read_at: Instant::now(),
        });
        *self.unlocked.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&u));
        Ok(u)
    }

    async fn current(&self) -> Result<Arc<Unlocked>, Error> {
        let cached = self
            .unlocked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match cached {
            Some(u) if !self.shared || u.read_at.elapsed() < SHARED_REFRESH => Ok(u),
            Some(u) => match self.store.meta().await? {
                Some(m) if m.generation == u.generation => {
                    let fresh = Arc::new(Unlocked {
                        generation: u.generation,
                        index_key: u.index_key.clone(),
                        read_at: Instant::now(),
                    });
                    *self.unlocked.write().unwrap_or_else(|p| p.into_inner()) =
                        Some(Arc::clone(&fresh));
                    Ok(fresh)
                }
                _ => self.unlock().await,
            },
            None => self.unlock().await,
        }
    }

    /// Seal `signer` for an entry: its commitment (for the entry) and the sealed record (for
    /// the storage, written with the entry). Hold the [`InFlight`] until the append returned.
    pub async fn seal(
        &self,
        signer: &serde_json::Value,
        ctx: &Context,
    ) -> Result<(String, Box<Row>, InFlight), Error> {
        let u = self.current().await?;
        *self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(u.generation)
            .or_default() += 1;
        let guard = InFlight {
            counts: Arc::clone(&self.in_flight),
            generation: u.generation,
        };
        let evidence = Evidence::new(signer.clone());
        let commitment = evidence.commitment()?;
        let data_key = format::random_key();
        let ciphertext = format::encrypt(&data_key, &evidence, &commitment)?;
        let wrapped = self
            .keys
            .wrap(u.generation, data_key, data_key_aad(&commitment))
            .await?;
        let row = Row {
            index: 0,
            tenant: ctx.tenant.clone(),
            transaction_id: ctx.transaction_id.clone(),
            time_us: ctx.time_us,
            retain_until_us: ctx.retain_until_us,
            retention_class: ctx.retention_class.clone(),
            commitment: commitment.clone(),
            content: Content::Sealed(Sealed {
                tags: format::subject_tags(&u.index_key, signer, &self.subject_fields),
                kek: u.generation,
                wrapped_key: B64.encode(wrapped),
                ciphertext,
            }),
        };
        Ok((commitment, Box::new(row), guard))
    }

    /// Wait until every record this process sealed under a generation older than `current`
    /// is written (at most `limit`).
    pub async fn quiesce(&self, current: u32, limit: Duration) {
        let deadline = Instant::now() + limit;
        let older_in_flight = || {
            self.in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .range(..current)
                .any(|(_, n)| *n > 0)
        };
        while older_in_flight() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What stands for `signer` in a request hash: a keyed hash (see
    /// [`format::request_signer_hash`]).
    /// The index key never changes (a rotation only re-wraps it), so the copy unwrapped at
    /// start serves.
    pub fn request_signer_hash(&self, signer: &serde_json::Value) -> Result<String, Error> {
        let u = self
            .unlocked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Error::Meta("the vault is not open".into()))?;
        Ok(format::request_signer_hash(&u.index_key, signer))
    }

    /// The signer evidence of entry `index`, checked against `commitment`.
    pub async fn read(&self, index: u64, commitment: &str) -> Result<Reading, Error> {
        let Some(row) = self.store.get(index).await? else {
            return Ok(Reading::Missing);
        };
        if row.commitment != commitment {
            return Ok(Reading::Unreadable(
                "the vault's record is for another commitment".into(),
            ));
        }
        Ok(self.open_row(&row).await)
    }

    /// Open a stored record.
    pub async fn open_row(&self, row: &Row) -> Reading {
        let sealed = match &row.content {
            Content::Erased(e) => return Reading::Erased(e.clone()),
            Content::Sealed(s) => s,
        };
        let Ok(wrapped) = B64.decode(&sealed.wrapped_key) else {
            return Reading::Unreadable("its wrapped data key is not base64".into());
        };
        let data_key = match self
            .keys
            .unwrap(sealed.kek, wrapped, data_key_aad(&row.commitment))
            .await
        {
            Ok(k) => k,
            Err(crate::hsm::Error::NotFound(_)) => {
                return Reading::Unreadable(format!(
                    "its key-encryption key (generation {}) no longer exists in the token",
                    sealed.kek
                ));
            }
            Err(e) => return Reading::Unreadable(format!("its data key does not unwrap: {e}")),
        };
        match format::decrypt(&data_key, &sealed.ciphertext, &row.commitment) {
            Ok(ev) => Reading::Present(ev),
            Err(e) => Reading::Unreadable(e.to_string()),
        }
    }

    /// The live records of a data subject (an identifier in one of the subject fields).
    pub async fn subject_rows(&self, subject: &str) -> Result<Vec<Row>, Error> {
        let u = self.current().await?;
        let tag = format::subject_tag(&u.index_key, subject);
        Ok(self.store.by_tag(&tag).await?)
    }

    /// Active legal holds.
    pub async fn active_holds(&self) -> Result<Vec<Hold>, Error> {
        Ok(self
            .holds
            .list()
            .await?
            .into_iter()
            .filter(Hold::is_active)
            .collect())
    }

    /// Start a KEK rotation: a new generation in the token, the index key re-wrapped under it,
    /// new records sealed under it from now on. The previous generation is `retiring` until
    /// [`Vault::finish_rotation`] has re-wrapped every live data key.
    pub async fn begin_rotation(&self, now: &str) -> Result<(u32, u32), Error> {
        let mut meta = self.meta().await?;
        let u = self.current().await?;
        let (from, to) = (meta.generation, meta.generation + 1);
        self.keys.ensure_kek(to).await?;
        let wrapped = self
            .keys
            .wrap(to, u.index_key.clone(), format::INDEX_KEY_DOMAIN.to_vec())
            .await?;
        meta.generation = to;
        meta.index_key = B64.encode(wrapped);
        if !meta.retiring.contains(&from) {
            meta.retiring.push(from);
        }
        meta.rotated_at = now.to_owned();
        self.store.set_meta(&meta).await?;
        self.unlock().await?;
        Ok((from, to))
    }

    /// Re-wrap every live data key still under a retiring generation, then destroy those
    /// generations in the token. Returns the destroyed generations and how many keys were
    /// re-wrapped; `None` if no rotation was in progress.
    pub async fn finish_rotation(
        &self,
        settle: Duration,
    ) -> Result<Option<(Vec<u32>, u64)>, Error> {
        let meta = self.meta().await?;
        if meta.retiring.is_empty() {
            return Ok(None);
        }
        let current = meta.generation;
        let mut rewrapped = 0u64;
        // Passes until two in a row, `settle` apart, find nothing: a record sealed under a
        // retiring generation before the switch but written late (its signature waited for
        // the token) is caught by a later pass, before the generation is destroyed.
        let mut confirmed = false;
        loop {
            let mut after = None;
            let mut found = 0u64;
            loop {
                let page = self.store.stale(current, after, 500).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.index);
                for row in page {
                    let Content::Sealed(s) = &row.content else {
                        continue;
                    };
                    found += 1;
                    let aad = data_key_aad(&row.commitment);
                    let wrapped = B64
                        .decode(&s.wrapped_key)
                        .map_err(|_| Error::Meta(format!("record {}: wrapped key", row.index)))?;
                    let key = match self.keys.unwrap(s.kek, wrapped, aad.clone()).await {
                        Ok(k) => k,
                        Err(crate::hsm::Error::NotFound(_)) => {
                            tracing::error!(
                                index = row.index,
                                kek = s.kek,
                                "a vault record's key-encryption key is gone; the record is unreadable"
                            );
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let new = self.keys.wrap(current, key, aad).await?;
                    if self
                        .store
                        .rewrap(row.index, &s.wrapped_key, current, &B64.encode(new))
                        .await?
                    {
                        rewrapped += 1;
                    }
                }
            }
            match (found, confirmed) {
                (0, true) => break,
                (0, false) => {
                    confirmed = true;
                    tokio::time::sleep(settle).await;
                }
                _ => confirmed = false,
            }
        }
        let mut destroyed = Vec::new();
        for g in &meta.retiring {
            self.keys.destroy_kek(*g).await?;
            destroyed.push(*g);
        }
        let mut done = self.meta().await?;
        done.retiring.retain(|g| !destroyed.contains(g));
        self.store.set_meta(&done).await?;
        Ok(Some((destroyed, rewrapped)))
    }
}

/// What a data key's wrapping is bound to: the domain and the record's commitment.
fn data_key_aad(commitment: &str) -> Vec<u8> {
    [format::DATA_KEY_DOMAIN, commitment.as_bytes()].concat()
}

impl From<Reading> for SignerEvidence {
    fn from(r: Reading) -> Self {
        match r {
            Reading::Present(e) => SignerEvidence::Present {
                signer: e.signer,
                salt: e.salt,
            },
            Reading::Erased(e) => SignerEvidence::Erased {
                erased_at: e.erased_at,
                cause: e.cause,
                reason: e.reason,
                erasure_entry: e.entry,
            },
            Reading::Unreadable(detail) => SignerEvidence::Unreadable { detail },
            Reading::Missing => SignerEvidence::Missing,
        }
    }
}

#[cfg(test)]
mod tests;
