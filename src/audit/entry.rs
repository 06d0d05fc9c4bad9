//! The evidence entry: one canonical-JSON (RFC 8785) line per event.
//!
//! Canonical form means an independent verifier can parse an entry, re-serialise it with any
//! JCS implementation and get the same bytes, hence the same leaf hash.

use serde::{Deserialize, Serialize};

/// Event types.
pub mod event {
    pub const SIGNATURE: &str = "signature";
    pub const KEY_CREATED: &str = "key_created";
    pub const CSR_CREATED: &str = "csr_created";
    pub const CERTIFICATE_ISSUED: &str = "certificate_issued";
    pub const CERTIFICATE_IMPORTED: &str = "certificate_imported";
    pub const ROTATION_STARTED: &str = "rotation_started";
    pub const KEY_ACTIVATED: &str = "key_activated";
    pub const KEY_RETIRED: &str = "key_retired";
    pub const KEY_REVOKED: &str = "key_revoked";
    pub const ROTATION_ROLLED_BACK: &str = "rotation_rolled_back";
    pub const CONFIGURATION_RELOADED: &str = "configuration_reloaded";
    /// An operator accepted a log that differs from its integrity anchors (a restore from
    /// backup): `signet audit accept-restore`.
    pub const LOG_RESTORED: &str = "log_restored";
    /// Signer evidence was erased (retention sweep or a data subject's request).
    pub const EVIDENCE_ERASED: &str = "evidence_erased";
    pub const LEGAL_HOLD_PLACED: &str = "legal_hold_placed";
    pub const LEGAL_HOLD_RELEASED: &str = "legal_hold_released";
    /// The signer-evidence vault's key-encryption key was replaced and the old one destroyed.
    pub const VAULT_KEY_ROTATED: &str = "vault_key_rotated";
}

/// The entry format this version writes. Format 1 (no `format` field) held the `signer`
/// object in clear; format 2 holds only `signer_commitment` (the evidence itself is in the
/// vault, encrypted) plus the retention the entry was written under.
pub const FORMAT: u32 = 2;

/// Who acted: the client certificate (or the local operator for offline CLI use).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub identity: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub san: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEvidence {
    pub id: String,
    /// SHA-256 (hex) of the policy's canonical JSON at signing time.
    pub hash: String,
    pub legal_standard: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestEvidence {
    pub algorithm: String,
    /// Lowercase hex.
    pub value: String,
}

/// One evidence entry. Optional fields are omitted (not `null`) when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the log, assigned by the writer.
    pub index: u64,
    /// Base64 leaf hash of the entry before this one (absent for entry 0), assigned by the
    /// writer: a hash chain that lets a verifier name exactly which entry was altered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_leaf_hash: Option<String>,
    /// RFC 3339 UTC with microseconds.
    pub time: String,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub actor: Actor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyEvidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<DigestEvidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Hex serial of the certificate of `key_id` at the time of the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// SHA-256 (hex) of the DER signing certificate: binds a receipt to exactly one
    /// certificate (a serial alone can be copied into a look-alike).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
    /// Base64 DER `ECDSA-Sig-Value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_algorithm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    /// Signer evidence as sent by the client: recorded, never interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<serde_json::Value>,
    /// SHA-256 (hex) of the `Idempotency-Key` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key_sha256: Option<String>,
    /// SHA-256 (hex) of the canonical request, to tell a replay from a conflicting reuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_sha256: Option<String>,
    /// Why an operator acted (admin events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Event-specific details (admin events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    /// The entry format ([`FORMAT`]); absent in format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<u32>,
    /// Hex SHA-256 salted commitment to the signer evidence kept in the vault
    /// ([`crate::vault::commitment`]); format 2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_commitment: Option<String>,
    /// The retention rule the entry was written under (the policy's `retention_class`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_class: Option<String>,
    /// RFC 3339 UTC: when its signer evidence may be erased (absent: kept without limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_until: Option<String>,
    /// Not part of the entry: the sealed signer evidence that the storage writes to the
    /// vault in the same commit as the entry (under the entry's index).
    #[serde(skip)]
    pub sealed: Option<Box<crate::vault::Row>>,
}

impl Entry {
    /// A new entry of `event` by `actor`; the writer sets `index`.
    pub fn new(event: &str, time: String, actor: Actor) -> Self {
        Self {
            index: 0,
            previous_leaf_hash: None,
            time,
            event: event.to_owned(),
            request_id: None,
            actor,
            tenant: None,
            policy: None,
            digest: None,
            key_id: None,
            certificate_serial: None,
            certificate_sha256: None,
            signature: None,
            signature_algorithm: None,
            transaction_id: None,
            signer: None,
            idempotency_key_sha256: None,
            request_sha256: None,
            reason: None,
            details: None,
            format: Some(FORMAT),
            signer_commitment: None,
            retention_class: None,
            retain_until: None,
            sealed: None,
        }
    }

    /// The format this entry was written in (1 when the field is absent).
    pub fn format(&self) -> u32 {
        self.format.unwrap_or(1)
    }

    /// RFC 8785 canonical bytes (no trailing newline).
    ///
    /// Fast path: the fixed fields are serialised in sorted order by serde_json (whose string
    /// escaping and integer output are JCS's); only the free-form `signer` and `details` go
    /// through the general JCS canonicaliser. Tests compare this with the reference.
    pub fn canonical(&self) -> Result<Vec<u8>, serde_json::Error> {
        let jcs = |v: &Option<serde_json::Value>| -> Result<Option<Box<serde_json::value::RawValue>>, serde_json::Error> {
            v.as_ref().map(|v| serde_json::value::RawValue::from_string(serde_json_canonicalizer::to_string(v)?)).transpose()
        };
        // Exhaustive: a field added to `Entry` must be added here too.
        let Entry {
            index,
            previous_leaf_hash,
            time,
            event,
            request_id,
            actor,
            tenant,
            policy,
            digest,
            key_id,
            certificate_serial,
            certificate_sha256,
            signature,
            signature_algorithm,
            transaction_id,
            signer,
            idempotency_key_sha256,
            request_sha256,
            reason,
            details,
            format,
            signer_commitment,
            retention_class,
            retain_until,
            // Not serialised: it goes to the vault, not into the leaf.
            sealed: _,
        } = self;
        let Actor {
            identity,
            subject,
            san,
            fingerprint_sha256,
        } = actor;
        let sorted = SortedEntry {
            actor: SortedActor {
                fingerprint_sha256,
                identity,
                san,
                subject,
            },
            certificate_serial: certificate_serial.as_deref(),
            certificate_sha256: certificate_sha256.as_deref(),
            details: jcs(details)?,
            digest: digest.as_ref().map(|d| SortedDigest {
                algorithm: &d.algorithm,
                value: &d.value,
            }),
            event,
            format: *format,
            idempotency_key_sha256: idempotency_key_sha256.as_deref(),
            index: *index,
            key_id: key_id.as_deref(),
            policy: policy.as_ref().map(|p| SortedPolicy {
                hash: &p.hash,
                id: &p.id,
                legal_standard: &p.legal_standard,
            }),
            previous_leaf_hash: previous_leaf_hash.as_deref(),
            reason: reason.as_deref(),
            request_id: request_id.as_deref(),
            request_sha256: request_sha256.as_deref(),
            retain_until: retain_until.as_deref(),
            retention_class: retention_class.as_deref(),
            signature: signature.as_deref(),
            signature_algorithm: signature_algorithm.as_deref(),
            signer: jcs(signer)?,
            signer_commitment: signer_commitment.as_deref(),
            tenant: tenant.as_deref(),
            time,
            transaction_id: transaction_id.as_deref(),
        };
        serde_json::to_vec(&sorted)
    }

    /// The reference RFC 8785 serialisation (slow; for tests and cross-checks).
    pub fn canonical_reference(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json_canonicalizer::to_vec(self)
    }
}

// Field order below is the JCS order (by UTF-16 code units; all keys are ASCII).
#[derive(Serialize)]
struct SortedEntry<'a> {
    actor: SortedActor<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate_serial: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate_sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Box<serde_json::value::RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<SortedDigest<'a>>,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key_sha256: Option<&'a str>,
    index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<SortedPolicy<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_leaf_hash: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retain_until: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_class: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature_algorithm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signer: Option<Box<serde_json::value::RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signer_commitment: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    transaction_id: Option<&'a str>,
}

#[derive(Serialize)]
struct SortedActor<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    fingerprint_sha256: &'a str,
    identity: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    san: &'a [String],
    #[serde(skip_serializing_if = "str::is_empty")]
    subject: &'a str,
}

#[derive(Serialize)]
struct SortedDigest<'a> {
    algorithm: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
struct SortedPolicy<'a> {
    hash: &'a str,
    id: &'a str,
    legal_standard: &'a str,
}

/// Why a stored line is not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("not valid JSON for an entry: {0}")]
    Json(String),
    #[error("not in canonical (RFC 8785) form")]
    NotCanonical,
    #[error("holds index {found} at position {expected}")]
    WrongIndex { expected: u64, found: u64 },
    #[error("its previous_leaf_hash does not match the entry before it")]
    BrokenChain,
    #[error("format {0} entries never hold signer evidence in clear, but this one does")]
    SignerInClear(u32),
}

/// Parse a stored line (without its newline) and check it is canonical and at `expected`.
pub fn parse_stored(bytes: &[u8], expected: u64) -> Result<Entry, EntryError> {
    let entry: Entry =
        serde_json::from_slice(bytes).map_err(|e| EntryError::Json(e.to_string()))?;
    let again = entry
        .canonical()
        .map_err(|e| EntryError::Json(e.to_string()))?;
    if again != bytes {
        return Err(EntryError::NotCanonical);
    }
    if entry.format() >= 2 && entry.signer.is_some() {
        return Err(EntryError::SignerInClear(entry.format()));
    }
    if entry.index != expected {
        return Err(EntryError::WrongIndex {
            expected,
            found: entry.index,
        });
    }
    Ok(entry)
}

/// Is `value` representable canonically (a JCS round trip gives the same bytes)? Used to
/// refuse signer evidence with numbers JCS cannot reproduce (e.g. integers beyond 2^53).
pub fn is_jcs_stable(value: &serde_json::Value) -> bool {
    if !numbers_exact(value) {
        return false;
    }
    let Ok(once) = serde_json_canonicalizer::to_vec(value) else {
        return false;
    };
    let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(&once) else {
        return false;
    };
    serde_json_canonicalizer::to_vec(&parsed).is_ok_and(|twice| twice == once) && parsed == *value
}

/// JSON numbers beyond ±2^53 lose digits in IEEE doubles (and in JCS): refuse them.
fn numbers_exact(v: &serde_json::Value) -> bool {
    const LIMIT: f64 = 9_007_199_254_740_992.0;
    match v {
        serde_json::Value::Number(n) => n
            .as_f64()
            .is_some_and(|f| f.is_finite() && f.abs() <= LIMIT),
        serde_json::Value::Array(a) => a.iter().all(numbers_exact),
        serde_json::Value::Object(m) => m.values().all(numbers_exact),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut e = Entry::new(
            event::SIGNATURE,
            "2026-11-22T10:00:00.000000Z".into(),
            Actor {
                identity: "spiffe://x/app".into(),
                subject: "CN=app".into(),
                san: vec!["uri:spiffe://x/app".into()],
                fingerprint_sha256: "ab".into(),
            },
        );
        e.index = 3;
        // Format 1: the signer in clear (entries written before the vault).
        e.format = None;
        e.signer =
            Some(serde_json::json!({"name": "Zoë", "email": "z@example.com", "ip": "192.0.2.1"}));
        e.transaction_id = Some("tx-1".into());
        e
    }

    #[test]
    fn canonical_form_is_sorted_and_stable() {
        let e = sample();
        let bytes = e.canonical().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with("{\"actor\":{\"fingerprint_sha256\":\"ab\""),
            "{text}"
        );
        assert!(!text.contains("null"), "absent fields are omitted");
        assert_eq!(parse_stored(&bytes, 3).unwrap(), e);
        assert_eq!(
            parse_stored(&bytes, 4),
            Err(EntryError::WrongIndex {
                expected: 4,
                found: 3
            })
        );
        let pretty = serde_json::to_vec_pretty(&e).unwrap();
        assert_eq!(parse_stored(&pretty, 3), Err(EntryError::NotCanonical));
        assert!(matches!(parse_stored(b"{", 0), Err(EntryError::Json(_))));
        assert!(matches!(
            parse_stored(b"{\"index\":0,\"extra\":1}", 0),
            Err(EntryError::Json(_))
        ));
        // A format-2 entry holding the signer in clear is refused, canonical or not.
        let mut clear = e.clone();
        clear.format = Some(FORMAT);
        let bytes = clear.canonical().unwrap();
        assert_eq!(
            parse_stored(&bytes, 3),
            Err(EntryError::SignerInClear(FORMAT))
        );
    }

    #[test]
    fn fast_canonical_form_equals_the_reference_jcs() {
        // Strings with every kind of character JCS treats specially.
        let nasty = [
            "plain",
            "",
            "quote\" back\\slash",
            "ctl \u{0}\u{1}\u{8}\u{9}\u{a}\u{c}\u{d}\u{1f}\u{7f}",
            "é ü ß 漢字 😀",
            "\u{2028}\u{2029} / <script>",
            "\u{ffff}\u{10ffff}",
        ];
        let mut rng_state = 7u64;
        let mut next = move || {
            rng_state = rng_state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng_state >> 33) as usize
        };
        for round in 0..400 {
            let mut e = sample();
            let pick = |n: usize| nasty[n % nasty.len()].to_owned();
            e.index = next() as u64;
            e.time = pick(next());
            e.actor.subject = pick(next());
            e.actor.identity = pick(next());
            if round % 3 == 0 {
                e.actor.san.clear();
                e.actor.fingerprint_sha256.clear();
            }
            e.reason = (round % 2 == 0).then(|| pick(next()));
            e.certificate_serial = (round % 3 == 2).then(|| pick(next()));
            e.certificate_sha256 = (round % 2 == 1).then(|| pick(next()));
            e.details = (round % 4 == 0).then(|| serde_json::json!({"b": pick(next()), "a": [1.5, -0.0, 1e21, 1e-7, 100, true, null], "é": {"z": 1, "Z": 2}}));
            e.signer = (round % 5 != 0)
                .then(|| serde_json::json!({pick(next()): pick(next()), "n": next() as f64 / 7.0}));
            e.policy = (round % 2 == 1).then(|| PolicyEvidence {
                id: pick(next()),
                hash: "ab".into(),
                legal_standard: pick(next()),
            });
            e.digest = (round % 3 == 1).then(|| DigestEvidence {
                algorithm: "sha256".into(),
                value: pick(next()),
            });
            e.transaction_id = (round % 7 != 0).then(|| pick(next()));
            if round % 2 == 0 {
                e.format = Some(FORMAT);
                e.signer = None;
                e.signer_commitment = Some(pick(next()));
                e.retention_class = Some(pick(next()));
                e.retain_until = (round % 3 == 0).then(|| pick(next()));
            }
            assert_eq!(
                e.canonical().unwrap(),
                e.canonical_reference().unwrap(),
                "round {round}"
            );
        }
    }

    #[test]
    fn jcs_stability_check() {
        assert!(is_jcs_stable(
            &serde_json::json!({"a": 1, "b": [1.5, "x", null, true]})
        ));
        assert!(!is_jcs_stable(
            &serde_json::json!({"big": 12345678901234567890u64})
        ));
        let parsed: serde_json::Value =
            serde_json::from_str(r#"{"n":123456789012345678901}"#).unwrap();
        assert!(
            !is_jcs_stable(&parsed),
            "a 21-digit integer arrives as a rounded double"
        );
    }
}
