//! Merkle tree hashing, inclusion proofs and consistency proofs exactly as RFC 9162 §2.1 defines
//! them (SHA-256, `0x00` leaf prefix, `0x01` node prefix), so that any Certificate Transparency
//! tooling can check Fumi's log.
//!
//! Proof generation works from the list of leaf hashes; the log of operator accesses is small
//! (thousands of entries a year), so recomputing subtrees is cheap and needs no node cache.

use sha2::{Digest, Sha256};
use thiserror::Error;

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// Why a proof was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProofError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is outside a tree of {tree_size} entries")]
    IndexOutOfRange {
        /// The index.
        index: u64,
        /// The tree size.
        tree_size: u64,
    },
    /// The sizes do not describe an older and a newer tree.
    #[error("cannot prove consistency from size {first} to size {second}")]
    BadSizes {
        /// The older size.
        first: u64,
        /// The newer size.
        second: u64,
    },
    /// The proof has the wrong number of hashes or does not lead to the expected root.
    #[error("the proof does not lead to the signed root")]
    Mismatch,
}

/// `HASH(0x00 || entry)`: the hash of one log entry.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(entry);
    hasher.finalize().into()
}

/// `HASH(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The largest power of two smaller than `n` (for `n > 1`).
fn split(n: usize) -> usize {
    debug_assert!(n > 1);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH: the root of the tree over these leaf hashes (`SHA-256("")` for the empty tree).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// PATH(m, D[n]): the inclusion proof of leaf `index` in the tree over `leaves`.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Result<Vec<Hash>, ProofError> {
    let tree_size = leaves.len() as u64;
    if index >= tree_size {
        return Err(ProofError::IndexOutOfRange { index, tree_size });
    }
    let mut proof = Vec::new();
    path(index as usize, leaves, &mut proof);
    Ok(proof)
}

fn path(m: usize, leaves: &[Hash], proof: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &leaves[..k], proof);
        proof.push(root(&leaves[k..]));
    } else {
        path(m - k, &leaves[k..], proof);
        proof.push(root(&leaves[..k]));
    }
}

/// PROOF(m, D[n]): the consistency proof between the tree of the first `first` leaves and the
/// tree over all `leaves`.
pub fn consistency_proof(leaves: &[Hash], first: u64) -> Result<Vec<Hash>, ProofError> {
    let second = leaves.len() as u64;
    if first > second {
        return Err(ProofError::BadSizes { first, second });
    }
    let mut proof = Vec::new();
    if first > 0 && first < second {
        subproof(first as usize, leaves, true, &mut proof);
    }
    Ok(proof)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool, proof: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !complete {
            proof.push(root(leaves));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &leaves[..k], complete, proof);
        proof.push(root(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, proof);
        proof.push(root(&leaves[..k]));
    }
}

/// Checks that `leaf` is entry `index` of the tree of `tree_size` entries with root `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    tree_size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= tree_size {
        return Err(ProofError::IndexOutOfRange { index, tree_size });
    }
    let (mut f, mut s) = (index, tree_size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(ProofError::Mismatch);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s == 0 && r == *root {
        Ok(())
    } else {
        Err(ProofError::Mismatch)
    }
}

/// Checks that the tree of `second` entries with root `second_root` extends the tree of `first`
/// entries with root `first_root`: nothing was removed, changed or reordered (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if first > second {
        return Err(ProofError::BadSizes { first, second });
    }
    if first == second {
        return if proof.is_empty() && first_root == second_root {
            Ok(())
        } else {
            Err(ProofError::Mismatch)
        };
    }
    if first == 0 {
        // Every tree extends the empty one.
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::Mismatch)
        };
    }
    if proof.is_empty() {
        return Err(ProofError::Mismatch);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return Err(ProofError::Mismatch);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if fr == *first_root && sr == *second_root && s == 0 {
        Ok(())
    } else {
        Err(ProofError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(format!("entry {i}").as_bytes())).collect()
    }

    #[test]
    fn matches_the_rfc_definition_for_small_trees() {
        let l = leaves(3);
        assert_eq!(root(&l), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
        assert_eq!(root(&[]), <[u8; 32]>::from(Sha256::digest([])));
        // Known answer: SHA-256 of the empty string and of "\0".
        assert_eq!(
            hex::encode(root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn every_inclusion_and_consistency_proof_up_to_40_leaves_verifies() {
        let all = leaves(40);
        for n in 1..=all.len() {
            let tree = &all[..n];
            let r = root(tree);
            for i in 0..n {
                let proof = inclusion_proof(tree, i as u64).unwrap();
                verify_inclusion(i as u64, n as u64, &tree[i], &proof, &r).unwrap();
                // The same proof does not place another leaf there.
                let other = leaf_hash(b"forged");
                assert_eq!(
                    verify_inclusion(i as u64, n as u64, &other, &proof, &r),
                    Err(ProofError::Mismatch)
                );
            }
            for m in 0..=n {
                let proof = consistency_proof(tree, m as u64).unwrap();
                verify_consistency(m as u64, n as u64, &root(&tree[..m]), &r, &proof).unwrap();
            }
        }
    }

    proptest! {
        /// A log whose old part was changed, or that was cut and regrown, is not consistent with
        /// its earlier head.
        #[test]
        fn rewritten_history_fails_consistency(
            (n, m, changed) in (2usize..64)
                .prop_flat_map(|n| (Just(n), 1..n))
                .prop_flat_map(|(n, m)| (Just(n), Just(m), 0..m))
        ) {
            let honest = leaves(n);
            let mut rewritten = honest.clone();
            rewritten[changed] = leaf_hash(b"rewritten");
            let proof = consistency_proof(&rewritten, m as u64).unwrap();
            prop_assert_eq!(
                verify_consistency(m as u64, n as u64, &root(&honest[..m]), &root(&rewritten), &proof),
                Err(ProofError::Mismatch)
            );
        }

        /// Changing any hash of a valid inclusion proof, or the index, breaks it.
        #[test]
        fn altered_inclusion_proofs_fail(
            (n, i) in (2usize..64).prop_flat_map(|n| (Just(n), 0..n)),
            flip in 0usize..8,
        ) {
            let tree = leaves(n);
            let r = root(&tree);
            let mut proof = inclusion_proof(&tree, i as u64).unwrap();
            let k = flip % proof.len();
            proof[k][0] ^= 1;
            prop_assert!(verify_inclusion(i as u64, n as u64, &tree[i], &proof, &r).is_err());
            let good = inclusion_proof(&tree, i as u64).unwrap();
            let other = (i + 1) % n;
            prop_assert!(verify_inclusion(other as u64, n as u64, &tree[i], &good, &r).is_err());
        }
    }
}
