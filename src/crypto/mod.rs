//! All cryptography in carevault, and the only module that imports `ring`
//! (and `sha2`, which hashes faster here than ring: SHA-256 is the audit
//! chain's and the Merkle tree's hot path, see BENCHMARKS.md).
//!
//! * [`keyring`]: master key versions, the keys derived from them (key-encryption
//!   keys, blind-index key, key-check value) and per-patient data keys.
//! * [`envelope`]: AES-256-GCM sealing with a one-time key per seal.
//! * [`key_cache`]: a bounded memo of unwrapped data keys.
//! * this file: SHA-256, HMAC, random bytes, Ed25519 key generation for the
//!   dev token issuer, and Ed25519 signing and verification (signed notes).

pub mod envelope;
pub mod key_cache;
pub mod keyring;
pub mod shred;

use ring::rand::SecureRandom;

pub use envelope::{RecordAad, RecordKind, open_record, seal_record};
pub use key_cache::DataKeyCache;
pub use keyring::{BlindIndexKind, DataKey, Keyring, MasterKey, WrappedDataKey};
pub use shred::ShredKeys;

/// Errors from the crypto layer. Deliberately carries no key material or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// A ciphertext did not authenticate under the given key and associated data.
    #[error("ciphertext failed to authenticate")]
    Open,
    /// A ciphertext or wrapped key is malformed (wrong length or format byte).
    #[error("malformed ciphertext")]
    Malformed,
    /// The key version a ciphertext names is not in the keyring.
    #[error("key version {0} is not in the keyring")]
    UnknownKeyVersion(u32),
    /// The erasure-bucket key generation a wrapped data key names is not held
    /// (the patient was erased, or the erasure-keys file is not this store's).
    #[error("erasure bucket {0} generation {1} is not held")]
    UnknownErasureKey(u16, u32),
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
    /// A key file or key string is malformed.
    #[error("malformed key: {0}")]
    BadKey(&'static str),
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// SHA-256 of the concatenation of `parts`, without copying them together.
pub fn sha256_parts(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_fill(buf: &mut [u8]) -> Result<(), CryptoError> {
    ring::rand::SystemRandom::new().fill(buf).map_err(|_| CryptoError::Random)
}

/// A new Ed25519 key pair for the development token issuer.
pub struct IssuerKeyPair {
    /// PKCS#8 v2 DER of the private key.
    pub pkcs8_der: zeroize::Zeroizing<Vec<u8>>,
    /// The raw 32-byte public key.
    pub public_key: [u8; 32],
}

/// Generates an Ed25519 key pair for signing development tokens.
pub fn generate_issuer_key() -> Result<IssuerKeyPair, CryptoError> {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| CryptoError::Random)?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
        .map_err(|_| CryptoError::BadKey("generated Ed25519 key did not parse"))?;
    let mut public_key = [0u8; 32];
    public_key.copy_from_slice(pair.public_key().as_ref());
    Ok(IssuerKeyPair { pkcs8_der: zeroize::Zeroizing::new(doc.as_ref().to_vec()), public_key })
}

/// The Ed25519 public key inside a PKCS#8 private key.
pub fn issuer_public_key(pkcs8_der: &[u8]) -> Result<[u8; 32], CryptoError> {
    use ring::signature::KeyPair;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8_der)
        .map_err(|_| CryptoError::BadKey("not an Ed25519 PKCS#8 private key"))?;
    let mut public_key = [0u8; 32];
    public_key.copy_from_slice(pair.public_key().as_ref());
    Ok(public_key)
}

/// An Ed25519 signing key (signed notes: checkpoints, cosignatures). No `Debug`.
pub struct SigningKey {
    pair: ring::signature::Ed25519KeyPair,
}

impl SigningKey {
    /// From a PKCS#8 private key (as [`generate_issuer_key`] makes).
    pub fn from_pkcs8(pkcs8_der: &[u8]) -> Result<SigningKey, CryptoError> {
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8_der)
            .map_err(|_| CryptoError::BadKey("not an Ed25519 PKCS#8 private key"))?;
        Ok(SigningKey { pair })
    }

    /// From a raw 32-byte seed (RFC 8032 private key).
    pub fn from_seed(seed: &[u8]) -> Result<SigningKey, CryptoError> {
        use ring::signature::KeyPair;
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| CryptoError::BadKey("not a 32-byte Ed25519 seed"))?;
        let _ = pair.public_key();
        Ok(SigningKey { pair })
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        use ring::signature::KeyPair;
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        k
    }

    /// The signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut s = [0u8; 64];
        s.copy_from_slice(self.pair.sign(message).as_ref());
        s
    }
}

/// Whether `signature` is `public_key`'s Ed25519 signature of `message`.
pub fn ed25519_verify(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key).verify(message, signature).is_ok()
}

pub(crate) struct Len(pub usize);

impl ring::hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256(salt, ikm, info) -> 32 bytes (RFC 5869).
pub(crate) fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
    let mut out = zeroize::Zeroizing::new([0u8; 32]);
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    // Invariant: 32 bytes is far below HKDF-SHA256's 255*32 output limit,
    // so expand and fill cannot fail.
    #[allow(clippy::expect_used)]
    prk.expand(&info, Len(32))
        .and_then(|okm| okm.fill(out.as_mut()))
        .expect("HKDF-SHA256 expand of 32 bytes cannot fail");
    out
}

/// HMAC-SHA256(key, data).
pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_nist_abc_vector() {
        assert_eq!(hex::encode(sha256(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(hex::encode(sha256(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn hkdf_matches_rfc5869_test_case_1_prefix() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let okm = hkdf32(&salt, &ikm, &info);
        // RFC 5869 A.1 OKM (42 bytes); we take the first 32.
        assert_eq!(hex::encode(okm.as_ref()), "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf");
    }

    #[test]
    fn hmac_matches_rfc4231_test_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn issuer_keys_round_trip_their_public_key() {
        let pair = generate_issuer_key().unwrap();
        assert_eq!(issuer_public_key(&pair.pkcs8_der).unwrap(), pair.public_key);
    }
}
