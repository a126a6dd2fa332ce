//! One error type for every HTTP answer: a status, a stable code and a human message. Internal
//! details are logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fumi_proto::{ErrorBody, ErrorDetail};

use crate::storage::StorageError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    current_epoch: Option<u64>,
    upload_offset: Option<u64>,
    latest_seq: Option<u64>,
}

impl ApiError {
    /// An error with a status, a stable code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            current_epoch: None,
            upload_offset: None,
            latest_seq: None,
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401 `unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 404 `not_found`.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 413 `too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// 500 `internal`: the cause is logged here and hidden from the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error")
    }

    /// 403 `forbidden`.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::UsernameTaken => Self::new(
                StatusCode::CONFLICT,
                "username_taken",
                "this username is taken; pick another number",
            ),
            StorageError::EpochConflict { current } => Self {
                current_epoch: Some(current),
                ..Self::new(
                    StatusCode::CONFLICT,
                    "epoch_conflict",
                    "another commit was accepted for this epoch first; process it and retry",
                )
            },
            StorageError::MessageIdReused => Self::new(
                StatusCode::CONFLICT,
                "message_id_reused",
                "this message id was already used for a different message",
            ),
            StorageError::NotMember => Self::new(
                StatusCode::FORBIDDEN,
                "not_a_member",
                "this device is not a member of the group (never added, or removed)",
            ),
            StorageError::UnknownGroup => {
                Self::not_found("unknown_group", "no commit was ever accepted for this group")
            }
            StorageError::UnknownDevice => Self::not_found("unknown_device", "a recipient device does not exist"),
            StorageError::UnknownAccount => Self::not_found("unknown_account", "no such account"),
            StorageError::NoKeyPackage => Self::not_found(
                "no_key_package",
                "a device of this account has no key package available",
            ),
            StorageError::UnknownLink => Self::not_found(
                "unknown_link",
                "no open link has this token (it expired, was used, or never existed)",
            ),
            StorageError::DeviceIdTaken => Self::new(
                StatusCode::CONFLICT,
                "device_id_taken",
                "this device id is taken; pick another",
            ),
            StorageError::NotOwnDevice => Self::not_found(
                "unknown_device",
                "no active device with this id belongs to your account",
            ),
            StorageError::UnknownInvite => Self::not_found(
                "unknown_invite",
                "no invite has this token (it expired or never existed)",
            ),
            StorageError::InviteUsed => Self::new(StatusCode::GONE, "invite_used", "this invite was already used"),
            StorageError::QuotaExceeded { quota } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "quota_exceeded",
                format!(
                    "your undelivered attachments would exceed the quota of {quota} bytes; wait until they are fetched"
                ),
            ),
            StorageError::UnknownBlob => Self::not_found(
                "unknown_blob",
                "no such blob (expired, or deleted after every recipient fetched it)",
            ),
            StorageError::NotBlobRecipient => Self::new(
                StatusCode::FORBIDDEN,
                "not_a_recipient",
                "this device is not a recipient of this blob",
            ),
            StorageError::MailboxFull { limit } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "mailbox_full",
                format!(
                    "a recipient device has {limit} undelivered messages waiting; nothing more can be queued for it until it comes online"
                ),
            ),
            StorageError::AuditConflict => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_busy",
                "the audit log is busy; nothing was done, retry",
            ),
            StorageError::UnknownChannel => Self::not_found("unknown_channel", "no such channel"),
            StorageError::NotChannelOwner => Self::forbidden(
                "not_channel_owner",
                "only the account that created the channel can change it or post to it",
            ),
            StorageError::ChannelExists => Self::new(
                StatusCode::CONFLICT,
                "channel_exists",
                "a channel with this id exists; choose another random id",
            ),
            StorageError::ChannelSeqConflict { latest } => Self {
                latest_seq: Some(latest),
                ..Self::new(
                    StatusCode::CONFLICT,
                    "channel_seq_conflict",
                    format!(
                        "the channel's newest post is number {latest}; the next post must be number {}",
                        latest + 1
                    ),
                )
            },
            StorageError::TooMany { what, limit } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "limit_reached",
                format!("an account can have at most {limit} {what}"),
            ),
            StorageError::Database(cause) => Self::internal(cause),
        }
    }
}

impl From<crate::blobs::BlobError> for ApiError {
    fn from(error: crate::blobs::BlobError) -> Self {
        use crate::blobs::BlobError;
        match error {
            BlobError::OffsetMismatch { held } => Self {
                upload_offset: Some(held),
                ..Self::new(
                    StatusCode::CONFLICT,
                    "upload_offset_mismatch",
                    format!("the server holds {held} bytes of this upload; continue from there"),
                )
            },
            BlobError::Oversized => Self::too_large("the upload carries more bytes than the announced size"),
            BlobError::Missing => Self::not_found(
                "unknown_blob",
                "no such blob (expired, or deleted after every recipient fetched it)",
            ),
            BlobError::Store(cause) => Self::internal(cause),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                current_epoch: self.current_epoch,
                upload_offset: self.upload_offset,
                latest_seq: self.latest_seq,
            },
        };
        (self.status, Json(body)).into_response()
    }
}
