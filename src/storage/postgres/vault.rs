//! The signer-evidence vault and legal holds in PostgreSQL: `signet_vault` (one row per
//! record, written by the sequencing transaction with its entry), `signet_vault_meta` (the
//! key state) and `signet_holds`. No personal data is stored in clear.

use super::*;
use crate::storage::{HoldStore, VaultStore};
use crate::vault::{Content, Erasure, Hold, Meta, Row};

pub(super) struct PgVault {
    pub(super) db: Arc<Db>,
}

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("signet_vault: {e}"))
}

fn row_of(v: Value) -> Result<Row, Error> {
    serde_json::from_value(v).map_err(invalid)
}

/// The columns of a record: (row as JSON, sealed, retain_until_us, kek).
pub(super) fn columns(r: &Row) -> Result<(Value, bool, Option<i64>, Option<i32>), Error> {
    let (sealed, kek) = match &r.content {
        Content::Sealed(s) => (true, Some(s.kek as i32)),
        Content::Erased(_) => (false, None),
    };
    Ok((
        serde_json::to_value(r).map_err(invalid)?,
        sealed,
        r.retain_until_us,
        kek,
    ))
}

/// Insert vault records inside a transaction (the sequencer's, or a migration's).
pub(super) async fn insert_records(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &[Row],
) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let (mut idx, mut body, mut sealed, mut until, mut kek) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        // Serialising a Row (strings, integers) cannot fail.
        let Ok((b, s, u, k)) = columns(r) else {
            continue;
        };
        idx.push(r.index as i64);
        body.push(b);
        sealed.push(s);
        until.push(u);
        kek.push(k);
    }
    let insert = tx
        .prepare_cached(
            "INSERT INTO signet_vault (idx, row, sealed, retain_until_us, kek)
             SELECT * FROM unnest($1::int8[], $2::jsonb[], $3::bool[], $4::int8[], $5::int4[])",
        )
        .await?;
    tx.execute(&insert, &[&idx, &body, &sealed, &until, &kek])
        .await?;
    Ok(())
}

impl PgVault {
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let c = self.db.client().await?;
        let rows = c.query(sql, params).await.map_err(|e| self.db.failed(e))?;
        rows.into_iter().map(|r| row_of(r.get(0))).collect()
    }
}

impl VaultStore for PgVault {
    fn meta(&self) -> BoxFuture<'_, Result<Option<Meta>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let row = c
                .query_opt("SELECT meta FROM signet_vault_meta WHERE id = 1", &[])
                .await
                .map_err(|e| self.db.failed(e))?;
            row.map(|r| serde_json::from_value(r.get(0)).map_err(invalid))
                .transpose()
        })
    }

    fn init_meta<'a>(&'a self, m: &'a Meta) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let v = serde_json::to_value(m).map_err(invalid)?;
            c.execute(
                "INSERT INTO signet_vault_meta (id, meta) VALUES (1, $1) ON CONFLICT DO NOTHING",
                &[&v],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
            Ok(())
        })
    }

    fn set_meta<'a>(&'a self, m: &'a Meta) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let v = serde_json::to_value(m).map_err(invalid)?;
            c.execute(
                "INSERT INTO signet_vault_meta (id, meta) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET meta = EXCLUDED.meta",
                &[&v],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
            Ok(())
        })
    }

    fn get(&self, index: u64) -> BoxFuture<'_, Result<Option<Row>, Error>> {
        Box::pin(async move {
            Ok(self
                .rows(
                    "SELECT row FROM signet_vault WHERE idx = $1",
                    &[&(index as i64)],
                )
                .await?
                .pop())
        })
    }

    fn by_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Vec<Row>, Error>> {
        Box::pin(async move {
            self.rows(
                "SELECT row FROM signet_vault
                 WHERE sealed AND (row->'content'->'sealed'->'tags') ? $1 ORDER BY idx",
                &[&tag],
            )
            .await
        })
    }

    fn due(
        &self,
        now_us: i64,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Row>, Error>> {
        Box::pin(async move {
            let after = after.map_or(-1, |a| a as i64);
            self.rows(
                "SELECT row FROM signet_vault
                 WHERE sealed AND retain_until_us <= $1 AND idx > $2 ORDER BY idx LIMIT $3",
                &[&now_us, &after, &(limit as i64)],
            )
            .await
        })
    }

    fn stale(
        &self,
        current: u32,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Row>, Error>> {
        Box::pin(async move {
            let after = after.map_or(-1, |a| a as i64);
            self.rows(
                "SELECT row FROM signet_vault
                 WHERE sealed AND kek <> $1 AND idx > $2 ORDER BY idx LIMIT $3",
                &[&(current as i32), &after, &(limit as i64)],
            )
            .await
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
            let c = self.db.client().await?;
            let n = c
                .execute(
                    "UPDATE signet_vault SET kek = $3,
                         row = jsonb_set(jsonb_set(row, '{content,sealed,kek}', to_jsonb($3::int4)),
                                         '{content,sealed,wrapped_key}', to_jsonb($4::text))
                     WHERE idx = $1 AND sealed AND row->'content'->'sealed'->>'wrapped_key' = $2",
                    &[&(index as i64), &old, &(kek as i32), &wrapped],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok(n > 0)
        })
    }

    fn erase<'a>(
        &'a self,
        indexes: &'a [u64],
        erasure: &'a Erasure,
    ) -> BoxFuture<'a, Result<u64, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let idx: Vec<i64> = indexes.iter().map(|i| *i as i64).collect();
            let content =
                serde_json::to_value(Content::Erased(erasure.clone())).map_err(invalid)?;
            c.execute(
                "UPDATE signet_vault SET sealed = false, kek = NULL,
                     row = jsonb_set(row, '{content}', $2)
                 WHERE idx = ANY($1) AND sealed",
                &[&idx, &content],
            )
            .await
            .map_err(|e| self.db.failed(e))
        })
    }

    fn counts(&self) -> BoxFuture<'_, Result<(u64, u64), Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let r = c
                .query_one(
                    "SELECT count(*) FILTER (WHERE sealed), count(*) FILTER (WHERE NOT sealed)
                     FROM signet_vault",
                    &[],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
        })
    }
}

impl HoldStore for PgVault {
    fn list(&self) -> BoxFuture<'_, Result<Vec<Hold>, Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let rows = c
                .query("SELECT body FROM signet_holds ORDER BY seq", &[])
                .await
                .map_err(|e| self.db.failed(e))?;
            rows.into_iter()
                .map(|r| {
                    serde_json::from_value(r.get(0))
                        .map_err(|e| Error::Invalid(format!("signet_holds: {e}")))
                })
                .collect()
        })
    }

    fn put<'a>(&'a self, h: &'a Hold) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let c = self.db.client().await?;
            let v = serde_json::to_value(h).map_err(|e| Error::Invalid(e.to_string()))?;
            c.execute(
                "INSERT INTO signet_holds (id, body) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                &[&h.id, &v],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
            Ok(())
        })
    }
}
