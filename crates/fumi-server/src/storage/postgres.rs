//! The PostgreSQL backend, for running several server nodes on one database.
//!
//! It behaves like [`super::SqliteStorage`]: same errors in the same cases, same idempotency,
//! every method one transaction. SQLite gets its guarantees for free because it runs one writer
//! at a time; PostgreSQL runs transactions concurrently, so the places where SQLite relied on
//! that are made explicit here with row locks. The rules, which every method follows so that
//! transactions cannot wait on each other in a cycle:
//!
//! - Transactions run at READ COMMITTED (set explicitly: REPEATABLE READ would break the
//!   "lock, then read again" steps below; SERIALIZABLE, as on CockroachDB, is fine because
//!   serialisation failures are retried).
//! - An account's row is the lock for per-account limits and sums (blob quota, owned channels,
//!   subscriptions, the username binding): `SELECT ... FOR UPDATE` on it first.
//! - A device's row is the lock for its mailbox, its KeyPackages and its removal. Several
//!   devices are always locked in one statement ordered by id (`lock_devices`), after any
//!   account or group lock and before touching mailboxes or rosters.
//! - A group's row is the lock for its epoch and roster: every submission to the group locks it
//!   `FOR UPDATE` before its devices.
//! - A message body left without envelopes is deleted after locking it (ids in ascending order),
//!   so that two transactions removing its last two envelopes cannot both leave it behind.
//! - Deadlocks PostgreSQL still detects (for instance an account purge racing that account's
//!   activity) and serialisation failures (SQLSTATE 40P01, 40001) roll back and retry the whole
//!   transaction a few times (`retrying!`).
//!
//! Portability: the SQL is plain (BYTEA, BIGINT, BOOLEAN, `ON CONFLICT`, `RETURNING`, `FOR
//! UPDATE`, `= ANY($1)` on bound arrays, `UNNEST`, one data-modifying CTE) so that it also runs on
//! PostgreSQL-compatible distributed engines (CockroachDB, YugabyteDB), with one exception: the
//! migration lock is `pg_advisory_xact_lock`, which CockroachDB lacks (see [`migrate`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fumi_proto::{AccountId, BlobId, ChannelId, DeviceId};
use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

use super::*;

/// Schema migrations, applied in order; `fumi_schema_version` records how many ran. Never edit a
/// released entry: append a new one.
///
/// The first entry is the SQLite schema after its seven migrations, translated: BYTEA for BLOB,
/// BIGINT for INTEGER, BOOLEAN for the 0/1 flags, BIGSERIAL for AUTOINCREMENT. Differences, all
/// deliberate:
/// - `mailbox.seq` is numbered per device (`devices.next_seq`) instead of by one global
///   AUTOINCREMENT, and the mailbox's key is `(device_id, seq)`; see [`queue_envelopes`].
/// - A few indexes SQLite lacks (rosters, blob recipients and idempotency records by device or
///   expiry): deletions by those columns would otherwise scan whole tables under row locks.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    id BYTEA PRIMARY KEY,
    identity_key BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    suspended BOOLEAN NOT NULL DEFAULT FALSE,
    audit_key BYTEA
);
CREATE TABLE devices (
    id BYTEA PRIMARY KEY,
    account_id BYTEA NOT NULL REFERENCES accounts (id),
    secret_hash BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    removed_at BIGINT,
    -- The last mailbox sequence number given to this device.
    next_seq BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX devices_by_account ON devices (account_id);
CREATE TABLE usernames (
    hash BYTEA PRIMARY KEY,
    account_id BYTEA NOT NULL UNIQUE REFERENCES accounts (id)
);
CREATE TABLE profiles (
    account_id BYTEA PRIMARY KEY REFERENCES accounts (id),
    sealed BYTEA NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE avatars (
    account_id BYTEA PRIMARY KEY REFERENCES accounts (id),
    sealed BYTEA NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE key_packages (
    id BIGSERIAL PRIMARY KEY,
    device_id BYTEA NOT NULL REFERENCES devices (id),
    key_package BYTEA NOT NULL,
    last_resort BOOLEAN NOT NULL
);
CREATE INDEX key_packages_by_device ON key_packages (device_id, last_resort, id);
CREATE TABLE groups (
    id BYTEA PRIMARY KEY,
    epoch BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE group_members (
    group_id BYTEA NOT NULL,
    device_id BYTEA NOT NULL,
    PRIMARY KEY (group_id, device_id)
);
CREATE INDEX group_members_by_device ON group_members (device_id);
CREATE TABLE messages (
    id BIGSERIAL PRIMARY KEY,
    body BYTEA NOT NULL,
    received_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX messages_by_expiry ON messages (expires_at);
CREATE TABLE mailbox (
    device_id BYTEA NOT NULL,
    seq BIGINT NOT NULL,
    message_id BIGINT NOT NULL REFERENCES messages (id),
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX mailbox_by_message ON mailbox (message_id);
CREATE TABLE submissions (
    sender_device BYTEA NOT NULL,
    message_id BYTEA NOT NULL,
    digest BYTEA NOT NULL,
    accepted_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (sender_device, message_id)
);
CREATE INDEX submissions_by_expiry ON submissions (expires_at);
CREATE TABLE links (
    token_hash BYTEA PRIMARY KEY,
    account_id BYTEA NOT NULL REFERENCES accounts (id),
    sealed BYTEA,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    device_id BYTEA,
    history BYTEA
);
CREATE TABLE invites (
    token_hash BYTEA PRIMARY KEY,
    account_id BYTEA NOT NULL REFERENCES accounts (id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    redeemed_at BIGINT
);
-- Broadcast channels: descriptions and posts are sealed under a channel key the server never
-- sees; subscriptions exist only so that online subscribers get posts pushed and the owner a count.
CREATE TABLE channels (
    id BYTEA PRIMARY KEY,
    owner_account BYTEA NOT NULL REFERENCES accounts (id),
    sealed_info BYTEA NOT NULL,
    latest_seq BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    -- Kept with the channel: counting the subscriptions on every read is too slow.
    subscribers BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX channels_by_owner ON channels (owner_account);
CREATE TABLE channel_posts (
    channel_id BYTEA NOT NULL REFERENCES channels (id),
    seq BIGINT NOT NULL,
    sealed_post BYTEA NOT NULL,
    posted_at BIGINT NOT NULL,
    PRIMARY KEY (channel_id, seq)
);
CREATE TABLE channel_subscriptions (
    channel_id BYTEA NOT NULL REFERENCES channels (id),
    account_id BYTEA NOT NULL REFERENCES accounts (id),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (channel_id, account_id)
);
CREATE INDEX channel_subscriptions_by_account ON channel_subscriptions (account_id);
CREATE TABLE blobs (
    id BYTEA PRIMARY KEY,
    owner_account BYTEA NOT NULL,
    owner_device BYTEA NOT NULL,
    size BIGINT NOT NULL,
    complete BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    -- A channel's file: readable by any device (subscribers hold the key), kept until it expires.
    channel_id BYTEA REFERENCES channels (id)
);
CREATE INDEX blobs_by_owner ON blobs (owner_account);
CREATE TABLE blob_recipients (
    blob_id BYTEA NOT NULL,
    device_id BYTEA NOT NULL,
    PRIMARY KEY (blob_id, device_id)
);
CREATE INDEX blob_recipients_by_device ON blob_recipients (device_id);
CREATE TABLE audit_log (
    idx BIGINT PRIMARY KEY,
    entry BYTEA NOT NULL,
    leaf_hash BYTEA NOT NULL
);
CREATE TABLE audit_heads (
    tree_size BIGINT PRIMARY KEY,
    head TEXT NOT NULL
);
CREATE TABLE reports (
    id BIGSERIAL PRIMARY KEY,
    sealed BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
-- Nonces of admin requests, kept while their timestamps could still pass: a signed request
-- cannot be replayed, not even after a restart.
CREATE TABLE admin_nonces (
    nonce TEXT PRIMARY KEY,
    forget_at BIGINT NOT NULL
);
"#,
    r#"
-- Key directory (akd): tree records by key, value states by label and epoch, signed epoch heads.
CREATE TABLE kt_nodes (
    key BYTEA PRIMARY KEY,
    record BYTEA NOT NULL
);
CREATE TABLE kt_states (
    label BYTEA NOT NULL,
    epoch BIGINT NOT NULL,
    version BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (label, epoch)
);
CREATE TABLE kt_heads (
    epoch BIGINT PRIMARY KEY,
    head TEXT NOT NULL
);
-- The node allowed to publish epochs, until its lease expires.
CREATE TABLE kt_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    node BYTEA NOT NULL,
    expires_at BIGINT NOT NULL
);
-- The MLS signature key of a device's KeyPackages, published in the directory.
ALTER TABLE devices ADD COLUMN signature_key BYTEA;
-- The proof a linked device gave that it holds the link code, for the linking device.
ALTER TABLE links ADD COLUMN link_proof BYTEA;
-- Accounts (kind 0) and username hashes (kind 1) changed since the last epoch, marked by
-- triggers in the changing transaction so that no change can miss the directory.
CREATE TABLE kt_pending (
    kind SMALLINT NOT NULL,
    id BYTEA NOT NULL,
    generation BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, id)
);
CREATE FUNCTION kt_mark(mark_kind SMALLINT, mark_id BYTEA) RETURNS void AS $$
    INSERT INTO kt_pending (kind, id) VALUES (mark_kind, mark_id)
    ON CONFLICT (kind, id) DO UPDATE SET generation = kt_pending.generation + 1;
$$ LANGUAGE sql;
CREATE FUNCTION kt_accounts_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN PERFORM kt_mark(0::SMALLINT, OLD.id); END IF;
    IF TG_OP <> 'DELETE' THEN PERFORM kt_mark(0::SMALLINT, NEW.id); END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE FUNCTION kt_devices_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN PERFORM kt_mark(0::SMALLINT, OLD.account_id); END IF;
    IF TG_OP <> 'DELETE' THEN PERFORM kt_mark(0::SMALLINT, NEW.account_id); END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE FUNCTION kt_usernames_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN PERFORM kt_mark(1::SMALLINT, OLD.hash); END IF;
    IF TG_OP <> 'DELETE' THEN PERFORM kt_mark(1::SMALLINT, NEW.hash); END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER kt_accounts AFTER INSERT OR DELETE OR UPDATE OF identity_key ON accounts
    FOR EACH ROW EXECUTE FUNCTION kt_accounts_changed();
CREATE TRIGGER kt_devices AFTER INSERT OR DELETE OR UPDATE OF removed_at, signature_key, account_id ON devices
    FOR EACH ROW EXECUTE FUNCTION kt_devices_changed();
CREATE TRIGGER kt_usernames AFTER INSERT OR DELETE OR UPDATE ON usernames
    FOR EACH ROW EXECUTE FUNCTION kt_usernames_changed();
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

/// Connections per node.
const MAX_CONNECTIONS: u32 = 16;
/// Envelope bytes read for one delivery round (beyond the first envelope), as in SQLite.
const MAX_FETCH_BYTES: usize = 2 * 1024 * 1024;
/// Tries of a transaction that fails on a deadlock or a serialisation failure.
const MAX_ATTEMPTS: u32 = 5;
/// Base of the advisory lock key that serialises migrations ("fumimigr"), mixed with the schema.
const MIGRATION_LOCK: i64 = 0x6675_6d69_6d69_6772;

/// Why a transaction attempt failed: an answer for the caller, or a conflict worth retrying.
enum TxError {
    Storage(StorageError),
    /// A deadlock or serialisation failure: the transaction was rolled back and may be retried.
    Retry(String),
}

impl From<StorageError> for TxError {
    fn from(error: StorageError) -> Self {
        TxError::Storage(error)
    }
}

impl From<sqlx::Error> for TxError {
    fn from(error: sqlx::Error) -> Self {
        if is_retryable(&error) {
            TxError::Retry(error.to_string())
        } else {
            TxError::Storage(db(error))
        }
    }
}

/// Runs a transaction attempt (an expression giving a fresh future each time, of a
/// `Result<T, TxError>`) until it succeeds, fails for good, or has conflicted `MAX_ATTEMPTS` times.
macro_rules! retrying {
    ($attempt:expr) => {{
        let mut tries: u32 = 0;
        loop {
            match $attempt.await {
                Ok(value) => break Ok(value),
                Err(TxError::Storage(error)) => break Err(error),
                Err(TxError::Retry(message)) => {
                    tries += 1;
                    if tries >= MAX_ATTEMPTS {
                        break Err(StorageError::Database(message));
                    }
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(tries))).await;
                }
            }
        }
    }};
}

/// PostgreSQL storage: a connection pool; every node of a deployment connects to the same
/// database (and schema).
#[derive(Debug, Clone)]
pub struct PostgresStorage {
    pool: PgPool,
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
                "INSERT INTO profiles (account_id, sealed, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (account_id) DO UPDATE SET sealed = EXCLUDED.sealed, updated_at = EXCLUDED.updated_at"
            }
            SealedTable::Avatars => {
                "INSERT INTO avatars (account_id, sealed, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (account_id) DO UPDATE SET sealed = EXCLUDED.sealed, updated_at = EXCLUDED.updated_at"
            }
        }
    }

    fn select(self) -> &'static str {
        match self {
            SealedTable::Profiles => "SELECT sealed FROM profiles WHERE account_id = $1",
            SealedTable::Avatars => "SELECT sealed FROM avatars WHERE account_id = $1",
        }
    }
}

/// Pool settings shared by both constructors; `session` is run on every new connection.
///
/// A transaction dropped on an early return only queues its ROLLBACK on the connection, and an
/// idle pooled connection would hold its row locks meanwhile (another node's write to the same
/// group or account would wait for it). The submission path rolls back explicitly; as a safety
/// net for every other path, the database ends a transaction left idle for a second (the pool
/// then discards that connection).
fn pool_options(session: String) -> PgPoolOptions {
    let session: Arc<str> = Arc::from(format!("{session}SET idle_in_transaction_session_timeout = 1000;"));
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .after_connect(move |conn, _meta| {
            let session = Arc::clone(&session);
            Box::pin(async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(session)).execute(&mut *conn).await?;
                Ok(())
            })
        })
}

impl PostgresStorage {
    /// Connects to the database at `url` (a `postgres://` URL) and applies migrations.
    pub async fn connect(url: &str) -> Result<Self, StorageError> {
        let pool = pool_options(String::new()).connect(url).await.map_err(db)?;
        migrate(&pool, None).await?;
        Ok(Self { pool })
    }

    /// Like [`Self::connect`], but keeps every table in `schema` (created if missing; lowercase
    /// letters, digits and `_` only), so that several independent stores — one per test — share
    /// one database.
    pub async fn connect_in_schema(url: &str, schema: &str) -> Result<Self, StorageError> {
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(StorageError::Database(format!(
                "invalid schema name {schema:?}: use 1 to 63 of a-z, 0-9 and _"
            )));
        }
        // Validated above, so quoting cannot be escaped.
        let pool = pool_options(format!("SET search_path TO \"{schema}\"; "))
            .connect(url)
            .await
            .map_err(db)?;
        migrate(&pool, Some(schema)).await?;
        Ok(Self { pool })
    }

    /// A READ COMMITTED transaction, whatever the server's default (see the module docs).
    async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin_with("BEGIN ISOLATION LEVEL READ COMMITTED").await
    }

    async fn kt_write_once(
        &self,
        node: &[u8; 16],
        nodes: &[(Vec<u8>, Vec<u8>)],
        states: &[KeyDirectoryState],
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        // The fence: taking the lease locks this row too, so no other node can have become the
        // publisher between this check and the commit.
        let holder: Option<Vec<u8>> = sqlx::query_scalar("SELECT node FROM kt_lease WHERE id = 1 FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?;
        if holder.as_deref() != Some(node.as_slice()) {
            tx.rollback().await?;
            return Err(StorageError::Database(
                "this node no longer holds the key directory publisher lease; the epoch was not written".into(),
            )
            .into());
        }
        for (key, record) in nodes {
            sqlx::query(
                "INSERT INTO kt_nodes (key, record) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET record = excluded.record",
            )
            .bind(key.as_slice())
            .bind(record.as_slice())
            .execute(&mut *tx)
            .await?;
        }
        for state in states {
            sqlx::query(
                "INSERT INTO kt_states (label, epoch, version, record) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (label, epoch) DO UPDATE SET version = excluded.version, record = excluded.record",
            )
            .bind(state.label.as_slice())
            .bind(to_i64(state.epoch))
            .bind(to_i64(state.version))
            .bind(state.record.as_slice())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn put_sealed_once(
        &self,
        table: SealedTable,
        account: AccountId,
        sealed: &Ciphertext,
        now: u64,
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        sqlx::query(table.upsert())
            .bind(account.as_bytes().as_slice())
            .bind(sealed.0.as_slice())
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sealed(&self, table: SealedTable, account: AccountId) -> Result<Option<Ciphertext>, StorageError> {
        let sealed: Option<Vec<u8>> = sqlx::query_scalar(table.select())
            .bind(account.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(sealed.map(Ciphertext))
    }

    async fn create_account_once(
        &self,
        account: AccountId,
        identity_key: &[u8],
        device: DeviceId,
        secret_hash: &[u8; 32],
        region: Option<&str>,
        now: u64,
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO accounts (id, identity_key, created_at, region) VALUES ($1, $2, $3, $4)")
            .bind(account.as_bytes().as_slice())
            .bind(identity_key)
            .bind(to_i64(now))
            .bind(region)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO devices (id, account_id, secret_hash, created_at) VALUES ($1, $2, $3, $4)")
            .bind(device.as_bytes().as_slice())
            .bind(account.as_bytes().as_slice())
            .bind(secret_hash.as_slice())
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn claim_username_once(&self, account: AccountId, hash: &[u8; 32]) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        // One claim per account at a time: the account's old binding is replaced, not doubled.
        lock_account(&mut tx, account).await?;
        let holder: Option<Vec<u8>> = sqlx::query_scalar("SELECT account_id FROM usernames WHERE hash = $1")
            .bind(hash.as_slice())
            .fetch_optional(&mut *tx)
            .await?;
        match holder {
            Some(holder) if holder == account.as_bytes() => return Ok(()),
            Some(_) => return Err(StorageError::UsernameTaken.into()),
            None => {}
        }
        sqlx::query("DELETE FROM usernames WHERE account_id = $1")
            .bind(account.as_bytes().as_slice())
            .execute(&mut *tx)
            .await?;
        // Another account may have taken the hash since our read: then it is taken.
        let inserted =
            sqlx::query("INSERT INTO usernames (hash, account_id) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING")
                .bind(hash.as_slice())
                .bind(account.as_bytes().as_slice())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if inserted == 0 {
            return Err(StorageError::UsernameTaken.into());
        }
        tx.commit().await?;
        Ok(())
    }

    async fn add_key_packages_once(
        &self,
        device: DeviceId,
        one_time: &[Ciphertext],
        last_resort: Option<&Ciphertext>,
    ) -> Result<u64, TxError> {
        let id = device.as_bytes().as_slice();
        let mut tx = self.begin().await?;
        // Concurrent uploads for one device queue here, so that exactly one last-resort package
        // is left and claims never see half an upload.
        sqlx::query("SELECT 1 FROM devices WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        for key_package in one_time {
            sqlx::query("INSERT INTO key_packages (device_id, key_package, last_resort) VALUES ($1, $2, FALSE)")
                .bind(id)
                .bind(key_package.0.as_slice())
                .execute(&mut *tx)
                .await?;
        }
        if let Some(key_package) = last_resort {
            sqlx::query("DELETE FROM key_packages WHERE device_id = $1 AND last_resort = TRUE")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO key_packages (device_id, key_package, last_resort) VALUES ($1, $2, TRUE)")
                .bind(id)
                .bind(key_package.0.as_slice())
                .execute(&mut *tx)
                .await?;
        }
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM key_packages WHERE device_id = $1 AND last_resort = FALSE")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(to_u64(count))
    }

    async fn claim_key_packages_once(
        &self,
        accounts: &[AccountId],
        only: &[DeviceId],
    ) -> Result<Vec<(AccountId, DeviceId, Ciphertext)>, TxError> {
        let mut tx = self.begin().await?;
        let mut listed: Vec<Vec<DeviceId>> = Vec::with_capacity(accounts.len());
        for account in accounts {
            let devices: Vec<Vec<u8>> = sqlx::query_scalar(
                "SELECT id FROM devices WHERE account_id = $1 AND removed_at IS NULL ORDER BY created_at, id",
            )
            .bind(account.as_bytes().as_slice())
            .fetch_all(&mut *tx)
            .await?;
            listed.push(devices.iter().map(|d| device_id(d)).collect::<Result<_, _>>()?);
        }
        // Claims of the same device queue on its row, so that no one-time package goes to two
        // claimers. A device removed between the listing and the lock is left out, as if the
        // removal had come first.
        let all: Vec<DeviceId> = listed.iter().flatten().copied().collect();
        let locked = lock_devices(&mut tx, &all, true).await?;
        let mut claimed = Vec::new();
        for (account, devices) in accounts.iter().zip(listed) {
            let devices: Vec<DeviceId> = devices.into_iter().filter(|d| locked.get(d) == Some(&false)).collect();
            if devices.is_empty() {
                return Err(StorageError::UnknownAccount.into());
            }
            for device in devices.into_iter().filter(|d| only.is_empty() || only.contains(d)) {
                // One-time packages first (oldest first); the last-resort one only when none is left.
                let row = sqlx::query(
                    "SELECT id, key_package, last_resort FROM key_packages WHERE device_id = $1
                     ORDER BY last_resort, id LIMIT 1",
                )
                .bind(device.as_bytes().as_slice())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StorageError::NoKeyPackage)?;
                let id: i64 = row.try_get(0)?;
                let key_package: Vec<u8> = row.try_get(1)?;
                let last_resort: bool = row.try_get(2)?;
                if !last_resort {
                    sqlx::query("DELETE FROM key_packages WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                claimed.push((*account, device, Ciphertext(key_package)));
            }
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn submit_once(&self, submission: &Submission) -> Result<SubmitOutcome, TxError> {
        let mut tx = self.begin().await?;
        // Rolled back at once on a refusal: a dropped transaction would only queue its
        // ROLLBACK, and its pooled connection would hold the group's row lock meanwhile.
        match self.submit_in(&mut tx, submission).await {
            Ok(outcome) => {
                tx.commit().await?;
                Ok(outcome)
            }
            Err(error) => {
                let _ = tx.rollback().await;
                Err(error)
            }
        }
    }

    /// The body of a submission, inside `tx`: every refusal returns before anything is written.
    async fn submit_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        submission: &Submission,
    ) -> Result<SubmitOutcome, TxError> {
        let sender = submission.sender.as_bytes().as_slice();
        let group = submission.group.as_bytes().as_slice();

        // The idempotency record goes in first: a concurrent submission with the same id waits
        // on its key until ours commits or rolls back, then finds it (or takes the id itself).
        let recorded = sqlx::query(
            "INSERT INTO submissions (sender_device, message_id, digest, accepted_at, expires_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sender_device, message_id) DO NOTHING",
        )
        .bind(sender)
        .bind(submission.message_id.as_bytes().as_slice())
        .bind(submission.digest.as_slice())
        .bind(to_i64(submission.now))
        .bind(to_i64(submission.expires_at))
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if recorded == 0 {
            let previous =
                sqlx::query("SELECT digest, accepted_at FROM submissions WHERE sender_device = $1 AND message_id = $2")
                    .bind(sender)
                    .bind(submission.message_id.as_bytes().as_slice())
                    .fetch_optional(&mut **tx)
                    .await?;
            // Purged between the two statements: start over.
            let Some(previous) = previous else {
                return Err(TxError::Retry("an idempotency record expired during a retry".into()));
            };
            let digest: Vec<u8> = previous.try_get(0)?;
            let accepted_at: i64 = previous.try_get(1)?;
            if digest != submission.digest {
                return Err(StorageError::MessageIdReused.into());
            }
            return Ok(SubmitOutcome::Duplicate {
                accepted_at: to_u64(accepted_at),
            });
        }

        // Every submission to a group locks the group's row, so that submissions to one group
        // are checked and queued one after the other, as SQLite's single writer does: two commits
        // for the same epoch cannot both pass, and a message is never checked against a roster
        // that a concurrent commit is replacing. A group's first commit creates the row first
        // (a concurrent first commit waits on its key, then finds the epoch moved on).
        let group_epoch: Option<u64> = if submission.commit_epoch.is_some() {
            let created = sqlx::query(
                "INSERT INTO groups (id, epoch, updated_at) VALUES ($1, 0, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(group)
            .bind(to_i64(submission.now))
            .execute(&mut **tx)
            .await?
            .rows_affected();
            let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM groups WHERE id = $1 FOR UPDATE")
                .bind(group)
                .fetch_one(&mut **tx)
                .await?;
            // A row we just created stands for "no commit seen yet".
            (created == 0).then_some(to_u64(epoch))
        } else {
            let epoch: Option<i64> = sqlx::query_scalar("SELECT epoch FROM groups WHERE id = $1 FOR UPDATE")
                .bind(group)
                .fetch_optional(&mut **tx)
                .await?;
            epoch.map(to_u64)
        };

        // Then the sender's and every recipient's device rows: they serialise this submission
        // with removals of those devices, and hand out mailbox sequence numbers (see
        // `queue_envelopes`). Locked now, before any check reads rosters, so that the checks
        // below see the state this transaction will commit against.
        let mut involved: Vec<DeviceId> = submission
            .deliveries
            .iter()
            .flat_map(|d| d.recipients.iter().copied())
            .collect();
        involved.push(submission.sender);
        let devices = lock_devices(tx, &involved, true).await?;

        if group_epoch.is_some() {
            let member: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM group_members WHERE group_id = $1 AND device_id = $2")
                    .bind(group)
                    .bind(sender)
                    .fetch_optional(&mut **tx)
                    .await?;
            if member.is_none() {
                return Err(StorageError::NotMember.into());
            }
        }
        match (submission.commit_epoch, group_epoch) {
            (Some(epoch), current) => {
                let current = current.unwrap_or(0);
                if epoch != current {
                    return Err(StorageError::EpochConflict { current }.into());
                }
                sqlx::query("UPDATE groups SET epoch = $2, updated_at = $3 WHERE id = $1")
                    .bind(group)
                    .bind(to_i64(epoch.saturating_add(1)))
                    .bind(to_i64(submission.now))
                    .execute(&mut **tx)
                    .await?;
                replace_roster(tx, submission).await?;
            }
            (None, None) => return Err(StorageError::UnknownGroup.into()),
            (None, Some(_)) => {}
        }

        for delivery in &submission.deliveries {
            // A removed device is still a valid recipient (of the commits that remove it from
            // groups), but nothing is queued for it any more.
            let mut live = Vec::with_capacity(delivery.recipients.len());
            for recipient in &delivery.recipients {
                match devices.get(recipient) {
                    None => return Err(StorageError::UnknownDevice.into()),
                    Some(false) => live.push(*recipient),
                    Some(true) => {}
                }
            }
            if live.is_empty() {
                continue;
            }
            if submission.commit_epoch.is_none() {
                for recipient in &live {
                    let queued: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM (SELECT 1 FROM mailbox WHERE device_id = $1 LIMIT $2) AS queued",
                    )
                    .bind(recipient.as_bytes().as_slice())
                    .bind(to_i64(submission.max_queued))
                    .fetch_one(&mut **tx)
                    .await?;
                    if to_u64(queued) >= submission.max_queued {
                        return Err(StorageError::MailboxFull {
                            limit: submission.max_queued,
                        }
                        .into());
                    }
                }
            }
            let message_id: i64 = sqlx::query_scalar(
                "INSERT INTO messages (body, received_at, expires_at) VALUES ($1, $2, $3) RETURNING id",
            )
            .bind(delivery.body.0.as_slice())
            .bind(to_i64(submission.now))
            .bind(to_i64(submission.expires_at))
            .fetch_one(&mut **tx)
            .await?;
            queue_envelopes(tx, &live, message_id).await?;
        }
        let recipients: Vec<Vec<u8>> = submission
            .deliveries
            .iter()
            .flat_map(|d| d.recipients.iter().map(|r| r.as_bytes().to_vec()))
            .collect();
        let elsewhere: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM devices d JOIN accounts a ON a.id = d.account_id
                 WHERE d.id = ANY($1) AND d.removed_at IS NULL AND a.region IS NOT NULL)",
        )
        .bind(recipients)
        .fetch_one(&mut **tx)
        .await?;
        Ok(SubmitOutcome::Accepted {
            accepted_at: submission.now,
            elsewhere,
        })
    }

    async fn acknowledge_once(&self, device: DeviceId, seqs: &[i64]) -> Result<u64, TxError> {
        let mut tx = self.begin().await?;
        // `= ANY` ignores repeated numbers, as the one-by-one deletes of SQLite find nothing the
        // second time.
        let message_ids: Vec<i64> =
            sqlx::query_scalar("DELETE FROM mailbox WHERE device_id = $1 AND seq = ANY($2) RETURNING message_id")
                .bind(device.as_bytes().as_slice())
                .bind(seqs.to_vec())
                .fetch_all(&mut *tx)
                .await?;
        let deleted = message_ids.len() as u64;
        delete_unreferenced_messages(&mut tx, message_ids).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn purge_expired_once(&self, now: u64) -> Result<u64, TxError> {
        let now = to_i64(now);
        let mut tx = self.begin().await?;
        let envelopes =
            sqlx::query("DELETE FROM mailbox WHERE message_id IN (SELECT id FROM messages WHERE expires_at <= $1)")
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        // READ COMMITTED: a message committed since the statement above may already be past
        // `now` and still have envelopes; it goes next time.
        sqlx::query(
            "DELETE FROM messages WHERE expires_at <= $1
             AND NOT EXISTS (SELECT 1 FROM mailbox WHERE mailbox.message_id = messages.id)",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for statement in [
            "DELETE FROM submissions WHERE expires_at <= $1",
            "DELETE FROM links WHERE expires_at <= $1",
            "DELETE FROM invites WHERE expires_at <= $1",
        ] {
            sqlx::query(statement).bind(now).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(envelopes)
    }

    async fn create_link_once(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        sealed: &Ciphertext,
        now: u64,
        expires_at: u64,
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO links (token_hash, account_id, sealed, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash.as_slice())
        .bind(account.as_bytes().as_slice())
        .bind(sealed.0.as_slice())
        .bind(to_i64(now))
        .bind(to_i64(expires_at))
        .execute(&mut *tx)
        .await
        .map_err(|e| unique_or(e, StorageError::UnknownLink))?;
        tx.commit().await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn link_device_once(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        device: DeviceId,
        secret_hash: &[u8; 32],
        one_time: &[Ciphertext],
        last_resort: Option<&Ciphertext>,
        now: u64,
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        // The account before the slot, the order an account purge takes them in (the new device
        // row would take this lock anyway, for its foreign key, but only after the slot's).
        sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR SHARE")
            .bind(account.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await?;
        // The slot is consumed and its sealed bundle dropped in the same transaction; a
        // concurrent use of the same slot waits on its row, then finds it used.
        let consumed = sqlx::query(
            "UPDATE links SET device_id = $1, sealed = NULL
             WHERE token_hash = $2 AND account_id = $3 AND device_id IS NULL AND expires_at > $4",
        )
        .bind(device.as_bytes().as_slice())
        .bind(token_hash.as_slice())
        .bind(account.as_bytes().as_slice())
        .bind(to_i64(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if consumed != 1 {
            return Err(StorageError::UnknownLink.into());
        }
        sqlx::query("INSERT INTO devices (id, account_id, secret_hash, created_at) VALUES ($1, $2, $3, $4)")
            .bind(device.as_bytes().as_slice())
            .bind(account.as_bytes().as_slice())
            .bind(secret_hash.as_slice())
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await
            .map_err(|e| unique_or(e, StorageError::DeviceIdTaken))?;
        let packages = one_time
            .iter()
            .map(|kp| (kp, false))
            .chain(last_resort.map(|kp| (kp, true)));
        for (key_package, last_resort) in packages {
            sqlx::query("INSERT INTO key_packages (device_id, key_package, last_resort) VALUES ($1, $2, $3)")
                .bind(device.as_bytes().as_slice())
                .bind(key_package.0.as_slice())
                .bind(last_resort)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_link_history_once(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        sealed: &Ciphertext,
        expires_at: u64,
    ) -> Result<DeviceId, TxError> {
        let mut tx = self.begin().await?;
        let device: Option<Option<Vec<u8>>> = sqlx::query_scalar(
            "UPDATE links SET history = $1, expires_at = $2
             WHERE token_hash = $3 AND account_id = $4 AND device_id IS NOT NULL
             RETURNING device_id",
        )
        .bind(sealed.0.as_slice())
        .bind(to_i64(expires_at))
        .bind(token_hash.as_slice())
        .bind(account.as_bytes().as_slice())
        .fetch_optional(&mut *tx)
        .await?;
        let device = device.flatten().ok_or(StorageError::UnknownLink)?;
        let device = device_id(&device)?;
        tx.commit().await?;
        Ok(device)
    }

    async fn remove_device_once(&self, account: AccountId, device: DeviceId, now: u64) -> Result<(), TxError> {
        let id = device.as_bytes().as_slice();
        let mut tx = self.begin().await?;
        // Updating the row locks it: a submission queueing for this device commits before, or
        // finds it removed after.
        let updated =
            sqlx::query("UPDATE devices SET removed_at = $1 WHERE id = $2 AND account_id = $3 AND removed_at IS NULL")
                .bind(to_i64(now))
                .bind(id)
                .bind(account.as_bytes().as_slice())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if updated != 1 {
            return Err(StorageError::NotOwnDevice.into());
        }
        let message_ids: Vec<i64> = sqlx::query_scalar("DELETE FROM mailbox WHERE device_id = $1 RETURNING message_id")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        delete_unreferenced_messages(&mut tx, message_ids).await?;
        for statement in [
            "DELETE FROM key_packages WHERE device_id = $1",
            "DELETE FROM group_members WHERE device_id = $1",
            "DELETE FROM blob_recipients WHERE device_id = $1",
        ] {
            sqlx::query(statement).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_invite_once(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        now: u64,
        expires_at: u64,
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO invites (token_hash, account_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(token_hash.as_slice())
            .bind(account.as_bytes().as_slice())
            .bind(to_i64(now))
            .bind(to_i64(expires_at))
            .execute(&mut *tx)
            .await
            .map_err(|e| unique_or(e, StorageError::InviteUsed))?;
        tx.commit().await?;
        Ok(())
    }

    async fn redeem_invite_once(&self, token_hash: &[u8; 32], account: AccountId, now: u64) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        // Locked, so that of two concurrent redemptions the second sees the first.
        let redeemed: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT redeemed_at FROM invites WHERE token_hash = $1 AND account_id = $2 AND expires_at > $3 FOR UPDATE",
        )
        .bind(token_hash.as_slice())
        .bind(account.as_bytes().as_slice())
        .bind(to_i64(now))
        .fetch_optional(&mut *tx)
        .await?;
        match redeemed {
            None => return Err(StorageError::UnknownInvite.into()),
            Some(Some(_)) => return Err(StorageError::InviteUsed.into()),
            Some(None) => {}
        }
        sqlx::query("UPDATE invites SET redeemed_at = $1 WHERE token_hash = $2")
            .bind(to_i64(now))
            .bind(token_hash.as_slice())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_blob_once(&self, blob: &BlobRecord, quota: u64, now: u64) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        // Two uploads of one account must not both fit in the quota that only one fits in.
        lock_account(&mut tx, blob.owner_account).await?;
        let used: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blobs WHERE owner_account = $1")
                .bind(blob.owner_account.as_bytes().as_slice())
                .fetch_one(&mut *tx)
                .await?;
        if to_u64(used).saturating_add(blob.size) > quota {
            return Err(StorageError::QuotaExceeded { quota }.into());
        }
        if let Some(channel) = blob.channel {
            let owner: Option<Vec<u8>> = sqlx::query_scalar("SELECT owner_account FROM channels WHERE id = $1")
                .bind(channel.as_bytes().as_slice())
                .fetch_optional(&mut *tx)
                .await?;
            match owner {
                None => return Err(StorageError::UnknownChannel.into()),
                Some(owner) if owner != blob.owner_account.as_bytes().as_slice() => {
                    return Err(StorageError::NotChannelOwner.into());
                }
                Some(_) => {}
            }
        }
        // Shared locks: a recipient's removal waits for this blob (then drops its recipient row),
        // or comes first (then the recipient is skipped).
        let devices = lock_devices(&mut tx, &blob.pending, false).await?;
        let mut live_recipients = 0;
        for recipient in &blob.pending {
            // Like messages, blobs skip devices removed from their account (the sender's
            // group may not have caught up yet); a device that never existed is an error.
            match devices.get(recipient) {
                None => return Err(StorageError::UnknownDevice.into()),
                Some(true) => continue,
                Some(false) => live_recipients += 1,
            }
            sqlx::query("INSERT INTO blob_recipients (blob_id, device_id) VALUES ($1, $2)")
                .bind(blob.id.as_bytes().as_slice())
                .bind(recipient.as_bytes().as_slice())
                .execute(&mut *tx)
                .await?;
        }
        if live_recipients == 0 && blob.channel.is_none() {
            return Err(StorageError::UnknownDevice.into());
        }
        sqlx::query(
            "INSERT INTO blobs (id, owner_account, owner_device, size, complete, created_at, expires_at, channel_id)
             VALUES ($1, $2, $3, $4, FALSE, $5, $6, $7)",
        )
        .bind(blob.id.as_bytes().as_slice())
        .bind(blob.owner_account.as_bytes().as_slice())
        .bind(blob.owner_device.as_bytes().as_slice())
        .bind(to_i64(blob.size))
        .bind(to_i64(now))
        .bind(to_i64(blob.expires_at))
        .bind(blob.channel.map(|c| c.as_bytes().to_vec()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn complete_blob_once(&self, id: BlobId) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        let updated = sqlx::query("UPDATE blobs SET complete = TRUE WHERE id = $1")
            .bind(id.as_bytes().as_slice())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(StorageError::UnknownBlob.into());
        }
        tx.commit().await?;
        Ok(())
    }

    async fn blob_fetched_once(&self, id: BlobId, device: DeviceId) -> Result<bool, TxError> {
        let mut tx = self.begin().await?;
        // Two last recipients finishing at once: the second waits here, then counts none left,
        // so exactly one of them is told to delete the bytes.
        sqlx::query("SELECT 1 FROM blobs WHERE id = $1 FOR UPDATE")
            .bind(id.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await?;
        let deleted = sqlx::query("DELETE FROM blob_recipients WHERE blob_id = $1 AND device_id = $2")
            .bind(id.as_bytes().as_slice())
            .bind(device.as_bytes().as_slice())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(StorageError::NotBlobRecipient.into());
        }
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM blob_recipients WHERE blob_id = $1")
            .bind(id.as_bytes().as_slice())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(left == 0)
    }

    async fn delete_blob_once(&self, id: BlobId) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        // The blob's row first, the order `blob_fetched` takes.
        sqlx::query("SELECT 1 FROM blobs WHERE id = $1 FOR UPDATE")
            .bind(id.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await?;
        for statement in [
            "DELETE FROM blob_recipients WHERE blob_id = $1",
            "DELETE FROM blobs WHERE id = $1",
        ] {
            sqlx::query(statement)
                .bind(id.as_bytes().as_slice())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn append_audit_once(
        &self,
        index: u64,
        entry: &[u8],
        leaf_hash: &[u8; 32],
        signed_head: &str,
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        let size: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
            .fetch_one(&mut *tx)
            .await?;
        if to_u64(size) != index {
            return Err(StorageError::AuditConflict.into());
        }
        // Two nodes that both counted `index` entries: the second insert waits on the first's
        // key, then fails as a duplicate, which is the conflict.
        sqlx::query("INSERT INTO audit_log (idx, entry, leaf_hash) VALUES ($1, $2, $3)")
            .bind(to_i64(index))
            .bind(entry)
            .bind(leaf_hash.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(|e| unique_or(e, StorageError::AuditConflict))?;
        sqlx::query("INSERT INTO audit_heads (tree_size, head) VALUES ($1, $2)")
            .bind(to_i64(index.saturating_add(1)))
            .bind(signed_head)
            .execute(&mut *tx)
            .await
            .map_err(|e| unique_or(e, StorageError::AuditConflict))?;
        tx.commit().await?;
        Ok(())
    }

    async fn init_audit_head_once(&self, signed_head: &str) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        // Two nodes starting at once: the second's insert waits, then does nothing.
        sqlx::query(
            "INSERT INTO audit_heads (tree_size, head) SELECT 0, $1 WHERE NOT EXISTS (SELECT 1 FROM audit_heads)
             ON CONFLICT (tree_size) DO NOTHING",
        )
        .bind(signed_head)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn remember_admin_nonce_once(&self, nonce: &str, now: u64, forget_at: u64) -> Result<bool, TxError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM admin_nonces WHERE forget_at <= $1")
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?;
        let fresh = sqlx::query("INSERT INTO admin_nonces (nonce, forget_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(nonce)
            .bind(to_i64(forget_at))
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(fresh)
    }

    async fn audit_key_once(&self, account: AccountId, fresh: &[u8; 32]) -> Result<[u8; 32], TxError> {
        let id = account.as_bytes().as_slice();
        let mut tx = self.begin().await?;
        // A concurrent first use waits on the row, then finds the key set and keeps it.
        sqlx::query("UPDATE accounts SET audit_key = $1 WHERE id = $2 AND audit_key IS NULL")
            .bind(fresh.as_slice())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let key: Option<Option<Vec<u8>>> = sqlx::query_scalar("SELECT audit_key FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        let key = key.ok_or(StorageError::UnknownAccount)?;
        let key = key.ok_or_else(|| StorageError::Database("missing audit key".into()))?;
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| StorageError::Database("corrupt audit key".into()))?;
        Ok(key)
    }

    async fn set_suspended_once(&self, account: AccountId, suspended: bool) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        let updated = sqlx::query("UPDATE accounts SET suspended = $1 WHERE id = $2")
            .bind(suspended)
            .bind(account.as_bytes().as_slice())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated != 1 {
            return Err(StorageError::UnknownAccount.into());
        }
        tx.commit().await?;
        Ok(())
    }

    async fn purge_account_once(&self, account: AccountId) -> Result<Vec<BlobId>, TxError> {
        let id = account.as_bytes().as_slice();
        let mut tx = self.begin().await?;
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StorageError::UnknownAccount.into());
        }
        // The devices too, so that no submission queues for them after their mailboxes are
        // emptied (it waits, then finds them gone).
        let devices: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id FROM devices WHERE account_id = $1")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        let devices: Vec<DeviceId> = devices.iter().map(|d| device_id(d)).collect::<Result<_, _>>()?;
        lock_devices(&mut tx, &devices, true).await?;
        let message_ids: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM mailbox WHERE device_id IN (SELECT id FROM devices WHERE account_id = $1)
             RETURNING message_id",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        delete_unreferenced_messages(&mut tx, message_ids).await?;
        // Every statement takes the account id as its one parameter.
        for statement in [
            "DELETE FROM key_packages WHERE device_id IN (SELECT id FROM devices WHERE account_id = $1)",
            "DELETE FROM group_members WHERE device_id IN (SELECT id FROM devices WHERE account_id = $1)",
            "DELETE FROM blob_recipients WHERE device_id IN (SELECT id FROM devices WHERE account_id = $1)",
            "DELETE FROM submissions WHERE sender_device IN (SELECT id FROM devices WHERE account_id = $1)",
            "UPDATE channels SET subscribers = subscribers - 1
             WHERE id IN (SELECT channel_id FROM channel_subscriptions WHERE account_id = $1)",
            "DELETE FROM channel_subscriptions WHERE account_id = $1",
            "DELETE FROM channel_subscriptions WHERE channel_id IN (SELECT id FROM channels WHERE owner_account = $1)",
            "DELETE FROM channel_posts WHERE channel_id IN (SELECT id FROM channels WHERE owner_account = $1)",
            // The blob records stay for the caller to delete the bytes (below); they no longer
            // belong to a channel.
            "UPDATE blobs SET channel_id = NULL WHERE owner_account = $1",
            "DELETE FROM channels WHERE owner_account = $1",
            "DELETE FROM links WHERE account_id = $1",
            "DELETE FROM invites WHERE account_id = $1",
            "DELETE FROM usernames WHERE account_id = $1",
            "DELETE FROM profiles WHERE account_id = $1",
            "DELETE FROM avatars WHERE account_id = $1",
            "DELETE FROM devices WHERE account_id = $1",
            "DELETE FROM accounts WHERE id = $1",
        ] {
            sqlx::query(statement).bind(id).execute(&mut *tx).await?;
        }
        let blobs: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT id FROM blobs WHERE owner_account = $1 ORDER BY created_at, id")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        let blobs = blobs.iter().map(|blob| blob_id(blob)).collect::<Result<Vec<_>, _>>()?;
        Ok(blobs)
    }

    async fn create_report_once(&self, sealed: &Ciphertext, now: u64) -> Result<u64, TxError> {
        let mut tx = self.begin().await?;
        let id: i64 = sqlx::query_scalar("INSERT INTO reports (sealed, created_at) VALUES ($1, $2) RETURNING id")
            .bind(sealed.0.as_slice())
            .bind(to_i64(now))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(to_u64(id))
    }

    async fn create_channel_once(
        &self,
        channel: ChannelId,
        owner: AccountId,
        sealed_info: &Ciphertext,
        now: u64,
        limits: ChannelLimits,
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        // Concurrent creations by one owner are counted one after the other.
        lock_account(&mut tx, owner).await?;
        let owned: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM channels WHERE owner_account = $1")
            .bind(owner.as_bytes().as_slice())
            .fetch_one(&mut *tx)
            .await?;
        if to_u64(owned) >= limits.owned {
            return Err(StorageError::TooMany {
                what: "channels",
                limit: limits.owned,
            }
            .into());
        }
        let inserted = sqlx::query(
            "INSERT INTO channels (id, owner_account, sealed_info, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(channel.as_bytes().as_slice())
        .bind(owner.as_bytes().as_slice())
        .bind(sealed_info.0.as_slice())
        .bind(to_i64(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(StorageError::ChannelExists.into());
        }
        tx.commit().await?;
        Ok(())
    }

    async fn update_channel_info_once(
        &self,
        channel: ChannelId,
        owner: AccountId,
        sealed_info: &Ciphertext,
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        channel_owned_by(&mut tx, channel, owner).await?;
        sqlx::query("UPDATE channels SET sealed_info = $1 WHERE id = $2")
            .bind(sealed_info.0.as_slice())
            .bind(channel.as_bytes().as_slice())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn add_channel_post_once(
        &self,
        channel: ChannelId,
        owner: AccountId,
        post: &StoredChannelPost,
    ) -> Result<bool, TxError> {
        let id = channel.as_bytes().as_slice();
        let mut tx = self.begin().await?;
        // Locks the channel's row: a concurrent post (or a retry of this one) waits, then sees
        // the new number.
        let latest = channel_owned_by(&mut tx, channel, owner).await?;
        if post.seq != latest.saturating_add(1) {
            // An identical retry of a stored post is a success that changes nothing.
            let stored: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT sealed_post FROM channel_posts WHERE channel_id = $1 AND seq = $2")
                    .bind(id)
                    .bind(to_i64(post.seq))
                    .fetch_optional(&mut *tx)
                    .await?;
            return match stored {
                Some(bytes) if bytes == post.sealed_post.0 => Ok(false),
                _ => Err(StorageError::ChannelSeqConflict { latest }.into()),
            };
        }
        sqlx::query("INSERT INTO channel_posts (channel_id, seq, sealed_post, posted_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(to_i64(post.seq))
            .bind(post.sealed_post.0.as_slice())
            .bind(to_i64(post.posted_at))
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE channels SET latest_seq = $1 WHERE id = $2")
            .bind(to_i64(post.seq))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn set_subscription_once(
        &self,
        channel: ChannelId,
        account: AccountId,
        subscribed: bool,
        now: u64,
        limits: ChannelLimits,
    ) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        // Concurrent subscriptions of one account are counted one after the other.
        lock_account(&mut tx, account).await?;
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM channels WHERE id = $1")
            .bind(channel.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StorageError::UnknownChannel.into());
        }
        if subscribed {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM channel_subscriptions WHERE account_id = $1")
                .bind(account.as_bytes().as_slice())
                .fetch_one(&mut *tx)
                .await?;
            let inserted = sqlx::query(
                "INSERT INTO channel_subscriptions (channel_id, account_id, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (channel_id, account_id) DO NOTHING",
            )
            .bind(channel.as_bytes().as_slice())
            .bind(account.as_bytes().as_slice())
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            // A new subscription beyond the limit is refused (the transaction rolls back).
            if inserted == 1 && to_u64(count) >= limits.subscriptions {
                return Err(StorageError::TooMany {
                    what: "channel subscriptions",
                    limit: limits.subscriptions,
                }
                .into());
            }
            if inserted == 1 {
                adjust_subscribers(&mut tx, channel, 1).await?;
            }
        } else {
            let deleted = sqlx::query("DELETE FROM channel_subscriptions WHERE channel_id = $1 AND account_id = $2")
                .bind(channel.as_bytes().as_slice())
                .bind(account.as_bytes().as_slice())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if deleted == 1 {
                adjust_subscribers(&mut tx, channel, -1).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Applies the migrations not yet applied, in one transaction.
///
/// Two nodes starting at once must not both apply them: the transaction first takes a
/// transaction-scoped advisory lock (keyed by the schema, so that stores in different schemas of
/// one database do not wait on each other), which the second node waits on, then finds the
/// version moved on. CockroachDB has no advisory locks (nor have older YugabyteDB releases): there,
/// use another migration lock, for instance `SELECT ... FOR UPDATE` on the version row after
/// creating it in a separate transaction, and note that CockroachDB runs schema changes inside a
/// transaction with restrictions.
async fn migrate(pool: &PgPool, schema: Option<&str>) -> Result<(), StorageError> {
    let mut tx = pool.begin().await.map_err(db)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(migration_lock_key(schema.unwrap_or("")))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    if let Some(schema) = schema {
        // The name was validated by the caller; created under the lock so that concurrent
        // `CREATE SCHEMA IF NOT EXISTS` cannot race. The connection's search path already names it.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS fumi_schema_version (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            version BIGINT NOT NULL
        )",
    )
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    sqlx::query("INSERT INTO fumi_schema_version (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let version: i64 = sqlx::query_scalar("SELECT version FROM fumi_schema_version WHERE id = 1 FOR UPDATE")
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
    if applied < MIGRATIONS.len() {
        for migration in &MIGRATIONS[applied..] {
            sqlx::raw_sql(*migration).execute(&mut *tx).await.map_err(db)?;
        }
        sqlx::query("UPDATE fumi_schema_version SET version = $1 WHERE id = 1")
            .bind(i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)
}

/// The advisory lock key for migrating `schema`: a fixed base mixed with the name's FNV-1a hash.
fn migration_lock_key(schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in schema.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    MIGRATION_LOCK ^ (hash as i64)
}

fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(d) => d.code().map(|code| code.into_owned()),
        _ => None,
    }
}

/// A deadlock (40P01) or serialisation failure (40001): the transaction may simply be retried.
fn is_retryable(error: &sqlx::Error) -> bool {
    matches!(sqlstate(error).as_deref(), Some("40001" | "40P01"))
}

/// `instead` for a unique-key violation, else the error as usual.
fn unique_or(error: sqlx::Error, instead: StorageError) -> TxError {
    match error {
        sqlx::Error::Database(d) if d.is_unique_violation() => TxError::Storage(instead),
        other => TxError::from(other),
    }
}

fn channel_id(bytes: &[u8]) -> Result<ChannelId, StorageError> {
    ChannelId::from_slice(bytes).map_err(|_| StorageError::Database("corrupt channel id".into()))
}

/// Locks an account's row (if it exists): the per-account lock for limits and sums.
async fn lock_account(conn: &mut PgConnection, account: AccountId) -> Result<(), TxError> {
    sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account.as_bytes().as_slice())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(())
}

/// Locks the rows of `devices` (exclusively, or shared) in one statement, in id order — the one
/// order every transaction takes device locks in, so that none waits on another in a cycle — and
/// returns, for each one that exists, whether it was removed. Repeated ids are locked once.
async fn lock_devices(
    conn: &mut PgConnection,
    devices: &[DeviceId],
    exclusive: bool,
) -> Result<HashMap<DeviceId, bool>, TxError> {
    let mut ids: Vec<Vec<u8>> = devices.iter().map(|d| d.as_bytes().to_vec()).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let statement = if exclusive {
        "SELECT id, removed_at IS NOT NULL FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE"
    } else {
        "SELECT id, removed_at IS NOT NULL FROM devices WHERE id = ANY($1) ORDER BY id FOR SHARE"
    };
    let rows = sqlx::query(statement).bind(ids).fetch_all(&mut *conn).await?;
    let mut locked = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: Vec<u8> = row.try_get(0)?;
        let removed: bool = row.try_get(1)?;
        locked.insert(device_id(&id)?, removed);
    }
    Ok(locked)
}

/// Queues message `message_id` in the mailboxes of `recipients` (whose rows the caller locked).
///
/// Sequence numbers are per device: each envelope takes the device's `next_seq + 1`, counted on
/// the device's row. A global sequence (BIGSERIAL) would not do: numbers are drawn when a
/// transaction runs, not when it commits, so a transaction that drew 7 could commit after a
/// reader, having seen 8 committed, asked for envelopes after 8 — and envelope 7 would never be
/// delivered. The counter is updated under the row lock the submission already holds, which
/// it keeps until it commits, so a device's numbers become visible strictly in increasing order.
async fn queue_envelopes(conn: &mut PgConnection, recipients: &[DeviceId], message_id: i64) -> Result<(), TxError> {
    let mut unique = recipients.to_vec();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() == recipients.len() {
        let ids: Vec<Vec<u8>> = unique.iter().map(|d| d.as_bytes().to_vec()).collect();
        let queued = sqlx::query(
            "WITH bumped AS (
                 UPDATE devices SET next_seq = next_seq + 1 WHERE id = ANY($1) RETURNING id, next_seq
             )
             INSERT INTO mailbox (device_id, seq, message_id) SELECT id, next_seq, $2 FROM bumped",
        )
        .bind(ids)
        .bind(message_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if queued != unique.len() as u64 {
            return Err(StorageError::Database("a locked recipient device vanished".into()).into());
        }
    } else {
        // A device listed twice gets two envelopes, as in SQLite (the handlers refuse such lists).
        for recipient in recipients {
            let queued = sqlx::query(
                "WITH bumped AS (
                     UPDATE devices SET next_seq = next_seq + 1 WHERE id = $1 RETURNING id, next_seq
                 )
                 INSERT INTO mailbox (device_id, seq, message_id) SELECT id, next_seq, $2 FROM bumped",
            )
            .bind(recipient.as_bytes().as_slice())
            .bind(message_id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if queued != 1 {
                return Err(StorageError::Database("a locked recipient device vanished".into()).into());
            }
        }
    }
    Ok(())
}

/// Deletes those of `message_ids` that no envelope refers to any more.
///
/// Each message's row is locked first, in ascending id order: two transactions deleting the
/// last two envelopes of one message would otherwise each still see the other's envelope and
/// both keep the body. With the lock the second waits, and its delete (a new statement, so a new
/// snapshot at READ COMMITTED) sees the first's envelope gone.
async fn delete_unreferenced_messages(conn: &mut PgConnection, mut message_ids: Vec<i64>) -> Result<(), TxError> {
    message_ids.sort_unstable();
    message_ids.dedup();
    if message_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT id FROM messages WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(message_ids.clone())
        .fetch_all(&mut *conn)
        .await?;
    sqlx::query(
        "DELETE FROM messages WHERE id = ANY($1)
         AND NOT EXISTS (SELECT 1 FROM mailbox WHERE mailbox.message_id = messages.id)",
    )
    .bind(message_ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// After a commit, the devices that may submit to the group: the committer, everyone it sent the
/// commit or Welcome to, minus those it removed.
async fn replace_roster(conn: &mut PgConnection, submission: &Submission) -> Result<(), TxError> {
    let group = submission.group.as_bytes().as_slice();
    sqlx::query("DELETE FROM group_members WHERE group_id = $1")
        .bind(group)
        .execute(&mut *conn)
        .await?;
    let mut members: Vec<Vec<u8>> = std::iter::once(&submission.sender)
        .chain(submission.deliveries.iter().flat_map(|d| d.recipients.iter()))
        .filter(|d| !submission.removed.contains(d))
        .map(|d| d.as_bytes().to_vec())
        .collect();
    members.sort_unstable();
    members.dedup();
    if members.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO group_members (group_id, device_id) SELECT $1, member FROM UNNEST($2) AS m (member)
         ON CONFLICT (group_id, device_id) DO NOTHING",
    )
    .bind(group)
    .bind(members)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn adjust_subscribers(conn: &mut PgConnection, channel: ChannelId, by: i64) -> Result<(), TxError> {
    sqlx::query("UPDATE channels SET subscribers = subscribers + $1 WHERE id = $2")
        .bind(by)
        .bind(channel.as_bytes().as_slice())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The channel's newest post number, if `owner` owns it; locks the channel's row.
async fn channel_owned_by(conn: &mut PgConnection, channel: ChannelId, owner: AccountId) -> Result<u64, TxError> {
    let row = sqlx::query("SELECT owner_account, latest_seq FROM channels WHERE id = $1 FOR UPDATE")
        .bind(channel.as_bytes().as_slice())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StorageError::UnknownChannel)?;
    let owner_account: Vec<u8> = row.try_get(0)?;
    if owner_account.as_slice() != owner.as_bytes().as_slice() {
        return Err(StorageError::NotChannelOwner.into());
    }
    let latest: i64 = row.try_get(1)?;
    Ok(to_u64(latest))
}

#[async_trait]
impl Storage for PostgresStorage {
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
        retrying!(self.create_account_once(account, identity_key, device, secret_hash, region, now))
    }

    async fn device_auth(&self, device: DeviceId) -> Result<Option<DeviceAuth>, StorageError> {
        let row = sqlx::query(
            "SELECT d.account_id, d.secret_hash, a.suspended, d.removed_at IS NOT NULL,
                    a.region, a.relocating_to, a.relocating_from
             FROM devices d JOIN accounts a ON a.id = d.account_id WHERE d.id = $1",
        )
        .bind(device.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let account: Vec<u8> = row.try_get(0).map_err(db)?;
        let hash: Vec<u8> = row.try_get(1).map_err(db)?;
        Ok(Some(DeviceAuth {
            account: account_id(&account)?,
            secret_hash: hash
                .try_into()
                .map_err(|_| StorageError::Database("corrupt secret hash".into()))?,
            suspended: row.try_get(2).map_err(db)?,
            removed: row.try_get(3).map_err(db)?,
            residency: Residency::from_columns(
                row.try_get(4).map_err(db)?,
                row.try_get(5).map_err(db)?,
                row.try_get(6).map_err(db)?,
            ),
        }))
    }

    async fn account(&self, account: AccountId) -> Result<Option<AccountRecord>, StorageError> {
        let identity: Option<Vec<u8>> = sqlx::query_scalar("SELECT identity_key FROM accounts WHERE id = $1")
            .bind(account.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        let Some(identity_key) = identity else { return Ok(None) };
        let devices: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT id FROM devices WHERE account_id = $1 AND removed_at IS NULL ORDER BY created_at, id",
        )
        .bind(account.as_bytes().as_slice())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let devices = devices.iter().map(|d| device_id(d)).collect::<Result<_, _>>()?;
        Ok(Some(AccountRecord { identity_key, devices }))
    }

    async fn claim_username(&self, account: AccountId, hash: &[u8; 32]) -> Result<(), StorageError> {
        retrying!(self.claim_username_once(account, hash))
    }

    async fn lookup_username(&self, hash: &[u8; 32]) -> Result<Option<AccountId>, StorageError> {
        let account: Option<Vec<u8>> = sqlx::query_scalar("SELECT account_id FROM usernames WHERE hash = $1")
            .bind(hash.as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        account.map(|a| account_id(&a)).transpose()
    }

    async fn put_profile(&self, account: AccountId, sealed: Ciphertext, now: u64) -> Result<(), StorageError> {
        retrying!(self.put_sealed_once(SealedTable::Profiles, account, &sealed, now))
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
        retrying!(self.add_key_packages_once(device, &one_time, last_resort.as_ref()))
    }

    async fn key_package_count(&self, device: DeviceId) -> Result<u64, StorageError> {
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM key_packages WHERE device_id = $1 AND last_resort = FALSE")
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
        retrying!(self.claim_key_packages_once(accounts, only))
    }

    async fn submit(&self, submission: Submission) -> Result<SubmitOutcome, StorageError> {
        retrying!(self.submit_once(&submission))
    }

    async fn fetch(&self, device: DeviceId, after_seq: u64, limit: u32) -> Result<Vec<Envelope>, StorageError> {
        // A round stops after MAX_FETCH_BYTES (with at least one envelope), as in SQLite: the
        // rows are streamed and the rest of the result is dropped unread.
        let mut rows = sqlx::query(
            "SELECT mb.seq, m.body, m.received_at FROM mailbox mb JOIN messages m ON m.id = mb.message_id
             WHERE mb.device_id = $1 AND mb.seq > $2 ORDER BY mb.seq LIMIT $3",
        )
        .bind(device.as_bytes().as_slice())
        .bind(to_i64(after_seq))
        .bind(i64::from(limit))
        .fetch(&self.pool);
        let mut envelopes = Vec::new();
        let mut bytes = 0;
        while let Some(row) = rows.try_next().await.map_err(db)? {
            let seq: i64 = row.try_get(0).map_err(db)?;
            let body: Vec<u8> = row.try_get(1).map_err(db)?;
            let received_at: i64 = row.try_get(2).map_err(db)?;
            bytes += body.len();
            envelopes.push(Envelope {
                seq: to_u64(seq),
                body: Ciphertext(body),
                received_at: to_u64(received_at),
            });
            if bytes >= MAX_FETCH_BYTES {
                break;
            }
        }
        Ok(envelopes)
    }

    async fn acknowledge(&self, device: DeviceId, seqs: &[u64]) -> Result<u64, StorageError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let seqs: Vec<i64> = seqs.iter().map(|seq| to_i64(*seq)).collect();
        retrying!(self.acknowledge_once(device, &seqs))
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, StorageError> {
        retrying!(self.purge_expired_once(now))
    }

    async fn stats(&self) -> Result<StorageStats, StorageError> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM accounts), (SELECT COUNT(*) FROM devices WHERE removed_at IS NULL),
                    (SELECT COUNT(*) FROM mailbox)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let accounts: i64 = row.try_get(0).map_err(db)?;
        let devices: i64 = row.try_get(1).map_err(db)?;
        let queued: i64 = row.try_get(2).map_err(db)?;
        Ok(StorageStats {
            accounts: to_u64(accounts),
            devices: to_u64(devices),
            queued_envelopes: to_u64(queued),
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
        retrying!(self.create_link_once(token_hash, account, &sealed, now, expires_at))
    }

    async fn open_link(&self, token_hash: &[u8; 32], now: u64) -> Result<(AccountId, Ciphertext), StorageError> {
        let row = sqlx::query(
            "SELECT account_id, sealed FROM links WHERE token_hash = $1 AND device_id IS NULL AND expires_at > $2",
        )
        .bind(token_hash.as_slice())
        .bind(to_i64(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or(StorageError::UnknownLink)?;
        let account: Vec<u8> = row.try_get(0).map_err(db)?;
        // An open slot always has its bundle (it is dropped only when the slot is used).
        let sealed: Option<Vec<u8>> = row.try_get(1).map_err(db)?;
        let sealed = sealed.ok_or_else(|| StorageError::Database("an open link has no bundle".into()))?;
        Ok((account_id(&account)?, Ciphertext(sealed)))
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
        retrying!(self.link_device_once(
            token_hash,
            account,
            device,
            secret_hash,
            &one_time,
            last_resort.as_ref(),
            now
        ))
    }

    async fn link_status(&self, token_hash: &[u8; 32], account: AccountId) -> Result<Option<DeviceId>, StorageError> {
        let row: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT device_id FROM links WHERE token_hash = $1 AND account_id = $2")
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
        retrying!(self.set_link_history_once(token_hash, account, &sealed, expires_at))
    }

    async fn link_history(&self, token_hash: &[u8; 32], device: DeviceId) -> Result<Option<Ciphertext>, StorageError> {
        let row: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT history FROM links WHERE token_hash = $1 AND device_id = $2")
                .bind(token_hash.as_slice())
                .bind(device.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        row.map(|history| history.map(Ciphertext))
            .ok_or(StorageError::UnknownLink)
    }

    async fn remove_device(&self, account: AccountId, device: DeviceId, now: u64) -> Result<(), StorageError> {
        retrying!(self.remove_device_once(account, device, now))
    }

    async fn create_invite(
        &self,
        token_hash: &[u8; 32],
        account: AccountId,
        now: u64,
        expires_at: u64,
    ) -> Result<(), StorageError> {
        retrying!(self.create_invite_once(token_hash, account, now, expires_at))
    }

    async fn redeem_invite(&self, token_hash: &[u8; 32], account: AccountId, now: u64) -> Result<(), StorageError> {
        retrying!(self.redeem_invite_once(token_hash, account, now))
    }

    async fn create_blob(&self, blob: &BlobRecord, quota: u64, now: u64) -> Result<(), StorageError> {
        retrying!(self.create_blob_once(blob, quota, now))
    }

    async fn blob(&self, id: BlobId) -> Result<Option<BlobRecord>, StorageError> {
        let row = sqlx::query(
            "SELECT owner_account, owner_device, size, complete, expires_at, channel_id FROM blobs WHERE id = $1",
        )
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        // In key order, as SQLite reads them through the primary key.
        let pending: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT device_id FROM blob_recipients WHERE blob_id = $1 ORDER BY device_id")
                .bind(id.as_bytes().as_slice())
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        let owner_account: Vec<u8> = row.try_get(0).map_err(db)?;
        let owner_device: Vec<u8> = row.try_get(1).map_err(db)?;
        let size: i64 = row.try_get(2).map_err(db)?;
        let complete: bool = row.try_get(3).map_err(db)?;
        let expires_at: i64 = row.try_get(4).map_err(db)?;
        let channel: Option<Vec<u8>> = row.try_get(5).map_err(db)?;
        Ok(Some(BlobRecord {
            id,
            owner_account: account_id(&owner_account)?,
            owner_device: device_id(&owner_device)?,
            size: to_u64(size),
            complete,
            pending: pending.iter().map(|d| device_id(d)).collect::<Result<_, _>>()?,
            expires_at: to_u64(expires_at),
            channel: channel.map(|c| channel_id(&c)).transpose()?,
        }))
    }

    async fn complete_blob(&self, id: BlobId) -> Result<(), StorageError> {
        retrying!(self.complete_blob_once(id))
    }

    async fn blob_fetched(&self, id: BlobId, device: DeviceId) -> Result<bool, StorageError> {
        retrying!(self.blob_fetched_once(id, device))
    }

    async fn delete_blob(&self, id: BlobId) -> Result<(), StorageError> {
        retrying!(self.delete_blob_once(id))
    }

    async fn expired_blobs(&self, now: u64, stale_upload_before: u64) -> Result<Vec<BlobId>, StorageError> {
        let ids: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT id FROM blobs WHERE expires_at <= $1 OR (complete = FALSE AND created_at <= $2)
                 OR (channel_id IS NULL AND complete = TRUE
                     AND NOT EXISTS (SELECT 1 FROM blob_recipients r WHERE r.blob_id = blobs.id))
                 OR (channel_id IS NULL AND owner_device IN (SELECT id FROM devices WHERE removed_at IS NOT NULL))
             ORDER BY created_at, id",
        )
        .bind(to_i64(now))
        .bind(to_i64(stale_upload_before))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        ids.iter().map(|id| blob_id(id)).collect()
    }

    async fn put_avatar(&self, account: AccountId, sealed: Ciphertext, now: u64) -> Result<(), StorageError> {
        retrying!(self.put_sealed_once(SealedTable::Avatars, account, &sealed, now))
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
        let hashes: Vec<Vec<u8>> = sqlx::query_scalar("SELECT leaf_hash FROM audit_log WHERE idx < $1 ORDER BY idx")
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
        sqlx::query_scalar("SELECT entry FROM audit_log WHERE idx >= $1 AND idx < $2 ORDER BY idx")
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
        // Not retried here: a conflict of any kind means the log may have grown, and the caller
        // retries on the new size.
        match self.append_audit_once(index, entry, leaf_hash, signed_head).await {
            Ok(()) => Ok(()),
            Err(TxError::Storage(error)) => Err(error),
            Err(TxError::Retry(_)) => Err(StorageError::AuditConflict),
        }
    }

    async fn remember_admin_nonce(&self, nonce: &str, now: u64, forget_at: u64) -> Result<bool, StorageError> {
        retrying!(self.remember_admin_nonce_once(nonce, now, forget_at))
    }

    async fn init_audit_head(&self, signed_head: &str) -> Result<(), StorageError> {
        retrying!(self.init_audit_head_once(signed_head))
    }

    async fn audit_head(&self) -> Result<Option<String>, StorageError> {
        sqlx::query_scalar("SELECT head FROM audit_heads ORDER BY tree_size DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(db)
    }

    async fn audit_key(&self, account: AccountId) -> Result<[u8; 32], StorageError> {
        let mut fresh = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut fresh);
        retrying!(self.audit_key_once(account, &fresh))
    }

    async fn account_summaries(&self) -> Result<Vec<AccountSummary>, StorageError> {
        // SUM over BIGINT is NUMERIC in PostgreSQL and OCTET_LENGTH is INTEGER: cast to BIGINT.
        let rows = sqlx::query(
            "SELECT a.id, a.created_at, a.suspended,
                (SELECT COUNT(*) FROM devices d WHERE d.account_id = a.id AND d.removed_at IS NULL),
                (SELECT COUNT(*) FROM mailbox m JOIN devices d ON d.id = m.device_id WHERE d.account_id = a.id),
                (SELECT CAST(COALESCE(SUM(OCTET_LENGTH(g.body)), 0) AS BIGINT) FROM mailbox m
                    JOIN devices d ON d.id = m.device_id
                    JOIN messages g ON g.id = m.message_id WHERE d.account_id = a.id),
                (SELECT COUNT(*) FROM key_packages k JOIN devices d ON d.id = k.device_id WHERE d.account_id = a.id),
                (SELECT COUNT(*) FROM blobs b WHERE b.owner_account = a.id),
                (SELECT CAST(COALESCE(SUM(b.size), 0) AS BIGINT) FROM blobs b WHERE b.owner_account = a.id),
                COALESCE(a.region, '')
             FROM accounts a ORDER BY a.created_at, a.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                let count = |index: usize| -> Result<u64, StorageError> {
                    let value: i64 = row.try_get(index).map_err(db)?;
                    Ok(to_u64(value))
                };
                let account: Vec<u8> = row.try_get(0).map_err(db)?;
                Ok(AccountSummary {
                    account: account_id(&account)?,
                    created_at: count(1)?,
                    suspended: row.try_get(2).map_err(db)?,
                    devices: count(3)?,
                    queued_envelopes: count(4)?,
                    queued_bytes: count(5)?,
                    key_packages: count(6)?,
                    blobs: count(7)?,
                    blob_bytes: count(8)?,
                    region: row.try_get(9).map_err(db)?,
                })
            })
            .collect()
    }

    async fn set_suspended(&self, account: AccountId, suspended: bool) -> Result<(), StorageError> {
        retrying!(self.set_suspended_once(account, suspended))
    }

    async fn purge_account(&self, account: AccountId) -> Result<Vec<BlobId>, StorageError> {
        retrying!(self.purge_account_once(account))
    }

    async fn create_report(&self, sealed: Ciphertext, now: u64) -> Result<u64, StorageError> {
        retrying!(self.create_report_once(&sealed, now))
    }

    async fn reports(&self) -> Result<Vec<ReportSummary>, StorageError> {
        let rows = sqlx::query("SELECT id, created_at, CAST(OCTET_LENGTH(sealed) AS BIGINT) FROM reports ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get(0).map_err(db)?;
                let created_at: i64 = row.try_get(1).map_err(db)?;
                let size: i64 = row.try_get(2).map_err(db)?;
                Ok(ReportSummary {
                    id: to_u64(id),
                    created_at: to_u64(created_at),
                    size: to_u64(size),
                })
            })
            .collect()
    }

    async fn report(&self, id: u64) -> Result<Option<Ciphertext>, StorageError> {
        let sealed: Option<Vec<u8>> = sqlx::query_scalar("SELECT sealed FROM reports WHERE id = $1")
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
        retrying!(self.create_channel_once(channel, owner, &sealed_info, now, limits))
    }

    async fn update_channel_info(
        &self,
        channel: ChannelId,
        owner: AccountId,
        sealed_info: Ciphertext,
    ) -> Result<(), StorageError> {
        retrying!(self.update_channel_info_once(channel, owner, &sealed_info))
    }

    async fn channel(&self, channel: ChannelId) -> Result<Option<ChannelRecord>, StorageError> {
        let row = sqlx::query("SELECT owner_account, sealed_info, latest_seq, subscribers FROM channels WHERE id = $1")
            .bind(channel.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let owner: Vec<u8> = row.try_get(0).map_err(db)?;
        let sealed_info: Vec<u8> = row.try_get(1).map_err(db)?;
        let latest_seq: i64 = row.try_get(2).map_err(db)?;
        let subscribers: i64 = row.try_get(3).map_err(db)?;
        Ok(Some(ChannelRecord {
            owner: account_id(&owner)?,
            sealed_info: Ciphertext(sealed_info),
            latest_seq: to_u64(latest_seq),
            subscribers: to_u64(subscribers),
        }))
    }

    async fn add_channel_post(
        &self,
        channel: ChannelId,
        owner: AccountId,
        post: &StoredChannelPost,
    ) -> Result<bool, StorageError> {
        retrying!(self.add_channel_post_once(channel, owner, post))
    }

    async fn channel_posts(
        &self,
        channel: ChannelId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredChannelPost>, StorageError> {
        let rows = sqlx::query(
            "SELECT seq, sealed_post, posted_at FROM channel_posts
             WHERE channel_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(channel.as_bytes().as_slice())
        .bind(to_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let posts = rows
            .iter()
            .map(|row| {
                let seq: i64 = row.try_get(0).map_err(db)?;
                let sealed_post: Vec<u8> = row.try_get(1).map_err(db)?;
                let posted_at: i64 = row.try_get(2).map_err(db)?;
                Ok(StoredChannelPost {
                    seq: to_u64(seq),
                    sealed_post: Ciphertext(sealed_post),
                    posted_at: to_u64(posted_at),
                })
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        if posts.is_empty() {
            let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM channels WHERE id = $1")
                .bind(channel.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
            if exists.is_none() {
                return Err(StorageError::UnknownChannel);
            }
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
        retrying!(self.set_subscription_once(channel, account, subscribed, now, limits))
    }

    async fn subscriptions(&self, account: AccountId) -> Result<Vec<ChannelId>, StorageError> {
        // SQLite returns them in insertion order (by rowid through its account index); the
        // subscription time, then the id, is the nearest stable order.
        let rows: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT channel_id FROM channel_subscriptions WHERE account_id = $1 ORDER BY created_at, channel_id",
        )
        .bind(account.as_bytes().as_slice())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(|id| channel_id(id)).collect()
    }

    // --- key directory ------------------------------------------------------------------------

    async fn kt_write(
        &self,
        node: &[u8; 16],
        nodes: Vec<(Vec<u8>, Vec<u8>)>,
        states: Vec<KeyDirectoryState>,
    ) -> Result<(), StorageError> {
        retrying!(self.kt_write_once(node, &nodes, &states))
    }

    async fn kt_nodes(&self, keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        sqlx::query_as("SELECT key, record FROM kt_nodes WHERE key = ANY($1)")
            .bind(keys)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    async fn kt_states(&self, labels: &[Vec<u8>]) -> Result<Vec<KeyDirectoryState>, StorageError> {
        let rows: Vec<(Vec<u8>, i64, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT label, epoch, version, record FROM kt_states WHERE label = ANY($1) ORDER BY label, epoch",
        )
        .bind(labels)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(label, epoch, version, record)| KeyDirectoryState {
                label,
                epoch: to_u64(epoch),
                version: to_u64(version),
                record,
            })
            .collect())
    }

    async fn kt_pending(&self, limit: u32) -> Result<Vec<KeyDirectoryPending>, StorageError> {
        let rows: Vec<(i16, Vec<u8>, i64)> =
            sqlx::query_as("SELECT kind, id, generation FROM kt_pending ORDER BY kind, id LIMIT $1")
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        rows.into_iter()
            .map(|(kind, id, generation)| {
                Ok(KeyDirectoryPending {
                    kind: KeyDirectoryKind::from_db(i64::from(kind))?,
                    id,
                    generation: to_u64(generation),
                })
            })
            .collect()
    }

    async fn kt_clear_pending(&self, published: &[KeyDirectoryPending]) -> Result<(), StorageError> {
        for mark in published {
            sqlx::query("DELETE FROM kt_pending WHERE kind = $1 AND id = $2 AND generation = $3")
                .bind(mark.kind as i16)
                .bind(mark.id.as_slice())
                .bind(to_i64(mark.generation))
                .execute(&self.pool)
                .await
                .map_err(db)?;
        }
        Ok(())
    }

    async fn device_keys(
        &self,
        account: AccountId,
    ) -> Result<Option<(Vec<u8>, Vec<(DeviceId, Vec<u8>)>)>, StorageError> {
        let identity: Option<Vec<u8>> = sqlx::query_scalar("SELECT identity_key FROM accounts WHERE id = $1")
            .bind(account.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        let Some(identity_key) = identity else { return Ok(None) };
        let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT id, signature_key FROM devices \
             WHERE account_id = $1 AND removed_at IS NULL AND signature_key IS NOT NULL ORDER BY id",
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
        sqlx::query("UPDATE devices SET signature_key = $1 WHERE id = $2 AND signature_key IS NULL")
            .bind(key)
            .bind(device.as_bytes().as_slice())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        let stored: Option<Option<Vec<u8>>> = sqlx::query_scalar("SELECT signature_key FROM devices WHERE id = $1")
            .bind(device.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        stored.flatten().ok_or(StorageError::UnknownDevice)
    }

    async fn kt_lease(&self, node: &[u8; 16], now: u64, ttl_ms: u64) -> Result<bool, StorageError> {
        let holder: Option<Vec<u8>> = sqlx::query_scalar(
            "INSERT INTO kt_lease (id, node, expires_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET node = $1, expires_at = $2 \
             WHERE kt_lease.node = $1 OR kt_lease.expires_at < $3 RETURNING node",
        )
        .bind(node.as_slice())
        .bind(to_i64(now.saturating_add(ttl_ms)))
        .bind(to_i64(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(holder.is_some())
    }

    async fn kt_release_lease(&self, node: &[u8; 16]) -> Result<(), StorageError> {
        sqlx::query("DELETE FROM kt_lease WHERE node = $1")
            .bind(node.as_slice())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn set_link_proof(&self, token_hash: &[u8; 32], proof: &[u8]) -> Result<(), StorageError> {
        sqlx::query("UPDATE links SET link_proof = $1 WHERE token_hash = $2 AND link_proof IS NULL")
            .bind(proof)
            .bind(token_hash.as_slice())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn link_proof(&self, token_hash: &[u8; 32], account: AccountId) -> Result<Option<Vec<u8>>, StorageError> {
        let proof: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT link_proof FROM links WHERE token_hash = $1 AND account_id = $2")
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
        sqlx::query("INSERT INTO kt_heads (epoch, head) VALUES ($1, $2) ON CONFLICT (epoch) DO NOTHING")
            .bind(to_i64(epoch))
            .bind(head)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn kt_heads(&self, from: u64, limit: u32) -> Result<Vec<String>, StorageError> {
        sqlx::query_scalar("SELECT head FROM kt_heads WHERE epoch >= $1 ORDER BY epoch LIMIT $2")
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
            sqlx::query_as("SELECT region, relocating_to, relocating_from FROM accounts WHERE id = $1")
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
        // One statement: atomic on its own.
        let updated = sqlx::query(
            "UPDATE accounts SET region = $1, relocating_to = $2, relocating_from = $3
             WHERE id = $4 AND region IS NOT DISTINCT FROM $5 AND relocating_to IS NOT DISTINCT FROM $6
                 AND relocating_from IS NOT DISTINCT FROM $7",
        )
        .bind(region)
        .bind(to)
        .bind(from)
        .bind(account.as_bytes().as_slice())
        .bind(was_region)
        .bind(was_to)
        .bind(was_from)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(updated == 1)
    }

    async fn in_transit(
        &self,
        region: &str,
        devices: Option<&[DeviceId]>,
        limit: u32,
    ) -> Result<Vec<StoredEnvelope>, StorageError> {
        let ids: Option<Vec<Vec<u8>>> = devices.map(|devices| devices.iter().map(|d| d.as_bytes().to_vec()).collect());
        let rows = sqlx::query(
            "SELECT mb.device_id, mb.seq, m.id, m.body, m.received_at, m.expires_at
             FROM accounts a JOIN devices d ON d.account_id = a.id JOIN mailbox mb ON mb.device_id = d.id
             JOIN messages m ON m.id = mb.message_id
             WHERE a.region = $1 AND a.relocating_to IS NULL AND a.relocating_from IS NULL
                 AND ($2::BYTEA[] IS NULL OR d.id = ANY($2))
             ORDER BY mb.device_id, mb.seq LIMIT $3",
        )
        .bind(region)
        .bind(ids)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(|row| stored_envelope(row, 0)).collect()
    }

    async fn settle_forwarded(&self, region: &str, envelopes: &[(DeviceId, u64)]) -> Result<u64, StorageError> {
        retrying!(self.settle_forwarded_once(region, envelopes))
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
             WHERE mb.device_id = $1 AND mb.seq > $2 ORDER BY mb.seq LIMIT $3",
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
        retrying!(self.import_envelopes_once(envelopes))
    }

    async fn delete_mailboxes(&self, devices: &[DeviceId]) -> Result<u64, StorageError> {
        retrying!(self.delete_mailboxes_once(devices))
    }

    async fn export_key_packages(&self, devices: &[DeviceId]) -> Result<Vec<StoredKeyPackage>, StorageError> {
        let ids: Vec<Vec<u8>> = devices.iter().map(|d| d.as_bytes().to_vec()).collect();
        let rows: Vec<(Vec<u8>, Vec<u8>, bool)> = sqlx::query_as(
            "SELECT device_id, key_package, last_resort FROM key_packages WHERE device_id = ANY($1) ORDER BY id",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(device, key_package, last_resort)| {
                Ok(StoredKeyPackage {
                    device: device_id(&device)?,
                    key_package: Ciphertext(key_package),
                    last_resort,
                })
            })
            .collect()
    }

    async fn replace_key_packages(
        &self,
        devices: &[DeviceId],
        packages: &[StoredKeyPackage],
    ) -> Result<(), StorageError> {
        retrying!(self.replace_key_packages_once(devices, packages))
    }

    async fn claim_device_key_packages(
        &self,
        devices: &[DeviceId],
    ) -> Result<Vec<(DeviceId, Ciphertext)>, StorageError> {
        retrying!(self.claim_device_key_packages_once(devices))
    }

    async fn delete_sealed(&self, account: AccountId) -> Result<(), StorageError> {
        retrying!(self.delete_sealed_once(account))
    }
    async fn scrub(&self) -> Result<(), StorageError> {
        // Deleted rows leave every query at once; their bytes leave the table files when
        // autovacuum reuses the space (THREAT_MODEL.md: use encrypted storage).
        Ok(())
    }

    async fn blobs_owned(&self, account: AccountId) -> Result<Vec<BlobId>, StorageError> {
        let ids: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id FROM blobs WHERE owner_account = $1 ORDER BY id")
            .bind(account.as_bytes().as_slice())
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        ids.iter().map(|id| blob_id(id)).collect()
    }
}

/// A [`StoredEnvelope`] from columns device, seq, message id, body, received, expires (from
/// column `first` on).
fn stored_envelope(row: &sqlx::postgres::PgRow, first: usize) -> Result<StoredEnvelope, StorageError> {
    let device: Vec<u8> = row.try_get(first).map_err(db)?;
    let number = |index: usize| -> Result<u64, StorageError> { Ok(to_u64(row.try_get(index).map_err(db)?)) };
    Ok(StoredEnvelope {
        device: device_id(&device)?,
        seq: number(first + 1)?,
        message_id: number(first + 2)?,
        body: Ciphertext(row.try_get(first + 3).map_err(db)?),
        received_at: number(first + 4)?,
        expires_at: number(first + 5)?,
    })
}

impl PostgresStorage {
    /// Connects to a region's database: the same schema, but its accounts and devices live in
    /// the main database, so the references to them are dropped.
    pub async fn connect_region(url: &str, schema: &str) -> Result<Self, StorageError> {
        let storage = Self::connect_in_schema(url, schema).await?;
        sqlx::raw_sql(
            "ALTER TABLE profiles DROP CONSTRAINT IF EXISTS profiles_account_id_fkey;
             ALTER TABLE avatars DROP CONSTRAINT IF EXISTS avatars_account_id_fkey;
             ALTER TABLE key_packages DROP CONSTRAINT IF EXISTS key_packages_device_id_fkey;",
        )
        .execute(&storage.pool)
        .await
        .map_err(db)?;
        Ok(storage)
    }

    async fn settle_forwarded_once(&self, region: &str, envelopes: &[(DeviceId, u64)]) -> Result<u64, TxError> {
        let mut tx = self.begin().await?;
        let mut message_ids = Vec::new();
        for (device, seq) in envelopes {
            let deleted: Option<i64> = sqlx::query_scalar(
                "DELETE FROM mailbox WHERE device_id = $1 AND seq = $2 AND device_id IN (
                     SELECT d.id FROM devices d JOIN accounts a ON a.id = d.account_id
                     WHERE a.region = $3 AND a.relocating_to IS NULL AND a.relocating_from IS NULL)
                 RETURNING message_id",
            )
            .bind(device.as_bytes().as_slice())
            .bind(to_i64(*seq))
            .bind(region)
            .fetch_optional(&mut *tx)
            .await?;
            message_ids.extend(deleted);
        }
        let deleted = message_ids.len() as u64;
        delete_unreferenced_messages(&mut tx, message_ids).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn import_envelopes_once(&self, envelopes: &[StoredEnvelope]) -> Result<u64, TxError> {
        let mut tx = self.begin().await?;
        let mut imported = 0;
        for envelope in envelopes {
            sqlx::query(
                "INSERT INTO messages (id, body, received_at, expires_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(to_i64(envelope.message_id))
            .bind(envelope.body.0.as_slice())
            .bind(to_i64(envelope.received_at))
            .bind(to_i64(envelope.expires_at))
            .execute(&mut *tx)
            .await?;
            imported += sqlx::query(
                "INSERT INTO mailbox (device_id, seq, message_id) VALUES ($1, $2, $3)
                 ON CONFLICT (device_id, seq) DO NOTHING",
            )
            .bind(envelope.device.as_bytes().as_slice())
            .bind(to_i64(envelope.seq))
            .bind(to_i64(envelope.message_id))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(imported)
    }

    async fn delete_mailboxes_once(&self, devices: &[DeviceId]) -> Result<u64, TxError> {
        let ids: Vec<Vec<u8>> = devices.iter().map(|d| d.as_bytes().to_vec()).collect();
        let mut tx = self.begin().await?;
        let message_ids: Vec<i64> =
            sqlx::query_scalar("DELETE FROM mailbox WHERE device_id = ANY($1) RETURNING message_id")
                .bind(ids)
                .fetch_all(&mut *tx)
                .await?;
        let deleted = message_ids.len() as u64;
        delete_unreferenced_messages(&mut tx, message_ids).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn replace_key_packages_once(
        &self,
        devices: &[DeviceId],
        packages: &[StoredKeyPackage],
    ) -> Result<(), TxError> {
        let ids: Vec<Vec<u8>> = devices.iter().map(|d| d.as_bytes().to_vec()).collect();
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM key_packages WHERE device_id = ANY($1)")
            .bind(ids)
            .execute(&mut *tx)
            .await?;
        for package in packages {
            sqlx::query("INSERT INTO key_packages (device_id, key_package, last_resort) VALUES ($1, $2, $3)")
                .bind(package.device.as_bytes().as_slice())
                .bind(package.key_package.0.as_slice())
                .bind(package.last_resort)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim_device_key_packages_once(
        &self,
        devices: &[DeviceId],
    ) -> Result<Vec<(DeviceId, Ciphertext)>, TxError> {
        let mut tx = self.begin().await?;
        // A region has no device rows to lock: claims of one device queue on an advisory lock
        // keyed by its id (taken in id order, so two claims cannot deadlock), so that no one-time
        // package goes to two claimers.
        let mut ordered = devices.to_vec();
        ordered.sort_unstable();
        ordered.dedup();
        for device in &ordered {
            sqlx::query("SELECT pg_advisory_xact_lock(('x' || encode(substr($1, 1, 8), 'hex'))::bit(64)::bigint)")
                .bind(device.as_bytes().as_slice())
                .execute(&mut *tx)
                .await?;
        }
        let mut claimed = Vec::new();
        for device in devices {
            let (id, key_package, last_resort): (i64, Vec<u8>, bool) = sqlx::query_as(
                "SELECT id, key_package, last_resort FROM key_packages WHERE device_id = $1
                 ORDER BY last_resort, id LIMIT 1",
            )
            .bind(device.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StorageError::NoKeyPackage)?;
            if !last_resort {
                sqlx::query("DELETE FROM key_packages WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            claimed.push((*device, Ciphertext(key_package)));
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn delete_sealed_once(&self, account: AccountId) -> Result<(), TxError> {
        let mut tx = self.begin().await?;
        for statement in [
            "DELETE FROM profiles WHERE account_id = $1",
            "DELETE FROM avatars WHERE account_id = $1",
        ] {
            sqlx::query(statement)
                .bind(account.as_bytes().as_slice())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
