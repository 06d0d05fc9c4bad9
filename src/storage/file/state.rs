//! The file backend's state beside the log: key states (`keys.json`) and the rotation journal
//! (`rotations.json`) in `[state].dir`, RFC 3161 tokens (`timestamps.jsonl`) in `[audit].dir`,
//! and the leases of a single process.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use serde_json::Value;

use crate::audit::timestamp::{StoredTimestamp, TIMESTAMPS_FILE};
use crate::audit::{self, StoredCheckpoint};
use crate::storage::{
    Claim, Claims, Error, JournalData, JournalStore, KeyStateStore, LeaseGuard, Leases, Replicas,
    TimestampStore,
};

/// The file backend's state: `keys.json` and `rotations.json` in `[state].dir`.
pub struct FileState {
    dir: PathBuf,
}

impl FileState {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn read_json<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> Result<T, Error> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(source) => Err(Error::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn write_json(&self, name: &str, value: &impl serde::Serialize) -> Result<(), Error> {
        let path = self.dir.join(name);
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        crate::fsutil::write_atomic(&path, &bytes).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct KeysFile {
    #[serde(default)]
    format: u32,
    #[serde(default)]
    versions: BTreeMap<String, Value>,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct JournalFile {
    #[serde(default)]
    format: u32,
    #[serde(default)]
    active: BTreeMap<String, Value>,
    #[serde(default)]
    history: Vec<Value>,
}

pub const KEYS_FILE: &str = "keys.json";
pub const JOURNAL_FILE: &str = "rotations.json";

impl KeyStateStore for FileState {
    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Value>, Error>> {
        Box::pin(async move { Ok(self.read_json::<KeysFile>(KEYS_FILE)?.versions) })
    }
    fn save<'a>(
        &'a self,
        all: &'a BTreeMap<String, Value>,
        _changed: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.write_json(
                KEYS_FILE,
                &KeysFile {
                    format: 1,
                    versions: all.clone(),
                },
            )
        })
    }
}

impl JournalStore for FileState {
    fn load(&self) -> BoxFuture<'_, Result<JournalData, Error>> {
        Box::pin(async move {
            let f = self.read_json::<JournalFile>(JOURNAL_FILE)?;
            Ok(JournalData {
                active: f.active,
                history: f.history,
            })
        })
    }
    fn save<'a>(
        &'a self,
        whole: &'a JournalData,
        _tenant: &'a str,
        _rotation: &'a Value,
        _finished: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.write_json(
                JOURNAL_FILE,
                &JournalFile {
                    format: 1,
                    active: whole.active.clone(),
                    history: whole.history.clone(),
                },
            )
        })
    }
}

/// One process holds the `LOCK` of the evidence log: every lease is already its own.
pub struct ProcessLeases;

impl Leases for ProcessLeases {
    fn lock<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<LeaseGuard, Error>> {
        Box::pin(async { Ok(Box::new(()) as LeaseGuard) })
    }
}

/// The file backend's timestamps: `timestamps.jsonl` beside the log.
pub struct FileTimestamps {
    dir: PathBuf,
}

impl FileTimestamps {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Io {
            path: self.dir.display().to_string(),
            source,
        }
    }
}

impl TimestampStore for FileTimestamps {
    fn load_since(&self, after: Option<u64>) -> BoxFuture<'_, Result<Vec<StoredTimestamp>, Error>> {
        Box::pin(async move {
            let mut all = load(&self.dir).map_err(|e| self.io(e))?;
            all.retain(|t| after.is_none_or(|a| t.tree_size > a));
            Ok(all)
        })
    }
    fn append<'a>(&'a self, t: &'a StoredTimestamp) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let (dir, t) = (self.dir.clone(), t.clone());
            tokio::task::spawn_blocking(move || append(&dir, &t))
                .await
                .map_err(|e| self.io(std::io::Error::other(e)))?
                .map_err(|e| self.io(e))
        })
    }
    fn latest(&self, n: usize) -> BoxFuture<'_, Result<Vec<StoredTimestamp>, Error>> {
        Box::pin(async move {
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || load_latest(&dir, n))
                .await
                .map_err(|e| self.io(std::io::Error::other(e)))?
                .map_err(|e| self.io(e))
        })
    }
    /// Tokens are requested in checkpoint order, so the checkpoints without one are those
    /// after the newest stamped: read from the end of both files, not all of them.
    fn unstamped(&self) -> BoxFuture<'_, Result<Vec<(u64, String)>, Error>> {
        Box::pin(async move {
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<(u64, String)>, Error> {
                let io = |e| Error::Io {
                    path: dir.display().to_string(),
                    source: e,
                };
                let newest = load_latest(&dir, 1)
                    .map_err(io)?
                    .first()
                    .map(|t| t.tree_size);
                let f = match std::fs::File::open(dir.join(audit::CHECKPOINTS_FILE)) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io(e)),
                };
                let (mut out, mut bad) = (Vec::new(), None);
                super::lines_from_end(&f, |_, line| {
                    match serde_json::from_slice::<StoredCheckpoint>(line) {
                        Ok(c) if newest.is_none_or(|m| c.tree_size > m) => {
                            out.push((c.tree_size, c.note));
                            true
                        }
                        Ok(_) => false,
                        Err(e) => {
                            bad = Some(e.to_string());
                            false
                        }
                    }
                })
                .map_err(io)?;
                if let Some(e) = bad {
                    return Err(Error::Invalid(format!("{}: {e}", audit::CHECKPOINTS_FILE)));
                }
                out.reverse();
                Ok(out)
            })
            .await
            .map_err(|e| self.io(std::io::Error::other(e)))?
        })
    }
}

/// Every stored timestamp (a torn final line is ignored; so is a line that does not parse,
/// with a warning: timestamps are evidence about checkpoints, not the log itself).
pub fn load(dir: &Path) -> io::Result<Vec<StoredTimestamp>> {
    let data = match std::fs::read(dir.join(TIMESTAMPS_FILE)) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (n, line) in data.split_inclusive(|&b| b == b'\n').enumerate() {
        if line.last() != Some(&b'\n') {
            break;
        }
        match serde_json::from_slice::<StoredTimestamp>(&line[..line.len() - 1]) {
            Ok(t) => out.push(t),
            Err(e) => {
                tracing::warn!(line = n + 1, error = %e, "ignoring an unreadable line of timestamps.jsonl");
            }
        }
    }
    Ok(out)
}

/// The newest `n` timestamps, oldest first, read from the end of `timestamps.jsonl`.
pub fn load_latest(dir: &Path, n: usize) -> io::Result<Vec<StoredTimestamp>> {
    let f = match std::fs::File::open(dir.join(TIMESTAMPS_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    super::lines_from_end(&f, |at, line| {
        match serde_json::from_slice::<StoredTimestamp>(line) {
            Ok(t) => out.push(t),
            Err(e) => {
                tracing::warn!(offset = at, error = %e, "ignoring an unreadable line of timestamps.jsonl");
            }
        }
        out.len() < n
    })?;
    out.reverse();
    Ok(out)
}

/// Append a timestamp durably.
pub fn append(dir: &Path, t: &StoredTimestamp) -> io::Result<()> {
    let path = dir.join(TIMESTAMPS_FILE);
    let mut f = crate::fsutil::open_durable(
        &path,
        OpenOptions::new().create(true).append(true).mode(0o600),
    )?;
    let mut line = serde_json::to_vec(t).map_err(io::Error::other)?;
    line.push(b'\n');
    f.write_all(&line)?;
    f.sync_data()
}

/// One process owns every idempotency key: the in-memory cache decides alone.
impl Claims for ProcessLeases {
    fn claim<'a>(
        &'a self,
        _client: &'a str,
        _key: &'a [u8; 32],
        _request_sha256: &'a str,
    ) -> BoxFuture<'a, Result<Claim, audit::Error>> {
        Box::pin(async { Ok(Claim::Owned) })
    }
    fn release<'a>(&'a self, _client: &'a str, _key: &'a [u8; 32]) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    fn expire(&self, _retention: std::time::Duration) -> BoxFuture<'_, Result<u64, audit::Error>> {
        Box::pin(async { Ok(0) })
    }
}

/// No other replica: nothing is shared, this process leads, the state never changes under it.
pub struct OneProcess {
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for OneProcess {
    fn default() -> Self {
        Self {
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Replicas for OneProcess {
    fn shared(&self) -> bool {
        false
    }
    fn is_leader(&self) -> bool {
        true
    }
    fn start(&self, _stop: tokio::sync::watch::Receiver<bool>) {}
    fn state_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
    fn state_version(&self) -> BoxFuture<'_, Result<i64, Error>> {
        Box::pin(async { Ok(0) })
    }
}
