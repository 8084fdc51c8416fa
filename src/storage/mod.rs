//! The storage seam: typed reads ([`Backend`]) and typed changes committed
//! with their audit entries ([`sequencer`]), named without any engine.
//!
//! Storage holds only ciphertext, HMAC blind indexes, UUIDs, version numbers
//! and audit entries (which hold identifiers, never PHI). Every change goes
//! through the sequencer, which commits it with its audit entry (all or
//! nothing, across a crash) and makes both durable before anyone is
//! answered.
//!
//! - [`model`]: what is stored: records, heads, index keys, access state,
//!   jobs, and the typed [`model::Change`]s with their preconditions;
//! - [`sequencer`]: batching, planning and chaining, the same for every engine;
//! - [`sled`]: the embedded engine (its layout, crash-recoverable writes and
//!   recovery are its own);
//! - [`postgres`]: PostgreSQL, shared by several processes (one transaction
//!   per batch under the chain head's row lock).
//!
//! Above this module nothing names a tree, a key byte or an engine type: the
//! app sees a [`Store`], which reads through [`Backend`] and commits through
//! its [`Sequencer`].

#[cfg(test)]
pub(crate) mod conformance;
pub mod model;
pub mod postgres;
pub mod sequencer;
pub mod sled;
pub mod tree;

use std::path::{Path, PathBuf};
use std::sync::Arc;
#[cfg(feature = "testing")]
use std::sync::atomic::AtomicBool;

pub use model::{
    Change, CoverageNow, CoveragesNow, Current, Expect, Footprint, Head, IndexKey, JobName, Keyed, RecordRef,
    RecordWrite, StoredAuditEntry, StoredCheckpoint,
};
pub use sequencer::{Commit, CommitOutcome, Committed, Expected, Sequencer};
pub use sled::Recovery;

use crate::clock::Clock;
use crate::crypto::RecordKind;

/// Storage failures. Messages carry no PHI (engine errors may name files;
/// they are logged, never sent to clients).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database or the disk failed.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// Stored bytes are not in the expected layout.
    #[error("storage corrupt: {0}")]
    Corrupt(&'static str),
    /// The sequencer has stopped (shutting down).
    #[error("audit sequencer unavailable")]
    SequencerGone,
    /// Something to be written does not fit its format (an over-long audit
    /// entry field, a length beyond u32); nothing of it was written.
    #[error("cannot encode for storage: {0}")]
    Unencodable(String),
    /// Another process (a running server) has the database open.
    #[error("the database is in use by another process (is a carevault server running on this data directory?)")]
    Locked,
    /// The database was sent a commit and never confirmed it (the
    /// connection dropped): it may or may not have been made.
    #[error("commit outcome unknown: the database did not confirm it")]
    OutcomeUnknown,
    /// The store location (`--store`) cannot be used as given.
    #[error("store: {0}")]
    BadLocation(String),
    /// The database holds no carevault schema (an offline tool found nothing to read).
    #[error("the database holds no carevault schema (run `carevault init --store ...` or `serve` first)")]
    NotInitialized,
    /// The database's schema is newer than this binary's.
    #[error(
        "the database's schema is version {found}, newer than the {known} this carevault knows: upgrade carevault before using this database"
    )]
    SchemaTooNew {
        /// Found in the database.
        found: i32,
        /// The newest this binary knows.
        known: i32,
    },
    /// The database's schema is older than this binary's and this tool does not migrate.
    #[error(
        "the database's schema is version {found}, older than this carevault's {known}: start `carevault serve` (or `init`) once to migrate it"
    )]
    SchemaTooOld {
        /// Found in the database.
        found: i32,
        /// This binary's.
        known: i32,
    },
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}

/// Typed reads, the same for every engine. Pages come in a fixed order
/// (records: patients before coverages, then by id; everything else by id)
/// and continue strictly after `after`.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// A record's current head.
    async fn head(&self, record: RecordRef) -> Result<Option<Head>, StorageError>;
    /// One stored version's ciphertext.
    async fn record_version(&self, record: RecordRef, version: u64) -> Result<Option<Vec<u8>>, StorageError>;
    /// A record's head with the sealed version it names, its patient's
    /// wrapped data key and its patient's restriction: what reading a record
    /// needs, in one lookup where the engine can (PostgreSQL: one query, one
    /// snapshot). Engines write a version and its data key before the head
    /// that names them, so reading the head first never finds it naming what
    /// is not there yet.
    async fn current(&self, record: RecordRef) -> Result<Option<Current>, StorageError>;
    /// Every stored version of a record, oldest first.
    async fn versions(&self, record: RecordRef) -> Result<Vec<(u64, Vec<u8>)>, StorageError>;
    /// Up to `limit` heads after `after`, of `kind` only if given.
    async fn heads_after(
        &self,
        kind: Option<RecordKind>,
        after: Option<RecordRef>,
        limit: usize,
    ) -> Result<Vec<(RecordRef, Head)>, StorageError>;
    /// How many records (patients and coverages) exist.
    async fn count_records(&self) -> Result<u64, StorageError>;
    /// The ids of a patient's coverages.
    async fn coverages_of(&self, patient: [u8; 16]) -> Result<Vec<[u8; 16]>, StorageError>;
    /// A patient's coverages, each at its current version and sealed, with
    /// the patient's version, wrapped data key and restriction: what listing
    /// them needs, in one lookup where the engine can (PostgreSQL: one
    /// query). `None` if the patient does not exist. A coverage whose head
    /// is not there yet (a create being written) is left out.
    async fn coverages_now(&self, patient: [u8; 16]) -> Result<Option<CoveragesNow>, StorageError>;
    /// What an erasure of the patient would remove.
    async fn footprint(&self, patient: [u8; 16]) -> Result<Footprint, StorageError>;

    /// A patient's wrapped data key.
    async fn data_key(&self, patient: [u8; 16]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Up to `limit` wrapped data keys after `after`, by patient id.
    async fn data_keys_after(&self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<Keyed>, StorageError>;
    /// How many data keys exist.
    async fn count_data_keys(&self) -> Result<u64, StorageError>;

    /// Distinct patients with an index entry of `tag` for `mac`, up to `limit`.
    async fn blind_lookup(&self, tag: u8, mac: [u8; 16], limit: usize) -> Result<Vec<[u8; 16]>, StorageError>;
    /// A record's index entries.
    async fn index_set(&self, record: RecordRef) -> Result<Option<Vec<IndexKey>>, StorageError>;
    /// Up to `limit` records' index entries after `after`.
    async fn index_sets_after(
        &self,
        after: Option<RecordRef>,
        limit: usize,
    ) -> Result<Vec<(RecordRef, Vec<IndexKey>)>, StorageError>;
    /// How many index entries each slot holds.
    async fn index_entries_per_slot(&self) -> Result<[u64; 2], StorageError>;

    /// Since when a patient is restricted, if it is.
    async fn restricted_since(&self, patient: [u8; 16]) -> Result<Option<i64>, StorageError>;
    /// Since when a patient is under a legal hold, if it is.
    async fn legal_hold_since(&self, patient: [u8; 16]) -> Result<Option<i64>, StorageError>;
    /// A break-glass grant.
    async fn grant(&self, id: [u8; 16]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Up to `limit` grants after `after`, by id.
    async fn grants_after(&self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<Keyed>, StorageError>;
    /// A subject's latest grant for a patient: its id and expiry.
    async fn active_grant(&self, subject: [u8; 32], patient: [u8; 16])
    -> Result<Option<([u8; 16], i64)>, StorageError>;
    /// A record's erasure tombstone.
    async fn tombstone(&self, record: RecordRef) -> Result<Option<Vec<u8>>, StorageError>;
    /// Up to `limit` tombstones of records of `kind` after `after`, by id.
    async fn tombstones_after(
        &self,
        kind: RecordKind,
        after: Option<[u8; 16]>,
        limit: usize,
    ) -> Result<Vec<Keyed>, StorageError>;
    /// A job's state.
    async fn job(&self, name: JobName) -> Result<Option<Vec<u8>>, StorageError>;
    /// The record a create made under an idempotency key, if it is remembered.
    async fn idempotent(&self, key: [u8; 32]) -> Result<Option<RecordRef>, StorageError>;

    /// The newest audit entry's sequence and stored hash.
    async fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StorageError>;
    /// Up to `limit` audit entries from `from` through `to`, in sequence order.
    async fn audit_entries(&self, from: u64, to: u64, limit: usize) -> Result<Vec<StoredAuditEntry>, StorageError>;
    /// Up to `limit` sequences of entries naming `patient`, from `from` on, in order.
    async fn audit_seqs_for_patient(
        &self,
        patient: [u8; 16],
        from: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StorageError>;

    /// The Merkle tree's size: the number of entries whose subtrees are
    /// stored (every committed entry's; see [`tree`]).
    async fn tree_size(&self) -> Result<u64, StorageError>;
    /// Stored subtree hashes (each of height [`tree::STORED_FROM_LEVEL`] or
    /// more), in the order asked; `None` for one not stored.
    async fn tree_nodes(&self, ids: &[crate::audit::merkle::NodeId]) -> Result<Vec<Option<[u8; 32]>>, StorageError>;

    /// The checkpoint of `size`, or the latest (largest) one.
    async fn checkpoint(&self, size: Option<u64>) -> Result<Option<StoredCheckpoint>, StorageError>;
    /// Up to `limit` checkpoints of sizes above `after`, by size.
    async fn checkpoints_after(&self, after: Option<u64>, limit: usize) -> Result<Vec<StoredCheckpoint>, StorageError>;
    /// Up to `limit` checkpoints that carry at least one cosignature, of
    /// sizes below `before` (any size if `None`), newest first: where a reader
    /// that requires witnesses looks.
    async fn cosigned_checkpoints(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredCheckpoint>, StorageError>;
    /// Stores a signed checkpoint durably, unless one of its size is stored
    /// (then false). Checkpoints are written beside the chain, not through
    /// the sequencer: they change nothing, they sign what it holds.
    async fn save_checkpoint(&self, size: u64, note: &[u8], signed_micros: i64) -> Result<bool, StorageError>;
    /// Stores a witness's cosignature line of the checkpoint of `size`
    /// durably, replacing that witness key's earlier one for that size.
    async fn save_cosignature(
        &self,
        size: u64,
        witness: &str,
        key_id: [u8; 4],
        line: &str,
        now_micros: i64,
    ) -> Result<(), StorageError>;

    /// Whether the store is this process's alone while it is open (sled
    /// locks its directory); false where several processes share it.
    fn exclusive(&self) -> bool {
        false
    }

    /// After an erasure: lets the engine reclaim the space of what was
    /// removed (PostgreSQL: VACUUM, in the background). Nothing to do by default.
    async fn reclaim_erased(&self) {}

    /// What the engine keeps of deleted rows beyond carevault's reach, said
    /// to whoever erases a patient (none by default).
    fn erasure_caveat(&self) -> Option<&'static str> {
        None
    }
}

/// One audit entry by sequence.
pub async fn audit_entry(b: &dyn Backend, seq: u64) -> Result<Option<StoredAuditEntry>, StorageError> {
    Ok(b.audit_entries(seq, seq, 1).await?.into_iter().next())
}

#[async_trait::async_trait]
impl Backend for sled::SledStore {
    async fn head(&self, record: RecordRef) -> Result<Option<Head>, StorageError> {
        sled::SledStore::head(self, record)
    }
    async fn record_version(&self, record: RecordRef, version: u64) -> Result<Option<Vec<u8>>, StorageError> {
        sled::SledStore::record_version(self, record, version)
    }
    async fn current(&self, record: RecordRef) -> Result<Option<Current>, StorageError> {
        sled::SledStore::current(self, record)
    }
    async fn versions(&self, record: RecordRef) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        sled::SledStore::versions(self, record)
    }
    async fn heads_after(
        &self,
        kind: Option<RecordKind>,
        after: Option<RecordRef>,
        limit: usize,
    ) -> Result<Vec<(RecordRef, Head)>, StorageError> {
        sled::SledStore::heads_after(self, kind, after, limit)
    }
    async fn count_records(&self) -> Result<u64, StorageError> {
        Ok(sled::SledStore::count_records(self))
    }
    async fn coverages_of(&self, patient: [u8; 16]) -> Result<Vec<[u8; 16]>, StorageError> {
        sled::SledStore::coverages_of(self, &patient)
    }
    async fn coverages_now(&self, patient: [u8; 16]) -> Result<Option<CoveragesNow>, StorageError> {
        sled::SledStore::coverages_now(self, &patient)
    }
    async fn footprint(&self, patient: [u8; 16]) -> Result<Footprint, StorageError> {
        sled::SledStore::footprint(self, &patient)
    }
    async fn data_key(&self, patient: [u8; 16]) -> Result<Option<Vec<u8>>, StorageError> {
        sled::SledStore::data_key(self, &patient)
    }
    async fn data_keys_after(&self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<Keyed>, StorageError> {
        sled::SledStore::data_keys_after(self, after, limit)
    }
    async fn count_data_keys(&self) -> Result<u64, StorageError> {
        Ok(sled::SledStore::count_data_keys(self))
    }
    async fn blind_lookup(&self, tag: u8, mac: [u8; 16], limit: usize) -> Result<Vec<[u8; 16]>, StorageError> {
        sled::SledStore::blind_lookup(self, tag, &mac, limit)
    }
    async fn index_set(&self, record: RecordRef) -> Result<Option<Vec<IndexKey>>, StorageError> {
        sled::SledStore::index_set(self, record)
    }
    async fn index_sets_after(
        &self,
        after: Option<RecordRef>,
        limit: usize,
    ) -> Result<Vec<(RecordRef, Vec<IndexKey>)>, StorageError> {
        sled::SledStore::index_sets_after(self, after, limit)
    }
    async fn index_entries_per_slot(&self) -> Result<[u64; 2], StorageError> {
        sled::SledStore::index_entries_per_slot(self)
    }
    async fn restricted_since(&self, patient: [u8; 16]) -> Result<Option<i64>, StorageError> {
        sled::SledStore::restricted_since(self, &patient)
    }
    async fn legal_hold_since(&self, patient: [u8; 16]) -> Result<Option<i64>, StorageError> {
        sled::SledStore::legal_hold_since(self, &patient)
    }
    async fn grant(&self, id: [u8; 16]) -> Result<Option<Vec<u8>>, StorageError> {
        sled::SledStore::grant(self, &id)
    }
    async fn grants_after(&self, after: Option<[u8; 16]>, limit: usize) -> Result<Vec<Keyed>, StorageError> {
        sled::SledStore::grants_after(self, after, limit)
    }
    async fn active_grant(
        &self,
        subject: [u8; 32],
        patient: [u8; 16],
    ) -> Result<Option<([u8; 16], i64)>, StorageError> {
        sled::SledStore::active_grant(self, &subject, &patient)
    }
    async fn tombstone(&self, record: RecordRef) -> Result<Option<Vec<u8>>, StorageError> {
        sled::SledStore::tombstone(self, record)
    }
    async fn tombstones_after(
        &self,
        kind: RecordKind,
        after: Option<[u8; 16]>,
        limit: usize,
    ) -> Result<Vec<Keyed>, StorageError> {
        sled::SledStore::tombstones_after(self, kind, after, limit)
    }
    async fn job(&self, name: JobName) -> Result<Option<Vec<u8>>, StorageError> {
        sled::SledStore::job(self, name)
    }
    async fn idempotent(&self, key: [u8; 32]) -> Result<Option<RecordRef>, StorageError> {
        sled::SledStore::idempotent(self, &key)
    }
    async fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StorageError> {
        self.audit_head_sync()
    }
    async fn audit_entries(&self, from: u64, to: u64, limit: usize) -> Result<Vec<StoredAuditEntry>, StorageError> {
        sled::SledStore::audit_entries(self, from, to, limit)
    }
    async fn audit_seqs_for_patient(
        &self,
        patient: [u8; 16],
        from: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StorageError> {
        sled::SledStore::audit_seqs_for_patient(self, &patient, from, limit)
    }
    async fn tree_size(&self) -> Result<u64, StorageError> {
        Ok(self.tree_size_sync())
    }
    async fn tree_nodes(&self, ids: &[crate::audit::merkle::NodeId]) -> Result<Vec<Option<[u8; 32]>>, StorageError> {
        self.tree_nodes_sync(ids)
    }
    async fn checkpoint(&self, size: Option<u64>) -> Result<Option<StoredCheckpoint>, StorageError> {
        self.checkpoint_sync(size)
    }
    async fn checkpoints_after(&self, after: Option<u64>, limit: usize) -> Result<Vec<StoredCheckpoint>, StorageError> {
        self.checkpoints_after_sync(after, limit)
    }
    async fn cosigned_checkpoints(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredCheckpoint>, StorageError> {
        self.cosigned_checkpoints_sync(before, limit)
    }
    async fn save_checkpoint(&self, size: u64, note: &[u8], signed_micros: i64) -> Result<bool, StorageError> {
        let (me, note) = (self.clone(), note.to_vec());
        tokio::task::spawn_blocking(move || me.save_checkpoint_sync(size, &note, signed_micros))
            .await
            .map_err(|_| StorageError::Io("checkpoint writer stopped".into()))?
    }
    async fn save_cosignature(
        &self,
        size: u64,
        witness: &str,
        key_id: [u8; 4],
        line: &str,
        now_micros: i64,
    ) -> Result<(), StorageError> {
        let (me, witness, line) = (self.clone(), witness.to_string(), line.to_string());
        tokio::task::spawn_blocking(move || me.save_cosignature_sync(size, &witness, key_id, &line, now_micros))
            .await
            .map_err(|_| StorageError::Io("checkpoint writer stopped".into()))?
    }
    fn exclusive(&self) -> bool {
        true
    }
}

/// An opened store: its reads and its sequencer. Cloning shares both.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    sequencer: Sequencer,
    recovered: Recovery,
}

impl Store {
    /// A store reading through `backend` and committing through
    /// `sequencer`; opening it repaired `recovered`.
    pub fn new(backend: Arc<dyn Backend>, sequencer: Sequencer, recovered: Recovery) -> Store {
        Store { backend, sequencer, recovered }
    }

    /// What opening the store repaired (nothing for a clean store).
    pub fn recovery(&self) -> Recovery {
        self.recovered
    }

    /// Commits an entry (with its write and changes) durably.
    pub async fn commit(&self, commit: Commit) -> Result<Committed, StorageError> {
        self.sequencer.commit(commit).await
    }

    /// Counts a commit as on its way (see [`Sequencer::expect`]).
    pub fn expect_commit(&self) -> Expected {
        self.sequencer.expect()
    }

    /// Commits, as [`Store::commit`], a commit `expected` already counts.
    pub async fn commit_expected(&self, commit: Commit, expected: Expected) -> Result<Committed, StorageError> {
        self.sequencer.commit_expected(commit, expected).await
    }

    /// The commit pipeline (sync counts, failure state).
    pub fn sequencer(&self) -> &Sequencer {
        &self.sequencer
    }

    /// One audit entry by sequence.
    pub async fn audit_entry(&self, seq: u64) -> Result<Option<StoredAuditEntry>, StorageError> {
        audit_entry(self.backend.as_ref(), seq).await
    }
}

/// The store's reads.
impl std::ops::Deref for Store {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        self.backend.as_ref()
    }
}

/// Where the store is (`--store` / `CAREVAULT_STORE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// sled, in this directory (by default `db` under the data directory).
    Sled(PathBuf),
    /// PostgreSQL, at this `postgres://` / `postgresql://` URL.
    Postgres(String),
}

impl Location {
    /// The default: sled in `db` under `data_dir`.
    pub fn default_for(data_dir: &Path) -> Location {
        Location::Sled(data_dir.join("db"))
    }

    /// `sled:PATH` (`sled:` alone: the default under `data_dir`) or a PostgreSQL URL.
    pub fn parse(s: &str, data_dir: &Path) -> Result<Location, StorageError> {
        if postgres::connect::is_postgres_url(s) {
            postgres::connect::parse_url(s)?;
            return Ok(Location::Postgres(s.to_string()));
        }
        match s.strip_prefix("sled:") {
            Some("") => Ok(Location::default_for(data_dir)),
            Some(path) => Ok(Location::Sled(PathBuf::from(path))),
            None => Err(StorageError::BadLocation(format!(
                "{:?} is neither sled:PATH nor a postgres:// or postgresql:// URL",
                postgres::connect::redacted(s)
            ))),
        }
    }

    /// For messages and logs (a URL's password replaced).
    pub fn describe(&self) -> String {
        match self {
            Location::Sled(p) => format!("sled:{}", p.display()),
            Location::Postgres(url) => postgres::connect::redacted(url),
        }
    }

    /// Whether opening the store changes files in place (sled writes to its
    /// directory on every open), so a wrong key must be caught before it is opened.
    pub fn writes_on_open(&self) -> bool {
        matches!(self, Location::Sled(_))
    }

    /// Whether a store with data is there, found without creating or changing anything.
    pub async fn has_data(&self) -> Result<bool, StorageError> {
        match self {
            Location::Sled(p) => Ok(p.exists()),
            Location::Postgres(url) => postgres::PgStore::has_chain(url).await,
        }
    }
}

/// A running commit pipeline: a thread (sled) or a task (PostgreSQL).
pub enum Pipeline {
    /// sled's sequencer thread.
    Thread(std::thread::JoinHandle<()>),
    /// The PostgreSQL pipeline task.
    Task(tokio::task::JoinHandle<()>),
}

impl Pipeline {
    /// Waits until the pipeline has stopped (after every sequencer handle is
    /// gone and its last batch is durable).
    pub async fn join(self) {
        match self {
            Pipeline::Thread(t) => {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            Pipeline::Task(t) => {
                let _ = t.await;
            }
        }
    }
}

/// Fault injection for tests of fail-closed behaviour: while its switch is
/// on, every durable sync (sled) fails. The switch exists only with the
/// `testing` cargo feature, which the test suite turns on; in a build
/// without it (the release binary) this is an empty value and never fails.
#[derive(Clone, Default)]
pub struct FailSyncs {
    #[cfg(feature = "testing")]
    switch: Option<Arc<AtomicBool>>,
}

impl FailSyncs {
    /// Syncs never fail on purpose.
    pub fn never() -> FailSyncs {
        FailSyncs::default()
    }

    /// Every sync fails while `switch` is true. Named `danger_` because it
    /// makes a working store refuse every write.
    #[cfg(feature = "testing")]
    pub fn danger_while(switch: Arc<AtomicBool>) -> FailSyncs {
        FailSyncs { switch: Some(switch) }
    }

    /// True if the next sync is to fail.
    pub fn now(&self) -> bool {
        #[cfg(feature = "testing")]
        if let Some(s) = &self.switch {
            return s.load(std::sync::atomic::Ordering::SeqCst);
        }
        false
    }
}

/// How to open a store.
pub struct OpenStore<'a> {
    /// Where.
    pub location: &'a Location,
    /// sled's page cache, bytes.
    pub cache_bytes: u64,
    /// Time source for audit entries.
    pub clock: Arc<dyn Clock>,
    /// sled only: fault injection for tests (inert without the `testing` feature).
    pub fail_syncs: FailSyncs,
}

/// Opens (creating or migrating) the store and starts its commit pipeline.
pub async fn open(how: OpenStore<'_>) -> Result<(Store, Pipeline), StorageError> {
    match how.location {
        Location::Sled(dir) => {
            let store = sled::SledStore::open(dir, how.cache_bytes)?;
            let (sequencer, thread) = store.start(dir, how.clock, how.fail_syncs)?;
            let recovered = store.recovery();
            Ok((Store::new(Arc::new(store), sequencer, recovered), Pipeline::Thread(thread)))
        }
        Location::Postgres(url) => {
            let store = postgres::PgStore::open(url, how.clock.now_micros()).await?;
            let (sequencer, task) = store.start(how.clock).await?;
            Ok((Store::new(Arc::new(store), sequencer, Recovery::default()), Pipeline::Task(task)))
        }
    }
}
