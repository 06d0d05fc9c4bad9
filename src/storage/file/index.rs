//! Lookup indexes over the file backend's evidence log, so auditors' questions never scan the
//! log and memory does not grow with it: the entries of a transaction ID, and each tenant's
//! entries in log order with their times.
//!
//! Files under `index/` (derived from `entries.jsonl`, rebuilt from it when in doubt):
//! - `tx/<hh>`: one of 256 buckets chosen by SHA-256 of the transaction ID; 16-byte records
//!   (8 more bytes of that hash, the entry index), in log order. A lookup reads one bucket;
//!   the caller confirms each candidate against the entry itself.
//! - `tenant/<hash>`: one file per tenant (named by SHA-256 of its name); 24-byte records
//!   (entry index, entry time in µs, running maximum of those times), in log order. Entry
//!   times are almost, not strictly, in log order: the running maximum makes the first entry
//!   of a time window a binary search away.
//! - `through`: every record of an entry below this size is durable.
//!
//! The writer adds an acknowledged group's records in memory (nothing on the signing path
//! touches these files); the checkpointer writes them out, fsyncs the files it touched and
//! then moves `through`, before it signs the checkpoint. Queries read the files and the
//! records not written yet. At start-up records at or past `through`, and any torn or
//! out-of-order tail a crash left, are dropped and those entries indexed again.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const INDEX_DIR: &str = "index";
const THROUGH_FILE: &str = "through";
const TX_DIR: &str = "tx";
const TENANT_DIR: &str = "tenant";
const TX_RECORD: usize = 16;
const TENANT_RECORD: usize = 24;

/// How far past `until` a page keeps looking for entries written slightly out of time order.
const TIME_SLACK_US: i64 = 60_000_000;

/// What an entry contributes to the indexes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Indexed {
    pub tenant: Option<String>,
    pub transaction_id: Option<String>,
    /// Entry time, µs since the epoch.
    pub time_us: i64,
}

pub use crate::storage::{Page, TenantQuery};

pub struct Index {
    dir: PathBuf,
    /// Records added but not yet written to the files, in log order.
    pending: Mutex<Vec<(u64, Indexed)>>,
    /// One writer of the files at a time.
    flushing: Mutex<()>,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    u64_at(b, at) as i64
}

fn tx_hash(transaction_id: &str) -> [u8; 32] {
    crate::sha256::sha256(transaction_id.as_bytes())
}

impl Index {
    /// Open the indexes under `audit_dir`; returns them and their durable size (`through`).
    pub fn open(audit_dir: &Path) -> io::Result<(Self, u64)> {
        let dir = audit_dir.join(INDEX_DIR);
        crate::fsutil::create_private_dir(&dir.join(TX_DIR))?;
        crate::fsutil::create_private_dir(&dir.join(TENANT_DIR))?;
        let through = std::fs::read_to_string(dir.join(THROUGH_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok((
            Self {
                dir,
                pending: Mutex::new(Vec::new()),
                flushing: Mutex::new(()),
            },
            through,
        ))
    }

    fn tx_path(&self, hash: &[u8; 32]) -> PathBuf {
        self.tx_file(hash[0])
    }

    /// The transaction file of hashes starting with `first`.
    fn tx_file(&self, first: u8) -> PathBuf {
        self.dir.join(TX_DIR).join(format!("{first:02x}"))
    }

    fn tenant_path(&self, tenant: &str) -> PathBuf {
        let h = crate::sha256::sha256(tenant.as_bytes());
        self.dir.join(TENANT_DIR).join(hex::encode(&h[..16]))
    }

    /// Drop every record of an entry at or past `from`, and whatever torn or out-of-order
    /// tail a crash left, in every index file; the caller indexes entries `from..` again.
    pub fn repair(&self, from: u64) -> io::Result<()> {
        // Records from `from` on are rewritten without fsync: not durable until `sync`.
        crate::fsutil::write_atomic(&self.dir.join(THROUGH_FILE), from.to_string().as_bytes())?;
        self.pending_records().retain(|(i, _)| *i < from);
        for (sub, rec, at) in [(TX_DIR, TX_RECORD, 8), (TENANT_DIR, TENANT_RECORD, 0)] {
            for e in std::fs::read_dir(self.dir.join(sub))? {
                let path = e?.path();
                if path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                {
                    continue;
                }
                repair_file(&path, rec, at, from)?;
            }
        }
        Ok(())
    }

    /// Index entries (in log order, after every entry indexed so far). In memory until the
    /// next [`Self::sync`] (or [`Self::flush`]).
    pub fn add(&self, batch: Vec<(u64, Indexed)>) {
        self.pending_records().extend(batch);
    }

    /// How many records wait to be written.
    pub fn pending(&self) -> usize {
        self.pending_records().len()
    }

    fn pending_records(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Indexed)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write the records added so far to the files (not durably); returns the files written.
    /// Safe to repeat after a failure: a record already in its file is not written again.
    pub fn flush(&self) -> io::Result<BTreeSet<PathBuf>> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let batch: Vec<(u64, Indexed)> = self.pending_records().clone();
        // Rows by file, each file's path made once (a tenant's path hashes its name).
        let mut tx_rows: HashMap<u8, Vec<Row>> = HashMap::new();
        let mut tenant_rows: HashMap<&str, Vec<Row>> = HashMap::new();
        for (index, f) in &batch {
            if let Some(t) = &f.transaction_id {
                let h = tx_hash(t);
                tx_rows.entry(h[0]).or_default().push((*index, Some(h), 0));
            }
            if let Some(t) = &f.tenant {
                tenant_rows
                    .entry(t.as_str())
                    .or_default()
                    .push((*index, None, f.time_us));
            }
        }
        let files: HashMap<PathBuf, Vec<Row>> = tx_rows
            .into_iter()
            .map(|(first, rows)| (self.tx_file(first), rows))
            .chain(
                tenant_rows
                    .into_iter()
                    .map(|(t, rows)| (self.tenant_path(t), rows)),
            )
            .collect();
        let mut created = false;
        for (path, records) in &files {
            let tenant = records.first().is_some_and(|r| r.1.is_none());
            let (rec, at) = if tenant {
                (TENANT_RECORD, 0)
            } else {
                (TX_RECORD, 8)
            };
            let (mut last_index, mut max) = match last_record(path, rec)? {
                Some(b) => (
                    Some(u64_at(&b, at)),
                    if tenant { i64_at(&b, 16) } else { 0 },
                ),
                None => (None, i64::MIN),
            };
            let mut bytes = Vec::with_capacity(records.len() * rec);
            for (index, hash, time) in records {
                if last_index.is_some_and(|l| *index <= l) {
                    continue;
                }
                last_index = Some(*index);
                match hash {
                    Some(h) => bytes.extend_from_slice(&h[8..16]),
                    None => {
                        max = max.max(*time);
                        bytes.extend_from_slice(&index.to_le_bytes());
                        bytes.extend_from_slice(&time.to_le_bytes());
                        bytes.extend_from_slice(&max.to_le_bytes());
                        continue;
                    }
                }
                bytes.extend_from_slice(&index.to_le_bytes());
            }
            created |= !path.exists();
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(&bytes)?;
        }
        if created {
            crate::fsutil::sync_dir(&self.dir.join(TX_DIR))?;
            crate::fsutil::sync_dir(&self.dir.join(TENANT_DIR))?;
        }
        self.pending_records().drain(..batch.len());
        Ok(files.into_keys().collect())
    }

    /// Write every record added so far, make the files durable, and say so for entries below
    /// `through` (every entry below it must have been added).
    pub fn sync(&self, through: u64) -> io::Result<()> {
        for path in self.flush()? {
            File::open(&path)?.sync_data()?;
        }
        crate::fsutil::write_atomic(&self.dir.join(THROUGH_FILE), through.to_string().as_bytes())
    }

    /// Entries that may carry `transaction_id`, in log order: confirm each against the entry.
    pub fn transaction(&self, transaction_id: &str) -> io::Result<Vec<u64>> {
        let h = tx_hash(transaction_id);
        let data = match std::fs::read(self.tx_path(&h)) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut out: Vec<u64> = data
            .chunks_exact(TX_RECORD)
            .filter(|r| r[..8] == h[8..16])
            .map(|r| u64_at(r, 8))
            .collect();
        out.extend(
            self.pending_records()
                .iter()
                .filter(|(_, f)| f.transaction_id.as_deref() == Some(transaction_id))
                .map(|(i, _)| *i),
        );
        // A record being flushed is in both.
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Up to `limit` entries of `tenant` with `since_us <= time < until_us`, after entry
    /// `after` (exclusive) and below `size`, in log order. Stable while the log grows: a
    /// cursor is an index.
    pub fn tenant_page(&self, q: TenantQuery<'_>, size: u64) -> io::Result<Page> {
        let TenantQuery {
            tenant,
            since_us,
            until_us,
            after,
            limit,
        } = q;
        let mut page = Paging {
            page: Page {
                indexes: Vec::new(),
                next_cursor: None,
            },
            last: after,
            since_us,
            until_us,
            limit,
            size,
        };
        match File::open(self.tenant_path(tenant)) {
            Ok(file) => {
                let records = TenantFile::new(file)?;
                // Every entry before `from_time` is older than `since` (the running maximum
                // says so).
                let from_time = records.partition_point(|r| r.max_time_us < since_us)?;
                let from_cursor = match after {
                    Some(a) => records.partition_point(|r| r.index <= a)?,
                    None => 0,
                };
                let mut pos = from_time.max(from_cursor);
                while pos < records.len {
                    for r in records.chunk(pos)? {
                        pos += 1;
                        if page.take(r.index, r.time_us) {
                            return Ok(page.page);
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Then the records not written yet (later entries).
        let pending: Vec<(u64, i64)> = self
            .pending_records()
            .iter()
            .filter(|(_, f)| f.tenant.as_deref() == Some(tenant))
            .map(|(i, f)| (*i, f.time_us))
            .collect();
        for (index, time) in pending {
            if page.take(index, time) {
                break;
            }
        }
        Ok(page.page)
    }
}

/// A record to write: entry index, the transaction ID's hash (tx buckets) or none (tenant
/// files), entry time.
type Row = (u64, Option<[u8; 32]>, i64);

/// A tenant page being filled, record by record in log order.
struct Paging {
    page: Page,
    /// The last index considered (or the cursor): records up to it are skipped.
    last: Option<u64>,
    since_us: i64,
    until_us: i64,
    limit: usize,
    size: u64,
}

impl Paging {
    /// Consider one record; true when the page is complete.
    fn take(&mut self, index: u64, time_us: i64) -> bool {
        if time_us >= self.until_us.saturating_add(TIME_SLACK_US) || index >= self.size {
            return true;
        }
        if self.last.is_some_and(|l| index <= l) {
            return false;
        }
        self.last = Some(index);
        if time_us >= self.since_us && time_us < self.until_us {
            self.page.indexes.push(index);
            if self.page.indexes.len() == self.limit {
                self.page.next_cursor = Some(index);
                return true;
            }
        }
        false
    }
}

/// The last whole record of an index file, if any.
fn last_record(path: &Path, rec: usize) -> io::Result<Option<Vec<u8>>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let n = f.metadata()?.len() / rec as u64;
    if n == 0 {
        return Ok(None);
    }
    let mut b = vec![0u8; rec];
    f.read_exact_at(&mut b, (n - 1) * rec as u64)?;
    Ok(Some(b))
}

fn repair_file(path: &Path, rec: usize, at: usize, from: u64) -> io::Result<()> {
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let len = f.metadata()?.len();
    let rec64 = rec as u64;
    let mut n = len / rec64;
    let index_at = |i: u64| -> io::Result<u64> {
        let mut b = vec![0u8; rec];
        f.read_exact_at(&mut b, i * rec64)?;
        Ok(u64_at(&b, at))
    };
    while n > 0 {
        let last = index_at(n - 1)?;
        let before = if n > 1 { Some(index_at(n - 2)?) } else { None };
        if last >= from || before.is_some_and(|b| last <= b) {
            n -= 1;
        } else {
            break;
        }
    }
    if n * rec64 != len {
        f.set_len(n * rec64)?;
        f.sync_all()?;
    }
    Ok(())
}

struct TenantRecord {
    index: u64,
    time_us: i64,
    max_time_us: i64,
}

impl TenantRecord {
    fn parse(b: &[u8]) -> Self {
        Self {
            index: u64_at(b, 0),
            time_us: i64_at(b, 8),
            max_time_us: i64_at(b, 16),
        }
    }
}

struct TenantFile {
    file: File,
    len: u64,
}

impl TenantFile {
    fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len() / TENANT_RECORD as u64;
        Ok(Self { file, len })
    }

    fn get(&self, pos: u64) -> io::Result<TenantRecord> {
        let mut b = [0u8; TENANT_RECORD];
        self.file
            .read_exact_at(&mut b, pos * TENANT_RECORD as u64)?;
        Ok(TenantRecord::parse(&b))
    }

    /// Up to 256 records from `pos`.
    fn chunk(&self, pos: u64) -> io::Result<Vec<TenantRecord>> {
        let n = (self.len - pos).min(256) as usize;
        let mut b = vec![0u8; n * TENANT_RECORD];
        self.file
            .read_exact_at(&mut b, pos * TENANT_RECORD as u64)?;
        Ok(b.chunks_exact(TENANT_RECORD)
            .map(TenantRecord::parse)
            .collect())
    }

    /// The first position whose record fails `pred` (records are ordered so that `pred`
    /// holds on a prefix).
    fn partition_point(&self, pred: impl Fn(&TenantRecord) -> bool) -> io::Result<u64> {
        let (mut lo, mut hi) = (0u64, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(&self.get(mid)?) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

pub use crate::clock::parse_rfc3339_micros as parse_time_us;

#[cfg(test)]
mod tests {
    use super::*;

    fn add(ix: &Index, i: u64, tenant: &str, tx: Option<&str>, t: i64) {
        ix.add(vec![(
            i,
            Indexed {
                tenant: Some(tenant.into()),
                transaction_id: tx.map(Into::into),
                time_us: t,
            },
        )]);
    }

    fn page(ix: &Index, since: i64, until: i64, after: Option<u64>, limit: usize) -> Page {
        ix.tenant_page(
            TenantQuery {
                tenant: "a",
                since_us: since,
                until_us: until,
                after,
                limit,
            },
            u64::MAX,
        )
        .unwrap()
    }

    #[test]
    fn transactions_and_tenant_pages_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (ix, through) = Index::open(dir.path()).unwrap();
        assert_eq!(through, 0);
        // Tenant a at times 10, 20, 15 (slightly out of order), 30, 40; tenant b between.
        add(&ix, 0, "a", Some("t1"), 10);
        add(&ix, 1, "b", Some("t1"), 11);
        add(&ix, 2, "a", None, 20);
        add(&ix, 3, "a", Some("t2"), 15);
        // Entries 0-3 are in the files, the later ones only in memory: queries see both.
        assert_eq!(ix.flush().unwrap().len(), 4);
        assert_eq!(ix.pending(), 0);
        add(&ix, 4, "a", None, 30);
        add(&ix, 5, "a", Some("t1"), 40);
        assert_eq!(ix.transaction("t1").unwrap(), vec![0, 1, 5]);
        assert!(ix.transaction("none").unwrap().is_empty());
        // since 15, until 35: entries 2 (20), 3 (15), 4 (30) in log order.
        let p = page(&ix, 15, 35, None, 10);
        assert_eq!((p.indexes, p.next_cursor), (vec![2, 3, 4], None));
        // Pages of 2 with a cursor; the cursor stays valid while the log grows.
        let p1 = page(&ix, i64::MIN, i64::MAX, None, 2);
        assert_eq!((p1.indexes.clone(), p1.next_cursor), (vec![0, 2], Some(2)));
        add(&ix, 6, "a", None, 50);
        let p2 = page(&ix, i64::MIN, i64::MAX, p1.next_cursor, 2);
        assert_eq!((p2.indexes, p2.next_cursor), (vec![3, 4], Some(4)));
        let p3 = page(&ix, i64::MIN, i64::MAX, Some(4), 2);
        assert_eq!((p3.indexes, p3.next_cursor), (vec![5, 6], Some(6)));
        assert!(page(&ix, i64::MIN, i64::MAX, Some(6), 2).indexes.is_empty());
        assert!(
            ix.tenant_page(
                TenantQuery {
                    tenant: "c",
                    since_us: 0,
                    until_us: 100,
                    after: None,
                    limit: 2
                },
                u64::MAX
            )
            .unwrap()
            .indexes
            .is_empty()
        );
        // Entries past the log's size are not served.
        assert_eq!(
            ix.tenant_page(
                TenantQuery {
                    tenant: "a",
                    since_us: i64::MIN,
                    until_us: i64::MAX,
                    after: None,
                    limit: 10
                },
                4
            )
            .unwrap()
            .indexes,
            vec![0, 2, 3]
        );

        // Durable through 4; entries 4.. are indexed again after a crash that left a torn
        // record and zeroes behind.
        ix.sync(4).unwrap();
        let tenant = ix.tenant_path("a");
        let mut f = OpenOptions::new().append(true).open(&tenant).unwrap();
        f.write_all(&[0u8; TENANT_RECORD + 5]).unwrap();
        drop((ix, f));
        let (ix, through) = Index::open(dir.path()).unwrap();
        assert_eq!(through, 4);
        ix.repair(through).unwrap();
        assert_eq!(ix.transaction("t1").unwrap(), vec![0, 1]);
        assert_eq!(
            page(&ix, i64::MIN, i64::MAX, None, 10).indexes,
            vec![0, 2, 3]
        );
        add(&ix, 4, "a", Some("t1"), 12);
        assert_eq!(ix.transaction("t1").unwrap(), vec![0, 1, 4]);
        // A flush repeated after a failure writes nothing twice.
        ix.flush().unwrap();
        add(&ix, 4, "a", Some("t1"), 12);
        ix.flush().unwrap();
        assert_eq!(ix.transaction("t1").unwrap(), vec![0, 1, 4]);
        assert_eq!(
            std::fs::metadata(&tenant).unwrap().len(),
            4 * TENANT_RECORD as u64
        );
        // The running maximum continues from the durable records (20), so a window from 19
        // still finds entry 2 first.
        assert_eq!(page(&ix, 19, 100, None, 10).indexes, vec![2]);
        assert_eq!(
            parse_time_us("1970-01-01T00:00:01.000002Z"),
            Some(1_000_002)
        );
    }
}
