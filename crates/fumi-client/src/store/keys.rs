//! The client store's key-transparency state: the pinned log key, the newest directory epoch
//! seen, how far the own entry was reviewed, and the devices of this account it trusts.

use std::collections::HashMap;

use fumi_core::Member;
use fumi_proto::{AccountId, DeviceId, GroupId};
use rusqlite::{OptionalExtension, params};

use super::{Store, id16, key32, sql};
use crate::ClientError;

/// What this device remembers of the server's key directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirectoryState {
    /// The log key pinned on first use: every epoch head must be signed by it.
    pub log_key: [u8; 32],
    /// The newest epoch seen.
    pub epoch: u64,
    /// Its root hash.
    pub root_hash: [u8; 32],
    /// The newest version of this account's own entry that was reviewed.
    pub own_version: u64,
    /// The epoch at which the own entry was last looked at.
    pub own_checked_epoch: u64,
    /// The last review of the own entry found a problem.
    pub own_alarm: bool,
}

impl DirectoryState {
    /// The state of a device that has seen `epoch` with `root_hash`, under `log_key`, and not
    /// yet reviewed its own entry.
    pub(crate) fn pinned(log_key: [u8; 32], epoch: u64, root_hash: [u8; 32]) -> Self {
        Self {
            log_key,
            epoch,
            root_hash,
            own_version: 0,
            own_checked_epoch: 0,
            own_alarm: false,
        }
    }
}

impl Store {
    pub(crate) fn directory_state(&self) -> Result<Option<DirectoryState>, ClientError> {
        self.conn
            .query_row(
                "SELECT log_key, epoch, root_hash, own_version, own_checked_epoch, own_alarm FROM key_directory WHERE id = 1",
                [],
                |r| {
                    Ok(DirectoryState {
                        log_key: key32(r.get(0)?)?,
                        epoch: r.get::<_, i64>(1)? as u64,
                        root_hash: key32(r.get(2)?)?,
                        own_version: r.get::<_, i64>(3)? as u64,
                        own_checked_epoch: r.get::<_, i64>(4)? as u64,
                        own_alarm: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(sql)
    }

    pub(crate) fn save_directory_state(&self, state: &DirectoryState) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT INTO key_directory (id, log_key, epoch, root_hash, own_version, own_checked_epoch, own_alarm) \
                 VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO UPDATE SET log_key = ?1, epoch = ?2, \
                 root_hash = ?3, own_version = ?4, own_checked_epoch = ?5, own_alarm = ?6",
                params![
                    state.log_key.as_slice(),
                    state.epoch as i64,
                    state.root_hash.as_slice(),
                    state.own_version as i64,
                    state.own_checked_epoch as i64,
                    state.own_alarm
                ],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Records a review of the own entry at `checked_epoch`: `clean_version` is the newest
    /// version found without problems (None: keep the previous one), `alarm` whether one stands.
    /// Leaves the pinned key and the newest epoch seen alone.
    pub(crate) fn record_own_review(
        &self,
        checked_epoch: u64,
        clean_version: Option<u64>,
        alarm: bool,
    ) -> Result<(), ClientError> {
        self.conn
            .execute(
                "UPDATE key_directory SET own_checked_epoch = MAX(own_checked_epoch, ?1), \
                 own_version = COALESCE(?2, own_version), own_alarm = ?3 WHERE id = 1",
                params![checked_epoch as i64, clean_version.map(|v| v as i64), alarm],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Remembers a device of this account as one of ours, with its signature key if known (a
    /// key, once recorded, is not replaced).
    pub(crate) fn know_device(
        &self,
        device: DeviceId,
        signature_key: Option<&[u8; 32]>,
        now: u64,
    ) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT INTO known_devices (device_id, learned_at, signature_key) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (device_id) DO UPDATE SET signature_key = COALESCE(signature_key, ?3)",
                params![
                    device.as_bytes().as_slice(),
                    now as i64,
                    signature_key.map(|k| k.as_slice())
                ],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Devices of this account known to be ours, with their signature keys where known.
    pub(crate) fn known_devices(&self) -> Result<HashMap<DeviceId, Option<[u8; 32]>>, ClientError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device_id, signature_key FROM known_devices")
            .map_err(sql)?;
        let rows = stmt
            .query_map([], |r| {
                let key: Option<Vec<u8>> = r.get(1)?;
                Ok((id16(r.get(0)?, DeviceId::from_slice)?, key.map(key32).transpose()?))
            })
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// When this device learned of each trusted device of the account (ms since the Unix epoch).
    pub(crate) fn known_devices_learned_at(&self) -> Result<HashMap<DeviceId, u64>, ClientError> {
        self.device_times("SELECT device_id, learned_at FROM known_devices")
    }

    /// Devices of this account that were removed, with when (ms since the Unix epoch).
    pub(crate) fn revoked_devices_at(&self) -> Result<HashMap<DeviceId, u64>, ClientError> {
        self.device_times("SELECT device_id, revoked_at FROM revoked_devices")
    }

    /// Rows of (device id, time) as a map.
    fn device_times(&self, query: &str) -> Result<HashMap<DeviceId, u64>, ClientError> {
        let mut stmt = self.conn.prepare(query).map_err(sql)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((id16(r.get(0)?, DeviceId::from_slice)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Records devices to check against the key directory (in the transaction that processes
    /// the message bringing them).
    pub(crate) fn add_pending_arrival(&self, group: GroupId, members: &[Member]) -> Result<(), ClientError> {
        let encoded: Vec<u8> = members
            .iter()
            .flat_map(|m| {
                [
                    m.account.as_bytes().as_slice(),
                    m.device.as_bytes(),
                    &m.identity_key,
                    &m.signature_key,
                ]
                .concat()
            })
            .collect();
        self.conn
            .execute(
                "INSERT INTO pending_arrivals (group_id, members) VALUES (?, ?)",
                params![group.as_bytes().as_slice(), encoded],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Arrivals not yet checked, oldest first.
    pub(crate) fn pending_arrivals(&self) -> Result<Vec<(i64, GroupId, Vec<Member>)>, ClientError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, group_id, members FROM pending_arrivals ORDER BY id")
            .map_err(sql)?;
        let rows = stmt
            .query_map([], |r| {
                let members: Vec<u8> = r.get(2)?;
                Ok((r.get::<_, i64>(0)?, id16(r.get(1)?, GroupId::from_slice)?, members))
            })
            .map_err(sql)?;
        let mut arrivals = Vec::new();
        for row in rows {
            let (id, group, bytes) = row.map_err(sql)?;
            let members = bytes
                .chunks(MEMBER_BYTES)
                .map(|m| {
                    (m.len() == MEMBER_BYTES)
                        .then(|| Member {
                            account: AccountId::from_slice(&m[..16]).expect("16 bytes"),
                            device: DeviceId::from_slice(&m[16..32]).expect("16 bytes"),
                            identity_key: m[32..64].try_into().expect("32 bytes"),
                            signature_key: m[64..96].try_into().expect("32 bytes"),
                        })
                        .ok_or_else(|| ClientError::Store("a pending arrival is damaged".into()))
                })
                .collect::<Result<_, _>>()?;
            arrivals.push((id, group, members));
        }
        Ok(arrivals)
    }

    pub(crate) fn remove_pending_arrival(&self, id: i64) -> Result<(), ClientError> {
        self.conn
            .execute("DELETE FROM pending_arrivals WHERE id = ?", [id])
            .map_err(sql)?;
        Ok(())
    }

    /// Whether a group has devices not yet checked against the key directory.
    pub(crate) fn has_pending_arrivals(&self, group: GroupId) -> Result<bool, ClientError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pending_arrivals WHERE group_id = ?)",
                [group.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .map_err(sql)
    }
}

impl Store {
    /// Stops sending to `group` while any of `devices` is in it.
    pub(crate) fn refuse_conversation(
        &self,
        group: GroupId,
        reason: &str,
        devices: &[DeviceId],
    ) -> Result<(), ClientError> {
        let encoded: Vec<u8> = devices.iter().flat_map(|d| *d.as_bytes()).collect();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO refused_conversations (group_id, reason, devices) VALUES (?, ?, ?)",
                params![group.as_bytes().as_slice(), reason, encoded],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Why sending to `group` is stopped, if it is.
    pub(crate) fn conversation_refusal(&self, group: GroupId) -> Result<Option<String>, ClientError> {
        self.conn
            .query_row(
                "SELECT reason FROM refused_conversations WHERE group_id = ?",
                [group.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)
    }

    /// Every refused conversation with the devices that must leave it.
    pub(crate) fn refused_conversations(&self) -> Result<Vec<(GroupId, Vec<DeviceId>)>, ClientError> {
        let mut stmt = self
            .conn
            .prepare("SELECT group_id, devices FROM refused_conversations")
            .map_err(sql)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((id16(r.get(0)?, GroupId::from_slice)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(sql)?;
        let mut refused = Vec::new();
        for row in rows {
            let (group, bytes) = row.map_err(sql)?;
            let devices = bytes
                .chunks(16)
                .map(|d| {
                    DeviceId::from_slice(d).map_err(|_| ClientError::Store("a refused conversation is damaged".into()))
                })
                .collect::<Result<_, _>>()?;
            refused.push((group, devices));
        }
        Ok(refused)
    }

    /// Sending to `group` may resume.
    pub(crate) fn lift_refusal(&self, group: GroupId) -> Result<(), ClientError> {
        self.conn
            .execute(
                "DELETE FROM refused_conversations WHERE group_id = ?",
                [group.as_bytes().as_slice()],
            )
            .map_err(sql)?;
        Ok(())
    }
}

/// An encoded member: account (16) ‖ device (16) ‖ identity key (32) ‖ signature key (32).
const MEMBER_BYTES: usize = 96;
