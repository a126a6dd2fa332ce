//! Crash consistency of the client store: `fumi` processes killed with SIGKILL at random moments
//! while receiving and while committing. Afterwards nothing is lost, nothing is shown twice, and
//! the next sessions work. The kill times come from a seed printed on failure
//! (`FUMI_CRASH_SEED` repeats a run).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{FUMI, Server, User};
use rand::{Rng, SeedableRng};

/// The run's seed (printed, so a failure can be repeated) and the generator it drives.
fn seeded() -> (u64, rand::rngs::StdRng) {
    let seed = std::env::var("FUMI_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("FUMI_CRASH_SEED={seed}");
    (seed, rand::rngs::StdRng::seed_from_u64(seed))
}

/// Starts `fumi args` for `user` and kills it with SIGKILL after `after`; returns whether it had
/// already finished.
fn kill_after(user: &User, args: &[&str], after: Duration) -> bool {
    let mut child = Command::new(FUMI)
        .arg("--home")
        .arg(user.home.path())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    child.wait().unwrap();
    finished
}

#[test]
fn receiving_killed_at_random_loses_and_repeats_nothing() {
    let (seed, mut rng) = seeded();
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    alice.ok(&["group", "create", "Crash", &bob.username, &carol.username]);
    bob.ok(&["receive"]);
    // How long a receive of a few messages takes here: kills land inside that window.
    let send_batch = |round: usize| {
        for i in 0..3 {
            let text = format!("message {}", round * 3 + i);
            let sender = if i == 0 { &carol } else { &alice };
            sender.ok(&["send", "--group", "Crash", &text]);
        }
    };
    send_batch(0);
    let started = std::time::Instant::now();
    bob.ok(&["receive"]);
    let full = started.elapsed().as_millis() as u64;
    const ROUNDS: usize = 10;
    let mut interrupted = 0;
    for round in 1..=ROUNDS {
        send_batch(round);
        let after = Duration::from_millis(rng.random_range(1..full.max(2)));
        if !kill_after(&bob, &["receive"], after) {
            interrupted += 1;
        }
    }
    eprintln!("{interrupted} of {ROUNDS} receive runs were killed mid-way (a full one takes {full} ms)");
    assert!(
        interrupted > 0,
        "no run was interrupted; the test proved nothing (seed {seed})"
    );
    const COUNT: usize = (ROUNDS + 1) * 3;
    let _ = bob.ok(&["receive"]);
    let history = bob.ok(&["history", "Crash"]);
    for i in 0..COUNT {
        let wanted = format!("] message {i}\n");
        assert_eq!(
            history.matches(&wanted).count(),
            1,
            "message {i} (seed {seed}):\n{history}"
        );
    }
    // The store is consistent: the next sessions work both ways.
    bob.ok(&["send", "--group", "Crash", "bob is fine"]);
    assert!(alice.receive_texts().contains(&"bob is fine".to_owned()));
    alice.ok(&["send", "--group", "Crash", "after the crashes"]);
    assert_eq!(bob.receive_texts(), vec!["after the crashes"], "seed {seed}");
}

#[test]
fn committing_killed_at_random_leaves_a_working_group() {
    let (seed, mut rng) = seeded();
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let newcomers: Vec<User> = (0..6)
        .map(|i| User::register(&server, &format!("member{i}"), &format!("Member {i}")))
        .collect();
    alice.ok(&["group", "create", "Committee", &bob.username]);
    let calibration = User::register(&server, "calibration", "Calibration");
    let started = std::time::Instant::now();
    alice.ok(&["group", "add", "Committee", &calibration.username]);
    let full = started.elapsed().as_millis() as u64;
    let mut interrupted = 0;
    for member in &newcomers {
        // Kill the add at a random moment, possibly after the server took the commit; then
        // retry until the member is in (a retry after an accepted commit says so, or the
        // queued commit is sent by the next run).
        let after = Duration::from_millis(rng.random_range(1..full.max(2)));
        if !kill_after(&alice, &["group", "add", "Committee", &member.username], after) {
            interrupted += 1;
        }
        let mut added = false;
        for _ in 0..3 {
            let out = alice.run(&["group", "add", "Committee", &member.username]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || stderr.contains("already a member") {
                added = true;
                break;
            }
        }
        assert!(added, "{} could not be added (seed {seed})", member.username);
    }
    eprintln!(
        "{interrupted} of {} adds were killed mid-way (a full one takes {full} ms)",
        newcomers.len()
    );
    assert!(
        interrupted > 0,
        "no add was interrupted; the test proved nothing (seed {seed})"
    );
    alice.ok(&["send", "--group", "Committee", "all here"]);
    for member in newcomers.iter().chain([&bob, &calibration]) {
        let texts = member.receive_texts();
        assert!(
            texts.contains(&"all here".to_owned()),
            "{}: {texts:?} (seed {seed})",
            member.username
        );
    }
    let listed = alice.ok(&["group", "list"]);
    for member in &newcomers {
        assert_eq!(listed.matches(&member.username).count(), 1, "{listed}");
    }
}

/// Makes every write of OpenMLS group state in `user`'s store fail inside SQLite, as a full disk
/// or a failing device would; returns a function that makes the store work again.
fn break_group_state_writes(user: &User) -> impl FnOnce() + '_ {
    let store = user.home.path().join("fumi.db");
    let db = rusqlite::Connection::open(&store).unwrap();
    for op in ["INSERT", "UPDATE", "DELETE"] {
        db.execute_batch(&format!(
            "CREATE TRIGGER injected_{op} BEFORE {op} ON openmls_group_data \
             BEGIN SELECT RAISE(ABORT, 'injected failure of the client store'); END;"
        ))
        .unwrap();
    }
    move || {
        let db = rusqlite::Connection::open(&store).unwrap();
        for op in ["INSERT", "UPDATE", "DELETE"] {
            db.execute_batch(&format!("DROP TRIGGER injected_{op}")).unwrap();
        }
    }
}

#[test]
fn a_failure_of_the_clients_own_store_consumes_no_message() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    alice.ok(&["send", &bob.username, "first contact"]);
    assert_eq!(bob.receive_texts(), ["first contact"]);

    // An application message, a Welcome to a new group and a message in it: OpenMLS saves state
    // for each (the secret tree, the new group), and each save fails.
    alice.ok(&["send", &bob.username, "sent while bob's disk was full"]);
    alice.ok(&["group", "create", "Ward 3", &bob.username]);
    alice.ok(&["send", "--group", "Ward 3", "in the new group"]);
    let repair = break_group_state_writes(&bob);
    for _ in 0..2 {
        let failed = bob.run(&["receive"]);
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(!failed.status.success(), "a receive whose store fails must fail");
        assert!(stderr.contains("injected failure of the client store"), "{stderr}");
    }

    // With the store working again, every message arrives, once.
    repair();
    let received = bob.ok(&["receive"]);
    for text in ["sent while bob's disk was full", "in the new group"] {
        assert_eq!(received.matches(text).count(), 1, "{received}");
    }
    assert!(bob.ok(&["group", "list"]).contains("Ward 3"));
    assert!(bob.receive_texts().is_empty());
    bob.ok(&["send", "--group", "Ward 3", "all there"]);
    assert_eq!(alice.receive_texts(), ["all there"]);
}
