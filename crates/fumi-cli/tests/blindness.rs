//! The server never holds plaintext: after a scripted session with unique marker strings as
//! usernames, display names, group names and texts, no file the server wrote (database, WAL,
//! log at debug level) contains any of them.

mod common;

use common::{Server, User};

#[test]
fn server_files_and_logs_hold_no_plaintext() {
    let server = Server::start();
    let alice = User::register(&server, "zqmarkalice", "Zqmark Alice Displayname");
    let bob = User::register(&server, "zqmarkbob", "Zqmark Bob Displayname");
    let carol = User::register(&server, "zqmarkcarol", "Zqmark Carol Displayname");
    alice.ok(&["send", &bob.username, "zqmark-direct-text-1"]);
    bob.ok(&["receive"]);
    bob.ok(&["send", &alice.username, "zqmark-direct-text-2"]);
    alice.ok(&["group", "create", "Zqmark Group Name", &bob.username, &carol.username]);
    alice.ok(&["send", "--group", "Zqmark Group Name", "zqmark-group-text-3"]);
    carol.ok(&["profile", "set", "--name", "Zqmark Carol Renamed"]);
    carol.ok(&["send", "--group", "Zqmark Group Name", "zqmark-group-text-4"]);
    // Files and an avatar with marker bytes inside, and a marker file name: one file delivered
    // (Bob fetches it), one left waiting for Carol in the blob store.
    let file = alice.home.path().join("zqmark-file-name.txt");
    std::fs::write(&file, "zqmark-file-content ".repeat(5000)).unwrap();
    alice.ok(&[
        "send",
        &bob.username,
        "--file",
        file.to_str().unwrap(),
        "--caption",
        "zqmark-caption",
    ]);
    alice.ok(&["send", &carol.username, "--file", file.to_str().unwrap()]);
    let avatar = alice.home.path().join("avatar.png");
    std::fs::write(
        &avatar,
        [b"\x89PNG\r\n\x1a\n".as_slice(), &b"zqmark-avatar-bytes".repeat(100)].concat(),
    )
    .unwrap();
    alice.ok(&["profile", "set", "--avatar", avatar.to_str().unwrap()]);
    alice.ok(&["send", &bob.username, "zqmark-after-avatar"]);
    assert!(
        !server.blob_files().is_empty(),
        "a blob is stored while the search runs"
    );
    // A linked device receives the history (names, texts) through the server, sealed.
    let laptop = tempfile::tempdir().unwrap();
    common::fumi_ok(
        laptop.path(),
        &["device", "link", "--from", alice.home.path().to_str().unwrap()],
    );
    let copied = common::fumi_ok(laptop.path(), &["receive"]);
    assert!(copied.contains("copied from your other device"), "{copied}");
    // Leave some messages undelivered so they sit in the queue, and deliver others.
    alice.ok(&["receive"]);
    let received = bob.ok(&["receive"]);
    assert!(received.contains("zqmark-group-text-4"), "{received}");
    assert!(received.contains("[file zqmark-file-name.txt"), "{received}");
    assert!(
        bob.ok(&["contact", "list"]).contains("avatar"),
        "Bob fetched the avatar"
    );

    let markers = [
        "zqmark".to_owned(),
        "Zqmark".to_owned(),
        "ZQMARK".to_owned(),
        alice.username.clone(),
        bob.username.clone(),
        carol.username.clone(),
    ];
    let files = server.all_written_bytes();
    assert!(
        files
            .iter()
            .any(|(p, b)| (p.ends_with("fumi.db") || p.to_string_lossy().starts_with("postgres:")) && !b.is_empty()),
        "the database was searched"
    );
    assert!(
        files.iter().any(|(p, b)| p.ends_with("server.log") && !b.is_empty()),
        "the log was searched"
    );
    for (path, bytes) in &files {
        for marker in &markers {
            let found = bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
            assert!(!found, "{} contains {marker:?}", path.display());
        }
    }
}
