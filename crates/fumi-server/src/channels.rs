//! Broadcast channels of organisation accounts. The server stores each channel's description and
//! posts sealed under a channel key it never sees, numbers posts so that subscribers notice a
//! gap, and pushes each post once to the online subscribers. Posts are signed by the
//! organisation inside the seal: the server can withhold a post, never forge or alter one.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use fumi_proto::*;

use crate::error::ApiError;
use crate::routes::{ApiJson, parse_path_id};
use crate::storage::{ChannelLimits, Ciphertext, StoredChannelPost};
use crate::{AppState, auth::AuthDevice, now_ms};

/// Per-account channel limits.
const LIMITS: ChannelLimits = ChannelLimits {
    owned: 100,
    subscriptions: 10_000,
};
/// Most posts in one page of `GET /v1/channels/{id}/posts`.
const MAX_POSTS_PER_PAGE: u32 = 200;
/// Smallest sealed value: a 24-byte nonce and a 16-byte tag.
const MIN_SEALED_BYTES: usize = 24 + 16;

fn check_sealed(bytes: &Base64Bytes, max: usize, what: &str) -> Result<(), ApiError> {
    let length = bytes.as_slice().len();
    if length > max {
        return Err(ApiError::too_large(format!("a sealed {what} is at most {max} bytes")));
    }
    if length < MIN_SEALED_BYTES {
        return Err(ApiError::bad_request(format!(
            "a sealed {what} is a nonce and an AEAD ciphertext"
        )));
    }
    Ok(())
}

/// `POST /v1/channels`.
pub(crate) async fn create(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<ChannelCreate>,
) -> Result<StatusCode, ApiError> {
    check_sealed(
        &request.sealed_info,
        MAX_SEALED_CHANNEL_INFO_BYTES,
        "channel description",
    )?;
    state
        .storage
        .create_channel(
            request.channel_id,
            device.account,
            Ciphertext(request.sealed_info.into_vec()),
            now_ms(),
            LIMITS,
        )
        .await?;
    Ok(StatusCode::CREATED)
}

/// `PUT /v1/channels/{channel}`.
pub(crate) async fn update(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
    ApiJson(request): ApiJson<ChannelInfoUpdate>,
) -> Result<StatusCode, ApiError> {
    let channel: ChannelId = parse_path_id(&channel, "channel id")?;
    check_sealed(
        &request.sealed_info,
        MAX_SEALED_CHANNEL_INFO_BYTES,
        "channel description",
    )?;
    state
        .storage
        .update_channel_info(channel, device.account, Ciphertext(request.sealed_info.into_vec()))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/channels/{channel}`: the sealed description and the subscriber count.
pub(crate) async fn get(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
) -> Result<Json<ChannelState>, ApiError> {
    let channel_id: ChannelId = parse_path_id(&channel, "channel id")?;
    let record = state
        .storage
        .channel(channel_id)
        .await?
        .ok_or(crate::storage::StorageError::UnknownChannel)?;
    Ok(Json(ChannelState {
        channel_id,
        sealed_info: Base64Bytes(record.sealed_info.0),
        subscribers: record.subscribers,
        latest_seq: record.latest_seq,
    }))
}

/// `POST /v1/channels/{channel}/posts`: stores the next post and pushes it to online
/// subscribers. An identical retry answers 200 and pushes nothing; a new post 201.
pub(crate) async fn post(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
    ApiJson(request): ApiJson<ChannelPostSubmit>,
) -> Result<StatusCode, ApiError> {
    let channel: ChannelId = parse_path_id(&channel, "channel id")?;
    check_sealed(&request.sealed_post, MAX_SEALED_CHANNEL_POST_BYTES, "channel post")?;
    if request.seq == 0 {
        return Err(ApiError::bad_request("post numbers start at 1"));
    }
    let post = StoredChannelPost {
        seq: request.seq,
        sealed_post: Ciphertext(request.sealed_post.into_vec()),
        posted_at: now_ms(),
    };
    if !state.storage.add_channel_post(channel, device.account, &post).await? {
        return Ok(StatusCode::OK);
    }
    // Encoded once; every subscriber's connection sends the same bytes.
    let frame = ServerFrame::ChannelPost {
        channel,
        seq: post.seq,
        sealed_post: Base64Bytes(post.sealed_post.0),
        posted_at: post.posted_at,
    };
    let text = serde_json::to_string(&frame).map_err(ApiError::internal)?;
    state.fanout.publish_channel_post((channel, text.into()));
    Ok(StatusCode::CREATED)
}

/// Query of `GET /v1/channels/{channel}/posts`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PostsQuery {
    #[serde(default)]
    after: u64,
    limit: Option<u32>,
}

/// `GET /v1/channels/{channel}/posts?after=N&limit=M`.
pub(crate) async fn posts(
    _device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
    query: Result<Query<PostsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ChannelPosts>, ApiError> {
    let channel: ChannelId = parse_path_id(&channel, "channel id")?;
    let Query(PostsQuery { after, limit }) =
        query.map_err(|e| ApiError::bad_request(format!("after and limit: {e}")))?;
    let limit = limit.unwrap_or(MAX_POSTS_PER_PAGE);
    if limit == 0 || limit > MAX_POSTS_PER_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit is between 1 and {MAX_POSTS_PER_PAGE}"
        )));
    }
    let posts = state.storage.channel_posts(channel, after, limit).await?;
    Ok(Json(ChannelPosts {
        posts: posts
            .into_iter()
            .map(|post| ChannelPostRecord {
                seq: post.seq,
                sealed_post: Base64Bytes(post.sealed_post.0),
                posted_at: post.posted_at,
            })
            .collect(),
    }))
}

/// `PUT /v1/channels/{channel}/subscription`: pushes of new posts reach this account's devices,
/// and the channel's count grows by one. Idempotent.
pub(crate) async fn subscribe(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_subscription(device, &state, &channel, true).await
}

/// `DELETE /v1/channels/{channel}/subscription`. Idempotent.
pub(crate) async fn unsubscribe(
    device: AuthDevice,
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_subscription(device, &state, &channel, false).await
}

async fn set_subscription(
    device: AuthDevice,
    state: &AppState,
    channel: &str,
    subscribed: bool,
) -> Result<StatusCode, ApiError> {
    let channel: ChannelId = parse_path_id(channel, "channel id")?;
    state
        .storage
        .set_subscription(channel, device.account, subscribed, now_ms(), LIMITS)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
