//! Official accounts end to end, through the real `fumi` binary and server: an organisation
//! verified by an authority runs a channel with three subscribers; posts verify, and a forged
//! and a replayed post planted in the server's database are refused. A form's answers reach
//! exactly the organisation's staff devices, never the server in the clear, and export as CSV.

mod common;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::{Server, User, account_of, credentials, fumi_ok};
use fumi_core::AccountIdentity;
use fumi_core::official::{CHANNEL_VERSION, ChannelLink, Post, PostBody, seal_post};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// An authority key made with `fumi authority keygen`: (key file, public key hex).
fn authority(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let key = dir.join("authority.key");
    let out = fumi_ok(dir, &["authority", "keygen", "--out", key.to_str().unwrap()]);
    let public = out
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .expect("public key printed")
        .to_owned();
    (key, public)
}

/// Lines of `fumi receive --json` of one event type.
fn events(user: &User, kind: &str) -> Vec<Value> {
    user.receive_json()
        .into_iter()
        .filter(|line| line["type"] == kind)
        .collect()
}

fn channel_link(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("link: "))
        .expect("link printed")
        .to_owned()
}

#[tokio::test(flavor = "current_thread")]
async fn a_verified_channel_reaches_its_subscribers_and_refuses_forged_and_replayed_posts() {
    let server = Server::start();
    let org = User::register(&server, "kobe", "Kobe City Hall");
    let subscribers: Vec<User> = ["aiko", "ben", "chie"]
        .iter()
        .map(|n| User::register(&server, n, n))
        .collect();

    // The authority verifies the organisation's name and logo, bound to its account and key.
    let authority_dir = tempfile::tempdir().unwrap();
    let (authority_key, authority_public) = authority(authority_dir.path());
    let logo = org.home.path().join("logo.png");
    std::fs::write(&logo, b"\x89PNG\r\n\x1a\n kobe logo").unwrap();
    let request = org.home.path().join("request.json");
    org.ok(&[
        "org",
        "set",
        "--name",
        "City of Kobe",
        "--logo",
        logo.to_str().unwrap(),
        "--out",
        request.to_str().unwrap(),
    ]);
    let statement = org.home.path().join("statement.json");
    fumi_ok(
        authority_dir.path(),
        &[
            "authority",
            "certify",
            request.to_str().unwrap(),
            "--key",
            authority_key.to_str().unwrap(),
            "--name",
            "Digital Agency",
            "--out",
            statement.to_str().unwrap(),
        ],
    );
    org.ok(&["org", "install", statement.to_str().unwrap()]);
    let created = org.ok(&[
        "channel",
        "create",
        "Health notices",
        "--description",
        "Clinic hours and alerts",
    ]);
    let link = channel_link(&created);

    // Two subscribers trust the authority; the third does not.
    for user in &subscribers[..2] {
        user.ok(&["authority", "trust", "Digital Agency", &authority_public]);
    }
    for user in &subscribers {
        let shown = user.ok(&["channel", "subscribe", &link]);
        assert!(shown.contains("Health notices — City of Kobe"), "{shown}");
    }
    let untrusted = subscribers[2].ok(&["channel", "list"]);
    assert!(
        untrusted.contains("not verified (signed by \"Digital Agency\", an authority you do not trust)"),
        "{untrusted}"
    );
    assert!(
        subscribers[0]
            .ok(&["channel", "list"])
            .contains("✔ verified by Digital Agency")
    );

    // The organisation sees a count, and no one's name.
    let listed = org.ok(&["channel", "list", "--json"]);
    let summary: Value = serde_json::from_str(listed.trim()).unwrap();
    assert_eq!(summary["subscribers"], 3, "{summary}");
    for user in &subscribers {
        assert!(!listed.contains(&user.username) && !listed.contains(&account_of(user)));
    }

    org.ok(&["channel", "post", "Health notices", "MARKER-POST-ONE clinic opens at 9"]);
    for (i, user) in subscribers.iter().enumerate() {
        let posts = events(user, "channel_post");
        assert_eq!(posts.len(), 1, "{posts:?}");
        let post = &posts[0]["post"];
        assert_eq!(post["text"], "MARKER-POST-ONE clinic opens at 9");
        assert_eq!(post["seq"], 1);
        assert_eq!(post["organisation"], "City of Kobe");
        let verified = if i < 2 { json!("Digital Agency") } else { Value::Null };
        assert_eq!(post["verified_by"], verified, "{post}");
    }

    // A subscriber cannot post: only the owner's account can.
    let http = reqwest::Client::new();
    let payload = link.rsplit('/').next().unwrap();
    let parsed = ChannelLink::from_bytes(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let (_, subscriber_auth) = credentials(&subscribers[0]);
    let path = format!("{}/v1/channels/{}/posts", server.url, parsed.channel);
    let answer = http
        .post(&path)
        .header("authorization", &subscriber_auth)
        .json(&json!({"seq": 2, "sealed_post": STANDARD.encode([1u8; 64])}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::FORBIDDEN);
    // What the server shows anyone about the channel: sealed bytes and numbers, no list.
    let state: Value = http
        .get(format!("{}/v1/channels/{}", server.url, parsed.channel))
        .header("authorization", &subscriber_auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut keys: Vec<&str> = state.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["channel_id", "latest_seq", "sealed_info", "subscribers"]);

    // A malicious server (or anyone writing its database) plants two posts — one signed by a
    // subscriber who knows the channel key, and a copy of post 1 served as post 3 — and
    // withholds post 4.
    let forger = AccountIdentity::generate(&mut rand::rng());
    let forged = seal_post(
        &forger,
        &parsed.key,
        &Post {
            v: CHANNEL_VERSION,
            channel: parsed.channel,
            epoch: parsed.key.epoch,
            seq: 2,
            sent_at: 1,
            body: PostBody::Text {
                text: "MARKER-FORGED evacuate now".into(),
            },
        },
        &mut rand::rng(),
    );
    let page: Value = http
        .get(format!(
            "{}/v1/channels/{}/posts?after=0&limit=1",
            server.url, parsed.channel
        ))
        .header("authorization", &subscriber_auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = STANDARD
        .decode(page["posts"][0]["sealed_post"].as_str().unwrap())
        .unwrap();
    let channel = parsed.channel.as_bytes().to_vec();
    server.execute(
        "INSERT INTO channel_posts (channel_id, seq, sealed_post, posted_at) VALUES ({0}, 2, {1}, 0);
         INSERT INTO channel_posts (channel_id, seq, sealed_post, posted_at) VALUES ({0}, 3, {2}, 0);
         UPDATE channels SET latest_seq = 4 WHERE id = {0};",
        &[&channel, &forged, &first],
    );
    org.ok(&[
        "channel",
        "post",
        "Health notices",
        "MARKER-POST-FIVE flu shots on Friday",
    ]);
    let lines = subscribers[0].receive_json();
    let warnings: Vec<&Value> = lines.iter().filter(|l| l["type"] == "channel_warning").collect();
    assert_eq!(warnings.len(), 3, "{lines:?}");
    assert_eq!(warnings[0]["warning"]["seq"], 2);
    assert!(
        warnings[0]["warning"]["warning"].as_str().unwrap().contains("FORGED"),
        "{warnings:?}"
    );
    assert_eq!(warnings[1]["warning"]["seq"], 3);
    assert!(
        warnings[1]["warning"]["warning"]
            .as_str()
            .unwrap()
            .contains("REPLAYED channel post: the organisation signed it as post 1, the server served it as post 3"),
        "{warnings:?}"
    );
    assert_eq!(warnings[2]["warning"]["seq"], 4);
    assert_eq!(warnings[2]["warning"]["warning"], "the server withheld post 4");
    let posts: Vec<&Value> = lines.iter().filter(|l| l["type"] == "channel_post").collect();
    assert_eq!(posts.len(), 1, "{lines:?}");
    assert_eq!(posts[0]["post"]["seq"], 5);
    let shown = subscribers[0].ok(&["channel", "show", "Health notices"]);
    assert!(
        shown.contains("MARKER-POST-ONE") && shown.contains("MARKER-POST-FIVE"),
        "{shown}"
    );
    assert!(!shown.contains("MARKER-FORGED"), "{shown}");

    // A file post: sealed under a fresh key carried in the signed post; every subscriber can
    // fetch the blob, and it stays for the next one.
    let notice = org.home.path().join("notice.pdf");
    let notice_bytes = b"%PDF-1.7 MARKER-FILE-BYTES vaccination schedule".repeat(100);
    std::fs::write(&notice, &notice_bytes).unwrap();
    org.ok(&[
        "channel",
        "post",
        "Health notices",
        "MARKER-CAPTION schedule",
        "--file",
        notice.to_str().unwrap(),
    ]);
    for user in &subscribers[..2] {
        let posts = events(user, "channel_post");
        let filed = posts.iter().find(|p| p["post"]["seq"] == 6).expect("the file post");
        assert_eq!(filed["post"]["text"], "MARKER-CAPTION schedule");
        assert_eq!(filed["post"]["file"]["name"], "notice.pdf");
        let saved = filed["post"]["file"]["path"].as_str().expect("saved");
        assert_eq!(std::fs::read(saved).unwrap(), notice_bytes);
    }
    let (status, refused) = {
        let answer = http
            .post(format!("{}/v1/blobs", server.url))
            .header("authorization", &subscriber_auth)
            .json(&json!({"size": 100, "channel": parsed.channel.to_string()}))
            .send()
            .await
            .unwrap();
        (answer.status(), answer.json::<Value>().await.unwrap())
    };
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(refused["error"]["code"], "not_channel_owner");

    // Leaving drops the count.
    subscribers[2].ok(&["channel", "unsubscribe", "Health notices"]);
    let summary: Value = serde_json::from_str(org.ok(&["channel", "list", "--json"]).trim()).unwrap();
    assert_eq!(summary["subscribers"], 2);

    // The server never held the posts, the channel's name or the organisation's in the clear.
    server.assert_never_wrote(&[
        "MARKER-POST-ONE",
        "MARKER-POST-FIVE",
        "MARKER-CAPTION",
        "MARKER-FILE-BYTES",
        "notice.pdf",
        "Health notices",
        "City of Kobe",
        "Clinic hours",
    ]);
}

#[test]
fn a_form_submission_reaches_exactly_the_staff_devices_and_exports_as_csv() {
    let server = Server::start();
    let org = User::register(&server, "clinic", "North Clinic");
    let staff = tempfile::tempdir().unwrap();
    fumi_ok(
        staff.path(),
        &["device", "link", "--from", org.home.path().to_str().unwrap()],
    );
    let citizen = User::register(&server, "daichi", "Daichi");
    let bystander = User::register(&server, "emi", "Emi");

    let link = channel_link(&org.ok(&["channel", "create", "Vaccination"]));
    // The organisation's second staff device joins its own channel with the same link.
    let joined = fumi_ok(staff.path(), &["channel", "subscribe", &link]);
    assert!(joined.contains("yours"), "{joined}");
    let definition = org.home.path().join("form.json");
    std::fs::write(
        &definition,
        json!({
            "title": "Vaccine appointment",
            "fields": [
                {"name": "name", "label": "Full name", "type": "text", "required": true},
                {"name": "born", "label": "Date of birth", "type": "date", "required": true},
                {"name": "site", "label": "Site", "type": "choice", "choices": ["North", "South"], "required": true},
                {"name": "notes", "label": "Anything we should know", "type": "text"}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let published = org.ok(&["form", "publish", "Vaccination", definition.to_str().unwrap()]);
    let form_id = published.trim().strip_prefix("published form ").unwrap().to_owned();
    // Either staff device posts; each sees the other's posts, also those before its own.
    fumi_ok(staff.path(), &["channel", "post", "Vaccination", "Walk-ins from 10:00"]);
    org.ok(&["channel", "post", "Vaccination", "Bring your ticket"]);
    let shown = org.ok(&["channel", "show", "Vaccination"]);
    assert!(
        shown.contains("#2 Walk-ins from 10:00") && shown.contains("#3 Bring your ticket"),
        "{shown}"
    );
    for user in [&citizen, &bystander] {
        user.ok(&["channel", "subscribe", &link]);
    }
    let forms: Value = serde_json::from_str(citizen.ok(&["form", "list", "--json"]).trim()).unwrap();
    assert_eq!(forms["form_id"], form_id.as_str());
    assert_eq!(forms["title"], "Vaccine appointment");

    // Answers that do not fit the form are refused before anything is sent.
    let answers = citizen.home.path().join("answers.json");
    std::fs::write(
        &answers,
        json!({"name": "MARKER-NAME Daichi Sato", "born": "1990-13-01", "site": "North"}).to_string(),
    )
    .unwrap();
    let refused = citizen.run(&["form", "fill", &form_id, "--answers", answers.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Date of birth: a date as YYYY-MM-DD"));

    std::fs::write(
        &answers,
        json!({"name": "MARKER-NAME Daichi Sato", "born": "1990-02-01", "site": "South",
               "notes": "MARKER-NOTES allergic to eggs, \"severe\""})
        .to_string(),
    )
    .unwrap();
    let sent = citizen.ok(&["form", "fill", &form_id, "--answers", answers.to_str().unwrap()]);
    let submission = sent.split_whitespace().nth(2).unwrap().trim_end_matches(';').to_owned();

    // Another citizen answers at the terminal: a wrong answer is asked again, an optional one
    // skipped with Enter.
    let walk_in = User::register(&server, "fumiko", "Fumiko");
    walk_in.ok(&["channel", "subscribe", &link]);
    let mut child = std::process::Command::new(common::FUMI)
        .args([
            "--home",
            walk_in.home.path().to_str().unwrap(),
            "form",
            "fill",
            &form_id,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b"MARKER-TYPED Fumiko Abe
1985-07-32
1985-07-31
3
1

",
            )
            .unwrap();
    }
    let typed = child.wait_with_output().unwrap();
    let prompts = String::from_utf8_lossy(&typed.stdout);
    assert!(
        typed.status.success(),
        "{prompts} {}",
        String::from_utf8_lossy(&typed.stderr)
    );
    assert!(prompts.contains("Date of birth: a date as YYYY-MM-DD"), "{prompts}");
    assert!(prompts.contains("Site: one of: North, South"), "{prompts}");
    assert!(prompts.contains("sent submission"), "{prompts}");

    // Both staff devices get them; the other subscriber gets nothing.
    let staff_user = User {
        home: staff,
        username: org.username.clone(),
    };
    for device in [&org, &staff_user] {
        let got = events(device, "form_submission");
        assert_eq!(got.len(), 2, "{got:?}");
        let typed = got
            .iter()
            .find(|g| g["submission"]["submitter"] == walk_in.username.as_str());
        let typed = &typed.expect("the typed submission")["submission"]["answers"];
        assert_eq!(
            typed,
            &json!({"name": "MARKER-TYPED Fumiko Abe", "born": "1985-07-31", "site": "North"})
        );
        let received = &got
            .iter()
            .find(|g| g["submission"]["submitter"] == citizen.username.as_str())
            .expect("the file submission")["submission"];
        assert_eq!(received["submission"], submission.as_str());
        assert_eq!(received["submitter"], citizen.username.as_str());
        assert_eq!(received["answers"]["site"], "South");
        assert_eq!(received["form_title"], "Vaccine appointment");
    }
    assert!(bystander.receive_json().is_empty());

    // The submitter gets a receipt from the staff devices.
    let receipts = events(&citizen, "form_receipt");
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    assert_eq!(receipts[0]["submission"]["submission"], submission.as_str());
    assert!(receipts[0]["submission"]["receipt_at"].is_u64());

    // Staff export locally.
    for device in [&org, &staff_user] {
        let csv_path = device.home.path().join("out.csv");
        let out = device.ok(&["form", "export", &form_id, "--csv", csv_path.to_str().unwrap()]);
        assert!(out.contains("wrote 2 submissions"), "{out}");
        let csv = std::fs::read_to_string(&csv_path).unwrap();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], "submission,sent_at,submitter,name,born,site,notes");
        assert!(lines[1].starts_with(&format!("{submission},")), "{csv}");
        assert!(
            lines[1].ends_with(&format!(
                ",{},MARKER-NAME Daichi Sato,1990-02-01,South,\"MARKER-NOTES allergic to eggs, \"\"severe\"\"\"",
                citizen.username
            )),
            "{csv}"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&csv_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // The server saw ciphertext only.
    server.assert_never_wrote(&[
        "MARKER-NAME",
        "MARKER-NOTES",
        "MARKER-TYPED",
        "Vaccine appointment",
        "Date of birth",
    ]);
}

#[tokio::test(flavor = "current_thread")]
async fn channel_requests_are_checked_and_change_nothing() {
    let server = Server::start();
    let org = User::register(&server, "org", "Org");
    let created = org.ok(&["channel", "create", "News"]);
    let link = channel_link(&created);
    let payload = URL_SAFE_NO_PAD.decode(link.rsplit('/').next().unwrap()).unwrap();
    let channel = ChannelLink::from_bytes(&payload).unwrap().channel;
    let (_, auth) = credentials(&org);
    let http = reqwest::Client::new();
    let call = |method: Method, path: String, body: Option<Value>| {
        let mut request = http
            .request(method, format!("{}{path}", server.url))
            .header("authorization", &auth);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let before = common::snapshot(&server);
    let big = STANDARD.encode(vec![0u8; fumi_proto::MAX_SEALED_CHANNEL_POST_BYTES + 1]);
    let cases = [
        (
            Method::POST,
            "/v1/channels".to_owned(),
            Some(json!({"channel_id": channel.to_string(), "sealed_info": STANDARD.encode([1u8; 64])})),
            StatusCode::CONFLICT,
            "channel_exists",
        ),
        (
            Method::POST,
            "/v1/channels".to_owned(),
            Some(json!({"channel_id": "zz", "sealed_info": STANDARD.encode([1u8; 64])})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/channels".to_owned(),
            Some(json!({"channel_id": "44".repeat(16), "sealed_info": STANDARD.encode([1u8; 8])})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/channels/nothex".to_owned(),
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            format!("/v1/channels/{}", "55".repeat(16)),
            None,
            StatusCode::NOT_FOUND,
            "unknown_channel",
        ),
        (
            Method::POST,
            format!("/v1/channels/{channel}/posts"),
            Some(json!({"seq": 0, "sealed_post": STANDARD.encode([1u8; 64])})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::POST,
            format!("/v1/channels/{channel}/posts"),
            Some(json!({"seq": 5, "sealed_post": STANDARD.encode([1u8; 64])})),
            StatusCode::CONFLICT,
            "channel_seq_conflict",
        ),
        (
            Method::POST,
            format!("/v1/channels/{channel}/posts"),
            Some(json!({"seq": 1, "sealed_post": big})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            Method::POST,
            format!("/v1/channels/{channel}/posts"),
            Some(json!({"seq": 1})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            format!("/v1/channels/{channel}/posts?limit=0"),
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            format!("/v1/channels/{channel}/posts?after=-1"),
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::PUT,
            format!("/v1/channels/{}/subscription", "55".repeat(16)),
            None,
            StatusCode::NOT_FOUND,
            "unknown_channel",
        ),
        (
            Method::POST,
            "/v1/blobs".to_owned(),
            Some(json!({"size": 10, "channel": "55".repeat(16)})),
            StatusCode::NOT_FOUND,
            "unknown_channel",
        ),
        (
            Method::POST,
            "/v1/blobs".to_owned(),
            Some(json!({"size": 10, "channel": channel.to_string(), "recipients": ["66".repeat(16)]})),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let what = format!("{method} {path}");
        let (got, answer) = call(method, path, body).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
    }
    assert_eq!(common::snapshot(&server), before);

    // A retry of the same post is accepted once.
    let post = json!({"seq": 1, "sealed_post": STANDARD.encode([9u8; 64])});
    let (first, _) = call(
        Method::POST,
        format!("/v1/channels/{channel}/posts"),
        Some(post.clone()),
    )
    .await;
    let (again, _) = call(Method::POST, format!("/v1/channels/{channel}/posts"), Some(post)).await;
    assert_eq!((first, again), (StatusCode::CREATED, StatusCode::OK));
    let (_, state) = call(Method::GET, format!("/v1/channels/{channel}"), None).await;
    assert_eq!(state["latest_seq"], 1);
    assert!(server.metrics().contains("fumi_http_responses_server_error_total 0"));
}
