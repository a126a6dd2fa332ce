//! The client machine (docs/ARCHITECTURE.md, "The client machine"): this device's protocol
//! decisions over its MLS state and its store, with no clock, network or file of its own. Its
//! steps so far: receiving an envelope ([`crate::receive`]) and queueing a message
//! ([`crate::send`]). Today it borrows the device and the store its driver owns; the
//! `handle_*` / `poll_*` interface of the design grows on it.

use fumi_proto::{AccountId, DeviceId};
use openmls_traits::OpenMlsProvider;

use crate::mls::MlsDevice;
use crate::store::ClientStore;

/// One device: its MLS state, its store, and who it is.
pub struct Machine<'a, P: OpenMlsProvider, S: ClientStore> {
    /// The device's MLS state.
    pub device: &'a MlsDevice<P>,
    /// The client store (natively, its transactions cover OpenMLS's writes too).
    pub store: &'a S,
    /// This device's account.
    pub me: AccountId,
    /// This device.
    pub my_device: DeviceId,
    /// This account's identity public key.
    pub identity_key: [u8; 32],
    /// This account's current profile key (every message announces it).
    pub profile_key: [u8; 32],
}

/// Devices and stores in memory, for the machine's tests.
#[cfg(test)]
pub(crate) mod testing {
    use fumi_proto::{AccountId, DeviceId};
    use openmls_rust_crypto::OpenMlsRustCrypto;

    use crate::AccountIdentity;
    use crate::mls::MlsDevice;

    /// Device `n` of account `n`, its MLS state in memory, with its identity.
    pub(crate) fn device(n: u8) -> (MlsDevice<OpenMlsRustCrypto>, AccountIdentity) {
        open(n, OpenMlsRustCrypto::default())
    }

    /// Device `n` of account `n` over `provider`, with its identity.
    pub(crate) fn open<P: openmls_traits::OpenMlsProvider>(n: u8, provider: P) -> (MlsDevice<P>, AccountIdentity) {
        let key = MlsDevice::generate_signature_key(&provider).unwrap();
        let identity = AccountIdentity::generate(&mut rand::rng());
        let device = MlsDevice::open(
            provider,
            &identity,
            AccountId::from_bytes([n; 16]),
            DeviceId::from_bytes([n; 16]),
            &key,
        )
        .unwrap();
        (device, identity)
    }
}
