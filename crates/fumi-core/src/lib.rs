#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// A 256-bit symmetric key type: random or from bytes, zeroized on drop, never printed.
macro_rules! symmetric_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
        pub struct $name([u8; 32]);

        impl $name {
            /// A fresh random key.
            pub fn generate(rng: &mut impl rand::RngCore) -> Self {
                let mut key = [0u8; 32];
                rng.fill_bytes(&mut key);
                Self(key)
            }

            /// Wraps raw key bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw key bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(…)"))
            }
        }
    };
}

pub mod attachment;
pub mod content;
pub mod form;
pub mod franking;
pub mod identity;
pub mod machine;
pub mod message;
pub mod mls;
pub mod official;
pub mod padding;
pub mod profile;
pub mod receive;
pub mod safety;
pub mod sealing;
pub mod send;
pub mod store;
pub mod username;

pub use content::{Attachment, Body, Content};
pub use identity::{AccountIdentity, DeviceCredential};
pub use mls::{CIPHERSUITE, Commit, Incoming, Member, MlsDevice, MlsError, Outgoing};
pub use profile::{Profile, ProfileKey};
pub use username::Username;

/// Re-exported so that callers can build providers without naming OpenMLS crates themselves.
pub use openmls_traits::OpenMlsProvider;
