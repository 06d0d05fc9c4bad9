//! Test harness: a fresh development setup (own SoftHSM token, PINs, TLS PKI) in a temp dir,
//! the real `signet` binary serving on port 0, real mTLS clients, and helpers to check
//! outcomes (signatures, evidence, metrics).

#![allow(dead_code)]

pub mod openssl;
pub mod pg;

#[allow(unused_imports)]
pub use openssl::{openssl, openssl_ca, openssl_issue, openssl_key_and_csr, openssl_server_cert};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::Method;
use p256::ecdsa::{DerSignature, VerifyingKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use signature::hazmat::PrehashVerifier;

use signet::client::{ClientTls, Connection};

pub const BIN: &str = env!("CARGO_BIN_EXE_signet");

/// Edits of the configuration text that fail loudly: a template change must break a test that
/// edits what is no longer there, not make the edit silently do nothing.
pub trait ConfigEdit {
    /// Replace every occurrence of `from` (which must occur) by `to`.
    fn swap(self, from: &str, to: &str) -> String;
}

impl ConfigEdit for String {
    fn swap(self, from: &str, to: &str) -> String {
        assert!(
            self.contains(from),
            "the configuration holds no `{from}` to edit:\n{self}"
        );
        self.replace(from, to)
    }
}

/// One isolated Signet installation.
pub struct Signet {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    child: Option<Child>,
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    /// The CA's revocation listener (`[pki] listen`), once started with one.
    pub pki: Option<SocketAddr>,
    pub env: Vec<(String, String)>,
    /// Suffix of this process's ready file and log (replicas share one installation).
    pub name: String,
    /// The configuration file's name in `dir` (`signet.toml`).
    pub config_name: String,
    /// A command `signet serve` runs under, e.g. `["taskset", "-c", "0"]` (the benchmark).
    pub wrapper: Vec<String>,
    /// `SIGNET_LOG` for `signet serve` (`info`).
    pub log_level: &'static str,
}

pub struct Init {
    pub manual_issuer: bool,
    pub keys: bool,
    /// Lines appended to / replacing parts of signet.toml before the first start.
    pub edit: Option<Box<dyn Fn(String) -> String>>,
    /// Shorter intervals and deadlines so tests run fast (checkpoints every 300 ms, token
    /// health every 200 ms); off for the benchmark, which measures the defaults.
    pub fast: bool,
}

impl Default for Init {
    fn default() -> Self {
        Self {
            manual_issuer: false,
            keys: true,
            edit: None,
            fast: true,
        }
    }
}

impl Signet {
    /// Create a development setup with listeners on port 0.
    pub fn init(opts: Init) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("signet");
        let mut args = vec![
            "dev".to_owned(),
            "init".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        if opts.manual_issuer {
            args.push("--manual-issuer".into());
        }
        if let Some(module) = token_module() {
            args.push("--module".into());
            args.push(module.display().to_string());
        }
        if !opts.keys {
            args.push("--no-keys".into());
        }
        let out = Command::new(BIN)
            .args(&args)
            .env("SIGNET_LOG", "warn")
            .output()
            .expect("run signet dev init");
        assert!(
            out.status.success(),
            "dev init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if on_kryoptic() {
            assert!(
                dir.join("tokens/kryoptic.sql").exists(),
                "SIGNET_TEST_TOKEN=kryoptic, but the token is not kryoptic's"
            );
        }
        let s = Self {
            tmp,
            dir,
            child: None,
            api: "127.0.0.1:0".parse().unwrap(),
            metrics: "127.0.0.1:0".parse().unwrap(),
            pki: None,
            env: Vec::new(),
            name: String::new(),
            config_name: "signet.toml".into(),
            wrapper: Vec::new(),
            log_level: "info",
        };
        // Tests run faster with short intervals.
        if opts.fast {
            s.edit_config(|c| {
                c.swap(
                    "checkpoint_interval = \"5s\"",
                    "checkpoint_interval = \"300ms\"",
                )
                .swap(
                    "sessions = 2",
                    "sessions = 2\nhealth_interval = \"200ms\"\ncall_timeout = \"2s\"",
                )
            });
        }
        if let Some(edit) = &opts.edit {
            s.edit_config(edit);
        }
        s
    }

    /// Another process of this installation (same configuration, token and storage): a
    /// replica. Start it with [`Signet::start`].
    pub fn replica(&self, name: &str) -> Signet {
        Signet {
            tmp: tempfile::tempdir().expect("tempdir"),
            dir: self.dir.clone(),
            child: None,
            api: "127.0.0.1:0".parse().unwrap(),
            metrics: "127.0.0.1:0".parse().unwrap(),
            pki: None,
            env: self.env.clone(),
            name: format!("-{name}"),
            config_name: self.config_name.clone(),
            wrapper: self.wrapper.clone(),
            log_level: self.log_level,
        }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join(&self.config_name)
    }

    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(self.config()).expect("read config");
        std::fs::write(self.config(), f(text)).expect("write config");
    }

    /// Start `signet serve` and wait until it accepts requests.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let ready = self.dir.join(format!("ready{}.json", self.name));
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("serve{}.log", self.name)))
            .expect("log file");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args([
            "--config",
            &self.config().display().to_string(),
            "serve",
            "--ready-file",
            &ready.display().to_string(),
        ])
        .env("SIGNET_LOG", self.log_level)
        .stdout(Stdio::null())
        .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn signet serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                self.api = v["api"].as_str().unwrap().parse().unwrap();
                self.metrics = v["metrics"].as_str().unwrap().parse().unwrap();
                self.pki = v["pki"].as_str().map(|a| a.parse().unwrap());
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("signet serve exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "signet did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Point the CLI's [cli] section at the bound port.
        let port = self.api.port();
        self.edit_config(|c| {
            let mut out = String::new();
            for line in c.lines() {
                if line.starts_with("url = \"https://localhost:") {
                    out.push_str(&format!("url = \"https://localhost:{port}\"\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            out
        });
    }

    /// Start `signet serve` expecting it to refuse: returns its stderr once it exited non-zero.
    pub fn start_refused(&mut self) -> String {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(BIN);
        cmd.args(["--config", &self.config().display().to_string(), "serve"])
            .env("SIGNET_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn signet serve");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert!(!status.success(), "signet serve exited 0:\n{err}");
                return err;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("signet serve started although it should have refused");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "signet did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (a crash).
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Wait for the process to exit on its own (e.g. an abort hook); returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "signet did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("serve{}.log", self.name)))
            .unwrap_or_default()
    }

    /// Run the CLI against this installation.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(self.config())
            .args(args)
            .env("SIGNET_LOG", "warn");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("run signet")
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "signet {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// TLS settings for a development client (`payroll-app`, `admin`, ...).
    pub fn tls(&self, client: &str) -> ClientTls {
        let d = self.dir.join("tls");
        ClientTls::new(
            &d.join("ca.pem"),
            Some(&d.join(format!("clients/{client}.pem"))),
            Some(&d.join(format!("clients/{client}.key"))),
        )
        .expect("client tls")
    }

    /// Add a client `name` (identity `spiffe://signet.dev/NAME`, role `sign`, these tenants):
    /// its certificate from the development CA beside the others, and its `[[clients]]` entry.
    /// Before [`Signet::start`], or followed by a reload.
    pub fn add_client(&self, name: &str, tenants: &[&str]) {
        signet::dev::issue_client_from_dir(&self.dir, name).expect("issue a client certificate");
        let tenants: Vec<String> = tenants.iter().map(|t| format!("\"{t}\"")).collect();
        self.edit_config(|c| {
            format!(
                "{c}\n[[clients]]\nidentity = \"spiffe://signet.dev/{name}\"\ntenants = [{}]\nroles = [\"sign\"]\n",
                tenants.join(", ")
            )
        });
    }

    /// A raw TLS connection as `client` from `source` (a loopback address such as 127.0.1.2,
    /// for the per-network limits).
    pub async fn tls_from(
        &self,
        client: &str,
        source: std::net::IpAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(source, 0))?;
        let tcp = sock.connect(self.api).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(self.tls(client).rustls_config())
            .connect(name, tcp)
            .await
    }

    pub async fn connect(&self, client: &str) -> Connection {
        Connection::connect(&self.tls(client), self.api, "localhost")
            .await
            .expect("connect")
    }

    /// One request on a fresh connection; returns status, headers, JSON body.
    pub async fn call(
        &self,
        client: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, hyper::HeaderMap, Value) {
        let mut c = self.connect(client).await;
        call_on(&mut c, method, path, body, headers).await
    }

    /// `GET path` as `client` on a fresh connection; status and JSON body.
    pub async fn get(&self, client: &str, path: &str) -> (u16, Value) {
        let (st, _, v) = self.call(client, Method::GET, path, None, &[]).await;
        (st, v)
    }

    /// `POST /v1/sign/batch` with `items` as `client`; status and JSON body.
    pub async fn sign_batch(&self, client: &str, items: Vec<Value>) -> (u16, Value) {
        let body = serde_json::json!({ "items": items });
        let (s, _, v) = self
            .call(client, Method::POST, "/v1/sign/batch", Some(body), &[])
            .await;
        (s, v)
    }

    pub async fn sign(&self, client: &str, body: Value) -> (u16, Value) {
        let (s, _, v) = self
            .call(client, Method::POST, "/v1/sign", Some(body), &[])
            .await;
        (s, v)
    }

    /// Sign `data` as `client` under `policy`; asserts 200 and that the signature verifies with
    /// the returned certificate. The response.
    pub async fn signs(&self, client: &str, policy: &str, data: &[u8]) -> Value {
        let (status, v) = self.sign(client, sign_body(policy, data)).await;
        assert_eq!(status, 200, "{v}");
        assert!(
            verifies(
                v["certificate"].as_str().unwrap(),
                data,
                v["signature"].as_str().unwrap()
            ),
            "the signature verifies with the returned certificate"
        );
        v
    }

    /// The `tree_size` of every line of the audit directory's `file` (`checkpoints.jsonl`,
    /// `timestamps.jsonl`), in order.
    pub fn tree_sizes(&self, file: &str) -> Vec<u64> {
        std::fs::read_to_string(self.audit_dir().join(file))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["tree_size"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    /// GET /metrics as text.
    pub async fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics").await.1
    }

    /// The value of one metric sample (exact name with labels as rendered), or 0.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics_text().await, sample)
    }

    pub async fn readyz(&self) -> u16 {
        http_get(self.metrics, "/readyz").await.0
    }

    /// Wait until `cond` holds, polling.
    pub async fn eventually<F, Fut>(&self, what: &str, timeout: Duration, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        while !cond().await {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- log ---\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The latest checkpoint as served (`GET /v1/audit/checkpoint`), once it covers
    /// `min_size` entries.
    pub async fn checkpoint_covering(&self, min_size: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, _, v) = self
                .call("auditor", Method::GET, "/v1/audit/checkpoint", None, &[])
                .await;
            if v["tree_size"].as_u64().unwrap_or(0) >= min_size && v["checkpoint"].is_string() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no checkpoint covering {min_size} entries: {v}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.dir.join("audit")
    }

    /// Every evidence entry on disk, parsed.
    pub fn entries(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_dir().join("entries.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("entry is JSON"))
            .collect()
    }
}

impl Drop for Signet {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn call_on(
    c: &mut Connection,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, Value) {
    let (status, h, bytes) = c
        .request(
            method,
            path,
            headers,
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
        .expect("request");
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status.as_u16(), h, v)
}

/// Plain HTTP GET (metrics listener).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, dechunk(&body))
}

/// One plain-HTTP request (`method path`, optional body); status, headers and raw body bytes.
pub async fn http_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some((ct, b)) = body {
        req.push_str(&format!(
            "Content-Type: {ct}\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some((_, b)) = body {
        bytes.extend_from_slice(b);
    }
    s.write_all(&bytes).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, buf[split + 4..].to_vec())
}

/// A port free on the loopback now (for settings that must name it before the start).
/// A port free on 127.0.0.1 for a listener the test configures by number (`[pki] listen`,
/// PostgreSQL). Chosen below the kernel's ephemeral range, where the port-0 listeners and the
/// outgoing connections of the tests running in parallel take theirs: a port handed out by
/// binding port 0 could be taken again by one of those before the server binds it.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 11_000 {
        let (from, to) = (10_000u32, u32::from(low) - 1);
        for _ in 0..200 {
            let port = (from + rand::random::<u32>() % (to - from)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn dechunk(body: &str) -> String {
    // Bodies from axum's plain listener may be chunked; strip chunk-size lines if present.
    let lines: Vec<&str> = body.split("\r\n").collect();
    if lines.len() > 1 && lines[0].chars().all(|c| c.is_ascii_hexdigit()) && !lines[0].is_empty() {
        let mut out = String::new();
        let mut i = 0;
        while i + 1 < lines.len() {
            let n = usize::from_str_radix(lines[i], 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(lines[i + 1]);
            i += 2;
        }
        out
    } else {
        body.to_owned()
    }
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

pub fn digest_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn sign_body(policy: &str, data: &[u8]) -> Value {
    serde_json::json!({"policy_id": policy, "digest": digest_hex(data), "digest_algorithm": "sha256"})
}

/// The public key of a PEM certificate.
pub fn cert_key(pem: &str) -> VerifyingKey {
    let der = signet::pki::parse_pem_or_der(pem.as_bytes()).expect("certificate PEM");
    signet::pki::CertInfo::parse(&der)
        .expect("certificate")
        .public_key
        .expect("P-256 key")
}

/// Does `sig_b64` (DER) verify over SHA-256(`data`) with the certificate's key?
pub fn verifies(cert_pem: &str, data: &[u8], sig_b64: &str) -> bool {
    let der = B64.decode(sig_b64).expect("base64 signature");
    let sig = DerSignature::from_bytes(&der).expect("DER signature");
    cert_key(cert_pem)
        .verify_prehash(&Sha256::digest(data), &sig)
        .is_ok()
}

/// Verify a signature with the openssl command line, as a relying party would.
pub fn openssl_verifies(dir: &Path, cert_pem: &str, data: &[u8], sig_b64: &str) -> bool {
    let work = dir.join(format!("openssl-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("cert.pem"), cert_pem).unwrap();
    std::fs::write(work.join("data"), data).unwrap();
    std::fs::write(work.join("sig.der"), B64.decode(sig_b64).unwrap()).unwrap();
    let pubkey = Command::new("openssl")
        .args(["x509", "-in"])
        .arg(work.join("cert.pem"))
        .args(["-pubkey", "-noout"])
        .output()
        .expect("openssl");
    std::fs::write(work.join("pub.pem"), &pubkey.stdout).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(work.join("pub.pem"))
        .arg("-signature")
        .arg(work.join("sig.der"))
        .arg(work.join("data"))
        .output()
        .expect("openssl dgst");
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK")
}

/// An independent RFC 6962 implementation (recursive, from the RFC text) for cross-checks.
pub mod rfc6962 {
    use sha2::{Digest, Sha256};

    pub fn leaf(data: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([0]);
        h.update(data);
        h.finalize().into()
    }

    fn node(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([1]);
        h.update(l);
        h.update(r);
        h.finalize().into()
    }

    fn k(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    pub fn mth(leaves: &[[u8; 32]]) -> [u8; 32] {
        match leaves.len() {
            0 => Sha256::digest([]).into(),
            1 => leaves[0],
            n => node(&mth(&leaves[..k(n)]), &mth(&leaves[k(n)..])),
        }
    }

    /// PATH(m, D[n]) from RFC 6962 §2.1.1.
    pub fn path(m: usize, leaves: &[[u8; 32]]) -> Vec<[u8; 32]> {
        let n = leaves.len();
        if n <= 1 {
            return vec![];
        }
        let k = k(n);
        if m < k {
            let mut p = path(m, &leaves[..k]);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = path(m - k, &leaves[k..]);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    /// PROOF(m, D[n]) from RFC 6962 §2.1.2.
    pub fn consistency(m: usize, leaves: &[[u8; 32]]) -> Vec<[u8; 32]> {
        fn sub(m: usize, d: &[[u8; 32]], b: bool) -> Vec<[u8; 32]> {
            let n = d.len();
            if m == n {
                return if b { vec![] } else { vec![mth(d)] };
            }
            let k = k(n);
            if m <= k {
                let mut p = sub(m, &d[..k], b);
                p.push(mth(&d[k..]));
                p
            } else {
                let mut p = sub(m - k, &d[k..], false);
                p.push(mth(&d[..k]));
                p
            }
        }
        sub(m, leaves, true)
    }
}

/// Continuous signing as `payroll-app` on keep-alive connections until [`Load::finish`].
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<WorkerResult>>,
}

#[derive(Default)]
struct WorkerResult {
    ok: Vec<Value>,
    failed: Vec<String>,
    keys: Vec<String>,
}

/// What a load run saw. Every acknowledged signature was verified against its certificate.
#[derive(Default)]
pub struct LoadResult {
    /// Acknowledged (200) responses.
    pub ok: Vec<Value>,
    /// Non-200 answers and connection errors (a worker stops at its first connection error).
    pub failed: Vec<String>,
    /// Per worker, the key IDs that signed, in order, without repeats.
    pub keys_per_worker: Vec<Vec<String>>,
}

impl Signet {
    pub fn load(&self, workers: usize) -> Load {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..workers)
            .map(|w| {
                let (tls, api, stop) = (
                    self.tls("payroll-app"),
                    self.api,
                    std::sync::Arc::clone(&stop),
                );
                tokio::spawn(async move {
                    let mut r = WorkerResult::default();
                    let Ok(mut c) = Connection::connect(&tls, api, "localhost").await else {
                        r.failed.push("connect".into());
                        return r;
                    };
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let data = format!("w{w}-{i}");
                        let mut body = sign_body("payroll-esign", data.as_bytes());
                        body["transaction_id"] = serde_json::json!(data);
                        match c
                            .request(
                                Method::POST,
                                "/v1/sign",
                                &[],
                                Some(body.to_string().into_bytes()),
                            )
                            .await
                        {
                            Ok((st, _, b)) if st.as_u16() == 200 => {
                                let v: Value = serde_json::from_slice(&b).unwrap();
                                assert!(verifies(
                                    v["certificate"].as_str().unwrap(),
                                    data.as_bytes(),
                                    v["signature"].as_str().unwrap()
                                ));
                                let k = v["key_id"].as_str().unwrap().to_owned();
                                if r.keys.last() != Some(&k) {
                                    r.keys.push(k);
                                }
                                r.ok.push(v);
                            }
                            Ok((st, _, b)) => r
                                .failed
                                .push(format!("{st}: {}", String::from_utf8_lossy(&b))),
                            Err(e) => {
                                r.failed.push(format!("connection: {e}"));
                                break;
                            }
                        }
                        i += 1;
                    }
                    r
                })
            })
            .collect();
        Load { stop, handles }
    }

    /// `signet --json audit verify` on this installation's log; panics unless the verdict is
    /// `verified`. With `key`, the directory with that key (`audit verify DIR --key KEY`);
    /// without, the configured log with the token's log key and anchor (`--config`).
    pub fn audit_verify(&self, key: Option<&Path>) -> Value {
        match key {
            Some(k) => audit_verify_dir(&self.audit_dir(), k),
            None => {
                let out = self.cli(&["--json", "audit", "verify"]);
                verified(out)
            }
        }
    }
}

/// `signet --json audit verify DIR --key KEY`; panics unless the verdict is `verified`.
pub fn audit_verify_dir(dir: &Path, key: &Path) -> Value {
    let out = Command::new(BIN)
        .args(["--json", "audit", "verify"])
        .arg(dir)
        .arg("--key")
        .arg(key)
        .output()
        .unwrap();
    verified(out)
}

/// The JSON a verifier printed; panics unless it exited 0 with verdict `verified`.
fn verified(out: Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "audit verify failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(text.lines().next().unwrap_or_default()).unwrap();
    assert_eq!(v["verdict"], "verified", "{v}");
    v
}

impl Load {
    pub async fn finish(self) -> LoadResult {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut out = LoadResult::default();
        for h in self.handles {
            let r = h.await.unwrap();
            out.ok.extend(r.ok);
            out.failed.extend(r.failed);
            out.keys_per_worker.push(r.keys);
        }
        out
    }
}

/// Run `cmd`; panics with its stderr unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether a command succeeded, and its stdout and stderr together.
pub fn outcome(out: Output) -> (bool, String) {
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The token the tests run against, chosen by one switch: `SIGNET_TEST_TOKEN=kryoptic` runs
/// them on kryoptic (built by `softhsm/kryoptic.sh` into `target/kryoptic/`; another path in
/// `SIGNET_TEST_MODULE`), anything else or nothing on SoftHSM. None: SoftHSM, the default.
pub fn token_module() -> Option<PathBuf> {
    match std::env::var("SIGNET_TEST_TOKEN").ok().as_deref() {
        Some("kryoptic") => Some(std::env::var_os("SIGNET_TEST_MODULE").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kryoptic/libkryoptic_pkcs11.so"),
            PathBuf::from,
        )),
        _ => None,
    }
}

/// True when the tests run on kryoptic (see [`token_module`]).
pub fn on_kryoptic() -> bool {
    token_module().is_some()
}

impl Signet {
    /// The PKCS#11 module and its environment variable for this installation's token.
    pub fn module_env(&self) -> (PathBuf, &'static str, PathBuf) {
        match token_module() {
            Some(m) => (m, "KRYOPTIC_CONF", self.dir.join("tokens/kryoptic.sql")),
            None => (
                PathBuf::from(signet::dev::SOFTHSM_MODULE),
                "SOFTHSM2_CONF",
                self.dir.join("softhsm2.conf"),
            ),
        }
    }

    /// Run pkcs11-tool (OpenSC) logged in to this installation's token; returns stdout.
    pub fn pkcs11_tool(&self, args: &[&str]) -> String {
        let pin = std::fs::read_to_string(self.dir.join("secrets/user.pin")).unwrap();
        let (module, var, value) = self.module_env();
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&module)
            .args(["--token-label", signet::dev::TOKEN_LABEL])
            .args(["--login", "--pin", pin.trim()])
            .args(args)
            .env(var, value)
            .output()
            .expect("pkcs11-tool (Debian package opensc)");
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Signet {
    /// Inject a token fault through the test-hooks admin endpoint (`stall_next_call`,
    /// `finalize_library`); panics unless the service accepted it.
    pub async fn inject_fault(&self, fault: Value) {
        let (status, _, body) = self
            .call(
                "admin",
                Method::POST,
                "/v1/admin/insecure-test-fault",
                Some(fault),
                &[],
            )
            .await;
        assert_eq!(status, 200, "fault injection refused: {body}");
    }

    /// Wait until a signing request as `payroll-app` succeeds again.
    pub async fn eventually_signs(&self, what: &str, timeout: Duration) {
        self.eventually(what, timeout, || async {
            self.sign("payroll-app", sign_body("payroll-esign", what.as_bytes()))
                .await
                .0
                == 200
        })
        .await;
    }
}

/// Hashes as the API renders them (base64), for comparing proofs.
pub fn b64_hashes(hashes: &[[u8; 32]]) -> Vec<String> {
    hashes.iter().map(|h| B64.encode(h)).collect()
}

/// A JSON array of strings.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|h| h.as_str().expect("a string").to_owned())
        .collect()
}

/// Tiles fetched from the service, served to an independent implementation (the `tlog_tiles`
/// crate, a port of Go's sumdb/tlog) by their C2SP path.
pub struct FetchedTiles(pub std::collections::HashMap<String, Vec<u8>>);

impl tlog_tiles::TileReader for FetchedTiles {
    fn height(&self) -> u8 {
        8
    }
    fn read_tiles(&self, tiles: &[tlog_tiles::Tile]) -> Result<Vec<Vec<u8>>, tlog_tiles::Error> {
        tiles
            .iter()
            .map(|t| {
                // Its paths carry the height (`tile/8/L/N`); C2SP's do not (`tile/L/N`).
                let path = t.path().replacen("tile/8/", "", 1);
                self.0
                    .get(&path)
                    .cloned()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
    fn save_tiles(&self, _: &[tlog_tiles::Tile], _: &[Vec<u8>]) {}
}

pub async fn get_bytes(s: &Signet, client: &str, path: &str) -> (u16, Vec<u8>) {
    let mut c = s.connect(client).await;
    let (st, _, b) = c.request(Method::GET, path, &[], None).await.unwrap();
    (st.as_u16(), b.to_vec())
}

/// A development installation (made with the file backend, as `signet dev init` does), moved
/// into database `db` with `signet storage migrate`.
pub fn init_postgres(pg: &pg::Postgres, db: &str) -> Signet {
    let url = pg.database(db);
    let s = Signet::init(Init {
        edit: Some(Box::new(move |c| pg::with_postgres(c, &url))),
        ..Default::default()
    });
    let out = Command::new(BIN)
        .arg("--config")
        .arg(s.config())
        .args(["storage", "migrate", "--from"])
        .arg(s.audit_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "storage migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}
