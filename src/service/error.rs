//! Every error a use case can end with, and its one classification ([`Error::classify`]): the
//! class (invalid, forbidden, not found, conflict, rate-limited, unavailable, internal), the
//! problem type's slug and title, `Retry-After`, whether the detail may be shown to the
//! client, and the `signet_sign_requests_total{outcome}` label. `http::problem` turns the
//! class into a status code and a problem document; the metrics take the outcome; nothing
//! else matches on the errors of other modules.

use std::sync::Arc;

use crate::{audit, hsm, keys, policy, rotation, vault};

/// Everything a use case can fail with. `http::problem` maps these to status codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Policy(#[from] policy::Error),
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyConflict,
    #[error(transparent)]
    Keys(#[from] keys::Error),
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
    #[error(transparent)]
    Audit(#[from] audit::Error),
    #[error(transparent)]
    Rotation(#[from] rotation::Error),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    #[error("the first checkpoint is being signed")]
    NoCheckpointYet,
    #[error(transparent)]
    Vault(#[from] vault::Error),
    /// An erasure refused because the records' retention has not ended.
    #[error("{0}")]
    RetentionInForce(String),
    /// An erasure refused because the records are on legal hold.
    #[error("{0}")]
    LegalHold(String),
    /// An error shared by concurrent callers (idempotent requests coalesced into one).
    #[error(transparent)]
    Shared(Arc<Error>),
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(format!("signing task failed: {e}"))
    }
}

impl Error {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// What kind of failure an error is, from the caller's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The request is malformed or not allowed as sent (400).
    Invalid,
    /// The caller may not do this (403).
    Forbidden,
    /// What the request names does not exist (404).
    NotFound,
    /// The request conflicts with the state (409).
    Conflict,
    /// The request is well formed, but what it carries was refused (422).
    Rejected,
    /// Too many requests: retry after `retry_after` (429).
    RateLimited,
    /// A dependency cannot serve now: retry after `retry_after` (503).
    Unavailable,
    /// Signet itself failed (500).
    Internal,
}

/// An error's classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub class: Class,
    /// The problem type: `urn:signet:problem:<slug>`.
    pub slug: &'static str,
    pub title: &'static str,
    /// Seconds for `Retry-After` (rate-limited and unavailable answers carry one).
    pub retry_after: Option<u64>,
    /// Whether the error's text may go to the client; otherwise it goes to the log with the
    /// request ID and the client gets a generic detail.
    pub public: bool,
    /// A fixed detail for the client instead of the error's text.
    pub detail: Option<&'static str>,
    /// Bounded label for `signet_sign_requests_total{outcome}`.
    pub outcome: &'static str,
}

const fn public(class: Class, slug: &'static str, title: &'static str) -> Classified {
    Classified {
        class,
        slug,
        title,
        retry_after: None,
        public: true,
        detail: None,
        outcome: "error",
    }
}

impl Classified {
    const fn retry(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
    /// The error's text stays in the log; the client reads `detail`.
    const fn private(mut self, detail: &'static str) -> Self {
        self.public = false;
        self.detail = Some(detail);
        self
    }
    const fn detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }
    const fn outcome(mut self, label: &'static str) -> Self {
        self.outcome = label;
        self
    }
}

impl Error {
    /// The one classification of this error (see the module documentation).
    pub fn classify(&self) -> Classified {
        use Class as C;
        match self {
            Error::Invalid { .. } => {
                public(C::Invalid, "invalid-request", "Invalid request").outcome("invalid")
            }
            Error::Policy(pe) => policy_class(pe),
            Error::IdempotencyConflict => public(
                C::Conflict,
                "idempotency-key-reused",
                "Idempotency-Key reused",
            )
            .outcome("conflict"),
            Error::Keys(ke) => keys_class(ke),
            Error::Hsm(he) => hsm_class(he),
            Error::Audit(ae) => audit_class(ae),
            Error::Rotation(rotation::Error::Conflict(_)) => public(
                C::Conflict,
                "rotation-conflict",
                "Not possible in the current state",
            ),
            Error::Rotation(rotation::Error::Rejected(_)) => {
                public(C::Rejected, "certificate-rejected", "Certificate rejected")
            }
            Error::Rotation(rotation::Error::Audit(ae)) => audit_class(ae),
            Error::Rotation(_) | Error::Internal(_) => internal(),
            Error::NotFound(_) => public(C::NotFound, "not-found", "Not found"),
            Error::Forbidden(_) => {
                public(C::Forbidden, "forbidden", "Forbidden").outcome("forbidden")
            }
            Error::Conflict(_) => public(C::Conflict, "conflict", "Conflict"),
            Error::NoCheckpointYet => {
                public(C::Unavailable, "no-checkpoint-yet", "No checkpoint yet").retry(2)
            }
            Error::Vault(vault::Error::Token(he)) => hsm_class(he),
            Error::Vault(vault::Error::Storage(crate::storage::Error::Unavailable(_))) => {
                audit_class(&audit::Error::Storage(String::new()))
            }
            Error::Vault(_) => internal(),
            Error::RetentionInForce(_) => public(
                C::Conflict,
                "retention-in-force",
                "The records are still within their retention period",
            ),
            Error::LegalHold(_) => {
                public(C::Conflict, "legal-hold", "The records are on legal hold")
            }
            Error::Shared(inner) => inner.classify(),
        }
    }

    /// Bounded label for `signet_sign_requests_total{outcome}`.
    pub fn outcome(&self) -> &'static str {
        self.classify().outcome
    }

    /// If a tenant's limit refused the request: which one, for
    /// `signet_tenant_refusals_total{limit}`.
    pub fn tenant_limit(&self) -> Option<&'static str> {
        match self {
            Error::Hsm(hsm::Error::Refused(r)) => Some(r.limit()),
            Error::Policy(policy::Error::RateLimited { scope, .. }) => Some(match *scope {
                "policy" => "rate_policy",
                "tenant" => "rate_tenant",
                _ => "rate_client",
            }),
            Error::Shared(inner) => inner.tenant_limit(),
            _ => None,
        }
    }
}

const fn internal() -> Classified {
    public(Class::Internal, "internal", "Internal error")
        .private("see the service log for this request ID")
}

fn policy_class(e: &policy::Error) -> Classified {
    use Class as C;
    match e {
        policy::Error::UnknownPolicy(_) => {
            public(C::NotFound, "unknown-policy", "Unknown policy").outcome("unknown_policy")
        }
        policy::Error::TenantNotAllowed { .. } => public(
            C::Forbidden,
            "tenant-not-allowed",
            "Not allowed for this tenant",
        )
        .outcome("forbidden"),
        policy::Error::MissingRole { .. } => {
            public(C::Forbidden, "role-required", "Role required").outcome("forbidden")
        }
        policy::Error::DigestAlgorithmNotAllowed { .. } => public(
            C::Invalid,
            "digest-algorithm-not-allowed",
            "Digest algorithm not allowed",
        )
        .outcome("invalid"),
        policy::Error::IdempotencyKeyRequired(_) => public(
            C::Invalid,
            "idempotency-key-required",
            "Idempotency-Key required",
        )
        .outcome("invalid"),
        policy::Error::RateLimited { retry_after, .. } => {
            public(C::RateLimited, "rate-limited", "Rate limit exceeded")
                .retry(retry_after.as_secs_f64().ceil() as u64)
                .outcome("rate_limited")
        }
    }
}

fn keys_class(e: &keys::Error) -> Classified {
    use Class as C;
    match e {
        keys::Error::NoActiveKey(_) => {
            public(C::Unavailable, "no-active-key", "No active signing key")
                .retry(60)
                .outcome("no_active_key")
        }
        keys::Error::CertificateNotUsable { reason, .. } => {
            let slug = match reason {
                crate::pki::Error::Expired(_) => "certificate-expired",
                crate::pki::Error::NotYetValid(_) => "certificate-not-yet-valid",
                _ => "certificate-expiring",
            };
            public(C::Unavailable, slug, "Signing certificate not usable")
                .retry(300)
                .outcome("certificate_unusable")
        }
        keys::Error::UnknownKey(_) => public(C::NotFound, "unknown-key", "Unknown key"),
        keys::Error::Revoked(_) => public(C::Unavailable, "no-active-key", "No active signing key")
            .retry(60)
            .outcome("no_active_key"),
        _ => internal(),
    }
}

fn hsm_class(e: &hsm::Error) -> Classified {
    if let hsm::Error::Refused(r) = e {
        let (slug, title) = match r {
            hsm::fair::Refused::TenantQueueFull { .. } => (
                "tenant-queue-full",
                "Too many signing requests waiting for this tenant",
            ),
            hsm::fair::Refused::ClientQueueFull { .. } => (
                "client-queue-full",
                "Too many signing requests waiting for this client",
            ),
        };
        return public(Class::RateLimited, slug, title)
            .retry(1)
            .outcome("queue_full");
    }
    let (slug, title) = match e {
        hsm::Error::Busy => ("token-busy", "Signing capacity exhausted"),
        hsm::Error::Timeout(_) => ("token-timeout", "The token did not answer in time"),
        hsm::Error::WrongKey(_) => (
            "token-signature-mismatch",
            "The token signed with an unexpected key; the signature was discarded",
        ),
        _ => ("token-unavailable", "The signing token is unavailable"),
    };
    let retry = if matches!(e, hsm::Error::Busy) { 1 } else { 5 };
    public(Class::Unavailable, slug, title)
        .retry(retry)
        .private("retry later")
        .outcome("hsm_unavailable")
}

fn audit_class(e: &audit::Error) -> Classified {
    use Class as C;
    let c = match e {
        audit::Error::NoSuchEntry(_) => public(C::NotFound, "no-such-entry", "No such entry"),
        audit::Error::NotYetCheckpointed { .. } => public(
            C::NotFound,
            "not-yet-checkpointed",
            "Not yet covered by a checkpoint",
        )
        .retry(10),
        audit::Error::Superseded(audit::order::Violation::Revoked { .. }) => {
            public(C::Unavailable, "no-active-key", "No active signing key")
                .retry(60)
                .outcome("no_active_key")
        }
        audit::Error::Superseded(_) => public(
            C::Unavailable,
            "key-rotating",
            "The signing key is being rotated",
        )
        .retry(1)
        .detail("the tenant's key was replaced while signing; retry"),
        audit::Error::Storage(_) => public(
            C::Unavailable,
            "storage-unavailable",
            "The database is unavailable",
        )
        .retry(2)
        .private("the evidence store does not answer; retry later"),
        audit::Error::ClaimLost => public(
            C::Unavailable,
            "idempotency-in-progress",
            "Another replica is completing this request",
        )
        .retry(1)
        .detail("retry with the same Idempotency-Key to get its answer"),
        audit::Error::Inconsistent(_) => public(
            C::Internal,
            "evidence-inconsistent",
            "The stored evidence does not match its signed checkpoint",
        ),
        audit::Error::Proof(_) => public(C::Invalid, "invalid-range", "Invalid tree sizes"),
        _ => public(
            C::Unavailable,
            "evidence-log-unavailable",
            "The evidence log cannot record",
        )
        .retry(5)
        .private("retry later"),
    };
    c.outcome("audit_unavailable")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problem type and the metric outcome come from one classification: a table of both.
    #[test]
    fn each_error_has_one_class_slug_and_outcome() {
        let tenant = || "payroll".parse().unwrap();
        let cases: Vec<(Error, Class, &str, &str)> = vec![
            (
                Error::invalid("digest", "x"),
                Class::Invalid,
                "invalid-request",
                "invalid",
            ),
            (
                Error::Policy(policy::Error::UnknownPolicy("p".into())),
                Class::NotFound,
                "unknown-policy",
                "unknown_policy",
            ),
            (
                Error::Policy(policy::Error::RateLimited {
                    scope: "tenant",
                    name: "t".into(),
                    retry_after: std::time::Duration::from_millis(300),
                }),
                Class::RateLimited,
                "rate-limited",
                "rate_limited",
            ),
            (
                Error::Forbidden("no".into()),
                Class::Forbidden,
                "forbidden",
                "forbidden",
            ),
            (
                Error::IdempotencyConflict,
                Class::Conflict,
                "idempotency-key-reused",
                "conflict",
            ),
            (
                Error::Keys(keys::Error::NoActiveKey(tenant())),
                Class::Unavailable,
                "no-active-key",
                "no_active_key",
            ),
            (
                Error::Hsm(hsm::Error::Busy),
                Class::Unavailable,
                "token-busy",
                "hsm_unavailable",
            ),
            (
                Error::Audit(audit::Error::Inconsistent("entry 5".into())),
                Class::Internal,
                "evidence-inconsistent",
                "audit_unavailable",
            ),
            (
                Error::Shared(Arc::new(Error::IdempotencyConflict)),
                Class::Conflict,
                "idempotency-key-reused",
                "conflict",
            ),
            (
                Error::Internal("boom".into()),
                Class::Internal,
                "internal",
                "error",
            ),
        ];
        for (e, class, slug, outcome) in cases {
            let c = e.classify();
            assert_eq!((c.class, c.slug, c.outcome), (class, slug, outcome), "{e}");
            assert_eq!(e.outcome(), outcome);
            assert_eq!(
                c.retry_after.is_some(),
                matches!(class, Class::Unavailable | Class::RateLimited),
                "{e}: Retry-After exactly on 429 and 503"
            );
        }
    }
}
