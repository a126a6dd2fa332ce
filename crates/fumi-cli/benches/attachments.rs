//! Attachment throughput: raw XChaCha20-Poly1305 beside Fumi's streaming attachment format, and
//! end to end through a real server on loopback (encrypt + upload, download + decrypt).
//!
//! `cargo bench -p fumi-cli --bench attachments [-- SIZE_MIB]` (default 256 MiB). Prints one
//! line per measurement and a JSON summary; nothing is asserted.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::time::Instant;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use common::{Server, User};
use fumi_core::attachment::{self, AttachmentKey, CHUNK_BYTES};
use rand::RngCore;

fn mb_per_s(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / seconds
}

/// Best of three runs of `f`, in seconds.
fn best_of_three(mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let size_mib: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(256);
    let size = size_mib * 1024 * 1024;
    let mut data = vec![0u8; size];
    rand::rng().fill_bytes(&mut data);

    // Raw AEAD: the same cipher over the same 64 KiB chunks, in memory, no framing or hashing.
    let cipher = XChaCha20Poly1305::new(&[7u8; 32].into());
    let mut buffer = Vec::with_capacity(CHUNK_BYTES + 16);
    let raw = best_of_three(|| {
        for (i, chunk) in data.chunks(CHUNK_BYTES).enumerate() {
            buffer.clear();
            buffer.extend_from_slice(chunk);
            let mut nonce = [0u8; 24];
            nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
            cipher
                .encrypt_in_place(XNonce::from_slice(&nonce), b"", &mut buffer)
                .unwrap();
        }
    });
    println!("raw XChaCha20-Poly1305: {:.0} MiB/s", mb_per_s(size, raw));

    // The attachment format in memory: STREAM framing plus the SHA-256 digest.
    let key = AttachmentKey::generate(&mut rand::rng());
    let mut sealed_bytes = Vec::with_capacity(attachment::ciphertext_size(size as u64) as usize);
    let mut sealed = None;
    let encrypt = best_of_three(|| {
        sealed_bytes.clear();
        sealed =
            Some(attachment::encrypt(&key, &mut &data[..], size as u64, &mut sealed_bytes, &mut rand::rng()).unwrap());
    });
    println!("attachment encrypt (memory): {:.0} MiB/s", mb_per_s(size, encrypt));
    let sealed = sealed.unwrap();
    let decrypt = best_of_three(|| {
        attachment::decrypt(&key, &mut &sealed_bytes[..], &sealed, &mut std::io::sink()).unwrap();
    });
    println!("attachment decrypt (memory): {:.0} MiB/s", mb_per_s(size, decrypt));
    drop(sealed_bytes);

    // End to end through a real server and the CLI on loopback, files on disk.
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let path = alice.home.path().join("bench.bin");
    std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
    drop(data);
    alice.ok(&["send", &bob.username, "warm up"]);
    bob.ok(&["receive"]);
    let start = Instant::now();
    alice.ok(&["send", &bob.username, "--file", path.to_str().unwrap()]);
    let upload = start.elapsed().as_secs_f64();
    println!("end to end encrypt + upload: {:.0} MiB/s", mb_per_s(size, upload));
    let start = Instant::now();
    let out = bob.ok(&["receive"]);
    let download = start.elapsed().as_secs_f64();
    assert!(out.contains("[file bench.bin"), "{out}");
    println!("end to end download + decrypt: {:.0} MiB/s", mb_per_s(size, download));
    println!(
        "{}",
        serde_json::json!({
            "size_mib": size_mib,
            "raw_aead_mib_s": mb_per_s(size, raw).round(),
            "attachment_encrypt_mib_s": mb_per_s(size, encrypt).round(),
            "attachment_decrypt_mib_s": mb_per_s(size, decrypt).round(),
            "encrypt_upload_mib_s": mb_per_s(size, upload).round(),
            "download_decrypt_mib_s": mb_per_s(size, download).round(),
        })
    );
}
