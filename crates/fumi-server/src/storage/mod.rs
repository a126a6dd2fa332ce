//! The server's durable state, behind one trait so that backends (SQLite today, PostgreSQL for
//! scale-out) are interchangeable without touching the handlers.
//!
//! Every value a user could read is typed [`Ciphertext`]: the storage layer moves opaque bytes
//! and has no way to open them.

mod sqlite;

pub use sqlite::SqliteStorage;

use async_trait::async_trait;
use fumi_proto::{AccountId, DeviceId, GroupId, MessageId};
use thiserror::Error;

/// Bytes the server stores and forwards but cannot read: MLS messages, KeyPackages, sealed
/// profiles. `Debug` prints only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct Ciphertext(pub Vec<u8>);

impl std::fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ciphertext({} bytes)", self.0.len())
    }
}

/// Errors of storage operations. Every variant but `Database` is the caller's fault and maps to
/// a 4xx answer.
#[derive(Debug, Error)]
pub enum StorageError {
    /// The username hash belongs to another account.
    #[error("username taken")]
    UsernameTaken,
    /// A commit for an epoch that is not the group's current one.
    #[error("epoch conflict, the group is at epoch {current}")]
    EpochConflict {
        /// The epoch the next commit must be made in.
        current: u64,
    },
    /// The message id was used before with a different body.
    #[error("message id reused with a different body")]
    MessageIdReused,
    /// The sender is not in the group's roster (never added, or removed).
    #[error("sender is not a member of the group")]
    NotMember,
    /// A non-commit message for a group the server has never seen a commit for.
    #[error("unknown group")]
    UnknownGroup,
    /// A recipient device does not exist.
    #[error("unknown recipient device")]
    UnknownDevice,
    /// The requested account does not exist.
    #[error("unknown account")]
    UnknownAccount,
    /// The device has no KeyPackage left and no last-resort one.
    #[error("a device has no key package")]
    NoKeyPackage,
    /// The backend failed: our problem, not the client's.
    #[error("database: {0}")]
    Database(String),
}

/// The authentication record of a device.
#[derive(Debug, Clone)]
pub struct DeviceAuth {
    /// The device's account.
    pub account: AccountId,
    /// SHA-256 of the device secret.
    pub secret_hash: [u8; 32],
    /// Whether the account is suspended.
    pub suspended: bool,
}

/// Public keys of an account.
#[derive(Debug, Clone)]
pub struct AccountRecord {
    /// Ed25519 identity key.
    pub identity_key: Vec<u8>,
    /// The account's devices.
    pub devices: Vec<DeviceId>,
}

/// One message body and the mailboxes it goes to.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The MLS message.
    pub body: Ciphertext,
    /// Recipient devices.
    pub recipients: Vec<DeviceId>,
}

/// A message handed to the delivery service, already validated by the handler.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The authenticated sending device.
    pub sender: DeviceId,
    /// Client-chosen id.
    pub message_id: MessageId,
    /// SHA-256 over everything submitted, to tell a retry from a reuse of the id.
    pub digest: [u8; 32],
    /// The group named in the MLS framing.
    pub group: GroupId,
    /// For a commit: the epoch it was made in.
    pub commit_epoch: Option<u64>,
    /// The message and, for a commit that adds members, the Welcome.
    pub deliveries: Vec<Delivery>,
    /// For a commit: devices it removes from the group's roster.
    pub removed: Vec<DeviceId>,
    /// Acceptance time, ms since the Unix epoch.
    pub now: u64,
    /// When undelivered copies expire, ms since the Unix epoch.
    pub expires_at: u64,
}

/// Result of a successful submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Stored now.
    Accepted {
        /// Acceptance time.
        accepted_at: u64,
    },
    /// The same id and body were accepted before; nothing was stored again.
    Duplicate {
        /// The first acceptance time.
        accepted_at: u64,
    },
}

/// A queued envelope.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Mailbox sequence number.
    pub seq: u64,
    /// The message.
    pub body: Ciphertext,
    /// Acceptance time.
    pub received_at: u64,
}

/// Counts for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StorageStats {
    /// Accounts.
    pub accounts: u64,
    /// Devices.
    pub devices: u64,
    /// Envelopes waiting in mailboxes.
    pub queued_envelopes: u64,
}

/// The server's durable state. Implementations must make every method atomic and durable
/// before returning `Ok`.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Creates an account and its first device.
    async fn create_account(
        &self,
        account: AccountId,
        identity_key: &[u8],
        device: DeviceId,
        secret_hash: &[u8; 32],
        now: u64,
    ) -> Result<(), StorageError>;
    /// The authentication record of a device.
    async fn device_auth(&self, device: DeviceId) -> Result<Option<DeviceAuth>, StorageError>;
    /// Public keys and devices of an account.
    async fn account(&self, account: AccountId) -> Result<Option<AccountRecord>, StorageError>;
    /// Binds a username hash to an account, replacing the account's previous one.
    async fn claim_username(&self, account: AccountId, hash: &[u8; 32]) -> Result<(), StorageError>;
    /// The account holding a username hash.
    async fn lookup_username(&self, hash: &[u8; 32]) -> Result<Option<AccountId>, StorageError>;
    /// Stores an account's sealed profile.
    async fn put_profile(&self, account: AccountId, sealed: Ciphertext, now: u64) -> Result<(), StorageError>;
    /// An account's sealed profile.
    async fn profile(&self, account: AccountId) -> Result<Option<Ciphertext>, StorageError>;
    /// Adds one-time KeyPackages and optionally replaces the last-resort one; returns the stock.
    async fn add_key_packages(
        &self,
        device: DeviceId,
        one_time: Vec<Ciphertext>,
        last_resort: Option<Ciphertext>,
    ) -> Result<u64, StorageError>;
    /// Number of one-time KeyPackages in stock for a device.
    async fn key_package_count(&self, device: DeviceId) -> Result<u64, StorageError>;
    /// Takes one KeyPackage for every device of each account (one-time ones are deleted).
    async fn claim_key_packages(
        &self,
        accounts: &[AccountId],
    ) -> Result<Vec<(AccountId, DeviceId, Ciphertext)>, StorageError>;
    /// Checks that the sender is in the group's roster and commits are ordered, updates the
    /// roster on a commit, and queues a message in every recipient's mailbox, atomically.
    async fn submit(&self, submission: Submission) -> Result<SubmitOutcome, StorageError>;
    /// Envelopes of a device's mailbox after `after_seq`, in order.
    async fn fetch(&self, device: DeviceId, after_seq: u64, limit: u32) -> Result<Vec<Envelope>, StorageError>;
    /// Deletes acknowledged envelopes of a device's mailbox; returns how many were deleted.
    async fn acknowledge(&self, device: DeviceId, seqs: &[u64]) -> Result<u64, StorageError>;
    /// Deletes expired messages and idempotency records; returns envelopes deleted.
    async fn purge_expired(&self, now: u64) -> Result<u64, StorageError>;
    /// Counts for metrics.
    async fn stats(&self) -> Result<StorageStats, StorageError>;
}
