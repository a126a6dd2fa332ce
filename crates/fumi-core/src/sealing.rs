//! Small secret boxes: XChaCha20-Poly1305 with a random 24-byte nonce and a label naming what the
//! box holds (and for whom) as associated data, so a box of one kind or account cannot be replayed
//! as another. Used for profiles, avatars and device-link bundles.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

/// Bytes a box adds to its plaintext: nonce and tag.
pub const OVERHEAD_BYTES: usize = NONCE_BYTES + 16;
const NONCE_BYTES: usize = 24;

/// Seals `plaintext` under `key`, bound to `label`. Output: nonce ‖ ciphertext ‖ tag.
pub fn seal(key: &[u8; 32], label: &[u8], plaintext: &[u8], rng: &mut impl RngCore) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_BYTES];
    rng.fill_bytes(&mut nonce);
    let ciphertext = XChaCha20Poly1305::new(key.into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: label,
            },
        )
        .expect("encryption of a bounded buffer cannot fail");
    [nonce.as_slice(), &ciphertext].concat()
}

/// Opens a box made by [`seal`] with the same key and label; `None` if anything differs.
pub fn open(key: &[u8; 32], label: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < OVERHEAD_BYTES {
        return None;
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
    XChaCha20Poly1305::new(key.into())
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: label,
            },
        )
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_with_its_key_and_label() {
        let mut rng = rand::rng();
        let key = [7u8; 32];
        let sealed = seal(&key, b"label a", b"secret bytes", &mut rng);
        assert_eq!(sealed.len(), 12 + OVERHEAD_BYTES);
        assert_eq!(open(&key, b"label a", &sealed).as_deref(), Some(&b"secret bytes"[..]));
        assert_eq!(open(&key, b"label b", &sealed), None);
        assert_eq!(open(&[8u8; 32], b"label a", &sealed), None);
        let mut altered = sealed.clone();
        altered[30] ^= 1;
        assert_eq!(open(&key, b"label a", &altered), None);
        assert_eq!(open(&key, b"label a", &sealed[..20]), None);
    }
}
