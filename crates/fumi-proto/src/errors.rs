//! The stable error codes of the public API: each with the one HTTP status it is sent with and
//! what it means. The server answers with them, clients branch on them, and the table in
//! `docs/PROTOCOL.md` §3 is generated from [`ErrorCode::ALL`] (a test keeps it equal).

macro_rules! error_codes {
    ($( $variant:ident = ($code:literal, $status:literal, $meaning:literal), )*) => {
        /// A stable, machine-readable error code (`error.code` of every error answer).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( #[doc = $meaning] $variant, )*
        }

        impl ErrorCode {
            /// Every code, in the order of the protocol's table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code as it is sent (`epoch_conflict`).
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The HTTP status every answer with this code carries.
            pub const fn status(self) -> u16 {
                match self { $(ErrorCode::$variant => $status,)* }
            }

            /// When the server sends it, for the protocol's table.
            pub const fn meaning(self) -> &'static str {
                match self { $(ErrorCode::$variant => $meaning,)* }
            }

            /// The code a server sent, if this version knows it (a newer server may send more).
            pub fn parse(code: &str) -> Option<Self> {
                match code { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    BadRequest = ("bad_request", 400, "Malformed JSON, wrong field types, unknown fields, bad base64, wrong lengths (ids, keys, hashes), malformed path id or hash, not a well-formed MLS message of the expected type, group id not 16 bytes, a recipient listed twice or the sender listed as recipient, a Welcome without a commit, a sealed profile shorter than 40 bytes, 0 or more than 100 accounts in a claim, a sealed channel description or post shorter than 40 bytes, post number 0, a channel's blob that names recipients, a page `limit` outside 1–200, a KeyPackage that is not usable (§6.2)."),
    Unauthenticated = ("unauthenticated", 401, "Missing or malformed `Authorization`, unknown device, wrong secret."),
    DeviceRemoved = ("device_removed", 401, "The device's credential is right but the device was removed from its account (`DELETE /v1/devices/{device}` by another device); it can never sign in again."),
    AccountSuspended = ("account_suspended", 403, "The device's account is suspended."),
    BadSignature = ("bad_signature", 403, "`POST /v1/devices`: the new device is not signed by the account's identity key."),
    NotAMember = ("not_a_member", 403, "The sending device is not in the group's roster (never added, or removed by a commit)."),
    NotARecipient = ("not_a_recipient", 403, "`GET /v1/blobs/{blob}`, `POST /v1/blobs/{blob}/ack`: the device is not a recipient of this blob."),
    NotTheUploader = ("not_the_uploader", 403, "`PATCH /v1/blobs/{blob}`: another device started this upload."),
    NotChannelOwner = ("not_channel_owner", 403, "The caller's account did not create the channel: changing its description, posting in it, or creating a blob for it."),
    NotFound = ("not_found", 404, "No such endpoint (any unknown path)."),
    UnknownAccount = ("unknown_account", 404, "`GET /v1/accounts/{id}` or a KeyPackage claim names an account that does not exist."),
    UnknownUsername = ("unknown_username", 404, "No account holds this username hash."),
    UnknownProfile = ("unknown_profile", 404, "The account has no sealed profile (also returned when the account does not exist)."),
    UnknownAvatar = ("unknown_avatar", 404, "The account has no avatar (also returned when the account does not exist)."),
    UnknownGroup = ("unknown_group", 404, "A non-commit message for a group for which the server has never accepted a commit."),
    UnknownDevice = ("unknown_device", 404, "A recipient device (message or Welcome) does not exist; or `DELETE /v1/devices/{device}` names no active device of the caller's account."),
    NoKeyPackage = ("no_key_package", 404, "A device of a claimed account has neither a one-time nor a last-resort KeyPackage. The whole claim is refused; nothing is consumed."),
    UnknownLink = ("unknown_link", 404, "No open device-link slot has this token hash (it expired, was used, or never existed)."),
    UnknownInvite = ("unknown_invite", 404, "No invite has this token (it expired or never existed)."),
    UnknownBlob = ("unknown_blob", 404, "No such blob (expired, or deleted after every recipient fetched it)."),
    UnknownChannel = ("unknown_channel", 404, "No channel has this id (channel endpoints, and `POST /v1/blobs` with `channel`)."),
    UnknownEpoch = ("unknown_epoch", 404, "`GET /v1/keys/audit`: an epoch that is not published yet."),
    NotInKeyDirectory = ("not_in_key_directory", 404, "A key-directory lookup or history of an account or username that no published epoch holds yet (new entries are published within `key_directory_epoch_ms`, §8)."),
    UnknownReport = ("unknown_report", 404, "Admin API (§9): no report has this number."),
    ReportsDisabled = ("reports_disabled", 404, "`GET /v1/moderation/key` or `POST /v1/reports` on a server without a moderation key."),
    MethodNotAllowed = ("method_not_allowed", 405, "The path exists but not with this method."),
    UsernameTaken = ("username_taken", 409, "The username hash belongs to another account."),
    EpochConflict = ("epoch_conflict", 409, "A commit was made in an epoch other than the group's current one on the server (another commit won). Carries `current_epoch`."),
    MessageIdReused = ("message_id_reused", 409, "This device already used this message id for a different submission."),
    DeviceIdTaken = ("device_id_taken", 409, "`POST /v1/devices` with a device id another device has; pick another."),
    TooManyDevices = ("too_many_devices", 409, "`POST /v1/devices`: the account already has the most devices allowed; remove one first."),
    ChannelExists = ("channel_exists", 409, "`POST /v1/channels` with an id that another channel has."),
    ChannelSeqConflict = ("channel_seq_conflict", 409, "A post's `seq` is not `latest_seq + 1`, and it is not a byte-identical retry of a stored post. Carries `latest_seq`."),
    RelocationRunning = ("relocation_running", 409, "Admin API (§9): a relocation of this account is running; wait for it to end."),
    RelocationRefused = ("relocation_refused", 409, "Admin API (§9): the relocation cannot start (an unknown region, the account is already there, or the move is not possible now; the message says which)."),
    UploadOffsetMismatch = ("upload_offset_mismatch", 409, "`PATCH /v1/blobs/{blob}` at an `Upload-Offset` other than the bytes the server holds. Carries `upload_offset`: continue from there."),
    UploadInProgress = ("upload_in_progress", 409, "Another request is writing this upload; wait for it to end, then check the upload status."),
    UploadComplete = ("upload_complete", 409, "`PATCH /v1/blobs/{blob}` of an upload that is already complete."),
    UploadIncomplete = ("upload_incomplete", 409, "`GET /v1/blobs/{blob}` before the sender finished uploading it."),
    InviteUsed = ("invite_used", 410, "The invite was already redeemed."),
    TooLarge = ("too_large", 413, "Request body over the limit (judged from `Content-Length` before reading, or while reading), MLS message plus Welcome over `max_message_bytes`, sealed profile over 8 KiB, KeyPackage over 16 KiB, more than 100 KeyPackages in one upload, sealed channel description or post over 256 KiB, an upload with more bytes than it announced."),
    QuotaExceeded = ("quota_exceeded", 413, "`POST /v1/blobs`: the device's undelivered uploads would exceed its quota; wait until they are fetched."),
    UnsupportedMediaType = ("unsupported_media_type", 415, "A JSON body was sent without `Content-Type: application/json`."),
    RangeNotSatisfiable = ("range_not_satisfiable", 416, "`GET /v1/blobs/{blob}` with a `Range` that starts beyond the blob."),
    TooManyKeyPackages = ("too_many_key_packages", 422, "The upload would take the device's one-time KeyPackage stock over `max_key_packages_per_device`."),
    TooManyRecipients = ("too_many_recipients", 422, "Message recipients plus Welcome recipients exceed `max_recipients`."),
    RateLimited = ("rate_limited", 429, "Per-device request limit, or per-address registration limit. No `Retry-After` header is sent; the buckets refill continuously (§8)."),
    MailboxFull = ("mailbox_full", 429, "A recipient device already has `max_queued_per_device` undelivered messages; nothing more is queued for it until it comes online. Nothing was stored."),
    LimitReached = ("limit_reached", 429, "The account already owns 100 channels, or already subscribes to 10 000."),
    Internal = ("internal", 500, "Server fault (details only in the server log). Safe to retry with the same message id."),
    Relocating = ("relocating", 503, "The account's data is being moved to another region (`fumi admin relocate`): every request of its devices, and KeyPackage claims for it, wait. Retry after a few seconds; a move of a usual account takes seconds."),
    RegionUnavailable = ("region_unavailable", 503, "The account lives in a region this server is not configured for (an operator error)."),
    KeyDirectoryPublishing = ("key_directory_publishing", 503, "A key-directory lookup or history while an epoch is being signed, or kept being published while the proof was built; retry in a moment."),
    AuditBusy = ("audit_busy", 503, "The transparency log could not be appended to after several attempts (admin API, §9); nothing was done. Retry."),
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol's error table (`docs/PROTOCOL.md` §3), as Markdown.
pub fn error_table() -> String {
    let mut table = String::from("| code | HTTP | meaning |\n|---|---|---|\n");
    for code in ErrorCode::ALL {
        table.push_str(&format!("| `{code}` | {} | {} |\n", code.status(), code.meaning()));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_parses_back_and_is_unique() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} listed twice");
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            assert!((400..600).contains(&code.status()), "{code}");
        }
        assert_eq!(ErrorCode::parse("no_such_code"), None);
    }
}
