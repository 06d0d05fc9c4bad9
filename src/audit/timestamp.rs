//! RFC 3161 timestamps of checkpoints: the request Signet sends a TSA, the checks it makes on
//! the answer, and `timestamps.jsonl` beside the checkpoints (one line per timestamped
//! checkpoint: its size, the SHA-256 of its note, and the TSA's whole `TimeStampResp`, which
//! `openssl ts -verify -data NOTE -in RESP -CAfile TSA-CA` checks).
//!
//! One timestamp per checkpoint covers every entry under it. Pure apart from the file.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const TIMESTAMPS_FILE: &str = "timestamps.jsonl";

/// One timestamped checkpoint, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTimestamp {
    pub tree_size: u64,
    /// SHA-256 (hex) of the checkpoint note: what the TSA signed.
    pub note_sha256: String,
    /// Base64 DER `TimeStampResp` as the TSA sent it.
    pub response: String,
}

/// Why a TSA answer was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error("the TSA answer is not a DER TimeStampResp")]
    Malformed,
    #[error("the TSA refused the request (PKIStatus {0})")]
    Refused(u8),
    #[error("the TSA answer does not cover the requested digest or nonce")]
    WrongImprint,
}

/// A DER `TimeStampReq` (RFC 3161 §2.4.1) for SHA-256(`note`), asking for the TSA's
/// certificate, with `nonce` and an optional policy OID (already DER-encoded, tag included).
pub fn request(note: &[u8], nonce: u64, policy_der: Option<&[u8]>) -> Vec<u8> {
    let digest = Sha256::digest(note);
    // AlgorithmIdentifier { id-sha256, NULL }
    let alg = [
        0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00,
    ];
    let mut imprint = Vec::with_capacity(51);
    imprint.extend_from_slice(&alg);
    imprint.extend_from_slice(&[0x04, 0x20]);
    imprint.extend_from_slice(&digest);
    let mut body = vec![0x02, 0x01, 0x01]; // version v1
    body.extend(tlv(0x30, &imprint));
    if let Some(p) = policy_der {
        body.extend_from_slice(p);
    }
    body.extend(tlv(0x02, &nonce_bytes(nonce)));
    body.extend_from_slice(&[0x01, 0x01, 0xff]); // certReq TRUE
    tlv(0x30, &body)
}

/// Check a `TimeStampResp`: granted (or granted with modifications), and its token carries
/// the digest of `note` and `nonce` (both appear verbatim in the signed `TSTInfo`). The TSA's
/// signature is checked offline by auditors against the TSA's CA.
pub fn check_response(resp: &[u8], note: &[u8], nonce: u64) -> Result<(), TimestampError> {
    let token = granted_token(resp)?;
    let digest = Sha256::digest(note);
    let nonce = tlv(0x02, &nonce_bytes(nonce));
    let found = |needle: &[u8]| memchr::memmem::find(token, needle).is_some();
    if token.is_empty() || !found(&digest) || !found(&nonce) {
        return Err(TimestampError::WrongImprint);
    }
    Ok(())
}

/// The `timeStampToken` (DER) of a granted `TimeStampResp`.
fn granted_token(resp: &[u8]) -> Result<&[u8], TimestampError> {
    let (tag, outer, _) = read_tlv(resp).ok_or(TimestampError::Malformed)?;
    if tag != 0x30 {
        return Err(TimestampError::Malformed);
    }
    let (tag, status_info, token) = read_tlv(outer).ok_or(TimestampError::Malformed)?;
    if tag != 0x30 {
        return Err(TimestampError::Malformed);
    }
    let (tag, status, _) = read_tlv(status_info).ok_or(TimestampError::Malformed)?;
    if tag != 0x02 || status.len() != 1 {
        return Err(TimestampError::Malformed);
    }
    if status[0] > 1 {
        return Err(TimestampError::Refused(status[0]));
    }
    Ok(token)
}

/// What a verified timestamp says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimestampInfo {
    /// The TSA's time (RFC 3339).
    pub time: String,
    /// The TSA certificate's subject.
    pub tsa: String,
    /// Whether the TSA's certificate was checked against a TSA CA given by the verifier.
    pub chain_checked: bool,
}

const ID_SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
const ID_MESSAGE_DIGEST: &str = "1.2.840.113549.1.9.4";
const ID_KP_TIME_STAMPING: &str = "1.3.6.1.5.5.7.3.8";

/// Verify a stored `TimeStampResp` offline: granted, its `TSTInfo` covers SHA-256(`note`), its
/// signed attributes match the `TSTInfo`, and the TSA certificate inside it signed them
/// (ECDSA P-256 / SHA-256). With `tsa_ca`, that certificate must also chain to it, allow time
/// stamping, and be valid at the stamped time.
pub fn verify_response(
    resp: &[u8],
    note: &[u8],
    tsa_ca: Option<&crate::pki::CertInfo>,
) -> Result<TimestampInfo, String> {
    use cms::content_info::ContentInfo;
    use cms::signed_data::SignedData;
    use der::{Decode, Encode};
    use signature::Verifier;

    let malformed = |what: &str| format!("the timestamp token is malformed ({what})");
    let token = granted_token(resp).map_err(|e| format!("the timestamp: {e}"))?;
    let ci = ContentInfo::from_der(token).map_err(|e| malformed(&e.to_string()))?;
    if ci.content_type.to_string() != ID_SIGNED_DATA {
        return Err(malformed("not CMS SignedData"));
    }
    let sd: SignedData = ci
        .content
        .decode_as()
        .map_err(|e: der::Error| malformed(&e.to_string()))?;
    let tst = sd
        .encap_content_info
        .econtent
        .as_ref()
        .ok_or_else(|| malformed("no TSTInfo"))?
        .value()
        .to_vec();
    let (imprint, time) = tst_info(&tst).ok_or_else(|| malformed("TSTInfo"))?;
    if imprint != Sha256::digest(note).as_slice() {
        return Err("the timestamp covers another checkpoint (its message imprint differs)".into());
    }
    let signer = sd
        .signer_infos
        .0
        .iter()
        .next()
        .ok_or_else(|| malformed("no signer"))?;
    let attrs = signer
        .signed_attrs
        .as_ref()
        .ok_or_else(|| malformed("no signed attributes"))?;
    let digest_attr = attrs
        .iter()
        .find(|a| a.oid.to_string() == ID_MESSAGE_DIGEST)
        .and_then(|a| a.values.iter().next())
        .ok_or_else(|| malformed("no message digest"))?;
    if digest_attr.value() != Sha256::digest(&tst).as_slice() {
        return Err("the timestamp's signed attributes do not match its content (altered)".into());
    }
    let signed = attrs.to_der().map_err(|e| malformed(&e.to_string()))?;
    let sig = p256::ecdsa::DerSignature::from_bytes(signer.signature.as_bytes())
        .map_err(|_| malformed("signature"))?;
    // The signer is the certificate named by the signer identifier; the set may also hold its
    // CA. Find it by serial (IssuerAndSerialNumber) or key identifier.
    let certs: Vec<crate::pki::CertInfo> = sd
        .certificates
        .as_ref()
        .map(|set| {
            set.0
                .iter()
                .filter_map(|c| match c {
                    cms::cert::CertificateChoices::Certificate(c) => c.to_der().ok(),
                    _ => None,
                })
                .filter_map(|d| crate::pki::CertInfo::parse(&d).ok())
                .collect()
        })
        .unwrap_or_default();
    let named = |c: &crate::pki::CertInfo| match &signer.sid {
        cms::signed_data::SignerIdentifier::IssuerAndSerialNumber(ias) => {
            hex::encode(ias.serial_number.as_bytes()) == c.serial_hex
        }
        cms::signed_data::SignerIdentifier::SubjectKeyIdentifier(_) => true,
    };
    let tsa = certs
        .into_iter()
        .find(named)
        .ok_or("the timestamp carries no TSA certificate")?;
    let key = tsa
        .public_key
        .ok_or("the TSA key is not ECDSA P-256: check this token with `openssl ts -verify`")?;
    key.verify(&signed, &sig).map_err(|_| {
        "the TSA's signature over the timestamp does not verify (altered)".to_owned()
    })?;
    let chain_checked = match tsa_ca {
        None => false,
        Some(ca) => {
            crate::pki::verify_issued_by(&tsa.der, ca).map_err(|e| {
                format!("the TSA certificate does not chain to the TSA CA given: {e}")
            })?;
            if !tsa
                .extended_key_usages
                .iter()
                .any(|o| o == ID_KP_TIME_STAMPING)
            {
                return Err("the TSA certificate does not allow time stamping".into());
            }
            let at = crate::clock::parse_rfc3339(&time).unwrap_or(0);
            tsa.check_window(at)
                .map_err(|e| format!("the TSA certificate at the stamped time: {e}"))?;
            true
        }
    };
    Ok(TimestampInfo {
        time,
        tsa: tsa.subject,
        chain_checked,
    })
}

/// (hashedMessage, genTime as RFC 3339) of a DER `TSTInfo`.
fn tst_info(der: &[u8]) -> Option<(Vec<u8>, String)> {
    let (tag, body, _) = read_tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _version, rest) = read_tlv(body)?;
    let (_, _policy, rest) = read_tlv(rest)?;
    let (_, imprint, rest) = read_tlv(rest)?;
    let (_, _alg, hashed) = read_tlv(imprint)?;
    let (tag, hashed, _) = read_tlv(hashed)?;
    if tag != 0x04 {
        return None;
    }
    let (_, _serial, rest) = read_tlv(rest)?;
    let (tag, time, _) = read_tlv(rest)?;
    if tag != 0x18 {
        return None;
    }
    let t = std::str::from_utf8(time).ok()?;
    // YYYYMMDDHHMMSS[.fff]Z
    if t.len() < 15 || !t.ends_with('Z') {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}{}",
        &t[0..4],
        &t[4..6],
        &t[6..8],
        &t[8..10],
        &t[10..12],
        &t[12..14],
        &t[14..]
    );
    Some((hashed.to_vec(), rfc))
}

/// Every stored timestamp (a torn final line is ignored; so is a line that does not parse,
/// with a warning: timestamps are evidence about checkpoints, not the log itself).
pub fn load(dir: &Path) -> io::Result<Vec<StoredTimestamp>> {
    let data = match std::fs::read(dir.join(TIMESTAMPS_FILE)) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (n, line) in data.split_inclusive(|&b| b == b'\n').enumerate() {
        if line.last() != Some(&b'\n') {
            break;
        }
        match serde_json::from_slice::<StoredTimestamp>(&line[..line.len() - 1]) {
            Ok(t) => out.push(t),
            Err(e) => {
                tracing::warn!(line = n + 1, error = %e, "ignoring an unreadable line of timestamps.jsonl");
            }
        }
    }
    Ok(out)
}

/// The newest `n` timestamps, oldest first, read from the end of `timestamps.jsonl`.
pub fn load_latest(dir: &Path, n: usize) -> io::Result<Vec<StoredTimestamp>> {
    let f = match std::fs::File::open(dir.join(TIMESTAMPS_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    super::lines_from_end(&f, |at, line| {
        match serde_json::from_slice::<StoredTimestamp>(line) {
            Ok(t) => out.push(t),
            Err(e) => {
                tracing::warn!(offset = at, error = %e, "ignoring an unreadable line of timestamps.jsonl");
            }
        }
        out.len() < n
    })?;
    out.reverse();
    Ok(out)
}

/// Append a timestamp durably.
pub fn append(dir: &Path, t: &StoredTimestamp) -> io::Result<()> {
    let path = dir.join(TIMESTAMPS_FILE);
    let mut f = crate::fsutil::open_durable(
        &path,
        OpenOptions::new().create(true).append(true).mode(0o600),
    )?;
    let mut line = serde_json::to_vec(t).map_err(io::Error::other)?;
    line.push(b'\n');
    f.write_all(&line)?;
    f.sync_data()
}

impl StoredTimestamp {
    pub fn new(tree_size: u64, note: &[u8], response: &[u8]) -> Self {
        Self {
            tree_size,
            note_sha256: hex::encode(Sha256::digest(note)),
            response: B64.encode(response),
        }
    }
}

/// A positive INTEGER's content octets for `n`.
fn nonce_bytes(n: u64) -> Vec<u8> {
    let mut b: Vec<u8> = n.to_be_bytes().to_vec();
    while b.len() > 1 && b[0] == 0 && b[1] & 0x80 == 0 {
        b.remove(0);
    }
    if b[0] & 0x80 != 0 {
        b.insert(0, 0);
    }
    b
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// (tag, content, rest) of the first DER element of `data`.
fn read_tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, r) = rest.split_at(n);
        rest = r;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let (content, rest) = rest.split_at(len);
    Some((tag, content, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_der_and_answers_are_checked() {
        let req = request(b"note", 0x80, None);
        assert_eq!(req[0], 0x30);
        assert_eq!(usize::from(req[1]) + 2, req.len());
        assert!(memchr::memmem::find(&req, &Sha256::digest(b"note")).is_some());
        // The nonce 0x80 needs a leading zero to stay positive.
        assert!(memchr::memmem::find(&req, &[0x02, 0x02, 0x00, 0x80]).is_some());
        // A granted answer that carries the digest and the nonce.
        let mut token = vec![0x30, 0x00];
        token.extend_from_slice(&Sha256::digest(b"note"));
        token.extend(tlv(0x02, &nonce_bytes(0x80)));
        let status = tlv(0x30, &[0x02, 0x01, 0x00]);
        let ok = tlv(0x30, &[status.clone(), token.clone()].concat());
        assert_eq!(check_response(&ok, b"note", 0x80), Ok(()));
        assert_eq!(
            check_response(&ok, b"other", 0x80),
            Err(TimestampError::WrongImprint)
        );
        assert_eq!(
            check_response(&ok, b"note", 0x81),
            Err(TimestampError::WrongImprint)
        );
        let refused = tlv(0x30, &tlv(0x30, &[0x02, 0x01, 0x02]));
        assert_eq!(
            check_response(&refused, b"note", 1),
            Err(TimestampError::Refused(2))
        );
        assert_eq!(
            check_response(b"junk", b"note", 1),
            Err(TimestampError::Malformed)
        );
    }
}
