//! Opening the log: recovery after a crash (torn and unacknowledged tails cut), the quick
//! path from the tiles at the last checkpoint or a full read, the one streaming check of what
//! is read, and the anchors (the token's signed tree head, the tail head).

use super::writer::{Sink, writer_main};
use super::*;

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
        let lock = lock_dir(&dir, &signer.public_key())?;

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
        let (store, indexed_through) = Store::open(&dir, &log_path)?;
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
        let restore_findings = check_recovered(
            &recovered,
            &store,
            signed.as_ref(),
            &anchors,
            signed_size,
            opts.accept_restore,
        )?;
        let tail = make_durable(
            &opts,
            &store,
            &recovered,
            &anchors,
            signed_size,
            token.as_ref(),
        )?;
        let fsync = opts.fsync;
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
            checkpointing: Mutex::new(None),
            vault: std::sync::OnceLock::new(),
            inbound: Arc::default(),
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
}

/// Create the directory, take its `LOCK` (one writer), and write `log-key.pem`.
fn lock_dir(dir: &Path, key: &VerifyingKey) -> Result<File, Error> {
    crate::fsutil::create_private_dir(dir).map_err(io_err(dir))?;
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
    let key_pem = crate::pki::public_key_pem(key);
    if std::fs::read_to_string(&key_path).ok().as_deref() != Some(key_pem.as_str()) {
        crate::fsutil::write_atomic_mode(&key_path, key_pem.as_bytes(), 0o644)
            .map_err(io_err(&key_path))?;
    }
    Ok(lock)
}

/// The recovered log matches its last signed checkpoint and its anchors; what differs from the
/// anchors (refused unless a restore is being accepted).
fn check_recovered(
    recovered: &Recovered,
    store: &Store,
    signed: Option<&Checkpoint>,
    anchors: &Anchors,
    signed_size: u64,
    accept_restore: bool,
) -> Result<Vec<String>, Error> {
    let size = recovered.edge.size();
    if let Some(parsed) = signed {
        if parsed.size > size {
            return Err(Error::Inconsistent(format!(
                "the signed checkpoint covers {} entries but only {size} are on disk",
                parsed.size
            )));
        }
        if recovered.root(store, parsed.size)? != parsed.root {
            return Err(Error::Inconsistent(format!(
                "root hash at size {} differs from the signed one",
                parsed.size
            )));
        }
    }
    let mut restore_findings = anchors.check(size, signed_size, |s| recovered.root(store, s).ok());
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
    if !restore_findings.is_empty() && !accept_restore {
        return Err(Error::AnchorMismatch(restore_findings.join("; ")));
    }
    Ok(restore_findings)
}

/// Make what was rebuilt durable, write the tail head for the recovered size, and anchor a log
/// that has no anchor yet (or a restore being accepted) at its verified checkpoint.
fn make_durable(
    opts: &Options,
    store: &Store,
    recovered: &Recovered,
    anchors: &Anchors,
    signed_size: u64,
    token: &dyn TokenAnchor,
) -> Result<TailWriter, Error> {
    let dir = &opts.dir;
    let size = recovered.edge.size();
    // What was rebuilt is durable before anything is served from it.
    store.offsets.sync().map_err(io_err(store.offsets.path()))?;
    store.index.sync(size).map_err(io_err(dir))?;
    write_active(
        dir,
        &opts.origin,
        token,
        &SavedActive {
            through: size,
            active: recovered.active.clone(),
        },
    )?;
    let mut tail = TailWriter::open(
        dir,
        &opts.origin,
        anchors.tail,
        opts.fsync == FsyncPolicy::Always,
    )?;
    if anchors.tail.is_none_or(|t| t.head.size != size) {
        let head = TreeHead {
            size,
            root: recovered.edge.root(),
        };
        tail.write(head, token)?;
    }
    // A log without an anchor yet (new, or written by a version without anchors) is
    // anchored at its verified checkpoint; written after the tail head, so an anchor
    // always has a tail head beside it.
    if anchors.anchor.is_none() || opts.accept_restore {
        let head = TreeHead {
            size: signed_size,
            root: recovered.root(store, signed_size)?,
        };
        token
            .store(&Anchor::new(&opts.origin, head).encode())
            .map_err(|e| Error::Token(e.to_string()))?;
    }
    Ok(tail)
}

/// The fields the lookup indexes need, read without parsing a whole entry.
#[derive(Deserialize)]
pub(super) struct IndexFields {
    pub(super) time: String,
    #[serde(default)]
    pub(super) tenant: Option<String>,
    #[serde(default)]
    pub(super) transaction_id: Option<String>,
}

pub(super) fn indexed(
    time: &str,
    tenant: Option<String>,
    transaction_id: Option<String>,
) -> index::Indexed {
    index::Indexed {
        tenant,
        transaction_id,
        time_us: index::parse_time_us(time).unwrap_or(0),
    }
}

/// The tree, the tenants' active versions and what else start-up recovered.
pub(super) struct Recovered {
    pub(super) edge: Edge,
    pub(super) last_leaf: Option<Hash>,
    pub(super) active: order::ActiveVersions,
    /// Roots at the sizes start-up checks (the checkpoint's, the anchors'), taken while the
    /// scan passed them.
    pub(super) roots: HashMap<u64, Hash>,
    /// How many entries start-up read.
    pub(super) read: u64,
}

impl Recovered {
    pub(super) fn root(&self, store: &Store, size: u64) -> Result<Hash, Error> {
        match self.roots.get(&size) {
            Some(r) => Ok(*r),
            None => store.root(&self.edge, size),
        }
    }
}

/// Bringing the log back at start-up.
pub(super) struct Recovery<'a> {
    pub(super) store: &'a Store,
    pub(super) log_path: &'a Path,
    pub(super) origin: &'a str,
    pub(super) token: &'a dyn TokenAnchor,
    /// The latest signed checkpoint's size.
    pub(super) signed_size: u64,
    /// The tail head's size: entries beyond it were never acknowledged.
    pub(super) acknowledged: Option<u64>,
    /// Sizes whose roots start-up checks.
    pub(super) targets: Vec<u64>,
}

impl Recovery<'_> {
    /// Start from the tiles at the last checkpoint and read only the entries after it (and
    /// those the derived files were not yet durable for). `None` when the derived files cannot
    /// be trusted: then the whole log is read ([`Self::full`]).
    pub(super) fn fast(
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
    pub(super) fn full(&self, log: &mut File) -> Result<Recovered, Error> {
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
    pub(super) fn scan(
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
                if order::may_change_order(&line)
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

    pub(super) fn flush(
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
pub(super) struct Anchors {
    pub(super) anchor: Option<Anchor>,
    pub(super) tail: Option<TailHead>,
    /// Why the tail head could not be read (kept for `accept_restore`).
    pub(super) tail_problem: Option<String>,
}

impl Anchors {
    pub(super) fn load(
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
            .map_err(|e| Error::Token(e.to_string()))?
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
    pub(super) fn acknowledged(&self) -> Option<u64> {
        self.tail.map(|t| t.head.size)
    }

    /// What about the log (`len` entries, checked against its latest checkpoint of
    /// `signed_size`; `root` gives its root at a size) differs from the anchors. Empty when it
    /// matches.
    pub(super) fn check(
        &self,
        len: u64,
        signed_size: u64,
        root: impl Fn(u64) -> Option<Hash>,
    ) -> Vec<String> {
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

impl Store {
    /// The readers of the log in `dir` and its derived files; with the size the lookup indexes
    /// are durable for.
    fn open(dir: &Path, log_path: &Path) -> Result<(Self, u64), Error> {
        let (index, indexed_through) = index::Index::open(dir).map_err(io_err(dir))?;
        let store = Store {
            reader: File::open(log_path).map_err(io_err(log_path))?,
            offsets: Offsets::open(dir).map_err(io_err(dir))?,
            tiles: TileFiles::open(dir).map_err(io_err(dir))?,
            index,
            dir: dir.to_path_buf(),
        };
        Ok((store, indexed_through))
    }
}
