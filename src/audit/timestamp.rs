//! RFC 3161 timestamps of checkpoints: the request Signet sends a TSA, the verification of the
//! answer, and the stored form ([`StoredTimestamp`]: the checkpoint's size, the SHA-256 of its
//! note, and the TSA's whole `TimeStampResp`, which
//! `openssl ts -verify -data NOTE -in RESP -CAfile TSA-CA` checks; one line of
//! `timestamps.jsonl` in the file format).
//!
//! An answer is parsed with typed ASN.1 (RFC 3161 and CMS structures through `der`), never
//! searched for bytes, and [`verify`] checks all of it before anything is stored: granted
//! status; one CMS signer; the signed attributes bind the `TSTInfo` (content type, message
//! digest) and the signer's certificate (ESS signing-certificate); the signature verifies with
//! that certificate; the certificate allows time stamping only (critical EKU) and chains to
//! the configured TSA CA, each certificate valid at the stamped time; the `TSTInfo` covers
//! SHA-256 of the note, echoes the nonce, and names the policy asked for.
//!
//! One timestamp per checkpoint covers every entry under it. Pure.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerIdentifier, SignerInfo};
use der::asn1::{Any, BitString, Int, ObjectIdentifier, OctetString};
use der::{Decode, Encode, Sequence, Tag, Tagged};
use serde::{Deserialize, Serialize};
use spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;
use x509_cert::ext::Extensions;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectKeyIdentifier};
use x509_cert::serial_number::SerialNumber;

pub const TIMESTAMPS_FILE: &str = "timestamps.jsonl";
/// A TSA answer larger than this is refused unread: real ones are a few KiB.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_CT_TST_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.1.4");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const ID_SIGNING_CERTIFICATE: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.2.12");
const ID_SIGNING_CERTIFICATE_V2: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.2.47");
const ID_KP_TIME_STAMPING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.8");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const ID_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");

/// One timestamped checkpoint, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTimestamp {
    pub tree_size: u64,
    /// SHA-256 (hex) of the checkpoint note: what the TSA signed.
    pub note_sha256: String,
    /// Base64 DER `TimeStampResp` as the TSA sent it.
    pub response: String,
}

/// Why a TSA answer is not accepted. [`TimestampError::reason`] is the bounded metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error("the answer is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("the answer is not a DER TimeStampResp holding a timestamp token ({0})")]
    Malformed(String),
    #[error("the TSA refused the request (PKIStatus {status}{})", text.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
    Refused { status: u8, text: Option<String> },
    #[error(
        "the token covers another message (its message imprint is not SHA-256 of the checkpoint)"
    )]
    WrongImprint,
    #[error("the token does not echo the nonce of the request (a replayed or foreign answer)")]
    WrongNonce,
    #[error("the token names policy {found}, not the configured {expected}")]
    WrongPolicy { found: String, expected: String },
    #[error("the token's signed attributes do not match its content ({0}): altered")]
    Altered(&'static str),
    #[error("the token carries no certificate of its signer")]
    NoSignerCertificate,
    #[error("the token's ESS signing-certificate attribute {0}")]
    SigningCertificate(&'static str),
    #[error("the TSA's signature over the token does not verify")]
    BadSignature,
    #[error("{0}")]
    Unsupported(String),
    #[error("the TSA certificate is not trusted: {0}")]
    Untrusted(String),
    #[error("the TSA certificate may not be used for time stamping: {0}")]
    NotForTimestamping(&'static str),
    #[error("the token's time {time} is implausible: {why}")]
    Implausible { time: String, why: &'static str },
}

impl TimestampError {
    /// Bounded label for `signet_tsa_rejections_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed(_) => "malformed",
            Self::Refused { .. } => "refused",
            Self::WrongImprint => "wrong_imprint",
            Self::WrongNonce => "wrong_nonce",
            Self::WrongPolicy { .. } => "wrong_policy",
            Self::Altered(_) => "altered",
            Self::NoSignerCertificate | Self::SigningCertificate(_) => "signer_certificate",
            Self::BadSignature => "bad_signature",
            Self::Unsupported(_) => "unsupported",
            Self::Untrusted(_) => "untrusted",
            Self::NotForTimestamping(_) => "not_for_timestamping",
            Self::Implausible { .. } => "time",
        }
    }
}

fn malformed(e: impl std::fmt::Display) -> TimestampError {
    TimestampError::Malformed(e.to_string())
}

// RFC 3161 structures (§2.4.1, §2.4.2), decoded and encoded by `der`.

#[derive(Clone, Debug, Sequence)]
struct MessageImprint {
    hash_algorithm: AlgorithmIdentifierOwned,
    hashed_message: OctetString,
}

#[derive(Clone, Debug, Sequence)]
struct TimeStampReq {
    version: u8,
    message_imprint: MessageImprint,
    req_policy: Option<ObjectIdentifier>,
    nonce: Option<Int>,
    #[asn1(default = "Default::default")]
    cert_req: bool,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    extensions: Option<Extensions>,
}

#[derive(Clone, Debug, Sequence)]
struct PkiStatusInfo {
    status: u8,
    status_string: Option<Vec<String>>,
    fail_info: Option<BitString>,
}

#[derive(Clone, Debug, Sequence)]
struct TimeStampResp {
    status: PkiStatusInfo,
    time_stamp_token: Option<ContentInfo>,
}

#[derive(Clone, Debug, Sequence)]
struct Accuracy {
    seconds: Option<Int>,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    millis: Option<Int>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    micros: Option<Int>,
}

#[derive(Clone, Debug, Sequence)]
struct TstInfo {
    version: u8,
    policy: ObjectIdentifier,
    message_imprint: MessageImprint,
    serial_number: Int,
    /// A GeneralizedTime, possibly with fractional seconds (which `der`'s own type refuses).
    gen_time: Any,
    accuracy: Option<Accuracy>,
    #[asn1(default = "Default::default")]
    ordering: bool,
    nonce: Option<Int>,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    tsa: Option<GeneralName>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    extensions: Option<Extensions>,
}

// RFC 2634 / RFC 5035 ESS signing-certificate attributes.

#[derive(Clone, Debug, Sequence)]
struct IssuerSerial {
    issuer: Vec<GeneralName>,
    serial_number: SerialNumber,
}

#[derive(Clone, Debug, Sequence)]
struct EssCertId {
    cert_hash: OctetString,
    issuer_serial: Option<IssuerSerial>,
}

#[derive(Clone, Debug, Sequence)]
struct EssCertIdV2 {
    hash_algorithm: Option<AlgorithmIdentifierOwned>,
    cert_hash: OctetString,
    issuer_serial: Option<IssuerSerial>,
}

#[derive(Clone, Debug, Sequence)]
struct SigningCertificate {
    certs: Vec<EssCertId>,
    policies: Option<Vec<x509_cert::ext::pkix::certpolicy::PolicyInformation>>,
}

#[derive(Clone, Debug, Sequence)]
struct SigningCertificateV2 {
    certs: Vec<EssCertIdV2>,
    policies: Option<Vec<x509_cert::ext::pkix::certpolicy::PolicyInformation>>,
}

/// A DER `TimeStampReq` (RFC 3161 §2.4.1) for SHA-256(`note`), asking for the TSA's
/// certificate, with `nonce` and an optional policy.
pub fn request(note: &[u8], nonce: u64, policy: Option<ObjectIdentifier>) -> Vec<u8> {
    let req = TimeStampReq {
        version: 1,
        message_imprint: MessageImprint {
            hash_algorithm: AlgorithmIdentifierOwned {
                oid: ID_SHA256,
                parameters: Some(Any::null()),
            },
            // A 32-byte OCTET STRING cannot fail to build.
            hashed_message: OctetString::new(crate::sha256::sha256(note).to_vec())
                .unwrap_or_else(|_| unreachable!("32 bytes fit an OCTET STRING")),
        },
        req_policy: policy,
        nonce: Some(nonce_int(nonce)),
        cert_req: true,
        extensions: None,
    };
    // Every field is a fixed, small value: encoding cannot fail.
    req.to_der()
        .unwrap_or_else(|_| unreachable!("a TimeStampReq of fixed fields encodes"))
}

/// A positive INTEGER for `n`.
fn nonce_int(n: u64) -> Int {
    // The big-endian bytes of a u64, with a leading zero when the top bit is set: always a
    // valid, positive INTEGER.
    let mut b: Vec<u8> = n.to_be_bytes().to_vec();
    while b.len() > 1 && b[0] == 0 && b[1] & 0x80 == 0 {
        b.remove(0);
    }
    if b[0] & 0x80 != 0 {
        b.insert(0, 0);
    }
    Int::new(&b).unwrap_or_else(|_| unreachable!("minimal positive INTEGER bytes"))
}

/// The TSA CA certificates (`[audit.timestamping] ca_file`, `--tsa-ca`): a token is trusted
/// when its signer's certificate is one of them or chains to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsaAnchors(Vec<Certificate>);

impl TsaAnchors {
    /// Every certificate of a PEM file.
    pub fn from_pem(pem: &[u8]) -> Result<Self, crate::pki::Error> {
        let certs = Certificate::load_pem_chain(pem)
            .map_err(|e| crate::pki::Error::Parse(e.to_string()))?;
        if certs.is_empty() {
            return Err(crate::pki::Error::Parse(
                "no certificate in the file".into(),
            ));
        }
        Ok(Self(certs))
    }

    pub fn load(path: &Path) -> Result<Self, crate::pki::Error> {
        let at = |e: &dyn std::fmt::Display| {
            crate::pki::Error::Parse(format!("{}: {e}", path.display()))
        };
        let pem = std::fs::read(path).map_err(|e| at(&e))?;
        Self::from_pem(&pem).map_err(|e| at(&e))
    }

    /// The subjects, for messages.
    pub fn subjects(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|c| c.tbs_certificate().subject().to_string())
            .collect()
    }
}

/// What a token must say, beyond being a valid token.
#[derive(Debug, Clone, Default)]
pub struct Expected<'a> {
    /// The checkpoint note: the token must cover SHA-256 of it.
    pub note: &'a [u8],
    /// The nonce of the request (the service knows it; an offline verifier does not).
    pub nonce: Option<u64>,
    /// The policy asked for.
    pub policy: Option<ObjectIdentifier>,
    /// Unix seconds: the token may not claim a time before this (minus `TIME_SLACK_SECONDS`),
    /// e.g. when the checkpoint was signed.
    pub not_before: Option<u64>,
    /// Unix seconds: nor after this (plus the slack), e.g. now.
    pub not_after: Option<u64>,
}

/// Clock difference tolerated between Signet and the TSA.
pub const TIME_SLACK_SECONDS: u64 = 300;

/// What a verified timestamp says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimestampInfo {
    /// The TSA's time (RFC 3339).
    pub time: String,
    /// The same, Unix seconds.
    pub time_unix: u64,
    /// The TSA certificate's subject.
    pub tsa: String,
    /// The TSA policy of the token.
    pub policy: String,
    /// Whether the TSA's certificate was checked against TSA CA certificates given by the
    /// verifier. Without, nothing says who the TSA is: the time is a claim, not evidence.
    pub chain_checked: bool,
}

/// Verify a `TimeStampResp` completely (see the module documentation). With `anchors` the
/// signer's certificate must chain to them; without, everything else is checked and the
/// answer says `chain_checked: false`.
pub fn verify(
    resp: &[u8],
    expected: &Expected<'_>,
    anchors: Option<&TsaAnchors>,
) -> Result<TimestampInfo, TimestampError> {
    if resp.len() > MAX_RESPONSE_BYTES {
        return Err(TimestampError::TooLarge);
    }
    let resp = TimeStampResp::from_der(resp).map_err(malformed)?;
    if resp.status.status > 1 {
        return Err(TimestampError::Refused {
            status: resp.status.status,
            text: resp.status.status_string.map(|t| t.join("; ")),
        });
    }
    let token = resp
        .time_stamp_token
        .ok_or_else(|| malformed("granted without a token"))?;
    if token.content_type != ID_SIGNED_DATA {
        return Err(malformed("the token is not CMS SignedData"));
    }
    let sd: SignedData = token.content.decode_as().map_err(malformed)?;
    if sd.encap_content_info.econtent_type != ID_CT_TST_INFO {
        return Err(malformed("the token's content is not a TSTInfo"));
    }
    let content = sd
        .encap_content_info
        .econtent
        .as_ref()
        .ok_or_else(|| malformed("the token has no content"))?;
    let content = OctetString::from_der(&content.to_der().map_err(malformed)?)
        .map_err(malformed)?
        .into_bytes();
    let tst = TstInfo::from_der(&content).map_err(malformed)?;
    let (time, time_unix) = generalized_time(&tst.gen_time)?;
    check_tst_info(&tst, expected, &time, time_unix)?;

    let mut signers = sd.signer_infos.0.iter();
    let (Some(signer), None) = (signers.next(), signers.next()) else {
        return Err(malformed("a timestamp token has exactly one signer"));
    };
    let certs: Vec<Certificate> = sd
        .certificates
        .as_ref()
        .map(|set| {
            set.0
                .iter()
                .filter_map(|c| match c {
                    cms::cert::CertificateChoices::Certificate(c) => Some(c.clone()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let tsa = certs
        .iter()
        .find(|c| names_signer(c, &signer.sid))
        .ok_or(TimestampError::NoSignerCertificate)?;
    check_signed_attributes(signer, &content, tsa)?;
    let signed = signer
        .signed_attrs
        .as_ref()
        .ok_or(TimestampError::Altered("no signed attributes"))?
        .to_der()
        .map_err(malformed)?;
    crate::pki::verify::verify_signed(
        tsa.tbs_certificate().subject_public_key_info(),
        &signer.signature_algorithm,
        Some(&signer.digest_alg),
        &signed,
        signer.signature.as_bytes(),
    )
    .map_err(|e| match e {
        crate::pki::verify::SignatureError::Bad => TimestampError::BadSignature,
        crate::pki::verify::SignatureError::Unsupported(a) => {
            TimestampError::Unsupported(format!("the TSA signs with an {a}"))
        }
    })?;
    check_timestamping_certificate(tsa)?;
    let chain_checked = match anchors {
        None => false,
        Some(anchors) => {
            chain_to_anchor(tsa, &certs, anchors, time_unix)?;
            true
        }
    };
    Ok(TimestampInfo {
        time,
        time_unix,
        tsa: tsa.tbs_certificate().subject().to_string(),
        policy: tst.policy.to_string(),
        chain_checked,
    })
}

/// The `TSTInfo` says what was asked: SHA-256 of the note, the nonce, the policy, a plausible
/// time.
fn check_tst_info(
    tst: &TstInfo,
    expected: &Expected<'_>,
    time: &str,
    time_unix: u64,
) -> Result<(), TimestampError> {
    if tst.version != 1 {
        return Err(malformed(format!("TSTInfo version {}", tst.version)));
    }
    if tst.message_imprint.hash_algorithm.oid != ID_SHA256
        || tst.message_imprint.hashed_message.as_bytes()
            != crate::sha256::sha256(expected.note).as_slice()
    {
        return Err(TimestampError::WrongImprint);
    }
    if let Some(n) = expected.nonce
        && tst.nonce.as_ref().map(Int::as_bytes) != Some(nonce_int(n).as_bytes())
    {
        return Err(TimestampError::WrongNonce);
    }
    if let Some(p) = &expected.policy
        && *p != tst.policy
    {
        return Err(TimestampError::WrongPolicy {
            found: tst.policy.to_string(),
            expected: p.to_string(),
        });
    }
    if expected
        .not_before
        .is_some_and(|t| time_unix + TIME_SLACK_SECONDS < t)
    {
        return Err(TimestampError::Implausible {
            time: time.to_owned(),
            why: "before the checkpoint was signed",
        });
    }
    if expected
        .not_after
        .is_some_and(|t| time_unix > t + TIME_SLACK_SECONDS)
    {
        return Err(TimestampError::Implausible {
            time: time.to_owned(),
            why: "in the future",
        });
    }
    Ok(())
}

/// The signed attributes bind the content (content type, message digest) and name the signer's
/// certificate (ESS signing-certificate v2, or v1 with SHA-1).
fn check_signed_attributes(
    signer: &SignerInfo,
    content: &[u8],
    tsa: &Certificate,
) -> Result<(), TimestampError> {
    let attrs = signer
        .signed_attrs
        .as_ref()
        .ok_or(TimestampError::Altered("no signed attributes"))?;
    let one = |oid: ObjectIdentifier| -> Result<Option<&Any>, TimestampError> {
        let mut found = attrs.iter().filter(|a| a.oid == oid);
        match (found.next(), found.next()) {
            (None, _) => Ok(None),
            (Some(a), None) if a.values.len() == 1 => Ok(a.values.iter().next()),
            _ => Err(malformed(format!("attribute {oid} is repeated"))),
        }
    };
    let content_type = one(ID_CONTENT_TYPE)?
        .ok_or(TimestampError::Altered("no content-type attribute"))?
        .decode_as::<ObjectIdentifier>()
        .map_err(malformed)?;
    if content_type != ID_CT_TST_INFO {
        return Err(TimestampError::Altered("content-type attribute"));
    }
    let digest = one(ID_MESSAGE_DIGEST)?
        .ok_or(TimestampError::Altered("no message-digest attribute"))?
        .decode_as::<OctetString>()
        .map_err(malformed)?;
    if digest.as_bytes() != hash(&signer.digest_alg.oid, content)?.as_slice() {
        return Err(TimestampError::Altered("message-digest attribute"));
    }
    let cert_der = tsa.to_der().map_err(malformed)?;
    if let Some(v2) = one(ID_SIGNING_CERTIFICATE_V2)? {
        let v2: SigningCertificateV2 = v2.decode_as().map_err(malformed)?;
        let first = v2
            .certs
            .first()
            .ok_or(TimestampError::SigningCertificate("is empty"))?;
        let alg = first.hash_algorithm.as_ref().map_or(ID_SHA256, |a| a.oid);
        if first.cert_hash.as_bytes() != hash(&alg, &cert_der)?.as_slice() {
            return Err(TimestampError::SigningCertificate(
                "names another certificate than the signer's",
            ));
        }
    } else if let Some(v1) = one(ID_SIGNING_CERTIFICATE)? {
        let v1: SigningCertificate = v1.decode_as().map_err(malformed)?;
        let first = v1
            .certs
            .first()
            .ok_or(TimestampError::SigningCertificate("is empty"))?;
        let sha1 =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert_der);
        if first.cert_hash.as_bytes() != sha1.as_ref() {
            return Err(TimestampError::SigningCertificate(
                "names another certificate than the signer's",
            ));
        }
    } else {
        return Err(TimestampError::SigningCertificate(
            "is missing (RFC 3161 requires it)",
        ));
    }
    Ok(())
}

fn hash(alg: &ObjectIdentifier, data: &[u8]) -> Result<Vec<u8>, TimestampError> {
    use aws_lc_rs::digest::{SHA256, SHA384, SHA512, digest};
    let alg = match *alg {
        ID_SHA256 => &SHA256,
        ID_SHA384 => &SHA384,
        ID_SHA512 => &SHA512,
        other => {
            return Err(TimestampError::Unsupported(format!(
                "the token uses digest algorithm {other}"
            )));
        }
    };
    Ok(digest(alg, data).as_ref().to_vec())
}

/// Does `cert` match the signer identifier (issuer and serial, or subject key identifier)?
fn names_signer(cert: &Certificate, sid: &SignerIdentifier) -> bool {
    let tbs = cert.tbs_certificate();
    match sid {
        SignerIdentifier::IssuerAndSerialNumber(ias) => {
            *tbs.issuer() == ias.issuer && *tbs.serial_number() == ias.serial_number
        }
        SignerIdentifier::SubjectKeyIdentifier(ski) => tbs
            .get_extension::<SubjectKeyIdentifier>()
            .ok()
            .flatten()
            .is_some_and(|(_, own)| own == *ski),
    }
}

/// RFC 3161 §2.3: the TSA's certificate has exactly one extended key usage, time stamping,
/// in a critical extension; a key usage, if any, allows signatures.
fn check_timestamping_certificate(tsa: &Certificate) -> Result<(), TimestampError> {
    let tbs = tsa.tbs_certificate();
    let (critical, eku) = tbs
        .get_extension::<ExtendedKeyUsage>()
        .map_err(malformed)?
        .ok_or(TimestampError::NotForTimestamping(
            "it has no extended key usage",
        ))?;
    if eku.0 != [ID_KP_TIME_STAMPING] {
        return Err(TimestampError::NotForTimestamping(
            "its extended key usage is not time stamping alone",
        ));
    }
    if !critical {
        return Err(TimestampError::NotForTimestamping(
            "its extended key usage extension is not critical",
        ));
    }
    if let Some((_, ku)) = tbs.get_extension::<KeyUsage>().map_err(malformed)?
        && !ku.digital_signature()
        && !ku.non_repudiation()
    {
        return Err(TimestampError::NotForTimestamping(
            "its key usage does not allow signatures",
        ));
    }
    Ok(())
}

/// The TSA's certificate is one of the anchors, or chains to one through CA certificates of
/// the token; every certificate on the way is valid at `at` (the stamped time).
fn chain_to_anchor(
    tsa: &Certificate,
    pool: &[Certificate],
    anchors: &TsaAnchors,
    at: u64,
) -> Result<(), TimestampError> {
    let untrusted = |why: String| TimestampError::Untrusted(why);
    let subject = |c: &Certificate| c.tbs_certificate().subject().to_string();
    let mut current = tsa;
    for _ in 0..5 {
        within_validity(current, at)
            .map_err(|e| untrusted(format!("`{}` {e}", subject(current))))?;
        if anchors.0.iter().any(|a| a == current) {
            return Ok(());
        }
        let issuer = current.tbs_certificate().issuer();
        if let Some(anchor) = anchors
            .0
            .iter()
            .find(|a| a.tbs_certificate().subject() == issuer && signed_by(current, a))
        {
            within_validity(anchor, at)
                .map_err(|e| untrusted(format!("the TSA CA `{}` {e}", subject(anchor))))?;
            return Ok(());
        }
        current = pool
            .iter()
            .find(|c| c.tbs_certificate().subject() == issuer && is_ca(c) && signed_by(current, c))
            .ok_or_else(|| {
                untrusted(format!(
                    "`{}` (issuer `{issuer}`) does not chain to the TSA CA {:?}",
                    subject(current),
                    anchors.subjects()
                ))
            })?;
    }
    Err(untrusted("the certificate chain is too long".into()))
}

fn signed_by(cert: &Certificate, issuer: &Certificate) -> bool {
    cert.tbs_certificate().to_der().is_ok_and(|tbs| {
        crate::pki::verify::verify_signed(
            issuer.tbs_certificate().subject_public_key_info(),
            cert.signature_algorithm(),
            None,
            &tbs,
            cert.signature().raw_bytes(),
        )
        .is_ok()
    })
}

fn is_ca(cert: &Certificate) -> bool {
    cert.tbs_certificate()
        .get_extension::<BasicConstraints>()
        .ok()
        .flatten()
        .is_some_and(|(_, bc)| bc.ca)
}

/// The certificate was valid at `at` (the stamped time).
fn within_validity(cert: &Certificate, at: u64) -> Result<(), crate::pki::Error> {
    let v = cert.tbs_certificate().validity();
    let nb = v.not_before.to_unix_duration().as_secs();
    let na = v.not_after.to_unix_duration().as_secs();
    if at < nb {
        return Err(crate::pki::Error::NotYetValid(crate::clock::rfc3339(nb)));
    }
    if at > na {
        return Err(crate::pki::Error::Expired(crate::clock::rfc3339(na)));
    }
    Ok(())
}

/// A GeneralizedTime `YYYYMMDDHHMMSS[.f…]Z` as (RFC 3339, Unix seconds).
fn generalized_time(any: &Any) -> Result<(String, u64), TimestampError> {
    let bad = || malformed("genTime is not a UTC GeneralizedTime");
    if any.tag() != Tag::GeneralizedTime {
        return Err(bad());
    }
    let t = std::str::from_utf8(any.value()).map_err(|_| bad())?;
    let digits = t.get(..14).ok_or_else(bad)?;
    let rest = t.get(14..).ok_or_else(bad)?;
    let fraction_ok = match rest.strip_suffix('Z') {
        Some("") => true,
        Some(f) => f.len() >= 2 && f.starts_with('.') && f[1..].bytes().all(|b| b.is_ascii_digit()),
        None => false,
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !fraction_ok {
        return Err(bad());
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}{}",
        &digits[0..4],
        &digits[4..6],
        &digits[6..8],
        &digits[8..10],
        &digits[10..12],
        &digits[12..14],
        rest
    );
    let unix = crate::clock::parse_rfc3339(&rfc).ok_or_else(bad)?;
    Ok((rfc, unix))
}

impl StoredTimestamp {
    pub fn new(tree_size: u64, note: &[u8], response: &[u8]) -> Self {
        Self {
            tree_size,
            note_sha256: hex::encode(crate::sha256::sha256(note)),
            response: B64.encode(response),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_typed_der_with_the_digest_nonce_and_policy() {
        let policy = ObjectIdentifier::new_unwrap("1.2.3.4.1");
        let der = request(b"note", 0x80, Some(policy));
        let req = TimeStampReq::from_der(&der).unwrap();
        assert_eq!(req.version, 1);
        assert_eq!(
            req.message_imprint.hashed_message.as_bytes(),
            crate::sha256::sha256(b"note").as_slice()
        );
        assert_eq!(req.message_imprint.hash_algorithm.oid, ID_SHA256);
        // The nonce 0x80 needs a leading zero to stay positive.
        assert_eq!(req.nonce.unwrap().as_bytes(), &[0x00, 0x80]);
        assert_eq!(req.req_policy, Some(policy));
        assert!(req.cert_req);
    }

    #[test]
    fn answers_that_are_not_granted_tokens_are_refused_with_their_reason() {
        let expected = Expected {
            note: b"note",
            ..Expected::default()
        };
        let refused = TimeStampResp {
            status: PkiStatusInfo {
                status: 2,
                status_string: Some(vec!["bad request".into()]),
                fail_info: None,
            },
            time_stamp_token: None,
        }
        .to_der()
        .unwrap();
        let e = verify(&refused, &expected, None).unwrap_err();
        assert_eq!(e.reason(), "refused");
        assert!(e.to_string().contains("bad request"), "{e}");
        // Granted, but no token.
        let empty = TimeStampResp {
            status: PkiStatusInfo {
                status: 0,
                status_string: None,
                fail_info: None,
            },
            time_stamp_token: None,
        }
        .to_der()
        .unwrap();
        assert_eq!(
            verify(&empty, &expected, None).unwrap_err().reason(),
            "malformed"
        );
        // Bytes that merely contain the digest are not a token.
        let mut blob = vec![0x30, 0x22, 0x04, 0x20];
        blob.extend_from_slice(&crate::sha256::sha256(b"note"));
        assert_eq!(
            verify(&blob, &expected, None).unwrap_err().reason(),
            "malformed"
        );
        assert_eq!(
            verify(&vec![0u8; MAX_RESPONSE_BYTES + 1], &expected, None)
                .unwrap_err()
                .reason(),
            "too_large"
        );
    }

    #[test]
    fn generalized_times_with_and_without_fractions() {
        let t = |s: &str| {
            generalized_time(&Any::new(Tag::GeneralizedTime, s.as_bytes().to_vec()).unwrap())
        };
        assert_eq!(
            t("20261205103000Z").unwrap(),
            ("2026-12-05T10:30:00Z".into(), 1_796_466_600)
        );
        assert_eq!(t("20261205103000.25Z").unwrap().1, 1_796_466_600);
        assert!(t("20261205103000").is_err());
        assert!(t("2026120510300Z").is_err());
        assert!(t("20261205103000.Z").is_err());
    }
}
