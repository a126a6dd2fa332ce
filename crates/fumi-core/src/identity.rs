//! Account identity keys and device credentials.
//!
//! An account has a long-term Ed25519 identity key. Each device has its own MLS signature key;
//! the identity key certifies it. The certificate travels as the MLS BasicCredential identity, so
//! every group member can check which account a device belongs to without asking the server.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use fumi_proto::{AccountId, DeviceId};
use rand::RngCore;
use thiserror::Error;

/// Why a device credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CredentialError {
    /// Wrong length or magic: not a Fumi device credential.
    #[error("not a Fumi device credential")]
    Malformed,
    /// The identity key did not sign this device's MLS key for this account.
    #[error("the device certificate does not verify: the device is not certified by the account's identity key")]
    BadCertificate,
}

/// An account's long-term identity key pair.
pub struct AccountIdentity {
    signing_key: SigningKey,
}

impl AccountIdentity {
    /// A fresh identity key.
    pub fn generate(rng: &mut impl RngCore) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self {
            signing_key: SigningKey::from_bytes(&secret),
        }
    }

    /// Restores an identity from its 32-byte secret.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self {
            signing_key: SigningKey::from_bytes(secret),
        }
    }

    /// The 32-byte secret, for the client store.
    pub fn secret(&self) -> [u8; 32] {
        self.signing_key.to_bytes()
    }

    /// The public identity key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing_key.verifying_key().to_bytes()
    }

    /// Signs `message`, which must start with a domain label of its own (e.g.
    /// `"fumi channel post v1\0"`), so that no signature of one kind verifies as another.
    pub(crate) fn sign_labelled(&self, message: &[u8]) -> [u8; 64] {
        self.signing_key.sign(message).to_bytes()
    }

    /// Signs the request that adds `device` to `account` through a device link (checked by the
    /// server against the account's registered identity key).
    pub fn sign_device_link(
        &self,
        account: AccountId,
        device: DeviceId,
        token_hash: &[u8; 32],
        secret_hash: &[u8; 32],
    ) -> [u8; 64] {
        self.signing_key
            .sign(&fumi_proto::device_link_message(
                account,
                device,
                token_hash,
                secret_hash,
            ))
            .to_bytes()
    }

    /// Certifies a device's MLS signature key as belonging to `account`.
    pub fn certify_device(&self, account: AccountId, device: DeviceId, mls_signature_key: &[u8]) -> DeviceCredential {
        let signature = self
            .signing_key
            .sign(&certificate_message(account, device, mls_signature_key));
        DeviceCredential {
            account,
            device,
            identity_key: self.public_key(),
            certificate: signature.to_bytes(),
        }
    }
}

impl std::fmt::Debug for AccountIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccountIdentity(…)")
    }
}

/// The identity inside a device's MLS credential.
///
/// Encoding (132 bytes): `"FUMI"` ‖ account id (16) ‖ device id (16) ‖ identity key (32) ‖
/// Ed25519 signature (64) by the identity key over
/// `"fumi device certificate v1" ‖ account id ‖ device id ‖ MLS signature public key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredential {
    /// The account the device belongs to.
    pub account: AccountId,
    /// The device.
    pub device: DeviceId,
    /// The account's identity key.
    pub identity_key: [u8; 32],
    /// The identity key's signature over the device's MLS signature key.
    pub certificate: [u8; 64],
}

const CREDENTIAL_MAGIC: &[u8; 4] = b"FUMI";
const CREDENTIAL_LEN: usize = 4 + 16 + 16 + 32 + 64;

impl DeviceCredential {
    /// The wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        [
            CREDENTIAL_MAGIC.as_slice(),
            self.account.as_bytes(),
            self.device.as_bytes(),
            &self.identity_key,
            &self.certificate,
        ]
        .concat()
    }

    /// Parses the wire encoding (does not verify the certificate).
    pub fn decode(bytes: &[u8]) -> Result<Self, CredentialError> {
        if bytes.len() != CREDENTIAL_LEN || &bytes[..4] != CREDENTIAL_MAGIC {
            return Err(CredentialError::Malformed);
        }
        let account = AccountId::from_slice(&bytes[4..20]).map_err(|_| CredentialError::Malformed)?;
        let device = DeviceId::from_slice(&bytes[20..36]).map_err(|_| CredentialError::Malformed)?;
        Ok(Self {
            account,
            device,
            identity_key: bytes[36..68].try_into().expect("length checked"),
            certificate: bytes[68..132].try_into().expect("length checked"),
        })
    }

    /// Parses and checks that the identity key certified `mls_signature_key` for this device.
    pub fn verify(bytes: &[u8], mls_signature_key: &[u8]) -> Result<Self, CredentialError> {
        let credential = Self::decode(bytes)?;
        let key = VerifyingKey::from_bytes(&credential.identity_key).map_err(|_| CredentialError::BadCertificate)?;
        let message = certificate_message(credential.account, credential.device, mls_signature_key);
        key.verify(&message, &Signature::from_bytes(&credential.certificate))
            .map_err(|_| CredentialError::BadCertificate)?;
        Ok(credential)
    }
}

/// The proof a newly linked device gives that it holds the link code: HMAC-SHA256 under the link
/// key (which never reaches the server) of `"fumi link proof v1" ‖ device id ‖ MLS signature key`.
/// The linking device trusts the new device as its account's only if the proof verifies, so the
/// server cannot name another device as the one that used the link.
pub fn link_proof(link_key: &[u8; 32], device: DeviceId, mls_signature_key: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(link_key).expect("HMAC takes any key length");
    mac.update(b"fumi link proof v1");
    mac.update(device.as_bytes());
    mac.update(mls_signature_key);
    mac.finalize().into_bytes().into()
}

fn certificate_message(account: AccountId, device: DeviceId, mls_signature_key: &[u8]) -> Vec<u8> {
    [
        b"fumi device certificate v1".as_slice(),
        account.as_bytes(),
        device.as_bytes(),
        mls_signature_key,
    ]
    .concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_verifies_only_for_its_key() {
        let mut rng = rand::rng();
        let identity = AccountIdentity::generate(&mut rng);
        let account = AccountId::from_bytes([1; 16]);
        let device = DeviceId::from_bytes([2; 16]);
        let credential = identity.certify_device(account, device, b"mls-key");
        let bytes = credential.encode();
        assert_eq!(DeviceCredential::verify(&bytes, b"mls-key").unwrap(), credential);
        assert_eq!(
            DeviceCredential::verify(&bytes, b"other-key"),
            Err(CredentialError::BadCertificate)
        );
        let mut forged = bytes.clone();
        forged[5] ^= 1; // claim another account
        assert_eq!(
            DeviceCredential::verify(&forged, b"mls-key"),
            Err(CredentialError::BadCertificate)
        );
        assert_eq!(DeviceCredential::decode(&bytes[..100]), Err(CredentialError::Malformed));
    }
}
