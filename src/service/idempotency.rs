//! Idempotency: the same client, `Idempotency-Key` and request within the retention window
//! gets the same answer, byte for byte, signed once — also when the first caller hung up, and
//! after a restart.
//!
//! ECDSA is randomised, so answers are remembered, not recomputed. The evidence log is the
//! durable source: each signature entry carries the key's hash and the request's hash, so the
//! record is durable in the same commit as the entry, and start-up rebuilds `records` from the
//! log's tail.
//!
//! Two maps, one rule: a key is either *in flight* (an attempt owns it; everyone else waits for
//! that attempt's outcome) or *recorded* (answer from the log entry), never neither while an
//! attempt runs. The attempt runs as its own task, so a client hanging up (its handler future
//! dropped) cannot stop the append or the record half-way; and the task records its outcome
//! before it releases the claim, both seen under the `in_flight` lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use moka::Expiry;
use moka::sync::Cache;

/// (client identity, SHA-256 of the Idempotency-Key).
pub type CacheKey = (String, [u8; 32]);

/// What is remembered for one committed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub request_sha256: String,
    pub index: u64,
    /// How long the record lives from insertion (retention minus its age).
    pub ttl: Duration,
}

/// The answer of an attempt that just signed, shared with everyone who waited for it.
#[derive(Debug)]
pub struct Fresh<R> {
    pub request_sha256: String,
    pub index: u64,
    pub response: Arc<R>,
}

impl<R> Clone for Fresh<R> {
    fn clone(&self) -> Self {
        Self {
            request_sha256: self.request_sha256.clone(),
            index: self.index,
            response: Arc::clone(&self.response),
        }
    }
}

/// An attempt's outcome, as every waiter sees it.
pub type Outcome<R, E> = Result<Fresh<R>, Arc<E>>;

/// An attempt in flight.
pub type Pending<R, E> = Shared<BoxFuture<'static, Outcome<R, E>>>;

/// Where a key stands when a request arrives.
pub enum Begin<R, E> {
    /// Committed before: answer from the log entry at `Record::index`.
    Recorded(Arc<Record>),
    /// An attempt is in flight (perhaps just started by this call): wait for its outcome.
    Pending(Pending<R, E>),
}

pub struct Idempotency<R, E> {
    inner: Arc<Inner<R, E>>,
    pub retention: Duration,
}

struct Inner<R, E> {
    records: Cache<CacheKey, Arc<Record>>,
    /// Guarded by its mutex; never held across an `.await`.
    in_flight: Mutex<HashMap<CacheKey, Pending<R, E>>>,
}

struct PerRecordTtl;

impl Expiry<CacheKey, Arc<Record>> for PerRecordTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Record>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl<R, E> Idempotency<R, E>
where
    R: Send + Sync + 'static,
    E: From<tokio::task::JoinError> + Send + Sync + 'static,
{
    /// At most `max_records` records are kept; past that the least recently used one is
    /// forgotten early (`on_evict` is told): a retry of its key would be signed again.
    pub fn new(
        retention: Duration,
        max_records: u64,
        on_evict: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        let records = Cache::builder()
            .max_capacity(max_records)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(PerRecordTtl)
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    on_evict();
                }
            })
            .build();
        Self {
            inner: Arc::new(Inner {
                records,
                in_flight: Mutex::new(HashMap::new()),
            }),
            retention,
        }
    }

    /// Remember a record found in the log at start-up.
    pub fn insert(&self, key: CacheKey, record: Record) {
        self.inner.records.insert(key, Arc::new(record));
    }

    /// The record of `key`, or the attempt in flight for it; if there is neither, start
    /// `attempt()` as a task of its own and return it as pending. A failed attempt is not
    /// remembered: the next request with the key tries again.
    pub fn begin<F>(&self, key: CacheKey, attempt: impl FnOnce() -> F) -> Begin<R, E>
    where
        F: Future<Output = Outcome<R, E>> + Send + 'static,
    {
        let mut flights = lock(&self.inner.in_flight);
        if let Some(p) = flights.get(&key) {
            return Begin::Pending(p.clone());
        }
        // Checked under the lock the attempt releases its claim under: a record inserted by
        // an attempt is visible here before its claim disappears.
        if let Some(r) = self.inner.records.get(&key) {
            return Begin::Recorded(r);
        }
        let inner = Arc::clone(&self.inner);
        let ttl = self.retention;
        let k = key.clone();
        let run = attempt();
        let task = tokio::spawn(async move {
            let outcome = run.await;
            if let Ok(fresh) = &outcome {
                inner.records.insert(
                    k.clone(),
                    Arc::new(Record {
                        request_sha256: fresh.request_sha256.clone(),
                        index: fresh.index,
                        ttl,
                    }),
                );
            }
            lock(&inner.in_flight).remove(&k);
            outcome
        });
        let pending = async move { task.await.unwrap_or_else(|e| Err(Arc::new(E::from(e)))) }
            .boxed()
            .shared();
        flights.insert(key, pending.clone());
        Begin::Pending(pending)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// SHA-256 of the idempotency key: the cache key's second half, and (hex) what evidence records.
pub fn key_sha256(idempotency_key: &str) -> [u8; 32] {
    crate::sha256::sha256(idempotency_key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct TestError;
    impl From<tokio::task::JoinError> for TestError {
        fn from(_: tokio::task::JoinError) -> Self {
            TestError
        }
    }

    type Store = Idempotency<u32, TestError>;

    fn key(n: u8) -> CacheKey {
        ("client".into(), [n; 32])
    }

    fn attempt(
        runs: &Arc<AtomicU32>,
        gate: tokio::sync::oneshot::Receiver<()>,
    ) -> impl Future<Output = Outcome<u32, TestError>> + Send + 'static {
        let runs = Arc::clone(runs);
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = gate.await;
            Ok(Fresh {
                request_sha256: "r".into(),
                index: u64::from(n),
                response: Arc::new(n),
            })
        }
    }

    #[test]
    fn records_are_bounded_least_recently_used_first_and_evictions_are_counted() {
        let evicted = Arc::new(AtomicU32::new(0));
        let e = Arc::clone(&evicted);
        let store = Store::new(Duration::from_secs(60), 10, move || {
            e.fetch_add(1, Ordering::SeqCst);
        });
        let record = |i: u64| Record {
            request_sha256: "r".into(),
            index: i,
            ttl: Duration::from_secs(60),
        };
        for i in 0..10u8 {
            store.insert(key(i), record(u64::from(i)));
        }
        store.inner.records.run_pending_tasks();
        // Key 0 is used again; then more keys arrive.
        assert!(store.inner.records.get(&key(0)).is_some());
        for i in 10..15u8 {
            store.insert(key(i), record(u64::from(i)));
        }
        store.inner.records.run_pending_tasks();
        assert!(store.inner.records.entry_count() <= 10);
        assert!(
            store.inner.records.get(&key(0)).is_some(),
            "recently used: kept"
        );
        assert!(store.inner.records.get(&key(14)).is_some(), "newest: kept");
        assert!(
            store.inner.records.get(&key(1)).is_none(),
            "least recently used: gone"
        );
        assert_eq!(evicted.load(Ordering::SeqCst), 5);
    }

    async fn outcome(b: Begin<u32, TestError>) -> Result<u32, &'static str> {
        match b {
            Begin::Recorded(r) => Ok(r.index as u32),
            Begin::Pending(p) => p.await.map(|f| *f.response).map_err(|_| "failed"),
        }
    }

    #[tokio::test]
    async fn an_abandoned_attempt_still_records_and_a_retry_replays_it() {
        let store = Store::new(Duration::from_secs(60), 1000, || {});
        let runs = Arc::new(AtomicU32::new(0));
        let (open, gate) = tokio::sync::oneshot::channel();
        // The first caller starts the attempt and hangs up at once.
        drop(store.begin(key(1), || attempt(&runs, gate)));
        // A retry while it is in flight waits for it instead of signing again.
        let (_, never) = tokio::sync::oneshot::channel();
        let retry = store.begin(key(1), || attempt(&runs, never));
        open.send(()).unwrap();
        assert_eq!(outcome(retry).await, Ok(1));
        // Afterwards the key is recorded: still one run.
        let (_, never) = tokio::sync::oneshot::channel();
        match store.begin(key(1), || attempt(&runs, never)) {
            Begin::Recorded(r) => assert_eq!(r.index, 1),
            Begin::Pending(_) => panic!("a committed key must be recorded"),
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_attempt_is_not_remembered() {
        let store = Store::new(Duration::from_secs(60), 1000, || {});
        let first = store.begin(key(2), || async { Err(Arc::new(TestError)) });
        assert_eq!(outcome(first).await, Err("failed"));
        tokio::task::yield_now().await;
        let runs = Arc::new(AtomicU32::new(0));
        let (open, gate) = tokio::sync::oneshot::channel();
        let second = store.begin(key(2), || attempt(&runs, gate));
        open.send(()).unwrap();
        assert_eq!(outcome(second).await, Ok(1));
    }
}
