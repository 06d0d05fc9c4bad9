//! Reading the log: entries by their offsets, tiles (cache, files, rebuilt), proofs and the
//! lookups.

use super::recovery::IndexFields;
use super::*;

impl Store {
    pub(super) fn io(&self) -> impl FnOnce(io::Error) -> Error + '_ {
        io_err(&self.dir)
    }

    /// The bytes of entries `from..to` (each without its newline), from one read.
    pub(super) fn entries(&self, from: u64, to: u64) -> Result<Vec<Vec<u8>>, Error> {
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

    pub(super) fn entry(&self, index: u64) -> Result<Vec<u8>, Error> {
        let mut v = self.entries(index, index + 1)?;
        v.pop().ok_or(Error::NoSuchEntry(index))
    }

    /// A full tile: cached, on disk, or built from the entries (level 0) or the 256 tiles below
    /// it (and kept).
    pub(super) fn tile(&self, id: TileId) -> Result<Tile, Error> {
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
    pub(super) fn with_nodes<T>(
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

    pub(super) fn root(&self, edge: &Edge, size: u64) -> Result<Hash, Error> {
        if size > edge.size() {
            return Err(Error::Proof(merkle::ProofError::SizeOutOfRange {
                size,
                have: edge.size(),
            }));
        }
        self.with_nodes(edge, |n| merkle::root(n, size))
    }

    pub(super) fn leaf(&self, edge: &Edge, index: u64) -> Result<Hash, Error> {
        self.with_nodes(edge, |n| merkle::Nodes::node(n, 0, index))
    }

    /// The right edge of the first `size` entries, from O(log n) entries and tiles.
    pub(super) fn load_edge(&self, size: u64) -> Result<Edge, Error> {
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

impl FileLog {
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
    pub fn tenant_entries(&self, q: crate::storage::TenantQuery<'_>) -> Result<index::Page, Error> {
        let store = &self.inner.store;
        store
            .index
            .tenant_page(q, self.tree_size())
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
}
