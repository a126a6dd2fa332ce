//! The embedded SQLite backend: one file in the data directory, WAL mode, `synchronous=FULL` so
//! that an acknowledged write is on disk.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use fumi_proto::{AccountId, BlobId, ChannelId, DeviceId};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::*;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran. Never edit a
/// released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    id BLOB PRIMARY KEY,
    identity_key BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    suspended INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE devices (
    id BLOB PRIMARY KEY,
    account_id BLOB NOT NULL REFERENCES accounts(id),
    secret_hash BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX devices_by_account ON devices(account_id);
CREATE TABLE usernames (
    hash BLOB PRIMARY KEY,
    account_id BLOB NOT NULL UNIQUE REFERENCES accounts(id)
);
CREATE TABLE profiles (
    account_id BLOB PRIMARY KEY REFERENCES accounts(id),
    sealed BLOB NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE key_packages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id BLOB NOT NULL REFERENCES devices(id),
    key_package BLOB NOT NULL,
    last_resort INTEGER NOT NULL
);
CREATE INDEX key_packages_by_device ON key_packages(device_id, last_resort, id);
CREATE TABLE groups (
    id BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX messages_by_expiry ON messages(expires_at);
CREATE TABLE mailbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id BLOB NOT NULL,
    message_id INTEGER NOT NULL REFERENCES messages(id)
);
CREATE INDEX mailbox_by_device ON mailbox(device_id, seq);
CREATE INDEX mailbox_by_message ON mailbox(message_id);
CREATE TABLE submissions (
    sender_device BLOB NOT NULL,
    message_id BLOB NOT NULL,
    digest BLOB NOT NULL,
    accepted_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (sender_device, message_id)
);
"#,
    r#"
CREATE TABLE group_members (
    group_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    PRIMARY KEY (group_id, device_id)
);
"#,
    r#"
ALTER TABLE devices ADD COLUMN removed_at INTEGER;
CREATE TABLE links (
    token_hash BLOB PRIMARY KEY,
    account_id BLOB NOT NULL REFERENCES accounts(id),
    sealed BLOB,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    device_id BLOB,
    history BLOB
);
CREATE TABLE invites (
    token_hash BLOB PRIMARY KEY,
    account_id BLOB NOT NULL REFERENCES accounts(id),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    redeemed_at INTEGER
);
CREATE TABLE blobs (
    id BLOB PRIMARY KEY,
    owner_account BLOB NOT NULL,
    owner_device BLOB NOT NULL,
    size INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX blobs_by_owner ON blobs(owner_account);
CREATE TABLE blob_recipients (
    blob_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    PRIMARY KEY (blob_id, device_id)
);
CREATE TABLE avatars (
    account_id BLOB PRIMARY KEY REFERENCES accounts(id),
    sealed BLOB NOT NULL,
    updated_at INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE audit_log (
    idx INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    leaf_hash BLOB NOT NULL
);
CREATE TABLE audit_heads (
    tree_size INTEGER PRIMARY KEY,
    head TEXT NOT NULL
);
ALTER TABLE accounts ADD COLUMN audit_key BLOB;
CREATE TABLE reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sealed BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
"#,
    r#"
-- Nonces of admin requests, kept while their timestamps could still pass: a signed request
-- cannot be replayed, not even after a restart.
CREATE TABLE admin_nonces (
    nonce TEXT PRIMARY KEY,
    forget_at INTEGER NOT NULL
);
"#,
    r#"
-- Broadcast channels: descriptions and posts are sealed under a channel key the server never
-- sees; subscriptions exist only so that online subscribers get posts pushed and the owner a count.
CREATE TABLE channels (
    id BLOB PRIMARY KEY,
    owner_account BLOB NOT NULL REFERENCES accounts(id),
    sealed_info BLOB NOT NULL,
    latest_seq INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE INDEX channels_by_owner ON channels (owner_account);
CREATE TABLE channel_posts (
    channel_id BLOB NOT NULL REFERENCES channels(id),
    seq INTEGER NOT NULL,
    sealed_post BLOB NOT NULL,
    posted_at INTEGER NOT NULL,
    PRIMARY KEY (channel_id, seq)
);
CREATE TABLE channel_subscriptions (
    channel_id BLOB NOT NULL REFERENCES channels(id),
    account_id BLOB NOT NULL REFERENCES accounts(id),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (channel_id, account_id)
);
CREATE INDEX channel_subscriptions_by_account ON channel_subscriptions (account_id);
"#,
    r#"
-- A channel's files: readable by any device (subscribers hold the key), kept until they expire.
ALTER TABLE blobs ADD COLUMN channel_id BLOB REFERENCES channels(id);
-- The subscriber count, kept with the channel: counting 100,000 rows on every read was the
-- bottleneck of subscribers fetching posts.
ALTER TABLE channels ADD COLUMN subscribers INTEGER NOT NULL DEFAULT 0;
UPDATE channels SET subscribers = (SELECT COUNT(*) FROM channel_subscriptions WHERE channel_id = channels.id);
"#,
    r#"
-- Key directory (akd): tree records by key, value states by label and epoch, signed epoch heads.
CREATE TABLE kt_nodes (
    key BLOB PRIMARY KEY,
    record BLOB NOT NULL
);
CREATE TABLE kt_states (
    label BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    version INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (label, epoch)
);
CREATE TABLE kt_heads (
    epoch INTEGER PRIMARY KEY,
    head TEXT NOT NULL
);
-- The MLS signature key of a device's KeyPackages, published in the directory.
ALTER TABLE devices ADD COLUMN signature_key BLOB;
-- The proof a linked device gave that it holds the link code, for the linking device.
ALTER TABLE links ADD COLUMN link_proof BLOB;
-- Accounts (kind 0) and username hashes (kind 1) changed since the last epoch, marked by
-- triggers in the changing transaction so that no change can miss the directory.
CREATE TABLE kt_pending (
    kind INTEGER NOT NULL,
    id BLOB NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, id)
);
CREATE TRIGGER kt_account_insert AFTER INSERT ON accounts BEGIN
    INSERT INTO kt_pending (kind, id) VALUES (0, NEW.id) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER kt_account_update AFTER UPDATE OF identity_key ON accounts BEGIN
    INSERT INTO kt_pending (kind, id) VALUES (0, NEW.id) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER kt_account_delete AFTER DELETE ON accounts BEGIN
    INSERT INTO kt_pending (kind, id) VALUES (0, OLD.id) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER kt_device_insert AFTER INSERT ON devices BEGIN
    INSERT INTO kt_pending (kind, id) VALUES (0, NEW.account_id) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER kt_device_update AFTER UPDATE OF removed_at, signature_key, account_id ON devices BEGIN
    INSERT INTO kt_pending (kind, id) VALUES (0, OLD.account_id) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
    INSERT INTO kt_pending (kind, id) VALUES (0, NEW.account_id) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER kt_device_delete AFTER DELETE ON devices BEGIN
    INSERT INTO kt_pending (kind, id) VALUES (0, OLD.account_id) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER kt_username_insert AFTER INSERT ON usernames BEGIN
    INSERT INTO kt_pending (kind, id) VALUES (1, NEW.hash) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER kt_username_update AFTER UPDATE ON usernames BEGIN
    INSERT INTO kt_pending (kind, id) VALUES (1, OLD.hash) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
    INSERT INTO kt_pending (kind, id) VALUES (1, NEW.hash) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER kt_username_delete AFTER DELETE ON usernames BEGIN
    INSERT INTO kt_pending (kind, id) VALUES (1, OLD.hash) ON CONFLICT (kind, id) DO UPDATE SET generation = generation + 1;
END;
-- Everything that existed before the directory goes into its first epoch.
INSERT INTO kt_pending (kind, id) SELECT 0, id FROM accounts;
INSERT INTO kt_pending (kind, id) SELECT 1, hash FROM usernames;
"#,
    r#"
-- Data residency: the region holding the account's mailboxes, KeyPackages, profile, avatar and
-- blob bytes (NULL: this database's own), and a relocation under way (target while copying,
-- source while cleaning up; '' names this database's own region).
ALTER TABLE accounts ADD COLUMN region TEXT;
ALTER TABLE accounts ADD COLUMN relocating_to TEXT;
ALTER TABLE accounts ADD COLUMN relocating_from TEXT;
CREATE INDEX accounts_by_region ON accounts (region) WHERE region IS NOT NULL;
"#,
];

/// Connections for the two reads on the hot path (authenticating a device, reading a mailbox).
/// They run inline on the calling task: a point read in WAL mode never waits for the writer and
/// takes microseconds, less than handing it to sqlx's worker thread and back.
#[derive(Debug)]
struct Readers {
    path: std::path::PathBuf,
    idle: std::sync::Mutex<Vec<rusqlite::Connection>>,
}

/// Idle reader connections kept.
const MAX_IDLE_READERS: usize = 16;
/// Envelope bytes read for one delivery round (beyond the first envelope).
const MAX_FETCH_BYTES: usize = 2 * 1024 * 1024;

impl Readers {
    fn with<R>(&self, read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R>) -> Result<R, StorageError> {
        let idle = self.idle.lock().expect("readers lock").pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = rusqlite::Connection::open(&self.path).map_err(sql)?;
                // Readers in WAL mode do not wait for the writer; a short timeout bounds the rare
                // wait (WAL recovery) on an async task.
                conn.busy_timeout(Duration::from_secs(1)).map_err(sql)?;
                conn.pragma_update(None, "query_only", true).map_err(sql)?;
                conn
            }
        };
        let result = read(&conn).map_err(sql);
        let mut idle = self.idle.lock().expect("readers lock");
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }
}

/// SQLite storage in one file.
#[derive(Debug, Clone)]
pub struct SqliteStorage {
    pool: SqlitePool,
    readers: std::sync::Arc<Readers>,
    /// Submissions and acknowledgements go through one writer thread that commits them in groups.
    writes: mpsc::Sender<Write>,
}

/// Tables that hold one sealed blob per account.
#[derive(Clone, Copy)]
enum SealedTable {
    Profiles,
    Avatars,
}

impl SealedTable {
    fn upsert(self) -> &'static str {
        match self {
            SealedTable::Profiles => {
                "INSERT INTO profiles (account_id, sealed, updated_at) VALUES (?, ?, ?)
                 ON CONFLICT (account_id) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at"
            }
            SealedTable::Avatars => {
                "INSERT INTO avatars (account_id, sealed, updated_at) VALUES (?, ?, ?)
                 ON CONFLICT (account_id) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at"
            }
        }
    }

    fn select(self) -> &'static str {
        match self {
            SealedTable::Profiles => "SELECT sealed FROM profiles WHERE account_id = ?",
            SealedTable::Avatars => "SELECT sealed FROM avatars WHERE account_id = ?",
        }
    }
}

impl SqliteStorage {
    /// Opens (creating if needed) the database file and applies migrations.
    pub async fn open(path: &Path) -> Result<Self, StorageError> {
        Self::open_with(path, true).await
    }

    /// Opens a region's database: the same schema, but its accounts and devices live in the main
    /// database, so the references to them are not enforced.
    pub async fn open_region(path: &Path) -> Result<Self, StorageError> {
        Self::open_with(path, false).await
    }

    async fn open_with(path: &Path, foreign_keys: bool) -> Result<Self, StorageError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(foreign_keys)
            // Deleted rows are overwritten, not left in free pages: what was acknowledged,
            // purged or relocated away is gone from the file too.
            .pragma("secure_delete", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(db)?;
        Self::migrate(&pool).await?;
        let writes = spawn_writer(path)?;
        let readers = std::sync::Arc::new(Readers {
            path: path.to_path_buf(),
            idle: Default::default(),
        });
        Ok(Self { pool, readers, writes })
    }

    async fn migrate(pool: &SqlitePool) -> Result<(), StorageError> {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let applied = usize::try_from(version).map_err(|_| StorageError::Database("negative schema version".into()))?;
        if applied > MIGRATIONS.len() {
            return Err(StorageError::Database(format!(
                "the database schema (version {applied}) is newer than this server (version {}); upgrade the server",
                MIGRATIONS.len()
            )));
        }
        for migration in &MIGRATIONS[applied..] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*migration))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        // PRAGMA takes no bound parameters; the value is our own constant.
        let set_version = format!("PRAGMA user_version = {}", MIGRATIONS.len());
        sqlx::raw_sql(sqlx::AssertSqlSafe(set_version))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// Hands a write to the group-commit writer task.
    async fn enqueue(&self, write: Write) -> Result<(), StorageError> {
        self.writes.send(write).await.map_err(|_| writer_stopped())
    }

    /// A write transaction that takes the write lock at once, so that concurrent writers wait
    /// on the busy timeout instead of failing on lock upgrade.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>, StorageError> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)
    }

    /// Stores (or replaces) an account's sealed blob in one of the per-account tables.
    async fn put_sealed(
        &self,
        table: SealedTable,
        account: AccountId,
        sealed: Ciphertext,
        now: u64,
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        sqlx::query(table.upsert())
            .bind(account.as_bytes().as_slice())
            .bind(sealed.0)
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn sealed(&self, table: SealedTable, account: AccountId) -> Result<Option<Ciphertext>, StorageError> {
        let sealed: Option<Vec<u8>> = sqlx::query_scalar(table.select())
            .bind(account.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(sealed.map(Ciphertext))
    }
}

#[async_trait]
impl Storage for SqliteStorage {
    async fn close(&self) {
        self.pool.close().await;
    }

    async fn create_account(
        &self,
        account: AccountId,
        identity_key: &[u8],
        device: DeviceId,
        secret_hash: &[u8; 32],
        region: Option<&str>,
        now: u64,
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO accounts (id, identity_key, created_at, region) VALUES (?, ?, ?, ?)")
            .bind(account.as_bytes().as_slice())
            .bind(identity_key)
            .bind(to_i64(now))
            .bind(region)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("INSERT INTO devices (id, account_id, secret_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(device.as_bytes().as_slice())
            .bind(account.as_bytes().as_slice())
            .bind(secret_hash.as_slice())
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn device_auth(&self, device: DeviceId) -> Result<Option<DeviceAuth>, StorageError> {
        use rusqlite::OptionalExtension;
        // Every authenticated request asks this: read inline (see `Readers`).
        type Row = (
            Vec<u8>,
            Vec<u8>,
            bool,
            bool,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let row: Option<Row> = self.readers.with(|conn| {
            conn.prepare_cached(
                "SELECT d.account_id, d.secret_hash, a.suspended, d.removed_at IS NOT NULL,
                        a.region, a.relocating_to, a.relocating_from
                 FROM devices d JOIN accounts a ON a.id = d.account_id WHERE d.id = ?",
            )?
            .query_row([device.as_bytes().as_slice()], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                    row.get(6)?,
                ))
            })
            .optional()
        })?;
        let Some((account, hash, suspended, removed, region, to, from)) = row else {
            return Ok(None);
        };
        Ok(Some(DeviceAuth {
            account: AccountId::from_slice(&account)
                .map_err(|_| StorageError::Database("corrupt account id".into()))?,
            secret_hash: hash
                .try_into()
                .map_err(|_| StorageError::Database("corrupt secret hash".into()))?,
            suspended,
            removed,
            residency: Residency::from_columns(region, to, from),
        }))
    }

    async fn account(&self, account: AccountId) -> Result<Option<AccountRecord>, StorageError> {
        let identity: Option<Vec<u8>> = sqlx::query_scalar("SELECT identity_key FROM accounts WHERE id = ?")
            .bind(account.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        let Some(identity_key) = identity else { return Ok(None) };
        let devices: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT id FROM devices WHERE account_id = ? AND removed_at IS NULL ORDER BY created_at, id",
        )
        .bind(account.as_bytes().as_slice())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let devices = devices
            .iter()
            .map(|d| DeviceId::from_slice(d).map_err(|_| StorageError::Database("corrupt device id".into())))
            .collect::<Result<_, _>>()?;
        Ok(Some(AccountRecord { identity_key, devices }))
    }

    async fn claim_username(&self, account: AccountId, hash: &[u8; 32]) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        let holder: Option<Vec<u8>> = sqlx::query_scalar("SELECT account_id FROM usernames WHERE hash = ?")
            .bind(hash.as_slice())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        match holder {
            Some(holder) if holder == account.as_bytes() => return Ok(()),
            Some(_) => return Err(StorageError::UsernameTaken),
            None => {}
        }
        sqlx::query("DELETE FROM usernames WHERE account_id = ?")
            .bind(account.as_bytes().as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("INSERT INTO usernames (hash, account_id) VALUES (?, ?)")
            .bind(hash.as_slice())
            .bind(account.as_bytes().as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn lookup_username(&self, hash: &[u8; 32]) -> Result<Option<AccountId>, StorageError> {
        let account: Option<Vec<u8>> = sqlx::query_scalar("SELECT account_id FROM usernames WHERE hash = ?")
            .bind(hash.as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        account
            .map(|a| AccountId::from_slice(&a).map_err(|_| StorageError::Database("corrupt account id".into())))
            .transpose()
    }

    async fn put_profile(&self, account: AccountId, sealed: Ciphertext, now: u64) -> Result<(), StorageError> {
        self.put_sealed(SealedTable::Profiles, account, sealed, now).await
    }

    async fn profile(&self, account: AccountId) -> Result<Option<Ciphertext>, StorageError> {
        self.sealed(SealedTable::Profiles, account).await
    }

    async fn add_key_packages(
        &self,
        device: DeviceId,
        one_time: Vec<Ciphertext>,
        last_resort: Option<Ciphertext>,
    ) -> Result<u64, StorageError> {
        let mut tx = self.write().await?;
        for key_package in one_time {
            sqlx::query("INSERT INTO key_packages (device_id, key_package, last_resort) VALUES (?, ?, 0)")
                .bind(device.as_bytes().as_slice())
                .bind(key_package.0)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        if let Some(key_package) = last_resort {
            sqlx::query("DELETE FROM key_packages WHERE device_id = ? AND last_resort = 1")
                .bind(device.as_bytes().as_slice())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            sqlx::query("INSERT INTO key_packages (device_id, key_package, last_resort) VALUES (?, ?, 1)")
                .bind(device.as_bytes().as_slice())
                .bind(key_package.0)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM key_packages WHERE device_id = ? AND last_resort = 0")
                .bind(device.as_bytes().as_slice())
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(to_u64(count))
    }

    async fn key_package_count(&self, device: DeviceId) -> Result<u64, StorageError> {
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM key_packages WHERE device_id = ? AND last_resort = 0")
                .bind(device.as_bytes().as_slice())
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
        Ok(to_u64(count))
    }

    async fn claim_key_packages(
        &self,
        accounts: &[AccountId],
        only: &[DeviceId],
    ) -> Result<Vec<(AccountId, DeviceId, Ciphertext)>, StorageError> {
        let mut tx = self.write().await?;
        let mut claimed = Vec::new();
        for account in accounts {
            let devices: Vec<Vec<u8>> = sqlx::query_scalar(
                "SELECT id FROM devices WHERE account_id = ? AND removed_at IS NULL ORDER BY created_at, id",
            )
            .bind(account.as_bytes().as_slice())
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            if devices.is_empty() {
                return Err(StorageError::UnknownAccount);
            }
            let wanted = devices
                .into_iter()
                .filter(|d| only.is_empty() || only.iter().any(|o| o.as_bytes().as_slice() == d.as_slice()));
            for device in wanted {
                // One-time packages first (oldest first); the last-resort one only when none is left.
                let row = sqlx::query(
                    "SELECT id, key_package, last_resort FROM key_packages WHERE device_id = ? ORDER BY last_resort, id LIMIT 1",
                )
                .bind(&device)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .ok_or(StorageError::NoKeyPackage)?;
                let id: i64 = row.get(0);
                if row.get::<i64, _>(2) == 0 {
                    sqlx::query("DELETE FROM key_packages WHERE id = ?")
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                let device =
                    DeviceId::from_slice(&device).map_err(|_| StorageError::Database("corrupt device id".into()))?;
                claimed.push((*account, device, Ciphertext(row.get(1))));
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(claimed)
    }

    async fn submit(&self, submission: Submission) -> Result<SubmitOutcome, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Write::Submit(Box::new(submission), reply)).await?;
        answer.await.map_err(|_| writer_stopped())?
    }

    async fn fetch(&self, device: DeviceId, after_seq: u64, limit: u32) -> Result<Vec<Envelope>, StorageError> {
        // Every delivery round asks this: read inline (see `Readers`). A round stops after
        // MAX_FETCH_BYTES (with at least one envelope), so a mailbox of large commits and
        // Welcomes neither holds the task long nor takes much memory; the next round continues.
        self.readers.with(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT mb.seq, m.body, m.received_at FROM mailbox mb JOIN messages m ON m.id = mb.message_id
                 WHERE mb.device_id = ? AND mb.seq > ? ORDER BY mb.seq LIMIT ?",
            )?;
            let mut rows = statement.query(rusqlite::params![
                device.as_bytes().as_slice(),
                to_i64(after_seq),
                i64::from(limit)
            ])?;
            let mut envelopes = Vec::new();
            let mut bytes = 0;
            while let Some(row) = rows.next()? {
                let body: Vec<u8> = row.get(1)?;
                bytes += body.len();
                envelopes.push(Envelope {
                    seq: to_u64(row.get(0)?),
                    body: Ciphertext(body),
                    received_at: to_u64(row.get(2)?),
                });
                if bytes >= MAX_FETCH_BYTES {
                    break;
                }
            }
            Ok(envelopes)
        })
    }

    async fn acknowledge(&self, device: DeviceId, seqs: &[u64]) -> Result<u64, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Write::Acknowledge(device, seqs.to_vec(), reply)).await?;
        answer.await.map_err(|_| writer_stopped())?
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, StorageError> {
        let mut tx = self.write().await?;
        let envelopes =
            sqlx::query("DELETE FROM mailbox WHERE message_id IN (SELECT id FROM messages WHERE expires_at <= ?)")
                .bind(to_i64(now))
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
        sqlx::query("DELETE FROM messages WHERE expires_at <= ?")
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("DELETE FROM submissions WHERE expires_at <= ?")
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        for table in ["links", "invites"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE expires_at <= ?"
            )))
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(envelopes)
    }

    async fn stats(&self) -> Result<StorageStats, StorageError> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM accounts), (SELECT COUNT(*) FROM devices WHERE removed_at IS NULL), (SELECT COUNT(*) FROM mailbox)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(StorageStats {
            accounts: to_u64(row.get(0)),
            devices: to_u64(row.get(1)),
            queued_envelopes: to_u64(row.get(2)),
        })
    }

    async fn create_link(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        sealed: Ciphertext,
        now: u64,
        expires_at: u64,
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO links (token_hash, account_id, sealed, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(token_hash.as_slice())
        .bind(account.as_bytes().as_slice())
        .bind(sealed.0)
        .bind(to_i64(now))
        .bind(to_i64(expires_at))
        .execute(&mut *tx)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_unique_violation() => StorageError::UnknownLink,
            other => db(other),
        })?;
        tx.commit().await.map_err(db)
    }

    async fn open_link(&self, token_hash: &[u8; 32], now: u64) -> Result<(AccountId, Ciphertext), StorageError> {
        let row = sqlx::query(
            "SELECT account_id, sealed FROM links WHERE token_hash = ? AND device_id IS NULL AND expires_at > ?",
        )
        .bind(token_hash.as_slice())
        .bind(to_i64(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or(StorageError::UnknownLink)?;
        let account: Vec<u8> = row.get(0);
        Ok((account_id(&account)?, Ciphertext(row.get(1))))
    }

    async fn link_device(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        device: DeviceId,
        secret_hash: &[u8; 32],
        one_time: Vec<Ciphertext>,
        last_resort: Option<Ciphertext>,
        now: u64,
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        // The slot is consumed and its sealed bundle dropped in the same transaction.
        let consumed = sqlx::query(
            "UPDATE links SET device_id = ?, sealed = NULL
             WHERE token_hash = ? AND account_id = ? AND device_id IS NULL AND expires_at > ?",
        )
        .bind(device.as_bytes().as_slice())
        .bind(token_hash.as_slice())
        .bind(account.as_bytes().as_slice())
        .bind(to_i64(now))
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if consumed != 1 {
            return Err(StorageError::UnknownLink);
        }
        sqlx::query("INSERT INTO devices (id, account_id, secret_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(device.as_bytes().as_slice())
            .bind(account.as_bytes().as_slice())
            .bind(secret_hash.as_slice())
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(d) if d.is_unique_violation() => StorageError::DeviceIdTaken,
                other => db(other),
            })?;
        let packages = one_time
            .into_iter()
            .map(|kp| (kp, 0))
            .chain(last_resort.map(|kp| (kp, 1)));
        for (key_package, last_resort) in packages {
            sqlx::query("INSERT INTO key_packages (device_id, key_package, last_resort) VALUES (?, ?, ?)")
                .bind(device.as_bytes().as_slice())
                .bind(key_package.0)
                .bind(last_resort)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn link_status(&self, token_hash: &[u8; 32], account: AccountId) -> Result<Option<DeviceId>, StorageError> {
        let row: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT device_id FROM links WHERE token_hash = ? AND account_id = ?")
                .bind(token_hash.as_slice())
                .bind(account.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        match row {
            None => Err(StorageError::UnknownLink),
            Some(None) => Ok(None),
            Some(Some(device)) => Ok(Some(device_id(&device)?)),
        }
    }

    async fn set_link_history(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        sealed: Ciphertext,
        expires_at: u64,
    ) -> Result<DeviceId, StorageError> {
        let mut tx = self.write().await?;
        let device: Option<Vec<u8>> = sqlx::query_scalar(
            "UPDATE links SET history = ?, expires_at = ? WHERE token_hash = ? AND account_id = ? AND device_id IS NOT NULL
             RETURNING device_id",
        )
        .bind(sealed.0)
        .bind(to_i64(expires_at))
        .bind(token_hash.as_slice())
        .bind(account.as_bytes().as_slice())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let device = device_id(&device.ok_or(StorageError::UnknownLink)?)?;
        tx.commit().await.map_err(db)?;
        Ok(device)
    }

    async fn link_history(&self, token_hash: &[u8; 32], device: DeviceId) -> Result<Option<Ciphertext>, StorageError> {
        let row: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT history FROM links WHERE token_hash = ? AND device_id = ?")
                .bind(token_hash.as_slice())
                .bind(device.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        row.map(|history| history.map(Ciphertext))
            .ok_or(StorageError::UnknownLink)
    }

    async fn remove_device(&self, account: AccountId, device: DeviceId, now: u64) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        let updated =
            sqlx::query("UPDATE devices SET removed_at = ? WHERE id = ? AND account_id = ? AND removed_at IS NULL")
                .bind(to_i64(now))
                .bind(device.as_bytes().as_slice())
                .bind(account.as_bytes().as_slice())
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
        if updated != 1 {
            return Err(StorageError::NotOwnDevice);
        }
        let id = device.as_bytes().as_slice();
        let message_ids: Vec<i64> = sqlx::query_scalar("DELETE FROM mailbox WHERE device_id = ? RETURNING message_id")
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        for message_id in message_ids {
            sqlx::query(
                "DELETE FROM messages WHERE id = ? AND NOT EXISTS (SELECT 1 FROM mailbox WHERE message_id = ?)",
            )
            .bind(message_id)
            .bind(message_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        for statement in [
            "DELETE FROM key_packages WHERE device_id = ?",
            "DELETE FROM group_members WHERE device_id = ?",
            "DELETE FROM blob_recipients WHERE device_id = ?",
        ] {
            sqlx::query(statement).bind(id).execute(&mut *tx).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn create_invite(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        now: u64,
        expires_at: u64,
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO invites (token_hash, account_id, created_at, expires_at) VALUES (?, ?, ?, ?)")
            .bind(token_hash.as_slice())
            .bind(account.as_bytes().as_slice())
            .bind(to_i64(now))
            .bind(to_i64(expires_at))
            .execute(&mut *tx)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(d) if d.is_unique_violation() => StorageError::InviteUsed,
                other => db(other),
            })?;
        tx.commit().await.map_err(db)
    }

    async fn redeem_invite(&self, token_hash: &[u8; 32], account: AccountId, now: u64) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        let redeemed: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT redeemed_at FROM invites WHERE token_hash = ? AND account_id = ? AND expires_at > ?",
        )
        .bind(token_hash.as_slice())
        .bind(account.as_bytes().as_slice())
        .bind(to_i64(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        match redeemed {
            None => return Err(StorageError::UnknownInvite),
            Some(Some(_)) => return Err(StorageError::InviteUsed),
            Some(None) => {}
        }
        sqlx::query("UPDATE invites SET redeemed_at = ? WHERE token_hash = ?")
            .bind(to_i64(now))
            .bind(token_hash.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn create_blob(&self, blob: &BlobRecord, quota: u64, now: u64) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        let used: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner_account = ?")
            .bind(blob.owner_account.as_bytes().as_slice())
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        if to_u64(used).saturating_add(blob.size) > quota {
            return Err(StorageError::QuotaExceeded { quota });
        }
        if let Some(channel) = blob.channel {
            let owner: Option<Vec<u8>> = sqlx::query_scalar("SELECT owner_account FROM channels WHERE id = ?")
                .bind(channel.as_bytes().as_slice())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
            match owner {
                None => return Err(StorageError::UnknownChannel),
                Some(owner) if owner != blob.owner_account.as_bytes().as_slice() => {
                    return Err(StorageError::NotChannelOwner);
                }
                Some(_) => {}
            }
        }
        let mut live_recipients = 0;
        for recipient in &blob.pending {
            // Like messages, blobs skip devices removed from their account (the sender's
            // group may not have caught up yet); a device that never existed is an error.
            let removed: Option<bool> = sqlx::query_scalar("SELECT removed_at IS NOT NULL FROM devices WHERE id = ?")
                .bind(recipient.as_bytes().as_slice())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
            match removed {
                None => return Err(StorageError::UnknownDevice),
                Some(true) => continue,
                Some(false) => live_recipients += 1,
            }
            sqlx::query("INSERT INTO blob_recipients (blob_id, device_id) VALUES (?, ?)")
                .bind(blob.id.as_bytes().as_slice())
                .bind(recipient.as_bytes().as_slice())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        if live_recipients == 0 && blob.channel.is_none() {
            return Err(StorageError::UnknownDevice);
        }
        sqlx::query(
            "INSERT INTO blobs (id, owner_account, owner_device, size, complete, created_at, expires_at, channel_id)
             VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
        )
        .bind(blob.id.as_bytes().as_slice())
        .bind(blob.owner_account.as_bytes().as_slice())
        .bind(blob.owner_device.as_bytes().as_slice())
        .bind(to_i64(blob.size))
        .bind(to_i64(now))
        .bind(to_i64(blob.expires_at))
        .bind(blob.channel.map(|c| c.as_bytes().to_vec()))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn blob(&self, id: BlobId) -> Result<Option<BlobRecord>, StorageError> {
        let row = sqlx::query(
            "SELECT owner_account, owner_device, size, complete, expires_at, channel_id FROM blobs WHERE id = ?",
        )
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let pending: Vec<Vec<u8>> = sqlx::query_scalar("SELECT device_id FROM blob_recipients WHERE blob_id = ?")
            .bind(id.as_bytes().as_slice())
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        Ok(Some(BlobRecord {
            id,
            owner_account: account_id(&row.get::<Vec<u8>, _>(0))?,
            owner_device: device_id(&row.get::<Vec<u8>, _>(1))?,
            size: to_u64(row.get(2)),
            complete: row.get::<i64, _>(3) != 0,
            pending: pending.iter().map(|d| device_id(d)).collect::<Result<_, _>>()?,
            expires_at: to_u64(row.get(4)),
            channel: row
                .get::<Option<Vec<u8>>, _>(5)
                .map(|c| ChannelId::from_slice(&c).map_err(|_| StorageError::Database("corrupt channel id".into())))
                .transpose()?,
        }))
    }

    async fn complete_blob(&self, id: BlobId) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        let updated = sqlx::query("UPDATE blobs SET complete = 1 WHERE id = ?")
            .bind(id.as_bytes().as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if updated.rows_affected() == 0 {
            return Err(StorageError::UnknownBlob);
        }
        tx.commit().await.map_err(db)
    }

    async fn blob_fetched(&self, id: BlobId, device: DeviceId) -> Result<bool, StorageError> {
        let mut tx = self.write().await?;
        let deleted = sqlx::query("DELETE FROM blob_recipients WHERE blob_id = ? AND device_id = ?")
            .bind(id.as_bytes().as_slice())
            .bind(device.as_bytes().as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        if deleted == 0 {
            return Err(StorageError::NotBlobRecipient);
        }
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blob_recipients WHERE blob_id = ?")
            .bind(id.as_bytes().as_slice())
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(left == 0)
    }

    async fn delete_blob(&self, id: BlobId) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        for statement in [
            "DELETE FROM blob_recipients WHERE blob_id = ?",
            "DELETE FROM blobs WHERE id = ?",
        ] {
            sqlx::query(statement)
                .bind(id.as_bytes().as_slice())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn expired_blobs(&self, now: u64, stale_upload_before: u64) -> Result<Vec<BlobId>, StorageError> {
        let ids: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT id FROM blobs WHERE expires_at <= ? OR (complete = 0 AND created_at <= ?)
                 OR (channel_id IS NULL AND complete = 1
                     AND NOT EXISTS (SELECT 1 FROM blob_recipients r WHERE r.blob_id = blobs.id))
                 OR (channel_id IS NULL AND owner_device IN (SELECT id FROM devices WHERE removed_at IS NOT NULL))",
        )
        .bind(to_i64(now))
        .bind(to_i64(stale_upload_before))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        ids.iter().map(|id| blob_id(id)).collect()
    }

    async fn put_avatar(&self, account: AccountId, sealed: Ciphertext, now: u64) -> Result<(), StorageError> {
        self.put_sealed(SealedTable::Avatars, account, sealed, now).await
    }

    async fn avatar(&self, account: AccountId) -> Result<Option<Ciphertext>, StorageError> {
        self.sealed(SealedTable::Avatars, account).await
    }

    async fn audit_size(&self) -> Result<u64, StorageError> {
        let size: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(to_u64(size))
    }

    async fn audit_leaf_hashes(&self, size: u64) -> Result<Vec<[u8; 32]>, StorageError> {
        let hashes: Vec<Vec<u8>> = sqlx::query_scalar("SELECT leaf_hash FROM audit_log WHERE idx < ? ORDER BY idx")
            .bind(to_i64(size))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        hashes
            .into_iter()
            .map(|hash| {
                hash.try_into()
                    .map_err(|_| StorageError::Database("corrupt audit leaf hash".into()))
            })
            .collect()
    }

    async fn audit_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StorageError> {
        sqlx::query_scalar("SELECT entry FROM audit_log WHERE idx >= ? AND idx < ? ORDER BY idx")
            .bind(to_i64(start))
            .bind(to_i64(end))
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    async fn append_audit(
        &self,
        index: u64,
        entry: &[u8],
        leaf_hash: &[u8; 32],
        signed_head: &str,
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        let size: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        if to_u64(size) != index {
            return Err(StorageError::AuditConflict);
        }
        sqlx::query("INSERT INTO audit_log (idx, entry, leaf_hash) VALUES (?, ?, ?)")
            .bind(to_i64(index))
            .bind(entry)
            .bind(leaf_hash.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("INSERT INTO audit_heads (tree_size, head) VALUES (?, ?)")
            .bind(to_i64(index + 1))
            .bind(signed_head)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn init_audit_head(&self, signed_head: &str) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO audit_heads (tree_size, head) SELECT 0, ? WHERE NOT EXISTS (SELECT 1 FROM audit_heads)",
        )
        .bind(signed_head)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn remember_admin_nonce(&self, nonce: &str, now: u64, forget_at: u64) -> Result<bool, StorageError> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM admin_nonces WHERE forget_at <= ?")
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let fresh = sqlx::query("INSERT OR IGNORE INTO admin_nonces (nonce, forget_at) VALUES (?, ?)")
            .bind(nonce)
            .bind(to_i64(forget_at))
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected()
            == 1;
        tx.commit().await.map_err(db)?;
        Ok(fresh)
    }

    async fn audit_head(&self) -> Result<Option<String>, StorageError> {
        sqlx::query_scalar("SELECT head FROM audit_heads ORDER BY tree_size DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(db)
    }

    async fn audit_key(&self, account: AccountId) -> Result<[u8; 32], StorageError> {
        let id = account.as_bytes().as_slice();
        let mut fresh = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut fresh);
        let mut tx = self.write().await?;
        sqlx::query("UPDATE accounts SET audit_key = ? WHERE id = ? AND audit_key IS NULL")
            .bind(fresh.as_slice())
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let key: Option<Vec<u8>> = sqlx::query_scalar("SELECT audit_key FROM accounts WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        key.ok_or(StorageError::UnknownAccount)?
            .try_into()
            .map_err(|_| StorageError::Database("corrupt audit key".into()))
    }

    async fn account_summaries(&self) -> Result<Vec<AccountSummary>, StorageError> {
        let rows = sqlx::query(
            "SELECT a.id, a.created_at, a.suspended,
                (SELECT COUNT(*) FROM devices d WHERE d.account_id = a.id AND d.removed_at IS NULL),
                (SELECT COUNT(*) FROM mailbox m JOIN devices d ON d.id = m.device_id WHERE d.account_id = a.id),
                (SELECT COALESCE(SUM(LENGTH(g.body)), 0) FROM mailbox m JOIN devices d ON d.id = m.device_id
                    JOIN messages g ON g.id = m.message_id WHERE d.account_id = a.id),
                (SELECT COUNT(*) FROM key_packages k JOIN devices d ON d.id = k.device_id WHERE d.account_id = a.id),
                (SELECT COUNT(*) FROM blobs b WHERE b.owner_account = a.id),
                (SELECT COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.owner_account = a.id),
                COALESCE(a.region, '')
             FROM accounts a ORDER BY a.created_at, a.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                Ok(AccountSummary {
                    account: account_id(&row.get::<Vec<u8>, _>(0))?,
                    created_at: to_u64(row.get(1)),
                    suspended: row.get::<i64, _>(2) != 0,
                    devices: to_u64(row.get(3)),
                    queued_envelopes: to_u64(row.get(4)),
                    queued_bytes: to_u64(row.get(5)),
                    key_packages: to_u64(row.get(6)),
                    blobs: to_u64(row.get(7)),
                    blob_bytes: to_u64(row.get(8)),
                    region: row.get(9),
                })
            })
            .collect()
    }

    async fn set_suspended(&self, account: AccountId, suspended: bool) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        let updated = sqlx::query("UPDATE accounts SET suspended = ? WHERE id = ?")
            .bind(i64::from(suspended))
            .bind(account.as_bytes().as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        if updated != 1 {
            return Err(StorageError::UnknownAccount);
        }
        tx.commit().await.map_err(db)
    }

    async fn purge_account(&self, account: AccountId) -> Result<Vec<BlobId>, StorageError> {
        let id = account.as_bytes().as_slice();
        let mut tx = self.write().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        if exists.is_none() {
            return Err(StorageError::UnknownAccount);
        }
        // Every statement takes the account id as its one parameter.
        for statement in [
            "DELETE FROM mailbox WHERE device_id IN (SELECT id FROM devices WHERE account_id = ?)",
            "DELETE FROM key_packages WHERE device_id IN (SELECT id FROM devices WHERE account_id = ?)",
            "DELETE FROM group_members WHERE device_id IN (SELECT id FROM devices WHERE account_id = ?)",
            "DELETE FROM blob_recipients WHERE device_id IN (SELECT id FROM devices WHERE account_id = ?)",
            "DELETE FROM submissions WHERE sender_device IN (SELECT id FROM devices WHERE account_id = ?)",
            "UPDATE channels SET subscribers = subscribers - 1
             WHERE id IN (SELECT channel_id FROM channel_subscriptions WHERE account_id = ?)",
            "DELETE FROM channel_subscriptions WHERE account_id = ?",
            "DELETE FROM channel_subscriptions WHERE channel_id IN (SELECT id FROM channels WHERE owner_account = ?)",
            "DELETE FROM channel_posts WHERE channel_id IN (SELECT id FROM channels WHERE owner_account = ?)",
            // The blob records stay for the caller to delete the bytes (below); they no longer
            // belong to a channel.
            "UPDATE blobs SET channel_id = NULL WHERE owner_account = ?",
            "DELETE FROM channels WHERE owner_account = ?",
            "DELETE FROM links WHERE account_id = ?",
            "DELETE FROM invites WHERE account_id = ?",
            "DELETE FROM usernames WHERE account_id = ?",
            "DELETE FROM profiles WHERE account_id = ?",
            "DELETE FROM avatars WHERE account_id = ?",
            "DELETE FROM devices WHERE account_id = ?",
            "DELETE FROM accounts WHERE id = ?",
        ] {
            sqlx::query(statement).bind(id).execute(&mut *tx).await.map_err(db)?;
        }
        sqlx::query("DELETE FROM messages WHERE NOT EXISTS (SELECT 1 FROM mailbox WHERE message_id = messages.id)")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let blobs: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id FROM blobs WHERE owner_account = ?")
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        blobs.iter().map(|blob| blob_id(blob)).collect()
    }

    async fn create_report(&self, sealed: Ciphertext, now: u64) -> Result<u64, StorageError> {
        let mut tx = self.write().await?;
        let id: i64 = sqlx::query_scalar("INSERT INTO reports (sealed, created_at) VALUES (?, ?) RETURNING id")
            .bind(sealed.0)
            .bind(to_i64(now))
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(to_u64(id))
    }

    async fn reports(&self) -> Result<Vec<ReportSummary>, StorageError> {
        let rows = sqlx::query("SELECT id, created_at, LENGTH(sealed) FROM reports ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|row| ReportSummary {
                id: to_u64(row.get(0)),
                created_at: to_u64(row.get(1)),
                size: to_u64(row.get(2)),
            })
            .collect())
    }

    async fn report(&self, id: u64) -> Result<Option<Ciphertext>, StorageError> {
        let sealed: Option<Vec<u8>> = sqlx::query_scalar("SELECT sealed FROM reports WHERE id = ?")
            .bind(to_i64(id))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(sealed.map(Ciphertext))
    }

    async fn create_channel(
        &self,
        channel: ChannelId,
        owner: AccountId,
        sealed_info: Ciphertext,
        now: u64,
        limits: ChannelLimits,
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        let owned: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM channels WHERE owner_account = ?")
            .bind(owner.as_bytes().as_slice())
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        if to_u64(owned) >= limits.owned {
            return Err(StorageError::TooMany {
                what: "channels",
                limit: limits.owned,
            });
        }
        let inserted = sqlx::query(
            "INSERT INTO channels (id, owner_account, sealed_info, created_at) VALUES (?, ?, ?, ?)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(channel.as_bytes().as_slice())
        .bind(owner.as_bytes().as_slice())
        .bind(sealed_info.0)
        .bind(to_i64(now))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if inserted.rows_affected() == 0 {
            return Err(StorageError::ChannelExists);
        }
        tx.commit().await.map_err(db)
    }

    async fn update_channel_info(
        &self,
        channel: ChannelId,
        owner: AccountId,
        sealed_info: Ciphertext,
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        channel_owned_by(&mut tx, channel, owner).await?;
        sqlx::query("UPDATE channels SET sealed_info = ? WHERE id = ?")
            .bind(sealed_info.0)
            .bind(channel.as_bytes().as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn channel(&self, channel: ChannelId) -> Result<Option<ChannelRecord>, StorageError> {
        let row = sqlx::query("SELECT owner_account, sealed_info, latest_seq, subscribers FROM channels WHERE id = ?")
            .bind(channel.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(|row| {
            Ok(ChannelRecord {
                owner: account_id(row.get::<&[u8], _>(0))?,
                sealed_info: Ciphertext(row.get(1)),
                latest_seq: to_u64(row.get(2)),
                subscribers: to_u64(row.get(3)),
            })
        })
        .transpose()
    }

    async fn add_channel_post(
        &self,
        channel: ChannelId,
        owner: AccountId,
        post: &StoredChannelPost,
    ) -> Result<bool, StorageError> {
        let id = channel.as_bytes().as_slice();
        let mut tx = self.write().await?;
        let latest = channel_owned_by(&mut tx, channel, owner).await?;
        if post.seq != latest + 1 {
            // An identical retry of a stored post is a success that changes nothing.
            let stored: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT sealed_post FROM channel_posts WHERE channel_id = ? AND seq = ?")
                    .bind(id)
                    .bind(to_i64(post.seq))
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            return match stored {
                Some(bytes) if bytes == post.sealed_post.0 => Ok(false),
                _ => Err(StorageError::ChannelSeqConflict { latest }),
            };
        }
        sqlx::query("INSERT INTO channel_posts (channel_id, seq, sealed_post, posted_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(to_i64(post.seq))
            .bind(post.sealed_post.0.as_slice())
            .bind(to_i64(post.posted_at))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("UPDATE channels SET latest_seq = ? WHERE id = ?")
            .bind(to_i64(post.seq))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn channel_posts(
        &self,
        channel: ChannelId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredChannelPost>, StorageError> {
        // Every subscriber coming online reads here: inline, like the mailbox.
        let (exists, posts) = self.readers.with(|conn| {
            let posts = conn
                .prepare_cached(
                    "SELECT seq, sealed_post, posted_at FROM channel_posts
                     WHERE channel_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                )?
                .query_map(
                    rusqlite::params![channel.as_bytes().as_slice(), to_i64(after), i64::from(limit)],
                    |row| {
                        Ok(StoredChannelPost {
                            seq: to_u64(row.get(0)?),
                            sealed_post: Ciphertext(row.get(1)?),
                            posted_at: to_u64(row.get(2)?),
                        })
                    },
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let exists = !posts.is_empty()
                || conn
                    .prepare_cached("SELECT 1 FROM channels WHERE id = ?")?
                    .exists([channel.as_bytes().as_slice()])?;
            Ok((exists, posts))
        })?;
        if !exists {
            return Err(StorageError::UnknownChannel);
        }
        Ok(posts)
    }

    async fn set_subscription(
        &self,
        channel: ChannelId,
        account: AccountId,
        subscribed: bool,
        now: u64,
        limits: ChannelLimits,
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM channels WHERE id = ?")
            .bind(channel.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        if exists.is_none() {
            return Err(StorageError::UnknownChannel);
        }
        if subscribed {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM channel_subscriptions WHERE account_id = ?")
                .bind(account.as_bytes().as_slice())
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
            let inserted = sqlx::query(
                "INSERT INTO channel_subscriptions (channel_id, account_id, created_at) VALUES (?, ?, ?)
                 ON CONFLICT (channel_id, account_id) DO NOTHING",
            )
            .bind(channel.as_bytes().as_slice())
            .bind(account.as_bytes().as_slice())
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            // A new subscription beyond the limit is refused (the transaction rolls back).
            if inserted.rows_affected() == 1 && to_u64(count) >= limits.subscriptions {
                return Err(StorageError::TooMany {
                    what: "channel subscriptions",
                    limit: limits.subscriptions,
                });
            }
            if inserted.rows_affected() == 1 {
                adjust_subscribers(&mut tx, channel, 1).await?;
            }
        } else {
            let deleted = sqlx::query("DELETE FROM channel_subscriptions WHERE channel_id = ? AND account_id = ?")
                .bind(channel.as_bytes().as_slice())
                .bind(account.as_bytes().as_slice())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            if deleted.rows_affected() == 1 {
                adjust_subscribers(&mut tx, channel, -1).await?;
            }
        }
        tx.commit().await.map_err(db)
    }

    async fn subscriptions(&self, account: AccountId) -> Result<Vec<ChannelId>, StorageError> {
        let rows: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT channel_id FROM channel_subscriptions WHERE account_id = ?")
                .bind(account.as_bytes().as_slice())
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        rows.iter()
            .map(|id| ChannelId::from_slice(id).map_err(|_| StorageError::Database("corrupt channel id".into())))
            .collect()
    }

    // --- key directory ------------------------------------------------------------------------

    async fn kt_write(
        &self,
        _node: &[u8; 16],
        nodes: Vec<(Vec<u8>, Vec<u8>)>,
        states: Vec<KeyDirectoryState>,
    ) -> Result<(), StorageError> {
        // One process owns a SQLite file, and its publisher runs one epoch at a time.
        let mut tx = self.write().await?;
        for (key, record) in &nodes {
            sqlx::query("INSERT INTO kt_nodes (key, record) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET record = excluded.record")
                .bind(key.as_slice())
                .bind(record.as_slice())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        for state in &states {
            sqlx::query(
                "INSERT INTO kt_states (label, epoch, version, record) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (label, epoch) DO UPDATE SET version = excluded.version, record = excluded.record",
            )
            .bind(state.label.as_slice())
            .bind(to_i64(state.epoch))
            .bind(to_i64(state.version))
            .bind(state.record.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn kt_nodes(&self, keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(IN_LIST_CHUNK) {
            let sql = format!(
                "SELECT key, record FROM kt_nodes WHERE key IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query_as::<_, (Vec<u8>, Vec<u8>)>(sqlx::AssertSqlSafe(sql));
            for key in chunk {
                query = query.bind(key.as_slice());
            }
            found.extend(query.fetch_all(&self.pool).await.map_err(db)?);
        }
        Ok(found)
    }

    async fn kt_states(&self, labels: &[Vec<u8>]) -> Result<Vec<KeyDirectoryState>, StorageError> {
        let mut found = Vec::new();
        for chunk in labels.chunks(IN_LIST_CHUNK) {
            let sql = format!(
                "SELECT label, epoch, version, record FROM kt_states WHERE label IN ({}) ORDER BY label, epoch",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query_as::<_, (Vec<u8>, i64, i64, Vec<u8>)>(sqlx::AssertSqlSafe(sql));
            for label in chunk {
                query = query.bind(label.as_slice());
            }
            for (label, epoch, version, record) in query.fetch_all(&self.pool).await.map_err(db)? {
                found.push(KeyDirectoryState {
                    label,
                    epoch: to_u64(epoch),
                    version: to_u64(version),
                    record,
                });
            }
        }
        Ok(found)
    }

    async fn kt_pending(&self, limit: u32) -> Result<Vec<KeyDirectoryPending>, StorageError> {
        let rows: Vec<(i64, Vec<u8>, i64)> =
            sqlx::query_as("SELECT kind, id, generation FROM kt_pending ORDER BY kind, id LIMIT ?")
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        rows.into_iter()
            .map(|(kind, id, generation)| {
                Ok(KeyDirectoryPending {
                    kind: KeyDirectoryKind::from_db(kind)?,
                    id,
                    generation: to_u64(generation),
                })
            })
            .collect()
    }

    async fn kt_clear_pending(&self, published: &[KeyDirectoryPending]) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        for mark in published {
            sqlx::query("DELETE FROM kt_pending WHERE kind = ? AND id = ? AND generation = ?")
                .bind(mark.kind as i64)
                .bind(mark.id.as_slice())
                .bind(to_i64(mark.generation))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn device_keys(
        &self,
        account: AccountId,
    ) -> Result<Option<(Vec<u8>, Vec<(DeviceId, Vec<u8>)>)>, StorageError> {
        let identity: Option<Vec<u8>> = sqlx::query_scalar("SELECT identity_key FROM accounts WHERE id = ?")
            .bind(account.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        let Some(identity_key) = identity else { return Ok(None) };
        let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT id, signature_key FROM devices \
             WHERE account_id = ? AND removed_at IS NULL AND signature_key IS NOT NULL ORDER BY id",
        )
        .bind(account.as_bytes().as_slice())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let devices = rows
            .into_iter()
            .map(|(id, key)| Ok((device_id(&id)?, key)))
            .collect::<Result<_, StorageError>>()?;
        Ok(Some((identity_key, devices)))
    }

    async fn set_signature_key(&self, device: DeviceId, key: &[u8]) -> Result<Vec<u8>, StorageError> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE devices SET signature_key = ? WHERE id = ? AND signature_key IS NULL")
            .bind(key)
            .bind(device.as_bytes().as_slice())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let stored: Option<Option<Vec<u8>>> = sqlx::query_scalar("SELECT signature_key FROM devices WHERE id = ?")
            .bind(device.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        stored.flatten().ok_or(StorageError::UnknownDevice)
    }

    async fn kt_lease(&self, _node: &[u8; 16], _now: u64, _ttl_ms: u64) -> Result<bool, StorageError> {
        // One process owns a SQLite file.
        Ok(true)
    }

    async fn kt_release_lease(&self, _node: &[u8; 16]) -> Result<(), StorageError> {
        Ok(())
    }

    async fn set_link_proof(&self, token_hash: &[u8; 32], proof: &[u8]) -> Result<(), StorageError> {
        sqlx::query("UPDATE links SET link_proof = ? WHERE token_hash = ? AND link_proof IS NULL")
            .bind(proof)
            .bind(token_hash.as_slice())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn link_proof(&self, token_hash: &[u8; 32], account: AccountId) -> Result<Option<Vec<u8>>, StorageError> {
        let proof: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT link_proof FROM links WHERE token_hash = ? AND account_id = ?")
                .bind(token_hash.as_slice())
                .bind(account.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(proof.flatten())
    }

    async fn devices_without_signature_key(&self) -> Result<Vec<(DeviceId, Ciphertext)>, StorageError> {
        let rows = sqlx::query_as(DEVICES_WITHOUT_SIGNATURE_KEY)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        devices_with_key_packages(rows)
    }

    async fn kt_put_head(&self, epoch: u64, head: &str) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO kt_heads (epoch, head) VALUES (?, ?) ON CONFLICT (epoch) DO NOTHING")
            .bind(to_i64(epoch))
            .bind(head)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn kt_heads(&self, from: u64, limit: u32) -> Result<Vec<String>, StorageError> {
        sqlx::query_scalar("SELECT head FROM kt_heads WHERE epoch >= ? ORDER BY epoch LIMIT ?")
            .bind(to_i64(from))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    async fn kt_latest_head(&self) -> Result<Option<(u64, String)>, StorageError> {
        let row: Option<(i64, String)> = sqlx::query_as("SELECT epoch, head FROM kt_heads ORDER BY epoch DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(row.map(|(epoch, head)| (to_u64(epoch), head)))
    }

    async fn residency(&self, account: AccountId) -> Result<Option<Residency>, StorageError> {
        let row: Option<(Option<String>, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT region, relocating_to, relocating_from FROM accounts WHERE id = ?")
                .bind(account.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        Ok(row.map(|(region, to, from)| Residency::from_columns(region, to, from)))
    }

    async fn set_residency(
        &self,
        account: AccountId,
        expected: &Residency,
        next: &Residency,
    ) -> Result<bool, StorageError> {
        let (region, to, from) = next.columns();
        let (was_region, was_to, was_from) = expected.columns();
        let mut tx = self.write().await?;
        let updated = sqlx::query(
            "UPDATE accounts SET region = ?, relocating_to = ?, relocating_from = ?
             WHERE id = ? AND region IS ? AND relocating_to IS ? AND relocating_from IS ?",
        )
        .bind(region)
        .bind(to)
        .bind(from)
        .bind(account.as_bytes().as_slice())
        .bind(was_region)
        .bind(was_to)
        .bind(was_from)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        tx.commit().await.map_err(db)?;
        Ok(updated == 1)
    }

    async fn in_transit(
        &self,
        region: &str,
        devices: Option<&[DeviceId]>,
        limit: u32,
    ) -> Result<Vec<StoredEnvelope>, StorageError> {
        use rusqlite::types::Value;
        // Asked after every submission while regions are configured: read inline (see
        // `Readers`). Only devices of accounts living in `region` match; most submissions find
        // none, through the partial index on accounts' regions.
        // The region is written into the statement, not bound: this SQLite plans with index
        // statistics (STAT4), and a statement whose plan may depend on a bound value is prepared
        // again at every execution. Region names are a-z, 0-9, '-' and '_' (checked at start).
        if !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(StorageError::Database(format!("invalid region name {region:?}")));
        }
        let select = format!(
            "SELECT mb.device_id, mb.seq, m.id, m.body, m.received_at, m.expires_at
             FROM accounts a JOIN devices d ON d.account_id = a.id JOIN mailbox mb ON mb.device_id = d.id
             JOIN messages m ON m.id = mb.message_id
             WHERE a.region = '{region}' AND a.relocating_to IS NULL AND a.relocating_from IS NULL"
        );
        let mut queries: Vec<(String, Vec<Value>)> = Vec::new();
        match devices {
            None => queries.push((
                format!("{select} ORDER BY mb.seq LIMIT ?"),
                vec![Value::Integer(i64::from(limit))],
            )),
            Some(devices) => {
                for chunk in devices.chunks(IN_LIST_CHUNK) {
                    let mut params: Vec<Value> = chunk.iter().map(|d| Value::Blob(d.as_bytes().to_vec())).collect();
                    params.push(Value::Integer(i64::from(limit)));
                    queries.push((
                        format!(
                            "{select} AND d.id IN ({}) ORDER BY mb.seq LIMIT ?",
                            placeholders(chunk.len())
                        ),
                        params,
                    ));
                }
            }
        }
        type Row = (Vec<u8>, i64, i64, Vec<u8>, i64, i64);
        let rows: Vec<Row> = self.readers.with(|conn| {
            let mut rows = Vec::new();
            for (sql, params) in &queries {
                let mut statement = conn.prepare_cached(sql)?;
                let found = statement.query_map(rusqlite::params_from_iter(params.iter()), |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                        row.get(5)?,
                    ))
                })?;
                for row in found {
                    rows.push(row?);
                }
            }
            Ok(rows)
        })?;
        let mut envelopes = rows
            .into_iter()
            .map(|(device, seq, message_id, body, received_at, expires_at)| {
                Ok(StoredEnvelope {
                    device: device_id(&device)?,
                    seq: to_u64(seq),
                    message_id: to_u64(message_id),
                    body: Ciphertext(body),
                    received_at: to_u64(received_at),
                    expires_at: to_u64(expires_at),
                })
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        envelopes.sort_by_key(|e| e.seq);
        envelopes.truncate(limit as usize);
        Ok(envelopes)
    }

    async fn settle_forwarded(&self, region: &str, envelopes: &[(DeviceId, u64)]) -> Result<u64, StorageError> {
        let mut tx = self.write().await?;
        let mut message_ids = Vec::new();
        for (device, seq) in envelopes {
            let deleted: Option<i64> = sqlx::query_scalar(
                "DELETE FROM mailbox WHERE device_id = ? AND seq = ? AND device_id IN (
                     SELECT d.id FROM devices d JOIN accounts a ON a.id = d.account_id
                     WHERE a.region = ? AND a.relocating_to IS NULL AND a.relocating_from IS NULL)
                 RETURNING message_id",
            )
            .bind(device.as_bytes().as_slice())
            .bind(to_i64(*seq))
            .bind(region)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            message_ids.extend(deleted);
        }
        let deleted = message_ids.len() as u64;
        delete_unreferenced(&mut tx, &message_ids).await?;
        tx.commit().await.map_err(db)?;
        Ok(deleted)
    }

    async fn export_envelopes(
        &self,
        device: DeviceId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEnvelope>, StorageError> {
        let rows = sqlx::query(
            "SELECT mb.device_id, mb.seq, m.id, m.body, m.received_at, m.expires_at
             FROM mailbox mb JOIN messages m ON m.id = mb.message_id
             WHERE mb.device_id = ? AND mb.seq > ? ORDER BY mb.seq LIMIT ?",
        )
        .bind(device.as_bytes().as_slice())
        .bind(to_i64(after_seq))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(|row| stored_envelope(row, 0)).collect()
    }

    async fn import_envelopes(&self, envelopes: &[StoredEnvelope]) -> Result<u64, StorageError> {
        let mut tx = self.write().await?;
        let mut imported = 0;
        for envelope in envelopes {
            sqlx::query(
                "INSERT INTO messages (id, body, received_at, expires_at) VALUES (?, ?, ?, ?)
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(to_i64(envelope.message_id))
            .bind(envelope.body.0.as_slice())
            .bind(to_i64(envelope.received_at))
            .bind(to_i64(envelope.expires_at))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            // SQLite numbers envelopes by one global sequence, so the number alone is the key.
            imported += sqlx::query(
                "INSERT INTO mailbox (seq, device_id, message_id) VALUES (?, ?, ?) ON CONFLICT (seq) DO NOTHING",
            )
            .bind(to_i64(envelope.seq))
            .bind(envelope.device.as_bytes().as_slice())
            .bind(to_i64(envelope.message_id))
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        }
        tx.commit().await.map_err(db)?;
        Ok(imported)
    }

    async fn delete_mailboxes(&self, devices: &[DeviceId]) -> Result<u64, StorageError> {
        let mut tx = self.write().await?;
        let mut message_ids = Vec::new();
        for device in devices {
            let ids: Vec<i64> = sqlx::query_scalar("DELETE FROM mailbox WHERE device_id = ? RETURNING message_id")
                .bind(device.as_bytes().as_slice())
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
            message_ids.extend(ids);
        }
        let deleted = message_ids.len() as u64;
        delete_unreferenced(&mut tx, &message_ids).await?;
        tx.commit().await.map_err(db)?;
        Ok(deleted)
    }

    async fn export_key_packages(&self, devices: &[DeviceId]) -> Result<Vec<StoredKeyPackage>, StorageError> {
        let mut packages = Vec::new();
        for device in devices {
            let rows: Vec<(Vec<u8>, i64)> =
                sqlx::query_as("SELECT key_package, last_resort FROM key_packages WHERE device_id = ? ORDER BY id")
                    .bind(device.as_bytes().as_slice())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
            packages.extend(rows.into_iter().map(|(key_package, last_resort)| StoredKeyPackage {
                device: *device,
                key_package: Ciphertext(key_package),
                last_resort: last_resort != 0,
            }));
        }
        Ok(packages)
    }

    async fn replace_key_packages(
        &self,
        devices: &[DeviceId],
        packages: &[StoredKeyPackage],
    ) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        for device in devices {
            sqlx::query("DELETE FROM key_packages WHERE device_id = ?")
                .bind(device.as_bytes().as_slice())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        for package in packages {
            sqlx::query("INSERT INTO key_packages (device_id, key_package, last_resort) VALUES (?, ?, ?)")
                .bind(package.device.as_bytes().as_slice())
                .bind(package.key_package.0.as_slice())
                .bind(i64::from(package.last_resort))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn claim_device_key_packages(
        &self,
        devices: &[DeviceId],
    ) -> Result<Vec<(DeviceId, Ciphertext)>, StorageError> {
        let mut tx = self.write().await?;
        let mut claimed = Vec::new();
        for device in devices {
            let (id, key_package, last_resort): (i64, Vec<u8>, i64) = sqlx::query_as(
                "SELECT id, key_package, last_resort FROM key_packages WHERE device_id = ? ORDER BY last_resort, id LIMIT 1",
            )
            .bind(device.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?
            .ok_or(StorageError::NoKeyPackage)?;
            if last_resort == 0 {
                sqlx::query("DELETE FROM key_packages WHERE id = ?")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
            }
            claimed.push((*device, Ciphertext(key_package)));
        }
        tx.commit().await.map_err(db)?;
        Ok(claimed)
    }

    async fn delete_sealed(&self, account: AccountId) -> Result<(), StorageError> {
        let mut tx = self.write().await?;
        for statement in [
            "DELETE FROM profiles WHERE account_id = ?",
            "DELETE FROM avatars WHERE account_id = ?",
        ] {
            sqlx::query(statement)
                .bind(account.as_bytes().as_slice())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn scrub(&self) -> Result<(), StorageError> {
        // Older page versions live on in the write-ahead log until it is checkpointed and reset.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn blobs_owned(&self, account: AccountId) -> Result<Vec<BlobId>, StorageError> {
        let ids: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id FROM blobs WHERE owner_account = ? ORDER BY id")
            .bind(account.as_bytes().as_slice())
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        ids.iter().map(|id| blob_id(id)).collect()
    }
}

/// A [`StoredEnvelope`] from columns device, seq, message id, body, received, expires (from
/// column `first` on).
fn stored_envelope(row: &sqlx::sqlite::SqliteRow, first: usize) -> Result<StoredEnvelope, StorageError> {
    Ok(StoredEnvelope {
        device: device_id(&row.get::<Vec<u8>, _>(first))?,
        seq: to_u64(row.get(first + 1)),
        message_id: to_u64(row.get(first + 2)),
        body: Ciphertext(row.get(first + 3)),
        received_at: to_u64(row.get(first + 4)),
        expires_at: to_u64(row.get(first + 5)),
    })
}

/// Deletes those of `message_ids` that no envelope refers to any more.
async fn delete_unreferenced(tx: &mut Transaction<'static, Sqlite>, message_ids: &[i64]) -> Result<(), StorageError> {
    for message_id in message_ids {
        sqlx::query("DELETE FROM messages WHERE id = ? AND NOT EXISTS (SELECT 1 FROM mailbox WHERE message_id = ?)")
            .bind(message_id)
            .bind(message_id)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
    }
    Ok(())
}

/// Keys per `IN (…)` list: far below SQLite's limit on bound parameters.
const IN_LIST_CHUNK: usize = 500;

/// `?, ?, …` for an `IN` list.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

async fn adjust_subscribers(
    tx: &mut Transaction<'static, Sqlite>,
    channel: ChannelId,
    by: i64,
) -> Result<(), StorageError> {
    sqlx::query("UPDATE channels SET subscribers = subscribers + ? WHERE id = ?")
        .bind(by)
        .bind(channel.as_bytes().as_slice())
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    Ok(())
}

/// The channel's newest post number, if `owner` owns it.
async fn channel_owned_by(
    tx: &mut Transaction<'static, Sqlite>,
    channel: ChannelId,
    owner: AccountId,
) -> Result<u64, StorageError> {
    let row = sqlx::query("SELECT owner_account, latest_seq FROM channels WHERE id = ?")
        .bind(channel.as_bytes().as_slice())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?
        .ok_or(StorageError::UnknownChannel)?;
    if row.get::<&[u8], _>(0) != owner.as_bytes().as_slice() {
        return Err(StorageError::NotChannelOwner);
    }
    Ok(to_u64(row.get(1)))
}

// --- The hot write path -------------------------------------------------------------------
//
// Message submissions and acknowledgements go to one writer thread with its own rusqlite
// connection. sqlx's SQLite driver runs every statement on a worker thread and hands results
// back through a channel; with about ten statements per submission, those hand-offs, not SQLite,
// capped a serial writer at about 2,400 submissions per second here. On its own thread the
// writer calls SQLite directly, and it commits many writes per transaction (group commit).

/// Most writes committed in one transaction.
const MAX_WRITES_PER_COMMIT: usize = 512;

/// A write waiting for the writer thread, and where its outcome goes.
pub(crate) enum Write {
    Submit(Box<Submission>, oneshot::Sender<Result<SubmitOutcome, StorageError>>),
    Acknowledge(DeviceId, Vec<u64>, oneshot::Sender<Result<u64, StorageError>>),
}

enum Outcome {
    Submit(SubmitOutcome),
    Acknowledge(u64),
}

fn writer_stopped() -> StorageError {
    StorageError::Database("the storage writer stopped".into())
}

fn sql(error: rusqlite::Error) -> StorageError {
    StorageError::Database(error.to_string())
}

/// Starts the writer thread on the (already migrated) database file.
fn spawn_writer(path: &Path) -> Result<mpsc::Sender<Write>, StorageError> {
    let conn = rusqlite::Connection::open(path).map_err(sql)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
    conn.pragma_update(None, "foreign_keys", true).map_err(sql)?;
    conn.pragma_update(None, "secure_delete", true).map_err(sql)?;
    let (writes, queue) = mpsc::channel(4 * MAX_WRITES_PER_COMMIT);
    std::thread::Builder::new()
        .name("fumi-sqlite-writer".into())
        .spawn(move || writer(conn, queue))
        .map_err(|e| StorageError::Database(e.to_string()))?;
    Ok(writes)
}

/// Group commit: takes every write waiting, applies each inside its own savepoint (so a refused
/// one changes nothing and does not affect the others) in one transaction, and answers them all
/// after the one `COMMIT` — one fsync — made them durable. Ends when every sender is dropped.
fn writer(mut conn: rusqlite::Connection, mut queue: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_WRITES_PER_COMMIT);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_WRITES_PER_COMMIT {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        write_batch(&mut conn, std::mem::take(&mut batch));
    }
}

fn write_batch(conn: &mut rusqlite::Connection, batch: Vec<Write>) {
    let result = (|| {
        let mut tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for write in &batch {
            let savepoint = tx.savepoint().map_err(sql)?;
            let outcome = write.apply(&savepoint);
            if outcome.is_ok() {
                savepoint.commit().map_err(sql)?;
            } else {
                drop(savepoint); // rolled back and released
                // Some errors (disk full, I/O) make SQLite roll back the whole transaction;
                // the writes after it must not run outside one.
                if tx.is_autocommit() {
                    return Err(outcome.err().expect("a failed write"));
                }
            }
            outcomes.push(outcome);
        }
        tx.commit().map_err(sql)?;
        Ok::<_, StorageError>(outcomes)
    })();
    match result {
        Ok(outcomes) => {
            for (write, outcome) in batch.into_iter().zip(outcomes) {
                write.answer(outcome);
            }
        }
        // Nothing of the batch was committed: every write fails, and its caller may retry.
        Err(error) => {
            tracing::error!(%error, writes = batch.len(), "a batch of writes failed");
            for write in batch {
                write.answer(Err(error.clone()));
            }
        }
    }
}

impl Write {
    fn apply(&self, conn: &rusqlite::Connection) -> Result<Outcome, StorageError> {
        match self {
            Write::Submit(submission, _) => submit_in(conn, submission).map(Outcome::Submit),
            Write::Acknowledge(device, seqs, _) => acknowledge_in(conn, *device, seqs).map(Outcome::Acknowledge),
        }
    }

    /// Sends the outcome to the waiting caller (gone callers are ignored).
    fn answer(self, outcome: Result<Outcome, StorageError>) {
        match (self, outcome) {
            (Write::Submit(_, reply), Ok(Outcome::Submit(o))) => drop(reply.send(Ok(o))),
            (Write::Acknowledge(_, _, reply), Ok(Outcome::Acknowledge(n))) => drop(reply.send(Ok(n))),
            (Write::Submit(_, reply), Err(e)) => drop(reply.send(Err(e))),
            (Write::Acknowledge(_, _, reply), Err(e)) => drop(reply.send(Err(e))),
            _ => unreachable!("an outcome follows its write"),
        }
    }
}

fn submit_in(conn: &rusqlite::Connection, submission: &Submission) -> Result<SubmitOutcome, StorageError> {
    use rusqlite::{OptionalExtension, params};
    let sender = submission.sender.as_bytes().as_slice();
    let group = submission.group.as_bytes().as_slice();
    let previous: Option<(Vec<u8>, i64)> = conn
        .prepare_cached("SELECT digest, accepted_at FROM submissions WHERE sender_device = ? AND message_id = ?")
        .map_err(sql)?
        .query_row(params![sender, submission.message_id.as_bytes().as_slice()], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()
        .map_err(sql)?;
    if let Some((digest, accepted_at)) = previous {
        if digest != submission.digest {
            return Err(StorageError::MessageIdReused);
        }
        return Ok(SubmitOutcome::Duplicate {
            accepted_at: to_u64(accepted_at),
        });
    }

    let group_epoch: Option<i64> = conn
        .prepare_cached("SELECT epoch FROM groups WHERE id = ?")
        .map_err(sql)?
        .query_row([group], |row| row.get(0))
        .optional()
        .map_err(sql)?;
    if group_epoch.is_some() {
        let member = conn
            .prepare_cached("SELECT 1 FROM group_members WHERE group_id = ? AND device_id = ?")
            .map_err(sql)?
            .exists(params![group, sender])
            .map_err(sql)?;
        if !member {
            return Err(StorageError::NotMember);
        }
    }
    match (submission.commit_epoch, group_epoch) {
        (Some(epoch), current) => {
            let current = current.map(to_u64).unwrap_or(0);
            if epoch != current {
                return Err(StorageError::EpochConflict { current });
            }
            conn.prepare_cached(
                "INSERT INTO groups (id, epoch, updated_at) VALUES (?, ?, ?)
                 ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, updated_at = excluded.updated_at",
            )
            .map_err(sql)?
            .execute(params![group, to_i64(epoch + 1), to_i64(submission.now)])
            .map_err(sql)?;
            replace_roster(conn, submission)?;
        }
        (None, None) => return Err(StorageError::UnknownGroup),
        (None, Some(_)) => {}
    }

    let mut elsewhere = false;
    for delivery in &submission.deliveries {
        // A removed device is still a valid recipient (of the commits that remove it from
        // groups), but nothing is queued for it any more.
        let mut live = Vec::with_capacity(delivery.recipients.len());
        for recipient in &delivery.recipients {
            let found: Option<(bool, bool)> = conn
                .prepare_cached(
                    "SELECT d.removed_at IS NOT NULL, a.region IS NOT NULL
                     FROM devices d JOIN accounts a ON a.id = d.account_id WHERE d.id = ?",
                )
                .map_err(sql)?
                .query_row([recipient.as_bytes().as_slice()], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()
                .map_err(sql)?;
            match found {
                None => return Err(StorageError::UnknownDevice),
                Some((false, in_region)) => {
                    live.push(*recipient);
                    elsewhere |= in_region;
                }
                Some((true, _)) => {}
            }
        }
        if live.is_empty() {
            continue;
        }
        if submission.commit_epoch.is_none() {
            for recipient in &live {
                let queued: i64 = conn
                    .prepare_cached("SELECT COUNT(*) FROM (SELECT 1 FROM mailbox WHERE device_id = ? LIMIT ?)")
                    .map_err(sql)?
                    .query_row(
                        params![recipient.as_bytes().as_slice(), to_i64(submission.max_queued)],
                        |row| row.get(0),
                    )
                    .map_err(sql)?;
                if to_u64(queued) >= submission.max_queued {
                    return Err(StorageError::MailboxFull {
                        limit: submission.max_queued,
                    });
                }
            }
        }
        let message_id: i64 = conn
            .prepare_cached("INSERT INTO messages (body, received_at, expires_at) VALUES (?, ?, ?) RETURNING id")
            .map_err(sql)?
            .query_row(
                params![
                    delivery.body.0.as_slice(),
                    to_i64(submission.now),
                    to_i64(submission.expires_at)
                ],
                |row| row.get(0),
            )
            .map_err(sql)?;
        let mut insert = conn
            .prepare_cached("INSERT INTO mailbox (device_id, message_id) VALUES (?, ?)")
            .map_err(sql)?;
        for recipient in &live {
            insert
                .execute(params![recipient.as_bytes().as_slice(), message_id])
                .map_err(sql)?;
        }
    }
    conn.prepare_cached(
        "INSERT INTO submissions (sender_device, message_id, digest, accepted_at, expires_at) VALUES (?, ?, ?, ?, ?)",
    )
    .map_err(sql)?
    .execute(params![
        sender,
        submission.message_id.as_bytes().as_slice(),
        submission.digest.as_slice(),
        to_i64(submission.now),
        to_i64(submission.expires_at)
    ])
    .map_err(sql)?;
    Ok(SubmitOutcome::Accepted {
        accepted_at: submission.now,
        elsewhere,
    })
}

fn acknowledge_in(conn: &rusqlite::Connection, device: DeviceId, seqs: &[u64]) -> Result<u64, StorageError> {
    use rusqlite::{OptionalExtension, params};
    let mut deleted = 0;
    for seq in seqs {
        let message_id: Option<i64> = conn
            .prepare_cached("DELETE FROM mailbox WHERE seq = ? AND device_id = ? RETURNING message_id")
            .map_err(sql)?
            .query_row(params![to_i64(*seq), device.as_bytes().as_slice()], |row| row.get(0))
            .optional()
            .map_err(sql)?;
        let Some(message_id) = message_id else { continue };
        deleted += 1;
        conn.prepare_cached(
            "DELETE FROM messages WHERE id = ? AND NOT EXISTS (SELECT 1 FROM mailbox WHERE message_id = ?)",
        )
        .map_err(sql)?
        .execute(params![message_id, message_id])
        .map_err(sql)?;
    }
    Ok(deleted)
}

/// After a commit, the devices that may submit to the group: the committer, everyone it sent the
/// commit or Welcome to, minus those it removed.
fn replace_roster(conn: &rusqlite::Connection, submission: &Submission) -> Result<(), StorageError> {
    let group = submission.group.as_bytes().as_slice();
    conn.prepare_cached("DELETE FROM group_members WHERE group_id = ?")
        .map_err(sql)?
        .execute([group])
        .map_err(sql)?;
    let mut insert = conn
        .prepare_cached("INSERT OR IGNORE INTO group_members (group_id, device_id) VALUES (?, ?)")
        .map_err(sql)?;
    let devices =
        std::iter::once(&submission.sender).chain(submission.deliveries.iter().flat_map(|d| d.recipients.iter()));
    for device in devices.filter(|d| !submission.removed.contains(d)) {
        insert
            .execute(rusqlite::params![group, device.as_bytes().as_slice()])
            .map_err(sql)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn storage_with_device() -> (tempfile::TempDir, SqliteStorage, DeviceId) {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("fumi.db")).await.unwrap();
        let device = DeviceId::from_bytes([2; 16]);
        storage
            .create_account(AccountId::from_bytes([1; 16]), &[0; 32], device, &[0; 32], None, 0)
            .await
            .unwrap();
        (dir, storage, device)
    }

    use crate::storage::contract::submission;

    #[tokio::test]
    async fn blobs_left_without_a_live_recipient_or_uploader_are_collected() {
        let (_dir, storage, device) = storage_with_device().await;
        let account = AccountId::from_bytes([1; 16]);
        let second = DeviceId::from_bytes([3; 16]);
        let token = [4u8; 32];
        storage
            .create_link(&token, account, Ciphertext(vec![0; 40]), 0, 1_000)
            .await
            .unwrap();
        storage
            .link_device(&token, account, second, &[0; 32], vec![], None, 1)
            .await
            .unwrap();
        let blob = |id: u8, owner: DeviceId, recipient: DeviceId| BlobRecord {
            id: BlobId::from_bytes([id; 16]),
            owner_account: account,
            owner_device: owner,
            size: 10,
            complete: false,
            pending: vec![recipient],
            expires_at: u64::MAX / 2,
            channel: None,
        };
        // One to the second device (complete), one from it (unfinished), one unrelated.
        for record in [
            blob(1, device, second),
            blob(2, second, device),
            blob(3, device, device),
        ] {
            storage.create_blob(&record, u64::MAX / 2, 1).await.unwrap();
        }
        storage.complete_blob(BlobId::from_bytes([1; 16])).await.unwrap();
        assert!(storage.expired_blobs(2, 0).await.unwrap().is_empty());
        storage.remove_device(account, second, 3).await.unwrap();
        let mut collected = storage.expired_blobs(4, 0).await.unwrap();
        collected.sort_by_key(|id| id.to_string());
        assert_eq!(
            collected,
            vec![BlobId::from_bytes([1; 16]), BlobId::from_bytes([2; 16])]
        );
    }

    #[tokio::test]
    async fn undelivered_messages_expire() {
        let (_dir, storage, device) = storage_with_device().await;
        storage.submit(submission(device, 1, Some(0), 1_000)).await.unwrap();
        storage.submit(submission(device, 2, None, 5_000)).await.unwrap();
        assert_eq!(storage.purge_expired(999).await.unwrap(), 0);
        assert_eq!(storage.purge_expired(1_000).await.unwrap(), 1);
        let left = storage.fetch(device, 0, 10).await.unwrap();
        assert_eq!(left.iter().map(|e| e.body.0.clone()).collect::<Vec<_>>(), vec![vec![2]]);
        assert_eq!(storage.stats().await.unwrap().queued_envelopes, 1);
    }

    #[tokio::test]
    async fn acknowledgement_deletes_only_own_envelopes() {
        let (_dir, storage, device) = storage_with_device().await;
        storage
            .submit(submission(device, 1, Some(0), u64::MAX / 2))
            .await
            .unwrap();
        let seq = storage.fetch(device, 0, 10).await.unwrap()[0].seq;
        assert_eq!(
            storage
                .acknowledge(DeviceId::from_bytes([7; 16]), &[seq])
                .await
                .unwrap(),
            0
        );
        assert_eq!(storage.acknowledge(device, &[seq, seq]).await.unwrap(), 1);
        assert!(storage.fetch(device, 0, 10).await.unwrap().is_empty());
        let messages: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages")
            .fetch_one(&storage.pool)
            .await
            .unwrap();
        assert_eq!(messages, 0, "the body goes with its last envelope");
    }

    #[tokio::test]
    async fn commits_are_ordered_per_group() {
        let (_dir, storage, device) = storage_with_device().await;
        storage
            .submit(submission(device, 1, Some(0), u64::MAX / 2))
            .await
            .unwrap();
        match storage.submit(submission(device, 2, Some(0), u64::MAX / 2)).await {
            Err(StorageError::EpochConflict { current: 1 }) => {}
            other => panic!("{other:?}"),
        }
        storage
            .submit(submission(device, 3, Some(1), u64::MAX / 2))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn only_roster_members_submit_and_removal_takes_effect() {
        let (_dir, storage, device) = storage_with_device().await;
        let committer = DeviceId::from_bytes([9; 16]);
        storage
            .create_account(AccountId::from_bytes([8; 16]), &[0; 32], committer, &[0; 32], None, 0)
            .await
            .unwrap();
        storage
            .submit(submission(device, 1, Some(0), u64::MAX / 2))
            .await
            .unwrap();
        // The recipient of the first commit is in the roster; a stranger is not.
        let mut from_member = submission(device, 2, None, u64::MAX / 2);
        from_member.sender = device;
        from_member.deliveries[0].recipients = vec![committer];
        storage.submit(from_member).await.unwrap();
        let mut from_stranger = submission(device, 3, None, u64::MAX / 2);
        from_stranger.sender = DeviceId::from_bytes([5; 16]);
        assert!(matches!(
            storage.submit(from_stranger).await,
            Err(StorageError::NotMember)
        ));
        // A commit removing the device: it still receives the commit, then may submit nothing.
        let mut removal = submission(device, 4, Some(1), u64::MAX / 2);
        removal.removed = vec![device];
        storage.submit(removal).await.unwrap();
        let mut after = submission(device, 5, Some(2), u64::MAX / 2);
        after.sender = device;
        after.deliveries[0].recipients = vec![committer];
        assert!(matches!(storage.submit(after).await, Err(StorageError::NotMember)));
    }
}
