//! X.509 without I/O: certificate profiles, building certificates and CSRs with any
//! `Signer` (token or software), parsing, and the checks a certificate must pass before a
//! key version may use it.
//!
//! Pure: no files, no token, no clock (callers pass `now`), so the CLI can use it offline.

pub mod revocation;
pub mod verify;

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::asn1::{Ia5String, OctetString};
use der::oid::AssociatedOid;
use der::referenced::OwnedToRef;
use der::{Decode, Encode, EncodePem};
use p256::ecdsa::{DerSignature, VerifyingKey};
use signature::Verifier;
use spki::{
    DynSignatureAlgorithmIdentifier, EncodePublicKey, ObjectIdentifier, SubjectPublicKeyInfoOwned,
    SubjectPublicKeyInfoRef,
};
use x509_cert::Certificate;

use crate::clock::rfc3339;
use x509_cert::builder::{Builder, CertificateBuilder, RequestBuilder, profile::BuilderProfile};
use x509_cert::certificate::TbsCertificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::name::Name;
use x509_cert::request::CertReq;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

/// id-kp-documentSigning (RFC 9336): what tenant certificates are for.
pub const ID_KP_DOCUMENT_SIGNING: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.36");
pub const ID_KP_SERVER_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1");
pub const ID_KP_CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");
const ID_AD_OCSP: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1");
const ID_AD_CA_ISSUERS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.2");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a valid X.509 certificate: {0}")]
    Parse(String),
    #[error("not a valid PKCS#10 certificate request: {0}")]
    CsrParse(String),
    #[error("the certificate request's signature does not verify")]
    CsrSignature,
    #[error("the certificate's public key is not an ECDSA P-256 key")]
    NotP256,
    #[error("the certificate's public key does not match the key version's key in the token")]
    KeyMismatch,
    #[error("the certificate is not issued by the configured CA (issuer `{issuer}`, CA `{ca}`)")]
    WrongIssuer { issuer: String, ca: String },
    #[error("the certificate's signature does not verify with the configured CA key")]
    BadSignature,
    #[error(
        "the CA certificate uses an unsupported key or signature algorithm (ECDSA P-256 with SHA-256 only)"
    )]
    UnsupportedCa,
    #[error("the certificate is not valid yet (notBefore {0})")]
    NotYetValid(String),
    #[error("the certificate has expired (notAfter {0})")]
    Expired(String),
    #[error("the certificate expires at {not_after}, less than the required {required:?} from now")]
    TooShort {
        not_after: String,
        required: Duration,
    },
    #[error("the certificate is a CA certificate; a signing certificate is required")]
    IsCa,
    #[error("the CA certificate given is not a CA (basicConstraints CA:TRUE, keyCertSign)")]
    CaNotCa,
    #[error("the certificate's key usage does not include digitalSignature")]
    NoDigitalSignature,
    #[error("the certificate's extended key usage {found:?} does not allow document signing{}", required.as_ref().map(|r| format!(" (required: {r})")).unwrap_or_default())]
    WrongExtendedKeyUsage {
        found: Vec<String>,
        required: Option<String>,
    },
    #[error("the certificate's subject `{found}` differs from the requested `{expected}`")]
    SubjectMismatch { found: String, expected: String },
    #[error("cannot build the certificate: {0}")]
    Build(String),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Parse(_) => "parse",
            Error::CsrParse(_) => "csr_parse",
            Error::CsrSignature => "csr_signature",
            Error::NotP256 => "not_p256",
            Error::KeyMismatch => "key_mismatch",
            Error::WrongIssuer { .. } => "wrong_issuer",
            Error::BadSignature => "bad_signature",
            Error::UnsupportedCa => "unsupported_ca",
            Error::NotYetValid(_) => "not_yet_valid",
            Error::Expired(_) => "expired",
            Error::TooShort { .. } => "too_short",
            Error::IsCa => "is_ca",
            Error::CaNotCa => "ca_not_ca",
            Error::NoDigitalSignature => "no_digital_signature",
            Error::WrongExtendedKeyUsage { .. } => "wrong_extended_key_usage",
            Error::SubjectMismatch { .. } => "subject_mismatch",
            Error::Build(_) => "build",
        }
    }
}

/// What Signet needs to know about a certificate, parsed once.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub der: Vec<u8>,
    pub serial_hex: String,
    pub subject: String,
    pub issuer: String,
    pub not_before: u64,
    pub not_after: u64,
    pub public_key: Option<VerifyingKey>,
    pub is_ca: bool,
    pub fingerprint_sha256: String,
    /// Subject alternative names as `uri:...`, `dns:...`, `ip:...`.
    pub san: Vec<String>,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// Whether the certificate carries a subjectAltName extension (of any name type).
    pub has_san_extension: bool,
    /// Whether the certificate may make digital signatures: a KeyUsage extension that holds
    /// `digitalSignature`, or none at all (RFC 5280: no restriction).
    pub allows_digital_signature: bool,
    /// Extended key usage OIDs (dotted), empty if the extension is absent.
    pub extended_key_usages: Vec<String>,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, Error> {
        let cert = Certificate::from_der(der).map_err(|e| Error::Parse(e.to_string()))?;
        let tbs = cert.tbs_certificate();
        let public_key = VerifyingKey::try_from(tbs.subject_public_key_info().owned_to_ref()).ok();
        let is_ca = matches!(tbs.get_extension::<BasicConstraints>(), Ok(Some((_, bc))) if bc.ca);
        let mut san = Vec::new();
        // Present at all, whatever name types it holds (otherName, directoryName...): then the
        // subject CN must not stand in for an identity.
        let has_san_extension = tbs
            .extensions()
            .is_some_and(|exts| exts.iter().any(|e| e.extn_id == SubjectAltName::OID));
        if let Ok(Some((_, SubjectAltName(names)))) = tbs.get_extension::<SubjectAltName>() {
            for n in names {
                match n {
                    GeneralName::UniformResourceIdentifier(u) => {
                        san.push(format!("uri:{}", u.as_str()))
                    }
                    GeneralName::DnsName(d) => san.push(format!("dns:{}", d.as_str())),
                    GeneralName::IpAddress(ip) => {
                        san.push(format!("ip:{}", format_ip(ip.as_bytes())))
                    }
                    GeneralName::Rfc822Name(m) => san.push(format!("email:{}", m.as_str())),
                    _ => {}
                }
            }
        }
        let common_name = common_name(tbs.subject());
        let allows_digital_signature = match tbs.get_extension::<KeyUsage>() {
            Ok(Some((_, ku))) => ku.digital_signature(),
            Ok(None) => true,
            Err(_) => false,
        };
        let extended_key_usages = match tbs.get_extension::<ExtendedKeyUsage>() {
            Ok(Some((_, ExtendedKeyUsage(oids)))) => oids.iter().map(|o| o.to_string()).collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            der: der.to_vec(),
            serial_hex: hex::encode(tbs.serial_number().as_bytes()),
            subject: tbs.subject().to_string(),
            issuer: tbs.issuer().to_string(),
            not_before: tbs.validity().not_before.to_unix_duration().as_secs(),
            not_after: tbs.validity().not_after.to_unix_duration().as_secs(),
            public_key,
            is_ca,
            fingerprint_sha256: hex::encode(crate::sha256::sha256(der)),
            san,
            common_name,
            has_san_extension,
            allows_digital_signature,
            extended_key_usages,
        })
    }

    pub fn to_pem(&self) -> String {
        der_to_pem(&self.der, "CERTIFICATE")
    }

    /// Is `now` inside [notBefore, notAfter]?
    pub fn check_window(&self, now: u64) -> Result<(), Error> {
        if now < self.not_before {
            return Err(Error::NotYetValid(rfc3339(self.not_before)));
        }
        if now > self.not_after {
            return Err(Error::Expired(rfc3339(self.not_after)));
        }
        Ok(())
    }

    /// The window check plus at least `min_remaining` left before notAfter.
    pub fn check_usable(&self, now: u64, min_remaining: Duration) -> Result<(), Error> {
        self.check_window(now)?;
        if self.not_after.saturating_sub(now) < min_remaining.as_secs() {
            return Err(Error::TooShort {
                not_after: rfc3339(self.not_after),
                required: min_remaining,
            });
        }
        Ok(())
    }
}

/// Extended key usages that allow signing documents: anyExtendedKeyUsage, id-kp-documentSigning
/// (RFC 9336), emailProtection, codeSigning, Microsoft document signing, Adobe AATL.
const DOCUMENT_SIGNING_EKUS: [&str; 6] = [
    "2.5.29.37.0",
    "1.3.6.1.5.5.7.3.36",
    "1.3.6.1.5.5.7.3.4",
    "1.3.6.1.5.5.7.3.3",
    "1.3.6.1.4.1.311.10.3.12",
    "1.2.840.113583.1.1.5",
];

/// What a certificate offered for a key version must satisfy besides its key and CA.
#[derive(Debug, Clone, Default)]
pub struct Expected<'a> {
    /// The subject the CSR asked for (string form), if known.
    pub subject: Option<&'a str>,
    /// An extended key usage (dotted OID) it must carry.
    pub extended_key_usage: Option<&'a str>,
}

/// Check a certificate offered for a key version: P-256 key equal to the token key, issued
/// and signed by `ca` (itself a CA), currently valid, not a CA, allowed to make digital
/// signatures of documents, and with the expected subject. Returns the parsed certificate.
pub fn check_issued(
    der: &[u8],
    key: &VerifyingKey,
    ca: &CertInfo,
    now: u64,
    expected: &Expected<'_>,
) -> Result<CertInfo, Error> {
    if !ca.is_ca {
        return Err(Error::CaNotCa);
    }
    let info = CertInfo::parse(der)?;
    let cert_key = info.public_key.ok_or(Error::NotP256)?;
    if cert_key != *key {
        return Err(Error::KeyMismatch);
    }
    if info.is_ca {
        return Err(Error::IsCa);
    }
    verify_issued_by(der, ca)?;
    info.check_window(now)?;
    if !info.allows_digital_signature {
        return Err(Error::NoDigitalSignature);
    }
    let ekus = &info.extended_key_usages;
    let eku_ok = match expected.extended_key_usage {
        Some(required) => ekus.iter().any(|o| o == required),
        None => {
            ekus.is_empty()
                || ekus
                    .iter()
                    .any(|o| DOCUMENT_SIGNING_EKUS.contains(&o.as_str()))
        }
    };
    if !eku_ok {
        return Err(Error::WrongExtendedKeyUsage {
            found: ekus.clone(),
            required: expected.extended_key_usage.map(str::to_owned),
        });
    }
    if let Some(subject) = expected.subject
        && info.subject != subject
    {
        return Err(Error::SubjectMismatch {
            found: info.subject.clone(),
            expected: subject.to_owned(),
        });
    }
    Ok(info)
}

/// Does `ca` (ECDSA P-256) sign `der`, and does the issuer name match the CA's subject?
pub fn verify_issued_by(der: &[u8], ca: &CertInfo) -> Result<(), Error> {
    let cert = Certificate::from_der(der).map_err(|e| Error::Parse(e.to_string()))?;
    let issuer = cert.tbs_certificate().issuer().to_string();
    if issuer != ca.subject {
        return Err(Error::WrongIssuer {
            issuer,
            ca: ca.subject.clone(),
        });
    }
    let ca_key = ca.public_key.ok_or(Error::UnsupportedCa)?;
    if cert.signature_algorithm().oid != ECDSA_WITH_SHA256 {
        return Err(Error::UnsupportedCa);
    }
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| Error::Parse(e.to_string()))?;
    let sig =
        DerSignature::from_bytes(cert.signature().raw_bytes()).map_err(|_| Error::BadSignature)?;
    ca_key.verify(&tbs, &sig).map_err(|_| Error::BadSignature)
}

/// Parse a PEM or DER certificate; PEM input may hold a chain (the first one is returned).
pub fn parse_pem_or_der(input: &[u8]) -> Result<Vec<u8>, Error> {
    if input.starts_with(b"-----") || input.iter().take(64).all(|b| b.is_ascii()) {
        let chain = Certificate::load_pem_chain(input).map_err(|e| Error::Parse(e.to_string()))?;
        let first = chain
            .into_iter()
            .next()
            .ok_or_else(|| Error::Parse("no certificate in PEM input".into()))?;
        return first.to_der().map_err(|e| Error::Parse(e.to_string()));
    }
    Certificate::from_der(input).map_err(|e| Error::Parse(e.to_string()))?;
    Ok(input.to_vec())
}

/// The kinds of certificate Signet issues.
pub enum Profile {
    /// A self-signed CA (the `hsm-ca` signing CA, or the development TLS CA).
    Ca { subject: Name },
    /// A tenant key version's document-signing certificate, with where relying parties find
    /// its revocation status (`[pki] base_url`), if published.
    DocumentSigning {
        subject: Name,
        issuer: Name,
        urls: Option<RevocationUrls>,
    },
    /// A TLS server certificate (development).
    TlsServer {
        subject: Name,
        issuer: Name,
        dns: Vec<String>,
        ips: Vec<std::net::IpAddr>,
    },
    /// A TLS client certificate (development); identity in a URI SAN.
    TlsClient {
        subject: Name,
        issuer: Name,
        uri: Option<String>,
    },
}

/// Where the internal CA publishes revocation data: written into the certificates it issues
/// (CRL distribution point; authority information access: OCSP and the CA certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationUrls {
    pub crl: String,
    pub ocsp: String,
    pub ca_issuers: String,
}

impl RevocationUrls {
    /// The URLs under `base` (no trailing slash): `/crl`, `/ocsp`, `/ca`.
    pub fn under(base: &str) -> Self {
        let base = base.trim_end_matches('/');
        Self {
            crl: format!("{base}/crl"),
            ocsp: format!("{base}/ocsp"),
            ca_issuers: format!("{base}/ca"),
        }
    }
}

/// Build and sign a certificate for `subject_key`, valid from `not_before` for `validity`.
pub fn issue<S>(
    profile: Profile,
    subject_key: &VerifyingKey,
    not_before: SystemTime,
    validity: Duration,
    signer: &S,
) -> Result<Vec<u8>, Error>
where
    S: signature::Signer<DerSignature> + signature::Keypair + DynSignatureAlgorithmIdentifier,
    S::VerifyingKey: EncodePublicKey,
{
    let spki = SubjectPublicKeyInfoOwned::from_key(subject_key)
        .map_err(|e| Error::Build(e.to_string()))?;
    let not_before_t = Time::try_from(not_before).map_err(|e| Error::Build(e.to_string()))?;
    let not_after_t =
        Time::try_from(not_before + validity).map_err(|e| Error::Build(e.to_string()))?;
    let builder = CertificateBuilder::new(
        profile,
        random_serial(),
        Validity::new(not_before_t, not_after_t),
        spki,
    )
    .map_err(|e| Error::Build(e.to_string()))?;
    let cert = builder
        .build::<_, DerSignature>(signer)
        .map_err(|e| Error::Build(e.to_string()))?;
    cert.to_der().map_err(|e| Error::Build(e.to_string()))
}

/// A PKCS#10 request for `subject`, signed by `signer` (the token key of the new version).
pub fn csr<S>(subject: Name, signer: &S) -> Result<Vec<u8>, Error>
where
    S: signature::Signer<DerSignature> + signature::Keypair + DynSignatureAlgorithmIdentifier,
    S::VerifyingKey: EncodePublicKey,
{
    let builder = RequestBuilder::new(subject).map_err(|e| Error::Build(e.to_string()))?;
    let req = builder
        .build::<_, DerSignature>(signer)
        .map_err(|e| Error::Build(e.to_string()))?;
    req.to_der().map_err(|e| Error::Build(e.to_string()))
}

/// Parse a CSR, check its self-signature, and return its subject and P-256 key.
pub fn verify_csr(der: &[u8]) -> Result<(Name, VerifyingKey), Error> {
    let req = CertReq::from_der(der).map_err(|e| Error::CsrParse(e.to_string()))?;
    let key =
        VerifyingKey::try_from(req.info.public_key.owned_to_ref()).map_err(|_| Error::NotP256)?;
    let info = req
        .info
        .to_der()
        .map_err(|e| Error::CsrParse(e.to_string()))?;
    let sig =
        DerSignature::from_bytes(req.signature.raw_bytes()).map_err(|_| Error::CsrSignature)?;
    key.verify(&info, &sig).map_err(|_| Error::CsrSignature)?;
    Ok((req.info.subject, key))
}

/// The subject of a PEM CSR (after checking its signature).
pub fn parse_csr_pem(pem: &str) -> Result<Name, Error> {
    let (label, der) =
        der::pem::decode_vec(pem.as_bytes()).map_err(|e| Error::CsrParse(e.to_string()))?;
    if label != "CERTIFICATE REQUEST" {
        return Err(Error::CsrParse(format!("PEM label `{label}`")));
    }
    verify_csr(&der).map(|(name, _)| name)
}

/// `CN=<cn>,O=<org>` as an X.509 name.
pub fn name(common_name: &str, organization: &str) -> Result<Name, Error> {
    let escape = |s: &str| {
        s.replace('\\', "\\\\")
            .replace(',', "\\,")
            .replace('+', "\\+")
            .replace('=', "\\=")
    };
    Name::from_str(&format!(
        "CN={},O={}",
        escape(common_name),
        escape(organization)
    ))
    .map_err(|e| Error::Build(e.to_string()))
}

pub fn name_der(name: &Name) -> Vec<u8> {
    name.to_der().unwrap_or_default()
}

pub fn der_to_pem(der: &[u8], label: &'static str) -> String {
    // Encoding fails only for a malformed label; the callers pass fixed, valid ones.
    #[allow(clippy::expect_used)]
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).expect("a valid PEM label")
}

/// The CSR in PEM.
pub fn csr_pem(der: &[u8]) -> String {
    der_to_pem(der, "CERTIFICATE REQUEST")
}

/// Public key as SPKI PEM.
pub fn public_key_pem(key: &VerifyingKey) -> String {
    key.to_public_key_der()
        .map(|d| der_to_pem(d.as_bytes(), "PUBLIC KEY"))
        .unwrap_or_default()
}

pub fn unix_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and no leading zero byte, so the DER INTEGER is exactly 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    // 16 non-zero-prefixed bytes are always a valid serial.
    SerialNumber::new(&bytes).unwrap_or_else(|_| SerialNumber::from(1u32))
}

fn common_name(name: &Name) -> Option<String> {
    const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    for atv in name.iter() {
        if atv.oid == CN {
            if let Ok(s) = atv.value.decode_as::<der::asn1::Utf8StringRef<'_>>() {
                return Some(s.as_str().to_owned());
            }
            if let Ok(s) = atv.value.decode_as::<der::asn1::PrintableStringRef<'_>>() {
                return Some(s.as_str().to_owned());
            }
        }
    }
    None
}

fn format_ip(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => hex::encode(b),
    }
}

impl BuilderProfile for Profile {
    fn get_issuer(&self, subject: &Name) -> Name {
        match self {
            Profile::Ca { .. } => subject.clone(),
            Profile::DocumentSigning { issuer, .. }
            | Profile::TlsServer { issuer, .. }
            | Profile::TlsClient { issuer, .. } => issuer.clone(),
        }
    }

    fn get_subject(&self) -> Name {
        match self {
            Profile::Ca { subject }
            | Profile::DocumentSigning { subject, .. }
            | Profile::TlsServer { subject, .. }
            | Profile::TlsClient { subject, .. } => subject.clone(),
        }
    }

    fn build_extensions(
        &self,
        spk: SubjectPublicKeyInfoRef<'_>,
        issuer_spk: SubjectPublicKeyInfoRef<'_>,
        tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let mut ext: Vec<Extension> = Vec::new();
        let ski = SubjectKeyIdentifier::try_from(spk)?;
        let aki = SubjectKeyIdentifier::try_from(issuer_spk)?;
        let subject = tbs.subject();
        ext.push(ski.clone().to_extension(subject, &ext)?);
        ext.push(
            AuthorityKeyIdentifier {
                key_identifier: Some(aki.0.clone()),
                ..Default::default()
            }
            .to_extension(subject, &ext)?,
        );
        let is_ca = matches!(self, Profile::Ca { .. });
        ext.push(
            BasicConstraints {
                ca: is_ca,
                path_len_constraint: if is_ca { Some(0) } else { None },
            }
            .to_extension(subject, &ext)?,
        );
        let usage = match self {
            Profile::Ca { .. } => {
                KeyUsages::KeyCertSign | KeyUsages::CRLSign | KeyUsages::DigitalSignature
            }
            Profile::DocumentSigning { .. } => {
                KeyUsages::DigitalSignature | KeyUsages::NonRepudiation
            }
            Profile::TlsServer { .. } | Profile::TlsClient { .. } => {
                KeyUsages::DigitalSignature.into()
            }
        };
        ext.push(KeyUsage(usage).to_extension(subject, &ext)?);
        let eku = match self {
            Profile::Ca { .. } => None,
            Profile::DocumentSigning { .. } => Some(ID_KP_DOCUMENT_SIGNING),
            Profile::TlsServer { .. } => Some(ID_KP_SERVER_AUTH),
            Profile::TlsClient { .. } => Some(ID_KP_CLIENT_AUTH),
        };
        if let Some(oid) = eku {
            ext.push(ExtendedKeyUsage(vec![oid]).to_extension(subject, &ext)?);
        }
        let mut names = Vec::new();
        match self {
            Profile::TlsServer { dns, ips, .. } => {
                for d in dns {
                    names.push(GeneralName::DnsName(Ia5String::new(d)?));
                }
                for ip in ips {
                    let bytes = match ip {
                        std::net::IpAddr::V4(v) => v.octets().to_vec(),
                        std::net::IpAddr::V6(v) => v.octets().to_vec(),
                    };
                    names.push(GeneralName::IpAddress(OctetString::new(bytes)?));
                }
            }
            Profile::TlsClient { uri: Some(u), .. } => {
                names.push(GeneralName::UniformResourceIdentifier(Ia5String::new(u)?))
            }
            _ => {}
        }
        if !names.is_empty() {
            ext.push(SubjectAltName(names).to_extension(subject, &ext)?);
        }
        if let Profile::DocumentSigning {
            urls: Some(urls), ..
        } = self
        {
            use x509_cert::ext::pkix::crl::dp::DistributionPoint;
            use x509_cert::ext::pkix::name::DistributionPointName;
            use x509_cert::ext::pkix::{
                AccessDescription, AuthorityInfoAccessSyntax, CrlDistributionPoints,
            };
            let uri = |u: &str| Ia5String::new(u).map(GeneralName::UniformResourceIdentifier);
            ext.push(
                CrlDistributionPoints(vec![DistributionPoint {
                    distribution_point: Some(DistributionPointName::FullName(vec![
                        uri(&urls.crl)?,
                    ])),
                    reasons: None,
                    crl_issuer: None,
                }])
                .to_extension(subject, &ext)?,
            );
            ext.push(
                AuthorityInfoAccessSyntax(vec![
                    AccessDescription {
                        access_method: ID_AD_OCSP,
                        access_location: uri(&urls.ocsp)?,
                    },
                    AccessDescription {
                        access_method: ID_AD_CA_ISSUERS,
                        access_location: uri(&urls.ca_issuers)?,
                    },
                ])
                .to_extension(subject, &ext)?,
            );
        }
        Ok(ext)
    }
}

/// Encode a certificate DER as PEM using the der crate (kept for symmetry with parsing).
pub fn certificate_pem(der: &[u8]) -> Result<String, Error> {
    let cert = Certificate::from_der(der).map_err(|e| Error::Parse(e.to_string()))?;
    cert.to_pem(der::pem::LineEnding::LF)
        .map_err(|e| Error::Parse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::Generate;

    /// A software signer standing in for the token: this tests certificate logic, not the token.
    struct Soft(SigningKey);
    impl signature::Keypair for Soft {
        type VerifyingKey = VerifyingKey;
        fn verifying_key(&self) -> VerifyingKey {
            *self.0.verifying_key()
        }
    }
    impl signature::Signer<DerSignature> for Soft {
        fn try_sign(&self, msg: &[u8]) -> Result<DerSignature, signature::Error> {
            let s: p256::ecdsa::Signature = self.0.try_sign(msg)?;
            Ok(s.to_der())
        }
    }
    impl DynSignatureAlgorithmIdentifier for Soft {
        fn signature_algorithm_identifier(&self) -> spki::Result<spki::AlgorithmIdentifierOwned> {
            Ok(spki::AlgorithmIdentifierOwned {
                oid: ECDSA_WITH_SHA256,
                parameters: None,
            })
        }
    }

    fn make_ca() -> (Soft, CertInfo) {
        let k = Soft(SigningKey::generate());
        let der = issue(
            Profile::Ca {
                subject: name("Test CA", "Signet").unwrap(),
            },
            &k.0.verifying_key().clone(),
            SystemTime::now() - Duration::from_secs(60),
            Duration::from_secs(86400),
            &k,
        )
        .unwrap();
        (k, CertInfo::parse(&der).unwrap())
    }

    fn leaf(ca_key: &Soft, ca: &CertInfo, key: &VerifyingKey, validity: Duration) -> Vec<u8> {
        let issuer = Name::from_der(
            &Certificate::from_der(&ca.der)
                .unwrap()
                .tbs_certificate()
                .subject()
                .to_der()
                .unwrap(),
        )
        .unwrap();
        issue(
            Profile::DocumentSigning {
                subject: name("payroll v1", "Signet").unwrap(),
                issuer,
                urls: None,
            },
            key,
            SystemTime::now() - Duration::from_secs(1),
            validity,
            ca_key,
        )
        .unwrap()
    }

    #[test]
    fn issued_certificate_passes_checks_and_refusals_are_precise() {
        let (ca_key, ca) = make_ca();
        assert!(ca.is_ca);
        let k = SigningKey::generate();
        let der = leaf(&ca_key, &ca, k.verifying_key(), Duration::from_secs(3600));
        let now = unix_now(SystemTime::now());
        let info = check_issued(&der, k.verifying_key(), &ca, now, &Expected::default()).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("payroll v1"));
        assert!(!info.is_ca);

        let other = SigningKey::generate();
        assert!(matches!(
            check_issued(&der, other.verifying_key(), &ca, now, &Expected::default()),
            Err(Error::KeyMismatch)
        ));
        let (_, other_ca) = make_ca();
        assert!(matches!(
            check_issued(
                &der,
                k.verifying_key(),
                &other_ca,
                now,
                &Expected::default()
            ),
            Err(Error::BadSignature)
        ));
        assert!(matches!(
            check_issued(
                &der,
                k.verifying_key(),
                &ca,
                now + 7200,
                &Expected::default()
            ),
            Err(Error::Expired(_))
        ));
        assert!(matches!(
            check_issued(
                &ca.der,
                ca_key.0.verifying_key(),
                &ca,
                now,
                &Expected::default()
            ),
            Err(Error::IsCa)
        ));
        assert!(matches!(
            info.check_usable(now, Duration::from_secs(7200)),
            Err(Error::TooShort { .. })
        ));
        assert!(info.check_usable(now, Duration::from_secs(60)).is_ok());
        let mut flipped = der.clone();
        let n = flipped.len() - 10;
        flipped[n] ^= 1;
        assert!(check_issued(&flipped, k.verifying_key(), &ca, now, &Expected::default()).is_err());
    }

    #[test]
    fn csr_round_trip() {
        let k = Soft(SigningKey::generate());
        let der = csr(name("payroll v2", "Signet").unwrap(), &k).unwrap();
        let (subject, key) = verify_csr(&der).unwrap();
        assert_eq!(key, *k.0.verifying_key());
        assert!(subject.to_string().contains("payroll v2"));
        let mut bad = der.clone();
        let n = bad.len() - 5;
        bad[n] ^= 0x01;
        assert!(verify_csr(&bad).is_err());
    }

    #[test]
    fn pem_parsing_accepts_chains() {
        let (_, ca) = make_ca();
        let pem = format!("{}{}", ca.to_pem(), ca.to_pem());
        assert_eq!(parse_pem_or_der(pem.as_bytes()).unwrap(), ca.der);
        assert_eq!(parse_pem_or_der(&ca.der).unwrap(), ca.der);
        assert!(parse_pem_or_der(b"hello").is_err());
        assert_eq!(certificate_pem(&ca.der).unwrap(), ca.to_pem());
    }

    #[test]
    fn a_leaf_standing_in_as_the_ca_is_refused() {
        let (ca_key, ca) = make_ca();
        let k = SigningKey::generate();
        let now = unix_now(SystemTime::now());
        let leaf_der = leaf(&ca_key, &ca, k.verifying_key(), Duration::from_secs(7200));
        let not_a_ca = CertInfo::parse(&leaf_der).unwrap();
        assert!(matches!(
            check_issued(
                &leaf_der,
                k.verifying_key(),
                &not_a_ca,
                now,
                &Expected::default()
            ),
            Err(Error::CaNotCa)
        ));
        // The subject and a required EKU are checked too.
        let want = Expected {
            subject: Some("CN=someone else"),
            extended_key_usage: None,
        };
        assert!(matches!(
            check_issued(&leaf_der, k.verifying_key(), &ca, now, &want),
            Err(Error::SubjectMismatch { .. })
        ));
        let want = Expected {
            subject: None,
            extended_key_usage: Some("1.2.3.4"),
        };
        assert!(matches!(
            check_issued(&leaf_der, k.verifying_key(), &ca, now, &want),
            Err(Error::WrongExtendedKeyUsage { .. })
        ));
    }

    #[test]
    fn the_crl_lists_revoked_serials_with_reason_and_invalidity_date_and_verifies() {
        use revocation::{Reason, Revoked};
        use x509_cert::crl::CertificateList;
        let (ca_key, ca) = make_ca();
        let revoked = vec![Revoked {
            serial_hex: "4a0b".into(),
            revoked_at: 1_800_000_000,
            reason: Reason::KeyCompromise,
            invalid_since: Some(1_790_000_000),
        }];
        let der =
            revocation::crl(&ca.der, 7, 1_800_000_001, 1_800_086_401, &revoked, &ca_key).unwrap();
        let crl = CertificateList::<x509_cert::certificate::Rfc5280>::from_der(&der).unwrap();
        let tbs = &crl.tbs_cert_list;
        assert_eq!(tbs.issuer.to_string(), ca.subject);
        let entries = tbs.revoked_certificates.as_ref().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].serial_number.as_bytes(), [0x4a, 0x0b]);
        let ext = entries[0].crl_entry_extensions.as_ref().unwrap();
        let oids: Vec<String> = ext.iter().map(|e| e.extn_id.to_string()).collect();
        assert_eq!(oids, ["2.5.29.21", "2.5.29.24"]);
        // Signed by the CA key over the TBS.
        let sig = DerSignature::from_bytes(crl.signature.raw_bytes()).unwrap();
        let tbs_der = tbs.to_der().unwrap();
        assert!(ca.public_key.unwrap().verify(&tbs_der, &sig).is_ok());
        // A verifier reads it back against the CA: serial, reason name, invalidity date.
        let view = revocation::read_crl(&der, &ca).unwrap();
        let e = &view.entries["4a0b"];
        assert_eq!(
            (e.revoked_at, e.reason.as_deref(), e.invalid_since),
            (1_800_000_000, Some("keyCompromise"), Some(1_790_000_000))
        );
        assert_eq!(view.next_update, Some(1_800_086_401));
        // Forged: the same issuer name under another key is refused, as is another CA.
        let (_, impostor) = make_ca();
        assert_eq!(impostor.subject, ca.subject);
        assert!(revocation::read_crl(&der, &impostor).is_err());
        let mut tampered = der.clone();
        let at = tampered.len() / 2;
        tampered[at] ^= 1;
        assert!(revocation::read_crl(&tampered, &ca).is_err());
        // Not an OCSP request: malformed, never signed.
        let issuer = revocation::OcspIssuer::new(&ca.der).unwrap();
        assert_eq!(
            revocation::ocsp_question(b"junk", &issuer).err(),
            Some(revocation::OcspRefusal::Malformed)
        );
    }
}
