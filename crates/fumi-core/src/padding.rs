//! Padmé padding (Nikitin et al., "Reducing Metadata Leakage from Encrypted Files and
//! Communication with PURBs", 2019): a length L is rounded up so that only the top
//! O(log log L) bits of its binary form are free, which leaks at most O(log log L) bits about L
//! with at most 12% overhead.
//!
//! Framing: `u32 big-endian length ‖ payload ‖ zeros`, the whole padded to a Padmé size.

use thiserror::Error;

/// The padded frame is not one that [`pad`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("padded content is malformed")]
pub struct PaddingError;

/// The Padmé length for `len` bytes.
pub fn padme_length(len: u64) -> u64 {
    if len < 2 {
        return len;
    }
    let e = 63 - u64::from(len.leading_zeros()); // floor(log2(len))
    let s = 64 - u64::from(e.leading_zeros()); // floor(log2(e)) + 1
    let last_bits = e - s;
    let mask = (1u64 << last_bits) - 1;
    (len + mask) & !mask
}

/// Frames `payload` with its length and pads the frame to its Padmé length.
pub fn pad(payload: &[u8]) -> Vec<u8> {
    let framed_len = payload.len() + 4;
    let total = padme_length(framed_len as u64) as usize;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.resize(total, 0);
    out
}

/// Recovers the payload of a frame made by [`pad`]. Non-zero padding is refused.
pub fn unpad(padded: &[u8]) -> Result<&[u8], PaddingError> {
    let header: [u8; 4] = padded
        .get(..4)
        .ok_or(PaddingError)?
        .try_into()
        .map_err(|_| PaddingError)?;
    let len = u32::from_be_bytes(header) as usize;
    let payload = padded.get(4..4 + len).ok_or(PaddingError)?;
    if padded[4 + len..].iter().any(|&b| b != 0) {
        return Err(PaddingError);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_padme_lengths() {
        // Values from the PURBs paper's definition, computed by hand.
        assert_eq!(padme_length(0), 0);
        assert_eq!(padme_length(1), 1);
        assert_eq!(padme_length(9), 10);
        assert_eq!(padme_length(100), 104);
        assert_eq!(padme_length(1000), 1024);
        assert_eq!(padme_length(1025), 1088);
    }

    proptest! {
        #[test]
        fn padding_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let padded = pad(&payload);
            prop_assert_eq!(unpad(&padded).unwrap(), &payload[..]);
        }

        #[test]
        fn overhead_is_at_most_12_percent(len in 64u64..10_000_000) {
            let padded = padme_length(len);
            prop_assert!(padded >= len);
            prop_assert!((padded - len) as f64 <= 0.12 * len as f64);
        }

        #[test]
        fn unpad_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unpad(&bytes);
        }
    }
}
