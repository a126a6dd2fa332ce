//! Homes and a server data directory written by an earlier release, checked in under
//! `tests/fixtures/<release>/`: the current build must open them in place (their stores migrated
//! as they are opened), deliver what was queued before the upgrade and go on both ways.
//!
//! `write_fixture` wrote them with the release named in the directory; it is ignored, so a later
//! build never overwrites a fixture. To add one for a new release before its store changes:
//! `FUMI_WRITE_FIXTURE=<name> cargo test -p fumi-cli --test release_homes -- --ignored`.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The fixture written by the release before the client machine (issue 19).
const RELEASE: &str = "release-2026-12";

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// Points a home at the server it now lives on (the fixture's server ran on another port).
fn move_home(home: &Path, server: &Server) {
    let db = rusqlite::Connection::open(home.join("fumi.db")).expect("open home");
    let changed = db
        .execute("UPDATE account SET server = ?1", [&server.url])
        .expect("set server");
    assert_eq!(changed, 1);
}

fn username(home: &Path) -> String {
    let out = fumi_ok(home, &["whoami", "--json"]);
    let me: serde_json::Value = serde_json::from_str(&out).expect("whoami JSON");
    me["username"].as_str().expect("username").to_owned()
}

#[test]
#[ignore = "writes a fixture with this build; see the module comment"]
fn write_fixture() {
    let name = std::env::var("FUMI_WRITE_FIXTURE").expect("FUMI_WRITE_FIXTURE names the fixture");
    let target = fixture_dir(&name);
    assert!(
        !target.exists(),
        "{} exists; fixtures are never rewritten",
        target.display()
    );
    let mut server = Server::start();
    let alice = User::register(&server, "alice", "Alice Old");
    let bob = User::register(&server, "bob", "Bob Old");
    let carol = User::register(&server, "carol", "Carol Old");
    alice.ok(&["send", &bob.username, "hello bob from the old release"]);
    assert_eq!(bob.receive_texts(), ["hello bob from the old release"]);
    bob.ok(&["send", &alice.username, "hi alice, old release here"]);
    assert_eq!(alice.receive_texts(), ["hi alice, old release here"]);
    alice.ok(&["group", "create", "oldies", &bob.username, &carol.username]);
    alice.ok(&["send", "--group", "oldies", "the group before the upgrade"]);
    assert_eq!(bob.receive_texts(), ["the group before the upgrade"]);
    assert_eq!(carol.receive_texts(), ["the group before the upgrade"]);
    // Queued for Alice when the release is replaced.
    bob.ok(&["send", &alice.username, "queued before the upgrade"]);
    carol.ok(&["send", "--group", "oldies", "carol queued this in the group"]);
    server.stop();
    // Everything into the database file itself: the fixture holds no write-ahead log.
    let db = rusqlite::Connection::open(server.database()).expect("open the server's database");
    db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    db.pragma_update(None, "journal_mode", "DELETE")
        .expect("leave WAL mode");
    drop(db);
    copy_tree(&server.data_dir(), &target.join("server"));
    for (user, who) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        copy_tree(user.home.path(), &target.join(who));
    }
}

#[test]
fn homes_and_server_data_of_the_last_release_keep_working() {
    let fixture = fixture_dir(RELEASE);
    let dir = tempfile::tempdir().expect("temp dir");
    copy_tree(&fixture.join("server"), &dir.path().join("data"));
    // Envelopes queued when the fixture was written stay queued however old the fixture is.
    let server = Server::start_on_data(dir, &[("FUMI_MESSAGE_TTL_SECS", "3153600000")]);
    let homes = tempfile::tempdir().expect("temp dir");
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|who| {
        let home = homes.path().join(who);
        copy_tree(&fixture.join(who), &home);
        move_home(&home, &server);
        home
    });
    let (alice_name, bob_name) = (username(&alice), username(&bob));

    // What was stored before the upgrade is there ...
    let history = fumi_ok(&alice, &["history", &bob_name, "--json"]);
    assert!(history.contains("hello bob from the old release"), "{history}");
    assert!(history.contains("hi alice, old release here"), "{history}");
    let conversations = fumi_ok(&alice, &["conversations"]);
    assert!(conversations.contains("oldies"), "{conversations}");
    // ... what was queued arrives ...
    let mut arrived = texts(&receive_json(&alice));
    arrived.sort();
    assert_eq!(arrived, ["carol queued this in the group", "queued before the upgrade"]);
    // ... and the conversations go on both ways.
    fumi_ok(&alice, &["send", &bob_name, "after the upgrade"]);
    let mut arrived = texts(&receive_json(&bob));
    arrived.sort();
    assert_eq!(arrived, ["after the upgrade", "carol queued this in the group"]);
    fumi_ok(&bob, &["send", &alice_name, "still here"]);
    fumi_ok(&carol, &["send", "--group", "oldies", "the group after the upgrade"]);
    let mut arrived = texts(&receive_json(&alice));
    arrived.sort();
    assert_eq!(arrived, ["still here", "the group after the upgrade"]);
    assert!(fumi_ok(&carol, &["history", "oldies"]).contains("the group before the upgrade"));
}
