//! openssl helpers shared by the tests and the benchmark (which includes this file and
//! `pg.rs` by path).

use std::path::Path;
use std::process::Command;

/// `openssl req` making a new P-256 key `NAME.key` (unencrypted) for `subject`, writing
/// `out`, with `extra` arguments.
fn req_with_new_key(dir: &Path, name: &str, subject: &str, out: &str, extra: &[&str]) {
    let key = format!("{name}.key");
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        out,
        "-subj",
        subject,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

/// A new P-256 key `NAME.key` and a CSR `NAME.csr` for `subject`, in `dir`.
pub fn openssl_key_and_csr(dir: &Path, name: &str, subject: &str) {
    req_with_new_key(dir, name, subject, &format!("{name}.csr"), &["-new"]);
}

/// A self-signed P-256 CA `NAME.pem` with its key `NAME.key`, valid for two days, in `dir`.
pub fn openssl_ca(dir: &Path, name: &str, subject: &str) {
    req_with_new_key(
        dir,
        name,
        subject,
        &format!("{name}.pem"),
        &[
            "-x509",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
}

/// Run openssl in `dir`; panics with its stderr on failure; returns stdout.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A P-256 key `NAME.key` and certificate `NAME.pem` for `subject` with the X.509v3
/// extensions `extensions` (config lines, e.g. `subjectAltName=DNS:localhost`), issued by the
/// CA `ca_pem` with key `ca_key`, valid for two days, in `dir`.
pub fn openssl_issue(
    dir: &Path,
    name: &str,
    subject: &str,
    ca_pem: &Path,
    ca_key: &Path,
    extensions: &str,
) {
    openssl_key_and_csr(dir, name, subject);
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            ca_pem.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A P-256 server key `NAME.key` and certificate `NAME.pem` (subject `/CN=localhost`,
/// subjectAltName `san`, e.g. `DNS:localhost`) issued by the CA `ca_pem` with key `ca_key`,
/// valid for two days, in `dir`.
pub fn openssl_server_cert(dir: &Path, name: &str, ca_pem: &Path, ca_key: &Path, san: &str) {
    openssl_issue(
        dir,
        name,
        "/CN=localhost",
        ca_pem,
        ca_key,
        &format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
    );
}
