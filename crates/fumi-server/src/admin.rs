//! The admin API: the only way an operator touches stored data. It listens on its own address
//! (loopback by default). Every request is signed by an operator key listed in the configuration
//! and states a reason; the access policy (operator keys, their networks, allowed jurisdictions)
//! is checked, and every request — allowed or refused — is appended to the transparency log
//! before anything is returned or changed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router, routing};
use ed25519_dalek::{Signature, VerifyingKey};
use fumi_audit::{Entry, Outcome, Subject, account_tag};
use fumi_proto::{AccountId, BlobId, ErrorCode, admin_headers};
use ipnet::IpNet;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::storage::StorageError;
use crate::{AppState, now_ms};

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;
/// How far a request's timestamp may be from the server's clock.
const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Longest stated reason.
const MAX_REASON_BYTES: usize = 200;

/// An operator as configured: `[[operators]]` in the server's TOML file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Name shown in the log.
    pub name: String,
    /// Ed25519 public key, 64 hex digits (`fumi admin keygen` prints it).
    pub public_key: String,
    /// Where the operator works (an ISO country code or similar), shown in the log.
    pub jurisdiction: String,
    /// Networks (CIDR) the operator's requests may come from.
    pub networks: Vec<String>,
}

struct Operator {
    name: String,
    key: VerifyingKey,
    jurisdiction: String,
    networks: Vec<IpNet>,
}

/// The access policy, parsed from the configuration once at start.
pub struct AdminPolicy {
    operators: Vec<Operator>,
    /// Jurisdictions whose operators may act now (empty: any configured operator).
    jurisdictions: Vec<String>,
}

impl AdminPolicy {
    /// Parses and checks the operator list.
    pub fn from_config(config: &crate::Config) -> Result<Self, String> {
        let mut operators = Vec::new();
        for operator in &config.operators {
            let context = |what: &str| format!("operator {:?}: {what}", operator.name);
            if operator.name.is_empty() || !operator.name.chars().all(|c| c.is_ascii_graphic()) {
                return Err(context("the name must be printable ASCII without spaces"));
            }
            // The log names operators: two with one name could not be told apart.
            if operators.iter().any(|o: &Operator| o.name == operator.name) {
                return Err(context("listed twice; operator names must be unique"));
            }
            let key: [u8; 32] = hex::decode(&operator.public_key)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| context("public_key must be 64 hex digits"))?;
            let key = VerifyingKey::from_bytes(&key).map_err(|_| context("public_key is not an Ed25519 key"))?;
            let networks = operator
                .networks
                .iter()
                .map(|network| {
                    network
                        .parse::<IpNet>()
                        .map_err(|_| context(&format!("{network:?} is not a network in CIDR form")))
                })
                .collect::<Result<_, _>>()?;
            operators.push(Operator {
                name: operator.name.clone(),
                key,
                jurisdiction: operator.jurisdiction.clone(),
                networks,
            });
        }
        Ok(Self {
            operators,
            jurisdictions: config.admin_jurisdictions.clone(),
        })
    }
}

/// One admin route: its method, path and the action name its log entries carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminEndpoint {
    /// HTTP method.
    pub method: &'static str,
    /// Path template.
    pub path: &'static str,
    /// Action name in the log.
    pub action: &'static str,
}

/// Every admin route, for the router and for tests that walk them.
pub fn endpoints() -> Vec<AdminEndpoint> {
    routes().into_iter().map(|(endpoint, _)| endpoint).collect()
}

fn routes() -> Vec<(AdminEndpoint, routing::MethodRouter<Arc<AppState>>)> {
    let e = |method, path, action| AdminEndpoint { method, path, action };
    vec![
        (
            e("GET", "/admin/v1/accounts", "list_accounts"),
            routing::get(list_accounts),
        ),
        (
            e("GET", "/admin/v1/accounts/{account}", "read_account"),
            routing::get(read_account),
        ),
        (
            e("POST", "/admin/v1/accounts/{account}/suspend", "suspend_account"),
            routing::post(suspend_account),
        ),
        (
            e("POST", "/admin/v1/accounts/{account}/unsuspend", "unsuspend_account"),
            routing::post(unsuspend_account),
        ),
        (
            e("DELETE", "/admin/v1/accounts/{account}", "purge_account"),
            routing::delete(purge_account),
        ),
        (
            e("GET", "/admin/v1/reports", "list_reports"),
            routing::get(list_reports),
        ),
        (
            e("GET", "/admin/v1/reports/{report}", "read_report"),
            routing::get(read_report),
        ),
        (
            e("DELETE", "/admin/v1/blobs/{blob}", "delete_blob"),
            routing::delete(delete_blob),
        ),
        (
            e("GET", "/admin/v1/metrics", "view_metrics"),
            routing::get(view_metrics),
        ),
        (
            e("POST", "/admin/v1/accounts/{account}/relocate", "relocate_account"),
            routing::post(relocate_account),
        ),
    ]
}

/// The admin router: every route behind [`authorize`].
pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for (endpoint, handler) in routes() {
        router = router.route(endpoint.path, handler);
    }
    router
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such admin endpoint; see docs/PROTOCOL.md") })
        .with_state(state)
}

/// An authorised operator request, for its handler to record before acting.
#[derive(Clone)]
pub struct AdminContext {
    operator: String,
    jurisdiction: String,
    source: IpAddr,
    reason: String,
    action: &'static str,
    time: u64,
    recorded: Arc<AtomicBool>,
}

/// A record an admin request touches, before it is named in the log.
pub enum Target {
    /// An account.
    Account(AccountId),
    /// A blob.
    Blob(BlobId),
    /// An abuse report.
    Report(u64),
}

impl AdminContext {
    /// Appends this request's entry, naming `targets`, and returns once it is durable. Handlers
    /// call it exactly once, before reading or changing anything.
    pub async fn record(
        &self,
        state: &AppState,
        targets: &[Target],
        mut details: BTreeMap<String, serde_json::Value>,
    ) -> Result<(), ApiError> {
        let mut nonce = [0u8; 16];
        rand::rng().fill_bytes(&mut nonce);
        let mut subjects = Vec::new();
        for target in targets {
            match target {
                Target::Account(account) => match state.storage.audit_key(*account).await {
                    Ok(key) => subjects.push(Subject::Account {
                        tag: hex::encode(account_tag(&key, &nonce)),
                    }),
                    Err(StorageError::UnknownAccount) => {
                        details.insert("unknown_account".into(), true.into());
                    }
                    Err(error) => return Err(error.into()),
                },
                Target::Blob(blob) => subjects.push(Subject::Blob { id: blob.to_string() }),
                Target::Report(id) => subjects.push(Subject::Report { id: *id }),
            }
        }
        let entry = self.entry(Outcome::Allowed, subjects, details, hex::encode(nonce));
        if self.recorded.swap(true, Ordering::SeqCst) {
            tracing::error!(action = self.action, "an admin request recorded twice");
        }
        state.audit.append(state.storage.as_ref(), &entry).await?;
        Ok(())
    }

    /// This request's log entry.
    fn entry(
        &self,
        outcome: Outcome,
        subjects: Vec<Subject>,
        details: BTreeMap<String, serde_json::Value>,
        nonce: String,
    ) -> Entry {
        Entry {
            time: self.time,
            operator: self.operator.clone(),
            jurisdiction: self.jurisdiction.clone(),
            source: self.source.to_string(),
            action: self.action.to_owned(),
            reason: self.reason.clone(),
            outcome,
            subjects,
            details,
            nonce,
        }
    }

    /// Parses an account id from the path and records the request naming it (an unparsable id
    /// is recorded too, then refused with 400).
    async fn record_account(&self, state: &AppState, raw: &str) -> Result<AccountId, ApiError> {
        match AccountId::parse(raw) {
            Ok(account) => {
                self.record(state, &[Target::Account(account)], BTreeMap::new()).await?;
                Ok(account)
            }
            Err(_) => {
                self.record(state, &[], details([("malformed_id", true.into())]))
                    .await?;
                Err(ApiError::bad_request("the account id is not 32 hex digits"))
            }
        }
    }
}

fn details<const N: usize>(pairs: [(&str, serde_json::Value); N]) -> BTreeMap<String, serde_json::Value> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Why a request was refused, with its answer.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    reason: &'static str,
    /// Whether the operator's signature had verified (so the log may name them).
    signed: bool,
}

const fn refusal(status: StatusCode, code: &'static str, reason: &'static str) -> Refusal {
    Refusal {
        status,
        code,
        reason,
        signed: false,
    }
}

const fn signed_refusal(status: StatusCode, code: &'static str, reason: &'static str) -> Refusal {
    Refusal {
        status,
        code,
        reason,
        signed: true,
    }
}

/// Checks signature and policy; logs a refusal, or hands the handler an [`AdminContext`].
async fn authorize(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    matched: MatchedPath,
    request: Request,
    next: Next,
) -> Response {
    let time = now_ms();
    // axum answers HEAD on GET routes: it reads the same data, so it is logged as the GET.
    let method = match request.method().as_str() {
        "HEAD" => "GET",
        other => other,
    };
    let action = endpoints()
        .into_iter()
        .find(|e| e.path == matched.as_str() && e.method == method)
        .map_or("unknown", |e| e.action);
    let (parts, body) = request.into_parts();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let claimed_operator: String = header(admin_headers::OPERATOR).chars().take(64).collect();
    let reason = header(admin_headers::REASON).to_owned();
    let operator = state.admin.operators.iter().find(|o| o.name == claimed_operator);

    let checked = async {
        let body = axum::body::to_bytes(body, MAX_ADMIN_BODY)
            .await
            .map_err(|_| refusal(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "request body too large"))?;
        let timestamp: u64 = header(admin_headers::TIMESTAMP).parse().map_err(|_| {
            refusal(
                StatusCode::UNAUTHORIZED,
                "unsigned",
                "missing or malformed signature headers",
            )
        })?;
        let nonce = header(admin_headers::NONCE);
        let signature: [u8; 64] = hex::decode(header(admin_headers::SIGNATURE))
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .filter(|_| nonce.len() == 32 && nonce.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or(refusal(
                StatusCode::UNAUTHORIZED,
                "unsigned",
                "missing or malformed signature headers",
            ))?;
        let operator = operator.ok_or(refusal(
            StatusCode::UNAUTHORIZED,
            "unknown_operator",
            "unknown operator",
        ))?;
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let message = fumi_proto::admin_request_message(
            parts.method.as_str(),
            path_and_query,
            timestamp,
            nonce,
            &operator.name,
            &reason,
            &Sha256::digest(&body).into(),
        );
        operator
            .key
            .verify_strict(&message, &Signature::from_bytes(&signature))
            .map_err(|_| refusal(StatusCode::UNAUTHORIZED, "bad_signature", "bad signature"))?;
        if reason.is_empty() || reason.len() > MAX_REASON_BYTES || !reason.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(signed_refusal(
                StatusCode::BAD_REQUEST,
                "no_reason",
                "no valid reason stated (1-200 printable ASCII characters)",
            ));
        }
        if timestamp.abs_diff(time) > MAX_CLOCK_SKEW_MS {
            return Err(signed_refusal(
                StatusCode::UNAUTHORIZED,
                "stale_request",
                "timestamp outside five minutes",
            ));
        }
        // Remembered in the database, so a restart does not reopen the replay window.
        let fresh = state
            .storage
            .remember_admin_nonce(nonce, time, time + 2 * MAX_CLOCK_SKEW_MS)
            .await
            .map_err(|_| signed_refusal(StatusCode::SERVICE_UNAVAILABLE, "audit_busy", "nonce store unavailable"))?;
        if !fresh {
            return Err(signed_refusal(
                StatusCode::UNAUTHORIZED,
                "replayed_request",
                "replayed request",
            ));
        }
        if !operator.networks.iter().any(|network| network.contains(&peer.ip())) {
            return Err(signed_refusal(
                StatusCode::FORBIDDEN,
                "network_not_allowed",
                "network not allowed",
            ));
        }
        if !state.admin.jurisdictions.is_empty() && !state.admin.jurisdictions.contains(&operator.jurisdiction) {
            return Err(signed_refusal(
                StatusCode::FORBIDDEN,
                "jurisdiction_not_allowed",
                "jurisdiction not allowed",
            ));
        }
        Ok((operator, body))
    };
    match checked.await {
        Ok((operator, body)) => {
            let context = AdminContext {
                operator: operator.name.clone(),
                jurisdiction: operator.jurisdiction.clone(),
                source: peer.ip(),
                reason,
                action,
                time,
                recorded: Arc::new(AtomicBool::new(false)),
            };
            let unhandled = context.clone();
            let mut request = Request::from_parts(parts, Body::from(body));
            request.extensions_mut().insert(context);
            let response = next.run(request).await;
            if !unhandled.recorded.load(Ordering::SeqCst) {
                // Refused before its handler ran (an undecodable path, say): nothing was read or
                // changed, and the attempt is still logged, as a refusal.
                let entry = unhandled.entry(
                    Outcome::Refused("malformed request".into()),
                    vec![],
                    details([("status", response.status().as_u16().into())]),
                    String::new(),
                );
                if let Err(error) = state.audit.append(state.storage.as_ref(), &entry).await {
                    tracing::error!(%error, action, "logging a malformed admin request failed");
                }
            }
            response
        }
        Err(refused) => {
            // The claimed name is shown only once its signature verified; anyone can claim one.
            let verified = refused.signed;
            let mut details = BTreeMap::new();
            if !verified && !claimed_operator.is_empty() {
                details.insert("claimed_operator".to_owned(), claimed_operator.clone().into());
            }
            let entry = Entry {
                time,
                operator: if verified { claimed_operator } else { "unknown".into() },
                jurisdiction: match operator {
                    Some(o) if verified => o.jurisdiction.clone(),
                    _ => String::new(),
                },
                source: peer.ip().to_string(),
                action: action.to_owned(),
                reason: if verified { reason } else { String::new() },
                outcome: Outcome::Refused(refused.reason.to_owned()),
                subjects: vec![],
                details,
                nonce: String::new(),
            };
            if let Err(error) = state.audit.append(state.storage.as_ref(), &entry).await {
                tracing::error!(%error, "logging a refused admin request failed");
            }
            tracing::warn!(action, reason = refused.reason, "admin request refused");
            ApiError::admin_refusal(refused.status, refused.code, refused.reason).into_response()
        }
    }
}

async fn list_accounts(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
) -> Result<impl IntoResponse, ApiError> {
    context.record(&state, &[], BTreeMap::new()).await?;
    let mut accounts = state.storage.account_summaries().await?;
    for summary in &mut accounts {
        summary.region = crate::regions::region_names(&state.regions, &summary.region);
        // An account living elsewhere has its mailboxes and KeyPackages in its region.
        if let Some(index) = state.regions.by_name(&summary.region).filter(|i| *i != 0) {
            let devices = crate::regions::live_devices(&state, summary.account).await?;
            let (envelopes, bytes, key_packages) =
                crate::regions::resident_counts(state.regions.get(index), &devices).await?;
            summary.queued_envelopes += envelopes;
            summary.queued_bytes += bytes;
            summary.key_packages += key_packages;
        }
    }
    Ok(Json(accounts))
}

/// An account's public keys: its identity key and devices (what a moderator checks a report's
/// sender against). The server holds nothing else about it.
async fn read_account(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
    Path(account): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let account_id = context.record_account(&state, &account).await?;
    let record = state
        .storage
        .account(account_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownAccount, "no such account"))?;
    Ok(Json(fumi_proto::AccountInfo {
        account_id,
        identity_key: fumi_proto::Base64Bytes(record.identity_key),
        devices: record.devices,
    }))
}

async fn suspend_account(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
    Path(account): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let account = context.record_account(&state, &account).await?;
    state.storage.set_suspended(account, true).await?;
    // Its open delivery connections are closed by the next request check; new ones are refused.
    Ok(StatusCode::NO_CONTENT)
}

async fn unsuspend_account(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
    Path(account): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let account = context.record_account(&state, &account).await?;
    state.storage.set_suspended(account, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Answer of a purge.
#[derive(Serialize)]
struct Purged {
    blobs_deleted: usize,
}

async fn purge_account(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
    Path(account): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let account = context.record_account(&state, &account).await?;
    if state.regions.is_running(account) {
        return Err(ApiError::new(
            ErrorCode::RelocationRunning,
            "this account's data is being moved; purge it when the move has ended",
        ));
    }
    // What lives in the account's region (both ends of an interrupted relocation) is found
    // through the main database's rows: read them first.
    let holding = crate::regions::holding(&state, account).await?;
    let devices = crate::regions::live_devices(&state, account).await?;
    let blobs = state.storage.purge_account(account).await?;
    for region in holding {
        if !std::ptr::eq(region, state.regions.main()) {
            crate::regions::delete_resident(region, Some(account), &devices).await?;
        }
        for blob in &blobs {
            region.blobs.delete(*blob).await.map_err(ApiError::from)?;
        }
    }
    for blob in &blobs {
        crate::delete_blob(&state, *blob).await.map_err(ApiError::internal)?;
    }
    Ok(Json(Purged {
        blobs_deleted: blobs.len(),
    }))
}

async fn list_reports(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
) -> Result<impl IntoResponse, ApiError> {
    context.record(&state, &[], BTreeMap::new()).await?;
    Ok(Json(state.storage.reports().await?))
}

async fn read_report(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
    Path(report): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let Ok(id) = report.parse::<u64>() else {
        context
            .record(&state, &[], details([("malformed_id", true.into())]))
            .await?;
        return Err(ApiError::bad_request("the report id is not a number"));
    };
    context.record(&state, &[Target::Report(id)], BTreeMap::new()).await?;
    let sealed = state
        .storage
        .report(id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownReport, "no such report"))?;
    Ok(Json(fumi_proto::ReportSubmit {
        sealed: sealed.0.into(),
    }))
}

async fn delete_blob(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
    Path(blob): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let Ok(id) = BlobId::parse(&blob) else {
        context
            .record(&state, &[], details([("malformed_id", true.into())]))
            .await?;
        return Err(ApiError::bad_request("the blob id is not 32 hex digits"));
    };
    context.record(&state, &[Target::Blob(id)], BTreeMap::new()).await?;
    if state.storage.blob(id).await?.is_none() {
        return Err(StorageError::UnknownBlob.into());
    }
    crate::delete_blob(&state, id).await.map_err(ApiError::internal)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn view_metrics(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
) -> Result<impl IntoResponse, ApiError> {
    context.record(&state, &[], BTreeMap::new()).await?;
    let stats = crate::regions::stats(&state).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(stats),
    ))
}

/// `POST /admin/v1/accounts/{account}/relocate` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RelocateRequest {
    /// The target region's name.
    to: String,
}

/// Moves an account's data to another region (or finishes an interrupted move). The log entry,
/// written before anything moves, names both regions and holds the counts and SHA-256 digests
/// of what moves; the answer is a stream of JSON lines: progress, then `{"done": ...}` or
/// `{"error": ...}`. The move goes on if the operator disconnects; running it again finishes it.
async fn relocate_account(
    State(state): State<Arc<AppState>>,
    Extension(context): Extension<AdminContext>,
    Path(account): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Ok(account) = AccountId::parse(&account) else {
        context
            .record(&state, &[], details([("malformed_id", true.into())]))
            .await?;
        return Err(ApiError::bad_request("the account id is not 32 hex digits"));
    };
    let target = [Target::Account(account)];
    let request: RelocateRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            context
                .record(&state, &target, details([("malformed_body", true.into())]))
                .await?;
            return Err(ApiError::bad_request(format!(
                "the body must be {{\"to\": \"REGION\"}}: {error}"
            )));
        }
    };
    let Some(run) = state.regions.start_run(account) else {
        context
            .record(
                &state,
                &target,
                details([("to", request.to.clone().into()), ("refused", "running".into())]),
            )
            .await?;
        return Err(ApiError::new(
            ErrorCode::RelocationRunning,
            "a relocation of this account is running on this server; wait for it to end",
        ));
    };
    let plan = match crate::regions::prepare(&state, account, &request.to).await {
        Ok(Some(plan)) => plan,
        Ok(None) => {
            context
                .record(
                    &state,
                    &target,
                    details([("to", request.to.clone().into()), ("already_there", true.into())]),
                )
                .await?;
            let line = serde_json::json!({ "done": { "to": request.to, "already_there": true } });
            return Ok(ndjson(vec![line]));
        }
        Err(error) => {
            context
                .record(
                    &state,
                    &target,
                    details([("to", request.to.clone().into()), ("refused", error.to_string().into())]),
                )
                .await?;
            return Err(match error {
                crate::regions::RelocateError::UnknownAccount => {
                    ApiError::new(ErrorCode::UnknownAccount, "no such account")
                }
                crate::regions::RelocateError::Refused(message) => ApiError::new(ErrorCode::RelocationRefused, message),
                other => ApiError::internal(other),
            });
        }
    };
    let details = plan.details(&state.regions);
    if let Err(error) = context.record(&state, &target, details.clone()).await {
        plan.abandon(&state).await;
        return Err(error);
    }
    let (progress, lines) = tokio::sync::mpsc::channel::<serde_json::Value>(64);
    let worker = state.clone();
    tokio::spawn(async move {
        let result = crate::regions::run(&worker, plan, &progress).await;
        drop(run);
        let last = match result {
            Ok(()) => {
                tracing::info!("relocation finished");
                serde_json::json!({ "done": details })
            }
            Err(error) => {
                tracing::error!(%error, "relocation stopped; running it again resumes it");
                serde_json::json!({ "error": error.to_string() })
            }
        };
        let _ = progress.send(last).await;
    });
    let stream = futures_util::stream::unfold(lines, |mut lines| async move {
        let line = lines.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(format!("{line}\n")), lines))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A response of JSON lines.
fn ndjson(lines: Vec<serde_json::Value>) -> Response {
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], text).into_response()
}
