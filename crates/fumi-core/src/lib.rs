#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod attachment;
pub mod content;
pub mod identity;
pub mod mls;
pub mod padding;
pub mod profile;
pub mod sealing;
pub mod username;

pub use content::{Attachment, Body, Content};
pub use identity::{AccountIdentity, DeviceCredential};
pub use mls::{CIPHERSUITE, Commit, Incoming, Member, MlsDevice, MlsError, Outgoing};
pub use profile::{Profile, ProfileKey};
pub use username::Username;

/// Re-exported so that callers can build providers without naming OpenMLS crates themselves.
pub use openmls_traits::OpenMlsProvider;
