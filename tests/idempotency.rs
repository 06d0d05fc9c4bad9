//! Idempotency when the caller hangs up: a request with an `Idempotency-Key` is signed at most
//! once whatever happens to its connection, and a retry gets the answer of the first attempt.
//!
//! Each test sends requests whose connection (HTTP/1.1: a TCP reset) or stream (HTTP/2:
//! RST_STREAM) is dropped a few milliseconds after sending, then retries every one with the same
//! key, and checks the evidence log: every digest exactly once, every retry's signature the one
//! recorded, and a second retry byte-identical to the first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::Value;
use signet::client::Connection;
use tokio::io::AsyncWriteExt;

const REQUESTS: usize = 160;
const PARALLEL: usize = 16;

fn key(i: usize) -> String {
    format!("hangup-{i}")
}

fn document(i: usize) -> Vec<u8> {
    format!("contract {i} of the hang-up test").into_bytes()
}

/// Send request `i` on a raw TLS socket and reset the connection `i % 5` ms after sending.
async fn send_and_reset(s_tls: Arc<rustls::ClientConfig>, api: std::net::SocketAddr, i: usize) {
    let body = sign_body("payroll-esign", &document(i)).to_string();
    let head = format!(
        "POST /v1/sign HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         idempotency-key: {}\r\ncontent-length: {}\r\n\r\n",
        key(i),
        body.len()
    );
    let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(s_tls)
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(format!("{head}{body}").as_bytes())
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis((i % 5) as u64)).await;
    // SO_LINGER 0: close sends a TCP reset, not a FIN.
    tls.get_ref().0.set_zero_linger().unwrap();
    drop(tls);
}

/// Retry request `i` with its key on `c`; returns the status and the raw body.
async fn retry(c: &mut Connection, i: usize) -> (u16, Vec<u8>) {
    let body = sign_body("payroll-esign", &document(i)).to_string();
    let (st, _, b) = c
        .request(
            Method::POST,
            "/v1/sign",
            &[("idempotency-key", key(i).as_str())],
            Some(body.into_bytes()),
        )
        .await
        .unwrap();
    (st.as_u16(), b.to_vec())
}

/// Retry every request twice; check the answers against each other and against the log.
async fn retry_all_and_check_the_log(s: &Signet) {
    let mut answers: Vec<Option<(Vec<u8>, Vec<u8>)>> = vec![None; REQUESTS];
    let mut tasks = Vec::new();
    for w in 0..PARALLEL {
        let (tls, api) = (s.tls("payroll-app"), s.api);
        tasks.push(tokio::spawn(async move {
            let mut c = Connection::connect(&tls, api, "localhost").await.unwrap();
            let mut out = Vec::new();
            for i in (w..REQUESTS).step_by(PARALLEL) {
                let (st1, first) = retry(&mut c, i).await;
                assert_eq!(st1, 200, "retry {i}: {}", String::from_utf8_lossy(&first));
                let (st2, second) = retry(&mut c, i).await;
                assert_eq!(st2, 200);
                out.push((i, first, second));
            }
            out
        }));
    }
    for t in tasks {
        for (i, first, second) in t.await.unwrap() {
            answers[i] = Some((first, second));
        }
    }

    // Every digest is in the log exactly once.
    let mut by_digest: HashMap<String, Vec<Value>> = HashMap::new();
    for e in s.entries() {
        if e["event"] == "signature" {
            let d = e["digest"]["value"].as_str().unwrap().to_owned();
            by_digest.entry(d).or_default().push(e);
        }
    }
    let mut twice = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
        let (first, second) = answer.expect("every request was retried");
        assert_eq!(
            first, second,
            "request {i}: a second retry is byte-identical"
        );
        let found = by_digest.get(&digest_hex(&document(i))).map_or(0, Vec::len);
        if found != 1 {
            twice.push((i, found));
            continue;
        }
        let e = &by_digest[&digest_hex(&document(i))][0];
        let v: Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(
            v["signature"], e["signature"],
            "request {i}: the recorded signature"
        );
        assert_eq!(v["receipt"]["index"], e["index"], "request {i}");
        assert!(verifies(
            v["certificate"].as_str().unwrap(),
            &document(i),
            v["signature"].as_str().unwrap()
        ));
    }
    assert!(
        twice.is_empty(),
        "(request, entries) not recorded exactly once: {twice:?}"
    );
    s.audit_verify(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_connection_is_reset_in_flight_is_signed_once_and_replayed() {
    // 16 workers reconnecting as fast as they can from one address can have more handshakes in
    // flight than the per-address default allows; that limit is not what this test is about.
    let mut s = Signet::init(Init {
        edit: Some(Box::new(|c: String| {
            c.swap(
                "metrics_listen",
                "max_handshakes_per_ip = 1024\nmetrics_listen",
            )
        })),
        ..Init::default()
    });
    s.start();
    let config = s.tls("payroll-app").rustls_config();
    let mut tasks = Vec::new();
    for w in 0..PARALLEL {
        let (config, api) = (Arc::clone(&config), s.api);
        tasks.push(tokio::spawn(async move {
            for i in (w..REQUESTS).step_by(PARALLEL) {
                send_and_reset(Arc::clone(&config), api, i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    retry_all_and_check_the_log(&s).await;
    // The records hold across a restart too.
    assert!(s.stop().success());
    s.start();
    let mut c = s.connect("payroll-app").await;
    let (st, b) = retry(&mut c, 7).await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_slice(&b).unwrap();
    let signatures = s
        .entries()
        .into_iter()
        .filter(|e| e["event"] == "signature")
        .count();
    assert_eq!(signatures, REQUESTS, "no new signature after the restart");
    assert!(verifies(
        v["certificate"].as_str().unwrap(),
        &document(7),
        v["signature"].as_str().unwrap()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_reset_in_flight_is_signed_once_and_replayed() {
    let mut s = Signet::init(Init::default());
    s.start();
    // A fresh connection per group: a server may close a connection with many reset streams
    // (rapid-reset protection), which is not what this test is about.
    for group in (0..REQUESTS).collect::<Vec<_>>().chunks(PARALLEL) {
        let conn = Connection::connect_h2(&s.tls("payroll-app"), s.api, "localhost")
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for &i in group {
            let mut c = conn.share().expect("an HTTP/2 connection is shared");
            tasks.push(tokio::spawn(async move {
                // Dropping the request future cancels the stream: hyper sends RST_STREAM.
                let body = sign_body("payroll-esign", &document(i)).to_string();
                let k = key(i);
                let headers = [("idempotency-key", k.as_str())];
                let send = c.request(Method::POST, "/v1/sign", &headers, Some(body.into_bytes()));
                let _ = tokio::time::timeout(Duration::from_millis((i % 5) as u64), send).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    retry_all_and_check_the_log(&s).await;
}
