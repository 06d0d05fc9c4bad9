//! TLS: the rustls server configuration, the client-certificate verifier, and the peer
//! identity a request acts as.
//!
//! A client certificate must chain to one of `[server].client_ca` *and* name an identity that
//! `[[clients]]` lists (exactly one of them), issued under that client's pinned CA if it has
//! one; anything else is refused during the handshake. The identity is the certificate's URI
//! SAN, else its DNS SAN, else (only with no subjectAltName extension at all) its subject CN.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::{ClientConfig, ServerConfig};
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

/// Why a certificate does not give a client identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error(
        "the certificate names no usable identity (URI or DNS SAN; the CN only without any SAN)"
    )]
    NoIdentity,
    #[error("the certificate names several configured identities: {0:?}")]
    Ambiguous(Vec<String>),
}

impl ClientIdentity {
    /// Derive the identity from a certificate: its URI SANs, else its DNS SANs, else — only
    /// when the certificate has no subjectAltName extension at all, whatever name types it
    /// would hold — its subject CN. With several candidates the one `known` accepts is
    /// chosen; a certificate naming more than one configured identity (of any of these
    /// kinds) is refused as ambiguous.
    pub fn from_certificate(
        der: &[u8],
        known: impl Fn(&str) -> bool,
    ) -> Result<Self, IdentityError> {
        let info = CertInfo::parse(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let names = |prefix: &str| -> Vec<&str> {
            info.san
                .iter()
                .filter_map(|s| s.strip_prefix(prefix))
                .collect()
        };
        let (uris, dns) = (names("uri:"), names("dns:"));
        let cn: Vec<&str> = if info.has_san_extension {
            Vec::new()
        } else {
            info.common_name.as_deref().into_iter().collect()
        };
        let mut configured: Vec<String> = uris
            .iter()
            .chain(&dns)
            .chain(&cn)
            .filter(|n| known(n))
            .map(|n| n.to_string())
            .collect();
        configured.sort();
        configured.dedup();
        if configured.len() > 1 {
            return Err(IdentityError::Ambiguous(configured));
        }
        let candidates = [uris, dns, cn]
            .into_iter()
            .find(|c| !c.is_empty())
            .ok_or(IdentityError::NoIdentity)?;
        let identity = candidates
            .iter()
            .find(|c| known(c))
            .or(candidates.first())
            .ok_or(IdentityError::NoIdentity)?
            .to_string();
        Ok(Self {
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

/// The server's TLS configuration and the client verifier inside it (kept to re-check
/// established connections after a reload).
#[derive(Clone)]
pub struct TlsState {
    pub config: Arc<rustls::ServerConfig>,
    pub verifier: Arc<dyn ClientCertVerifier>,
}

/// Build the server's TLS configuration from the files named in `[server]`, and the CAs
/// `[[clients]]` entries are pinned to.
pub fn server_config(
    config: &ServerConfig,
    clients: &[ClientConfig],
    policies: Arc<ArcSwap<Policies>>,
) -> Result<TlsState, Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = read_certs("server.cert", &config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| Error::File {
        key: "server.key",
        path: config.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let verifier_for =
        |key: &'static str, paths: &[&Path]| -> Result<Arc<dyn ClientCertVerifier>, Error> {
            let mut roots = RootCertStore::empty();
            for path in paths {
                for cert in read_certs(key, path)? {
                    roots
                        .add(cert)
                        .map_err(|e| Error::ClientCa(format!("{}: {e}", path.display())))?;
                }
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| Error::ClientCa(e.to_string()))
        };
    let all: Vec<&Path> = config.client_ca.iter().map(PathBuf::as_path).collect();
    let inner = verifier_for("server.client_ca", &all)?;
    let mut pinned = HashMap::new();
    for c in clients {
        if let Some(ca) = &c.ca {
            pinned.insert(
                c.identity.clone(),
                verifier_for("clients.ca", &[ca.as_path()])?,
            );
        }
    }
    let verifier: Arc<dyn ClientCertVerifier> = Arc::new(KnownClientVerifier {
        inner,
        pinned,
        policies,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::KeyPair(e.to_string()))?
        .with_client_cert_verifier(Arc::clone(&verifier))
        .with_single_cert(chain, key)
        .map_err(|e| Error::KeyPair(e.to_string()))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsState {
        config: Arc::new(tls),
        verifier,
    })
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

/// WebPKI chain verification plus: the certificate names exactly one configured client, and
/// chains to that client's pinned CA if it has one.
#[derive(Debug)]
struct KnownClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// Per identity with `[[clients]] ca`: a verifier trusting only that CA.
    pinned: HashMap<String, Arc<dyn ClientCertVerifier>>,
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
        let refuse = || {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        };
        match ClientIdentity::from_certificate(end_entity.as_ref(), |i| policies.is_known(i)) {
            Ok(id) if policies.is_known(&id.identity) => {
                if let Some(pin) = self.pinned.get(&id.identity)
                    && let Err(e) = pin.verify_client_cert(end_entity, intermediates, now)
                {
                    tracing::warn!(identity = %id.identity, error = %e, "refused a client certificate not issued under the CA its client is pinned to");
                    return refuse();
                }
                Ok(verified)
            }
            Ok(id) => {
                tracing::warn!(identity = %id.identity, "refused a client certificate whose identity is not in [[clients]]");
                refuse()
            }
            Err(e) => {
                tracing::warn!(reason = %e, "refused a client certificate");
                refuse()
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
