//! The internal CA's public revocation listener (`[pki] listen`, plain HTTP): `/crl` (DER CRL),
//! `/ca` (DER CA certificate), `/ocsp` (RFC 6960: POST with a DER request, or GET with the
//! request base64 in the path, RFC 6960 appendix A.1). No client authentication: everything
//! served is signed or public, and OCSP signs only for this CA's own certificates.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;

use crate::service::App;

/// An OCSP request for one certificate is a few hundred bytes.
const MAX_OCSP_REQUEST: usize = 4096;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/crl", get(crl))
        .route("/ca", get(ca))
        .route("/ocsp", axum::routing::post(ocsp_post))
        .route("/ocsp/{*request}", get(ocsp_get))
        .layer(DefaultBodyLimit::max(MAX_OCSP_REQUEST))
        .with_state(app)
}

fn der(content_type: &'static str, body: Vec<u8>, max_age: u64) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={max_age}")) {
        h.insert(header::CACHE_CONTROL, v);
    }
    resp
}

fn not_served(why: &'static str) -> Response {
    (StatusCode::NOT_FOUND, why).into_response()
}

const MANUAL: &str = "the internal CA does not issue the tenant certificates (rotation.issuer = \"manual\"): revocation data comes from the external CA\n";

async fn crl(State(app): State<Arc<App>>) -> Response {
    if app.internal_ca().is_none() {
        return not_served(MANUAL);
    }
    match app.published_crl() {
        Some(c) => {
            let now = crate::pki::unix_now(std::time::SystemTime::now());
            // Caches may keep it until the next re-signing at the latest.
            let max_age = (c.this_update + (c.next_update - c.this_update) / 2)
                .saturating_sub(now)
                .min(300);
            der("application/pkix-crl", c.der.clone(), max_age)
        }
        None => {
            let mut r = (
                StatusCode::SERVICE_UNAVAILABLE,
                "the CRL is not signed yet\n",
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
    }
}

async fn ca(State(app): State<Arc<App>>) -> Response {
    match app.internal_ca() {
        Some(ca) => der("application/pkix-cert", ca.der.clone(), 3600),
        None => not_served(MANUAL),
    }
}

async fn ocsp_post(State(app): State<Arc<App>>, body: Bytes) -> Response {
    ocsp(&app, &body).await
}

async fn ocsp_get(State(app): State<Arc<App>>, Path(request): Path<String>) -> Response {
    // Standard base64 (its `/` and `+` may arrive percent-decoded or not); URL-safe accepted.
    let text = request.trim_start_matches('/');
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text));
    match decoded {
        Ok(bytes) if bytes.len() <= MAX_OCSP_REQUEST => ocsp(&app, &bytes).await,
        _ => ocsp(&app, &[]).await,
    }
}

async fn ocsp(app: &App, request: &[u8]) -> Response {
    let answer = app.ocsp(request).await;
    der("application/ocsp-response", answer.der, 0)
}
