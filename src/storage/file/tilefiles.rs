//! The file backend's full hash tiles: one immutable file of 256 hashes per tile under
//! `tile/`, at its C2SP tlog-tiles path (`tile/<L>/<N>`), plus a bounded in-memory cache.
//!
//! Tiles are derived from `entries.jsonl`. A completed tile goes to the cache at once and to
//! disk from a background thread (write, fsync, rename): a crash leaves a tile either whole
//! or absent, and an absent or malformed tile is rebuilt from the entries (or the tiles
//! below it) when it is next needed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::merkle::Hash;
use crate::audit::tiled::{Tile, TileId, WIDTH};
use crate::audit::tiles::{self, TileRef};

pub const TILE_DIR: &str = "tile";
/// Full tiles kept in memory (8 KiB each).
const CACHE: u64 = 4096;

enum Job {
    Write(TileId, Tile),
    /// Answered once every earlier write is done.
    Barrier(crossbeam_channel::Sender<()>),
}

pub struct TileFiles {
    dir: PathBuf,
    cache: moka::sync::Cache<TileId, Tile>,
    queue: Mutex<Option<crossbeam_channel::Sender<Job>>>,
    persister: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl TileFiles {
    pub fn open(audit_dir: &Path) -> std::io::Result<Self> {
        let dir = audit_dir.join(TILE_DIR);
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let d = dir.clone();
        let persister = std::thread::Builder::new()
            .name("audit-tiles".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Write(id, tile) => {
                            if let Err(e) = write_tile(&d, id, &tile) {
                                tracing::warn!(error = %e, level = id.0, index = id.1, "cannot write a tile; it is rebuilt when needed");
                            }
                        }
                        Job::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Self {
            dir,
            cache: moka::sync::Cache::new(CACHE),
            queue: Mutex::new(Some(tx)),
            persister: Mutex::new(Some(persister)),
        })
    }

    /// A stored tile: cached, or read from its file. `None` if absent or malformed.
    pub fn get(&self, id: TileId) -> Option<Tile> {
        if let Some(t) = self.cache.get(&id) {
            return Some(t);
        }
        let bytes = std::fs::read(self.path(id)).ok()?;
        let tile = Arc::new(decode(&bytes)?);
        self.cache.insert(id, Arc::clone(&tile));
        Some(tile)
    }

    /// Keep completed tiles: cached now, written to disk in the background.
    pub fn put(&self, completed: Vec<(TileId, Tile)>) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for (id, tile) in completed {
            self.cache.insert(id, Arc::clone(&tile));
            if let Some(q) = queue.as_ref() {
                let _ = q.send(Job::Write(id, tile));
            }
        }
    }

    /// Forget every tile, cached and on disk (before they are all built again from the
    /// entries). Waits for the writes already queued, so none lands after the removal.
    pub fn clear(&self) -> std::io::Result<()> {
        let (done, wait) = crossbeam_channel::bounded(1);
        if let Some(q) = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = q.send(Job::Barrier(done));
            let _ = wait.recv();
        }
        self.cache.invalidate_all();
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Wait until every tile put so far is on disk, and stop the background writer.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self
            .persister
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
    }

    fn path(&self, id: TileId) -> PathBuf {
        tile_path(&self.dir, id)
    }
}

impl Drop for TileFiles {
    fn drop(&mut self) {
        self.close();
    }
}

fn tile_path(dir: &Path, (level, n): TileId) -> PathBuf {
    dir.join(tiles::render(TileRef::Hashes {
        level: level as u8,
        n,
        width: WIDTH as u16,
    }))
}

fn write_tile(dir: &Path, id: TileId, tile: &[Hash]) -> std::io::Result<()> {
    crate::fsutil::write_atomic_mode(&tile_path(dir, id), &tile.concat(), 0o644)
}

fn decode(bytes: &[u8]) -> Option<Vec<Hash>> {
    if bytes.len() != WIDTH * 32 {
        return None;
    }
    bytes.chunks_exact(32).map(|c| c.try_into().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_written_at_their_c2sp_paths_and_malformed_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let tile = Arc::new(vec![[7u8; 32]; WIDTH]);
        {
            let t = TileFiles::open(dir.path()).unwrap();
            t.put(vec![((1, 1234), Arc::clone(&tile))]);
            t.close();
        }
        let path = dir.path().join("tile/1/x001/234");
        assert_eq!(std::fs::read(&path).unwrap(), tile.concat());
        let t = TileFiles::open(dir.path()).unwrap();
        assert_eq!(t.get((1, 1234)).as_deref(), Some(&*tile));
        std::fs::create_dir_all(dir.path().join("tile/0")).unwrap();
        std::fs::write(dir.path().join("tile/0/000"), [0u8; 100]).unwrap();
        assert!(t.get((0, 0)).is_none());
    }
}
