//! The client store behind a trait, so that the client machine runs on any store: SQLite
//! natively (`fumi-client`), IndexedDB in the browser, memory in tests. Every implementation
//! invokes [`client_store_conformance!`](crate::client_store_conformance), which checks every
//! method's contract.
//!
//! The trait grows by sections as the machine moves into this crate (docs/ARCHITECTURE.md, "The
//! client machine"). Today: the envelopes processed, the outbox and the conversations.

use std::cell::RefCell;
use std::collections::BTreeMap;

use fumi_proto::{AccountId, GroupId, MessageId};
use thiserror::Error;

/// The store failed (its disk, its database): this device's fault, so a received envelope is not
/// acknowledged and comes again.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("client store: {0}")]
pub struct StoreError(pub String);

/// A conversation (an MLS group) as this device keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The MLS group.
    pub group_id: GroupId,
    /// 1:1 or group.
    pub direct: bool,
    /// Group name (`None` for 1:1 and until the name arrives).
    pub name: Option<String>,
    /// The other account of a 1:1 conversation.
    pub peer: Option<AccountId>,
    /// False once this device was removed.
    pub active: bool,
    /// Disappearing-message timer (ms), if on.
    pub expire_after_ms: Option<u64>,
}

/// A queued outgoing request, kept until the server accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The request id.
    pub message_id: MessageId,
    /// The group.
    pub group_id: GroupId,
    /// Whether it carries this device's pending commit.
    pub is_commit: bool,
    /// JSON of the `SubmitMessage`.
    pub request: String,
    /// History event to record once the server accepts it (e.g. "you added bob.17").
    pub event: Option<String>,
}

/// What the client machine keeps. Methods take `&self`: a store is one device's, used by one
/// step at a time, and changes what it holds inside a [`ClientStore::in_transaction`].
pub trait ClientStore {
    /// Runs `f` as one transaction: what it wrote is kept if it returns `Ok`, none of it if it
    /// returns `Err` (or the commit fails, which is returned as an error).
    fn in_transaction<T, E: From<StoreError>>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E>;

    // --- envelopes --------------------------------------------------------------------------

    /// Whether the envelope with this delivery sequence number was processed.
    fn is_processed(&self, seq: u64) -> Result<bool, StoreError>;
    /// Records an envelope as processed (again: no change).
    fn mark_processed(&self, seq: u64, now: u64) -> Result<(), StoreError>;

    // --- outbox -----------------------------------------------------------------------------

    /// Queues an outgoing request; a second entry with the same message id is refused.
    fn push_outbox(&self, entry: &OutboxEntry, now: u64) -> Result<(), StoreError>;
    /// The queued requests, oldest first.
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Removes a sent request (an unknown id: no change).
    fn remove_outbox(&self, message_id: MessageId) -> Result<(), StoreError>;

    // --- conversations ----------------------------------------------------------------------

    /// Adds a conversation; one already kept is left as it is. It starts without a timer.
    fn insert_conversation(&self, conversation: &Conversation, now: u64) -> Result<(), StoreError>;
    /// Sets a conversation's kind, name and peer (from a conversation settings message).
    fn update_conversation(
        &self,
        group: GroupId,
        direct: bool,
        name: Option<&str>,
        peer: Option<AccountId>,
    ) -> Result<(), StoreError>;
    /// Marks a conversation as left (this device was removed).
    fn deactivate_conversation(&self, group: GroupId) -> Result<(), StoreError>;
    /// Sets or clears a conversation's disappearing-message timer.
    fn set_expire_after(&self, group: GroupId, expire_after_ms: Option<u64>) -> Result<(), StoreError>;
    /// Every conversation, the one with the newest message first, then the newest created.
    fn conversations(&self) -> Result<Vec<Conversation>, StoreError>;
    /// One conversation.
    fn conversation(&self, group: GroupId) -> Result<Option<Conversation>, StoreError> {
        Ok(self.conversations()?.into_iter().find(|c| c.group_id == group))
    }
}

/// A store in memory, for tests and for the pair harness.
#[derive(Debug, Default)]
pub struct MemoryStore {
    tables: RefCell<Tables>,
}

#[derive(Debug, Default, Clone)]
struct Tables {
    processed: BTreeMap<u64, u64>,
    /// In queue order.
    outbox: Vec<OutboxEntry>,
    /// With their creation time and order.
    conversations: Vec<(Conversation, u64)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_conversation(&self, group: GroupId, change: impl FnOnce(&mut Conversation)) -> Result<(), StoreError> {
        if let Some((conversation, _)) = self
            .tables
            .borrow_mut()
            .conversations
            .iter_mut()
            .find(|(c, _)| c.group_id == group)
        {
            change(conversation);
        }
        Ok(())
    }
}

impl ClientStore for MemoryStore {
    fn in_transaction<T, E: From<StoreError>>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let before = self.tables.borrow().clone();
        let result = f();
        if result.is_err() {
            *self.tables.borrow_mut() = before;
        }
        result
    }

    fn is_processed(&self, seq: u64) -> Result<bool, StoreError> {
        Ok(self.tables.borrow().processed.contains_key(&seq))
    }

    fn mark_processed(&self, seq: u64, now: u64) -> Result<(), StoreError> {
        self.tables.borrow_mut().processed.entry(seq).or_insert(now);
        Ok(())
    }

    fn push_outbox(&self, entry: &OutboxEntry, _now: u64) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        if tables.outbox.iter().any(|e| e.message_id == entry.message_id) {
            return Err(StoreError("this message id is already queued".into()));
        }
        tables.outbox.push(entry.clone());
        Ok(())
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        Ok(self.tables.borrow().outbox.clone())
    }

    fn remove_outbox(&self, message_id: MessageId) -> Result<(), StoreError> {
        self.tables.borrow_mut().outbox.retain(|e| e.message_id != message_id);
        Ok(())
    }

    fn insert_conversation(&self, conversation: &Conversation, now: u64) -> Result<(), StoreError> {
        let mut tables = self.tables.borrow_mut();
        if !tables
            .conversations
            .iter()
            .any(|(c, _)| c.group_id == conversation.group_id)
        {
            let kept = Conversation {
                expire_after_ms: None,
                ..conversation.clone()
            };
            tables.conversations.push((kept, now));
        }
        Ok(())
    }

    fn update_conversation(
        &self,
        group: GroupId,
        direct: bool,
        name: Option<&str>,
        peer: Option<AccountId>,
    ) -> Result<(), StoreError> {
        self.with_conversation(group, |c| {
            c.direct = direct;
            c.name = name.map(str::to_owned);
            c.peer = peer;
        })
    }

    fn deactivate_conversation(&self, group: GroupId) -> Result<(), StoreError> {
        self.with_conversation(group, |c| c.active = false)
    }

    fn set_expire_after(&self, group: GroupId, expire_after_ms: Option<u64>) -> Result<(), StoreError> {
        self.with_conversation(group, |c| c.expire_after_ms = expire_after_ms)
    }

    fn conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        // No messages are kept here yet: newest created first (a stable sort keeps equal times in
        // insertion order).
        let tables = self.tables.borrow();
        let mut all: Vec<&(Conversation, u64)> = tables.conversations.iter().collect();
        all.sort_by_key(|(_, created_at)| std::cmp::Reverse(*created_at));
        Ok(all.into_iter().map(|(c, _)| c.clone()).collect())
    }
}

/// The contract of [`ClientStore`], as tests every implementation runs:
/// `fumi_core::client_store_conformance!(make_store_expression);` inside a test module, where the
/// expression makes a fresh, empty store (it may use a temporary directory it keeps alive
/// itself, e.g. by leaking it).
#[macro_export]
macro_rules! client_store_conformance {
    ($make:expr) => {
        mod client_store_conformance {
            use fumi_proto::{AccountId, GroupId, MessageId};
            use $crate::store::{ClientStore, Conversation, OutboxEntry, StoreError};

            #[allow(unused_imports)]
            use super::*;

            fn group(n: u8) -> GroupId {
                GroupId::from_bytes([n; 16])
            }

            fn conversation(n: u8, direct: bool) -> Conversation {
                Conversation {
                    group_id: group(n),
                    direct,
                    name: (!direct).then(|| format!("group {n}")),
                    peer: direct.then(|| AccountId::from_bytes([n + 100; 16])),
                    active: true,
                    expire_after_ms: None,
                }
            }

            fn entry(n: u8) -> OutboxEntry {
                OutboxEntry {
                    message_id: MessageId::from_bytes([n; 16]),
                    group_id: group(1),
                    is_commit: n % 2 == 0,
                    request: format!("{{\"n\":{n}}}"),
                    event: (n % 3 == 0).then(|| format!("event {n}")),
                }
            }

            #[test]
            fn envelopes_are_remembered_once_processed() {
                let store = $make;
                assert!(!store.is_processed(7).unwrap());
                store.mark_processed(7, 100).unwrap();
                store.mark_processed(7, 200).unwrap();
                assert!(store.is_processed(7).unwrap());
                assert!(!store.is_processed(8).unwrap());
            }

            #[test]
            fn the_outbox_keeps_order_and_refuses_a_reused_id() {
                let store = $make;
                for (n, at) in [(3, 10), (1, 20), (2, 20)] {
                    store.push_outbox(&entry(n), at).unwrap();
                }
                assert_eq!(store.outbox().unwrap(), [entry(3), entry(1), entry(2)]);
                assert!(store.push_outbox(&entry(1), 30).is_err());
                store.remove_outbox(entry(1).message_id).unwrap();
                store.remove_outbox(MessageId::from_bytes([99; 16])).unwrap();
                assert_eq!(store.outbox().unwrap(), [entry(3), entry(2)]);
            }

            #[test]
            fn conversations_are_kept_updated_and_left() {
                let store = $make;
                assert_eq!(store.conversations().unwrap(), []);
                let mut timed = conversation(1, true);
                timed.expire_after_ms = Some(5);
                store.insert_conversation(&timed, 10).unwrap();
                store.insert_conversation(&conversation(2, false), 20).unwrap();
                // Inserted again: the first stays; a new conversation starts without a timer.
                store.insert_conversation(&conversation(1, false), 30).unwrap();
                assert_eq!(store.conversation(group(1)).unwrap(), Some(conversation(1, true)));
                assert_eq!(
                    store.conversations().unwrap(),
                    [conversation(2, false), conversation(1, true)],
                    "newest created first"
                );
                store.set_expire_after(group(2), Some(60_000)).unwrap();
                store
                    .update_conversation(group(2), false, Some("renamed"), None)
                    .unwrap();
                store.deactivate_conversation(group(1)).unwrap();
                let two = store.conversation(group(2)).unwrap().unwrap();
                assert_eq!(
                    (two.name.as_deref(), two.expire_after_ms),
                    (Some("renamed"), Some(60_000))
                );
                assert!(!store.conversation(group(1)).unwrap().unwrap().active);
                store.set_expire_after(group(2), None).unwrap();
                assert_eq!(
                    store.conversation(group(2)).unwrap().unwrap().expire_after_ms,
                    None
                );
                // Changes to a conversation not kept change nothing.
                store.deactivate_conversation(group(9)).unwrap();
                assert_eq!(store.conversation(group(9)).unwrap(), None);
                assert_eq!(store.conversations().unwrap().len(), 2);
            }

            #[test]
            fn a_failed_transaction_keeps_nothing() {
                let store = $make;
                store.push_outbox(&entry(1), 1).unwrap();
                let failed: Result<(), StoreError> = store.in_transaction(|| {
                    store.mark_processed(5, 1)?;
                    store.push_outbox(&entry(2), 2)?;
                    store.insert_conversation(&conversation(3, true), 3)?;
                    store.remove_outbox(entry(1).message_id)?;
                    Err(StoreError("the step failed".into()))
                });
                assert!(failed.is_err());
                assert!(!store.is_processed(5).unwrap());
                assert_eq!(store.outbox().unwrap(), [entry(1)]);
                assert_eq!(store.conversations().unwrap(), []);
                let kept: Result<(), StoreError> = store.in_transaction(|| {
                    store.mark_processed(5, 1)?;
                    store.push_outbox(&entry(2), 2)
                });
                kept.unwrap();
                assert!(store.is_processed(5).unwrap());
                assert_eq!(store.outbox().unwrap(), [entry(1), entry(2)]);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::client_store_conformance!(crate::store::MemoryStore::new());
}
