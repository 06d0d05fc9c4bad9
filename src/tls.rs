//! TLS: the rustls server configuration, the client-certificate verifier, and the peer
//! identity a request acts as.
//!
//! A client certificate must chain to one of `[server].client_ca` *and* name an identity that
//! `[[clients]]` lists; anything else is refused during the handshake. The identity is the
//! certificate's URI SAN, else its DNS SAN, else (only with no SAN at all) its subject CN.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::ServerConfig;
use crate::pki::CertInfo;
use crate::policy::Policies;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration key `{key}`: cannot read {path}: {reason}")]
    File {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("configuration key `server.client_ca`: {0}")]
    ClientCa(String),
    #[error(
        "configuration key `server.key`: the key does not match server.cert or is unsupported: {0}"
    )]
    KeyPair(String),
}

/// Who is calling, from the verified client certificate. Computed once per connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The identity matched against `[[clients]].identity`.
    pub identity: String,
    pub subject: String,
    pub san: Vec<String>,
    pub fingerprint_sha256: String,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// Derive the identity from a certificate. With several candidate names of the winning
    /// kind, the first one that `known` accepts is chosen (else the first).
    pub fn from_certificate(der: &[u8], known: impl Fn(&str) -> bool) -> Option<Self> {
        let info = CertInfo::parse(der).ok()?;
        let uris: Vec<&str> = info
            .san
            .iter()
            .filter_map(|s| s.strip_prefix("uri:"))
            .collect();
        let dns: Vec<&str> = info
            .san
            .iter()
            .filter_map(|s| s.strip_prefix("dns:"))
            .collect();
        let candidates: Vec<&str> = if !uris.is_empty() {
            uris
        } else if !dns.is_empty() {
            dns
        } else if info.san.is_empty() {
            info.common_name.as_deref().into_iter().collect()
        } else {
            Vec::new()
        };
        let identity = candidates
            .iter()
            .find(|c| known(c))
            .or(candidates.first())?
            .to_string();
        Some(Self {
            identity,
            subject: info.subject,
            san: info.san,
            fingerprint_sha256: info.fingerprint_sha256,
        })
    }

    /// An identity for in-process callers (the CLI acting on the token directly).
    pub fn local_operator(name: &str) -> Self {
        Self {
            identity: format!("local:{name}"),
            subject: String::new(),
            san: Vec::new(),
            fingerprint_sha256: String::new(),
        }
    }
}

/// Build the server's TLS configuration from the files named in `[server]`.
pub fn server_config(
    config: &ServerConfig,
    policies: Arc<ArcSwap<Policies>>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs("server.cert", &config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| Error::File {
        key: "server.key",
        path: config.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut roots = RootCertStore::empty();
    for path in &config.client_ca {
        for cert in read_certs("server.client_ca", path)? {
            roots
                .add(cert)
                .map_err(|e| Error::ClientCa(format!("{}: {e}", path.display())))?;
        }
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .map_err(|e| Error::ClientCa(e.to_string()))?;
    let verifier = Arc::new(KnownClientVerifier { inner, policies });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::KeyPair(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::KeyPair(e.to_string()))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let err = |reason: String| Error::File {
        key,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".to_owned()));
    }
    Ok(certs)
}

/// WebPKI chain verification plus: the certificate's identity must be a configured client.
#[derive(Debug)]
struct KnownClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policies: Arc<ArcSwap<Policies>>,
}

impl fmt::Debug for Policies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Policies")
    }
}

impl ClientCertVerifier for KnownClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let policies = self.policies.load();
        match ClientIdentity::from_certificate(end_entity.as_ref(), |i| policies.is_known(i)) {
            Some(id) if policies.is_known(&id.identity) => Ok(verified),
            Some(id) => {
                tracing::warn!(identity = %id.identity, "refused a client certificate whose identity is not in [[clients]]");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
            None => {
                tracing::warn!("refused a client certificate without a usable identity");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
