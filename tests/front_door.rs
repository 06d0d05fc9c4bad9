//! The front door under hostile or broken clients: identities that must not be derived from
//! the wrong certificate fields, connections that outlive their trust, slow and idle peers,
//! and unauthenticated floods. Each against the real binary over real TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use signet::client::{ClientTls, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Issue a client certificate from the development TLS CA with the given subject and
/// extensions (an openssl extension section); returns (cert, key) paths.
fn issue(s: &Signet, name: &str, subject: &str, ext: &str) -> (String, String) {
    let d = s.dir.join("tls");
    let subject = &subject.replace("//", "\\/\\/").replace(".dev/", ".dev\\/");
    std::fs::write(d.join(format!("{name}.ext")), format!("[x]\n{ext}\n")).unwrap();
    openssl_key_and_csr(&d, name, subject);
    openssl(
        &d,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-extensions",
            "x",
            "-out",
            &format!("{name}.pem"),
        ],
    );
    (
        d.join(format!("{name}.pem")).display().to_string(),
        d.join(format!("{name}.key")).display().to_string(),
    )
}

/// Status of GET `path` with this client certificate, or None if TLS or the connection refused.
async fn status_with(s: &Signet, cert: &str, key: &str, path: &str) -> Option<u16> {
    let tls = ClientTls::new(
        &s.dir.join("tls/ca.pem"),
        Some(Path::new(cert)),
        Some(Path::new(key)),
    )
    .unwrap();
    let mut c = Connection::connect(&tls, s.api, "localhost").await.ok()?;
    c.request(Method::GET, path, &[], None)
        .await
        .ok()
        .map(|(st, _, _)| st.as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_come_only_from_uri_or_dns_sans_unambiguously_and_from_the_pinned_ca() {
    let mut s = Signet::init(Init::default());
    s.start();
    let admin = "spiffe://signet.dev/admin";
    // A UPN (otherName) SAN only, with the admin identity as CN: not the admin.
    let (c, k) = issue(
        &s,
        "upn",
        &format!("/CN={admin}"),
        "subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:ops@corp.example\nextendedKeyUsage = clientAuth",
    );
    assert_eq!(status_with(&s, &c, &k, "/v1/admin/keys").await, None);
    // A directoryName SAN only: the same.
    let (c, k) = issue(
        &s,
        "dirname",
        &format!("/CN={admin}"),
        "subjectAltName = dirName:dir_sect\nextendedKeyUsage = clientAuth\n[dir_sect]\nCN = someone",
    );
    assert_eq!(status_with(&s, &c, &k, "/v1/admin/keys").await, None);
    // No SAN at all: the CN is the identity.
    let (c, k) = issue(
        &s,
        "cn-only",
        &format!("/CN={admin}"),
        "extendedKeyUsage = clientAuth",
    );
    assert_eq!(status_with(&s, &c, &k, "/v1/admin/keys").await, Some(200));
    // Two configured identities in one certificate: refused.
    let (c, k) = issue(
        &s,
        "two",
        "/CN=two",
        "subjectAltName = URI:spiffe://signet.dev/payroll-app, URI:spiffe://signet.dev/admin\nextendedKeyUsage = clientAuth",
    );
    assert_eq!(status_with(&s, &c, &k, "/v1/keys/payroll").await, None);
    assert!(
        s.log().contains("several configured identities"),
        "{}",
        s.log()
    );
    assert!(s.stop().success());

    // Pin payroll-app to another CA: the development CA's payroll-app certificate is refused,
    // one from the pinned CA (also trusted by server.client_ca) is accepted.
    let d = s.dir.join("tls");
    openssl_ca(&d, "pin-ca", "/CN=Payroll pinned CA");
    let both = d.join("both-cas.pem");
    let mut pem = std::fs::read_to_string(d.join("ca.pem")).unwrap();
    pem.push_str(&std::fs::read_to_string(d.join("pin-ca.pem")).unwrap());
    std::fs::write(&both, pem).unwrap();
    s.edit_config(|c| {
        c.swap(
            "client_ca = [\"tls/ca.pem\"]",
            "client_ca = [\"tls/both-cas.pem\"]",
        )
        .swap(
            "identity = \"spiffe://signet.dev/payroll-app\"",
            "identity = \"spiffe://signet.dev/payroll-app\"\nca = \"tls/pin-ca.pem\"",
        )
    });
    let text = std::fs::read_to_string(s.config()).unwrap();
    assert!(text.contains("pin-ca.pem") && text.contains("both-cas.pem"));
    std::fs::write(
        d.join("pinned.ext"),
        "[x]\nsubjectAltName = URI:spiffe://signet.dev/payroll-app\nextendedKeyUsage = clientAuth\n",
    )
    .unwrap();
    openssl_key_and_csr(&d, "pinned", "/CN=payroll-app");
    openssl(
        &d,
        &[
            "x509",
            "-req",
            "-in",
            "pinned.csr",
            "-CA",
            "pin-ca.pem",
            "-CAkey",
            "pin-ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "pinned.ext",
            "-extensions",
            "x",
            "-out",
            "pinned.pem",
        ],
    );
    s.start();
    let dev = d.join("clients/payroll-app");
    assert_eq!(
        status_with(
            &s,
            &format!("{}.pem", dev.display()),
            &format!("{}.key", dev.display()),
            "/v1/keys/payroll"
        )
        .await,
        None,
        "the development CA's payroll-app certificate is not from the pinned CA"
    );
    assert_eq!(
        status_with(
            &s,
            d.join("pinned.pem").to_str().unwrap(),
            d.join("pinned.key").to_str().unwrap(),
            "/v1/keys/payroll"
        )
        .await,
        Some(200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_close_when_their_ca_is_removed_or_their_certificate_expires() {
    let mut s = Signet::init(Init::default());
    // A client certificate that expires four seconds from now.
    signet::dev::issue_client_with_validity(&s.dir, "procurement-app", Duration::from_secs(304))
        .unwrap();
    s.start();
    let mut short = s.connect("procurement-app").await;
    let (st, _, _) = call_on(&mut short, Method::GET, "/v1/keys/procurement", None, &[]).await;
    assert_eq!(st, 200);
    let mut kept = s.connect("payroll-app").await;
    let (st, _, _) = call_on(&mut kept, Method::GET, "/v1/keys/payroll", None, &[]).await;
    assert_eq!(st, 200);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        short
            .request(Method::GET, "/v1/keys/procurement", &[], None)
            .await
            .is_err(),
        "the connection of an expired certificate is closed"
    );
    let (st, _, _) = call_on(&mut kept, Method::GET, "/v1/keys/payroll", None, &[]).await;
    assert_eq!(st, 200, "other connections carry on");

    // A reload that stops trusting the client's CA closes its connection.
    let other_ca = s.dir.join("tls/other-ca.pem");
    openssl_ca(&s.dir.join("tls"), "other-ca", "/CN=Another CA");
    s.edit_config(|c| {
        c.swap(
            "client_ca = [\"tls/ca.pem\"]",
            &format!("client_ca = [\"{}\"]", other_ca.display()),
        )
    });
    assert!(
        std::fs::read_to_string(s.config())
            .unwrap()
            .contains("other-ca.pem")
    );
    let (st, _, body) = s
        .call("admin", Method::POST, "/v1/admin/reload", None, &[])
        .await;
    assert_eq!(st, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        kept.request(Method::GET, "/v1/keys/payroll", &[], None)
            .await
            .is_err(),
        "a connection whose CA is no longer trusted is closed"
    );
    assert!(s.log().contains("no_longer_trusted"), "{}", s.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_peers_are_cut_and_cannot_exhaust_the_server() {
    let mut s = Signet::init(Init {
        edit: Some(Box::new(|c| {
            c.swap(
                "metrics_listen",
                "request_timeout = \"1s\"\nhandshake_timeout = \"5s\"\nmax_handshakes_per_ip = 8\n\
                 max_streams_per_connection = 4\nmax_buffered_body_bytes = 1048576\n\
                 metrics_max_connections = 4\nmetrics_listen",
            )
        })),
        ..Default::default()
    });
    s.start();

    // A TLS connection that never sends a request is closed after request_timeout.
    let mut silent = s
        .tls_from("payroll-app", "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed by the server")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // A stalled body holding the whole body budget: 408 after request_timeout; meanwhile
    // another request with a body of the same client is refused with 429 client-body-limit
    // (its share is used), and one of another client with 503 server-busy; none is buffered.
    let mut stalled = s
        .tls_from("payroll-app", "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    stalled
        .write_all(
            b"POST /v1/sign HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
              content-length: 1048576\r\n\r\n{\"policy_id\":",
        )
        .await
        .unwrap();
    stalled.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (st, h, p) = s
        .call(
            "payroll-app",
            Method::POST,
            "/v1/sign",
            Some(sign_body("payroll-esign", b"while the budget is held")),
            &[],
        )
        .await;
    assert_eq!(st, 429, "{p}");
    assert_eq!(p["type"], "urn:signet:problem:client-body-limit");
    assert!(h.contains_key("retry-after"));
    let (st, h, p) = s
        .call(
            "procurement-app",
            Method::POST,
            "/v1/sign",
            Some(sign_body("procurement-esign", b"while the budget is held")),
            &[],
        )
        .await;
    assert_eq!(st, 503, "{p}");
    assert_eq!(p["type"], "urn:signet:problem:server-busy");
    assert!(h.contains_key("retry-after"));
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request-timeout"), "{answer}");
    let (st, _) = s
        .sign(
            "payroll-app",
            sign_body("payroll-esign", b"after the budget is back"),
        )
        .await;
    assert_eq!(st, 200);

    // HTTP/2: the server announces the per-connection stream limit.
    let tcp = tokio::net::TcpStream::connect(s.api).await.unwrap();
    let mut cfg = (*s.tls("payroll-app").rustls_config()).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let io = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut send, conn) = h2::client::handshake(io).await.unwrap();
    let (conn_task, limit) = {
        let mut conn = conn;
        // Drive the connection until the server's SETTINGS arrived.
        let limit = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                futures::future::poll_fn(|cx| {
                    let _ = std::pin::Pin::new(&mut conn).poll(cx);
                    std::task::Poll::Ready(())
                })
                .await;
                let n = conn.max_concurrent_send_streams();
                if n != usize::MAX {
                    break n;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        (tokio::spawn(conn), limit)
    };
    assert_eq!(limit, 4, "max_streams_per_connection");
    send = send.ready().await.unwrap();
    drop(send);
    conn_task.abort();

    // Unauthenticated peers: 40 TCP connections from one network (127.0.0.0/24, the default
    // server.ipv4_prefix) that never handshake take at most 8 handshake slots; a client from
    // another network still gets through.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(s.api).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ok = s
        .tls_from("payroll-app", "127.0.1.2".parse().unwrap())
        .await
        .unwrap();
    ok.write_all(b"GET /v1/keys/payroll HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    ok.read_to_end(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let limited = s
        .metric("signet_http_requests_total{route=\"tls_handshake\",status=\"limited_per_ip\"}")
        .await;
    assert!(limited >= 30.0, "{limited}");
    let warnings = s
        .log()
        .matches("(server.max_handshakes_per_ip) at the limit")
        .count();
    assert!(
        warnings <= 2,
        "refusals are logged at a sane rate ({warnings} lines)"
    );
    drop(idle);

    // The metrics listener: a bounded number of connections, idle ones cut.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(s.metrics).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = tokio::net::TcpStream::connect(s.metrics).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf))
        .await
        .expect("the fifth connection is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), held[0].read(&mut buf))
        .await
        .expect("an idle metrics connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(s.metrics_text().await.contains("signet_ready"));
}
