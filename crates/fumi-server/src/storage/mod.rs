//! The server's durable state, behind one trait so that backends (SQLite today, PostgreSQL for
//! scale-out) are interchangeable without touching the handlers.
//!
//! Every value a user could read is typed [`Ciphertext`]: the storage layer moves opaque bytes
//! and has no way to open them.

mod postgres;
mod sqlite;

pub use postgres::PostgresStorage;
pub use sqlite::SqliteStorage;

use async_trait::async_trait;
use fumi_proto::{AccountId, BlobId, ChannelId, DeviceId, GroupId, MessageId};
use thiserror::Error;

/// The backend failed: our problem, not the client's.
pub(crate) fn db(error: sqlx::Error) -> StorageError {
    StorageError::Database(error.to_string())
}

/// Database integers are signed: a count or time beyond `i64` saturates.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A negative stored count or time (never written) reads as 0.
pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(crate) fn account_id(bytes: &[u8]) -> Result<AccountId, StorageError> {
    AccountId::from_slice(bytes).map_err(|_| StorageError::Database("corrupt account id".into()))
}

pub(crate) fn device_id(bytes: &[u8]) -> Result<DeviceId, StorageError> {
    DeviceId::from_slice(bytes).map_err(|_| StorageError::Database("corrupt device id".into()))
}

/// Devices (not removed) without a signature key, each with its oldest stored KeyPackage; the
/// same SQL on both backends.
pub(crate) const DEVICES_WITHOUT_SIGNATURE_KEY: &str = "SELECT d.id, k.key_package FROM devices d \
     JOIN key_packages k ON k.id = (SELECT MIN(id) FROM key_packages WHERE device_id = d.id) \
     WHERE d.signature_key IS NULL AND d.removed_at IS NULL";

pub(crate) fn devices_with_key_packages(
    rows: Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<Vec<(DeviceId, Ciphertext)>, StorageError> {
    rows.into_iter()
        .map(|(id, key_package)| Ok((device_id(&id)?, Ciphertext(key_package))))
        .collect()
}

pub(crate) fn blob_id(bytes: &[u8]) -> Result<BlobId, StorageError> {
    BlobId::from_slice(bytes).map_err(|_| StorageError::Database("corrupt blob id".into()))
}

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
#[derive(Debug, Clone, Error)]
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
    /// A recipient's mailbox is full.
    #[error("a recipient's mailbox is full")]
    MailboxFull {
        /// The limit.
        limit: u64,
    },
    /// No open link slot has this token (never created, expired, or already used).
    #[error("unknown or used link")]
    UnknownLink,
    /// A device id chosen by a new device is taken.
    #[error("device id taken")]
    DeviceIdTaken,
    /// The device does not belong to the caller's account.
    #[error("not a device of this account")]
    NotOwnDevice,
    /// No invite has this token.
    #[error("unknown invite")]
    UnknownInvite,
    /// The invite was redeemed before.
    #[error("invite already used")]
    InviteUsed,
    /// Storing the blob would exceed the account's quota.
    #[error("blob quota exceeded")]
    QuotaExceeded {
        /// The quota in bytes.
        quota: u64,
    },
    /// No such blob (never created, expired, or deleted after every recipient fetched it).
    #[error("unknown blob")]
    UnknownBlob,
    /// The device may not touch this blob.
    #[error("not a recipient of the blob")]
    NotBlobRecipient,
    /// Another writer appended to the audit log first; retry on the new size.
    #[error("the audit log grew concurrently")]
    AuditConflict,
    /// No channel has this id.
    #[error("unknown channel")]
    UnknownChannel,
    /// The caller's account did not create the channel.
    #[error("not the channel's owner")]
    NotChannelOwner,
    /// A channel with this id exists.
    #[error("channel exists")]
    ChannelExists,
    /// A post's number is not the next one (and not an identical retry of a stored one).
    #[error("channel post number conflict, newest is {latest}")]
    ChannelSeqConflict {
        /// The channel's newest post number.
        latest: u64,
    },
    /// A per-account limit (channels, subscriptions) is reached.
    #[error("at most {limit} {what}")]
    TooMany {
        /// What is counted.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
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
    /// Whether the device was removed from its account.
    pub removed: bool,
    /// Where the account's data lives.
    pub residency: Residency,
}

/// A blob's bookkeeping (its bytes live in the blob store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRecord {
    /// The blob.
    pub id: BlobId,
    /// The uploading account (charged for quota).
    pub owner_account: AccountId,
    /// The uploading device.
    pub owner_device: DeviceId,
    /// Announced size in bytes.
    pub size: u64,
    /// True once every byte arrived.
    pub complete: bool,
    /// Devices that may still download it.
    pub pending: Vec<DeviceId>,
    /// When it is deleted even if not every recipient fetched it.
    pub expires_at: u64,
    /// For a channel's file: the channel. Any device may download it (subscribers hold the
    /// key), and it stays until it expires; `pending` is empty.
    pub channel: Option<ChannelId>,
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
    /// A mailbox holding this many envelopes takes no more application messages (commits and
    /// the Welcomes that travel with them still go through, so a group can always remove an
    /// absent device).
    pub max_queued: u64,
}

/// Result of a successful submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Stored now.
    Accepted {
        /// Acceptance time.
        accepted_at: u64,
        /// Whether a recipient's account lives in another region (its envelope is to be
        /// forwarded there).
        elsewhere: bool,
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

/// What the admin API shows of an account: ids, counts and sizes (there is nothing else).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AccountSummary {
    /// The account.
    pub account: AccountId,
    /// Creation time, ms since the Unix epoch.
    pub created_at: u64,
    /// Whether it is suspended.
    pub suspended: bool,
    /// Devices not removed.
    pub devices: u64,
    /// Envelopes waiting in its devices' mailboxes.
    pub queued_envelopes: u64,
    /// Their bytes.
    pub queued_bytes: u64,
    /// KeyPackages in stock.
    pub key_packages: u64,
    /// Blobs it uploaded that are still stored, and their announced bytes.
    pub blobs: u64,
    /// Announced bytes of those blobs.
    pub blob_bytes: u64,
    /// The region holding its data (empty here: the main database's own; the admin API names it).
    pub region: String,
}

/// An abuse report as listed to moderators (its content is sealed to the moderation key).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReportSummary {
    /// Report number.
    pub id: u64,
    /// When it was filed, ms since the Unix epoch.
    pub created_at: u64,
    /// Size of the sealed report.
    pub size: u64,
}

/// A channel as stored: its owner, sealed description and counts.
#[derive(Debug, Clone)]
pub struct ChannelRecord {
    /// The account that created it (the only one that may post).
    pub owner: AccountId,
    /// The description sealed under the channel key.
    pub sealed_info: Ciphertext,
    /// Number of subscribed accounts.
    pub subscribers: u64,
    /// Newest post number, 0 before the first.
    pub latest_seq: u64,
}

/// One stored channel post.
#[derive(Debug, Clone)]
pub struct StoredChannelPost {
    /// Its number in the channel.
    pub seq: u64,
    /// The signed post sealed under the channel key.
    pub sealed_post: Ciphertext,
    /// When it was stored, ms since the Unix epoch.
    pub posted_at: u64,
}

/// Per-account limits on channels, checked inside the storing transaction.
#[derive(Debug, Clone, Copy)]
pub struct ChannelLimits {
    /// Channels one account may own.
    pub owned: u64,
    /// Channels one account may subscribe to.
    pub subscriptions: u64,
}

/// One stored value state of the key directory: akd's record for a label at an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDirectoryState {
    /// The directory label (`account:…`, `username:…`).
    pub label: Vec<u8>,
    /// The epoch the value was published in.
    pub epoch: u64,
    /// The value's version for this label.
    pub version: u64,
    /// akd's record, encoded by the key directory module.
    pub record: Vec<u8>,
}

/// What a key directory entry is about: an account or a username hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyDirectoryKind {
    /// An account's identity key and devices.
    Account = 0,
    /// A username hash's holder.
    Username = 1,
}

/// An account or username whose directory value may have changed since the last epoch.
/// `generation` grows with every change, so a change made while an epoch is being published
/// is not forgotten when that epoch clears the mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDirectoryPending {
    /// What changed.
    pub kind: KeyDirectoryKind,
    /// The account id or username hash.
    pub id: Vec<u8>,
    /// The change counter read with the mark.
    pub generation: u64,
}

impl KeyDirectoryKind {
    pub(crate) fn from_db(value: i64) -> Result<Self, StorageError> {
        match value {
            0 => Ok(Self::Account),
            1 => Ok(Self::Username),
            _ => Err(StorageError::Database("corrupt key directory mark".into())),
        }
    }
}

/// The server's durable state. Implementations must make every method atomic and durable
/// before returning `Ok`.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Waits until every connection in use has finished its work, then closes them all; later
    /// calls fail. Called before a database is removed (tests), so nothing still runs in it.
    async fn close(&self);

    /// Creates an account and its first device.
    async fn create_account(
        &self,
        account: AccountId,
        identity_key: &[u8],
        device: DeviceId,
        secret_hash: &[u8; 32],
        region: Option<&str>,
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
    /// Takes one KeyPackage for every device of each account (one-time ones are deleted); if
    /// `only` is not empty, for just those devices.
    async fn claim_key_packages(
        &self,
        accounts: &[AccountId],
        only: &[DeviceId],
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

    // --- linked devices ---------------------------------------------------------------------

    /// Opens a one-time link slot for `account`.
    async fn create_link(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        sealed: Ciphertext,
        now: u64,
        expires_at: u64,
    ) -> Result<(), StorageError>;
    /// The account and sealed bundle of an open, unexpired, unused link slot.
    async fn open_link(&self, token_hash: &[u8; 32], now: u64) -> Result<(AccountId, Ciphertext), StorageError>;
    /// Consumes a link slot of `account`: creates the device and stores its KeyPackages, atomically.
    #[allow(clippy::too_many_arguments)]
    async fn link_device(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        device: DeviceId,
        secret_hash: &[u8; 32],
        one_time: Vec<Ciphertext>,
        last_resort: Option<Ciphertext>,
        now: u64,
    ) -> Result<(), StorageError>;
    /// For a link slot of `account`: the device that used it, if any.
    async fn link_status(&self, token_hash: &[u8; 32], account: AccountId) -> Result<Option<DeviceId>, StorageError>;
    /// Attaches the sealed history pointer to a used link slot of `account` and keeps the slot
    /// until `expires_at`; returns the device that used it.
    async fn set_link_history(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        sealed: Ciphertext,
        expires_at: u64,
    ) -> Result<DeviceId, StorageError>;
    /// The sealed history pointer of the link slot `device` used (`None` if not yet attached).
    async fn link_history(&self, token_hash: &[u8; 32], device: DeviceId) -> Result<Option<Ciphertext>, StorageError>;
    /// Removes a device of `account`: it can no longer authenticate, and its mailbox, KeyPackages
    /// and group rosters are gone. It still counts as a recipient (of the commits removing it),
    /// but nothing is queued for it.
    async fn remove_device(&self, account: AccountId, device: DeviceId, now: u64) -> Result<(), StorageError>;

    // --- invites ----------------------------------------------------------------------------

    /// Registers a one-time invite token of `account`.
    async fn create_invite(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        now: u64,
        expires_at: u64,
    ) -> Result<(), StorageError>;
    /// Marks an invite used; fails if unknown, expired or used before.
    async fn redeem_invite(&self, token_hash: &[u8; 32], account: AccountId, now: u64) -> Result<(), StorageError>;

    // --- blobs and avatars ------------------------------------------------------------------

    /// Records a new blob, refusing it if the owner's blobs would exceed `quota` bytes.
    async fn create_blob(&self, blob: &BlobRecord, quota: u64, now: u64) -> Result<(), StorageError>;
    /// A blob's record.
    async fn blob(&self, id: BlobId) -> Result<Option<BlobRecord>, StorageError>;
    /// Marks a blob complete.
    async fn complete_blob(&self, id: BlobId) -> Result<(), StorageError>;
    /// A recipient is done with a blob; returns true if no recipient is left (delete the bytes).
    async fn blob_fetched(&self, id: BlobId, device: DeviceId) -> Result<bool, StorageError>;
    /// Deletes a blob's record.
    async fn delete_blob(&self, id: BlobId) -> Result<(), StorageError>;
    /// Blobs to delete: expired at `now`, still incomplete after `stale_upload_before`, complete
    /// with no recipient left, or uploaded by a device since removed.
    async fn expired_blobs(&self, now: u64, stale_upload_before: u64) -> Result<Vec<BlobId>, StorageError>;
    /// Stores an account's sealed avatar.
    async fn put_avatar(&self, account: AccountId, sealed: Ciphertext, now: u64) -> Result<(), StorageError>;
    /// An account's sealed avatar.
    async fn avatar(&self, account: AccountId) -> Result<Option<Ciphertext>, StorageError>;

    // --- transparency log -------------------------------------------------------------------

    /// Number of entries in the audit log.
    async fn audit_size(&self) -> Result<u64, StorageError>;
    /// Leaf hashes of the first `size` entries, in order.
    async fn audit_leaf_hashes(&self, size: u64) -> Result<Vec<[u8; 32]>, StorageError>;
    /// Stored bytes of entries `start..end` (clamped to the log's size), in order.
    async fn audit_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StorageError>;
    /// Appends entry number `index` and the signed head of the log it ends, atomically; fails
    /// with [`StorageError::AuditConflict`] if the log does not have exactly `index` entries.
    async fn append_audit(
        &self,
        index: u64,
        entry: &[u8],
        leaf_hash: &[u8; 32],
        signed_head: &str,
    ) -> Result<(), StorageError>;
    /// Remembers an admin request's nonce until `forget_at` (and forgets those past `now`);
    /// false if it is already remembered: the request is a replay.
    async fn remember_admin_nonce(&self, nonce: &str, now: u64, forget_at: u64) -> Result<bool, StorageError>;
    /// Stores the signed head of the empty log, if the log has no head yet.
    async fn init_audit_head(&self, signed_head: &str) -> Result<(), StorageError>;
    /// The latest signed tree head (JSON).
    async fn audit_head(&self) -> Result<Option<String>, StorageError>;
    /// The account's audit key (see `fumi_audit::account_tag`), created on first use.
    async fn audit_key(&self, account: AccountId) -> Result<[u8; 32], StorageError>;

    // --- operator operations ----------------------------------------------------------------

    /// Every account, with counts and sizes.
    async fn account_summaries(&self) -> Result<Vec<AccountSummary>, StorageError>;
    /// Suspends or reinstates an account.
    async fn set_suspended(&self, account: AccountId, suspended: bool) -> Result<(), StorageError>;
    /// Deletes an account and everything stored for it, except the bytes of its blobs, whose ids
    /// are returned for the caller to delete (their records stay until then).
    async fn purge_account(&self, account: AccountId) -> Result<Vec<BlobId>, StorageError>;

    // --- abuse reports ----------------------------------------------------------------------

    /// Stores a report sealed to the moderation key; returns its number.
    async fn create_report(&self, sealed: Ciphertext, now: u64) -> Result<u64, StorageError>;
    /// Every report, oldest first.
    async fn reports(&self) -> Result<Vec<ReportSummary>, StorageError>;
    /// A sealed report.
    async fn report(&self, id: u64) -> Result<Option<Ciphertext>, StorageError>;

    // --- broadcast channels -----------------------------------------------------------------

    /// Creates a channel owned by `owner`.
    async fn create_channel(
        &self,
        channel: ChannelId,
        owner: AccountId,
        sealed_info: Ciphertext,
        now: u64,
        limits: ChannelLimits,
    ) -> Result<(), StorageError>;
    /// Replaces a channel's sealed description (owner only).
    async fn update_channel_info(
        &self,
        channel: ChannelId,
        owner: AccountId,
        sealed_info: Ciphertext,
    ) -> Result<(), StorageError>;
    /// A channel, if it exists.
    async fn channel(&self, channel: ChannelId) -> Result<Option<ChannelRecord>, StorageError>;
    /// Stores post `seq`, which must be the channel's next number; returns false (and changes
    /// nothing) if that exact post is already stored, so retries are idempotent.
    async fn add_channel_post(
        &self,
        channel: ChannelId,
        owner: AccountId,
        post: &StoredChannelPost,
    ) -> Result<bool, StorageError>;
    /// Posts with `seq > after`, oldest first, at most `limit`; [`StorageError::UnknownChannel`]
    /// if there is no such channel.
    async fn channel_posts(
        &self,
        channel: ChannelId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredChannelPost>, StorageError>;
    /// Subscribes (`true`) or unsubscribes an account; both are idempotent.
    async fn set_subscription(
        &self,
        channel: ChannelId,
        account: AccountId,
        subscribed: bool,
        now: u64,
        limits: ChannelLimits,
    ) -> Result<(), StorageError>;
    /// The channels an account subscribes to.
    async fn subscriptions(&self, account: AccountId) -> Result<Vec<ChannelId>, StorageError>;

    // --- key directory ------------------------------------------------------------------------

    /// Stores the records of one key directory operation (tree nodes by key, value states),
    /// atomically: an epoch is published whole or not at all. On a shared database the write is
    /// refused unless `node` still holds the publisher lease (checked under the lease row's
    /// lock), so two publishers can never both write an epoch.
    async fn kt_write(
        &self,
        node: &[u8; 16],
        nodes: Vec<(Vec<u8>, Vec<u8>)>,
        states: Vec<KeyDirectoryState>,
    ) -> Result<(), StorageError>;
    /// Stored tree records (the azks and tree nodes) among `keys`; missing ones are left out.
    async fn kt_nodes(&self, keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError>;
    /// Every stored value state of these labels.
    async fn kt_states(&self, labels: &[Vec<u8>]) -> Result<Vec<KeyDirectoryState>, StorageError>;
    /// Up to `limit` accounts and usernames changed since they were last published. Database
    /// triggers set the marks in the same transaction as the change.
    async fn kt_pending(&self, limit: u32) -> Result<Vec<KeyDirectoryPending>, StorageError>;
    /// Clears marks that were published, unless they changed again since they were read.
    async fn kt_clear_pending(&self, published: &[KeyDirectoryPending]) -> Result<(), StorageError>;
    /// An account's identity key and its devices that have a signature key and are not removed.
    async fn device_keys(
        &self,
        account: AccountId,
    ) -> Result<Option<(Vec<u8>, Vec<(DeviceId, Vec<u8>)>)>, StorageError>;
    /// Records the MLS signature key of a device's KeyPackages if it has none; returns the key
    /// the device has now (an earlier one, if it differs).
    async fn set_signature_key(&self, device: DeviceId, key: &[u8]) -> Result<Vec<u8>, StorageError>;
    /// Takes or renews the right to publish epochs for `ttl_ms` (one publisher per database):
    /// true if this node holds it now.
    async fn kt_lease(&self, node: &[u8; 16], now: u64, ttl_ms: u64) -> Result<bool, StorageError>;
    /// Gives the publisher lease up (at shutdown), so that a restarted node publishes at once.
    async fn kt_release_lease(&self, node: &[u8; 16]) -> Result<(), StorageError>;
    /// Keeps the link proof the device that used a link slot gave (once).
    async fn set_link_proof(&self, token_hash: &[u8; 32], proof: &[u8]) -> Result<(), StorageError>;
    /// The link proof kept for a link slot of `account`.
    async fn link_proof(&self, token_hash: &[u8; 32], account: AccountId) -> Result<Option<Vec<u8>>, StorageError>;
    /// Devices (not removed) without a recorded signature key, each with one of its stored
    /// KeyPackages: devices from before the key directory, whose key is read from those.
    async fn devices_without_signature_key(&self) -> Result<Vec<(DeviceId, Ciphertext)>, StorageError>;
    /// Stores the signed head of a published epoch.
    async fn kt_put_head(&self, epoch: u64, head: &str) -> Result<(), StorageError>;
    /// Signed heads of epochs `from` onwards, in order, at most `limit`.
    async fn kt_heads(&self, from: u64, limit: u32) -> Result<Vec<String>, StorageError>;
    /// The newest epoch with a stored head, and that head.
    async fn kt_latest_head(&self) -> Result<Option<(u64, String)>, StorageError>;

    // Data residency. The main database holds every account's residency; a region's database
    // (same schema, foreign keys to accounts and devices dropped) holds the mailboxes,
    // KeyPackages, profiles and avatars of the accounts living there. See `crate::regions`.

    /// Where an account's own data lives, and any relocation under way.
    async fn residency(&self, account: AccountId) -> Result<Option<Residency>, StorageError>;
    /// Replaces an account's residency by `next` if it is still `expected`; false if not.
    async fn set_residency(
        &self,
        account: AccountId,
        expected: &Residency,
        next: &Residency,
    ) -> Result<bool, StorageError>;
    /// Envelopes in this (main) database for devices whose account lives in `region` and is not
    /// being relocated, oldest first, at most `limit`; only for `devices` if given.
    async fn in_transit(
        &self,
        region: &str,
        devices: Option<&[DeviceId]>,
        limit: u32,
    ) -> Result<Vec<StoredEnvelope>, StorageError>;
    /// Deletes forwarded envelopes, but only those whose account still lives in `region` and is
    /// not being relocated (a relocation that started meanwhile may have missed the copy: such
    /// envelopes stay, to be forwarded again); returns how many were deleted.
    async fn settle_forwarded(&self, region: &str, envelopes: &[(DeviceId, u64)]) -> Result<u64, StorageError>;
    /// A device's envelopes after `after_seq`, in order, at most `limit`, as stored.
    async fn export_envelopes(
        &self,
        device: DeviceId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEnvelope>, StorageError>;
    /// Stores envelopes under their own sequence numbers and message ids; one already present
    /// (same device and number) is skipped. Returns how many were new.
    async fn import_envelopes(&self, envelopes: &[StoredEnvelope]) -> Result<u64, StorageError>;
    /// Deletes every envelope of `devices`; returns how many.
    async fn delete_mailboxes(&self, devices: &[DeviceId]) -> Result<u64, StorageError>;
    /// Every KeyPackage of `devices`, in order of upload.
    async fn export_key_packages(&self, devices: &[DeviceId]) -> Result<Vec<StoredKeyPackage>, StorageError>;
    /// Replaces every KeyPackage of `devices` by `packages` (empty: deletes them), in one
    /// transaction.
    async fn replace_key_packages(
        &self,
        devices: &[DeviceId],
        packages: &[StoredKeyPackage],
    ) -> Result<(), StorageError>;
    /// Claims one KeyPackage of each of `devices` (whose account the caller checked): a
    /// one-time one if any is left, else the last-resort one.
    async fn claim_device_key_packages(
        &self,
        devices: &[DeviceId],
    ) -> Result<Vec<(DeviceId, Ciphertext)>, StorageError>;
    /// Deletes an account's profile and avatar.
    async fn delete_sealed(&self, account: AccountId) -> Result<(), StorageError>;
    /// Makes deleted rows unreadable in the database's files as far as the backend allows
    /// (SQLite: resets the write-ahead log, which still holds older page versions).
    async fn scrub(&self) -> Result<(), StorageError>;
    /// The blobs an account uploaded that are still stored.
    async fn blobs_owned(&self, account: AccountId) -> Result<Vec<BlobId>, StorageError>;
}

/// Where an account's mailboxes, KeyPackages, profile, avatar and blob bytes live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Residency {
    /// The region; `None`: the main database's own region.
    pub region: Option<String>,
    /// A relocation under way.
    pub relocation: Option<Relocation>,
}

/// The two halves of a relocation, each safe to repeat after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relocation {
    /// Copying to the region named (`None`: the main database's own); `region` is the source.
    Copying {
        /// The target region.
        to: Option<String>,
    },
    /// Copied and verified; `region` is the target now, and the source's copies are being
    /// deleted.
    Cleaning {
        /// The source region.
        from: Option<String>,
    },
}

impl Residency {
    /// Encodes as the three columns `region`, `relocating_to`, `relocating_from` (a relocation
    /// names the main region by the empty string, as NULL means "none").
    pub(crate) fn columns(&self) -> (Option<String>, Option<String>, Option<String>) {
        let name = |region: &Option<String>| region.clone().unwrap_or_default();
        match &self.relocation {
            None => (self.region.clone(), None, None),
            Some(Relocation::Copying { to }) => (self.region.clone(), Some(name(to)), None),
            Some(Relocation::Cleaning { from }) => (self.region.clone(), None, Some(name(from))),
        }
    }

    /// Decodes the three columns.
    pub(crate) fn from_columns(
        region: Option<String>,
        relocating_to: Option<String>,
        relocating_from: Option<String>,
    ) -> Self {
        let region_of = |name: String| (!name.is_empty()).then_some(name);
        let relocation = match (relocating_to, relocating_from) {
            (Some(to), _) => Some(Relocation::Copying { to: region_of(to) }),
            (None, Some(from)) => Some(Relocation::Cleaning { from: region_of(from) }),
            (None, None) => None,
        };
        Self { region, relocation }
    }
}

/// An envelope as stored, for forwarding and relocation: the sequence number and message id
/// are the ones the main database gave it, kept wherever it goes, so a device never sees one
/// envelope under two numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// The recipient device.
    pub device: DeviceId,
    /// Its number in the device's mailbox.
    pub seq: u64,
    /// The message's id in the main database.
    pub message_id: u64,
    /// The message.
    pub body: Ciphertext,
    /// Acceptance time.
    pub received_at: u64,
    /// Expiry time.
    pub expires_at: u64,
}

/// A KeyPackage as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKeyPackage {
    /// Its device.
    pub device: DeviceId,
    /// The KeyPackage.
    pub key_package: Ciphertext,
    /// Whether it is the device's last-resort one.
    pub last_resort: bool,
}

/// The storage contract, checked on every backend: SQLite always, PostgreSQL when
/// `FUMI_TEST_POSTGRES_URL` names a database (`.ci/run` sets it), each in a schema of its own.
#[cfg(test)]
pub(crate) mod contract {
    use std::sync::Arc;

    use super::*;

    struct Backend {
        storage: Arc<dyn Storage>,
        device: DeviceId,
        _cleanup: Cleanup,
    }

    enum Cleanup {
        Dir(#[allow(dead_code)] tempfile::TempDir),
        Schema { url: String, schema: String },
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Cleanup::Schema { url, schema } = self {
                let _ = std::process::Command::new("psql")
                    .args([
                        url.as_str(),
                        "-X",
                        "-q",
                        "-c",
                        &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
                    ])
                    .output();
            }
        }
    }

    impl Backend {
        /// Closes the storage (its connections finish their work) before the cleanup runs.
        async fn finish(self) {
            let Backend { storage, _cleanup, .. } = self;
            storage.close().await;
            drop(storage);
            drop(_cleanup);
        }
    }

    async fn backends() -> Vec<Backend> {
        let device = DeviceId::from_bytes([2; 16]);
        let dir = tempfile::tempdir().unwrap();
        let mut backends = vec![Backend {
            storage: Arc::new(SqliteStorage::open(&dir.path().join("fumi.db")).await.unwrap()),
            device,
            _cleanup: Cleanup::Dir(dir),
        }];
        if let Ok(url) = std::env::var("FUMI_TEST_POSTGRES_URL") {
            let schema = format!("unit_{}", hex::encode(rand::random::<[u8; 8]>()));
            backends.push(Backend {
                storage: Arc::new(PostgresStorage::connect_in_schema(&url, &schema).await.unwrap()),
                device,
                _cleanup: Cleanup::Schema { url, schema },
            });
        }
        for backend in &backends {
            backend
                .storage
                .create_account(AccountId::from_bytes([1; 16]), &[0; 32], device, &[0; 32], None, 0)
                .await
                .unwrap();
        }
        backends
    }

    /// A one-recipient submission to group `[3; 16]` from device `[9; 16]`.
    pub(crate) fn submission(device: DeviceId, id: u8, epoch: Option<u64>, expires_at: u64) -> Submission {
        Submission {
            sender: DeviceId::from_bytes([9; 16]),
            message_id: MessageId::from_bytes([id; 16]),
            digest: [id; 32],
            group: GroupId::from_bytes([3; 16]),
            commit_epoch: epoch,
            deliveries: vec![Delivery {
                body: Ciphertext(vec![id]),
                recipients: vec![device],
            }],
            removed: vec![],
            now: 0,
            expires_at,
            max_queued: 10_000,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submissions_are_committed_together_and_refusals_change_nothing_on_every_backend() {
        for backend in backends().await {
            concurrent_submissions_are_committed_together_and_refusals_change_nothing(
                backend.storage.clone(),
                backend.device,
            )
            .await;
            backend.finish().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_envelopes_keep_their_numbers_and_wait_while_their_account_moves_on_every_backend() {
        for backend in backends().await {
            // A region of the same kind beside the main database.
            let (region, cleanup): (Arc<dyn Storage>, Cleanup) = match &backend._cleanup {
                Cleanup::Dir(_) => {
                    let dir = tempfile::tempdir().unwrap();
                    let region = SqliteStorage::open_region(&dir.path().join("region.db")).await.unwrap();
                    (Arc::new(region), Cleanup::Dir(dir))
                }
                Cleanup::Schema { url, schema } => {
                    let schema = format!("{schema}_jp");
                    let region = PostgresStorage::connect_region(url, &schema).await.unwrap();
                    (
                        Arc::new(region),
                        Cleanup::Schema {
                            url: url.clone(),
                            schema,
                        },
                    )
                }
            };
            forwarded_envelopes_keep_their_numbers_and_wait_while_their_account_moves(backend.storage.clone(), region)
                .await;
            backend.finish().await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            drop(cleanup);
        }
    }

    async fn forwarded_envelopes_keep_their_numbers_and_wait_while_their_account_moves(
        main: Arc<dyn Storage>,
        region: Arc<dyn Storage>,
    ) {
        let account = AccountId::from_bytes([4; 16]);
        let device = DeviceId::from_bytes([5; 16]);
        main.create_account(account, &[0; 32], device, &[0; 32], Some("jp"), 0)
            .await
            .unwrap();
        let resident = main.residency(account).await.unwrap().unwrap();
        assert_eq!(resident.region.as_deref(), Some("jp"));
        assert_eq!(resident.relocation, None);
        // The roster's first commit, to the account in jp: queued in the main database, in transit.
        main.submit(submission(device, 1, Some(0), u64::MAX)).await.unwrap();
        assert!(main.in_transit("us", None, 100).await.unwrap().is_empty());
        let moving = main.in_transit("jp", Some(&[device]), 100).await.unwrap();
        assert_eq!(moving.len(), 1);
        let envelope = &moving[0];
        assert_eq!(envelope.body, Ciphertext(vec![1]));
        // Imported twice (a crash between import and settle): one envelope, same number.
        assert_eq!(
            region.import_envelopes(std::slice::from_ref(envelope)).await.unwrap(),
            1
        );
        assert_eq!(
            region.import_envelopes(std::slice::from_ref(envelope)).await.unwrap(),
            0
        );
        let fetched = region.fetch(device, 0, 10).await.unwrap();
        assert_eq!(fetched.len(), 1);
        assert_eq!(fetched[0].seq, envelope.seq);
        // While the account moves, the main database keeps its copy (the move may have missed
        // the region's).
        let frozen = Residency {
            region: Some("jp".into()),
            relocation: Some(Relocation::Copying { to: None }),
        };
        assert!(main.set_residency(account, &resident, &frozen).await.unwrap());
        assert!(
            !main.set_residency(account, &resident, &frozen).await.unwrap(),
            "compare and set"
        );
        assert!(
            main.in_transit("jp", None, 100).await.unwrap().is_empty(),
            "held while moving"
        );
        let key = [(device, envelope.seq)];
        assert_eq!(main.settle_forwarded("jp", &key).await.unwrap(), 0);
        assert!(main.set_residency(account, &frozen, &resident).await.unwrap());
        assert_eq!(
            main.settle_forwarded("us", &key).await.unwrap(),
            0,
            "only for its region"
        );
        assert_eq!(main.settle_forwarded("jp", &key).await.unwrap(), 1);
        assert!(main.in_transit("jp", None, 100).await.unwrap().is_empty());
        // KeyPackages: replaced as a whole, claimed one-time first, the last-resort one kept.
        let package = |byte: u8, last_resort| StoredKeyPackage {
            device,
            key_package: Ciphertext(vec![byte]),
            last_resort,
        };
        let packages = [package(1, false), package(2, true)];
        region.replace_key_packages(&[device], &packages).await.unwrap();
        region.replace_key_packages(&[device], &packages).await.unwrap();
        assert_eq!(region.export_key_packages(&[device]).await.unwrap(), packages);
        let first = region.claim_device_key_packages(&[device]).await.unwrap();
        assert_eq!(first, vec![(device, Ciphertext(vec![1]))]);
        for _ in 0..2 {
            let last = region.claim_device_key_packages(&[device]).await.unwrap();
            assert_eq!(last, vec![(device, Ciphertext(vec![2]))]);
        }
        region.replace_key_packages(&[device], &[]).await.unwrap();
        assert!(matches!(
            region.claim_device_key_packages(&[device]).await,
            Err(StorageError::NoKeyPackage)
        ));
        // Profile in the region (no account row there), and the cleanup of a moved account.
        region.put_profile(account, Ciphertext(vec![7; 40]), 0).await.unwrap();
        assert_eq!(region.delete_mailboxes(&[device]).await.unwrap(), 1);
        region.delete_sealed(account).await.unwrap();
        assert_eq!(region.profile(account).await.unwrap(), None);
        assert!(region.export_envelopes(device, 0, 10).await.unwrap().is_empty());
        region.scrub().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_directory_rows_and_change_marks_on_every_backend() {
        for backend in backends().await {
            let postgres = matches!(backend._cleanup, Cleanup::Schema { .. });
            key_directory_rows_and_change_marks(backend.storage.clone(), backend.device, postgres).await;
            backend.finish().await;
        }
    }

    async fn key_directory_rows_and_change_marks(storage: Arc<dyn Storage>, device: DeviceId, postgres: bool) {
        let account = AccountId::from_bytes([1; 16]);
        let marked =
            |marks: &[KeyDirectoryPending], kind, id: &[u8]| marks.iter().any(|m| m.kind == kind && m.id == id);
        // Creating the account marked it, in the same transaction.
        let marks = storage.kt_pending(100).await.unwrap();
        assert!(
            marked(&marks, KeyDirectoryKind::Account, account.as_bytes()),
            "{marks:?}"
        );
        // A device's signature key is set once; a different one later does not replace it.
        assert_eq!(storage.set_signature_key(device, &[5; 32]).await.unwrap(), vec![5; 32]);
        assert_eq!(storage.set_signature_key(device, &[6; 32]).await.unwrap(), vec![5; 32]);
        let (identity, devices) = storage.device_keys(account).await.unwrap().unwrap();
        assert_eq!((identity, devices), (vec![0; 32], vec![(device, vec![5; 32])]));
        assert!(
            storage
                .device_keys(AccountId::from_bytes([7; 16]))
                .await
                .unwrap()
                .is_none()
        );
        storage.claim_username(account, &[7; 32]).await.unwrap();
        let read = storage.kt_pending(100).await.unwrap();
        assert!(marked(&read, KeyDirectoryKind::Username, &[7; 32]), "{read:?}");
        // A change made after the marks were read survives their clearing: releasing [7; 32]
        // bumps its generation, and the new username is marked.
        storage.claim_username(account, &[8; 32]).await.unwrap();
        storage.kt_clear_pending(&read).await.unwrap();
        let left = storage.kt_pending(100).await.unwrap();
        assert!(
            !marked(&left, KeyDirectoryKind::Account, account.as_bytes()),
            "{left:?}"
        );
        assert!(marked(&left, KeyDirectoryKind::Username, &[7; 32]), "{left:?}");
        assert!(marked(&left, KeyDirectoryKind::Username, &[8; 32]), "{left:?}");

        // akd's records: nodes by key (replaced on write), value states by label and epoch,
        // written only by the lease holder.
        const PUBLISHER: [u8; 16] = [1; 16];
        assert!(storage.kt_lease(&PUBLISHER, 0, 1_000).await.unwrap());
        let state = |epoch, version| KeyDirectoryState {
            label: b"account:x".to_vec(),
            epoch,
            version,
            record: vec![epoch as u8; 3],
        };
        storage
            .kt_write(
                &PUBLISHER,
                vec![(vec![1], vec![10]), (vec![2], vec![20])],
                vec![state(2, 1), state(5, 2)],
            )
            .await
            .unwrap();
        storage
            .kt_write(&PUBLISHER, vec![(vec![1], vec![11])], vec![])
            .await
            .unwrap();
        let mut nodes = storage.kt_nodes(&[vec![1], vec![2], vec![3]]).await.unwrap();
        nodes.sort();
        assert_eq!(nodes, vec![(vec![1], vec![11]), (vec![2], vec![20])]);
        let states = storage
            .kt_states(&[b"account:x".to_vec(), b"other".to_vec()])
            .await
            .unwrap();
        assert_eq!(states, vec![state(2, 1), state(5, 2)]);

        // Heads: one per epoch, never replaced.
        for epoch in 0..3 {
            storage.kt_put_head(epoch, &format!("head {epoch}")).await.unwrap();
        }
        storage.kt_put_head(1, "another head 1").await.unwrap();
        assert_eq!(storage.kt_heads(1, 10).await.unwrap(), vec!["head 1", "head 2"]);
        assert_eq!(storage.kt_latest_head().await.unwrap(), Some((2, "head 2".to_owned())));

        // One publisher at a time on a shared database; a released lease passes on at once.
        assert!(storage.kt_lease(&[1; 16], 1_000, 10_000).await.unwrap());
        assert!(storage.kt_lease(&[1; 16], 2_000, 10_000).await.unwrap());
        if postgres {
            assert!(!storage.kt_lease(&[2; 16], 3_000, 10_000).await.unwrap());
            // A node without the lease cannot write, even if it started publishing while it
            // held one.
            let refused = storage.kt_write(&[2; 16], vec![(vec![9], vec![9])], vec![]).await;
            assert!(refused.is_err());
            assert!(storage.kt_nodes(&[vec![9]]).await.unwrap().is_empty());
            assert!(
                storage.kt_lease(&[2; 16], 12_001, 10_000).await.unwrap(),
                "an expired lease passes on"
            );
            storage.kt_release_lease(&[2; 16]).await.unwrap();
        }
        storage.kt_release_lease(&[1; 16]).await.unwrap();
        assert!(storage.kt_lease(&[3; 16], 13_000, 10_000).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn channel_limits_hold_and_the_subscriber_count_follows_subscriptions_on_every_backend() {
        for backend in backends().await {
            channel_limits_hold_and_the_subscriber_count_follows_subscriptions(backend.storage.clone(), backend.device)
                .await;
            backend.finish().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_file_stays_until_it_expires_and_its_owner_can_be_purged_on_every_backend() {
        for backend in backends().await {
            a_channel_file_stays_until_it_expires_and_its_owner_can_be_purged(backend.storage.clone(), backend.device)
                .await;
            backend.finish().await;
        }
    }

    async fn concurrent_submissions_are_committed_together_and_refusals_change_nothing(
        storage: Arc<dyn Storage>,
        device: DeviceId,
    ) {
        storage
            .submit(submission(device, 1, Some(0), u64::MAX / 2))
            .await
            .unwrap();
        // Sent at once, these land in shared transactions: application messages (even ids) are
        // accepted, commits for a stale epoch (odd ids) refused, each on its own.
        let mut tasks = tokio::task::JoinSet::new();
        for id in 10..110u8 {
            let storage = storage.clone();
            let epoch = (id % 2 == 1).then_some(7);
            tasks.spawn(async move { (id, storage.submit(submission(device, id, epoch, u64::MAX / 2)).await) });
        }
        while let Some(joined) = tasks.join_next().await {
            let (id, outcome) = joined.unwrap();
            match outcome {
                Ok(SubmitOutcome::Accepted { .. }) => assert_eq!(id % 2, 0, "message {id}"),
                Err(StorageError::EpochConflict { current: 1 }) => assert_eq!(id % 2, 1, "message {id}"),
                other => panic!("message {id}: {other:?}"),
            }
        }
        let bodies: Vec<u8> = storage
            .fetch(device, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.body.0[0])
            .collect();
        let expected: Vec<u8> = std::iter::once(1).chain((10..110).filter(|id| id % 2 == 0)).collect();
        let mut sorted = bodies.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, expected);
        // A retry of an accepted message is a duplicate, in a batch as alone.
        assert!(matches!(
            storage.submit(submission(device, 10, None, u64::MAX / 2)).await,
            Ok(SubmitOutcome::Duplicate { .. })
        ));
    }

    async fn channel_limits_hold_and_the_subscriber_count_follows_subscriptions(
        storage: Arc<dyn Storage>,
        _device: DeviceId,
    ) {
        let account = AccountId::from_bytes([1; 16]);
        let limits = ChannelLimits {
            owned: 1,
            subscriptions: 1,
        };
        let (first, second) = (ChannelId::from_bytes([5; 16]), ChannelId::from_bytes([6; 16]));
        let info = || Ciphertext(vec![0; 40]);
        storage.create_channel(first, account, info(), 0, limits).await.unwrap();
        assert!(matches!(
            storage
                .create_channel(first, account, info(), 0, ChannelLimits { owned: 2, ..limits })
                .await,
            Err(StorageError::ChannelExists)
        ));
        assert!(matches!(
            storage.create_channel(second, account, info(), 0, limits).await,
            Err(StorageError::TooMany {
                what: "channels",
                limit: 1
            })
        ));
        let roomy = ChannelLimits { owned: 2, ..limits };
        storage.create_channel(second, account, info(), 0, roomy).await.unwrap();
        // Subscribing twice is one subscription; a second channel is over the limit.
        for _ in 0..2 {
            storage.set_subscription(first, account, true, 0, limits).await.unwrap();
        }
        assert_eq!(storage.channel(first).await.unwrap().unwrap().subscribers, 1);
        assert!(matches!(
            storage.set_subscription(second, account, true, 0, limits).await,
            Err(StorageError::TooMany {
                what: "channel subscriptions",
                limit: 1
            })
        ));
        assert_eq!(storage.channel(second).await.unwrap().unwrap().subscribers, 0);
        for _ in 0..2 {
            storage
                .set_subscription(first, account, false, 0, limits)
                .await
                .unwrap();
        }
        assert_eq!(storage.channel(first).await.unwrap().unwrap().subscribers, 0);
        assert!(storage.subscriptions(account).await.unwrap().is_empty());
    }

    async fn a_channel_file_stays_until_it_expires_and_its_owner_can_be_purged(
        storage: Arc<dyn Storage>,
        device: DeviceId,
    ) {
        let account = AccountId::from_bytes([1; 16]);
        let channel = ChannelId::from_bytes([5; 16]);
        let limits = ChannelLimits {
            owned: 1,
            subscriptions: 1,
        };
        storage
            .create_channel(channel, account, Ciphertext(vec![0; 40]), 0, limits)
            .await
            .unwrap();
        let file = BlobRecord {
            id: BlobId::from_bytes([6; 16]),
            owner_account: account,
            owner_device: device,
            size: 10,
            complete: false,
            pending: vec![],
            expires_at: 1_000,
            channel: Some(channel),
        };
        storage.create_blob(&file, u64::MAX, 0).await.unwrap();
        storage.complete_blob(file.id).await.unwrap();
        // Complete and without recipients, it is not collected: subscribers fetch it later.
        assert!(storage.expired_blobs(999, 0).await.unwrap().is_empty());
        assert_eq!(storage.expired_blobs(1_000, 0).await.unwrap(), vec![file.id]);
        // Purging the organisation removes its channel; the file is left for the caller.
        assert_eq!(storage.purge_account(account).await.unwrap(), vec![file.id]);
        assert!(storage.channel(channel).await.unwrap().is_none());
    }
}
