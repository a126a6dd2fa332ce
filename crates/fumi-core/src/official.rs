//! Official accounts: organisations verified by an authority, and their broadcast channels.
//!
//! **Verification.** An authority (the operator, a government CA) signs a statement binding an
//! organisation's name and logo to its account id and identity key. Clients trust the authority
//! keys their user configured, not whatever a server says.
//!
//! **Channels.** A channel has a key (per epoch) that only holders of its link know. Each post
//! is signed by the organisation's identity key and then sealed under the channel key, once:
//! a post to a million subscribers costs the organisation one signature and one encryption.
//! The server stores the sealed post under a number and pushes or serves it to subscribers, who
//! check the signature against the key in the link and the signed number against the one it was
//! served under, so a forged, altered, moved or replayed post is refused.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use fumi_proto::{AccountId, ChannelId};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::content::{Attachment, key_hex};
use crate::form::FormDefinition;
use crate::identity::AccountIdentity;
use crate::sealing;

/// Current channel format version.
pub const CHANNEL_VERSION: u32 = 1;
/// Longest organisation or channel name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest channel description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 2000;
/// Largest logo image.
pub const MAX_LOGO_BYTES: usize = 64 * 1024;
/// Bytes of a channel link's payload: channel ‖ owner ‖ owner key ‖ epoch ‖ key.
pub const LINK_PAYLOAD_BYTES: usize = 16 + 16 + 32 + 4 + 32;

const STATEMENT_LABEL: &[u8] = b"fumi organisation verification v1\0";
const INFO_LABEL: &[u8] = b"fumi channel info v1\0";
const POST_LABEL: &[u8] = b"fumi channel post v1\0";

/// Why a statement, a channel description or a post was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OfficialError {
    /// Bytes that do not parse.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// Sealed under a key epoch this client does not hold.
    #[error("this channel's key changed (epoch {0}); only people with the organisation's new channel link can read it")]
    UnknownEpoch(u32),
    /// The AEAD did not open: altered bytes, or another channel's.
    #[error("a channel {0} that does not open under the channel key (altered in storage or transit)")]
    Undecryptable(&'static str),
    /// The signature is not the organisation's.
    #[error("a FORGED channel {0}: it is not signed by the organisation's key")]
    Forged(&'static str),
    /// The signed number differs from the number it was served under.
    #[error(
        "a REPLAYED channel post: the organisation signed it as post {signed}, the server served it as post {served}"
    )]
    Replayed {
        /// Number inside the signature.
        signed: u64,
        /// Number the server gave.
        served: u64,
    },
    /// Signed for another channel or epoch.
    #[error("a channel {0} signed for another channel")]
    WrongChannel(&'static str),
    /// Fields out of range.
    #[error("{0}")]
    Invalid(String),
}

// --- verification statements ---------------------------------------------------------------

/// What an authority vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrganisationClaim {
    /// The organisation's account.
    pub account: AccountId,
    /// Its identity key, which signs its channel posts.
    #[serde(with = "key_hex")]
    pub identity_key: [u8; 32],
    /// Its name as users see it.
    pub name: String,
    /// SHA-256 of its logo image, hex, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo_sha256: Option<String>,
}

/// An authority's signed statement that an account belongs to the named organisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationStatement {
    /// Format version.
    pub v: u32,
    /// The authority's own name for itself (display uses the name the user trusted it as).
    pub authority: String,
    /// The authority's Ed25519 public key.
    #[serde(with = "key_hex")]
    pub authority_key: [u8; 32],
    /// What it vouches for.
    pub claim: OrganisationClaim,
    /// Valid from, ms since the Unix epoch.
    pub issued_at: u64,
    /// Valid until, ms since the Unix epoch.
    pub expires_at: u64,
    /// Ed25519 signature, hex.
    pub signature: String,
}

fn statement_message(
    authority: &str,
    authority_key: &[u8; 32],
    claim: &OrganisationClaim,
    issued_at: u64,
    expires_at: u64,
) -> Vec<u8> {
    let body = serde_json::to_vec(&(authority, hex::encode(authority_key), claim, issued_at, expires_at))
        .expect("a statement serialises");
    [STATEMENT_LABEL, &body].concat()
}

/// An authority's signing key (kept by the authority, never by a server or an organisation).
pub struct AuthorityKey(SigningKey);

impl AuthorityKey {
    /// A fresh key.
    pub fn generate(rng: &mut impl RngCore) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self(SigningKey::from_bytes(&secret))
    }

    /// Restores a key from its secret.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(secret))
    }

    /// The secret, for the key file.
    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public key users trust.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Signs a statement valid from `issued_at` until `expires_at`.
    pub fn issue(
        &self,
        authority: &str,
        claim: OrganisationClaim,
        issued_at: u64,
        expires_at: u64,
    ) -> VerificationStatement {
        let authority_key = self.public_key();
        let signature = self.0.sign(&statement_message(
            authority,
            &authority_key,
            &claim,
            issued_at,
            expires_at,
        ));
        VerificationStatement {
            v: CHANNEL_VERSION,
            authority: authority.to_owned(),
            authority_key,
            claim,
            issued_at,
            expires_at,
            signature: hex::encode(signature.to_bytes()),
        }
    }
}

impl std::fmt::Debug for AuthorityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthorityKey(…)")
    }
}

/// An authority the user trusts: the name they gave it and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedAuthority {
    /// Name chosen by the user (shown as "verified by NAME").
    pub name: String,
    /// Ed25519 public key.
    pub public_key: [u8; 32],
}

impl VerificationStatement {
    /// Checks the signature, the validity period, and that the key is trusted; returns the
    /// trusted authority.
    pub fn verify<'a>(&self, trusted: &'a [TrustedAuthority], now: u64) -> Result<&'a TrustedAuthority, String> {
        let authority = trusted
            .iter()
            .find(|a| a.public_key == self.authority_key)
            .ok_or_else(|| format!("signed by {:?}, an authority you do not trust", self.authority))?;
        let signature = hex::decode(&self.signature)
            .ok()
            .and_then(|bytes| Signature::from_slice(&bytes).ok())
            .ok_or("the statement's signature is malformed")?;
        let key = VerifyingKey::from_bytes(&self.authority_key).map_err(|_| "the authority key is malformed")?;
        let message = statement_message(
            &self.authority,
            &self.authority_key,
            &self.claim,
            self.issued_at,
            self.expires_at,
        );
        key.verify(&message, &signature)
            .map_err(|_| "the statement's signature does not verify: it was forged or altered")?;
        if now < self.issued_at || now > self.expires_at {
            return Err("the statement has expired or is not valid yet".into());
        }
        Ok(authority)
    }
}

// --- organisation profile -------------------------------------------------------------------

/// A small logo image.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logo {
    /// Media type, e.g. `image/png`.
    pub media_type: String,
    /// The image, base64.
    pub data: String,
}

impl std::fmt::Debug for Logo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Logo({}, {} base64 chars)", self.media_type, self.data.len())
    }
}

impl Logo {
    /// Wraps image bytes (at most [`MAX_LOGO_BYTES`]).
    pub fn new(media_type: &str, bytes: &[u8]) -> Result<Self, OfficialError> {
        use base64::Engine;
        if bytes.len() > MAX_LOGO_BYTES {
            return Err(OfficialError::Invalid(format!(
                "a logo is at most {MAX_LOGO_BYTES} bytes"
            )));
        }
        Ok(Self {
            media_type: media_type.to_owned(),
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        })
    }

    /// SHA-256 of the image bytes, hex (what a statement names).
    pub fn sha256(&self) -> Option<String> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(&self.data).ok()?;
        Some(hex::encode(Sha256::digest(bytes)))
    }
}

/// What an organisation shows about itself in its channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrganisationProfile {
    /// Its name.
    pub name: String,
    /// Its logo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo: Option<Logo>,
    /// An authority's statement about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationStatement>,
}

/// Whether a profile is verified, as the user's client judges it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Verification {
    /// A trusted authority vouches for this name, logo, account and key.
    Verified {
        /// The authority, by the name the user trusted it as.
        authority: String,
    },
    /// Not verified, and why.
    Unverified {
        /// Why not.
        reason: String,
    },
}

impl OrganisationProfile {
    /// Judges the profile of the organisation that owns `account` with `identity_key`.
    pub fn verification(
        &self,
        account: AccountId,
        identity_key: &[u8; 32],
        trusted: &[TrustedAuthority],
        now: u64,
    ) -> Verification {
        let unverified = |reason: &str| Verification::Unverified { reason: reason.into() };
        let Some(statement) = &self.verification else {
            return unverified("no verification statement");
        };
        let authority = match statement.verify(trusted, now) {
            Ok(authority) => authority,
            Err(reason) => return unverified(&reason),
        };
        let claim = &statement.claim;
        if claim.account != account || &claim.identity_key != identity_key {
            return unverified("the statement is about another account or key");
        }
        if claim.name != self.name {
            return unverified("the statement names another organisation");
        }
        if claim.logo_sha256 != self.logo.as_ref().and_then(Logo::sha256) {
            return unverified("the statement is for another logo");
        }
        Verification::Verified {
            authority: authority.name.clone(),
        }
    }
}

// --- channels -------------------------------------------------------------------------------

/// A channel's key in one epoch.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelKey {
    /// Epoch number (0 for the first key).
    pub epoch: u32,
    /// XChaCha20-Poly1305 key.
    pub key: [u8; 32],
}

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelKey(epoch {})", self.epoch)
    }
}

/// What a channel link carries: where to read, whose signature to expect, and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelLink {
    /// The channel.
    pub channel: ChannelId,
    /// The organisation's account.
    pub owner: AccountId,
    /// The organisation's identity key: posts must verify under it.
    pub owner_key: [u8; 32],
    /// The current key.
    pub key: ChannelKey,
}

impl ChannelLink {
    /// The link's payload bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        [
            self.channel.as_bytes().as_slice(),
            self.owner.as_bytes(),
            &self.owner_key,
            &self.key.epoch.to_be_bytes(),
            &self.key.key,
        ]
        .concat()
    }

    /// Parses a payload made by [`Self::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OfficialError> {
        if bytes.len() != LINK_PAYLOAD_BYTES {
            return Err(OfficialError::Malformed("channel link"));
        }
        let array = |range: std::ops::Range<usize>| bytes[range].to_vec();
        Ok(Self {
            channel: ChannelId::from_slice(&bytes[0..16]).map_err(|_| OfficialError::Malformed("channel link"))?,
            owner: AccountId::from_slice(&bytes[16..32]).map_err(|_| OfficialError::Malformed("channel link"))?,
            owner_key: array(32..64).try_into().expect("32 bytes"),
            key: ChannelKey {
                epoch: u32::from_be_bytes(array(64..68).try_into().expect("4 bytes")),
                key: array(68..100).try_into().expect("32 bytes"),
            },
        })
    }
}

/// A channel's description, signed by the organisation and sealed under the channel key.
/// Fields a newer version adds are ignored (the signature covers the bytes as sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// Format version.
    pub v: u32,
    /// The channel (checked against the id it was fetched under).
    pub channel: ChannelId,
    /// The key epoch it is sealed in.
    pub epoch: u32,
    /// Channel name.
    pub name: String,
    /// What the channel is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Who runs it.
    pub organisation: OrganisationProfile,
}

impl ChannelInfo {
    /// Checks names and sizes.
    pub fn validate(&self) -> Result<(), OfficialError> {
        let too_long = |text: &str, max: usize| text.trim().is_empty() || text.chars().count() > max;
        if too_long(&self.name, MAX_NAME_CHARS) || too_long(&self.organisation.name, MAX_NAME_CHARS) {
            return Err(OfficialError::Invalid(format!(
                "channel and organisation names are 1 to {MAX_NAME_CHARS} characters"
            )));
        }
        if let Some(description) = &self.description
            && too_long(description, MAX_DESCRIPTION_CHARS)
        {
            return Err(OfficialError::Invalid(format!(
                "a channel description is 1 to {MAX_DESCRIPTION_CHARS} characters"
            )));
        }
        Ok(())
    }
}

/// A post. Fields a newer version adds are ignored (the signature covers the bytes as sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Post {
    /// Format version.
    pub v: u32,
    /// The channel.
    pub channel: ChannelId,
    /// The key epoch it is sealed in.
    pub epoch: u32,
    /// Its number in the channel; the server must serve it under this number.
    pub seq: u64,
    /// Organisation's clock, ms since the Unix epoch.
    pub sent_at: u64,
    /// What it says.
    pub body: PostBody,
}

/// Kinds of post.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PostBody {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// A file in the blob store, readable by every subscriber.
    File {
        /// Where and how it is sealed.
        attachment: Attachment,
        /// Text shown with it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caption: Option<String>,
    },
    /// A form subscribers can fill in; answers go to the organisation's devices only.
    Form {
        /// The form's id (32 hex digits), named by submissions.
        form_id: String,
        /// The questions.
        form: FormDefinition,
    },
    /// A kind this client does not know.
    #[serde(other)]
    Unknown,
}

/// A signed value: the JSON bytes as signed, and the signature.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Signed {
    body: String,
    signature: String,
}

fn seal_signed(
    identity: &AccountIdentity,
    key: &ChannelKey,
    channel: ChannelId,
    sign_label: &[u8],
    body: String,
    rng: &mut impl RngCore,
) -> Vec<u8> {
    let signature = identity.sign_labelled(&[sign_label, body.as_bytes()].concat());
    let signed = serde_json::to_vec(&Signed {
        body,
        signature: hex::encode(signature),
    })
    .expect("serialises");
    let sealed = sealing::seal(&key.key, &seal_label(sign_label, channel, key.epoch), &signed, rng);
    [key.epoch.to_be_bytes().as_slice(), &sealed].concat()
}

fn seal_label(sign_label: &[u8], channel: ChannelId, epoch: u32) -> Vec<u8> {
    [sign_label, channel.as_bytes(), &epoch.to_be_bytes()].concat()
}

fn open_signed(
    key_for: impl Fn(u32) -> Option<[u8; 32]>,
    owner_key: &[u8; 32],
    channel: ChannelId,
    sign_label: &[u8],
    what: &'static str,
    sealed: &[u8],
) -> Result<(u32, String), OfficialError> {
    if sealed.len() < 4 {
        return Err(OfficialError::Malformed(what));
    }
    let (epoch, sealed) = sealed.split_at(4);
    let epoch = u32::from_be_bytes(epoch.try_into().expect("4 bytes"));
    let key = key_for(epoch).ok_or(OfficialError::UnknownEpoch(epoch))?;
    let opened = sealing::open(&key, &seal_label(sign_label, channel, epoch), sealed)
        .ok_or(OfficialError::Undecryptable(what))?;
    let signed: Signed = serde_json::from_slice(&opened).map_err(|_| OfficialError::Malformed(what))?;
    let signature = hex::decode(&signed.signature)
        .ok()
        .and_then(|bytes| Signature::from_slice(&bytes).ok())
        .ok_or(OfficialError::Malformed(what))?;
    let verifier = VerifyingKey::from_bytes(owner_key).map_err(|_| OfficialError::Malformed("organisation key"))?;
    verifier
        .verify(&[sign_label, signed.body.as_bytes()].concat(), &signature)
        .map_err(|_| OfficialError::Forged(what))?;
    Ok((epoch, signed.body))
}

fn check_version(v: u32) -> Result<(), OfficialError> {
    if v > CHANNEL_VERSION {
        return Err(OfficialError::Invalid(format!(
            "channel format version {v} is newer than this fumi understands; upgrade to read it"
        )));
    }
    Ok(())
}

/// Signs and seals a channel description.
pub fn seal_info(identity: &AccountIdentity, key: &ChannelKey, info: &ChannelInfo, rng: &mut impl RngCore) -> Vec<u8> {
    let body = serde_json::to_string(info).expect("serialises");
    seal_signed(identity, key, info.channel, INFO_LABEL, body, rng)
}

/// Opens and checks a channel description fetched for `channel`.
pub fn open_info(
    key_for: impl Fn(u32) -> Option<[u8; 32]>,
    owner_key: &[u8; 32],
    channel: ChannelId,
    sealed: &[u8],
) -> Result<ChannelInfo, OfficialError> {
    let (epoch, body) = open_signed(key_for, owner_key, channel, INFO_LABEL, "description", sealed)?;
    let info: ChannelInfo = serde_json::from_str(&body).map_err(|_| OfficialError::Malformed("description"))?;
    check_version(info.v)?;
    if info.channel != channel || info.epoch != epoch {
        return Err(OfficialError::WrongChannel("description"));
    }
    info.validate()?;
    Ok(info)
}

/// Signs and seals a post (one signature and one encryption, whatever the audience).
pub fn seal_post(identity: &AccountIdentity, key: &ChannelKey, post: &Post, rng: &mut impl RngCore) -> Vec<u8> {
    let body = serde_json::to_string(post).expect("serialises");
    seal_signed(identity, key, post.channel, POST_LABEL, body, rng)
}

/// Opens and checks a post the server served as number `served_seq` of `channel`.
pub fn open_post(
    key_for: impl Fn(u32) -> Option<[u8; 32]>,
    owner_key: &[u8; 32],
    channel: ChannelId,
    served_seq: u64,
    sealed: &[u8],
) -> Result<Post, OfficialError> {
    let (epoch, body) = open_signed(key_for, owner_key, channel, POST_LABEL, "post", sealed)?;
    let post: Post = serde_json::from_str(&body).map_err(|_| OfficialError::Malformed("post"))?;
    check_version(post.v)?;
    if post.channel != channel || post.epoch != epoch {
        return Err(OfficialError::WrongChannel("post"));
    }
    if post.seq != served_seq {
        return Err(OfficialError::Replayed {
            signed: post.seq,
            served: served_seq,
        });
    }
    Ok(post)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Org {
        identity: AccountIdentity,
        account: AccountId,
        link: ChannelLink,
    }

    fn org() -> Org {
        let mut rng = rand::rng();
        let identity = AccountIdentity::generate(&mut rng);
        let account = AccountId::from_bytes([1; 16]);
        let link = ChannelLink {
            channel: ChannelId::from_bytes([2; 16]),
            owner: account,
            owner_key: identity.public_key(),
            key: ChannelKey { epoch: 0, key: [3; 32] },
        };
        Org {
            identity,
            account,
            link,
        }
    }

    fn text_post(org: &Org, seq: u64, text: &str) -> Post {
        Post {
            v: CHANNEL_VERSION,
            channel: org.link.channel,
            epoch: 0,
            seq,
            sent_at: 1,
            body: PostBody::Text { text: text.into() },
        }
    }

    fn open(org: &Org, seq: u64, sealed: &[u8]) -> Result<Post, OfficialError> {
        let key = org.link.key.clone();
        open_post(
            |epoch| (epoch == key.epoch).then_some(key.key),
            &org.link.owner_key,
            org.link.channel,
            seq,
            sealed,
        )
    }

    #[test]
    fn a_post_opens_only_as_signed() {
        let org = org();
        let mut rng = rand::rng();
        let post = text_post(&org, 1, "clinic opens at 9");
        let sealed = seal_post(&org.identity, &org.link.key, &post, &mut rng);
        assert_eq!(open(&org, 1, &sealed).unwrap(), post);
        // Served under another number: a replay.
        assert_eq!(
            open(&org, 3, &sealed),
            Err(OfficialError::Replayed { signed: 1, served: 3 })
        );
        // Signed by someone who knows the channel key but is not the organisation.
        let forger = AccountIdentity::generate(&mut rng);
        let forged = seal_post(&forger, &org.link.key, &post, &mut rng);
        assert_eq!(open(&org, 1, &forged), Err(OfficialError::Forged("post")));
        // Flipped bit.
        let mut altered = sealed.clone();
        altered[40] ^= 1;
        assert_eq!(open(&org, 1, &altered), Err(OfficialError::Undecryptable("post")));
        // A newer epoch this subscriber has no key for.
        let rotated = ChannelKey { epoch: 1, key: [4; 32] };
        let later = seal_post(
            &org.identity,
            &rotated,
            &Post {
                epoch: 1,
                ..post.clone()
            },
            &mut rng,
        );
        assert_eq!(open(&org, 1, &later), Err(OfficialError::UnknownEpoch(1)));
        // A post of another channel, re-sealed by a holder of both keys, does not verify here.
        let elsewhere = Post {
            channel: ChannelId::from_bytes([9; 16]),
            ..post
        };
        let moved = seal_signed(
            &org.identity,
            &org.link.key,
            org.link.channel,
            POST_LABEL,
            serde_json::to_string(&elsewhere).unwrap(),
            &mut rng,
        );
        assert_eq!(open(&org, 1, &moved), Err(OfficialError::WrongChannel("post")));
        assert!(open(&org, 1, &[1, 2]).is_err());
    }

    #[test]
    fn a_description_signature_is_not_a_post_signature() {
        let org = org();
        let mut rng = rand::rng();
        let info = ChannelInfo {
            v: CHANNEL_VERSION,
            channel: org.link.channel,
            epoch: 0,
            name: "Health notices".into(),
            description: None,
            organisation: OrganisationProfile {
                name: "City".into(),
                logo: None,
                verification: None,
            },
        };
        let sealed = seal_info(&org.identity, &org.link.key, &info, &mut rng);
        let key = org.link.key.key;
        assert_eq!(
            open_info(|_| Some(key), &org.link.owner_key, org.link.channel, &sealed).unwrap(),
            info
        );
        assert!(open(&org, 1, &sealed).is_err());
    }

    #[test]
    fn links_round_trip() {
        let org = org();
        assert_eq!(ChannelLink::from_bytes(&org.link.to_bytes()).unwrap(), org.link);
        assert!(ChannelLink::from_bytes(&[0; 99]).is_err());
    }

    #[test]
    fn verification_binds_name_logo_account_and_key() {
        let org = org();
        let mut rng = rand::rng();
        let authority = AuthorityKey::generate(&mut rng);
        let trusted = [TrustedAuthority {
            name: "Digital Agency".into(),
            public_key: authority.public_key(),
        }];
        let logo = Logo::new("image/png", b"\x89PNG logo").unwrap();
        let claim = OrganisationClaim {
            account: org.account,
            identity_key: org.identity.public_key(),
            name: "City of Kobe".into(),
            logo_sha256: logo.sha256(),
        };
        let profile = OrganisationProfile {
            name: "City of Kobe".into(),
            logo: Some(logo),
            verification: Some(authority.issue("DA", claim, 100, 200)),
        };
        let key = org.identity.public_key();
        let verified = Verification::Verified {
            authority: "Digital Agency".into(),
        };
        assert_eq!(profile.verification(org.account, &key, &trusted, 150), verified);
        let reason = |v: Verification| match v {
            Verification::Unverified { reason } => reason,
            Verification::Verified { .. } => panic!("should not verify"),
        };
        assert!(reason(profile.verification(org.account, &key, &trusted, 201)).contains("expired"));
        assert!(reason(profile.verification(org.account, &key, &[], 150)).contains("do not trust"));
        assert!(
            reason(profile.verification(AccountId::from_bytes([7; 16]), &key, &trusted, 150))
                .contains("another account")
        );
        let renamed = OrganisationProfile {
            name: "City of Kobe (official)".into(),
            ..profile.clone()
        };
        assert!(reason(renamed.verification(org.account, &key, &trusted, 150)).contains("another organisation"));
        let relogo = OrganisationProfile {
            logo: Some(Logo::new("image/png", b"other").unwrap()),
            ..profile.clone()
        };
        assert!(reason(relogo.verification(org.account, &key, &trusted, 150)).contains("another logo"));
        let mut tampered = profile.clone();
        tampered.verification.as_mut().unwrap().expires_at = 10_000;
        assert!(reason(tampered.verification(org.account, &key, &trusted, 150)).contains("forged"));
    }
}
