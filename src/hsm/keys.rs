//! The token as the key lifecycle (registry, rotation, revocation, the internal CA) sees it:
//! tenant key pairs, their certificates, checked signatures, destruction. [`Hsm`] implements it
//! on the real token; unit tests of the lifecycle implement it in memory (with faults), so the
//! workflow can be tested without a token and with a clock they move.
//!
//! Every signature a [`KeyToken`] returns is verified with the expected public key first.

use futures::future::BoxFuture;
use p256::ecdsa::VerifyingKey;

use super::{Error, Hsm, TokenSession};
use crate::domain::KeyId;

/// What the token holds for one tenant key version.
#[derive(Debug, Clone)]
pub struct TokenKey {
    pub key_id: KeyId,
    pub public_key: VerifyingKey,
    pub has_private_key: bool,
    pub certificate: Option<Vec<u8>>,
}

pub trait KeyToken: Send + Sync {
    /// The P-256 key pair `id` (generated, non-extractable, if it does not exist yet).
    fn ensure_key_pair(&self, id: &str, label: &str) -> BoxFuture<'_, Result<VerifyingKey, Error>>;
    fn public_key(&self, id: &str) -> BoxFuture<'_, Result<Option<VerifyingKey>, Error>>;
    /// A DER ECDSA signature of `digest` by `id`, verified with `expected` before it is returned.
    fn sign(
        &self,
        id: &str,
        digest: [u8; 32],
        expected: VerifyingKey,
    ) -> BoxFuture<'_, Result<Vec<u8>, Error>>;
    /// [`KeyToken::sign`] for blocking code (x509-cert's builders).
    fn sign_blocking(
        &self,
        id: &str,
        digest: [u8; 32],
        expected: VerifyingKey,
    ) -> Result<Vec<u8>, Error>;
    /// Store (or replace) the certificate object of `id`.
    fn store_certificate(
        &self,
        id: &str,
        label: &str,
        der: Vec<u8>,
        subject_der: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), Error>>;
    /// Destroy `id`'s private key; whether one was there.
    fn destroy_private_key(&self, id: &str) -> BoxFuture<'_, Result<bool, Error>>;
    /// Every tenant key version in the token (Signet's own keys skipped).
    fn scan(&self) -> BoxFuture<'_, Result<Vec<TokenKey>, Error>>;
}

impl KeyToken for Hsm {
    fn ensure_key_pair(&self, id: &str, label: &str) -> BoxFuture<'_, Result<VerifyingKey, Error>> {
        let (id, label) = (id.to_owned(), label.to_owned());
        Box::pin(self.call(move |s| s.ensure_p256_key_pair(&id, &label)))
    }

    fn public_key(&self, id: &str) -> BoxFuture<'_, Result<Option<VerifyingKey>, Error>> {
        let id = id.to_owned();
        Box::pin(self.call(move |s| s.public_key(&id)))
    }

    fn sign(
        &self,
        id: &str,
        digest: [u8; 32],
        expected: VerifyingKey,
    ) -> BoxFuture<'_, Result<Vec<u8>, Error>> {
        let id = id.to_owned();
        Box::pin(self.call(move |s| s.sign_prehashed_checked(&id, &digest, &expected)))
    }

    fn sign_blocking(
        &self,
        id: &str,
        digest: [u8; 32],
        expected: VerifyingKey,
    ) -> Result<Vec<u8>, Error> {
        let id = id.to_owned();
        self.call_blocking(move |s| s.sign_prehashed_checked(&id, &digest, &expected))
    }

    fn store_certificate(
        &self,
        id: &str,
        label: &str,
        der: Vec<u8>,
        subject_der: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), Error>> {
        let (id, label) = (id.to_owned(), label.to_owned());
        Box::pin(self.call(move |s| s.store_certificate(&id, &label, &der, &subject_der)))
    }

    fn destroy_private_key(&self, id: &str) -> BoxFuture<'_, Result<bool, Error>> {
        let id = id.to_owned();
        Box::pin(self.call(move |s| s.destroy_private_key(&id)))
    }

    fn scan(&self) -> BoxFuture<'_, Result<Vec<TokenKey>, Error>> {
        Box::pin(self.call(scan_token))
    }
}

/// List every tenant key version in the token (skips Signet's internal keys).
fn scan_token(s: &TokenSession<'_>) -> Result<Vec<TokenKey>, Error> {
    use std::collections::BTreeSet;
    let objects = s.list_objects()?;
    let ids: BTreeSet<KeyId> = objects
        .iter()
        .filter_map(|o| o.id.parse::<KeyId>().ok())
        .collect();
    let mut out = Vec::new();
    for key_id in ids {
        let id = key_id.to_string();
        let Some(public_key) = s.public_key(&id)? else {
            tracing::warn!(%key_id, "token object without a public key; ignored");
            continue;
        };
        out.push(TokenKey {
            has_private_key: s.has_private_key(&id)?,
            certificate: s.certificate(&id)?,
            public_key,
            key_id,
        });
    }
    Ok(out)
}

/// The `CKA_ID` of the signer-evidence vault's key-encryption key of `generation`.
pub fn kek_id(generation: u32) -> String {
    format!("signet-vault-kek-{generation}")
}

/// The signer-evidence vault's key-encryption keys in the token, by generation: AES-256,
/// generated in the token, never extractable. Data keys are encrypted under them inside the
/// token; destroying a generation makes everything wrapped under it unreadable for good.
pub trait VaultKeys: Send + Sync {
    /// Make sure generation `generation` exists (generated if not).
    fn ensure_kek(&self, generation: u32) -> BoxFuture<'_, Result<(), Error>>;
    fn has_kek(&self, generation: u32) -> BoxFuture<'_, Result<bool, Error>>;
    /// `key` encrypted in the token under `generation` (AES-GCM, bound to `aad`).
    fn wrap(
        &self,
        generation: u32,
        key: Zeroizing<[u8; 32]>,
        aad: Vec<u8>,
    ) -> BoxFuture<'_, Result<Vec<u8>, Error>>;
    /// The inverse of [`VaultKeys::wrap`].
    fn unwrap(
        &self,
        generation: u32,
        wrapped: Vec<u8>,
        aad: Vec<u8>,
    ) -> BoxFuture<'_, Result<Zeroizing<[u8; 32]>, Error>>;
    /// Destroy `generation` in the token; whether it was there.
    fn destroy_kek(&self, generation: u32) -> BoxFuture<'_, Result<bool, Error>>;
}

use zeroize::Zeroizing;

impl VaultKeys for Hsm {
    fn ensure_kek(&self, generation: u32) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.call(move |s| {
            s.ensure_aes_key(
                &kek_id(generation),
                &format!("signet vault key-encryption key {generation}"),
            )
        }))
    }

    fn has_kek(&self, generation: u32) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(self.call(move |s| s.has_secret_key(&kek_id(generation))))
    }

    fn wrap(
        &self,
        generation: u32,
        key: Zeroizing<[u8; 32]>,
        aad: Vec<u8>,
    ) -> BoxFuture<'_, Result<Vec<u8>, Error>> {
        Box::pin(self.call(move |s| s.aes_gcm_encrypt(&kek_id(generation), key.as_slice(), &aad)))
    }

    fn unwrap(
        &self,
        generation: u32,
        wrapped: Vec<u8>,
        aad: Vec<u8>,
    ) -> BoxFuture<'_, Result<Zeroizing<[u8; 32]>, Error>> {
        Box::pin(self.call(move |s| {
            let plain = s.aes_gcm_decrypt(&kek_id(generation), &wrapped, &aad)?;
            let mut key = Zeroizing::new([0u8; 32]);
            if plain.len() != 32 {
                return Err(Error::Malformed("wrapped data key"));
            }
            key.copy_from_slice(&plain);
            Ok(key)
        }))
    }

    fn destroy_kek(&self, generation: u32) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(self.call(move |s| s.destroy_secret_key(&kek_id(generation))))
    }
}
