//! Telling a device's delivery connection that its mailbox changed. In-process by default; a
//! cluster carries the same events between nodes over NATS ([`nats`]).

mod nats;

pub use nats::NatsFanout;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use fumi_proto::{ChannelId, DeviceId};
use tokio::sync::{broadcast, watch};

/// A channel post ready to push: its channel and the serialised `channel_post` frame, encoded
/// once and shared by every connection that sends it.
pub type ChannelPush = (ChannelId, Utf8Bytes);

/// Channel posts buffered for slow connections; one that falls further behind skips the
/// pushes it missed (its client fetches them by number).
const CHANNEL_PUSH_BUFFER: usize = 256;

/// Carries "new message for device X" events to whichever connection serves X.
pub trait Fanout: Send + Sync + 'static {
    /// Wakes the connection of `device`, if any.
    fn notify(&self, device: DeviceId);
    /// Registers a new delivery connection for `device`; a previous connection of the same
    /// device is told to close (one WebSocket per device).
    fn connect(&self, device: DeviceId) -> Subscription;
    /// Pushes a stored channel post to every delivery connection of a subscriber.
    fn publish_channel_post(&self, post: ChannelPush);
    /// Channel posts as they are published (each connection keeps those of its subscriptions).
    fn channel_posts(&self) -> broadcast::Receiver<ChannelPush>;
    /// Whether the bus between nodes is up; `None` for a single node.
    fn bus_connected(&self) -> Option<bool> {
        None
    }
    /// How often an idle delivery connection re-reads its mailbox without an event: rarely
    /// while events arrive, often while the bus between nodes is down.
    fn poll_interval(&self) -> Duration {
        IDLE_POLL
    }
}

/// The re-read of an idle connection's mailbox, a safety net for a lost event.
pub const IDLE_POLL: Duration = Duration::from_secs(30);

/// A delivery connection's view of its device's events.
#[derive(Debug)]
pub struct Subscription {
    /// Changes whenever the mailbox may have new envelopes.
    pub mailbox: watch::Receiver<u64>,
    /// Changes when a newer connection of the same device replaced this one.
    pub replaced: watch::Receiver<u64>,
    /// This connection's number, compared with `replaced`.
    pub connection: u64,
}

impl Subscription {
    /// Whether a newer connection replaced this one.
    pub fn is_replaced(&self) -> bool {
        *self.replaced.borrow() != self.connection
    }
}

#[derive(Debug)]
struct DeviceChannels {
    mailbox: watch::Sender<u64>,
    connection: watch::Sender<u64>,
}

/// Fan-out inside one process.
#[derive(Debug)]
pub struct InProcessFanout {
    devices: Mutex<HashMap<DeviceId, DeviceChannels>>,
    channel_posts: broadcast::Sender<ChannelPush>,
}

impl Default for InProcessFanout {
    fn default() -> Self {
        Self {
            devices: Mutex::default(),
            channel_posts: broadcast::channel(CHANNEL_PUSH_BUFFER).0,
        }
    }
}

impl InProcessFanout {
    fn with_channels<T>(&self, device: DeviceId, f: impl FnOnce(&DeviceChannels) -> T) -> T {
        let mut devices = self.devices.lock().expect("fanout lock poisoned");
        // Drop channels nobody listens to any more, so the map stays the size of the online set.
        if devices.len() > 1024 {
            devices.retain(|_, c| c.mailbox.receiver_count() > 0);
        }
        let channels = devices.entry(device).or_insert_with(|| DeviceChannels {
            mailbox: watch::channel(0).0,
            connection: watch::channel(0).0,
        });
        f(channels)
    }
}

impl Fanout for InProcessFanout {
    fn notify(&self, device: DeviceId) {
        let devices = self.devices.lock().expect("fanout lock poisoned");
        if let Some(channels) = devices.get(&device) {
            channels.mailbox.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn connect(&self, device: DeviceId) -> Subscription {
        self.with_channels(device, |channels| {
            let mut connection = 0;
            channels.connection.send_modify(|n| {
                *n += 1;
                connection = *n;
            });
            Subscription {
                mailbox: channels.mailbox.subscribe(),
                replaced: channels.connection.subscribe(),
                connection,
            }
        })
    }

    fn publish_channel_post(&self, post: ChannelPush) {
        // No receiver (nobody with a subscription online) is not an error.
        let _ = self.channel_posts.send(post);
    }

    fn channel_posts(&self) -> broadcast::Receiver<ChannelPush> {
        self.channel_posts.subscribe()
    }
}
