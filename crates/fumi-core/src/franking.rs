//! Message franking: what makes an abuse report checkable.
//!
//! The server never sees a message, so a moderator can only judge what a reporter hands over. A
//! reporter could invent text, or change what someone wrote. Franking stops both:
//!
//! - The sender picks a fresh random franking key for every message and computes a commitment,
//!   `HMAC-SHA256(key, label ‖ context ‖ content)`, where the context names the conversation, the
//!   sender's account and device, the message id and its time. It signs the commitment with its
//!   device's MLS signature key (certified by its account identity key) and puts key, commitment
//!   and signature inside the MLS message, so only the recipients see them.
//! - Every recipient checks the commitment and signature on arrival and drops a message that does
//!   not verify (a sender cannot send anything unreportable), keeping the opening as [`Evidence`].
//! - A report carries the evidence, sealed with HPKE to the moderation key. The moderator reopens
//!   the commitment and checks the signature and the device credential ([`Evidence::verify`]):
//!   altered text, another sender, another conversation or a signature by another key is rejected.
//!
//! For a file, the commitment covers its name, type, size, the blob's digest and the file key, so
//! a moderator given the blob can decrypt it and know it is the file that was sent.
//!
//! What is given up: a recipient who reports can prove to the moderator what the sender wrote. MLS
//! already signs every message with the same key, so a recipient holds that proof anyway.

use fumi_proto::{AccountId, DeviceId, GroupId, MAX_SEALED_REPORT_BYTES, MessageId};
use hmac::{Hmac, Mac};
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{HpkeAeadType, HpkeCiphertext, HpkeConfig, HpkeKdfType, HpkeKemType};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

use crate::content::{Attachment, Body};
use crate::identity::DeviceCredential;

const COMMITMENT_LABEL: &[u8] = b"fumi franking commitment v1";
const SIGNATURE_LABEL: &[u8] = b"fumi franking signature v1";
const REPORT_INFO: &[u8] = b"fumi abuse report v1";
const REPORT_SIGNATURE_LABEL: &[u8] = b"fumi abuse report signature v1";
/// Current report format version.
pub const REPORT_VERSION: u32 = 1;
/// Longest reporter comment, in bytes.
pub const MAX_COMMENT_BYTES: usize = 1000;

const HPKE: HpkeConfig = HpkeConfig(
    HpkeKemType::DhKem25519,
    HpkeKdfType::HkdfSha256,
    HpkeAeadType::ChaCha20Poly1305,
);
/// X25519 encapsulated key length: the sealed report is `encapsulated key ‖ ciphertext`.
const KEM_OUTPUT_BYTES: usize = 32;

/// Why a franking proof or report was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrankingError {
    /// The message carries no franking proof.
    #[error("the message carries no franking proof")]
    Missing,
    /// The commitment does not open to this content and context.
    #[error("the commitment does not match the reported content, sender or conversation")]
    CommitmentMismatch,
    /// The signature over the commitment is not by the sender's device key.
    #[error("the franking signature is not the sender device's")]
    BadSignature,
    /// The device credential does not certify this key for the claimed sender.
    #[error("the sender's device credential does not certify the signing key for the claimed sender")]
    BadCredential,
    /// The report is not signed by a device of the account it names as reporter.
    #[error("the report is not signed by a device of the reporter it names")]
    BadReporter,
    /// The sealed report does not open with this moderation key.
    #[error("the report does not open with this moderation key (sealed to another key, or altered)")]
    Sealed,
    /// The report is not well formed.
    #[error("the report is malformed: {0}")]
    Malformed(String),
}

/// Where and by whom a message was sent: bound into the commitment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrankingContext {
    /// The conversation.
    pub group: GroupId,
    /// The sender's account.
    pub sender: AccountId,
    /// The sender's device.
    pub device: DeviceId,
    /// The message id.
    pub message: MessageId,
    /// The sender's clock, ms since the Unix epoch.
    pub sent_at: u64,
}

/// What a moderator sees of a message: its text and, for a file, what describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedContent {
    /// The text (a file's caption).
    pub text: String,
    /// The file, if the message carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<ReportedFile>,
}

/// A file as committed: its name, type, size and SHA-256 (which identifies the bytes, should the
/// reporter also hand over the file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedFile {
    /// File name as the sender had it.
    pub name: String,
    /// Media type.
    pub media_type: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the encrypted blob, hex.
    pub digest: String,
    /// The file's key, hex: with the blob (from the reporter, or the server while it keeps it),
    /// the moderator can decrypt the reported file and the digest proves it is the one sent.
    pub key: String,
}

impl ReportedContent {
    /// The reportable part of a message body; `None` for kinds nobody reports (settings,
    /// timers, introductions).
    pub fn of(body: &Body) -> Option<Self> {
        match body {
            Body::Text { text } => Some(Self {
                text: text.clone(),
                file: None,
            }),
            Body::File { attachment, caption } => Some(Self {
                text: caption.clone().unwrap_or_default(),
                file: Some(ReportedFile::of(attachment)),
            }),
            _ => None,
        }
    }

    /// Unambiguous encoding: every field length-prefixed.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        field(&mut out, self.text.as_bytes());
        match &self.file {
            None => out.push(0),
            Some(file) => {
                out.push(1);
                field(&mut out, file.name.as_bytes());
                field(&mut out, file.media_type.as_bytes());
                out.extend_from_slice(&file.size.to_be_bytes());
                field(&mut out, file.digest.as_bytes());
                field(&mut out, file.key.as_bytes());
            }
        }
        out
    }
}

impl ReportedFile {
    fn of(attachment: &Attachment) -> Self {
        Self {
            name: attachment.name.clone(),
            media_type: attachment.media_type.clone(),
            size: attachment.size,
            digest: hex::encode(attachment.digest),
            key: hex::encode(attachment.key),
        }
    }
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl FrankingContext {
    fn encode(&self) -> Vec<u8> {
        [
            self.group.as_bytes().as_slice(),
            self.sender.as_bytes(),
            self.device.as_bytes(),
            self.message.as_bytes(),
            &self.sent_at.to_be_bytes(),
        ]
        .concat()
    }
}

/// The franking proof carried inside a message.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Franking {
    /// The per-message franking key, hex (32 bytes).
    pub key: String,
    /// The commitment, hex (32 bytes).
    pub commitment: String,
    /// The sender device's Ed25519 signature over the commitment, hex (64 bytes).
    pub signature: String,
}

impl std::fmt::Debug for Franking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Franking")
            .field("commitment", &self.commitment)
            .finish_non_exhaustive()
    }
}

/// The commitment to `content` in `context` under `key`.
pub fn commitment(key: &[u8; 32], context: &FrankingContext, content: &ReportedContent) -> [u8; 32] {
    commitment_mac(key, context, content).finalize().into_bytes().into()
}

fn commitment_mac(key: &[u8; 32], context: &FrankingContext, content: &ReportedContent) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(COMMITMENT_LABEL);
    mac.update(&context.encode());
    mac.update(&content.encode());
    mac
}

/// What the sender's device signs: a label and the commitment.
pub fn signed_message(commitment: &[u8; 32]) -> Vec<u8> {
    [SIGNATURE_LABEL, commitment.as_slice()].concat()
}

impl Franking {
    /// Franks `content`: a fresh key, the commitment, and `sign`'s signature over
    /// [`signed_message`].
    pub fn new<E>(
        context: &FrankingContext,
        content: &ReportedContent,
        rng: &mut impl rand::RngCore,
        sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
    ) -> Result<Self, E> {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let commitment = commitment(&key, context, content);
        let signature = sign(&signed_message(&commitment))?;
        Ok(Self {
            key: hex::encode(key),
            commitment: hex::encode(commitment),
            signature: hex::encode(signature),
        })
    }

    /// Checks that the proof opens to `content` in `context` and is signed by `signature_key`
    /// (the sender device's MLS signature key, which MLS has already tied to the sender).
    pub fn check(
        &self,
        context: &FrankingContext,
        content: &ReportedContent,
        signature_key: &[u8],
    ) -> Result<(), FrankingError> {
        let key: [u8; 32] = hex32(&self.key)?;
        let claimed: [u8; 32] = hex32(&self.commitment)?;
        let signature: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| FrankingError::Malformed("signature is not 64 bytes of hex".into()))?;
        // Constant-time comparison through the MAC's own verifier.
        commitment_mac(&key, context, content)
            .verify_slice(&claimed)
            .map_err(|_| FrankingError::CommitmentMismatch)?;
        let verifying_key = <[u8; 32]>::try_from(signature_key)
            .ok()
            .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
            .ok_or(FrankingError::BadSignature)?;
        verifying_key
            .verify_strict(
                &signed_message(&claimed),
                &ed25519_dalek::Signature::from_bytes(&signature),
            )
            .map_err(|_| FrankingError::BadSignature)
    }
}

fn hex32(text: &str) -> Result<[u8; 32], FrankingError> {
    hex::decode(text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| FrankingError::Malformed("expected 32 bytes of hex".into()))
}

/// The opening of one received message, kept by the recipient so it can report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// Where and by whom.
    pub context: FrankingContext,
    /// What it said.
    pub content: ReportedContent,
    /// The proof from inside the message.
    pub franking: Franking,
    /// The sender device's MLS signature public key, hex.
    pub signature_key: String,
    /// The sender device's credential (certified by the account identity key), hex.
    pub credential: String,
}

/// A sender whose authorship a report proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProvenSender {
    /// The account.
    pub account: AccountId,
    /// The device.
    pub device: DeviceId,
    /// The identity key that certified the device: the moderator checks it is the account's.
    pub identity_key: [u8; 32],
}

impl Evidence {
    /// Checks the whole chain: the credential certifies the signing key for the claimed sender
    /// and device, the signature covers the commitment, and the commitment opens to the content.
    pub fn verify(&self) -> Result<ProvenSender, FrankingError> {
        let signature_key = hex::decode(&self.signature_key)
            .map_err(|_| FrankingError::Malformed("signature key is not hex".into()))?;
        let credential =
            hex::decode(&self.credential).map_err(|_| FrankingError::Malformed("credential is not hex".into()))?;
        let credential =
            DeviceCredential::verify(&credential, &signature_key).map_err(|_| FrankingError::BadCredential)?;
        if credential.account != self.context.sender || credential.device != self.context.device {
            return Err(FrankingError::BadCredential);
        }
        self.franking.check(&self.context, &self.content, &signature_key)?;
        Ok(ProvenSender {
            account: credential.account,
            device: credential.device,
            identity_key: credential.identity_key,
        })
    }
}

/// An abuse report, as the moderator opens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Format version.
    pub v: u32,
    /// The reported message and its proof.
    pub evidence: Evidence,
    /// Who reports.
    pub reporter: AccountId,
    /// The reporter's words.
    pub comment: String,
    /// Reporter's clock, ms since the Unix epoch.
    pub reported_at: u64,
}

/// What is sealed: the report's exact JSON and the reporter device's signature over it, so the
/// moderator knows the named reporter really filed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedReport {
    /// The [`Report`] as JSON text (signed as these exact bytes).
    report: String,
    /// The reporter device's MLS signature public key, hex.
    signature_key: String,
    /// The reporter device's credential, hex.
    credential: String,
    /// Ed25519 by that key over `"fumi abuse report signature v1" ‖ report`, hex.
    signature: String,
}

impl Report {
    /// Signs the report with the reporter device's key (through `sign`, given its signature key
    /// and credential) and seals it to the moderation public key (HPKE base mode, X25519,
    /// HKDF-SHA256, ChaCha20-Poly1305). Output: encapsulated key ‖ ciphertext.
    pub fn seal(
        &self,
        crypto: &impl OpenMlsCrypto,
        moderation_key: &[u8; 32],
        signature_key: &[u8],
        credential: &[u8],
        sign: impl FnOnce(&[u8]) -> Option<[u8; 64]>,
    ) -> Result<Vec<u8>, FrankingError> {
        if self.comment.len() > MAX_COMMENT_BYTES {
            return Err(FrankingError::Malformed(format!(
                "a comment is at most {MAX_COMMENT_BYTES} bytes"
            )));
        }
        let report = serde_json::to_string(self).expect("report serialises");
        let signature = sign(&[REPORT_SIGNATURE_LABEL, report.as_bytes()].concat())
            .ok_or_else(|| FrankingError::Malformed("the device could not sign the report".into()))?;
        let signed = SignedReport {
            report,
            signature_key: hex::encode(signature_key),
            credential: hex::encode(credential),
            signature: hex::encode(signature),
        };
        let json = serde_json::to_vec(&signed).expect("report serialises");
        let sealed = crypto
            .hpke_seal(HPKE, moderation_key, REPORT_INFO, &[], &json)
            .map_err(|e| FrankingError::Malformed(format!("sealing failed: {e:?}")))?;
        let out = [sealed.kem_output.as_slice(), sealed.ciphertext.as_slice()].concat();
        if out.len() > MAX_SEALED_REPORT_BYTES {
            return Err(FrankingError::Malformed("the report is too large".into()));
        }
        Ok(out)
    }

    /// Opens a sealed report with the moderation secret key and checks that the reporter it names
    /// signed it (with a device certified by some identity key; the moderator checks that key is
    /// the reporter account's if it matters). Does not verify the evidence: call
    /// [`Evidence::verify`].
    pub fn open(
        crypto: &impl OpenMlsCrypto,
        sealed: &[u8],
        moderation_secret: &[u8; 32],
    ) -> Result<Self, FrankingError> {
        if sealed.len() <= KEM_OUTPUT_BYTES {
            return Err(FrankingError::Sealed);
        }
        let (kem_output, ciphertext) = sealed.split_at(KEM_OUTPUT_BYTES);
        let input = HpkeCiphertext {
            kem_output: kem_output.to_vec().into(),
            ciphertext: ciphertext.to_vec().into(),
        };
        let json = crypto
            .hpke_open(HPKE, &input, moderation_secret, REPORT_INFO, &[])
            .map_err(|_| FrankingError::Sealed)?;
        let signed: SignedReport =
            serde_json::from_slice(&json).map_err(|e| FrankingError::Malformed(e.to_string()))?;
        let report: Report =
            serde_json::from_str(&signed.report).map_err(|e| FrankingError::Malformed(e.to_string()))?;
        if report.v != REPORT_VERSION {
            return Err(FrankingError::Malformed(format!("unknown report version {}", report.v)));
        }
        // The reporter named inside must be the device that signed it.
        let signature_key =
            hex::decode(&signed.signature_key).map_err(|_| FrankingError::Malformed("signature key".into()))?;
        let credential = hex::decode(&signed.credential).map_err(|_| FrankingError::Malformed("credential".into()))?;
        let credential =
            DeviceCredential::verify(&credential, &signature_key).map_err(|_| FrankingError::BadReporter)?;
        let signature: [u8; 64] = hex::decode(&signed.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(FrankingError::BadReporter)?;
        let key = <[u8; 32]>::try_from(signature_key.as_slice())
            .ok()
            .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
            .ok_or(FrankingError::BadReporter)?;
        key.verify_strict(
            &[REPORT_SIGNATURE_LABEL, signed.report.as_bytes()].concat(),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .map_err(|_| FrankingError::BadReporter)?;
        if credential.account != report.reporter {
            return Err(FrankingError::BadReporter);
        }
        Ok(report)
    }
}

/// A fresh moderation key pair: (secret, public), 32 bytes each.
pub fn moderation_keypair(crypto: &impl OpenMlsCrypto, rng: &mut impl rand::RngCore) -> ([u8; 32], [u8; 32]) {
    let mut ikm = [0u8; 32];
    rng.fill_bytes(&mut ikm);
    let pair = crypto
        .derive_hpke_keypair(HPKE, &ikm)
        .expect("X25519 key derivation from 32 bytes cannot fail");
    let secret: [u8; 32] = pair.private.as_ref().try_into().expect("X25519 secret is 32 bytes");
    let public: [u8; 32] = pair
        .public
        .as_slice()
        .try_into()
        .expect("X25519 public key is 32 bytes");
    (secret, public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AccountIdentity;
    use ed25519_dalek::Signer as _;

    struct Sender {
        identity: AccountIdentity,
        device_key: ed25519_dalek::SigningKey,
        account: AccountId,
        device: DeviceId,
    }

    impl Sender {
        fn new(n: u8) -> Self {
            let mut rng = rand::rng();
            Self {
                identity: AccountIdentity::generate(&mut rng),
                device_key: ed25519_dalek::SigningKey::from_bytes(&[n; 32]),
                account: AccountId::from_bytes([n; 16]),
                device: DeviceId::from_bytes([n + 100; 16]),
            }
        }

        fn evidence(&self, text: &str) -> Evidence {
            let context = FrankingContext {
                group: GroupId::from_bytes([9; 16]),
                sender: self.account,
                device: self.device,
                message: MessageId::from_bytes([7; 16]),
                sent_at: 1_700_000_000_000,
            };
            let content = ReportedContent {
                text: text.into(),
                file: None,
            };
            let franking = Franking::new(&context, &content, &mut rand::rng(), |m| {
                Ok::<_, ()>(self.device_key.sign(m).to_bytes())
            })
            .unwrap();
            let public = self.device_key.verifying_key().to_bytes();
            Evidence {
                context,
                content,
                franking,
                signature_key: hex::encode(public),
                credential: hex::encode(
                    self.identity
                        .certify_device(self.account, self.device, &public)
                        .encode(),
                ),
            }
        }
    }

    #[test]
    fn genuine_evidence_verifies_and_names_the_sender() {
        let alice = Sender::new(1);
        let evidence = alice.evidence("you will regret this");
        let proven = evidence.verify().unwrap();
        assert_eq!(proven.account, alice.account);
        assert_eq!(proven.identity_key, alice.identity.public_key());
    }

    #[test]
    fn altered_or_forged_evidence_is_rejected() {
        let alice = Sender::new(1);
        let mallory = Sender::new(2);
        let genuine = alice.evidence("see you at noon");

        let mut altered_text = genuine.clone();
        altered_text.content.text = "I will hurt you".into();
        assert_eq!(altered_text.verify(), Err(FrankingError::CommitmentMismatch));

        let mut moved = genuine.clone();
        moved.context.group = GroupId::from_bytes([8; 16]);
        assert_eq!(moved.verify(), Err(FrankingError::CommitmentMismatch));

        let mut redated = genuine.clone();
        redated.context.sent_at += 1;
        assert_eq!(redated.verify(), Err(FrankingError::CommitmentMismatch));

        // A new commitment to invented text under a key of the forger's choosing: the signature
        // no longer covers it.
        let mut recommitted = genuine.clone();
        recommitted.content.text = "I will hurt you".into();
        let key = [3u8; 32];
        recommitted.franking.key = hex::encode(key);
        recommitted.franking.commitment = hex::encode(commitment(&key, &recommitted.context, &recommitted.content));
        assert_eq!(recommitted.verify(), Err(FrankingError::BadSignature));

        // Mallory frames Alice: a message Mallory franked, claimed to be Alice's.
        let mut framed = mallory.evidence("I will hurt you");
        framed.context.sender = alice.account;
        assert_eq!(framed.verify(), Err(FrankingError::BadCredential));
        // ... and with Alice's credential but Mallory's signing key.
        let mut framed = mallory.evidence("I will hurt you");
        framed.credential = genuine.credential.clone();
        framed.context = genuine.context;
        assert_eq!(framed.verify(), Err(FrankingError::BadCredential));
        // ... and with Alice's key and credential but Mallory's signature.
        let mut framed = mallory.evidence("I will hurt you");
        framed.context = genuine.context;
        framed.signature_key = genuine.signature_key.clone();
        framed.credential = genuine.credential.clone();
        assert!(framed.verify().is_err());
    }

    #[test]
    fn reports_open_only_with_the_moderation_key() {
        let mut rng = rand::rng();
        let crypto = openmls_rust_crypto::RustCrypto::default();
        let (secret, public) = moderation_keypair(&crypto, &mut rng);
        let (other_secret, _) = moderation_keypair(&crypto, &mut rng);
        let reporter = Sender::new(5);
        let reporter_key = reporter.device_key.verifying_key().to_bytes();
        let reporter_credential = reporter
            .identity
            .certify_device(reporter.account, reporter.device, &reporter_key)
            .encode();
        let report = Report {
            v: REPORT_VERSION,
            evidence: Sender::new(1).evidence("abuse"),
            reporter: reporter.account,
            comment: "threatening".into(),
            reported_at: 1,
        };
        let seal = |report: &Report, signer: &ed25519_dalek::SigningKey| {
            report
                .seal(&crypto, &public, &reporter_key, &reporter_credential, |m| {
                    Some(signer.sign(m).to_bytes())
                })
                .unwrap()
        };
        let sealed = seal(&report, &reporter.device_key);
        assert_eq!(Report::open(&crypto, &sealed, &secret).unwrap(), report);
        // Filed in someone else's name, or signed by another key: refused.
        let impostor = Report {
            reporter: AccountId::from_bytes([6; 16]),
            ..report.clone()
        };
        assert_eq!(
            Report::open(&crypto, &seal(&impostor, &reporter.device_key), &secret),
            Err(FrankingError::BadReporter)
        );
        assert_eq!(
            Report::open(&crypto, &seal(&report, &Sender::new(7).device_key), &secret),
            Err(FrankingError::BadReporter)
        );
        assert_eq!(
            Report::open(&crypto, &sealed, &other_secret),
            Err(FrankingError::Sealed)
        );
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(Report::open(&crypto, &altered, &secret), Err(FrankingError::Sealed));
        assert_eq!(
            Report::open(&crypto, &sealed[..20], &secret),
            Err(FrankingError::Sealed)
        );
    }
}
