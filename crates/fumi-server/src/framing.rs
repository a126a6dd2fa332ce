//! The only part of an MLS message the server reads: its framing (group id, epoch, content
//! type), to order commits per group. Contents stay encrypted.

use fumi_proto::GroupId;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{ContentType, MlsMessageBodyIn, MlsMessageIn, ProtocolMessage};

/// What the framing of a submitted message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// The group.
    pub group: GroupId,
    /// The epoch the message was made in.
    pub epoch: u64,
    /// Whether it is a commit.
    pub is_commit: bool,
}

/// Reads the framing of a group message (PrivateMessage or PublicMessage).
pub fn inspect_group_message(bytes: &[u8]) -> Result<Framing, String> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|_| "message is not a well-formed MLS message".to_owned())?;
    let protocol: ProtocolMessage = match message.extract() {
        MlsMessageBodyIn::PrivateMessage(m) => m.into(),
        MlsMessageBodyIn::PublicMessage(m) => m.into(),
        _ => return Err("message must be an MLS PrivateMessage or PublicMessage".to_owned()),
    };
    let group =
        GroupId::from_slice(protocol.group_id().as_slice()).map_err(|_| "group id must be 16 bytes".to_owned())?;
    Ok(Framing {
        group,
        epoch: protocol.epoch().as_u64(),
        is_commit: protocol.content_type() == ContentType::Commit,
    })
}

/// Checks that bytes are an MLS Welcome.
pub fn check_welcome(bytes: &[u8]) -> Result<(), String> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|_| "welcome is not a well-formed MLS message".to_owned())?;
    match message.extract() {
        MlsMessageBodyIn::Welcome(_) => Ok(()),
        _ => Err("welcome must be an MLS Welcome".to_owned()),
    }
}

/// Checks that bytes are an MLS KeyPackage message.
pub fn check_key_package(bytes: &[u8]) -> Result<(), String> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|_| "key package is not a well-formed MLS message".to_owned())?;
    match message.extract() {
        MlsMessageBodyIn::KeyPackage(_) => Ok(()),
        _ => Err("key package must be an MLS KeyPackage".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The server parses untrusted bytes: any input gives a framing or an error, never a panic.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = inspect_group_message(&bytes);
            let _ = check_welcome(&bytes);
            let _ = check_key_package(&bytes);
        }

        /// Mutations of a valid-looking MLS header (version 1, PrivateMessage) are handled too.
        #[test]
        fn mutated_headers_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let bytes = [&[0x00, 0x01, 0x00, 0x02][..], &tail].concat();
            let _ = inspect_group_message(&bytes);
        }
    }
}
