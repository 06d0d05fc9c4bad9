//! The token: sole user of `cryptoki`.
//!
//! Owns the PKCS#11 library, a keeper session that holds the login, a pool of worker threads
//! that each own one session, the object-handle cache, and the supervisor that recovers from
//! token failures (relogin, then library re-initialisation). Callers see async calls with a
//! deadline and typed errors; no PKCS#11 type leaves this module except through
//! [`TokenSession`], which only the closures passed to [`Hsm::call`] see.
//!
//! Must not touch HTTP, the evidence log or the key registry.

pub mod fair;
mod keys;
mod pool;
mod session;
mod signer;

use std::time::Duration;

pub use keys::{KeyToken, TokenKey, VaultKeys, kek_id};
pub use pool::{Hsm, Library, PIN_FD_ENV, provision_token, read_pin};
pub use session::{ObjectSummary, TokenSession};
pub use signer::{ECDSA_WITH_SHA256, TokenSigner};

pub use cryptoki::error::Error as Pkcs11Error;

/// `CKA_EC_PARAMS` for P-256: the DER OID 1.2.840.10045.3.1.7.
pub const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// `CKA_ID` of the evidence log's checkpoint key. Tenant IDs cannot start with `_`.
pub const LOG_KEY_ID: &str = "_signet/evidence-log/v1";
/// `CKA_ID` of the HMAC key that authenticates the evidence log's tail (each group commit).
pub const LOG_MAC_KEY_ID: &str = "_signet/evidence-log/mac/v1";
/// `CKA_LABEL` of the data object holding the evidence log's anchor (latest signed tree head).
pub const LOG_ANCHOR_LABEL: &str = "signet evidence log anchor";
/// `CKA_ID` of the health probe's key pair: the supervisor signs a random digest with it and
/// verifies the signature, so a token that answers but cannot sign is seen.
pub const PROBE_KEY_ID: &str = "_signet/health-probe/v1";
/// `CKA_ID` of the internal CA key (`issuer = "hsm-ca"`).
pub const CA_KEY_ID: &str = "_signet/ca/v1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load PKCS#11 module {path}: {source}")]
    Load { path: String, source: Pkcs11Error },
    #[error("C_Initialize failed: {0}")]
    Initialize(Pkcs11Error),
    #[error("no initialised token labelled `{label}` (tokens present: {present})")]
    TokenNotFound { label: String, present: String },
    #[error("token login failed: {0}")]
    Login(Pkcs11Error),
    #[error("cannot read the token PIN from {source_name}: {reason}")]
    Pin { source_name: String, reason: String },
    #[error("the token is not available; recovery in progress")]
    Unavailable,
    #[error("the token call queue is full")]
    Busy,
    /// The tenant's or the client's share of the token's queue is full.
    #[error(transparent)]
    Refused(#[from] fair::Refused),
    #[error("a token call exceeded its deadline of {0:?}")]
    Timeout(Duration),
    #[error("{op} failed: {source}")]
    Pkcs11 {
        op: &'static str,
        source: Pkcs11Error,
    },
    #[error("object {0} not found in the token")]
    NotFound(String),
    #[error("object {0} already exists in the token")]
    AlreadyExists(String),
    #[error("the token returned a malformed {0}")]
    Malformed(&'static str),
    #[error("Signet is shutting down")]
    ShuttingDown,
    /// The token signed, but not with the key asked for (a stale object handle): the
    /// signature is discarded, never returned.
    #[error("the token's signature does not verify with the public key of {0}")]
    WrongKey(String),
    /// A key the token generated does not hold what Signet requires of it; it was removed.
    #[error("the token generated a key that is not safe to use ({0}); it was destroyed")]
    UnsafeKey(&'static str),
    /// The token cannot make a key Signet needs: it has to be provisioned out of band.
    #[error(
        "the token does not offer {mechanism}, needed to generate {what}: provision it out of \
         band with CKA_ID \"{id}\" (see the README, \"Tokens other than SoftHSM\")"
    )]
    MissingMechanism {
        mechanism: &'static str,
        what: &'static str,
        id: String,
    },
}

/// How a failed PKCS#11 call should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The session (or a handle) is dead: open a new one, look handles up again, retry once.
    Session,
    /// The token or library is in trouble: recover (relogin, then re-initialise).
    Device,
    /// The request itself was refused; the token is fine.
    Request,
}

impl Error {
    /// Bounded label for `signet_hsm_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Load { .. } => "load",
            Error::Initialize(_) => "initialize",
            Error::TokenNotFound { .. } => "token_not_found",
            Error::Login(_) => "login",
            Error::Pin { .. } => "pin",
            Error::Unavailable => "unavailable",
            Error::Busy => "busy",
            Error::Refused(_) => "refused",
            Error::Timeout(_) => "timeout",
            Error::Pkcs11 { source, .. } => match classify(source) {
                FailureClass::Session => "session",
                FailureClass::Device => "device",
                FailureClass::Request => "request",
            },
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::Malformed(_) => "malformed",
            Error::ShuttingDown => "shutdown",
            Error::WrongKey(_) => "wrong_key",
            Error::UnsafeKey(_) => "unsafe_key",
            Error::MissingMechanism { .. } => "missing_mechanism",
        }
    }

    pub(crate) fn pkcs11(op: &'static str) -> impl FnOnce(Pkcs11Error) -> Error {
        move |source| Error::Pkcs11 { op, source }
    }
}

/// Sort a PKCS#11 failure into session, device or request trouble.
pub fn classify(e: &Pkcs11Error) -> FailureClass {
    use cryptoki::error::RvError as R;
    match e {
        Pkcs11Error::Pkcs11(rv, _) => match rv {
            R::SessionHandleInvalid
            | R::SessionClosed
            | R::OperationActive
            | R::OperationNotInitialized
            | R::UserNotLoggedIn
            | R::ObjectHandleInvalid
            | R::KeyHandleInvalid
            | R::SessionCount => FailureClass::Session,
            R::DeviceError
            | R::DeviceMemory
            | R::DeviceRemoved
            | R::TokenNotPresent
            | R::TokenNotRecognized
            | R::GeneralError
            | R::FunctionFailed
            | R::CryptokiNotInitialized
            | R::SlotIdInvalid
            | R::HostMemory
            | R::CantLock => FailureClass::Device,
            _ => FailureClass::Request,
        },
        Pkcs11Error::LibraryLoading(_)
        | Pkcs11Error::NullFunctionPointer
        | Pkcs11Error::MissingSymbol(_) => FailureClass::Device,
        _ => FailureClass::Request,
    }
}

/// Convert a raw `r || s` P-256 signature from `CKM_ECDSA` into DER `ECDSA-Sig-Value`.
pub fn raw_to_der(raw: &[u8]) -> Result<Vec<u8>, Error> {
    let sig =
        p256::ecdsa::Signature::from_slice(raw).map_err(|_| Error::Malformed("ECDSA signature"))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// Parse `CKA_EC_POINT` (a DER OCTET STRING around the SEC1 point, or a bare point).
pub fn ec_point_to_key(ec_point: &[u8]) -> Result<p256::ecdsa::VerifyingKey, Error> {
    // A bare uncompressed point also starts with 0x04, and its second byte (the first byte
    // of X) can equal the length of what follows it: the wrapped reading is taken only when
    // it yields a point, otherwise the bytes are read as a bare point.
    if let [0x04, len, rest @ ..] = ec_point
        && usize::from(*len) == rest.len()
        && let Ok(key) = p256::ecdsa::VerifyingKey::from_sec1_bytes(rest)
    {
        return Ok(key);
    }
    p256::ecdsa::VerifyingKey::from_sec1_bytes(ec_point)
        .map_err(|_| Error::Malformed("EC public point"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;
    use cryptoki::error::RvError;

    #[test]
    fn classification_table() {
        let cases = [
            (RvError::SessionHandleInvalid, FailureClass::Session),
            (RvError::OperationActive, FailureClass::Session),
            (RvError::UserNotLoggedIn, FailureClass::Session),
            (RvError::ObjectHandleInvalid, FailureClass::Session),
            (RvError::DeviceError, FailureClass::Device),
            (RvError::TokenNotPresent, FailureClass::Device),
            (RvError::CryptokiNotInitialized, FailureClass::Device),
            (RvError::GeneralError, FailureClass::Device),
            (RvError::DataLenRange, FailureClass::Request),
            (RvError::KeyFunctionNotPermitted, FailureClass::Request),
        ];
        for (rv, want) in cases {
            assert_eq!(
                classify(&Pkcs11Error::Pkcs11(rv, Function::Sign)),
                want,
                "{rv:?}"
            );
        }
    }

    #[test]
    fn ec_point_accepts_wrapped_and_bare_points() {
        use p256::elliptic_curve::Generate;
        let sk = p256::ecdsa::SigningKey::generate();
        let point = sk.verifying_key().to_sec1_point(false);
        let bare = point.as_bytes().to_vec();
        let mut wrapped = vec![0x04, bare.len() as u8];
        wrapped.extend_from_slice(&bare);
        assert_eq!(ec_point_to_key(&bare).unwrap(), *sk.verifying_key());
        assert_eq!(ec_point_to_key(&wrapped).unwrap(), *sk.verifying_key());
        assert!(ec_point_to_key(&[0x04, 0x02, 1, 2]).is_err());
        // A bare point whose X starts with 0x3f looks like a wrapped one of 63 bytes (one
        // key in 256); it must still be read as the bare point it is.
        let sk = std::iter::repeat_with(p256::ecdsa::SigningKey::generate)
            .find(|k| k.verifying_key().to_sec1_point(false).as_bytes()[1] == 63)
            .expect("one key in 256 has such an X; the search is unbounded");
        let bare = sk.verifying_key().to_sec1_point(false).as_bytes().to_vec();
        assert_eq!(ec_point_to_key(&bare).unwrap(), *sk.verifying_key());
    }

    #[test]
    fn raw_signature_converts_to_der() {
        assert!(
            raw_to_der(&[0u8; 64]).is_err(),
            "zero r/s is not a valid signature"
        );
        assert!(raw_to_der(&[1u8; 63]).is_err());
        let der = raw_to_der(&[1u8; 64]).unwrap();
        assert_eq!(der[0], 0x30);
    }
}
