//! The PostgreSQL backend: N replicas, one evidence log.
//!
//! Commit points:
//! - **Sequencing** ([`PgLog::append`]): each replica's sequencer takes every append waiting
//!   (group commit) and runs one transaction: lock the coordinator row `signet_log`
//!   (`SELECT … FOR UPDATE`), assign contiguous indexes and hash links after its
//!   `next_index`/`last_leaf`, apply the signing-order rule against its `active` versions,
//!   check this replica still holds each idempotency claim, insert the entries, record the
//!   claims, advance the row, COMMIT. A signature is acknowledged only after COMMIT returned.
//!   A COMMIT whose outcome is unknown (the connection broke) is resolved by looking the
//!   group's batch ID up under the same row lock before anything is answered.
//! - **Checkpoints** ([`PgLog::checkpoint`]): one replica leads (a session advisory lock on a
//!   dedicated connection, released by the database if the replica dies). The leader signs
//!   the tree it has read and publishes with a compare-and-swap on `signet_tree_head`: a
//!   paused former leader whose view is stale cannot publish an older or conflicting head.
//!   The signed head is also kept in the token (the anchor), as with the file backend.
//!
//! The tree is stored as C2SP tlog-tiles in `signet_tiles` (full tiles of 256 hashes, written
//! by whichever replica completes one; identical whoever does). Every replica follows the log
//! (LISTEN `signet_log` plus a poll) and keeps only the right edge of the tree in memory (at
//! most 255 hashes per tile level) and a bounded cache of tiles: memory is O(log n), and
//! opening reads O(log n) tiles whatever the log's size. Each checkpoint a replica picks up is
//! checked against the tiles before it is served; each entry served is checked against its
//! leaf hash.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::future::BoxFuture;
use p256::ecdsa::VerifyingKey;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::AsyncMessage;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    Claim, Claims, Error, JournalData, JournalStore, KeyStateStore, LeaseGuard, Leases, Replicas,
    TimestampStore,
};
use crate::audit::anchor::{Anchor, TokenAnchor, TreeHead};
use crate::audit::merkle::{self, Hash, Tree};
use crate::audit::note::{self, Checkpoint};
use crate::audit::tiled::{self, Edge, Missing, Tile, TileId, TileNodes};
use crate::audit::timestamp::StoredTimestamp;
use crate::audit::{self, CheckpointSigner, Entry, EntryProof, Receipt, StoredCheckpoint, order};
use crate::config::{PostgresConfig, UrlSource};
use crate::metrics::Metrics;

/// Open the PostgreSQL backend: connect (creating or completing the schema), open the shared
/// log (checked against the token's anchor and the published tree head), and the shared
/// state, claims and replicas.
pub(super) async fn open(
    config: &crate::config::Config,
    pg: &PostgresConfig,
    signer: Arc<dyn CheckpointSigner>,
    token: Arc<dyn TokenAnchor>,
    metrics: Arc<Metrics>,
    accept_restore: bool,
) -> Result<super::Storage, super::OpenError> {
    let db = Db::connect(pg, Arc::clone(&metrics)).await?;
    let log = PgLog::open(
        Arc::clone(&db),
        Options {
            origin: config.audit.origin.clone(),
            max_group_entries: config.audit.max_group_entries,
            accept_restore,
        },
        signer,
        token,
        metrics,
    )
    .await?;
    let state = Arc::new(PgState::new(Arc::clone(&db)));
    Ok(super::Storage {
        log: Arc::new(super::Log::Postgres(Arc::clone(&log))),
        keys: Arc::clone(&state) as _,
        journal: Arc::clone(&state) as _,
        timestamps: state as _,
        leases: Arc::new(PgLeases::new(Arc::clone(&db))),
        claims: Arc::new(PgClaims {
            log: Arc::clone(&log),
            lease: pg.claim_lease,
        }),
        replicas: Arc::new(PgReplicas { db, log }),
    })
}

/// Idempotency claims in `signet_idempotency`, with leases of `[storage] claim_lease`.
struct PgClaims {
    log: Arc<PgLog>,
    lease: Duration,
}

impl Claims for PgClaims {
    fn claim<'a>(
        &'a self,
        client: &'a str,
        key: &'a [u8; 32],
        request_sha256: &'a str,
    ) -> BoxFuture<'a, Result<Claim, audit::Error>> {
        Box::pin(self.log.claim(client, key, request_sha256, self.lease))
    }
    fn release<'a>(&'a self, client: &'a str, key: &'a [u8; 32]) -> BoxFuture<'a, ()> {
        Box::pin(self.log.release(client, key))
    }
    fn expire(&self, retention: Duration) -> BoxFuture<'_, Result<u64, audit::Error>> {
        Box::pin(self.log.expire_claims(retention))
    }
}

/// The replicas sharing the database: health and notification watchers, the checkpoint leader
/// election, the shared-state version.
struct PgReplicas {
    db: Arc<Db>,
    log: Arc<PgLog>,
}

impl Replicas for PgReplicas {
    fn shared(&self) -> bool {
        true
    }
    fn is_leader(&self) -> bool {
        self.log.is_leader()
    }
    fn start(&self, stop: watch::Receiver<bool>) {
        self.db.spawn_watchers(stop);
        self.log.start_leading();
    }
    fn state_changes(&self) -> watch::Receiver<u64> {
        self.db.state_changes()
    }
    fn state_version(&self) -> BoxFuture<'_, Result<i64, Error>> {
        Box::pin(self.db.state_version())
    }
}

/// Advisory lock keys (first half: "SIGN" in ASCII).
const LOCK_CLASS: i32 = 0x5349_474e;
const SCHEMA_LOCK: i32 = 1;
const LEADER_LOCK: i32 = 2;
/// Per-name leases (rotations) use `pg_advisory_lock(LEASE_CLASS, hashtext(name))`.
const LEASE_CLASS: i32 = 0x5349_474f;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS signet_log (
    id smallint PRIMARY KEY CHECK (id = 1),
    origin text NOT NULL,
    next_index bigint NOT NULL,
    last_leaf bytea,
    active jsonb NOT NULL,
    log_key text
);
CREATE TABLE IF NOT EXISTS signet_entries (
    idx bigint PRIMARY KEY,
    leaf bytea NOT NULL,
    body bytea NOT NULL,
    batch text NOT NULL,
    tenant text,
    transaction_id text,
    time_us bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS signet_entries_batch ON signet_entries (batch);
CREATE INDEX IF NOT EXISTS signet_entries_transaction ON signet_entries (transaction_id)
    WHERE transaction_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS signet_entries_tenant ON signet_entries (tenant, idx)
    WHERE tenant IS NOT NULL;
CREATE TABLE IF NOT EXISTS signet_tiles (
    level smallint NOT NULL,
    idx bigint NOT NULL,
    hashes bytea NOT NULL,
    PRIMARY KEY (level, idx)
);
CREATE TABLE IF NOT EXISTS signet_checkpoints (
    tree_size bigint PRIMARY KEY,
    signed_at bigint NOT NULL,
    note text NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_timestamps (
    tree_size bigint PRIMARY KEY,
    note_sha256 text NOT NULL,
    response text NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_tree_head (
    id smallint PRIMARY KEY CHECK (id = 1),
    size bigint NOT NULL,
    root bytea NOT NULL,
    replica text NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_idempotency (
    client text NOT NULL,
    key_hash bytea NOT NULL,
    request_sha256 text NOT NULL,
    holder text,
    lease_until timestamptz,
    entry_index bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client, key_hash)
);
CREATE TABLE IF NOT EXISTS signet_key_states (
    key_id text PRIMARY KEY,
    record jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_rotations (
    tenant text PRIMARY KEY,
    body jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_rotation_history (
    seq bigserial PRIMARY KEY,
    body jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS signet_state_version (
    id smallint PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL
);
INSERT INTO signet_state_version VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION signet_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'signet evidence is append-only: % on % refused', TG_OP, TG_TABLE_NAME;
END $$;
DROP TRIGGER IF EXISTS signet_entries_append_only ON signet_entries;
CREATE TRIGGER signet_entries_append_only BEFORE UPDATE OR DELETE OR TRUNCATE
    ON signet_entries FOR EACH STATEMENT EXECUTE FUNCTION signet_append_only();
DROP TRIGGER IF EXISTS signet_checkpoints_append_only ON signet_checkpoints;
CREATE TRIGGER signet_checkpoints_append_only BEFORE UPDATE OR DELETE OR TRUNCATE
    ON signet_checkpoints FOR EACH STATEMENT EXECUTE FUNCTION signet_append_only();
"#;

/// Full tiles kept in memory per replica (8 KiB each).
const TILE_CACHE: u64 = 4096;

/// History rows kept in `signet_rotation_history`.
const HISTORY: i64 = 200;

/// A database failure, and whether it was the connection (rather than a statement).
struct Failed {
    message: String,
    connection: bool,
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
fn with_causes(e: &dyn std::error::Error) -> String {
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
    pool: deadpool_postgres::Pool,
    pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// This process, as named in claims and the tree head.
    pub replica: String,
    up: AtomicBool,
    metrics: Arc<Metrics>,
    /// Bumped on `NOTIFY signet_log` (and by this replica's own commits).
    log_changed: watch::Sender<u64>,
    /// Bumped on `NOTIFY signet_state` (key states or the rotation journal changed).
    state_changed: watch::Sender<u64>,
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

    async fn migrate(&self) -> Result<(), Error> {
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
    fn failed(&self, e: impl Into<Failed>) -> Error {
        let Failed {
            message,
            connection,
        } = e.into();
        if connection {
            self.mark(false);
        }
        Error::Unavailable(message)
    }

    fn mark(&self, up: bool) {
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
    async fn dedicated(
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
fn tls_config(
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
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Config(format!("TLS to the database: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// An append waiting for the sequencer.
struct Pending {
    entries: Vec<Entry>,
    reply: oneshot::Sender<Result<Vec<Receipt>, audit::Error>>,
}

/// The evidence log in PostgreSQL, as one replica sees it.
pub struct PgLog {
    db: Arc<Db>,
    origin: String,
    signer: Arc<dyn CheckpointSigner>,
    token: Arc<dyn TokenAnchor>,
    metrics: Arc<Metrics>,
    /// The right edge of the tree as far as this replica has read the log (the follower and
    /// this replica's own commits extend it, only ever in index order). Replaced, not
    /// mutated, so a computation holds one consistent edge.
    edge: RwLock<Arc<Edge>>,
    /// Full tiles recently used (immutable), bounded.
    tiles: moka::sync::Cache<TileId, Tile>,
    latest: RwLock<Option<Arc<StoredCheckpoint>>>,
    restore_findings: Vec<String>,
    queue: Mutex<Option<mpsc::UnboundedSender<Pending>>>,
    max_group: usize,
    leader: AtomicBool,
    /// Serialises catching up with the database.
    following: tokio::sync::Mutex<()>,
    /// Serialises this replica's checkpoint signing.
    checkpointing: tokio::sync::Mutex<()>,
    stop: watch::Sender<bool>,
}

/// Options for [`PgLog::open`].
pub struct Options {
    pub origin: String,
    pub max_group_entries: usize,
    pub accept_restore: bool,
}

impl PgLog {
    /// Read the log, check it against its latest checkpoint, the stored tree head and the
    /// token's anchor, then start the sequencer and the follower.
    pub async fn open(
        db: Arc<Db>,
        opts: Options,
        signer: Arc<dyn CheckpointSigner>,
        token: Arc<dyn TokenAnchor>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, audit::Error> {
        let started = Instant::now();
        {
            let c = db.client().await?;
            let empty = merkle::empty_root().to_vec();
            c.execute(
                "INSERT INTO signet_log (id, origin, next_index, last_leaf, active)
                 VALUES (1, $1, 0, NULL, '{}'::jsonb) ON CONFLICT (id) DO NOTHING",
                &[&opts.origin],
            )
            .await
            .map_err(|e| db.failed(e))?;
            c.execute(
                "INSERT INTO signet_tree_head (id, size, root, replica) VALUES (1, 0, $1, '')
                 ON CONFLICT (id) DO NOTHING",
                &[&empty],
            )
            .await
            .map_err(|e| db.failed(e))?;
            let origin: String = c
                .query_one("SELECT origin FROM signet_log WHERE id = 1", &[])
                .await
                .map_err(|e| db.failed(e))?
                .get(0);
            if origin != opts.origin {
                return Err(audit::Error::Inconsistent(format!(
                    "the database holds log `{origin}`, this configuration names `{}`",
                    opts.origin
                )));
            }
            // The log key's public half, for `audit verify --config` and `audit export`; a
            // database whose log another key signs is refused.
            let pem = crate::pki::public_key_pem(&signer.public_key());
            let stored: Option<String> = c
                .query_one(
                    "UPDATE signet_log SET log_key = coalesce(log_key, $1) WHERE id = 1
                     RETURNING log_key",
                    &[&pem],
                )
                .await
                .map_err(|e| db.failed(e))?
                .get(0);
            if stored.as_deref().map(str::trim) != Some(pem.trim()) {
                return Err(audit::Error::AnchorMismatch(
                    "the database's log is signed by another log key than this token's".into(),
                ));
            }
        }
        let (stop, _) = watch::channel(false);
        let log = Arc::new(Self {
            db,
            origin: opts.origin,
            signer,
            token,
            metrics,
            edge: RwLock::new(Arc::new(Edge::new())),
            tiles: moka::sync::Cache::new(TILE_CACHE),
            latest: RwLock::new(None),
            restore_findings: Vec::new(),
            queue: Mutex::new(None),
            max_group: opts.max_group_entries,
            leader: AtomicBool::new(false),
            following: tokio::sync::Mutex::new(()),
            checkpointing: tokio::sync::Mutex::new(()),
            stop,
        });
        let edge = log.load_edge().await?;
        *write(&log.edge) = Arc::new(edge);
        log.catch_up().await?;
        let findings = log.check_anchors().await?;
        if !findings.is_empty() && !opts.accept_restore {
            return Err(audit::Error::AnchorMismatch(findings.join("; ")));
        }
        let mut log = Arc::try_unwrap(log).map_err(|_| audit::Error::Closed)?;
        log.restore_findings = findings;
        let log = Arc::new(log);
        let (tx, rx) = mpsc::unbounded_channel();
        *lock(&log.queue) = Some(tx);
        tokio::spawn(Arc::clone(&log).sequencer(rx));
        tokio::spawn(Arc::clone(&log).follower());
        log.metrics.audit_writable.set(1);
        tracing::info!(
            entries = log.tree_size(),
            checkpoint = log.latest_checkpoint().map_or(0, |c| c.tree_size),
            millis = started.elapsed().as_millis() as u64,
            replica = %log.db.replica,
            "evidence log opened (postgres)"
        );
        Ok(log)
    }

    /// Compare the database with the stored tree head and the token's anchor.
    async fn check_anchors(&self) -> Result<Vec<String>, audit::Error> {
        let mut findings = Vec::new();
        let c = self.db.client().await?;
        let row = c
            .query_one("SELECT size, root FROM signet_tree_head WHERE id = 1", &[])
            .await
            .map_err(|e| self.db.failed(e))?;
        let (size, root): (i64, Vec<u8>) = (row.get(0), row.get(1));
        let size = size as u64;
        let len = self.tree_size();
        if size > len {
            findings.push(format!(
                "the log holds {len} entries but its published tree head covers {size}: entries were removed"
            ));
        } else if self.root(size).await?.to_vec() != root {
            findings.push(format!(
                "the root hash at size {size} differs from the published tree head: entries were rewritten"
            ));
        }
        let token = Arc::clone(&self.token);
        let anchors = tokio::task::spawn_blocking(move || token.load())
            .await
            .map_err(|e| audit::Error::Token(e.to_string()))?
            .map_err(|e| audit::Error::Token(e.to_string()))?;
        let anchor = anchors
            .iter()
            .filter_map(|b| Anchor::decode(b).ok())
            .max_by_key(|a| a.size);
        if let Some(a) = anchor {
            if a.origin != self.origin {
                return Err(audit::Error::AnchorMismatch(format!(
                    "the token anchors log `{}`, this is log `{}`",
                    a.origin, self.origin
                )));
            }
            let len = self.tree_size();
            if len < a.size {
                findings.push(format!(
                    "the database holds {len} entries but the token's anchor covers {}: an older copy of the database was restored, or entries were removed",
                    a.size
                ));
            } else if a.root_hash().ok() != Some(self.root(a.size).await?) {
                findings.push(format!(
                    "the root hash at size {} differs from the token's anchor: entries were rewritten",
                    a.size
                ));
            }
            if !findings.is_empty() {
                findings.push(format!(
                    "the token's anchor before the restore: size {}, root {}",
                    a.size, a.root
                ));
            }
        }
        Ok(findings)
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn restore_findings(&self) -> &[String] {
        &self.restore_findings
    }

    pub fn is_writable(&self) -> bool {
        self.db.is_up()
    }

    pub fn tree_size(&self) -> u64 {
        read(&self.edge).size()
    }

    /// The right edge of the committed tree.
    pub(crate) fn edge(&self) -> Arc<Edge> {
        Arc::clone(&read(&self.edge))
    }

    /// Run an RFC 6962 computation over the tree: a pass that learns which full tiles it needs,
    /// then the computation with them (from the cache, the database, or rebuilt from below).
    async fn with_nodes<T>(
        &self,
        edge: &Edge,
        f: impl Fn(&mut TileNodes<'_>) -> Result<T, Missing>,
    ) -> Result<T, audit::Error> {
        let none = HashMap::new();
        let mut collect = TileNodes::collecting(edge, &none);
        let _ = f(&mut collect);
        let mut fetched = HashMap::new();
        for id in collect.missing() {
            fetched.insert(id, self.tile(id).await?);
        }
        f(&mut TileNodes::new(edge, &fetched)).map_err(|Missing(id)| {
            audit::Error::Inconsistent(format!("tile {id:?} could not be read"))
        })
    }

    /// A full tile: cached, stored, or built from the level below (and stored).
    pub(crate) fn tile(&self, id: TileId) -> BoxFuture<'_, Result<Tile, audit::Error>> {
        Box::pin(async move {
            if let Some(t) = self.tiles.get(&id) {
                return Ok(t);
            }
            let (level, index) = id;
            let c = self.db.client().await?;
            let stored: Option<Vec<u8>> = c
                .query_opt(
                    "SELECT hashes FROM signet_tiles WHERE level = $1 AND idx = $2",
                    &[&(level as i16), &(index as i64)],
                )
                .await
                .map_err(|e| self.db.failed(e))?
                .map(|r| r.get(0));
            drop(c);
            let tile = match stored {
                Some(bytes) => Arc::new(decode_hashes(&bytes).ok_or_else(|| {
                    audit::Error::Inconsistent(format!("tile {id:?} is malformed"))
                })?),
                None => {
                    let built = self.build_tile(id).await?;
                    self.store_tiles(std::slice::from_ref(&(id, Arc::clone(&built))))
                        .await;
                    built
                }
            };
            if tile.len() != tiled::WIDTH {
                return Err(audit::Error::Inconsistent(format!(
                    "tile {id:?} holds {} hashes",
                    tile.len()
                )));
            }
            self.tiles.insert(id, Arc::clone(&tile));
            Ok(tile)
        })
    }

    /// A full tile nobody stored yet (a log migrated or written before tiles): from the
    /// leaves, or from the 256 tiles below it.
    async fn build_tile(&self, (level, index): TileId) -> Result<Tile, audit::Error> {
        let width = tiled::WIDTH as u64;
        let hashes = if level == 0 {
            self.leaves(index * width, (index + 1) * width).await?
        } else {
            let mut out = Vec::with_capacity(tiled::WIDTH);
            for j in 0..width {
                out.push(tiled::tile_root(
                    &self.tile((level - 1, index * width + j)).await?,
                ));
            }
            out
        };
        if hashes.len() != tiled::WIDTH {
            return Err(audit::Error::Inconsistent(format!(
                "tile ({level}, {index}) is not complete"
            )));
        }
        Ok(Arc::new(hashes))
    }

    /// The leaf hashes of entries `from..to` that exist, in order.
    async fn leaves(&self, from: u64, to: u64) -> Result<Vec<Hash>, audit::Error> {
        let c = self.db.client().await?;
        let rows = c
            .query(
                "SELECT leaf FROM signet_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                &[&(from as i64), &(to as i64)],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        rows.iter()
            .map(|r| Hash::try_from(r.get::<_, &[u8]>(0)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| audit::Error::Inconsistent("a malformed leaf hash".into()))
    }

    /// Keep completed tiles (cache and database); a failure only costs a rebuild later.
    async fn store_tiles(&self, tiles: &[(TileId, Tile)]) {
        if tiles.is_empty() {
            return;
        }
        for (id, t) in tiles {
            self.tiles.insert(*id, Arc::clone(t));
        }
        if let Ok(c) = self.db.client().await
            && let Err(e) = insert_tiles(&**c, &mut tiles.to_vec()).await
        {
            tracing::debug!(error = %e, "cannot store tiles; they are rebuilt when needed");
        }
    }

    /// The right edge of the committed log, from O(log n) rows and tiles.
    async fn load_edge(&self) -> Result<Edge, audit::Error> {
        let c = self.db.client().await?;
        let size = c
            .query_one("SELECT next_index FROM signet_log WHERE id = 1", &[])
            .await
            .map_err(|e| self.db.failed(e))?
            .get::<_, i64>(0) as u64;
        drop(c);
        let width = tiled::WIDTH as u64;
        let mut partial = vec![self.leaves(size - size % width, size).await?];
        for level in 1..tiled::levels(size) {
            let count = tiled::hashes_at(size, level);
            let mut row = Vec::new();
            for j in count - count % width..count {
                row.push(tiled::tile_root(&self.tile((level - 1, j)).await?));
            }
            partial.push(row);
        }
        Edge::from_partials(size, partial).map_err(|e| audit::Error::Inconsistent(e.to_string()))
    }

    /// Append leaves read in order after `edge`'s size; store the tiles they complete.
    async fn extend(&self, base: u64, leaves: &[Hash]) {
        let completed = {
            let mut guard = write(&self.edge);
            if guard.size() != base {
                return;
            }
            let mut edge = (**guard).clone();
            let mut completed = Vec::new();
            for l in leaves {
                completed.extend(edge.push(*l));
            }
            self.metrics.audit_tree_size.set(edge.size() as i64);
            *guard = Arc::new(edge);
            completed
        };
        self.store_tiles(&completed).await;
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.signer.public_key()
    }

    pub fn latest_checkpoint(&self) -> Option<Arc<StoredCheckpoint>> {
        read(&self.latest).clone()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    /// Append entries and return once their transaction committed.
    pub async fn append(&self, entries: Vec<Entry>) -> Result<Vec<Receipt>, audit::Error> {
        let (reply, rx) = oneshot::channel();
        lock(&self.queue)
            .as_ref()
            .ok_or(audit::Error::Closed)?
            .send(Pending { entries, reply })
            .map_err(|_| audit::Error::Closed)?;
        rx.await.map_err(|_| audit::Error::Closed)?
    }

    pub fn close(&self) {
        lock(&self.queue).take();
        let _ = self.stop.send(true);
    }

    /// The sequencer: one transaction per group of waiting appends.
    async fn sequencer(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Pending>) {
        while let Some(first) = rx.recv().await {
            let mut count = first.entries.len();
            let mut group = vec![first];
            while count < self.max_group {
                match rx.try_recv() {
                    Ok(p) => {
                        count += p.entries.len();
                        group.push(p);
                    }
                    Err(_) => break,
                }
            }
            self.commit(group).await;
        }
    }

    async fn commit(&self, group: Vec<Pending>) {
        let batch = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let (requests, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|p| (p.entries, p.reply)).unzip();
        let outcome = match self.sequence(&batch, requests).await {
            Ok(s) => Ok(s),
            Err(Failure::Before(e)) => Err(e),
            Err(Failure::Unknown(sequenced, e)) => {
                tracing::warn!(error = %e, batch, "commit outcome unknown; looking the batch up");
                match self.resolve(&batch).await {
                    Ok(true) => Ok(sequenced),
                    Ok(false) => Err(audit::Error::Storage(format!(
                        "the commit failed ({e}); nothing was recorded"
                    ))),
                    Err(e2) => Err(audit::Error::Storage(format!(
                        "the commit outcome is unknown ({e}) and the lookup failed ({e2})"
                    ))),
                }
            }
        };
        match outcome {
            Err(e) => {
                self.metrics.audit_write_errors.inc();
                let msg = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(audit::Error::Storage(msg.clone())));
                }
            }
            Ok(s) => {
                self.metrics
                    .storage_commit_duration
                    .observe(started.elapsed().as_secs_f64());
                if !s.leaves.is_empty() {
                    self.metrics.audit_group_size.observe(s.leaves.len() as f64);
                    self.extend(s.base, &s.leaves).await;
                    self.db.log_changed.send_modify(|v| *v += 1);
                }
                for ev in &s.events {
                    self.metrics
                        .audit_entries
                        .with_label_values(&[ev.as_str()])
                        .inc();
                }
                for (reply, r) in replies.into_iter().zip(s.results) {
                    let _ = reply.send(r);
                }
            }
        }
    }

    /// The sequencing transaction. See the module documentation for its commit point.
    async fn sequence(&self, batch: &str, requests: Vec<Vec<Entry>>) -> Result<Sequenced, Failure> {
        let before = |e: Error| Failure::Before(e.into());
        let mut c = self.db.client().await.map_err(before)?;
        let db = &self.db;
        let tx = c.transaction().await.map_err(|e| before(db.failed(e)))?;
        // Statements are prepared once per connection (deadpool's cache): one round trip each.
        let lock = tx
            .prepare_cached(
                "SELECT next_index, last_leaf, active FROM signet_log WHERE id = 1 FOR UPDATE",
            )
            .await
            .map_err(|e| before(db.failed(e)))?;
        let row = tx
            .query_one(&lock, &[])
            .await
            .map_err(|e| before(db.failed(e)))?;
        let base = row.get::<_, i64>(0) as u64;
        let mut previous: Option<Hash> = row
            .get::<_, Option<Vec<u8>>>(1)
            .and_then(|b| Hash::try_from(b.as_slice()).ok());
        let mut active: order::ActiveVersions = serde_json::from_value(row.get::<_, Value>(2))
            .map_err(|e| before(Error::Invalid(format!("signet_log.active: {e}"))))?;

        // Idempotency claims this group relies on, locked until COMMIT.
        let claimed: Vec<(String, Vec<u8>)> =
            requests.iter().flatten().filter_map(claim_key).collect();
        let mut holders: ClaimHolders = HashMap::new();
        if !claimed.is_empty() {
            let (clients, keys): (Vec<String>, Vec<Vec<u8>>) = claimed.iter().cloned().unzip();
            let claims = tx
                .prepare_cached(
                    "SELECT client, key_hash, holder, entry_index FROM signet_idempotency
                     WHERE (client, key_hash) IN (SELECT * FROM unnest($1::text[], $2::bytea[]))
                     FOR UPDATE",
                )
                .await
                .map_err(|e| before(db.failed(e)))?;
            for r in tx
                .query(&claims, &[&clients, &keys])
                .await
                .map_err(|e| before(db.failed(e)))?
            {
                holders.insert((r.get(0), r.get(1)), (r.get(2), r.get(3)));
            }
        }

        let mut next = base;
        let mut rows = Rows::default();
        let mut leaves = Vec::new();
        let mut events = Vec::new();
        let mut results = Vec::with_capacity(requests.len());
        for entries in requests {
            let mark = (
                next,
                previous,
                leaves.len(),
                events.len(),
                rows.len(),
                rows.claims.len(),
            );
            let active_before = active.clone();
            let mut out = Vec::with_capacity(entries.len());
            let mut failed = None;
            for mut e in entries {
                e.index = next;
                e.previous_leaf_hash = previous.map(|h| B64.encode(h));
                if let Some(k) = claim_key(&e) {
                    match holders.get(&k) {
                        Some((Some(h), None)) if *h == db.replica => {}
                        None => {}
                        _ => {
                            failed = Some(audit::Error::ClaimLost);
                            break;
                        }
                    }
                }
                if let Err(v) = active.observe(&e) {
                    failed = Some(audit::Error::Superseded(v));
                    break;
                }
                let bytes = match e.canonical() {
                    Ok(b) => b,
                    Err(err) => {
                        failed = Some(audit::Error::Serialize(err.to_string()));
                        break;
                    }
                };
                let leaf = merkle::leaf_hash(&bytes);
                rows.push(next, leaf, bytes, &e);
                if let Some((client, key)) = claim_key(&e) {
                    rows.claims.push((
                        client,
                        key,
                        e.request_sha256.clone().unwrap_or_default(),
                        next as i64,
                    ));
                }
                out.push(Receipt {
                    log_origin: self.origin.clone(),
                    index: next,
                    leaf_hash: B64.encode(leaf),
                });
                leaves.push(leaf);
                events.push(e.event.clone());
                previous = Some(leaf);
                next += 1;
            }
            match failed {
                None => results.push(Ok(out)),
                Some(err) => {
                    // Drop this request's entries only; the rest of the group goes ahead.
                    next = mark.0;
                    previous = mark.1;
                    leaves.truncate(mark.2);
                    events.truncate(mark.3);
                    rows.truncate(mark.4, mark.5);
                    active = active_before;
                    results.push(Err(err));
                }
            }
        }
        let sequenced = Sequenced {
            base,
            leaves,
            events,
            results,
        };
        if sequenced.leaves.is_empty() {
            let _ = tx.rollback().await;
            return Ok(sequenced);
        }
        let active_json = serde_json::to_value(&active)
            .map_err(|e| before(Error::Invalid(format!("signet_log.active: {e}"))))?;
        let last = previous.map(|h| h.to_vec());
        insert_rows(&tx, &mut rows, batch)
            .await
            .map_err(|e| before(db.failed(e)))?;
        // Advance the coordinator row and notify the other replicas (delivered at COMMIT).
        let advance = tx
            .prepare_cached(
                "WITH advanced AS (
                     UPDATE signet_log SET next_index = $1, last_leaf = $2, active = $3
                     WHERE id = 1 RETURNING 1)
                 SELECT pg_notify('signet_log', '') FROM advanced",
            )
            .await
            .map_err(|e| before(db.failed(e)))?;
        tx.query(&advance, &[&(next as i64), &last, &active_json])
            .await
            .map_err(|e| before(db.failed(e)))?;
        crash_point("before-commit");
        // Commit point: once this returns Ok, the entries are durable and acknowledged.
        if let Err(e) = tx.commit().await {
            return Err(Failure::Unknown(sequenced, db.failed(e).to_string()));
        }
        crash_point("after-commit");
        Ok(sequenced)
    }

    /// Did batch `batch` commit? Asked under the coordinator row lock, so a commit still in
    /// progress (e.g. waiting for a synchronous standby) has finished either way.
    async fn resolve(&self, batch: &str) -> Result<bool, Error> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let mut c = self.db.client().await?;
                let tx = c.transaction().await.map_err(|e| self.db.failed(e))?;
                tx.batch_execute("SET LOCAL lock_timeout = '5s'")
                    .await
                    .map_err(|e| self.db.failed(e))?;
                tx.query_one("SELECT 1 FROM signet_log WHERE id = 1 FOR UPDATE", &[])
                    .await
                    .map_err(|e| self.db.failed(e))?;
                let found = tx
                    .query_opt(
                        "SELECT 1 FROM signet_entries WHERE batch = $1 LIMIT 1",
                        &[&batch],
                    )
                    .await
                    .map_err(|e| self.db.failed(e))?
                    .is_some();
                let _ = tx.rollback().await;
                Ok::<_, Error>(found)
            };
            match attempt.await {
                Ok(found) => return Ok(found),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Follow the database: new entries and checkpoints, on NOTIFY and every 500 ms.
    async fn follower(self: Arc<Self>) {
        let mut changed = self.db.log_changed.subscribe();
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
            if let Err(e) = self.catch_up().await {
                tracing::debug!(error = %e, "cannot follow the evidence log yet");
            }
        }
    }

    /// Read the leaves this replica has not seen, then the latest checkpoint (checked against
    /// them before it is used).
    async fn catch_up(&self) -> Result<(), audit::Error> {
        let _g = self.following.lock().await;
        let c = self.db.client().await?;
        loop {
            let from = self.tree_size();
            let rows = c
                .query(
                    "SELECT idx, leaf FROM signet_entries WHERE idx >= $1 ORDER BY idx LIMIT 50000",
                    &[&(from as i64)],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            let n = rows.len();
            let mut leaves = Vec::with_capacity(n);
            for r in rows {
                let (idx, leaf): (i64, &[u8]) = (r.get(0), r.get(1));
                if idx as u64 != from + leaves.len() as u64 {
                    break;
                }
                leaves.push(Hash::try_from(leaf).map_err(|_| {
                    audit::Error::Inconsistent(format!("entry {idx} has a malformed leaf hash"))
                })?);
            }
            self.extend(from, &leaves).await;
            if n < 50000 {
                break;
            }
        }
        let row = c
            .query_opt(
                "SELECT tree_size, signed_at, note FROM signet_checkpoints
                 ORDER BY tree_size DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        if let Some(r) = row {
            let cp = StoredCheckpoint {
                tree_size: r.get::<_, i64>(0) as u64,
                signed_at: r.get::<_, i64>(1) as u64,
                note: r.get(2),
            };
            if self
                .latest_checkpoint()
                .is_none_or(|l| l.tree_size < cp.tree_size)
                && cp.tree_size <= self.tree_size()
            {
                // Signed by the log key, and its root is the tree's at its size.
                let parsed =
                    note::verify_checkpoint(&cp.note, &self.origin, &self.signer.public_key())
                        .map_err(|e| {
                            audit::Error::Inconsistent(format!(
                                "checkpoint at size {}: {e}",
                                cp.tree_size
                            ))
                        })?;
                if parsed.size != cp.tree_size || self.root(parsed.size).await? != parsed.root {
                    return Err(audit::Error::Inconsistent(format!(
                        "the signed checkpoint at size {} does not match the stored tree",
                        cp.tree_size
                    )));
                }
                self.publish(Arc::new(cp));
            }
        }
        Ok(())
    }

    fn publish(&self, cp: Arc<StoredCheckpoint>) {
        self.metrics.audit_checkpoint_size.set(cp.tree_size as i64);
        self.metrics.audit_last_checkpoint.set(cp.signed_at as i64);
        *write(&self.latest) = Some(cp);
    }

    /// Take part in the election of the checkpoint signer (a serving replica; not CLI tools).
    pub fn start_leading(self: &Arc<Self>) {
        tokio::spawn(Arc::clone(self).lead());
    }

    /// Try to become the checkpoint leader; hold it while the connection lives.
    async fn lead(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            if let Ok((client, _rx)) = self.db.dedicated().await {
                loop {
                    let held = client
                        .query_one(
                            "SELECT pg_try_advisory_lock($1, $2)",
                            &[&LOCK_CLASS, &LEADER_LOCK],
                        )
                        .await
                        .map(|r| r.get::<_, bool>(0));
                    match held {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(_) => break,
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                }
                if !client.is_closed() {
                    self.leader.store(true, Ordering::Release);
                    self.metrics.storage_leader.set(1);
                    tracing::info!(replica = %self.db.replica, "this replica now signs checkpoints");
                    // Leader while the session (and with it the lock) lives.
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.changed() => {
                                self.leader.store(false, Ordering::Release);
                                return;
                            }
                        }
                        if client.simple_query("SELECT 1").await.is_err() {
                            break;
                        }
                    }
                    self.leader.store(false, Ordering::Release);
                    self.metrics.storage_leader.set(0);
                    tracing::warn!("lost the checkpoint leadership (database session ended)");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Sign and publish a checkpoint of everything committed, if this replica leads (or
    /// `force`) and the tree grew. Fenced by a compare-and-swap on `signet_tree_head`.
    pub async fn checkpoint(
        &self,
        now_unix: u64,
        force: bool,
    ) -> Result<Option<Arc<StoredCheckpoint>>, audit::Error> {
        self.catch_up().await?;
        if !force && !self.is_leader() {
            return Ok(None);
        }
        let _g = self.checkpointing.lock().await;
        let c = self.db.client().await?;
        let head = c
            .query_one("SELECT size FROM signet_tree_head WHERE id = 1", &[])
            .await
            .map_err(|e| self.db.failed(e))?;
        let published = head.get::<_, i64>(0) as u64;
        let edge = self.edge();
        let size = edge.size();
        if size <= published {
            return Ok(None);
        }
        let root = edge.root();
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size,
            root,
        };
        let signer = Arc::clone(&self.signer);
        let body = cp.body();
        let sig = tokio::task::spawn_blocking(move || signer.sign(body.as_bytes()))
            .await
            .map_err(|e| audit::Error::Sign(e.to_string()))?
            .map_err(audit::Error::Sign)?;
        let note = note::signed_checkpoint(&cp, &self.signer.public_key(), sig);
        let stored = StoredCheckpoint {
            tree_size: size,
            signed_at: now_unix,
            note,
        };
        let mut c = c;
        let tx = c.transaction().await.map_err(|e| self.db.failed(e))?;
        let current = tx
            .query_one(
                "SELECT size FROM signet_tree_head WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(|e| self.db.failed(e))?
            .get::<_, i64>(0) as u64;
        if current != published {
            // Someone else published meanwhile: this view is stale (a paused former leader).
            let _ = tx.rollback().await;
            tracing::info!(
                published = current,
                mine = size,
                "checkpoint not published: another replica published first"
            );
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO signet_checkpoints (tree_size, signed_at, note) VALUES ($1, $2, $3)",
            &[&(size as i64), &(now_unix as i64), &stored.note],
        )
        .await
        .map_err(|e| self.db.failed(e))?;
        tx.execute(
            "UPDATE signet_tree_head SET size = $1, root = $2, replica = $3 WHERE id = 1",
            &[&(size as i64), &root.to_vec(), &self.db.replica],
        )
        .await
        .map_err(|e| self.db.failed(e))?;
        tx.execute("SELECT pg_notify('signet_log', '')", &[])
            .await
            .map_err(|e| self.db.failed(e))?;
        tx.commit().await.map_err(|e| self.db.failed(e))?;
        // The anchor follows the published head, so it never covers more than the database.
        let token = Arc::clone(&self.token);
        let anchor = Anchor::new(&self.origin, TreeHead { size, root }).encode();
        tokio::task::spawn_blocking(move || token.store(&anchor))
            .await
            .map_err(|e| audit::Error::Token(e.to_string()))?
            .map_err(|e| audit::Error::Token(e.to_string()))?;
        let stored = Arc::new(stored);
        self.publish(Arc::clone(&stored));
        Ok(Some(stored))
    }

    /// Delete idempotency records older than `retention` (the entries stay in the log).
    pub async fn expire_claims(&self, retention: Duration) -> Result<u64, audit::Error> {
        let c = self.db.client().await?;
        let secs = retention.as_secs_f64();
        c.execute(
            "DELETE FROM signet_idempotency
             WHERE created_at < now() - make_interval(secs => $1::float8)",
            &[&secs],
        )
        .await
        .map_err(|e| self.db.failed(e).into())
    }

    /// Claim idempotency key (`client`, `key`) for this replica, or find what it recorded.
    /// Waits while another replica's live claim runs; takes an expired one over.
    pub async fn claim(
        &self,
        client: &str,
        key: &[u8; 32],
        request_sha256: &str,
        lease: Duration,
    ) -> Result<Claim, audit::Error> {
        let deadline = Instant::now() + lease * 2;
        let lease_secs = lease.as_secs_f64();
        let key = key.to_vec();
        loop {
            let c = self.db.client().await?;
            let inserted = c
                .execute(
                    "INSERT INTO signet_idempotency (client, key_hash, request_sha256, holder, lease_until)
                     VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8))
                     ON CONFLICT (client, key_hash) DO NOTHING",
                    &[&client, &key, &request_sha256, &self.db.replica, &lease_secs],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            if inserted == 1 {
                return Ok(Claim::Owned);
            }
            let row = c
                .query_opt(
                    "SELECT request_sha256, entry_index, lease_until IS NULL OR lease_until <= now()
                     FROM signet_idempotency WHERE client = $1 AND key_hash = $2",
                    &[&client, &key],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            if let Some(r) = row {
                let (recorded_hash, index, expired): (String, Option<i64>, bool) =
                    (r.get(0), r.get(1), r.get(2));
                if let Some(i) = index {
                    return Ok(Claim::Recorded {
                        request_sha256: recorded_hash,
                        index: i as u64,
                    });
                }
                if recorded_hash != request_sha256 {
                    return Ok(Claim::Conflict);
                }
                if expired {
                    let taken = c
                        .execute(
                            "UPDATE signet_idempotency
                             SET holder = $3, lease_until = now() + make_interval(secs => $4::float8)
                             WHERE client = $1 AND key_hash = $2 AND entry_index IS NULL
                               AND (lease_until IS NULL OR lease_until <= now())",
                            &[&client, &key, &self.db.replica, &lease_secs],
                        )
                        .await
                        .map_err(|e| self.db.failed(e))?;
                    if taken == 1 {
                        tracing::info!("took over an expired idempotency claim of another replica");
                        return Ok(Claim::Owned);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(audit::Error::ClaimLost);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Give up this replica's unrecorded claim (its attempt failed), so a retry proceeds.
    pub async fn release(&self, client: &str, key: &[u8; 32]) {
        let key = key.to_vec();
        if let Ok(c) = self.db.client().await {
            let _ = c
                .execute(
                    "DELETE FROM signet_idempotency
                     WHERE client = $1 AND key_hash = $2 AND holder = $3 AND entry_index IS NULL",
                    &[&client, &key, &self.db.replica],
                )
                .await;
        }
    }

    pub async fn entry(&self, index: u64) -> Result<Vec<u8>, audit::Error> {
        let c = self.db.client().await?;
        let row = c
            .query_opt(
                "SELECT body FROM signet_entries WHERE idx = $1",
                &[&(i64::try_from(index).map_err(|_| audit::Error::NoSuchEntry(index))?)],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        row.map(|r| r.get(0))
            .ok_or(audit::Error::NoSuchEntry(index))
    }

    /// Entries `first .. first + count`, in order.
    pub async fn entries(&self, first: u64, count: u64) -> Result<Vec<Vec<u8>>, audit::Error> {
        let c = self.db.client().await?;
        let rows = c
            .query(
                "SELECT body FROM signet_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                &[&(first as i64), &((first + count) as i64)],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        if rows.len() as u64 != count {
            return Err(audit::Error::NoSuchEntry(first + rows.len() as u64));
        }
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    pub async fn prove_with(
        &self,
        index: u64,
        checkpoint: Arc<StoredCheckpoint>,
    ) -> Result<EntryProof, audit::Error> {
        if index >= checkpoint.tree_size {
            return Err(if index >= self.tree_size() {
                audit::Error::NoSuchEntry(index)
            } else {
                audit::Error::NotYetCheckpointed {
                    index,
                    size: checkpoint.tree_size,
                }
            });
        }
        let size = checkpoint.tree_size;
        let (hashes, leaf_hash) = self
            .with_nodes(&self.edge(), |n| {
                let leaf = merkle::Nodes::node(n, 0, index)?;
                Ok(match merkle::inclusion_proof(n, index, size) {
                    Ok(proof) => Ok((proof?, leaf)),
                    Err(e) => Err(e),
                })
            })
            .await??;
        let entry = self.entry(index).await?;
        EntryProof::checked(index, entry, leaf_hash, hashes, checkpoint)
    }

    pub async fn transaction_entries(
        &self,
        transaction_id: &str,
    ) -> Result<Vec<u64>, audit::Error> {
        let c = self.db.client().await?;
        let rows = c
            .query(
                "SELECT idx FROM signet_entries WHERE transaction_id = $1 ORDER BY idx",
                &[&transaction_id],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        Ok(rows
            .into_iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
    }

    pub async fn tenant_entries(
        &self,
        tenant: &str,
        since_us: i64,
        until_us: i64,
        after: Option<u64>,
        limit: usize,
    ) -> Result<super::Page, audit::Error> {
        let c = self.db.client().await?;
        let after = after.map_or(-1, |a| a as i64);
        let rows = c
            .query(
                "SELECT idx FROM signet_entries
                 WHERE tenant = $1 AND idx > $2 AND time_us >= $3 AND time_us < $4
                 ORDER BY idx LIMIT $5",
                &[&tenant, &after, &since_us, &until_us, &(limit as i64)],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        let indexes: Vec<u64> = rows
            .into_iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect();
        let next_cursor = (indexes.len() == limit)
            .then(|| indexes.last().copied())
            .flatten();
        Ok(super::Page {
            indexes,
            next_cursor,
        })
    }

    pub async fn consistency(&self, from: u64, to: u64) -> Result<Vec<Hash>, audit::Error> {
        let signed = self.latest_checkpoint().map_or(0, |c| c.tree_size);
        if to > signed {
            return Err(audit::Error::NotYetCheckpointed {
                index: to.saturating_sub(1),
                size: signed,
            });
        }
        let edge = self.edge();
        if to > edge.size() {
            return Err(audit::Error::Proof(merkle::ProofError::SizeOutOfRange {
                size: to,
                have: edge.size(),
            }));
        }
        Ok(self
            .with_nodes(&edge, |n| {
                Ok(match merkle::consistency_proof(n, from, to) {
                    Ok(proof) => Ok(proof?),
                    Err(e) => Err(e),
                })
            })
            .await??)
    }

    /// The root of the first `size` leaves.
    pub async fn root(&self, size: u64) -> Result<Hash, audit::Error> {
        let edge = self.edge();
        if size > edge.size() {
            return Err(audit::Error::Proof(merkle::ProofError::SizeOutOfRange {
                size,
                have: edge.size(),
            }));
        }
        self.with_nodes(&edge, |n| merkle::root(n, size)).await
    }
}

impl Drop for PgLog {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// (client, key hash) → (holder, recorded entry index) of the claims a group relies on.
type ClaimHolders = HashMap<(String, Vec<u8>), (Option<String>, Option<i64>)>;

/// What one sequencing transaction did, per request.
struct Sequenced {
    base: u64,
    leaves: Vec<Hash>,
    events: Vec<String>,
    results: Vec<Result<Vec<Receipt>, audit::Error>>,
}

enum Failure {
    /// Nothing was committed.
    Before(audit::Error),
    /// COMMIT was sent but its answer was lost: what would have been committed, and why.
    Unknown(Sequenced, String),
}

/// Column arrays for one multi-row insert.
#[derive(Default)]
struct Rows {
    idx: Vec<i64>,
    leaf: Vec<Vec<u8>>,
    body: Vec<Vec<u8>>,
    tenant: Vec<Option<String>>,
    transaction: Vec<Option<String>>,
    time_us: Vec<i64>,
    claims: Vec<(String, Vec<u8>, String, i64)>,
}

impl Rows {
    fn push(&mut self, index: u64, leaf: Hash, body: Vec<u8>, e: &Entry) {
        self.idx.push(index as i64);
        self.leaf.push(leaf.to_vec());
        self.body.push(body);
        self.tenant.push(e.tenant.clone());
        self.transaction.push(e.transaction_id.clone());
        self.time_us
            .push(crate::clock::parse_rfc3339_micros(&e.time).unwrap_or(0));
    }
    fn len(&self) -> usize {
        self.idx.len()
    }
    fn truncate(&mut self, n: usize, claims: usize) {
        self.idx.truncate(n);
        self.leaf.truncate(n);
        self.body.truncate(n);
        self.tenant.truncate(n);
        self.transaction.truncate(n);
        self.time_us.truncate(n);
        self.claims.truncate(claims);
    }
}

/// Hashes stored back to back (a tile's `hashes` column).
fn decode_hashes(bytes: &[u8]) -> Option<Vec<Hash>> {
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    bytes.chunks(32).map(|c| Hash::try_from(c).ok()).collect()
}

/// The idempotency key an entry records: (client identity, SHA-256 of the key).
fn claim_key(e: &Entry) -> Option<(String, Vec<u8>)> {
    let k = hex::decode(e.idempotency_key_sha256.as_deref()?).ok()?;
    Some((e.actor.identity.clone(), k))
}

/// Test hook: abort the process at a named point of the sequencing transaction.
fn crash_point(point: &str) {
    #[cfg(feature = "insecure-test-hooks")]
    if std::env::var("SIGNET_INSECURE_PG_CRASH").ok().as_deref() == Some(point) {
        eprintln!("insecure test hook: aborting at {point}");
        std::process::abort();
    }
    let _ = point;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Key states and the rotation journal in the database; each change bumps
/// `signet_state_version` and notifies `signet_state`, so every replica reloads.
pub struct PgState {
    db: Arc<Db>,
}

impl PgState {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
    }
}

async fn bump_state(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE signet_state_version SET version = version + 1 WHERE id = 1",
        &[],
    )
    .await?;
    tx.execute("SELECT pg_notify('signet_state', '')", &[])
        .await?;
    Ok(())
}

impl KeyStateStore for PgState {
    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Value>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let rows = c
                .query("SELECT key_id, record FROM signet_key_states", &[])
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn save<'a>(
        &'a self,
        all: &'a BTreeMap<String, Value>,
        changed: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut c = self.db.client().await?;
            let tx = c.transaction().await.map_err(|e| self.db.failed(e))?;
            for id in changed {
                match all.get(id) {
                    Some(record) => tx
                        .execute(
                            "INSERT INTO signet_key_states (key_id, record) VALUES ($1, $2)
                             ON CONFLICT (key_id) DO UPDATE SET record = EXCLUDED.record",
                            &[id, record],
                        )
                        .await
                        .map_err(|e| self.db.failed(e))?,
                    None => tx
                        .execute("DELETE FROM signet_key_states WHERE key_id = $1", &[id])
                        .await
                        .map_err(|e| self.db.failed(e))?,
                };
            }
            bump_state(&tx).await.map_err(|e| self.db.failed(e))?;
            tx.commit().await.map_err(|e| self.db.failed(e))
        })
    }
}

impl JournalStore for PgState {
    fn load(&self) -> BoxFuture<'_, Result<JournalData, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let active = c
                .query("SELECT tenant, body FROM signet_rotations", &[])
                .await
                .map_err(|e| self.db.failed(e))?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let mut history: Vec<Value> = c
                .query(
                    "SELECT body FROM signet_rotation_history ORDER BY seq DESC LIMIT $1",
                    &[&HISTORY],
                )
                .await
                .map_err(|e| self.db.failed(e))?
                .into_iter()
                .map(|r| r.get(0))
                .collect();
            history.reverse();
            Ok(JournalData { active, history })
        })
    }

    fn save<'a>(
        &'a self,
        _whole: &'a JournalData,
        tenant: &'a str,
        rotation: &'a Value,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut c = self.db.client().await?;
            let tx = c.transaction().await.map_err(|e| self.db.failed(e))?;
            if finished {
                tx.execute("DELETE FROM signet_rotations WHERE tenant = $1", &[&tenant])
                    .await
                    .map_err(|e| self.db.failed(e))?;
                tx.execute(
                    "INSERT INTO signet_rotation_history (body) VALUES ($1)",
                    &[rotation],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            } else {
                tx.execute(
                    "INSERT INTO signet_rotations (tenant, body) VALUES ($1, $2)
                     ON CONFLICT (tenant) DO UPDATE SET body = EXCLUDED.body",
                    &[&tenant, rotation],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            }
            bump_state(&tx).await.map_err(|e| self.db.failed(e))?;
            tx.commit().await.map_err(|e| self.db.failed(e))
        })
    }
}

impl TimestampStore for PgState {
    fn load_since(&self, after: Option<u64>) -> BoxFuture<'_, Result<Vec<StoredTimestamp>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let after = after.map_or(-1, |a| a as i64);
            let rows = c
                .query(
                    "SELECT tree_size, note_sha256, response FROM signet_timestamps
                     WHERE tree_size > $1 ORDER BY tree_size",
                    &[&after],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok(rows.into_iter().map(|r| stored_timestamp(&r)).collect())
        })
    }

    fn latest(&self, n: usize) -> BoxFuture<'_, Result<Vec<StoredTimestamp>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let rows = c
                .query(
                    "SELECT tree_size, note_sha256, response FROM signet_timestamps
                     ORDER BY tree_size DESC LIMIT $1",
                    &[&(n as i64)],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok(rows
                .into_iter()
                .rev()
                .map(|r| stored_timestamp(&r))
                .collect())
        })
    }

    fn append<'a>(&'a self, t: &'a StoredTimestamp) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            c.execute(
                "INSERT INTO signet_timestamps (tree_size, note_sha256, response)
                 VALUES ($1, $2, $3) ON CONFLICT (tree_size) DO NOTHING",
                &[&(t.tree_size as i64), &t.note_sha256, &t.response],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
            Ok(())
        })
    }

    fn unstamped(&self) -> BoxFuture<'_, Result<Vec<(u64, String)>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let rows = c
                .query(
                    "SELECT c.tree_size, c.note FROM signet_checkpoints c
                     LEFT JOIN signet_timestamps t USING (tree_size)
                     WHERE t.tree_size IS NULL ORDER BY c.tree_size",
                    &[],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect())
        })
    }
}

/// A row of `signet_timestamps` (tree_size, note_sha256, response).
fn stored_timestamp(r: &tokio_postgres::Row) -> StoredTimestamp {
    StoredTimestamp {
        tree_size: r.get::<_, i64>(0) as u64,
        note_sha256: r.get(1),
        response: r.get(2),
    }
}

/// Named locks across replicas: a session advisory lock on a connection of its own, held by
/// the guard. If the replica dies, the database ends the session and releases the lock.
pub struct PgLeases {
    db: Arc<Db>,
}

impl PgLeases {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
    }
}

struct HeldLease {
    _client: tokio_postgres::Client,
}

impl Leases for PgLeases {
    fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LeaseGuard, Error>> {
        Box::pin(async move {
            let (client, _rx) = self.db.dedicated().await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let got: bool = client
                    .query_one(
                        "SELECT pg_try_advisory_lock($1, hashtext($2))",
                        &[&LEASE_CLASS, &name],
                    )
                    .await
                    .map_err(|e| self.db.failed(e))?
                    .get(0);
                if got {
                    return Ok(Box::new(HeldLease { _client: client }) as LeaseGuard);
                }
                if Instant::now() >= deadline {
                    return Err(Error::Unavailable(format!(
                        "`{name}` is held by another replica for more than 30 s"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }
}

use super::transfer::ExportReport;

/// Write the whole log in the file backend's format (`entries.jsonl`, `checkpoints.jsonl`,
/// `log-key.pem`) for offline verification with `signet audit verify DIR`.
pub async fn export(db: &Db, dir: &std::path::Path) -> Result<ExportReport, Error> {
    use std::io::Write;
    let io = |p: &std::path::Path| {
        let path = p.display().to_string();
        move |source| Error::Io { path, source }
    };
    crate::fsutil::create_private_dir(dir).map_err(io(dir))?;
    let c = db.client().await?;
    let key: Option<String> = c
        .query_opt("SELECT log_key FROM signet_log WHERE id = 1", &[])
        .await
        .map_err(|e| db.failed(e))?
        .and_then(|r| r.get(0));
    if let Some(pem) = key {
        let p = dir.join(audit::LOG_KEY_FILE);
        crate::fsutil::write_atomic_mode(&p, pem.as_bytes(), 0o644).map_err(io(&p))?;
    }
    let path = dir.join(audit::ENTRIES_FILE);
    let mut out = std::io::BufWriter::new(
        crate::fsutil::open_durable(
            &path,
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true),
        )
        .map_err(io(&path))?,
    );
    let mut entries = 0u64;
    loop {
        let rows = c
            .query(
                "SELECT idx, body FROM signet_entries WHERE idx >= $1 ORDER BY idx LIMIT 10000",
                &[&(entries as i64)],
            )
            .await
            .map_err(|e| db.failed(e))?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            if r.get::<_, i64>(0) as u64 != entries {
                return Err(Error::Invalid(format!("entry {entries} is missing")));
            }
            let body: Vec<u8> = r.get(1);
            out.write_all(&body).map_err(io(&path))?;
            out.write_all(b"\n").map_err(io(&path))?;
            entries += 1;
        }
    }
    let f = out.into_inner().map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e.into_error(),
    })?;
    f.sync_all().map_err(io(&path))?;
    let path = dir.join(audit::CHECKPOINTS_FILE);
    let mut text = String::new();
    let rows = c
        .query(
            "SELECT tree_size, signed_at, note FROM signet_checkpoints ORDER BY tree_size",
            &[],
        )
        .await
        .map_err(|e| db.failed(e))?;
    let checkpoints = rows.len() as u64;
    for r in rows {
        let cp = StoredCheckpoint {
            tree_size: r.get::<_, i64>(0) as u64,
            signed_at: r.get::<_, i64>(1) as u64,
            note: r.get(2),
        };
        text.push_str(&serde_json::to_string(&cp).map_err(|e| Error::Invalid(e.to_string()))?);
        text.push('\n');
    }
    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(io(&path))?;
    Ok(ExportReport {
        entries,
        checkpoints,
    })
}

/// The database's evidence log as a [`LogSource`](crate::audit::verify::LogSource), for
/// `signet audit verify --config`: entries and checkpoints read page by page (memory does not
/// grow with the log), straight from the tables, without an export. Blocking: call it from a
/// thread that is not a runtime worker (it waits on `rt`).
pub struct PgSource {
    rt: tokio::runtime::Handle,
    db: Arc<Db>,
    entries: std::collections::VecDeque<Vec<u8>>,
    next_idx: u64,
    checkpoints: std::collections::VecDeque<StoredCheckpoint>,
    checkpoints_after: i64,
    checkpoint_n: u64,
}

const SOURCE_PAGE: i64 = 2000;

impl PgSource {
    pub fn new(rt: tokio::runtime::Handle, db: Arc<Db>) -> Self {
        Self {
            rt,
            db,
            entries: Default::default(),
            next_idx: 0,
            checkpoints: Default::default(),
            checkpoints_after: -1,
            checkpoint_n: 0,
        }
    }

    fn failure(&self, e: Error) -> crate::audit::verify::DirFailure {
        crate::audit::verify::DirFailure::other(format!(
            "cannot read the log from the database: {e}"
        ))
    }
}

impl crate::audit::verify::LogSource for PgSource {
    fn next_entry(&mut self) -> Result<Option<Vec<u8>>, crate::audit::verify::DirFailure> {
        if self.entries.is_empty() {
            let (db, from) = (
                Arc::clone(&self.db),
                self.next_idx + self.entries.len() as u64,
            );
            let rows = self
                .rt
                .block_on(async move {
                    let c = db.client().await?;
                    c.query(
                        "SELECT idx, body FROM signet_entries WHERE idx >= $1 ORDER BY idx LIMIT $2",
                        &[&(from as i64), &SOURCE_PAGE],
                    )
                    .await
                    .map_err(|e| db.failed(e))
                })
                .map_err(|e| self.failure(e))?;
            for (k, r) in rows.iter().enumerate() {
                let at = from + k as u64;
                if r.get::<_, i64>(0) as u64 != at {
                    return Err(crate::audit::verify::DirFailure::entry(
                        at,
                        format!("entry {at} is missing from the database (an entry was removed)"),
                    ));
                }
                self.entries.push_back(r.get(1));
            }
        }
        let e = self.entries.pop_front();
        self.next_idx += e.is_some() as u64;
        Ok(e)
    }

    fn next_checkpoint(
        &mut self,
    ) -> Result<Option<(u64, StoredCheckpoint)>, crate::audit::verify::DirFailure> {
        if self.checkpoints.is_empty() {
            let (db, after) = (Arc::clone(&self.db), self.checkpoints_after);
            let rows = self
                .rt
                .block_on(async move {
                    let c = db.client().await?;
                    c.query(
                        "SELECT tree_size, signed_at, note FROM signet_checkpoints WHERE tree_size > $1 ORDER BY tree_size LIMIT $2",
                        &[&after, &SOURCE_PAGE],
                    )
                    .await
                    .map_err(|e| db.failed(e))
                })
                .map_err(|e| self.failure(e))?;
            for r in rows {
                self.checkpoints_after = r.get(0);
                self.checkpoints.push_back(StoredCheckpoint {
                    tree_size: r.get::<_, i64>(0) as u64,
                    signed_at: r.get::<_, i64>(1) as u64,
                    note: r.get(2),
                });
            }
        }
        Ok(self.checkpoints.pop_front().map(|c| {
            self.checkpoint_n += 1;
            (self.checkpoint_n, c)
        }))
    }
}

/// What `signet storage migrate` imported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrateReport {
    pub entries: u64,
    pub checkpoints: u64,
    pub key_states: u64,
    pub rotations: u64,
    /// Base64 root hash at the latest checkpoint's size (the same as the file log's).
    pub root: String,
    pub tree_size: u64,
}

/// Import a file log (byte for byte: same leaves, same roots, so old receipts and checkpoints
/// still verify) with its key states and rotation journal into an empty database, in one
/// transaction. The caller has verified the directory.
pub async fn migrate(
    db: &Db,
    audit_dir: &std::path::Path,
    state_dir: &std::path::Path,
    origin: &str,
    log_key_pem: &str,
) -> Result<MigrateReport, Error> {
    use std::io::BufRead;
    let mut c = db.client().await?;
    let tx = c.transaction().await.map_err(|e| db.failed(e))?;
    let existing: Option<i64> = tx
        .query_opt(
            "SELECT next_index FROM signet_log WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(|e| db.failed(e))?
        .map(|r| r.get(0));
    let any: bool = tx
        .query_one("SELECT EXISTS (SELECT 1 FROM signet_entries)", &[])
        .await
        .map_err(|e| db.failed(e))?
        .get(0);
    if existing.is_some_and(|n| n > 0) || any {
        return Err(Error::Invalid(
            "the database already holds an evidence log; migrate only into an empty one".into(),
        ));
    }
    let path = audit_dir.join(audit::ENTRIES_FILE);
    let file = std::fs::File::open(&path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut tree = Tree::new();
    let mut edge = Edge::new();
    let mut tiles: Vec<(TileId, Tile)> = Vec::new();
    let mut active = order::ActiveVersions::default();
    let mut rows = Rows::default();
    let mut line = Vec::new();
    let batch = format!("migrated-{}", uuid::Uuid::new_v4());
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        line.pop();
        let index = tree.len();
        let e: Entry = serde_json::from_slice(&line)
            .map_err(|err| Error::Invalid(format!("entry {index}: {err}")))?;
        active.record(&e);
        let leaf = merkle::leaf_hash(&line);
        rows.push(index, leaf, line.clone(), &e);
        if let Some((client, key)) = claim_key(&e) {
            rows.claims.push((
                client,
                key,
                e.request_sha256.clone().unwrap_or_default(),
                index as i64,
            ));
        }
        tree.push(leaf);
        tiles.extend(edge.push(leaf));
        if rows.len() >= 2000 {
            insert_rows(&tx, &mut rows, &batch)
                .await
                .map_err(|e| db.failed(e))?;
            insert_tiles(&*tx, &mut tiles)
                .await
                .map_err(|e| db.failed(e))?;
        }
    }
    insert_rows(&tx, &mut rows, &batch)
        .await
        .map_err(|e| db.failed(e))?;
    insert_tiles(&*tx, &mut tiles)
        .await
        .map_err(|e| db.failed(e))?;
    let size = tree.len();
    let checkpoints = super::file::read_checkpoints(&audit_dir.join(audit::CHECKPOINTS_FILE))
        .map_err(|e| Error::Invalid(e.to_string()))?;
    for cp in &checkpoints {
        tx.execute(
            "INSERT INTO signet_checkpoints (tree_size, signed_at, note) VALUES ($1, $2, $3)",
            &[&(cp.tree_size as i64), &(cp.signed_at as i64), &cp.note],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    let head = checkpoints.last().map_or(0, |c| c.tree_size);
    let head_root = tree
        .root(head)
        .map_err(|e| Error::Invalid(format!("checkpoint at {head}: {e}")))?;
    let active_json = serde_json::to_value(&active).map_err(|e| Error::Invalid(e.to_string()))?;
    let last = size
        .checked_sub(1)
        .and_then(|i| tree.leaf(i))
        .map(|h| h.to_vec());
    tx.execute(
        "INSERT INTO signet_log (id, origin, next_index, last_leaf, active, log_key)
         VALUES (1, $1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET origin = $1, next_index = $2, last_leaf = $3,
             active = $4, log_key = $5",
        &[&origin, &(size as i64), &last, &active_json, &log_key_pem],
    )
    .await
    .map_err(|e| db.failed(e))?;
    tx.execute(
        "INSERT INTO signet_tree_head (id, size, root, replica) VALUES (1, $1, $2, 'migration')
         ON CONFLICT (id) DO UPDATE SET size = $1, root = $2, replica = 'migration'",
        &[&(head as i64), &head_root.to_vec()],
    )
    .await
    .map_err(|e| db.failed(e))?;

    let state = super::file::state::FileState::new(state_dir);
    let keys = KeyStateStore::load(&state).await?;
    for (id, record) in &keys {
        tx.execute(
            "INSERT INTO signet_key_states (key_id, record) VALUES ($1, $2)
             ON CONFLICT (key_id) DO UPDATE SET record = EXCLUDED.record",
            &[id, record],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    let journal = JournalStore::load(&state).await?;
    for (tenant, body) in &journal.active {
        tx.execute(
            "INSERT INTO signet_rotations (tenant, body) VALUES ($1, $2)
             ON CONFLICT (tenant) DO UPDATE SET body = EXCLUDED.body",
            &[tenant, body],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    for body in &journal.history {
        tx.execute(
            "INSERT INTO signet_rotation_history (body) VALUES ($1)",
            &[body],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    bump_state(&tx).await.map_err(|e| db.failed(e))?;
    tx.commit().await.map_err(|e| db.failed(e))?;
    Ok(MigrateReport {
        entries: size,
        checkpoints: checkpoints.len() as u64,
        key_states: keys.len() as u64,
        rotations: (journal.active.len() + journal.history.len()) as u64,
        root: B64.encode(head_root),
        tree_size: head,
    })
}

/// Store full tiles (deterministic: a tile already there is the same).
async fn insert_tiles<C: tokio_postgres::GenericClient>(
    c: &C,
    tiles: &mut Vec<(TileId, Tile)>,
) -> Result<(), tokio_postgres::Error> {
    if tiles.is_empty() {
        return Ok(());
    }
    let (mut levels, mut indexes, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
    for ((level, index), t) in tiles.drain(..) {
        levels.push(level as i16);
        indexes.push(index as i64);
        bodies.push(t.concat());
    }
    c.execute(
        "INSERT INTO signet_tiles (level, idx, hashes)
         SELECT * FROM unnest($1::int2[], $2::int8[], $3::bytea[])
         ON CONFLICT (level, idx) DO NOTHING",
        &[&levels, &indexes, &bodies],
    )
    .await?;
    Ok(())
}

async fn insert_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &mut Rows,
    batch: &str,
) -> Result<(), tokio_postgres::Error> {
    if rows.len() == 0 {
        return Ok(());
    }
    let batch_ids = vec![batch.to_owned(); rows.len()];
    let insert = tx
        .prepare_cached(
            "INSERT INTO signet_entries (idx, leaf, body, batch, tenant, transaction_id, time_us)
             SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[], $4::text[], $5::text[],
                                  $6::text[], $7::int8[])",
        )
        .await?;
    tx.execute(
        &insert,
        &[
            &rows.idx,
            &rows.leaf,
            &rows.body,
            &batch_ids,
            &rows.tenant,
            &rows.transaction,
            &rows.time_us,
        ],
    )
    .await?;
    if !rows.claims.is_empty() {
        let (mut c, mut k, mut h, mut i) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (client, key, hash, index) in rows.claims.drain(..) {
            c.push(client);
            k.push(key);
            h.push(hash);
            i.push(index);
        }
        let record = tx
            .prepare_cached(
                "INSERT INTO signet_idempotency (client, key_hash, request_sha256, entry_index)
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::int8[])
                 ON CONFLICT (client, key_hash) DO UPDATE
                 SET entry_index = EXCLUDED.entry_index, holder = NULL, lease_until = NULL",
            )
            .await?;
        tx.execute(&record, &[&c, &k, &h, &i]).await?;
    }
    *rows = Rows::default();
    Ok(())
}
