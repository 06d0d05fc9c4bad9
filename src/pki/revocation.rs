//! Revocation data of the internal CA: the CRL (RFC 5280 §5) and OCSP answers (RFC 6960).
//!
//! Pure formats: what is revoked comes in as [`Revoked`] rows, the signature comes from the
//! caller's signer (the CA key in the token). The CRL is built with x509-cert's `CrlBuilder`;
//! OCSP with RustCrypto's `x509-ocsp` types (on der 0.7, hence the `der07` names).
//!
//! Signet answers OCSP only for certificates of its own CA: a request whose issuer hashes are
//! not the CA's, or a serial the CA never issued, gets the unsigned `unauthorized` answer, so
//! an anonymous client cannot make the token sign for arbitrary input. Answers carry no nonce
//! (RFC 8954 allows it): they are signed once per certificate and served from a cache.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use der::{Decode, Encode};
use der07::{Decode as _, Encode as _};
use p256::ecdsa::DerSignature;
use spki::{DynSignatureAlgorithmIdentifier, EncodePublicKey};
use x509_cert::Certificate;
use x509_cert::builder::{Builder, CrlBuilder};
use x509_cert::crl::RevokedCert;
use x509_cert::ext::pkix::CrlReason;
use x509_cert::ext::pkix::crl::CrlNumber;
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Time;

use super::Error;

/// `id-ce-invalidityDate` (RFC 5280 §5.3.2).
const ID_CE_INVALIDITY_DATE: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("2.5.29.24");
const ID_SHA1: der07::oid::ObjectIdentifier =
    der07::oid::ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const ID_SHA256: der07::oid::ObjectIdentifier =
    der07::oid::ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_ECDSA_WITH_SHA256: der07::oid::ObjectIdentifier =
    der07::oid::ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");

/// The RFC 5280 reason codes Signet uses (`keys revoke --reason`, stored with the key state
/// in kebab case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    KeyCompromise,
    Superseded,
    CessationOfOperation,
    AffiliationChanged,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::KeyCompromise,
        Reason::Superseded,
        Reason::CessationOfOperation,
        Reason::AffiliationChanged,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::KeyCompromise => "key-compromise",
            Reason::Superseded => "superseded",
            Reason::CessationOfOperation => "cessation-of-operation",
            Reason::AffiliationChanged => "affiliation-changed",
        }
    }

    fn crl(self) -> CrlReason {
        match self {
            Reason::KeyCompromise => CrlReason::KeyCompromise,
            Reason::AffiliationChanged => CrlReason::AffiliationChanged,
            Reason::Superseded => CrlReason::Superseded,
            Reason::CessationOfOperation => CrlReason::CessationOfOperation,
        }
    }

    fn ocsp(self) -> x509_cert02::ext::pkix::CrlReason {
        use x509_cert02::ext::pkix::CrlReason as R;
        match self {
            Reason::KeyCompromise => R::KeyCompromise,
            Reason::AffiliationChanged => R::AffiliationChanged,
            Reason::Superseded => R::Superseded,
            Reason::CessationOfOperation => R::CessationOfOperation,
        }
    }
}

impl std::str::FromStr for Reason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown revocation reason {s:?}; one of {}",
                    Self::ALL.map(|r| r.as_str()).join(", ")
                )
            })
    }
}

/// One revoked certificate of the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The certificate's serial (hex, as [`super::CertInfo::serial_hex`]).
    pub serial_hex: String,
    pub revoked_at: u64,
    pub reason: Reason,
    /// The invalidity date (when the key is known or suspected to have been compromised).
    pub invalid_since: Option<u64>,
}

fn time(unix: u64) -> Result<Time, Error> {
    Time::try_from(UNIX_EPOCH + Duration::from_secs(unix)).map_err(|e| Error::Build(e.to_string()))
}

fn build(e: impl std::fmt::Display) -> Error {
    Error::Build(e.to_string())
}

/// A CRL of `ca_der` numbered `number`, valid from `this_update` to `next_update`, listing
/// `revoked` (reason code and invalidity date as entry extensions), signed by `signer`.
pub fn crl<S>(
    ca_der: &[u8],
    number: u64,
    this_update: u64,
    next_update: u64,
    revoked: &[Revoked],
    signer: &S,
) -> Result<Vec<u8>, Error>
where
    S: signature::Signer<DerSignature> + signature::Keypair + DynSignatureAlgorithmIdentifier,
    S::VerifyingKey: EncodePublicKey,
{
    let ca = Certificate::from_der(ca_der).map_err(|e| Error::Parse(e.to_string()))?;
    let issuer = ca.tbs_certificate().subject().clone();
    let mut entries: Vec<RevokedCert> = Vec::with_capacity(revoked.len());
    for r in revoked {
        let serial = hex::decode(&r.serial_hex).map_err(build)?;
        let mut ext: Vec<Extension> =
            vec![r.reason.crl().to_extension(&issuer, &[]).map_err(build)?];
        if let Some(t) = r.invalid_since {
            let at = der::asn1::GeneralizedTime::from_unix_duration(Duration::from_secs(t))
                .map_err(build)?;
            ext.push(Extension {
                extn_id: ID_CE_INVALIDITY_DATE,
                critical: false,
                extn_value: der::asn1::OctetString::new(at.to_der().map_err(build)?)
                    .map_err(build)?,
            });
        }
        entries.push(RevokedCert {
            serial_number: SerialNumber::new(&serial).map_err(build)?,
            revocation_date: time(r.revoked_at)?,
            crl_entry_extensions: Some(ext),
        });
    }
    let number = CrlNumber::try_from(number).map_err(build)?;
    let builder = CrlBuilder::new_with_this_update(&ca, number, time(this_update)?)
        .map_err(build)?
        .with_next_update(Some(time(next_update)?));
    let builder = if entries.is_empty() {
        builder
    } else {
        builder.with_certificates(entries.into_iter())
    };
    let list = builder.build::<_, DerSignature>(signer).map_err(build)?;
    list.to_der().map_err(build)
}

/// What identifies the CA in OCSP requests: the SHA-1 and SHA-256 hashes of its subject name
/// and of its public key (RFC 6960 §4.1.1 `CertID`).
#[derive(Debug, Clone)]
pub struct OcspIssuer {
    sha1: (Vec<u8>, Vec<u8>),
    sha256: (Vec<u8>, Vec<u8>),
}

impl OcspIssuer {
    pub fn new(ca_der: &[u8]) -> Result<Self, Error> {
        let ca = Certificate::from_der(ca_der).map_err(|e| Error::Parse(e.to_string()))?;
        let name = ca.tbs_certificate().subject().to_der().map_err(build)?;
        let key = ca
            .tbs_certificate()
            .subject_public_key_info()
            .subject_public_key
            .raw_bytes()
            .to_vec();
        let sha1 = |b: &[u8]| {
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, b)
                .as_ref()
                .to_vec()
        };
        let sha256 = |b: &[u8]| crate::sha256::sha256(b).to_vec();
        Ok(Self {
            sha1: (sha1(&name), sha1(&key)),
            sha256: (sha256(&name), sha256(&key)),
        })
    }
}

/// One OCSP question: which certificate, as the client identified it (`cert_id` is echoed in
/// the answer).
#[derive(Debug, Clone)]
pub struct OcspQuestion {
    pub serial_hex: String,
    cert_id: x509_ocsp::CertId,
    /// The client's `CertID`, DER: the key under which the signed answer is cached.
    pub cert_id_der: Vec<u8>,
}

/// Why an OCSP request gets an unsigned error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcspRefusal {
    /// Not DER, or not exactly one certificate asked about.
    Malformed,
    /// Not a certificate of this CA (other issuer, unknown hash algorithm).
    Unauthorized,
}

/// Parse a DER `OCSPRequest` asking about one certificate of `issuer`.
pub fn ocsp_question(der: &[u8], issuer: &OcspIssuer) -> Result<OcspQuestion, OcspRefusal> {
    let req = x509_ocsp::OcspRequest::from_der(der).map_err(|_| OcspRefusal::Malformed)?;
    let [one] = req.tbs_request.request_list.as_slice() else {
        return Err(OcspRefusal::Malformed);
    };
    let id = &one.req_cert;
    let (name, key) = match id.hash_algorithm.oid {
        ID_SHA1 => &issuer.sha1,
        ID_SHA256 => &issuer.sha256,
        _ => return Err(OcspRefusal::Unauthorized),
    };
    let same = |a: &[u8], b: &[u8]| bool::from(subtle::ConstantTimeEq::ct_eq(a, b));
    if !same(id.issuer_name_hash.as_bytes(), name) || !same(id.issuer_key_hash.as_bytes(), key) {
        return Err(OcspRefusal::Unauthorized);
    }
    let serial = id.serial_number.as_bytes();
    let first = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    Ok(OcspQuestion {
        serial_hex: hex::encode(&serial[first..]),
        cert_id_der: id.to_der().map_err(|_| OcspRefusal::Malformed)?,
        cert_id: id.clone(),
    })
}

/// The status Signet answers for one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Good,
    Revoked { at: u64, reason: Reason },
}

/// The unsigned error answer for `refusal`.
pub fn ocsp_refusal(refusal: OcspRefusal) -> Vec<u8> {
    let r = match refusal {
        OcspRefusal::Malformed => x509_ocsp::OcspResponse::malformed_request(),
        OcspRefusal::Unauthorized => x509_ocsp::OcspResponse::unauthorized(),
    };
    r.to_der().unwrap_or_default()
}

/// The unsigned `tryLater` answer (the CA key cannot sign now).
pub fn ocsp_try_later() -> Vec<u8> {
    x509_ocsp::OcspResponse::try_later()
        .to_der()
        .unwrap_or_default()
}

/// The part of an OCSP answer that is signed (`ResponseData`), and its DER.
pub struct OcspTbs {
    data: x509_ocsp::ResponseData,
    pub der: Vec<u8>,
}

/// The `ResponseData` for `question`, produced at `now`, valid until `next_update`; the
/// responder is the CA itself (by key hash).
pub fn ocsp_tbs(
    question: &OcspQuestion,
    issuer: &OcspIssuer,
    status: Status,
    now: u64,
    next_update: u64,
) -> Result<OcspTbs, Error> {
    let gt = |t: u64| {
        x509_ocsp::OcspGeneralizedTime::try_from(UNIX_EPOCH + Duration::from_secs(t)).map_err(build)
    };
    let cert_status = match status {
        Status::Good => x509_ocsp::CertStatus::good(),
        Status::Revoked { at, reason } => x509_ocsp::CertStatus::revoked(x509_ocsp::RevokedInfo {
            revocation_time: gt(at)?,
            revocation_reason: Some(reason.ocsp()),
        }),
    };
    let data = x509_ocsp::ResponseData {
        version: x509_ocsp::Version::V1,
        responder_id: x509_ocsp::ResponderId::ByKey(
            der07::asn1::OctetString::new(issuer.sha1.1.clone()).map_err(build)?,
        ),
        produced_at: gt(now)?,
        responses: vec![x509_ocsp::SingleResponse {
            cert_id: question.cert_id.clone(),
            cert_status,
            this_update: gt(now)?,
            next_update: Some(gt(next_update)?),
            single_extensions: None,
        }],
        response_extensions: None,
    };
    let der = data.to_der().map_err(build)?;
    Ok(OcspTbs { data, der })
}

/// The successful `OCSPResponse` of `tbs` with its DER ECDSA-with-SHA-256 `signature`.
pub fn ocsp_signed(tbs: OcspTbs, signature: &[u8]) -> Result<Vec<u8>, Error> {
    let basic = x509_ocsp::BasicOcspResponse {
        tbs_response_data: tbs.data,
        signature_algorithm: spki07::AlgorithmIdentifierOwned {
            oid: ID_ECDSA_WITH_SHA256,
            parameters: None,
        },
        signature: der07::asn1::BitString::from_bytes(signature).map_err(build)?,
        certs: None,
    };
    x509_ocsp::OcspResponse::successful(basic)
        .and_then(|r| r.to_der())
        .map_err(build)
}

/// A CRL as a verifier reads it, after checking it is the CA's and signed by its key.
#[derive(Debug, Clone)]
pub struct CrlView {
    pub this_update: u64,
    pub next_update: Option<u64>,
    /// Revoked certificates by serial (hex, as [`super::CertInfo::serial_hex`]).
    pub entries: HashMap<String, CrlEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlEntry {
    pub revoked_at: u64,
    /// The reason code's RFC 5280 name (`keyCompromise`, ...), if the entry carries one.
    pub reason: Option<String>,
    pub invalid_since: Option<u64>,
}

/// Read a CRL (PEM or DER) issued by `ca`: its issuer is the CA's subject and its signature
/// verifies with the CA's key; anything else is an error.
pub fn read_crl(input: &[u8], ca: &super::CertInfo) -> Result<CrlView, Error> {
    use der::DecodePem;
    use signature::Verifier;
    use x509_cert::crl::CertificateList;
    let parse = |e: der::Error| Error::Parse(format!("not a CRL: {e}"));
    let crl = if input.starts_with(b"-----BEGIN") {
        CertificateList::<x509_cert::certificate::Rfc5280>::from_pem(input).map_err(parse)?
    } else {
        CertificateList::<x509_cert::certificate::Rfc5280>::from_der(input).map_err(parse)?
    };
    let tbs = &crl.tbs_cert_list;
    if tbs.issuer.to_string() != ca.subject {
        return Err(Error::Parse(format!(
            "the CRL is issued by `{}`, not by the CA given (`{}`)",
            tbs.issuer, ca.subject
        )));
    }
    let key = ca
        .public_key
        .ok_or_else(|| Error::Parse("the CA key is not P-256".into()))?;
    let signed = tbs.to_der().map_err(parse)?;
    let sig = crl
        .signature
        .as_bytes()
        .and_then(|b| DerSignature::from_bytes(b).ok())
        .ok_or_else(|| Error::Parse("the CRL's signature is not DER ECDSA".into()))?;
    key.verify(&signed, &sig).map_err(|_| {
        Error::Parse("the CRL's signature does not verify with the CA's key".into())
    })?;
    let unix = |t: &Time| t.to_unix_duration().as_secs();
    let mut entries = HashMap::new();
    for r in tbs.revoked_certificates.iter().flatten() {
        let mut entry = CrlEntry {
            revoked_at: unix(&r.revocation_date),
            reason: None,
            invalid_since: None,
        };
        for ext in r.crl_entry_extensions.iter().flatten() {
            if ext.extn_id == <CrlReason as der::oid::AssociatedOid>::OID {
                entry.reason = CrlReason::from_der(ext.extn_value.as_bytes())
                    .ok()
                    .map(|r| reason_name(r).to_owned());
            } else if ext.extn_id == ID_CE_INVALIDITY_DATE {
                entry.invalid_since =
                    der::asn1::GeneralizedTime::from_der(ext.extn_value.as_bytes())
                        .ok()
                        .map(|t| t.to_unix_duration().as_secs());
            }
        }
        entries.insert(hex::encode(r.serial_number.as_bytes()), entry);
    }
    Ok(CrlView {
        this_update: unix(&tbs.this_update),
        next_update: tbs.next_update.as_ref().map(unix),
        entries,
    })
}

fn reason_name(r: CrlReason) -> &'static str {
    match r {
        CrlReason::Unspecified => "unspecified",
        CrlReason::KeyCompromise => "keyCompromise",
        CrlReason::CaCompromise => "cACompromise",
        CrlReason::AffiliationChanged => "affiliationChanged",
        CrlReason::Superseded => "superseded",
        CrlReason::CessationOfOperation => "cessationOfOperation",
        CrlReason::CertificateHold => "certificateHold",
        CrlReason::RemoveFromCRL => "removeFromCRL",
        CrlReason::PrivilegeWithdrawn => "privilegeWithdrawn",
        CrlReason::AaCompromise => "aACompromise",
    }
}
