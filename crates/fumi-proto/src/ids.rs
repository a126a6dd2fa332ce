use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A malformed id: ids are exactly 16 bytes written as 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an id must be 32 hexadecimal digits")]
pub struct IdError;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// `Display` gives the full hex form (for URLs and the user's own screen); `Debug` shows
        /// only a prefix so that a stray `{:?}` in a log line cannot leak a whole identifier.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 16]);

        impl $name {
            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// Parses 32 hex digits.
            pub fn parse(text: &str) -> Result<Self, IdError> {
                let mut bytes = [0u8; 16];
                hex::decode_to_slice(text, &mut bytes).map_err(|_| IdError)?;
                Ok(Self(bytes))
            }

            /// Parses 16 raw bytes.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
                bytes.try_into().map(Self).map_err(|_| IdError)
            }

            /// A short, log-safe form: the first four hex digits.
            pub fn redacted(&self) -> String {
                format!("{}…", &hex::encode(&self.0[..2]))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.redacted())
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<Self, IdError> {
                Self::parse(text)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&hex::encode(self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A random 128-bit account id.
    AccountId
);
id_type!(
    /// A random 128-bit device id, unique across the server.
    DeviceId
);
id_type!(
    /// A random 128-bit MLS group id (the conversation id).
    GroupId
);
id_type!(
    /// A client-chosen 128-bit message id that makes retries idempotent.
    MessageId
);
id_type!(
    /// A random 128-bit blob id, chosen by the server when an upload starts.
    BlobId
);
id_type!(
    /// A random 128-bit broadcast channel id, chosen by the organisation that creates it.
    ChannelId
);
