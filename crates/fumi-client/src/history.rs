//! Message history for a newly linked device: the old device packs its conversations and
//! messages into an archive, seals it like a file (fresh key, [`fumi_core::attachment`]), uploads
//! it as a blob only the new device may fetch, and parks a pointer (blob, key, digest, size)
//! sealed under the link key in the used link slot. The new device, which knows the link key
//! from the code, fetches it on its next sync and adds the messages to its history. The server
//! sees an opaque blob and an opaque pointer; files themselves are not copied.

use fumi_proto::ErrorCode;
use fumi_proto::endpoints;
use std::fs;

use fumi_core::attachment::{self, AttachmentKey};
use fumi_core::store::ClientStore;
use fumi_core::{Attachment, sealing};
use fumi_proto::*;
use serde::{Deserialize, Serialize};

use crate::files::DownloadFailure;
use crate::store::{Conversation, FileView, StoredMessage};
use crate::{ClientError, FumiClient, now_ms};

const ARCHIVE_VERSION: u32 = 1;
/// How long a new device keeps asking for its history.
const HISTORY_WAIT_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Serialize, Deserialize)]
struct Archive {
    v: u32,
    conversations: Vec<ArchivedConversation>,
}

#[derive(Serialize, Deserialize)]
struct ArchivedConversation {
    group_id: GroupId,
    direct: bool,
    name: Option<String>,
    peer: Option<AccountId>,
    expire_after_ms: Option<u64>,
    messages: Vec<ArchivedMessage>,
}

#[derive(Serialize, Deserialize)]
struct ArchivedMessage {
    id: MessageId,
    sender: AccountId,
    is_event: bool,
    text: String,
    sent_at: u64,
    /// Sent by this account (from any of its devices).
    outgoing: bool,
    file: Option<FileView>,
    expires_at: Option<u64>,
}

fn pointer_label(account: AccountId) -> Vec<u8> {
    [b"fumi link history v1".as_slice(), account.as_bytes()].concat()
}

impl FumiClient {
    /// Packs this device's history and hands it to `device` through the used link slot.
    pub(crate) async fn send_history(
        &self,
        token_hash: &[u8; 32],
        link_key: &[u8; 32],
        device: DeviceId,
    ) -> Result<(), ClientError> {
        let now = now_ms();
        let mut conversations = Vec::new();
        for c in self.store.conversations()? {
            let messages = self
                .store
                .history(c.group_id)?
                .into_iter()
                .filter(|m| m.expires_at.is_none_or(|t| t > now))
                .map(|m| ArchivedMessage {
                    id: m.id,
                    sender: m.sender,
                    is_event: m.is_event,
                    text: m.text,
                    sent_at: m.sent_at,
                    outgoing: m.outgoing,
                    // The file stays on this device; the new one shows that it exists.
                    file: m.attachment.map(|f| FileView {
                        path: None,
                        error: Some("sent before this device was linked; it is on your other device".into()),
                        ..f
                    }),
                    expires_at: m.expires_at,
                })
                .collect();
            conversations.push(ArchivedConversation {
                group_id: c.group_id,
                direct: c.direct,
                name: c.name,
                peer: c.peer,
                expire_after_ms: c.expire_after_ms,
                messages,
            });
        }
        let archive = serde_json::to_vec(&Archive {
            v: ARCHIVE_VERSION,
            conversations,
        })
        .expect("archive serialises");

        let key = AttachmentKey::generate(&mut rand::rng());
        let mut sealed_archive = Vec::with_capacity(attachment::ciphertext_size(archive.len() as u64) as usize);
        let sealed = attachment::encrypt(
            &key,
            &mut archive.as_slice(),
            archive.len() as u64,
            &mut sealed_archive,
            &mut rand::rng(),
        )
        .map_err(|e| ClientError::Store(e.to_string()))?;
        let (chunks, mut ready) = tokio::sync::mpsc::channel(sealed_archive.len() / crate::UPLOAD_CHUNK_BYTES + 1);
        for chunk in sealed_archive.chunks(crate::UPLOAD_CHUNK_BYTES) {
            chunks
                .try_send(bytes::Bytes::copy_from_slice(chunk))
                .expect("channel sized for every chunk");
        }
        drop(chunks);
        let blob = self
            .upload(
                &mut ready,
                BlobCreate {
                    size: sealed.ciphertext_size,
                    recipients: vec![device],
                    channel: None,
                },
                "history",
                None,
                |_| Ok(()),
            )
            .await?;
        let pointer = Attachment {
            blob,
            key: *key.as_bytes(),
            digest: sealed.digest,
            size: archive.len() as u64,
            name: "fumi-history.json".into(),
            media_type: "application/json".into(),
        };
        let sealed_pointer = sealing::seal(
            link_key,
            &pointer_label(self.account.account_id),
            &serde_json::to_vec(&pointer).expect("pointer serialises"),
            &mut rand::rng(),
        );
        let token_hash = hex::encode(token_hash);
        let body = LinkHistory {
            sealed: Some(Base64Bytes(sealed_pointer)),
        };
        self.transport
            .request::<_, ()>(endpoints::PUT_LINK_HISTORY, &[&token_hash], Some(&body))
            .await
    }

    /// On a newly linked device: fetches and adds the history its old device handed over.
    pub(crate) async fn receive_history(&mut self) -> Result<(), ClientError> {
        for pending in self.store.pending_history()? {
            let (token, link_key) = (pending.token, pending.link_key);
            let request = LinkOpen {
                token: Base64Bytes(token.to_vec()),
            };
            let answer: LinkHistory = match self
                .transport
                .request(endpoints::GET_LINK_HISTORY, &[], Some(&request))
                .await
            {
                Ok(answer) => answer,
                Err(e) if e.is_code(ErrorCode::UnknownLink) => {
                    self.store.remove_pending_history(&token)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(sealed) = answer.sealed else {
                if now_ms().saturating_sub(pending.since) > HISTORY_WAIT_MS {
                    self.store.remove_pending_history(&token)?;
                }
                continue;
            };
            let pointer: Option<Attachment> =
                sealing::open(&link_key, &pointer_label(self.account.account_id), sealed.as_slice())
                    .and_then(|json| serde_json::from_slice(&json).ok())
                    .filter(|p: &Attachment| p.size <= fumi_core::content::MAX_ATTACHMENT_BYTES);
            let Some(pointer) = pointer else {
                tracing::warn!("the history pointer does not open with the link key; ignored");
                self.store.remove_pending_history(&token)?;
                continue;
            };
            let saved = match self.download(&pointer).await {
                Ok(path) => path,
                Err(DownloadFailure::Retry(e) | DownloadFailure::StartOver(e)) => return Err(e),
                Err(DownloadFailure::Refused(reason)) => {
                    tracing::warn!(%reason, "the history archive was refused");
                    self.store.remove_pending_history(&token)?;
                    continue;
                }
            };
            let archive = fs::read(&saved).map_err(|e| ClientError::Store(e.to_string()));
            let _ = fs::remove_file(&saved);
            let archive: Archive = serde_json::from_slice(&archive?)
                .map_err(|e| ClientError::Protocol(format!("history archive: {e}")))?;
            self.store.transaction(|| {
                self.import_history(archive)?;
                Ok(self.store.remove_pending_history(&token)?)
            })?;
            let _ = self
                .transport
                .request::<(), ()>(endpoints::ACK_BLOB, &[&pointer.blob], None)
                .await;
        }
        Ok(())
    }

    fn import_history(&self, archive: Archive) -> Result<(), ClientError> {
        if archive.v != ARCHIVE_VERSION {
            return Err(ClientError::Protocol(format!("history archive version {}", archive.v)));
        }
        let now = now_ms();
        let me = self.account.account_id;
        for c in archive.conversations {
            let name = c.name.filter(|n| crate::validate_group_name(n).is_ok());
            self.store.insert_conversation(
                &Conversation {
                    group_id: c.group_id,
                    direct: c.direct,
                    name: name.clone(),
                    peer: c.peer,
                    active: self.device.is_member(c.group_id),
                    expire_after_ms: c.expire_after_ms,
                },
                now,
            )?;
            if let Some(existing) = self.store.conversation(c.group_id)?
                && existing.name.is_none()
                && name.is_some()
            {
                self.store
                    .update_conversation(c.group_id, c.direct, name.as_deref(), c.peer)?;
            }
            let mut copied = 0;
            for m in c.messages {
                if m.expires_at.is_some_and(|t| t <= now) {
                    continue;
                }
                let message = StoredMessage {
                    local_id: 0,
                    id: m.id,
                    group_id: c.group_id,
                    sender: m.sender,
                    is_event: m.is_event,
                    text: m.text,
                    sent_at: m.sent_at,
                    outgoing: m.outgoing && m.sender == me,
                    attachment: m.file.map(|f| FileView { path: None, ..f }),
                    expires_at: m.expires_at,
                };
                if self.store.insert_message(&message, true, now)?.is_some() {
                    copied += 1;
                }
            }
            if copied > 0 {
                let text = format!("{copied} earlier messages copied from your other device");
                self.store_event(c.group_id, me, &text, false)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_are_bound_to_the_account() {
        let key = crate::random_bytes::<32>();
        let account = AccountId::from_bytes([1; 16]);
        let sealed = sealing::seal(&key, &pointer_label(account), b"{}", &mut rand::rng());
        assert!(sealing::open(&key, &pointer_label(account), &sealed).is_some());
        assert!(sealing::open(&key, &pointer_label(AccountId::from_bytes([2; 16])), &sealed).is_none());
    }
}
