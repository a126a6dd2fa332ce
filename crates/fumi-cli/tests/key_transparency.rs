//! Key transparency against a lying server: the server is told (through test-only hooks compiled
//! into the test build alone) to hand out an operator's keys or to slip a device into an
//! account, and the clients must refuse or report it; an auditor must notice a rewritten
//! directory history.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{Server, User, account_of, credentials, fumi_ok, hex_decode};
use fumi_core::{AccountIdentity, MlsDevice};
use fumi_proto::{AccountId, DeviceId};
use openmls_rust_crypto::OpenMlsRustCrypto;
use serde_json::{Value, json};

/// A device of `account` certified by `identity`, as an operator (or a thief of the identity
/// secret) would make: its KeyPackage and MLS signature key.
fn forged_device(identity: &AccountIdentity, account: AccountId, device: DeviceId) -> (Vec<u8>, Vec<u8>) {
    let provider = OpenMlsRustCrypto::default();
    let signature_key = MlsDevice::generate_signature_key(&provider).unwrap();
    let mls = MlsDevice::open(provider, identity, account, device, &signature_key).unwrap();
    let key_package = mls.key_packages(1, false).unwrap().one_time.remove(0);
    (key_package, signature_key)
}

/// The identity secret in a user's client store (what a removed device, or a thief, holds).
fn identity_of(user: &User) -> AccountIdentity {
    let db = rusqlite::Connection::open(user.home.path().join("fumi.db")).unwrap();
    let secret: Vec<u8> = db
        .query_row("SELECT identity_secret FROM account", [], |r| r.get(0))
        .unwrap();
    AccountIdentity::from_secret(&secret.try_into().unwrap())
}

fn account_id(user: &User) -> AccountId {
    AccountId::from_slice(&hex_decode(&account_of(user))).unwrap()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Has the server add a device to `user`'s account that none of its devices linked, certified
/// by the account's real identity key; `hidden` keeps it out of the key directory.
fn add_phantom_device(server: &Server, user: &User, hidden: bool) -> DeviceId {
    let phantom = DeviceId::from_bytes(rand::random());
    let (key_package, signature_key) = forged_device(&identity_of(user), account_id(user), phantom);
    hook(
        server,
        "/v1/test/phantom-device",
        json!({
            "account_id": account_of(user),
            "device_id": phantom.to_string(),
            "key_package": STANDARD.encode(&key_package),
            "signature_key": STANDARD.encode(&signature_key),
            "hidden": hidden,
        }),
    );
    phantom
}

fn hook(server: &Server, path: &str, body: Value) {
    let (status, answer) = server.post_json(path, &body);
    assert_eq!(status, 200, "{path}: {answer}");
}

#[test]
fn honest_directory_lets_everything_through_and_audits_clean() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "hello"]);
    assert_eq!(bob.receive_texts(), ["hello"]);
    // A device linked by the user is not a stranger to any of its devices.
    let laptop = tempfile::tempdir().unwrap();
    let alice_home = alice.home.path().to_str().unwrap().to_owned();
    fumi_ok(laptop.path(), &["device", "link", "--from", &alice_home]);
    bob.ok(&["send", &alice.username, "to both"]);
    assert!(fumi_ok(laptop.path(), &["receive"]).contains("to both"));
    assert!(alice.ok(&["receive"]).contains("to both"));
    for home in [alice.home.path(), laptop.path()] {
        let checked = fumi_ok(home, &["keys", "check"]);
        assert!(checked.contains("only devices you linked"), "{checked}");
    }

    let head = server.get_json("/v1/keys/head");
    let epoch = head["head"]["epoch"].as_u64().unwrap();
    assert!(
        epoch >= 2,
        "registrations, usernames and a linked device were published: {head}"
    );
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("keys-audit.json");
    let state_arg = state_file.to_str().unwrap();
    let audited = alice.ok(&["keys", "audit", "--server", &server.url, "--state", state_arg, "--json"]);
    let audited: Value = serde_json::from_str(audited.trim()).unwrap();
    assert_eq!(audited["from_epoch"], 0);
    assert!(audited["epoch"].as_u64().unwrap() >= epoch, "{audited}");
    assert_eq!(audited["log_key"], head["head"]["log_key"]);
    // More changes, then the audit continues from where it stopped.
    let carol = User::register(&server, "carol", "Carol");
    carol.ok(&["send", &alice.username, "hi"]);
    let again = alice.ok(&["keys", "audit", "--server", &server.url, "--state", state_arg, "--json"]);
    let again: Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(again["from_epoch"], audited["epoch"]);
    assert!(
        again["epoch"].as_u64().unwrap() > audited["epoch"].as_u64().unwrap(),
        "{again}"
    );
}

#[test]
fn a_substituted_identity_key_and_key_package_are_refused() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    // The operator serves its own identity key for Bob's account and a KeyPackage certified by
    // it for Bob's device: on first contact, only the key directory can tell.
    let operator = AccountIdentity::generate(&mut rand::rng());
    let (bob_device, _) = credentials(&bob);
    let (key_package, _) = forged_device(&operator, account_id(&bob), bob_device);
    hook(
        &server,
        "/v1/test/impersonate",
        json!({
            "account_id": account_of(&bob),
            "identity_key": STANDARD.encode(operator.public_key()),
            "key_packages": [[bob_device.to_string(), STANDARD.encode(&key_package)]],
        }),
    );
    let refused = alice.run(&["send", &bob.username, "for Bob only"]);
    assert!(!refused.status.success(), "a message went to the operator's key");
    let message = stderr(&refused);
    assert!(message.contains("SECURITY WARNING"), "{message}");
    assert!(message.contains("key directory"), "{message}");
    assert!(message.contains("identity key"), "{message}");
    // Nothing reached Bob's mailbox, and the operator's key was not pinned: with the server
    // honest again, Alice reaches the real Bob.
    assert!(bob.receive_texts().is_empty());
    // The hooks live in the server's memory: restarted, it is honest again.
    server.stop();
    server.restart();
    alice.ok(&["send", &bob.username, "for Bob only"]);
    assert_eq!(bob.receive_texts(), ["for Bob only"]);
}

#[test]
fn a_device_the_directory_does_not_list_is_refused() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    // A phantom device on Bob's account, certified by Bob's real identity key (as a removed
    // device or a thief of the secret could make), served to others but kept out of the
    // directory so Bob would never see it there.
    let phantom = add_phantom_device(&server, &bob, true);
    let refused = alice.run(&["send", &bob.username, "secret"]);
    assert!(
        !refused.status.success(),
        "a message was encrypted to the phantom device"
    );
    let message = stderr(&refused);
    assert!(message.contains("SECURITY WARNING"), "{message}");
    assert!(
        message.contains(&format!("device {phantom} is not one of the account's devices")),
        "{message}"
    );
    assert!(bob.receive_texts().is_empty());
}

#[test]
fn a_device_added_behind_the_owners_back_is_reported_and_never_added() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "before"]);
    assert_eq!(bob.receive_texts(), ["before"]);
    assert!(bob.ok(&["keys", "check"]).contains("only devices you linked"));
    // The operator adds a device to Bob's account and, not to be caught by senders, lets the
    // directory publish it: Bob's own devices must notice.
    let phantom = add_phantom_device(&server, &bob, false);
    hook(&server, "/v1/test/keys/publish", json!({}));
    let check = bob.run(&["keys", "check"]);
    assert!(!check.status.success(), "the phantom device went unnoticed");
    let warning = stderr(&check);
    assert!(warning.contains("SECURITY WARNING"), "{warning}");
    assert!(warning.contains(&phantom.to_string()), "{warning}");
    assert!(warning.contains("none of your devices linked"), "{warning}");
    let devices = bob.ok(&["device", "list"]);
    let phantom_line = devices.lines().find(|l| l.starts_with(&phantom.to_string())).unwrap();
    assert!(phantom_line.contains("NOT LINKED BY ANY OF YOUR DEVICES"), "{devices}");
    // `receive` reports it too, and Bob's device does not bring the phantom into his
    // conversations (its mailbox stays empty).
    let lines = bob.receive_json();
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "key_warning" && l["message"].as_str().unwrap().contains(&phantom.to_string())),
        "{lines:?}"
    );
    alice.ok(&["send", &bob.username, "after"]);
    assert_eq!(bob.receive_texts(), ["after"]);
    assert_eq!(
        server.count(
            "SELECT COUNT(*) FROM mailbox WHERE device_id = {0}",
            &[phantom.as_bytes()]
        ),
        0,
        "Bob's own device added the phantom to a conversation"
    );
}

#[test]
fn a_rewritten_directory_history_is_detected() {
    // Epochs only when the test asks, so that epoch numbers are known.
    let mut server = Server::start_with_env(&[("FUMI_KEY_DIRECTORY_EPOCH_MS", "3600000")]);
    let publish = |server: &Server| hook(server, "/v1/test/keys/publish", json!({}));
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    publish(&server);
    alice.ok(&["send", &bob.username, "hello"]);
    // The operator slips a device into Bob's account; the directory publishes it, and an auditor
    // and Alice's client see that epoch.
    let phantom = add_phantom_device(&server, &bob, false);
    publish(&server);
    let epoch = |server: &Server| server.get_json("/v1/keys/head")["head"]["epoch"].as_u64().unwrap();
    let seen = epoch(&server);
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("keys-audit.json");
    let state_arg = state_file.to_str().unwrap();
    alice.ok(&["keys", "audit", "--server", &server.url, "--state", state_arg]);
    alice.ok(&["keys", "check"]);

    // To erase the evidence, the operator removes the device and rebuilds the directory from
    // scratch, then lets it grow back to the epoch seen with more registrations.
    server.stop();
    for table in ["kt_nodes", "kt_states", "kt_heads"] {
        server.execute(&format!("DELETE FROM {table}"), &[]);
    }
    server.execute(
        "UPDATE devices SET removed_at = 1 WHERE id = {0}",
        &[phantom.as_bytes()],
    );
    server.execute(
        "INSERT INTO kt_pending (kind, id) SELECT 0, id FROM accounts WHERE TRUE ON CONFLICT DO NOTHING",
        &[],
    );
    server.execute(
        "INSERT INTO kt_pending (kind, id) SELECT 1, hash FROM usernames WHERE TRUE ON CONFLICT DO NOTHING",
        &[],
    );
    server.restart();
    publish(&server);
    let mut newcomers = Vec::new();
    while epoch(&server) < seen {
        newcomers.push(User::register(&server, &format!("new{}", newcomers.len()), "Newcomer"));
        publish(&server);
    }
    assert_eq!(epoch(&server), seen, "the rebuilt directory is back at the epoch seen");

    let audit = alice.run(&["keys", "audit", "--server", &server.url, "--state", state_arg]);
    assert!(!audit.status.success(), "the auditor accepted a rewritten history");
    let message = stderr(&audit);
    assert!(message.contains("SECURITY WARNING"), "{message}");
    assert!(
        message.contains(&format!("two different key directories as epoch {seen}")),
        "{message}"
    );
    // Alice's client remembers the root it saw for that epoch and refuses the new one.
    let refused = alice.run(&["keys", "check"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains(&format!("two different key directories as epoch {seen}")),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn devices_from_before_the_key_directory_are_published_with_their_stored_key() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    // A database from before the directory: the device's signature key was never recorded (the
    // migration marks every account for the first epoch).
    server.stop();
    server.execute("UPDATE devices SET signature_key = NULL", &[]);
    server.restart();
    alice.ok(&["send", &bob.username, "still reachable"]);
    assert_eq!(bob.receive_texts(), ["still reachable"]);
    assert!(bob.ok(&["keys", "check"]).contains("only devices you linked"));
    assert_eq!(
        server.count("SELECT COUNT(*) FROM devices WHERE signature_key IS NULL", &[]),
        0
    );
}

#[test]
fn the_owner_notices_a_removed_device_put_back_and_a_swapped_signing_key() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let laptop = tempfile::tempdir().unwrap();
    let alice_home = alice.home.path().to_str().unwrap().to_owned();
    fumi_ok(laptop.path(), &["device", "link", "--from", &alice_home]);
    let laptop_device = credentials(&User {
        home: laptop,
        username: String::new(),
    })
    .0;
    alice.ok(&["device", "remove", &laptop_device.to_string()]);
    hook(&server, "/v1/test/keys/publish", json!({}));
    assert!(alice.ok(&["keys", "check"]).contains("only devices you linked"));

    // The operator lists the removed laptop again (it still holds the identity secret). The
    // owner knows it was put back once the history shows it dropped and listed again, or, if
    // the laptop was removed before it was ever published, once the removal's grace (two
    // epochs and 2 s) is over: checked until then, with a deadline.
    server.execute(
        "UPDATE devices SET removed_at = NULL WHERE id = {0}",
        &[laptop_device.as_bytes()],
    );
    hook(&server, "/v1/test/keys/publish", json!({}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let check = loop {
        let check = alice.run(&["keys", "check"]);
        if !check.status.success() {
            break check;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the re-listed laptop was never reported"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let warning = stderr(&check);
    assert!(
        warning.contains(&format!("lists device {laptop_device} again")),
        "{warning}"
    );
    server.execute(
        "UPDATE devices SET removed_at = 1 WHERE id = {0}",
        &[laptop_device.as_bytes()],
    );

    // The operator (with a stolen identity secret) swaps the signing key of Alice's own device.
    let (phone, _) = credentials(&alice);
    server.execute(
        "UPDATE devices SET signature_key = {0} WHERE id = {1}",
        &[&[7u8; 32], phone.as_bytes()],
    );
    hook(&server, "/v1/test/keys/publish", json!({}));
    let check = alice.run(&["keys", "check"]);
    assert!(!check.status.success());
    let warning = stderr(&check);
    assert!(
        warning.contains(&format!(
            "your device {phone} is listed with a signing key that is not its own"
        )),
        "{warning}"
    );
}

#[test]
fn a_server_naming_its_own_device_as_the_linked_one_is_refused() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    // The operator (holding a stolen identity secret) has a device of its own on Alice's account,
    // and names it as the device that used Alice's next link.
    let phantom = add_phantom_device(&server, &alice, false);
    hook(&server, "/v1/test/keys/publish", json!({}));
    hook(
        &server,
        "/v1/test/link-status",
        json!({"device_id": phantom.to_string()}),
    );
    let laptop = tempfile::tempdir().unwrap();
    let alice_home = alice.home.path().to_str().unwrap().to_owned();
    let linked = common::fumi(laptop.path(), &["device", "link", "--from", &alice_home]);
    assert!(
        !linked.status.success(),
        "the phantom device was trusted as the linked one"
    );
    let message = stderr(&linked);
    assert!(message.contains("cannot prove it held the link code"), "{message}");
    // Alice's device did not come to trust it: her check reports it.
    let check = alice.run(&["keys", "check"]);
    assert!(
        !check.status.success(),
        "{} {}",
        String::from_utf8_lossy(&check.stdout),
        stderr(&check)
    );
    assert!(stderr(&check).contains(&phantom.to_string()), "{}", stderr(&check));
}

/// A group change brought a device that no version of its account's directory entry ever
/// listed (written here into Alice's store as an unchecked arrival, as a commit from a member
/// with a broken or hostile client would bring it; honest clients never add such a device).
/// The warning comes once, in the conversation too, and the conversation stays what it is:
/// listed, received and usable, not shown as left.
#[test]
fn a_device_never_listed_is_reported_once_and_the_group_stays() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["group", "create", "Team", &bob.username]);
    bob.ok(&["receive"]);
    let phantom = DeviceId::from_bytes(rand::random());
    {
        let db = rusqlite::Connection::open(alice.home.path().join("fumi.db")).unwrap();
        let group: Vec<u8> = db
            .query_row("SELECT group_id FROM conversations WHERE name = 'Team'", [], |r| {
                r.get(0)
            })
            .unwrap();
        let identity_key = identity_of(&bob).public_key();
        let member = [
            account_id(&bob).as_bytes().as_slice(),
            phantom.as_bytes(),
            &identity_key,
            &rand::random::<[u8; 32]>(),
        ]
        .concat();
        db.execute(
            "INSERT INTO pending_arrivals (group_id, members) VALUES (?, ?)",
            rusqlite::params![group, member],
        )
        .unwrap();
    }
    let refused = alice.run(&["receive"]);
    assert!(!refused.status.success());
    let warning = stderr(&refused);
    assert!(warning.contains("SECURITY WARNING"), "{warning}");
    assert!(warning.contains(&phantom.to_string()), "{warning}");

    let again = alice.run(&["receive"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        !stderr(&again).contains("SECURITY WARNING"),
        "said once: {}",
        stderr(&again)
    );
    let groups = alice.ok(&["group", "list"]);
    assert!(groups.starts_with("Team: "), "{groups}");
    assert!(!groups.contains("(removed)"), "{groups}");
    let history = alice.ok(&["history", "Team"]);
    assert_eq!(history.matches(&phantom.to_string()).count(), 1, "{history}");
    alice.ok(&["send", "--group", "Team", "still here"]);
    assert_eq!(bob.receive_texts(), ["still here"]);
}
