//! The plaintext inside every MLS application message: a versioned JSON document, Padmé-padded
//! before encryption so that ciphertext sizes fall into buckets.

use fumi_proto::MessageId;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::padding;

/// Current content format version.
pub const CONTENT_VERSION: u32 = 1;

/// Maximum text length in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Why content could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ContentError {
    /// Padding or JSON is malformed.
    #[error("message content is malformed")]
    Malformed,
    /// Written by a newer client.
    #[error("message content version {0} is newer than this client understands")]
    UnsupportedVersion(u32),
    /// Text longer than [`MAX_TEXT_BYTES`].
    #[error("a message is at most {MAX_TEXT_BYTES} bytes of text")]
    TooLong,
}

/// One application message's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    /// Format version.
    pub v: u32,
    /// Message id chosen by the sender (also used as the delivery id).
    pub id: MessageId,
    /// Sender's clock, ms since the Unix epoch.
    pub sent_at: u64,
    /// The sender's profile key, so receivers can open the sender's sealed profile.
    #[serde(with = "key_hex")]
    pub profile_key: [u8; 32],
    /// What the message says.
    pub body: Body,
    /// The conversation's disappearing-message timer when this was sent (ms): every device
    /// deletes the message that long after it arrived. Absent: kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after_ms: Option<u64>,
    /// The franking proof of a text or file message, which lets a recipient report it
    /// ([`crate::franking`]). Receivers drop a text or file message without a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub franking: Option<crate::franking::Franking>,
}

/// Kinds of content. New kinds (attachments, reactions, receipts) are added as variants;
/// a client that meets an unknown kind shows a placeholder rather than failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// A text message.
    Text {
        /// The text.
        text: String,
    },
    /// Conversation settings, sent by a member after creating or changing the group.
    Conversation {
        /// Group name; `None` for a 1:1 conversation.
        name: Option<String>,
        /// Profile keys of members the sender knows, so that everyone can show everyone's name.
        #[serde(default)]
        profiles: Vec<MemberProfileKey>,
    },
    /// A file: the blob's location and key; the bytes are fetched from the blob store.
    File {
        /// Where and how the file is sealed.
        attachment: Attachment,
        /// Optional text shown with it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caption: Option<String>,
    },
    /// Sets (or, with `None`, turns off) the conversation's disappearing-message timer.
    Timer {
        /// Lifetime of each later message, ms after it reaches a device.
        expire_after_ms: Option<u64>,
    },
    /// Sent by a new member after joining, so the others learn its profile key (carried, as in
    /// every content, in [`Content::profile_key`]).
    Introduction,
    /// Answers to a form an organisation published in a channel, sent into the submitter's
    /// 1:1 conversation with the organisation (so only its staff devices can read them). The
    /// content's id is the submission's id.
    FormSubmission {
        /// The channel the form was published in.
        channel: fumi_proto::ChannelId,
        /// The form's id.
        form_id: String,
        /// Answers by field name.
        answers: crate::form::Answers,
    },
    /// Sent back by a staff device that stored a submission.
    FormReceipt {
        /// The submission's id.
        submission: MessageId,
    },
    /// A kind this client does not know.
    #[serde(other)]
    Unknown,
}

/// A pointer to an encrypted file in the blob store and what opens it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The blob on the server.
    pub blob: fumi_proto::BlobId,
    /// The file's own key.
    #[serde(with = "key_hex")]
    pub key: [u8; 32],
    /// SHA-256 of the whole blob.
    #[serde(with = "key_hex")]
    pub digest: [u8; 32],
    /// Bytes of the original file.
    pub size: u64,
    /// File name as the sender had it (a base name; receivers sanitise it again).
    pub name: String,
    /// Media type, e.g. `image/png`.
    pub media_type: String,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("blob", &self.blob)
            .field("size", &self.size)
            .field("media_type", &self.media_type)
            .finish_non_exhaustive()
    }
}

/// Longest file name carried in an attachment, in bytes.
pub const MAX_FILE_NAME_BYTES: usize = 255;
/// Largest file an attachment may announce (1 TiB): keeps every size computation in range.
pub const MAX_ATTACHMENT_BYTES: u64 = 1 << 40;
/// Longest disappearing-message timer: one year.
pub const MAX_EXPIRE_AFTER_MS: u64 = 366 * 24 * 3600 * 1000;

/// A member's profile key, shared inside the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberProfileKey {
    /// The member's account.
    pub account: fumi_proto::AccountId,
    /// Its profile key.
    #[serde(with = "key_hex")]
    pub profile_key: [u8; 32],
}

impl Content {
    /// Encodes and pads for encryption.
    pub fn encode(&self) -> Vec<u8> {
        padding::pad(&serde_json::to_vec(self).expect("content serialises"))
    }

    /// Decodes padded content.
    pub fn decode(padded: &[u8]) -> Result<Self, ContentError> {
        let json = padding::unpad(padded).map_err(|_| ContentError::Malformed)?;
        let header: VersionOnly = serde_json::from_slice(json).map_err(|_| ContentError::Malformed)?;
        if header.v > CONTENT_VERSION {
            return Err(ContentError::UnsupportedVersion(header.v));
        }
        let content: Content = serde_json::from_slice(json).map_err(|_| ContentError::Malformed)?;
        match &content.body {
            Body::Text { text } if text.len() > MAX_TEXT_BYTES => return Err(ContentError::TooLong),
            Body::File { attachment, caption } => {
                if caption.as_ref().is_some_and(|c| c.len() > MAX_TEXT_BYTES) {
                    return Err(ContentError::TooLong);
                }
                let name = &attachment.name;
                if name.is_empty()
                    || name.len() > MAX_FILE_NAME_BYTES
                    || attachment.media_type.len() > 127
                    || attachment.size > MAX_ATTACHMENT_BYTES
                {
                    return Err(ContentError::Malformed);
                }
            }
            Body::Timer {
                expire_after_ms: Some(ms),
            } if *ms == 0 || *ms > MAX_EXPIRE_AFTER_MS => return Err(ContentError::Malformed),
            _ => {}
        }
        if content
            .expire_after_ms
            .is_some_and(|ms| ms == 0 || ms > MAX_EXPIRE_AFTER_MS)
        {
            return Err(ContentError::Malformed);
        }
        Ok(content)
    }
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

pub(crate) mod key_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(key: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(key))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(text, &mut key).map_err(serde::de::Error::custom)?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn text_round_trips(text in ".{0,300}", id in any::<[u8; 16]>(), at in any::<u64>(), key in any::<[u8; 32]>()) {
            let content = Content { v: 1, id: MessageId::from_bytes(id), sent_at: at, profile_key: key, body: Body::Text { text }, expire_after_ms: None, franking: None };
            prop_assert_eq!(Content::decode(&content.encode()).unwrap(), content);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Content::decode(&bytes);
        }
    }

    #[test]
    fn file_round_trips_and_checks_its_fields() {
        let attachment = Attachment {
            blob: fumi_proto::BlobId::from_bytes([3; 16]),
            key: [4; 32],
            digest: [5; 32],
            size: 1234,
            name: "scan.pdf".into(),
            media_type: "application/pdf".into(),
        };
        let mut content = Content {
            v: 1,
            id: MessageId::from_bytes([1; 16]),
            sent_at: 9,
            profile_key: [2; 32],
            body: Body::File {
                attachment: attachment.clone(),
                caption: Some("the scan".into()),
            },
            expire_after_ms: Some(3_600_000),
            franking: None,
        };
        assert_eq!(Content::decode(&content.encode()).unwrap(), content);
        assert!(
            !format!("{attachment:?}").contains("scan.pdf"),
            "Debug must not print names or keys"
        );
        content.body = Body::File {
            attachment: Attachment {
                name: String::new(),
                ..attachment
            },
            caption: None,
        };
        assert_eq!(Content::decode(&content.encode()), Err(ContentError::Malformed));
        content.body = Body::Timer {
            expire_after_ms: Some(0),
        };
        assert_eq!(Content::decode(&content.encode()), Err(ContentError::Malformed));
    }

    #[test]
    fn unknown_kinds_and_newer_versions() {
        let json = format!(
            r#"{{"v":1,"id":"{}","sent_at":1,"profile_key":"{}","body":{{"kind":"sticker","x":1}}}}"#,
            "00".repeat(16),
            "11".repeat(32)
        );
        assert_eq!(
            Content::decode(&padding::pad(json.as_bytes())).unwrap().body,
            Body::Unknown
        );
        let newer = json.replace(r#""v":1"#, r#""v":9"#);
        assert_eq!(
            Content::decode(&padding::pad(newer.as_bytes())),
            Err(ContentError::UnsupportedVersion(9))
        );
    }
}
