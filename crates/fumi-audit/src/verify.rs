//! The checks an outside verifier runs against a log, without I/O: the caller fetches heads,
//! proofs and entries (`fumi audit verify` does it over HTTP) and keeps the [`VerifierState`]
//! between runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::merkle::{self, Hash};
use crate::{Entry, HeadError, Outcome, SignedTreeHead, TreeHead, decode_hash};

/// Entries a server returns per page at most (`GET /v1/audit/entries`).
pub const PAGE_SIZE: u64 = 256;

/// Why the log failed verification. Every variant means the operator's log cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// The head's signature is bad or it is malformed.
    #[error("the signed tree head is invalid: {0}")]
    Head(#[from] HeadError),
    /// The head is signed by another key than the one seen before.
    #[error("the log key changed from {pinned} to {served}: this is not the log seen before")]
    KeyChanged {
        /// The key in the state file.
        pinned: String,
        /// The key in the served head.
        served: String,
    },
    /// The log is smaller than before.
    #[error("the log was truncated: it had {before} entries, it now claims {now}")]
    Truncated {
        /// Size at the last run.
        before: u64,
        /// Size now.
        now: u64,
    },
    /// The new head does not extend the old one.
    #[error(
        "the log was rewritten or forked: the head of {now} entries is not consistent with the head of {before} entries seen before"
    )]
    Inconsistent {
        /// Size at the last run.
        before: u64,
        /// Size now.
        now: u64,
    },
    /// An entry is not the one the signed head commits to.
    #[error("entry {index} is not in the signed log: it was altered, removed or reordered")]
    NotIncluded {
        /// The entry's index.
        index: u64,
    },
    /// An entry is not valid JSON of the entry format.
    #[error("entry {index} is malformed: {reason}")]
    MalformedEntry {
        /// The entry's index.
        index: u64,
        /// The parse error.
        reason: String,
    },
}

/// Counts over every entry verified so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Entries checked.
    pub entries: u64,
    /// Allowed accesses per operator.
    pub by_operator: BTreeMap<String, u64>,
    /// Allowed accesses per jurisdiction.
    pub by_jurisdiction: BTreeMap<String, u64>,
    /// Allowed accesses per kind of operation.
    pub by_action: BTreeMap<String, u64>,
    /// Refused attempts.
    pub refused: u64,
    /// Refused attempts per reason.
    pub refused_by_reason: BTreeMap<String, u64>,
}

impl Totals {
    /// Counts one entry.
    pub fn add(&mut self, entry: &Entry) {
        self.entries += 1;
        match &entry.outcome {
            Outcome::Allowed => {
                *self.by_operator.entry(entry.operator.clone()).or_default() += 1;
                *self.by_jurisdiction.entry(entry.jurisdiction.clone()).or_default() += 1;
                *self.by_action.entry(entry.action.clone()).or_default() += 1;
            }
            Outcome::Refused(reason) => {
                self.refused += 1;
                *self.refused_by_reason.entry(reason.clone()).or_default() += 1;
            }
        }
    }
}

/// What a verifier remembers between runs: the last verified head (and its key) and the totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifierState {
    /// The last verified head.
    pub head: SignedTreeHead,
    /// Counts over its entries.
    pub totals: Totals,
}

/// Checks a served head against the last one verified: same key, signature, not smaller. Returns
/// the head; the caller then checks consistency with [`check_consistency`].
pub fn check_head(previous: Option<&SignedTreeHead>, served: &SignedTreeHead) -> Result<TreeHead, VerifyError> {
    let head = served.verify()?;
    if let Some(previous) = previous {
        if previous.log_key != served.log_key {
            return Err(VerifyError::KeyChanged {
                pinned: previous.log_key.clone(),
                served: served.log_key.clone(),
            });
        }
        if served.tree_size < previous.tree_size {
            return Err(VerifyError::Truncated {
                before: previous.tree_size,
                now: served.tree_size,
            });
        }
    }
    Ok(head)
}

/// Checks that `new` extends the previously verified head with `proof`.
pub fn check_consistency(previous: &SignedTreeHead, new: &TreeHead, proof: &[Hash]) -> Result<(), VerifyError> {
    let inconsistent = VerifyError::Inconsistent {
        before: previous.tree_size,
        now: new.tree_size,
    };
    let old_root = decode_hash(&previous.root_hash).ok_or(inconsistent.clone())?;
    merkle::verify_consistency(previous.tree_size, new.tree_size, &old_root, &new.root_hash, proof)
        .map_err(|_| inconsistent)
}

/// Checks that `bytes` is entry `index` of the log under `head`, and parses it.
pub fn check_entry(index: u64, bytes: &[u8], head: &TreeHead, proof: &[Hash]) -> Result<Entry, VerifyError> {
    merkle::verify_inclusion(index, head.tree_size, &merkle::leaf_hash(bytes), proof, &head.root_hash)
        .map_err(|_| VerifyError::NotIncluded { index })?;
    Entry::from_bytes(bytes).map_err(|error| VerifyError::MalformedEntry {
        index,
        reason: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::merkle::{consistency_proof, inclusion_proof, leaf_hash, root};

    fn entry(action: &str, outcome: Outcome) -> Vec<u8> {
        Entry {
            time: 1,
            operator: "ops".into(),
            jurisdiction: "jp".into(),
            source: "127.0.0.1".into(),
            action: action.into(),
            reason: "T-1".into(),
            outcome,
            subjects: vec![],
            details: BTreeMap::new(),
            nonce: "00".into(),
        }
        .to_bytes()
    }

    fn head(leaves: &[Hash], key: &SigningKey) -> SignedTreeHead {
        TreeHead {
            tree_size: leaves.len() as u64,
            timestamp: 10,
            root_hash: root(leaves),
        }
        .sign(key)
    }

    #[test]
    fn an_honest_log_verifies_and_is_counted() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let entries = [
            entry("suspend_account", Outcome::Allowed),
            entry("read_report", Outcome::Allowed),
            entry("purge_account", Outcome::Refused("bad signature".into())),
        ];
        let leaves: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();
        let first = head(&leaves[..1], &key);
        let second = head(&leaves, &key);
        let new = check_head(Some(&first), &second).unwrap();
        check_consistency(&first, &new, &consistency_proof(&leaves, 1).unwrap()).unwrap();
        let mut totals = Totals::default();
        for (i, bytes) in entries.iter().enumerate() {
            let proof = inclusion_proof(&leaves, i as u64).unwrap();
            totals.add(&check_entry(i as u64, bytes, &new, &proof).unwrap());
        }
        assert_eq!(totals.entries, 3);
        assert_eq!(totals.refused, 1);
        assert_eq!(totals.by_operator["ops"], 2);
        assert_eq!(totals.by_action["read_report"], 1);
    }

    #[test]
    fn truncation_forks_and_key_changes_are_named() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let leaves: Vec<Hash> = (0..5).map(|i| leaf_hash(&[i])).collect();
        let big = head(&leaves, &key);
        let small = head(&leaves[..3], &key);
        assert_eq!(
            check_head(Some(&big), &small),
            Err(VerifyError::Truncated { before: 5, now: 3 })
        );
        let mut forked_leaves = leaves.clone();
        forked_leaves[1] = leaf_hash(b"other");
        forked_leaves.push(leaf_hash(b"more"));
        let forked = head(&forked_leaves, &key);
        let new = check_head(Some(&big), &forked).unwrap();
        let proof = consistency_proof(&forked_leaves, 5).unwrap();
        assert_eq!(
            check_consistency(&big, &new, &proof),
            Err(VerifyError::Inconsistent { before: 5, now: 6 })
        );
        let other_key = head(&leaves, &SigningKey::from_bytes(&[2; 32]));
        assert!(matches!(
            check_head(Some(&big), &other_key),
            Err(VerifyError::KeyChanged { .. })
        ));
    }
}
