//! Server settings from a TOML file and environment variables, and the limits they set, each
//! refused with a clear error.

mod common;

use common::{Server, User};

#[test]
fn config_file_sets_the_message_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fumi.toml");
    std::fs::write(&config, "max_message_bytes = 4000\n").unwrap();
    let server = Server::start_with_env(&[("FUMI_CONFIG", config.to_str().unwrap())]);
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "short"]);
    let long = "x".repeat(6000);
    let refused = alice.run(&["send", &bob.username, &long]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("413 too_large") && stderr.contains("at most 4000 bytes"),
        "{stderr}"
    );
    let history = alice.ok(&["history", &bob.username]);
    assert!(!history.contains(&long), "a refused message is not shown as sent");
    assert_eq!(bob.receive_texts(), vec!["short"]);
}

/// Starts a server with this configuration file; it must refuse to start.
fn start_refused(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fumi.toml");
    std::fs::write(&config, toml).unwrap();
    let output = common::server_command(&dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success(), "the server started with {toml:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn unknown_setting_is_a_clear_startup_error() {
    let stderr = start_refused("max_mesage_bytes = 4000\n");
    assert!(stderr.contains("unknown setting \"max_mesage_bytes\""), "{stderr}");
}

#[test]
fn a_bad_operator_list_stops_the_server_at_startup() {
    let key = "11".repeat(32);
    let operator = |name: &str, network: &str| {
        format!(
            "[[operators]]\nname = \"{name}\"\npublic_key = \"{key}\"\njurisdiction = \"jp\"\nnetworks = [\"{network}\"]\n"
        )
    };
    let twice = start_refused(&(operator("sato", "127.0.0.0/8") + &operator("sato", "10.0.0.0/8")));
    assert!(twice.contains("listed twice"), "{twice}");
    let network = start_refused(&operator("sato", "localhost"));
    assert!(network.contains("not a network in CIDR form"), "{network}");
}

#[test]
fn per_device_rate_limit_from_the_environment() {
    let server = Server::start_with_env(&[("FUMI_DEVICE_REQUESTS_PER_MINUTE", "6")]);
    let alice = User::register(&server, "alice", "Alice");
    let mut refusal = None;
    for _ in 0..10 {
        let output = alice.run(&["receive"]);
        if !output.status.success() {
            refusal = Some(String::from_utf8_lossy(&output.stderr).into_owned());
            break;
        }
    }
    let refusal = refusal.expect("the limit was reached");
    assert!(refusal.contains("rate_limited") || refusal.contains("429"), "{refusal}");
}

#[test]
fn a_full_mailbox_refuses_more_with_a_clear_error_and_loses_nothing() {
    let server = Server::start_with_env(&[("FUMI_MAX_QUEUED_PER_DEVICE", "4")]);
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    // Bob stays offline; his mailbox fills.
    let mut sent = Vec::new();
    let mut refusal = None;
    for i in 0..10 {
        let text = format!("queued {i}");
        let output = alice.run(&["send", &bob.username, &text]);
        if output.status.success() {
            sent.push(text);
        } else {
            refusal = Some((text, String::from_utf8_lossy(&output.stderr).into_owned()));
            break;
        }
    }
    let (refused, error) = refusal.expect("the mailbox filled up");
    assert!(
        error.contains("mailbox_full") && error.contains("comes online"),
        "{error}"
    );
    assert!(!sent.is_empty());
    let history = alice.ok(&["history", &bob.username]);
    assert!(
        !history.contains(&refused),
        "a refused message is not shown as sent: {history}"
    );
    // Everything accepted arrives; afterwards there is room again.
    assert_eq!(bob.receive_texts(), sent);
    alice.ok(&["send", &bob.username, "room again"]);
    assert_eq!(bob.receive_texts(), vec!["room again"]);
}

#[test]
fn an_account_has_a_bounded_number_of_devices() {
    let server = Server::start_with_env(&[("FUMI_MAX_DEVICES_PER_ACCOUNT", "2")]);
    let alice = User::register(&server, "alice", "Alice");
    let from = alice.home.path().to_str().unwrap().to_owned();
    let laptop = tempfile::tempdir().unwrap();
    common::fumi_ok(laptop.path(), &["device", "link", "--from", &from]);
    let tablet = tempfile::tempdir().unwrap();
    let output = common::fumi(tablet.path(), &["device", "link", "--from", &from]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("too_many_devices") && error.contains("remove one first"),
        "{error}"
    );
    assert!(!tablet.path().join("fumi.db").exists(), "nothing half-made is left");
    assert_eq!(alice.ok(&["device", "list"]).lines().count(), 2);
}

#[test]
fn slow_and_idle_connections_are_closed() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let server = Server::start_with_env(&[("FUMI_HEADER_READ_TIMEOUT_SECS", "1")]);
    let address = server.url.trim_start_matches("http://").to_owned();
    // The server ends the connection (end of stream), rather than our generous read timeout
    // giving up on a connection it keeps open.
    let closed_by_server = |stream: &mut std::net::TcpStream| {
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut rest = Vec::new();
        let outcome = stream.read_to_end(&mut rest);
        (outcome.is_ok(), String::from_utf8_lossy(&rest).into_owned())
    };

    // Slowloris: headers that never end.
    let mut slow = std::net::TcpStream::connect(&address).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: fumi\r\nX-Slow: ")
        .unwrap();
    let (closed, _) = closed_by_server(&mut slow);
    assert!(closed, "the server held a never-ending header");

    // An idle kept-alive connection after one request.
    let mut idle = std::net::TcpStream::connect(&address).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: fumi\r\n\r\n").unwrap();
    let (closed, answer) = closed_by_server(&mut idle);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed, "the server kept an idle connection open");

    // Normal clients are unaffected.
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "still fine"]);
    assert_eq!(bob.receive_texts(), vec!["still fine"]);
}

#[test]
fn registrations_and_link_opens_are_limited_per_address() {
    let server = Server::start_with_env(&[("FUMI_REGISTRATIONS_PER_MINUTE", "3")]);
    let mut refusal = None;
    for i in 0..6 {
        let home = tempfile::tempdir().unwrap();
        let output = common::fumi(
            home.path(),
            &[
                "register",
                "--server",
                &server.url,
                "--name",
                "N",
                "--username",
                &format!("user{i}"),
            ],
        );
        if !output.status.success() {
            refusal = Some((i, String::from_utf8_lossy(&output.stderr).into_owned()));
            break;
        }
    }
    let (at, error) = refusal.expect("the address limit was reached");
    assert_eq!(at, 3, "three registrations pass, the fourth is refused: {error}");
    assert!(error.contains("rate_limited"), "{error}");
    // Opening a device link (no credentials either) draws on the same budget.
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let code = format!(
        "fumi://link/{}/{}",
        URL_SAFE_NO_PAD.encode(&server.url),
        URL_SAFE_NO_PAD.encode([0u8; 64])
    );
    let home = tempfile::tempdir().unwrap();
    let output = common::fumi(home.path(), &["device", "link", &code]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("rate_limited"), "{error}");
}

/// What the server writes is its own user's only (a copy of the data directory is the threat
/// Fumi answers), also after an older version left it open; its log carries no colour codes
/// when it goes to a file, and no akd jargon.
#[test]
fn the_data_directory_is_private_and_the_log_plain() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let mut server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let file = alice.home.path().join("note.txt");
    std::fs::write(&file, "a file").unwrap();
    alice.ok(&["send", &bob.username, "--file", file.to_str().unwrap()]);
    let data = server.data_dir();
    assert_eq!(mode(&data), 0o700);
    let mut files = 0;
    for entry in walk(&data) {
        let expected = if entry.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&entry), expected, "{}", entry.display());
        files += 1;
    }
    // The log key and a blob at least; on SQLite also the database and its WAL.
    assert!(files >= if server.is_postgres() { 2 } else { 4 }, "{files} files");

    server.stop();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut loosened = vec![data.join("audit-log.key")];
    if !server.is_postgres() {
        loosened.push(server.database());
    }
    for file in &loosened {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    server.restart();
    assert_eq!(mode(&data), 0o700);
    for file in &loosened {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }

    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(log.contains("key directory epoch published"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    assert!(!log.contains("aZKS"), "{log}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}
