//! Checking a server's transparency log of operator accesses from the outside: what
//! `fumi audit verify` (anyone) and `fumi audit mine` (an account holder) run.

use fumi_audit::verify::{self, Totals, VerifierState, VerifyError};
use fumi_audit::{ConsistencyProof, EntriesPage, Entry, InclusionProof, SignedTreeHead, TreeHead, decode_path};
use fumi_proto::endpoints::{self, Endpoint};
use std::fmt::Display;
use thiserror::Error;

use crate::ClientError;
use crate::transport::Transport;

/// Entries fetched per request.
const PAGE: u64 = fumi_audit::verify::PAGE_SIZE;

/// Why a log check failed.
#[derive(Debug, Error)]
pub enum AuditError {
    /// The log is not what its signed heads commit to.
    #[error("LOG VERIFICATION FAILED: {0}")]
    Tampered(#[from] VerifyError),
    /// The server could not prove something its signed head commits to.
    #[error(
        "LOG VERIFICATION FAILED: the server cannot prove entry {index} of its signed log ({cause}); entries were removed or the log was rewritten"
    )]
    Unprovable {
        /// The entry.
        index: u64,
        /// The server's answer.
        cause: String,
    },
    /// The server could not be asked.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// The result of a verification run.
#[derive(Debug, Clone)]
pub struct Verified {
    /// What to remember for the next run.
    pub state: VerifierState,
    /// Entries checked in this run.
    pub new_entries: u64,
    /// The entries checked in this run, in order.
    pub entries: Vec<Entry>,
}

/// Checks that `head` (already signature-checked against `previous`'s key) extends the head
/// seen last time.
async fn check_extends(transport: &Transport, previous: &VerifierState, head: &TreeHead) -> Result<(), AuditError> {
    if previous.head.tree_size == 0 {
        return Ok(());
    }
    let proof: ConsistencyProof = get(
        transport,
        endpoints::AUDIT_CONSISTENCY,
        &[("first", &previous.head.tree_size), ("second", &head.tree_size)],
    )
    .await
    .map_err(|e| unprovable(previous.head.tree_size, e))?;
    let path = decode_path(&proof.path).ok_or_else(|| protocol("consistency proof"))?;
    verify::check_consistency(&previous.head, head, &path)?;
    Ok(())
}

/// Fetches the log's head, checks that it extends `previous` (if any), checks the inclusion of
/// every entry after it, and counts them.
pub async fn verify_log(server: &str, previous: Option<&VerifierState>) -> Result<Verified, AuditError> {
    let transport = Transport::new(server)?;
    let served: SignedTreeHead = get(&transport, endpoints::AUDIT_HEAD, &[]).await?;
    let head = verify::check_head(previous.map(|p| &p.head), &served)?;
    let (start, mut totals) = match previous {
        Some(previous) => {
            check_extends(&transport, previous, &head).await?;
            (previous.head.tree_size, previous.totals.clone())
        }
        None => (0, Totals::default()),
    };
    let mut entries = Vec::new();
    let mut index = start;
    while index < head.tree_size {
        let end = (index + PAGE).min(head.tree_size);
        let page: EntriesPage = get(
            &transport,
            endpoints::AUDIT_ENTRIES,
            &[("start", &index), ("end", &end)],
        )
        .await
        .map_err(|e| unprovable(index, e))?;
        if page.entries.is_empty() {
            return Err(AuditError::Unprovable {
                index,
                cause: "the server returned no entry".into(),
            });
        }
        for bytes in page.entries.iter().take((end - index) as usize) {
            let proof: InclusionProof = get(
                &transport,
                endpoints::AUDIT_INCLUSION,
                &[("index", &index), ("tree_size", &head.tree_size)],
            )
            .await
            .map_err(|e| unprovable(index, e))?;
            let path = decode_path(&proof.path).ok_or_else(|| protocol("inclusion proof"))?;
            let entry = verify::check_entry(index, bytes.as_bytes(), &head, &path)?;
            totals.add(&entry);
            entries.push(entry);
            index += 1;
        }
    }
    Ok(Verified {
        state: VerifierState { head: served, totals },
        new_entries: head.tree_size - start,
        entries,
    })
}

fn unprovable(index: u64, error: ClientError) -> AuditError {
    match error {
        ClientError::Server { code, message, .. } => AuditError::Unprovable {
            index,
            cause: format!("{code}: {message}"),
        },
        other => AuditError::Client(other),
    }
}

fn protocol(what: &str) -> AuditError {
    AuditError::Client(ClientError::Protocol(format!("the server sent a malformed {what}")))
}

async fn get<R: serde::de::DeserializeOwned>(
    transport: &Transport,
    endpoint: Endpoint,
    query: &[(&str, &(dyn Display + Sync))],
) -> Result<R, ClientError> {
    transport.request_query::<(), R>(endpoint, &[], query, None).await
}

impl crate::FumiClient {
    /// Verifies the whole log and returns the entries that name this account (recognised with
    /// the account's audit key, which only its devices and the server hold).
    pub async fn my_audit_entries(&self) -> Result<(Verified, Vec<Entry>), AuditError> {
        let key: fumi_proto::AuditKey = self.transport.request::<(), _>(endpoints::AUDIT_KEY, &[], None).await?;
        let key: [u8; 32] = key.audit_key.as_slice().try_into().map_err(|_| protocol("audit key"))?;
        // The server knows who asks: without the head seen last time, it could show this account a
        // log of its own making. The log key and last head are kept in the home and checked.
        let state_path = self.home.join("audit-state.json");
        let previous: Option<VerifierState> = match std::fs::read_to_string(&state_path) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| {
                AuditError::Client(ClientError::Store(format!("{} is damaged: {e}", state_path.display())))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(AuditError::Client(ClientError::Store(e.to_string()))),
        };
        // Every entry, checked against the head served now; that head must extend the last one.
        let verified = verify_log(self.transport.base(), None).await?;
        if let Some(previous) = &previous {
            let transport = Transport::new(self.transport.base())?;
            let head = verify::check_head(Some(&previous.head), &verified.state.head)?;
            check_extends(&transport, previous, &head).await?;
        }
        let text = serde_json::to_string(&verified.state).expect("state serialises");
        let temporary = state_path.with_extension("tmp");
        std::fs::write(&temporary, text)
            .and_then(|()| std::fs::rename(&temporary, &state_path))
            .map_err(|e| AuditError::Client(ClientError::Store(e.to_string())))?;
        let mine = verified.entries.iter().filter(|e| e.concerns(&key)).cloned().collect();
        Ok((verified, mine))
    }
}
