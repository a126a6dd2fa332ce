//! The authorisation matrix, walked from the router itself: every endpoint that needs device
//! credentials is called with none, malformed ones, a wrong secret, a removed device's and a
//! suspended account's, and, where it names a resource, as another account and as another
//! device of the owner. Each must be refused with its 401/403/404 and leave the database and
//! the blob store unchanged. An endpoint missing from the matrix fails the test.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{Server, User, account_of, credentials, fumi_ok, hex_encode, snapshot};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use sha2::Digest;

/// Who makes a cross-account or cross-device request, and what it must get.
struct Cross {
    who: &'static str,
    auth: String,
    status: StatusCode,
    code: &'static str,
}

enum Entry {
    /// No device credentials by design; the reason is the documentation.
    Public(&'static str),
    /// Needs device credentials.
    Device {
        path: String,
        body: Option<Value>,
        cross: Vec<Cross>,
    },
}

fn user_in(home: tempfile::TempDir) -> User {
    User {
        home,
        username: String::new(),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_endpoint_refuses_the_wrong_caller_and_changes_nothing() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    let alice_home = alice.home.path().to_str().unwrap().to_owned();
    let laptop = tempfile::tempdir().unwrap();
    fumi_ok(laptop.path(), &["device", "link", "--from", &alice_home]);
    let laptop = user_in(laptop);
    let tablet = tempfile::tempdir().unwrap();
    fumi_ok(tablet.path(), &["device", "link", "--from", &alice_home]);
    let tablet = user_in(tablet);
    let (tablet_device, tablet_auth) = credentials(&tablet);
    alice.ok(&["device", "remove", &tablet_device.to_string()]);

    let (alice_device, alice_auth) = credentials(&alice);
    let (laptop_device, laptop_auth) = credentials(&laptop);
    let (bob_device, bob_auth) = credentials(&bob);
    let (_, carol_auth) = credentials(&carol);
    let alice_account = account_of(&alice);
    let http = Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let call = |method: Method, path: String, auth: Option<String>, body: Option<Value>| {
        let http = http.clone();
        let url = format!("{}{path}", server.url);
        async move {
            let mut request = http
                .request(method, url)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            if let Some(body) = body {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            let status = response.status();
            let text = response.text().await.unwrap();
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };

    // Resources of Alice's account: an upload in progress from her phone to Bob, a link slot.
    let (status, created) = call(
        Method::POST,
        "/v1/blobs".into(),
        Some(alice_auth.clone()),
        Some(json!({"size": 100, "recipients": [bob_device.to_string()]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let blob = created["blob_id"].as_str().unwrap().to_owned();
    let link_token = [5u8; 32];
    let link_hash = hex_encode(&sha2::Sha256::digest(link_token));
    let (status, _) = call(
        Method::POST,
        "/v1/links".into(),
        Some(alice_auth.clone()),
        Some(json!({"token_hash": STANDARD.encode(sha2::Sha256::digest(link_token)), "sealed": STANDARD.encode([1u8; 64])})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    // A channel of Alice's account.
    let channel = "22".repeat(16);
    let (status, answer) = call(
        Method::POST,
        "/v1/channels".into(),
        Some(alice_auth.clone()),
        Some(json!({"channel_id": channel, "sealed_info": STANDARD.encode([3u8; 64])})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    // Carol's account is suspended (the test sets the flag; the admin API is tested elsewhere).
    server.execute(
        "UPDATE accounts SET suspended = TRUE WHERE id = {0}",
        &[&common::hex_decode(&account_of(&carol))],
    );

    let as_bob = |status, code| Cross {
        who: "another account",
        auth: bob_auth.clone(),
        status,
        code,
    };
    let as_laptop = |status, code| Cross {
        who: "another device of the owner",
        auth: laptop_auth.clone(),
        status,
        code,
    };
    let device = |path: String, body: Option<Value>, cross: Vec<Cross>| Entry::Device { path, body, cross };
    let matrix = |method: &str, path: &str| -> Option<Entry> {
        Some(match (method, path) {
            ("GET", "/health") | ("GET", "/metrics") => Entry::Public("liveness and counters, no per-user data"),
            ("POST", "/v1/accounts") => Entry::Public("registration, limited per address"),
            ("GET", "/v1/audit/head")
            | ("GET", "/v1/audit/entries")
            | ("GET", "/v1/audit/proof/inclusion")
            | ("GET", "/v1/audit/proof/consistency") => {
                Entry::Public("the transparency log is public by design; it names no account")
            }
            ("GET", "/v1/keys/head") | ("GET", "/v1/keys/heads") | ("GET", "/v1/keys/audit") => Entry::Public(
                "the key directory's signed heads and append-only proofs are public for auditors; they name no account",
            ),
            ("GET", "/v1/keys/lookup/account/{account}") => {
                device(format!("/v1/keys/lookup/account/{alice_account}"), None, vec![])
            }
            ("GET", "/v1/keys/lookup/username/{hash}") => {
                device(format!("/v1/keys/lookup/username/{}", "ab".repeat(32)), None, vec![])
            }
            // Names no account: the caller's own entry is the only one it can read.
            ("GET", "/v1/keys/history") => device("/v1/keys/history".into(), None, vec![]),
            ("GET", "/v1/keys/history/account/{account}") => {
                device(format!("/v1/keys/history/account/{alice_account}"), None, vec![])
            }
            ("GET", "/v1/audit/key") => device("/v1/audit/key".into(), None, vec![]),
            ("GET", "/v1/moderation/key") => device("/v1/moderation/key".into(), None, vec![]),
            ("POST", "/v1/reports") => device(
                "/v1/reports".into(),
                Some(json!({"sealed": STANDARD.encode([7u8; 64])})),
                vec![],
            ),
            ("POST", "/v1/links/open") => Entry::Public("a new device holds only the link token"),
            ("POST", "/v1/devices") => Entry::Public("a new device proves the account's identity-key signature"),
            ("GET", "/v1/accounts/{account}") => device(format!("/v1/accounts/{alice_account}"), None, vec![]),
            ("GET", "/v1/accounts/{account}/profile") => {
                device(format!("/v1/accounts/{alice_account}/profile"), None, vec![])
            }
            ("GET", "/v1/accounts/{account}/avatar") => {
                device(format!("/v1/accounts/{alice_account}/avatar"), None, vec![])
            }
            ("PUT", "/v1/profile") => device(
                "/v1/profile".into(),
                Some(json!({"sealed": STANDARD.encode([0u8; 64])})),
                vec![],
            ),
            ("PUT", "/v1/profile/avatar") => device(
                "/v1/profile/avatar".into(),
                Some(json!({"sealed": STANDARD.encode([0u8; 64])})),
                vec![],
            ),
            ("PUT", "/v1/username") => device(
                "/v1/username".into(),
                Some(json!({"username_hash": STANDARD.encode([9u8; 32])})),
                vec![],
            ),
            ("GET", "/v1/usernames/{hash}") => device(format!("/v1/usernames/{}", "ab".repeat(32)), None, vec![]),
            ("POST", "/v1/keypackages") => device("/v1/keypackages".into(), Some(json!({"key_packages": []})), vec![]),
            ("GET", "/v1/keypackages/count") => device("/v1/keypackages/count".into(), None, vec![]),
            ("POST", "/v1/keypackages/claim") => device(
                "/v1/keypackages/claim".into(),
                Some(json!({"accounts": [alice_account]})),
                vec![],
            ),
            ("POST", "/v1/messages") => device(
                "/v1/messages".into(),
                Some(json!({"id": "11".repeat(16), "message": STANDARD.encode([0u8; 8]), "recipients": []})),
                vec![],
            ),
            ("GET", "/v1/ws") => device("/v1/ws".into(), None, vec![]),
            ("POST", "/v1/links") => device(
                "/v1/links".into(),
                Some(json!({"token_hash": STANDARD.encode([6u8; 32]), "sealed": STANDARD.encode([1u8; 64])})),
                vec![],
            ),
            ("GET", "/v1/links/{token_hash}") => device(
                format!("/v1/links/{link_hash}"),
                None,
                vec![as_bob(StatusCode::NOT_FOUND, "unknown_link")],
            ),
            ("PUT", "/v1/links/{token_hash}/history") => device(
                format!("/v1/links/{link_hash}/history"),
                Some(json!({"sealed": STANDARD.encode([2u8; 64])})),
                vec![
                    as_bob(StatusCode::NOT_FOUND, "unknown_link"),
                    as_laptop(StatusCode::NOT_FOUND, "unknown_link"),
                ],
            ),
            ("POST", "/v1/links/history") => device(
                "/v1/links/history".into(),
                Some(json!({"token": STANDARD.encode(link_token)})),
                vec![
                    as_bob(StatusCode::NOT_FOUND, "unknown_link"),
                    as_laptop(StatusCode::NOT_FOUND, "unknown_link"),
                ],
            ),
            ("DELETE", "/v1/devices/{device}") => device(
                format!("/v1/devices/{laptop_device}"),
                None,
                vec![as_bob(StatusCode::NOT_FOUND, "unknown_device")],
            ),
            ("POST", "/v1/invites") => device(
                "/v1/invites".into(),
                Some(json!({"token_hash": STANDARD.encode([7u8; 32])})),
                vec![],
            ),
            ("POST", "/v1/invites/redeem") => device(
                "/v1/invites/redeem".into(),
                Some(json!({"account_id": alice_account, "token": STANDARD.encode([8u8; 32])})),
                vec![],
            ),
            ("POST", "/v1/blobs") => device(
                "/v1/blobs".into(),
                Some(json!({"size": 10, "recipients": [bob_device.to_string()]})),
                vec![],
            ),
            ("PATCH", "/v1/blobs/{blob}") => device(
                format!("/v1/blobs/{blob}"),
                None,
                vec![
                    as_bob(StatusCode::FORBIDDEN, "not_the_uploader"),
                    as_laptop(StatusCode::FORBIDDEN, "not_the_uploader"),
                ],
            ),
            ("GET", "/v1/blobs/{blob}/upload") => device(
                format!("/v1/blobs/{blob}/upload"),
                None,
                vec![
                    as_bob(StatusCode::FORBIDDEN, "not_the_uploader"),
                    as_laptop(StatusCode::FORBIDDEN, "not_the_uploader"),
                ],
            ),
            ("GET", "/v1/blobs/{blob}") => device(
                format!("/v1/blobs/{blob}"),
                None,
                vec![as_laptop(StatusCode::FORBIDDEN, "not_a_recipient")],
            ),
            ("POST", "/v1/blobs/{blob}/ack") => device(
                format!("/v1/blobs/{blob}/ack"),
                None,
                vec![as_laptop(StatusCode::FORBIDDEN, "not_a_recipient")],
            ),
            ("POST", "/v1/channels") => device(
                "/v1/channels".into(),
                Some(json!({"channel_id": "33".repeat(16), "sealed_info": STANDARD.encode([3u8; 64])})),
                vec![],
            ),
            ("GET", "/v1/channels/{channel}") => device(format!("/v1/channels/{channel}"), None, vec![]),
            ("PUT", "/v1/channels/{channel}") => device(
                format!("/v1/channels/{channel}"),
                Some(json!({"sealed_info": STANDARD.encode([4u8; 64])})),
                vec![as_bob(StatusCode::FORBIDDEN, "not_channel_owner")],
            ),
            ("GET", "/v1/channels/{channel}/posts") => device(format!("/v1/channels/{channel}/posts"), None, vec![]),
            ("POST", "/v1/channels/{channel}/posts") => device(
                format!("/v1/channels/{channel}/posts"),
                Some(json!({"seq": 1, "sealed_post": STANDARD.encode([5u8; 64])})),
                vec![as_bob(StatusCode::FORBIDDEN, "not_channel_owner")],
            ),
            ("PUT", "/v1/channels/{channel}/subscription") | ("DELETE", "/v1/channels/{channel}/subscription") => {
                device(format!("/v1/channels/{channel}/subscription"), None, vec![])
            }
            _ => return None,
        })
    };

    let endpoints = fumi_server::routes::endpoints();
    assert!(endpoints.len() >= 29, "{endpoints:?}");
    let wrong_secret = format!("Fumi {alice_device}:{}", "00".repeat(32));
    let mut checked = 0;
    for endpoint in endpoints {
        let Some(entry) = matrix(endpoint.method, endpoint.path) else {
            panic!(
                "{} {} has no entry in the authorisation matrix: add one in tests/authorization.rs",
                endpoint.method, endpoint.path
            );
        };
        let method = Method::from_bytes(endpoint.method.as_bytes()).unwrap();
        let (path, body, cross) = match entry {
            Entry::Device { path, body, cross } => (path, body, cross),
            Entry::Public(reason) => {
                // Public really is public, and an empty request there changes nothing either.
                assert!(!reason.is_empty());
                let before = snapshot(&server);
                let body = (endpoint.method == "POST").then(|| json!({}));
                let (got, answer) = call(method, endpoint.path.to_owned(), None, body).await;
                let what = format!("{} {} (public: {reason})", endpoint.method, endpoint.path);
                assert!(
                    got.is_success() || got == StatusCode::BAD_REQUEST,
                    "{what}: {got} {answer}"
                );
                assert_eq!(snapshot(&server), before, "{what} changed stored state");
                continue;
            }
        };
        let mut callers: Vec<(&str, Option<String>, StatusCode, &str)> = vec![
            ("no credentials", None, StatusCode::UNAUTHORIZED, "unauthenticated"),
            (
                "malformed credentials",
                Some("Fumi not-a-credential".into()),
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
            ),
            (
                "another scheme",
                Some("Bearer abc".into()),
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
            ),
            (
                "a wrong secret",
                Some(wrong_secret.clone()),
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
            ),
            (
                "a removed device",
                Some(tablet_auth.clone()),
                StatusCode::UNAUTHORIZED,
                "device_removed",
            ),
            (
                "a suspended account",
                Some(carol_auth.clone()),
                StatusCode::FORBIDDEN,
                "account_suspended",
            ),
        ];
        for c in &cross {
            callers.push((c.who, Some(c.auth.clone()), c.status, c.code));
        }
        for (who, auth, status, code) in callers {
            let before = snapshot(&server);
            let blobs_before = server.blob_files();
            let (got, answer) = call(method.clone(), path.clone(), auth, body.clone()).await;
            let what = format!("{} {} as {who}", endpoint.method, endpoint.path);
            assert_eq!(got, status, "{what}: {answer}");
            assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
            let after = snapshot(&server);
            let changed: Vec<&str> = after
                .lines()
                .filter(|l| !before.lines().any(|b| b == *l))
                .chain(before.lines().filter(|l| !after.lines().any(|a| a == *l)))
                .collect();
            assert!(changed.is_empty(), "{what} changed stored state: {changed:?}");
            assert_eq!(server.blob_files(), blobs_before, "{what} changed the blob store");
            checked += 1;
        }
    }
    assert!(checked > 150, "{checked} refusals checked");
    let metrics = server.metrics();
    assert!(
        metrics.contains("fumi_http_responses_server_error_total 0"),
        "{metrics}"
    );
}
