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

/// Checks that bytes are an MLS KeyPackage message; returns the MLS signature key its leaf
/// carries (unverified: clients verify the signature, the server only publishes the key).
pub fn key_package_signature_key(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|_| "key package is not a well-formed MLS message".to_owned())?;
    match message.extract() {
        MlsMessageBodyIn::KeyPackage(key_package) => {
            Ok(key_package.unverified_credential().signature_key.as_slice().to_vec())
        }
        _ => Err("key package must be an MLS KeyPackage".to_owned()),
    }
}

/// Checks a batch of KeyPackages of one device: each well-formed, all with the same signature
/// key (a device has one; the key directory lists it). Returns that key.
pub fn device_signature_key<'a>(key_packages: impl IntoIterator<Item = &'a [u8]>) -> Result<Option<Vec<u8>>, String> {
    let mut found: Option<Vec<u8>> = None;
    for bytes in key_packages {
        let key = key_package_signature_key(bytes)?;
        if key.is_empty() || key.len() > fumi_audit::keys::MAX_SIGNATURE_KEY_BYTES {
            return Err("a key package's signature key has an unusable length".to_owned());
        }
        match &found {
            Some(first) if *first != key => {
                return Err("all key packages of a device must carry its one signature key".to_owned());
            }
            _ => found = Some(key),
        }
    }
    Ok(found)
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
            let _ = key_package_signature_key(&bytes);
        }

        /// Mutations of a valid-looking MLS header (version 1, PrivateMessage) are handled too.
        #[test]
        fn mutated_headers_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let bytes = [&[0x00, 0x01, 0x00, 0x02][..], &tail].concat();
            let _ = inspect_group_message(&bytes);
        }
    }
}
