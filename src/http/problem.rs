//! RFC 9457 problem documents: the only place errors become status codes.
//!
//! 4xx bodies say precisely what is wrong. 5xx bodies are generic; the details go to the log
//! with the request ID.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::service::Error;
use crate::{audit, hsm, keys, policy, rotation};

/// A problem document. `type` is a URN naming the problem (`urn:signet:problem:<slug>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub request_id: String,
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        slug: &str,
        title: &str,
        detail: impl Into<String>,
        request_id: &str,
    ) -> Self {
        Self {
            type_: format!("urn:signet:problem:{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            request_id: request_id.to_owned(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Map a use-case error. Server-side failures are logged here with the request ID.
    pub fn from_error(e: &Error, request_id: &str) -> Self {
        use StatusCode as S;
        let p = |s, slug, title, detail: String| Problem::new(s, slug, title, detail, request_id);
        let unavailable = |slug, title, detail: &str, retry| {
            Problem::new(S::SERVICE_UNAVAILABLE, slug, title, detail, request_id).retry_after(retry)
        };
        match e {
            Error::Invalid { .. } => p(
                S::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
                e.to_string(),
            ),
            Error::Policy(pe) => match pe {
                policy::Error::UnknownPolicy(_) => p(
                    S::NOT_FOUND,
                    "unknown-policy",
                    "Unknown policy",
                    pe.to_string(),
                ),
                policy::Error::TenantNotAllowed { .. } => p(
                    S::FORBIDDEN,
                    "tenant-not-allowed",
                    "Not allowed for this tenant",
                    pe.to_string(),
                ),
                policy::Error::MissingRole { .. } => p(
                    S::FORBIDDEN,
                    "role-required",
                    "Role required",
                    pe.to_string(),
                ),
                policy::Error::DigestAlgorithmNotAllowed { .. } => p(
                    S::BAD_REQUEST,
                    "digest-algorithm-not-allowed",
                    "Digest algorithm not allowed",
                    pe.to_string(),
                ),
                policy::Error::IdempotencyKeyRequired(_) => p(
                    S::BAD_REQUEST,
                    "idempotency-key-required",
                    "Idempotency-Key required",
                    pe.to_string(),
                ),
                policy::Error::RateLimited { retry_after, .. } => p(
                    S::TOO_MANY_REQUESTS,
                    "rate-limited",
                    "Rate limit exceeded",
                    pe.to_string(),
                )
                .retry_after(retry_after.as_secs_f64().ceil() as u64),
            },
            Error::IdempotencyConflict => p(
                S::CONFLICT,
                "idempotency-key-reused",
                "Idempotency-Key reused",
                e.to_string(),
            ),
            Error::Keys(ke) => match ke {
                keys::Error::NoActiveKey(_) => unavailable(
                    "no-active-key",
                    "No active signing key",
                    &ke.to_string(),
                    60,
                ),
                keys::Error::CertificateNotUsable { reason, .. } => {
                    let slug = match reason {
                        crate::pki::Error::Expired(_) => "certificate-expired",
                        crate::pki::Error::NotYetValid(_) => "certificate-not-yet-valid",
                        _ => "certificate-expiring",
                    };
                    unavailable(slug, "Signing certificate not usable", &ke.to_string(), 300)
                }
                keys::Error::UnknownKey(_) => {
                    p(S::NOT_FOUND, "unknown-key", "Unknown key", ke.to_string())
                }
                other => internal(other, request_id),
            },
            Error::Hsm(he) => hsm_problem(he, request_id),
            Error::Audit(ae) => audit_problem(ae, request_id),
            Error::Rotation(re) => match re {
                rotation::Error::Conflict(_) => p(
                    S::CONFLICT,
                    "rotation-conflict",
                    "Not possible in the current state",
                    re.to_string(),
                ),
                rotation::Error::Rejected(_) => p(
                    S::UNPROCESSABLE_ENTITY,
                    "certificate-rejected",
                    "Certificate rejected",
                    re.to_string(),
                ),
                rotation::Error::Audit(ae) => audit_problem(ae, request_id),
                other => internal(other, request_id),
            },
            Error::NotFound(d) => p(S::NOT_FOUND, "not-found", "Not found", d.clone()),
            Error::Forbidden(d) => p(S::FORBIDDEN, "forbidden", "Forbidden", d.clone()),
            Error::Conflict(d) => p(S::CONFLICT, "conflict", "Conflict", d.clone()),
            Error::Internal(_) => internal(e, request_id),
            Error::Shared(inner) => Problem::from_error(inner, request_id),
        }
    }
}

fn hsm_problem(e: &hsm::Error, request_id: &str) -> Problem {
    tracing::error!(request_id, error = %e, kind = e.kind(), "token call failed");
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
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        slug,
        title,
        "retry later",
        request_id,
    )
    .retry_after(retry)
}

fn audit_problem(e: &audit::Error, request_id: &str) -> Problem {
    use StatusCode as S;
    match e {
        audit::Error::NoSuchEntry(_) => Problem::new(
            S::NOT_FOUND,
            "no-such-entry",
            "No such entry",
            e.to_string(),
            request_id,
        ),
        audit::Error::NotYetCheckpointed { .. } => Problem::new(
            S::NOT_FOUND,
            "not-yet-checkpointed",
            "Not yet covered by a checkpoint",
            e.to_string(),
            request_id,
        )
        .retry_after(10),
        audit::Error::Superseded(_) => Problem::new(
            S::SERVICE_UNAVAILABLE,
            "key-rotating",
            "The signing key is being rotated",
            "the tenant's key was replaced while signing; retry",
            request_id,
        )
        .retry_after(1),
        audit::Error::Storage(_) => {
            tracing::error!(request_id, error = %e, "storage unavailable");
            Problem::new(
                S::SERVICE_UNAVAILABLE,
                "storage-unavailable",
                "The database is unavailable",
                "the evidence store does not answer; retry later",
                request_id,
            )
            .retry_after(2)
        }
        audit::Error::ClaimLost => Problem::new(
            S::SERVICE_UNAVAILABLE,
            "idempotency-in-progress",
            "Another replica is completing this request",
            "retry with the same Idempotency-Key to get its answer",
            request_id,
        )
        .retry_after(1),
        audit::Error::Inconsistent(_) => {
            tracing::error!(request_id, error = %e, "stored evidence does not match its checkpoint");
            Problem::new(
                S::INTERNAL_SERVER_ERROR,
                "evidence-inconsistent",
                "The stored evidence does not match its signed checkpoint",
                e.to_string(),
                request_id,
            )
        }
        audit::Error::Proof(_) => Problem::new(
            S::BAD_REQUEST,
            "invalid-range",
            "Invalid tree sizes",
            e.to_string(),
            request_id,
        ),
        _ => {
            tracing::error!(request_id, error = %e, "evidence log unavailable");
            Problem::new(
                S::SERVICE_UNAVAILABLE,
                "evidence-log-unavailable",
                "The evidence log cannot record",
                "retry later",
                request_id,
            )
            .retry_after(5)
        }
    }
}

fn internal(e: &dyn std::fmt::Display, request_id: &str) -> Problem {
    tracing::error!(request_id, error = %e, "internal error");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "Internal error",
        "see the service log for this request ID",
        request_id,
    )
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let cases: Vec<(Error, u16)> = vec![
            (Error::invalid("digest", "x"), 400),
            (Error::Policy(policy::Error::UnknownPolicy("p".into())), 404),
            (
                Error::Policy(policy::Error::TenantNotAllowed {
                    identity: "a".into(),
                    tenant: "t".parse().unwrap(),
                }),
                403,
            ),
            (
                Error::Policy(policy::Error::RateLimited {
                    scope: "tenant",
                    name: "t".into(),
                    retry_after: std::time::Duration::from_millis(300),
                }),
                429,
            ),
            (Error::IdempotencyConflict, 409),
            (
                Error::Keys(keys::Error::NoActiveKey("t".parse().unwrap())),
                503,
            ),
            (Error::Hsm(hsm::Error::Busy), 503),
            (
                Error::Audit(audit::Error::Unwritable("disk full".into())),
                503,
            ),
            (Error::Audit(audit::Error::NoSuchEntry(5)), 404),
            (
                Error::Audit(audit::Error::Inconsistent("entry 5".into())),
                500,
            ),
            (Error::Rotation(rotation::Error::Conflict("x".into())), 409),
            (Error::Internal("boom".into()), 500),
        ];
        for (e, want) in cases {
            let p = Problem::from_error(&e, "rid");
            assert_eq!(p.status, want, "{e}");
            assert_eq!(p.request_id, "rid");
            assert!(p.type_.starts_with("urn:signet:problem:"));
            if want == 503 || want == 429 {
                assert!(p.retry_after.is_some(), "{e} needs Retry-After");
            }
        }
        let p = Problem::from_error(&Error::Internal("secret detail".into()), "rid");
        assert!(!p.detail.contains("secret"), "5xx bodies are generic");
    }
}
