//! C2SP signed notes (<https://c2sp.org/signed-note>) with Ed25519 keys, and
//! the tlog checkpoint (<https://c2sp.org/tlog-checkpoint>) they carry, as
//! pure functions over text.
//!
//! A note is UTF-8 text ending in a newline, a blank line, then one line per
//! signature: `— <key name> <base64(key id (4) ‖ signature (64))>` (an em
//! dash, U+2014). The signed message is the text, up to and including its
//! last newline. An Ed25519 key's id is `SHA-256(name ‖ 0x0A ‖ 0x01 ‖
//! public key)[..4]`, and its verifier key is written
//! `<name>+<key id, 8 hex digits>+<base64(0x01 ‖ public key)>`.
//!
//! A checkpoint's text is `<origin>\n<tree size, decimal>\n<base64(root)>\n`,
//! then optional extension lines.

use base64::Engine;

use crate::crypto::{SigningKey, ed25519_verify, sha256};

/// The signature type byte of Ed25519 note keys.
const ED25519: u8 = 0x01;

/// Why a note, a key or a checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// Not a well-formed note (text, blank line, signature lines).
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    /// Not a well-formed verifier key.
    #[error("malformed verifier key: {0}")]
    BadKey(&'static str),
    /// A signature by a known key does not verify.
    #[error("the signature by {0} does not verify")]
    BadSignature(String),
    /// No signature by any of the given keys.
    #[error("the note is not signed by any known key")]
    Unsigned,
    /// Not a well-formed checkpoint.
    #[error("malformed checkpoint: {0}")]
    BadCheckpoint(&'static str),
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// A key name is non-empty UTF-8 with no whitespace and no `+`.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '+')
}

/// The signature type of C2SP tlog-cosignature/v1 (Ed25519 over a timestamped message).
pub const COSIGNATURE_V1: u8 = 0x04;

/// The id of an Ed25519 note key.
pub fn key_id(name: &str, public_key: &[u8; 32]) -> [u8; 4] {
    typed_key_id(name, ED25519, public_key)
}

fn typed_key_id(name: &str, alg: u8, public_key: &[u8; 32]) -> [u8; 4] {
    let mut b = Vec::with_capacity(name.len() + 34);
    b.extend_from_slice(name.as_bytes());
    b.push(b'\n');
    b.push(alg);
    b.extend_from_slice(public_key);
    let h = sha256(&b);
    [h[0], h[1], h[2], h[3]]
}

/// The message a tlog-cosignature/v1 signs: `cosignature/v1`, the time, and the checkpoint body.
fn cosigned_message(timestamp: u64, body: &str) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{body}")
}

/// A witness's C2SP tlog-cosignature/v1 of a checkpoint body, at `timestamp` (seconds since the epoch).
pub fn cosign(body: &str, name: &str, key: &SigningKey, timestamp: u64) -> Result<Signature, NoteError> {
    if !valid_name(name) {
        return Err(NoteError::BadKey("the name is empty or holds whitespace or '+'"));
    }
    let id = typed_key_id(name, COSIGNATURE_V1, &key.public_key());
    let mut signature = timestamp.to_be_bytes().to_vec();
    signature.extend_from_slice(&key.sign(cosigned_message(timestamp, body).as_bytes()));
    Ok(Signature { name: name.to_string(), id, signature })
}

/// Whether `sig` is `witness`'s (a cosigner key) valid cosignature of `body`;
/// returns its timestamp.
pub fn verify_cosignature(witness: &Verifier, body: &str, sig: &Signature) -> Option<u64> {
    if witness.alg != COSIGNATURE_V1 || sig.name != witness.name || sig.id != witness.id || sig.signature.len() != 72 {
        return None;
    }
    let timestamp = u64::from_be_bytes(sig.signature[..8].try_into().ok()?);
    ed25519_verify(&witness.public_key, cosigned_message(timestamp, body).as_bytes(), &sig.signature[8..])
        .then_some(timestamp)
}

/// A key that verifies notes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    /// The key's name (for a log: its origin).
    pub name: String,
    /// Its id.
    pub id: [u8; 4],
    /// The Ed25519 public key.
    pub public_key: [u8; 32],
    /// Its signature type: 0x01 (note signatures) or [`COSIGNATURE_V1`].
    pub alg: u8,
}

impl Verifier {
    /// The verifier of `public_key` named `name`.
    pub fn new(name: &str, public_key: [u8; 32]) -> Result<Verifier, NoteError> {
        Verifier::typed(name, ED25519, public_key)
    }

    /// A witness's cosigner key (tlog-cosignature/v1) named `name`.
    pub fn cosigner(name: &str, public_key: [u8; 32]) -> Result<Verifier, NoteError> {
        Verifier::typed(name, COSIGNATURE_V1, public_key)
    }

    fn typed(name: &str, alg: u8, public_key: [u8; 32]) -> Result<Verifier, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::BadKey("the name is empty or holds whitespace or '+'"));
        }
        Ok(Verifier { name: name.to_string(), id: typed_key_id(name, alg, &public_key), public_key, alg })
    }

    /// Parses `<name>+<hex id>+<base64(type ‖ key)>` (type 0x01 or 0x04), checking the id.
    pub fn parse(vkey: &str) -> Result<Verifier, NoteError> {
        let mut parts = vkey.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::BadKey("expected name+keyid+key"));
        };
        let id = hex::decode(id).map_err(|_| NoteError::BadKey("the key id is not hex"))?;
        let key = b64().decode(key).map_err(|_| NoteError::BadKey("the key is not base64"))?;
        if key.len() != 33 || (key[0] != ED25519 && key[0] != COSIGNATURE_V1) {
            return Err(NoteError::BadKey("not an Ed25519 key"));
        }
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&key[1..]);
        let v = Verifier::typed(name, key[0], public_key)?;
        if id != v.id {
            return Err(NoteError::BadKey("the key id does not match the name and key"));
        }
        Ok(v)
    }

    /// The `vkey` form.
    pub fn to_vkey(&self) -> String {
        let mut key = vec![self.alg];
        key.extend_from_slice(&self.public_key);
        format!("{}+{}+{}", self.name, hex::encode(self.id), b64().encode(key))
    }
}

/// One signature line of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The signer's key name.
    pub name: String,
    /// The key id.
    pub id: [u8; 4],
    /// What follows the key id (for Ed25519: the 64-byte signature).
    pub signature: Vec<u8>,
}

impl Signature {
    /// Parses one signature line (`— name base64(id ‖ signature)`, without its newline).
    pub fn parse_line(line: &str) -> Result<Signature, NoteError> {
        let rest =
            line.strip_prefix("\u{2014} ").ok_or(NoteError::Malformed("a signature line starts with an em dash"))?;
        let (name, b) =
            rest.split_once(' ').ok_or(NoteError::Malformed("a signature line has a name and a signature"))?;
        if !valid_name(name) {
            return Err(NoteError::Malformed("bad signer name"));
        }
        let raw = b64().decode(b).map_err(|_| NoteError::Malformed("the signature is not base64"))?;
        if raw.len() < 5 {
            return Err(NoteError::Malformed("the signature is too short"));
        }
        Ok(Signature { name: name.to_string(), id: [raw[0], raw[1], raw[2], raw[3]], signature: raw[4..].to_vec() })
    }

    /// The line, without its newline.
    pub fn line(&self) -> String {
        let mut b = self.id.to_vec();
        b.extend_from_slice(&self.signature);
        format!("\u{2014} {} {}", self.name, b64().encode(b))
    }
}

/// A note split into its text and its signatures (nothing verified yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The signed text, ending in a newline.
    pub text: String,
    /// Its signatures, in order.
    pub signatures: Vec<Signature>,
}

impl Note {
    /// Splits a note.
    pub fn parse(note: &str) -> Result<Note, NoteError> {
        let split = note.rfind("\n\n").ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let (text, sigs) = (&note[..=split], &note[split + 2..]);
        if !sigs.ends_with('\n') {
            return Err(NoteError::Malformed("the last signature line does not end in a newline"));
        }
        let mut signatures = Vec::new();
        for line in sigs[..sigs.len() - 1].split('\n') {
            let rest = line.strip_prefix("\u{2014} ").ok_or(NoteError::Malformed("a signature line lacks the dash"))?;
            let (name, sig) = rest.split_once(' ').ok_or(NoteError::Malformed("a signature line lacks a space"))?;
            if !valid_name(name) {
                return Err(NoteError::Malformed("a signature's key name is not valid"));
            }
            let bytes = b64().decode(sig).map_err(|_| NoteError::Malformed("a signature is not base64"))?;
            if bytes.len() < 5 {
                return Err(NoteError::Malformed("a signature is too short"));
            }
            let id = [bytes[0], bytes[1], bytes[2], bytes[3]];
            signatures.push(Signature { name: name.to_string(), id, signature: bytes[4..].to_vec() });
        }
        if signatures.is_empty() {
            return Err(NoteError::Malformed("no signatures"));
        }
        Ok(Note { text: text.to_string(), signatures })
    }

    /// The note as text.
    pub fn encode(&self) -> String {
        let mut out = self.text.clone();
        out.push('\n');
        for s in &self.signatures {
            out.push_str(&s.line());
            out.push('\n');
        }
        out
    }

    /// Checks every signature by one of `verifiers` (matched by name and
    /// id; others are ignored) and returns the names of those that signed.
    /// Fails if one of theirs does not verify, or if none signed.
    pub fn verify(&self, verifiers: &[Verifier]) -> Result<Vec<String>, NoteError> {
        let mut signed = Vec::new();
        for s in &self.signatures {
            let Some(v) = verifiers.iter().find(|v| v.alg == ED25519 && v.name == s.name && v.id == s.id) else {
                continue;
            };
            if !ed25519_verify(&v.public_key, self.text.as_bytes(), &s.signature) {
                return Err(NoteError::BadSignature(s.name.clone()));
            }
            signed.push(s.name.clone());
        }
        if signed.is_empty() {
            return Err(NoteError::Unsigned);
        }
        Ok(signed)
    }
}

/// Signs `text` (a note text: it must end in a newline) as `name`.
pub fn sign(text: &str, name: &str, key: &SigningKey) -> Result<Note, NoteError> {
    if !text.ends_with('\n') || text.ends_with("\n\n") || text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed("the text must end in one newline and hold no other control characters"));
    }
    if !valid_name(name) {
        return Err(NoteError::BadKey("the name is empty or holds whitespace or '+'"));
    }
    let id = key_id(name, &key.public_key());
    let signature = key.sign(text.as_bytes()).to_vec();
    Ok(Note { text: text.to_string(), signatures: vec![Signature { name: name.to_string(), id, signature }] })
}

/// A tlog checkpoint: a log's origin, its size and its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name (its origin line).
    pub origin: String,
    /// The tree size.
    pub size: u64,
    /// The root hash.
    pub root: [u8; 32],
    /// Extension lines, in order (without newlines).
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The checkpoint's note text.
    pub fn body(&self) -> String {
        let mut out = format!("{}\n{}\n{}\n", self.origin, self.size, b64().encode(self.root));
        for e in &self.extensions {
            out.push_str(e);
            out.push('\n');
        }
        out
    }

    /// Parses a checkpoint's note text.
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let lines = text.strip_suffix('\n').ok_or(NoteError::BadCheckpoint("no final newline"))?;
        let mut lines = lines.split('\n');
        let origin = lines.next().filter(|o| !o.is_empty()).ok_or(NoteError::BadCheckpoint("no origin"))?;
        let size = lines.next().ok_or(NoteError::BadCheckpoint("no tree size"))?;
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) || (size.len() > 1 && size.starts_with('0')) {
            return Err(NoteError::BadCheckpoint("the tree size is not a decimal number"));
        }
        let size = size.parse().map_err(|_| NoteError::BadCheckpoint("the tree size is too large"))?;
        let root = lines.next().ok_or(NoteError::BadCheckpoint("no root"))?;
        let root = b64().decode(root).map_err(|_| NoteError::BadCheckpoint("the root is not base64"))?;
        let root = root.try_into().map_err(|_| NoteError::BadCheckpoint("the root is not 32 bytes"))?;
        let extensions: Vec<String> = lines.map(str::to_string).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(NoteError::BadCheckpoint("an empty extension line"));
        }
        Ok(Checkpoint { origin: origin.to_string(), size, root, extensions })
    }
}

/// A checkpoint note checked: signed by one of `verifiers` (matched by its
/// name, the origin, and key id), and its body a well-formed checkpoint.
pub fn open_checkpoint(note: &str, verifiers: &[Verifier]) -> Result<Checkpoint, NoteError> {
    let n = Note::parse(note)?;
    n.verify(verifiers)?;
    let c = Checkpoint::parse(&n.text)?;
    if !verifiers.iter().any(|v| v.name == c.origin) {
        return Err(NoteError::BadCheckpoint("the checkpoint's origin is not the log key's name"));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(name: &str) -> String {
        std::fs::read_to_string(crate::audit::vectors().join("c2sp").join(name)).unwrap()
    }

    #[test]
    fn the_c2sp_example_note_verifies_with_its_key_and_fails_when_changed() {
        let key = Verifier::parse(&vector("signed-note-example.vkey")).unwrap();
        assert_eq!(key.name, "example.com/foo");
        assert_eq!(key.to_vkey(), vector("signed-note-example.vkey").trim());
        let text = vector("signed-note-example.note");
        let note = Note::parse(&text).unwrap();
        assert_eq!(note.text, "This is an example message.\n");
        assert_eq!(note.encode(), text);
        assert_eq!(note.verify(std::slice::from_ref(&key)).unwrap(), vec!["example.com/foo".to_string()]);
        let changed = Note::parse(&text.replace("example message", "exemple message")).unwrap();
        assert_eq!(changed.verify(std::slice::from_ref(&key)), Err(NoteError::BadSignature("example.com/foo".into())));
        let other = Verifier::new("example.com/foo", [9; 32]).unwrap();
        assert_eq!(note.verify(&[other]), Err(NoteError::Unsigned), "another key's id does not match");
        let mut wrong_id = key.to_vkey();
        wrong_id.replace_range(16..18, "00");
        assert!(Verifier::parse(&wrong_id).is_err());
    }

    #[test]
    fn checkpoints_sign_verify_and_parse_back() {
        let pair = crate::crypto::generate_issuer_key().unwrap();
        let key = SigningKey::from_pkcs8(&pair.pkcs8_der).unwrap();
        let cp = Checkpoint {
            origin: "carevault.clinic.example/audit".into(),
            size: 12,
            root: [7; 32],
            extensions: vec!["x-ext 1".into()],
        };
        let note = sign(&cp.body(), &cp.origin, &key).unwrap();
        let verifier = Verifier::new(&cp.origin, key.public_key()).unwrap();
        let text = note.encode();
        let back = Note::parse(&text).unwrap();
        assert_eq!(back.verify(&[verifier]).unwrap(), vec![cp.origin.clone()]);
        assert_eq!(Checkpoint::parse(&back.text).unwrap(), cp);
        for bad in ["o\n01\nAAAA\n", "o\n-1\n", "o\n1\nnot base64\n", "o\n1\nAAAA\n", "\n1\n", "o\n1"] {
            assert!(Checkpoint::parse(bad).is_err(), "{bad:?}");
        }
        assert!(sign("no newline", "o", &key).is_err());
    }
}
