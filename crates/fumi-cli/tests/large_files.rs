//! A 50 MB file goes through with the client's memory bounded (files are streamed, never held
//! whole). Its own test binary, so that the peak resident size of finished child processes
//! (`getrusage(RUSAGE_CHILDREN)`) counts only this test's `fumi` clients.

mod common;

use common::{Server, User};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Largest peak resident size of any finished child process, in bytes.
fn peak_child_rss() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let result = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(result, 0);
    usage.ru_maxrss as u64 * 1024 // kilobytes on Linux
}

#[test]
fn a_50_mb_file_round_trips_in_bounded_memory() {
    const SIZE: usize = 50 * 1024 * 1024;
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let path = alice.home.path().join("archive.bin");
    let mut hasher = Sha256::new();
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut chunk = vec![0u8; 1024 * 1024];
        for _ in 0..SIZE / chunk.len() {
            rand::rng().fill_bytes(&mut chunk);
            hasher.update(&chunk);
            std::io::Write::write_all(&mut file, &chunk).unwrap();
        }
    }
    let expected = hasher.finalize();
    alice.ok(&["send", &bob.username, "--file", path.to_str().unwrap()]);
    let out = bob.ok(&["receive"]);
    let mut file = std::fs::File::open(common::saved_path(&out, "archive.bin")).unwrap();
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).unwrap();
    assert_eq!(hasher.finalize(), expected, "the received file is the sent one");

    // The server is still running, so only the finished clients count here.
    let peak = peak_child_rss();
    eprintln!("peak client RSS: {} MiB for a {} MiB file", peak >> 20, SIZE >> 20);
    assert!(
        peak < 48 * 1024 * 1024,
        "peak client RSS {} MiB: the file was held in memory",
        peak >> 20
    );
}
