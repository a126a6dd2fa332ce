//! Data residency end to end: accounts living in different regions (each its own database and
//! blob store) talk to each other; `fumi admin relocate` moves an account's queued messages,
//! KeyPackages, profile, avatar and files, leaves nothing at the source, logs what it moved, and
//! finishes after a kill -9 at any step when run again.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Server, User, account_of, credentials, hex_decode, random_file, run, run_ok, saved_path};

/// The servers' three regions: `kr` (the main database's own), `jp` and `us`.
struct Regions {
    server: Server,
    keys: tempfile::TempDir,
    /// PostgreSQL URL and main schema, when the suite runs on PostgreSQL.
    postgres: Option<(String, String)>,
}

impl Regions {
    fn start() -> Self {
        let keys = tempfile::tempdir().unwrap();
        let key = keys.path().join("tanaka.key");
        let out = run_ok(&["admin", "keygen", "--out", key.to_str().unwrap()]);
        let public = out
            .lines()
            .find_map(|l| l.strip_prefix("public key: "))
            .expect("public key printed")
            .to_owned();
        let postgres = Server::postgres_backend();
        let region = |name: &str| match &postgres {
            None => format!("[[regions]]\nname = \"{name}\"\n"),
            Some((url, schema)) => {
                format!("[[regions]]\nname = \"{name}\"\ndatabase = \"{url}\"\ndatabase_schema = \"{schema}_{name}\"\n")
            }
        };
        let config = format!(
            "region = \"kr\"\n{}{}\n[[operators]]\nname = \"tanaka\"\npublic_key = \"{public}\"\njurisdiction = \"jp\"\nnetworks = [\"127.0.0.0/8\"]\n",
            region("jp"),
            region("us"),
        );
        let server = Server::start_configured_on(&config, postgres.clone());
        Self { server, keys, postgres }
    }

    fn admin(&self, args: &[&str]) -> Output {
        let key = self.keys.path().join("tanaka.key");
        let mut full = vec![
            "admin",
            "--server",
            &self.server.admin_url,
            "--operator",
            "tanaka",
            "--key",
            key.to_str().unwrap(),
            "--reason",
            "RESIDENCY-1",
        ];
        full.extend_from_slice(args);
        run(&full)
    }

    fn admin_ok(&self, args: &[&str]) -> String {
        let output = self.admin(args);
        assert!(
            output.status.success(),
            "admin {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn relocate(&self, account: &str, to: &str) -> Output {
        self.admin(&["relocate", account, "--to", to])
    }

    fn relocate_ok(&self, account: &str, to: &str) -> String {
        let output = self.relocate(account, to);
        assert!(
            output.status.success(),
            "relocate to {to}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// A `SELECT COUNT(*)` in a region's database (`kr`: the main one); `{0}` is `bytes`.
    fn count(&self, region: &str, sql: &str, bytes: &[u8]) -> u64 {
        if region == "kr" {
            return self.server.count(sql, &[bytes]);
        }
        match &self.postgres {
            Some((url, schema)) => {
                let sql = sql.replace("{0}", &format!("'\\x{}'::bytea", common::hex_encode(bytes)));
                let out = std::process::Command::new("psql")
                    .args([
                        url.as_str(),
                        "-X",
                        "-q",
                        "-A",
                        "-t",
                        "-c",
                        &format!("SET search_path TO \"{schema}_{region}\"; {sql}"),
                    ])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
            }
            None => {
                let sql = sql.replace("{0}", &format!("X'{}'", common::hex_encode(bytes)));
                let db = rusqlite::Connection::open(self.region_dir(region).join("fumi.db")).unwrap();
                db.query_row(&sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64
            }
        }
    }

    fn region_dir(&self, region: &str) -> PathBuf {
        self.server.data_dir().join("regions").join(region)
    }

    /// What a region holds of a device and account: envelopes, KeyPackages, profile, avatar.
    fn holdings(&self, region: &str, user: &User) -> [u64; 4] {
        let (device, _) = credentials(user);
        let account = hex_decode(&account_of(user));
        [
            self.count(
                region,
                "SELECT COUNT(*) FROM mailbox WHERE device_id = {0}",
                device.as_bytes(),
            ),
            self.count(
                region,
                "SELECT COUNT(*) FROM key_packages WHERE device_id = {0}",
                device.as_bytes(),
            ),
            self.count(region, "SELECT COUNT(*) FROM profiles WHERE account_id = {0}", &account),
            self.count(region, "SELECT COUNT(*) FROM avatars WHERE account_id = {0}", &account),
        ]
    }

    /// Finished blob files of a region.
    fn blob_files(&self, region: &str) -> Vec<PathBuf> {
        let dir = if region == "kr" {
            self.server.data_dir().join("blobs")
        } else {
            self.region_dir(region).join("blobs")
        };
        let mut files = Vec::new();
        collect(&dir, &mut files);
        files.retain(|f| !f.file_name().unwrap().to_string_lossy().starts_with('.'));
        files
    }

    /// Asserts that nothing of `user` (ids, the envelopes' and files' bytes) is left in a
    /// non-main region: its database files (SQLite: bytes on disk; PostgreSQL: rows) and blobs.
    fn assert_region_clean(&self, region: &str, user: &User, ciphertexts: &[Vec<u8>]) {
        assert_eq!(self.holdings(region, user), [0, 0, 0, 0], "rows left in {region}");
        assert!(
            self.blob_files(region).is_empty(),
            "blobs left in {region}: {:?}",
            self.blob_files(region)
        );
        if self.postgres.is_none() {
            let (device, _) = credentials(user);
            let account = hex_decode(&account_of(user));
            let mut files = Vec::new();
            collect(&self.region_dir(region), &mut files);
            for file in files {
                let bytes = std::fs::read(&file).unwrap();
                for needle in [device.as_bytes().as_slice(), account.as_slice()]
                    .into_iter()
                    .chain(ciphertexts.iter().map(Vec::as_slice))
                {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle),
                        "{} still holds the account's data",
                        file.display()
                    );
                }
            }
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn accounts_live_in_their_region_and_relocation_moves_everything_and_leaves_nothing() {
    let regions = Regions::start();
    let server = &regions.server;
    let alice = User::register_with(server, "alice", "Alice", &["--region", "jp"]);
    // Her laptop, linked: its KeyPackages go to her region too.
    let laptop_home = tempfile::tempdir().unwrap();
    common::fumi_ok(
        laptop_home.path(),
        &["device", "link", "--from", alice.home.path().to_str().unwrap()],
    );
    let laptop = User {
        home: laptop_home,
        username: alice.username.clone(),
    };
    let bob = User::register(server, "bob", "Bob");
    // An unknown region is refused with the list of regions.
    let home = tempfile::tempdir().unwrap();
    let refused = common::fumi(
        home.path(),
        &[
            "register",
            "--server",
            &server.url,
            "--name",
            "D",
            "--username",
            "dave",
            "--region",
            "mars",
        ],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("kr, jp, us"),
        "{refused:?}"
    );

    // Alice's avatar, a file she sends Bob, and messages Carol sends her (every `send` first
    // receives, so Bob stays idle until the move, and Alice sends before Carol).
    let carol = User::register(server, "carol", "Carol");
    let (picture, mut png) = random_file(alice.home.path(), "me.png", 3000);
    png[..8].copy_from_slice(b"\x89PNG\r\n\x1a\n");
    std::fs::write(&picture, &png).unwrap();
    alice.ok(&["profile", "set", "--avatar", picture.to_str().unwrap()]);
    let (scan, scan_bytes) = random_file(alice.home.path(), "scan.pdf", 300_000);
    alice.ok(&["send", &bob.username, "--file", scan.to_str().unwrap()]);
    for i in 0..3 {
        carol.ok(&["send", &alice.username, &format!("kr to jp {i}")]);
    }

    // Her mailbox, KeyPackages, profile, avatar and file live in jp; nothing of hers in kr.
    let in_jp = regions.holdings("jp", &alice);
    assert!(
        in_jp[0] >= 3 && in_jp[1] > 0 && in_jp[2] == 1 && in_jp[3] == 1,
        "{in_jp:?}"
    );
    assert_eq!(regions.holdings("kr", &alice), [0, 0, 0, 0]);
    let laptop_in_jp = regions.holdings("jp", &laptop);
    assert!(laptop_in_jp[0] >= 3 && laptop_in_jp[1] > 0, "{laptop_in_jp:?}");
    assert_eq!(regions.holdings("kr", &laptop), [0, 0, 0, 0]);
    // Her files (the scan for Bob, her avatar for her laptop) are in jp's blob store.
    let jp_blobs = regions.blob_files("jp");
    assert!(!jp_blobs.is_empty());
    let mut gone: Vec<Vec<u8>> = jp_blobs.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(regions.blob_files("kr").is_empty());
    // Bob's live in kr.
    assert!(regions.holdings("kr", &bob)[1] > 0);
    assert_eq!(regions.holdings("jp", &bob), [0, 0, 0, 0]);
    gone.extend(queued_bodies(&regions, "jp", &alice));

    // Relocate jp -> us: progress on stderr, counts and digests on stdout.
    let account = account_of(&alice);
    let output = regions.relocate(&account, "us");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("envelopes: "), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("relocated to region us"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(stdout.split_once('\n').unwrap().1).unwrap();
    assert_eq!(report["from"], "jp");
    assert_eq!(report["envelopes"], in_jp[0] + laptop_in_jp[0]);
    assert_eq!(report["key_packages"], in_jp[1] + laptop_in_jp[1]);
    assert_eq!(report["blobs"], jp_blobs.len());
    assert_eq!(report["digest_envelopes"].as_str().unwrap().len(), 64);
    assert_eq!(regions.holdings("us", &alice), in_jp);
    regions.assert_region_clean("jp", &alice, &gone);
    assert_eq!(regions.blob_files("us").len(), jp_blobs.len());

    // The log names the relocation with what moved (and no account id).
    let entries = log_entries(server);
    let entry = entries
        .iter()
        .find(|e| e["action"] == "relocate_account")
        .expect("relocation logged");
    assert_eq!(entry["details"]["to"], "us");
    assert_eq!(entry["details"]["envelopes"], in_jp[0] + laptop_in_jp[0]);
    assert!(!entries.iter().any(|e| e.to_string().contains(&account)));
    // Run again: nothing to do, said so. An unknown region or account is refused, and changes
    // nothing.
    assert!(
        regions
            .relocate_ok(&account, "us")
            .contains("already lives in region us")
    );
    let refused = regions.relocate(&account, "mars");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("kr, jp, us"),
        "{refused:?}"
    );
    let refused = regions.relocate(&"ab".repeat(16), "jp");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no such account"),
        "{refused:?}"
    );
    assert_eq!(regions.holdings("us", &alice), in_jp);
    // The operator's account list names her region and counts what is queued there.
    let listed = regions.admin_ok(&["accounts"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["account"] == account.as_str())
        .expect("listed");
    assert_eq!(row["region"], "us");
    assert_eq!(row["queued_envelopes"], in_jp[0] + laptop_in_jp[0]);
    assert_eq!(row["key_packages"], in_jp[1] + laptop_in_jp[1]);

    // Everything arrives once, from the new region; Bob gets her file (stored in us).
    assert_eq!(regions.holdings("us", &laptop), laptop_in_jp);
    regions.assert_region_clean("jp", &laptop, &[]);
    let texts = alice.receive_texts();
    assert_eq!(texts, vec!["kr to jp 0", "kr to jp 1", "kr to jp 2"]);
    assert_eq!(laptop.receive_texts(), texts);
    let out = bob.ok(&["receive"]);
    assert_eq!(std::fs::read(saved_path(&out, "scan.pdf")).unwrap(), scan_bytes);
    // Her profile (moved with her) names the sender.
    assert!(out.contains("Alice"), "{out}");

    // Into the main region and out again, with messages both ways in between.
    regions.relocate_ok(&account, "kr");
    bob.ok(&["send", &alice.username, "in kr"]);
    assert_eq!(alice.receive_texts(), vec!["in kr"]);
    regions.assert_region_clean("us", &alice, &[]);
    bob.ok(&["send", &alice.username, "waiting in kr"]);
    regions.relocate_ok(&account, "jp");
    assert_eq!(regions.holdings("kr", &alice), [0, 0, 0, 0]);
    bob.ok(&["send", &alice.username, "after the move"]);
    alice.ok(&["send", &bob.username, "from jp again"]);
    assert_eq!(alice.receive_texts(), vec!["waiting in kr", "after the move"]);
    assert_eq!(bob.receive_texts(), vec!["from jp again"]);
    server.assert_never_wrote(&["kr to jp", "waiting in kr", "Alice"]);
    for region in ["jp", "us"] {
        let mut files = Vec::new();
        collect(&regions.region_dir(region), &mut files);
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            for marker in ["kr to jp", "waiting in kr", "Alice"] {
                assert!(
                    !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                    "{marker} in {}",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn a_relocation_killed_at_any_step_finishes_when_run_again_and_loses_nothing() {
    let mut regions = Regions::start();
    let alice = User::register_with(&regions.server, "alice", "Alice", &["--region", "jp"]);
    let bob = User::register(&regions.server, "bob", "Bob");
    let account = account_of(&alice);
    let mut sent = Vec::new();
    let mut hop = 0;
    // Each crash point of the relocation in turn, each on a move to another region.
    for (point, to) in [
        ("relocate:copying-envelopes", "us"),
        ("relocate:before-switch", "kr"),
        ("relocate:after-switch", "jp"),
        ("relocate:cleaning", "us"),
    ] {
        for _ in 0..3 {
            let text = format!("message {hop}");
            hop += 1;
            bob.ok(&["send", &alice.username, &text]);
            sent.push(text);
        }
        let before = regions.holdings(current_region(&regions, &alice), &alice);
        regions.server.kill9();
        regions.server.restart_with_env(&[("FUMI_TEST_CRASH_AT", point)]);
        let crashed = regions.relocate(&account, to);
        assert!(!crashed.status.success(), "{point}: the server should have died");
        regions.server.kill9();
        regions.server.restart();
        // Midway, her devices wait; a message sent to her meanwhile is accepted.
        bob.ok(&["send", &alice.username, &format!("during {point}")]);
        sent.push(format!("during {point}"));
        let out = regions.relocate_ok(&account, to);
        assert!(out.contains(&format!("relocated to region {to}")), "{point}: {out}");
        let after = regions.holdings(to, &alice);
        assert_eq!(after[1..], before[1..], "{point}: key packages, profile, avatar");
        assert_eq!(after[0], before[0] + 1, "{point}: every envelope, once");
        for region in ["kr", "jp", "us"].into_iter().filter(|r| *r != to) {
            assert_eq!(
                regions.holdings(region, &alice),
                [0, 0, 0, 0],
                "{point}: left in {region}"
            );
        }
    }
    // Every message arrives, once, in order.
    assert_eq!(alice.receive_texts(), sent);
    alice.ok(&["send", &bob.username, "all here"]);
    assert_eq!(bob.receive_texts(), vec!["all here"]);
}

/// Which region holds the user's KeyPackages now.
fn current_region(regions: &Regions, user: &User) -> &'static str {
    ["kr", "jp", "us"]
        .into_iter()
        .find(|r| regions.holdings(r, user)[1] > 0)
        .expect("key packages somewhere")
}

/// The envelope bodies queued for a user in a region (SQLite regions only; empty otherwise).
fn queued_bodies(regions: &Regions, region: &str, user: &User) -> Vec<Vec<u8>> {
    if regions.postgres.is_some() {
        return Vec::new();
    }
    let (device, _) = credentials(user);
    let db = rusqlite::Connection::open(regions.region_dir(region).join("fumi.db")).unwrap();
    let mut statement = db
        .prepare("SELECT m.body FROM mailbox mb JOIN messages m ON m.id = mb.message_id WHERE mb.device_id = ?")
        .unwrap();
    statement
        .query_map([device.as_bytes().as_slice()], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The transparency log's entries, from the public API.
fn log_entries(server: &Server) -> Vec<serde_json::Value> {
    let head = server.get_json("/v1/audit/head");
    let size = head["tree_size"].as_u64().unwrap();
    let answer = server.get_json(&format!("/v1/audit/entries?start=0&end={size}"));
    answer["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let text = e.as_str().map(str::to_owned).unwrap_or_else(|| e.to_string());
            serde_json::from_str(&text).unwrap_or(e.clone())
        })
        .collect()
}
