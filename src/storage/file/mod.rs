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
pub mod vault;

mod reader;
mod recovery;
mod writer;

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
    let file_vault = Arc::new(vault::FileVault::new(&config.audit.dir));
    log.attach_vault(Arc::clone(&file_vault))?;
    Ok(super::Storage {
        log: Arc::new(super::Log::File(Arc::new(log))),
        keys: Arc::clone(&state) as _,
        journal: state as _,
        leases: Arc::new(state::ProcessLeases),
        timestamps: Arc::new(state::FileTimestamps::new(&config.audit.dir)),
        claims: Arc::new(state::ProcessLeases),
        replicas: Arc::new(state::OneProcess::default()),
        vault: file_vault,
        holds: Arc::new(vault::FileHolds::new(&config.state_dir)),
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
    /// refusing; what differed is in [`FileLog::restore_findings`]. The operator command
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
    /// Held while a checkpoint is signed; holds the tree head whose checkpoint line is durable
    /// but whose token anchor could not be stored yet (retried before anything else, so a
    /// failing anchor never makes a second line for the same checkpoint).
    checkpointing: Mutex<Option<TreeHead>>,
    /// The signer-evidence vault the writer appends sealed records to (set once at start).
    vault: std::sync::OnceLock<Arc<vault::FileVault>>,
    /// Signatures being made whose entries come next: the writer waits briefly for them.
    inbound: Arc<super::Inbound>,
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
    /// Give the writer the vault for sealed records, after cutting the vault's records of
    /// entries the log does not have (never acknowledged).
    pub fn attach_vault(&self, v: Arc<vault::FileVault>) -> Result<(), Error> {
        v.cut(self.tree_size())
            .map_err(|e| Error::Storage(format!("the signer-evidence vault: {e}")))?;
        let _ = self.inner.vault.set(v);
        Ok(())
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

    /// Signatures on their way to this log ([`super::Inbound`]).
    pub fn inbound(&self) -> &Arc<super::Inbound> {
        &self.inner.inbound
    }

    pub fn is_writable(&self) -> bool {
        self.inner.writable.load(Ordering::Acquire)
    }

    pub fn tree_size(&self) -> u64 {
        self.edge().size()
    }

    /// Versions the log has revoked, with the index of their `key_revoked` entry.
    pub fn revoked_versions(&self) -> Vec<(String, u64)> {
        let active = Arc::clone(&read(&self.inner.state).active);
        active
            .all_revoked()
            .map(|(k, i)| (k.to_owned(), i))
            .collect()
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

    /// Sign a checkpoint for the current tree if it grew since the last one (or none exists).
    /// Blocking: it signs in the token. Returns the new checkpoint, if one was made.
    pub fn checkpoint_blocking(
        &self,
        now_unix: u64,
    ) -> Result<Option<Arc<StoredCheckpoint>>, Error> {
        let mut pending_anchor = self
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
            // Nothing new to sign; an anchor the token refused last time is stored now.
            if let Some(head) = *pending_anchor {
                self.store_anchor(head)?;
                *pending_anchor = None;
            }
            return Ok(None);
        }
        // A new checkpoint's anchor supersedes one still pending.
        *pending_anchor = None;
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
        // The line is durable: it is the latest checkpoint whatever happens to the anchor.
        let stored = Arc::new(stored);
        *write(&self.inner.latest) = Some(Arc::clone(&stored));
        self.inner.metrics.audit_checkpoint_size.set(size as i64);
        self.inner
            .metrics
            .audit_last_checkpoint
            .set(now_unix as i64);
        // The anchor follows the durable checkpoint line, so it never covers more than the
        // checkpoint file holds. If the token refuses it, it is retried first next time.
        if let Err(e) = self.store_anchor(TreeHead { size, root }) {
            *pending_anchor = Some(TreeHead { size, root });
            return Err(e);
        }
        Ok(Some(stored))
    }

    /// Store the token's anchor for `head` (see [`Anchor`]).
    fn store_anchor(&self, head: TreeHead) -> Result<(), Error> {
        self.inner
            .token
            .store(&Anchor::new(&self.inner.origin, head).encode())
            .map_err(|e| {
                tracing::warn!(tree_size = head.size, error = %e,
                    "checkpoint written, but the token refused its anchor; retried at the next checkpoint");
                Error::Token(e.to_string())
            })
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
pub(crate) mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::Generate;

    use crate::audit::{Actor, entry};
    use tail::tests::SoftAnchor;

    /// A software log key and anchor: these tests are about the log's files, not the token.
    pub(crate) struct SoftSigner(pub SigningKey, pub Arc<SoftAnchor>);

    pub(crate) fn soft_token() -> Arc<SoftSigner> {
        Arc::new(SoftSigner(
            SigningKey::generate(),
            Arc::new(SoftAnchor::new()),
        ))
    }
    impl CheckpointSigner for SoftSigner {
        fn public_key(&self) -> VerifyingKey {
            *self.0.verifying_key()
        }
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, crate::audit::anchor::TokenFailure> {
            let s: p256::ecdsa::Signature = signature::Signer::sign(&self.0, message);
            Ok(s.to_der().as_bytes().to_vec())
        }
    }

    pub(super) fn entry(i: usize) -> Entry {
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
            Err(Error::Superseded(order::Violation::Superseded { active, .. })) => {
                assert_eq!((active.key_id.as_str(), active.index), ("payroll/v2", 1))
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
        // A revocation ends the active version itself, also after a restart.
        log.append(vec![keyed(entry::event::KEY_REVOKED, "payroll/v2")])
            .await
            .unwrap();
        log.close();
        drop(log);
        let log = open(dir.path(), &key).unwrap();
        assert_eq!(log.revoked_versions(), [("payroll/v2".to_owned(), 3)]);
        assert!(matches!(
            log.append(vec![keyed(SIGNATURE, "payroll/v2")]).await,
            Err(Error::Superseded(order::Violation::Revoked {
                revoked_at: 3,
                ..
            }))
        ));
        log.close();
        drop(log);
        let report = verify::verify_dir(dir.path(), &key.public_key()).unwrap();
        assert_eq!(report.entries, 4);
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
