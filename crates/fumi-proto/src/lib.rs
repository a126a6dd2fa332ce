#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod bytes;
pub mod endpoints;
mod errors;
mod ids;

pub use bytes::Base64Bytes;
pub use errors::{ErrorCode, error_table};
pub use ids::{AccountId, BlobId, ChannelId, DeviceId, GroupId, IdError, MessageId};

use serde::{Deserialize, Serialize};

/// Version of the client–server protocol described in `docs/PROTOCOL.md`; every path starts
/// with `/v1`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The HTTP header that carries a device credential: `Authorization: Fumi <device-id>:<secret>`.
pub const AUTH_SCHEME: &str = "Fumi";

/// Length in bytes of a device's authentication secret.
pub const DEVICE_SECRET_LEN: usize = 32;

/// `POST /v1/accounts`: create an account with its first device.
///
/// The server learns no identifier of the person: only a public identity key and the SHA-256 of a
/// random device secret, so a copy of its database cannot be used to log in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Ed25519 public identity key of the account (32 bytes).
    pub identity_key: Base64Bytes,
    /// SHA-256 of the first device's secret (32 bytes).
    pub device_secret_hash: Base64Bytes,
    /// The region the account's mailboxes, KeyPackages, profile and files are kept in (one of
    /// the server's; absent: the server's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Answer to [`RegisterRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The new account's random id.
    pub account_id: AccountId,
    /// The first device's random id.
    pub device_id: DeviceId,
}

/// `PUT /v1/username`: claim the hash of a full username (`alice.42`) for the caller's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsernameClaim {
    /// Argon2id hash of the normalised username (32 bytes); see `fumi_core::username`.
    pub username_hash: Base64Bytes,
}

/// Answer to `GET /v1/usernames/{hash}` (hash in lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsernameLookup {
    /// The account that holds the username.
    pub account_id: AccountId,
}

/// `PUT /v1/profile` body and `GET /v1/accounts/{id}/profile` answer: the profile sealed under
/// the account's profile key. The server cannot open it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedProfile {
    /// AEAD ciphertext (nonce included).
    pub sealed: Base64Bytes,
}

/// Answer to `GET /v1/accounts/{id}`: the public keys the server holds for an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    /// The account id.
    pub account_id: AccountId,
    /// Ed25519 identity key registered with the account.
    pub identity_key: Base64Bytes,
    /// Ids of the account's devices.
    pub devices: Vec<DeviceId>,
}

/// `POST /v1/keypackages`: publish MLS KeyPackages for the calling device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPackageUpload {
    /// TLS-serialised MLS KeyPackages, each handed out once.
    pub key_packages: Vec<Base64Bytes>,
    /// A KeyPackage handed out when the stock is empty; replaces the previous one.
    #[serde(default)]
    pub last_resort: Option<Base64Bytes>,
}

/// Answer to [`KeyPackageUpload`] and to `GET /v1/keypackages/count`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPackageCount {
    /// One-time KeyPackages the calling device has in stock.
    pub count: u64,
}

/// `POST /v1/keypackages/claim`: take one KeyPackage for every device of each account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPackageClaim {
    /// Accounts whose devices are wanted.
    pub accounts: Vec<AccountId>,
    /// If not empty, only these devices (of the accounts above) are claimed: used to add a newly
    /// linked device to existing conversations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceId>,
}

/// One claimed KeyPackage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedKeyPackage {
    /// Account the device belongs to, according to the server (the client checks the credential).
    pub account_id: AccountId,
    /// The device.
    pub device_id: DeviceId,
    /// TLS-serialised MLS KeyPackage.
    pub key_package: Base64Bytes,
}

/// Answer to [`KeyPackageClaim`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedKeyPackages {
    /// One entry per device of every requested account.
    pub key_packages: Vec<ClaimedKeyPackage>,
}

/// `POST /v1/messages`: hand an MLS message to the delivery service.
///
/// `message` is one TLS-serialised `MLSMessage` (a PrivateMessage or PublicMessage). The server
/// reads only its framing (group id, epoch, content type) to order commits. If it carries a
/// commit that adds members, the matching Welcome travels in `welcome` so both are accepted or
/// refused together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitMessage {
    /// Client-chosen id; a retry with the same id and body is accepted once.
    pub id: MessageId,
    /// The MLS message.
    pub message: Base64Bytes,
    /// Devices whose mailboxes receive `message`.
    pub recipients: Vec<DeviceId>,
    /// Welcome for new members, if `message` is a commit that adds some.
    #[serde(default)]
    pub welcome: Option<WelcomeDelivery>,
    /// For a commit that removes members: their devices. They still receive the commit (to learn
    /// of their removal) but may submit nothing more to the group.
    #[serde(default)]
    pub removed: Vec<DeviceId>,
}

/// A Welcome message and the devices it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WelcomeDelivery {
    /// TLS-serialised `MLSMessage` carrying a Welcome.
    pub message: Base64Bytes,
    /// New members' devices.
    pub recipients: Vec<DeviceId>,
}

/// Answer to [`SubmitMessage`]: the message is on disk in every recipient's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitAccepted {
    /// Server time of acceptance, milliseconds since the Unix epoch.
    pub accepted_at: u64,
    /// True when this id had already been accepted with the same body (nothing was stored again).
    pub duplicate: bool,
}

/// `PUT /v1/profile/avatar` body and `GET /v1/accounts/{id}/avatar` answer: the avatar image
/// sealed under the account's profile key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedAvatar {
    /// AEAD ciphertext (nonce included).
    pub sealed: Base64Bytes,
}

/// `POST /v1/links`: open a one-time slot through which a new device joins the caller's
/// account. The server keeps the token's hash and a bundle sealed under a key it never sees
/// (both travel to the new device in the link code, out of band).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkCreate {
    /// SHA-256 of the link token (32 bytes).
    pub token_hash: Base64Bytes,
    /// The account bundle for the new device, sealed under the link key.
    pub sealed: Base64Bytes,
}

/// `POST /v1/links/open` (no credentials): the new device presents the link token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkOpen {
    /// The link token (32 bytes).
    pub token: Base64Bytes,
}

/// Answer to [`LinkOpen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkBundle {
    /// The account that opened the link.
    pub account_id: AccountId,
    /// The sealed bundle from [`LinkCreate`].
    pub sealed: Base64Bytes,
}

/// `POST /v1/devices` (no credentials): a new device joins an account through a link slot,
/// proving that it holds the account's identity key. One request creates the device and stores
/// its first KeyPackages, so the linking device can add it to conversations at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkDevice {
    /// The link token (32 bytes); the slot is consumed.
    pub token: Base64Bytes,
    /// The new device's id, chosen by the device (random).
    pub device_id: DeviceId,
    /// SHA-256 of the new device's secret (32 bytes).
    pub device_secret_hash: Base64Bytes,
    /// Ed25519 signature by the account identity key over [`device_link_message`].
    pub signature: Base64Bytes,
    /// One-time KeyPackages of the new device.
    pub key_packages: Vec<Base64Bytes>,
    /// Its last-resort KeyPackage.
    pub last_resort: Option<Base64Bytes>,
    /// HMAC-SHA256 under the link key of `"fumi link proof v1" ‖ device id ‖ MLS signature key`
    /// (see `fumi_core::identity::link_proof`): shows the linking device that this device, with
    /// this key, holds the link code. The server keeps it for `GET /v1/links/{hash}`.
    #[serde(default)]
    pub link_proof: Option<Base64Bytes>,
}

/// The bytes an account identity key signs to add a device: a domain label, the account, the
/// device, the link token's hash and the device secret's hash.
pub fn device_link_message(
    account: AccountId,
    device: DeviceId,
    token_hash: &[u8; 32],
    secret_hash: &[u8; 32],
) -> Vec<u8> {
    [
        b"fumi link device v1".as_slice(),
        account.as_bytes(),
        device.as_bytes(),
        token_hash,
        secret_hash,
    ]
    .concat()
}

/// Headers of a signed admin API request.
pub mod admin_headers {
    /// The operator's configured name.
    pub const OPERATOR: &str = "fumi-operator";
    /// The stated reason (a ticket id), printable ASCII, at most 200 bytes; public in the log.
    pub const REASON: &str = "fumi-reason";
    /// Milliseconds since the Unix epoch; within five minutes of the server's clock.
    pub const TIMESTAMP: &str = "fumi-timestamp";
    /// 32 hex digits, never reused.
    pub const NONCE: &str = "fumi-nonce";
    /// Ed25519 signature (128 hex digits) over [`super::admin_request_message`].
    pub const SIGNATURE: &str = "fumi-signature";
}

/// The bytes an operator key signs for one admin request: a domain label and the request's
/// method, path with query, timestamp, nonce, operator, reason and SHA-256 of the body, one per
/// line.
pub fn admin_request_message(
    method: &str,
    path_and_query: &str,
    timestamp: u64,
    nonce: &str,
    operator: &str,
    reason: &str,
    body_sha256: &[u8; 32],
) -> Vec<u8> {
    format!(
        "fumi admin request v1\n{method}\n{path_and_query}\n{timestamp}\n{nonce}\n{operator}\n{reason}\n{}",
        hex::encode(body_sha256)
    )
    .into_bytes()
}

/// Answer to `GET /v1/links/{token-hash}`: whether a device has used the link yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The device that joined through the link, once one has.
    pub device_id: Option<DeviceId>,
    /// Its MLS signature key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_key: Option<Base64Bytes>,
    /// The link proof it sent ([`LinkDevice::link_proof`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_proof: Option<Base64Bytes>,
}

/// `PUT /v1/links/{token-hash}/history` body, and the answer to `POST /v1/links/history`: a
/// pointer to the message-history archive for the device that used the link, sealed under the
/// link key (the server cannot open it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkHistory {
    /// The sealed pointer; `None` until the old device has uploaded the archive.
    pub sealed: Option<Base64Bytes>,
}

/// `POST /v1/invites`: register a one-time invite token for the caller's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteCreate {
    /// SHA-256 of the invite token (32 bytes).
    pub token_hash: Base64Bytes,
}

/// `POST /v1/invites/redeem`: use an invite once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteRedeem {
    /// The inviting account.
    pub account_id: AccountId,
    /// The invite token (32 bytes).
    pub token: Base64Bytes,
}

/// `POST /v1/blobs`: start uploading an encrypted attachment of `size` bytes that the listed
/// devices may download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobCreate {
    /// Exact size of the blob in bytes.
    pub size: u64,
    /// Devices allowed to download it; once each has acknowledged it, it is deleted. Empty for
    /// a channel's file.
    #[serde(default)]
    pub recipients: Vec<DeviceId>,
    /// For a file posted in a channel the caller owns: any device may download it (the key is
    /// in the post), and it stays until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelId>,
}

/// Answer to [`BlobCreate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobCreated {
    /// The new blob's id.
    pub blob_id: BlobId,
}

/// Answer to `PATCH /v1/blobs/{id}` and `GET /v1/blobs/{id}/upload`: how far an upload is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobUploadStatus {
    /// Announced size.
    pub size: u64,
    /// Bytes the server holds; the next `PATCH` starts here.
    pub received: u64,
    /// True once all bytes arrived and the blob can be downloaded.
    pub complete: bool,
}

/// The header that states where a `PATCH /v1/blobs/{id}` body starts in the blob.
pub const UPLOAD_OFFSET_HEADER: &str = "fumi-upload-offset";

/// Frames the server sends on the delivery WebSocket (`GET /v1/ws`), as JSON text frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// One queued message, in mailbox order.
    Envelope {
        /// Mailbox sequence number; acknowledge it to delete the envelope.
        seq: u64,
        /// The MLS message (or Welcome) as submitted.
        message: Base64Bytes,
        /// Server time the message was accepted, ms since the Unix epoch.
        received_at: u64,
    },
    /// Everything queued when the connection opened has been sent.
    Drained,
    /// A new post in a channel the account subscribes to, pushed as it is stored. Best effort:
    /// a client that sees a gap in `seq` (or was offline) fetches `GET /v1/channels/{id}/posts`.
    ChannelPost {
        /// The channel.
        channel: ChannelId,
        /// The post's number in its channel (1, 2, 3, ...).
        seq: u64,
        /// The post, sealed under the channel key (opaque to the server).
        sealed_post: Base64Bytes,
        /// Server time the post was stored, ms since the Unix epoch.
        posted_at: u64,
    },
}

/// Frames a client sends on the delivery WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// The device has stored these envelopes; the server deletes them.
    Ack {
        /// Sequence numbers from [`ServerFrame::Envelope`].
        seqs: Vec<u64>,
    },
}

/// Answer of `GET /v1/audit/key`: the account's audit key, with which its holder recognises the
/// transparency log entries that name the account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditKey {
    /// 32 bytes.
    pub audit_key: Base64Bytes,
}

/// Answer of `GET /v1/moderation/key`: the HPKE public key abuse reports are sealed to, or none
/// if the server takes no reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModerationKey {
    /// X25519 public key (32 bytes).
    pub public_key: Base64Bytes,
}

/// Largest sealed abuse report the server stores.
pub const MAX_SEALED_REPORT_BYTES: usize = 256 * 1024;

/// Body of `POST /v1/reports`: an abuse report sealed to the moderation key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSubmit {
    /// HPKE encapsulated key ‖ ciphertext of the report JSON (see `fumi_core::franking`).
    pub sealed: Base64Bytes,
}

/// Answer of `POST /v1/reports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportFiled {
    /// The report's number.
    pub id: u64,
}

/// Largest sealed channel description (name, organisation profile and logo, verification).
pub const MAX_SEALED_CHANNEL_INFO_BYTES: usize = 256 * 1024;
/// Largest sealed channel post (text up to 64 KiB, a file pointer or a form definition).
pub const MAX_SEALED_CHANNEL_POST_BYTES: usize = 256 * 1024;

/// Body of `POST /v1/channels`: create a broadcast channel owned by the caller's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelCreate {
    /// Chosen at random by the creator.
    pub channel_id: ChannelId,
    /// The channel's description sealed under the channel key.
    pub sealed_info: Base64Bytes,
}

/// Body of `PUT /v1/channels/{id}`: replace the sealed description (owner only), e.g. after a
/// key rotation or a new verification statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelInfoUpdate {
    /// The new sealed description.
    pub sealed_info: Base64Bytes,
}

/// Answer of `GET /v1/channels/{id}` (public: anyone who knows the id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelState {
    /// The channel.
    pub channel_id: ChannelId,
    /// The sealed description.
    pub sealed_info: Base64Bytes,
    /// How many accounts subscribe (a count: no list exists anywhere in the API).
    pub subscribers: u64,
    /// The newest post's number; 0 before the first post.
    pub latest_seq: u64,
}

/// Body of `POST /v1/channels/{id}/posts` (owner only). `seq` must be `latest_seq + 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelPostSubmit {
    /// The post's number, also signed inside the sealed post.
    pub seq: u64,
    /// The signed post sealed under the channel key.
    pub sealed_post: Base64Bytes,
}

/// One stored post, as `GET /v1/channels/{id}/posts` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelPostRecord {
    /// The post's number.
    pub seq: u64,
    /// The signed post sealed under the channel key.
    pub sealed_post: Base64Bytes,
    /// Server time the post was stored, ms since the Unix epoch.
    pub posted_at: u64,
}

/// Answer of `GET /v1/channels/{id}/posts?after=N&limit=M`: posts with `seq > after`, oldest
/// first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelPosts {
    /// At most `limit` posts.
    pub posts: Vec<ChannelPostRecord>,
}

/// Body of every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A stable machine-readable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code, listed in `docs/PROTOCOL.md`.
    pub code: String,
    /// Human-readable explanation; never contains user data.
    pub message: String,
    /// For `epoch_conflict`: the epoch the server expects the next commit for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_epoch: Option<u64>,
    /// For `upload_offset_mismatch`: how many bytes of the upload the server holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_offset: Option<u64>,
    /// For `channel_seq_conflict`: the channel's newest post number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn submit_message_round_trips(id in any::<[u8; 16]>(), body in proptest::collection::vec(any::<u8>(), 0..512),
                                      recipients in proptest::collection::vec(any::<[u8; 16]>(), 0..8)) {
            let message = SubmitMessage {
                id: MessageId::from_bytes(id),
                message: Base64Bytes(body.clone()),
                recipients: recipients.iter().copied().map(DeviceId::from_bytes).collect(),
                welcome: Some(WelcomeDelivery { message: Base64Bytes(body), recipients: vec![] }),
                removed: vec![],
            };
            let json = serde_json::to_string(&message).unwrap();
            prop_assert_eq!(serde_json::from_str::<SubmitMessage>(&json).unwrap(), message);
        }

        #[test]
        fn server_frame_round_trips(seq in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..512), at in any::<u64>()) {
            let frame = ServerFrame::Envelope { seq, message: Base64Bytes(body), received_at: at };
            let json = serde_json::to_string(&frame).unwrap();
            prop_assert_eq!(serde_json::from_str::<ServerFrame>(&json).unwrap(), frame);
        }
    }

    #[test]
    fn frames_have_documented_shape() {
        let ack: ClientFrame = serde_json::from_str(r#"{"type":"ack","seqs":[1,2]}"#).unwrap();
        assert_eq!(ack, ClientFrame::Ack { seqs: vec![1, 2] });
        assert_eq!(
            serde_json::to_string(&ServerFrame::Drained).unwrap(),
            r#"{"type":"drained"}"#
        );
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"ack","seqs":[1],"x":1}"#).is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<UsernameClaim>(r#"{"username_hash":"AA","username":"alice.42"}"#);
        assert!(err.is_err());
    }
}
