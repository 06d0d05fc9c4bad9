//! Idempotency: the same client, `Idempotency-Key` and request within the retention window
//! gets the same answer, byte for byte, also after a restart.
//!
//! ECDSA is randomised, so answers are remembered, not recomputed. The evidence log is the
//! durable source (each signature entry carries the key's hash and the request's hash); this
//! moka cache maps (client, key hash) to the entry index, is rebuilt from the log's tail at
//! start, and coalesces concurrent requests with the same key into one signature.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use sha2::{Digest, Sha256};

/// (client identity, SHA-256 of the Idempotency-Key).
pub type CacheKey = (String, [u8; 32]);

/// What is remembered for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub request_sha256: String,
    pub index: u64,
    /// How long the record lives from insertion (retention minus its age).
    pub ttl: Duration,
}

pub struct Idempotency {
    cache: Cache<CacheKey, Arc<Record>>,
    pub retention: Duration,
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

impl Idempotency {
    pub fn new(retention: Duration) -> Self {
        Self {
            cache: Cache::builder().expire_after(PerRecordTtl).build(),
            retention,
        }
    }

    /// Remember a record found in the log at start-up.
    pub async fn insert(&self, key: CacheKey, record: Record) {
        self.cache.insert(key, Arc::new(record)).await;
    }

    /// Return the remembered record, or run `sign` once (concurrent callers with the same key
    /// wait for it) and remember its result. Failures are not remembered.
    pub async fn get_or_sign<F, E>(&self, key: CacheKey, sign: F) -> Result<Arc<Record>, Arc<E>>
    where
        F: Future<Output = Result<Record, E>>,
        E: Send + Sync + 'static,
    {
        self.cache
            .try_get_with(key, async { sign.await.map(Arc::new) })
            .await
    }
}

/// SHA-256 of the idempotency key: the cache key's second half, and (hex) what evidence records.
pub fn key_sha256(idempotency_key: &str) -> [u8; 32] {
    Sha256::digest(idempotency_key.as_bytes()).into()
}
