//! Official accounts on the client: trusted authorities, this account's organisation profile,
//! broadcast channels (own and subscribed), forms and their submissions.
//!
//! A channel link, `fumi://channel/<server>/<channel ‖ owner ‖ owner key ‖ epoch ‖ key>`, is all
//! a subscriber needs: the key opens the channel's description and posts, and the owner key in
//! the link (not one the server hands out) is what every post's signature must verify under.
//! The organisation's staff devices subscribe to their own channel with the same link.
//!
//! Form answers travel in the submitter's 1:1 MLS conversation with the organisation's account,
//! whose devices are the staff's devices; each staff device that stores a submission sends a
//! receipt back into that conversation.

use fumi_proto::ErrorCode;
use fumi_proto::endpoints;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fumi_core::AccountIdentity;
use fumi_core::content::Body;
use fumi_core::form::{Answers, FormDefinition, SubmissionRow, to_csv};
use fumi_core::official::{
    CHANNEL_VERSION, ChannelInfo, ChannelKey, ChannelLink, LINK_PAYLOAD_BYTES, Logo, OrganisationClaim,
    OrganisationProfile, Post, PostBody, TrustedAuthority, Verification, VerificationStatement, open_info, open_post,
    seal_info, seal_post,
};
use fumi_core::store::ClientStore;
use fumi_proto::*;
use serde::Serialize;

use crate::devices::{encode_server, parse_code};
use crate::files::check_caption;
use crate::store::{ChannelRow, SubmissionRecord, Submissions};
use crate::store::{FileView, write_private};
use crate::{ClientError, FumiClient, now_ms, random_bytes};

const CHANNEL_PREFIX: &str = "fumi://channel/";
/// Posts fetched per request.
const POSTS_PER_PAGE: u32 = 200;
/// Attempts to take the next post number when several staff devices post at once.
const POST_ATTEMPTS: usize = 5;

/// A channel as `fumi channel list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelSummary {
    /// Channel id (32 hex digits).
    pub id: String,
    /// Channel name.
    pub name: String,
    /// What it is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The organisation that runs it.
    pub organisation: String,
    /// Whether a trusted authority vouches for the organisation.
    pub verification: Verification,
    /// Whether this account owns it (may post).
    pub own: bool,
    /// The link that subscribes (shown to the owner; subscribers may pass theirs on too).
    pub link: String,
    /// Subscriber count, as the server reports it (owner only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribers: Option<u64>,
    /// Posts this device holds.
    pub posts: u64,
}

/// A received (or own) channel post for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelPostView {
    /// Channel id.
    pub channel: String,
    /// Channel name.
    pub channel_name: String,
    /// Organisation name.
    pub organisation: String,
    /// The authority that verified the organisation, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_by: Option<String>,
    /// Post number.
    pub seq: u64,
    /// Organisation's clock, ms since the Unix epoch.
    pub sent_at: u64,
    /// The text, for a text post.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The form, for a form post.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub form: Option<FormSummary>,
    /// The file, for a file post: where it was saved, or why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<FileView>,
}

/// A form this device knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FormSummary {
    /// Form id (32 hex digits).
    pub form_id: String,
    /// Title.
    pub title: String,
    /// Channel id it was published in.
    pub channel: String,
    /// Channel name.
    pub channel_name: String,
    /// Number of questions.
    pub fields: usize,
    /// Whether this account published it.
    pub own: bool,
    /// Submissions this device holds (received, for an own form; sent, otherwise).
    pub submissions: u64,
}

/// A form submission: received by our organisation, or sent by us.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubmissionView {
    /// Submission id.
    pub submission: String,
    /// Form id.
    pub form_id: String,
    /// Form title, if this device knows the form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub form_title: Option<String>,
    /// Who submitted (username or account id).
    pub submitter: String,
    /// Submitter's clock, ms since the Unix epoch.
    pub sent_at: u64,
    /// The answers.
    pub answers: Answers,
    /// Whether this account sent it.
    pub outgoing: bool,
    /// For a sent submission: when a staff device confirmed it, ms since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt_at: Option<u64>,
}

/// A channel post that was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelWarning {
    /// Channel id.
    pub channel: String,
    /// Channel name.
    pub channel_name: String,
    /// The number it was served under.
    pub seq: u64,
    /// Why it was refused.
    pub warning: String,
}

/// Official-account events not shown before: new posts, submissions received by our
/// organisation, receipts for our submissions, refused posts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OfficialEvents {
    /// New channel posts.
    pub posts: Vec<ChannelPostView>,
    /// Submissions received (for an organisation's staff).
    pub submissions: Vec<SubmissionView>,
    /// Our submissions that a staff device confirmed.
    pub receipts: Vec<SubmissionView>,
    /// Posts refused as forged, replayed or altered.
    pub warnings: Vec<ChannelWarning>,
}

impl OfficialEvents {
    /// Whether there is nothing to show.
    pub fn is_empty(&self) -> bool {
        self.posts.is_empty() && self.submissions.is_empty() && self.receipts.is_empty() && self.warnings.is_empty()
    }
}

// --- the client ----------------------------------------------------------------------------

impl FumiClient {
    fn identity(&self) -> AccountIdentity {
        AccountIdentity::from_secret(&self.account.identity_secret)
    }

    // --- authorities and the organisation profile ------------------------------------------

    /// Trusts an authority's key to verify organisations, under a name of the user's choosing.
    pub fn trust_authority(&self, name: &str, public_key_hex: &str) -> Result<(), ClientError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(ClientError::Usage("an authority's name is 1 to 100 characters".into()));
        }
        let mut key = [0u8; 32];
        hex::decode_to_slice(public_key_hex.trim(), &mut key)
            .map_err(|_| ClientError::Usage("an authority key is 64 hexadecimal digits".into()))?;
        if ed25519_dalek::VerifyingKey::from_bytes(&key).is_err() {
            return Err(ClientError::Usage("this is not an Ed25519 public key".into()));
        }
        if self.store.add_authority(name, &key, now_ms())? {
            Ok(())
        } else {
            Err(ClientError::Usage(
                "an authority with this name or key is already trusted".into(),
            ))
        }
    }

    /// Stops trusting an authority.
    pub fn distrust_authority(&self, name: &str) -> Result<(), ClientError> {
        if !self.store.remove_authority(name.trim())? {
            return Err(ClientError::Usage(format!("no trusted authority is named {name:?}")));
        }
        Ok(())
    }

    /// The authorities this user trusts.
    pub fn trusted_authorities(&self) -> Result<Vec<TrustedAuthority>, ClientError> {
        Ok(self.store.authorities()?)
    }

    /// This account's organisation profile (by default: its display name, no logo, unverified).
    pub fn organisation(&self) -> Result<OrganisationProfile, ClientError> {
        Ok(self.store.organisation()?.unwrap_or_else(|| OrganisationProfile {
            name: self.account.display_name.clone(),
            logo: None,
            verification: None,
        }))
    }

    /// Sets the organisation's name and logo (dropping any verification, which named the old
    /// ones) and returns the claim to send to an authority.
    pub async fn set_organisation(
        &mut self,
        name: &str,
        logo: Option<&Path>,
    ) -> Result<OrganisationClaim, ClientError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > fumi_core::official::MAX_NAME_CHARS {
            return Err(ClientError::Usage(format!(
                "an organisation name is 1 to {} characters",
                fumi_core::official::MAX_NAME_CHARS
            )));
        }
        let logo = logo
            .map(|path| {
                let bytes = std::fs::read(path)
                    .map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", path.display())))?;
                let file_name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let media_type = fumi_core::attachment::media_type_for(&file_name);
                Logo::new(media_type, &bytes).map_err(|e| ClientError::Usage(e.to_string()))
            })
            .transpose()?;
        let profile = OrganisationProfile {
            name: name.to_owned(),
            logo,
            verification: None,
        };
        self.store.save_organisation(&profile)?;
        self.republish_channels().await?;
        Ok(self.organisation_claim(&profile))
    }

    fn organisation_claim(&self, profile: &OrganisationProfile) -> OrganisationClaim {
        OrganisationClaim {
            account: self.account.account_id,
            identity_key: self.identity().public_key(),
            name: profile.name.clone(),
            logo_sha256: profile.logo.as_ref().and_then(Logo::sha256),
        }
    }

    /// The claim about this organisation an authority would sign.
    pub fn organisation_request(&self) -> Result<OrganisationClaim, ClientError> {
        Ok(self.organisation_claim(&self.organisation()?))
    }

    /// Installs an authority's statement about this organisation and republishes every own
    /// channel's description with it.
    pub async fn install_verification(&mut self, statement: &str) -> Result<(), ClientError> {
        let statement: VerificationStatement = serde_json::from_str(statement)
            .map_err(|e| ClientError::Usage(format!("not a verification statement: {e}")))?;
        let mut profile = self.organisation()?;
        if statement.claim != self.organisation_claim(&profile) {
            return Err(ClientError::Usage(
                "this statement is about another account, key, name or logo than this organisation's; \
                 run `fumi org request` and have the authority sign that"
                    .into(),
            ));
        }
        // Check the signature itself, whether or not this user trusts the authority.
        let signer = TrustedAuthority {
            name: statement.authority.clone(),
            public_key: statement.authority_key,
        };
        statement
            .verify(std::slice::from_ref(&signer), now_ms())
            .map_err(|reason| ClientError::Usage(format!("refusing the statement: {reason}")))?;
        profile.verification = Some(statement);
        self.store.save_organisation(&profile)?;
        self.republish_channels().await
    }

    async fn republish_channels(&mut self) -> Result<(), ClientError> {
        let organisation = self.organisation()?;
        for mut row in self.store.channel_rows()?.into_iter().filter(|r| r.own) {
            row.info.organisation = organisation.clone();
            let sealed = seal_info(&self.identity(), &row.key, &row.info, &mut rand::rng());
            let update = ChannelInfoUpdate {
                sealed_info: Base64Bytes(sealed),
            };
            let _: () = self
                .transport
                .request(endpoints::UPDATE_CHANNEL, &[&row.channel], Some(&update))
                .await?;
            self.store.save_channel(&row, now_ms())?;
        }
        Ok(())
    }

    // --- channels --------------------------------------------------------------------------

    /// Creates a channel owned by this account and returns it with its link.
    pub async fn create_channel(
        &mut self,
        name: &str,
        description: Option<&str>,
    ) -> Result<ChannelSummary, ClientError> {
        let channel = ChannelId::from_bytes(random_bytes());
        let info = ChannelInfo {
            v: CHANNEL_VERSION,
            channel,
            epoch: 0,
            name: name.trim().to_owned(),
            description: description.map(|d| d.trim().to_owned()),
            organisation: self.organisation()?,
        };
        info.validate().map_err(|e| ClientError::Usage(e.to_string()))?;
        if self
            .store
            .channel_rows()?
            .iter()
            .any(|r| r.own && r.info.name == info.name)
        {
            return Err(ClientError::Usage(format!(
                "you already run a channel named {:?}",
                info.name
            )));
        }
        let key = ChannelKey {
            epoch: 0,
            key: random_bytes(),
        };
        let sealed = seal_info(&self.identity(), &key, &info, &mut rand::rng());
        let row = ChannelRow {
            channel,
            owner: self.account.account_id,
            owner_key: self.identity().public_key(),
            key,
            own: true,
            info,
            last_seq: 0,
        };
        let create = ChannelCreate {
            channel_id: channel,
            sealed_info: Base64Bytes(sealed),
        };
        let _: () = self
            .transport
            .request(endpoints::CREATE_CHANNEL, &[], Some(&create))
            .await?;
        self.store.save_channel(&row, now_ms())?;
        self.summary(&row, Some(0))
    }

    fn channel_link_text(&self, row: &ChannelRow) -> String {
        format!(
            "{CHANNEL_PREFIX}{}/{}",
            encode_server(&self.account.server),
            URL_SAFE_NO_PAD.encode(row.link().to_bytes())
        )
    }

    fn summary(&self, row: &ChannelRow, subscribers: Option<u64>) -> Result<ChannelSummary, ClientError> {
        Ok(ChannelSummary {
            id: row.channel.to_string(),
            name: row.info.name.clone(),
            description: row.info.description.clone(),
            organisation: row.info.organisation.name.clone(),
            verification: self.verification_of(row)?,
            own: row.own,
            link: self.channel_link_text(row),
            subscribers,
            posts: self.store.post_count(row.channel)?,
        })
    }

    fn verification_of(&self, row: &ChannelRow) -> Result<Verification, ClientError> {
        Ok(row
            .info
            .organisation
            .verification(row.owner, &row.owner_key, &self.trusted_authorities()?, now_ms()))
    }

    /// Opens a sealed description of `row`'s channel under its key and owner key.
    fn open_description(row: &ChannelLink, sealed: &[u8]) -> Result<ChannelInfo, ClientError> {
        let key = row.key.clone();
        open_info(
            |epoch| (epoch == key.epoch).then_some(key.key),
            &row.owner_key,
            row.channel,
            sealed,
        )
        .map_err(|e| ClientError::Protocol(format!("refusing the channel's description: {e}")))
    }

    /// Subscribes to a channel by its link: checks the description's signature against the key
    /// in the link, registers for pushes, and fetches the posts so far. The organisation's
    /// own staff devices use this too, to read and post in the channel.
    pub async fn subscribe_channel(&mut self, link: &str) -> Result<ChannelSummary, ClientError> {
        let (server, payload) = parse_code(link, CHANNEL_PREFIX, LINK_PAYLOAD_BYTES, "channel link")?;
        if server.trim_end_matches('/') != self.account.server {
            return Err(ClientError::Usage(format!(
                "this channel is on the server {server}, and your account is on {}",
                self.account.server
            )));
        }
        let link = ChannelLink::from_bytes(&payload).map_err(|e| ClientError::Usage(e.to_string()))?;
        let own = link.owner == self.account.account_id;
        if own && link.owner_key != self.identity().public_key() {
            return Err(ClientError::Usage(
                "this link names your account with another identity key; refusing it".into(),
            ));
        }
        let state = self.channel_state(link.channel).await?;
        let info = Self::open_description(&link, state.sealed_info.as_slice())?;
        let last_seq = self.store.channel_row(link.channel)?.map_or(0, |r| r.last_seq);
        let row = ChannelRow {
            channel: link.channel,
            owner: link.owner,
            owner_key: link.owner_key,
            key: link.key,
            own,
            info,
            last_seq,
        };
        if !own {
            let _: () = self
                .transport
                .request::<(), _>(endpoints::SUBSCRIBE, &[&row.channel], None)
                .await?;
        }
        self.store.save_channel(&row, now_ms())?;
        self.fetch_posts(&row).await?;
        // Posts from before the subscription are history, not news.
        self.store.mark_posts_seen(Some(row.channel))?;
        let row = self.channel_row(&row.channel.to_string())?;
        self.summary(&row, own.then_some(state.subscribers))
    }

    /// Leaves a channel: no more pushes, the count drops, and this device forgets its posts.
    pub async fn unsubscribe_channel(&mut self, channel: &str) -> Result<(), ClientError> {
        let row = self.channel_row(channel)?;
        if !row.own {
            let _: () = self
                .transport
                .request::<(), _>(endpoints::UNSUBSCRIBE, &[&row.channel], None)
                .await?;
        }
        self.store.transaction(|| Ok(self.store.forget_channel(row.channel)?))
    }

    fn channel_row(&self, channel: &str) -> Result<ChannelRow, ClientError> {
        let rows = self.store.channel_rows()?;
        let wanted = channel.trim();
        let matches: Vec<&ChannelRow> = rows
            .iter()
            .filter(|r| r.channel.to_string() == wanted || r.info.name == wanted)
            .collect();
        match matches.as_slice() {
            [] => Err(ClientError::Usage(format!(
                "no channel {wanted:?}; see `fumi channel list`"
            ))),
            [one] => Ok((*one).clone()),
            _ => Err(ClientError::Usage(format!(
                "several channels are named {wanted:?}; use the channel id"
            ))),
        }
    }

    /// Channels this device holds, each description refreshed from the server (a renamed
    /// channel or a new verification shows), with the subscriber count of own channels.
    pub async fn channels(&self) -> Result<Vec<ChannelSummary>, ClientError> {
        let mut summaries = Vec::new();
        for mut row in self.store.channel_rows()? {
            let state = self.channel_state(row.channel).await?;
            match Self::open_description(&row.link(), state.sealed_info.as_slice()) {
                Ok(info) => {
                    row.info = info;
                    self.store.save_channel(&row, now_ms())?;
                }
                // Keep the last good description; say why the new one was refused.
                Err(e) => {
                    tracing::warn!(channel = %row.info.name, error = %e, "kept the channel's earlier description")
                }
            }
            summaries.push(self.summary(&row, row.own.then_some(state.subscribers))?);
        }
        Ok(summaries)
    }

    /// Posts text to an own channel; returns the post's number.
    pub async fn post_text(&mut self, channel: &str, text: &str) -> Result<u64, ClientError> {
        if text.trim().is_empty() {
            return Err(ClientError::Usage("refusing to post an empty text".into()));
        }
        if text.len() > fumi_core::content::MAX_TEXT_BYTES {
            return Err(ClientError::Usage(format!(
                "a post is at most {} bytes of text",
                fumi_core::content::MAX_TEXT_BYTES
            )));
        }
        self.post(channel, PostBody::Text { text: text.to_owned() }).await
    }

    /// Encrypts a file under a fresh key, uploads it as the channel's, and posts it (the key
    /// travels in the signed post); returns the post's number.
    pub async fn post_file(&mut self, channel: &str, path: &Path, caption: Option<&str>) -> Result<u64, ClientError> {
        check_caption(caption)?;
        let row = self.own_channel(channel)?;
        let (attachment, view) = self
            .seal_and_upload(path, |size| BlobCreate {
                size,
                recipients: vec![],
                channel: Some(row.channel),
            })
            .await?;
        let body = PostBody::File {
            attachment,
            caption: caption.map(str::to_owned).filter(|c| !c.trim().is_empty()),
        };
        let seq = self.post(channel, body).await?;
        self.store.set_channel_file(row.channel, seq, &view)?;
        Ok(seq)
    }

    /// Publishes a form (JSON definition, see `docs/OFFICIAL_ACCOUNTS.md`) in an own channel;
    /// returns the form's id.
    pub async fn publish_form(&mut self, channel: &str, definition: &[u8]) -> Result<String, ClientError> {
        let form = FormDefinition::parse(definition).map_err(|e| ClientError::Usage(e.to_string()))?;
        let form_id = hex::encode(random_bytes::<16>());
        let body = PostBody::Form {
            form_id: form_id.clone(),
            form,
        };
        self.post(channel, body).await?;
        Ok(form_id)
    }

    fn own_channel(&self, channel: &str) -> Result<ChannelRow, ClientError> {
        let row = self.channel_row(channel)?;
        if !row.own {
            return Err(ClientError::Usage(format!(
                "only {} can post in {:?}",
                row.info.organisation.name, row.info.name
            )));
        }
        Ok(row)
    }

    /// Signs, seals (once) and stores the next post of an own channel.
    async fn post(&mut self, channel: &str, body: PostBody) -> Result<u64, ClientError> {
        let row = self.own_channel(channel)?;
        // Another staff device may have posted: start after the server's newest post.
        let mut seq = self.channel_state(row.channel).await?.latest_seq + 1;
        for _ in 0..POST_ATTEMPTS {
            let post = Post {
                v: CHANNEL_VERSION,
                channel: row.channel,
                epoch: row.key.epoch,
                seq,
                sent_at: now_ms(),
                body: body.clone(),
            };
            let sealed = seal_post(&self.identity(), &row.key, &post, &mut rand::rng());
            let submit = ChannelPostSubmit {
                seq,
                sealed_post: Base64Bytes(sealed),
            };
            match self
                .transport
                .request::<_, ()>(endpoints::POST_TO_CHANNEL, &[&row.channel], Some(&submit))
                .await
            {
                Ok(()) => {
                    self.store.transaction(|| {
                        self.store.insert_post(&post, true, now_ms())?;
                        // Posts of other staff devices before this one are still to fetch.
                        let last = self.store.channel_row(row.channel)?.map_or(0, |r| r.last_seq);
                        if last + 1 == seq {
                            self.store.set_last_seq(row.channel, seq)?;
                        }
                        Ok(())
                    })?;
                    return Ok(seq);
                }
                Err(e) if e.is_code(ErrorCode::ChannelSeqConflict) => {
                    seq = self.channel_state(row.channel).await?.latest_seq + 1;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Usage(
            "other devices kept posting in this channel at the same time; try again".into(),
        ))
    }

    /// The server's view of a channel: sealed description, counts.
    async fn channel_state(&self, channel: ChannelId) -> Result<ChannelState, ClientError> {
        self.transport
            .request::<(), _>(endpoints::CHANNEL, &[&channel], None)
            .await
            .map_err(|e| match e {
                e if e.is_code(ErrorCode::UnknownChannel) => ClientError::Usage(
                    "the server has no such channel (deleted, or the link is from another server)".into(),
                ),
                other => other,
            })
    }

    /// Fetches the posts of every channel this device holds that it has not seen yet, then
    /// their files.
    pub async fn sync_channels(&mut self) -> Result<(), ClientError> {
        for row in self.store.channel_rows()? {
            self.fetch_posts(&row).await?;
        }
        self.download_channel_files().await
    }

    async fn fetch_posts(&mut self, row: &ChannelRow) -> Result<(), ClientError> {
        let mut after = row.last_seq;
        loop {
            let page: ChannelPosts = self
                .transport
                .request_query::<(), _>(
                    endpoints::CHANNEL_POSTS,
                    &[&row.channel],
                    &[("after", &after), ("limit", &POSTS_PER_PAGE)],
                    None,
                )
                .await?;
            if page.posts.is_empty() {
                return Ok(());
            }
            for post in &page.posts {
                if post.seq <= after {
                    return Err(ClientError::Protocol(
                        "the server served channel posts out of order".into(),
                    ));
                }
                // The server numbers posts without gaps: a hole is a post it withheld.
                if post.seq > after + 1 {
                    let missing = format!(
                        "the server withheld post{} {}{}",
                        if post.seq > after + 2 { "s" } else { "" },
                        after + 1,
                        if post.seq > after + 2 {
                            format!(" to {}", post.seq - 1)
                        } else {
                            String::new()
                        }
                    );
                    self.store.add_warning(row.channel, after + 1, &missing, now_ms())?;
                }
                self.accept_post(row, post.seq, post.sealed_post.as_slice())?;
                after = post.seq;
            }
        }
    }

    /// A channel post pushed on the delivery connection.
    pub(crate) async fn on_channel_push(
        &mut self,
        channel: ChannelId,
        seq: u64,
        sealed: &[u8],
    ) -> Result<(), ClientError> {
        let Some(row) = self.store.channel_row(channel)? else {
            return Ok(()); // unsubscribed on this device
        };
        if seq == row.last_seq + 1 {
            self.accept_post(&row, seq, sealed)
        } else if seq > row.last_seq {
            // A gap: fetch in order.
            self.fetch_posts(&row).await
        } else {
            Ok(())
        }
    }

    /// Checks one post and stores it, or records why it was refused; either way the channel
    /// moves past its number, so a bad post cannot block the ones after it.
    fn accept_post(&self, row: &ChannelRow, seq: u64, sealed: &[u8]) -> Result<(), ClientError> {
        let key = row.key.clone();
        let opened = open_post(
            |epoch| (epoch == key.epoch).then_some(key.key),
            &row.owner_key,
            row.channel,
            seq,
            sealed,
        );
        self.store.transaction(|| {
            match opened {
                Ok(post) => match &post.body {
                    PostBody::Form { form, .. } if form.validate().is_err() => {
                        self.store
                            .add_warning(row.channel, seq, "a form that is not well formed", now_ms())?
                    }
                    _ => self.store.insert_post(&post, false, now_ms())?,
                },
                Err(e) => {
                    tracing::warn!(channel = %row.info.name, seq, error = %e, "refused a channel post");
                    self.store.add_warning(row.channel, seq, &e.to_string(), now_ms())?;
                }
            }
            Ok(self.store.set_last_seq(row.channel, seq)?)
        })
    }

    /// Downloads the files of channel posts this device has not fetched yet.
    async fn download_channel_files(&mut self) -> Result<(), ClientError> {
        for post in self.store.posts(None, false)? {
            let PostBody::File { attachment, .. } = &post.body else {
                continue;
            };
            if self.store.channel_file(post.channel, post.seq)?.is_some() {
                continue;
            }
            if let Some(view) = self.fetch_file(attachment).await {
                self.store.set_channel_file(post.channel, post.seq, &view)?;
            }
        }
        Ok(())
    }

    fn post_view(&self, rows: &[ChannelRow], post: &Post) -> Result<Option<ChannelPostView>, ClientError> {
        let Some(row) = rows.iter().find(|r| r.channel == post.channel) else {
            return Ok(None);
        };
        let verified_by = match self.verification_of(row)? {
            Verification::Verified { authority } => Some(authority),
            Verification::Unverified { .. } => None,
        };
        let (text, form, file) = match &post.body {
            PostBody::Text { text } => (Some(text.clone()), None, None),
            PostBody::File { caption, attachment } => (
                caption.clone(),
                None,
                Some(
                    self.store
                        .channel_file(post.channel, post.seq)?
                        .unwrap_or_else(|| FileView::pending(attachment)),
                ),
            ),
            PostBody::Form { form_id, form } => (None, Some(self.form_summary(row, form_id, form)?), None),
            PostBody::Unknown => (Some("(a post this version of fumi cannot show)".into()), None, None),
        };
        Ok(Some(ChannelPostView {
            channel: row.channel.to_string(),
            channel_name: row.info.name.clone(),
            organisation: row.info.organisation.name.clone(),
            verified_by,
            seq: post.seq,
            sent_at: post.sent_at,
            text,
            form,
            file,
        }))
    }

    /// A channel's posts on this device, oldest first; marks them seen.
    pub fn channel_history(&self, channel: &str) -> Result<Vec<ChannelPostView>, ClientError> {
        let row = self.channel_row(channel)?;
        let posts = self.store.posts(Some(row.channel), false)?;
        self.store.mark_posts_seen(Some(row.channel))?;
        let rows = [row];
        Ok(posts
            .iter()
            .map(|p| self.post_view(&rows, p))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Refused-post warnings of one channel not shown before, marked shown.
    pub fn take_channel_warnings(&self, channel: &str) -> Result<Vec<ChannelWarning>, ClientError> {
        let row = self.channel_row(channel)?;
        self.warnings(Some(row.channel))
    }

    fn warnings(&self, channel: Option<ChannelId>) -> Result<Vec<ChannelWarning>, ClientError> {
        let rows = self.store.channel_rows()?;
        Ok(self
            .store
            .take_warnings(channel)?
            .into_iter()
            .map(|(channel, seq, warning)| ChannelWarning {
                channel: channel.to_string(),
                channel_name: rows
                    .iter()
                    .find(|r| r.channel == channel)
                    .map_or_else(String::new, |r| r.info.name.clone()),
                seq,
                warning,
            })
            .collect())
    }

    // --- forms -----------------------------------------------------------------------------

    fn form_summary(&self, row: &ChannelRow, form_id: &str, form: &FormDefinition) -> Result<FormSummary, ClientError> {
        Ok(FormSummary {
            form_id: form_id.to_owned(),
            title: form.title.clone(),
            channel: row.channel.to_string(),
            channel_name: row.info.name.clone(),
            fields: form.fields.len(),
            own: row.own,
            submissions: self.store.submission_count(row.channel, form_id)?,
        })
    }

    /// Forms this device knows, oldest first.
    pub fn forms(&self) -> Result<Vec<FormSummary>, ClientError> {
        let rows = self.store.channel_rows()?;
        let mut forms = Vec::new();
        for (channel, form_id, form) in self.store.forms()? {
            if let Some(row) = rows.iter().find(|r| r.channel == channel) {
                forms.push(self.form_summary(row, &form_id, &form)?);
            }
        }
        Ok(forms)
    }

    /// A form, by id (or an unambiguous id prefix of 6+ digits, or its exact title): its
    /// channel, id and definition.
    fn find_form(&self, form: &str) -> Result<(ChannelRow, String, FormDefinition), ClientError> {
        let wanted = form.trim();
        let rows = self.store.channel_rows()?;
        let mut matches = Vec::new();
        for (channel, form_id, definition) in self.store.forms()? {
            let named =
                form_id == wanted || definition.title == wanted || (wanted.len() >= 6 && form_id.starts_with(wanted));
            if let (true, Some(row)) = (named, rows.iter().find(|r| r.channel == channel)) {
                matches.push((row.clone(), form_id, definition));
            }
        }
        match matches.len() {
            0 => Err(ClientError::Usage(format!("no form {wanted:?}; see `fumi form list`"))),
            1 => Ok(matches.pop().expect("one")),
            _ => Err(ClientError::Usage(format!(
                "several forms match {wanted:?} (in {}); use the full form id",
                matches
                    .iter()
                    .map(|(row, _, _)| format!("#{}", row.info.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// A form's definition and id.
    pub fn form(&self, form: &str) -> Result<(String, FormDefinition), ClientError> {
        let (_, form_id, definition) = self.find_form(form)?;
        Ok((form_id, definition))
    }

    /// Sends answers to a form, end-to-end encrypted, to the organisation's devices only.
    pub async fn submit_form(&mut self, form: &str, answers: Answers) -> Result<MessageId, ClientError> {
        let (row, form_id, definition) = self.find_form(form)?;
        definition
            .check_answers(&answers)
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        if row.owner == self.account.account_id {
            return Err(ClientError::Usage("this is your own organisation's form".into()));
        }
        // The organisation's key comes from the channel link: pin it, so that a server handing
        // out devices of another key for the organisation is caught when they are added.
        if !self.store.check_identity_key(row.owner, &row.owner_key)? {
            return Err(self.identity_changed(row.owner)?);
        }
        self.store
            .upsert_contact(row.owner, None, Some(&row.info.organisation.name))?;
        self.sync().await?;
        let group = match self.direct_conversation(row.owner)? {
            Some(group) => group,
            None => self.create_conversation(None, &[row.owner]).await?,
        };
        let body = Body::FormSubmission {
            channel: row.channel,
            form_id: form_id.clone(),
            answers: answers.clone(),
        };
        // Recorded before sending: if the network fails, the outbox delivers it later and its
        // receipt still finds it.
        let id = MessageId::from_bytes(random_bytes());
        let record = SubmissionRecord {
            id,
            channel: row.channel,
            form_id,
            group,
            submitter: self.account.account_id,
            answers,
            sent_at: now_ms(),
            outgoing: true,
            receipt_at: None,
        };
        self.store.insert_submission(&record, now_ms())?;
        match self.send_content_as(group, id, body).await {
            Err(e @ (ClientError::Network(_) | ClientError::Server { status: 500.., .. })) => Err(e),
            Err(e) => {
                self.store.delete_submission(id)?;
                Err(e)
            }
            Ok(id) => Ok(id),
        }
    }

    /// Writes the submissions this device received for an own form as CSV (readable only by
    /// this user); returns the number of rows. A submission that does not fit the form (one
    /// stored before this device knew the form) is left out and logged.
    pub fn export_form(&self, form: &str, path: &Path) -> Result<usize, ClientError> {
        let (row, form_id, definition) = self.find_form(form)?;
        let mut rows = Vec::new();
        for s in self.store.submissions(Submissions::Form(row.channel, &form_id))? {
            if s.outgoing {
                continue;
            }
            if let Err(e) = definition.check_answers(&s.answers) {
                tracing::warn!(submission = %s.id, error = %e, "left out a submission that does not fit the form");
                continue;
            }
            rows.push(SubmissionRow {
                id: s.id.to_string(),
                sent_at: s.sent_at,
                submitter: self.display_account(s.submitter)?,
                answers: s.answers,
            });
        }
        let csv = to_csv(&definition, &rows);
        write_private(path, csv.as_bytes())
            .map_err(|e| ClientError::Usage(format!("cannot write {}: {e}", path.display())))?;
        Ok(rows.len())
    }

    /// A form submission arrived (inside the receiving transaction). Kept only if it came in a
    /// 1:1 conversation, for a channel this account runs, and fits the form if this device
    /// knows it yet.
    #[allow(clippy::too_many_arguments)] // the fields of one received content
    /// Sends a receipt for every submission this device stored and has not confirmed yet.
    pub(crate) async fn send_form_receipts(&mut self) -> Result<(), ClientError> {
        for (submission, group) in self.store.unconfirmed_submissions()? {
            if self.device.is_member(group) {
                self.send_content(group, Body::FormReceipt { submission }).await?;
            }
            self.store.mark_receipt_sent(submission)?;
        }
        Ok(())
    }

    fn submission_view(&self, s: SubmissionRecord) -> Result<SubmissionView, ClientError> {
        Ok(SubmissionView {
            submission: s.id.to_string(),
            form_title: self.store.form_definition(s.channel, &s.form_id)?.map(|f| f.title),
            form_id: s.form_id,
            submitter: self.display_account(s.submitter)?,
            sent_at: s.sent_at,
            answers: s.answers,
            outgoing: s.outgoing,
            receipt_at: s.receipt_at,
        })
    }

    /// Submissions this device holds for a form (received, for an own form; sent, otherwise).
    pub fn submissions(&self, form: &str) -> Result<Vec<SubmissionView>, ClientError> {
        let (row, form_id, _) = self.find_form(form)?;
        self.store
            .submissions(Submissions::Form(row.channel, &form_id))?
            .into_iter()
            .map(|s| self.submission_view(s))
            .collect()
    }

    /// Official-account events not shown before, marked shown.
    pub fn take_official_events(&self) -> Result<OfficialEvents, ClientError> {
        self.store.transaction(|| {
            let rows = self.store.channel_rows()?;
            let posts = self
                .store
                .posts(None, true)?
                .iter()
                .map(|p| self.post_view(&rows, p))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flatten()
                .collect();
            self.store.mark_posts_seen(None)?;
            let (receipts, submissions): (Vec<_>, Vec<_>) = self
                .store
                .submissions(Submissions::Unseen)?
                .into_iter()
                .map(|s| self.submission_view(s))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .partition(|s| s.outgoing);
            Ok(OfficialEvents {
                posts,
                submissions,
                receipts,
                warnings: self.warnings(None)?,
            })
        })
    }
}
