//! Shared state in the database: key states, the rotation journal (both bump
//! `signet_state_version` and NOTIFY), RFC 3161 timestamps, and leases (advisory locks).

use super::*;

/// Key states and the rotation journal in the database; each change bumps
/// `signet_state_version` and notifies `signet_state`, so every replica reloads.
pub struct PgState {
    pub(super) db: Arc<Db>,
}

impl PgState {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
    }
}

pub(super) async fn bump_state(
    tx: &deadpool_postgres::Transaction<'_>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE signet_state_version SET version = version + 1 WHERE id = 1",
        &[],
    )
    .await?;
    tx.execute("SELECT pg_notify('signet_state', '')", &[])
        .await?;
    Ok(())
}

impl KeyStateStore for PgState {
    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Value>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let rows = c
                .query("SELECT key_id, record FROM signet_key_states", &[])
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn save<'a>(
        &'a self,
        all: &'a BTreeMap<String, Value>,
        changed: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut c = self.db.client().await?;
            let tx = c.transaction().await.map_err(|e| self.db.failed(e))?;
            for id in changed {
                match all.get(id) {
                    Some(record) => tx
                        .execute(
                            "INSERT INTO signet_key_states (key_id, record) VALUES ($1, $2)
                             ON CONFLICT (key_id) DO UPDATE SET record = EXCLUDED.record",
                            &[id, record],
                        )
                        .await
                        .map_err(|e| self.db.failed(e))?,
                    None => tx
                        .execute("DELETE FROM signet_key_states WHERE key_id = $1", &[id])
                        .await
                        .map_err(|e| self.db.failed(e))?,
                };
            }
            bump_state(&tx).await.map_err(|e| self.db.failed(e))?;
            tx.commit().await.map_err(|e| self.db.failed(e))
        })
    }
}

impl JournalStore for PgState {
    fn load(&self) -> BoxFuture<'_, Result<JournalData, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let active = c
                .query("SELECT tenant, body FROM signet_rotations", &[])
                .await
                .map_err(|e| self.db.failed(e))?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let mut history: Vec<Value> = c
                .query(
                    "SELECT body FROM signet_rotation_history ORDER BY seq DESC LIMIT $1",
                    &[&HISTORY],
                )
                .await
                .map_err(|e| self.db.failed(e))?
                .into_iter()
                .map(|r| r.get(0))
                .collect();
            history.reverse();
            Ok(JournalData { active, history })
        })
    }

    fn save<'a>(
        &'a self,
        _whole: &'a JournalData,
        tenant: &'a str,
        rotation: &'a Value,
        finished: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mut c = self.db.client().await?;
            let tx = c.transaction().await.map_err(|e| self.db.failed(e))?;
            if finished {
                tx.execute("DELETE FROM signet_rotations WHERE tenant = $1", &[&tenant])
                    .await
                    .map_err(|e| self.db.failed(e))?;
                tx.execute(
                    "INSERT INTO signet_rotation_history (body) VALUES ($1)",
                    &[rotation],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            } else {
                tx.execute(
                    "INSERT INTO signet_rotations (tenant, body) VALUES ($1, $2)
                     ON CONFLICT (tenant) DO UPDATE SET body = EXCLUDED.body",
                    &[&tenant, rotation],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            }
            bump_state(&tx).await.map_err(|e| self.db.failed(e))?;
            tx.commit().await.map_err(|e| self.db.failed(e))
        })
    }
}

impl TimestampStore for PgState {
    fn load_since(&self, after: Option<u64>) -> BoxFuture<'_, Result<Vec<StoredTimestamp>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let after = after.map_or(-1, |a| a as i64);
            let rows = c
                .query(
                    "SELECT tree_size, note_sha256, response FROM signet_timestamps
                     WHERE tree_size > $1 ORDER BY tree_size",
                    &[&after],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok(rows.into_iter().map(|r| stored_timestamp(&r)).collect())
        })
    }

    fn latest(&self, n: usize) -> BoxFuture<'_, Result<Vec<StoredTimestamp>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let rows = c
                .query(
                    "SELECT tree_size, note_sha256, response FROM signet_timestamps
                     ORDER BY tree_size DESC LIMIT $1",
                    &[&(n as i64)],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok(rows
                .into_iter()
                .rev()
                .map(|r| stored_timestamp(&r))
                .collect())
        })
    }

    fn append<'a>(&'a self, t: &'a StoredTimestamp) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            c.execute(
                "INSERT INTO signet_timestamps (tree_size, note_sha256, response)
                 VALUES ($1, $2, $3) ON CONFLICT (tree_size) DO NOTHING",
                &[&(t.tree_size as i64), &t.note_sha256, &t.response],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
            Ok(())
        })
    }

    fn unstamped(&self) -> BoxFuture<'_, Result<Vec<(u64, String)>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let rows = c
                .query(
                    "SELECT c.tree_size, c.note FROM signet_checkpoints c
                     LEFT JOIN signet_timestamps t USING (tree_size)
                     WHERE t.tree_size IS NULL ORDER BY c.tree_size",
                    &[],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect())
        })
    }
}

/// A row of `signet_timestamps` (tree_size, note_sha256, response).
pub(super) fn stored_timestamp(r: &tokio_postgres::Row) -> StoredTimestamp {
    StoredTimestamp {
        tree_size: r.get::<_, i64>(0) as u64,
        note_sha256: r.get(1),
        response: r.get(2),
    }
}

/// Named locks across replicas: a session advisory lock on a connection of its own, held by
/// the guard. If the replica dies, the database ends the session and releases the lock.
pub struct PgLeases {
    pub(super) db: Arc<Db>,
}

impl PgLeases {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
    }
}

pub(super) struct HeldLease {
    pub(super) _client: tokio_postgres::Client,
}

impl Leases for PgLeases {
    fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LeaseGuard, Error>> {
        Box::pin(async move {
            let (client, _rx) = self.db.dedicated().await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let got: bool = client
                    .query_one(
                        "SELECT pg_try_advisory_lock($1, hashtext($2))",
                        &[&LEASE_CLASS, &name],
                    )
                    .await
                    .map_err(|e| self.db.failed(e))?
                    .get(0);
                if got {
                    return Ok(Box::new(HeldLease { _client: client }) as LeaseGuard);
                }
                if Instant::now() >= deadline {
                    return Err(Error::Unavailable(format!(
                        "`{name}` is held by another replica for more than 30 s"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }
}
