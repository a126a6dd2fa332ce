//! Linked devices, invite links, avatars and the contact list.
//!
//! **Linking.** An existing device seals a bundle (the account identity secret, profile key,
//! names and pinned contacts) under a fresh link key, stores it on the server under the hash of a
//! fresh link token, and shows `fumi://link/<server>/<token ‖ key>` (text and QR code). The new
//! device opens the bundle, creates its own MLS signature key certified by the identity key, and
//! joins through the one-time slot with a signature by that identity key. Every device of the
//! account then brings the conversations it is in to the account's device list on each sync:
//! listed devices missing from a group are added (MLS commits), unlisted ones removed.
//!
//! **Invites.** `fumi://invite/<server>/<account ‖ token ‖ identity key ‖ profile key>`: the
//! server keeps only the token's hash; the identity key in the link is pinned, so the server cannot
//! substitute another account key for the invited one.

use fumi_proto::ErrorCode;
use fumi_proto::endpoints;
use std::fs;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fumi_core::mls::MlsError;
use fumi_core::store::ClientStore;
use fumi_core::{AccountIdentity, Profile, ProfileKey, Username, sealing};
use fumi_proto::*;
use serde::{Deserialize, Serialize};

use crate::store::{AccountRow, STORE_FILE, Store, create_private_dir, write_private};
use crate::transport::Transport;
use crate::{ClientError, FumiClient, KEY_PACKAGE_STOCK, NoProgress, open_device, random_bytes, sha256};

const LINK_PREFIX: &str = "fumi://link/";
const INVITE_PREFIX: &str = "fumi://invite/";
/// Largest avatar image accepted, before sealing.
pub const MAX_AVATAR_BYTES: usize = 256 * 1024;
const BUNDLE_VERSION: u32 = 1;

/// One device of this account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSummary {
    /// Device id.
    pub id: String,
    /// Whether it is the device running this command.
    pub this_device: bool,
    /// Whether this device trusts it: itself, a device it linked, or one a trusted device of
    /// the account linked. A listed device that is not trusted was linked by none of them.
    pub trusted: bool,
    /// When this device learned of it (ms since the Unix epoch), if it trusts it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known_since: Option<u64>,
}

/// A contact for `contact list` and `contact add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactSummary {
    /// Account id.
    pub account_id: String,
    /// Full username, once known.
    pub username: Option<String>,
    /// Display name from their profile.
    pub name: Option<String>,
    /// Where their avatar was saved.
    pub avatar: Option<String>,
    /// Whether you verified their safety number in person (`fumi verify`).
    pub verified: bool,
}

/// A device-link code made by an existing device, waiting for the new one.
pub struct PendingLink {
    /// The code to give the new device (`fumi://link/...`).
    pub code: String,
    token_hash: [u8; 32],
    key: [u8; 32],
}

/// What a new device learns from the bundle.
#[derive(Serialize, Deserialize)]
struct AccountBundle {
    v: u32,
    identity_secret: Base64Bytes,
    profile_key: Base64Bytes,
    username: Option<String>,
    display_name: String,
    contacts: Vec<BundledContact>,
    /// Devices of the account that were removed: the new device never adds them back either.
    #[serde(default)]
    revoked: Vec<DeviceId>,
    /// Devices of the account the linking device trusts (itself included): the new device
    /// trusts them too, and reports any other device the key directory lists.
    #[serde(default)]
    known: Vec<DeviceId>,
    /// The key directory as the linking device saw it (log key, epoch, root): the new device
    /// starts from there instead of trusting the server on first use.
    #[serde(default)]
    directory: Option<BundledDirectory>,
}

#[derive(Serialize, Deserialize)]
struct BundledDirectory {
    log_key: Base64Bytes,
    epoch: u64,
    root_hash: Base64Bytes,
}

#[derive(Serialize, Deserialize)]
struct BundledContact {
    account: AccountId,
    identity_key: Base64Bytes,
    username: Option<String>,
    display_name: Option<String>,
    profile_key: Option<Base64Bytes>,
}

/// An invite link's payload: account (16) ‖ token (32) ‖ identity key (32) ‖ profile key (32) ‖
/// when the profile key was set (u64 BE, ms).
const INVITE_BYTES: usize = 16 + 32 + 32 + 32 + 8;

fn bundle_label(account: AccountId) -> Vec<u8> {
    [b"fumi device link v1".as_slice(), account.as_bytes()].concat()
}

pub(crate) fn encode_server(server: &str) -> String {
    URL_SAFE_NO_PAD.encode(server.trim_end_matches('/'))
}

/// Splits `prefix<server>/<payload>` into the server URL and the payload bytes.
pub(crate) fn parse_code(
    code: &str,
    prefix: &str,
    payload_len: usize,
    what: &str,
) -> Result<(String, Vec<u8>), ClientError> {
    let bad = || {
        ClientError::Usage(format!(
            "this is not a complete {what} (it starts with {prefix}); copy it again"
        ))
    };
    let rest = code.trim().strip_prefix(prefix).ok_or_else(bad)?;
    let (server, payload) = rest.split_once('/').ok_or_else(bad)?;
    let server = URL_SAFE_NO_PAD
        .decode(server)
        .ok()
        .and_then(|s| String::from_utf8(s).ok())
        .ok_or_else(bad)?;
    let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| bad())?;
    if payload.len() != payload_len {
        return Err(bad());
    }
    Ok((server, payload))
}

fn array32(bytes: &[u8]) -> [u8; 32] {
    bytes.try_into().expect("caller checked the length")
}

impl FumiClient {
    // --- linking -------------------------------------------------------------------------

    /// Opens a one-time slot for a new device of this account; the code holds the key to it.
    pub async fn create_device_link(&self) -> Result<PendingLink, ClientError> {
        let token: [u8; 32] = random_bytes();
        let key: [u8; 32] = random_bytes();
        let contacts = self
            .store
            .contacts()?
            .into_iter()
            .filter_map(|(contact, identity_key, profile_key)| {
                Some(BundledContact {
                    account: contact.account_id,
                    identity_key: Base64Bytes(identity_key?.to_vec()),
                    username: contact.username,
                    display_name: contact.display_name,
                    profile_key: profile_key.map(|k| Base64Bytes(k.to_vec())),
                })
            })
            .collect();
        let bundle = AccountBundle {
            v: BUNDLE_VERSION,
            identity_secret: Base64Bytes(self.account.identity_secret.to_vec()),
            profile_key: Base64Bytes(self.account.profile_key.to_vec()),
            username: self.account.username.clone(),
            display_name: self.account.display_name.clone(),
            contacts,
            revoked: self.store.revoked_devices()?,
            known: self.trusted_own_devices()?.into_keys().collect(),
            directory: self.store.directory_state()?.map(|state| BundledDirectory {
                log_key: Base64Bytes(state.log_key.to_vec()),
                epoch: state.epoch,
                root_hash: Base64Bytes(state.root_hash.to_vec()),
            }),
        };
        let plaintext = fumi_core::padding::pad(&serde_json::to_vec(&bundle).expect("bundle serialises"));
        let sealed = sealing::seal(
            &key,
            &bundle_label(self.account.account_id),
            &plaintext,
            &mut rand::rng(),
        );
        let token_hash = sha256(&token);
        let request = LinkCreate {
            token_hash: Base64Bytes(token_hash.to_vec()),
            sealed: Base64Bytes(sealed),
        };
        let _: () = self
            .transport
            .request(endpoints::CREATE_LINK, &[], Some(&request))
            .await?;
        let code = format!(
            "{LINK_PREFIX}{}/{}",
            encode_server(&self.account.server),
            URL_SAFE_NO_PAD.encode([token, key].concat())
        );
        Ok(PendingLink { code, token_hash, key })
    }

    /// Waits until a device used the link, then adds it to every conversation of this device.
    pub async fn wait_for_link(
        &mut self,
        link: &PendingLink,
        timeout: std::time::Duration,
    ) -> Result<String, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let token_hash = hex::encode(link.token_hash);
        loop {
            let status: LinkStatus = match self
                .transport
                .request::<(), _>(endpoints::LINK_STATUS, &[&token_hash], None)
                .await
            {
                Err(e) if e.is_code(ErrorCode::UnknownLink) => {
                    return Err(ClientError::Usage(
                        "the link expired before a device used it; run `fumi device link` again".into(),
                    ));
                }
                other => other?,
            };
            if let Some(device) = status.device_id {
                // The new device is ours only if it proves it holds the link code: the server
                // cannot name a device of its own as the one that used the link.
                let signature_key: [u8; 32] = status
                    .signature_key
                    .as_ref()
                    .and_then(|key| key.as_slice().try_into().ok())
                    .ok_or_else(|| ClientError::Protocol("the link status lacks the new device's key".into()))?;
                let expected = fumi_core::identity::link_proof(&link.key, device, &signature_key);
                if status.link_proof.as_ref().map(|proof| proof.as_slice()) != Some(expected.as_slice()) {
                    return Err(ClientError::KeyTransparency(format!(
                        "the server says device {device} used your link, but that device cannot prove it held the \
                         link code; it was not added. Someone with access to the server may be trying to join your \
                         account."
                    )));
                }
                self.store.know_device(device, Some(&signature_key), crate::now_ms())?;
                self.sync().await?;
                // History is a courtesy: the link stands even if handing it over fails.
                if let Err(e) = self.send_history(&link.token_hash, &link.key, device).await {
                    tracing::warn!(error = %e, "could not hand the message history to the new device");
                }
                return Ok(device.to_string());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Usage(
                    "no device used the link in time; it stays valid for 10 minutes after it was made, and \
                     your other devices add the new one to conversations when they next sync"
                        .into(),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }

    /// Makes `home` a new device of the account that made `code`.
    pub async fn link(home: &Path, code: &str) -> Result<Self, ClientError> {
        if Store::exists(home) && Store::open(home)?.0.account()?.is_some() {
            return Err(ClientError::Usage(format!(
                "{} already holds an account; link into an empty --home",
                home.display()
            )));
        }
        let (server, payload) = parse_code(code, LINK_PREFIX, 64, "device-link code")?;
        let (token, key) = (array32(&payload[..32]), array32(&payload[32..]));
        let mut transport = Transport::new(&server)?;
        let opened: LinkBundle = match transport
            .request(
                endpoints::OPEN_LINK,
                &[],
                Some(&LinkOpen {
                    token: Base64Bytes(token.to_vec()),
                }),
            )
            .await
        {
            Err(e) if e.is_code(ErrorCode::UnknownLink) => {
                return Err(ClientError::Usage(
                    "this link code was already used or has expired; make a new one with `fumi device link` on \
                     your other device"
                        .into(),
                ));
            }
            other => other?,
        };
        let account_id = opened.account_id;
        let bundle: AccountBundle = sealing::open(&key, &bundle_label(account_id), opened.sealed.as_slice())
            .and_then(|padded| {
                let json = fumi_core::padding::unpad(&padded).ok()?;
                serde_json::from_slice(json).ok()
            })
            .filter(|b: &AccountBundle| {
                b.v == BUNDLE_VERSION
                    && b.identity_secret.as_slice().len() == 32
                    && b.profile_key.as_slice().len() == 32
            })
            .ok_or_else(|| ClientError::Usage("the link code does not open this link; copy it again".into()))?;

        let result = Self::join_account(home, &mut transport, &server, account_id, (&token, &key), bundle).await;
        if result.is_err() {
            // Leave nothing half-made: the user can link again into the same home.
            for suffix in ["", "-wal", "-shm"] {
                let _ = fs::remove_file(home.join(format!("{STORE_FILE}{suffix}")));
            }
        }
        result
    }

    async fn join_account(
        home: &Path,
        transport: &mut Transport,
        server: &str,
        account_id: AccountId,
        (token, key_for_history): (&[u8; 32], &[u8; 32]),
        bundle: AccountBundle,
    ) -> Result<Self, ClientError> {
        let identity = AccountIdentity::from_secret(&array32(bundle.identity_secret.as_slice()));
        let device_id = DeviceId::from_bytes(random_bytes());
        let device_secret: [u8; 32] = random_bytes();
        let (store, provider) = Store::open(home)?;
        let signature_key = fumi_core::MlsDevice::generate_signature_key(&provider)?;
        let account = AccountRow {
            server: server.trim_end_matches('/').to_owned(),
            account_id,
            device_id,
            device_secret,
            identity_secret: identity.secret(),
            signature_key: Some(signature_key),
            profile_key: array32(bundle.profile_key.as_slice()),
            username: bundle.username.filter(|u| Username::parse(u).is_ok()),
            display_name: bundle.display_name,
            avatar_digest: None,
            profile_key_set_at: crate::now_ms(),
        };
        store.save_account(&account)?;
        for device in &bundle.revoked {
            store.revoke_device(*device, crate::now_ms())?;
        }
        for device in &bundle.known {
            store.know_device(*device, None, crate::now_ms())?;
        }
        if let Some(directory) = &bundle.directory
            && let (Ok(log_key), Ok(root_hash)) = (
                <[u8; 32]>::try_from(directory.log_key.as_slice()),
                <[u8; 32]>::try_from(directory.root_hash.as_slice()),
            )
        {
            store.save_directory_state(&crate::store::DirectoryState::pinned(
                log_key,
                directory.epoch,
                root_hash,
            ))?;
        }
        for contact in &bundle.contacts {
            let Ok(identity_key) = <[u8; 32]>::try_from(contact.identity_key.as_slice()) else {
                continue;
            };
            store.upsert_contact(
                contact.account,
                contact.username.as_deref(),
                contact.display_name.as_deref(),
            )?;
            store.check_identity_key(contact.account, &identity_key)?;
            if let Some(key) = contact
                .profile_key
                .as_ref()
                .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
            {
                store.set_profile_key(contact.account, &key, 0)?;
            }
        }
        let device = open_device(provider, &account)?;
        store.know_device(device_id, Some(&device.me().signature_key), crate::now_ms())?;
        let fresh = device.key_packages(KEY_PACKAGE_STOCK, true)?;
        let token_hash = sha256(token);
        let secret_hash = sha256(&device_secret);
        let request = LinkDevice {
            token: Base64Bytes(token.to_vec()),
            device_id,
            device_secret_hash: Base64Bytes(secret_hash.to_vec()),
            signature: Base64Bytes(
                identity
                    .sign_device_link(account_id, device_id, &token_hash, &secret_hash)
                    .to_vec(),
            ),
            key_packages: fresh.one_time.into_iter().map(Base64Bytes).collect(),
            last_resort: fresh.last_resort.map(Base64Bytes),
            link_proof: Some(Base64Bytes(
                fumi_core::identity::link_proof(key_for_history, device_id, &device.me().signature_key).to_vec(),
            )),
        };
        match transport
            .request::<_, ()>(endpoints::LINK_DEVICE, &[], Some(&request))
            .await
        {
            Err(e) if e.is_code(ErrorCode::UnknownLink) => {
                return Err(ClientError::Usage(
                    "another device used this link code first; make a new one".into(),
                ));
            }
            other => other?,
        }
        transport.authenticate(device_id, &device_secret);
        let mut client = Self {
            home: home.to_path_buf(),
            progress: Box::new(NoProgress),
            store,
            transport: transport.clone(),
            device,
            account,
            joined: Vec::new(),
            key_warnings: Vec::new(),
        };
        client
            .store
            .add_pending_history(token, key_for_history, crate::now_ms())?;
        client.fetch_own_avatar().await;
        Ok(client)
    }

    /// The new device keeps a copy of the account's avatar, to re-seal it when the profile
    /// changes. Best effort: without it, a later profile change drops the avatar.
    async fn fetch_own_avatar(&mut self) {
        let key = ProfileKey::from_bytes(self.account.profile_key);
        let Ok(Some(digest)) = self.own_profile(&key).await.map(|p| p.and_then(|p| p.avatar)) else {
            return;
        };
        if let Ok(Some(image)) = self.fetch_avatar(self.account.account_id, &key, &digest).await
            && write_private(&self.home.join("avatar"), &image).is_ok()
        {
            self.account.avatar_digest = Some(digest);
            let _ = self.store.save_account(&self.account);
        }
    }

    /// This account's published profile, if it opens with `key`; network failures are errors.
    async fn own_profile(&self, key: &ProfileKey) -> Result<Option<Profile>, ClientError> {
        let me = self.account.account_id;
        match self
            .transport
            .request::<(), SealedProfile>(endpoints::PROFILE, &[&me], None)
            .await
        {
            Ok(sealed) => Ok(Profile::open(sealed.sealed.as_slice(), key, me).ok()),
            Err(e @ ClientError::Network(_)) => Err(e),
            Err(_) => Ok(None),
        }
    }

    /// This account's devices as the server lists them, with what this device knows of each.
    pub async fn devices(&self) -> Result<Vec<DeviceSummary>, ClientError> {
        let info = self.own_account_info().await?;
        let trusted = self.trusted_own_devices()?;
        let learned = self.store.known_devices_learned_at()?;
        Ok(info
            .devices
            .into_iter()
            .map(|d| DeviceSummary {
                id: d.to_string(),
                this_device: d == self.account.device_id,
                trusted: trusted.contains_key(&d),
                known_since: learned.get(&d).copied().filter(|_| trusted.contains_key(&d)),
            })
            .collect())
    }

    async fn own_account_info(&self) -> Result<AccountInfo, ClientError> {
        let me = self.account.account_id;
        self.transport.request::<(), _>(endpoints::ACCOUNT, &[&me], None).await
    }

    /// Removes another device of this account (by id or a unique prefix of it): the server stops
    /// serving it at once, and it is removed from every conversation of this device.
    pub async fn remove_device(&mut self, id: &str) -> Result<String, ClientError> {
        let id = id.trim().to_ascii_lowercase();
        let listed = self.own_account_info().await?.devices;
        let matching: Vec<DeviceId> = listed
            .into_iter()
            .filter(|d| !id.is_empty() && d.to_string().starts_with(&id))
            .collect();
        let target = match matching.as_slice() {
            [] => {
                return Err(ClientError::Usage(format!(
                    "no device of yours starts with {id:?}; see `fumi device list`"
                )));
            }
            [one] => *one,
            _ => {
                return Err(ClientError::Usage(format!(
                    "several devices start with {id:?}; give more of the id"
                )));
            }
        };
        if target == self.account.device_id {
            return Err(ClientError::Usage(
                "this is the device you are using; remove it from another of your devices".into(),
            ));
        }
        let _: () = self
            .transport
            .request::<(), _>(endpoints::REMOVE_DEVICE, &[&target], None)
            .await?;
        // Recorded, so that a server listing it again cannot make this device re-add it.
        self.store.revoke_device(target, crate::now_ms())?;
        self.sync().await?;
        Ok(target.to_string())
    }

    /// Brings every conversation of this device in line with the account's device list. A
    /// conversation that cannot be changed now is logged and tried again at the next sync.
    pub(crate) async fn reconcile_own_devices(&mut self) -> Result<(), ClientError> {
        let revoked = self.store.revoked_devices()?;
        let trusted = self.trusted_own_devices()?;
        // Devices the server still lists stay; only trusted ones are brought in: a device the
        // server lists but none of ours linked is added nowhere (and `fumi keys check` reports it).
        let mut listed = Vec::new();
        let mut to_add = Vec::new();
        for device in self.own_account_info().await?.devices {
            if revoked.contains(&device) {
                continue;
            }
            listed.push(device);
            if trusted.contains_key(&device) {
                to_add.push(device);
            } else {
                tracing::warn!(%device, "the server lists a device of yours that none of your devices linked; not adding it");
            }
        }
        for conversation in self.store.conversations()? {
            let group = conversation.group_id;
            if !conversation.active || !self.device.is_member(group) {
                continue;
            }
            match self.reconcile_conversation(group, &listed, &to_add).await {
                Ok(()) => {}
                Err(e) if e.is_local() => return Err(e),
                Err(e) => tracing::warn!(error = %e, "could not bring a conversation up to date with your devices yet"),
            }
        }
        Ok(())
    }

    /// Removes own devices the server no longer lists (`listed`) and adds the trusted ones
    /// (`to_add`) missing from the conversation.
    async fn reconcile_conversation(
        &mut self,
        group: GroupId,
        listed: &[DeviceId],
        to_add: &[DeviceId],
    ) -> Result<(), ClientError> {
        let me = self.account.account_id;
        let own: Vec<fumi_core::Member> = self
            .device
            .members(group)?
            .into_iter()
            .filter(|m| m.account == me)
            .collect();
        let stale: Vec<DeviceId> = own.iter().map(|m| m.device).filter(|d| !listed.contains(d)).collect();
        if !stale.is_empty() {
            let result = self
                .commit(group, |device| {
                    let removed: Vec<fumi_core::Member> = device
                        .members(group)?
                        .into_iter()
                        .filter(|m| stale.contains(&m.device))
                        .collect();
                    if removed.is_empty() {
                        return Err(MlsError::Refused("already removed".into()));
                    }
                    device.remove_members(group, &removed)
                })
                .await;
            ignore_settled(result)?;
            for device in &stale {
                self.store.revoke_device(*device, crate::now_ms())?;
            }
        }
        let missing: Vec<DeviceId> = to_add
            .iter()
            .copied()
            .filter(|d| !own.iter().any(|m| m.device == *d))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let claimed = self.claim_verified(&[me], &missing).await?;
        let result = self
            .commit(group, |device| {
                let present = device.members(group)?;
                let fresh: Vec<_> = claimed
                    .iter()
                    .filter(|(_, member)| !present.iter().any(|p| p.device == member.device))
                    .map(|(key_package, _)| key_package.clone())
                    .collect();
                if fresh.is_empty() {
                    return Err(MlsError::Refused("already added".into()));
                }
                device.add_members(group, &fresh)
            })
            .await;
        match result {
            // The new device learns the conversation's name and members' profile keys.
            Ok(()) => self.send_conversation_settings(group).await,
            other => ignore_settled(other),
        }
    }

    /// After another of our devices changed the profile key (adopted while receiving), takes
    /// the name and avatar from the profile it published. The key is kept only if the profile
    /// on the server opens with it: a device that had not yet seen a newer key announces an
    /// older one, which must not win.
    pub(crate) async fn follow_own_profile(&mut self) -> Result<(), ClientError> {
        let Some(stored) = self.store.account()? else {
            return Ok(());
        };
        if stored.profile_key == self.account.profile_key {
            return Ok(());
        }
        let Some(profile) = self.own_profile(&ProfileKey::from_bytes(stored.profile_key)).await? else {
            // Not the current key: keep ours.
            return Ok(self.store.save_account(&self.account)?);
        };
        self.account.profile_key = stored.profile_key;
        self.account.profile_key_set_at = stored.profile_key_set_at;
        self.account.display_name = profile.name;
        if profile.avatar != self.account.avatar_digest {
            self.account.avatar_digest = None;
            let _ = fs::remove_file(self.home.join("avatar"));
        }
        self.store.save_account(&self.account)?;
        if self.account.avatar_digest.is_none() {
            self.fetch_own_avatar().await;
        }
        Ok(())
    }

    // --- invites and contacts ------------------------------------------------------------

    /// Makes a one-time invite link to this account.
    pub async fn create_invite(&self) -> Result<String, ClientError> {
        let token: [u8; 32] = random_bytes();
        let request = InviteCreate {
            token_hash: Base64Bytes(sha256(&token).to_vec()),
        };
        let _: () = self
            .transport
            .request(endpoints::CREATE_INVITE, &[], Some(&request))
            .await?;
        let identity_key = AccountIdentity::from_secret(&self.account.identity_secret).public_key();
        let payload = [
            self.account.account_id.as_bytes().as_slice(),
            &token,
            &identity_key,
            &self.account.profile_key,
            &self.account.profile_key_set_at.to_be_bytes(),
        ]
        .concat();
        Ok(format!(
            "{INVITE_PREFIX}{}/{}",
            encode_server(&self.account.server),
            URL_SAFE_NO_PAD.encode(payload)
        ))
    }

    /// Uses an invite link: pins the inviter's identity key from the link, learns their profile,
    /// and opens a 1:1 conversation with them.
    pub async fn accept_invite(&mut self, code: &str) -> Result<ContactSummary, ClientError> {
        // Links made before the profile key's time was added are 8 bytes shorter.
        let (server, payload) = parse_code(code, INVITE_PREFIX, INVITE_BYTES, "invite link")
            .or_else(|_| parse_code(code, INVITE_PREFIX, INVITE_BYTES - 8, "invite link"))?;
        if server.trim_end_matches('/') != self.account.server {
            return Err(ClientError::Usage(format!(
                "this invite is for the server {server}, and your account is on {}",
                self.account.server
            )));
        }
        let account = AccountId::from_slice(&payload[..16]).map_err(|e| ClientError::Usage(e.to_string()))?;
        let token = array32(&payload[16..48]);
        let identity_key = array32(&payload[48..80]);
        let profile_key = array32(&payload[80..112]);
        // The inviter's clock, as the sent_at of its messages: a message queued from before
        // the invite carries an older key and does not replace this one.
        let profile_key_set_at = payload
            .get(112..120)
            .map_or(0, |at| u64::from_be_bytes(at.try_into().expect("8 bytes")));
        if account == self.account.account_id {
            return Err(ClientError::Usage("this is your own invite link".into()));
        }
        let redeem = InviteRedeem {
            account_id: account,
            token: Base64Bytes(token.to_vec()),
        };
        match self
            .transport
            .request::<_, ()>(endpoints::REDEEM_INVITE, &[], Some(&redeem))
            .await
        {
            Err(e) if e.is_code(ErrorCode::UnknownInvite) => {
                return Err(ClientError::Usage(
                    "this invite link is not valid (mistyped, expired, or withdrawn); ask for a new one".into(),
                ));
            }
            Err(e) if e.is_code(ErrorCode::InviteUsed) => {
                return Err(ClientError::Usage(
                    "this invite link was already used; ask for a new one".into(),
                ));
            }
            other => other?,
        }
        if !self.store.check_identity_key(account, &identity_key)? {
            return Err(self.identity_changed(account)?);
        }
        self.store.set_profile_key(account, &profile_key, profile_key_set_at)?;
        self.fetch_profiles().await?;
        if self.direct_conversation(account)?.is_none() {
            // Claims key packages checked against the key pinned from the link just now.
            self.create_conversation(None, &[account]).await?;
        }
        let contact = self.store.contact(account)?;
        Ok(ContactSummary {
            account_id: account.to_string(),
            verified: self.store.is_verified(account)?,
            username: contact.as_ref().and_then(|c| c.username.clone()),
            name: contact.as_ref().and_then(|c| c.display_name.clone()),
            avatar: contact.and_then(|c| c.avatar_path),
        })
    }

    /// Everyone this device has a pinned identity key for.
    pub fn contacts(&self) -> Result<Vec<ContactSummary>, ClientError> {
        self.store
            .contacts()?
            .into_iter()
            .map(|(c, _, _)| {
                Ok(ContactSummary {
                    account_id: c.account_id.to_string(),
                    verified: self.store.is_verified(c.account_id)?,
                    username: c.username,
                    name: c.display_name,
                    avatar: c.avatar_path,
                })
            })
            .collect()
    }

    // --- profiles and avatars ------------------------------------------------------------

    /// Sets the avatar image (PNG, JPEG, GIF or WebP, at most [`MAX_AVATAR_BYTES`]).
    pub async fn set_avatar(&mut self, path: &Path) -> Result<(), ClientError> {
        let image = fs::read(path).map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", path.display())))?;
        if image.len() > MAX_AVATAR_BYTES {
            return Err(ClientError::Usage(format!(
                "an avatar is at most {} KiB; this one is {} KiB — make it smaller",
                MAX_AVATAR_BYTES / 1024,
                image.len() / 1024
            )));
        }
        if image_extension(&image).is_none() {
            return Err(ClientError::Usage(
                "an avatar must be a PNG, JPEG, GIF or WebP image".into(),
            ));
        }
        write_private(&self.home.join("avatar"), &image).map_err(|e| ClientError::Store(e.to_string()))?;
        self.account.avatar_digest = Some(hex::encode(sha256(&image)));
        self.account.profile_key = random_bytes();
        self.account.profile_key_set_at = crate::now_ms();
        self.store.save_account(&self.account)?;
        self.publish_profile().await
    }

    /// Seals and uploads the avatar (if any) and the profile that names its digest.
    pub(crate) async fn publish_profile(&mut self) -> Result<(), ClientError> {
        let mut profile = Profile::new(&self.account.display_name, self.account.username.clone())
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let key = ProfileKey::from_bytes(self.account.profile_key);
        let me = self.account.account_id;
        if self.account.avatar_digest.is_some() {
            match fs::read(self.home.join("avatar")) {
                Ok(image) => {
                    let sealed = fumi_core::profile::seal_avatar(&image, &key, me, &mut rand::rng());
                    let _: () = self
                        .transport
                        .request(
                            endpoints::PUT_AVATAR,
                            &[],
                            Some(&SealedAvatar {
                                sealed: Base64Bytes(sealed),
                            }),
                        )
                        .await?;
                    profile.avatar = Some(hex::encode(sha256(&image)));
                }
                Err(e) => tracing::warn!(error = %e, "the avatar image is missing; publishing the profile without it"),
            }
        }
        let sealed = profile.seal(&key, me, &mut rand::rng());
        let _: () = self
            .transport
            .request(
                endpoints::PUT_PROFILE,
                &[],
                Some(&SealedProfile {
                    sealed: Base64Bytes(sealed),
                }),
            )
            .await?;
        Ok(())
    }

    /// Fetches the profiles (and avatars) of contacts whose profile key changed.
    pub(crate) async fn fetch_profiles(&mut self) -> Result<(), ClientError> {
        for (account, key) in self.store.profiles_to_fetch()? {
            let key = ProfileKey::from_bytes(key);
            let profile = match self
                .transport
                .request::<(), SealedProfile>(endpoints::PROFILE, &[&account], None)
                .await
            {
                Ok(sealed) => match Profile::open(sealed.sealed.as_slice(), &key, account) {
                    Ok(profile) => profile,
                    Err(e) => {
                        // Usually a key from a message queued before the contact changed it (the
                        // newer key comes with their next message); or the server altered it.
                        tracing::info!(
                            account = %account.redacted(),
                            error = %e,
                            "a contact's profile does not open with the newest key this device has for them"
                        );
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(account = %account.redacted(), error = %e, "could not fetch a contact's profile");
                    continue;
                }
            };
            let username = profile.username.as_deref().filter(|u| Username::parse(u).is_ok());
            self.store.set_profile(account, username, &profile.name)?;
            let Some(digest) = profile.avatar else { continue };
            if self.store.contact_avatar_digest(account)?.as_deref() == Some(digest.as_str()) {
                continue;
            }
            match self.fetch_avatar(account, &key, &digest).await {
                Ok(Some(image)) => {
                    let dir = self.home.join("avatars");
                    let file = dir.join(format!("{account}.{}", image_extension(&image).unwrap_or("img")));
                    create_private_dir(&dir)?;
                    write_private(&file, &image).map_err(|e| ClientError::Store(e.to_string()))?;
                    self.store
                        .set_contact_avatar(account, &digest, &file.display().to_string())?;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(account = %account.redacted(), error = %e, "could not fetch a contact's avatar")
                }
            }
        }
        Ok(())
    }

    /// Fetches and opens an avatar; `None` if it is missing or does not match its digest.
    async fn fetch_avatar(
        &self,
        account: AccountId,
        key: &ProfileKey,
        digest: &str,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let sealed: SealedAvatar = match self
            .transport
            .request::<(), _>(endpoints::AVATAR, &[&account], None)
            .await
        {
            Err(e) if e.is_code(ErrorCode::UnknownAvatar) => return Ok(None),
            other => other?,
        };
        let image = match fumi_core::profile::open_avatar(sealed.sealed.as_slice(), key, account) {
            Ok(image) => image,
            Err(e) => {
                tracing::warn!(account = %account.redacted(), error = %e, "an avatar did not open");
                return Ok(None);
            }
        };
        if hex::encode(sha256(&image)) != digest || image_extension(&image).is_none() {
            tracing::warn!(account = %account.redacted(), "an avatar does not match its profile; ignored");
            return Ok(None);
        }
        Ok(Some(image))
    }
}

/// A commit that turned out unnecessary (another device made it first) is not an error.
fn ignore_settled(result: Result<(), ClientError>) -> Result<(), ClientError> {
    match result {
        Err(ClientError::Mls(MlsError::Refused(_))) => Ok(()),
        other => other,
    }
}

/// The file extension for an image's magic bytes; `None` if it is not a supported image.
fn image_extension(image: &[u8]) -> Option<&'static str> {
    if image.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if image.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("jpg")
    } else if image.starts_with(b"GIF87a") || image.starts_with(b"GIF89a") {
        Some("gif")
    } else if image.len() > 12 && &image[..4] == b"RIFF" && &image[8..12] == b"WEBP" {
        Some("webp")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_refuse_damage() {
        let code = format!(
            "{LINK_PREFIX}{}/{}",
            encode_server("http://127.0.0.1:8080/"),
            URL_SAFE_NO_PAD.encode([7u8; 64])
        );
        let (server, payload) = parse_code(&code, LINK_PREFIX, 64, "link").unwrap();
        assert_eq!(server, "http://127.0.0.1:8080");
        assert_eq!(payload, vec![7u8; 64]);
        assert!(parse_code(&code[..code.len() - 3], LINK_PREFIX, 64, "link").is_err());
        assert!(parse_code(&code, INVITE_PREFIX, 64, "invite").is_err());
        assert!(parse_code("fumi://link/!!/??", LINK_PREFIX, 64, "link").is_err());
    }

    #[test]
    fn recognises_images_only() {
        assert_eq!(image_extension(b"\x89PNG\r\n\x1a\nrest"), Some("png"));
        assert_eq!(image_extension(&[0xff, 0xd8, 0xff, 0xe0]), Some("jpg"));
        assert_eq!(image_extension(b"RIFF\0\0\0\0WEBPVP8 "), Some("webp"));
        assert_eq!(image_extension(b"%PDF-1.7"), None);
    }
}
