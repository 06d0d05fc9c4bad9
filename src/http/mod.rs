//! The HTTP API: routes, extractors, request IDs, and the metrics/health listener.
//!
//! Handlers turn requests into `service` calls and errors into problem documents. No PKCS#11
//! and no evidence-log internals here: only `service` and `metrics`.

pub mod pki;
pub mod problem;
pub mod server;
pub mod slots;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use problem::Problem;

use crate::service::{
    AdminRequest, App, BatchRequest, Caller, Error, ImportRequest, RevocationRequest, SignRequest,
    VerifyRequest,
};
use crate::tls::ClientIdentity;

/// The request ID, set by the first middleware and echoed in `X-Request-Id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The verified client certificate's identity, attached to every request of a connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Arc<ClientIdentity>);

/// What handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub app: Arc<App>,
    /// Reload configuration and TLS material (SIGHUP does the same).
    pub reload: Arc<dyn Fn() -> Result<String, server::ReloadError> + Send + Sync>,
    /// Bytes of request bodies that may be buffered at once (`server.max_buffered_body_bytes`).
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// The same per client (`server.max_buffered_body_bytes_per_client`).
    pub client_bodies: Arc<slots::Slots<String>>,
}

/// The mTLS API router.
pub fn router(state: ApiState) -> Router {
    let max_body = state.app.config().server.max_body_bytes;
    let router = Router::new()
        .route("/v1/sign", post(sign))
        .route("/v1/sign/batch", post(sign_batch))
        .route("/v1/keys/{tenant}", get(keys))
        .route("/v1/verify", post(verify))
        .route("/v1/audit/checkpoint", get(checkpoint))
        .route("/v1/audit/entries", get(entries))
        .route("/v1/audit/entries/{index}", get(entry))
        .route("/v1/audit/transactions/{transaction_id}", get(transaction))
        .route(
            "/v1/audit/transactions/{transaction_id}/bundle",
            get(transaction_bundle),
        )
        .route("/v1/audit/consistency", get(consistency))
        .route("/v1/audit/tlog/checkpoint", get(tlog_checkpoint))
        .route("/v1/audit/tlog/tile/{*path}", get(tlog_tile))
        .route("/v1/admin/keys", get(admin_keys).post(admin_create_key))
        .route("/v1/admin/rotations", get(admin_status).post(admin_rotate))
        .route("/v1/admin/rollback", post(admin_rollback))
        .route("/v1/admin/revocations", post(admin_revoke))
        .route("/v1/admin/erasures", post(admin_erase))
        .route("/v1/admin/evidence/sweep", post(admin_sweep))
        .route("/v1/admin/holds", get(admin_holds).post(admin_hold))
        .route("/v1/admin/holds/{id}/release", post(admin_release_hold))
        .route("/v1/admin/vault/rotations", post(admin_rotate_vault_key))
        .route("/v1/admin/csr", post(admin_csr))
        .route("/v1/admin/certificates", post(admin_import))
        .route("/v1/admin/reload", post(admin_reload))
        .route("/v1/openapi.json", get(openapi));
    #[cfg(feature = "insecure-test-hooks")]
    let router = router.route("/v1/admin/insecure-test-fault", post(insecure_test_fault));
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Give every request an ID and echo it in `X-Request-Id`.
async fn request_id(mut req: Request, next: Next) -> Response {
    // 128 random bits from the thread-local CSPRNG (no syscall per request).
    let id = format!("{:032x}", rand::random::<u128>());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Count responses by matched route and status; refuse requests while shutting down.
async fn observe(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let resp = next.run(req).await;
    state
        .app
        .metrics()
        .http_requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

fn rid(parts: &Parts) -> String {
    parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default()
}

/// The authenticated caller: certificate identity, known to `[[clients]]`.
pub struct Ctx(pub Caller);

impl FromRequestParts<ApiState> for Ctx {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Problem> {
        let request_id = rid(parts);
        let Some(PeerIdentity(identity)) = parts.extensions.get::<PeerIdentity>().cloned() else {
            return Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "client-certificate-required",
                "Client certificate required",
                "this API needs mutual TLS",
                &request_id,
            ));
        };
        let policies = state.app.policies().load();
        let Some(client) = policies.client(&identity.identity).cloned() else {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "unknown-client",
                "Unknown client",
                format!(
                    "client `{}` is not configured (it may have been removed by a reload)",
                    identity.identity
                ),
                &request_id,
            ));
        };
        Ok(Ctx(Caller {
            identity,
            client,
            request_id,
        }))
    }
}

/// A JSON body with problem-document rejections (400, 413, 415).
pub struct JsonBody<T>(pub T);

/// A query string, parsed into `T`; anything it cannot parse (a parameter given twice, an
/// unknown value) is a 400 problem document naming it, like every other bad input.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned> FromRequestParts<ApiState> for QueryParams<T> {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Problem> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(Self(q)),
            Err(e) => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
                format!("query string: {}", e.body_text()),
                &rid(parts),
            )),
        }
    }
}

impl<T: DeserializeOwned> FromRequest<ApiState> for JsonBody<T> {
    type Rejection = Problem;
    async fn from_request(req: Request, state: &ApiState) -> Result<Self, Problem> {
        let request_id = req
            .extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or("").trim();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    "Unsupported media type",
                    "send application/json",
                    &request_id,
                ));
            }
        }
        let cfg = &state.app.config().server;
        let too_large = || {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
                "the body exceeds server.max_body_bytes",
                &request_id,
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > cfg.max_body_bytes) {
            return Err(too_large());
        }
        // Reserve the body's size (or the most it may be) from the client's share, then from the
        // global budget, so many slow bodies cannot hold unbounded memory, and one client
        // cannot hold all of it.
        let reserve = declared
            .unwrap_or(cfg.max_body_bytes)
            .clamp(1, cfg.max_body_bytes);
        let client = req
            .extensions()
            .get::<PeerIdentity>()
            .map(|p| p.0.identity.clone())
            .unwrap_or_default();
        let Some(_share) =
            state
                .client_bodies
                .try_take(&client, reserve, cfg.max_buffered_body_bytes_per_client)
        else {
            state
                .app
                .metrics()
                .client_refusals
                .with_label_values(&[client.as_str(), "body_bytes"])
                .inc();
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "client-body-limit",
                "Too many request bodies in flight for this client",
                "server.max_buffered_body_bytes_per_client is in use by this client; retry",
                &request_id,
            )
            .retry_after(1));
        };
        let _budget = Arc::clone(&state.body_budget)
            .try_acquire_many_owned(u32::try_from(reserve).unwrap_or(u32::MAX))
            .map_err(|_| {
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server-busy",
                    "Too many request bodies in flight",
                    "server.max_buffered_body_bytes is in use; retry",
                    &request_id,
                )
                .retry_after(1)
            })?;
        let read = tokio::time::timeout(cfg.request_timeout, Bytes::from_request(req, state));
        let bytes = read
            .await
            .map_err(|_| {
                Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request-timeout",
                    "Request body too slow",
                    "the body did not arrive within server.request_timeout",
                    &request_id,
                )
            })?
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    too_large()
                } else {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid-body",
                        "Invalid body",
                        e.body_text(),
                        &request_id,
                    )
                }
            })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "Malformed JSON",
                json_error(&e),
                &request_id,
            )
        })
    }
}

/// serde_json's message without echoing input values.
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    // Messages name fields ("unknown field `document`", "missing field `digest`") and positions;
    // they never quote string values, so they are safe to return.
    msg.chars().take(300).collect()
}

fn ok<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn fail(e: Error, request_id: &str) -> Response {
    Problem::from_error(&e, request_id).into_response()
}

/// The JSON answer, or the problem document.
fn respond<T: Serialize>(
    status: StatusCode,
    result: Result<T, Error>,
    request_id: &str,
) -> Response {
    match result {
        Ok(v) => ok(status, &v),
        Err(e) => fail(e, request_id),
    }
}

async fn sign(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    headers: HeaderMap,
    JsonBody(req): JsonBody<SignRequest>,
) -> Response {
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) => Some(k.to_owned()),
        Some(Err(_)) => {
            return fail(
                Error::invalid("Idempotency-Key", "must be visible ASCII"),
                &caller.request_id,
            );
        }
    };
    respond(
        StatusCode::OK,
        s.app.sign(&caller, req, key.as_deref()).await,
        &caller.request_id,
    )
}

/// The answer of `POST /v1/sign/batch`: one result per item, in order. Serialised as it is
/// (not through a `serde_json::Value`, which would copy every item and escape each
/// certificate again).
#[derive(Serialize)]
struct BatchResponse {
    results: Vec<BatchItemResult>,
}

#[derive(Serialize)]
struct BatchItemResult {
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<crate::service::SignResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
}

async fn sign_batch(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<BatchRequest>,
) -> Response {
    let max = s.app.config().server.max_batch_items;
    if req.items.is_empty() || req.items.len() > max {
        return fail(
            Error::invalid(
                "items",
                format!("a batch holds 1 to {max} items (server.max_batch_items)"),
            ),
            &caller.request_id,
        );
    }
    let results = s.app.sign_batch(&caller, req.items).await;
    let items: Vec<BatchItemResult> = results
        .into_iter()
        .map(|r| match r {
            Ok(r) => BatchItemResult {
                status: 200,
                result: Some(r),
                problem: None,
            },
            Err(e) => {
                let p = Problem::from_error(&e, &caller.request_id);
                BatchItemResult {
                    status: p.status,
                    result: None,
                    problem: Some(p),
                }
            }
        })
        .collect();
    ok(StatusCode::OK, &BatchResponse { results: items })
}

async fn keys(State(s): State<ApiState>, Ctx(caller): Ctx, Path(tenant): Path<String>) -> Response {
    let keys = s.app.keys_of(&caller, &tenant);
    respond(
        StatusCode::OK,
        keys.map(|k| serde_json::json!({ "tenant": tenant, "keys": k })),
        &caller.request_id,
    )
}

async fn verify(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<VerifyRequest>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app.verify(&caller, req),
        &caller.request_id,
    )
}

async fn checkpoint(State(s): State<ApiState>, Ctx(caller): Ctx) -> Response {
    respond(StatusCode::OK, s.app.checkpoint_view(), &caller.request_id)
}

async fn entry(State(s): State<ApiState>, Ctx(caller): Ctx, Path(index): Path<String>) -> Response {
    let Ok(index) = index.parse::<u64>() else {
        return fail(
            Error::invalid("index", "must be a non-negative integer"),
            &caller.request_id,
        );
    };
    respond(
        StatusCode::OK,
        s.app.entry_view(&caller, index).await,
        &caller.request_id,
    )
}

async fn transaction(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    Path(id): Path<String>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app.transaction(&caller, &id).await,
        &caller.request_id,
    )
}

#[derive(Deserialize)]
struct BundleQuery {
    tenant: Option<String>,
}

async fn transaction_bundle(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<BundleQuery>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app
            .transaction_bundle(&caller, &id, q.tenant.as_deref())
            .await,
        &caller.request_id,
    )
}

async fn entries(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    QueryParams(q): QueryParams<crate::service::EntriesQuery>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app.tenant_entries(&caller, &q).await,
        &caller.request_id,
    )
}

/// C2SP tlog-tiles: the latest checkpoint as a signed note.
async fn tlog_checkpoint(State(s): State<ApiState>, Ctx(caller): Ctx) -> Response {
    match s.app.tlog_checkpoint() {
        Ok(note) => tlog_body("text/plain; charset=utf-8", note.into_bytes(), false),
        Err(e) => fail(e, &caller.request_id),
    }
}

/// C2SP tlog-tiles: hash tiles (any client: they hold only hashes) and entry bundles (admin
/// and audit roles: entries hold every tenant's signer evidence).
async fn tlog_tile(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    Path(path): Path<String>,
) -> Response {
    let not_found = || {
        fail(
            Error::NotFound(format!(
                "no tile `{}` in the latest checkpoint's tree",
                path.chars().take(64).collect::<String>()
            )),
            &caller.request_id,
        )
    };
    let Some(tile) = crate::audit::tiles::parse(&path) else {
        return not_found();
    };
    match s.app.tlog_tile(&caller, tile).await {
        Ok(Some(b)) => tlog_body("application/octet-stream", b, true),
        Ok(None) => not_found(),
        Err(e) => fail(e, &caller.request_id),
    }
}

/// A tlog-tiles answer; full and partial tiles never change once served.
fn tlog_body(content_type: &'static str, body: Vec<u8>, immutable: bool) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-store"
        }),
    );
    resp
}

#[derive(Deserialize)]
struct ConsistencyQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn consistency(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    QueryParams(q): QueryParams<ConsistencyQuery>,
) -> Response {
    let parse = |v: &Option<String>, name: &'static str| {
        v.as_deref()
            .ok_or_else(|| Error::invalid(name, "is required"))
            .and_then(|s| {
                s.parse::<u64>()
                    .map_err(|_| Error::invalid(name, "must be a non-negative integer"))
            })
    };
    let (from, to) = match (parse(&q.from, "from"), parse(&q.to, "to")) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return fail(e, &caller.request_id),
    };
    respond(
        StatusCode::OK,
        s.app.consistency_view(from, to).await,
        &caller.request_id,
    )
}

async fn admin_keys(State(s): State<ApiState>, Ctx(caller): Ctx) -> Response {
    let keys = s.app.all_keys(&caller);
    respond(
        StatusCode::OK,
        keys.map(|k| serde_json::json!({ "keys": k })),
        &caller.request_id,
    )
}

async fn admin_create_key(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<AdminRequest>,
) -> Response {
    respond(
        StatusCode::CREATED,
        s.app.admin_create_key(&caller, req).await,
        &caller.request_id,
    )
}

async fn admin_status(State(s): State<ApiState>, Ctx(caller): Ctx) -> Response {
    let status = s.app.status(&caller);
    respond(
        StatusCode::OK,
        status.map(|t| serde_json::json!({ "tenants": t })),
        &caller.request_id,
    )
}

async fn admin_rotate(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<AdminRequest>,
) -> Response {
    respond(
        StatusCode::ACCEPTED,
        s.app.admin_rotate(&caller, req).await,
        &caller.request_id,
    )
}

async fn admin_revoke(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<RevocationRequest>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app.admin_revoke(&caller, req).await,
        &caller.request_id,
    )
}

async fn admin_erase(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<crate::service::ErasureRequest>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app.admin_erase(&caller, req).await,
        &caller.request_id,
    )
}

async fn admin_sweep(State(s): State<ApiState>, Ctx(caller): Ctx) -> Response {
    respond(
        StatusCode::OK,
        s.app.admin_sweep(&caller).await,
        &caller.request_id,
    )
}

async fn admin_holds(State(s): State<ApiState>, Ctx(caller): Ctx) -> Response {
    respond(
        StatusCode::OK,
        s.app
            .holds(&caller)
            .await
            .map(|h| serde_json::json!({ "holds": h })),
        &caller.request_id,
    )
}

async fn admin_hold(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<crate::service::HoldRequest>,
) -> Response {
    respond(
        StatusCode::CREATED,
        s.app.admin_hold(&caller, req).await,
        &caller.request_id,
    )
}

async fn admin_release_hold(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<crate::service::ReleaseRequest>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app.admin_release_hold(&caller, &id, req).await,
        &caller.request_id,
    )
}

async fn admin_rotate_vault_key(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    body: axum::body::Bytes,
) -> Response {
    let req = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(crate::service::VaultRotationRequest::default())
    } else {
        serde_json::from_slice::<crate::service::VaultRotationRequest>(&body)
            .map_err(|e| crate::service::Error::invalid("body", e.to_string()))
    };
    let result = match req {
        Ok(r) => s.app.admin_rotate_vault_key(&caller, r).await,
        Err(e) => Err(e),
    };
    respond(StatusCode::OK, result, &caller.request_id)
}

async fn admin_rollback(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<AdminRequest>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app.admin_rollback(&caller, req).await,
        &caller.request_id,
    )
}

async fn admin_csr(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<AdminRequest>,
) -> Response {
    let csr = s.app.admin_csr(&caller, req).await;
    respond(
        StatusCode::OK,
        csr.map(|c| serde_json::json!({ "csr": c })),
        &caller.request_id,
    )
}

async fn admin_import(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<ImportRequest>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app.admin_import(&caller, req).await,
        &caller.request_id,
    )
}

/// The API contract (`openapi.yaml` at the top of the repository), compiled in.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// The contract as JSON, parsed once.
pub fn openapi_json() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    // Invariant: the document is checked to parse by a unit test; an unparsable one would
    // serve `null` rather than fail the service.
    DOC.get_or_init(|| serde_yaml_ng::from_str(OPENAPI_YAML).unwrap_or(serde_json::Value::Null))
}

async fn openapi(Ctx(_caller): Ctx) -> Response {
    ok(StatusCode::OK, openapi_json())
}

async fn admin_reload(State(s): State<ApiState>, Ctx(caller): Ctx) -> Response {
    if let Err(e) = caller.require(crate::config::Role::Admin) {
        return fail(e, &caller.request_id);
    }
    match (s.reload)() {
        Ok(summary) => {
            tracing::info!(request_id = %caller.request_id, %summary, "configuration reloaded");
            s.app
                .record_reload(caller.actor(), Some(caller.request_id.clone()))
                .await;
            ok(
                StatusCode::OK,
                &serde_json::json!({ "reloaded": true, "summary": summary }),
            )
        }
        Err(reason) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-configuration",
            "Configuration rejected; the previous one stays",
            reason.to_string(),
            &caller.request_id,
        )
        .into_response(),
    }
}

/// Test hook (feature `insecure-test-hooks` only): inject a token fault into the running service.
#[cfg(feature = "insecure-test-hooks")]
async fn insecure_test_fault(
    State(s): State<ApiState>,
    Ctx(caller): Ctx,
    JsonBody(req): JsonBody<serde_json::Value>,
) -> Response {
    respond(
        StatusCode::OK,
        s.app
            .insecure_test_fault(&caller, &req)
            .await
            .map(|()| serde_json::json!({"injected": req["fault"]})),
        &caller.request_id,
    )
}

async fn not_found(req: Request) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such endpoint",
        &id,
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{} is not allowed here", req.method()),
        &id,
    )
    .into_response()
}

/// The plain-HTTP listener: `/metrics`, `/healthz`, `/readyz`.
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut resp = app.render_metrics().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    if app.is_healthy() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "token library wedged; restart needed\n",
        )
            .into_response()
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let r = app.readiness();
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

#[cfg(test)]
mod contract_tests {
    use super::*;
    use std::collections::BTreeSet;

    /// (method, path) of every route `router` registers, read from this file's source.
    fn routes_in_source() -> BTreeSet<(String, String)> {
        let src = include_str!("mod.rs");
        let start = src.find("pub fn router(").unwrap();
        let end = src[start..].find("    router\n").unwrap() + start;
        let mut out = BTreeSet::new();
        // Whitespace removed, so a route rustfmt splits over lines reads like any other.
        let body: String = src[start..end].split_whitespace().collect();
        for chunk in body.split(".route(").skip(1) {
            let path = chunk.split('"').nth(1).unwrap().replace("{*", "{");
            if path.contains("insecure-test") {
                continue;
            }
            for method in ["get", "post"] {
                if chunk.contains(&format!(",{method}(")) || chunk.contains(&format!(".{method}("))
                {
                    out.insert((method.to_owned(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routes_of_the_router() {
        let doc = openapi_json();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let routed = routes_in_source();
        assert!(routed.len() >= 15, "{routed:?}");
        assert_eq!(documented, routed);
    }
}
