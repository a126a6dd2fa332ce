//! End-to-end messaging through the real server and CLI processes.

mod common;

use common::{Server, User};

#[test]
fn one_to_one_both_ways_with_names_learned_through_mls() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice Example");
    let bob = User::register(&server, "bob", "Bob");

    // Bob is offline (no process runs for him) while Alice writes: the message waits for him.
    alice.ok(&["send", &bob.username, "hello"]);
    let received = bob.receive_json();
    let texts: Vec<_> = received.iter().filter(|m| m["event"] == false).collect();
    assert_eq!(texts.len(), 1, "{received:?}");
    assert_eq!(texts[0]["text"], "hello");
    assert_eq!(texts[0]["sender"], alice.username.as_str());
    assert_eq!(texts[0]["sender_name"], "Alice Example");
    for field in ["id", "conversation", "sent_at"] {
        assert!(!texts[0][field].is_null(), "missing {field}");
    }

    bob.ok(&["send", &alice.username, "hi back"]);
    let line = alice.ok(&["receive"]);
    assert!(line.contains(&format!("[{} · Bob] hi back", bob.username)), "{line}");

    // Nothing is delivered twice.
    assert!(bob.receive_texts().is_empty());
    assert!(alice.receive_texts().is_empty());

    // Local history on both sides, in order.
    let history = alice.ok(&["history", &bob.username]);
    let hello = history.find("hello").expect("hello in history");
    let back = history.find("hi back").expect("reply in history");
    assert!(hello < back, "{history}");
    let conversations = alice.ok(&["conversations"]);
    assert!(
        conversations.contains(&format!("{} [1:1]", bob.username)),
        "{conversations}"
    );

    // A new display name reaches contacts with the next message (the profile key rotates).
    alice.ok(&["profile", "set", "--name", "Alice Renamed"]);
    alice.ok(&["send", &bob.username, "new name"]);
    let line = bob.ok(&["receive"]);
    assert!(
        line.contains(&format!("[{} · Alice Renamed] new name", alice.username)),
        "{line}"
    );

    let whoami = alice.ok(&["whoami"]);
    assert!(
        whoami.starts_with(&format!("{} · Alice Renamed", alice.username)),
        "{whoami}"
    );
}

#[test]
fn group_membership_changes_decide_who_reads_what() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    let dave = User::register(&server, "dave", "Dave");

    alice.ok(&["group", "create", "Ward 3", &bob.username, &carol.username]);
    alice.ok(&["send", "--group", "Ward 3", "shift starts at 8"]);
    for member in [&bob, &carol] {
        let out = member.ok(&["receive"]);
        assert!(
            out.contains(&format!("[Ward 3] [{} · Alice] shift starts at 8", alice.username)),
            "{out}"
        );
        assert!(
            out.contains(&format!("* {} added you", alice.username)),
            "membership change shown: {out}"
        );
    }
    bob.ok(&["send", "--group", "Ward 3", "ack from bob"]);

    // Dave joins later: he reads only what is sent after he joined.
    alice.ok(&["group", "add", "Ward 3", &dave.username]);
    alice.ok(&["send", "--group", "Ward 3", "welcome dave"]);
    assert_eq!(dave.receive_texts(), vec!["welcome dave"]);

    // Bob is removed: he learns it, and reads nothing sent afterwards.
    alice.ok(&["group", "remove", "Ward 3", &bob.username]);
    alice.ok(&["send", "--group", "Ward 3", "after bob left"]);
    let bob_out = bob.ok(&["receive"]);
    assert!(bob_out.contains("welcome dave"), "sent before the removal: {bob_out}");
    assert!(!bob_out.contains("after bob left"), "{bob_out}");
    assert!(bob_out.contains("removed you"), "{bob_out}");
    let refused = bob.run(&["send", "--group", "Ward 3", "am I still here"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no longer a member"));

    let carol_texts = carol.receive_texts();
    assert_eq!(carol_texts, vec!["ack from bob", "welcome dave", "after bob left"]);
    let carol_history = carol.ok(&["history", "Ward 3"]);
    assert!(
        carol_history.contains(&format!("removed {}", bob.username)),
        "{carol_history}"
    );
    assert_eq!(dave.receive_texts(), vec!["after bob left"]);

    let groups = alice.ok(&["group", "list"]);
    assert!(groups.contains("Ward 3"), "{groups}");
    assert!(
        groups.contains(&carol.username) && groups.contains(&dave.username),
        "{groups}"
    );
    assert!(!groups.contains(&bob.username), "{groups}");
}

#[test]
fn conversations_count_unread_until_shown() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "one"]);
    alice.ok(&["send", &bob.username, "two"]);
    // A send processes the mailbox without showing it, so the messages become unread.
    bob.ok(&["send", &alice.username, "reply"]);
    let listing = bob.ok(&["conversations"]);
    assert!(
        listing.contains("(3 unread)"),
        "two texts and the join event: {listing}"
    );
    bob.ok(&["history", &alice.username]);
    let listing = bob.ok(&["conversations"]);
    assert!(!listing.contains("unread"), "{listing}");
}

#[test]
fn clear_errors_for_user_mistakes() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let cases: &[(&[&str], &str)] = &[
        (&["send", "nobody.42", "hi"], "no one has the username nobody.42"),
        (&["send", "bob", "hi"], "number after a dot"),
        (&["send", "--group", "Nope", "hi"], "no group named"),
        (&["history", "Nope"], "no group named"),
    ];
    for (args, expected) in cases {
        let output = alice.run(args);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let unregistered = tempfile::tempdir().unwrap();
    let output = common::fumi(unregistered.path(), &["receive"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("run `fumi register` first"));
    let taken_home = alice.home.path().to_str().unwrap();
    let again = common::fumi(
        std::path::Path::new(taken_home),
        &[
            "register",
            "--server",
            &server.url,
            "--name",
            "A",
            "--username",
            "alice",
        ],
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds an account"));
}

#[test]
fn every_command_has_help() {
    let home = tempfile::tempdir().unwrap();
    for command in [
        vec!["--help"],
        vec!["server", "--help"],
        vec!["register", "--help"],
        vec!["send", "--help"],
        vec!["receive", "--help"],
        vec!["group", "--help"],
        vec!["group", "create", "--help"],
        vec!["group", "add", "--help"],
        vec!["group", "remove", "--help"],
        vec!["group", "list", "--help"],
        vec!["conversations", "--help"],
        vec!["history", "--help"],
        vec!["whoami", "--help"],
        vec!["profile", "set", "--help"],
    ] {
        let output = common::fumi(home.path(), &command);
        assert!(output.status.success(), "{command:?}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("Usage:"),
            "{command:?}"
        );
    }
}
