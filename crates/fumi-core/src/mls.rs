//! Every OpenMLS call in Fumi lives in this module, behind [`MlsDevice`]: OpenMLS changes its API
//! between minor releases, and one small surface keeps an upgrade contained.
//!
//! The device is sans-I/O: it turns intentions into bytes to send ([`Commit`], [`Outgoing`]) and
//! received bytes into [`Incoming`] events. Persistence goes through the OpenMLS provider's
//! storage, which the caller chooses (SQLite natively).

use fumi_proto::{AccountId, DeviceId, GroupId};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;
use openmls_traits::types::Ciphersuite;
use thiserror::Error;

use crate::identity::{AccountIdentity, CredentialError, DeviceCredential};

/// The one ciphersuite Fumi uses; switching to the post-quantum hybrid suite happens here.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// How many past epochs' secrets a member keeps, so that application messages sent just before a
/// commit still decrypt after it.
const MAX_PAST_EPOCHS: usize = 8;

/// Most members a group may have (each device is one member).
pub const MAX_GROUP_MEMBERS: usize = 1000;

/// A member of a group: one device of one account, certified by the account's identity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// The account.
    pub account: AccountId,
    /// The device.
    pub device: DeviceId,
    /// The account identity key that certified the device. The credential proves only that this
    /// key certified it; the caller must check the key belongs to the account (pinning, key
    /// transparency).
    pub identity_key: [u8; 32],
    /// The device's MLS signature key (Ed25519), which the key directory lists for the device.
    pub signature_key: [u8; 32],
}

/// Errors of MLS operations.
#[derive(Debug, Error)]
pub enum MlsError {
    /// The bytes are not a well-formed MLS message or KeyPackage.
    #[error("malformed MLS data: {0}")]
    Malformed(String),
    /// A credential did not verify.
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// A KeyPackage claims another device than the one it was handed out for.
    #[error("the server handed out a key package of another device than requested")]
    KeyPackageMismatch,
    /// The message is for a group this device is not in.
    #[error("message for a conversation this device is not a member of")]
    UnknownGroup,
    /// The operation would break a group limit.
    #[error("a group has at most {MAX_GROUP_MEMBERS} member devices")]
    GroupTooLarge,
    /// MLS refused the message or operation (wrong epoch, bad signature, replay, ...).
    #[error("MLS refused: {0}")]
    Refused(String),
    /// The device is no longer a member of the group.
    #[error("this device is no longer a member of the conversation")]
    NotMember,
    /// Persisting MLS state failed. This device is at fault, not the message.
    #[error("client store: {0}")]
    Storage(String),
    /// OpenMLS or Fumi found its own bug (OpenMLS's `LibraryError`). This device is at fault,
    /// not the message.
    #[error("internal error (a bug in Fumi or OpenMLS, not in the message): {0}")]
    Internal(String),
}

impl MlsError {
    /// Whether this device is at fault (its store or its code) rather than what a peer or the
    /// server sent: a received message that failed this way must be kept and processed again,
    /// never consumed.
    pub fn is_local(&self) -> bool {
        matches!(self, MlsError::Storage(_) | MlsError::Internal(_))
    }

    /// Sorts a failure to process a received message: our store, our bug, or the message.
    fn from_processing<S: std::fmt::Debug>(error: ProcessMessageError<S>) -> Self
    where
        ProcessMessageError<S>: std::fmt::Display,
    {
        match error {
            ProcessMessageError::StorageError(e) => MlsError::Storage(format!("{e:?}")),
            ProcessMessageError::LibraryError(e) => MlsError::Internal(e.to_string()),
            other => MlsError::Refused(other.to_string()),
        }
    }

    /// Sorts a failure to join from a Welcome: our store, our bug, or the Welcome.
    fn from_welcome<S: std::fmt::Debug>(error: WelcomeError<S>) -> Self
    where
        WelcomeError<S>: std::fmt::Display,
    {
        match error {
            WelcomeError::StorageError(e) => MlsError::Storage(format!("{e:?}")),
            WelcomeError::LibraryError(e) => MlsError::Internal(e.to_string()),
            other => MlsError::Refused(other.to_string()),
        }
    }

    /// Sorts a failure to apply a commit that already validated: never the message's fault.
    fn from_merge<S: std::fmt::Debug>(error: MergeCommitError<S>) -> Self {
        match error {
            MergeCommitError::StorageError(e) => MlsError::Storage(format!("{e:?}")),
            MergeCommitError::LibraryError(e) => MlsError::Internal(e.to_string()),
        }
    }
}

/// TLS-serialised KeyPackages (as `MLSMessage`s) ready to upload.
#[derive(Debug)]
pub struct KeyPackages {
    /// Handed out once each.
    pub one_time: Vec<Vec<u8>>,
    /// Handed out when the stock is empty.
    pub last_resort: Option<Vec<u8>>,
}

/// A commit ready to send. Apply it with [`MlsDevice::confirm_commit`] once the server accepted
/// it, or drop it with [`MlsDevice::discard_commit`] if the server refused it.
#[derive(Debug)]
pub struct Commit {
    /// The group.
    pub group: GroupId,
    /// The epoch the commit was made in (the server orders commits by it).
    pub epoch: u64,
    /// TLS-serialised commit message.
    pub message: Vec<u8>,
    /// Devices that must receive the commit: every member but the sender, removed ones included.
    pub recipients: Vec<Member>,
    /// Welcome for added members, if any.
    pub welcome: Option<Vec<u8>>,
    /// Added devices, who receive the Welcome.
    pub added: Vec<Member>,
    /// Removed devices.
    pub removed: Vec<Member>,
}

/// An application message ready to send.
#[derive(Debug)]
pub struct Outgoing {
    /// TLS-serialised MLS PrivateMessage.
    pub message: Vec<u8>,
    /// Every member device but the sender.
    pub recipients: Vec<Member>,
}

/// What a received message did.
#[derive(Debug)]
pub enum Incoming {
    /// This device was added to a group.
    Joined {
        /// The group.
        group: GroupId,
        /// Who added us.
        by: Member,
        /// Members after joining (including us).
        members: Vec<Member>,
    },
    /// An application message (still padded content).
    Application {
        /// The group.
        group: GroupId,
        /// The authenticated sender.
        sender: Member,
        /// Decrypted, padded content.
        plaintext: Vec<u8>,
        /// The sender device's MLS signature public key, which checks its franking signature.
        sender_signature_key: Vec<u8>,
        /// The sender device's encoded [`DeviceCredential`], kept with franking evidence.
        sender_credential: Vec<u8>,
    },
    /// Another member's commit changed the group.
    Commit {
        /// The group.
        group: GroupId,
        /// Who committed.
        by: Member,
        /// Devices added.
        added: Vec<Member>,
        /// Devices removed.
        removed: Vec<Member>,
        /// True if this device was removed: it can read nothing more in this group.
        self_removed: bool,
    },
    /// A proposal or other handshake message that changes nothing visible yet.
    Other {
        /// The group.
        group: GroupId,
    },
}

/// One device's MLS state machine over an OpenMLS provider.
pub struct MlsDevice<P: OpenMlsProvider> {
    provider: P,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    me: Member,
}

impl<P: OpenMlsProvider> MlsDevice<P> {
    /// Creates a fresh MLS signature key for a device, stores it in the provider and returns its
    /// public key (the caller keeps it to reopen the device later).
    pub fn generate_signature_key(provider: &P) -> Result<Vec<u8>, MlsError> {
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm())
            .map_err(|e| MlsError::Storage(format!("{e:?}")))?;
        signer
            .store(provider.storage())
            .map_err(|e| MlsError::Storage(format!("{e:?}")))?;
        Ok(signer.to_public_vec())
    }

    /// Opens a device whose signature key is in the provider's storage.
    pub fn open(
        provider: P,
        identity: &AccountIdentity,
        account: AccountId,
        device: DeviceId,
        signature_public_key: &[u8],
    ) -> Result<Self, MlsError> {
        let me = Member {
            account,
            device,
            identity_key: identity.public_key(),
            signature_key: signature_public_key
                .try_into()
                .map_err(|_| MlsError::Storage("the device signature key is not 32 bytes".into()))?,
        };
        let signer = SignatureKeyPair::read(
            provider.storage(),
            signature_public_key,
            CIPHERSUITE.signature_algorithm(),
        )
        .ok_or_else(|| MlsError::Storage("device signature key missing from the client store".into()))?;
        let device_credential = identity.certify_device(me.account, me.device, signature_public_key);
        let credential = CredentialWithKey {
            credential: BasicCredential::new(device_credential.encode()).into(),
            signature_key: signature_public_key.to_vec().into(),
        };
        Ok(Self {
            provider,
            signer,
            credential,
            me,
        })
    }

    /// The provider (for the caller's transactions around MLS calls).
    pub fn provider(&self) -> &P {
        &self.provider
    }

    /// This device.
    pub fn me(&self) -> Member {
        self.me
    }

    /// This device's MLS signature public key and its encoded [`DeviceCredential`], which let
    /// others check what it signed with [`Self::sign_labelled`].
    pub fn signing_identity(&self) -> (Vec<u8>, Vec<u8>) {
        (
            self.credential.signature_key.as_slice().to_vec(),
            BasicCredential::try_from(self.credential.credential.clone())
                .expect("this device's own credential is a basic credential")
                .identity()
                .to_vec(),
        )
    }

    /// Makes `count` one-time KeyPackages and, if asked, one last-resort KeyPackage.
    pub fn key_packages(&self, count: usize, last_resort: bool) -> Result<KeyPackages, MlsError> {
        let make = |last: bool| -> Result<Vec<u8>, MlsError> {
            // The last-resort extension must be listed in the leaf's capabilities, or
            // validation of the key package refuses it.
            let capabilities = Capabilities::new(None, None, Some(&[ExtensionType::LastResort]), None, None);
            let mut builder = KeyPackage::builder().leaf_node_capabilities(capabilities);
            if last {
                builder = builder.mark_as_last_resort();
            }
            let bundle = builder
                .build(CIPHERSUITE, &self.provider, &self.signer, self.credential.clone())
                .map_err(|e| MlsError::Storage(format!("{e:?}")))?;
            serialize(&MlsMessageOut::from(bundle.key_package().clone()))
        };
        let one_time = (0..count).map(|_| make(false)).collect::<Result<Vec<_>, _>>()?;
        let last = if last_resort { Some(make(true)?) } else { None };
        Ok(KeyPackages {
            one_time,
            last_resort: last,
        })
    }

    /// Parses a claimed KeyPackage and checks its signature, lifetime and device certificate, and
    /// that it belongs to the device the server said it does. Returns the certified member too.
    pub fn verify_key_package(
        &self,
        bytes: &[u8],
        account: AccountId,
        device: DeviceId,
    ) -> Result<(KeyPackage, Member), MlsError> {
        let message = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Malformed(e.to_string()))?;
        let key_package_in = match message.extract() {
            MlsMessageBodyIn::KeyPackage(kp) => kp,
            _ => return Err(MlsError::Malformed("not a key package".into())),
        };
        let key_package = key_package_in
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|e| MlsError::Refused(e.to_string()))?;
        if key_package.ciphersuite() != CIPHERSUITE {
            return Err(MlsError::Refused("key package uses another ciphersuite".into()));
        }
        let member = member_of(
            key_package.leaf_node().credential(),
            key_package.leaf_node().signature_key().as_slice(),
        )?;
        if (member.account, member.device) != (account, device) {
            return Err(MlsError::KeyPackageMismatch);
        }
        Ok((key_package, member))
    }

    /// Creates a new group with only this device in it.
    pub fn create_group(&self, group: GroupId) -> Result<(), MlsError> {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            openmls::group::GroupId::from_slice(group.as_bytes()),
            self.credential.clone(),
        )
        .map_err(|e| MlsError::Storage(format!("{e:?}")))?;
        Ok(())
    }

    /// Members of a group this device is in.
    pub fn members(&self, group: GroupId) -> Result<Vec<Member>, MlsError> {
        let mls_group = self.load(group)?;
        mls_group
            .members()
            .map(|m| member_of(&m.credential, &m.signature_key))
            .collect()
    }

    /// The group's current epoch.
    pub fn epoch(&self, group: GroupId) -> Result<u64, MlsError> {
        Ok(self.load(group)?.epoch().as_u64())
    }

    /// Whether this device is an active member of `group`.
    pub fn is_member(&self, group: GroupId) -> bool {
        self.load(group).is_ok_and(|g| g.is_active())
    }

    /// Commits adding the devices behind verified KeyPackages.
    pub fn add_members(&self, group: GroupId, key_packages: &[KeyPackage]) -> Result<Commit, MlsError> {
        let mut mls_group = self.load(group)?;
        if mls_group.members().count() + key_packages.len() > MAX_GROUP_MEMBERS {
            return Err(MlsError::GroupTooLarge);
        }
        let added = key_packages
            .iter()
            .map(|kp| member_of(kp.leaf_node().credential(), kp.leaf_node().signature_key().as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        let recipients = self.others(&mls_group)?;
        let epoch = mls_group.epoch().as_u64();
        let (commit, welcome, _) = mls_group
            .add_members(&self.provider, &self.signer, key_packages)
            .map_err(|e| MlsError::Refused(e.to_string()))?;
        Ok(Commit {
            group,
            epoch,
            message: serialize(&commit)?,
            recipients,
            welcome: Some(serialize(&welcome)?),
            added,
            removed: vec![],
        })
    }

    /// Commits removing every device of the given members.
    pub fn remove_members(&self, group: GroupId, removed: &[Member]) -> Result<Commit, MlsError> {
        let mut mls_group = self.load(group)?;
        let (indices, removed): (Vec<_>, Vec<_>) = mls_group
            .members()
            .filter_map(|m| {
                member_of(&m.credential, &m.signature_key)
                    .ok()
                    .filter(|member| removed.contains(member))
                    .map(|member| (m.index, member))
            })
            .unzip();
        if indices.is_empty() {
            return Err(MlsError::Refused("none of these devices is a member".into()));
        }
        let recipients = self.others(&mls_group)?;
        let epoch = mls_group.epoch().as_u64();
        let (commit, _, _) = mls_group
            .remove_members(&self.provider, &self.signer, &indices)
            .map_err(|e| MlsError::Refused(e.to_string()))?;
        Ok(Commit {
            group,
            epoch,
            message: serialize(&commit)?,
            recipients,
            welcome: None,
            added: vec![],
            removed,
        })
    }

    /// Applies this device's pending commit after the server accepted it.
    pub fn confirm_commit(&self, group: GroupId) -> Result<(), MlsError> {
        let mut mls_group = self.load(group)?;
        mls_group
            .merge_pending_commit(&self.provider)
            .map_err(|e| MlsError::Storage(format!("{e:?}")))
    }

    /// Drops this device's pending commit after the server refused it.
    pub fn discard_commit(&self, group: GroupId) -> Result<(), MlsError> {
        let mut mls_group = self.load(group)?;
        mls_group
            .clear_pending_commit(self.provider.storage())
            .map_err(|e| MlsError::Storage(format!("{e:?}")))
    }

    /// Encrypts padded content for every other member.
    pub fn encrypt(&self, group: GroupId, plaintext: &[u8]) -> Result<Outgoing, MlsError> {
        let mut mls_group = self.load(group)?;
        if !mls_group.is_active() {
            return Err(MlsError::NotMember);
        }
        let recipients = self.others(&mls_group)?;
        let message = mls_group
            .create_message(&self.provider, &self.signer, plaintext)
            .map_err(|e| MlsError::Refused(e.to_string()))?;
        Ok(Outgoing {
            message: serialize(&message)?,
            recipients,
        })
    }

    /// Signs Fumi-labelled bytes (a franking commitment, an abuse report) with this device's MLS
    /// signature key. Every such message starts with a "fumi ..." label, so it can never be taken
    /// for an MLS structure (whose signed content starts with a length below 0x40).
    pub fn sign_labelled(&self, message: &[u8]) -> Result<[u8; 64], MlsError> {
        use openmls_traits::signatures::Signer as _;
        self.signer
            .sign(message)
            .ok()
            .and_then(|signature| signature.try_into().ok())
            .ok_or_else(|| MlsError::Refused("signing failed".into()))
    }

    /// Processes one message from this device's mailbox.
    pub fn handle_message(&self, bytes: &[u8]) -> Result<Incoming, MlsError> {
        let message = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| MlsError::Malformed(e.to_string()))?;
        match message.extract() {
            MlsMessageBodyIn::Welcome(welcome) => self.handle_welcome(welcome),
            MlsMessageBodyIn::PrivateMessage(m) => self.handle_protocol_message(m.into()),
            MlsMessageBodyIn::PublicMessage(m) => self.handle_protocol_message(m.into()),
            _ => Err(MlsError::Malformed("unexpected MLS message type in a mailbox".into())),
        }
    }

    fn handle_welcome(&self, welcome: Welcome) -> Result<Incoming, MlsError> {
        let config = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let staged =
            StagedWelcome::new_from_welcome(&self.provider, &config, welcome, None).map_err(MlsError::from_welcome)?;
        let sender = staged.welcome_sender().map_err(|e| MlsError::Internal(e.to_string()))?;
        let by = member_of(sender.credential(), sender.signature_key().as_slice())?;
        let members = staged
            .members()
            .map(|m| member_of(&m.credential, &m.signature_key))
            .collect::<Result<Vec<_>, _>>()?;
        if members.len() > MAX_GROUP_MEMBERS {
            return Err(MlsError::GroupTooLarge);
        }
        let mls_group = staged.into_group(&self.provider).map_err(MlsError::from_welcome)?;
        let group = fumi_group_id(mls_group.group_id())?;
        Ok(Incoming::Joined { group, by, members })
    }

    fn handle_protocol_message(&self, message: ProtocolMessage) -> Result<Incoming, MlsError> {
        let group = fumi_group_id(message.group_id())?;
        let mut mls_group = self.load(group)?;
        let processed = mls_group
            .process_message(&self.provider, message)
            .map_err(MlsError::from_processing)?;
        let commit_sender = processed.sender().clone();
        let signature_key = sender_signature_key(&mls_group, processed.sender())?;
        let sender = member_of(processed.credential(), &signature_key)?;
        let credential = BasicCredential::try_from(processed.credential().clone())
            .map_err(|_| CredentialError::Malformed)?
            .identity()
            .to_vec();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Ok(Incoming::Application {
                group,
                sender,
                plaintext: app.into_bytes(),
                sender_signature_key: signature_key,
                sender_credential: credential,
            }),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                // OpenMLS lets a member replace its leaf with any validly signed credential; a
                // Fumi member may refresh its keys but never become another account or device.
                if let Some(leaf) = staged.update_path_leaf_node() {
                    check_same_member(&mls_group, &commit_sender, leaf)?;
                }
                for update in staged.update_proposals() {
                    check_same_member(&mls_group, update.sender(), update.update_proposal().leaf_node())?;
                }
                let added = staged
                    .add_proposals()
                    .map(|p| {
                        let leaf = p.add_proposal().key_package().leaf_node();
                        member_of(leaf.credential(), leaf.signature_key().as_slice())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let removed = staged
                    .remove_proposals()
                    .filter_map(|p| mls_group.member_at(p.remove_proposal().removed()))
                    .map(|m| member_of(&m.credential, &m.signature_key))
                    .collect::<Result<Vec<_>, _>>()?;
                let self_removed = staged.self_removed();
                if mls_group.members().count() + added.len() > MAX_GROUP_MEMBERS + removed.len() {
                    return Err(MlsError::GroupTooLarge);
                }
                mls_group
                    .merge_staged_commit(&self.provider, *staged)
                    .map_err(MlsError::from_merge)?;
                Ok(Incoming::Commit {
                    group,
                    by: sender,
                    added,
                    removed,
                    self_removed,
                })
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                // Fumi clients always commit their proposals at once; a stray proposal is kept
                // so that the commit that references it can be processed.
                mls_group
                    .store_pending_proposal(self.provider.storage(), *proposal)
                    .map_err(|e| MlsError::Storage(format!("{e:?}")))?;
                Ok(Incoming::Other { group })
            }
            _ => Ok(Incoming::Other { group }),
        }
    }

    fn load(&self, group: GroupId) -> Result<MlsGroup, MlsError> {
        MlsGroup::load(
            self.provider.storage(),
            &openmls::group::GroupId::from_slice(group.as_bytes()),
        )
        .map_err(|e| MlsError::Storage(format!("{e:?}")))?
        .ok_or(MlsError::UnknownGroup)
    }

    fn others(&self, mls_group: &MlsGroup) -> Result<Vec<Member>, MlsError> {
        let own = mls_group.own_leaf_index();
        mls_group
            .members()
            .filter(|m| m.index != own)
            .map(|m| member_of(&m.credential, &m.signature_key))
            .collect()
    }
}

/// Reads and verifies the Fumi identity of an MLS credential.
fn member_of(credential: &Credential, signature_key: &[u8]) -> Result<Member, MlsError> {
    let basic = BasicCredential::try_from(credential.clone()).map_err(|_| CredentialError::Malformed)?;
    let device = DeviceCredential::verify(basic.identity(), signature_key)?;
    Ok(Member {
        identity_key: device.identity_key,
        account: device.account,
        device: device.device,
        signature_key: signature_key.try_into().map_err(|_| CredentialError::Malformed)?,
    })
}

/// Checks that `leaf`, replacing the leaf of `sender`, certifies the same account, device and
/// identity key.
fn check_same_member(group: &MlsGroup, sender: &Sender, leaf: &LeafNode) -> Result<(), MlsError> {
    let Sender::Member(index) = sender else {
        return Err(MlsError::Refused("only members may update a leaf".into()));
    };
    let before = group
        .member_at(*index)
        .ok_or_else(|| MlsError::Refused("update of an unknown leaf".into()))?;
    let before = member_of(&before.credential, &before.signature_key)?;
    let after = member_of(leaf.credential(), leaf.signature_key().as_slice())?;
    if before != after {
        return Err(MlsError::Refused(
            "a member tried to change the account, device or identity key of its leaf".into(),
        ));
    }
    Ok(())
}

fn sender_signature_key(group: &MlsGroup, sender: &Sender) -> Result<Vec<u8>, MlsError> {
    match sender {
        Sender::Member(index) => group
            .member_at(*index)
            .map(|m| m.signature_key)
            .ok_or_else(|| MlsError::Refused("sender is not a member".into())),
        _ => Err(MlsError::Refused("only members may send in a Fumi group".into())),
    }
}

fn fumi_group_id(id: &openmls::group::GroupId) -> Result<GroupId, MlsError> {
    GroupId::from_slice(id.as_slice()).map_err(|_| MlsError::Malformed("group id is not 16 bytes".into()))
}

fn serialize(message: &MlsMessageOut) -> Result<Vec<u8>, MlsError> {
    message
        .tls_serialize_detached()
        .map_err(|e| MlsError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openmls_rust_crypto::OpenMlsRustCrypto;

    fn device(n: u8) -> MlsDevice<OpenMlsRustCrypto> {
        crate::machine::testing::device(n).0
    }

    #[test]
    fn last_resort_key_package_is_accepted_and_a_pair_talks() {
        let alice = device(1);
        let bob = device(2);
        let packages = bob.key_packages(0, true).unwrap();
        assert!(packages.one_time.is_empty());
        let (key_package, member) = alice
            .verify_key_package(
                packages.last_resort.as_ref().unwrap(),
                bob.me().account,
                bob.me().device,
            )
            .unwrap();
        assert_eq!(member, bob.me());

        let group = GroupId::from_bytes([7; 16]);
        alice.create_group(group).unwrap();
        let commit = alice.add_members(group, &[key_package]).unwrap();
        assert_eq!(
            (commit.epoch, commit.recipients.len(), commit.added.clone()),
            (0, 0, vec![bob.me()])
        );
        alice.confirm_commit(group).unwrap();
        match bob.handle_message(commit.welcome.as_ref().unwrap()).unwrap() {
            Incoming::Joined {
                group: joined,
                by,
                members,
            } => {
                assert_eq!((joined, by), (group, alice.me()));
                assert_eq!(members.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        let outgoing = alice.encrypt(group, b"padded content").unwrap();
        assert_eq!(outgoing.recipients, vec![bob.me()]);
        match bob.handle_message(&outgoing.message).unwrap() {
            Incoming::Application { sender, plaintext, .. } => {
                assert_eq!((sender, plaintext.as_slice()), (alice.me(), &b"padded content"[..]));
            }
            other => panic!("{other:?}"),
        }
        // A replayed message is refused, not delivered twice.
        assert!(matches!(
            bob.handle_message(&outgoing.message),
            Err(MlsError::Refused(_))
        ));
    }

    /// A pair in one group: Alice created it and added Bob, who joined.
    fn pair() -> (MlsDevice<OpenMlsRustCrypto>, MlsDevice<OpenMlsRustCrypto>, GroupId) {
        let alice = device(1);
        let bob = device(2);
        let packages = bob.key_packages(1, false).unwrap();
        let (key_package, _) = alice
            .verify_key_package(&packages.one_time[0], bob.me().account, bob.me().device)
            .unwrap();
        let group = GroupId::from_bytes([7; 16]);
        alice.create_group(group).unwrap();
        let commit = alice.add_members(group, &[key_package]).unwrap();
        alice.confirm_commit(group).unwrap();
        bob.handle_message(commit.welcome.as_ref().unwrap()).unwrap();
        (alice, bob, group)
    }

    #[test]
    fn a_member_cannot_become_another_account_by_updating_its_leaf() {
        let (alice, bob, group) = pair();
        // Bob commits a self-update whose new leaf carries a validly signed credential for
        // another account (certified by an identity key Bob controls).
        let other = AccountIdentity::generate(&mut rand::rng());
        let new_signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
        new_signer.store(bob.provider.storage()).unwrap();
        let forged = other.certify_device(
            AccountId::from_bytes([9; 16]),
            DeviceId::from_bytes([9; 16]),
            &new_signer.to_public_vec(),
        );
        let mut bobs_group = bob.load(group).unwrap();
        let bundle = bobs_group
            .self_update_with_new_signer(
                &bob.provider,
                &bob.signer,
                NewSignerBundle {
                    signer: &new_signer,
                    credential_with_key: CredentialWithKey {
                        credential: BasicCredential::new(forged.encode()).into(),
                        signature_key: new_signer.to_public_vec().into(),
                    },
                },
                LeafNodeParameters::default(),
            )
            .unwrap();
        let commit = serialize(&bundle.into_commit()).unwrap();
        match alice.handle_message(&commit) {
            Err(MlsError::Refused(reason)) => assert!(reason.contains("change the account"), "{reason}"),
            other => panic!("a leaf swapped to another account was accepted: {other:?}"),
        }
        // A plain key refresh by the same member is still fine.
        let (alice, bob, group) = pair();
        let mut bobs_group = bob.load(group).unwrap();
        let bundle = bobs_group
            .self_update(&bob.provider, &bob.signer, LeafNodeParameters::default())
            .unwrap();
        let commit = serialize(&bundle.into_commit()).unwrap();
        assert!(matches!(alice.handle_message(&commit), Ok(Incoming::Commit { .. })));
    }

    #[test]
    fn key_package_for_another_device_is_refused() {
        let alice = device(1);
        let bob = device(2);
        let packages = bob.key_packages(1, false).unwrap();
        let other = DeviceId::from_bytes([9; 16]);
        assert!(matches!(
            alice.verify_key_package(&packages.one_time[0], bob.me().account, other),
            Err(MlsError::KeyPackageMismatch)
        ));
        assert!(matches!(
            alice.verify_key_package(b"garbage", bob.me().account, other),
            Err(MlsError::Malformed(_))
        ));
    }
}
