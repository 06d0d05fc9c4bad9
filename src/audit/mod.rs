//! The evidence log's formats and shared types, pure: entries (canonical JSON), the RFC 6962
//! tree and its C2SP tiles, signed notes and checkpoints, proofs, the signing order, RFC 3161
//! timestamps, evidence bundles, and the one streaming verifier of a log. Where the log lives
//! (files or PostgreSQL) is `storage`'s: this module reads and writes no state of its own.
//!
//! Must not name axum or cryptoki: the token signs checkpoints through [`CheckpointSigner`].

pub mod anchor;
pub mod bundle;
pub mod entry;
pub mod merkle;
pub mod note;
pub mod order;
pub mod tiled;
pub mod tiles;
pub mod timestamp;
pub mod verify;

use std::io;
use std::sync::Arc;

use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};

pub use entry::{Actor, Entry};
use merkle::Hash;
use note::{Checkpoint, TlogProof};

/// File names of the evidence log's file format (the file backend's, and `audit export`'s).
pub const ENTRIES_FILE: &str = "entries.jsonl";
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";
pub const LOG_KEY_FILE: &str = "log-key.pem";

/// Signs checkpoint notes with the log key. Blocking; called from a blocking thread.
pub trait CheckpointSigner: Send + Sync {
    fn public_key(&self) -> VerifyingKey;
    /// DER ECDSA P-256 signature over SHA-256(`message`).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, anchor::TokenFailure>;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the evidence log in {0} is in use by another Signet process")]
    Locked(String),
    #[error("evidence log I/O on {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the evidence log is not writable: {0}")]
    Unwritable(String),
    #[error(
        "the evidence log does not match its last signed checkpoint: {0}; run `signet audit verify` on it"
    )]
    Inconsistent(String),
    /// The log differs from the anchors kept outside it (the token's signed tree head, the
    /// MAC-authenticated tail head): rolled back, truncated or rewritten.
    #[error(
        "the evidence log does not match its integrity anchor: {0}. Signet refuses to start; see runbooks/evidence-log-restore.md (a deliberate restore from backup is accepted with `signet audit accept-restore`)"
    )]
    AnchorMismatch(String),
    /// A complete line that does not parse: corruption, never cut.
    #[error(
        "{file} line {line} is complete but invalid ({reason}): the file is corrupted; Signet refuses to start (see runbooks/evidence-log-disk-full-or-corrupted.md)"
    )]
    Corrupt {
        file: &'static str,
        line: u64,
        reason: String,
    },
    #[error("the token's log anchor: {0}")]
    Token(String),
    #[error("entry {0} does not exist")]
    NoSuchEntry(u64),
    #[error(
        "entry {index} is not covered by a signed checkpoint yet (latest covers {size} entries)"
    )]
    NotYetCheckpointed { index: u64, size: u64 },
    #[error(transparent)]
    Proof(#[from] merkle::ProofError),
    #[error("checkpoint signing failed: {0}")]
    Sign(#[source] anchor::TokenFailure),
    #[error("the evidence log is closed")]
    Closed,
    #[error("cannot serialise an entry: {0}")]
    Serialize(String),
    /// A signature made with a version that the log has already replaced: sign again with
    /// `Violation::active`.
    #[error(transparent)]
    Superseded(#[from] order::Violation),
    /// The database (PostgreSQL backend) did not answer or failed: nothing was acknowledged.
    #[error("the evidence store is unavailable: {0}")]
    Storage(String),
    /// Another replica took over this request's idempotency claim after its lease ran out;
    /// its answer is the one recorded.
    #[error("the idempotency claim was taken over by another replica")]
    ClaimLost,
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Locked(_) => "locked",
            Error::Io { .. } => "io",
            Error::Unwritable(_) => "unwritable",
            Error::Inconsistent(_) => "inconsistent",
            Error::AnchorMismatch(_) => "anchor_mismatch",
            Error::Corrupt { .. } => "corrupt",
            Error::Token(_) => "token",
            Error::NoSuchEntry(_) => "no_such_entry",
            Error::NotYetCheckpointed { .. } => "not_yet_checkpointed",
            Error::Proof(_) => "proof",
            Error::Sign(_) => "sign",
            Error::Closed => "closed",
            Error::Serialize(_) => "serialize",
            Error::Superseded(_) => "superseded",
            Error::Storage(_) => "storage",
            Error::ClaimLost => "claim_lost",
        }
    }
}

/// What a client gets back with a signature: where its evidence is in the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub log_origin: String,
    pub index: u64,
    /// Base64 RFC 6962 leaf hash of the canonical entry.
    pub leaf_hash: String,
}

/// A checkpoint as stored in `checkpoints.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCheckpoint {
    pub tree_size: u64,
    /// Unix seconds when it was signed.
    pub signed_at: u64,
    /// The C2SP signed note.
    pub note: String,
}

/// Everything needed to prove one entry.
#[derive(Debug, Clone)]
pub struct EntryProof {
    pub index: u64,
    pub entry: Vec<u8>,
    pub leaf_hash: Hash,
    pub checkpoint: Arc<StoredCheckpoint>,
    pub proof: TlogProof,
}

impl EntryProof {
    /// Entry `index` (its canonical bytes, as stored) with its inclusion proof `hashes` and
    /// `leaf_hash`, both computed from the stored tree, against `checkpoint`, also as a C2SP
    /// tlog-proof. Nothing is served that a client would reject: the stored entry must hash to
    /// the tree's leaf, and the proof must lead to the checkpoint's signed root (a damaged
    /// entry, tile or row is refused here).
    pub fn checked(
        index: u64,
        entry: Vec<u8>,
        leaf_hash: Hash,
        hashes: Vec<Hash>,
        checkpoint: Arc<StoredCheckpoint>,
    ) -> Result<Self, Error> {
        if merkle::leaf_hash(&entry) != leaf_hash {
            return Err(Error::Inconsistent(format!(
                "the stored entry {index} differs from its leaf hash in the tree; run `signet audit verify`"
            )));
        }
        let signed = note::SignedNote::parse(&checkpoint.note)
            .and_then(|n| Checkpoint::parse_body(&n.text))
            .map_err(|e| {
                Error::Inconsistent(format!("checkpoint at size {}: {e}", checkpoint.tree_size))
            })?;
        merkle::verify_inclusion(&leaf_hash, index, signed.size, &hashes, &signed.root).map_err(
            |e| {
                Error::Inconsistent(format!(
                    "the stored tree's proof of entry {index} does not lead to the checkpoint at size {} ({e}): a stored tile is damaged; run `signet audit verify`",
                    signed.size
                ))
            },
        )?;
        let proof = TlogProof {
            extra: Some(entry.clone()),
            index,
            hashes,
            checkpoint: checkpoint.note.clone(),
        };
        Ok(Self {
            index,
            entry,
            leaf_hash,
            checkpoint,
            proof,
        })
    }
}
