//! Test-only ways to make the server behave as a malicious operator would, so the test suite can
//! show that clients notice. Compiled only with the `test-hooks` feature, which only the test
//! suite enables (`fumi-cli`'s dev-dependencies): a release build has none of this. Even a
//! binary built with it serves the hooks only when started with `FUMI_TEST_HOOKS=1` (the
//! `fumi` binary `cargo test` leaves in the target directory must not lie by accident).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use fumi_proto::{AccountId, Base64Bytes, DeviceId};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::storage::Ciphertext;
use crate::{AppState, now_ms};

/// Whether this process serves the hooks (`FUMI_TEST_HOOKS=1`).
pub fn enabled() -> bool {
    std::env::var("FUMI_TEST_HOOKS").as_deref() == Ok("1")
}

/// What the server has been told to lie about.
#[derive(Default)]
pub struct TestHooks {
    /// Accounts whose identity key and KeyPackages are swapped for the operator's.
    pub impersonated: Mutex<HashMap<AccountId, Impersonation>>,
    /// A device to name as the one that used any link slot.
    pub linked_device: Mutex<Option<DeviceId>>,
}

/// `POST /v1/test/link-status`.
#[derive(Debug, Deserialize)]
pub struct LinkStatusOverride {
    device_id: DeviceId,
}

/// `POST /v1/test/link-status`: from now on, name this device as the one that used a link.
pub async fn link_status(State(state): State<Arc<AppState>>, Json(request): Json<LinkStatusOverride>) -> Json<()> {
    *state.test_hooks.linked_device.lock().expect("hooks lock") = Some(request.device_id);
    Json(())
}

/// An operator's stand-in for an account.
#[derive(Debug, Clone, Deserialize)]
pub struct Impersonation {
    /// The identity key served instead of the account's.
    pub identity_key: Base64Bytes,
    /// KeyPackages served instead of the account's, by device.
    pub key_packages: Vec<(DeviceId, Base64Bytes)>,
}

/// `POST /v1/test/impersonate`.
#[derive(Debug, Deserialize)]
pub struct ImpersonateRequest {
    account_id: AccountId,
    #[serde(flatten)]
    impersonation: Impersonation,
}

/// `POST /v1/test/impersonate`: from now on, serve this identity key and these KeyPackages for
/// the account (the directory is left alone, as an operator avoiding the log would).
pub async fn impersonate(State(state): State<Arc<AppState>>, Json(request): Json<ImpersonateRequest>) -> Json<()> {
    state
        .test_hooks
        .impersonated
        .lock()
        .expect("hooks lock")
        .insert(request.account_id, request.impersonation);
    Json(())
}

/// `POST /v1/test/phantom-device`.
#[derive(Debug, Deserialize)]
pub struct PhantomDevice {
    account_id: AccountId,
    device_id: DeviceId,
    key_package: Base64Bytes,
    signature_key: Base64Bytes,
    /// Keep it out of the key directory (and so out of its owner's sight).
    hidden: bool,
}

/// `POST /v1/test/phantom-device`: adds a device the account holder never linked, with a
/// KeyPackage, as an operator with database access could.
pub async fn phantom_device(
    State(state): State<Arc<AppState>>,
    Json(request): Json<PhantomDevice>,
) -> Result<Json<()>, ApiError> {
    if request.hidden {
        state.keys.hide_device(request.device_id);
    }
    let token_hash: [u8; 32] = rand::random();
    let now = now_ms();
    state
        .storage
        .create_link(&token_hash, request.account_id, Ciphertext(vec![0]), now, now + 60_000)
        .await?;
    state
        .storage
        .link_device(
            &token_hash,
            request.account_id,
            request.device_id,
            &rand::random(),
            vec![Ciphertext(request.key_package.into_vec())],
            None,
            now,
        )
        .await?;
    state
        .storage
        .set_signature_key(request.device_id, request.signature_key.as_slice())
        .await?;
    Ok(Json(()))
}

/// Answer of `POST /v1/test/keys/publish`.
#[derive(Debug, Serialize)]
pub struct Published {
    epoch: Option<u64>,
}

/// `POST /v1/test/keys/publish`: publishes marked changes now instead of at the next interval.
pub async fn publish(State(state): State<Arc<AppState>>) -> Result<Json<Published>, ApiError> {
    let epoch = state.keys.publish_pending(10_000).await?;
    Ok(Json(Published { epoch }))
}

/// Devices kept out of the directory values.
#[derive(Default)]
pub struct HiddenDevices(Mutex<HashSet<DeviceId>>);

impl HiddenDevices {
    pub(crate) fn insert(&self, device: DeviceId) {
        self.0.lock().expect("hooks lock").insert(device);
    }

    pub(crate) fn contains(&self, device: &DeviceId) -> bool {
        self.0.lock().expect("hooks lock").contains(device)
    }
}
