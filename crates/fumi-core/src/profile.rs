//! The encrypted profile: display name and username, sealed under a per-account profile key.
//!
//! The server stores the sealed profile as an opaque blob; contacts receive the profile key inside
//! MLS messages and open the blob themselves.

use fumi_proto::AccountId;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{padding, sealing};

/// Maximum display-name length in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 64;

/// Why a profile could not be opened or built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProfileError {
    /// Wrong key, wrong account, or the blob was altered.
    #[error("the profile could not be decrypted (wrong key or altered data)")]
    Decrypt,
    /// The decrypted profile is not in a known format.
    #[error("the profile is malformed")]
    Malformed,
    /// The display name is empty or too long.
    #[error("a display name is 1 to {MAX_DISPLAY_NAME_CHARS} characters")]
    InvalidName,
}

symmetric_key!(
    /// A 256-bit symmetric key that seals one account's profile.
    ProfileKey
);

/// What a profile holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Format version; 1.
    pub v: u32,
    /// Display name chosen by the user.
    pub name: String,
    /// Full username (`alice.42`), if the account has one.
    #[serde(default)]
    pub username: Option<String>,
    /// SHA-256 (hex) of the avatar image, if the account has one; the sealed image is fetched
    /// separately and checked against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
}

impl Profile {
    /// A version-1 profile; checks the display name.
    pub fn new(name: &str, username: Option<String>) -> Result<Self, ProfileError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > MAX_DISPLAY_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(ProfileError::InvalidName);
        }
        Ok(Self {
            v: 1,
            name: name.to_owned(),
            username,
            avatar: None,
        })
    }

    /// Seals the profile for `account`: XChaCha20-Poly1305 with a random nonce, the account id as
    /// associated data (so a sealed profile cannot be replayed as another account's), the
    /// plaintext Padmé-padded.
    pub fn seal(&self, key: &ProfileKey, account: AccountId, rng: &mut impl RngCore) -> Vec<u8> {
        let plaintext = padding::pad(&serde_json::to_vec(self).expect("profile serialises"));
        sealing::seal(key.as_bytes(), &associated_data(account), &plaintext, rng)
    }

    /// Opens a profile sealed by [`Profile::seal`].
    pub fn open(sealed: &[u8], key: &ProfileKey, account: AccountId) -> Result<Self, ProfileError> {
        let plaintext =
            sealing::open(key.as_bytes(), &associated_data(account), sealed).ok_or(ProfileError::Decrypt)?;
        let json = padding::unpad(&plaintext).map_err(|_| ProfileError::Malformed)?;
        let profile: Profile = serde_json::from_slice(json).map_err(|_| ProfileError::Malformed)?;
        let mut checked = Profile::new(&profile.name, profile.username).map_err(|_| ProfileError::Malformed)?;
        checked.avatar = profile
            .avatar
            .filter(|digest| digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()));
        Ok(checked)
    }
}

/// Seals an avatar image under the profile key, bound to the account.
pub fn seal_avatar(image: &[u8], key: &ProfileKey, account: AccountId, rng: &mut impl RngCore) -> Vec<u8> {
    sealing::seal(key.as_bytes(), &avatar_label(account), image, rng)
}

/// Opens an avatar sealed by [`seal_avatar`].
pub fn open_avatar(sealed: &[u8], key: &ProfileKey, account: AccountId) -> Result<Vec<u8>, ProfileError> {
    sealing::open(key.as_bytes(), &avatar_label(account), sealed).ok_or(ProfileError::Decrypt)
}

fn avatar_label(account: AccountId) -> Vec<u8> {
    [b"fumi avatar v1".as_slice(), account.as_bytes()].concat()
}

fn associated_data(account: AccountId) -> Vec<u8> {
    [b"fumi profile v1".as_slice(), account.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open() {
        let mut rng = rand::rng();
        let key = ProfileKey::generate(&mut rng);
        let account = AccountId::from_bytes([7; 16]);
        let profile = Profile::new("Alice Example", Some("alice.42".into())).unwrap();
        let sealed = profile.seal(&key, account, &mut rng);
        assert!(!sealed.windows(5).any(|w| w == b"Alice"));
        assert_eq!(Profile::open(&sealed, &key, account).unwrap(), profile);
        let other = AccountId::from_bytes([8; 16]);
        assert_eq!(Profile::open(&sealed, &key, other), Err(ProfileError::Decrypt));
        let mut tampered = sealed.clone();
        tampered[30] ^= 1;
        assert_eq!(Profile::open(&tampered, &key, account), Err(ProfileError::Decrypt));
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(Profile::new("  ", None), Err(ProfileError::InvalidName));
        assert_eq!(Profile::new(&"x".repeat(65), None), Err(ProfileError::InvalidName));
        assert_eq!(Profile::new("a\u{7}b", None), Err(ProfileError::InvalidName));
    }
}
