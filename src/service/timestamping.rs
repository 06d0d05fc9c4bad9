//! RFC 3161 timestamps of checkpoints (`[audit.timestamping]`): a task asks the TSA for a
//! token for every signed checkpoint, in order, stores it beside the checkpoints, and keeps
//! asking with backoff while the TSA is down. Signing never waits for it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::App;
use crate::audit::timestamp::{self, StoredTimestamp};
use crate::config::TimestampingConfig;

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

    pub fn insert(&self, t: &StoredTimestamp) {
        self.stamped
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(t.tree_size, Arc::from(t.response.as_str()));
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
pub async fn run(
    app: Arc<App>,
    cfg: TimestampingConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let policy = cfg
        .policy
        .as_deref()
        .and_then(|p| der::oid::ObjectIdentifier::new(p).ok())
        .and_then(|oid| der::Encode::to_der(&oid).ok());
    let mut backoff = Duration::from_secs(1);
    loop {
        app.metrics
            .audit_timestamps_pending
            .set(app.timestamps.pending_len() as i64);
        let Some((size, note)) = app.timestamps.front() else {
            tokio::select! {
                _ = app.timestamps.wake.notified() => continue,
                _ = stop.changed() => return,
            }
        };
        let nonce: u64 = rand::random::<u64>() >> 1;
        let req = timestamp::request(note.as_bytes(), nonce, policy.as_deref());
        let result = match post(&cfg.tsa_url, req, cfg.timeout).await {
            Ok(resp) => timestamp::check_response(&resp, note.as_bytes(), nonce)
                .map_err(|e| e.to_string())
                .map(|()| resp),
            Err(e) => Err(e),
        };
        match result {
            Ok(resp) => {
                let stored = StoredTimestamp::new(size, note.as_bytes(), &resp);
                let dir = app.config.audit.dir.clone();
                let s = stored.clone();
                let written =
                    tokio::task::spawn_blocking(move || timestamp::append(&dir, &s)).await;
                match written {
                    Ok(Ok(())) => {
                        app.timestamps.insert(&stored);
                        app.timestamps.pop();
                        app.metrics.tsa_requests.with_label_values(&["ok"]).inc();
                        backoff = Duration::from_secs(1);
                        tracing::info!(tree_size = size, "checkpoint timestamped by the TSA");
                        continue;
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot store a timestamp; will retry")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "timestamp store task failed; will retry")
                    }
                }
            }
            Err(e) => {
                app.metrics.tsa_requests.with_label_values(&["error"]).inc();
                tracing::warn!(tree_size = size, error = %e, retry_in = ?backoff, "TSA request failed; signing continues, will retry");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(300));
    }
}

/// POST a `TimeStampReq` to the TSA over plain HTTP; the DER answer.
async fn post(url: &str, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("tsa_url: {e}"))?;
    let host = uri.host().ok_or("tsa_url has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", host.as_str())
            .header("content-type", "application/timestamp-query")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("the TSA answered HTTP {status}"));
        }
        Ok(bytes.to_vec())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Load stored timestamps, and queue the checkpoints that have none (oldest first).
pub fn restore(app: &App) -> Result<(), std::io::Error> {
    let dir = &app.config.audit.dir;
    let stored = timestamp::load(dir)?;
    let have: BTreeSet<u64> = stored.iter().map(|t| t.tree_size).collect();
    for t in &stored {
        app.timestamps.insert(t);
    }
    if app.config.audit.timestamping.is_some() {
        let checkpoints = crate::audit::read_checkpoints(&dir.join(crate::audit::CHECKPOINTS_FILE))
            .map_err(std::io::Error::other)?;
        for cp in checkpoints
            .into_iter()
            .filter(|c| !have.contains(&c.tree_size))
        {
            app.timestamps.enqueue(cp.tree_size, cp.note);
        }
    }
    Ok(())
}
