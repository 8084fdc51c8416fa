//! Master key versions and everything derived from them.
//!
//! ```text
//! master key v (32 bytes, outside the data directory)
//!   ├─ KEK_v   = HKDF-SHA256(salt="carevault/v1/kdf", ikm=master_v, info="kek")
//!   │            wraps per-patient data keys (DEKs)
//!   ├─ BIK_v   = HKDF-SHA256(salt="carevault/v1/kdf", ikm=master_v, info="blind-index")
//!   │            keys the HMAC blind indexes used by search
//!   ├─ NK_v    = HKDF-SHA256(salt="carevault/v1/kdf", ikm=master_v, info="notes")
//!   │            seals access notes (break-glass reasons, review notes)
//!   └─ KCV_v   = HMAC-SHA256(HKDF(..., info="key-check"), "carevault key check value")[..16]
//!                stored in the data directory to detect a wrong master key at start-up
//! DEK (random 32 bytes per patient) seals that patient's records (see envelope.rs)
//! ```

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use super::envelope;
use super::shred::{BucketKey, ShredKeys};
use super::{CryptoError, hkdf32, hmac_sha256, random_fill};

const KDF_SALT: &[u8] = b"carevault/v1/kdf";
const WRAPPED_FORMAT_V1: u8 = 0x01;
/// Wrapped data keys that also name an erasure bucket (see `shred`).
const WRAPPED_FORMAT_V2: u8 = 0x02;

/// A 256-bit master key. Zeroized on drop; deliberately has no `Debug`.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// A copy (for checking a key before it joins a keyring); zeroized on drop like the original.
    pub fn clone_key(&self) -> MasterKey {
        MasterKey(Zeroizing::new(*self.0))
    }

    /// Parses the key file format: 64 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, CryptoError> {
        let trimmed = text.trim();
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(trimmed, key.as_mut()).map_err(|_| CryptoError::BadKey("expected 64 hex digits"))?;
        Ok(MasterKey(key))
    }

    /// A new random master key.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; 32]);
        random_fill(key.as_mut())?;
        Ok(MasterKey(key))
    }

    /// The key file format: 64 lowercase hex digits and a newline.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut s = hex::encode(self.0.as_ref());
        s.push('\n');
        Zeroizing::new(s)
    }
}

struct DerivedKeys {
    kek: Zeroizing<[u8; 32]>,
    blind: Zeroizing<[u8; 32]>,
    notes: Zeroizing<[u8; 32]>,
    kcv: [u8; 16],
}

impl DerivedKeys {
    fn derive(master: &MasterKey) -> Self {
        let kek = hkdf32(KDF_SALT, master.0.as_ref(), b"kek");
        let blind = hkdf32(KDF_SALT, master.0.as_ref(), b"blind-index");
        let notes = hkdf32(KDF_SALT, master.0.as_ref(), b"notes");
        let check_key = hkdf32(KDF_SALT, master.0.as_ref(), b"key-check");
        let mac = hmac_sha256(check_key.as_ref(), b"carevault key check value");
        let mut kcv = [0u8; 16];
        kcv.copy_from_slice(&mac[..16]);
        DerivedKeys { kek, blind, notes, kcv }
    }
}

/// What a blind index entry indexes; part of the HMAC input so values of one
/// kind never match another kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlindIndexKind {
    /// Identifier system + value.
    Identifier,
    /// Family name + birth date.
    NameBirthDate,
    /// Insurance member id.
    MemberId,
}

impl BlindIndexKind {
    /// The byte naming this kind in index keys.
    pub fn tag(self) -> u8 {
        match self {
            BlindIndexKind::Identifier => 1,
            BlindIndexKind::NameBirthDate => 2,
            BlindIndexKind::MemberId => 3,
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            BlindIndexKind::Identifier => b"identifier",
            BlindIndexKind::NameBirthDate => b"name-birth-date",
            BlindIndexKind::MemberId => b"member-id",
        }
    }
}

/// A per-patient data key. Zeroized on drop; no `Debug`.
pub struct DataKey {
    key: Zeroizing<[u8; 32]>,
    generation: u32,
}

impl DataKey {
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.key
    }

    /// Generation of this patient's data key (1 for the first; re-encryption
    /// makes a new generation).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// A second copy (zeroized on its own drop), for the key cache.
    pub(crate) fn duplicate(&self) -> DataKey {
        DataKey { key: self.key.clone(), generation: self.generation }
    }
}

/// A data key wrapped by a key-encryption key, in its storage encoding.
///
/// Format 2 (every key written since erasure buckets exist):
/// `0x02` || master key version (u32 BE) || DEK generation (u32 BE) ||
/// erasure bucket (u16 BE) || bucket generation (u32 BE) || envelope of the
/// 32-byte DEK under the wrapping key
/// `W = HKDF-SHA256(salt="carevault/v1/kdf", ikm=KEK_v || bucket key, info="dek-wrap")`,
/// with associated data `"carevault/v2/dek"` || patient id (16 bytes) ||
/// master version (u32 BE) || generation (u32 BE) || bucket (u16 BE) || bucket generation (u32 BE).
///
/// Format 1 (read only): `0x01` || master key version (u32 BE) || DEK
/// generation (u32 BE) || envelope of the DEK under KEK_v, with associated data
/// `"carevault/v1/dek"` || patient id (16 bytes) || master version (u32 BE) || generation (u32 BE).
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedDataKey(pub Vec<u8>);

impl WrappedDataKey {
    fn header_len(&self) -> Result<usize, CryptoError> {
        match self.0.first() {
            Some(&WRAPPED_FORMAT_V1) if self.0.len() >= 9 => Ok(9),
            Some(&WRAPPED_FORMAT_V2) if self.0.len() >= 15 => Ok(15),
            _ => Err(CryptoError::Malformed),
        }
    }

    /// The master key version whose KEK wrapped this key.
    pub fn master_version(&self) -> Result<u32, CryptoError> {
        self.header_len()?;
        Ok(u32::from_be_bytes([self.0[1], self.0[2], self.0[3], self.0[4]]))
    }

    /// The data key's generation (1 for a patient's first key; `keys reencrypt` makes the next).
    pub fn generation(&self) -> Result<u32, CryptoError> {
        self.header_len()?;
        Ok(u32::from_be_bytes([self.0[5], self.0[6], self.0[7], self.0[8]]))
    }

    /// The erasure bucket and its generation (format 2), or `None` for a format-1 key.
    pub fn erasure_bucket(&self) -> Result<Option<(u16, u32)>, CryptoError> {
        if self.header_len()? == 9 {
            return Ok(None);
        }
        let b = &self.0;
        Ok(Some((u16::from_be_bytes([b[9], b[10]]), u32::from_be_bytes([b[11], b[12], b[13], b[14]]))))
    }
}

fn dek_aad(patient_id: &[u8; 16], master_version: u32, generation: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + 16 + 8);
    aad.extend_from_slice(b"carevault/v1/dek");
    aad.extend_from_slice(patient_id);
    aad.extend_from_slice(&master_version.to_be_bytes());
    aad.extend_from_slice(&generation.to_be_bytes());
    aad
}

fn dek_aad_v2(patient_id: &[u8; 16], master_version: u32, generation: u32, bucket: u16, bucket_gen: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + 16 + 14);
    aad.extend_from_slice(b"carevault/v2/dek");
    aad.extend_from_slice(patient_id);
    aad.extend_from_slice(&master_version.to_be_bytes());
    aad.extend_from_slice(&generation.to_be_bytes());
    aad.extend_from_slice(&bucket.to_be_bytes());
    aad.extend_from_slice(&bucket_gen.to_be_bytes());
    aad
}

/// The format-2 wrapping key: HKDF over KEK_v and the bucket key together.
fn dek_wrapping_key(kek: &[u8; 32], bucket_key: &BucketKey) -> Zeroizing<[u8; 32]> {
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(kek);
    ikm[32..].copy_from_slice(bucket_key.bytes());
    hkdf32(KDF_SALT, ikm.as_ref(), b"dek-wrap")
}

fn note_aad(context: &[u8]) -> Vec<u8> {
    let mut aad = b"carevault/v1/note".to_vec();
    aad.extend_from_slice(context);
    aad
}

/// The master key versions this process holds, with their derived keys.
pub struct Keyring {
    versions: BTreeMap<u32, DerivedKeys>,
    primary: u32,
    blind_index_version: u32,
    /// Which of the two index slots the current blind index lives in (see [`Keyring::blind_tag`]).
    blind_slot: u8,
    /// A blind index being built beside the current one (version), in the other slot.
    next_blind: Option<u32>,
}

impl Keyring {
    /// Builds a keyring; `primary` must be one of the versions. The blind
    /// index key comes from `blind_index_version`, which must also be present.
    pub fn new(masters: Vec<(u32, MasterKey)>, primary: u32, blind_index_version: u32) -> Result<Self, CryptoError> {
        let versions: BTreeMap<u32, DerivedKeys> = masters.iter().map(|(v, k)| (*v, DerivedKeys::derive(k))).collect();
        if !versions.contains_key(&primary) {
            return Err(CryptoError::UnknownKeyVersion(primary));
        }
        if !versions.contains_key(&blind_index_version) {
            return Err(CryptoError::UnknownKeyVersion(blind_index_version));
        }
        Ok(Keyring { versions, primary, blind_index_version, blind_slot: 0, next_blind: None })
    }

    /// Sets the current blind index's slot (0 or 1) and a version whose index
    /// is being built in the other slot, which must be held.
    pub fn with_blind_slots(mut self, slot: u8, next: Option<u32>) -> Result<Self, CryptoError> {
        if let Some(v) = next
            && !self.versions.contains_key(&v)
        {
            return Err(CryptoError::UnknownKeyVersion(v));
        }
        self.blind_slot = slot & 1;
        self.next_blind = next;
        Ok(self)
    }

    /// The first byte of a `blind` tree key: the index kind's tag (1-3), plus
    /// 16 for slot 1. Two slots let a new blind index be built beside the
    /// current one during blind-index key rotation.
    pub fn blind_tag(&self, kind: BlindIndexKind) -> u8 {
        kind.tag() + 16 * self.blind_slot
    }

    /// The blind index being built, if any: its version and its slot's tag for `kind`.
    pub fn next_blind_index(&self) -> Option<u32> {
        self.next_blind
    }

    /// Every index entry a value needs now: `(tag, HMAC)` in the current
    /// slot, and in the other slot too while a new blind index is built.
    pub fn blind_indexes(&self, kind: BlindIndexKind, normalized: &[u8]) -> Vec<(u8, [u8; 16])> {
        let mut out = vec![(self.blind_tag(kind), self.blind_index(kind, normalized))];
        if let Some(next) = self.next_blind
            && let Some(d) = self.versions.get(&next)
        {
            out.push((kind.tag() + 16 * (1 - self.blind_slot), blind_mac(&d.blind, kind, normalized)));
        }
        out
    }

    /// The version new data keys are wrapped with.
    pub fn primary_version(&self) -> u32 {
        self.primary
    }

    /// The master version the blind-index key is derived from.
    pub fn blind_index_version(&self) -> u32 {
        self.blind_index_version
    }

    /// All master key versions held.
    pub fn versions(&self) -> Vec<u32> {
        self.versions.keys().copied().collect()
    }

    /// The key-check value of a version, hex encoded (reveals nothing about the key).
    pub fn key_check_value(&self, version: u32) -> Option<String> {
        self.versions.get(&version).map(|d| hex::encode(d.kcv))
    }

    /// A fresh data key (generation 1) for a patient, and its wrapped form
    /// under the primary KEK and the patient's current erasure-bucket key.
    pub fn new_data_key(
        &self,
        patient_id: &[u8; 16],
        shreds: &ShredKeys,
    ) -> Result<(DataKey, WrappedDataKey), CryptoError> {
        self.fresh_data_key(patient_id, 1, shreds)
    }

    /// A fresh data key of the given generation (re-encryption makes the next
    /// generation of a patient's key), wrapped like [`Keyring::new_data_key`].
    pub fn fresh_data_key(
        &self,
        patient_id: &[u8; 16],
        generation: u32,
        shreds: &ShredKeys,
    ) -> Result<(DataKey, WrappedDataKey), CryptoError> {
        let mut key = Zeroizing::new([0u8; 32]);
        random_fill(key.as_mut())?;
        let dek = DataKey { key, generation };
        let wrapped = self.wrap(patient_id, &dek, self.primary, shreds)?;
        Ok((dek, wrapped))
    }

    /// Seals a short access note (a break-glass reason, a review note) under
    /// the primary notes key: `0x01` || master version (u32 BE) || envelope,
    /// with associated data `"carevault/v1/note"` || `context`.
    pub fn seal_note(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let derived = self.versions.get(&self.primary).ok_or(CryptoError::UnknownKeyVersion(self.primary))?;
        let sealed = envelope::seal(&derived.notes, &note_aad(context), plaintext)?;
        let mut out = Vec::with_capacity(5 + sealed.len());
        out.push(WRAPPED_FORMAT_V1);
        out.extend_from_slice(&self.primary.to_be_bytes());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a note sealed by [`Keyring::seal_note`] with the same `context`.
    pub fn open_note(&self, context: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < 5 || sealed[0] != WRAPPED_FORMAT_V1 {
            return Err(CryptoError::Malformed);
        }
        let version = u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]);
        let derived = self.versions.get(&version).ok_or(CryptoError::UnknownKeyVersion(version))?;
        Ok(Zeroizing::new(envelope::open(&derived.notes, &note_aad(context), &sealed[5..])?))
    }

    /// Re-wraps a patient's data key (same key, same generation) under master
    /// version `target` and the bucket's current erasure key, in format 2:
    /// the rewrap job's and an erasure's one step.
    pub fn rewrap_data_key(
        &self,
        patient_id: &[u8; 16],
        wrapped: &WrappedDataKey,
        target: u32,
        shreds: &ShredKeys,
    ) -> Result<WrappedDataKey, CryptoError> {
        let dek = self.unwrap_data_key(patient_id, wrapped, shreds)?;
        self.wrap(patient_id, &dek, target, shreds)
    }

    fn wrap(
        &self,
        patient_id: &[u8; 16],
        dek: &DataKey,
        version: u32,
        shreds: &ShredKeys,
    ) -> Result<WrappedDataKey, CryptoError> {
        let derived = self.versions.get(&version).ok_or(CryptoError::UnknownKeyVersion(version))?;
        let bucket = shreds.bucket_of(patient_id);
        let bucket_key = shreds.current(bucket)?;
        let bucket_gen = bucket_key.generation();
        let w = dek_wrapping_key(&derived.kek, bucket_key);
        let aad = dek_aad_v2(patient_id, version, dek.generation, bucket, bucket_gen);
        let sealed = envelope::seal(&w, &aad, dek.key.as_ref())?;
        let mut wrapped = Vec::with_capacity(15 + sealed.len());
        wrapped.push(WRAPPED_FORMAT_V2);
        wrapped.extend_from_slice(&version.to_be_bytes());
        wrapped.extend_from_slice(&dek.generation.to_be_bytes());
        wrapped.extend_from_slice(&bucket.to_be_bytes());
        wrapped.extend_from_slice(&bucket_gen.to_be_bytes());
        wrapped.extend_from_slice(&sealed);
        Ok(WrappedDataKey(wrapped))
    }

    /// The master version a sealed note names.
    pub fn note_version(sealed: &[u8]) -> Result<u32, CryptoError> {
        if sealed.len() < 5 || sealed[0] != WRAPPED_FORMAT_V1 {
            return Err(CryptoError::Malformed);
        }
        Ok(u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]))
    }

    /// Re-seals a note under the primary version.
    pub fn reseal_note(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let plain = self.open_note(context, sealed)?;
        self.seal_note(context, &plain)
    }

    /// Unwraps a patient's data key (either format; format 2 needs the
    /// bucket generation it names to be in `shreds`).
    pub fn unwrap_data_key(
        &self,
        patient_id: &[u8; 16],
        wrapped: &WrappedDataKey,
        shreds: &ShredKeys,
    ) -> Result<DataKey, CryptoError> {
        let version = wrapped.master_version()?;
        let generation = wrapped.generation()?;
        let derived = self.versions.get(&version).ok_or(CryptoError::UnknownKeyVersion(version))?;
        let plain = Zeroizing::new(match wrapped.erasure_bucket()? {
            None => envelope::open(&derived.kek, &dek_aad(patient_id, version, generation), &wrapped.0[9..])?,
            Some((bucket, bucket_gen)) => {
                let w = dek_wrapping_key(&derived.kek, shreds.get(bucket, bucket_gen)?);
                let aad = dek_aad_v2(patient_id, version, generation, bucket, bucket_gen);
                envelope::open(&w, &aad, &wrapped.0[15..])?
            }
        });
        let mut key = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err(CryptoError::Malformed);
        }
        key.copy_from_slice(&plain);
        Ok(DataKey { key, generation })
    }

    /// The 16-byte blind index of an already normalized value.
    /// `HMAC-SHA256(BIK, "carevault/v1/blind" || 0x00 || label || 0x00 || value)[..16]`.
    pub fn blind_index(&self, kind: BlindIndexKind, normalized: &[u8]) -> [u8; 16] {
        // Invariant: the blind-index version was checked present in `new`.
        match self.versions.get(&self.blind_index_version) {
            Some(d) => blind_mac(&d.blind, kind, normalized),
            None => [0u8; 16],
        }
    }
}

fn blind_mac(key: &[u8; 32], kind: BlindIndexKind, normalized: &[u8]) -> [u8; 16] {
    let mut msg = Vec::with_capacity(32 + normalized.len());
    msg.extend_from_slice(b"carevault/v1/blind\0");
    msg.extend_from_slice(kind.label());
    msg.push(0);
    msg.extend_from_slice(normalized);
    let mac = hmac_sha256(key, &msg);
    let mut out = [0u8; 16];
    out.copy_from_slice(&mac[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_with(hex_key: &str) -> Keyring {
        Keyring::new(vec![(1, MasterKey::from_hex(hex_key).unwrap())], 1, 1).unwrap()
    }

    #[test]
    fn key_check_value_is_a_known_answer_for_a_fixed_key() {
        let a = ring_with(&"00".repeat(32));
        let b = ring_with(&"00".repeat(32));
        let c = ring_with(&"01".repeat(32));
        assert_eq!(a.key_check_value(1), b.key_check_value(1));
        assert_ne!(a.key_check_value(1), c.key_check_value(1));
        assert_eq!(a.key_check_value(1).unwrap().len(), 32);
    }

    #[test]
    fn a_note_opens_only_in_its_context_and_names_its_key_version() {
        let ring = ring_with(&"ab".repeat(32));
        let sealed = ring.seal_note(b"grant-1/reason", b"patient unconscious in ED").unwrap();
        assert_eq!(&sealed[..5], &[1, 0, 0, 0, 1]);
        assert_eq!(ring.open_note(b"grant-1/reason", &sealed).unwrap().as_slice(), b"patient unconscious in ED");
        assert_eq!(ring.open_note(b"grant-2/reason", &sealed).err(), Some(CryptoError::Open));
        assert!(!sealed.windows(11).any(|w| w == b"unconscious"));
    }

    #[test]
    fn rewrapping_moves_a_data_key_to_another_version_without_changing_it() {
        let shreds = ShredKeys::generate(16).unwrap();
        let v1 = MasterKey::from_hex(&"11".repeat(32)).unwrap();
        let v2 = MasterKey::from_hex(&"22".repeat(32)).unwrap();
        let old = Keyring::new(vec![(1, v1.clone_key())], 1, 1).unwrap();
        let (dek, wrapped) = old.new_data_key(&[7; 16], &shreds).unwrap();
        let both = Keyring::new(vec![(1, v1), (2, v2.clone_key())], 2, 1).unwrap();
        let moved = both.rewrap_data_key(&[7; 16], &wrapped, 2, &shreds).unwrap();
        assert_eq!(moved.master_version().unwrap(), 2);
        let only_v2 = Keyring::new(vec![(2, v2)], 2, 2).unwrap();
        assert_eq!(only_v2.unwrap_data_key(&[7; 16], &moved, &shreds).unwrap().bytes(), dek.bytes());
        assert_eq!(only_v2.unwrap_data_key(&[7; 16], &wrapped, &shreds).err(), Some(CryptoError::UnknownKeyVersion(1)));
    }

    #[test]
    fn a_wrapped_data_key_unwraps_only_for_its_patient() {
        let shreds = ShredKeys::generate(16).unwrap();
        let ring = ring_with(&"ab".repeat(32));
        let (dek, wrapped) = ring.new_data_key(&[1; 16], &shreds).unwrap();
        assert_eq!(wrapped.0[0], 2);
        assert_eq!(wrapped.erasure_bucket().unwrap(), Some((shreds.bucket_of(&[1; 16]), 1)));
        let again = ring.unwrap_data_key(&[1; 16], &wrapped, &shreds).unwrap();
        assert_eq!(dek.bytes(), again.bytes());
        assert!(matches!(ring.unwrap_data_key(&[2; 16], &wrapped, &shreds), Err(CryptoError::Open)));
        let other = ring_with(&"cd".repeat(32));
        assert!(matches!(other.unwrap_data_key(&[1; 16], &wrapped, &shreds), Err(CryptoError::Open)));
        let other_shreds = ShredKeys::generate(16).unwrap();
        assert!(matches!(ring.unwrap_data_key(&[1; 16], &wrapped, &other_shreds), Err(CryptoError::Open)));
    }

    #[test]
    fn dropping_a_bucket_generation_makes_keys_wrapped_under_it_unopenable() {
        let shreds = ShredKeys::generate(4).unwrap();
        let ring = ring_with(&"ab".repeat(32));
        let p = [9u8; 16];
        let bucket = shreds.bucket_of(&p);
        let (dek, old) = ring.new_data_key(&p, &shreds).unwrap();
        let during = shreds.with_next_generation(bucket).unwrap();
        // A neighbour's key is moved to the new generation; the erased one is not.
        let moved = ring.rewrap_data_key(&p, &old, 1, &during).unwrap();
        assert_eq!(moved.erasure_bucket().unwrap(), Some((bucket, 2)));
        let after = during.without_previous(bucket);
        assert_eq!(ring.unwrap_data_key(&p, &moved, &after).unwrap().bytes(), dek.bytes());
        assert_eq!(ring.unwrap_data_key(&p, &old, &after).err(), Some(CryptoError::UnknownErasureKey(bucket, 1)));
    }

    #[test]
    fn a_format_1_wrapped_key_still_unwraps_and_rewraps_into_format_2() {
        // Written by hand the way format 1 was: envelope under KEK_v with the v1 associated data.
        let shreds = ShredKeys::generate(4).unwrap();
        let ring = ring_with(&"ab".repeat(32));
        let derived = ring.versions.get(&1).unwrap();
        let dek = [5u8; 32];
        let mut v1 = vec![1, 0, 0, 0, 1, 0, 0, 0, 1];
        v1.extend(envelope::seal(&derived.kek, &dek_aad(&[3; 16], 1, 1), &dek).unwrap());
        let v1 = WrappedDataKey(v1);
        assert_eq!(v1.erasure_bucket().unwrap(), None);
        assert_eq!(ring.unwrap_data_key(&[3; 16], &v1, &shreds).unwrap().bytes(), &dek);
        let v2 = ring.rewrap_data_key(&[3; 16], &v1, 1, &shreds).unwrap();
        assert_eq!((v2.0[0], v2.generation().unwrap()), (2, 1));
        assert_eq!(ring.unwrap_data_key(&[3; 16], &v2, &shreds).unwrap().bytes(), &dek);
    }

    #[test]
    fn blind_indexes_are_keyed_and_separated_by_kind() {
        let a = ring_with(&"ab".repeat(32));
        let b = ring_with(&"cd".repeat(32));
        assert_eq!(a.blind_index(BlindIndexKind::Identifier, b"x"), a.blind_index(BlindIndexKind::Identifier, b"x"));
        assert_ne!(a.blind_index(BlindIndexKind::Identifier, b"x"), a.blind_index(BlindIndexKind::MemberId, b"x"));
        assert_ne!(a.blind_index(BlindIndexKind::Identifier, b"x"), b.blind_index(BlindIndexKind::Identifier, b"x"));
    }

    #[test]
    fn master_keys_reject_bad_hex() {
        assert!(MasterKey::from_hex("zz").is_err());
        assert!(MasterKey::from_hex(&"0".repeat(63)).is_err());
        assert!(MasterKey::from_hex(&format!("  {}\n", "0".repeat(64))).is_ok());
    }
}
