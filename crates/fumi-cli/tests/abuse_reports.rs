//! Abuse reports with message franking, end to end: a recipient reports a message, the server
//! stores only a sealed report, and the moderator's `fumi admin report` verifies that the named
//! sender really sent that text, rejecting reports whose content or sender was altered.

mod common;

use std::process::Output;

use common::{Server, User, account_of, run};
use serde_json::Value;

fn printed_key(output: &Output) -> String {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .expect("public key printed")
        .to_owned()
}

struct Moderation {
    keys: tempfile::TempDir,
    server: Server,
}

impl Moderation {
    fn start() -> Self {
        let keys = tempfile::tempdir().unwrap();
        let path = |name: &str| keys.path().join(name).to_str().unwrap().to_owned();
        let moderation = printed_key(&run(&["admin", "moderation-keygen", "--out", &path("moderation.key")]));
        let operator = printed_key(&run(&["admin", "keygen", "--out", &path("sato.key")]));
        let server = Server::start_with_config(&format!(
            r#"
moderation_public_key = "{moderation}"

[[operators]]
name = "sato"
public_key = "{operator}"
jurisdiction = "jp"
networks = ["127.0.0.0/8"]
"#
        ));
        Self { keys, server }
    }

    /// `fumi admin report ID --json` as the moderator.
    fn review(&self, id: u64) -> (bool, Value, String) {
        let key = |name: &str| self.keys.path().join(name).to_str().unwrap().to_owned();
        let output = run(&[
            "admin",
            "--server",
            &self.server.admin_url,
            "--operator",
            "sato",
            "--key",
            &key("sato.key"),
            "--reason",
            "ABUSE-1",
            "report",
            &id.to_string(),
            "--moderation-key",
            &key("moderation.key"),
            "--json",
        ]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
        (
            output.status.success(),
            report,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// Files a report of `message` as `user`; returns the report's number.
fn report(user: &User, message: &str, comment: &str) -> u64 {
    let out = user.ok(&["report", message, "--comment", comment]);
    out.split_whitespace()
        .find_map(|w| w.trim_end_matches(';').parse().ok())
        .unwrap_or_else(|| panic!("no report number in {out:?}"))
}

/// Rewrites the franking evidence Bob's device keeps for his received messages.
fn tamper_with_evidence(user: &User, edit: impl Fn(&mut Value)) {
    let db = rusqlite::Connection::open(user.home.path().join("fumi.db")).unwrap();
    let rows: Vec<(i64, String)> = db
        .prepare("SELECT message_rowid, evidence FROM franking_evidence")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (rowid, json) in rows {
        let mut evidence: Value = serde_json::from_str(&json).unwrap();
        edit(&mut evidence);
        db.execute(
            "UPDATE franking_evidence SET evidence = ? WHERE message_rowid = ?",
            rusqlite::params![evidence.to_string(), rowid],
        )
        .unwrap();
    }
}

#[test]
fn a_reported_message_is_verified_and_altered_reports_are_rejected() {
    let moderation = Moderation::start();
    let server = &moderation.server;
    let alice = User::register(server, "alice", "Alice");
    let bob = User::register(server, "bob", "Bob");
    let threat = "MARKER-threat-5be1 you will regret this";
    alice.ok(&["send", &bob.username, threat]);
    assert_eq!(bob.receive_texts(), vec![threat.to_owned()]);
    let history: Vec<Value> = bob
        .ok(&["history", &alice.username, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let message = history.iter().find(|m| m["text"] == threat).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Alice cannot report her own message; nobody can report a message they do not have.
    let own = alice.run(&["report", &message]);
    assert!(!own.status.success());
    assert!(String::from_utf8_lossy(&own.stderr).contains("only messages others sent you"));

    let comment = "MARKER-comment-91d0 threatening me";
    let first = report(&bob, &message, comment);
    let (ok, reviewed, stderr) = moderation.review(first);
    assert!(ok, "{stderr}");
    assert_eq!(reviewed["verdict"]["verified"], true);
    assert_eq!(reviewed["sender"], account_of(&alice));
    assert_eq!(reviewed["content"]["text"], threat);
    assert_eq!(reviewed["reporter"], account_of(&bob));
    assert_eq!(reviewed["comment"], comment);

    // The server stored and logged only sealed bytes: neither the text nor the comment appears.
    server.assert_never_wrote(&["MARKER-threat-5be1", "MARKER-comment-91d0"]);

    // Bob alters the text he reports: the commitment no longer opens.
    tamper_with_evidence(&bob, |e| e["content"]["text"] = "MARKER-altered I will hurt you".into());
    let altered = report(&bob, &message, "altered");
    let (ok, reviewed, stderr) = moderation.review(altered);
    assert!(!ok, "an altered report was accepted");
    assert_eq!(reviewed["verdict"]["verified"], false);
    assert!(
        stderr.contains("REPORT REJECTED") && stderr.contains("commitment"),
        "{stderr}"
    );

    // Bob frames Carol: he claims the message came from another account.
    let carol = User::register(server, "carol", "Carol");
    tamper_with_evidence(&bob, |e| {
        e["content"]["text"] = threat.into();
        e["context"]["sender"] = account_of(&carol).into();
    });
    let framed = report(&bob, &message, "framed");
    let (ok, _, stderr) = moderation.review(framed);
    assert!(!ok, "a report naming another sender was accepted");
    assert!(stderr.contains("credential"), "{stderr}");

    // Every moderator read is in the public log: three report reads, and one read of Alice's
    // public keys (made only for the report whose proof verified).
    let size = server.get_json("/v1/audit/head")["tree_size"].as_u64().unwrap();
    let page = server.get_json(&format!("/v1/audit/entries?start=0&end={size}"));
    let actions: Vec<String> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let entry: Value = match e {
                Value::String(text) => serde_json::from_str(text).unwrap(),
                other => other.clone(),
            };
            entry["action"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(actions, ["read_report", "read_account", "read_report", "read_report"]);
}

#[test]
fn a_server_without_a_moderation_key_takes_no_reports() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "hello"]);
    let received = bob.receive_json();
    let id = received.iter().find(|m| m["text"] == "hello").unwrap()["id"]
        .as_str()
        .unwrap();
    let output = bob.run(&["report", id]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("takes no abuse reports"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
