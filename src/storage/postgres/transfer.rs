//! The database's half of `storage::transfer`: export to the file format, migration from it,
//! and the log as a source for the streaming verifier.

use super::sequencer::Rows;
use super::state::bump_state;
use super::*;
use crate::storage::transfer::ExportReport;

/// Write the whole log in the file backend's format (`entries.jsonl`, `checkpoints.jsonl`,
/// `log-key.pem`) for offline verification with `signet audit verify DIR`.
pub async fn export(db: &Db, dir: &std::path::Path) -> Result<ExportReport, Error> {
    use std::io::Write;
    let io = |p: &std::path::Path| {
        let path = p.display().to_string();
        move |source| Error::Io { path, source }
    };
    crate::fsutil::create_private_dir(dir).map_err(io(dir))?;
    let c = db.client().await?;
    let key: Option<String> = c
        .query_opt("SELECT log_key FROM signet_log WHERE id = 1", &[])
        .await
        .map_err(|e| db.failed(e))?
        .and_then(|r| r.get(0));
    if let Some(pem) = key {
        let p = dir.join(audit::LOG_KEY_FILE);
        crate::fsutil::write_atomic_mode(&p, pem.as_bytes(), 0o644).map_err(io(&p))?;
    }
    let path = dir.join(audit::ENTRIES_FILE);
    let mut out = std::io::BufWriter::new(
        crate::fsutil::open_durable(
            &path,
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true),
        )
        .map_err(io(&path))?,
    );
    let mut entries = 0u64;
    loop {
        let rows = c
            .query(
                "SELECT idx, body FROM signet_entries WHERE idx >= $1 ORDER BY idx LIMIT 10000",
                &[&(entries as i64)],
            )
            .await
            .map_err(|e| db.failed(e))?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            if r.get::<_, i64>(0) as u64 != entries {
                return Err(Error::Invalid(format!("entry {entries} is missing")));
            }
            let body: Vec<u8> = r.get(1);
            out.write_all(&body).map_err(io(&path))?;
            out.write_all(b"\n").map_err(io(&path))?;
            entries += 1;
        }
    }
    let f = out.into_inner().map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e.into_error(),
    })?;
    f.sync_all().map_err(io(&path))?;
    let path = dir.join(audit::CHECKPOINTS_FILE);
    let mut text = String::new();
    let rows = c
        .query(
            "SELECT tree_size, signed_at, note FROM signet_checkpoints ORDER BY tree_size",
            &[],
        )
        .await
        .map_err(|e| db.failed(e))?;
    let checkpoints = rows.len() as u64;
    for r in rows {
        let cp = StoredCheckpoint {
            tree_size: r.get::<_, i64>(0) as u64,
            signed_at: r.get::<_, i64>(1) as u64,
            note: r.get(2),
        };
        text.push_str(&serde_json::to_string(&cp).map_err(|e| Error::Invalid(e.to_string()))?);
        text.push('\n');
    }
    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(io(&path))?;
    Ok(ExportReport {
        entries,
        checkpoints,
    })
}

/// The database's evidence log as a [`LogSource`](crate::audit::verify::LogSource), for
/// `signet audit verify --config`: entries and checkpoints read page by page (memory does not
/// grow with the log), straight from the tables, without an export. Blocking: call it from a
/// thread that is not a runtime worker (it waits on `rt`).
pub struct PgSource {
    pub(super) rt: tokio::runtime::Handle,
    pub(super) db: Arc<Db>,
    pub(super) entries: std::collections::VecDeque<Vec<u8>>,
    pub(super) next_idx: u64,
    pub(super) checkpoints: std::collections::VecDeque<StoredCheckpoint>,
    pub(super) checkpoints_after: i64,
    pub(super) checkpoint_n: u64,
}

pub(super) const SOURCE_PAGE: i64 = 2000;

impl PgSource {
    pub fn new(rt: tokio::runtime::Handle, db: Arc<Db>) -> Self {
        Self {
            rt,
            db,
            entries: Default::default(),
            next_idx: 0,
            checkpoints: Default::default(),
            checkpoints_after: -1,
            checkpoint_n: 0,
        }
    }

    pub(super) fn failure(&self, e: Error) -> crate::audit::verify::DirFailure {
        crate::audit::verify::DirFailure::other(format!(
            "cannot read the log from the database: {e}"
        ))
    }
}

impl crate::audit::verify::LogSource for PgSource {
    fn next_entry(&mut self) -> Result<Option<Vec<u8>>, crate::audit::verify::DirFailure> {
        if self.entries.is_empty() {
            let (db, from) = (
                Arc::clone(&self.db),
                self.next_idx + self.entries.len() as u64,
            );
            let rows = self
                .rt
                .block_on(async move {
                    let c = db.client().await?;
                    c.query(
                        "SELECT idx, body FROM signet_entries WHERE idx >= $1 ORDER BY idx LIMIT $2",
                        &[&(from as i64), &SOURCE_PAGE],
                    )
                    .await
                    .map_err(|e| db.failed(e))
                })
                .map_err(|e| self.failure(e))?;
            for (k, r) in rows.iter().enumerate() {
                let at = from + k as u64;
                if r.get::<_, i64>(0) as u64 != at {
                    return Err(crate::audit::verify::DirFailure::entry(
                        at,
                        format!("entry {at} is missing from the database (an entry was removed)"),
                    ));
                }
                self.entries.push_back(r.get(1));
            }
        }
        let e = self.entries.pop_front();
        self.next_idx += e.is_some() as u64;
        Ok(e)
    }

    fn next_checkpoint(
        &mut self,
    ) -> Result<Option<(u64, StoredCheckpoint)>, crate::audit::verify::DirFailure> {
        if self.checkpoints.is_empty() {
            let (db, after) = (Arc::clone(&self.db), self.checkpoints_after);
            let rows = self
                .rt
                .block_on(async move {
                    let c = db.client().await?;
                    c.query(
                        "SELECT tree_size, signed_at, note FROM signet_checkpoints WHERE tree_size > $1 ORDER BY tree_size LIMIT $2",
                        &[&after, &SOURCE_PAGE],
                    )
                    .await
                    .map_err(|e| db.failed(e))
                })
                .map_err(|e| self.failure(e))?;
            for r in rows {
                self.checkpoints_after = r.get(0);
                self.checkpoints.push_back(StoredCheckpoint {
                    tree_size: r.get::<_, i64>(0) as u64,
                    signed_at: r.get::<_, i64>(1) as u64,
                    note: r.get(2),
                });
            }
        }
        Ok(self.checkpoints.pop_front().map(|c| {
            self.checkpoint_n += 1;
            (self.checkpoint_n, c)
        }))
    }
}

/// What `signet storage migrate` imported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrateReport {
    pub entries: u64,
    pub checkpoints: u64,
    pub key_states: u64,
    pub rotations: u64,
    /// Signer-evidence records (sealed or erased) and legal holds moved with the log.
    pub vault_records: u64,
    pub holds: u64,
    /// Base64 root hash at the latest checkpoint's size (the same as the file log's).
    pub root: String,
    pub tree_size: u64,
}

/// Import a file log (byte for byte: same leaves, same roots, so old receipts and checkpoints
/// still verify) with its key states and rotation journal into an empty database, in one
/// transaction. The caller has verified the directory.
pub async fn migrate(
    db: &Db,
    audit_dir: &std::path::Path,
    state_dir: &std::path::Path,
    origin: &str,
    log_key_pem: &str,
) -> Result<MigrateReport, Error> {
    let mut c = db.client().await?;
    let tx = c.transaction().await.map_err(|e| db.failed(e))?;
    refuse_a_used_database(&tx).await.map_err(|e| match e {
        Refusal::Used => Error::Invalid(
            "the database already holds an evidence log; migrate only into an empty one".into(),
        ),
        Refusal::Db(e) => db.failed(e),
    })?;
    let checkpoints =
        crate::storage::file::read_checkpoints(&audit_dir.join(audit::CHECKPOINTS_FILE))
            .map_err(|e| Error::Invalid(e.to_string()))?;
    let head = checkpoints.last().map_or(0, |c| c.tree_size);
    let imported = import_entries(db, &tx, audit_dir, head).await?;
    let head_root = imported.head_root.ok_or_else(|| {
        Error::Invalid(format!("the log is shorter than its checkpoint at {head}"))
    })?;
    for cp in &checkpoints {
        tx.execute(
            "INSERT INTO signet_checkpoints (tree_size, signed_at, note) VALUES ($1, $2, $3)",
            &[&(cp.tree_size as i64), &(cp.signed_at as i64), &cp.note],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    let active_json =
        serde_json::to_value(&imported.active).map_err(|e| Error::Invalid(e.to_string()))?;
    let last = imported.last_leaf.map(|h| h.to_vec());
    tx.execute(
        "INSERT INTO signet_log (id, origin, next_index, last_leaf, active, log_key)
         VALUES (1, $1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET origin = $1, next_index = $2, last_leaf = $3,
             active = $4, log_key = $5",
        &[
            &origin,
            &(imported.size as i64),
            &last,
            &active_json,
            &log_key_pem,
        ],
    )
    .await
    .map_err(|e| db.failed(e))?;
    tx.execute(
        "INSERT INTO signet_tree_head (id, size, root, replica) VALUES (1, $1, $2, 'migration')
         ON CONFLICT (id) DO UPDATE SET size = $1, root = $2, replica = 'migration'",
        &[&(head as i64), &head_root.to_vec()],
    )
    .await
    .map_err(|e| db.failed(e))?;
    let (key_states, rotations) = import_state(db, &tx, state_dir).await?;
    let (vault_records, holds) = import_vault(db, &tx, audit_dir, state_dir, imported.size).await?;
    bump_state(&tx).await.map_err(|e| db.failed(e))?;
    tx.commit().await.map_err(|e| db.failed(e))?;
    Ok(MigrateReport {
        entries: imported.size,
        checkpoints: checkpoints.len() as u64,
        key_states,
        rotations,
        vault_records,
        holds,
        root: B64.encode(head_root),
        tree_size: head,
    })
}

/// The file backend's vault (records and key state) and legal holds, into the database.
async fn import_vault(
    db: &Db,
    tx: &deadpool_postgres::Transaction<'_>,
    audit_dir: &std::path::Path,
    state_dir: &std::path::Path,
    size: u64,
) -> Result<(u64, u64), Error> {
    use crate::storage::{HoldStore, VaultStore};
    let vault = crate::storage::file::vault::FileVault::new(audit_dir);
    let rows = vault.all()?;
    if let Some(r) = rows.iter().find(|r| r.index >= size) {
        return Err(Error::Invalid(format!(
            "the vault holds a record of entry {} beyond the log's {size} entries",
            r.index
        )));
    }
    for chunk in rows.chunks(1000) {
        super::vault::insert_records(tx, chunk)
            .await
            .map_err(|e| db.failed(e))?;
    }
    if let Some(meta) = vault.meta().await? {
        let v = serde_json::to_value(&meta).map_err(|e| Error::Invalid(e.to_string()))?;
        tx.execute(
            "INSERT INTO signet_vault_meta (id, meta) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET meta = EXCLUDED.meta",
            &[&v],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    let holds = crate::storage::file::vault::FileHolds::new(state_dir)
        .list()
        .await?;
    for h in &holds {
        let v = serde_json::to_value(h).map_err(|e| Error::Invalid(e.to_string()))?;
        tx.execute(
            "INSERT INTO signet_holds (id, body) VALUES ($1, $2)",
            &[&h.id, &v],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    Ok((rows.len() as u64, holds.len() as u64))
}

enum Refusal {
    Used,
    Db(tokio_postgres::Error),
}

/// Only an empty database receives a log.
async fn refuse_a_used_database(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), Refusal> {
    let existing: Option<i64> = tx
        .query_opt(
            "SELECT next_index FROM signet_log WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(Refusal::Db)?
        .map(|r| r.get(0));
    let any: bool = tx
        .query_one("SELECT EXISTS (SELECT 1 FROM signet_entries)", &[])
        .await
        .map_err(Refusal::Db)?
        .get(0);
    if existing.is_some_and(|n| n > 0) || any {
        return Err(Refusal::Used);
    }
    Ok(())
}

/// What importing the entries gave: the log's size and last leaf, the root at the last
/// checkpoint's size, the active versions.
struct Imported {
    size: u64,
    last_leaf: Option<Hash>,
    head_root: Option<Hash>,
    active: order::ActiveVersions,
}

/// Insert every entry (byte for byte, with their idempotency records) and the tree's full
/// tiles, streaming: memory holds the tree's right edge only.
async fn import_entries(
    db: &Db,
    tx: &deadpool_postgres::Transaction<'_>,
    audit_dir: &std::path::Path,
    head: u64,
) -> Result<Imported, Error> {
    use std::io::BufRead;
    let path = audit_dir.join(audit::ENTRIES_FILE);
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(io)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut edge = Edge::new();
    let mut tiles: Vec<(TileId, Tile)> = Vec::new();
    let mut imported = Imported {
        size: 0,
        last_leaf: None,
        head_root: (head == 0).then(merkle::empty_root),
        active: order::ActiveVersions::default(),
    };
    let mut rows = Rows::default();
    let mut line = Vec::new();
    let batch = format!("migrated-{}", uuid::Uuid::new_v4());
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        line.pop();
        let index = edge.size();
        let mut e: Entry = serde_json::from_slice(&line)
            .map_err(|err| Error::Invalid(format!("entry {index}: {err}")))?;
        imported.active.record(&e);
        let leaf = merkle::leaf_hash(&line);
        rows.push(index, leaf, line.clone(), &mut e);
        tiles.extend(edge.push(leaf));
        imported.last_leaf = Some(leaf);
        if edge.size() == head {
            imported.head_root = Some(edge.root());
        }
        if rows.len() >= 2000 {
            insert_rows(tx, &mut rows, &batch)
                .await
                .map_err(|e| db.failed(e))?;
            insert_tiles(&**tx, &mut tiles)
                .await
                .map_err(|e| db.failed(e))?;
        }
    }
    insert_rows(tx, &mut rows, &batch)
        .await
        .map_err(|e| db.failed(e))?;
    insert_tiles(&**tx, &mut tiles)
        .await
        .map_err(|e| db.failed(e))?;
    imported.size = edge.size();
    Ok(imported)
}

/// Copy the key states and the rotation journal from the file backend's `[state].dir`: how
/// many key states and rotations.
async fn import_state(
    db: &Db,
    tx: &deadpool_postgres::Transaction<'_>,
    state_dir: &std::path::Path,
) -> Result<(u64, u64), Error> {
    let state = crate::storage::file::state::FileState::new(state_dir);
    let keys = KeyStateStore::load(&state).await?;
    for (id, record) in &keys {
        tx.execute(
            "INSERT INTO signet_key_states (key_id, record) VALUES ($1, $2)
             ON CONFLICT (key_id) DO UPDATE SET record = EXCLUDED.record",
            &[id, record],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    let journal = JournalStore::load(&state).await?;
    for (tenant, body) in &journal.active {
        tx.execute(
            "INSERT INTO signet_rotations (tenant, body) VALUES ($1, $2)
             ON CONFLICT (tenant) DO UPDATE SET body = EXCLUDED.body",
            &[tenant, body],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    for body in &journal.history {
        tx.execute(
            "INSERT INTO signet_rotation_history (body) VALUES ($1)",
            &[body],
        )
        .await
        .map_err(|e| db.failed(e))?;
    }
    Ok((
        keys.len() as u64,
        (journal.active.len() + journal.history.len()) as u64,
    ))
}

/// Store full tiles (deterministic: a tile already there is the same).
pub(super) async fn insert_tiles<C: tokio_postgres::GenericClient>(
    c: &C,
    tiles: &mut Vec<(TileId, Tile)>,
) -> Result<(), tokio_postgres::Error> {
    if tiles.is_empty() {
        return Ok(());
    }
    let (mut levels, mut indexes, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
    for ((level, index), t) in tiles.drain(..) {
        levels.push(level as i16);
        indexes.push(index as i64);
        bodies.push(t.concat());
    }
    c.execute(
        "INSERT INTO signet_tiles (level, idx, hashes)
         SELECT * FROM unnest($1::int2[], $2::int8[], $3::bytea[])
         ON CONFLICT (level, idx) DO NOTHING",
        &[&levels, &indexes, &bodies],
    )
    .await?;
    Ok(())
}

pub(super) async fn insert_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &mut Rows,
    batch: &str,
) -> Result<(), tokio_postgres::Error> {
    if rows.len() == 0 {
        return Ok(());
    }
    let batch_ids = vec![batch.to_owned(); rows.len()];
    let insert = tx
        .prepare_cached(
            "INSERT INTO signet_entries (idx, leaf, body, batch, tenant, transaction_id, time_us)
             SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[], $4::text[], $5::text[],
                                  $6::text[], $7::int8[])",
        )
        .await?;
    tx.execute(
        &insert,
        &[
            &rows.idx,
            &rows.leaf,
            &rows.body,
            &batch_ids,
            &rows.tenant,
            &rows.transaction,
            &rows.time_us,
        ],
    )
    .await?;
    if !rows.claims.is_empty() {
        let (mut c, mut k, mut h, mut i) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (client, key, hash, index) in rows.claims.drain(..) {
            c.push(client);
            k.push(key);
            h.push(hash);
            i.push(index);
        }
        let record = tx
            .prepare_cached(
                "INSERT INTO signet_idempotency (client, key_hash, request_sha256, entry_index)
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::int8[])
                 ON CONFLICT (client, key_hash) DO UPDATE
                 SET entry_index = EXCLUDED.entry_index, holder = NULL, lease_until = NULL",
            )
            .await?;
        tx.execute(&record, &[&c, &k, &h, &i]).await?;
    }
    super::vault::insert_records(tx, &rows.vault).await?;
    *rows = Rows::default();
    Ok(())
}
