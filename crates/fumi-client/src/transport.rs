//! HTTP and WebSocket transport to a Fumi server.

use std::fmt::Display;

use fumi_proto::endpoints::{self, Endpoint};
use fumi_proto::{
    AUTH_SCHEME, BlobId, BlobUploadStatus, ClientFrame, DeviceId, ErrorBody, ServerFrame, UPLOAD_OFFSET_HEADER,
};
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::ClientError;

/// Talks to one server as one device.
#[derive(Clone)]
pub struct Transport {
    base: String,
    http: reqwest::Client,
    /// For blob transfers: no limit on the whole request, only on silence.
    bulk: reqwest::Client,
    authorization: Option<String>,
}

impl Transport {
    /// A transport to `server` (e.g. `http://127.0.0.1:8080`), not yet authenticated.
    pub fn new(server: &str) -> Result<Self, ClientError> {
        let base = server.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Usage(format!(
                "server must be an http:// or https:// URL, not {server:?}"
            )));
        }
        // Idle connections are dropped before the server's idle limit (10 s by default), so a
        // request never goes out on a connection the server is closing.
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .pool_idle_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| ClientError::Network(e.to_string()))?;
        let bulk = reqwest::Client::builder()
            .pool_idle_timeout(std::time::Duration::from_secs(5))
            .connect_timeout(std::time::Duration::from_secs(15))
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Network(e.to_string()))?;
        Ok(Self {
            base,
            http,
            bulk,
            authorization: None,
        })
    }

    /// Authenticates every later request as `device`.
    pub fn authenticate(&mut self, device: DeviceId, secret: &[u8; 32]) {
        self.authorization = Some(format!("{AUTH_SCHEME} {device}:{}", hex::encode(secret)));
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Appends `chunk` to an upload at `offset`; returns the server's upload state.
    pub async fn upload_chunk(
        &self,
        blob: BlobId,
        offset: u64,
        chunk: bytes::Bytes,
    ) -> Result<BlobUploadStatus, ClientError> {
        let request = self
            .bulk
            .patch(format!("{}{}", self.base, endpoints::UPLOAD_BLOB.path_with(&[&blob])))
            .header(UPLOAD_OFFSET_HEADER, offset.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(chunk);
        let response = self.authorized(request).send().await.map_err(|e| self.network(e))?;
        decode(response).await
    }

    /// Starts downloading a blob from `offset`; the caller reads the body chunk by chunk.
    pub async fn download(&self, blob: BlobId, offset: u64) -> Result<reqwest::Response, ClientError> {
        let mut request = self
            .bulk
            .get(format!("{}{}", self.base, endpoints::DOWNLOAD_BLOB.path_with(&[&blob])));
        if offset > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let response = self.authorized(request).send().await.map_err(|e| self.network(e))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(decode::<()>(response)
                .await
                .err()
                .unwrap_or_else(|| ClientError::Protocol("download refused".into())))
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.authorization {
            Some(authorization) => request.header(reqwest::header::AUTHORIZATION, authorization),
            None => request,
        }
    }

    fn network(&self, e: reqwest::Error) -> ClientError {
        ClientError::Network(format!("cannot reach {}: {e}", self.base))
    }

    /// Calls `endpoint` (its path parameters filled from `args`, in order) with an optional JSON
    /// body and decodes a JSON answer (or none for 204).
    pub async fn request<B: Serialize, R: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        args: &[&(dyn Display + Sync)],
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        self.request_query(endpoint, args, &[], body).await
    }

    /// As [`Self::request`], with a query string built from `query`.
    pub async fn request_query<B: Serialize, R: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        args: &[&(dyn Display + Sync)],
        query: &[(&str, &(dyn Display + Sync))],
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let mut url = format!(
            "{}{}",
            self.base,
            endpoint.path_with(&args.iter().map(|a| *a as &dyn Display).collect::<Vec<_>>())
        );
        for (i, (name, value)) in query.iter().enumerate() {
            let separator = if i == 0 { '?' } else { '&' };
            url.push_str(&format!("{separator}{name}={value}"));
        }
        let method = Method::from_bytes(endpoint.method.as_bytes()).expect("descriptors name valid methods");
        let mut request = self.http.request(method, url);
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.network(e))?;
        decode(response).await
    }

    /// Opens the delivery WebSocket.
    pub async fn connect(&self) -> Result<Delivery, ClientError> {
        let url = format!("{}{}", self.base.replacen("http", "ws", 1), endpoints::WEBSOCKET.path);
        let mut request = url
            .into_client_request()
            .map_err(|e| ClientError::Network(e.to_string()))?;
        if let Some(authorization) = &self.authorization {
            request.headers_mut().insert(
                "authorization",
                authorization
                    .parse()
                    .map_err(|_| ClientError::Protocol("bad credential".into()))?,
            );
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await.map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                // The server's error body, as for any request: its code and message.
                let body = response.body().as_deref().unwrap_or_default();
                let error: Option<serde_json::Value> = serde_json::from_slice(body).ok();
                let field = |name: &str| {
                    error
                        .as_ref()
                        .and_then(|e| e.get(name).or_else(|| e.get("error").and_then(|inner| inner.get(name))))
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                };
                ClientError::Server {
                    status: response.status().as_u16(),
                    code: field("code").unwrap_or_else(|| "websocket_refused".into()),
                    message: field("message").unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
                    current_epoch: None,
                }
            }
            other => ClientError::Network(format!("cannot reach {} (delivery connection): {other}", self.base)),
        })?;
        Ok(Delivery { socket })
    }
}

/// Decodes a JSON answer (or none for 204), or the server's error.
pub(crate) async fn decode<R: DeserializeOwned>(response: reqwest::Response) -> Result<R, ClientError> {
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| ClientError::Network(e.to_string()))?;
    if !status.is_success() {
        return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => ClientError::Server {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
                current_epoch: body.error.current_epoch,
            },
            Err(_) => ClientError::Server {
                status: status.as_u16(),
                code: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                current_epoch: None,
            },
        });
    }
    let bytes = if status == StatusCode::NO_CONTENT || bytes.is_empty() {
        &b"null"[..]
    } else {
        &bytes[..]
    };
    serde_json::from_slice(bytes).map_err(|e| ClientError::Protocol(format!("unexpected answer from server: {e}")))
}

/// An open delivery WebSocket.
pub struct Delivery {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Delivery {
    /// The next frame from the server; `None` when the server closed the connection.
    pub async fn next(&mut self) -> Result<Option<ServerFrame>, ClientError> {
        loop {
            match self.socket.next().await {
                None => return Ok(None),
                Some(Ok(Message::Close(frame))) => {
                    if let Some(frame) = frame.filter(|f| !f.reason.is_empty()) {
                        tracing::warn!(reason = %frame.reason, "the server closed the delivery connection");
                    }
                    return Ok(None);
                }
                Some(Err(e)) => return Err(ClientError::Network(e.to_string())),
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text)
                        .map(Some)
                        .map_err(|e| ClientError::Protocol(format!("malformed frame from server: {e}")));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Acknowledges processed envelopes. An acknowledgement that cannot be sent (the connection
    /// just closed) is not an error: the envelopes are stored, and their redelivery is recognised.
    pub async fn ack(&mut self, seqs: Vec<u64>) -> Result<(), ClientError> {
        let text = serde_json::to_string(&ClientFrame::Ack { seqs }).expect("frame serialises");
        if let Err(e) = self.socket.send(Message::Text(text.into())).await {
            tracing::debug!(error = %e, "acknowledgement not sent; the envelopes will be redelivered and skipped");
        }
        Ok(())
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}
