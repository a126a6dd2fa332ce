//! The rules of an application message's content at both ends, the first piece of the client
//! machine (docs/ARCHITECTURE.md, "The client machine"): what a sender puts in (the franking
//! proof of a reportable message, the conversation's timer on what disappears) and what a
//! receiver accepts (a text or file whose franking proof does not open is refused, and the
//! opened proof is kept as evidence for a report). No store, clock or network: the caller passes
//! the time, the randomness and the device's signing function.

use fumi_proto::{AccountId, DeviceId, GroupId, MessageId};
use thiserror::Error;

use crate::content::{Body, CONTENT_VERSION, Content, ContentError};
use crate::franking::{Evidence, Franking, FrankingContext, FrankingError, ReportedContent};

/// Who sends, where: the sending device and its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    /// The conversation.
    pub group: GroupId,
    /// The sender's account.
    pub account: AccountId,
    /// The sender's device.
    pub device: DeviceId,
}

/// Why an arriving application message was refused.
#[derive(Debug, Error)]
pub enum Refused {
    /// The plaintext is not Fumi content.
    #[error("a message that is not Fumi content: {0}")]
    Content(#[from] ContentError),
    /// A text or file message without a franking proof (it could not be reported).
    #[error("a message without a franking proof (it could not be reported)")]
    Unfranked,
    /// A text or file message whose franking proof does not open.
    #[error("a message whose franking proof fails: {0}")]
    Franking(FrankingError),
}

/// Whether a kind of content takes the conversation's disappearing-message timer: only what a
/// person wrote or sent disappears; settings and introductions do not.
pub fn disappears(body: &Body) -> bool {
    matches!(body, Body::Text { .. } | Body::File { .. })
}

/// The content of an outgoing message: franked (through `sign`, the device's labelled signature)
/// when it can be reported, carrying the conversation's timer when it disappears.
#[allow(clippy::too_many_arguments)]
pub fn compose<E>(
    from: Sender,
    id: MessageId,
    sent_at: u64,
    profile_key: [u8; 32],
    body: Body,
    conversation_timer_ms: Option<u64>,
    rng: &mut impl rand::RngCore,
    sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
) -> Result<Content, E> {
    let context = FrankingContext {
        group: from.group,
        sender: from.account,
        device: from.device,
        message: id,
        sent_at,
    };
    let franking = ReportedContent::of(&body)
        .map(|reported| Franking::new(&context, &reported, rng, sign))
        .transpose()?;
    Ok(Content {
        v: CONTENT_VERSION,
        id,
        sent_at,
        profile_key,
        expire_after_ms: conversation_timer_ms.filter(|_| disappears(&body)),
        body,
        franking,
    })
}

/// An arriving application message (already decrypted and its sender's leaf checked): its
/// content, and for a text or file the evidence that lets the receiver report it.
pub fn open(
    from: Sender,
    plaintext: &[u8],
    sender_signature_key: &[u8],
    sender_credential: &[u8],
) -> Result<(Content, Option<Evidence>), Refused> {
    let content = Content::decode(plaintext)?;
    let Some(reported) = ReportedContent::of(&content.body) else {
        return Ok((content, None));
    };
    let context = FrankingContext {
        group: from.group,
        sender: from.account,
        device: from.device,
        message: content.id,
        sent_at: content.sent_at,
    };
    let franking = content.franking.clone().ok_or(Refused::Unfranked)?;
    franking
        .check(&context, &reported, sender_signature_key)
        .map_err(Refused::Franking)?;
    let evidence = Evidence {
        context,
        content: reported,
        franking,
        signature_key: hex::encode(sender_signature_key),
        credential: hex::encode(sender_credential),
    };
    Ok((content, Some(evidence)))
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::Signer as _;

    use super::*;
    use crate::AccountIdentity;

    struct Device {
        from: Sender,
        key: ed25519_dalek::SigningKey,
        credential: Vec<u8>,
    }

    fn device(n: u8) -> Device {
        let identity = AccountIdentity::generate(&mut rand::rng());
        let key = ed25519_dalek::SigningKey::from_bytes(&[n + 50; 32]);
        let (account, device) = (AccountId::from_bytes([n; 16]), DeviceId::from_bytes([n; 16]));
        let credential = identity
            .certify_device(account, device, &key.verifying_key().to_bytes())
            .encode();
        Device {
            from: Sender {
                group: GroupId::from_bytes([9; 16]),
                account,
                device,
            },
            key,
            credential,
        }
    }

    fn send(by: &Device, body: Body, timer: Option<u64>) -> Content {
        compose(
            by.from,
            MessageId::from_bytes([1; 16]),
            1_000,
            [3; 32],
            body,
            timer,
            &mut rand::rng(),
            |m| Ok::<_, ()>(by.key.sign(m).to_bytes()),
        )
        .unwrap()
    }

    fn receive(by: &Device, content: &Content) -> Result<(Content, Option<Evidence>), Refused> {
        open(
            by.from,
            &content.encode(),
            &by.key.verifying_key().to_bytes(),
            &by.credential,
        )
    }

    #[test]
    fn a_text_arrives_with_its_evidence_and_a_setting_without() {
        let alice = device(1);
        let text = send(&alice, Body::Text { text: "hi".into() }, Some(60_000));
        assert_eq!(text.expire_after_ms, Some(60_000));
        let (opened, evidence) = receive(&alice, &text).unwrap();
        assert_eq!(opened, text);
        let evidence = evidence.expect("a text is reportable");
        assert!(evidence.verify().is_ok());
        // A timer change neither disappears nor is franked.
        let timer = send(
            &alice,
            Body::Timer {
                expire_after_ms: Some(60_000),
            },
            Some(60_000),
        );
        assert_eq!((timer.expire_after_ms, timer.franking.is_some()), (None, false));
        assert!(receive(&alice, &timer).unwrap().1.is_none());
    }

    #[test]
    fn a_text_without_a_proof_or_from_another_sender_is_refused() {
        let (alice, mallory) = (device(1), device(2));
        let mut unfranked = send(&alice, Body::Text { text: "hi".into() }, None);
        unfranked.franking = None;
        assert!(matches!(receive(&alice, &unfranked), Err(Refused::Unfranked)));
        // Alice's franked message presented as coming from Mallory's device.
        let text = send(&alice, Body::Text { text: "hi".into() }, None);
        assert!(matches!(receive(&mallory, &text), Err(Refused::Franking(_))));
        // Altered after franking.
        let mut altered = text.clone();
        altered.body = Body::Text { text: "bye".into() };
        assert!(matches!(receive(&alice, &altered), Err(Refused::Franking(_))));
        assert!(matches!(
            open(alice.from, b"not json", &[0; 32], &[]),
            Err(Refused::Content(_))
        ));
    }
}
