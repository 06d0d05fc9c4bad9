//! Following the log (new leaves, checkpoints of the leader), leadership (an advisory lock on a
//! dedicated connection) and checkpoint publication (compare-and-swap on the tree head).

use super::*;

impl PgLog {
    /// Follow the database: new entries and checkpoints, on NOTIFY and every 500 ms.
    pub(super) async fn follower(self: Arc<Self>) {
        let mut changed = self.db.log_changed.subscribe();
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
            if let Err(e) = self.catch_up().await {
                tracing::debug!(error = %e, "cannot follow the evidence log yet");
            }
        }
    }

    /// Read the leaves this replica has not seen, then the latest checkpoint (checked against
    /// them before it is used).
    pub(super) async fn catch_up(&self) -> Result<(), audit::Error> {
        let _g = self.following.lock().await;
        let c = self.db.client().await?;
        loop {
            let from = self.tree_size();
            let rows = c
                .query(
                    "SELECT idx, leaf FROM signet_entries WHERE idx >= $1 ORDER BY idx LIMIT 50000",
                    &[&(from as i64)],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            let n = rows.len();
            let mut leaves = Vec::with_capacity(n);
            for r in rows {
                let (idx, leaf): (i64, &[u8]) = (r.get(0), r.get(1));
                if idx as u64 != from + leaves.len() as u64 {
                    break;
                }
                leaves.push(Hash::try_from(leaf).map_err(|_| {
                    audit::Error::Inconsistent(format!("entry {idx} has a malformed leaf hash"))
                })?);
            }
            self.extend(from, &leaves).await;
            if n < 50000 {
                break;
            }
        }
        let row = c
            .query_opt(
                "SELECT tree_size, signed_at, note FROM signet_checkpoints
                 ORDER BY tree_size DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        if let Some(r) = row {
            let cp = StoredCheckpoint {
                tree_size: r.get::<_, i64>(0) as u64,
                signed_at: r.get::<_, i64>(1) as u64,
                note: r.get(2),
            };
            if self
                .latest_checkpoint()
                .is_none_or(|l| l.tree_size < cp.tree_size)
                && cp.tree_size <= self.tree_size()
            {
                // Signed by the log key, and its root is the tree's at its size.
                let parsed =
                    note::verify_checkpoint(&cp.note, &self.origin, &self.signer.public_key())
                        .map_err(|e| {
                            audit::Error::Inconsistent(format!(
                                "checkpoint at size {}: {e}",
                                cp.tree_size
                            ))
                        })?;
                if parsed.size != cp.tree_size || self.root(parsed.size).await? != parsed.root {
                    return Err(audit::Error::Inconsistent(format!(
                        "the signed checkpoint at size {} does not match the stored tree",
                        cp.tree_size
                    )));
                }
                self.publish(Arc::new(cp));
            }
        }
        Ok(())
    }

    pub(super) fn publish(&self, cp: Arc<StoredCheckpoint>) {
        self.metrics.audit_checkpoint_size.set(cp.tree_size as i64);
        self.metrics.audit_last_checkpoint.set(cp.signed_at as i64);
        *write(&self.latest) = Some(cp);
    }

    /// Take part in the election of the checkpoint signer (a serving replica; not CLI tools).
    pub fn start_leading(self: &Arc<Self>) {
        tokio::spawn(Arc::clone(self).lead());
    }

    /// Try to become the checkpoint leader; hold it while the connection lives.
    pub(super) async fn lead(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            if let Ok((client, _rx)) = self.db.dedicated().await {
                loop {
                    let held = client
                        .query_one(
                            "SELECT pg_try_advisory_lock($1, $2)",
                            &[&LOCK_CLASS, &LEADER_LOCK],
                        )
                        .await
                        .map(|r| r.get::<_, bool>(0));
                    match held {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(_) => break,
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                }
                if !client.is_closed() {
                    self.leader.store(true, Ordering::Release);
                    self.metrics.storage_leader.set(1);
                    tracing::info!(replica = %self.db.replica, "this replica now signs checkpoints");
                    // Leader while the session (and with it the lock) lives.
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.changed() => {
                                self.leader.store(false, Ordering::Release);
                                return;
                            }
                        }
                        if client.simple_query("SELECT 1").await.is_err() {
                            break;
                        }
                    }
                    self.leader.store(false, Ordering::Release);
                    self.metrics.storage_leader.set(0);
                    tracing::warn!("lost the checkpoint leadership (database session ended)");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Sign and publish a checkpoint of everything committed, if this replica leads (or
    /// `force`) and the tree grew. Fenced by a compare-and-swap on `signet_tree_head`.
    pub async fn checkpoint(
        &self,
        now_unix: u64,
        force: bool,
    ) -> Result<Option<Arc<StoredCheckpoint>>, audit::Error> {
        self.catch_up().await?;
        if !force && !self.is_leader() {
            return Ok(None);
        }
        let mut pending_anchor = self.checkpointing.lock().await;
        let c = self.db.client().await?;
        let head = c
            .query_one("SELECT size FROM signet_tree_head WHERE id = 1", &[])
            .await
            .map_err(|e| self.db.failed(e))?;
        let published = head.get::<_, i64>(0) as u64;
        let edge = self.edge();
        let size = edge.size();
        if size <= published {
            // Nothing new to sign; an anchor the token refused last time is stored now, unless
            // a newer checkpoint (another replica's) has superseded it.
            if let Some(head) = pending_anchor.take()
                && head.size == published
                && let Err(e) = self.store_anchor(head).await
            {
                *pending_anchor = Some(head);
                return Err(e);
            }
            return Ok(None);
        }
        // A new checkpoint's anchor supersedes one still pending.
        *pending_anchor = None;
        let root = edge.root();
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size,
            root,
        };
        let signer = Arc::clone(&self.signer);
        let body = cp.body();
        let sig = tokio::task::spawn_blocking(move || signer.sign(body.as_bytes()))
            .await
            .map_err(|e| audit::Error::Sign(Box::new(e)))?
            .map_err(audit::Error::Sign)?;
        let note = note::signed_checkpoint(&cp, &self.signer.public_key(), sig);
        let stored = StoredCheckpoint {
            tree_size: size,
            signed_at: now_unix,
            note,
        };
        let mut c = c;
        let tx = c.transaction().await.map_err(|e| self.db.failed(e))?;
        let current = tx
            .query_one(
                "SELECT size FROM signet_tree_head WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(|e| self.db.failed(e))?
            .get::<_, i64>(0) as u64;
        if current != published {
            // Someone else published meanwhile: this view is stale (a paused former leader).
            let _ = tx.rollback().await;
            tracing::info!(
                published = current,
                mine = size,
                "checkpoint not published: another replica published first"
            );
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO signet_checkpoints (tree_size, signed_at, note) VALUES ($1, $2, $3)",
            &[&(size as i64), &(now_unix as i64), &stored.note],
        )
        .await
        .map_err(|e| self.db.failed(e))?;
        tx.execute(
            "UPDATE signet_tree_head SET size = $1, root = $2, replica = $3 WHERE id = 1",
            &[&(size as i64), &root.to_vec(), &self.db.replica],
        )
        .await
        .map_err(|e| self.db.failed(e))?;
        tx.execute("SELECT pg_notify('signet_log', '')", &[])
            .await
            .map_err(|e| self.db.failed(e))?;
        tx.commit().await.map_err(|e| self.db.failed(e))?;
        let stored = Arc::new(stored);
        self.publish(Arc::clone(&stored));
        // The anchor follows the published head, so it never covers more than the database.
        // If the token refuses it, it is retried first at the next checkpoint.
        let head = TreeHead { size, root };
        if let Err(e) = self.store_anchor(head).await {
            *pending_anchor = Some(head);
            return Err(e);
        }
        Ok(Some(stored))
    }

    /// Store the token's anchor for `head`.
    async fn store_anchor(&self, head: TreeHead) -> Result<(), audit::Error> {
        let token = Arc::clone(&self.token);
        let anchor = Anchor::new(&self.origin, head).encode();
        tokio::task::spawn_blocking(move || token.store(&anchor))
            .await
            .map_err(|e| audit::Error::Token(e.to_string()))?
            .map_err(|e| {
                tracing::warn!(tree_size = head.size, error = %e,
                    "checkpoint published, but the token refused its anchor; retried at the next checkpoint");
                audit::Error::Token(e.to_string())
            })
    }
}
