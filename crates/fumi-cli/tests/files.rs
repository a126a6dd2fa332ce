//! Encrypted files end to end: round trip, refusal of altered and truncated blobs, resumption
//! after a dropped connection, and deletion once every recipient has the file.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{Server, User, fumi_ok, random_file, saved_path};

#[test]
fn files_round_trip_and_altered_or_truncated_blobs_are_refused() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let (scan, original) = random_file(alice.home.path(), "scan.pdf", 3 * 1024 * 1024 + 17);
    alice.ok(&[
        "send",
        &bob.username,
        "--file",
        scan.to_str().unwrap(),
        "--caption",
        "the scan",
    ]);
    assert_eq!(server.blob_files().len(), 1, "one blob stored");

    let out = bob.ok(&["receive"]);
    assert!(
        out.contains("the scan [file scan.pdf · application/pdf · 3.0 MiB]"),
        "{out}"
    );
    let saved = saved_path(&out, "scan.pdf");
    assert!(saved.starts_with(bob.home.path().join("files")), "{}", saved.display());
    assert_eq!(std::fs::read(&saved).unwrap(), original);
    // Bob was the only recipient device: once he has it, the server deletes it.
    assert!(server.blob_files().is_empty(), "{:?}", server.blob_files());
    let history = alice.ok(&["history", &bob.username]);
    assert!(history.contains("[file scan.pdf"), "{history}");

    // An altered byte in the stored blob: refused, nothing saved.
    let (photo, _) = random_file(alice.home.path(), "photo.jpg", 200_000);
    alice.ok(&["send", &bob.username, "--file", photo.to_str().unwrap()]);
    let blob = server.blob_files().pop().expect("blob stored");
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100_000] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();
    let out = bob.ok(&["receive"]);
    assert!(
        out.contains("NOT SAVED: refused photo.jpg: the file was altered"),
        "{out}"
    );

    // A truncated blob: refused, nothing saved.
    let (notes, _) = random_file(alice.home.path(), "notes.txt", 150_000);
    alice.ok(&["send", &bob.username, "--file", notes.to_str().unwrap()]);
    let blob = server.blob_files().pop().expect("blob stored");
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &bytes[..bytes.len() - 1000]).unwrap();
    let out = bob.ok(&["receive"]);
    assert!(
        out.contains("NOT SAVED: refused notes.txt: the file is truncated"),
        "{out}"
    );
    let saved: Vec<_> = std::fs::read_dir(bob.home.path().join("files"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(saved, vec!["scan.pdf"], "only the intact file was kept");

    // Not a file, or too big for the server: clear errors, nothing uploaded.
    let missing = alice.run(&["send", &bob.username, "--file", "/nonexistent/file.bin"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read /nonexistent/file.bin"));
}

#[test]
fn group_files_reach_every_member_device() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let carol = User::register(&server, "carol", "Carol");
    alice.ok(&["group", "create", "Ward 3", &bob.username, &carol.username]);
    let (chart, original) = random_file(alice.home.path(), "chart.png", 70_000);
    alice.ok(&["send", "--group", "Ward 3", "--file", chart.to_str().unwrap()]);
    for user in [&bob, &carol] {
        let out = user.ok(&["receive"]);
        assert_eq!(std::fs::read(saved_path(&out, "chart.png")).unwrap(), original);
    }
    assert!(
        server.blob_files().is_empty(),
        "deleted after the last recipient fetched it"
    );
}

#[test]
fn oversized_files_are_refused_before_upload() {
    let server = Server::start_with_env(&[("FUMI_MAX_BLOB_BYTES", "100000")]);
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let (big, _) = random_file(alice.home.path(), "big.bin", 200_000);
    let out = alice.run(&["send", &bob.username, "--file", big.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("100000"), "names the limit: {stderr}");
    assert!(server.blob_files().is_empty());
    assert!(bob.receive_texts().is_empty());
}

/// A TCP proxy that drops the connection carrying the upload once `cut_after` bytes went from
/// client to server, once (or, `swallowing`, keeps it open and forwards nothing more on it, as a
/// stalled network); then it forwards faithfully.
struct CuttingProxy {
    url: String,
    cuts: Arc<AtomicU64>,
}

impl CuttingProxy {
    fn start(target: &str, cut_after: u64) -> Self {
        Self::start_as(target, cut_after, false)
    }

    /// A home registered through the proxy: everything it sends passes it.
    fn register(&self, nickname: &str) -> tempfile::TempDir {
        let home = tempfile::tempdir().unwrap();
        fumi_ok(
            home.path(),
            &[
                "register",
                "--server",
                &self.url,
                "--name",
                nickname,
                "--username",
                nickname,
            ],
        );
        home
    }

    fn start_as(target: &str, cut_after: u64, swallowing: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = target.trim_start_matches("http://").to_owned();
        let cuts = Arc::new(AtomicU64::new(0));
        let armed = Arc::new(AtomicBool::new(true));
        let counted = Arc::new(AtomicU64::new(0));
        let cuts_seen = cuts.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&target) else {
                    return;
                };
                let (armed, counted, cuts) = (armed.clone(), counted.clone(), cuts_seen.clone());
                let (mut client_read, mut server_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut server_read, mut client_write) = (server, client);
                std::thread::spawn(move || {
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let total = counted.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if total > cut_after && armed.swap(false, Ordering::SeqCst) {
                            cuts.fetch_add(1, Ordering::SeqCst);
                            // Read and drop until the client goes away.
                            while swallowing && matches!(client_read.read(&mut buffer), Ok(1..)) {}
                            let _ = client_read.shutdown(std::net::Shutdown::Both);
                            let _ = server_write.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                        if server_write.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server_read, &mut client_write);
                    let _ = client_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy { url, cuts }
    }
}

#[test]
fn an_upload_resumes_after_the_connection_drops() {
    let server = Server::start();
    let bob = User::register(&server, "bob", "Bob");
    let size = 20 * 1024 * 1024;
    // Alice reaches the server only through the proxy, which cuts her connection mid-file.
    let proxy = CuttingProxy::start(&server.url, 13 * 1024 * 1024);
    let home = proxy.register("alice");
    let (file, original) = random_file(home.path(), "video.mp4", size);
    let output = common::fumi(home.path(), &["send", &bob.username, "--file", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1, "the proxy cut the upload");
    assert!(stderr.contains("resuming at byte"), "{stderr}");
    // What reached the server before the cut was kept, not sent again from the start.
    let metrics = server.metrics();
    let received: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fumi_blob_bytes_received_total "))
        .expect("metric")
        .trim()
        .parse()
        .unwrap();
    let sealed_size = fumi_core::attachment::ciphertext_size(size as u64);
    assert!(received >= sealed_size, "{received}");
    assert!(
        received < sealed_size + fumi_client::UPLOAD_CHUNK_BYTES as u64,
        "{received} re-sent more than one chunk"
    );

    let out = bob.ok(&["receive"]);
    assert_eq!(std::fs::read(saved_path(&out, "video.mp4")).unwrap(), original);
}

/// Ctrl-C (or a crash) in the middle of a large upload: the next `send` of the same file goes
/// on from the bytes the server holds, with the same blob, and leaves no partial copy behind.
#[test]
fn an_upload_interrupted_in_one_run_resumes_in_the_next() {
    let server = Server::start();
    let bob = User::register(&server, "bob", "Bob");
    let size = 20 * 1024 * 1024;
    let proxy = CuttingProxy::start_as(&server.url, 9 * 1024 * 1024, true);
    let home = proxy.register("alice");
    let (file, original) = random_file(home.path(), "video.mp4", size);
    let send = ["send", &bob.username, "--file", file.to_str().unwrap()];
    let mut first = std::process::Command::new(common::FUMI)
        .arg("--home")
        .arg(home.path())
        .args(send)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let received = || -> u64 {
        server
            .metrics()
            .lines()
            .find_map(|l| l.strip_prefix("fumi_blob_bytes_received_total "))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while proxy.cuts.load(Ordering::SeqCst) == 0 || received() < 8 * 1024 * 1024 {
        assert!(std::time::Instant::now() < deadline, "the upload never got under way");
        assert!(first.try_wait().unwrap().is_none(), "the first send ended by itself");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let held = received();

    let output = common::fumi(home.path(), &send);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("resuming the upload of video.mp4 at byte "), "{stderr}");
    let sealed_size = fumi_core::attachment::ciphertext_size(size as u64);
    assert!(
        received() < sealed_size + held / 2,
        "sent again from the start: {} bytes received for {sealed_size}",
        received()
    );
    let stored = server.blob_files();
    assert_eq!(stored.len(), 1, "one copy, no partial upload left: {stored:?}");
    let out = bob.ok(&["receive"]);
    assert_eq!(std::fs::read(saved_path(&out, "video.mp4")).unwrap(), original);
}

#[test]
fn two_processes_on_one_home_save_a_file_once() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let (file, original) = random_file(alice.home.path(), "shared.bin", 12 * 1024 * 1024);
    alice.ok(&["send", &bob.username, "--file", file.to_str().unwrap()]);
    let spawn = || {
        std::process::Command::new(common::FUMI)
            .arg("--home")
            .arg(bob.home.path())
            .arg("receive")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    for child in [first, second] {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    bob.ok(&["receive"]);
    let saved: Vec<_> = std::fs::read_dir(bob.home.path().join("files"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(saved, vec!["shared.bin"], "one copy");
    assert_eq!(
        std::fs::read(bob.home.path().join("files/shared.bin")).unwrap(),
        original
    );
    let history = bob.ok(&["history", &alice.username]);
    assert!(history.contains("files/shared.bin"), "{history}");
}

#[test]
fn a_download_killed_midway_resumes_in_the_next_run() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let (file, original) = random_file(alice.home.path(), "long.bin", 40 * 1024 * 1024);
    alice.ok(&["send", &bob.username, "--file", file.to_str().unwrap()]);
    let mut receiving = std::process::Command::new(common::FUMI)
        .arg("--home")
        .arg(bob.home.path())
        .arg("receive")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill -9 once part of the blob is saved for resumption.
    let tmp = bob.home.path().join("tmp");
    let saved_before_kill = loop {
        let saved: u64 = std::fs::read_dir(&tmp)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".download"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        if saved > 4 * 1024 * 1024 {
            receiving.kill().unwrap();
            receiving.wait().unwrap();
            break saved;
        }
        assert!(
            receiving.try_wait().unwrap().is_none(),
            "the download finished before it could be interrupted"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let before = server.metrics();
    let out = bob.ok(&["receive"]);
    assert_eq!(std::fs::read(saved_path(&out, "long.bin")).unwrap(), original);
    // The second run fetched only what the first had not saved.
    let sent = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("fumi_blob_bytes_sent_total "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let refetched = sent(&server.metrics()) - sent(&before);
    let sealed = fumi_core::attachment::ciphertext_size(original.len() as u64);
    assert!(
        refetched <= sealed - saved_before_kill,
        "{refetched} of {sealed} refetched after {saved_before_kill} were saved"
    );
}
