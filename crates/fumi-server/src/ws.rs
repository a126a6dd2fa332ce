//! The delivery WebSocket: pushes a device's queued envelopes in order, deletes what the device
//! acknowledges, and wakes on fan-out events.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use fumi_proto::{Base64Bytes, ClientFrame, ServerFrame};
use futures_util::{SinkExt, StreamExt};

use crate::AppState;
use crate::auth::AuthDevice;
use crate::metrics::Metrics;

/// Largest frame a client may send (acks are small).
const MAX_CLIENT_FRAME_BYTES: usize = 64 * 1024;
/// Most sequence numbers in one ack.
const MAX_ACK_SEQS: usize = 1000;
/// Envelopes fetched from storage per round.
const BATCH: u32 = 100;
/// How often an idle connection pings the client.
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// How long a closing connection waits for the client's Close.
const CLOSE_HANDSHAKE_WAIT: Duration = Duration::from_secs(1);
/// A client that sends nothing, not even a Pong, for this long is gone: close its connection.
const SILENCE_LIMIT: Duration = Duration::from_secs(95);

/// `GET /v1/ws`.
pub async fn upgrade(device: AuthDevice, State(state): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    // Small buffers: an idle connection should cost little memory (the defaults, 128 KiB each
    // way, made every idle delivery connection cost about 140 KB of server memory). Buffers
    // grow as a frame needs.
    ws.max_message_size(MAX_CLIENT_FRAME_BYTES)
        .max_frame_size(MAX_CLIENT_FRAME_BYTES)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            Metrics::inc(&state.metrics.websockets_open);
            if let Err(cause) = deliver(socket, device, &state).await {
                tracing::debug!(device = %device.device.redacted(), %cause, "delivery connection ended");
            }
            state
                .metrics
                .websockets_open
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        })
}

async fn deliver(socket: WebSocket, device: AuthDevice, state: &AppState) -> Result<(), String> {
    let (mut sink, mut stream) = socket.split();
    let mut subscription = state.fanout.connect(device.device);
    // Channel posts are pushed only to subscribers; subscriptions made while this connection is
    // open take effect on the next one (a client fetches posts by number meanwhile).
    let channels: std::collections::HashSet<_> = state
        .storage
        .subscriptions(device.account)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let mut channel_posts = (!channels.is_empty()).then(|| state.fanout.channel_posts());
    let mut shutdown = state.shutdown.clone();
    let mut last_sent = 0u64;
    let mut drained_sent = false;
    let mut last_heard = tokio::time::Instant::now();
    let mut last_ping = tokio::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            return close(&mut sink, &mut stream, close_code::AWAY, "server shutting down").await;
        }
        if subscription.is_replaced() {
            return close(
                &mut sink,
                &mut stream,
                close_code::POLICY,
                "another connection of this device replaced this one",
            )
            .await;
        }
        // Mark the mailbox state as seen before reading it, so an event that arrives during the
        // read wakes the next wait instead of being lost.
        subscription.mailbox.borrow_and_update();
        if state.regions.several() && !still_resident(state, &device).await? {
            // Code 1013, try again later: the client reconnects and reads the new region.
            return close(
                &mut sink,
                &mut stream,
                1013,
                "this account's data is moving to another region; reconnect",
            )
            .await;
        }
        let mailbox = &state.regions.get(device.region).storage;
        let batch = mailbox
            .fetch(device.device, last_sent, BATCH)
            .await
            .map_err(|e| e.to_string())?;
        // A round may stop early (by count or by bytes): read again until nothing is left.
        let more = !batch.is_empty();
        for envelope in batch {
            last_sent = envelope.seq;
            let frame = ServerFrame::Envelope {
                seq: envelope.seq,
                message: Base64Bytes(envelope.body.0),
                received_at: envelope.received_at,
            };
            send(&mut sink, &frame).await?;
        }
        if more {
            continue;
        }
        if !drained_sent {
            send(&mut sink, &ServerFrame::Drained).await?;
            drained_sent = true;
            Metrics::inc(&state.metrics.deliveries_drained);
        }
        tokio::select! {
            changed = subscription.mailbox.changed() => changed.map_err(|e| e.to_string())?,
            _ = subscription.replaced.changed() => {}
            _ = shutdown.changed() => {}
            pushed = next_channel_post(&mut channel_posts) => match pushed {
                Ok((channel, frame)) if channels.contains(&channel) => {
                    sink.send(Message::Text(frame)).await.map_err(|e| e.to_string())?;
                }
                Ok(_) => {}
                // Skipped pushes are fetched by the client, which sees the gap in numbers.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::debug!(skipped, "a delivery connection skipped channel pushes");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => channel_posts = None,
            },
            // Re-read the mailbox now and then (a lost event delays, never loses, a message),
            // and ping the client.
            _ = tokio::time::sleep(state.fanout.poll_interval()) => {
                if last_heard.elapsed() > SILENCE_LIMIT {
                    return close(&mut sink, &mut stream, close_code::AWAY, "no answer to pings").await;
                }
                if last_ping.elapsed() >= PING_INTERVAL {
                    last_ping = tokio::time::Instant::now();
                    sink.send(Message::Ping(Default::default())).await.map_err(|e| e.to_string())?;
                }
            }
            incoming = stream.next() => { last_heard = tokio::time::Instant::now(); match incoming {
                None | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientFrame>(&text) {
                    Ok(ClientFrame::Ack { seqs }) if seqs.len() <= MAX_ACK_SEQS => {
                        let deleted = state.regions.get(device.region).storage.acknowledge(device.device, &seqs).await.map_err(|e| e.to_string())?;
                        state.metrics.envelopes_acknowledged.fetch_add(deleted, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(ClientFrame::Ack { .. }) => {
                        return close(&mut sink, &mut stream, close_code::POLICY, "an ack carries at most 1000 sequence numbers").await;
                    }
                    Err(_) => return close(&mut sink, &mut stream, close_code::INVALID, "frames must be JSON objects as in docs/PROTOCOL.md").await,
                },
                Some(Ok(Message::Binary(_))) => {
                    return close(&mut sink, &mut stream, close_code::UNSUPPORTED, "binary frames are not accepted; send JSON text frames").await;
                }
                Some(Ok(_)) => {} // ping/pong handled by the library
            }},
        }
    }
}

/// Whether the device's account still lives, unmoving, in the region this connection reads.
async fn still_resident(state: &AppState, device: &AuthDevice) -> Result<bool, String> {
    let record = state
        .storage
        .device_auth(device.device)
        .await
        .map_err(|e| e.to_string())?;
    Ok(record.is_some_and(|record| state.regions.resident(&record.residency).ok() == Some(device.region)))
}

/// The next channel push, or never if the connection has no subscriptions.
async fn next_channel_post(
    receiver: &mut Option<tokio::sync::broadcast::Receiver<crate::fanout::ChannelPush>>,
) -> Result<crate::fanout::ChannelPush, tokio::sync::broadcast::error::RecvError> {
    match receiver {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

async fn send<S: SinkExt<Message> + Unpin>(sink: &mut S, frame: &ServerFrame) -> Result<(), String>
where
    S::Error: std::fmt::Display,
{
    let text = serde_json::to_string(frame).map_err(|e| e.to_string())?;
    sink.send(Message::Text(text.into())).await.map_err(|e| e.to_string())
}

/// Sends a Close frame, then reads (and drops) what the client still sends until its Close,
/// for at most a second: dropping a socket with unread bytes makes the kernel reset the
/// connection, and the client would see a reset instead of the reason.
async fn close<S, R>(sink: &mut S, stream: &mut R, code: u16, reason: &'static str) -> Result<(), String>
where
    S: SinkExt<Message> + Unpin,
    S::Error: std::fmt::Display,
    R: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    sink.send(Message::Close(Some(frame)))
        .await
        .map_err(|e| e.to_string())?;
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_WAIT, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}
