//! The operator-access transparency log on the server side: the log key, appending entries with a
//! freshly signed tree head, and the public read endpoints (head, entries, proofs).
//!
//! Appends are write-ahead: the admin API calls [`AuditLog::append`] and acts only once the entry
//! and its signed head are durable; if the append fails, the operation fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use ed25519_dalek::SigningKey;
use fumi_audit::merkle::{self, leaf_hash};
use fumi_audit::{ConsistencyProof, EntriesPage, Entry, InclusionProof, SignedTreeHead, TreeHead, encode_path};
use rand::RngCore;
use serde::Deserialize;

use crate::auth::AuthDevice;
use crate::error::ApiError;
use crate::storage::{Storage, StorageError};
use crate::{AppState, now_ms};

/// Most entries in one page.
pub const MAX_ENTRIES_PER_PAGE: u64 = fumi_audit::verify::PAGE_SIZE;

/// The log's signing key and the lock that serialises this process's appends.
pub struct AuditLog {
    key: SigningKey,
    append: tokio::sync::Mutex<()>,
}

/// Why the log key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("audit log key {path}: {reason}")]
pub struct KeyFileError {
    path: PathBuf,
    reason: String,
}

impl AuditLog {
    /// Loads the log key from `path` (64 hex digits), creating it (mode 0600) if missing.
    pub fn open(path: &Path) -> Result<Self, KeyFileError> {
        let error = |reason: String| KeyFileError {
            path: path.to_owned(),
            reason,
        };
        let seed: [u8; 32] = match std::fs::read_to_string(path) {
            Ok(text) => hex::decode(text.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| error("not 64 hex digits".into()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                rand::rng().fill_bytes(&mut seed);
                write_private(path, &hex::encode(seed)).map_err(|e| error(e.to_string()))?;
                seed
            }
            Err(e) => return Err(error(e.to_string())),
        };
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
            append: tokio::sync::Mutex::new(()),
        })
    }

    /// The log key, which also signs the key directory's epochs.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The log's public key, hex.
    pub fn public_key(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Signs and stores the empty log's head if the log has none.
    pub async fn init(&self, storage: &dyn Storage) -> Result<(), StorageError> {
        let head = TreeHead {
            tree_size: 0,
            timestamp: now_ms(),
            root_hash: merkle::root(&[]),
        }
        .sign(&self.key);
        storage.init_audit_head(&to_json(&head)).await?;
        // Nodes of a cluster share one log: each must sign with the key that signed it so far.
        let latest = storage.audit_head().await?.unwrap_or_default();
        let signer = serde_json::from_str::<SignedTreeHead>(&latest)
            .map_err(|_| StorageError::Database("the stored transparency log head is not JSON".into()))?
            .log_key;
        if signer != self.public_key() {
            return Err(StorageError::Database(format!(
                "this node's transparency log key ({}) is not the key that signed the log ({signer}): \
                 copy audit-log.key from the node that created the log into this node's data directory",
                self.public_key()
            )));
        }
        Ok(())
    }

    /// Appends an entry and the signed head of the log it ends; returns the entry's index.
    pub async fn append(&self, storage: &dyn Storage, entry: &Entry) -> Result<u64, StorageError> {
        let _serialised = self.append.lock().await;
        let bytes = entry.to_bytes();
        let leaf = leaf_hash(&bytes);
        // Another node may append between our read and our write; its transaction then makes
        // ours fail with a conflict, and we retry on the new size.
        for _ in 0..8 {
            let size = storage.audit_size().await?;
            let mut leaves = storage.audit_leaf_hashes(size).await?;
            leaves.push(leaf);
            let head = TreeHead {
                tree_size: size + 1,
                timestamp: now_ms(),
                root_hash: merkle::root(&leaves),
            }
            .sign(&self.key);
            match storage.append_audit(size, &bytes, &leaf, &to_json(&head)).await {
                Ok(()) => return Ok(size),
                Err(StorageError::AuditConflict) => continue,
                Err(error) => return Err(error),
            }
        }
        Err(StorageError::AuditConflict)
    }
}

fn to_json(head: &SignedTreeHead) -> String {
    serde_json::to_string(head).expect("heads serialise")
}

/// Writes a secret file readable only by its owner.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// `GET /v1/audit/head`: the latest signed tree head.
pub async fn head(State(state): State<Arc<AppState>>) -> Result<Json<SignedTreeHead>, ApiError> {
    let text = state
        .storage
        .audit_head()
        .await?
        .ok_or_else(|| ApiError::internal("the audit log has no head"))?;
    let head = serde_json::from_str(&text).map_err(ApiError::internal)?;
    Ok(Json(head))
}

/// Query of `GET /v1/audit/entries`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    start: u64,
    end: u64,
}

/// `GET /v1/audit/entries?start=&end=`: stored entries `start..end` (at most 256).
pub async fn entries(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Range>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EntriesPage>, ApiError> {
    let Query(Range { start, end }) = query.map_err(|e| ApiError::bad_request(format!("start and end: {e}")))?;
    if end <= start || end - start > MAX_ENTRIES_PER_PAGE {
        return Err(ApiError::bad_request(format!(
            "end must be greater than start, by at most {MAX_ENTRIES_PER_PAGE}"
        )));
    }
    let entries = state
        .storage
        .audit_entries(start, end)
        .await?
        .into_iter()
        .map(|bytes| String::from_utf8(bytes).map_err(ApiError::internal))
        .collect::<Result<_, _>>()?;
    Ok(Json(EntriesPage { start, entries }))
}

/// Query of `GET /v1/audit/proof/inclusion`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionQuery {
    index: u64,
    tree_size: u64,
}

/// `GET /v1/audit/proof/inclusion?index=&tree_size=`.
pub async fn inclusion_proof(
    State(state): State<Arc<AppState>>,
    query: Result<Query<InclusionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<InclusionProof>, ApiError> {
    let Query(InclusionQuery { index, tree_size }) =
        query.map_err(|e| ApiError::bad_request(format!("index and tree_size: {e}")))?;
    let leaves = leaves_of_tree(&state, tree_size).await?;
    let path = merkle::inclusion_proof(&leaves, index).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(InclusionProof {
        index,
        tree_size,
        path: encode_path(&path),
    }))
}

/// Query of `GET /v1/audit/proof/consistency`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyQuery {
    first: u64,
    second: u64,
}

/// `GET /v1/audit/proof/consistency?first=&second=`.
pub async fn consistency_proof(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ConsistencyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ConsistencyProof>, ApiError> {
    let Query(ConsistencyQuery { first, second }) =
        query.map_err(|e| ApiError::bad_request(format!("first and second: {e}")))?;
    let leaves = leaves_of_tree(&state, second).await?;
    let path = merkle::consistency_proof(&leaves, first).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(ConsistencyProof {
        first,
        second,
        path: encode_path(&path),
    }))
}

/// The leaf hashes of the tree of `tree_size` entries, which must not exceed the log.
async fn leaves_of_tree(state: &AppState, tree_size: u64) -> Result<Vec<[u8; 32]>, ApiError> {
    let size = state.storage.audit_size().await?;
    if tree_size > size {
        return Err(ApiError::bad_request(format!(
            "tree_size {tree_size} exceeds the log's {size} entries"
        )));
    }
    Ok(state.storage.audit_leaf_hashes(tree_size).await?)
}

/// `GET /v1/audit/key`: the caller's account audit key, to find the entries that name it.
pub async fn account_key(
    State(state): State<Arc<AppState>>,
    auth: AuthDevice,
) -> Result<Json<fumi_proto::AuditKey>, ApiError> {
    let key = state.storage.audit_key(auth.account).await?;
    Ok(Json(fumi_proto::AuditKey {
        audit_key: key.to_vec().into(),
    }))
}
