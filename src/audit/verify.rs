//! Offline verification, for auditors: a whole log directory, or one receipt.
//!
//! Pure apart from reading the files it is given: no token, no network, no service state.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::{DerSignature, VerifyingKey};
use serde::Serialize;
use signature::hazmat::PrehashVerifier;

use super::entry::{self, Entry, EntryError};
use super::merkle::{self, Tree};
use super::note::{self, TlogProof};
use super::order::ActiveVersions;
use super::{CHECKPOINTS_FILE, ENTRIES_FILE, Receipt, StoredCheckpoint};
use crate::pki::CertInfo;

/// A log that verified.
#[derive(Debug, Clone, Serialize)]
pub struct DirReport {
    /// The size of the checkpoint given with `--anchor`, which the log matches.
    pub anchor_size: Option<u64>,
    pub entries: u64,
    pub checkpoints: usize,
    pub latest_checkpoint_size: u64,
    /// Entries after the latest checkpoint: structurally valid, not yet covered by a signature.
    pub unsigned_tail: u64,
    pub origin: Option<String>,
    pub events: BTreeMap<String, u64>,
}

/// Why a log did not verify, naming the first bad entry where one can be named.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct DirFailure {
    pub first_bad_entry: Option<u64>,
    pub message: String,
}

impl DirFailure {
    fn entry(index: u64, message: String) -> Self {
        Self {
            first_bad_entry: Some(index),
            message,
        }
    }
    fn other(message: String) -> Self {
        Self {
            first_bad_entry: None,
            message,
        }
    }
}

/// Recompute every entry's hash, the hash chain, the tree, and every checkpoint signature.
pub fn verify_dir(dir: &Path, key: &VerifyingKey) -> Result<DirReport, DirFailure> {
    verify_dir_anchored(dir, key, None)
}

/// [`verify_dir`], and check the log against a checkpoint note the auditor kept (`anchor`):
/// the log must hold at least its size and have its root there, so it only grew since.
pub fn verify_dir_anchored(
    dir: &Path,
    key: &VerifyingKey,
    anchor: Option<&str>,
) -> Result<DirReport, DirFailure> {
    let entries_path = dir.join(ENTRIES_FILE);
    let data = std::fs::read(&entries_path)
        .map_err(|e| DirFailure::other(format!("cannot read {}: {e}", entries_path.display())))?;
    let mut tree = Tree::new();
    let mut events: BTreeMap<String, u64> = BTreeMap::new();
    let mut active = ActiveVersions::default();
    let mut rest: &[u8] = &data;
    while !rest.is_empty() {
        let index = tree.len();
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return Err(DirFailure::entry(
                index,
                format!("entry {index} is truncated (the file ends mid-entry)"),
            ));
        };
        let line = &rest[..nl];
        rest = &rest[nl + 1..];
        let e: Entry = entry::parse_stored(line, index).map_err(|err| match err {
            EntryError::WrongIndex { found, .. } => DirFailure::entry(
                index,
                format!("entry {index} holds index {found}: an entry was removed, inserted or reordered here"),
            ),
            other => DirFailure::entry(index, format!("entry {index} {other}")),
        })?;
        let want = index
            .checked_sub(1)
            .and_then(|i| tree.leaf(i))
            .map(|h| B64.encode(h));
        if e.previous_leaf_hash != want {
            let bad = index.saturating_sub(1);
            return Err(DirFailure::entry(
                bad,
                format!(
                    "entry {bad} was altered: its hash no longer matches the link stored in entry {index}"
                ),
            ));
        }
        active.observe(&e).map_err(|v| {
            DirFailure::entry(
                index,
                format!("entry {index} breaks the signing order: {v}"),
            )
        })?;
        *events.entry(e.event.clone()).or_default() += 1;
        tree.push(merkle::leaf_hash(line));
    }

    let cp_path = dir.join(CHECKPOINTS_FILE);
    let cp_data = match std::fs::read(&cp_path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(DirFailure::other(format!(
                "cannot read {}: {e}",
                cp_path.display()
            )));
        }
    };
    let mut origin: Option<String> = None;
    let mut last_good = 0u64;
    let mut count = 0usize;
    for (n, line) in cp_data.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let stored: StoredCheckpoint = serde_json::from_slice(line).map_err(|e| {
            DirFailure::other(format!("checkpoint line {} is not valid JSON: {e}", n + 1))
        })?;
        let body = note::SignedNote::parse(&stored.note)
            .and_then(|sn| note::Checkpoint::parse_body(&sn.text))
            .map_err(|e| DirFailure::other(format!("checkpoint line {}: {e}", n + 1)))?;
        let o = origin.get_or_insert_with(|| body.origin.clone());
        if body.origin != *o {
            return Err(DirFailure::other(format!(
                "checkpoint line {} has origin `{}`, expected `{o}`",
                n + 1,
                body.origin
            )));
        }
        note::verify_checkpoint(&stored.note, o, key)
            .map_err(|e| DirFailure::other(format!("checkpoint at size {}: {e}", body.size)))?;
        if body.size != stored.tree_size {
            return Err(DirFailure::other(format!(
                "checkpoint line {}: stored size differs from the signed size",
                n + 1
            )));
        }
        if body.size < last_good {
            return Err(DirFailure::other(format!(
                "checkpoint at size {} follows one at size {last_good}: the log shrank",
                body.size
            )));
        }
        if body.size > tree.len() {
            return Err(DirFailure::entry(
                tree.len(),
                format!(
                    "the signed checkpoint covers {} entries but the log holds {}: entry {} onwards is missing (truncated)",
                    body.size,
                    tree.len(),
                    tree.len()
                ),
            ));
        }
        let root = tree
            .root(body.size)
            .map_err(|e| DirFailure::other(e.to_string()))?;
        if root != body.root {
            return Err(DirFailure::entry(
                last_good,
                format!(
                    "entries {last_good}..{} do not match the signed checkpoint at size {} (altered, with the hash chain rewritten)",
                    body.size - 1,
                    body.size
                ),
            ));
        }
        last_good = body.size;
        count += 1;
    }
    let anchor_size = match anchor {
        None => None,
        Some(text) => Some(check_kept_anchor(&tree, text, origin.as_deref(), key)?),
    };
    Ok(DirReport {
        anchor_size,
        entries: tree.len(),
        checkpoints: count,
        latest_checkpoint_size: last_good,
        unsigned_tail: tree.len() - last_good,
        origin,
        events,
    })
}

/// The log extends the checkpoint the auditor kept: same root at its size.
fn check_kept_anchor(
    tree: &Tree,
    note_text: &str,
    origin: Option<&str>,
    key: &VerifyingKey,
) -> Result<u64, DirFailure> {
    let body = note::SignedNote::parse(note_text)
        .and_then(|sn| note::Checkpoint::parse_body(&sn.text))
        .map_err(|e| DirFailure::other(format!("the anchor is not a checkpoint note: {e}")))?;
    if let Some(o) = origin
        && o != body.origin
    {
        return Err(DirFailure::other(format!(
            "the anchor is a checkpoint of log `{}`, this log is `{o}`",
            body.origin
        )));
    }
    note::verify_checkpoint(note_text, &body.origin, key).map_err(|e| {
        DirFailure::other(format!(
            "the anchor's signature does not verify with the log key: {e}"
        ))
    })?;
    if body.size > tree.len() {
        return Err(DirFailure::entry(
            tree.len(),
            format!(
                "the log holds {} entries but the anchor you kept covers {}: the log was truncated or rolled back",
                tree.len(),
                body.size
            ),
        ));
    }
    let root = tree
        .root(body.size)
        .map_err(|e| DirFailure::other(e.to_string()))?;
    if root != body.root {
        return Err(DirFailure::other(format!(
            "the log's root at size {} differs from the anchor you kept: entries below {} were rewritten",
            body.size, body.size
        )));
    }
    Ok(body.size)
}

/// What `signet receipt verify` is given.
pub struct ReceiptInputs {
    pub receipt: Receipt,
    /// The `tlog-proof@v1` from `GET /v1/audit/entries/{index}`.
    pub proof: TlogProof,
    /// The entry, if the proof carries none in its `extra` line.
    pub entry: Option<Vec<u8>>,
    pub log_key: VerifyingKey,
    /// The signing certificate, to check the signature inside the entry.
    pub certificate: Option<CertInfo>,
    /// Without a certificate, succeed anyway (inclusion only) instead of failing.
    pub allow_no_certificate: bool,
    /// The CA the signing certificate must chain to (checked at the entry's time).
    pub ca: Option<CertInfo>,
    /// The digest the holder expects the receipt to cover (`--digest` or `--document`).
    pub expected_digest: Option<[u8; 32]>,
    /// The base64 signature the client received, to bind it to the entry.
    pub signature: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReceiptReport {
    pub index: u64,
    pub log_origin: String,
    pub checkpoint_size: u64,
    pub event: String,
    pub time: String,
    pub key_id: Option<String>,
    pub policy_id: Option<String>,
    pub transaction_id: Option<String>,
    /// Hex digest the entry covers.
    pub digest: Option<String>,
    pub signature_checked: bool,
    /// The entry names this certificate by its SHA-256 fingerprint.
    pub certificate_sha256: Option<String>,
    pub chain_checked: bool,
    pub digest_checked: bool,
}

/// Verify a receipt offline: the entry matches the receipt, the proof includes it in a
/// checkpoint signed by the log key, the certificate is the one the entry names (SHA-256
/// fingerprint) and its signature verifies, and (as asked) the certificate chains to the CA
/// and the entry covers the expected digest.
pub fn verify_receipt(input: &ReceiptInputs) -> Result<ReceiptReport, String> {
    let r = &input.receipt;
    let entry_bytes = match (&input.proof.extra, &input.entry) {
        (_, Some(e)) => e.clone(),
        (Some(e), None) => e.clone(),
        (None, None) => {
            return Err("no entry: the proof has no extra line and no entry was given".into());
        }
    };
    let entry: Entry =
        entry::parse_stored(&entry_bytes, r.index).map_err(|e| format!("the entry {e}"))?;
    if let (Some(a), Some(b)) = (&input.proof.extra, &input.entry)
        && a != b
    {
        return Err("the entry given differs from the entry in the proof".into());
    }
    let leaf = merkle::leaf_hash(&entry_bytes);
    if B64.encode(leaf) != r.leaf_hash {
        return Err("the entry's leaf hash differs from the receipt's".into());
    }
    if input.proof.index != r.index {
        return Err(format!(
            "the proof is for index {}, the receipt for {}",
            input.proof.index, r.index
        ));
    }
    let cp = note::verify_checkpoint(&input.proof.checkpoint, &r.log_origin, &input.log_key)
        .map_err(|e| format!("checkpoint: {e}"))?;
    if cp.origin != r.log_origin {
        return Err(format!(
            "the checkpoint is from log `{}`, the receipt from `{}`",
            cp.origin, r.log_origin
        ));
    }
    merkle::verify_inclusion(&leaf, r.index, cp.size, &input.proof.hashes, &cp.root)
        .map_err(|e| format!("inclusion proof: {e}"))?;

    if let Some(sig) = &input.signature
        && entry.signature.as_deref() != Some(sig.as_str())
    {
        return Err("the signature received differs from the one in the evidence entry".into());
    }
    let digest_checked = match &input.expected_digest {
        None => false,
        Some(want) => {
            let want = hex::encode(want);
            match &entry.digest {
                Some(d) if d.value == want => true,
                Some(d) => {
                    return Err(format!(
                        "the receipt covers digest {}, not the expected {want}",
                        d.value
                    ));
                }
                None => return Err("the entry records no digest".into()),
            }
        }
    };
    let (signature_checked, chain_checked) = match &input.certificate {
        Some(cert) => {
            check_signature_and_certificate(&entry, cert, input.ca.as_ref())?;
            (true, input.ca.is_some())
        }
        None if input.allow_no_certificate => (false, false),
        None => {
            return Err("no signing certificate: the signature was NOT checked (pass --certificate, or --no-certificate to check only that the entry is in the log)".into());
        }
    };
    Ok(ReceiptReport {
        index: r.index,
        log_origin: r.log_origin.clone(),
        checkpoint_size: cp.size,
        event: entry.event.clone(),
        time: entry.time.clone(),
        key_id: entry.key_id.clone(),
        policy_id: entry.policy.as_ref().map(|p| p.id.clone()),
        transaction_id: entry.transaction_id.clone(),
        digest: entry.digest.as_ref().map(|d| d.value.clone()),
        signature_checked,
        certificate_sha256: entry.certificate_sha256.clone(),
        chain_checked,
        digest_checked,
    })
}

/// The certificate is the one the entry names, its key verifies the entry's signature over
/// the entry's digest, and (with a CA) it chains to the CA, may sign, and was valid then.
pub(crate) fn check_signature_and_certificate(
    entry: &Entry,
    cert: &CertInfo,
    ca: Option<&CertInfo>,
) -> Result<(), String> {
    let (Some(sig_b64), Some(digest)) = (&entry.signature, &entry.digest) else {
        return Err("the entry is not a signature entry".into());
    };
    match &entry.certificate_sha256 {
        Some(fp) if *fp == cert.fingerprint_sha256 => {}
        Some(fp) => {
            return Err(format!(
                "the certificate given (SHA-256 {}) is not the one the entry names (SHA-256 {fp})",
                cert.fingerprint_sha256
            ));
        }
        // Entries written before `certificate_sha256` existed name only the serial: accept
        // the serial only together with a CA check.
        None if ca.is_some()
            && entry.certificate_serial.as_deref() == Some(cert.serial_hex.as_str()) => {}
        None => {
            return Err("the entry names no certificate fingerprint; pass --ca to bind the certificate by serial and issuer".into());
        }
    }
    let key = cert
        .public_key
        .ok_or("the certificate's key is not P-256")?;
    let der = B64
        .decode(sig_b64)
        .map_err(|_| "the entry's signature is not base64")?;
    let sig =
        DerSignature::from_bytes(&der).map_err(|_| "the entry's signature is not DER ECDSA")?;
    let digest = hex::decode(&digest.value).map_err(|_| "the entry's digest is not hex")?;
    key.verify_prehash(&digest, &sig)
        .map_err(|_| "the signature does not verify with the certificate's key")?;
    if let Some(ca) = ca {
        crate::pki::verify_issued_by(&cert.der, ca)
            .map_err(|e| format!("the certificate does not chain to the CA given: {e}"))?;
        if !cert.allows_digital_signature {
            return Err("the certificate's key usage does not allow digital signatures".into());
        }
        if cert.is_ca {
            return Err("the certificate is a CA certificate, not a signing certificate".into());
        }
        let at = crate::clock::parse_rfc3339(&entry.time)
            .ok_or_else(|| format!("the entry's time `{}` is not RFC 3339", entry.time))?;
        cert.check_window(at)
            .map_err(|e| format!("at the entry's time {}: {e}", entry.time))?;
    }
    Ok(())
}
