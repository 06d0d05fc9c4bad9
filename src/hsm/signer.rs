//! A `signature::Signer` backed by a token key, so x509-cert's builders (certificates, CSRs)
//! sign inside the token. Synchronous: use it from blocking code only.

use std::sync::Arc;

use p256::ecdsa::{DerSignature, VerifyingKey};
use spki::{AlgorithmIdentifierOwned, DynSignatureAlgorithmIdentifier};

use super::KeyToken;

pub struct TokenSigner {
    token: Arc<dyn KeyToken>,
    id: String,
    public: VerifyingKey,
}

impl TokenSigner {
    /// `public` must be the public half of the token key `id` (read it from the token).
    pub fn new(token: Arc<dyn KeyToken>, id: impl Into<String>, public: VerifyingKey) -> Self {
        Self {
            token,
            id: id.into(),
            public,
        }
    }
}

impl signature::Keypair for TokenSigner {
    type VerifyingKey = VerifyingKey;
    fn verifying_key(&self) -> VerifyingKey {
        self.public
    }
}

impl signature::Signer<DerSignature> for TokenSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<DerSignature, signature::Error> {
        let digest: [u8; 32] = crate::sha256::sha256(msg);
        // Checked like every token signature: never a certificate or CSR signed by another key.
        let der = self
            .token
            .sign_blocking(&self.id, digest, self.public)
            .map_err(signature::Error::from_source)?;
        DerSignature::from_bytes(&der).map_err(|_| signature::Error::new())
    }
}

impl DynSignatureAlgorithmIdentifier for TokenSigner {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        // ecdsa-with-SHA256 (1.2.840.10045.4.3.2), no parameters.
        Ok(AlgorithmIdentifierOwned {
            oid: ECDSA_WITH_SHA256,
            parameters: None,
        })
    }
}

pub const ECDSA_WITH_SHA256: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
