//! Attachment encryption: a fresh key per file, fixed-size chunks under the STREAM construction
//! (XChaCha20-Poly1305, RustCrypto's `aead::stream`), so a file of any size is encrypted and
//! decrypted in constant memory and a truncated, reordered or altered blob is refused.
//!
//! Blob layout: a 20-byte header (format version 1, then the 19-byte STREAM nonce prefix), then
//! the chunks: every plaintext chunk is [`CHUNK_BYTES`] long except the last, which may be
//! shorter or empty and is sealed with STREAM's "last" flag. Each sealed chunk carries a 16-byte
//! tag. The SHA-256 of the whole blob (the *digest*) travels with the key inside the MLS message,
//! so the receiver also knows it got exactly the bytes the sender uploaded.

use std::io::{self, Read, Write};

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use rand::RngCore;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Plaintext bytes per chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Bytes of the blob header: version and nonce prefix.
pub const HEADER_BYTES: usize = 1 + NONCE_PREFIX_BYTES;
/// Bytes of authentication tag per chunk.
pub const TAG_BYTES: usize = 16;
const NONCE_PREFIX_BYTES: usize = 19;
const FORMAT_VERSION: u8 = 1;

/// Why an attachment could not be encrypted or decrypted.
#[derive(Debug, Error)]
pub enum AttachmentError {
    /// The blob ended early.
    #[error("the file is truncated")]
    Truncated,
    /// The blob is longer than the sender said.
    #[error("the file is longer than announced")]
    TooLong,
    /// A chunk failed authentication: altered data or the wrong key.
    #[error("the file was altered (a chunk failed authentication)")]
    Tampered,
    /// The blob's SHA-256 differs from the one the sender sent.
    #[error("the file's digest does not match the one in the message")]
    DigestMismatch,
    /// Not a blob of a known format.
    #[error("unknown attachment format {0}")]
    UnknownFormat(u8),
    /// The source changed size while being read.
    #[error("the file changed while it was being encrypted")]
    SourceChanged,
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

symmetric_key!(
    /// A 256-bit key that encrypts one file, and nothing else.
    AttachmentKey
);

/// What the receiver needs besides the key: sizes and digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// SHA-256 of the whole blob.
    pub digest: [u8; 32],
    /// Bytes of the original file.
    pub plaintext_size: u64,
    /// Bytes of the blob.
    pub ciphertext_size: u64,
}

/// Number of chunks a file of `plaintext_size` bytes is cut into (at least one).
fn chunk_count(plaintext_size: u64) -> u64 {
    plaintext_size.div_ceil(CHUNK_BYTES as u64).max(1)
}

/// Size of the blob for a file of `plaintext_size` bytes.
pub fn ciphertext_size(plaintext_size: u64) -> u64 {
    HEADER_BYTES as u64 + plaintext_size + chunk_count(plaintext_size) * TAG_BYTES as u64
}

/// Encrypts exactly `plaintext_size` bytes from `source` into `sink`; returns digest and sizes.
pub fn encrypt(
    key: &AttachmentKey,
    source: &mut impl Read,
    plaintext_size: u64,
    sink: &mut impl Write,
    rng: &mut impl RngCore,
) -> Result<Sealed, AttachmentError> {
    let mut nonce_prefix = [0u8; NONCE_PREFIX_BYTES];
    rng.fill_bytes(&mut nonce_prefix);
    let mut header = [0u8; HEADER_BYTES];
    header[0] = FORMAT_VERSION;
    header[1..].copy_from_slice(&nonce_prefix);
    let mut hasher = Sha256::new();
    let mut emit = |bytes: &[u8]| -> io::Result<()> {
        hasher.update(bytes);
        sink.write_all(bytes)
    };
    emit(&header)?;

    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    let mut encryptor = EncryptorBE32::from_aead(cipher, nonce_prefix.as_slice().into());
    let chunks = chunk_count(plaintext_size);
    let mut buffer = Vec::with_capacity(CHUNK_BYTES + TAG_BYTES);
    let mut remaining = plaintext_size;
    for index in 0..chunks {
        let length = remaining.min(CHUNK_BYTES as u64) as usize;
        buffer.clear();
        buffer.resize(length, 0);
        source.read_exact(&mut buffer).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => AttachmentError::SourceChanged,
            _ => AttachmentError::Io(e),
        })?;
        remaining -= length as u64;
        if index + 1 == chunks {
            encryptor
                .encrypt_last_in_place(b"", &mut buffer)
                .map_err(|_| AttachmentError::Tampered)?;
            emit(&buffer)?;
            break;
        }
        encryptor
            .encrypt_next_in_place(b"", &mut buffer)
            .map_err(|_| AttachmentError::Tampered)?;
        emit(&buffer)?;
    }
    // A source longer than announced changed under us: refuse rather than send part of it.
    if source.read(&mut [0u8; 1])? != 0 {
        return Err(AttachmentError::SourceChanged);
    }
    Ok(Sealed {
        digest: hasher.finalize().into(),
        plaintext_size,
        ciphertext_size: ciphertext_size(plaintext_size),
    })
}

/// Decrypts a blob from `source` into `sink`, checking every chunk, the length and the digest.
///
/// Plaintext reaches `sink` chunk by chunk before the digest can be checked at the end: write to
/// a temporary file and keep it only if this returns `Ok`.
pub fn decrypt(
    key: &AttachmentKey,
    source: &mut impl Read,
    expected: &Sealed,
    sink: &mut impl Write,
) -> Result<(), AttachmentError> {
    let mut hasher = Sha256::new();
    let mut header = [0u8; HEADER_BYTES];
    read_exact(source, &mut header)?;
    hasher.update(header);
    if header[0] != FORMAT_VERSION {
        return Err(AttachmentError::UnknownFormat(header[0]));
    }
    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    let mut decryptor = DecryptorBE32::from_aead(cipher, header[1..].into());
    let chunks = chunk_count(expected.plaintext_size);
    let mut buffer = Vec::with_capacity(CHUNK_BYTES + TAG_BYTES);
    let mut remaining = expected.plaintext_size;
    for index in 0..chunks {
        let length = remaining.min(CHUNK_BYTES as u64) as usize;
        remaining -= length as u64;
        buffer.clear();
        buffer.resize(length + TAG_BYTES, 0);
        read_exact(source, &mut buffer)?;
        hasher.update(&buffer);
        if index + 1 == chunks {
            decryptor
                .decrypt_last_in_place(b"", &mut buffer)
                .map_err(|_| AttachmentError::Tampered)?;
            sink.write_all(&buffer)?;
            break;
        }
        decryptor
            .decrypt_next_in_place(b"", &mut buffer)
            .map_err(|_| AttachmentError::Tampered)?;
        sink.write_all(&buffer)?;
    }
    if source.read(&mut [0u8; 1])? != 0 {
        return Err(AttachmentError::TooLong);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    if digest != expected.digest {
        return Err(AttachmentError::DigestMismatch);
    }
    Ok(())
}

fn read_exact(source: &mut impl Read, buffer: &mut [u8]) -> Result<(), AttachmentError> {
    source.read_exact(buffer).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => AttachmentError::Truncated,
        _ => AttachmentError::Io(e),
    })
}

/// A media type for a file name, from its extension; `application/octet-stream` when unknown.
pub fn media_type_for(name: &str) -> &'static str {
    let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match extension.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("heic") => "image/heic",
        Some("pdf") => "application/pdf",
        Some("txt") => "text/plain",
        Some("csv") => "text/csv",
        Some("json") => "application/json",
        Some("zip") => "application/zip",
        Some("mp4") => "video/mp4",
        Some("mp3") => "audio/mpeg",
        Some("ogg") => "audio/ogg",
        Some("doc") => "application/msword",
        Some("docx") => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        Some("xlsx") => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        _ => "application/octet-stream",
    }
}

/// A file name safe to create: no directories, no control characters, no hidden or empty
/// names, at most 255 bytes.
pub fn sanitize_file_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '\0' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    let cleaned = cleaned.trim().trim_start_matches('.').to_owned();
    let mut cleaned = if cleaned.is_empty() { "file".to_owned() } else { cleaned };
    while cleaned.len() > crate::content::MAX_FILE_NAME_BYTES {
        cleaned.pop();
    }
    cleaned
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seal(plaintext: &[u8]) -> (AttachmentKey, Sealed, Vec<u8>) {
        let key = AttachmentKey::generate(&mut rand::rng());
        let mut blob = Vec::new();
        let sealed = encrypt(
            &key,
            &mut &plaintext[..],
            plaintext.len() as u64,
            &mut blob,
            &mut rand::rng(),
        )
        .unwrap();
        (key, sealed, blob)
    }

    fn open(key: &AttachmentKey, sealed: &Sealed, blob: &[u8]) -> Result<Vec<u8>, AttachmentError> {
        let mut out = Vec::new();
        decrypt(key, &mut &blob[..], sealed, &mut out).map(|()| out)
    }

    #[test]
    fn sizes_at_chunk_boundaries() {
        for size in [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES] {
            let plaintext = vec![0x5a; size];
            let (key, sealed, blob) = seal(&plaintext);
            assert_eq!(blob.len() as u64, sealed.ciphertext_size, "size {size}");
            assert_eq!(sealed.ciphertext_size, ciphertext_size(size as u64));
            assert_eq!(open(&key, &sealed, &blob).unwrap(), plaintext, "size {size}");
        }
    }

    #[test]
    fn refuses_truncation_extension_tampering_and_wrong_key() {
        let plaintext: Vec<u8> = (0..(2 * CHUNK_BYTES + 100)).map(|i| i as u8).collect();
        let (key, sealed, blob) = seal(&plaintext);
        assert!(!blob.windows(64).any(|w| plaintext.windows(64).next() == Some(w)));

        // Cut at a chunk boundary: without STREAM's last flag this would look like a shorter file.
        let boundary = HEADER_BYTES + CHUNK_BYTES + TAG_BYTES;
        assert!(matches!(
            open(&key, &sealed, &blob[..boundary]),
            Err(AttachmentError::Truncated)
        ));
        let shorter = Sealed {
            plaintext_size: CHUNK_BYTES as u64,
            ciphertext_size: boundary as u64,
            ..sealed
        };
        assert!(matches!(
            open(&key, &shorter, &blob[..boundary]),
            Err(AttachmentError::Tampered)
        ));

        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(open(&key, &sealed, &longer), Err(AttachmentError::TooLong)));

        let mut flipped = blob.clone();
        flipped[HEADER_BYTES + CHUNK_BYTES + 3] ^= 1;
        assert!(matches!(open(&key, &sealed, &flipped), Err(AttachmentError::Tampered)));

        // Swapping two whole chunks fails too: each chunk's nonce carries its position.
        let mut swapped = blob.clone();
        let chunk = CHUNK_BYTES + TAG_BYTES;
        let (first, second) = swapped[HEADER_BYTES..HEADER_BYTES + 2 * chunk].split_at_mut(chunk);
        first.swap_with_slice(second);
        assert!(matches!(open(&key, &sealed, &swapped), Err(AttachmentError::Tampered)));

        let other = AttachmentKey::generate(&mut rand::rng());
        assert!(matches!(open(&other, &sealed, &blob), Err(AttachmentError::Tampered)));

        let wrong_digest = Sealed {
            digest: [0; 32],
            ..sealed
        };
        assert!(matches!(
            open(&key, &wrong_digest, &blob),
            Err(AttachmentError::DigestMismatch)
        ));
    }

    #[test]
    fn refuses_a_source_that_changes_size() {
        let key = AttachmentKey::generate(&mut rand::rng());
        let data = vec![1u8; 1000];
        let shorter = encrypt(&key, &mut &data[..], 1001, &mut Vec::new(), &mut rand::rng());
        assert!(matches!(shorter, Err(AttachmentError::SourceChanged)));
        let longer = encrypt(&key, &mut &data[..], 999, &mut Vec::new(), &mut rand::rng());
        assert!(matches!(longer, Err(AttachmentError::SourceChanged)));
    }

    proptest! {
        #[test]
        fn any_content_round_trips(plaintext in proptest::collection::vec(any::<u8>(), 0..(3 * CHUNK_BYTES))) {
            let (key, sealed, blob) = seal(&plaintext);
            prop_assert_eq!(open(&key, &sealed, &blob).unwrap(), plaintext);
        }

        #[test]
        fn any_single_byte_change_is_refused(position in 0usize..(HEADER_BYTES + 200 + TAG_BYTES), bit in 0u8..8) {
            let plaintext = vec![7u8; 200];
            let (key, sealed, mut blob) = seal(&plaintext);
            blob[position] ^= 1 << bit;
            prop_assert!(open(&key, &sealed, &blob).is_err());
        }
    }
}
