//! The PostgreSQL backend: N replicas, one evidence log.
//!
//! Modules: `db` (pool, TLS, health, notifications), `schema`, `sequencer` (group commit),
//! `follower` (following the log, leadership, checkpoints), `claims` (idempotency),
//! `reads` (entries, proofs, tiles), `state` (key states, journal, timestamps, leases),
//! `transfer` (export, migrate, the verifier's source).
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

use crate::audit::anchor::{Anchor, TokenAnchor, TreeHead};
use crate::audit::merkle::{self, Hash};
use crate::audit::note::{self, Checkpoint};
use crate::audit::tiled::{self, Edge, Missing, Tile, TileId, TileNodes};
use crate::audit::timestamp::StoredTimestamp;
use crate::audit::{self, CheckpointSigner, Entry, EntryProof, Receipt, StoredCheckpoint, order};
use crate::config::{PostgresConfig, UrlSource};
use crate::metrics::Metrics;
use crate::storage::{
    Claim, Claims, Error, JournalData, JournalStore, KeyStateStore, LeaseGuard, Leases, Replicas,
    TimestampStore,
};

mod claims;
mod db;
mod follower;
mod reads;
mod schema;
mod sequencer;
mod state;
mod transfer;
mod vault;

use claims::PgClaims;
pub use db::Db;
use sequencer::Pending;
pub use state::{PgLeases, PgState};
pub use transfer::{MigrateReport, PgSource, export, migrate};

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
        vault: Arc::new(vault::PgVault {
            db: Arc::clone(&db),
        }),
        holds: Arc::new(vault::PgVault {
            db: Arc::clone(&db),
        }),
        replicas: Arc::new(PgReplicas { db, log }),
    })
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

/// Full tiles kept in memory per replica (8 KiB each).
const TILE_CACHE: u64 = 4096;

/// History rows kept in `signet_rotation_history`.
const HISTORY: i64 = 200;

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
    /// Signatures being made whose entries come next: the sequencer waits briefly for them.
    inbound: Arc<crate::storage::Inbound>,
    leader: AtomicBool,
    /// Serialises catching up with the database.
    following: tokio::sync::Mutex<()>,
    /// Serialises this replica's checkpoint signing.
    /// Held while a checkpoint is signed; holds a published tree head whose token anchor
    /// could not be stored yet (retried at the next checkpoint).
    checkpointing: tokio::sync::Mutex<Option<TreeHead>>,
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
            inbound: Arc::default(),
            leader: AtomicBool::new(false),
            following: tokio::sync::Mutex::new(()),
            checkpointing: tokio::sync::Mutex::new(None),
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

    /// Signatures on their way to this log ([`crate::storage::Inbound`]).
    pub fn inbound(&self) -> &Arc<crate::storage::Inbound> {
        &self.inbound
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

    pub fn public_key(&self) -> VerifyingKey {
        self.signer.public_key()
    }

    pub fn latest_checkpoint(&self) -> Option<Arc<StoredCheckpoint>> {
        read(&self.latest).clone()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    pub fn close(&self) {
        lock(&self.queue).take();
        let _ = self.stop.send(true);
    }
}

impl Drop for PgLog {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Hashes stored back to back (a tile's `hashes` column).
fn decode_hashes(bytes: &[u8]) -> Option<Vec<Hash>> {
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    bytes.chunks(32).map(|c| Hash::try_from(c).ok()).collect()
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
