//! The file backend's evidence log (one process): append-only, durable, tamper-evident.
//!
//! Files under `[audit].dir`:
//! - `entries.jsonl`: one canonical-JSON entry per line; the only source of truth.
//! - `checkpoints.jsonl`: every signed checkpoint (C2SP signed note), one JSON line each.
//! - `log-key.pem`: the checkpoint key's public half, for convenience (verify with a copy
//!   you trust).
//! - `tail-head`: the acknowledged tree head, MAC'd in the token ([`tail`]).
//! - `LOCK`: held by the one process that may write.
//! - Derived from `entries.jsonl`, and rebuilt from it when missing or in doubt:
//!   `entries.idx` (where each entry ends), `tile/` (the tree as C2SP tlog-tiles: full tiles
//!   of 256 hashes), `index/` (transaction and tenant lookups), `active-versions.json` (the
//!   tenants' active key versions as of the last checkpoint).
//!
//! One writer thread owns the append handle and does group commit: it takes every request
//! waiting, writes them in one `write`, makes them durable with one `fdatasync`, then adds
//! their leaves to the tree's right edge and answers. A signature is only returned after this.
//! Memory is O(log n): the right edge of the tree (at most 255 hashes per tile level) and a
//! bounded tile cache; start-up reads O(log n) tiles and the entries written since the last
//! checkpoint, whatever the log's size.
//!
//! Must not name axum or cryptoki: the token signs checkpoints through [`CheckpointSigner`].

pub mod index;
pub mod offsets;
pub mod state;
pub mod tail;
pub mod tilefiles;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::audit::anchor::{Anchor, TokenAnchor, TreeHead};
use crate::audit::merkle::{self, Hash};
use crate::audit::note::{self, Checkpoint};
use crate::audit::tiled::{self, Edge, Missing, Tile, TileId, TileNodes};
use crate::audit::{
    CHECKPOINTS_FILE, CheckpointSigner, ENTRIES_FILE, Entry, EntryProof, Error, LOG_KEY_FILE,
    Receipt, StoredCheckpoint, order, verify,
};
use offsets::{OFFSETS_FILE, Offsets};
use tail::{TailHead, TailWriter};
use tilefiles::TileFiles;

use crate::config::FsyncPolicy;
use crate::metrics::Metrics;

const LOCK_FILE: &str = "LOCK";

/// Open the file backend: the log in `[audit].dir` (recovered and checked), state in
/// `[state].dir`, one process.
pub(super) async fn open(
    config: &crate::config::Config,
    signer: Arc<dyn CheckpointSigner>,
    token: Arc<dyn TokenAnchor>,
    metrics: Arc<Metrics>,
    accept_restore: bool,
) -> Result<super::Storage, super::OpenError> {
    let opts = Options {
        dir: config.audit.dir.clone(),
        origin: config.audit.origin.clone(),
        fsync: config.audit.fsync,
        max_group_entries: config.audit.max_group_entries,
        accept_restore,
    };
    let log_metrics = Arc::clone(&metrics);
    let log = tokio::task::spawn_blocking(move || FileLog::open(opts, signer, token, log_metrics))
        .await
        .map_err(|e| Error::Storage(format!("opening the evidence log: {e}")))??;
    metrics.storage_up.set(1);
    // The one process signs every checkpoint.
    metrics.storage_leader.set(1);
    let state = Arc::new(state::FileState::new(&config.state_dir));
    Ok(super::Storage {
        log: Arc::new(super::Log::File(Arc::new(log))),
        keys: Arc::clone(&state) as _,
        journal: state as _,
        leases: Arc::new(state::ProcessLeases),
        timestamps: Arc::new(state::FileTimestamps::new(&config.audit.dir)),
        claims: Arc::new(state::ProcessLeases),
        replicas: Arc::new(state::OneProcess::default()),
    })
}

impl From<tail::TailError> for Error {
    fn from(e: tail::TailError) -> Self {
        use tail::TailError as T;
        match e {
            T::Io { path, source } => Error::Io { path, source },
            T::Token(t) => Error::Token(t.to_string()),
            e @ (T::BadMac { .. } | T::WrongOrigin { .. }) => Error::AnchorMismatch(e.to_string()),
            e @ T::TooLong => Error::Unwritable(e.to_string()),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Is the log in `dir` held by a running Signet process?
pub fn is_locked(dir: &Path) -> bool {
    let Ok(f) = OpenOptions::new().write(true).open(dir.join(LOCK_FILE)) else {
        return false;
    };
    match f.try_lock() {
        Ok(()) => {
            let _ = f.unlock();
            false
        }
        Err(_) => true,
    }
}

/// Options for opening the log.
pub struct Options {
    pub dir: PathBuf,
    pub origin: String,
    pub fsync: FsyncPolicy,
    pub max_group_entries: usize,
    /// Open a log that differs from its anchors (a deliberate restore from backup) instead of
    /// refusing; what differed is in [`EvidenceLog::restore_findings`]. The operator command
    /// records it as evidence and re-anchors.
    pub accept_restore: bool,
}

pub struct FileLog {
    inner: Arc<Inner>,
    /// What differed from the anchors when opened with `accept_restore` (empty otherwise).
    restore_findings: Vec<String>,
    /// How many entries opening read.
    entries_read: u64,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    queue: crossbeam_channel::Sender<Request>,
}

struct Inner {
    origin: String,
    signer: Arc<dyn CheckpointSigner>,
    token: Arc<dyn TokenAnchor>,
    metrics: Arc<Metrics>,
    /// Shared by the writer (appends after fsync) and readers (proofs).
    state: RwLock<State>,
    /// The entries, their offsets, the tiles and the lookup indexes.
    store: Store,
    writable: AtomicBool,
    latest: RwLock<Option<Arc<StoredCheckpoint>>>,
    /// Serialises checkpoint signing.
    checkpointing: Mutex<()>,
    _lock: File,
}

/// The durable part of the log as of the last commit: O(log n), whatever the log's size.
struct State {
    /// The tree's right edge; everything left of it is in full tiles.
    edge: Arc<Edge>,
    /// The newest entry's leaf hash (the next entry links to it).
    last_leaf: Option<Hash>,
    file_len: u64,
    /// The tenants' active versions as of `edge.size()`: the writer's order check reads them,
    /// and each checkpoint saves them.
    active: Arc<order::ActiveVersions>,
}

/// Where the log's bytes are: `entries.jsonl` (the only source of truth) and what is derived
/// from it (`entries.idx`, `tile/`, `index/`).
struct Store {
    dir: PathBuf,
    /// A read-only handle on `entries.jsonl` for `read_at`.
    reader: File,
    offsets: Offsets,
    tiles: TileFiles,
    index: index::Index,
}

enum Request {
    Append {
        entries: Vec<Entry>,
        reply: tokio::sync::oneshot::Sender<Result<Vec<Receipt>, Error>>,
    },
    Stop,
}

impl Store {
    fn io(&self) -> impl FnOnce(io::Error) -> Error + '_ {
        io_err(&self.dir)
    }

    /// The bytes of entries `from..to` (each without its newline), from one read.
    fn entries(&self, from: u64, to: u64) -> Result<Vec<Vec<u8>>, Error> {
        if from >= to {
            return Ok(Vec::new());
        }
        let bounds = self.offsets.bounds(from, to).map_err(self.io())?;
        let (first, last) = (bounds[0], bounds[bounds.len() - 1]);
        let mut data = vec![0u8; last.saturating_sub(first) as usize];
        self.reader
            .read_exact_at(&mut data, first)
            .map_err(self.io())?;
        bounds
            .windows(2)
            .zip(from..)
            .map(|(w, i)| {
                let (s, e) = ((w[0] - first) as usize, (w[1] - first) as usize);
                match data.get(s..e) {
                    Some([line @ .., b'\n']) => Ok(line.to_vec()),
                    _ => Err(Error::Inconsistent(format!(
                        "{OFFSETS_FILE} does not point at entry {i} in {ENTRIES_FILE}"
                    ))),
                }
            })
            .collect()
    }

    fn entry(&self, index: u64) -> Result<Vec<u8>, Error> {
        let mut v = self.entries(index, index + 1)?;
        v.pop().ok_or(Error::NoSuchEntry(index))
    }

    /// A full tile: cached, on disk, or built from the entries (level 0) or the 256 tiles below
    /// it (and kept).
    fn tile(&self, id: TileId) -> Result<Tile, Error> {
        if let Some(t) = self.tiles.get(id) {
            return Ok(t);
        }
        let (level, n) = id;
        let width = tiled::WIDTH as u64;
        let hashes: Vec<Hash> = if level == 0 {
            self.entries(n * width, (n + 1) * width)?
                .iter()
                .map(|e| merkle::leaf_hash(e))
                .collect()
        } else {
            (0..width)
                .map(|j| Ok(tiled::tile_root(&self.tile((level - 1, n * width + j))?)))
                .collect::<Result<_, Error>>()?
        };
        if hashes.len() != tiled::WIDTH {
            return Err(Error::Inconsistent(format!("tile {id:?} is not complete")));
        }
        let tile = Arc::new(hashes);
        self.tiles.put(vec![(id, Arc::clone(&tile))]);
        Ok(tile)
    }

    /// Run an RFC 6962 computation over the tree: a pass that learns which full tiles it needs,
    /// then the computation with them.
    fn with_nodes<T>(
        &self,
        edge: &Edge,
        f: impl Fn(&mut TileNodes<'_>) -> Result<T, Missing>,
    ) -> Result<T, Error> {
        let none = HashMap::new();
        let mut collect = TileNodes::collecting(edge, &none);
        let _ = f(&mut collect);
        let mut fetched = HashMap::new();
        for id in collect.missing() {
            fetched.insert(id, self.tile(id)?);
        }
        f(&mut TileNodes::new(edge, &fetched))
            .map_err(|Missing(id)| Error::Inconsistent(format!("tile {id:?} could not be read")))
    }

    fn root(&self, edge: &Edge, size: u64) -> Result<Hash, Error> {
        if size > edge.size() {
            return Err(Error::Proof(merkle::ProofError::SizeOutOfRange {
                size,
                have: edge.size(),
            }));
        }
        self.with_nodes(edge, |n| merkle::root(n, size))
    }

    fn leaf(&self, edge: &Edge, index: u64) -> Result<Hash, Error> {
        self.with_nodes(edge, |n| merkle::Nodes::node(n, 0, index))
    }

    /// The right edge of the first `size` entries, from O(log n) entries and tiles.
    fn load_edge(&self, size: u64) -> Result<Edge, Error> {
        let width = tiled::WIDTH as u64;
        let mut partial = vec![
            self.entries(size - size % width, size)?
                .iter()
                .map(|e| merkle::leaf_hash(e))
                .collect::<Vec<_>>(),
        ];
        for level in 1..tiled::levels(size) {
            let count = tiled::hashes_at(size, level);
            let row = (count - count % width..count)
                .map(|j| Ok(tiled::tile_root(&self.tile((level - 1, j))?)))
                .collect::<Result<Vec<_>, Error>>()?;
            partial.push(row);
        }
        Edge::from_partials(size, partial).map_err(|e| Error::Inconsistent(e.to_string()))
    }
}

/// The active versions saved with each checkpoint, as of entry count `through`.
#[derive(Serialize, Deserialize)]
struct SavedActive {
    through: u64,
    active: order::ActiveVersions,
}

const ACTIVE_FILE: &str = "active-versions.json";

/// `active-versions.json`: the saved versions as a JSON string, and an HMAC over it computed
/// in the token (like `tail-head`), so a copy edited on disk is not trusted.
#[derive(Serialize, Deserialize)]
struct ActiveFile {
    payload: String,
    mac: String,
}

fn active_mac_message(origin: &str, payload: &str) -> Vec<u8> {
    format!("signet active versions v1\n{origin}\n{payload}").into_bytes()
}

fn write_active(
    dir: &Path,
    origin: &str,
    token: &dyn TokenAnchor,
    saved: &SavedActive,
) -> Result<(), Error> {
    let payload = serde_json::to_string(saved).map_err(|e| Error::Serialize(e.to_string()))?;
    let mac = token
        .mac(&active_mac_message(origin, &payload))
        .map_err(|e| Error::Token(e.to_string()))?;
    let file = serde_json::to_vec(&ActiveFile {
        payload,
        mac: B64.encode(mac),
    })
    .map_err(|e| Error::Serialize(e.to_string()))?;
    let path = dir.join(ACTIVE_FILE);
    crate::fsutil::write_atomic(&path, &file).map_err(io_err(&path))
}

/// The saved active versions, if present and their MAC verifies.
fn read_active(dir: &Path, origin: &str, token: &dyn TokenAnchor) -> Option<SavedActive> {
    use subtle::ConstantTimeEq;
    let file: ActiveFile =
        serde_json::from_slice(&std::fs::read(dir.join(ACTIVE_FILE)).ok()?).ok()?;
    let want = token.mac(&active_mac_message(origin, &file.payload)).ok()?;
    let got = B64.decode(&file.mac).unwrap_or_default();
    if !bool::from(got.as_slice().ct_eq(&want)) {
        tracing::warn!(
            "{ACTIVE_FILE} does not verify with the token's MAC key; reading the whole log"
        );
        return None;
    }
    serde_json::from_str(&file.payload).ok()
}

impl FileLog {
    /// Open (or create) the log, recover from a crash, and check it against the last signed
    /// checkpoint. Fails if another process holds it or it does not match its checkpoint.
    ///
    /// Start-up reads O(log n) tiles and only the entries written since the last checkpoint,
    /// whatever the log's size; it reads the whole log only when the files derived from it
    /// (`entries.idx`, `tile/`, `index/`, the saved active versions) are missing or disagree
    /// with the signed checkpoint (a log written before they existed, or damaged).
    pub fn open(
        opts: Options,
        signer: Arc<dyn CheckpointSigner>,
        token: Arc<dyn TokenAnchor>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let dir = opts.dir.clone();
        crate::fsutil::create_private_dir(&dir).map_err(io_err(&dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = crate::fsutil::open_durable(
            &lock_path,
            OpenOptions::new().create(true).truncate(false).write(true),
        )
        .map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(Error::Locked(dir.display().to_string()));
        }
        let key_path = dir.join(LOG_KEY_FILE);
        let key_pem = crate::pki::public_key_pem(&signer.public_key());
        if std::fs::read_to_string(&key_path).ok().as_deref() != Some(key_pem.as_str()) {
            crate::fsutil::write_atomic_mode(&key_path, key_pem.as_bytes(), 0o644)
                .map_err(io_err(&key_path))?;
        }

        let started = Instant::now();
        let log_path = dir.join(ENTRIES_FILE);
        // Entries hold signer evidence (personal data): owner-only.
        let mut log = crate::fsutil::open_durable(
            &log_path,
            OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .mode(0o600),
        )
        .map_err(io_err(&log_path))?;
        let latest = read_latest_checkpoint(&dir.join(CHECKPOINTS_FILE))?.map(Arc::new);
        let signed_size = latest.as_ref().map_or(0, |c| c.tree_size);
        let anchors = Anchors::load(&dir, &opts.origin, token.as_ref(), opts.accept_restore)?;
        let (index, indexed_through) = index::Index::open(&dir).map_err(io_err(&dir))?;
        let store = Store {
            reader: File::open(&log_path).map_err(io_err(&log_path))?,
            offsets: Offsets::open(&dir).map_err(io_err(&dir))?,
            tiles: TileFiles::open(&dir).map_err(io_err(&dir))?,
            index,
            dir: dir.clone(),
        };
        let signed = match &latest {
            Some(cp) => Some(
                note::verify_checkpoint(&cp.note, &opts.origin, &signer.public_key()).map_err(
                    |e| Error::Inconsistent(format!("checkpoint at size {}: {e}", cp.tree_size)),
                )?,
            ),
            None => None,
        };
        let mut targets = vec![signed_size];
        targets.extend(anchors.anchor.as_ref().map(|a| a.size));
        targets.extend(anchors.acknowledged());
        let recovery = Recovery {
            store: &store,
            log_path: &log_path,
            origin: &opts.origin,
            token: token.as_ref(),
            signed_size,
            acknowledged: anchors.acknowledged(),
            targets,
        };
        let mut recovered = match recovery.fast(&mut log, signed.as_ref(), indexed_through)? {
            Some(r) => r,
            None => recovery.full(&mut log)?,
        };
        let size = recovered.edge.size();
        if let Some(parsed) = &signed {
            if parsed.size > size {
                return Err(Error::Inconsistent(format!(
                    "the signed checkpoint covers {} entries but only {size} are on disk",
                    parsed.size
                )));
            }
            if recovered.root(&store, parsed.size)? != parsed.root {
                return Err(Error::Inconsistent(format!(
                    "root hash at size {} differs from the signed one",
                    parsed.size
                )));
            }
        }
        let mut restore_findings =
            anchors.check(size, signed_size, |s| recovered.root(&store, s).ok());
        if let Some(a) = anchors
            .anchor
            .as_ref()
            .filter(|_| !restore_findings.is_empty())
        {
            restore_findings.push(format!(
                "the token's anchor before the restore: size {}, root {}",
                a.size, a.root
            ));
        }
        if !restore_findings.is_empty() && !opts.accept_restore {
            return Err(Error::AnchorMismatch(restore_findings.join("; ")));
        }
        // What was rebuilt is durable before anything is served from it.
        store.offsets.sync().map_err(io_err(store.offsets.path()))?;
        store.index.sync(size).map_err(io_err(&dir))?;
        write_active(
            &dir,
            &opts.origin,
            token.as_ref(),
            &SavedActive {
                through: size,
                active: recovered.active.clone(),
            },
        )?;
        let fsync = opts.fsync;
        let mut tail = TailWriter::open(
            &dir,
            &opts.origin,
            anchors.tail,
            fsync == FsyncPolicy::Always,
        )?;
        if anchors.tail.is_none_or(|t| t.head.size != size) {
            let head = TreeHead {
                size,
                root: recovered.edge.root(),
            };
            tail.write(head, token.as_ref())?;
        }
        // A log without an anchor yet (new, or written by a version without anchors) is
        // anchored at its verified checkpoint; written after the tail head, so an anchor
        // always has a tail head beside it.
        if anchors.anchor.is_none() || opts.accept_restore {
            let head = TreeHead {
                size: signed_size,
                root: recovered.root(&store, signed_size)?,
            };
            token
                .store(&Anchor::new(&opts.origin, head).encode())
                .map_err(|e| Error::Token(e.to_string()))?;
        }
        let file_len = log.metadata().map_err(io_err(&log_path))?.len();
        tracing::info!(
            entries = size,
            checkpoint = signed_size,
            entries_read = recovered.read,
            millis = started.elapsed().as_millis() as u64,
            "evidence log opened"
        );

        metrics.audit_tree_size.set(size as i64);
        metrics.audit_writable.set(1);
        if let Some(cp) = &latest {
            metrics.audit_checkpoint_size.set(cp.tree_size as i64);
            metrics.audit_last_checkpoint.set(cp.signed_at as i64);
        }
        let inner = Arc::new(Inner {
            origin: opts.origin,
            signer,
            token,
            metrics,
            state: RwLock::new(State {
                edge: Arc::new(recovered.edge),
                last_leaf: recovered.last_leaf,
                file_len,
                active: Arc::new(std::mem::take(&mut recovered.active)),
            }),
            store,
            writable: AtomicBool::new(true),
            latest: RwLock::new(latest),
            checkpointing: Mutex::new(()),
            _lock: lock,
        });
        let (queue, rx) = crossbeam_channel::unbounded();
        let w = Arc::clone(&inner);
        let max_group = opts.max_group_entries;
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let mut sink = Sink { log, tail, fsync };
                writer_main(w, &mut sink, rx, max_group)
            })
            .map_err(io_err(&log_path))?;
        Ok(Self {
            inner,
            restore_findings,
            entries_read: recovered.read,
            writer: Mutex::new(Some(writer)),
            queue,
        })
    }

    /// What differed from the anchors when opened with `accept_restore`.
    pub fn restore_findings(&self) -> &[String] {
        &self.restore_findings
    }

    /// How many entries opening the log read (the entries since the last checkpoint, or all
    /// of them when the derived files could not be trusted).
    pub fn entries_read_at_open(&self) -> u64 {
        self.entries_read
    }

    /// Append entries (indexes are assigned here) and return once they are durable.
    pub async fn append(&self, entries: Vec<Entry>) -> Result<Vec<Receipt>, Error> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.queue
            .send(Request::Append { entries, reply })
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    pub fn origin(&self) -> &str {
        &self.inner.origin
    }

    pub fn is_writable(&self) -> bool {
        self.inner.writable.load(Ordering::Acquire)
    }

    pub fn tree_size(&self) -> u64 {
        self.edge().size()
    }

    /// The right edge of the committed tree.
    pub fn edge(&self) -> Arc<Edge> {
        Arc::clone(&read(&self.inner.state).edge)
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.inner.signer.public_key()
    }

    pub fn latest_checkpoint(&self) -> Option<Arc<StoredCheckpoint>> {
        read(&self.inner.latest).clone()
    }

    /// The canonical bytes of entry `index`.
    pub fn entry(&self, index: u64) -> Result<Vec<u8>, Error> {
        if index >= self.tree_size() {
            return Err(Error::NoSuchEntry(index));
        }
        self.inner.store.entry(index)
    }

    /// Entry `index` with its inclusion proof against the latest signed checkpoint.
    pub fn prove(&self, index: u64) -> Result<EntryProof, Error> {
        let checkpoint = self
            .latest_checkpoint()
            .ok_or(Error::NotYetCheckpointed { index, size: 0 })?;
        self.prove_with(index, checkpoint)
    }

    /// Full tile `id` of the tree (from the cache, its file, or rebuilt).
    pub fn tile(&self, id: TileId) -> Result<Tile, Error> {
        self.inner.store.tile(id)
    }

    /// The canonical bytes of entries `first..first + count` (all below the tree's size).
    pub fn entries(&self, first: u64, count: u64) -> Result<Vec<Vec<u8>>, Error> {
        let to = first.saturating_add(count);
        if to > self.tree_size() {
            return Err(Error::NoSuchEntry(to - 1));
        }
        self.inner.store.entries(first, to)
    }

    /// The entries that carry `transaction_id`, in log order.
    pub fn transaction_entries(&self, transaction_id: &str) -> Result<Vec<u64>, Error> {
        let size = self.tree_size();
        let store = &self.inner.store;
        let mut out = Vec::new();
        for i in store
            .index
            .transaction(transaction_id)
            .map_err(store.io())?
        {
            // The bucket holds a hash prefix: the entry itself says whether it is this one.
            if i < size
                && serde_json::from_slice::<IndexFields>(&store.entry(i)?)
                    .is_ok_and(|f| f.transaction_id.as_deref() == Some(transaction_id))
            {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// A page of `tenant`'s entries in a time window (µs since the epoch), after a cursor.
    pub fn tenant_entries(
        &self,
        tenant: &str,
        since_us: i64,
        until_us: i64,
        after: Option<u64>,
        limit: usize,
    ) -> Result<index::Page, Error> {
        let store = &self.inner.store;
        store
            .index
            .tenant_page(tenant, since_us, until_us, after, limit, self.tree_size())
            .map_err(store.io())
    }

    /// Entry `index` with its inclusion proof against `checkpoint` (one of this log's).
    pub fn prove_with(
        &self,
        index: u64,
        checkpoint: Arc<StoredCheckpoint>,
    ) -> Result<EntryProof, Error> {
        let edge = self.edge();
        if index >= edge.size() {
            return Err(Error::NoSuchEntry(index));
        }
        let size = checkpoint.tree_size;
        if index >= size {
            return Err(Error::NotYetCheckpointed { index, size });
        }
        let store = &self.inner.store;
        let (hashes, leaf_hash) = store.with_nodes(&edge, |n| {
            let leaf = merkle::Nodes::node(n, 0, index)?;
            Ok(match merkle::inclusion_proof(n, index, size) {
                Ok(proof) => Ok((proof?, leaf)),
                Err(e) => Err(e),
            })
        })??;
        EntryProof::checked(index, store.entry(index)?, leaf_hash, hashes, checkpoint)
    }

    /// RFC 6962 consistency proof between tree sizes `from` and `to`, both at most the latest
    /// signed checkpoint's size.
    pub fn consistency(&self, from: u64, to: u64) -> Result<Vec<Hash>, Error> {
        let signed = self.latest_checkpoint().map(|c| c.tree_size).unwrap_or(0);
        if to > signed {
            return Err(Error::NotYetCheckpointed {
                index: to.saturating_sub(1),
                size: signed,
            });
        }
        let edge = self.edge();
        if to > edge.size() {
            return Err(Error::Proof(merkle::ProofError::SizeOutOfRange {
                size: to,
                have: edge.size(),
            }));
        }
        Ok(self.inner.store.with_nodes(&edge, |n| {
            Ok(match merkle::consistency_proof(n, from, to) {
                Ok(proof) => Ok(proof?),
                Err(e) => Err(e),
            })
        })??)
    }

    /// Root hash at `size` (for the API's convenience).
    pub fn root(&self, size: u64) -> Result<Hash, Error> {
        self.inner.store.root(&self.edge(), size)
    }

    /// Sign a checkpoint for the current tree if it grew since the last one (or none exists).
    /// Blocking: it signs in the token. Returns the new checkpoint, if one was made.
    pub fn checkpoint_blocking(
        &self,
        now_unix: u64,
    ) -> Result<Option<Arc<StoredCheckpoint>>, Error> {
        let _guard = self
            .inner
            .checkpointing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (edge, active) = {
            let st = read(&self.inner.state);
            (Arc::clone(&st.edge), Arc::clone(&st.active))
        };
        let size = edge.size();
        let root = edge.root();
        if let Some(latest) = self.latest_checkpoint()
            && latest.tree_size == size
        {
            return Ok(None);
        }
        // What start-up trusts below a checkpoint is durable before the checkpoint is.
        let store = &self.inner.store;
        store.offsets.sync().map_err(io_err(store.offsets.path()))?;
        store.index.sync(size).map_err(store.io())?;
        write_active(
            &store.dir,
            &self.inner.origin,
            self.inner.token.as_ref(),
            &SavedActive {
                through: size,
                active: (*active).clone(),
            },
        )?;
        let cp = Checkpoint {
            origin: self.inner.origin.clone(),
            size,
            root,
        };
        let sig = self
            .inner
            .signer
            .sign(cp.body().as_bytes())
            .map_err(Error::Sign)?;
        let note = note::signed_checkpoint(&cp, &self.inner.signer.public_key(), sig);
        let stored = StoredCheckpoint {
            tree_size: size,
            signed_at: now_unix,
            note,
        };
        let line = serde_json::to_string(&stored).map_err(|e| Error::Serialize(e.to_string()))?;
        let path = store.dir.join(CHECKPOINTS_FILE);
        let mut f = crate::fsutil::open_durable(
            &path,
            OpenOptions::new().create(true).append(true).mode(0o600),
        )
        .map_err(io_err(&path))?;
        f.write_all(format!("{line}\n").as_bytes())
            .map_err(io_err(&path))?;
        f.sync_data().map_err(io_err(&path))?;
        // The anchor follows the durable checkpoint line, so it never covers more than the
        // checkpoint file holds.
        self.inner
            .token
            .store(&Anchor::new(&self.inner.origin, TreeHead { size, root }).encode())
            .map_err(|e| Error::Token(e.to_string()))?;
        let stored = Arc::new(stored);
        *write(&self.inner.latest) = Some(Arc::clone(&stored));
        self.inner.metrics.audit_checkpoint_size.set(size as i64);
        self.inner
            .metrics
            .audit_last_checkpoint
            .set(now_unix as i64);
        Ok(Some(stored))
    }

    /// Visit entries from the newest backwards until `visit` returns false.
    pub fn scan_backwards(&self, mut visit: impl FnMut(u64, &Entry) -> bool) -> Result<(), Error> {
        let mut end = self.tree_size();
        while end > 0 {
            let start = end.saturating_sub(1024);
            let chunk = self.inner.store.entries(start, end)?;
            for (index, bytes) in (start..end).rev().zip(chunk.iter().rev()) {
                let Ok(entry) = serde_json::from_slice::<Entry>(bytes) else {
                    continue;
                };
                if !visit(index, &entry) {
                    return Ok(());
                }
            }
            end = start;
        }
        Ok(())
    }

    /// Stop the writer after the queued appends are durable, and write out the tiles it
    /// completed. Idempotent.
    pub fn close(&self) {
        let _ = self.queue.send(Request::Stop);
        if let Some(t) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        self.inner.store.tiles.close();
    }
}

impl Drop for FileLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// What the writer thread writes to: the entries file and the tail head.
struct Sink {
    log: File,
    tail: TailWriter,
    fsync: FsyncPolicy,
}

/// The writer thread: group commit.
fn writer_main(
    inner: Arc<Inner>,
    sink: &mut Sink,
    rx: crossbeam_channel::Receiver<Request>,
    max_group: usize,
) {
    let mut buf = Vec::with_capacity(1 << 16);
    let mut stopping = false;
    while !stopping {
        let first = match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(r) => r,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if !inner.writable.load(Ordering::Acquire) {
                    probe_writable(&inner, &mut sink.log);
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        // Take everything waiting right now: one write, one fsync for all of it.
        let mut group = Vec::new();
        let mut count = 0;
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                Request::Stop => stopping = true,
                Request::Append { entries, reply } => {
                    count += entries.len();
                    group.push((entries, reply));
                }
            }
            if count < max_group && !stopping {
                next = rx.try_recv().ok();
            }
        }
        if group.is_empty() {
            continue;
        }
        commit(&inner, sink, group, &mut buf);
    }
    // Answer anything still queued after a stop.
    while let Ok(Request::Append { reply, .. }) = rx.try_recv() {
        let _ = reply.send(Err(Error::Closed));
    }
}

type Group = Vec<(
    Vec<Entry>,
    tokio::sync::oneshot::Sender<Result<Vec<Receipt>, Error>>,
)>;

/// Sequence one group: assign indexes and hash links, refuse requests whose signatures were
/// made with a replaced version (the order rule), write, fsync, publish, answer.
fn commit(inner: &Inner, sink: &mut Sink, group: Group, buf: &mut Vec<u8>) {
    buf.clear();
    // The order state as of this group; becomes `active` only once the group is durable.
    let mut staged: Option<order::ActiveVersions> = None;
    let (edge, base_len, mut previous, active) = {
        let st = read(&inner.state);
        (
            Arc::clone(&st.edge),
            st.file_len,
            st.last_leaf,
            Arc::clone(&st.active),
        )
    };
    let base_index = edge.size();
    let mut next = base_index;
    let mut leaves = Vec::new();
    let mut ends = Vec::new();
    let mut receipts: Vec<Result<Vec<Receipt>, Error>> = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    let mut events: Vec<String> = Vec::new();
    let mut lookups: Vec<(u64, index::Indexed)> = Vec::new();
    for (entries, reply) in group {
        replies.push(reply);
        let mut out = Vec::with_capacity(entries.len());
        let mark = (buf.len(), next, leaves.len(), previous);
        let mut failed = None;
        let staged_before = staged.clone();
        for mut e in entries {
            e.index = next;
            e.previous_leaf_hash = previous.map(|h| B64.encode(h));
            let order = staged.as_ref().unwrap_or(&active);
            if let Err(v) = order.check(&e) {
                failed = Some(Error::Superseded(v));
                break;
            }
            if order::activation(&e).is_some() {
                staged.get_or_insert_with(|| (*active).clone()).record(&e);
            }
            match e.canonical() {
                Ok(bytes) => {
                    let leaf = merkle::leaf_hash(&bytes);
                    previous = Some(leaf);
                    buf.extend_from_slice(&bytes);
                    buf.push(b'\n');
                    ends.push(base_len + buf.len() as u64);
                    leaves.push(leaf);
                    out.push(Receipt {
                        log_origin: inner.origin.clone(),
                        index: next,
                        leaf_hash: B64.encode(leaf),
                    });
                    lookups.push((next, indexed(&e.time, e.tenant, e.transaction_id)));
                    events.push(e.event);
                    next += 1;
                }
                Err(err) => {
                    failed = Some(Error::Serialize(err.to_string()));
                    break;
                }
            }
        }
        match failed {
            None => receipts.push(Ok(out)),
            Some(err) => {
                // Drop this request's entries only; the others in the group go ahead.
                buf.truncate(mark.0);
                ends.truncate(mark.2);
                leaves.truncate(mark.2);
                events.truncate(events.len() - (next - mark.1) as usize);
                lookups.retain(|(i, _)| *i < mark.1);
                next = mark.1;
                previous = mark.3;
                staged = staged_before;
                receipts.push(Err(err));
            }
        }
    }

    // Commit point 1: after write_all + fdatasync the entries in `buf` are durable; their end
    // offsets follow in `entries.idx`.
    // Commit point 2 (acknowledgement): the tail head for the new size, MACed in the token, is
    // durable. Only then are the entries published and answered. On a failure the entries file
    // is cut back to `base_len`; at start-up, complete entries beyond the tail head are cut the
    // same way (they were never acknowledged), and a torn final write is cut.
    let mut grown = (*edge).clone();
    let mut completed = Vec::new();
    for l in &leaves {
        completed.extend(grown.push(*l));
    }
    let result = (|| -> Result<(), String> {
        if buf.is_empty() {
            return Ok(());
        }
        sink.log.write_all(buf).map_err(|e| e.to_string())?;
        if sink.fsync == FsyncPolicy::Always {
            let t = Instant::now();
            sink.log.sync_data().map_err(|e| e.to_string())?;
            inner
                .metrics
                .audit_fsync_duration
                .observe(t.elapsed().as_secs_f64());
        }
        inner
            .store
            .offsets
            .append(&ends)
            .map_err(|e| format!("{OFFSETS_FILE}: {e}"))?;
        let head = TreeHead {
            size: grown.size(),
            root: grown.root(),
        };
        sink.tail
            .write(head, inner.token.as_ref())
            .map_err(|e| e.to_string())
    })();

    if let Err(msg) = result {
        inner.metrics.audit_write_errors.inc();
        inner.writable.store(false, Ordering::Release);
        inner.metrics.audit_writable.set(0);
        tracing::error!(error = %msg, "evidence log append failed; signing is refused until it is writable again");
        if let Err(t) = sink.log.set_len(base_len) {
            tracing::error!(error = %t, "cannot cut the failed append back off the evidence log");
        }
        if let Err(t) = inner.store.offsets.truncate(base_index) {
            tracing::error!(error = %t, "cannot cut the failed append back off {OFFSETS_FILE}");
        }
        // The tail head may now claim the cut entries: put the previous head back.
        if let Err(e) = sink.tail.write(
            TreeHead {
                size: base_index,
                root: edge.root(),
            },
            inner.token.as_ref(),
        ) {
            tracing::error!(error = %e, "cannot restore the tail head after a failed append");
        }
        for reply in replies {
            let _ = reply.send(Err(Error::Unwritable(msg.clone())));
        }
        return;
    }

    inner.store.index.add(lookups);
    inner.store.tiles.put(completed);
    {
        let mut st = write(&inner.state);
        if let Some(s) = staged {
            st.active = Arc::new(s);
        }
        st.edge = Arc::new(grown);
        if let Some(l) = leaves.last() {
            st.last_leaf = Some(*l);
        }
        st.file_len = base_len + buf.len() as u64;
        inner.metrics.audit_tree_size.set(st.edge.size() as i64);
    }
    if !inner.writable.swap(true, Ordering::AcqRel) {
        tracing::info!("evidence log writable again");
    }
    inner.metrics.audit_writable.set(1);
    inner.metrics.audit_group_size.observe(leaves.len() as f64);
    for ev in &events {
        inner
            .metrics
            .audit_entries
            .with_label_values(&[ev.as_str()])
            .inc();
    }
    for (reply, r) in replies.into_iter().zip(receipts) {
        let _ = reply.send(r);
    }
}

/// While unwritable, try to append (and remove) 4 KiB at the end of the log: succeeds only
/// when the log itself can grow again (disk space, quota, file size limit).
fn probe_writable(inner: &Inner, log: &mut File) {
    let len = read(&inner.state).file_len;
    let ok = (|| -> io::Result<()> {
        log.write_all(&[b' '; 4096])?;
        log.sync_data()?;
        Ok(())
    })();
    let _ = log.set_len(len);
    if ok.is_ok() {
        inner.writable.store(true, Ordering::Release);
        inner.metrics.audit_writable.set(1);
        tracing::info!("evidence log writable again");
    }
}

/// The fields the lookup indexes need, read without parsing a whole entry.
#[derive(Deserialize)]
struct IndexFields {
    time: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    transaction_id: Option<String>,
}

fn indexed(time: &str, tenant: Option<String>, transaction_id: Option<String>) -> index::Indexed {
    index::Indexed {
        tenant,
        transaction_id,
        time_us: index::parse_time_us(time).unwrap_or(0),
    }
}

/// The tree, the tenants' active versions and what else start-up recovered.
struct Recovered {
    edge: Edge,
    last_leaf: Option<Hash>,
    active: order::ActiveVersions,
    /// Roots at the sizes start-up checks (the checkpoint's, the anchors'), taken while the
    /// scan passed them.
    roots: HashMap<u64, Hash>,
    /// How many entries start-up read.
    read: u64,
}

impl Recovered {
    fn root(&self, store: &Store, size: u64) -> Result<Hash, Error> {
        match self.roots.get(&size) {
            Some(r) => Ok(*r),
            None => store.root(&self.edge, size),
        }
    }
}

/// Bringing the log back at start-up.
struct Recovery<'a> {
    store: &'a Store,
    log_path: &'a Path,
    origin: &'a str,
    token: &'a dyn TokenAnchor,
    /// The latest signed checkpoint's size.
    signed_size: u64,
    /// The tail head's size: entries beyond it were never acknowledged.
    acknowledged: Option<u64>,
    /// Sizes whose roots start-up checks.
    targets: Vec<u64>,
}

impl Recovery<'_> {
    /// Start from the tiles at the last checkpoint and read only the entries after it (and
    /// those the derived files were not yet durable for). `None` when the derived files cannot
    /// be trusted: then the whole log is read ([`Self::full`]).
    fn fast(
        &self,
        log: &mut File,
        signed: Option<&Checkpoint>,
        indexed_through: u64,
    ) -> Result<Option<Recovered>, Error> {
        let (Some(signed), Some(saved)) = (
            signed,
            read_active(&self.store.dir, self.origin, self.token),
        ) else {
            return Ok(None);
        };
        let size = signed.size;
        let offsets = &self.store.offsets;
        let data_len = log.metadata().map_err(io_err(self.log_path))?.len();
        let sane = size > 0
            && offsets.count().is_ok_and(|c| c >= size)
            && offsets.end(size - 1).is_ok_and(|end| {
                let mut b = [0u8; 1];
                end <= data_len
                    && self.store.reader.read_exact_at(&mut b, end - 1).is_ok()
                    && b[0] == b'\n'
            });
        if !sane {
            tracing::warn!(
                "{OFFSETS_FILE} does not cover the last checkpoint; reading the whole log"
            );
            return Ok(None);
        }
        let edge = match self.store.load_edge(size) {
            Ok(e) if e.root() == signed.root => e,
            Ok(_) => {
                tracing::warn!(
                    "the tiles disagree with the last checkpoint; rebuilding them from the whole log"
                );
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot rebuild the tree's edge from the tiles; reading the whole log");
                return Ok(None);
            }
        };
        let from = indexed_through.min(size).min(saved.through);
        offsets.truncate(size).map_err(io_err(offsets.path()))?;
        let last_leaf = Some(self.store.leaf(&edge, size - 1)?);
        let recovered = self.scan(log, from, edge, last_leaf, saved.active)?;
        if saved.through > recovered.edge.size() {
            tracing::warn!(
                saved = saved.through,
                "the saved active versions are newer than the log; reading the whole log"
            );
            return Ok(None);
        }
        Ok(Some(recovered))
    }

    /// Read the whole log, rebuilding every derived file.
    fn full(&self, log: &mut File) -> Result<Recovered, Error> {
        self.store.tiles.clear().map_err(self.store.io())?;
        self.store
            .offsets
            .truncate(0)
            .map_err(io_err(self.store.offsets.path()))?;
        self.scan(log, 0, Edge::new(), None, order::ActiveVersions::default())
    }

    /// Read entries from `from` on. Entries below `edge`'s size (already in the tree) are
    /// only indexed and their activations recorded. Entries from it on go through the log's
    /// one streaming check ([`verify::LogCheck`]): those past the signed checkpoint fully
    /// (canonical, dense indexes, hash links, signing order; a complete line that fails is
    /// corruption and start-up stops), those below it by their leaf alone (the checkpoint's
    /// root, checked after the scan, proves them); all are added to the tree, `entries.idx`
    /// and the tiles. What is cut: a torn final write (no newline), and complete entries beyond
    /// the tail head's size (written, but the process died before they were acknowledged).
    fn scan(
        &self,
        log: &mut File,
        from: u64,
        edge: Edge,
        last_leaf: Option<Hash>,
        active: order::ActiveVersions,
    ) -> Result<Recovered, Error> {
        let path = self.log_path;
        let store = self.store;
        let data_len = log.metadata().map_err(io_err(path))?.len();
        let mut pos = store.offsets.start(from).map_err(io_err(path))?;
        let checked_from = edge.size();
        let mut check = verify::LogCheck::resume(edge, last_leaf, active);
        store.index.repair(from).map_err(store.io())?;
        let f = File::open(path).map_err(io_err(path))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        r.seek(io::SeekFrom::Start(pos)).map_err(io_err(path))?;
        let mut roots = HashMap::new();
        let take_root = |edge: &Edge, roots: &mut HashMap<u64, Hash>| {
            if self.targets.contains(&edge.size()) {
                roots.insert(edge.size(), edge.root());
            }
        };
        take_root(check.edge(), &mut roots);
        let mut index = from;
        let mut unacknowledged = 0u64;
        let mut line = Vec::new();
        let mut lookups = Vec::new();
        let mut ends = Vec::new();
        let mut completed = Vec::new();
        loop {
            line.clear();
            let n = r.read_until(b'\n', &mut line).map_err(io_err(path))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            if self.acknowledged.is_some_and(|a| index >= a) {
                unacknowledged += 1;
                continue;
            }
            line.pop();
            pos += n as u64;
            if index < checked_from {
                // Already in the tree: index it and note its activation.
                if order::may_be_activation(&line)
                    && let Ok(e) = serde_json::from_slice::<Entry>(&line)
                {
                    check.record_activation(&e);
                }
                if let Ok(f) = serde_json::from_slice::<IndexFields>(&line) {
                    lookups.push((index, indexed(&f.time, f.tenant, f.transaction_id)));
                }
            } else if index >= self.signed_size {
                let (e, tiles) = check.check(&line).map_err(|f| Error::Corrupt {
                    file: ENTRIES_FILE,
                    line: index + 1,
                    reason: f.message,
                })?;
                completed.extend(tiles);
                lookups.push((index, indexed(&e.time, e.tenant, e.transaction_id)));
            } else {
                completed.extend(check.covered(&line));
                if let Ok(f) = serde_json::from_slice::<IndexFields>(&line) {
                    lookups.push((index, indexed(&f.time, f.tenant, f.transaction_id)));
                }
            }
            if index >= checked_from {
                ends.push(pos);
                take_root(check.edge(), &mut roots);
            }
            index += 1;
            if lookups.len() >= 4096 {
                self.flush(&mut lookups, &mut ends, &mut completed)?;
            }
        }
        self.flush(&mut lookups, &mut ends, &mut completed)?;
        let (edge, last_leaf, active) = check.into_parts();
        if pos < data_len {
            tracing::warn!(
                bytes = data_len - pos,
                unacknowledged_entries = unacknowledged,
                entries = edge.size(),
                "cutting a torn or unacknowledged tail off the evidence log"
            );
            log.set_len(pos).map_err(io_err(path))?;
            log.sync_all().map_err(io_err(path))?;
        }
        Ok(Recovered {
            edge,
            last_leaf,
            active,
            roots,
            read: index - from,
        })
    }

    fn flush(
        &self,
        lookups: &mut Vec<(u64, index::Indexed)>,
        ends: &mut Vec<u64>,
        completed: &mut Vec<(TileId, Tile)>,
    ) -> Result<(), Error> {
        let store = self.store;
        store.index.add(std::mem::take(lookups));
        if store.index.pending() >= 1 << 16 {
            store.index.flush().map_err(store.io())?;
        }
        store
            .offsets
            .append(ends)
            .map_err(io_err(store.offsets.path()))?;
        store.tiles.put(std::mem::take(completed));
        ends.clear();
        Ok(())
    }
}

/// The anchors read at start-up: the token's signed tree head and the tail head.
struct Anchors {
    anchor: Option<Anchor>,
    tail: Option<TailHead>,
    /// Why the tail head could not be read (kept for `accept_restore`).
    tail_problem: Option<String>,
}

impl Anchors {
    fn load(
        dir: &Path,
        origin: &str,
        token: &dyn TokenAnchor,
        accept_restore: bool,
    ) -> Result<Self, Error> {
        // Two anchors only if a replacement was interrupted: the larger one is the newer.
        let anchor = token
            .load()
            .map_err(|e| Error::Token(e.to_string()))?
            .iter()
            .map(|b| Anchor::decode(b))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Token)?
            .into_iter()
            .max_by_key(|a| a.size);
        if let Some(a) = &anchor
            && a.origin != origin
        {
            return Err(Error::AnchorMismatch(format!(
                "the token anchors log `{}`, this is log `{origin}`",
                a.origin
            )));
        }
        let (tail, tail_problem) = match tail::read_tail(dir, origin, token) {
            Ok(t) => (t, None),
            Err(e @ (tail::TailError::BadMac { .. } | tail::TailError::WrongOrigin { .. }))
                if accept_restore =>
            {
                (None, Some(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            anchor,
            tail,
            tail_problem,
        })
    }

    /// How many entries were acknowledged, if the tail head says.
    fn acknowledged(&self) -> Option<u64> {
        self.tail.map(|t| t.head.size)
    }

    /// What about the log (`len` entries, checked against its latest checkpoint of
    /// `signed_size`; `root` gives its root at a size) differs from the anchors. Empty when it
    /// matches.
    fn check(&self, len: u64, signed_size: u64, root: impl Fn(u64) -> Option<Hash>) -> Vec<String> {
        let mut out: Vec<String> = self.tail_problem.iter().cloned().collect();
        if let Some(a) = &self.anchor {
            if len < a.size {
                out.push(format!(
                    "the log holds {} entries but the token's anchor covers {}: entries were removed or an older copy was restored",
                    len,
                    a.size
                ));
            } else if a.root_hash().ok() != root(a.size) {
                out.push(format!(
                    "the root hash at size {} differs from the token's anchor: entries below {} were rewritten",
                    a.size, a.size
                ));
            }
            if signed_size < a.size {
                out.push(format!(
                    "{CHECKPOINTS_FILE} ends at size {signed_size} but the token's anchor holds the checkpoint at size {}: checkpoints were removed",
                    a.size
                ));
            }
            if self.tail.is_none() && self.tail_problem.is_none() {
                out.push(format!(
                    "{} is missing although the log is anchored",
                    tail::TAIL_HEAD_FILE
                ));
            }
        }
        if let Some(t) = &self.tail {
            if len < t.head.size {
                out.push(format!(
                    "the log holds {} entries but {} were acknowledged ({}): acknowledged entries were removed",
                    len,
                    t.head.size,
                    tail::TAIL_HEAD_FILE
                ));
            } else if root(t.head.size) != Some(t.head.root) {
                out.push(format!(
                    "entries below {} differ from the acknowledged tail head ({}): an entry after the last checkpoint was edited",
                    t.head.size,
                    tail::TAIL_HEAD_FILE
                ));
            }
        }
        out
    }
}

/// Visit the complete lines of `f` (each without its newline, with the offset where it
/// starts) from the last one backwards, until `visit` returns false; reads only as much of
/// the file as that needs. Returns the length up to the last newline (a torn final line, if
/// any, is after it).
pub fn lines_from_end(f: &File, mut visit: impl FnMut(u64, &[u8]) -> bool) -> io::Result<u64> {
    let len = f.metadata()?.len();
    // `buf` holds the file from `start` up to the end of the line visited last.
    let (mut start, mut buf) = (len, Vec::new());
    let mut complete = None;
    loop {
        match buf.iter().rposition(|&b| b == b'\n') {
            Some(end) if complete.is_none() => {
                complete = Some(start + end as u64 + 1);
                buf.truncate(end + 1);
            }
            _ => {}
        }
        if complete.is_some() {
            // Every whole line at the end of `buf`: after the previous newline, or from the
            // file's start.
            while let Some(end) = buf.iter().rposition(|&b| b == b'\n') {
                let from = match buf[..end].iter().rposition(|&b| b == b'\n') {
                    Some(p) => p + 1,
                    None if start == 0 => 0,
                    None => break,
                };
                if !visit(start + from as u64, &buf[from..end]) {
                    return Ok(complete.unwrap_or(0));
                }
                buf.truncate(from);
            }
        }
        if start == 0 {
            return Ok(complete.unwrap_or(0));
        }
        let from = start.saturating_sub(1 << 16);
        let mut chunk = vec![0u8; (start - from) as usize];
        f.read_exact_at(&mut chunk, from)?;
        chunk.extend_from_slice(&buf);
        (start, buf) = (from, chunk);
    }
}

/// The last checkpoint in `checkpoints.jsonl`, read from the end of the file (start-up does
/// not grow with the number of checkpoints); a torn final line is cut. A complete last line
/// that does not parse is corruption (`signet audit verify` checks every line).
pub fn read_latest_checkpoint(path: &Path) -> Result<Option<StoredCheckpoint>, Error> {
    let f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let len = f.metadata().map_err(io_err(path))?.len();
    let mut last: Option<(u64, Vec<u8>)> = None;
    let complete = lines_from_end(&f, |at, line| {
        last = Some((at, line.to_vec()));
        false
    })
    .map_err(io_err(path))?;
    if complete < len {
        tracing::warn!(
            bytes = len - complete,
            "cutting a torn final line off the checkpoint file"
        );
        f.set_len(complete).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
    }
    let Some((at, line)) = last else {
        return Ok(None);
    };
    serde_json::from_slice::<StoredCheckpoint>(&line)
        .map(Some)
        .map_err(|e| {
            // Only on this error path: which line it is.
            let mut before = vec![0u8; at as usize];
            let line = match f.read_exact_at(&mut before, 0) {
                Ok(()) => before.iter().filter(|&&c| c == b'\n').count() as u64 + 1,
                Err(_) => 0,
            };
            Error::Corrupt {
                file: CHECKPOINTS_FILE,
                line,
                reason: e.to_string(),
            }
        })
}

/// Read `checkpoints.jsonl`, cutting a torn final line; a complete line that does not parse is
/// corruption.
pub fn read_checkpoints(path: &Path) -> Result<Vec<StoredCheckpoint>, Error> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                path: path.display().to_string(),
                source: e,
            });
        }
    };
    let mut out = Vec::new();
    let mut good = 0usize;
    for (n, line) in data.split_inclusive(|&b| b == b'\n').enumerate() {
        if line.last() != Some(&b'\n') {
            break;
        }
        let c =
            serde_json::from_slice::<StoredCheckpoint>(&line[..line.len() - 1]).map_err(|e| {
                Error::Corrupt {
                    file: CHECKPOINTS_FILE,
                    line: n as u64 + 1,
                    reason: e.to_string(),
                }
            })?;
        out.push(c);
        good += line.len();
    }
    if good < data.len() {
        tracing::warn!(
            bytes = data.len() - good,
            "cutting a torn final line off the checkpoint file"
        );
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(good as u64).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::Generate;

    use crate::audit::{Actor, entry};
    use tail::tests::SoftAnchor;

    /// A software log key and anchor: these tests are about the log's files, not the token.
    pub(crate) struct SoftSigner(pub SigningKey, pub Arc<SoftAnchor>);

    fn soft_token() -> Arc<SoftSigner> {
        Arc::new(SoftSigner(
            SigningKey::generate(),
            Arc::new(SoftAnchor::new()),
        ))
    }
    impl CheckpointSigner for SoftSigner {
        fn public_key(&self) -> VerifyingKey {
            *self.0.verifying_key()
        }
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
            let s: p256::ecdsa::Signature = signature::Signer::sign(&self.0, message);
            Ok(s.to_der().as_bytes().to_vec())
        }
    }

    fn entry(i: usize) -> Entry {
        let mut e = Entry::new(
            entry::event::SIGNATURE,
            format!("2026-01-01T00:00:{:02}.000000Z", i % 60),
            Actor {
                identity: "test".into(),
                subject: String::new(),
                san: vec![],
                fingerprint_sha256: String::new(),
            },
        );
        e.transaction_id = Some(format!("tx-{i}"));
        e
    }

    fn open(dir: &Path, key: &Arc<SoftSigner>) -> Result<FileLog, Error> {
        open_with(dir, key, false)
    }

    fn open_with(
        dir: &Path,
        key: &Arc<SoftSigner>,
        accept_restore: bool,
    ) -> Result<FileLog, Error> {
        FileLog::open(
            Options {
                dir: dir.to_path_buf(),
                origin: "test.example/log".into(),
                fsync: FsyncPolicy::Always,
                max_group_entries: 64,
                accept_restore,
            },
            Arc::clone(key) as Arc<dyn CheckpointSigner>,
            Arc::clone(&key.1) as Arc<dyn TokenAnchor>,
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn append_prove_reopen_and_recover_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let key = soft_token();
        let log = open(dir.path(), &key).unwrap();
        assert!(
            matches!(open(dir.path(), &key), Err(Error::Locked(_))),
            "second writer is refused"
        );
        // Concurrent appends share commits and get distinct, dense indexes.
        let log = Arc::new(log);
        let mut tasks = Vec::new();
        for i in 0..50 {
            let l = Arc::clone(&log);
            tasks.push(tokio::spawn(async move {
                l.append(vec![entry(i)]).await.unwrap()
            }));
        }
        let mut indexes: Vec<u64> = Vec::new();
        // Concurrent appends land in any order: remember which index each one got.
        let mut tx_at = std::collections::HashMap::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let index = t.await.unwrap()[0].index;
            tx_at.insert(index, format!("tx-{i}"));
            indexes.push(index);
        }
        indexes.sort();
        assert_eq!(indexes, (0..50).collect::<Vec<_>>());
        assert!(matches!(
            log.prove(0),
            Err(Error::NotYetCheckpointed { .. })
        ));
        let l2 = Arc::clone(&log);
        let cp = tokio::task::spawn_blocking(move || l2.checkpoint_blocking(1))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(cp.tree_size, 50);
        let p = log.prove(17).unwrap();
        let parsed =
            note::verify_checkpoint(&p.checkpoint.note, "test.example/log", &key.public_key())
                .unwrap();
        merkle::verify_inclusion(
            &merkle::leaf_hash(&p.entry),
            17,
            parsed.size,
            &p.proof.hashes,
            &parsed.root,
        )
        .unwrap();
        assert_eq!(
            entry::parse_stored(&p.entry, 17)
                .unwrap()
                .transaction_id
                .as_deref(),
            tx_at.get(&17).map(String::as_str)
        );
        log.close();
        drop(log);

        // A torn write after the last commit is cut at the next start.
        let path = dir.path().join(ENTRIES_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"actor\":{\"identity\":\"x\"},\"ev")
            .unwrap();
        drop(f);
        let log = open(dir.path(), &key).unwrap();
        assert_eq!(log.tree_size(), 50);
        let r = log.append(vec![entry(50)]).await.unwrap();
        assert_eq!(r[0].index, 50);
        assert_eq!(
            entry::parse_stored(&log.entry(50).unwrap(), 50)
                .unwrap()
                .transaction_id
                .as_deref(),
            Some("tx-50")
        );
        log.close();
        drop(log);

        // Reopening gives the same entries.
        let log = open(dir.path(), &key).unwrap();
        assert_eq!(log.tree_size(), 51);
        let e3 = entry::parse_stored(&log.entry(3).unwrap(), 3).unwrap();
        assert_eq!(
            e3.transaction_id.as_deref(),
            tx_at.get(&3).map(String::as_str)
        );
        assert!(e3.previous_leaf_hash.is_some());
        log.close();
        drop(log);
        let report = verify::verify_dir(dir.path(), &key.public_key()).unwrap();
        assert_eq!(
            (
                report.entries,
                report.latest_checkpoint_size,
                report.unsigned_tail
            ),
            (51, 50, 1)
        );

        // An entry altered under the signed checkpoint stops the start, and verify names it.
        let data = std::fs::read_to_string(&path).unwrap();
        let tx5 = tx_at[&5].clone();
        std::fs::write(&path, data.replacen(&format!("{tx5}\""), "tx-x\"", 1)).unwrap();
        assert!(matches!(
            open(dir.path(), &key),
            Err(Error::Inconsistent(_))
        ));
        let failure = verify::verify_dir(dir.path(), &key.public_key()).unwrap_err();
        assert_eq!(failure.first_bad_entry, Some(5), "{failure}");
    }

    async fn checkpoint(log: &Arc<FileLog>) -> Arc<StoredCheckpoint> {
        let l = Arc::clone(log);
        tokio::task::spawn_blocking(move || l.checkpoint_blocking(1))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    fn assert_proves(log: &FileLog, key: &SoftSigner, index: u64) {
        let p = log.prove(index).unwrap();
        let parsed =
            note::verify_checkpoint(&p.checkpoint.note, "test.example/log", &key.public_key())
                .unwrap();
        merkle::verify_inclusion(
            &merkle::leaf_hash(&p.entry),
            index,
            parsed.size,
            &p.proof.hashes,
            &parsed.root,
        )
        .unwrap();
    }

    /// A log of several tiles opens from its tiles and the entries after the last checkpoint;
    /// an entry altered below the checkpoint is refused when it is served; derived files that
    /// are lost are rebuilt from the entries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_of_many_tiles_opens_from_its_tiles_and_rebuilds_what_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let key = soft_token();
        let log = Arc::new(open(dir.path(), &key).unwrap());
        for chunk in 0..20 {
            let batch = (0..100).map(|i| entry(chunk * 100 + i)).collect();
            log.append(batch).await.unwrap();
        }
        let cp = checkpoint(&log).await;
        assert_eq!(cp.tree_size, 2000);
        let root = log.root(2000).unwrap();
        let proof_700 = log.prove(700).unwrap().proof.hashes;
        let tx_1234 = log.transaction_entries("tx-1234").unwrap();
        assert_eq!(tx_1234, vec![1234]);
        log.append(vec![entry(2000), entry(2001)]).await.unwrap();
        log.close();
        drop(log);
        // Seven full tiles of leaves are on disk at their C2SP paths.
        for n in 0..7 {
            let t = std::fs::read(dir.path().join(format!("tile/0/{n:03}"))).unwrap();
            assert_eq!(t.len(), 256 * 32);
        }

        // Entry 10 is altered below the checkpoint: start-up reads only entries 1792.. (the
        // last checkpoint's partial tile and the unsigned tail), so it opens; the entry is
        // refused when served, and `audit verify` names it.
        let path = dir.path().join(ENTRIES_FILE);
        let original = std::fs::read(&path).unwrap();
        let altered =
            String::from_utf8(original.clone())
                .unwrap()
                .replacen("\"tx-10\"", "\"tx-XX\"", 1);
        std::fs::write(&path, &altered).unwrap();
        let log = Arc::new(open(dir.path(), &key).unwrap());
        assert_eq!(log.entries_read_at_open(), 2, "only the unsigned tail");
        assert_eq!(log.tree_size(), 2002);
        assert_eq!(log.root(2000).unwrap(), root);
        assert_eq!(log.prove(700).unwrap().proof.hashes, proof_700);
        assert_proves(&log, &key, 1999);
        assert!(
            matches!(log.prove(10), Err(Error::Inconsistent(m)) if m.contains("entry 10")),
            "an altered entry is never served with a proof"
        );
        assert_eq!(log.transaction_entries("tx-1234").unwrap(), tx_1234);
        log.close();
        drop(log);
        let failure = verify::verify_dir(dir.path(), &key.public_key()).unwrap_err();
        assert_eq!(failure.first_bad_entry, Some(10), "{failure}");

        // Without its tiles the whole log is read again: the alteration stops the start.
        std::fs::remove_dir_all(dir.path().join("tile")).unwrap();
        assert!(matches!(
            open(dir.path(), &key),
            Err(Error::Inconsistent(_))
        ));

        // The untouched log with every derived file lost opens, rebuilds them, and serves the
        // same roots, proofs and lookups.
        std::fs::write(&path, &original).unwrap();
        for derived in [OFFSETS_FILE, ACTIVE_FILE] {
            std::fs::remove_file(dir.path().join(derived)).unwrap();
        }
        std::fs::remove_dir_all(dir.path().join(index::INDEX_DIR)).unwrap();
        let log = Arc::new(open(dir.path(), &key).unwrap());
        assert_eq!(log.tree_size(), 2002);
        assert_eq!(log.root(2000).unwrap(), root);
        assert_eq!(log.prove(700).unwrap().proof.hashes, proof_700);
        assert_proves(&log, &key, 10);
        assert_eq!(log.transaction_entries("tx-1234").unwrap(), tx_1234);
        let cp = checkpoint(&log).await;
        assert_eq!(cp.tree_size, 2002);
        assert_proves(&log, &key, 2001);
        // Saved active versions newer than the log send start-up from the quick path (already
        // part-way) to reading the whole log: the lookups still hold each entry once.
        log.append(vec![entry(2002), entry(2003)]).await.unwrap();
        log.close();
        drop(log);
        let saved = SavedActive {
            through: 1_000_000,
            active: order::ActiveVersions::default(),
        };
        write_active(dir.path(), "test.example/log", key.1.as_ref(), &saved).unwrap();
        let log = Arc::new(open(dir.path(), &key).unwrap());
        let tx_dir = dir.path().join("index/tx");
        let records: u64 = std::fs::read_dir(&tx_dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(records, 2004 * 16, "one record per entry");
        assert_eq!(log.transaction_entries("tx-2003").unwrap(), vec![2003]);

        // Saved versions edited on disk do not verify with the token's MAC: not trusted, the
        // whole log is read.
        log.close();
        drop(log);
        let path_active = dir.path().join(ACTIVE_FILE);
        let text = std::fs::read_to_string(&path_active).unwrap();
        assert!(text.contains("2004"), "{text}");
        std::fs::write(&path_active, text.replacen("2004", "2000", 1)).unwrap();
        let log = Arc::new(open(dir.path(), &key).unwrap());
        assert_eq!(log.entries_read_at_open(), 2004);
        log.close();
        drop(log);
        let log = Arc::new(open(dir.path(), &key).unwrap());
        assert!(log.entries_read_at_open() < 256);

        // A damaged tile disagrees with the checkpoint at start-up: the tiles are rebuilt from
        // the entries.
        log.close();
        drop(log);
        let tile = dir.path().join("tile/0/003");
        let good = std::fs::read(&tile).unwrap();
        std::fs::write(&tile, [0u8; 256 * 32]).unwrap();
        let log = open(dir.path(), &key).unwrap();
        assert_proves(&log, &key, 800);
        log.close();
        assert_eq!(std::fs::read(&tile).unwrap(), good);
    }

    #[test]
    fn lines_are_read_from_the_end_across_chunks_and_a_torn_tail_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines");
        let lines: Vec<String> = (0..20_000)
            .map(|i| format!("line {i} {}", "x".repeat(i % 50)))
            .collect();
        let mut data = lines.join("\n").into_bytes();
        data.extend_from_slice(b"\n\ntorn");
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        let mut seen: Vec<(u64, String)> = Vec::new();
        let complete = lines_from_end(&f, |at, l| {
            seen.push((at, String::from_utf8(l.to_vec()).unwrap()));
            true
        })
        .unwrap();
        assert_eq!(complete, data.len() as u64 - 4);
        seen.reverse();
        assert_eq!(seen.len(), lines.len() + 1, "and the empty line");
        assert_eq!(seen.last().unwrap().1, "");
        for (i, (at, l)) in seen.iter().take(lines.len()).enumerate() {
            assert_eq!(l, &lines[i]);
            assert_eq!(&data[*at as usize..*at as usize + l.len()], l.as_bytes());
        }
        // Stopping early reads only the end.
        let mut n = 0;
        lines_from_end(&f, |_, _| {
            n += 1;
            n < 3
        })
        .unwrap();
        assert_eq!(n, 3);
    }

    fn keyed(ev: &str, key_id: &str) -> Entry {
        let mut e = entry(0);
        e.event = ev.to_owned();
        e.tenant = Some("payroll".into());
        e.key_id = Some(key_id.into());
        e
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writer_refuses_a_signature_made_with_a_replaced_version_also_after_reopen() {
        use entry::event::{KEY_ACTIVATED, SIGNATURE};
        let dir = tempfile::tempdir().unwrap();
        let key = soft_token();
        let log = open(dir.path(), &key).unwrap();
        log.append(vec![keyed(SIGNATURE, "payroll/v1")])
            .await
            .unwrap();
        log.append(vec![keyed(KEY_ACTIVATED, "payroll/v2")])
            .await
            .unwrap();
        // A late v1 signature is refused, naming the version to sign with instead.
        match log.append(vec![keyed(SIGNATURE, "payroll/v1")]).await {
            Err(Error::Superseded(v)) => {
                assert_eq!(
                    (v.active.key_id.as_str(), v.active.index),
                    ("payroll/v2", 1)
                )
            }
            other => panic!("expected Superseded, got {other:?}"),
        }
        // One refused request in a group does not take the others down.
        let (a, b) = tokio::join!(
            log.append(vec![keyed(SIGNATURE, "payroll/v2")]),
            log.append(vec![keyed(SIGNATURE, "payroll/v1")])
        );
        assert_eq!(a.unwrap()[0].index, 2);
        assert!(matches!(b, Err(Error::Superseded(_))));
        log.close();
        drop(log);
        // The rule survives a restart: activations are recovered from the file.
        let log = open(dir.path(), &key).unwrap();
        assert!(matches!(
            log.append(vec![keyed(SIGNATURE, "payroll/v1")]).await,
            Err(Error::Superseded(_))
        ));
        log.close();
        drop(log);
        let report = verify::verify_dir(dir.path(), &key.public_key()).unwrap();
        assert_eq!(report.entries, 3);
    }

    #[test]
    fn verify_names_a_signature_reordered_after_an_activation() {
        use entry::event::{KEY_ACTIVATED, SIGNATURE};
        // A log rewritten with consistent hash links but a v1 signature after v2's activation.
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate();
        let order = [
            keyed(SIGNATURE, "payroll/v1"),
            keyed(KEY_ACTIVATED, "payroll/v2"),
            keyed(SIGNATURE, "payroll/v2"),
            keyed(SIGNATURE, "payroll/v1"),
        ];
        let mut data = Vec::new();
        let mut previous: Option<Hash> = None;
        for (i, mut e) in order.into_iter().enumerate() {
            e.index = i as u64;
            e.previous_leaf_hash = previous.map(|h| B64.encode(h));
            let bytes = e.canonical().unwrap();
            previous = Some(merkle::leaf_hash(&bytes));
            data.extend_from_slice(&bytes);
            data.push(b'\n');
        }
        std::fs::write(dir.path().join(ENTRIES_FILE), data).unwrap();
        let failure = verify::verify_dir(dir.path(), key.verifying_key()).unwrap_err();
        assert_eq!(failure.first_bad_entry, Some(3), "{failure}");
        assert!(
            failure
                .message
                .contains("signature with payroll/v1 follows entry 1 that made payroll/v2"),
            "{failure}"
        );
    }
}
