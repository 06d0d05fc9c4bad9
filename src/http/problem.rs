//! RFC 9457 problem documents: the only place errors become status codes.
//!
//! 4xx bodies say precisely what is wrong. 5xx bodies are generic; the details go to the log
//! with the request ID.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::service::{Class, Error};
#[cfg(test)]
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

    /// The problem document of a use-case error, from its one classification
    /// ([`Error::classify`]). Server-side failures are logged here with the request ID; their
    /// text never reaches the client.
    pub fn from_error(e: &Error, request_id: &str) -> Self {
        use StatusCode as S;
        let c = e.classify();
        let status = match c.class {
            Class::Invalid => S::BAD_REQUEST,
            Class::Forbidden => S::FORBIDDEN,
            Class::NotFound => S::NOT_FOUND,
            Class::Conflict => S::CONFLICT,
            Class::Rejected => S::UNPROCESSABLE_ENTITY,
            Class::RateLimited => S::TOO_MANY_REQUESTS,
            Class::Unavailable => S::SERVICE_UNAVAILABLE,
            Class::Internal => S::INTERNAL_SERVER_ERROR,
        };
        if !c.public || c.class == Class::Internal {
            tracing::error!(request_id, error = %e, problem = c.slug, "request failed");
        }
        let detail = match (c.public, c.detail) {
            (_, Some(fixed)) => fixed.to_owned(),
            (true, None) => e.to_string(),
            (false, None) => "see the service log for this request ID".to_owned(),
        };
        let p = Problem::new(status, c.slug, c.title, detail, request_id);
        match c.retry_after {
            Some(s) => p.retry_after(s),
            None => p,
        }
    }
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
                Error::Hsm(hsm::Error::Refused(hsm::fair::Refused::TenantQueueFull {
                    tenant: "t".into(),
                    limit: 256,
                })),
                429,
            ),
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
