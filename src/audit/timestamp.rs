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
    let digest = Sha256::digest(note);
    let nonce = tlv(0x02, &nonce_bytes(nonce));
    let found = |needle: &[u8]| memchr::memmem::find(token, needle).is_some();
    if token.is_empty() || !found(&digest) || !found(&nonce) {
        return Err(TimestampError::WrongImprint);
    }
    Ok(())
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
