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
    /// Sent by a new member after joining, so the others learn its profile key (carried, as in
    /// every content, in [`Content::profile_key`]).
    Introduction,
    /// A kind this client does not know.
    #[serde(other)]
    Unknown,
}

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
        if let Body::Text { text } = &content.body
            && text.len() > MAX_TEXT_BYTES
        {
            return Err(ContentError::TooLong);
        }
        Ok(content)
    }
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

mod key_hex {
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
            let content = Content { v: 1, id: MessageId::from_bytes(id), sent_at: at, profile_key: key, body: Body::Text { text } };
            prop_assert_eq!(Content::decode(&content.encode()).unwrap(), content);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Content::decode(&bytes);
        }
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
