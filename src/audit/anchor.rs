//! Integrity anchors outside the evidence files, so that whoever can write the evidence
//! directory can destroy evidence but cannot alter it, or roll it back, undetected.
//!
//! - The **anchor**: the latest signed tree head (origin, size, root), kept in the token (a
//!   private data object, writable only after login) and updated after every checkpoint.
//!   Start-up refuses a log that is shorter than the anchor, whose root at the anchor's size
//!   differs, or whose checkpoint file lost the anchored checkpoint.
//! - The **tail head** (the file backend's, `storage::file::tail`): after every group commit,
//!   the tree head of the log as acknowledged, authenticated with HMAC-SHA256 under a key that
//!   never leaves the token.
//!
//! Must not name cryptoki: the token is reached through [`TokenAnchor`].

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::merkle::Hash;

/// A failure inside the token, with its cause.
pub type TokenFailure = Box<dyn std::error::Error + Send + Sync>;

/// What the token keeps for the evidence log. Blocking; called from blocking threads.
pub trait TokenAnchor: Send + Sync {
    /// HMAC-SHA256 of `message` with the log's MAC key, computed in the token.
    fn mac(&self, message: &[u8]) -> Result<[u8; 32], TokenFailure>;
    /// The stored anchors: none, one, or two if the process died while replacing it.
    fn load(&self) -> Result<Vec<Vec<u8>>, TokenFailure>;
    /// Replace the stored anchor.
    fn store(&self, value: &[u8]) -> Result<(), TokenFailure>;
}

/// The size and root of the log at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeHead {
    pub size: u64,
    pub root: Hash,
}

/// Why the token's anchor could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnchorError {
    #[error("the token's log anchor is unreadable: {0}")]
    Unreadable(String),
    #[error("the token's log anchor holds a malformed root")]
    MalformedRoot,
}

/// The anchor as stored in the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    pub origin: String,
    pub size: u64,
    /// Base64 root hash at `size`.
    pub root: String,
}

impl Anchor {
    pub fn new(origin: &str, head: TreeHead) -> Self {
        Self {
            origin: origin.to_owned(),
            size: head.size,
            root: B64.encode(head.root),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Invariant: a struct of strings and an integer always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, AnchorError> {
        serde_json::from_slice(bytes).map_err(|e| AnchorError::Unreadable(e.to_string()))
    }

    pub fn root_hash(&self) -> Result<Hash, AnchorError> {
        B64.decode(&self.root)
            .ok()
            .and_then(|r| Hash::try_from(r.as_slice()).ok())
            .ok_or(AnchorError::MalformedRoot)
    }
}
