//! The storage seam: where the evidence log, idempotency records, key states, the rotation
//! journal and leadership live.
//!
//! Two backends:
//! - `file` ([`file`], the default, one process): the evidence log ([`file::FileLog`]) in
//!   `[audit].dir`, `keys.json` and `rotations.json` in `[state].dir`. Idempotency is decided in
//!   memory (the log entry carries the key's hash), and there is no one else to lead.
//! - `postgres` ([`postgres`]): any number of replicas against one database. The database
//!   sequences entries (one transaction per group, under a row lock), holds idempotency claims,
//!   key states and the rotation journal, and fences the checkpoint signer.
//!
//! [`open`] chooses the backend from the configuration and returns the seams ([`Storage`]): a
//! few small traits ([`KeyStateStore`], [`JournalStore`], [`TimestampStore`], [`Leases`],
//! [`Claims`], [`Replicas`]; the file backend implements the last three trivially) plus [`Log`],
//! the evidence log whichever backend holds it. No code above this module names a backend;
//! [`transfer`] moves whole logs between them. Must not name axum or cryptoki.

pub mod file;
pub mod postgres;
pub mod transfer;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use p256::ecdsa::VerifyingKey;
use serde_json::Value;

use crate::audit::timestamp::StoredTimestamp;
use crate::audit::{self, EntryProof, Receipt, StoredCheckpoint, merkle::Hash, tiled};
use crate::vault;

/// A storage failure, with what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database did not answer or failed the statement: retry later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The configuration cannot work (URL, CA file, TLS).
    #[error("{0}")]
    Config(String),
    /// Stored data that does not parse or contradicts itself.
    #[error("stored state is invalid: {0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl From<Error> for audit::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { path, source } => audit::Error::Io { path, source },
            Error::Invalid(m) => audit::Error::Inconsistent(m),
            other => audit::Error::Storage(other.to_string()),
        }
    }
}

/// Key version states (`key_id` → the registry's record as JSON).
pub trait KeyStateStore: Send + Sync {
    /// Every recorded version; empty if nothing was ever stored.
    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Value>, Error>>;
    /// Persist: `all` is the whole map after the change, `changed` the versions that differ.
    /// Durable when this returns.
    fn save<'a>(
        &'a self,
        all: &'a BTreeMap<String, Value>,
        changed: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>>;
}

/// The rotation journal: in-progress rotations by tenant, and the last finished ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalData {
    pub active: BTreeMap<String, Value>,
    pub history: Vec<Value>,
}

pub trait JournalStore: Send + Sync {
    fn load(&self) -> BoxFuture<'_, Result<JournalData, Error>>;
    /// Persist one rotation's new step. `whole` is the journal after the change (the file
    /// backend rewrites it); `tenant`/`rotation` is what changed, `finished` moves it to history.
    fn save<'a>(
        &'a self,
        whole: &'a JournalData,
        tenant: &'a str,
        rotation: &'a Value,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), Error>>;
}

/// RFC 3161 timestamps of checkpoints (`[audit.timestamping]`).
pub trait TimestampStore: Send + Sync {
    /// Stored timestamps of checkpoints larger than `after` (all with `None`).
    fn load_since(&self, after: Option<u64>) -> BoxFuture<'_, Result<Vec<StoredTimestamp>, Error>>;
    /// The newest `n` stored timestamps, oldest first.
    fn latest(&self, n: usize) -> BoxFuture<'_, Result<Vec<StoredTimestamp>, Error>>;
    /// Store one, durably. Storing one that exists already is not an error.
    fn append<'a>(&'a self, t: &'a StoredTimestamp) -> BoxFuture<'a, Result<(), Error>>;
    /// Signed checkpoints without a timestamp yet, oldest first: (tree size, note).
    fn unstamped(&self) -> BoxFuture<'_, Result<Vec<(u64, String)>, Error>>;
}

/// Which of a tenant's entries to list: a time window (µs since the epoch, `since` inclusive,
/// `until` exclusive), after a cursor (an entry index, exclusive), at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantQuery<'a> {
    pub tenant: &'a str,
    pub since_us: i64,
    pub until_us: i64,
    pub after: Option<u64>,
    pub limit: usize,
}

/// One page of a tenant's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub indexes: Vec<u64>,
    /// Pass as `after` for the next page; `None` when this page was the last one so far.
    pub next_cursor: Option<u64>,
}

/// A lock held across replicas until the guard is dropped (a replica that dies releases it).
pub type LeaseGuard = Box<dyn Send + Sync>;

pub trait Leases: Send + Sync {
    /// Wait for the named lock (up to a bounded time) and hold it until the guard is dropped.
    fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LeaseGuard, Error>>;
}

/// An idempotency key's fate with several replicas, decided by the storage before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This replica holds the key: sign, and the sequencing transaction records it.
    Owned,
    /// Already recorded: answer from entry `index` (or 409 if `request_sha256` differs).
    Recorded { request_sha256: String, index: u64 },
    /// The key is in use, right now, for a different request.
    Conflict,
}

/// Idempotency claims across replicas. One process (the file backend) owns every key: the
/// in-memory idempotency cache decides alone.
pub trait Claims: Send + Sync {
    /// Claim `(client, key)` for a request (`request_sha256`) before signing it.
    fn claim<'a>(
        &'a self,
        client: &'a str,
        key: &'a [u8; 32],
        request_sha256: &'a str,
    ) -> BoxFuture<'a, Result<Claim, audit::Error>>;
    /// Give a claim up after the attempt failed (nothing was recorded).
    fn release<'a>(&'a self, client: &'a str, key: &'a [u8; 32]) -> BoxFuture<'a, ()>;
    /// Forget claims older than `retention` (the leader, now and then); how many.
    fn expire(&self, retention: std::time::Duration) -> BoxFuture<'_, Result<u64, audit::Error>>;
}

/// The other replicas sharing this storage, if any.
pub trait Replicas: Send + Sync {
    /// Whether other replicas may change key states and the journal under this one.
    fn shared(&self) -> bool;
    /// Whether this replica signs checkpoints and asks the TSA (always, alone).
    fn is_leader(&self) -> bool;
    /// Start the background work: health checks, notifications, leader election.
    fn start(&self, stop: tokio::sync::watch::Receiver<bool>);
    /// Changes whenever another replica may have changed the shared state.
    fn state_changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// The shared state's version, bumped by every change.
    fn state_version(&self) -> BoxFuture<'_, Result<i64, Error>>;
}

/// The signer-evidence vault's records ([`crate::vault`]): written by the log's writer in the
/// same commit as their entries (from [`audit::Entry::sealed`]), erased and re-wrapped here.
pub trait VaultStore: Send + Sync {
    /// The vault's key state; `None` before the first start.
    fn meta(&self) -> BoxFuture<'_, Result<Option<vault::Meta>, Error>>;
    /// Store the first key state unless one exists (another replica's won).
    fn init_meta<'a>(&'a self, m: &'a vault::Meta) -> BoxFuture<'a, Result<(), Error>>;
    fn set_meta<'a>(&'a self, m: &'a vault::Meta) -> BoxFuture<'a, Result<(), Error>>;
    /// The record of entry `index`.
    fn get(&self, index: u64) -> BoxFuture<'_, Result<Option<vault::Row>, Error>>;
    /// The sealed (not erased) records carrying subject tag `tag`.
    fn by_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Vec<vault::Row>, Error>>;
    /// Sealed records whose retention ended at or before `now_us`, after index `after`, in
    /// index order, at most `limit`.
    fn due(
        &self,
        now_us: i64,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<vault::Row>, Error>>;
    /// Sealed records wrapped under another KEK generation than `current`, after `after`.
    fn stale(
        &self,
        current: u32,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<vault::Row>, Error>>;
    /// Replace record `index`'s wrapped data key if it is still `old`; whether it was.
    fn rewrap<'a>(
        &'a self,
        index: u64,
        old: &'a str,
        kek: u32,
        wrapped: &'a str,
    ) -> BoxFuture<'a, Result<bool, Error>>;
    /// Erase the sealed records among `indexes` (their data key, ciphertext and tags go;
    /// `erasure` stays). Durable when this returns; how many were erased.
    fn erase<'a>(
        &'a self,
        indexes: &'a [u64],
        erasure: &'a vault::Erasure,
    ) -> BoxFuture<'a, Result<u64, Error>>;
    /// (sealed, erased) record counts.
    fn counts(&self) -> BoxFuture<'_, Result<(u64, u64), Error>>;
}

/// Legal holds ([`crate::vault::Hold`]).
pub trait HoldStore: Send + Sync {
    /// Every hold, active or released, oldest first.
    fn list(&self) -> BoxFuture<'_, Result<Vec<vault::Hold>, Error>>;
    /// Store a new hold or its release (by `id`). Durable when this returns.
    fn put<'a>(&'a self, h: &'a vault::Hold) -> BoxFuture<'a, Result<(), Error>>;
}

/// The storage of one running service: one seam per concern, whichever backend holds it.
pub struct Storage {
    pub log: Arc<Log>,
    pub keys: Arc<dyn KeyStateStore>,
    pub journal: Arc<dyn JournalStore>,
    pub leases: Arc<dyn Leases>,
    pub timestamps: Arc<dyn TimestampStore>,
    pub claims: Arc<dyn Claims>,
    pub replicas: Arc<dyn Replicas>,
    pub vault: Arc<dyn VaultStore>,
    pub holds: Arc<dyn HoldStore>,
}

/// Why the storage could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The evidence log refused to open (inconsistent, anchors, I/O).
    #[error(transparent)]
    Log(#[from] audit::Error),
    /// The backend itself (the database, its configuration).
    #[error(transparent)]
    Backend(#[from] Error),
}

/// Open the configured backend: the evidence log (recovered and checked against its
/// anchors), key states, journal, leases, timestamps, claims and replicas.
pub async fn open(
    config: &crate::config::Config,
    signer: Arc<dyn audit::CheckpointSigner>,
    token: Arc<dyn audit::anchor::TokenAnchor>,
    metrics: Arc<crate::metrics::Metrics>,
    accept_restore: bool,
) -> Result<Storage, OpenError> {
    match &config.storage {
        crate::config::StorageConfig::File => {
            file::open(config, signer, token, metrics, accept_restore).await
        }
        crate::config::StorageConfig::Postgres(pg) => {
            postgres::open(config, pg, signer, token, metrics, accept_restore).await
        }
    }
}

/// Signatures being made in the token now, whose entries are on their way to the log. The
/// file backend's group commit waits briefly for them instead of committing a small group
/// (each group costs two fdatasyncs and one token MAC, whatever its size); with none on the
/// way it commits at once.
#[derive(Debug, Default)]
pub struct Inbound(std::sync::atomic::AtomicUsize);

impl Inbound {
    /// How many signatures are on their way now.
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// What a group starting now owes ([`Owed`]).
    pub(crate) fn owed(&self) -> Owed<'_> {
        Owed {
            inbound: self,
            owed: self.count(),
        }
    }

    /// Count `n` signatures on their way until the guard is dropped: drop it when their
    /// entries are handed to the log, or when they failed.
    pub fn expect(self: &Arc<Self>, n: usize) -> Expected {
        self.0.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
        Expected {
            inbound: Arc::clone(self),
            n,
        }
    }
}

/// What a group commit owes the signatures that were on their way when it started
/// ([`Inbound::owed`]): it waits for their entries, and only for theirs. Signatures announced
/// later do not extend the wait: under a steady trickle a group would otherwise always wait
/// until its deadline. The one rule of both backends' group commits.
#[derive(Debug)]
pub(crate) struct Owed<'a> {
    inbound: &'a Inbound,
    owed: usize,
}

impl Owed<'_> {
    /// Whether the group should wait for the next append (until its deadline) rather than
    /// commit what it has: entries it owes are still being signed.
    pub(crate) fn worth_waiting(&self) -> bool {
        self.owed > 0 && self.inbound.count() > 0
    }

    /// An append of `n` entries joined the group.
    pub(crate) fn arrived(&mut self, n: usize) {
        self.owed = self.owed.saturating_sub(n);
    }
}

/// How long a group commit waits at most for the entries of signatures being made now
/// ([`Inbound`]) before it commits what it has. A checked signature takes 0.1–0.2 ms on one
/// core, so this bounds the wait when many are queued at the token; with none on the way the
/// group commits at once.
pub(crate) const COMMIT_WINDOW: std::time::Duration = std::time::Duration::from_millis(1);

/// Signatures counted in [`Inbound`] while this lives.
#[derive(Debug)]
pub struct Expected {
    inbound: Arc<Inbound>,
    n: usize,
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.inbound
            .0
            .fetch_sub(self.n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The evidence log, whichever backend holds it. Entry formats, receipts, proofs and
/// checkpoints are the same in both.
pub enum Log {
    File(Arc<file::FileLog>),
    Postgres(Arc<postgres::PgLog>),
}

impl Log {
    /// Append entries (indexes are assigned here) and return once they are durable.
    pub async fn append(&self, entries: Vec<audit::Entry>) -> Result<Vec<Receipt>, audit::Error> {
        match self {
            Log::File(l) => l.append(entries).await,
            Log::Postgres(l) => l.append(entries).await,
        }
    }

    /// Announce `n` signatures being made now, whose entries this log will be asked to append
    /// ([`Inbound`]); drop the guard just before [`Log::append`].
    pub fn expect(&self, n: usize) -> Expected {
        match self {
            Log::File(l) => l.inbound().expect(n),
            Log::Postgres(l) => l.inbound().expect(n),
        }
    }

    /// Versions the log has revoked, with the index of their `key_revoked` entry.
    pub async fn revoked_versions(&self) -> Result<Vec<(String, u64)>, audit::Error> {
        match self {
            Log::File(l) => Ok(l.revoked_versions()),
            Log::Postgres(l) => l.revoked_versions().await,
        }
    }

    pub fn origin(&self) -> &str {
        match self {
            Log::File(l) => l.origin(),
            Log::Postgres(l) => l.origin(),
        }
    }

    pub fn is_writable(&self) -> bool {
        match self {
            Log::File(l) => l.is_writable(),
            Log::Postgres(l) => l.is_writable(),
        }
    }

    pub fn tree_size(&self) -> u64 {
        match self {
            Log::File(l) => l.tree_size(),
            Log::Postgres(l) => l.tree_size(),
        }
    }

    pub fn public_key(&self) -> VerifyingKey {
        match self {
            Log::File(l) => l.public_key(),
            Log::Postgres(l) => l.public_key(),
        }
    }

    pub fn latest_checkpoint(&self) -> Option<Arc<StoredCheckpoint>> {
        match self {
            Log::File(l) => l.latest_checkpoint(),
            Log::Postgres(l) => l.latest_checkpoint(),
        }
    }

    pub fn restore_findings(&self) -> &[String] {
        match self {
            Log::File(l) => l.restore_findings(),
            Log::Postgres(l) => l.restore_findings(),
        }
    }

    /// The canonical bytes of entry `index`, checked like every entry Signet serves: below the
    /// latest checkpoint, against its leaf and the proof to the signed root
    /// ([`EntryProof::checked`]); after it, against its leaf in the tree. A stored entry that
    /// differs is `Inconsistent` (500 `evidence-inconsistent`), never served.
    pub async fn entry(&self, index: u64) -> Result<Vec<u8>, audit::Error> {
        self.wait_for_entry(index).await?;
        if let Some(cp) = self.latest_checkpoint()
            && index < cp.tree_size
        {
            return Ok(self.prove_with(index, cp).await?.entry);
        }
        Ok(self.entries(index, 1).await?.remove(0))
    }

    /// Entries `first..first + count` (all below the tree's size), each checked against its
    /// leaf in the tree; the tree's leaves below the latest checkpoint are checked against the
    /// signed root (one inclusion proof per level-0 tile covers every leaf of the tile).
    pub async fn entries(&self, first: u64, count: u64) -> Result<Vec<Vec<u8>>, audit::Error> {
        let stored = match self {
            Log::File(l) => l.entries(first, count)?,
            Log::Postgres(l) => l.entries(first, count).await?,
        };
        let leaves = self.leaves(first, count).await?;
        for (i, (e, leaf)) in (first..).zip(stored.iter().zip(&leaves)) {
            if audit::merkle::leaf_hash(e) != *leaf {
                return Err(audit::Error::Inconsistent(format!(
                    "the stored entry {i} differs from its leaf hash in the tree; run `signet audit verify`"
                )));
            }
        }
        if let Some(cp) = self.latest_checkpoint()
            && count > 0
        {
            let width = tiled::WIDTH as u64;
            for n in first / width..=(first + count - 1) / width {
                let i = (n * width).max(first);
                if i < cp.tree_size {
                    self.prove_with(i, Arc::clone(&cp)).await?;
                }
            }
        }
        Ok(stored)
    }

    /// The tree's leaf hashes of entries `first..first + count`: level-0 tiles, and the edge's
    /// partial tile.
    async fn leaves(&self, first: u64, count: u64) -> Result<Vec<Hash>, audit::Error> {
        let edge = self.edge();
        let end = first.saturating_add(count);
        if end > edge.size() {
            return Err(audit::Error::NoSuchEntry(end - 1));
        }
        let (edge_tile, partial) = edge.partial(0);
        let width = tiled::WIDTH as u64;
        let mut out = Vec::with_capacity(count as usize);
        let mut i = first;
        while i < end {
            let n = i / width;
            let full;
            let tile: &[Hash] = if n == edge_tile {
                partial
            } else {
                full = self.tile((0, n)).await?;
                &full
            };
            let (lo, hi) = (
                (i - n * width) as usize,
                ((end - n * width).min(width)) as usize,
            );
            out.extend_from_slice(tile.get(lo..hi).ok_or_else(|| {
                audit::Error::Inconsistent(format!("the tree's tile 0/{n} is short"))
            })?);
            i = n * width + hi as u64;
        }
        Ok(out)
    }

    /// With several replicas an entry another replica just wrote may not be in this replica's
    /// tree yet: wait a moment for the follower.
    async fn wait_for_entry(&self, index: u64) -> Result<(), audit::Error> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while index >= self.tree_size() {
            if matches!(self, Log::File(_)) || std::time::Instant::now() >= deadline {
                return Err(audit::Error::NoSuchEntry(index));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The right edge of the committed tree.
    fn edge(&self) -> Arc<tiled::Edge> {
        match self {
            Log::File(l) => l.edge(),
            Log::Postgres(l) => l.edge(),
        }
    }

    /// A full tile of the tree.
    async fn tile(&self, id: tiled::TileId) -> Result<tiled::Tile, audit::Error> {
        match self {
            Log::File(l) => l.tile(id),
            Log::Postgres(l) => l.tile(id).await,
        }
    }

    /// Entry `index` with its inclusion proof against the latest signed checkpoint.
    pub async fn prove(&self, index: u64) -> Result<EntryProof, audit::Error> {
        let checkpoint = self
            .latest_checkpoint()
            .ok_or(audit::Error::NotYetCheckpointed { index, size: 0 })?;
        self.prove_with(index, checkpoint).await
    }

    /// Entry `index` with its inclusion proof against `checkpoint` (one of this log's).
    pub async fn prove_with(
        &self,
        index: u64,
        checkpoint: Arc<StoredCheckpoint>,
    ) -> Result<EntryProof, audit::Error> {
        match self {
            Log::File(l) => l.prove_with(index, checkpoint),
            Log::Postgres(l) => l.prove_with(index, checkpoint).await,
        }
    }

    /// A C2SP tlog-tiles hash tile of the latest signed checkpoint's tree: tile level `level`,
    /// index `n`, `width` hashes (256 for a full tile). `None` if that tile does not exist (yet).
    pub async fn hash_tile(
        &self,
        level: u8,
        n: u64,
        width: u16,
    ) -> Result<Option<Vec<u8>>, audit::Error> {
        let Some(size) = self.latest_checkpoint().map(|c| c.tree_size) else {
            return Ok(None);
        };
        let level = u32::from(level);
        if width == 0 || u64::from(width) > tiled::available(size, level, n) {
            return Ok(None);
        }
        let edge = self.edge();
        // Tiles are prefix-stable: the edge's partial tile, taken at a larger size, starts
        // with the hashes the checkpoint's tree has.
        let (edge_tile, partial) = edge.partial(level);
        let hashes: Vec<Hash> = if n == edge_tile {
            partial.to_vec()
        } else {
            self.tile((level, n)).await?.to_vec()
        };
        Ok(hashes.get(..usize::from(width)).map(|h| h.concat()))
    }

    /// A C2SP tlog-tiles entry bundle: entries `n·256 ..` (`width` of them) of the latest signed
    /// checkpoint's tree, each as a big-endian u16 length and the canonical entry; every entry
    /// checked against its leaf and the tile against the signed root ([`Self::entries`]).
    pub async fn entry_bundle(&self, n: u64, width: u16) -> Result<Option<Vec<u8>>, audit::Error> {
        let Some(size) = self.latest_checkpoint().map(|c| c.tree_size) else {
            return Ok(None);
        };
        if width == 0 || u64::from(width) > tiled::available(size, 0, n) {
            return Ok(None);
        }
        let first = n * tiled::WIDTH as u64;
        let entries = self.entries(first, u64::from(width)).await?;
        audit::tiles::entry_bundle(first, &entries).map(Some)
    }

    /// The entries that carry `transaction_id`, in log order.
    pub async fn transaction_entries(
        &self,
        transaction_id: &str,
    ) -> Result<Vec<u64>, audit::Error> {
        match self {
            Log::File(l) => l.transaction_entries(transaction_id),
            Log::Postgres(l) => l.transaction_entries(transaction_id).await,
        }
    }

    /// A page of `tenant`'s entries in a time window (µs since the epoch), after a cursor.
    pub async fn tenant_entries(&self, q: TenantQuery<'_>) -> Result<Page, audit::Error> {
        match self {
            Log::File(l) => l.tenant_entries(q),
            Log::Postgres(l) => l.tenant_entries(q).await,
        }
    }

    /// RFC 6962 consistency proof between two sizes covered by the latest checkpoint.
    pub async fn consistency(&self, from: u64, to: u64) -> Result<Vec<Hash>, audit::Error> {
        match self {
            Log::File(l) => l.consistency(from, to),
            Log::Postgres(l) => l.consistency(from, to).await,
        }
    }

    pub async fn root(&self, size: u64) -> Result<Hash, audit::Error> {
        match self {
            Log::File(l) => l.root(size),
            Log::Postgres(l) => l.root(size).await,
        }
    }

    /// Sign a checkpoint if the tree grew. With PostgreSQL only the leader does; the others
    /// return `None` (and pick the leader's checkpoints up).
    pub async fn checkpoint(
        &self,
        now_unix: u64,
    ) -> Result<Option<Arc<StoredCheckpoint>>, audit::Error> {
        match self {
            Log::File(l) => {
                let l = Arc::clone(l);
                tokio::task::spawn_blocking(move || l.checkpoint_blocking(now_unix))
                    .await
                    .map_err(|e| audit::Error::Sign(Box::new(e)))?
            }
            Log::Postgres(l) => l.checkpoint(now_unix, false).await,
        }
    }

    /// Sign a checkpoint now whoever leads (an operator command: `audit accept-restore`).
    pub async fn checkpoint_now(
        &self,
        now_unix: u64,
    ) -> Result<Option<Arc<StoredCheckpoint>>, audit::Error> {
        match self {
            Log::Postgres(l) => l.checkpoint(now_unix, true).await,
            Log::File(_) => self.checkpoint(now_unix).await,
        }
    }

    /// Stop appending after the queued appends are durable. Idempotent.
    pub fn close(&self) {
        match self {
            Log::File(l) => l.close(),
            Log::Postgres(l) => l.close(),
        }
    }
}
