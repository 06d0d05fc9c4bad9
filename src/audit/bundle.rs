//! Evidence bundles: one self-contained file with a transaction's entries, their `tlog-proof`s
//! to one signed checkpoint, that checkpoint's RFC 3161 timestamp, the signing certificates
//! and their CA, the log key, and a statement signed with the log key that the entries are
//! *all* of the transaction's entries as of the checkpoint; and its offline verification,
//! which explains the evidence in plain words (`signet audit export --transaction`,
//! `signet bundle verify`).
//!
//! Completeness: the log key signs a [`TransactionStatement`] (origin, checkpoint size and
//! root, transaction ID, the tenants it covers, and the index of every entry of that
//! transaction in those tenants below the checkpoint, in log order), over
//! SHA-256([`STATEMENT_DOMAIN`] ‖ JCS(statement)). The domain holds a NUL byte, which no signed
//! note may hold, so the statement can never pass for a checkpoint signature and vice versa.
//! A verifier checks the statement's signature with the log key it trusts, that it names the
//! bundle's checkpoint, and that the bundle holds exactly the entries it lists: an entry
//! dropped, duplicated or reordered is refused. The statement is as complete as Signet's
//! transaction index; each entry it lists is proved by the tree.
//!
//! Verdicts: `verified` only when every fact was checked against a trust anchor the verifier
//! gave (the log key; the CA of the signing certificates, when there are signatures; the TSA
//! CA, when there is a timestamp) and completeness is proved; `unverified` when everything
//! checked out but some of it only against keys the file supplies itself (anyone can make such
//! a file); `refused` when anything does not check out.
//!
//! Pure: no token, no network, no service state.

use std::collections::{BTreeSet, HashMap};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};
use spki::DecodePublicKey;

use super::entry::{self, Entry};
use super::merkle;
use super::note::{self, TlogProof};
use super::timestamp::{self, TimestampInfo, TsaAnchors};
pub use super::verify::{Refused, Verdict};
use crate::pki::CertInfo;

pub const FORMAT: &str = "signet-evidence-bundle/v2";
/// Bundles written before completeness statements: still checked, never `verified`.
pub const FORMAT_V1: &str = "signet-evidence-bundle/v1";
/// Domain separation of the completeness statement's signature.
pub const STATEMENT_DOMAIN: &[u8] = b"signet transaction statement v1\0";
/// Limits of what a verifier reads: a bundle file, and the entries and certificates in it.
pub const MAX_BUNDLE_BYTES: u64 = 32 << 20;
pub const MAX_BUNDLE_ENTRIES: usize = 10_000;
pub const MAX_BUNDLE_CERTIFICATES: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub format: String,
    pub transaction_id: String,
    pub log: BundleLog,
    pub checkpoint: BundleCheckpoint,
    /// PEM of the CA(s) that issued the signing certificates.
    pub ca_certificates: Vec<String>,
    /// PEM of every signing certificate the entries name.
    pub certificates: Vec<String>,
    pub entries: Vec<BundleEntry>,
    /// Proof that `entries` are every entry of the transaction (in scope) as of the
    /// checkpoint (format v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completeness: Option<Completeness>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleLog {
    pub origin: String,
    /// PEM of the log's checkpoint key.
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleCheckpoint {
    /// The C2SP signed note every proof leads to.
    pub note: String,
    /// Base64 DER RFC 3161 `TimeStampResp` over the note, if the log has a TSA.
    pub timestamp: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEntry {
    pub index: u64,
    /// `tlog-proof@v1`; its `extra` line is the canonical entry.
    pub proof: String,
    /// The signer evidence a format-2 entry commits to (with the commitment's salt, so the
    /// verifier recomputes the commitment), or when and why it was erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_evidence: Option<crate::vault::SignerEvidence>,
}

/// What the log key signs about a transaction as of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransactionStatement {
    pub origin: String,
    pub tree_size: u64,
    /// Base64 root hash of the checkpoint.
    pub root_hash: String,
    pub transaction_id: String,
    /// The tenants whose entries are covered (sorted); `None`: every tenant.
    pub tenants: Option<Vec<String>>,
    /// Every entry of the transaction in those tenants below `tree_size`, in log order.
    pub entries: Vec<u64>,
}

impl TransactionStatement {
    /// The bytes the log key signs (SHA-256 of them, as for checkpoints).
    pub fn signed_message(&self) -> Result<Vec<u8>, serde_json::Error> {
        let jcs = serde_json_canonicalizer::to_vec(self)?;
        Ok([STATEMENT_DOMAIN, &jcs].concat())
    }

    /// Whether an entry of `tenant` is in this statement's scope.
    fn covers(&self, tenant: Option<&str>) -> bool {
        match (&self.tenants, tenant) {
            (None, _) => true,
            (Some(ts), Some(t)) => ts.iter().any(|x| x == t),
            (Some(_), None) => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Completeness {
    pub statement: TransactionStatement,
    /// Base64 DER ECDSA signature by the log key over [`TransactionStatement::signed_message`].
    pub signature: String,
}

/// What the verifier trusts, given on the command line. Missing anchors are replaced by the
/// bundle's own copies, so everything is still checked, but the verdict is then `unverified`.
#[derive(Default)]
pub struct Trust {
    pub log_key: Option<VerifyingKey>,
    pub cas: Vec<CertInfo>,
    pub tsa_ca: Option<TsaAnchors>,
    /// The issuing CA's CRL, already checked against one of `cas`.
    pub crl: Option<crate::pki::revocation::CrlView>,
}

/// The checked account of a bundle.
#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub verdict: Verdict,
    /// What was not anchored (or proved), each saying what to pass: why `unverified`.
    pub unverified: Vec<String>,
    pub transaction_id: String,
    pub log_origin: String,
    pub checkpoint_size: u64,
    /// "given" when the log key / CA came from the verifier, "bundle" when taken from the file.
    pub log_key_source: &'static str,
    pub ca_source: &'static str,
    /// The statement that the entries are the whole transaction as of the checkpoint, if the
    /// bundle has one (it verified).
    pub completeness: Option<TransactionStatement>,
    pub timestamp: Option<TimestampInfo>,
    pub entries: Vec<EntryAccount>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EntryAccount {
    pub index: u64,
    pub event: String,
    pub time: String,
    pub actor: String,
    pub actor_subject: String,
    pub actor_certificate_sha256: String,
    pub tenant: Option<String>,
    pub policy_id: Option<String>,
    pub legal_standard: Option<String>,
    pub digest: Option<String>,
    pub key_id: Option<String>,
    pub certificate_subject: Option<String>,
    pub certificate_serial: Option<String>,
    pub certificate_sha256: Option<String>,
    pub signature_verified: bool,
    /// The signer evidence: checked against the entry's commitment (format 2), or as the
    /// entry holds it (format 1).
    pub signer: Option<serde_json::Value>,
    /// For format-2 entries: what became of the signer evidence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer_evidence: Option<crate::vault::SignerEvidence>,
    /// A format-1 entry that holds the signer evidence in clear (cannot be erased).
    pub signer_in_clear: bool,
    pub retention_class: Option<String>,
    pub retain_until: Option<String>,
    pub reason: Option<String>,
    /// The signing certificate is on the CRL given: where this signature stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation: Option<super::verify::RevocationStanding>,
}

/// Read a bundle file, within [`MAX_BUNDLE_BYTES`].
pub fn read(path: &std::path::Path) -> Result<Bundle, Refused> {
    use std::io::Read;
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_BUNDLE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(format!(
            "{} is larger than {} MiB: not a bundle Signet writes",
            path.display(),
            MAX_BUNDLE_BYTES >> 20
        )
        .into());
    }
    Ok(serde_json::from_str(&text)
        .map_err(|e| format!("{} is not an evidence bundle: {e}", path.display()))?)
}

/// Check everything in `bundle`: the first problem, precisely, as `Err` (the verdict is then
/// `refused`); otherwise the account, `verified` or `unverified`.
pub fn verify(bundle: &Bundle, trust: &Trust) -> Result<Account, Refused> {
    check_shape(bundle)?;
    let mut unverified = Vec::new();
    let (log_key, log_key_source) = match trust.log_key {
        Some(k) => (k, "given"),
        None => {
            unverified.push(
                "no trust anchor for the log key: pass --log-key with a copy you obtained independently"
                    .to_owned(),
            );
            (
                VerifyingKey::from_public_key_pem(bundle.log.public_key.trim())
                    .map_err(|e| format!("the bundle's log key is not a P-256 PEM key: {e}"))?,
                "bundle",
            )
        }
    };
    let cp = note::verify_checkpoint(&bundle.checkpoint.note, &bundle.log.origin, &log_key)
        .map_err(|e| format!("the checkpoint does not verify with the log key: {e}"))?;
    let completeness = check_completeness(bundle, &cp, &log_key)?;
    if completeness.is_none() {
        unverified.push(format!(
            "the bundle does not prove that it holds every entry of the transaction (format `{}`): export it again with this version",
            bundle.format
        ));
    }
    let timestamp = check_timestamp(bundle, trust, &mut unverified)?;
    let (cas, ca_source) = if trust.cas.is_empty() {
        let cas = bundle
            .ca_certificates
            .iter()
            .map(|p| parse_cert(p))
            .collect::<Result<Vec<_>, _>>()?;
        (cas, "bundle")
    } else {
        (trust.cas.clone(), "given")
    };
    let certificates: HashMap<String, CertInfo> = bundle
        .certificates
        .iter()
        .map(|p| parse_cert(p).map(|c| (c.fingerprint_sha256.clone(), c)))
        .collect::<Result<_, _>>()?;
    let mut entries = Vec::new();
    for be in &bundle.entries {
        let mut account = verify_entry(be, bundle, &cp, &cas, &certificates)?;
        if let (Some(crl), Some(fp)) = (&trust.crl, &account.certificate_sha256)
            && account.signature_verified
            && let Some(cert) = certificates.get(fp)
        {
            // A timestamp counts as proof of time only with its TSA checked.
            let anchor = timestamp
                .as_ref()
                .filter(|t| t.chain_checked)
                .map(|t| t.time_unix);
            account.revocation =
                super::verify::revocation_standing(crl, cert, &account.time, anchor)
                    .map_err(|e| format!("entry {}: {e}", account.index))?;
        }
        if let Some(st) = &completeness
            && !st.covers(account.tenant.as_deref())
        {
            return Err(format!(
                "entry {} belongs to tenant {:?}, outside the tenants the statement covers",
                account.index, account.tenant
            )
            .into());
        }
        entries.push(account);
    }
    if ca_source == "bundle" && entries.iter().any(|e| e.signature_verified) {
        unverified.push(
            "no trust anchor for the signing certificates: pass --ca with the issuing CA you trust"
                .to_owned(),
        );
    }
    Ok(Account {
        verdict: if unverified.is_empty() {
            Verdict::Verified
        } else {
            Verdict::Unverified
        },
        unverified,
        transaction_id: bundle.transaction_id.clone(),
        log_origin: cp.origin,
        checkpoint_size: cp.size,
        log_key_source,
        ca_source,
        completeness,
        timestamp,
        entries,
    })
}

/// The format, the bounds, and every entry listed once, in log order: a duplicate or a
/// reordering is refused before any work.
fn check_shape(bundle: &Bundle) -> Result<(), Refused> {
    if bundle.format != FORMAT && bundle.format != FORMAT_V1 {
        return Err(format!("not a {FORMAT} file (format `{}`)", bundle.format).into());
    }
    if bundle.entries.is_empty() {
        return Err("the bundle holds no entries".into());
    }
    if bundle.entries.len() > MAX_BUNDLE_ENTRIES {
        return Err(format!(
            "the bundle holds {} entries, more than the {MAX_BUNDLE_ENTRIES} a bundle may hold",
            bundle.entries.len()
        )
        .into());
    }
    if bundle.certificates.len() + bundle.ca_certificates.len() > MAX_BUNDLE_CERTIFICATES {
        return Err(
            format!("the bundle holds more than {MAX_BUNDLE_CERTIFICATES} certificates").into(),
        );
    }
    // Listed once each, in log order: a duplicate or a reordering is refused before any work.
    for pair in bundle.entries.windows(2) {
        if pair[1].index == pair[0].index {
            return Err(format!("entry {} is listed twice", pair[0].index).into());
        }
        if pair[1].index < pair[0].index {
            return Err(format!(
                "entry {} is listed after entry {}: the entries are not in log order",
                pair[1].index, pair[0].index
            )
            .into());
        }
    }
    Ok(())
}

/// The checkpoint's RFC 3161 timestamp, if any, checked completely (its chain against the TSA
/// CA, when given).
fn check_timestamp(
    bundle: &Bundle,
    trust: &Trust,
    unverified: &mut Vec<String>,
) -> Result<Option<TimestampInfo>, Refused> {
    Ok(match bundle.checkpoint.timestamp.as_deref() {
        None => None,
        Some(t) => {
            let der = B64
                .decode(t)
                .map_err(|_| "the timestamp is not base64".to_owned())?;
            let expected = timestamp::Expected {
                note: bundle.checkpoint.note.as_bytes(),
                ..Default::default()
            };
            let info = timestamp::verify(&der, &expected, trust.tsa_ca.as_ref())
                .map_err(|e| format!("the checkpoint's timestamp: {e}"))?;
            if !info.chain_checked {
                unverified.push(
                    "no trust anchor for the time-stamping authority: pass --tsa-ca".to_owned(),
                );
            }
            Some(info)
        }
    })
}

/// The completeness statement, if the bundle has one: signed by the log key, about this
/// checkpoint and transaction, listing exactly the bundle's entries.
fn check_completeness(
    bundle: &Bundle,
    cp: &note::Checkpoint,
    log_key: &VerifyingKey,
) -> Result<Option<TransactionStatement>, Refused> {
    let Some(c) = &bundle.completeness else {
        return if bundle.format == FORMAT {
            Err(format!("a {FORMAT} bundle must carry its completeness statement").into())
        } else {
            Ok(None)
        };
    };
    let st = &c.statement;
    let sig = B64
        .decode(&c.signature)
        .map_err(|_| "the completeness statement's signature is not base64".to_owned())?;
    let message = st
        .signed_message()
        .map_err(|e| format!("the completeness statement: {e}"))?;
    let digest: [u8; 32] = crate::sha256::sha256(message);
    if !crate::pki::verify::verifies_prehash(log_key, &digest, &sig) {
        return Err("the completeness statement is not signed by the log key".into());
    }
    if st.origin != cp.origin || st.tree_size != cp.size || st.root_hash != B64.encode(cp.root) {
        return Err(
            "the completeness statement is about another checkpoint than the bundle's".into(),
        );
    }
    if st.transaction_id != bundle.transaction_id {
        return Err("the completeness statement is about another transaction".into());
    }
    let held: Vec<u64> = bundle.entries.iter().map(|e| e.index).collect();
    if held != st.entries {
        let listed: BTreeSet<u64> = st.entries.iter().copied().collect();
        let have: BTreeSet<u64> = held.iter().copied().collect();
        let missing: Vec<u64> = listed.difference(&have).copied().collect();
        let extra: Vec<u64> = have.difference(&listed).copied().collect();
        return Err(Refused::from(if !missing.is_empty() {
            format!(
                "the bundle lacks entries {missing:?} of the transaction: the log key's statement lists {} entries, the bundle holds {}",
                st.entries.len(),
                held.len()
            )
        } else if !extra.is_empty() {
            format!("the bundle holds entries {extra:?} that the log key's statement does not list")
        } else {
            "the bundle's entries are not in the order of the log key's statement".into()
        }));
    }
    Ok(Some(st.clone()))
}

fn verify_entry(
    be: &BundleEntry,
    bundle: &Bundle,
    cp: &note::Checkpoint,
    cas: &[CertInfo],
    certificates: &HashMap<String, CertInfo>,
) -> Result<EntryAccount, Refused> {
    let i = be.index;
    let proof = TlogProof::parse(&be.proof)
        .map_err(|e| format!("entry {i}: the proof is malformed: {e}"))?;
    if proof.index != i {
        return Err(format!("entry {i}: the proof is for entry {}", proof.index).into());
    }
    if proof.checkpoint.trim_end() != bundle.checkpoint.note.trim_end() {
        return Err(
            format!("entry {i}: the proof leads to another checkpoint than the bundle's").into(),
        );
    }
    let bytes = proof
        .extra
        .as_ref()
        .ok_or_else(|| format!("entry {i}: the proof carries no entry"))?;
    let e: Entry = entry::parse_stored(bytes, i).map_err(|err| format!("entry {i} {err}"))?;
    merkle::verify_inclusion(
        &merkle::leaf_hash(bytes),
        i,
        cp.size,
        &proof.hashes,
        &cp.root,
    )
    .map_err(|err| format!("entry {i} is not in the signed checkpoint: {err}"))?;
    if e.transaction_id.as_deref() != Some(bundle.transaction_id.as_str()) {
        return Err(format!(
            "entry {i} belongs to another transaction ({:?})",
            e.transaction_id
        )
        .into());
    }
    // Signer evidence: in clear in a format-1 entry; for format 2, what the bundle carries
    // must match the entry's commitment (or say it was erased).
    let (signer, signer_evidence) = match (&e.signer_commitment, &be.signer_evidence) {
        (Some(c), Some(ev)) => {
            ev.check(c).map_err(|err| {
                format!("entry {i}: the bundle's signer evidence does not match the entry: {err}")
            })?;
            let signer = match ev {
                crate::vault::SignerEvidence::Present { signer, .. } => Some(signer.clone()),
                _ => None,
            };
            (signer, Some(ev.clone()))
        }
        (None, Some(_)) => {
            return Err(format!(
                "entry {i}: the bundle carries signer evidence for an entry that commits to none"
            )
            .into());
        }
        (Some(_), None) => (None, Some(crate::vault::SignerEvidence::Missing)),
        (None, None) => (e.signer.clone(), None),
    };
    let mut cert_view = None;
    let mut signature_verified = false;
    if e.event == entry::event::SIGNATURE {
        let fp = e
            .certificate_sha256
            .as_deref()
            .ok_or_else(|| format!("entry {i} names no certificate fingerprint"))?;
        let cert = certificates
            .get(fp)
            .ok_or_else(|| format!("entry {i}: the bundle lacks the signing certificate {fp}"))?;
        let ca = cas
            .iter()
            .find(|ca| ca.subject == cert.issuer)
            .ok_or_else(|| format!("entry {i}: no CA given for issuer `{}`", cert.issuer))?;
        super::verify::check_signature_and_certificate(&e, cert, Some(ca))
            .map_err(|err| format!("entry {i}: {err}"))?;
        signature_verified = true;
        cert_view = Some(cert);
    }
    Ok(EntryAccount {
        index: i,
        event: e.event.clone(),
        time: e.time.clone(),
        actor: e.actor.identity.clone(),
        actor_subject: e.actor.subject.clone(),
        actor_certificate_sha256: e.actor.fingerprint_sha256.clone(),
        tenant: e.tenant.clone(),
        policy_id: e.policy.as_ref().map(|p| p.id.clone()),
        legal_standard: e.policy.as_ref().map(|p| p.legal_standard.clone()),
        digest: e
            .digest
            .as_ref()
            .map(|d| format!("{} {}", d.algorithm, d.value)),
        key_id: e.key_id.clone(),
        certificate_subject: cert_view.map(|c| c.subject.clone()),
        certificate_serial: e.certificate_serial.clone(),
        certificate_sha256: e.certificate_sha256.clone(),
        signature_verified,
        signer,
        signer_evidence,
        signer_in_clear: e.format() < 2 && e.signer.is_some(),
        retention_class: e.retention_class.clone(),
        retain_until: e.retain_until.clone(),
        reason: e.reason.clone(),
        revocation: None,
    })
}

fn parse_cert(pem: &str) -> Result<CertInfo, Refused> {
    Ok(crate::pki::parse_pem_or_der(pem.as_bytes())
        .and_then(|d| CertInfo::parse(&d))
        .map_err(|e| format!("a certificate in the bundle is not readable: {e}"))?)
}

/// The account in plain English, for a reviewer who does not know Signet. Only what was
/// checked against the reader's own trust anchors is stated as fact; the rest is stated as
/// what the file claims.
pub fn explain(a: &Account) -> String {
    let mut out = explain_verdict(a);
    explain_log(a, &mut out);
    for e in &a.entries {
        explain_entry(a, e, &mut out);
    }
    out
}

/// The first lines: the verdict, and for an unverified bundle every missing anchor.
fn explain_verdict(a: &Account) -> String {
    match a.verdict {
        Verdict::Verified => format!(
            "Evidence for transaction \"{}\" — VERIFIED\n\n",
            a.transaction_id
        ),
        _ => {
            let mut head = format!(
                "Evidence for transaction \"{}\" — UNVERIFIED\n",
                a.transaction_id
            );
            for u in &a.unverified {
                head.push_str(&format!("UNVERIFIED: {u}.\n"));
            }
            head.push_str(
                "What could be checked is below; what rests on keys this file supplies itself is \
                 a claim, not evidence: anyone can make such a file.\n\n",
            );
            head
        }
    }
}

/// The log, the completeness statement and the timestamp, as facts or as claims.
fn explain_log(a: &Account, out: &mut String) {
    let anchored_log = a.log_key_source == "given";
    let claim = |fact: &str| {
        if anchored_log {
            fact.to_owned()
        } else {
            format!(
                "The file claims: {}{}",
                &fact[..1].to_lowercase(),
                &fact[1..]
            )
        }
    };
    out.push_str(&format!(
        "A checkpoint of the evidence log \"{}\" covering its first {} entries is signed by {}, and \
         each entry below is proved to be part of it{}.\n",
        a.log_origin,
        a.checkpoint_size,
        if anchored_log {
            "the log key you supplied"
        } else {
            "a key included in this file (NOT one you supplied: pass --log-key)"
        },
        if anchored_log {
            ": the log has not been altered up to that checkpoint"
        } else {
            ""
        },
    ));
    match &a.completeness {
        Some(st) => out.push_str(&claim(&format!(
            "The log key also signed that these {} entries are every entry of this transaction{} \
             up to that checkpoint: none was left out.\n",
            st.entries.len(),
            match &st.tenants {
                None => String::new(),
                Some(ts) => format!(" for tenant(s) {}", ts.join(", ")),
            }
        ))),
        None => out.push_str(
            "This file does NOT prove that it holds every entry of the transaction: entries may \
             have been left out.\n",
        ),
    }
    match &a.timestamp {
        Some(t) if t.chain_checked => out.push_str(&format!(
            "A time-stamping authority ({}), whose certificate chains to the TSA CA you supplied, \
             attests that this checkpoint existed at {}.\n",
            t.tsa, t.time
        )),
        Some(t) => out.push_str(&format!(
            "The checkpoint carries a timestamp claiming {}, signed by a certificate that names \
             itself \"{}\". It was NOT checked against a TSA CA you trust (pass --tsa-ca): it is \
             a claim, not evidence of the time.\n",
            t.time, t.tsa
        )),
        None => out.push_str("The checkpoint carries no third-party timestamp.\n"),
    }
}

/// One entry, in plain words.
fn explain_entry(a: &Account, e: &EntryAccount, out: &mut String) {
    let anchored_log = a.log_key_source == "given";
    out.push_str(&format!(
        "\nEntry {} ({}), recorded at {} by Signet's clock{}:\n",
        e.index,
        e.event,
        e.time,
        if anchored_log {
            ""
        } else {
            " (as the file claims)"
        }
    ));
    out.push_str(&format!(
        "  Requested by {} (certificate subject \"{}\", SHA-256 {}).\n",
        e.actor, e.actor_subject, e.actor_certificate_sha256
    ));
    if let Some(d) = &e.digest {
        out.push_str(&format!("  Document digest: {d}.\n"));
    }
    if let Some(p) = &e.policy_id {
        out.push_str(&format!(
            "  Under policy \"{p}\" of tenant \"{}\", legal standard: {}.\n",
            e.tenant.as_deref().unwrap_or("-"),
            e.legal_standard.as_deref().unwrap_or("-")
        ));
    }
    if let Some(k) = &e.key_id {
        out.push_str(&format!(
            "  Signed with key {k}, certificate \"{}\" (serial {}, SHA-256 {}).\n",
            e.certificate_subject.as_deref().unwrap_or("-"),
            e.certificate_serial.as_deref().unwrap_or("-"),
            e.certificate_sha256.as_deref().unwrap_or("-")
        ));
    }
    if e.signature_verified {
        out.push_str(if a.ca_source == "given" {
            "  The signature verifies with that certificate, which chains to the issuing CA \
             you supplied and was valid at the time.\n"
        } else {
            "  The signature verifies with that certificate, which chains to a CA included in \
             this file (NOT one you supplied: pass --ca).\n"
        });
    }
    if let Some(r) = &e.revocation {
        out.push_str(&format!("  REVOKED: {}.\n", r.statement));
    }
    use crate::vault::SignerEvidence as Ev;
    match (&e.signer_evidence, &e.signer) {
        (Some(Ev::Present { .. }), Some(s)) => out.push_str(&format!(
            "  Signer evidence: {s} (it matches the salted commitment in the signed entry).\n"
        )),
        (
            Some(Ev::Erased {
                erased_at,
                reason,
                cause,
                erasure_entry,
            }),
            _,
        ) => out.push_str(&format!(
            "  Signer evidence erased on {} ({reason}; {}, recorded in entry {erasure_entry}). \
             The entry still commits to it, so the signature and its place in the log stand.\n",
            erased_at.get(..10).unwrap_or(erased_at),
            if cause == "retention" {
                "its retention period ended"
            } else {
                "a data subject's erasure request"
            }
        )),
        (Some(Ev::Unreadable { detail }), _) => {
            out.push_str(&format!("  Signer evidence is not readable: {detail}.\n"));
        }
        (Some(Ev::Missing), _) => {
            out.push_str("  The entry commits to signer evidence this file does not carry.\n")
        }
        (_, Some(s)) if e.signer_in_clear => out.push_str(&format!(
            "  Signer evidence recorded in clear in the entry (an entry of the first format, \
             before signer evidence was kept apart): {s}.\n"
        )),
        _ => {}
    }
    if let Some(u) = &e.retain_until {
        out.push_str(&format!(
            "  Retention: class {}, signer evidence kept until {u}.\n",
            e.retention_class.as_deref().unwrap_or("-")
        ));
    }
    if let Some(r) = &e.reason {
        out.push_str(&format!("  Reason given: {r}.\n"));
    }
}

/// The same account as a standalone HTML page (every value escaped: signer evidence and
/// identities come from clients).
pub fn explain_html(a: &Account) -> String {
    let text = explain(a);
    let mut body = String::new();
    for para in text.split("\n\n") {
        let mut lines = para.lines();
        let Some(first) = lines.next() else {
            continue;
        };
        body.push_str(&format!("<h2>{}</h2>\n<ul>\n", escape(first)));
        for l in lines {
            body.push_str(&format!("<li>{}</li>\n", escape(l.trim())));
        }
        body.push_str("</ul>\n");
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Evidence for transaction {}</title>\
         <style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}li{{margin:.3em 0}}</style>\
         </head><body>\n{body}</body></html>\n",
        escape(&a.transaction_id)
    )
}

/// HTML-escape text for element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_what_clients_sent() {
        let account = Account {
            verdict: Verdict::Verified,
            unverified: vec![],
            completeness: None,
            transaction_id: "<tx>".into(),
            log_origin: "o".into(),
            checkpoint_size: 1,
            log_key_source: "given",
            ca_source: "given",
            timestamp: None,
            entries: vec![EntryAccount {
                index: 0,
                event: "signature".into(),
                time: "t".into(),
                actor: "a".into(),
                actor_subject: "s".into(),
                actor_certificate_sha256: "f".into(),
                tenant: None,
                policy_id: None,
                legal_standard: None,
                digest: None,
                key_id: None,
                certificate_subject: None,
                certificate_serial: None,
                certificate_sha256: None,
                signature_verified: false,
                signer: Some(serde_json::json!({"name": "<script>alert('x')</script>"})),
                signer_evidence: None,
                signer_in_clear: true,
                retention_class: None,
                retain_until: None,
                reason: None,
                revocation: None,
            }],
        };
        let html = explain_html(&account);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("Evidence for transaction &quot;&lt;tx&gt;&quot;"));
    }
}
