//! Simulated devices: the protocol of `docs/PROTOCOL.md` spoken directly, with real MLS
//! (fumi-core over OpenMLS's in-memory provider) but no client store, so the load generator
//! measures the server and not a client's disk.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fumi_core::AccountIdentity;
use fumi_core::mls::MlsDevice;
use fumi_core::official::{
    CHANNEL_VERSION, ChannelInfo, ChannelKey, OrganisationProfile, Post, PostBody, seal_info, seal_post,
};
use fumi_proto::endpoints::{self, Endpoint};
use fumi_proto::*;
use futures_util::{SinkExt, StreamExt};
use openmls_rust_crypto::OpenMlsRustCrypto;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// One simulated device of its own account.
pub struct SimDevice {
    pub account: AccountId,
    identity: AccountIdentity,
    authorization: String,
    base: String,
    http: reqwest::Client,
    mls: MlsDevice<OpenMlsRustCrypto>,
}

pub fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// The key under which a sent message is matched to its delivery.
pub fn fingerprint(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl SimDevice {
    /// Registers an account with one device and uploads `key_packages` KeyPackages.
    pub async fn register(http: &reqwest::Client, base: &str, key_packages: usize) -> Result<Self> {
        let identity = AccountIdentity::generate(&mut rand::rng());
        let secret: [u8; 32] = random();
        let request = RegisterRequest {
            identity_key: Base64Bytes(identity.public_key().to_vec()),
            device_secret_hash: Base64Bytes(Sha256::digest(secret).to_vec()),
            // Accounts in another region than the server's own (messages to them are
            // forwarded there): FUMI_BENCH_REGION=jp.
            region: std::env::var("FUMI_BENCH_REGION").ok(),
        };
        let registered: RegisterResponse = post(http, base, endpoints::REGISTER.path, None, &request).await?;
        let provider = OpenMlsRustCrypto::default();
        let signature_key = MlsDevice::generate_signature_key(&provider)?;
        let mls = MlsDevice::open(
            provider,
            &identity,
            registered.account_id,
            registered.device_id,
            &signature_key,
        )?;
        let device = Self {
            account: registered.account_id,
            identity,
            authorization: format!("{AUTH_SCHEME} {}:{}", registered.device_id, hex::encode(secret)),
            base: base.to_owned(),
            http: http.clone(),
            mls,
        };
        if key_packages > 0 {
            let fresh = device.mls.key_packages(key_packages, false)?;
            let upload = KeyPackageUpload {
                key_packages: fresh.one_time.into_iter().map(Base64Bytes).collect(),
                last_resort: None,
            };
            let _: KeyPackageCount = device
                .post(endpoints::UPLOAD_KEY_PACKAGES.path_with(&[]), &upload)
                .await?;
        }
        Ok(device)
    }

    /// POSTs to `path`, made by the endpoint's `path_with`.
    async fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(&self, path: String, body: &B) -> Result<R> {
        post(&self.http, &self.base, &path, Some(&self.authorization), body).await
    }

    /// Calls `endpoint` without a body (its parameters from `args`, then `query`, which is
    /// empty or starts with `?`) and checks the status.
    pub fn call<'a>(
        &'a self,
        endpoint: Endpoint,
        args: &[&dyn Display],
        query: &str,
    ) -> impl Future<Output = Result<reqwest::Response>> + Send + use<'a> {
        let path = format!("{}{query}", endpoint.path_with(args));
        let method = reqwest::Method::from_bytes(endpoint.method.as_bytes());
        async move { self.send(method?, path).await }
    }

    async fn send(&self, method: reqwest::Method, path: String) -> Result<reqwest::Response> {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("authorization", &self.authorization)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("{path}: {}", response.text().await.unwrap_or_default());
        }
        Ok(response)
    }

    /// Creates a channel owned by this device's account; returns its id and key.
    pub async fn create_channel(&self) -> Result<(ChannelId, ChannelKey)> {
        let channel = ChannelId::from_bytes(random());
        let key = ChannelKey {
            epoch: 0,
            key: random(),
        };
        let info = ChannelInfo {
            v: CHANNEL_VERSION,
            channel,
            epoch: 0,
            name: "bench".into(),
            description: None,
            organisation: OrganisationProfile {
                name: "bench".into(),
                logo: None,
                verification: None,
            },
        };
        let sealed = seal_info(&self.identity, &key, &info, &mut rand::rng());
        let _: () = self
            .post(
                endpoints::CREATE_CHANNEL.path_with(&[]),
                &ChannelCreate {
                    channel_id: channel,
                    sealed_info: Base64Bytes(sealed),
                },
            )
            .await?;
        Ok((channel, key))
    }

    /// Signs and seals post `seq` (the organisation's whole per-post cost).
    pub fn seal_post(&self, channel: ChannelId, key: &ChannelKey, seq: u64, size: usize) -> Vec<u8> {
        let post = Post {
            v: CHANNEL_VERSION,
            channel,
            epoch: key.epoch,
            seq,
            sent_at: 0,
            body: PostBody::Text { text: "x".repeat(size) },
        };
        seal_post(&self.identity, key, &post, &mut rand::rng())
    }

    /// Stores a sealed post.
    pub async fn submit_post(&self, channel: ChannelId, seq: u64, sealed: Vec<u8>) -> Result<()> {
        let post = ChannelPostSubmit {
            seq,
            sealed_post: Base64Bytes(sealed),
        };
        self.post(endpoints::POST_TO_CHANNEL.path_with(&[&channel]), &post)
            .await
    }

    /// Creates a group with these devices (each of its own account), adding at most 100 per
    /// commit; returns the group id and the largest Welcome sent.
    pub async fn create_group(&self, members: &[&SimDevice]) -> Result<(GroupId, usize)> {
        let mut largest_welcome = 0;
        let group = GroupId::from_bytes(random());
        self.mls.create_group(group)?;
        for batch in members.chunks(100) {
            let claim = KeyPackageClaim {
                accounts: batch.iter().map(|m| m.account).collect(),
                devices: vec![],
            };
            let claimed: ClaimedKeyPackages = self.post(endpoints::CLAIM_KEY_PACKAGES.path_with(&[]), &claim).await?;
            let mut key_packages = Vec::new();
            for entry in &claimed.key_packages {
                let (key_package, _) =
                    self.mls
                        .verify_key_package(entry.key_package.as_slice(), entry.account_id, entry.device_id)?;
                key_packages.push(key_package);
            }
            let commit = self.mls.add_members(group, &key_packages)?;
            largest_welcome = largest_welcome.max(commit.welcome.as_ref().map_or(0, Vec::len));
            let request = SubmitMessage {
                id: MessageId::from_bytes(random()),
                message: Base64Bytes(commit.message),
                recipients: commit.recipients.iter().map(|m| m.device).collect(),
                welcome: commit.welcome.map(|welcome| WelcomeDelivery {
                    message: Base64Bytes(welcome),
                    recipients: commit.added.iter().map(|m| m.device).collect(),
                }),
                removed: vec![],
            };
            let _: SubmitAccepted = self.post(endpoints::SUBMIT_MESSAGE.path_with(&[]), &request).await?;
            self.mls.confirm_commit(group)?;
        }
        Ok((group, largest_welcome))
    }

    /// Encrypts `size` random bytes for the group: a real MLS PrivateMessage.
    pub fn encrypt(&self, group: GroupId, size: usize) -> Result<(Vec<u8>, Vec<DeviceId>)> {
        let mut plaintext = vec![0u8; size];
        rand::rng().fill_bytes(&mut plaintext);
        let outgoing = self.mls.encrypt(group, &plaintext)?;
        Ok((outgoing.message, outgoing.recipients.iter().map(|m| m.device).collect()))
    }

    /// Submits one prepared message; returns when the server has it on disk.
    pub async fn submit(&self, message: Vec<u8>, recipients: Vec<DeviceId>) -> Result<()> {
        self.submit_with_id(MessageId::from_bytes(random()), message, recipients)
            .await
    }

    /// Submits one prepared message under a chosen id (a retry reuses the id and the bytes).
    pub async fn submit_with_id(&self, id: MessageId, message: Vec<u8>, recipients: Vec<DeviceId>) -> Result<()> {
        let request = SubmitMessage {
            id,
            message: Base64Bytes(message),
            recipients,
            welcome: None,
            removed: vec![],
        };
        let _: SubmitAccepted = self.post(endpoints::SUBMIT_MESSAGE.path_with(&[]), &request).await?;
        Ok(())
    }

    /// Opens this device's delivery WebSocket and starts a task that acknowledges everything and
    /// records when each message arrived (by fingerprint) in `arrivals`. What was queued before
    /// (commits, Welcomes) is acknowledged without being recorded.
    pub async fn listen(&self, arrivals: Arrivals) -> Result<tokio::task::JoinHandle<()>> {
        self.listen_with(arrivals, false).await
    }

    /// As [`Self::listen`]; with `record_backlog`, what was queued before is recorded too.
    pub async fn listen_with(&self, arrivals: Arrivals, record_backlog: bool) -> Result<tokio::task::JoinHandle<()>> {
        let url = format!("{}{}", self.base.replacen("http", "ws", 1), endpoints::WEBSOCKET.path);
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("authorization", self.authorization.parse()?);
        let (mut socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .context("opening the delivery WebSocket")?;
        // Wait until the queued backlog (commits, Welcomes) is through, so later arrivals are
        // the measured messages.
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text)? {
                    ServerFrame::Drained => break,
                    ServerFrame::Envelope { seq, message, .. } => {
                        if record_backlog {
                            arrivals.record(fingerprint(message.as_slice()));
                        }
                        let ack = serde_json::to_string(&ClientFrame::Ack { seqs: vec![seq] })?;
                        socket.send(Message::text(ack)).await?;
                    }
                    ServerFrame::ChannelPost { sealed_post, .. } => {
                        if record_backlog {
                            arrivals.record(fingerprint(sealed_post.as_slice()));
                        }
                    }
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the server closed the delivery connection"),
            }
        }
        Ok(tokio::spawn(async move {
            while let Some(Ok(frame)) = socket.next().await {
                let Message::Text(text) = frame else { continue };
                match serde_json::from_str::<ServerFrame>(&text) {
                    Ok(ServerFrame::Envelope { seq, message, .. }) => {
                        arrivals.record(fingerprint(message.as_slice()));
                        let ack = serde_json::to_string(&ClientFrame::Ack { seqs: vec![seq] }).expect("serialises");
                        if socket.send(Message::text(ack)).await.is_err() {
                            break;
                        }
                    }
                    // Channel posts are not acknowledged: they stay in the channel.
                    Ok(ServerFrame::ChannelPost { sealed_post, .. }) => {
                        arrivals.record(fingerprint(sealed_post.as_slice()))
                    }
                    _ => {}
                }
            }
        }))
    }
}

/// When each message arrived, shared by all listeners: the first copy's time and, for messages
/// that go to several devices, how many copies arrived and when the last did.
#[derive(Clone, Default)]
pub struct Arrivals {
    inner: Arc<Mutex<HashMap<[u8; 32], Arrival>>>,
    notify: Arc<tokio::sync::Notify>,
}

#[derive(Clone, Copy)]
struct Arrival {
    first: Instant,
    last: Instant,
    copies: usize,
}

impl Arrivals {
    fn record(&self, fingerprint: [u8; 32]) {
        let now = Instant::now();
        self.inner
            .lock()
            .expect("arrivals lock")
            .entry(fingerprint)
            .and_modify(|a| {
                a.last = now;
                a.copies += 1;
            })
            .or_insert(Arrival {
                first: now,
                last: now,
                copies: 1,
            });
        self.notify.notify_waiters();
    }

    /// How many distinct messages arrived.
    pub fn count(&self) -> usize {
        self.inner.lock().expect("arrivals lock").len()
    }

    /// How many messages arrived more than once (each recipient device gets each message once).
    pub fn duplicates(&self) -> usize {
        self.inner
            .lock()
            .expect("arrivals lock")
            .values()
            .filter(|a| a.copies > 1)
            .count()
    }

    /// When this message first arrived.
    pub fn get(&self, fingerprint: &[u8; 32]) -> Option<Instant> {
        self.inner
            .lock()
            .expect("arrivals lock")
            .get(fingerprint)
            .map(|a| a.first)
    }

    /// How many copies of this message arrived, and when the last did.
    pub fn copies(&self, fingerprint: &[u8; 32]) -> (usize, Option<Instant>) {
        match self.inner.lock().expect("arrivals lock").get(fingerprint) {
            Some(a) => (a.copies, Some(a.last)),
            None => (0, None),
        }
    }

    /// Waits until `reached()` or `deadline`.
    async fn wait_until(&self, deadline: Instant, reached: impl Fn() -> bool) {
        loop {
            let notified = self.notify.notified();
            if reached() || Instant::now() >= deadline {
                return;
            }
            let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        }
    }

    /// Waits until `count` distinct messages arrived or `deadline` passed; returns the count.
    pub async fn wait_for(&self, count: usize, deadline: Instant) -> usize {
        self.wait_until(deadline, || self.count() >= count).await;
        self.count()
    }

    /// Waits until `copies` copies of one message arrived or `deadline` passed.
    pub async fn wait_for_copies(&self, fingerprint: &[u8; 32], copies: usize, deadline: Instant) -> usize {
        self.wait_until(deadline, || self.copies(fingerprint).0 >= copies).await;
        self.copies(fingerprint).0
    }
}

async fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    authorization: Option<&str>,
    body: &B,
) -> Result<R> {
    let mut request = http.post(format!("{base}{path}")).json(body);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let response = request.send().await.with_context(|| format!("POST {path}"))?;
    let status = response.status();
    let bytes = response.bytes().await?;
    if !status.is_success() {
        bail!("POST {path}: {status}: {}", String::from_utf8_lossy(&bytes));
    }
    // 201/204 without a body decode as `null` (e.g. into `()`).
    let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
    Ok(serde_json::from_slice(body)?)
}
