//! Differential tests against independent implementations from crates.io
//! (dev-dependencies only): Cloudflare's `signed_note` (a port of Go's
//! sumdb/note) and `tlog_tiles` (a port of Go's sumdb/tlog). Each side
//! verifies what the other made, and where the output is deterministic the
//! bytes are the same.

use base64::Engine;

use super::merkle;
use super::note::{self, Checkpoint, Note, Verifier};
use crate::crypto::SigningKey;

const NAME: &str = "carevault.test/audit";
const SEED: [u8; 32] = [9; 32];

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Their signer key for our seed: `PRIVATE+KEY+name+id+base64(0x01 ‖ seed)`.
fn their_signer() -> signed_note::StandardSigner {
    let ours = SigningKey::from_seed(&SEED).unwrap();
    let id = note::key_id(NAME, &ours.public_key());
    let mut key = vec![1u8];
    key.extend_from_slice(&SEED);
    let skey = format!("PRIVATE+KEY+{NAME}+{}+{}", hex::encode(id), b64().encode(key));
    signed_note::StandardSigner::new(&skey).unwrap()
}

fn our_verifier() -> Verifier {
    Verifier::new(NAME, SigningKey::from_seed(&SEED).unwrap().public_key()).unwrap()
}

fn their_verifiers() -> signed_note::VerifierList {
    let v = signed_note::StandardVerifier::new(&our_verifier().to_vkey()).unwrap();
    signed_note::VerifierList::new(vec![Box::new(v)])
}

#[test]
fn signed_notes_are_byte_identical_and_each_side_verifies_the_other() {
    let leaves: Vec<merkle::Hash> = (0..7u8).map(|i| merkle::leaf_hash(&[i])).collect();
    let body = Checkpoint { origin: NAME.into(), size: 7, root: merkle::root(&leaves), extensions: vec![] }.body();
    let ours = note::sign(&body, NAME, &SigningKey::from_seed(&SEED).unwrap()).unwrap().encode();

    let mut theirs = signed_note::Note::new(body.as_bytes(), &[]).unwrap();
    let signer = their_signer();
    theirs.add_sigs(&[&signer]).unwrap();
    let theirs = String::from_utf8(theirs.to_bytes()).unwrap();
    assert_eq!(ours, theirs, "Ed25519 is deterministic: the same note, byte for byte");

    let parsed = signed_note::Note::from_bytes(ours.as_bytes()).unwrap();
    let (verified, _) = parsed.verify(&their_verifiers()).unwrap();
    assert_eq!(verified.len(), 1);
    assert_eq!(Note::parse(&theirs).unwrap().verify(&[our_verifier()]).unwrap(), vec![NAME.to_string()]);

    // A changed text is refused by both.
    let forged = ours.replacen("\n7\n", "\n8\n", 1);
    assert!(signed_note::Note::from_bytes(forged.as_bytes()).unwrap().verify(&their_verifiers()).is_err());
    assert!(Note::parse(&forged).unwrap().verify(&[our_verifier()]).is_err());
    // Their vkey parser and ours agree on the key id.
    assert_eq!(
        signed_note::key_id(NAME, &[&[1u8][..], &our_verifier().public_key[..]].concat()).to_be_bytes(),
        our_verifier().id
    );
}

#[test]
fn checkpoint_bodies_parse_both_ways() {
    let root = merkle::leaf_hash(b"x");
    let body = Checkpoint { origin: NAME.into(), size: 123_456, root, extensions: vec![] }.body();
    let theirs = tlog_tiles::Checkpoint::from_bytes(body.as_bytes()).unwrap();
    assert_eq!((theirs.origin(), theirs.size(), theirs.hash().0), (NAME, 123_456, root));
    let made = tlog_tiles::Checkpoint::new(NAME, 99, tlog_tiles::Hash(root), "").unwrap().to_bytes();
    let back = Checkpoint::parse(std::str::from_utf8(&made).unwrap()).unwrap();
    assert_eq!((back.origin.as_str(), back.size, back.root), (NAME, 99, root));
    assert_eq!(String::from_utf8(made).unwrap(), body.replace("123456", "99"));
}

/// Their hash storage: every hash `stored_hashes` asks to keep, by stored index.
struct Storage(std::cell::RefCell<Vec<tlog_tiles::Hash>>);

impl tlog_tiles::HashReader for Storage {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<tlog_tiles::Hash>, tlog_tiles::Error> {
        let s = self.0.borrow();
        Ok(indexes.iter().map(|i| s[*i as usize]).collect())
    }
}

#[test]
fn roots_and_proofs_agree_with_tlog_tiles_and_each_side_verifies_the_other() {
    let records: Vec<Vec<u8>> = (0..70u32).map(|i| format!("entry {i}").into_bytes()).collect();
    let leaves: Vec<merkle::Hash> = records.iter().map(|r| merkle::leaf_hash(r)).collect();
    let storage = Storage(std::cell::RefCell::new(Vec::new()));
    for (n, r) in records.iter().enumerate() {
        let add = tlog_tiles::stored_hashes(n as u64, r, &storage).unwrap();
        storage.0.borrow_mut().extend(add);
    }
    let h = |x: &merkle::Hash| tlog_tiles::Hash(*x);
    for t in 1..=records.len() as u64 {
        let root = merkle::root(&leaves[..t as usize]);
        assert_eq!(tlog_tiles::tree_hash(t, &storage).unwrap().0, root, "root at {t}");
        for n in (0..t).step_by(3).chain([t - 1]) {
            let theirs = tlog_tiles::prove_record(t, n, &storage).unwrap();
            let ours = merkle::inclusion_proof(&leaves[..t as usize], n as usize).unwrap();
            assert_eq!(theirs.iter().map(|x| x.0).collect::<Vec<_>>(), ours, "inclusion of {n} in {t}");
            let ours_as_theirs: Vec<_> = ours.iter().map(h).collect();
            tlog_tiles::check_record(&ours_as_theirs, t, h(&root), n, h(&leaves[n as usize])).unwrap();
            let theirs_raw: Vec<merkle::Hash> = theirs.iter().map(|x| x.0).collect();
            merkle::verify_inclusion(n, t, &leaves[n as usize], &theirs_raw, &root).unwrap();
        }
        for old in (1..=t).step_by(4).chain([t]) {
            let theirs = tlog_tiles::prove_tree(t, old, &storage).unwrap();
            let ours = merkle::consistency_proof(&leaves[..t as usize], old as usize).unwrap();
            assert_eq!(theirs.iter().map(|x| x.0).collect::<Vec<_>>(), ours, "consistency {old} -> {t}");
            let old_root = merkle::root(&leaves[..old as usize]);
            let ours_as_theirs: Vec<_> = ours.iter().map(h).collect();
            tlog_tiles::check_tree(&ours_as_theirs, t, h(&root), old, h(&old_root)).unwrap();
            let theirs_raw: Vec<merkle::Hash> = theirs.iter().map(|x| x.0).collect();
            merkle::verify_consistency(old, t, &old_root, &root, &theirs_raw).unwrap();
        }
    }
}
