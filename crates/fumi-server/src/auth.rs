//! Device authentication: `Authorization: Fumi <device-id>:<secret>` where the secret is 64 hex
//! digits. The server keeps only SHA-256 of the secret, so its database cannot be replayed as
//! credentials.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use fumi_proto::{AUTH_SCHEME, AccountId, DEVICE_SECRET_LEN, DeviceId, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// The device that signed a request, authenticated.
#[derive(Debug, Clone, Copy)]
pub struct AuthDevice {
    /// The device.
    pub device: DeviceId,
    /// Its account.
    pub account: AccountId,
    /// The region holding the account's data (see [`crate::regions::Regions::get`]).
    pub region: usize,
}

impl FromRequestParts<Arc<AppState>> for AuthDevice {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthenticated("missing Authorization header"))?
            .to_str()
            .map_err(|_| ApiError::unauthenticated("malformed Authorization header"))?;
        let (device, secret) = parse_credentials(header)?;
        let record = state
            .storage
            .device_auth(device)
            .await?
            .ok_or_else(|| ApiError::unauthenticated("unknown device or wrong secret"))?;
        let hash: [u8; 32] = Sha256::digest(secret).into();
        if !bool::from(hash.ct_eq(&record.secret_hash)) {
            return Err(ApiError::unauthenticated("unknown device or wrong secret"));
        }
        if record.removed {
            return Err(ApiError::new(
                ErrorCode::DeviceRemoved,
                "this device was removed from its account",
            ));
        }
        if record.suspended {
            return Err(ApiError::new(ErrorCode::AccountSuspended, "this account is suspended"));
        }
        // While its data moves, an account's devices wait (their mailbox, KeyPackages and
        // profile are being copied); a minute at most for a usual account.
        let region = state.regions.resident(&record.residency)?;
        if !state.device_limiter.check(&device, Instant::now()) {
            Metrics::inc(&state.metrics.rate_limited);
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                "too many requests from this device; slow down",
            ));
        }
        Ok(Self {
            device,
            account: record.account,
            region,
        })
    }
}

fn parse_credentials(header: &str) -> Result<(DeviceId, [u8; DEVICE_SECRET_LEN]), ApiError> {
    let malformed = || ApiError::unauthenticated(format!("Authorization must be '{AUTH_SCHEME} <device-id>:<secret>'"));
    let rest = header
        .strip_prefix(AUTH_SCHEME)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(malformed)?;
    let (device, secret) = rest.split_once(':').ok_or_else(malformed)?;
    let device = DeviceId::parse(device).map_err(|_| malformed())?;
    let mut bytes = [0u8; DEVICE_SECRET_LEN];
    hex::decode_to_slice(secret, &mut bytes).map_err(|_| malformed())?;
    Ok((device, bytes))
}
