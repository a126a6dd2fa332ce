//! Linked devices, invite links, avatars and disappearing messages, through the real server and
//! CLI processes.

mod common;

use common::{Server, User, fumi, fumi_ok, receive_json, texts};

#[test]
fn a_linked_device_receives_from_link_time_and_nothing_after_removal() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    alice.ok(&["send", &bob.username, "before the link"]);
    alice.ok(&["group", "create", "Team", &bob.username, &carol.username]);
    bob.ok(&["receive"]);
    carol.ok(&["receive"]);

    let laptop = tempfile::tempdir().unwrap();
    let linked = fumi_ok(
        laptop.path(),
        &["device", "link", "--from", alice.home.path().to_str().unwrap()],
    );
    assert!(linked.contains(&format!("of {}", alice.username)), "{linked}");
    let devices = alice.ok(&["device", "list"]);
    assert_eq!(devices.lines().count(), 2, "{devices}");
    assert_eq!(devices.matches("(this device)").count(), 1, "{devices}");
    let laptop_id = fumi_ok(laptop.path(), &["whoami", "--json"]);
    let laptop_id: serde_json::Value = serde_json::from_str(&laptop_id).unwrap();
    let laptop_id = laptop_id["device_id"].as_str().unwrap().to_owned();
    assert!(devices.contains(&laptop_id), "{devices}");
    let laptop_line = devices.lines().find(|l| l.starts_with(&laptop_id)).unwrap();
    assert!(laptop_line.contains("known to this device since 20"), "{devices}");

    // Both of Alice's devices get new 1:1 and group messages; the laptop nothing from before.
    bob.ok(&["send", &alice.username, "after the link"]);
    carol.ok(&["send", "--group", "Team", "team news"]);
    let on_laptop = receive_json(laptop.path());
    assert_eq!(texts(&on_laptop), vec!["after the link", "team news"], "{on_laptop:?}");
    // History from before the link is copied from the phone, shown once as an event.
    assert!(
        on_laptop
            .iter()
            .any(|m| m["event"] == true && m["text"].as_str().unwrap().contains("copied from your other device")),
        "{on_laptop:?}"
    );
    // The laptop joins its conversations as Alice's own device, not as someone Alice added.
    let joined: Vec<&str> = on_laptop
        .iter()
        .filter(|m| m["event"] == true)
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert!(
        joined.iter().any(|t| t.contains("your other device added this device")),
        "{joined:?}"
    );
    assert!(!joined.iter().any(|t| t.contains("added you")), "{joined:?}");
    let copied = fumi_ok(laptop.path(), &["history", &bob.username]);
    let before = copied.find("before the link").expect("earlier message copied");
    let after = copied.find("after the link").expect("new message");
    assert!(before < after, "{copied}");
    let team = on_laptop.iter().find(|m| m["text"] == "team news").unwrap();
    assert_eq!(team["conversation_name"], "Team", "the laptop learns the group's name");
    assert_eq!(team["sender_name"], "Carol");
    assert_eq!(texts(&alice.receive_json()), vec!["after the link", "team news"]);
    let bob_events = bob.ok(&["receive"]);
    assert!(bob_events.contains("added a newly linked device"), "{bob_events}");

    // The laptop writes as Alice; her phone sees it as her own message.
    fumi_ok(laptop.path(), &["send", "--group", "Team", "from the laptop"]);
    assert!(texts(&carol.receive_json()).contains(&"from the laptop".to_owned()));
    let on_phone = alice.receive_json();
    let own = on_phone
        .iter()
        .find(|m| m["text"] == "from the laptop")
        .expect("own message synced");
    assert_eq!(own["outgoing"], true);

    // A new name and avatar set on the phone reach the laptop (the profile key follows).
    let image = [b"\x89PNG\r\n\x1a\n".as_slice(), &[7u8; 500]].concat();
    let avatar = alice.home.path().join("new.png");
    std::fs::write(&avatar, &image).unwrap();
    alice.ok(&[
        "profile",
        "set",
        "--name",
        "Alice Renamed",
        "--avatar",
        avatar.to_str().unwrap(),
    ]);
    alice.ok(&["send", "--group", "Team", "renamed"]);
    fumi_ok(laptop.path(), &["receive"]);
    let laptop_me = fumi_ok(laptop.path(), &["whoami"]);
    assert!(laptop_me.contains("Alice Renamed"), "{laptop_me}");
    assert_eq!(std::fs::read(laptop.path().join("avatar")).unwrap(), image);
    fumi_ok(laptop.path(), &["send", "--group", "Team", "from the renamed laptop"]);
    let carol_sees = carol.receive_json();
    let from_laptop = carol_sees
        .iter()
        .find(|m| m["text"] == "from the renamed laptop")
        .unwrap();
    assert_eq!(from_laptop["sender_name"], "Alice Renamed", "{carol_sees:?}");
    alice.ok(&["receive"]);

    // Removed: its credentials stop at once and nothing new reaches it.
    let removed = alice.ok(&["device", "remove", &laptop_id[..8]]);
    assert!(removed.contains(&laptop_id), "{removed}");
    assert_eq!(alice.ok(&["device", "list"]).lines().count(), 1);
    bob.ok(&["send", &alice.username, "after the removal"]);
    carol.ok(&["send", "--group", "Team", "more team news"]);
    let refused = fumi(laptop.path(), &["receive"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("removed"), "{stderr}");
    assert!(
        !stderr.contains('{'),
        "the server's error is shown as text, not JSON: {stderr}"
    );
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("after the removal"));
    assert_eq!(
        texts(&alice.receive_json()),
        vec!["after the removal", "more team news"]
    );
    let carol_sees = carol.ok(&["receive"]);
    assert!(carol_sees.contains("removed one of their devices"), "{carol_sees}");

    // The link code worked once.
    let again = tempfile::tempdir().unwrap();
    let out = fumi(again.path(), &["device", "link", "fumi://link/AAAA/AAAA"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a complete device-link code"));
}

#[test]
fn invite_links_connect_people_once() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice Invites");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");

    let invite = alice.ok(&["invite"]).trim().to_owned();
    assert!(invite.starts_with("fumi://invite/"), "{invite}");
    assert!(!invite.contains(&alice.username), "the link carries no name");
    let added = bob.ok(&["contact", "add", &invite]);
    assert!(
        added.contains(&format!("added {} · Alice Invites", alice.username)),
        "{added}"
    );
    let contacts = bob.ok(&["contact", "list"]);
    assert!(contacts.contains(&alice.username), "{contacts}");

    // Alice sees Bob arrive and can answer him by name.
    let alice_sees = alice.ok(&["receive"]);
    assert!(
        alice_sees.contains(&format!("{} added you", bob.username)),
        "{alice_sees}"
    );
    alice.ok(&["send", &bob.username, "welcome"]);
    assert_eq!(bob.receive_texts(), vec!["welcome"]);

    let reused = carol.run(&["contact", "add", &invite]);
    assert!(!reused.status.success());
    assert!(String::from_utf8_lossy(&reused.stderr).contains("already used"));
    let mut damaged = invite.clone();
    damaged.pop();
    damaged.push(if invite.ends_with('A') { 'B' } else { 'A' });
    let bad = carol.run(&["contact", "add", &damaged]);
    assert!(!bad.status.success());
    let own = alice.run(&["contact", "add", &alice.ok(&["invite"])]);
    assert!(String::from_utf8_lossy(&own.stderr).contains("your own invite"));
}

#[test]
fn avatars_and_disappearing_messages() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "hi"]);
    bob.ok(&["receive"]);

    let image = [b"\x89PNG\r\n\x1a\n".as_slice(), &[42u8; 2000]].concat();
    let avatar = alice.home.path().join("me.png");
    std::fs::write(&avatar, &image).unwrap();
    alice.ok(&["profile", "set", "--avatar", avatar.to_str().unwrap()]);
    alice.ok(&["send", &bob.username, "new picture"]);
    bob.ok(&["receive"]);
    let contacts = bob.ok(&["contact", "list", "--json"]);
    let entry: serde_json::Value = contacts
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|c| c["username"] == alice.username.as_str())
        .expect("alice listed");
    let saved = entry["avatar"].as_str().expect("avatar saved");
    assert_eq!(std::fs::read(saved).unwrap(), image);
    let not_image = alice.run(&["profile", "set", "--avatar", "/etc/hostname"]);
    assert!(String::from_utf8_lossy(&not_image.stderr).contains("PNG, JPEG, GIF or WebP"));

    alice.ok(&["disappearing", &bob.username, "2s"]);
    let listed = alice.ok(&["conversations"]);
    assert!(listed.contains("(messages disappear after 2s)"), "{listed}");
    alice.ok(&["send", &bob.username, "burn after reading"]);
    let received = bob.ok(&["receive"]);
    assert!(received.contains("set messages to disappear 2s"), "{received}");
    assert!(received.contains("burn after reading"), "{received}");
    // Both devices delete the message once its two seconds are up (polled, with a deadline).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for (user, peer) in [(&alice, &bob), (&bob, &alice)] {
        loop {
            user.ok(&["receive"]);
            let history = user.ok(&["history", &peer.username]);
            assert!(history.contains("new picture"), "older messages stay: {history}");
            if !history.contains("burn after reading") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never deleted: {history}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    alice.ok(&["disappearing", &bob.username, "off"]);
    alice.ok(&["send", &bob.username, "kept"]);
    assert!(bob.ok(&["receive"]).contains("turned disappearing messages off"));
    assert!(bob.ok(&["history", &alice.username]).contains("kept"));
}

#[test]
fn device_link_prints_a_code_and_waits_for_the_new_device() {
    use std::io::{BufRead, BufReader};
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "hi"]);

    let mut old = std::process::Command::new(common::FUMI)
        .arg("--home")
        .arg(alice.home.path())
        .args(["device", "link", "--wait", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(old.stdout.take().unwrap()).lines();
    let mut shown = Vec::new();
    let code = loop {
        let line = lines.next().expect("the old device prints the code").unwrap();
        shown.push(line.clone());
        if let Some(start) = line.find("fumi://link/") {
            break line[start..].trim_end_matches('\'').to_owned();
        }
    };
    let laptop = tempfile::tempdir().unwrap();
    let joined = fumi_ok(laptop.path(), &["device", "link", &code]);
    assert!(joined.contains("linked as device"), "{joined}");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(old.wait().unwrap().success());
    let all = [shown, rest].concat().join("\n");
    assert!(
        all.contains('█') || all.contains('▀') || all.contains('▄'),
        "a QR code is drawn: {all}"
    );
    assert!(all.contains("linked and added to your conversations"), "{all}");

    // Added to the existing 1:1 conversation before the old device returned.
    bob.ok(&["send", &alice.username, "to both devices"]);
    assert_eq!(texts(&receive_json(laptop.path())), vec!["to both devices"]);
    let copied = fumi_ok(laptop.path(), &["history", &bob.username]);
    assert!(
        copied.contains("] hi\n"),
        "history handed over after the old device saw the link: {copied}"
    );
    let reused = fumi(tempfile::tempdir().unwrap().path(), &["device", "link", &code]);
    assert!(String::from_utf8_lossy(&reused.stderr).contains("already used or has expired"));
}

/// A member offline while another links and removes devices processes the commits later: the
/// devices the directory no longer lists are accepted because its history listed them, and the
/// member's view of the group stays the group it keeps receiving.
#[test]
fn a_member_offline_while_devices_are_linked_and_removed_keeps_the_group() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    alice.ok(&["group", "create", "Team", &bob.username, &carol.username]);
    bob.ok(&["receive"]);
    carol.ok(&["receive"]);

    let link = |dir: &tempfile::TempDir| {
        fumi_ok(
            dir.path(),
            &["device", "link", "--from", alice.home.path().to_str().unwrap()],
        );
        let me: serde_json::Value = serde_json::from_str(&fumi_ok(dir.path(), &["whoami", "--json"])).unwrap();
        me["device_id"].as_str().unwrap().to_owned()
    };
    // Bob is offline from here on. Carol receives as it happens: a laptop linked and removed.
    let laptop = tempfile::tempdir().unwrap();
    let laptop_id = link(&laptop);
    assert!(carol.ok(&["receive"]).contains("added a newly linked device"));
    alice.ok(&["device", "remove", &laptop_id]);
    assert!(carol.ok(&["receive"]).contains("removed one of their devices"));
    // A tablet linked and removed, then a desktop linked and kept, with no one receiving.
    let tablet = tempfile::tempdir().unwrap();
    let tablet_id = link(&tablet);
    alice.ok(&["device", "remove", &tablet_id]);
    let desktop = tempfile::tempdir().unwrap();
    link(&desktop);
    alice.ok(&["send", "--group", "Team", "after the changes"]);

    let received = bob.run(&["receive"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&received.stdout),
        String::from_utf8_lossy(&received.stderr),
    );
    assert!(received.status.success(), "{stdout}\n{stderr}");
    assert!(
        !format!("{stdout}{stderr}").contains("SECURITY WARNING"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("after the changes"), "{stdout}");
    let groups = bob.ok(&["group", "list"]);
    assert!(groups.starts_with("Team: "), "{groups}");
    assert!(
        !groups.contains("(removed)") && !groups.contains("not sending"),
        "{groups}"
    );

    // Bob still takes part, and Alice's kept devices read him.
    bob.ok(&["send", "--group", "Team", "still here"]);
    assert!(bob.ok(&["history", "Team"]).contains("after the changes"));
    assert!(alice.receive_texts().contains(&"still here".to_owned()));
    assert!(texts(&receive_json(desktop.path())).contains(&"still here".to_owned()));
    assert!(carol.receive_texts().contains(&"still here".to_owned()));
}
