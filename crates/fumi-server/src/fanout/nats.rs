//! Fan-out across the nodes of a cluster through NATS. Every node keeps its own in-process
//! fan-out for the connections it serves, publishes "mailbox of device X changed" and "channel
//! post" events on subjects under a prefix, and feeds the events of other nodes into its
//! in-process fan-out. Events are hints: the database is the truth, so a lost event delays a
//! delivery (until the connection re-reads its mailbox) but loses nothing. While NATS is
//! unreachable the node says so in its log and metrics and its connections re-read their
//! mailboxes every second instead of every 30.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use fumi_proto::{ChannelId, DeviceId};
use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};

use super::{ChannelPush, Fanout, InProcessFanout, Subscription};

/// How often connections re-read their mailboxes while NATS is unreachable.
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// Events waiting to be published; beyond this a burst drops hints (the database has them).
const PUBLISH_QUEUE: usize = 65_536;

enum Outgoing {
    Device(DeviceId),
    Channel(ChannelPush),
}

/// In-process fan-out plus NATS between nodes.
pub struct NatsFanout {
    local: Arc<InProcessFanout>,
    outgoing: mpsc::Sender<Outgoing>,
    connected: Arc<AtomicBool>,
}

impl NatsFanout {
    /// Connects to NATS at `url` and listens for other nodes' events under `prefix`. The first
    /// connection must succeed (a misconfigured cluster should not start); later losses are
    /// survived.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, String> {
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err("nats_subject_prefix must be letters, digits, _ or -".into());
        }
        let connected = Arc::new(AtomicBool::new(false));
        let flag = connected.clone();
        let client = ConnectOptions::new()
            .name("fumi-server")
            // This node's own events already reached its in-process fan-out.
            .no_echo()
            .event_callback(move |event| {
                let flag = flag.clone();
                async move {
                    match event {
                        Event::Connected => {
                            if !flag.swap(true, Ordering::SeqCst) {
                                tracing::info!("connected to NATS: deliveries from other nodes are pushed");
                            }
                        }
                        Event::Disconnected => {
                            flag.store(false, Ordering::SeqCst);
                            tracing::warn!(
                                "lost NATS: deliveries from other nodes now wait for the mailbox re-read (every {} s)",
                                FALLBACK_POLL.as_secs()
                            );
                        }
                        other => tracing::debug!(event = %other, "NATS"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))?;
        connected.store(true, Ordering::SeqCst);
        let local = Arc::new(InProcessFanout::default());
        let device_subject = format!("{prefix}.device");
        let channel_subject = format!("{prefix}.channel");
        let mut devices = client
            .subscribe(device_subject.clone())
            .await
            .map_err(|e| format!("NATS subscribe: {e}"))?;
        let mut channels = client
            .subscribe(channel_subject.clone())
            .await
            .map_err(|e| format!("NATS subscribe: {e}"))?;
        let incoming = local.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(message) = devices.next() => {
                        if let Ok(device) = DeviceId::from_slice(&message.payload) {
                            incoming.notify(device);
                        }
                    }
                    Some(message) = channels.next() => {
                        // Channel id (16 bytes) then the encoded frame.
                        let payload = &message.payload;
                        if payload.len() > 16
                            && let (Ok(channel), Ok(frame)) =
                                (ChannelId::from_slice(&payload[..16]), std::str::from_utf8(&payload[16..]))
                        {
                            incoming.publish_channel_post((channel, frame.to_owned().into()));
                        }
                    }
                    else => break,
                }
            }
        });
        let (outgoing, mut queue) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(async move {
            while let Some(event) = queue.recv().await {
                let (subject, payload) = match event {
                    Outgoing::Device(device) => (device_subject.clone(), device.as_bytes().to_vec()),
                    Outgoing::Channel((channel, frame)) => (
                        channel_subject.clone(),
                        [channel.as_bytes().as_slice(), frame.as_bytes()].concat(),
                    ),
                };
                // While disconnected the client buffers, then fails; either way the hint may be
                // lost, never the message.
                if let Err(e) = client.publish(subject, payload.into()).await {
                    tracing::debug!(error = %e, "a fan-out event was not published");
                }
            }
        });
        Ok(Self {
            local,
            outgoing,
            connected,
        })
    }

    fn send(&self, event: Outgoing) {
        if self.outgoing.try_send(event).is_err() {
            tracing::debug!("fan-out publish queue full; a hint was dropped");
        }
    }
}

impl Fanout for NatsFanout {
    fn notify(&self, device: DeviceId) {
        self.local.notify(device);
        self.send(Outgoing::Device(device));
    }

    fn connect(&self, device: DeviceId) -> Subscription {
        self.local.connect(device)
    }

    fn publish_channel_post(&self, post: ChannelPush) {
        self.local.publish_channel_post(post.clone());
        self.send(Outgoing::Channel(post));
    }

    fn channel_posts(&self) -> broadcast::Receiver<ChannelPush> {
        self.local.channel_posts()
    }

    fn bus_connected(&self) -> Option<bool> {
        Some(self.connected.load(Ordering::SeqCst))
    }

    fn poll_interval(&self) -> Duration {
        if self.connected.load(Ordering::SeqCst) {
            super::IDLE_POLL
        } else {
            FALLBACK_POLL
        }
    }
}
