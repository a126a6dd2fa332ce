//! The key directory: what the server publishes with `akd` and what clients and auditors check.
//!
//! The server keeps an auditable key directory (Meta's `akd`, as WhatsApp does) with two kinds of
//! entries:
//!
//! - [`account_label`] → [`AccountEntry`]: the account's identity key and every device it has,
//!   each with the MLS signature key its KeyPackages carry;
//! - [`username_label`] → [`UsernameEntry`]: the account a username hash belongs to.
//!
//! Each time something changes the server publishes a new epoch and signs its root with the
//! transparency-log key ([`EpochHead`]). A client that is handed a KeyPackage, an identity key or
//! a username's account checks it against a lookup proof under a signed head; the account holder
//! checks the history of its own entry; anyone can check that each epoch only appended to the
//! previous one. A device slipped into an account, or a key swapped for one person only, must
//! then either fail a proof or appear in the directory, where its owner sees it.

pub use akd::AkdLabel;
use akd::{AkdValue, Digest, HistoryParams, VerifyResult};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use protobuf::Message;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// akd's hashing and commitment rules with Fumi's domain label.
pub type Config = akd::ExperimentalConfiguration<FumiKeyDirectory>;

/// Domain separation of every hash in Fumi's directory.
#[derive(Clone)]
pub struct FumiKeyDirectory;

impl akd::DomainLabel for FumiKeyDirectory {
    fn domain_label() -> &'static [u8] {
        b"fumi key directory v1"
    }
}

/// Domain separation of the epoch head signature.
const EPOCH_HEAD_CONTEXT: &[u8] = b"fumi key directory head v1";
const ACCOUNT_ENTRY_MAGIC: &[u8] = b"fumi account v1";
const USERNAME_ENTRY_MAGIC: &[u8] = b"fumi username v1";

/// Devices one entry may list (the server's per-account limit is far below).
pub const MAX_DEVICES: usize = 1024;
/// Largest MLS signature public key accepted in an entry.
pub const MAX_SIGNATURE_KEY_BYTES: usize = 256;

/// The directory label of an account.
pub fn account_label(account: &[u8; 16]) -> AkdLabel {
    AkdLabel([b"account:".as_slice(), account].concat())
}

/// The directory label of a username hash.
pub fn username_label(hash: &[u8; 32]) -> AkdLabel {
    AkdLabel([b"username:".as_slice(), hash].concat())
}

/// Why a directory answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyDirectoryError {
    /// Bytes that do not parse.
    #[error("malformed key directory data: {0}")]
    Malformed(String),
    /// The epoch head's signature does not verify.
    #[error("the key directory head's signature does not verify")]
    BadSignature,
    /// A proof does not verify against the signed root.
    #[error("the key directory proof does not verify: {0}")]
    BadProof(String),
}

fn malformed(what: impl Into<String>) -> KeyDirectoryError {
    KeyDirectoryError::Malformed(what.into())
}

/// One device in an [`AccountEntry`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceKey {
    /// The device id.
    pub device: [u8; 16],
    /// The MLS signature public key in the device's KeyPackages and leaf.
    pub signature_key: Vec<u8>,
}

/// What the directory says of an account. An account that was deleted has the all-zero
/// identity key and no devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountEntry {
    /// The account's Ed25519 identity key.
    pub identity_key: [u8; 32],
    /// Its devices, sorted by id.
    pub devices: Vec<DeviceKey>,
}

impl AccountEntry {
    /// The entry of a deleted account.
    pub fn deleted() -> Self {
        Self {
            identity_key: [0; 32],
            devices: vec![],
        }
    }

    /// The directory value: magic ‖ identity key ‖ count (u16 BE) ‖ per device, in id order:
    /// id (16) ‖ key length (u16 BE) ‖ key.
    pub fn encode(&self) -> AkdValue {
        let mut devices = self.devices.clone();
        devices.sort();
        let mut out = [ACCOUNT_ENTRY_MAGIC, &self.identity_key].concat();
        out.extend_from_slice(&(devices.len() as u16).to_be_bytes());
        for device in &devices {
            out.extend_from_slice(&device.device);
            out.extend_from_slice(&(device.signature_key.len() as u16).to_be_bytes());
            out.extend_from_slice(&device.signature_key);
        }
        AkdValue(out)
    }

    /// Parses [`Self::encode`]'s output, refusing anything else (unsorted or repeated devices
    /// included: one value has one encoding).
    pub fn decode(value: &[u8]) -> Result<Self, KeyDirectoryError> {
        let rest = value
            .strip_prefix(ACCOUNT_ENTRY_MAGIC)
            .ok_or_else(|| malformed("not an account entry"))?;
        let mut reader = Reader(rest);
        let identity_key: [u8; 32] = reader.take(32)?.try_into().expect("32 bytes taken");
        let count = reader.u16()? as usize;
        if count > MAX_DEVICES {
            return Err(malformed("too many devices"));
        }
        let mut devices: Vec<DeviceKey> = Vec::with_capacity(count);
        for _ in 0..count {
            let device: [u8; 16] = reader.take(16)?.try_into().expect("16 bytes taken");
            let len = reader.u16()? as usize;
            if len == 0 || len > MAX_SIGNATURE_KEY_BYTES {
                return Err(malformed("bad signature key length"));
            }
            let signature_key = reader.take(len)?.to_vec();
            if devices.last().is_some_and(|last| last.device >= device) {
                return Err(malformed("devices not in strictly increasing order"));
            }
            devices.push(DeviceKey { device, signature_key });
        }
        if !reader.0.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        Ok(Self { identity_key, devices })
    }

    /// The signature key listed for `device`, if it is listed.
    pub fn signature_key_of(&self, device: &[u8; 16]) -> Option<&[u8]> {
        self.devices
            .iter()
            .find(|d| &d.device == device)
            .map(|d| d.signature_key.as_slice())
    }
}

/// What the directory says of a username hash: the account holding it, or none (released).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsernameEntry {
    /// The holder, `None` once the username was given up.
    pub account: Option<[u8; 16]>,
}

impl UsernameEntry {
    /// The directory value: magic ‖ account id (16, all zero when released).
    pub fn encode(&self) -> AkdValue {
        AkdValue([USERNAME_ENTRY_MAGIC, &self.account.unwrap_or([0; 16])].concat())
    }

    /// Parses [`Self::encode`]'s output.
    pub fn decode(value: &[u8]) -> Result<Self, KeyDirectoryError> {
        let rest = value
            .strip_prefix(USERNAME_ENTRY_MAGIC)
            .ok_or_else(|| malformed("not a username entry"))?;
        let account: [u8; 16] = rest.try_into().map_err(|_| malformed("username entry length"))?;
        Ok(Self {
            account: (account != [0; 16]).then_some(account),
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], KeyDirectoryError> {
        if self.0.len() < n {
            return Err(malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, KeyDirectoryError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes taken")))
    }
}

/// One published epoch: its number, the directory's root hash and the VRF key that hides labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochHead {
    /// The epoch (1 for the first publication).
    pub epoch: u64,
    /// The root hash of the directory at that epoch.
    pub root_hash: Digest,
    /// The directory's VRF public key (32 bytes).
    pub vrf_public_key: [u8; 32],
    /// When it was published, ms since the Unix epoch.
    pub published_at: u64,
}

impl EpochHead {
    /// The bytes the log key signs: context ‖ epoch ‖ published_at (u64 BE) ‖ root ‖ VRF key.
    pub fn signed_message(&self) -> Vec<u8> {
        [
            EPOCH_HEAD_CONTEXT,
            &self.epoch.to_be_bytes(),
            &self.published_at.to_be_bytes(),
            &self.root_hash,
            &self.vrf_public_key,
        ]
        .concat()
    }

    /// Signs the head with the server's transparency-log key.
    pub fn sign(&self, key: &SigningKey) -> SignedEpochHead {
        SignedEpochHead {
            epoch: self.epoch,
            published_at: self.published_at,
            root_hash: hex::encode(self.root_hash),
            vrf_public_key: hex::encode(self.vrf_public_key),
            log_key: hex::encode(key.verifying_key().to_bytes()),
            signature: hex::encode(key.sign(&self.signed_message()).to_bytes()),
        }
    }
}

/// An epoch head signed by the log key, as served by `GET /v1/keys/head` and `/v1/keys/heads`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedEpochHead {
    /// The epoch.
    pub epoch: u64,
    /// When it was published, ms since the Unix epoch.
    pub published_at: u64,
    /// Root hash, hex.
    pub root_hash: String,
    /// VRF public key, hex.
    pub vrf_public_key: String,
    /// The server's transparency-log key (Ed25519), hex: the same key signs the audit log.
    pub log_key: String,
    /// Signature over [`EpochHead::signed_message`], hex.
    pub signature: String,
}

impl SignedEpochHead {
    /// Checks the signature under `expected_log_key` (the key the caller pinned); returns the head.
    pub fn verify(&self, expected_log_key: &[u8; 32]) -> Result<EpochHead, KeyDirectoryError> {
        let decode32 = |text: &str, what: &str| -> Result<[u8; 32], KeyDirectoryError> {
            crate::decode_hash(text).ok_or_else(|| malformed(what.to_owned()))
        };
        let head = EpochHead {
            epoch: self.epoch,
            published_at: self.published_at,
            root_hash: decode32(&self.root_hash, "root_hash")?,
            vrf_public_key: decode32(&self.vrf_public_key, "vrf_public_key")?,
        };
        if decode32(&self.log_key, "log_key")? != *expected_log_key {
            return Err(KeyDirectoryError::BadSignature);
        }
        let signature: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| malformed("signature"))?;
        let key = VerifyingKey::from_bytes(expected_log_key).map_err(|_| malformed("log_key"))?;
        key.verify_strict(&head.signed_message(), &Signature::from_bytes(&signature))
            .map_err(|_| KeyDirectoryError::BadSignature)?;
        Ok(head)
    }

    /// The log key the head names (to pin on first use).
    pub fn named_log_key(&self) -> Result<[u8; 32], KeyDirectoryError> {
        crate::decode_hash(&self.log_key).ok_or_else(|| malformed("log_key"))
    }
}

/// `GET /v1/keys/lookup/...`: the newest value of one label with its proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupAnswer {
    /// The head the proof is against.
    pub head: SignedEpochHead,
    /// akd `LookupProof`, protobuf, hex.
    pub proof: String,
}

/// `GET /v1/keys/history/account/{id}`: every value an account's entry ever had, with proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryAnswer {
    /// The head the proof is against.
    pub head: SignedEpochHead,
    /// akd `HistoryProof` (complete history), protobuf, hex.
    pub proof: String,
}

/// `GET /v1/keys/audit?from=A&to=B`: proof that each epoch from A+1 to B only appended to the
/// one before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAnswer {
    /// The signed heads of epochs A to B.
    pub heads: Vec<SignedEpochHead>,
    /// akd `AppendOnlyProof`, protobuf, hex.
    pub proof: String,
}

/// Serialises an akd lookup proof for the wire.
pub fn encode_lookup_proof(proof: &akd::LookupProof) -> String {
    let message = akd::proto::specs::types::LookupProof::from(proof);
    hex::encode(message.write_to_bytes().expect("protobuf encodes"))
}

/// Serialises an akd history proof for the wire.
pub fn encode_history_proof(proof: &akd::HistoryProof) -> String {
    let message = akd::proto::specs::types::HistoryProof::from(proof);
    hex::encode(message.write_to_bytes().expect("protobuf encodes"))
}

/// Serialises an akd append-only proof for the wire.
pub fn encode_append_only_proof(proof: &akd::AppendOnlyProof) -> String {
    let message = akd::proto::specs::types::AppendOnlyProof::from(proof);
    hex::encode(message.write_to_bytes().expect("protobuf encodes"))
}

fn proof_bytes(hex_text: &str) -> Result<Vec<u8>, KeyDirectoryError> {
    hex::decode(hex_text).map_err(|_| malformed("proof is not hex"))
}

/// A verified lookup: the label's newest value, its version and the epoch it was published in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The value.
    pub value: Vec<u8>,
    /// Its version (1 for the first value).
    pub version: u64,
    /// The epoch in which it was published.
    pub epoch: u64,
}

impl From<VerifyResult> for Verified {
    fn from(result: VerifyResult) -> Self {
        Self {
            value: result.value.0,
            version: result.version,
            epoch: result.epoch,
        }
    }
}

/// Checks a lookup proof for `label` against a verified head.
pub fn verify_lookup(head: &EpochHead, label: &AkdLabel, proof_hex: &str) -> Result<Verified, KeyDirectoryError> {
    let message = akd::proto::specs::types::LookupProof::parse_from_bytes(&proof_bytes(proof_hex)?)
        .map_err(|e| malformed(e.to_string()))?;
    let proof = akd::LookupProof::try_from(&message).map_err(|e| malformed(e.to_string()))?;
    akd::verify::lookup_verify::<Config>(&head.vrf_public_key, head.root_hash, head.epoch, label.clone(), proof)
        .map(Verified::from)
        .map_err(|e| KeyDirectoryError::BadProof(e.to_string()))
}

/// Checks a complete history proof for `label`; returns every value, newest first.
pub fn verify_history(head: &EpochHead, label: &AkdLabel, proof_hex: &str) -> Result<Vec<Verified>, KeyDirectoryError> {
    let message = akd::proto::specs::types::HistoryProof::parse_from_bytes(&proof_bytes(proof_hex)?)
        .map_err(|e| malformed(e.to_string()))?;
    let proof = akd::HistoryProof::try_from(&message).map_err(|e| malformed(e.to_string()))?;
    akd::verify::key_history_verify::<Config>(
        &head.vrf_public_key,
        head.root_hash,
        head.epoch,
        label.clone(),
        proof,
        akd::HistoryVerificationParams::Default {
            history_params: HistoryParams::Complete,
        },
    )
    .map(|results| results.into_iter().map(Verified::from).collect())
    .map_err(|e| KeyDirectoryError::BadProof(e.to_string()))
}

/// Checks that each epoch of `heads` (consecutive, verified) only appended to the previous one.
pub async fn verify_append_only(heads: &[EpochHead], proof_hex: &str) -> Result<(), KeyDirectoryError> {
    if heads.windows(2).any(|pair| pair[1].epoch != pair[0].epoch + 1) {
        return Err(malformed("the heads are not consecutive epochs"));
    }
    let message = akd::proto::specs::types::AppendOnlyProof::parse_from_bytes(&proof_bytes(proof_hex)?)
        .map_err(|e| malformed(e.to_string()))?;
    let proof = akd::AppendOnlyProof::try_from(&message).map_err(|e| malformed(e.to_string()))?;
    if proof.epochs.iter().zip(heads).any(|(epoch, head)| *epoch != head.epoch) {
        return Err(malformed("the proof is for other epochs than the heads"));
    }
    let hashes = heads.iter().map(|head| head.root_hash).collect();
    akd::auditor::audit_verify::<Config>(hashes, proof)
        .await
        .map_err(|e| KeyDirectoryError::BadProof(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_entry_round_trips_and_has_one_encoding() {
        let entry = AccountEntry {
            identity_key: [7; 32],
            devices: vec![
                DeviceKey {
                    device: [2; 16],
                    signature_key: vec![9; 32],
                },
                DeviceKey {
                    device: [1; 16],
                    signature_key: vec![8; 32],
                },
            ],
        };
        let value = entry.encode();
        let decoded = AccountEntry::decode(&value.0).unwrap();
        assert_eq!(decoded.devices[0].device, [1; 16]);
        assert_eq!(decoded.signature_key_of(&[2; 16]), Some(&[9u8; 32][..]));
        assert_eq!(decoded.encode(), value);
        // Repeated device: refused.
        let mut repeated = value.0.clone();
        let first = ACCOUNT_ENTRY_MAGIC.len() + 32 + 2;
        let record = 16 + 2 + 32;
        repeated.splice(first + record..first + 16 + record, [1u8; 16]);
        assert!(AccountEntry::decode(&repeated).is_err());
        assert!(AccountEntry::decode(&value.0[..value.0.len() - 1]).is_err());
        assert!(AccountEntry::decode(&[value.0.as_slice(), &[0]].concat()).is_err());
        assert_eq!(
            AccountEntry::decode(&AccountEntry::deleted().encode().0).unwrap(),
            AccountEntry::deleted()
        );
    }

    #[test]
    fn username_entry_round_trips() {
        let held = UsernameEntry { account: Some([3; 16]) };
        assert_eq!(UsernameEntry::decode(&held.encode().0).unwrap(), held);
        let released = UsernameEntry { account: None };
        assert_eq!(UsernameEntry::decode(&released.encode().0).unwrap(), released);
        assert!(UsernameEntry::decode(b"fumi username v1short").is_err());
    }

    #[test]
    fn epoch_head_signature_binds_every_field() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let head = EpochHead {
            epoch: 3,
            root_hash: [1; 32],
            vrf_public_key: [2; 32],
            published_at: 1000,
        };
        let signed = head.sign(&key);
        let log_key = key.verifying_key().to_bytes();
        assert_eq!(signed.verify(&log_key).unwrap(), head);
        let mut other = signed.clone();
        other.epoch = 4;
        assert_eq!(other.verify(&log_key), Err(KeyDirectoryError::BadSignature));
        let mut other = signed.clone();
        other.root_hash = hex::encode([9; 32]);
        assert_eq!(other.verify(&log_key), Err(KeyDirectoryError::BadSignature));
        assert_eq!(signed.verify(&[0; 32]), Err(KeyDirectoryError::BadSignature));
    }
}
