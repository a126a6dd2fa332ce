//! The client store's key-transparency state: the pinned log key, the newest directory epoch
//! seen, how far the own entry was reviewed, and the devices of this account it trusts.

use std::collections::HashSet;

use fumi_proto::DeviceId;
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

    /// Remembers a device of this account as one of ours.
    pub(crate) fn know_device(&self, device: DeviceId, now: u64) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO known_devices (device_id, learned_at) VALUES (?, ?)",
                params![device.as_bytes().as_slice(), now as i64],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Devices of this account known to be ours.
    pub(crate) fn known_devices(&self) -> Result<HashSet<DeviceId>, ClientError> {
        let mut stmt = self.conn.prepare("SELECT device_id FROM known_devices").map_err(sql)?;
        let rows = stmt
            .query_map([], |r| id16(r.get(0)?, DeviceId::from_slice))
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }
}
