//! The file backend's signer-evidence vault: `vault/` under `[audit].dir`.
//!
//! - `records-NNNNNNNN.jsonl`: the records of entries `N·4096 ..` (one JSON [`Row`] per line,
//!   sealed or erased), appended by the log's writer thread in the same group commit as their
//!   entries and made durable first (commit point 0 of the writer). Records of entries that
//!   never became durable are cut when the log is opened.
//! - `meta.json`: the key state ([`Meta`]: the KEK generation and the wrapped index key).
//!
//! Erasure and re-wrapping rewrite one segment atomically (temp file, fsync, rename). No
//! personal data is in clear in any of these files. Holds live in `[state].dir/holds.json`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::future::BoxFuture;

use crate::storage::{Error, HoldStore, VaultStore};
use crate::vault::{Content, Erasure, Hold, Meta, Row};

pub const VAULT_DIR: &str = "vault";
const META_FILE: &str = "meta.json";
const HOLDS_FILE: &str = "holds.json";
/// Entries per segment file.
const SEGMENT: u64 = 4096;

pub struct FileVault {
    dir: PathBuf,
    /// Serialises appends (writer thread) with segment rewrites (erasure, re-wrapping).
    lock: Mutex<()>,
}

impl FileVault {
    pub fn new(audit_dir: &Path) -> Self {
        Self {
            dir: audit_dir.join(VAULT_DIR),
            lock: Mutex::new(()),
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn segment_path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("records-{seg:08}.jsonl"))
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
        let path = path.display().to_string();
        move |source| Error::Io { path, source }
    }

    /// Append the records of a group (commit point 0: durable when this returns). Returns the
    /// segment lengths before the append, to cut back with [`FileVault::undo`].
    pub fn append(&self, rows: &[Row]) -> Result<Vec<(u64, u64)>, Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let _g = self.guard();
        if !self.dir.is_dir() {
            crate::fsutil::create_private_dir(&self.dir).map_err(self.io(&self.dir))?;
        }
        let mut by_segment: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for r in rows {
            let line = serde_json::to_vec(r).map_err(|e| Error::Invalid(e.to_string()))?;
            let buf = by_segment.entry(r.index / SEGMENT).or_default();
            buf.extend_from_slice(&line);
            buf.push(b'\n');
        }
        let mut before = Vec::new();
        let mut created = false;
        for (seg, buf) in by_segment {
            let path = self.segment_path(seg);
            created |= !path.exists();
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(self.io(&path))?;
            let len = f.metadata().map_err(self.io(&path))?.len();
            before.push((seg, len));
            f.write_all(&buf).map_err(self.io(&path))?;
            f.sync_data().map_err(self.io(&path))?;
        }
        if created {
            crate::fsutil::sync_dir(&self.dir).map_err(self.io(&self.dir))?;
        }
        Ok(before)
    }

    /// Cut segments back to the lengths [`FileVault::append`] returned (the group's entries
    /// did not become durable).
    pub fn undo(&self, before: &[(u64, u64)]) {
        let _g = self.guard();
        for (seg, len) in before {
            let path = self.segment_path(*seg);
            let cut = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(*len).and_then(|()| f.sync_all()));
            if let Err(e) = cut {
                tracing::error!(error = %e, path = %path.display(), "cannot cut a failed append off the vault; the records are cut when the log is next opened");
            }
        }
    }

    /// Drop records of entries at or beyond `size` (never acknowledged: the log was cut back
    /// to `size` by recovery), and any torn last line.
    pub fn cut(&self, size: u64) -> Result<(), Error> {
        let _g = self.guard();
        for seg in self.segments()? {
            if (seg + 1) * SEGMENT <= size {
                continue;
            }
            let (rows, torn) = self.read_segment(seg)?;
            let keep: Vec<Row> = rows.iter().filter(|r| r.index < size).cloned().collect();
            if keep.len() != rows.len() || torn {
                tracing::warn!(
                    segment = seg,
                    dropped = rows.len() - keep.len(),
                    "vault records of entries that never became durable were cut"
                );
                self.write_segment(seg, &keep)?;
            }
        }
        Ok(())
    }

    fn segments(&self) -> Result<Vec<u64>, Error> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(self.io(&self.dir)(e)),
        };
        for e in rd {
            let e = e.map_err(self.io(&self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("records-")
                .and_then(|r| r.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// A segment's records, and whether its last line was torn (no newline: a crash mid-append).
    fn read_segment(&self, seg: u64) -> Result<(Vec<Row>, bool), Error> {
        let path = self.segment_path(seg);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
            Err(e) => return Err(self.io(&path)(e)),
        };
        let mut rows = Vec::new();
        let mut torn = false;
        let mut reader = BufReader::new(f);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(self.io(&path))?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                torn = true;
                break;
            }
            let row: Row = serde_json::from_slice(&line[..line.len() - 1]).map_err(|e| {
                Error::Invalid(format!("{}: a record does not parse: {e}", path.display()))
            })?;
            rows.push(row);
        }
        Ok((rows, torn))
    }

    fn write_segment(&self, seg: u64, rows: &[Row]) -> Result<(), Error> {
        let mut buf = Vec::new();
        for r in rows {
            buf.extend(serde_json::to_vec(r).map_err(|e| Error::Invalid(e.to_string()))?);
            buf.push(b'\n');
        }
        let path = self.segment_path(seg);
        crate::fsutil::write_atomic(&path, &buf).map_err(self.io(&path))
    }

    /// Every record, in index order (a migration's copy).
    pub fn all(&self) -> Result<Vec<Row>, Error> {
        self.scan(|_| true, usize::MAX)
    }

    /// Every record of every segment that passes `keep`, in index order.
    fn scan(&self, mut keep: impl FnMut(&Row) -> bool, limit: usize) -> Result<Vec<Row>, Error> {
        let mut out = Vec::new();
        for seg in self.segments()? {
            let (rows, _) = {
                let _g = self.guard();
                self.read_segment(seg)?
            };
            for r in rows {
                if keep(&r) {
                    out.push(r);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Rewrite the segment holding `index`'s records with `change` applied to each record.
    fn update(
        &self,
        indexes: &[u64],
        mut change: impl FnMut(&mut Row) -> bool,
    ) -> Result<u64, Error> {
        let mut by_segment: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for i in indexes {
            by_segment.entry(i / SEGMENT).or_default().push(*i);
        }
        let mut changed = 0;
        let _g = self.guard();
        for (seg, wanted) in by_segment {
            let (mut rows, _) = self.read_segment(seg)?;
            let mut n = 0;
            for r in rows.iter_mut().filter(|r| wanted.contains(&r.index)) {
                if change(r) {
                    n += 1;
                }
            }
            if n > 0 {
                self.write_segment(seg, &rows)?;
                changed += n;
            }
        }
        Ok(changed)
    }

    fn read_json<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, Error> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(path)(e)),
        }
    }

    fn write_json(&self, path: &Path, v: &impl serde::Serialize) -> Result<(), Error> {
        let bytes = serde_json::to_vec_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::fsutil::write_atomic(path, &bytes).map_err(self.io(path))
    }
}

fn is_sealed(r: &Row) -> bool {
    matches!(r.content, Content::Sealed(_))
}

impl VaultStore for FileVault {
    fn meta(&self) -> BoxFuture<'_, Result<Option<Meta>, Error>> {
        Box::pin(async move { self.read_json(&self.dir.join(META_FILE)) })
    }

    fn init_meta<'a>(&'a self, m: &'a Meta) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let path = self.dir.join(META_FILE);
            if self.read_json::<Meta>(&path)?.is_none() {
                self.write_json(&path, m)?;
            }
            Ok(())
        })
    }

    fn set_meta<'a>(&'a self, m: &'a Meta) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { self.write_json(&self.dir.join(META_FILE), m) })
    }

    fn get(&self, index: u64) -> BoxFuture<'_, Result<Option<Row>, Error>> {
        Box::pin(async move {
            let (rows, _) = {
                let _g = self.guard();
                self.read_segment(index / SEGMENT)?
            };
            Ok(rows.into_iter().find(|r| r.index == index))
        })
    }

    fn by_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Vec<Row>, Error>> {
        Box::pin(async move {
            self.scan(
                |r| matches!(&r.content, Content::Sealed(s) if s.tags.iter().any(|t| t == tag)),
                usize::MAX,
            )
        })
    }

    fn due(
        &self,
        now_us: i64,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Row>, Error>> {
        Box::pin(async move {
            self.scan(
                |r| {
                    is_sealed(r)
                        && after.is_none_or(|a| r.index > a)
                        && r.retain_until_us.is_some_and(|u| u <= now_us)
                },
                limit,
            )
        })
    }

    fn stale(
        &self,
        current: u32,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Row>, Error>> {
        Box::pin(async move {
            self.scan(
                |r| {
                    after.is_none_or(|a| r.index > a)
                        && matches!(&r.content, Content::Sealed(s) if s.kek != current)
                },
                limit,
            )
        })
    }

    fn rewrap<'a>(
        &'a self,
        index: u64,
        old: &'a str,
        kek: u32,
        wrapped: &'a str,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move {
            let n = self.update(&[index], |r| match &mut r.content {
                Content::Sealed(s) if s.wrapped_key == old => {
                    s.kek = kek;
                    s.wrapped_key = wrapped.to_owned();
                    true
                }
                _ => false,
            })?;
            Ok(n > 0)
        })
    }

    fn erase<'a>(
        &'a self,
        indexes: &'a [u64],
        erasure: &'a Erasure,
    ) -> BoxFuture<'a, Result<u64, Error>> {
        Box::pin(async move {
            self.update(indexes, |r| {
                if is_sealed(r) {
                    r.content = Content::Erased(erasure.clone());
                    true
                } else {
                    false
                }
            })
        })
    }

    fn counts(&self) -> BoxFuture<'_, Result<(u64, u64), Error>> {
        Box::pin(async move {
            let (mut sealed, mut erased) = (0, 0);
            self.scan(
                |r| {
                    if is_sealed(r) {
                        sealed += 1;
                    } else {
                        erased += 1;
                    }
                    false
                },
                usize::MAX,
            )?;
            Ok((sealed, erased))
        })
    }
}

/// Legal holds in `[state].dir/holds.json`.
pub struct FileHolds {
    path: PathBuf,
    lock: Mutex<()>,
}

impl FileHolds {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(HOLDS_FILE),
            lock: Mutex::new(()),
        }
    }

    fn load(&self) -> Result<Vec<Hold>, Error> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::Invalid(format!("{}: {e}", self.path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(Error::Io {
                path: self.path.display().to_string(),
                source,
            }),
        }
    }
}

impl HoldStore for FileHolds {
    fn list(&self) -> BoxFuture<'_, Result<Vec<Hold>, Error>> {
        Box::pin(async move { self.load() })
    }

    fn put<'a>(&'a self, h: &'a Hold) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut all = self.load()?;
            match all.iter_mut().find(|x| x.id == h.id) {
                Some(x) => *x = h.clone(),
                None => all.push(h.clone()),
            }
            let bytes =
                serde_json::to_vec_pretty(&all).map_err(|e| Error::Invalid(e.to_string()))?;
            crate::fsutil::write_atomic(&self.path, &bytes).map_err(|source| Error::Io {
                path: self.path.display().to_string(),
                source,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::Sealed;

    fn row(index: u64) -> Row {
        Row {
            index,
            tenant: "t".into(),
            transaction_id: None,
            time_us: 0,
            retain_until_us: Some(10),
            retention_class: "c".into(),
            commitment: format!("{index:064}"),
            content: Content::Sealed(Sealed {
                tags: vec![],
                kek: 1,
                wrapped_key: "AA==".into(),
                ciphertext: "AA==".into(),
            }),
        }
    }

    #[test]
    fn records_of_entries_that_never_became_durable_are_cut_and_a_failed_append_undone() {
        let dir = tempfile::tempdir().unwrap();
        let v = FileVault::new(dir.path());
        v.append(&[row(1), row(2), row(4095), row(4096)]).unwrap();
        let before = v.append(&[row(4097)]).unwrap();
        v.undo(&before);
        assert_eq!(
            v.all().unwrap().iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![1, 2, 4095, 4096]
        );
        // A torn last line (a crash mid-append) and records at or beyond the log's size go.
        let path = v.segment_path(0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"index\":3,\"ten").unwrap();
        v.cut(3).unwrap();
        assert_eq!(
            v.all().unwrap().iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let files: Vec<String> = std::fs::read_dir(dir.path().join(VAULT_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(files.iter().all(|f| !f.starts_with('.')), "{files:?}");
    }
}
