//! Use cases: authorize -> validate -> open/seal -> store with audit.
//!
//! Every use case is one [`call::Call`] (the audit entry being built), and
//! every path out of it, success or failure, goes through the call's
//! `finish`, `finish_write` or `commit`, which append the entry durably
//! before anything is returned. No proto types here.

mod access;
mod audit_log;
mod blind;
mod call;
pub mod checkpoints;
mod coverages;
mod erasure;
mod jobs;
mod keys;
mod patients;
mod reencrypt;
mod refusals;
mod rewrap;

use std::sync::Arc;
use std::time::Instant;

pub use access::{BreakGlassGrant, GrantPage, GrantReview, GrantsRequest, ReviewFilter};
pub use audit_log::{AuditFilter, AuditPage, ExportStart};
pub use blind::BlindIndexJob;
pub use call::{Input, Named, Parsed};
pub use coverages::{CoverageCreate, CoverageUpdate};
pub use erasure::{EraseRequest, Erasure};
pub use keys::{
    DEFAULT_KEY_CACHE, KeyManager, KeyOperation, KeyStatus, PendingKeyOperation, VersionStatus, VersionUse,
};
pub use patients::{PageRequest, PatientPage, PatientUpdate, SearchCriterion, SearchRequest, SearchResult};
pub use reencrypt::{ReencryptJob, ReencryptRequest};
pub use rewrap::{RewrapJob, RewrapRequest};

use crate::auth::limits::{Limited, Limits};
use crate::auth::policy::{Policy, Purpose};
use crate::auth::{AuthFailure, Principal};
use crate::clock::Clock;
use crate::crypto::{self, DataKey, RecordAad, RecordKind, WrappedDataKey};
use crate::domain::PatientId;
use crate::domain::plaintext::Plaintext;
use crate::error::AppError;
use crate::storage::{Head, RecordRef, StorageError, Store};

/// What a create did: made a record (to be written), or found the one an
/// earlier request with the same `x-idempotency-key` made.
enum Created<T> {
    New(T, crate::storage::RecordWrite),
    Replayed(T),
}

/// Who is calling and how, as seen at the edge.
pub struct CallContext {
    /// x-request-id from the client if well-formed, else generated.
    pub request_id: String,
    /// The peer's ip:port, or "".
    pub client_address: String,
    /// The token check's result.
    pub auth: Result<Principal, AuthFailure>,
    /// The calling service's client-certificate identity (mutual TLS), if any.
    pub service: Option<String>,
    /// `x-purpose-of-use`: absent, a known code, or present but not a known code (`Err`).
    pub purpose: Result<Option<Purpose>, ()>,
    /// `x-break-glass-reason`: absent, or printable text of 1..=1000 chars (`Err` otherwise).
    /// Never logged or audited in plaintext.
    pub break_glass_reason: Result<Option<String>, ()>,
    /// `x-idempotency-key`: absent, or 1..=255 visible ASCII characters (`Err` otherwise).
    pub idempotency_key: Result<Option<String>, ()>,
    /// A slot under the global concurrency cap, held for the whole call.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Whether the caller was admitted: the concurrency cap, then its rate
    /// (by subject, or by address without a valid token). Decided once, at
    /// the edge, before anything of the request is read.
    pub admission: Result<(), Limited>,
    /// When the call arrived (for latency logs).
    pub started: Instant,
    /// An operator at the machine running an offline `carevault keys` command
    /// on a stopped data directory: holds the key_admin role whatever the
    /// policy says (they hold the key files already), and nothing else.
    pub local_operator: bool,
}

impl CallContext {
    /// The context of an offline key command run by `user` on this machine
    /// (audited as actor `offline:<user>`, address `local`).
    pub fn offline(user: &str) -> CallContext {
        CallContext {
            request_id: uuid::Uuid::now_v7().to_string(),
            client_address: "local".into(),
            auth: Ok(Principal { subject: format!("offline:{user}"), token_roles: Vec::new() }),
            service: None,
            purpose: Ok(None),
            break_glass_reason: Ok(None),
            idempotency_key: Ok(None),
            permit: None,
            admission: Ok(()),
            started: Instant::now(),
            local_operator: true,
        }
    }

    /// True when the caller was admitted and authenticated: only then does
    /// the edge read the request.
    pub fn admitted(&self) -> bool {
        self.admission.is_ok() && self.auth.is_ok()
    }

    /// What an `x-idempotency-key` is remembered under: SHA-256 of
    /// `"carevault/v1/idempotency\0"` ‖ what is created (`patient`,
    /// `coverage`) ‖ `"\0"` ‖ the caller's subject ‖ `"\0"` ‖ the key, so one
    /// caller's key never finds another's create, nor another kind of record.
    fn idempotency_hash(&self, kind: RecordKind) -> Option<[u8; 32]> {
        let key = self.idempotency_key.as_ref().ok()?.as_ref()?;
        let subject = self.subject()?;
        let mut input = b"carevault/v1/idempotency\0".to_vec();
        input.extend_from_slice(match kind {
            RecordKind::Patient => b"patient\0",
            RecordKind::Coverage => b"coverage\0",
        });
        input.extend_from_slice(subject.as_bytes());
        input.push(0);
        input.extend_from_slice(key.as_bytes());
        Some(crate::crypto::sha256(&input))
    }

    fn subject(&self) -> Option<&str> {
        self.auth.as_ref().ok().map(|p| p.subject.as_str())
    }

    fn purpose(&self) -> Option<Purpose> {
        self.purpose.ok().flatten()
    }
}

/// A record opened from storage, with the data key that opened it (so a
/// write that follows can seal with it without unwrapping the key again).
pub(super) struct Opened<T> {
    record: T,
    patient: PatientId,
    dek: DataKey,
    key_version: u32,
}

/// How long to wait before each new read of a record that failed to open.
/// A re-encryption commit replaces a patient's key and reseals its records
/// in one commit, but sled readers do not wait for a batch being written:
/// for as long as the batch takes, a reader may find a record and a key of
/// different generations. A record that still fails after these is reported
/// as DATA_LOSS.
const REOPEN_WAITS: [std::time::Duration; 3] =
    [std::time::Duration::from_micros(0), std::time::Duration::from_millis(2), std::time::Duration::from_millis(10)];

/// Runs `once` again while it fails with DATA_LOSS, after each of
/// [`REOPEN_WAITS`]; then its last answer.
async fn reading_again<T, Fut>(mut once: impl FnMut() -> Fut) -> Result<T, AppError>
where
    Fut: std::future::Future<Output = Result<T, AppError>>,
{
    for wait in REOPEN_WAITS {
        match once().await {
            Err(AppError::DataLoss) => tokio::time::sleep(wait).await,
            other => return other,
        }
    }
    once().await
}

/// A record's current state as read from the store (or a patient's
/// coverages, `N`), and the key cache's epoch and the erasure bucket keys
/// taken just before the read.
pub(super) struct Fetched<N = crate::storage::Current> {
    epoch: u64,
    shreds: Arc<crypto::ShredKeys>,
    now: N,
}

impl<N: Locked> Fetched<N> {
    /// The patient whose record (or coverages) it is.
    pub(super) fn patient(&self) -> [u8; 16] {
        self.now.patient()
    }

    /// Since when the patient is restricted, if it is.
    pub(super) fn restricted_since(&self) -> Option<i64> {
        self.now.restricted_since()
    }
}

/// What was read together with a patient's wrapped data key, to be opened with it.
pub(super) trait Locked {
    /// The patient whose key it is.
    fn patient(&self) -> [u8; 16];
    /// The wrapped key, taken out (`None` if the store had none).
    fn take_wrapped_key(&mut self) -> Option<Vec<u8>>;
    /// Since when the patient is restricted, if it is.
    fn restricted_since(&self) -> Option<i64>;
}

impl Locked for crate::storage::Current {
    fn patient(&self) -> [u8; 16] {
        self.head.patient_id
    }
    fn take_wrapped_key(&mut self) -> Option<Vec<u8>> {
        self.wrapped_key.take()
    }
    fn restricted_since(&self) -> Option<i64> {
        self.restricted_since
    }
}

impl Locked for crate::storage::CoveragesNow {
    fn patient(&self) -> [u8; 16] {
        self.patient
    }
    fn take_wrapped_key(&mut self) -> Option<Vec<u8>> {
        self.wrapped_key.take()
    }
    fn restricted_since(&self) -> Option<i64> {
        self.restricted_since
    }
}

/// Access-control parts of the application.
pub struct AccessControl {
    /// Roles and permissions.
    pub policy: Policy,
    /// Rate and concurrency limits.
    pub limits: Limits,
    /// How long a break-glass grant lasts, microseconds.
    pub break_glass_micros: i64,
}

/// The application: storage, keys, sequencer, clock and access control.
#[derive(Clone)]
pub struct App {
    store: Store,
    keys: Arc<KeyManager>,
    clock: Arc<dyn Clock>,
    access: Arc<AccessControl>,
    /// Held while a rewrap job runs, so only one runs at a time.
    rewrap_lock: Arc<tokio::sync::Mutex<()>>,
    /// Held by an erasure (and by finishing interrupted ones): one at a time.
    erase_lock: Arc<tokio::sync::Mutex<()>>,
    /// Held while a re-encryption job runs.
    reencrypt_lock: Arc<tokio::sync::Mutex<()>>,
    /// Held while a blind-index rotation runs.
    blind_lock: Arc<tokio::sync::Mutex<()>>,
    /// Set at shutdown: background jobs stop after their current batch.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// Wakes what waits for the stop (the job watcher), so it lets go of the app at once.
    stopped: Arc<tokio::sync::Notify>,
    /// Refused calls being counted into shared entries.
    refusals: Arc<refusals::Refusals>,
    /// Held by rotate, retire and destroy from their intent to their completion.
    key_op_lock: Arc<tokio::sync::Mutex<()>>,
    /// This process's id among the processes on one store (job leases).
    process_id: Arc<String>,
    /// Signs the audit log's checkpoints.
    checkpoints: Arc<checkpoints::Checkpointer>,
}

impl App {
    /// Assembles the application from its parts.
    pub fn new(store: Store, keys: KeyManager, clock: Arc<dyn Clock>, access: AccessControl) -> Self {
        App {
            store,
            keys: Arc::new(keys),
            clock,
            access: Arc::new(access),
            rewrap_lock: Arc::new(tokio::sync::Mutex::new(())),
            erase_lock: Arc::new(tokio::sync::Mutex::new(())),
            reencrypt_lock: Arc::new(tokio::sync::Mutex::new(())),
            blind_lock: Arc::new(tokio::sync::Mutex::new(())),
            stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            stopped: Arc::new(tokio::sync::Notify::new()),
            refusals: Arc::new(refusals::Refusals::default()),
            key_op_lock: Arc::new(tokio::sync::Mutex::new(())),
            checkpoints: Arc::new(checkpoints::Checkpointer::new(checkpoints::CheckpointPolicy::default())),
            process_id: Arc::new(uuid::Uuid::new_v4().to_string()),
        }
    }

    /// Signs checkpoints by `policy` (instead of the default: every 1,000 entries or second).
    pub fn with_checkpoint_policy(mut self, policy: checkpoints::CheckpointPolicy) -> Self {
        self.checkpoints = Arc::new(checkpoints::Checkpointer::new(policy));
        self
    }

    /// Waits until no background job runs (after [`App::stop_jobs`]).
    pub async fn wait_jobs(&self) {
        let _ = self.rewrap_lock.lock().await;
        let _ = self.reencrypt_lock.lock().await;
        let _ = self.blind_lock.lock().await;
    }

    /// Sleeps for `d`, or until the server stops; false if it is stopping.
    pub async fn sleep_unless_stopped(&self, d: std::time::Duration) -> bool {
        // Registered before the flag is read, so a stop in between still wakes it.
        let stopped = self.stopped.notified();
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        tokio::select! {
            () = stopped => false,
            () = tokio::time::sleep(d) => true,
        }
    }

    /// Asks background jobs to stop after their current batch (shutdown).
    pub fn stop_jobs(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        self.stopped.notify_waiters();
    }

    /// The limits (the edge takes concurrency permits from them).
    pub fn limits(&self) -> &Limits {
        &self.access.limits
    }

    /// The store (read-only use by the edge for exports).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn now(&self) -> i64 {
        self.clock.now_micros()
    }

    /// Loads and unwraps a patient's data key.
    async fn data_key(&self, patient: PatientId) -> Result<(DataKey, u32), AppError> {
        let mut attempts = 0;
        loop {
            // The bucket keys are taken before the wrapped key is read: an
            // erasure in the same bucket may move the key to a newer
            // generation in between, which a second read then finds.
            let (epoch, shreds) = (self.keys.data_keys.epoch(), self.keys.shreds());
            let wrapped = match self.store.data_key(patient.bytes()).await.map_err(internal)? {
                Some(w) => WrappedDataKey(w),
                None => return Err(self.missing(RecordRef::patient(patient.bytes())).await),
            };
            match self.unwrap_key(epoch, &shreds, patient.bytes(), &wrapped) {
                Err(e) => self.unwrap_failed(e, &mut attempts).await?,
                Ok(key) => return Ok(key),
            }
        }
    }

    /// A record's current state read from the store, with the keys to open
    /// it taken before the read (as in `data_key`); `None` if it does not exist.
    async fn fetch(&self, record: RecordRef) -> Result<Option<Fetched>, AppError> {
        self.stamped(self.store.current(record)).await
    }

    /// What `read` (not yet started) finds, with the key cache's epoch and
    /// the erasure bucket keys taken just before it reads.
    async fn stamped<N>(
        &self,
        read: impl std::future::Future<Output = Result<Option<N>, StorageError>>,
    ) -> Result<Option<Fetched<N>>, AppError> {
        let (epoch, shreds) = (self.keys.data_keys.epoch(), self.keys.shreds());
        let now = read.await.map_err(internal)?;
        Ok(now.map(|now| Fetched { epoch, shreds, now }))
    }

    /// A record's current version, sealed, with its patient's data key: one
    /// store lookup (see `Backend::current`) unless a state already fetched
    /// is given, and no unwrap if the key is cached.
    async fn current_from(
        &self,
        record: RecordRef,
        fetched: Option<Fetched>,
    ) -> Result<(Head, Vec<u8>, DataKey, u32), AppError> {
        let (now, dek, version) = self.unlocked(fetched, || self.fetch(record), record).await?;
        let sealed = now.sealed.ok_or(AppError::DataLoss)?;
        Ok((now.head, sealed, dek, version))
    }

    /// What was fetched (or what `fetch` reads, if nothing was), with its
    /// patient's data key unwrapped and the master version wrapping it. A key
    /// this process cannot unwrap yet makes it take up the stored key state
    /// (see `unwrap_failed`) and fetch again. Nothing fetched is `record`
    /// missing; no key, its patient missing.
    async fn unlocked<N: Locked, Fut>(
        &self,
        mut fetched: Option<Fetched<N>>,
        fetch: impl Fn() -> Fut,
        record: RecordRef,
    ) -> Result<(N, DataKey, u32), AppError>
    where
        Fut: std::future::Future<Output = Result<Option<Fetched<N>>, AppError>>,
    {
        let mut attempts = 0;
        loop {
            let f = match fetched.take() {
                Some(f) => Some(f),
                None => fetch().await?,
            };
            let Some(mut f) = f else { return Err(self.missing(record).await) };
            let patient = f.now.patient();
            let Some(wrapped) = f.now.take_wrapped_key().map(WrappedDataKey) else {
                return Err(self.missing(RecordRef::patient(patient)).await);
            };
            match self.unwrap_key(f.epoch, &f.shreds, patient, &wrapped) {
                Err(e) => self.unwrap_failed(e, &mut attempts).await?,
                Ok((dek, version)) => return Ok((f.now, dek, version)),
            }
        }
    }

    /// A patient's data key from the cache, or unwrapped (and cached), with
    /// the master version that wraps it.
    fn unwrap_key(
        &self,
        epoch: u64,
        shreds: &crypto::ShredKeys,
        patient: [u8; 16],
        wrapped: &WrappedDataKey,
    ) -> Result<(DataKey, u32), crypto::CryptoError> {
        let version = wrapped.master_version().map_err(|_| crypto::CryptoError::Malformed)?;
        if let Some(dek) = self.keys.data_keys.get(&patient, wrapped) {
            return Ok((dek, version));
        }
        let dek = self.keys.ring().unwrap_data_key(&patient, wrapped, shreds)?;
        self.keys.data_keys.put(epoch, patient, wrapped, &dek);
        Ok((dek, version))
    }

    /// After a data key failed to unwrap: if it is wrapped under keys this
    /// process does not have yet (a key operation or an erasure through
    /// another process moved the key state, or, in the same bucket, an
    /// erasure here did), takes up the stored key state so the caller can
    /// read again, up to three times; otherwise the failure.
    async fn unwrap_failed(&self, e: crypto::CryptoError, attempts: &mut u32) -> Result<(), AppError> {
        match e {
            crypto::CryptoError::UnknownErasureKey(..) | crypto::CryptoError::UnknownKeyVersion(_) if *attempts < 3 => {
                *attempts += 1;
                self.refresh_keys().await?;
                Ok(())
            }
            e => Err(crypto_failure(e)),
        }
    }

    /// NOT_FOUND for a record that does not exist, or "erased" for one that was crypto-shredded.
    async fn missing(&self, record: RecordRef) -> AppError {
        let what = match record.kind {
            RecordKind::Patient => "patient",
            RecordKind::Coverage => "coverage",
        };
        match self.store.tombstone(record).await {
            Ok(Some(_)) => AppError::Erased(what),
            Ok(None) => AppError::NotFound(what),
            Err(e) => internal(e),
        }
    }

    /// Opens one stored version of a record and decodes its plaintext (either format).
    fn open<T: Plaintext>(&self, dek: &DataKey, aad: &RecordAad, sealed: &[u8]) -> Result<T, AppError> {
        let plain = zeroize::Zeroizing::new(crypto::open_record(dek, aad, sealed).map_err(crypto_failure)?);
        T::from_plaintext(&plain).map_err(|e| {
            tracing::error!(error = %e, "opened record failed to decode");
            AppError::DataLoss
        })
    }

    /// Encodes a record version (format 2) and seals it.
    fn seal<T: Plaintext>(&self, dek: &DataKey, aad: &RecordAad, value: &T) -> Result<Vec<u8>, AppError> {
        let plain = value.to_plaintext().map_err(|e| {
            tracing::error!(error = %e, "record failed to encode");
            AppError::Internal
        })?;
        crypto::seal_record(dek, aad, &plain).map_err(crypto_failure)
    }

    /// Calls `visit` with every wrapped data key after `after` (by patient
    /// id), page by page, until it returns false or the keys run out.
    async fn scan_data_keys(
        &self,
        after: Option<[u8; 16]>,
        mut visit: impl FnMut([u8; 16], Vec<u8>) -> Result<bool, AppError>,
    ) -> Result<(), AppError> {
        const PAGE: usize = 1024;
        let mut after = after;
        loop {
            let page = self.store.data_keys_after(after, PAGE).await.map_err(internal)?;
            let done = page.len() < PAGE;
            for (patient, wrapped) in page {
                after = Some(patient);
                if !visit(patient, wrapped)? {
                    return Ok(());
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    /// A record's current head.
    async fn head(&self, record: RecordRef) -> Result<Option<Head>, AppError> {
        self.store.head(record).await.map_err(internal)
    }

    /// A record's current head, or NOT_FOUND (or "erased") if there is none.
    async fn existing(&self, record: RecordRef) -> Result<Head, AppError> {
        match self.head(record).await? {
            Some(h) => Ok(h),
            None => Err(self.missing(record).await),
        }
    }
}

/// A job cursor (the hex of a patient id) as the id.
fn cursor_id(cursor: &str) -> Result<[u8; 16], AppError> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(cursor, &mut id).map_err(|_| AppError::DataLoss)?;
    Ok(id)
}

fn internal(e: StorageError) -> AppError {
    tracing::error!(error = %e, "storage read failed");
    AppError::Internal
}

fn crypto_failure(e: crypto::CryptoError) -> AppError {
    match e {
        crypto::CryptoError::Random => {
            tracing::error!("random generator failed");
            AppError::Internal
        }
        other => {
            tracing::error!(error = %other, "stored ciphertext failed to open");
            AppError::DataLoss
        }
    }
}

/// A collection length as an audit count (lossless on every supported platform).
fn count(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Blocking work (bulk decryption) off the async executor, keeping the span.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, AppError> + Send + 'static) -> Result<T, AppError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f)).await.map_err(|_| AppError::Internal)?
}
