//! The client store's official-account tables: trusted authorities, this account's organisation
//! profile, channels with their keys, received posts and their files, refused-post warnings,
//! forms, and form submissions.

use fumi_core::form::{Answers, FormDefinition};
use fumi_core::official::{
    ChannelInfo, ChannelKey, ChannelLink, OrganisationProfile, Post, PostBody, TrustedAuthority,
};
use fumi_proto::{AccountId, ChannelId, GroupId, MessageId};
use rusqlite::{OptionalExtension, params};

use super::{FileView, Store, id16, key32, sql};
use crate::{ClientError, now_ms};

/// A channel as stored on this device.
#[derive(Debug, Clone)]
pub(crate) struct ChannelRow {
    pub channel: ChannelId,
    pub owner: AccountId,
    pub owner_key: [u8; 32],
    pub key: ChannelKey,
    /// This account owns it (may post).
    pub own: bool,
    /// The description as last opened and verified.
    pub info: ChannelInfo,
    /// Every post up to this number was accepted or refused.
    pub last_seq: u64,
}

impl ChannelRow {
    pub fn link(&self) -> ChannelLink {
        ChannelLink {
            channel: self.channel,
            owner: self.owner,
            owner_key: self.owner_key,
            key: self.key.clone(),
        }
    }
}

/// A form submission as stored: sent by us, or received by our organisation.
#[derive(Debug, Clone)]
pub(crate) struct SubmissionRecord {
    pub id: MessageId,
    pub channel: ChannelId,
    pub form_id: String,
    pub group: GroupId,
    pub submitter: AccountId,
    pub answers: Answers,
    pub sent_at: u64,
    pub outgoing: bool,
    pub receipt_at: Option<u64>,
}

/// Which submissions to list.
pub(crate) enum Submissions<'a> {
    /// Of one form.
    Form(ChannelId, &'a str),
    /// Not shown yet (new received ones, and sent ones that got their receipt).
    Unseen,
}

fn json_err(e: serde_json::Error) -> ClientError {
    ClientError::Store(format!("stored JSON: {e}"))
}

fn channel_id(bytes: Vec<u8>) -> rusqlite::Result<ChannelId> {
    id16(bytes, ChannelId::from_slice)
}

impl Store {
    // --- authorities and the organisation profile ------------------------------------------

    /// Trusts an authority; refuses a name or key already trusted.
    pub(crate) fn add_authority(&self, name: &str, key: &[u8; 32]) -> Result<(), ClientError> {
        self.conn
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

    /// Forgets an authority; false if none had that name.
    pub(crate) fn remove_authority(&self, name: &str) -> Result<bool, ClientError> {
        let removed = self
            .conn
            .execute("DELETE FROM authorities WHERE name = ?", [name])
            .map_err(sql)?;
        Ok(removed > 0)
    }

    /// Trusted authorities, by name.
    pub(crate) fn authorities(&self) -> Result<Vec<TrustedAuthority>, ClientError> {
        let mut statement = self
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

    /// This account's organisation profile, if one was set.
    pub(crate) fn organisation(&self) -> Result<Option<OrganisationProfile>, ClientError> {
        let stored: Option<String> = self
            .conn
            .query_row("SELECT profile FROM organisation WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        stored
            .map(|json| serde_json::from_str(&json).map_err(json_err))
            .transpose()
    }

    pub(crate) fn save_organisation(&self, profile: &OrganisationProfile) -> Result<(), ClientError> {
        let json = serde_json::to_string(profile).map_err(json_err)?;
        self.conn
            .execute(
                "INSERT INTO organisation (id, profile) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET profile = ?1",
                [json],
            )
            .map_err(sql)?;
        Ok(())
    }

    // --- channels and posts ----------------------------------------------------------------

    /// Saves a channel (its number of accepted posts is kept if it is already stored).
    pub(crate) fn save_channel(&self, row: &ChannelRow) -> Result<(), ClientError> {
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

    /// Every channel this device holds, oldest first.
    pub(crate) fn channel_rows(&self) -> Result<Vec<ChannelRow>, ClientError> {
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
                    channel_id(r.get(0)?)?,
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

    /// The channel, if held.
    pub(crate) fn channel_row(&self, channel: ChannelId) -> Result<Option<ChannelRow>, ClientError> {
        Ok(self.channel_rows()?.into_iter().find(|r| r.channel == channel))
    }

    /// Records that every post up to `seq` was accepted or refused (never lowers it).
    pub(crate) fn set_last_seq(&self, channel: ChannelId, seq: u64) -> Result<(), ClientError> {
        self.conn
            .execute(
                "UPDATE channels SET last_seq = MAX(last_seq, ?) WHERE channel_id = ?",
                params![seq as i64, channel.as_bytes().as_slice()],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Forgets a channel with its posts, files and warnings.
    pub(crate) fn forget_channel(&self, channel: ChannelId) -> Result<(), ClientError> {
        let id = channel.as_bytes().as_slice();
        for statement in [
            "DELETE FROM channel_posts WHERE channel_id = ?",
            "DELETE FROM channel_warnings WHERE channel_id = ?",
            "DELETE FROM channel_files WHERE channel_id = ?",
            "DELETE FROM channels WHERE channel_id = ?",
        ] {
            self.conn.execute(statement, [id]).map_err(sql)?;
        }
        Ok(())
    }

    /// Stores an accepted post (and the form it carries).
    pub(crate) fn insert_post(&self, post: &Post, seen: bool) -> Result<(), ClientError> {
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
                    "INSERT OR IGNORE INTO channel_forms (channel_id, form_id, definition, published_at) VALUES (?, ?, ?, ?)",
                    params![
                        post.channel.as_bytes().as_slice(),
                        form_id,
                        serde_json::to_string(form).map_err(json_err)?,
                        post.sent_at as i64
                    ],
                )
                .map_err(sql)?;
        }
        Ok(())
    }

    /// Posts of one channel (or all), oldest first; only those not shown yet if asked.
    pub(crate) fn posts(&self, channel: Option<ChannelId>, unseen_only: bool) -> Result<Vec<Post>, ClientError> {
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

    /// Marks the posts of one channel (or all) shown.
    pub(crate) fn mark_posts_seen(&self, channel: Option<ChannelId>) -> Result<(), ClientError> {
        self.conn
            .execute(
                "UPDATE channel_posts SET seen = 1 WHERE seen = 0 AND (?1 IS NULL OR channel_id = ?1)",
                [channel.map(|c| c.as_bytes().to_vec())],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// How many posts of a channel this device holds.
    pub(crate) fn post_count(&self, channel: ChannelId) -> Result<u64, ClientError> {
        let count: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM channel_posts WHERE channel_id = ?",
                [channel.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .map_err(sql)?;
        Ok(count as u64)
    }

    pub(crate) fn set_channel_file(&self, channel: ChannelId, seq: u64, view: &FileView) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO channel_files (channel_id, seq, view) VALUES (?, ?, ?)",
                params![
                    channel.as_bytes().as_slice(),
                    seq as i64,
                    serde_json::to_string(view).map_err(json_err)?
                ],
            )
            .map_err(sql)?;
        Ok(())
    }

    pub(crate) fn channel_file(&self, channel: ChannelId, seq: u64) -> Result<Option<FileView>, ClientError> {
        let view: Option<String> = self
            .conn
            .query_row(
                "SELECT view FROM channel_files WHERE channel_id = ? AND seq = ?",
                params![channel.as_bytes().as_slice(), seq as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
        view.map(|v| serde_json::from_str(&v).map_err(json_err)).transpose()
    }

    /// Records why post `seq` of a channel was refused (or that posts were withheld).
    pub(crate) fn add_warning(&self, channel: ChannelId, seq: u64, warning: &str) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT INTO channel_warnings (channel_id, seq, warning, created_at) VALUES (?, ?, ?, ?)",
                params![channel.as_bytes().as_slice(), seq as i64, warning, now_ms() as i64],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Warnings not shown yet, of one channel (or all), marked shown.
    pub(crate) fn take_warnings(
        &self,
        channel: Option<ChannelId>,
    ) -> Result<Vec<(ChannelId, u64, String)>, ClientError> {
        let id = channel.map(|c| c.as_bytes().to_vec());
        let mut statement = self
            .conn
            .prepare(
                "SELECT channel_id, seq, warning FROM channel_warnings
                 WHERE seen = 0 AND (?1 IS NULL OR channel_id = ?1) ORDER BY id",
            )
            .map_err(sql)?;
        let found = statement
            .query_map([&id], |r| {
                Ok((
                    channel_id(r.get(0)?)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        self.conn
            .execute(
                "UPDATE channel_warnings SET seen = 1 WHERE seen = 0 AND (?1 IS NULL OR channel_id = ?1)",
                [&id],
            )
            .map_err(sql)?;
        Ok(found)
    }

    // --- forms and submissions -------------------------------------------------------------

    /// A form's definition.
    pub(crate) fn form_definition(
        &self,
        channel: ChannelId,
        form_id: &str,
    ) -> Result<Option<FormDefinition>, ClientError> {
        let definition: Option<String> = self
            .conn
            .query_row(
                "SELECT definition FROM channel_forms WHERE channel_id = ? AND form_id = ?",
                params![channel.as_bytes().as_slice(), form_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
        definition
            .map(|d| serde_json::from_str(&d).map_err(json_err))
            .transpose()
    }

    /// Every form this device knows: (channel, form id, definition), oldest first.
    pub(crate) fn forms(&self) -> Result<Vec<(ChannelId, String, FormDefinition)>, ClientError> {
        let mut statement = self
            .conn
            .prepare("SELECT channel_id, form_id, definition FROM channel_forms ORDER BY published_at")
            .map_err(sql)?;
        let rows = statement
            .query_map([], |r| {
                Ok((channel_id(r.get(0)?)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        rows.into_iter()
            .map(|(channel, form_id, definition)| {
                Ok((channel, form_id, serde_json::from_str(&definition).map_err(json_err)?))
            })
            .collect()
    }

    /// Stores a submission (a retry of a stored one changes nothing). A sent one is stored as
    /// already shown; a received one is shown as new.
    pub(crate) fn insert_submission(&self, s: &SubmissionRecord) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO form_submissions
                 (submission_id, channel_id, form_id, group_id, submitter, answers, sent_at, received_at, outgoing, seen)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    s.id.as_bytes().as_slice(),
                    s.channel.as_bytes().as_slice(),
                    s.form_id,
                    s.group.as_bytes().as_slice(),
                    s.submitter.as_bytes().as_slice(),
                    serde_json::to_string(&s.answers).map_err(json_err)?,
                    s.sent_at as i64,
                    now_ms() as i64,
                    s.outgoing,
                    s.outgoing
                ],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Forgets a submission that was never sent.
    pub(crate) fn delete_submission(&self, id: MessageId) -> Result<(), ClientError> {
        self.conn
            .execute(
                "DELETE FROM form_submissions WHERE submission_id = ?",
                [id.as_bytes().as_slice()],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Submissions, oldest first; listing the unseen ones marks them shown.
    pub(crate) fn submissions(&self, which: Submissions<'_>) -> Result<Vec<SubmissionRecord>, ClientError> {
        use rusqlite::types::Value;
        let (filter, arguments) = match which {
            Submissions::Form(channel, form_id) => (
                "channel_id = ? AND form_id = ?",
                vec![
                    Value::Blob(channel.as_bytes().to_vec()),
                    Value::Text(form_id.to_owned()),
                ],
            ),
            Submissions::Unseen => ("seen = 0", vec![]),
        };
        let query = format!(
            "SELECT submission_id, channel_id, form_id, group_id, submitter, answers, sent_at, outgoing, receipt_at
             FROM form_submissions WHERE {filter} ORDER BY sent_at, received_at"
        );
        let mut statement = self.conn.prepare(&query).map_err(sql)?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(arguments), |r| {
                Ok((
                    id16(r.get(0)?, MessageId::from_slice)?,
                    channel_id(r.get(1)?)?,
                    r.get::<_, String>(2)?,
                    id16(r.get(3)?, GroupId::from_slice)?,
                    id16(r.get(4)?, AccountId::from_slice)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)? as u64,
                    r.get::<_, bool>(7)?,
                    r.get::<_, Option<i64>>(8)?.map(|t| t as u64),
                ))
            })
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        if matches!(which, Submissions::Unseen) {
            self.conn
                .execute("UPDATE form_submissions SET seen = 1 WHERE seen = 0", [])
                .map_err(sql)?;
        }
        rows.into_iter()
            .map(
                |(id, channel, form_id, group, submitter, answers, sent_at, outgoing, receipt_at)| {
                    Ok(SubmissionRecord {
                        id,
                        channel,
                        form_id,
                        group,
                        submitter,
                        answers: serde_json::from_str(&answers).map_err(json_err)?,
                        sent_at,
                        outgoing,
                        receipt_at,
                    })
                },
            )
            .collect()
    }

    /// Received submissions of a form this device holds.
    pub(crate) fn submission_count(&self, channel: ChannelId, form_id: &str) -> Result<u64, ClientError> {
        let count: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM form_submissions WHERE channel_id = ? AND form_id = ?",
                params![channel.as_bytes().as_slice(), form_id],
                |r| r.get(0),
            )
            .map_err(sql)?;
        Ok(count as u64)
    }

    /// Records the first receipt for a submission we sent (shown as news once).
    pub(crate) fn set_receipt(&self, submission: MessageId) -> Result<(), ClientError> {
        self.conn
            .execute(
                "UPDATE form_submissions SET receipt_at = ?, seen = 0
                 WHERE submission_id = ? AND outgoing = 1 AND receipt_at IS NULL",
                params![now_ms() as i64, submission.as_bytes().as_slice()],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Received submissions this device has not confirmed to their submitter yet.
    pub(crate) fn unconfirmed_submissions(&self) -> Result<Vec<(MessageId, GroupId)>, ClientError> {
        let mut statement = self
            .conn
            .prepare("SELECT submission_id, group_id FROM form_submissions WHERE outgoing = 0 AND receipt_sent = 0")
            .map_err(sql)?;
        statement
            .query_map([], |r| {
                Ok((
                    id16(r.get(0)?, MessageId::from_slice)?,
                    id16(r.get(1)?, GroupId::from_slice)?,
                ))
            })
            .map_err(sql)?
            .collect::<Result<_, _>>()
            .map_err(sql)
    }

    pub(crate) fn mark_receipt_sent(&self, submission: MessageId) -> Result<(), ClientError> {
        self.conn
            .execute(
                "UPDATE form_submissions SET receipt_sent = 1 WHERE submission_id = ?",
                [submission.as_bytes().as_slice()],
            )
            .map_err(sql)?;
        Ok(())
    }
}
