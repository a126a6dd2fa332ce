//! The only part of an MLS message the server reads: its framing (group id, epoch, content
//! type), to order commits per group. Contents stay encrypted.

use fumi_proto::GroupId;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{ContentType, MlsMessageBodyIn, MlsMessageIn, ProtocolMessage, ProtocolVersion};

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

/// Checks that an uploaded KeyPackage is one a claimer can use, as RFC 9420 §10.1 has every
/// claimer check it: its leaf's and its own signature, its lifetime, and that every extension it
/// carries is listed in its leaf's capabilities. The last is what a client gets wrong most easily
/// (a last-resort KeyPackage whose leaf does not list `last_resort`, 0x000A, is refused by every
/// claimer, so the device could be reached by nobody once its one-time stock ran out). A
/// last-resort KeyPackage must carry that extension. Returns the leaf's signature key.
pub fn check_key_package(bytes: &[u8], last_resort: bool) -> Result<Vec<u8>, String> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|_| "key package is not a well-formed MLS message".to_owned())?;
    let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
        return Err("key package must be an MLS KeyPackage".to_owned());
    };
    let signature_key = key_package.unverified_credential().signature_key.as_slice().to_vec();
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let key_package = key_package
        .validate(&crypto, ProtocolVersion::Mls10)
        .map_err(|e| format!("key package is not usable: {e}"))?;
    if last_resort && !key_package.last_resort() {
        return Err("the last-resort key package must carry the last_resort extension (0x000A)".to_owned());
    }
    Ok(signature_key)
}

/// Checks an upload of KeyPackages of one device (`(bytes, is the last-resort one)`): each
/// usable ([`check_key_package`]), all with the same signature key (a device has one; the key
/// directory lists it). Returns that key.
pub fn uploaded_signature_key<'a>(
    key_packages: impl IntoIterator<Item = (&'a [u8], bool)>,
) -> Result<Option<Vec<u8>>, String> {
    one_signature_key(
        key_packages
            .into_iter()
            .map(|(bytes, last_resort)| check_key_package(bytes, last_resort)),
    )
}

/// The signature key of stored KeyPackages (checked when they were uploaded).
pub fn device_signature_key<'a>(key_packages: impl IntoIterator<Item = &'a [u8]>) -> Result<Option<Vec<u8>>, String> {
    one_signature_key(key_packages.into_iter().map(key_package_signature_key))
}

/// The one signature key all of a device's KeyPackages carry.
fn one_signature_key(keys: impl Iterator<Item = Result<Vec<u8>, String>>) -> Result<Option<Vec<u8>>, String> {
    let mut found: Option<Vec<u8>> = None;
    for key in keys {
        let key = key?;
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

    /// A KeyPackage as a client might make it: marked last-resort or not, its leaf listing the
    /// `last_resort` extension in its capabilities or not.
    fn key_package(last_resort: bool, capability_listed: bool) -> Vec<u8> {
        use openmls::prelude::tls_codec::Serialize as _;
        use openmls::prelude::*;
        use openmls_basic_credential::SignatureKeyPair;
        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(b"device".to_vec()).into(),
            signature_key: signer.public().into(),
        };
        let mut builder = KeyPackage::builder();
        if capability_listed {
            let capabilities = Capabilities::new(None, None, Some(&[ExtensionType::LastResort]), None, None);
            builder = builder.leaf_node_capabilities(capabilities);
        }
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(
                Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519,
                &provider,
                &signer,
                credential,
            )
            .unwrap();
        MlsMessageOut::from(bundle.key_package().clone())
            .tls_serialize_detached()
            .unwrap()
    }

    #[test]
    fn only_key_packages_a_claimer_can_use_are_taken() {
        assert!(check_key_package(&key_package(false, true), false).is_ok());
        assert!(check_key_package(&key_package(false, false), false).is_ok());
        assert!(check_key_package(&key_package(true, true), true).is_ok());
        // A last-resort KeyPackage whose leaf does not list the extension: every claimer refuses it.
        let error = check_key_package(&key_package(true, false), true).unwrap_err();
        assert!(error.contains("not usable"), "{error}");
        // The last-resort slot holds a last-resort KeyPackage.
        let error = check_key_package(&key_package(false, true), true).unwrap_err();
        assert!(error.contains("last_resort"), "{error}");
        // A broken signature.
        let mut tampered = key_package(false, true);
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(check_key_package(&tampered, false).is_err());
    }

    proptest! {
        /// The server parses untrusted bytes: any input gives a framing or an error, never a panic.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = inspect_group_message(&bytes);
            let _ = check_welcome(&bytes);
            let _ = key_package_signature_key(&bytes);
            let _ = check_key_package(&bytes, true);
        }

        /// Mutations of a valid-looking MLS header (version 1, PrivateMessage) are handled too.
        #[test]
        fn mutated_headers_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let bytes = [&[0x00, 0x01, 0x00, 0x02][..], &tail].concat();
            let _ = inspect_group_message(&bytes);
        }
    }
}
