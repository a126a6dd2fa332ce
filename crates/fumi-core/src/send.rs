//! The send step of the client machine (docs/ARCHITECTURE.md, "The client machine"): an
//! application message composed, encrypted and queued in one store transaction, so the MLS
//! state change that encrypting makes and the request that carries the ciphertext are kept
//! together or not at all. The caller sends the queued request (and every one an earlier run
//! left in the outbox) and removes it once the server accepted it.
//!
//! No clock, network or file: the caller passes the time and the randomness.

use fumi_proto::{Base64Bytes, GroupId, MessageId, SubmitMessage};
use openmls_traits::OpenMlsProvider;
use thiserror::Error;

use crate::content::Body;
use crate::machine::Machine;
use crate::message;
use crate::mls::MlsError;
use crate::store::{ClientStore, FileView, OutboxEntry, StoreError, StoredMessage};

/// Why a message was not queued.
#[derive(Debug, Error)]
pub enum SendError {
    /// This device's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An MLS operation failed.
    #[error(transparent)]
    Mls(#[from] MlsError),
    /// Sending to this conversation is stopped: a device the key directory never listed is in
    /// it (the reason says which).
    #[error("{0}")]
    Refused(String),
    /// Devices that came into the conversation are not checked against the key directory yet.
    #[error(
        "new members of this conversation are not checked against the key directory yet, or a device its \
         account removed is still in it; run `fumi receive` and try again"
    )]
    Unchecked,
}

impl<P: OpenMlsProvider, S: ClientStore> Machine<'_, P, S> {
    /// Sending to `group` is allowed: no refusal stands and every device that came into it was
    /// checked against the key directory.
    pub fn check_sendable(&self, group: GroupId) -> Result<(), SendError> {
        if let Some(reason) = self.store.conversation_refusal(group)? {
            return Err(SendError::Refused(reason));
        }
        if self.store.has_pending_arrivals(group)? {
            return Err(SendError::Unchecked);
        }
        Ok(())
    }

    /// Composes `body` as message `id` to `group` (franked if reportable, with the
    /// conversation's timer if it disappears), encrypts it, and in the same transaction keeps it
    /// in history (a text or file, with `file` as what history shows of it) and queues the
    /// request that carries it. Returns the queued request.
    pub fn queue_content(
        &self,
        group: GroupId,
        id: MessageId,
        body: Body,
        file: Option<FileView>,
        now: u64,
        rng: &mut impl rand::RngCore,
    ) -> Result<OutboxEntry, SendError> {
        self.check_sendable(group)?;
        let timer = self.store.conversation(group)?.and_then(|c| c.expire_after_ms);
        let from = message::Sender {
            group,
            account: self.me,
            device: self.my_device,
        };
        let content = message::compose(from, id, now, self.profile_key, body, timer, rng, |bytes| {
            self.device.sign_labelled(bytes)
        })?;
        self.store.in_transaction(|| {
            let outgoing = self.device.encrypt(group, &content.encode())?;
            let request = SubmitMessage {
                id,
                message: Base64Bytes(outgoing.message),
                recipients: outgoing.recipients.iter().map(|m| m.device).collect(),
                welcome: None,
                removed: vec![],
            };
            let shown = match &content.body {
                Body::Text { text } => Some(text.clone()),
                Body::File { caption, .. } => Some(caption.clone().unwrap_or_default()),
                _ => None,
            };
            if let Some(text) = shown {
                let stored = StoredMessage {
                    local_id: 0,
                    id,
                    group_id: group,
                    sender: self.me,
                    is_event: false,
                    text,
                    sent_at: now,
                    outgoing: true,
                    attachment: file,
                    expires_at: content.expire_after_ms.map(|ms| now + ms),
                };
                self.store.insert_message(&stored, true, now)?;
            }
            let entry = OutboxEntry {
                message_id: id,
                group_id: group,
                is_commit: false,
                request: serde_json::to_string(&request).expect("a request serialises"),
                event: None,
            };
            self.store.push_outbox(&entry, now)?;
            Ok(entry)
        })
    }
}

#[cfg(test)]
mod tests {
    use openmls_rust_crypto::OpenMlsRustCrypto;

    use super::*;
    use crate::mls::{Incoming, MlsDevice};
    use crate::store::{Conversation, MemoryStore};

    fn device(n: u8) -> MlsDevice<OpenMlsRustCrypto> {
        crate::machine::testing::device(n).0
    }

    fn machine<'a>(
        device: &'a MlsDevice<OpenMlsRustCrypto>,
        store: &'a MemoryStore,
    ) -> Machine<'a, OpenMlsRustCrypto, MemoryStore> {
        Machine {
            device,
            store,
            me: device.me().account,
            my_device: device.me().device,
            identity_key: [0; 32],
            profile_key: [3; 32],
        }
    }

    #[test]
    fn a_text_is_kept_and_queued_with_its_ciphertext_and_a_reader_opens_it() {
        let (alice, bob) = (device(1), device(2));
        let bytes = bob.key_packages(1, false).unwrap().one_time.remove(0);
        let (key_package, _) = alice
            .verify_key_package(&bytes, bob.me().account, bob.me().device)
            .unwrap();
        let group = GroupId::from_bytes([7; 16]);
        alice.create_group(group).unwrap();
        let commit = alice.add_members(group, &[key_package]).unwrap();
        alice.confirm_commit(group).unwrap();
        bob.handle_message(commit.welcome.as_ref().unwrap()).unwrap();

        let store = MemoryStore::new();
        let conversation = Conversation {
            group_id: group,
            direct: true,
            name: None,
            peer: Some(bob.me().account),
            active: true,
            expire_after_ms: None,
        };
        store.insert_conversation(&conversation, 1).unwrap();
        store.set_expire_after(group, Some(60_000)).unwrap();
        let composer = machine(&alice, &store);
        let id = MessageId::from_bytes([4; 16]);
        let body = Body::Text { text: "hello".into() };
        let entry = composer
            .queue_content(group, id, body, None, 1_000, &mut rand::rng())
            .unwrap();
        assert_eq!(store.outbox().unwrap(), vec![entry.clone()]);
        let kept = store.history(group).unwrap();
        assert_eq!(
            (kept.len(), kept[0].text.as_str(), kept[0].expires_at),
            (1, "hello", Some(61_000))
        );
        // The queued request carries what Bob decrypts and opens.
        let request: SubmitMessage = serde_json::from_str(&entry.request).unwrap();
        assert_eq!(request.recipients, [bob.me().device]);
        let Incoming::Application {
            plaintext,
            sender_signature_key,
            sender_credential,
            ..
        } = bob.handle_message(request.message.as_slice()).unwrap()
        else {
            panic!("an application message");
        };
        let from = message::Sender {
            group,
            account: alice.me().account,
            device: alice.me().device,
        };
        let (content, evidence) = message::open(from, &plaintext, &sender_signature_key, &sender_credential).unwrap();
        assert_eq!(
            (content.id, content.expire_after_ms, evidence.is_some()),
            (id, Some(60_000), true)
        );
    }

    #[test]
    fn nothing_is_queued_while_arrivals_wait_or_a_refusal_stands() {
        let alice = device(1);
        let store = MemoryStore::new();
        let group = GroupId::from_bytes([7; 16]);
        alice.create_group(group).unwrap();
        let composer = machine(&alice, &store);
        let send = || {
            let body = Body::Text { text: "hi".into() };
            composer.queue_content(group, MessageId::from_bytes([1; 16]), body, None, 1, &mut rand::rng())
        };
        store.add_pending_arrival(group, &[alice.me()]).unwrap();
        assert!(matches!(send(), Err(SendError::Unchecked)));
        store
            .remove_pending_arrival(store.pending_arrivals().unwrap()[0].0)
            .unwrap();
        store
            .refuse_conversation(group, "an unlisted device is in it", &[])
            .unwrap();
        assert!(matches!(send(), Err(SendError::Refused(reason)) if reason.contains("unlisted")));
        assert_eq!(store.outbox().unwrap(), []);
        assert_eq!(store.unseen().unwrap(), []);
    }
}
