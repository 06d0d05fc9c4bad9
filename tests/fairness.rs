//! One client cannot lock out the others: a victim tenant keeps signing, without errors and
//! without a large latency penalty, while an attacker client (of another tenant, then of the
//! same tenant) floods at full concurrency, holds idle connections and sends slow bodies; the
//! attacker gets precise refusals. Rate limits are all or nothing; a handshake flood from many
//! addresses of one network leaves room for clients from other networks. Against the real
//! binary, a real SoftHSM token and real mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use signet::client::{ClientTls, Connection};
use tokio::io::AsyncWriteExt;

/// What the victim saw: every latency, and every failure.
struct Victim {
    latencies: Vec<Duration>,
    errors: Vec<String>,
}

impl Victim {
    fn quantile(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        let i = ((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1;
        l[i]
    }
}

/// `n` signatures as `tls`'s client under `policy`, one every `period` on one keep-alive
/// connection from `source`, each verified against its certificate. On its own thread and
/// runtime, so the attacker's tasks in the test's runtime do not delay its measurements.
fn victim(
    tls: ClientTls,
    api: SocketAddr,
    source: IpAddr,
    policy: &'static str,
    n: usize,
    period: Duration,
) -> std::thread::JoinHandle<Victim> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut c = Connection::connect_from(&tls, api, source, "localhost")
                .await
                .expect("the victim connects");
            let mut v = Victim {
                latencies: Vec::with_capacity(n),
                errors: Vec::new(),
            };
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..n {
                tick.tick().await;
                let data = format!("victim {policy} {i} {}", rand::random::<u64>());
                let body = sign_body(policy, data.as_bytes()).to_string().into_bytes();
                let t = Instant::now();
                let r = c.request(Method::POST, "/v1/sign", &[], Some(body)).await;
                v.latencies.push(t.elapsed());
                match r {
                    Ok((st, _, b)) if st.as_u16() == 200 => {
                        let a: serde_json::Value = serde_json::from_slice(&b).unwrap();
                        assert!(verifies(
                            a["certificate"].as_str().unwrap(),
                            data.as_bytes(),
                            a["signature"].as_str().unwrap()
                        ));
                    }
                    Ok((st, _, b)) => v
                        .errors
                        .push(format!("{st}: {}", String::from_utf8_lossy(&b))),
                    Err(e) => {
                        v.errors.push(format!("connection: {e}"));
                        break;
                    }
                }
            }
            v
        })
    })
}

/// An attacker client signing as fast as it can on `workers` connections until stopped.
struct Flood {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<BTreeMap<String, usize>>>,
}

fn flood(s: &Signet, client: &str, policy: &'static str, workers: usize) -> Flood {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..workers)
        .map(|w| {
            let (tls, api, stop) = (s.tls(client), s.api, Arc::clone(&stop));
            tokio::spawn(async move {
                let mut seen: BTreeMap<String, usize> = BTreeMap::new();
                let mut conn: Option<Connection> = None;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match Connection::connect(&tls, api, "localhost").await {
                            Ok(c) => conn.insert(c),
                            Err(_) => {
                                *seen.entry("connect refused".into()).or_default() += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                    };
                    i += 1;
                    let body = sign_body(policy, format!("flood {w} {i}").as_bytes());
                    match c
                        .request(
                            Method::POST,
                            "/v1/sign",
                            &[],
                            Some(body.to_string().into_bytes()),
                        )
                        .await
                    {
                        Ok((st, _, _)) if st.as_u16() == 200 => {
                            *seen.entry("200".into()).or_default() += 1;
                        }
                        Ok((st, h, b)) => {
                            let p: serde_json::Value =
                                serde_json::from_slice(&b).unwrap_or_default();
                            let retry = if h.contains_key("retry-after") {
                                ""
                            } else {
                                " without Retry-After"
                            };
                            let what = format!("{} {}{retry}", st.as_u16(), p["type"]);
                            *seen.entry(what).or_default() += 1;
                            // Refusals come back at once; pace the retries a little.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(_) => {
                            *seen.entry("connection closed".into()).or_default() += 1;
                            conn = None;
                        }
                    }
                }
                seen
            })
        })
        .collect();
    Flood { stop, tasks }
}

impl Flood {
    async fn finish(self) -> BTreeMap<String, usize> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = BTreeMap::new();
        for t in self.tasks {
            for (k, n) in t.await.unwrap() {
                *all.entry(k).or_default() += n;
            }
        }
        all
    }
}

/// `n` authenticated connections of `client` (from 127.0.0.1), each sending `head` (nothing
/// if empty) and then nothing more. Returns the sockets still open after a moment (to hold
/// them) and how many the server closed at once.
async fn hold(
    s: &Signet,
    client: &str,
    n: usize,
    head: &[u8],
) -> (
    Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    usize,
) {
    let mut held = Vec::new();
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    for _ in 0..n {
        let Ok(mut t) = s.tls_from(client, local).await else {
            continue;
        };
        if !head.is_empty() {
            let _ = t.write_all(head).await;
            let _ = t.flush().await;
        }
        held.push(t);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut open, mut closed) = (Vec::new(), 0);
    for mut t in held {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(
            Duration::from_millis(20),
            tokio::io::AsyncReadExt::read(&mut t, &mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => open.push(t),
        }
    }
    (open, closed)
}

/// A request announcing a 768 KiB body and sending almost none of it.
const SLOW_HEAD: &[u8] =
    b"POST /v1/sign HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
content-length: 786432\r\n\r\n{\"policy_id\":";

/// The tests of this file measure latency or flood the server: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const VICTIM_REQUESTS: usize = 120;
const VICTIM_PERIOD: Duration = Duration::from_millis(30);

fn report(name: &str, v: &Victim) -> String {
    format!(
        "{name}: n={} p50={:.1}ms p99={:.1}ms errors={}",
        v.latencies.len(),
        v.quantile(0.5).as_secs_f64() * 1e3,
        v.quantile(0.99).as_secs_f64() * 1e3,
        v.errors.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_leaves_other_tenants_and_other_clients_of_its_tenant_served() {
    let _serial = SERIAL.lock().await;
    // Small shares so the attacker reaches every one of them with a few dozen connections.
    let mut s = Signet::init(Init {
        edit: Some(Box::new(|c| {
            c.swap(
                "metrics_listen",
                "max_connections = 256\nmax_connections_per_ip = 256\n\
                 max_connections_per_client = 48\nmax_requests_per_client = 24\n\
                 max_buffered_body_bytes = 8388608\nmetrics_listen",
            ) + "\n[limits]\nmax_queued_per_tenant = 16\nmax_queued_per_client = 8\n"
        })),
        ..Default::default()
    });
    s.add_client("procurement-bulk", &["procurement"]);
    s.start();
    let victim_source: IpAddr = "127.0.1.1".parse().unwrap();
    let run_victim = |s: &Signet| {
        victim(
            s.tls("procurement-app"),
            s.api,
            victim_source,
            "procurement-esign",
            VICTIM_REQUESTS,
            VICTIM_PERIOD,
        )
    };
    // Warm up (first connections, first checkpoint), then the baseline: no attacker.
    let _ = run_victim(&s).join().unwrap();
    let quiet = run_victim(&s).join().unwrap();
    assert!(quiet.errors.is_empty(), "{:?}", quiet.errors);

    // Another tenant's client sends slow bodies (four of 768 KiB against its 2 MiB share of
    // the body budget), floods with 40 connections, and holds idle connections (40 + 4 + 30
    // against its share of 48 connections).
    let (slow, _) = hold(&s, "payroll-app", 4, SLOW_HEAD).await;
    let attack = flood(&s, "payroll-app", "payroll-esign", 40);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle, closed) = hold(&s, "payroll-app", 30, b"").await;
    let other_tenant = tokio::task::spawn_blocking({
        let v = run_victim(&s);
        move || v.join().unwrap()
    })
    .await
    .unwrap();
    let attacker = attack.finish().await;
    drop((slow, idle));

    // The same tenant's other client floods.
    let attack = flood(&s, "procurement-bulk", "procurement-esign", 40);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let same_tenant = tokio::task::spawn_blocking({
        let v = run_victim(&s);
        move || v.join().unwrap()
    })
    .await
    .unwrap();
    let sibling = attack.finish().await;

    let figures = format!(
        "{}\n{}\n{}\nattacker (other tenant): {attacker:?}, {closed} connections closed\n\
         attacker (same tenant): {sibling:?}",
        report("no attacker", &quiet),
        report("attacker of another tenant", &other_tenant),
        report("attacker of the same tenant", &same_tenant),
    );
    println!("{figures}");

    // The victim: no error at all.
    assert!(
        other_tenant.errors.is_empty(),
        "{figures}\n{:?}",
        other_tenant.errors
    );
    assert!(
        same_tenant.errors.is_empty(),
        "{figures}\n{:?}",
        same_tenant.errors
    );
    // The attackers still sign, and every refusal is a precise 429 with Retry-After.
    for (who, seen) in [("other tenant", &attacker), ("same tenant", &sibling)] {
        assert!(
            seen.get("200").copied().unwrap_or(0) > 50,
            "{who}: {figures}"
        );
        for what in seen.keys() {
            // A connection over the client's share is closed after its handshake.
            assert!(
                what == "200"
                    || what == "connect refused"
                    || what == "connection closed"
                    || what == "429 \"urn:signet:problem:client-request-limit\""
                    || what == "429 \"urn:signet:problem:client-queue-full\""
                    || what == "429 \"urn:signet:problem:client-body-limit\"",
                "{who}: unexpected answer {what}: {figures}"
            );
        }
    }
    for limit in ["client-request-limit", "client-queue-full"] {
        assert!(
            attacker.contains_key(&format!("429 \"urn:signet:problem:{limit}\"")),
            "the flood meets the client's {limit}: {figures}"
        );
    }
    // Connections beyond the client's share were closed, counted per client.
    assert!(closed >= 20, "{figures}");
    let m = s.metrics_text().await;
    let refusal = |limit: &str| {
        metric_value(
            &m,
            &format!(
                "signet_client_refusals_total{{client=\"spiffe://signet.dev/payroll-app\",limit=\"{limit}\"}}"
            ),
        )
    };
    assert!(refusal("connections") >= 20.0, "{m}");
    assert!(
        refusal("body_bytes") >= 2.0,
        "two of four slow bodies exceed the share: {m}"
    );
    assert!(refusal("requests") >= 1.0);
    assert!(refusal("client_queue") >= 1.0);
    assert!(
        metric_value(
            &m,
            "signet_tenant_refusals_total{limit=\"client_queue\",tenant=\"payroll\"}"
        ) >= 1.0
    );
    assert!(
        metric_value(
            &m,
            "signet_token_queue_wait_seconds_count{tenant=\"procurement\"}"
        ) >= (3 * VICTIM_REQUESTS) as f64
    );
    assert!(m.contains("signet_token_queue_depth{tenant=\"payroll\"}"));
    // Latency: the bar (p99 within 3x) is measured by the benchmark, in a release build on
    // pinned CPUs. Here, in a debug build sharing two CPUs with the attacker's own client, a
    // generous margin on the p90 (a single stall of the machine does not fail the suite),
    // that still fails if the victim queued behind the flood.
    let base = quiet.quantile(0.9).max(Duration::from_millis(5));
    for v in [&other_tenant, &same_tenant] {
        assert!(
            v.quantile(0.9) < base * 10,
            "victim p90 within 10x of its quiet p90: {figures}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_one_rate_limit_takes_nothing_from_the_others() {
    let _serial = SERIAL.lock().await;
    let mut s = Signet::init(Init {
        edit: Some(Box::new(|c| {
            c + "\n[limits]\nper_client = { per_second = 1 }\nper_tenant = { per_second = 10 }\n"
        })),
        ..Default::default()
    });
    s.add_client("payroll-bulk", &["payroll"]);
    s.start();
    // 150 requests of payroll-app: one passes, 149 are refused by its client limit, which
    // must not drain the tenant's bucket.
    let mut c = s.connect("payroll-app").await;
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for i in 0..150 {
        let body = sign_body("payroll-esign", format!("rate {i}").as_bytes());
        let (st, _, p) = call_on(&mut c, Method::POST, "/v1/sign", Some(body), &[]).await;
        if st == 429 {
            assert_eq!(p["type"], "urn:signet:problem:rate-limited");
            assert!(
                p["detail"].as_str().unwrap().contains("client"),
                "refused by the client's limit: {p}"
            );
        }
        *statuses.entry(st).or_default() += 1;
    }
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 145,
        "{statuses:?}"
    );
    // The second client of the tenant signs at once.
    s.signs("payroll-bulk", "payroll-esign", b"second client")
        .await;
    let refused = s
        .metric("signet_tenant_refusals_total{limit=\"rate_client\",tenant=\"payroll\"}")
        .await;
    assert!(refused >= 145.0, "{refused}");
    assert_eq!(
        s.metric("signet_tenant_refusals_total{limit=\"rate_tenant\",tenant=\"payroll\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_from_many_addresses_of_one_network_leaves_other_networks_served() {
    let _serial = SERIAL.lock().await;
    let mut s = Signet::init(Init::default());
    s.start();
    // 400 sockets that never handshake, spread over 20 addresses of 127.0.0.0/24, 20 each
    // (under max_handshakes_per_ip = 32 per address, but one network): they take at most 32
    // of the 256 handshake slots.
    let mut idle = Vec::new();
    for a in 2..22u8 {
        for _ in 0..20 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::new(IpAddr::from([127, 0, 0, a]), 0))
                .unwrap();
            if let Ok(t) = sock.connect(s.api).await {
                idle.push(t);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A client from another network is served, every time.
    for i in 0..6 {
        let mut c = Connection::connect_from(
            &s.tls("procurement-app"),
            s.api,
            "127.0.1.2".parse().unwrap(),
            "localhost",
        )
        .await
        .expect("a client from another network connects");
        let data = format!("during the flood {i}");
        let (st, _, v) = call_on(
            &mut c,
            Method::POST,
            "/v1/sign",
            Some(sign_body("procurement-esign", data.as_bytes())),
            &[],
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert!(verifies(
            v["certificate"].as_str().unwrap(),
            data.as_bytes(),
            v["signature"].as_str().unwrap()
        ));
    }
    let limited = s
        .metric("signet_http_requests_total{route=\"tls_handshake\",status=\"limited_per_ip\"}")
        .await;
    assert!(limited >= 300.0, "{limited}");
    drop(idle);
}
