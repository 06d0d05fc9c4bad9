//! Session pool, deadlines and the recovery supervisor.
//!
//! Threads: `sessions` workers, each owning one `Session` (a session is `Send`, not `Sync`),
//! pull jobs from one bounded queue, fair between tenants ([`super::fair`]); a supervisor
//! thread owns the keeper session that holds the login (SoftHSM logs the token out when the
//! last session closes) and probes it every `health_interval`. Nothing here blocks the async
//! runtime: async callers wait on a oneshot with a deadline.
//!
//! Recovery ladder, run by the supervisor when a probe or a call reports trouble:
//! 1. open a new keeper session and log in again, bump the session generation (workers reopen
//!    their sessions lazily), empty the handle cache;
//! 2. if that fails, `C_Finalize` the library, load and `C_Initialize` it again, find the token
//!    by label and log in.
//!
//! Until one succeeds, calls fail fast with `Error::Unavailable` and `/readyz` is red.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use moka::sync::Cache;
use secrecy::{ExposeSecret, SecretString};

use super::fair::{FairQueue, Full, Share, Shares};
use super::session::TokenSession;
use super::{Error, FailureClass, classify};
use crate::config::{HsmConfig, PinSource};
use crate::metrics::Metrics;

/// Handle to the token. Cheap to clone.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

type Op<T> = Box<dyn FnMut(&TokenSession<'_>) -> Result<T, Error> + Send>;
/// Runs the operation (or, if the bool says the deadline passed, only answers `Timeout`) and
/// sends the reply.
type RunJob = Box<dyn FnOnce(&mut WorkerState, bool) + Send>;

struct Job {
    deadline: Instant,
    run: RunJob,
}

struct Inner {
    module: PathBuf,
    token_label: String,
    /// Read once at start; kept (zeroised on drop) only to log in again after a token failure.
    pin: SecretString,
    call_timeout: Duration,
    health_interval: Duration,
    queue: FairQueue<Job>,
    /// The loaded library; replaced only by the supervisor.
    library: Mutex<Option<Library>>,
    /// Bumped whenever every worker session must be reopened.
    generation: AtomicU64,
    ready: AtomicBool,
    shutting_down: AtomicBool,
    /// Object handles by (library instance, key): a handle from an earlier instance can never
    /// be found by a session of a later one.
    handles: Cache<(u64, String), ObjectHandle>,
    metrics: Arc<Metrics>,
    /// Supervisor wake-up: set to true to ask for an immediate probe.
    wake: (Mutex<bool>, Condvar),
    /// Milliseconds since `epoch` when the supervisor entered a token call; 0 when idle.
    supervisor_busy_since: AtomicU64,
    epoch: Instant,
    workers: Mutex<Vec<WorkerSlot>>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// A private key that must always be present (`CKA_ID`); the health probe looks it up, so
    /// a token that lost its objects (files gone, device swapped) is detected and recovered.
    probe_key: Mutex<Option<String>>,
    /// The key pair of the probe's round trip, and its public key.
    probe_signer: Mutex<Option<(String, p256::ecdsa::VerifyingKey)>>,
    #[cfg(feature = "insecure-test-hooks")]
    stall_next: Mutex<Option<Duration>>,
    /// Test hook: data object stores still to refuse.
    #[cfg(feature = "insecure-test-hooks")]
    refuse_stores: AtomicU64,
}

struct WorkerSlot {
    busy_since: Arc<AtomicU64>,
    abandoned: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A loaded and initialised PKCS#11 library with the slot of our token.
#[derive(Clone)]
pub struct Library {
    ctx: Pkcs11,
    slot: Slot,
    /// Unique per `C_Initialize` in this process: object handles are only meaningful within
    /// one library instance (SoftHSM reuses handle numbers after re-initialisation).
    instance: u64,
}

static NEXT_LIBRARY_INSTANCE: AtomicU64 = AtomicU64::new(1);

impl Library {
    /// Load the module, `C_Initialize` it (OS locking), and find the token by label.
    pub fn open(module: &Path, token_label: &str) -> Result<Self, Error> {
        let ctx = load(module)?;
        match find_token(&ctx, token_label) {
            Ok(slot) => Ok(Self {
                ctx,
                slot,
                instance: NEXT_LIBRARY_INSTANCE.fetch_add(1, Ordering::Relaxed),
            }),
            Err(e) => {
                // Leave nothing initialised behind: the next attempt must rescan the tokens.
                let _ = ctx.finalize();
                Err(e)
            }
        }
    }
}

fn load(module: &Path) -> Result<Pkcs11, Error> {
    let ctx = Pkcs11::new(module).map_err(|source| Error::Load {
        path: module.display().to_string(),
        source,
    })?;
    let args = CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK);
    match ctx.initialize(args) {
        Ok(()) => Ok(ctx),
        // Left initialised by an earlier, failed attempt: start from scratch so the module
        // rescans its tokens.
        Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            let _ = ctx.clone().finalize();
            ctx.initialize(args).map_err(Error::Initialize)?;
            Ok(ctx)
        }
        Err(e) => Err(Error::Initialize(e)),
    }
}

fn find_token(ctx: &Pkcs11, label: &str) -> Result<Slot, Error> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(Error::pkcs11("C_GetSlotList"))?;
    let mut present = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(Error::pkcs11("C_GetTokenInfo"))?;
        // Labels are blank-padded to 32 bytes.
        let found = info.label().trim_end().to_owned();
        if found == label {
            return Ok(slot);
        }
        present.push(format!("`{found}`"));
    }
    let present = if present.is_empty() {
        "none".to_owned()
    } else {
        present.join(", ")
    };
    Err(Error::TokenNotFound {
        label: label.to_owned(),
        present,
    })
}

fn login(session: &Session, pin: &SecretString) -> Result<(), Error> {
    let pin = cryptoki::types::AuthPin::from(pin.expose_secret().to_owned());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(Error::Login(e)),
    }
}

/// Read the user PIN once, from the environment or a file. Trailing newlines are dropped.
pub fn read_pin(source: &PinSource) -> Result<SecretString, Error> {
    let raw = zeroize::Zeroizing::new(match source {
        PinSource::Env(var) => match std::env::var(var) {
            Ok(v) => v,
            // Re-executed without the variable: the PIN arrives on an inherited pipe.
            Err(_) => match std::env::var(PIN_FD_ENV) {
                Ok(fd) => read_pin_pipe(&fd).map_err(|e| Error::Pin {
                    source_name: source.to_string(),
                    reason: format!("{PIN_FD_ENV}: {e}"),
                })?,
                Err(_) => {
                    return Err(Error::Pin {
                        source_name: source.to_string(),
                        reason: "not set or not UTF-8".to_owned(),
                    });
                }
            },
        },
        PinSource::File(path) => {
            warn_if_readable_by_others(path);
            std::fs::read_to_string(path).map_err(|e| Error::Pin {
                source_name: source.to_string(),
                reason: e.kind().to_string(),
            })?
        }
    });
    let pin = raw.trim_end_matches(['\n', '\r']).to_owned();
    if pin.is_empty() {
        return Err(Error::Pin {
            source_name: source.to_string(),
            reason: "empty".to_owned(),
        });
    }
    Ok(SecretString::from(pin))
}

/// Names the inherited pipe the PIN is passed on when Signet re-executes itself without the
/// PIN's environment variable.
pub const PIN_FD_ENV: &str = "SIGNET_PIN_FD";

/// Read the PIN from the inherited pipe `fd` (a number), through `/proc/self/fd` so no file
/// descriptor is adopted by hand. The pipe holds it once: a second read finds it empty.
fn read_pin_pipe(fd: &str) -> Result<String, std::io::Error> {
    let n: u32 = fd.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file descriptor number",
        )
    })?;
    // Only the kind: the error's text could echo what was read.
    let kind = |e: std::io::Error| std::io::Error::from(e.kind());
    let mut f = std::fs::File::open(format!("/proc/self/fd/{n}")).map_err(kind)?;
    let mut pin = String::new();
    std::io::Read::read_to_string(&mut f, &mut pin).map_err(kind)?;
    Ok(pin)
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "PIN file is readable by group or others; chmod 600 it");
    }
}

/// Create a token with `label` on a free slot (SoftHSM), set its user PIN, and finalise the
/// library again. Returns false if a token with that label already exists.
pub fn provision_token(
    module: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<bool, Error> {
    let ctx = load(module)?;
    let result = (|| {
        if find_token(&ctx, label).is_ok() {
            return Ok(false);
        }
        let free = ctx
            .get_all_slots()
            .map_err(Error::pkcs11("C_GetSlotList"))?
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|t| !t.token_initialized())
                    .unwrap_or(false)
            })
            .ok_or_else(|| Error::TokenNotFound {
                label: label.to_owned(),
                present: "no free slot to create it".to_owned(),
            })?;
        let so = cryptoki::types::AuthPin::from(so_pin.expose_secret().to_owned());
        ctx.init_token(free, &so, label)
            .map_err(Error::pkcs11("C_InitToken"))?;
        let slot = find_token(&ctx, label)?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(Error::pkcs11("C_OpenSession"))?;
        session
            .login(UserType::So, Some(&so))
            .map_err(Error::Login)?;
        let user = cryptoki::types::AuthPin::from(user_pin.expose_secret().to_owned());
        session
            .init_pin(&user)
            .map_err(Error::pkcs11("C_InitPIN"))?;
        session.logout().map_err(Error::pkcs11("C_Logout"))?;
        Ok(true)
    })();
    let _ = ctx.finalize();
    result
}

impl Hsm {
    /// Read the PIN, load the module, log in, and start the workers and the supervisor.
    /// Fails (with a precise reason) if the token cannot be used right now.
    pub fn start(config: &HsmConfig, metrics: Arc<Metrics>) -> Result<Self, Error> {
        let pin = read_pin(&config.pin)?;
        let library = Library::open(&config.module, &config.token_label)?;
        let keeper = library
            .ctx
            .open_rw_session(library.slot)
            .map_err(Error::pkcs11("C_OpenSession"))?;
        login(&keeper, &pin)?;

        let inner = Arc::new(Inner {
            module: config.module.clone(),
            token_label: config.token_label.clone(),
            pin,
            call_timeout: config.call_timeout,
            health_interval: config.health_interval,
            queue: FairQueue::new(config.queue_depth),
            library: Mutex::new(Some(library)),
            generation: AtomicU64::new(1),
            ready: AtomicBool::new(true),
            shutting_down: AtomicBool::new(false),
            handles: Cache::new(100_000),
            metrics,
            wake: (Mutex::new(false), Condvar::new()),
            supervisor_busy_since: AtomicU64::new(0),
            epoch: Instant::now(),
            workers: Mutex::new(Vec::new()),
            supervisor: Mutex::new(None),
            probe_key: Mutex::new(None),
            probe_signer: Mutex::new(None),
            #[cfg(feature = "insecure-test-hooks")]
            stall_next: Mutex::new(None),
            #[cfg(feature = "insecure-test-hooks")]
            refuse_stores: AtomicU64::new(0),
        });
        inner.metrics.hsm_ready.set(1);
        inner.metrics.hsm_sessions.set(config.sessions as i64);
        for _ in 0..config.sessions {
            spawn_worker(&inner);
        }
        let sup = Arc::clone(&inner);
        let handle = std::thread::Builder::new()
            .name("hsm-supervisor".into())
            .spawn(move || supervisor_main(sup, keeper))
            .map_err(|_| Error::Unavailable)?;
        *lock(&inner.supervisor) = Some(handle);
        Ok(Self { inner })
    }

    /// Run `op` on a pooled session, with the configured deadline. The operation may run
    /// twice if the first session turns out to be dead; every operation here is idempotent.
    /// Signet's own calls go ahead of the signing calls of tenants.
    pub async fn call<T, F>(&self, op: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnMut(&TokenSession<'_>) -> Result<T, Error> + Send + 'static,
    {
        self.call_queued(None, op).await
    }

    /// [`Hsm::call`] for a signing call of a tenant's client: it waits its tenant's turn
    /// ([`super::fair`]), and is refused at once ([`Error::Refused`]) when the tenant's or the
    /// client's share of the queue is full.
    pub async fn call_as<T, F>(&self, share: &Share, op: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnMut(&TokenSession<'_>) -> Result<T, Error> + Send + 'static,
    {
        self.call_queued(Some(share), op).await
    }

    async fn call_queued<T, F>(&self, share: Option<&Share>, op: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnMut(&TokenSession<'_>) -> Result<T, Error> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(share, Box::new(op), move |r| {
            let _ = tx.send(r);
        })?;
        match tokio::time::timeout(self.inner.call_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => {
                self.inner.metrics.hsm_error("timeout");
                self.inner.request_probe();
                Err(Error::Timeout(self.inner.call_timeout))
            }
        }
    }

    /// Like [`Hsm::call`], for synchronous code (e.g. the X.509 builder's `Signer`).
    /// Must not be called from an async task; use `spawn_blocking`.
    pub fn call_blocking<T, F>(&self, op: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnMut(&TokenSession<'_>) -> Result<T, Error> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(None, Box::new(op), move |r| {
            let _ = tx.send(r);
        })?;
        match rx.recv_timeout(self.inner.call_timeout) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Error::ShuttingDown),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                self.inner.metrics.hsm_error("timeout");
                self.inner.request_probe();
                Err(Error::Timeout(self.inner.call_timeout))
            }
        }
    }

    /// Sign `digest` with `id`'s private key in `share`'s turn; DER signature out, checked with
    /// `expected` ([`Hsm::checked`]). The token worker only signs and goes straight on to the
    /// next call; the check runs on the calling task's thread, beside the token on more than
    /// one core.
    pub async fn sign_as(
        &self,
        share: &Share,
        id: String,
        digest: [u8; 32],
        expected: p256::ecdsa::VerifyingKey,
    ) -> Result<Vec<u8>, Error> {
        let key = id.clone();
        let der = self
            .call_as(share, move |s| s.sign_prehashed(&id, &digest))
            .await?;
        self.checked(&key, &digest, der, &expected)
    }

    /// Sign several digests (key, digest, the version's public key) in one token call in
    /// `share`'s turn; DER signatures out, in order, each checked ([`Hsm::checked`]). The
    /// checks run on the blocking pool (about 70 µs each), not on the token worker.
    pub async fn sign_many_as(
        &self,
        share: &Share,
        jobs: Vec<(String, [u8; 32], p256::ecdsa::VerifyingKey)>,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let jobs = Arc::new(jobs);
        let signing = Arc::clone(&jobs);
        let sigs = self
            .call_as(share, move |s| {
                signing
                    .iter()
                    .map(|(id, d, _)| s.sign_prehashed(id, d))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let hsm = self.clone();
        tokio::task::spawn_blocking(move || {
            jobs.iter()
                .zip(sigs)
                .map(|((id, d, pk), der)| hsm.checked(id, d, der, pk))
                .collect()
        })
        .await
        .map_err(|_| Error::ShuttingDown)?
    }

    /// The check every token signature passes ([`session::check`]), off the token worker. On a
    /// mismatch the token is also probed and the error counted, as for a call that failed in
    /// the worker.
    pub fn checked(
        &self,
        id: &str,
        digest: &[u8; 32],
        der: Vec<u8>,
        expected: &p256::ecdsa::VerifyingKey,
    ) -> Result<Vec<u8>, Error> {
        super::session::check(&self.inner.handles, id, digest, der, expected).inspect_err(|e| {
            self.inner.metrics.hsm_error(e.kind());
            self.inner.request_probe();
        })
    }

    /// New bounds and weights of the fair queue (`[limits]`, on start and on reload).
    pub fn set_shares(&self, shares: Shares) {
        self.inner.queue.set_shares(shares);
    }

    /// Signing calls waiting for the token, per tenant.
    pub fn queue_depths(&self) -> Vec<(String, usize)> {
        self.inner.queue.depths()
    }

    /// Make the health probe also check that private key `id` is present in the token.
    pub fn set_probe_key(&self, id: &str) {
        *lock(&self.inner.probe_key) = Some(id.to_owned());
        self.inner.request_probe();
    }

    /// Make the health probe a cryptographic round trip: sign a random digest with private
    /// key `id` (`CKM_ECDSA`) and verify the signature with `public`. A token that answers
    /// session queries from host-side state while its device is gone fails this.
    pub fn set_probe_signer(&self, id: &str, public: p256::ecdsa::VerifyingKey) {
        *lock(&self.inner.probe_signer) = Some((id.to_owned(), public));
        self.inner.request_probe();
    }

    /// True when the token is logged in and the last probe succeeded.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
            && !self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// False when a token call by the supervisor has hung far past its deadline: the library
    /// is wedged and only a process restart helps (liveness probes should restart us).
    pub fn is_healthy(&self) -> bool {
        let since = self.inner.supervisor_busy_since.load(Ordering::Acquire);
        if since == 0 {
            return true;
        }
        let limit = (self.inner.call_timeout * 6).max(Duration::from_secs(30));
        self.inner.now_ms().saturating_sub(since) < limit.as_millis() as u64
    }

    /// Stop accepting calls, let queued calls finish, close every session, finalise.
    pub fn shutdown(&self) {
        if self.inner.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.queue.close();
        self.inner.request_probe();
        let workers: Vec<_> = lock(&self.inner.workers).drain(..).collect();
        for mut w in workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        if let Some(t) = lock(&self.inner.supervisor).take() {
            let _ = t.join();
        }
        if let Some(lib) = lock(&self.inner.library).take() {
            let _ = lib.ctx.finalize();
        }
        self.inner.ready.store(false, Ordering::Release);
        self.inner.metrics.hsm_ready.set(0);
    }

    fn submit<T: Send + 'static>(
        &self,
        share: Option<&Share>,
        op: Op<T>,
        reply: impl FnOnce(Result<T, Error>) + Send + 'static,
    ) -> Result<(), Error> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        if !self.inner.ready.load(Ordering::Acquire) {
            return Err(Error::Unavailable);
        }
        let mut op = op;
        let timeout = self.inner.call_timeout;
        let job = Job {
            deadline: Instant::now() + self.inner.call_timeout,
            run: Box::new(move |worker: &mut WorkerState, expired: bool| {
                if expired {
                    reply(Err(Error::Timeout(timeout)));
                } else {
                    reply(worker.run(&mut op));
                }
            }),
        };
        match self.inner.queue.push(share, job) {
            Ok(()) => Ok(()),
            Err(Full::Busy) => {
                self.inner.metrics.hsm_queue_rejections.inc();
                Err(Error::Busy)
            }
            Err(Full::Closed) => Err(Error::ShuttingDown),
            Err(Full::Refused(r)) => {
                if let Some(s) = share {
                    self.inner
                        .metrics
                        .client_refusals
                        .with_label_values(&[s.client.as_str(), r.limit()])
                        .inc();
                }
                Err(Error::Refused(r))
            }
        }
    }

    /// Test hook: refuse the next `n` stores of the log's anchor (`CKR_DEVICE_MEMORY`), as a
    /// token whose object store is gone while it still signs would.
    #[cfg(feature = "insecure-test-hooks")]
    pub fn insecure_test_refuse_stores(&self, n: u64) {
        self.inner.refuse_stores.store(n, Ordering::Release);
    }

    /// Test hook: whether this store is to be refused (see
    /// [`Hsm::insecure_test_refuse_stores`]).
    #[cfg(feature = "insecure-test-hooks")]
    pub fn insecure_test_take_refused_store(&self) -> Option<Error> {
        self.inner
            .refuse_stores
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|_| Error::Pkcs11 {
                op: "C_CreateObject",
                source: cryptoki::error::Error::Pkcs11(
                    RvError::DeviceMemory,
                    cryptoki::context::Function::CreateObject,
                ),
            })
    }

    /// Test hook: make the next token call hang for `d` (to exercise deadlines).
    #[cfg(feature = "insecure-test-hooks")]
    pub fn insecure_test_stall_next_call(&self, d: Duration) {
        *lock(&self.inner.stall_next) = Some(d);
    }

    /// Test hook: `C_Finalize` the library under the running service, as a crashed token
    /// driver would; every session dies and only re-initialisation recovers.
    /// Test hook: make the cached handle of `id`'s private key point at `other`'s, as a stale
    /// handle from an earlier library instance would.
    #[cfg(feature = "insecure-test-hooks")]
    pub fn insecure_test_plant_stale_handle(&self, id: &str, other: &str) -> Result<(), Error> {
        let (id, other) = (id.to_owned(), other.to_owned());
        let inner = Arc::clone(&self.inner);
        self.call_blocking(move |s| {
            let h = s.private_key(&other)?;
            inner.handles.insert((s.instance, id.clone()), h);
            Ok(())
        })
    }

    #[cfg(feature = "insecure-test-hooks")]
    pub fn insecure_test_finalize_library(&self) {
        if let Some(lib) = lock(&self.inner.library).as_ref() {
            let _ = lib.ctx.clone().finalize();
        }
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        // +1 so that 0 keeps meaning "idle".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn request_probe(&self) {
        let (m, cv) = &self.wake;
        *lock(m) = true;
        cv.notify_all();
    }

    /// A logged-in session and the instance of the library it belongs to (read together,
    /// under the library lock).
    fn open_session(&self) -> Result<(Session, u64), Error> {
        let library = lock(&self.library).clone().ok_or(Error::Unavailable)?;
        let session = library
            .ctx
            .open_rw_session(library.slot)
            .map_err(Error::pkcs11("C_OpenSession"))?;
        login(&session, &self.pin)?;
        Ok((session, library.instance))
    }
}

/// One worker thread's state: its session, the generation it was opened in, and the library
/// instance it belongs to.
struct WorkerState {
    inner: Arc<Inner>,
    session: Option<(Session, u64, u64)>,
}

impl WorkerState {
    fn run<T>(&mut self, op: &mut Op<T>) -> Result<T, Error> {
        #[cfg(feature = "insecure-test-hooks")]
        if let Some(d) = lock(&self.inner.stall_next).take() {
            std::thread::sleep(d);
        }
        for attempt in 0..2 {
            let generation = self.inner.generation.load(Ordering::Acquire);
            if !matches!(&self.session, Some((_, g, _)) if *g == generation) {
                self.session = None;
                match self.inner.open_session() {
                    Ok((s, instance)) => self.session = Some((s, generation, instance)),
                    Err(e) => {
                        self.inner.metrics.hsm_error(e.kind());
                        self.inner.request_probe();
                        return Err(e);
                    }
                }
            }
            let Some((session, _, instance)) = &self.session else {
                return Err(Error::Unavailable);
            };
            let token = TokenSession {
                session,
                handles: &self.inner.handles,
                instance: *instance,
            };
            let err = match op(&token) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            self.inner.metrics.hsm_error(err.kind());
            let class = match &err {
                Error::Pkcs11 { source, .. } => classify(source),
                Error::NotFound(_) | Error::WrongKey(_) => {
                    // A key we expect is missing, or another one signed: have the token checked.
                    self.inner.request_probe();
                    return Err(err);
                }
                _ => return Err(err),
            };
            // Discard the session after any PKCS#11 failure: a half-done operation would make
            // the next C_SignInit fail with CKR_OPERATION_ACTIVE.
            self.session = None;
            match class {
                FailureClass::Request => return Err(err),
                FailureClass::Session if attempt == 0 => {
                    self.inner.handles.invalidate_all();
                    tracing::warn!(error = %err, "token session failed; retrying on a new session");
                    continue;
                }
                FailureClass::Session | FailureClass::Device => {
                    self.inner.handles.invalidate_all();
                    self.inner.request_probe();
                    return Err(err);
                }
            }
        }
        Err(Error::Unavailable)
    }
}

fn spawn_worker(inner: &Arc<Inner>) {
    let busy_since = Arc::new(AtomicU64::new(0));
    let abandoned = Arc::new(AtomicBool::new(false));
    let (b, a, i) = (
        Arc::clone(&busy_since),
        Arc::clone(&abandoned),
        Arc::clone(inner),
    );
    let thread = std::thread::Builder::new()
        .name("hsm-worker".into())
        .spawn(move || worker_main(i, b, a));
    match thread {
        Ok(t) => lock(&inner.workers).push(WorkerSlot {
            busy_since,
            abandoned,
            thread: Some(t),
        }),
        Err(e) => tracing::error!(error = %e, "cannot spawn a token worker thread"),
    }
}

fn worker_main(inner: Arc<Inner>, busy_since: Arc<AtomicU64>, abandoned: Arc<AtomicBool>) {
    let mut state = WorkerState {
        inner: Arc::clone(&inner),
        session: None,
    };
    loop {
        if abandoned.load(Ordering::Acquire) {
            break;
        }
        let Some(queued) = inner.queue.pop_timeout(Duration::from_millis(200)) else {
            if inner.shutting_down.load(Ordering::Acquire) {
                break;
            }
            continue;
        };
        if let Some(tenant) = &queued.tenant {
            inner
                .metrics
                .token_queue_wait
                .with_label_values(&[tenant.as_str()])
                .observe(queued.since.elapsed().as_secs_f64());
        }
        let job = queued.item;
        let expired = Instant::now() >= job.deadline;
        busy_since.store(inner.now_ms(), Ordering::Release);
        inner.metrics.hsm_sessions_in_use.inc();
        (job.run)(&mut state, expired);
        inner.metrics.hsm_sessions_in_use.dec();
        busy_since.store(0, Ordering::Release);
    }
    // Dropping the session closes it.
    drop(state);
}

fn supervisor_main(inner: Arc<Inner>, keeper: Session) {
    let mut keeper = Some(keeper);
    let mut backoff = inner.health_interval;
    loop {
        {
            let (m, cv) = &inner.wake;
            let mut woken = lock(m);
            if !*woken {
                woken = cv
                    .wait_timeout(woken, backoff)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            *woken = false;
        }
        if inner.shutting_down.load(Ordering::Acquire) {
            break;
        }
        replace_stuck_workers(&inner);

        inner
            .supervisor_busy_since
            .store(inner.now_ms(), Ordering::Release);
        let healthy = keeper.as_ref().is_some_and(|k| probe(&inner, k));
        if !healthy {
            // Close the dead keeper before opening a new one.
            drop(keeper.take());
            inner.ready.store(false, Ordering::Release);
            inner.metrics.hsm_ready.set(0);
            keeper = recover(&inner);
        }
        inner.supervisor_busy_since.store(0, Ordering::Release);

        if keeper.is_some() {
            if !inner.ready.swap(true, Ordering::AcqRel) {
                tracing::info!("token available again");
            }
            inner.metrics.hsm_ready.set(1);
            backoff = inner.health_interval;
        } else {
            backoff = (backoff * 2).min((inner.health_interval * 16).min(Duration::from_secs(30)));
        }
    }
    drop(keeper);
}

/// Is the session logged in, is the watched key (if any) still in the token, and does the
/// token sign a random digest with the probe key so that the signature verifies?
fn probe(inner: &Inner, session: &Session) -> bool {
    // The probe uses no cached handle: instance 0 belongs to no library.
    let t = TokenSession {
        session,
        handles: &inner.handles,
        instance: 0,
    };
    if t.ping().is_err() {
        return false;
    }
    if let Some(id) = lock(&inner.probe_key).clone()
        && !matches!(t.has_private_key(&id), Ok(true))
    {
        return false;
    }
    let Some((id, public)) = lock(&inner.probe_signer).clone() else {
        return true;
    };
    let digest: [u8; 32] = rand::random();
    match t.sign_prehashed_checked(&id, &digest, &public) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "health probe: the token did not sign and verify a random digest");
            false
        }
    }
}

/// Relogin, then re-initialise; returns the new keeper session on success.
fn recover(inner: &Inner) -> Option<Session> {
    tracing::warn!(token = %inner.token_label, "token session lost; recovering");
    inner.handles.invalidate_all();
    inner.generation.fetch_add(1, Ordering::AcqRel);

    match inner.open_session() {
        Ok((s, _)) if probe(inner, &s) => {
            inner
                .metrics
                .hsm_recoveries
                .with_label_values(&["relogin", "ok"])
                .inc();
            tracing::info!("token recovered by opening a new session and logging in");
            return Some(s);
        }
        Ok(_) => {
            inner
                .metrics
                .hsm_recoveries
                .with_label_values(&["relogin", "failed"])
                .inc();
            tracing::warn!(
                "the token answers but lost its objects; re-initialising the PKCS#11 library"
            );
        }
        Err(e) => {
            inner
                .metrics
                .hsm_recoveries
                .with_label_values(&["relogin", "failed"])
                .inc();
            tracing::warn!(error = %e, "relogin failed; re-initialising the PKCS#11 library");
        }
    }

    if let Some(old) = lock(&inner.library).take() {
        let _ = old.ctx.finalize();
    }
    inner.generation.fetch_add(1, Ordering::AcqRel);
    match Library::open(&inner.module, &inner.token_label) {
        Ok(lib) => {
            *lock(&inner.library) = Some(lib);
            // Cleared after re-initialising too: nothing cached in the window survives.
            inner.handles.invalidate_all();
            match inner.open_session() {
                Ok((s, _)) if probe(inner, &s) => {
                    inner
                        .metrics
                        .hsm_recoveries
                        .with_label_values(&["reinitialize", "ok"])
                        .inc();
                    tracing::info!("token recovered by re-initialising the PKCS#11 library");
                    Some(s)
                }
                Ok(_) => {
                    inner
                        .metrics
                        .hsm_recoveries
                        .with_label_values(&["reinitialize", "failed"])
                        .inc();
                    tracing::error!("token objects still missing after re-initialisation");
                    None
                }
                Err(e) => {
                    inner
                        .metrics
                        .hsm_recoveries
                        .with_label_values(&["reinitialize", "failed"])
                        .inc();
                    tracing::error!(error = %e, "token still unavailable after re-initialisation");
                    None
                }
            }
        }
        Err(e) => {
            inner
                .metrics
                .hsm_recoveries
                .with_label_values(&["reinitialize", "failed"])
                .inc();
            tracing::error!(error = %e, "cannot re-initialise the PKCS#11 library");
            None
        }
    }
}

/// A worker busy far past the call deadline is wedged in the library: abandon it (it exits
/// when its call returns) and start a replacement so the pool keeps its size.
fn replace_stuck_workers(inner: &Arc<Inner>) {
    let limit = (inner.call_timeout * 2).as_millis() as u64;
    let now = inner.now_ms();
    let mut stuck = 0;
    {
        let mut workers = lock(&inner.workers);
        workers.retain_mut(|w| {
            let since = w.busy_since.load(Ordering::Acquire);
            if since != 0 && now.saturating_sub(since) > limit {
                w.abandoned.store(true, Ordering::Release);
                // The thread is detached; it exits after its call returns.
                w.thread.take();
                stuck += 1;
                false
            } else {
                true
            }
        });
    }
    for _ in 0..stuck {
        tracing::error!("a token call is stuck past twice its deadline; replacing its worker");
        inner.metrics.hsm_error("stuck_worker");
        spawn_worker(inner);
    }
}

/// Lock a mutex, recovering from poisoning (a panicked holder leaves plain data behind).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
