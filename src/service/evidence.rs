//! Evidence for auditors: every entry of a transaction with inclusion proofs to one signed
//! checkpoint, and a tenant's entries in a time window, page by page. Backed by the log's
//! lookup indexes: no query scans the log.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::{App, Caller, Error};
use crate::audit::note;
use crate::clock::parse_rfc3339_micros as parse_time_us;
use crate::policy::Policies;

const MAX_TRANSACTION_ID: usize = 256;
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// One entry with its inclusion proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvedEntry {
    pub index: u64,
    pub entry: serde_json::Value,
    pub leaf_hash: String,
    pub inclusion_proof: Vec<String>,
    /// The C2SP `tlog-proof@v1` (its `extra` line is the canonical entry).
    pub proof: String,
    /// The signer evidence the entry commits to (format 2), from the vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_evidence: Option<crate::vault::SignerEvidence>,
}

/// `GET /v1/audit/transactions/{transaction_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransactionView {
    pub transaction_id: String,
    /// The signed checkpoint every proof leads to (absent before the first checkpoint).
    pub checkpoint: Option<String>,
    /// The checkpoint's RFC 3161 timestamp (base64 DER `TimeStampResp`), once the TSA gave it.
    pub checkpoint_timestamp: Option<String>,
    pub tree_size: u64,
    pub entries: Vec<ProvedEntry>,
    /// Entries of the transaction not yet covered by a checkpoint: ask again shortly.
    pub pending: Vec<u64>,
}

/// `GET /v1/audit/entries` query.
#[derive(Debug, Default, Deserialize)]
pub struct EntriesQuery {
    pub tenant: Option<String>,
    /// Only the signatures made with this key version (`TENANT/vN`; the tenant may be left
    /// out): the signatures a revoked or compromised key touched.
    pub key_id: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub cursor: Option<String>,
    pub limit: Option<String>,
}

/// One page of a tenant's entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntriesPage {
    pub tenant: String,
    pub entries: Vec<IndexedEntry>,
    /// Pass as `cursor` for the next page; absent when there is none yet.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexedEntry {
    pub index: u64,
    pub entry: serde_json::Value,
}

impl App {
    /// Every entry with `transaction_id` the caller may read (its tenants; the admin and audit
    /// roles: all), each with an inclusion proof to the latest signed checkpoint.
    pub async fn transaction(
        &self,
        caller: &Caller,
        transaction_id: &str,
    ) -> Result<TransactionView, Error> {
        if transaction_id.is_empty()
            || transaction_id.len() > MAX_TRANSACTION_ID
            || transaction_id.chars().any(char::is_control)
        {
            return Err(Error::invalid(
                "transaction_id",
                format!("must be 1-{MAX_TRANSACTION_ID} characters without control characters"),
            ));
        }
        let checkpoint = self.log.latest_checkpoint();
        let signed = checkpoint.as_ref().map_or(0, |c| c.tree_size);
        let mut entries = Vec::new();
        let mut pending = Vec::new();
        for index in self.log.transaction_entries(transaction_id).await? {
            // Checkpointed entries are read once, with their proof; newer ones on their own.
            let proof = match &checkpoint {
                Some(cp) if index < signed => Some(self.log.prove_with(index, cp.clone()).await?),
                _ => None,
            };
            let bytes = match &proof {
                Some(p) => std::borrow::Cow::Borrowed(p.entry.as_slice()),
                None => std::borrow::Cow::Owned(self.log.entry(index).await?),
            };
            let entry: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| Error::Internal(e.to_string()))?;
            if !self.may_read_entry(caller, &entry) {
                continue;
            }
            let signer_evidence = self.signer_evidence(&entry).await;
            match proof {
                Some(p) => entries.push(ProvedEntry {
                    signer_evidence,
                    index,
                    entry,
                    leaf_hash: B64.encode(p.leaf_hash),
                    inclusion_proof: p.proof.hashes.iter().map(|h| B64.encode(h)).collect(),
                    proof: p.proof.render(),
                }),
                None => pending.push(index),
            }
        }
        Ok(TransactionView {
            transaction_id: transaction_id.to_owned(),
            checkpoint_timestamp: self.timestamps.get(signed).map(|t| t.to_string()),
            checkpoint: checkpoint.map(|c| c.note.clone()),
            tree_size: signed,
            entries,
            pending,
        })
    }

    /// A page of `tenant`'s entries with `since <= time < until`, after `cursor`.
    pub async fn tenant_entries(
        &self,
        caller: &Caller,
        q: &EntriesQuery,
    ) -> Result<EntriesPage, Error> {
        let key_id = q
            .key_id
            .as_deref()
            .map(|k| {
                k.parse::<crate::domain::KeyId>()
                    .map_err(|e| Error::invalid("key_id", e.to_string()))
            })
            .transpose()?;
        let tenant: crate::domain::TenantId = match (q.tenant.as_deref(), &key_id) {
            (Some(raw), _) => raw
                .parse()
                .map_err(|e: crate::domain::ParseError| Error::invalid("tenant", e.to_string()))?,
            (None, Some(k)) => k.tenant().clone(),
            (None, None) => return Err(Error::invalid("tenant", "is required (or key_id)")),
        };
        if let Some(k) = &key_id
            && *k.tenant() != tenant
        {
            return Err(Error::invalid(
                "key_id",
                format!("`{k}` is not a key of tenant `{tenant}`"),
            ));
        }
        if !Policies::may_read_tenant(&caller.client, &tenant) {
            return Err(Error::Forbidden(format!(
                "client `{}` may not read the evidence of tenant `{tenant}`",
                caller.identity.identity
            )));
        }
        let time = |v: &Option<String>, name: &'static str, default: i64| match v {
            None => Ok(default),
            Some(s) => parse_time_us(s).ok_or_else(|| {
                Error::invalid(name, "must be an RFC 3339 time, e.g. 2026-11-30T00:00:00Z")
            }),
        };
        let since = time(&q.since, "since", i64::MIN)?;
        let until = time(&q.until, "until", i64::MAX)?;
        let after = q
            .cursor
            .as_deref()
            .map(|c| {
                c.parse::<u64>()
                    .map_err(|_| Error::invalid("cursor", "must be a cursor from a previous page"))
            })
            .transpose()?;
        let limit = q
            .limit
            .as_deref()
            .map(|l| {
                l.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| Error::invalid("limit", format!("must be 1-{MAX_PAGE}")))
            })
            .transpose()?
            .unwrap_or(DEFAULT_PAGE);
        let page = self
            .log
            .tenant_entries(crate::storage::TenantQuery {
                tenant: tenant.as_str(),
                since_us: since,
                until_us: until,
                after,
                limit,
            })
            .await?;
        let mut entries = Vec::with_capacity(page.indexes.len());
        let wanted = key_id.map(|k| k.to_string());
        for index in page.indexes {
            let bytes = self.log.entry(index).await?;
            let entry: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| Error::Internal(e.to_string()))?;
            // With key_id: the page is the tenant's, filtered (it may come out short, or
            // empty with a next_cursor; follow next_cursor until there is none).
            if let Some(k) = &wanted
                && (entry["event"] != "signature" || entry["key_id"] != k.as_str())
            {
                continue;
            }
            entries.push(IndexedEntry { index, entry });
        }
        Ok(EntriesPage {
            tenant: tenant.to_string(),
            entries,
            next_cursor: page.next_cursor.map(|c| c.to_string()),
        })
    }

    /// A self-contained evidence bundle of the transaction's checkpointed entries the caller may
    /// read (only `tenant`'s, if given): proofs, checkpoint and its timestamp, certificates,
    /// their CA and the log key.
    pub async fn transaction_bundle(
        &self,
        caller: &Caller,
        transaction_id: &str,
        tenant: Option<&str>,
    ) -> Result<crate::audit::bundle::Bundle, Error> {
        use crate::audit::bundle::{
            Bundle, BundleCheckpoint, BundleEntry, BundleLog, Completeness, FORMAT,
            MAX_BUNDLE_ENTRIES, TransactionStatement,
        };
        let view = self.transaction(caller, transaction_id).await?;
        let note = view.checkpoint.clone().ok_or_else(|| {
            Error::NotFound("no checkpoint has been signed yet; retry shortly".into())
        })?;
        let entries: Vec<&ProvedEntry> = view
            .entries
            .iter()
            .filter(|e| tenant.is_none_or(|t| e.entry["tenant"] == t))
            .collect();
        if entries.is_empty() {
            return Err(Error::NotFound(format!(
                "no checkpointed entry of transaction `{}` that client `{}` may read{}",
                transaction_id.chars().take(64).collect::<String>(),
                caller.identity.identity,
                if view.pending.is_empty() {
                    ""
                } else {
                    " (some are waiting for the next checkpoint)"
                }
            )));
        }
        if entries.len() > MAX_BUNDLE_ENTRIES {
            return Err(Error::invalid(
                "transaction_id",
                format!(
                    "the transaction has {} entries, more than the {MAX_BUNDLE_ENTRIES} a bundle may hold; export it per tenant",
                    entries.len()
                ),
            ));
        }
        // The log key states that these are all of the transaction's entries (in the tenants
        // the bundle covers) as of the checkpoint: a verifier refuses a bundle missing one.
        let signed = note::SignedNote::parse(&note)
            .and_then(|n| note::Checkpoint::parse_body(&n.text))
            .map_err(|e| Error::Internal(format!("the latest checkpoint: {e}")))?;
        let tenants = match tenant {
            Some(t) => Some(vec![t.to_owned()]),
            None if Policies::may_read_all_evidence(&caller.client) => None,
            None => Some(
                caller
                    .client
                    .tenants
                    .iter()
                    .map(|t| t.to_string())
                    .collect(),
            ),
        };
        let statement = TransactionStatement {
            origin: signed.origin,
            tree_size: signed.size,
            root_hash: B64.encode(signed.root),
            transaction_id: transaction_id.to_owned(),
            tenants,
            entries: entries.iter().map(|e| e.index).collect(),
        };
        let signature = B64.encode(
            self.sign_with_log_key(
                &statement
                    .signed_message()
                    .map_err(|e| Error::Internal(e.to_string()))?,
            )
            .await?,
        );
        let snap = self.keys.snapshot();
        let mut certificates: Vec<String> = Vec::new();
        for e in &entries {
            let key = e.entry["key_id"].as_str().and_then(|k| k.parse().ok());
            if let Some(v) = key.and_then(|k| snap.version(&k))
                && let Some(c) = &v.certificate
                && e.entry["certificate_sha256"] == c.fingerprint_sha256.as_str()
                && !certificates.contains(&c.to_pem())
            {
                certificates.push(c.to_pem());
            }
        }
        let ca_certificates = self
            .ca
            .load()
            .as_ref()
            .as_ref()
            .map(|c| vec![c.to_pem()])
            .unwrap_or_default();
        Ok(Bundle {
            format: FORMAT.to_owned(),
            transaction_id: transaction_id.to_owned(),
            log: BundleLog {
                origin: self.log.origin().to_owned(),
                public_key: crate::pki::public_key_pem(&self.log.public_key()),
            },
            checkpoint: BundleCheckpoint {
                note,
                timestamp: view.checkpoint_timestamp.clone(),
            },
            ca_certificates,
            certificates,
            entries: entries
                .into_iter()
                .map(|e| BundleEntry {
                    index: e.index,
                    proof: e.proof.clone(),
                    signer_evidence: e.signer_evidence.clone(),
                })
                .collect(),
            completeness: Some(Completeness {
                statement,
                signature,
            }),
        })
    }

    /// Its own tenants' entries; everything for the admin and audit roles.
    pub(super) fn may_read_entry(&self, caller: &Caller, entry: &serde_json::Value) -> bool {
        if Policies::may_read_all_evidence(&caller.client) {
            return true;
        }
        entry
            .get("tenant")
            .and_then(|t| t.as_str())
            .and_then(|t| t.parse().ok())
            .is_some_and(|t| caller.client.tenants.contains(&t))
    }
}
