//! Key transparency in the client: every key the server hands out is checked against the
//! server's key directory, this account's own entry is watched, and anyone can audit the
//! directory's history.
//!
//! - Before encrypting to a device (a claimed KeyPackage, a member of a group joined or changed),
//!   the client looks the device's account up in the directory and checks the proof against an
//!   epoch head signed by the server's log key. The account's identity key, the device and its
//!   signature key must all be listed; a change gets two epochs to be published, then a mismatch
//!   stops the action with a security warning.
//! - A username's account is checked the same way.
//! - Epochs never go back and one epoch has one root, for this device: a server showing an older
//!   or a second directory is caught.
//! - [`FumiClient::check_own_keys`] reviews every version the directory ever published of this
//!   account and reports devices none of this account's devices linked.
//! - [`audit_directory`] checks, as a third party would, that each epoch only appended to the one
//!   before.

use fumi_proto::endpoints::{self, Endpoint};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::time::Duration;

use fumi_audit::keys::{
    self, AccountEntry, AuditAnswer, EpochHead, HistoryAnswer, KeyDirectoryError, LookupAnswer, SignedEpochHead,
    UsernameEntry, Verified,
};
use fumi_core::Member;
use fumi_core::store::ClientStore;
use fumi_proto::{AccountId, DeviceId, ErrorCode};
use serde::{Deserialize, Serialize};

use crate::store::DirectoryState;
use crate::transport::Transport;
use crate::{ClientError, FumiClient, now_ms};

/// The longest a client waits for a change to reach the directory before calling it a mismatch.
const MAX_PUBLICATION_WAIT_MS: u64 = 180_000;

/// Newer epochs a client waits for before calling a missing change a mismatch: the epoch being
/// published when the change was made may not contain it, the one after does.
const EPOCHS_FOR_A_CHANGE: u32 = 2;

/// Answer to `GET /v1/keys/head`.
#[derive(Debug, Deserialize)]
struct HeadAnswer {
    head: SignedEpochHead,
    epoch_interval_ms: u64,
}

fn security(message: String) -> ClientError {
    ClientError::KeyTransparency(message)
}

fn proof_failure(what: &str, error: KeyDirectoryError) -> ClientError {
    security(format!(
        "the server's key directory proof for {what} does not verify ({error}); the server may be showing \
         you keys it does not show everyone"
    ))
}

/// Checks a signed head against the key pinned for the server and the newest epoch seen, given
/// what was seen before (`None` on first use: the head's key is pinned).
fn check_head(previous: Option<&DirectoryState>, signed: &SignedEpochHead) -> Result<EpochHead, ClientError> {
    let log_key = match previous {
        Some(state) => state.log_key,
        None => signed
            .named_log_key()
            .map_err(|e| ClientError::Protocol(format!("key directory head: {e}")))?,
    };
    let head = signed.verify(&log_key).map_err(|e| {
        security(format!(
            "the server's key directory head is not signed by the log key this device pinned ({e})"
        ))
    })?;
    if let Some(state) = previous {
        if head.epoch < state.epoch {
            return Err(security(format!(
                "the server showed key directory epoch {} after showing epoch {}: it went back in time, \
                 which an honest directory never does",
                head.epoch, state.epoch
            )));
        }
        if head.epoch == state.epoch && head.root_hash != state.root_hash {
            return Err(security(format!(
                "the server showed two different key directories as epoch {}: its history was rewritten, or \
                 it shows different people different keys",
                head.epoch
            )));
        }
    }
    Ok(head)
}

/// Why `member` does not match its account's directory entry, if it does not.
fn mismatch(entry: &AccountEntry, member: &Member) -> Option<String> {
    if entry.identity_key != member.identity_key {
        return Some("its identity key is not the one in the directory".into());
    }
    match entry.signature_key_of(member.device.as_bytes()) {
        None => Some(format!(
            "device {} is not one of the account's devices in the directory",
            member.device
        )),
        Some(key) if key != member.signature_key => Some(format!(
            "device {} carries another signing key than the directory lists",
            member.device
        )),
        Some(_) => None,
    }
}

/// Devices that an entry lists again after an earlier version of it (oldest first) had dropped
/// them. A device id is never linked twice, so such a device was put back by the server.
fn listed_again<'a>(oldest_first: impl Iterator<Item = &'a AccountEntry>) -> HashSet<DeviceId> {
    let mut seen = HashSet::new();
    let mut dropped = HashSet::new();
    let mut again = HashSet::new();
    for entry in oldest_first {
        let listed: HashSet<DeviceId> = entry.devices.iter().map(|d| DeviceId::from_bytes(d.device)).collect();
        again.extend(listed.intersection(&dropped).copied());
        dropped.extend(seen.difference(&listed).copied());
        seen.extend(listed);
    }
    again
}

/// Whether some version of an account's history (oldest first) listed `member` with its
/// identity and signing keys, and no version listed its device again after one had dropped it.
fn once_listed(oldest_first: &[AccountEntry], member: &Member) -> bool {
    !listed_again(oldest_first.iter()).contains(&member.device)
        && oldest_first.iter().any(|entry| mismatch(entry, member).is_none())
}

/// The outcome of checking a group's new devices against the key directory.
pub(crate) enum ArrivalCheck {
    /// Every device is listed, or was listed and has left the group since.
    Listed,
    /// Every device is or was listed, but one its account removed since is still in the group:
    /// nothing is sent there until its account's devices commit its removal.
    RemovedButPresent,
}

impl FumiClient {
    /// Accepts a head (see [`check_head`]) and remembers it if it is newer.
    fn accept_head(&self, signed: &SignedEpochHead) -> Result<EpochHead, ClientError> {
        let previous = self.store.directory_state()?;
        let head = check_head(previous.as_ref(), signed)?;
        let state = match previous {
            None => {
                let log_key = signed
                    .named_log_key()
                    .map_err(|e| ClientError::Protocol(format!("key directory head: {e}")))?;
                Some(DirectoryState::pinned(log_key, head.epoch, head.root_hash))
            }
            Some(state) if head.epoch > state.epoch => Some(DirectoryState {
                epoch: head.epoch,
                root_hash: head.root_hash,
                ..state
            }),
            Some(_) => None,
        };
        if let Some(state) = state {
            self.store.save_directory_state(&state)?;
        }
        Ok(head)
    }

    /// The newest head, checked, and how often epochs are published.
    async fn directory_head(&self) -> Result<(EpochHead, u64), ClientError> {
        let answer: HeadAnswer = self.transport.request::<(), _>(endpoints::KEYS_HEAD, &[], None).await?;
        Ok((self.accept_head(&answer.head)?, answer.epoch_interval_ms))
    }

    /// A directory GET, asked again while the server is signing an epoch (an instant).
    async fn directory_get<R: serde::de::DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        args: &[&(dyn Display + Sync)],
    ) -> Result<R, ClientError> {
        let mut attempts = 0;
        loop {
            match self.transport.request::<(), R>(endpoint, args, None).await {
                Err(e) if e.is_code(ErrorCode::KeyDirectoryPublishing) && attempts < 10 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Looks a label up; `None` if the directory does not have it (yet).
    async fn directory_lookup(
        &self,
        endpoint: Endpoint,
        args: &[&(dyn Display + Sync)],
        label: &keys::AkdLabel,
        what: &str,
    ) -> Result<Option<(EpochHead, Verified)>, ClientError> {
        let answer: LookupAnswer = match self.directory_get(endpoint, args).await {
            Err(e) if e.is_code(ErrorCode::NotInKeyDirectory) => return Ok(None),
            other => other?,
        };
        let head = self.accept_head(&answer.head)?;
        let verified = keys::verify_lookup(&head, label, &answer.proof).map_err(|e| proof_failure(what, e))?;
        Ok(Some((head, verified)))
    }

    /// The directory's entry for `account`, verified; `None` if it is not published (yet).
    pub(crate) async fn directory_account(
        &self,
        account: AccountId,
    ) -> Result<Option<(EpochHead, AccountEntry)>, ClientError> {
        let label = keys::account_label(account.as_bytes());
        let Some((head, verified)) = self
            .directory_lookup(endpoints::KEYS_LOOKUP_ACCOUNT, &[&account], &label, "an account")
            .await?
        else {
            return Ok(None);
        };
        let entry = AccountEntry::decode(&verified.value).map_err(|e| proof_failure("an account", e))?;
        Ok(Some((head, entry)))
    }

    /// Every version of `account`'s directory entry, verified, oldest first (none if the
    /// account was never published).
    async fn directory_account_history(&self, account: AccountId) -> Result<Vec<AccountEntry>, ClientError> {
        let answer: HistoryAnswer = match self.directory_get(endpoints::KEYS_ACCOUNT_HISTORY, &[&account]).await {
            Err(e) if e.is_code(ErrorCode::NotInKeyDirectory) => return Ok(vec![]),
            other => other?,
        };
        let head = self.accept_head(&answer.head)?;
        let label = keys::account_label(account.as_bytes());
        let mut versions =
            keys::verify_history(&head, &label, &answer.proof).map_err(|e| proof_failure("an account", e))?;
        versions.sort_by_key(|v| v.version);
        versions
            .iter()
            .map(|v| AccountEntry::decode(&v.value))
            .collect::<Result<_, _>>()
            .map_err(|e| proof_failure("an account", e))
    }

    /// Checks devices that arrived in a group (`in_group`: the group's devices now, after every
    /// commit this device processed). A device its account's entry lists is accepted. One it
    /// no longer lists is accepted if the entry's history listed it (the device was linked and
    /// removed while this device was offline); if it is still in the group, its account's devices
    /// have yet to commit its removal. Any other device gets two epochs to be published, then is
    /// refused with a security warning.
    pub(crate) async fn check_arrival(
        &self,
        members: &[Member],
        in_group: &HashSet<DeviceId>,
    ) -> Result<ArrivalCheck, ClientError> {
        let mut by_account: BTreeMap<AccountId, Vec<Member>> = BTreeMap::new();
        for member in members {
            by_account.entry(member.account).or_default().push(*member);
        }
        let mut outcome = ArrivalCheck::Listed;
        for (account, members) in by_account {
            let current = self.directory_account(account).await?;
            let unlisted: Vec<Member> = members
                .iter()
                .filter(|m| current.as_ref().is_none_or(|(_, entry)| mismatch(entry, m).is_some()))
                .copied()
                .collect();
            if unlisted.is_empty() {
                continue;
            }
            let history = self.directory_account_history(account).await?;
            let mut never_listed = Vec::new();
            for member in unlisted {
                if !once_listed(&history, &member) {
                    never_listed.push(member);
                } else if in_group.contains(&member.device) {
                    outcome = ArrivalCheck::RemovedButPresent;
                }
            }
            if !never_listed.is_empty() {
                self.check_members_in_directory(&never_listed).await?;
            }
        }
        Ok(outcome)
    }

    /// Waits (bounded) for the directory to publish an epoch after `epoch`: true if one came.
    async fn wait_for_epoch_after(&self, epoch: u64) -> Result<bool, ClientError> {
        let (head, interval) = self.directory_head().await?;
        if head.epoch > epoch {
            return Ok(true);
        }
        let deadline = now_ms()
            + interval
                .saturating_mul(2)
                .saturating_add(5000)
                .min(MAX_PUBLICATION_WAIT_MS);
        self.progress.note(&format!(
            "waiting up to {} s for the server's key directory to publish a new epoch (a new account or device \
             is trusted once it is listed there)",
            (deadline - now_ms()).div_ceil(1000)
        ));
        while now_ms() < deadline {
            tokio::time::sleep(Duration::from_millis((interval / 5).clamp(50, 1000))).await;
            if self.directory_head().await?.0.epoch > epoch {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Checks that every member is listed, with its identity key and signature key, in its
    /// account's directory entry. A change is given two epochs to be published; after that a
    /// member the directory does not list is refused with a security warning.
    pub(crate) async fn check_members_in_directory(&self, members: &[Member]) -> Result<(), ClientError> {
        let mut by_account: BTreeMap<AccountId, Vec<Member>> = BTreeMap::new();
        for member in members {
            by_account.entry(member.account).or_default().push(*member);
        }
        for (account, members) in by_account {
            self.check_account_entry(account, |entry| members.iter().find_map(|m| mismatch(entry, m)))
                .await?;
        }
        Ok(())
    }

    /// Checks that the directory lists `identity_key` as `account`'s.
    pub(crate) async fn check_identity_in_directory(
        &self,
        account: AccountId,
        identity_key: &[u8; 32],
    ) -> Result<(), ClientError> {
        self.check_account_entry(account, |entry| {
            (entry.identity_key != *identity_key).then(|| "its identity key is not the one in the directory".to_owned())
        })
        .await
    }

    /// Looks `account` up until `problem` finds nothing wrong with its entry, waiting for two
    /// newer epochs at most; then refuses with a security warning.
    async fn check_account_entry(
        &self,
        account: AccountId,
        problem: impl Fn(&AccountEntry) -> Option<String>,
    ) -> Result<(), ClientError> {
        let mut waited = 0;
        loop {
            let found = self.directory_account(account).await?;
            let found_problem = match &found {
                None => Some("the account is not in the directory".to_owned()),
                Some((_, entry)) => problem(entry),
            };
            let Some(found_problem) = found_problem else {
                return Ok(());
            };
            let epoch = match &found {
                Some((head, _)) => head.epoch,
                None => {
                    let head = self.directory_head().await?.0.epoch;
                    // Published between the lookup and the head: waiting for the epoch after
                    // it would wait for a change that already happened.
                    if self.directory_account(account).await?.is_some() {
                        continue;
                    }
                    head
                }
            };
            if waited == EPOCHS_FOR_A_CHANGE || !self.wait_for_epoch_after(epoch).await? {
                let name = self.display_account(account)?;
                return Err(security(format!(
                    "the server handed out keys for {name} that its own key directory does not list: {found_problem}. \
                     Someone with access to the server may be trying to read your messages; nothing was \
                     encrypted to these keys."
                )));
            }
            waited += 1;
        }
    }

    /// Checks that the directory gives `username_hash` to `account` (waiting two epochs for a
    /// fresh claim).
    pub(crate) async fn check_username_in_directory(
        &self,
        username: &str,
        username_hash: &[u8; 32],
        account: AccountId,
    ) -> Result<(), ClientError> {
        let label = keys::username_label(username_hash);
        let hash = hex::encode(username_hash);
        let mut waited = 0;
        loop {
            let found = self
                .directory_lookup(endpoints::KEYS_LOOKUP_USERNAME, &[&hash], &label, "a username")
                .await?;
            let listed = match &found {
                Some((_, verified)) => {
                    UsernameEntry::decode(&verified.value)
                        .map_err(|e| proof_failure("a username", e))?
                        .account
                }
                None => None,
            };
            if listed == Some(*account.as_bytes()) {
                return Ok(());
            }
            let epoch = match &found {
                Some((head, _)) => head.epoch,
                None => {
                    let head = self.directory_head().await?.0.epoch;
                    // As for accounts: published between the lookup and the head.
                    if self
                        .directory_lookup(endpoints::KEYS_LOOKUP_USERNAME, &[&hash], &label, "a username")
                        .await?
                        .is_some()
                    {
                        continue;
                    }
                    head
                }
            };
            if waited == EPOCHS_FOR_A_CHANGE || !self.wait_for_epoch_after(epoch).await? {
                return Err(security(format!(
                    "the server says {username} belongs to an account its own key directory does not give it to; \
                     someone with access to the server may be impersonating {username}. Nothing was sent."
                )));
            }
            waited += 1;
        }
    }

    /// Devices of this account that this device trusts, with their signature keys where known:
    /// itself, devices it linked, devices its trusted devices linked or added. A store from
    /// before key transparency starts from the devices of this account in its conversations.
    pub(crate) fn trusted_own_devices(&self) -> Result<HashMap<DeviceId, Option<[u8; 32]>>, ClientError> {
        self.machine()
            .trusted_own_devices(now_ms())
            .map_err(|e| self.receive_error(e))
    }

    /// The server shows no entry for this account: normal before its first epoch, an alarm once
    /// a review has seen it published.
    fn own_entry_missing(&self, force: bool, state: &DirectoryState) -> Result<Vec<String>, ClientError> {
        if state.own_version > 0 {
            self.store.record_own_review(state.own_checked_epoch, None, true)?;
            return Ok(vec![
                "SECURITY WARNING: the server no longer shows your account in its key directory, which listed \
                 it before: it may be showing your contacts an entry of its own making"
                    .to_owned(),
            ]);
        }
        if force {
            return Err(ClientError::Usage(
                "your account is not in the server's key directory yet (a new account is published with the \
                 next epoch); try again in a few seconds"
                    .into(),
            ));
        }
        Ok(vec![])
    }

    /// Reviews this account's entry in the key directory: every version ever published must
    /// carry this account's identity key and only devices this device trusts. Returns a warning
    /// per problem (empty when all is well). Without `force`, does nothing unless the directory
    /// published a new epoch since the last review, and reads the history only if the entry
    /// changed.
    pub async fn check_own_keys(&mut self, force: bool) -> Result<Vec<String>, ClientError> {
        let (head, interval_ms) = self.directory_head().await?;
        let state = self.store.directory_state()?.expect("a head was just stored");
        if !force && !state.own_alarm && head.epoch <= state.own_checked_epoch {
            return Ok(vec![]);
        }
        let me = self.account.account_id;
        let label = keys::account_label(me.as_bytes());
        // A lookup (one version) tells whether the entry changed since the last clean review.
        let Some((lookup_head, current)) = self
            .directory_lookup(endpoints::KEYS_LOOKUP_ACCOUNT, &[&me], &label, "your account")
            .await?
        else {
            return self.own_entry_missing(force, &state);
        };
        if !force && !state.own_alarm && current.version <= state.own_version {
            self.store.record_own_review(lookup_head.epoch, None, false)?;
            return Ok(vec![]);
        }
        let answer: HistoryAnswer = match self.directory_get(endpoints::KEYS_OWN_HISTORY, &[]).await {
            Err(e) if e.is_code(ErrorCode::NotInKeyDirectory) => return self.own_entry_missing(force, &state),
            other => other?,
        };
        let history_head = self.accept_head(&answer.head)?;
        let versions =
            keys::verify_history(&history_head, &label, &answer.proof).map_err(|e| proof_failure("your account", e))?;
        let own_key = fumi_core::AccountIdentity::from_secret(&self.account.identity_secret).public_key();
        let trusted = self.trusted_own_devices()?;
        let revoked = self.store.revoked_devices_at()?;
        // A removal reaches the directory within an epoch or two; until then the newest version
        // may still list the device.
        let removal_published_by = now_ms().saturating_sub(interval_ms.saturating_mul(2).saturating_add(2000));
        let newest_version = versions.iter().map(|v| v.version).max().unwrap_or(0);
        let mut oldest_first = versions
            .iter()
            .map(|v| Ok((v.version, AccountEntry::decode(&v.value)?)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| proof_failure("your account", e))?;
        oldest_first.sort_by_key(|(version, _)| *version);
        let put_back = listed_again(oldest_first.iter().map(|(_, entry)| entry));
        let mut warnings = Vec::new();
        let mut reported = HashSet::new();
        for version in versions.iter().rev() {
            let entry = AccountEntry::decode(&version.value).map_err(|e| proof_failure("your account", e))?;
            if entry.identity_key != own_key && reported.insert((None, "identity")) {
                warnings.push(format!(
                    "SECURITY WARNING: from key directory epoch {} the server published another identity key for \
                     your account{}: someone with access to the server may be impersonating you",
                    version.epoch,
                    if entry == AccountEntry::deleted() {
                        " (none: a deleted account)"
                    } else {
                        ""
                    }
                ));
            }
            for device in &entry.devices {
                let id = DeviceId::from_bytes(device.device);
                let problem = if let Some(revoked_at) = revoked.get(&id) {
                    // Listed before its removal is history; listed again after a version without
                    // it, or still listed long after the removal, it was put back.
                    (put_back.contains(&id)
                        || (version.version == newest_version && *revoked_at < removal_published_by))
                        .then_some("removed")
                } else {
                    match trusted.get(&id) {
                        None => Some("unknown"),
                        Some(Some(key)) if key.as_slice() != device.signature_key.as_slice() => Some("rekeyed"),
                        Some(_) => None,
                    }
                };
                let Some(problem) = problem else { continue };
                if !reported.insert((Some(id), problem)) {
                    continue;
                }
                warnings.push(match problem {
                    "removed" => format!(
                        "SECURITY WARNING: your account lists device {id} again (epoch {}), which you removed. \
                         Someone with access to the server may be reading your messages; remove it again with \
                         `fumi device remove {id}`.",
                        version.epoch
                    ),
                    "rekeyed" => format!(
                        "SECURITY WARNING: from key directory epoch {} your device {id} is listed with a signing key \
                         that is not its own: someone holding your account's identity secret may be posing as it.",
                        version.epoch
                    ),
                    _ => format!(
                        "SECURITY WARNING: from key directory epoch {} your account lists device {id}, which none \
                         of your devices linked. If you did not link it, someone may be reading your messages: \
                         remove it with `fumi device remove {id}` and tell your contacts.",
                        version.epoch
                    ),
                });
            }
        }
        // A problem is reported at every sync until it is resolved.
        let clean = warnings.is_empty();
        self.store
            .record_own_review(history_head.epoch, clean.then_some(newest_version), !clean)?;
        Ok(warnings)
    }
}

/// What an auditor remembers between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditorState {
    /// The server's log key, hex (pinned on the first run).
    pub log_key: String,
    /// The newest epoch audited.
    pub epoch: u64,
    /// Its root hash, hex.
    pub root_hash: String,
}

/// What an audit run checked.
#[derive(Debug, Clone)]
pub struct AuditReport {
    /// What to remember for the next run.
    pub state: AuditorState,
    /// The first epoch of this run.
    pub from_epoch: u64,
    /// Epoch transitions proven append-only in this run.
    pub epochs_checked: u64,
}

/// Checks, as any third party can, that the server's key directory only ever appended: every
/// epoch since the last audit (or since the first) extends the one before it, and the epoch
/// audited last time still has the root it had.
pub async fn audit_directory(server: &str, previous: Option<&AuditorState>) -> Result<AuditReport, ClientError> {
    let transport = Transport::new(server)?;
    let answer: HeadAnswer = transport.request::<(), _>(endpoints::KEYS_HEAD, &[], None).await?;
    let previous_state = previous
        .map(|state| -> Result<DirectoryState, ClientError> {
            let decode = |text: &str| {
                fumi_audit::decode_hash(text)
                    .ok_or_else(|| ClientError::Usage("the audit state file is damaged".into()))
            };
            Ok(DirectoryState::pinned(
                decode(&state.log_key)?,
                state.epoch,
                decode(&state.root_hash)?,
            ))
        })
        .transpose()?;
    let latest = check_head(previous_state.as_ref(), &answer.head)?;
    let log_key = match &previous_state {
        Some(state) => state.log_key,
        None => answer
            .head
            .named_log_key()
            .map_err(|e| ClientError::Protocol(e.to_string()))?,
    };
    let from = previous_state.as_ref().map_or(0, |state| state.epoch);
    let mut heads: Vec<EpochHead> = Vec::new();
    while heads.last().is_none_or(|head| head.epoch < latest.epoch) {
        let next = heads.last().map_or(from, |head| head.epoch + 1);
        let page: Vec<SignedEpochHead> = transport
            .request_query::<(), _>(endpoints::KEYS_HEADS, &[], &[("from", &next)], None)
            .await?;
        if page.is_empty() {
            return Err(security(format!(
                "the server cannot show the signed head of key directory epoch {next}; its history was truncated"
            )));
        }
        for signed in page {
            let head = signed
                .verify(&log_key)
                .map_err(|e| security(format!("key directory epoch {}: {e}", signed.epoch)))?;
            let expected = heads.last().map_or(from, |h| h.epoch + 1);
            if head.epoch != expected {
                return Err(security(format!(
                    "the server skipped key directory epoch {expected}; its history was rewritten"
                )));
            }
            heads.push(head);
            if heads.last().is_some_and(|h| h.epoch == latest.epoch) {
                break;
            }
        }
    }
    if let Some(state) = &previous_state
        && heads[0].root_hash != state.root_hash
    {
        return Err(security(format!(
            "KEY DIRECTORY HISTORY REWRITTEN: epoch {} had root {} when last audited, and now has root {}",
            state.epoch,
            hex::encode(state.root_hash),
            hex::encode(heads[0].root_hash)
        )));
    }
    if heads.last().map(|h| h.root_hash) != Some(latest.root_hash) {
        return Err(security(format!(
            "the server shows two different roots for key directory epoch {}",
            latest.epoch
        )));
    }
    // Each request proves up to AUDIT_EPOCHS_PER_REQUEST consecutive steps.
    for start in (0..heads.len() - 1).step_by(AUDIT_EPOCHS_PER_REQUEST as usize) {
        let end = (start + AUDIT_EPOCHS_PER_REQUEST as usize).min(heads.len() - 1);
        let slice = &heads[start..=end];
        let (from, to) = (slice[0].epoch, slice[slice.len() - 1].epoch);
        let proof: AuditAnswer = transport
            .request_query::<(), _>(endpoints::KEYS_AUDIT, &[], &[("from", &from), ("to", &to)], None)
            .await?;
        keys::verify_append_only(slice, &proof.proof).await.map_err(|e| {
            security(format!(
                "KEY DIRECTORY HISTORY REWRITTEN: epochs {} to {} are not an append-only extension ({e})",
                slice[0].epoch,
                slice[slice.len() - 1].epoch
            ))
        })?;
    }
    let newest = heads.last().expect("at least the latest head");
    Ok(AuditReport {
        state: AuditorState {
            log_key: hex::encode(log_key),
            epoch: newest.epoch,
            root_hash: hex::encode(newest.root_hash),
        },
        from_epoch: from,
        epochs_checked: newest.epoch - from,
    })
}

/// Epochs proven per audit request (the server allows 100).
pub const AUDIT_EPOCHS_PER_REQUEST: u64 = 100;

#[cfg(test)]
mod tests {
    use super::*;
    use fumi_audit::keys::DeviceKey;

    fn member(device: u8, signature_key: u8) -> Member {
        Member {
            account: AccountId::from_bytes([1; 16]),
            device: DeviceId::from_bytes([device; 16]),
            identity_key: [9; 32],
            signature_key: [signature_key; 32],
        }
    }

    fn entry(devices: &[(u8, u8)]) -> AccountEntry {
        AccountEntry {
            identity_key: [9; 32],
            devices: devices
                .iter()
                .map(|&(device, key)| DeviceKey {
                    device: [device; 16],
                    signature_key: vec![key; 32],
                })
                .collect(),
        }
    }

    #[test]
    fn a_device_linked_then_removed_was_once_listed() {
        // Phone 1; laptop 2 linked, removed; laptop 3 linked.
        let history = [
            entry(&[(1, 1)]),
            entry(&[(1, 1), (2, 2)]),
            entry(&[(1, 1)]),
            entry(&[(1, 1), (3, 3)]),
        ];
        assert!(once_listed(&history, &member(2, 2)));
        assert!(once_listed(&history, &member(3, 3)));
        // Another signing key, an identity key never listed, a device never listed: refused.
        assert!(!once_listed(&history, &member(2, 7)));
        assert!(!once_listed(
            &history,
            &Member {
                identity_key: [8; 32],
                ..member(2, 2)
            }
        ));
        assert!(!once_listed(&history, &member(4, 4)));
        assert!(!once_listed(&[], &member(1, 1)));
    }

    #[test]
    fn a_device_put_back_after_its_removal_was_not_once_listed() {
        // Device ids are never linked twice: listed again after a version without it, the
        // server put it back.
        let history = [entry(&[(1, 1), (2, 2)]), entry(&[(1, 1)]), entry(&[(1, 1), (2, 2)])];
        assert!(!once_listed(&history, &member(2, 2)));
        assert!(once_listed(&history, &member(1, 1)));
    }
}
