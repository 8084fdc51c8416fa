//! Erasure buckets: the keys that make crypto-shredding real on a log-structured store.
//!
//! sled never overwrites in place, so deleting a patient's wrapped data key
//! from the `deks` tree does not remove the old bytes from its log segments;
//! anyone with the master key could still unwrap them. So every data key is
//! wrapped under its master version's KEK *and* a 32-byte erasure-bucket key
//! (see `keyring`), and the bucket keys live in a small file carevault
//! rewrites whole, `erasure-keys` in the data directory. Erasing a patient
//! gives its bucket a new generation, rewraps the bucket's other data keys to
//! it, and rewrites the file without the old generation. The old wrapped
//! bytes may linger in sled's log, but the key that could open them is gone.
//!
//! A patient's bucket is `SHA-256("carevault/v1/erasure-bucket" || patient id)[0..2]`
//! read as a big-endian u16, modulo the bucket count.
//!
//! # File format (`erasure-keys`)
//!
//! ```text
//! "CVEK" (4) · format 0x01 (1) · bucket count N (u16 BE)
//! N times: n (u8, 1 or 2) · n times: generation (u32 BE) · key (32)
//! SHA-256 of all the bytes above (32)
//! ```
//! Within a bucket generations are ascending; the last is current (used for
//! new wraps). Two generations mean an erasure is in progress (or was
//! interrupted and is finished at the next start).

use zeroize::Zeroizing;

use super::{CryptoError, random_fill, sha256};

/// Buckets in a new store: about 1,000 patients per bucket at a million
/// patients, so an erasure rewraps about a thousand data keys.
pub const DEFAULT_BUCKETS: u16 = 1024;

const MAGIC: &[u8; 4] = b"CVEK";
const FORMAT: u8 = 1;

/// One generation of one bucket's key. Zeroized on drop; no `Debug`.
#[derive(Clone)]
pub struct BucketKey {
    generation: u32,
    key: Zeroizing<[u8; 32]>,
}

impl BucketKey {
    /// Its generation (starts at 1).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.key
    }

    fn generate(generation: u32) -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; 32]);
        random_fill(key.as_mut())?;
        Ok(BucketKey { generation, key })
    }
}

/// Every bucket's live key generations. No `Debug`.
#[derive(Clone)]
pub struct ShredKeys {
    buckets: Vec<Vec<BucketKey>>,
}

impl ShredKeys {
    /// New random keys, generation 1, for `count` buckets.
    pub fn generate(count: u16) -> Result<Self, CryptoError> {
        let buckets = (0..count).map(|_| BucketKey::generate(1).map(|k| vec![k])).collect::<Result<_, _>>()?;
        Ok(ShredKeys { buckets })
    }

    /// The bucket a patient's data key belongs to.
    pub fn bucket_of(&self, patient: &[u8; 16]) -> u16 {
        let mut msg = b"carevault/v1/erasure-bucket".to_vec();
        msg.extend_from_slice(patient);
        let h = sha256(&msg);
        let n = u16::from_be_bytes([h[0], h[1]]);
        // The count is at least 1 (checked in decode/generate callers' formats).
        n % self.count().max(1)
    }

    /// Number of buckets.
    pub fn count(&self) -> u16 {
        u16::try_from(self.buckets.len()).unwrap_or(u16::MAX)
    }

    /// The generation new wraps in `bucket` use.
    pub fn current(&self, bucket: u16) -> Result<&BucketKey, CryptoError> {
        self.buckets.get(usize::from(bucket)).and_then(|b| b.last()).ok_or(CryptoError::UnknownErasureKey(bucket, 0))
    }

    /// A generation of a bucket, if it is still held.
    pub fn get(&self, bucket: u16, generation: u32) -> Result<&BucketKey, CryptoError> {
        self.buckets
            .get(usize::from(bucket))
            .and_then(|b| b.iter().find(|k| k.generation == generation))
            .ok_or(CryptoError::UnknownErasureKey(bucket, generation))
    }

    /// A copy where `bucket` has a new current generation beside the old one
    /// (the first step of an erasure). Refused if it already has two.
    pub fn with_next_generation(&self, bucket: u16) -> Result<ShredKeys, CryptoError> {
        let mut next = self.clone();
        let b = next.buckets.get_mut(usize::from(bucket)).ok_or(CryptoError::UnknownErasureKey(bucket, 0))?;
        if b.len() != 1 {
            return Err(CryptoError::BadKey("erasure bucket already has a pending generation"));
        }
        let generation = b[0].generation.checked_add(1).ok_or(CryptoError::BadKey("generation overflow"))?;
        b.push(BucketKey::generate(generation)?);
        Ok(next)
    }

    /// A copy where `bucket` keeps only its current generation (the last step of an erasure).
    pub fn without_previous(&self, bucket: u16) -> ShredKeys {
        let mut next = self.clone();
        if let Some(b) = next.buckets.get_mut(usize::from(bucket))
            && b.len() > 1
        {
            b.drain(..b.len() - 1);
        }
        next
    }

    /// Buckets holding more than one generation (an erasure to finish), with their current generation.
    pub fn pending(&self) -> Vec<(u16, u32)> {
        (0..self.count())
            .filter_map(|i| {
                let b = &self.buckets[usize::from(i)];
                (b.len() > 1).then(|| (i, b.last().map_or(0, |k| k.generation)))
            })
            .collect()
    }

    /// The file encoding (see the module docs).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(7 + self.buckets.len() * 37 + 32));
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&self.count().to_be_bytes());
        for b in &self.buckets {
            out.push(u8::try_from(b.len()).unwrap_or(u8::MAX));
            for k in b {
                out.extend_from_slice(&k.generation.to_be_bytes());
                out.extend_from_slice(k.key.as_ref());
            }
        }
        let sum = sha256(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Parses the file encoding, checking its checksum.
    pub fn decode(bytes: &[u8]) -> Result<ShredKeys, CryptoError> {
        let bad = CryptoError::BadKey("erasure-keys file is malformed");
        if bytes.len() < 7 + 32 {
            return Err(bad);
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if sha256(body) != sum || &body[..4] != MAGIC || body[4] != FORMAT {
            return Err(bad);
        }
        let count = u16::from_be_bytes([body[5], body[6]]);
        if count == 0 {
            return Err(bad);
        }
        let mut at = 7;
        let mut buckets = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let n = *body.get(at).ok_or(CryptoError::BadKey("erasure-keys file is truncated"))?;
            at += 1;
            if !(1..=2).contains(&n) {
                return Err(CryptoError::BadKey("erasure-keys file is malformed"));
            }
            let mut gens = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let g = body.get(at..at + 36).ok_or(CryptoError::BadKey("erasure-keys file is truncated"))?;
                let mut key = Zeroizing::new([0u8; 32]);
                key.copy_from_slice(&g[4..]);
                gens.push(BucketKey { generation: u32::from_be_bytes([g[0], g[1], g[2], g[3]]), key });
                at += 36;
            }
            buckets.push(gens);
        }
        if at != body.len() {
            return Err(CryptoError::BadKey("erasure-keys file has trailing bytes"));
        }
        Ok(ShredKeys { buckets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_encoding_round_trips_and_rejects_any_changed_byte() {
        let keys = ShredKeys::generate(4).unwrap().with_next_generation(2).unwrap();
        let bytes = keys.encode();
        assert_eq!(bytes.len(), 7 + 4 + 5 * 36 + 32);
        assert_eq!(&bytes[..7], b"CVEK\x01\x00\x04");
        let back = ShredKeys::decode(&bytes).unwrap();
        assert_eq!(back.encode().as_slice(), bytes.as_slice());
        assert_eq!(back.pending(), vec![(2, 2)]);
        for i in [0, 5, 8, 40, bytes.len() - 1] {
            let mut bad = bytes.to_vec();
            bad[i] ^= 1;
            assert!(ShredKeys::decode(&bad).is_err(), "byte {i}");
        }
        assert!(ShredKeys::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn an_erasure_step_adds_a_generation_and_the_last_step_drops_the_old_one() {
        let keys = ShredKeys::generate(8).unwrap();
        let old = keys.current(3).unwrap().bytes().to_vec();
        let during = keys.with_next_generation(3).unwrap();
        assert_eq!(during.current(3).unwrap().generation(), 2);
        assert_eq!(during.get(3, 1).unwrap().bytes().to_vec(), old);
        assert!(during.with_next_generation(3).is_err());
        let after = during.without_previous(3);
        assert!(after.get(3, 1).is_err());
        assert!(after.pending().is_empty());
        assert!(!after.encode().windows(32).any(|w| w == old.as_slice()));
    }

    #[test]
    fn patients_spread_over_buckets_deterministically() {
        let keys = ShredKeys::generate(DEFAULT_BUCKETS).unwrap();
        let a = keys.bucket_of(&[1; 16]);
        assert_eq!(a, keys.bucket_of(&[1; 16]));
        let distinct: std::collections::HashSet<u16> = (0..200u8).map(|i| keys.bucket_of(&[i; 16])).collect();
        assert!(distinct.len() > 150);
    }
}
