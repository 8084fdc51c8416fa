//! A bounded memo of unwrapped data keys, so that a read of a patient read
//! recently skips deriving the wrapping key and opening the wrapped key
//! (two HKDFs and an AES-256-GCM open).
//!
//! An entry is one patient's unwrapped key together with the exact wrapped
//! bytes it was unwrapped from, and a lookup hits only if the wrapped key
//! just read from the store is byte for byte the same. Everything that
//! changes a patient's key writes other wrapped bytes (a rewrap under
//! another master version, a bucket's next generation after an erasure in
//! it, re-encryption's next data-key generation), and an erased patient has
//! none: so a hit is always the key the store holds now, whichever process
//! changed it. The cache is also emptied whenever this process takes up
//! other keys (a key operation, its own erasure, a key state changed
//! elsewhere): an [`epoch`](DataKeyCache::epoch) taken before a key is
//! unwrapped keeps an unwrap that raced such a change from being cached.
//!
//! Keys are zeroized when they leave it (evicted, replaced, or the cache
//! emptied: [`DataKey`]'s drop). At most `capacity` entries, least recently
//! used evicted first; capacity 0 keeps nothing.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{DataKey, WrappedDataKey};

struct Cached {
    wrapped: Vec<u8>,
    key: DataKey,
}

/// See the module docs.
pub struct DataKeyCache {
    entries: Option<Mutex<lru::LruCache<[u8; 16], Cached>>>,
    epoch: AtomicU64,
}

impl DataKeyCache {
    /// A cache of at most `capacity` keys (0: none).
    pub fn new(capacity: usize) -> DataKeyCache {
        DataKeyCache {
            entries: NonZeroUsize::new(capacity).map(|n| Mutex::new(lru::LruCache::new(n))),
            epoch: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, lru::LruCache<[u8; 16], Cached>>> {
        self.entries.as_ref().map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The current epoch: take it before reading the keys a data key is
    /// unwrapped with, and pass it to [`DataKeyCache::put`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The patient's key, if it was unwrapped from exactly `wrapped`.
    pub fn get(&self, patient: &[u8; 16], wrapped: &WrappedDataKey) -> Option<DataKey> {
        let mut entries = self.lock()?;
        let hit = entries.get(patient)?;
        (hit.wrapped == wrapped.0).then(|| hit.key.duplicate())
    }

    /// Remembers `key` as the patient's key unwrapped from `wrapped`, unless
    /// the cache was emptied since `epoch`.
    pub fn put(&self, epoch: u64, patient: [u8; 16], wrapped: &WrappedDataKey, key: &DataKey) {
        let Some(mut entries) = self.lock() else { return };
        // Checked under the lock that `clear` takes too.
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        entries.put(patient, Cached { wrapped: wrapped.0.clone(), key: key.duplicate() });
    }

    /// Empties the cache (zeroizing every key) and starts a new epoch.
    pub fn clear(&self) {
        let Some(mut entries) = self.lock() else { return };
        self.epoch.fetch_add(1, Ordering::SeqCst);
        entries.clear();
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.lock().map_or(0, |e| e.len())
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Keyring, ShredKeys};

    fn ring() -> (Keyring, ShredKeys) {
        let master = crate::crypto::MasterKey::from_hex(&"ab".repeat(32)).unwrap();
        (Keyring::new(vec![(1, master)], 1, 1).unwrap(), ShredKeys::generate(4).unwrap())
    }

    #[test]
    fn a_key_is_returned_only_for_the_wrapped_bytes_it_came_from() {
        let (ring, shreds) = ring();
        let cache = DataKeyCache::new(2);
        let (dek, wrapped) = ring.new_data_key(&[1; 16], &shreds).unwrap();
        assert!(cache.get(&[1; 16], &wrapped).is_none());
        cache.put(cache.epoch(), [1; 16], &wrapped, &dek);
        assert_eq!(cache.get(&[1; 16], &wrapped).unwrap().bytes(), dek.bytes());
        assert!(cache.get(&[2; 16], &wrapped).is_none(), "another patient");
        let rewrapped = ring.rewrap_data_key(&[1; 16], &wrapped, 1, &shreds).unwrap();
        assert_ne!(rewrapped.0, wrapped.0);
        assert!(cache.get(&[1; 16], &rewrapped).is_none(), "other wrapped bytes: unwrap again");
    }

    #[test]
    fn it_holds_at_most_its_capacity_and_nothing_at_zero() {
        let (ring, shreds) = ring();
        let cache = DataKeyCache::new(2);
        let keys: Vec<_> = (1..=3u8).map(|p| (p, ring.new_data_key(&[p; 16], &shreds).unwrap())).collect();
        for (p, (dek, wrapped)) in &keys {
            cache.put(cache.epoch(), [*p; 16], wrapped, dek);
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&[1; 16], &keys[0].1.1).is_none(), "the least recently used went");
        assert!(cache.get(&[3; 16], &keys[2].1.1).is_some());
        let none = DataKeyCache::new(0);
        none.put(none.epoch(), [1; 16], &keys[0].1.1, &keys[0].1.0);
        assert!(none.is_empty());
        assert!(none.get(&[1; 16], &keys[0].1.1).is_none());
    }

    #[test]
    fn an_unwrap_from_before_a_clear_is_not_kept() {
        let (ring, shreds) = ring();
        let cache = DataKeyCache::new(8);
        let (dek, wrapped) = ring.new_data_key(&[1; 16], &shreds).unwrap();
        cache.put(cache.epoch(), [1; 16], &wrapped, &dek);
        let before = cache.epoch();
        cache.clear();
        assert!(cache.is_empty());
        cache.put(before, [1; 16], &wrapped, &dek);
        assert!(cache.is_empty(), "unwrapped with the keys from before the clear");
        cache.put(cache.epoch(), [1; 16], &wrapped, &dek);
        assert_eq!(cache.len(), 1);
    }
}
