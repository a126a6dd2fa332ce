//! The client store: one SQLite file in the home directory holding the OpenMLS state (through
//! `openmls_sqlite_storage`) and Fumi's own tables: the account, contacts, conversations, history,
//! the outbox, and which envelopes were processed.
//!
//! Received messages are processed inside one transaction that covers both OpenMLS's writes and
//! ours, so a crash leaves either all of a message's effects or none.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use fumi_core::form::FormDefinition;
use fumi_core::franking::Evidence;
use fumi_core::official::{ChannelKey, OrganisationProfile, Post, PostBody, TrustedAuthority};
pub use fumi_core::store::{
    AccountRow, ChannelRow, ClientStore, Contact, Conversation, DirectoryState, FileView, OutboxEntry, PendingHistory,
    PendingUpload, PinnedContact, StoreError, StoredMessage, SubmissionRecord, Submissions,
};
use fumi_core::{Attachment, Member};
use fumi_proto::{AccountId, BlobId, ChannelId, DeviceId, GroupId, MessageId};
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::{Connection, OptionalExtension, params};

use crate::ClientError;

/// An encoded member of a pending arrival: account (16) ‖ device (16) ‖ identity key (32) ‖
/// signature key (32).
const MEMBER_BYTES: usize = 96;

/// File name of the store inside the home directory.
pub const STORE_FILE: &str = "fumi.db";

/// Fumi's own schema, applied after OpenMLS's migrations; `PRAGMA user_version` counts them.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE account (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    server TEXT NOT NULL,
    account_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    device_secret BLOB NOT NULL,
    identity_secret BLOB NOT NULL,
    signature_key BLOB,
    profile_key BLOB NOT NULL,
    username TEXT,
    display_name TEXT NOT NULL
);
CREATE TABLE contacts (
    account_id BLOB PRIMARY KEY,
    username TEXT,
    display_name TEXT,
    profile_key BLOB,
    profile_fetched INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE conversations (
    group_id BLOB PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    name TEXT,
    peer BLOB,
    created_at INTEGER NOT NULL,
    active INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE messages (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    id BLOB NOT NULL,
    group_id BLOB NOT NULL,
    sender_account BLOB NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('text', 'event')),
    text TEXT NOT NULL,
    sent_at INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    outgoing INTEGER NOT NULL,
    seen INTEGER NOT NULL,
    UNIQUE (group_id, sender_account, id)
);
CREATE INDEX messages_by_group ON messages(group_id, rowid);
CREATE TABLE processed_envelopes (
    seq INTEGER PRIMARY KEY,
    processed_at INTEGER NOT NULL
);
CREATE TABLE outbox (
    message_id BLOB PRIMARY KEY,
    group_id BLOB NOT NULL,
    is_commit INTEGER NOT NULL,
    request TEXT NOT NULL,
    event TEXT,
    created_at INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE contacts ADD COLUMN identity_key BLOB;
"#,
    r#"
ALTER TABLE account ADD COLUMN avatar_digest TEXT;
ALTER TABLE contacts ADD COLUMN avatar_digest TEXT;
ALTER TABLE contacts ADD COLUMN avatar_path TEXT;
ALTER TABLE conversations ADD COLUMN expire_after_ms INTEGER;
ALTER TABLE messages ADD COLUMN attachment TEXT;
ALTER TABLE messages ADD COLUMN expires_at INTEGER;
CREATE INDEX messages_by_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE downloads (
    blob_id BLOB PRIMARY KEY,
    message_rowid INTEGER NOT NULL,
    attachment TEXT NOT NULL
);
ALTER TABLE account ADD COLUMN profile_key_set_at INTEGER NOT NULL DEFAULT 0;
CREATE TABLE pending_history (
    token BLOB PRIMARY KEY,
    link_key BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE revoked_devices (
    device_id BLOB PRIMARY KEY,
    revoked_at INTEGER NOT NULL
);
"#,
    r#"
-- The opening of each received message's franking proof, so it can be reported.
CREATE TABLE franking_evidence (
    message_rowid INTEGER PRIMARY KEY,
    evidence TEXT NOT NULL
);
"#,
    r#"
-- The identity key the user confirmed by comparing safety numbers in person.
ALTER TABLE contacts ADD COLUMN verified_key BLOB;
"#,
    r#"
-- Official accounts: authorities this user trusts to verify organisations, this account's own
-- organisation profile, channels (own and subscribed) with their keys, received posts, forms,
-- and form submissions (sent by us, or received by our organisation).
CREATE TABLE authorities (
    name TEXT PRIMARY KEY,
    public_key BLOB NOT NULL UNIQUE,
    added_at INTEGER NOT NULL
);
CREATE TABLE organisation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    profile TEXT NOT NULL
);
CREATE TABLE channels (
    channel_id BLOB PRIMARY KEY,
    owner_account BLOB NOT NULL,
    owner_key BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    channel_key BLOB NOT NULL,
    own INTEGER NOT NULL,
    info TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    added_at INTEGER NOT NULL
);
CREATE TABLE channel_posts (
    channel_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    post TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    seen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (channel_id, seq)
);
CREATE TABLE channel_warnings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    warning TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    seen INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE forms (
    form_id TEXT PRIMARY KEY,
    channel_id BLOB NOT NULL,
    definition TEXT NOT NULL,
    published_at INTEGER NOT NULL
);
CREATE TABLE form_submissions (
    submission_id BLOB PRIMARY KEY,
    form_id TEXT NOT NULL,
    group_id BLOB NOT NULL,
    submitter BLOB NOT NULL,
    answers TEXT NOT NULL,
    sent_at INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    outgoing INTEGER NOT NULL,
    receipt_at INTEGER,
    receipt_sent INTEGER NOT NULL DEFAULT 0,
    seen INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX form_submissions_by_form ON form_submissions (form_id, sent_at);
"#,
    r#"
-- Files of channel posts: where this device saved each (or why it refused it).
CREATE TABLE channel_files (
    channel_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    view TEXT NOT NULL,
    PRIMARY KEY (channel_id, seq)
);
-- A form is named by its channel and its id: another channel may reuse an id.
CREATE TABLE channel_forms (
    channel_id BLOB NOT NULL,
    form_id TEXT NOT NULL,
    definition TEXT NOT NULL,
    published_at INTEGER NOT NULL,
    PRIMARY KEY (channel_id, form_id)
);
INSERT INTO channel_forms (channel_id, form_id, definition, published_at)
    SELECT channel_id, form_id, definition, published_at FROM forms;
DROP TABLE forms;
ALTER TABLE form_submissions ADD COLUMN channel_id BLOB;
UPDATE form_submissions SET channel_id = (SELECT channel_id FROM channel_forms f WHERE f.form_id = form_submissions.form_id);
"#,
    r#"
-- Key transparency: the server's log key (pinned on first use), the newest directory epoch seen
-- (epochs never go back; one epoch has one root), and how far this account's own entry was
-- reviewed.
CREATE TABLE key_directory (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    log_key BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    root_hash BLOB NOT NULL,
    own_version INTEGER NOT NULL DEFAULT 0,
    own_checked_epoch INTEGER NOT NULL DEFAULT 0,
    -- The last review of the own entry found a problem: every sync looks again until it is gone.
    own_alarm INTEGER NOT NULL DEFAULT 0
);
-- Devices of this account this device has reason to trust: itself, devices it linked, and
-- devices that a trusted device of ours linked or added (learned through signed MLS commits).
CREATE TABLE known_devices (
    device_id BLOB PRIMARY KEY,
    learned_at INTEGER NOT NULL,
    -- Its MLS signature key, once seen in a signed commit or Welcome (NULL until then).
    signature_key BLOB
);
-- Devices that joined a group, or whose group this device joined, not yet checked against the
-- key directory: written with the message that brought them, so a crash cannot skip the check.
CREATE TABLE pending_arrivals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id BLOB NOT NULL,
    members BLOB NOT NULL
);
"#,
    r#"
-- Conversations this device stopped sending to: a member device the key directory never
-- listed is in them. Receiving goes on; sending resumes once those devices are gone.
CREATE TABLE refused_conversations (
    group_id BLOB PRIMARY KEY,
    reason TEXT NOT NULL,
    -- The refused devices, 16 bytes each.
    devices BLOB NOT NULL
);
"#,
    r#"
-- Uploads under way. Sending the same file (same path, size and modification time) for the
-- same blob request again after an interruption goes on where the server's copy stopped: the
-- file is encrypted again with the same key and nonces, and only the missing bytes are sent.
-- When the contact's profile key was sent (its message's sent_at; an invite's key counts from
-- its use): an older key arriving later does not replace it.
ALTER TABLE contacts ADD COLUMN profile_key_at INTEGER NOT NULL DEFAULT 0;
CREATE TABLE pending_uploads (
    path TEXT NOT NULL,
    -- SHA-256 of the blob request (size, recipients, channel) and the file's size and mtime.
    purpose BLOB NOT NULL,
    blob_id BLOB NOT NULL,
    file_key BLOB NOT NULL,
    nonce_seed BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (path, purpose)
);
"#,
];

/// JSON codec for OpenMLS's stored values.
#[derive(Debug, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// The OpenMLS provider of a native client: RustCrypto primitives, state in the client store.
pub struct Provider {
    crypto: RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, Rc<Connection>>,
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, Rc<Connection>>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

/// The client store.
pub struct Store {
    pub(crate) conn: Rc<Connection>,
}

pub(crate) fn sql(error: rusqlite::Error) -> ClientError {
    ClientError::Store(error.to_string())
}

fn store_error(error: rusqlite::Error) -> StoreError {
    StoreError(error.to_string())
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError(format!("stored JSON: {e}"))
}

fn channel_id(bytes: Vec<u8>) -> rusqlite::Result<ChannelId> {
    id16(bytes, ChannelId::from_slice)
}

pub(crate) fn id16<T>(bytes: Vec<u8>, make: impl Fn(&[u8]) -> Result<T, fumi_proto::IdError>) -> rusqlite::Result<T> {
    make(&bytes).map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e)))
}

pub(crate) fn key32(bytes: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    bytes.try_into().map_err(|_| rusqlite::Error::InvalidQuery)
}

impl Store {
    /// Whether a store exists in `home`.
    pub fn exists(home: &Path) -> bool {
        home.join(STORE_FILE).exists()
    }

    /// Opens or creates the store in `home` (created with mode 0700, the file 0600).
    pub fn open(home: &Path) -> Result<(Self, Provider), ClientError> {
        create_private_dir(home)?;
        let path = home.join(STORE_FILE);
        create_private_file(&path)?;
        let mut conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(sql)?;
        // WAL with synchronous=NORMAL: durable against process crashes, and fast enough for
        // OpenMLS, which writes on every state change.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(sql)?;
        SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut conn)
            .run_migrations()
            .map_err(|e| ClientError::Store(format!("OpenMLS store migration: {e}")))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        let applied = usize::try_from(version).unwrap_or(usize::MAX);
        if applied > MIGRATIONS.len() {
            return Err(ClientError::Store(
                "this store was written by a newer fumi; upgrade fumi".into(),
            ));
        }
        for migration in &MIGRATIONS[applied..] {
            conn.execute_batch(migration).map_err(sql)?;
        }
        conn.pragma_update(None, "user_version", MIGRATIONS.len() as i64)
            .map_err(sql)?;
        let conn = Rc::new(conn);
        let provider = Provider {
            crypto: RustCrypto::default(),
            storage: SqliteStorageProvider::new(conn.clone()),
        };
        Ok((Self { conn }, provider))
    }

    /// Runs `f` in one immediate transaction; rolls back if it fails.
    pub fn transaction<T>(&self, f: impl FnOnce() -> Result<T, ClientError>) -> Result<T, ClientError> {
        // The store trait's transaction, with the client's error type fixed for inference.
        self.in_transaction(f)
    }

    /// The franking opening of the received message with this id, if this device has it. Ids are
    /// chosen by senders, so another sender could reuse one: an id that matches several received
    /// messages is refused rather than guessed.
    pub fn franking_evidence(&self, id: MessageId) -> Result<Option<Evidence>, ClientError> {
        let mut found = self.received_evidence(id)?;
        match found.len() {
            0 | 1 => Ok(found.pop()),
            _ => Err(ClientError::Usage(
                "several received messages carry this id (a sender reused another's); this message cannot be \
                 reported by id"
                    .into(),
            )),
        }
    }

    fn messages_where(&self, condition: &str, group: Option<GroupId>) -> Result<Vec<StoredMessage>, StoreError> {
        self.messages_ordered(condition, "rowid", group)
    }

    fn messages_ordered(
        &self,
        condition: &str,
        order: &str,
        group: Option<GroupId>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let query = format!(
            "SELECT rowid, id, group_id, sender_account, kind, text, sent_at, outgoing, attachment, expires_at FROM messages WHERE {condition} ORDER BY {order}"
        );
        let mut stmt = self.conn.prepare(&query).map_err(store_error)?;
        let map = |r: &rusqlite::Row<'_>| {
            let attachment: Option<String> = r.get(8)?;
            Ok(StoredMessage {
                local_id: r.get(0)?,
                id: id16(r.get(1)?, MessageId::from_slice)?,
                group_id: id16(r.get(2)?, GroupId::from_slice)?,
                sender: id16(r.get(3)?, AccountId::from_slice)?,
                is_event: r.get::<_, String>(4)? == "event",
                text: r.get(5)?,
                sent_at: r.get::<_, i64>(6)? as u64,
                outgoing: r.get(7)?,
                attachment: attachment.and_then(|a| serde_json::from_str(&a).ok()),
                expires_at: r.get::<_, Option<i64>>(9)?.map(|t| t as u64),
            })
        };
        let rows = match group {
            Some(group) => stmt.query_map([group.as_bytes().as_slice()], map),
            None => stmt.query_map([], map),
        }
        .map_err(store_error)?;
        rows.collect::<Result<_, _>>().map_err(store_error)
    }

    /// Rows of (device id, time) as a map.
    fn device_times(&self, query: &str) -> Result<HashMap<DeviceId, u64>, StoreError> {
        let mut stmt = self.conn.prepare(query).map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((id16(r.get(0)?, DeviceId::from_slice)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(store_error)?;
        rows.collect::<Result<_, _>>().map_err(store_error)
    }
}

impl ClientStore for Store {
    fn in_transaction<T, E: From<StoreError>>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(store_error)?;
        match f() {
            Ok(value) => {
                self.conn.execute_batch("COMMIT").map_err(store_error)?;
                Ok(value)
            }
            Err(error) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(error)
            }
        }
    }

    fn is_processed(&self, seq: u64) -> Result<bool, StoreError> {
        self.conn
            .query_row("SELECT 1 FROM processed_envelopes WHERE seq = ?", [seq as i64], |_| {
                Ok(())
            })
            .optional()
            .map(|r| r.is_some())
            .map_err(store_error)
    }

    fn mark_processed(&self, seq: u64, now: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO processed_envelopes (seq, processed_at) VALUES (?, ?)",
                params![seq as i64, now as i64],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn push_outbox(&self, entry: &OutboxEntry, now: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO outbox (message_id, group_id, is_commit, request, event, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                params![entry.message_id.as_bytes().as_slice(), entry.group_id.as_bytes().as_slice(), entry.is_commit, entry.request, entry.event, now as i64],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT message_id, group_id, is_commit, request, event FROM outbox ORDER BY created_at, rowid")
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(OutboxEntry {
                    message_id: id16(r.get(0)?, MessageId::from_slice)?,
                    group_id: id16(r.get(1)?, GroupId::from_slice)?,
                    is_commit: r.get(2)?,
                    request: r.get(3)?,
                    event: r.get(4)?,
                })
            })
            .map_err(store_error)?;
        rows.collect::<Result<_, _>>().map_err(store_error)
    }

    fn remove_outbox(&self, message_id: MessageId) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM outbox WHERE message_id = ?",
                [message_id.as_bytes().as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn insert_conversation(&self, c: &Conversation, now: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO conversations (group_id, kind, name, peer, created_at, active) VALUES (?, ?, ?, ?, ?, ?)",
                params![
                    c.group_id.as_bytes().as_slice(),
                    if c.direct { "direct" } else { "group" },
                    c.name,
                    c.peer.map(|p| p.as_bytes().to_vec()),
                    now as i64,
                    c.active
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn update_conversation(
        &self,
        group: GroupId,
        direct: bool,
        name: Option<&str>,
        peer: Option<AccountId>,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE conversations SET kind = ?2, name = ?3, peer = ?4 WHERE group_id = ?1",
                params![
                    group.as_bytes().as_slice(),
                    if direct { "direct" } else { "group" },
                    name,
                    peer.map(|p| p.as_bytes().to_vec())
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn deactivate_conversation(&self, group: GroupId) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE conversations SET active = 0 WHERE group_id = ?",
                [group.as_bytes().as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn set_expire_after(&self, group: GroupId, expire_after_ms: Option<u64>) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE conversations SET expire_after_ms = ? WHERE group_id = ?",
                params![expire_after_ms.map(|ms| ms as i64), group.as_bytes().as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT c.group_id, c.kind, c.name, c.peer, c.active, c.expire_after_ms FROM conversations c
                 ORDER BY COALESCE((SELECT MAX(rowid) FROM messages m WHERE m.group_id = c.group_id), 0) DESC, c.created_at DESC",
            )
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| {
                let peer: Option<Vec<u8>> = r.get(3)?;
                Ok(Conversation {
                    group_id: id16(r.get(0)?, GroupId::from_slice)?,
                    direct: r.get::<_, String>(1)? == "direct",
                    name: r.get(2)?,
                    peer: peer.map(|p| id16(p, AccountId::from_slice)).transpose()?,
                    active: r.get(4)?,
                    expire_after_ms: r.get::<_, Option<i64>>(5)?.map(|ms| ms as u64),
                })
            })
            .map_err(store_error)?;
        rows.collect::<Result<_, _>>().map_err(store_error)
    }

    fn insert_message(&self, m: &StoredMessage, seen: bool, now: u64) -> Result<Option<i64>, StoreError> {
        let attachment = m
            .attachment
            .as_ref()
            .map(|a| serde_json::to_string(a).expect("file view serialises"));
        let changed = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO messages (id, group_id, sender_account, kind, text, sent_at, received_at, outgoing, seen, attachment, expires_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    m.id.as_bytes().as_slice(),
                    m.group_id.as_bytes().as_slice(),
                    m.sender.as_bytes().as_slice(),
                    if m.is_event { "event" } else { "text" },
                    m.text,
                    m.sent_at as i64,
                    now as i64,
                    m.outgoing,
                    seen,
                    attachment,
                    m.expires_at.map(|t| t as i64)
                ],
            )
            .map_err(store_error)?;
        Ok((changed == 1).then(|| self.conn.last_insert_rowid()))
    }

    fn set_file_view(&self, local_id: i64, view: &FileView) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE messages SET attachment = ? WHERE rowid = ?",
                params![serde_json::to_string(view).expect("file view serialises"), local_id],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn unseen(&self) -> Result<Vec<StoredMessage>, StoreError> {
        self.messages_where("seen = 0", None)
    }

    fn mark_seen(&self, local_ids: &[i64]) -> Result<(), StoreError> {
        for id in local_ids {
            self.conn
                .execute("UPDATE messages SET seen = 1 WHERE rowid = ?", [id])
                .map_err(store_error)?;
        }
        Ok(())
    }

    fn unseen_count(&self, group: GroupId) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM messages WHERE group_id = ? AND seen = 0",
                [group.as_bytes().as_slice()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(store_error)
    }

    fn history(&self, group: GroupId) -> Result<Vec<StoredMessage>, StoreError> {
        // In the order they were sent: history copied from another device arrives late but
        // belongs early.
        self.messages_ordered("group_id = ?", "sent_at, rowid", Some(group))
    }

    fn delete_own_message(&self, group: GroupId, id: MessageId) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM messages WHERE group_id = ? AND id = ? AND outgoing = 1",
                params![group.as_bytes().as_slice(), id.as_bytes().as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn purge_expired(&self, now: u64) -> Result<Vec<FileView>, StoreError> {
        let expired = self.messages_where(&format!("expires_at IS NOT NULL AND expires_at <= {now}"), None)?;
        for message in &expired {
            self.conn
                .execute("DELETE FROM downloads WHERE message_rowid = ?", [message.local_id])
                .map_err(store_error)?;
            self.conn
                .execute(
                    "DELETE FROM franking_evidence WHERE message_rowid = ?",
                    [message.local_id],
                )
                .map_err(store_error)?;
            self.conn
                .execute("DELETE FROM messages WHERE rowid = ?", [message.local_id])
                .map_err(store_error)?;
        }
        // The caller deletes only files it saved itself (under its files directory), never the
        // original of a file this device sent.
        Ok(expired.into_iter().filter_map(|m| m.attachment).collect())
    }

    fn add_download(&self, local_id: i64, attachment: &Attachment) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO downloads (blob_id, message_rowid, attachment) VALUES (?, ?, ?)",
                params![
                    attachment.blob.as_bytes().as_slice(),
                    local_id,
                    serde_json::to_string(attachment).expect("attachment serialises")
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn downloads(&self) -> Result<Vec<(i64, Attachment)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT message_rowid, attachment FROM downloads ORDER BY message_rowid")
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(store_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (local_id, json) = row.map_err(store_error)?;
            let attachment = serde_json::from_str(&json).map_err(|e| StoreError(e.to_string()))?;
            out.push((local_id, attachment));
        }
        Ok(out)
    }

    fn is_download_pending(&self, blob: BlobId) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT 1 FROM downloads WHERE blob_id = ?",
                [blob.as_bytes().as_slice()],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
            .map_err(store_error)
    }

    fn remove_download(&self, blob: BlobId) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM downloads WHERE blob_id = ?", [blob.as_bytes().as_slice()])
            .map_err(store_error)?;
        Ok(())
    }

    fn upsert_contact(
        &self,
        account: AccountId,
        username: Option<&str>,
        display_name: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO contacts (account_id, username, display_name) VALUES (?1, ?2, ?3)
                 ON CONFLICT (account_id) DO UPDATE SET username = COALESCE(?2, username), display_name = COALESCE(?3, display_name)",
                params![account.as_bytes().as_slice(), username, display_name],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn check_identity_key(&self, account: AccountId, key: &[u8; 32]) -> Result<bool, StoreError> {
        match self.pinned_identity_key(account)? {
            Some(pinned) => Ok(pinned == *key),
            None => {
                self.conn
                    .execute(
                        "INSERT INTO contacts (account_id, identity_key) VALUES (?1, ?2)
                         ON CONFLICT (account_id) DO UPDATE SET identity_key = ?2",
                        params![account.as_bytes().as_slice(), key.as_slice()],
                    )
                    .map_err(store_error)?;
                Ok(true)
            }
        }
    }

    fn pinned_identity_key(&self, account: AccountId) -> Result<Option<[u8; 32]>, StoreError> {
        let pinned: Option<Option<Vec<u8>>> = self
            .conn
            .query_row(
                "SELECT identity_key FROM contacts WHERE account_id = ?",
                [account.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()
            .map_err(store_error)?;
        pinned
            .flatten()
            .map(|key| {
                key.try_into()
                    .map_err(|_| StoreError("a pinned identity key is not 32 bytes".into()))
            })
            .transpose()
    }

    fn set_verified(&self, account: AccountId, key: &[u8; 32]) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO contacts (account_id, identity_key, verified_key) VALUES (?1, ?2, ?2)
                 ON CONFLICT (account_id) DO UPDATE SET identity_key = ?2, verified_key = ?2",
                params![account.as_bytes().as_slice(), key.as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn is_verified(&self, account: AccountId) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT verified_key IS NOT NULL AND verified_key = identity_key FROM contacts WHERE account_id = ?",
                [account.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()
            .map(|v| v.unwrap_or(false))
            .map_err(store_error)
    }

    fn set_profile_key(&self, account: AccountId, key: &[u8; 32], at: u64) -> Result<bool, StoreError> {
        let current: Option<(Option<Vec<u8>>, i64)> = self
            .conn
            .query_row(
                "SELECT profile_key, profile_key_at FROM contacts WHERE account_id = ?",
                [account.as_bytes().as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(store_error)?;
        match &current {
            Some((Some(known), _)) if known.as_slice() == key.as_slice() => {
                self.conn
                    .execute(
                        "UPDATE contacts SET profile_key_at = MAX(profile_key_at, ?2) WHERE account_id = ?1",
                        params![account.as_bytes().as_slice(), at as i64],
                    )
                    .map_err(store_error)?;
                return Ok(false);
            }
            // A key older than the one known (a message queued before the contact's newer
            // invite or change) would not open the current profile.
            Some((Some(_), known_at)) if (at as i64) < *known_at => return Ok(false),
            _ => {}
        }
        self.conn
            .execute(
                "INSERT INTO contacts (account_id, profile_key, profile_fetched, profile_key_at) VALUES (?1, ?2, 0, ?3)
                 ON CONFLICT (account_id) DO UPDATE SET profile_key = ?2, profile_fetched = 0, profile_key_at = ?3",
                params![account.as_bytes().as_slice(), key.as_slice(), at as i64],
            )
            .map_err(store_error)?;
        Ok(true)
    }

    fn profiles_to_fetch(&self) -> Result<Vec<(AccountId, [u8; 32])>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT account_id, profile_key FROM contacts WHERE profile_key IS NOT NULL AND profile_fetched = 0",
            )
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| Ok((id16(r.get(0)?, AccountId::from_slice)?, key32(r.get(1)?)?)))
            .map_err(store_error)?;
        rows.collect::<Result<_, _>>().map_err(store_error)
    }

    fn set_profile(&self, account: AccountId, username: Option<&str>, display_name: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE contacts SET username = COALESCE(?2, username), display_name = ?3, profile_fetched = 1 WHERE account_id = ?1",
                params![account.as_bytes().as_slice(), username, display_name],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn profile_keys(&self, accounts: &[AccountId]) -> Result<Vec<(AccountId, [u8; 32])>, StoreError> {
        let mut keys = Vec::new();
        for account in accounts {
            let key: Option<Option<Vec<u8>>> = self
                .conn
                .query_row(
                    "SELECT profile_key FROM contacts WHERE account_id = ?",
                    [account.as_bytes().as_slice()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(store_error)?;
            if let Some(Some(key)) = key {
                keys.push((*account, key32(key).map_err(store_error)?));
            }
        }
        Ok(keys)
    }

    fn contact(&self, account: AccountId) -> Result<Option<Contact>, StoreError> {
        self.conn
            .query_row(
                "SELECT username, display_name, avatar_path FROM contacts WHERE account_id = ?",
                [account.as_bytes().as_slice()],
                |r| {
                    Ok(Contact {
                        account_id: account,
                        username: r.get(0)?,
                        display_name: r.get(1)?,
                        avatar_path: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(store_error)
    }

    fn contact_by_username(&self, username: &str) -> Result<Option<AccountId>, StoreError> {
        self.conn
            .query_row("SELECT account_id FROM contacts WHERE username = ?", [username], |r| {
                id16(r.get(0)?, AccountId::from_slice)
            })
            .optional()
            .map_err(store_error)
    }

    fn set_contact_avatar(&self, account: AccountId, digest: &str, path: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE contacts SET avatar_digest = ?2, avatar_path = ?3 WHERE account_id = ?1",
                params![account.as_bytes().as_slice(), digest, path],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn contact_avatar_digest(&self, account: AccountId) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT avatar_digest FROM contacts WHERE account_id = ?",
                [account.as_bytes().as_slice()],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map_err(store_error)?
            .flatten())
    }

    fn contacts(&self) -> Result<Vec<PinnedContact>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT account_id, username, display_name, avatar_path, identity_key, profile_key FROM contacts
                 WHERE identity_key IS NOT NULL ORDER BY username",
            )
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    Contact {
                        account_id: id16(r.get(0)?, AccountId::from_slice)?,
                        username: r.get(1)?,
                        display_name: r.get(2)?,
                        avatar_path: r.get(3)?,
                    },
                    r.get::<_, Option<Vec<u8>>>(4)?.map(key32).transpose()?,
                    r.get::<_, Option<Vec<u8>>>(5)?.map(key32).transpose()?,
                ))
            })
            .map_err(store_error)?;
        rows.collect::<Result<_, _>>().map_err(store_error)
    }

    fn save_account(&self, a: &AccountRow) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO account (id, server, account_id, device_id, device_secret, identity_secret, signature_key, profile_key, username, display_name, avatar_digest, profile_key_set_at)
                 VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    a.server,
                    a.account_id.as_bytes().as_slice(),
                    a.device_id.as_bytes().as_slice(),
                    a.device_secret.as_slice(),
                    a.identity_secret.as_slice(),
                    a.signature_key,
                    a.profile_key.as_slice(),
                    a.username,
                    a.display_name,
                    a.avatar_digest,
                    a.profile_key_set_at as i64
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn account(&self) -> Result<Option<AccountRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT server, account_id, device_id, device_secret, identity_secret, signature_key, profile_key, username, display_name, avatar_digest, profile_key_set_at FROM account WHERE id = 1",
                [],
                |r| {
                    Ok(AccountRow {
                        server: r.get(0)?,
                        account_id: id16(r.get(1)?, AccountId::from_slice)?,
                        device_id: id16(r.get(2)?, DeviceId::from_slice)?,
                        device_secret: key32(r.get(3)?)?,
                        identity_secret: key32(r.get(4)?)?,
                        signature_key: r.get(5)?,
                        profile_key: key32(r.get(6)?)?,
                        username: r.get(7)?,
                        display_name: r.get(8)?,
                        avatar_digest: r.get(9)?,
                        profile_key_set_at: r.get::<_, i64>(10)? as u64,
                    })
                },
            )
            .optional()
            .map_err(store_error)
    }

    fn adopt_own_profile_key(&self, key: &[u8; 32], sent_at: u64) -> Result<bool, StoreError> {
        let changed = self
            .conn
            .execute(
                "UPDATE account SET profile_key = ?1, profile_key_set_at = ?2 WHERE id = 1 AND profile_key != ?1 AND profile_key_set_at < ?2",
                params![key.as_slice(), sent_at as i64],
            )
            .map_err(store_error)?;
        Ok(changed == 1)
    }

    fn keep_franking_evidence(&self, message_rowid: i64, evidence: &Evidence) -> Result<(), StoreError> {
        let json = serde_json::to_string(evidence).expect("evidence serialises");
        self.conn
            .execute(
                "INSERT OR REPLACE INTO franking_evidence (message_rowid, evidence) VALUES (?, ?)",
                params![message_rowid, json],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn pending_upload(&self, path: &str, purpose: &[u8; 32]) -> Result<Option<PendingUpload>, StoreError> {
        self.conn
            .query_row(
                "SELECT blob_id, file_key, nonce_seed FROM pending_uploads WHERE path = ? AND purpose = ?",
                params![path, purpose.as_slice()],
                |r| {
                    Ok(PendingUpload {
                        blob: id16(r.get(0)?, BlobId::from_slice)?,
                        file_key: key32(r.get(1)?)?,
                        nonce_seed: key32(r.get(2)?)?,
                    })
                },
            )
            .optional()
            .map_err(store_error)
    }

    fn save_pending_upload(
        &self,
        path: &str,
        purpose: &[u8; 32],
        blob: BlobId,
        file_key: &[u8; 32],
        nonce_seed: &[u8; 32],
        now: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO pending_uploads (path, purpose, blob_id, file_key, nonce_seed, created_at)
                 VALUES (?, ?, ?, ?, ?, ?)",
                params![
                    path,
                    purpose.as_slice(),
                    blob.as_bytes().as_slice(),
                    file_key.as_slice(),
                    nonce_seed.as_slice(),
                    now as i64
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn forget_pending_upload(&self, path: &str, purpose: &[u8; 32]) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM pending_uploads WHERE path = ? AND purpose = ?",
                params![path, purpose.as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn add_pending_history(&self, token: &[u8; 32], key: &[u8; 32], now: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO pending_history (token, link_key, created_at) VALUES (?, ?, ?)",
                params![token.as_slice(), key.as_slice(), now as i64],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn pending_history(&self) -> Result<Vec<PendingHistory>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT token, link_key, created_at FROM pending_history")
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PendingHistory {
                    token: key32(r.get(0)?)?,
                    link_key: key32(r.get(1)?)?,
                    since: r.get::<_, i64>(2)? as u64,
                })
            })
            .map_err(store_error)?;
        rows.collect::<Result<_, _>>().map_err(store_error)
    }

    fn remove_pending_history(&self, token: &[u8; 32]) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM pending_history WHERE token = ?", [token.as_slice()])
            .map_err(store_error)?;
        Ok(())
    }

    fn revoke_device(&self, device: DeviceId, now: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO revoked_devices (device_id, revoked_at) VALUES (?, ?)",
                params![device.as_bytes().as_slice(), now as i64],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn revoked_devices(&self) -> Result<Vec<DeviceId>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device_id FROM revoked_devices")
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| id16(r.get(0)?, DeviceId::from_slice))
            .map_err(store_error)?;
        rows.collect::<Result<_, _>>().map_err(store_error)
    }

    fn received_evidence(&self, id: MessageId) -> Result<Vec<Evidence>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT f.evidence FROM franking_evidence f JOIN messages m ON m.rowid = f.message_rowid
                 WHERE m.id = ? AND m.outgoing = 0 LIMIT 2",
            )
            .map_err(store_error)?;
        let rows: Vec<String> = statement
            .query_map([id.as_bytes().as_slice()], |row| row.get(0))
            .map_err(store_error)?
            .collect::<Result<_, _>>()
            .map_err(store_error)?;
        rows.iter()
            .map(|json| serde_json::from_str(json).map_err(|e| StoreError(e.to_string())))
            .collect()
    }

    fn directory_state(&self) -> Result<Option<DirectoryState>, StoreError> {
        self.conn
            .query_row(
                "SELECT log_key, epoch, root_hash, own_version, own_checked_epoch, own_alarm FROM key_directory WHERE id = 1",
                [],
                |r| {
                    Ok(DirectoryState {
                        log_key: key32(r.get(0)?)?,
                        epoch: r.get::<_, i64>(1)? as u64,
                        root_hash: key32(r.get(2)?)?,
                        own_version: r.get::<_, i64>(3)? as u64,
                        own_checked_epoch: r.get::<_, i64>(4)? as u64,
                        own_alarm: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(store_error)
    }

    fn save_directory_state(&self, state: &DirectoryState) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO key_directory (id, log_key, epoch, root_hash, own_version, own_checked_epoch, own_alarm) \
                 VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO UPDATE SET log_key = ?1, epoch = ?2, \
                 root_hash = ?3, own_version = ?4, own_checked_epoch = ?5, own_alarm = ?6",
                params![
                    state.log_key.as_slice(),
                    state.epoch as i64,
                    state.root_hash.as_slice(),
                    state.own_version as i64,
                    state.own_checked_epoch as i64,
                    state.own_alarm
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn record_own_review(&self, checked_epoch: u64, clean_version: Option<u64>, alarm: bool) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE key_directory SET own_checked_epoch = MAX(own_checked_epoch, ?1), \
                 own_version = COALESCE(?2, own_version), own_alarm = ?3 WHERE id = 1",
                params![checked_epoch as i64, clean_version.map(|v| v as i64), alarm],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn know_device(&self, device: DeviceId, signature_key: Option<&[u8; 32]>, now: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO known_devices (device_id, learned_at, signature_key) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (device_id) DO UPDATE SET signature_key = COALESCE(signature_key, ?3)",
                params![
                    device.as_bytes().as_slice(),
                    now as i64,
                    signature_key.map(|k| k.as_slice())
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn known_devices(&self) -> Result<HashMap<DeviceId, Option<[u8; 32]>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device_id, signature_key FROM known_devices")
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| {
                let key: Option<Vec<u8>> = r.get(1)?;
                Ok((id16(r.get(0)?, DeviceId::from_slice)?, key.map(key32).transpose()?))
            })
            .map_err(store_error)?;
        rows.collect::<Result<_, _>>().map_err(store_error)
    }

    fn known_devices_learned_at(&self) -> Result<HashMap<DeviceId, u64>, StoreError> {
        self.device_times("SELECT device_id, learned_at FROM known_devices")
    }

    fn revoked_devices_at(&self) -> Result<HashMap<DeviceId, u64>, StoreError> {
        self.device_times("SELECT device_id, revoked_at FROM revoked_devices")
    }

    fn add_pending_arrival(&self, group: GroupId, members: &[Member]) -> Result<(), StoreError> {
        let encoded: Vec<u8> = members
            .iter()
            .flat_map(|m| {
                [
                    m.account.as_bytes().as_slice(),
                    m.device.as_bytes(),
                    &m.identity_key,
                    &m.signature_key,
                ]
                .concat()
            })
            .collect();
        self.conn
            .execute(
                "INSERT INTO pending_arrivals (group_id, members) VALUES (?, ?)",
                params![group.as_bytes().as_slice(), encoded],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn pending_arrivals(&self) -> Result<Vec<(i64, GroupId, Vec<Member>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, group_id, members FROM pending_arrivals ORDER BY id")
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| {
                let members: Vec<u8> = r.get(2)?;
                Ok((r.get::<_, i64>(0)?, id16(r.get(1)?, GroupId::from_slice)?, members))
            })
            .map_err(store_error)?;
        let mut arrivals = Vec::new();
        for row in rows {
            let (id, group, bytes) = row.map_err(store_error)?;
            let members = bytes
                .chunks(MEMBER_BYTES)
                .map(|m| {
                    (m.len() == MEMBER_BYTES)
                        .then(|| Member {
                            account: AccountId::from_slice(&m[..16]).expect("16 bytes"),
                            device: DeviceId::from_slice(&m[16..32]).expect("16 bytes"),
                            identity_key: m[32..64].try_into().expect("32 bytes"),
                            signature_key: m[64..96].try_into().expect("32 bytes"),
                        })
                        .ok_or_else(|| StoreError("a pending arrival is damaged".into()))
                })
                .collect::<Result<_, _>>()?;
            arrivals.push((id, group, members));
        }
        Ok(arrivals)
    }

    fn remove_pending_arrival(&self, id: i64) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM pending_arrivals WHERE id = ?", [id])
            .map_err(store_error)?;
        Ok(())
    }

    fn has_pending_arrivals(&self, group: GroupId) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pending_arrivals WHERE group_id = ?)",
                [group.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .map_err(store_error)
    }

    fn refuse_conversation(&self, group: GroupId, reason: &str, devices: &[DeviceId]) -> Result<(), StoreError> {
        let encoded: Vec<u8> = devices.iter().flat_map(|d| *d.as_bytes()).collect();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO refused_conversations (group_id, reason, devices) VALUES (?, ?, ?)",
                params![group.as_bytes().as_slice(), reason, encoded],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn conversation_refusal(&self, group: GroupId) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT reason FROM refused_conversations WHERE group_id = ?",
                [group.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()
            .map_err(store_error)
    }

    fn refused_conversations(&self) -> Result<Vec<(GroupId, Vec<DeviceId>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT group_id, devices FROM refused_conversations")
            .map_err(store_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((id16(r.get(0)?, GroupId::from_slice)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(store_error)?;
        let mut refused = Vec::new();
        for row in rows {
            let (group, bytes) = row.map_err(store_error)?;
            let devices = bytes
                .chunks(16)
                .map(|d| DeviceId::from_slice(d).map_err(|_| StoreError("a refused conversation is damaged".into())))
                .collect::<Result<_, _>>()?;
            refused.push((group, devices));
        }
        Ok(refused)
    }

    fn lift_refusal(&self, group: GroupId) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM refused_conversations WHERE group_id = ?",
                [group.as_bytes().as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn add_authority(&self, name: &str, key: &[u8; 32], now: u64) -> Result<bool, StoreError> {
        match self.conn.execute(
            "INSERT INTO authorities (name, public_key, added_at) VALUES (?, ?, ?)",
            params![name, key.as_slice(), now as i64],
        ) {
            Ok(_) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                Ok(false)
            }
            Err(other) => Err(store_error(other)),
        }
    }

    fn remove_authority(&self, name: &str) -> Result<bool, StoreError> {
        let removed = self
            .conn
            .execute("DELETE FROM authorities WHERE name = ?", [name])
            .map_err(store_error)?;
        Ok(removed > 0)
    }

    fn authorities(&self) -> Result<Vec<TrustedAuthority>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT name, public_key FROM authorities ORDER BY name")
            .map_err(store_error)?;
        statement
            .query_map([], |r| {
                Ok(TrustedAuthority {
                    name: r.get(0)?,
                    public_key: key32(r.get(1)?)?,
                })
            })
            .map_err(store_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)
    }

    fn organisation(&self) -> Result<Option<OrganisationProfile>, StoreError> {
        let stored: Option<String> = self
            .conn
            .query_row("SELECT profile FROM organisation WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(store_error)?;
        stored
            .map(|json| serde_json::from_str(&json).map_err(json_err))
            .transpose()
    }

    fn save_organisation(&self, profile: &OrganisationProfile) -> Result<(), StoreError> {
        let json = serde_json::to_string(profile).map_err(json_err)?;
        self.conn
            .execute(
                "INSERT INTO organisation (id, profile) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET profile = ?1",
                [json],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn save_channel(&self, row: &ChannelRow, now: u64) -> Result<(), StoreError> {
        let info = serde_json::to_string(&row.info).map_err(json_err)?;
        self.conn
            .execute(
                "INSERT INTO channels (channel_id, owner_account, owner_key, epoch, channel_key, own, info, last_seq, added_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (channel_id) DO UPDATE SET epoch = ?4, channel_key = ?5, info = ?7",
                params![
                    row.channel.as_bytes().as_slice(),
                    row.owner.as_bytes().as_slice(),
                    row.owner_key.as_slice(),
                    row.key.epoch,
                    row.key.key.as_slice(),
                    row.own,
                    info,
                    row.last_seq as i64,
                    now as i64
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn channel_rows(&self) -> Result<Vec<ChannelRow>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT channel_id, owner_account, owner_key, epoch, channel_key, own, info, last_seq
                 FROM channels ORDER BY added_at",
            )
            .map_err(store_error)?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    channel_id(r.get(0)?)?,
                    id16(r.get(1)?, AccountId::from_slice)?,
                    key32(r.get(2)?)?,
                    r.get::<_, u32>(3)?,
                    key32(r.get(4)?)?,
                    r.get::<_, bool>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)? as u64,
                ))
            })
            .map_err(store_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)?;
        rows.into_iter()
            .map(|(channel, owner, owner_key, epoch, key, own, info, last_seq)| {
                Ok(ChannelRow {
                    channel,
                    owner,
                    owner_key,
                    key: ChannelKey { epoch, key },
                    own,
                    info: serde_json::from_str(&info).map_err(json_err)?,
                    last_seq,
                })
            })
            .collect()
    }

    fn set_last_seq(&self, channel: ChannelId, seq: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE channels SET last_seq = MAX(last_seq, ?) WHERE channel_id = ?",
                params![seq as i64, channel.as_bytes().as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn forget_channel(&self, channel: ChannelId) -> Result<(), StoreError> {
        let id = channel.as_bytes().as_slice();
        for statement in [
            "DELETE FROM channel_posts WHERE channel_id = ?",
            "DELETE FROM channel_warnings WHERE channel_id = ?",
            "DELETE FROM channel_files WHERE channel_id = ?",
            "DELETE FROM channels WHERE channel_id = ?",
        ] {
            self.conn.execute(statement, [id]).map_err(store_error)?;
        }
        Ok(())
    }

    fn insert_post(&self, post: &Post, seen: bool, now: u64) -> Result<(), StoreError> {
        let json = serde_json::to_string(post).map_err(json_err)?;
        self.conn
            .execute(
                "INSERT OR IGNORE INTO channel_posts (channel_id, seq, post, received_at, seen) VALUES (?, ?, ?, ?, ?)",
                params![
                    post.channel.as_bytes().as_slice(),
                    post.seq as i64,
                    json,
                    now as i64,
                    seen
                ],
            )
            .map_err(store_error)?;
        if let PostBody::Form { form_id, form } = &post.body {
            self.conn
                .execute(
                    "INSERT OR IGNORE INTO channel_forms (channel_id, form_id, definition, published_at) VALUES (?, ?, ?, ?)",
                    params![
                        post.channel.as_bytes().as_slice(),
                        form_id,
                        serde_json::to_string(form).map_err(json_err)?,
                        post.sent_at as i64
                    ],
                )
                .map_err(store_error)?;
        }
        Ok(())
    }

    fn posts(&self, channel: Option<ChannelId>, unseen_only: bool) -> Result<Vec<Post>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT post FROM channel_posts
                 WHERE (?1 IS NULL OR channel_id = ?1) AND (?2 = 0 OR seen = 0) ORDER BY received_at, seq",
            )
            .map_err(store_error)?;
        let posts = statement
            .query_map(params![channel.map(|c| c.as_bytes().to_vec()), unseen_only], |r| {
                r.get::<_, String>(0)
            })
            .map_err(store_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)?;
        posts
            .iter()
            .map(|p| serde_json::from_str(p).map_err(json_err))
            .collect()
    }

    fn mark_posts_seen(&self, channel: Option<ChannelId>) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE channel_posts SET seen = 1 WHERE seen = 0 AND (?1 IS NULL OR channel_id = ?1)",
                [channel.map(|c| c.as_bytes().to_vec())],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn post_count(&self, channel: ChannelId) -> Result<u64, StoreError> {
        let count: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM channel_posts WHERE channel_id = ?",
                [channel.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .map_err(store_error)?;
        Ok(count as u64)
    }

    fn set_channel_file(&self, channel: ChannelId, seq: u64, view: &FileView) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO channel_files (channel_id, seq, view) VALUES (?, ?, ?)",
                params![
                    channel.as_bytes().as_slice(),
                    seq as i64,
                    serde_json::to_string(view).map_err(json_err)?
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn channel_file(&self, channel: ChannelId, seq: u64) -> Result<Option<FileView>, StoreError> {
        let view: Option<String> = self
            .conn
            .query_row(
                "SELECT view FROM channel_files WHERE channel_id = ? AND seq = ?",
                params![channel.as_bytes().as_slice(), seq as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(store_error)?;
        view.map(|v| serde_json::from_str(&v).map_err(json_err)).transpose()
    }

    fn add_warning(&self, channel: ChannelId, seq: u64, warning: &str, now: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO channel_warnings (channel_id, seq, warning, created_at) VALUES (?, ?, ?, ?)",
                params![channel.as_bytes().as_slice(), seq as i64, warning, now as i64],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn take_warnings(&self, channel: Option<ChannelId>) -> Result<Vec<(ChannelId, u64, String)>, StoreError> {
        let id = channel.map(|c| c.as_bytes().to_vec());
        let mut statement = self
            .conn
            .prepare(
                "SELECT channel_id, seq, warning FROM channel_warnings
                 WHERE seen = 0 AND (?1 IS NULL OR channel_id = ?1) ORDER BY id",
            )
            .map_err(store_error)?;
        let found = statement
            .query_map([&id], |r| {
                Ok((
                    channel_id(r.get(0)?)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(store_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)?;
        self.conn
            .execute(
                "UPDATE channel_warnings SET seen = 1 WHERE seen = 0 AND (?1 IS NULL OR channel_id = ?1)",
                [&id],
            )
            .map_err(store_error)?;
        Ok(found)
    }

    fn form_definition(&self, channel: ChannelId, form_id: &str) -> Result<Option<FormDefinition>, StoreError> {
        let definition: Option<String> = self
            .conn
            .query_row(
                "SELECT definition FROM channel_forms WHERE channel_id = ? AND form_id = ?",
                params![channel.as_bytes().as_slice(), form_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(store_error)?;
        definition
            .map(|d| serde_json::from_str(&d).map_err(json_err))
            .transpose()
    }

    fn forms(&self) -> Result<Vec<(ChannelId, String, FormDefinition)>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT channel_id, form_id, definition FROM channel_forms ORDER BY published_at")
            .map_err(store_error)?;
        let rows = statement
            .query_map([], |r| {
                Ok((channel_id(r.get(0)?)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })
            .map_err(store_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)?;
        rows.into_iter()
            .map(|(channel, form_id, definition)| {
                Ok((channel, form_id, serde_json::from_str(&definition).map_err(json_err)?))
            })
            .collect()
    }

    fn insert_submission(&self, s: &SubmissionRecord, now: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO form_submissions
                 (submission_id, channel_id, form_id, group_id, submitter, answers, sent_at, received_at, outgoing, seen)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    s.id.as_bytes().as_slice(),
                    s.channel.as_bytes().as_slice(),
                    s.form_id,
                    s.group.as_bytes().as_slice(),
                    s.submitter.as_bytes().as_slice(),
                    serde_json::to_string(&s.answers).map_err(json_err)?,
                    s.sent_at as i64,
                    now as i64,
                    s.outgoing,
                    s.outgoing
                ],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn delete_submission(&self, id: MessageId) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM form_submissions WHERE submission_id = ?",
                [id.as_bytes().as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn submissions(&self, which: Submissions<'_>) -> Result<Vec<SubmissionRecord>, StoreError> {
        use rusqlite::types::Value;
        let (filter, arguments) = match which {
            Submissions::Form(channel, form_id) => (
                "channel_id = ? AND form_id = ?",
                vec![
                    Value::Blob(channel.as_bytes().to_vec()),
                    Value::Text(form_id.to_owned()),
                ],
            ),
            Submissions::Unseen => ("seen = 0", vec![]),
        };
        let query = format!(
            "SELECT submission_id, channel_id, form_id, group_id, submitter, answers, sent_at, outgoing, receipt_at
             FROM form_submissions WHERE {filter} ORDER BY sent_at, received_at"
        );
        let mut statement = self.conn.prepare(&query).map_err(store_error)?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(arguments), |r| {
                Ok((
                    id16(r.get(0)?, MessageId::from_slice)?,
                    channel_id(r.get(1)?)?,
                    r.get::<_, String>(2)?,
                    id16(r.get(3)?, GroupId::from_slice)?,
                    id16(r.get(4)?, AccountId::from_slice)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)? as u64,
                    r.get::<_, bool>(7)?,
                    r.get::<_, Option<i64>>(8)?.map(|t| t as u64),
                ))
            })
            .map_err(store_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)?;
        if matches!(which, Submissions::Unseen) {
            self.conn
                .execute("UPDATE form_submissions SET seen = 1 WHERE seen = 0", [])
                .map_err(store_error)?;
        }
        rows.into_iter()
            .map(
                |(id, channel, form_id, group, submitter, answers, sent_at, outgoing, receipt_at)| {
                    Ok(SubmissionRecord {
                        id,
                        channel,
                        form_id,
                        group,
                        submitter,
                        answers: serde_json::from_str(&answers).map_err(json_err)?,
                        sent_at,
                        outgoing,
                        receipt_at,
                    })
                },
            )
            .collect()
    }

    fn submission_count(&self, channel: ChannelId, form_id: &str) -> Result<u64, StoreError> {
        let count: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM form_submissions WHERE channel_id = ? AND form_id = ?",
                params![channel.as_bytes().as_slice(), form_id],
                |r| r.get(0),
            )
            .map_err(store_error)?;
        Ok(count as u64)
    }

    fn set_receipt(&self, submission: MessageId, now: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE form_submissions SET receipt_at = ?, seen = 0
                 WHERE submission_id = ? AND outgoing = 1 AND receipt_at IS NULL",
                params![now as i64, submission.as_bytes().as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }

    fn unconfirmed_submissions(&self) -> Result<Vec<(MessageId, GroupId)>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT submission_id, group_id FROM form_submissions WHERE outgoing = 0 AND receipt_sent = 0")
            .map_err(store_error)?;
        statement
            .query_map([], |r| {
                Ok((
                    id16(r.get(0)?, MessageId::from_slice)?,
                    id16(r.get(1)?, GroupId::from_slice)?,
                ))
            })
            .map_err(store_error)?
            .collect::<Result<_, _>>()
            .map_err(store_error)
    }

    fn mark_receipt_sent(&self, submission: MessageId) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE form_submissions SET receipt_sent = 1 WHERE submission_id = ?",
                [submission.as_bytes().as_slice()],
            )
            .map_err(store_error)?;
        Ok(())
    }
}

/// Creates a directory (and its parents) readable only by the user.
pub(crate) fn create_private_dir(home: &Path) -> Result<(), ClientError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(home)
        .map_err(|e| ClientError::Store(format!("cannot create {}: {e}", home.display())))
}

/// Opens (creating if needed, mode 0600) a file for writing: truncated, or appended to.
pub(crate) fn open_private(path: &Path, append: bool) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true);
    if append {
        options.append(true);
    } else {
        options.write(true).truncate(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Writes a whole file readable only by the user, also when it replaces an existing file (whose
/// mode `open` would keep), and syncs it.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = open_private(path, false)?;
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn create_private_file(path: &Path) -> Result<(), ClientError> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .map(drop)
        .map_err(|e| ClientError::Store(format!("cannot create {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a fresh home that lives as long as the store (the conformance tests make one
    /// per test).
    pub(crate) struct TestStore {
        store: Store,
        _home: tempfile::TempDir,
    }

    impl std::ops::Deref for TestStore {
        type Target = Store;
        fn deref(&self) -> &Store {
            &self.store
        }
    }

    pub(crate) fn test_store() -> TestStore {
        let home = tempfile::tempdir().unwrap();
        let (store, _provider) = Store::open(home.path()).unwrap();
        TestStore { store, _home: home }
    }

    fumi_core::client_store_conformance!(super::test_store());
}
