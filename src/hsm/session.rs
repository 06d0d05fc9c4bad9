//! Operations on one logged-in session, lent to a closure by a pool worker.
//!
//! Objects are addressed by `CKA_ID` (a UTF-8 string such as `payroll/v3`). Private-key handles
//! are cached by the pool; the cache is emptied whenever a session or the library is replaced.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeType, CertificateType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::Session;
use moka::sync::Cache;
use p256::ecdsa::VerifyingKey;

use super::{Error, P256_EC_PARAMS, ec_point_to_key, raw_to_der};

/// A session plus the handle cache; what a closure passed to `Hsm::call` works with.
pub struct TokenSession<'a> {
    pub(super) session: &'a Session,
    pub(super) handles: &'a Cache<(u64, String), ObjectHandle>,
    /// The library instance the session belongs to: part of every cached handle's key.
    pub(super) instance: u64,
}

/// A failed key generation: a token that lacks the mechanism gets
/// [`Error::MissingMechanism`], naming what to provision out of band; anything else is the
/// PKCS#11 error of `op`.
fn generation_failed(
    e: cryptoki::error::Error,
    op: &'static str,
    mechanism: &'static str,
    what: &'static str,
    id: &str,
) -> Error {
    use cryptoki::error::{Error as Ck, RvError as Rv};
    match e {
        Ck::Pkcs11(
            Rv::MechanismInvalid | Rv::MechanismParamInvalid | Rv::FunctionNotSupported,
            _,
        ) => Error::MissingMechanism {
            mechanism,
            what,
            id: id.to_owned(),
        },
        other => Error::pkcs11(op)(other),
    }
}

/// What kind of secret key [`TokenSession::ensure_secret_key`] generates.
struct SecretKind {
    key_type: KeyType,
    mechanism: Mechanism<'static>,
    mechanism_name: &'static str,
    what: &'static str,
    /// What the key is for.
    usage: [Attribute; 2],
    /// What it is not for (the strict template; dropped if the token refuses it).
    refused: [Attribute; 5],
}

/// One object as listed by [`TokenSession::list_objects`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSummary {
    pub class: ObjectKind,
    pub id: String,
    pub label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    PrivateKey,
    PublicKey,
    Certificate,
    Other,
}

/// Generate with the `strict` template; if the token refuses it as inconsistent (some tie
/// attributes together), with the `required` one.
fn strict_or_required<T>(
    id: &str,
    strict: &[Attribute],
    required: &[Attribute],
    generate: impl Fn(&[Attribute]) -> cryptoki::error::Result<T>,
) -> cryptoki::error::Result<T> {
    use cryptoki::error::{Error as Ck, RvError as Rv};
    match generate(strict) {
        Err(Ck::Pkcs11(
            Rv::TemplateInconsistent
            | Rv::AttributeValueInvalid
            | Rv::AttributeTypeInvalid
            | Rv::GeneralError,
            _,
        )) => {
            tracing::info!(key_id = %id, "the token refused the strict key template; generating with the required attributes only");
            generate(required)
        }
        other => other,
    }
}

impl TokenSession<'_> {
    /// Sign a 32-byte digest with `CKM_ECDSA` and return the DER `ECDSA-Sig-Value`.
    pub fn sign_prehashed(&self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>, Error> {
        let key = self.private_key(id)?;
        let raw = self
            .session
            .sign(&Mechanism::Ecdsa, key, digest)
            .map_err(Error::pkcs11("C_Sign"))?;
        raw_to_der(&raw)
    }

    /// [`TokenSession::sign_prehashed`], then [`check`] the signature with `expected` (the
    /// public key of the version asked for) on the worker thread. For Signet's own rare calls;
    /// the signing path checks off the worker ([`crate::hsm::Hsm::sign_as`]).
    pub fn sign_prehashed_checked(
        &self,
        id: &str,
        digest: &[u8; 32],
        expected: &VerifyingKey,
    ) -> Result<Vec<u8>, Error> {
        check(
            self.handles,
            id,
            digest,
            self.sign_prehashed(id, digest)?,
            expected,
        )
    }

    /// The handle of the private key with this `CKA_ID`, from the cache or one search.
    pub fn private_key(&self, id: &str) -> Result<ObjectHandle, Error> {
        let cache_key = (self.instance, id.to_owned());
        if let Some(h) = self.handles.get(&cache_key) {
            return Ok(h);
        }
        let h = self
            .find_one(ObjectClass::PRIVATE_KEY, id)?
            .ok_or_else(|| Error::NotFound(format!("private key {id}")))?;
        self.handles.insert(cache_key, h);
        Ok(h)
    }

    /// Whether a private key with this `CKA_ID` exists (no caching: used by rotation).
    pub fn has_private_key(&self, id: &str) -> Result<bool, Error> {
        Ok(self.find_one(ObjectClass::PRIVATE_KEY, id)?.is_some())
    }

    /// Generate a P-256 key pair in the token: sensitive, never extractable, a token object.
    /// Idempotent: if a key pair with this `CKA_ID` exists, its public key is returned.
    pub fn ensure_p256_key_pair(&self, id: &str, label: &str) -> Result<VerifyingKey, Error> {
        if self.find_one(ObjectClass::PRIVATE_KEY, id)?.is_some() {
            if let Some(pk) = self.public_key(id)? {
                return Ok(pk);
            }
            // A private key without its public half cannot be used safely: refuse.
            return Err(Error::Malformed(
                "key pair (private key without public key)",
            ));
        }
        // A public key without a private key (left by a failed generation) is removed first,
        // so there is never more than one object per class and ID.
        if let Some(h) = self.find_one(ObjectClass::PUBLIC_KEY, id)? {
            self.session
                .destroy_object(h)
                .map_err(Error::pkcs11("C_DestroyObject"))?;
        }
        let id_bytes = id.as_bytes().to_vec();
        let label = label.as_bytes().to_vec();
        // Sign-only: the private key may sign, nothing else. The strict template also says
        // so explicitly (decrypt, unwrap, derive false); some tokens tie attributes together
        // and refuse it (tpm2-pkcs11 maps CKA_VERIFY and CKA_DECRYPT to one TPM flag, and
        // answers CKR_GENERAL_ERROR), so a refused strict template is retried with only what
        // must be set. Either way, what must hold is checked on the generated key below.
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(P256_EC_PARAMS.to_vec()),
            Attribute::Id(id_bytes.clone()),
            Attribute::Label(label.clone()),
        ];
        let required = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::KeyType(KeyType::EC),
            Attribute::Id(id_bytes),
            Attribute::Label(label),
        ];
        let mut strict = required.clone();
        strict.extend([
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]);
        let generate = |private: &[Attribute]| {
            self.session
                .generate_key_pair(&Mechanism::EccKeyPairGen, &public, private)
        };
        let (pub_h, priv_h) =
            strict_or_required(id, &strict, &required, generate).map_err(|e| {
                generation_failed(
                    e,
                    "C_GenerateKeyPair",
                    "CKM_EC_KEY_PAIR_GEN (P-256)",
                    "a P-256 key pair",
                    id,
                )
            })?;
        if let Err(e) = self.check_generated_key(priv_h) {
            // A key that could leave the token or derive secrets is never used: remove it.
            let _ = self.session.destroy_object(priv_h);
            let _ = self.session.destroy_object(pub_h);
            return Err(e);
        }
        self.read_public_key(pub_h)
    }

    /// What must hold for a generated private or secret key, as far as the token reports it: sensitive,
    /// never extractable, and no key derivation (ECDH would let a caller of the token compute
    /// secrets with it). `CKA_DECRYPT`/`CKA_UNWRAP` are inert on an EC key (PKCS#11 has no EC
    /// decryption or unwrapping mechanism) and are only logged. An attribute the token does
    /// not report is not held against it.
    fn check_generated_key(&self, h: ObjectHandle) -> Result<(), Error> {
        let attrs = self
            .session
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Derive,
                    AttributeType::Decrypt,
                    AttributeType::Unwrap,
                ],
            )
            .map_err(Error::pkcs11(
                "C_GetAttributeValue (key usage and protection)",
            ))?;
        for a in attrs {
            match a {
                Attribute::Sensitive(false) => {
                    return Err(Error::UnsafeKey("CKA_SENSITIVE is false"));
                }
                Attribute::Extractable(true) => {
                    return Err(Error::UnsafeKey("CKA_EXTRACTABLE is true"));
                }
                Attribute::Derive(true) => {
                    return Err(Error::UnsafeKey("CKA_DERIVE is true"));
                }
                Attribute::Decrypt(true) | Attribute::Unwrap(true) => {
                    tracing::info!(
                        "the token reports CKA_DECRYPT or CKA_UNWRAP on a new EC private key; \
                         inert for EC keys (no such mechanism), key accepted"
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The public key with this `CKA_ID`, if any.
    pub fn public_key(&self, id: &str) -> Result<Option<VerifyingKey>, Error> {
        match self.find_one(ObjectClass::PUBLIC_KEY, id)? {
            Some(h) => self.read_public_key(h).map(Some),
            None => Ok(None),
        }
    }

    /// Store `der` as the certificate object for `id`, replacing any previous one.
    pub fn store_certificate(
        &self,
        id: &str,
        label: &str,
        der: &[u8],
        subject_der: &[u8],
    ) -> Result<(), Error> {
        for h in self.find_all(ObjectClass::CERTIFICATE, id)? {
            self.session
                .destroy_object(h)
                .map_err(Error::pkcs11("C_DestroyObject"))?;
        }
        let template = [
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Id(id.as_bytes().to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Subject(subject_der.to_vec()),
            Attribute::Value(der.to_vec()),
        ];
        self.session
            .create_object(&template)
            .map_err(Error::pkcs11("C_CreateObject"))?;
        Ok(())
    }

    /// The DER certificate stored for `id`, if any.
    pub fn certificate(&self, id: &str) -> Result<Option<Vec<u8>>, Error> {
        let Some(h) = self.find_one(ObjectClass::CERTIFICATE, id)? else {
            return Ok(None);
        };
        let attrs = self
            .session
            .get_attributes(h, &[AttributeType::Value])
            .map_err(Error::pkcs11("C_GetAttributeValue (certificate CKA_VALUE)"))?;
        for a in attrs {
            if let Attribute::Value(v) = a {
                return Ok(Some(v));
            }
        }
        Err(Error::Malformed("certificate object without CKA_VALUE"))
    }

    /// Destroy the private key for `id` (retirement). Idempotent. The public key and
    /// certificate stay for verification.
    pub fn destroy_private_key(&self, id: &str) -> Result<bool, Error> {
        self.handles.invalidate(&(self.instance, id.to_owned()));
        let mut destroyed = false;
        for h in self.find_all(ObjectClass::PRIVATE_KEY, id)? {
            self.session
                .destroy_object(h)
                .map_err(Error::pkcs11("C_DestroyObject"))?;
            destroyed = true;
        }
        Ok(destroyed)
    }

    /// Every key and certificate object in the token, with its `CKA_ID` and `CKA_LABEL`.
    pub fn list_objects(&self) -> Result<Vec<ObjectSummary>, Error> {
        let mut out = Vec::new();
        for class in [
            ObjectClass::PRIVATE_KEY,
            ObjectClass::PUBLIC_KEY,
            ObjectClass::CERTIFICATE,
        ] {
            let handles = self
                .session
                .find_objects(&[Attribute::Class(class)])
                .map_err(Error::pkcs11("C_FindObjects"))?;
            for h in handles {
                let attrs = self
                    .session
                    .get_attributes(h, &[AttributeType::Id, AttributeType::Label])
                    .map_err(Error::pkcs11(
                        "C_GetAttributeValue (CKA_ID, CKA_LABEL of a listed object)",
                    ))?;
                let (mut id, mut label) = (String::new(), String::new());
                for a in attrs {
                    match a {
                        Attribute::Id(v) => id = String::from_utf8_lossy(&v).into_owned(),
                        Attribute::Label(v) => label = String::from_utf8_lossy(&v).into_owned(),
                        _ => {}
                    }
                }
                let kind = if class == ObjectClass::PRIVATE_KEY {
                    ObjectKind::PrivateKey
                } else if class == ObjectClass::PUBLIC_KEY {
                    ObjectKind::PublicKey
                } else if class == ObjectClass::CERTIFICATE {
                    ObjectKind::Certificate
                } else {
                    ObjectKind::Other
                };
                out.push(ObjectSummary {
                    class: kind,
                    id,
                    label,
                });
            }
        }
        Ok(out)
    }

    /// Make sure a 256-bit HMAC key with this `CKA_ID` exists in the token (generated there:
    /// sensitive, never extractable, a token object that can MAC). Idempotent. A key
    /// provisioned out of band with this `CKA_ID` (any secret key type the token accepts for
    /// `CKM_SHA256_HMAC`, e.g. tpm2-pkcs11's `hmac:sha256`) is used as it is. A token without
    /// `CKM_GENERIC_SECRET_KEY_GEN` gets [`Error::MissingMechanism`], naming what to provision.
    pub fn ensure_hmac_key(&self, id: &str, label: &str) -> Result<(), Error> {
        self.ensure_secret_key(
            id,
            label,
            SecretKind {
                key_type: KeyType::GENERIC_SECRET,
                mechanism: Mechanism::GenericSecretKeyGen,
                mechanism_name: "CKM_GENERIC_SECRET_KEY_GEN",
                what: "the evidence log's 256-bit HMAC key",
                usage: [Attribute::Sign(true), Attribute::Verify(true)],
                refused: [
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Derive(false),
                ],
            },
        )
    }

    /// HMAC-SHA256 of `data` with the secret key `id`, computed inside the token.
    pub fn hmac_sha256(&self, id: &str, data: &[u8]) -> Result<[u8; 32], Error> {
        let key = self.secret_key(id)?;
        let mac = self
            .session
            .sign(&Mechanism::Sha256Hmac, key, data)
            .map_err(Error::pkcs11("C_Sign"))?;
        <[u8; 32]>::try_from(mac.as_slice()).map_err(|_| Error::Malformed("HMAC-SHA256 value"))
    }

    /// Make sure an AES-256 key-encryption key with this `CKA_ID` exists in the token
    /// (generated there: sensitive, never extractable, a private token object that can only
    /// encrypt and decrypt). Idempotent. A token without `CKM_AES_KEY_GEN` gets
    /// [`Error::MissingMechanism`].
    pub fn ensure_aes_key(&self, id: &str, label: &str) -> Result<(), Error> {
        self.ensure_secret_key(
            id,
            label,
            SecretKind {
                key_type: KeyType::AES,
                mechanism: Mechanism::AesKeyGen,
                mechanism_name: "CKM_AES_KEY_GEN",
                what: "the signer-evidence vault's key-encryption key",
                usage: [Attribute::Encrypt(true), Attribute::Decrypt(true)],
                refused: [
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Derive(false),
                ],
            },
        )
    }

    /// Generate a 256-bit secret key of `kind` with this `CKA_ID` unless one exists: the
    /// strict template first (usage refused beyond `kind.usage`), only what must be set if the
    /// token refuses it; then checked sensitive and not extractable.
    fn ensure_secret_key(&self, id: &str, label: &str, kind: SecretKind) -> Result<(), Error> {
        if self.find_one(ObjectClass::SECRET_KEY, id)?.is_some() {
            return Ok(());
        }
        let mut required = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(kind.key_type),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Id(id.as_bytes().to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        required.extend(kind.usage);
        let mut strict = required.clone();
        strict.extend(kind.refused);
        let generate = |t: &[Attribute]| self.session.generate_key(&kind.mechanism, t);
        let h = strict_or_required(id, &strict, &required, generate).map_err(|e| {
            generation_failed(e, "C_GenerateKey", kind.mechanism_name, kind.what, id)
        })?;
        self.check_secret_key(h).inspect_err(|_| {
            let _ = self.session.destroy_object(h);
        })
    }

    /// Whether a secret key with this `CKA_ID` exists.
    pub fn has_secret_key(&self, id: &str) -> Result<bool, Error> {
        Ok(self.find_one(ObjectClass::SECRET_KEY, id)?.is_some())
    }

    /// Destroy the secret key(s) with this `CKA_ID`; whether there was one.
    pub fn destroy_secret_key(&self, id: &str) -> Result<bool, Error> {
        self.handles
            .invalidate(&(self.instance, format!("secret:{id}")));
        let mut destroyed = false;
        for h in self.find_all(ObjectClass::SECRET_KEY, id)? {
            self.session
                .destroy_object(h)
                .map_err(Error::pkcs11("C_DestroyObject"))?;
            destroyed = true;
        }
        Ok(destroyed)
    }

    /// AES-GCM encryption inside the token with the secret key `id`: a random 96-bit IV, a
    /// 128-bit tag; returns IV ‖ ciphertext ‖ tag.
    pub fn aes_gcm_encrypt(&self, id: &str, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, Error> {
        let key = self.secret_key(id)?;
        let mut iv = [0u8; 12];
        aws_lc_rs::rand::fill(&mut iv).map_err(|_| Error::Malformed("random IV"))?;
        let mut iv_param = iv;
        let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv_param, aad, 128.into())
            .map_err(Error::pkcs11("CK_GCM_PARAMS"))?;
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), key, plain)
            .map_err(Error::pkcs11("C_Encrypt (CKM_AES_GCM)"))?;
        let mut out = iv.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The inverse of [`TokenSession::aes_gcm_encrypt`]; a wrong key, IV, tag or AAD is an error.
    pub fn aes_gcm_decrypt(
        &self,
        id: &str,
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
        if sealed.len() < 12 + 16 {
            return Err(Error::Malformed("AES-GCM ciphertext"));
        }
        let key = self.secret_key(id)?;
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&sealed[..12]);
        let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, aad, 128.into())
            .map_err(Error::pkcs11("CK_GCM_PARAMS"))?;
        let plain = self
            .session
            .decrypt(&Mechanism::AesGcm(params), key, &sealed[12..])
            .map_err(Error::pkcs11("C_Decrypt (CKM_AES_GCM)"))?;
        Ok(zeroize::Zeroizing::new(plain))
    }

    fn secret_key(&self, id: &str) -> Result<ObjectHandle, Error> {
        let cache_key = (self.instance, format!("secret:{id}"));
        if let Some(h) = self.handles.get(&cache_key) {
            return Ok(h);
        }
        let h = self
            .find_one(ObjectClass::SECRET_KEY, id)?
            .ok_or_else(|| Error::NotFound(format!("secret key {id}")))?;
        self.handles.insert(cache_key, h);
        Ok(h)
    }

    /// A generated secret key must be sensitive and not extractable.
    fn check_secret_key(&self, h: ObjectHandle) -> Result<(), Error> {
        let attrs = self
            .session
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Derive,
                ],
            )
            .map_err(Error::pkcs11("C_GetAttributeValue (secret key protection)"))?;
        for a in attrs {
            match a {
                Attribute::Sensitive(false) => {
                    return Err(Error::UnsafeKey("CKA_SENSITIVE is false"));
                }
                Attribute::Extractable(true) => {
                    return Err(Error::UnsafeKey("CKA_EXTRACTABLE is true"));
                }
                Attribute::Derive(true) => {
                    return Err(Error::UnsafeKey("CKA_DERIVE is true"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The values of the private data objects labelled `label` (normally one; two if the
    /// process died inside [`TokenSession::store_data_object`]).
    pub fn data_objects(&self, label: &str) -> Result<Vec<Vec<u8>>, Error> {
        let mut out = Vec::new();
        for h in self.find_data(label)? {
            let attrs = self
                .session
                .get_attributes(h, &[AttributeType::Value])
                .map_err(Error::pkcs11("C_GetAttributeValue (data object CKA_VALUE)"))?;
            let value = attrs.into_iter().find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            });
            out.push(value.ok_or(Error::Malformed("data object without CKA_VALUE"))?);
        }
        Ok(out)
    }

    /// Replace the private data object labelled `label` (readable and writable only after
    /// login). The new object is created before the old one is destroyed, so a crash leaves
    /// one or both, never none. (Tokens need not allow changing `CKA_VALUE` in place; SoftHSM
    /// does not.)
    pub fn store_data_object(&self, label: &str, value: &[u8]) -> Result<(), Error> {
        let old = self.find_data(label)?;
        let template = [
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(false),
            Attribute::Application(b"signet".to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Value(value.to_vec()),
        ];
        self.session
            .create_object(&template)
            .map_err(Error::pkcs11("C_CreateObject"))?;
        for h in old {
            self.session
                .destroy_object(h)
                .map_err(Error::pkcs11("C_DestroyObject"))?;
        }
        Ok(())
    }

    fn find_data(&self, label: &str) -> Result<Vec<ObjectHandle>, Error> {
        self.session
            .find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(b"signet".to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(Error::pkcs11("C_FindObjects"))
    }

    /// A cheap call that fails if the session or login is gone.
    pub fn ping(&self) -> Result<(), Error> {
        let info = self
            .session
            .get_session_info()
            .map_err(Error::pkcs11("C_GetSessionInfo"))?;
        use cryptoki::session::SessionState as S;
        match info.session_state() {
            S::RoUser | S::RwUser => Ok(()),
            _ => Err(Error::Pkcs11 {
                op: "C_GetSessionInfo",
                source: cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::UserNotLoggedIn,
                    cryptoki::context::Function::GetSessionInfo,
                ),
            }),
        }
    }

    fn read_public_key(&self, h: ObjectHandle) -> Result<VerifyingKey, Error> {
        let attrs = self
            .session
            .get_attributes(h, &[AttributeType::EcPoint])
            .map_err(Error::pkcs11("C_GetAttributeValue (CKA_EC_POINT)"))?;
        for a in attrs {
            if let Attribute::EcPoint(p) = a {
                return ec_point_to_key(&p);
            }
        }
        Err(Error::Malformed("public key without CKA_EC_POINT"))
    }

    fn find_all(&self, class: ObjectClass, id: &str) -> Result<Vec<ObjectHandle>, Error> {
        self.session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Id(id.as_bytes().to_vec()),
            ])
            .map_err(Error::pkcs11("C_FindObjects"))
    }

    fn find_one(&self, class: ObjectClass, id: &str) -> Result<Option<ObjectHandle>, Error> {
        Ok(self.find_all(class, id)?.into_iter().next())
    }
}

/// The check every token signature passes before it goes anywhere: `der` must verify over
/// `digest` with `expected`, the public key of the version asked for (a stale object handle
/// could otherwise have signed with another key of the token). On a mismatch every cached
/// handle is forgotten and the signature is discarded (`Error::WrongKey`).
pub(super) fn check(
    handles: &Cache<(u64, String), ObjectHandle>,
    id: &str,
    digest: &[u8; 32],
    der: Vec<u8>,
    expected: &VerifyingKey,
) -> Result<Vec<u8>, Error> {
    if crate::pki::verify::verifies_prehash(expected, digest, &der) {
        return Ok(der);
    }
    tracing::error!(key_id = %id, "the token signed with another key than asked for; signature discarded, handle cache emptied");
    handles.invalidate_all();
    Err(Error::WrongKey(id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;
    use cryptoki::error::{Error as Ck, RvError as Rv};

    #[test]
    fn a_token_without_the_mechanism_is_told_what_to_provision() {
        for rv in [
            Rv::MechanismInvalid,
            Rv::MechanismParamInvalid,
            Rv::FunctionNotSupported,
        ] {
            let e = generation_failed(
                Ck::Pkcs11(rv, Function::GenerateKey),
                "C_GenerateKey",
                "CKM_AES_KEY_GEN",
                "the signer-evidence vault's key-encryption key",
                "signet-vault-kek-1",
            );
            assert_eq!(e.kind(), "missing_mechanism", "{rv:?}");
            let text = e.to_string();
            assert!(
                text.contains("CKM_AES_KEY_GEN") && text.contains("CKA_ID \"signet-vault-kek-1\""),
                "{text}"
            );
        }
        let other = generation_failed(
            Ck::Pkcs11(Rv::DeviceError, Function::GenerateKeyPair),
            "C_GenerateKeyPair",
            "CKM_EC_KEY_PAIR_GEN (P-256)",
            "a P-256 key pair",
            "payroll/v1",
        );
        assert!(
            matches!(
                other,
                Error::Pkcs11 {
                    op: "C_GenerateKeyPair",
                    ..
                }
            ),
            "{other:?}"
        );
    }
}
