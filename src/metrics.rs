//! Every Prometheus collector Signet exports, in one struct, on one registry.
//!
//! Labels come from configuration or fixed enums, never from request content: no digests,
//! signer details or idempotency keys here; a `client` label is a configured `[[clients]]`
//! identity, never one a caller made up.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// What each collector kind is.
macro_rules! collector_type {
    (counter) => {
        IntCounter
    };
    (counter_vec) => {
        IntCounterVec
    };
    (gauge) => {
        IntGauge
    };
    (gauge_vec) => {
        IntGaugeVec
    };
    (histogram) => {
        Histogram
    };
    (histogram_vec) => {
        HistogramVec
    };
}

/// Declare the collectors: `field: kind(name, help[, labels or buckets]);`.
macro_rules! collectors {
    ($($field:ident: $kind:ident($($arg:expr),+);)+) => {
        pub struct Metrics {
            registry: Registry,
            $(pub $field: collector_type!($kind),)+
        }

        impl Metrics {
            fn register_all(f: &Factory) -> Self {
                Self {
                    registry: f.registry.clone(),
                    $($field: f.$kind($($arg),+),)+
                }
            }
        }
    };
}

/// Creates collectors on one registry. Names, labels and buckets are static and valid, and
/// each name is registered once (the table above): creation and registration cannot fail.
struct Factory {
    registry: Registry,
}

#[allow(clippy::expect_used)] // static, valid, unique names, labels and buckets
impl Factory {
    fn register<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.registry
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help).expect("valid metric"))
    }
    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).expect("valid metric"))
    }
    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Vec<f64>,
    ) -> HistogramVec {
        self.register(
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric"),
        )
    }
    fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        self.register(
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric"),
        )
    }
}

/// Latency buckets, seconds.
fn latency() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ]
}

// Every collector: its field, kind, name and help (and labels or buckets). Expands to the
// struct and its registration.
collectors! {
    sign_requests: counter_vec("signet_sign_requests_total", "Signing requests by tenant, policy and outcome.", &["tenant", "policy", "outcome"]);
    sign_duration: histogram("signet_sign_duration_seconds", "Time to answer one signing request or batch item, evidence included.", latency());
    http_requests: counter_vec("signet_http_requests_total", "API responses by matched route and status code.", &["route", "status"]);
    hsm_sessions_in_use: gauge("signet_hsm_sessions_in_use", "PKCS#11 sessions executing a call now.");
    hsm_sessions: gauge("signet_hsm_sessions", "PKCS#11 worker sessions configured.");
    client_refusals: counter_vec("signet_client_refusals_total", "Requests and connections of a client refused by one of its shares (connections, requests in flight, body bytes, signing queue), by client and limit.", &["client", "limit"]);
    tenant_refusals: counter_vec("signet_tenant_refusals_total", "Signing requests of a tenant refused by one of its limits, by tenant and limit (tenant_queue, client_queue: its share of the token's queue; rate_policy, rate_tenant, rate_client: a rate limit).", &["tenant", "limit"]);
    token_queue_wait: histogram_vec("signet_token_queue_wait_seconds", "Time signing requests waited for their turn at the token (fair queue), by tenant.", &["tenant"], latency());
    token_queue_depth: gauge_vec("signet_token_queue_depth", "Signing requests waiting for their turn at the token now, by tenant.", &["tenant"]);
    hsm_errors: counter_vec("signet_hsm_errors_total", "PKCS#11 failures by kind.", &["kind"]);
    hsm_ready: gauge("signet_hsm_ready", "1 when the token is logged in and answering.");
    hsm_recoveries: counter_vec("signet_hsm_recoveries_total", "Token recoveries by method (relogin, reinitialize) and outcome.", &["method", "outcome"]);
    tsa_requests: counter_vec("signet_tsa_requests_total", "RFC 3161 timestamp requests for checkpoints, by outcome: ok (verified and stored), error (no usable answer: unreachable, HTTP error, timeout), rejected (an answer that failed verification; never stored).", &["outcome"]);
    tsa_rejections: counter_vec("signet_tsa_rejections_total", "TSA answers refused by verification, by reason (untrusted, bad_signature, wrong_imprint, wrong_nonce, too_large, malformed, ...).", &["reason"]);
    audit_timestamps_pending: gauge("signet_audit_timestamps_pending", "Signed checkpoints still waiting for their RFC 3161 timestamp.");
    idempotency_evictions: counter("signet_idempotency_evictions_total", "Idempotency records forgotten before their retention ended because audit.idempotency_max_records was reached.");
    hsm_queue_rejections: counter("signet_hsm_queue_rejections_total", "Calls refused because the queue in front of the session pool was full.");
    audit_entries: counter_vec("signet_audit_entries_total", "Evidence entries made durable, by event type.", &["event"]);
    audit_fsync_duration: histogram("signet_audit_fsync_duration_seconds", "Duration of each evidence log fdatasync (one per group commit).", latency());
    audit_group_size: histogram("signet_audit_group_commit_entries", "Entries made durable by one group commit.", vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0]);
    audit_tree_size: gauge("signet_audit_tree_size", "Entries in the evidence log.");
    audit_checkpoint_size: gauge("signet_audit_checkpoint_tree_size", "Tree size of the latest signed checkpoint.");
    audit_last_checkpoint: gauge("signet_audit_last_checkpoint_timestamp_seconds", "Unix time of the latest signed checkpoint.");
    audit_write_errors: counter("signet_audit_write_errors_total", "Failed evidence log appends (write or fsync).");
    audit_writable: gauge("signet_audit_writable", "1 when the evidence log accepts appends.");
    storage_up: gauge("signet_storage_up", "1 when the storage backend answers (always 1 for the file backend).");
    storage_commit_duration: histogram("signet_storage_commit_duration_seconds", "Duration of each sequencing commit of evidence entries (one per group).", latency());
    storage_leader: gauge("signet_storage_checkpoint_leader", "1 on the replica that currently signs checkpoints (always 1 with the file backend).");
    certificate_not_after: gauge_vec("signet_certificate_not_after_timestamp_seconds", "notAfter of each key version's certificate (Unix time).", &["tenant", "key_id", "state"]);
    certificate_not_before: gauge_vec("signet_certificate_not_before_timestamp_seconds", "notBefore of each key version's certificate (Unix time).", &["tenant", "key_id", "state"]);
    certificate_renewal_due: gauge_vec("signet_certificate_renewal_due", "1 when the active certificate is within rotation.renew_before of notAfter.", &["tenant", "key_id", "state"]);
    certificate_unusable: gauge_vec("signet_certificate_unusable", "1 when the active certificate may not sign (outside validity or below min_remaining_validity).", &["tenant", "key_id", "state"]);
    rotation_state: gauge_vec("signet_rotation_state", "Rotation workflow state per tenant: 1 for the current state, 0 for the others.", &["tenant", "state"]);
    revocations: counter_vec("signet_key_revocations_total", "Key versions revoked (signet keys revoke), by reason.", &["reason"]);
    revoked_versions: gauge_vec("signet_revoked_key_versions", "Key versions in state revoked, by tenant.", &["tenant"]);
    crl_this_update: gauge("signet_crl_this_update_timestamp_seconds", "thisUpdate of the CRL the internal CA serves now (Unix time; 0 before the first).");
    crl_next_update: gauge("signet_crl_next_update_timestamp_seconds", "nextUpdate of the CRL the internal CA serves now (Unix time; 0 before the first). Re-signed at half its validity and after every revocation.");
    crl_entries: gauge("signet_crl_revoked_certificates", "Certificates listed on the CRL the internal CA serves now.");
    crl_sign_errors: counter("signet_crl_sign_errors_total", "Failed attempts to sign the CRL (retried every few seconds).");
    ocsp_responses: counter_vec("signet_ocsp_responses_total", "OCSP answers of the internal CA, by status: good, revoked, unknown (signed); unauthorized, malformed, unavailable (unsigned errors).", &["status"]);
    evidence_erased: counter_vec("signet_evidence_erased_total", "Signer-evidence records erased, by cause: retention (the sweep) or subject (signet evidence erase).", &["cause"]);
    retention_sweep_lag: gauge("signet_retention_sweep_lag_seconds", "How long the oldest record past its retention (and not on legal hold) has waited to be erased, as of the last sweep; 0 when none waits.");
    retention_last_sweep: gauge("signet_retention_last_sweep_timestamp_seconds", "When the retention sweep last completed (Unix time; 0 before the first). Only the leader sweeps.");
    retention_sweep_errors: counter("signet_retention_sweep_errors_total", "Retention sweeps that failed (retried at the next interval).");
    legal_holds: gauge("signet_legal_holds", "Legal holds in force.");
    vault_records: gauge_vec("signet_vault_records", "Signer-evidence records in the vault, by state: sealed or erased.", &["state"]);
    vault_key_generation: gauge("signet_vault_key_generation", "The generation of the vault's key-encryption key new records are sealed under.");
    vault_key_rotated: gauge("signet_vault_key_rotated_timestamp_seconds", "When the vault's key-encryption key was last rotated (or created), Unix time.");
    rotations: counter_vec("signet_rotations_total", "Rotation outcomes: started, completed, failed_attempt, rolled_back, retired.", &["outcome"]);
    config_reloads: counter_vec("signet_config_reloads_total", "Configuration reloads by outcome.", &["outcome"]);
    config_last_reload_success: gauge("signet_config_last_reload_successful", "1 if the last configuration reload succeeded (or none was tried).");
    ready: gauge("signet_ready", "1 when /readyz answers 200.");
}

/// Every value `signet_rotation_state{state}` can take; exactly one is 1 per tenant.
pub const ROTATION_STATES: &[&str] = &[
    "idle",
    "in_progress",
    "awaiting_certificate",
    "retrying",
    "overdue",
];

impl Metrics {
    pub fn new() -> Self {
        let f = Factory {
            registry: Registry::new(),
        };
        f.gauge_vec(
            "signet_build_info",
            "Build information; always 1.",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        Self::register_all(&f).initialise()
    }

    /// Create the series with known label values at 0, so dashboards and alerts see them
    /// before the first event.
    fn initialise(self) -> Self {
        for kind in [
            "session",
            "device",
            "request",
            "timeout",
            "busy",
            "unavailable",
            "not_found",
            "stuck_worker",
            "wrong_key",
        ] {
            self.hsm_errors.with_label_values(&[kind]);
        }
        for outcome in ["ok", "error", "rejected"] {
            self.tsa_requests.with_label_values(&[outcome]);
        }
        for outcome in [
            "started",
            "completed",
            "failed_attempt",
            "rolled_back",
            "aborted",
            "retired",
        ] {
            self.rotations.with_label_values(&[outcome]);
        }
        for reason in crate::keys::RevocationReason::ALL {
            self.revocations.with_label_values(&[reason.as_str()]);
        }
        for status in [
            "good",
            "revoked",
            "unknown",
            "unauthorized",
            "malformed",
            "unavailable",
        ] {
            self.ocsp_responses.with_label_values(&[status]);
        }
        for outcome in ["ok", "rejected"] {
            self.config_reloads.with_label_values(&[outcome]);
        }
        for (method, outcome) in [
            ("relogin", "ok"),
            ("relogin", "failed"),
            ("reinitialize", "ok"),
            ("reinitialize", "failed"),
        ] {
            self.hsm_recoveries.with_label_values(&[method, outcome]);
        }
        self.config_last_reload_success.set(1);
        self
    }

    /// Prometheus text exposition of every collector.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding to a Vec only fails on invalid metric families, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Count a PKCS#11 failure.
    pub fn hsm_error(&self, kind: &str) {
        self.hsm_errors.with_label_values(&[kind]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_spec_names() {
        let m = Metrics::new();
        m.sign_requests
            .with_label_values(&["payroll", "p", "ok"])
            .inc();
        m.sign_duration.observe(0.001);
        m.hsm_error("session");
        let text = m.render();
        for name in [
            "signet_sign_requests_total{outcome=\"ok\",policy=\"p\",tenant=\"payroll\"} 1",
            "signet_sign_duration_seconds_bucket",
            "signet_hsm_sessions_in_use 0",
            "signet_hsm_errors_total{kind=\"session\"} 1",
            "signet_build_info{version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
