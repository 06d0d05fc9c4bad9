//! The rotation monitor and the revocation workflow against an in-memory token (with faults)
//! and a clock the test moves: renewal, retirement, retry backoff and revocation, without
//! SoftHSM and without waiting. Key states and the journal are in memory (with faults); the
//! evidence log is the real file backend in a temporary directory.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use p256::ecdsa::{SigningKey, VerifyingKey};
use p256::elliptic_curve::Generate;

use super::*;
use crate::hsm::{self, TokenKey};
use crate::keys::{Revocation, RevocationReason};

/// A clock that stands still until the test moves it.
struct FakeClock(AtomicU64);

impl FakeClock {
    fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_secs(), Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::SeqCst))
    }
}

#[derive(Default)]
struct FakeKey {
    private: Option<SigningKey>,
    public: Option<VerifyingKey>,
    certificate: Option<Vec<u8>>,
}

/// A token in memory: software P-256 keys by `CKA_ID`; `fail` makes the next calls of one
/// operation fail (a token hiccup), counting down.
#[derive(Default)]
struct FakeToken {
    keys: Mutex<BTreeMap<String, FakeKey>>,
    fail: Mutex<Option<(&'static str, u32)>>,
}

impl FakeToken {
    fn fail_next(&self, op: &'static str, times: u32) {
        *self.fail.lock().unwrap() = Some((op, times));
    }

    fn check(&self, op: &'static str) -> Result<(), hsm::Error> {
        let mut f = self.fail.lock().unwrap();
        match f.as_mut() {
            Some((o, n)) if *o == op && *n > 0 => {
                *n -= 1;
                Err(hsm::Error::Unavailable)
            }
            _ => Ok(()),
        }
    }

    fn has_private_key(&self, id: &str) -> bool {
        self.keys
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|k| k.private.is_some())
    }

    fn sign_now(
        &self,
        id: &str,
        digest: [u8; 32],
        expected: VerifyingKey,
    ) -> Result<Vec<u8>, hsm::Error> {
        self.check("sign")?;
        let keys = self.keys.lock().unwrap();
        let k = keys
            .get(id)
            .and_then(|k| k.private.as_ref())
            .ok_or_else(|| hsm::Error::NotFound(id.to_owned()))?;
        let sig: p256::ecdsa::Signature =
            signature::hazmat::PrehashSigner::sign_prehash(k, &digest)
                .map_err(|_| hsm::Error::Malformed("digest"))?;
        if expected.verify_prehash(&digest, &sig).is_err() {
            return Err(hsm::Error::WrongKey(id.to_owned()));
        }
        Ok(sig.to_der().as_bytes().to_vec())
    }
}

impl KeyToken for FakeToken {
    fn ensure_key_pair(
        &self,
        id: &str,
        _label: &str,
    ) -> BoxFuture<'_, Result<VerifyingKey, hsm::Error>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.check("generate")?;
            let mut keys = self.keys.lock().unwrap();
            let k = keys.entry(id).or_default();
            if k.public.is_none() {
                let s = SigningKey::generate();
                k.public = Some(*s.verifying_key());
                k.private = Some(s);
            }
            Ok(k.public.unwrap_or_else(|| unreachable!("set above")))
        })
    }

    fn public_key(&self, id: &str) -> BoxFuture<'_, Result<Option<VerifyingKey>, hsm::Error>> {
        let id = id.to_owned();
        Box::pin(async move { Ok(self.keys.lock().unwrap().get(&id).and_then(|k| k.public)) })
    }

    fn sign(
        &self,
        id: &str,
        digest: [u8; 32],
        expected: VerifyingKey,
    ) -> BoxFuture<'_, Result<Vec<u8>, hsm::Error>> {
        let id = id.to_owned();
        Box::pin(async move { self.sign_now(&id, digest, expected) })
    }

    fn sign_blocking(
        &self,
        id: &str,
        digest: [u8; 32],
        expected: VerifyingKey,
    ) -> Result<Vec<u8>, hsm::Error> {
        self.sign_now(id, digest, expected)
    }

    fn store_certificate(
        &self,
        id: &str,
        _label: &str,
        der: Vec<u8>,
        _subject_der: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), hsm::Error>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.check("store_certificate")?;
            self.keys.lock().unwrap().entry(id).or_default().certificate = Some(der);
            Ok(())
        })
    }

    fn destroy_private_key(&self, id: &str) -> BoxFuture<'_, Result<bool, hsm::Error>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.check("destroy")?;
            Ok(self
                .keys
                .lock()
                .unwrap()
                .get_mut(&id)
                .and_then(|k| k.private.take())
                .is_some())
        })
    }

    fn scan(&self) -> BoxFuture<'_, Result<Vec<TokenKey>, hsm::Error>> {
        Box::pin(async move {
            Ok(self
                .keys
                .lock()
                .unwrap()
                .iter()
                .filter_map(|(id, k)| {
                    Some(TokenKey {
                        key_id: id.parse().ok()?,
                        public_key: k.public?,
                        has_private_key: k.private.is_some(),
                        certificate: k.certificate.clone(),
                    })
                })
                .collect())
        })
    }
}

/// Key states and the rotation journal in memory; `fail_next("keys" | "journal", n)` makes
/// the next `n` saves fail (the database or disk refusing a write).
#[derive(Default)]
struct MemoryState {
    keys: Mutex<BTreeMap<String, serde_json::Value>>,
    journal: Mutex<storage::JournalData>,
    fail: Mutex<BTreeMap<&'static str, u32>>,
}

impl MemoryState {
    fn fail_next(&self, what: &'static str, n: u32) {
        self.fail.lock().unwrap().insert(what, n);
    }

    fn refuse(&self, what: &'static str) -> Result<(), storage::Error> {
        let mut f = self.fail.lock().unwrap();
        match f.get_mut(what) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(storage::Error::Unavailable(format!(
                    "injected: {what} save"
                )))
            }
            _ => Ok(()),
        }
    }
}

impl storage::KeyStateStore for MemoryState {
    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, serde_json::Value>, storage::Error>> {
        let all = self.keys.lock().unwrap().clone();
        Box::pin(async move { Ok(all) })
    }
    fn save<'a>(
        &'a self,
        all: &'a BTreeMap<String, serde_json::Value>,
        _changed: &'a [String],
    ) -> BoxFuture<'a, Result<(), storage::Error>> {
        Box::pin(async move {
            self.refuse("keys")?;
            *self.keys.lock().unwrap() = all.clone();
            Ok(())
        })
    }
}

impl storage::JournalStore for MemoryState {
    fn load(&self) -> BoxFuture<'_, Result<storage::JournalData, storage::Error>> {
        let j = self.journal.lock().unwrap().clone();
        Box::pin(async move { Ok(j) })
    }
    fn save<'a>(
        &'a self,
        whole: &'a storage::JournalData,
        _tenant: &'a str,
        _rotation: &'a serde_json::Value,
        _finished: bool,
    ) -> BoxFuture<'a, Result<(), storage::Error>> {
        Box::pin(async move {
            self.refuse("journal")?;
            *self.journal.lock().unwrap() = whole.clone();
            Ok(())
        })
    }
}

/// An engine on the fake token and clock, with the internal CA (a CA key in the fake token),
/// key states and journal in memory and the file log in `dir`.
struct Harness {
    _dir: tempfile::TempDir,
    token: Arc<FakeToken>,
    state: Arc<MemoryState>,
    clock: Arc<FakeClock>,
    engine: Engine,
    keys: Arc<Registry>,
    log: Arc<storage::Log>,
}

const ROTATION: &str = r#"
[rotation]
validity = "30d"
renew_before = "10d"
grace = "1d"
min_remaining_validity = "1d"
retry_initial = "1m"
retry_max = "1h"
"#;

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}{ROTATION}", crate::config::tests::MINIMAL);
    let config = crate::config::Config::parse(&text, dir.path()).unwrap();
    let clock = Arc::new(FakeClock(AtomicU64::new(1_900_000_000)));
    let token = Arc::new(FakeToken::default());
    let soft = crate::storage::file::tests::soft_token();
    let metrics = Arc::new(Metrics::new());
    let storage = storage::open(
        &config,
        Arc::clone(&soft) as _,
        Arc::clone(&soft.1) as _,
        Arc::clone(&metrics),
        false,
    )
    .await
    .unwrap();
    // The internal CA: its key in the fake token, its certificate signed by it.
    let ca_public = token.ensure_key_pair(CA_KEY_ID, "ca").await.unwrap();
    let ca_signer = TokenSigner::new(Arc::clone(&token) as _, CA_KEY_ID, ca_public);
    let ca_der = pki::issue(
        pki::Profile::Ca {
            subject: pki::name("Test CA", "Signet").unwrap(),
        },
        &ca_public,
        clock.now() - Duration::from_secs(60),
        Duration::from_secs(3650 * 86400),
        &ca_signer,
    )
    .unwrap();
    let ca = Arc::new(CertInfo::parse(&ca_der).unwrap());
    let state = Arc::new(MemoryState::default());
    let keys = Arc::new(
        Registry::load(
            token.as_ref(),
            Arc::clone(&state) as _,
            false,
            Duration::from_secs(86400),
            clock.unix(),
        )
        .await
        .unwrap(),
    );
    let engine = Engine::load(
        Arc::clone(&state) as _,
        Deps {
            token: Arc::clone(&token) as _,
            keys: Arc::clone(&keys),
            log: Arc::clone(&storage.log),
            metrics,
            clock: Arc::clone(&clock) as _,
            dynamic: Arc::new(ArcSwap::from_pointee(config.dynamic.clone())),
            ca: Arc::new(ArcSwap::from_pointee(Some(ca))),
            leases: storage.leases,
            shared: false,
            revocation_urls: None,
        },
    )
    .await
    .unwrap();
    Harness {
        _dir: dir,
        token,
        state,
        clock,
        engine,
        keys,
        log: storage.log,
    }
}

fn tenant() -> TenantId {
    "payroll".parse().unwrap()
}

fn id(v: u32) -> KeyId {
    KeyId::new(tenant(), v)
}

fn state(h: &Harness, v: u32) -> Option<KeyState> {
    h.keys.snapshot().version(&id(v)).map(|v| v.state)
}

async fn events(h: &Harness) -> Vec<(String, Option<String>)> {
    let n = h.log.tree_size();
    h.log
        .entries(0, n)
        .await
        .unwrap()
        .iter()
        .map(|b| {
            let e: Entry = serde_json::from_slice(b).unwrap();
            (e.event, e.key_id)
        })
        .collect()
}

/// An operator's (scheduler's) start of a rotation of the tenant.
fn start(trigger: Trigger) -> Start {
    Start {
        tenant: tenant(),
        trigger,
        actor: scheduler_actor(),
        reason: "test".into(),
        request_id: None,
        due_at: None,
        emergency: false,
    }
}

/// A revocation of `payroll/v{v}`.
fn revocation(
    v: u32,
    reason: RevocationReason,
    compromised_at: Option<u64>,
    rotate: bool,
) -> Revoke {
    Revoke {
        key_id: id(v),
        reason,
        compromised_at,
        actor: scheduler_actor(),
        request_id: None,
        rotate,
    }
}

async fn create_first_key(h: &Harness) {
    let r = h
        .engine
        .rotation_start(start(Trigger::Initial))
        .await
        .unwrap();
    assert_eq!(r.state, RotationState::Completed, "{r:?}");
    assert_eq!(state(h, 1), Some(KeyState::Active));
}

#[tokio::test]
async fn the_monitor_renews_in_the_window_and_retires_after_grace() {
    let h = harness().await;
    create_first_key(&h).await;
    // Outside renew_before (30 d validity, 10 d window): nothing to do.
    h.clock.advance(Duration::from_secs(19 * 86400));
    h.engine.rotation_tick().await;
    assert_eq!(state(&h, 2), None);
    // Inside the window: a scheduled rotation to v2, v1 retiring for the 1 d grace.
    h.clock.advance(Duration::from_secs(2 * 86400));
    h.engine.rotation_tick().await;
    assert_eq!(state(&h, 2), Some(KeyState::Active));
    assert_eq!(state(&h, 1), Some(KeyState::Retiring));
    assert!(h.token.has_private_key("payroll/v1"));
    // Grace not over: v1 keeps its key.
    h.clock.advance(Duration::from_secs(86400 - 60));
    h.engine.rotation_tick().await;
    assert_eq!(state(&h, 1), Some(KeyState::Retiring));
    // Over: retired, private key destroyed, `key_retired` recorded.
    h.clock.advance(Duration::from_secs(120));
    h.engine.rotation_tick().await;
    assert_eq!(state(&h, 1), Some(KeyState::Retired));
    assert!(!h.token.has_private_key("payroll/v1"));
    let ev = events(&h).await;
    assert!(
        ev.contains(&("key_retired".into(), Some("payroll/v1".into()))),
        "{ev:?}"
    );
    let started: Vec<_> = ev.iter().filter(|(e, _)| e == "rotation_started").collect();
    assert_eq!(started.len(), 2, "one initial, one scheduled: {ev:?}");
}

#[tokio::test]
async fn a_failing_step_waits_for_its_backoff_then_resumes() {
    let h = harness().await;
    create_first_key(&h).await;
    // The token refuses key generation four times: each pass tries twice (once more at once).
    h.token.fail_next("generate", 4);
    let r = h
        .engine
        .rotation_start(start(Trigger::Manual))
        .await
        .unwrap();
    assert_eq!(r.state, RotationState::Planned);
    assert_eq!(r.attempts, 1);
    let first_retry = r.next_attempt_at.unwrap();
    assert_eq!(first_retry, h.clock.unix() + 60, "retry_initial = 1m");
    // Before the backoff: the monitor leaves it alone.
    h.clock.advance(Duration::from_secs(30));
    h.engine.rotation_tick().await;
    assert_eq!(h.engine.in_progress(&tenant()).unwrap().attempts, 1);
    // After: tried again (twice), fails, and the backoff doubles.
    h.clock.advance(Duration::from_secs(31));
    h.engine.rotation_tick().await;
    let r = h.engine.in_progress(&tenant()).unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(r.next_attempt_at, Some(h.clock.unix() + 120));
    // The token answers again: the next pass after the backoff completes the rotation.
    h.clock.advance(Duration::from_secs(121));
    h.engine.rotation_tick().await;
    assert!(h.engine.in_progress(&tenant()).is_none());
    assert_eq!(state(&h, 2), Some(KeyState::Active));
    assert_eq!(state(&h, 1), Some(KeyState::Retiring));
}

#[tokio::test]
async fn a_journal_that_refuses_a_write_holds_the_rotation_until_it_can_record_it() {
    let h = harness().await;
    create_first_key(&h).await;
    // The journal refuses its next writes: a step whose progress cannot be recorded is not
    // taken as done, and nothing is activated behind the journal's back.
    let finished_before = h.state.journal.lock().unwrap().history.len();
    h.state.fail_next("journal", 3);
    let started = h.engine.rotation_start(start(Trigger::Manual)).await;
    let recorded = h.state.journal.lock().unwrap().clone();
    match started {
        Err(e) => assert!(e.to_string().contains("injected"), "{e}"),
        Ok(r) => assert_ne!(r.state.step(), Step::Completed, "{r:?}"),
    }
    assert_eq!(state(&h, 1), Some(KeyState::Active));
    assert_ne!(state(&h, 2), Some(KeyState::Active));
    assert_eq!(
        recorded.history.len(),
        finished_before,
        "no finished rotation was recorded: {recorded:?}"
    );
    // The journal works again: the monitor (after any backoff) completes the rotation, once.
    for _ in 0..4 {
        h.clock.advance(Duration::from_secs(3600));
        h.engine.rotation_tick().await;
        if state(&h, 2) == Some(KeyState::Active) {
            break;
        }
        if h.engine.in_progress(&tenant()).is_none() && state(&h, 2).is_none() {
            // The start itself was refused: start again now that the journal writes.
            h.engine
                .rotation_start(start(Trigger::Manual))
                .await
                .unwrap();
        }
    }
    assert_eq!(state(&h, 2), Some(KeyState::Active));
    assert_eq!(state(&h, 1), Some(KeyState::Retiring));
    let j = h.state.journal.lock().unwrap().clone();
    assert!(j.active.is_empty(), "{j:?}");
    assert_eq!(j.history.len(), finished_before + 1, "{j:?}");
    let activations = events(&h)
        .await
        .into_iter()
        .filter(|(e, k)| e == "key_activated" && k.as_deref() == Some("payroll/v2"))
        .count();
    assert_eq!(activations, 1);
}

#[tokio::test]
async fn a_revoked_key_the_token_would_not_destroy_is_destroyed_by_the_monitor() {
    let h = harness().await;
    create_first_key(&h).await;
    h.token.fail_next("destroy", 1);
    let done = h
        .engine
        .revoke(revocation(
            1,
            RevocationReason::KeyCompromise,
            Some(h.clock.unix() - 3600),
            true,
        ))
        .await
        .unwrap();
    assert_eq!(done.previous_state, KeyState::Active);
    assert_eq!(
        done.rotation.as_ref().map(|r| r.state.step()),
        Some(Step::Completed)
    );
    assert_eq!(state(&h, 1), Some(KeyState::Revoked));
    assert_eq!(state(&h, 2), Some(KeyState::Active));
    // The token refused the destruction: the key is still there, and can never sign.
    assert!(h.token.has_private_key("payroll/v1"));
    assert!(matches!(
        h.keys
            .signing_version(&id(1), h.clock.unix(), Duration::ZERO),
        Err(crate::keys::Error::Revoked(_))
    ));
    // The next monitor pass destroys it.
    h.engine.rotation_tick().await;
    assert!(!h.token.has_private_key("payroll/v1"));
    let v1 = h.keys.snapshot().version(&id(1)).cloned().unwrap();
    assert!(!v1.has_private_key);
    assert_eq!(
        v1.revocation.as_deref(),
        Some(&Revocation {
            reason: RevocationReason::KeyCompromise,
            revoked_at: h.clock.unix(),
            compromised_at: Some(h.clock.unix() - 3600),
            certificate_serial: v1.certificate.as_ref().map(|c| c.serial_hex.clone()),
            log_index: done.revocation.log_index,
        })
    );
    // Evidence order: key_revoked before the new version's activation.
    let ev = events(&h).await;
    let revoked = ev.iter().position(|(e, _)| e == "key_revoked").unwrap();
    let activated = ev
        .iter()
        .rposition(|(e, k)| e == "key_activated" && k.as_deref() == Some("payroll/v2"))
        .unwrap();
    assert!(revoked < activated, "{ev:?}");
    // Revoking again is refused; the version stays revoked.
    let again = h
        .engine
        .revoke(revocation(1, RevocationReason::Superseded, None, false))
        .await;
    assert!(matches!(again, Err(Error::Conflict(_))), "{again:?}");
}
