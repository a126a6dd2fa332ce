//! Safety numbers: what two people compare in person to know that each holds the other's real
//! identity key, so that no one (the operator included) sits in between.
//!
//! The construction is Signal's numeric fingerprint (version 0): for each party, SHA-512 iterated
//! 5,200 times over the identity key, seeded with the version, the key and the account id; the
//! first 30 bytes give 30 digits (six 5-byte chunks, each mod 100,000). Both parties' 30 digits,
//! in sorted order, make the 60-digit number, so both see the same one.

use fumi_proto::AccountId;
use sha2::{Digest, Sha512};

const VERSION: u16 = 0;
const ITERATIONS: usize = 5200;

/// The 30 digits that stand for one party's identity key.
fn party_digits(account: AccountId, identity_key: &[u8; 32]) -> String {
    let mut hash = Sha512::new()
        .chain_update(VERSION.to_be_bytes())
        .chain_update(identity_key)
        .chain_update(account.as_bytes())
        .finalize();
    for _ in 1..ITERATIONS {
        hash = Sha512::new().chain_update(hash).chain_update(identity_key).finalize();
    }
    hash[..30]
        .chunks(5)
        .map(|chunk| {
            let value = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", value % 100_000)
        })
        .collect()
}

/// The 60-digit safety number of two parties, the same whichever side computes it.
pub fn safety_number(a: (AccountId, &[u8; 32]), b: (AccountId, &[u8; 32])) -> String {
    let mut parts = [party_digits(a.0, a.1), party_digits(b.0, b.1)];
    parts.sort();
    parts.concat()
}

/// The number in twelve groups of five digits, three lines of four groups.
pub fn display(number: &str) -> String {
    let groups: Vec<&str> = (0..number.len())
        .step_by(5)
        .map(|i| &number[i..(i + 5).min(number.len())])
        .collect();
    groups
        .chunks(4)
        .map(|line| line.join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_see_the_same_number_and_any_key_change_changes_it() {
        let alice = (AccountId::from_bytes([1; 16]), [7u8; 32]);
        let bob = (AccountId::from_bytes([2; 16]), [9u8; 32]);
        let number = safety_number((alice.0, &alice.1), (bob.0, &bob.1));
        assert_eq!(number.len(), 60);
        assert!(number.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(number, safety_number((bob.0, &bob.1), (alice.0, &alice.1)));
        let mallory_key = [8u8; 32];
        assert_ne!(number, safety_number((alice.0, &alice.1), (bob.0, &mallory_key)));
        assert_eq!(display(&number).lines().count(), 3);
        assert_eq!(display(&number).split_whitespace().count(), 12);
    }
}
