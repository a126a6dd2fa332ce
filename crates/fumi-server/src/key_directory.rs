//! The key directory on the server side: akd over Fumi's storage, the epoch publisher and the
//! endpoints clients and auditors read.
//!
//! What goes in is decided by the database: triggers mark every account and username hash whose
//! directory value may have changed (an account created or deleted, a device added, given its
//! signature key or removed, a username claimed or given up) in the same transaction as the
//! change. The publisher turns the marks into one akd epoch at a time and signs each epoch's root
//! with the transparency-log key, so one key vouches for both logs. A change therefore reaches the
//! directory within one epoch interval, even across a crash.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use akd::storage::types::{DbRecord, KeyData, ValueState, ValueStateRetrievalFlag};
use akd::storage::{Database, DbSetState, Storable, StorageManager};
use akd::tree_node::{TreeNode, TreeNodeWithPreviousValue};
use akd::{AkdLabel, AkdValue, AzksParallelismConfig, NodeLabel};
use async_trait::async_trait;
use axum::Json;
use axum::extract::{Path, Query, State};
use ed25519_dalek::SigningKey;
use fumi_audit::keys::{
    AccountEntry, AuditAnswer, Config, DeviceKey, EpochHead, HistoryAnswer, LookupAnswer, SignedEpochHead,
    UsernameEntry, account_label, username_label,
};
use fumi_proto::{AccountId, ErrorCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::AuthDevice;
use crate::error::ApiError;
use crate::storage::{KeyDirectoryKind, KeyDirectoryPending, KeyDirectoryState, Storage, StorageError};
use crate::{AppState, now_ms};

/// Marks turned into one epoch at most (a backlog is published over several epochs).
const MAX_UPDATES_PER_EPOCH: u32 = 20_000;
/// Epochs covered by one append-only proof request.
pub const MAX_AUDIT_EPOCHS: u64 = 100;
/// Heads returned by one `GET /v1/keys/heads`.
pub const MAX_HEADS_PER_PAGE: u32 = 1000;

type Directory = akd::Directory<Config, DirectoryStore, DirectoryVrf>;

/// The server's key directory.
pub struct KeyDirectory {
    /// The publisher's directory: its akd transaction holds an epoch's writes while it publishes.
    directory: Directory,
    /// Lookups, histories and audits read through their own directory, so they never see the
    /// publisher's transaction (which akd clears before it reaches the database).
    reader: Directory,
    storage: Arc<dyn Storage>,
    signing_key: SigningKey,
    vrf_public_key: [u8; 32],
    /// This process's id for the publisher lease (one publisher per database).
    node: [u8; 16],
    publishing: tokio::sync::Mutex<()>,
    #[cfg(feature = "test-hooks")]
    hidden: crate::test_hooks::HiddenDevices,
}

impl KeyDirectory {
    /// Opens the directory stored in `storage`. The VRF key is derived from the log key, so
    /// every node of a cluster (which must share the log key) computes the same labels.
    pub async fn open(storage: Arc<dyn Storage>, log_key: &SigningKey) -> Result<Self, StorageError> {
        let vrf_secret: [u8; 32] = Sha256::new()
            .chain_update(b"fumi key directory vrf v1")
            .chain_update(log_key.to_bytes())
            .finalize()
            .into();
        let vrf = DirectoryVrf(vrf_secret);
        let vrf_public_key = akd::ecvrf::VRFKeyStorage::get_vrf_public_key(&vrf)
            .await
            .map_err(|e| StorageError::Database(format!("key directory VRF key: {e}")))?
            .to_bytes();
        let node: [u8; 16] = rand::random();
        // No cache: nodes of a cluster read each other's epochs straight from the database.
        let manager = StorageManager::new_no_cache(DirectoryStore {
            storage: storage.clone(),
            node,
        });
        // Creating the directory writes its first record: a publisher's right. Two nodes starting
        // on a fresh database take turns; the second finds the record made.
        let mut attempts = 0;
        let directory = loop {
            storage.kt_lease(&node, now_ms(), PUBLISHER_LEASE_MIN_MS).await?;
            match Directory::new(manager.clone(), vrf.clone(), AzksParallelismConfig::disabled()).await {
                Ok(directory) => break directory,
                Err(e) if attempts < 60 => {
                    attempts += 1;
                    tracing::info!(error = %e, "waiting for another node to create the key directory");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(akd_error(e)),
            }
        };
        let reader = Directory::new(
            StorageManager::new_no_cache(DirectoryStore {
                storage: storage.clone(),
                node,
            }),
            vrf.clone(),
            AzksParallelismConfig::disabled(),
        )
        .await
        .map_err(akd_error)?;
        let this = Self {
            directory,
            reader,
            storage,
            signing_key: log_key.clone(),
            vrf_public_key,
            node,
            publishing: tokio::sync::Mutex::new(()),
            #[cfg(feature = "test-hooks")]
            hidden: Default::default(),
        };
        this.sign_current_epoch().await?;
        this.record_old_signature_keys().await?;
        Ok(this)
    }

    /// Devices registered before the key directory existed get their signature key from a
    /// KeyPackage they stored (the key must be listed for anyone to encrypt to them).
    async fn record_old_signature_keys(&self) -> Result<(), StorageError> {
        for (device, key_package) in self.storage.devices_without_signature_key().await? {
            match crate::framing::device_signature_key([key_package.0.as_slice()]) {
                Ok(Some(key)) => {
                    self.storage.set_signature_key(device, &key).await?;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(device = %device.redacted(), error = %e, "a stored key package is unusable"),
            }
        }
        Ok(())
    }

    /// Signs and stores the head of the directory's newest epoch if it has none (the first
    /// start, or a publisher that stopped between publishing and signing).
    async fn sign_current_epoch(&self) -> Result<(), StorageError> {
        let akd::EpochHash(epoch, root_hash) = self.directory.get_epoch_hash().await.map_err(akd_error)?;
        let latest = self.storage.kt_latest_head().await?.map(|(epoch, _)| epoch);
        if latest.is_some_and(|latest| latest >= epoch) {
            return Ok(());
        }
        let head = EpochHead {
            epoch,
            root_hash,
            vrf_public_key: self.vrf_public_key,
            published_at: now_ms(),
        }
        .sign(&self.signing_key);
        self.storage
            .kt_put_head(epoch, &serde_json::to_string(&head).expect("head serialises"))
            .await
    }

    /// Publishes one epoch with every marked change, if there is any and this node holds the
    /// publisher lease; returns the new epoch.
    pub async fn publish_pending(&self, lease_ms: u64) -> Result<Option<u64>, StorageError> {
        let _one_at_a_time = self.publishing.lock().await;
        if !self.storage.kt_lease(&self.node, now_ms(), lease_ms).await? {
            return Ok(None);
        }
        self.sign_current_epoch().await?;
        let marks = self.storage.kt_pending(MAX_UPDATES_PER_EPOCH).await?;
        if marks.is_empty() {
            return Ok(None);
        }
        let mut wanted = Vec::with_capacity(marks.len());
        for mark in &marks {
            wanted.push(self.current_value(mark).await?);
        }
        // A mark whose value is already the published one (a change undone, a repeated claim)
        // makes no new version: an account's history lists real changes only.
        let labels: Vec<Vec<u8>> = wanted.iter().map(|(label, _)| label.0.clone()).collect();
        let mut published: HashMap<Vec<u8>, (u64, Vec<u8>)> = HashMap::new();
        for state in self.storage.kt_states(&labels).await? {
            let value = decode_value_state(&state.record)?.value.0;
            published.insert(state.label.clone(), (state.epoch, value));
        }
        let updates: Vec<(AkdLabel, AkdValue)> = wanted
            .into_iter()
            .filter(|(label, value)| published.get(&label.0).is_none_or(|(_, current)| *current != value.0))
            .collect();
        let epoch = if updates.is_empty() {
            None
        } else {
            let count = updates.len();
            let akd::EpochHash(epoch, _) = self.directory.publish(updates).await.map_err(akd_error)?;
            self.sign_current_epoch().await?;
            tracing::info!(epoch, changes = count, "key directory epoch published");
            Some(epoch)
        };
        self.storage.kt_clear_pending(&marks).await?;
        Ok(epoch)
    }

    /// The label and value a marked account or username should have now.
    async fn current_value(&self, mark: &KeyDirectoryPending) -> Result<(AkdLabel, AkdValue), StorageError> {
        match mark.kind {
            KeyDirectoryKind::Account => {
                let account = AccountId::from_slice(&mark.id)
                    .map_err(|_| StorageError::Database("corrupt key directory mark".into()))?;
                let entry = match self.storage.device_keys(account).await? {
                    None => AccountEntry::deleted(),
                    Some((identity_key, devices)) => AccountEntry {
                        identity_key: identity_key
                            .as_slice()
                            .try_into()
                            .map_err(|_| StorageError::Database("corrupt identity key".into()))?,
                        devices: devices
                            .into_iter()
                            .filter(|(_device, _)| {
                                #[cfg(feature = "test-hooks")]
                                if self.hidden.contains(_device) {
                                    return false;
                                }
                                true
                            })
                            .map(|(device, signature_key)| DeviceKey {
                                device: *device.as_bytes(),
                                signature_key,
                            })
                            .collect(),
                    },
                };
                Ok((account_label(account.as_bytes()), entry.encode()))
            }
            KeyDirectoryKind::Username => {
                let hash: [u8; 32] = mark
                    .id
                    .as_slice()
                    .try_into()
                    .map_err(|_| StorageError::Database("corrupt key directory mark".into()))?;
                let account = self.storage.lookup_username(&hash).await?;
                let entry = UsernameEntry {
                    account: account.map(|a| *a.as_bytes()),
                };
                Ok((username_label(&hash), entry.encode()))
            }
        }
    }

    /// Keeps a device out of the directory (a test hook playing a lying operator).
    #[cfg(feature = "test-hooks")]
    pub fn hide_device(&self, device: fumi_proto::DeviceId) {
        self.hidden.insert(device);
    }

    /// The newest signed head.
    pub async fn head(&self) -> Result<SignedEpochHead, StorageError> {
        let (_, head) = self
            .storage
            .kt_latest_head()
            .await?
            .ok_or_else(|| StorageError::Database("the key directory has no signed head".into()))?;
        parse_head(&head)
    }

    /// The signed head of `epoch`, if stored.
    async fn head_of(&self, epoch: u64) -> Result<Option<SignedEpochHead>, StorageError> {
        match self.storage.kt_heads(epoch, 1).await?.into_iter().next() {
            Some(head) => {
                let head = parse_head(&head)?;
                Ok((head.epoch == epoch).then_some(head))
            }
            None => Ok(None),
        }
    }
}

fn parse_head(text: &str) -> Result<SignedEpochHead, StorageError> {
    serde_json::from_str(text).map_err(|_| StorageError::Database("a stored key directory head is not JSON".into()))
}

fn akd_error(error: akd::errors::AkdError) -> StorageError {
    StorageError::Database(format!("key directory: {error}"))
}

/// The VRF secret, derived from the log key.
#[derive(Clone)]
struct DirectoryVrf([u8; 32]);

#[async_trait]
impl akd::ecvrf::VRFKeyStorage for DirectoryVrf {
    async fn retrieve(&self) -> Result<Vec<u8>, akd::ecvrf::VrfError> {
        Ok(self.0.to_vec())
    }
}

// --- akd's Database on Fumi's storage ---------------------------------------------------------

/// akd's storage interface over the server's [`Storage`]: tree records in `kt_nodes` by akd's
/// binary key, value states in `kt_states` by label and epoch.
#[derive(Clone)]
struct DirectoryStore {
    storage: Arc<dyn Storage>,
    /// Writes carry the node's id: only the lease holder's are accepted.
    node: [u8; 16],
}

type AkdStorageError = akd::errors::StorageError;

fn storage_error(error: StorageError) -> AkdStorageError {
    AkdStorageError::Connection(error.to_string())
}

fn corrupt(what: &str) -> AkdStorageError {
    AkdStorageError::Other(format!("corrupt key directory record: {what}"))
}

#[async_trait]
impl Database for DirectoryStore {
    async fn set(&self, record: DbRecord) -> Result<(), AkdStorageError> {
        self.batch_set(vec![record], DbSetState::General).await
    }

    async fn batch_set(&self, records: Vec<DbRecord>, _state: DbSetState) -> Result<(), AkdStorageError> {
        let mut nodes = Vec::new();
        let mut states = Vec::new();
        for record in records {
            match &record {
                DbRecord::ValueState(state) => states.push(KeyDirectoryState {
                    label: state.username.0.clone(),
                    epoch: state.epoch,
                    version: state.version,
                    record: encode_value_state(state),
                }),
                DbRecord::Azks(azks) => {
                    let mut bytes = vec![RECORD_AZKS];
                    bytes.extend_from_slice(&azks.latest_epoch.to_be_bytes());
                    bytes.extend_from_slice(&azks.num_nodes.to_be_bytes());
                    nodes.push((record.get_full_binary_id(), bytes));
                }
                DbRecord::TreeNode(node) => nodes.push((record.get_full_binary_id(), encode_tree_node(node))),
            }
        }
        self.storage
            .kt_write(&self.node, nodes, states)
            .await
            .map_err(storage_error)
    }

    async fn get<St: Storable>(&self, id: &St::StorageKey) -> Result<DbRecord, AkdStorageError> {
        self.batch_get::<St>(std::slice::from_ref(id))
            .await?
            .pop()
            .ok_or_else(|| AkdStorageError::NotFound(format!("{:?}", id)))
    }

    async fn batch_get<St: Storable>(&self, ids: &[St::StorageKey]) -> Result<Vec<DbRecord>, AkdStorageError> {
        let keys: Vec<Vec<u8>> = ids.iter().map(St::get_full_binary_key_id).collect();
        if matches!(St::data_type(), akd::storage::types::StorageType::ValueState) {
            let mut wanted: BTreeMap<Vec<u8>, Vec<u64>> = BTreeMap::new();
            for key in &keys {
                let key = ValueState::key_from_full_binary(key).map_err(AkdStorageError::Other)?;
                wanted.entry(key.0).or_default().push(key.1);
            }
            let labels: Vec<Vec<u8>> = wanted.keys().cloned().collect();
            let mut found = Vec::new();
            for state in self.storage.kt_states(&labels).await.map_err(storage_error)? {
                if wanted
                    .get(&state.label)
                    .is_some_and(|epochs| epochs.contains(&state.epoch))
                {
                    found.push(DbRecord::ValueState(
                        decode_value_state(&state.record).map_err(storage_error)?,
                    ));
                }
            }
            return Ok(found);
        }
        let mut found = Vec::with_capacity(keys.len());
        for (_, record) in self.storage.kt_nodes(&keys).await.map_err(storage_error)? {
            found.push(decode_node_record(&record)?);
        }
        Ok(found)
    }

    async fn get_user_data(&self, label: &AkdLabel) -> Result<KeyData, AkdStorageError> {
        let mut states = Vec::new();
        for state in self
            .storage
            .kt_states(std::slice::from_ref(&label.0))
            .await
            .map_err(storage_error)?
        {
            states.push(decode_value_state(&state.record).map_err(storage_error)?);
        }
        if states.is_empty() {
            return Err(AkdStorageError::NotFound(format!("no value for {label:?}")));
        }
        Ok(KeyData { states })
    }

    async fn get_user_state(
        &self,
        label: &AkdLabel,
        flag: ValueStateRetrievalFlag,
    ) -> Result<ValueState, AkdStorageError> {
        let states = self.get_user_data(label).await?.states;
        select_state(&states, flag).ok_or_else(|| AkdStorageError::NotFound(format!("no such state of {label:?}")))
    }

    async fn get_user_state_versions(
        &self,
        labels: &[AkdLabel],
        flag: ValueStateRetrievalFlag,
    ) -> Result<HashMap<AkdLabel, (u64, AkdValue)>, AkdStorageError> {
        let raw: Vec<Vec<u8>> = labels.iter().map(|l| l.0.clone()).collect();
        let mut by_label: HashMap<Vec<u8>, Vec<ValueState>> = HashMap::new();
        for state in self.storage.kt_states(&raw).await.map_err(storage_error)? {
            by_label
                .entry(state.label.clone())
                .or_default()
                .push(decode_value_state(&state.record).map_err(storage_error)?);
        }
        Ok(by_label
            .into_iter()
            .filter_map(|(label, states)| {
                select_state(&states, flag).map(|state| (AkdLabel(label), (state.version, state.value)))
            })
            .collect())
    }
}

/// The state a retrieval flag asks for among one label's states.
fn select_state(states: &[ValueState], flag: ValueStateRetrievalFlag) -> Option<ValueState> {
    let found = match flag {
        ValueStateRetrievalFlag::SpecificVersion(version) => states.iter().find(|s| s.version == version),
        ValueStateRetrievalFlag::SpecificEpoch(epoch) => states.iter().find(|s| s.epoch == epoch),
        ValueStateRetrievalFlag::LeqEpoch(epoch) => states.iter().filter(|s| s.epoch <= epoch).max_by_key(|s| s.epoch),
        ValueStateRetrievalFlag::MaxEpoch => states.iter().max_by_key(|s| s.epoch),
        ValueStateRetrievalFlag::MinEpoch => states.iter().min_by_key(|s| s.epoch),
    };
    found.cloned()
}

// --- record encoding ----------------------------------------------------------------------------

const RECORD_AZKS: u8 = 1;
const RECORD_TREE_NODE: u8 = 2;

fn put_label(out: &mut Vec<u8>, label: &NodeLabel) {
    out.extend_from_slice(&label.label_len.to_be_bytes());
    out.extend_from_slice(&label.label_val);
}

fn put_optional_label(out: &mut Vec<u8>, label: &Option<NodeLabel>) {
    match label {
        Some(label) => {
            out.push(1);
            put_label(out, label);
        }
        None => out.push(0),
    }
}

fn put_node(out: &mut Vec<u8>, node: &TreeNode) {
    out.extend_from_slice(&node.last_epoch.to_be_bytes());
    out.extend_from_slice(&node.min_descendant_epoch.to_be_bytes());
    put_label(out, &node.parent);
    out.push(node.node_type as u8);
    put_optional_label(out, &node.left_child);
    put_optional_label(out, &node.right_child);
    out.extend_from_slice(&node.hash.0);
}

fn encode_tree_node(node: &TreeNodeWithPreviousValue) -> Vec<u8> {
    let mut out = vec![RECORD_TREE_NODE];
    put_label(&mut out, &node.label);
    put_node(&mut out, &node.latest_node);
    match &node.previous_node {
        Some(previous) => {
            out.push(1);
            put_node(&mut out, previous);
        }
        None => out.push(0),
    }
    out
}

fn encode_value_state(state: &ValueState) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(state.value.0.len() as u32).to_be_bytes());
    out.extend_from_slice(&state.value.0);
    out.extend_from_slice(&state.version.to_be_bytes());
    put_label(&mut out, &state.label);
    out.extend_from_slice(&state.epoch.to_be_bytes());
    out.extend_from_slice(&(state.username.0.len() as u32).to_be_bytes());
    out.extend_from_slice(&state.username.0);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    fn array32(&mut self) -> Option<[u8; 32]> {
        self.take(32).map(|b| b.try_into().expect("32 bytes"))
    }
    fn label(&mut self) -> Option<(u32, [u8; 32])> {
        Some((self.u32()?, self.array32()?))
    }
    fn optional_label(&mut self) -> Option<Option<NodeLabel>> {
        match self.u8()? {
            0 => Some(None),
            1 => {
                let (len, val) = self.label()?;
                Some(Some(NodeLabel::new(val, len)))
            }
            _ => None,
        }
    }
}

/// The fields of one encoded tree node, in `build_tree_node_with_previous_value`'s terms.
struct NodeFields {
    last_epoch: u64,
    min_descendant_epoch: u64,
    parent: (u32, [u8; 32]),
    node_type: u8,
    left: Option<NodeLabel>,
    right: Option<NodeLabel>,
    hash: [u8; 32],
}

fn read_node(reader: &mut Reader<'_>) -> Option<NodeFields> {
    Some(NodeFields {
        last_epoch: reader.u64()?,
        min_descendant_epoch: reader.u64()?,
        parent: reader.label()?,
        node_type: reader.u8()?,
        left: reader.optional_label()?,
        right: reader.optional_label()?,
        hash: reader.array32()?,
    })
}

fn decode_node_record(bytes: &[u8]) -> Result<DbRecord, AkdStorageError> {
    let mut reader = Reader(bytes);
    match reader.u8() {
        Some(RECORD_AZKS) => {
            let latest_epoch = reader.u64().ok_or_else(|| corrupt("azks"))?;
            let num_nodes = reader.u64().ok_or_else(|| corrupt("azks"))?;
            Ok(DbRecord::Azks(DbRecord::build_azks(latest_epoch, num_nodes)))
        }
        Some(RECORD_TREE_NODE) => {
            let (label_len, label_val) = reader.label().ok_or_else(|| corrupt("tree node"))?;
            let latest = read_node(&mut reader).ok_or_else(|| corrupt("tree node"))?;
            let previous = match reader.u8() {
                Some(0) => None,
                Some(1) => Some(read_node(&mut reader).ok_or_else(|| corrupt("tree node"))?),
                _ => return Err(corrupt("tree node")),
            };
            if !reader.0.is_empty() {
                return Err(corrupt("tree node"));
            }
            Ok(DbRecord::TreeNode(DbRecord::build_tree_node_with_previous_value(
                label_val,
                label_len,
                latest.last_epoch,
                latest.min_descendant_epoch,
                latest.parent.1,
                latest.parent.0,
                latest.node_type,
                latest.left,
                latest.right,
                latest.hash,
                previous.as_ref().map(|p| p.last_epoch),
                previous.as_ref().map(|p| p.min_descendant_epoch),
                previous.as_ref().map(|p| p.parent.1),
                previous.as_ref().map(|p| p.parent.0),
                previous.as_ref().map(|p| p.node_type),
                previous.as_ref().and_then(|p| p.left),
                previous.as_ref().and_then(|p| p.right),
                previous.as_ref().map(|p| p.hash),
            )))
        }
        _ => Err(corrupt("unknown kind")),
    }
}

fn decode_value_state(bytes: &[u8]) -> Result<ValueState, StorageError> {
    let bad = || StorageError::Database("corrupt key directory value state".into());
    let mut reader = Reader(bytes);
    let value_len = reader.u32().ok_or_else(bad)? as usize;
    let value = reader.take(value_len).ok_or_else(bad)?.to_vec();
    let version = reader.u64().ok_or_else(bad)?;
    let (label_len, label_val) = reader.label().ok_or_else(bad)?;
    let epoch = reader.u64().ok_or_else(bad)?;
    let username_len = reader.u32().ok_or_else(bad)? as usize;
    let username = reader.take(username_len).ok_or_else(bad)?.to_vec();
    if !reader.0.is_empty() {
        return Err(bad());
    }
    Ok(DbRecord::build_user_state(
        username, value, version, label_len, label_val, epoch,
    ))
}

// --- the publisher --------------------------------------------------------------------------------

/// Publishes marked changes every `key_directory_epoch_ms`.
pub async fn publish_epochs(state: Arc<AppState>) {
    let interval = Duration::from_millis(state.config.key_directory_epoch_ms.max(10));
    let lease_ms = publisher_lease_ms(state.config.key_directory_epoch_ms);
    let mut stop = state.shutdown.clone();
    loop {
        if let Err(e) = state.keys.publish_pending(lease_ms).await {
            tracing::warn!(error = %e, "could not publish a key directory epoch; retrying next interval");
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
    }
    // Another node (or this one, restarted) takes over at once rather than after the lease.
    if let Err(e) = state.storage.kt_release_lease(&state.keys.node).await {
        tracing::warn!(error = %e, "could not give up the key directory publisher lease");
    }
}

/// How long the publisher lease lasts: renewed every interval, so two intervals, but at least
/// half a minute and at most a minute (a crashed publisher's successor waits that long). A
/// publish that outlasts its lease is safe: the write is fenced on the lease (`kt_write`).
fn publisher_lease_ms(interval_ms: u64) -> u64 {
    interval_ms.saturating_mul(2).clamp(PUBLISHER_LEASE_MIN_MS, 60_000)
}

/// The shortest publisher lease.
const PUBLISHER_LEASE_MIN_MS: u64 = 30_000;

// --- endpoints ------------------------------------------------------------------------------------

/// Answer to `GET /v1/keys/head`.
#[derive(Debug, Serialize)]
pub struct HeadAnswer {
    /// The newest signed epoch head.
    pub head: SignedEpochHead,
    /// How often changes are published, ms: a change is in the directory within this time.
    pub epoch_interval_ms: u64,
}

/// `GET /v1/keys/head` (public): the newest signed epoch head.
pub async fn head(State(state): State<Arc<AppState>>) -> Result<Json<HeadAnswer>, ApiError> {
    Ok(Json(HeadAnswer {
        head: state.keys.head().await?,
        epoch_interval_ms: state.config.key_directory_epoch_ms,
    }))
}

/// Query of `GET /v1/keys/heads`.
#[derive(Debug, Deserialize)]
pub struct HeadsQuery {
    from: u64,
    #[serde(default)]
    limit: Option<u32>,
}

/// `GET /v1/keys/heads?from=E&limit=N` (public): signed heads from epoch E on.
pub async fn heads(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HeadsQuery>,
) -> Result<Json<Vec<SignedEpochHead>>, ApiError> {
    let limit = query.limit.unwrap_or(MAX_HEADS_PER_PAGE).clamp(1, MAX_HEADS_PER_PAGE);
    let heads = state.storage.kt_heads(query.from, limit).await?;
    Ok(Json(
        heads.iter().map(|h| parse_head(h)).collect::<Result<Vec<_>, _>>()?,
    ))
}

fn not_published(what: &str, interval_ms: u64) -> ApiError {
    ApiError::new(
        ErrorCode::NotInKeyDirectory,
        format!(
            "{what} is not in the key directory (new entries are published within {} s)",
            interval_ms.div_ceil(1000)
        ),
    )
}

impl KeyDirectory {
    /// Looks `label` up and pairs the proof with its epoch's signed head; `what` names the
    /// entry in the error when it is not published (yet).
    pub async fn lookup(&self, label: AkdLabel, what: &str, interval_ms: u64) -> Result<LookupAnswer, ApiError> {
        let (proof, epoch) = self
            .read_one_epoch(what, interval_ms, || self.reader.lookup(label.clone()))
            .await?;
        let head = self.head_of(epoch).await?.ok_or_else(retry_later)?;
        Ok(LookupAnswer {
            head,
            proof: fumi_audit::keys::encode_lookup_proof(&proof),
        })
    }

    /// Every version of `label` with proof, paired with its epoch's signed head.
    pub async fn history(&self, label: AkdLabel, what: &str, interval_ms: u64) -> Result<HistoryAnswer, ApiError> {
        let (proof, epoch) = self
            .read_one_epoch(what, interval_ms, || {
                self.reader.key_history(&label, akd::HistoryParams::Complete)
            })
            .await?;
        let head = self.head_of(epoch).await?.ok_or_else(retry_later)?;
        Ok(HistoryAnswer {
            head,
            proof: fumi_audit::keys::encode_history_proof(&proof),
        })
    }

    /// Runs a read of the tree and returns it with its epoch, once the read is known to come
    /// from that one epoch: no epoch was published (by this node or another of the cluster)
    /// while it ran. akd's history reads the directory's epoch again for each version, and
    /// keeps only each node's newest two versions, so a read overlapping a publication can
    /// combine two epochs and its proof would not verify. Such a read is done again; after a
    /// few tries the client is told to try later.
    async fn read_one_epoch<T, F, Fut>(&self, what: &str, interval_ms: u64, read: F) -> Result<(T, u64), ApiError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(T, akd::EpochHash), akd::errors::AkdError>>,
    {
        for _ in 0..3 {
            let akd::EpochHash(before, _) = self.reader.get_epoch_hash().await.map_err(akd_error)?;
            let result = read().await;
            let akd::EpochHash(now, _) = self.reader.get_epoch_hash().await.map_err(akd_error)?;
            match result {
                Ok((found, akd::EpochHash(epoch, _))) if epoch == before && now == before => return Ok((found, epoch)),
                Err(akd::errors::AkdError::Storage(AkdStorageError::NotFound(_)))
                | Err(akd::errors::AkdError::Directory(_))
                    if now == before =>
                {
                    return Err(not_published(what, interval_ms));
                }
                Err(akd::errors::AkdError::Storage(AkdStorageError::NotFound(_)))
                | Err(akd::errors::AkdError::Directory(_))
                | Ok(_) => continue,
                Err(e) => return Err(akd_error(e).into()),
            }
        }
        Err(retry_later())
    }
}

fn retry_later() -> ApiError {
    ApiError::new(
        ErrorCode::KeyDirectoryPublishing,
        "the key directory is publishing an epoch; try again in a moment",
    )
}

fn parse_account(text: &str) -> Result<AccountId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request("the account id is 32 hex digits"))
}

/// `GET /v1/keys/lookup/account/{id}`: an account's identity key and devices, with proof.
pub async fn lookup_account(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
) -> Result<Json<LookupAnswer>, ApiError> {
    let account = parse_account(&account)?;
    let answer = state
        .keys
        .lookup(
            account_label(account.as_bytes()),
            "this account",
            state.config.key_directory_epoch_ms,
        )
        .await?;
    Ok(Json(answer))
}

/// `GET /v1/keys/lookup/username/{hash}`: the account holding a username hash, with proof.
pub async fn lookup_username(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
) -> Result<Json<LookupAnswer>, ApiError> {
    let hash: [u8; 32] = hex::decode(&hash)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| ApiError::bad_request("the username hash is 64 hex digits"))?;
    let answer = state
        .keys
        .lookup(
            username_label(&hash),
            "this username",
            state.config.key_directory_epoch_ms,
        )
        .await?;
    Ok(Json(answer))
}

/// `GET /v1/keys/history`: the caller's own account entry, every version, with proof.
pub async fn own_history(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
) -> Result<Json<HistoryAnswer>, ApiError> {
    let label = account_label(device.account.as_bytes());
    let answer = state
        .keys
        .history(label, "your account", state.config.key_directory_epoch_ms)
        .await?;
    Ok(Json(answer))
}

/// `GET /v1/keys/history/account/{id}`: every version of another account's entry, with proof:
/// a member that learns of a device only after its account removed it checks that the device
/// was listed (its identity and signing keys) before it was dropped.
pub async fn account_history(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
) -> Result<Json<HistoryAnswer>, ApiError> {
    let account = parse_account(&account)?;
    let answer = state
        .keys
        .history(
            account_label(account.as_bytes()),
            "this account",
            state.config.key_directory_epoch_ms,
        )
        .await?;
    Ok(Json(answer))
}

/// Query of `GET /v1/keys/audit`.
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    from: u64,
    to: u64,
}

/// `GET /v1/keys/audit?from=A&to=B` (public): proof that epochs A+1..=B only appended.
pub async fn audit(
    State(state): State<Arc<AppState>>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<AuditAnswer>, ApiError> {
    if query.to <= query.from || query.to - query.from > MAX_AUDIT_EPOCHS {
        return Err(ApiError::bad_request(format!(
            "to must be after from, by at most {MAX_AUDIT_EPOCHS} epochs"
        )));
    }
    let latest = state.keys.head().await?.epoch;
    if query.to > latest {
        return Err(ApiError::new(
            ErrorCode::UnknownEpoch,
            format!("the newest epoch is {latest}"),
        ));
    }
    let heads = state
        .storage
        .kt_heads(query.from, (query.to - query.from + 1) as u32)
        .await?;
    let heads = heads.iter().map(|h| parse_head(h)).collect::<Result<Vec<_>, _>>()?;
    if heads.len() as u64 != query.to - query.from + 1 {
        return Err(retry_later());
    }
    let proof = state.keys.reader.audit(query.from, query.to).await.map_err(akd_error)?;
    Ok(Json(AuditAnswer {
        heads,
        proof: fumi_audit::keys::encode_append_only_proof(&proof),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fumi_proto::DeviceId;

    fn id(prefix: u8, i: u64) -> [u8; 16] {
        let mut bytes = [prefix; 16];
        bytes[8..].copy_from_slice(&i.to_be_bytes());
        bytes
    }

    async fn add_account(storage: &Arc<dyn Storage>, i: u64) {
        let device = DeviceId::from_bytes(id(2, i));
        storage
            .create_account(AccountId::from_bytes(id(1, i)), &[1; 32], device, &[2; 32], None, 0)
            .await
            .unwrap();
        storage.set_signature_key(device, &[3; 32]).await.unwrap();
    }

    /// Lookups and history reads served while epochs publish each read one epoch: every proof
    /// verifies (a proof mixing two epochs' nodes does not). Answers "publishing, try again"
    /// are allowed and counted, failures are not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proofs_served_while_epochs_publish_all_verify() {
        const LOOKUPS: usize = 1200;
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(
            crate::storage::SqliteStorage::open(&dir.path().join("fumi.db"))
                .await
                .unwrap(),
        );
        let key = SigningKey::from_bytes(&[7; 32]);
        let keys = Arc::new(KeyDirectory::open(storage.clone(), &key).await.unwrap());
        for i in 0..100 {
            add_account(&storage, i).await;
        }
        while keys.publish_pending(60_000).await.unwrap().is_some() {}

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publisher = {
            let (keys, storage, stop) = (keys.clone(), storage.clone(), stop.clone());
            tokio::spawn(async move {
                let mut next = 100;
                let mut epochs = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Many new leaves per epoch: the root and the upper nodes change every epoch.
                    for _ in 0..20 {
                        add_account(&storage, next).await;
                        next += 1;
                    }
                    if keys.publish_pending(60_000).await.unwrap().is_some() {
                        epochs += 1;
                    }
                }
                epochs
            })
        };
        let log_key = key.verifying_key().to_bytes();
        let (mut failures, mut retries, mut verified) = (0, 0, 0);
        for round in 0..LOOKUPS {
            let target = id(1, (round % 100) as u64);
            let label = account_label(&target);
            let answer = if round % 4 == 3 {
                keys.history(label.clone(), "an account", 60_000)
                    .await
                    .map(|a| (a.head, a.proof, true))
            } else {
                keys.lookup(label.clone(), "an account", 60_000)
                    .await
                    .map(|a| (a.head, a.proof, false))
            };
            let (head, proof, history) = match answer {
                Ok(answer) => answer,
                Err(e) if e.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE => {
                    retries += 1;
                    continue;
                }
                Err(e) => panic!("lookup failed: {e:?}"),
            };
            let head = head.verify(&log_key).unwrap();
            let ok = if history {
                fumi_audit::keys::verify_history(&head, &label, &proof).map(|_| ())
            } else {
                fumi_audit::keys::verify_lookup(&head, &label, &proof).map(|_| ())
            };
            if let Err(e) = &ok {
                eprintln!(
                    "a proof of epoch {} (history: {history}) did not verify: {e:?}",
                    head.epoch
                );
            }
            let ok = ok.is_ok();
            if ok {
                verified += 1;
            } else {
                failures += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let epochs = publisher.await.unwrap();
        eprintln!(
            "{verified} proofs verified, {failures} failed, {retries} answered 'try again', {epochs} epochs published meanwhile"
        );
        assert!(epochs > 10, "epochs must publish during the lookups");
        assert_eq!(failures, 0, "of {LOOKUPS} lookups and history reads");
        assert!(verified > LOOKUPS / 2, "most reads are answered: {verified}");
    }

    #[test]
    fn records_round_trip() {
        let label = NodeLabel::new([3; 32], 17);
        let node = DbRecord::build_tree_node_with_previous_value(
            [3; 32],
            17,
            5,
            2,
            [1; 32],
            3,
            3,
            Some(NodeLabel::new([4; 32], 20)),
            None,
            [9; 32],
            Some(4),
            Some(1),
            Some([1; 32]),
            Some(3),
            Some(1),
            None,
            None,
            Some([8; 32]),
        );
        assert_eq!(node.label, label);
        let bytes = encode_tree_node(&node);
        match decode_node_record(&bytes).unwrap() {
            DbRecord::TreeNode(decoded) => assert_eq!(decoded, node),
            _ => panic!("not a tree node"),
        }
        assert!(decode_node_record(&bytes[..bytes.len() - 1]).is_err());
        let state = DbRecord::build_user_state(b"account:x".to_vec(), b"value".to_vec(), 2, 256, [7; 32], 9);
        assert_eq!(decode_value_state(&encode_value_state(&state)).unwrap(), state);
    }
}
