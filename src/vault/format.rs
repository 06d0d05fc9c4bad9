//! The vault's formats and its software cryptography: the salted commitment an entry holds,
//! a record sealed with its own data key, keyed subject tags. Pure: no I/O, no token.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Domain separation of the commitment hash.
const COMMITMENT_DOMAIN: &[u8] = b"signet signer commitment v1\0";
/// Domain separation of subject tags and of the signer's part of a request hash.
const SUBJECT_DOMAIN: &[u8] = b"signet subject tag v1\0";
const REQUEST_DOMAIN: &[u8] = b"signet request signer v1\0";
/// What a data key's wrapping is bound to (with the commitment).
pub const DATA_KEY_DOMAIN: &[u8] = b"signet vault data key v1\0";
/// What the index key's wrapping is bound to.
pub const INDEX_KEY_DOMAIN: &[u8] = b"signet vault index key v1\0";

/// A 256-bit key in memory, wiped when dropped.
pub type Key = Zeroizing<[u8; 32]>;

/// Why sealed evidence could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("the record does not decrypt with its data key (altered or wrong key)")]
    Decrypt,
    #[error("the record's content is not signer evidence: {0}")]
    Content(String),
    #[error("the signer evidence does not match the entry's commitment")]
    CommitmentMismatch,
    #[error("{0} is not valid base64")]
    Base64(&'static str),
}

/// The signer evidence as the vault keeps it (encrypted): the salt of the commitment and the
/// `signer` object as the client sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// Base64 of 32 random bytes.
    pub salt: String,
    pub signer: serde_json::Value,
}

impl Evidence {
    /// Evidence with a fresh random salt.
    pub fn new(signer: serde_json::Value) -> Self {
        Self {
            salt: B64.encode(random_key().as_slice()),
            signer,
        }
    }

    /// The hex commitment an entry holds: SHA-256 over a domain, the salt and the RFC 8785
    /// form of `signer`. Anyone with the evidence can recompute it; nobody without the salt
    /// can test a guess of the signer against it.
    pub fn commitment(&self) -> Result<String, FormatError> {
        let salt = B64
            .decode(&self.salt)
            .map_err(|_| FormatError::Base64("the salt"))?;
        let jcs = serde_json_canonicalizer::to_vec(&self.signer)
            .map_err(|e| FormatError::Content(e.to_string()))?;
        Ok(hex::encode(
            crate::sha256::Hasher::new()
                .chain(COMMITMENT_DOMAIN)
                .chain(&salt)
                .chain(&jcs)
                .finish(),
        ))
    }

    /// Check the evidence against an entry's commitment.
    pub fn check(&self, commitment: &str) -> Result<(), FormatError> {
        use subtle::ConstantTimeEq;
        let ours = self.commitment()?;
        if bool::from(ours.as_bytes().ct_eq(commitment.as_bytes())) {
            Ok(())
        } else {
            Err(FormatError::CommitmentMismatch)
        }
    }
}

/// A vault record as stored: what it is about (no personal data) and its content, sealed or
/// erased.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    /// The index of the entry that commits to it.
    pub index: u64,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    /// When it was signed (µs since the epoch).
    pub time_us: i64,
    /// When its retention ends (µs since the epoch); `None`: without limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_until_us: Option<i64>,
    pub retention_class: String,
    /// The entry's `signer_commitment`.
    pub commitment: String,
    pub content: Content,
}

/// A record's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Content {
    Sealed(Sealed),
    /// Erased: the data key and the ciphertext are gone; this says when and why.
    Erased(Erasure),
}

/// Signer evidence sealed for the vault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// Keyed hashes (hex HMAC-SHA256 with the vault's index key) of the subject identifiers
    /// (`[retention] subject_fields`), to find a data subject's records.
    pub tags: Vec<String>,
    /// The generation of the key-encryption key (in the token) that wraps `wrapped_key`.
    pub kek: u32,
    /// Base64: the record's data key, encrypted in the token with the KEK.
    pub wrapped_key: String,
    /// Base64: nonce ‖ AES-256-GCM ciphertext ‖ tag of the [`Evidence`] (RFC 8785 JSON), with
    /// the commitment as associated data.
    pub ciphertext: String,
}

/// How a record was erased.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Erasure {
    /// RFC 3339 UTC.
    pub erased_at: String,
    /// `retention` (the sweep) or `subject` (a data subject's request).
    pub cause: String,
    pub reason: String,
    /// The `evidence_erased` entry that records it.
    pub entry: u64,
}

/// The signer evidence of a format-2 entry as the API and bundles show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum SignerEvidence {
    /// The evidence and the salt of the entry's commitment: anyone can recompute the
    /// commitment ([`Evidence::check`]); Signet checked it before showing it.
    Present {
        signer: serde_json::Value,
        salt: String,
    },
    /// Erased: the evidence is gone for good; the entry's commitment stays.
    Erased {
        erased_at: String,
        /// `retention` or `subject`.
        cause: String,
        reason: String,
        /// The `evidence_erased` entry recording the erasure.
        erasure_entry: u64,
    },
    /// The vault has it but cannot read it (its key-encryption key was destroyed: a record
    /// restored from a backup after it was erased).
    Unreadable { detail: String },
    /// The vault has no record for the entry.
    Missing,
}

impl SignerEvidence {
    /// Check present evidence against an entry's commitment (other states say nothing to check).
    pub fn check(&self, commitment: &str) -> Result<(), FormatError> {
        match self {
            SignerEvidence::Present { signer, salt } => Evidence {
                salt: salt.clone(),
                signer: signer.clone(),
            }
            .check(commitment),
            _ => Ok(()),
        }
    }
}

/// Everything the vault needs to know about a signature to seal its signer evidence.
#[derive(Debug, Clone)]
pub struct Context {
    pub tenant: String,
    pub transaction_id: Option<String>,
    pub time_us: i64,
    pub retain_until_us: Option<i64>,
    pub retention_class: String,
}

/// Encrypt `evidence` with `data_key` (AES-256-GCM, a random nonce, the commitment as
/// associated data): base64 of nonce ‖ ciphertext ‖ tag.
pub fn encrypt(
    data_key: &Key,
    evidence: &Evidence,
    commitment: &str,
) -> Result<String, FormatError> {
    let plain = serde_json_canonicalizer::to_vec(evidence)
        .map_err(|e| FormatError::Content(e.to_string()))?;
    let key = aead_key(data_key)?;
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| FormatError::Decrypt)?;
    let mut buf = Zeroizing::new(plain);
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(commitment.as_bytes()),
        &mut *buf,
    )
    .map_err(|_| FormatError::Decrypt)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(B64.encode(out))
}

/// Decrypt a record's ciphertext and check it against the commitment.
pub fn decrypt(
    data_key: &Key,
    ciphertext: &str,
    commitment: &str,
) -> Result<Evidence, FormatError> {
    let bytes = B64
        .decode(ciphertext)
        .map_err(|_| FormatError::Base64("the ciphertext"))?;
    if bytes.len() < NONCE_LEN {
        return Err(FormatError::Decrypt);
    }
    let (nonce, sealed) = bytes.split_at(NONCE_LEN);
    let key = aead_key(data_key)?;
    let mut buf = Zeroizing::new(sealed.to_vec());
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| FormatError::Decrypt)?;
    let plain = key
        .open_in_place(nonce, Aad::from(commitment.as_bytes()), &mut buf)
        .map_err(|_| FormatError::Decrypt)?;
    let evidence: Evidence =
        serde_json::from_slice(plain).map_err(|e| FormatError::Content(e.to_string()))?;
    evidence.check(commitment)?;
    Ok(evidence)
}

/// The keyed tag of one subject identifier (trimmed, lower-cased: `Ann@Example.com` and
/// `ann@example.com` are the same subject).
pub fn subject_tag(index_key: &Key, value: &str) -> String {
    let normalized = value.trim().to_lowercase();
    hmac_hex(index_key, SUBJECT_DOMAIN, normalized.as_bytes())
}

/// The tags of the subject fields `fields` that `signer` holds as strings (or numbers).
pub fn subject_tags(index_key: &Key, signer: &serde_json::Value, fields: &[String]) -> Vec<String> {
    let mut tags: Vec<String> = fields
        .iter()
        .filter_map(|f| match signer.get(f)? {
            serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .map(|v| subject_tag(index_key, &v))
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

/// What stands for the `signer` in a request's hash (idempotency): a keyed hash, so the
/// recorded request hash cannot be used to test guesses of the signer.
pub fn request_signer_hash(index_key: &Key, signer: &serde_json::Value) -> String {
    let jcs = serde_json_canonicalizer::to_vec(signer).unwrap_or_default();
    hmac_hex(index_key, REQUEST_DOMAIN, &jcs)
}

/// 32 random bytes from the system's generator.
pub fn random_key() -> Key {
    let mut k = Zeroizing::new([0u8; 32]);
    // The system generator fails only if the kernel has none; nothing can be sealed then.
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(k.as_mut_slice()).expect("the system random generator is available");
    k
}

fn aead_key(k: &Key) -> Result<LessSafeKey, FormatError> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, k.as_slice()).map_err(|_| FormatError::Decrypt)?,
    ))
}

fn hmac_hex(k: &Key, domain: &[u8], data: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, k.as_slice());
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
    ctx.update(domain);
    ctx.update(data);
    hex::encode(ctx.sign().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_evidence_opens_only_with_its_key_and_commitment() {
        let ev = Evidence::new(serde_json::json!({"email": "ann@example.com", "ip": "192.0.2.7"}));
        let c = ev.commitment().unwrap();
        assert_eq!(c.len(), 64);
        let again = Evidence {
            salt: B64.encode([0u8; 32]),
            ..ev.clone()
        };
        assert_ne!(
            again.commitment().unwrap(),
            c,
            "the salt is part of the commitment"
        );
        let k = random_key();
        let ct = encrypt(&k, &ev, &c).unwrap();
        assert!(!ct.contains("ann@example.com"));
        assert_eq!(decrypt(&k, &ct, &c).unwrap(), ev);
        assert!(matches!(
            decrypt(&random_key(), &ct, &c),
            Err(FormatError::Decrypt)
        ));
        let other = again.commitment().unwrap();
        assert!(
            matches!(decrypt(&k, &ct, &other), Err(FormatError::Decrypt)),
            "bound to its commitment"
        );
        // A record sealed honestly under the wrong commitment decrypts but is refused.
        let lie = encrypt(&k, &again, &c).unwrap();
        assert!(matches!(
            decrypt(&k, &lie, &c),
            Err(FormatError::CommitmentMismatch)
        ));
    }

    #[test]
    fn subject_tags_are_keyed_normalised_and_only_for_subject_fields() {
        let k = random_key();
        let signer =
            serde_json::json!({"email": " Ann@Example.com", "id": 42, "name": "Ann", "ua": "x"});
        let fields = vec!["email".to_owned(), "id".to_owned()];
        let tags = subject_tags(&k, &signer, &fields);
        assert_eq!(tags.len(), 2);
        assert!(tags.contains(&subject_tag(&k, "ann@example.com")));
        assert!(tags.contains(&subject_tag(&k, "42")));
        assert!(
            !tags.contains(&subject_tag(&k, "Ann")),
            "name is not a subject field"
        );
        assert_ne!(
            subject_tag(&random_key(), "ann@example.com"),
            subject_tag(&k, "ann@example.com"),
            "tags depend on the key"
        );
        assert_eq!(
            request_signer_hash(&k, &signer),
            request_signer_hash(&k, &signer.clone())
        );
    }
}
