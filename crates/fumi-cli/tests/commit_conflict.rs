//! Two members commit in the same epoch: the server accepts one, the other processes the winner
//! and its change lands on the next epoch. Driven through the client library so that the loser
//! does not sync first (the CLI always does, which makes conflicts rare but not impossible).

mod common;

use common::{Server, User};
use fumi_client::FumiClient;

#[tokio::test(flavor = "current_thread")]
async fn concurrent_commits_one_wins_the_other_recovers() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    let dave = User::register(&server, "dave", "Dave");
    alice.ok(&["group", "create", "Ops", &bob.username, &carol.username]);
    bob.ok(&["receive"]); // Bob joins: Alice and Bob are now at the same epoch.

    let mut alice_client = FumiClient::open(alice.home.path()).expect("open alice");
    let mut bob_client = FumiClient::open(bob.home.path()).expect("open bob");
    // Alice wins the epoch...
    alice_client
        .add_to_group("Ops", std::slice::from_ref(&dave.username))
        .await
        .expect("alice's commit");
    // ...and Bob, who has not seen it, commits on the same epoch: refused, then retried.
    bob_client
        .remove_from_group("Ops", std::slice::from_ref(&carol.username))
        .await
        .expect("bob recovers");

    let metrics = server.metrics();
    assert!(
        metrics.contains("fumi_commit_conflicts_total 1"),
        "exactly one conflict happened:\n{metrics}"
    );
    drop((alice_client, bob_client));

    // Both changes landed, in order, for everyone.
    bob.ok(&["send", "--group", "Ops", "after both changes"]);
    assert_eq!(dave.receive_texts(), vec!["after both changes"]);
    assert!(carol.receive_texts().is_empty(), "carol was removed before the message");
    let members = alice.ok(&["receive"]);
    assert!(members.contains("after both changes"), "{members}");
    let groups = alice.ok(&["group", "list"]);
    assert!(
        groups.contains(&bob.username) && groups.contains(&dave.username),
        "{groups}"
    );
    assert!(!groups.contains(&carol.username), "{groups}");
}
