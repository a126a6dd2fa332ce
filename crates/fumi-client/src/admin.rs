//! The operator's side of the admin API: requests signed with an operator key, each stating a
//! reason that the server writes into the public transparency log before acting.

use ed25519_dalek::{Signer, SigningKey};
use fumi_core::franking::{ProvenSender, Report};
use reqwest::Method;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::transport::decode;
use crate::{ClientError, now_ms, random_bytes};

/// A client of the admin API acting as one operator for one stated reason.
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
    operator: String,
    key: SigningKey,
    reason: String,
}

/// A fresh operator key: the secret (for the key file) and the public key (for the server's
/// configuration), both hex.
pub fn generate_operator_key() -> (String, String) {
    let key = SigningKey::from_bytes(&random_bytes());
    (hex::encode(key.to_bytes()), hex::encode(key.verifying_key().to_bytes()))
}

impl AdminClient {
    /// An admin client for the admin API at `server`, signing as `operator` with the secret key
    /// in hex (as `fumi admin keygen` writes it).
    pub fn new(server: &str, operator: &str, secret_hex: &str, reason: &str) -> Result<Self, ClientError> {
        let base = server.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Usage(format!(
                "the admin server must be an http:// or https:// URL, not {server:?}"
            )));
        }
        let secret: [u8; 32] = hex::decode(secret_hex.trim())
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| ClientError::Usage("the operator key file must hold 64 hex digits".into()))?;
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(600))
            .build()
            .map_err(|e| ClientError::Network(e.to_string()))?;
        Ok(Self {
            base,
            http,
            operator: operator.to_owned(),
            key: SigningKey::from_bytes(&secret),
            reason: reason.to_owned(),
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<reqwest::Response, ClientError> {
        use fumi_proto::admin_headers as h;
        let body = body
            .map(|b| serde_json::to_vec(b).expect("JSON serialises"))
            .unwrap_or_default();
        let timestamp = now_ms();
        let nonce = hex::encode(random_bytes::<16>());
        let message = fumi_proto::admin_request_message(
            method.as_str(),
            path,
            timestamp,
            &nonce,
            &self.operator,
            &self.reason,
            &Sha256::digest(&body).into(),
        );
        let signature = hex::encode(self.key.sign(&message).to_bytes());
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(h::OPERATOR, &self.operator)
            .header(h::REASON, &self.reason)
            .header(h::TIMESTAMP, timestamp.to_string())
            .header(h::NONCE, nonce)
            .header(h::SIGNATURE, signature);
        if !body.is_empty() {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        request
            .send()
            .await
            .map_err(|e| ClientError::Network(format!("cannot reach {}: {e}", self.base)))
    }

    /// A signed request with a JSON answer (`null` for none).
    pub async fn json<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<R, ClientError> {
        decode(self.send(method, path, body).await?).await
    }

    /// A signed request whose answer is a stream of JSON lines (a relocation's progress):
    /// `on_line` sees each as it arrives.
    pub async fn json_lines(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        mut on_line: impl FnMut(serde_json::Value),
    ) -> Result<(), ClientError> {
        let mut response = self.send(method, path, body).await?;
        if !response.status().is_success() {
            return decode::<()>(response).await;
        }
        let mut pending = Vec::new();
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|e| ClientError::Network(format!("the answer broke off: {e}")))?;
            let Some(chunk) = chunk else { break };
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let value = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Protocol(format!("a progress line is not JSON: {e}")))?;
                on_line(value);
            }
        }
        Ok(())
    }

    /// A signed request with a text answer.
    pub async fn text(&self, method: Method, path: &str) -> Result<String, ClientError> {
        let response = self.send(method, path, None).await?;
        if !response.status().is_success() {
            return decode::<()>(response).await.map(|()| String::new());
        }
        response.text().await.map_err(|e| ClientError::Network(e.to_string()))
    }
}

/// A fresh moderation key: the secret (for the moderators' key file) and the public key (the
/// server's `moderation_public_key`), both hex.
pub fn generate_moderation_key() -> (String, String) {
    let (secret, public) =
        fumi_core::franking::moderation_keypair(&openmls_rust_crypto::RustCrypto::default(), &mut rand::rng());
    (hex::encode(secret), hex::encode(public))
}

/// An abuse report as a moderator reviewed it.
#[derive(Debug)]
pub struct ReviewedReport {
    /// The report's number on the server.
    pub id: u64,
    /// What the reporter sent.
    pub report: Report,
    /// Whether the franking proof shows the reported sender really sent this in that
    /// conversation, and why not.
    pub verdict: Result<ProvenSender, String>,
}

impl AdminClient {
    /// Fetches report `id` (a logged access), opens it with the moderation secret key (hex) and
    /// verifies its franking proof, including that the certifying identity key is the sender
    /// account's (a second logged access, to that account's public keys).
    pub async fn review_report(&self, id: u64, moderation_secret_hex: &str) -> Result<ReviewedReport, ClientError> {
        let secret: [u8; 32] = hex::decode(moderation_secret_hex.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ClientError::Usage("the moderation key file must hold 64 hex digits".into()))?;
        let sealed: fumi_proto::ReportSubmit = self.json(Method::GET, &format!("/admin/v1/reports/{id}"), None).await?;
        let report = Report::open(
            &openmls_rust_crypto::RustCrypto::default(),
            sealed.sealed.as_slice(),
            &secret,
        )
        .map_err(|e| ClientError::Usage(e.to_string()))?;
        let verdict = match report.evidence.verify() {
            Err(e) => Err(e.to_string()),
            Ok(sender) => {
                let account: fumi_proto::AccountInfo = self
                    .json(Method::GET, &format!("/admin/v1/accounts/{}", sender.account), None)
                    .await?;
                if account.identity_key.as_slice() == sender.identity_key {
                    Ok(sender)
                } else {
                    Err(
                        "the device credential was certified by a key that is not the sender account's identity key"
                            .into(),
                    )
                }
            }
        };
        Ok(ReviewedReport { id, report, verdict })
    }
}
