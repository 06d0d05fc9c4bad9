//! Fast verification of ECDSA P-256 signatures over a digest, for the signing path.
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
