//! Nothing acknowledged is lost and nothing is delivered twice, across clean restarts and kill -9.

mod common;

use common::{Server, User};

#[test]
fn kill9_after_accepting_loses_nothing_and_duplicates_nothing() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let sent: Vec<String> = (0..5).map(|i| format!("message {i}")).collect();
    for text in &sent {
        alice.ok(&["send", &bob.username, text]); // returns once the server said OK
    }
    // The server acknowledged every message; now it dies without any chance to flush.
    server.kill9();
    server.restart();
    assert_eq!(
        bob.receive_texts(),
        sent,
        "every acknowledged message survives, in order"
    );

    // Bob acknowledged them; a crash now must not bring them back.
    server.kill9();
    server.restart();
    assert!(bob.receive_texts().is_empty(), "acknowledged envelopes stay deleted");

    // And the conversation goes on in both directions after the crashes.
    bob.ok(&["send", &alice.username, "still here"]);
    assert_eq!(alice.receive_texts(), vec!["still here"]);
}

#[test]
fn clean_restart_keeps_queued_messages() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    alice.ok(&["group", "create", "Night shift", &bob.username, &carol.username]);
    alice.ok(&["send", "--group", "Night shift", "before restart"]);
    server.stop();
    server.restart();
    alice.ok(&["send", "--group", "Night shift", "after restart"]);
    assert_eq!(bob.receive_texts(), vec!["before restart", "after restart"]);
    assert_eq!(carol.receive_texts(), vec!["before restart", "after restart"]);
}

#[test]
fn send_while_server_is_down_fails_clearly_and_sends_nothing_later() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "first"]);
    server.kill9();
    // The server is down: the user is told, and the message is not sent behind their back later.
    let failed = alice.run(&["send", &bob.username, "while down"]);
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("cannot reach"),
        "{failed:?}"
    );
    server.restart();
    alice.ok(&["receive"]);
    assert_eq!(bob.receive_texts(), vec!["first"]);
}

/// `receive --timeout` is what a person leaves running: it prints each message as it arrives,
/// and a server restart (clean or kill -9) while it listens is a pause, not the end.
#[test]
fn a_listening_receive_prints_as_messages_arrive_and_outlives_server_restarts() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "first"]);
    let mut listener = Command::new(common::FUMI)
        .args([
            "--home",
            bob.home.path().to_str().unwrap(),
            "receive",
            "--json",
            "--timeout",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(listener.stdout.take().unwrap()).lines();
    let mut next_text = || loop {
        let line = lines.next().expect("the listener ended early").unwrap();
        let message: serde_json::Value = serde_json::from_str(&line).unwrap();
        if message["event"] == false {
            return message["text"].as_str().unwrap().to_owned();
        }
    };
    // Shown while the listener still runs (it used to print only when its time was up).
    assert_eq!(next_text(), "first");
    server.stop();
    server.restart();
    alice.ok(&["send", &bob.username, "after a clean restart"]);
    assert_eq!(next_text(), "after a clean restart");
    server.kill9();
    server.restart();
    alice.ok(&["send", &bob.username, "after kill -9"]);
    assert_eq!(next_text(), "after kill -9");
    let _ = listener.kill();
    let _ = listener.wait();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut listener.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("connected to the server again"), "{stderr}");
}
