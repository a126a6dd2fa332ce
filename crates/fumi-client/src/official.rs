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

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fumi_core::AccountIdentity;
use fumi_core::content::Body;
use fumi_core::form::{Answers, FormDefinition, SubmissionRow, to_csv};
use fumi_core::mls::Member;
use fumi_core::official::{
    CHANNEL_VERSION, ChannelInfo, ChannelKey, ChannelLink, LINK_PAYLOAD_BYTES, Logo, OrganisationClaim,
    OrganisationProfile, Post, PostBody, TrustedAuthority, Verification, VerificationStatement, open_info, open_post,
    seal_info, seal_post,
};
use fumi_proto::*;
use reqwest::Method;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::devices::{encode_server, parse_code};
use crate::store::{Store, id16, key32, sql};
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

/// A channel as stored on this device.
#[derive(Debug, Clone)]
struct ChannelRow {
    channel: ChannelId,
    owner: AccountId,
    owner_key: [u8; 32],
    key: ChannelKey,
    own: bool,
    info: ChannelInfo,
    last_seq: u64,
}

impl ChannelRow {
    fn link(&self) -> ChannelLink {
        ChannelLink {
            channel: self.channel,
            owner: self.owner,
            owner_key: self.owner_key,
            key: self.key.clone(),
        }
    }
}

fn json_err(e: serde_json::Error) -> ClientError {
    ClientError::Store(format!("stored JSON: {e}"))
}

// --- store -----------------------------------------------------------------------------------

impl Store {
    fn save_channel(&self, row: &ChannelRow) -> Result<(), ClientError> {
        let info = serde_json::to_string(&row.info).map_err(json_err)?;
        self.conn
            .execute(
                "INSERT INTO channels (channel_id, owner_account, owner_key, epoch, channel_key, own, info, last_seq, added_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (channel_id) DO UPDATE SET epoch = ?4, channel_key = ?5, info = ?7",
                params![
                    row.channel.as_bytes().as_slice(),
                    row.owner.as_bytes().as_slice(),
                    row.owner_key.as_slice(),
                    row.key.epoch,
                    row.key.key.as_slice(),
                    row.own,
                    info,
                    row.last_seq as i64,
                    now_ms() as i64
                ],
            )
            .map_err(sql)?;
        Ok(())
    }

    fn channel_rows(&self) -> Result<Vec<ChannelRow>, ClientError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT channel_id, owner_account, owner_key, epoch, channel_key, own, info, last_seq
                 FROM channels ORDER BY added_at",
            )
            .map_err(sql)?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    id16(r.get(0)?, ChannelId::from_slice)?,
                    id16(r.get(1)?, AccountId::from_slice)?,
                    key32(r.get(2)?)?,
                    r.get::<_, u32>(3)?,
                    key32(r.get(4)?)?,
                    r.get::<_, bool>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)? as u64,
                ))
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        rows.into_iter()
            .map(|(channel, owner, owner_key, epoch, key, own, info, last_seq)| {
                Ok(ChannelRow {
                    channel,
                    owner,
                    owner_key,
                    key: ChannelKey { epoch, key },
                    own,
                    info: serde_json::from_str(&info).map_err(json_err)?,
                    last_seq,
                })
            })
            .collect()
    }

    fn set_last_seq(&self, channel: ChannelId, seq: u64) -> Result<(), ClientError> {
        self.conn
            .execute(
                "UPDATE channels SET last_seq = MAX(last_seq, ?) WHERE channel_id = ?",
                params![seq as i64, channel.as_bytes().as_slice()],
            )
            .map_err(sql)?;
        Ok(())
    }

    fn insert_post(&self, post: &Post, seen: bool) -> Result<(), ClientError> {
        let json = serde_json::to_string(post).map_err(json_err)?;
        self.conn
            .execute(
                "INSERT OR IGNORE INTO channel_posts (channel_id, seq, post, received_at, seen) VALUES (?, ?, ?, ?, ?)",
                params![
                    post.channel.as_bytes().as_slice(),
                    post.seq as i64,
                    json,
                    now_ms() as i64,
                    seen
                ],
            )
            .map_err(sql)?;
        if let PostBody::Form { form_id, form } = &post.body {
            self.conn
                .execute(
                    "INSERT OR IGNORE INTO forms (form_id, channel_id, definition, published_at) VALUES (?, ?, ?, ?)",
                    params![
                        form_id,
                        post.channel.as_bytes().as_slice(),
                        serde_json::to_string(form).map_err(json_err)?,
                        post.sent_at as i64
                    ],
                )
                .map_err(sql)?;
        }
        Ok(())
    }

    fn posts(&self, channel: Option<ChannelId>, unseen_only: bool) -> Result<Vec<Post>, ClientError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT post FROM channel_posts
                 WHERE (?1 IS NULL OR channel_id = ?1) AND (?2 = 0 OR seen = 0) ORDER BY received_at, seq",
            )
            .map_err(sql)?;
        let posts = statement
            .query_map(params![channel.map(|c| c.as_bytes().to_vec()), unseen_only], |r| {
                r.get::<_, String>(0)
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        posts
            .iter()
            .map(|p| serde_json::from_str(p).map_err(json_err))
            .collect()
    }

    fn add_warning(&self, channel: ChannelId, seq: u64, warning: &str) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT INTO channel_warnings (channel_id, seq, warning, created_at) VALUES (?, ?, ?, ?)",
                params![channel.as_bytes().as_slice(), seq as i64, warning, now_ms() as i64],
            )
            .map_err(sql)?;
        Ok(())
    }

    fn form_definition(&self, form_id: &str) -> Result<Option<(ChannelId, FormDefinition)>, ClientError> {
        let row: Option<(Vec<u8>, String)> = self
            .conn
            .query_row(
                "SELECT channel_id, definition FROM forms WHERE form_id = ?",
                [form_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql)?;
        row.map(|(channel, definition)| {
            Ok((
                ChannelId::from_slice(&channel).map_err(|e| ClientError::Store(e.to_string()))?,
                serde_json::from_str(&definition).map_err(json_err)?,
            ))
        })
        .transpose()
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_submission(
        &self,
        submission: MessageId,
        form_id: &str,
        group: GroupId,
        submitter: AccountId,
        answers: &Answers,
        sent_at: u64,
        outgoing: bool,
    ) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO form_submissions
                 (submission_id, form_id, group_id, submitter, answers, sent_at, received_at, outgoing, seen)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    submission.as_bytes().as_slice(),
                    form_id,
                    group.as_bytes().as_slice(),
                    submitter.as_bytes().as_slice(),
                    serde_json::to_string(answers).map_err(json_err)?,
                    sent_at as i64,
                    now_ms() as i64,
                    outgoing,
                    outgoing
                ],
            )
            .map_err(sql)?;
        Ok(())
    }
}

/// A submission row as stored.
struct SubmissionRecord {
    id: MessageId,
    form_id: String,
    submitter: AccountId,
    answers: Answers,
    sent_at: u64,
    outgoing: bool,
    receipt_at: Option<u64>,
}

impl Store {
    fn submissions(&self, filter: &str, arg: &dyn rusqlite::ToSql) -> Result<Vec<SubmissionRecord>, ClientError> {
        let query = format!(
            "SELECT submission_id, form_id, submitter, answers, sent_at, outgoing, receipt_at
             FROM form_submissions WHERE {filter} ORDER BY sent_at, received_at"
        );
        let mut statement = self.conn.prepare(&query).map_err(sql)?;
        let rows = statement
            .query_map([arg], |r| {
                Ok((
                    id16(r.get(0)?, MessageId::from_slice)?,
                    r.get::<_, String>(1)?,
                    id16(r.get(2)?, AccountId::from_slice)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)? as u64,
                    r.get::<_, bool>(5)?,
                    r.get::<_, Option<i64>>(6)?.map(|t| t as u64),
                ))
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        rows.into_iter()
            .map(|(id, form_id, submitter, answers, sent_at, outgoing, receipt_at)| {
                Ok(SubmissionRecord {
                    id,
                    form_id,
                    submitter,
                    answers: serde_json::from_str(&answers).map_err(json_err)?,
                    sent_at,
                    outgoing,
                    receipt_at,
                })
            })
            .collect()
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
        self.store
            .conn
            .execute(
                "INSERT INTO authorities (name, public_key, added_at) VALUES (?, ?, ?)",
                params![name, key.as_slice(), now_ms() as i64],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    ClientError::Usage("an authority with this name or key is already trusted".into())
                }
                other => sql(other),
            })?;
        Ok(())
    }

    /// Stops trusting an authority.
    pub fn distrust_authority(&self, name: &str) -> Result<(), ClientError> {
        let removed = self
            .store
            .conn
            .execute("DELETE FROM authorities WHERE name = ?", [name.trim()])
            .map_err(sql)?;
        if removed == 0 {
            return Err(ClientError::Usage(format!("no trusted authority is named {name:?}")));
        }
        Ok(())
    }

    /// The authorities this user trusts.
    pub fn trusted_authorities(&self) -> Result<Vec<TrustedAuthority>, ClientError> {
        let mut statement = self
            .store
            .conn
            .prepare("SELECT name, public_key FROM authorities ORDER BY name")
            .map_err(sql)?;
        statement
            .query_map([], |r| {
                Ok(TrustedAuthority {
                    name: r.get(0)?,
                    public_key: key32(r.get(1)?)?,
                })
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)
    }

    /// This account's organisation profile (by default: its display name, no logo, unverified).
    pub fn organisation(&self) -> Result<OrganisationProfile, ClientError> {
        let stored: Option<String> = self
            .store
            .conn
            .query_row("SELECT profile FROM organisation WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        match stored {
            Some(json) => serde_json::from_str(&json).map_err(json_err),
            None => Ok(OrganisationProfile {
                name: self.account.display_name.clone(),
                logo: None,
                verification: None,
            }),
        }
    }

    fn save_organisation(&self, profile: &OrganisationProfile) -> Result<(), ClientError> {
        let json = serde_json::to_string(profile).map_err(json_err)?;
        self.store
            .conn
            .execute(
                "INSERT INTO organisation (id, profile) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET profile = ?1",
                [json],
            )
            .map_err(sql)?;
        Ok(())
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
        self.save_organisation(&profile)?;
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
        self.save_organisation(&profile)?;
        self.republish_channels().await
    }

    async fn republish_channels(&mut self) -> Result<(), ClientError> {
        let organisation = self.organisation()?;
        for mut row in self.store.channel_rows()?.into_iter().filter(|r| r.own) {
            row.info.organisation = organisation.clone();
            let sealed = seal_info(&self.identity(), &row.key, &row.info, &mut rand::rng());
            let _: () = self
                .transport
                .request(
                    Method::PUT,
                    &format!("/v1/channels/{}", row.channel),
                    Some(&ChannelInfoUpdate {
                        sealed_info: Base64Bytes(sealed),
                    }),
                )
                .await?;
            self.store.save_channel(&row)?;
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
        if self.store.channel_rows()?.iter().any(|r| r.info.name == info.name) {
            return Err(ClientError::Usage(format!(
                "you already have a channel named {:?}",
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
        let _: () = self
            .transport
            .request(
                Method::POST,
                "/v1/channels",
                Some(&ChannelCreate {
                    channel_id: channel,
                    sealed_info: Base64Bytes(sealed),
                }),
            )
            .await?;
        self.store.save_channel(&row)?;
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
        let posts: i64 = self
            .store
            .conn
            .query_row(
                "SELECT COUNT(*) FROM channel_posts WHERE channel_id = ?",
                [row.channel.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .map_err(sql)?;
        Ok(ChannelSummary {
            id: row.channel.to_string(),
            name: row.info.name.clone(),
            description: row.info.description.clone(),
            organisation: row.info.organisation.name.clone(),
            verification: self.verification_of(row)?,
            own: row.own,
            link: self.channel_link_text(row),
            subscribers,
            posts: posts as u64,
        })
    }

    fn verification_of(&self, row: &ChannelRow) -> Result<Verification, ClientError> {
        Ok(row
            .info
            .organisation
            .verification(row.owner, &row.owner_key, &self.trusted_authorities()?, now_ms()))
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
        let key = link.key.clone();
        let info = open_info(
            |epoch| (epoch == key.epoch).then_some(key.key),
            &link.owner_key,
            link.channel,
            state.sealed_info.as_slice(),
        )
        .map_err(|e| ClientError::Protocol(format!("refusing the channel: {e}")))?;
        let last_seq = self
            .store
            .channel_rows()?
            .into_iter()
            .find(|r| r.channel == link.channel)
            .map_or(0, |r| r.last_seq);
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
                .request::<(), _>(Method::PUT, &format!("/v1/channels/{}/subscription", row.channel), None)
                .await?;
        }
        self.store.save_channel(&row)?;
        self.fetch_posts(&row).await?;
        // Posts from before the subscription are history, not news.
        self.store
            .conn
            .execute(
                "UPDATE channel_posts SET seen = 1 WHERE channel_id = ?",
                [row.channel.as_bytes().as_slice()],
            )
            .map_err(sql)?;
        let row = self.channel_row(&row.channel.to_string())?;
        self.summary(&row, own.then_some(state.subscribers))
    }

    /// Leaves a channel: no more pushes, the count drops, and this device forgets its posts.
    pub async fn unsubscribe_channel(&mut self, channel: &str) -> Result<(), ClientError> {
        let row = self.channel_row(channel)?;
        if !row.own {
            let _: () = self
                .transport
                .request::<(), _>(
                    Method::DELETE,
                    &format!("/v1/channels/{}/subscription", row.channel),
                    None,
                )
                .await?;
        }
        let id = row.channel.as_bytes().as_slice();
        self.store.transaction(|| {
            for statement in [
                "DELETE FROM channel_posts WHERE channel_id = ?",
                "DELETE FROM channel_warnings WHERE channel_id = ?",
                "DELETE FROM channels WHERE channel_id = ?",
            ] {
                self.store.conn.execute(statement, [id]).map_err(sql)?;
            }
            Ok(())
        })
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

    /// Channels this device holds; for own channels, with the server's subscriber count.
    pub async fn channels(&self) -> Result<Vec<ChannelSummary>, ClientError> {
        let mut summaries = Vec::new();
        for row in self.store.channel_rows()? {
            let subscribers = if row.own {
                Some(self.channel_state(row.channel).await?.subscribers)
            } else {
                None
            };
            summaries.push(self.summary(&row, subscribers)?);
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

    /// Publishes a form (JSON definition, see `docs/OFFICIAL_ACCOUNTS.md`) in an own channel;
    /// returns the form's id.
    pub async fn publish_form(&mut self, channel: &str, definition: &[u8]) -> Result<String, ClientError> {
        let form = FormDefinition::parse(definition).map_err(|e| ClientError::Usage(e.to_string()))?;
        let form_id = hex::encode(random_bytes::<16>());
        self.post(
            channel,
            PostBody::Form {
                form_id: form_id.clone(),
                form,
            },
        )
        .await?;
        Ok(form_id)
    }

    /// Signs, seals (once) and stores the next post of an own channel.
    async fn post(&mut self, channel: &str, body: PostBody) -> Result<u64, ClientError> {
        let row = self.channel_row(channel)?;
        if !row.own {
            return Err(ClientError::Usage(format!(
                "only {} can post in {:?}",
                row.info.organisation.name, row.info.name
            )));
        }
        // Another staff device may have posted: start after the server's newest post.
        let mut seq = self.latest_seq(row.channel).await? + 1;
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
            let path = format!("/v1/channels/{}/posts", row.channel);
            match self
                .transport
                .request::<_, ()>(Method::POST, &path, Some(&submit))
                .await
            {
                Ok(()) => {
                    self.store.transaction(|| {
                        self.store.insert_post(&post, true)?;
                        self.store.set_last_seq(row.channel, seq)
                    })?;
                    return Ok(seq);
                }
                Err(e) if e.is_code("channel_seq_conflict") => seq = self.latest_seq(row.channel).await? + 1,
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Usage(
            "other devices kept posting in this channel at the same time; try again".into(),
        ))
    }

    async fn latest_seq(&self, channel: ChannelId) -> Result<u64, ClientError> {
        Ok(self.channel_state(channel).await?.latest_seq)
    }

    /// The server's view of a channel: sealed description, counts.
    async fn channel_state(&self, channel: ChannelId) -> Result<ChannelState, ClientError> {
        self.transport
            .request::<(), _>(Method::GET, &format!("/v1/channels/{channel}"), None)
            .await
            .map_err(|e| match e {
                e if e.is_code("unknown_channel") => ClientError::Usage(
                    "the server has no such channel (deleted, or the link is from another server)".into(),
                ),
                other => other,
            })
    }

    /// Fetches the posts of every channel this device holds that it has not seen yet.
    pub async fn sync_channels(&mut self) -> Result<(), ClientError> {
        for row in self.store.channel_rows()? {
            self.fetch_posts(&row).await?;
        }
        Ok(())
    }

    async fn fetch_posts(&mut self, row: &ChannelRow) -> Result<(), ClientError> {
        let mut after = row.last_seq;
        loop {
            let page: ChannelPosts = self
                .transport
                .request::<(), _>(
                    Method::GET,
                    &format!(
                        "/v1/channels/{}/posts?after={after}&limit={POSTS_PER_PAGE}",
                        row.channel
                    ),
                    None,
                )
                .await?;
            let Some(last) = page.posts.last().map(|p| p.seq) else {
                return Ok(());
            };
            for post in &page.posts {
                self.accept_post(row, post.seq, post.sealed_post.as_slice())?;
            }
            if last <= after {
                return Err(ClientError::Protocol(
                    "the server served channel posts out of order".into(),
                ));
            }
            after = last;
        }
    }

    /// A channel post pushed on the delivery connection.
    pub(crate) async fn on_channel_push(
        &mut self,
        channel: ChannelId,
        seq: u64,
        sealed: &[u8],
    ) -> Result<(), ClientError> {
        let Some(row) = self.store.channel_rows()?.into_iter().find(|r| r.channel == channel) else {
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
                            .add_warning(row.channel, seq, "a form that is not well formed")?
                    }
                    _ => self.store.insert_post(&post, false)?,
                },
                Err(e) => {
                    tracing::warn!(channel = %row.info.name, seq, error = %e, "refused a channel post");
                    self.store.add_warning(row.channel, seq, &e.to_string())?;
                }
            }
            self.store.set_last_seq(row.channel, seq)
        })
    }

    fn post_view(&self, rows: &[ChannelRow], post: &Post) -> Result<Option<ChannelPostView>, ClientError> {
        let Some(row) = rows.iter().find(|r| r.channel == post.channel) else {
            return Ok(None);
        };
        let verified_by = match self.verification_of(row)? {
            Verification::Verified { authority } => Some(authority),
            Verification::Unverified { .. } => None,
        };
        let (text, form) = match &post.body {
            PostBody::Text { text } => (Some(text.clone()), None),
            PostBody::File { caption, .. } => (caption.clone(), None),
            PostBody::Form { form_id, .. } => (None, self.form_summary(form_id)?),
            PostBody::Unknown => (Some("(a post this version of fumi cannot show)".into()), None),
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
        }))
    }

    /// A channel's posts on this device, oldest first; marks them seen.
    pub fn channel_history(&self, channel: &str) -> Result<Vec<ChannelPostView>, ClientError> {
        let row = self.channel_row(channel)?;
        let posts = self.store.posts(Some(row.channel), false)?;
        self.store
            .conn
            .execute(
                "UPDATE channel_posts SET seen = 1 WHERE channel_id = ?",
                [row.channel.as_bytes().as_slice()],
            )
            .map_err(sql)?;
        let rows = [row];
        Ok(posts
            .iter()
            .map(|p| self.post_view(&rows, p))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    // --- forms -----------------------------------------------------------------------------

    fn form_summary(&self, form_id: &str) -> Result<Option<FormSummary>, ClientError> {
        let Some((channel, form)) = self.store.form_definition(form_id)? else {
            return Ok(None);
        };
        let row = self.store.channel_rows()?.into_iter().find(|r| r.channel == channel);
        let submissions: i64 = self
            .store
            .conn
            .query_row(
                "SELECT COUNT(*) FROM form_submissions WHERE form_id = ?",
                [form_id],
                |r| r.get(0),
            )
            .map_err(sql)?;
        Ok(Some(FormSummary {
            form_id: form_id.to_owned(),
            title: form.title.clone(),
            channel: channel.to_string(),
            channel_name: row.as_ref().map_or_else(String::new, |r| r.info.name.clone()),
            fields: form.fields.len(),
            own: row.is_some_and(|r| r.own),
            submissions: submissions as u64,
        }))
    }

    /// Forms this device knows, oldest first.
    pub fn forms(&self) -> Result<Vec<FormSummary>, ClientError> {
        let mut statement = self
            .store
            .conn
            .prepare("SELECT form_id FROM forms ORDER BY published_at")
            .map_err(sql)?;
        let ids = statement
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(ids
            .iter()
            .map(|id| self.form_summary(id))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    /// A form's definition, by id (or an unambiguous id prefix, or its exact title).
    pub fn form(&self, form: &str) -> Result<(String, FormDefinition), ClientError> {
        let wanted = form.trim();
        let matches: Vec<(String, FormDefinition)> = self
            .forms()?
            .into_iter()
            .filter(|f| {
                f.form_id == wanted || f.title == wanted || (wanted.len() >= 6 && f.form_id.starts_with(wanted))
            })
            .map(|f| {
                let definition = self.store.form_definition(&f.form_id)?.expect("listed").1;
                Ok((f.form_id, definition))
            })
            .collect::<Result<_, ClientError>>()?;
        match matches.len() {
            0 => Err(ClientError::Usage(format!("no form {wanted:?}; see `fumi form list`"))),
            1 => Ok(matches.into_iter().next().expect("one")),
            _ => Err(ClientError::Usage(format!(
                "several forms match {wanted:?}; use the form id"
            ))),
        }
    }

    /// Sends answers to a form, end-to-end encrypted, to the organisation's devices only.
    pub async fn submit_form(&mut self, form: &str, answers: Answers) -> Result<MessageId, ClientError> {
        let (form_id, definition) = self.form(form)?;
        definition
            .check_answers(&answers)
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let (channel, _) = self.store.form_definition(&form_id)?.expect("known form");
        let row = self
            .store
            .channel_rows()?
            .into_iter()
            .find(|r| r.channel == channel)
            .ok_or_else(|| ClientError::Usage("you left the channel this form was published in".into()))?;
        if row.owner == self.account.account_id {
            return Err(ClientError::Usage("this is your own organisation's form".into()));
        }
        // The organisation's key comes from the channel link: pin it, so that a server handing
        // out other devices for the organisation is caught when they are added.
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
            channel,
            form_id: form_id.clone(),
            answers: answers.clone(),
        };
        let id = self.send_content(group, body).await?;
        let me = self.account.account_id;
        self.store
            .insert_submission(id, &form_id, group, me, &answers, now_ms(), true)?;
        Ok(id)
    }

    /// Writes the submissions this device received for an own form as CSV (readable only by
    /// this user); returns the number of rows.
    pub fn export_form(&self, form: &str, path: &Path) -> Result<usize, ClientError> {
        let (form_id, definition) = self.form(form)?;
        let rows: Vec<SubmissionRow> = self
            .store
            .submissions("form_id = ?1 AND outgoing = 0", &form_id)?
            .into_iter()
            .map(|s| {
                Ok(SubmissionRow {
                    id: s.id.to_string(),
                    sent_at: s.sent_at,
                    submitter: self.display_account(s.submitter)?,
                    answers: s.answers,
                })
            })
            .collect::<Result<_, ClientError>>()?;
        let csv = to_csv(&definition, &rows);
        write_private(path, csv.as_bytes())
            .map_err(|e| ClientError::Usage(format!("cannot write {}: {e}", path.display())))?;
        Ok(rows.len())
    }

    /// A form submission arrived in a 1:1 conversation (inside the receiving transaction).
    pub(crate) fn handle_form_submission(
        &self,
        group: GroupId,
        sender: &Member,
        content_id: MessageId,
        sent_at: u64,
        form_id: &str,
        answers: &Answers,
    ) -> Result<(), ClientError> {
        let me = self.account.account_id;
        if sender.account == me {
            // Sent by another of our devices.
            return self
                .store
                .insert_submission(content_id, form_id, group, me, answers, sent_at, true);
        }
        match self.store.form_definition(form_id)? {
            Some((channel, definition)) => {
                let own = self.store.channel_rows()?.iter().any(|r| r.channel == channel && r.own);
                if !own {
                    return Err(ClientError::Protocol(
                        "a submission to a form we did not publish".into(),
                    ));
                }
                definition
                    .check_answers(answers)
                    .map_err(|e| ClientError::Protocol(format!("a submission that does not fit its form: {e}")))?;
            }
            // A staff device that has not subscribed to the channel yet keeps the submission;
            // it is checked and exported once the device knows the form.
            None => tracing::warn!("a submission to a form this device does not know yet"),
        }
        self.store
            .insert_submission(content_id, form_id, group, sender.account, answers, sent_at, false)
    }

    /// A staff device confirmed one of our submissions.
    pub(crate) fn handle_form_receipt(&self, sender: &Member, submission: MessageId) -> Result<(), ClientError> {
        if sender.account == self.account.account_id {
            return Ok(());
        }
        self.store
            .conn
            .execute(
                "UPDATE form_submissions SET receipt_at = ?, seen = 0
                 WHERE submission_id = ? AND outgoing = 1 AND receipt_at IS NULL",
                params![now_ms() as i64, submission.as_bytes().as_slice()],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Sends a receipt for every submission this device stored and has not confirmed yet.
    pub(crate) async fn send_form_receipts(&mut self) -> Result<(), ClientError> {
        let pending: Vec<(Vec<u8>, Vec<u8>)> = {
            let mut statement = self
                .store
                .conn
                .prepare("SELECT submission_id, group_id FROM form_submissions WHERE outgoing = 0 AND receipt_sent = 0")
                .map_err(sql)?;
            statement
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sql)?
                .collect::<Result<_, _>>()
                .map_err(sql)?
        };
        for (submission, group) in pending {
            let submission = MessageId::from_slice(&submission).map_err(|e| ClientError::Store(e.to_string()))?;
            let group = GroupId::from_slice(&group).map_err(|e| ClientError::Store(e.to_string()))?;
            if self.device.is_member(group) {
                self.send_content(group, Body::FormReceipt { submission }).await?;
            }
            self.store
                .conn
                .execute(
                    "UPDATE form_submissions SET receipt_sent = 1 WHERE submission_id = ?",
                    [submission.as_bytes().as_slice()],
                )
                .map_err(sql)?;
        }
        Ok(())
    }

    fn submission_view(&self, s: SubmissionRecord) -> Result<SubmissionView, ClientError> {
        Ok(SubmissionView {
            submission: s.id.to_string(),
            form_title: self.store.form_definition(&s.form_id)?.map(|(_, f)| f.title),
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
        let (form_id, _) = self.form(form)?;
        self.store
            .submissions("form_id = ?1", &form_id)?
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
            let (receipts, submissions): (Vec<_>, Vec<_>) = self
                .store
                .submissions("seen = ?1", &false)?
                .into_iter()
                .map(|s| self.submission_view(s))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .partition(|s| s.outgoing);
            let warnings = {
                let mut statement = self
                    .store
                    .conn
                    .prepare("SELECT channel_id, seq, warning FROM channel_warnings WHERE seen = 0 ORDER BY id")
                    .map_err(sql)?;
                let found = statement
                    .query_map([], |r| {
                        Ok((
                            id16(r.get(0)?, ChannelId::from_slice)?,
                            r.get::<_, i64>(1)? as u64,
                            r.get::<_, String>(2)?,
                        ))
                    })
                    .map_err(sql)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql)?;
                found
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
                    .collect()
            };
            for statement in [
                "UPDATE channel_posts SET seen = 1 WHERE seen = 0",
                "UPDATE form_submissions SET seen = 1 WHERE seen = 0",
                "UPDATE channel_warnings SET seen = 1 WHERE seen = 0",
            ] {
                self.store.conn.execute(statement, []).map_err(sql)?;
            }
            Ok(OfficialEvents {
                posts,
                submissions,
                receipts,
                warnings,
            })
        })
    }
}

/// Writes a file only its owner can read (submissions are personal data).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
