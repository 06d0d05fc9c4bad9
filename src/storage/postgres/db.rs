//! The database: a pool of connections (TLS through rustls, verify-full), dedicated
//! connections for locks and LISTEN, the health check and the shared-state notifications.

use super::schema::SCHEMA;
use super::*;

/// A database failure, and whether it was the connection (rather than a statement).
pub(super) struct Failed {
    pub(super) message: String,
    pub(super) connection: bool,
}

impl From<tokio_postgres::Error> for Failed {
    fn from(e: tokio_postgres::Error) -> Self {
        use std::error::Error as _;
        let connection = e.is_closed() || e.source().is_some_and(|s| s.is::<std::io::Error>()) || {
            // Connection-class SQLSTATEs (08xxx) and an administrator's shutdown (57P0x).
            e.code()
                .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57P"))
        };
        Self {
            message: with_causes(&e),
            connection,
        }
    }
}

impl From<deadpool_postgres::PoolError> for Failed {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self {
            message: with_causes(&e),
            connection: true,
        }
    }
}

/// An error and its causes ("error performing TLS handshake: invalid peer certificate: ...").
pub(super) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}

/// The database: a connection pool, dedicated connections (LISTEN, locks), and whether it
/// answers.
pub struct Db {
    pub(super) pool: deadpool_postgres::Pool,
    pub(super) pg: tokio_postgres::Config,
    pub(super) tls: MakeRustlsConnect,
    /// This process, as named in claims and the tree head.
    pub replica: String,
    pub(super) up: AtomicBool,
    pub(super) metrics: Arc<Metrics>,
    /// Bumped on `NOTIFY signet_log` (and by this replica's own commits).
    pub(super) log_changed: watch::Sender<u64>,
    /// Bumped on `NOTIFY signet_state` (key states or the rotation journal changed).
    pub(super) state_changed: watch::Sender<u64>,
}

impl Db {
    /// Connect (the pool connects lazily), create or update the schema.
    pub async fn connect(cfg: &PostgresConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, Error> {
        let url = match &cfg.url {
            UrlSource::Inline(u) => u.clone(),
            UrlSource::File(p) => std::fs::read_to_string(p)
                .map_err(|source| Error::Io {
                    path: p.display().to_string(),
                    source,
                })?
                .trim()
                .to_owned(),
        };
        // The URL may hold a password: parse errors never repeat it.
        let mut pg: tokio_postgres::Config = url.parse().map_err(|_| {
            Error::Config("storage.url: the database URL does not parse as a libpq URL".into())
        })?;
        pg.application_name("signet");
        pg.connect_timeout(Duration::from_secs(5));
        pg.keepalives_idle(Duration::from_secs(10));
        // A session that dies mid-transaction releases its row locks soon. Options the URL
        // gives come after ours, so an operator's own settings win.
        let ours = "-c idle_in_transaction_session_timeout=15000 -c lock_timeout=10000";
        let options = match pg.get_options() {
            Some(theirs) if !theirs.trim().is_empty() => format!("{ours} {theirs}"),
            _ => ours.to_owned(),
        };
        pg.options(options);
        let tls = tls_config(cfg, &mut pg)?;
        let manager = deadpool_postgres::Manager::from_config(
            pg.clone(),
            tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| Error::Config(format!("database pool: {e}")))?;
        let db = Arc::new(Self {
            pool,
            pg,
            tls,
            replica: uuid::Uuid::new_v4().to_string(),
            up: AtomicBool::new(false),
            metrics,
            log_changed: watch::Sender::new(0),
            state_changed: watch::Sender::new(0),
        });
        db.migrate().await?;
        db.mark(true);
        Ok(db)
    }

    pub(super) async fn migrate(&self) -> Result<(), Error> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.failed(e))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&LOCK_CLASS, &SCHEMA_LOCK],
        )
        .await
        .map_err(|e| self.failed(e))?;
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await
            .map_err(|e| self.failed(e))?;
        tx.batch_execute(SCHEMA).await.map_err(|e| self.failed(e))?;
        tx.commit().await.map_err(|e| self.failed(e))
    }

    /// A pooled connection; a failure marks the database down.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        let c = self.pool.get().await.map_err(|e| self.failed(e))?;
        self.mark(true);
        Ok(c)
    }

    /// Record a failure: a lost connection marks the database down until a health check
    /// succeeds; a statement the database refused does not.
    pub(super) fn failed(&self, e: impl Into<Failed>) -> Error {
        let Failed {
            message,
            connection,
        } = e.into();
        if connection {
            self.mark(false);
        }
        Error::Unavailable(message)
    }

    pub(super) fn mark(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            if up {
                tracing::info!("database reachable");
            } else {
                tracing::error!("database unreachable; signing answers 503 storage-unavailable");
            }
        }
        self.metrics.storage_up.set(i64::from(up));
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// A connection of its own (LISTEN, session locks), driven by a task that forwards
    /// notifications. The connection closes when the returned client is dropped.
    pub(super) async fn dedicated(
        &self,
    ) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>), Error> {
        let (client, mut connection) = self
            .pg
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.failed(e))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            use futures::StreamExt;
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n.channel().to_owned());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        Ok((client, rx))
    }

    /// Health checks and LISTEN, until `stop`.
    pub fn spawn_watchers(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        let db = Arc::clone(self);
        let mut s = stop.clone();
        tokio::spawn(async move {
            loop {
                let ok = match db.pool.get().await {
                    Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                    Err(_) => false,
                };
                db.mark(ok);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = s.changed() => return,
                }
            }
        });
        let db = Arc::clone(self);
        let mut s = stop;
        tokio::spawn(async move {
            loop {
                if let Ok((client, mut rx)) = db.dedicated().await
                    && client
                        .batch_execute("LISTEN signet_log; LISTEN signet_state")
                        .await
                        .is_ok()
                {
                    // Whatever happened while not listening.
                    db.log_changed.send_modify(|v| *v += 1);
                    db.state_changed.send_modify(|v| *v += 1);
                    loop {
                        tokio::select! {
                            m = rx.recv() => match m.as_deref() {
                                Some("signet_log") => db.log_changed.send_modify(|v| *v += 1),
                                Some(_) => db.state_changed.send_modify(|v| *v += 1),
                                None => break,
                            },
                            _ = s.changed() => return,
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = s.changed() => return,
                }
            }
        });
    }

    /// Notified when another replica changed key states or the rotation journal.
    pub fn state_changes(&self) -> watch::Receiver<u64> {
        self.state_changed.subscribe()
    }

    /// The version of the shared state (key states, journal); bumped by every change.
    pub async fn state_version(&self) -> Result<i64, Error> {
        let c = self.client().await?;
        let row = c
            .query_one("SELECT version FROM signet_state_version WHERE id = 1", &[])
            .await
            .map_err(|e| self.failed(e))?;
        Ok(row.get(0))
    }
}

/// rustls to the database (verify-full against `ca_file`), or plaintext without `ca_file`.
pub(super) fn tls_config(
    cfg: &PostgresConfig,
    pg: &mut tokio_postgres::Config,
) -> Result<MakeRustlsConnect, Error> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(ca) => {
            use rustls_pki_types::CertificateDer;
            use rustls_pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| Error::Config(format!("storage.ca_file {}: {e}", ca.display())))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| Error::Config(format!("storage.ca_file {}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(Error::Config(format!(
                    "storage.ca_file {} holds no certificate",
                    ca.display()
                )));
            }
            // With a CA the connection is TLS, always: never fall back to plaintext.
            pg.ssl_mode(SslMode::Require);
        }
        None => {
            if pg.get_ssl_mode() == SslMode::Require {
                return Err(Error::Config(
                    "storage.ca_file: the URL requires TLS (sslmode=require); name the database server's CA in ca_file".into(),
                ));
            }
            pg.ssl_mode(SslMode::Disable);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Config(format!("TLS to the database: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}
