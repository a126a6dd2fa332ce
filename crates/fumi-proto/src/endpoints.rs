//! Every endpoint of the public API as a typed descriptor: method, path template, who may call
//! it and what a success is. The server routes by these, clients and the bench build their
//! requests from them, and the endpoint table in `docs/PROTOCOL.md` §4 is generated from
//! [`ALL`] (a test keeps it equal), so the three cannot drift apart.

use std::fmt::{Display, Write};

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Anyone (public information, or the request carries its own proof).
    Public,
    /// A registered, active device: `Authorization: Fumi <device>:<secret>` (§2).
    Device,
    /// No device credential; the body is signed by the account's identity key.
    IdentitySignature,
}

/// One endpoint of the public API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// HTTP method, upper case.
    pub method: &'static str,
    /// Path template: `{name}` marks a path parameter (`/v1/blobs/{blob}`), as axum matches it.
    pub path: &'static str,
    /// Who may call it.
    pub auth: Auth,
    /// The status of a success.
    pub success: &'static str,
}

impl Endpoint {
    /// The concrete path: each `{…}` of the template replaced, in order, by one of `args`.
    ///
    /// # Panics
    /// If `args` does not hold exactly one value per parameter (a programming error, caught by
    /// the first test that calls the endpoint).
    pub fn path_with(&self, args: &[&dyn Display]) -> String {
        let mut path = String::with_capacity(self.path.len() + 40);
        let mut args = args.iter();
        let mut rest = self.path;
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').expect("path templates close every brace") + open;
            path.push_str(&rest[..open]);
            let arg = args
                .next()
                .unwrap_or_else(|| panic!("{} needs more arguments", self.path));
            write!(path, "{arg}").expect("writing to a String cannot fail");
            rest = &rest[close + 1..];
        }
        path.push_str(rest);
        assert!(args.next().is_none(), "{} was given too many arguments", self.path);
        path
    }

    /// How many path parameters the template has.
    pub fn parameters(&self) -> usize {
        self.path.matches('{').count()
    }
}

macro_rules! endpoints {
    ($( $(#[doc = $doc:literal])* $name:ident = ($method:literal, $path:literal, $auth:ident, $success:literal), )*) => {
        $(
            $(#[doc = $doc])*
            pub const $name: Endpoint = Endpoint { method: $method, path: $path, auth: Auth::$auth, success: $success };
        )*
        /// Every endpoint, in the order of the protocol's table.
        pub const ALL: &[Endpoint] = &[$($name),*];
    };
}

endpoints! {
    /// Liveness.
    HEALTH = ("GET", "/health", Public, "200"),
    /// Prometheus metrics (counts only).
    METRICS = ("GET", "/metrics", Public, "200"),
    /// Register an account with its first device.
    REGISTER = ("POST", "/v1/accounts", Public, "201"),
    /// An account's identity key and devices.
    ACCOUNT = ("GET", "/v1/accounts/{account}", Device, "200"),
    /// An account's sealed profile.
    PROFILE = ("GET", "/v1/accounts/{account}/profile", Device, "200"),
    /// Replace the own sealed profile.
    PUT_PROFILE = ("PUT", "/v1/profile", Device, "204"),
    /// Claim a username hash.
    CLAIM_USERNAME = ("PUT", "/v1/username", Device, "204"),
    /// The account holding a username hash.
    USERNAME = ("GET", "/v1/usernames/{hash}", Device, "200"),
    /// Upload KeyPackages.
    UPLOAD_KEY_PACKAGES = ("POST", "/v1/keypackages", Device, "200"),
    /// How many one-time KeyPackages the device has left.
    KEY_PACKAGE_COUNT = ("GET", "/v1/keypackages/count", Device, "200"),
    /// Claim one KeyPackage for every device of some accounts.
    CLAIM_KEY_PACKAGES = ("POST", "/v1/keypackages/claim", Device, "200"),
    /// Submit an MLS message (and a Welcome) for some devices.
    SUBMIT_MESSAGE = ("POST", "/v1/messages", Device, "200"),
    /// The delivery WebSocket.
    WEBSOCKET = ("GET", "/v1/ws", Device, "101 (WebSocket)"),
    /// Open a device-link slot.
    CREATE_LINK = ("POST", "/v1/links", Device, "201"),
    /// Fetch a device-link bundle.
    OPEN_LINK = ("POST", "/v1/links/open", Public, "200"),
    /// A device-link slot's state.
    LINK_STATUS = ("GET", "/v1/links/{token_hash}", Device, "200"),
    /// Leave a history archive for a linked device.
    PUT_LINK_HISTORY = ("PUT", "/v1/links/{token_hash}/history", Device, "204"),
    /// Fetch the history archive left for this device.
    GET_LINK_HISTORY = ("POST", "/v1/links/history", Device, "200"),
    /// Join an account through a link slot.
    LINK_DEVICE = ("POST", "/v1/devices", IdentitySignature, "201"),
    /// Remove a device of the own account.
    REMOVE_DEVICE = ("DELETE", "/v1/devices/{device}", Device, "204"),
    /// Create a contact invite.
    CREATE_INVITE = ("POST", "/v1/invites", Device, "201"),
    /// Redeem a contact invite.
    REDEEM_INVITE = ("POST", "/v1/invites/redeem", Device, "204"),
    /// Replace the own sealed avatar.
    PUT_AVATAR = ("PUT", "/v1/profile/avatar", Device, "204"),
    /// An account's sealed avatar.
    AVATAR = ("GET", "/v1/accounts/{account}/avatar", Device, "200"),
    /// Start an upload.
    CREATE_BLOB = ("POST", "/v1/blobs", Device, "201"),
    /// Upload bytes.
    UPLOAD_BLOB = ("PATCH", "/v1/blobs/{blob}", Device, "200"),
    /// How much of an upload the server holds.
    BLOB_UPLOAD_STATUS = ("GET", "/v1/blobs/{blob}/upload", Device, "200"),
    /// Download a blob.
    DOWNLOAD_BLOB = ("GET", "/v1/blobs/{blob}", Device, "200 / 206"),
    /// Say a blob was fetched.
    ACK_BLOB = ("POST", "/v1/blobs/{blob}/ack", Device, "204"),
    /// The transparency log's signed tree head.
    AUDIT_HEAD = ("GET", "/v1/audit/head", Public, "200"),
    /// Entries of the transparency log.
    AUDIT_ENTRIES = ("GET", "/v1/audit/entries", Public, "200"),
    /// An inclusion proof of the transparency log.
    AUDIT_INCLUSION = ("GET", "/v1/audit/proof/inclusion", Public, "200"),
    /// A consistency proof of the transparency log.
    AUDIT_CONSISTENCY = ("GET", "/v1/audit/proof/consistency", Public, "200"),
    /// The key that tags the caller's account in the transparency log.
    AUDIT_KEY = ("GET", "/v1/audit/key", Device, "200"),
    /// The key directory's newest signed epoch.
    KEYS_HEAD = ("GET", "/v1/keys/head", Public, "200"),
    /// A page of the key directory's signed epochs.
    KEYS_HEADS = ("GET", "/v1/keys/heads", Public, "200"),
    /// An append-only proof between two epochs of the key directory.
    KEYS_AUDIT = ("GET", "/v1/keys/audit", Public, "200"),
    /// An account's key-directory entry with its lookup proof.
    KEYS_LOOKUP_ACCOUNT = ("GET", "/v1/keys/lookup/account/{account}", Device, "200"),
    /// A username's key-directory entry with its lookup proof.
    KEYS_LOOKUP_USERNAME = ("GET", "/v1/keys/lookup/username/{hash}", Device, "200"),
    /// The caller's account's key-directory history.
    KEYS_OWN_HISTORY = ("GET", "/v1/keys/history", Device, "200"),
    /// Any account's key-directory history.
    KEYS_ACCOUNT_HISTORY = ("GET", "/v1/keys/history/account/{account}", Device, "200"),
    /// The moderation public key reports are sealed to.
    MODERATION_KEY = ("GET", "/v1/moderation/key", Device, "200"),
    /// File an abuse report.
    FILE_REPORT = ("POST", "/v1/reports", Device, "200"),
    /// Create a broadcast channel.
    CREATE_CHANNEL = ("POST", "/v1/channels", Device, "201"),
    /// A channel's sealed description.
    CHANNEL = ("GET", "/v1/channels/{channel}", Device, "200"),
    /// Replace a channel's sealed description.
    UPDATE_CHANNEL = ("PUT", "/v1/channels/{channel}", Device, "204"),
    /// Post in a channel.
    POST_TO_CHANNEL = ("POST", "/v1/channels/{channel}/posts", Device, "201 / 200"),
    /// A page of a channel's posts.
    CHANNEL_POSTS = ("GET", "/v1/channels/{channel}/posts", Device, "200"),
    /// Follow a channel.
    SUBSCRIBE = ("PUT", "/v1/channels/{channel}/subscription", Device, "204"),
    /// Stop following a channel.
    UNSUBSCRIBE = ("DELETE", "/v1/channels/{channel}/subscription", Device, "204"),
}

/// The protocol's endpoint table (`docs/PROTOCOL.md` §4), as Markdown.
pub fn endpoint_table() -> String {
    let mut table = String::from("| method | path | auth | success |\n|---|---|---|---|\n");
    for endpoint in ALL {
        let auth = match endpoint.auth {
            Auth::Public => "no",
            Auth::Device => "yes",
            Auth::IdentitySignature => "no (identity-key signature)",
        };
        writeln!(
            table,
            "| {} | `{}` | {auth} | {} |",
            endpoint.method, endpoint.path, endpoint.success
        )
        .expect("writing to a String cannot fail");
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_fill_their_parameters_in_order() {
        assert_eq!(ACK_BLOB.path_with(&[&"b1"]), "/v1/blobs/b1/ack");
        assert_eq!(REGISTER.path_with(&[]), "/v1/accounts");
        assert_eq!(KEYS_LOOKUP_ACCOUNT.parameters(), 1);
    }

    #[test]
    #[should_panic(expected = "needs more arguments")]
    fn a_missing_parameter_is_caught() {
        ACK_BLOB.path_with(&[]);
    }

    #[test]
    fn every_endpoint_is_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for endpoint in ALL {
            assert!(seen.insert((endpoint.method, endpoint.path)), "{endpoint:?} twice");
            assert!(endpoint.path.starts_with('/'));
        }
    }
}
