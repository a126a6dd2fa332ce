//! Handlers for encrypted attachments (blobs) and sealed avatars. The server moves opaque
//! bytes: the key, the file name and the media type travel inside MLS messages it cannot read.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fumi_proto::*;
use futures_util::StreamExt;
use rand::RngCore;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::routes::{ApiJson, parse_path_id};
use crate::storage::{BlobRecord, Ciphertext};
use crate::{AppState, auth::AuthDevice, now_ms};

/// Largest sealed avatar accepted.
pub const MAX_SEALED_AVATAR_BYTES: usize = 320 * 1024;

pub(crate) async fn put_avatar(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(avatar): ApiJson<SealedAvatar>,
) -> Result<StatusCode, ApiError> {
    let length = avatar.sealed.as_slice().len();
    if length > MAX_SEALED_AVATAR_BYTES {
        return Err(ApiError::too_large(format!(
            "a sealed avatar is at most {MAX_SEALED_AVATAR_BYTES} bytes"
        )));
    }
    if length < 24 + 16 {
        return Err(ApiError::bad_request(
            "a sealed avatar is a nonce and an AEAD ciphertext",
        ));
    }
    state
        .regions
        .get(device.region)
        .storage
        .put_avatar(device.account, Ciphertext(avatar.sealed.into_vec()), now_ms())
        .await?;
    crate::regions::confirm(&state, device.account, device.device, device.region).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn get_avatar(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
) -> Result<Json<SealedAvatar>, ApiError> {
    let account: AccountId = parse_path_id(&account, "account id")?;
    let sealed = crate::regions::readable(&state, account)
        .await?
        .storage
        .avatar(account)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownAvatar, "this account has no avatar"))?;
    Ok(Json(SealedAvatar {
        sealed: Base64Bytes(sealed.0),
    }))
}

pub(crate) async fn create_blob(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<BlobCreate>,
) -> Result<(StatusCode, Json<BlobCreated>), ApiError> {
    let config = &state.config;
    if request.size == 0 {
        return Err(ApiError::bad_request("a blob has at least one byte"));
    }
    if request.size > config.max_blob_bytes {
        return Err(ApiError::too_large(format!(
            "an attachment is at most {} bytes once encrypted",
            config.max_blob_bytes
        )));
    }
    match (request.channel, request.recipients.len()) {
        (Some(_), 0) => {}
        (Some(_), _) => {
            return Err(ApiError::bad_request(
                "a channel's file names no recipients: every subscriber may fetch it",
            ));
        }
        (None, n) if n == 0 || n > config.max_recipients => {
            return Err(ApiError::bad_request(format!(
                "a blob goes to 1 to {} devices",
                config.max_recipients
            )));
        }
        (None, _) => {}
    }
    let unique: HashSet<_> = request.recipients.iter().collect();
    if unique.len() != request.recipients.len() {
        return Err(ApiError::bad_request("a recipient is listed twice"));
    }
    if unique.contains(&device.device) {
        return Err(ApiError::bad_request("the uploading device cannot be a recipient"));
    }
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    let now = now_ms();
    let record = BlobRecord {
        id: BlobId::from_bytes(id),
        owner_account: device.account,
        owner_device: device.device,
        size: request.size,
        complete: false,
        pending: request.recipients,
        expires_at: now.saturating_add(config.message_ttl_secs.saturating_mul(1000)),
        channel: request.channel,
    };
    state.storage.create_blob(&record, config.blob_quota_bytes, now).await?;
    Ok((StatusCode::CREATED, Json(BlobCreated { blob_id: record.id })))
}

/// The blob a path names.
async fn blob_record(state: &AppState, blob: &str) -> Result<BlobRecord, ApiError> {
    let id: BlobId = parse_path_id(blob, "blob id")?;
    Ok(state
        .storage
        .blob(id)
        .await?
        .ok_or(crate::storage::StorageError::UnknownBlob)?)
}

/// The blob, if the caller uploads it.
async fn owned_blob(state: &AppState, device: &AuthDevice, blob: &str) -> Result<BlobRecord, ApiError> {
    let record = blob_record(state, blob).await?;
    if record.owner_device != device.device {
        return Err(ApiError::new(
            ErrorCode::NotTheUploader,
            "only the device that started this upload may write to it",
        ));
    }
    Ok(record)
}

/// Marks a blob as having an upload request running; released on drop.
struct UploadGuard<'a> {
    state: &'a AppState,
    id: BlobId,
}

impl<'a> UploadGuard<'a> {
    fn take(state: &'a AppState, id: BlobId) -> Result<Self, ApiError> {
        let mut running = state.uploads_in_progress.lock().expect("upload lock poisoned");
        if !running.insert(id) {
            return Err(ApiError::new(
                ErrorCode::UploadInProgress,
                "another request is writing this upload; wait for it to end, then check the upload status",
            ));
        }
        Ok(Self { state, id })
    }
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut running) = self.state.uploads_in_progress.lock() {
            running.remove(&self.id);
        }
    }
}

pub(crate) async fn upload_status(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(blob): Path<String>,
) -> Result<Json<BlobUploadStatus>, ApiError> {
    let record = owned_blob(&state, &device, &blob).await?;
    let blobs = &state.regions.get(device.region).blobs;
    let complete = record.complete || finish_interrupted(&state, blobs, &record).await?;
    let received = if complete {
        record.size
    } else {
        blobs.received(record.id).await?
    };
    Ok(Json(BlobUploadStatus {
        size: record.size,
        received,
        complete,
    }))
}

/// An upload whose bytes reached the blob store but whose completion was not recorded (the
/// server stopped in between) is completed now, so the uploader is not stuck at offset 0.
async fn finish_interrupted(
    state: &AppState,
    blobs: &crate::blobs::BlobStore,
    record: &BlobRecord,
) -> Result<bool, ApiError> {
    if record.complete || blobs.received(record.id).await? != 0 || !blobs.stored(record.id).await? {
        return Ok(false);
    }
    state.storage.complete_blob(record.id).await?;
    Ok(true)
}

pub(crate) async fn upload(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(blob): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BlobUploadStatus>, ApiError> {
    let record = owned_blob(&state, &device, &blob).await?;
    let offset: u64 = headers
        .get(UPLOAD_OFFSET_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ApiError::bad_request(format!("the {UPLOAD_OFFSET_HEADER} header must give the byte offset")))?;
    let _guard = UploadGuard::take(&state, record.id)?;
    let blobs = &state.regions.get(device.region).blobs;
    if record.complete || finish_interrupted(&state, blobs, &record).await? {
        return Err(ApiError::new(
            ErrorCode::UploadComplete,
            "this upload is already complete",
        ));
    }
    let received = blobs.append(record.id, offset, record.size, body).await?;
    Metrics::add(&state.metrics.blob_bytes_received, received - offset);
    let complete = received == record.size;
    if complete {
        blobs.finish(record.id).await?;
        // A relocation that began during the upload may have missed these bytes: they go, and
        // the uploader starts again (in the new region) once it ends.
        if let Err(e) = crate::regions::confirm(&state, device.account, device.device, device.region).await {
            blobs.delete(record.id).await?;
            return Err(e);
        }
        if let Err(e) = state.storage.complete_blob(record.id).await {
            // Deleted meanwhile (expired): drop the bytes too, or nothing ever would.
            if matches!(e, crate::storage::StorageError::UnknownBlob) {
                let _ = blobs.delete(record.id).await;
            }
            return Err(e.into());
        }
    }
    Ok(Json(BlobUploadStatus {
        size: record.size,
        received,
        complete,
    }))
}

/// The blob, if the caller may download (or acknowledge) it: a recipient, upload complete.
async fn receivable_blob(state: &AppState, device: &AuthDevice, blob: &str) -> Result<BlobRecord, ApiError> {
    let record = blob_record(state, blob).await?;
    if record.channel.is_none() && !record.pending.contains(&device.device) {
        return Err(crate::storage::StorageError::NotBlobRecipient.into());
    }
    if !record.complete {
        return Err(ApiError::new(
            ErrorCode::UploadIncomplete,
            "the sender has not finished uploading this attachment yet",
        ));
    }
    Ok(record)
}

pub(crate) async fn download(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(blob): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = receivable_blob(&state, &device, &blob).await?;
    let offset = match headers.get(header::RANGE) {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.strip_suffix('-'))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| ApiError::bad_request("only ranges of the form 'bytes=N-' are supported"))?,
    };
    if offset >= record.size {
        return Err(ApiError::new(
            ErrorCode::RangeNotSatisfiable,
            format!("the blob has {} bytes", record.size),
        ));
    }
    let region = crate::regions::readable(&state, record.owner_account).await?;
    let (stored_size, stream) = region.blobs.read(record.id, offset).await?;
    if stored_size != record.size {
        tracing::warn!(blob = %record.id, stored_size, announced = record.size, "a stored blob has the wrong size");
    }
    let counting = state.clone();
    let body = Body::from_stream(stream.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            Metrics::add(&counting.metrics.blob_bytes_sent, bytes.len() as u64);
        }
    }));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(stored_size.saturating_sub(offset)),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if offset > 0 {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let range = format!("bytes {offset}-{}/{stored_size}", stored_size.saturating_sub(1));
        response
            .headers_mut()
            .insert(header::CONTENT_RANGE, HeaderValue::from_str(&range).expect("ascii"));
    }
    Ok(response)
}

pub(crate) async fn acknowledge(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(blob): Path<String>,
) -> Result<StatusCode, ApiError> {
    // A recipient of a complete blob only: acknowledging (and so deleting) a blob still being
    // written would race the upload.
    let record = receivable_blob(&state, &device, &blob).await?;
    // A channel's file stays for later subscribers: acknowledging it changes nothing.
    if record.channel.is_none() && state.storage.blob_fetched(record.id, device.device).await? {
        crate::delete_blob(&state, record.id)
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(StatusCode::NO_CONTENT)
}
