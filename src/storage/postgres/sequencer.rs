//! Sequencing: each replica's group commit of appends, one transaction per group under the
//! coordinator row's lock (see the module documentation of `storage::postgres`).

use super::transfer::insert_rows;
use super::*;

/// An append waiting for the sequencer.
pub(super) struct Pending {
    pub(super) entries: Vec<Entry>,
    pub(super) reply: oneshot::Sender<Result<Vec<Receipt>, audit::Error>>,
}

impl PgLog {
    /// Append entries and return once their transaction committed.
    pub async fn append(&self, entries: Vec<Entry>) -> Result<Vec<Receipt>, audit::Error> {
        let (reply, rx) = oneshot::channel();
        lock(&self.queue)
            .as_ref()
            .ok_or(audit::Error::Closed)?
            .send(Pending { entries, reply })
            .map_err(|_| audit::Error::Closed)?;
        rx.await.map_err(|_| audit::Error::Closed)?
    }

    /// The sequencer: one transaction per group of waiting appends.
    pub(super) async fn sequencer(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Pending>) {
        while let Some(first) = rx.recv().await {
            // Everything waiting now, and the appends of the signatures that were on their way
            // when the group started, as they arrive within the commit window
            // (`storage::Owed`, as the file writer's groups): one transaction for all of it.
            let mut count = first.entries.len();
            let mut group = vec![first];
            let mut owed = self.inbound.owed();
            let deadline = tokio::time::Instant::now() + crate::storage::COMMIT_WINDOW;
            while count < self.max_group {
                let next = match rx.try_recv() {
                    Ok(p) => Some(p),
                    Err(_) if owed.worth_waiting() => tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten(),
                    Err(_) => None,
                };
                let Some(p) = next else { break };
                owed.arrived(p.entries.len());
                count += p.entries.len();
                group.push(p);
            }
            self.commit(group).await;
        }
    }

    pub(super) async fn commit(&self, group: Vec<Pending>) {
        let batch = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let (requests, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|p| (p.entries, p.reply)).unzip();
        let outcome = match self.sequence(&batch, requests).await {
            Ok(s) => Ok(s),
            Err(Failure::Before(e)) => Err(e),
            Err(Failure::Unknown(sequenced, e)) => {
                tracing::warn!(error = %e, batch, "commit outcome unknown; looking the batch up");
                match self.resolve(&batch).await {
                    Ok(true) => Ok(sequenced),
                    Ok(false) => Err(audit::Error::Storage(format!(
                        "the commit failed ({e}); nothing was recorded"
                    ))),
                    Err(e2) => Err(audit::Error::Storage(format!(
                        "the commit outcome is unknown ({e}) and the lookup failed ({e2})"
                    ))),
                }
            }
        };
        match outcome {
            Err(e) => {
                self.metrics.audit_write_errors.inc();
                let msg = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(audit::Error::Storage(msg.clone())));
                }
            }
            Ok(s) => {
                self.metrics
                    .storage_commit_duration
                    .observe(started.elapsed().as_secs_f64());
                if !s.leaves.is_empty() {
                    self.metrics.audit_group_size.observe(s.leaves.len() as f64);
                    self.extend(s.base, &s.leaves).await;
                    self.db.log_changed.send_modify(|v| *v += 1);
                }
                for ev in &s.events {
                    self.metrics
                        .audit_entries
                        .with_label_values(&[ev.as_str()])
                        .inc();
                }
                for (reply, r) in replies.into_iter().zip(s.results) {
                    let _ = reply.send(r);
                }
            }
        }
    }

    /// The sequencing transaction. See the module documentation for its commit point.
    pub(super) async fn sequence(
        &self,
        batch: &str,
        requests: Vec<Vec<Entry>>,
    ) -> Result<Sequenced, Failure> {
        let before = |e: Error| Failure::Before(e.into());
        let mut c = self.db.client().await.map_err(before)?;
        let db = &self.db;
        let tx = c.transaction().await.map_err(|e| before(db.failed(e)))?;
        // Statements are prepared once per connection (deadpool's cache): one round trip each.
        let lock = tx
            .prepare_cached(
                "SELECT next_index, last_leaf, active FROM signet_log WHERE id = 1 FOR UPDATE",
            )
            .await
            .map_err(|e| before(db.failed(e)))?;
        let row = tx
            .query_one(&lock, &[])
            .await
            .map_err(|e| before(db.failed(e)))?;
        let base = row.get::<_, i64>(0) as u64;
        let previous: Option<Hash> = row
            .get::<_, Option<Vec<u8>>>(1)
            .and_then(|b| Hash::try_from(b.as_slice()).ok());
        let active: order::ActiveVersions = serde_json::from_value(row.get::<_, Value>(2))
            .map_err(|e| before(Error::Invalid(format!("signet_log.active: {e}"))))?;

        // Idempotency claims this group relies on, locked until COMMIT.
        let holders = lock_claims(&tx, &requests)
            .await
            .map_err(|e| before(db.failed(e)))?;
        let Staged {
            next,
            previous,
            mut rows,
            leaves,
            events,
            results,
            active,
        } = stage(
            &self.origin,
            &self.db.replica,
            base,
            previous,
            active,
            &holders,
            requests,
        );
        let sequenced = Sequenced {
            base,
            leaves,
            events,
            results,
        };
        if sequenced.leaves.is_empty() {
            let _ = tx.rollback().await;
            return Ok(sequenced);
        }
        let active_json = serde_json::to_value(&active)
            .map_err(|e| before(Error::Invalid(format!("signet_log.active: {e}"))))?;
        let last = previous.map(|h| h.to_vec());
        insert_rows(&tx, &mut rows, batch)
            .await
            .map_err(|e| before(db.failed(e)))?;
        // Advance the coordinator row and notify the other replicas (delivered at COMMIT).
        let advance = tx
            .prepare_cached(
                "WITH advanced AS (
                     UPDATE signet_log SET next_index = $1, last_leaf = $2, active = $3
                     WHERE id = 1 RETURNING 1)
                 SELECT pg_notify('signet_log', '') FROM advanced",
            )
            .await
            .map_err(|e| before(db.failed(e)))?;
        tx.query(&advance, &[&(next as i64), &last, &active_json])
            .await
            .map_err(|e| before(db.failed(e)))?;
        crash_point("before-commit");
        // Commit point: once this returns Ok, the entries are durable and acknowledged.
        if let Err(e) = tx.commit().await {
            return Err(Failure::Unknown(sequenced, db.failed(e).to_string()));
        }
        crash_point("after-commit");
        Ok(sequenced)
    }

    /// Did batch `batch` commit? Asked under the coordinator row lock, so a commit still in
    /// progress (e.g. waiting for a synchronous standby) has finished either way.
    pub(super) async fn resolve(&self, batch: &str) -> Result<bool, Error> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let mut c = self.db.client().await?;
                let tx = c.transaction().await.map_err(|e| self.db.failed(e))?;
                tx.batch_execute("SET LOCAL lock_timeout = '5s'")
                    .await
                    .map_err(|e| self.db.failed(e))?;
                tx.query_one("SELECT 1 FROM signet_log WHERE id = 1 FOR UPDATE", &[])
                    .await
                    .map_err(|e| self.db.failed(e))?;
                let found = tx
                    .query_opt(
                        "SELECT 1 FROM signet_entries WHERE batch = $1 LIMIT 1",
                        &[&batch],
                    )
                    .await
                    .map_err(|e| self.db.failed(e))?
                    .is_some();
                let _ = tx.rollback().await;
                Ok::<_, Error>(found)
            };
            match attempt.await {
                Ok(found) => return Ok(found),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// Stage a group's requests after `base`: indexes, hash links, the signing order and the
/// idempotency claims checked per request (a request that fails is dropped whole; the rest
/// of the group goes ahead), the rows to insert.
fn stage(
    origin: &str,
    replica: &str,
    base: u64,
    mut previous: Option<Hash>,
    mut active: order::ActiveVersions,
    holders: &ClaimHolders,
    requests: Vec<Vec<Entry>>,
) -> Staged {
    let mut next = base;
    let mut rows = Rows::default();
    let mut leaves = Vec::new();
    let mut events = Vec::new();
    let mut results = Vec::with_capacity(requests.len());
    for entries in requests {
        let mark = (
            next,
            previous,
            leaves.len(),
            events.len(),
            rows.len(),
            rows.claims.len(),
        );
        let active_before = active.clone();
        let mut out = Vec::with_capacity(entries.len());
        let mut failed = None;
        for mut e in entries {
            e.index = next;
            e.previous_leaf_hash = previous.map(|h| B64.encode(h));
            if let Some(k) = claim_key(&e) {
                match holders.get(&k) {
                    Some((Some(h), None)) if h == replica => {}
                    None => {}
                    _ => {
                        failed = Some(audit::Error::ClaimLost);
                        break;
                    }
                }
            }
            if let Err(v) = active.observe(&e) {
                failed = Some(audit::Error::Superseded(v));
                break;
            }
            let bytes = match e.canonical() {
                Ok(b) => b,
                Err(err) => {
                    failed = Some(audit::Error::Serialize(err.to_string()));
                    break;
                }
            };
            let leaf = merkle::leaf_hash(&bytes);
            rows.push(next, leaf, bytes, &mut e);
            out.push(Receipt {
                log_origin: origin.to_owned(),
                index: next,
                leaf_hash: B64.encode(leaf),
            });
            leaves.push(leaf);
            events.push(e.event.clone());
            previous = Some(leaf);
            next += 1;
        }
        match failed {
            None => results.push(Ok(out)),
            Some(err) => {
                // Drop this request's entries only; the rest of the group goes ahead.
                next = mark.0;
                previous = mark.1;
                leaves.truncate(mark.2);
                events.truncate(mark.3);
                rows.truncate(mark.4, mark.5);
                active = active_before;
                results.push(Err(err));
            }
        }
    }
    Staged {
        next,
        previous,
        rows,
        leaves,
        events,
        results,
        active,
    }
}

/// (client, key hash) → (holder, recorded entry index) of the claims a group relies on.
type ClaimHolders = HashMap<(String, Vec<u8>), (Option<String>, Option<i64>)>;

/// What one sequencing transaction did, per request.
pub(super) struct Sequenced {
    pub(super) base: u64,
    pub(super) leaves: Vec<Hash>,
    pub(super) events: Vec<String>,
    pub(super) results: Vec<Result<Vec<Receipt>, audit::Error>>,
}

pub(super) enum Failure {
    /// Nothing was committed.
    Before(audit::Error),
    /// COMMIT was sent but its answer was lost: what would have been committed, and why.
    Unknown(Sequenced, String),
}

/// Column arrays for one multi-row insert.
#[derive(Default)]
pub(super) struct Rows {
    pub(super) idx: Vec<i64>,
    pub(super) leaf: Vec<Vec<u8>>,
    pub(super) body: Vec<Vec<u8>>,
    pub(super) tenant: Vec<Option<String>>,
    pub(super) transaction: Vec<Option<String>>,
    pub(super) time_us: Vec<i64>,
    pub(super) claims: Vec<(String, Vec<u8>, String, i64)>,
    /// Vault records of the entries (written in the same transaction).
    pub(super) vault: Vec<crate::vault::Row>,
}

impl Rows {
    /// One entry's row at `index`, with its idempotency claim and its vault record if it has
    /// them.
    pub(super) fn push(&mut self, index: u64, leaf: Hash, body: Vec<u8>, e: &mut Entry) {
        if let Some(mut row) = e.sealed.take() {
            row.index = index;
            self.vault.push(*row);
        }
        self.idx.push(index as i64);
        self.leaf.push(leaf.to_vec());
        self.body.push(body);
        self.tenant.push(e.tenant.clone());
        self.transaction.push(e.transaction_id.clone());
        self.time_us
            .push(crate::clock::parse_rfc3339_micros(&e.time).unwrap_or(0));
        if let Some((client, key)) = claim_key(e) {
            self.claims.push((
                client,
                key,
                e.request_sha256.clone().unwrap_or_default(),
                index as i64,
            ));
        }
    }
    pub(super) fn len(&self) -> usize {
        self.idx.len()
    }
    pub(super) fn truncate(&mut self, n: usize, claims: usize) {
        self.idx.truncate(n);
        self.leaf.truncate(n);
        self.body.truncate(n);
        self.tenant.truncate(n);
        self.transaction.truncate(n);
        self.time_us.truncate(n);
        self.claims.truncate(claims);
        if let Some(&first) = self.idx.last() {
            self.vault.retain(|r| r.index as i64 <= first);
        } else {
            self.vault.clear();
        }
    }
}

/// The idempotency key an entry records: (client identity, SHA-256 of the key).
pub(super) fn claim_key(e: &Entry) -> Option<(String, Vec<u8>)> {
    let k = hex::decode(e.idempotency_key_sha256.as_deref()?).ok()?;
    Some((e.actor.identity.clone(), k))
}

/// What a group adds, before it is written.
pub(super) struct Staged {
    next: u64,
    previous: Option<Hash>,
    rows: Rows,
    leaves: Vec<Hash>,
    events: Vec<String>,
    results: Vec<Result<Vec<Receipt>, audit::Error>>,
    active: order::ActiveVersions,
}

/// Lock the idempotency claims the group's entries rely on (until COMMIT): who holds each.
async fn lock_claims(
    tx: &deadpool_postgres::Transaction<'_>,
    requests: &[Vec<Entry>],
) -> Result<ClaimHolders, tokio_postgres::Error> {
    let claimed: Vec<(String, Vec<u8>)> = requests.iter().flatten().filter_map(claim_key).collect();
    let mut holders: ClaimHolders = HashMap::new();
    if !claimed.is_empty() {
        let (clients, keys): (Vec<String>, Vec<Vec<u8>>) = claimed.iter().cloned().unzip();
        let claims = tx
            .prepare_cached(
                "SELECT client, key_hash, holder, entry_index FROM signet_idempotency
                 WHERE (client, key_hash) IN (SELECT * FROM unnest($1::text[], $2::bytea[]))
                 FOR UPDATE",
            )
            .await?;
        for r in tx.query(&claims, &[&clients, &keys]).await? {
            holders.insert((r.get(0), r.get(1)), (r.get(2), r.get(3)));
        }
    }
    Ok(holders)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::entry::{Actor, event};

    fn entry(ev: &str, key_id: &str, idem: Option<&str>, sealed: bool) -> Entry {
        let mut e = Entry::new(
            ev,
            "2026-12-05T00:00:00.000000Z".into(),
            Actor {
                identity: "spiffe://x/app".into(),
                subject: String::new(),
                san: vec![],
                fingerprint_sha256: String::new(),
            },
        );
        e.tenant = Some("payroll".into());
        e.key_id = Some(key_id.into());
        e.idempotency_key_sha256 = idem.map(|k| hex::encode(k.as_bytes()));
        if sealed {
            e.signer_commitment = Some("c".repeat(64));
            e.sealed = Some(Box::new(crate::vault::Row {
                index: 0,
                tenant: "payroll".into(),
                transaction_id: None,
                time_us: 0,
                retain_until_us: None,
                retention_class: "default".into(),
                commitment: "c".repeat(64),
                content: crate::vault::Content::Erased(crate::vault::Erasure {
                    erased_at: String::new(),
                    cause: String::new(),
                    reason: String::new(),
                    entry: 0,
                }),
            }));
        }
        e
    }

    /// One group: a request whose claim another replica holds and one signed with a version
    /// the group itself replaced are dropped whole; the others get dense indexes, hash links,
    /// rows, claims and vault records under their own indexes.
    #[test]
    fn a_group_drops_only_the_requests_that_fail_and_keeps_the_rest_dense() {
        let mut holders: ClaimHolders = HashMap::new();
        let key = |k: &str| ("spiffe://x/app".to_owned(), k.as_bytes().to_vec());
        holders.insert(key("mine"), (Some("replica-a".into()), None));
        holders.insert(key("theirs"), (Some("replica-b".into()), None));
        let requests = vec![
            vec![entry(event::SIGNATURE, "payroll/v1", Some("mine"), true)],
            vec![entry(event::SIGNATURE, "payroll/v1", Some("theirs"), true)],
            vec![entry(event::KEY_ACTIVATED, "payroll/v2", None, false)],
            vec![entry(event::SIGNATURE, "payroll/v1", None, true)],
            vec![
                entry(event::SIGNATURE, "payroll/v2", None, false),
                entry(event::SIGNATURE, "payroll/v2", None, true),
            ],
        ];
        let s = stage(
            "origin",
            "replica-a",
            10,
            None,
            order::ActiveVersions::default(),
            &holders,
            requests,
        );
        assert!(matches!(&s.results[0], Ok(r) if r[0].index == 10));
        assert!(matches!(s.results[1], Err(audit::Error::ClaimLost)));
        assert!(matches!(&s.results[2], Ok(r) if r[0].index == 11));
        assert!(matches!(s.results[3], Err(audit::Error::Superseded(_))));
        assert!(matches!(&s.results[4], Ok(r) if r.iter().map(|x| x.index).eq([12, 13])));
        assert_eq!(s.next, 14);
        assert_eq!(s.rows.idx, vec![10, 11, 12, 13]);
        assert_eq!(s.leaves.len(), 4);
        assert_eq!(s.previous, s.leaves.last().copied());
        assert_eq!(s.rows.claims.len(), 1);
        assert_eq!(s.rows.claims[0].3, 10);
        assert_eq!(
            s.rows.vault.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![10, 13],
            "vault records of dropped requests go with them"
        );
        let links: Vec<Option<String>> = s
            .rows
            .body
            .iter()
            .map(|b| {
                serde_json::from_slice::<Entry>(b)
                    .unwrap()
                    .previous_leaf_hash
            })
            .collect();
        assert_eq!(links[0], None);
        for (link, leaf) in links[1..].iter().zip(&s.leaves) {
            assert_eq!(*link, Some(B64.encode(leaf)));
        }
    }
}
