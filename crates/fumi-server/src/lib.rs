#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod admin;
mod attachments;
pub mod audit;
pub mod auth;
pub mod blobs;
pub mod channels;
mod devices;
pub mod error;
pub mod fanout;
pub mod framing;
pub mod key_directory;
pub mod metrics;
pub mod rate_limit;
pub mod regions;
pub mod routes;
pub mod storage;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod ws;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use fumi_proto::DeviceId;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::blobs::BlobStore;
use crate::fanout::{Fanout, InProcessFanout, NatsFanout};
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::storage::{PostgresStorage, SqliteStorage, Storage};

/// Server settings. Every field has a default; the CLI layers a TOML file, `FUMI_*` environment
/// variables and flags on top.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory holding the embedded database (`fumi.db`), the transparency log's key and, by
    /// default, the blobs.
    pub data: PathBuf,
    /// Empty: the embedded SQLite database in `data`. `postgres://user@host:port/db`: a
    /// PostgreSQL database shared by every node of a cluster.
    pub database: String,
    /// The PostgreSQL schema holding Fumi's tables (created if missing).
    pub database_schema: String,
    /// Empty: a single node. `nats://host:4222`: the NATS server that carries delivery events
    /// between the nodes of a cluster.
    pub nats_url: String,
    /// Subject prefix of this cluster's events on NATS.
    pub nats_subject_prefix: String,
    /// Largest MLS message (plus Welcome) accepted, in bytes. A Welcome carries the ratchet tree,
    /// about 320 bytes per member device: 1 MiB lets a group grow to its 1000-device limit.
    pub max_message_bytes: usize,
    /// Most recipient devices of one message (the group size limit).
    pub max_recipients: usize,
    /// How long an undelivered message is kept, in seconds.
    pub message_ttl_secs: u64,
    /// Requests a device may make per minute.
    pub device_requests_per_minute: u32,
    /// Registrations per minute from one client address.
    pub registrations_per_minute: u32,
    /// One-time KeyPackages a device may keep in stock.
    pub max_key_packages_per_device: u64,
    /// Where attachment blobs are kept: empty for `<data>/blobs`, or a local directory.
    pub blob_store: String,
    /// Largest blob (encrypted attachment) accepted, in bytes.
    pub max_blob_bytes: u64,
    /// Bytes of blobs one account may have stored at once (undelivered attachments).
    pub blob_quota_bytes: u64,
    /// Undelivered envelopes one device's mailbox may hold (commits excepted).
    pub max_queued_per_device: u64,
    /// Devices one account may have at once (each holds at most one delivery connection).
    pub max_devices_per_account: usize,
    /// Seconds a client has to send a request's headers, and that an idle connection is kept.
    pub header_read_timeout_secs: u64,
    /// Address of the admin API (keep it on loopback or a management network).
    pub admin_listen: SocketAddr,
    /// Operators allowed to use the admin API: name, Ed25519 key, jurisdiction, networks.
    pub operators: Vec<admin::OperatorConfig>,
    /// Jurisdictions whose operators may act (empty: every configured operator).
    pub admin_jurisdictions: Vec<String>,
    /// HPKE (X25519) public key, 64 hex digits, that abuse reports are sealed to; empty: the
    /// server takes no reports.
    pub moderation_public_key: String,
    /// How often the publisher looks for changes to accounts, devices and usernames and
    /// publishes them as one key directory epoch, in ms (an epoch only when something changed).
    /// Clients meeting a brand-new device wait up to about this long, so it is short by default:
    /// a second keeps first contact quick while batching bursts of changes.
    pub key_directory_epoch_ms: u64,
    /// The name of the region this server's own database and blob store serve.
    pub region: String,
    /// Further regions, each with its own database and blob store, for accounts' mailboxes,
    /// KeyPackages, profiles, avatars and blob bytes: `[[regions]]`.
    pub regions: Vec<regions::RegionConfig>,
    /// The region new accounts live in unless they choose one (empty: `region`).
    pub default_region: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data: PathBuf::from("fumi-data"),
            database: String::new(),
            database_schema: "fumi".into(),
            nats_url: String::new(),
            nats_subject_prefix: "fumi".into(),
            max_message_bytes: 1024 * 1024,
            max_recipients: 1000,
            message_ttl_secs: 30 * 24 * 60 * 60,
            device_requests_per_minute: 1200,
            registrations_per_minute: 60,
            max_key_packages_per_device: 200,
            blob_store: String::new(),
            max_blob_bytes: 2 * 1024 * 1024 * 1024,
            blob_quota_bytes: 4 * 1024 * 1024 * 1024,
            max_queued_per_device: 10_000,
            max_devices_per_account: 10,
            header_read_timeout_secs: 10,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            operators: Vec::new(),
            admin_jurisdictions: Vec::new(),
            moderation_public_key: String::new(),
            key_directory_epoch_ms: 1_000,
            region: "main".into(),
            regions: Vec::new(),
            default_region: String::new(),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The database could not be opened or migrated.
    #[error("cannot open database")]
    Storage(#[from] storage::StorageError),
    /// The blob store could not be opened.
    #[error("cannot open blob store")]
    Blobs(#[from] blobs::BlobError),
    /// The audit log key could not be loaded or created.
    #[error(transparent)]
    AuditKey(#[from] audit::KeyFileError),
    /// A setting is invalid.
    #[error("invalid settings: {0}")]
    Config(String),
    /// Serving failed.
    #[error("server error")]
    Io(#[from] std::io::Error),
}

/// Shared state of all handlers.
pub struct AppState {
    /// Durable state.
    pub storage: Arc<dyn Storage>,
    /// Mailbox events.
    pub fanout: Arc<dyn Fanout>,
    /// Settings.
    pub config: Config,
    /// Counters.
    pub metrics: Metrics,
    /// Per-device request limit.
    pub device_limiter: RateLimiter<DeviceId>,
    /// Per-address registration limit.
    pub address_limiter: RateLimiter<IpAddr>,
    /// Becomes true when the server shuts down; delivery connections close.
    pub shutdown: watch::Receiver<bool>,
    /// Attachment bytes of the main database's own region.
    pub blobs: Arc<BlobStore>,
    /// The regions accounts' data lives in (the first is the main database's own).
    pub regions: regions::Regions,
    /// Blobs with an upload request running, so two requests never write one file at once.
    pub uploads_in_progress: std::sync::Mutex<std::collections::HashSet<fumi_proto::BlobId>>,
    /// The transparency log of operator accesses.
    pub audit: audit::AuditLog,
    /// Who may use the admin API, from where.
    pub admin: admin::AdminPolicy,
    /// The key directory.
    pub keys: key_directory::KeyDirectory,
    /// Test-only ways to make the server lie (compiled only for the test suite).
    #[cfg(feature = "test-hooks")]
    pub test_hooks: test_hooks::TestHooks,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The database file inside a data directory.
pub fn database_path(config: &Config) -> PathBuf {
    config.data.join("fumi.db")
}

/// The database, as the startup line shows it (never with a password).
pub fn database_description(config: &Config) -> String {
    if config.database.is_empty() {
        return format!("SQLite {}", database_path(config).display());
    }
    let host = config
        .database
        .split_once('@')
        .map_or(config.database.as_str(), |(_, rest)| rest);
    let host = host
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    let host = host.split(['?', '/']).next().unwrap_or_default();
    format!("PostgreSQL on {host}, schema {}", config.database_schema)
}

/// Opens the configured database: PostgreSQL if `database` names one, else SQLite in `data`.
pub async fn open_storage(config: &Config) -> Result<Arc<dyn Storage>, ServerError> {
    let database = config.database.trim();
    if database.is_empty() {
        return Ok(Arc::new(SqliteStorage::open(&database_path(config)).await?));
    }
    if !(database.starts_with("postgres://") || database.starts_with("postgresql://")) {
        return Err(ServerError::Config(
            "database must be empty (embedded SQLite) or a postgres:// URL".into(),
        ));
    }
    Ok(Arc::new(
        PostgresStorage::connect_in_schema(database, &config.database_schema).await?,
    ))
}

/// The audit log's signing key inside a data directory.
pub fn audit_key_path(config: &Config) -> PathBuf {
    config.data.join("audit-log.key")
}

/// Runs the server until `shutdown` completes: the user API on `listener`, the admin API on
/// `admin_listener`. Opens (and creates) the SQLite database under `config.data`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&config.data).map_err(|source| ServerError::DataDir {
        path: config.data.clone(),
        source,
    })?;
    let storage = open_storage(&config).await?;
    let admin = admin::AdminPolicy::from_config(&config).map_err(ServerError::Config)?;
    if !config.moderation_public_key.is_empty() && moderation_key(&config).is_none() {
        return Err(ServerError::Config(
            "moderation_public_key must be 64 hex digits".into(),
        ));
    }
    let audit = audit::AuditLog::open(&audit_key_path(&config))?;
    audit
        .init(storage.as_ref())
        .await
        .map_err(|e| ServerError::Config(e.to_string()))?;
    tracing::info!(log_key = %audit.public_key(), "transparency log");
    let keys = key_directory::KeyDirectory::open(storage.clone(), audit.signing_key())
        .await
        .map_err(|e| ServerError::Config(e.to_string()))?;
    #[cfg(feature = "test-hooks")]
    if test_hooks::enabled() {
        tracing::warn!("TEST HOOKS ARE ON (FUMI_TEST_HOOKS=1): this server can be told to lie; never run it for users");
    }
    let blobs = Arc::new(BlobStore::open(&config)?);
    blobs.check().await?;
    tracing::info!(store = %blobs.description, "blob store");
    let regions = regions::Regions::open(&config, storage.clone(), blobs.clone()).await?;
    let fanout: Arc<dyn Fanout> = if config.nats_url.is_empty() {
        Arc::new(InProcessFanout::default())
    } else {
        let fanout = NatsFanout::connect(&config.nats_url, &config.nats_subject_prefix)
            .await
            .map_err(ServerError::Config)?;
        tracing::info!(prefix = %config.nats_subject_prefix, "cluster mode: delivery events over NATS");
        Arc::new(fanout)
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(AppState {
        storage,
        fanout,
        device_limiter: RateLimiter::new(config.device_requests_per_minute),
        address_limiter: RateLimiter::new(config.registrations_per_minute),
        config,
        metrics: Metrics::default(),
        shutdown: shutdown_rx,
        blobs,
        regions,
        uploads_in_progress: Default::default(),
        audit,
        admin,
        keys,
        #[cfg(feature = "test-hooks")]
        test_hooks: Default::default(),
    });

    let expiry = tokio::spawn(expire_messages(state.clone()));
    let publisher = tokio::spawn(key_directory::publish_epochs(state.clone()));
    let forwarder = tokio::spawn(regions::forward_forever(state.clone()));
    let log = || axum::middleware::from_fn_with_state(state.clone(), log_request);
    let app = routes::router(state.clone()).layer(log());
    let admin_app = admin::router(state.clone()).layer(log());
    let header_timeout = Duration::from_secs(state.config.header_read_timeout_secs.max(1));
    let mut stop = state.shutdown.clone();
    let admin_loop = tokio::spawn(serve(admin_listener, admin_app, header_timeout, async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    }));
    // The signal goes out before connections are drained, so delivery connections close.
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
    };
    serve(listener, app, header_timeout, shutdown).await;
    let _ = admin_loop.await;
    expiry.abort();
    forwarder.abort();
    // The publisher stops at the shutdown signal and gives up its lease; an epoch being
    // published is finished (it is one transaction either way).
    let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    Ok(())
}

/// The moderation public key from the settings, if set and valid.
pub fn moderation_key(config: &Config) -> Option<[u8; 32]> {
    hex::decode(&config.moderation_public_key).ok()?.try_into().ok()
}

/// Accepts HTTP/1 connections on `listener` for `app` until `shutdown`, then lets requests in
/// flight finish for a while.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // Tells every connection to stop at shutdown: an idle kept-alive one closes at once, one with
    // a request in flight after answering it.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            let mut app = app.clone();
            async move { tower::Service::call(&mut app, request).await }
        });
        // A client that does not finish its request headers in time (slowloris), or leaves a
        // kept-alive connection idle that long, is disconnected.
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .with_upgrades();
        let mut stop = stop.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    let _ = stopping.send(true);
    // Requests in flight finish (delivery connections close at the shutdown signal), for a while.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// An upload that has not completed within a day is abandoned and deleted.
const STALE_UPLOAD_MS: u64 = 24 * 60 * 60 * 1000;

/// Deletes expired messages, link slots, invites and blobs once a minute.
async fn expire_messages(state: Arc<AppState>) {
    let mut interval = tokio::time::interval(Duration::from_secs(60));
    loop {
        interval.tick().await;
        let now = now_ms();
        for region in state.regions.all() {
            match region.storage.purge_expired(now).await {
                Ok(0) => {}
                Ok(count) => tracing::info!(count, region = %region.name, "expired undelivered envelopes deleted"),
                Err(error) => tracing::warn!(%error, region = %region.name, "expiring messages failed"),
            }
        }
        collect_blobs(&state, now).await;
    }
}

/// Deletes blobs nobody will fetch any more: expired, abandoned uploads, fetched by every
/// recipient, or from a removed device.
pub async fn collect_blobs(state: &AppState, now: u64) {
    match state
        .storage
        .expired_blobs(now, now.saturating_sub(STALE_UPLOAD_MS))
        .await
    {
        Ok(ids) => {
            for id in ids {
                if let Err(error) = delete_blob(state, id).await {
                    tracing::warn!(%error, "deleting an expired blob failed");
                }
            }
        }
        Err(error) => tracing::warn!(%error, "listing expired blobs failed"),
    }
}

/// Deletes a blob's bytes, then its record (so a failure leaves a record to retry from).
pub async fn delete_blob(state: &AppState, id: fumi_proto::BlobId) -> Result<(), ServerError> {
    // The bytes are in the uploader's region (both ends of a relocation under way); in every
    // region if the record is gone.
    let holding = if !state.regions.several() {
        vec![state.regions.main()]
    } else {
        match state.storage.blob(id).await? {
            Some(record) => regions::holding(state, record.owner_account).await.map_err(|_| {
                ServerError::Config("the blob's uploader lives in a region this server is not configured for".into())
            })?,
            None => state.regions.all().iter().collect(),
        }
    };
    for region in holding {
        region.blobs.delete(id).await?;
    }
    state.storage.delete_blob(id).await?;
    Metrics::inc(&state.metrics.blobs_deleted);
    Ok(())
}

/// Logs one line per request with the route template (never the concrete path, which may carry
/// ids), the status and the latency; counts statuses.
async fn log_request(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "<unmatched>".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status();
    let counter = match status.as_u16() {
        500.. => &state.metrics.http_server_errors,
        400..=499 => &state.metrics.http_client_errors,
        _ => &state.metrics.http_ok,
    };
    Metrics::inc(counter);
    tracing::info!(%method, route, status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    response
}

#[cfg(test)]
mod tests {
    /// Every setting is documented in the protocol's table of limits and defaults (§8).
    #[test]
    fn every_setting_is_in_the_protocol() {
        let protocol = include_str!("../../../docs/PROTOCOL.md");
        let section = &protocol[protocol.find("## 8. Limits and defaults").expect("§8 exists")..];
        let settings = serde_json::to_value(super::Config::default()).expect("the config serialises");
        for name in settings.as_object().expect("the config is a table").keys() {
            assert!(
                section.contains(&format!("| `{name}` |")),
                "the setting {name} is missing from docs/PROTOCOL.md §8"
            );
        }
    }
}
