//! Fumi's transparency log of operator accesses.
//!
//! Every time an operator touches stored data through the admin API — or tries to and is
//! refused — the server appends an [`Entry`] to an append-only Merkle log ([`merkle`], RFC 9162
//! shape) and signs the new [`TreeHead`] with the log's Ed25519 key *before* it returns or
//! changes anything. Anyone can fetch the signed head, the entries and the proofs, and
//! [`verify`] checks that a later head extends an earlier one: an entry that was removed, altered
//! or reordered, or a second history shown to someone else, is detected.
//!
//! Entries never name an account. They carry an [`account_tag`] that only the account's holder
//! (who knows the account's audit key) can recognise, so a user can find the accesses to their own
//! account while the public log stays unlinkable.

#![warn(missing_docs)]

pub mod keys;
pub mod merkle;
pub mod verify;

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

pub use merkle::{Hash, ProofError};

/// Domain separation of the tree head signature.
const TREE_HEAD_CONTEXT: &[u8] = b"fumi audit tree head v1";
/// Domain separation of account tags.
const ACCOUNT_TAG_CONTEXT: &[u8] = b"fumi audit account tag v1";

/// A tree head: the log's size and root at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeHead {
    /// Number of entries.
    pub tree_size: u64,
    /// When it was signed, ms since the Unix epoch.
    pub timestamp: u64,
    /// Merkle root over the entries.
    pub root_hash: Hash,
}

impl TreeHead {
    /// The bytes the log key signs: context ‖ size (u64 BE) ‖ timestamp (u64 BE) ‖ root.
    pub fn signed_message(&self) -> Vec<u8> {
        [
            TREE_HEAD_CONTEXT,
            &self.tree_size.to_be_bytes(),
            &self.timestamp.to_be_bytes(),
            &self.root_hash,
        ]
        .concat()
    }

    /// Signs the head with the log key.
    pub fn sign(self, key: &SigningKey) -> SignedTreeHead {
        SignedTreeHead {
            tree_size: self.tree_size,
            timestamp: self.timestamp,
            root_hash: hex::encode(self.root_hash),
            log_key: hex::encode(key.verifying_key().to_bytes()),
            signature: hex::encode(key.sign(&self.signed_message()).to_bytes()),
        }
    }
}

/// Why a signed tree head was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeadError {
    /// A field is not the hex it should be.
    #[error("the tree head is malformed: {0}")]
    Malformed(&'static str),
    /// The signature does not verify under the head's log key.
    #[error("the tree head's signature does not verify")]
    BadSignature,
}

/// A tree head and the log key's signature, as served at `GET /v1/audit/head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTreeHead {
    /// Number of entries.
    pub tree_size: u64,
    /// When it was signed, ms since the Unix epoch.
    pub timestamp: u64,
    /// Merkle root, hex.
    pub root_hash: String,
    /// The log's Ed25519 public key, hex.
    pub log_key: String,
    /// Ed25519 signature over [`TreeHead::signed_message`], hex.
    pub signature: String,
}

impl SignedTreeHead {
    /// Checks the signature under the key the head names; returns the head.
    pub fn verify(&self) -> Result<TreeHead, HeadError> {
        let root_hash = decode_hash(&self.root_hash).ok_or(HeadError::Malformed("root_hash"))?;
        let key: [u8; 32] = decode_hash(&self.log_key).ok_or(HeadError::Malformed("log_key"))?;
        let signature: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(HeadError::Malformed("signature"))?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| HeadError::Malformed("log_key"))?;
        let head = TreeHead {
            tree_size: self.tree_size,
            timestamp: self.timestamp,
            root_hash,
        };
        key.verify_strict(&head.signed_message(), &Signature::from_bytes(&signature))
            .map_err(|_| HeadError::BadSignature)?;
        Ok(head)
    }
}

/// 32 bytes from hex.
pub fn decode_hash(text: &str) -> Option<Hash> {
    hex::decode(text).ok()?.try_into().ok()
}

/// What became of an operator's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The request passed the access policy and was carried out after this entry was logged.
    Allowed,
    /// The request was refused, for this reason; nothing was returned or changed.
    Refused(String),
}

/// Something an operator request touches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Subject {
    /// An account, named only by its [`account_tag`] for this entry's nonce.
    Account {
        /// Hex tag.
        tag: String,
    },
    /// A stored blob (attachment ciphertext), by its random id.
    Blob {
        /// Hex id.
        id: String,
    },
    /// An abuse report, by its number.
    Report {
        /// Report number.
        id: u64,
    },
}

/// One log entry: who did what to which records, why, from where, and whether it was allowed.
///
/// The server stores the exact JSON bytes it hashed; verifiers hash the bytes they are served,
/// so no canonical encoding is needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When the request arrived, ms since the Unix epoch.
    pub time: u64,
    /// The operator's configured name (`"unknown"` for a key or name not in the configuration).
    pub operator: String,
    /// The operator's configured jurisdiction (`""` when unknown).
    pub jurisdiction: String,
    /// The network address the request came from.
    pub source: String,
    /// The operation, e.g. `suspend_account` (see the admin API in PROTOCOL.md).
    pub action: String,
    /// The reason the operator stated (a ticket id); public.
    pub reason: String,
    /// Allowed or refused.
    pub outcome: Outcome,
    /// Records the request touches.
    pub subjects: Vec<Subject>,
    /// Operation details without personal data (counts, digests, target region).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, serde_json::Value>,
    /// Random per entry (hex), so an account's tags differ from entry to entry.
    pub nonce: String,
}

impl Entry {
    /// The bytes to store and hash.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("entries serialise")
    }

    /// Parses stored bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Whether a subject of this entry is the account holding `audit_key`.
    pub fn concerns(&self, audit_key: &[u8; 32]) -> bool {
        let Some(nonce) = hex::decode(&self.nonce).ok() else {
            return false;
        };
        let mine = hex::encode(account_tag(audit_key, &nonce));
        self.subjects
            .iter()
            .any(|subject| matches!(subject, Subject::Account { tag } if *tag == mine))
    }
}

/// `HMAC-SHA256(audit_key, context ‖ nonce)`: the name of an account in one log entry.
///
/// The server holds each account's audit key so it can name the account at access time; the
/// account's devices fetch the key to find their own entries. Without the key, two entries about
/// one account cannot be linked to each other or to the account.
pub fn account_tag(audit_key: &[u8; 32], nonce: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(audit_key).expect("HMAC takes any key length");
    mac.update(ACCOUNT_TAG_CONTEXT);
    mac.update(nonce);
    mac.finalize().into_bytes().into()
}

/// A page of entries, as served at `GET /v1/audit/entries?start=&end=`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntriesPage {
    /// Index of the first entry.
    pub start: u64,
    /// The stored bytes of each entry, in order, as UTF-8 JSON text.
    pub entries: Vec<String>,
}

/// An inclusion proof, as served at `GET /v1/audit/proof/inclusion?index=&tree_size=`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    /// The entry's index.
    pub index: u64,
    /// The tree the proof is for.
    pub tree_size: u64,
    /// Hex hashes, leaf to root.
    pub path: Vec<String>,
}

/// A consistency proof, as served at `GET /v1/audit/proof/consistency?first=&second=`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProof {
    /// The older tree size.
    pub first: u64,
    /// The newer tree size.
    pub second: u64,
    /// Hex hashes.
    pub path: Vec<String>,
}

/// Hex-decodes a proof path.
pub fn decode_path(path: &[String]) -> Option<Vec<Hash>> {
    path.iter().map(|h| decode_hash(h)).collect()
}

/// Encodes a proof path as hex.
pub fn encode_path(path: &[Hash]) -> Vec<String> {
    path.iter().map(hex::encode).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_heads_verify_and_any_change_breaks_them() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let head = TreeHead {
            tree_size: 5,
            timestamp: 1_700_000_000_000,
            root_hash: [3; 32],
        };
        let signed = head.sign(&key);
        assert_eq!(signed.verify().unwrap(), head);
        let mut bigger = signed.clone();
        bigger.tree_size = 6;
        assert_eq!(bigger.verify(), Err(HeadError::BadSignature));
        let mut other_root = signed.clone();
        other_root.root_hash = hex::encode([4; 32]);
        assert_eq!(other_root.verify(), Err(HeadError::BadSignature));
        let mut other_key = signed;
        other_key.log_key = hex::encode(SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes());
        assert_eq!(other_key.verify(), Err(HeadError::BadSignature));
    }

    #[test]
    fn account_tags_are_recognised_only_with_the_key() {
        let mine = [1; 32];
        let nonce = [9u8; 16];
        let entry = Entry {
            time: 1,
            operator: "op".into(),
            jurisdiction: "jp".into(),
            source: "127.0.0.1".into(),
            action: "suspend_account".into(),
            reason: "T-1".into(),
            outcome: Outcome::Allowed,
            subjects: vec![Subject::Account {
                tag: hex::encode(account_tag(&mine, &nonce)),
            }],
            details: BTreeMap::new(),
            nonce: hex::encode(nonce),
        };
        assert!(entry.concerns(&mine));
        assert!(!entry.concerns(&[2; 32]));
        // Another nonce gives another tag: entries about one account are unlinkable.
        assert_ne!(account_tag(&mine, &nonce), account_tag(&mine, &[8u8; 16]));
        assert_eq!(Entry::from_bytes(&entry.to_bytes()).unwrap(), entry);
    }
}
