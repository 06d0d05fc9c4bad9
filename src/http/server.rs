//! Listeners and lifecycle: the mTLS accept loop (TLS material swapped on reload), the
//! metrics listener, signals (SIGHUP reload, SIGTERM/SIGINT graceful shutdown), and the
//! orderly stop: no new connections, in-flight requests finish, final checkpoint, token closed.
//!
//! Resource limits at the front door: unauthenticated TLS handshakes have their own bound
//! (global and per source address) apart from established connections; an established
//! connection is closed when its client certificate expires, when a reload stops trusting it,
//! or after `idle_timeout` without a request; refusals are logged at most every few seconds.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};

use axum::response::IntoResponse;
use tower::Service;

use super::slots::{self, Slot, Slots};

use super::{ApiState, PeerIdentity, metrics_router, router};
use crate::service::App;
use crate::tls::{self, ClientIdentity, TlsState};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("configuration key `{key}`: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("cannot install a signal handler: {0}")]
    Signal(std::io::Error),
}

/// Bound addresses, reported once the service accepts requests.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    /// The internal CA's revocation listener (`[pki] listen`), if configured.
    pub pki: Option<SocketAddr>,
}

/// Serve until SIGTERM or SIGINT, then shut down gracefully.
pub async fn run(app: Arc<App>, on_ready: impl FnOnce(Bound)) -> Result<(), ServeError> {
    let cfg = app.config().server.clone();
    let tls = Arc::new(ArcSwap::from_pointee(tls::server_config(
        &cfg,
        &app.dynamic().load().clients,
        app.policies(),
    )?));
    let api = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            key: "server.listen",
            addr: cfg.listen,
            source,
        })?;
    let metrics = TcpListener::bind(cfg.metrics_listen)
        .await
        .map_err(|source| ServeError::Bind {
            key: "server.metrics_listen",
            addr: cfg.metrics_listen,
            source,
        })?;
    let pki = match app.config().pki.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    key: "pki.listen",
                    addr,
                    source,
                })?,
        ),
        None => None,
    };
    let bound = Bound {
        pki: pki.as_ref().and_then(|l| l.local_addr().ok()),
        api: api.local_addr().map_err(|source| ServeError::Bind {
            key: "server.listen",
            addr: cfg.listen,
            source,
        })?,
        metrics: metrics.local_addr().map_err(|source| ServeError::Bind {
            key: "server.metrics_listen",
            addr: cfg.metrics_listen,
            source,
        })?,
    };

    let (reloaded_tx, reloaded_rx) = watch::channel(0u64);
    let reload = reloader(Arc::clone(&app), Arc::clone(&tls), reloaded_tx);
    let state = ApiState {
        app: Arc::clone(&app),
        reload: Arc::clone(&reload),
        body_budget: Arc::new(Semaphore::new(cfg.max_buffered_body_bytes)),
        client_bodies: Arc::default(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut hup = signal(SignalKind::hangup()).map_err(ServeError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    // A file size limit hit by the evidence log must fail the write, not kill the process.
    let mut xfsz = signal(SignalKind::from_raw(libc::SIGXFSZ)).map_err(ServeError::Signal)?;

    let metrics_task = tokio::spawn(plain_http_loop(
        metrics,
        metrics_router(Arc::clone(&app)),
        cfg.clone(),
        "metrics connection limit (server.metrics_max_connections) reached",
        stop_rx.clone(),
    ));
    let pki_task = pki.map(|listener| {
        tokio::spawn(plain_http_loop(
            listener,
            crate::http::pki::router(Arc::clone(&app)),
            cfg.clone(),
            "revocation listener connection limit (server.metrics_max_connections) reached",
            stop_rx.clone(),
        ))
    });
    let graceful = GracefulShutdown::new();
    let accept_task = tokio::spawn(accept_loop(
        api,
        Arc::clone(&tls),
        router(state.clone()),
        state.clone(),
        graceful,
        stop_rx,
        reloaded_rx,
    ));

    app.spawn_background();
    tracing::info!(api = %bound.api, metrics = %bound.metrics, "signet serving");
    on_ready(bound);

    loop {
        tokio::select! {
            _ = hup.recv() => {
                match reload() {
                    Ok(summary) => {
                        tracing::info!(%summary, "configuration reloaded");
                        let actor = crate::audit::Actor {
                            identity: "signal:SIGHUP".into(),
                            subject: String::new(),
                            san: Vec::new(),
                            fingerprint_sha256: String::new(),
                        };
                        app.record_reload(actor, None).await;
                    }
                    Err(reason) => tracing::error!(%reason, "configuration reload rejected; the previous configuration stays"),
                }
            }
            _ = xfsz.recv() => tracing::error!("file size limit reached (SIGXFSZ); the evidence log write fails and signing is refused"),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    tracing::info!("shutting down: no new connections; finishing requests in flight");
    let _ = stop_tx.send(true);
    let graceful = accept_task.await.ok();
    if let Some(g) = graceful
        && tokio::time::timeout(cfg.shutdown_timeout, g.shutdown())
            .await
            .is_err()
    {
        tracing::warn!(timeout = ?cfg.shutdown_timeout, "connections still open at the shutdown deadline; closing them");
    }
    app.shutdown().await;
    let _ = metrics_task.await;
    if let Some(t) = pki_task {
        let _ = t.await;
    }
    tracing::info!("signet stopped");
    Ok(())
}

/// Why a reload was refused (the previous configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::Error),
}

/// Reload clients, policies, rotation settings and TLS material; all or nothing. The service
/// reads and applies the configuration; this only stages and swaps the TLS material with it.
fn reloader(
    app: Arc<App>,
    tls_cfg: Arc<ArcSwap<TlsState>>,
    reloaded: watch::Sender<u64>,
) -> Arc<dyn Fn() -> Result<String, ReloadError> + Send + Sync> {
    Arc::new(move || {
        let result = (|| {
            let new = app.reread_configuration()?;
            // Validate the TLS material against the new clients before swapping anything in.
            let staged = Arc::new(ArcSwap::from_pointee(crate::policy::Policies::new(
                &new.dynamic,
            )));
            tls::server_config(&new.server, &new.dynamic.clients, staged)?;
            let fresh_tls = tls::server_config(&new.server, &new.dynamic.clients, app.policies())?;
            let summary = app.apply_reload(new);
            tls_cfg.store(Arc::new(fresh_tls));
            // Established connections re-check their client certificate.
            reloaded.send_modify(|g| *g += 1);
            Ok::<_, ReloadError>(summary)
        })();
        app.count_reload(result.is_ok());
        result
    })
}

/// Log a refusal at most once per period, with how many were not logged in between.
struct QuietWarn {
    what: &'static str,
    period: Duration,
    /// (last logged, refusals since); guarded by its mutex.
    state: Mutex<(Option<Instant>, u64)>,
}

impl QuietWarn {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            period: Duration::from_secs(10),
            state: Mutex::new((None, 0)),
        }
    }

    fn warn(&self, limit: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 += 1;
        if st.0.is_none_or(|t| t.elapsed() >= self.period) {
            tracing::warn!(limit, refused = st.1, "{}; refusing connections", self.what);
            *st = (Some(Instant::now()), 0);
        }
    }
}

/// The limits shared by every connection of the API listener.
struct Gate {
    handshakes: Arc<Semaphore>,
    /// Handshakes in progress per source network.
    handshakes_per_net: Arc<Slots<IpAddr>>,
    connections: Arc<Semaphore>,
    /// Connections per source network (counted before the client is known).
    connections_per_net: Arc<Slots<IpAddr>>,
    /// Connections per client identity.
    connections_per_client: Arc<Slots<String>>,
    /// Requests in flight per client identity, over all its connections.
    requests_per_client: Arc<Slots<String>>,
    handshake_limit: QuietWarn,
    per_ip_limit: QuietWarn,
    connection_limit: QuietWarn,
    per_net_connection_limit: QuietWarn,
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ArcSwap<TlsState>>,
    router: axum::Router,
    state: ApiState,
    graceful: GracefulShutdown,
    mut stop: watch::Receiver<bool>,
    reloaded: watch::Receiver<u64>,
) -> GracefulShutdown {
    let cfg = state.app.config().server.clone();
    let gate = Arc::new(Gate {
        handshakes: Arc::new(Semaphore::new(cfg.max_handshakes)),
        handshakes_per_net: Arc::default(),
        connections: Arc::new(Semaphore::new(cfg.max_connections)),
        connections_per_net: Arc::default(),
        connections_per_client: Arc::default(),
        requests_per_client: Arc::default(),
        handshake_limit: QuietWarn::new("TLS handshake limit (server.max_handshakes) reached"),
        per_ip_limit: QuietWarn::new(
            "TLS handshakes from one address (server.max_handshakes_per_ip) at the limit",
        ),
        connection_limit: QuietWarn::new("connection limit (server.max_connections) reached"),
        per_net_connection_limit: QuietWarn::new(
            "connections from one source network (server.max_connections_per_ip) at the limit",
        ),
    });
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let refused = |app: &App, why: &str| {
            app.metrics()
                .http_requests
                .with_label_values(&["tls_handshake", why])
                .inc();
        };
        let Ok(handshake) = Arc::clone(&gate.handshakes).try_acquire_owned() else {
            gate.handshake_limit.warn(cfg.max_handshakes);
            refused(&state.app, "limited");
            continue;
        };
        let net = slots::network(peer.ip(), cfg.ipv4_prefix, cfg.ipv6_prefix);
        let Some(ip_slot) = gate
            .handshakes_per_net
            .try_take(&net, 1, cfg.max_handshakes_per_ip)
        else {
            gate.per_ip_limit.warn(cfg.max_handshakes_per_ip);
            refused(&state.app, "limited_per_ip");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            peer,
            tls: Arc::clone(&tls),
            router: router.clone(),
            app: Arc::clone(&state.app),
            cfg: cfg.clone(),
            gate: Arc::clone(&gate),
            reloaded: reloaded.clone(),
        };
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            conn.serve(tcp, (handshake, ip_slot), watcher).await;
        });
    }
    graceful
}

/// One API connection's context.
struct Conn {
    peer: SocketAddr,
    tls: Arc<ArcSwap<TlsState>>,
    router: axum::Router,
    app: Arc<App>,
    cfg: crate::config::ServerConfig,
    gate: Arc<Gate>,
    reloaded: watch::Receiver<u64>,
}

/// Requests in flight on a connection and when the last one ended.
struct Activity {
    /// Requests started on the connection so far.
    started: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds since `since` at the last request's end.
    last_ms: AtomicU64,
    since: Instant,
}

impl Activity {
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        Some(self.since.elapsed().saturating_sub(last))
    }
}

/// Counts a request in flight until dropped (the request finished or was cancelled).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.started.fetch_add(1, Ordering::AcqRel);
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(a))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_ms
            .store(a.since.elapsed().as_millis() as u64, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conn {
    async fn serve(
        self,
        tcp: TcpStream,
        handshake: (tokio::sync::OwnedSemaphorePermit, Slot<IpAddr>),
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let peer = self.peer;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.tls.load().config));
        let accepted = tokio::time::timeout(self.cfg.handshake_timeout, acceptor.accept(tcp)).await;
        // The handshake slot is given back whatever happened.
        drop(handshake);
        let count = |outcome: &str| {
            self.app
                .metrics()
                .http_requests
                .with_label_values(&["tls_handshake", outcome])
                .inc();
        };
        let stream = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "TLS handshake refused");
                count("refused");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                count("timeout");
                return;
            }
        };
        let Ok(_connection) = Arc::clone(&self.gate.connections).try_acquire_owned() else {
            self.gate.connection_limit.warn(self.cfg.max_connections);
            count("limited");
            return;
        };
        let net = slots::network(peer.ip(), self.cfg.ipv4_prefix, self.cfg.ipv6_prefix);
        let Some(_net_slot) =
            self.gate
                .connections_per_net
                .try_take(&net, 1, self.cfg.max_connections_per_ip)
        else {
            self.gate
                .per_net_connection_limit
                .warn(self.cfg.max_connections_per_ip);
            count("limited_connections_per_ip");
            return;
        };
        let Some((chain, identity, expires)) = self.client_identity(&stream) else {
            return;
        };
        let client = identity.identity.clone();
        let Some(_client_slot) = self.gate.connections_per_client.try_take(
            &client,
            1,
            self.cfg.max_connections_per_client,
        ) else {
            tracing::info!(%peer, client = %client, "client at its connection share; closing");
            self.app
                .metrics()
                .client_refusals
                .with_label_values(&[client.as_str(), "connections"])
                .inc();
            count("limited_per_client");
            return;
        };
        let activity = Arc::new(Activity {
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            since: Instant::now(),
        });
        let peer_identity = PeerIdentity(Arc::new(identity));
        let (router, act) = (self.router.clone(), Arc::clone(&activity));
        let (requests, share, app) = (
            Arc::clone(&self.gate.requests_per_client),
            self.cfg.max_requests_per_client,
            Arc::clone(&self.app),
        );
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(peer_identity.clone());
            let slot = requests.try_take(&peer_identity.0.identity, 1, share);
            let refusal = slot
                .is_none()
                .then(|| client_share_refused(&app, &peer_identity.0.identity));
            let mut r = router.clone();
            let busy = InFlight::new(&act);
            async move {
                let resp = match refusal {
                    Some(refused) => Ok(refused),
                    None => r.call(req).await,
                };
                drop((busy, slot));
                resp
            }
        });
        let builder = self.http_builder();
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let serving = watcher.watch(conn.into_owned());
        tokio::pin!(serving);

        let now = crate::pki::unix_now(std::time::SystemTime::now());
        let expiry = tokio::time::sleep(Duration::from_secs(expires.saturating_sub(now)));
        tokio::pin!(expiry);
        let mut reloaded = self.reloaded.clone();
        let check_every = (self.cfg.idle_timeout.min(self.cfg.request_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut idle_check = tokio::time::interval(check_every);
        // Set once the connection must go: it then closes as soon as no request is in flight
        // (and the last answer had a moment to leave), or after request_timeout at the latest.
        let mut closing: Option<(&'static str, Instant)> = None;
        let reason = loop {
            tokio::select! {
                r = &mut serving => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = &mut expiry, if closing.is_none() => {
                    closing = Some(("client_certificate_expired", Instant::now()));
                }
                Ok(()) = reloaded.changed(), if closing.is_none() => {
                    if !self.still_trusted(&chain) {
                        closing = Some(("no_longer_trusted", Instant::now()));
                    }
                }
                _ = idle_check.tick() => {
                    let idle = activity.idle_for();
                    if let Some((why, since)) = closing {
                        let drained = idle.is_some_and(|d| d >= Duration::from_millis(200));
                        if drained || since.elapsed() >= self.cfg.request_timeout {
                            break why;
                        }
                        continue;
                    }
                    // No first request within request_timeout (HTTP/1.1's header timeout only
                    // starts once the protocol is known); afterwards, idle_timeout.
                    let limit = if activity.started.load(Ordering::Acquire) == 0 {
                        self.cfg.request_timeout
                    } else {
                        self.cfg.idle_timeout
                    };
                    if idle.is_some_and(|d| d >= limit) {
                        break "idle";
                    }
                }
            }
        };
        // Dropping the connection future closes it.
        tracing::info!(%peer, reason, "closing connection");
        count(&format!("closed_{reason}"));
    }

    /// HTTP/1.1 and HTTP/2 for one connection, with the configured limits and timeouts.
    fn http_builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.cfg.request_timeout)
            .max_buf_size(self.cfg.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(self.cfg.max_header_bytes as u32)
            .max_concurrent_streams(self.cfg.max_streams_per_connection)
            .keep_alive_interval(Some(self.cfg.idle_timeout))
            .keep_alive_timeout(Duration::from_secs(20));
        builder
    }

    /// The client's certificate chain, its identity (known to `[[clients]]`), and the earliest
    /// notAfter in the chain; `None` (logged) for a connection without a usable identity.
    fn client_identity(
        &self,
        stream: &tokio_rustls::server::TlsStream<TcpStream>,
    ) -> Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        ClientIdentity,
        u64,
    )> {
        let peer = self.peer;
        let chain: Vec<rustls::pki_types::CertificateDer<'static>> = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
            .unwrap_or_default();
        let identity = {
            let policies = self.app.policies().load();
            chain
                .first()
                .ok_or(tls::IdentityError::NoIdentity)
                .and_then(|c| {
                    ClientIdentity::from_certificate(c.as_ref(), |i| policies.is_known(i))
                })
        };
        let identity = match identity {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(%peer, reason = %e, "connection without a usable client identity; closing");
                return None;
            }
        };
        // The earliest notAfter in the chain the client presented.
        let expires = chain
            .iter()
            .filter_map(|c| crate::pki::CertInfo::parse(c.as_ref()).ok())
            .map(|c| c.not_after)
            .min()
            .unwrap_or(0);
        Some((chain, identity, expires))
    }

    /// Does the current TLS configuration (after a reload) still accept this client chain?
    fn still_trusted(&self, chain: &[rustls::pki_types::CertificateDer<'static>]) -> bool {
        let Some((ee, intermediates)) = chain.split_first() else {
            return false;
        };
        self.tls
            .load()
            .verifier
            .verify_client_cert(ee, intermediates, rustls::pki_types::UnixTime::now())
            .is_ok()
    }
}

/// A plain-HTTP listener (metrics, the CA's revocation service): HTTP/1.1, at most
/// `server.metrics_max_connections` connections, a header timeout, and at most a minute per
/// connection.
async fn plain_http_loop(
    listener: TcpListener,
    router: axum::Router,
    cfg: crate::config::ServerConfig,
    limit_reached: &'static str,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(cfg.metrics_max_connections));
    let limit = Arc::new(QuietWarn::new(limit_reached));
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            limit.warn(cfg.metrics_max_connections);
            continue;
        };
        let router = router.clone();
        let timeout = cfg.request_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let mut r = router.clone();
                async move { r.call(req).await }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

/// The answer to a request beyond its client's share of requests in flight (counted). It
/// never reached the router: it gets its request ID here.
fn client_share_refused(app: &App, client: &str) -> axum::response::Response {
    app.metrics()
        .client_refusals
        .with_label_values(&[client, "requests"])
        .inc();
    let id = format!("{:032x}", rand::random::<u128>());
    let mut resp = crate::http::Problem::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "client-request-limit",
        "Too many requests in flight for this client",
        "server.max_requests_per_client requests of this client are in flight; retry when one ends",
        &id,
    )
    .retry_after(1)
    .into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
