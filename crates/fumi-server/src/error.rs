//! One error type for every HTTP answer: a status, a stable code and a human message. Internal
//! details are logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fumi_proto::{ErrorBody, ErrorCode, ErrorDetail};

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
    /// An error with a stable code (which gives its status) and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(code.status()).expect("every error code has a valid status");
        Self::with_status(status, code.as_str(), message)
    }

    /// A refusal of the admin API's request signing (§9), whose codes are its own.
    pub fn admin_refusal(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::with_status(status, code, message)
    }

    fn with_status(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
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
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 401 `unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }

    /// 413 `too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }

    /// 500 `internal`: the cause is logged here and hidden from the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(ErrorCode::Internal, "internal server error")
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::UsernameTaken => {
                Self::new(ErrorCode::UsernameTaken, "this username is taken; pick another number")
            }
            StorageError::EpochConflict { current } => Self {
                current_epoch: Some(current),
                ..Self::new(
                    ErrorCode::EpochConflict,
                    "another commit was accepted for this epoch first; process it and retry",
                )
            },
            StorageError::MessageIdReused => Self::new(
                ErrorCode::MessageIdReused,
                "this message id was already used for a different message",
            ),
            StorageError::NotMember => Self::new(
                ErrorCode::NotAMember,
                "this device is not a member of the group (never added, or removed)",
            ),
            StorageError::UnknownGroup => {
                Self::new(ErrorCode::UnknownGroup, "no commit was ever accepted for this group")
            }
            StorageError::UnknownDevice => Self::new(ErrorCode::UnknownDevice, "a recipient device does not exist"),
            StorageError::UnknownAccount => Self::new(ErrorCode::UnknownAccount, "no such account"),
            StorageError::NoKeyPackage => Self::new(
                ErrorCode::NoKeyPackage,
                "a device of this account has no key package available",
            ),
            StorageError::UnknownLink => Self::new(
                ErrorCode::UnknownLink,
                "no open link has this token (it expired, was used, or never existed)",
            ),
            StorageError::DeviceIdTaken => Self::new(ErrorCode::DeviceIdTaken, "this device id is taken; pick another"),
            StorageError::NotOwnDevice => Self::new(
                ErrorCode::UnknownDevice,
                "no active device with this id belongs to your account",
            ),
            StorageError::UnknownInvite => Self::new(
                ErrorCode::UnknownInvite,
                "no invite has this token (it expired or never existed)",
            ),
            StorageError::InviteUsed => Self::new(ErrorCode::InviteUsed, "this invite was already used"),
            StorageError::QuotaExceeded { quota } => Self::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "your undelivered attachments would exceed the quota of {quota} bytes; wait until they are fetched"
                ),
            ),
            StorageError::UnknownBlob => Self::new(
                ErrorCode::UnknownBlob,
                "no such blob (expired, or deleted after every recipient fetched it)",
            ),
            StorageError::NotBlobRecipient => {
                Self::new(ErrorCode::NotARecipient, "this device is not a recipient of this blob")
            }
            StorageError::MailboxFull { limit } => Self::new(
                ErrorCode::MailboxFull,
                format!(
                    "a recipient device has {limit} undelivered messages waiting; nothing more can be queued for it until it comes online"
                ),
            ),
            StorageError::AuditConflict => {
                Self::new(ErrorCode::AuditBusy, "the audit log is busy; nothing was done, retry")
            }
            StorageError::UnknownChannel => Self::new(ErrorCode::UnknownChannel, "no such channel"),
            StorageError::NotChannelOwner => Self::new(
                ErrorCode::NotChannelOwner,
                "only the account that created the channel can change it or post to it",
            ),
            StorageError::ChannelExists => Self::new(
                ErrorCode::ChannelExists,
                "a channel with this id exists; choose another random id",
            ),
            StorageError::ChannelSeqConflict { latest } => Self {
                latest_seq: Some(latest),
                ..Self::new(
                    ErrorCode::ChannelSeqConflict,
                    format!(
                        "the channel's newest post is number {latest}; the next post must be number {}",
                        latest + 1
                    ),
                )
            },
            StorageError::TooMany { what, limit } => Self::new(
                ErrorCode::LimitReached,
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
                    ErrorCode::UploadOffsetMismatch,
                    format!("the server holds {held} bytes of this upload; continue from there"),
                )
            },
            BlobError::Oversized => Self::too_large("the upload carries more bytes than the announced size"),
            BlobError::Missing => Self::new(
                ErrorCode::UnknownBlob,
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
