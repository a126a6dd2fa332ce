//! Linked devices and invites: the handlers that add a device to an account (through a one-time
//! link slot and a signature by the account identity key), remove one, and register and redeem
//! one-time invite tokens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use ed25519_dalek::{Signature, VerifyingKey};
use fumi_proto::*;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::framing;
use crate::metrics::Metrics;
use crate::routes::{ApiJson, MAX_KEY_PACKAGE_BYTES, MAX_KEY_PACKAGES_PER_UPLOAD, exact_32, parse_path_id};
use crate::storage::Ciphertext;
use crate::{AppState, auth::AuthDevice, now_ms};

/// How long a link code works.
const LINK_TTL_MS: u64 = 10 * 60 * 1000;
/// How long an unused invite works.
const INVITE_TTL_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// Largest sealed account bundle in a link slot.
const MAX_LINK_BUNDLE_BYTES: usize = 256 * 1024;

/// Unauthenticated endpoints share the per-address limit of registrations.
fn check_address(state: &AppState, peer: SocketAddr) -> Result<(), ApiError> {
    if state.address_limiter.check(&peer.ip(), Instant::now()) {
        return Ok(());
    }
    Metrics::inc(&state.metrics.rate_limited);
    Err(ApiError::new(
        ErrorCode::RateLimited,
        "too many requests from this address; try later",
    ))
}

/// A link token hash as a path names it (64 hex digits).
fn path_token_hash(hash: &str) -> Result<[u8; 32], ApiError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hash, &mut bytes)
        .map_err(|_| ApiError::bad_request("a link token hash is 64 hexadecimal digits"))?;
    Ok(bytes)
}

fn token_hash(token: &Base64Bytes) -> Result<[u8; 32], ApiError> {
    let token = exact_32(token, "token")?;
    Ok(Sha256::digest(token).into())
}

pub(crate) async fn create_link(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<LinkCreate>,
) -> Result<StatusCode, ApiError> {
    let hash = exact_32(&request.token_hash, "token_hash")?;
    if request.sealed.as_slice().len() > MAX_LINK_BUNDLE_BYTES {
        return Err(ApiError::too_large(format!(
            "a link bundle is at most {MAX_LINK_BUNDLE_BYTES} bytes"
        )));
    }
    if request.sealed.as_slice().len() < 24 + 16 {
        return Err(ApiError::bad_request("a link bundle is a nonce and an AEAD ciphertext"));
    }
    let now = now_ms();
    state
        .storage
        .create_link(
            &hash,
            device.account,
            Ciphertext(request.sealed.into_vec()),
            now,
            now + LINK_TTL_MS,
        )
        .await?;
    Ok(StatusCode::CREATED)
}

pub(crate) async fn open_link(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<LinkOpen>,
) -> Result<Json<LinkBundle>, ApiError> {
    check_address(&state, peer)?;
    let hash = token_hash(&request.token)?;
    let (account_id, sealed) = state.storage.open_link(&hash, now_ms()).await?;
    Ok(Json(LinkBundle {
        account_id,
        sealed: Base64Bytes(sealed.0),
    }))
}

pub(crate) async fn link_status(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
) -> Result<Json<LinkStatus>, ApiError> {
    let bytes = path_token_hash(&hash)?;
    let device_id = state.storage.link_status(&bytes, device.account).await?;
    #[cfg(feature = "test-hooks")]
    let device_id = device_id
        .and(*state.test_hooks.linked_device.lock().expect("hooks lock"))
        .or(device_id);
    let (signature_key, link_proof) = match device_id {
        None => (None, None),
        Some(linked) => {
            let key = state
                .storage
                .device_keys(device.account)
                .await?
                .and_then(|(_, devices)| devices.into_iter().find(|(d, _)| *d == linked).map(|(_, key)| key));
            let proof = state.storage.link_proof(&bytes, device.account).await?;
            (key.map(Base64Bytes), proof.map(Base64Bytes))
        }
    };
    Ok(Json(LinkStatus {
        device_id,
        signature_key,
        link_proof,
    }))
}

/// How long a device has to fetch its history after the old device attached it.
const LINK_HISTORY_TTL_MS: u64 = 24 * 60 * 60 * 1000;

pub(crate) async fn put_link_history(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
    ApiJson(request): ApiJson<LinkHistory>,
) -> Result<StatusCode, ApiError> {
    let bytes = path_token_hash(&hash)?;
    let sealed = request
        .sealed
        .ok_or_else(|| ApiError::bad_request("sealed is required"))?;
    let length = sealed.as_slice().len();
    if !(24 + 16..=4096).contains(&length) {
        return Err(ApiError::bad_request("a sealed history pointer is 40 to 4096 bytes"));
    }
    state
        .storage
        .set_link_history(
            &bytes,
            device.account,
            Ciphertext(sealed.into_vec()),
            now_ms() + LINK_HISTORY_TTL_MS,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn get_link_history(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<LinkOpen>,
) -> Result<Json<LinkHistory>, ApiError> {
    let hash = token_hash(&request.token)?;
    let sealed = state.storage.link_history(&hash, device.device).await?;
    Ok(Json(LinkHistory {
        sealed: sealed.map(|s| Base64Bytes(s.0)),
    }))
}

pub(crate) async fn link_device(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<LinkDevice>,
) -> Result<StatusCode, ApiError> {
    check_address(&state, peer)?;
    let hash = token_hash(&request.token)?;
    let secret_hash = exact_32(&request.device_secret_hash, "device_secret_hash")?;
    let signature: [u8; 64] = request
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| ApiError::bad_request("signature must be 64 bytes"))?;
    if request
        .link_proof
        .as_ref()
        .is_some_and(|proof| proof.as_slice().len() != 32)
    {
        return Err(ApiError::bad_request("link_proof must be 32 bytes"));
    }
    if request.key_packages.is_empty() || request.key_packages.len() > MAX_KEY_PACKAGES_PER_UPLOAD {
        return Err(ApiError::bad_request(format!(
            "a new device brings 1 to {MAX_KEY_PACKAGES_PER_UPLOAD} key packages"
        )));
    }
    for key_package in request.key_packages.iter().chain(request.last_resort.iter()) {
        if key_package.as_slice().len() > MAX_KEY_PACKAGE_BYTES {
            return Err(ApiError::too_large(format!(
                "a key package is at most {MAX_KEY_PACKAGE_BYTES} bytes"
            )));
        }
    }
    let signature_key = framing::uploaded_signature_key(
        request
            .key_packages
            .iter()
            .map(|kp| (kp.as_slice(), false))
            .chain(request.last_resort.iter().map(|kp| (kp.as_slice(), true))),
    )
    .map_err(ApiError::bad_request)?;
    let now = now_ms();
    // The slot names the account; its registered identity key must have signed this device.
    let (account, _) = state.storage.open_link(&hash, now).await?;
    let record = state
        .storage
        .account(account)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownAccount, "no such account"))?;
    if record.devices.len() >= state.config.max_devices_per_account {
        return Err(ApiError::new(
            ErrorCode::TooManyDevices,
            format!(
                "this account already has {} devices, the most allowed; remove one first",
                state.config.max_devices_per_account
            ),
        ));
    }
    let identity: [u8; 32] = record
        .identity_key
        .as_slice()
        .try_into()
        .map_err(|_| ApiError::internal("stored identity key is not 32 bytes"))?;
    let key = VerifyingKey::from_bytes(&identity).map_err(|_| ApiError::internal("stored identity key is invalid"))?;
    let message = device_link_message(account, request.device_id, &hash, &secret_hash);
    key.verify_strict(&message, &Signature::from_bytes(&signature))
        .map_err(|_| {
            ApiError::new(
                ErrorCode::BadSignature,
                "the device is not signed by the account's identity key",
            )
        })?;
    // The device's KeyPackages go to the account's region (refused while it moves).
    let region = match state.regions.several() {
        false => 0,
        true => state
            .regions
            .resident(&state.storage.residency(account).await?.unwrap_or_default())?,
    };
    let key_packages: Vec<Ciphertext> = request
        .key_packages
        .into_iter()
        .map(|kp| Ciphertext(kp.into_vec()))
        .collect();
    let last_resort = request.last_resort.map(|kp| Ciphertext(kp.into_vec()));
    let (here, there) = if region == 0 {
        ((key_packages, last_resort), None)
    } else {
        ((Vec::new(), None), Some((key_packages, last_resort)))
    };
    state
        .storage
        .link_device(&hash, account, request.device_id, &secret_hash, here.0, here.1, now)
        .await?;
    if let Some((key_packages, last_resort)) = there {
        state
            .regions
            .get(region)
            .storage
            .add_key_packages(request.device_id, key_packages, last_resort)
            .await?;
        crate::regions::confirm(&state, account, request.device_id, region).await?;
    }
    if let Some(key) = signature_key {
        state.storage.set_signature_key(request.device_id, &key).await?;
    }
    if let Some(proof) = &request.link_proof {
        state.storage.set_link_proof(&hash, proof.as_slice()).await?;
    }
    Ok(StatusCode::CREATED)
}

pub(crate) async fn remove_device(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(target): Path<String>,
) -> Result<StatusCode, ApiError> {
    let target: DeviceId = parse_path_id(&target, "device id")?;
    if target == device.device {
        return Err(ApiError::bad_request(
            "a device cannot remove itself; remove it from another of your devices",
        ));
    }
    // Its mailbox goes and nothing is queued for it any more, so even a delivery connection it
    // still holds carries nothing new; its credentials stop working at once.
    state.storage.remove_device(device.account, target, now_ms()).await?;
    if device.region != 0 {
        // Its mailbox and KeyPackages in the account's region go too.
        crate::regions::delete_resident(state.regions.get(device.region), None, &[target]).await?;
    }
    // Files it uploaded, and files only it was still to fetch, go now rather than at the next
    // minute's collection.
    crate::collect_blobs(&state, now_ms()).await;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn create_invite(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<InviteCreate>,
) -> Result<StatusCode, ApiError> {
    let hash = exact_32(&request.token_hash, "token_hash")?;
    let now = now_ms();
    state
        .storage
        .create_invite(&hash, device.account, now, now + INVITE_TTL_MS)
        .await?;
    Ok(StatusCode::CREATED)
}

pub(crate) async fn redeem_invite(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<InviteRedeem>,
) -> Result<StatusCode, ApiError> {
    let hash = token_hash(&request.token)?;
    state.storage.redeem_invite(&hash, request.account_id, now_ms()).await?;
    Ok(StatusCode::NO_CONTENT)
}
