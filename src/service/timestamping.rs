//! RFC 3161 timestamps of checkpoints (`[audit.timestamping]`): a task asks the TSA for a
//! token for every signed checkpoint, in order, stores it (beside the file log, or in the
//! database), and keeps asking with backoff while the TSA is down. Signing never waits for it.
//! With several replicas only the checkpoint leader asks; the others read what it stored.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::App;
use crate::audit::timestamp::{self, StoredTimestamp};
use crate::config::TimestampingConfig;

/// How many timestamps (the newest) are kept in memory.
const KEPT_IN_MEMORY: usize = 64;

/// Timestamps held in memory: base64 `TimeStampResp` by checkpoint size, and the checkpoints
/// still waiting for one. Each guarded by its lock; none held across an `.await`.
#[derive(Default)]
pub struct Timestamps {
    stamped: RwLock<BTreeMap<u64, Arc<str>>>,
    pending: Mutex<VecDeque<(u64, String)>>,
    wake: tokio::sync::Notify,
}

impl Timestamps {
    /// The stored timestamp of the checkpoint of `tree_size`, if it has one.
    pub fn get(&self, tree_size: u64) -> Option<Arc<str>> {
        self.stamped
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&tree_size)
            .cloned()
    }

    /// Keep a stored timestamp. Only the newest few are kept in memory: the API serves the
    /// latest checkpoint's (the files or the database keep them all).
    pub fn insert(&self, t: &StoredTimestamp) {
        let mut stamped = self.stamped.write().unwrap_or_else(|e| e.into_inner());
        stamped.insert(t.tree_size, Arc::from(t.response.as_str()));
        while stamped.len() > KEPT_IN_MEMORY {
            stamped.pop_first();
        }
    }

    /// Queue a checkpoint (size, note) for timestamping.
    pub fn enqueue(&self, tree_size: u64, note: String) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((tree_size, note));
        self.wake.notify_one();
    }

    fn front(&self) -> Option<(u64, String)> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .front()
            .cloned()
    }

    /// Forget the queue (another replica leads: it asks the TSA).
    fn clear_pending(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The largest checkpoint size with a stored timestamp.
    fn latest_stamped(&self) -> Option<u64> {
        self.stamped
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .next_back()
            .copied()
    }

    fn pop(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
    }

    pub fn pending_len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The timestamping task: until `stop`, take the oldest checkpoint without a token and get it.
/// An answer is verified completely before it is stored ([`timestamp::verify`]); one that
/// fails is counted by reason, logged and never stored, and the checkpoint stays first in the
/// queue, asked for again with backoff.
pub async fn run(
    app: Arc<App>,
    cfg: TimestampingConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let first_backoff = Duration::from_secs(1).min(cfg.retry_max_interval);
    let mut backoff = first_backoff;
    loop {
        if app.replicas.shared() {
            // Several replicas: pick up what the leader stored; only the leader asks the TSA,
            // for every checkpoint still without a token (also those of a former leader).
            if let Err(e) = follow_stored(&app, app.replicas.is_leader()).await {
                tracing::debug!(error = %e, "cannot read the stored timestamps yet");
            }
        }
        app.metrics
            .audit_timestamps_pending
            .set(app.timestamps.pending_len() as i64);
        let Some((size, note)) = app.timestamps.front() else {
            let wait = if app.replicas.shared() {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                _ = app.timestamps.wake.notified() => continue,
                _ = tokio::time::sleep(wait) => continue,
                _ = stop.changed() => return,
            }
        };
        match stamp(&app, &cfg, size, &note).await {
            Ok(stored) => match app.timestamp_store.append(&stored).await {
                Ok(()) => {
                    app.timestamps.insert(&stored);
                    app.timestamps.pop();
                    app.metrics.tsa_requests.with_label_values(&["ok"]).inc();
                    backoff = first_backoff;
                    tracing::info!(tree_size = size, "checkpoint timestamped by the TSA");
                    continue;
                }
                Err(e) => tracing::error!(error = %e, "cannot store a timestamp; will retry"),
            },
            Err(Failure::Exchange(e)) => {
                app.metrics.tsa_requests.with_label_values(&["error"]).inc();
                tracing::warn!(tree_size = size, error = %e, retry_in = ?backoff, "TSA request failed; signing continues, will retry");
            }
            Err(Failure::Rejected(e)) => {
                app.metrics
                    .tsa_requests
                    .with_label_values(&["rejected"])
                    .inc();
                app.metrics
                    .tsa_rejections
                    .with_label_values(&[e.reason()])
                    .inc();
                tracing::error!(tree_size = size, reason = e.reason(), error = %e, retry_in = ?backoff, "TSA answer refused: not stored; the checkpoint stays queued");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(cfg.retry_max_interval);
    }
}

/// Why a checkpoint did not get a timestamp this time.
enum Failure {
    /// No usable answer (unreachable, HTTP error, timeout, too large).
    Exchange(String),
    /// An answer that failed verification.
    Rejected(timestamp::TimestampError),
}

/// Ask the TSA for a token over `note` and verify it: what to store, or why not.
async fn stamp(
    app: &App,
    cfg: &TimestampingConfig,
    size: u64,
    note: &str,
) -> Result<StoredTimestamp, Failure> {
    let nonce: u64 = rand::random::<u64>() >> 1;
    let req = timestamp::request(note.as_bytes(), nonce, cfg.policy);
    let asked_at = app.clock.unix();
    let resp = post(&cfg.tsa_url, req, cfg.timeout).await?;
    let expected = timestamp::Expected {
        note: note.as_bytes(),
        nonce: Some(nonce),
        policy: cfg.policy,
        not_before: Some(asked_at),
        not_after: Some(app.clock.unix()),
    };
    timestamp::verify(&resp, &expected, Some(&cfg.anchors)).map_err(Failure::Rejected)?;
    Ok(StoredTimestamp::new(size, note.as_bytes(), &resp))
}

/// POST a `TimeStampReq` to the TSA over plain HTTP; the DER answer. The whole exchange is
/// bounded by `timeout`, and the answer by [`timestamp::MAX_RESPONSE_BYTES`] (a larger one is
/// refused as soon as it is announced or read, never buffered).
async fn post(url: &str, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, Failure> {
    let failed = |e: String| Failure::Exchange(e);
    let uri: hyper::Uri = url.parse().map_err(|e| failed(format!("tsa_url: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| failed("tsa_url has no host".into()))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| failed(format!("connect {host}:{port}: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| failed(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", host.as_str())
            .header("content-type", "application/timestamp-query")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| failed(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(failed(format!("the TSA answered HTTP {status}")));
        }
        let limited = http_body_util::Limited::new(resp.into_body(), timestamp::MAX_RESPONSE_BYTES);
        match limited.collect().await {
            Ok(b) => Ok(b.to_bytes().to_vec()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(Failure::Rejected(timestamp::TimestampError::TooLarge))
            }
            Err(e) => Err(failed(e.to_string())),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| failed(format!("no complete answer within {timeout:?}")))?
}

/// Load stored timestamps, and queue the checkpoints that have none (oldest first).
pub async fn restore(app: &App) -> Result<(), crate::storage::Error> {
    for t in app.timestamp_store.latest(KEPT_IN_MEMORY).await? {
        app.timestamps.insert(&t);
    }
    if app.config.audit.timestamping.is_some() {
        for (size, note) in app.timestamp_store.unstamped().await? {
            app.timestamps.enqueue(size, note);
        }
    }
    Ok(())
}

/// With PostgreSQL: load the timestamps stored since the last look; the leader, when its queue
/// is empty, queues every checkpoint still without one; the others queue nothing.
async fn follow_stored(app: &App, leader: bool) -> Result<(), crate::storage::Error> {
    for t in app
        .timestamp_store
        .load_since(app.timestamps.latest_stamped())
        .await?
    {
        app.timestamps.insert(&t);
    }
    if !leader {
        app.timestamps.clear_pending();
    } else if app.timestamps.pending_len() == 0 {
        for (size, note) in app.timestamp_store.unstamped().await? {
            app.timestamps.enqueue(size, note);
        }
    }
    Ok(())
}
