//! Signature verification: ECDSA P-256 over a digest for the signing path (fast, keys parsed
//! once per thread), and the signatures of third parties (a TSA's CMS signature, the
//! certificates of its chain), whatever common algorithm they use.
//!
//! Every signature the token makes is checked with the key version's public key before it
//! leaves Signet. `p256`'s `verify_prehash` costs about 200–290 µs on the reference VM, more
//! than the token's own `C_Sign`; AWS-LC's (through `aws-lc-rs`, which verifies a digest
//! without the message) about 70 µs. Parsed public keys are kept per thread (the token
//! workers), bounded.

use std::cell::RefCell;
use std::collections::HashMap;

use aws_lc_rs::digest::{Digest, SHA256};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ParsedPublicKey};
use p256::ecdsa::VerifyingKey;

/// Parsed keys kept per thread; past this the cache starts again empty.
const KEYS_PER_THREAD: usize = 1024;

thread_local! {
    static PARSED: RefCell<HashMap<Vec<u8>, ParsedPublicKey>> = RefCell::new(HashMap::new());
}

/// Does `der` (an ASN.1 `ECDSA-Sig-Value`) verify over `digest` with `key`?
pub fn verifies_prehash(key: &VerifyingKey, digest: &[u8; 32], der: &[u8]) -> bool {
    let Ok(digest) = Digest::import_less_safe(digest, &SHA256) else {
        return false;
    };
    let sec1 = key.to_sec1_point(false).as_bytes().to_vec();
    PARSED.with(|cell| {
        let mut parsed = cell.borrow_mut();
        if !parsed.contains_key(&sec1) {
            let Ok(p) = ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &sec1) else {
                return false;
            };
            if parsed.len() >= KEYS_PER_THREAD {
                parsed.clear();
            }
            parsed.insert(sec1.clone(), p);
        }
        parsed
            .get(&sec1)
            .is_some_and(|p| p.verify_digest_sig(&digest, der).is_ok())
    })
}

/// Why a third party's signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("unsupported key or signature algorithm ({0})")]
    Unsupported(String),
    #[error("the signature does not verify")]
    Bad,
}

const ID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const ID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const SECP256R1: &str = "1.2.840.10045.3.1.7";
const SECP384R1: &str = "1.3.132.0.34";

/// The hash a signature algorithm (or, for CMS's bare `rsaEncryption`, the separate digest
/// algorithm) names: 256, 384 or 512.
fn hash_bits(algorithm: &str, digest_algorithm: Option<&str>) -> Option<u16> {
    let bits = |oid: &str| match oid {
        "1.2.840.10045.4.3.2" | "1.2.840.113549.1.1.11" | "2.16.840.1.101.3.4.2.1" => Some(256),
        "1.2.840.10045.4.3.3" | "1.2.840.113549.1.1.12" | "2.16.840.1.101.3.4.2.2" => Some(384),
        "1.2.840.10045.4.3.4" | "1.2.840.113549.1.1.13" | "2.16.840.1.101.3.4.2.3" => Some(512),
        _ => None,
    };
    bits(algorithm).or_else(|| match algorithm {
        ID_RSA_ENCRYPTION | ID_EC_PUBLIC_KEY => digest_algorithm.and_then(bits),
        _ => None,
    })
}

/// Does `signature` over `message` verify with `key` under `algorithm` (an X.509 or CMS
/// signature algorithm; `digest_algorithm` is CMS's separate one, for `rsaEncryption`)?
/// ECDSA P-256/P-384 with SHA-256/384/512 and RSA PKCS#1 v1.5 (2048–8192 bits) with
/// SHA-256/384/512: what TSAs and CAs use. Anything else is `Unsupported`, never accepted.
pub fn verify_signed(
    key: &spki::SubjectPublicKeyInfoOwned,
    algorithm: &spki::AlgorithmIdentifierOwned,
    digest_algorithm: Option<&spki::AlgorithmIdentifierOwned>,
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    use aws_lc_rs::signature::{self as sig, UnparsedPublicKey, VerificationAlgorithm};
    let alg_oid = algorithm.oid.to_string();
    let digest_oid = digest_algorithm.map(|d| d.oid.to_string());
    let unsupported = || {
        SignatureError::Unsupported(format!(
            "key {}, signature {alg_oid}{}",
            key.algorithm.oid,
            digest_oid
                .as_deref()
                .map(|d| format!(", digest {d}"))
                .unwrap_or_default()
        ))
    };
    let bits = hash_bits(&alg_oid, digest_oid.as_deref()).ok_or_else(unsupported)?;
    let verifier: &'static dyn VerificationAlgorithm = match key.algorithm.oid.to_string().as_str()
    {
        ID_EC_PUBLIC_KEY => {
            let curve = key
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<spki::ObjectIdentifier>().ok())
                .map(|o| o.to_string());
            match (curve.as_deref(), bits) {
                (Some(SECP256R1), 256) => &sig::ECDSA_P256_SHA256_ASN1,
                (Some(SECP256R1), 384) => &sig::ECDSA_P256_SHA384_ASN1,
                (Some(SECP384R1), 256) => &sig::ECDSA_P384_SHA256_ASN1,
                (Some(SECP384R1), 384) => &sig::ECDSA_P384_SHA384_ASN1,
                _ => return Err(unsupported()),
            }
        }
        ID_RSA_ENCRYPTION => match bits {
            256 => &sig::RSA_PKCS1_2048_8192_SHA256,
            384 => &sig::RSA_PKCS1_2048_8192_SHA384,
            _ => &sig::RSA_PKCS1_2048_8192_SHA512,
        },
        _ => return Err(unsupported()),
    };
    UnparsedPublicKey::new(verifier, key.subject_public_key.raw_bytes())
        .verify(message, signature)
        .map_err(|_| SignatureError::Bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::{DerSignature, SigningKey};

    #[test]
    fn accepts_the_right_key_and_digest_and_nothing_else() {
        let sk = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let other = VerifyingKey::from(&SigningKey::from_slice(&[8u8; 32]).unwrap());
        let digest = [3u8; 32];
        let sig: DerSignature = sk.sign_prehash(&digest).unwrap();
        let key = VerifyingKey::from(&sk);
        assert!(verifies_prehash(&key, &digest, sig.as_bytes()));
        assert!(!verifies_prehash(&other, &digest, sig.as_bytes()));
        assert!(!verifies_prehash(&key, &[4u8; 32], sig.as_bytes()));
        assert!(!verifies_prehash(&key, &digest, &sig.as_bytes()[1..]));
        // p256 agrees on what verifies.
        use signature::hazmat::PrehashVerifier;
        let parsed = p256::ecdsa::Signature::from_der(sig.as_bytes()).unwrap();
        assert!(key.verify_prehash(&digest, &parsed).is_ok());
    }
}
