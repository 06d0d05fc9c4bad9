//! Deployment artefacts are checked with the tools operators use: promtool for the alert
//! rules (syntax and unit tests).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is needed (softhsm/setup.sh --test installs it): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let out = run(&dir, "promtool", &["check", "rules", "signet-alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run(
        &dir,
        "promtool",
        &["test", "rules", "signet-alerts.test.yml"],
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_cover_what_the_spec_requires() {
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/signet-alerts.yml"),
    )
    .unwrap();
    for needed in [
        "< 14 * 86400",
        "< 3 * 86400",
        "SignetRenewalDueNotStarted",
        "SignetRotationFailing",
        "SignetRotationOverdue",
        "SignetTokenUnavailable",
        "SignetNotReady",
        "SignetCertificateUnusable",
    ] {
        assert!(rules.contains(needed), "alert rules lack {needed}");
    }
    // Every metric the rules use is one Signet exports.
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"))
        .unwrap();
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("signet_") && !word.ends_with("_total") {
            assert!(
                src.contains(&format!("\"{word}\"")),
                "alert rules use unknown metric {word}"
            );
        } else if word.starts_with("signet_") {
            assert!(
                src.contains(&format!("\"{word}\"")),
                "alert rules use unknown counter {word}"
            );
        }
    }
}
