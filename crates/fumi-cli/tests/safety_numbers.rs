//! Safety numbers: both sides compute the same number, a confirmed contact shows as verified,
//! and a server that substitutes a verified contact's identity key is refused loudly.

mod common;

use common::{Server, User, account_of};
use serde_json::Value;

fn verify(user: &User, username: &str, extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec!["verify", username, "--json"];
    args.extend_from_slice(extra);
    let output = user.run(&args);
    let json = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (
        output.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn safety_numbers_match_and_a_substituted_key_is_refused_loudly() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "hi"]);
    assert_eq!(bob.receive_texts(), vec!["hi".to_owned()]);

    let (code, at_alice, _) = verify(&alice, &bob.username, &[]);
    assert_eq!(code, 0);
    let (_, at_bob, _) = verify(&bob, &alice.username, &[]);
    let number = at_alice["number"].as_str().unwrap().to_owned();
    assert_eq!(number.len(), 60);
    assert_eq!(at_bob["number"], number, "both sides must see the same number");
    assert_eq!(at_alice["verified"], false);

    let (_, confirmed, _) = verify(&alice, &bob.username, &["--confirm"]);
    assert_eq!(confirmed["verified"], true);
    let contacts: Vec<Value> = alice
        .ok(&["contact", "list", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let bob_contact = contacts
        .iter()
        .find(|c| c["username"] == bob.username.as_str())
        .unwrap();
    assert_eq!(bob_contact["verified"], true);

    // The server now names another identity key for Bob.
    let bob_id = common::hex_decode(&account_of(&bob));
    let real_key: Vec<u8> = {
        let db = rusqlite::Connection::open(bob.home.path().join("fumi.db")).unwrap();
        let secret: Vec<u8> = db
            .query_row("SELECT identity_secret FROM account", [], |r| r.get(0))
            .unwrap();
        fumi_core::AccountIdentity::from_secret(&secret.try_into().unwrap())
            .public_key()
            .to_vec()
    };
    let set_key = |key: &[u8]| server.execute("UPDATE accounts SET identity_key = {0} WHERE id = {1}", &[key, &bob_id]);
    set_key(&[9u8; 32]);
    let (code, changed, _) = verify(&alice, &bob.username, &[]);
    assert_eq!(code, 3, "a changed key must not look like success");
    assert_eq!(changed["changed"], true);
    assert_eq!(changed["verified"], false);
    assert_ne!(changed["number"], number);
    let warned = alice.run(&["verify", &bob.username]);
    assert!(String::from_utf8_lossy(&warned.stderr).contains("is NOT the one you knew"));
    let output = alice.run(&["group", "create", "Plans", &bob.username]);
    assert!(
        !output.status.success(),
        "a conversation with the substituted key was created"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("VERIFIED CONTACT"), "{stderr}");

    // The real key back: the pin and the verification still hold.
    set_key(&real_key);
    let (code, restored, _) = verify(&alice, &bob.username, &[]);
    assert_eq!(code, 0);
    assert_eq!(restored["number"], number);
    assert_eq!(restored["verified"], true);
}
