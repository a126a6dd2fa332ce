#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod bytes;
mod ids;

pub use bytes::Base64Bytes;
pub use ids::{AccountId, DeviceId, GroupId, IdError, MessageId};

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
