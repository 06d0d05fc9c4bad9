//! Offline verification, for auditors: a whole log from any source, or one receipt.
//!
//! One streaming check of a log ([`LogCheck`]): each entry canonical, at its index, linked to
//! the one before, in signing order, added to the tree's right edge (O(log n) memory, whatever
//! the log's size). Start-up recovery runs the same check over the entries it must read;
//! [`verify_log`] runs it over a [`LogSource`] (a directory, the PostgreSQL database, the
//! tlog-tiles API) and checks every stored checkpoint's signature and root as the stream
//! passes its size, then the anchors the auditor gave.
//!
//! Pure apart from reading the files it is given: no token, no network, no service state.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::{DerSignature, VerifyingKey};
use serde::Serialize;
use signature::hazmat::PrehashVerifier;

use super::anchor::Anchor;
use super::entry::{self, Entry, EntryError};
use super::merkle::{self, Hash};
use super::note::{self, TlogProof};
use super::order::{self, ActiveVersions};
use super::tiled::{Edge, Tile, TileId};
use super::{CHECKPOINTS_FILE, ENTRIES_FILE, Receipt, StoredCheckpoint};
use crate::pki::CertInfo;

/// An entry line longer than this is refused (entries are a few KiB; requests are capped far
/// below it).
pub const MAX_ENTRY_BYTES: usize = 16 << 20;

/// Why a verifier refused what it was given: the first check that failed, precisely (the
/// verdict is then `refused`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    pub reason: String,
}

impl From<String> for Refused {
    fn from(reason: String) -> Self {
        Self { reason }
    }
}

impl From<&str> for Refused {
    fn from(reason: &str) -> Self {
        Self {
            reason: reason.to_owned(),
        }
    }
}

/// The outcome of a verification: `verified` only on a success fully anchored in what the
/// verifier trusts; `unverified` when everything checked out against material found beside
/// the data; `refused` when anything did not check out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Verified,
    Unverified,
    Refused,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Verified => "verified",
            Verdict::Unverified => "unverified",
            Verdict::Refused => "refused",
        }
    }
}

/// Where the log key a log is checked with came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The auditor's own copy (`--key`).
    Given,
    /// The token's log key (`--config`).
    Token,
    /// A key stored beside the data (`log-key.pem`, the database): anyone who rewrote the log
    /// could have replaced it, so the verdict is at best `unverified`.
    BesideTheData,
}

/// What a log is checked against.
pub struct LogTrust {
    pub key: VerifyingKey,
    pub key_source: KeySource,
    /// A checkpoint note the auditor kept (`--anchor`): the log must still have its root at its
    /// size, so it only grew since.
    pub kept_checkpoint: Option<String>,
    /// The anchor kept in the token (with `--config`): the same, for the latest checkpoint the
    /// service signed.
    pub token_anchor: Option<Anchor>,
}

impl LogTrust {
    /// Check with `key` (from `source`), and no anchor yet.
    pub fn new(key: VerifyingKey, key_source: KeySource) -> Self {
        Self {
            key,
            key_source,
            kept_checkpoint: None,
            token_anchor: None,
        }
    }

    /// Also against a checkpoint the auditor kept.
    pub fn kept(mut self, note: Option<String>) -> Self {
        self.kept_checkpoint = note;
        self
    }
}

/// A log that verified.
#[derive(Debug, Clone, Serialize)]
pub struct DirReport {
    pub verdict: Verdict,
    pub key_source: KeySource,
    /// The size of the checkpoint given with `--anchor`, which the log matches.
    pub anchor_size: Option<u64>,
    /// The size of the token's anchor, which the log matches.
    pub token_anchor_size: Option<u64>,
    pub entries: u64,
    pub checkpoints: usize,
    pub latest_checkpoint_size: u64,
    /// Entries after the latest checkpoint: structurally valid, not yet covered by a signature.
    pub unsigned_tail: u64,
    pub origin: Option<String>,
    pub events: BTreeMap<String, u64>,
    /// Entries of the first format that hold a `signer` object in clear (written before
    /// signer evidence was kept apart; they cannot be erased without breaking the tree).
    pub signer_in_clear: u64,
}

/// Why a log did not verify, naming the first bad entry where one can be named.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct DirFailure {
    pub first_bad_entry: Option<u64>,
    pub message: String,
}

impl DirFailure {
    pub fn entry(index: u64, message: String) -> Self {
        Self {
            first_bad_entry: Some(index),
            message,
        }
    }
    pub fn other(message: String) -> Self {
        Self {
            first_bad_entry: None,
            message,
        }
    }
}

/// The streaming check of a log's entries, in order. O(log n) memory: the right edge of the
/// tree, the last leaf, each tenant's active version.
#[derive(Default)]
pub struct LogCheck {
    edge: Edge,
    last_leaf: Option<Hash>,
    active: ActiveVersions,
    events: BTreeMap<String, u64>,
    signer_in_clear: u64,
}

impl LogCheck {
    pub fn new() -> Self {
        Self::default()
    }

    /// Continue after entries already checked: the tree's edge at their size, the last leaf,
    /// and the active versions they made.
    pub fn resume(edge: Edge, last_leaf: Option<Hash>, active: ActiveVersions) -> Self {
        Self {
            edge,
            last_leaf,
            active,
            events: BTreeMap::new(),
            signer_in_clear: 0,
        }
    }

    /// Entries checked so far (the index of the next).
    pub fn size(&self) -> u64 {
        self.edge.size()
    }

    pub fn edge(&self) -> &Edge {
        &self.edge
    }

    pub fn last_leaf(&self) -> Option<Hash> {
        self.last_leaf
    }

    /// The tree's edge, the last leaf and the active versions.
    pub fn into_parts(self) -> (Edge, Option<Hash>, ActiveVersions) {
        (self.edge, self.last_leaf, self.active)
    }

    /// Check the next entry (its canonical line, without the newline): it parses as a
    /// canonical entry holding its own index, links to the entry before by its leaf hash, and
    /// keeps the signing order (no signature with a version after another was activated).
    /// Returns the entry and the tiles its leaf completed.
    pub fn check(&mut self, line: &[u8]) -> Result<(Entry, Vec<(TileId, Tile)>), DirFailure> {
        let index = self.size();
        let e: Entry = entry::parse_stored(line, index).map_err(|err| match err {
            EntryError::WrongIndex { found, .. } => DirFailure::entry(
                index,
                format!("entry {index} holds index {found}: an entry was removed, inserted or reordered here"),
            ),
            other => DirFailure::entry(index, format!("entry {index} {other}")),
        })?;
        if e.previous_leaf_hash != self.last_leaf.map(|h| B64.encode(h)) {
            let bad = index.saturating_sub(1);
            return Err(DirFailure::entry(
                bad,
                format!(
                    "entry {bad} was altered: its hash no longer matches the link stored in entry {index}"
                ),
            ));
        }
        self.active.observe(&e).map_err(|v| {
            DirFailure::entry(
                index,
                format!("entry {index} breaks the signing order: {v}"),
            )
        })?;
        *self.events.entry(e.event.clone()).or_default() += 1;
        if e.format() < 2 && e.signer.is_some() {
            self.signer_in_clear += 1;
        }
        let tiles = self.push_leaf(line);
        Ok((e, tiles))
    }

    /// Add an entry below a signed checkpoint whose root the caller checks (start-up): only its
    /// leaf and, if it is one, its activation.
    pub fn covered(&mut self, line: &[u8]) -> Vec<(TileId, Tile)> {
        if order::may_change_order(line)
            && let Ok(e) = serde_json::from_slice::<Entry>(line)
        {
            self.active.record(&e);
        }
        self.push_leaf(line)
    }

    /// Note an activation of an entry that is already in the tree (start-up re-reads entries
    /// below its edge only for their lookups and activations).
    pub fn record_activation(&mut self, e: &Entry) {
        self.active.record(e);
    }

    fn push_leaf(&mut self, line: &[u8]) -> Vec<(TileId, Tile)> {
        let leaf = merkle::leaf_hash(line);
        self.last_leaf = Some(leaf);
        self.edge.push(leaf)
    }
}

/// A log to verify, read in order: its entries and its stored checkpoints (ascending size).
pub trait LogSource {
    /// The next entry's canonical bytes, or `None` after the last.
    fn next_entry(&mut self) -> Result<Option<Vec<u8>>, DirFailure>;
    /// The next stored checkpoint with its position for messages ("checkpoint line N"), or
    /// `None` after the last.
    fn next_checkpoint(&mut self) -> Result<Option<(u64, StoredCheckpoint)>, DirFailure>;
}

/// Recompute every entry's hash, the hash chain, the signing order and the tree, and check
/// every stored checkpoint's signature and root (as the stream passes its size) and the
/// anchors in `trust`. Names the first entry that does not match.
pub fn verify_log(src: &mut dyn LogSource, trust: &LogTrust) -> Result<DirReport, DirFailure> {
    let key = &trust.key;
    let kept = trust
        .kept_checkpoint
        .as_deref()
        .map(|text| kept_checkpoint(text, key))
        .transpose()?;
    let token_anchor = trust
        .token_anchor
        .as_ref()
        .map(|a| {
            a.root_hash()
                .map(|root| (a.size, root))
                .map_err(|e| DirFailure::other(e.to_string()))
        })
        .transpose()?;
    let mut check = LogCheck::new();
    let mut origin: Option<String> = None;
    let mut last_good = 0u64;
    let mut count = 0usize;
    let mut next_cp = src.next_checkpoint()?;
    loop {
        while let Some((n, cp)) = next_cp.take_if(|(_, cp)| cp.tree_size <= check.size()) {
            check_checkpoint(n, &cp, &check, &mut origin, &mut last_good, key)?;
            count += 1;
            next_cp = src.next_checkpoint()?;
        }
        if let Some((size, root)) = &kept
            && *size == check.size()
            && check.edge().root() != *root
        {
            return Err(DirFailure::other(format!(
                "the log's root at size {size} differs from the anchor you kept: entries below {size} were rewritten"
            )));
        }
        if let Some((size, root)) = &token_anchor
            && *size == check.size()
            && check.edge().root() != *root
        {
            return Err(DirFailure::other(format!(
                "the log's root at size {size} differs from the token's anchor: entries below {size} were rewritten"
            )));
        }
        match src.next_entry()? {
            Some(line) => {
                check.check(&line)?;
            }
            None => break,
        }
    }
    let len = check.size();
    if let Some((_, cp)) = next_cp {
        return Err(DirFailure::entry(
            len,
            format!(
                "the signed checkpoint covers {} entries but the log holds {len}: entry {len} onwards is missing (truncated)",
                cp.tree_size
            ),
        ));
    }
    if let Some((size, _)) = &kept
        && *size > len
    {
        return Err(DirFailure::entry(
            len,
            format!(
                "the log holds {len} entries but the anchor you kept covers {size}: the log was truncated or rolled back"
            ),
        ));
    }
    check_anchors_at_end(trust, origin.as_deref(), len, last_good)?;
    Ok(DirReport {
        verdict: match trust.key_source {
            KeySource::BesideTheData => Verdict::Unverified,
            KeySource::Given | KeySource::Token => Verdict::Verified,
        },
        key_source: trust.key_source,
        anchor_size: kept.map(|(s, _)| s),
        token_anchor_size: trust.token_anchor.as_ref().map(|a| a.size),
        entries: len,
        checkpoints: count,
        latest_checkpoint_size: last_good,
        unsigned_tail: len - last_good,
        origin,
        signer_in_clear: check.signer_in_clear,
        events: check.events,
    })
}

/// After the stream: the token's anchor and the kept checkpoint are of this log, and the log
/// (and its checkpoints) reach the token's anchor.
fn check_anchors_at_end(
    trust: &LogTrust,
    origin: Option<&str>,
    len: u64,
    last_good: u64,
) -> Result<(), DirFailure> {
    if let Some(a) = &trust.token_anchor {
        if origin.is_some_and(|o| o != a.origin) {
            return Err(DirFailure::other(format!(
                "the token anchors log `{}`, this log is `{}`",
                a.origin,
                origin.unwrap_or_default()
            )));
        }
        if a.size > len {
            return Err(DirFailure::entry(
                len,
                format!(
                    "the log holds {len} entries but the token's anchor covers {}: the log was truncated or rolled back",
                    a.size
                ),
            ));
        }
        if a.size > last_good {
            return Err(DirFailure::other(format!(
                "the checkpoints end at size {last_good} but the token's anchor holds the checkpoint at size {}: checkpoints were removed",
                a.size
            )));
        }
    }
    if let (Some(o), Some(text)) = (origin, &trust.kept_checkpoint) {
        let body = note::SignedNote::parse(text)
            .and_then(|sn| note::Checkpoint::parse_body(&sn.text))
            .map_err(|e| DirFailure::other(format!("the anchor is not a checkpoint note: {e}")))?;
        if o != body.origin {
            return Err(DirFailure::other(format!(
                "the anchor is a checkpoint of log `{}`, this log is `{o}`",
                body.origin
            )));
        }
    }
    Ok(())
}

/// One stored checkpoint, at the moment the entry stream reached its size: its signature with
/// the log key, its origin, its order, its root.
fn check_checkpoint(
    n: u64,
    stored: &StoredCheckpoint,
    check: &LogCheck,
    origin: &mut Option<String>,
    last_good: &mut u64,
    key: &VerifyingKey,
) -> Result<(), DirFailure> {
    let body = note::SignedNote::parse(&stored.note)
        .and_then(|sn| note::Checkpoint::parse_body(&sn.text))
        .map_err(|e| DirFailure::other(format!("checkpoint line {n}: {e}")))?;
    let o = origin.get_or_insert_with(|| body.origin.clone());
    if body.origin != *o {
        return Err(DirFailure::other(format!(
            "checkpoint line {n} has origin `{}`, expected `{o}`",
            body.origin
        )));
    }
    note::verify_checkpoint(&stored.note, o, key)
        .map_err(|e| DirFailure::other(format!("checkpoint at size {}: {e}", body.size)))?;
    if body.size != stored.tree_size {
        return Err(DirFailure::other(format!(
            "checkpoint line {n}: stored size differs from the signed size"
        )));
    }
    if body.size < *last_good {
        return Err(DirFailure::other(format!(
            "checkpoint at size {} follows one at size {last_good}: the log shrank",
            body.size
        )));
    }
    if check.edge().root() != body.root {
        return Err(DirFailure::entry(
            *last_good,
            format!(
                "entries {last_good}..{} do not match the signed checkpoint at size {} (altered, with the hash chain rewritten)",
                body.size.saturating_sub(1),
                body.size
            ),
        ));
    }
    *last_good = body.size;
    Ok(())
}

/// The size and root of a checkpoint the auditor kept, once its signature verifies.
fn kept_checkpoint(text: &str, key: &VerifyingKey) -> Result<(u64, Hash), DirFailure> {
    let body = note::SignedNote::parse(text)
        .and_then(|sn| note::Checkpoint::parse_body(&sn.text))
        .map_err(|e| DirFailure::other(format!("the anchor is not a checkpoint note: {e}")))?;
    note::verify_checkpoint(text, &body.origin, key).map_err(|e| {
        DirFailure::other(format!(
            "the anchor's signature does not verify with the log key: {e}"
        ))
    })?;
    Ok((body.size, body.root))
}

/// A log directory in the file format: `entries.jsonl` and `checkpoints.jsonl`, read line by
/// line.
pub struct DirSource {
    entries: BufReader<File>,
    entries_path: PathBuf,
    next_index: u64,
    checkpoints: Option<BufReader<File>>,
    checkpoints_path: PathBuf,
    line: u64,
}

impl DirSource {
    pub fn open(dir: &Path) -> Result<Self, DirFailure> {
        let entries_path = dir.join(ENTRIES_FILE);
        let f = File::open(&entries_path).map_err(|e| {
            DirFailure::other(format!("cannot read {}: {e}", entries_path.display()))
        })?;
        let checkpoints_path = dir.join(CHECKPOINTS_FILE);
        let checkpoints = match File::open(&checkpoints_path) {
            Ok(f) => Some(BufReader::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(DirFailure::other(format!(
                    "cannot read {}: {e}",
                    checkpoints_path.display()
                )));
            }
        };
        Ok(Self {
            entries: BufReader::with_capacity(1 << 20, f),
            entries_path,
            next_index: 0,
            checkpoints,
            checkpoints_path,
            line: 0,
        })
    }
}

/// One line of `r` (without its newline) of at most `max` bytes; `Ok(None)` at the end;
/// `Err(true)` for a final line without a newline, `Err(false)` for one too long.
fn read_line(
    r: &mut BufReader<File>,
    max: usize,
) -> Result<Option<Vec<u8>>, Result<bool, std::io::Error>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(max as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(Err)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(Ok(line.len() <= max));
    }
    line.pop();
    Ok(Some(line))
}

impl LogSource for DirSource {
    fn next_entry(&mut self) -> Result<Option<Vec<u8>>, DirFailure> {
        let index = self.next_index;
        let line = read_line(&mut self.entries, MAX_ENTRY_BYTES).map_err(|e| match e {
            Ok(true) => DirFailure::entry(
                index,
                format!("entry {index} is truncated (the file ends mid-entry)"),
            ),
            Ok(false) => DirFailure::entry(
                index,
                format!("entry {index} is longer than {MAX_ENTRY_BYTES} bytes"),
            ),
            Err(e) => {
                DirFailure::other(format!("cannot read {}: {e}", self.entries_path.display()))
            }
        })?;
        self.next_index += line.is_some() as u64;
        Ok(line)
    }

    fn next_checkpoint(&mut self) -> Result<Option<(u64, StoredCheckpoint)>, DirFailure> {
        let Some(r) = self.checkpoints.as_mut() else {
            return Ok(None);
        };
        loop {
            self.line += 1;
            let n = self.line;
            let line = match read_line(r, super::note::MAX_NOTE_BYTES * 2) {
                Ok(None) => return Ok(None),
                Ok(Some(l)) => l,
                Err(Ok(_)) => {
                    return Err(DirFailure::other(format!(
                        "checkpoint line {n} is torn or too long"
                    )));
                }
                Err(Err(e)) => {
                    return Err(DirFailure::other(format!(
                        "cannot read {}: {e}",
                        self.checkpoints_path.display()
                    )));
                }
            };
            if line.is_empty() {
                continue;
            }
            let stored: StoredCheckpoint = serde_json::from_slice(&line).map_err(|e| {
                DirFailure::other(format!("checkpoint line {n} is not valid JSON: {e}"))
            })?;
            return Ok(Some((n, stored)));
        }
    }
}

/// [`verify_log`] over a directory, with `key` given by the auditor.
pub fn verify_dir(dir: &Path, key: &VerifyingKey) -> Result<DirReport, DirFailure> {
    verify_log(
        &mut DirSource::open(dir)?,
        &LogTrust::new(*key, KeySource::Given),
    )
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
    /// The CA's CRL (checked against `ca`): a revoked signing certificate is reported, and a
    /// signature made after its compromise refused.
    pub crl: Option<crate::pki::revocation::CrlView>,
}

/// A signature made with a revoked certificate, as the verifiers report it.
#[derive(Debug, Clone, Serialize)]
pub struct RevocationStanding {
    pub revoked_at: String,
    pub reason: Option<String>,
    /// The invalidity date: since when the key is known or suspected to be compromised.
    pub compromised_at: Option<String>,
    /// In words: when the signature was made relative to the revocation, and on what evidence.
    pub statement: String,
}

/// Where a signature made at the entry's `time` with `cert` stands against `crl`: `None` if
/// the certificate is not revoked; refused if the signature was made after the key was
/// reported compromised (or after the revocation itself). `anchor` is an RFC 3161 time that
/// proves the entry existed by then (a bundle's checkpoint timestamp), if any.
pub fn revocation_standing(
    crl: &crate::pki::revocation::CrlView,
    cert: &CertInfo,
    entry_time: &str,
    anchor: Option<u64>,
) -> Result<Option<RevocationStanding>, Refused> {
    let Some(r) = crl.entries.get(&cert.serial_hex) else {
        return Ok(None);
    };
    let at = crate::clock::parse_rfc3339(entry_time)
        .ok_or_else(|| format!("the entry's time `{entry_time}` is not RFC 3339"))?;
    let fmt = crate::clock::rfc3339;
    let reason = r.reason.clone().unwrap_or_else(|| "no reason given".into());
    if let Some(c) = r.invalid_since
        && at >= c
    {
        return Err(format!(
            "signed after the key was reported compromised: the entry's time {entry_time} is not before {} (certificate {} revoked {}, {reason})",
            fmt(c),
            cert.serial_hex,
            fmt(r.revoked_at)
        )
        .into());
    }
    // CRL times are whole seconds: a signature in the very second of the revocation is
    // ordered by the log itself, which refuses any signature after its `key_revoked` entry.
    if at > r.revoked_at {
        return Err(format!(
            "signed after the certificate was revoked: the entry's time {entry_time} is after {} (certificate {}, {reason})",
            fmt(r.revoked_at),
            cert.serial_hex
        )
        .into());
    }
    let limit = r.invalid_since.unwrap_or(r.revoked_at);
    let what = if r.invalid_since.is_some() {
        "the reported compromise"
    } else {
        "the revocation"
    };
    let evidence = match anchor {
        Some(t) if t < limit => format!(
            "proven by the checkpoint's RFC 3161 timestamp ({}), which already covers the entry",
            fmt(t)
        ),
        _ => format!(
            "by the log's own time {entry_time} only (no RFC 3161 timestamp before {} covers the entry)",
            fmt(limit)
        ),
    };
    Ok(Some(RevocationStanding {
        revoked_at: fmt(r.revoked_at),
        reason: r.reason.clone(),
        compromised_at: r.invalid_since.map(fmt),
        statement: format!(
            "the certificate was revoked on {} ({reason}); this signature was made before {what}, {evidence}",
            fmt(r.revoked_at)
        ),
    }))
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
    /// The signing certificate is on the CRL given: when and why, and where this signature
    /// stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationStanding>,
}

/// Verify a receipt offline: the entry matches the receipt, the proof includes it in a
/// checkpoint signed by the log key, the certificate is the one the entry names (SHA-256
/// fingerprint) and its signature verifies, and (as asked) the certificate chains to the CA
/// and the entry covers the expected digest.
pub fn verify_receipt(input: &ReceiptInputs) -> Result<ReceiptReport, Refused> {
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
        )
        .into());
    }
    let cp = note::verify_checkpoint(&input.proof.checkpoint, &r.log_origin, &input.log_key)
        .map_err(|e| format!("checkpoint: {e}"))?;
    if cp.origin != r.log_origin {
        return Err(format!(
            "the checkpoint is from log `{}`, the receipt from `{}`",
            cp.origin, r.log_origin
        )
        .into());
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
                    )
                    .into());
                }
                None => return Err("the entry records no digest".into()),
            }
        }
    };
    let mut revocation = None;
    let (signature_checked, chain_checked) = match &input.certificate {
        Some(cert) => {
            check_signature_and_certificate(&entry, cert, input.ca.as_ref())?;
            if let Some(crl) = &input.crl {
                revocation = revocation_standing(crl, cert, &entry.time, None)?;
            }
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
        revocation,
    })
}

/// The certificate is the one the entry names, its key verifies the entry's signature over
/// the entry's digest, and (with a CA) it chains to the CA, may sign, and was valid then.
pub(crate) fn check_signature_and_certificate(
    entry: &Entry,
    cert: &CertInfo,
    ca: Option<&CertInfo>,
) -> Result<(), Refused> {
    let (Some(sig_b64), Some(digest)) = (&entry.signature, &entry.digest) else {
        return Err("the entry is not a signature entry".into());
    };
    match &entry.certificate_sha256 {
        Some(fp) if *fp == cert.fingerprint_sha256 => {}
        Some(fp) => {
            return Err(format!(
                "the certificate given (SHA-256 {}) is not the one the entry names (SHA-256 {fp})",
                cert.fingerprint_sha256
            )
            .into());
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
