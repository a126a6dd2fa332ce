//! Usernames with a numeric discriminator (`alice.42`) and the hash the server stores instead.
//!
//! Usernames are low-entropy and the operator holds the lookup table, so the hash is memory-hard
//! (Argon2id with fixed, public parameters and salt): every guess costs the operator as much as it
//! costs a client to look a name up once.

use argon2::{Algorithm, Argon2, Params, Version};
use thiserror::Error;

/// Why a username was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UsernameError {
    /// The nickname part is not 3–32 characters of `a-z`, `0-9` and `_`, starting with a letter.
    #[error("a username is 3 to 32 letters, digits or underscores, starting with a letter")]
    InvalidNickname,
    /// The discriminator is not 2–9 digits, or is all zeros.
    #[error("the number after the dot must be 2 to 9 digits, not all zeros (e.g. alice.42)")]
    InvalidDiscriminator,
    /// There is no `.NN` part.
    #[error("a full username has a number after a dot, e.g. alice.42")]
    MissingDiscriminator,
}

/// A validated, normalised username: `nickname.discriminator`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username {
    nickname: String,
    discriminator: String,
}

/// Argon2id memory cost in KiB (19 MiB, the OWASP recommendation for interactive use).
const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
const ARGON2_ITERATIONS: u32 = 2;
/// Public and fixed: the hash must be the same on every client so lookups work.
const USERNAME_HASH_SALT: &[u8] = b"fumi username hash v1";

impl Username {
    /// Checks a nickname (the part before the dot); normalises it to lowercase.
    pub fn validate_nickname(nickname: &str) -> Result<String, UsernameError> {
        let nickname = nickname.to_ascii_lowercase();
        let valid_chars = nickname
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        let starts_with_letter = nickname.chars().next().is_some_and(|c| c.is_ascii_lowercase());
        if !(3..=32).contains(&nickname.len()) || !valid_chars || !starts_with_letter {
            return Err(UsernameError::InvalidNickname);
        }
        Ok(nickname)
    }

    /// Builds a username from a nickname and a discriminator number, zero-padded to two digits.
    pub fn new(nickname: &str, discriminator: u32) -> Result<Self, UsernameError> {
        Self::parse(&format!("{nickname}.{discriminator:02}"))
    }

    /// Parses `nickname.NN`; case-insensitive.
    pub fn parse(text: &str) -> Result<Self, UsernameError> {
        let (nickname, discriminator) = text
            .trim()
            .rsplit_once('.')
            .ok_or(UsernameError::MissingDiscriminator)?;
        let nickname = Self::validate_nickname(nickname)?;
        let digits_ok = (2..=9).contains(&discriminator.len()) && discriminator.chars().all(|c| c.is_ascii_digit());
        if !digits_ok || discriminator.chars().all(|c| c == '0') {
            return Err(UsernameError::InvalidDiscriminator);
        }
        Ok(Self {
            nickname,
            discriminator: discriminator.to_owned(),
        })
    }

    /// The nickname part.
    pub fn nickname(&self) -> &str {
        &self.nickname
    }

    /// The 32-byte Argon2id hash the server indexes.
    pub fn hash(&self) -> [u8; 32] {
        let params = Params::new(ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, 1, Some(32)).expect("valid fixed parameters");
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut out = [0u8; 32];
        argon
            .hash_password_into(self.to_string().as_bytes(), USERNAME_HASH_SALT, &mut out)
            .expect("fixed parameters and output length are valid");
        out
    }
}

impl std::fmt::Display for Username {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.nickname, self.discriminator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let name = Username::parse("Alice.42").unwrap();
        assert_eq!(name.to_string(), "alice.42");
        assert_eq!(Username::new("bob", 7).unwrap().to_string(), "bob.07");
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(Username::parse("alice"), Err(UsernameError::MissingDiscriminator));
        assert_eq!(Username::parse("al.42"), Err(UsernameError::InvalidNickname));
        assert_eq!(Username::parse("9lives.42"), Err(UsernameError::InvalidNickname));
        assert_eq!(Username::parse("alice.4"), Err(UsernameError::InvalidDiscriminator));
        assert_eq!(Username::parse("alice.00"), Err(UsernameError::InvalidDiscriminator));
        assert_eq!(Username::parse("alice.4x"), Err(UsernameError::InvalidDiscriminator));
    }

    /// Known-answer test: the hash is part of the protocol; changing it orphans every username.
    #[test]
    fn hash_is_stable() {
        let hash = Username::parse("alice.42").unwrap().hash();
        assert_eq!(hash, Username::parse("ALICE.42").unwrap().hash());
        assert_ne!(hash, Username::parse("alice.43").unwrap().hash());
        assert_eq!(
            hex::encode(hash),
            include_str!("../testdata/username_hash_alice_42.hex").trim()
        );
    }
}
