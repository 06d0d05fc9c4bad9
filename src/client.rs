//! A small mutual-TLS HTTP client (HTTP/1.1 keep-alive, or multiplexed HTTP/2): used by the
//! CLI to reach a running service's admin API, and by the benchmark's load generator.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("request failed: {0}")]
    Request(String),
    #[error("invalid URL `{0}` (expected https://HOST:PORT)")]
    Url(String),
}

/// TLS settings of a client: trusted server CA and (optionally) a client certificate.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    pub fn new(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Self, Error> {
        let file_err = |p: &Path, e: &dyn std::fmt::Display| Error::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, &e))? {
            roots
                .add(c.map_err(|e| file_err(ca, &e))?)
                .map_err(|e| file_err(ca, &e))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (cert, key) {
            (Some(c), Some(k)) => {
                let chain = CertificateDer::pem_file_iter(c)
                    .map_err(|e| file_err(c, &e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| file_err(c, &e))?;
                let key = PrivateKeyDer::from_pem_file(k).map_err(|e| file_err(k, &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| Error::Tls(e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// The rustls configuration, for callers that drive a TLS socket themselves.
    pub fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.config)
    }
}

/// One connection: keep-alive HTTP/1.1 (one request at a time), or HTTP/2 (clones share the
/// connection and multiplex requests on it).
pub struct Connection {
    sender: Sender,
    host: String,
}

enum Sender {
    H1(SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// Split `https://host:port[/...]` into host and port.
pub fn parse_url(url: &str) -> Result<(String, u16), Error> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| Error::Url(url.to_owned()))?;
    let hostport = rest.split('/').next().unwrap_or_default();
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| Error::Url(url.to_owned()))?),
        None => (hostport, 443),
    };
    if host.is_empty() {
        return Err(Error::Url(url.to_owned()));
    }
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

impl Connection {
    /// Connect (HTTP/1.1) to `addr`, presenting `server_name` for SNI and certificate checks.
    pub async fn connect(
        tls: &ClientTls,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Self, Error> {
        Self::open(&tls.config, addr, None, server_name, false).await
    }

    /// [`Connection::connect`] from the local address `source` (a host with several
    /// addresses: the server's per-network limits count the source network).
    pub async fn connect_from(
        tls: &ClientTls,
        addr: SocketAddr,
        source: std::net::IpAddr,
        server_name: &str,
    ) -> Result<Self, Error> {
        Self::open(&tls.config, addr, Some(source), server_name, false).await
    }

    /// Connect with ALPN `h2`; [`Connection::share`] gives more streams on it.
    pub async fn connect_h2(
        tls: &ClientTls,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Self, Error> {
        let mut config = (*tls.config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self::open(&Arc::new(config), addr, None, server_name, true).await
    }

    async fn open(
        config: &Arc<rustls::ClientConfig>,
        addr: SocketAddr,
        source: Option<std::net::IpAddr>,
        server_name: &str,
        h2: bool,
    ) -> Result<Self, Error> {
        let io = TokioIo::new(tls_connect(config, addr, source, server_name).await?);
        let failed = |e: hyper::Error| Error::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let sender = if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .map_err(failed)?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(failed)?;
            tokio::spawn(conn);
            Sender::H1(sender)
        };
        Ok(Self {
            sender,
            host: server_name.to_owned(),
        })
    }

    /// Another handle on the same HTTP/2 connection (None for HTTP/1.1, which cannot share).
    pub fn share(&self) -> Option<Self> {
        match &self.sender {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Self {
                sender: Sender::H2(s.clone()),
                host: self.host.clone(),
            }),
        }
    }

    /// Connect to `https://host:port`, resolving the host.
    pub async fn connect_url(tls: &ClientTls, url: &str) -> Result<Self, Error> {
        let (host, port) = parse_url(url)?;
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| Error::Connect {
                addr: url.to_owned(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| Error::Connect {
                addr: url.to_owned(),
                reason: "no address".into(),
            })?;
        Self::connect(tls, addr, &host).await
    }

    /// Send one request; returns status, headers and the whole body.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), Error> {
        let failed = |e: hyper::Error| Error::Request(e.to_string());
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                let req = build_request(method, path.to_owned(), &self.host, headers, body)?;
                s.ready().await.map_err(failed)?;
                s.send_request(req).await.map_err(failed)?
            }
            Sender::H2(s) => {
                // HTTP/2 needs the scheme and authority in the URI.
                let uri = format!("https://{}{path}", self.host);
                let req = build_request(method, uri, &self.host, headers, body)?;
                s.ready().await.map_err(failed)?;
                s.send_request(req).await.map_err(failed)?
            }
        };
        read_response(resp).await
    }
}

async fn tls_connect(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    server_name: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Error> {
    let connect_err = |e: &dyn std::fmt::Display| Error::Connect {
        addr: addr.to_string(),
        reason: e.to_string(),
    };
    let tcp = match source {
        None => tokio::net::TcpStream::connect(addr).await,
        Some(ip) => {
            let sock = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .map_err(|e| connect_err(&e))?;
            sock.bind(SocketAddr::new(ip, 0))
                .map_err(|e| connect_err(&e))?;
            sock.connect(addr).await
        }
    }
    .map_err(|e| connect_err(&e))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| connect_err(&e))?;
    tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await
        .map_err(|e| connect_err(&e))
}

fn build_request(
    method: Method,
    uri: String,
    host: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Request<Full<Bytes>>, Error> {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host);
    if body.is_some()
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| Error::Request(e.to_string()))
}

async fn read_response(
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<(StatusCode, HeaderMap, Bytes), Error> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Error::Request(e.to_string()))?
        .to_bytes();
    Ok((status, headers, body))
}
