//! Data residency: regions, each with its own database and blob store, holding the mailboxes,
//! KeyPackages, profiles, avatars and blob bytes of the accounts that live there.
//!
//! The main database (the server's `database`) is itself a region, named by `region`; it also
//! keeps everything that spans accounts: accounts and their residency, devices, usernames, group
//! rosters, submission records, blob bookkeeping, channels and the two logs. Every message is
//! accepted into the main database as before (one transaction checks the roster and epoch and
//! queues the envelopes), and a forwarder moves the envelopes of devices living in another region
//! there — inserting under the same sequence number and message id (a repeat is skipped), then
//! deleting them from the main database only if the account still lives in that region and is not
//! being relocated. It runs right after each submission and once a second for leftovers, so an
//! accepted message survives a crash at any point and is delivered once: a device sees an envelope
//! under one number wherever it is stored, and its client skips numbers it has processed.
//!
//! A relocation ([`relocate`]) is a state machine kept in the account's row, each half safe to
//! repeat after a crash: while *copying*, the account's devices are refused (503 `relocating`)
//! and its envelopes are held in the main database; every item is copied to the target
//! idempotently and compared by SHA-256 with the source's; then the account's region switches, and
//! while *cleaning* the source's copies are deleted; at the end the held envelopes are forwarded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fumi_proto::{AccountId, BlobId, DeviceId, ErrorCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::blobs::BlobStore;
use crate::error::ApiError;
use crate::storage::{
    Ciphertext, PostgresStorage, Relocation, Residency, SqliteStorage, Storage, StorageError, StoredEnvelope,
};
use crate::{AppState, Config, ServerError};

/// Envelopes moved per round of the forwarder (each up to the largest message).
const FORWARD_BATCH: u32 = 64;
/// Envelopes read per page while relocating (each up to the largest message: keeps memory bounded).
const RELOCATE_PAGE: u32 = 64;
/// How often the forwarder looks for envelopes left behind (a crash, a relocation that ended).
const FORWARD_INTERVAL: Duration = Duration::from_secs(1);

/// A region besides the main database's own: `[[regions]]` in the server's TOML file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Its name (`jp`, `kr`): lowercase letters, digits, `-` and `_`.
    pub name: String,
    /// Empty: an SQLite file `<data>/regions/<name>/fumi.db`; or a `postgres://` URL (required
    /// when the main database is PostgreSQL).
    #[serde(default)]
    pub database: String,
    /// The PostgreSQL schema of its tables (default `fumi_<name>`).
    #[serde(default)]
    pub database_schema: String,
    /// Empty: `<data>/regions/<name>/blobs`; or a directory, `file://DIR`, `s3://BUCKET[/PREFIX]`.
    #[serde(default)]
    pub blob_store: String,
}

/// One region: where an account's own data lives.
pub struct Region {
    /// Its name.
    pub name: String,
    /// Its database.
    pub storage: Arc<dyn Storage>,
    /// Its blob store.
    pub blobs: Arc<BlobStore>,
}

/// The configured regions; the first is the main database's own.
pub struct Regions {
    list: Vec<Region>,
    default: usize,
    /// Accounts with a relocation running in this process (at most one run per account).
    running: Arc<std::sync::Mutex<std::collections::HashSet<AccountId>>>,
}

/// A relocation run of one account in this process; ends when dropped.
pub struct RunGuard {
    running: Arc<std::sync::Mutex<std::collections::HashSet<AccountId>>>,
    account: AccountId,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.account);
        }
    }
}

/// A valid region name.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Regions {
    /// Opens every configured region's database and blob store.
    pub async fn open(
        config: &Config,
        main: Arc<dyn Storage>,
        main_blobs: Arc<BlobStore>,
    ) -> Result<Self, ServerError> {
        let invalid = |message: String| ServerError::Config(message);
        if !valid_name(&config.region) {
            return Err(invalid(format!(
                "region {:?}: a region name is 1 to 32 of a-z, 0-9, - and _",
                config.region
            )));
        }
        let mut list = vec![Region {
            name: config.region.clone(),
            storage: main,
            blobs: main_blobs,
        }];
        // Two regions on one database schema or one blob store would copy a relocation onto
        // itself and then delete the only copy.
        let mut databases = vec![(config.database.trim().to_owned(), config.database_schema.clone())];
        let mut stores = vec![config.blob_store.trim().to_owned()];
        for region in &config.regions {
            if !valid_name(&region.name) {
                return Err(invalid(format!(
                    "region {:?}: a region name is 1 to 32 of a-z, 0-9, - and _",
                    region.name
                )));
            }
            if list.iter().any(|r| r.name == region.name) {
                return Err(invalid(format!("region {:?} is named twice", region.name)));
            }
            let root = config.data.join("regions").join(&region.name);
            std::fs::create_dir_all(&root).map_err(|source| ServerError::DataDir {
                path: root.clone(),
                source,
            })?;
            let database = region.database.trim();
            let storage: Arc<dyn Storage> = if database.is_empty() {
                // Sequence numbers are kept across regions: SQLite numbers envelopes globally,
                // PostgreSQL per device, so a PostgreSQL main database needs PostgreSQL regions.
                if !config.database.trim().is_empty() {
                    return Err(invalid(format!(
                        "region {:?}: with a PostgreSQL main database, every region needs a postgres:// database",
                        region.name
                    )));
                }
                Arc::new(SqliteStorage::open_region(&root.join("fumi.db")).await?)
            } else if database.starts_with("postgres://") || database.starts_with("postgresql://") {
                let schema = if region.database_schema.is_empty() {
                    format!("fumi_{}", region.name.replace('-', "_"))
                } else {
                    region.database_schema.clone()
                };
                if databases.contains(&(database.to_owned(), schema.clone())) {
                    return Err(invalid(format!(
                        "region {:?} uses another region's database schema; give it its own database or schema",
                        region.name
                    )));
                }
                databases.push((database.to_owned(), schema.clone()));
                Arc::new(PostgresStorage::connect_region(database, &schema).await?)
            } else {
                return Err(invalid(format!(
                    "region {:?}: database must be empty (SQLite) or a postgres:// URL",
                    region.name
                )));
            };
            let store = region.blob_store.trim();
            if !store.is_empty() && stores.iter().any(|s| s == store) {
                return Err(invalid(format!(
                    "region {:?} uses another region's blob store; give it its own",
                    region.name
                )));
            }
            stores.push(store.to_owned());
            let blobs = BlobStore::open_at(store, &root.join("blobs"), &root.join("uploads"))?;
            blobs.check().await?;
            tracing::info!(region = %region.name, store = %blobs.description, "region");
            list.push(Region {
                name: region.name.clone(),
                storage,
                blobs: Arc::new(blobs),
            });
        }
        let default = if config.default_region.is_empty() {
            0
        } else {
            list.iter()
                .position(|r| r.name == config.default_region)
                .ok_or_else(|| {
                    invalid(format!(
                        "default_region {:?} is not a configured region",
                        config.default_region
                    ))
                })?
        };
        Ok(Self {
            list,
            default,
            running: Default::default(),
        })
    }

    /// Starts the one relocation run of `account` this process may have; `None` if one runs.
    pub fn start_run(&self, account: AccountId) -> Option<RunGuard> {
        let mut running = self.running.lock().expect("relocation runs lock");
        running.insert(account).then(|| RunGuard {
            running: self.running.clone(),
            account,
        })
    }

    /// Whether a relocation of `account` runs in this process.
    pub fn is_running(&self, account: AccountId) -> bool {
        self.running.lock().expect("relocation runs lock").contains(&account)
    }

    /// Whether there is more than the main database's own region.
    pub fn several(&self) -> bool {
        self.list.len() > 1
    }

    /// Region `index` (from [`Regions::index`]).
    pub fn get(&self, index: usize) -> &Region {
        &self.list[index]
    }

    /// The main database's own region.
    pub fn main(&self) -> &Region {
        &self.list[0]
    }

    /// Every region, the main database's own first.
    pub fn all(&self) -> &[Region] {
        &self.list
    }

    /// Where new accounts live unless they choose.
    pub fn default_index(&self) -> usize {
        self.default
    }

    /// The index of a region stored in the database (`None`: the main database's own).
    pub fn index(&self, stored: Option<&str>) -> Result<usize, ApiError> {
        match stored {
            None => Ok(0),
            Some(name) => self.by_name(name).ok_or_else(|| {
                tracing::error!(
                    region = name,
                    "an account lives in a region this server is not configured for"
                );
                ApiError::new(
                    ErrorCode::RegionUnavailable,
                    "this account's data is in a region this server is not configured for",
                )
            }),
        }
    }

    /// The index of a region by its configured name.
    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|r| r.name == name)
    }

    /// How region `index` is stored in the database.
    pub fn stored_name(&self, index: usize) -> Option<String> {
        (index != 0).then(|| self.list[index].name.clone())
    }

    /// The region of an account that is not being relocated.
    pub fn resident(&self, residency: &Residency) -> Result<usize, ApiError> {
        if residency.relocation.is_some() {
            return Err(relocating());
        }
        self.index(residency.region.as_deref())
    }
}

/// An account's devices that are not removed (none for an unknown account).
pub async fn live_devices(state: &AppState, account: AccountId) -> Result<Vec<DeviceId>, StorageError> {
    Ok(state
        .storage
        .account(account)
        .await?
        .map(|a| a.devices)
        .unwrap_or_default())
}

/// The answer while an account's data is being moved.
pub fn relocating() -> ApiError {
    ApiError::new(
        ErrorCode::Relocating,
        "this account's data is being moved to another region; try again in a minute",
    )
}

/// The region of `account` for reading what others may see of it (profile, avatar, blob bytes):
/// during a relocation the copy in the account's `region` is whole (the source while copying,
/// the target once switched). Unknown accounts answer the main region (which has nothing).
pub async fn readable(state: &AppState, account: AccountId) -> Result<&Region, ApiError> {
    if !state.regions.several() {
        return Ok(state.regions.main());
    }
    match state.storage.residency(account).await? {
        None => Ok(state.regions.main()),
        Some(residency) => Ok(state.regions.get(state.regions.index(residency.region.as_deref())?)),
    }
}

/// After a write into region `index` for `account` (by `device`): if a relocation began
/// meanwhile, the write may have missed its copy, so the caller is told to retry, and its write is
/// repeated in the new region. The stray copy goes with the source's cleanup, or now if the
/// relocation already ended.
pub async fn confirm(state: &AppState, account: AccountId, device: DeviceId, index: usize) -> Result<(), ApiError> {
    if !state.regions.several() {
        return Ok(());
    }
    let residency = state.storage.residency(account).await?.unwrap_or_default();
    if residency.relocation.is_none() && state.regions.index(residency.region.as_deref())? != index {
        delete_resident(state.regions.get(index), Some(account), &[device]).await?;
    }
    if state.regions.resident(&residency)? != index {
        return Err(relocating());
    }
    Ok(())
}

/// The regions holding an account's data now: its own, and during a relocation the other end.
pub async fn holding(state: &AppState, account: AccountId) -> Result<Vec<&Region>, ApiError> {
    if !state.regions.several() {
        return Ok(vec![state.regions.main()]);
    }
    let residency = state.storage.residency(account).await?.unwrap_or_default();
    let mut names = vec![residency.region.clone()];
    match residency.relocation {
        Some(Relocation::Copying { to }) => names.push(to),
        Some(Relocation::Cleaning { from }) => names.push(from),
        None => {}
    }
    names
        .iter()
        .map(|name| {
            state
                .regions
                .index(name.as_deref())
                .map(|index| state.regions.get(index))
        })
        .collect()
}

/// Moves envelopes waiting in the main database for devices living in other regions (only for
/// `devices` if given); returns how many were moved. Safe to run anywhere, at any time, at once.
pub async fn forward(state: &AppState, devices: Option<&[DeviceId]>) -> Result<u64, StorageError> {
    let mut moved = 0;
    let mut failure = None;
    // Region by region, so that one that is down does not hold up the others.
    for region in &state.regions.all()[1..] {
        match forward_to(state, region, devices).await {
            Ok(count) => moved += count,
            Err(error) => {
                tracing::warn!(%error, region = %region.name, "forwarding envelopes failed; retried within a second");
                failure = Some(error);
            }
        }
    }
    match failure {
        Some(error) if moved == 0 => Err(error),
        _ => Ok(moved),
    }
}

async fn forward_to(state: &AppState, region: &Region, devices: Option<&[DeviceId]>) -> Result<u64, StorageError> {
    let mut moved = 0;
    loop {
        let batch = state.storage.in_transit(&region.name, devices, FORWARD_BATCH).await?;
        if batch.is_empty() {
            return Ok(moved);
        }
        region.storage.import_envelopes(&batch).await?;
        let keys: Vec<(DeviceId, u64)> = batch.iter().map(|e| (e.device, e.seq)).collect();
        let settled = state.storage.settle_forwarded(&region.name, &keys).await?;
        moved += settled;
        let mut woken: Vec<DeviceId> = keys.iter().map(|(device, _)| *device).collect();
        woken.sort_unstable();
        woken.dedup();
        for device in woken {
            state.fanout.notify(device);
        }
        if batch.len() < FORWARD_BATCH as usize || settled == 0 {
            return Ok(moved);
        }
    }
}

/// Runs the forwarder at start and then once a second, while the server runs.
pub async fn forward_forever(state: Arc<AppState>) {
    if !state.regions.several() {
        return;
    }
    let mut interval = tokio::time::interval(FORWARD_INTERVAL);
    loop {
        interval.tick().await;
        match forward(&state, None).await {
            Ok(0) => {}
            Ok(count) => tracing::debug!(count, "envelopes forwarded to their regions"),
            Err(error) => tracing::warn!(%error, "forwarding envelopes to their regions failed"),
        }
    }
}

/// What a relocation moves, with a SHA-256 digest per item, read before anything is changed and
/// written into the transparency log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Digest of the profile, if any.
    pub profile: Option<[u8; 32]>,
    /// Digest of the avatar, if any.
    pub avatar: Option<[u8; 32]>,
    /// Digest of each KeyPackage, sorted.
    pub key_packages: Vec<[u8; 32]>,
    /// Each envelope by device and number, with its digest.
    pub envelopes: BTreeMap<(DeviceId, u64), [u8; 32]>,
    /// Each finished blob: size and digest of its bytes.
    pub blobs: BTreeMap<BlobId, (u64, [u8; 32])>,
}

impl Manifest {
    /// Counts and one digest per kind (over the items' digests in order), for the log and the
    /// operator.
    pub fn summary(&self) -> BTreeMap<String, serde_json::Value> {
        fn over<'a>(items: impl Iterator<Item = &'a [u8; 32]>) -> String {
            let mut hasher = Sha256::new();
            for item in items {
                hasher.update(item);
            }
            hex::encode(hasher.finalize())
        }
        let mut summary = BTreeMap::new();
        summary.insert("profile".into(), u64::from(self.profile.is_some()).into());
        summary.insert("avatar".into(), u64::from(self.avatar.is_some()).into());
        summary.insert("key_packages".into(), self.key_packages.len().into());
        summary.insert("envelopes".into(), self.envelopes.len().into());
        summary.insert("blobs".into(), self.blobs.len().into());
        summary.insert(
            "blob_bytes".into(),
            self.blobs.values().map(|(size, _)| size).sum::<u64>().into(),
        );
        summary.insert(
            "digest_profile_avatar".into(),
            over(self.profile.iter().chain(self.avatar.iter())).into(),
        );
        summary.insert("digest_key_packages".into(), over(self.key_packages.iter()).into());
        summary.insert("digest_envelopes".into(), over(self.envelopes.values()).into());
        summary.insert("digest_blobs".into(), over(self.blobs.values().map(|(_, d)| d)).into());
        summary
    }
}

fn digest_sealed(sealed: &Ciphertext) -> [u8; 32] {
    Sha256::digest(&sealed.0).into()
}

fn digest_envelope(envelope: &StoredEnvelope) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(envelope.device.as_bytes());
    for number in [
        envelope.seq,
        envelope.message_id,
        envelope.received_at,
        envelope.expires_at,
    ] {
        hasher.update(number.to_be_bytes());
    }
    hasher.update(&envelope.body.0);
    hasher.finalize().into()
}

fn digest_key_package(package: &crate::storage::StoredKeyPackage) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(package.device.as_bytes());
    hasher.update([u8::from(package.last_resort)]);
    hasher.update(&package.key_package.0);
    hasher.finalize().into()
}

/// Reads a device's envelopes page by page (bounded memory), handing each page to `visit`.
async fn each_envelope_page(
    storage: &Arc<dyn Storage>,
    device: DeviceId,
    mut visit: impl FnMut(&[StoredEnvelope]),
) -> Result<(), StorageError> {
    let mut after = 0;
    loop {
        let page = storage.export_envelopes(device, after, RELOCATE_PAGE).await?;
        let Some(last) = page.last() else { return Ok(()) };
        after = last.seq;
        visit(&page);
    }
}

/// Reads what `region` holds of an account (its live `devices`, its finished `blobs`).
async fn manifest(
    region: &Region,
    account: AccountId,
    devices: &[DeviceId],
    blobs: &[BlobId],
) -> Result<Manifest, RelocateError> {
    let storage = &region.storage;
    let mut manifest = Manifest {
        profile: storage.profile(account).await?.as_ref().map(digest_sealed),
        avatar: storage.avatar(account).await?.as_ref().map(digest_sealed),
        key_packages: storage
            .export_key_packages(devices)
            .await?
            .iter()
            .map(digest_key_package)
            .collect(),
        ..Manifest::default()
    };
    // Backends list packages in different orders (by device, or by upload across devices).
    manifest.key_packages.sort_unstable();
    for device in devices {
        each_envelope_page(storage, *device, |page| {
            for envelope in page {
                manifest
                    .envelopes
                    .insert((envelope.device, envelope.seq), digest_envelope(envelope));
            }
        })
        .await?;
    }
    for blob in blobs {
        if let Some(measured) = region.blobs.digest(*blob).await? {
            manifest.blobs.insert(*blob, measured);
        }
    }
    Ok(manifest)
}

/// Why a relocation stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelocateError {
    /// Nothing to do with the request as given.
    #[error("{0}")]
    Refused(String),
    /// The account does not exist.
    #[error("no such account")]
    UnknownAccount,
    /// A copy at the target differs from the source's.
    #[error("verification failed: {0}")]
    Mismatch(String),
    /// A database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A blob store failed.
    #[error(transparent)]
    Blobs(#[from] crate::blobs::BlobError),
}

/// A relocation, prepared: the account is frozen (or was already, by an interrupted run) and
/// what it moves has been read. [`Plan::details`] goes into the log before [`run`] changes
/// anything.
pub struct Plan {
    account: AccountId,
    from: usize,
    to: usize,
    /// Whether the copy is still to be made (else only the source's cleanup is left).
    copying: bool,
    devices: Vec<DeviceId>,
    blobs: Vec<BlobId>,
    manifest: Manifest,
    /// Whether the account was frozen by this call (and should be thawed if logging fails).
    froze: bool,
    previous: Residency,
}

impl Plan {
    /// What the log records: regions, the half of the relocation this run does, counts and
    /// digests.
    pub fn details(&self, regions: &Regions) -> BTreeMap<String, serde_json::Value> {
        let mut details = self.manifest.summary();
        details.insert("from".into(), regions.get(self.from).name.clone().into());
        details.insert("to".into(), regions.get(self.to).name.clone().into());
        details.insert("phase".into(), if self.copying { "copy" } else { "cleanup" }.into());
        details
    }

    /// Undoes the freeze of a relocation that will not run (its log entry could not be written).
    pub async fn abandon(self, state: &AppState) {
        if self.froze {
            let [frozen, ..] = move_states(&state.regions, self.from, self.to);
            if let Err(error) = state.storage.set_residency(self.account, &frozen, &self.previous).await {
                tracing::error!(%error, "thawing an account after a failed relocation start failed");
            }
        }
    }
}

/// An account's residency in the three states of a move from `from` to `to`: frozen while
/// copying, switched while cleaning, and done.
fn move_states(regions: &Regions, from: usize, to: usize) -> [Residency; 3] {
    let (from, to) = (regions.stored_name(from), regions.stored_name(to));
    [
        Residency {
            region: from.clone(),
            relocation: Some(Relocation::Copying { to: to.clone() }),
        },
        Residency {
            region: to.clone(),
            relocation: Some(Relocation::Cleaning { from }),
        },
        Residency {
            region: to,
            relocation: None,
        },
    ]
}

/// Starts (or resumes) moving `account` to region `to`: freezes it and reads what moves.
/// `Ok(None)`: it already lives there, nothing to do.
pub async fn prepare(state: &AppState, account: AccountId, to: &str) -> Result<Option<Plan>, RelocateError> {
    let regions = &state.regions;
    let to = regions.by_name(to).ok_or_else(|| {
        let names: Vec<&str> = regions.all().iter().map(|r| r.name.as_str()).collect();
        RelocateError::Refused(format!("unknown region {to:?}; this server has {}", names.join(", ")))
    })?;
    let residency = state
        .storage
        .residency(account)
        .await?
        .ok_or(RelocateError::UnknownAccount)?;
    let name = |index: usize| regions.get(index).name.clone();
    let current = regions.index(residency.region.as_deref()).map_err(|_| {
        RelocateError::Refused(format!(
            "the account lives in region {:?}, which is not configured",
            residency.region
        ))
    })?;
    let (from, copying, froze) = match &residency.relocation {
        None if current == to => return Ok(None),
        None => {
            // An upload running now would finish into the source after the copy.
            let owned = state.storage.blobs_owned(account).await?;
            let uploading = {
                let running = state.uploads_in_progress.lock().expect("upload lock poisoned");
                owned.iter().any(|blob| running.contains(blob))
            };
            if uploading {
                return Err(RelocateError::Refused(
                    "the account is uploading a file; try again when the upload has ended".into(),
                ));
            }
            let [frozen, ..] = move_states(regions, current, to);
            if !state.storage.set_residency(account, &residency, &frozen).await? {
                return Err(RelocateError::Refused(
                    "another relocation of this account started at the same time".into(),
                ));
            }
            (current, true, true)
        }
        Some(Relocation::Copying { to: target }) => {
            let target = regions.index(target.as_deref()).map_err(|_| {
                RelocateError::Refused(format!(
                    "a relocation to the unconfigured region {target:?} is under way"
                ))
            })?;
            if target != to {
                return Err(RelocateError::Refused(format!(
                    "a relocation to {} is under way; finish it first (fumi admin relocate ACCOUNT --to {})",
                    name(target),
                    name(target)
                )));
            }
            (current, true, false)
        }
        Some(Relocation::Cleaning { from }) => {
            if current != to {
                return Err(RelocateError::Refused(format!(
                    "a relocation to {} is finishing; finish it first (fumi admin relocate ACCOUNT --to {})",
                    name(current),
                    name(current)
                )));
            }
            let from = regions.index(from.as_deref()).map_err(|_| {
                RelocateError::Refused(format!(
                    "a relocation from the unconfigured region {from:?} is finishing"
                ))
            })?;
            (from, false, false)
        }
    };
    // Devices (removed ones kept nothing) and blobs are listed in the main database; the account
    // is frozen, so the lists hold until the end.
    let devices = live_devices(state, account).await?;
    let blobs = state.storage.blobs_owned(account).await?;
    if froze {
        // Open delivery connections wake, see the relocation and close.
        for device in &devices {
            state.fanout.notify(*device);
        }
    }
    let mut plan = Plan {
        account,
        from,
        to,
        copying,
        devices,
        blobs,
        manifest: Manifest::default(),
        froze,
        previous: residency,
    };
    // While copying, the manifest is the source's; while cleaning, what the verified target has.
    let read_from = if copying { from } else { to };
    match manifest(regions.get(read_from), account, &plan.devices, &plan.blobs).await {
        Ok(manifest) => {
            plan.manifest = manifest;
            Ok(Some(plan))
        }
        Err(error) => {
            plan.abandon(state).await;
            Err(error)
        }
    }
}

/// Progress of a relocation, one line of the admin API's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// What is being done.
    pub step: &'static str,
    /// Items done.
    pub done: u64,
    /// Items in all.
    pub total: u64,
}

/// Carries out a prepared relocation, reporting progress on `progress` (ignored once the reader
/// is gone: the relocation goes on).
pub async fn run(
    state: &AppState,
    plan: Plan,
    progress: &mpsc::Sender<serde_json::Value>,
) -> Result<(), RelocateError> {
    let say = |step: &'static str, done: u64, total: u64| {
        let line = serde_json::to_value(Progress { step, done, total }).unwrap_or_default();
        let _ = progress.try_send(line);
    };
    let regions = &state.regions;
    let (source, target) = (regions.get(plan.from), regions.get(plan.to));
    let account = plan.account;
    // Another server's run of this account may have moved it on meanwhile: each half starts
    // only in the state it expects.
    let [frozen, cleaning, done] = move_states(regions, plan.from, plan.to);
    let expect = |expected: &Residency| {
        let expected = expected.clone();
        async move {
            match state.storage.residency(account).await? {
                Some(now) if now == expected => Ok(()),
                _ => Err(RelocateError::Refused(
                    "the account's relocation state changed meanwhile (another run?); run it again".into(),
                )),
            }
        }
    };
    if plan.copying {
        expect(&frozen).await?;
        crash_point("relocate:before-copy");
        // Profile and avatar (a copy left by an interrupted run is replaced).
        target.storage.delete_sealed(account).await?;
        if let Some(sealed) = source.storage.profile(account).await? {
            target.storage.put_profile(account, sealed, crate::now_ms()).await?;
        }
        if let Some(sealed) = source.storage.avatar(account).await? {
            target.storage.put_avatar(account, sealed, crate::now_ms()).await?;
        }
        say("profile", 1, 1);
        // KeyPackages: replaced as a whole, so a repeat does not double them.
        let packages = source.storage.export_key_packages(&plan.devices).await?;
        target.storage.replace_key_packages(&plan.devices, &packages).await?;
        say(
            "key_packages",
            packages.len() as u64,
            plan.manifest.key_packages.len() as u64,
        );
        // Envelopes, page by page, under their own numbers.
        let total = plan.manifest.envelopes.len() as u64;
        let mut copied = 0;
        for device in &plan.devices {
            let mut after = 0;
            loop {
                let page = source.storage.export_envelopes(*device, after, RELOCATE_PAGE).await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                let page: Vec<StoredEnvelope> = page
                    .into_iter()
                    .filter(|e| plan.manifest.envelopes.contains_key(&(e.device, e.seq)))
                    .collect();
                target.storage.import_envelopes(&page).await?;
                copied += page.len() as u64;
                say("envelopes", copied, total);
                crash_point("relocate:copying-envelopes");
            }
        }
        // Blob bytes.
        let total = plan.manifest.blobs.len() as u64;
        for (done, blob) in plan.manifest.blobs.keys().enumerate() {
            target.blobs.copy_from(&source.blobs, *blob).await?;
            say("blobs", done as u64 + 1, total);
        }
        // Verification: everything read back from the target and compared.
        let copy = manifest(target, account, &plan.devices, &plan.blobs).await?;
        compare(&plan.manifest, &copy)?;
        say("verified", 1, 1);
        crash_point("relocate:before-switch");
        if !state.storage.set_residency(account, &frozen, &cleaning).await? {
            return Err(RelocateError::Refused(
                "the account's relocation state changed meanwhile".into(),
            ));
        }
        crash_point("relocate:after-switch");
    }
    // Cleanup: the source's copies go. Envelopes still in the main database that the target does
    // not have are not copies: they wait there for the forwarder.
    expect(&cleaning).await?;
    let mut deleted = 0;
    if plan.from == 0 {
        for device in &plan.devices {
            let mut seqs: Vec<u64> = Vec::new();
            each_envelope_page(&target.storage, *device, |page| seqs.extend(page.iter().map(|e| e.seq))).await?;
            for chunk in seqs.chunks(500) {
                deleted += source.storage.acknowledge(*device, chunk).await?;
            }
        }
    } else {
        deleted += source.storage.delete_mailboxes(&plan.devices).await?;
    }
    say("deleted_envelopes", deleted, deleted);
    crash_point("relocate:cleaning");
    source.storage.replace_key_packages(&plan.devices, &[]).await?;
    source.storage.delete_sealed(account).await?;
    for blob in &plan.blobs {
        source.blobs.delete(*blob).await?;
    }
    source.storage.scrub().await?;
    say("cleaned", 1, 1);
    if !state.storage.set_residency(account, &cleaning, &done).await? {
        return Err(RelocateError::Refused(
            "the account's relocation state changed meanwhile".into(),
        ));
    }
    // The envelopes held meanwhile go to their new home; the devices reconnect.
    if let Err(error) = forward(state, Some(&plan.devices)).await {
        // The move is done; the forwarder's next round delivers what waited.
        tracing::warn!(%error, "forwarding after a relocation failed; retried within a second");
    }
    for device in &plan.devices {
        state.fanout.notify(*device);
    }
    Ok(())
}

/// Compares the target's copy with the source's manifest.
fn compare(expected: &Manifest, copy: &Manifest) -> Result<(), RelocateError> {
    let mismatch = |what: &str| {
        Err(RelocateError::Mismatch(format!(
            "the target's {what} differ from the source's"
        )))
    };
    if expected.profile != copy.profile || expected.avatar != copy.avatar {
        return mismatch("profile or avatar");
    }
    if expected.key_packages != copy.key_packages {
        return mismatch("key packages");
    }
    // The target may hold more envelopes than the manifest (the same ones, forwarded twice
    // across a crash, are one row): every listed one must be there, equal.
    if expected
        .envelopes
        .iter()
        .any(|(key, digest)| copy.envelopes.get(key) != Some(digest))
    {
        return mismatch("envelopes");
    }
    if expected.blobs != copy.blobs {
        return mismatch("blobs");
    }
    Ok(())
}

/// Test-only crash injection: with the `test-hooks` feature and `FUMI_TEST_CRASH_AT` naming this
/// point (and `FUMI_TEST_HOOKS=1`), the process aborts here, as a kill -9 would stop it.
fn crash_point(name: &str) {
    #[cfg(feature = "test-hooks")]
    if crate::test_hooks::enabled() && std::env::var("FUMI_TEST_CRASH_AT").as_deref() == Ok(name) {
        tracing::warn!(point = name, "test crash point reached: aborting");
        std::process::abort();
    }
    let _ = name;
}

/// What a region holds of an account, for the admin API's account list: its envelopes, their
/// bytes and its KeyPackages.
pub async fn resident_counts(region: &Region, devices: &[DeviceId]) -> Result<(u64, u64, u64), StorageError> {
    let mut envelopes = 0;
    let mut bytes = 0;
    for device in devices {
        each_envelope_page(&region.storage, *device, |page| {
            envelopes += page.len() as u64;
            bytes += page.iter().map(|e| e.body.0.len() as u64).sum::<u64>();
        })
        .await?;
    }
    let key_packages = region.storage.export_key_packages(devices).await?.len() as u64;
    Ok((envelopes, bytes, key_packages))
}

/// Deletes what `region` holds for `devices` (and, with `account`, its profile and avatar).
pub async fn delete_resident(
    region: &Region,
    account: Option<AccountId>,
    devices: &[DeviceId],
) -> Result<(), StorageError> {
    region.storage.delete_mailboxes(devices).await?;
    region.storage.replace_key_packages(devices, &[]).await?;
    if let Some(account) = account {
        region.storage.delete_sealed(account).await?;
    }
    Ok(())
}

/// Region names by account, for the admin API's list (the main region's name for accounts
/// stored without one).
pub fn region_names(regions: &Regions, stored: &str) -> String {
    if stored.is_empty() {
        regions.main().name.clone()
    } else {
        stored.to_owned()
    }
}

/// Counts for `/metrics`: the main database's, with the envelopes queued in every region.
pub async fn stats(state: &AppState) -> Result<crate::storage::StorageStats, StorageError> {
    let mut stats = state.storage.stats().await?;
    for region in &state.regions.all()[1..] {
        stats.queued_envelopes += region.storage.stats().await?.queued_envelopes;
    }
    Ok(stats)
}

/// Claims a KeyPackage of each device of `accounts` (only of `only`, if not empty) from the
/// region each account lives in. Accounts of the main region are claimed in one transaction as
/// before; across regions a claim is not atomic (a failure can leave earlier accounts' one-time
/// packages used).
pub async fn claim_key_packages(
    state: &AppState,
    accounts: &[AccountId],
    only: &[DeviceId],
) -> Result<Vec<(AccountId, DeviceId, Ciphertext)>, ApiError> {
    if !state.regions.several() {
        return Ok(state.storage.claim_key_packages(accounts, only).await?);
    }
    let mut by_region: BTreeMap<usize, Vec<AccountId>> = BTreeMap::new();
    for account in accounts {
        let residency = state
            .storage
            .residency(*account)
            .await?
            .ok_or(StorageError::UnknownAccount)?;
        by_region
            .entry(state.regions.resident(&residency)?)
            .or_default()
            .push(*account);
    }
    let mut claimed = Vec::new();
    for (index, accounts) in by_region {
        if index == 0 {
            claimed.extend(state.storage.claim_key_packages(&accounts, only).await?);
            continue;
        }
        for account in accounts {
            let devices: Vec<DeviceId> = state
                .storage
                .account(account)
                .await?
                .ok_or(StorageError::UnknownAccount)?
                .devices
                .into_iter()
                .filter(|d| only.is_empty() || only.contains(d))
                .collect();
            let packages = state
                .regions
                .get(index)
                .storage
                .claim_device_key_packages(&devices)
                .await?;
            claimed.extend(packages.into_iter().map(|(device, kp)| (account, device, kp)));
        }
    }
    // In the order asked for, as from one database.
    claimed.sort_by_key(|(account, _, _)| accounts.iter().position(|a| a == account));
    Ok(claimed)
}
