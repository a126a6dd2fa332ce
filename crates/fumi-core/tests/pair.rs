//! The pair harness: client machines with their stores in memory and an in-memory fake of the
//! server's delivery rules (per-device mailboxes in order, numbered envelopes, deletion on
//! acknowledgement), driven on a virtual clock. Protocol cases run here in milliseconds, with no
//! process, socket or sleep; the end-to-end tests against the real server stay in `fumi-cli`.

use std::collections::{BTreeMap, VecDeque};

use fumi_core::AccountIdentity;
use fumi_core::content::Body;
use fumi_core::machine::Machine;
use fumi_core::mls::MlsDevice;
use fumi_core::receive::Outcome;
use fumi_core::store::{ClientStore, Conversation, MemoryProvider, MemoryStore, OutboxEntry};
use fumi_proto::{AccountId, DeviceId, GroupId, MessageId, SubmitMessage};

/// One device: its MLS state and its store, in memory (the MLS state inside the store, so a
/// failed step rolls both back).
struct Peer {
    mls: MlsDevice<MemoryProvider>,
    identity: AccountIdentity,
    store: MemoryStore,
}

impl Peer {
    fn new(n: u8) -> Self {
        let store = MemoryStore::new();
        let provider = store.provider();
        let key = MlsDevice::generate_signature_key(&provider).unwrap();
        let identity = AccountIdentity::generate(&mut rand::rng());
        let (account, device) = (AccountId::from_bytes([n; 16]), DeviceId::from_bytes([n; 16]));
        let mls = MlsDevice::open(provider, &identity, account, device, &key).unwrap();
        Self { mls, identity, store }
    }

    fn machine(&self) -> Machine<'_, MemoryProvider, MemoryStore> {
        Machine {
            device: &self.mls,
            store: &self.store,
            me: self.mls.me().account,
            my_device: self.mls.me().device,
            identity_key: self.identity.public_key(),
            profile_key: [self.mls.me().account.as_bytes()[0]; 32],
        }
    }

    fn device(&self) -> DeviceId {
        self.mls.me().device
    }

    fn texts(&self, group: GroupId) -> Vec<String> {
        self.store
            .history(group)
            .unwrap()
            .into_iter()
            .filter(|m| !m.is_event)
            .map(|m| m.text)
            .collect()
    }
}

/// The server's delivery rules, in memory, on a virtual clock.
#[derive(Default)]
struct Server {
    now: u64,
    next_seq: u64,
    mailboxes: BTreeMap<DeviceId, VecDeque<(u64, Vec<u8>)>>,
}

impl Server {
    fn enqueue(&mut self, device: DeviceId, bytes: Vec<u8>) -> u64 {
        self.next_seq += 1;
        self.mailboxes
            .entry(device)
            .or_default()
            .push_back((self.next_seq, bytes));
        self.next_seq
    }

    /// Accepts a queued request: one envelope per recipient device.
    fn submit(&mut self, entry: &OutboxEntry) {
        let request: SubmitMessage = serde_json::from_str(&entry.request).unwrap();
        for recipient in request.recipients {
            self.enqueue(recipient, request.message.as_slice().to_vec());
        }
    }

    /// Sends what a device queued and removes it from its outbox once accepted.
    fn flush(&mut self, peer: &Peer) {
        for entry in peer.store.outbox().unwrap() {
            self.submit(&entry);
            peer.store.remove_outbox(entry.message_id).unwrap();
        }
    }

    /// Delivers a device's mailbox in order; an envelope is deleted once its step allowed the
    /// acknowledgement, and the clock moves a millisecond per envelope.
    fn deliver(&mut self, peer: &Peer) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        while let Some((seq, bytes)) = self.mailboxes.entry(peer.device()).or_default().front().cloned() {
            self.now += 1;
            let outcome = peer
                .machine()
                .handle_envelope(seq, &bytes, self.now, &mut rand::rng())
                .expect("memory stores do not fail");
            self.mailboxes.get_mut(&peer.device()).unwrap().pop_front();
            outcomes.push(outcome);
        }
        outcomes
    }

    /// A device sends a text through its machine's send step.
    fn send(&mut self, peer: &Peer, group: GroupId, n: u8, text: &str) {
        self.now += 1;
        let body = Body::Text { text: text.into() };
        peer.machine()
            .queue_content(
                group,
                MessageId::from_bytes([n; 16]),
                body,
                None,
                self.now,
                &mut rand::rng(),
            )
            .unwrap();
        self.flush(peer);
    }
}

/// Alice opens a 1:1 with Bob: her conversation kept, the Welcome in Bob's mailbox.
fn one_to_one(server: &mut Server, alice: &Peer, bob: &Peer) -> GroupId {
    let bytes = bob.mls.key_packages(1, false).unwrap().one_time.remove(0);
    let me = bob.mls.me();
    let (key_package, _) = alice.mls.verify_key_package(&bytes, me.account, me.device).unwrap();
    let group = GroupId::from_bytes([7; 16]);
    alice.mls.create_group(group).unwrap();
    let commit = alice.mls.add_members(group, &[key_package]).unwrap();
    alice.mls.confirm_commit(group).unwrap();
    let conversation = Conversation {
        group_id: group,
        direct: true,
        name: None,
        peer: Some(me.account),
        active: true,
        expire_after_ms: None,
    };
    alice.store.insert_conversation(&conversation, server.now).unwrap();
    server.enqueue(bob.device(), commit.welcome.unwrap());
    group
}

#[test]
fn a_conversation_goes_both_ways_in_order() {
    let mut server = Server::default();
    let (alice, bob) = (Peer::new(1), Peer::new(2));
    let group = one_to_one(&mut server, &alice, &bob);
    for (n, text) in [(1, "one"), (2, "two"), (3, "three")] {
        server.send(&alice, group, n, text);
    }
    let outcomes = server.deliver(&bob);
    assert!(
        matches!(outcomes[0], Outcome::Applied(Some(_))),
        "the Welcome, with devices to check"
    );
    assert!(outcomes[1..].iter().all(|o| matches!(o, Outcome::Applied(None))));
    assert_eq!(bob.texts(group), ["one", "two", "three"]);
    // Bob may answer only once Alice's device was checked against the key directory.
    let (id, _, _) = bob.store.pending_arrivals().unwrap().remove(0);
    bob.store.remove_pending_arrival(id).unwrap();
    server.send(&bob, group, 4, "hi alice");
    server.deliver(&alice);
    assert_eq!(alice.texts(group), ["one", "two", "three", "hi alice"]);
}

#[test]
fn a_redelivered_envelope_is_applied_once_and_a_replayed_one_is_dropped() {
    let mut server = Server::default();
    let (alice, bob) = (Peer::new(1), Peer::new(2));
    let group = one_to_one(&mut server, &alice, &bob);
    server.send(&alice, group, 1, "only once");
    let (seq, bytes) = server.mailboxes[&bob.device()].back().cloned().unwrap();
    server.deliver(&bob);
    // The acknowledgement was lost: the server delivers the same envelope again.
    server
        .mailboxes
        .get_mut(&bob.device())
        .unwrap()
        .push_back((seq, bytes.clone()));
    assert!(matches!(server.deliver(&bob)[..], [Outcome::AlreadyProcessed]));
    // A copy under a new number (a replay by the server): MLS refuses it, it is recorded.
    let replayed = server.enqueue(bob.device(), bytes);
    assert!(matches!(server.deliver(&bob)[..], [Outcome::Dropped(_)]));
    assert!(bob.store.is_processed(replayed).unwrap());
    assert_eq!(bob.texts(group), ["only once"]);
}

#[test]
fn disappearing_messages_go_when_the_virtual_clock_passes_their_time() {
    let mut server = Server::default();
    let (alice, bob) = (Peer::new(1), Peer::new(2));
    let group = one_to_one(&mut server, &alice, &bob);
    alice.store.set_expire_after(group, Some(60_000)).unwrap();
    server.send(&alice, group, 1, "soon gone");
    server.deliver(&bob);
    let arrived = server.now;
    assert_eq!(bob.texts(group), ["soon gone"]);
    assert!(bob.store.purge_expired(arrived + 59_999).unwrap().is_empty());
    assert_eq!(bob.texts(group), ["soon gone"]);
    bob.store.purge_expired(arrived + 60_000).unwrap();
    assert_eq!(bob.texts(group), Vec::<String>::new());
    assert_eq!(alice.store.purge_expired(arrived + 60_000).unwrap().len(), 0);
    assert_eq!(alice.texts(group), Vec::<String>::new(), "the sender's copy goes too");
}
