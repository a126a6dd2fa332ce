//! Counters exported at `/metrics` in the Prometheus text format. Only counts: no ids, no
//! per-user labels.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::StorageStats;

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP answers with a 2xx/3xx status.
    pub http_ok: AtomicU64,
    /// HTTP answers with a 4xx status.
    pub http_client_errors: AtomicU64,
    /// HTTP answers with a 5xx status.
    pub http_server_errors: AtomicU64,
    /// Accounts registered by this process.
    pub registrations: AtomicU64,
    /// Messages accepted (not counting duplicates).
    pub messages_accepted: AtomicU64,
    /// Commits refused for an epoch conflict.
    pub commit_conflicts: AtomicU64,
    /// Envelopes acknowledged and deleted.
    pub envelopes_acknowledged: AtomicU64,
    /// Requests refused by rate limits.
    pub rate_limited: AtomicU64,
    /// Open delivery WebSockets.
    pub websockets_open: AtomicU64,
    /// Delivery connections that sent everything queued and began waiting for new envelopes.
    pub deliveries_drained: AtomicU64,
    /// Blob bytes received in uploads.
    pub blob_bytes_received: AtomicU64,
    /// Blob bytes sent in downloads.
    pub blob_bytes_sent: AtomicU64,
    /// Blobs deleted (every recipient fetched them, or they expired).
    pub blobs_deleted: AtomicU64,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Renders the Prometheus text format.
    pub fn render(&self, stats: StorageStats) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        metric(
            "fumi_http_responses_ok_total",
            "counter",
            "HTTP answers with a 2xx or 3xx status.",
            get(&self.http_ok),
        );
        metric(
            "fumi_http_responses_client_error_total",
            "counter",
            "HTTP answers with a 4xx status.",
            get(&self.http_client_errors),
        );
        metric(
            "fumi_http_responses_server_error_total",
            "counter",
            "HTTP answers with a 5xx status.",
            get(&self.http_server_errors),
        );
        metric(
            "fumi_registrations_total",
            "counter",
            "Accounts registered.",
            get(&self.registrations),
        );
        metric(
            "fumi_messages_accepted_total",
            "counter",
            "Messages accepted by the delivery service.",
            get(&self.messages_accepted),
        );
        metric(
            "fumi_commit_conflicts_total",
            "counter",
            "Commits refused because another won the epoch.",
            get(&self.commit_conflicts),
        );
        metric(
            "fumi_envelopes_acknowledged_total",
            "counter",
            "Envelopes delivered and acknowledged.",
            get(&self.envelopes_acknowledged),
        );
        metric(
            "fumi_rate_limited_total",
            "counter",
            "Requests refused by a rate limit.",
            get(&self.rate_limited),
        );
        metric(
            "fumi_websockets_open",
            "gauge",
            "Open delivery WebSockets.",
            get(&self.websockets_open),
        );
        metric(
            "fumi_deliveries_drained_total",
            "counter",
            "Delivery connections that sent everything queued and began waiting for new envelopes.",
            get(&self.deliveries_drained),
        );
        metric(
            "fumi_blob_bytes_received_total",
            "counter",
            "Encrypted attachment bytes received in uploads.",
            get(&self.blob_bytes_received),
        );
        metric(
            "fumi_blob_bytes_sent_total",
            "counter",
            "Encrypted attachment bytes sent in downloads.",
            get(&self.blob_bytes_sent),
        );
        metric(
            "fumi_blobs_deleted_total",
            "counter",
            "Blobs deleted after every recipient fetched them or they expired.",
            get(&self.blobs_deleted),
        );
        metric("fumi_accounts", "gauge", "Accounts stored.", stats.accounts);
        metric("fumi_devices", "gauge", "Devices stored.", stats.devices);
        metric(
            "fumi_queued_envelopes",
            "gauge",
            "Envelopes waiting in mailboxes.",
            stats.queued_envelopes,
        );
        out
    }
}
