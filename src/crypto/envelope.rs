//! AES-256-GCM sealing of records and wrapped keys.
//!
//! # Nonce scheme: a one-time key per seal
//!
//! A random 96-bit GCM nonce is only safe for about 2^32 messages under one
//! key. Records of a busy patient, rewraps and re-encryptions could approach
//! that over years, so carevault never reuses an AES key at all. Each seal:
//!
//! 1. draws a fresh 256-bit `salt` from the OS CSPRNG;
//! 2. derives a one-time key `K1 = HKDF-SHA256(salt = salt, ikm = K, info = "carevault/v1/seal")`
//!    from the long-lived key `K` (a data key or a key-encryption key);
//! 3. encrypts with AES-256-GCM under `K1` with the all-zero 96-bit nonce.
//!
//! Because `K1` encrypts exactly one message, the (key, nonce) pair never
//! repeats unless two salts collide, which has probability about
//! n^2 / 2^257 for n seals: negligible for any n a database will see.
//!
//! # Envelope format (version 1)
//!
//! ```text
//! offset  size  field
//! 0       1     format = 0x01
//! 1       32    salt
//! 33      n+16  AES-256-GCM ciphertext of the n-byte plaintext, then the 16-byte tag
//! ```
//!
//! The associated data is never stored; the caller rebuilds it from where the
//! ciphertext is found ([`RecordAad`]), so a ciphertext moved to another record
//! fails to authenticate.

use ring::aead;

use super::{CryptoError, hkdf32, random_fill};

const FORMAT_V1: u8 = 0x01;
const SALT_LEN: usize = 32;
const TAG_LEN: usize = 16;
const SEAL_INFO: &[u8] = b"carevault/v1/seal";

fn one_time_key(key: &[u8; 32], salt: &[u8]) -> Result<aead::LessSafeKey, CryptoError> {
    let k1 = hkdf32(salt, key, SEAL_INFO);
    let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, k1.as_ref()).map_err(|_| CryptoError::Malformed)?;
    Ok(aead::LessSafeKey::new(unbound))
}

/// Seals `plaintext` under `key` with associated data `aad` (see module docs).
pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut salt = [0u8; SALT_LEN];
    random_fill(&mut salt)?;
    seal_with_salt(key, &salt, aad, plaintext)
}

fn seal_with_salt(key: &[u8; 32], salt: &[u8; SALT_LEN], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let k1 = one_time_key(key, salt)?;
    let mut out = Vec::with_capacity(1 + SALT_LEN + plaintext.len() + TAG_LEN);
    out.push(FORMAT_V1);
    out.extend_from_slice(salt);
    let mut body = plaintext.to_vec();
    // The nonce is all zero: K1 is used for this one message only.
    k1.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key([0u8; 12]), aead::Aad::from(aad), &mut body)
        .map_err(|_| CryptoError::Malformed)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens an envelope made by [`seal`] with the same key and associated data.
pub fn open(key: &[u8; 32], aad: &[u8], envelope: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if envelope.len() < 1 + SALT_LEN + TAG_LEN || envelope[0] != FORMAT_V1 {
        return Err(CryptoError::Malformed);
    }
    let (salt, body) = envelope[1..].split_at(SALT_LEN);
    let k1 = one_time_key(key, salt)?;
    let mut buf = body.to_vec();
    let plain = k1
        .open_in_place(aead::Nonce::assume_unique_for_key([0u8; 12]), aead::Aad::from(aad), &mut buf)
        .map_err(|_| CryptoError::Open)?;
    let len = plain.len();
    buf.truncate(len);
    Ok(buf)
}

/// What kind of record a ciphertext belongs to; part of its associated data.
/// Ordered patients first (as storage pages through records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    /// A patient's demographics.
    Patient,
    /// An insurance coverage.
    Coverage,
}

impl RecordKind {
    /// The byte that names this kind in associated data and storage keys.
    pub fn tag(self) -> u8 {
        match self {
            RecordKind::Patient => 1,
            RecordKind::Coverage => 2,
        }
    }

    /// The kind a tag names, if any.
    pub fn from_tag(tag: u8) -> Option<RecordKind> {
        [RecordKind::Patient, RecordKind::Coverage].into_iter().find(|k| k.tag() == tag)
    }
}

/// The associated data that binds a record ciphertext to its place.
///
/// Encoding: `"carevault/v1/record"` (19 ASCII bytes) || kind (1 byte: 1
/// patient, 2 coverage) || record id (16 bytes) || patient id (16 bytes) ||
/// version (u64 big-endian) || data-key generation (u32 big-endian).
#[derive(Debug, Clone, Copy)]
pub struct RecordAad {
    /// Record kind.
    pub kind: RecordKind,
    /// The record's own id (patient id for patients).
    pub record_id: [u8; 16],
    /// The patient the record belongs to.
    pub patient_id: [u8; 16],
    /// The record version this ciphertext holds.
    pub version: u64,
}

impl RecordAad {
    fn encode(&self, dek_generation: u32) -> Vec<u8> {
        let mut v = Vec::with_capacity(19 + 1 + 32 + 12);
        v.extend_from_slice(b"carevault/v1/record");
        v.push(self.kind.tag());
        v.extend_from_slice(&self.record_id);
        v.extend_from_slice(&self.patient_id);
        v.extend_from_slice(&self.version.to_be_bytes());
        v.extend_from_slice(&dek_generation.to_be_bytes());
        v
    }
}

/// Stored record format (version 1): `0x01` || data-key generation (u32
/// big-endian) || envelope (see module docs).
pub fn seal_record(dek: &super::DataKey, aad: &RecordAad, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(5 + 1 + SALT_LEN + plaintext.len() + TAG_LEN);
    out.push(FORMAT_V1);
    out.extend_from_slice(&dek.generation().to_be_bytes());
    out.extend_from_slice(&seal(dek.bytes(), &aad.encode(dek.generation()), plaintext)?);
    Ok(out)
}

/// Opens a stored record made by [`seal_record`]. Fails with
/// [`CryptoError::Open`] if the ciphertext belongs to any other record,
/// patient, version or key.
pub fn open_record(dek: &super::DataKey, aad: &RecordAad, stored: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if stored.len() < 5 || stored[0] != FORMAT_V1 {
        return Err(CryptoError::Malformed);
    }
    let mut generation_bytes = [0u8; 4];
    generation_bytes.copy_from_slice(&stored[1..5]);
    let generation = u32::from_be_bytes(generation_bytes);
    if generation != dek.generation() {
        return Err(CryptoError::UnknownKeyVersion(generation));
    }
    open(dek.bytes(), &aad.encode(generation), &stored[5..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_256_gcm_matches_the_gcm_spec_test_cases_13_and_14() {
        // McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 13 and 14:
        // K = 0^256, IV = 0^96.
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &[0u8; 32]).unwrap());
        let mut empty = Vec::new();
        key.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key([0; 12]), aead::Aad::empty(), &mut empty)
            .unwrap();
        assert_eq!(hex::encode(&empty), "530f8afbc74536b9a963b4f1c4cb738b");
        let mut block = vec![0u8; 16];
        key.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key([0; 12]), aead::Aad::empty(), &mut block)
            .unwrap();
        assert_eq!(hex::encode(&block), "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919");
    }

    #[test]
    fn an_envelope_has_a_known_layout_for_a_fixed_salt() {
        let key = [7u8; 32];
        let salt = [9u8; 32];
        let sealed = seal_with_salt(&key, &salt, b"aad", b"hello").unwrap();
        assert_eq!(sealed.len(), 1 + 32 + 5 + 16);
        assert_eq!(sealed[0], 1);
        assert_eq!(&sealed[1..33], &salt);
        assert_eq!(open(&key, b"aad", &sealed).unwrap(), b"hello");
    }

    #[test]
    fn sealing_twice_gives_different_ciphertexts() {
        let key = [1u8; 32];
        let a = seal(&key, b"x", b"same").unwrap();
        let b = seal(&key, b"x", b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn opening_fails_with_other_aad_key_or_a_flipped_bit() {
        let key = [1u8; 32];
        let sealed = seal(&key, b"right", b"secret").unwrap();
        assert_eq!(open(&key, b"wrong", &sealed), Err(CryptoError::Open));
        assert_eq!(open(&[2u8; 32], b"right", &sealed), Err(CryptoError::Open));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(open(&key, b"right", &flipped), Err(CryptoError::Open));
        assert_eq!(open(&key, b"right", &sealed[..10]), Err(CryptoError::Malformed));
    }
}
