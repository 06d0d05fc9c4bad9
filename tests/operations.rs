//! Operating Signet: reloads under load (configuration, server certificate, client CA bundle),
//! rejected reloads, graceful shutdown under load, rate limits, the queue bound in front of the
//! token, and connection limits and timeouts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use serde_json::Value;
#[cfg(feature = "insecure-test-hooks")]
use serde_json::json;

fn hup(s: &Signet) {
    assert!(
        Command::new("kill")
            .args(["-HUP", &s.pid().to_string()])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_no_request_and_apply_new_policies() {
    let mut s = Signet::init(Init::default());
    s.start();
    let load = s.load(4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.edit_config(|c| {
        c + "\n[[policies]]\nid = \"payroll-contracts\"\ntenant = \"payroll\"\nlegal_standard = \"eIDAS advanced electronic signature\"\n"
    });
    for _ in 0..3 {
        hup(&s);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, _, v) = s
        .call("admin", Method::POST, "/v1/admin/reload", None, &[])
        .await;
    assert_eq!(st, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let LoadResult { ok, failed, .. } = load.finish().await;
    assert!(
        failed.is_empty(),
        "requests failed during reloads: {failed:?}"
    );
    assert!(ok.len() > 20);
    // The new policy is live, with its legal standard in the evidence.
    let (st, r) = s
        .sign("payroll-app", sign_body("payroll-contracts", b"contract"))
        .await;
    assert_eq!(st, 200, "{r}");
    let e = &s.entries()[r["receipt"]["index"].as_u64().unwrap() as usize];
    assert_eq!(
        e["policy"]["legal_standard"],
        "eIDAS advanced electronic signature"
    );
    assert!(
        s.metric("signet_config_reloads_total{outcome=\"ok\"}")
            .await
            >= 4.0
    );
    assert_eq!(s.metric("signet_config_last_reload_successful").await, 1.0);
    // Each reload is evidence: who reloaded, and the hashes of the policies now in force.
    let reloads: Vec<Value> = s
        .entries()
        .into_iter()
        .filter(|e| e["event"] == "configuration_reloaded")
        .collect();
    assert!(reloads.len() >= 4, "{}", reloads.len());
    assert!(
        reloads
            .iter()
            .any(|e| e["actor"]["identity"] == "signal:SIGHUP")
    );
    let by_admin = reloads
        .iter()
        .find(|e| e["actor"]["identity"] == "spiffe://signet.dev/admin")
        .expect("admin reload recorded");
    assert!(
        by_admin["details"]["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "payroll-contracts")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_is_rejected_and_the_old_configuration_keeps_serving() {
    let mut s = Signet::init(Init::default());
    s.start();
    let good = std::fs::read_to_string(s.config()).unwrap();
    s.edit_config(|c| c.swap("roles = [\"sign\"]", "roles = [\"sign\", \"superuser\"]"));
    hup(&s);
    s.eventually(
        "the rejected reload to be counted",
        Duration::from_secs(5),
        || async {
            s.metric("signet_config_reloads_total{outcome=\"rejected\"}")
                .await
                == 1.0
        },
    )
    .await;
    assert_eq!(s.metric("signet_config_last_reload_successful").await, 0.0);
    assert!(
        s.log().contains("clients[0].roles"),
        "the log names the key at fault"
    );
    let (st, _) = s
        .sign("payroll-app", sign_body("payroll-esign", b"still works"))
        .await;
    assert_eq!(st, 200);
    let (st, _, p) = s
        .call("admin", Method::POST, "/v1/admin/reload", None, &[])
        .await;
    assert_eq!(st, 422);
    assert_eq!(p["type"], "urn:signet:problem:invalid-configuration");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("unknown role `superuser`"),
        "{p}"
    );
    // A TLS file that does not load is rejected too, before anything is swapped.
    std::fs::write(
        s.config(),
        good.clone()
            .swap("cert = \"tls/server.pem\"", "cert = \"tls/missing.pem\""),
    )
    .unwrap();
    let (st, _, p) = s
        .call("admin", Method::POST, "/v1/admin/reload", None, &[])
        .await;
    assert_eq!(st, 422, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("server.cert"));
    std::fs::write(s.config(), good).unwrap();
    let (st, _, _) = s
        .call("admin", Method::POST, "/v1/admin/reload", None, &[])
        .await;
    assert_eq!(st, 200);
    assert_eq!(s.metric("signet_config_last_reload_successful").await, 1.0);
}

fn served_certificate_serial(s: &Signet) -> String {
    let d = s.dir.join("tls");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{} -servername localhost -CAfile {ca} -cert {d}/clients/payroll-app.pem -key {d}/clients/payroll-app.key </dev/null 2>/dev/null | openssl x509 -noout -serial",
            s.api.port(),
            ca = d.join("ca.pem").display(),
            d = d.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_reaches_new_handshakes_and_old_connections_carry_on() {
    let mut s = Signet::init(Init::default());
    s.start();
    let before = served_certificate_serial(&s);
    assert!(before.starts_with("serial="), "{before}");
    let mut old = s.connect("payroll-app").await;

    // Issue a new server certificate from the same (development) CA with openssl.
    let tls = s.dir.join("tls");
    std::fs::write(
        tls.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &tls,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "new.key",
        ],
    );
    openssl(
        &tls,
        &[
            "req",
            "-new",
            "-key",
            "new.key",
            "-subj",
            "/CN=localhost",
            "-out",
            "new.csr",
        ],
    );
    openssl(
        &tls,
        &[
            "x509",
            "-req",
            "-in",
            "new.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "new.pem",
            "-days",
            "30",
            "-extfile",
            "san.ext",
        ],
    );
    let new_serial = openssl(&tls, &["x509", "-in", "new.pem", "-noout", "-serial"])
        .trim()
        .to_owned();
    std::fs::rename(tls.join("new.key"), tls.join("server.key")).unwrap();
    std::fs::rename(tls.join("new.pem"), tls.join("server.pem")).unwrap();
    hup(&s);
    s.eventually(
        "the new certificate to be served",
        Duration::from_secs(5),
        || async { served_certificate_serial(&s).eq_ignore_ascii_case(&new_serial) },
    )
    .await;
    assert_ne!(before, new_serial);
    // The connection opened before the swap keeps working.
    let (st, _, _) = call_on(
        &mut old,
        Method::POST,
        "/v1/sign",
        Some(sign_body("payroll-esign", b"old conn")),
        &[],
    )
    .await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_client_ca_bundle_admits_a_new_client() {
    let mut s = Signet::init(Init::default());
    s.start();
    let partner = s.dir.join("partner");
    std::fs::create_dir_all(&partner).unwrap();
    openssl(
        &partner,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca.key",
        ],
    );
    openssl(
        &partner,
        &[
            "req",
            "-new",
            "-x509",
            "-key",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/O=Partner/CN=Partner CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        &partner,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "app.key",
        ],
    );
    openssl(
        &partner,
        &[
            "req",
            "-new",
            "-key",
            "app.key",
            "-subj",
            "/CN=partner-app",
            "-out",
            "app.csr",
        ],
    );
    std::fs::write(
        partner.join("ext"),
        "subjectAltName=URI:spiffe://partner.example/app\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    openssl(
        &partner,
        &[
            "x509",
            "-req",
            "-in",
            "app.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "app.pem",
            "-days",
            "30",
            "-extfile",
            "ext",
        ],
    );
    let tls = signet::client::ClientTls::new(
        &s.dir.join("tls/ca.pem"),
        Some(&partner.join("app.pem")),
        Some(&partner.join("app.key")),
    )
    .unwrap();
    let try_sign = |tls: signet::client::ClientTls, api| async move {
        match signet::client::Connection::connect(&tls, api, "localhost").await {
            Err(_) => None,
            Ok(mut c) => c
                .request(
                    Method::POST,
                    "/v1/sign",
                    &[],
                    Some(
                        sign_body("payroll-esign", b"partner")
                            .to_string()
                            .into_bytes(),
                    ),
                )
                .await
                .ok()
                .map(|(st, _, _)| st.as_u16()),
        }
    };
    assert_eq!(
        try_sign(tls.clone(), s.api).await,
        None,
        "refused before the reload"
    );
    s.edit_config(|c| {
        c.swap("client_ca = [\"tls/ca.pem\"]", "client_ca = [\"tls/ca.pem\", \"partner/ca.pem\"]")
            + "\n[[clients]]\nidentity = \"spiffe://partner.example/app\"\ntenants = [\"payroll\"]\nroles = [\"sign\"]\n"
    });
    hup(&s);
    let api = s.api;
    s.eventually("the partner to be admitted", Duration::from_secs(5), || {
        let tls = tls.clone();
        async move { try_sign(tls, api).await == Some(200) }
    })
    .await;
    let e = s
        .entries()
        .into_iter()
        .rev()
        .find(|e| e["event"] == "signature")
        .unwrap();
    assert_eq!(e["actor"]["identity"], "spiffe://partner.example/app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_signature_and_leaves_a_final_checkpoint() {
    let mut s = Signet::init(Init::default());
    // A long interval: only the shutdown checkpoint can cover the last entries.
    s.edit_config(|c| {
        c.swap(
            "checkpoint_interval = \"300ms\"",
            "checkpoint_interval = \"1h\"",
        )
    });
    s.start();
    let load = s.load(4);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &s.pid().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = s.wait_exit(Duration::from_secs(30));
    let LoadResult { ok, .. } = load.finish().await;
    assert!(status.success(), "exit 0 after SIGTERM: {status}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "bounded shutdown: {:?}",
        t.elapsed()
    );
    assert!(ok.len() > 10);
    let entries = s.entries();
    for r in &ok {
        let e = &entries[r["receipt"]["index"].as_u64().unwrap() as usize];
        assert_eq!(
            e["signature"], r["signature"],
            "every acknowledged signature is recorded"
        );
    }
    let cps = std::fs::read_to_string(s.audit_dir().join("checkpoints.jsonl")).unwrap();
    let last: Value = serde_json::from_str(cps.lines().last().unwrap()).unwrap();
    assert_eq!(
        last["tree_size"].as_u64().unwrap() as usize,
        entries.len(),
        "the final checkpoint covers the whole log"
    );
    let v = s.audit_verify(None);
    assert_eq!(v["report"]["unsigned_tail"], 0, "{v}");
    assert!(s.log().contains("final checkpoint signed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_rate_limit_answers_429_with_retry_after() {
    let mut s = Signet::init(Init {
        edit: Some(Box::new(|c| {
            c.swap(
                "id = \"payroll-esign\"\ntenant = \"payroll\"\n",
                "id = \"payroll-esign\"\ntenant = \"payroll\"\nrate_limit = { per_second = 1, burst = 3 }\n",
            )
        })),
        ..Default::default()
    });
    s.start();
    let before = s.entries().len();
    let mut c = s.connect("payroll-app").await;
    let (mut ok, mut limited) = (0, 0);
    for i in 0..8 {
        let (st, h, p) = call_on(
            &mut c,
            Method::POST,
            "/v1/sign",
            Some(sign_body("payroll-esign", format!("{i}").as_bytes())),
            &[],
        )
        .await;
        match st {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert_eq!(p["type"], "urn:signet:problem:rate-limited");
                let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=2).contains(&retry), "Retry-After {retry}");
            }
            other => panic!("unexpected {other}: {p}"),
        }
    }
    assert!((3..=4).contains(&ok), "the burst passes ({ok})");
    assert!(limited >= 4);
    assert_eq!(
        s.entries().len(),
        before + ok,
        "refused requests leave no evidence"
    );
    // The limit belongs to the policy: the tenant's other policy still signs.
    let (st, _, p) = call_on(
        &mut c,
        Method::POST,
        "/v1/sign",
        Some(sign_body("payroll-bulk", b"x")),
        &[("idempotency-key", "other-policy")],
    )
    .await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(s.metric("signet_sign_requests_total{outcome=\"rate_limited\",policy=\"payroll-esign\",tenant=\"payroll\"}").await, limited as f64);
}

#[cfg(feature = "insecure-test-hooks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_in_front_of_the_token_answers_503_with_retry_after() {
    let mut s = Signet::init(Init {
        edit: Some(Box::new(|c| {
            c.swap("sessions = 2", "sessions = 1\nqueue_depth = 1")
        })),
        ..Default::default()
    });
    s.start();
    s.inject_fault(json!({"fault": "stall_next_call", "millis": 1500}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (tls, api) = (s.tls("payroll-app"), s.api);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50 * i)).await;
            let mut c = signet::client::Connection::connect(&tls, api, "localhost")
                .await
                .unwrap();
            call_on(
                &mut c,
                Method::POST,
                "/v1/sign",
                Some(sign_body("payroll-esign", format!("{i}").as_bytes())),
                &[],
            )
            .await
        }));
    }
    let mut busy = 0;
    for t in tasks {
        let (st, h, p) = t.await.unwrap();
        if st == 503 && p["type"] == "urn:signet:problem:token-busy" {
            assert!(h.get("retry-after").is_some());
            busy += 1;
        }
    }
    assert!(busy >= 1, "the bounded queue refused at least one request");
    assert!(s.metric("signet_hsm_queue_rejections_total").await >= 1.0);
    s.eventually_signs("signing to recover", Duration::from_secs(10))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_slow_handshakes_and_idle_connections_are_cut() {
    let mut s = Signet::init(Init {
        edit: Some(Box::new(|c| {
            c.swap(
                "metrics_listen",
                "handshake_timeout = \"1s\"\nidle_timeout = \"1s\"\nmetrics_listen",
            )
        })),
        ..Default::default()
    });
    s.start();
    // A 20 KB header is over the 16 KiB default.
    let big = "x".repeat(20_000);
    let mut c = s.connect("payroll-app").await;
    // Either a 431 answer or a closed connection is a refusal; a 2xx is not.
    let answer = c
        .request(
            Method::GET,
            "/v1/keys/payroll",
            &[("x-padding", &big)],
            None,
        )
        .await;
    if let Ok((st, _, _)) = answer {
        assert_eq!(st.as_u16(), 431);
    }
    // A TCP connection that never starts TLS is closed after the handshake timeout.
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(s.api).await.unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed by the server")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // An idle keep-alive connection is closed after the idle timeout.
    let mut idle = s.connect("payroll-app").await;
    let (st, _, _) = call_on(&mut idle, Method::GET, "/v1/keys/payroll", None, &[]).await;
    assert_eq!(st, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        idle.request(Method::GET, "/v1/keys/payroll", &[], None)
            .await
            .is_err(),
        "idle connection closed"
    );
}

/// Take `n` signatures as `client` under `policy` on one connection; how many got 429, with the
/// last 429's detail.
async fn burst(s: &Signet, client: &str, policy: &str, n: usize) -> (usize, String) {
    let mut c = s.connect(client).await;
    let (mut limited, mut detail) = (0, String::new());
    for i in 0..n {
        let key = format!("{client}-{policy}-{i}-{}", rand::random::<u64>());
        let (st, _, p) = call_on(
            &mut c,
            Method::POST,
            "/v1/sign",
            Some(sign_body(policy, key.as_bytes())),
            &[("idempotency-key", key.as_str())],
        )
        .await;
        match st {
            200 => {}
            429 => {
                limited += 1;
                detail = p["detail"].as_str().unwrap_or_default().to_owned();
            }
            other => panic!("unexpected {other}: {p}"),
        }
    }
    (limited, detail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_tenant_rate_limits_span_policies_and_survive_a_reload() {
    let mut s = Signet::init(Init {
        edit: Some(Box::new(|c| {
            format!("{c}\n[limits]\nper_client = {{ per_second = 1, burst = 3 }}\n")
        })),
        ..Default::default()
    });
    s.start();
    // One client over two policies of its tenant: the client's limit counts both.
    let (limited, _) = burst(&s, "payroll-app", "payroll-esign", 2).await;
    assert_eq!(limited, 0);
    let (limited, detail) = burst(&s, "payroll-app", "payroll-bulk", 3).await;
    assert!(
        limited >= 1,
        "the client's third request onwards is limited"
    );
    assert!(detail.contains("rate limit of client"), "{detail}");
    // Another client is not starved by it.
    let (limited, _) = burst(&s, "procurement-app", "procurement-esign", 3).await;
    assert_eq!(limited, 0);
    // A reload keeps the limiter's state: still limited right after it.
    hup(&s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (limited, _) = burst(&s, "payroll-app", "payroll-esign", 1).await;
    assert_eq!(limited, 1, "a reload must not reset the bucket");
    assert!(
        s.metric("signet_sign_requests_total{outcome=\"rate_limited\",policy=\"payroll-esign\",tenant=\"payroll\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_configuration_is_named_before_any_state_is_opened() {
    let mut s = Signet::init(Init::default());
    s.start();
    assert!(s.stop().success());
    // The evidence directory is emptied (the token still anchors the old log) and the server
    // certificate the configuration names is missing: the configuration key is the error, not
    // the anchor, and nothing was opened or created in the evidence directory.
    let audit = s.audit_dir();
    std::fs::remove_dir_all(&audit).unwrap();
    std::fs::create_dir(&audit).unwrap();
    s.edit_config(|c| c.swap("cert = \"tls/server.pem\"", "cert = \"tls/missing.pem\""));
    let err = s.start_refused();
    assert!(err.contains("server.cert"), "{err}");
    assert!(!err.contains("anchor"), "{err}");
    assert_eq!(
        std::fs::read_dir(&audit).unwrap().count(),
        0,
        "nothing opened"
    );
}
