//! Safety numbers: comparing identity keys in person, and trusting a changed key only after that.

use fumi_core::AccountIdentity;
use fumi_core::safety::safety_number;
use fumi_core::store::ClientStore;
use fumi_proto::AccountId;
use serde::Serialize;

use crate::{ClientError, FumiClient};

/// The safety number with a contact, and what this device knows of it.
#[derive(Debug, Clone, Serialize)]
pub struct SafetyCheck {
    /// The contact's username.
    pub username: String,
    /// 60 digits, the same on both sides when each holds the other's real identity key.
    pub number: String,
    /// Whether the user confirmed this number in person (`fumi verify NAME --confirm`).
    pub verified: bool,
    /// Whether the server now names another identity key than the one pinned: the number shown is
    /// for the new key, which this device refuses until the user confirms it.
    pub changed: bool,
}

impl FumiClient {
    /// The safety number with `username`. The first time an account is met, its registered
    /// identity key is pinned (as when messaging it).
    pub async fn safety_number(&self, username: &str) -> Result<SafetyCheck, ClientError> {
        let (account, key, changed) = self.current_identity_key(username).await?;
        Ok(SafetyCheck {
            username: username.to_owned(),
            number: self.number_with(account, &key),
            verified: !changed && self.store.is_verified(account)?,
            changed,
        })
    }

    /// Marks `username`'s current identity key verified, after the user compared the safety
    /// number in person. If the key had changed, this is how the new key comes to be trusted.
    pub async fn confirm_safety_number(&self, username: &str) -> Result<SafetyCheck, ClientError> {
        let (account, key, changed) = self.current_identity_key(username).await?;
        self.store.set_verified(account, &key)?;
        Ok(SafetyCheck {
            username: username.to_owned(),
            number: self.number_with(account, &key),
            verified: true,
            changed,
        })
    }

    /// The account, the identity key the server names for it (and the key directory lists), and
    /// whether that differs from the pinned one (pinning it if none was).
    async fn current_identity_key(&self, username: &str) -> Result<(AccountId, [u8; 32], bool), ClientError> {
        let account = self.lookup(username).await?;
        if account == self.account.account_id {
            return Err(ClientError::Usage("that is your own account".into()));
        }
        let key = self.registered_identity_key(account).await?;
        // The number is only worth comparing if it is the key everyone is shown.
        self.check_identity_in_directory(account, &key).await?;
        let changed = !self.store.check_identity_key(account, &key)?;
        Ok((account, key, changed))
    }

    fn number_with(&self, account: AccountId, key: &[u8; 32]) -> String {
        let own = AccountIdentity::from_secret(&self.account.identity_secret).public_key();
        safety_number((self.account.account_id, &own), (account, key))
    }
}
