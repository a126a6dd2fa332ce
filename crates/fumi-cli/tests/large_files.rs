//! Files are streamed, never held whole: the same round trip with a small file and a 50 MiB one,
//! with each `fumi` process's peak resident size measured on its own (`wait4`). The larger file
//! may add the transfer's buffers, not its size.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

use common::{FUMI, Server, User};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Runs `fumi args` for `user` to success; returns its stdout and its peak resident size in bytes.
#[expect(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4, which also reports its peak"
)]
fn run_measured(user: &User, args: &[&str]) -> (String, u64) {
    let mut child = Command::new(FUMI)
        .arg("--home")
        .arg(user.home.path())
        .args(args)
        .env_remove("FUMI_HOME")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 writes into the two values we pass and reaps our own child, which nothing
    // else waits for.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "fumi {args:?} failed: {out}"
    );
    (out, usage.ru_maxrss as u64 * 1024) // kilobytes on Linux
}

/// Writes `size` random bytes to `name` in `user`'s home; returns the path and their SHA-256.
fn random_file(user: &User, name: &str, size: usize) -> (std::path::PathBuf, Vec<u8>) {
    let path = user.home.path().join(name);
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 1024 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len());
        rand::rng().fill_bytes(&mut chunk[..n]);
        hasher.update(&chunk[..n]);
        std::io::Write::write_all(&mut file, &chunk[..n]).unwrap();
        left -= n;
    }
    (path, hasher.finalize().to_vec())
}

/// Sends a file of `size` bytes from `alice` to `bob`; returns the sender's and receiver's peaks.
fn round_trip(alice: &User, bob: &User, name: &str, size: usize) -> (u64, u64) {
    let (path, digest) = random_file(alice, name, size);
    let (_, send_peak) = run_measured(alice, &["send", &bob.username, "--file", path.to_str().unwrap()]);
    let (out, receive_peak) = run_measured(bob, &["receive"]);
    let mut file = std::fs::File::open(common::saved_path(&out, name)).unwrap();
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).unwrap();
    assert_eq!(hasher.finalize().to_vec(), digest, "the received file is the sent one");
    (send_peak, receive_peak)
}

#[test]
fn a_50_mib_file_costs_the_client_no_more_memory_than_a_small_one() {
    const SMALL: usize = 64 * 1024;
    const LARGE: usize = 50 * 1024 * 1024;
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    // First contact first, so that both measured round trips do the same work apart from the file.
    alice.ok(&["send", &bob.username, "hello"]);
    bob.ok(&["receive"]);

    let small = round_trip(&alice, &bob, "small.bin", SMALL);
    let large = round_trip(&alice, &bob, "large.bin", LARGE);
    for (side, small, large) in [("sending", small.0, large.0), ("receiving", small.1, large.1)] {
        let growth = large.saturating_sub(small);
        eprintln!(
            "{side}: peak RSS {:.1} MiB for {} KiB, {:.1} MiB for {} MiB; growth {:.1} MiB = {:.3} of the size difference",
            small as f64 / 1048576.0,
            SMALL >> 10,
            large as f64 / 1048576.0,
            LARGE >> 20,
            growth as f64 / 1048576.0,
            growth as f64 / (LARGE - SMALL) as f64
        );
        assert!(
            growth < (LARGE - SMALL) as u64 / 4,
            "{side} a {} MiB file took {} MiB more memory than a {} KiB one: the file was held in memory",
            LARGE >> 20,
            growth >> 20,
            SMALL >> 10
        );
    }
}
