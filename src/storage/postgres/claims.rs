//! Idempotency claims across replicas: one row per (client, key hash), with a lease; the
//! sequencing transaction fences them.

use super::*;

/// Idempotency claims in `signet_idempotency`, with leases of `[storage] claim_lease`.
pub(super) struct PgClaims {
    pub(super) log: Arc<PgLog>,
    pub(super) lease: Duration,
}

impl Claims for PgClaims {
    fn claim<'a>(
        &'a self,
        client: &'a str,
        key: &'a [u8; 32],
        request_sha256: &'a str,
    ) -> BoxFuture<'a, Result<Claim, audit::Error>> {
        Box::pin(self.log.claim(client, key, request_sha256, self.lease))
    }
    fn release<'a>(&'a self, client: &'a str, key: &'a [u8; 32]) -> BoxFuture<'a, ()> {
        Box::pin(self.log.release(client, key))
    }
    fn expire(&self, retention: Duration) -> BoxFuture<'_, Result<u64, audit::Error>> {
        Box::pin(self.log.expire_claims(retention))
    }
}

impl PgLog {
    /// Delete idempotency records older than `retention` (the entries stay in the log).
    pub async fn expire_claims(&self, retention: Duration) -> Result<u64, audit::Error> {
        let c = self.db.client().await?;
        let secs = retention.as_secs_f64();
        c.execute(
            "DELETE FROM signet_idempotency
             WHERE created_at < now() - make_interval(secs => $1::float8)",
            &[&secs],
        )
        .await
        .map_err(|e| self.db.failed(e).into())
    }

    /// Claim idempotency key (`client`, `key`) for this replica, or find what it recorded.
    /// Waits while another replica's live claim runs; takes an expired one over.
    pub async fn claim(
        &self,
        client: &str,
        key: &[u8; 32],
        request_sha256: &str,
        lease: Duration,
    ) -> Result<Claim, audit::Error> {
        let deadline = Instant::now() + lease * 2;
        let lease_secs = lease.as_secs_f64();
        let key = key.to_vec();
        loop {
            let c = self.db.client().await?;
            let inserted = c
                .execute(
                    "INSERT INTO signet_idempotency (client, key_hash, request_sha256, holder, lease_until)
                     VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8))
                     ON CONFLICT (client, key_hash) DO NOTHING",
                    &[&client, &key, &request_sha256, &self.db.replica, &lease_secs],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            if inserted == 1 {
                return Ok(Claim::Owned);
            }
            let row = c
                .query_opt(
                    "SELECT request_sha256, entry_index, lease_until IS NULL OR lease_until <= now()
                     FROM signet_idempotency WHERE client = $1 AND key_hash = $2",
                    &[&client, &key],
                )
                .await
                .map_err(|e| self.db.failed(e))?;
            if let Some(r) = row {
                let (recorded_hash, index, expired): (String, Option<i64>, bool) =
                    (r.get(0), r.get(1), r.get(2));
                if let Some(i) = index {
                    return Ok(Claim::Recorded {
                        request_sha256: recorded_hash,
                        index: i as u64,
                    });
                }
                if recorded_hash != request_sha256 {
                    return Ok(Claim::Conflict);
                }
                if expired {
                    let taken = c
                        .execute(
                            "UPDATE signet_idempotency
                             SET holder = $3, lease_until = now() + make_interval(secs => $4::float8)
                             WHERE client = $1 AND key_hash = $2 AND entry_index IS NULL
                               AND (lease_until IS NULL OR lease_until <= now())",
                            &[&client, &key, &self.db.replica, &lease_secs],
                        )
                        .await
                        .map_err(|e| self.db.failed(e))?;
                    if taken == 1 {
                        tracing::info!("took over an expired idempotency claim of another replica");
                        return Ok(Claim::Owned);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(audit::Error::ClaimLost);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Give up this replica's unrecorded claim (its attempt failed), so a retry proceeds.
    pub async fn release(&self, client: &str, key: &[u8; 32]) {
        let key = key.to_vec();
        if let Ok(c) = self.db.client().await {
            let _ = c
                .execute(
                    "DELETE FROM signet_idempotency
                     WHERE client = $1 AND key_hash = $2 AND holder = $3 AND entry_index IS NULL",
                    &[&client, &key, &self.db.replica],
                )
                .await;
        }
    }
}
