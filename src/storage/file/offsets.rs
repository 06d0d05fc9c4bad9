//! `entries.idx`: where each entry of `entries.jsonl` ends, so an entry is two `pread`s away
//! without holding an offset per entry in memory.
//!
//! Record `i` is the little-endian u64 byte offset just past entry `i`'s newline (entry `i`
//! starts where entry `i - 1` ends). The file is derived from `entries.jsonl`: the writer
//! appends records before it acknowledges a group, the checkpointer makes them durable before
//! it writes a checkpoint line, and start-up trusts records only below the last checkpoint
//! and rebuilds the rest from the entries.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const OFFSETS_FILE: &str = "entries.idx";
const RECORD: u64 = 8;

pub struct Offsets {
    path: PathBuf,
    file: File,
}

impl Offsets {
    pub fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join(OFFSETS_FILE);
        let file = crate::fsutil::open_durable(
            &path,
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .append(true)
                .mode(0o600),
        )?;
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many whole records the file holds.
    pub fn count(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len() / RECORD)
    }

    /// Where entry `i` ends (past its newline).
    pub fn end(&self, i: u64) -> io::Result<u64> {
        let mut b = [0u8; RECORD as usize];
        self.file.read_exact_at(&mut b, i * RECORD)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Where entry `i` starts.
    pub fn start(&self, i: u64) -> io::Result<u64> {
        match i.checked_sub(1) {
            None => Ok(0),
            Some(p) => self.end(p),
        }
    }

    /// The boundaries of entries `from..to`: `to - from + 1` offsets, the first being where
    /// entry `from` starts.
    pub fn bounds(&self, from: u64, to: u64) -> io::Result<Vec<u64>> {
        let first = from.checked_sub(1);
        let n = (to - first.unwrap_or(0)) as usize;
        let mut b = vec![0u8; n * RECORD as usize];
        self.file
            .read_exact_at(&mut b, first.unwrap_or(0) * RECORD)?;
        let mut out: Vec<u64> = Vec::with_capacity(n + 1);
        if first.is_none() {
            out.push(0);
        }
        out.extend(b.chunks_exact(RECORD as usize).map(|c| {
            let mut a = [0u8; RECORD as usize];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        }));
        Ok(out)
    }

    /// Keep the first `n` records only.
    pub fn truncate(&self, n: u64) -> io::Result<()> {
        self.file.set_len(n * RECORD)
    }

    /// Append the end offsets of the next entries.
    pub fn append(&self, ends: &[u64]) -> io::Result<()> {
        let mut b = Vec::with_capacity(ends.len() * RECORD as usize);
        for e in ends {
            b.extend_from_slice(&e.to_le_bytes());
        }
        (&self.file).write_all(&b)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
