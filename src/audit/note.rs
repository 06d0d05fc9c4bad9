//! Text formats third-party transparency-log tooling reads: C2SP `tlog-checkpoint` bodies,
//! C2SP signed notes (ECDSA P-256, signature type 0x02) and C2SP `tlog-proof@v1`.
//!
//! Pure: parsing, formatting and verification only.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::{DerSignature, VerifyingKey};
use signature::Verifier;
use spki::EncodePublicKey;

use super::merkle::Hash;

pub const PROOF_HEADER: &str = "c2sp.org/tlog-proof@v1";
/// Notes larger than this are refused before parsing.
pub const MAX_NOTE_BYTES: usize = 64 * 1024;
const MAX_SIGNATURES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("malformed checkpoint: {0}")]
    Checkpoint(&'static str),
    #[error("malformed proof: {0}")]
    Proof(&'static str),
    #[error("no signature from the log key `{0}` in the note")]
    NoKnownSignature(String),
    #[error("the log key's signature on the note does not verify")]
    BadSignature,
}

/// The three mandatory lines of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The note text: origin, size, base64 root, each ending in a newline.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    pub fn parse_body(text: &str) -> Result<Self, NoteError> {
        let mut lines = text
            .strip_suffix('\n')
            .ok_or(NoteError::Checkpoint("text must end in a newline"))?
            .split('\n');
        let origin = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or(NoteError::Checkpoint("empty origin"))?;
        let size_line = lines
            .next()
            .ok_or(NoteError::Checkpoint("missing tree size"))?;
        let size = parse_decimal(size_line).ok_or(NoteError::Checkpoint(
            "tree size is not a decimal without leading zeros",
        ))?;
        let root = decode_hash(
            lines
                .next()
                .ok_or(NoteError::Checkpoint("missing root hash"))?,
        )
        .ok_or(NoteError::Checkpoint("root hash is not 32 bytes of base64"))?;
        // Extension lines are allowed but must be non-empty.
        if lines.any(str::is_empty) {
            return Err(NoteError::Checkpoint("empty extension line"));
        }
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

/// One signature line of a signed note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    pub name: String,
    pub key_id: u32,
    pub signature: Vec<u8>,
}

/// A signed note: text (ending in a newline), a blank line, signature lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedNote {
    pub text: String,
    pub signatures: Vec<NoteSignature>,
}

impl SignedNote {
    pub fn parse(note: &str) -> Result<Self, NoteError> {
        if note.len() > MAX_NOTE_BYTES {
            return Err(NoteError::Malformed("note too large"));
        }
        if note.chars().any(|c| c.is_control() && c != '\n') {
            return Err(NoteError::Malformed("control character"));
        }
        let split = note
            .rfind("\n\n")
            .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let text = &note[..split + 1];
        let sigs = &note[split + 2..];
        let sigs = sigs
            .strip_suffix('\n')
            .ok_or(NoteError::Malformed("signatures must end in a newline"))?;
        let mut signatures = Vec::new();
        for line in sigs.split('\n') {
            let rest = line.strip_prefix("\u{2014} ").ok_or(NoteError::Malformed(
                "signature line must start with an em dash",
            ))?;
            let (name, b64) = rest
                .split_once(' ')
                .ok_or(NoteError::Malformed("signature line without a key name"))?;
            if name.is_empty() || name.contains('+') {
                return Err(NoteError::Malformed("bad key name"));
            }
            let raw = B64
                .decode(b64)
                .map_err(|_| NoteError::Malformed("signature is not base64"))?;
            if raw.len() < 5 {
                return Err(NoteError::Malformed("signature too short"));
            }
            let key_id = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            signatures.push(NoteSignature {
                name: name.to_owned(),
                key_id,
                signature: raw[4..].to_vec(),
            });
            if signatures.len() > MAX_SIGNATURES {
                return Err(NoteError::Malformed("too many signatures"));
            }
        }
        Ok(Self {
            text: text.to_owned(),
            signatures,
        })
    }

    pub fn render(&self) -> String {
        let mut out = format!("{}\n", self.text);
        for s in &self.signatures {
            let mut raw = s.key_id.to_be_bytes().to_vec();
            raw.extend_from_slice(&s.signature);
            out.push_str(&format!("\u{2014} {} {}\n", s.name, B64.encode(raw)));
        }
        out
    }

    /// Verify the signature of `key_name`/`key` (ECDSA, type 0x02) over the text.
    pub fn verify(&self, key_name: &str, key: &VerifyingKey) -> Result<(), NoteError> {
        let id = key_id(key);
        let sig = self
            .signatures
            .iter()
            .find(|s| s.name == key_name && s.key_id == id)
            .ok_or_else(|| NoteError::NoKnownSignature(key_name.to_owned()))?;
        let der = DerSignature::from_bytes(&sig.signature).map_err(|_| NoteError::BadSignature)?;
        key.verify(self.text.as_bytes(), &der)
            .map_err(|_| NoteError::BadSignature)
    }
}

/// C2SP signed-note key ID for ECDSA (type 0x02): the first four bytes of SHA-256 of the
/// DER SubjectPublicKeyInfo.
pub fn key_id(key: &VerifyingKey) -> u32 {
    let der = key
        .to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default();
    let h = crate::sha256::sha256(der);
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

/// Build the signed checkpoint note from a DER signature over `checkpoint.body()`.
pub fn signed_checkpoint(
    checkpoint: &Checkpoint,
    key: &VerifyingKey,
    der_signature: Vec<u8>,
) -> String {
    SignedNote {
        text: checkpoint.body(),
        signatures: vec![NoteSignature {
            name: checkpoint.origin.clone(),
            key_id: key_id(key),
            signature: der_signature,
        }],
    }
    .render()
}

/// Parse a signed checkpoint, verify the log key's signature, and return its contents.
pub fn verify_checkpoint(
    note: &str,
    key_name: &str,
    key: &VerifyingKey,
) -> Result<Checkpoint, NoteError> {
    let parsed = SignedNote::parse(note)?;
    parsed.verify(key_name, key)?;
    Checkpoint::parse_body(&parsed.text)
}

/// A C2SP `tlog-proof@v1`: optional extra data (here: the canonical entry), the index, the
/// inclusion proof and the checkpoint it proves against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlogProof {
    pub extra: Option<Vec<u8>>,
    pub index: u64,
    pub hashes: Vec<Hash>,
    pub checkpoint: String,
}

impl TlogProof {
    pub fn render(&self) -> String {
        let mut out = format!("{PROOF_HEADER}\n");
        if let Some(extra) = &self.extra {
            out.push_str(&format!("extra {}\n", B64.encode(extra)));
        }
        out.push_str(&format!("index {}\n", self.index));
        for h in &self.hashes {
            out.push_str(&B64.encode(h));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.checkpoint);
        out
    }

    pub fn parse(text: &str) -> Result<Self, NoteError> {
        if text.len() > MAX_NOTE_BYTES + 1024 * 1024 {
            return Err(NoteError::Proof("proof too large"));
        }
        let (head, checkpoint) = text
            .split_once("\n\n")
            .ok_or(NoteError::Proof("no blank line before the checkpoint"))?;
        let mut lines = head.split('\n');
        if lines.next() != Some(PROOF_HEADER) {
            return Err(NoteError::Proof(
                "first line must be c2sp.org/tlog-proof@v1",
            ));
        }
        let mut line = lines.next().ok_or(NoteError::Proof("missing index line"))?;
        let mut extra = None;
        if let Some(b64) = line.strip_prefix("extra ") {
            extra = Some(
                B64.decode(b64)
                    .map_err(|_| NoteError::Proof("extra is not base64"))?,
            );
            line = lines.next().ok_or(NoteError::Proof("missing index line"))?;
        }
        let idx = line
            .strip_prefix("index ")
            .ok_or(NoteError::Proof("missing index line"))?;
        let index = parse_decimal(idx).ok_or(NoteError::Proof(
            "index is not a decimal without leading zeros",
        ))?;
        let mut hashes = Vec::new();
        for l in lines {
            hashes.push(
                decode_hash(l)
                    .ok_or(NoteError::Proof("proof line is not a 32-byte base64 hash"))?,
            );
            if hashes.len() > 64 {
                return Err(NoteError::Proof("proof too long"));
            }
        }
        Ok(Self {
            extra,
            index,
            hashes,
            checkpoint: checkpoint.to_owned(),
        })
    }
}

/// ASCII decimal without leading zeros (C2SP's form for sizes and indexes).
fn parse_decimal(s: &str) -> Option<u64> {
    let leading_zero = s.len() > 1 && s.starts_with('0');
    let canonical = !s.is_empty() && !leading_zero && s.bytes().all(|b| b.is_ascii_digit());
    if canonical { s.parse().ok() } else { None }
}

fn decode_hash(s: &str) -> Option<Hash> {
    B64.decode(s).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::Generate;

    fn sign(sk: &SigningKey, msg: &[u8]) -> Vec<u8> {
        let s: p256::ecdsa::Signature = signature::Signer::sign(sk, msg);
        s.to_der().as_bytes().to_vec()
    }

    /// A fresh key, a checkpoint of size 42 and its signed note.
    fn signed_fixture() -> (SigningKey, Checkpoint, String) {
        let sk = SigningKey::generate();
        let cp = Checkpoint {
            origin: "signet.example/log".into(),
            size: 42,
            root: [7; 32],
        };
        let note = signed_checkpoint(&cp, sk.verifying_key(), sign(&sk, cp.body().as_bytes()));
        (sk, cp, note)
    }

    #[test]
    fn checkpoint_round_trip_and_tamper() {
        let (sk, cp, note) = signed_fixture();
        assert!(note.starts_with("signet.example/log\n42\nBwcH"));
        assert!(note.contains("\n\n\u{2014} signet.example/log "));
        assert_eq!(
            verify_checkpoint(&note, "signet.example/log", sk.verifying_key()).unwrap(),
            cp
        );
        let tampered = note.replacen("\n42\n", "\n43\n", 1);
        assert_eq!(
            verify_checkpoint(&tampered, "signet.example/log", sk.verifying_key()),
            Err(NoteError::BadSignature)
        );
        let other = SigningKey::generate();
        assert!(matches!(
            verify_checkpoint(&note, "signet.example/log", other.verifying_key()),
            Err(NoteError::NoKnownSignature(_))
        ));
        assert!(matches!(
            verify_checkpoint(&note, "other", sk.verifying_key()),
            Err(NoteError::NoKnownSignature(_))
        ));
    }

    #[test]
    fn malformed_notes_are_errors_not_panics() {
        for bad in [
            "",
            "\n",
            "a\n\n",
            "a\n\n\u{2014} k\n",
            "a\n\n\u{2014} k !!!\n",
            "a\n\n- k AAAAAAA=\n",
            "a\u{7}\n\n\u{2014} k AAAAAAA=\n",
        ] {
            assert!(SignedNote::parse(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "o\n", "o\n01\nAAAA\n", "o\n1\nAAAA\n", "\n1\nAA==\n"] {
            assert!(Checkpoint::parse_body(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tlog_proof_round_trip() {
        let p = TlogProof {
            extra: Some(b"{\"a\":1}".to_vec()),
            index: 7,
            hashes: vec![[1; 32], [2; 32]],
            checkpoint: "o\n9\nAQ==\n\n\u{2014} o AAAAAAE=\n".into(),
        };
        let text = p.render();
        assert!(text.starts_with("c2sp.org/tlog-proof@v1\nextra "));
        assert_eq!(TlogProof::parse(&text).unwrap(), p);
        let none = TlogProof {
            extra: None,
            index: 0,
            hashes: vec![],
            checkpoint: "x".into(),
        };
        assert_eq!(TlogProof::parse(&none.render()).unwrap(), none);
        for bad in [
            "",
            "c2sp.org/tlog-proof@v1\n\n",
            "c2sp.org/tlog-proof@v1\nindex 01\n\nx",
            "c2sp.org/tlog-proof@v1\nindex 1\nAA==\n\nx",
        ] {
            assert!(TlogProof::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// A deterministic mutation run over valid inputs (CI-sized; `cargo fuzz` goes further,
    /// see tests/fuzz): every parser returns a value or an error, never panics.
    #[test]
    fn parsers_survive_mutated_input() {
        let (sk, _, note) = signed_fixture();
        let proof = TlogProof {
            extra: Some(b"{\"index\":0}".to_vec()),
            index: 3,
            hashes: vec![[9; 32]; 3],
            checkpoint: note.clone(),
        }
        .render();
        let entry =
            br#"{"actor":{"identity":"x"},"event":"signature","index":0,"time":"t"}"#.to_vec();
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut rand = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n.max(1) as u64) as usize
        };
        for seed in [note.into_bytes(), proof.into_bytes(), entry] {
            for _ in 0..1500 {
                let mut m = seed.clone();
                for _ in 0..1 + rand(4) {
                    let at = rand(m.len() + 1);
                    match rand(4) {
                        0 if at < m.len() => m[at] = rand(256) as u8,
                        1 => m.insert(at, [b'\n', b' ', 0xe2, b'=', b'0', 0xff][rand(6)]),
                        2 if at < m.len() => {
                            m.remove(at);
                        }
                        _ => m.truncate(at),
                    }
                }
                let _ = super::super::entry::parse_stored(&m, 0);
                if let Ok(t) = std::str::from_utf8(&m) {
                    if let Ok(n) = SignedNote::parse(t) {
                        let _ = Checkpoint::parse_body(&n.text);
                        let _ = n.verify("signet.example/log", sk.verifying_key());
                    }
                    let _ = Checkpoint::parse_body(t);
                    let _ = TlogProof::parse(t);
                    let _ = verify_checkpoint(t, "signet.example/log", sk.verifying_key());
                }
            }
        }
    }
}
