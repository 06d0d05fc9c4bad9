//! The evidence views the API serves (the latest checkpoint, an entry with its proof, a
//! consistency proof, tlog-tiles), and the service's health: built here from the log, so the
//! HTTP layer only turns them into responses.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::{App, Caller, Error};
use crate::audit::note;
use crate::audit::tiles::TileRef;
use crate::policy::Policies;

/// `GET /v1/audit/checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointView {
    pub origin: String,
    pub tree_size: u64,
    pub root_hash: Option<String>,
    pub signed_at: String,
    /// The C2SP signed note.
    pub checkpoint: String,
    pub log_public_key: String,
    pub log_key_id: String,
    /// Base64 DER RFC 3161 `TimeStampResp` over the note, once the TSA gave it.
    pub timestamp: Option<String>,
}

/// `GET /v1/audit/entries/{index}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryView {
    pub index: u64,
    pub entry: serde_json::Value,
    pub leaf_hash: String,
    pub tree_size: u64,
    pub inclusion_proof: Vec<String>,
    pub checkpoint: String,
    /// The C2SP `tlog-proof@v1` (its `extra` line is the canonical entry).
    pub proof: String,
    /// The signer evidence a format-2 entry commits to, from the vault (checked against the
    /// commitment), or what became of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_evidence: Option<crate::vault::SignerEvidence>,
}

/// `GET /v1/audit/consistency`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsistencyView {
    pub from: u64,
    pub to: u64,
    pub root_from: Option<String>,
    pub root_to: Option<String>,
    pub proof: Vec<String>,
    pub checkpoint: Option<String>,
}

/// `/readyz`: ready when the token is logged in and the evidence log writable.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub token: bool,
    pub evidence_log: bool,
    pub shutting_down: bool,
}

impl App {
    /// The latest signed checkpoint with the log's key and its timestamp.
    pub fn checkpoint_view(&self) -> Result<CheckpointView, Error> {
        let cp = self.log.latest_checkpoint().ok_or(Error::NoCheckpointYet)?;
        let root = note::SignedNote::parse(&cp.note)
            .ok()
            .and_then(|n| note::Checkpoint::parse_body(&n.text).ok());
        let public = self.log.public_key();
        Ok(CheckpointView {
            origin: self.log.origin().to_owned(),
            tree_size: cp.tree_size,
            root_hash: root.map(|c| B64.encode(c.root)),
            signed_at: crate::clock::rfc3339(cp.signed_at),
            checkpoint: cp.note.clone(),
            log_public_key: crate::pki::public_key_pem(&public),
            log_key_id: format!("{:08x}", note::key_id(&public)),
            timestamp: self.timestamps.get(cp.tree_size).map(|t| t.to_string()),
        })
    }

    /// Entry `index` with its inclusion proof to the latest checkpoint, if the caller may read
    /// its tenant's evidence.
    pub async fn entry_view(&self, caller: &Caller, index: u64) -> Result<EntryView, Error> {
        let proof = self.log.prove(index).await?;
        let entry: serde_json::Value =
            serde_json::from_slice(&proof.entry).unwrap_or(serde_json::Value::Null);
        if !self.may_read_entry(caller, &entry) {
            return Err(Error::Forbidden(format!(
                "entry {index} belongs to a tenant client `{}` may not read",
                caller.identity.identity
            )));
        }
        let signer_evidence = self.signer_evidence(&entry).await;
        Ok(EntryView {
            signer_evidence,
            index,
            entry,
            leaf_hash: B64.encode(proof.leaf_hash),
            tree_size: proof.checkpoint.tree_size,
            inclusion_proof: proof.proof.hashes.iter().map(|h| B64.encode(h)).collect(),
            checkpoint: proof.checkpoint.note.clone(),
            proof: proof.proof.render(),
        })
    }

    /// An RFC 6962 consistency proof between two sizes the latest checkpoint covers.
    pub async fn consistency_view(&self, from: u64, to: u64) -> Result<ConsistencyView, Error> {
        let proof = self.log.consistency(from, to).await?;
        Ok(ConsistencyView {
            from,
            to,
            root_from: self.log.root(from).await.ok().map(|h| B64.encode(h)),
            root_to: self.log.root(to).await.ok().map(|h| B64.encode(h)),
            proof: proof.iter().map(|h| B64.encode(h)).collect(),
            checkpoint: self.log.latest_checkpoint().map(|c| c.note.clone()),
        })
    }

    /// C2SP tlog-tiles: the latest checkpoint's signed note.
    pub fn tlog_checkpoint(&self) -> Result<String, Error> {
        self.log
            .latest_checkpoint()
            .map(|cp| cp.note.clone())
            .ok_or_else(|| Error::NotFound("no checkpoint has been signed yet".into()))
    }

    /// C2SP tlog-tiles: a hash tile (any client: hashes only) or an entry bundle (the admin and
    /// audit roles: entries hold every tenant's evidence); `None` if it does not exist (yet).
    pub async fn tlog_tile(
        &self,
        caller: &Caller,
        tile: TileRef,
    ) -> Result<Option<Vec<u8>>, Error> {
        Ok(match tile {
            TileRef::Hashes { level, n, width } => self.log.hash_tile(level, n, width).await?,
            TileRef::Entries { n, width } => {
                if !Policies::may_read_all_evidence(&caller.client) {
                    return Err(Error::Forbidden(format!(
                        "entry bundles hold every tenant's evidence: client `{}` needs the admin or audit role",
                        caller.identity.identity
                    )));
                }
                self.log.entry_bundle(n, width).await?
            }
        })
    }

    /// What `/readyz` reports.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            ready: self.is_ready(),
            token: self.hsm.is_ready(),
            evidence_log: self.log.is_writable(),
            shutting_down: self.is_shutting_down(),
        }
    }

    /// Whether the process is healthy (`/healthz`): the token library is not wedged.
    pub fn is_healthy(&self) -> bool {
        self.hsm.is_healthy()
    }

    /// Every metric in the Prometheus text format (readiness refreshed first).
    pub fn render_metrics(&self) -> String {
        self.is_ready();
        // Every configured tenant's queue, at 0 when nothing waits.
        let depths: std::collections::HashMap<String, usize> =
            self.hsm.queue_depths().into_iter().collect();
        let dynamic = self.dynamic.load();
        for p in &dynamic.policies {
            let t = p.tenant.as_str();
            let depth = depths.get(t).copied().unwrap_or(0);
            self.metrics
                .token_queue_depth
                .with_label_values(&[t])
                .set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
        self.metrics.render()
    }
}

#[cfg(feature = "insecure-test-hooks")]
impl App {
    /// Test hook (feature `insecure-test-hooks` only): inject a token fault into the running
    /// service (`stall_next_call` with `millis`, `finalize_library`, `refuse_anchor_stores` with
    /// `count`, `plant_stale_handle` with `key_id` and `other`). Admin role.
    pub async fn insecure_test_fault(
        &self,
        caller: &Caller,
        req: &serde_json::Value,
    ) -> Result<(), Error> {
        caller.require(crate::config::Role::Admin)?;
        match req["fault"].as_str() {
            Some("stall_next_call") => {
                let ms = req["millis"].as_u64().unwrap_or(5000);
                self.hsm
                    .insecure_test_stall_next_call(std::time::Duration::from_millis(ms));
            }
            Some("finalize_library") => self.hsm.insecure_test_finalize_library(),
            Some("refuse_anchor_stores") => self
                .hsm
                .insecure_test_refuse_stores(req["count"].as_u64().unwrap_or(1)),
            Some("plant_stale_handle") => {
                let (id, other) = (
                    req["key_id"].as_str().unwrap_or_default().to_owned(),
                    req["other"].as_str().unwrap_or_default().to_owned(),
                );
                let hsm = self.hsm.clone();
                tokio::task::spawn_blocking(move || {
                    hsm.insecure_test_plant_stale_handle(&id, &other)
                })
                .await??;
            }
            _ => {
                return Err(Error::invalid(
                    "fault",
                    "stall_next_call, finalize_library, refuse_anchor_stores or plant_stale_handle",
                ));
            }
        }
        tracing::warn!(fault = ?req["fault"], "insecure test hook: fault injected");
        Ok(())
    }
}
