//! The transparency log of operator accesses and the admin API, end to end: real servers, the
//! `fumi admin` and `fumi audit` commands, and the server's database edited behind its back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Server, User, account_of, run, run_ok, snapshot};
use fumi_client::admin::AdminClient;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Operator keys in a directory, and a server configured with them.
struct Operators {
    dir: tempfile::TempDir,
}

impl Operators {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Creates a key with `fumi admin keygen`; returns its public key.
    fn keygen(&self, name: &str) -> String {
        let out = run_ok(&["admin", "keygen", "--out", self.key(name).to_str().unwrap()]);
        out.lines()
            .find_map(|l| l.strip_prefix("public key: "))
            .expect("public key printed")
            .to_owned()
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }
}

/// A server with three operators: `tanaka` (jp, loopback), `contractor` (a jurisdiction the
/// policy does not allow) and `remote` (allowed jurisdiction, but only from 10.0.0.0/8).
fn server_with_operators(operators: &Operators) -> Server {
    let config = format!(
        r#"
admin_jurisdictions = ["jp"]

[[operators]]
name = "tanaka"
public_key = "{}"
jurisdiction = "jp"
networks = ["127.0.0.0/8"]

[[operators]]
name = "contractor"
public_key = "{}"
jurisdiction = "cn"
networks = ["127.0.0.0/8"]

[[operators]]
name = "remote"
public_key = "{}"
jurisdiction = "jp"
networks = ["10.0.0.0/8"]
"#,
        operators.keygen("tanaka"),
        operators.keygen("contractor"),
        operators.keygen("remote"),
    );
    Server::start_with_config(&config)
}

/// `fumi admin` as `operator`.
fn admin(server: &Server, operators: &Operators, operator: &str, args: &[&str]) -> Output {
    let key = operators.key(operator);
    let mut full = vec![
        "admin",
        "--server",
        &server.admin_url,
        "--operator",
        operator,
        "--key",
        key.to_str().unwrap(),
        "--reason",
        "TICKET-42",
    ];
    full.extend_from_slice(args);
    run(&full)
}

fn admin_ok(server: &Server, operators: &Operators, operator: &str, args: &[&str]) -> String {
    let output = admin(server, operators, operator, args);
    assert!(
        output.status.success(),
        "fumi admin {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The stored log entries as the public endpoint serves them (the stored bytes, as text).
fn stored_texts(server: &Server) -> Vec<String> {
    let size = server.get_json("/v1/audit/head")["tree_size"].as_u64().unwrap();
    if size == 0 {
        return vec![];
    }
    let page = server.get_json(&format!("/v1/audit/entries?start=0&end={size}"));
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect()
}

/// The stored log entries, parsed.
fn stored_entries(server: &Server) -> Vec<Value> {
    stored_texts(server)
        .iter()
        .map(|text| serde_json::from_str(text).unwrap())
        .collect()
}

fn verify(server: &Server, state: &Path) -> Output {
    run(&[
        "audit",
        "verify",
        "--server",
        &server.url,
        "--state",
        state.to_str().unwrap(),
        "--json",
    ])
}

fn verify_ok(server: &Server, state: &Path) -> Value {
    let output = verify(server, state);
    assert!(
        output.status.success(),
        "audit verify failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn verify_fails(server: &Server, state: &Path, expected: &str) {
    let output = verify(server, state);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "verification passed on a tampered log");
    assert!(
        stderr.contains("LOG VERIFICATION FAILED") && stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn every_admin_route_writes_exactly_one_entry_before_acting() {
    let operators = Operators::new();
    let server = server_with_operators(&operators);
    let alice = User::register(&server, "alice", "Alice");
    let alice_account = account_of(&alice);
    let bob = User::register(&server, "bob", "Bob");
    let bob_account = account_of(&bob);
    let secret = std::fs::read_to_string(operators.key("tanaka")).unwrap();
    let client = AdminClient::new(&server.admin_url, "tanaka", &secret, "TICKET-7").unwrap();
    let runtime = runtime();

    for endpoint in fumi_server::admin::endpoints() {
        // A new admin route must be added here, or this test fails.
        let path = match endpoint.path {
            "/admin/v1/accounts" | "/admin/v1/reports" | "/admin/v1/metrics" => endpoint.path.to_owned(),
            "/admin/v1/accounts/{account}/suspend" | "/admin/v1/accounts/{account}/unsuspend" => {
                endpoint.path.replace("{account}", &alice_account)
            }
            "/admin/v1/accounts/{account}" => endpoint.path.replace("{account}", &bob_account),
            "/admin/v1/reports/{report}" => endpoint.path.replace("{report}", "1"),
            "/admin/v1/blobs/{blob}" => endpoint.path.replace("{blob}", &"ab".repeat(16)),
            // Without a body: refused as malformed (400), and logged.
            "/admin/v1/accounts/{account}/relocate" => endpoint.path.replace("{account}", &"cd".repeat(16)),
            other => panic!("admin route {other} is not covered by this test: add it"),
        };
        let before = stored_entries(&server).len();
        let method = Method::from_bytes(endpoint.method.as_bytes()).unwrap();
        let result = runtime.block_on(client.text(method, &path));
        if let Err(error) = &result {
            // Routes naming something that does not exist answer 404, and still log the call.
            let expected = if endpoint.action == "relocate_account" {
                "400"
            } else {
                "404"
            };
            assert!(
                error.to_string().contains(expected),
                "{} {path}: {error}",
                endpoint.method
            );
        }
        let entries = stored_entries(&server);
        assert_eq!(
            entries.len(),
            before + 1,
            "{} {path} must log exactly one entry",
            endpoint.method
        );
        let entry = &entries[before];
        assert_eq!(entry["action"], endpoint.action);
        assert_eq!(entry["operator"], "tanaka");
        assert_eq!(entry["jurisdiction"], "jp");
        assert_eq!(entry["reason"], "TICKET-7");
        assert_eq!(entry["outcome"], "allowed");
    }

    // The public log names no account: neither id appears anywhere in it.
    let log_text: String = stored_entries(&server).iter().map(|e| e.to_string()).collect();
    assert!(!log_text.contains(&alice_account) && !log_text.contains(&bob_account));
    // Bob was purged: his device is refused, Alice (suspended then unsuspended) works.
    let refused = bob.run(&["receive"]);
    assert!(!refused.status.success());
    alice.ok(&["receive"]);

    // Write-ahead: when the log cannot be appended to, the operation fails and changes nothing.
    let (block, unblock) = if server.is_postgres() {
        (
            "CREATE FUNCTION block_audit() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$ \
             LANGUAGE plpgsql; CREATE TRIGGER block_audit BEFORE INSERT ON audit_log FOR EACH ROW \
             EXECUTE FUNCTION block_audit();",
            "DROP TRIGGER block_audit ON audit_log; DROP FUNCTION block_audit();",
        )
    } else {
        (
            "CREATE TRIGGER block_audit BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
            "DROP TRIGGER block_audit;",
        )
    };
    server.execute(block, &[]);
    let output = admin(&server, &operators, "tanaka", &["suspend", &alice_account]);
    assert!(!output.status.success(), "an unlogged suspension went through");
    alice.ok(&["receive"]);
    let refused_read = admin(&server, &operators, "tanaka", &["accounts"]);
    assert!(!refused_read.status.success(), "an unlogged read returned data");
    assert!(refused_read.stdout.is_empty());
    server.execute(unblock, &[]);

    let state = tempfile::tempdir().unwrap();
    let totals = verify_ok(&server, &state.path().join("state.json"));
    assert_eq!(totals["tree_size"], fumi_server::admin::endpoints().len());

    // HEAD on a GET route reads the same data: it is logged as that route's action.
    let before = stored_entries(&server).len();
    let _ = runtime.block_on(client.text(Method::HEAD, "/admin/v1/metrics"));
    let entries = stored_entries(&server);
    assert_eq!(entries.len(), before + 1);
    assert_eq!(entries[before]["action"], "view_metrics");

    // A path its handler cannot even decode is refused before the handler runs: still one entry.
    let before = stored_entries(&server).len();
    let result = runtime.block_on(client.text(Method::POST, "/admin/v1/accounts/%FF/suspend"));
    assert!(result.is_err());
    let entries = stored_entries(&server);
    assert_eq!(entries.len(), before + 1);
    assert_eq!(entries[before]["action"], "suspend_account");
    assert_eq!(entries[before]["outcome"]["refused"], "malformed request");
}

#[test]
fn policy_refusals_are_refused_and_logged() {
    let operators = Operators::new();
    let mut server = server_with_operators(&operators);
    let alice = User::register(&server, "alice", "Alice");
    let account = account_of(&alice);
    let before = snapshot(&server);

    // An operator from a jurisdiction the policy does not allow.
    let output = admin(&server, &operators, "contractor", &["suspend", &account]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("jurisdiction not allowed"));
    // An allowed operator from outside their network.
    let output = admin(&server, &operators, "remote", &["accounts"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("network not allowed"));
    // A key that is not the operator's.
    std::fs::copy(operators.key("contractor"), operators.dir.path().join("impostor.key")).unwrap();
    let impostor = operators.dir.path().join("impostor.key");
    let output = run(&[
        "admin",
        "--server",
        &server.admin_url,
        "--operator",
        "tanaka",
        "--key",
        impostor.to_str().unwrap(),
        "--reason",
        "T-1",
        "purge",
        &account,
    ]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad signature"));
    // An unknown operator, an unsigned request, and a replayed one.
    let output = run(&[
        "admin",
        "--server",
        &server.admin_url,
        "--operator",
        "nobody",
        "--key",
        operators.key("tanaka").to_str().unwrap(),
        "--reason",
        "T-1",
        "accounts",
    ]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown operator"));
    let runtime = runtime();
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let unsigned = runtime
        .block_on(http.get(format!("{}/admin/v1/accounts", server.admin_url)).send())
        .unwrap();
    assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
    let secret = std::fs::read_to_string(operators.key("tanaka")).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&common::hex_decode(&secret).try_into().unwrap());
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let signed = |url: &str, timestamp: u64, nonce: &str| {
        let path = format!("/admin/v1/accounts/{account}/suspend");
        let message = fumi_proto::admin_request_message(
            "POST",
            &path,
            timestamp,
            nonce,
            "tanaka",
            "T-9",
            &sha2::Digest::finalize(sha2::Sha256::default()).into(),
        );
        use ed25519_dalek::Signer;
        http.post(format!("{url}{path}"))
            .header("fumi-operator", "tanaka")
            .header("fumi-reason", "T-9")
            .header("fumi-timestamp", timestamp.to_string())
            .header("fumi-nonce", nonce)
            .header("fumi-signature", common::hex_encode(&key.sign(&message).to_bytes()))
    };
    let nonce = "0123456789abcdef0123456789abcdef";
    let stale = runtime
        .block_on(signed(&server.admin_url, timestamp - 3_600_000, "f".repeat(32).as_str()).send())
        .unwrap();
    assert_eq!(stale.status(), StatusCode::UNAUTHORIZED);
    let first = runtime
        .block_on(signed(&server.admin_url, timestamp, nonce).send())
        .unwrap();
    assert_eq!(first.status(), StatusCode::NO_CONTENT, "the genuine request is allowed");
    let replayed = runtime
        .block_on(signed(&server.admin_url, timestamp, nonce).send())
        .unwrap();
    assert_eq!(replayed.status(), StatusCode::UNAUTHORIZED);
    assert!(runtime.block_on(replayed.text()).unwrap().contains("replayed"));
    // A crash and restart does not reopen the window: nonces are remembered in the database.
    server.kill9();
    server.restart();
    let replayed = runtime
        .block_on(signed(&server.admin_url, timestamp, nonce).send())
        .unwrap();
    assert_eq!(replayed.status(), StatusCode::UNAUTHORIZED);
    assert!(runtime.block_on(replayed.text()).unwrap().contains("replayed"));

    // Only the genuine request changed anything: the suspension, and the log.
    let after = snapshot(&server);
    let data = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("audit_") && !l.starts_with("accounts:") && !l.starts_with("admin_nonces:"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(data(&before), data(&after));

    let state = tempfile::tempdir().unwrap();
    let report = verify_ok(&server, &state.path().join("state.json"));
    let totals = &report["totals"];
    assert_eq!(totals["refused"], 8, "{totals}");
    assert_eq!(totals["by_action"]["suspend_account"], 1);
    let reasons = &totals["refused_by_reason"];
    for reason in [
        "jurisdiction not allowed",
        "network not allowed",
        "bad signature",
        "unknown operator",
        "missing or malformed signature headers",
        "timestamp outside five minutes",
    ] {
        assert_eq!(reasons[reason], 1, "{reason}: {reasons}");
    }
    assert_eq!(reasons["replayed request"], 2, "{reasons}");
    let entries = stored_entries(&server);
    let contractor = entries.iter().find(|e| e["operator"] == "contractor").unwrap();
    assert_eq!(contractor["jurisdiction"], "cn");
    assert_eq!(contractor["outcome"]["refused"], "jurisdiction not allowed");
    // A refused impostor is not logged under the name they claimed.
    let impostor = entries
        .iter()
        .find(|e| e["outcome"]["refused"] == "bad signature")
        .unwrap();
    assert_eq!(impostor["operator"], "unknown");
    assert_eq!(impostor["details"]["claimed_operator"], "tanaka");
}

#[test]
fn rewritten_truncated_reordered_or_forked_logs_fail_verification() {
    let operators = Operators::new();
    let server = server_with_operators(&operators);
    let alice = User::register(&server, "alice", "Alice");
    let account = account_of(&alice);
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("state.json");
    for args in [["suspend", &account], ["unsuspend", &account]] {
        admin_ok(&server, &operators, "tanaka", &args);
    }
    let first = verify_ok(&server, &state);
    assert_eq!(first["tree_size"], 2);
    assert_eq!(first["new_entries"], 2);
    admin_ok(&server, &operators, "tanaka", &["accounts"]);
    admin_ok(&server, &operators, "tanaka", &["metrics"]);
    admin_ok(&server, &operators, "tanaka", &["reports"]);
    let second = verify_ok(&server, &state);
    assert_eq!(second["tree_size"], 5);
    assert_eq!(second["new_entries"], 3, "only new entries are fetched");
    assert_eq!(second["totals"]["by_operator"]["tanaka"], 5, "totals accumulate");
    let good_state = std::fs::read(&state).unwrap();

    let original = stored_texts(&server);
    let restore = |server: &Server| {
        server.execute("DELETE FROM audit_log", &[]);
        for (idx, entry) in original.iter().enumerate() {
            let leaf = fumi_audit::merkle::leaf_hash(entry.as_bytes());
            server.execute(
                &format!("INSERT INTO audit_log (idx, entry, leaf_hash) VALUES ({idx}, {{0}}, {{1}})"),
                &[entry.as_bytes(), &leaf],
            );
        }
    };
    let fresh_state = || {
        std::fs::write(&state, &good_state).unwrap();
    };
    let no_state = state_dir.path().join("none.json");

    // An entry altered: the operator's name replaced.
    let altered = original[3].replace("tanaka", "nobody");
    server.execute("UPDATE audit_log SET entry = {0} WHERE idx = 3", &[altered.as_bytes()]);
    verify_fails(&server, &no_state, "entry 3 is not in the signed log");
    let _ = std::fs::remove_file(&no_state);
    restore(&server);

    // Two entries swapped, hashes and all.
    server.execute(
        "UPDATE audit_log SET idx = -1 WHERE idx = 1; UPDATE audit_log SET idx = 1 WHERE idx = 0;
         UPDATE audit_log SET idx = 0 WHERE idx = -1;",
        &[],
    );
    verify_fails(&server, &no_state, "entry 0 is not in the signed log");
    let _ = std::fs::remove_file(&no_state);
    restore(&server);

    // An entry deleted: the signed head still counts it; the server cannot prove the log.
    server.execute("DELETE FROM audit_log WHERE idx = 4", &[]);
    verify_fails(&server, &no_state, "cannot prove entry");
    let _ = std::fs::remove_file(&no_state);
    restore(&server);

    // The log cut back to an older head: the verifier remembers it was bigger.
    server.execute(
        "DELETE FROM audit_log WHERE idx >= 3; DELETE FROM audit_heads WHERE tree_size > 3;",
        &[],
    );
    fresh_state();
    verify_fails(&server, &state, "truncated: it had 5 entries, it now claims 3");
    restore(&server);

    // History rewritten and regrown, all correctly signed (the operator holds the key): the new
    // head is not consistent with the one the verifier saw.
    server.execute("DELETE FROM audit_log WHERE idx >= 3;", &[]);
    for _ in 0..3 {
        admin_ok(&server, &operators, "tanaka", &["metrics"]);
    }
    fresh_state();
    verify_fails(&server, &state, "rewritten or forked");

    // A fork: another server with the same log key shows a different history of the same size.
    let forked_operators = Operators::new();
    let forked = server_with_same_key(&forked_operators, &server);
    for _ in 0..5 {
        admin_ok(&forked, &forked_operators, "tanaka", &["metrics"]);
    }
    fresh_state();
    verify_fails(&forked, &state, "rewritten or forked");
}

/// A second server whose data directory starts with `original`'s log key only.
fn server_with_same_key(operators: &Operators, original: &Server) -> Server {
    let config = format!(
        "[[operators]]\nname = \"tanaka\"\npublic_key = \"{}\"\njurisdiction = \"jp\"\nnetworks = [\"127.0.0.0/8\"]\n",
        operators.keygen("tanaka")
    );
    let key = std::fs::read(original.data_dir().join("audit-log.key")).unwrap();
    Server::start_configured(&config, Some(&key))
}

#[test]
fn an_account_holder_finds_the_accesses_to_their_account() {
    let operators = Operators::new();
    let server = server_with_operators(&operators);
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let alice_account = account_of(&alice);
    admin_ok(&server, &operators, "tanaka", &["suspend", &alice_account]);
    admin_ok(&server, &operators, "tanaka", &["unsuspend", &alice_account]);
    admin_ok(&server, &operators, "tanaka", &["accounts"]);
    let _ = admin(&server, &operators, "contractor", &["purge", &alice_account]);

    let mine = alice.ok(&["audit", "mine"]);
    assert!(
        mine.starts_with("2 of the log's 4 entries (verified) concern your account"),
        "{mine}"
    );
    assert!(mine.contains("suspend_account by tanaka (jp) from 127.0.0.1, reason \"TICKET-42\": allowed"));
    assert!(mine.contains("unsuspend_account by tanaka"));
    let bobs = bob.ok(&["audit", "mine", "--json"]);
    assert_eq!(bobs.trim(), "", "no entry concerns Bob");

    // The server knows who asks, so it could show Alice an older or rewritten log; her device
    // remembers the head it verified and refuses one that does not extend it.
    server.execute(
        "DELETE FROM audit_log WHERE idx >= 2; DELETE FROM audit_heads WHERE tree_size > 2;",
        &[],
    );
    let output = alice.run(&["audit", "mine"]);
    assert!(!output.status.success(), "a truncated log was accepted");
    assert!(String::from_utf8_lossy(&output.stderr).contains("LOG VERIFICATION FAILED"));
}
