#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod admin;
pub mod audit;
mod devices;
mod files;
mod history;
pub mod keys;
pub mod official;
mod report;
mod safety;
pub mod store;
pub mod transport;

use fumi_proto::ErrorCode;
use fumi_proto::endpoints;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fumi_core::content::{Body, ContentError, MemberProfileKey};
use fumi_core::machine::Machine;
use fumi_core::mls::{Commit, Member, MlsDevice, MlsError};
pub use fumi_core::receive::human_duration;
use fumi_core::receive::{self, Outcome, ReceiveError, describe_change, distinct_accounts, timer_event};
use fumi_core::send::SendError;
use fumi_core::store::ClientStore;
use fumi_core::{AccountIdentity, Profile, Username};
use fumi_proto::*;
use rand::RngCore;
use thiserror::Error;

pub use crate::devices::{ContactSummary, DeviceSummary};
pub use crate::files::{NoProgress, Progress, UPLOAD_CHUNK_BYTES};
pub use crate::store::FileView;
use crate::store::{AccountRow, Conversation, OutboxEntry, Provider, Store, StoredMessage};
use crate::transport::{Delivery, Transport};

/// One-time KeyPackages uploaded at registration and topped up to.
const KEY_PACKAGE_STOCK: usize = 20;
/// Below this stock, the client uploads more.
const KEY_PACKAGE_LOW_WATER: u64 = 5;
/// How often a commit is retried after losing its epoch to another member's commit.
const COMMIT_ATTEMPTS: usize = 5;
/// The first pause before a lost delivery connection is made again while listening; it
/// doubles up to the longest.
const RECONNECT_FIRST_PAUSE: Duration = Duration::from_millis(250);
const RECONNECT_LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// Errors of client operations; each message is meant for the user.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The user asked for something that cannot be done (unknown contact, bad name, ...).
    #[error("{0}")]
    Usage(String),
    /// The home directory holds no account.
    #[error("no account in this home directory; run `fumi register` first")]
    NotRegistered,
    /// The server refused a request.
    #[error("server refused ({status} {code}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Stable error code.
        code: String,
        /// Server's message.
        message: String,
        /// For `epoch_conflict`, the group's epoch on the server.
        current_epoch: Option<u64>,
    },
    /// The server could not be reached.
    #[error("network: {0}")]
    Network(String),
    /// The server answered something that does not follow the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A device is certified by another identity key than the one known for its account.
    #[error(
        "SECURITY WARNING: {0} presented a different identity key than before; refusing it. Someone may be \
         impersonating this account. Verify with them in person before trusting it again."
    )]
    IdentityKeyChanged(String),
    /// As [`Self::IdentityKeyChanged`], for a contact whose safety number the user verified.
    #[error(
        "SECURITY WARNING: THE SAFETY NUMBER OF YOUR VERIFIED CONTACT {0} HAS CHANGED: a device presented a \
         different identity key than the one you verified in person; refusing it. Do not trust this account \
         until you have compared the new safety number with them in person (`fumi verify`)."
    )]
    VerifiedIdentityKeyChanged(String),
    /// An MLS or credential check failed.
    #[error(transparent)]
    Mls(#[from] MlsError),
    /// The client store failed.
    #[error("client store: {0}")]
    Store(String),
    /// The server's key directory contradicts what the server handed out, or its history changed.
    #[error("SECURITY WARNING: {0}")]
    KeyTransparency(String),
}

impl From<fumi_core::store::StoreError> for ClientError {
    fn from(error: fumi_core::store::StoreError) -> Self {
        ClientError::Store(error.0)
    }
}

impl ClientError {
    /// Whether this device is at fault (its store, its disk, its code) rather than the server or
    /// a peer. A received message that failed this way is kept on the server and processed
    /// again at the next sync; only a message that is itself at fault is consumed and reported.
    pub fn is_local(&self) -> bool {
        match self {
            ClientError::Store(_) => true,
            ClientError::Mls(error) => error.is_local(),
            _ => false,
        }
    }

    fn is_code(&self, wanted: ErrorCode) -> bool {
        matches!(self, ClientError::Server { code, .. } if code == wanted.as_str())
    }

    /// The server could not be reached or is not serving yet (it may be restarting).
    fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Network(_) | ClientError::Server { status: 502..=504, .. }
        )
    }
}

/// A message or event for display.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DisplayMessage {
    /// Sender-chosen message id.
    pub id: String,
    /// Conversation (group) id.
    pub conversation: String,
    /// Group name, or the peer's username for a 1:1 conversation.
    pub conversation_name: String,
    /// Whether the conversation is a group.
    pub group: bool,
    /// Sender's username (or account id if no profile is known yet).
    pub sender: String,
    /// Sender's display name, from their encrypted profile.
    pub sender_name: Option<String>,
    /// Text, or a description of a membership change.
    pub text: String,
    /// True for membership changes.
    pub event: bool,
    /// Whether this device sent it.
    pub outgoing: bool,
    /// Sender's timestamp, ms since the Unix epoch.
    pub sent_at: u64,
    /// The file the message carries: where it was saved, or why it was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<FileView>,
    /// When this device deletes the message (disappearing messages), ms since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// Where a command sends: a person (1:1) or a group.
#[derive(Debug, Clone, Copy)]
pub enum To<'a> {
    /// A full username.
    User(&'a str),
    /// A group name.
    Group(&'a str),
}

/// A conversation summary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConversationSummary {
    /// Group id.
    pub id: String,
    /// Group name or the peer's username.
    pub name: String,
    /// Whether it is a group.
    pub group: bool,
    /// Members' usernames (or account ids), this account excluded.
    pub members: Vec<String>,
    /// Messages not yet shown.
    pub unread: u64,
    /// False once this device was removed.
    pub active: bool,
    /// Why this device sends nothing to it, if it does not (a member the key directory does
    /// not list); it is still received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Disappearing-message timer, if on (e.g. `1h`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disappearing: Option<String>,
}

/// Who this device is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WhoAmI {
    /// Full username.
    pub username: Option<String>,
    /// Display name.
    pub name: String,
    /// Account id.
    pub account_id: String,
    /// Device id.
    pub device_id: String,
    /// Server URL.
    pub server: String,
}

/// A registered device: store, transport and MLS state.
///
/// Call [`FumiClient::sync`] before sending or changing a group, so that the change is made on
/// the group's current epoch and a member removed by someone else gets nothing new. A commit
/// that loses its epoch anyway is retried after processing the winner.
pub struct FumiClient {
    home: PathBuf,
    progress: Box<dyn Progress>,
    store: Store,
    transport: Transport,
    device: MlsDevice<Provider>,
    account: AccountRow,
    /// Groups joined during this sync: we introduce ourselves (profile key) to them after it.
    joined: Vec<GroupId>,
    /// Problems the last review of this account's key directory entry found.
    key_warnings: Vec<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

impl FumiClient {
    /// Creates an account on `server` with a username `nickname.NN` (the client picks NN) and the
    /// display name `name`, storing everything in `home`.
    pub async fn register(home: &Path, server: &str, name: &str, nickname: &str) -> Result<Self, ClientError> {
        Self::register_in(home, server, name, nickname, None).await
    }

    /// As [`FumiClient::register`], keeping the account's data in `region` (one of the server's;
    /// `None`: the server's default).
    pub async fn register_in(
        home: &Path,
        server: &str,
        name: &str,
        nickname: &str,
        region: Option<&str>,
    ) -> Result<Self, ClientError> {
        if Store::exists(home) && Store::open(home)?.0.account()?.is_some() {
            return Err(ClientError::Usage(format!(
                "{} already holds an account; use another --home",
                home.display()
            )));
        }
        let nickname = Username::validate_nickname(nickname).map_err(|e| ClientError::Usage(e.to_string()))?;
        Profile::new(name, None).map_err(|e| ClientError::Usage(e.to_string()))?;
        let mut transport = Transport::new(server)?;
        let identity = AccountIdentity::generate(&mut rand::rng());
        let device_secret: [u8; 32] = random_bytes();
        let request = RegisterRequest {
            identity_key: Base64Bytes(identity.public_key().to_vec()),
            device_secret_hash: Base64Bytes(sha256(&device_secret).to_vec()),
            region: region.map(str::to_owned),
        };
        let registered: RegisterResponse = transport.request(endpoints::REGISTER, &[], Some(&request)).await?;
        transport.authenticate(registered.device_id, &device_secret);

        let (store, provider) = Store::open(home)?;
        let signature_key = MlsDevice::generate_signature_key(&provider)?;
        let mut account = AccountRow {
            server: server.trim_end_matches('/').to_owned(),
            account_id: registered.account_id,
            device_id: registered.device_id,
            device_secret,
            identity_secret: identity.secret(),
            signature_key: Some(signature_key.clone()),
            profile_key: random_bytes(),
            username: None,
            display_name: name.trim().to_owned(),
            avatar_digest: None,
            profile_key_set_at: now_ms(),
        };
        store.save_account(&account)?;
        let device = open_device(provider, &account)?;
        store.know_device(registered.device_id, Some(&device.me().signature_key), now_ms())?;
        let fresh = device.key_packages(KEY_PACKAGE_STOCK, true)?;
        let upload = KeyPackageUpload {
            key_packages: fresh.one_time.into_iter().map(Base64Bytes).collect(),
            last_resort: fresh.last_resort.map(Base64Bytes),
        };
        let _: KeyPackageCount = transport
            .request(endpoints::UPLOAD_KEY_PACKAGES, &[], Some(&upload))
            .await?;

        let username = claim_username(&transport, &nickname).await?;
        account.username = Some(username.to_string());
        store.save_account(&account)?;
        let mut client = Self {
            home: home.to_path_buf(),
            progress: Box::new(NoProgress),
            store,
            transport,
            device,
            account,
            joined: Vec::new(),
            key_warnings: Vec::new(),
        };
        client.publish_profile().await?;
        Ok(client)
    }

    /// Opens the device stored in `home`.
    pub fn open(home: &Path) -> Result<Self, ClientError> {
        if !Store::exists(home) {
            return Err(ClientError::NotRegistered);
        }
        let (store, provider) = Store::open(home)?;
        let account = store.account()?.ok_or(ClientError::NotRegistered)?;
        let mut transport = Transport::new(&account.server)?;
        transport.authenticate(account.device_id, &account.device_secret);
        let device = open_device(provider, &account)?;
        let client = Self {
            home: home.to_path_buf(),
            progress: Box::new(NoProgress),
            store,
            transport,
            device,
            account,
            joined: Vec::new(),
            key_warnings: Vec::new(),
        };
        client.purge_expired()?;
        Ok(client)
    }

    /// Shows file transfers through `progress` (a progress bar in the CLI).
    pub fn set_progress(&mut self, progress: Box<dyn Progress>) {
        self.progress = progress;
    }

    /// Who this device is.
    pub fn whoami(&self) -> WhoAmI {
        WhoAmI {
            username: self.account.username.clone(),
            name: self.account.display_name.clone(),
            account_id: self.account.account_id.to_string(),
            device_id: self.account.device_id.to_string(),
            server: self.account.server.clone(),
        }
    }

    /// Changes the display name and republishes the sealed profile.
    pub async fn set_name(&mut self, name: &str) -> Result<(), ClientError> {
        Profile::new(name, None).map_err(|e| ClientError::Usage(e.to_string()))?;
        self.account.display_name = name.trim().to_owned();
        // A new key makes contacts fetch the new profile when it reaches them with our next
        // message; it also stops former contacts from following later changes.
        self.account.profile_key = random_bytes();
        self.account.profile_key_set_at = now_ms();
        self.store.save_account(&self.account)?;
        self.publish_profile().await
    }

    /// Resolves a full username to an account through its hash.
    pub async fn lookup(&self, username: &str) -> Result<AccountId, ClientError> {
        let username = Username::parse(username).map_err(|e| ClientError::Usage(e.to_string()))?;
        if Some(username.to_string()) == self.account.username {
            return Ok(self.account.account_id);
        }
        // A contact found before (checked against the key directory then) needs no second
        // lookup: the hash is Argon2id with 19 MiB of memory, the largest allocation of a send.
        if let Some(account) = self.store.contact_by_username(&username.to_string())? {
            return Ok(account);
        }
        let hash = username.hash();
        let hash_hex = hex::encode(hash);
        let found: UsernameLookup = match self
            .transport
            .request::<(), _>(endpoints::USERNAME, &[&hash_hex], None)
            .await
        {
            Err(e) if e.is_code(ErrorCode::UnknownUsername) => {
                return Err(ClientError::Usage(format!("no one has the username {username}")));
            }
            other => other?,
        };
        self.check_username_in_directory(&username.to_string(), &hash, found.account_id)
            .await?;
        self.store
            .upsert_contact(found.account_id, Some(&username.to_string()), None)?;
        Ok(found.account_id)
    }

    /// Sends a text to a username, opening the 1:1 conversation on first use.
    pub async fn send_direct(&mut self, username: &str, text: &str) -> Result<MessageId, ClientError> {
        let group = self.conversation_for(To::User(username)).await?;
        self.send_text(group, text).await
    }

    /// Sends a text into a group, by name.
    pub async fn send_group(&mut self, name: &str, text: &str) -> Result<MessageId, ClientError> {
        let group = self.group_by_name(name)?;
        self.send_text(group, text).await
    }

    /// Encrypts a file, uploads it and sends it, with an optional caption.
    pub async fn send_file(
        &mut self,
        to: To<'_>,
        path: &Path,
        caption: Option<&str>,
    ) -> Result<MessageId, ClientError> {
        let group = self.conversation_for(to).await?;
        self.send_file_into(group, path, caption).await
    }

    /// Sets a conversation's disappearing-message timer (`None`: off) for every member.
    pub async fn set_disappearing(&mut self, to: To<'_>, after: Option<Duration>) -> Result<(), ClientError> {
        let expire_after_ms = after.map(|d| d.as_millis() as u64);
        if let Some(ms) = expire_after_ms
            && !(1000..=fumi_core::content::MAX_EXPIRE_AFTER_MS).contains(&ms)
        {
            return Err(ClientError::Usage(
                "a disappearing-message timer is between 1 second and 1 year".into(),
            ));
        }
        let group = self.conversation_for(to).await?;
        self.send_content(group, Body::Timer { expire_after_ms }).await?;
        self.store.set_expire_after(group, expire_after_ms)?;
        self.store_event(
            group,
            self.account.account_id,
            &timer_event("you", expire_after_ms),
            true,
        )
    }

    /// The conversation a command names; a 1:1 conversation is opened on first use.
    async fn conversation_for(&mut self, to: To<'_>) -> Result<GroupId, ClientError> {
        match to {
            To::Group(name) => self.group_by_name(name),
            To::User(username) => {
                let peer = self.lookup(username).await?;
                if peer == self.account.account_id {
                    return Err(ClientError::Usage(
                        "you cannot open a conversation with yourself".into(),
                    ));
                }
                match self.direct_conversation(peer)? {
                    Some(group) => Ok(group),
                    None => self.create_conversation(None, &[peer]).await,
                }
            }
        }
    }

    /// Creates a group with the given members (usernames).
    pub async fn create_group(&mut self, name: &str, members: &[String]) -> Result<GroupId, ClientError> {
        let name = validate_group_name(name)?;
        if self.group_by_name(&name).is_ok() {
            return Err(ClientError::Usage(format!("you already have a group named {name:?}")));
        }
        let mut accounts = Vec::new();
        for member in members {
            let account = self.lookup(member).await?;
            if account != self.account.account_id && !accounts.contains(&account) {
                accounts.push(account);
            }
        }
        if accounts.is_empty() {
            return Err(ClientError::Usage(
                "a group needs at least one member besides you".into(),
            ));
        }
        self.create_conversation(Some(name), &accounts).await
    }

    /// Adds members (usernames) to a group.
    pub async fn add_to_group(&mut self, name: &str, members: &[String]) -> Result<(), ClientError> {
        let group = self.group_by_name(name)?;
        let mut accounts = Vec::new();
        for member in members {
            accounts.push(self.lookup(member).await?);
        }
        let present: Vec<AccountId> = self.device.members(group)?.iter().map(|m| m.account).collect();
        if let Some(already) = accounts.iter().find(|a| present.contains(a)) {
            return Err(ClientError::Usage(format!(
                "{} is already a member",
                self.display_account(*already)?
            )));
        }
        let key_packages = self.claim_key_packages(&accounts).await?;
        self.commit(group, |device| device.add_members(group, &key_packages))
            .await?;
        self.send_conversation_settings(group).await?;
        Ok(())
    }

    /// Removes members (usernames), all their devices, from a group.
    pub async fn remove_from_group(&mut self, name: &str, members: &[String]) -> Result<(), ClientError> {
        let group = self.group_by_name(name)?;
        let mut accounts = Vec::new();
        for member in members {
            accounts.push(self.lookup(member).await?);
        }
        if accounts.contains(&self.account.account_id) {
            return Err(ClientError::Usage(
                "to leave a group, ask another member to remove you".into(),
            ));
        }
        self.commit(group, |device| {
            let removed: Vec<Member> = device
                .members(group)?
                .into_iter()
                .filter(|m| accounts.contains(&m.account))
                .collect();
            if removed.is_empty() {
                return Err(MlsError::Refused("none of them is a member of this group".into()));
            }
            device.remove_members(group, &removed)
        })
        .await?;
        Ok(())
    }

    /// Receives everything queued, then keeps listening until `listen` has passed; returns the
    /// messages and events not shown before, and marks them shown.
    pub async fn receive(&mut self, listen: Duration) -> Result<Vec<DisplayMessage>, ClientError> {
        let mut shown = Vec::new();
        self.receive_each(listen, |message| {
            shown.push(message);
            Ok(())
        })
        .await?;
        Ok(shown)
    }

    /// As [`FumiClient::receive`], handing each message to `show` as soon as it can be shown:
    /// the queued ones once they are all processed, later ones as they arrive. While listening,
    /// a lost connection (the server restarting, the network dropping) is made again, with
    /// growing pauses, until `listen` is over.
    pub async fn receive_each(
        &mut self,
        listen: Duration,
        mut show: impl FnMut(DisplayMessage) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        self.flush_outbox().await?;
        let deadline = tokio::time::Instant::now() + listen;
        let listening = || tokio::time::Instant::now() < deadline;
        let mut delivery = Some(self.transport.connect().await?);
        let mut drained = false;
        let mut pause = RECONNECT_FIRST_PAUSE;
        loop {
            let Some(connection) = delivery.as_mut() else {
                if !listening() {
                    break;
                }
                tokio::time::sleep(pause.min(deadline - tokio::time::Instant::now())).await;
                match self.transport.connect().await {
                    Ok(connection) => {
                        self.progress.note("connected to the server again");
                        delivery = Some(connection);
                        drained = false;
                        pause = RECONNECT_FIRST_PAUSE;
                    }
                    Err(e) if e.is_unreachable() => pause = (pause * 2).min(RECONNECT_LONGEST_PAUSE),
                    Err(e) => return Err(e),
                }
                continue;
            };
            let frame = if drained {
                match tokio::time::timeout_at(deadline, connection.next()).await {
                    Ok(frame) => frame,
                    Err(_) => break,
                }
            } else {
                connection.next().await
            };
            match frame {
                Ok(None) | Err(ClientError::Network(_)) if listening() => {
                    self.progress
                        .note("lost the connection to the server; connecting again while listening");
                    delivery = None;
                }
                Ok(None) => break,
                Err(e) => return Err(e),
                Ok(Some(ServerFrame::Drained)) => {
                    drained = true;
                    if !listening() {
                        break;
                    }
                    // What was queued is shown once its new members are checked (when not
                    // listening, the sync below does that once).
                    self.after_sync().await?;
                    self.show_unseen(&mut show)?;
                }
                Ok(Some(ServerFrame::Envelope { seq, message, .. })) => {
                    self.process_envelope(connection, seq, message.as_slice()).await?;
                    if drained {
                        if !self.joined.is_empty() || !self.store.pending_arrivals()?.is_empty() {
                            self.after_sync().await?;
                        }
                        self.show_unseen(&mut show)?;
                    }
                }
                Ok(Some(ServerFrame::ChannelPost {
                    channel,
                    seq,
                    sealed_post,
                    ..
                })) => self.on_channel_push(channel, seq, sealed_post.as_slice()).await?,
            }
        }
        if let Some(delivery) = delivery {
            delivery.close().await;
        }
        self.after_sync().await?;
        // Channels are fetched here, not in every sync: sending needs none of their posts.
        self.sync_channels().await?;
        // Whenever the key directory moved on, this account's entry is looked at again.
        let warnings = self.check_own_keys(false).await?;
        self.key_warnings.extend(warnings);
        self.show_unseen(&mut show)
    }

    /// Hands every message not yet shown to `show`, then marks them shown.
    fn show_unseen(&self, show: &mut impl FnMut(DisplayMessage) -> Result<(), ClientError>) -> Result<(), ClientError> {
        let unseen = self.store.unseen()?;
        let ids: Vec<i64> = unseen.iter().map(|m| m.local_id).collect();
        for message in &unseen {
            show(self.display(message)?)?;
        }
        Ok(self.store.mark_seen(&ids)?)
    }

    /// Processes everything queued on the server without showing it (before sending, so that
    /// commits land on the current epoch and removed members get nothing new).
    pub async fn sync(&mut self) -> Result<(), ClientError> {
        self.flush_outbox().await?;
        let mut delivery = self.transport.connect().await?;
        while let Some(frame) = delivery.next().await? {
            match frame {
                ServerFrame::Drained => break,
                ServerFrame::Envelope { seq, message, .. } => {
                    self.process_envelope(&mut delivery, seq, message.as_slice()).await?
                }
                ServerFrame::ChannelPost {
                    channel,
                    seq,
                    sealed_post,
                    ..
                } => self.on_channel_push(channel, seq, sealed_post.as_slice()).await?,
            }
        }
        delivery.close().await;
        self.after_sync().await
    }

    /// Conversations with unread counts, most recent first.
    pub fn conversations(&self) -> Result<Vec<ConversationSummary>, ClientError> {
        self.store
            .conversations()?
            .into_iter()
            .map(|c| {
                let members = if c.active {
                    self.device
                        .members(c.group_id)?
                        .into_iter()
                        .map(|m| m.account)
                        .filter(|a| *a != self.account.account_id)
                        .fold(Vec::new(), |mut acc, a| {
                            if !acc.contains(&a) {
                                acc.push(a);
                            }
                            acc
                        })
                        .into_iter()
                        .map(|a| self.display_account(a))
                        .collect::<Result<Vec<_>, _>>()?
                } else {
                    vec![]
                };
                Ok(ConversationSummary {
                    id: c.group_id.to_string(),
                    name: self.conversation_name(&c)?,
                    group: !c.direct,
                    members,
                    unread: self.store.unseen_count(c.group_id)?,
                    active: c.active,
                    refused: self.store.conversation_refusal(c.group_id)?,
                    disappearing: c.expire_after_ms.map(human_duration),
                })
            })
            .collect()
    }

    /// Local history of a conversation, named by a username (1:1) or a group name; marks it read.
    pub fn history(&self, conversation: &str) -> Result<Vec<DisplayMessage>, ClientError> {
        let group = match Username::parse(conversation) {
            Ok(username) => {
                let peer = self
                    .store
                    .contact_by_username(&username.to_string())?
                    .ok_or_else(|| ClientError::Usage(format!("no conversation with {username}")))?;
                self.direct_conversation(peer)?
                    .ok_or_else(|| ClientError::Usage(format!("no conversation with {username}")))?
            }
            Err(_) => self.group_by_name(conversation)?,
        };
        let messages = self.store.history(group)?;
        self.store
            .mark_seen(&messages.iter().map(|m| m.local_id).collect::<Vec<_>>())?;
        messages.iter().map(|m| self.display(m)).collect()
    }

    // --- conversations -------------------------------------------------------------------

    async fn create_conversation(
        &mut self,
        name: Option<String>,
        accounts: &[AccountId],
    ) -> Result<GroupId, ClientError> {
        let group = GroupId::from_bytes(random_bytes());
        let key_packages = self.claim_key_packages(accounts).await?;
        let direct = name.is_none();
        let conversation = Conversation {
            group_id: group,
            direct,
            name: name.clone(),
            peer: direct.then(|| accounts[0]),
            active: true,
            expire_after_ms: None,
        };
        self.store.transaction(|| {
            self.device.create_group(group)?;
            Ok(self.store.insert_conversation(&conversation, now_ms())?)
        })?;
        if !key_packages.is_empty() {
            self.commit(group, |device| device.add_members(group, &key_packages))
                .await?;
        }
        self.send_conversation_settings(group).await?;
        Ok(group)
    }

    /// Claims and verifies one KeyPackage for every device of these accounts.
    async fn claim_key_packages(
        &self,
        accounts: &[AccountId],
    ) -> Result<Vec<openmls::prelude::KeyPackage>, ClientError> {
        Ok(self
            .claim_verified(accounts, &[])
            .await?
            .into_iter()
            .map(|(key_package, _)| key_package)
            .collect())
    }

    /// Claims one KeyPackage per device of these accounts (only `devices`, if not empty), each
    /// checked against the account's registered and pinned identity key.
    async fn claim_verified(
        &self,
        accounts: &[AccountId],
        devices: &[DeviceId],
    ) -> Result<Vec<(openmls::prelude::KeyPackage, Member)>, ClientError> {
        if accounts.is_empty() {
            return Ok(vec![]);
        }
        let claim = KeyPackageClaim {
            accounts: accounts.to_vec(),
            devices: devices.to_vec(),
        };
        let claimed: ClaimedKeyPackages = match self
            .transport
            .request(endpoints::CLAIM_KEY_PACKAGES, &[], Some(&claim))
            .await
        {
            Err(e) if e.is_code(ErrorCode::NoKeyPackage) => {
                return Err(ClientError::Usage(
                    "a member's device has no key package left; ask them to run `fumi receive`".into(),
                ));
            }
            other => other?,
        };
        let mut verified = Vec::new();
        for entry in claimed.key_packages {
            if !accounts.contains(&entry.account_id) {
                return Err(ClientError::Protocol(
                    "the server returned a key package for an account we did not ask for".into(),
                ));
            }
            verified.push(self.device.verify_key_package(
                entry.key_package.as_slice(),
                entry.account_id,
                entry.device_id,
            )?);
        }
        // The identity key each account registered: a device must be certified by it.
        let mut registered = std::collections::HashMap::new();
        for account in accounts {
            registered.insert(*account, self.registered_identity_key(*account).await?);
        }
        // A key that differs from one pinned earlier is refused first, with the louder warning
        // for a contact verified in person.
        for (_, member) in &verified {
            if let Some(pinned) = self.store.pinned_identity_key(member.account)?
                && (registered.get(&member.account) != Some(&pinned) || member.identity_key != pinned)
            {
                return Err(self.identity_changed(member.account)?);
            }
        }
        // Every device must be in its account's key directory entry, with that identity key and
        // signature key, before anything is pinned or encrypted to it.
        let members: Vec<Member> = verified.iter().map(|(_, member)| *member).collect();
        self.check_members_in_directory(&members).await?;
        for (_, member) in &verified {
            if registered.get(&member.account) != Some(&member.identity_key) {
                return Err(self.identity_changed(member.account)?);
            }
            // Pins the key on first contact.
            self.check_identity(member)?;
        }
        Ok(verified)
    }

    /// The identity key the server says `account` registered (checked against pins by callers).
    pub(crate) async fn registered_identity_key(&self, account: AccountId) -> Result<[u8; 32], ClientError> {
        let info: AccountInfo = self
            .transport
            .request::<(), _>(endpoints::ACCOUNT, &[&account], None)
            .await?;
        info.identity_key
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Protocol("an identity key is 32 bytes".into()))
    }

    /// Makes a commit, sends it, and applies it; on an epoch conflict processes the winner and
    /// makes the commit again on the new epoch.
    async fn commit(
        &mut self,
        group: GroupId,
        make: impl Fn(&MlsDevice<Provider>) -> Result<Commit, MlsError>,
    ) -> Result<(), ClientError> {
        self.refuse_unchecked(group)?;
        for _ in 0..COMMIT_ATTEMPTS {
            let entry = self.store.transaction(|| {
                let commit = make(&self.device)?;
                let request = SubmitMessage {
                    id: MessageId::from_bytes(random_bytes()),
                    message: Base64Bytes(commit.message.clone()),
                    recipients: commit.recipients.iter().map(|m| m.device).collect(),
                    welcome: commit.welcome.clone().map(|w| WelcomeDelivery {
                        message: Base64Bytes(w),
                        recipients: commit.added.iter().map(|m| m.device).collect(),
                    }),
                    removed: commit.removed.iter().map(|m| m.device).collect(),
                };
                let entry = OutboxEntry {
                    message_id: request.id,
                    group_id: group,
                    is_commit: true,
                    request: serde_json::to_string(&request).expect("request serialises"),
                    event: self.describe_own_commit(&commit)?,
                };
                self.store.push_outbox(&entry, now_ms())?;
                Ok(entry)
            })?;
            match self.send_outbox_entry(&entry).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_code(ErrorCode::EpochConflict) => {
                    // Another member's commit won this epoch: it is in our mailbox. (Boxed: a
                    // sync may itself commit, to bring our own devices into a conversation.)
                    Box::pin(self.sync()).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Usage(
            "the group kept changing while committing; try again".into(),
        ))
    }

    async fn send_conversation_settings(&mut self, group: GroupId) -> Result<(), ClientError> {
        let conversation = self.store.conversation(group)?.ok_or(MlsError::UnknownGroup)?;
        let accounts: Vec<AccountId> = self.device.members(group)?.iter().map(|m| m.account).collect();
        let profiles = self
            .store
            .profile_keys(&accounts)?
            .into_iter()
            .map(|(account, key)| MemberProfileKey {
                account,
                profile_key: key,
            })
            .collect();
        let body = Body::Conversation {
            name: if conversation.direct { None } else { conversation.name },
            profiles,
        };
        self.send_content(group, body).await.map(drop)
    }

    async fn send_text(&mut self, group: GroupId, text: &str) -> Result<MessageId, ClientError> {
        if text.len() > fumi_core::content::MAX_TEXT_BYTES {
            return Err(ClientError::Usage(ContentError::TooLong.to_string()));
        }
        if text.trim().is_empty() {
            return Err(ClientError::Usage("refusing to send an empty message".into()));
        }
        self.send_content(group, Body::Text { text: text.to_owned() }).await
    }

    /// Encrypts content, stores it (history and outbox) in one transaction, then sends it.
    async fn send_content(&mut self, group: GroupId, body: Body) -> Result<MessageId, ClientError> {
        self.send_content_with(group, body, None).await
    }

    /// As [`Self::send_content`]; `file` is what history shows of a file being sent.
    async fn send_content_with(
        &mut self,
        group: GroupId,
        body: Body,
        file: Option<FileView>,
    ) -> Result<MessageId, ClientError> {
        self.send_content_full(group, MessageId::from_bytes(random_bytes()), body, file)
            .await
    }

    /// As [`Self::send_content`], under a message id the caller chose (and recorded).
    pub(crate) async fn send_content_as(
        &mut self,
        group: GroupId,
        id: MessageId,
        body: Body,
    ) -> Result<MessageId, ClientError> {
        self.send_content_full(group, id, body, None).await
    }

    async fn send_content_full(
        &mut self,
        group: GroupId,
        id: MessageId,
        body: Body,
        file: Option<FileView>,
    ) -> Result<MessageId, ClientError> {
        let entry = self
            .machine()
            .queue_content(group, id, body, file, now_ms(), &mut rand::rng())
            .map_err(send_error)?;
        self.send_outbox_entry(&entry).await?;
        Ok(id)
    }

    /// Sends whatever an earlier run queued but could not confirm (crash, network loss).
    async fn flush_outbox(&mut self) -> Result<(), ClientError> {
        for entry in self.store.outbox()? {
            match self.send_outbox_entry(&entry).await {
                Ok(()) => {}
                // A commit that lost its epoch is dropped; the user's command reported it.
                Err(e) if e.is_code(ErrorCode::EpochConflict) => {}
                Err(e @ (ClientError::Network(_) | ClientError::Server { status: 500.., .. })) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "dropped an outgoing message the server refused"),
            }
        }
        Ok(())
    }

    /// Submits one outbox entry. Accepted (or already accepted): confirms a commit and removes
    /// the entry. Refused: discards a commit and removes the entry. Network failure: keeps it.
    async fn send_outbox_entry(&mut self, entry: &OutboxEntry) -> Result<(), ClientError> {
        let request: SubmitMessage =
            serde_json::from_str(&entry.request).map_err(|e| ClientError::Store(e.to_string()))?;
        let result: Result<SubmitAccepted, ClientError> = self
            .transport
            .request(endpoints::SUBMIT_MESSAGE, &[], Some(&request))
            .await;
        match result {
            Ok(_) => self.store.transaction(|| {
                if entry.is_commit {
                    self.device.confirm_commit(entry.group_id)?;
                }
                if let Some(event) = &entry.event {
                    self.store_event(entry.group_id, self.account.account_id, event, true)?;
                }
                Ok(self.store.remove_outbox(entry.message_id)?)
            }),
            Err(e @ (ClientError::Network(_) | ClientError::Server { status: 500.., .. })) => Err(e),
            Err(e) => {
                self.store.transaction(|| {
                    if entry.is_commit {
                        self.device.discard_commit(entry.group_id)?;
                    } else {
                        // Not delivered: history must not show it as sent.
                        self.store.delete_own_message(entry.group_id, entry.message_id)?;
                    }
                    Ok(self.store.remove_outbox(entry.message_id)?)
                })?;
                Err(e)
            }
        }
    }

    // --- receiving -----------------------------------------------------------------------

    /// Processes one envelope through the machine's receive step, then acknowledges it. The
    /// step commits what the envelope produced before it says so; a failure of this device's own
    /// store acknowledges nothing, and the envelope comes again. An envelope that is itself at
    /// fault (garbage, a message for a group we left) is recorded and acknowledged, so it cannot
    /// block the mailbox.
    async fn process_envelope(&mut self, delivery: &mut Delivery, seq: u64, bytes: &[u8]) -> Result<(), ClientError> {
        let outcome = self
            .machine()
            .handle_envelope(seq, bytes, now_ms(), &mut rand::rng())
            .map_err(|e| self.receive_error(e))?;
        match outcome {
            Outcome::Applied(Some(arrival)) if arrival.joined => self.joined.push(arrival.group),
            Outcome::Applied(_) | Outcome::AlreadyProcessed => {}
            Outcome::Dropped(error) => {
                let error = self.receive_error(error);
                tracing::warn!(seq, %error, "dropped a message that could not be processed");
            }
        }
        delivery.ack(vec![seq]).await
    }

    /// The client machine over this device's MLS state and store.
    pub(crate) fn machine(&self) -> Machine<'_, Provider, Store> {
        Machine {
            device: &self.device,
            store: &self.store,
            me: self.account.account_id,
            my_device: self.account.device_id,
            identity_key: AccountIdentity::from_secret(&self.account.identity_secret).public_key(),
            profile_key: self.account.profile_key,
        }
    }

    /// A receive-step error as the user reads it.
    pub(crate) fn receive_error(&self, error: ReceiveError) -> ClientError {
        match error {
            ReceiveError::Store(e) => e.into(),
            ReceiveError::Mls(e) => ClientError::Mls(e),
            ReceiveError::Refused(reason) => ClientError::Protocol(reason),
            ReceiveError::IdentityKeyChanged { own: true, .. } => {
                ClientError::IdentityKeyChanged("a device claiming to be yours".into())
            }
            ReceiveError::IdentityKeyChanged { account, verified, .. } => {
                let name = match self.display_account(account) {
                    Ok(name) => name,
                    Err(error) => return error,
                };
                if verified {
                    ClientError::VerifiedIdentityKeyChanged(name)
                } else {
                    ClientError::IdentityKeyChanged(name)
                }
            }
        }
    }

    /// Introduces us to groups just joined, fetches new profiles, brings our own devices into
    /// our conversations, tops up KeyPackages, downloads files and deletes expired messages.
    async fn after_sync(&mut self) -> Result<(), ClientError> {
        self.check_arrivals().await?;
        self.follow_own_profile().await?;
        for group in std::mem::take(&mut self.joined) {
            if self.device.is_member(group) {
                self.send_content(group, Body::Introduction).await?;
            }
        }
        self.fetch_profiles().await?;
        self.reconcile_own_devices().await?;
        let stock: KeyPackageCount = self
            .transport
            .request::<(), _>(endpoints::KEY_PACKAGE_COUNT, &[], None)
            .await?;
        if stock.count < KEY_PACKAGE_LOW_WATER {
            let one_time = self.device.key_packages(KEY_PACKAGE_STOCK, false)?.one_time;
            let upload = KeyPackageUpload {
                key_packages: one_time.into_iter().map(Base64Bytes).collect(),
                last_resort: None,
            };
            let _: KeyPackageCount = self
                .transport
                .request(endpoints::UPLOAD_KEY_PACKAGES, &[], Some(&upload))
                .await?;
        }
        self.download_pending().await?;
        self.send_form_receipts().await?;
        if let Err(e) = self.receive_history().await {
            tracing::warn!(error = %e, "the message history from your other device could not be fetched yet");
        }
        self.purge_expired()
    }

    /// Deletes messages whose disappearing timer ran out, with the files they brought.
    fn purge_expired(&self) -> Result<(), ClientError> {
        let files = self.files_dir();
        for view in self.store.transaction(|| Ok(self.store.purge_expired(now_ms())?))? {
            if let Some(path) = view.path.map(PathBuf::from)
                && path.starts_with(&files)
            {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Checks the devices that joined our groups, or whose group we joined, against the key
    /// directory (see [`FumiClient::check_arrival`]), then pins their accounts' keys. Unchecked
    /// arrivals stay in the store until checked, and nothing is sent to their groups meanwhile.
    /// A group with a device the directory never listed keeps being received, but this device
    /// stops sending to it, says why once, and resumes when that device has left.
    async fn check_arrivals(&mut self) -> Result<(), ClientError> {
        self.lift_settled_refusals()?;
        for (id, group, members) in self.store.pending_arrivals()? {
            let in_group: HashSet<DeviceId> = if self.device.is_member(group) {
                self.device.members(group)?.iter().map(|m| m.device).collect()
            } else {
                HashSet::new()
            };
            match self.check_arrival(&members, &in_group).await {
                Ok(keys::ArrivalCheck::Listed) => self.store.transaction(|| {
                    for member in &members {
                        self.check_identity(member)?;
                    }
                    Ok(self.store.remove_pending_arrival(id)?)
                })?,
                // Checked again at the next sync, by which the removal has usually arrived.
                Ok(keys::ArrivalCheck::RemovedButPresent) => {}
                Err(ClientError::KeyTransparency(problem)) => {
                    let refused: Vec<DeviceId> = members
                        .iter()
                        .map(|m| m.device)
                        .filter(|d| in_group.contains(d))
                        .collect();
                    let names = distinct_accounts(&members)
                        .into_iter()
                        .map(|a| self.display_account(a))
                        .collect::<Result<Vec<_>, _>>()?
                        .join(", ");
                    let error = ClientError::KeyTransparency(format!(
                        "{problem} This device keeps receiving the conversation but sends nothing to it until that \
                         device has left: ask {names} to run `fumi keys check` and `fumi receive` (their devices take \
                         out devices the account does not have), or ask a member to remove {names} from the group."
                    ));
                    self.store.transaction(|| {
                        self.store_event(group, self.account.account_id, &error.to_string(), false)?;
                        if !refused.is_empty() {
                            self.store.refuse_conversation(group, &error.to_string(), &refused)?;
                        }
                        Ok(self.store.remove_pending_arrival(id)?)
                    })?;
                    return Err(error);
                }
                Err(other) => return Err(other),
            }
        }
        Ok(())
    }

    /// Lets this device send again to refused conversations whose refused devices have left.
    fn lift_settled_refusals(&self) -> Result<(), ClientError> {
        for (group, devices) in self.store.refused_conversations()? {
            let present =
                self.device.is_member(group) && self.device.members(group)?.iter().any(|m| devices.contains(&m.device));
            if !present {
                self.store.transaction(|| {
                    self.store.lift_refusal(group)?;
                    self.store_event(
                        group,
                        self.account.account_id,
                        "the device the key directory does not list has left; you can send here again",
                        false,
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Nothing is encrypted to a group with devices not yet checked against the key directory,
    /// or with a device the directory never listed.
    fn refuse_unchecked(&self, group: GroupId) -> Result<(), ClientError> {
        self.machine().check_sendable(group).map_err(send_error)
    }

    /// Warnings from the last review of this account's key directory entry, once.
    pub fn take_key_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.key_warnings)
    }

    /// Refuses a member whose identity key differs from the one pinned for its account; pins it
    /// on first sight (call only once the key directory confirmed the key).
    fn check_identity(&self, member: &Member) -> Result<(), ClientError> {
        self.machine().check_identity(member).map_err(|e| self.receive_error(e))
    }

    /// The error for an account that presented another identity key than the pinned one: louder
    /// if the user had verified the pinned key.
    pub(crate) fn identity_changed(&self, account: AccountId) -> Result<ClientError, ClientError> {
        let verified = self.store.is_verified(account)?;
        Ok(self.receive_error(ReceiveError::IdentityKeyChanged {
            account,
            own: false,
            verified,
        }))
    }

    // --- naming --------------------------------------------------------------------------

    /// Text for this device's own history when it commits a membership change.
    fn describe_own_commit(&self, commit: &Commit) -> Result<Option<String>, ClientError> {
        // Mentions are resolved when shown, once the members' profiles are known.
        Ok(
            describe_change(self.account.account_id, &commit.added, &commit.removed, "your")
                .map(|change| format!("you {change}")),
        )
    }

    fn store_event(&self, group: GroupId, by: AccountId, text: &str, outgoing: bool) -> Result<(), ClientError> {
        let event = StoredMessage {
            local_id: 0,
            id: MessageId::from_bytes(random_bytes()),
            group_id: group,
            sender: by,
            is_event: true,
            text: text.to_owned(),
            sent_at: now_ms(),
            outgoing,
            attachment: None,
            expires_at: None,
        };
        self.store.insert_message(&event, outgoing, now_ms())?;
        Ok(())
    }

    fn direct_conversation(&self, peer: AccountId) -> Result<Option<GroupId>, ClientError> {
        Ok(self
            .store
            .conversations()?
            .into_iter()
            .find(|c| c.direct && c.active && c.peer == Some(peer))
            .map(|c| c.group_id))
    }

    fn group_by_name(&self, name: &str) -> Result<GroupId, ClientError> {
        let matches: Vec<Conversation> = self
            .store
            .conversations()?
            .into_iter()
            .filter(|c| !c.direct && c.name.as_deref().is_some_and(|n| n == name.trim()))
            .collect();
        match matches.as_slice() {
            [] => Err(ClientError::Usage(format!(
                "no group named {name:?}; see `fumi group list`"
            ))),
            [one] if !one.active => Err(ClientError::Usage(format!("you are no longer a member of {name:?}"))),
            [one] => Ok(one.group_id),
            _ => Err(ClientError::Usage(format!("several groups are named {name:?}"))),
        }
    }

    fn display_account(&self, account: AccountId) -> Result<String, ClientError> {
        if account == self.account.account_id {
            return Ok(self.account.username.clone().unwrap_or_else(|| "you".into()));
        }
        Ok(self
            .store
            .contact(account)?
            .and_then(|c| c.username)
            .unwrap_or_else(|| format!("account {}", &account.to_string()[..8])))
    }

    /// Replaces `{@<account id>}` mentions in event texts with the account's current name.
    fn render_mentions(&self, text: &str) -> Result<String, ClientError> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("{@") {
            out.push_str(&rest[..start]);
            let candidate = &rest[start + 2..];
            match candidate
                .get(..33)
                .filter(|t| t.ends_with('}'))
                .and_then(|t| AccountId::parse(&t[..32]).ok())
            {
                Some(account) => {
                    out.push_str(&self.display_account(account)?);
                    rest = &candidate[33..];
                }
                None => {
                    out.push_str("{@");
                    rest = candidate;
                }
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    fn conversation_name(&self, c: &Conversation) -> Result<String, ClientError> {
        Ok(match (&c.name, c.peer) {
            (Some(name), _) if !c.direct => name.clone(),
            (_, Some(peer)) => self.display_account(peer)?,
            _ => format!("conversation {}", &c.group_id.to_string()[..8]),
        })
    }

    fn display(&self, m: &StoredMessage) -> Result<DisplayMessage, ClientError> {
        let conversation = self.store.conversation(m.group_id)?;
        let (conversation_name, group) = match &conversation {
            Some(c) => (self.conversation_name(c)?, !c.direct),
            None => (String::new(), false),
        };
        let sender_name = if m.sender == self.account.account_id {
            Some(self.account.display_name.clone())
        } else {
            self.store.contact(m.sender)?.and_then(|c| c.display_name)
        };
        Ok(DisplayMessage {
            id: m.id.to_string(),
            conversation: m.group_id.to_string(),
            conversation_name,
            group,
            sender: self.display_account(m.sender)?,
            sender_name,
            text: if m.is_event {
                self.render_mentions(&m.text)?
            } else {
                m.text.clone()
            },
            event: m.is_event,
            outgoing: m.outgoing,
            sent_at: m.sent_at,
            file: m.attachment.clone(),
            expires_at: m.expires_at,
        })
    }
}

/// The MLS device of a stored account.
fn open_device(provider: Provider, account: &AccountRow) -> Result<MlsDevice<Provider>, ClientError> {
    let signature_key = account.signature_key.as_deref().ok_or(ClientError::NotRegistered)?;
    let identity = AccountIdentity::from_secret(&account.identity_secret);
    Ok(MlsDevice::open(
        provider,
        &identity,
        account.account_id,
        account.device_id,
        signature_key,
    )?)
}

/// A send-step error as the user reads it.
fn send_error(error: SendError) -> ClientError {
    match error {
        SendError::Store(e) => e.into(),
        SendError::Mls(e) => ClientError::Mls(e),
        SendError::Refused(reason) => ClientError::KeyTransparency(reason),
        unchecked @ SendError::Unchecked => ClientError::Usage(unchecked.to_string()),
    }
}

fn validate_group_name(name: &str) -> Result<String, ClientError> {
    receive::validate_group_name(name).map_err(ClientError::Usage)
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Claims `nickname.NN`, trying random two-digit discriminators, then longer ones.
async fn claim_username(transport: &Transport, nickname: &str) -> Result<Username, ClientError> {
    for attempt in 0..30u32 {
        let discriminator = {
            let mut rng = rand::rng();
            let (low, high) = if attempt < 10 {
                (1, 100)
            } else if attempt < 20 {
                (100, 1000)
            } else {
                (1000, 100_000)
            };
            low + rng.next_u32() % (high - low)
        };
        let username = Username::new(nickname, discriminator).map_err(|e| ClientError::Usage(e.to_string()))?;
        let claim = UsernameClaim {
            username_hash: Base64Bytes(username.hash().to_vec()),
        };
        match transport
            .request::<_, ()>(endpoints::CLAIM_USERNAME, &[], Some(&claim))
            .await
        {
            Ok(()) => return Ok(username),
            Err(e) if e.is_code(ErrorCode::UsernameTaken) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Usage(format!(
        "could not find a free number for {nickname}; try another name"
    )))
}
