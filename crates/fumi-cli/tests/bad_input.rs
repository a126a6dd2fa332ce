//! Bad input gets its documented 4xx, never a 5xx or a panic, and leaves stored state unchanged.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{Server, User, account_of, credentials, hex_encode, snapshot};
use fumi_core::AccountIdentity;
use fumi_core::mls::MlsDevice;
use fumi_proto::{AccountId, DeviceId, GroupId};
use futures_util::{SinkExt, StreamExt};
use openmls_rust_crypto::OpenMlsRustCrypto;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use sha2::Digest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Api {
    http: Client,
    url: String,
}

impl Api {
    /// `POST /v1/messages` as `auth`.
    async fn submit(&self, auth: &str, id: [u8; 16], message: &[u8], recipients: &[DeviceId]) -> (StatusCode, Value) {
        let body = submit_body(id, message, recipients);
        self.call(Method::POST, "/v1/messages", Some(auth), Some(body)).await
    }

    async fn call(&self, method: Method, path: &str, auth: Option<&str>, body: Option<Vec<u8>>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// An MLS device outside the server, to forge well-formed MLS messages.
fn outside_device(account: u8) -> MlsDevice<OpenMlsRustCrypto> {
    let provider = OpenMlsRustCrypto::default();
    let key = MlsDevice::generate_signature_key(&provider).unwrap();
    let identity = AccountIdentity::generate(&mut rand::rng());
    let (account, device) = (
        AccountId::from_bytes([account; 16]),
        DeviceId::from_bytes([account; 16]),
    );
    MlsDevice::open(provider, &identity, account, device, &key).unwrap()
}

/// Announces a 3 MiB body and reads the answer without sending it (a client that did send it
/// would see the connection closed under it once the server answered).
async fn oversized_request(url: &str, auth: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: {address}\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        3 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

fn submit_body(id: [u8; 16], message: &[u8], recipients: &[DeviceId]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": hex_encode(&id),
        "message": STANDARD.encode(message),
        "recipients": recipients.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
    }))
    .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn bad_requests_get_4xx_and_change_nothing() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let mallory = User::register(&server, "mallory", "Mallory");
    alice.ok(&["send", &bob.username, "a real message stays queued"]);
    let (_alice_device, alice_auth) = credentials(&alice);
    let (bob_device, bob_auth) = credentials(&bob);
    let api = Api {
        http: Client::new(),
        url: server.url.clone(),
    };

    // A well-formed commit for a new group (epoch 0), made outside the server.
    let creator = outside_device(7);
    let joiner = outside_device(8);
    let group = GroupId::from_bytes([9; 16]);
    creator.create_group(group).unwrap();
    let kps = joiner.key_packages(2, false).unwrap().one_time;
    let kp = creator
        .verify_key_package(&kps[0], joiner.me().account, joiner.me().device)
        .unwrap()
        .0;
    let commit = creator.add_members(group, &[kp]).unwrap();
    let application_for_unknown_group = {
        let other = GroupId::from_bytes([10; 16]);
        creator.create_group(other).unwrap();
        creator.encrypt(other, b"hello").unwrap().message
    };

    let unknown_device = DeviceId::from_bytes([0xee; 16]);
    let many: Vec<DeviceId> = (0..1001u32)
        .map(|i| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&i.to_be_bytes());
            DeviceId::from_bytes(b)
        })
        .collect();
    let wrong_secret = format!("Fumi {bob_device}:{}", "00".repeat(32));

    type Case<'a> = (&'a str, Method, String, Option<&'a str>, Option<Vec<u8>>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            Method::POST,
            "/v1/accounts".into(),
            None,
            Some(b"{not json".to_vec()),
            400,
            "bad_request",
        ),
        (
            "wrong field types",
            Method::POST,
            "/v1/accounts".into(),
            None,
            Some(br#"{"identity_key":5}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            "unknown field",
            Method::POST,
            "/v1/accounts".into(),
            None,
            Some(br#"{"identity_key":"AAAA","device_secret_hash":"AAAA","phone":"+81"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            "short keys",
            Method::POST,
            "/v1/accounts".into(),
            None,
            Some(br#"{"identity_key":"AAAA","device_secret_hash":"AAAA"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            "missing credentials",
            Method::POST,
            "/v1/messages".into(),
            None,
            Some(submit_body([1; 16], &commit.message, &[bob_device])),
            401,
            "unauthenticated",
        ),
        (
            "wrong secret",
            Method::POST,
            "/v1/messages".into(),
            Some(&wrong_secret),
            Some(submit_body([1; 16], &commit.message, &[bob_device])),
            401,
            "unauthenticated",
        ),
        (
            "malformed credentials",
            Method::GET,
            "/v1/keypackages/count".into(),
            Some("Bearer abc"),
            None,
            401,
            "unauthenticated",
        ),
        (
            "garbage MLS",
            Method::POST,
            "/v1/messages".into(),
            Some(&alice_auth),
            Some(submit_body([2; 16], b"garbage", &[bob_device])),
            400,
            "bad_request",
        ),
        (
            "key package as message",
            Method::POST,
            "/v1/messages".into(),
            Some(&alice_auth),
            Some(submit_body([2; 16], &kps[1], &[bob_device])),
            400,
            "bad_request",
        ),
        (
            "unknown group",
            Method::POST,
            "/v1/messages".into(),
            Some(&alice_auth),
            Some(submit_body([3; 16], &application_for_unknown_group, &[bob_device])),
            404,
            "unknown_group",
        ),
        (
            "unknown recipient",
            Method::POST,
            "/v1/messages".into(),
            Some(&alice_auth),
            Some(submit_body([4; 16], &commit.message, &[unknown_device])),
            404,
            "unknown_device",
        ),
        (
            "too many recipients",
            Method::POST,
            "/v1/messages".into(),
            Some(&alice_auth),
            Some(submit_body([5; 16], &commit.message, &many)),
            422,
            "too_many_recipients",
        ),
        (
            "recipient twice",
            Method::POST,
            "/v1/messages".into(),
            Some(&alice_auth),
            Some(submit_body([5; 16], &commit.message, &[bob_device, bob_device])),
            400,
            "bad_request",
        ),
        (
            "bad id in path",
            Method::GET,
            "/v1/accounts/not-hex".into(),
            Some(&alice_auth),
            None,
            400,
            "bad_request",
        ),
        (
            "bad hash in path",
            Method::GET,
            "/v1/usernames/zz".into(),
            Some(&alice_auth),
            None,
            400,
            "bad_request",
        ),
        (
            "bad account id in a key lookup",
            Method::GET,
            "/v1/keys/lookup/account/zz".into(),
            Some(&alice_auth),
            None,
            400,
            "bad_request",
        ),
        (
            "short username hash in a key lookup",
            Method::GET,
            "/v1/keys/lookup/username/abcd".into(),
            Some(&alice_auth),
            None,
            400,
            "bad_request",
        ),
        (
            "an account the key directory does not have",
            Method::GET,
            format!("/v1/keys/lookup/account/{}", "ee".repeat(16)),
            Some(&alice_auth),
            None,
            404,
            "not_in_key_directory",
        ),
        (
            "bad account id in a key history",
            Method::GET,
            "/v1/keys/history/account/zz".into(),
            Some(&alice_auth),
            None,
            400,
            "bad_request",
        ),
        (
            "the history of an account the key directory does not have",
            Method::GET,
            format!("/v1/keys/history/account/{}", "ee".repeat(16)),
            Some(&alice_auth),
            None,
            404,
            "not_in_key_directory",
        ),
        (
            "key directory audit range backwards",
            Method::GET,
            "/v1/keys/audit?from=3&to=1".into(),
            None,
            None,
            400,
            "bad_request",
        ),
        (
            "key directory audit range over 100 epochs",
            Method::GET,
            "/v1/keys/audit?from=0&to=500".into(),
            None,
            None,
            400,
            "bad_request",
        ),
        (
            "key directory audit beyond the newest epoch",
            Method::GET,
            "/v1/keys/audit?from=0&to=99".into(),
            None,
            None,
            404,
            "unknown_epoch",
        ),
        (
            "unknown account",
            Method::POST,
            "/v1/keypackages/claim".into(),
            Some(&alice_auth),
            Some(format!(r#"{{"accounts":["{}"]}}"#, "ab".repeat(16)).into_bytes()),
            404,
            "unknown_account",
        ),
        (
            "garbage key package",
            Method::POST,
            "/v1/keypackages".into(),
            Some(&alice_auth),
            Some(br#"{"key_packages":["AAAA"]}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            "unknown route",
            Method::GET,
            "/v1/nothing".into(),
            None,
            None,
            404,
            "not_found",
        ),
        (
            "wrong method",
            Method::DELETE,
            "/v1/messages".into(),
            Some(&alice_auth),
            None,
            405,
            "method_not_allowed",
        ),
    ];
    for (name, method, path, auth, body, status, code) in cases {
        let before = snapshot(&server);
        let (got, answer) = api.call(method, &path, auth, body).await;
        assert_eq!(got.as_u16(), status, "{name}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{name}: {answer}");
        assert!(
            answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {answer}"
        );
        assert_eq!(snapshot(&server), before, "{name} changed stored state");
    }

    // An oversized body is refused from its Content-Length, before the server reads it.
    let before = snapshot(&server);
    let answer = oversized_request(&server.url, &alice_auth).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too_large"), "{answer}");
    assert_eq!(snapshot(&server), before);

    // Replays: the same id and body is accepted once; the same id with another body is refused.
    let (status, answer) = api.submit(&alice_auth, [6; 16], &commit.message, &[bob_device]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["duplicate"], false);
    let accepted = snapshot(&server);
    let (status, answer) = api.submit(&alice_auth, [6; 16], &commit.message, &[bob_device]).await;
    assert_eq!(
        (status, &answer["duplicate"]),
        (StatusCode::OK, &Value::Bool(true)),
        "{answer}"
    );
    assert_eq!(snapshot(&server), accepted, "a retry stored nothing");
    let (status, answer) = api
        .submit(&alice_auth, [6; 16], &application_for_unknown_group, &[bob_device])
        .await;
    assert_eq!(
        (status.as_u16(), answer["error"]["code"].as_str()),
        (409, Some("message_id_reused")),
        "{answer}"
    );
    assert_eq!(snapshot(&server), accepted);

    // A second commit for the same epoch loses, and the answer says which epoch is current.
    creator.discard_commit(group).unwrap();
    let kp2 = creator
        .verify_key_package(&kps[1], joiner.me().account, joiner.me().device)
        .unwrap()
        .0;
    let second = creator.add_members(group, &[kp2]).unwrap();
    let (status, answer) = api.submit(&alice_auth, [7; 16], &second.message, &[bob_device]).await;
    assert_eq!(
        (status.as_u16(), answer["error"]["code"].as_str()),
        (409, Some("epoch_conflict")),
        "{answer}"
    );
    assert_eq!(answer["error"]["current_epoch"], 1);
    assert_eq!(snapshot(&server), accepted);

    // A device outside the group's roster cannot submit to it, not even a well-formed commit.
    let (_, mallory_auth) = credentials(&mallory);
    let (status, answer) = api.submit(&mallory_auth, [8; 16], &second.message, &[bob_device]).await;
    assert_eq!(
        (status.as_u16(), answer["error"]["code"].as_str()),
        (403, Some("not_a_member")),
        "{answer}"
    );
    assert_eq!(snapshot(&server), accepted);

    // WebSocket: no credentials, a garbage frame, an oversized frame.
    let ws_url = format!("{}/v1/ws", server.url.replacen("http", "ws", 1));
    match tokio_tungstenite::connect_async(ws_url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("unauthenticated websocket: {other:?}"),
    }
    for (frame, expected_close) in [
        (Message::Text("not json".into()), 1007u16),
        (Message::Text(r#"{"type":"ack","seqs":"x"}"#.into()), 1007),
        (Message::Binary(vec![1, 2, 3].into()), 1003),
        (Message::Text("x".repeat(100 * 1024).into()), 0),
    ] {
        let mut request = ws_url.as_str().into_client_request().unwrap();
        request.headers_mut().insert("authorization", bob_auth.parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        socket.send(frame).await.ok();
        let mut close_code = None;
        while let Some(message) = socket.next().await {
            match message {
                Ok(Message::Close(frame)) => {
                    close_code = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        if expected_close != 0 {
            assert_eq!(close_code, Some(expected_close));
        }
        assert_eq!(snapshot(&server), accepted, "a bad frame acknowledged nothing");
    }

    // Bob's mailbox now holds a commit for a group he is not in: his client drops it with a
    // warning, acknowledges it, and keeps working.
    let output = bob.run(&["receive"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("dropped a message"));
    alice.ok(&["send", &bob.username, "after the garbage"]);
    assert_eq!(bob.receive_texts(), vec!["after the garbage"]);

    let metrics = server.metrics();
    assert!(
        metrics.contains("fumi_http_responses_server_error_total 0"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "current_thread")]
async fn blob_link_invite_and_avatar_requests_are_checked_and_change_nothing() {
    let server = Server::start_with_env(&[("FUMI_MAX_BLOB_BYTES", "1000000"), ("FUMI_BLOB_QUOTA_BYTES", "1000500")]);
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let mallory = User::register(&server, "mallory", "Mallory");
    let (alice_device, alice_auth) = credentials(&alice);
    let (bob_device, bob_auth) = credentials(&bob);
    let (_, mallory_auth) = credentials(&mallory);
    let api = Api {
        http: Client::new(),
        url: server.url.clone(),
    };
    let body = |value: Value| Some(serde_json::to_vec(&value).unwrap());

    // State the cases below work against: an upload in progress (Alice to Bob), a used invite,
    // and an open device link.
    let (status, created) = api
        .call(
            Method::POST,
            "/v1/blobs",
            Some(&alice_auth),
            body(json!({"size": 1000, "recipients": [bob_device.to_string()]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let blob = created["blob_id"].as_str().unwrap().to_owned();
    let token = [7u8; 32];
    let token_hash = sha2::Sha256::digest(token);
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/invites",
            Some(&alice_auth),
            body(json!({"token_hash": STANDARD.encode(token_hash)})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let redeem = json!({"account_id": account_of(&alice), "token": STANDARD.encode(token)});
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/invites/redeem",
            Some(&bob_auth),
            body(redeem.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let link_token = [9u8; 32];
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/links",
            Some(&alice_auth),
            body(json!({"token_hash": STANDARD.encode(sha2::Sha256::digest(link_token)), "sealed": STANDARD.encode([1u8; 64])})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let key_package = outside_device(5).key_packages(1, false).unwrap().one_time.remove(0);

    let before = snapshot(&server);
    let files_before = server.blob_files();
    let blob_path = format!("/v1/blobs/{blob}");
    let recipients = json!([bob_device.to_string()]);
    let cases: Vec<Case> = vec![
        (
            "empty blob",
            Method::POST,
            "/v1/blobs".into(),
            Some(&alice_auth),
            body(json!({"size": 0, "recipients": recipients})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "over the size limit",
            Method::POST,
            "/v1/blobs".into(),
            Some(&alice_auth),
            body(json!({"size": 1_000_001, "recipients": recipients})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            "over the quota",
            Method::POST,
            "/v1/blobs".into(),
            Some(&alice_auth),
            body(json!({"size": 1_000_000, "recipients": recipients})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "quota_exceeded",
        ),
        (
            "no recipients",
            Method::POST,
            "/v1/blobs".into(),
            Some(&alice_auth),
            body(json!({"size": 10, "recipients": []})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "self as recipient",
            Method::POST,
            "/v1/blobs".into(),
            Some(&alice_auth),
            body(json!({"size": 10, "recipients": [alice_device.to_string()]})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "unknown recipient",
            Method::POST,
            "/v1/blobs".into(),
            Some(&alice_auth),
            body(json!({"size": 10, "recipients": ["00".repeat(16)]})),
            StatusCode::NOT_FOUND,
            "unknown_device",
        ),
        (
            "another account's upload",
            Method::GET,
            format!("{blob_path}/upload"),
            Some(&mallory_auth),
            None,
            StatusCode::FORBIDDEN,
            "not_the_uploader",
        ),
        (
            "download before complete",
            Method::GET,
            blob_path.clone(),
            Some(&bob_auth),
            None,
            StatusCode::CONFLICT,
            "upload_incomplete",
        ),
        (
            "download by a stranger",
            Method::GET,
            blob_path.clone(),
            Some(&mallory_auth),
            None,
            StatusCode::FORBIDDEN,
            "not_a_recipient",
        ),
        (
            "malformed blob id",
            Method::GET,
            "/v1/blobs/xyz".into(),
            Some(&bob_auth),
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "unknown blob",
            Method::GET,
            format!("/v1/blobs/{}", "ab".repeat(16)),
            Some(&bob_auth),
            None,
            StatusCode::NOT_FOUND,
            "unknown_blob",
        ),
        (
            "ack before the upload is complete",
            Method::POST,
            format!("{blob_path}/ack"),
            Some(&bob_auth),
            None,
            StatusCode::CONFLICT,
            "upload_incomplete",
        ),
        (
            "ack by a stranger",
            Method::POST,
            format!("{blob_path}/ack"),
            Some(&mallory_auth),
            None,
            StatusCode::FORBIDDEN,
            "not_a_recipient",
        ),
        (
            "reused invite",
            Method::POST,
            "/v1/invites/redeem".into(),
            Some(&mallory_auth),
            body(redeem.clone()),
            StatusCode::GONE,
            "invite_used",
        ),
        (
            "unknown invite",
            Method::POST,
            "/v1/invites/redeem".into(),
            Some(&mallory_auth),
            body(json!({"account_id": account_of(&alice), "token": STANDARD.encode([8u8; 32])})),
            StatusCode::NOT_FOUND,
            "unknown_invite",
        ),
        (
            "short link token",
            Method::POST,
            "/v1/links/open".into(),
            None,
            body(json!({"token": STANDARD.encode([1u8; 5])})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "unknown link",
            Method::POST,
            "/v1/links/open".into(),
            None,
            body(json!({"token": STANDARD.encode([2u8; 32])})),
            StatusCode::NOT_FOUND,
            "unknown_link",
        ),
        (
            "device not signed by the account",
            Method::POST,
            "/v1/devices".into(),
            None,
            body(json!({
            "token": STANDARD.encode(link_token), "device_id": "cd".repeat(16), "device_secret_hash": STANDARD.encode([3u8; 32]),
            "signature": STANDARD.encode([4u8; 64]), "key_packages": [STANDARD.encode(&key_package)], "last_resort": null})),
            StatusCode::FORBIDDEN,
            "bad_signature",
        ),
        (
            "removing the calling device",
            Method::DELETE,
            format!("/v1/devices/{alice_device}"),
            Some(&alice_auth),
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "removing another account's device",
            Method::DELETE,
            format!("/v1/devices/{bob_device}"),
            Some(&alice_auth),
            None,
            StatusCode::NOT_FOUND,
            "unknown_device",
        ),
        (
            "oversized avatar",
            Method::PUT,
            "/v1/profile/avatar".into(),
            Some(&alice_auth),
            body(json!({"sealed": STANDARD.encode(vec![0u8; 400 * 1024])})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
    ];
    for (name, method, path, auth, request, status, code) in cases {
        let (got, answer) = api.call(method, &path, auth, request).await;
        assert_eq!(got, status, "{name}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{name}: {answer}");
        assert!(
            answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert_eq!(snapshot(&server), before, "{name} changed stored state");
    }

    // Uploads: the offset must be where the server is, the body must fit, only the uploader writes.
    for (name, auth, offset, bytes, status, code) in [
        (
            "wrong offset",
            &alice_auth,
            Some("500"),
            10,
            StatusCode::CONFLICT,
            "upload_offset_mismatch",
        ),
        (
            "no offset",
            &alice_auth,
            None,
            10,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "longer than announced",
            &alice_auth,
            Some("0"),
            1001,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            "not the uploader",
            &mallory_auth,
            Some("0"),
            10,
            StatusCode::FORBIDDEN,
            "not_the_uploader",
        ),
        (
            "a recipient is not the uploader",
            &bob_auth,
            Some("0"),
            10,
            StatusCode::FORBIDDEN,
            "not_the_uploader",
        ),
    ] {
        // A fresh connection each time: the server may answer before reading a refused body
        // and then close the connection, which a pooled client would reuse.
        let fresh = Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let mut request = fresh
            .patch(format!("{}{blob_path}", api.url))
            .header("authorization", auth.as_str())
            .body(vec![5u8; bytes]);
        if let Some(offset) = offset {
            request = request.header("fumi-upload-offset", offset);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{name}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], code, "{name}: {answer}");
        if code == "upload_offset_mismatch" {
            assert_eq!(answer["error"]["upload_offset"], 0, "{answer}");
        }
        assert_eq!(server.blob_files(), files_before, "{name} stored bytes");
        assert_eq!(snapshot(&server), before, "{name} changed stored state");
    }
    let metrics = server.metrics();
    assert!(
        metrics.contains("fumi_http_responses_server_error_total 0"),
        "{metrics}"
    );
}

/// (what, method, path, credentials, body, expected status, expected error code)
type Case<'a> = (
    &'a str,
    Method,
    String,
    Option<&'a str>,
    Option<Vec<u8>>,
    StatusCode,
    &'a str,
);
