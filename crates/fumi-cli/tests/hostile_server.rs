//! A hostile operator: the server's database is edited under the running server to replay,
//! truncate, forge and reorder what it delivers, and to hand out another account's KeyPackages.
//! The client refuses each with a warning or a clear error, shows nothing false or twice, and
//! the next honest session works.

mod common;

use common::{Server, User, credentials};
use fumi_proto::DeviceId;
use rusqlite::{Connection, params};

fn database(server: &Server) -> Connection {
    let db = Connection::open(server.database()).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    db
}

/// Message bodies queued for a device, in delivery order.
fn queued(server: &Server, device: DeviceId) -> Vec<(i64, Vec<u8>)> {
    let db = database(server);
    let mut stmt = db
        .prepare("SELECT m.seq, b.body FROM mailbox m JOIN messages b ON b.id = m.message_id WHERE m.device_id = ? ORDER BY m.seq")
        .unwrap();
    stmt.query_map([device.as_bytes().as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Queues `body` for `device` as if a sender had submitted it.
fn inject(server: &Server, device: DeviceId, body: &[u8]) {
    let db = database(server);
    db.execute(
        "INSERT INTO messages (body, received_at, expires_at) VALUES (?, 0, 9999999999999)",
        [body],
    )
    .unwrap();
    let id = db.last_insert_rowid();
    db.execute(
        "INSERT INTO mailbox (device_id, message_id) VALUES (?, ?)",
        params![device.as_bytes().as_slice(), id],
    )
    .unwrap();
}

fn receive(user: &User) -> (Vec<String>, String) {
    let output = user.run(&["receive", "--json"]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let texts = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m["event"] == false)
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    (texts, stderr)
}

#[test]
fn replayed_truncated_forged_and_reordered_envelopes() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let (bob_device, _) = credentials(&bob);
    alice.ok(&["send", &bob.username, "first"]);
    let (_, first) = queued(&server, bob_device).pop().expect("queued for bob");
    assert_eq!(receive(&bob).0, vec!["first"]);

    for (what, body) in [
        ("a replayed message", first.clone()),
        ("a truncated message", first[..first.len() / 2].to_vec()),
        ("a message with one bit flipped", {
            let mut flipped = first.clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 1;
            flipped
        }),
        ("garbage", b"not an MLS message at all".to_vec()),
        ("an empty envelope", vec![]),
    ] {
        inject(&server, bob_device, &body);
        let (texts, stderr) = receive(&bob);
        assert!(texts.is_empty(), "{what} was shown: {texts:?}");
        assert!(stderr.contains("dropped a message"), "{what}: no warning: {stderr}");
    }

    // Reordered: the later message delivered first. Both arrive, each once.
    alice.ok(&["send", &bob.username, "second"]);
    alice.ok(&["send", &bob.username, "third"]);
    let rows = queued(&server, bob_device);
    let (a, b) = (rows[rows.len() - 2].0, rows[rows.len() - 1].0);
    let db = database(&server);
    db.execute_batch(&format!(
        "UPDATE mailbox SET seq = -1 WHERE seq = {a}; UPDATE mailbox SET seq = {a} WHERE seq = {b}; UPDATE mailbox SET seq = {b} WHERE seq = -1;"
    ))
    .unwrap();
    drop(db);
    let (mut texts, _) = receive(&bob);
    texts.sort();
    assert_eq!(texts, vec!["second", "third"]);

    // The next honest session works both ways, and history holds each message once.
    alice.ok(&["send", &bob.username, "honest"]);
    assert_eq!(receive(&bob).0, vec!["honest"]);
    bob.ok(&["send", &alice.username, "reply"]);
    assert!(alice.receive_texts().contains(&"reply".to_owned()));
    let history = bob.ok(&["history", &alice.username]);
    for text in ["first", "second", "third", "honest"] {
        assert_eq!(history.matches(&format!("] {text}\n")).count(), 1, "{history}");
    }
}

#[test]
fn another_accounts_key_packages_are_refused() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    let (bob_device, _) = credentials(&bob);
    let (carol_device, _) = credentials(&carol);
    // The operator hands out Carol's KeyPackages as Bob's.
    let db = database(&server);
    db.execute(
        "DELETE FROM key_packages WHERE device_id = ?",
        [bob_device.as_bytes().as_slice()],
    )
    .unwrap();
    db.execute(
        "UPDATE key_packages SET device_id = ? WHERE device_id = ?",
        [bob_device.as_bytes().as_slice(), carol_device.as_bytes().as_slice()],
    )
    .unwrap();
    drop(db);
    let output = alice.run(&["send", &bob.username, "for bob only"]);
    assert!(
        !output.status.success(),
        "a conversation was opened with substituted keys"
    );
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(!error.is_empty() && !error.contains("panicked"), "{error}");
    assert!(alice.ok(&["conversations"]).trim().is_empty(), "nothing was created");
    assert!(bob.receive_texts().is_empty());
    assert!(
        carol.receive_texts().is_empty(),
        "Carol's device received nothing meant for Bob"
    );
    eprintln!("alice was told: {error}");
}

#[test]
fn a_stale_key_package_is_refused_by_its_owner() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    let (bob_device, _) = credentials(&bob);
    // The KeyPackage the next claim for Bob will take, kept by the operator.
    let stale: Vec<u8> = database(&server)
        .query_row(
            "SELECT key_package FROM key_packages WHERE device_id = ? AND last_resort = 0 ORDER BY id LIMIT 1",
            [bob_device.as_bytes().as_slice()],
            |r| r.get(0),
        )
        .unwrap();
    alice.ok(&["send", &bob.username, "hello bob"]);
    assert_eq!(receive(&bob).0, vec!["hello bob"]);
    // Served again, first in line: Carol's conversation with Bob starts on a used KeyPackage.
    database(&server)
        .execute(
            "INSERT INTO key_packages (id, device_id, key_package, last_resort) VALUES (0, ?, ?, 0)",
            params![bob_device.as_bytes().as_slice(), stale],
        )
        .unwrap();
    carol.ok(&["send", &bob.username, "from carol"]);
    let (texts, stderr) = receive(&bob);
    assert!(texts.is_empty(), "{texts:?}");
    assert!(stderr.contains("dropped a message"), "Bob is told: {stderr}");
    // Bob's store is consistent: his other conversation works both ways.
    alice.ok(&["send", &bob.username, "still here"]);
    assert_eq!(receive(&bob).0, vec!["still here"]);
    bob.ok(&["send", &alice.username, "yes"]);
    assert!(alice.receive_texts().contains(&"yes".to_owned()));
}
