//! Reading the log: entries, proofs, lookups, and the tree (its edge in memory, full tiles in
//! `signet_tiles` behind a bounded cache).

use super::transfer::insert_tiles;
use super::*;

impl PgLog {
    /// The right edge of the committed tree.
    pub(crate) fn edge(&self) -> Arc<Edge> {
        Arc::clone(&read(&self.edge))
    }

    /// Run an RFC 6962 computation over the tree: a pass that learns which full tiles it needs,
    /// then the computation with them (from the cache, the database, or rebuilt from below).
    pub(super) async fn with_nodes<T>(
        &self,
        edge: &Edge,
        f: impl Fn(&mut TileNodes<'_>) -> Result<T, Missing>,
    ) -> Result<T, audit::Error> {
        let none = HashMap::new();
        let mut collect = TileNodes::collecting(edge, &none);
        let _ = f(&mut collect);
        let mut fetched = HashMap::new();
        for id in collect.missing() {
            fetched.insert(id, self.tile(id).await?);
        }
        f(&mut TileNodes::new(edge, &fetched)).map_err(|Missing(id)| {
            audit::Error::Inconsistent(format!("tile {id:?} could not be read"))
        })
    }

    /// A full tile: cached, stored, or built from the level below (and stored).
    pub(crate) fn tile(&self, id: TileId) -> BoxFuture<'_, Result<Tile, audit::Error>> {
        Box::pin(async move {
            if let Some(t) = self.tiles.get(&id) {
                return Ok(t);
            }
            let (level, index) = id;
            let c = self.db.client().await?;
            let stored: Option<Vec<u8>> = c
                .query_opt(
                    "SELECT hashes FROM signet_tiles WHERE level = $1 AND idx = $2",
                    &[&(level as i16), &(index as i64)],
                )
                .await
                .map_err(|e| self.db.failed(e))?
                .map(|r| r.get(0));
            drop(c);
            let tile = match stored {
                Some(bytes) => Arc::new(decode_hashes(&bytes).ok_or_else(|| {
                    audit::Error::Inconsistent(format!("tile {id:?} is malformed"))
                })?),
                None => {
                    let built = self.build_tile(id).await?;
                    self.store_tiles(std::slice::from_ref(&(id, Arc::clone(&built))))
                        .await;
                    built
                }
            };
            if tile.len() != tiled::WIDTH {
                return Err(audit::Error::Inconsistent(format!(
                    "tile {id:?} holds {} hashes",
                    tile.len()
                )));
            }
            self.tiles.insert(id, Arc::clone(&tile));
            Ok(tile)
        })
    }

    /// A full tile nobody stored yet (a log migrated or written before tiles): from the
    /// leaves, or from the 256 tiles below it.
    pub(super) async fn build_tile(&self, (level, index): TileId) -> Result<Tile, audit::Error> {
        let width = tiled::WIDTH as u64;
        let hashes = if level == 0 {
            self.leaves(index * width, (index + 1) * width).await?
        } else {
            let mut out = Vec::with_capacity(tiled::WIDTH);
            for j in 0..width {
                out.push(tiled::tile_root(
                    &self.tile((level - 1, index * width + j)).await?,
                ));
            }
            out
        };
        if hashes.len() != tiled::WIDTH {
            return Err(audit::Error::Inconsistent(format!(
                "tile ({level}, {index}) is not complete"
            )));
        }
        Ok(Arc::new(hashes))
    }

    /// The leaf hashes of entries `from..to` that exist, in order.
    pub(super) async fn leaves(&self, from: u64, to: u64) -> Result<Vec<Hash>, audit::Error> {
        let c = self.db.client().await?;
        let rows = c
            .query(
                "SELECT leaf FROM signet_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                &[&(from as i64), &(to as i64)],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        rows.iter()
            .map(|r| Hash::try_from(r.get::<_, &[u8]>(0)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| audit::Error::Inconsistent("a malformed leaf hash".into()))
    }

    /// Keep completed tiles (cache and database); a failure only costs a rebuild later.
    pub(super) async fn store_tiles(&self, tiles: &[(TileId, Tile)]) {
        if tiles.is_empty() {
            return;
        }
        for (id, t) in tiles {
            self.tiles.insert(*id, Arc::clone(t));
        }
        if let Ok(c) = self.db.client().await
            && let Err(e) = insert_tiles(&**c, &mut tiles.to_vec()).await
        {
            tracing::debug!(error = %e, "cannot store tiles; they are rebuilt when needed");
        }
    }

    /// Versions the log has revoked, with the index of their `key_revoked` entry (from the
    /// sequencer's state).
    pub async fn revoked_versions(&self) -> Result<Vec<(String, u64)>, audit::Error> {
        let c = self.db.client().await?;
        let row = c
            .query_one("SELECT active FROM signet_log WHERE id = 1", &[])
            .await
            .map_err(|e| self.db.failed(e))?;
        let active: order::ActiveVersions = serde_json::from_value(row.get::<_, Value>(0))
            .map_err(|e| audit::Error::Inconsistent(format!("signet_log.active: {e}")))?;
        Ok(active
            .all_revoked()
            .map(|(k, i)| (k.to_owned(), i))
            .collect())
    }

    /// The right edge of the committed log, from O(log n) rows and tiles.
    pub(super) async fn load_edge(&self) -> Result<Edge, audit::Error> {
        let c = self.db.client().await?;
        let size = c
            .query_one("SELECT next_index FROM signet_log WHERE id = 1", &[])
            .await
            .map_err(|e| self.db.failed(e))?
            .get::<_, i64>(0) as u64;
        drop(c);
        let width = tiled::WIDTH as u64;
        let mut partial = vec![self.leaves(size - size % width, size).await?];
        for level in 1..tiled::levels(size) {
            let count = tiled::hashes_at(size, level);
            let mut row = Vec::new();
            for j in count - count % width..count {
                row.push(tiled::tile_root(&self.tile((level - 1, j)).await?));
            }
            partial.push(row);
        }
        Edge::from_partials(size, partial).map_err(|e| audit::Error::Inconsistent(e.to_string()))
    }

    /// Append leaves read in order after `edge`'s size; store the tiles they complete.
    pub(super) async fn extend(&self, base: u64, leaves: &[Hash]) {
        let completed = {
            let mut guard = write(&self.edge);
            if guard.size() != base {
                return;
            }
            let mut edge = (**guard).clone();
            let mut completed = Vec::new();
            for l in leaves {
                completed.extend(edge.push(*l));
            }
            self.metrics.audit_tree_size.set(edge.size() as i64);
            *guard = Arc::new(edge);
            completed
        };
        self.store_tiles(&completed).await;
    }

    pub async fn entry(&self, index: u64) -> Result<Vec<u8>, audit::Error> {
        let c = self.db.client().await?;
        let row = c
            .query_opt(
                "SELECT body FROM signet_entries WHERE idx = $1",
                &[&(i64::try_from(index).map_err(|_| audit::Error::NoSuchEntry(index))?)],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        row.map(|r| r.get(0))
            .ok_or(audit::Error::NoSuchEntry(index))
    }

    /// Entries `first .. first + count`, in order.
    pub async fn entries(&self, first: u64, count: u64) -> Result<Vec<Vec<u8>>, audit::Error> {
        let c = self.db.client().await?;
        let rows = c
            .query(
                "SELECT body FROM signet_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                &[&(first as i64), &((first + count) as i64)],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        if rows.len() as u64 != count {
            return Err(audit::Error::NoSuchEntry(first + rows.len() as u64));
        }
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    pub async fn prove_with(
        &self,
        index: u64,
        checkpoint: Arc<StoredCheckpoint>,
    ) -> Result<EntryProof, audit::Error> {
        if index >= checkpoint.tree_size {
            return Err(if index >= self.tree_size() {
                audit::Error::NoSuchEntry(index)
            } else {
                audit::Error::NotYetCheckpointed {
                    index,
                    size: checkpoint.tree_size,
                }
            });
        }
        let size = checkpoint.tree_size;
        let (hashes, leaf_hash) = self
            .with_nodes(&self.edge(), |n| {
                let leaf = merkle::Nodes::node(n, 0, index)?;
                Ok(match merkle::inclusion_proof(n, index, size) {
                    Ok(proof) => Ok((proof?, leaf)),
                    Err(e) => Err(e),
                })
            })
            .await??;
        let entry = self.entry(index).await?;
        EntryProof::checked(index, entry, leaf_hash, hashes, checkpoint)
    }

    pub async fn transaction_entries(
        &self,
        transaction_id: &str,
    ) -> Result<Vec<u64>, audit::Error> {
        let c = self.db.client().await?;
        let rows = c
            .query(
                "SELECT idx FROM signet_entries WHERE transaction_id = $1 ORDER BY idx",
                &[&transaction_id],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        Ok(rows
            .into_iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
    }

    pub async fn tenant_entries(
        &self,
        q: crate::storage::TenantQuery<'_>,
    ) -> Result<crate::storage::Page, audit::Error> {
        let crate::storage::TenantQuery {
            tenant,
            since_us,
            until_us,
            after,
            limit,
        } = q;
        let c = self.db.client().await?;
        let after = after.map_or(-1, |a| a as i64);
        let rows = c
            .query(
                "SELECT idx FROM signet_entries
                 WHERE tenant = $1 AND idx > $2 AND time_us >= $3 AND time_us < $4
                 ORDER BY idx LIMIT $5",
                &[&tenant, &after, &since_us, &until_us, &(limit as i64)],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        let indexes: Vec<u64> = rows
            .into_iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect();
        let next_cursor = (indexes.len() == limit)
            .then(|| indexes.last().copied())
            .flatten();
        Ok(crate::storage::Page {
            indexes,
            next_cursor,
        })
    }

    pub async fn consistency(&self, from: u64, to: u64) -> Result<Vec<Hash>, audit::Error> {
        let signed = self.latest_checkpoint().map_or(0, |c| c.tree_size);
        if to > signed {
            return Err(audit::Error::NotYetCheckpointed {
                index: to.saturating_sub(1),
                size: signed,
            });
        }
        let edge = self.edge();
        if to > edge.size() {
            return Err(audit::Error::Proof(merkle::ProofError::SizeOutOfRange {
                size: to,
                have: edge.size(),
            }));
        }
        Ok(self
            .with_nodes(&edge, |n| {
                Ok(match merkle::consistency_proof(n, from, to) {
                    Ok(proof) => Ok(proof?),
                    Err(e) => Err(e),
                })
            })
            .await??)
    }

    /// The root of the first `size` leaves.
    pub async fn root(&self, size: u64) -> Result<Hash, audit::Error> {
        let edge = self.edge();
        if size > edge.size() {
            return Err(audit::Error::Proof(merkle::ProofError::SizeOutOfRange {
                size,
                have: edge.size(),
            }));
        }
        self.with_nodes(&edge, |n| merkle::root(n, size)).await
    }
}
