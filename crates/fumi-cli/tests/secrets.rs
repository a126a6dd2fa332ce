//! Secrets hygiene: no key or credential of a session appears in the server's debug log or in
//! the clients' trace-level logs and error output, and the client keeps its files private.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::{FUMI, Server, User};

/// Runs a client command with trace logging; returns stdout, appends stderr to `log`.
fn traced(home: &Path, args: &[&str], log: &mut Vec<u8>) -> String {
    let output = Command::new(FUMI)
        .arg("--home")
        .arg(home)
        .args(args)
        .env("FUMI_LOG", "trace")
        .output()
        .unwrap();
    log.extend_from_slice(&output.stderr);
    assert!(
        output.status.success(),
        "fumi {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The secrets a client store holds.
fn secrets_of(home: &Path) -> Vec<(String, Vec<u8>)> {
    let db = rusqlite::Connection::open(home.join("fumi.db")).unwrap();
    let (device_secret, identity_secret, profile_key, signature_key): (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) = db
        .query_row(
            "SELECT device_secret, identity_secret, profile_key, signature_key FROM account",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    vec![
        ("device secret".into(), device_secret),
        ("identity secret".into(), identity_secret),
        ("profile key".into(), profile_key),
        ("MLS signature key".into(), signature_key),
    ]
}

fn encodings(secret: &[u8]) -> Vec<String> {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        hex.clone(),
        hex.to_uppercase(),
        STANDARD.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
        format!("{secret:?}"),
    ]
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn no_secret_reaches_a_log_and_client_files_are_private() {
    let server = Server::start_with_env(&[("FUMI_LOG", "trace")]);
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let laptop_dir = tempfile::tempdir().unwrap();
    // A home the client creates itself.
    let laptop = laptop_dir.path().join("fumi-home");
    let mut client_log = Vec::new();

    traced(
        &laptop,
        &["device", "link", "--from", alice.home.path().to_str().unwrap()],
        &mut client_log,
    );
    let invite = traced(alice.home.path(), &["invite"], &mut client_log)
        .trim()
        .to_owned();
    traced(bob.home.path(), &["contact", "add", &invite], &mut client_log);
    let file = alice.home.path().join("report.pdf");
    std::fs::write(&file, vec![7u8; 200_000]).unwrap();
    let avatar = alice.home.path().join("me.png");
    std::fs::write(&avatar, [b"\x89PNG\r\n\x1a\n".as_slice(), &[1u8; 100]].concat()).unwrap();
    traced(
        alice.home.path(),
        &["profile", "set", "--avatar", avatar.to_str().unwrap()],
        &mut client_log,
    );
    traced(
        alice.home.path(),
        &["send", &bob.username, "--file", file.to_str().unwrap()],
        &mut client_log,
    );
    let received = traced(bob.home.path(), &["receive"], &mut client_log);
    traced(&laptop, &["receive"], &mut client_log);
    // An error path too: a refused command prints its error, which must not carry secrets.
    let refused = Command::new(FUMI)
        .arg("--home")
        .arg(bob.home.path())
        .args(["contact", "add", &invite])
        .env("FUMI_LOG", "trace")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    client_log.extend_from_slice(&refused.stderr);
    assert!(
        client_log.len() > 10_000,
        "trace logging ran ({} bytes)",
        client_log.len()
    );

    let mut secrets = Vec::new();
    for (who, home) in [
        ("alice", alice.home.path()),
        ("bob", bob.home.path()),
        ("laptop", laptop.as_path()),
    ] {
        for (name, secret) in secrets_of(home) {
            secrets.push((format!("{who}'s {name}"), secret));
        }
    }
    let payload = URL_SAFE_NO_PAD.decode(invite.rsplit('/').next().unwrap()).unwrap();
    secrets.push(("the invite token".into(), payload[16..48].to_vec()));

    let server_log = std::fs::read(server.log_path()).unwrap();
    for (source, log) in [("server log", &server_log), ("client logs", &client_log)] {
        for (name, secret) in &secrets {
            for encoded in encodings(secret) {
                let found = log.windows(encoded.len()).any(|w| w == encoded.as_bytes());
                assert!(!found, "{source} contain {name} ({encoded})");
            }
        }
    }

    // The client's directory, store, received files and avatars are the user's alone.
    let saved = common::saved_path(&received, "report.pdf");
    assert_eq!(mode(&laptop), 0o700, "a home the client creates is private");
    assert_eq!(mode(&laptop.join("fumi.db")), 0o600);
    assert_eq!(mode(&bob.home.path().join("fumi.db")), 0o600);
    assert_eq!(mode(&bob.home.path().join("files")), 0o700);
    assert_eq!(mode(&saved), 0o600);
    assert_eq!(mode(&bob.home.path().join("tmp")), 0o700);
    assert_eq!(mode(&alice.home.path().join("avatar")), 0o600);
    let avatars = bob.home.path().join("avatars");
    assert_eq!(mode(&avatars), 0o700);
    for entry in std::fs::read_dir(&avatars).unwrap() {
        assert_eq!(mode(&entry.unwrap().path()), 0o600);
    }
}
