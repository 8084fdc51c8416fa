//! What carevault stores, named without any engine: records by reference,
//! their heads, blind-index keys, access state, job state, and the typed
//! changes a commit makes, each with the precondition it needs.
//!
//! Engines (`sled`, `postgres`) lay these out as they see fit; nothing
//! above `storage` sees a tree, a table, a key byte or an engine type.

use crate::crypto::RecordKind;

/// A record: patient or coverage, and its id. Records page in this
/// order: patients before coverages, then by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordRef {
    /// Patient or coverage.
    pub kind: RecordKind,
    /// The record's id (the patient's own id for a patient).
    pub id: [u8; 16],
}

impl RecordRef {
    /// A patient record.
    pub fn patient(id: [u8; 16]) -> RecordRef {
        RecordRef { kind: RecordKind::Patient, id }
    }

    /// A coverage record.
    pub fn coverage(id: [u8; 16]) -> RecordRef {
        RecordRef { kind: RecordKind::Coverage, id }
    }

    /// From a kind tag and an id, if the tag is a known kind.
    pub fn from_tag(tag: u8, id: [u8; 16]) -> Option<RecordRef> {
        RecordKind::from_tag(tag).map(|kind| RecordRef { kind, id })
    }
}

/// An id (a patient, a grant, a record) and the bytes stored under it.
pub type Keyed = ([u8; 16], Vec<u8>);

/// Current version of a record and the patient it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Current version.
    pub version: u64,
    /// Owning patient (the record itself for patients).
    pub patient_id: [u8; 16],
}

/// A record's current state, read together: its head, the sealed version
/// the head names, its patient's wrapped data key (`None` where one is
/// missing, which the caller reports) and its patient's restriction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// The head.
    pub head: Head,
    /// The ciphertext of version `head.version`.
    pub sealed: Option<Vec<u8>>,
    /// The wrapped data key of patient `head.patient_id`.
    pub wrapped_key: Option<Vec<u8>>,
    /// Since when patient `head.patient_id` is restricted, if it is: what
    /// the access check needs before the record is opened.
    pub restricted_since: Option<i64>,
}

/// A patient's coverages as they are now, read together with what opening
/// them and checking access to them needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoveragesNow {
    /// The patient.
    pub patient: [u8; 16],
    /// The patient's own current version.
    pub patient_version: u64,
    /// The patient's wrapped data key (`None` where it is missing, which the
    /// caller reports).
    pub wrapped_key: Option<Vec<u8>>,
    /// Since when the patient is restricted, if it is.
    pub restricted_since: Option<i64>,
    /// Each coverage that has a head, by id.
    pub coverages: Vec<CoverageNow>,
}

/// One coverage's current version, as part of [`CoveragesNow`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoverageNow {
    /// The coverage's id.
    pub id: [u8; 16],
    /// Its current version.
    pub version: u64,
    /// The ciphertext of that version.
    pub sealed: Option<Vec<u8>>,
}

/// One blind-index entry: it leads searches for one HMAC to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexKey {
    /// Index kind (1 identifier, 2 name and birth date, 3 member id) + 16 × slot (0 or 1).
    pub tag: u8,
    /// The truncated HMAC of the normalized value.
    pub mac: [u8; 16],
    /// The patient the record belongs to.
    pub patient: [u8; 16],
    /// The record the entry leads to.
    pub record: RecordRef,
}

impl IndexKey {
    /// Length of [`IndexKey::to_bytes`].
    pub const LEN: usize = 50;

    /// The slot (0 or 1) the entry's tag says it is in.
    pub fn slot(&self) -> u8 {
        self.tag / 16
    }

    /// `tag ‖ mac ‖ patient ‖ record kind ‖ record id`: 50 bytes.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut k = [0u8; Self::LEN];
        k[0] = self.tag;
        k[1..17].copy_from_slice(&self.mac);
        k[17..33].copy_from_slice(&self.patient);
        k[33] = self.record.kind.tag();
        k[34..50].copy_from_slice(&self.record.id);
        k
    }

    /// A record's set of entries as engines store it: each entry's 50 bytes, concatenated in order.
    pub fn encode_set(keys: &[IndexKey]) -> Vec<u8> {
        keys.iter().flat_map(|k| k.to_bytes()).collect()
    }

    /// Parses [`IndexKey::encode_set`].
    pub fn decode_set(b: &[u8]) -> Result<Vec<IndexKey>, crate::storage::StorageError> {
        if !b.len().is_multiple_of(Self::LEN) {
            return Err(crate::storage::StorageError::Corrupt("an index set is not a whole number of entries"));
        }
        b.chunks(Self::LEN)
            .map(|c| IndexKey::from_bytes(c).ok_or(crate::storage::StorageError::Corrupt("bad blind index key")))
            .collect()
    }

    /// Parses [`IndexKey::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Option<IndexKey> {
        if b.len() != Self::LEN {
            return None;
        }
        let arr = |r: std::ops::Range<usize>| -> Option<[u8; 16]> { b.get(r)?.try_into().ok() };
        Some(IndexKey {
            tag: b[0],
            mac: arr(1..17)?,
            patient: arr(17..33)?,
            record: RecordRef::from_tag(b[33], arr(34..50)?)?,
        })
    }
}

/// The background jobs and operations whose state is stored (as JSON the app defines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobName {
    /// The rewrap job.
    Rewrap,
    /// The re-encryption job.
    Reencrypt,
    /// The blind-index key rotation.
    BlindIndex,
    /// A key operation between its intent and completion entries.
    KeyOperation,
    /// The key state (JSON, see `keystore`): which master versions are
    /// active, the primary, the blind-index slots. Shared by every process
    /// on the store; changed only in commits with their audit entries.
    KeyState,
}

impl JobName {
    /// Every job, in a fixed order.
    pub const ALL: [JobName; 5] =
        [JobName::Rewrap, JobName::Reencrypt, JobName::BlindIndex, JobName::KeyOperation, JobName::KeyState];

    /// The name engines store it under.
    pub fn as_str(self) -> &'static str {
        match self {
            JobName::Rewrap => "rewrap",
            JobName::Reencrypt => "reencrypt",
            JobName::BlindIndex => "blind",
            JobName::KeyOperation => "keyop",
            JobName::KeyState => "keystate",
        }
    }
}

/// What a stored value must be for a change to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect<T> {
    /// Anything, or nothing.
    Anything,
    /// Nothing stored.
    Absent,
    /// Exactly this.
    Equal(T),
}

impl<T: PartialEq> Expect<T> {
    /// Whether `current` meets the expectation.
    pub fn holds(&self, current: Option<&T>) -> bool {
        match self {
            Expect::Anything => true,
            Expect::Absent => current.is_none(),
            Expect::Equal(v) => current == Some(v),
        }
    }
}

/// A new version of a record, committed with its audit entry.
#[derive(Debug, Clone)]
pub struct RecordWrite {
    /// The record.
    pub record: RecordRef,
    /// Owning patient.
    pub patient_id: [u8; 16],
    /// The version the caller read; 0 means the record must not exist yet.
    pub expected_version: u64,
    /// Sealed bytes of version `expected_version + 1`.
    pub sealed: Vec<u8>,
    /// A new patient's wrapped data key.
    pub new_dek: Option<Vec<u8>>,
    /// The generation of the data key `sealed` was sealed with. Without
    /// `new_dek`, the write applies only if the patient's stored data key is
    /// still of this generation (not re-encrypted or erased since it was read).
    pub key_generation: u32,
    /// The record's complete new set of blind-index entries (replaces the old set).
    pub index_keys: Vec<IndexKey>,
}

/// A change a commit makes besides record writes. A commit's changes apply
/// all together, and only if every precondition of the commit holds;
/// otherwise only its audit entry is committed, as `aborted`.
#[derive(Debug, Clone)]
pub enum Change {
    /// Flags a patient restricted (`since`) or clears the flag (`None`).
    Restriction {
        /// The patient.
        patient: [u8; 16],
        /// Restricted since (µs), or not restricted.
        since: Option<i64>,
    },
    /// Places a legal hold (`since`) or lifts it (`None`).
    LegalHold {
        /// The patient.
        patient: [u8; 16],
        /// Held since (µs), or not held.
        since: Option<i64>,
        /// What the hold must be now (an erasure requires that none was placed).
        expect: Expect<i64>,
    },
    /// Stores a break-glass grant (JSON, see `app::access`).
    Grant {
        /// Grant id.
        id: [u8; 16],
        /// The grant.
        value: Vec<u8>,
        /// What must be stored under the id now.
        expect: Expect<Vec<u8>>,
    },
    /// Records a subject's latest grant for a patient.
    ActiveGrant {
        /// SHA-256 of the token subject.
        subject: [u8; 32],
        /// The patient.
        patient: [u8; 16],
        /// The grant.
        grant: [u8; 16],
        /// Until when (µs).
        expires: i64,
    },
    /// Stores an erasure tombstone (JSON, see `app::erasure`).
    Tombstone {
        /// The erased record.
        record: RecordRef,
        /// The tombstone.
        value: Vec<u8>,
        /// What must be stored now.
        expect: Expect<Vec<u8>>,
    },
    /// Replaces or removes a patient's wrapped data key.
    DataKey {
        /// The patient.
        patient: [u8; 16],
        /// The new wrapped key, or `None` to remove it (erasure).
        value: Option<Vec<u8>>,
        /// What must be stored now.
        expect: Expect<Vec<u8>>,
    },
    /// Replaces one stored version's ciphertext (re-encryption).
    Reseal {
        /// The record.
        record: RecordRef,
        /// The version.
        version: u64,
        /// The new ciphertext.
        value: Vec<u8>,
        /// The ciphertext that must be stored now.
        expect: Vec<u8>,
    },
    /// Replaces a record's blind-index entries (blind-index rotation).
    IndexSet {
        /// The record.
        record: RecordRef,
        /// Its new entries.
        keys: Vec<IndexKey>,
        /// Its entries now (`None`: none stored).
        expect: Option<Vec<IndexKey>>,
        /// If set, the record's head must still be this (unchanged since it was read).
        expect_head: Option<Head>,
    },
    /// Stores or removes a job's state (JSON, see `app::jobs`).
    Job {
        /// Which job.
        name: JobName,
        /// Its state, or `None` to remove it.
        value: Option<Vec<u8>>,
        /// What must be stored now.
        expect: Expect<Vec<u8>>,
    },
    /// Remembers the record a create made under an idempotency key; applies
    /// only if the key is not remembered yet.
    IdempotencyKey {
        /// SHA-256 of the caller's subject and the key it sent (see `app::patients`).
        key: [u8; 32],
        /// The record the create made.
        record: RecordRef,
    },
    /// Writes nothing: the commit goes ahead only if the stored key state
    /// ([`JobName::KeyState`]) is exactly these bytes, the state the
    /// request's keys came from. Otherwise its outcome is
    /// [`crate::storage::CommitOutcome::KeyStateMoved`]: another process
    /// changed the key state, and this one must take it up and retry.
    KeyStateIs(Vec<u8>),
    /// Removes everything stored for a patient and its coverages: heads,
    /// every version, blind-index entries, coverage links (not the data
    /// key, the tombstones, or anything in the audit trail).
    ErasePatient {
        /// The patient.
        patient: [u8; 16],
        /// Its coverages (as read before; a coverage added since makes the head check fail).
        coverages: Vec<[u8; 16]>,
    },
}

/// How much an erasure removes: for its audit entry and its report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// The patient's coverages.
    pub coverages: u64,
    /// Stored record versions (patient and coverages).
    pub record_versions: u64,
}

/// A stored audit entry: its canonical bytes and the hash stored beside them.
#[derive(Debug, Clone)]
pub struct StoredAuditEntry {
    /// The sequence stored beside the entry.
    pub sequence: u64,
    /// Canonical encoding.
    pub bytes: Vec<u8>,
    /// Stored SHA-256 of `bytes`.
    pub hash: [u8; 32],
}

impl StoredAuditEntry {
    /// The entry as the verifier takes it: bytes, and the hash and sequence stored beside them.
    pub fn raw(self) -> crate::audit::RawEntry {
        crate::audit::RawEntry::stored(self.bytes, self.hash, self.sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_round_trip_through_their_50_bytes() {
        let k = IndexKey { tag: 17, mac: [3; 16], patient: [4; 16], record: RecordRef::coverage([5; 16]) };
        let b = k.to_bytes();
        assert_eq!((b[0], b[33]), (17, 2));
        assert_eq!(IndexKey::from_bytes(&b), Some(k));
        assert_eq!(k.slot(), 1);
        assert_eq!(IndexKey::from_bytes(&b[..49]), None);
    }

    #[test]
    fn records_page_in_kind_then_id_order() {
        let mut v = vec![RecordRef::coverage([1; 16]), RecordRef::patient([9; 16]), RecordRef::patient([2; 16])];
        v.sort();
        assert_eq!(v, [RecordRef::patient([2; 16]), RecordRef::patient([9; 16]), RecordRef::coverage([1; 16])]);
    }
}

/// A signed checkpoint of the audit log as stored: its tree size, the signed
/// note (C2SP tlog-checkpoint body and the log's signature), when it was
/// signed, and the witnesses' cosignature lines given for it since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// The tree size it commits to.
    pub size: u64,
    /// The signed note's bytes.
    pub note: Vec<u8>,
    /// When it was signed (µs).
    pub signed_micros: i64,
    /// Cosignature lines (`— name base64`), by witness name then key id.
    pub cosignatures: Vec<String>,
}
