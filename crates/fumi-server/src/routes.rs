//! HTTP handlers. Each validates sizes and encodings before touching storage, so bad input gets a
//! 4xx and changes nothing.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequest, Path, Request, State};
use axum::handler::Handler;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, Router, routing};
use fumi_proto::endpoints::{self, Endpoint};
use fumi_proto::*;
use rand::RngCore;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::framing;
use crate::metrics::Metrics;
use crate::storage::{Ciphertext, Delivery, Submission, SubmitOutcome};
use crate::{AppState, attachments, audit, auth::AuthDevice, channels, devices, key_directory, now_ms, ws};

/// Largest sealed profile accepted.
const MAX_PROFILE_BYTES: usize = 8 * 1024;
/// Largest KeyPackage accepted.
pub(crate) const MAX_KEY_PACKAGE_BYTES: usize = 16 * 1024;
/// Most KeyPackages in one upload.
pub(crate) const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 100;
/// Most accounts in one claim.
const MAX_ACCOUNTS_PER_CLAIM: usize = 100;

/// Collects routes and the list of what was routed, so tests can walk every endpoint (a route
/// cannot be added without appearing in [`endpoints`]). Routes are fumi-proto's descriptors, so
/// the method and path a client uses are the ones served.
#[derive(Default)]
struct Api {
    router: Router<Arc<AppState>>,
    endpoints: Vec<Endpoint>,
}

impl Api {
    fn route<H, T>(mut self, endpoint: Endpoint, handler: H) -> Self
    where
        H: Handler<T, Arc<AppState>>,
        T: 'static,
    {
        let method =
            axum::http::Method::from_bytes(endpoint.method.as_bytes()).expect("descriptors name valid methods");
        let filter = routing::MethodFilter::try_from(method).expect("descriptors name routable methods");
        self.router = self.router.route(endpoint.path, routing::on(filter, handler));
        self.endpoints.push(endpoint);
        self
    }
}

fn api() -> Api {
    Api::default()
        .route(endpoints::HEALTH, health)
        .route(endpoints::METRICS, metrics)
        .route(endpoints::REGISTER, register)
        .route(endpoints::AUDIT_HEAD, audit::head)
        .route(endpoints::AUDIT_ENTRIES, audit::entries)
        .route(endpoints::AUDIT_INCLUSION, audit::inclusion_proof)
        .route(endpoints::AUDIT_CONSISTENCY, audit::consistency_proof)
        .route(endpoints::AUDIT_KEY, audit::account_key)
        .route(endpoints::MODERATION_KEY, moderation_key)
        .route(endpoints::FILE_REPORT, submit_report)
        .route(endpoints::ACCOUNT, account_info)
        .route(endpoints::PROFILE, get_profile)
        .route(endpoints::PUT_PROFILE, put_profile)
        .route(endpoints::CLAIM_USERNAME, claim_username)
        .route(endpoints::USERNAME, lookup_username)
        .route(endpoints::UPLOAD_KEY_PACKAGES, upload_key_packages)
        .route(endpoints::KEY_PACKAGE_COUNT, key_package_count)
        .route(endpoints::CLAIM_KEY_PACKAGES, claim_key_packages)
        .route(endpoints::SUBMIT_MESSAGE, submit_message)
        .route(endpoints::WEBSOCKET, ws::upgrade)
        .route(endpoints::CREATE_LINK, devices::create_link)
        .route(endpoints::OPEN_LINK, devices::open_link)
        .route(endpoints::LINK_STATUS, devices::link_status)
        .route(endpoints::PUT_LINK_HISTORY, devices::put_link_history)
        .route(endpoints::GET_LINK_HISTORY, devices::get_link_history)
        .route(endpoints::LINK_DEVICE, devices::link_device)
        .route(endpoints::REMOVE_DEVICE, devices::remove_device)
        .route(endpoints::CREATE_INVITE, devices::create_invite)
        .route(endpoints::REDEEM_INVITE, devices::redeem_invite)
        .route(endpoints::PUT_AVATAR, attachments::put_avatar)
        .route(endpoints::AVATAR, attachments::get_avatar)
        .route(endpoints::CREATE_BLOB, attachments::create_blob)
        .route(endpoints::UPLOAD_BLOB, attachments::upload)
        .route(endpoints::DOWNLOAD_BLOB, attachments::download)
        .route(endpoints::BLOB_UPLOAD_STATUS, attachments::upload_status)
        .route(endpoints::ACK_BLOB, attachments::acknowledge)
        .route(endpoints::KEYS_HEAD, key_directory::head)
        .route(endpoints::KEYS_HEADS, key_directory::heads)
        .route(endpoints::KEYS_AUDIT, key_directory::audit)
        .route(endpoints::KEYS_LOOKUP_ACCOUNT, key_directory::lookup_account)
        .route(endpoints::KEYS_LOOKUP_USERNAME, key_directory::lookup_username)
        .route(endpoints::KEYS_OWN_HISTORY, key_directory::own_history)
        .route(endpoints::KEYS_ACCOUNT_HISTORY, key_directory::account_history)
        .route(endpoints::CREATE_CHANNEL, channels::create)
        .route(endpoints::CHANNEL, channels::get)
        .route(endpoints::UPDATE_CHANNEL, channels::update)
        .route(endpoints::CHANNEL_POSTS, channels::posts)
        .route(endpoints::POST_TO_CHANNEL, channels::post)
        .route(endpoints::SUBSCRIBE, channels::subscribe)
        .route(endpoints::UNSUBSCRIBE, channels::unsubscribe)
}

/// Every endpoint of the public API.
pub fn endpoints() -> Vec<Endpoint> {
    api().endpoints
}

/// Every route of the public API.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = axum::extract::DefaultBodyLimit::max(max_body_bytes(&state.config));
    let router = api().router;
    #[cfg(feature = "test-hooks")]
    let router = if crate::test_hooks::enabled() {
        router
            .route("/v1/test/impersonate", routing::post(crate::test_hooks::impersonate))
            .route(
                "/v1/test/phantom-device",
                routing::post(crate::test_hooks::phantom_device),
            )
            .route("/v1/test/keys/publish", routing::post(crate::test_hooks::publish))
            .route("/v1/test/link-status", routing::post(crate::test_hooks::link_status))
    } else {
        router
    };
    router
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint; see docs/PROTOCOL.md") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::MethodNotAllowed, "this endpoint does not accept that method")
        })
        .layer(body_limit)
        .with_state(state)
}

/// Largest request body: a maximal message in base64 plus room for the recipient list.
fn max_body_bytes(config: &crate::Config) -> usize {
    config.max_message_bytes / 3 * 4 + config.max_recipients * 40 + 64 * 1024
}

/// A JSON body whose rejections are answered in Fumi's error format.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        // Refuse an announced oversized body at once instead of waiting for it to arrive.
        let announced = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if announced.is_some_and(|len| len > max_body_bytes(&state.config)) {
            return Err(ApiError::too_large("request body is too large"));
        }
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large("request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send JSON with Content-Type: application/json",
        ),
        _ => ApiError::bad_request(format!("malformed JSON body: {}", rejection.body_text())),
    }
}

pub(crate) fn parse_path_id<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("{what} must be 32 hexadecimal digits")))
}

pub(crate) fn exact_32(bytes: &Base64Bytes, what: &str) -> Result<[u8; 32], ApiError> {
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| ApiError::bad_request(format!("{what} must be 32 bytes")))
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let stats = crate::regions::stats(&state).await?;
    let mut text = state.metrics.render(stats);
    if let Some(connected) = state.fanout.bus_connected() {
        text.push_str(&format!(
            "# HELP fumi_cluster_bus_connected 1 while NATS carries delivery events between nodes; 0 while this node falls back to re-reading mailboxes.\n\
             # TYPE fumi_cluster_bus_connected gauge\nfumi_cluster_bus_connected {}\n",
            u8::from(connected)
        ));
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

async fn register(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<impl IntoResponse, ApiError> {
    if !state.address_limiter.check(&peer.ip(), Instant::now()) {
        Metrics::inc(&state.metrics.rate_limited);
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many registrations from this address; try later",
        ));
    }
    let identity_key = exact_32(&request.identity_key, "identity_key")?;
    let secret_hash = exact_32(&request.device_secret_hash, "device_secret_hash")?;
    let region = match &request.region {
        None => state.regions.default_index(),
        Some(name) => state.regions.by_name(name).ok_or_else(|| {
            let names: Vec<&str> = state.regions.all().iter().map(|r| r.name.as_str()).collect();
            ApiError::bad_request(format!("unknown region {name:?}; this server has {}", names.join(", ")))
        })?,
    };
    let (account_id, device_id) = {
        // ThreadRng is not Send: keep it out of the await below.
        let mut rng = rand::rng();
        let mut random_id = || {
            let mut bytes = [0u8; 16];
            rng.fill_bytes(&mut bytes);
            bytes
        };
        (AccountId::from_bytes(random_id()), DeviceId::from_bytes(random_id()))
    };
    state
        .storage
        .create_account(
            account_id,
            &identity_key,
            device_id,
            &secret_hash,
            state.regions.stored_name(region).as_deref(),
            now_ms(),
        )
        .await?;
    Metrics::inc(&state.metrics.registrations);
    Ok((StatusCode::CREATED, Json(RegisterResponse { account_id, device_id })))
}

async fn account_info(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
) -> Result<Json<AccountInfo>, ApiError> {
    let account_id: AccountId = parse_path_id(&account, "account id")?;
    let record = state
        .storage
        .account(account_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownAccount, "no such account"))?;
    #[cfg(feature = "test-hooks")]
    let record = {
        let mut record = record;
        if let Some(fake) = state
            .test_hooks
            .impersonated
            .lock()
            .expect("hooks lock")
            .get(&account_id)
        {
            record.identity_key = fake.identity_key.as_slice().to_vec();
        }
        record
    };
    Ok(Json(AccountInfo {
        account_id,
        identity_key: Base64Bytes(record.identity_key),
        devices: record.devices,
    }))
}

async fn get_profile(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
) -> Result<Json<SealedProfile>, ApiError> {
    let account_id: AccountId = parse_path_id(&account, "account id")?;
    let sealed = crate::regions::readable(&state, account_id)
        .await?
        .storage
        .profile(account_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownProfile, "this account has no profile"))?;
    Ok(Json(SealedProfile {
        sealed: Base64Bytes(sealed.0),
    }))
}

async fn put_profile(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(profile): ApiJson<SealedProfile>,
) -> Result<StatusCode, ApiError> {
    if profile.sealed.as_slice().len() > MAX_PROFILE_BYTES {
        return Err(ApiError::too_large(format!(
            "a sealed profile is at most {MAX_PROFILE_BYTES} bytes"
        )));
    }
    if profile.sealed.as_slice().len() < 24 + 16 {
        return Err(ApiError::bad_request(
            "a sealed profile is a nonce and an AEAD ciphertext",
        ));
    }
    state
        .regions
        .get(device.region)
        .storage
        .put_profile(device.account, Ciphertext(profile.sealed.into_vec()), now_ms())
        .await?;
    crate::regions::confirm(&state, device.account, device.device, device.region).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn claim_username(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(claim): ApiJson<UsernameClaim>,
) -> Result<StatusCode, ApiError> {
    let hash = exact_32(&claim.username_hash, "username_hash")?;
    state.storage.claim_username(device.account, &hash).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn lookup_username(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
) -> Result<Json<UsernameLookup>, ApiError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(&hash, &mut bytes)
        .map_err(|_| ApiError::bad_request("a username hash is 64 hexadecimal digits"))?;
    let account_id = state
        .storage
        .lookup_username(&bytes)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownUsername, "no account has this username"))?;
    Ok(Json(UsernameLookup { account_id }))
}

async fn upload_key_packages(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(upload): ApiJson<KeyPackageUpload>,
) -> Result<Json<KeyPackageCount>, ApiError> {
    if upload.key_packages.len() > MAX_KEY_PACKAGES_PER_UPLOAD {
        return Err(ApiError::too_large(format!(
            "at most {MAX_KEY_PACKAGES_PER_UPLOAD} key packages per upload"
        )));
    }
    for key_package in upload.key_packages.iter().chain(upload.last_resort.iter()) {
        if key_package.as_slice().len() > MAX_KEY_PACKAGE_BYTES {
            return Err(ApiError::too_large(format!(
                "a key package is at most {MAX_KEY_PACKAGE_BYTES} bytes"
            )));
        }
    }
    let signature_key = framing::uploaded_signature_key(
        upload
            .key_packages
            .iter()
            .map(|kp| (kp.as_slice(), false))
            .chain(upload.last_resort.iter().map(|kp| (kp.as_slice(), true))),
    )
    .map_err(ApiError::bad_request)?;
    if let Some(key) = signature_key {
        // The first KeyPackages fix the device's key in the key directory; later ones must match.
        let recorded = state.storage.set_signature_key(device.device, &key).await?;
        if recorded != key {
            return Err(ApiError::bad_request(
                "these key packages carry another signature key than this device's earlier ones",
            ));
        }
    }
    let region = &state.regions.get(device.region).storage;
    let stock = region.key_package_count(device.device).await?;
    if stock + upload.key_packages.len() as u64 > state.config.max_key_packages_per_device {
        return Err(ApiError::new(
            ErrorCode::TooManyKeyPackages,
            format!(
                "a device keeps at most {} key packages",
                state.config.max_key_packages_per_device
            ),
        ));
    }
    let one_time = upload
        .key_packages
        .into_iter()
        .map(|kp| Ciphertext(kp.into_vec()))
        .collect();
    let last_resort = upload.last_resort.map(|kp| Ciphertext(kp.into_vec()));
    let count = region.add_key_packages(device.device, one_time, last_resort).await?;
    crate::regions::confirm(&state, device.account, device.device, device.region).await?;
    Ok(Json(KeyPackageCount { count }))
}

async fn key_package_count(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
) -> Result<Json<KeyPackageCount>, ApiError> {
    Ok(Json(KeyPackageCount {
        count: state
            .regions
            .get(device.region)
            .storage
            .key_package_count(device.device)
            .await?,
    }))
}

async fn claim_key_packages(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(claim): ApiJson<KeyPackageClaim>,
) -> Result<Json<ClaimedKeyPackages>, ApiError> {
    if claim.accounts.is_empty() || claim.accounts.len() > MAX_ACCOUNTS_PER_CLAIM {
        return Err(ApiError::bad_request(format!(
            "claim key packages for 1 to {MAX_ACCOUNTS_PER_CLAIM} accounts"
        )));
    }
    let mut seen = HashSet::new();
    let accounts: Vec<AccountId> = claim.accounts.into_iter().filter(|a| seen.insert(*a)).collect();
    if claim.devices.len() > MAX_ACCOUNTS_PER_CLAIM * 10 {
        return Err(ApiError::bad_request("too many devices in one claim"));
    }
    let claimed = crate::regions::claim_key_packages(&state, &accounts, &claim.devices).await?;
    #[cfg(feature = "test-hooks")]
    let claimed: Vec<_> = {
        let fakes = state.test_hooks.impersonated.lock().expect("hooks lock");
        claimed
            .into_iter()
            .map(|(account, device, kp)| {
                let fake = fakes
                    .get(&account)
                    .and_then(|f| f.key_packages.iter().find(|(d, _)| *d == device));
                match fake {
                    Some((_, fake)) => (account, device, crate::storage::Ciphertext(fake.as_slice().to_vec())),
                    None => (account, device, kp),
                }
            })
            .collect()
    };
    Ok(Json(ClaimedKeyPackages {
        key_packages: claimed
            .into_iter()
            .map(|(account_id, device_id, kp)| ClaimedKeyPackage {
                account_id,
                device_id,
                key_package: Base64Bytes(kp.0),
            })
            .collect(),
    }))
}

/// Smallest sealed report: an X25519 encapsulated key and an AEAD tag.
const MIN_SEALED_REPORT_BYTES: usize = 32 + 16;

async fn moderation_key(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
) -> Result<Json<ModerationKey>, ApiError> {
    let key = crate::moderation_key(&state.config).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ReportsDisabled,
            "this server takes no abuse reports (no moderation key is configured)",
        )
    })?;
    Ok(Json(ModerationKey {
        public_key: Base64Bytes(key.to_vec()),
    }))
}

/// Stores an abuse report sealed to the moderation key; the server cannot read it.
async fn submit_report(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<ReportSubmit>,
) -> Result<Json<ReportFiled>, ApiError> {
    if crate::moderation_key(&state.config).is_none() {
        return Err(ApiError::new(
            ErrorCode::ReportsDisabled,
            "this server takes no abuse reports (no moderation key is configured)",
        ));
    }
    let size = request.sealed.as_slice().len();
    if size > MAX_SEALED_REPORT_BYTES {
        return Err(ApiError::too_large(format!(
            "a sealed report is at most {MAX_SEALED_REPORT_BYTES} bytes"
        )));
    }
    if size < MIN_SEALED_REPORT_BYTES {
        return Err(ApiError::bad_request("a sealed report is at least 48 bytes"));
    }
    let id = state
        .storage
        .create_report(Ciphertext(request.sealed.0), now_ms())
        .await?;
    Ok(Json(ReportFiled { id }))
}

async fn submit_message(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<SubmitMessage>,
) -> Result<Json<SubmitAccepted>, ApiError> {
    let config = &state.config;
    let total = request.message.as_slice().len() + request.welcome.as_ref().map_or(0, |w| w.message.as_slice().len());
    if total > config.max_message_bytes {
        return Err(ApiError::too_large(format!(
            "a message is at most {} bytes",
            config.max_message_bytes
        )));
    }
    let welcome_recipients = request.welcome.as_ref().map_or(0, |w| w.recipients.len());
    if request.recipients.len() + welcome_recipients > config.max_recipients {
        return Err(ApiError::new(
            ErrorCode::TooManyRecipients,
            format!("a message goes to at most {} devices", config.max_recipients),
        ));
    }
    check_recipients(&request.recipients, device.device)?;
    if !request.removed.iter().all(|d| request.recipients.contains(d)) {
        return Err(ApiError::bad_request(
            "removed devices must be among the commit's recipients",
        ));
    }
    let framing = framing::inspect_group_message(request.message.as_slice()).map_err(ApiError::bad_request)?;
    let mut deliveries = vec![Delivery {
        body: Ciphertext(request.message.as_slice().to_vec()),
        recipients: request.recipients.clone(),
    }];
    if let Some(welcome) = &request.welcome {
        if !framing.is_commit {
            return Err(ApiError::bad_request(
                "a welcome travels only with the commit that adds its members",
            ));
        }
        framing::check_welcome(welcome.message.as_slice()).map_err(ApiError::bad_request)?;
        if welcome.recipients.iter().any(|d| request.recipients.contains(d)) {
            return Err(ApiError::bad_request(
                "a device gets either the commit or the welcome, not both",
            ));
        }
        check_recipients(&welcome.recipients, device.device)?;
        deliveries.push(Delivery {
            body: Ciphertext(welcome.message.as_slice().to_vec()),
            recipients: welcome.recipients.clone(),
        });
    }

    let now = now_ms();
    let submission = Submission {
        sender: device.device,
        message_id: request.id,
        digest: submission_digest(&request),
        group: framing.group,
        commit_epoch: framing.is_commit.then_some(framing.epoch),
        deliveries,
        removed: if framing.is_commit {
            request.removed.clone()
        } else {
            vec![]
        },
        now,
        expires_at: now.saturating_add(config.message_ttl_secs.saturating_mul(1000)),
        max_queued: config.max_queued_per_device,
    };
    let recipients: Vec<DeviceId> = submission
        .deliveries
        .iter()
        .flat_map(|d| d.recipients.iter().copied())
        .collect();
    let outcome = match state.storage.submit(submission).await {
        Err(error @ crate::storage::StorageError::EpochConflict { .. }) => {
            Metrics::inc(&state.metrics.commit_conflicts);
            return Err(error.into());
        }
        other => other?,
    };
    let accepted = match outcome {
        SubmitOutcome::Accepted { accepted_at, elsewhere } => {
            Metrics::inc(&state.metrics.messages_accepted);
            if elsewhere {
                // Envelopes of devices living in other regions go there before the answer (the
                // forwarder retries what fails; the message is accepted either way).
                if let Err(error) = crate::regions::forward(&state, Some(&recipients)).await {
                    tracing::warn!(%error, "forwarding envelopes to their regions failed; retried within a second");
                }
            }
            for recipient in recipients {
                state.fanout.notify(recipient);
            }
            SubmitAccepted {
                accepted_at,
                duplicate: false,
            }
        }
        SubmitOutcome::Duplicate { accepted_at } => SubmitAccepted {
            accepted_at,
            duplicate: true,
        },
    };
    Ok(Json(accepted))
}

fn check_recipients(recipients: &[DeviceId], sender: DeviceId) -> Result<(), ApiError> {
    let unique: HashSet<_> = recipients.iter().collect();
    if unique.len() != recipients.len() {
        return Err(ApiError::bad_request("a recipient is listed twice"));
    }
    if unique.contains(&sender) {
        return Err(ApiError::bad_request("the sending device cannot be a recipient"));
    }
    Ok(())
}

/// SHA-256 over everything submitted, so a retry (same id, same body) is told apart from a reuse
/// of the id for something else.
fn submission_digest(request: &SubmitMessage) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    field(request.message.as_slice());
    for recipient in &request.recipients {
        field(recipient.as_bytes());
    }
    if let Some(welcome) = &request.welcome {
        field(welcome.message.as_slice());
        for recipient in &welcome.recipients {
            field(recipient.as_bytes());
        }
    }
    for removed in &request.removed {
        field(removed.as_bytes());
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_server_routes_every_endpoint_of_the_protocol_once() {
        let served = super::endpoints();
        assert_eq!(served.len(), fumi_proto::endpoints::ALL.len());
        for endpoint in fumi_proto::endpoints::ALL {
            assert_eq!(
                served.iter().filter(|e| *e == endpoint).count(),
                1,
                "{endpoint:?} is not routed once"
            );
        }
    }
}
