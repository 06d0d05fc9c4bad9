//! Listeners and lifecycle: the mTLS accept loop (TLS material swapped on reload), the
//! metrics listener, signals (SIGHUP reload, SIGTERM/SIGINT graceful shutdown), and the
//! orderly stop: no new connections, in-flight requests finish, final checkpoint, token closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};
use tower::Service;

use super::{ApiState, PeerIdentity, metrics_router, router};
use crate::service::App;
use crate::tls::{self, ClientIdentity};

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
}

/// Serve until SIGTERM or SIGINT, then shut down gracefully.
pub async fn run(app: Arc<App>, on_ready: impl FnOnce(Bound)) -> Result<(), ServeError> {
    let cfg = app.config.server.clone();
    let tls = Arc::new(ArcSwap::new(tls::server_config(
        &cfg,
        Arc::clone(&app.policies),
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
    let bound = Bound {
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

    let reload = reloader(Arc::clone(&app), Arc::clone(&tls));
    let state = ApiState {
        app: Arc::clone(&app),
        reload: Arc::clone(&reload),
    };
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut hup = signal(SignalKind::hangup()).map_err(ServeError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    // A file size limit hit by the evidence log must fail the write, not kill the process.
    let mut xfsz = signal(SignalKind::from_raw(libc::SIGXFSZ)).map_err(ServeError::Signal)?;

    let mut metrics_stop = stop_rx.clone();
    let metrics_app = Arc::clone(&app);
    let metrics_task = tokio::spawn(async move {
        let _ = axum::serve(metrics, metrics_router(metrics_app))
            .with_graceful_shutdown(async move {
                let _ = metrics_stop.changed().await;
            })
            .await;
    });
    let graceful = GracefulShutdown::new();
    let accept_task = tokio::spawn(accept_loop(
        api,
        Arc::clone(&tls),
        router(state.clone()),
        state.clone(),
        graceful,
        stop_rx,
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
    tracing::info!("signet stopped");
    Ok(())
}

/// Reload clients, policies, rotation settings and TLS material; all or nothing.
fn reloader(
    app: Arc<App>,
    tls_cfg: Arc<ArcSwap<rustls::ServerConfig>>,
) -> Arc<dyn Fn() -> Result<String, String> + Send + Sync> {
    Arc::new(move || {
        let result = (|| {
            let new = app.config.reload_dynamic().map_err(|e| e.to_string())?;
            // Validate the TLS material against the new clients before swapping anything in.
            let staged = Arc::new(ArcSwap::from_pointee(crate::policy::Policies::new(
                &new.dynamic,
            )));
            tls::server_config(&new.server, staged).map_err(|e| e.to_string())?;
            let fresh_tls = tls::server_config(&new.server, Arc::clone(&app.policies))
                .map_err(|e| e.to_string())?;
            for (changed, key) in [
                (
                    new.server.listen != app.config.server.listen,
                    "server.listen",
                ),
                (
                    new.server.metrics_listen != app.config.server.metrics_listen,
                    "server.metrics_listen",
                ),
                (
                    new.hsm.module != app.config.hsm.module
                        || new.hsm.token_label != app.config.hsm.token_label,
                    "hsm",
                ),
                (
                    new.audit.dir != app.config.audit.dir
                        || new.audit.origin != app.config.audit.origin,
                    "audit",
                ),
            ] {
                if changed {
                    tracing::warn!(
                        key,
                        "changed in the configuration file; takes effect only after a restart"
                    );
                }
            }
            let summary = format!(
                "{} clients, {} policies",
                new.dynamic.clients.len(),
                new.dynamic.policies.len()
            );
            app.apply_dynamic(new.dynamic);
            tls_cfg.store(fresh_tls);
            Ok(summary)
        })();
        match &result {
            Ok(_) => {
                app.metrics.config_reloads.with_label_values(&["ok"]).inc();
                app.metrics.config_last_reload_success.set(1);
            }
            Err(_) => {
                app.metrics
                    .config_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                app.metrics.config_last_reload_success.set(0);
            }
        }
        result
    })
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    router: axum::Router,
    state: ApiState,
    graceful: GracefulShutdown,
    mut stop: watch::Receiver<bool>,
) -> GracefulShutdown {
    let cfg = state.app.config.server.clone();
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
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
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(
                limit = cfg.max_connections,
                "connection limit reached; refusing a connection"
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let watcher = graceful.watcher();
        let router = router.clone();
        let app = Arc::clone(&state.app);
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(tcp, peer, acceptor, router, app, cfg, watcher).await;
        });
    }
    graceful
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    router: axum::Router,
    app: Arc<App>,
    cfg: crate::config::ServerConfig,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let stream = match tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake refused");
            app.metrics
                .http_requests
                .with_label_values(&["tls_handshake", "refused"])
                .inc();
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            app.metrics
                .http_requests
                .with_label_values(&["tls_handshake", "timeout"])
                .inc();
            return;
        }
    };
    let identity = {
        let policies = app.policies.load();
        stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| ClientIdentity::from_certificate(c.as_ref(), |i| policies.is_known(i)))
    };
    let Some(identity) = identity else {
        tracing::warn!(%peer, "connection without a usable client identity; closing");
        return;
    };
    let peer_identity = PeerIdentity(Arc::new(identity));
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer_identity.clone());
        let mut r = router.clone();
        async move { r.call(req).await }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.idle_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(cfg.idle_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
