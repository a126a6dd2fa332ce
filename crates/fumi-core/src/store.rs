//! The client store behind a trait, so that the client machine runs on any store: SQLite
//! natively (`fumi-client`), IndexedDB in the browser, memory in tests. Every implementation
//! invokes [`client_store_conformance!`](crate::client_store_conformance), which checks every
//! method's contract.
//!
//! The trait grows by sections as the machine moves into this crate (docs/ARCHITECTURE.md, "The
//! client machine"). Today: the envelopes processed, the outbox, the conversations, their
//! messages, the files waiting to be downloaded, the contacts with their pinned identity keys
//! and profile keys, the account, franking evidence, removed devices, awaited history archives,
//! uploads under way, and the key directory's state (the pinned log key, the newest epoch, the
//! own entry's review, this account's trusted devices, arrivals to check and conversations
//! refused), and the official accounts' tables (trusted authorities, the organisation profile,
//! channels, posts, their files and warnings, forms and submissions).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use fumi_proto::{AccountId, BlobId, ChannelId, DeviceId, GroupId, MessageId};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;
use thiserror::Error;

use crate::content::Attachment;
use crate::form::{Answers, FormDefinition};
use crate::franking::Evidence;
use crate::mls::Member;
use crate::official::{ChannelInfo, ChannelKey, ChannelLink, OrganisationProfile, Post, PostBody, TrustedAuthority};

/// The store failed (its disk, its database): this device's fault, so a received envelope is not
/// acknowledged and comes again.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("client store: {0}")]
pub struct StoreError(pub String);

/// A conversation (an MLS group) as this device keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The MLS group.
    pub group_id: GroupId,
    /// 1:1 or group.
    pub direct: bool,
    /// Group name (`None` for 1:1 and until the name arrives).
    pub name: Option<String>,
    /// The other account of a 1:1 conversation.
    pub peer: Option<AccountId>,
    /// False once this device was removed.
    pub active: bool,
    /// Disappearing-message timer (ms), if on.
    pub expire_after_ms: Option<u64>,
}

/// A queued outgoing request, kept until the server accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The request id.
    pub message_id: MessageId,
    /// The group.
    pub group_id: GroupId,
    /// Whether it carries this device's pending commit.
    pub is_commit: bool,
    /// JSON of the `SubmitMessage`.
    pub request: String,
    /// History event to record once the server accepts it (e.g. "you added bob.17").
    pub event: Option<String>,
}

/// One entry of local history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Local order.
    pub local_id: i64,
    /// Sender-chosen id.
    pub id: MessageId,
    /// Conversation.
    pub group_id: GroupId,
    /// Sender account.
    pub sender: AccountId,
    /// A text message, or a membership event written by this client.
    pub is_event: bool,
    /// The text.
    pub text: String,
    /// Sender's timestamp (ms).
    pub sent_at: u64,
    /// Whether this device sent it.
    pub outgoing: bool,
    /// The file it carries, if any.
    pub attachment: Option<FileView>,
    /// When this device deletes it (ms since the Unix epoch), if the conversation's timer was on.
    pub expires_at: Option<u64>,
}

/// What history shows of a file: never the key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileView {
    /// File name (the sender's, sanitised).
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// Where the file is: the saved copy for a received file, the original for a sent one.
    pub path: Option<String>,
    /// Why a received file was refused (altered, truncated, gone).
    pub error: Option<String>,
}

impl FileView {
    /// A received file not downloaded yet (its name sanitised again).
    pub fn pending(attachment: &crate::content::Attachment) -> Self {
        Self {
            name: crate::attachment::sanitize_file_name(&attachment.name),
            size: attachment.size,
            media_type: attachment.media_type.clone(),
            path: None,
            error: None,
        }
    }
}

/// Another account as this device knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// The account.
    pub account_id: AccountId,
    /// Full username, from the contact's own profile (or from a lookup we made).
    pub username: Option<String>,
    /// Display name from the contact's profile.
    pub display_name: Option<String>,
    /// Where the contact's avatar image was saved.
    pub avatar_path: Option<String>,
}

/// A contact with its pinned identity key and known profile key: (contact, identity key,
/// profile key).
pub type PinnedContact = (Contact, Option<[u8; 32]>, Option<[u8; 32]>);

/// The account this store belongs to.
#[derive(Clone)]
pub struct AccountRow {
    /// Server base URL.
    pub server: String,
    /// Account id.
    pub account_id: AccountId,
    /// This device.
    pub device_id: DeviceId,
    /// The device's authentication secret.
    pub device_secret: [u8; 32],
    /// The account identity key's secret.
    pub identity_secret: [u8; 32],
    /// Public MLS signature key of this device, once generated.
    pub signature_key: Option<Vec<u8>>,
    /// Profile key.
    pub profile_key: [u8; 32],
    /// Full username, once claimed.
    pub username: Option<String>,
    /// Display name.
    pub display_name: String,
    /// SHA-256 (hex) of the avatar image in `<home>/avatar`, if one is set.
    pub avatar_digest: Option<String>,
    /// When the profile key was last changed (ms): a key announced by another device of this
    /// account in a message sent later replaces it.
    pub profile_key_set_at: u64,
}

impl Drop for AccountRow {
    /// Secrets do not outlive the row in memory (the store file itself is mode 0600).
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.device_secret.zeroize();
        self.identity_secret.zeroize();
        self.profile_key.zeroize();
        if let Some(key) = self.signature_key.as_mut() {
            key.zeroize();
        }
    }
}

/// A link through which this device joined, whose history archive may still arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingHistory {
    /// The link token.
    pub token: [u8; 32],
    /// The link key from the code.
    pub link_key: [u8; 32],
    /// When the device joined (ms).
    pub since: u64,
}

/// An upload under way: its blob and what encrypts the file to the same bytes again.
#[derive(Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// The blob on the server.
    pub blob: BlobId,
    /// The file's attachment key.
    pub file_key: [u8; 32],
    /// Seeds the generator of the file's nonce prefix.
    pub nonce_seed: [u8; 32],
}

/// What this device remembers of the server's key directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryState {
    /// The log key pinned on first use: every epoch head must be signed by it.
    pub log_key: [u8; 32],
    /// The newest epoch seen.
    pub epoch: u64,
    /// Its root hash.
    pub root_hash: [u8; 32],
    /// The newest version of this account's own entry that was reviewed.
    pub own_version: u64,
    /// The epoch at which the own entry was last looked at.
    pub own_checked_epoch: u64,
    /// The last review of the own entry found a problem.
    pub own_alarm: bool,
}

impl DirectoryState {
    /// The state of a device that has seen `epoch` with `root_hash`, under `log_key`, and not
    /// yet reviewed its own entry.
    pub fn pinned(log_key: [u8; 32], epoch: u64, root_hash: [u8; 32]) -> Self {
        Self {
            log_key,
            epoch,
            root_hash,
            own_version: 0,
            own_checked_epoch: 0,
            own_alarm: false,
        }
    }
}

/// A channel as this device keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRow {
    /// The channel.
    pub channel: ChannelId,
    /// The organisation account that owns it.
    pub owner: AccountId,
    /// The organisation identity key from its link.
    pub owner_key: [u8; 32],
    /// The key its description and posts are sealed under.
    pub key: ChannelKey,
    /// This account owns it (may post).
    pub own: bool,
    /// The description as last opened and verified.
    pub info: ChannelInfo,
    /// Every post up to this number was accepted or refused.
    pub last_seq: u64,
}

impl ChannelRow {
    /// The channel's link (what a subscriber needs).
    pub fn link(&self) -> ChannelLink {
        ChannelLink {
            channel: self.channel,
            owner: self.owner,
            owner_key: self.owner_key,
            key: self.key.clone(),
        }
    }
}

/// A form submission as kept: sent by this account, or received by its organisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmissionRecord {
    /// The submission's message id.
    pub id: MessageId,
    /// The form's channel.
    pub channel: ChannelId,
    /// The form.
    pub form_id: String,
    /// The conversation it travelled in.
    pub group: GroupId,
    /// Who submitted it.
    pub submitter: AccountId,
    /// What they answered.
    pub answers: Answers,
    /// The submitter's clock.
    pub sent_at: u64,
    /// This account sent it.
    pub outgoing: bool,
    /// When the organisation's receipt arrived (sent submissions).
    pub receipt_at: Option<u64>,
}

/// Which submissions to list.
#[derive(Debug, Clone, Copy)]
pub enum Submissions<'a> {
    /// Of one form.
    Form(ChannelId, &'a str),
    /// Not shown yet (new received ones, and sent ones that got their receipt).
    Unseen,
}

/// What the client machine keeps. Methods take `&self`: a store is one device's, used by one
/// step at a time, and changes what it holds inside a [`ClientStore::in_transaction`].
pub trait ClientStore {
    /// Runs `f` as one transaction: what it wrote is kept if it returns `Ok`, none of it if it
    /// returns `Err` (or the commit fails, which is returned as an error).
    fn in_transaction<T, E: From<StoreError>>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E>;

    // --- envelopes --------------------------------------------------------------------------

    /// Whether the envelope with this delivery sequence number was processed.
    fn is_processed(&self, seq: u64) -> Result<bool, StoreError>;
    /// Records an envelope as processed (again: no change).
    fn mark_processed(&self, seq: u64, now: u64) -> Result<(), StoreError>;

    // --- outbox -----------------------------------------------------------------------------

    /// Queues an outgoing request; a second entry with the same message id is refused.
    fn push_outbox(&self, entry: &OutboxEntry, now: u64) -> Result<(), StoreError>;
    /// The queued requests, oldest first.
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Removes a sent request (an unknown id: no change).
    fn remove_outbox(&self, message_id: MessageId) -> Result<(), StoreError>;

    // --- conversations ----------------------------------------------------------------------

    /// Adds a conversation; one already kept is left as it is. It starts without a timer.
    fn insert_conversation(&self, conversation: &Conversation, now: u64) -> Result<(), StoreError>;
    /// Sets a conversation's kind, name and peer (from a conversation settings message).
    fn update_conversation(
        &self,
        group: GroupId,
        direct: bool,
        name: Option<&str>,
        peer: Option<AccountId>,
    ) -> Result<(), StoreError>;
    /// Marks a conversation as left (this device was removed).
    fn deactivate_conversation(&self, group: GroupId) -> Result<(), StoreError>;
    /// Sets or clears a conversation's disappearing-message timer.
    fn set_expire_after(&self, group: GroupId, expire_after_ms: Option<u64>) -> Result<(), StoreError>;
    /// Every conversation, the one with the newest message first, then the newest created.
    fn conversations(&self) -> Result<Vec<Conversation>, StoreError>;
    /// One conversation.
    fn conversation(&self, group: GroupId) -> Result<Option<Conversation>, StoreError> {
        Ok(self.conversations()?.into_iter().find(|c| c.group_id == group))
    }

    // --- messages ---------------------------------------------------------------------------

    /// Appends to history; returns the message's local id (increasing, never reused), or `None`
    /// if a message with this conversation, sender and id is already kept (nothing changes).
    /// The message's own `local_id` is ignored.
    fn insert_message(&self, message: &StoredMessage, seen: bool, now: u64) -> Result<Option<i64>, StoreError>;
    /// Replaces what history shows of a message's file.
    fn set_file_view(&self, local_id: i64, view: &FileView) -> Result<(), StoreError>;
    /// The messages not shown yet, in the order they were kept.
    fn unseen(&self) -> Result<Vec<StoredMessage>, StoreError>;
    /// Marks messages as shown (unknown ids: no change).
    fn mark_seen(&self, local_ids: &[i64]) -> Result<(), StoreError>;
    /// How many messages of a conversation are not shown yet.
    fn unseen_count(&self, group: GroupId) -> Result<u64, StoreError>;
    /// A conversation's history in the order its messages were sent (then kept): history copied
    /// from another device arrives late but belongs early.
    fn history(&self, group: GroupId) -> Result<Vec<StoredMessage>, StoreError>;
    /// Deletes this device's own message (the server refused to deliver it); a received message
    /// with the same id stays.
    fn delete_own_message(&self, group: GroupId, id: MessageId) -> Result<(), StoreError>;
    /// Deletes the messages whose time is up (`expires_at <= now`) with their pending downloads;
    /// returns their files, in the order the messages were kept, so the caller can delete the
    /// copies it saved.
    fn purge_expired(&self, now: u64) -> Result<Vec<FileView>, StoreError>;

    // --- downloads --------------------------------------------------------------------------

    /// Queues a received file for download (a blob already queued: no change).
    fn add_download(&self, local_id: i64, attachment: &Attachment) -> Result<(), StoreError>;
    /// The files waiting to be downloaded, by their message's local id.
    fn downloads(&self) -> Result<Vec<(i64, Attachment)>, StoreError>;
    /// Whether a blob is still queued for download.
    fn is_download_pending(&self, blob: BlobId) -> Result<bool, StoreError>;
    /// Ends a download (done or refused).
    fn remove_download(&self, blob: BlobId) -> Result<(), StoreError>;

    // --- contacts ---------------------------------------------------------------------------

    /// Records a contact's username and display name; a `None` keeps what is known.
    fn upsert_contact(
        &self,
        account: AccountId,
        username: Option<&str>,
        display_name: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Checks an account's identity key against the one pinned on first sight, pinning it if
    /// none is: false if another key is pinned (someone impersonates the account, or it was
    /// re-created).
    fn check_identity_key(&self, account: AccountId, key: &[u8; 32]) -> Result<bool, StoreError>;
    /// The identity key pinned for an account.
    fn pinned_identity_key(&self, account: AccountId) -> Result<Option<[u8; 32]>, StoreError>;
    /// Records that the user compared safety numbers for this key in person: pins it (replacing
    /// another pin) and marks it verified.
    fn set_verified(&self, account: AccountId, key: &[u8; 32]) -> Result<(), StoreError>;
    /// Whether the user verified the account's currently pinned key.
    fn is_verified(&self, account: AccountId) -> Result<bool, StoreError>;
    /// Records a contact's profile key announced at `at` (the carrying message's time); returns
    /// whether the profile must be fetched. A key older than the known one is ignored (it would
    /// not open the current profile); the known key again only moves its time forward.
    fn set_profile_key(&self, account: AccountId, key: &[u8; 32], at: u64) -> Result<bool, StoreError>;
    /// Whether a profile key is known for an account.
    fn has_profile_key(&self, account: AccountId) -> Result<bool, StoreError> {
        Ok(!self.profile_keys(&[account])?.is_empty())
    }
    /// The known profile keys of these accounts, in their order, skipping unknown ones.
    fn profile_keys(&self, accounts: &[AccountId]) -> Result<Vec<(AccountId, [u8; 32])>, StoreError>;
    /// The contacts whose profile key changed since their profile was last fetched.
    fn profiles_to_fetch(&self) -> Result<Vec<(AccountId, [u8; 32])>, StoreError>;
    /// Stores a fetched profile (a `None` username keeps the known one); it is fetched until the
    /// key changes again.
    fn set_profile(&self, account: AccountId, username: Option<&str>, display_name: &str) -> Result<(), StoreError>;
    /// A contact.
    fn contact(&self, account: AccountId) -> Result<Option<Contact>, StoreError>;
    /// The contact known under a full username.
    fn contact_by_username(&self, username: &str) -> Result<Option<AccountId>, StoreError>;
    /// Records a known contact's saved avatar (an unknown contact: no change).
    fn set_contact_avatar(&self, account: AccountId, digest: &str, path: &str) -> Result<(), StoreError>;
    /// The digest of a contact's saved avatar.
    fn contact_avatar_digest(&self, account: AccountId) -> Result<Option<String>, StoreError>;
    /// The contacts whose identity key is pinned (everyone this device has talked to), by
    /// username (those without one first).
    fn contacts(&self) -> Result<Vec<PinnedContact>, StoreError>;

    // --- the account ------------------------------------------------------------------------

    /// Saves this device's account row (replacing it).
    fn save_account(&self, account: &AccountRow) -> Result<(), StoreError>;
    /// This device's account row, once registered or linked.
    fn account(&self) -> Result<Option<AccountRow>, StoreError>;
    /// Takes the profile key another device of this account announced in a message sent at
    /// `sent_at`, if it differs and is later than the current key's time; returns whether it did.
    fn adopt_own_profile_key(&self, key: &[u8; 32], sent_at: u64) -> Result<bool, StoreError>;

    // --- franking evidence ------------------------------------------------------------------

    /// Keeps the franking opening of a received message (replacing one kept for it).
    fn keep_franking_evidence(&self, message_local_id: i64, evidence: &Evidence) -> Result<(), StoreError>;
    /// The kept openings of received (not own) messages with this id: at most two, since ids
    /// are chosen by senders and a second one is enough to refuse guessing.
    fn received_evidence(&self, id: MessageId) -> Result<Vec<Evidence>, StoreError>;

    // --- this account's removed devices -----------------------------------------------------

    /// Records that a device of this account was removed: it is never added back.
    fn revoke_device(&self, device: DeviceId, now: u64) -> Result<(), StoreError>;
    /// The devices of this account that were removed.
    fn revoked_devices(&self) -> Result<Vec<DeviceId>, StoreError>;

    // --- awaited history archives -----------------------------------------------------------

    /// Remembers a link whose history archive may still arrive (the same token again: replaced).
    fn add_pending_history(&self, token: &[u8; 32], key: &[u8; 32], now: u64) -> Result<(), StoreError>;
    /// The links whose history is awaited, in no particular order.
    fn pending_history(&self) -> Result<Vec<PendingHistory>, StoreError>;
    /// Stops waiting for a link's history.
    fn remove_pending_history(&self, token: &[u8; 32]) -> Result<(), StoreError>;

    // --- uploads under way ------------------------------------------------------------------

    /// The upload under way for this file and purpose.
    fn pending_upload(&self, path: &str, purpose: &[u8; 32]) -> Result<Option<PendingUpload>, StoreError>;
    /// Remembers an upload before its first byte is sent (replacing one for the same file and
    /// purpose).
    #[allow(clippy::too_many_arguments)]
    fn save_pending_upload(
        &self,
        path: &str,
        purpose: &[u8; 32],
        blob: BlobId,
        file_key: &[u8; 32],
        nonce_seed: &[u8; 32],
        now: u64,
    ) -> Result<(), StoreError>;
    /// Forgets an upload (finished, or no longer on the server).
    fn forget_pending_upload(&self, path: &str, purpose: &[u8; 32]) -> Result<(), StoreError>;

    // --- the key directory ------------------------------------------------------------------

    /// What this device remembers of the key directory, once it saw a head.
    fn directory_state(&self) -> Result<Option<DirectoryState>, StoreError>;
    /// Replaces it.
    fn save_directory_state(&self, state: &DirectoryState) -> Result<(), StoreError>;
    /// Records a review of the own entry at `checked_epoch` (the newest such epoch is kept):
    /// `clean_version` is the newest version found without problems (`None`: keep the previous
    /// one), `alarm` whether one stands. The pinned key and the newest epoch stay; without a
    /// state, nothing changes.
    fn record_own_review(&self, checked_epoch: u64, clean_version: Option<u64>, alarm: bool) -> Result<(), StoreError>;
    /// Remembers a device of this account as one of ours, when first learned of, with its
    /// signature key if known (a key, once recorded, is not replaced).
    fn know_device(&self, device: DeviceId, signature_key: Option<&[u8; 32]>, now: u64) -> Result<(), StoreError>;
    /// The devices of this account known to be ours, with their signature keys where known.
    fn known_devices(&self) -> Result<HashMap<DeviceId, Option<[u8; 32]>>, StoreError>;
    /// When this device learned of each of them.
    fn known_devices_learned_at(&self) -> Result<HashMap<DeviceId, u64>, StoreError>;
    /// The removed devices of this account, with when they were recorded as removed.
    fn revoked_devices_at(&self) -> Result<HashMap<DeviceId, u64>, StoreError>;
    /// Records devices to check against the key directory (in the transaction that processes
    /// the message bringing them).
    fn add_pending_arrival(&self, group: GroupId, members: &[Member]) -> Result<(), StoreError>;
    /// The arrivals not checked yet, oldest first, each with its id.
    fn pending_arrivals(&self) -> Result<Vec<(i64, GroupId, Vec<Member>)>, StoreError>;
    /// Removes a checked arrival.
    fn remove_pending_arrival(&self, id: i64) -> Result<(), StoreError>;
    /// Whether a group has devices not checked against the key directory yet.
    fn has_pending_arrivals(&self, group: GroupId) -> Result<bool, StoreError>;
    /// Stops sending to `group` while any of `devices` is in it, saying why (replacing an
    /// earlier refusal of the group).
    fn refuse_conversation(&self, group: GroupId, reason: &str, devices: &[DeviceId]) -> Result<(), StoreError>;
    /// Why sending to `group` is stopped, if it is.
    fn conversation_refusal(&self, group: GroupId) -> Result<Option<String>, StoreError>;
    /// Every refused conversation with the devices that must leave it, in no particular order.
    fn refused_conversations(&self) -> Result<Vec<(GroupId, Vec<DeviceId>)>, StoreError>;
    /// Sending to `group` may resume.
    fn lift_refusal(&self, group: GroupId) -> Result<(), StoreError>;

    // --- trusted authorities and the organisation profile -------------------------------------

    /// Trusts an authority; false (and no change) if its name or key is already trusted.
    fn add_authority(&self, name: &str, key: &[u8; 32], now: u64) -> Result<bool, StoreError>;
    /// Forgets an authority; false if none had that name.
    fn remove_authority(&self, name: &str) -> Result<bool, StoreError>;
    /// The trusted authorities, by name.
    fn authorities(&self) -> Result<Vec<TrustedAuthority>, StoreError>;
    /// This account's organisation profile, if one was set.
    fn organisation(&self) -> Result<Option<OrganisationProfile>, StoreError>;
    /// Sets it.
    fn save_organisation(&self, profile: &OrganisationProfile) -> Result<(), StoreError>;

    // --- channels and posts -------------------------------------------------------------------

    /// Saves a channel; one already kept takes the new key and description and keeps its owner,
    /// ownership and number of accepted posts.
    fn save_channel(&self, row: &ChannelRow, now: u64) -> Result<(), StoreError>;
    /// Every channel kept, the first saved first.
    fn channel_rows(&self) -> Result<Vec<ChannelRow>, StoreError>;
    /// One channel.
    fn channel_row(&self, channel: ChannelId) -> Result<Option<ChannelRow>, StoreError> {
        Ok(self.channel_rows()?.into_iter().find(|r| r.channel == channel))
    }
    /// Records that every post up to `seq` was accepted or refused (never lowers it).
    fn set_last_seq(&self, channel: ChannelId, seq: u64) -> Result<(), StoreError>;
    /// Forgets a channel with its posts, files and warnings (its forms and submissions stay).
    fn forget_channel(&self, channel: ChannelId) -> Result<(), StoreError>;
    /// Keeps an accepted post (a post already kept under its number stays) and the form it
    /// publishes (a form already kept under its channel and id stays).
    fn insert_post(&self, post: &Post, seen: bool, now: u64) -> Result<(), StoreError>;
    /// The posts of one channel (or all), in the order they arrived, then by number; only those
    /// not shown yet if asked.
    fn posts(&self, channel: Option<ChannelId>, unseen_only: bool) -> Result<Vec<Post>, StoreError>;
    /// Marks the posts of one channel (or all) shown.
    fn mark_posts_seen(&self, channel: Option<ChannelId>) -> Result<(), StoreError>;
    /// How many posts of a channel are kept.
    fn post_count(&self, channel: ChannelId) -> Result<u64, StoreError>;
    /// Sets what the file of post `seq` shows.
    fn set_channel_file(&self, channel: ChannelId, seq: u64, view: &FileView) -> Result<(), StoreError>;
    /// What the file of post `seq` shows.
    fn channel_file(&self, channel: ChannelId, seq: u64) -> Result<Option<FileView>, StoreError>;
    /// Records why post `seq` of a channel was refused (or that posts were withheld).
    fn add_warning(&self, channel: ChannelId, seq: u64, warning: &str, now: u64) -> Result<(), StoreError>;
    /// The warnings not shown yet of one channel (or all), in the order recorded, marked shown.
    fn take_warnings(&self, channel: Option<ChannelId>) -> Result<Vec<(ChannelId, u64, String)>, StoreError>;

    // --- forms and submissions ----------------------------------------------------------------

    /// A form's definition.
    fn form_definition(&self, channel: ChannelId, form_id: &str) -> Result<Option<FormDefinition>, StoreError>;
    /// Every form kept: (channel, form id, definition), the first published first.
    fn forms(&self) -> Result<Vec<(ChannelId, String, FormDefinition)>, StoreError>;
    /// Keeps a submission (one already kept under its id stays): a sent one as shown, a
    /// received one as new.
    fn insert_submission(&self, submission: &SubmissionRecord, now: u64) -> Result<(), StoreError>;
    /// Forgets a submission that was never sent.
    fn delete_submission(&self, id: MessageId) -> Result<(), StoreError>;
    /// Submissions by the submitter's clock, then arrival; listing the unseen marks them shown.
    fn submissions(&self, which: Submissions<'_>) -> Result<Vec<SubmissionRecord>, StoreError>;
    /// How many submissions of a form are kept.
    fn submission_count(&self, channel: ChannelId, form_id: &str) -> Result<u64, StoreError>;
    /// Records the first receipt for a submission this account sent (shown as news once).
    fn set_receipt(&self, submission: MessageId, now: u64) -> Result<(), StoreError>;
    /// Received submissions not confirmed to their submitter yet, in no particular order.
    fn unconfirmed_submissions(&self) -> Result<Vec<(MessageId, GroupId)>, StoreError>;
    /// Records that a received submission's receipt was sent.
    fn mark_receipt_sent(&self, submission: MessageId) -> Result<(), StoreError>;
}

/// A store in memory, for tests and for the pair harness. Its transactions cover the OpenMLS
/// state of the provider it hands out ([`MemoryStore::provider`]), as the SQLite store's cover
/// the provider that shares its connection: a failed step leaves neither changed.
#[derive(Default)]
pub struct MemoryStore {
    tables: RefCell<Tables>,
    mls: Rc<MemoryStorage>,
}

/// An OpenMLS provider whose state lives in a [`MemoryStore`].
pub struct MemoryProvider {
    crypto: RustCrypto,
    storage: Rc<MemoryStorage>,
}

impl OpenMlsProvider for MemoryProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MemoryStorage;

    fn storage(&self) -> &MemoryStorage {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

#[derive(Default, Clone)]
struct Tables {
    processed: BTreeMap<u64, u64>,
    /// In queue order.
    outbox: Vec<OutboxEntry>,
    /// With their creation time, in insertion order.
    conversations: Vec<(Conversation, u64)>,
    /// With whether they were shown, by local id.
    messages: BTreeMap<i64, (StoredMessage, bool)>,
    /// The last local id given out (ids are never reused).
    last_message: i64,
    /// By blob: (message local id, attachment).
    downloads: BTreeMap<BlobId, (i64, Attachment)>,
    contacts: BTreeMap<AccountId, ContactRow>,
    account: Option<AccountRow>,
    /// By message local id.
    evidence: BTreeMap<i64, Evidence>,
    revoked: BTreeMap<DeviceId, u64>,
    /// By token: (link key, since).
    pending_history: BTreeMap<[u8; 32], ([u8; 32], u64)>,
    /// By (path, purpose).
    uploads: BTreeMap<(String, [u8; 32]), PendingUpload>,
    directory: Option<DirectoryState>,
    /// (signature key, learned at).
    known_devices: BTreeMap<DeviceId, (Option<[u8; 32]>, u64)>,
    /// By id, in insertion order.
    arrivals: BTreeMap<i64, (GroupId, Vec<Member>)>,
    last_arrival: i64,
    /// (reason, devices).
    refused: BTreeMap<GroupId, (String, Vec<DeviceId>)>,
    /// By name.
    authorities: BTreeMap<String, [u8; 32]>,
    organisation: Option<OrganisationProfile>,
    /// In the order first saved.
    channels: Vec<ChannelRow>,
    /// By (channel, seq): (post, arrived at, arrival order, seen).
    posts: BTreeMap<(ChannelId, u64), (Post, u64, u64, bool)>,
    arrivals_of_posts: u64,
    channel_files: BTreeMap<(ChannelId, u64), FileView>,
    /// In the order recorded: (channel, seq, warning, seen).
    warnings: Vec<(ChannelId, u64, String, bool)>,
    /// By (channel, form id): (definition, published at, order kept).
    forms: BTreeMap<(ChannelId, String), (FormDefinition, u64, u64)>,
    forms_kept: u64,
    /// By id: (record, arrived at, arrival order, seen, receipt sent).
    submissions: BTreeMap<MessageId, (SubmissionRecord, u64, u64, bool, bool)>,
    submissions_kept: u64,
}

#[derive(Debug, Default, Clone)]
struct ContactRow {
    username: Option<String>,
    display_name: Option<String>,
    profile_key: Option<[u8; 32]>,
    profile_fetched: bool,
    profile_key_at: u64,
    identity_key: Option<[u8; 32]>,
    verified_key: Option<[u8; 32]>,
    avatar_digest: Option<String>,
    avatar_path: Option<String>,
}

impl ContactRow {
    fn contact(&self, account_id: AccountId) -> Contact {
        Contact {
            account_id,
            username: self.username.clone(),
            display_name: self.display_name.clone(),
            avatar_path: self.avatar_path.clone(),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An OpenMLS provider keeping its state in this store (one per device: hand it to the
    /// device's `MlsDevice`).
    pub fn provider(&self) -> MemoryProvider {
        MemoryProvider {
            crypto: RustCrypto::default(),
            storage: self.mls.clone(),
        }
    }

    fn mls_values(&self) -> std::collections::HashMap<Vec<u8>, Vec<u8>> {
        self.mls
            .values
            .read()
            .expect("no step panicked while holding the lock")
            .clone()
    }

    fn with_conversation(&self, group: GroupId, change: impl FnOnce(&mut Conversation)) -> Result<(), StoreError> {
        if let Some((conversation, _)) = self
            .tables
            .borrow_mut()
            .conversations
            .iter_mut()
            .find(|(c, _)| c.group_id == group)
        {
            change(conversation);
        }
        Ok(())
    }
}

impl ClientStore for MemoryStore {
    fn in_transaction<T, E: From<StoreError>>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let before = (self.tables.borrow().clone(), self.mls_values());
        let result = f();
        if result.is_err() {
            *self.tables.borrow_mut() = before.0;
            *self
                .mls
                .values
                .write()
                .expect("no step panicked while holding the lock") = before.1;
        }
        result
    }

    fn is_processed(&self, seq: u64) -> Result<bool, StoreError> {
        Ok(self.tables.borrow().processed.contains_key(&seq))
    }

    fn mark_processed(&self, seq: u64, now: u64) -> Result<(), StoreError> {
        self.tables.borrow_mut().processed.entry(seq).or_insert(now);
        Ok(())
    }

    fn push_outbox(&self, entry: &OutboxEntry, _now: u64) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        if tables.outbox.iter().any(|e| e.message_id == entry.message_id) {
            return Err(StoreError("this message id is already queued".into()));
        }
        tables.outbox.push(entry.clone());
        Ok(())
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        Ok(self.tables.borrow().outbox.clone())
    }

    fn remove_outbox(&self, message_id: MessageId) -> Result<(), StoreError> {
        self.tables.borrow_mut().outbox.retain(|e| e.message_id != message_id);
        Ok(())
    }

    fn insert_conversation(&self, conversation: &Conversation, now: u64) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        if !tables
            .conversations
            .iter()
            .any(|(c, _)| c.group_id == conversation.group_id)
        {
            let kept = Conversation {
                expire_after_ms: None,
                ..conversation.clone()
            };
            tables.conversations.push((kept, now));
        }
        Ok(())
    }

    fn update_conversation(
        &self,
        group: GroupId,
        direct: bool,
        name: Option<&str>,
        peer: Option<AccountId>,
    ) -> Result<(), StoreError> {
        self.with_conversation(group, |c| {
            c.direct = direct;
            c.name = name.map(str::to_owned);
            c.peer = peer;
        })
    }

    fn deactivate_conversation(&self, group: GroupId) -> Result<(), StoreError> {
        self.with_conversation(group, |c| c.active = false)
    }

    fn set_expire_after(&self, group: GroupId, expire_after_ms: Option<u64>) -> Result<(), StoreError> {
        self.with_conversation(group, |c| c.expire_after_ms = expire_after_ms)
    }

    fn conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        let tables = self.tables.borrow();
        let newest_message = |group: GroupId| {
            tables
                .messages
                .values()
                .filter(|(m, _)| m.group_id == group)
                .map(|(m, _)| m.local_id)
                .max()
                .unwrap_or(0)
        };
        let mut all: Vec<(i64, u64, &Conversation)> = tables
            .conversations
            .iter()
            .map(|(c, created_at)| (newest_message(c.group_id), *created_at, c))
            .collect();
        // A stable sort keeps equal keys in insertion order.
        all.sort_by_key(|(newest, created_at, _)| std::cmp::Reverse((*newest, *created_at)));
        Ok(all.into_iter().map(|(_, _, c)| c.clone()).collect())
    }

    fn insert_message(&self, message: &StoredMessage, seen: bool, _now: u64) -> Result<Option<i64>, StoreError> {
        let mut tables = self.tables.borrow_mut();
        let kept = tables
            .messages
            .values()
            .any(|(m, _)| (m.group_id, m.sender, m.id) == (message.group_id, message.sender, message.id));
        if kept {
            return Ok(None);
        }
        tables.last_message += 1;
        let local_id = tables.last_message;
        let stored = StoredMessage {
            local_id,
            ..message.clone()
        };
        tables.messages.insert(local_id, (stored, seen));
        Ok(Some(local_id))
    }

    fn set_file_view(&self, local_id: i64, view: &FileView) -> Result<(), StoreError> {
        if let Some((message, _)) = self.tables.borrow_mut().messages.get_mut(&local_id) {
            message.attachment = Some(view.clone());
        }
        Ok(())
    }

    fn unseen(&self) -> Result<Vec<StoredMessage>, StoreError> {
        let tables = self.tables.borrow();
        Ok(tables
            .messages
            .values()
            .filter(|(_, seen)| !seen)
            .map(|(m, _)| m.clone())
            .collect())
    }

    fn mark_seen(&self, local_ids: &[i64]) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        for id in local_ids {
            if let Some((_, seen)) = tables.messages.get_mut(id) {
                *seen = true;
            }
        }
        Ok(())
    }

    fn unseen_count(&self, group: GroupId) -> Result<u64, StoreError> {
        let tables = self.tables.borrow();
        Ok(tables
            .messages
            .values()
            .filter(|(m, seen)| m.group_id == group && !seen)
            .count() as u64)
    }

    fn history(&self, group: GroupId) -> Result<Vec<StoredMessage>, StoreError> {
        let tables = self.tables.borrow();
        let mut history: Vec<StoredMessage> = tables
            .messages
            .values()
            .filter(|(m, _)| m.group_id == group)
            .map(|(m, _)| m.clone())
            .collect();
        history.sort_by_key(|m| (m.sent_at, m.local_id));
        Ok(history)
    }

    fn delete_own_message(&self, group: GroupId, id: MessageId) -> Result<(), StoreError> {
        self.tables
            .borrow_mut()
            .messages
            .retain(|_, (m, _)| !(m.group_id == group && m.id == id && m.outgoing));
        Ok(())
    }

    fn purge_expired(&self, now: u64) -> Result<Vec<FileView>, StoreError> {
        let mut tables = self.tables.borrow_mut();
        let expired: Vec<i64> = tables
            .messages
            .values()
            .filter(|(m, _)| m.expires_at.is_some_and(|at| at <= now))
            .map(|(m, _)| m.local_id)
            .collect();
        let mut files = Vec::new();
        for local_id in expired {
            if let Some((message, _)) = tables.messages.remove(&local_id) {
                files.extend(message.attachment);
            }
            tables.downloads.retain(|_, (message, _)| *message != local_id);
            tables.evidence.remove(&local_id);
        }
        Ok(files)
    }

    fn add_download(&self, local_id: i64, attachment: &Attachment) -> Result<(), StoreError> {
        self.tables
            .borrow_mut()
            .downloads
            .entry(attachment.blob)
            .or_insert_with(|| (local_id, attachment.clone()));
        Ok(())
    }

    fn downloads(&self) -> Result<Vec<(i64, Attachment)>, StoreError> {
        let mut all: Vec<(i64, Attachment)> = self.tables.borrow().downloads.values().cloned().collect();
        all.sort_by_key(|(local_id, _)| *local_id);
        Ok(all)
    }

    fn is_download_pending(&self, blob: BlobId) -> Result<bool, StoreError> {
        Ok(self.tables.borrow().downloads.contains_key(&blob))
    }

    fn remove_download(&self, blob: BlobId) -> Result<(), StoreError> {
        self.tables.borrow_mut().downloads.remove(&blob);
        Ok(())
    }

    fn upsert_contact(
        &self,
        account: AccountId,
        username: Option<&str>,
        display_name: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        let row = tables.contacts.entry(account).or_default();
        if let Some(username) = username {
            row.username = Some(username.to_owned());
        }
        if let Some(display_name) = display_name {
            row.display_name = Some(display_name.to_owned());
        }
        Ok(())
    }

    fn check_identity_key(&self, account: AccountId, key: &[u8; 32]) -> Result<bool, StoreError> {
        let mut tables = self.tables.borrow_mut();
        let row = tables.contacts.entry(account).or_default();
        Ok(*row.identity_key.get_or_insert(*key) == *key)
    }

    fn pinned_identity_key(&self, account: AccountId) -> Result<Option<[u8; 32]>, StoreError> {
        Ok(self.tables.borrow().contacts.get(&account).and_then(|c| c.identity_key))
    }

    fn set_verified(&self, account: AccountId, key: &[u8; 32]) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        let row = tables.contacts.entry(account).or_default();
        row.identity_key = Some(*key);
        row.verified_key = Some(*key);
        Ok(())
    }

    fn is_verified(&self, account: AccountId) -> Result<bool, StoreError> {
        Ok(self
            .tables
            .borrow()
            .contacts
            .get(&account)
            .is_some_and(|c| c.verified_key.is_some() && c.verified_key == c.identity_key))
    }

    fn set_profile_key(&self, account: AccountId, key: &[u8; 32], at: u64) -> Result<bool, StoreError> {
        let mut tables = self.tables.borrow_mut();
        let row = tables.contacts.entry(account).or_default();
        match row.profile_key {
            Some(known) if known == *key => {
                row.profile_key_at = row.profile_key_at.max(at);
                return Ok(false);
            }
            Some(_) if at < row.profile_key_at => return Ok(false),
            _ => {}
        }
        row.profile_key = Some(*key);
        row.profile_fetched = false;
        row.profile_key_at = at;
        Ok(true)
    }

    fn profile_keys(&self, accounts: &[AccountId]) -> Result<Vec<(AccountId, [u8; 32])>, StoreError> {
        let tables = self.tables.borrow();
        Ok(accounts
            .iter()
            .filter_map(|a| tables.contacts.get(a).and_then(|c| c.profile_key).map(|k| (*a, k)))
            .collect())
    }

    fn profiles_to_fetch(&self) -> Result<Vec<(AccountId, [u8; 32])>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .contacts
            .iter()
            .filter(|(_, c)| !c.profile_fetched)
            .filter_map(|(a, c)| c.profile_key.map(|k| (*a, k)))
            .collect())
    }

    fn set_profile(&self, account: AccountId, username: Option<&str>, display_name: &str) -> Result<(), StoreError> {
        if let Some(row) = self.tables.borrow_mut().contacts.get_mut(&account) {
            if let Some(username) = username {
                row.username = Some(username.to_owned());
            }
            row.display_name = Some(display_name.to_owned());
            row.profile_fetched = true;
        }
        Ok(())
    }

    fn contact(&self, account: AccountId) -> Result<Option<Contact>, StoreError> {
        Ok(self.tables.borrow().contacts.get(&account).map(|c| c.contact(account)))
    }

    fn contact_by_username(&self, username: &str) -> Result<Option<AccountId>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .contacts
            .iter()
            .find(|(_, c)| c.username.as_deref() == Some(username))
            .map(|(a, _)| *a))
    }

    fn set_contact_avatar(&self, account: AccountId, digest: &str, path: &str) -> Result<(), StoreError> {
        if let Some(row) = self.tables.borrow_mut().contacts.get_mut(&account) {
            row.avatar_digest = Some(digest.to_owned());
            row.avatar_path = Some(path.to_owned());
        }
        Ok(())
    }

    fn contact_avatar_digest(&self, account: AccountId) -> Result<Option<String>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .contacts
            .get(&account)
            .and_then(|c| c.avatar_digest.clone()))
    }

    fn contacts(&self) -> Result<Vec<PinnedContact>, StoreError> {
        let tables = self.tables.borrow();
        let mut pinned: Vec<PinnedContact> = tables
            .contacts
            .iter()
            .filter(|(_, c)| c.identity_key.is_some())
            .map(|(a, c)| (c.contact(*a), c.identity_key, c.profile_key))
            .collect();
        pinned.sort_by(|a, b| a.0.username.cmp(&b.0.username));
        Ok(pinned)
    }

    fn save_account(&self, account: &AccountRow) -> Result<(), StoreError> {
        self.tables.borrow_mut().account = Some(account.clone());
        Ok(())
    }

    fn account(&self) -> Result<Option<AccountRow>, StoreError> {
        Ok(self.tables.borrow().account.clone())
    }

    fn adopt_own_profile_key(&self, key: &[u8; 32], sent_at: u64) -> Result<bool, StoreError> {
        let mut tables = self.tables.borrow_mut();
        match tables.account.as_mut() {
            Some(account) if account.profile_key != *key && account.profile_key_set_at < sent_at => {
                account.profile_key = *key;
                account.profile_key_set_at = sent_at;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn keep_franking_evidence(&self, message_local_id: i64, evidence: &Evidence) -> Result<(), StoreError> {
        self.tables
            .borrow_mut()
            .evidence
            .insert(message_local_id, evidence.clone());
        Ok(())
    }

    fn received_evidence(&self, id: MessageId) -> Result<Vec<Evidence>, StoreError> {
        let tables = self.tables.borrow();
        Ok(tables
            .evidence
            .iter()
            .filter(|(local_id, _)| {
                tables
                    .messages
                    .get(local_id)
                    .is_some_and(|(m, _)| m.id == id && !m.outgoing)
            })
            .map(|(_, evidence)| evidence.clone())
            .take(2)
            .collect())
    }

    fn revoke_device(&self, device: DeviceId, now: u64) -> Result<(), StoreError> {
        self.tables.borrow_mut().revoked.entry(device).or_insert(now);
        Ok(())
    }

    fn revoked_devices(&self) -> Result<Vec<DeviceId>, StoreError> {
        Ok(self.tables.borrow().revoked.keys().copied().collect())
    }

    fn add_pending_history(&self, token: &[u8; 32], key: &[u8; 32], now: u64) -> Result<(), StoreError> {
        self.tables.borrow_mut().pending_history.insert(*token, (*key, now));
        Ok(())
    }

    fn pending_history(&self) -> Result<Vec<PendingHistory>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .pending_history
            .iter()
            .map(|(token, (link_key, since))| PendingHistory {
                token: *token,
                link_key: *link_key,
                since: *since,
            })
            .collect())
    }

    fn remove_pending_history(&self, token: &[u8; 32]) -> Result<(), StoreError> {
        self.tables.borrow_mut().pending_history.remove(token);
        Ok(())
    }

    fn pending_upload(&self, path: &str, purpose: &[u8; 32]) -> Result<Option<PendingUpload>, StoreError> {
        Ok(self.tables.borrow().uploads.get(&(path.to_owned(), *purpose)).cloned())
    }

    fn save_pending_upload(
        &self,
        path: &str,
        purpose: &[u8; 32],
        blob: BlobId,
        file_key: &[u8; 32],
        nonce_seed: &[u8; 32],
        _now: u64,
    ) -> Result<(), StoreError> {
        let upload = PendingUpload {
            blob,
            file_key: *file_key,
            nonce_seed: *nonce_seed,
        };
        self.tables
            .borrow_mut()
            .uploads
            .insert((path.to_owned(), *purpose), upload);
        Ok(())
    }

    fn forget_pending_upload(&self, path: &str, purpose: &[u8; 32]) -> Result<(), StoreError> {
        self.tables.borrow_mut().uploads.remove(&(path.to_owned(), *purpose));
        Ok(())
    }

    fn directory_state(&self) -> Result<Option<DirectoryState>, StoreError> {
        Ok(self.tables.borrow().directory.clone())
    }

    fn save_directory_state(&self, state: &DirectoryState) -> Result<(), StoreError> {
        self.tables.borrow_mut().directory = Some(state.clone());
        Ok(())
    }

    fn record_own_review(&self, checked_epoch: u64, clean_version: Option<u64>, alarm: bool) -> Result<(), StoreError> {
        if let Some(state) = self.tables.borrow_mut().directory.as_mut() {
            state.own_checked_epoch = state.own_checked_epoch.max(checked_epoch);
            if let Some(version) = clean_version {
                state.own_version = version;
            }
            state.own_alarm = alarm;
        }
        Ok(())
    }

    fn know_device(&self, device: DeviceId, signature_key: Option<&[u8; 32]>, now: u64) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        let (key, _) = tables.known_devices.entry(device).or_insert((None, now));
        if key.is_none() {
            *key = signature_key.copied();
        }
        Ok(())
    }

    fn known_devices(&self) -> Result<HashMap<DeviceId, Option<[u8; 32]>>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .known_devices
            .iter()
            .map(|(d, (key, _))| (*d, *key))
            .collect())
    }

    fn known_devices_learned_at(&self) -> Result<HashMap<DeviceId, u64>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .known_devices
            .iter()
            .map(|(d, (_, at))| (*d, *at))
            .collect())
    }

    fn revoked_devices_at(&self) -> Result<HashMap<DeviceId, u64>, StoreError> {
        Ok(self.tables.borrow().revoked.iter().map(|(d, at)| (*d, *at)).collect())
    }

    fn add_pending_arrival(&self, group: GroupId, members: &[Member]) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        tables.last_arrival += 1;
        let id = tables.last_arrival;
        tables.arrivals.insert(id, (group, members.to_vec()));
        Ok(())
    }

    fn pending_arrivals(&self) -> Result<Vec<(i64, GroupId, Vec<Member>)>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .arrivals
            .iter()
            .map(|(id, (group, members))| (*id, *group, members.clone()))
            .collect())
    }

    fn remove_pending_arrival(&self, id: i64) -> Result<(), StoreError> {
        self.tables.borrow_mut().arrivals.remove(&id);
        Ok(())
    }

    fn has_pending_arrivals(&self, group: GroupId) -> Result<bool, StoreError> {
        Ok(self.tables.borrow().arrivals.values().any(|(g, _)| *g == group))
    }

    fn refuse_conversation(&self, group: GroupId, reason: &str, devices: &[DeviceId]) -> Result<(), StoreError> {
        self.tables
            .borrow_mut()
            .refused
            .insert(group, (reason.to_owned(), devices.to_vec()));
        Ok(())
    }

    fn conversation_refusal(&self, group: GroupId) -> Result<Option<String>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .refused
            .get(&group)
            .map(|(reason, _)| reason.clone()))
    }

    fn refused_conversations(&self) -> Result<Vec<(GroupId, Vec<DeviceId>)>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .refused
            .iter()
            .map(|(group, (_, devices))| (*group, devices.clone()))
            .collect())
    }

    fn lift_refusal(&self, group: GroupId) -> Result<(), StoreError> {
        self.tables.borrow_mut().refused.remove(&group);
        Ok(())
    }

    fn add_authority(&self, name: &str, key: &[u8; 32], _now: u64) -> Result<bool, StoreError> {
        let mut tables = self.tables.borrow_mut();
        if tables.authorities.contains_key(name) || tables.authorities.values().any(|k| k == key) {
            return Ok(false);
        }
        tables.authorities.insert(name.to_owned(), *key);
        Ok(true)
    }

    fn remove_authority(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.tables.borrow_mut().authorities.remove(name).is_some())
    }

    fn authorities(&self) -> Result<Vec<TrustedAuthority>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .authorities
            .iter()
            .map(|(name, key)| TrustedAuthority {
                name: name.clone(),
                public_key: *key,
            })
            .collect())
    }

    fn organisation(&self) -> Result<Option<OrganisationProfile>, StoreError> {
        Ok(self.tables.borrow().organisation.clone())
    }

    fn save_organisation(&self, profile: &OrganisationProfile) -> Result<(), StoreError> {
        self.tables.borrow_mut().organisation = Some(profile.clone());
        Ok(())
    }

    fn save_channel(&self, row: &ChannelRow, _now: u64) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        match tables.channels.iter_mut().find(|c| c.channel == row.channel) {
            Some(kept) => {
                kept.key = row.key.clone();
                kept.info = row.info.clone();
            }
            None => tables.channels.push(row.clone()),
        }
        Ok(())
    }

    fn channel_rows(&self) -> Result<Vec<ChannelRow>, StoreError> {
        Ok(self.tables.borrow().channels.clone())
    }

    fn set_last_seq(&self, channel: ChannelId, seq: u64) -> Result<(), StoreError> {
        if let Some(row) = self
            .tables
            .borrow_mut()
            .channels
            .iter_mut()
            .find(|c| c.channel == channel)
        {
            row.last_seq = row.last_seq.max(seq);
        }
        Ok(())
    }

    fn forget_channel(&self, channel: ChannelId) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        tables.posts.retain(|(c, _), _| *c != channel);
        tables.warnings.retain(|(c, ..)| *c != channel);
        tables.channel_files.retain(|(c, _), _| *c != channel);
        tables.channels.retain(|c| c.channel != channel);
        Ok(())
    }

    fn insert_post(&self, post: &Post, seen: bool, now: u64) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        tables.arrivals_of_posts += 1;
        let order = tables.arrivals_of_posts;
        tables
            .posts
            .entry((post.channel, post.seq))
            .or_insert_with(|| (post.clone(), now, order, seen));
        if let PostBody::Form { form_id, form } = &post.body {
            tables.forms_kept += 1;
            let kept = tables.forms_kept;
            tables
                .forms
                .entry((post.channel, form_id.clone()))
                .or_insert_with(|| (form.clone(), post.sent_at, kept));
        }
        Ok(())
    }

    fn posts(&self, channel: Option<ChannelId>, unseen_only: bool) -> Result<Vec<Post>, StoreError> {
        let tables = self.tables.borrow();
        let mut posts: Vec<&(Post, u64, u64, bool)> = tables
            .posts
            .values()
            .filter(|(p, _, _, seen)| channel.is_none_or(|c| p.channel == c) && !(unseen_only && *seen))
            .collect();
        posts.sort_by_key(|(p, arrived, order, _)| (*arrived, p.seq, *order));
        Ok(posts.into_iter().map(|(p, ..)| p.clone()).collect())
    }

    fn mark_posts_seen(&self, channel: Option<ChannelId>) -> Result<(), StoreError> {
        for (post, _, _, seen) in self.tables.borrow_mut().posts.values_mut() {
            if channel.is_none_or(|c| post.channel == c) {
                *seen = true;
            }
        }
        Ok(())
    }

    fn post_count(&self, channel: ChannelId) -> Result<u64, StoreError> {
        Ok(self.tables.borrow().posts.keys().filter(|(c, _)| *c == channel).count() as u64)
    }

    fn set_channel_file(&self, channel: ChannelId, seq: u64, view: &FileView) -> Result<(), StoreError> {
        self.tables
            .borrow_mut()
            .channel_files
            .insert((channel, seq), view.clone());
        Ok(())
    }

    fn channel_file(&self, channel: ChannelId, seq: u64) -> Result<Option<FileView>, StoreError> {
        Ok(self.tables.borrow().channel_files.get(&(channel, seq)).cloned())
    }

    fn add_warning(&self, channel: ChannelId, seq: u64, warning: &str, _now: u64) -> Result<(), StoreError> {
        self.tables
            .borrow_mut()
            .warnings
            .push((channel, seq, warning.to_owned(), false));
        Ok(())
    }

    fn take_warnings(&self, channel: Option<ChannelId>) -> Result<Vec<(ChannelId, u64, String)>, StoreError> {
        let mut taken = Vec::new();
        for (c, seq, warning, seen) in self.tables.borrow_mut().warnings.iter_mut() {
            if !*seen && channel.is_none_or(|wanted| wanted == *c) {
                *seen = true;
                taken.push((*c, *seq, warning.clone()));
            }
        }
        Ok(taken)
    }

    fn form_definition(&self, channel: ChannelId, form_id: &str) -> Result<Option<FormDefinition>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .forms
            .get(&(channel, form_id.to_owned()))
            .map(|(form, ..)| form.clone()))
    }

    fn forms(&self) -> Result<Vec<(ChannelId, String, FormDefinition)>, StoreError> {
        let tables = self.tables.borrow();
        let mut forms: Vec<_> = tables
            .forms
            .iter()
            .map(|((channel, form_id), (form, published_at, kept))| {
                ((*published_at, *kept), (*channel, form_id.clone(), form.clone()))
            })
            .collect();
        forms.sort_by_key(|(order, _)| *order);
        Ok(forms.into_iter().map(|(_, form)| form).collect())
    }

    fn insert_submission(&self, submission: &SubmissionRecord, now: u64) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        tables.submissions_kept += 1;
        let order = tables.submissions_kept;
        tables
            .submissions
            .entry(submission.id)
            .or_insert_with(|| (submission.clone(), now, order, submission.outgoing, false));
        Ok(())
    }

    fn delete_submission(&self, id: MessageId) -> Result<(), StoreError> {
        self.tables.borrow_mut().submissions.remove(&id);
        Ok(())
    }

    fn submissions(&self, which: Submissions<'_>) -> Result<Vec<SubmissionRecord>, StoreError> {
        let mut tables = self.tables.borrow_mut();
        let mut found: Vec<&(SubmissionRecord, u64, u64, bool, bool)> = tables
            .submissions
            .values()
            .filter(|(s, _, _, seen, _)| match which {
                Submissions::Form(channel, form_id) => s.channel == channel && s.form_id == form_id,
                Submissions::Unseen => !seen,
            })
            .collect();
        found.sort_by_key(|(s, arrived, order, ..)| (s.sent_at, *arrived, *order));
        let found: Vec<SubmissionRecord> = found.into_iter().map(|(s, ..)| s.clone()).collect();
        if matches!(which, Submissions::Unseen) {
            for (_, _, _, seen, _) in tables.submissions.values_mut() {
                *seen = true;
            }
        }
        Ok(found)
    }

    fn submission_count(&self, channel: ChannelId, form_id: &str) -> Result<u64, StoreError> {
        Ok(self
            .tables
            .borrow()
            .submissions
            .values()
            .filter(|(s, ..)| s.channel == channel && s.form_id == form_id)
            .count() as u64)
    }

    fn set_receipt(&self, submission: MessageId, now: u64) -> Result<(), StoreError> {
        if let Some((record, _, _, seen, _)) = self.tables.borrow_mut().submissions.get_mut(&submission)
            && record.outgoing
            && record.receipt_at.is_none()
        {
            record.receipt_at = Some(now);
            *seen = false;
        }
        Ok(())
    }

    fn unconfirmed_submissions(&self) -> Result<Vec<(MessageId, GroupId)>, StoreError> {
        Ok(self
            .tables
            .borrow()
            .submissions
            .values()
            .filter(|(s, _, _, _, receipt_sent)| !s.outgoing && !receipt_sent)
            .map(|(s, ..)| (s.id, s.group))
            .collect())
    }

    fn mark_receipt_sent(&self, submission: MessageId) -> Result<(), StoreError> {
        if let Some((_, _, _, _, receipt_sent)) = self.tables.borrow_mut().submissions.get_mut(&submission) {
            *receipt_sent = true;
        }
        Ok(())
    }
}

/// The contract of [`ClientStore`], as tests every implementation runs:
/// `fumi_core::client_store_conformance!(make_store_expression);` inside a test module, where the
/// expression makes a fresh, empty store (it may use a temporary directory it keeps alive
/// itself, e.g. by leaking it).
#[macro_export]
macro_rules! client_store_conformance {
    ($make:expr) => {
        mod client_store_conformance {
            use fumi_proto::{AccountId, BlobId, ChannelId, DeviceId, GroupId, MessageId};
            use $crate::content::Attachment;
            use $crate::form::FormDefinition;
            use $crate::franking::{Evidence, Franking, FrankingContext, ReportedContent};
            use $crate::mls::Member;
            use $crate::official::{ChannelInfo, ChannelKey, OrganisationProfile, Post, PostBody};
            use $crate::store::DirectoryState;
            use $crate::store::{
                AccountRow, ClientStore, Conversation, FileView, OutboxEntry, PendingHistory, StoreError, StoredMessage,
            };
            use $crate::store::{ChannelRow, SubmissionRecord, Submissions};

            #[allow(unused_imports)]
            use super::*;

            fn group(n: u8) -> GroupId {
                GroupId::from_bytes([n; 16])
            }

            fn conversation(n: u8, direct: bool) -> Conversation {
                Conversation {
                    group_id: group(n),
                    direct,
                    name: (!direct).then(|| format!("group {n}")),
                    peer: direct.then(|| AccountId::from_bytes([n + 100; 16])),
                    active: true,
                    expire_after_ms: None,
                }
            }

            fn entry(n: u8) -> OutboxEntry {
                OutboxEntry {
                    message_id: MessageId::from_bytes([n; 16]),
                    group_id: group(1),
                    is_commit: n % 2 == 0,
                    request: format!("{{\"n\":{n}}}"),
                    event: (n % 3 == 0).then(|| format!("event {n}")),
                }
            }

            /// Message `n` of conversation `g` from account `from`, sent at `sent_at`.
            fn message(g: u8, from: u8, n: u8, sent_at: u64) -> StoredMessage {
                StoredMessage {
                    local_id: 0,
                    id: MessageId::from_bytes([n; 16]),
                    group_id: group(g),
                    sender: AccountId::from_bytes([from; 16]),
                    is_event: n % 5 == 0,
                    text: format!("message {n} from {from}"),
                    sent_at,
                    outgoing: from == 1,
                    attachment: None,
                    expires_at: None,
                }
            }

            fn view(name: &str) -> FileView {
                FileView {
                    name: name.into(),
                    size: 3,
                    media_type: "text/plain".into(),
                    path: Some(format!("/files/{name}")),
                    error: None,
                }
            }

            fn attachment(n: u8) -> Attachment {
                Attachment {
                    blob: BlobId::from_bytes([n; 16]),
                    key: [n; 32],
                    digest: [n + 1; 32],
                    size: 3,
                    name: format!("file {n}.txt"),
                    media_type: "text/plain".into(),
                }
            }

            /// `m` as the store kept it, under the local id its insertion returned.
            fn kept(m: &StoredMessage, local_id: Option<i64>) -> StoredMessage {
                StoredMessage {
                    local_id: local_id.expect("a new message"),
                    ..m.clone()
                }
            }

            #[test]
            fn history_is_in_sent_order_and_a_message_is_kept_once() {
                let store = $make;
                let late = {
                    let m = message(1, 2, 1, 300);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                let early = {
                    let m = message(1, 1, 2, 100);
                    kept(&m, store.insert_message(&m, true, 1).unwrap())
                };
                let other = {
                    let m = message(2, 2, 3, 200);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                assert!(late.local_id < early.local_id && early.local_id < other.local_id);
                assert_eq!(store.history(group(1)).unwrap(), [early.clone(), late.clone()]);
                // The same conversation, sender and id again: refused, nothing changes. The same
                // id from another sender is another message.
                let mut again = message(1, 2, 1, 999);
                again.text = "changed".into();
                assert_eq!(store.insert_message(&again, false, 2).unwrap(), None);
                let from_another = {
                    let m = message(1, 3, 1, 400);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                assert_eq!(
                    store.history(group(1)).unwrap(),
                    [early, late.clone(), from_another.clone()]
                );
                // Unseen: in the order kept; marking some seen.
                assert_eq!(
                    store.unseen().unwrap(),
                    [late.clone(), other.clone(), from_another.clone()]
                );
                assert_eq!(store.unseen_count(group(1)).unwrap(), 2);
                store.mark_seen(&[late.local_id, 9_999]).unwrap();
                assert_eq!(store.unseen().unwrap(), [other, from_another]);
                assert_eq!(store.unseen_count(group(1)).unwrap(), 1);
                assert_eq!(store.unseen_count(group(7)).unwrap(), 0);
            }

            #[test]
            fn only_an_own_message_is_deleted_and_a_file_view_replaced() {
                let store = $make;
                let own = {
                    let m = message(1, 1, 4, 100);
                    kept(&m, store.insert_message(&m, true, 1).unwrap())
                };
                let received = {
                    let m = message(1, 2, 4, 100);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                store.delete_own_message(group(1), own.id).unwrap();
                assert_eq!(store.history(group(1)).unwrap(), vec![received.clone()]);
                store.set_file_view(received.local_id, &view("a.txt")).unwrap();
                store.set_file_view(9_999, &view("b.txt")).unwrap();
                let shown = store.history(group(1)).unwrap().remove(0);
                assert_eq!(shown.attachment, Some(view("a.txt")));
                // Ids are never reused.
                let next = {
                    let m = message(1, 2, 6, 100);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                assert!(next.local_id > own.local_id && next.local_id > received.local_id);
            }

            #[test]
            fn expired_messages_go_with_their_downloads() {
                let store = $make;
                let mut expiring = message(1, 2, 7, 100);
                expiring.expires_at = Some(1_000);
                expiring.attachment = Some(view("gone.txt"));
                let expiring = kept(&expiring, store.insert_message(&expiring, false, 1).unwrap());
                let mut later = message(1, 2, 8, 100);
                later.expires_at = Some(2_000);
                let later = kept(&later, store.insert_message(&later, false, 1).unwrap());
                let forever = {
                    let m = message(1, 2, 9, 100);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                store.add_download(expiring.local_id, &attachment(1)).unwrap();
                store.add_download(forever.local_id, &attachment(2)).unwrap();
                assert_eq!(store.purge_expired(999).unwrap(), []);
                assert_eq!(store.purge_expired(1_000).unwrap(), [view("gone.txt")]);
                assert_eq!(store.history(group(1)).unwrap(), [later, forever.clone()]);
                assert_eq!(store.downloads().unwrap(), [(forever.local_id, attachment(2))]);
                assert!(!store.is_download_pending(attachment(1).blob).unwrap());
            }

            #[test]
            fn downloads_are_queued_once_in_message_order() {
                let store = $make;
                let first = {
                    let m = message(1, 2, 1, 100);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                let second = {
                    let m = message(1, 2, 2, 100);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                store.add_download(second.local_id, &attachment(5)).unwrap();
                store.add_download(first.local_id, &attachment(6)).unwrap();
                // The same blob again: the first entry stays.
                store.add_download(first.local_id, &attachment(5)).unwrap();
                assert_eq!(
                    store.downloads().unwrap(),
                    [(first.local_id, attachment(6)), (second.local_id, attachment(5))]
                );
                assert!(store.is_download_pending(attachment(5).blob).unwrap());
                store.remove_download(attachment(5).blob).unwrap();
                store.remove_download(attachment(9).blob).unwrap();
                assert!(!store.is_download_pending(attachment(5).blob).unwrap());
                assert_eq!(store.downloads().unwrap(), [(first.local_id, attachment(6))]);
            }

            #[test]
            fn the_conversation_with_the_newest_message_comes_first() {
                let store = $make;
                store.insert_conversation(&conversation(1, true), 10).unwrap();
                store.insert_conversation(&conversation(2, true), 20).unwrap();
                store.insert_conversation(&conversation(3, true), 30).unwrap();
                {
                    let m = message(2, 2, 1, 100);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                {
                    let m = message(1, 2, 2, 100);
                    kept(&m, store.insert_message(&m, false, 1).unwrap())
                };
                let order: Vec<GroupId> = store
                    .conversations()
                    .unwrap()
                    .iter()
                    .map(|c| c.group_id)
                    .collect();
                assert_eq!(order, [group(1), group(2), group(3)]);
            }

            fn account(n: u8) -> AccountId {
                AccountId::from_bytes([n; 16])
            }

            #[test]
            fn an_identity_key_is_pinned_on_first_sight_and_verified_in_person() {
                let store = $make;
                assert_eq!(store.pinned_identity_key(account(1)).unwrap(), None);
                assert!(store.check_identity_key(account(1), &[1; 32]).unwrap());
                assert!(store.check_identity_key(account(1), &[1; 32]).unwrap());
                assert!(
                    !store.check_identity_key(account(1), &[2; 32]).unwrap(),
                    "another key"
                );
                assert_eq!(store.pinned_identity_key(account(1)).unwrap(), Some([1; 32]));
                assert!(!store.is_verified(account(1)).unwrap());
                // Verifying a new key in person replaces the pin.
                store.set_verified(account(1), &[2; 32]).unwrap();
                assert_eq!(store.pinned_identity_key(account(1)).unwrap(), Some([2; 32]));
                assert!(store.is_verified(account(1)).unwrap());
                assert!(!store.check_identity_key(account(1), &[1; 32]).unwrap());
                assert!(!store.is_verified(account(9)).unwrap());
            }

            #[test]
            fn a_profile_key_follows_the_newest_announcement() {
                let store = $make;
                assert!(!store.has_profile_key(account(1)).unwrap());
                assert!(store.set_profile_key(account(1), &[2; 32], 2_000).unwrap());
                assert_eq!(store.profiles_to_fetch().unwrap(), [(account(1), [2; 32])]);
                assert!(
                    !store.set_profile_key(account(1), &[1; 32], 1_000).unwrap(),
                    "older"
                );
                assert!(
                    !store.set_profile_key(account(1), &[2; 32], 2_500).unwrap(),
                    "the same"
                );
                store.set_profile(account(1), Some("alice.42"), "Alice").unwrap();
                assert_eq!(store.profiles_to_fetch().unwrap(), []);
                // Older than the known key's newest announcement (2 500): ignored.
                assert!(!store.set_profile_key(account(1), &[3; 32], 2_400).unwrap());
                assert!(
                    store.set_profile_key(account(1), &[3; 32], 3_000).unwrap(),
                    "newer"
                );
                assert_eq!(store.profiles_to_fetch().unwrap(), [(account(1), [3; 32])]);
                assert!(store.has_profile_key(account(1)).unwrap());
                assert_eq!(
                    store.profile_keys(&[account(2), account(1)]).unwrap(),
                    [(account(1), [3; 32])]
                );
                let contact = store.contact(account(1)).unwrap().unwrap();
                assert_eq!(
                    (contact.username.as_deref(), contact.display_name.as_deref()),
                    (Some("alice.42"), Some("Alice"))
                );
                assert_eq!(store.contact_by_username("alice.42").unwrap(), Some(account(1)));
                assert_eq!(store.contact_by_username("bob.7").unwrap(), None);
            }

            #[test]
            fn contacts_keep_what_is_known_and_list_the_pinned() {
                let store = $make;
                store
                    .upsert_contact(account(1), Some("zoe.1"), Some("Zoe"))
                    .unwrap();
                store.upsert_contact(account(1), None, None).unwrap();
                store.upsert_contact(account(2), Some("adam.2"), None).unwrap();
                store.upsert_contact(account(3), None, Some("No Name")).unwrap();
                let zoe = store.contact(account(1)).unwrap().unwrap();
                assert_eq!(
                    (zoe.username.as_deref(), zoe.display_name.as_deref()),
                    (Some("zoe.1"), Some("Zoe"))
                );
                assert_eq!(store.contact(account(8)).unwrap(), None);
                // Only contacts with a pinned key are listed, by username, none first.
                assert_eq!(store.contacts().unwrap(), []);
                for n in [1, 2, 3] {
                    store.check_identity_key(account(n), &[n; 32]).unwrap();
                }
                store.set_profile_key(account(2), &[7; 32], 1).unwrap();
                let listed: Vec<(AccountId, Option<[u8; 32]>, Option<[u8; 32]>)> = store
                    .contacts()
                    .unwrap()
                    .into_iter()
                    .map(|(c, identity, profile)| (c.account_id, identity, profile))
                    .collect();
                assert_eq!(
                    listed,
                    [
                        (account(3), Some([3; 32]), None),
                        (account(2), Some([2; 32]), Some([7; 32])),
                        (account(1), Some([1; 32]), None),
                    ]
                );
                store
                    .set_contact_avatar(account(2), "digest", "/avatars/adam")
                    .unwrap();
                store
                    .set_contact_avatar(account(9), "digest", "/avatars/nobody")
                    .unwrap();
                assert_eq!(
                    store.contact_avatar_digest(account(2)).unwrap().as_deref(),
                    Some("digest")
                );
                assert_eq!(
                    store.contact(account(2)).unwrap().unwrap().avatar_path.as_deref(),
                    Some("/avatars/adam")
                );
                assert_eq!(store.contact_avatar_digest(account(9)).unwrap(), None);
                assert_eq!(store.contact(account(9)).unwrap(), None);
            }

            fn account_row(profile_key: [u8; 32], profile_key_set_at: u64) -> AccountRow {
                AccountRow {
                    server: "http://127.0.0.1:8080".into(),
                    account_id: account(1),
                    device_id: DeviceId::from_bytes([2; 16]),
                    device_secret: [3; 32],
                    identity_secret: [4; 32],
                    signature_key: Some(vec![5; 32]),
                    profile_key,
                    username: Some("alice.42".into()),
                    display_name: "Alice".into(),
                    avatar_digest: None,
                    profile_key_set_at,
                }
            }

            fn same_account(a: &AccountRow, b: &AccountRow) -> bool {
                (a.server == b.server)
                    && (a.account_id, a.device_id) == (b.account_id, b.device_id)
                    && (a.device_secret, a.identity_secret, a.profile_key)
                        == (b.device_secret, b.identity_secret, b.profile_key)
                    && (&a.signature_key, &a.username, &a.display_name, &a.avatar_digest)
                        == (&b.signature_key, &b.username, &b.display_name, &b.avatar_digest)
                    && a.profile_key_set_at == b.profile_key_set_at
            }

            fn evidence(text: &str) -> Evidence {
                Evidence {
                    context: FrankingContext {
                        group: group(1),
                        sender: account(2),
                        device: DeviceId::from_bytes([2; 16]),
                        message: MessageId::from_bytes([1; 16]),
                        sent_at: 100,
                    },
                    content: ReportedContent {
                        text: text.into(),
                        file: None,
                    },
                    franking: Franking {
                        key: "k".into(),
                        commitment: "c".into(),
                        signature: "s".into(),
                    },
                    signature_key: "key".into(),
                    credential: "credential".into(),
                }
            }

            #[test]
            fn the_account_is_saved_and_follows_its_newest_profile_key() {
                let store = $make;
                assert!(store.account().unwrap().is_none());
                assert!(
                    !store.adopt_own_profile_key(&[9; 32], 10).unwrap(),
                    "no account yet"
                );
                store.save_account(&account_row([6; 32], 1_000)).unwrap();
                assert!(same_account(
                    &store.account().unwrap().unwrap(),
                    &account_row([6; 32], 1_000)
                ));
                assert!(!store.adopt_own_profile_key(&[7; 32], 900).unwrap(), "older");
                assert!(
                    !store.adopt_own_profile_key(&[6; 32], 2_000).unwrap(),
                    "the same key"
                );
                assert!(store.adopt_own_profile_key(&[7; 32], 2_000).unwrap());
                assert!(same_account(
                    &store.account().unwrap().unwrap(),
                    &account_row([7; 32], 2_000)
                ));
                store.save_account(&account_row([8; 32], 3_000)).unwrap();
                assert!(same_account(
                    &store.account().unwrap().unwrap(),
                    &account_row([8; 32], 3_000)
                ));
            }

            #[test]
            fn evidence_is_found_for_received_messages_only_and_goes_when_they_expire() {
                let store = $make;
                let mut received = message(1, 2, 1, 100);
                received.expires_at = Some(1_000);
                let received = kept(&received, store.insert_message(&received, false, 1).unwrap());
                let own = message(1, 1, 1, 100);
                let own = kept(&own, store.insert_message(&own, true, 1).unwrap());
                store
                    .keep_franking_evidence(received.local_id, &evidence("first"))
                    .unwrap();
                store
                    .keep_franking_evidence(received.local_id, &evidence("replaced"))
                    .unwrap();
                store
                    .keep_franking_evidence(own.local_id, &evidence("own"))
                    .unwrap();
                assert_eq!(
                    store.received_evidence(received.id).unwrap(),
                    [evidence("replaced")]
                );
                assert_eq!(
                    store.received_evidence(MessageId::from_bytes([7; 16])).unwrap(),
                    []
                );
                // Another sender reusing the id: both are found (and no more than two).
                for from in [3, 4] {
                    let again = message(1, from, 1, 100);
                    let again = kept(&again, store.insert_message(&again, false, 1).unwrap());
                    store
                        .keep_franking_evidence(again.local_id, &evidence("reused"))
                        .unwrap();
                }
                assert_eq!(store.received_evidence(received.id).unwrap().len(), 2);
                store.purge_expired(1_000).unwrap();
                assert_eq!(
                    store.received_evidence(received.id).unwrap(),
                    [evidence("reused"), evidence("reused")]
                );
            }

            #[test]
            fn removed_devices_awaited_history_and_uploads_are_kept() {
                let store = $make;
                let (one, two) = (DeviceId::from_bytes([1; 16]), DeviceId::from_bytes([2; 16]));
                store.revoke_device(two, 1).unwrap();
                store.revoke_device(one, 2).unwrap();
                store.revoke_device(two, 3).unwrap();
                let mut revoked = store.revoked_devices().unwrap();
                revoked.sort();
                assert_eq!(revoked, [one, two]);

                store.add_pending_history(&[1; 32], &[2; 32], 10).unwrap();
                store.add_pending_history(&[3; 32], &[4; 32], 20).unwrap();
                store.add_pending_history(&[1; 32], &[5; 32], 30).unwrap();
                let mut awaited = store.pending_history().unwrap();
                awaited.sort_by_key(|p| p.token);
                assert_eq!(
                    awaited,
                    [
                        PendingHistory {
                            token: [1; 32],
                            link_key: [5; 32],
                            since: 30
                        },
                        PendingHistory {
                            token: [3; 32],
                            link_key: [4; 32],
                            since: 20
                        },
                    ]
                );
                store.remove_pending_history(&[1; 32]).unwrap();
                assert_eq!(store.pending_history().unwrap().len(), 1);

                let blob = BlobId::from_bytes([6; 16]);
                assert!(store.pending_upload("/a.txt", &[1; 32]).unwrap().is_none());
                store
                    .save_pending_upload("/a.txt", &[1; 32], blob, &[7; 32], &[8; 32], 1)
                    .unwrap();
                store
                    .save_pending_upload("/a.txt", &[1; 32], blob, &[9; 32], &[8; 32], 2)
                    .unwrap();
                let upload = store.pending_upload("/a.txt", &[1; 32]).unwrap().expect("kept");
                assert_eq!(
                    (upload.blob, upload.file_key, upload.nonce_seed),
                    (blob, [9; 32], [8; 32])
                );
                assert!(
                    store.pending_upload("/a.txt", &[2; 32]).unwrap().is_none(),
                    "another purpose"
                );
                store.forget_pending_upload("/a.txt", &[1; 32]).unwrap();
                assert!(store.pending_upload("/a.txt", &[1; 32]).unwrap().is_none());
            }

            #[test]
            fn the_directory_state_is_pinned_and_the_own_review_recorded() {
                let store = $make;
                assert_eq!(store.directory_state().unwrap(), None);
                store.record_own_review(5, Some(2), true).unwrap();
                assert_eq!(store.directory_state().unwrap(), None, "no state: no review");
                let pinned = DirectoryState::pinned([1; 32], 10, [2; 32]);
                store.save_directory_state(&pinned).unwrap();
                assert_eq!(store.directory_state().unwrap(), Some(pinned.clone()));
                store.record_own_review(12, Some(3), true).unwrap();
                store.record_own_review(11, None, false).unwrap();
                let reviewed = store.directory_state().unwrap().unwrap();
                assert_eq!(
                    (
                        reviewed.own_checked_epoch,
                        reviewed.own_version,
                        reviewed.own_alarm
                    ),
                    (12, 3, false),
                    "the newest epoch looked at, the last clean version, the last verdict"
                );
                assert_eq!(
                    (reviewed.log_key, reviewed.epoch, reviewed.root_hash),
                    ([1; 32], 10, [2; 32])
                );
                let newer = DirectoryState {
                    epoch: 20,
                    root_hash: [3; 32],
                    ..reviewed
                };
                store.save_directory_state(&newer).unwrap();
                assert_eq!(store.directory_state().unwrap(), Some(newer));
            }

            #[test]
            fn own_devices_are_known_once_with_the_first_key_recorded() {
                let store = $make;
                let (one, two) = (DeviceId::from_bytes([1; 16]), DeviceId::from_bytes([2; 16]));
                store.know_device(one, None, 10).unwrap();
                store.know_device(one, Some(&[7; 32]), 20).unwrap();
                store.know_device(one, Some(&[8; 32]), 30).unwrap();
                store.know_device(two, Some(&[9; 32]), 40).unwrap();
                let known = store.known_devices().unwrap();
                assert_eq!(
                    (known.len(), known[&one], known[&two]),
                    (2, Some([7; 32]), Some([9; 32]))
                );
                let learned = store.known_devices_learned_at().unwrap();
                assert_eq!((learned[&one], learned[&two]), (10, 40));
                store.revoke_device(two, 50).unwrap();
                store.revoke_device(two, 60).unwrap();
                assert_eq!(
                    store.revoked_devices_at().unwrap(),
                    [(two, 50)].into_iter().collect()
                );
            }

            #[test]
            fn arrivals_wait_in_order_until_checked() {
                let store = $make;
                let member = |n: u8| Member {
                    account: account(n),
                    device: DeviceId::from_bytes([n + 50; 16]),
                    identity_key: [n; 32],
                    signature_key: [n + 1; 32],
                };
                store
                    .add_pending_arrival(group(2), &[member(1), member(2)])
                    .unwrap();
                store.add_pending_arrival(group(1), &[member(3)]).unwrap();
                let waiting = store.pending_arrivals().unwrap();
                assert_eq!(waiting.len(), 2);
                assert!(waiting[0].0 < waiting[1].0);
                assert_eq!(
                    (waiting[0].1, &waiting[0].2[..]),
                    (group(2), &[member(1), member(2)][..])
                );
                assert_eq!((waiting[1].1, &waiting[1].2[..]), (group(1), &[member(3)][..]));
                assert!(store.has_pending_arrivals(group(2)).unwrap());
                store.remove_pending_arrival(waiting[0].0).unwrap();
                assert!(!store.has_pending_arrivals(group(2)).unwrap());
                assert!(store.has_pending_arrivals(group(1)).unwrap());
                assert_eq!(store.pending_arrivals().unwrap().len(), 1);
            }

            #[test]
            fn a_refused_conversation_says_why_until_lifted() {
                let store = $make;
                let devices = [DeviceId::from_bytes([1; 16]), DeviceId::from_bytes([2; 16])];
                assert_eq!(store.conversation_refusal(group(1)).unwrap(), None);
                store.refuse_conversation(group(1), "first", &devices).unwrap();
                store
                    .refuse_conversation(group(1), "again", &devices[..1])
                    .unwrap();
                store.refuse_conversation(group(2), "other", &[]).unwrap();
                assert_eq!(
                    store.conversation_refusal(group(1)).unwrap().as_deref(),
                    Some("again")
                );
                let mut refused = store.refused_conversations().unwrap();
                refused.sort_by_key(|(g, _)| *g);
                assert_eq!(refused, [(group(1), devices[..1].to_vec()), (group(2), vec![])]);
                store.lift_refusal(group(1)).unwrap();
                assert_eq!(store.conversation_refusal(group(1)).unwrap(), None);
                assert_eq!(store.refused_conversations().unwrap().len(), 1);
            }

            fn channel(n: u8) -> ChannelId {
                ChannelId::from_bytes([n; 16])
            }

            fn organisation(name: &str) -> OrganisationProfile {
                OrganisationProfile {
                    name: name.into(),
                    logo: None,
                    verification: None,
                }
            }

            fn channel_row(n: u8, name: &str, key: u8) -> ChannelRow {
                ChannelRow {
                    channel: channel(n),
                    owner: account(n),
                    owner_key: [n; 32],
                    key: ChannelKey {
                        epoch: key as u32,
                        key: [key; 32],
                    },
                    own: n % 2 == 0,
                    info: ChannelInfo {
                        v: 1,
                        channel: channel(n),
                        epoch: key as u32,
                        name: name.into(),
                        description: None,
                        organisation: organisation("City"),
                    },
                    last_seq: 0,
                }
            }

            fn form(title: &str) -> FormDefinition {
                FormDefinition {
                    title: title.into(),
                    description: None,
                    fields: vec![],
                }
            }

            fn post(c: u8, seq: u64, body: PostBody) -> Post {
                Post {
                    v: 1,
                    channel: channel(c),
                    epoch: 0,
                    seq,
                    sent_at: seq * 10,
                    body,
                }
            }

            fn text(t: &str) -> PostBody {
                PostBody::Text { text: t.into() }
            }

            fn submission(n: u8, form_id: &str, sent_at: u64, outgoing: bool) -> SubmissionRecord {
                SubmissionRecord {
                    id: MessageId::from_bytes([n; 16]),
                    channel: channel(1),
                    form_id: form_id.into(),
                    group: group(n),
                    submitter: account(n),
                    answers: [("name".to_owned(), serde_json::json!(format!("answer {n}")))]
                        .into_iter()
                        .collect(),
                    sent_at,
                    outgoing,
                    receipt_at: None,
                }
            }

            #[test]
            fn authorities_are_trusted_once_by_name_and_key() {
                let store = $make;
                assert!(store.add_authority("ministry", &[1; 32], 1).unwrap());
                assert!(store.add_authority("agency", &[2; 32], 2).unwrap());
                assert!(
                    !store.add_authority("ministry", &[3; 32], 3).unwrap(),
                    "the name is taken"
                );
                assert!(
                    !store.add_authority("copy", &[1; 32], 4).unwrap(),
                    "the key is trusted"
                );
                let names: Vec<String> = store.authorities().unwrap().into_iter().map(|a| a.name).collect();
                assert_eq!(names, ["agency", "ministry"]);
                assert!(store.remove_authority("agency").unwrap());
                assert!(!store.remove_authority("agency").unwrap());
                assert_eq!(store.authorities().unwrap()[0].public_key, [1; 32]);
                assert_eq!(store.organisation().unwrap(), None);
                store.save_organisation(&organisation("City")).unwrap();
                store.save_organisation(&organisation("City Hall")).unwrap();
                assert_eq!(store.organisation().unwrap(), Some(organisation("City Hall")));
            }

            #[test]
            fn a_channel_saved_again_takes_its_new_key_and_keeps_its_progress() {
                let store = $make;
                store.save_channel(&channel_row(1, "clinic", 1), 10).unwrap();
                store.save_channel(&channel_row(2, "helpline", 1), 20).unwrap();
                store.set_last_seq(channel(1), 5).unwrap();
                store.set_last_seq(channel(1), 3).unwrap();
                let mut again = channel_row(1, "clinic (new name)", 2);
                again.own = true;
                again.last_seq = 0;
                store.save_channel(&again, 30).unwrap();
                let kept = store.channel_row(channel(1)).unwrap().unwrap();
                assert_eq!(
                    (kept.key.epoch, kept.info.name.as_str()),
                    (2, "clinic (new name)")
                );
                assert_eq!(
                    (kept.own, kept.last_seq),
                    (false, 5),
                    "ownership and progress stay"
                );
                assert_eq!(kept.link().owner_key, [1; 32]);
                let order: Vec<ChannelId> = store.channel_rows().unwrap().iter().map(|r| r.channel).collect();
                assert_eq!(order, [channel(1), channel(2)]);
                assert_eq!(store.channel_row(channel(9)).unwrap(), None);
            }

            #[test]
            fn posts_arrive_once_and_go_with_their_channel() {
                let store = $make;
                store.save_channel(&channel_row(1, "clinic", 1), 10).unwrap();
                store.save_channel(&channel_row(2, "helpline", 1), 10).unwrap();
                store
                    .insert_post(&post(1, 2, text("second")), false, 100)
                    .unwrap();
                store.insert_post(&post(1, 1, text("first")), false, 100).unwrap();
                store
                    .insert_post(&post(2, 1, text("elsewhere")), true, 50)
                    .unwrap();
                store
                    .insert_post(&post(1, 1, text("replayed")), false, 200)
                    .unwrap();
                let texts = |posts: Vec<Post>| -> Vec<String> {
                    posts
                        .into_iter()
                        .map(|p| match p.body {
                            PostBody::Text { text } => text,
                            _ => panic!("a text post"),
                        })
                        .collect()
                };
                assert_eq!(
                    texts(store.posts(None, false).unwrap()),
                    ["elsewhere", "first", "second"]
                );
                assert_eq!(
                    texts(store.posts(Some(channel(1)), true).unwrap()),
                    ["first", "second"]
                );
                assert_eq!(store.post_count(channel(1)).unwrap(), 2);
                store.mark_posts_seen(Some(channel(1))).unwrap();
                assert_eq!(store.posts(None, true).unwrap(), []);
                store.set_channel_file(channel(1), 2, &view("a.pdf")).unwrap();
                store.set_channel_file(channel(1), 2, &view("b.pdf")).unwrap();
                assert_eq!(store.channel_file(channel(1), 2).unwrap(), Some(view("b.pdf")));
                assert_eq!(store.channel_file(channel(1), 3).unwrap(), None);
                store.add_warning(channel(1), 3, "refused", 1).unwrap();
                store.add_warning(channel(2), 2, "withheld", 2).unwrap();
                store.add_warning(channel(1), 4, "refused again", 3).unwrap();
                assert_eq!(
                    store.take_warnings(Some(channel(1))).unwrap(),
                    [
                        (channel(1), 3, "refused".to_owned()),
                        (channel(1), 4, "refused again".to_owned())
                    ]
                );
                assert_eq!(store.take_warnings(Some(channel(1))).unwrap(), []);
                store.add_warning(channel(1), 5, "late", 4).unwrap();
                store.forget_channel(channel(1)).unwrap();
                assert_eq!(
                    store.take_warnings(None).unwrap(),
                    [(channel(2), 2, "withheld".to_owned())]
                );
                assert_eq!(store.post_count(channel(1)).unwrap(), 0);
                assert_eq!(store.channel_file(channel(1), 2).unwrap(), None);
                assert_eq!(store.channel_row(channel(1)).unwrap(), None);
                assert_eq!(store.post_count(channel(2)).unwrap(), 1);
            }

            #[test]
            fn a_form_is_kept_from_its_first_post() {
                let store = $make;
                let publish = |seq: u64, form_id: &str, title: &str| {
                    post(
                        1,
                        seq,
                        PostBody::Form {
                            form_id: form_id.into(),
                            form: form(title),
                        },
                    )
                };
                store
                    .insert_post(&publish(2, "vaccine", "Vaccination"), false, 1)
                    .unwrap();
                store
                    .insert_post(&publish(1, "census", "Census"), false, 1)
                    .unwrap();
                store
                    .insert_post(&publish(3, "vaccine", "Changed"), false, 1)
                    .unwrap();
                assert_eq!(
                    store.form_definition(channel(1), "vaccine").unwrap(),
                    Some(form("Vaccination"))
                );
                assert_eq!(store.form_definition(channel(2), "vaccine").unwrap(), None);
                let forms: Vec<String> = store.forms().unwrap().into_iter().map(|(_, id, _)| id).collect();
                assert_eq!(forms, ["census", "vaccine"], "by publication time");
            }

            #[test]
            fn submissions_are_kept_once_listed_and_confirmed() {
                let store = $make;
                store
                    .insert_submission(&submission(2, "vaccine", 200, false), 1)
                    .unwrap();
                store
                    .insert_submission(&submission(1, "vaccine", 100, false), 2)
                    .unwrap();
                store
                    .insert_submission(&submission(3, "census", 50, true), 3)
                    .unwrap();
                store
                    .insert_submission(&submission(1, "vaccine", 999, false), 4)
                    .unwrap();
                let ids = |records: Vec<SubmissionRecord>| -> Vec<MessageId> { records.iter().map(|s| s.id).collect() };
                let id = |n: u8| MessageId::from_bytes([n; 16]);
                assert_eq!(
                    ids(store
                        .submissions(Submissions::Form(channel(1), "vaccine"))
                        .unwrap()),
                    [id(1), id(2)]
                );
                assert_eq!(store.submission_count(channel(1), "vaccine").unwrap(), 2);
                // The received ones are news once; the sent one is not.
                assert_eq!(
                    ids(store.submissions(Submissions::Unseen).unwrap()),
                    [id(1), id(2)]
                );
                assert_eq!(store.submissions(Submissions::Unseen).unwrap(), []);
                // A receipt for the sent one makes it news once; for a received one, nothing.
                store.set_receipt(id(3), 500).unwrap();
                store.set_receipt(id(3), 600).unwrap();
                store.set_receipt(id(1), 700).unwrap();
                let news = store.submissions(Submissions::Unseen).unwrap();
                assert_eq!((ids(news.clone()), news[0].receipt_at), (vec![id(3)], Some(500)));
                let mut unconfirmed = store.unconfirmed_submissions().unwrap();
                unconfirmed.sort();
                assert_eq!(unconfirmed, [(id(1), group(1)), (id(2), group(2))]);
                store.mark_receipt_sent(id(1)).unwrap();
                assert_eq!(store.unconfirmed_submissions().unwrap(), [(id(2), group(2))]);
                store.delete_submission(id(2)).unwrap();
                assert_eq!(store.unconfirmed_submissions().unwrap(), []);
                assert_eq!(store.submission_count(channel(1), "vaccine").unwrap(), 1);
            }

            #[test]
            fn envelopes_are_remembered_once_processed() {
                let store = $make;
                assert!(!store.is_processed(7).unwrap());
                store.mark_processed(7, 100).unwrap();
                store.mark_processed(7, 200).unwrap();
                assert!(store.is_processed(7).unwrap());
                assert!(!store.is_processed(8).unwrap());
            }

            #[test]
            fn the_outbox_keeps_order_and_refuses_a_reused_id() {
                let store = $make;
                for (n, at) in [(3, 10), (1, 20), (2, 20)] {
                    store.push_outbox(&entry(n), at).unwrap();
                }
                assert_eq!(store.outbox().unwrap(), [entry(3), entry(1), entry(2)]);
                assert!(store.push_outbox(&entry(1), 30).is_err());
                store.remove_outbox(entry(1).message_id).unwrap();
                store.remove_outbox(MessageId::from_bytes([99; 16])).unwrap();
                assert_eq!(store.outbox().unwrap(), [entry(3), entry(2)]);
            }

            #[test]
            fn conversations_are_kept_updated_and_left() {
                let store = $make;
                assert_eq!(store.conversations().unwrap(), []);
                let mut timed = conversation(1, true);
                timed.expire_after_ms = Some(5);
                store.insert_conversation(&timed, 10).unwrap();
                store.insert_conversation(&conversation(2, false), 20).unwrap();
                // Inserted again: the first stays; a new conversation starts without a timer.
                store.insert_conversation(&conversation(1, false), 30).unwrap();
                assert_eq!(store.conversation(group(1)).unwrap(), Some(conversation(1, true)));
                assert_eq!(
                    store.conversations().unwrap(),
                    [conversation(2, false), conversation(1, true)],
                    "newest created first"
                );
                store.set_expire_after(group(2), Some(60_000)).unwrap();
                store
                    .update_conversation(group(2), false, Some("renamed"), None)
                    .unwrap();
                store.deactivate_conversation(group(1)).unwrap();
                let two = store.conversation(group(2)).unwrap().unwrap();
                assert_eq!(
                    (two.name.as_deref(), two.expire_after_ms),
                    (Some("renamed"), Some(60_000))
                );
                assert!(!store.conversation(group(1)).unwrap().unwrap().active);
                store.set_expire_after(group(2), None).unwrap();
                assert_eq!(
                    store.conversation(group(2)).unwrap().unwrap().expire_after_ms,
                    None
                );
                // Changes to a conversation not kept change nothing.
                store.deactivate_conversation(group(9)).unwrap();
                assert_eq!(store.conversation(group(9)).unwrap(), None);
                assert_eq!(store.conversations().unwrap().len(), 2);
            }

            #[test]
            fn a_failed_transaction_keeps_nothing() {
                let store = $make;
                store.push_outbox(&entry(1), 1).unwrap();
                let failed: Result<(), StoreError> = store.in_transaction(|| {
                    store.mark_processed(5, 1)?;
                    store.push_outbox(&entry(2), 2)?;
                    store.insert_conversation(&conversation(3, true), 3)?;
                    store.remove_outbox(entry(1).message_id)?;
                    store.insert_message(&message(3, 2, 1, 1), false, 1)?;
                    Err(StoreError("the step failed".into()))
                });
                assert!(failed.is_err());
                assert!(!store.is_processed(5).unwrap());
                assert_eq!(store.outbox().unwrap(), [entry(1)]);
                assert_eq!(store.conversations().unwrap(), []);
                assert_eq!(store.unseen().unwrap(), []);
                let kept: Result<(), StoreError> = store.in_transaction(|| {
                    store.mark_processed(5, 1)?;
                    store.push_outbox(&entry(2), 2)
                });
                kept.unwrap();
                assert!(store.is_processed(5).unwrap());
                assert_eq!(store.outbox().unwrap(), [entry(1), entry(2)]);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::client_store_conformance!(crate::store::MemoryStore::new());
}
