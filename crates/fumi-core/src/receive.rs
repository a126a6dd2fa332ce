//! The receive step of the client machine (docs/ARCHITECTURE.md, "The client machine"): one
//! envelope from this device's mailbox, applied to the MLS state and the client store in one
//! store transaction. The step says whether the envelope may be acknowledged, and it says so only
//! after what it produced was committed: a failure of this device's own store (inside OpenMLS or
//! not) aborts the step and acknowledges nothing, so the envelope comes again. An envelope that is
//! itself at fault (garbage, a forged sender, a message for a group this device left) is recorded
//! as processed and acknowledged, so it cannot block the mailbox.
//!
//! No clock, network or file: the caller passes the time and the randomness, and performs the
//! acknowledgement.

use fumi_proto::{AccountId, DeviceId, GroupId, MessageId};
use openmls_traits::OpenMlsProvider;
use thiserror::Error;

use crate::content::Body;
use crate::form::Answers;
use crate::machine::Machine;
use crate::message;
use crate::mls::{Incoming, Member, MlsError};
use crate::store::{ClientStore, Conversation, FileView, StoreError, StoredMessage, SubmissionRecord};
use crate::username::Username;

/// Why an envelope could not be applied.
#[derive(Debug, Error)]
pub enum ReceiveError {
    /// This device's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An MLS operation failed (this device's fault if [`MlsError::is_local`]).
    #[error(transparent)]
    Mls(#[from] MlsError),
    /// The envelope breaks a rule of the protocol.
    #[error("{0}")]
    Refused(String),
    /// A member presented another identity key than the one pinned for its account (`own`: a
    /// device claiming to be this account's); `verified`: the user had verified the pinned key.
    #[error("a member presented another identity key than the pinned one")]
    IdentityKeyChanged {
        /// The account.
        account: AccountId,
        /// It claims to be this device's own account.
        own: bool,
        /// The user verified the pinned key in person.
        verified: bool,
    },
}

impl ReceiveError {
    /// Whether this device is at fault (its store, its code) rather than the envelope.
    pub fn is_local(&self) -> bool {
        match self {
            ReceiveError::Store(_) => true,
            ReceiveError::Mls(error) => error.is_local(),
            _ => false,
        }
    }
}

/// Devices that joined a group (or whose group this device joined), to be checked against the
/// key directory. Kept in the store with the message (`add_pending_arrival`), so no crash can
/// skip the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// The group.
    pub group: GroupId,
    /// This device joined it (a Welcome).
    pub joined: bool,
    /// The devices to check.
    pub members: Vec<Member>,
}

/// What one envelope came to. Every variant may be acknowledged: its effects are committed.
#[derive(Debug)]
pub enum Outcome {
    /// Applied; with the devices it brought, if any.
    Applied(Option<Arrival>),
    /// Processed before (a redelivery after a lost acknowledgement): nothing changed.
    AlreadyProcessed,
    /// At fault itself: recorded as processed, nothing else changed.
    Dropped(ReceiveError),
}

impl<P: OpenMlsProvider, S: ClientStore> Machine<'_, P, S> {
    /// Processes the envelope with delivery number `seq` in one store transaction. `Err` only
    /// for a failure of this device: then nothing was stored and the envelope must not be
    /// acknowledged.
    pub fn handle_envelope(
        &self,
        seq: u64,
        bytes: &[u8],
        now: u64,
        rng: &mut impl rand::RngCore,
    ) -> Result<Outcome, ReceiveError> {
        if self.store.is_processed(seq)? {
            return Ok(Outcome::AlreadyProcessed);
        }
        let applied = self.store.in_transaction(|| {
            let arrival = self.apply(bytes, now, rng)?;
            if let Some(arrival) = &arrival {
                self.store.add_pending_arrival(arrival.group, &arrival.members)?;
            }
            self.store.mark_processed(seq, now)?;
            Ok::<_, ReceiveError>(arrival)
        });
        match applied {
            Ok(arrival) => Ok(Outcome::Applied(arrival)),
            Err(error) if error.is_local() => Err(error),
            Err(error) => {
                self.store.in_transaction(|| self.store.mark_processed(seq, now))?;
                Ok(Outcome::Dropped(error))
            }
        }
    }

    /// Applies one received message to the MLS state and the store.
    fn apply(&self, bytes: &[u8], now: u64, rng: &mut impl rand::RngCore) -> Result<Option<Arrival>, ReceiveError> {
        let me = self.me;
        match self.device.handle_message(bytes)? {
            Incoming::Joined { group, by, members } => {
                for member in members.iter().chain([&by]) {
                    self.check_pin(member)?;
                }
                let distinct: Vec<AccountId> = distinct_accounts(&members).into_iter().filter(|a| *a != me).collect();
                let direct = distinct.len() == 1;
                let conversation = Conversation {
                    group_id: group,
                    direct,
                    name: None,
                    peer: direct.then(|| distinct[0]),
                    active: true,
                    expire_after_ms: None,
                };
                self.store.insert_conversation(&conversation, now)?;
                let text = if by.account == me {
                    "your other device added this device to the conversation".to_owned()
                } else {
                    format!("{} added you", mention(by.account))
                };
                self.store_event(group, by.account, &text, now, rng)?;
                Ok(Some(Arrival {
                    group,
                    joined: true,
                    members,
                }))
            }
            Incoming::Application {
                group,
                sender,
                plaintext,
                sender_signature_key,
                sender_credential,
            } => {
                // The sender's leaf must still be certified by its account's pinned key.
                self.check_pin(&sender)?;
                // A text or file message must be reportable: its franking proof must open.
                let from = message::Sender {
                    group,
                    account: sender.account,
                    device: sender.device,
                };
                let (content, evidence) = message::open(from, &plaintext, &sender_signature_key, &sender_credential)
                    .map_err(|e| ReceiveError::Refused(e.to_string()))?;
                let keep_evidence = |local_id: Option<i64>| -> Result<(), ReceiveError> {
                    match (local_id, &evidence) {
                        (Some(local_id), Some(evidence)) if sender.account != me => {
                            Ok(self.store.keep_franking_evidence(local_id, evidence)?)
                        }
                        _ => Ok(()),
                    }
                };
                if sender.account == me {
                    // Another of our devices changed the profile (name, avatar): follow it.
                    if sender.device != self.my_device {
                        self.store
                            .adopt_own_profile_key(&content.profile_key, content.sent_at)?;
                    }
                } else {
                    self.store
                        .set_profile_key(sender.account, &content.profile_key, content.sent_at)?;
                }
                let received = |text: String, is_event: bool, attachment: Option<FileView>| StoredMessage {
                    local_id: 0,
                    id: content.id,
                    group_id: group,
                    sender: sender.account,
                    is_event,
                    text,
                    sent_at: content.sent_at,
                    outgoing: sender.account == me && !is_event,
                    attachment,
                    expires_at: content.expire_after_ms.map(|ms| now + ms),
                };
                match content.body {
                    Body::Text { text } => {
                        let local_id = self.store.insert_message(&received(text, false, None), false, now)?;
                        keep_evidence(local_id)?;
                    }
                    Body::File { attachment, caption } => {
                        let view = FileView::pending(&attachment);
                        let message = received(caption.unwrap_or_default(), false, Some(view));
                        let local_id = self.store.insert_message(&message, false, now)?;
                        if let Some(local_id) = local_id {
                            self.store.add_download(local_id, &attachment)?;
                        }
                        keep_evidence(local_id)?;
                    }
                    Body::Timer { expire_after_ms } => {
                        self.store.set_expire_after(group, expire_after_ms)?;
                        let text = timer_event(&mention(sender.account), expire_after_ms);
                        self.store_event(group, sender.account, &text, now, rng)?;
                    }
                    Body::Conversation { name, profiles } => {
                        let members = self.device.members(group)?;
                        for profile in profiles {
                            // Another member may only introduce a key we lack, never replace one:
                            // each account announces its own key in its own messages.
                            if profile.account != me
                                && members.iter().any(|m| m.account == profile.account)
                                && !self.store.has_profile_key(profile.account)?
                            {
                                self.store.set_profile_key(profile.account, &profile.profile_key, 0)?;
                            }
                        }
                        let peer = if name.is_none() {
                            members.iter().map(|m| m.account).find(|a| *a != me)
                        } else {
                            None
                        };
                        let name = name
                            .map(|n| validate_group_name(&n).map_err(ReceiveError::Refused))
                            .transpose()?;
                        self.store
                            .update_conversation(group, name.is_none(), name.as_deref(), peer)?;
                    }
                    Body::Unknown => {
                        let message = received("(a message this version of fumi cannot show)".into(), true, None);
                        self.store.insert_message(&message, false, now)?;
                    }
                    // The profile key in every content is all an introduction carries.
                    Body::Introduction => {}
                    Body::FormSubmission {
                        channel,
                        form_id,
                        answers,
                    } => {
                        let record = SubmissionRecord {
                            id: content.id,
                            channel,
                            form_id,
                            group,
                            submitter: sender.account,
                            answers,
                            sent_at: content.sent_at,
                            outgoing: sender.account == me,
                            receipt_at: None,
                        };
                        self.handle_form_submission(record, now)?;
                    }
                    Body::FormReceipt { submission } => self.handle_form_receipt(&sender, submission, now)?,
                }
                Ok(None)
            }
            Incoming::Commit {
                group,
                by,
                added,
                removed,
                self_removed,
            } => {
                self.check_pin(&by)?;
                if self_removed {
                    self.store.deactivate_conversation(group)?;
                    let text = format!(
                        "{} removed you; you will receive nothing more in this conversation",
                        mention(by.account)
                    );
                    self.store_event(group, by.account, &text, now, rng)?;
                    return Ok(None);
                }
                // Every device added, including another of the adder's own, must be certified by
                // its account's pinned identity key.
                for member in &added {
                    self.check_pin(member)?;
                }
                // A device of ours removed anywhere is never added back by this device.
                for member in removed.iter().filter(|m| m.account == me) {
                    self.store.revoke_device(member.device, now)?;
                }
                if let Some(change) = describe_change(by.account, &added, &removed, "their") {
                    let text = format!("{} {change}", mention(by.account));
                    self.store_event(group, by.account, &text, now, rng)?;
                }
                self.learn_own_devices(&by, &added, now)?;
                Ok((!added.is_empty()).then_some(Arrival {
                    group,
                    joined: false,
                    members: added,
                }))
            }
            Incoming::Other { .. } => Ok(None),
        }
    }

    /// Refuses a member whose identity key differs from the one pinned for its account (for this
    /// account, from its own key). Pins nothing: pinning waits for the key directory.
    pub fn check_pin(&self, member: &Member) -> Result<(), ReceiveError> {
        if member.account == self.me {
            return self.check_identity(member);
        }
        match self.store.pinned_identity_key(member.account)? {
            Some(pinned) if pinned != member.identity_key => Err(self.identity_changed(member.account)?),
            _ => Ok(()),
        }
    }

    /// Refuses a member whose identity key differs from the one pinned for its account; pins it
    /// on first sight (call only once the key directory confirmed the key).
    pub fn check_identity(&self, member: &Member) -> Result<(), ReceiveError> {
        if member.account == self.me {
            return if member.identity_key == self.identity_key {
                Ok(())
            } else {
                Err(ReceiveError::IdentityKeyChanged {
                    account: member.account,
                    own: true,
                    verified: false,
                })
            };
        }
        if self.store.check_identity_key(member.account, &member.identity_key)? {
            Ok(())
        } else {
            Err(self.identity_changed(member.account)?)
        }
    }

    fn identity_changed(&self, account: AccountId) -> Result<ReceiveError, StoreError> {
        Ok(ReceiveError::IdentityKeyChanged {
            account,
            own: false,
            verified: self.store.is_verified(account)?,
        })
    }

    /// Devices of this account that this device trusts, with their signature keys where known:
    /// itself, devices it linked, devices its trusted devices linked or added. A store from
    /// before key transparency starts from the devices of this account in its conversations.
    pub fn trusted_own_devices(
        &self,
        now: u64,
    ) -> Result<std::collections::HashMap<DeviceId, Option<[u8; 32]>>, ReceiveError> {
        let known = self.store.known_devices()?;
        if !known.is_empty() {
            return Ok(known);
        }
        self.store
            .know_device(self.my_device, Some(&self.device.me().signature_key), now)?;
        for conversation in self.store.conversations()? {
            if !self.device.is_member(conversation.group_id) {
                continue;
            }
            for member in self.device.members(conversation.group_id)? {
                if member.account == self.me {
                    self.store
                        .know_device(member.device, Some(&member.signature_key), now)?;
                }
            }
        }
        Ok(self.store.known_devices()?)
    }

    /// A trusted device of this account added devices of this account: they are ours.
    fn learn_own_devices(&self, by: &Member, added: &[Member], now: u64) -> Result<(), ReceiveError> {
        if by.account != self.me || !self.trusted_own_devices(now)?.contains_key(&by.device) {
            return Ok(());
        }
        for member in added.iter().filter(|m| m.account == self.me) {
            self.store
                .know_device(member.device, Some(&member.signature_key), now)?;
        }
        Ok(())
    }

    fn store_event(
        &self,
        group: GroupId,
        by: AccountId,
        text: &str,
        now: u64,
        rng: &mut impl rand::RngCore,
    ) -> Result<(), StoreError> {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let event = StoredMessage {
            local_id: 0,
            id: MessageId::from_bytes(id),
            group_id: group,
            sender: by,
            is_event: true,
            text: text.to_owned(),
            sent_at: now,
            outgoing: false,
            attachment: None,
            expires_at: None,
        };
        self.store.insert_message(&event, false, now)?;
        Ok(())
    }

    /// A form submission arrived in a 1:1 conversation: sent by another of our devices, or to a
    /// form of a channel this account runs (checked against the form if this device has it).
    fn handle_form_submission(&self, record: SubmissionRecord, now: u64) -> Result<(), ReceiveError> {
        let direct = self.store.conversation(record.group)?.is_some_and(|c| c.direct);
        if !direct {
            return Err(ReceiveError::Refused(
                "a form submission outside a 1:1 conversation".into(),
            ));
        }
        if record.submitter == self.me {
            // Sent by another of our devices.
            return Ok(self.store.insert_submission(&record, now)?);
        }
        if !self.store.channel_row(record.channel)?.is_some_and(|r| r.own) {
            return Err(ReceiveError::Refused(
                "a submission to a form of a channel we do not run".into(),
            ));
        }
        // A staff device that has not fetched the form yet keeps the submission: the export
        // checks it against the form.
        if let Some(definition) = self.store.form_definition(record.channel, &record.form_id)? {
            check_answers(&definition, &record.answers)?;
        }
        Ok(self.store.insert_submission(&record, now)?)
    }

    /// A staff device confirmed one of our submissions.
    fn handle_form_receipt(&self, sender: &Member, submission: MessageId, now: u64) -> Result<(), ReceiveError> {
        if sender.account == self.me {
            return Ok(());
        }
        Ok(self.store.set_receipt(submission, now)?)
    }
}

fn check_answers(definition: &crate::form::FormDefinition, answers: &Answers) -> Result<(), ReceiveError> {
    definition
        .check_answers(answers)
        .map_err(|e| ReceiveError::Refused(format!("a submission that does not fit its form: {e}")))
}

/// How an event names an account until it is shown: `{@<account id>}`, replaced by the
/// account's current name when displayed.
pub fn mention(account: AccountId) -> String {
    format!("{{@{account}}}")
}

/// "added X, removed Y" for a commit by `by`; devices of `by`'s own account are named as such.
pub fn describe_change(by: AccountId, added: &[Member], removed: &[Member], possessive: &str) -> Option<String> {
    let mut parts = Vec::new();
    let (own_added, others_added): (Vec<Member>, Vec<Member>) = added.iter().cloned().partition(|m| m.account == by);
    let (own_removed, others_removed): (Vec<Member>, Vec<Member>) =
        removed.iter().cloned().partition(|m| m.account == by);
    for account in distinct_accounts(&others_added) {
        parts.push(format!("added {}", mention(account)));
    }
    for account in distinct_accounts(&others_removed) {
        parts.push(format!("removed {}", mention(account)));
    }
    match own_added.len() {
        0 => {}
        1 => parts.push("added a newly linked device".into()),
        n => parts.push(format!("added {n} newly linked devices")),
    }
    match own_removed.len() {
        0 => {}
        1 => parts.push(format!("removed one of {possessive} devices")),
        n => parts.push(format!("removed {n} of {possessive} devices")),
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// History text for a timer change by `who`.
pub fn timer_event(who: &str, expire_after_ms: Option<u64>) -> String {
    match expire_after_ms {
        Some(ms) => format!(
            "{who} set messages to disappear {} after they arrive",
            human_duration(ms)
        ),
        None => format!("{who} turned disappearing messages off"),
    }
}

/// "1h", "90s", "2d": the largest whole unit.
pub fn human_duration(ms: u64) -> String {
    let seconds = ms / 1000;
    for (unit, size) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if seconds >= size && seconds.is_multiple_of(size) {
            return format!("{}{unit}", seconds / size);
        }
    }
    format!("{seconds}s")
}

/// The accounts of these members, each once, in order.
pub fn distinct_accounts(members: &[Member]) -> Vec<AccountId> {
    let mut accounts: Vec<AccountId> = Vec::new();
    for member in members {
        if !accounts.contains(&member.account) {
            accounts.push(member.account);
        }
    }
    accounts
}

/// A group name as shown: 1 to 64 characters, no control characters, not like a username.
pub fn validate_group_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err("a group name is 1 to 64 characters".into());
    }
    if Username::parse(name).is_ok() {
        return Err("a group name cannot look like a username (name.NN)".into());
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use fumi_proto::GroupId;

    use super::*;
    use crate::AccountIdentity;
    use crate::mls::MlsDevice;
    use crate::store::{MemoryProvider, MemoryStore};

    /// One device with its MLS state in memory and a memory store.
    struct Device {
        mls: MlsDevice<MemoryProvider>,
        identity: AccountIdentity,
        store: MemoryStore,
    }

    impl Device {
        fn new(n: u8) -> Self {
            // The device's MLS state lives in its store: a failed step rolls both back.
            let store = MemoryStore::new();
            let (mls, identity) = crate::machine::testing::open(n, store.provider());
            Self { mls, identity, store }
        }

        fn receiver(&self) -> Machine<'_, MemoryProvider, MemoryStore> {
            Machine {
                device: &self.mls,
                store: &self.store,
                me: self.mls.me().account,
                my_device: self.mls.me().device,
                identity_key: self.identity.public_key(),
                profile_key: [9; 32],
            }
        }

        fn receive(&self, seq: u64, bytes: &[u8]) -> Outcome {
            self.receiver()
                .handle_envelope(seq, bytes, 1_000 + seq, &mut rand::rng())
                .unwrap()
        }

        /// A franked text to `group`, as the sending machine composes it.
        fn text(&self, group: GroupId, n: u8, text: &str) -> Vec<u8> {
            let me = self.mls.me();
            let from = message::Sender {
                group,
                account: me.account,
                device: me.device,
            };
            let body = Body::Text { text: text.into() };
            let content = message::compose(
                from,
                MessageId::from_bytes([n; 16]),
                500,
                [9; 32],
                body,
                None,
                &mut rand::rng(),
                |m| self.mls.sign_labelled(m),
            )
            .unwrap();
            self.mls.encrypt(group, &content.encode()).unwrap().message
        }
    }

    /// Alice makes a 1:1 with Bob; returns its group and the Welcome.
    fn one_to_one(alice: &Device, bob: &Device) -> (GroupId, Vec<u8>) {
        let bytes = bob.mls.key_packages(1, false).unwrap().one_time.remove(0);
        let me = bob.mls.me();
        let (key_package, _) = alice.mls.verify_key_package(&bytes, me.account, me.device).unwrap();
        let group = GroupId::from_bytes([7; 16]);
        alice.mls.create_group(group).unwrap();
        let commit = alice.mls.add_members(group, &[key_package]).unwrap();
        alice.mls.confirm_commit(group).unwrap();
        (group, commit.welcome.unwrap())
    }

    #[test]
    fn a_welcome_and_a_text_are_applied_and_each_envelope_once() {
        let (alice, bob) = (Device::new(1), Device::new(2));
        let (group, welcome) = one_to_one(&alice, &bob);
        // The Welcome: a 1:1 conversation with Alice, an event, both devices to check.
        let Outcome::Applied(Some(arrival)) = bob.receive(1, &welcome) else {
            panic!("the Welcome is applied with its arrival");
        };
        assert!(arrival.joined && arrival.group == group && arrival.members.len() == 2);
        let conversation = bob.store.conversation(group).unwrap().unwrap();
        assert_eq!(
            (conversation.direct, conversation.peer),
            (true, Some(alice.mls.me().account))
        );
        assert_eq!(bob.store.pending_arrivals().unwrap().len(), 1, "kept until checked");
        // A text: kept with the evidence that lets Bob report it.
        assert!(matches!(
            bob.receive(2, &alice.text(group, 1, "hello bob")),
            Outcome::Applied(None)
        ));
        let history = bob.store.history(group).unwrap();
        let texts: Vec<&str> = history
            .iter()
            .filter(|m| !m.is_event)
            .map(|m| m.text.as_str())
            .collect();
        assert_eq!(texts, ["hello bob"]);
        assert_eq!(
            bob.store
                .received_evidence(MessageId::from_bytes([1; 16]))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(bob.store.profile_keys(&[alice.mls.me().account]).unwrap().len(), 1);
        // The same envelope again (a lost acknowledgement): nothing more.
        assert!(matches!(
            bob.receive(2, b"whatever came again"),
            Outcome::AlreadyProcessed
        ));
        assert_eq!(bob.store.history(group).unwrap().len(), history.len());
    }

    #[test]
    fn an_envelope_at_fault_is_dropped_and_recorded_and_changes_nothing_else() {
        let (alice, bob) = (Device::new(1), Device::new(2));
        let (group, welcome) = one_to_one(&alice, &bob);
        bob.receive(1, &welcome);
        let before = bob.store.history(group).unwrap();
        assert!(matches!(bob.receive(2, b"not an MLS message"), Outcome::Dropped(_)));
        assert!(bob.store.is_processed(2).unwrap());
        assert_eq!(bob.store.history(group).unwrap(), before);
    }

    #[test]
    fn a_sender_whose_identity_key_changed_is_refused() {
        let (alice, bob) = (Device::new(1), Device::new(2));
        let (group, welcome) = one_to_one(&alice, &bob);
        // Bob pinned another key for Alice's account (he verified someone else in person).
        bob.store.set_verified(alice.mls.me().account, &[5; 32]).unwrap();
        let Outcome::Dropped(error) = bob.receive(1, &welcome) else {
            panic!("refused");
        };
        assert!(matches!(
            error,
            ReceiveError::IdentityKeyChanged {
                own: false,
                verified: true,
                ..
            }
        ));
        assert_eq!(bob.store.conversation(group).unwrap(), None, "nothing kept");
        assert!(!bob.mls.is_member(group), "and the MLS state rolled back with it");
        assert!(bob.store.is_processed(1).unwrap());
    }

    #[test]
    fn helpers_name_changes_and_durations() {
        assert_eq!(human_duration(90_000), "90s");
        assert_eq!(human_duration(7_200_000), "2h");
        assert_eq!(human_duration(14 * 86_400_000), "2w");
        assert!(validate_group_name("  family  ").is_ok_and(|n| n == "family"));
        assert!(validate_group_name("alice.42").is_err());
        assert!(validate_group_name("").is_err());
    }
}
