//! Evidence bundles: one self-contained file with a transaction's entries, their `tlog-proof`s
//! to one signed checkpoint, that checkpoint's RFC 3161 timestamp, the signing certificates
//! and their CA, and the log key; and its offline verification, which explains the evidence in
//! plain words (`signet audit export --transaction`, `signet bundle verify`).
//!
//! Pure: no token, no network, no service state.

use std::collections::HashMap;

use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};
use spki::DecodePublicKey;

use super::entry::{self, Entry};
use super::merkle;
use super::note::{self, TlogProof};
use super::timestamp::{self, TimestampInfo};
use crate::pki::CertInfo;

pub const FORMAT: &str = "signet-evidence-bundle/v1";

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
}

/// What the verifier trusts, given on the command line; the bundle's own copies otherwise.
#[derive(Default)]
pub struct Trust {
    pub log_key: Option<VerifyingKey>,
    pub cas: Vec<CertInfo>,
    pub tsa_ca: Option<CertInfo>,
}

/// The verified account of a bundle.
#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub transaction_id: String,
    pub log_origin: String,
    pub checkpoint_size: u64,
    /// "given" when the log key / CA came from the verifier, "bundle" when taken on trust.
    pub log_key_source: &'static str,
    pub ca_source: &'static str,
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
    pub signer: Option<serde_json::Value>,
    pub reason: Option<String>,
}

/// Verify everything in `bundle` against `trust`; the first problem, precisely, otherwise.
pub fn verify(bundle: &Bundle, trust: &Trust) -> Result<Account, String> {
    if bundle.format != FORMAT {
        return Err(format!("not a {FORMAT} file (format `{}`)", bundle.format));
    }
    let (log_key, log_key_source) = match trust.log_key {
        Some(k) => (k, "given"),
        None => (
            VerifyingKey::from_public_key_pem(bundle.log.public_key.trim())
                .map_err(|e| format!("the bundle's log key is not a P-256 PEM key: {e}"))?,
            "bundle",
        ),
    };
    let cp = note::verify_checkpoint(&bundle.checkpoint.note, &bundle.log.origin, &log_key)
        .map_err(|e| format!("the checkpoint does not verify with the log key: {e}"))?;
    let timestamp = bundle
        .checkpoint
        .timestamp
        .as_deref()
        .map(|t| {
            use base64::Engine;
            let der = base64::engine::general_purpose::STANDARD
                .decode(t)
                .map_err(|_| "the timestamp is not base64".to_owned())?;
            timestamp::verify_response(
                &der,
                bundle.checkpoint.note.as_bytes(),
                trust.tsa_ca.as_ref(),
            )
        })
        .transpose()?;
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
    if bundle.entries.is_empty() {
        return Err("the bundle holds no entries".into());
    }
    let mut entries = Vec::new();
    for be in &bundle.entries {
        entries.push(verify_entry(be, bundle, &cp, &cas, &certificates)?);
    }
    Ok(Account {
        transaction_id: bundle.transaction_id.clone(),
        log_origin: cp.origin,
        checkpoint_size: cp.size,
        log_key_source,
        ca_source,
        timestamp,
        entries,
    })
}

fn verify_entry(
    be: &BundleEntry,
    bundle: &Bundle,
    cp: &note::Checkpoint,
    cas: &[CertInfo],
    certificates: &HashMap<String, CertInfo>,
) -> Result<EntryAccount, String> {
    let i = be.index;
    let proof = TlogProof::parse(&be.proof)
        .map_err(|e| format!("entry {i}: the proof is malformed: {e}"))?;
    if proof.index != i {
        return Err(format!("entry {i}: the proof is for entry {}", proof.index));
    }
    if proof.checkpoint.trim_end() != bundle.checkpoint.note.trim_end() {
        return Err(format!(
            "entry {i}: the proof leads to another checkpoint than the bundle's"
        ));
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
        ));
    }
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
        signer: e.signer.clone(),
        reason: e.reason.clone(),
    })
}

fn parse_cert(pem: &str) -> Result<CertInfo, String> {
    crate::pki::parse_pem_or_der(pem.as_bytes())
        .and_then(|d| CertInfo::parse(&d))
        .map_err(|e| format!("a certificate in the bundle is not readable: {e}"))
}

/// The account in plain English, for a reviewer who does not know Signet.
pub fn explain(a: &Account) -> String {
    let mut out = format!(
        "Evidence for transaction \"{}\" — VERIFIED\n\n",
        a.transaction_id
    );
    out.push_str(&format!(
        "The evidence log \"{}\" holds {} entries for this transaction. A checkpoint of the log \
         covering its first {} entries is signed by the log's key ({}), and each entry below is \
         proved to be part of it: the log has not been altered up to that checkpoint.\n",
        a.log_origin,
        a.entries.len(),
        a.checkpoint_size,
        if a.log_key_source == "given" {
            "the key you supplied"
        } else {
            "the key included in this file — compare it with one you obtained independently"
        }
    ));
    match &a.timestamp {
        Some(t) => out.push_str(&format!(
            "An independent time-stamping authority ({}) attests that this checkpoint existed at \
             {}{}.\n",
            t.tsa,
            t.time,
            if t.chain_checked {
                ", and its certificate chains to the TSA CA you supplied"
            } else {
                " (its certificate was not checked against a TSA CA: pass --tsa-ca)"
            }
        )),
        None => out.push_str("The checkpoint carries no third-party timestamp.\n"),
    }
    for e in &a.entries {
        out.push_str(&format!(
            "\nEntry {} ({}), recorded at {} by Signet's clock:\n",
            e.index, e.event, e.time
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
            out.push_str(
                "  The signature verifies with that certificate, which chains to the issuing CA \
                 and was valid at the time.\n",
            );
        }
        if let Some(s) = &e.signer {
            out.push_str(&format!("  Signer evidence recorded: {s}.\n"));
        }
        if let Some(r) = &e.reason {
            out.push_str(&format!("  Reason given: {r}.\n"));
        }
    }
    if a.ca_source == "bundle" {
        out.push_str(
            "\nNote: the issuing CA was taken from this file; pass --ca with a copy you trust.\n",
        );
    }
    out
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
                reason: None,
            }],
        };
        let html = explain_html(&account);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("Evidence for transaction &quot;&lt;tx&gt;&quot;"));
    }
}
